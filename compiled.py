"""train_glue.py --compile: the same training step, its small products grouped, compiled, and replayed from CUDA graphs.

The loop in train_glue.py keeps SPEC §4's order in plain sight and lora2.py the literal per-layer form of each
equation; this file makes the same step cheap (test_compiled.py checks it computes the same values):
- `Grouped`, the fast path of LoRA²: the per-matrix work that does not touch the tokens is done for all matrices of
  one shape at once. Before each forward, each group's five factors are stacked and B = s·P_outer·M (L1) comes from
  two batched products for all of the group's layers; the regulariser (L3, L4) is computed from the same stacks (so
  the gradients of the forward and of R meet in one tensor per factor instead of an addition per matrix). The
  Pruner's score update (L5), triplet scores (L6) and masking (L8) run over lists and stacks of all layers with
  torch._foreach_* operations: a few kernels a step instead of six per scored factor.
- `compile_blocks`: torch.compile (in place) of each block of the model's longest nn.ModuleList (the transformer
  layers: one compilation serves every layer), and of the grouped products.
- `GraphedStep` (CUDA only): the device work of a step (forward, loss + γ·R, backward, clip, optimizer.step)
  captured into one CUDA graph per batch shape and replayed, so a step costs a few launches instead of thousands.
  Batches are padded to a few lengths (glue.length_buckets); AdamW is made capturable, its learning rate a device
  tensor the scheduler fills in place; nothing in a step waits for the GPU (batches come from pinned memory).
Under DDP (torchrun) the blocks and the grouped products are compiled, but no CUDA graph is captured: DDP's gradient
all-reduce runs from hooks on the host that a graph replay would skip.
Not here: the loop (train_glue.py).
"""
import functools

import torch
import torch.fx.experimental._config as fx_config
import torch.nn.functional as F
import torch.utils._pytree as pytree
from torch import nn

import lora2

BACKENDS = ("inductor", "aot_eager", "eager", "none")  # "none": no torch.compile; on CUDA, graphs of the eager kernels
MIN_STEPS = 500  # --compile's default: on for one CUDA process from this many steps (a shorter run is eager)


def resolve(flag, device, world, steps):
    """(whether to compile, why): --compile / --no-compile, or None (auto): on for one CUDA process training at
    least MIN_STEPS steps, where compiling pays for itself (experiments/BENCHMARKS.md); off on the CPU and, until
    it is measured on GPUs, under DDP (an explicit --compile compiles there, without CUDA graphs)."""
    if flag is not None:
        return flag, "--compile" if flag else "--no-compile"
    if device.type != "cuda":
        return False, "auto: the CPU"
    if world > 1:
        return False, "auto: DDP; pass --compile to compile"
    if steps < MIN_STEPS:
        return False, f"auto: {steps} steps, fewer than the {MIN_STEPS} that pay for compiling"
    return True, "auto"


def step(device_step, model, optimizer, cfg, pruner=None):
    """The compiled step: the grouped fast path (if the model has LoRA2Linear layers), compile_blocks, then on CUDA
    and in one process device_step replayed from CUDA graphs (GraphedStep), else device_step itself."""
    fn = device_step
    if lora2.lora2_modules(model):
        fast = Grouped(model, pruner, cfg.compile_backend, cross=cfg.cross)
        fn = functools.partial(device_step, regularizer=fast.orthogonal_regularizer)
    compile_blocks(model, cfg.compile_backend)
    model.forward = eager_without_grad(model.forward)  # evaluation: a few eager batches, no compile
    params = [p for group in optimizer.param_groups for p in group["params"]]
    distributed = torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1
    return GraphedStep(fn, params, optimizer) if params[0].is_cuda and not distributed else fn


def eager_without_grad(forward):
    """forward, run with torch.compile's stance "force_eager" where autograd is off (evaluation): compiling the
    blocks once more, for inference, costs more than a few eager batches."""
    @functools.wraps(forward)
    def call(*args, **kwargs):
        if torch.is_grad_enabled():
            return forward(*args, **kwargs)
        with torch.compiler.set_stance("force_eager"):
            return forward(*args, **kwargs)
    return call


def compile_blocks(model, backend):
    """torch.compile, in place, of the blocks of the model's longest nn.ModuleList (else the whole model). The
    blocks' input is made to require a gradient when autograd is on (it does not after frozen embeddings): then
    the first block takes the same compiled graph as the others, one compilation fewer, for one more product in
    its backward."""
    if backend == "none":
        return
    fx_config.use_duck_shape = False  # dynamic sizes: batch 32 × 32 tokens stay two sizes (else one, and a recompile)
    lists = {id(m): m for m in model.modules() if isinstance(m, nn.ModuleList) and len(m) > 1}
    if not lists:
        return model.compile(backend=backend, dynamic=True)
    blocks = max(lists.values(), key=len)
    for block in blocks:
        block.compile(backend=backend, dynamic=True)  # in place: the same module and state_dict keys
    parent = next(m for m in model.modules() if any(child is blocks for child in m.children()))
    parent.register_forward_pre_hook(_input_requires_grad)


