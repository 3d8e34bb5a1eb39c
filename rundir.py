"""What a train_glue.py run keeps in its --out_dir: checkpoints, resume, and the final report.

- adapter.pt: the best evaluation's adapter + head and its config (`--eval_only --load` rebuilds the model from it);
- train_state.pt: everything `--resume` needs to continue exactly (weights, optimiser, schedule, pruner, RNG, best);
- metrics.json, the printed summary, the rank pattern as a text heatmap (and rank_pattern.png with --plot);
- the log lines a run prints: its header (data, parameters, steps, precision, compiling), progress;
- the checks that stop a run that cannot be right: its schedule in steps, divergence, --export_peft.
Every file is written atomically (formats.atomic_write): a killed run leaves the previous version, never half a file,
and a failed write (disk full) says so and keeps the previous file. A folder belongs to one run at a time (claim).
Not here: the training loop and the method (train_glue.py, lora2.py).
"""
import contextlib
import dataclasses
import fcntl
import json
import math
import os
import re
import sys
from pathlib import Path

import numpy as np
import torch

import bert
import formats
import glue
import lora2

# ----------------------------------------------------------------------------------------------------------------------
# the output folder

RUN_FILES = ("metrics.json", "adapter.pt", "train_state.pt", "rank_pattern.png")  # what a run writes into --out_dir
LOCK = ".lock"


def method_of(cfg):
    """What a run trains: "lora2" (train_glue.py), or its --method (experiments/baselines.py)."""
    return getattr(cfg, "method", "lora2")


PRUNED = ("lora2", "adalora")  # the methods that prune on the schedule (L7)


def warmup_steps(cfg, steps, source):
    """(t_i, t_f) of (L7) in steps: --init_warmup and --final_warmup of the run's `steps` (from
    `source`), rounded. A method that prunes on that schedule (PRUNED) needs T > t_i + t_f: else a
    one-line error in flag names."""
    t_i, t_f = round(cfg.init_warmup * steps), round(cfg.final_warmup * steps)
    if steps <= t_i + t_f and method_of(cfg) in PRUNED:
        raise ValueError(f"--init_warmup {cfg.init_warmup:g} and --final_warmup "
                         f"{cfg.final_warmup:g} of {steps} steps ({source}) round to {t_i} + {t_f} "
                         f"steps, leaving no pruning phase: give more steps or smaller warm-ups")
    return t_i, t_f


def out_dir_of(cfg):
    """--out_dir, default runs/<task>-<method>-s<seed>."""
    return Path(cfg.out_dir or f"runs/{cfg.task}-{method_of(cfg)}-s{cfg.seed}")


@contextlib.contextmanager
def claim(cfg):
    """Make --out_dir this run's until the `with` block ends; every check here comes before data or model are loaded.

    - creates the folder and takes an exclusive lock on its .lock (flock: the kernel drops it when the process ends,
      even on kill -9, so no lock goes stale): a second run into the folder is refused while this one lives;
    - a folder holding a run's files (RUN_FILES) is refused, naming them, unless --resume continues that run from its
      train_state.pt, or --overwrite replaces it (clear deletes them once every check has passed);
    - the temporary files of an interrupted save (.<run file>.<pid>.<random>.tmp, as
      formats.atomic_write names them) are removed;
    - --export_peft passes check_export.
    At the end the .lock goes, and so do the folders this claim created if the run wrote nothing into them (a run
    that failed before its first save leaves no trace).
    """
    out_dir, created = out_dir_of(cfg), []
    try:
        created = [p for p in (out_dir, *out_dir.parents) if not p.exists()]  # innermost first
        out_dir.mkdir(parents=True, exist_ok=True)
        lock = _lock(out_dir / LOCK)
    except OSError as e:
        _remove_empty(created)
        raise OSError(f"--out_dir {out_dir}: cannot create or write to it ({e.strerror or e}); choose a writable "
                      f"folder") from None
    except ValueError:
        _remove_empty(created)
        raise
    try:
        found = [name for name in RUN_FILES if (out_dir / name).exists()]
        if found and cfg.resume and "train_state.pt" not in found:
            raise ValueError(f"--resume: {out_dir} holds a run ({', '.join(found)}) but no train_state.pt to continue "
                             f"from (it ran without --save_every); pass --overwrite to replace it, or choose another "
                             f"--out_dir")
        elif found and not (cfg.resume or cfg.overwrite):
            raise ValueError(f"--out_dir {out_dir} already holds a run ({', '.join(found)}); pass --resume to continue "
                             f"it, --overwrite to replace it, or choose another --out_dir")
        for tmp in out_dir.glob(".*.tmp"):
            if tmp.name.startswith(tuple(f".{name}." for name in RUN_FILES)):
                tmp.unlink()
        if cfg.export_peft:
            check_export(Path(cfg.export_peft), cfg)
        yield out_dir
    finally:
        (out_dir / LOCK).unlink(missing_ok=True)  # while holding it: a run waiting on this file sees it gone (_lock)
        lock.close()
        _remove_empty(created)


