"""Tests for lora2.py against dense golden references and the identities of SPEC.md
(L1)–(L8), §6."""
import math
import re
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lora2
from lora2 import LoRA2Linear, Pruner


class Block(nn.Module):
    """Two square layers, one wide and one narrow: every shape case of the regularisers."""

    def __init__(self, d=12, hidden=20):
        super().__init__()
        self.query = nn.Linear(d, d)
        self.value = nn.Linear(d, d)
        self.up = nn.Linear(d, hidden)
        self.down = nn.Linear(hidden, d)

    def forward(self, x):
        return x + self.down(torch.relu(self.up(self.query(x) + self.value(x))))


class Net(nn.Module):
    def __init__(self, layers=2, d=12, classes=3):
        super().__init__()
        self.layers = nn.ModuleList(Block(d) for _ in range(layers))
        self.classifier = nn.Linear(d, classes)

    def forward(self, x):
        for block in self.layers:
            x = block(x)
        return self.classifier(x.mean(1))


class CheckpointedNet(Net):
    """Net whose blocks run under torch.utils.checkpoint (reentrant or not), as transformers'
    models do."""

    def __init__(self, reentrant):
        super().__init__()
        self.reentrant = reentrant

    def forward(self, x):
        from torch.utils.checkpoint import checkpoint
        for block in self.layers:
            x = checkpoint(block, x, use_reentrant=self.reentrant)
        return self.classifier(x.mean(1))


def make_net(seed=0, r=4, k=3, net=Net, **kw):
    torch.manual_seed(seed)
    net = net()
    lora2.inject(net, ["query", "value", "up", "down"], r=r, k=k, **kw)
    return net


def randomise(net, seed=1):
    """Give every factor and λ non-trivial values (λ = 0 at init would hide most errors)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in lora2.lora2_modules(net).values():
            for p in (m.P_outer, m.P_inner, m.lambda_, m.Q_inner, m.Q_outer):
                p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64).float())


def dense_delta(m):
    """s · P_outer P_inner diag(λ) Q_inner Q_outer in float64 (L1): the golden reference."""
    d = lambda t: t.detach().double()
    return (m.scaling * d(m.P_outer) @ d(m.P_inner) @ torch.diag(d(m.lambda_)) @ d(m.Q_inner)
            @ d(m.Q_outer))


# ---------------------------------------------------------------------------------------- L1, L2

@pytest.mark.parametrize("d_in,d_out,r,k", [(7, 5, 4, 3), (5, 9, 8, 2), (6, 6, 2, 5), (8, 3, 3, 1),
                                            (4, 4, 1, 1)])
def test_forward_equals_dense_product(d_in, d_out, r, k):
    torch.manual_seed(0)
    base = nn.Linear(d_in, d_out)
    W0, b = base.weight.detach().double().clone(), base.bias.detach().double().clone()
    layer = LoRA2Linear(base, r=r, k=k, alpha=3.0)
    randomise(nn.ModuleList([layer]))
    x = torch.randn(2, 3, d_in)
    expected = x.double() @ (W0 + dense_delta(layer)).T + b  # x·(W₀ + s·ΔW)ᵀ + b
    torch.testing.assert_close(layer(x).double(), expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(layer.delta_weight().double(), dense_delta(layer), rtol=1e-5,
                               atol=1e-6)
    assert layer.scaling == 3.0 / r


def test_delta_is_zero_at_init_and_only_lambda_gets_a_task_gradient_at_step_0():
    for init in lora2.INITS:
        torch.manual_seed(0)
        layer = LoRA2Linear(nn.Linear(6, 5), r=4, k=3, init=init)
        x = torch.randn(8, 6)
        assert torch.equal(layer.delta_weight(), torch.zeros(5, 6))
        assert torch.equal(layer(x), layer.base(x))
        layer(x).pow(2).sum().backward()
        assert layer.lambda_.grad.abs().sum() > 0
        for p in (layer.P_outer, layer.P_inner, layer.Q_inner, layer.Q_outer):
            assert torch.count_nonzero(p.grad) == 0
        assert layer.base.weight.grad is None and not layer.base.weight.requires_grad


def test_docstrings_say_what_the_code_does():
    """Issue 10.7: reset_parameters said "only λ receives a gradient" at step 0, which holds for the
    task loss only (γ·R reaches the factors); Pruner.budget said it fixed eq. 14's typo, as if the
    authors' code had it (it computes t − t_i, as AdaLoRA's does)."""
    torch.manual_seed(0)
    layer = LoRA2Linear(nn.Linear(6, 5), r=4, k=3, init="paper")
    (layer(torch.randn(8, 6)).pow(2).sum() + 0.1 * lora2.orthogonal_regularizer(layer)).backward()
    assert all(torch.count_nonzero(p.grad) > 0
               for p in (layer.P_outer, layer.P_inner, layer.Q_inner, layer.Q_outer))
    doc = " ".join(LoRA2Linear.reset_parameters.__doc__.split())
    assert ("task loss gives a gradient to λ only" in doc
            and "regulariser (L3) still pulls on the four factors" in doc)
    doc = " ".join(Pruner.budget.__doc__.split())
    assert ("typo fixed" not in doc
            and "as AdaLoRA's and the authors' code compute it, with (t − t_i)" in doc)


def test_lora2_py_is_torch_and_stdlib_only_without_private_torch_api():
    """The copy-paste file's rules: torch plus a short list of stdlib modules; no print; no private
    torch API but torch._foreach_* (the list operations torch.optim is built on, which the Pruner's
    equations use); the module docstring opens with the paper, ΔW, shapes, names, limits."""
    import ast
    import inspect
    source = inspect.getsource(lora2)
    tree = ast.parse(source)
    allowed = {"math", "dataclasses", "typing", "re", "json", "os", "warnings", "logging",
               "collections", "itertools", "functools", "contextlib", "pathlib", "__future__",
               "fnmatch", "struct", "torch"}
    imported = {alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import)
                for alias in node.names}
    imported |= {node.module.split(".")[0] for node in ast.walk(tree)
                 if isinstance(node, ast.ImportFrom)}
    assert imported <= allowed, imported - allowed
    assert not [n for n in ast.walk(tree) if isinstance(n, ast.Name) and n.id == "print"]
    private = [ast.unparse(n) for n in ast.walk(tree)
               if isinstance(n, ast.Attribute) and n.attr.startswith("_")
               and ast.unparse(n.value).split(".")[0] in ("torch", "F", "nn")
               and not n.attr.startswith("__")
               and not (ast.unparse(n.value) == "torch" and n.attr.startswith("_foreach_"))]
    assert not private, private
    doc = ast.get_docstring(tree)
    for part in ("arXiv 2408.06854", "ΔW = P · diag(λ) · Q", "k × d_in", "lora_A", "lora_B",
                 "lora_E", "lora_aa", "lora_bb", "Not supported"):
        assert part in doc, part
    for name, obj in vars(lora2).items():
        if (not name.startswith("_") and getattr(obj, "__module__", None) == "lora2"
                and callable(obj)):
            assert obj.__doc__, name
            for attr, member in vars(obj).items() if isinstance(obj, type) else ():
                if not attr.startswith("_") and callable(getattr(member, "__func__", member)):
                    assert getattr(member, "__doc__", None), f"{name}.{attr}"


def test_inits():
    torch.manual_seed(0)
    orth = LoRA2Linear(nn.Linear(30, 20), r=4, k=6, init="orthogonal")
    for f in (orth.P_outer, orth.P_inner, orth.Q_inner, orth.Q_outer):
        small = f.T @ f if f.shape[0] >= f.shape[1] else f @ f.T
        torch.testing.assert_close(small, torch.eye(small.shape[0]), atol=1e-5, rtol=0)
    paper = LoRA2Linear(nn.Linear(300, 200), r=8, k=8, init="paper")
    assert (abs(paper.P_outer.std().item() - 0.02) < 0.003
            and abs(paper.Q_outer.std().item() - 0.02) < 0.003)


def test_merge_unmerge_idempotent_and_not_tied_to_eval():
    net = make_net()
    randomise(net)
    x = torch.randn(2, 5, 12)
    net.eval()
    before = {n: m.base.weight.clone() for n, m in lora2.lora2_modules(net).items()}
    y = net(x)
    lora2.merge(net)
    assert all(m.merged for m in lora2.lora2_modules(net).values())
    torch.testing.assert_close(net(x), y, rtol=1e-5, atol=1e-5)
    once = {n: m.base.weight.clone() for n, m in lora2.lora2_modules(net).items()}
    lora2.merge(net)  # merging twice changes nothing
    assert all(torch.equal(m.base.weight, once[n]) for n, m in lora2.lora2_modules(net).items())
    net.train()
    net.eval()  # .eval()/.train() neither merge nor unmerge
    assert all(m.merged for m in lora2.lora2_modules(net).values())
    lora2.unmerge(net)
    lora2.unmerge(net)
    for n, m in lora2.lora2_modules(net).items():
        # fp32 rounding of W₀ + sΔW − sΔW
        torch.testing.assert_close(m.base.weight, before[n], rtol=0, atol=1e-5)
    torch.testing.assert_close(net(x), y, rtol=1e-5, atol=1e-5)


def test_merge_and_unload_equals_adapted_model():
    net = make_net()
    randomise(net)
    x = torch.randn(2, 5, 12)
    y = net(x)
    plain = lora2.merge_and_unload(net)
    assert not lora2.lora2_modules(plain)
    assert type(plain.layers[0].query) is nn.Linear
    torch.testing.assert_close(plain(x), y, rtol=1e-5, atol=1e-5)


def test_merge_on_non_square_layer_uses_the_matrix_product():
    torch.manual_seed(0)
    layer = LoRA2Linear(nn.Linear(7, 3), r=2, k=2)
    randomise(nn.ModuleList([layer]))
    W0 = layer.base.weight.detach().double().clone()
    layer.merge()
    torch.testing.assert_close(layer.base.weight.double(), W0 + dense_delta(layer), rtol=1e-5,
                               atol=1e-5)


def test_unmerge_removes_what_merge_added_after_lambda_changed():
    """Issue 10.1: unmerge() subtracted the *current* ΔW, so a λ change between merge() and
    unmerge() (a Pruner step in the final phase, a manual edit) left W₀ wrong for good."""
    net = make_net()
    randomise(net)
    layers = lora2.lora2_modules(net)
    W0 = {n: m.base.weight.detach().clone() for n, m in layers.items()}
    pruner = Pruner(net, target_rank=1, total_steps=10, init_warmup=1, final_warmup=3,
                    mask_interval=1)
    lora2.merge(net)
    with torch.no_grad():
        net.layers[0].query.lambda_.mul_(3.0)  # a manual edit
    pruner.step(9)  # the final phase: keeps b_T = 8 of the 32 λ and zeroes the others
    assert sum(m.rank for m in layers.values()) == 8
    lora2.unmerge(net)
    for n, m in layers.items():
        # fp32 rounding of (W₀ + δ) − δ
        torch.testing.assert_close(m.base.weight, W0[n], rtol=0, atol=1e-5, msg=n)
    net.eval()
    x = torch.randn(2, 5, 12)
    y = net(x)  # W₀ + today's adapter
    lora2.merge(net)
    torch.testing.assert_close(net(x), y, rtol=1e-5, atol=1e-5)


def test_training_forward_through_a_merged_layer_raises():
    """Issue 10.1: training a merged model silently trained nothing (the adapter is off the
    autograd path)."""
    net = make_net()
    randomise(net)
    lora2.merge(net)
    x = torch.randn(2, 5, 12)
    net.train()
    with pytest.raises(RuntimeError, match=r"LoRA2Linear 'layers\.0\.query' is merged: "
                                           r"a training forward would train"):
        net(x)
    with torch.no_grad():
        net(x)  # inference in train mode is fine
    net.eval()
    # and so is an eval-mode forward (e.g. training only the head on a merged model)
    net(x).sum().backward()
    assert net.classifier.weight.grad is not None and net.layers[0].query.lambda_.grad is None


def test_state_dict_of_a_merged_model_holds_W0_and_loading_into_a_merged_model_is_refused():
    """Issue 10.1: a merged model's state_dict loaded into an unmerged one counted ΔW twice, and
    loading into a merged model left a weight that matched neither adapter."""
    net = make_net()
    randomise(net)
    net.eval()
    x = torch.randn(2, 5, 12)
    y = net(x)
    # state_dict() shares storage
    unmerged_state = {key: value.clone() for key, value in net.state_dict().items()}
    lora2.merge(net)
    merged_state = net.state_dict()
    # W₀, not W₀ + s·ΔW (up to fp32 rounding of (W₀ + δ) − δ)
    for key, value in unmerged_state.items():
        torch.testing.assert_close(merged_state[key], value, rtol=0, atol=1e-5, msg=key)
    other = make_net(seed=3).eval()
    other.load_state_dict(merged_state)
    torch.testing.assert_close(other(x), y, rtol=1e-5, atol=1e-5)

    with pytest.raises(RuntimeError, match=r"LoRA2Linear 'layers\.0\.query' is merged; "
                                           r"call lora2\.unmerge\(model\)"):
        net.load_state_dict(make_net(seed=4).state_dict())
    with pytest.raises(RuntimeError,
                       match=r"load_adapter_state_dict: 8 layers are merged .*unmerge"):
        lora2.load_adapter_state_dict(net, lora2.adapter_state_dict(make_net(seed=4)))
    # other modules still load
    net.classifier.load_state_dict(make_net(seed=4).classifier.state_dict())
    lora2.unmerge(net)
    torch.testing.assert_close(net.layers[1].down.base.weight,
                               unmerged_state["layers.1.down.base.weight"], rtol=0, atol=1e-5)


class TiedLM(nn.Module):
    """GPT-2's weight tying: the output layer is the embedding matrix."""

    def __init__(self, vocab=11, d=8):
        super().__init__()
        self.wte = nn.Embedding(vocab, d)
        self.lm_head = nn.Linear(d, vocab, bias=False)
        self.lm_head.weight = self.wte.weight

    def forward(self, ids):
        return self.lm_head(self.wte(ids))


