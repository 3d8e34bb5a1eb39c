"""Fine-tune a BERT-style encoder on a GLUE task with LoRA², in one flat loop (the order of SPEC §4).

    python train_glue.py                            # LoRA² on SST-2 with the packaged MiniLM (2 CPU cores: < 3 min)
    python train_glue.py --task rte --preset paper  # the authors' RTE hyperparameters (SPEC §5), warm-ups as fractions
    torchrun --nproc_per_node=2 train_glue.py       # DDP: gloo on CPU, nccl on GPU; --batch_size is the global batch

Reads top to bottom: configuration, the method (LoRA² as an object with the interface the baselines in
experiments/baselines.py share), then train(): data, model + inject + Pruner, optimiser and schedule, the loop
(forward → loss = task + γ·R → backward → clip → optimizer.step → scheduler.step → pruner.step(t) → zero_grad),
evaluation, the report. Writes metrics.json, adapter.pt and (--save_every) train_state.pt into --out_dir (rundir.py).
Not here: GLUE data and metrics (glue.py), the BERT (bert.py), the method's equations (lora2.py), the baselines
(experiments/baselines.py), --compile's torch.compile + CUDA graphs (compiled.py, default on one GPU).
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

import torch
import torch.distributed as dist

import bert
import compiled
import glue
import lora2
import rundir

# ----------------------------------------------------------------------------------------------------------------------
# configuration


def _opt(default, help, choices=None):
    return field(default=default, metadata={"help": help, "choices": choices})


@dataclass
class Config:
    # data
    task: str = _opt("sst2", "GLUE task", tuple(glue.TASKS))
    data_dir: typing.Optional[str] = _opt(None, "GLUE folder (default: $GLUE_DIR, else ./glue_data)")
    no_download: bool = _opt(False, "never fetch a missing task from the GLUE archives")
    train_size: typing.Optional[int] = _opt(0, "train on a fixed random subset of N examples (seed 0); 0 = all")
    eval_size: typing.Optional[int] = _opt(None, "evaluate on a fixed random subset of N dev examples (seed 0; 0: all)")
    dev_split: typing.Optional[float] = _opt(None, "no train.tsv (QNLI here): this fraction of dev.tsv is the eval "
                                                   "set, the rest the train set (fixed seed 0; non-standard)")
    max_len: int = _opt(64, "maximum tokens per example (batches are padded to their longest example)")
    length_groups: int = _opt(64, "sort runs of this many shuffled batches by length, to pad less (1: plain shuffle)")
    # model
    model: typing.Optional[str] = _opt(None, "BERT checkpoint folder (default: the packaged all-MiniLM-L6-v2)")
    hf: typing.Optional[str] = _opt(None, "a transformers model name or path instead of --model (needs transformers)")
    method: str = _opt("lora2", "what to train (the baselines live in experiments/baselines.py)",
                       ("lora2", "lora", "adalora", "full"))
    r: int = _opt(8, "singular values per matrix (LoRA², AdaLoRA init_r) or LoRA rank")
    k: int = _opt(8, "LoRA² inner width")
    alpha: int = _opt(16, "scaling s = alpha / r")
    target_rank: int = _opt(2, "average rank kept after pruning (LoRA², AdaLoRA target_r)")
    init: str = _opt("orthogonal", "LoRA² factor initialisation (SPEC §1)", lora2.INITS)
    gamma: float = _opt(0.1, "weight γ of the orthogonality regulariser (L3; AdaLoRA's orth_reg_weight)")
    cross: float = _opt(0.0, "weight of the cross-plane term (L4), relative to γ")
    scored: str = _opt("inner", "LoRA² importance on the inner factors (L5) or on all, AdaLoRA-style", lora2.SCORED)
    init_warmup: float = _opt(0.1, "t_i as a fraction of the steps (L7)")
    final_warmup: float = _opt(0.3, "t_f as a fraction of the steps (L7)")
    mask_interval: int = _opt(10, "mask every N steps in the cubic phase (L7, L8)")
    classifier_dropout: typing.Optional[float] = _opt(None, "dropout before the classifier (default: the model's)")
    pooling: typing.Optional[str] = _opt(None, "classifier input: mean = the hidden states averaged over real tokens "
                                         "(MiniLM's own pooling), cls = the [CLS] pooler (default: mean; cls with "
                                         "--hf, --preset paper)", bert.POOLINGS)
    # optimisation
    lr: float = _opt(5e-3, "peak learning rate (AdamW; full fine-tuning wants about 5e-5)")
    weight_decay: float = _opt(0.01, "AdamW weight decay (not on biases and LayerNorm)")
    batch_size: int = _opt(32, "global batch size (split over DDP ranks)")
    steps: typing.Optional[int] = _opt(720, "optimiser steps")
    epochs: typing.Optional[float] = _opt(None, "set the steps from epochs over the training set instead")
    warmup: float = _opt(0.06, "linear lr warm-up, fraction of the steps; then linear decay to 0")
    clip: float = _opt(1.0, "gradient-norm clipping (0: none)")
    seed: int = _opt(0, "seed of initialisation, dropout and data order")
    # run
    eval_every: int = _opt(0, "evaluate every N steps (0: only at the end)")
    log_every: int = _opt(100, "progress line every N steps")
    out_dir: typing.Optional[str] = _opt(None, "output folder (default runs/<task>-<method>-s<seed>)")
    save_every: int = _opt(0, "write a resumable training checkpoint every N steps")
    resume: bool = _opt(False, "continue from <out_dir>/train_state.pt if it exists")
    overwrite: bool = _opt(False, "replace the run in --out_dir (its files are deleted just before the first step)")
    eval_only: bool = _opt(False, "only evaluate the adapter + head of --load")
    load: typing.Optional[str] = _opt(None, "adapter.pt written by a training run (with --eval_only)")
    export_peft: typing.Optional[str] = _opt(None, "also write the adapter as a PEFT LoRA adapter into this folder")
    preset: typing.Optional[str] = _opt(None, "the authors' per-task hyperparameters (SPEC §5)", ("paper",))
    plot: bool = _opt(False, "write rank_pattern.png (needs matplotlib)")
    device: str = _opt("auto", "auto = cuda when available (bf16 autocast), else cpu", ("auto", "cpu", "cuda"))
    compile: typing.Optional[bool] = _opt(None, "torch.compile + CUDA graphs (default: on for one CUDA process)")
    compile_backend: str = _opt("inductor", "torch.compile backend (none: CUDA graphs only)", compiled.BACKENDS)
    given = frozenset()  # not a field: the flags given on the command line (parse_config); --eval_only checks them

    def __post_init__(self):
        for f in dataclasses.fields(self):
            choices, value = f.metadata.get("choices"), getattr(self, f.name)
            if choices and value is not None and value not in choices:
                raise ValueError(f"--{f.name} must be one of {choices}, got {value!r}")
        checks = [
            (min(self.r, self.k, self.alpha) >= 1, f"--r, --k, --alpha must be >= 1, got {self.r, self.k, self.alpha}"),
            (0 <= self.target_rank <= self.r, f"--target_rank must be in [0, r={self.r}], got {self.target_rank}"),
            (self.init_warmup >= 0 and self.final_warmup >= 0 and self.init_warmup + self.final_warmup < 1,
             f"--init_warmup + --final_warmup must be fractions summing below 1, got {self.init_warmup} + "
             f"{self.final_warmup} = {self.init_warmup + self.final_warmup}"),
            (0 <= self.warmup < 1, f"--warmup is a fraction of the steps in [0, 1), got {self.warmup}"),
            (min(self.batch_size, self.mask_interval, self.length_groups) >= 1,
             "--batch_size, --mask_interval and --length_groups must be >= 1"),
            ((self.steps or 0) >= 1 if self.epochs is None else self.epochs > 0, "--steps (--epochs) must be > 0"),
            (0 < self.lr < math.inf, f"--lr must be a positive number, got {self.lr}"),
            (self.clip >= 0, f"--clip is a gradient-norm bound > 0 (0: no clipping), got {self.clip}"),
            (min(self.weight_decay, self.gamma, self.cross) >= 0, "--weight_decay, --gamma and --cross must be >= 0"),
            (min(self.train_size or 0, self.eval_size or 0, self.eval_every, self.save_every) >= 0,
             "--train_size, --eval_size (0: all), --eval_every and --save_every (0: never) must be >= 0"),
            (self.log_every >= 1, f"--log_every must be >= 1, got {self.log_every}"),
            (self.classifier_dropout is None or 0 <= self.classifier_dropout < 1, "--classifier_dropout is in [0, 1)"),
            (not (self.resume and self.overwrite), "give --resume or --overwrite, not both"),
            (self.dev_split is None or 0 < self.dev_split < 1, f"--dev_split must be in (0, 1), got {self.dev_split}"),
            (self.max_len >= 8, f"--max_len must be >= 8, got {self.max_len}"),
            (bool(self.eval_only) == bool(self.load), "--eval_only and --load PATH (an adapter.pt) go together"),
            (not (self.model and self.hf), "give --model or --hf, not both"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)


# The authors' scripts (SPEC §5, DeBERTaV3-base, batch 32, k = 8). t_i, t_f and warm-up are in steps of the full
# training set; --preset paper turns them into fractions of the steps (warm-up 0.1 for MRPC is already a fraction).
PAPER = {  # task: lr, epochs, max_len, r, target_rank, alpha, t_i, t_f, mask_interval, gamma, warmup, cls dropout, wd
    "cola": (8e-4, 25, 64, 4, 3, 32, 800, 3500, 10, 0.1, 100, 0.10, 0.0),
    "mnli": (5e-4, 7, 256, 8, 3, 16, 8000, 50000, 100, 0.1, 1000, 0.15, 0.0),
    "mrpc": (1e-3, 30, 320, 8, 1, 32, 600, 1800, 1, 0.1, 0.1, 0.0, 0.01),
    "qnli": (1.2e-3, 5, 512, 8, 2, 32, 2000, 8000, 100, 0.1, 500, 0.1, 0.01),
    "qqp": (8e-4, 20, 320, 8, 3, 16, 8000, 25000, 100, 0.1, 2000, 0.15, 0.01),
    "rte": (1.2e-3, 50, 320, 4, 3, 32, 600, 1800, 1, 0.3, 200, 0.20, 0.01),
    "sst2": (8e-4, 24, 128, 8, 2, 16, 6000, 22000, 100, 0.1, 1000, 0.0, 0.01),
    "stsb": (2.2e-3, 25, 128, 4, 1, 32, 800, 2000, 10, 0.3, 100, 0.2, 0.1),
}


def paper_preset(task):
    """SPEC §5 for `task` as Config values: full training set, the paper's epochs, warm-ups as fractions of T, [CLS]."""
    if task not in PAPER:
        raise ValueError(f"--preset paper has no hyperparameters for {task!r} (the paper covers {sorted(PAPER)})")
    lr, epochs, max_len, r, target, alpha, t_i, t_f, interval, gamma, warmup, dropout, wd = PAPER[task]
    T_paper = epochs * math.ceil(glue.TASKS[task].train_size / 32)
    return dict(lr=lr, epochs=epochs, steps=None, train_size=None, max_len=max_len, r=r, k=8, target_rank=target,
                alpha=alpha, init_warmup=t_i / T_paper, final_warmup=t_f / T_paper, mask_interval=interval,
                gamma=gamma, warmup=warmup if warmup < 1 else warmup / T_paper, classifier_dropout=dropout,
                weight_decay=wd, batch_size=32, pooling="cls")


