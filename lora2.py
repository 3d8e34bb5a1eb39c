"""LoRA²: multi-scale low-rank adaptation, in one file, with torch alone.

Reference: Jia-Chen Zhang, Yu-Jie Xiong, He-Xi Qiu, Dong-Hai Zhu, Chun-Ming Xia, "LoRA²: Multi-Scale
Low-Rank Approximations for Fine-Tuning Large Language Models", arXiv 2408.06854 (2024);
Neurocomputing 650 (2025) 130859. It extends AdaLoRA (Zhang et al., ICLR 2023, arXiv 2303.10512),
cited as "AdaLoRA eq. (n)". Labels (L1)...(L8) and the tags [paper] / [code] / [ours] refer to
SPEC.md beside this file, which this file follows section by section: the layer (§1), regularisers
(§2), importance score (§3), budget and masking (§4), export (§6).

The update of a frozen weight W₀ (d_out × d_in), with s = α / r:

    W = W₀ + s · ΔW,   ΔW = P · diag(λ) · Q,   P = P_outer · P_inner,   Q = Q_inner · Q_outer   (L1)

Two small LoRAs (P_outer·P_inner and Q_inner·Q_outer) whose product is a large one; AdaLoRA's SVD
form P Λ Q in the middle.

    factor    shape       init                       authors'   role
    Q_outer   k × d_in    orthogonal or N(0, 0.02²)  lora_A     input plane, k-dim, of the input
    Q_inner   r × k       orthogonal or N(0, 0.02²)  lora_B     right inner factor
    lambda_   r           0                          lora_E     the r "singular values", pruned
    P_inner   k × r       orthogonal or N(0, 0.02²)  lora_aa    left inner factor
    P_outer   d_out × k   orthogonal or N(0, 0.02²)  lora_bb    output plane, k-dim, of the output

r is the number of singular values (the budget that pruning shrinks), k the inner width; rank(ΔW) ≤
min(k, #λ≠0). The forward never builds the d_out × d_in matrix ΔW: with M = P_inner·diag(λ)·Q_inner
(k × k) it computes x ↦ B(Ax), A = Q_outer, B = s·P_outer·M, the cost of a plain LoRA of rank k;
the model's FactorGroups computes every layer's (A, B) at once (SPEC §1, "grouping").

Typical use (the step order of SPEC §4), bf16 base and autocast, gradient checkpointing and
torch.compile included:

    names = inject(model, ["q_proj", "v_proj"], r=8, k=8)  # trains the adapters (and HEAD parts)
    pruner = Pruner(model, target_rank=2, total_steps=T, init_warmup=t_i, final_warmup=t_f,
                    mask_interval=10)
    for step in range(T):
        loss = task_loss(model, batch) + 0.1 * orthogonal_regularizer(model)  # task + γ·R (L3)
        loss.backward(); clip_grad_norm_(...); optimizer.step(); scheduler.step()
        pruner.step(step)                                  # (L5)–(L8): reads this step's .grad
        optimizer.zero_grad()
    pruner.close()
    state_dict, config = peft_state_dict(model)  # a plain PEFT LoRA of rank min(k, r') (SPEC §6)

With transformers' Trainer, step the pruner from a TrainerCallback's on_optimizer_step (it runs
after optimizer.step() and before zero_grad()): pruner.step(state.global_step).

Not supported: layers other than nn.Linear and GPT-2's Conv1D (no nn.Conv2d, nn.Embedding, fused QKV
splitting); shrinking the stored tensors when λ is pruned (use `to_lora` for that); quantised base
weights; changing s as the rank falls (AdaLoRA keeps s = α / r fixed, and so do we); merging a base
weight that is tied to another parameter (merge refuses); training through merged layers (the
forward refuses); writing files (the repository's rundir.py writes the PEFT adapter folder); torch
older than 2.5 (the public state-dict hooks).
"""
import contextlib
import itertools
import math
import re
import warnings

import torch
import torch.nn.functional as F
from torch import nn

INITS = ("orthogonal", "paper")
SCORED = ("inner", "all")
HEAD = ("classifier", "pooler")  # name parts of a classification head, trained with the adapters
FACTORS = ("P_outer", "P_inner", "Q_inner", "Q_outer")  # what the regulariser (L3) keeps orthogonal
ADAPTER_KEYS = ("Q_outer", "Q_inner", "lambda_", "P_inner", "P_outer", "lambda_mask")  # its state


# --------------------------------------------------------------------------------------------------
# §1  The layer (L1, L2)


