"""LoRA² on Hugging Face models, exported as PEFT LoRA adapters (SPEC §6), and the docs' examples
(README.md, docs/peft.md) run as written.

Every model is built from a tiny randomly initialised transformers config: nothing is downloaded.
transformers, peft and safetensors are optional dependencies (pytest.importorskip); without them
these tests are skipped.
"""
import copy
import json
import os
import pathlib
import re

import pytest
import torch

import formats
import lora2
import rundir

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing is downloaded, ever
pytestmark = pytest.mark.filterwarnings(
    "ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")
V = 99  # vocabulary size of every tiny model
BERT_TARGETS = ["query", "key", "value", "attention.output.dense", "intermediate.dense",
                "output.dense"]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models run fastest on one thread; more only contend for the shared cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny(arch):
    """(model in eval mode, LoRA² targets, prefixes of the head's parameters, number of adapted
    layers)."""
    T = pytest.importorskip("transformers")
    size = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37,
                vocab_size=V)
    if arch == "bert":
        model = T.BertForSequenceClassification(T.BertConfig(num_labels=3, **size))
        return model.eval(), BERT_TARGETS, ("bert.pooler.", "classifier."), 12
    if arch == "roberta":
        config = T.RobertaConfig(num_labels=3, pad_token_id=1, max_position_embeddings=40, **size)
        return T.RobertaForSequenceClassification(config).eval(), BERT_TARGETS, ("classifier.",), 12
    if arch == "deberta-v2":
        config = T.DebertaV2Config(num_labels=3, relative_attention=True, position_buckets=8,
                                   pos_att_type=["p2c", "c2p"], norm_rel_ebd="layer_norm",
                                   share_att_key=True, **size)
        targets = ["query_proj", "key_proj", "value_proj"] + BERT_TARGETS[3:]
        return (T.DebertaV2ForSequenceClassification(config).eval(), targets,
                ("pooler.", "classifier."), 12)
    if arch == "gpt2":
        config = T.GPT2Config(vocab_size=V, n_embd=32, n_layer=2, n_head=4, n_positions=40,
                              bos_token_id=0, eos_token_id=0)
        # c_proj: attention and MLP
        return T.GPT2LMHeadModel(config).eval(), ["c_attn", "c_proj", "c_fc"], (), 8
    if arch == "llama":
        config = T.LlamaConfig(num_key_value_heads=2, max_position_embeddings=40,
                               tie_word_embeddings=False, **size)
        targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
        return T.LlamaForCausalLM(config).eval(), targets, (), 14
    raise ValueError(arch)


ARCHS = ["bert", "roberta", "deberta-v2", "gpt2", "llama"]


def batch():
    """Token ids (2, 7) with the second sequence padded, as a dict of forward arguments."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, V, (2, 7), generator=g)
    mask = torch.ones(2, 7, dtype=torch.long)
    mask[1, 5:] = 0
    return {"input_ids": ids, "attention_mask": mask}


@torch.no_grad()
def run(model):
    """The last hidden state (O(1) entries) and the logits (small for a fresh head), flattened into
    one vector."""
    out = model(**batch(), output_hidden_states=True)
    return torch.cat([out.hidden_states[-1].flatten(), out.logits.flatten()])


@torch.no_grad()
def randomise(model, seed=1):
    """λ ~ 0.5·N(0, 1) and perturbed factors for every LoRA² layer (λ = 0 would hide every export
    error)."""
    g = torch.Generator().manual_seed(seed)
    for m in lora2.lora2_modules(model).values():
        m.lambda_.copy_(0.5 * torch.randn(m.r, generator=g))
        for p in (m.P_outer, m.P_inner, m.Q_inner, m.Q_outer):
            p.add_(0.1 * torch.randn(p.shape, generator=g))


@torch.no_grad()
def randomise_head(model, prefixes, seed=2):
    """Give the classification head weights that differ from the base model's, as training would."""
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        if name.startswith(prefixes):
            p.copy_(torch.randn(p.shape, generator=g))


# ------------------------------------------------------------------------------------------- inject


