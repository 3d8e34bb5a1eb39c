"""The GLUE study at the paper's schedules (issue 14): LoRA² against LoRA, AdaLoRA and full \
fine-tuning.

    python experiments/study.py --plan                       # the runs in priority order, their
                                                               steps and estimates
    python experiments/study.py --prepare .device/paper      # fp16 backbone + GLUE files to carry
                                                               (50 MiB)
    # on the GPU machine (carrying .device/paper), one call of at most 10 minutes, as often as
      needed:
    python3 experiments/study.py --device cuda --gpus 2 --jobs 16 --compile --time_limit 540 \
        --no_report --model .device/paper/model --data_dir .device/paper/glue \
        --pack $OUT/paper.tar.gz
    python experiments/study.py --unpack .../paper.tar.gz    # here: the finished runs into
                                                               experiments/runs/paper/
    python experiments/study.py --report_only                # RESULTS.md + results.png from the
                                                               committed JSONs
    python experiments/study.py --quick --model DIR --data_dir DIR        # a tiny CPU plan in
                                                                            seconds (the tests)

The plan is task × configuration × seed, every run `train_glue.py --preset paper` (SPEC §5: the
paper's epochs, lr, warm-up, t_i, t_f, mask interval, γ, dropout, weight decay, batch 32) with the
configuration's flags on top, 3 seeds (the baselines: `experiments/baselines.py --method M --preset
paper`; a run is one process of its script).
Runs go in priority order, so a study cut short by the device time holds the most important runs:
  1. CoLA and RTE: LoRA² k=8 and LoRA r=8 (the issue's must-haves)
  2. CoLA and RTE: LoRA² k=1, AdaLoRA, full fine-tuning
  3. QNLI (a fixed split of dev.tsv: non-standard): the five methods
  4. SST-2, capped (`--epochs sst2=E`, default 2 of the paper's 24 epochs; warm-up, t_i and t_f stay
     the preset's fractions of T, the mask interval shrinks with T)
  5. ablations of LoRA² k=8 on CoLA and RTE: γ = 0, no pruning, importance on all factors, the
     paper's init
Each run is one train_glue.py process writing experiments/runs/paper/<run-id>/ (metrics.json,
log.txt, and study_run.json: status, times, GPU). A run whose metrics.json exists is skipped, so a
rerun continues the study. With --time_limit a run starts only if it is estimated to end in time
(speeds measured from the running runs' logs), and the runs still going then are stopped. Runs save
train_state.pt every 10 % of their steps and always start with --resume: a stopped run continues
from its checkpoint in the next invocation on the same machine (--detach keeps a study going across
calls of a warm machine), or on a fresh one when `--pack_states` carried its checkpoint back
(5.6–7.7 MiB for an adapter run). A failed run is logged and reported, never fatal.

The study at base size (issue 29), `--backbone mpnet`: MPNet-base (all-mpnet-base-v2, 12 layers,
width 768) through train_glue.py's --hf, every run with --pooling mean (the checkpoint's pooling),
the five methods in three parts (1. CoLA and RTE, 2. QNLI, 3. SST-2 capped; no ablations), runs in
experiments/runs/mpnet/, RESULTS.md's section "Base size". Its float16 weights (209 MiB) travel to
one GPU in four pieces (experiments/mpnet.py), one per call, into /root/mpnet outside the working
tree, which a warm machine keeps between calls; each call must come within 30 s of the last:

    python experiments/mpnet.py prepare --data_dir $GLUE_DIR  # .device/mpnet: pieces, SHA256SUMS
    # calls 1, 2, 3 (N = 1, 2, 3), carry [".device/mpnet/mpnet.tar.gz.N"]:
    mkdir -p /root/mpnet && mv .device/mpnet/mpnet.tar.gz.N /root/mpnet/ && ls -l /root/mpnet
    # call 4, carry [".device/mpnet/mpnet.tar.gz.4"]: join, check the sha256, unpack, load the model
    mkdir -p /root/mpnet && mv .device/mpnet/mpnet.tar.gz.4 /root/mpnet/ && cd /root/mpnet && \
        for p in mpnet.tar.gz.1 mpnet.tar.gz.2 mpnet.tar.gz.3 mpnet.tar.gz.4; do test -f $p || \
        { echo "$p is missing: the machine was given back; start again at the first call"; \
        exit 1; }; done && cat mpnet.tar.gz.1 mpnet.tar.gz.2 mpnet.tar.gz.3 mpnet.tar.gz.4 \
        > mpnet.tar.gz && \
        echo "9724f3da4ee37aa338fec2901b09ac94772b8985ffac949bb03b3c1f2c347306  mpnet.tar.gz" | \
        sha256sum -c - && tar -xzf mpnet.tar.gz && rm mpnet.tar.gz mpnet.tar.gz.1 \
        mpnet.tar.gz.2 mpnet.tar.gz.3 mpnet.tar.gz.4 && cd - > /dev/null && \
        python3 experiments/mpnet.py check /root/mpnet/model
    # the study (nvidia-h100-x1; on an H200 --task_jobs rte=4), detached: it runs on between calls
    python3 experiments/study.py --backbone mpnet --device cuda --gpus 1 --jobs 6 --task_jobs \
        rte=2 --compile --model /root/mpnet/model --data_dir /root/mpnet/glue --out \
        /root/mpnet/runs --no_report --detach --wait 540 --pack $OUT/mpnet.tar.gz
    python3 experiments/study.py --backbone mpnet --out /root/mpnet/runs --no_run --wait 540 \
        --pack $OUT/mpnet.tar.gz                        # the next calls, until the study ends
    python experiments/study.py --backbone mpnet --unpack .../mpnet.tar.gz   # here, after each
(`python experiments/mpnet.py calls` prints the four calls as one line each; the archive is the
same bytes at every prepare from the same GLUE files, 205,339,450 bytes in pieces of 49.0 MiB.)
--task_jobs caps the RTE runs side by side: up to 320 tokens, an RTE run holds many times the GPU
memory of a CoLA run (a CUDA graph per length bucket); the progress lines show the GPU's memory.
The runs folder stays outside the working tree, which each call replaces; on a fresh machine, copy
the runs finished so far into it first (`mkdir -p /root/mpnet/runs && cp -rn
experiments/runs/mpnet/. /root/mpnet/runs/`).
"""
import argparse
import dataclasses
import hashlib
import json
import math
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent  # experiments/: RESULTS.md, results.png, runs/
ROOT = HERE.parent                       # the repository: train_glue.py, lora2.py, bert.py
TRAIN_SCRIPT = ROOT / "train_glue.py"      # LoRA² runs
BASELINES_SCRIPT = HERE / "baselines.py"   # the others: --method lora, adalora, full
sys.path.insert(0, str(ROOT))
import bert  # noqa: E402
import formats  # noqa: E402
import glue  # noqa: E402
import train_glue  # noqa: E402
from experiments import baselines  # noqa: E402
from rundir import fmt_time  # noqa: E402

# task: {lr, epochs, max_len, r, target_rank, alpha, t_i, t_f, ...} (SPEC §5)
PAPER = train_glue.PAPER
OLD_STUDY = HERE / "runs" / "study"      # the 200-step study of issue 6: the appendix
atomic_write = formats.atomic_write


def paper(task, key):
    return PAPER[task][key]


def paper_steps(task):
    """T of the paper's schedule: its epochs over the full training set in batches of 32 (as
    train_glue's preset)."""
    return paper(task, "epochs") * math.ceil(glue.TASKS[task].train_size / 32)


# --------------------------------------------------------------------------------------------------
# the plan


@dataclass(frozen=True)
class Config:
    """One configuration: train_glue.py flags on top of `--preset paper`. A value "r" means the
    task's preset r."""
    name: str          # part of the run-id
    label: str         # as printed in RESULTS.md
    flags: tuple       # ((flag, value), ...), --method included
    ablation: bool = False

    def arg(self, key):
        return dict(self.flags).get(key)

    def resolved(self, task):
        return {k: (paper(task, "r") if v == "r" else v) for k, v in self.flags}


# pinned, not defaults
LORA2 = (("method", "lora2"), ("init", "orthogonal"), ("scored", "inner"), ("cross", 0.0))
FULL_LR = 5e-5

CONFIGS = [
    Config("lora2-k8", "LoRA² k=8", LORA2 + (("k", 8),)),
    Config("lora-r8", "LoRA r=8", (("method", "lora"), ("r", 8))),
    Config("lora2-k1", "LoRA² k=1", LORA2 + (("k", 1),)),
    Config("adalora", "AdaLoRA", (("method", "adalora"),)),
    Config("full", "Full FT", (("method", "full"), ("lr", FULL_LR))),
    Config("lora2-k8-gamma0", "LoRA² k=8, γ = 0 (no regulariser)",
           LORA2 + (("k", 8), ("gamma", 0.0)), True),
    Config("lora2-k8-noprune", "LoRA² k=8, no pruning (target rank = r)",
           LORA2 + (("k", 8), ("target_rank", "r")), True),
    Config("lora2-k8-scoredall", "LoRA² k=8, importance on all factors",
           LORA2[:2] + (("scored", "all"),) + LORA2[3:] + (("k", 8),), True),
    Config("lora2-k8-paperinit", "LoRA² k=8, the paper's init N(0, 0.02²)",
           (("method", "lora2"), ("init", "paper")) + LORA2[2:] + (("k", 8),), True),
]


@dataclass(frozen=True)
class Backbone:
    """What a study fine-tunes: the checkpoint folder (study.py --model) goes to train_glue.py's
    --hf (transformers) or --model (bert.py's BERT), with the backbone's flags after the preset."""
    name: str           # --backbone
    label: str          # as RESULTS.md names it
    about: str          # what it is, in RESULTS.md
    folder: str         # its runs folder under experiments/runs/
    hf: bool = False
    flags: tuple = ()   # ((flag, value), ...) of every run, after --preset paper


MINILM = Backbone("minilm", "MiniLM-L6", "the packaged all-MiniLM-L6-v2: 6 layers, width 384",
                  "paper")
MPNET = Backbone("mpnet", "MPNet-base", "all-mpnet-base-v2: 12 layers, width 768", "mpnet", hf=True,
                 flags=(("pooling", "mean"),))  # how sentence-transformers trained the checkpoint
BACKBONES = {b.name: b for b in (MINILM, MPNET)}


@dataclass(frozen=True)
class Part:
    """A group of runs in the priority order: every task × configuration of it, for every seed."""
    name: str
    tasks: tuple
    configs: tuple


@dataclass
class Plan:
    tasks: dict                 # task -> extra train_glue.py flags (QNLI: the dev split)
    epochs: dict                # task -> epochs when not the paper's (the cap)
    configs: list               # [Config]
    parts: list                 # [Part], in priority order
    seeds: list
    # flags of every run on top of the preset (--quick: tiny batches)
    common: dict = field(default_factory=dict)
    evals: int = 20             # evaluations per run (--eval_every = steps // evals)
    saves: int = 10             # train_state.pt checkpoints per run (--save_every = steps // saves)
    logs: int = 50              # progress lines per run
    batch: int = 32
    backbone: Backbone = MINILM

    def config(self, name):
        return next(c for c in self.configs if c.name == name)


MAIN = ("lora2-k8", "lora-r8", "lora2-k1", "adalora", "full")
ABLATIONS = ("lora2-k8-gamma0", "lora2-k8-noprune", "lora2-k8-scoredall", "lora2-k8-paperinit")