class LoRA2Linear(nn.Module):
    """A frozen linear layer plus the LoRA² update s · P_outer P_inner diag(λ) Q_inner Q_outer (L1).

    The adapter is kept in fp32 whatever the base's dtype; the output has the base's dtype. Under
    torch.autocast the two products on the tokens run in the autocast dtype like every other
    F.linear; the small products that make B stay fp32. merge() folds s·ΔW into W₀ (SPEC §1); what
    a merged layer refuses, so that nothing goes silently wrong, is under "Merging" below.
    """

    def __init__(self, base, r=8, k=8, alpha=16, dropout=0.0, init="orthogonal"):
        super().__init__()
        _check_layer_arguments(base, r, k, alpha, dropout, init)
        r, k, alpha = int(r), int(k), float(alpha)
        self.base = base.requires_grad_(False)
        self.fan_in_fan_out = _is_conv1d(base)  # Conv1D: weight is (d_in, d_out)
        w = base.weight
        self.out_features, self.in_features = w.shape[::-1] if self.fan_in_fan_out else w.shape
        self.r, self.k, self.alpha = r, k, alpha
        self.scaling = alpha / r  # s, fixed by the initial r (SPEC §1)
        kw = dict(device=w.device, dtype=torch.float32)
        self.Q_outer = nn.Parameter(torch.empty(k, self.in_features, **kw))  # (k, d_in)    lora_A
        self.Q_inner = nn.Parameter(torch.empty(r, k, **kw))  # (r, k)                       lora_B
        self.lambda_ = nn.Parameter(torch.zeros(r, **kw))  # (r,)                            lora_E
        self.P_inner = nn.Parameter(torch.empty(k, r, **kw))  # (k, r)                       lora_aa
        self.P_outer = nn.Parameter(torch.empty(self.out_features, k, **kw))  # (d_out, k)   lora_bb
        self.register_buffer("lambda_mask", torch.ones(r, dtype=torch.bool, device=w.device))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.name, self.tied_to = None, ()  # set by inject / merge(model)
        self.groups = None  # the FactorGroups of the model this layer is in (set by inject)
        self.grouped = None  # (A, B) of this forward, from the model's FactorGroups, or None
        self.grouped_versions = None  # the factors' version counters when `grouped` was computed
        self._merged_delta = None  # (B, A) with s·ΔW = B @ A as added by merge(), or None
        self.register_state_dict_post_hook(_state_dict_holds_W0)  # see "Merging"
        self.register_load_state_dict_pre_hook(_refuse_load_while_merged)
        self.reset_parameters(init)

    @torch.no_grad()
    def reset_parameters(self, init="orthogonal"):
        """(L1) λ = 0 at init, so ΔW = 0: at step 0 the task loss gives a gradient to λ only, and
        the regulariser (L3) still pulls on the four factors. init="paper": N(0, 0.02²) factors
        [code]; "orthogonal": nn.init.orthogonal_ on each, the state (L3) aims for, faster in short
        runs."""
        for factor in (self.Q_outer, self.Q_inner, self.P_inner, self.P_outer):
            if init == "paper":
                nn.init.normal_(factor, std=0.02)
            else:
                nn.init.orthogonal_(factor)
        self.lambda_.zero_()
        self.lambda_mask.fill_(True)

    def inner(self):
        """M = P_inner · diag(λ) · Q_inner (k × k): ΔW = P_outer · M · Q_outer (L1)."""
        return (self.P_inner * self.lambda_) @ self.Q_inner  # (k, r) ⊙ (r,) @ (r, k) -> (k, k)

    def factors(self):
        """(A, B) = (Q_outer, s · P_outer · M), so that s·ΔW = B @ A (L1): the rank-k pair of (L2).

        Computed here, or taken from the model's grouped pass (FactorGroups) when that pass computed
        it from the factors as they are now (their version counters) and with autograd as it is
        now. A call without autograd drops a grouped pair that carries autograd history: in
        reentrant gradient checkpointing that call is the first pass, and the recomputation that
        follows then builds the layer's own graph instead of going through the shared one."""
        pair = self.grouped
        if pair is not None and not torch.compiler.is_compiling():
            grad = torch.is_grad_enabled()
            if self.grouped_versions != self._versions() or (
                    grad and not pair[1].requires_grad and self.lambda_.requires_grad):
                pair = self.grouped = None  # stale, or without the history training needs
            elif not grad and pair[1].requires_grad:
                self.grouped = None  # this call uses it; a later call with autograd makes its own
        if pair is not None:
            return pair
        return self.Q_outer, self.scaling * (self.P_outer @ self.inner())  # (k, d_in), (d_out, k)

    def forward(self, x):  # x: (..., d_in)
        """(L2) h = W₀x + b + s · P_outer (P_inner (λ ⊙ (Q_inner (Q_outer x)))) = W₀x + b + BAx."""
        if self.merged:
            if self.training and torch.is_grad_enabled() and self.lambda_.requires_grad:
                raise RuntimeError(f"LoRA2Linear {_label(self)} is merged: a training forward "
                                   f"would train nothing (the adapter is off the autograd path). "
                                   f"Call lora2.unmerge(model) before training, or run merged "
                                   f"layers under model.eval() or torch.no_grad().")
            return self.base(x)  # W₀ + s·ΔW is in the weight
        A, B = self.factors()  # (k, d_in), (d_out, k)
        y = self.base(x)  # (..., d_out), the base's dtype
        if not torch.is_autocast_enabled(x.device.type):
            x = x.to(A.dtype)  # the adapter's products in its own dtype outside autocast
        return y + F.linear(F.linear(self.dropout(x), A), B).to(y.dtype)  # W₀x + b + B(Ax)

    @torch.no_grad()
    def delta_weight(self):
        """s · ΔW = s · P_outer · M · Q_outer (L1), (d_out, d_in), fp32 under any autocast."""
        with _fp32(self.lambda_):
            return self.scaling * (self.P_outer @ self.inner() @ self.Q_outer)

    @torch.no_grad()
    def merge(self):
        """W₀ ← W₀ + s·ΔW (L1), in fp32 under any autocast, rounded once to the base's dtype (SPEC
        §1). Keeps what it added as (B, A) = (s·P_outer·M, Q_outer). Idempotent; independent of
        .train()/.eval(). Raises if the base weight is shared with another parameter (`tied_to`)."""
        if self.merged:
            return
        _refuse_if_tied(self)
        with _fp32(self.lambda_):
            B = self.scaling * (self.P_outer.float() @ self.inner().float())  # (d_out, k)
        self._merged_delta = (B, self.Q_outer.to(torch.float32, copy=True))  # s·ΔW = B @ A
        self.base.weight.copy_(_with_merged_delta(self, +1.0))  # W₀ + s·ΔW

    @torch.no_grad()
    def unmerge(self):
        """W ← W − B @ A with the (B, A) merge() kept: exactly what merge() added, even if λ or a
        factor changed since (W₀ comes back up to the rounding of (W₀ + δ) − δ). Idempotent."""
        if self.merged:
            self.base.weight.copy_(_with_merged_delta(self, -1.0))  # W₀
            self._merged_delta = None

    @property
    def merged(self):
        """True between merge() and unmerge()."""
        return self._merged_delta is not None

    @property
    def rank(self):
        """Number of non-zero λ, an upper bound on rank(ΔW) together with k."""
        return int(torch.count_nonzero(self.lambda_))

    def extra_repr(self):
        """Shapes, r, k, s, and whether the layer is merged, as repr(model) shows them."""
        merged = ", merged" if self.merged else ""
        return (f"d_in={self.in_features}, d_out={self.out_features}, r={self.r}, k={self.k}, "
                f"s={self.scaling:g}{merged}")

    def _versions(self):
        """The version counters of the five factors: they change with every in-place update."""
        return (self.Q_outer._version, self.Q_inner._version, self.lambda_._version,
                self.P_inner._version, self.P_outer._version)

    def __getstate__(self):
        """For copy.deepcopy and pickling: without this forward's pair (autograd history)."""
        return {**super().__getstate__(), "grouped": None, "grouped_versions": None}


