"""Fine-tune a BERT-style encoder on a GLUE task with LoRA², in one flat loop (SPEC §4).

    python train_glue.py                            # SST-2 (shipped), packaged MiniLM: < 3 min
    python train_glue.py --task rte --preset paper  # the authors' RTE hyperparameters (SPEC §5)
    torchrun --nproc_per_node=2 train_glue.py       # DDP: gloo on CPU, nccl on GPU

Top to bottom: the configuration (every field a flag), helpers, the method (LoRA2: lora2.inject,
lora2.Pruner, lora2.orthogonal_regularizer), then train() and its loop in SPEC §4's order. Not here:
data (glue.py), the backbone (bert.py), the run's folder and report (rundir.py), --compile and
--precision (compiled.py).
"""
import contextlib
import dataclasses
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist

import bert
import compiled
import glue
import lora2
import rundir

# --------------------------------------------------------------------------------------------------
# configuration: every field is a flag (--name value); its help text is its comment


RULES = {">= 0": lambda v: v >= 0, ">= 1": lambda v: v >= 1, ">= 8": lambda v: v >= 8,
         "> 0": lambda v: v > 0, "in [0, 1)": lambda v: 0 <= v < 1,
         "in (0, 1)": lambda v: 0 < v < 1, "in [0, 2**32)": lambda v: 0 <= v < 2 ** 32}


def _opt(default, help, choices=None, rule=None):
    return field(default=default, metadata={"help": help, "choices": choices, "rule": rule})


