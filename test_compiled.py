"""Tests of compiled.py: the grouped fast path computes what lora2.py's literal per-layer code computes (outputs,
regulariser, gradients, scores, masks), it compiles once, and training under DDP, eager or compiled, ends where one
process ends (gloo on the CPU)."""
import copy
import dataclasses
import socket
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

import compiled
import lora2
import train_glue as tg
from test_lora2 import make_net, randomise, train
from test_train_glue import adapter_and_head, tiny_config, tiny_folders


def rel_err(a, b):
    return ((a - b).abs().max() / b.abs().max().clamp(min=1e-12)).item()


@pytest.mark.parametrize("cross,squared", [(0.0, False), (0.3, False), (0.3, True)])
def test_grouped_forward_regulariser_and_gradients_equal_the_reference(cross, squared):
    """Four shapes (two square, one wide, one narrow layer a block): one forward and backward of the task loss +
    R (L3, L4) through lora2.py and through the fast path give the same outputs, R and gradients to 1e-6 (fp32)."""
    ref = make_net(r=4, k=3)
    randomise(ref)
    fast = copy.deepcopy(ref)
    grouped = compiled.Grouped(fast, backend="none", cross=cross, squared=squared)
    assert len(grouped.groups) == 3 and all(isinstance(m, compiled.GroupedLoRA2Linear)
                                            for m in lora2.lora2_modules(fast).values())
    x = torch.randn(4, 5, 12)
    y_ref, y_fast = ref(x), fast(x)
    R_ref = lora2.orthogonal_regularizer(ref, cross=cross, squared=squared)
    R_fast = grouped.orthogonal_regularizer(fast, cross=cross, squared=squared)
    assert rel_err(y_fast, y_ref) < 1e-6 and rel_err(R_fast, R_ref) < 1e-6
    (y_ref.pow(2).mean() + R_ref).backward()
    (y_fast.pow(2).mean() + R_fast).backward()
    grads = {n: p.grad for n, p in fast.named_parameters() if p.grad is not None}
    assert grads.keys() == {n for n, p in ref.named_parameters() if p.grad is not None}
    for name, p in ref.named_parameters():
        if p.grad is not None:
            assert rel_err(grads[name], p.grad) < 1e-6, name
    with pytest.raises(RuntimeError, match="from a training forward"):  # R belongs to one forward
        grouped.orthogonal_regularizer(fast, cross=cross, squared=squared)
    assert all(m.grouped is None for m in lora2.lora2_modules(fast).values())  # no step's graph is kept alive


@pytest.mark.parametrize("scored", ["inner", "all"])
def test_grouped_pruner_scores_and_masks_equal_the_reference(scored):
    """Pruner.step with the fast path's update_scores (L5), triplet scores (L6) and masking (L8): the same Ī, Ū,
    scores and kept sets as lora2.py's loops at every step of a run through all phases of (L7)."""
    kw = dict(target_rank=1, total_steps=16, init_warmup=2, final_warmup=5, mask_interval=2, scored=scored)
    ref, fast = make_net(r=4, k=3), make_net(r=4, k=3)
    p_ref, p_fast = lora2.Pruner(ref, **kw), lora2.Pruner(fast, **kw)
    grouped = compiled.Grouped(fast, p_fast, backend="none")
    [h.remove() for h in grouped.hooks]  # the literal forward for both: only the pruner is compared here
    for m in lora2.lora2_modules(fast).values():
        m.__class__ = lora2.LoRA2Linear

    def compare(t):
        for name in p_ref.modules:
            for kind in p_ref.kinds:
                for a, b in ((p_fast.Ibar, p_ref.Ibar), (p_fast.Ubar, p_ref.Ubar)):
                    assert rel_err(a[name][kind], b[name][kind]) < 1e-6, (t, name, kind)
        assert rel_err(grouped.triplet_scores(), p_ref.triplet_scores()) < 1e-6
        assert lora2.rank_pattern(fast) == lora2.rank_pattern(ref), t
        state_fast, state_ref = lora2.adapter_state_dict(fast), lora2.adapter_state_dict(ref)
        assert all(torch.equal(state_fast[k], state_ref[k]) for k in state_ref), t  # same steps, same numbers

    opt_ref = opt_fast = None
    for t in range(16):  # one step each, in lockstep
        opt_ref = train(ref, p_ref, t + 1, start=t, opt=opt_ref)
        opt_fast = train(fast, p_fast, t + 1, start=t, opt=opt_fast)
        compare(t)
    assert sum(sum(k) for k in lora2.rank_pattern(fast).values()) == p_fast.bT  # it pruned to b_T


