"""train_glue.py --compile and --precision: the same training step, compiled and replayed from CUDA
graphs, in bf16 autocast where that is fast.

The loop in train_glue.py keeps SPEC §4's order in plain sight, and lora2.py computes each step's
LoRA² work in a few batched kernels already (its FactorGroups and Pruner); this file removes what
is left of the host's cost:
- `compile_blocks`: torch.compile (in place) of each block of the model's longest nn.ModuleList
  (the transformer layers: one compilation serves every layer). The layers inside read the (A, B)
  pairs that lora2's FactorGroups computed, eagerly, before the model's forward.
- `GraphedStep` (CUDA only): the device work of a step (forward, loss + γ·R, backward, clip,
  optimizer.step) captured into one CUDA graph per batch shape and replayed, so a step costs a few
  launches instead of thousands. Batches are padded to a few lengths (glue.length_buckets); AdamW
  is made capturable, its learning rate a device tensor the scheduler fills in place; nothing in a
  step waits for the GPU (batches come from pinned memory).
Under DDP (torchrun) the blocks are compiled, but no CUDA graph is captured: DDP's gradient
all-reduce runs from hooks on the host that a graph replay would skip.
Not here: the loop (train_glue.py).
"""
import contextlib

import torch
import torch.fx.experimental._config as fx_config
import torch.utils._pytree as pytree
from torch import nn

BACKENDS = ("inductor", "aot_eager", "eager", "none")  # none: CUDA graphs of the eager kernels
MIN_STEPS = 500  # --compile's default: on for one CUDA process from this many steps


def resolve(flag, device, world, steps):
    """(whether to compile, why): --compile / --no-compile, or None (auto): on for one CUDA process
    training at least MIN_STEPS steps, where compiling pays for itself (a measured break-even); off
    on the CPU and, until it is measured on GPUs, under DDP (an explicit --compile compiles there,
    without CUDA graphs)."""
    if flag is not None:
        return flag, "--compile" if flag else "--no-compile"
    if device.type != "cuda":
        return False, "auto: the CPU"
    if world > 1:
        return False, "auto: DDP; pass --compile to compile"
    if steps < MIN_STEPS:
        return False, f"auto: {steps} steps, fewer than the {MIN_STEPS} that pay for compiling"
    return True, "auto"


def step(device_step, model, optimizer, backend="inductor"):
    """The compiled step: compile_blocks, then on CUDA and in one process device_step replayed from
    CUDA graphs (GraphedStep), else device_step itself. Evaluate with torch.compiler.set_stance(
    "force_eager"): compiling the blocks again for inference costs more than a few eager batches."""
    compile_blocks(model, backend)
    params = [p for group in optimizer.param_groups for p in group["params"]]
    distributed = torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1
    if params[0].is_cuda and not distributed:
        return GraphedStep(device_step, params, optimizer)
    return device_step


def resolve_precision(choice, device):
    """(fp32 or bf16, why): auto is bf16 autocast on CUDA and on CPUs with bf16 instructions
    (AVX512-BF16, AMX), else fp32. None (a checkpoint without the setting): bf16 on CUDA, fp32 on
    the CPU."""
    if choice in ("fp32", "bf16"):
        return choice, "--precision"
    if device.type == "cuda" or choice is None:
        return ("bf16" if device.type == "cuda" else "fp32"), "auto"
    bf16 = torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    return ("bf16", "auto: a CPU with bf16 instructions") if bf16 else ("fp32", "auto: no bf16 CPU")


def autocast(device, precision):
    """torch.autocast to bf16 for precision "bf16" (matrix products in bf16, the rest fp32)."""
    if precision == "bf16":
        return torch.autocast(device.type, torch.bfloat16)
    return contextlib.nullcontext()