def full_plan(epochs=None):
    """The study of issue 14; epochs: {task: epochs} overriding the paper's (default: SST-2 capped
    at 2 of 24)."""
    return Plan(
        tasks={"cola": {}, "rte": {}, "qnli": {"dev_split": 0.3}, "sst2": {}},
        epochs={"sst2": 2, **(epochs or {})}, configs=list(CONFIGS),
        parts=[Part("must-have: CoLA, RTE × LoRA² k=8, LoRA r=8", ("cola", "rte"),
                    ("lora2-k8", "lora-r8")),
               Part("CoLA, RTE × LoRA² k=1, AdaLoRA, full FT", ("cola", "rte"),
                    ("lora2-k1", "adalora", "full")),
               Part("QNLI × the five methods", ("qnli",), MAIN),
               Part("SST-2 (capped) × the five methods", ("sst2",), MAIN),
               Part("ablations of LoRA² k=8 on CoLA, RTE", ("cola", "rte"), ABLATIONS)],
        seeds=[0, 1, 2])


def quick_plan(epochs=None):
    """A tiny plan for CI (8 runs): RTE and QNLI's dev split of the tests' synthetic files, 2 epochs
    of batch 4, two seeds; the full plan's configurations, a few of them."""
    plan = full_plan()
    return Plan(
        tasks={"rte": {}, "qnli": {"dev_split": 0.5}},
        epochs={"rte": 2, "qnli": 2, **(epochs or {})},
        configs=[plan.config(n) for n in ("lora2-k8", "lora-r8", "full", "lora2-k8-gamma0")],
        parts=[Part("must-have: RTE × LoRA² k=8, LoRA r=8", ("rte",), ("lora2-k8", "lora-r8")),
               Part("QNLI × full FT", ("qnli",), ("full",)),
               Part("ablation on RTE", ("rte",), ("lora2-k8-gamma0",))],
        seeds=[0, 1], common={"batch_size": 4, "max_len": 16}, evals=2, saves=2, logs=2, batch=4)


def mpnet_plan(epochs=None):
    """The study at base size (issue 29): MPNet-base through --hf with mean pooling, the five
    methods of full_plan on its tasks, no ablations. CoLA and RTE come first, RTE and full
    fine-tuning (the longest on a GPU) first among them, then QNLI's dev split, then SST-2 capped
    as in full_plan."""
    plan = full_plan(epochs)
    first = Part("CoLA, RTE × the five methods", ("rte", "cola"),
                 ("full", "adalora", "lora2-k8", "lora-r8", "lora2-k1"))
    return Plan(tasks=plan.tasks, epochs=plan.epochs, configs=[plan.config(n) for n in MAIN],
                parts=[first, Part("QNLI × the five methods", ("qnli",), MAIN),
                       Part("SST-2 (capped) × the five methods", ("sst2",), MAIN)],
                seeds=[0, 1, 2], backbone=MPNET)


def plan_of(backbone, quick=False, epochs=None):
    """The plan of --backbone (minilm, mpnet); --quick: the MiniLM plan's tiny CI version."""
    if quick:
        return quick_plan(epochs)
    return mpnet_plan(epochs) if backbone == MPNET else full_plan(epochs)