@pytest.mark.parametrize("arch", ARCHS)
def test_inject_on_transformers_models(arch):
    torch.manual_seed(0)
    model, targets, head, n_layers = tiny(arch)
    reference = run(model)
    linear = {n: m for n, m in model.named_modules() if lora2._is_linear(m)}
    weights = {n: (m.weight, m.weight.data_ptr()) for n, m in linear.items()}
    names = lora2.inject(model, targets, r=4, k=3, alpha=8)
    adapted = lora2.lora2_modules(model)
    assert len(names) == n_layers and list(adapted) == names

    # The frozen weight is the very tensor of the original layer, never a copy (GPT-2's Conv1D
    # stores it transposed).
    for name, m in adapted.items():
        assert m.base is linear[name]
        assert m.base.weight is weights[name][0] and m.base.weight.data_ptr() == weights[name][1]
        assert m.fan_in_fan_out == (arch == "gpt2")
        w = m.base.weight
        assert (m.out_features, m.in_features) == (tuple(w.shape)[::-1] if m.fan_in_fan_out
                                                   else tuple(w.shape))

    # Only the adapters and the head train; λ = 0 leaves the outputs unchanged bit for bit.
    for pname, p in model.named_parameters():
        module, _, leaf = pname.rpartition(".")
        is_adapter = module in adapted and leaf in lora2.ADAPTER_KEYS
        assert p.requires_grad == (is_adapter or pname.startswith(head)), pname
    assert torch.equal(run(model), reference)

    randomise(model)
    adapted_out = run(model)
    assert (adapted_out - reference).abs().max() > 1e-2  # the adapters do change the model
    lora2.merge(model)
    torch.testing.assert_close(run(model), adapted_out, rtol=1e-5, atol=1e-5)
    # merged in place
    assert all(m.base.weight.data_ptr() == weights[n][1] for n, m in adapted.items())
    lora2.unmerge(model)
    torch.testing.assert_close(run(model), adapted_out, rtol=1e-5, atol=1e-5)
    plain = lora2.merge_and_unload(copy.deepcopy(model))
    assert not lora2.lora2_modules(plain)
    assert all(type(plain.get_submodule(n)) is type(linear[n]) for n in names)
    torch.testing.assert_close(run(plain), adapted_out, rtol=1e-5, atol=1e-5)


# -------------------------------------------------------------------------------------- safetensors


def test_safetensors_writer_is_read_by_the_safetensors_package(tmp_path):
    st = pytest.importorskip("safetensors.torch")
    from safetensors import safe_open
    torch.manual_seed(0)
    big = torch.randn(6, 5)
    tensors = {
        "f32": torch.randn(3, 4),
        "bf16": torch.randn(2, 3).bfloat16(),
        "f16": torch.randn(5).half(),
        "i64": torch.arange(7),
        "bool": torch.tensor([True, False, True]),
        "empty": torch.zeros(0, 4),  # a LoRA factor of rank 0
        "transposed": big.T,  # not contiguous: written row-major all the same
        "slice": big[2:4],  # a view into a larger storage: only its own bytes are written
        "scalar": torch.tensor(1.5),
    }
    path = tmp_path / "t.safetensors"
    formats.write_safetensors(tensors, path, metadata={"format": "pt"})
    loaded = st.load_file(path)
    assert set(loaded) == set(tensors)
    for key, t in tensors.items():
        assert loaded[key].dtype == t.dtype and torch.equal(loaded[key], t), key
    with safe_open(path, framework="pt") as f:
        assert f.metadata() == {"format": "pt"}
    # padded header
    assert len(path.read_bytes()[8:8 + int.from_bytes(path.read_bytes()[:8], "little")]) % 8 == 0

    formats.write_safetensors({}, tmp_path / "empty.safetensors")  # no tensor at all
    assert st.load_file(tmp_path / "empty.safetensors") == {}
    assert not list(tmp_path.glob("*.tmp"))  # written atomically
    with pytest.raises(ValueError, match=r"'c' has dtype torch.complex64, not one of"):
        formats.write_safetensors({"c": torch.zeros(2, dtype=torch.complex64)},
                                  tmp_path / "c.safetensors")


# ---------------------------------------------------------------------------------------- save_peft

