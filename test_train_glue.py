"""Tests of train_glue.py: GLUE readers, fetch, metrics, the loop (eval-only, resume, DDP), end to
end (the baselines: test_baselines.py).

The loop tests use a tiny random BERT (hidden 32, 2 layers) saved as a checkpoint folder and tiny
synthetic GLUE files, so they take seconds; one end-to-end test fine-tunes the packaged MiniLM on
real SST-2 (shipped in data/, or $GLUE_DIR's).
"""
import dataclasses
import json
import os
import re
import shutil
import socket
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

import bert
import compiled
import lora2
import rundir
import train_glue as tg

WORDS = ["good", "bad", "movie", "the", "a", "is", "very", "not", "film", "plot", "fun", "dull",
         ".", ","]


def write(path, lines):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


def synthetic_sst2(folder, n_train=64, n_dev=32, seed=0):
    """SST-2-format files whose label is 1 exactly when the sentence contains "good"."""
    g = torch.Generator().manual_seed(seed)
    def rows(n):
        out = ["sentence\tlabel"]
        for i in range(n):
            words = [WORDS[j] for j in torch.randint(2, len(WORDS),
                                                     (int(torch.randint(3, 9, (1,), generator=g)),),
                                                     generator=g)]
            words.insert(int(torch.randint(0, len(words), (1,), generator=g)),
                         "good" if i % 2 else "bad")
            out.append(" ".join(words) + f" \t{i % 2}")
        return out
    write(folder / "SST-2" / "train.tsv", rows(n_train))
    write(folder / "SST-2" / "dev.tsv", rows(n_dev))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return tiny_folders(tmp_path_factory.mktemp("tiny"))


def tiny_folders(root):
    """(model folder, GLUE folder) under root: a random 2-layer BERT checkpoint and synthetic
    SST-2."""
    model_dir = root / "bert"
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + WORDS
    write(model_dir / "vocab.txt", vocab)
    config = bert.tiny_config(vocab_size=len(vocab))
    (model_dir / "config.json").write_text(json.dumps({**dataclasses.asdict(config),
                                                       "model_type": "bert"}))
    torch.manual_seed(0)
    torch.save(bert.BertModel(config).state_dict(), model_dir / "pytorch_model.bin")
    synthetic_sst2(root / "glue")
    return model_dir, root / "glue"


def tiny_config(tiny, tmp_path, **overrides):
    model_dir, glue = tiny
    values = dict(model=str(model_dir), data_dir=str(glue), no_download=True,
                  out_dir=str(tmp_path / "run"), train_size=None, steps=12, batch_size=8, lr=1e-2,
                  r=4, k=4, target_rank=2, init_warmup=0.25, final_warmup=0.25, mask_interval=2,
                  eval_every=4, log_every=4, max_len=32, device="cpu", pooling="cls",
                  precision="fp32")  # fp32: the same arithmetic on every CPU
    return tg.Config(**{**values, **overrides})


# --------------------------------------------------------------------------------------------------
# configuration


def test_cli_defaults_preset_and_validation():
    assert tg.parse_config([]) == tg.Config()
    cfg = tg.parse_config(["--task", "rte", "--preset", "paper", "--lr", "1e-3"])
    T_paper = 50 * 78  # 50 epochs of ceil(2490 / 32) steps
    assert ((cfg.lr, cfg.r, cfg.target_rank, cfg.alpha, cfg.gamma, cfg.max_len)
            == (1e-3, 4, 3, 32, 0.3, 320))
    assert ((cfg.init_warmup, cfg.final_warmup, cfg.warmup)
            == (600 / T_paper, 1800 / T_paper, 200 / T_paper))
    assert (cfg.epochs, cfg.steps, cfg.train_size) == (50, None, None)
    assert tg.parse_config(["--target_rank", "9"]).target_rank == 9  # lora2.Pruner checks it
    with pytest.raises(ValueError, match="no hyperparameters for 'wnli'"):
        tg.parse_config(["--task", "wnli", "--preset", "paper"])


