"""A train_glue.py run's machinery: its processes, folder, bookkeeping, checkpoints and report.

- setup_distributed and parse_flags: DDP from torchrun's environment; a dataclass's fields as flags;
- claim: --out_dir belongs to one run at a time, and a run that fails leaves nothing behind;
- Run: the bookkeeping around the training loop: --resume, the progress line, a diverged run's stop,
  the best evaluation at the final budget (adapter.pt), train_state.pt, the report (metrics.json,
  the rank pattern as a text heatmap, rank_pattern.png with --plot, the PEFT adapter);
- save_peft: the PEFT LoRA adapter folder of a LoRA² model (lora2.peft_state_dict written to disk).
Every file is written atomically (formats.atomic_write): a killed run leaves the previous version,
never half a file, and a failed write (disk full) says so and keeps the previous file. Everything
here takes plain values; `settings` is a run's flags as a dict (dataclasses.asdict of its Config).
Not here: the training loop and the method (train_glue.py, lora2.py).
"""
import argparse
import contextlib
import dataclasses
import fcntl
import json
import math
import os
import re
import sys
import time
import typing
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

import bert
import compiled
import formats
import glue
import lora2

# --------------------------------------------------------------------------------------------------
# processes and flags


def setup_distributed(device_choice):
    """(rank, world size, device, whether it started the process group): DDP if WORLD_SIZE > 1."""
    use_cuda = device_choice == "cuda" or (device_choice == "auto" and torch.cuda.is_available())
    if use_cuda and not torch.cuda.is_available():
        raise ValueError("--device cuda, but torch sees no CUDA device")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    started = world > 1 and not dist.is_initialized()
    if started:
        dist.init_process_group("nccl" if use_cuda else "gloo")
    device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if use_cuda else "cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    return (dist.get_rank() if world > 1 else 0), world, device, started


def parse_flags(config, argv, description):
    """{flag: value} of the flags given on the command line, one per field of the dataclass
    `config` (its metadata: help, choices); a bool field is --flag, or --flag / --no-flag where its
    default is None (auto)."""
    p = argparse.ArgumentParser(description=description, argument_default=argparse.SUPPRESS)
    hints = typing.get_type_hints(config)
    for f in dataclasses.fields(config):
        tp = next((a for a in typing.get_args(hints[f.name]) if a is not type(None)), hints[f.name])
        text = f.metadata["help"] + ("" if "default" in f.metadata["help"] else f" ({f.default})")
        if tp is bool:
            action = argparse.BooleanOptionalAction if f.default is None else "store_true"
            p.add_argument(f"--{f.name}", action=action, help=text)
        else:
            p.add_argument(f"--{f.name}", type=tp, choices=f.metadata["choices"], help=text)
    return vars(p.parse_args(argv))


def parse_config(config, argv, description, presets):
    """`config` (a dataclass with a `preset` field) from the command line: its defaults, then the
    preset named by --preset (presets: {name: function(task) -> {field: value}}), then the flags
    given, which win (a --steps given drops the preset's epochs). Its `given`: the flags given."""
    given = parse_flags(config, argv, description)
    chosen = presets[given["preset"]](given.get("task", config.task)) if "preset" in given else {}
    if "steps" in given:
        chosen.pop("epochs", None)
    cfg = config(**{**chosen, **given})
    cfg.given = frozenset(given)
    return cfg


def adamw(model, lr, weight_decay, warmup, steps):
    """(AdamW (fused) over the model's trainable parameters, no decay on biases and LayerNorm; its
    schedule: a linear warm-up over the fraction `warmup` of the steps, then linear decay to 0;
    the parameters)."""
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    plain = [n.endswith("bias") or "LayerNorm" in n or "layer_norm" in n for n, _ in params]
    optimizer = torch.optim.AdamW(
        [{"params": [p for (_, p), no in zip(params, plain) if not no],
          "weight_decay": weight_decay},
         {"params": [p for (_, p), no in zip(params, plain) if no], "weight_decay": 0.0}],
        lr=lr, fused=True)
    warm = round(warmup * steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda t: t / warm if t < warm else max(0.0, (steps - t) / max(1, steps - warm)))
    return optimizer, scheduler, [p for _, p in params]