def test_merging_a_tied_weight_is_refused():
    """Issue 10.2: merging lm_head, whose weight is GPT-2's wte, also changed the embedding."""
    torch.manual_seed(0)
    lm = TiedLM()
    lora2.inject(lm, "lm_head", r=2, k=2)
    randomise(lm)
    lm.eval()
    ids = torch.randint(0, 11, (2, 5))
    y, embedding = lm(ids), lm.wte.weight.detach().clone()
    for merge in (lora2.merge, lora2.merge_and_unload, lambda model: model.lm_head.merge()):
        with pytest.raises(ValueError, match=r"LoRA2Linear 'lm_head' shares its weight with 'wte' "
                                             r"\(tied weights\)"):
            merge(lm)
        assert torch.equal(lm.wte.weight, embedding) and not lm.lm_head.merged
    torch.testing.assert_close(lm(ids), y)

    untied = nn.ModuleDict(dict(wte=nn.Embedding(11, 8), lm_head=nn.Linear(8, 11, bias=False)))
    lora2.inject(untied, "lm_head", r=2, k=2)
    untied.lm_head.base.weight = untied.wte.weight  # tied after inject: merge(model) looks again
    with pytest.raises(ValueError, match="'lm_head' shares its weight with 'wte'"):
        lora2.merge(untied)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_base(dtype):
    torch.manual_seed(0)
    ref = LoRA2Linear(nn.Linear(16, 8), r=4, k=4)
    randomise(nn.ModuleList([ref]), seed=3)
    half = LoRA2Linear(nn.Linear(16, 8).to(dtype), r=4, k=4)
    half.load_state_dict(ref.state_dict())  # the base weight is cast to `dtype` by copy_
    assert half.lambda_.dtype == torch.float32 and half.base.weight.dtype == dtype
    x = torch.randn(4, 16)
    y = half(x.to(dtype))
    assert y.dtype == dtype and torch.isfinite(y).all()
    torch.testing.assert_close(y.float(), ref(x), rtol=0.05, atol=0.1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        z = ref(x)
    assert z.dtype == torch.bfloat16 and torch.isfinite(z).all()
    torch.testing.assert_close(z.float(), ref(x), rtol=0.05, atol=0.1)
    half.merge()  # merge in fp32, cast back
    assert half.base.weight.dtype == dtype
    with torch.no_grad():
        torch.testing.assert_close(half(x.to(dtype)).float(), ref(x), rtol=0.05, atol=0.1)


@pytest.mark.parametrize("base_dtype", [torch.float32, torch.bfloat16])
def test_fp32_arithmetic_stays_fp32_under_autocast(base_dtype):
    """Inside torch.autocast(bfloat16), everything lora2 computes in fp32 stays fp32 and equal to
    what it computes outside: s·ΔW, the exact LoRA export and PEFT's state dict, R (which autocast
    made bf16: 5e-3 at an orthogonal init, where fp32 gives 1e-7), and merging: the merged weight is
    W₀ + s·ΔW rounded once, and unmerge() and state_dict() outside autocast work (a bf16 factor kept
    by merge() raised a dtype error there)."""
    torch.manual_seed(0)
    net = make_net(r=4, k=3)
    for m in lora2.lora2_modules(net).values():
        m.base.to(base_dtype)
    R0 = lora2.orthogonal_regularizer(net)  # orthogonal init: rounding only
    with torch.no_grad():
        for m in lora2.lora2_modules(net).values():
            m.lambda_.copy_(torch.linspace(-1.0, 1.0, m.r))
    layers = lora2.lora2_modules(net)
    W0 = {n: m.base.weight.detach().clone() for n, m in layers.items()}
    outside = dict(delta={n: m.delta_weight() for n, m in layers.items()},
                   lora=lora2.to_lora(net), peft=lora2.peft_state_dict(net)[0],
                   R=lora2.orthogonal_regularizer(net, cross=0.3))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert lora2.orthogonal_regularizer(net).dtype == torch.float32
        assert (abs(lora2.orthogonal_regularizer(make_net(r=4, k=3)).item()) < 1e-6
                and abs(R0.item()) < 1e-6)
        inside = dict(delta={n: m.delta_weight() for n, m in layers.items()},
                      lora=lora2.to_lora(net), peft=lora2.peft_state_dict(net)[0],
                      R=lora2.orthogonal_regularizer(net, cross=0.3))
        lora2.merge(net)
        merged_state = net.state_dict()
    for got, want in zip(tensors_in(inside), tensors_in(outside)):
        assert got.dtype == want.dtype and torch.equal(got, want)
    # relative spacing of the base's numbers
    ulp = 2.0 ** -7 if base_dtype == torch.bfloat16 else 2.0 ** -23
    tolerance = {n: 2 * ulp * (W0[n].float().abs() + outside["delta"][n].abs()) for n in layers}
    for n, m in layers.items():  # W₀ + s·ΔW in fp32, rounded once to the base's dtype
        assert torch.equal(m.base.weight, (W0[n].float() + outside["delta"][n]).to(base_dtype)), n
        assert ((merged_state[f"{n}.base.weight"].float() - W0[n].float()).abs()
                <= tolerance[n]).all(), n
    lora2.unmerge(net)  # outside autocast
    for n, m in layers.items():  # W₀ up to the rounding of (W₀ + δ) − δ
        assert m.base.weight.dtype == base_dtype
        assert ((m.base.weight.float() - W0[n].float()).abs() <= tolerance[n]).all(), n


def literal(net):
    """`net` without its FactorGroups hook: every layer computes its own (A, B), as
    LoRA2Linear.factors writes it."""
    for m in lora2.lora2_modules(net).values():
        if m.groups is not None:
            m.groups.remove()
    return net


@pytest.mark.parametrize("reentrant", [False, True])
def test_gradient_checkpointing_gives_the_same_gradients(reentrant):
    """Both checkpointing modes give the gradients of the literal per-layer forward without
    checkpointing, over two accumulated steps with R. Reentrant checkpointing runs each block
    without autograd and recomputes it inside the backward pass: a layer that took its pair from the
    model's grouped pass there would send every block's recomputation through the one shared graph
    of that pass (freed after the first)."""
    grads = []
    # reentrant checkpointing needs an input that requires grad
    x = torch.randn(2, 5, 12, requires_grad=True)
    for net in (literal(make_net()), make_net(net=lambda: CheckpointedNet(reentrant))):
        randomise(net)
        for _ in range(2):
            (net(x).sum() + lora2.orthogonal_regularizer(net)).backward()
        grads.append([p.grad.clone() for p in net.parameters() if p.requires_grad])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


def test_a_submodule_called_alone_uses_the_current_factors():
    """The grouped pairs belong to the model's forward: a block called on its own after the factors
    changed (an optimiser step) computes them afresh, with or without autograd, and agrees with the
    literal per-layer forward."""
    net, ref = make_net(), literal(make_net())
    randomise(net), randomise(ref)
    x = torch.randn(2, 5, 12)
    net(x).sum().backward()  # a training forward: every layer holds its grouped pair
    for model in (net, ref):
        with torch.no_grad():
            for m in lora2.lora2_modules(model).values():
                m.lambda_.mul_(2.0)  # what an optimiser step does: in place
    torch.testing.assert_close(net.layers[1](x), ref.layers[1](x), rtol=1e-6, atol=1e-6)
    with torch.no_grad():
        torch.testing.assert_close(net.layers[0](x), ref.layers[0](x), rtol=1e-6, atol=1e-6)


def test_copies_and_pickles_after_a_training_forward(tmp_path):
    """A model holds each forward's grouped pairs and stacks (tensors with autograd history, which
    deepcopy refuses): deepcopy, torch.save and torch.load drop them, and the copy computes its own,
    hook included."""
    import copy
    net = make_net()
    randomise(net)
    x = torch.randn(2, 5, 12)
    y = net(x)
    (y.sum() + lora2.orthogonal_regularizer(net)).backward()
    twin = copy.deepcopy(net)
    torch.save(net, tmp_path / "net.pt")
    loaded = torch.load(tmp_path / "net.pt", weights_only=False)
    for other in (twin, loaded):
        torch.testing.assert_close(other(x), y, rtol=1e-6, atol=1e-6)
        groups = {id(m.groups) for m in lora2.lora2_modules(other).values()}
        # its own, not the original's
        assert len(groups) == 1 and groups != {id(net.layers[0].query.groups)}
        with torch.no_grad():
            other.layers[0].query.lambda_.zero_()
        # the copies do not share tensors
        assert not torch.equal(other(x), y) and torch.equal(net(x), y)


def test_dropout_only_on_the_adapter_path():
    """In training mode, with λ ≠ 0: h = W₀x + b + s·ΔW·drop(x), the base path sees x itself
    (issue 9: the old test ran in eval() with λ = 0, where any dropout placement passed)."""
    torch.manual_seed(0)
    layer = LoRA2Linear(nn.Linear(6, 4), r=2, k=2, dropout=0.5).train()
    randomise(nn.ModuleList([layer]))
    W0, b = layer.base.weight.detach().double(), layer.base.bias.detach().double()
    x = torch.randn(3, 6)
    torch.manual_seed(1)
    y = layer(x)
    torch.manual_seed(1)
    dropped = F.dropout(x, 0.5, training=True)  # the same mask: one Bernoulli draw of x's shape
    assert not torch.equal(dropped, x)
    expected = x.double() @ W0.T + b + dropped.double() @ dense_delta(layer).T
    torch.testing.assert_close(y.double(), expected, rtol=1e-5, atol=1e-5)
    layer.eval()  # no dropout at all
    torch.testing.assert_close(layer(x).double(), x.double() @ (W0 + dense_delta(layer)).T + b,
                               rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------- inject

def test_inject_matching_freezing_and_errors():
    torch.manual_seed(0)
    net = Net()
    names = lora2.inject(net, ["query", re.compile(r"layers\.1\.up")], r=2, k=2)
    assert names == ["layers.0.query", "layers.1.query", "layers.1.up"]
    trainable = {n for n, p in net.named_parameters() if p.requires_grad}
    assert trainable == {f"{n}.{f}" for n in names
                         for f in ("Q_outer", "Q_inner", "lambda_", "P_inner", "P_outer")} \
        | {"classifier.weight", "classifier.bias"}
    with pytest.raises(ValueError, match=r"'layers\.0\.query' is already adapted by LoRA2Linear"):
        lora2.inject(net, ["query"])
    with pytest.raises(ValueError,
                       match=r"no linear layer matches \['attn'\].*layers\.\{i\}\.down"):
        lora2.inject(net, ["attn"])
    with pytest.raises(ValueError, match="no targets"):
        lora2.inject(net, [])
    with pytest.raises(ValueError, match="no linear layer matches"):
        lora2.inject(Net(), "ery")  # "ery" is not a whole dotted suffix of "layers.0.query"


def test_inject_trainable_accepts_a_string_and_both_arguments_are_validated():
    """Issue 10.3: trainable="classifier" iterated the string's characters and unfroze nearly the
    whole model."""
    torch.manual_seed(0)
    net = Net()
    names = lora2.inject(net, "query", r=2, k=2, trainable="classifier")
    trainable = {n for n, p in net.named_parameters() if p.requires_grad}
    assert trainable == {f"{n}.{f}" for n in names for f in lora2.ADAPTER_KEYS[:5]} | {
        "classifier.weight", "classifier.bias"}
    for bad in (5, None, [1], [""], b"query", ["query", re.compile("x")]):
        with pytest.raises(TypeError, match=r"inject: trainable must be a non-empty string, "
                                            r"or a list of them"):
            lora2.inject(Net(), "value", trainable=bad)
    for bad in (5, None, [3], "", b"value"):
        with pytest.raises(TypeError,
                           match=r"inject: targets must be a non-empty string or compiled regex"):
            lora2.inject(Net(), bad)


def test_trainable_and_head_match_whole_name_parts():
    class Head(nn.Module):
        def __init__(self):
            super().__init__()
            self.classifier_dropout = nn.Linear(2, 2)  # not a "classifier" part
            self.pooler = nn.Linear(2, 2)
            self.body = nn.Linear(2, 2)

    net = Head()
    lora2.inject(net, "body", r=1, k=1)  # default trainable=HEAD
    assert {n for n, p in net.named_parameters() if p.requires_grad} == {
        "pooler.weight", "pooler.bias", *(f"body.{f}" for f in lora2.ADAPTER_KEYS[:5])}
    counts = lora2.count_parameters(net)
    adapter = 1 * (2 + 2) + 2 * 1 * 1 + 1  # k(d_in + d_out) + 2kr + r
    assert counts == {"adapter": adapter, "head": 6, "trainable": adapter + 6,
                      "total": adapter + 18}
    # the adapters are under "body"
    assert lora2.count_parameters(net, head="body")["head"] == adapter
    lm = TiedLM()
    assert lora2.count_parameters(lm)["total"] == 11 * 8  # a tied tensor counted once


def test_layer_validation_errors():
    base = nn.Linear(4, 4)
    with pytest.raises(TypeError, match="wraps nn.Linear or GPT-2's Conv1D, got Conv2d"):
        LoRA2Linear(nn.Conv2d(1, 1, 1))
    with pytest.raises(ValueError, match="r and k must be integers >= 1, got r=0, k=8"):
        LoRA2Linear(base, r=0)
    with pytest.raises(ValueError, match="alpha must be > 0"):
        LoRA2Linear(base, alpha=0)
    with pytest.raises(ValueError, match=r"dropout must be in \[0, 1\)"):
        LoRA2Linear(base, dropout=1.0)
    with pytest.raises(ValueError, match="init must be one of"):
        LoRA2Linear(base, init="xavier")


def test_parameter_count_formula_and_paper_figures():
    net = make_net(r=4, k=3)
    per_layer = {n: sum(p.numel() for p in m.parameters() if p.requires_grad)
                 for n, m in lora2.lora2_modules(net).items()}
    for n, m in lora2.lora2_modules(net).items():
        assert per_layer[n] == m.k * (m.in_features + m.out_features) + 2 * m.k * m.r + m.r

    # 12 layers × 6 matrices, on the meta device: shapes without memory
    class DebertaV3BaseShapes(nn.Module):
        def __init__(self):
            super().__init__()
            lin = lambda i, o: nn.Linear(i, o, device="meta")
            self.layer = nn.ModuleList(nn.ModuleDict(dict(
                query_proj=lin(768, 768), key_proj=lin(768, 768), value_proj=lin(768, 768),
                attention_output=lin(768, 768), intermediate=lin(768, 3072),
                output=lin(3072, 768))) for _ in range(12))

    targets = ["query_proj", "key_proj", "value_proj", "attention_output", "intermediate", "output"]
    for k, expected in ((8, 1_336_896), (1, 167_616)):
        model = DebertaV3BaseShapes()
        assert len(lora2.inject(model, targets, r=8, k=k, init="paper")) == 72
        counts = lora2.count_parameters(model)
        # SPEC §1: the paper's 0.72 % and 0.17M
        assert counts["adapter"] == counts["trainable"] == expected
        # the frozen weights and biases
        backbone = 12 * (4 * (768 * 768 + 768) + 2 * 768 * 3072 + 3072 + 768)
        assert counts["head"] == 0 and counts["total"] == expected + backbone


# ---------------------------------------------------------------------------------------- L3, L4

def dense_regularizer(net, cross=0.0, squared=False):
    """(L3) + cross · (L4) of SPEC §2 written out layer by layer in float64: the
    golden reference."""
    layers = list(lora2.lora2_modules(net).values())
    # ‖·‖²_F or ‖·‖_F
    norm = (lambda x: x.pow(2).sum()) if squared else torch.linalg.norm

    def deviation(f):  # G(F) − I, G on the smaller dimension
        f = f.detach().double()
        g = f.T @ f if f.shape[0] >= f.shape[1] else f @ f.T
        return g - torch.eye(g.shape[0], dtype=torch.float64)

    r_int = sum(norm(deviation(getattr(m, f))) for m in layers for f in lora2.FACTORS)
    # m = 4 · layers; squared: mean of per-layer sums
    r_int = r_int / (len(layers) if squared else 4 * len(layers))
    square = [m for m in layers if m.in_features == m.out_features]
    r_ext = sum(norm(m.Q_outer.detach().double() @ m.P_outer.detach().double())
                for m in square) / len(square)
    return r_int + cross * r_ext


def test_orthogonal_regularizer():
    torch.manual_seed(0)
    net = make_net(r=2, k=3)  # orthogonal init: every factor has orthonormal rows or columns
    assert lora2.orthogonal_regularizer(net).item() < 1e-6
    assert lora2.orthogonal_regularizer(net, squared=True).item() < 1e-10
    randomise(net)
    for cross in (0.0, 0.5):
        for squared in (False, True):
            got = lora2.orthogonal_regularizer(net, cross=cross, squared=squared)
            torch.testing.assert_close(got.double(), dense_regularizer(net, cross, squared),
                                       rtol=1e-5, atol=0)
    reg = lora2.orthogonal_regularizer(net, cross=0.5)
    reg.backward()
    for m in lora2.lora2_modules(net).values():
        for f in (m.P_outer, m.P_inner, m.Q_inner, m.Q_outer):
            assert f.grad is not None and f.grad.abs().sum() > 0
        assert m.lambda_.grad is None


def test_regularizer_default_is_the_unsquared_frobenius_norm_averaged_over_matrices():
    """Issue 10.4: (L3) was a squared per-layer sum; the code behind the paper's γ (AdaLoRA, PEFT,
    the authors) uses (1/m) Σ ‖G − I‖_F over the m = 4 · layers matrices (SPEC §2). The squared form
    stays behind squared=True."""
    torch.manual_seed(0)
    net = make_net(r=2, k=3)
    with torch.no_grad():
        for m in lora2.lora2_modules(net).values():
            # P_outerᵀP_outer = 4·I_3: ‖3·I_3‖_F = 3√3, the other three factors stay orthogonal
            m.P_outer.mul_(2.0)
    torch.testing.assert_close(lora2.orthogonal_regularizer(net),
                               torch.tensor(3 * math.sqrt(3) / 4))  # 8·3√3 / 32
    torch.testing.assert_close(lora2.orthogonal_regularizer(net, squared=True),
                               torch.tensor(27.0))  # ‖3·I_3‖²_F


def test_external_regularizer_only_on_square_layers():
    torch.manual_seed(0)
    net = make_net(r=2, k=3)
    randomise(net)
    layers = lora2.lora2_modules(net)
    square = [m for m in layers.values() if m.in_features == m.out_features]
    assert len(square) == 4 and len(layers) == 8
    r_int = lora2.orthogonal_regularizer(net)
    # (L4) by hand
    r_ext = torch.stack([torch.linalg.norm(m.Q_outer @ m.P_outer) for m in square]).mean()
    torch.testing.assert_close(lora2.orthogonal_regularizer(net, cross=0.3), r_int + 0.3 * r_ext)
    torch.manual_seed(0)
    wide = nn.Sequential(nn.Linear(4, 6))
    lora2.inject(wide, "0", r=2, k=2)
    randomise(wide)
    assert torch.equal(lora2.orthogonal_regularizer(wide, cross=1.0),
                       lora2.orthogonal_regularizer(wide))
    with pytest.raises(ValueError, match="no LoRA2Linear layer"):
        lora2.orthogonal_regularizer(nn.Linear(2, 2))


# ---------------------------------------------------------------------------------------- L5–L8

def expected_budget(t, b0, bT, T, ti, tf):
    """(L7), written out independently."""
    if t <= ti:
        return b0
    if t > T - tf:
        return bT
    return math.floor(bT + (b0 - bT) * (1 - (t - ti) / (T - tf - ti)) ** 3)


def test_budget_schedule_L7():
    net = make_net(r=4, k=3)  # 8 layers: b₀ = 32
    T, ti, tf = 100, 10, 30
    pruner = Pruner(net, target_rank=1, total_steps=T, init_warmup=ti, final_warmup=tf,
                    mask_interval=5)
    assert (pruner.b0, pruner.bT) == (32, 8)
    for t in (0, ti, ti + 1, (ti + T - tf) // 2, T - tf, T - tf + 1, T):
        assert pruner.budget(t) == expected_budget(t, 32, 8, T, ti, tf), t
    assert (pruner.budget(ti) == 32 and pruner.budget(ti + 1) == 30  # ⌊8 + 24·(59/60)³⌋
            and pruner.budget(T - tf) == 8)
    assert [pruner.budget(t) for t in range(T + 1)] == sorted(
        [pruner.budget(t) for t in range(T + 1)], reverse=True)
    total = Pruner(net, target_rank=1, total_steps=T, init_warmup=ti, final_warmup=tf,
                   mask_interval=5, target_total=5)
    assert total.budget(T) == 5


def train(net, pruner, steps, seed=0, on_step=None, start=0, opt=None):
    """A few steps in the order of SPEC §4; returns the optimiser."""
    params = [p for p in net.parameters() if p.requires_grad]
    opt = opt or torch.optim.AdamW(params, lr=0.05)
    for t in range(start, steps):
        g = torch.Generator().manual_seed(seed * 1000 + t)
        x = torch.randn(4, 5, 12, generator=g)
        y = torch.randint(0, 3, (4,), generator=g)
        loss = F.cross_entropy(net(x), y) + 0.1 * lora2.orthogonal_regularizer(net)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        pruner.step(t)
        if on_step:
            on_step(t)
        opt.zero_grad()
    return opt


def test_masking_keeps_exactly_b_t_and_freezes_in_final_phase():
    net = make_net(r=4, k=3)
    T, ti, tf = 40, 4, 12
    pruner = Pruner(net, target_rank=1, total_steps=T, init_warmup=ti, final_warmup=tf,
                    mask_interval=3)
    layers = lora2.lora2_modules(net).values()
    seen = {}

    def check(t):
        nonzero = sum(m.rank for m in layers)
        kept = sum(sum(p) for p in lora2.rank_pattern(net).values())
        if ti < t <= T - tf and t % 3 == 0:
            assert nonzero == kept == pruner.budget(t), t
        if t > T - tf:
            assert nonzero == kept == pruner.bT, t
            seen.setdefault("final", lora2.rank_pattern(net))
            # the pattern never changes in the final phase
            assert lora2.rank_pattern(net) == seen["final"]
            for m in layers:  # and pruned λ stay exactly zero
                assert torch.all(m.lambda_[~m.lambda_mask] == 0)
    train(net, pruner, T + 1, on_step=check)
    assert "final" in seen


def test_ties_never_over_prune():
    net = make_net(r=4, k=3)
    pruner = Pruner(net, target_rank=2, total_steps=10, init_warmup=0, final_warmup=2,
                    mask_interval=1)
    with torch.no_grad():
        for m in lora2.lora2_modules(net).values():
            m.lambda_.fill_(1.0)
    pruner.set_mask(13)  # all scores are 0: a kthvalue threshold with <= would prune everything
    pruner.apply_mask()
    assert sum(m.rank for m in lora2.lora2_modules(net).values()) == 13


def test_target_rank_equal_to_r_keeps_everything():
    net = make_net(r=4, k=3)
    randomise(net)
    pruner = Pruner(net, target_rank=4, total_steps=20, init_warmup=2, final_warmup=5,
                    mask_interval=1)
    train(net, pruner, 20)
    assert all(all(p) for p in lora2.rank_pattern(net).values())
    assert sum(m.rank for m in lora2.lora2_modules(net).values()) == 32


class ReferencePruner:
    """AdaLoRA's allocator restricted to λ, P_inner, Q_inner, one parameter at a time: a golden
    reference for (L5)–(L8)."""

    def __init__(self, net, pruner):
        self.p, self.net = pruner, net
        self.ibar, self.ubar = {}, {}

    def step(self, t):
        p, mods = self.p, lora2.lora2_modules(self.net)
        if t < p.T - p.t_f:  # scores are updated only while t < T − t_f (SPEC §4)
            for name, m in mods.items():
                for kind in ("lambda_", "P_inner", "Q_inner"):
                    w = getattr(m, kind)
                    if w.grad is None:
                        continue
                    ipt = (w * w.grad).abs().detach()
                    ib = self.ibar.get((name, kind), torch.zeros_like(w))
                    ub = self.ubar.get((name, kind), torch.zeros_like(w))
                    ib = p.beta1 * ib + (1 - p.beta1) * ipt
                    ub = p.beta2 * ub + (1 - p.beta2) * (ipt - ib).abs()
                    self.ibar[name, kind], self.ubar[name, kind] = ib, ub
        mask_now = (p.t_i < t <= p.T - p.t_f and t % p.mask_interval == 0) or (t == p.T - p.t_f + 1)
        if not mask_now:
            return None
        scores = {}
        for name, m in mods.items():
            s = {kind: self.ibar[name, kind] * self.ubar[name, kind]
                 for kind in ("lambda_", "P_inner", "Q_inner")}
            for i in range(m.r):  # (L6), literally
                scores[name, i] = (s["lambda_"][i] + s["P_inner"][:, i].sum() / m.k
                                   + s["Q_inner"][i, :].sum() / m.k).item()
        budget = expected_budget(t, p.b0, p.bT, p.T, p.t_i, p.t_f)
        return set(sorted(scores, key=lambda key: -scores[key])[:budget])


class LiteralPruner(Pruner):
    """The Pruner's (L5), (L6) and (L8) written per layer and per factor, one small operation at a
    time: the reference for the list and stack operations of lora2.Pruner."""

    @torch.no_grad()
    def update_scores(self):
        for name, m in self.modules.items():
            for kind in self.kinds:
                w = getattr(m, kind)
                if w.grad is not None:
                    I = (w.float() * w.grad.float()).abs()  # (eq. 10)
                    self.Ibar[name][kind].lerp_(I, 1 - self.beta1)  # (eq. 11)
                    self.Ubar[name][kind].lerp_((I - self.Ibar[name][kind]).abs(),
                                                1 - self.beta2)  # (eq. 12)

    @torch.no_grad()
    def triplet_scores(self):
        scores = []
        for name in self.modules:
            s = {kind: self.Ibar[name][kind] * self.Ubar[name][kind] for kind in self.kinds}
            S = s["lambda_"] + s["P_inner"].mean(0) + s["Q_inner"].mean(1)  # (L6)
            if self.scored == "all":
                S = S + s["P_outer"].mean() + s["Q_outer"].mean()
            scores.append(S)
        return torch.cat(scores)

    @torch.no_grad()
    def set_mask(self, budget):
        order = torch.argsort(self.triplet_scores(), descending=True, stable=True)
        keep = torch.zeros(self.b0, dtype=torch.bool).index_fill_(0, order[:budget], True)
        for m, kept in zip(self.modules.values(), keep.split([m.r for m in self.modules.values()])):
            m.lambda_mask.copy_(kept)

    @torch.no_grad()
    def apply_mask(self):
        for m in self.modules.values():
            m.lambda_.mul_(m.lambda_mask)


def literal_regularizer(net, cross=0.0, squared=False):
    """(L3) + cross · (L4) layer by layer and factor by factor in fp32, with autograd."""
    layers = list(lora2.lora2_modules(net).values())
    norm = (lambda x: x.pow(2).sum()) if squared else torch.linalg.matrix_norm

    def deviation(f):
        gram = f.T @ f if f.shape[0] >= f.shape[1] else f @ f.T
        return gram - torch.eye(gram.shape[0])

    r_int = sum(norm(deviation(getattr(m, f))) for m in layers for f in lora2.FACTORS)
    r_int = r_int / (len(layers) if squared else 4 * len(layers))
    square = [m for m in layers if m.in_features == m.out_features]
    return r_int + cross * sum(norm(m.Q_outer @ m.P_outer) for m in square) / len(square)


@pytest.mark.parametrize("scored,cross,squared",
                         [("inner", 0.0, False), ("all", 0.3, False), ("inner", 0.3, True)])
def test_grouped_computation_equals_the_literal_form_at_every_step(scored, cross, squared):
    """lora2's speed comes from how it computes, never from what: the grouped (A, B) of
    FactorGroups, R from the forward's stacks and the Pruner's list and stack operations give the
    literal per-layer form's outputs, R, gradients, Ī, Ū, triplet scores, masks and weights to 1e-6
    (fp32) at every step of a run through every phase of (L7): warm-up, cubic masking every 2 steps,
    the final pattern. Each stage gets identical inputs on both sides: the optimiser steps from the
    reference's gradients on both, and the fast side takes the reference's Ī and Ū after the
    comparison, so that rounding differences (1e-7) do not compound through AdamW's
    normalised steps."""
    kw = dict(target_rank=1, total_steps=16, init_warmup=2, final_warmup=5, mask_interval=2,
              scored=scored)
    fast, ref = make_net(r=4, k=3, init="paper"), literal(make_net(r=4, k=3, init="paper"))
    p_fast, p_ref = Pruner(fast, **kw), LiteralPruner(ref, **kw)
    opts = [torch.optim.AdamW([p for p in net.parameters() if p.requires_grad], lr=0.05)
            for net in (fast, ref)]

    def close(a, b, what):
        assert ((a - b).abs().max() / b.abs().max().clamp(min=1e-12)).item() < 1e-6, what

    for t in range(16):
        g = torch.Generator().manual_seed(t)
        x, y = torch.randn(4, 5, 12, generator=g), torch.randint(0, 3, (4,), generator=g)
        (out_fast, R_fast), (out_ref, R_ref) = [
            (net(x), reg(net, cross=cross, squared=squared))
            for net, reg in ((fast, lora2.orthogonal_regularizer), (ref, literal_regularizer))]
        close(out_fast, out_ref, (t, "outputs"))
        close(R_fast, R_ref, (t, "R"))
        for net, out, R in ((fast, out_fast, R_fast), (ref, out_ref, R_ref)):
            (F.cross_entropy(out, y) + 0.1 * R).backward()
        for (name, a), b in zip(fast.named_parameters(), ref.parameters()):
            if a.grad is not None:
                close(a.grad, b.grad, (t, name, "grad"))
                a.grad.copy_(b.grad)
        for opt, pruner in zip(opts, (p_fast, p_ref)):
            opt.step()
            pruner.step(t)
            opt.zero_grad()
        for name in p_ref.modules:
            for kind in p_ref.kinds:
                close(p_fast.Ibar[name][kind], p_ref.Ibar[name][kind], (t, name, kind, "Ibar"))
                close(p_fast.Ubar[name][kind], p_ref.Ubar[name][kind], (t, name, kind, "Ubar"))
        close(p_fast.triplet_scores(), p_ref.triplet_scores(), (t, "scores"))
        assert lora2.rank_pattern(fast) == lora2.rank_pattern(ref), t
        for (name, a), b in zip(fast.named_parameters(), ref.parameters()):
            close(a, b, (t, name))
        p_fast.load_state_dict(p_ref.state_dict())
    assert sum(sum(k) for k in lora2.rank_pattern(fast).values()) == p_fast.bT  # it pruned to b_T


def test_pruner_matches_per_parameter_reference():
    net = make_net(r=4, k=3)
    T, ti, tf = 30, 3, 8
    pruner = Pruner(net, target_rank=2, total_steps=T, init_warmup=ti, final_warmup=tf,
                    mask_interval=2)
    ref = ReferencePruner(net, pruner)
    checked = []
    real_step = pruner.step

    def both(t):
        kept = ref.step(t)  # reads the same .grad before the pruner masks λ
        real_step(t)
        if kept is not None:
            got = {(n, i) for n, pattern in lora2.rank_pattern(net).items()
                   for i, k in enumerate(pattern) if k}
            assert got == kept, t
            checked.append(t)

    pruner.step = both
    train(net, pruner, T)
    assert len(checked) >= 8


def test_sensitivities_only_for_lambda_and_inner_factors():
    net = make_net(r=4, k=3)
    pruner = Pruner(net, target_rank=2, total_steps=10, init_warmup=1, final_warmup=2,
                    mask_interval=1)
    assert all(set(d) == {"lambda_", "P_inner", "Q_inner"}
               for d in (*pruner.Ibar.values(), *pruner.Ubar.values()))
    tracked = sum(t.numel() for d in pruner.Ibar.values() for t in d.values())
    assert tracked == pruner.stats()["scored"] == 8 * (4 + 2 * 3 * 4)
    stats = pruner.stats()
    assert stats["adapter"] == sum(3 * (m.in_features + m.out_features) + 2 * 3 * 4 + 4
                                   for m in lora2.lora2_modules(net).values())
    assert stats["adalora_scored"] == sum(4 * (m.in_features + m.out_features) + 4
                                          for m in lora2.lora2_modules(net).values())
    pruner.close()
    every = Pruner(net, target_rank=2, total_steps=10, init_warmup=1, final_warmup=2,
                   mask_interval=1, scored="all")
    assert all(set(d) == {"lambda_", "P_inner", "Q_inner", "P_outer", "Q_outer"}
               for d in every.Ibar.values())
    train(net, every, 3)
    assert all(t.abs().sum() > 0 for d in every.Ibar.values() for t in d.values())


def test_parameter_without_gradient_is_skipped():
    net = make_net(r=4, k=3)
    pruner = Pruner(net, target_rank=2, total_steps=10, init_warmup=0, final_warmup=2,
                    mask_interval=1)
    frozen = net.layers[0].query
    frozen.P_inner.requires_grad_(False)  # never gets a .grad
    train(net, pruner, 4)
    assert torch.count_nonzero(pruner.Ibar["layers.0.query"]["P_inner"]) == 0
    assert torch.count_nonzero(pruner.Ibar["layers.0.query"]["Q_inner"]) > 0


def test_pruner_validation_errors():
    net = make_net(r=4, k=3)
    ok = dict(target_rank=2, total_steps=10, init_warmup=2, final_warmup=3, mask_interval=1)
    cases = [
        (dict(total_steps=5), r"total_steps \(T=5\) must exceed init_warmup \+ final_warmup "
                              r"\(t_i \+ t_f = 2 \+ 3 = 5\)"),
        (dict(target_rank=5), r"target_rank=5 exceeds r=4"),
        (dict(target_rank=-1), r"target_rank must be an integer >= 0, got -1"),
        (dict(mask_interval=0), r"mask_interval must be >= 1, got 0"),
        (dict(beta1=1.0), r"beta1 must be in \(0, 1\), got 1.0"),
        (dict(beta2=0.0), r"beta2 must be in \(0, 1\), got 0.0"),
        (dict(target_total=33), r"target_total must be an integer in \[0, 32\]"),
        (dict(scored="outer"), r"scored must be one of"),
        (dict(init_warmup=1.5), r"init_warmup must be an integer >= 0, got 1.5"),
        (dict(target_rank=True), r"target_rank must be an integer >= 0, got True"),
    ]
    for change, message in cases:
        with pytest.raises(ValueError, match=message):
            Pruner(net, **{**ok, **change})
    with pytest.raises(ValueError, match="no LoRA2Linear layer"):
        Pruner(nn.Linear(3, 3), **ok)


def test_bool_is_not_an_integer():
    """Issue 10.6: target_rank=True was accepted as 1."""
    net = make_net(r=4, k=3)
    ok = dict(target_rank=2, total_steps=10, init_warmup=2, final_warmup=3, mask_interval=1)
    for key in ("target_rank", "target_total", "mask_interval"):
        with pytest.raises(ValueError, match=f"{key} must be an integer"):
            Pruner(net, **{**ok, key: True})
    with pytest.raises(ValueError, match="r and k must be integers >= 1, got r=True"):
        LoRA2Linear(nn.Linear(3, 3), r=True)


def test_warns_when_never_stepped_and_close_removes_the_hook():
    """A pruner never stepped warns after 100 backward passes, eager and under torch.compile (a hook
    on a λ's gradient: a compiled graph does not bypass it, where it did bypass the forward pre-hook
    that counted before); close() removes the hook, and a pruner that is stepped never warns."""
    x = torch.randn(1, 2, 12)
    try:
        for compiled in (False, True):
            torch._dynamo.reset()
            net = make_net()
            pruner = Pruner(net, target_rank=2, total_steps=10, init_warmup=2, final_warmup=3,
                            mask_interval=1)
            model = torch.compile(net, backend="aot_eager") if compiled else net
            with pytest.warns(UserWarning, match="not been called in 100 backward passes"):
                for _ in range(100):
                    model(x).sum().backward()
        quiet = Pruner(make_net(), target_rank=2, total_steps=10, init_warmup=2, final_warmup=3,
                       mask_interval=1)
        quiet.close()
        quiet.close()  # idempotent
        pruner.close()
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            for _ in range(200):
                model(x).sum().backward()
            stepped = make_net()
            used = Pruner(stepped, target_rank=2, total_steps=300, init_warmup=2, final_warmup=3,
                          mask_interval=1)
            for t in range(150):
                stepped(x).sum().backward()
                used.step(t)
    finally:
        torch._dynamo.reset()


def tensors_in(state):
    """Every tensor of a nested dict / list state, in a fixed order."""
    if isinstance(state, torch.Tensor):
        return [state]
    if isinstance(state, dict):
        return [t for key in state for t in tensors_in(state[key])]
    if isinstance(state, (list, tuple)):
        return [t for value in state for t in tensors_in(value)]
    return []


def map_tensors(state, fn):
    """The nested state with fn applied to every tensor."""
    if isinstance(state, torch.Tensor):
        return fn(state)
    if isinstance(state, dict):
        return {key: map_tensors(value, fn) for key, value in state.items()}
    if isinstance(state, (list, tuple)):
        return [map_tensors(value, fn) for value in state]
    return state


def test_scores_are_updated_only_while_t_below_T_minus_t_f():
    """Issue 10.5: scores were updated at t = T − t_f too; AdaLoRA's RankAllocator and PEFT stop at
    t < T − t_f."""
    net = make_net(r=4, k=3)
    T, ti, tf = 12, 2, 4  # T − t_f = 8
    pruner = Pruner(net, target_rank=1, total_steps=T, init_warmup=ti, final_warmup=tf,
                    mask_interval=3)
    scores = {}
    train(net, pruner, T - tf + 2, on_step=lambda t: scores.__setitem__(
        t, [x.clone() for x in tensors_in(pruner.state_dict()) if x.is_floating_point()]))
    changed = lambda a, b: any(not torch.equal(x, y) for x, y in zip(scores[a], scores[b]))
    assert changed(T - tf - 2, T - tf - 1)  # t = 7 < T − t_f: scored
    assert not changed(T - tf - 1, T - tf), "scores changed at t = T − t_f"
    assert not changed(T - tf, T - tf + 1)  # the final phase: frozen


def test_a_step_that_finds_no_gradient_warns():
    """Pruner.step called after zero_grad (a transformers TrainerCallback's on_step_end does that)
    found no gradient anywhere and pruned by position without a word; now it warns, naming where to
    call it."""
    net = make_net()
    pruner = Pruner(net, target_rank=1, total_steps=10, init_warmup=0, final_warmup=2,
                    mask_interval=1)
    net(torch.randn(2, 5, 12)).sum().backward()
    net.zero_grad(set_to_none=True)
    with pytest.warns(UserWarning,
                      match=r"no scored factor has a gradient.*before optimizer.zero_grad"):
        pruner.step(0)


def test_non_finite_scores_raise():
    """A diverged run's NaN gradients made NaN scores, and the mask was chosen from them; masking
    now refuses."""
    net = make_net()
    pruner = Pruner(net, target_rank=1, total_steps=10, init_warmup=0, final_warmup=2,
                    mask_interval=2)
    net(torch.randn(2, 5, 12)).sum().backward()
    net.layers[1].up.lambda_.grad[0] = float("nan")
    pruner.step(1)  # scores only
    with pytest.raises(FloatingPointError,
                       match=r"1 of 32 importance scores are not finite.*lower the learning"):
        pruner.step(2)  # a masking step


def test_numpy_integers_are_integers_and_alpha_must_be_a_number():
    """Pruner.step(np.int64(0)) and target_rank=np.int64(2) were refused (a loop counter from
    numpy); alpha="16" reached the arithmetic as a raw TypeError; NaN passed."""
    np = pytest.importorskip("numpy")
    net = make_net(r=4, k=3)
    pruner = Pruner(net, target_rank=np.int64(2), total_steps=np.int64(10), init_warmup=np.int32(1),
                    final_warmup=2, mask_interval=1)
    pruner.step(np.int64(2))
    assert pruner.last_step == 2 and type(pruner.last_step) is int and pruner.bT == 16
    assert json_safe(pruner.state_dict()["config"])
    for alpha in ("16", float("nan"), None, True):
        with pytest.raises(ValueError, match=r"alpha must be > 0 \(a number\), got"):
            lora2.inject(Net(), "query", alpha=alpha)
    for dropout in ("0.1", float("nan")):
        with pytest.raises(ValueError, match=r"dropout must be in \[0, 1\)"):
            LoRA2Linear(nn.Linear(3, 3), dropout=dropout)
    for bad in (np.float64(2.0), np.bool_(True), 2.5):
        with pytest.raises(ValueError, match="target_rank must be an integer"):
            Pruner(net, target_rank=bad, total_steps=10, init_warmup=1, final_warmup=2,
                   mask_interval=1)


def json_safe(value):
    import json
    return json.loads(json.dumps(value)) == value


def test_a_final_warmup_of_at_most_one_step_still_ends_at_b_T():
    """With t_f ≤ 1 the final phase (t > T − t_f) never comes within steps 0 … T − 1, and a last
    step off the masking interval left the run above b_T:
    Pruner(T=10, t_i=0, t_f=1, mask_interval=5) kept 17 of 32 where budget(9) says
    8 · 1 + ... = b_T. The last step now masks at b(T − 1)."""
    for t_f, mask_interval in ((1, 5), (0, 4), (1, 1)):
        net = make_net(r=4, k=3)
        pruner = Pruner(net, target_rank=1, total_steps=10, init_warmup=0, final_warmup=t_f,
                        mask_interval=mask_interval)
        train(net, pruner, 10)
        kept = sum(map(sum, lora2.rank_pattern(net).values()))
        assert (kept == pruner.budget(9)
                == sum(m.rank for m in lora2.lora2_modules(net).values())), t_f
        if t_f == 1:
            assert kept == pruner.bT == 8


def test_step_must_increase():
    """Issue 10.6: Pruner.step accepted decreasing steps, so after the final phase the
    rank regrew."""
    net = make_net(r=4, k=3)
    pruner = Pruner(net, target_rank=1, total_steps=12, init_warmup=2, final_warmup=4,
                    mask_interval=1)
    train(net, pruner, 12)
    assert sum(m.rank for m in lora2.lora2_modules(net).values()) == 8
    for t in (3, 11):
        with pytest.raises(ValueError,
                           match=rf"Pruner.step\({t}\): steps must increase; the last one was 11"):
            pruner.step(t)
    assert sum(m.rank for m in lora2.lora2_modules(net).values()) == 8
    with pytest.raises(ValueError, match="global_step must be an integer >= 0"):
        pruner.step(12.0)


def test_pruner_follows_a_dtype_change():
    """Issue 10.6: model.half() after the Pruner was built crashed in the EMA update. Ī and Ū
    stay fp32."""
    net = make_net(r=4, k=3)
    randomise(net)
    pruner = Pruner(net, target_rank=1, total_steps=12, init_warmup=0, final_warmup=4,
                    mask_interval=1)
    net.half()
    g = torch.Generator().manual_seed(0)
    for p in net.parameters():
        p.grad = torch.randn(p.shape, generator=g).half() if p.requires_grad else None
    lam = net.layers[0].query.lambda_
    # Ī after one update, fp32
    expected = (1 - pruner.beta1) * (lam.float() * lam.grad.float()).abs()
    pruner.step(1)  # scores, then keeps b(1) of the 32 λ
    assert (lam.dtype == torch.float16
            and pruner.Ibar["layers.0.query"]["lambda_"].dtype == torch.float32)
    torch.testing.assert_close(pruner.Ibar["layers.0.query"]["lambda_"], expected)
    assert sum(m.rank for m in lora2.lora2_modules(net).values()) == pruner.budget(1)


def test_pruner_load_state_dict_validates_the_state():
    """Issue 10.6: a truncated state was broadcast into the scores without a word."""
    net = make_net(r=4, k=3)
    kw = dict(target_rank=1, total_steps=12, init_warmup=2, final_warmup=4, mask_interval=1)
    pruner = Pruner(net, **kw)
    train(net, pruner, 4)
    state = pruner.state_dict()
    fresh = Pruner(make_net(r=4, k=3), **kw)
    with pytest.raises(ValueError, match="shape"):
        # every tensor truncated to its first row
        fresh.load_state_dict(map_tensors(state, lambda t: t[:1]))
    state["Ibar"].pop("layers.1.down")
    with pytest.raises(ValueError, match=r"'Ibar' must hold the layers"):
        fresh.load_state_dict(state)


def test_compiles_without_graph_breaks_or_recompiles():
    """Issue 11: the forward (the Pruner's pre-hook active, training mode), the regulariser and the
    Pruner's scoring each compile to one graph, checked with torch._dynamo.explain (its backend
    needs no compiler); calling the compiled model again does not recompile (a Python counter in the
    pre-hook did, at every call)."""
    net = make_net()
    randomise(net)
    pruner = Pruner(net, target_rank=1, total_steps=20, init_warmup=2, final_warmup=4,
                    mask_interval=2)
    # compiled from outside, so the pre-hook on `net` is traced inline
    model = nn.Sequential(net).train()
    x = torch.randn(2, 5, 12)

    def one_graph(fn, *args):
        torch._dynamo.reset()
        explained = torch._dynamo.explain(fn)(*args)
        assert (explained.graph_count == 1
                and explained.graph_break_count == 0), explained.break_reasons

    try:
        one_graph(model, x)
        one_graph(lambda: lora2.orthogonal_regularizer(net, cross=0.1))
        model(x).sum().backward()
        one_graph(pruner.update_scores)
        graphs = []
        torch._dynamo.reset()
        compiled = torch.compile(model, backend=lambda gm, inputs: graphs.append(gm) or gm.forward)
        for _ in range(3):
            compiled(x)
        assert len(graphs) == 1, f"{len(graphs)} graphs for 3 calls: recompiled"
    finally:
        torch._dynamo.reset()


# ---------------------------------------------------------------------------------------- §6, state

def test_to_lora_reproduces_delta_weight():
    net = make_net(r=4, k=3)
    randomise(net)
    mods = list(lora2.lora2_modules(net).values())
    with torch.no_grad():
        mods[0].lambda_[[0, 2]] = 0  # r' = 2 ≤ k
        mods[1].lambda_.zero_()  # r' = 0
        # mods[2:]: r' = 4 > k = 3
    for (name, (B, A)), m in zip(lora2.to_lora(net).items(), mods):
        assert B.shape[1] == A.shape[0] == min(m.k, m.rank)
        # fp32 products against a float64 reference
        scale = dense_delta(m).abs().max().item() + 1e-30
        torch.testing.assert_close((B.double() @ A.double()), dense_delta(m), rtol=0,
                                   atol=1e-6 * scale)
        torch.testing.assert_close(B @ A, m.delta_weight(), rtol=0, atol=1e-6 * scale)


def test_adapter_state_round_trip_including_rank_zero():
    net = make_net(r=4, k=3)
    randomise(net)
    with torch.no_grad():
        net.layers[0].up.lambda_.zero_()
        net.layers[0].up.lambda_mask.zero_()
        net.layers[1].query.lambda_[1:] = 0
    state = lora2.adapter_state_dict(net)
    layers = lora2.lora2_modules(net)
    assert set(state) == {f"{n}.{key}" for n in layers for key in lora2.ADAPTER_KEYS} | {
        "classifier.weight", "classifier.bias"}  # the factors, the masks and the head inject trains
    fresh = make_net(r=4, k=3, seed=5)  # its head too comes from the state
    for a, b in zip(fresh.modules(), net.modules()):  # same frozen base weights
        if isinstance(a, LoRA2Linear):
            a.base.load_state_dict(b.base.state_dict())
    lora2.load_adapter_state_dict(fresh, state)
    x = torch.randn(2, 5, 12)
    assert torch.equal(fresh(x), net(x))
    assert fresh.layers[0].up.rank == 0 and fresh.layers[1].query.rank == 1
    other = make_net(r=2, k=3)
    with pytest.raises(ValueError, match=r"layers\.0\.query\.Q_inner has shape \(2, 3\), "
                                         r"the saved one \(4, 3\)"):
        lora2.load_adapter_state_dict(other, state)
    with pytest.raises(ValueError, match="missing"):
        lora2.load_adapter_state_dict(fresh, {k: v for k, v in state.items() if "down" not in k})


def test_resume_is_bit_identical():
    """Stop after 9 of 24 steps, save adapter + head + optimiser + pruner state, resume in a
    new model."""
    T = 24
    kw = dict(target_rank=1, total_steps=T, init_warmup=3, final_warmup=6, mask_interval=2)
    net = make_net(r=4, k=3)
    pruner = Pruner(net, **kw)
    train(net, pruner, T)

    first = make_net(r=4, k=3)
    first_pruner = Pruner(first, **kw)
    opt = train(first, first_pruner, 9)
    saved = dict(adapter=lora2.adapter_state_dict(first), head=first.classifier.state_dict(),
                 opt=opt.state_dict(), pruner=first_pruner.state_dict())

    # different adapter init: everything must come from the state
    resumed = make_net(r=4, k=3, seed=7)
    for a, b in zip(resumed.modules(), first.modules()):
        if isinstance(a, LoRA2Linear):
            a.base.load_state_dict(b.base.state_dict())
    lora2.load_adapter_state_dict(resumed, saved["adapter"])
    resumed.classifier.load_state_dict(saved["head"])
    resumed_pruner = Pruner(resumed, **kw)
    resumed_pruner.load_state_dict(saved["pruner"])
    opt2 = torch.optim.AdamW([p for p in resumed.parameters() if p.requires_grad], lr=0.05)
    opt2.load_state_dict(saved["opt"])
    train(resumed, resumed_pruner, T, start=9, opt=opt2)

    assert lora2.rank_pattern(resumed) == lora2.rank_pattern(net)
    for (ka, a), (kb, b) in zip(lora2.adapter_state_dict(resumed).items(),
                                lora2.adapter_state_dict(net).items()):
        assert ka == kb and torch.equal(a, b), ka
    for key in ("Ibar", "Ubar"):
        for name, scores in pruner.state_dict()[key].items():
            assert all(torch.equal(resumed_pruner.state_dict()[key][name][kind], t)
                       for kind, t in scores.items())
    with pytest.raises(ValueError, match="state was saved for"):
        Pruner(resumed, **{**kw, "target_rank": 2}).load_state_dict(saved["pruner"])


def test_pruner_follows_the_model_to_another_device():
    """Built before model.to(device) (a common order): its scores move with the layers at the
    next step."""
    net = make_net(r=4, k=3)
    pruner = Pruner(net, target_rank=2, total_steps=10, init_warmup=0, final_warmup=2,
                    mask_interval=1)
    net.to("meta")  # the only other device in a CPU-only run; it has shapes and kernels but no data
    for p in net.parameters():
        p.grad = torch.zeros_like(p) if p.requires_grad else None
    pruner.step(1)
    assert all(m.lambda_mask.device.type == "meta" for m in lora2.lora2_modules(net).values())
    assert all(t.device.type == "meta"
               for d in (*pruner.Ibar.values(), *pruner.Ubar.values()) for t in d.values())