def test_a_length_on_the_command_line_wins_over_the_preset():
    """--steps replaces the epochs of --preset paper (its other settings stay); --steps with
    --epochs is an error. Before: --preset paper --steps 2 ran the preset's epochs, --steps 3
    --epochs 0.5 ran 4 steps."""
    cfg = tg.parse_config(["--task", "rte", "--preset", "paper", "--steps", "2"])
    assert (cfg.steps, cfg.epochs, cfg.lr, cfg.r) == (2, None, 1.2e-3, 4)
    assert tg.run_length(cfg, 2490, "fp32") == (2, "--steps")
    cfg = tg.parse_config(["--task", "rte", "--preset", "paper", "--epochs", "2"])
    assert (cfg.steps, cfg.epochs) == (None, 2)
    assert tg.run_length(cfg, 2490, "fp32") == (2 * 77, "--epochs 2")  # 77 batches of 32
    with pytest.raises(ValueError, match="^give --steps or --epochs, not both$"):
        tg.parse_config(["--steps", "3", "--epochs", "0.5"])


def test_rank_heatmap_text():
    pattern = {"bert.encoder.layer.0.attention.self.query": [True, False, False, False],
               "bert.encoder.layer.0.output.dense": [True] * 4,
               "bert.encoder.layer.1.attention.self.query": [False] * 4,
               "bert.encoder.layer.1.output.dense": [True, True, False, False]}
    assert rundir.rank_heatmap(pattern, 4) == ("layer  query output\n"
                                           "   L0 ░    1 █    4\n"
                                           "   L1      0 ▒    2")


# --------------------------------------------------------------------------------------------------
# the loop on a tiny random BERT


def adapter_and_head(model):
    return lora2.adapter_state_dict(model)  # the factors, the masks and the trained head


def test_train_counts_prunes_and_eval_only_reproduces_the_metric(tiny, tmp_path, capsys):
    cfg = tiny_config(tiny, tmp_path)
    summary, model = tg.train(cfg)
    # matrices: 2 layers × (query, key, value, attention.output.dense, intermediate.dense,
    # output.dense)
    n = 2 * 6
    per_layer_dims = [(32, 32)] * 4 + [(32, 64), (64, 32)]
    assert summary["adapter_params"] == 2 * sum(4 * (i + o) + 2 * 4 * 4 + 4
                                                for i, o in per_layer_dims)
    assert summary["head_params"] == (32 * 32 + 32) + (32 * 2 + 2)  # pooler + classifier
    assert (summary["kept_singular_values"] == n * 2
            and len(summary["rank_pattern"]) == n)  # pruned to target 2
    saved = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert saved["main_metric"] == summary["metrics"]["accuracy"] and saved["best_step"] >= 12 - 3
    out = capsys.readouterr()
    assert ("step 12/12 | loss" in out.err and "b(t)" in out.err and "ex/s" in out.err
            and "ETA" in out.err)
    assert "rank pattern" in out.out and "   L1 " in out.out
    metrics = rundir.evaluate_saved(tg.Config(eval_only=True,
                                              load=str(tmp_path / "run" / "adapter.pt"),
                                              data_dir=cfg.data_dir, no_download=True,
                                              device="cpu"), tg.LoRA2)
    assert metrics == summary["metrics"]  # exactly


def test_compile_default_by_device_processes_and_run_length():
    assert [tg.parse_config(argv).compile
            for argv in ([], ["--compile"], ["--no-compile"])] == [None, True, False]
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    long, short = compiled.MIN_STEPS, compiled.MIN_STEPS - 1
    assert ([compiled.resolve(None, *case)[0]
             for case in ((cpu, 1, long), (cuda, 1, long), (cuda, 2, long), (cuda, 1, short))]
            == [False, True, False, False])
    assert compiled.resolve(None, cuda, 1, short)[1] == (f"auto: {short} steps, fewer than the "
                                                         f"{long} that pay for compiling")
    # compiled DDP: no CUDA graphs, allowed
    assert compiled.resolve(True, cuda, 2, 10) == (True, "--compile")