@dataclass(frozen=True)
class Run:
    task: str
    config: Config
    seed: int
    epochs: float      # the epochs this run trains (the paper's unless capped)
    part: int          # index into plan.parts

    @property
    def capped(self):
        return self.epochs != paper(self.task, "epochs")

    @property
    def method(self):
        return self.config.arg("method")

    @property
    def script(self):
        """What trains the run: train_glue.py (LoRA², no --method), or
        experiments/baselines.py --method."""
        return TRAIN_SCRIPT if self.method == "lora2" else BASELINES_SCRIPT

    @property
    def id(self):
        return (f"{self.task}{f'-{self.epochs:g}ep' if self.capped else ''}"
                f"-{self.config.name}-s{self.seed}")

    def steps(self, n_train, batch):
        """Optimiser steps as train_glue.py computes them from --epochs (the last partial batch
        dropped)."""
        return math.ceil(self.epochs * (n_train // batch))

    def flags(self, plan, n_train):
        """The flags that fix what the run computes (checked against a finished run's
        metrics.json)."""
        steps = self.steps(n_train, plan.batch)
        interval = max(1, round(paper(self.task, "mask_interval") * steps / paper_steps(self.task)))
        flags = {"task": self.task, "preset": "paper", **dict(plan.backbone.flags), **plan.common,
                 **plan.tasks[self.task]}
        if self.capped:
            flags["epochs"] = self.epochs
        flags.update(mask_interval=interval, **self.config.resolved(self.task), seed=self.seed,
                     eval_every=max(1, steps // plan.evals))
        if self.method == "lora2":
            del flags["method"]  # train_glue.py trains LoRA² only: no --method
        return flags

    def argv(self, plan, n_train, args, folder):
        """The command line of its script: flags(), then where and how it runs (resumable,
        logged)."""
        steps = self.steps(n_train, plan.batch)
        control = {"out_dir": folder, "save_every": max(1, steps // plan.saves),
                   "log_every": max(1, steps // plan.logs), "device": args.device}
        if args.model:
            control["hf" if plan.backbone.hf else "model"] = args.model
        if args.data_dir:
            control["data_dir"] = args.data_dir
        argv = []
        for key, value in {**self.flags(plan, n_train), **control}.items():
            argv += [f"--{key}", str(value)]
        argv += ["--resume", "--no_download"] + (["--compile"] if args.compile else [])
        return argv + (args.train_args.split() if args.train_args else [])


def run_prefix(plan, task, conf):
    """The run-id without its seed: <task>[-<E>ep]-<configuration>."""
    return Run(task, conf, 0, plan.epochs.get(task, paper(task, "epochs")), 0).id.rsplit("-s", 1)[0]


def plan_runs(plan, parts=None):
    """Every run of the plan in priority order: part by part; within a part seed by seed (so a study
    cut short still has whole seeds), the longer task first."""
    runs = []
    for i, part in enumerate(plan.parts):
        if parts is not None and i + 1 not in parts:
            continue
        tasks = [t for t in part.tasks if t in plan.tasks]
        names = {c.name for c in plan.configs}
        for seed in plan.seeds:
            for task in tasks:
                for name in part.configs:
                    if name in names:
                        runs.append(Run(task, plan.config(name), seed,
                                        plan.epochs.get(task, paper(task, "epochs")), i))
    return runs


def train_sizes(plan, data_dir):
    """{task: training examples} as train_glue.py will load them (full train.tsv, or the dev
    split)."""
    sizes = {}
    for task, flags in plan.tasks.items():
        train = glue.load(task, data_dir, flags.get("dev_split")).train
        sizes[task] = len(train)
    return sizes


def constant_scores(plan, data_dir):
    """{task: the main metric of the best constant predictor on the eval set}: MCC 0, else the
    majority class share."""
    scores = {}
    for task, flags in plan.tasks.items():
        if glue.TASKS[task].metrics[0] == "mcc":
            scores[task] = 0.0
            continue
        dev = glue.load(task, data_dir, flags.get("dev_split")).dev
        labels = np.array([y for _, _, y in next(iter(dev.values()))])
        scores[task] = float(np.bincount(labels.astype(int)).max() / len(labels))
    return scores


# --------------------------------------------------------------------------------------------------
# bookkeeping


def read_json(path):
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def result_of(out, run):
    """The run's metrics.json as a dict, or None if it has not finished."""
    return read_json(out / run.id / "metrics.json")


def expected_config(run, plan, n_train):
    """The run's Config as a dict: its flags() over the preset, resolved by train_glue.parse_config
    itself (with the baselines' BaselineConfig, --method included, for a baseline run)."""
    argv = []
    for key, value in run.flags(plan, n_train).items():
        argv += [f"--{key}", str(value)]
    config = train_glue.Config if run.method == "lora2" else baselines.BaselineConfig
    return dataclasses.asdict(train_glue.parse_config(argv, config=config))


def mismatches(run, m, plan, n_train=None):
    """The settings in which a finished run's metrics.json differs from the plan (empty: it is this
    plan's run): every value the preset or the run's flags set, and the steps. Without n_train, the
    values that depend on the training set's size are left out."""
    want, bad = expected_config(run, plan, n_train or 0), []
    # runs from before --pooling read the [CLS] pooler
    args = {"pooling": "cls", **m.get("args", {})}
    keys = ((set(train_glue.paper_preset(run.task)) | set(run.flags(plan, 0)))
            - {"preset", "epochs", "steps"})
    if n_train is None:
        keys -= {"eval_every", "mask_interval"}
    for key in sorted(keys):
        if args.get(key) != want[key]:
            bad.append(f"--{key} {args.get(key)} (plan: {want[key]})")
    # LoRA² runs' args: none since train_glue.py lost --method
    method = m.get("method", args.get("method", "lora2"))
    if run.method == "lora2" and method != "lora2":  # a baseline's is among the keys
        bad.append(f"method {method} (plan: lora2)")
    if n_train is not None and m.get("steps") != run.steps(n_train, plan.batch):
        bad.append(f"{m.get('steps')} steps (plan: {run.steps(n_train, plan.batch)})")
    return bad


def check_finished(plan, out, runs, sizes):
    """Refuse to mix studies: every finished run must have been trained with this plan's flags."""
    bad = {}
    for run in runs:
        m = result_of(out, run)
        if m is not None:
            problems = mismatches(run, m, plan, sizes.get(run.task))
            if problems:
                bad[run.id] = problems
    if bad:
        lines = [f"  {k}: {', '.join(v)}" for k, v in list(bad.items())[:10]]
        raise SystemExit(f"study.py: error: {len(bad)} finished runs in {out} differ from "
                         "this plan:\n"
                         + "\n".join(lines) + "\nmove them away or use another --out")


def hardware():
    """Host, CPU count, Python and the GPUs nvidia-smi lists (none on a CPU machine), for
    RESULTS.md."""
    info = {"host": platform.node(), "cpus": os.cpu_count(), "python": platform.python_version()}
    try:
        gpus = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version",
                               "--format=csv,noheader"],
                              capture_output=True, text=True, timeout=30).stdout.strip()
        info["gpus"] = [g.strip() for g in gpus.splitlines() if g.strip()]
    except (OSError, subprocess.SubprocessError):
        info["gpus"] = []
    try:
        import torch
        info["torch"] = torch.__version__
    except ImportError:
        pass
    return info


def gpu_memory():
    """'used/total GiB' of each GPU nvidia-smi lists, for the progress lines ('' without it)."""
    try:
        text = subprocess.run(["nvidia-smi", "--query-gpu=memory.used,memory.total",
                               "--format=csv,noheader,nounits"], capture_output=True, text=True,
                              timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return ""
    cells = []
    for line in text.strip().splitlines():
        used, _, total = line.partition(",")
        try:
            cells.append(f"{float(used) / 1024:.0f}/{float(total) / 1024:.0f} GiB")
        except ValueError:  # [N/A]
            continue
    return ", ".join(cells)


def gpu_count():
    try:
        import torch
        return torch.cuda.device_count()
    except ImportError:
        return 0


# --------------------------------------------------------------------------------------------------
# speed: what the logs say, for the time limit and the progress lines

ATTEMPT = "=== study.py attempt"
PROGRESS = re.compile(r"^step\s+(\d+)/(\d+) .*\| (\d+(?:\.\d+)?) ex/s", re.M)


def last_attempt(log_text):
    return log_text.rsplit(ATTEMPT, 1)[-1]


def parse_speed(log_text, batch_size):
    """(steps, seconds) of training between the first and last progress lines of the log's last
    attempt, or None. Each line's ex/s is cumulative since the (re)start, evaluation excluded, so
    the difference leaves the first steps' warm-up (and compilation) out."""
    text = last_attempt(log_text)
    start = re.search(r"resumed from .* at step (\d+)", text)
    s_start = int(start.group(1)) if start else 0
    points = [(int(s), (int(s) - s_start) * batch_size / float(r))
              for s, _, r in PROGRESS.findall(text) if float(r) > 0 and int(s) > s_start]
    if len(points) < 2:
        return None
    (s0, t0), (s1, t1) = points[0], points[-1]
    return (s1 - s0, t1 - t0) if s1 > s0 and t1 > t0 else None


def log_step(log_text):
    """The last step a progress line of the log reports (0 if none)."""
    found = PROGRESS.findall(log_text[-20000:])
    return int(found[-1][0]) if found else 0


def read_tail(path, size=20000):
    try:
        with open(path, "rb") as f:
            f.seek(0, 2)
            f.seek(max(0, f.tell() - size))
            return f.read().decode("utf-8", errors="replace")
    except OSError:
        return ""


class Speeds:
    """Seconds per step by (task, method), measured from the logs of this invocation's runs (running
    or finished); a prior before any is measured."""

    def __init__(self, step_s, startup_s):
        self.step_s, self.startup_s = step_s, startup_s
        self.measured = {}   # run-id -> (task, method, s per step)
        # seconds a finished run spent outside its training steps (start-up, evaluation)
        self.overheads = []

    def note(self, run, log_text, batch):
        speed = parse_speed(log_text, batch)
        if speed:
            self.measured[run.id] = (run.task, run.config.arg("method"), speed[1] / speed[0])

    def per_step(self, run):
        method = run.config.arg("method")
        for same in (lambda t, m: (t, m) == (run.task, method), lambda t, m: t == run.task):
            values = [s for t, m, s in self.measured.values() if same(t, m)]
            if values:
                return float(np.median(values))
        return self.step_s

    def estimate(self, run, steps_left):
        overhead = float(np.median(self.overheads)) if self.overheads else self.startup_s
        return overhead + steps_left * self.per_step(run)


# --------------------------------------------------------------------------------------------------
# running


def run_all(runs, plan, sizes, args, out, deadline=None, speeds=None, session=None):
    """Run the unfinished runs, args.jobs at a time over args.gpus GPUs (the least busy first);
    return {run-id: status}.

    With a deadline, a run starts only if it is estimated to end before it (--partial: any run,
    while a minute or a quarter of the time limit is left); the runs still going then are stopped
    (SIGTERM, then SIGKILL) and resume from their last train_state.pt next time.
    args.task_jobs ({task: n}) caps the runs of a task side by side (GPU memory: a base-size RTE
    run holds far more than a CoLA run): the next run in order starts instead, but none of a later
    part than a run waiting for its cap (the earlier part ends first).
    Prints a line per finished run and a progress line (GPU memory too) every --progress seconds."""
    todo = [r for r in runs if result_of(out, r) is None]
    print(f"{len(runs) - len(todo)} of {len(runs)} runs already done, {len(todo)} to run",
          flush=True)
    speeds = speeds or Speeds(args.step_s, args.startup_s)
    status, running, started, last_progress = {}, {}, time.time(), time.time()
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    # each run's share of the CPU cores
    share = str(max(1, (os.cpu_count() or 1) // max(1, args.jobs)))
    env.setdefault("OMP_NUM_THREADS", share)
    # with --compile: no 32-worker pool in each of 16 runs
    env.setdefault("TORCHINDUCTOR_COMPILE_THREADS", share)
    total, n_done = len(todo), 0

    def steps_left(run):
        state = read_json(out / run.id / "study_run.json") or {}
        saved = state.get("saved_step", 0) if (out / run.id / "train_state.pt").exists() else 0
        return run.steps(sizes[run.task], plan.batch) - saved

    def finish(proc, code, note=None):
        run, log, t0, gpu = running.pop(proc)
        log.close()
        folder = out / run.id
        elapsed = time.time() - t0
        text = (folder / "log.txt").read_text(encoding="utf-8", errors="replace")
        speeds.note(run, text, plan.batch)
        m = read_json(folder / "metrics.json")
        ok = code == 0 and m is not None
        prev = read_json(folder / "study_run.json") or {}
        record = {"status": "ok" if ok else (note or f"failed (exit {code})"), "returncode": code,
                  "elapsed_s": round(elapsed, 1),
                  "elapsed_total_s": round(prev.get("elapsed_total_s", 0) + elapsed, 1),
                  "attempts": prev.get("attempts", 0) + 1, "gpu": gpu, "jobs": args.jobs,
                  "gpus": args.gpus, "part": run.part + 1, "backbone": plan.backbone.name,
                  "session": session,
                  "window_s": [round(t0 - started, 1), round(time.time() - started, 1)],
                  "finished": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()) if ok else None,
                  "command": " ".join(proc.args)}
        if ok:
            # what the run spent outside its steady steps: start-up, compilation, evaluation, the
            # report
            speed = parse_speed(text, plan.batch)
            resumed = re.search(r"resumed from .* at step (\d+)", last_attempt(text))
            done = m["steps"] - (int(resumed.group(1)) if resumed else 0)
            speeds.overheads.append(max(0.0, elapsed - done * speed[1] / speed[0]) if speed else
                                    max(0.0, elapsed - m["wall_s"]))
            for name in ("train_state.pt",):  # resumable state of a finished run: no longer needed
                (folder / name).unlink(missing_ok=True)
        else:
            step = log_step(last_attempt(text))
            save_every = max(1, run.steps(sizes[run.task], plan.batch) // plan.saves)
            record["last_step"] = step
            record["saved_step"] = max(prev.get("saved_step", 0), step // save_every * save_every) \
                if (folder / "train_state.pt").exists() else 0
        atomic_write(folder / "study_run.json", json.dumps(record, indent=1) + "\n")
        status[run.id] = record["status"]
        return run, m, ok, record

    try:
        while todo or running:
            now = time.time()
            while todo and len(running) < args.jobs:
                busy = [v[0].task for v in running.values()]
                capped = [busy.count(r.task) >= args.task_jobs.get(r.task, args.jobs) for r in todo]
                held = min((r.part for r, c in zip(todo, capped) if c), default=len(plan.parts))
                free = [r for r, c in zip(todo, capped) if not c and r.part <= held]
                pick = next((r for r in free if deadline is None
                             or now + speeds.estimate(r, steps_left(r)) <= deadline), None)
                if pick is None and free and args.partial and deadline is not None and \
                        now < deadline - min(60.0, args.time_limit / 4):
                    pick = free[0]
                if pick is None:
                    break
                todo.remove(pick)
                folder = out / pick.id
                folder.mkdir(parents=True, exist_ok=True)
                cmd = [sys.executable, str(pick.script),
                       *pick.argv(plan, sizes[pick.task], args, folder)]
                log = open(folder / "log.txt", "a")
                log.write(f"{ATTEMPT} {time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime())}: "
                          f"{' '.join(cmd)}\n")
                log.flush()
                gpu = min(range(max(1, args.gpus)),
                          key=lambda g: sum(1 for v in running.values() if v[3] == g))
                run_env = dict(env, CUDA_VISIBLE_DEVICES=str(gpu)) if args.gpus >= 1 else env
                proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=run_env,
                                        cwd=ROOT)
                running[proc] = (pick, log, time.time(), gpu if args.gpus >= 1 else None)
            if not running:
                break  # nothing left that fits before the deadline
            if deadline is not None and time.time() > deadline:
                for proc in list(running):
                    proc.terminate()
                for proc in list(running):
                    try:
                        proc.wait(timeout=10)
                    except subprocess.TimeoutExpired:
                        proc.kill()
                        proc.wait()
                    run, _, _, rec = finish(proc, proc.returncode, "stopped at the time limit")
                    print(f"stopped {run.id} at the time limit at step {rec.get('last_step')} "
                          f"(checkpoint at step {rec.get('saved_step')})", flush=True)
                break
            time.sleep(0.5)
            for proc in [p for p in running if p.poll() is not None]:
                run, m, ok, rec = finish(proc, proc.returncode)
                n_done += 1
                what = (f"{m['main_metric_name']} {m['main_metric']:.4f} at step {m['best_step']} "
                        f"of {m['steps']}" if ok else
                        f"FAILED (exit {proc.returncode}), see {out / run.id / 'log.txt'}")
                print(f"[{n_done}/{total}] {run.id}: {what} ({rec['elapsed_s']:.0f} s) | "
                      f"{len(running)} running | elapsed {fmt_time(time.time() - started)}",
                      flush=True)
            if time.time() - last_progress >= args.progress and running:
                last_progress = time.time()
                cells = []
                for proc, (run, _, t0, gpu) in running.items():
                    text = (out / run.id / "log.txt").read_text(encoding="utf-8", errors="replace")
                    speeds.note(run, text, plan.batch)
                    step = log_step(last_attempt(text))
                    cells.append(f"{run.id} {step}/{run.steps(sizes[run.task], plan.batch)}")
                left = (f", {fmt_time(deadline - time.time())} to the time limit" if deadline
                        else "")
                memory = gpu_memory() if args.gpus else ""
                memory = f"; GPU memory {memory}" if memory else ""
                print(f"-- {fmt_time(time.time() - started)}: {len(running)} running "
                      f"({'; '.join(cells)}), {len(todo)} waiting{left}{memory}", flush=True)
    except KeyboardInterrupt:
        for proc in running:
            proc.send_signal(signal.SIGINT)
        raise
    for run in todo:
        status[run.id] = "not started (time limit)"
    return status


# --------------------------------------------------------------------------------------------------
# carrying: the fp16 backbone and the data there, the results (and checkpoints) back


def to_fp16(src, dst):
    """Copy a model.safetensors with every F32 tensor cast to F16 (others unchanged); refuse values
    out of F16 range."""
    import torch
    tensors = formats.load_safetensors(src)
    for name, t in tensors.items():
        if t.dtype == torch.float32:
            biggest = float(t.abs().max()) if t.numel() else 0.0
            if biggest > 65504:
                raise ValueError(f"{src}: tensor {name!r} has |value| {biggest:g}, beyond "
                                 "float16's 65504")
            tensors[name] = t.half()
    formats.write_safetensors(tensors, dst)


def prepare(dest, model_dir, data_dir, tasks):
    """dest/model: the backbone with fp16 weights (+ config, vocab, tokenizer config); dest/glue:
    the tasks' TSVs."""
    dest, model_dir, data_dir = Path(dest), Path(model_dir), Path(data_dir)
    try:
        copy_glue(dest / "glue", data_dir, tasks)
    except FileNotFoundError as e:
        raise SystemExit(f"study.py: error: {e}") from None
    (dest / "model").mkdir(parents=True, exist_ok=True)
    for name in ("config.json", "vocab.txt", "tokenizer_config.json", "special_tokens_map.json"):
        if (model_dir / name).exists():
            shutil.copyfile(model_dir / name, dest / "model" / name)
    to_fp16(model_dir / "model.safetensors", dest / "model" / "model.safetensors")
    atomic_write(dest / "model" / "prepared_from.json",
                 json.dumps({"source": str(model_dir.resolve())}) + "\n")
    size = sum(p.stat().st_size for p in dest.rglob("*") if p.is_file())
    print(f"wrote {dest} ({size / 2**20:.1f} MiB): fp16 backbone and GLUE "
          f"{', '.join(glue.TASKS[t].dir for t in tasks)}; the working tree and the carried "
          "paths travel within 64 MiB")


def copy_glue(dest, data_dir, tasks):
    """dest/<task folder>/: each task's train.tsv and dev TSVs from data_dir, checked first (a
    missing dev file is a FileNotFoundError saying what to give)."""
    for task in tasks:
        folder, dev = glue.TASKS[task].dir, glue.TASKS[task].dev
        if not (Path(data_dir) / folder / f"{dev[0]}.tsv").exists():
            raise FileNotFoundError(f"no {Path(data_dir) / folder}/{dev[0]}.tsv to carry; give "
                                    "--data_dir or GLUE_DIR (a folder with the GLUE files)")
    for task in tasks:
        folder, dev = glue.TASKS[task].dir, glue.TASKS[task].dev
        (Path(dest) / folder).mkdir(parents=True, exist_ok=True)
        for name in ("train.tsv",) + tuple(f"{split}.tsv" for split in dev):
            if (Path(data_dir) / folder / name).exists():
                shutil.copyfile(Path(data_dir) / folder / name, Path(dest) / folder / name)


RESULT_FILES = ("metrics.json", "study_run.json", "log.txt")
MEMBER = re.compile(r"^(?:study\.json|console\.log|[A-Za-z0-9._-]+/"
                    r"(?:metrics\.json|study_run\.json|log\.txt|train_state\.pt))$")
STATE_FILE_LIMIT = 15 * 2**20  # a file back from the GPU machine is at most 16 MiB


def pack(out, path, runs, states_mb=0.0):
    """Bundle the study for the way back: study.json, console.log and every run folder's result
    files (metrics.json, study_run.json, log.txt) into `path` (a .tar.gz); with states_mb, the
    train_state.pt of unfinished runs, in plan order, up to that many MiB, into
    <path stem>.states<i>.tar files of at most 15 MiB. Returns the files written."""
    path = Path(path)
    written = [path]
    with tarfile.open(path, "w:gz") as tar:
        for name in ("study.json", "console.log"):
            if (out / name).exists():
                tar.add(out / name, arcname=name)
        for folder in sorted(p for p in out.iterdir() if p.is_dir()):
            for name in RESULT_FILES:
                if (folder / name).exists():
                    tar.add(folder / name, arcname=f"{folder.name}/{name}")
    n_states, budget, chunk, size = 0, states_mb * 2**20, [], 0
    for run in runs:
        state = out / run.id / "train_state.pt"
        if not state.exists() or result_of(out, run) is not None:
            continue
        bytes_ = state.stat().st_size
        if bytes_ > budget or bytes_ > STATE_FILE_LIMIT:
            continue
        budget -= bytes_
        if size + bytes_ > STATE_FILE_LIMIT:
            written.append(_write_states(path, len(written), chunk))
            chunk, size = [], 0
        chunk.append(state)
        size += bytes_
        n_states += 1
    if chunk:
        written.append(_write_states(path, len(written), chunk))
    finished = sum(1 for f in out.iterdir() if (f / "metrics.json").exists())
    print(f"packed {finished} finished runs into {path} ({path.stat().st_size / 2**20:.2f} MiB)"
          + (f" and {n_states} checkpoints of unfinished runs into {len(written) - 1} more files"
             if n_states else ""),
          flush=True)
    return written


def _write_states(path, i, states):
    name = path.parent / f"{path.name.split('.')[0]}.states{i}.tar"
    with tarfile.open(name, "w") as tar:
        for state in states:
            tar.add(state, arcname=f"{state.parent.name}/{state.name}")
    return name


def unpack(out, paths):
    """Restore what pack() bundled into `out`. A finished run here is never touched; study.json's
    sessions are merged (the ones already here kept); a member outside the layout (another path, a
    link) is refused."""
    out.mkdir(parents=True, exist_ok=True)
    restored = {"runs": set(), "states": 0}
    finished_here = {p.parent.name for p in out.glob("*/metrics.json")}
    for path in paths:
        with tarfile.open(path) as tar:
            for member in tar.getmembers():
                if not member.isfile() or not MEMBER.match(member.name):
                    raise ValueError(f"{path}: unexpected member {member.name!r}")
                data = tar.extractfile(member).read()
                if member.name == "study.json":
                    merge_state(out / "study.json", json.loads(data))
                    continue
                if member.name == "console.log":
                    atomic_write(out / "console.log", data)
                    continue
                run_id, name = member.name.split("/")
                if run_id in finished_here:
                    if name == "metrics.json" and \
                            (out / run_id / "metrics.json").read_bytes() != data:
                        print(f"warning: {run_id}/metrics.json differs from the one here; kept "
                              "the one here")
                    continue  # finished here already: its files stay as they are
                (out / run_id).mkdir(exist_ok=True)
                atomic_write(out / run_id / name, data)
                if name == "metrics.json":
                    restored["runs"].add(run_id)
                restored["states"] += name == "train_state.pt"
    print(f"unpacked into {out}: {len(restored['runs'])} newly finished runs, "
          f"{restored['states']} checkpoints")
    return restored


def merge_state(path, theirs):
    """study.json here, with the sessions of `theirs` that it lacks appended and its other keys
    updated."""
    mine = read_json(path) or {}
    keys = {(s.get("started"), s.get("command")) for s in mine.get("sessions", [])}
    sessions = mine.get("sessions", []) + [s for s in theirs.get("sessions", [])
                                           if (s.get("started"), s.get("command")) not in keys]
    merged = {**mine, **{k: v for k, v in theirs.items() if k != "sessions"}, "sessions": sessions}
    # a session packed while it ran, then again at its end: the later wins
    for s in theirs.get("sessions", []):
        for i, own in enumerate(merged["sessions"]):
            if (own.get("started"), own.get("command")) == \
                    (s.get("started"), s.get("command")) and \
                    s.get("wall_s", 0) > own.get("wall_s", 0):
                merged["sessions"][i] = s
    atomic_write(path, json.dumps(merged, indent=1) + "\n")


# --------------------------------------------------------------------------------------------------
# report


def verdict(a, b):
    """Compare two sets of seed scores: 'win' if every a beats every b, 'loss' if the reverse, else
    'tie'."""
    if min(a) > max(b):
        return "win"
    if max(a) < min(b):
        return "loss"
    return "tie"


# a task is learned when the median beats the constant predictor by 3 points and every seed does
LEARNED_MARGIN = 0.03


def learned(values, constant):
    return constant is None or (np.median(values) >= constant + LEARNED_MARGIN
                                and min(values) > constant)


def pct(x):
    return f"{100 * x:.1f}"


def span(v):
    return f"{pct(np.median(v))} [{pct(min(v))}–{pct(max(v))}]"


CLAIMS = [  # (id, a, b, the paper's claim as tested here)
    ("C1", "lora2-k8", "lora-r8", "LoRA² k=8 matches or beats LoRA r=8 at the same parameter "
                                  "budget"),
    ("C2", "lora2-k8", "adalora", "LoRA² k=8 matches or beats AdaLoRA at the same budget (r "
                                  "singular values pruned to the target rank on the same "
                                  "schedule)"),
    ("C3", "lora2-k1", "lora-r8", "LoRA² k=1 (1/8 of the parameters) stays comparable to LoRA r=8"),
    ("C4", "lora2-k1", "lora2-k8", "LoRA² k=1 stays comparable to LoRA² k=8"),
    ("C5", "lora2-k8", "lora2-k8-scoredall", "Scoring only λ and the inner factors (≈99 % fewer "
                                            "scores) costs nothing against scoring all "
                                            "factors"),
    ("A1", "lora2-k8", "lora2-k8-gamma0", "The orthogonality regulariser (γ of the preset) does "
                                         "not hurt: LoRA² k=8 matches or beats γ = 0"),
    ("A2", "lora2-k8", "lora2-k8-noprune", "Pruning to the target rank does not hurt: LoRA² k=8 "
                                          "matches or beats no pruning"),
    ("A3", "lora2-k8-paperinit", "lora2-k8", "The paper's N(0, 0.02²) init matches this "
                                            "project's orthogonal init (the default here)"),
]


def compare(plan, results, constants, a, b):
    """Per task where both configurations have runs: (task, a's scores, b's scores, verdict, Δ of
    the medians in points, why the task is not counted or None). Counted: >= 2 seeds each, both
    learned."""
    rows = []
    for task in plan.tasks:
        va = [m["main_metric"] for m in results.get((task, a), [])]
        vb = [m["main_metric"] for m in results.get((task, b), [])]
        if not va or not vb:
            continue
        c = constants.get(task)
        why = None
        if min(len(va), len(vb)) < 2:
            why = "fewer than 2 seeds"
        elif not (learned(va, c) and learned(vb, c)):
            why = "not learned by both"
        rows.append((task, va, vb, verdict(va, vb), 100 * (np.median(va) - np.median(vb)), why))
    return rows


def judge(plan, results, constants, a, b):
    """(verdict, [per-task detail]) of 'a matches or beats b': *holds* when a loses (seed ranges
    apart) on no task that both learned, *does not hold here* when it loses on one, *cannot tell*
    when no task has both with >= 2 seeds and learned."""
    rows = compare(plan, results, constants, a, b)
    cells = [f"{task}: {span(va)} vs {span(vb)}, n={len(va)}/{len(vb)} → {v} (Δ {delta:+.1f})"
             + (f" — not counted: {why}" if why else "") for task, va, vb, v, delta, why in rows]
    counted = [v for *_, v, _, why in rows if why is None]
    if not counted:
        return "cannot tell", cells
    return ("does not hold here" if "loss" in counted else "holds"), cells


def collect(plan, out, runs):
    """{(task, config name): [metrics dicts]} of the finished runs, {run-id: Run} of the others."""
    results, missing = {}, {}
    for run in runs:
        m = result_of(out, run)
        if m is None:
            missing[run.id] = run
        else:
            results.setdefault((run.task, run.config.name), []).append(m)
    return results, missing


HAND_START, HAND_END = "<!-- hand-written: start -->", "<!-- hand-written: end -->"


def hand_written(path):
    """The block between HAND_START and HAND_END of an existing report (kept when the report is
    rewritten)."""
    text = Path(path).read_text(encoding="utf-8") if Path(path).exists() else ""
    if HAND_START in text and HAND_END in text.split(HAND_START, 1)[1]:
        return HAND_START + text.split(HAND_START, 1)[1].split(HAND_END, 1)[0] + HAND_END
    return None


def rel(path):
    """A path as RESULTS.md shows it: relative to the repository when inside it."""
    try:
        return str(Path(path).resolve().relative_to(ROOT))
    except ValueError:
        return str(path)


def schedule_note(plan, task, m):
    """How a task's runs relate to the paper's schedule, from a finished run's metrics.json."""
    e_paper, steps, n = paper(task, "epochs"), m["steps"], m["train_size"]
    epochs = plan.epochs.get(task, e_paper)
    what = (f"the paper's {e_paper} epochs" if epochs == e_paper
            else f"{epochs:g} of the paper's {e_paper} epochs")
    if m.get("non_standard_split"):
        return (f"{what} over a {n:,}-example split of dev.tsv = {steps:,} steps (the paper's T is "
                f"{paper_steps(task):,} steps over {glue.TASKS[task].train_size:,} examples; "
                "NON-STANDARD split, not comparable to published numbers; mask interval scaled "
                "with T)")
    if epochs != e_paper:
        return (f"CAPPED at {what} = {steps:,} of {paper_steps(task):,} steps (warm-up, t_i and "
                "t_f the preset's fractions of T; mask interval scaled with T)")
    return f"{what} = {steps:,} steps"


OLD_ORDER = ("full", "lora-r8", "lora-r1", "adalora-b8", "adalora-b2", "lora2-k8", "lora2-k1",
             "lora2-k8-gamma0", "lora2-k8-cross", "lora2-k8-scoredall", "lora2-k8-noprune",
             "lora2-k8-paperinit")


def appendix(old_dir):
    """Lines of the short-budget appendix: the 200-step study of issue 6, read from its metrics.json
    files (its grid runs: per configuration the learning rate its sweep chose, i.e. the one with
    runs on every task and seed)."""
    by = {}  # config -> lr -> task -> [scores]
    for path in sorted(Path(old_dir).glob("*/metrics.json")):
        found = re.match(r"^(cola|sst2|rte|qnli)-(.+)-lr([^-]+)-s\d+$", path.parent.name)
        m = read_json(path)
        if found and m:
            task, conf, lr = found.groups()
            by.setdefault(conf, {}).setdefault(lr, {}).setdefault(task, []).append(m["main_metric"])
    if not by:
        return []
    tasks = ("cola", "sst2", "rte", "qnli")
    L = ["## Appendix: the 200-step study (short budget)", "",
         "The study this one replaces (issue 6): every method 200 optimiser steps of batch 32 "
         "(0.75–2.6 epochs; 20–250× shorter than the paper's schedules), max length 128, one lr "
         "per method family from a 4-point sweep on SST-2, the metric of the final step, a subset "
         "of 8,000 SST-2 examples, QNLI on a 70/30 split of dev.tsv. Median [min–max] over 3 seeds "
         f"× 100, from `{rel(old_dir)}/*/metrics.json`. At this budget no method learned CoLA "
         "(MCC 0) or RTE (around the 52.7 % majority class): its verdicts were verdicts on "
         "under-trained models.", "", "| configuration | lr | " + " | ".join(tasks) + " |",
         "|---|---|" + "---|" * len(tasks)]
    for conf in sorted(by, key=lambda c: (OLD_ORDER.index(c) if c in OLD_ORDER
                                          else len(OLD_ORDER), c)):
        lr, per_task = max(by[conf].items(), key=lambda kv: sum(len(v) for v in kv[1].values()))
        L.append(f"| {conf} | {lr} | " + " | ".join(span(per_task[t]) if t in per_task else "—"
                                                    for t in tasks) + " |")
    return L + [""]


@dataclass
class Study:
    """What the report reads of one study: plan, runs folder, study.json, the finished runs."""
    plan: Plan
    out: Path
    state: dict
    runs: list          # every Run of the plan, in order
    results: dict       # (task, configuration name) -> [metrics.json dicts]
    missing: dict       # run-id -> Run, the unfinished ones
    constants: dict     # task -> the constant predictor's score
    every: list         # [(Run, metrics.json dict)] of the finished runs, in plan order


def gather(plan, out, data_dir=None):
    """The Study of `plan` in `out`; constant predictors from the GLUE data, else study.json's."""
    state = read_json(out / "study.json") or {}
    runs = plan_runs(plan)
    results, missing = collect(plan, out, runs)
    constants = dict(state.get("constant_scores", {}))
    try:
        constants.update(constant_scores(plan, data_dir))
    except (FileNotFoundError, ValueError):
        pass  # no data here: the study's own record of them (study.json), if any
    every = [(run, result_of(out, run)) for run in runs if result_of(out, run) is not None]
    return Study(plan, out, state, runs, results, missing, constants, every)


def report(plan, out, results_md, png, data_dir=None, quick=False, base_out=None):
    """RESULTS.md from the metrics.json files: the MiniLM study with the base-size section, `plan`'s
    runs read from `out`, the other backbone's from its folder (--quick: the quick plan alone)."""
    if quick:
        return write_report(plan, out, results_md, png, data_dir, quick=True)
    folders = {MINILM: HERE / "runs" / MINILM.folder,
               MPNET: Path(base_out) if base_out else HERE / "runs" / MPNET.folder}
    folders[plan.backbone] = out
    plans = {b: plan if b == plan.backbone else plan_of(b, epochs=recorded_epochs(folders[b]))
             for b in (MINILM, MPNET)}
    write_report(plans[MINILM], folders[MINILM], results_md, png, data_dir,
                 base=(plans[MPNET], folders[MPNET]))


def write_report(plan, out, results_md, png, data_dir=None, quick=False, base=None):
    """RESULTS.md (keeping its hand-written block) and `png` for the study of `plan` in `out`; with
    base = (plan, runs folder) of the base-size study, its section, its figure (<png>-mpnet) and the
    verdicts of both side by side."""
    st = gather(plan, out, data_dir)
    other = gather(*base, data_dir) if base else None
    other_png = png.with_name(f"{png.stem}-{MPNET.name}{png.suffix}")
    L = ["# Does LoRA² deliver? GLUE at the paper's schedules", "",
         "Generated by `experiments/study.py` from the runs' `metrics.json` under "
         f"`{rel(out)}/<run-id>/` (`python experiments/study.py "
         f"--report_only{' --quick' if quick else ''}` rewrites this file and `{png.name}`, "
         "keeping the hand-written block). A score is a run's `main_metric` × 100: its best dev "
         f"evaluation at the final budget (evaluated every 1/{plan.evals} of the run; LoRA² and "
         "AdaLoRA from the first step of the final phase T − t_f on, LoRA and full fine-tuning "
         "from any evaluation, their budget being fixed). Median [min–max] over seeds.", ""]
    if other:
        b = other.plan.backbone
        L += [f"Two backbones. Every figure from \"Progress\" to \"Every run\", and `{png.name}`, "
              f"is from {plan.backbone.label} ({plan.backbone.about}; runs under `{rel(out)}/`); "
              f"the section \"Base size: {b.label}\" and `{other_png.name}` are from {b.label} "
              f"({b.about}; runs under `{rel(other.out)}/`). \"The claims on both backbones\" sets "
              "their verdicts side by side.", ""]
    L += progress_lines(st, "##") + claims_lines(st, "##", png)
    hand = hand_written(results_md)
    if hand:
        L += [hand, ""]
    if other:
        L += both_lines(st, other)
    L += task_lines(st, "##") + setup_lines(st, "##")
    L += missing_lines(st, "##") + every_lines(st, "##")
    L += ["## Reproduce", "",
          "On a machine with the GLUE files (`GLUE_DIR`) and the packaged MiniLM; each GPU call "
          "carries `.device/paper` and ends within 10 minutes; a rerun skips the finished "
          "runs:", "",
          "```",
          "python experiments/study.py --plan                       # the runs, in order, with "
          "estimates",
          "python experiments/study.py --prepare .device/paper      # fp16 backbone + GLUE files "
          "(50 MiB)",
          "# on the GPU machine (nvidia-h200-x2), as many calls as it takes:",
          "python3 experiments/study.py --device cuda --gpus 2 --jobs 16 --compile --time_limit "
          "540 --no_report \\",
          "    --model .device/paper/model --data_dir .device/paper/glue --pack $OUT/paper.tar.gz",
          "# here, after each call:",
          "python experiments/study.py --unpack paper.tar.gz        # the finished runs into "
          "experiments/runs/paper/",
          "python experiments/study.py --report_only                # this file and results.png",
          "```", ""]
    L += commands_lines(st)
    if other:
        L += base_lines(other, other_png)
    L += appendix(OLD_STUDY) if not quick else []
    atomic_write(results_md, "\n".join(L))
    print(f"wrote {results_md}")
    plot(plan, st.results, st.constants, png)
    if other and other.results:
        plot(other.plan, other.results, other.constants, other_png)


def progress_lines(st, h):
    """The progress table: per part the finished and planned runs, steps, run time, when."""
    L = [f"{h} Progress", "",
         "| part | finished | planned | steps per run | summed run time | when "
         "(session: first start – last end) |", "|---|---|---|---|---|---|"]
    for i, part in enumerate(st.plan.parts):
        done = [m for r, m in st.every if r.part == i]
        steps = sorted({m["steps"] for m in done})
        windows = {}
        for r, _ in st.every:
            rec = read_json(st.out / r.id / "study_run.json") or {}
            if r.part == i and rec.get("window_s"):
                lo, hi = windows.get(rec.get("session"), (math.inf, 0))
                windows[rec.get("session")] = (min(lo, rec["window_s"][0]),
                                               max(hi, rec["window_s"][1]))
        when = "; ".join(f"{k}: {fmt_time(lo)} – {fmt_time(hi)}"
                         for k, (lo, hi) in sorted(windows.items()))
        L.append(f"| {i + 1}. {part.name} | {len(done)} | {sum(1 for r in st.runs if r.part == i)} "
                 f"| {', '.join(f'{s:,}' for s in steps) or '—'} | "
                 f"{fmt_time(sum(m['wall_s'] for m in done))} | {when or '—'} |")
    return L + ["", "Summed run time: the runs' training time (`wall_s`, evaluation excluded; "
                "several runs share a GPU). When: seconds since the start of the session "
                "(`study.json`) in which the part's finished runs ran (their last attempt).", ""]


def claims_lines(st, h, png):
    """The claims (CLAIMS) whose configurations the plan has: verdicts, numbers; the figure."""
    L = [f"{h} The paper's claims", "",
         "Per task: *win* / *loss* when the seed ranges of the two do not overlap, *tie* when they "
         "do; Δ is the difference of the medians in points. A claim *holds* when it loses on no "
         "task that both sides learned (median ≥ the constant predictor + "
         f"{100 * LEARNED_MARGIN:.0f} points and every seed above it) with at least 2 seeds each, "
         "*does not hold here* when it loses on one, and *cannot tell* without such a task. With 3 "
         "seeds a *tie* is a weak test of *matches*: read the Δ and ranges beside it.", "",
         "| | claim | verdict | numbers (median [min–max], first vs second) |", "|---|---|---|---|"]
    names = {c.name for c in st.plan.configs}
    for cid, a, b, claim in CLAIMS:
        if a in names and b in names:
            v, cells = judge(st.plan, st.results, st.constants, a, b)
            L.append(f"| {cid} | {claim} | **{v}** | {'; '.join(cells) or 'not run yet'} |")
    L.append("")
    if st.results:
        L += [f"![Score against trainable adapter parameters, per task]({png.name})", "",
              f"`{png.name}`: median and min–max over seeds against the adapter's trainable "
              "parameters (log scale); ablations grey and nudged right, LoRA r=8 nudged left of "
              "LoRA² k=8 (almost the same budget); dashed: the constant predictor.", ""]
    return L


def both_lines(st, other):
    """The claims side by side: per backbone the verdict and, per task, Δ and its verdict."""
    def cell(s, a, b):
        if not {a, b} <= {c.name for c in s.plan.configs}:
            return "not in its plan"
        rows = compare(s.plan, s.results, s.constants, a, b)
        if not rows:
            return "not run yet"
        return f"**{judge(s.plan, s.results, s.constants, a, b)[0]}**: " + ", ".join(
            f"{task} {delta:+.1f} {v}{'*' if why else ''}" for task, _, _, v, delta, why in rows)
    first, second = st.plan.backbone, other.plan.backbone
    L = ["## The claims on both backbones", "",
         "The verdict on each claim on each backbone (the rule of \"The paper's claims\"), and per "
         "task the difference of the medians in points with its verdict (* the task is not "
         f"counted: fewer than 2 seeds each, or not learned by both). {first.label} from "
         f"`{rel(st.out)}/`, {second.label} from `{rel(other.out)}/`; the base-size plan has no "
         "ablations.", "",
         f"| | claim | {first.label} ({first.about}) | {second.label} ({second.about}) |",
         "|---|---|---|---|"]
    for cid, a, b, claim in CLAIMS:
        L.append(f"| {cid} | {claim} | {cell(st, a, b)} | {cell(other, a, b)} |")
    return L + [""]


def task_lines(st, h):
    """Per task: the schedule, a row per configuration (parameters, steps, seeds, scores, time)."""
    L = [f"{h} Results per task", ""]
    for task in st.plan.tasks:
        rows = [(c, st.results.get((task, c.name))) for c in st.plan.configs]
        rows = [(c, ms) for c, ms in rows if ms]
        c = st.constants.get(task)
        head = f"{h}# {task} ({glue.TASKS[task].metrics[0]}"
        if c is not None:
            head += f"; constant predictor {pct(c)}"
        L += [head + ")", ""]
        if not rows:
            L += ["Not run yet.", ""]
            continue
        L += [f"Schedule: {schedule_note(st.plan, task, rows[0][1][0])}.", "",
              "| configuration | adapter params | head params | steps | seeds | median | min–max | "
              "learned | wall per run (median) | runs |",
              "|---|---|---|---|---|---|---|---|---|---|"]
        for conf, ms in rows:
            v = [m["main_metric"] for m in ms]
            ok = "yes" if learned(v, c) and c is not None else ("?" if c is None else "no")
            glob = f"{rel(st.out)}/{run_prefix(st.plan, task, conf)}-s*/"
            L.append(f"| {conf.label} | {ms[0]['adapter_params']:,} | {ms[0]['head_params']:,} | "
                     f"{ms[0]['steps']:,} | {len(v)} | {pct(np.median(v))} | "
                     f"{pct(min(v))}–{pct(max(v))} | {ok} | "
                     f"{fmt_time(np.median([m['wall_s'] for m in ms]))} | `{glob}` |")
        L.append("")
    return L


def method_lines(plan):
    """The Setup's lines on what every run and each method trains."""
    preset = "--preset paper" + "".join(f" --{k} {v}" for k, v in plan.backbone.flags)
    common = (f"- Every run: `train_glue.py {preset}` (SPEC §5: batch 32, importance EMAs β₁ = "
              "β₂ = 0.85; AdamW with torch's defaults otherwise, linear warm-up then decay to 0, "
              "clipping 1.0), then the configuration's flags; ")
    seeds = (f"- Seeds {', '.join(map(str, plan.seeds))} (initialisation, dropout, data order); "
             "the paper reports one seed per task (6, RTE 4), the AdaLoRA table the mean of 5.")
    adalora = ("- AdaLoRA: PEFT AdaLoRA at LoRA²'s budget and schedule: init_r = the preset's r, "
               "target_r = its target rank, t_i, t_f, mask interval, γ (orth_reg_weight) and lr of "
               "the preset; it trains r(d_in + d_out) + r parameters per matrix, fewer than LoRA "
               "r=8 where r = 4 (CoLA, RTE).")
    if plan.backbone.hf:
        targets = ("adapters on attention.attn.q, k, v and o (query, key, value, attention "
                   "output), intermediate.dense and output.dense of every layer; the head (a "
                   "classifier on the mean of the last hidden states over the real tokens) trained "
                   "by every method and counted apart.")
        lora = ("- LoRA r=8: PEFT LoRA on the same six matrices, α of the preset (so s = α/8), the "
                "preset's lr, no dropout (the MiniLM study's choices).")
        full = (f"- Full fine-tuning: lr {FULL_LR:g} (the MiniLM study's: the upper end of the "
                "usual 2e-5..5e-5 for BERT-base-size encoders), the rest of the preset.")
        return [common + targets, seeds, lora, adalora, full, ""]
    targets = ("adapters on query, key, value, attention.output, intermediate and output of every "
               "layer; the head (pooler + classifier) trained by every method and counted apart.")
    lora = ("- LoRA r=8: PEFT LoRA, α of the preset (so s = α/8), the preset's lr (8e-4 to 1.2e-3, "
            "the range where LoRA trained best in the 200-step sweep: 1e-3 won, 5e-3 diverged), no "
            "dropout.")
    full = (f"- Full fine-tuning: lr {FULL_LR:g} (the upper end of the usual 2e-5..5e-5 for "
            "BERT-size encoders; the small MiniLM preferred larger lrs in the 200-step sweep, and "
            "the long schedules argue against going beyond), the rest of the preset.")
    ablations = ("- Ablations: flags on top of LoRA² k=8: `--gamma 0`; `--target_rank r` (the "
                 "preset's r: nothing pruned); `--scored all`; `--init paper`.")
    return [common + targets, seeds, lora, adalora, full, ablations, ""]


def backbone_line(st):
    """The Setup's first line: the backbone's folder and size (from a finished run), its dtype."""
    info, m = st.state.get("model", {}), st.every[0][1]
    size = m["total_params"] - (0 if m.get("method") == "full" else m["adapter_params"])
    if st.plan.backbone.hf:
        path, what, how = (info.get("path") or m["args"].get("hf"), "transformers' MPNet through "
                           "`--hf`, without its [CLS] pooler", "`experiments/mpnet.py prepare`")
    else:
        path, what, how = (info.get("path") or m["args"].get("model") or "the packaged "
                           "all-MiniLM-L6-v2", "BERT through `bert.py`", "`study.py --prepare`")
    line = (f"- Backbone: `{path}`, {size:,} parameters with a 2-way head ({what}), instead of the "
            "paper's DeBERTaV3-base (184M).")
    if is_fp16(info):
        line += (f" Its weights travelled as float16 ({how}) and load into float32; training used "
                 "bf16 autocast on CUDA.")
    return line


def setup_lines(st, h):
    """The backbone, what the runs and methods train, the hyperparameters, configurations,
    deviations, the sessions and the code they ran."""
    plan, sessions = st.plan, st.state.get("sessions", [])
    L = [f"{h} Setup", ""] + ([backbone_line(st)] if st.every else []) + method_lines(plan)
    hp = {}
    for run, m in st.every:
        hp.setdefault(run.task, m)
    if hp:
        L += ["Hyperparameters per task, as the runs recorded them (`args` of metrics.json; t_i, "
              "t_f and warm-up in steps of this schedule):", "",
              "| task | train examples | epochs | steps | lr | max len | r | target rank | α | t_i "
              "| t_f | mask every | γ | warm-up | cls dropout | wd | eval every |",
              "|---" * 17 + "|"]
        for task, m in hp.items():
            a, T = m["args"], m["steps"]
            lrs = sorted({mm["args"]["lr"] for c in plan.configs
                          for mm in st.results.get((task, c.name), []) if mm["method"] != "full"})
            L.append(f"| {task} | {m['train_size']:,} | "
                     f"{T / max(1, m['train_size'] // a['batch_size']):g} | {T:,} | "
                     f"{', '.join(f'{x:g}' for x in lrs)} | {a['max_len']} | {a['r']} | "
                     f"{a['target_rank']} | {a['alpha']} | {round(a['init_warmup'] * T)} | "
                     f"{round(a['final_warmup'] * T)} | {a['mask_interval']} | {a['gamma']} | "
                     f"{round(a['warmup'] * T)} | {a['classifier_dropout']} | {a['weight_decay']} "
                     f"| {a['eval_every']} |")
        L.append("")
    preset = "--preset paper" + "".join(f" --{k} {v}" for k, v in plan.backbone.flags)
    L += [f"Configurations (flags on top of `{preset}`):", "", "| configuration | flags |",
          "|---|---|"]
    for conf in plan.configs:
        L.append(f"| {conf.label} | `{' '.join(f'--{k} {v}' for k, v in conf.flags)}` |")
    L += ["", "Deviations from the paper:", ""] + [f"- {line}" for line in deviations(plan)] + [""]
    if not sessions:
        return L
    L += ["Sessions (`study.json`; device time is what the sessions took, start-up of the machine "
          "excluded):", "", "| # | started | hardware | jobs | wall | runs finished | command |",
          "|---|---|---|---|---|---|---|"]
    for i, s in enumerate(sessions):
        hw = s.get("hardware", {})
        gpus = hw.get("gpus") or []
        what = f"{len(gpus)}× {gpus[0].split(',')[0]}" if gpus else "CPU"
        what += f", {hw.get('cpus', '?')} cores"
        n_fin = sum(1 for r, _ in st.every
                    if (read_json(st.out / r.id / "study_run.json") or {}).get("session") == i)
        L.append(f"| {i} | {s.get('started', '?')} | {what} | {s.get('jobs', '?')} | "
                 f"{fmt_time(s.get('wall_s', 0))} | {n_fin} | `{s.get('command', '')}` |")
    L.append("")
    code = sessions[0].get("code", {})
    commit = code_commit(code, sessions[0].get("started"))
    if commit and all(s.get("code") == code for s in sessions):
        names = list(code)
        files = ", ".join(names[:-1]) + " and " + names[-1] if len(names) > 1 else names[0]
        L += [f"Code: every session ran the files of commit `{commit}` (the sha256 of {files} "
              "recorded in `study.json` match it). The code has changed since; these figures "
              "describe that commit.", ""]
    return L


def missing_lines(st, h):
    """The planned runs without a metrics.json: not run yet (per part), or why they stopped."""
    L = [f"{h} Not run or failed", ""]
    if not st.missing:
        return L + ["- nothing: every planned run finished.", ""]
    for i, part in enumerate(st.plan.parts):
        gone = [(run_id, run) for run_id, run in st.missing.items() if run.part == i]
        if gone and not any((st.out / run_id / "study_run.json").exists() for run_id, _ in gone):
            L.append(f"- part {i + 1} ({part.name}): {len(gone)} of its runs not run yet")
            continue
        for run_id, run in gone:
            rec = read_json(st.out / run_id / "study_run.json")
            why = (f"{rec['status']} (attempts {rec.get('attempts')}, last at step "
                   f"{rec.get('last_step', '?')}), see "
                   f"`{rel(st.out / run_id / 'log.txt')}`") if rec \
                else "not run yet"
            L.append(f"- `{run_id}` (part {run.part + 1}): {why}")
    return L + [""]


def every_lines(st, h):
    """A row per finished run: score, best step, steps, kept singular values, wall time, session."""
    L = [f"{h} Every run", "",
         "| run-id | score | best step | steps | kept singular values | wall | "
         "session |", "|---|---|---|---|---|---|---|"]
    for run, m in st.every:
        rec = read_json(st.out / run.id / "study_run.json") or {}
        kept = ("—" if run.config.arg("method") in ("full", "lora")
                else m.get("kept_singular_values", ""))
        L.append(f"| `{run.id}` | {pct(m['main_metric'])} | {m['best_step']:,} | {m['steps']:,} | "
                 f"{kept} | {fmt_time(m['wall_s'])} | {rec.get('session', '?')} |")
    return L + [""]


def commands_lines(st):
    """The command of every session (study.json)."""
    sessions = st.state.get("sessions", [])
    if not sessions:
        return []
    commands = [f"- `{s['command']}`" for s in sessions]
    return ["The sessions behind these numbers ran:", ""] + commands + [""]


MPNET_REPRODUCE = [
    "```",
    "python experiments/mpnet.py prepare --data_dir $GLUE_DIR   # .device/mpnet: 4 pieces",
    "python experiments/mpnet.py calls                          # the 4 carry calls",
    "# then on one GPU (nvidia-h100-x1; nvidia-h200: --task_jobs rte=4), each call within the warm",
    "# window of the last; the study runs detached between the calls:",
    "python3 experiments/study.py --backbone mpnet --device cuda --gpus 1 --jobs 6 \\",
    "    --task_jobs rte=2 --compile --model /root/mpnet/model --data_dir /root/mpnet/glue \\",
    "    --out /root/mpnet/runs --no_report --detach --wait 540 --pack $OUT/mpnet.tar.gz",
    "python3 experiments/study.py --backbone mpnet --out /root/mpnet/runs --no_run --wait 540 \\",
    "    --pack $OUT/mpnet.tar.gz                                 # as often as it takes",
    "# a fresh machine (the last one went back): the 4 carry calls, then first",
    "mkdir -p /root/mpnet/runs && cp -rn experiments/runs/mpnet/. /root/mpnet/runs/",
    "# here, after each call (its pack holds every run finished so far):",
    "python experiments/study.py --backbone mpnet --unpack mpnet.tar.gz  # experiments/runs/mpnet",
    "python experiments/study.py --report_only                            # this file",
    "```", ""]


def base_lines(st, png):
    """The base-size study's section: what it is, then as the main study one heading level down
    (progress, claims, per task, setup, missing, every run), or that it has not run."""
    b, plan = st.plan.backbone, st.plan
    L = [f"## Base size: {b.label}", "",
         f"The same study on a base-size encoder: {b.label} ({b.about}, 12 heads, MLP 3072; "
         "transformers' MPNet through `--hf`), its classifier on the mean of the last hidden "
         "states over the real tokens, as the checkpoint was trained (sentence-transformers' mean "
         "pooling). Like MiniLM it is a sentence-embedding checkpoint, trained on sentence pairs "
         "with NLI and QQP data among them, so its numbers compare methods on one backbone: they "
         "are not DeBERTaV3-base numbers. The plan: the five methods of the MiniLM study on its "
         f"tasks at the paper's schedules (SST-2 capped as there), {len(plan.seeds)} seeds, no "
         "ablations. Every figure of this section is from the runs' `metrics.json` under "
         f"`{rel(st.out)}/<run-id>/`.", ""]
    if not st.every:
        L += ["**The base-size study has not run**: no run of its plan has finished (no "
              f"`metrics.json` under `{rel(st.out)}/`), so this file holds no {b.label} figure. "
              f"Its {len(st.runs)} runs, in order:", ""]
        L += [f"{i + 1}. {part.name}: {sum(1 for r in st.runs if r.part == i)} runs"
              for i, part in enumerate(plan.parts)]
        return L + ["", "### Reproduce", ""] + MPNET_REPRODUCE
    L += progress_lines(st, "###") + claims_lines(st, "###", png) + task_lines(st, "###")
    L += setup_lines(st, "###") + missing_lines(st, "###") + every_lines(st, "###")
    return L + ["### Reproduce", ""] + MPNET_REPRODUCE + commands_lines(st)


def code_commit(code, before=None):
    """The newest commit (short hash) before `before` (a session's start) whose files have the
    sha256 prefixes the session recorded in "code" ({file name: prefix}); None if no commit does or
    there is no git history."""
    paths = {name: f"experiments/{name}" if name in ("study.py", "baselines.py") else name
             for name in code}
    try:
        revs = subprocess.run(["git", "rev-list", "HEAD"]
                              + ([f"--before={before}"] if before else []), cwd=ROOT,
                              capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        return None
    for rev in revs.stdout.split():
        if all(hashlib.sha256(subprocess.run(["git", "show", f"{rev}:{path}"], cwd=ROOT,
                                             capture_output=True).stdout)
               .hexdigest()[:12] == code[name] for name, path in paths.items()):
            return rev[:7]
    return None


def deviations(plan):
    lines = ["One small backbone (the packaged all-MiniLM-L6-v2: 6 layers, width 384, 22.7M "
             "parameters) instead of DeBERTaV3-base (184M): absolute scores are far below the "
             "paper's; the claims are relative.",
             f"The score is the best of {plan.evals} dev evaluations per run (the authors' trainer "
             "also evaluates periodically and keeps the best); for LoRA² and AdaLoRA only those of "
             "the final phase count.",
             "Three seeds (0, 1, 2) per configuration, the same for every method, instead of the "
             "paper's one seed per task (6; RTE 4)."]
    for task, flags in plan.tasks.items():
        if "dev_split" in flags:
            lines.append(f"{task}: no train.tsv in this copy of GLUE: train and eval are a fixed "
                         f"{1 - flags['dev_split']:.0%}/{flags['dev_split']:.0%} split of dev.tsv "
                         "(non-standard); the paper's epochs over it give far fewer steps than the "
                         "paper's T, and the mask interval shrinks in proportion.")
    for task, e in plan.epochs.items():
        if task in plan.tasks and e != paper(task, "epochs") and \
                "dev_split" not in plan.tasks[task]:
            lines.append(f"{task}: capped at {e:g} of the paper's {paper(task, 'epochs')} epochs "
                         "to fit the device time (the longest that fitted): `--preset paper "
                         "--epochs E` keeps warm-up, t_i and t_f the preset's fractions of T, and "
                         "the study scales the mask interval with T (round(paper's interval × T / "
                         "T_paper)), so the number of masking events stays the paper's.")
    return lines


def is_fp16(info):
    """Whether model_info() saw float16 weights (integer buffers such as position_ids aside)."""
    dtypes = set(info.get("dtypes", []))
    return "F16" in dtypes and not dtypes & {"F32", "BF16", "F64"}


def model_info(model_dir):
    """{"path", "dtypes"} of the backbone's model.safetensors, for the report."""
    path = Path(model_dir) if model_dir else _packaged_model()
    try:
        tensors = formats.load_safetensors(path / "model.safetensors")
    except (OSError, ValueError):
        return {"path": str(path)}
    names = {v: k for k, v in formats.SAFETENSORS_DTYPES.items()}
    source = (read_json(path / "prepared_from.json") or {}).get("source")
    return {"path": str(model_dir or path),
            "dtypes": sorted({names[t.dtype] for t in tensors.values()}),
            **({"source": source} if source else {})}


def _packaged_model():
    return bert.default_model_dir(install=False)


COLORS = {"lora2-k8": "tab:red", "lora2-k1": "salmon", "lora-r8": "tab:blue",
          "adalora": "tab:orange", "full": "black"}
MARKERS = {"lora2": "D", "lora": "o", "adalora": "^", "full": "s"}


def plot(plan, results, constants, png):
    """Score (median, min–max over seeds) against trainable adapter parameters, log-x, one panel per
    task; ablations grey, nudged right (LoRA r=8 slightly left) to be seen; the constant predictor
    dashed."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"matplotlib is not installed: {png} not written")
        return
    tasks = [t for t in plan.tasks if any(k[0] == t for k in results)]
    if not tasks:
        print(f"no finished runs: {png} not written")
        return
    ncols = min(2, len(tasks))
    nrows = math.ceil(len(tasks) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(6.2 * ncols, 4.2 * nrows), squeeze=False)
    handles = {}
    ablations = [c.name for c in plan.configs if c.ablation]
    for ax, task in zip(axes.flat, tasks):
        for conf in plan.configs:
            ms = results.get((task, conf.name))
            if not ms:
                continue
            v = np.array([m["main_metric"] for m in ms]) * 100
            if conf.ablation:
                j = ablations.index(conf.name)
                color, marker, nudge = "dimgrey", "v<>ph*"[j % 6], 1.09 ** (j + 1)
            else:
                color, marker = COLORS.get(conf.name, "tab:green"), MARKERS[conf.arg("method")]
                # beside LoRA² k=8, at almost the same budget
                nudge = 0.92 if conf.name == "lora-r8" else 1.0
            x, med = ms[0]["adapter_params"] * nudge, np.median(v)
            h = ax.errorbar([x], [med], yerr=[[med - v.min()], [v.max() - med]], fmt=marker,
                            capsize=3, color=color, mfc=color if not conf.ablation else "white",
                            ms=7, label=conf.label)
            handles.setdefault(conf.label, h)
        if constants.get(task) is not None:
            h = ax.axhline(100 * constants[task], color="grey", ls="--", lw=0.8,
                           label="constant predictor")
            handles.setdefault("constant predictor", h)
        m = next(m for (t, _), ms in results.items() if t == task for m in ms)
        ax.set_xscale("log")
        ax.set_xlabel("trainable adapter parameters (head excluded)")
        ax.set_ylabel(f"{m['main_metric_name']} × 100")
        note = " (non-standard split)" if m.get("non_standard_split") else (
            f" ({plan.epochs[task]:g} of {paper(task, 'epochs')} epochs)" if task in plan.epochs
            and plan.epochs[task] != paper(task, "epochs") else "")
        ax.set_title(f"{task}{note}: median, min–max over seeds", fontsize=10)
        ax.grid(alpha=0.3)
    for ax in axes.flat[len(tasks):]:
        ax.axis("off")
    fig.legend(list(handles.values()), list(handles), loc="lower center", ncol=4, fontsize=8,
               frameon=False)
    fig.tight_layout(rect=(0, 0.04 + 0.03 * math.ceil(len(handles) / 4) / nrows, 1, 1))
    tmp = png.with_name(png.stem + ".tmp.png")
    fig.savefig(tmp, dpi=120)
    os.replace(tmp, png)
    plt.close(fig)
    print(f"wrote {png}")


# --------------------------------------------------------------------------------------------------
# main


def parse_epochs(text):
    """'sst2=2,qnli=5' -> {'sst2': 2.0, 'qnli': 5.0}."""
    out = {}
    for item in filter(None, (text or "").split(",")):
        task, _, value = item.partition("=")
        try:
            out[task.strip()] = float(value)
        except ValueError:
            raise SystemExit(f"study.py: error: --epochs wants TASK=EPOCHS[,...], "
                             f"got {text!r}") from None
        if task.strip() not in PAPER or out[task.strip()] <= 0:
            raise SystemExit(f"study.py: error: --epochs {item!r}: unknown task or epochs <= 0")
    return out


def build_parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument_group("what to do (default: run the plan)")
    a.add_argument("--plan", action="store_true", help="print the runs in order with steps and "
                   "estimates, then stop")
    a.add_argument("--prepare", metavar="DIR", help="write an fp16 copy of --model and the tasks' "
                   "GLUE files into DIR")
    a.add_argument("--report_only", action="store_true", help="only rewrite RESULTS.md and the PNG "
                   "from the JSONs")
    a.add_argument("--unpack", nargs="+", metavar="FILE", help="restore what --pack bundled into "
                   "--out, then stop")
    a.add_argument("--pack", metavar="FILE", help="after running (or with --no_run: now), bundle "
                   "the finished runs' files into FILE (.tar.gz) for the way back")
    a.add_argument("--pack_states", type=float, default=0, metavar="MIB", help="with --pack: also "
                   "bundle the train_state.pt of unfinished runs, up to MIB in all (files of at "
                   "most 15 MiB beside FILE); they must travel back with the runs folder (carry "
                   "experiments/runs/paper)")
    a.add_argument("--no_run", action="store_true", help="do not run (with --pack / --wait)")
    a.add_argument("--detach", action="store_true", help="run the study in a new process session "
                   "(it survives the command that started it; its output goes to "
                   "<out>/console.log), then --wait / --pack")
    a.add_argument("--wait", type=float, default=0, metavar="S", help="wait up to S seconds for a "
                   "detached study of --out to end (printing its progress), then --pack")
    w = p.add_argument_group("the plan")
    w.add_argument("--backbone", default="minilm", choices=tuple(BACKBONES),
                   help="minilm: the packaged MiniLM-L6 (bert.py); mpnet: the study at base size, "
                        "MPNet-base through --hf with mean pooling (--model: the folder "
                        "experiments/mpnet.py prepare writes)")
    w.add_argument("--quick", action="store_true", help="a tiny plan for CI (CPU, seconds)")
    w.add_argument("--tasks", help="comma-separated subset of the plan's tasks")
    w.add_argument("--parts", help="comma-separated part numbers to run "
                   "(1-5; default all, in order)")
    w.add_argument("--epochs", help="TASK=EPOCHS[,...]: train these tasks for fewer epochs than "
                   "the paper (default: the caps recorded in <out>/study.json, else sst2=2)")
    w.add_argument("--seeds", help="comma-separated seeds (default 0,1,2)")
    w.add_argument("--configs", help="comma-separated subset of the configurations "
                   "(e.g. lora2-k8,lora-r8)")
    r = p.add_argument_group("running")
    r.add_argument("--model", help="BERT checkpoint folder for train_glue.py (default: its "
                   "packaged MiniLM)")
    r.add_argument("--data_dir", help="GLUE folder (default: $GLUE_DIR, as train_glue.py)")
    r.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    r.add_argument("--gpus", default="auto", help="spread the runs over this many GPUs "
                   "(CUDA_VISIBLE_DEVICES per run, the least busy first); auto: every GPU "
                   "torch sees")
    r.add_argument("--jobs", default="auto", help="runs side by side in all "
                   "(auto: 8 per GPU, else 1)")
    r.add_argument("--task_jobs", help="TASK=N[,...]: at most N runs of TASK side by side "
                   "(GPU memory)")
    r.add_argument("--time_limit", type=float, default=0, help="seconds; stop the runs still going "
                   "at time_limit minus --reserve (they resume next time), start none estimated to "
                   "end later (0: no limit)")
    r.add_argument("--reserve", type=float, default=20, help="seconds kept free before "
                   "--time_limit for stopping, packing and the report")
    r.add_argument("--partial", action="store_true", help="with --time_limit: also start runs that "
                   "will not finish (they checkpoint and resume next time: with --detach, or with "
                   "--pack_states)")
    r.add_argument("--step_s", type=float, default=None, help="prior seconds per step before any "
                   "is measured (default on CUDA 0.08, with --compile 0.02; on CPU 0.5)")
    r.add_argument("--startup_s", type=float, default=40, help="prior seconds a run spends outside "
                   "its steps")
    r.add_argument("--compile", action="store_true", help="forward --compile to train_glue.py")
    r.add_argument("--train_args", help="more train_glue.py flags for every run, "
                   "e.g. '--pooling cls' (recorded)")
    r.add_argument("--progress", type=float, default=60, help="seconds between progress lines")
    o = p.add_argument_group("output")
    o.add_argument("--out", help="runs folder (default experiments/runs/paper, --backbone mpnet: "
                   "experiments/runs/mpnet; --quick: experiments/runs/paper-quick)")
    o.add_argument("--base_out", help="the base-size study's runs folder that the report reads "
                   "(default experiments/runs/mpnet)")
    o.add_argument("--results", help="report path (default experiments/RESULTS.md; --quick: "
                   "<out>/RESULTS.md)")
    o.add_argument("--png", help="figure path (default results.png next to the report)")
    o.add_argument("--no_report", action="store_true", help="do not write the report after running")
    return p


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    backbone = BACKBONES[args.backbone]
    if args.quick and backbone != MINILM:
        raise SystemExit("study.py: error: --quick is the MiniLM plan's CI version; drop "
                         "--backbone mpnet")
    folder = "paper-quick" if args.quick else backbone.folder
    out = Path(args.out) if args.out else HERE / "runs" / folder
    # the caps are part of the plan: without --epochs, the ones the study in --out recorded
    epochs = parse_epochs(args.epochs) if args.epochs else recorded_epochs(out)
    plan = plan_of(backbone, args.quick, epochs)
    whole = plan_of(backbone, args.quick, epochs)  # the report covers the whole plan
    if args.tasks:
        unknown = set(args.tasks.split(",")) - set(plan.tasks)
        if unknown:
            raise SystemExit(f"study.py: error: --tasks {sorted(unknown)} not in the plan's "
                             f"{sorted(plan.tasks)}")
        plan.tasks = {t: f for t, f in plan.tasks.items() if t in args.tasks.split(",")}
    if args.seeds:
        plan.seeds = [int(s) for s in args.seeds.split(",")]
    if args.configs:
        unknown = set(args.configs.split(",")) - {c.name for c in plan.configs}
        if unknown:
            raise SystemExit(f"study.py: error: --configs {sorted(unknown)} not in the plan's "
                             f"{[c.name for c in plan.configs]}")
        plan.configs = [c for c in plan.configs if c.name in args.configs.split(",")]
    parts = [int(x) for x in args.parts.split(",")] if args.parts else None
    results_md = Path(args.results) if args.results else (out / "RESULTS.md" if args.quick
                                                          else HERE / "RESULTS.md")
    png = Path(args.png) if args.png else results_md.with_name("results.png")
    data_dir = args.data_dir or os.environ.get("GLUE_DIR") or "glue_data"
    args.task_jobs = parse_task_jobs(args.task_jobs)

    if args.prepare:
        if backbone.hf:
            raise SystemExit("study.py: error: --prepare copies bert.py checkpoints; for "
                             "--backbone mpnet run python experiments/mpnet.py prepare")
        prepare(args.prepare, args.model or _packaged_model(), data_dir, plan.tasks)
        return 0
    if args.unpack:
        unpack(out, [Path(p) for p in args.unpack])
        return 0
    if args.report_only:
        report(whole, out, results_md, png, data_dir, args.quick, args.base_out)
        return 0

    gpus = (gpu_count() if args.device != "cpu" else 0) if args.gpus == "auto" else int(args.gpus)
    args.gpus = gpus
    args.jobs = (8 * gpus if gpus else 1) if args.jobs == "auto" else int(args.jobs)
    if args.step_s is None:
        args.step_s = (0.02 if args.compile else 0.08) if gpus else 0.5
    runs = plan_runs(plan, parts)

    if args.plan:
        return print_plan(plan, runs, data_dir, out, args)
    if args.compile and "compile" not in {f.name for f in dataclasses.fields(train_glue.Config)}:
        raise SystemExit("study.py: error: --compile: this train_glue.py has no --compile flag yet")
    if not args.no_run:
        check_model(backbone, args.model)

    out.mkdir(parents=True, exist_ok=True)
    if args.detach and not args.no_run:
        child = [a for a in argv if a not in ("--detach",)]
        child = strip_option(strip_option(strip_option(child, "--pack"), "--wait"), "--pack_states")
        with open(out / "console.log", "a") as log:
            proc = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), *child],
                                    stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    start_new_session=True, cwd=os.getcwd(),
                                    env=dict(os.environ, PYTHONUNBUFFERED="1"))
        print(f"started the study in the background (pid {proc.pid}, output in "
              f"{out / 'console.log'})", flush=True)
        if args.wait:
            wait_for(out, args.wait, args.progress, proc)
        if args.pack:
            pack(out, args.pack, runs, args.pack_states)
        return 0
    code = 0
    if not args.no_run:
        try:
            code = run_study(plan, runs, args, argv, out, data_dir, results_md, png, whole)
        finally:
            if args.pack:
                pack(out, args.pack, runs, args.pack_states)
        return code
    if args.wait:
        wait_for(out, args.wait, args.progress)
    if args.pack:
        pack(out, args.pack, runs, args.pack_states)
    return code


def recorded_epochs(out):
    """The caps the study in `out` recorded (study.json), or None."""
    return (read_json(Path(out) / "study.json") or {}).get("epochs")


def parse_task_jobs(text):
    """'rte=3,qnli=4' -> {'rte': 3, 'qnli': 4}."""
    caps = {}
    for item in filter(None, (text or "").split(",")):
        task, _, value = item.partition("=")
        if task.strip() not in PAPER or not value.strip().isdigit() or int(value) < 1:
            raise SystemExit("study.py: error: --task_jobs wants TASK=N[,...] with N >= 1, got "
                             f"{item!r}")
        caps[task.strip()] = int(value)
    return caps


def check_model(backbone, model):
    """A one-line error before any run when --model cannot be the backbone's folder."""
    if backbone.hf and not model:
        raise SystemExit("study.py: error: --backbone mpnet needs --model DIR, the MPNet folder "
                         "that python experiments/mpnet.py prepare writes (.device/mpnet/model "
                         "here; /root/mpnet/model on the GPU machine)")
    if model and not (Path(model) / "config.json").is_file():
        raise SystemExit(f"study.py: error: --model {model}: no config.json there; give the "
                         "backbone's checkpoint folder")


def strip_option(argv, name):
    """argv without `name` and its value (either '--name value' or '--name=value')."""
    result, skip = [], False
    for a in argv:
        if skip:
            skip = False
            continue
        if a == name:
            skip = True
            continue
        if a.startswith(name + "="):
            continue
        result.append(a)
    return result


def wait_for(out, seconds, every, proc=None):
    """Wait until the study running on `out` ends (proc, or the pid in <out>/study.pid), at most
    `seconds`."""
    end, last = time.time() + seconds, 0.0
    pid_file = out / "study.pid"
    while time.time() < end:
        if proc is not None:
            if proc.poll() is not None:
                print(f"the study ended (exit {proc.returncode})", flush=True)
                break
        else:
            try:
                os.kill(int(pid_file.read_text()), 0)
            except (OSError, ValueError):
                print("the study is not running (any more)", flush=True)
                break
        if time.time() - last >= every:
            last = time.time()
            lines = read_tail(out / "console.log", 3000).strip().splitlines()
            print(f"[wait {fmt_time(time.time() - end + seconds)}] " + (lines[-1] if lines else ""),
                  flush=True)
        time.sleep(min(2.0, max(0.1, end - time.time())))
    lines = read_tail(out / "console.log", 6000).strip().splitlines()
    print("\n".join(lines[-15:]), flush=True)


def print_plan(plan, runs, data_dir, out, args):
    """The plan as a table: run-id, part, steps, status, and an estimate at --step_s with --jobs
    side by side."""
    try:
        sizes = train_sizes(plan, data_dir)
    except (FileNotFoundError, ValueError) as e:
        raise SystemExit(f"study.py: error: --plan needs the GLUE data ({e})")
    speeds = Speeds(args.step_s, args.startup_s)
    total, by_part = 0.0, {}
    print(f"{'run-id':<40} part {'steps':>7} {'est.':>7}  status")
    for run in runs:
        steps = run.steps(sizes[run.task], plan.batch)
        est = speeds.estimate(run, steps)
        done = result_of(out, run) is not None
        print(f"{run.id:<40} {run.part + 1:>4} {steps:>7,} {fmt_time(est):>7}  "
              f"{'done' if done else ''}")
        if not done:
            total += est
            by_part.setdefault(run.part, [0, 0, 0.0])
            by_part[run.part][0] += 1
            by_part[run.part][1] += steps
            by_part[run.part][2] += est
    print(f"\nat {args.step_s} s/step and {args.startup_s:.0f} s start-up per run, "
          f"{args.jobs} side by side:")
    for i, (n, steps, est) in sorted(by_part.items()):
        print(f"  part {i + 1} ({plan.parts[i].name}): {n} runs, {steps:,} steps, "
              f"~{fmt_time(est / args.jobs)}")
    print(f"  all: ~{fmt_time(total / max(1, args.jobs))} (the sum / jobs; the longest run "
          "bounds it from below)")
    return 0


CODE = ("train_glue", "lora2", "bert", "glue", "rundir", "compiled", "formats")  # the runs' code


def run_study(plan, runs, args, argv, out, data_dir, results_md, png, whole):
    started = time.time()
    deadline = started + args.time_limit - args.reserve if args.time_limit else None
    try:
        sizes = train_sizes(plan, data_dir)
    except (FileNotFoundError, ValueError) as e:
        raise SystemExit(f"study.py: error: {e}")
    check_finished(plan, out, runs, sizes)
    state = read_json(out / "study.json") or {}
    session = {"command": "python experiments/study.py " + " ".join(argv),
               "started": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(started)),
               "hardware": hardware(), "jobs": args.jobs, "gpus": args.gpus}
    session["code"] = {path.name: hashlib.sha256(path.read_bytes()).hexdigest()[:12]
                       for path in (HERE / "study.py", HERE / "baselines.py",
                                    *(ROOT / f"{name}.py" for name in CODE)) if path.exists()}
    state.setdefault("sessions", []).append(session)
    index = len(state["sessions"]) - 1
    state["backbone"] = plan.backbone.name
    state["model"] = model_info(args.model)
    state["train_sizes"] = sizes
    if state.get("epochs", plan.epochs) != plan.epochs:
        print(f"note: the study in {out} recorded the caps {state['epochs']}; this session's are "
              f"{plan.epochs}", flush=True)
    state["epochs"] = plan.epochs
    state["constant_scores"] = constant_scores(plan, data_dir)

    def save_state():
        session["wall_s"] = round(time.time() - started, 1)
        atomic_write(out / "study.json", json.dumps(state, indent=1) + "\n")

    save_state()
    atomic_write(out / "study.pid", str(os.getpid()))
    print(f"== {len(runs)} runs in {len(plan.parts)} parts, {args.jobs} side by side on "
          f"{f'{args.gpus} GPU(s)' if args.gpus else 'the CPU'}"
          + (f", time limit {args.time_limit:.0f} s" if deadline else ""), flush=True)
    try:
        statuses = run_all(runs, plan, sizes, args, out, deadline, session=index)
    finally:
        save_state()
        (out / "study.pid").unlink(missing_ok=True)
    if not args.no_report:
        report(whole, out, results_md, png, data_dir, args.quick, args.base_out)
    bad = {k: v for k, v in statuses.items() if v != "ok"}
    if bad:
        print(f"{len(bad)} runs did not finish:")
        for k, v in bad.items():
            print(f"  {k}: {v}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