class FactorGroups:
    """The pairs (A, B) of (L2) for every LoRA2Linear layer of a model at once (SPEC §1, grouping).

    inject registers one as a forward pre-hook of the model it adapts. Before each forward it
    stacks the factors of each group of layers with equal shapes (and s, device and dtype) and
    computes, in fp32 whatever autocast is on, for all n layers of the group in two batched
    products:

        A = Q_outer (n, k, d_in),    B = s · P_outer · P_inner · diag(λ) · Q_inner (n, d_out, k)

    cast once to autocast's dtype when autocast is on; each layer's `factors()` takes its slice.
    orthogonal_regularizer (L3, L4) reads the same stacks (`stacks`), so the gradients of the
    forward and of R reach each factor as one tensor per group. An eager training step of an LLM is
    bound by the host launching kernels: this way LoRA² adds a few kernels per group of layers,
    not a dozen per layer. While torch.compile traces the model, the hook only clears the slices:
    the compiled graph computes each layer's own pair.
    """

    def __init__(self, layers):
        self.groups = _by_shape(layers)  # [[layers of one shape]], in model order
        for m in layers:
            m.groups = self
        self.stacks = [None] * len(self.groups)  # each group's {factor: (n, ...)}, last forward
        self.handle = None  # the forward pre-hook's handle

    def __call__(self, model, args):
        """Forward pre-hook: every layer's (A, B) for this forward."""
        if torch.compiler.is_compiling():
            for m in (m for layers in self.groups for m in layers):
                m.grouped = None
            return
        for i, layers in enumerate(self.groups):
            try:
                self.stacks[i] = self._pairs(layers)
            except RuntimeError:  # a group on several devices or dtypes (a model moved in parts)
                regrouped = [g for layers in self.groups for g in _by_shape(layers)]
                if len(regrouped) == len(self.groups):
                    raise
                self.groups, self.stacks = regrouped, [None] * len(regrouped)
                return self(model, args)

    @staticmethod
    def _pairs(layers):
        """Each layer's (A, B) from its group's stacked factors; returns the stacks."""
        lam = layers[0].lambda_
        S = {f: torch.stack([getattr(m, f) for m in layers]) for f in ADAPTER_KEYS[:5]}  # (n, ...)
        with _fp32(lam):
            M = (S["P_inner"] * S["lambda_"][:, None, :]) @ S["Q_inner"]  # P_inner diag(λ) Q_inner
            A, B = S["Q_outer"], layers[0].scaling * (S["P_outer"] @ M)  # Q_outer, s·P_outer·M
        if torch.is_autocast_enabled(lam.device.type):
            dtype = torch.get_autocast_dtype(lam.device.type)
            A, B = A.to(dtype), B.to(dtype)  # cast once for the group, not per layer
        for m, a, b in zip(layers, A.unbind(0), B.unbind(0)):
            m.grouped, m.grouped_versions = (a, b), m._versions()
        return S

    def current_stacks(self, layers):
        """[(group, stacks)] of the last forward for the groups whose layers are all in `layers` and
        unchanged since (version counters), with autograd history if autograd is on now."""
        grad = torch.is_grad_enabled()
        return [(group, S) for group, S in zip(self.groups, self.stacks) if S is not None
                and (S["P_outer"].requires_grad or not grad)
                and all(id(m) in layers and m.grouped_versions == m._versions() for m in group)]

    def remove(self):
        """Stop computing the pairs: remove the hook and every layer's slice."""
        if self.handle is not None:
            self.handle.remove()
        for m in (m for layers in self.groups for m in layers):
            m.grouped = m.groups = None
        self.groups, self.stacks = [], []

    def __getstate__(self):
        """For copy.deepcopy and pickling: without the last forward's stacks (autograd history)."""
        return {**self.__dict__, "stacks": [None] * len(self.groups)}


def _by_shape(layers):
    """The layers grouped by shape, s, device and dtype (factors that torch.stack can join), in
    order."""
    groups = {}
    for m in layers:
        key = (m.out_features, m.in_features, m.r, m.k, m.scaling, m.P_outer.device,
               m.P_outer.dtype)
        groups.setdefault(key, []).append(m)
    return list(groups.values())


# --------------------------------------------------------------------------------------------------
# Putting layers into a model


def lora2_modules(model):
    """{name: LoRA2Linear} for every adapted layer (each W₀ + s·ΔW of (L1)), in module order."""
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRA2Linear)}


def inject(model, targets, r=8, k=8, alpha=16, dropout=0.0, trainable=HEAD, init="orthogonal"):
    """Replace the matching linear layers of `model` by LoRA2Linear (L1, L2) in place; their names.

    targets: a string or a compiled regex, or a list of them. A string matches a module whose name
    equals it or ends with "." + it; a regex must fullmatch the name. Only nn.Linear (and GPT-2's
    Conv1D) are replaced. trainable: a string or a list of strings (default HEAD): afterwards only
    the adapters and the parameters with an entry of `trainable` among the dotted parts of one of
    their names require grad (a tied weight counts under each name it has: trainable="lm_head"
    trains a head tied to the embedding); () trains the adapters alone. Each new layer records its
    name and its base weight's other names (`tied_to`), so that merging a tied weight is refused.
    The model gets a FactorGroups forward pre-hook that computes all layers' (A, B) at once.
    """
    targets = _names(targets, "inject: targets", patterns=True)
    trainable = _names(trainable, "inject: trainable")
    if not targets:
        raise ValueError("inject: no targets given")
    existing = lora2_modules(model)
    chosen = []
    for name, module in model.named_modules():
        if not any(_matches(name, t) for t in targets):
            continue
        if name in existing or name.rpartition(".")[0] in existing:
            raise ValueError(f"inject: {name!r} is already adapted by LoRA2Linear (no double "
                             f"injection)")
        if _is_linear(module):
            chosen.append(name)
    if not chosen:
        layers = sorted({re.sub(r"\.\d+\.", ".{i}.", n) for n, m in model.named_modules()
                         if _is_linear(m) and n.rpartition(".")[0] not in existing})
        raise ValueError(f"inject: no linear layer matches {list(targets)}; the model's linear "
                         f"layers are: {layers}")
    for name in chosen:
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        base = getattr(parent, attr)
        setattr(parent, attr, LoRA2Linear(base, r=r, k=k, alpha=alpha, dropout=dropout, init=init))
    _record_names(model)
    names = {}
    for pname, p in model.named_parameters(remove_duplicate=False):
        names.setdefault(p, []).append(pname)
    for p, pnames in names.items():
        p.requires_grad_(any(_has_part(n, t) for n in pnames for t in trainable))
    layers = lora2_modules(model)
    for m in layers.values():
        m.requires_grad_(True)
        m.base.requires_grad_(False)  # W₀ stays frozen even if a `trainable` entry matches its name
    for groups in {id(m.groups): m.groups for m in existing.values() if m.groups}.values():
        groups.remove()  # one FactorGroups for all the model's layers
    groups = FactorGroups(layers.values())
    groups.handle = model.register_forward_pre_hook(groups)
    return chosen


def count_parameters(model, head=HEAD):
    """{"adapter", "head", "trainable", "total"}: numbers of parameters, a shared tensor counted
    once. A trainable parameter with an entry of `head` among the dotted parts of its name counts as
    head (as in inject's `trainable`), any other trainable one as adapter; trainable = adapter +
    head. Each adapted matrix adds k(d_in + d_out) + 2kr + r adapter parameters (SPEC §1)."""
    head = _names(head, "count_parameters: head")
    counts = dict(adapter=0, head=0, trainable=0, total=0)
    for name, p in model.named_parameters():  # each tensor once, under its first name
        counts["total"] += p.numel()
        if p.requires_grad:
            counts["trainable"] += p.numel()
            counts["head" if any(_has_part(name, h) for h in head) else "adapter"] += p.numel()
    return counts


# --------------------------------------------------------------------------------------------------
# §2  Orthogonality regularisers (L3, L4)