@dataclass
class Config:
    # data
    task: str = _opt("sst2", "GLUE task", tuple(glue.TASKS))
    data_dir: Optional[str] = _opt(None, "GLUE folder (default: $GLUE_DIR, else ./glue_data)")
    no_download: bool = _opt(False, "never fetch a missing task from the GLUE archives")
    train_size: Optional[int] = _opt(0, "train on a fixed random subset of N (0: all)", rule=">= 0")
    eval_size: Optional[int] = _opt(None, "evaluate on a fixed random subset of N", rule=">= 0")
    dev_split: Optional[float] = _opt(None, "no train.tsv: this share of dev.tsv evaluates, the "
                                            "rest trains (non-standard)", rule="in (0, 1)")
    max_len: int = _opt(64, "most tokens of an example (a batch pads to its longest)", rule=">= 8")
    length_groups: int = _opt(64, "sort runs of N batches by length, to pad less", rule=">= 1")
    # model
    model: Optional[str] = _opt(None, "BERT checkpoint folder (default: the packaged MiniLM)")
    hf: Optional[str] = _opt(None, "a transformers model name or path instead of --model")
    dropout: Optional[float] = _opt(None, "the backbone's dropout (default: its)", rule="in [0, 1)")
    classifier_dropout: Optional[float] = _opt(None, "before the classifier (default: --dropout)",
                                               rule="in [0, 1)")
    pooling: Optional[str] = _opt(None, "the classifier's input: the mean over the tokens or [CLS] "
                                        "(default: mean; cls with --hf, --preset)", bert.POOLINGS)
    # LoRA² (lora2.py checks these)
    r: int = _opt(8, "singular values per matrix, r of (L1)")
    k: int = _opt(8, "inner width k of (L1)")
    alpha: int = _opt(16, "scaling s = alpha / r")
    target_rank: int = _opt(2, "average rank kept after pruning (L7)")
    init: str = _opt("orthogonal", "factor initialisation (SPEC §1)", lora2.INITS)
    gamma: float = _opt(0.1, "weight γ of the orthogonality regulariser (L3)", rule=">= 0")
    cross: float = _opt(0.0, "weight of the cross-plane term (L4), relative to γ", rule=">= 0")
    scored: str = _opt("inner", "importance on the inner factors (L5) or on all", lora2.SCORED)
    init_warmup: float = _opt(0.1, "t_i of (L7), a fraction of the steps", rule="in [0, 1)")
    final_warmup: float = _opt(0.3, "t_f of (L7), a fraction of the steps", rule="in [0, 1)")
    mask_interval: int = _opt(10, "mask every N steps in the cubic phase (L7, L8)")
    # optimisation
    lr: float = _opt(5e-3, "peak learning rate of AdamW", rule="> 0")
    weight_decay: float = _opt(0.01, "AdamW weight decay (not on biases, LayerNorm)", rule=">= 0")
    batch_size: int = _opt(32, "global batch size (split over DDP ranks)", rule=">= 1")
    steps: Optional[int] = _opt(None, "optimiser steps (default: QUICK_STEPS)", rule=">= 1")
    epochs: Optional[float] = _opt(None, "the steps from epochs of the training set", rule="> 0")
    warmup: float = _opt(0.06, "linear lr warm-up, a share of the steps", rule="in [0, 1)")
    clip: float = _opt(1.0, "gradient-norm clipping (0: none)", rule=">= 0")
    seed: int = _opt(0, "seed of initialisation, dropout and data order", rule="in [0, 2**32)")
    # run
    eval_every: int = _opt(0, "evaluate every N steps (0: only at the end)", rule=">= 0")
    log_every: int = _opt(100, "progress line every N steps", rule=">= 1")
    out_dir: Optional[str] = _opt(None, "output folder (default runs/<task>-lora2-s<seed>)")
    save_every: int = _opt(0, "write a resumable checkpoint every N steps (0: never)", rule=">= 0")
    resume: bool = _opt(False, "continue from <out_dir>/train_state.pt if it exists")
    overwrite: bool = _opt(False, "replace the run in --out_dir (its files go at the first step)")
    eval_only: bool = _opt(False, "only evaluate the adapter + head of --load")
    load: Optional[str] = _opt(None, "adapter.pt written by a training run (with --eval_only)")
    export_peft: Optional[str] = _opt(None, "also write the adapter as a PEFT LoRA adapter here")
    preset: Optional[str] = _opt(None, "the authors' hyperparameters (SPEC §5)", ("paper",))
    plot: bool = _opt(False, "write rank_pattern.png (needs matplotlib)")
    device: str = _opt("auto", "auto = cuda when available, else cpu", ("auto", "cpu", "cuda"))
    precision: Optional[str] = _opt("auto", "bf16 autocast or fp32 (auto: bf16 where fast)",
                                    ("auto", "fp32", "bf16"))
    compile: Optional[bool] = _opt(None, "torch.compile + CUDA graphs (default: compiled.resolve)")
    compile_backend: str = _opt("inductor", "torch.compile backend (none: CUDA graphs only)",
                                compiled.BACKENDS)
    given = frozenset()  # not a field: the flags given on the command line (for --eval_only)

    def __post_init__(self):
        """Each flag's choices and range (RULES), then the flags together; lora2 checks its own
        arguments, before any data is read."""
        for f in dataclasses.fields(self):
            value, choices, rule = getattr(self, f.name), f.metadata["choices"], f.metadata["rule"]
            if isinstance(value, float) and not math.isfinite(value):  # nan passes < and min()
                raise ValueError(f"--{f.name} must be a finite number, got {value}")
            if value is not None and (choices and value not in choices
                                      or rule and not RULES[rule](value)):
                raise ValueError(f"--{f.name} must be " + (f"one of {choices}" if choices else rule)
                                 + f", got {value!r}")
        for ok, message in [
                (self.init_warmup + self.final_warmup < 1, "--init_warmup + --final_warmup must "
                 f"sum below 1, got {self.init_warmup} + {self.final_warmup}"),
                (self.steps is None or self.epochs is None, "give --steps or --epochs, not both"),
                (not (self.resume and self.overwrite), "give --resume or --overwrite, not both"),
                (self.eval_only == bool(self.load), "--eval_only and --load PATH go together"),
                (not (self.model and self.hf), "give --model or --hf, not both")]:
            if not ok:
                raise ValueError(message)
        self.pooling = self.pooling or ("cls" if self.hf else "mean")
        exports = self.export_peft and not self.eval_only  # --eval_only: checked on the run's
        if exports and self.pooling != "cls":  # PEFT's classifier reads the [CLS] pooler
            raise ValueError(
                "--export_peft needs --pooling cls: PEFT loads the adapter onto transformers' "
                "AutoModelForSequenceClassification, which classifies from the [CLS] pooler, so a "
                "classifier on --pooling mean (the default without --hf) would predict differently "
                "there; train with --pooling cls to export")
        if exports and self.target_rank == 0 and self.prunes():
            raise ValueError("--export_peft with --target_rank 0: pruning keeps no singular value, "
                             "so there is no adapter to export; pass --target_rank 1 or more, or "
                             "drop --export_peft")
        if self.steps is not None and self.epochs is None:  # the schedule (L7) before any data
            rundir.warmup_steps(self.init_warmup, self.final_warmup, self.steps, "--steps",
                                self.prunes())

    def prunes(self):
        """Whether the method prunes on the schedule (L7), whose warm-ups must leave a phase."""
        return True


