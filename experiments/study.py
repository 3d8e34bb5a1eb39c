"""The side-by-side GLUE study: LoRA² against LoRA, AdaLoRA and full fine-tuning; one backbone, one loop.

    python experiments/study.py --prepare .device/study --data_dir ../shared/glue   # fp16 backbone + GLUE files
    python experiments/study.py --device cuda --jobs 16 --steps 200 --model .device/study/model \
        --data_dir .device/study/glue                     # lr sweep, then the grid, then RESULTS.md + results.png
    python experiments/study.py --report_only             # rewrite RESULTS.md and results.png from the runs' JSONs
    python experiments/study.py --quick --model DIR --data_dir DIR   # a tiny CPU grid in seconds (CI runs it)

Each run is one `train_glue.py` process writing <out>/<run-id>/metrics.json (and its log, log.txt). A run whose
metrics.json exists is skipped, so an interrupted study resumes; a failed run is logged and reported, never fatal.
Phases, in order: smoke (with --steps auto: every method on every task for a few steps, which also measures the speed),
sweep (learning rates per method family on one task, one seed), grid (task × configuration × seed; main methods first,
then ablations). Standard library, numpy and the project's modules; matplotlib only for the PNG.
"""
import argparse
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
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent  # experiments/: RESULTS.md, results.png, runs/
ROOT = HERE.parent                       # the repository: train_glue.py, lora2.py, bert.py
TRAIN_SCRIPT = ROOT / "train_glue.py"
sys.path.insert(0, str(ROOT))
import bert  # noqa: E402
import glue  # noqa: E402
import lora2  # noqa: E402
from rundir import fmt_time  # noqa: E402


# ----------------------------------------------------------------------------------------------------------------------
# the grid


@dataclass(frozen=True)
class Method:
    """One configuration of the grid: a train_glue.py method with its flags; lr comes from its family's sweep."""
    name: str          # short id, part of the run-id
    label: str         # as printed in RESULTS.md
    family: str        # the sweep whose learning rate it uses
    flags: tuple       # ((flag, value), ...) for train_glue.py, --method included
    group: str = "main"  # "main" or "ablation" (ablations run after every main run)

    def arg(self, key):
        return dict(self.flags).get(key)


@dataclass
class Plan:
    """Everything that fixes the study's runs (besides the swept learning rates)."""
    tasks: dict        # task -> extra train_glue.py flags (data sizes, splits)
    methods: list      # [Method], main ones first
    sweep_task: str
    sweep_lrs: dict    # family -> [lr, ...]; the family's sweep runs Method `family` itself
    seeds: list
    common: dict       # train_glue.py flags shared by every run (steps excluded)
    smoke_steps: int = 60
    step_choices: tuple = (1000, 900, 800, 700, 600, 500, 400, 300, 250, 200)


PRUNE = (("init_warmup", 0.1), ("final_warmup", 0.3), ("mask_interval", 10), ("gamma", 0.1))  # L7/L8 schedule, γ (L3)


def lora2_flags(k, *extra):
    """train_glue.py flags of LoRA² with inner width k (r = 8 singular values pruned to 2 on average), overridden by
    the (flag, value) pairs in extra."""
    base = dict((("method", "lora2"), ("r", 8), ("k", k), ("alpha", 16), ("target_rank", 2), ("init", "orthogonal"),
                 ("scored", "inner"), ("cross", 0.0)) + PRUNE)
    base.update(extra)
    return tuple(base.items())


def full_plan():
    """The grid of issue 6 (s = alpha / r = 2 for every adapter; AdaLoRA budgets are final average ranks, as in the
    AdaLoRA paper's table, starting from 1.5× as many singular values)."""
    methods = [
        Method("full", "Full FT", "full", (("method", "full"),)),
        Method("lora-r8", "LoRA r=8", "lora-r8", (("method", "lora"), ("r", 8), ("alpha", 16))),
        Method("lora-r1", "LoRA r=1", "lora-r8", (("method", "lora"), ("r", 1), ("alpha", 2),
                                                  ("target_rank", 1))),  # unused by LoRA; train_glue.py checks it <= r
        Method("adalora-b8", "AdaLoRA b=8 (init 12)", "adalora-b8",
               (("method", "adalora"), ("r", 12), ("alpha", 24), ("target_rank", 8)) + PRUNE),
        Method("adalora-b2", "AdaLoRA b=2 (init 3)", "adalora-b8",
               (("method", "adalora"), ("r", 3), ("alpha", 6), ("target_rank", 2)) + PRUNE),
        Method("lora2-k8", "LoRA² k=8", "lora2-k8", lora2_flags(8)),
        Method("lora2-k1", "LoRA² k=1", "lora2-k8", lora2_flags(1)),
        Method("lora2-k8-gamma0", "LoRA² k=8, no regulariser (γ=0)", "lora2-k8", lora2_flags(8, ("gamma", 0.0)),
               "ablation"),
        Method("lora2-k8-cross", "LoRA² k=8, cross-plane term L4 on", "lora2-k8", lora2_flags(8, ("cross", 1.0)),
               "ablation"),
        Method("lora2-k8-scoredall", "LoRA² k=8, importance on all factors", "lora2-k8",
               lora2_flags(8, ("scored", "all")), "ablation"),
        Method("lora2-k8-noprune", "LoRA² k=8, no pruning (target rank = r)", "lora2-k8",
               lora2_flags(8, ("target_rank", 8)), "ablation"),
        Method("lora2-k8-paperinit", "LoRA² k=8, paper init N(0, 0.02²)", "lora2-k8", lora2_flags(8, ("init", "paper")),
               "ablation"),
    ]
    adapter_lrs = [1e-3, 2e-3, 5e-3, 1e-2]
    return Plan(
        tasks={"cola": {"train_size": 0}, "sst2": {"train_size": 8000}, "rte": {"train_size": 0},
               "qnli": {"train_size": 0, "dev_split": 0.3}},
        methods=methods, sweep_task="sst2",
        sweep_lrs={"full": [2e-5, 5e-5, 1e-4, 2e-4], "lora-r8": adapter_lrs, "adalora-b8": adapter_lrs,
                   "lora2-k8": adapter_lrs},
        seeds=[0, 1, 2],
        common={"batch_size": 32, "max_len": 128, "warmup": 0.06, "weight_decay": 0.01, "clip": 1.0, "eval_every": 0})


