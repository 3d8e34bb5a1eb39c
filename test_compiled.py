"""Tests of compiled.py: the compiled blocks compute what lora2.py's literal per-layer form computes
and compile once, and training under DDP, eager or compiled, ends where one process ends (gloo on
the CPU)."""
import dataclasses
import socket
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

import compiled
import lora2
import train_glue as tg
from test_lora2 import literal, make_net
from test_train_glue import adapter_and_head, tiny_config, tiny_folders


def rel_err(a, b):
    return ((a - b).abs().max() / b.abs().max().clamp(min=1e-12)).item()


def test_compiled_blocks_compile_once_and_compute_the_literal_form(tmp_path):
    """Training forwards of several batch shapes and an evaluation forward: the blocks compile into
    one graph (the layers inside read the pairs lora2's FactorGroups computed before the forward;
    compile_blocks makes the first block's input need a gradient like the others'), and loss, R and
    gradients equal the literal per-layer model's."""
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    net, ref = make_net(r=4, k=3, init="paper"), literal(make_net(r=4, k=3, init="paper"))
    with torch.no_grad():
        for model in (net, ref):
            for m in lora2.lora2_modules(model).values():
                m.lambda_.copy_(torch.linspace(-1.0, 1.0, m.r))  # ΔW ≠ 0 from the first step
    pruners = [lora2.Pruner(m, target_rank=1, total_steps=20, init_warmup=2, final_warmup=5,
                            mask_interval=2)
               for m in (net, ref)]
    compiled.compile_blocks(net, "aot_eager")
    for t, tokens in enumerate([5, 7, 5, 9, 6]):
        x = torch.randn(3, tokens, 12)
        for model, pruner in zip((net, ref), pruners):
            (model(x).pow(2).mean() + lora2.orthogonal_regularizer(model)).backward()
        for (name, a), b in zip(net.named_parameters(), ref.parameters()):
            if a.grad is not None:
                assert rel_err(a.grad, b.grad) < 1e-5, (t, name)
        for model, pruner in zip((net, ref), pruners):
            pruner.step(t)
            model.zero_grad(set_to_none=True)
    with torch.no_grad(), torch.compiler.set_stance("force_eager"):
        net(torch.randn(2, 4, 12))  # evaluation as rundir.evaluate runs it: eager, nothing compiles
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1
    torch._dynamo.reset()


# --------------------------------------------------------------------------------------------------
# one process and two (gloo), eager and compiled


def _ddp_worker(rank, cfg, out, port):
    import os
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    summary, model = tg.train(tg.Config(**cfg))
    torch.save({"pattern": summary["rank_pattern"], "state": adapter_and_head(model)},
               Path(out) / f"r{rank}.pt")


def two_processes(cfg, folder):
    """Train cfg with torchrun's environment on 2 gloo processes; the two ranks' (rank pattern,
    adapter + head)."""
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
    """Without dropout, 2 gloo processes (each half of every global batch, gradients averaged by
    DDP) end where one process ends: adapter and head within 1e-5, identical masks on both ranks and
    as one process's; and so does training compiled under DDP (torch.compile with inductor, lora2's
    grouped pairs, no CUDA graphs on the CPU)."""
    base = tiny_config(tiny, tmp_path, dropout=0.0, classifier_dropout=0.0, eval_every=0)
    summary, model = tg.train(dataclasses.replace(base, out_dir=str(tmp_path / "one")))
    one = {"pattern": summary["rank_pattern"], "state": adapter_and_head(model)}
    assert sum(map(sum, one["pattern"].values())) == 12 * 2  # pruned to b_T
    runs = {"eager": two_processes(dataclasses.replace(base, out_dir=str(tmp_path / "two")),
                                   tmp_path / "eager"),
            "compiled": two_processes(
                dataclasses.replace(base, out_dir=str(tmp_path / "two-compiled"), compile=True,
                                    compile_backend="inductor"), tmp_path / "compiled")}
    for mode, (r0, r1) in runs.items():
        assert r0["pattern"] == r1["pattern"] == one["pattern"], mode
        for key, value in one["state"].items():
            # DDP keeps the ranks equal
            assert torch.equal(r0["state"][key], r1["state"][key]), (mode, key)
            torch.testing.assert_close(r0["state"][key], value, rtol=1e-5, atol=1e-5,
                                       msg=f"{mode} {key}")