# The authors' scripts (SPEC §5, DeBERTaV3-base, batch 32, k = 8); t_i, t_f and the lr warm-up are
# in steps of the full training set (MRPC's warm-up: 0.1 of the steps), which --preset paper makes
# fractions of the run's steps.
PAPER = {
    "cola": dict(lr=8e-4, epochs=25, max_len=64, r=4, target_rank=3, alpha=32, t_i=800, t_f=3500,
                 mask_interval=10, gamma=0.1, warmup=100, classifier_dropout=0.1, weight_decay=0.0),
    "mnli": dict(lr=5e-4, epochs=7, max_len=256, r=8, target_rank=3, alpha=16, t_i=8000, t_f=50000,
                 mask_interval=100, gamma=0.1, warmup=1000, classifier_dropout=0.15,
                 weight_decay=0.0),
    "mrpc": dict(lr=1e-3, epochs=30, max_len=320, r=8, target_rank=1, alpha=32, t_i=600, t_f=1800,
                 mask_interval=1, gamma=0.1, warmup=0.1, classifier_dropout=0.0, weight_decay=0.01),
    "qnli": dict(lr=1.2e-3, epochs=5, max_len=512, r=8, target_rank=2, alpha=32, t_i=2000, t_f=8000,
                 mask_interval=100, gamma=0.1, warmup=500, classifier_dropout=0.1,
                 weight_decay=0.01),
    "qqp": dict(lr=8e-4, epochs=20, max_len=320, r=8, target_rank=3, alpha=16, t_i=8000, t_f=25000,
                mask_interval=100, gamma=0.1, warmup=2000, classifier_dropout=0.15,
                weight_decay=0.01),
    "rte": dict(lr=1.2e-3, epochs=50, max_len=320, r=4, target_rank=3, alpha=32, t_i=600, t_f=1800,
                mask_interval=1, gamma=0.3, warmup=200, classifier_dropout=0.2, weight_decay=0.01),
    "sst2": dict(lr=8e-4, epochs=24, max_len=128, r=8, target_rank=2, alpha=16, t_i=6000,
                 t_f=22000, mask_interval=100, gamma=0.1, warmup=1000, classifier_dropout=0.0,
                 weight_decay=0.01),
    "stsb": dict(lr=2.2e-3, epochs=25, max_len=128, r=4, target_rank=1, alpha=32, t_i=800, t_f=2000,
                 mask_interval=10, gamma=0.3, warmup=100, classifier_dropout=0.2, weight_decay=0.1),
}
QUICK_STEPS = {"fp32": 720, "bf16": 900}  # the quick run: what 3 min on 2 CPU cores fit (QUICKRUN)


def paper_preset(task):
    """PAPER[task] as Config values: the whole training set, its epochs, warm-ups as fractions."""
    if task not in PAPER:
        raise ValueError(f"--preset paper has no hyperparameters for {task!r}, only "
                         f"{sorted(PAPER)}")
    p = dict(PAPER[task])
    t_i, t_f, warmup = p.pop("t_i"), p.pop("t_f"), p.pop("warmup")
    T = p["epochs"] * math.ceil(glue.TASKS[task].train_size / 32)  # the authors' steps
    return dict(p, init_warmup=t_i / T, final_warmup=t_f / T, warmup=warmup if warmup < 1 else
                warmup / T, steps=None, train_size=None, k=8, batch_size=32, pooling="cls")


def parse_config(argv=None, config=Config):
    """`config` from the command line: defaults, then --preset paper, then the flags given."""
    return rundir.parse_config(config, argv, __doc__.split("\n\n")[0], {"paper": paper_preset})