def _lock(path):
    """The open lock file `path`, flock'ed exclusively with the process id in it; ValueError if another run holds it.
    A lock file unlinked by its holder between our open and our flock is not ours: open the new one instead."""
    while True:
        lock = open(path, "a+")
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.seek(0)
            pid = lock.read().strip() or "?"
            lock.close()
            raise ValueError(f"--out_dir {path.parent} is in use by another run (pid {pid}); wait for it to end or "
                             f"choose another --out_dir") from None
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
    """rmdir each folder (innermost first) as long as they are empty; one that does not exist is skipped."""
    for folder in folders:
        try:
            folder.rmdir()
        except FileNotFoundError:
            continue
        except OSError:
            return


def clear(out_dir):
    """--overwrite: delete the previous run's files, once every check has passed and before this run writes any."""
    found = [name for name in RUN_FILES if (out_dir / name).exists()]
    for name in found:
        (out_dir / name).unlink()
    if found:
        print(f"--overwrite: deleted the previous run's {', '.join(found)} in {out_dir}", file=sys.stderr, flush=True)


def check_export(path, cfg):
    """--export_peft, before the run: there is an adapter to export, it predicts there as in the
    run, and `path` is a folder (created at the end) whose nearest existing ancestor is a writable
    folder, holding no adapter unless --overwrite or --resume."""
    if (cfg.pooling or ("cls" if cfg.hf else "mean")) != "cls":
        raise ValueError("--export_peft needs --pooling cls: PEFT loads the adapter onto "
                         "transformers' AutoModelForSequenceClassification, which classifies from "
                         "the [CLS] pooler, so a classifier on --pooling mean (the default without "
                         "--hf) would predict differently there; train with --pooling cls to "
                         "export")
    if cfg.target_rank == 0 and method_of(cfg) == "lora2":
        raise ValueError("--export_peft with --target_rank 0: pruning keeps no singular value, so "
                         "there is no adapter to export; pass --target_rank 1 or more, or drop "
                         "--export_peft")
    try:
        existing = next(p for p in (path, *path.parents) if p.exists())
    except OSError as e:
        raise OSError(f"--export_peft {path}: cannot reach it ({e.strerror or e}); choose a "
                      f"writable folder") from None
    if not existing.is_dir():
        raise ValueError(f"--export_peft {path}: {existing} is a file, not a folder; give a folder path (it is "
                         f"created at the end of the run)")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise OSError(f"--export_peft {path}: {existing} is not writable; choose a writable folder")
    if (path / "adapter_config.json").exists() and not (cfg.overwrite or cfg.resume):
        raise ValueError(f"--export_peft {path} already holds a PEFT adapter; pass --overwrite to replace it, or "
                         f"choose another folder")


def export_peft(cfg, export, done):
    """--export_peft: export(path, the base model's name or folder); the line to print. A failed
    write is one OSError that ends with `done` (what is complete all the same)."""
    try:
        export(cfg.export_peft, cfg.hf or cfg.model or str(bert.default_model_dir(install=False)))
    except OSError as e:
        raise OSError(f"--export_peft {cfg.export_peft}: could not write the PEFT adapter "
                      f"({e.strerror or e}); {done}") from None
    return f"wrote a PEFT LoRA adapter to {cfg.export_peft}"