def orthogonal_regularizer(model, cross=0.0, squared=False):
    """R_int (L3) + cross · R_ext (L4), SPEC §2; add γ times this to the task loss, and keep it out
    of forward.

        R_int = (1/m) Σ_layers Σ_F ‖G(F) − I‖_F,  F ∈ {P_outer, P_inner, Q_inner, Q_outer},  m = 4n
        R_ext = mean over the square layers of ‖Q_outer · P_outer‖_F,        n = number of layers

    G(F) is the Gram matrix on F's smaller dimension; with r ≤ k, R_int = 0 gives PᵀP = I_r and QQᵀ
    = I_r, AdaLoRA's constraint. The norm is un-squared and averaged over matrices as in AdaLoRA's
    code, PEFT's `orth_reg_weight` and the LoRA² authors' trainer [code]: the paper's γ = 0.1 / 0.3
    were tuned with it. squared=True (an ablation) gives the form printed as AdaLoRA eq. (4), per
    layer Σ_F ‖G(F) − I‖²_F averaged over layers, and ‖Q_outer P_outer‖²_F averaged over square
    layers. At the same γ it pulls much harder: 15.7× the gradient norm of the default form on a 768
    × 768 layer with r = k = 8 and N(0, 0.02²) factors [ours]. Computed in fp32 under any autocast,
    from the factors stacked per shape: after a forward of the model, the very stacks the forward
    used (FactorGroups), so that R adds a few kernels per shape and its gradient meets the
    forward's in one tensor.
    """
    layers = lora2_modules(model)
    if not layers:
        raise ValueError("orthogonal_regularizer: the model has no LoRA2Linear layer (inject one)")
    with _fp32(next(iter(layers.values())).lambda_):
        return regularizer_of_stacks(factor_stacks(layers.values()), cross, squared)


def factor_stacks(layers):
    """[{factor: (n, ...)}]: the factors of `layers` stacked per shape, the stacks of the model's
    last forward where they hold exactly these layers as they are now (FactorGroups), else new."""
    layers = list(layers)
    wanted, stacks, done = {id(m) for m in layers}, [], set()
    if not torch.compiler.is_compiling():  # a traced R stacks afresh (no version guards)
        for groups in {id(m.groups): m.groups for m in layers if m.groups is not None}.values():
            for group, S in groups.current_stacks(wanted):
                stacks.append(S)
                done.update(id(m) for m in group)
    for group in _by_shape([m for m in layers if id(m) not in done]):
        stacks.append({f: torch.stack([getattr(m, f) for m in group]) for f in FACTORS})
    return stacks


def regularizer_of_stacks(stacks, cross=0.0, squared=False):
    """R_int (L3) + cross · R_ext (L4) from the factors stacked per shape: [{factor: (n, ...)}]."""
    norm = _squared_frobenius if squared else torch.linalg.matrix_norm  # ‖X‖²_F or ‖X‖_F: (n,)
    r_int, r_ext, n_layers, n_square = 0.0, 0.0, 0, 0
    for stacked in stacks:
        for f in FACTORS:
            r_int = r_int + norm(_gram_deviation(stacked[f])).sum()  # Σ_layers ‖G(F) − I‖_F   (L3)
        n, d_out, _ = stacked["P_outer"].shape
        n_layers += n
        if cross and d_out == stacked["Q_outer"].shape[2]:
            r_ext = r_ext + norm(stacked["Q_outer"] @ stacked["P_outer"]).sum()  # Σ ‖Q·P‖_F (L4)
            n_square += n
    m = n_layers if squared else len(FACTORS) * n_layers  # squared: per-layer sums, averaged
    total = r_int / m  # R_int
    if n_square:
        total = total + cross * r_ext / n_square  # + cross · R_ext
    return total


def _gram_deviation(factors):
    """G(F) − I for each F of a stack (n, a, b), G(F) the Gram matrix on F's smaller dimension
    (L3)."""
    tall = factors.shape[1] >= factors.shape[2]
    gram = factors.mT @ factors if tall else factors @ factors.mT  # (n, m, m), m = min(a, b)
    return gram - torch.eye(gram.shape[-1], device=gram.device, dtype=gram.dtype)


def _squared_frobenius(stack):
    """‖X‖²_F of each matrix of a stack (n, a, b): (n,)."""
    return stack.pow(2).sum((-2, -1))


# --------------------------------------------------------------------------------------------------
# §3, §4  Importance scores (L5, L6), budget schedule (L7) and masking (L8)