def compile_blocks(model, backend):
    """torch.compile, in place, of the blocks of the model's longest nn.ModuleList (else the whole
    model). The blocks' input is made to require a gradient when autograd is on (it does not after
    frozen embeddings): then the first block takes the same compiled graph as the others, one
    compilation fewer, for one more product in its backward."""
    if backend == "none":
        return
    fx_config.use_duck_shape = False  # batch 32 × 32 tokens: two sizes (else one, then a recompile)
    lists = {id(m): m for m in model.modules() if isinstance(m, nn.ModuleList) and len(m) > 1}
    if not lists:
        return model.compile(backend=backend, dynamic=True)
    blocks = max(lists.values(), key=len)
    for block in blocks:
        block.compile(backend=backend, dynamic=True)  # in place: the same module, state_dict keys
    parent = next(m for m in model.modules() if any(child is blocks for child in m.children()))
    parent.register_forward_pre_hook(_input_requires_grad)


def _input_requires_grad(module, args):
    """Forward pre-hook: a first argument that is a tensor without autograd history, made to
    require a gradient."""
    if args and torch.is_tensor(args[0]) and torch.is_grad_enabled() and not args[0].requires_grad:
        return (args[0].detach().requires_grad_(), *args[1:])


# --------------------------------------------------------------------------------------------------
# CUDA graphs


class GraphedStep:
    """fn(*args) -> outputs, replayed from one CUDA graph per input shape: the device work of a
    training step. args: tensors, or dicts / tuples of them (a batch); outputs: what fn returns, the
    graph's tensors after a replay.

    The first `warmup` calls at a new shape run fn eagerly on a side stream (that is where
    torch.compile compiles); they are real steps. The next call captures fn into a graph, with every
    .grad set to None first so that backward writes the gradients into the graph's own memory, then
    replays it; later calls copy their inputs into the graph's and replay. Each replay points every
    parameter's .grad at the graph's gradients again, so code that reads .grad after the step (the
    Pruner) sees this step's, and zero_grad(set_to_none=True) only drops those references. At its
    first call the optimizer is made capturable, its learning rates device tensors; a scheduler that
    assigns a number instead of filling the tensor is caught and copied into it.
    """

    def __init__(self, fn, params, optimizer, warmup=2):
        self.fn, self.params, self.optimizer, self.warmup = fn, list(params), optimizer, warmup
        self.graphs, self.calls, self.lrs = {}, {}, None
        self.side = torch.cuda.Stream()

    def __call__(self, *args):
        inputs, spec = pytree.tree_flatten(args)
        key = (str(spec),) + tuple((tuple(t.shape), t.dtype) for t in inputs)
        self._sync_lr()
        if key not in self.graphs:
            self.calls[key] = self.calls.get(key, 0) + 1
            if self.calls[key] <= self.warmup:
                return self._on_side_stream(args)
            self.graphs[key] = self._capture(inputs, spec)
        graph, static_inputs, outputs, grads = self.graphs[key]
        for static, t in zip(static_inputs, inputs):
            static.copy_(t, non_blocking=True)
        graph.replay()
        for p, g in zip(self.params, grads):
            p.grad = g
        return outputs

    def _on_side_stream(self, args):
        self.side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(self.side):
            outputs = self.fn(*args)
        torch.cuda.current_stream().wait_stream(self.side)
        return outputs

    def _capture(self, inputs, spec):
        static_inputs = [t.clone() for t in inputs]
        for p in self.params:
            p.grad = None
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):  # its own stream and private memory; nothing runs yet
            outputs = self.fn(*pytree.tree_unflatten(static_inputs, spec))
        return graph, static_inputs, outputs, [p.grad for p in self.params]

    def _sync_lr(self):
        groups = self.optimizer.param_groups
        if self.lrs is None:  # first call, after any optimizer.load_state_dict (maybe a number)
            device = self.params[0].device
            for g in groups:
                g["capturable"] = True
                if not (isinstance(g["lr"], torch.Tensor) and g["lr"].device == device):
                    g["lr"] = torch.tensor(float(g["lr"]), device=device)
            self.lrs = [g["lr"] for g in groups]
        for g, lr in zip(groups, self.lrs):
            if g["lr"] is not lr:  # a scheduler that assigned a number instead of filling it
                lr.copy_(g["lr"]) if isinstance(g["lr"], torch.Tensor) else lr.fill_(g["lr"])
                g["lr"] = lr