# non-zero λ per layer, in turn: r' > k (rank k), r' ≤ k, pruned to rank 0, rank 1
RANK_CYCLE = (6, 2, 0, 1)


@torch.no_grad()
def prune_by_hand(model):
    """Zero λ so layers get different ranks, some rank 0; returns {layer: expected LoRA
    rank min(k, r')}."""
    expected = {}
    for i, (name, m) in enumerate(lora2.lora2_modules(model).items()):
        kept = RANK_CYCLE[i % len(RANK_CYCLE)]
        m.lambda_[kept:] = 0
        expected[name] = min(m.k, kept)
    return expected


def lora_ranks(peft_model, names):
    """{layer: rank of PEFT's LoRA there, or 0 where the layer has none} and check PEFT's scaling is
    exactly 1."""
    from peft.tuners.lora import LoraLayer
    ranks = {}
    for name in names:
        layer = peft_model.base_model.model.get_submodule(name)
        ranks[name] = layer.lora_A["default"].weight.shape[0] if isinstance(layer, LoraLayer) else 0
        if ranks[name]:
            assert layer.scaling["default"] == 1.0
    return ranks


@pytest.mark.parametrize("arch", ARCHS)
def test_save_peft_loads_in_peft_with_the_same_outputs(arch, tmp_path):
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    base, targets, head, _ = tiny(arch)
    model = copy.deepcopy(base)
    names = lora2.inject(model, targets, r=6, k=3, alpha=12)
    randomise(model)
    randomise_head(model, head)
    expected = prune_by_hand(model)
    # rank 0, r' ≤ k and r' > k all present
    assert min(expected.values()) == 0 and max(expected.values()) == 3
    reference = run(model)
    assert (reference - run(base)).abs().max() > 1e-2

    ranks = rundir.save_peft(model, tmp_path, base_model_name_or_path=f"tiny-{arch}")
    assert ranks == {n: r for n, r in expected.items() if r}
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert (config["target_modules"] == sorted(ranks)
            and config["base_model_name_or_path"] == f"tiny-{arch}")
    assert config["fan_in_fan_out"] == (arch == "gpt2")
    saved_heads = sorted({n.rpartition(".")[0] for n, p in model.named_parameters()
                          if n.startswith(head)})
    # the trained head travels with the adapter
    assert sorted(config["modules_to_save"] or []) == saved_heads

    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path).eval()
    assert lora_ranks(loaded, names) == expected
    assert (run(loaded) - reference).abs().max() <= 1e-5


def test_pattern_keys_are_unambiguous_in_peft(tmp_path):
    """PEFT matches a rank_pattern key as a regex on the end of a module name: "output.dense" also
    matches "attention.output.dense". save_peft's keys select exactly one module each, here with
    different ranks."""
    pytest.importorskip("peft")
    from peft.utils.other import get_pattern_key
    assert get_pattern_key(["output.dense"],
                           "bert.encoder.layer.0.attention.output.dense") == "output.dense"

    torch.manual_seed(0)
    model, targets, head, _ = tiny("bert")
    lora2.inject(model, targets, r=6, k=3)
    randomise(model)
    layers = lora2.lora2_modules(model)
    with torch.no_grad():
        layers["bert.encoder.layer.0.attention.output.dense"].lambda_[1:] = 0  # rank 1
        layers["bert.encoder.layer.0.output.dense"].lambda_[2:] = 0  # rank 2
    rundir.save_peft(model, tmp_path)
    pattern = json.loads((tmp_path / "adapter_config.json").read_text())["rank_pattern"]
    for name, _ in model.named_modules():
        if name.startswith(tuple(f"{n}." for n in layers)):
            continue  # LoRA2Linear internals do not exist in the model PEFT sees
        key = get_pattern_key(list(pattern), name)
        assert (pattern.get(key) is not None) == (name in layers), name
        if name in layers:
            assert pattern[key] == min(3, layers[name].rank)
    assert pattern[get_pattern_key(list(pattern),
                                   "bert.encoder.layer.0.attention.output.dense")] == 1
    assert pattern[get_pattern_key(list(pattern), "bert.encoder.layer.0.output.dense")] == 2