class Pruner:
    """AdaLoRA's budget allocation with LoRA²'s cheap importance score (L5)–(L8).

    Each layer keeps its own Ī and Ū (AdaLoRA eqs. 11, 12) for λ, P_inner and Q_inner only: 2kr + r
    entries a layer (SPEC §3). scored="all" also scores P_outer and Q_outer, AdaLoRA-style, which
    adds a per-layer constant to every triplet of that layer [ours, an ablation]. Each equation is
    one operation over the list of all scored factors (torch._foreach_*) or over stacks of layers,
    so a step costs a few kernels, not a few per layer. Ī and Ū are fp32 whatever the layers'
    dtype; they follow the layers to another device (model.to(device) after the pruner was built).
    The kept set lives in each layer's `lambda_mask` buffer (see `rank_pattern`), which moves with
    the model.

    Call .step(global_step) after optimizer.step() and before zero_grad() (SPEC §4), with a
    global_step that grows from call to call; in a transformers Trainer, from a TrainerCallback's
    on_optimizer_step (which runs between the two) with state.global_step. A step that finds no
    gradient at all warns (it was called after zero_grad), and non-finite scores raise. A hook
    warns when 100 backward passes ran without a step; close() removes it.
    """

    def __init__(self, model, target_rank, total_steps, init_warmup, final_warmup, mask_interval,
                 beta1=0.85, beta2=0.85, target_total=None, scored="inner"):
        self.modules = lora2_modules(model)
        self.T, self.t_i, self.t_f = total_steps, init_warmup, final_warmup  # (L7)
        self.mask_interval, self.scored = mask_interval, scored
        self.beta1, self.beta2 = beta1, beta2  # (L5)
        self.b0, self.bT = _check_pruner_arguments(self, target_rank, target_total)  # λ kept (L7)
        self.T, self.t_i, self.t_f = int(self.T), int(self.t_i), int(self.t_f)
        self.mask_interval = int(self.mask_interval)
        outer = ("P_outer", "Q_outer") if scored == "all" else ()
        self.kinds = ("lambda_", "P_inner", "Q_inner") + outer  # the scored factors (L5)
        self.Ibar = {name: self._zeros(m) for name, m in self.modules.items()}  # Ī: layer, factor
        self.Ubar = {name: self._zeros(m) for name, m in self.modules.items()}  # Ū: layer, factor
        self.final_fixed = False  # the final pattern is set; it is re-applied every step
        self.last_step, self._backwards, self._lists = None, 0, None
        lam = next((m.lambda_ for m in self.modules.values() if m.lambda_.requires_grad), None)
        self._hook = None if lam is None else lam.register_post_accumulate_grad_hook(
            self._check_called)

    @torch.no_grad()
    def update_scores(self):
        """(L5) AdaLoRA eqs. 10–12 on this step's gradients, for every scored factor w of every
        layer at once, in fp32; step() calls it while t < T − t_f. Factors without a gradient are
        skipped; when none has one, it warns (nothing can be scored)."""
        w, Ibar, Ubar = self._scored_with_gradients()
        if not w:
            return
        grads = _fp32_list([p.grad for p in w])
        I = torch._foreach_abs(torch._foreach_mul(_fp32_list(w), grads))  # |w · ∂L/∂w|  (eq. 10)
        torch._foreach_lerp_(Ibar, I, 1 - self.beta1)  # Ī ← β₁Ī + (1−β₁)I                  (eq. 11)
        torch._foreach_lerp_(Ubar, torch._foreach_abs(torch._foreach_sub(I, Ibar)),
                             1 - self.beta2)  # Ū ← β₂Ū + (1−β₂)|I − Ī|                   (eq. 12)

    @torch.no_grad()
    def triplet_scores(self):
        """(L6) S_i = s(λ_i) + (1/k) Σ_j s(P_inner[j, i]) + (1/k) Σ_j s(Q_inner[i, j]), s = Ī · Ū
        (AdaLoRA eq. 13): one fp32 vector of b₀ scores, the layers in model order (rank_pattern's),
        computed on the layers stacked per (r, k)."""
        names = list(self.modules)
        device = self.modules[names[0]].lambda_.device
        parts, order = [], []
        for group in _stackable(names, self.Ibar):
            s = {kind: torch.stack(torch._foreach_mul([self.Ibar[n][kind] for n in group],
                                                      [self.Ubar[n][kind] for n in group]))
                 for kind in self.kinds}  # s = Ī · Ū, stacked (n, ...)         (AdaLoRA eq. 13)
            S = s["lambda_"] + s["P_inner"].mean(1) + s["Q_inner"].mean(2)  # (n, r)         (L6)
            if self.scored == "all":  # outer factors: shared by a layer's r triplets, a constant
                S = S + s["P_outer"].mean((1, 2))[:, None] + s["Q_outer"].mean((1, 2))[:, None]
            parts.append(S.flatten().to(device))
            order += group
        scores = torch.cat(parts)
        if order != names:  # several (r, k) groups: back to model order
            start = dict(zip(order, itertools.accumulate([0] + [self.modules[n].r for n in order])))
            scores = torch.cat([scores[start[n]:start[n] + self.modules[n].r] for n in names])
        return scores

    def budget(self, t):
        """b(t), the number of λ kept after step t (L7; AdaLoRA eq. 14 as AdaLoRA's and the authors'
        code compute it, with (t − t_i) where the printed equation has a typo)."""
        if t <= self.t_i:
            return self.b0
        if t > self.T - self.t_f:
            return self.bT
        progress = (t - self.t_i) / (self.T - self.t_f - self.t_i)
        return int(math.floor(self.bT + (self.b0 - self.bT) * (1 - progress) ** 3))  # (L7)

    @torch.no_grad()
    def set_mask(self, budget):
        """(L8) keep exactly the `budget` largest S_i over all layers (ties broken by position,
        never over-pruned): each layer's lambda_mask. Non-finite scores raise (training diverged:
        a mask chosen from them would be arbitrary)."""
        scores = self.triplet_scores()
        if not scores.is_meta and not bool(torch.isfinite(scores).all()):
            raise FloatingPointError(
                f"Pruner: {int((~torch.isfinite(scores)).sum())} of {len(scores)} importance "
                f"scores are not finite (NaN or inf in the weights or gradients: training "
                f"diverged); lower the learning rate or clip the gradients")
        order = torch.argsort(scores, descending=True, stable=True)  # one ranking
        keep = torch.zeros(self.b0, dtype=torch.bool, device=order.device)
        keep.index_fill_(0, order[:budget], True)  # the `budget` best (L8)
        masks = [m.lambda_mask for m in self.modules.values()]
        torch._foreach_copy_(masks, list(keep.split([m.r for m in self.modules.values()])))

    @torch.no_grad()
    def apply_mask(self):
        """(L8) λ_i ← 0 for every λ_i outside the kept set (each layer's lambda_mask)."""
        lambdas = [m.lambda_ for m in self.modules.values()]
        masks = [m.lambda_mask for m in self.modules.values()]
        if len({t.device for t in masks}) == 1:  # one cast for all layers, then one multiplication
            masks = list(torch.cat(masks).to(lambdas[0].dtype).split([len(t) for t in masks]))
        torch._foreach_mul_(lambdas, masks)  # λ_i ← λ_i · [i kept]

    def step(self, global_step):
        """One pruner step at optimiser step t = global_step (SPEC §4): update the scores (L5) while
        t < T − t_f; every mask_interval steps in the cubic phase keep the b(t) best triplets
        (L6–L8); in the final phase (t > T − t_f) fix the pattern once and re-apply it every step.
        The last step (t = T − 1) masks at b(t) if the final phase has not begun (t_f ≤ 1), so a run
        always ends at its schedule's budget. t must exceed the last step (a resumed pruner goes on
        from the step it saved): a repeated or earlier step would score a step twice or let the
        pruned rank regrow."""
        if not _is_int(global_step) or global_step < 0:
            raise ValueError(f"Pruner.step: global_step must be an integer >= 0, got "
                             f"{global_step!r}")
        t = int(global_step)
        if self.last_step is not None and t <= self.last_step:
            raise ValueError(f"Pruner.step({t}): steps must increase; the last one was "
                             f"{self.last_step}")
        if t < self.T - self.t_f:
            self.update_scores()  # (L5)
        if t > self.T - self.t_f:
            if not self.final_fixed:
                self.set_mask(self.bT)  # (L6)–(L8) at b_T, once
                self.final_fixed = True
            self.apply_mask()
        elif t > self.t_i and (t % self.mask_interval == 0 or t == self.T - 1):
            self.set_mask(self.budget(t))  # (L6)–(L8) at b(t)
            self.apply_mask()
        self.last_step = t

    def stats(self):
        """Entries scored per step (2kr + r a layer, SPEC §3), adapter entries, and what AdaLoRA
        would score for the same layers at the same r."""
        scored = adapter = adalora = 0
        for m in self.modules.values():
            d_in, d_out, r, k = m.in_features, m.out_features, m.r, m.k
            scored += r + 2 * k * r + (k * (d_in + d_out) if self.scored == "all" else 0)
            adapter += k * (d_in + d_out) + 2 * k * r + r
            adalora += r * (d_in + d_out) + r  # AdaLoRA scores all of P (d_out × r), λ, Q (r × d)
        return dict(scored=scored, adapter=adapter, adalora_scored=adalora,
                    scored_ratio=scored / adapter)

    def state_dict(self):
        """What resuming needs: Ī and Ū per layer and factor, the kept sets, the phase and step."""
        def copy(scores):
            return {name: {kind: t.clone() for kind, t in d.items()} for name, d in scores.items()}
        return {"Ibar": copy(self.Ibar), "Ubar": copy(self.Ubar),
                "mask": {name: m.lambda_mask.clone() for name, m in self.modules.items()},
                "final_fixed": self.final_fixed, "last_step": self.last_step,
                "config": self._config()}

    @torch.no_grad()
    def load_state_dict(self, state):
        """Load what state_dict() saved, after checking the configuration and every layer, factor,
        shape and dtype (_check_pruner_state)."""
        _check_pruner_state(self, state)
        for key, scores in (("Ibar", self.Ibar), ("Ubar", self.Ubar)):
            for name, m in self.modules.items():
                for kind in self.kinds:
                    saved = state[key][name][kind]
                    scores[name][kind] = saved.to(m.lambda_.device, torch.float32, copy=True)
        for name, m in self.modules.items():
            m.lambda_mask.copy_(state["mask"][name])
        self.final_fixed, self.last_step = state["final_fixed"], state["last_step"]
        self._lists = None

    def close(self):
        """Remove the hook that warns when step() is never called. Idempotent."""
        if self._hook is not None:
            self._hook.remove()
            self._hook = None

    def _check_called(self, lam):
        """A pruner never stepped silently leaves an unpruned factorised LoRA (SPEC §4): warn once,
        after 100 backward passes (a hook on one λ's gradient: it runs in compiled models too)."""
        if self.last_step is None:
            self._backwards += 1
            if self._backwards == 100:
                warnings.warn("Pruner.step(global_step) has not been called in 100 backward "
                              "passes: nothing is scored or pruned. Call it after "
                              "optimizer.step(), before zero_grad().", stacklevel=2)

    def _scored_with_gradients(self):
        """(factors, their Ī, their Ū) for the scored factors that have a gradient this step, with Ī
        and Ū moved to the factors' device if the model moved. Warns when none has a gradient."""
        if self._lists is None:
            self._lists = tuple(zip(*[
                (getattr(m, kind), self.Ibar[name][kind], self.Ubar[name][kind])
                for name, m in self.modules.items() for kind in self.kinds]))
        w, Ibar, Ubar = self._lists
        if Ibar[0].device != w[0].device or Ibar[-1].device != w[-1].device:
            for name, m in self.modules.items():  # the model moved: the scores follow it
                for scores in (self.Ibar, self.Ubar):
                    scores[name] = {k: t.to(m.lambda_.device) for k, t in scores[name].items()}
            self._lists = None
            return self._scored_with_gradients()
        has = [p.grad is not None for p in w]
        if not all(has):
            w, Ibar, Ubar = ([t for t, h in zip(ts, has) if h] for ts in (w, Ibar, Ubar))
        if not w:
            warnings.warn("Pruner.step: no scored factor has a gradient, so nothing was scored. "
                          "Call it after optimizer.step() and before optimizer.zero_grad() (in a "
                          "transformers Trainer: from a callback's on_optimizer_step).",
                          stacklevel=3)
        return list(w), list(Ibar), list(Ubar)

    def _zeros(self, m):
        """{scored factor: fp32 zeros of its shape} for layer m: Ī or Ū before the first update."""
        return {kind: torch.zeros_like(getattr(m, kind), dtype=torch.float32)
                for kind in self.kinds}

    def _config(self):
        return dict(layers=list(self.modules), b0=self.b0, bT=self.bT, T=self.T, t_i=self.t_i,
                    t_f=self.t_f, mask_interval=self.mask_interval, beta1=self.beta1,
                    beta2=self.beta2, scored=self.scored)


