"""The search behind `python train_glue.py`'s defaults: the best SST-2 dev accuracy in <= 180 s on \
2 CPU cores.

    python experiments/sweep_quick.py --round 3 --jobs 2 --threads 1   # a round's settings × seeds,
                                                                         here on the CPU
    python experiments/sweep_quick.py --defaults 0,1,2,3,4             # the shipped default,
                                                                         one run at a time
    python experiments/sweep_quick.py --report  # QUICKRUN.md from experiments/runs/quick/*.jsonl
    # rounds 1-2 ran on a GPU machine, carrying an fp16 MiniLM
      (GLUE_DIR=... python experiments/study.py --prepare
    # .device/quick --tasks sst2), one call of at most 10 minutes per round:
    python3 experiments/sweep_quick.py --round 2 --device cuda --jobs 16 --time_limit 480 \
        --model .device/quick/model --data_dir .device/quick/glue --out /tmp/quick \
        && cp /tmp/quick/round2.jsonl $OUT

A round is a list of settings, each `train_glue.py` with BASE and the setting's flags, run for
several seeds, many processes side by side (one thread each). The time limit on 2 CPU cores fixes
the examples a run may see, so a setting trades steps for batch, or changes what each step does.
Rounds 0-2 searched around the fp32 step (720 steps of 32 took 142-150 s then); round 3 measured
what bf16 autocast on the CPU buys (the same accuracy, about 1.7× the steps per second:
BENCHMARKS.md) spent on more steps. On CUDA the runs compute in fp32 (--precision fp32), so a GPU
stands in for the CPU's arithmetic, not for its trajectory bit for bit. Each finished run appends
{round, name, flags, seed, metric, wall_s, device} to <out>/round<N>.jsonl and keeps its
metrics.json and log; adapter.pt is deleted (the sweep keeps no checkpoints). --defaults runs
`python train_glue.py --seed N` as a user does, one run at a time, and appends {seed, metric, wall_s
(the whole process), cpu, steps} to runs/quick/defaults.jsonl: the figures the README quotes.
Not here: other tasks (study.py).
"""
import argparse
import collections
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))
import formats  # noqa: E402
RUNS = HERE / "runs" / "quick"
REPORT = HERE / "QUICKRUN.md"

# The setting every round varies from: the head on mean-pooled tokens, all of SST-2's training set,
# 720 steps of 32 (train_glue.py's defaults since issue 13, spelled out so that a later change of
# the defaults leaves the sweep as run).
BASE = ["--task", "sst2", "--pooling", "mean", "--train_size", "0", "--batch_size", "32",
        "--steps", "720", "--lr", "5e-3", "--gamma", "0.1", "--weight_decay", "0.01",
        "--max_len", "64", "--log_every", "1000000"]
ROUNDS = {  # round: (seeds, {name: flags on top of BASE})
    1: ([0, 1, 2, 3, 4], {
        "base": [], "gamma 0.01": ["--gamma", "0.01"], "lr 3e-3": ["--lr", "3e-3"],
        "lr 8e-3": ["--lr", "8e-3"],
        "16 x 1440 lr 3e-3": ["--batch_size", "16", "--steps", "1440", "--lr", "3e-3"],
        "16 x 1440": ["--batch_size", "16", "--steps", "1440"],
        "24 x 960": ["--batch_size", "24", "--steps", "960"],
        "48 x 480 lr 8e-3": ["--batch_size", "48", "--steps", "480", "--lr", "8e-3"],
        "warm-up 0.1": ["--warmup", "0.1"], "target_rank 4": ["--target_rank", "4"],
        "t_f 0.5": ["--final_warmup", "0.5"], "t_i 0.2": ["--init_warmup", "0.2"],
        "weight decay 0": ["--weight_decay", "0"], "k 4": ["--k", "4"],
        "mask every step": ["--mask_interval", "1"],
        "classifier dropout 0": ["--classifier_dropout", "0"]}),
    2: ([0, 1, 2, 3, 4, 5, 6, 7], {
        "base": [], "weight decay 0": ["--weight_decay", "0"],
        "mask every step": ["--mask_interval", "1"], "t_f 0.5": ["--final_warmup", "0.5"],
        "wd 0 + mask every step + t_f 0.5": ["--weight_decay", "0", "--mask_interval", "1",
                                             "--final_warmup", "0.5"],
        "640 steps": ["--steps", "640"], "800 steps": ["--steps", "800"],
        "lr 6e-3": ["--lr", "6e-3"],
        "gamma 0.01 + wd 0": ["--gamma", "0.01", "--weight_decay", "0"],
        "t_i 0.05": ["--init_warmup", "0.05"]}),
    3: ([0, 1, 2, 3, 4], {
        "fp32 720": ["--precision", "fp32"], "bf16 720": ["--precision", "bf16"],
        "bf16 900": ["--precision", "bf16", "--steps", "900"],
        "bf16 1100": ["--precision", "bf16", "--steps", "1100"],
        "bf16 1300": ["--precision", "bf16", "--steps", "1300"]}),
}