def test_save_peft_after_pruning_with_the_pruner(tmp_path):
    """Ranks set by the Pruner (SPEC §4 step order), some layers pruned to rank 0, the trained head
    included."""
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    base, targets, head, n_layers = tiny("bert")
    model = copy.deepcopy(base).train()
    lora2.inject(model, targets, r=4, k=2)
    T = 8
    pruner = lora2.Pruner(model, target_rank=1, total_steps=T, init_warmup=1, final_warmup=2,
                          mask_interval=1, target_total=n_layers // 2)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    x, y = batch(), torch.tensor([0, 2])
    for step in range(T):
        loss = model(**x, labels=y).loss + 0.1 * lora2.orthogonal_regularizer(model)
        loss.backward()
        opt.step()
        pruner.step(step)
        opt.zero_grad()
    model.eval()
    ranks = {n: m.rank for n, m in lora2.lora2_modules(model).items()}
    assert sum(ranks.values()) == n_layers // 2 and 0 in ranks.values()
    rundir.save_peft(model, tmp_path)
    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path).eval()
    assert lora_ranks(loaded, ranks) == {n: min(2, r) for n, r in ranks.items()}
    assert (run(loaded) - run(model)).abs().max() <= 1e-5


def test_bert_py_model_exports_to_peft_on_the_transformers_model(tmp_path):
    """What `train_glue.py --export_peft` does: a LoRA² adapter trained on bert.py's BERT (Hugging
    Face names), its head included, loaded by PEFT on transformers' BertForSequenceClassification
    with the same weights."""
    peft = pytest.importorskip("peft")
    bert = pytest.importorskip("bert")
    torch.manual_seed(0)
    hf, targets, head, _ = tiny("bert")
    config = bert.BertConfig(vocab_size=V, hidden_size=32, num_hidden_layers=2,
                             num_attention_heads=4, intermediate_size=37,
                             max_position_embeddings=hf.config.max_position_embeddings)
    ours = bert.BertForSequenceClassification(config, num_labels=3).eval()
    missing, unexpected = ours.load_state_dict(hf.state_dict(), strict=False)
    assert not missing and all("position_ids" in k for k in unexpected)
    lora2.inject(ours, targets, r=6, k=3)
    randomise(ours)
    randomise_head(ours, head)
    prune_by_hand(ours)
    rundir.save_peft(ours, tmp_path)
    x = batch()
    with torch.no_grad():
        expected = ours(x["input_ids"], x["attention_mask"])  # logits (2, 3)
        assert (hf(**x).logits - expected).abs().max() > 1e-2
        loaded = peft.PeftModel.from_pretrained(hf, tmp_path).eval()
        assert (loaded(**x).logits - expected).abs().max() <= 1e-5


def test_save_peft_modules_to_save_and_errors(tmp_path):
    torch.manual_seed(0)
    model, targets, head, _ = tiny("bert")
    lora2.inject(model, targets, r=2, k=2)
    with pytest.raises(ValueError, match="nothing to export: none of the model's 12 LoRA2Linear "
                                         "layers has a non-zero"):
        rundir.save_peft(model, tmp_path / "zero")  # λ = 0 everywhere: every layer has rank 0
    assert not (tmp_path / "zero").exists()
    with pytest.raises(ValueError, match="none of the model's 0 LoRA2Linear layers"):
        rundir.save_peft(torch.nn.Linear(2, 2).requires_grad_(False), tmp_path / "zero")
    randomise(model)

    rundir.save_peft(model, tmp_path / "a")
    config = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    # inferred from what inject unfroze
    assert config["modules_to_save"] == ["bert.pooler.dense", "classifier"]
    assert config["r"] == config["lora_alpha"] == 2 and config["peft_type"] == "LORA"
    key = "^" + re.escape("bert.encoder.layer.1.output.dense")
    assert config["rank_pattern"][key] == config["alpha_pattern"][key] == 2

    rundir.save_peft(model, tmp_path / "b", modules_to_save=())
    assert json.loads(
        (tmp_path / "b" / "adapter_config.json").read_text())["modules_to_save"] is None
    st = pytest.importorskip("safetensors.torch")
    keys_a = set(st.load_file(tmp_path / "a" / "adapter_model.safetensors"))
    keys_b = set(st.load_file(tmp_path / "b" / "adapter_model.safetensors"))
    assert keys_a - keys_b == {"base_model.model.classifier.weight",
                               "base_model.model.classifier.bias",
                               "base_model.model.bert.pooler.dense.weight",
                               "base_model.model.bert.pooler.dense.bias"}
    assert len(keys_b) == 24 and all(re.fullmatch(r"base_model\.model\..+\.lora_[AB]\.weight", k)
                                     for k in keys_b)

    for bad in ("nope", "bert.encoder.layer.0.attention.self.query",
                "bert.encoder.layer.0.attention.self.query.base", "bert.encoder.layer.0", ""):
        with pytest.raises(ValueError, match=f"module to save {re.escape(repr(bad))} must be a "
                                             f"named submodule"):
            rundir.save_peft(model, tmp_path / "bad", modules_to_save=[bad])


