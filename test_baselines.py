"""Tests of experiments/baselines.py, the study's baselines (PEFT LoRA, PEFT AdaLoRA, full
fine-tuning): they train in train_glue.py's loop order and count like LoRA², --eval_only reproduces
a run's metric, a resumed run ends exactly like an uninterrupted one, user errors are one line. On
test_train_glue.py's tiny random BERT and synthetic SST-2.
"""
import dataclasses
import json

import pytest
import torch

import bert
from experiments import baselines
from test_train_glue import tiny_config, tiny_folders


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return tiny_folders(tmp_path_factory.mktemp("tiny"))


def baseline_config(tiny, tmp_path, method, **overrides):
    """test_train_glue's tiny_config, for `method`."""
    return baselines.BaselineConfig(**dataclasses.asdict(tiny_config(tiny, tmp_path, **overrides)),
                                    method=method)


def needs(method):
    if method != "full":
        pytest.importorskip("peft")


@pytest.mark.parametrize("method", ["lora", "adalora", "full"])
def test_other_methods_run_and_count_the_same_way(tiny, tmp_path, method):
    """Each baseline trains in the same loop: it counts its parameters like LoRA², its weights move,
    and AdaLoRA's allocator really runs (it prunes 12 × r = 48 singular values to the budget
    12 × target_rank = 24)."""
    needs(method)
    before = bert.from_pretrained(tiny[0], 2)[0].state_dict()
    cfg = baseline_config(tiny, tmp_path, method, steps=8)
    summary, model = baselines.train(cfg)
    assert summary["head_params"] == (32 * 32 + 32) + (32 * 2 + 2)
    # Σ r (d_in + d_out) over the 12 matrices
    lora_r4 = 2 * 4 * (4 * (32 + 32) + (32 + 64) + (64 + 32))
    trained = {n.removeprefix("base_model.model."): p for n, p in model.named_parameters()
               if p.requires_grad}
    if method == "lora":
        assert summary["adapter_params"] == lora_r4
        lora_B = [p for n, p in trained.items() if ".lora_B." in n]
        # B starts at 0: only training moves it
        assert len(lora_B) == 12 and all(p.abs().sum() > 0 for p in lora_B)
    elif method == "adalora":  # lora_A, lora_B, lora_E: r (d_in + d_out) + r per matrix
        assert summary["adapter_params"] == lora_r4 + 12 * 4
        assert len(summary["rank_pattern"]) == 12 and summary["kept_singular_values"] == 12 * 2
    else:
        assert summary["trainable_params"] == summary["total_params"]
        word = "bert.embeddings.word_embeddings.weight"
        assert not torch.equal(trained[word].detach(), before[word])  # the backbone trained
    assert (summary["main_metric"] == summary["metrics"]["accuracy"]
            and summary["best_step"] in (4, 8))
    saved = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert (saved["method"] == saved["args"]["method"] == method
            and saved["main_metric"] == summary["main_metric"])
    export = str(tmp_path / "peft") if method != "full" else None  # as the trained model saves
    metrics = baselines.evaluate_checkpoint(baselines.BaselineConfig(
        method=method, eval_only=True, load=str(tmp_path / "run" / "adapter.pt"),
        data_dir=cfg.data_dir, no_download=True, device="cpu", export_peft=export))
    assert metrics == summary["metrics"]  # exactly
    if export:
        model.save_pretrained(tmp_path / "trained")
        for name in ("adapter_config.json", "adapter_model.safetensors"):
            exported, trained = (tmp_path / "peft" / name), (tmp_path / "trained" / name)
            assert exported.read_bytes() == trained.read_bytes(), name
    other = "full" if method != "full" else "lora"
    with pytest.raises(ValueError, match=f"is a --method {method} run; pass --method {method}"):
        baselines.evaluate_checkpoint(baselines.BaselineConfig(
            method=other, eval_only=True, load=str(tmp_path / "run" / "adapter.pt"), device="cpu"))


@pytest.mark.parametrize("method", ["lora", "adalora", "full"])
def test_resumed_run_ends_exactly_like_an_uninterrupted_one(tiny, tmp_path, method):
    needs(method)
    summary_a, model_a = baselines.train(baseline_config(tiny, tmp_path / "a", method))
    cfg_b = baseline_config(tiny, tmp_path / "b", method, save_every=3)
    # "killed" after step 7; last checkpoint at 6
    assert baselines.train(cfg_b, stop_at=7)[0] == {"stopped_at": 7}
    with pytest.raises(ValueError, match=r"other settings: --lr 0\.01 \(now 0\.02\)"):
        baselines.train(dataclasses.replace(cfg_b, resume=True, lr=2e-2))
    other = "full" if method != "full" else "lora"
    with pytest.raises(ValueError, match=rf"other settings: --method {method} \(now {other}\)"):
        baselines.train(dataclasses.replace(cfg_b, resume=True, method=other))
    summary_b, model_b = baselines.train(dataclasses.replace(cfg_b, resume=True))
    assert (summary_b["metrics"] == summary_a["metrics"]
            and summary_b["best_step"] == summary_a["best_step"])
    assert summary_b["rank_pattern"] == summary_a["rank_pattern"]
    state_a, state_b = model_a.state_dict(), model_b.state_dict()
    assert state_a.keys() == state_b.keys()
    for key in state_a:
        assert torch.equal(state_a[key], state_b[key]), key


def test_a_diverged_run_stops_and_warmups_are_checked_where_they_count(tiny, tmp_path):
    """train_glue.py's checks in the baselines' loop and config: a run whose loss becomes nan stops
    with one line and keeps nothing of it; AdaLoRA's warm-ups must leave a pruning phase (before:
    PEFT's error, after the data loaded), LoRA's and full fine-tuning's do not count."""
    with pytest.raises(ValueError, match=r"^the run diverged: the task loss became nan in steps "
                                         r"\d+-4; lower --lr \(now 1e\+06\) or try --clip 1 "
                                         r"\(now 0: no clipping\)"):
        baselines.train(baseline_config(tiny, tmp_path, "full", steps=8, lr=1e6, clip=0))
    assert not (tmp_path / "run").exists()
    short = {**dataclasses.asdict(tiny_config(tiny, tmp_path)), "steps": 3, "init_warmup": 0.5,
             "final_warmup": 0.49}
    with pytest.raises(ValueError, match=r"^--init_warmup 0\.5 and --final_warmup 0\.49 of 3 steps "
                                         r"\(--steps\) round to 2 \+ 1 steps, leaving no pruning"):
        baselines.BaselineConfig(**short, method="adalora")
    for method in ("lora", "full"):
        baselines.BaselineConfig(**short, method=method)


def test_user_errors_are_one_line(tiny, tmp_path, capsys):
    for argv, message in [([], "--method is required: one of lora, adalora, full"),
                          (["--method", "full", "--export_peft", str(tmp_path / "peft")],
                           "--export_peft needs an adapter method, not full fine-tuning"),
                          (["--method", "full", "--model", str(tmp_path / "nowhere"), "--out_dir",
                            str(tmp_path / "r")],
                           "nowhere")]:
        with pytest.raises(SystemExit) as e:
            baselines.main(argv)
        assert (isinstance(e.value.code, str)
                and e.value.code.startswith("baselines.py: error: ")), e.value.code
        assert message in e.value.code and "\n" not in e.value.code
    assert not (tmp_path / "r").exists()  # a run that failed before its first save leaves no folder
    with pytest.raises(SystemExit):
        baselines.main(["--method", "lora2"])  # LoRA² is train_glue.py's
    assert "invalid choice: 'lora2'" in capsys.readouterr().err