def run_round(n, args):
    """Run round n's settings × seeds, args.jobs at a time, skipping those already in
    <out>/round<n>.jsonl."""
    seeds, settings = ROUNDS[n]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = out / f"round{n}.jsonl"
    done = {(r["name"], r["seed"]) for r in read_rows(results)}
    names = args.settings.split(",") if args.settings else list(settings)
    unknown = set(names) - set(settings)
    if unknown:
        raise SystemExit(f"sweep_quick.py: error: --settings {sorted(unknown)} not in round {n}'s "
                         f"{list(settings)}")
    seeds = [s for s in seeds if args.seeds is None or str(s) in args.seeds.split(",")]
    # seed-major: whole seeds first
    todo = [(name, s) for s in seeds for name in names if (name, s) not in done]
    common = ["--device", args.device, "--no-compile", "--no_download"] + (
        ["--model", args.model] if args.model else []) + (
        ["--data_dir", args.data_dir] if args.data_dir else [])
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "PYTHONUNBUFFERED": "1"}
    t_start, running = time.time(), []
    print(f"round {n}: {len(todo)} runs ({len(done)} done before), {args.jobs} at a time on "
          f"{args.device}", flush=True)
    while todo or running:
        while todo and len(running) < args.jobs and time.time() - t_start < args.time_limit:
            name, seed = todo.pop(0)
            folder = out / f"round{n}" / f"{name.replace(' ', '_')}-s{seed}"
            folder.mkdir(parents=True, exist_ok=True)
            argv = BASE + settings[name] + common + ["--seed", str(seed), "--out_dir", str(folder),
                                                     "--overwrite"]
            if args.device == "cuda" and "--precision" not in argv:
                argv += ["--precision", "fp32"]  # the CPU's arithmetic (rounds 1-2)
            with open(folder / "log.txt", "w") as log:
                proc = subprocess.Popen([sys.executable, str(ROOT / "train_glue.py"), *argv],
                                        stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
            running.append((name, seed, folder, time.time(), proc))
        if time.time() - t_start >= args.time_limit:
            todo = []  # no new run after the limit; the running ones finish
        for job in [j for j in running if j[4].poll() is not None]:
            running.remove(job)
            name, seed, folder, t0, proc = job
            metrics = folder / "metrics.json"
            metric = json.loads(metrics.read_text())["main_metric"] if metrics.exists() else None
            (folder / "adapter.pt").unlink(missing_ok=True)
            row = dict(round=n, name=name, flags=" ".join(settings[name]), seed=seed, metric=metric,
                       wall_s=round(time.time() - t0, 1), device=args.device, rc=proc.returncode)
            with open(results, "a") as f:
                f.write(json.dumps(row) + "\n")
            print(f"{time.time() - t_start:5.0f} s  {name} s{seed}: {metric} "
                  f"({row['wall_s']:.0f} s, rc {proc.returncode})", flush=True)
        time.sleep(1)


def run_defaults(seeds, out):
    """`python train_glue.py --seed N` for each seed, one at a time, as a user runs it (the packaged
    MiniLM, the shipped SST-2, every default): dev accuracy and the wall time of the whole process,
    appended to <out>/defaults.jsonl."""
    out.mkdir(parents=True, exist_ok=True)
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo")
                if line.startswith("model name")), "?") if os.path.exists("/proc/cpuinfo") else "?"
    for seed in seeds:
        folder = out / "defaults" / f"s{seed}"
        folder.mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        with open(folder / "log.txt", "w") as log:
            rc = subprocess.run([sys.executable, str(ROOT / "train_glue.py"), "--seed", str(seed),
                                 "--out_dir", str(folder), "--overwrite"], stdout=log,
                                stderr=subprocess.STDOUT, cwd=ROOT).returncode
        wall = time.perf_counter() - t0
        m = json.loads((folder / "metrics.json").read_text()) if rc == 0 else {}
        (folder / "adapter.pt").unlink(missing_ok=True)
        row = dict(round="defaults", name="train_glue.py defaults", flags="", seed=seed,
                   metric=m.get("main_metric"), wall_s=round(wall, 1), device="cpu", cpu=cpu,
                   threads=os.cpu_count(), rc=rc, steps=m.get("steps"),
                   precision=m.get("args", {}).get("precision"))
        with open(out / "defaults.jsonl", "a") as f:
            f.write(json.dumps(row) + "\n")
        print(f"seed {seed}: {row['metric']} in {wall:.0f} s (rc {rc})", flush=True)


def read_rows(path):
    path = Path(path)
    return ([json.loads(line) for line in path.read_text().splitlines() if line.strip()]
            if path.exists() else [])