def _input_requires_grad(module, args):
    """Forward pre-hook: a first argument that is a tensor without autograd history, made to require a gradient."""
    if args and torch.is_tensor(args[0]) and torch.is_grad_enabled() and not args[0].requires_grad:
        return (args[0].detach().requires_grad_(), *args[1:])


# ----------------------------------------------------------------------------------------------------------------------
# the grouped fast path of LoRA² (lora2.py computes the same per layer)


class GroupedLoRA2Linear(lora2.LoRA2Linear):
    """A LoRA2Linear whose forward reads (A, B) = (Q_outer, s·P_outer·M) from `grouped`, set by Grouped before
    every forward of the model, instead of computing them: the rank-k chain of (L2), h = W₀x + b + B(A x)."""

    def forward(self, x):
        if self.merged:
            return super().forward(x)
        A, B = self.grouped  # (k, d_in), (d_out, k): this forward's, in the autocast dtype
        y = self.base(x)
        if not torch.is_autocast_enabled(x.device.type):
            x = x.to(A.dtype)
        return y + F.linear(F.linear(self.dropout(x), A), B).to(y.dtype)


def grouped_products(groups, scalings, dtype, cross=0.0, squared=False, with_regularizer=True):
    """For each group of equal shapes, from its layers' factors (five lists, lora2.ADAPTER_KEYS order without the
    mask): A = Q_outer and B = s·P_outer·M with M = P_inner·diag(λ)·Q_inner (L1), stacked (n, ·, ·) and cast to
    `dtype`; and R (L3, L4) from the same stacks in fp32 (lora2.regularizer_of_stacks), or None."""
    As, Bs, stacks = [], [], []
    for (Q_outer, Q_inner, lambda_, P_inner, P_outer), s in zip(groups, scalings):
        S = {"Q_outer": torch.stack(Q_outer), "Q_inner": torch.stack(Q_inner), "P_inner": torch.stack(P_inner),
             "P_outer": torch.stack(P_outer)}
        M = (S["P_inner"] * torch.stack(lambda_)[:, None, :]) @ S["Q_inner"]  # (n, k, k) = P_inner diag(λ) Q_inner
        Bs.append((S["P_outer"] @ (s * M)).to(dtype))  # (n, d_out, k) = s · P_outer · M
        As.append(S["Q_outer"].to(dtype))  # (n, k, d_in)
        stacks.append(S)
    R = lora2.regularizer_of_stacks(stacks, cross, squared) if with_regularizer else None
    return As, Bs, R


