"""train_glue.py --compile: the training step compiled with torch.compile and replayed from CUDA graphs.

The loop in train_glue.py keeps SPEC §4's order in plain sight; this file only wraps pieces of it:
- `compile_pieces`: torch.compile (in place) of each block of the backbone's longest nn.ModuleList (the transformer
  layers: one compilation serves every layer, so warm-up costs one layer's compile, not the model's), of the
  method's regulariser (L3, L4) and of LoRA²'s score update (L5). The masking (L6–L8, every mask_interval steps) and
  the schedule stay eager.
- `GraphedStep` (CUDA only): the device work of a step — forward, loss + γ·R, backward, clip, optimizer.step —
  captured into one CUDA graph per batch shape and replayed, so a step costs a few launches instead of thousands.
  Batches are padded to a few lengths (glue.length_buckets), so a run records a handful of graphs. AdamW is fused
  and capturable and reads its learning rate from a device tensor that the scheduler fills in place; nothing in a
  step waits for the GPU (batches come from pinned memory, see glue.to_device).
Not here: the loop (train_glue.py), DDP (refused with --compile: see `resolve`).
"""
import torch
import torch.fx.experimental._config as fx_config
import torch.utils._pytree as pytree
from torch import nn

BACKENDS = ("inductor", "aot_eager", "eager", "none")  # "none": no torch.compile; on CUDA, graphs of the eager kernels


def resolve(flag, device, world):
    """Whether to compile: --compile / --no-compile, or None (auto) = on for one CUDA process, off on the CPU and
    under DDP. An explicit --compile under DDP raises: graphs and DDP's gradient hooks are not combined here."""
    if flag and world > 1:
        raise ValueError("--compile does not run under DDP (torchrun): pass --no-compile, or train on one GPU")
    return (device.type == "cuda" and world == 1) if flag is None else flag


def adamw_options(cfg, device):
    """AdamW's options: fused; with CUDA graphs also capturable, its learning rate a device tensor (a graph reads it
    at every replay; the scheduler fills it in place)."""
    if not (cfg.compile and device.type == "cuda"):
        return dict(lr=cfg.lr, fused=True)
    return dict(lr=torch.tensor(float(cfg.lr), device=device), fused=True, capturable=True)


def step(fn, model, method, optimizer, cfg):
    """The compiled step: compile_pieces, then on CUDA fn replayed from CUDA graphs (GraphedStep), else fn."""
    compile_pieces(model, method, cfg.compile_backend)
    params = [p for group in optimizer.param_groups for p in group["params"]]
    return GraphedStep(fn, params, optimizer) if params[0].is_cuda else fn


def compile_pieces(model, method, backend):
    """torch.compile, in place: the blocks of the model's longest nn.ModuleList (else the whole model), the method's
    regularizer and, for LoRA², the Pruner's score update (`update_scores`; `_update_scores` before it was public)."""
    if backend == "none":
        return
    fx_config.use_duck_shape = False  # dynamic sizes: batch 32 × 32 tokens stay two sizes (else: one, and a recompile)
    lists = [m for m in model.modules() if isinstance(m, nn.ModuleList) and len(m) > 1]
    for block in max(lists, key=len) if lists else [model]:
        block.compile(backend=backend, dynamic=True)  # in place: the same module and state_dict keys
    method.regularizer = torch.compile(method.regularizer, backend=backend)
    pruner = getattr(method, "pruner", None)
    name = "update_scores" if hasattr(pruner, "update_scores") else "_update_scores"
    if pruner is not None and hasattr(pruner, name):
        setattr(pruner, name, _compiled_after_first_call(getattr(pruner, name), backend))


def _compiled_after_first_call(fn, backend):
    """fn eagerly at its first call, then torch.compile'd: a Pruner built before model.to(device) moves its scores at
    its first update, and a compilation of that call would be recompiled at the next (the device changed)."""
    compiled_fn, calls = torch.compile(fn, backend=backend), []

    def call(*args, **kwargs):
        calls.append(None)
        return (fn if len(calls) == 1 else compiled_fn)(*args, **kwargs)
    return call


class GraphedStep:
    """fn(*args) -> outputs, replayed from one CUDA graph per input shape: the device work of a training step. args:
    tensors, or dicts / tuples of them (a batch); outputs: what fn returns, the graph's tensors after a replay.

    The first `warmup` calls at a new shape run fn eagerly on a side stream (that is where torch.compile compiles);
    they are real steps. The next call captures fn into a graph, with every .grad set to None first so that backward
    writes the gradients into the graph's own memory, then replays it; later calls copy their inputs into the graph's
    and replay. Each replay points every parameter's .grad at the graph's gradients again, so code that reads .grad
    after the step (the Pruner) sees this step's, and zero_grad(set_to_none=True) only drops those references.
    The optimizer is made capturable, its learning rates device tensors (adamw_options does so from the start): a
    scheduler that assigns a number instead of filling the tensor (older torch) is caught and copied into it.
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
        with torch.cuda.graph(graph):  # on its own stream, memory from the graph's private pool; nothing runs yet
            outputs = self.fn(*pytree.tree_unflatten(static_inputs, spec))
        return graph, static_inputs, outputs, [p.grad for p in self.params]

    def _sync_lr(self):
        groups = self.optimizer.param_groups
        if self.lrs is None:  # first call, after any optimizer.load_state_dict (which may bring a number, capturable=False)
            device = self.params[0].device
            for g in groups:
                g["capturable"] = True
                if not (isinstance(g["lr"], torch.Tensor) and g["lr"].device == device):
                    g["lr"] = torch.tensor(float(g["lr"]), device=device)
            self.lrs = [g["lr"] for g in groups]
        for g, lr in zip(groups, self.lrs):
            if g["lr"] is not lr:  # a scheduler that assigned a number instead of filling the tensor (older torch)
                lr.copy_(g["lr"]) if isinstance(g["lr"], torch.Tensor) else lr.fill_(g["lr"])
                g["lr"] = lr
