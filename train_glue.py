"""Fine-tune a BERT-style encoder on a GLUE task with LoRA², in one flat loop (SPEC §4).

    python train_glue.py                            # SST-2 (shipped), packaged MiniLM: < 3 min
    python train_glue.py --task rte --preset paper  # the authors' RTE hyperparameters (SPEC §5)
    torchrun --nproc_per_node=2 train_glue.py       # DDP: gloo on CPU, nccl on GPU

Reads top to bottom: the configuration, a few helpers, then train(): the backbone with lora2.inject
(L1, L2), the data, lora2.Pruner (L5)–(L8), AdamW, and the loop, each step in SPEC §4's order:
    forward → loss = task + γ·R (lora2.orthogonal_regularizer, L3, L4) → backward → clip
    → optimizer.step → scheduler.step → pruner.step(t) → zero_grad
then the report. Not here: GLUE data and metrics (glue.py), the BERT (bert.py), the method
(lora2.py), the run's files (rundir.py), --compile (compiled.py), the baselines (experiments/).
"""
import argparse
import contextlib
import dataclasses
import functools
import math
import os
import sys
import time
import typing
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.distributed as dist

import bert
import compiled
import formats
import glue
import lora2
import rundir

# --------------------------------------------------------------------------------------------------
# configuration: every field is a flag (--name value); its help text is its comment


def _opt(default, help, choices=None):
    return field(default=default, metadata={"help": help, "choices": choices})