def write(path, data):
    """formats.atomic_write; a failed write (disk full, no permission) is one OSError saying the file is unchanged."""
    try:
        formats.atomic_write(path, data)
    except (OSError, RuntimeError) as e:  # torch.save to a path reports a full disk as a RuntimeError
        reason = e.strerror if isinstance(e, OSError) and e.strerror else "the write failed; is the disk full?"
        raise OSError(f"could not write {path} ({reason}); {Path(path).name} is unchanged (the previous version, if "
                      f"any, is intact): free disk space or fix permissions, then run again (--resume continues "
                      f"from the last train_state.pt)") from None


# ----------------------------------------------------------------------------------------------------------------------
# checkpoints

RUN_CONTROL = {  # flags that may differ when a run resumes: they change where and how it runs, not what it computes
    "data_dir", "no_download", "out_dir", "save_every", "resume", "overwrite", "log_every", "export_peft", "plot",
    "device", "compile", "compile_backend"}
EVAL_CONTROL = {  # --eval_only takes the rest from --load
    "data_dir", "no_download", "device", "eval_only", "load", "export_peft", "overwrite"}
KINDS = {"adapter": "an adapter.pt (best adapter + head, for --eval_only --load)",
         "train_state": "a train_state.pt (resumable training state, for --resume)"}


def torch_save(obj, path):
    """torch.save, atomically (write)."""
    write(path, lambda f: torch.save(obj, f))