@pytest.fixture
def duck_shapes():
    """torch's default use_duck_shape=True during the test (compiled.compile_blocks sets it off for
    good); through the config's own patch(), which restores it (pytest's monkeypatch deletes a
    config entry on undo)."""
    with torch.fx.experimental._config.patch(use_duck_shape=True):
        yield


def test_compiled_step_trains_like_the_eager_one(tiny, tmp_path, duck_shapes):
    """--compile on the CPU: the blocks through torch.compile with the aot_eager backend (dynamo +
    AOTAutograd, no compiler), reading lora2's grouped (A, B) pairs, batches padded to bucket
    lengths. Without dropout (whose random numbers differ between eager and compiled code) it ends
    where eager training ends, up to rounding: the same rank pattern and metrics, adapter and head
    within 1e-5 (6e-8 measured)."""
    model_dir = tmp_path / "bert-nodrop"
    shutil.copytree(tiny[0], model_dir)
    config = json.loads((model_dir / "config.json").read_text())
    config.update(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    (model_dir / "config.json").write_text(json.dumps(config))
    runs = {}
    for mode in ("eager", "compiled"):
        cfg = tiny_config(tiny, tmp_path / mode, model=str(model_dir), steps=8, eval_every=0,
                          compile=mode == "compiled", compile_backend="aot_eager")
        torch._dynamo.reset()
        torch._dynamo.utils.counters.clear()
        runs[mode] = tg.train(cfg)
        if mode == "compiled":
            # the blocks (one graph for all)
            assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1
    (eager, eager_model), (fast, fast_model) = runs["eager"], runs["compiled"]
    assert fast["args"]["compile"] is True and eager["args"]["compile"] is False
    assert fast["rank_pattern"] == eager["rank_pattern"] and fast["metrics"] == eager["metrics"]
    state_eager, state_fast = adapter_and_head(eager_model), adapter_and_head(fast_model)
    for key in state_eager:
        torch.testing.assert_close(state_fast[key], state_eager[key], rtol=1e-4, atol=1e-5, msg=key)
    torch._dynamo.reset()


def test_mean_pooling_is_the_default_trains_the_classifier_alone_and_reloads(tiny, tmp_path):
    cfg = tiny_config(tiny, tmp_path, pooling=None)    # the default: mean (cls with --hf)
    summary, model = tg.train(cfg)
    assert summary["args"]["pooling"] == "mean" and model.bert.pooler is None
    assert summary["head_params"] == 32 * 2 + 2        # the classifier; there is no pooler
    metrics = rundir.evaluate_saved(tg.Config(eval_only=True,
                                              load=str(tmp_path / "run" / "adapter.pt"),
                                              data_dir=cfg.data_dir, no_download=True,
                                              device="cpu"), tg.LoRA2)
    assert metrics == summary["metrics"]  # exactly


def test_resumed_run_ends_exactly_like_an_uninterrupted_one(tiny, tmp_path):
    summary_a, model_a = tg.train(tiny_config(tiny, tmp_path / "a"))
    cfg_b = tiny_config(tiny, tmp_path / "b", save_every=3)
    # "killed" after step 7; last checkpoint at step 6
    assert tg.train(cfg_b, stop_at=7)[0] == {"stopped_at": 7}
    with pytest.raises(ValueError, match=r"other settings: --lr 0\.01 \(now 0\.02\)"):
        tg.train(dataclasses.replace(cfg_b, resume=True, lr=2e-2))
    summary_b, model_b = tg.train(dataclasses.replace(cfg_b, resume=True))
    assert (summary_b["metrics"] == summary_a["metrics"]
            and summary_b["best_step"] == summary_a["best_step"])
    assert summary_b["rank_pattern"] == summary_a["rank_pattern"]
    state_a, state_b = adapter_and_head(model_a), adapter_and_head(model_b)
    assert state_a.keys() == state_b.keys()
    for key in state_a:
        assert torch.equal(state_a[key], state_b[key]), key


def _ddp_worker(rank, cfg, out, port):
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    summary, model = tg.train(tg.Config(**cfg))
    torch.save({"pattern": summary["rank_pattern"], "state": adapter_and_head(model),
                "metrics": summary["metrics"]}, Path(out) / f"rank{rank}.pt")


def test_ddp_two_gloo_processes_keep_identical_masks_and_weights(tiny, tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cfg = dataclasses.asdict(tiny_config(tiny, tmp_path, eval_every=0))
    mp.spawn(_ddp_worker, args=(cfg, str(tmp_path), port), nprocs=2)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    assert r0["pattern"] == r1["pattern"] and r0["metrics"] == r1["metrics"]
    assert sum(map(sum, r0["pattern"].values())) == 12 * 2  # pruning happened
    for key in r0["state"]:
        assert torch.equal(r0["state"][key], r1["state"][key]), key
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["world_size"] == 2


def test_hf_backbone_runs_the_same_loop(tiny, tmp_path):
    transformers = pytest.importorskip("transformers")
    model_dir, _ = tiny
    hf_dir = tmp_path / "hf-bert"
    config = transformers.BertConfig(vocab_size=len((model_dir / "vocab.txt").read_text().split()),
                                     hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=64)
    transformers.BertModel(config).save_pretrained(hf_dir)
    transformers.BertTokenizerFast(vocab_file=str(model_dir / "vocab.txt")).save_pretrained(hf_dir)
    summary, model = tg.train(tiny_config(tiny, tmp_path, model=None, hf=str(hf_dir),
                                          pooling=None))  # cls with --hf
    assert len(lora2.lora2_modules(model)) == 12 and summary["kept_singular_values"] == 12 * 2
    assert summary["head_params"] == (32 * 32 + 32) + (32 * 2 + 2)


def test_export_peft_writes_the_rank_pattern(tiny, tmp_path, capsys):
    summary, _ = tg.train(tiny_config(tiny, tmp_path, export_peft=str(tmp_path / "peft")))
    config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    kept = {name: min(4, sum(mask)) for name, mask in summary["rank_pattern"].items() if any(mask)}
    assert {re.sub(r"\\(.)", r"\1", key.lstrip("^")): r
            for key, r in config["rank_pattern"].items()} == kept
    # --eval_only --export_peft: the loaded adapter, exported byte for byte as the run exported it
    again = ["--eval_only", "--load", str(tmp_path / "run" / "adapter.pt"), "--device", "cpu",
             "--export_peft", str(tmp_path / "again")]
    tg.main(again)
    assert f"wrote a PEFT LoRA adapter to {tmp_path / 'again'}" in capsys.readouterr().out
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        assert (tmp_path / "again" / name).read_bytes() == (tmp_path / "peft" / name).read_bytes()
    with pytest.raises(SystemExit, match="already holds a PEFT adapter; pass --overwrite"):
        tg.main(again)
    tg.main(again + ["--overwrite"])


# --------------------------------------------------------------------------------------------------
# end to end: the packaged MiniLM on real SST-2


def test_minilm_learns_sst2(tmp_path, monkeypatch):
    """Real SST-2 as a user's run finds it: in $GLUE_DIR if that holds SST-2, else the copy in
    data/."""
    monkeypatch.chdir(tmp_path)  # no ./glue_data here
    if not (Path(os.environ.get("GLUE_DIR", tmp_path)) / "SST-2" / "dev.tsv").exists():
        monkeypatch.delenv("GLUE_DIR", raising=False)  # a GLUE_DIR without SST-2 is an error
    cfg = tg.Config(train_size=1600, eval_size=200, steps=50, batch_size=32, lr=5e-3, target_rank=8,
                    log_every=25, out_dir=str(tmp_path / "run"), no_download=True,
                    device="cpu")  # 50 steps of 32, no pruning
    summary, _ = tg.train(cfg)
    assert summary["main_metric"] >= 0.68  # 0.735 measured; chance is 0.5 ± 0.035 on 200 examples