def report(runs_dir, path):
    """QUICKRUN.md: per round, each setting's accuracy over seeds (mean, median, median of seeds
    0-2, each seed)."""
    lines = ["# The quick run's defaults: what was tried", "",
             "Generated by `python experiments/sweep_quick.py --report` from "
             "`experiments/runs/quick/*.jsonl`; the commands and what a round varies are in the "
             "script's docstring. SST-2 dev accuracy (%), all settings from `BASE` (mean pooling, "
             "720 steps of 32 examples drawn from SST-2's 67,349 training examples, 0.34 epoch, lr "
             "5e-3, γ 0.1, weight decay 0.01) with the flags shown. Sorted by the mean over seeds. "
             "`defaults`: `python train_glue.py --seed N` as a user runs it, one run at a time "
             "(`--defaults`; wall = the whole process); `default-cpu`: the default before bf16 on "
             "the CPU (720 steps in fp32, on an Intel Xeon); `round0`: the first exploration on "
             "the CPU (some rows from a code state not kept, marked); `round1`, `round2`: the GPU "
             "sweep (fp32); `round2-rerun`: 16 of round 2's runs rerun with the script as then "
             "committed (identical to the last digit); `round3`: bf16 autocast on the CPU and more "
             "steps, 2 runs side by side on 2 cores (the wall times are not a quick run's): bf16 "
             "trains like fp32, and from 900 steps on the medians stay at 86.7, so the default is "
             "900 steps in bf16 (720 in fp32), which keeps the run well inside 3 minutes; "
             "`round3-rerun`: two of round 3's runs rerun with the restructured train_glue.py "
             "(identical to the last digit, rank patterns too, from the shipped data/SST-2 where "
             "round 3 read a GLUE folder). `range`: max − min over a setting's seeds; a difference "
             "of means well inside it is noise.", ""]
    for file in sorted(Path(runs_dir).glob("*.jsonl")):
        rows = [r for r in read_rows(file) if r["metric"] is not None]
        if not rows:
            continue
        by = collections.defaultdict(dict)
        for r in rows:
            by[(r["name"], r["flags"])][r["seed"]] = 100 * r["metric"]
        walls = [r["wall_s"] for r in rows]
        cpu = f" ({rows[0]['cpu']}, {rows[0]['threads']} threads)" if rows[0].get("cpu") else ""
        lines += [f"## {file.stem}", "", f"{len(rows)} runs on {rows[0]['device']}{cpu}; "
                  f"{min(walls):.0f}–{max(walls):.0f} s a run.", "",
                  "| setting | flags | seeds | mean | median | median s0–2 | range | per seed |",
                  "|---|---|---|---|---|---|---|---|"]
        for (name, flags), acc in sorted(by.items(),
                                         key=lambda kv: -statistics.fmean(kv[1].values())):
            v = [acc[s] for s in sorted(acc)]
            first = [acc[s] for s in (0, 1, 2) if s in acc]
            lines.append(f"| {name} | `{flags}` | {len(v)} | {statistics.fmean(v):.2f} | "
                         f"{statistics.median(v):.2f} | {statistics.median(first):.2f} | "
                         f"{max(v) - min(v):.2f} | {' '.join(f'{x:.1f}' for x in v)} |")
        lines.append("")
    text = "\n".join(lines)
    formats.atomic_write(path, text)
    print(text)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--round", type=int, choices=sorted(ROUNDS),
                   help="run this round's settings × seeds")
    p.add_argument("--report", action="store_true", help=f"write {REPORT.name} from {RUNS}")
    p.add_argument("--defaults",
                   help="comma-separated seeds: run the default train_glue.py one at a time")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--settings",
                   help="comma-separated names of the round's settings to run (default: all)")
    p.add_argument("--seeds", help="comma-separated seeds of the round to run (default: all)")
    p.add_argument("--jobs", type=int, default=1, help="runs side by side")
    p.add_argument("--threads", type=int, default=1, help="CPU threads per run")
    p.add_argument("--time_limit", type=float, default=float("inf"),
                   help="start no run after this many seconds")
    p.add_argument("--model", help="backbone folder (default: the packaged MiniLM)")
    p.add_argument("--data_dir", help="GLUE folder (default: $GLUE_DIR)")
    p.add_argument("--out", default=str(RUNS), help="where round<N>.jsonl and the runs go")
    args = p.parse_args(argv)
    if args.round is None and not args.report and not args.defaults:
        p.error("give --round N, --defaults SEEDS or --report")
    if args.jobs < 1 or args.threads < 1:
        p.error("--jobs and --threads must be >= 1")
    if args.round is not None:
        run_round(args.round, args)
    if args.defaults:
        run_defaults([int(x) for x in args.defaults.split(",")], Path(args.out))
    if args.report:
        report(RUNS, REPORT)


if __name__ == "__main__":
    main()