def load_checkpoint(path, kind, map_location="cpu"):
    """The dict that save_adapter or save_train_state wrote to `path`, checked to be `kind` ("adapter" or
    "train_state"): a missing, unreadable (corrupt, truncated, empty) or other kind of file raises a one-line error
    naming it. Files written before checkpoints carried their "kind" are recognised by their keys."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such checkpoint; pass {KINDS[kind].split(' (')[0]} written by "
                                f"train_glue.py")
    try:
        ck = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # torch raises RuntimeError, UnpicklingError, EOFError, KeyError, ... on a damaged file
        raise ValueError(f"{path}: not a readable checkpoint (corrupt or truncated: {type(e).__name__}); use another "
                         f"copy, or delete it and train again") from None
    found = None
    if isinstance(ck, dict) and isinstance(ck.get("config"), dict):
        found = ck.get("kind") or ("train_state" if "optimizer" in ck else "adapter" if "adapter" in ck else None)
    if found != kind:
        what = KINDS.get(found, "not a train_glue.py checkpoint").split(" (")[0]
        raise ValueError(f"{path} is {what}; expected {KINDS[kind]}")
    return ck


def check_finite(step, n, cfg, loss, reg):
    """Stop a diverged run: a one-line error if the task loss or the regulariser R, each summed
    over the last n steps up to `step` (on the device: no host sync before this call), is not
    finite. The loop calls it before it logs, evaluates or saves, so nothing diverged is kept."""
    for what, total in (("the task loss", loss), ("the regulariser R", reg)):
        if not math.isfinite(float(total)):
            steps = f"step {step}" if n == 1 else f"steps {step - n + 1}-{step}"
            diverged(f"{what} became {float(total)} in {steps}", cfg)


def check_finite_state(state, step, cfg):
    """Before a checkpoint of `state` ({part: {name: tensor}}, e.g. lora2_state) is written: every
    tensor is finite, else the error of a diverged run."""
    for part in state.values():
        bad = next((k for k, v in part.items() if v.is_floating_point() and not v.isfinite().all()),
                   None)
        if bad is not None:
            diverged(f"{bad} holds non-finite values at step {step}", cfg)


def diverged(what, cfg):
    """The one-line error of a run that diverged: what went non-finite, and what to try."""
    clip = f"a smaller --clip (now {cfg.clip:g})" if cfg.clip else "--clip 1 (now 0: no clipping)"
    raise ValueError(f"the run diverged: {what}; lower --lr (now {cfg.lr:g}) or try {clip}; no "
                     f"checkpoint of the diverged state was written")


def save_adapter(path, cfg, step, metrics, state):
    """adapter.pt: the best evaluation's adapter + head (`state`, e.g. lora2_state), its step,
    metrics, config; a diverged state is refused (check_finite_state)."""
    check_finite_state(state, step, cfg)
    torch_save({"kind": "adapter", "config": dataclasses.asdict(cfg), "step": step, "metrics": metrics, **state}, path)


def load_adapter(cfg):
    """--eval_only: (the adapter.pt of --load, the Config of the run that wrote it, to run where cfg says:
    EVAL_CONTROL, --export_peft passing check_export). A flag given on the command line (cfg.given)
    that disagrees with the checkpoint is an error naming it; so is a setting this version does not
    know."""
    path = cfg.load
    ck = load_checkpoint(path, "adapter")
    names = {f.name for f in dataclasses.fields(cfg)}
    if ck["config"].get("method", method_of(cfg)) != method_of(cfg):
        raise ValueError(f"{path} is a --method {ck['config']['method']} run of experiments/baselines.py, not "
                         f"{method_of(cfg)}; evaluate it with the script that trained it")
    if "method" not in names:
        ck["config"].pop("method", None)  # LoRA² runs from before train_glue.py lost --method
    ck["config"].setdefault("precision", None)  # from before --precision: bf16 on CUDA, fp32 on the CPU
    ck["config"]["pooling"] = ck["config"].get("pooling") or "cls"  # None: before --pooling
    ck["config"]["export_peft"] = None  # where that run exported to: not a setting of this one
    if set(ck["config"]) - names:
        raise ValueError(f"{path} has settings this train_glue.py does not know ({sorted(set(ck['config']) - names)}); "
                         f"it was written by another version")
    saved = dataclasses.asdict(type(cfg)(**ck["config"]))
    clash = sorted(k for k in cfg.given - EVAL_CONTROL if getattr(cfg, k) != saved[k])
    if clash:
        raise ValueError(f"--eval_only takes the settings from {path}, and " + ", ".join(
            f"--{k} {getattr(cfg, k)} contradicts its {k} {saved[k]}" for k in clash) + "; drop those flags")
    run = type(cfg)(**{**saved, "data_dir": cfg.data_dir or saved["data_dir"], "resume": False,
                       **{k: getattr(cfg, k) for k in ("no_download", "device", "export_peft",
                                                       "overwrite")}})
    if run.export_peft:
        check_export(Path(run.export_peft), run)
    return ck, run


def load_trained(load, state, path):
    """load(state) (e.g. load_lora2_state); a tensor that does not fit the model is a one-line error naming the
    file."""
    try:
        load(state)
    except (KeyError, RuntimeError, ValueError) as e:
        raise ValueError(f"{path} does not fit the model built from its settings: {' '.join(str(e).split())}") from None


def save_train_state(path, cfg, trained, pruner, optimizer, scheduler, device, run):
    """train_state.pt: config, run state (step, elapsed, best, last metrics), the trained tensors, optimiser,
    schedule, pruner (its state_dict(), or None), RNG; a diverged state is refused
    (check_finite_state)."""
    check_finite_state(trained, run["global_step"], cfg)
    rng = {"torch": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None}
    torch_save({"kind": "train_state", "config": dataclasses.asdict(cfg), **run, "model": trained, "rng": rng,
                "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                "pruner": None if pruner is None else pruner.state_dict()}, path)


def load_train_state(path, cfg, load, pruner, optimizer, scheduler, device):
    """Restore what save_train_state wrote, after checking it is one, written with the same settings: the trained
    tensors through load(state), then optimiser, schedule, pruner (None: none) and RNG; returns the run state."""
    ck = load_checkpoint(path, "train_state", map_location=device)
    changed = {k for k, v in dataclasses.asdict(cfg).items() if k not in RUN_CONTROL and ck["config"].get(k) != v}
    if changed:
        raise ValueError(f"--resume: {path} was written with other settings: "
                         + ", ".join(f"--{k} {ck['config'].get(k)} (now {getattr(cfg, k)})" for k in sorted(changed))
                         + "; rerun with those, or pass --overwrite to start over")
    load_trained(load, ck["model"], path)
    try:
        optimizer.load_state_dict(ck["optimizer"])
        scheduler.load_state_dict(ck["scheduler"])
        if pruner is not None:
            pruner.load_state_dict(ck["pruner"])
        torch.set_rng_state(ck["rng"]["torch"])
        if device.type == "cuda":
            torch.cuda.set_rng_state(ck["rng"]["cuda"], device)
        return {key: ck[key] for key in ("global_step", "elapsed", "best", "last_metrics")}
    except (KeyError, RuntimeError, ValueError, TypeError) as e:
        raise ValueError(f"{path} does not fit this run ({type(e).__name__}: {' '.join(str(e).split())}); pass "
                         f"--overwrite to start over") from None


def lora2_state(model):
    """What adapter.pt and train_state.pt keep of a LoRA² model: the adapter (lora2.adapter_state_dict) and the
    trained head."""
    return {"adapter": lora2.adapter_state_dict(model), "head": head_state(model)}


def load_lora2_state(model, state):
    """Load what lora2_state saved."""
    lora2.load_adapter_state_dict(model, state["adapter"])
    load_head(model, state["head"])


def head_state(model):
    """The trained classification head (lora2.HEAD: classifier and pooler), saved beside the adapter."""
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    return {n: v.detach().clone() for n, v in model.state_dict().items()
            if n in trainable and set(n.split(".")) & set(lora2.HEAD)}


def load_head(model, state):
    """Load what head_state saved; a key the model lacks or a tensor of another shape is an error naming it (the
    checkpoint belongs to another model)."""
    own = model.state_dict()
    unexpected = [k for k in state if k not in own]
    if unexpected:
        raise ValueError(f"checkpoint does not fit the model: unexpected keys {unexpected[:6]}")
    for k, v in state.items():
        if v.shape != own[k].shape:
            raise ValueError(f"checkpoint does not fit the model: {k} has shape {tuple(v.shape)}, the model's "
                             f"{tuple(own[k].shape)}")
    model.load_state_dict(state, strict=False)


# ----------------------------------------------------------------------------------------------------------------------
# the report

SHORT = {"attention.self.query": "query", "attention.self.key": "key", "attention.self.value": "value",
         "attention.self.query_proj": "query", "attention.self.key_proj": "key", "attention.self.value_proj": "value",
         "attention.attn.q": "query", "attention.attn.k": "key", "attention.attn.v": "value",
         "attention.attn.o": "attn.out",  # MPNet's
         "attention.output.dense": "attn.out", "intermediate.dense": "inter", "output.dense": "output"}
SHADES = " ░▒▓█"


def pattern_grid(pattern):
    """{layer: {module column: kept singular values}} from {matrix name: [kept λ_i]}; layer -1 if the name has none."""
    rows = {}
    for name, kept in pattern.items():
        m = re.search(r"(?:^|\.)(\d+)\.(.+)$", name)  # the first numeric component is the layer
        layer, module = (int(m.group(1)), m.group(2)) if m else (-1, name)
        rows.setdefault(layer, {})[SHORT.get(module, module)] = sum(kept)
    return rows


def rank_heatmap(pattern, r):
    """The rank pattern as text: one row per layer, one column per module type, cells = kept singular values."""
    rows = pattern_grid(pattern)
    columns = list(dict.fromkeys(c for row in rows.values() for c in row))
    width = max(4, *(len(c) for c in columns))
    lines = ["layer " + " ".join(f"{c:>{width}}" for c in columns)]
    for layer in sorted(rows):
        cells = [" " * width if c not in rows[layer] else
                 f"{SHADES[min(4, math.ceil(4 * rows[layer][c] / r))]}{rows[layer][c]:>{width - 1}}" for c in columns]
        lines.append(f"{'L' + str(layer) if layer >= 0 else '-':>5} " + " ".join(cells))
    return "\n".join(lines)


def plot_rank_pattern(pattern, r, path, title):
    """rank_pattern.png: the heatmap as an image (matplotlib); None, with a note, when matplotlib is missing."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("--plot needs matplotlib (pip install matplotlib); skipped the PNG", file=sys.stderr)
        return None
    rows = pattern_grid(pattern)
    columns, layers = list(dict.fromkeys(c for row in rows.values() for c in row)), sorted(rows)
    grid = np.array([[rows[layer].get(c, np.nan) for c in columns] for layer in layers], dtype=float)
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