# --------------------------------------------------------------------------------------------------
# helpers


def run_length(cfg, n_train, precision):
    """(optimiser steps, why): --epochs over n_train examples, else --steps, else the quick run's
    QUICK_STEPS[precision] (bf16 autocast trains faster on the CPU: the gain goes into steps)."""
    if cfg.epochs is not None:
        return math.ceil(cfg.epochs * (n_train // cfg.batch_size)), f"--epochs {cfg.epochs:g}"
    if cfg.steps is not None:
        return cfg.steps, "--steps"
    return QUICK_STEPS[precision], f"auto: {precision}"


# --------------------------------------------------------------------------------------------------
# the method: LoRA² from lora2.py (the study's baselines are classes with the same members)


class LoRA2:
    """LoRA² as train() trains it: lora2.inject on the backbone's target matrices (L1, L2), R (L3,
    L4) in the loss, the Pruner (L5)–(L8) on the schedule (L7); what checkpoints keep of it (the
    adapter with the trained head), its rank pattern, its PEFT export."""
    name = "lora2"

    def __init__(self, model, cfg, targets):  # before any data: lora2 checks r, k, alpha, init
        lora2.inject(model, targets, r=cfg.r, k=cfg.k, alpha=cfg.alpha, init=cfg.init)
        self.model, self.cfg = model, cfg

    def schedule(self, steps, t_i, t_f):  # the best checkpoint is one at the final budget b_T
        cfg = self.cfg
        self.pruner = lora2.Pruner(self.model, cfg.target_rank, steps, t_i, t_f, cfg.mask_interval,
                                   scored=cfg.scored)
        self.final_phase, self.scored_ratio = steps - t_f, self.pruner.stats()["scored_ratio"]

    def regularizer(self):
        return lora2.orthogonal_regularizer(self.model, cross=self.cfg.cross)  # R (L3, L4)

    def state(self):
        return {"adapter": lora2.adapter_state_dict(self.model)}

    def load_state(self, state):  # a checkpoint may keep the head apart
        lora2.load_adapter_state_dict(self.model, {**state["adapter"], **state.get("head", {})})

    def rank_pattern(self):
        return lora2.rank_pattern(self.model)

    def export(self, path, base):
        rundir.save_peft(self.model, path, base)

    def notes(self):
        s = self.pruner.stats()
        return [f"importance scores kept for {s['scored']:,} of {s['adapter']:,} adapter entries "
                f"({100 * s['scored_ratio']:.2f} %; AdaLoRA would score {s['adalora_scored']:,})"]


# --------------------------------------------------------------------------------------------------
# training


def train(cfg, method=LoRA2, stop_at=None):
    """Train `method` (LoRA², or a baseline of the study) per cfg: (metrics.json's summary, model).
    stop_at: stop there without the final evaluation, as a killed run would (tests)."""
    rank, world, device, started = rundir.setup_distributed(cfg.device)
    out_dir = Path(cfg.out_dir or f"runs/{cfg.task}-{method.name}-s{cfg.seed}")
    try:
        claim = rundir.claim(out_dir, cfg.resume, cfg.overwrite, cfg.export_peft)
        with claim if rank == 0 else contextlib.nullcontext():  # the folder: this run's alone
            return _train(cfg, method, out_dir, rank, world, device, stop_at)
    finally:
        if started:
            dist.destroy_process_group()


def model_and_data(cfg, method, rank, world):
    """(the method on the backbone's target matrices, pad id, task, glue.Data, train encodings and
    labels, dev encodings). The model comes first: lora2 checks its arguments before any data."""
    torch.manual_seed(cfg.seed)
    backbone, tokenize, pad_id, targets = bert.load_classifier(
        glue.TASKS[cfg.task].num_labels, cfg.model, cfg.hf, cfg.classifier_dropout, cfg.max_len,
        cfg.pooling, cfg.dropout)
    method = method(backbone, cfg, targets)
    return (method, pad_id) + glue.load_encoded(  # rank 0 fetches a missing task, the others wait
        cfg.task, tokenize, cfg.max_len, cfg.batch_size, cfg.data_dir, cfg.dev_split,
        cfg.train_size, cfg.eval_size, fetch=not cfg.no_download, rank=rank, world=world)


def _train(cfg, method, out_dir, rank, world, device, stop_at):
    if cfg.batch_size % world:
        raise ValueError(f"--batch_size {cfg.batch_size}, the global batch, must divide by {world}")
    method, pad_id, task, data, train_enc, train_y, dev_data = model_and_data(cfg, method, rank,
                                                                             world)

    # the run's length, schedule (L7), precision and compilation; AdamW; the run's bookkeeping
    precision, why_precision = compiled.resolve_precision(cfg.precision, device)
    steps, why_steps = run_length(cfg, len(data.train), precision)
    use_compile, why_compile = compiled.resolve(cfg.compile, device, world, steps)
    method.schedule(steps, *rundir.warmup_steps(cfg.init_warmup, cfg.final_warmup, steps,
                                                 why_steps, cfg.prunes()))
    cfg = dataclasses.replace(cfg, steps=steps, epochs=None, precision=precision,
                              compile=use_compile)
    model = method.model.to(device)
    optimizer, scheduler, params = rundir.adamw(model, cfg.lr, cfg.weight_decay, cfg.warmup, steps)
    net = torch.nn.parallel.DistributedDataParallel(model) if world > 1 else model
    run = rundir.Run(dataclasses.asdict(cfg), method, out_dir, rank, optimizer, scheduler, device)
    counts = lora2.count_parameters(model)
    run.start(rundir.header(task, data, method.name, counts, steps, cfg.batch_size, world, device,
                            (why_steps, precision, why_precision, use_compile, why_compile)))

    def device_step(batch, labels):  # forward → loss = task + γ·R → backward → clip → step
        with compiled.autocast(device, precision):
            logits = bert.logits(net(**batch))                    # (B / world, num_labels)
        loss_task = glue.task_loss(logits, labels)
        reg = method.regularizer()           # R: lora2.orthogonal_regularizer(model) (L3, L4)
        (loss_task + cfg.gamma * reg).backward()                 # loss = task + γ·R
        if cfg.clip:                                             # 0: no clipping
            torch.nn.utils.clip_grad_norm_(params, cfg.clip)
        optimizer.step()
        return loss_task.detach(), reg.detach()
    step = compiled.step(device_step, model, optimizer, cfg.compile_backend) if use_compile \
        else device_step
    buckets = glue.length_buckets(cfg.max_len) if use_compile else None  # compiled: a few shapes

    # the loop: optimiser step t after step t, in SPEC §4's order
    lengths, pruner, t = tuple(len(ids) for ids, _ in train_enc), method.pruner, run.global_step
    model.train()
    while t < steps:
        if stop_at is not None and t >= stop_at:
            return {"stopped_at": t}, model
        index = glue.batch_index(t, lengths, cfg.batch_size, cfg.seed, cfg.length_groups)
        index = index[rank::world]                                # this rank's share of the batch
        batch = glue.collate(train_enc, index, pad_id, device, buckets)
        loss_task, reg = step(batch, glue.to_device(train_y[index], device))
        scheduler.step()
        pruner.step(t)                                            # (L5)–(L8): this step's .grad
        optimizer.zero_grad(set_to_none=True)
        t += 1
        run.step_done(t, loss_task, reg,  # the progress line, evaluation, checkpoints
                      lambda: rundir.evaluate(model, dev_data, task, pad_id, device, precision))
    return run.report(data, counts, world, cfg.hf or cfg.model), model


# --------------------------------------------------------------------------------------------------
# --eval_only, and the command line


def main(argv=None, config=Config, method=LoRA2, script="train_glue.py"):
    """The command line: train, or --eval_only; a mistake is one line, never a traceback."""
    try:
        cfg = parse_config(argv, config)
        if cfg.eval_only:  # the saved run, evaluated on its data (and exported with --export_peft)
            rundir.evaluate_saved(cfg, method)
        else:
            train(cfg, method)
    except (ValueError, ImportError, OSError, FloatingPointError) as e:  # mistakes, bad files, full
        sys.exit(f"{script}: error: {' '.join(str(e).split())}")  # disks, a diverged run: one line


if __name__ == "__main__":
    main()