def rank_pattern(model):
    """{layer name: [kept λ_i, as bool]} from each LoRA2Linear's lambda_mask, as set by the Pruner's
    last masking (all True before the first one)."""
    return {name: m.lambda_mask.tolist() for name, m in lora2_modules(model).items()}


def _stackable(names, scores):
    """The layer names grouped by the shapes and device of their scores (which stack), in order."""
    groups = {}
    for n in names:
        key = (scores[n]["lambda_"].device, *(tuple(t.shape) for t in scores[n].values()))
        groups.setdefault(key, []).append(n)
    return list(groups.values())


def _fp32_list(tensors):
    """The tensors in fp32 (the same objects when they are: the usual case)."""
    if all(t.dtype == torch.float32 for t in tensors):
        return tensors
    return [t.float() for t in tensors]


# --------------------------------------------------------------------------------------------------
# §6  Exact export to a plain LoRA


@torch.no_grad()
def to_lora(model):
    """{layer: (B, A)}, s·ΔW = B @ A exactly, of rank min(k, r'), K = the r' non-zero λ (SPEC §6):

        r' ≤ k:  B = s · P_outer · P_inner[:, K] · diag(λ_K) (d_out × r'),  A = Q_inner[K] · Q_outer
        else:    B = s · P_outer · M (d_out × k),                           A = Q_outer (k × d_in)
    """
    out = {}
    for name, m in lora2_modules(model).items():
        K = torch.nonzero(m.lambda_).flatten()  # indices of the kept singular values
        with _fp32(m.lambda_):  # fp32 under any autocast
            if len(K) <= m.k:
                B = m.scaling * (m.P_outer @ (m.P_inner[:, K] * m.lambda_[K]))
                A = m.Q_inner[K, :] @ m.Q_outer
            else:
                B = m.scaling * (m.P_outer @ m.inner())
                A = m.Q_outer.clone()
        out[name] = (B, A)
    return out


# --------------------------------------------------------------------------------------------------
# Merging: merge() adds s·ΔW to W₀ and keeps what it added as two small factors, B = s·P_outer·M
# (d_out × k) and A = Q_outer (k × d_in); unmerge() subtracts B @ A, so it removes exactly what
# merge() added even if λ or a factor changed in between. W₀ comes back up to the rounding of
# (W₀ + δ) − δ in fp32, cast to the base's dtype: within two units in the last place of a bf16 or
# fp16 base. While merged, a layer refuses what would silently go wrong:
# - a training forward with autograd on raises: the adapter is off the autograd path, so training
#   would update nothing (eval-mode and no_grad forwards are untouched);
# - state_dict() holds W₀ (as above), never W₀ + s·ΔW, so it loads into an unmerged model without
#   counting ΔW twice; load_state_dict() with an entry of the layer raises (unmerge() first);
# - merge() raises when the base weight is shared with another parameter (tied embeddings: GPT-2's
#   wte when lm_head is merged). `name` and `tied_to` (the base weight's other parameter names) are
#   recorded by inject and merge(model), so that errors name both modules.


def merge(model):
    """Merge every LoRA2Linear (W₀ ← W₀ + s·ΔW, SPEC §1); idempotent. A base weight tied to another
    parameter of `model` raises, naming both modules, before any layer is merged."""
    for m in _mergeable(model).values():
        m.merge()
    return model


def unmerge(model):
    """Undo merge() for every LoRA2Linear: subtract exactly what merge() added; idempotent."""
    for m in lora2_modules(model).values():
        m.unmerge()
    return model


def merge_and_unload(model):
    """Merge every adapter into its base weight and put the plain base layer back in its place
    (and stop the FactorGroups hook). Refuses tied weights like merge(), before changing
    anything."""
    for name, m in _mergeable(model).items():
        m.merge()
        if m.groups is not None:
            m.groups.remove()
        parent_name, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent_name), attr, m.base)
    return model


@torch.no_grad()
def _with_merged_delta(m, sign):
    """W + sign · B @ A in fp32 under any autocast, cast to the base's dtype; (B, A): what merge()
    kept."""
    w = m.base.weight
    B, A = (t.to(w.device) for t in m._merged_delta)
    with _fp32(w):
        delta = B @ A  # (d_out, d_in) = s · P_outer · M · Q_outer as it was at merge()
    if m.fan_in_fan_out:
        delta = delta.T  # Conv1D stores (d_in, d_out)
    return (w.float() + sign * delta).to(w.dtype)


def _refuse_if_tied(m):
    """Raise, naming both modules, if the layer's base weight is shared (`tied_to`)."""
    if m.tied_to:
        modules = ", ".join(repr(n.rpartition(".")[0]) for n in m.tied_to)
        raise ValueError(f"merge: LoRA2Linear {_label(m)} shares its weight with {modules} "
                         f"(tied weights): merging would change that module too. Give the layer "
                         f"its own copy of the weight to merge it, or keep it unmerged.")