def warmup_steps(init_warmup, final_warmup, steps, source, prunes=True):
    """(t_i, t_f) of (L7) in steps: the fractions --init_warmup and --final_warmup of the run's
    `steps` (from `source`), rounded. A method that prunes on that schedule needs T > t_i + t_f:
    else a one-line error in flag names."""
    t_i, t_f = round(init_warmup * steps), round(final_warmup * steps)
    if prunes and steps <= t_i + t_f:
        raise ValueError(f"--init_warmup {init_warmup:g} and --final_warmup {final_warmup:g} of "
                         f"{steps} steps ({source}) round to {t_i} + {t_f} steps, leaving no "
                         f"pruning phase: give more steps or smaller warm-ups")
    return t_i, t_f


# --------------------------------------------------------------------------------------------------
# the output folder

RUN_FILES = ("metrics.json", "adapter.pt", "train_state.pt", "rank_pattern.png")  # a run's files
LOCK = ".lock"


@contextlib.contextmanager
def claim(out_dir, resume=False, overwrite=False, export_peft=None):
    """Make `out_dir` this run's until the `with` block ends; every check comes before any data or
    model is loaded.

    - creates the folder and takes an exclusive lock on its .lock (flock: the kernel drops it when
      the process ends, even on kill -9, so no lock goes stale): a second run into the folder is
      refused while this one lives;
    - a folder holding a run's files (RUN_FILES) is refused, naming them, unless `resume` continues
      that run from its train_state.pt, or `overwrite` replaces it (clear deletes them once every
      check has passed);
    - the temporary files of an interrupted save (.<run file>.<pid>.<random>.tmp, as
      formats.atomic_write names them) are removed;
    - `export_peft` passes check_export_folder.
    At the end the .lock goes, and so do the folders this claim created if the run wrote nothing
    into them (a run that failed before its first save leaves no trace).
    """
    out_dir, created = Path(out_dir), []
    try:
        created = [p for p in (out_dir, *out_dir.parents) if not p.exists()]  # innermost first
        out_dir.mkdir(parents=True, exist_ok=True)
        lock = _lock(out_dir / LOCK)
    except OSError as e:
        _remove_empty(created)
        raise OSError(f"--out_dir {out_dir}: cannot create or write to it ({e.strerror or e}); "
                      f"choose a writable folder") from None
    except ValueError:
        _remove_empty(created)
        raise
    try:
        found = [name for name in RUN_FILES if (out_dir / name).exists()]
        if found and resume and "train_state.pt" not in found:
            raise ValueError(f"--resume: {out_dir} holds a run ({', '.join(found)}) but no "
                             f"train_state.pt to continue from (it ran without --save_every); pass "
                             f"--overwrite to replace it, or choose another --out_dir")
        elif found and not (resume or overwrite):
            raise ValueError(f"--out_dir {out_dir} already holds a run ({', '.join(found)}); "
                             f"pass --resume to continue it, --overwrite to replace it, or choose "
                             f"another --out_dir")
        for tmp in out_dir.glob(".*.tmp"):
            if tmp.name.startswith(tuple(f".{name}." for name in RUN_FILES)):
                tmp.unlink()
        if export_peft:
            check_export_folder(Path(export_peft), overwrite or resume)
        yield out_dir
    finally:
        (out_dir / LOCK).unlink(missing_ok=True)  # while holding it: a waiting run sees it gone
        lock.close()
        _remove_empty(created)


def _lock(path):
    """The open lock file `path`, flock'ed exclusively with the process id in it; ValueError if
    another run holds it. A lock file unlinked by its holder between our open and our flock is not
    ours: open the new one instead."""
    while True:
        lock = open(path, "a+")
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.seek(0)
            pid = lock.read().strip() or "?"
            lock.close()
            raise ValueError(f"--out_dir {path.parent} is in use by another run (pid {pid}); "
                             f"wait for it to end or choose another --out_dir") from None
        try:
            if os.stat(path).st_ino == os.fstat(lock.fileno()).st_ino:
                break
        except FileNotFoundError:
            pass
        lock.close()
    lock.truncate(0)
    lock.write(f"{os.getpid()}\n")
    lock.flush()
    return lock


def _remove_empty(folders):
    """rmdir each folder (innermost first) as long as they are empty; one that does not exist is
    skipped."""
    for folder in folders:
        try:
            folder.rmdir()
        except FileNotFoundError:
            continue
        except OSError:
            return


def clear(out_dir):
    """--overwrite: delete the previous run's files, once every check has passed and before this
    run writes any."""
    found = [name for name in RUN_FILES if (out_dir / name).exists()]
    for name in found:
        (out_dir / name).unlink()
    if found:
        print(f"--overwrite: deleted the previous run's {', '.join(found)} in {out_dir}",
              file=sys.stderr, flush=True)