@dataclass
class Config:
    # data
    task: str = _opt("sst2", "GLUE task", tuple(glue.TASKS))
    data_dir: Optional[str] = _opt(None, "GLUE folder (default: $GLUE_DIR, else ./glue_data)")
    no_download: bool = _opt(False, "never fetch a missing task from the GLUE archives")
    train_size: Optional[int] = _opt(0, "train on a fixed random subset of N examples; 0: all")
    eval_size: Optional[int] = _opt(None, "evaluate on a fixed random subset of N dev examples")
    dev_split: Optional[float] = _opt(None, "no train.tsv (QNLI here): this fraction of dev.tsv is "
                                            "the eval set, the rest trains (non-standard)")
    max_len: int = _opt(64, "maximum tokens per example (a batch is padded to its longest)")
    length_groups: int = _opt(64, "sort runs of N shuffled batches by length, to pad less (1: off)")
    # model
    model: Optional[str] = _opt(None, "BERT checkpoint folder (default: the packaged MiniLM)")
    hf: Optional[str] = _opt(None, "a transformers model name or path instead of --model")
    dropout: Optional[float] = _opt(None, "the backbone's hidden and attention dropout (default: its)")
    classifier_dropout: Optional[float] = _opt(None, "dropout before the classifier (default: --dropout)")
    pooling: Optional[str] = _opt(None, "classifier input: mean of the hidden states over the real "
                                        "tokens or the [CLS] pooler (default: mean; cls with --hf, "
                                        "--preset)", bert.POOLINGS)
    # LoRA²
    r: int = _opt(8, "singular values per matrix, r of (L1)")
    k: int = _opt(8, "inner width k of (L1)")
    alpha: int = _opt(16, "scaling s = alpha / r")
    target_rank: int = _opt(2, "average rank kept after pruning (L7)")
    init: str = _opt("orthogonal", "factor initialisation (SPEC §1)", lora2.INITS)
    gamma: float = _opt(0.1, "weight γ of the orthogonality regulariser (L3)")
    cross: float = _opt(0.0, "weight of the cross-plane term (L4), relative to γ")
    scored: str = _opt("inner", "importance on the inner factors (L5) or on all", lora2.SCORED)
    init_warmup: float = _opt(0.1, "t_i of (L7), a fraction of the steps")
    final_warmup: float = _opt(0.3, "t_f of (L7), a fraction of the steps")
    mask_interval: int = _opt(10, "mask every N steps in the cubic phase (L7, L8)")
    # optimisation
    lr: float = _opt(5e-3, "peak learning rate of AdamW")
    weight_decay: float = _opt(0.01, "AdamW weight decay (not on biases and LayerNorm)")
    batch_size: int = _opt(32, "global batch size (split over DDP ranks)")
    steps: Optional[int] = _opt(None, "optimiser steps (default: QUICK_STEPS, by --precision)")
    epochs: Optional[float] = _opt(None, "set the steps from epochs over the training set instead")
    warmup: float = _opt(0.06, "linear lr warm-up, a fraction of the steps; then linear decay to 0")
    clip: float = _opt(1.0, "gradient-norm clipping (0: none)")
    seed: int = _opt(0, "seed of initialisation, dropout and data order, in [0, 2**32)")
    # run
    eval_every: int = _opt(0, "evaluate every N steps (0: only at the end)")
    log_every: int = _opt(100, "progress line every N steps")
    out_dir: Optional[str] = _opt(None, "output folder (default runs/<task>-lora2-s<seed>)")
    save_every: int = _opt(0, "write a resumable training checkpoint every N steps")
    resume: bool = _opt(False, "continue from <out_dir>/train_state.pt if it exists")
    overwrite: bool = _opt(False, "replace the run in --out_dir (its files go at the first step)")
    eval_only: bool = _opt(False, "only evaluate the adapter + head of --load")
    load: Optional[str] = _opt(None, "adapter.pt written by a training run (with --eval_only)")
    export_peft: Optional[str] = _opt(None, "also write the adapter as a PEFT LoRA adapter here")
    preset: Optional[str] = _opt(None, "the authors' hyperparameters per task (SPEC §5)", ("paper",))
    plot: bool = _opt(False, "write rank_pattern.png (needs matplotlib)")
    device: str = _opt("auto", "auto = cuda when available, else cpu", ("auto", "cpu", "cuda"))
    precision: Optional[str] = _opt("auto", "bf16 autocast or fp32 (default: resolve_precision)",
                                    ("auto", "fp32", "bf16"))
    compile: Optional[bool] = _opt(None, "torch.compile + CUDA graphs (default: compiled.resolve)")
    compile_backend: str = _opt("inductor", "torch.compile backend (none: CUDA graphs only)",
                                compiled.BACKENDS)
    given = frozenset()  # not a field: the flags given on the command line (for --eval_only)

    def __post_init__(self):
        for f in dataclasses.fields(self):
            choices, value = f.metadata.get("choices"), getattr(self, f.name)
            if choices and value is not None and value not in choices:
                raise ValueError(f"--{f.name} must be one of {choices}, got {value!r}")
            if isinstance(value, float) and not math.isfinite(value):  # nan passes min() and <
                raise ValueError(f"--{f.name} must be a finite number, got {value}")
        ti, tf, drops = self.init_warmup, self.final_warmup, (self.dropout, self.classifier_dropout)
        sizes = (self.train_size or 0, self.eval_size or 0, self.eval_every, self.save_every)
        for ok, message in [
                (min(self.r, self.k, self.alpha) >= 1,
                 f"--r, --k, --alpha must be >= 1, got {self.r, self.k, self.alpha}"),
                (0 <= self.target_rank <= self.r,
                 f"--target_rank must be in [0, r={self.r}], got {self.target_rank}"),
                (ti >= 0 and tf >= 0 and ti + tf < 1, f"--init_warmup + --final_warmup must be "
                                                       f"fractions summing below 1, got {ti} + {tf}"),
                (0 <= self.warmup < 1, f"--warmup is a fraction of the steps in [0, 1): {self.warmup}"),
                (min(self.batch_size, self.mask_interval, self.length_groups) >= 1,
                 "--batch_size, --mask_interval and --length_groups must be >= 1"),
                (self.steps is None or self.steps >= 1, f"--steps must be >= 1, got {self.steps}"),
                (self.steps is None or self.epochs is None, "give --steps or --epochs, not both"),
                (0 <= self.seed < 2 ** 32, f"--seed must be in [0, 2**32), got {self.seed}"),
                (self.epochs is None or self.epochs > 0, f"--epochs must be > 0, got {self.epochs}"),
                (0 < self.lr < math.inf, f"--lr must be a positive number, got {self.lr}"),
                (self.clip >= 0,
                 f"--clip is a gradient-norm bound > 0 (0: no clipping), got {self.clip}"),
                (min(self.weight_decay, self.gamma, self.cross) >= 0,
                 "--weight_decay, --gamma and --cross must be >= 0"),
                (min(sizes) >= 0, "--train_size, --eval_size (0: all), --eval_every and "
                                  "--save_every (0: never) must be >= 0"),
                (self.log_every >= 1, f"--log_every must be >= 1, got {self.log_every}"),
                (all(p is None or 0 <= p < 1 for p in drops),
                 f"--dropout and --classifier_dropout are in [0, 1), got {drops}"),
                (not (self.resume and self.overwrite), "give --resume or --overwrite, not both"),
                (self.dev_split is None or 0 < self.dev_split < 1,
                 f"--dev_split must be in (0, 1), got {self.dev_split}"),
                (self.max_len >= 8, f"--max_len must be >= 8, got {self.max_len}"),
                (bool(self.eval_only) == bool(self.load),
                 "--eval_only and --load PATH (an adapter.pt) go together"),
                (not (self.model and self.hf), "give --model or --hf, not both")]:
            if not ok:
                raise ValueError(message)
        if self.steps is not None and self.epochs is None:
            rundir.warmup_steps(self, self.steps, "--steps")