def _state_dict_holds_W0(module, state_dict, prefix, local_metadata):
    """state_dict() post-hook: a merged layer stores W₀ (weight − B @ A), never W₀ + s·ΔW."""
    if module.merged:
        state_dict[prefix + "base.weight"] = _with_merged_delta(module, -1.0)


def _refuse_load_while_merged(module, state_dict, prefix, *args):
    """load_state_dict() pre-hook: loading an entry of a merged layer raises."""
    if module.merged and any(key.startswith(prefix) for key in state_dict):
        raise RuntimeError(f"load_state_dict: LoRA2Linear {_label(module, prefix[:-1])} is "
                           f"merged; call lora2.unmerge(model) before loading (merge again after)")


def _mergeable(model):
    """lora2_modules(model), after checking that none of the unmerged ones has a tied base
    weight."""
    _record_names(model)  # ties made after inject (e.g. a later tie_weights()) count too
    modules = lora2_modules(model)
    for m in modules.values():
        if not m.merged:
            _refuse_if_tied(m)
    return modules


def _record_names(model):
    """Set each LoRA2Linear's `name` and `tied_to`: the other names under which `model` holds its
    base weight (the same Parameter object, as tied embeddings are made), e.g.
    ("transformer.wte.weight",) for GPT-2's lm_head."""
    names = {}
    for pname, p in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(p), []).append(pname)
    for name, m in lora2_modules(model).items():
        own = f"{name}.base.weight" if name else "base.weight"
        m.name, m.tied_to = name, tuple(n for n in names.get(id(m.base.weight), ()) if n != own)


# --------------------------------------------------------------------------------------------------
# The adapter's state, and the PEFT adapter (SPEC §6)


def adapter_state_dict(model):
    """{name: tensor}, everything training changes: the five factors and the λ mask of every
    LoRA2Linear ("<layer>.<factor>"), and every other parameter that requires grad under its own
    name (the head that inject trains). Loaded into the same model freshly injected, it gives back
    the trained one."""
    state = {f"{name}.{key}": getattr(m, key).detach().clone()
             for name, m in lora2_modules(model).items() for key in ADAPTER_KEYS}
    return {**state, **{name: p.detach().clone() for name, p in _trained_outside(model).items()}}


@torch.no_grad()
def load_adapter_state_dict(model, state):
    """Load what adapter_state_dict saved. Missing, unexpected or mis-shaped entries raise, naming
    the layer, and so does a merged layer (unmerge first)."""
    modules = lora2_modules(model)
    merged = [name for name, m in modules.items() if m.merged]
    if merged:
        raise RuntimeError(f"load_adapter_state_dict: {len(merged)} layers are merged "
                           f"({merged[0]!r}, ...); call lora2.unmerge(model) first")
    targets = {f"{name}.{key}": getattr(m, key)
               for name, m in modules.items() for key in ADAPTER_KEYS}
    targets.update(_trained_outside(model))
    if set(state) != set(targets):
        missing, unexpected = sorted(set(targets) - set(state)), sorted(set(state) - set(targets))
        raise ValueError(f"load_adapter_state_dict: missing {missing[:6]}, unexpected "
                         f"{unexpected[:6]} (the state must come from adapter_state_dict of a "
                         f"model injected alike, with the same parameters trainable)")
    for key, dst in targets.items():
        if state[key].shape != dst.shape:
            raise ValueError(f"load_adapter_state_dict: {key} has shape {tuple(dst.shape)}, the "
                             f"saved one {tuple(state[key].shape)}")
    for key, dst in targets.items():
        dst.copy_(state[key])


def _trained_outside(model):
    """{name: parameter} of the parameters outside LoRA2Linear layers that require grad."""
    inside = {id(p) for m in lora2_modules(model).values() for p in m.parameters()}
    return {name: p for name, p in model.named_parameters()
            if p.requires_grad and id(p) not in inside}


def peft_state_dict(model, base_model_name_or_path=None, modules_to_save=None):
    """(state dict, adapter config): the model as a PEFT LoRA adapter (SPEC §6), what PEFT reads
    from adapter_model.safetensors and adapter_config.json to load it onto the untouched base.

    Each layer becomes the exact LoRA (B, A) of `to_lora`, rank r' = min(k, #λ≠0); layers pruned to
    rank 0 are left out. `rank_pattern` gives each layer its r', and `alpha_pattern` = r' makes
    PEFT's scaling α/r exactly 1 (s is inside B). PEFT matches a pattern key as a regex against the
    end of a module name ("output.dense" also matches "attention.output.dense"), so the keys are
    escaped full names anchored with "^". modules_to_save: modules stored whole (a trained head),
    which PEFT puts in place of the base model's; default: those outside the LoRA² layers with a
    parameter requiring grad (what `inject(..., trainable=...)` unfroze); () stores none.
    """
    adapted = lora2_modules(model)
    modules = dict(model.named_modules())
    outside = {name for name in modules
               if not any(name == a or name.startswith(a + ".") for a in adapted)}
    if modules_to_save is None:
        modules_to_save = [name for name, m in modules.items() if name in outside and any(
            p.requires_grad for p in m.parameters(recurse=False))]
    modules_to_save = list(modules_to_save)
    for name in modules_to_save:
        if not name or name not in outside or any(a.startswith(name + ".") for a in adapted):
            raise ValueError(f"save_peft: module to save {name!r} must be a named submodule that "
                             f"neither is, holds nor lies inside a LoRA2Linear layer")
    tensors, ranks = {}, {}
    for name, (B, A) in to_lora(model).items():
        if A.shape[0] == 0:
            continue  # pruned to rank 0: the layer is its base layer
        ranks[name] = A.shape[0]
        tensors[f"base_model.model.{name}.lora_A.weight"] = A  # (r', d_in)
        tensors[f"base_model.model.{name}.lora_B.weight"] = B  # (d_out, r'), s included
    if not ranks:
        raise ValueError(f"save_peft: nothing to export: none of the model's {len(adapted)} "
                         f"LoRA2Linear layers has a non-zero λ")
    for name in modules_to_save:
        for key, t in modules[name].state_dict().items():
            tensors[f"base_model.model.{name}.{key}"] = t  # PEFT's key for modules_to_save on disk
    pattern = {"^" + re.escape(name): rank for name, rank in ranks.items()}
    r = max(ranks.values())
    config = {"peft_type": "LORA", "task_type": None, "r": r, "lora_alpha": r,
              "base_model_name_or_path": base_model_name_or_path, "target_modules": sorted(ranks),
              "rank_pattern": pattern, "alpha_pattern": dict(pattern),
              "modules_to_save": modules_to_save or None, "lora_dropout": 0.0, "bias": "none",
              "fan_in_fan_out": any(m.fan_in_fan_out for m in adapted.values()),
              "use_rslora": False, "init_lora_weights": True, "inference_mode": True}
    return tensors, config


# --------------------------------------------------------------------------------------------------
# Checks and helpers: arguments, layer kinds, names