def test_grouped_products_compile_once(tmp_path):
    """Training forwards of several batch shapes and an evaluation forward: the grouped products compile into one
    graph, and the blocks into one (compile_blocks makes the first block's input need a gradient like the others')."""
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    net = make_net(r=4, k=3)
    pruner = lora2.Pruner(net, target_rank=1, total_steps=20, init_warmup=2, final_warmup=5, mask_interval=2)
    grouped = compiled.Grouped(net, pruner, backend="aot_eager")
    compiled.compile_blocks(net, "aot_eager")
    net.forward = compiled.eager_without_grad(net.forward)
    for t, tokens in enumerate([5, 7, 5, 9, 6]):
        out = net(torch.randn(3, tokens, 12))
        (out.pow(2).mean() + grouped.orthogonal_regularizer(net)).backward()
        pruner.step(t)
        net.zero_grad(set_to_none=True)
    with torch.no_grad():
        net(torch.randn(2, 4, 12))  # evaluation: eager, nothing compiles
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 2
    torch._dynamo.reset()


# ----------------------------------------------------------------------------------------------------------------------
# one process and two (gloo), eager and compiled


def _ddp_worker(rank, cfg, out, port):
    import os
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    summary, model = tg.train(tg.Config(**cfg))
    torch.save({"pattern": summary["rank_pattern"], "state": adapter_and_head(model)}, Path(out) / f"r{rank}.pt")


def two_processes(cfg, folder):
    """Train cfg with torchrun's environment on 2 gloo processes; the two ranks' (rank pattern, adapter + head)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    folder.mkdir(parents=True)
    mp.spawn(_ddp_worker, args=(dataclasses.asdict(cfg), str(folder), port), nprocs=2)
    return [torch.load(folder / f"r{r}.pt", weights_only=True) for r in (0, 1)]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return tiny_folders(tmp_path_factory.mktemp("tiny"))


def test_one_and_two_processes_eager_and_compiled_train_alike(tiny, tmp_path):
    """Without dropout, 2 gloo processes (each half of every global batch, gradients averaged by DDP) end where one
    process ends: adapter and head within 1e-5, identical masks on both ranks and as one process's; and so does
    training compiled under DDP (torch.compile with inductor and the grouped fast path, no CUDA graphs on the CPU)."""
    base = tiny_config(tiny, tmp_path, dropout=0.0, classifier_dropout=0.0, eval_every=0)
    summary, model = tg.train(dataclasses.replace(base, out_dir=str(tmp_path / "one")))
    one = {"pattern": summary["rank_pattern"], "state": adapter_and_head(model)}
    assert sum(map(sum, one["pattern"].values())) == 12 * 2  # pruned to b_T
    runs = {"eager": two_processes(dataclasses.replace(base, out_dir=str(tmp_path / "two")), tmp_path / "eager"),
            "compiled": two_processes(dataclasses.replace(base, out_dir=str(tmp_path / "two-compiled"), compile=True,
                                                          compile_backend="inductor"), tmp_path / "compiled")}
    for mode, (r0, r1) in runs.items():
        assert r0["pattern"] == r1["pattern"] == one["pattern"], mode
        for key, value in one["state"].items():
            assert torch.equal(r0["state"][key], r1["state"][key]), (mode, key)  # DDP keeps the ranks equal
            torch.testing.assert_close(r0["state"][key], value, rtol=1e-5, atol=1e-5, msg=f"{mode} {key}")