# The authors' scripts (SPEC §5, DeBERTaV3-base, batch 32, k = 8). t_i, t_f and warm-up are in steps
# of the full training set; --preset paper makes them fractions of the steps (MRPC's 0.1 is one).
PAPER = {  # lr, epochs, max_len, r, target_rank, α, t_i, t_f, mask_interval, γ, warmup, cls drop, wd
    "cola": (8e-4, 25, 64, 4, 3, 32, 800, 3500, 10, 0.1, 100, 0.10, 0.0),
    "mnli": (5e-4, 7, 256, 8, 3, 16, 8000, 50000, 100, 0.1, 1000, 0.15, 0.0),
    "mrpc": (1e-3, 30, 320, 8, 1, 32, 600, 1800, 1, 0.1, 0.1, 0.0, 0.01),
    "qnli": (1.2e-3, 5, 512, 8, 2, 32, 2000, 8000, 100, 0.1, 500, 0.1, 0.01),
    "qqp": (8e-4, 20, 320, 8, 3, 16, 8000, 25000, 100, 0.1, 2000, 0.15, 0.01),
    "rte": (1.2e-3, 50, 320, 4, 3, 32, 600, 1800, 1, 0.3, 200, 0.20, 0.01),
    "sst2": (8e-4, 24, 128, 8, 2, 16, 6000, 22000, 100, 0.1, 1000, 0.0, 0.01),
    "stsb": (2.2e-3, 25, 128, 4, 1, 32, 800, 2000, 10, 0.3, 100, 0.2, 0.1),
}
QUICK_STEPS = {"fp32": 720, "bf16": 900}  # the quick run: what 3 min on 2 CPU cores fit, QUICKRUN.md


def paper_preset(task):
    """SPEC §5 for `task` as Config values: all the training set, its epochs, warm-ups as fractions."""
    if task not in PAPER:
        raise ValueError(f"--preset paper has no hyperparameters for {task!r}, only {sorted(PAPER)}")
    lr, epochs, max_len, r, target, alpha, t_i, t_f, every, gamma, warm, drop, wd = PAPER[task]
    T = epochs * math.ceil(glue.TASKS[task].train_size / 32)
    return dict(lr=lr, epochs=epochs, steps=None, train_size=None, max_len=max_len, r=r, k=8,
                alpha=alpha, target_rank=target, init_warmup=t_i / T, final_warmup=t_f / T,
                mask_interval=every, gamma=gamma, warmup=warm if warm < 1 else warm / T,
                classifier_dropout=drop, weight_decay=wd, batch_size=32, pooling="cls")


def parse_config(argv=None, config=Config, description=__doc__.split("\n\n")[0]):
    """`config` from the command line: defaults, then --preset (if any), then the flags given."""
    p = argparse.ArgumentParser(description=description, argument_default=argparse.SUPPRESS)
    hints = typing.get_type_hints(config)
    for f in dataclasses.fields(config):
        tp = next((a for a in typing.get_args(hints[f.name]) if a is not type(None)), hints[f.name])
        text = f.metadata["help"] + ("" if "default" in f.metadata["help"] else f" ({f.default})")
        if tp is bool:  # --flag; --flag / --no-flag where the default is None (auto)
            action = argparse.BooleanOptionalAction if f.default is None else "store_true"
            p.add_argument(f"--{f.name}", action=action, help=text)
        else:
            p.add_argument(f"--{f.name}", type=tp, choices=f.metadata["choices"], help=text)
    given = vars(p.parse_args(argv))  # only the flags given: presets fill the rest
    values = paper_preset(given.get("task", config.task)) if given.get("preset") == "paper" else {}
    if "steps" in given:  # a length given on the command line replaces the preset's
        values.pop("epochs", None)
    cfg = config(**{**values, **given})
    cfg.given = frozenset(given)
    return cfg


# --------------------------------------------------------------------------------------------------
# helpers


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