def report(cfg, counts, run, data, world, device, out_dir, pattern, notes=(), scored_ratio=None, export=None):
    """The summary (metrics.json) of a run on `data` (glue.Data) by `world` processes on `device`; with out_dir
    (rank 0): print it, write metrics.json, the PNG and, with --export_peft, call export(path, base model name or
    folder). pattern: {matrix: [kept λ_i]} ({} for none); notes: lines to print."""
    facts = dict(non_standard=data.non_standard, steps=cfg.steps, world=world, device=device.type,
                 train_size=len(data.train), eval_size={s: len(ex) for s, ex in data.dev.items()})
    task, best = glue.TASKS[cfg.task], run["best"]
    main_name, elapsed = task.metrics[0], run["elapsed"]
    summary = {
        "task": cfg.task, "method": method_of(cfg), "seed": cfg.seed, "metrics": best["metrics"],
        "main_metric": best["metrics"][main_name], "main_metric_name": main_name, "best_step": best["step"],
        "final_metrics": run["last_metrics"], "steps": facts["steps"], "adapter_params": counts["adapter"],
        "head_params": counts["head"], "trainable_params": counts["trainable"], "total_params": counts["total"],
        "rank_pattern": pattern, "kept_singular_values": sum(sum(k) for k in pattern.values()),
        "scored_ratio": scored_ratio, "wall_s": round(elapsed, 2),
        "examples_per_s": round(facts["steps"] * cfg.batch_size / elapsed, 1) if elapsed else None,
        "non_standard_split": facts["non_standard"], "train_size": facts["train_size"],
        "eval_size": facts["eval_size"], "world_size": facts["world"], "device": facts["device"],
        "args": dataclasses.asdict(cfg),
    }
    if out_dir is None:
        return summary
    write(out_dir / "metrics.json", json.dumps(summary, indent=1) + "\n")
    lines = [f"{task.dir} dev {main_name}: {summary['main_metric']:.4f} at step {best['step']} of {facts['steps']} "
             f"(" + ", ".join(f"{k} {v:.4f}" for k, v in best["metrics"].items()) + ")"
             + ("  [NON-STANDARD: train/eval split of dev.tsv]" if facts["non_standard"] else ""),
             f"parameters: {counts['trainable']:,} trainable ({counts['adapter']:,} adapter + {counts['head']:,} head)"
             f" of {counts['total']:,} ({100 * counts['trainable'] / counts['total']:.2f} %)",
             f"training time {fmt_time(elapsed)} on {facts['world']}×{facts['device']}"]
    if pattern:
        lines += [f"rank pattern (kept singular values of r={cfg.r}; {summary['kept_singular_values']} of "
                  f"{cfg.r * len(pattern)} in {len(pattern)} matrices):", rank_heatmap(pattern, cfg.r)]
    lines += list(notes)
    if cfg.plot and pattern:
        png = plot_rank_pattern(pattern, cfg.r, out_dir / "rank_pattern.png",
                                f"{task.dir} {method_of(cfg)} rank pattern")
        lines += [f"wrote {png}"] if png else []
    script = "train_glue.py" if method_of(cfg) == "lora2" else f"experiments/baselines.py --method {method_of(cfg)}"
    lines.append(f"wrote {out_dir / 'metrics.json'} and {out_dir / 'adapter.pt'} "
                 f"(python {script} --eval_only --load {out_dir / 'adapter.pt'})")
    print("\n".join(lines), flush=True)
    if cfg.export_peft:  # after the summary: a failed write loses none of it
        print(export_peft(cfg, export, f"the run itself is complete in {out_dir}"), flush=True)
    return summary


def header(task, data, what, counts, steps, cfg, world, device, why):
    """The run's first line: data (source, sizes), trainable parameters, steps, precision, compiling."""
    dev = ", ".join(f"{len(ex)} {s}" for s, ex in data.dev.items())
    split = " (NON-STANDARD: train and eval are a split of dev.tsv)" if data.non_standard else ""
    return (f"{task.dir} ({data.source}): {len(data.train)} train, {dev}{split} | {what}: "
            f"{counts['adapter']:,} adapter + {counts['head']:,} head parameters trainable | {steps} "
            f"steps ({why[0]}) of {cfg.batch_size} on {world}×{device.type} | {cfg.precision} ({why[1]}), "
            f"{'compiled' if cfg.compile else 'eager'} ({why[2]})")


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