def check_export_folder(path, replace=False):
    """--export_peft: a folder (created at the end) whose nearest existing ancestor is a writable
    folder, holding no adapter unless `replace` (--overwrite or --resume)."""
    try:
        existing = next(p for p in (path, *path.parents) if p.exists())
    except OSError as e:
        raise OSError(f"--export_peft {path}: cannot reach it ({e.strerror or e}); choose a "
                      f"writable folder") from None
    if not existing.is_dir():
        raise ValueError(f"--export_peft {path}: {existing} is a file, not a folder; give a folder "
                         f"path (it is created at the end of the run)")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise OSError(f"--export_peft {path}: {existing} is not writable; choose a writable folder")
    if (path / "adapter_config.json").exists() and not replace:
        raise ValueError(f"--export_peft {path} already holds a PEFT adapter; pass --overwrite to "
                         f"replace it, or choose another folder")


def export_peft(export, path, base, done):
    """--export_peft: export(path, base) where base is the backbone's name or folder (None: the
    packaged MiniLM); the line to print. A failed write is one OSError that ends with `done`."""
    try:
        export(path, base or str(bert.default_model_dir(install=False)))
    except OSError as e:
        raise OSError(f"--export_peft {path}: could not write the PEFT adapter "
                      f"({e.strerror or e}); {done}") from None
    return f"wrote a PEFT LoRA adapter to {path}"


def save_peft(model, path, base_model_name_or_path=None, modules_to_save=None):
    """Write the LoRA² model as a PEFT LoRA adapter in directory `path` (SPEC §6):
    adapter_model.safetensors and adapter_config.json, for `PeftModel.from_pretrained(base, path)`
    on the untouched base model. What they hold is lora2.peft_state_dict (each layer the exact LoRA
    of rank min(k, #λ≠0), layers of rank 0 left out, the trained head as modules_to_save). Returns
    {layer name: LoRA rank}."""
    tensors, config = lora2.peft_state_dict(model, base_model_name_or_path, modules_to_save)
    os.makedirs(path, exist_ok=True)
    formats.write_safetensors(tensors, os.path.join(path, "adapter_model.safetensors"),
                              metadata={"format": "pt"})
    formats.atomic_write(os.path.join(path, "adapter_config.json"), json.dumps(config, indent=2))
    return {name: len(tensors[f"base_model.model.{name}.lora_A.weight"])
            for name in config["target_modules"]}


# --------------------------------------------------------------------------------------------------
# checkpoints

RUN_CONTROL = {  # flags that may differ when a run resumes: where and how it runs, not what
    "data_dir", "no_download", "out_dir", "save_every", "resume", "overwrite", "log_every",
    "export_peft", "plot", "device", "compile", "compile_backend"}
EVAL_CONTROL = {  # --eval_only takes the rest from --load
    "data_dir", "no_download", "device", "eval_only", "load", "export_peft", "overwrite"}
KINDS = {"adapter": "an adapter.pt (best adapter + head, for --eval_only --load)",
         "train_state": "a train_state.pt (resumable training state, for --resume)"}



def torch_save(obj, path):
    """torch.save, atomically (write)."""
    write(path, lambda f: torch.save(obj, f))


def write(path, data):
    """formats.atomic_write; a failed write (disk full, no permission) is one OSError saying the
    file is unchanged."""
    try:
        formats.atomic_write(path, data)
    except (OSError, RuntimeError) as e:  # torch.save to a path: a full disk is a RuntimeError
        reason = (e.strerror if isinstance(e, OSError) and e.strerror
                  else "the write failed; is the disk full?")
        raise OSError(f"could not write {path} ({reason}); {Path(path).name} is unchanged (the "
                      f"previous version, if any, is intact): free disk space or fix permissions, "
                      f"then run again (--resume continues from the last train_state.pt)") from None


