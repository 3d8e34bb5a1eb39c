"""Tests for experiments/study.py: the --quick grid end to end on a tiny random BERT and synthetic GLUE files (JSONs, resume,
report rows, a failing run that does not stop the study), the fp16 copy, and the pure helpers (steps, verdicts)."""
import dataclasses
import json
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import bert
import lora2
from experiments import study

HERE = Path(__file__).resolve().parent / "experiments"
WORDS = "good bad great awful fine poor nice dull movie film plot actor what who is was the a it".split()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(model folder, GLUE folder): a 2-layer random BERT (fp32) and a small QNLI dev.tsv."""
    root = tmp_path_factory.mktemp("tiny")
    model_dir, glue = root / "model", root / "glue"
    model_dir.mkdir()
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "?", "."] + WORDS
    (model_dir / "vocab.txt").write_text("\n".join(vocab) + "\n")
    config = bert.tiny_config(vocab_size=len(vocab))
    (model_dir / "config.json").write_text(json.dumps({**dataclasses.asdict(config), "model_type": "bert"}))
    torch.manual_seed(0)
    state = bert.BertModel(config).state_dict()
    lora2.write_safetensors(state, model_dir / "model.safetensors")

    rng = random.Random(0)

    def sentence():
        return " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 8)))

    (glue / "QNLI").mkdir(parents=True)
    rows = [f"{i}\t{sentence()} ?\t{sentence()} .\t{rng.choice(['entailment', 'not_entailment'])}" for i in range(40)]
    (glue / "QNLI" / "dev.tsv").write_text("index\tquestion\tsentence\tlabel\n" + "\n".join(rows) + "\n")
    return model_dir, glue


def run_study(*args):
    return subprocess.run([sys.executable, str(HERE / "study.py"), *map(str, args)], capture_output=True, text=True,
                          cwd=HERE, timeout=300)


def test_quick_study_end_to_end(tiny, tmp_path):
    model_dir, glue = tiny
    # the fp16 copy (as sent to the GPU machine) is what the study trains
    prep = run_study("--quick", "--prepare", tmp_path / "carry", "--model", model_dir, "--data_dir", glue)
    assert prep.returncode == 0, prep.stderr
    fp16 = tmp_path / "carry" / "model"
    assert study.model_info(fp16)["dtypes"] == ["F16"]
    out, md = tmp_path / "runs", tmp_path / "RESULTS.md"
    common = ["--quick", "--model", fp16, "--data_dir", tmp_path / "carry" / "glue", "--device", "cpu", "--jobs", "2",
              "--out", out, "--results", md]
    first = run_study(*common)
    assert first.returncode == 0, first.stdout + first.stderr

    plan = study.quick_plan()
    lrs, sweep = study.choose_lrs(plan, out, 6)
    assert set(lrs) == {"full", "lora2-k2"} and set(sweep["lora2-k2"]) == {1e-3, 1e-2}
    assert lrs["lora2-k2"] == max(sorted(sweep["lora2-k2"]), key=lambda lr: sweep["lora2-k2"][lr])
    runs = study.sweep_runs(plan, 6) + study.grid_runs(plan, 6, lrs)
    assert len({r.id for r in runs}) == 3 + 4 - 2            # the sweep's seed-0 runs at the chosen lr are reused
    for run in runs:
        m = json.loads((out / run.id / "metrics.json").read_text())
        assert (m["task"], m["seed"], m["steps"], m["args"]["lr"]) == (run.task, run.seed, 6, run.lr)
    mtimes = {p: p.stat().st_mtime_ns for p in out.glob("*/metrics.json")}

    # resumable: a second invocation starts nothing and changes no JSON
    second = run_study(*common)
    assert second.returncode == 0, second.stdout + second.stderr
    assert "0 to run" in second.stdout and "FAILED" not in second.stdout
    assert {p: p.stat().st_mtime_ns for p in out.glob("*/metrics.json")} == mtimes

    text = md.read_text()
    for meth in plan.methods:                                  # a row per configuration: two seeds, median, range
        runs = [json.loads((out / f"qnli-{meth.name}-lr{lrs[meth.family]:g}-s{seed}" / "metrics.json").read_text())
                for seed in (0, 1)]
        v = sorted(m["main_metric"] for m in runs)
        assert (f"| {meth.label} | {runs[0]['adapter_params']:,} | {runs[0]['head_params']:,} | "
                f"{100 * np.median(v):.1f} [{100 * v[0]:.1f}–{100 * v[1]:.1f}] n=2 |") in text
        assert f"`{out}/qnli-{meth.name}-lr{lrs[meth.family]:g}-s*/metrics.json`" in text
        assert f"| `qnli-{meth.name}-lr{lrs[meth.family]:g}-s1` | {100 * runs[1]['main_metric']:.1f} |" in text
    assert "NON-STANDARD" in text and "Its weights were stored as float16" in text
    assert "nothing: every planned run finished" in text

    # --report_only rebuilds the same report from the JSONs, keeping a hand-written block
    hand = f"{study.HAND_START}\n## Discussion\n\nwritten by hand\n{study.HAND_END}"
    md.write_text(text.replace("## Setup", hand + "\n\n## Setup"))
    again = run_study("--quick", "--report_only", "--out", out, "--results", md)
    assert again.returncode == 0, again.stderr
    assert md.read_text() == text.replace("## Setup", hand + "\n\n## Setup")


def test_failed_runs_are_logged_and_reported(tiny, tmp_path):
    model_dir, _ = tiny
    empty = tmp_path / "no_glue"
    empty.mkdir()
    out = tmp_path / "runs"
    res = run_study("--quick", "--model", model_dir, "--data_dir", empty, "--device", "cpu",
                    "--jobs", "2", "--gpus", "2", "--out", out, "--results", tmp_path / "R.md")
    assert res.returncode == 1
    assert "FAILED" in res.stdout and "runs did not finish" in res.stdout
    log = (out / "qnli-full-lr0.001-s0" / "log.txt").read_text()
    assert "GLUE QNLI not found" in log
    runs = [json.loads(p.read_text()) for p in out.glob("*/study_run.json")]
    assert len(runs) == 3 and all(r["status"].startswith("failed") for r in runs)
    assert {r["gpu"] for r in runs} == {0, 1}                  # two at a time, one per GPU
    assert "No lr chosen (sweep incomplete) for: full, lora2-k2" in (tmp_path / "R.md").read_text()


def test_fp16_copy_is_the_float16_cast(tmp_path):
    a = np.random.default_rng(0).standard_normal((3, 5)).astype("<f4")
    lora2.write_safetensors({"w": torch.from_numpy(a), "ids": torch.arange(4)}, tmp_path / "a.safetensors")
    study.to_fp16(tmp_path / "a.safetensors", tmp_path / "b.safetensors")
    back = bert.load_safetensors(tmp_path / "b.safetensors")
    assert back["w"].dtype == torch.float16 and torch.equal(back["w"], torch.from_numpy(a.astype(np.float16)))
    assert torch.equal(back["ids"], torch.arange(4))
    lora2.write_safetensors({"big": torch.tensor([1e5])}, tmp_path / "big.safetensors")
    with pytest.raises(ValueError, match="beyond float16's 65504"):
        study.to_fp16(tmp_path / "big.safetensors", tmp_path / "c.safetensors")


def test_verdict_compares_seed_ranges():
    assert study.verdict([0.8, 0.82], [0.7, 0.79]) == "win"
    assert study.verdict([0.7, 0.79], [0.8, 0.82]) == "loss"
    assert study.verdict([0.7, 0.81], [0.8, 0.82]) == "tie"


def test_choose_steps_fits_the_time_left():
    plan = study.full_plan()
    speeds = {(t, f): (10.0, 0.05) for t in plan.tasks for f in plan.sweep_lrs}   # 10 s start-up, 20 steps/s
    n_sweep = sum(len(v) for v in plan.sweep_lrs.values())                       # 16
    n_grid = len(plan.tasks) * len(plan.methods) * len(plan.seeds) - len(plan.sweep_lrs)  # 144 - 4 reused
    for steps in (1000, 500, 200):
        need = ((n_sweep / 16 + 1) + (n_grid / 16 + 1)) * (10 + 0.05 * steps)    # two Graham bounds, 16 jobs
        assert study.choose_steps(plan, speeds, 16, need + 1) == (steps, pytest.approx(need))
    assert study.choose_steps(plan, speeds, 16, 1.0)[0] == 200                    # nothing fits: the smallest


def test_parse_speed_leaves_the_warm_up_out():
    log = ("step 20/60 | loss 0.7 | R 0.0 | lr 1e-3 | b(t) 8 | 320 ex/s | ETA 4s\n"   # 2 s for 20 steps of 32
           "step 40/60 | loss 0.6 | R 0.0 | lr 1e-3 | b(t) 8 | 427 ex/s | ETA 2s\n"
           "step 60/60 | loss 0.6 | R 0.0 | lr 0.00e+00 | b(t) 8 | 480 ex/s | ETA 0s\n")  # 4 s for 60 steps
    steps, seconds = study.parse_speed(log, 32)
    assert steps == 40 and seconds == pytest.approx(60 * 32 / 480 - 20 * 32 / 320)
    assert study.parse_speed("no progress lines", 32) is None