# ------------------------------------------------------------------------------ the docs' examples

ROOT = pathlib.Path(__file__).parent
EXAMPLE = re.compile(r"<!-- example:start -->\s*```python\n(.*?)```\s*<!-- example:end -->", re.S)


def run_doc_example(name):
    """Run the Python block between <!-- example:start --> and <!-- example:end --> of the Markdown
    file `name` as written, in the current folder; its namespace. A file without the block fails
    the test (it is never skipped)."""
    path = ROOT / name
    found = EXAMPLE.search(path.read_text())
    if not found:
        pytest.fail(f"{name} has no <!-- example:start --> ```python ... ``` <!-- example:end -->")
    namespace = {"__name__": "doc_example"}
    exec(compile(found.group(1), str(path), "exec"), namespace)
    return namespace


def test_readme_example_runs_as_written():
    """README.md's LoRA² on a causal LM (a bf16 Llama, R, the Pruner, the PEFT export): the run
    ends at the schedule's budget b_T, the base stays bf16, and the export is finite and the exact
    LoRA of every layer: rank min(k, #λ≠0) in rank_pattern, B @ A = s·ΔW to fp32 rounding, the
    layers pruned to rank 0 left out."""
    pytest.importorskip("transformers")
    ns = run_doc_example("README.md")
    model, pruner, state, config = ns["model"], ns["pruner"], ns["state_dict"], ns["adapter_config"]
    layers = lora2.lora2_modules(model)
    assert len(layers) == 7 * 2 and pruner.last_step == ns["T"] - 1 and torch.isfinite(ns["loss"])
    assert sum(map(sum, lora2.rank_pattern(model).values())) == pruner.bT
    assert all(m.base.weight.dtype == torch.bfloat16 for m in layers.values())
    assert state and all(t.dtype == torch.float32 and t.isfinite().all() for t in state.values())
    exported = 0
    for name, m in layers.items():
        key, rank = "^" + re.escape(name), min(m.k, m.rank)
        if rank == 0:
            assert key not in config["rank_pattern"]
            assert f"base_model.model.{name}.lora_A.weight" not in state
            continue
        exported += 1
        assert config["rank_pattern"][key] == config["alpha_pattern"][key] == rank
        A, B = (state[f"base_model.model.{name}.lora_{x}.weight"] for x in "AB")
        assert A.shape == (rank, m.in_features) and B.shape == (m.out_features, rank)
        delta = m.delta_weight()
        assert torch.linalg.norm(B @ A - delta) <= 1e-5 * torch.linalg.norm(delta), name
    assert exported == len(config["target_modules"]) > 0


def test_peft_doc_example_runs_as_written(tmp_path, monkeypatch):
    """docs/peft.md's BERT round trip: trained with R and the Pruner, exported, loaded by PEFT with
    the same logits (the example asserts it); the adapter folder holds both files."""
    pytest.importorskip("peft")
    monkeypatch.chdir(tmp_path)  # the example writes its adapter to ./adapter
    run_doc_example("docs/peft.md")
    written = sorted(p.name for p in (tmp_path / "adapter").iterdir())
    assert written == ["adapter_config.json", "adapter_model.safetensors"]