def load_checkpoint(path, kind, map_location="cpu"):
    """The dict that save_adapter or save_train_state wrote to `path`, checked to be `kind`
    ("adapter" or "train_state"): a missing, unreadable (corrupt, truncated, empty) or other kind of
    file raises a one-line error naming it. A checkpoint without a "kind" is recognised by its
    keys."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such checkpoint; pass {KINDS[kind].split(' (')[0]} "
                                f"written by train_glue.py")
    try:
        ck = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # a damaged file: RuntimeError, UnpicklingError, EOFError, KeyError, ...
        raise ValueError(f"{path}: not a readable checkpoint (corrupt or truncated: "
                         f"{type(e).__name__}); use another copy, or delete it and train "
                         f"again") from None
    found = None
    if isinstance(ck, dict) and isinstance(ck.get("config"), dict):
        found = ck.get("kind") or ("train_state" if "optimizer" in ck
                                   else "adapter" if "adapter" in ck else None)
    if found != kind:
        what = KINDS.get(found, "not a train_glue.py checkpoint").split(" (")[0]
        raise ValueError(f"{path} is {what}; expected {KINDS[kind]}")
    return ck

def save_adapter(path, settings, step, metrics, state):
    """adapter.pt: the best evaluation's trained tensors (`state`, {part: {name: tensor}}), its
    step, metrics and the run's settings; a diverged state is refused (check_finite_state)."""
    check_finite_state(state, step, settings["lr"], settings["clip"])
    torch_save({"kind": "adapter", "config": settings, "step": step, "metrics": metrics, **state},
               path)


def load_adapter(path, flags, given, method, normalize):
    """--eval_only: (the adapter.pt at `path`, the settings to evaluate it with: its run's, with the
    EVAL_CONTROL values of `flags`). flags: the script's settings as a dict, `given` the names of
    those given on the command line; one given that disagrees with the checkpoint is an error
    naming it, and so is a checkpoint of another `method` or with a setting that normalize(settings)
    (the script's Config, with its defaults) does not know. An --export_peft must pass
    check_export_folder."""
    ck = load_checkpoint(path, "adapter")
    saved = dict(ck["config"])
    if saved.get("method", "lora2") != method:
        raise ValueError(f"{path} is a --method {saved['method']} run; pass --method "
                         f"{saved['method']}" if method != "lora2" else
                         f"{path} is a --method {saved['method']} run of the study's baselines, "
                         f"not lora2; evaluate it with the script that trained it")
    saved.setdefault("precision", None)  # a checkpoint without it: bf16 on CUDA, fp32 on the CPU
    saved["pooling"] = saved.get("pooling") or "cls"  # a checkpoint without it: the [CLS] pooler
    saved["export_peft"] = None  # where that run exported to: not a setting of this one
    if method == "lora2":
        saved.pop("method", None)
    try:
        saved = normalize(saved)
    except TypeError as e:
        raise ValueError(f"{path} has settings this script does not know ({e}); it was written by "
                         f"another version") from None
    clash = sorted(k for k in set(given) - EVAL_CONTROL if flags[k] != saved[k])
    if clash:
        raise ValueError(f"--eval_only takes the settings from {path}, and " + ", ".join(
            f"--{k} {flags[k]} contradicts its {k} {saved[k]}" for k in clash)
            + "; drop those flags")
    settings = {**saved, "resume": False, "data_dir": flags["data_dir"] or saved["data_dir"],
                **{k: flags[k] for k in ("no_download", "device", "export_peft", "overwrite")}}
    if settings["export_peft"]:
        check_export_folder(Path(settings["export_peft"]), settings["overwrite"])
    return ck, settings


def load_trained(load, state, path):
    """load(state) (e.g. a method's load_state); a tensor that does not fit the model is a one-line
    error naming the file."""
    try:
        load(state)
    except (KeyError, RuntimeError, ValueError) as e:
        raise ValueError(f"{path} does not fit the model built from its settings: "
                         f"{' '.join(str(e).split())}") from None


RUN_STATE = ("global_step", "elapsed", "best", "last_metrics")  # what --resume restores of a Run