def _check_layer_arguments(base, r, k, alpha, dropout, init):
    """LoRA2Linear's arguments, each a one-line error naming it."""
    if not _is_linear(base):
        raise TypeError(f"LoRA2Linear wraps nn.Linear or GPT-2's Conv1D, got {type(base).__name__}")
    if not (_is_int(r) and r >= 1 and _is_int(k) and k >= 1):
        raise ValueError(f"r and k must be integers >= 1, got r={r!r}, k={k!r}")
    if not _is_positive_number(alpha):
        raise ValueError(f"alpha must be > 0 (a number), got {alpha!r}")
    if not _is_number(dropout) or not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must be in [0, 1), got {dropout!r}")
    if init not in INITS:
        raise ValueError(f"init must be one of {INITS}, got {init!r}")


def _check_pruner_arguments(pruner, target_rank, target_total):
    """The Pruner's checks (SPEC §4); returns (b₀, b_T): the n·r singular values at the start and
    the n·target_rank (or target_total) at the end."""
    if not pruner.modules:
        raise ValueError("Pruner: the model has no LoRA2Linear layer (call inject first)")
    ints = dict(target_rank=target_rank, total_steps=pruner.T, init_warmup=pruner.t_i,
                final_warmup=pruner.t_f, mask_interval=pruner.mask_interval)
    for key, value in ints.items():
        if not _is_int(value) or value < 0:
            raise ValueError(f"Pruner: {key} must be an integer >= 0, got {value!r}")
    target_rank = int(target_rank)
    b0, r = sum(m.r for m in pruner.modules.values()), min(m.r for m in pruner.modules.values())
    bT = len(pruner.modules) * target_rank if target_total is None else target_total
    t_i, t_f = pruner.t_i, pruner.t_f
    for ok, message in [
            (pruner.T > t_i + t_f, f"total_steps (T={pruner.T}) must exceed init_warmup + "
                                   f"final_warmup (t_i + t_f = {t_i} + {t_f} = {t_i + t_f})"),
            (target_rank <= r, f"target_rank={target_rank} exceeds r={r}, the layers' smallest r"),
            (pruner.mask_interval >= 1, f"mask_interval must be >= 1, got {pruner.mask_interval}"),
            (_is_number(pruner.beta1) and 0.0 < pruner.beta1 < 1.0,
             f"beta1 must be in (0, 1), got {pruner.beta1!r}"),
            (_is_number(pruner.beta2) and 0.0 < pruner.beta2 < 1.0,
             f"beta2 must be in (0, 1), got {pruner.beta2!r}"),
            (pruner.scored in SCORED, f"scored must be one of {SCORED}, got {pruner.scored!r}"),
            (_is_int(bT) and 0 <= bT <= b0, f"target_total must be an integer in [0, {b0}] "
                                            f"(b₀ = Σ r), got {bT!r}")]:
        if not ok:
            raise ValueError(f"Pruner: {message}")
    return b0, int(bT)


def _check_pruner_state(pruner, state):
    """What Pruner.load_state_dict checks: the configuration, then every layer, factor, shape and
    dtype of the saved scores and masks, and the phase and step."""
    if state.get("config") != pruner._config():
        raise ValueError(f"Pruner.load_state_dict: the state was saved for "
                         f"{state.get('config')}, this pruner has {pruner._config()}")
    def spec(d):  # {factor: shape} of a layer's scores, or (shape, dtype) of its mask
        if isinstance(d, dict):
            return {kind: tuple(t.shape) for kind, t in d.items()}
        return (tuple(d.shape), d.dtype) if isinstance(d, torch.Tensor) else d
    scores = {name: spec({kind: getattr(m, kind) for kind in pruner.kinds})
              for name, m in pruner.modules.items()}
    masks = {name: spec(m.lambda_mask) for name, m in pruner.modules.items()}
    for key, expected in (("Ibar", scores), ("Ubar", scores), ("mask", masks)):
        saved = state.get(key)
        if not isinstance(saved, dict) or set(saved) != set(expected):
            raise ValueError(f"Pruner.load_state_dict: {key!r} must hold the layers "
                             f"{list(expected)}")
        bad = next((name for name in expected if spec(saved[name]) != expected[name]), None)
        if bad is not None:
            raise ValueError(f"Pruner.load_state_dict: {key}[{bad!r}] has shape "
                             f"{spec(saved[bad])}, expected {expected[bad]}")
    last, final = state.get("last_step"), state.get("final_fixed")
    if not (last is None or _is_int(last)) or not isinstance(final, bool):
        raise ValueError(f"Pruner.load_state_dict: last_step {last!r} / final_fixed {final!r} "
                         f"are not valid")


def _is_conv1d(module):
    """GPT-2's Conv1D: a linear layer whose weight is stored transposed, (d_in, d_out) [ours: no
    copy is made]."""
    return (type(module).__name__ == "Conv1D" and hasattr(module, "nf")
            and getattr(module, "weight", None) is not None)


def _is_linear(module):
    return isinstance(module, nn.Linear) or _is_conv1d(module)


def _is_int(value):
    """An integer, Python's or numpy's, not a bool (True would otherwise pass as 1)."""
    if isinstance(value, bool) or type(value).__name__ == "bool_":
        return False
    return isinstance(value, int) or (type(value).__module__ == "numpy"
                                      and hasattr(type(value), "__index__"))


def _is_number(value):
    """A real number (int, float, numpy's), not a bool or a string."""
    if isinstance(value, (bool, str, bytes)) or type(value).__name__ == "bool_":
        return False
    try:
        return math.isfinite(float(value))
    except (TypeError, ValueError):
        return False


def _is_positive_number(value):
    return _is_number(value) and float(value) > 0


def _fp32(tensor):
    """A context in which autocast is off on `tensor`'s device, so fp32 arithmetic stays fp32."""
    device = tensor.device.type
    if torch.amp.is_autocast_available(device):
        return torch.autocast(device, enabled=False)
    return contextlib.nullcontext()


def _matches(name, target):
    if isinstance(target, re.Pattern):
        return target.fullmatch(name) is not None
    return name == target or name.endswith("." + target)


def _has_part(name, part):
    """True if `part` ("classifier", or several parts such as "bert.pooler") is a run of whole
    dotted components of `name`: "classifier" matches "classifier.weight" and
    "head.classifier.bias", not "classifier_dropout.p"."""
    return f".{part}." in f".{name}."


def _names(value, what, patterns=False):
    """A non-empty string (or compiled regex, if `patterns`), or a list, tuple or set of them, as a
    tuple; anything else raises TypeError. A single string is one name, never its characters."""
    kinds = (str, re.Pattern) if patterns else (str,)
    items = (value,) if isinstance(value, kinds) else value
    if not isinstance(items, (list, tuple, set, frozenset)) or any(
            not isinstance(v, kinds) or v == "" for v in items):
        kind = "a non-empty string or compiled regex" if patterns else "a non-empty string"
        raise TypeError(f"{what} must be {kind}, or a list of them; got {value!r}")
    return tuple(items)


def _label(m, name=None):
    """A layer's name for error messages."""
    return repr(m.name or name) if m.name or name else "(unnamed)"