def parse_config(argv=None):
    """Config from the command line: defaults, then --preset (if any), then the flags given explicitly."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], argument_default=argparse.SUPPRESS)
    hints = typing.get_type_hints(Config)
    for f in dataclasses.fields(Config):
        tp = next((a for a in typing.get_args(hints[f.name]) if a is not type(None)), hints[f.name])  # Optional[X]->X
        help_text = f.metadata["help"] + ("" if "default" in f.metadata["help"] else f" (default: {f.default})")
        if tp is bool:  # --flag; --flag / --no-flag where the default is None (auto)
            p.add_argument(f"--{f.name}", action=argparse.BooleanOptionalAction if f.default is None else "store_true",
                           help=help_text)
        else:
            p.add_argument(f"--{f.name}", type=tp, choices=f.metadata["choices"], help=help_text)
    given = vars(p.parse_args(argv))  # only the flags given: presets fill the rest
    values = paper_preset(given.get("task", Config.task)) if given.get("preset") == "paper" else {}
    cfg = Config(**{**values, **given})
    cfg.given = frozenset(given)
    return cfg


# ----------------------------------------------------------------------------------------------------------------------
# the method: LoRA² behind the small interface that every --method shares


class LoRA2:
    """LoRA² for the loop: inject (L1, L2) into the target layers, the regulariser (L3, L4) and the Pruner (L5)–(L8).

    Every --method has this interface (experiments/baselines.py: LoRA, AdaLoRA, full fine-tuning). steps=None builds
    it for evaluation only. `final_phase`: the first step at the final budget (the best checkpoint is chosen from
    there); state_dict: for train_state.pt; trained_state: adapter + head, for adapter.pt; notes: report extras.
    """

    def __init__(self, model, cfg, targets, steps=None):
        lora2.inject(model, targets, r=cfg.r, k=cfg.k, alpha=cfg.alpha, init=cfg.init)
        self.model, self.cross = model, cfg.cross
        t_i, t_f = round(cfg.init_warmup * (steps or 0)), round(cfg.final_warmup * (steps or 0))  # (L7), in steps
        self.pruner = lora2.Pruner(model, cfg.target_rank, steps, t_i, t_f, cfg.mask_interval,
                                   scored=cfg.scored) if steps else None
        self.final_phase = (steps or 0) - t_f

    def regularizer(self):
        return lora2.orthogonal_regularizer(self.model, cross=self.cross)

    def after_step(self, t):
        self.pruner.step(t)  # (L5)–(L8): reads this step's .grad, masks λ

    def budget(self, t):
        return self.pruner.budget(t)

    def rank_pattern(self):
        return lora2.rank_pattern(self.model)

    def state_dict(self):
        return self.pruner.state_dict()

    def load_state_dict(self, state):
        self.pruner.load_state_dict(state)

    def trained_state(self):
        return {"adapter": lora2.adapter_state_dict(self.model), "head": rundir.head_state(self.model)}

    def load_trained_state(self, state):
        lora2.load_adapter_state_dict(self.model, state["adapter"])
        rundir.load_head(self.model, state["head"])

    def notes(self):
        stats = self.pruner.stats()
        return {"scored_ratio": stats["scored_ratio"]}, [
            f"importance scores kept for {stats['scored']:,} of {stats['adapter']:,} adapter entries "
            f"({100 * stats['scored_ratio']:.2f} %; AdaLoRA would score {stats['adalora_scored']:,})"]

    def export_peft(self, path, base):
        lora2.save_peft(self.model, path, base_model_name_or_path=base)


def load_method(name):
    """The class that trains --method: LoRA2 above, or a baseline from experiments/baselines.py."""
    if name == "lora2":
        return LoRA2
    from experiments import baselines  # LoRA and AdaLoRA need peft; full fine-tuning needs nothing more
    return baselines.METHODS[name]


# ----------------------------------------------------------------------------------------------------------------------
# training


def train(cfg, stop_at=None):
    """Train per cfg; return (summary dict as in metrics.json, model). stop_at: return early once global_step reaches
    it, without the final evaluation (a stand-in for a killed run in tests)."""
    rank, world, device, started = setup_distributed(cfg.device)
    try:
        with rundir.claim(cfg) if rank == 0 else contextlib.nullcontext():  # the folder is this run's: lock, checks
            return _train(cfg, rank, world, device, stop_at)
    finally:
        if started:
            dist.destroy_process_group()


def _train(cfg, rank, world, device, stop_at):
    say = functools.partial(print, file=sys.stderr, flush=True) if rank == 0 else (lambda *a, **k: None)
    out_dir = rundir.out_dir_of(cfg)
    if cfg.batch_size % world:
        raise ValueError(f"--batch_size {cfg.batch_size} is the global batch; it must divide by the {world} ranks")
    task = glue.TASKS[cfg.task]
    torch.manual_seed(cfg.seed)

    # data: rank 0 fetches a missing task while the others wait at the barrier, then they read it
    if rank != 0:
        dist.barrier()
    train_ex, dev, non_standard = glue.load(cfg.task, cfg.data_dir, cfg.dev_split, cfg.train_size, cfg.eval_size,
                                            fetch=rank == 0 and not cfg.no_download)
    if rank == 0 and world > 1:
        dist.barrier()
    if len(train_ex) < cfg.batch_size:
        raise ValueError(f"{len(train_ex)} training examples are fewer than one batch of {cfg.batch_size}")
    steps = cfg.steps if cfg.epochs is None else math.ceil(cfg.epochs * (len(train_ex) // cfg.batch_size))
    cfg = dataclasses.replace(cfg, steps=steps, epochs=None, compile=compiled.resolve(cfg.compile, device, world),
                              pooling=cfg.pooling or ("cls" if cfg.hf else "mean"))

    # model: the backbone, the method injected into it (LoRA²: inject + Pruner)
    backbone, tokenize, pad_id, targets = bert.load_classifier(task.num_labels, cfg.model, cfg.hf,
                                                               cfg.classifier_dropout, cfg.max_len, cfg.pooling)
    method = load_method(cfg.method)(backbone, cfg, targets, steps)
    model = method.model.to(device)
    train_enc, train_y = glue.encode(tokenize, train_ex, cfg.max_len)
    train_y = torch.tensor(train_y, dtype=torch.float if task.labels is None else torch.long)
    lengths = tuple(len(ids) for ids, _ in train_enc)
    dev_data = {split: glue.encode(tokenize, ex, cfg.max_len) for split, ex in dev.items()}
    counts = lora2.count_parameters(model)
    say(f"{task.dir}: {len(train_ex)} train, " + ", ".join(f"{len(ex)} {s}" for s, ex in dev.items())
        + (" (NON-STANDARD: train and eval are a split of dev.tsv)" if non_standard else "")
        + f" | {cfg.method}: {counts['adapter']:,} adapter + {counts['head']:,} head parameters trainable"
        + f" | {steps} steps of {cfg.batch_size} on {world}×{device.type}")

    # optimiser: AdamW, no decay on biases and LayerNorm; linear warm-up then linear decay to 0
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    no_decay = [p for n, p in params if n.endswith("bias") or "LayerNorm" in n or "layer_norm" in n]
    decay = [p for n, p in params if not (n.endswith("bias") or "LayerNorm" in n or "layer_norm" in n)]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},  # fused; CUDA graphs: lr tensor
                                   {"params": no_decay, "weight_decay": 0.0}], **compiled.adamw_options(cfg, device))
    warm = round(cfg.warmup * steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda t: t / warm if t < warm else max(0.0, (steps - t) / max(1, steps - warm)))
    net = torch.nn.parallel.DistributedDataParallel(model) if world > 1 else model

    # what a checkpoint carries; --resume restores it
    run = {"global_step": 0, "elapsed": 0.0, "best": None, "last_metrics": None}
    state_path = out_dir / "train_state.pt"
    if cfg.resume and state_path.exists():
        run = rundir.load_train_state(state_path, cfg, method, optimizer, scheduler, device)
        say(f"resumed from {state_path} at step {run['global_step']}")
    if cfg.overwrite and rank == 0:
        rundir.clear(out_dir)                                   # the previous run goes now, all checks passed

    def device_step(batch, labels):  # the step's device work; --compile compiles its pieces, replays it from graphs
        with autocast(device):
            logits = logits_of(net(**batch))                    # (B/world, num_labels)
        loss_task = glue.task_loss(logits, labels)
        reg = method.regularizer()                              # R (L3, L4), or None
        loss = loss_task if reg is None else loss_task + cfg.gamma * reg
        loss.backward()
        if cfg.clip:                                            # 0: no clipping
            torch.nn.utils.clip_grad_norm_([p for _, p in params], cfg.clip)
        optimizer.step()
        return loss_task.detach(), None if reg is None else reg.detach()
    step = compiled.step(device_step, model, method, optimizer, cfg) if cfg.compile else device_step  # compiled.py
    buckets = glue.length_buckets(cfg.max_len) if cfg.compile else None  # compiled: a few batch shapes

    # the loop
    model.train()
    global_step = run["global_step"]
    t0, start_step, loss_sum, reg_sum, n_sum = time.time(), global_step, 0.0, 0.0, 0
    while global_step < steps:
        if stop_at is not None and global_step >= stop_at:
            return {"stopped_at": global_step}, model
        index = glue.batch_index(global_step, lengths, cfg.batch_size, cfg.seed, cfg.length_groups)[rank::world]
        batch, labels = glue.collate(train_enc, index, pad_id, device, buckets), glue.to_device(train_y[index], device)
        loss_task, reg = step(batch, labels)  # forward → loss + γ·R → backward → clip → optimizer.step
        scheduler.step()
        method.after_step(global_step)                          # LoRA²: pruner.step(t), (L5)–(L8)
        optimizer.zero_grad(set_to_none=True)
        global_step += 1

        loss_sum += loss_task                                   # summed on the device: no sync per step
        reg_sum += 0.0 if reg is None else reg
        n_sum += 1
        if global_step % cfg.log_every == 0 or global_step == steps:
            rate = (global_step - start_step) / (time.time() - t0)
            b = method.budget(global_step - 1)
            say(f"step {global_step:>{len(str(steps))}}/{steps} | loss {float(loss_sum) / n_sum:.4f}"
                f" | R {float(reg_sum) / n_sum:.4f} | lr {scheduler.get_last_lr()[0]:.2e} | b(t) {'-' if b is None else b}"
                f" | {rate * cfg.batch_size:.0f} ex/s | ETA {rundir.fmt_time((steps - global_step) / rate)}")
            loss_sum, reg_sum, n_sum = 0.0, 0.0, 0
        if global_step == steps or (cfg.eval_every and global_step % cfg.eval_every == 0):
            eval_start = time.time()
            run["last_metrics"] = metrics = evaluate(model, dev_data, task, pad_id, device)
            best = run["best"]
            is_best = global_step >= method.final_phase and (best is None or metrics[task.metrics[0]]
                                                             > best["metrics"][task.metrics[0]])
            if is_best:
                run["best"] = {"step": global_step, "metrics": metrics, "state": method.trained_state()}
                if rank == 0:
                    rundir.save_adapter(out_dir / "adapter.pt", cfg, global_step, metrics, run["best"]["state"])
            say(f"eval at step {global_step}: " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items())
                + (" (best)" if is_best else ""))
            t0 += time.time() - eval_start                       # evaluation time is not training time
        if cfg.save_every and rank == 0 and (global_step % cfg.save_every == 0 or global_step == steps):
            rundir.save_train_state(state_path, cfg, method, optimizer, scheduler, device,  # the last: --resume reports
                                    {**run, "global_step": global_step, "elapsed": run["elapsed"] + time.time() - t0})
    run["elapsed"] += time.time() - t0

    # the report: the best checkpoint's metrics, its rank pattern, its export
    method.load_trained_state(run["best"]["state"])
    facts = dict(non_standard=non_standard, steps=steps, world=world, device=device.type, train_size=len(train_ex),
                 eval_size={s: len(ex) for s, ex in dev.items()})
    return rundir.report(cfg, method, counts, run, facts, out_dir if rank == 0 else None), model


# ----------------------------------------------------------------------------------------------------------------------
# data, backbone, the step's pieces


def setup_distributed(device_choice):
    """(rank, world size, device, whether this call started the process group); DDP when WORLD_SIZE > 1."""
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


def autocast(device):
    """bf16 autocast on CUDA; fp32 on CPU."""
    return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()


def logits_of(output):
    return output.logits if hasattr(output, "logits") else output  # transformers returns an object


# ----------------------------------------------------------------------------------------------------------------------
# evaluation


@torch.inference_mode()
def evaluate(model, dev_data, task, pad_id, device):
    """glue.evaluate with the model in eval mode, under the training's autocast."""
    model.eval()
    with autocast(device):
        metrics = glue.evaluate(lambda batch: logits_of(model(**batch)), dev_data, task, pad_id, device)
    model.train()
    return metrics