def save_train_state(path, settings, state, pruner, optimizer, scheduler, device, run):
    """train_state.pt: settings, the run's state (RUN_STATE), the trained tensors, optimiser,
    schedule, pruner (its state_dict()), RNG; a diverged state is refused (check_finite_state)."""
    check_finite_state(state, run["global_step"], settings["lr"], settings["clip"])
    rng = {"torch": torch.get_rng_state(),
           "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None}
    torch_save({"kind": "train_state", "config": settings, **run, "model": state, "rng": rng,
                "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                "pruner": pruner.state_dict()}, path)


def load_train_state(path, settings, load, pruner, optimizer, scheduler, device):
    """Restore what save_train_state wrote, after checking it is one, written with the same
    settings (but RUN_CONTROL's): the trained tensors through load(state), then optimiser, schedule,
    pruner and RNG; returns the run's state (RUN_STATE)."""
    ck = load_checkpoint(path, "train_state", map_location=device)
    changed = sorted(k for k, v in settings.items()
                     if k not in RUN_CONTROL and ck["config"].get(k) != v)
    if changed:
        raise ValueError(f"--resume: {path} was written with other settings: "
                         + ", ".join(f"--{k} {ck['config'].get(k)} (now {settings[k]})"
                                     for k in changed)
                         + "; rerun with those, or pass --overwrite to start over")
    load_trained(load, ck["model"], path)
    try:
        optimizer.load_state_dict(ck["optimizer"])
        scheduler.load_state_dict(ck["scheduler"])
        pruner.load_state_dict(ck["pruner"])
        torch.set_rng_state(ck["rng"]["torch"])
        if device.type == "cuda":
            torch.cuda.set_rng_state(ck["rng"]["cuda"], device)
        return {key: ck[key] for key in RUN_STATE}
    except (KeyError, RuntimeError, ValueError, TypeError) as e:
        raise ValueError(f"{path} does not fit this run ({type(e).__name__}: "
                         f"{' '.join(str(e).split())}); pass --overwrite to start over") from None


def _or_dash(value):
    return "-" if value is None else value


def check_finite(step, n, loss, reg, lr, clip):
    """Stop a diverged run: a one-line error if the task loss or the regulariser R, each summed over
    the last n steps up to `step` (on the device: no host sync before this call), is not finite."""
    for what, total in (("the task loss", loss), ("the regulariser R", reg)):
        if not math.isfinite(float(total)):
            steps = f"step {step}" if n == 1 else f"steps {step - n + 1}-{step}"
            diverged(f"{what} became {float(total)} in {steps}", lr, clip)


def check_finite_state(state, step, lr, clip):
    """Before a checkpoint of `state` ({part: {name: tensor}}) is written: every tensor is finite,
    else the error of a diverged run."""
    for part in state.values():
        bad = next((k for k, v in part.items() if v.is_floating_point() and not v.isfinite().all()),
                   None)
        if bad is not None:
            diverged(f"{bad} holds non-finite values at step {step}", lr, clip)


def diverged(what, lr, clip):
    """The one-line error of a run that diverged: what went non-finite, and what to try."""
    clip = f"a smaller --clip (now {clip:g})" if clip else "--clip 1 (now 0: no clipping)"
    raise ValueError(f"the run diverged: {what}; lower --lr (now {lr:g}) or try {clip}; no "
                     f"checkpoint of the diverged state was written")


# --------------------------------------------------------------------------------------------------
# the bookkeeping around the loop


class Run:
    """What train_glue.py's loop keeps track of besides training: the run's state (RUN_STATE),
    --resume from train_state.pt, the sums behind the progress line, the check that stops a diverged
    run, adapter.pt at the best evaluation from the method's final phase on, train_state.pt every
    save_every steps, and the report. `method`: the trained method (train_glue.LoRA2 or a baseline):
    .name, .pruner (step, budget, state_dict, load_state_dict, close), .final_phase, state(),
    load_state(state), rank_pattern(), export(path, base), notes()."""

    def __init__(self, settings, method, out_dir, rank, optimizer, scheduler, device):
        self.s, self.method, self.out_dir, self.rank = settings, method, Path(out_dir), rank
        self.optimizer, self.scheduler, self.device = optimizer, scheduler, device
        self.state_path = self.out_dir / "train_state.pt"
        self.global_step, self.elapsed, self.best, self.last_metrics = 0, 0.0, None, None
        self.resumed = settings["resume"] and self.state_path.exists()
        if self.resumed:
            state = load_train_state(self.state_path, settings, method.load_state, method.pruner,
                                     optimizer, scheduler, device)
            self.global_step, self.elapsed, self.best, self.last_metrics = map(state.get, RUN_STATE)
        self.t0, self.first_step, self.sums = time.time(), self.global_step, (0.0, 0.0, 0)

    def start(self, header):
        """Log the run's first line (`header`) and, resumed, where it goes on from; with
        --overwrite, the previous run's files go now, every check passed."""
        self.say(header)
        if self.resumed:
            self.say(f"resumed from {self.state_path} at step {self.global_step}")
        if self.s["overwrite"] and self.rank == 0:
            clear(self.out_dir)

    def say(self, line):
        """A log line, on stderr, from rank 0 only."""
        if self.rank == 0:
            print(line, file=sys.stderr, flush=True)

    def step_done(self, t, loss, reg, evaluate):
        """After optimiser step t: add its task loss and R to the sums (on the device, no host
        sync); every log_every steps the progress line; every eval_every steps and at the last one
        evaluate() and keep the best at the final phase; every save_every steps train_state.pt.
        Before any of these, a diverged run stops (check_finite) and nothing of it is kept."""
        s, steps = self.s, self.s["steps"]
        self.global_step, self.sums = t, tuple(a + b for a, b in zip(self.sums, (loss, reg, 1)))
        log = t % s["log_every"] == 0 or t == steps
        evaluating = t == steps or (s["eval_every"] and t % s["eval_every"] == 0)
        saving = self.rank == 0 and s["save_every"] and (t % s["save_every"] == 0 or t == steps)
        if log or evaluating or saving:
            check_finite(t, self.sums[2], *self.sums[:2], s["lr"], s["clip"])
        if log:
            rate, n = (t - self.first_step) / (time.time() - self.t0), self.sums[2]
            self.say(progress(t, steps, float(self.sums[0]) / n, float(self.sums[1]) / n,
                              self.scheduler.get_last_lr()[0],
                              _or_dash(self.method.pruner.budget(t - 1)), rate, s["batch_size"]))
            self.sums = (0.0, 0.0, 0)
        if evaluating:
            began = time.time()
            self.evaluated(t, evaluate())
            self.t0 += time.time() - began  # evaluation time is not training time
        if saving:
            run = {k: getattr(self, k) for k in RUN_STATE}
            save_train_state(self.state_path, s, self.method.state(), self.method.pruner,
                             self.optimizer, self.scheduler, self.device,
                             {**run, "elapsed": self.elapsed + time.time() - self.t0})

    def evaluated(self, t, metrics):
        """Log step t's metrics; from the final phase on, keep the best evaluation (adapter.pt)."""
        self.last_metrics, main = metrics, glue.TASKS[self.s["task"]].metrics[0]
        is_best = t >= self.method.final_phase and (
            self.best is None or metrics[main] > self.best["metrics"][main])
        if is_best:
            self.best = {"step": t, "metrics": metrics, "state": self.method.state()}
            if self.rank == 0:
                save_adapter(self.out_dir / "adapter.pt", self.s, t, metrics, self.best["state"])
        self.say(f"eval at step {t}: " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items())
                 + (" (best)" if is_best else ""))

    def report(self, data, counts, world, base):
        """The end of training: the best checkpoint back in the model, then (rank 0) metrics.json,
        the printed summary with the rank pattern, rank_pattern.png with --plot and, with
        --export_peft, the PEFT adapter exported from base (its name or folder). Returns the
        summary."""
        self.elapsed += time.time() - self.t0
        self.method.pruner.close()
        self.method.load_state(self.best["state"])
        summary = summary_of(self.s, self.method.name, counts, self, data, world, self.device.type,
                             self.method.rank_pattern())
        if self.rank == 0:
            write(self.out_dir / "metrics.json", json.dumps(summary, indent=1) + "\n")
            print("\n".join(summary_lines(summary, self.out_dir, self.s, counts)
                            + self.method.notes()), flush=True)
            if self.s["export_peft"]:  # after the summary: a failed write loses none of it
                print(export_peft(self.method.export, self.s["export_peft"], base,
                                  f"the run itself is complete in {self.out_dir}"), flush=True)
        return summary


# --------------------------------------------------------------------------------------------------
# the report

SHORT = {"attention.self.query": "query", "attention.self.key": "key",
         "attention.self.value": "value",
         "attention.self.query_proj": "query", "attention.self.key_proj": "key",
         "attention.self.value_proj": "value",
         "attention.attn.q": "query", "attention.attn.k": "key", "attention.attn.v": "value",
         "attention.attn.o": "attn.out",  # MPNet's
         "attention.output.dense": "attn.out", "intermediate.dense": "inter",
         "output.dense": "output"}
SHADES = " ░▒▓█"


def pattern_grid(pattern):
    """{layer: {module column: kept singular values}} from {matrix name: [kept λ_i]}; layer -1 if
    the name has none."""
    rows = {}
    for name, kept in pattern.items():
        m = re.search(r"(?:^|\.)(\d+)\.(.+)$", name)  # the first numeric component is the layer
        layer, module = (int(m.group(1)), m.group(2)) if m else (-1, name)
        rows.setdefault(layer, {})[SHORT.get(module, module)] = sum(kept)
    return rows


def rank_heatmap(pattern, r):
    """The rank pattern as text: one row per layer, one column per module type, cells = kept
    singular values."""
    rows = pattern_grid(pattern)
    columns = list(dict.fromkeys(c for row in rows.values() for c in row))
    width = max(4, *(len(c) for c in columns))
    lines = ["layer " + " ".join(f"{c:>{width}}" for c in columns)]
    for layer in sorted(rows):
        cells = [" " * width if c not in rows[layer] else
                 f"{SHADES[min(4, math.ceil(4 * rows[layer][c] / r))]}{rows[layer][c]:>{width - 1}}"
                 for c in columns]
        lines.append(f"{'L' + str(layer) if layer >= 0 else '-':>5} " + " ".join(cells))
    return "\n".join(lines)


def plot_rank_pattern(pattern, r, path, title):
    """rank_pattern.png: the heatmap as an image (matplotlib); None, with a note, when matplotlib
    is missing."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("--plot needs matplotlib (pip install matplotlib); skipped the PNG", file=sys.stderr)
        return None
    rows = pattern_grid(pattern)
    columns, layers = list(dict.fromkeys(c for row in rows.values() for c in row)), sorted(rows)
    grid = np.array([[rows[layer].get(c, np.nan) for c in columns] for layer in layers],
                    dtype=float)
    fig, ax = plt.subplots(figsize=(1 + 0.9 * len(columns), 1 + 0.45 * len(layers)))
    image = ax.imshow(grid, cmap="viridis", vmin=0, vmax=r, aspect="auto")
    for (i, j), value in np.ndenumerate(grid):
        if not np.isnan(value):
            ax.text(j, i, int(value), ha="center", va="center", color="w" if value < r / 2 else "k")
    ax.set_xticks(range(len(columns)), columns)
    ax.set_yticks(range(len(layers)), [f"layer {layer}" for layer in layers])
    ax.set_title(title)
    fig.colorbar(image, ax=ax, label="kept singular values")
    fig.tight_layout()
    write(path, lambda f: fig.savefig(f, format="png", dpi=120))
    plt.close(fig)
    return path

def summary_of(settings, method, counts, run, data, world, device, pattern):
    """metrics.json's summary of a finished run (a Run) on `data` (glue.Data)."""
    task, best, elapsed, steps = (glue.TASKS[settings["task"]], run.best, run.elapsed,
                                  settings["steps"])
    main = task.metrics[0]
    return {
        "task": settings["task"], "method": method, "seed": settings["seed"],
        "metrics": best["metrics"], "main_metric": best["metrics"][main], "main_metric_name": main,
        "best_step": best["step"], "final_metrics": run.last_metrics, "steps": steps,
        "adapter_params": counts["adapter"], "head_params": counts["head"],
        "trainable_params": counts["trainable"], "total_params": counts["total"],
        "rank_pattern": pattern, "kept_singular_values": sum(sum(k) for k in pattern.values()),
        "scored_ratio": getattr(run.method, "scored_ratio", None), "wall_s": round(elapsed, 2),
        "examples_per_s": round(steps * settings["batch_size"] / elapsed, 1) if elapsed else None,
        "non_standard_split": data.non_standard, "train_size": len(data.train),
        "eval_size": {s: len(ex) for s, ex in data.dev.items()}, "world_size": world,
        "device": device, "args": settings,
    }


def summary_lines(summary, out_dir, settings, counts):
    """The printed summary: the metric, the parameters, the time, the rank pattern as a heatmap
    (and rank_pattern.png with --plot), the files written."""
    task, best, pattern, r = (glue.TASKS[summary["task"]], summary["metrics"],
                              summary["rank_pattern"], settings["r"])
    lines = [f"{task.dir} dev {summary['main_metric_name']}: {summary['main_metric']:.4f} at step "
             f"{summary['best_step']} of {summary['steps']} ("
             + ", ".join(f"{k} {v:.4f}" for k, v in best.items()) + ")"
             + ("  [NON-STANDARD: train/eval split of dev.tsv]" if summary["non_standard_split"]
                else ""),
             f"parameters: {counts['trainable']:,} trainable ({counts['adapter']:,} adapter + "
             f"{counts['head']:,} head) of {counts['total']:,} "
             f"({100 * counts['trainable'] / counts['total']:.2f} %)",
             f"training time {fmt_time(summary['wall_s'])} on {summary['world_size']}×"
             f"{summary['device']}"]
    if pattern:
        lines += [f"rank pattern (kept singular values of r={r}; {summary['kept_singular_values']} "
                  f"of {r * len(pattern)} in {len(pattern)} matrices):", rank_heatmap(pattern, r)]
    if settings["plot"] and pattern:
        png = plot_rank_pattern(pattern, r, out_dir / "rank_pattern.png",
                                f"{task.dir} {summary['method']} rank pattern")
        lines += [f"wrote {png}"] if png else []
    lines.append(f"wrote {out_dir / 'metrics.json'} and {out_dir / 'adapter.pt'} (evaluate it "
                 f"again with --eval_only --load {out_dir / 'adapter.pt'})")
    return lines


def header(task, data, method, counts, steps, batch_size, world, device, why):
    """The run's first line: data (source, sizes), trainable parameters, steps, precision,
    compiling. why: (where the steps come from, precision, why, compiled?, why)."""
    dev = ", ".join(f"{len(ex)} {s}" for s, ex in data.dev.items())
    split = " (NON-STANDARD: train and eval are a split of dev.tsv)" if data.non_standard else ""
    steps_from, precision, why_precision, compiled, why_compile = why
    return (f"{task.dir} ({data.source}): {len(data.train)} train, {dev}{split} | {method}: "
            f"{counts['adapter']:,} adapter + {counts['head']:,} head parameters trainable | "
            f"{steps} steps ({steps_from}) of {batch_size} on {world}×{device.type} | {precision} "
            f"({why_precision}), {'compiled' if compiled else 'eager'} ({why_compile})")



def progress(global_step, steps, loss, reg, lr, budget, rate, batch_size):
    """The progress line: step, task loss, R, learning rate, b(t), examples/s, ETA."""
    eta = fmt_time((steps - global_step) / rate)
    return (f"step {global_step:>{len(str(steps))}}/{steps} | loss {loss:.4f} | R {reg:.4f} | "
            f"lr {lr:.2e} | b(t) {budget} | {rate * batch_size:.0f} ex/s | ETA {eta}")


def fmt_time(seconds):
    """5s, 2m05s, 1h02m."""
    seconds = max(0, int(round(seconds)))
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds // 60 % 60:02d}m"
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"



# --------------------------------------------------------------------------------------------------
# evaluation


@torch.inference_mode()
def evaluate(model, dev_data, task, pad_id, device, precision):
    """glue.evaluate with the model in eval mode, under the training's autocast; eager even where
    training is compiled (compiling the blocks again for inference costs more than a few
    batches)."""
    model.eval()
    with compiled.autocast(device, precision), torch.compiler.set_stance("force_eager"):
        metrics = glue.evaluate(lambda b: bert.logits(model(**b)), dev_data, task, pad_id, device)
    model.train()
    return metrics


def evaluate_saved(cfg, method):
    """--eval_only --load PATH: rebuild the run that wrote the adapter.pt of cfg.load (its settings
    in cfg's class, with the flags load_adapter lets through), load its trained tensors into
    `method` on its backbone and evaluate them on its data; with --export_peft, then export them.
    Returns the metrics."""
    path, config = cfg.load, type(cfg)
    ck, settings = load_adapter(path, dataclasses.asdict(cfg), cfg.given, method.name,
                                lambda d: dataclasses.asdict(config(**d)))
    s, device = settings, setup_distributed(settings["device"])[2]
    task = glue.TASKS[s["task"]]
    backbone, tokenize, pad_id, targets = bert.load_classifier(
        task.num_labels, s["model"], s["hf"], s["classifier_dropout"], s["max_len"], s["pooling"],
        s["dropout"])
    method = method(backbone, config(**s), targets)  # the method reads the script's Config
    method.schedule(s["steps"], *warmup_steps(s["init_warmup"], s["final_warmup"], s["steps"],
                                              "--steps", prunes=False))
    load_trained(method.load_state, ck, path)
    model = method.model.to(device)
    dev = glue.load(s["task"], s["data_dir"], s["dev_split"], s["train_size"], s["eval_size"],
                    fetch=not s["no_download"]).dev
    dev_data = {split: glue.encode(tokenize, ex, s["max_len"]) for split, ex in dev.items()}
    metrics = evaluate(model, dev_data, task, pad_id, device,
                       compiled.resolve_precision(s["precision"], device)[0])
    print(f"{task.dir} {method.name} (step {ck['step']} of {path}): "
          + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
    if s["export_peft"]:
        print(export_peft(method.export, s["export_peft"], s["hf"] or s["model"],
                          "the evaluation above is complete"))
    return metrics
