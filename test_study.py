"""Tests for experiments/study.py: the --quick plan end to end on a tiny random BERT and synthetic
GLUE files (the paper preset's flags, skipping finished runs, the report), a failing run that does
not stop the study, the time limit, resuming a stopped run from its checkpoint, carrying results
back (pack / unpack), and the pure helpers (the plan's order and flags, verdicts, the fp16 copy,
--prepare's check); experiments/sweep_quick.py's settings and report."""
import argparse
import dataclasses
import json
import random
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import bert
import formats
import train_glue
from experiments import study

HERE = Path(__file__).resolve().parent / "experiments"
WORDS = ("good bad great awful fine poor nice dull movie film plot actor "
         "what who is was the a it").split()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(model folder, GLUE folder): a 2-layer random BERT (fp32), a small RTE and a small
    QNLI dev.tsv."""
    root = tmp_path_factory.mktemp("tiny")
    model_dir, glue = root / "model", root / "glue"
    model_dir.mkdir()
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "?", "."] + WORDS
    (model_dir / "vocab.txt").write_text("\n".join(vocab) + "\n")
    config = bert.tiny_config(vocab_size=len(vocab))
    (model_dir / "config.json").write_text(json.dumps({**dataclasses.asdict(config),
                                                       "model_type": "bert"}))
    torch.manual_seed(0)
    formats.write_safetensors(bert.BertModel(config).state_dict(), model_dir / "model.safetensors")

    rng = random.Random(0)

    def rows(n, end_a, end_b):
        return [f"{i}\t{' '.join(rng.choice(WORDS) for _ in range(rng.randint(3, 8)))} {end_a}\t"
                f"{' '.join(rng.choice(WORDS) for _ in range(rng.randint(3, 8)))} {end_b}\t"
                f"{rng.choice(['entailment', 'not_entailment'])}" for i in range(n)]

    header = {"QNLI": "index\tquestion\tsentence\tlabel\n",
              "RTE": "index\tsentence1\tsentence2\tlabel\n"}
    for task, files in {"QNLI": {"dev": rows(40, "?", ".")},
                        "RTE": {"train": rows(24, ".", "."), "dev": rows(12, ".", ".")}}.items():
        (glue / task).mkdir(parents=True)
        for split, lines in files.items():
            (glue / task / f"{split}.tsv").write_text(header[task] + "\n".join(lines) + "\n")
    return model_dir, glue


def run_study(*args, timeout=600):
    return subprocess.run([sys.executable, str(HERE / "study.py"), *map(str, args)],
                          capture_output=True, text=True, cwd=HERE, timeout=timeout)


def sizes_of(glue):
    return study.train_sizes(study.quick_plan(), glue)


def test_quick_study_end_to_end(tiny, tmp_path):
    pytest.importorskip("peft")
    model_dir, glue = tiny
    # the fp16 copy (as carried to the GPU machine) is what the study trains
    prep = run_study("--quick", "--prepare", tmp_path / "carry", "--model", model_dir,
                     "--data_dir", glue)
    assert prep.returncode == 0, prep.stderr
    fp16, data = tmp_path / "carry" / "model", tmp_path / "carry" / "glue"
    assert study.model_info(fp16)["dtypes"] == ["F16"]
    assert sorted(p.name for p in (data / "RTE").iterdir()) == ["dev.tsv", "train.tsv"]
    out, md = tmp_path / "runs", tmp_path / "RESULTS.md"
    common = ["--quick", "--model", fp16, "--data_dir", data, "--device", "cpu", "--jobs", "2",
              "--out", out, "--results", md]
    first = run_study(*common)
    assert first.returncode == 0, first.stdout + first.stderr

    plan, sizes = study.quick_plan(), sizes_of(data)
    runs = study.plan_runs(plan)
    assert len(runs) == 8
    for run in runs:
        m = json.loads((out / run.id / "metrics.json").read_text())
        assert study.mismatches(run, m, plan, sizes[run.task]) == []
        a = m["args"]
        assert (a["task"], a["seed"], a["batch_size"], a["max_len"]) == (run.task, run.seed, 4, 16)
        # the preset's lr
        lr = study.FULL_LR if run.config.name == "full" else study.paper(run.task, "lr")
        assert a["lr"] == lr and a["r"] == (8 if run.config.name == "lora-r8"
                                            else study.paper(run.task, "r"))
        assert a["gamma"] == (0.0 if "gamma0" in run.config.name
                              else study.paper(run.task, "gamma"))
        T = study.paper_steps(run.task)  # t_i, t_f, warm-up: the preset's fractions of T
        assert a["init_warmup"] == pytest.approx(study.paper(run.task, "t_i") / T)
        assert (m["steps"] == 2 * (sizes[run.task] // 4)
                and not (out / run.id / "train_state.pt").exists())
        rec = json.loads((out / run.id / "study_run.json").read_text())
        assert rec["status"] == "ok" and rec["part"] == run.part + 1 and rec["session"] == 0
    mtimes = {p: p.stat().st_mtime_ns for p in out.glob("*/metrics.json")}

    # a rerun skips every finished run and changes no JSON
    second = run_study(*common)
    assert second.returncode == 0, second.stdout + second.stderr
    assert "0 to run" in second.stdout and "FAILED" not in second.stdout
    assert {p: p.stat().st_mtime_ns for p in out.glob("*/metrics.json")} == mtimes
    state = json.loads((out / "study.json").read_text())
    assert len(state["sessions"]) == 2 and state["epochs"] == {"rte": 2, "qnli": 2}

    text = md.read_text()
    for task in plan.tasks:
        for conf in plan.configs:
            ms = ([json.loads((out / f"{study.run_prefix(plan, task, conf)}-s{s}"
                               / "metrics.json").read_text()) for s in plan.seeds]
                  if (task, conf.name) in {(r.task, r.config.name) for r in runs} else [])
            if not ms:
                continue
            v = sorted(m["main_metric"] for m in ms)
            assert (f"| {conf.label} | {ms[0]['adapter_params']:,} | {ms[0]['head_params']:,} "
                    f"| {ms[0]['steps']:,} | 2 "
                    f"| {100 * np.median(v):.1f} | {100 * v[0]:.1f}–{100 * v[1]:.1f} |") in text
    assert "| C1 | LoRA² k=8 matches or beats LoRA r=8" in text and "| A1 |" in text
    assert ("NON-STANDARD" in text and "travelled as float16" in text
            and "nothing: every planned run finished" in text)
    assert "| 1. must-have: RTE × LoRA² k=8, LoRA r=8 | 4 | 4 |" in text

    # --report_only rebuilds the same report from the JSONs, keeping a hand-written block
    hand = f"{study.HAND_START}\n## Discussion\n\nwritten by hand\n{study.HAND_END}"
    md.write_text(text.replace("## Results per task", hand + "\n\n## Results per task"))
    again = run_study("--quick", "--report_only", "--out", out, "--results", md, "--data_dir", data)
    assert again.returncode == 0, again.stderr
    assert md.read_text() == text.replace("## Results per task", hand + "\n\n## Results per task")


def test_failed_runs_are_logged_and_reported(tiny, tmp_path):
    model_dir, glue = tiny
    out = tmp_path / "runs"
    res = run_study("--quick", "--model", model_dir, "--data_dir", glue, "--device", "cpu",
                    "--jobs", "2", "--gpus", "2", "--parts", "2", "--out", out, "--results",
                    tmp_path / "R.md", "--train_args", "--no_such_flag 1")
    assert res.returncode == 1
    assert "FAILED" in res.stdout and "runs did not finish" in res.stdout
    assert ("unrecognized arguments: --no_such_flag"
            in (out / "qnli-2ep-full-s0" / "log.txt").read_text())
    recs = [json.loads(p.read_text()) for p in out.glob("*/study_run.json")]
    assert len(recs) == 2 and all(r["status"].startswith("failed") for r in recs)
    assert {r["gpu"] for r in recs} == {0, 1}                  # two at a time, one per GPU
    report = (tmp_path / "R.md").read_text()
    assert "- `qnli-2ep-full-s0` (part 2): failed (exit 2)" in report
    assert "- part 1 (must-have: RTE × LoRA² k=8, LoRA r=8): 4 of its runs not run yet" in report
    assert "- `qnli-2ep-full-s1` (part 2): failed (exit 2)" in report
    # no data: a clear error before any run
    empty = tmp_path / "none"
    empty.mkdir()
    res = run_study("--quick", "--model", model_dir, "--data_dir", empty, "--device", "cpu",
                    "--out", tmp_path / "o")
    assert res.returncode == 1 and "study.py: error: GLUE" in res.stderr


def test_time_limit_stops_runs_cleanly(tiny, tmp_path):
    model_dir, glue = tiny
    out = tmp_path / "runs"
    t0 = time.time()     # 2,000 epochs: far longer than the limit; --partial starts them anyway
    res = run_study("--quick", "--model", model_dir, "--data_dir", glue, "--device", "cpu",
                    "--jobs", "2", "--parts", "2", "--epochs", "qnli=2000", "--out", out,
                    "--time_limit", "14", "--reserve", "4", "--partial", "--no_report", "--pack",
                    tmp_path / "p.tar.gz")
    took = time.time() - t0
    assert res.returncode == 1, res.stdout + res.stderr
    assert took < 14 + 12, took  # the limit, plus start-up and the stop's grace
    assert res.stdout.count("stopped qnli-2000ep-") == 2
    recs = {p.parent.name: json.loads(p.read_text()) for p in out.glob("*/study_run.json")}
    assert set(recs) == {"qnli-2000ep-full-s0", "qnli-2000ep-full-s1"}
    assert all(r["status"] == "stopped at the time limit" and r["finished"] is None
               for r in recs.values())
    assert not list(out.glob("*/metrics.json")) and (tmp_path / "p.tar.gz").exists()
    # without --partial nothing is started that is estimated to end after the limit
    res = run_study("--quick", "--model", model_dir, "--data_dir", glue, "--device", "cpu",
                    "--parts", "2", "--epochs", "qnli=2000", "--out", tmp_path / "o2",
                    "--time_limit", "30", "--no_report")
    assert res.returncode == 1 and "0 of 2 runs already done, 2 to run" in res.stdout
    assert not (tmp_path / "o2" / "qnli-2000ep-full-s0").exists()


def test_a_detached_study_is_waited_for_and_packed(tiny, tmp_path):
    model_dir, glue = tiny
    out, back = tmp_path / "runs", tmp_path / "back"
    back.mkdir()
    res = run_study("--quick", "--model", model_dir, "--data_dir", glue, "--device", "cpu",
                    "--parts", "2", "--seeds", "0", "--configs", "full", "--out", out,
                    "--no_report", "--detach", "--wait", "300", "--pack", back / "paper.tar.gz")
    assert res.returncode == 0, res.stdout + res.stderr
    assert ("started the study in the background" in res.stdout
            and "the study ended (exit 0)" in res.stdout)
    with tarfile.open(back / "paper.tar.gz") as tar:
        assert {"console.log", "study.json", "qnli-2ep-full-s0/metrics.json"} <= set(tar.getnames())
    assert "1 to run" in (out / "console.log").read_text() and not (out / "study.pid").exists()
    again = run_study("--quick", "--out", out, "--no_run", "--wait", "30", "--pack",
                      back / "again.tar.gz")
    assert (again.returncode == 0 and "the study is not running" in again.stdout
            and (back / "again.tar.gz").exists())


def test_a_stopped_run_resumes_from_its_checkpoint(tiny, tmp_path):
    model_dir, glue = tiny
    plan, sizes = study.quick_plan(), sizes_of(glue)
    run = next(r for r in study.plan_runs(plan) if r.id == "rte-2ep-lora2-k8-s0")
    args = argparse.Namespace(device="cpu", model=str(model_dir), data_dir=str(glue), compile=False,
                              train_args=None)
    # a run stopped after 6 of its 12 steps, with the checkpoint it saved at step 6
    folder = tmp_path / "runs" / run.id
    cfg = train_glue.parse_config(run.argv(plan, sizes["rte"], args, folder))
    assert (cfg.steps, cfg.epochs, cfg.save_every, cfg.resume) == (None, 2, 6, True)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the study's runs (OMP_NUM_THREADS=1 here)
    try:
        summary, _ = train_glue.train(cfg, stop_at=6)
        # never stopped
        fresh, _ = train_glue.train(dataclasses.replace(cfg, out_dir=str(tmp_path / "fresh")))
    finally:
        torch.set_num_threads(threads)
    assert summary == {"stopped_at": 6} and (folder / "train_state.pt").exists()
    res = run_study("--quick", "--model", model_dir, "--data_dir", glue, "--device", "cpu",
                    "--jobs", "2", "--parts", "1", "--seeds", "0", "--configs", "lora2-k8",
                    "--no_report", "--out", tmp_path / "runs")
    assert res.returncode == 0, res.stdout + res.stderr
    assert ("resumed from" in (folder / "log.txt").read_text()
            and not (folder / "train_state.pt").exists())
    m = json.loads((folder / "metrics.json").read_text())
    assert (m["steps"], m["metrics"], m["final_metrics"], m["best_step"]) == \
        (fresh["steps"], fresh["metrics"], fresh["final_metrics"], fresh["best_step"])


def test_pack_and_unpack_carry_results_and_checkpoints(tmp_path):
    plan = study.quick_plan()
    runs = study.plan_runs(plan)
    src, dst = tmp_path / "device", tmp_path / "here"
    done, half, other = runs[0], runs[1], runs[2]
    for run, files in ((done, ("metrics.json", "study_run.json", "log.txt", "adapter.pt")),
                       (half, ("study_run.json", "log.txt", "train_state.pt")),
                       (other, ("train_state.pt",))):
        (src / run.id).mkdir(parents=True)
        for name in files:
            (src / run.id / name).write_bytes(json.dumps({"run": run.id, "file": name}).encode()
                                              + (b"x" * 2**20 if name == "train_state.pt" else b""))
    (src / "study.json").write_text(json.dumps({"sessions": [
        {"started": "A", "command": "c"}, {"started": "B", "command": "c", "wall_s": 9}]}))
    (tmp_path / "back").mkdir()
    # room for one checkpoint:
    # the first unfinished run's in plan order (`half`)
    files = study.pack(src, tmp_path / "back" / "paper.tar.gz", runs, states_mb=1.5)
    assert [f.name for f in files] == ["paper.tar.gz", "paper.states1.tar"]
    with tarfile.open(files[0]) as tar:
        assert sorted(tar.getnames()) == sorted(["study.json", f"{done.id}/metrics.json",
                                                 f"{done.id}/study_run.json", f"{done.id}/log.txt",
                                                 f"{half.id}/study_run.json", f"{half.id}/log.txt"])
    # here: `other` finished meanwhile (kept as it is); study.json has session A and an older
    # record of B
    (dst / other.id).mkdir(parents=True)
    (dst / other.id / "metrics.json").write_text("{}")
    (dst / "study.json").write_text(json.dumps({"sessions": [
        {"started": "A", "command": "c"}, {"started": "B", "command": "c", "wall_s": 1}]}))
    study.unpack(dst, files)
    for run, name in ((done, "metrics.json"), (done, "log.txt"), (half, "train_state.pt"),
                      (half, "study_run.json")):
        assert (dst / run.id / name).read_bytes() == (src / run.id / name).read_bytes()
    assert (not (dst / done.id / "adapter.pt").exists()
            and not (dst / other.id / "train_state.pt").exists())
    sessions = json.loads((dst / "study.json").read_text())["sessions"]
    assert [(s["started"], s.get("wall_s")) for s in sessions] == [("A", None), ("B", 9)]
    # a member outside the layout is refused
    bad = tmp_path / "bad.tar"
    with tarfile.open(bad, "w") as tar:
        tar.add(src / "study.json", arcname="../study.json")
    with pytest.raises(ValueError, match="unexpected member"):
        study.unpack(dst, [bad])


def test_the_plan_puts_the_must_haves_first_with_the_paper_flags():
    plan = study.full_plan()
    runs = study.plan_runs(plan)
    assert len(runs) == len({r.id for r in runs}) == 4 * 5 * 3 + 2 * 4 * 3
    first = runs[:12]
    assert {(r.task, r.config.name) for r in first} == {(t, c) for t in ("cola", "rte")
                                                        for c in ("lora2-k8", "lora-r8")}
    # longest first
    assert [r.seed for r in first] == [0] * 4 + [1] * 4 + [2] * 4 and first[0].task == "cola"
    assert [r.part for r in runs] == sorted(r.part for r in runs)
    assert [r.task for r in runs if r.part == 2] == ["qnli"] * 15 and runs[-1].config.ablation
    sizes = {"cola": 8551, "rte": 2490, "sst2": 67349, "qnli": 3824}
    steps = {r.task: r.steps(sizes[r.task], 32) for r in runs}
    assert steps == {"cola": 25 * 267, "rte": 50 * 77, "sst2": 2 * 2104, "qnli": 5 * 119}
    by_id = {r.id: r.flags(plan, sizes[r.task]) for r in runs}
    cola, sst2, qnli = (by_id["cola-lora2-k8-s0"], by_id["sst2-2ep-lora2-k8-s0"],
                        by_id["qnli-full-s1"])
    assert (cola["preset"] == "paper" and "epochs" not in cola and cola["mask_interval"] == 10
            and cola["k"] == 8)
    assert cola["eval_every"] == 6675 // 20
    # 8: scaled with T
    assert sst2["epochs"] == 2 and sst2["mask_interval"] == round(100 * 4208 / (24 * 2105))
    assert qnli["dev_split"] == 0.3 and qnli["lr"] == study.FULL_LR and qnli["mask_interval"] == 4
    assert by_id["rte-lora2-k8-noprune-s2"]["target_rank"] == 4 == study.paper("rte", "r")
    assert by_id["cola-lora2-k1-s0"]["k"] == 1 and by_id["cola-lora-r8-s0"]["r"] == 8
    # the preset's r
    assert by_id["rte-adalora-s0"]["method"] == "adalora" and "r" not in by_id["rte-adalora-s0"]
    assert by_id["cola-lora2-k8-scoredall-s0"]["scored"] == "all"
    assert by_id["rte-lora2-k8-paperinit-s1"]["init"] == "paper"
    capped = study.full_plan({"sst2": 4})
    assert study.plan_runs(capped)[-25].id == "sst2-4ep-full-s2"


def test_finished_runs_of_another_plan_are_refused(tmp_path):
    plan = study.quick_plan()
    run = study.plan_runs(plan)[0]
    want = study.expected_config(run, plan, 24)
    # preset, then flags
    assert want["lr"] == study.paper("rte", "lr") and want["k"] == 8 and want["epochs"] == 2
    # a default the study does not set: ignored
    m = {"args": {**want, "lr": 0.5, "length_groups": 1}, "steps": 12}
    (tmp_path / run.id).mkdir()
    (tmp_path / run.id / "metrics.json").write_text(json.dumps(m))
    assert study.mismatches(run, m, plan, 24) == [f"--lr 0.5 (plan: {want['lr']})"]
    assert study.mismatches(run, {**m, "steps": 11}, plan, 24)[-1] == "11 steps (plan: 12)"
    with pytest.raises(SystemExit, match="differ from this plan"):
        study.check_finished(plan, tmp_path, [run], {"rte": 24})


def test_verdicts_and_claims():
    assert study.verdict([0.8, 0.82], [0.7, 0.79]) == "win"
    assert study.verdict([0.7, 0.79], [0.8, 0.82]) == "loss"
    assert study.verdict([0.7, 0.81], [0.8, 0.82]) == "tie"
    plan = study.full_plan()

    r = {("cola", "lora2-k8"): [{"main_metric": x} for x in (0.30, 0.31, 0.33)],
         ("cola", "lora-r8"): [{"main_metric": x} for x in (0.27, 0.29, 0.30)],
         # not learned: majority 0.527
         ("rte", "lora2-k8"): [{"main_metric": x} for x in (0.53, 0.53, 0.54)],
         ("rte", "lora-r8"): [{"main_metric": x} for x in (0.60, 0.61, 0.62)]}
    constants = {"cola": 0.0, "rte": 0.527}
    verdict, cells = study.judge(plan, r, constants, "lora2-k8", "lora-r8")
    assert (verdict == "holds"
            and "cola: 31.0 [30.0–33.0] vs 29.0 [27.0–30.0], n=3/3 → tie (Δ +2.0)" in cells[0])
    assert "not counted: not learned by both" in cells[1]
    r[("cola", "lora-r8")] = [{"main_metric": x} for x in (0.35, 0.36, 0.37)]
    assert study.judge(plan, r, constants, "lora2-k8", "lora-r8")[0] == "does not hold here"
    assert study.judge(plan, r, constants, "lora2-k8", "adalora") == ("cannot tell", [])
    assert study.learned([0.56, 0.57, 0.58], 0.527) and not study.learned([0.52, 0.60, 0.61], 0.527)


def test_fp16_copy_is_the_float16_cast(tmp_path):
    a = np.random.default_rng(0).standard_normal((3, 5)).astype("<f4")
    formats.write_safetensors({"w": torch.from_numpy(a), "ids": torch.arange(4)},
                              tmp_path / "a.safetensors")
    study.to_fp16(tmp_path / "a.safetensors", tmp_path / "b.safetensors")
    back = formats.load_safetensors(tmp_path / "b.safetensors")
    assert (back["w"].dtype == torch.float16
            and torch.equal(back["w"], torch.from_numpy(a.astype(np.float16))))
    assert torch.equal(back["ids"], torch.arange(4))
    formats.write_safetensors({"big": torch.tensor([1e5])}, tmp_path / "big.safetensors")
    with pytest.raises(ValueError, match="beyond float16's 65504"):
        study.to_fp16(tmp_path / "big.safetensors", tmp_path / "c.safetensors")


def test_parse_speed_leaves_the_warm_up_and_earlier_attempts_out():
    # 2 s for 20 steps of 32
    log = ("step 20/60 | loss 0.7 | R 0.0 | lr 1e-3 | b(t) 8 | 320 ex/s | ETA 4s\n"
           "step 40/60 | loss 0.6 | R 0.0 | lr 1e-3 | b(t) 8 | 427 ex/s | ETA 2s\n"
           # 4 s for 60 steps
           "step 60/60 | loss 0.6 | R 0.0 | lr 0.00e+00 | b(t) 8 | 480 ex/s | ETA 0s\n")
    steps, seconds = study.parse_speed(log, 32)
    assert steps == 40 and seconds == pytest.approx(60 * 32 / 480 - 20 * 32 / 320)
    assert study.parse_speed("no progress lines", 32) is None
    resumed = (f"{log}{study.ATTEMPT} later\nresumed from x/train_state.pt at step 40\n"
               # 1 s for 10 steps
               "step 50/60 | loss 0.6 | R 0.0 | lr 1e-3 | b(t) 8 | 320 ex/s | ETA 1s\n"
               # 4 s for 20 steps
               "step 60/60 | loss 0.6 | R 0.0 | lr 1e-3 | b(t) 8 | 160 ex/s | ETA 0s\n")
    assert (study.parse_speed(resumed, 32) == (10, pytest.approx(3.0))
            and study.log_step(resumed) == 60)


def test_prepare_refuses_a_folder_without_the_tasks(tiny, tmp_path):
    model_dir, _ = tiny
    with pytest.raises(SystemExit,
                       match=r"no .*SST-2/dev\.tsv to carry; give --data_dir or GLUE_DIR"):
        study.prepare(tmp_path / "carry", model_dir, tmp_path / "empty", ["sst2"])


def test_quick_sweep_starts_from_the_defaults_and_every_setting_is_a_valid_run():
    from experiments import sweep_quick
    base = train_glue.parse_config(sweep_quick.BASE)
    defaults = train_glue.Config()
    for key in ("task", "train_size", "batch_size", "lr", "gamma", "weight_decay", "max_len"):
        # README's quick run is the sweep's base
        assert getattr(base, key) == getattr(defaults, key), key
    assert base.pooling == defaults.pooling == "mean"  # the packaged MiniLM's pooling
    # the steps by --precision:
    assert defaults.steps is None and base.steps == train_glue.QUICK_STEPS["fp32"]
    # in bf16, a setting of round 3
    bf16 = ["--precision", "bf16", "--steps", str(train_glue.QUICK_STEPS["bf16"])]
    assert bf16 in sweep_quick.ROUNDS[3][1].values()
    for seeds, settings in sweep_quick.ROUNDS.values():
        for name, flags in settings.items():
            cfg = train_glue.parse_config(sweep_quick.BASE + flags)
            changed = {f.name for f in dataclasses.fields(cfg)
                       if getattr(cfg, f.name) != getattr(base, f.name)}
            # what the setting names (base: nothing)
            assert changed == {flag[2:] for flag in flags[::2]}, name


def test_quick_sweep_report_medians_and_order(tmp_path, monkeypatch):
    from experiments import sweep_quick
    rows = [dict(round=1, name=n, flags=f, seed=s, metric=m, wall_s=100.0 + s, device="cpu", rc=0)
            for n, f, ms in (("a", "--lr 1", [0.80, 0.90, 0.85, 0.70]),
                             ("b", "", [0.86, 0.86, 0.86, 0.86]))
            for s, m in enumerate(ms)]
    rows.append(dict(round=1, name="a", flags="--lr 1", seed=9, metric=None, wall_s=1.0,
                     device="cpu", rc=1))
    (tmp_path / "round1.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    sweep_quick.report(tmp_path, tmp_path / "Q.md")
    table = [line for line in (tmp_path / "Q.md").read_text().splitlines()
             if line.startswith("| a") or line.startswith("| b")]
    assert table == [
        # the higher mean first
        "| b | `` | 4 | 86.00 | 86.00 | 86.00 | 0.00 | 86.0 86.0 86.0 86.0 |",
        # failed: left out
        "| a | `--lr 1` | 4 | 81.25 | 82.50 | 85.00 | 20.00 | 80.0 90.0 85.0 70.0 |"]
    assert "8 runs on cpu; 100–103 s a run." in (tmp_path / "Q.md").read_text()


# ----------------------------------------------------------------------------------------------
# the study at base size (--backbone mpnet) and the report of both backbones


def test_the_mpnet_plan_runs_the_five_methods_through_hf_with_mean_pooling():
    plan = study.mpnet_plan()
    runs = study.plan_runs(plan)
    assert plan.backbone == study.MPNET and len(runs) == len({r.id for r in runs}) == 4 * 5 * 3
    first = {(t, c) for t in ("cola", "rte") for c in study.MAIN}
    assert {(r.task, r.config.name) for r in runs[:30]} == first
    assert [r.id for r in runs[:6]] == ["rte-full-s0", "rte-adalora-s0", "rte-lora2-k8-s0",
                                        "rte-lora-r8-s0", "rte-lora2-k1-s0", "cola-full-s0"]
    assert [r.task for r in runs[30:]] == ["qnli"] * 15 + ["sst2"] * 15
    assert runs[-1].id == "sst2-2ep-full-s2"
    args = argparse.Namespace(device="cuda", model="/root/mpnet/model", data_dir="/root/mpnet/glue",
                              compile=True, train_args=None)
    for run in runs:
        argv = run.argv(plan, 2490, args, "/root/mpnet/runs/x")
        assert argv[argv.index("--pooling") + 1] == "mean" and "--model" not in argv
        assert argv[argv.index("--hf") + 1] == "/root/mpnet/model" and "--compile" in argv
    rte = next(r for r in runs if r.id == "rte-lora2-k8-s0")
    want = study.expected_config(rte, plan, 2490)
    assert (want["pooling"], want["k"], want["r"], want["epochs"]) == ("mean", 8, 4, 50)
    cls = {"args": {**want, "pooling": "cls"}, "steps": rte.steps(2490, 32)}  # the MiniLM kind
    assert study.mismatches(rte, cls, plan, 2490) == ["--pooling cls (plan: mean)"]
    full = study.full_plan()
    assert study.expected_config(study.plan_runs(full)[0], full, 8551)["pooling"] == "cls"


def test_backbone_and_task_jobs_errors_are_one_line(tmp_path):
    assert study.parse_task_jobs("rte=3, qnli=2") == {"rte": 3, "qnli": 2}
    assert study.parse_task_jobs(None) == {}
    for bad in ("rte", "rte=0", "nosuch=2", "rte=x"):
        with pytest.raises(SystemExit, match="--task_jobs wants TASK=N"):
            study.parse_task_jobs(bad)
    for args, message in [
            (["--backbone", "mpnet", "--device", "cpu"], "--backbone mpnet needs --model DIR"),
            (["--backbone", "mpnet", "--quick"], "--quick is the MiniLM plan's CI version"),
            (["--backbone", "mpnet", "--prepare", str(tmp_path / "p")], "experiments/mpnet.py"),
            (["--model", str(tmp_path), "--device", "cpu"], "no config.json there")]:
        with pytest.raises(SystemExit) as e:      # a message alone: printed as one line, exit 1
            study.main(args + ["--out", str(tmp_path / "runs")])
        assert str(e.value).startswith("study.py: error: ") and message in str(e.value)
        assert "\n" not in str(e.value)
    assert not (tmp_path / "runs").exists() and not (tmp_path / "p").exists()


def test_task_jobs_caps_a_task_side_by_side(tiny, tmp_path):
    model_dir, glue = tiny
    out = tmp_path / "runs"
    res = run_study("--quick", "--model", model_dir, "--data_dir", glue, "--device", "cpu",
                    "--jobs", "2", "--task_jobs", "rte=1", "--parts", "1", "--seeds", "0",
                    "--out", out, "--no_report")
    assert res.returncode == 0, res.stdout + res.stderr
    records = [json.loads(p.read_text()) for p in out.glob("rte-*/study_run.json")]
    windows = sorted(r["window_s"] for r in records)
    assert len(windows) == 2 and windows[0][1] <= windows[1][0]   # one after the other: --jobs 2


def fake_metrics(run, plan, score):
    """A metrics.json as a finished MPNet run of `plan` writes it, scoring `score` (by hand)."""
    n_train = {"cola": 8551, "rte": 2490}[run.task]
    args = {**study.expected_config(run, plan, n_train), "hf": "/root/mpnet/model"}
    adapter = {"full": 108_895_872, "lora": 1_327_104, "adalora": 663_840,
               "lora2": 166_752 if run.config.name == "lora2-k1" else 1_332_000}[run.method]
    metric = {"cola": "mcc", "rte": "accuracy"}[run.task]
    return {"task": run.task, "method": run.method, "seed": run.seed, "main_metric": score,
            "main_metric_name": metric, "metrics": {metric: score}, "best_step": 10,
            "steps": run.steps(n_train, 32), "adapter_params": adapter, "head_params": 1_538,
            "total_params": 108_895_872 + 1_538 + (0 if run.method == "full" else adapter),
            "kept_singular_values": 216, "rank_pattern": {}, "wall_s": 100.0 + run.seed,
            "train_size": n_train, "non_standard_split": False, "args": args}


def minilm_part(text):
    """RESULTS.md without what the base-size study adds: the backbones' paragraph (it names the
    folders), the side-by-side table and the section."""
    head, rest = text.split("## The claims on both backbones")
    head = "\n\n".join(p for p in head.split("\n\n") if not p.startswith("Two backbones."))
    rest = "## Results per task" + rest.split("## Results per task", 1)[1]
    return head + rest.split("## Base size")[0] + "## Appendix" + rest.split("## Appendix")[1]


def test_report_with_the_base_size_section_regenerates_byte_identically(tmp_path):
    """Hand-made MPNet metrics (CoLA and RTE, five methods, three seeds; none of them committed):
    the base-size section's tables and the side-by-side verdicts come from them, the MiniLM part
    of RESULTS.md stays as committed, and --report_only writes the same bytes again."""
    plan, base = study.mpnet_plan(), tmp_path / "mpnet"
    scores = {"lora2-k8": 0.60, "lora-r8": 0.50, "lora2-k1": 0.58, "adalora": 0.59, "full": 0.61}
    for run in study.plan_runs(plan)[:30]:
        (base / run.id).mkdir(parents=True)
        m = fake_metrics(run, plan, scores[run.config.name] + 0.01 * run.seed)
        (base / run.id / "metrics.json").write_text(json.dumps(m))
    constants = {"cola": 0.0, "rte": 0.527, "qnli": 0.507, "sst2": 0.509}
    (base / "study.json").write_text(json.dumps({"constant_scores": constants,
                                                 "epochs": {"sst2": 2}}))
    md = tmp_path / "RESULTS.md"
    md.write_text((HERE / "RESULTS.md").read_text())                     # its hand-written block
    args = ("--report_only", "--results", md, "--base_out", base, "--data_dir", tmp_path / "none")
    first = run_study(*args)
    assert first.returncode == 0, first.stderr
    text = md.read_text()
    section = text.split("## Base size: MPNet-base")[1]
    assert "has not run" not in section
    assert "| 1. CoLA, RTE × the five methods | 30 | 30 |" in section
    assert "| LoRA² k=8 | 1,332,000 | 1,538 | 6,675 | 3 | 61.0 | 60.0–62.0 | yes |" in section
    # RTE's constant predictor is 52.7: LoRA r=8 at 51.0 did not learn it
    assert "| LoRA r=8 | 1,327,104 | 1,538 | 3,850 | 3 | 51.0 | 50.0–52.0 | no |" in section
    c1, a1 = ([line for line in text.splitlines() if line.startswith(f"| {c} |")][1]
              for c in ("C1", "A1"))                                      # the side-by-side rows
    assert c1.endswith("| **holds**: cola +10.0 win, rte +10.0 win* |")   # MPNet's column
    assert "**does not hold here**: cola +6.0 win, rte +2.9 win*, qnli -1.3 loss" in c1   # MiniLM's
    assert a1.endswith("| not in its plan |")
    assert minilm_part(text) == minilm_part((HERE / "RESULTS.md").read_text())
    again = run_study(*args)
    assert again.returncode == 0 and md.read_text() == text


def test_the_committed_report_regenerates_byte_identically(tmp_path):
    """RESULTS.md is what --report_only writes from the committed metrics.json files."""
    md = tmp_path / "RESULTS.md"
    md.write_text((HERE / "RESULTS.md").read_text())
    res = run_study("--report_only", "--results", md, "--png", tmp_path / "results.png")
    assert res.returncode == 0, res.stderr
    assert md.read_text() == (HERE / "RESULTS.md").read_text()