def evaluate_checkpoint(cfg):
    """--eval_only --load PATH: rebuild the model of the saved run, load adapter + head, evaluate on the same data."""
    ck, saved = rundir.load_adapter(cfg)
    _, _, device, _ = setup_distributed(saved.device)
    task = glue.TASKS[saved.task]
    _, dev, _ = glue.load(saved.task, saved.data_dir, saved.dev_split, saved.train_size, saved.eval_size,
                          fetch=not saved.no_download)
    backbone, tokenize, pad_id, targets = bert.load_classifier(  # pooling None: an adapter.pt from before --pooling
        task.num_labels, saved.model, saved.hf, saved.classifier_dropout, saved.max_len, saved.pooling or "cls")
    method = load_method(saved.method)(backbone, saved, targets)
    rundir.load_trained(method, ck, cfg.load)
    model = method.model.to(device)
    metrics = evaluate(model, {s: glue.encode(tokenize, ex, saved.max_len) for s, ex in dev.items()}, task, pad_id,
                       device)
    print(f"{task.dir} {saved.method} (step {ck['step']} of {cfg.load}): "
          + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
    return metrics


def main(argv=None):
    try:
        cfg = parse_config(argv)
        if cfg.eval_only:
            evaluate_checkpoint(cfg)
        else:
            train(cfg)
    except (ValueError, ImportError, OSError) as e:  # user mistakes, bad files, full disks: one line, no traceback
        sys.exit(f"train_glue.py: error: {' '.join(str(e).split())}")


if __name__ == "__main__":
    main()