class Grouped:
    """The fast path: installs GroupedLoRA2Linear on the model's LoRA2Linear layers, a forward pre-hook that computes
    every layer's (A, B) and R with grouped_products (torch.compile'd with `backend` for training forwards), and, for
    a `pruner`, grouped versions of its update_scores, set_mask and apply_mask (Pruner.step calls them as before)."""

    def __init__(self, model, pruner=None, backend="inductor", cross=0.0, squared=False):
        modules = lora2.lora2_modules(model)
        by_key = {}
        for m in modules.values():
            by_key.setdefault((m.out_features, m.in_features, m.r, m.k, m.scaling), []).append(m)
            m.__class__ = GroupedLoRA2Linear
        self.groups, self.cross, self.squared, self.R = list(by_key.values()), cross, squared, None
        self.scalings = [layers[0].scaling for layers in self.groups]
        self.products = grouped_products if backend == "none" else torch.compile(grouped_products, backend=backend)
        self.hooks = [model.register_forward_pre_hook(self.prepare), model.register_forward_hook(self.release)]
        self.pruner, self.order = pruner, None
        if pruner is not None:
            pruner.update_scores, pruner.set_mask = self.update_scores, self.set_mask
            pruner.apply_mask = self.apply_mask

    def prepare(self, model, args):
        """Forward pre-hook: (A, B) of every layer and, when training, R (L3, L4), from the grouped products."""
        device_type = next(iter(self.groups))[0].lambda_.device.type
        dtype = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else torch.float32
        train = torch.is_grad_enabled()
        factors = [[[m.Q_outer for m in g], [m.Q_inner for m in g], [m.lambda_ for m in g], [m.P_inner for m in g],
                    [m.P_outer for m in g]] for g in self.groups]
        with torch.autocast(device_type, enabled=False):  # the small products in fp32, cast once
            As, Bs, self.R = (self.products if train else grouped_products)(
                factors, self.scalings, dtype, self.cross, self.squared, with_regularizer=train)
        for layers, A, B in zip(self.groups, As, Bs):
            for m, a, b in zip(layers, A.unbind(0), B.unbind(0)):
                m.grouped = (a, b)

    def release(self, model, args, output):
        """Forward hook: drop the layers' (A, B), so that no reference keeps a step's autograd graph alive (autograd
        keeps what backward needs)."""
        for layers in self.groups:
            for m in layers:
                m.grouped = None

    def orthogonal_regularizer(self, model, cross=0.0, squared=False):
        """lora2.orthogonal_regularizer's value, from the stacks of this step's training forward (call it once, after
        the forward)."""
        if (cross, squared) != (self.cross, self.squared):
            raise ValueError(f"the grouped regulariser was set up for cross={self.cross}, squared={self.squared}")
        if self.R is None:
            raise RuntimeError("the grouped regulariser comes from a training forward of the model: run one first")
        R, self.R = self.R, None
        return R

    @torch.no_grad()
    def update_scores(self):
        """lora2.Pruner.update_scores (L5, AdaLoRA eqs. 10–12) for every scored factor of every layer at once."""
        p = self.pruner
        entries = [(name, kind, getattr(m, kind)) for name, m in p.modules.items() for kind in p.kinds]
        entries = [(name, kind, w) for name, kind, w in entries if w.grad is not None]
        if any(p.Ibar[name][kind].device != w.device for name, kind, w in entries):
            return lora2.Pruner.update_scores(p)  # the model moved: the reference follows it
        w = [e[2] for e in entries]
        Ibar, Ubar = [p.Ibar[n][k] for n, k, _ in entries], [p.Ubar[n][k] for n, k, _ in entries]
        I = torch._foreach_mul([t.float() for t in w], [t.grad.float() for t in w])  # I = |w · ∂L/∂w|  (eq. 10)
        torch._foreach_abs_(I)
        torch._foreach_lerp_(Ibar, I, 1 - p.beta1)  # Ī ← β₁Ī + (1−β₁)I                                 (eq. 11)
        torch._foreach_sub_(I, Ibar)
        torch._foreach_abs_(I)
        torch._foreach_lerp_(Ubar, I, 1 - p.beta2)  # Ū ← β₂Ū + (1−β₂)|I − Ī|                            (eq. 12)

    @torch.no_grad()
    def triplet_scores(self):
        """lora2.Pruner.triplet_scores (L6), computed per group on stacked scores; the same order (model order)."""
        p, parts = self.pruner, []
        for layers in self.groups:
            names = [m.name for m in layers]
            s = {kind: torch.stack(torch._foreach_mul([p.Ibar[n][kind] for n in names],
                                                      [p.Ubar[n][kind] for n in names])) for kind in p.kinds}
            S = s["lambda_"] + s["P_inner"].mean(1) + s["Q_inner"].mean(2)  # (n, r): s(λ_i) + means
            if p.scored == "all":  # + each layer's constant
                S = S + s["P_outer"].mean((1, 2))[:, None] + s["Q_outer"].mean((1, 2))[:, None]
            parts.append(S.flatten())
        if self.order is None:  # where each group's scores go in model order (computed once)
            offsets, start = {}, 0
            for name, m in p.modules.items():
                offsets[name], start = start, start + m.r
            index = [offsets[m.name] + i for layers in self.groups for m in layers for i in range(m.r)]
            self.order = torch.tensor(index, device=parts[0].device)
        return parts[0].new_empty(p.b0).index_copy_(0, self.order, torch.cat(parts))

    @torch.no_grad()
    def set_mask(self, budget):
        """lora2.Pruner.set_mask (L8): keep exactly the `budget` largest triplet scores; one copy into the masks."""
        p = self.pruner
        order = torch.argsort(self.triplet_scores(), descending=True, stable=True)
        keep = torch.zeros(p.b0, dtype=torch.bool, device=order.device).index_fill_(0, order[:budget], True)
        masks = [m.lambda_mask for m in p.modules.values()]
        torch._foreach_copy_(masks, list(keep.split([m.r for m in p.modules.values()])))

    @torch.no_grad()
    def apply_mask(self):
        """lora2.Pruner.apply_mask (L8): λ_i ← λ_i · [i kept] for every layer, in one multiplication."""
        modules = self.pruner.modules.values()
        kept = torch.cat([m.lambda_mask for m in modules]).to(next(iter(modules)).lambda_.dtype)
        torch._foreach_mul_([m.lambda_ for m in modules], list(kept.split([m.r for m in modules])))


# ----------------------------------------------------------------------------------------------------------------------
# CUDA graphs


class GraphedStep:
    """fn(*args) -> outputs, replayed from one CUDA graph per input shape: the device work of a training step. args:
    tensors, or dicts / tuples of them (a batch); outputs: what fn returns, the graph's tensors after a replay.

    The first `warmup` calls at a new shape run fn eagerly on a side stream (that is where torch.compile compiles);
    they are real steps. The next call captures fn into a graph, with every .grad set to None first so that backward
    writes the gradients into the graph's own memory, then replays it; later calls copy their inputs into the graph's
    and replay. Each replay points every parameter's .grad at the graph's gradients again, so code that reads .grad
    after the step (the Pruner) sees this step's, and zero_grad(set_to_none=True) only drops those references.
    At its first call the optimizer is made capturable, its learning rates device tensors; a scheduler that assigns
    a number instead of filling the tensor (older torch) is caught and copied into it.
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
        if self.lrs is None:  # first call, after any optimizer.load_state_dict (which may bring a number)
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