def quick_plan():
    """A tiny grid for CI: one task (QNLI's dev split), LoRA² and full fine-tuning, two seeds, a two-point sweep."""
    methods = [
        Method("full", "Full FT", "full", (("method", "full"),)),
        Method("lora2-k2", "LoRA² k=2", "lora2-k2", lora2_flags(2, ("r", 4), ("alpha", 8), ("mask_interval", 1))),
    ]
    return Plan(
        tasks={"qnli": {"dev_split": 0.5, "train_size": 16, "eval_size": 16}},
        methods=methods, sweep_task="qnli", sweep_lrs={"full": [1e-3], "lora2-k2": [1e-3, 1e-2]}, seeds=[0, 1],
        common={"batch_size": 4, "max_len": 16, "eval_every": 0}, smoke_steps=4, step_choices=(8, 6, 4))


@dataclass(frozen=True)
class Run:
    phase: str         # "smoke", "sweep" or "grid"
    task: str
    method: Method
    seed: int
    lr: float
    steps: int

    @property
    def id(self):
        return f"{self.task}-{self.method.name}-lr{self.lr:g}-s{self.seed}"

    @property
    def dir_name(self):
        return f"smoke/{self.id}" if self.phase == "smoke" else self.id

    def argv(self, plan, args):
        flags = {"task": self.task, **plan.common, **plan.tasks[self.task], **dict(self.method.flags),
                 "lr": self.lr, "seed": self.seed, "steps": self.steps,
                 "log_every": max(1, self.steps // (3 if self.phase == "smoke" else 5)), "device": args.device}
        if args.model:
            flags["model"] = args.model
        if args.data_dir:
            flags["data_dir"] = args.data_dir
        argv = ["--no_download"]
        for key, value in flags.items():
            argv += [f"--{key}", str(value)]
        return argv


def method_by_name(plan, name):
    return next(m for m in plan.methods if m.name == name)


def smoke_runs(plan):
    """Every sweep family (the method that names it) on every task, a few steps, at the middle of its lr sweep."""
    return [Run("smoke", task, method_by_name(plan, fam), 0, lrs[len(lrs) // 2], plan.smoke_steps)
            for fam, lrs in plan.sweep_lrs.items() for task in plan.tasks]


def sweep_runs(plan, steps):
    return [Run("sweep", plan.sweep_task, method_by_name(plan, fam), plan.seeds[0], lr, steps)
            for fam, lrs in plan.sweep_lrs.items() for lr in lrs]


def grid_runs(plan, steps, lrs):
    """Main methods for every seed before any ablation; within a group, seed-major (all tasks and methods of one seed,
    then the next), so a study cut short still has complete seeds. Methods whose family has no lr are left out."""
    runs = []
    for group in ("main", "ablation"):
        for seed in plan.seeds:
            for method in plan.methods:
                if method.group == group and method.family in lrs:
                    runs += [Run("grid", task, method, seed, lrs[method.family], steps) for task in plan.tasks]
    return runs


# ----------------------------------------------------------------------------------------------------------------------
# bookkeeping


atomic_write = lora2.atomic_write


def read_json(path):
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def result_of(out, run):
    """The run's metrics.json as a dict, or None if it has not finished; refuses a JSON from another plan."""
    m = read_json(out / run.dir_name / "metrics.json")
    if m is not None and (m.get("steps") != run.steps or m.get("task") != run.task or m.get("seed") != run.seed):
        raise ValueError(f"{out / run.dir_name / 'metrics.json'} has task {m.get('task')}, seed {m.get('seed')}, "
                         f"{m.get('steps')} steps; this plan expects {run.task}, {run.seed}, {run.steps}: "
                         f"use another --out for a different study")
    return m


def choose_lrs(plan, out, steps):
    """{family: lr} with the best sweep score (ties: the smaller lr), and the sweep table {family: {lr: score}}."""
    table, chosen = {}, {}
    for run in sweep_runs(plan, steps):
        m = result_of(out, run)
        table.setdefault(run.method.family, {})[run.lr] = None if m is None else m["main_metric"]
    for fam, scores in table.items():
        done = {lr: s for lr, s in scores.items() if s is not None}
        if done and len(done) == len(scores):
            chosen[fam] = max(sorted(done), key=lambda lr: done[lr])
    return chosen, table


def hardware():
    """Host, CPU count, Python and the GPUs nvidia-smi lists (none on a CPU machine), for RESULTS.md."""
    info = {"host": platform.node(), "cpus": os.cpu_count(), "python": platform.python_version()}
    try:
        gpus = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"],
                              capture_output=True, text=True, timeout=30).stdout.strip()
        info["gpus"] = [g.strip() for g in gpus.splitlines() if g.strip()]
    except (OSError, subprocess.SubprocessError):
        info["gpus"] = []
    return info


# ----------------------------------------------------------------------------------------------------------------------
# running


def run_all(runs, plan, args, out, deadline=None, estimate=None, history=None):
    """Run the runs not finished yet, args.jobs at a time; return {run-id: status} for the ones attempted or skipped
    ("ok", "failed (exit N)", "killed at the time limit", "not started (time limit)").

    estimate(run) -> expected seconds; with a deadline, a run is only started if it should end before it, and runs
    still going at the deadline are killed. history: {(task, family): [seconds]} of finished runs, appended to."""
    todo = [r for r in runs if result_of(out, r) is None]
    print(f"{len(runs) - len(todo)} of {len(runs)} runs already done, {len(todo)} to run", flush=True)
    status, running, durations, started = {}, {}, [], time.time()
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // args.jobs)))
    total = len(todo)
    try:
        while todo or running:
            now = time.time()
            while todo and len(running) < args.jobs:
                run = todo[0]
                if deadline is not None and now + (estimate(run) if estimate else 0) > deadline:
                    break
                todo.pop(0)
                folder = out / run.dir_name
                folder.mkdir(parents=True, exist_ok=True)
                log = open(folder / "log.txt", "w")
                cmd = [sys.executable, str(TRAIN_SCRIPT), *run.argv(plan, args), "--out_dir", str(folder)]
                log.write(" ".join(cmd) + "\n")
                log.flush()
                gpu = min(range(args.gpus), key=lambda g: sum(1 for v in running.values() if v[3] == g))
                run_env = dict(env, CUDA_VISIBLE_DEVICES=str(gpu)) if args.gpus > 1 else env
                proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=run_env, cwd=ROOT)
                running[proc] = (run, log, time.time(), gpu)
            if deadline is not None and todo and not running:  # nothing left fits before the deadline
                break
            if deadline is not None and time.time() > deadline:
                for proc, (run, log, t0, _) in running.items():
                    proc.kill()
                    proc.wait()
                    log.close()
                    status[run.id] = "killed at the time limit"
                    atomic_write(out / run.dir_name / "study_run.json",
                                 json.dumps({"status": status[run.id], "elapsed_s": round(time.time() - t0, 2)}) + "\n")
                    print(f"killed {run.id} at the time limit", flush=True)
                running = {}
                break
            time.sleep(0.2)
            for proc in [p for p in running if p.poll() is not None]:
                run, log, t0, gpu = running.pop(proc)
                log.close()
                durations.append(time.time() - t0)
                if history is not None and proc.returncode == 0:
                    history.setdefault((run.task, run.method.family), []).append(durations[-1])
                m = read_json(out / run.dir_name / "metrics.json")
                ok = proc.returncode == 0 and m is not None
                status[run.id] = "ok" if ok else f"failed (exit {proc.returncode})"
                atomic_write(out / run.dir_name / "study_run.json", json.dumps(
                    {"status": status[run.id], "returncode": proc.returncode, "elapsed_s": round(durations[-1], 2),
                     "gpu": gpu if args.gpus > 1 else None, "command": " ".join(proc.args)}) + "\n")
                done = sum(1 for s in status.values() if s == "ok" or s.startswith("failed"))
                left = len(todo) + len(running)
                eta = np.mean(durations) * left / max(1, min(args.jobs, left)) if left else 0
                what = (f"{m['main_metric_name']} {m['main_metric']:.4f}" if ok
                        else f"FAILED (exit {proc.returncode}), see {out / run.dir_name / 'log.txt'}")
                print(f"[{done}/{total}] {run.id}: {what} ({time.time() - t0:.0f} s) | {len(running)} running | "
                      f"elapsed {fmt_time(time.time() - started)} | ETA {fmt_time(eta)}", flush=True)
    except KeyboardInterrupt:
        for proc in running:
            proc.send_signal(signal.SIGINT)
        raise
    for run in todo:
        status[run.id] = "not started (time limit)"
    return status


def parse_speed(log_text, batch_size):
    """(steps, seconds) of training between the first and last progress lines of a train_glue.py log, or None.
    Each line's ex/s is cumulative since training began, so the difference leaves the first steps' warm-up out."""
    points = [(int(s), int(s) * batch_size / float(r)) for s, r in
              re.findall(r"^step\s+(\d+)/\d+ .*\| (\d+(?:\.\d+)?) ex/s", log_text, flags=re.M) if float(r) > 0]
    if len(points) < 2:
        return None
    (s0, t0), (s1, t1) = points[0], points[-1]
    return (s1 - s0, t1 - t0) if s1 > s0 and t1 > t0 else None


def speed_table(plan, out, durations):
    """{(task, family): (overhead seconds, seconds per step)} measured on the smoke runs (all run side by side)."""
    table = {}
    for run in smoke_runs(plan):
        m = result_of(out, run)
        if m is None or run.id not in durations:
            continue
        log = (out / run.dir_name / "log.txt").read_text(encoding="utf-8", errors="replace")
        speed = parse_speed(log, plan.common.get("batch_size", 32))
        per_step = speed[1] / speed[0] if speed else m["wall_s"] / m["steps"]
        table[(run.task, run.method.family)] = (max(0.0, durations[run.id] - per_step * run.steps), per_step)
    return table


def makespan(seconds, jobs):
    """An upper bound for running tasks of these durations on `jobs` slots, greedily (Graham): sum / jobs + max."""
    return sum(seconds) / jobs + max(seconds) if seconds else 0.0


def choose_steps(plan, speeds, jobs, seconds_left):
    """The largest of plan.step_choices whose sweep + grid fits in seconds_left (else the smallest), and its estimate.
    speeds: {(task, family): (overhead s, s per step)}; a missing pair uses the slowest one measured."""
    slowest = max(speeds.values(), key=lambda v: v[0] + 500 * v[1])

    def time_of(runs, steps):
        return [speeds.get((r.task, r.method.family), slowest)[0]
                + steps * speeds.get((r.task, r.method.family), slowest)[1] for r in runs]

    for steps in plan.step_choices:
        fams = {fam: lrs[0] for fam, lrs in plan.sweep_lrs.items()}  # any lr: the sweep reuses one run per family
        sweep = sweep_runs(plan, steps)
        reused = {r.id for r in sweep}
        grid = [r for r in grid_runs(plan, steps, fams) if r.id not in reused]
        total = makespan(time_of(sweep, steps), jobs) + makespan(time_of(grid, steps), jobs)
        if total <= seconds_left:
            return steps, total
    return plan.step_choices[-1], total


# ----------------------------------------------------------------------------------------------------------------------
# fp16 copy of a checkpoint (the GPU machine gets at most 64 MiB)


def to_fp16(src, dst):
    """Copy a model.safetensors with every F32 tensor cast to F16 (others unchanged); refuse values out of F16 range."""
    tensors = bert.load_safetensors(src)
    for name, t in tensors.items():
        if t.dtype == torch.float32:
            biggest = float(t.abs().max()) if t.numel() else 0.0
            if biggest > 65504:
                raise ValueError(f"{src}: tensor {name!r} has |value| {biggest:g}, beyond float16's 65504")
            tensors[name] = t.half()
    lora2.write_safetensors(tensors, dst)


def prepare(dest, model_dir, data_dir, tasks):
    """dest/model: the backbone with fp16 weights (+ config, vocab, tokenizer config); dest/glue: the tasks' TSVs."""
    dest, model_dir, data_dir = Path(dest), Path(model_dir), Path(data_dir)
    (dest / "model").mkdir(parents=True, exist_ok=True)
    for name in ("config.json", "vocab.txt", "tokenizer_config.json", "special_tokens_map.json"):
        if (model_dir / name).exists():
            shutil.copyfile(model_dir / name, dest / "model" / name)
    to_fp16(model_dir / "model.safetensors", dest / "model" / "model.safetensors")
    atomic_write(dest / "model" / "prepared_from.json", json.dumps({"source": str(model_dir.resolve())}) + "\n")
    dirs = {name: task.dir for name, task in glue.TASKS.items()}
    for task in tasks:
        shutil.copytree(data_dir / dirs[task], dest / "glue" / dirs[task], dirs_exist_ok=True)
    size = sum(p.stat().st_size for p in dest.rglob("*") if p.is_file())
    print(f"wrote {dest} ({size / 2**20:.1f} MiB): fp16 backbone and GLUE {', '.join(dirs[t] for t in tasks)}")


# ----------------------------------------------------------------------------------------------------------------------
# report


def verdict(a, b):
    """Compare two sets of seed scores: 'win' if every a beats every b, 'loss' if the reverse, else 'tie'."""
    if min(a) > max(b):
        return "win"
    if max(a) < min(b):
        return "loss"
    return "tie"


def collect(plan, out, steps, lrs):
    """{(task, method name): [metrics.json dicts]} for the grid's finished runs, and {run-id: Run} of the missing."""
    results, missing = {}, {}
    for run in grid_runs(plan, steps, lrs):
        m = result_of(out, run)
        if m is None:
            missing[run.id] = run
        else:
            results.setdefault((run.task, run.method.name), []).append((run, m))
    return results, missing


def pct(x):
    return f"{100 * x:.1f}"


def fmt_lr(lr):
    return f"{lr:g}"


COMPARISONS = [  # (a, b, what the paper claims)
    ("lora2-k8", "lora-r8", "same budget: matches or beats LoRA"),
    ("lora2-k8", "adalora-b8", "same budget: matches or beats AdaLoRA"),
    ("lora2-k8", "full", "close to full fine-tuning"),
    ("lora2-k1", "lora-r1", "1/8 budget: vs LoRA at about the same parameters"),
    ("lora2-k1", "adalora-b2", "1/8 budget: vs AdaLoRA at the small budget"),
    ("lora2-k1", "lora-r8", "1/8 budget: comparable to LoRA with 8× the parameters"),
    ("lora2-k1", "lora2-k8", "1/8 budget: comparable to itself at k=8"),
]


HAND_START, HAND_END = "<!-- hand-written: start -->", "<!-- hand-written: end -->"

def limitations(plan):
    """The study design's caveats, as lines for RESULTS.md."""
    prune = dict(PRUNE)
    lines = [
        "One small backbone (by default the packaged all-MiniLM-L6-v2: 6 layers, width 384, 22.7M parameters) instead "
        "of the paper's DeBERTaV3-base (184M).",
        "A short, equal budget for every method instead of the paper's epochs: the pruning methods (AdaLoRA, LoRA²) "
        f"train unpruned for the first {prune['init_warmup']:.0%} of the steps and prune over the next "
        f"{1 - prune['init_warmup'] - prune['final_warmup']:.0%}, so a short budget is the hard case for them.",
        "One learning-rate sweep on one task (one seed), reused on the other tasks and by the lower-budget variants "
        "and the ablations of each family; one set of the other hyperparameters for all tasks (no per-task presets).",
        "The reported metric is the final step's: no checkpoint selection on the dev set (which the papers use).",
        "AdaLoRA's budget is its final average rank (as in the AdaLoRA paper's table); it trains 1.5× as many "
        "singular triplets, which its adapter parameter count shows.",
    ]
    for task, flags in plan.tasks.items():
        if "dev_split" in flags:
            lines.append(f"{task}: train and eval are a fixed {1 - flags['dev_split']:.0%}/{flags['dev_split']:.0%} "
                         "split of the GLUE dev set (no train.tsv in this copy): not comparable to published results.")
    return lines


def comparisons(plan, results):
    """[(a, b, claim, [None | (verdict, Δ median in points, spread in points) per task])] for COMPARISONS."""
    names, table = {m.name for m in plan.methods}, []
    for a, b, claim in COMPARISONS:
        if a not in names or b not in names:
            continue
        cells = []
        for task in plan.tasks:
            ra, rb = results.get((task, a)), results.get((task, b))
            if not ra or not rb:
                cells.append(None)
                continue
            va, vb = [m["main_metric"] for _, m in ra], [m["main_metric"] for _, m in rb]
            spread = max(max(va) - min(va), max(vb) - min(vb))
            cells.append((verdict(va, vb), 100 * (np.median(va) - np.median(vb)), 100 * spread))
        if any(c is not None for c in cells):
            table.append((a, b, claim, cells))
    return table


def hand_written(path):
    """The block between HAND_START and HAND_END of an existing report (kept when the report is rewritten)."""
    text = Path(path).read_text(encoding="utf-8") if Path(path).exists() else ""
    if HAND_START in text and HAND_END in text.split(HAND_START, 1)[1]:
        return HAND_START + text.split(HAND_START, 1)[1].split(HAND_END, 1)[0] + HAND_END
    return None


def write_report(plan, args, out, results_md, png):
    state = read_json(out / "study.json") or {}
    steps = state.get("steps") or (None if args.steps == "auto" else int(args.steps))
    if steps is None:
        raise ValueError(f"{out / 'study.json'} records no step count and --steps is auto: nothing to report yet")
    lrs, sweep = choose_lrs(plan, out, steps)
    results, missing = collect(plan, out, steps, lrs)
    every = [m for rows in results.values() for _, m in rows]
    table = comparisons(plan, results)
    tallies = []
    for a, b, claim, cells in table:
        done = [(task, c) for task, c in zip(plan.tasks, cells) if c is not None]
        verdicts = [c[0] for _, c in done]
        lo, hi = min(done, key=lambda tc: tc[1][1]), max(done, key=lambda tc: tc[1][1])
        tallies.append(f"{method_by_name(plan, a).label} vs {method_by_name(plan, b).label} ({claim}): "
                       f"{verdicts.count('win')} win, {verdicts.count('tie')} tie, {verdicts.count('loss')} loss "
                       f"over {len(done)} tasks; Δ of the medians from {lo[1][1]:+.1f} ({lo[0]}) to {hi[1][1]:+.1f} "
                       f"({hi[0]}) points.")
    n_planned = len(every) + len(missing)
    L = []
    L += ["# GLUE study: LoRA² vs LoRA vs AdaLoRA vs full fine-tuning", "",
          f"Generated by `study.py` from the runs' `metrics.json` files under `{out}/<run-id>/` "
          f"(`python study.py --report_only{' --quick' if args.quick else ''} --out {out}` rewrites this file and "
          f"`{png.name}`, keeping the hand-written discussion). Every number below is the `main_metric` of those "
          "files: the metric of the final step (evaluation only at the end, no checkpoint selection), × 100.", "",
          "## Summary", "",
          f"- {len(every)} of {n_planned} grid runs finished ({len(plan.tasks)} tasks × {len(plan.methods)} "
          f"configurations × {len(plan.seeds)} seeds, {steps} steps each), after a "
          f"{sum(len(v) for v in plan.sweep_lrs.values())}-run learning-rate sweep."]
    L += [f"- {line}" for line in tallies[:2] + [t for t in tallies if t.startswith("LoRA² k=1 vs LoRA r=8")]]
    for task in plan.tasks:
        medians = [np.median([m["main_metric"] for _, m in rows]) for (t, _), rows in results.items() if t == task]
        name = next((m["main_metric_name"] for (t, _), rows in results.items() if t == task for _, m in rows), "")
        if medians and name == "mcc" and max(abs(x) for x in medians) == 0:
            L.append(f"- {task}: every configuration's median MCC is 0 (constant predictions): this budget does not "
                     "train it, and its rows compare nothing.")
    L.append("")
    hand = hand_written(results_md)
    if hand:
        L += [hand, ""]

    # setup
    sessions = state.get("sessions", [])
    hw = sessions[-1]["hardware"] if sessions else {}
    gpus = ", ".join(sorted(set(hw.get("gpus", [])))) or "none (CPU)"
    study_wall = sum(s.get("wall_s", 0) for s in sessions)
    run_wall = sum(m["wall_s"] for m in every)
    example = every[0] if every else None
    L += ["## Setup", ""]
    if example:
        info = state.get("model", {})
        fulls = [m for (t, name), rows in results.items() if name == "full" for _, m in rows]
        n_params = (fulls[0]["total_params"] if fulls else None)
        L += [f"- Backbone: `{info.get('path') or example['args'].get('model') or 'the packaged all-MiniLM-L6-v2'}`"
              + (f", {n_params:,} parameters with the 2-way head" if n_params else "")
              + " (BERT architecture through `bert.py`)."
              + (" Its weights were stored as float16 to travel to the GPU machine (`python study.py --prepare`"
                 + (f" from `{info['source']}`" if info.get("source") else "") + ") and are loaded into float32."
                 if is_fp16(info) else "")
              + (" Training used bf16 autocast on CUDA." if example.get("device") == "cuda" else "")]
    L += [f"- Steps: {steps} optimiser steps for every run, batch {plan.common.get('batch_size')}, max length "
          f"{plan.common.get('max_len')} tokens, AdamW (weight decay {plan.common.get('weight_decay', 0.01)}, none on "
          f"biases and LayerNorm), linear warm-up {plan.common.get('warmup', 0.06):.0%} of the steps then linear "
          f"decay, gradient clipping {plan.common.get('clip', 1.0)}.",
          f"- Seeds: {', '.join(map(str, plan.seeds))} (initialisation, dropout and data order; the data subsets and "
          "splits are fixed).",
          "- Adapters on query, key, value, attention.output.dense, intermediate.dense and output.dense of every "
          "layer; the head (pooler + classifier) is trained by every method and counted apart (`head params`).",
          f"- Hardware: {gpus}; {hw.get('cpus', '?')} CPU cores; {state.get('jobs', '?')} runs side by side"
          + (f"; {state['note']}" if state.get("note") else "") + ".",
          *(["- Code (sha256, first 12 hex digits): "
             + ", ".join(f"`{k}` {v}" for k, v in sessions[-1]["code"].items())]
            if sessions and sessions[-1].get("code") else []),
          f"- Wall time: {fmt_time(study_wall)} for the study "
          f"({len(sessions)} invocation{'s' if len(sessions) != 1 else ''}); {fmt_time(run_wall)} of training "
          "summed over the grid runs (each run's `wall_s`, evaluation excluded).",
          ""]
    if state.get("steps_reason"):
        L += [f"- Step count: {state['steps_reason']}", ""]
    L += ["Data (train / eval examples as the runs report them):", "", "| task | train | eval | metric | note |",
          "|---|---|---|---|---|"]
    for task in plan.tasks:
        ms = [m for (t, _), rows in results.items() if t == task for _, m in rows]
        if ms:
            m = ms[0]
            ev = ", ".join(f"{v:,}" for v in m["eval_size"].values())
            subset = "training subset (fixed, seed 0)" if plan.tasks[task].get("train_size") else "full train.tsv"
            split = "NON-STANDARD: train and eval are a fixed split of dev.tsv"
            note = split if m.get("non_standard_split") else subset
            L.append(f"| {task} | {m['train_size']:,} | {ev} | {m['main_metric_name']} | {note} |")
    L += ["", "Configurations (train_glue.py flags besides the common ones):", "", "| configuration | flags | lr |",
          "|---|---|---|"]
    for meth in plan.methods:
        flags = " ".join(f"--{k} {v}" for k, v in meth.flags)
        L.append(f"| {meth.label} | `{flags}` | {fmt_lr(lrs[meth.family]) if meth.family in lrs else 'not chosen'} |")
    common = " ".join(f"--{k} {v}" for k, v in {**plan.common, "steps": steps}.items())
    L += ["", f"Common flags: `{common}`; per task: "
          + "; ".join(f"{t} `" + " ".join(f"--{k} {v}" for k, v in f.items()) + "`" for t, f in plan.tasks.items())
          + ".", ""]

    # sweep
    L += [f"## Learning rates (sweep on {plan.sweep_task}, seed {plan.seeds[0]}, {steps} steps)", "",
          "Each family's lr is the best of its sweep on the dev set (a mild selection effect for that task); "
          "the lower-budget variants and the ablations reuse their family's lr.", "",
          "| family | " + " | ".join(["lr → score"] * 1) + " | chosen |", "|---|---|---|"]
    for fam, scores in sweep.items():
        cells = ", ".join(f"{fmt_lr(lr)} → {'—' if s is None else pct(s)}" for lr, s in scores.items())
        pick = lrs.get(fam)
        edge = pick is not None and len(scores) > 1 and pick in (min(scores), max(scores))
        L.append(f"| {method_by_name(plan, fam).label} | {cells} | "
                 f"{'—' if pick is None else fmt_lr(pick) + (' (edge of the sweep)' if edge else '')} |")
    L.append("")

    # results
    L += ["## Results", "", "Median over seeds [min–max], × 100. Adapter and head parameters are the trainable ones "
          "as train_glue.py counts them (AdaLoRA: all init_r singular triplets, pruned or not; LoRA²: every factor; "
          "full: the whole encoder as 'adapter').", ""]
    header = "| configuration | adapter params | head params | " + " | ".join(plan.tasks) + " |"
    L += [header, "|---" * (3 + len(plan.tasks)) + "|"]
    for meth in plan.methods:
        rows = {t: results.get((t, meth.name), []) for t in plan.tasks}
        anyrow = next((r for r in rows.values() if r), None)
        if anyrow is None:
            continue
        m0 = anyrow[0][1]
        cells = []
        for t in plan.tasks:
            v = [m["main_metric"] for _, m in rows[t]]
            cells.append(f"{pct(np.median(v))} [{pct(min(v))}–{pct(max(v))}] n={len(v)}" if v else "not run")
        L.append(f"| {meth.label} | {m0['adapter_params']:,} | {m0['head_params']:,} | " + " | ".join(cells) + " |")
    L += ["", "Per task, with the runs behind each row:", ""]
    for task in plan.tasks:
        ms = [m for (t, _), rows in results.items() if t == task for _, m in rows]
        if not ms:
            continue
        L += [f"### {task} ({ms[0]['main_metric_name']}"
              + (", non-standard split of dev.tsv" if ms[0].get("non_standard_split") else "") + ")", "",
              "| configuration | adapter params | head params | seeds | median | min–max | runs |",
              "|---|---|---|---|---|---|---|"]
        for meth in plan.methods:
            rows = results.get((task, meth.name))
            if not rows:
                continue
            v = [m["main_metric"] for _, m in rows]
            glob = f"{out}/{task}-{meth.name}-lr{fmt_lr(rows[0][0].lr)}-s*/metrics.json"
            L.append(f"| {meth.label} | {rows[0][1]['adapter_params']:,} | {rows[0][1]['head_params']:,} | {len(v)} | "
                     f"{pct(np.median(v))} | {pct(min(v))}–{pct(max(v))} | `{glob}` |")
        L.append("")

    # comparison with the paper
    L += ["## Against the paper's claims", "",
          "The paper claims that LoRA² matches or beats AdaLoRA and LoRA at the same parameter budget and stays "
          "comparable at 1/8 of it (SPEC §1, §5; DeBERTaV3-base, full GLUE training sets, tens of thousands of steps). "
          "Here: a different, smaller backbone and a short, equal step budget. Verdict per task: *win* if every seed "
          "of the first beats every seed of the second, *loss* if the reverse, *tie* when the seed ranges overlap; "
          "Δ is the difference of the medians in points, spread the larger of the two min–max ranges.", ""]
    if table:
        L += ["| comparison | claim | " + " | ".join(plan.tasks) + " |", "|---|---|" + "---|" * len(plan.tasks)]
        for a, b, claim, cells in table:
            L.append(f"| {method_by_name(plan, a).label} vs {method_by_name(plan, b).label} | {claim} | "
                     + " | ".join("—" if c is None else f"{c[0]} (Δ {c[1]:+.1f}, spread {c[2]:.1f})" for c in cells)
                     + " |")
        L.append("")
    for line in tallies:
        L.append(f"- {line}")
    L.append("")

    # ablations
    abl = [m for m in plan.methods if m.group == "ablation"]
    base = "lora2-k8" if any(m.name == "lora2-k8" for m in plan.methods) else None
    if abl and base:
        L += ["## Ablations of LoRA² k=8", "", "| ablation | " + " | ".join(plan.tasks) + " |",
              "|---|" + "---|" * len(plan.tasks)]
        for meth in abl:
            cells = []
            for task in plan.tasks:
                ra, rb = results.get((task, meth.name)), results.get((task, base))
                if not ra or not rb:
                    cells.append("not run" if not ra else "—")
                    continue
                va, vb = [m["main_metric"] for _, m in ra], [m["main_metric"] for _, m in rb]
                cells.append(f"{verdict(va, vb)} (Δ {100 * (np.median(va) - np.median(vb)):+.1f})")
            L.append(f"| {meth.label} | " + " | ".join(cells) + " |")
        L += ["", "Δ against LoRA² k=8 with the default settings (orthogonal init, γ = 0.1, no L4, inner scoring, "
              "pruning to target rank 2).", ""]

    L += ["## Limitations", ""] + [f"- {line}" for line in limitations(plan)] + [""]

    # missing
    L += ["## Not run or failed", ""]
    if sweep and any(f not in lrs for f in sweep):
        L.append("- No lr chosen (sweep incomplete) for: " + ", ".join(f for f in sweep if f not in lrs)
                 + "; their configurations are missing from the grid.")
    if missing:
        for run_id, run in missing.items():
            log = out / run.dir_name / "log.txt"
            why = "failed, see " + str(log) if log.exists() else "not run"
            L.append(f"- `{run_id}`: {why}")
    elif not (sweep and any(f not in lrs for f in sweep)):
        L.append("- nothing: every planned run finished.")
    L.append("")

    # per run
    L += ["## Every run", "", "| run-id | metric | kept singular values | wall s |", "|---|---|---|---|"]
    for (task, name), rows in results.items():
        for run, m in rows:
            kept = "—" if run.method.arg("method") == "full" else m.get("kept_singular_values", "")
            L.append(f"| `{run.id}` | {pct(m['main_metric'])} | {kept} | {m['wall_s']:.1f} |")
    L += ["", "## Reproduce", ""]
    if is_fp16(state.get("model", {})):
        L.append("- `python study.py --prepare DIR --data_dir ../shared/glue`: the fp16 copy of the packaged backbone "
                 "and the GLUE files (DIR/model and DIR/glue are the --model and --data_dir below)")
    L += [f"- `{s['command']}`" + (" (resumed)" if i else "") for i, s in enumerate(sessions)]
    L.append("")
    atomic_write(results_md, "\n".join(L))
    print(f"wrote {results_md}")
    plot(plan, results, png)


def style(plan, meth):
    """(color, marker, filled, x factor) of a configuration in the figure: one colour per method, filled for a family's
    swept configuration, hollow for its lower budget; ablations grey, each its own marker, nudged right to be seen."""
    colors = {"full": "black", "lora": "tab:blue", "adalora": "tab:orange", "lora2": "tab:red"}
    markers = {"full": "s", "lora": "o", "adalora": "^", "lora2": "D"}
    if meth.group == "ablation":
        j = [m.name for m in plan.methods if m.group == "ablation"].index(meth.name)
        return "dimgrey", "v<>ph*"[j % 6], False, 1.09 ** (j + 1)
    return colors[meth.arg("method")], markers[meth.arg("method")], meth.name == meth.family, 1.0


def plot(plan, results, png):
    """Score (median, min–max over seeds) against trainable adapter parameters, log-x, one panel per task."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"matplotlib is not installed: {png} not written")
        return
    tasks = [t for t in plan.tasks if any(k[0] == t for k in results)]
    if not tasks:
        return
    ncols = min(2, len(tasks))
    nrows = math.ceil(len(tasks) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(6.2 * ncols, 4.2 * nrows), squeeze=False)
    handles = {}
    for ax, task in zip(axes.flat, tasks):
        for meth in plan.methods:
            rows = results.get((task, meth.name))
            if not rows:
                continue
            v = np.array([m["main_metric"] for _, m in rows]) * 100
            color, marker, filled, nudge = style(plan, meth)
            x, med = rows[0][1]["adapter_params"] * nudge, np.median(v)
            h = ax.errorbar([x], [med], yerr=[[med - v.min()], [v.max() - med]], fmt=marker, capsize=3, color=color,
                            mfc=color if filled else "white", ms=7, label=meth.label)
            handles.setdefault(meth.label, h)
        m = next(m for (t, _), rows in results.items() if t == task for _, m in rows)
        ax.set_xscale("log")
        ax.set_xlabel("trainable adapter parameters (head excluded)")
        ax.set_ylabel(f"{m['main_metric_name']} × 100")
        ax.set_title(f"{task}: median and min–max over seeds"
                     + (" (non-standard split)" if m.get("non_standard_split") else ""))
        ax.grid(alpha=0.3)
    for ax in axes.flat[len(tasks):]:
        ax.axis("off")
    fig.legend(list(handles.values()), list(handles), loc="lower center", ncol=4, fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.04 + 0.03 * math.ceil(len(handles) / 4) / nrows, 1, 1))
    tmp = png.with_name(png.stem + ".tmp.png")
    fig.savefig(tmp, dpi=120)
    os.replace(tmp, png)
    plt.close(fig)
    print(f"wrote {png}")


# ----------------------------------------------------------------------------------------------------------------------
# main


def build_parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="a tiny grid for CI (CPU, seconds)")
    p.add_argument("--report_only", action="store_true", help="only rewrite RESULTS.md and the PNG from the JSONs")
    p.add_argument("--prepare", metavar="DIR", help="write an fp16 copy of --model and the GLUE tasks into DIR, "
                   "then stop")
    p.add_argument("--model", help="BERT checkpoint folder for train_glue.py (default: its packaged MiniLM)")
    p.add_argument("--data_dir", help="GLUE folder (default: $GLUE_DIR, as train_glue.py)")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="runs side by side")
    p.add_argument("--gpus", type=int, default=1, help="spread the runs over this many GPUs (CUDA_VISIBLE_DEVICES "
                   "per run, the least busy GPU first)")
    p.add_argument("--steps", default=None, help="optimiser steps of every run, or 'auto': the largest of the plan's "
                   "choices that fits --time_limit, from the smoke runs' speed (default: 200; --quick: 6)")
    p.add_argument("--time_limit", type=float, default=0, help="seconds; start no run that would end later, kill "
                   "what still runs then (0: none)")
    p.add_argument("--tasks", help="comma-separated subset of the plan's tasks")
    p.add_argument("--out", help="runs folder (default runs/study, --quick: runs/study-quick)")
    p.add_argument("--results", help="report path (default RESULTS.md next to study.py; --quick: <out>/RESULTS.md)")
    p.add_argument("--png", help="figure path (default results.png next to the report)")
    p.add_argument("--note", help="a line about the environment, recorded in RESULTS.md (e.g. 'runs under CUDA MPS')")
    p.add_argument("--smoke_only", action="store_true", help="run the smoke phase only; exit 1 if any smoke run failed")
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    plan = quick_plan() if args.quick else full_plan()
    if args.tasks:
        unknown = set(args.tasks.split(",")) - set(plan.tasks)
        if unknown:
            raise SystemExit(f"study.py: error: --tasks {sorted(unknown)} not in the plan's {sorted(plan.tasks)}")
        plan.tasks = {t: f for t, f in plan.tasks.items() if t in args.tasks.split(",")}
        if plan.sweep_task not in plan.tasks:
            plan.sweep_task = next(iter(plan.tasks))
    out = Path(args.out) if args.out else HERE / "runs" / ("study-quick" if args.quick else "study")
    results_md = Path(args.results) if args.results else (out / "RESULTS.md" if args.quick else HERE / "RESULTS.md")
    png = Path(args.png) if args.png else results_md.with_name("results.png")
    if args.steps is None:
        args.steps = "6" if args.quick else "200"
    if args.steps != "auto" and not args.steps.isdigit():
        raise SystemExit(f"study.py: error: --steps must be a positive integer or 'auto', got {args.steps!r}")

    if args.prepare:
        from_dir = args.model or _packaged_model()
        prepare(args.prepare, from_dir, args.data_dir or os.environ.get("GLUE_DIR") or "glue_data", plan.tasks)
        return 0
    if args.report_only:
        write_report(plan, args, out, results_md, png)
        return 0

    started = time.time()
    deadline = started + args.time_limit if args.time_limit else None
    out.mkdir(parents=True, exist_ok=True)
    state = read_json(out / "study.json") or {}
    session = {"command": "python " + " ".join([Path(sys.argv[0]).name] + list(argv if argv is not None
                                                                              else sys.argv[1:])),
               "started": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(started)), "hardware": hardware()}
    state.setdefault("sessions", []).append(session)
    state["jobs"] = args.jobs
    state["model"] = model_info(args.model)
    session["code"] = {path.name: hashlib.sha256(path.read_bytes()).hexdigest()[:12]
                       for path in (HERE / "study.py", HERE / "baselines.py", *(ROOT / f"{name}.py" for name in
                                    ("train_glue", "lora2", "bert", "glue", "rundir"))) if path.exists()}
    if args.note:
        state["note"] = args.note

    def save_state():
        session["wall_s"] = round(time.time() - started, 1)
        atomic_write(out / "study.json", json.dumps(state, indent=1) + "\n")

    statuses = {}
    steps = state.get("steps")
    if args.steps != "auto":
        if steps is not None and steps != int(args.steps):
            raise SystemExit(f"study.py: error: {out} holds a study of {steps} steps, not {args.steps}; "
                             f"use another --out")
        steps = int(args.steps)
    if steps is None or args.smoke_only:
        # smoke: every family on every task, side by side; their speed sets --steps auto
        print(f"== smoke: {len(smoke_runs(plan))} short runs ({plan.smoke_steps} steps)", flush=True)
        t0 = time.time()
        smoke_status = run_all(smoke_runs(plan), plan, args, out, deadline)
        statuses.update(smoke_status)
        failed = [k for k, v in smoke_status.items() if v != "ok"]
        if args.smoke_only:
            save_state()
            return 1 if failed else 0
        if len(failed) == len(smoke_runs(plan)):
            save_state()
            raise SystemExit(f"study.py: every smoke run failed (logs under {out}/smoke/); stopping")
        durations = {r.id: (read_json(out / r.dir_name / "study_run.json") or {}).get("elapsed_s")
                     for r in smoke_runs(plan)}
        speeds = speed_table(plan, out, {k: v for k, v in durations.items() if v})
        left = (deadline - time.time() - 15) if deadline else 3600.0
        steps, estimate = choose_steps(plan, speeds, args.jobs, left)
        state["steps"] = steps
        state["speeds"] = {f"{t}/{f}": [round(o, 2), round(s, 5)] for (t, f), (o, s) in speeds.items()}
        state["steps_reason"] = (f"chosen by `--steps auto`: the largest of {list(plan.step_choices)} whose sweep and "
                                 f"grid were estimated to fit in the {left:.0f} s left of --time_limit "
                                 f"{args.time_limit:.0f} s, from the speed of the smoke runs "
                                 f"({time.time() - t0:.0f} s, all side by side); estimate {estimate:.0f} s.")
        print(f"== steps: {steps} (estimated {estimate:.0f} s for sweep + grid, {left:.0f} s left)", flush=True)
    state["steps"] = steps
    save_state()
    speeds = {tuple(k.split("/")): tuple(v) for k, v in state.get("speeds", {}).items()}

    history = {}  # (task, family) -> [seconds] of the runs finished by this invocation

    def estimate(run):
        """Expected seconds of a run: from the smoke runs' speed if measured, else from the finished runs like it."""
        if (run.task, run.method.family) in speeds:
            o, s = speeds[run.task, run.method.family]
            return o + s * run.steps
        for like in ([(run.task, run.method.family)], [k for k in history if k[1] == run.method.family], list(history)):
            seconds = [d for k in like for d in history.get(k, [])]
            if seconds:
                return float(np.median(seconds))
        return 0.0

    print(f"== sweep: {len(sweep_runs(plan, steps))} runs on {plan.sweep_task}", flush=True)
    statuses.update(run_all(sweep_runs(plan, steps), plan, args, out, deadline, estimate, history))
    lrs, _ = choose_lrs(plan, out, steps)
    print("== learning rates: " + ", ".join(f"{f} {fmt_lr(lr)}" for f, lr in lrs.items()), flush=True)
    grid = grid_runs(plan, steps, lrs)
    print(f"== grid: {len(grid)} runs", flush=True)
    statuses.update(run_all(grid, plan, args, out, deadline, estimate, history))
    save_state()
    write_report(plan, args, out, results_md, png)
    bad = {k: v for k, v in statuses.items() if v != "ok"}
    if bad:
        print(f"{len(bad)} runs did not finish:")
        for k, v in bad.items():
            print(f"  {k}: {v}")
        return 1
    return 0


def model_info(model_dir):
    """{"path", "dtypes"} of the backbone's model.safetensors, for the report."""
    path = Path(model_dir) if model_dir else _packaged_model()
    try:
        tensors = bert.load_safetensors(path / "model.safetensors")
    except (OSError, ValueError):
        return {"path": str(path)}
    names = {v: k for k, v in bert.SAFETENSORS_DTYPES.items()}
    source = (read_json(path / "prepared_from.json") or {}).get("source")
    return {"path": str(model_dir or path), "dtypes": sorted({names[t.dtype] for t in tensors.values()}),
            **({"source": source} if source else {})}


def is_fp16(info):
    """Whether model_info() saw float16 weights (integer buffers such as position_ids aside)."""
    dtypes = set(info.get("dtypes", []))
    return "F16" in dtypes and not dtypes & {"F32", "BF16", "F64"}


def _packaged_model():
    return bert.default_model_dir(install=False)


if __name__ == "__main__":
    sys.exit(main())