def resolve_precision(choice, device):
    """(fp32 or bf16, why): auto is bf16 autocast on CUDA and on CPUs with bf16 instructions
    (AVX512-BF16, AMX), which train about 1.7× faster so (BENCHMARKS.md); else fp32. None (a checkpoint
    from before --precision) is what ran then: bf16 on CUDA, fp32 on the CPU."""
    if choice in ("fp32", "bf16"):
        return choice, "--precision"
    if device.type == "cuda" or choice is None:
        return ("bf16" if device.type == "cuda" else "fp32"), "auto"
    bf16 = torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    return ("bf16", "auto: a CPU with bf16 instructions") if bf16 else ("fp32", "auto: no bf16 CPU")


def run_length(cfg, n_train, precision):
    """(optimiser steps, why): --epochs over n_train examples, else --steps, else the quick run's
    QUICK_STEPS[precision] (bf16 autocast trains faster on the CPU: the gain goes into steps)."""
    if cfg.epochs is not None:
        return math.ceil(cfg.epochs * (n_train // cfg.batch_size)), f"--epochs {cfg.epochs:g}"
    if cfg.steps is not None:
        return cfg.steps, "--steps"
    return QUICK_STEPS[precision], f"auto: {precision}"


def autocast(device, precision):
    """torch.autocast to bf16 for precision "bf16" (matrix products in bf16, the rest fp32)."""
    if precision == "bf16":
        return torch.autocast(device.type, torch.bfloat16)
    return contextlib.nullcontext()


def logits_of(output):
    return output.logits if hasattr(output, "logits") else output  # transformers returns an object


@torch.inference_mode()
def evaluate(model, dev_data, task, pad_id, device, precision):
    """glue.evaluate with the model in eval mode, under the training's autocast."""
    model.eval()
    with autocast(device, precision):
        metrics = glue.evaluate(lambda b: logits_of(model(**b)), dev_data, task, pad_id, device)
    model.train()
    return metrics


def load_run_data(cfg, rank, world, tokenize):
    """(task, glue.Data, train and dev encodings, labels); rank 0 fetches, the others wait."""
    if rank != 0:
        dist.barrier()
    data = glue.load(cfg.task, cfg.data_dir, cfg.dev_split, cfg.train_size, cfg.eval_size,
                     fetch=rank == 0 and not cfg.no_download)
    if rank == 0 and world > 1:
        dist.barrier()
    if len(data.train) < cfg.batch_size:
        raise ValueError(f"{len(data.train)} training examples, fewer than a batch ({cfg.batch_size})")
    task = glue.TASKS[cfg.task]
    train_enc, train_y = glue.encode(tokenize, data.train, cfg.max_len)
    train_y = torch.tensor(train_y, dtype=torch.float if task.labels is None else torch.long)
    dev_data = {split: glue.encode(tokenize, ex, cfg.max_len) for split, ex in data.dev.items()}
    return task, data, train_enc, train_y, dev_data


def adamw(model, cfg, steps):
    """AdamW (fused), no decay on biases and LayerNorm; linear warm-up, then linear decay to 0."""
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    plain = [n.endswith("bias") or "LayerNorm" in n or "layer_norm" in n for n, _ in params]
    optimizer = torch.optim.AdamW(
        [{"params": [p for (_, p), no in zip(params, plain) if not no], "weight_decay": cfg.weight_decay},
         {"params": [p for (_, p), no in zip(params, plain) if no], "weight_decay": 0.0}],
        lr=cfg.lr, fused=True)
    warm = round(cfg.warmup * steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda t: t / warm if t < warm else max(0.0, (steps - t) / max(1, steps - warm)))
    return optimizer, scheduler, [p for _, p in params]


# --------------------------------------------------------------------------------------------------
# training


def train(cfg, stop_at=None):
    """Train per cfg: (metrics.json's summary, model). stop_at: stop there, as a killed run (tests)."""
    rank, world, device, started = setup_distributed(cfg.device)
    try:
        with rundir.claim(cfg) if rank == 0 else contextlib.nullcontext():  # the folder: this run's
            return _train(cfg, rank, world, device, stop_at)
    finally:
        if started:
            dist.destroy_process_group()


def _train(cfg, rank, world, device, stop_at):
    say = functools.partial(print, file=sys.stderr, flush=True) if rank == 0 else lambda *a: None
    out_dir = rundir.out_dir_of(cfg)
    if cfg.batch_size % world:
        raise ValueError(f"--batch_size {cfg.batch_size}, the global batch, must divide by {world}")
    torch.manual_seed(cfg.seed)
    cfg = dataclasses.replace(cfg, pooling=cfg.pooling or ("cls" if cfg.hf else "mean"))

    # model: the backbone, its target matrices made LoRA2Linear (L1, L2); checked before any data
    backbone, tokenize, pad_id, targets = bert.load_classifier(
        glue.TASKS[cfg.task].num_labels, cfg.model, cfg.hf, cfg.classifier_dropout, cfg.max_len,
        cfg.pooling, cfg.dropout)
    lora2.inject(backbone, targets, r=cfg.r, k=cfg.k, alpha=cfg.alpha, init=cfg.init)
    model = backbone.to(device)

    # data, and the run's precision, length and compilation
    task, data, train_enc, train_y, dev_data = load_run_data(cfg, rank, world, tokenize)
    lengths = tuple(len(ids) for ids, _ in train_enc)
    precision, why_precision = resolve_precision(cfg.precision, device)
    steps, why_steps = run_length(cfg, len(data.train), precision)
    t_i, t_f = rundir.warmup_steps(cfg, steps, why_steps)  # (L7) in steps, checked before training
    use_compile, why_compile = compiled.resolve(cfg.compile, device, world, steps)
    cfg = dataclasses.replace(cfg, steps=steps, epochs=None, precision=precision, compile=use_compile)
    counts, why = lora2.count_parameters(model), (why_steps, why_precision, why_compile)
    say(rundir.header(task, data, "LoRA²", counts, steps, cfg, world, device, why))

    # the Pruner (L5)–(L8) with t_i, t_f in steps (L7); AdamW and its schedule
    pruner = lora2.Pruner(model, cfg.target_rank, steps, t_i, t_f, cfg.mask_interval,
                          scored=cfg.scored)
    optimizer, scheduler, params = adamw(model, cfg, steps)
    net = torch.nn.parallel.DistributedDataParallel(model) if world > 1 else model

    # what a checkpoint carries; --resume restores it
    run = {"global_step": 0, "elapsed": 0.0, "best": None, "last_metrics": None}
    state_path = out_dir / "train_state.pt"
    if cfg.resume and state_path.exists():
        load = functools.partial(rundir.load_lora2_state, model)
        run = rundir.load_train_state(state_path, cfg, load, pruner, optimizer, scheduler, device)
        say(f"resumed from {state_path} at step {run['global_step']}")
    if cfg.overwrite and rank == 0:
        rundir.clear(out_dir)  # the previous run goes now, all checks passed

    def device_step(batch, labels, regularizer=lora2.orthogonal_regularizer):  # compiled: grouped
        with autocast(device, precision):
            logits = logits_of(net(**batch))                      # (B / world, num_labels)
        loss_task = glue.task_loss(logits, labels)
        reg = regularizer(model, cross=cfg.cross)                  # R = R_int + cross·R_ext (L3, L4)
        (loss_task + cfg.gamma * reg).backward()                   # loss = task + γ·R
        if cfg.clip:                                               # 0: no clipping
            torch.nn.utils.clip_grad_norm_(params, cfg.clip)
        optimizer.step()
        return loss_task.detach(), reg.detach()
    step = compiled.step(device_step, model, optimizer, cfg, pruner) if use_compile else device_step
    buckets = glue.length_buckets(cfg.max_len) if use_compile else None  # compiled: a few shapes

    # the loop
    model.train()
    global_step = run["global_step"]
    t0, start_step, loss_sum, reg_sum, n_sum = time.time(), global_step, 0.0, 0.0, 0
    while global_step < steps:
        if stop_at is not None and global_step >= stop_at:
            return {"stopped_at": global_step}, model
        index = glue.batch_index(global_step, lengths, cfg.batch_size, cfg.seed, cfg.length_groups)
        index = index[rank::world]                           # this rank's share of the batch
        batch = glue.collate(train_enc, index, pad_id, device, buckets)
        labels = glue.to_device(train_y[index], device)
        loss_task, reg = step(batch, labels)                 # forward → loss → backward → clip → step
        scheduler.step()
        pruner.step(global_step)                             # (L5)–(L8): this step's .grad, masks λ
        optimizer.zero_grad(set_to_none=True)
        global_step += 1

        loss_sum, reg_sum, n_sum = loss_sum + loss_task, reg_sum + reg, n_sum + 1  # no host sync
        evaluating = global_step == steps or (cfg.eval_every and global_step % cfg.eval_every == 0)
        saving = rank == 0 and cfg.save_every and (global_step % cfg.save_every == 0
                                                   or global_step == steps)
        if global_step % cfg.log_every == 0 or evaluating or saving:  # diverged: stop, keep nothing
            rundir.check_finite(global_step, n_sum, cfg, loss_sum, reg_sum)
        if global_step % cfg.log_every == 0 or global_step == steps:
            rate, lr = (global_step - start_step) / (time.time() - t0), scheduler.get_last_lr()[0]
            say(rundir.progress(global_step, steps, float(loss_sum) / n_sum, float(reg_sum) / n_sum, lr,
                                pruner.budget(global_step - 1), rate, cfg.batch_size))
            loss_sum, reg_sum, n_sum = 0.0, 0.0, 0
        if evaluating:
            eval_start = time.time()
            metrics = run["last_metrics"] = evaluate(model, dev_data, task, pad_id, device, precision)
            best, main = run["best"], task.metrics[0]
            is_best = global_step >= steps - t_f and (best is None or metrics[main] > best["metrics"][main])
            if is_best:  # the best evaluation at the final budget b_T (L7)
                state = rundir.lora2_state(model)
                run["best"] = {"step": global_step, "metrics": metrics, "state": state}
                if rank == 0:
                    rundir.save_adapter(out_dir / "adapter.pt", cfg, global_step, metrics, state)
            scores = ", ".join(f"{k} {v:.4f}" for k, v in metrics.items())
            say(f"eval at step {global_step}: {scores}" + (" (best)" if is_best else ""))
            t0 += time.time() - eval_start  # evaluation time is not training time
        if saving:
            now = {**run, "global_step": global_step, "elapsed": run["elapsed"] + time.time() - t0}
            rundir.save_train_state(state_path, cfg, rundir.lora2_state(model), pruner, optimizer,
                                    scheduler, device, now)
    run["elapsed"] += time.time() - t0
    pruner.close()

    # the report: the best checkpoint's metrics, its rank pattern (L8), its export to PEFT (SPEC §6)
    rundir.load_lora2_state(model, run["best"]["state"])
    stats = pruner.stats()
    notes = [f"importance scores kept for {stats['scored']:,} of {stats['adapter']:,} adapter "
             f"entries ({100 * stats['scored_ratio']:.2f} %; AdaLoRA would score "
             f"{stats['adalora_scored']:,})"]
    return rundir.report(cfg, counts, run, data, world, device, out_dir if rank == 0 else None,
                         lora2.rank_pattern(model), notes, stats["scored_ratio"],
                         functools.partial(formats.save_peft, model)), model


# --------------------------------------------------------------------------------------------------
# --eval_only, and the command line


def evaluate_checkpoint(cfg):
    """--eval_only --load PATH: the saved run's model, adapter + head, evaluated on its data; with
    --export_peft, then exported as a PEFT adapter."""
    ck, saved = rundir.load_adapter(cfg)
    _, _, device, _ = setup_distributed(saved.device)
    task = glue.TASKS[saved.task]
    backbone, tokenize, pad_id, targets = bert.load_classifier(
        task.num_labels, saved.model, saved.hf, saved.classifier_dropout, saved.max_len,
        saved.pooling, saved.dropout)
    lora2.inject(backbone, targets, r=saved.r, k=saved.k, alpha=saved.alpha, init=saved.init)
    rundir.load_trained(functools.partial(rundir.load_lora2_state, backbone), ck, cfg.load)
    model = backbone.to(device)
    dev = glue.load(saved.task, saved.data_dir, saved.dev_split, saved.train_size, saved.eval_size,
                    fetch=not saved.no_download).dev
    dev_data = {s: glue.encode(tokenize, ex, saved.max_len) for s, ex in dev.items()}
    precision = resolve_precision(saved.precision, device)[0]
    metrics = evaluate(model, dev_data, task, pad_id, device, precision)
    print(f"{task.dir} lora2 (step {ck['step']} of {cfg.load}): "
          + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
    if saved.export_peft:
        print(rundir.export_peft(saved, functools.partial(formats.save_peft, model),
                                 "the evaluation above is complete"))
    return metrics


def main(argv=None):
    try:
        cfg = parse_config(argv)
        if cfg.eval_only:
            evaluate_checkpoint(cfg)
        else:
            train(cfg)
    # mistakes, bad files, full disks, a diverged run's scores (lora2.Pruner): one line
    except (ValueError, ImportError, OSError, FloatingPointError) as e:
        sys.exit(f"train_glue.py: error: {' '.join(str(e).split())}")


if __name__ == "__main__":
    main()
