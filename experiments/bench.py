"""What LoRA² costs per step and in memory, against LoRA, AdaLoRA and the authors' formulation (issue 4).

Settings (pick with --only; each prints one markdown table):
  model   one training step (forward, backward, AdamW step, zero_grad) of a 12-layer 768-wide BERT encoder
          (transformers' BertModel from a BertConfig, random weights, no download) with a 2-class head on [CLS],
          batch 32 × 128 tokens, bf16 autocast, adapters on query, key, value, attention.output.dense,
          intermediate.dense, output.dense (72 matrices): PEFT LoRA r=8 | a minimal reference LoRA | LoRA² k=r=8 |
          LoRA² + Pruner.step every step | PEFT AdaLoRA + update_and_allocate every step | LoRA² + pruner + γ·R.
          Both pruners are in their cubic phase and mask at every step (t_i = 0, mask_interval = deltaT = 1).
          All variants stay resident and are stepped in interleaved rounds, so drifting host speed hits all alike.
          The pruners are also timed alone (device synchronised before and after the call), their host-device
          synchronisations are counted with their call sites, and their score state is counted in bytes (every tensor
          the pruner object holds that is not a model parameter, buffer or grad). --profile adds kernel launches and
          GPU kernel time per step (torch.profiler) and writes the profiler tables.
  layer   one adapted layer, forward + backward (input requires grad, frozen fp32 base, bf16 autocast on CUDA):
          LoRA2Linear | PEFT's LoRA Linear | a minimal reference LoRA (below) | the authors' formulation (below).
          CUDA: d_in = d_out = 4096 with 16,384 tokens, and 768 with 4,096 tokens. CPU: fp32, 768 with 2,048 tokens.
  merged  merged LoRA2Linear (after .merge()) against the bare nn.Linear, inference under no_grad.
  step    the whole training step exactly as train_glue.py runs it (issue 11), eager and compiled (compiled.py:
          torch.compile of the pieces, the step replayed from CUDA graphs), for LoRA² (+ γ·R + Pruner.step), the
          minimal LoRA and PEFT LoRA, on bert.py's BERT with the packaged MiniLM's shape at 32 × 64 tokens and
          BERT-base's at 32 × 128 (random weights); plus LoRA² as CUDA graphs of its eager kernels (--backend none).
          Per step: wall ms (device synchronised before and after), GPU kernel ms, host launches (kernels, graphs,
          copies) and GPU kernels (torch.profiler over 10 steps, one of them masking), host synchronisations.
  e2e     train_glue.py end to end on SST-2 (MiniLM, batch 32): sustained steps/s, warm-up, dev accuracy, per seed.

Timing: medians after warm-up; on CUDA with CUDA events, the device synchronised after each timed run. Variants are
timed in interleaved rounds. A run of the layer settings is a block of `inner` back-to-back calls (launch overhead
counts as it would in a model). Memory (CUDA only): torch.cuda.max_memory_allocated; for a layer, "extra" is the
peak minus what was allocated before the call (activations, gradients, temporaries); for the model, the peak minus
what was allocated before the variant was built. On the CPU only time is reported (no allocator peak there).

    python experiments/bench.py        # CUDA: model, layer, merged; CPU: layer, merged (the CPU table)
    python experiments/bench.py --device cpu  # the CPU table
    python experiments/bench.py --quick       # smoke run with tiny shapes
    python experiments/bench.py --only model --fused --json out/bench.json --profile out/profile.txt
    python experiments/bench.py --only step,e2e --json out/step.json     # issue 11: eager vs compiled
    python experiments/bench.py --only step --shapes bert-base --json out/step-base.json  # one shape
    python experiments/bench.py --only step --quick --device cpu         # smoke run of the step setting
"""
import argparse
import copy
import gc
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
import traceback
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repository root: lora2.py
import bert  # noqa: E402
import lora2  # noqa: E402

TARGETS = list(bert.TARGETS)  # a list, as PEFT wants it
SETTINGS = ("model", "layer", "merged", "step", "e2e")


@dataclass
class BenchConfig:
    # whole model
    layers: int = 12
    hidden: int = 768
    heads: int = 12
    intermediate: int = 3072
    vocab: int = 30522
    batch: int = 32
    seq: int = 128
    model_warmup: int = 5  # steps before timing
    model_steps: int = 30  # timed rounds (median); a round steps every variant once
    hook_steps: int = 10  # extra steps in which the pruner call alone is timed
    # one layer
    layer_shapes: tuple = ((4096, 16384), (768, 4096))  # (d, tokens)
    layer_warmup: int = 3  # rounds before timing
    layer_reps: int = 15  # timed rounds (median); a round times one block of every variant
    inner: int = 10  # calls per block
    # adapters
    r: int = 8
    k: int = 8
    alpha: int = 16
    target_rank: int = 4  # pruners prune towards r/2, so every step of the benchmark is in the cubic phase
    total_steps: int = 10_000
    final_warmup: int = 1_000
    fused_adamw: bool = False  # AdamW(fused=True) for every variant instead of torch's default (foreach on CUDA)


def config_for(device, quick):
    if device.type == "cpu":
        cfg = BenchConfig(layer_shapes=((768, 2048),), layer_warmup=3, layer_reps=21, inner=1,
                          model_warmup=2, model_steps=5, hook_steps=5)
    else:
        cfg = BenchConfig()
    if quick:
        cfg.layers, cfg.hidden, cfg.heads, cfg.intermediate, cfg.vocab = 2, 64, 2, 128, 1000
        cfg.batch, cfg.seq = 4, 16
        cfg.model_warmup, cfg.model_steps, cfg.hook_steps = 1, 3, 2
        cfg.layer_shapes = ((128, 256),)
        cfg.layer_warmup, cfg.layer_reps, cfg.inner = 1, 3, 2
    return cfg


# ----------------------------------------------------------------------------------------------------------------------
# measuring


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_once(fn, device):
    """Milliseconds of one call of fn, the device idle before and after (CUDA events, else the host clock)."""
    sync(device)
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end)
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1e3


def interleaved_medians(fns, device, warmup, reps, inner=1):
    """{name: median ms per call} over `reps` rounds after `warmup` rounds; a round times one block of `inner`
    back-to-back calls of every fn in turn, so that drifting load (a shared CPU, clocks) hits all of them alike."""
    times = {name: [] for name in fns}
    for rnd in range(warmup + reps):
        for name, fn in fns.items():
            ms = time_once(lambda: [fn() for _ in range(inner)], device) / inner
            if rnd >= warmup:
                times[name].append(ms)
    return {name: statistics.median(t) for name, t in times.items()}


def peak_memory(fn, device):
    """(peak bytes, peak bytes minus bytes allocated before) of one call; (None, None) off CUDA."""
    if device.type != "cuda":
        return None, None
    sync(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    fn()
    sync(device)
    peak = torch.cuda.max_memory_allocated(device)
    return peak, peak - before


def count_syncs(fn, device):
    """(number of host-device synchronisations fn makes, their call sites "file:line"), from torch.cuda's sync
    debug mode; (None, []) off CUDA."""
    if device.type != "cuda":
        return None, []
    sites = []

    def record(message, category, filename, lineno, file=None, line=None):
        if "synchroniz" in str(message):
            frames = [f for f in traceback.extract_stack()[:-1] if "warnings" not in f.filename]
            where = "/".join(frames[-1].filename.split(os.sep)[-2:]) if frames else "?"
            sites.append(f"{where}:{frames[-1].lineno if frames else 0}")

    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = record
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return len(sites), sorted(set(sites))


def state_bytes(obj, model):
    """Bytes of the tensors `obj` holds (walking its attributes, dicts and lists), not counting the model's own
    parameters, buffers and gradients, nor modules it refers to; each storage counted once."""
    owned = {t.untyped_storage().data_ptr() for t in model.parameters()}
    owned |= {p.grad.untyped_storage().data_ptr() for p in model.parameters() if p.grad is not None}
    owned |= {t.untyped_storage().data_ptr() for t in model.buffers()}
    seen, total = set(), 0

    def walk(o, depth):
        nonlocal total
        if isinstance(o, torch.Tensor):
            ptr = o.untyped_storage().data_ptr()
            if ptr not in owned and ptr not in seen:
                seen.add(ptr)
                total += o.untyped_storage().nbytes()
        elif isinstance(o, nn.Module) or depth > 4:
            return
        elif isinstance(o, dict):
            for v in o.values():
                walk(v, depth + 1)
        elif isinstance(o, (list, tuple, set)):
            for v in o:
                walk(v, depth + 1)
        elif hasattr(o, "__dict__") and not isinstance(o, type):
            walk(vars(o), depth + 1)

    walk(obj, 0)
    return total


def autocast(device):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")


def free(device):
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def fmt(x, spec=".2f"):
    return "–" if x is None else format(x, spec)


def mib(b):
    return None if b is None else b / 2**20


def ratio(a, b):
    return None if a is None or b is None else a / b


def markdown(headers, rows):
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def log(msg):
    print(f"# {msg}", flush=True)


def optional(name):
    """Import transformers / peft lazily; None (and the reason) when absent."""
    try:
        return __import__(name), None
    except ImportError as e:
        return None, f"{name} not installed ({e})"


# ----------------------------------------------------------------------------------------------------------------------
# one layer: the two re-implemented baselines


class ReferenceLoRA(nn.Module):
    """The minimal LoRA: h = W₀x + b + s · B(Ax), A (r, d_in), B (d_out, r), s = α / r."""

    def __init__(self, base, r=8, alpha=16):
        super().__init__()
        self.base = base.requires_grad_(False)
        self.A = nn.Parameter(torch.randn(r, base.in_features, device=base.weight.device) / math.sqrt(base.in_features))
        self.B = nn.Parameter(torch.randn(base.out_features, r, device=base.weight.device) * 0.02)  # not 0: no zeros timed
        self.scaling = alpha / r

    def forward(self, x):  # (..., d_in) -> (..., d_out)
        return self.base(x) + (x @ self.A.T @ self.B.T) * self.scaling


class AuthorsLoRA2(nn.Module):
    """The authors' forward (SPEC §1, §7; their SVDLinear.forward): the dense d_in × d_out update
    Q_outerᵀ Q_innerᵀ diag(λ) P_innerᵀ P_outerᵀ is built in every call, then h = W₀x + b + x · ΔWᵀ · α / (r + 1e-5)."""

    def __init__(self, base, r=8, k=8, alpha=16):
        super().__init__()
        self.base = base.requires_grad_(False)
        dev = base.weight.device
        self.Q_outer = nn.Parameter(torch.randn(k, base.in_features, device=dev) * 0.02)  # (k, d_in)   lora_A
        self.Q_inner = nn.Parameter(torch.randn(r, k, device=dev) * 0.02)  # (r, k)                     lora_B
        self.lambda_ = nn.Parameter(torch.randn(r, device=dev) * 0.1)  # (r,)                           lora_E
        self.P_inner = nn.Parameter(torch.randn(k, r, device=dev) * 0.02)  # (k, r)                     lora_aa
        self.P_outer = nn.Parameter(torch.randn(base.out_features, k, device=dev) * 0.02)  # (d_out, k) lora_bb
        self.register_buffer("ranknum", torch.full((1,), float(r), device=dev))
        self.alpha = alpha

    def forward(self, x):
        result = self.base(x)
        left = self.Q_outer.T @ self.Q_inner.T  # (d_in, r)
        right = self.P_inner.T @ self.P_outer.T  # (r, d_out)
        dense = left @ torch.diag(self.lambda_) @ right  # (d_in, d_out): ΔWᵀ, built every call
        result += x @ dense * self.alpha / (self.ranknum + 1e-5)
        return result


def peft_lora_linear(base, r, alpha):
    """PEFT's LoRA Linear around `base` (through inject_adapter_in_model), lora_B made non-zero."""
    from peft import LoraConfig, inject_adapter_in_model

    holder = nn.Module()
    holder.lin = base
    inject_adapter_in_model(LoraConfig(r=r, lora_alpha=alpha, lora_dropout=0.0, target_modules=["lin"]), holder)
    layer = holder.lin
    nn.init.normal_(layer.lora_B["default"].weight, std=0.02)
    layer.base_layer.requires_grad_(False)
    return layer


def layer_variants(d, device, cfg, peft_missing):
    """name -> module, each around its own copy of the same frozen nn.Linear(d, d)."""
    torch.manual_seed(0)
    base = nn.Linear(d, d, device=device).requires_grad_(False)
    out = {"bare nn.Linear (no adapter)": copy.deepcopy(base),
           "reference LoRA r=8": ReferenceLoRA(copy.deepcopy(base), cfg.r, cfg.alpha)}
    if not peft_missing:
        out["PEFT LoRA r=8"] = peft_lora_linear(copy.deepcopy(base), cfg.r, cfg.alpha)
    mine = lora2.LoRA2Linear(copy.deepcopy(base), r=cfg.r, k=cfg.k, alpha=cfg.alpha)
    with torch.no_grad():
        mine.lambda_.normal_(std=0.1)  # λ = 0 at init; make the update non-zero
    out["LoRA2Linear k=r=8"] = mine
    out["authors' dense ΔW"] = AuthorsLoRA2(copy.deepcopy(base), cfg.r, cfg.k, cfg.alpha)
    return out


@torch.no_grad()
def check_layers(variants, device):
    """fp32 agreement of the re-implementations with the library layers on the same parameters (rel. error)."""
    mine, authors = variants["LoRA2Linear k=r=8"], variants["authors' dense ΔW"]
    for name in ("Q_outer", "Q_inner", "lambda_", "P_inner", "P_outer"):
        getattr(authors, name).copy_(getattr(mine, name))
    x = torch.randn(64, mine.in_features, device=device)
    checks = {}
    ref = mine(x)
    checks["authors' dense ΔW vs LoRA2Linear"] = ((authors(x) - ref).norm() / ref.norm()).item()
    checks["LoRA2Linear vs base + delta_weight()"] = ((mine.base(x) + x @ mine.delta_weight().T - ref).norm()
                                                      / ref.norm()).item()
    if "PEFT LoRA r=8" in variants:
        peft_layer, reference = variants["PEFT LoRA r=8"], variants["reference LoRA r=8"]
        reference.A.copy_(peft_layer.lora_A["default"].weight)
        reference.B.copy_(peft_layer.lora_B["default"].weight)
        want = peft_layer(x)
        checks["reference LoRA vs PEFT LoRA"] = ((reference(x) - want).norm() / want.norm()).item()
    for name, err in checks.items():
        if not err < 1e-4:
            raise ValueError(f"check failed: {name}: relative error {err:.3g} (want < 1e-4)")
    return checks


def bench_layer(device, cfg, args):
    _, peft_missing = optional("peft")
    act_dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    results = []
    for d, tokens in cfg.layer_shapes:
        log(f"layer d={d}, {tokens} tokens")
        variants = layer_variants(d, device, cfg, peft_missing)
        checks = check_layers(variants, device)
        torch.manual_seed(1)
        x = torch.randn(tokens, d, device=device, dtype=act_dtype, requires_grad=True)
        grad_out = torch.randn(tokens, d, device=device, dtype=act_dtype)

        def fwd_bwd(module):
            params = [p for p in module.parameters() if p.requires_grad]

            def call():
                with autocast(device):
                    y = module(x)
                y.backward(grad_out)
                x.grad = None
                for p in params:
                    p.grad = None
            return call

        fns = {name: fwd_bwd(module) for name, module in variants.items()}
        medians = interleaved_medians(fns, device, cfg.layer_warmup, cfg.layer_reps, cfg.inner)
        rows = {}
        for name, fn in fns.items():
            peak, extra = peak_memory(fn, device)
            rows[name] = dict(ms=medians[name], peak=peak, extra=extra)
        results.append(dict(d=d, tokens=tokens, dtype=str(act_dtype), rows=rows, checks=checks,
                            note=peft_missing))
        del variants, x, grad_out
        free(device)
    return results


def bench_merged(device, cfg, args):
    results = []
    for d, tokens in cfg.layer_shapes:
        log(f"merged d={d}, {tokens} tokens")
        torch.manual_seed(0)
        base = nn.Linear(d, d, device=device).requires_grad_(False)
        mine = lora2.LoRA2Linear(copy.deepcopy(base), r=cfg.r, k=cfg.k, alpha=cfg.alpha)
        with torch.no_grad():
            mine.lambda_.normal_(std=0.1)
            probe = torch.randn(64, d, device=device)
            want = mine(probe)
            mine.merge()
            err = ((mine(probe) - want).norm() / want.norm()).item()
        if not err < 1e-4:
            raise ValueError(f"check failed: merged vs unmerged LoRA2Linear: relative error {err:.3g}")
        act_dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        x = torch.randn(tokens, d, device=device, dtype=act_dtype)

        def infer(module):
            def call():
                with torch.no_grad(), autocast(device):
                    module(x)
            return call

        medians = interleaved_medians({"bare nn.Linear": infer(base), "merged LoRA2Linear": infer(mine)}, device,
                                      cfg.layer_warmup, cfg.layer_reps, cfg.inner)
        rows = {name: dict(ms=ms) for name, ms in medians.items()}
        results.append(dict(d=d, tokens=tokens, rows=rows, check_merged_vs_unmerged=err))
        del base, mine, x
        free(device)
    return results


# ----------------------------------------------------------------------------------------------------------------------
# the whole model


class Case:
    """One variant of the whole-model benchmark: a BERT encoder with adapters, a head, AdamW, and an optional
    per-step hook (the pruner), stepped in SPEC §4's order."""

    def __init__(self, name, encoder, head, hook=None, hook_state=None, gamma=0.0, fused=False):
        self.name, self.encoder, self.head, self.hook, self.hook_state, self.gamma = (
            name, encoder, head, hook, hook_state, gamma)
        self.params = [p for p in list(encoder.parameters()) + list(head.parameters()) if p.requires_grad]
        self.opt = torch.optim.AdamW(self.params, lr=1e-4, **({"fused": True} if fused else {}))
        self.global_step = 1  # t_i = 0: from step 1 on, every pruner call is in the cubic phase and masks

    def step(self, batch, hook_call=None):
        ids, mask, labels = batch
        with autocast(ids.device):
            h = self.encoder(input_ids=ids, attention_mask=mask).last_hidden_state  # (B, L, hidden)
            loss = F.cross_entropy(self.head(h[:, 0]).float(), labels)
            if self.gamma:
                loss = loss + self.gamma * lora2.orthogonal_regularizer(self.encoder)
        loss.backward()
        self.opt.step()
        if self.hook is not None:
            (hook_call or (lambda f: f()))(lambda: self.hook(self.global_step))
        self.opt.zero_grad(set_to_none=True)
        self.global_step += 1


def build_encoder(cfg, device):
    from transformers import BertConfig, BertModel

    config = BertConfig(vocab_size=cfg.vocab, hidden_size=cfg.hidden, num_hidden_layers=cfg.layers,
                        num_attention_heads=cfg.heads, intermediate_size=cfg.intermediate)
    torch.manual_seed(0)
    with torch.device(device):
        encoder = BertModel(config, add_pooling_layer=False)
    encoder.train()
    head = nn.Linear(cfg.hidden, 2, device=device)
    return encoder, head


def make_case(kind, cfg, device):
    encoder, head = build_encoder(cfg, device)
    if kind == "peft_lora":
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(encoder, LoraConfig(r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=0.0,
                                                   target_modules=TARGETS))
        return Case("PEFT LoRA r=8", model, head, fused=cfg.fused_adamw)
    if kind == "adalora":
        from peft import AdaLoraConfig, get_peft_model

        model = get_peft_model(encoder, AdaLoraConfig(
            init_r=cfg.r, target_r=cfg.target_rank, lora_alpha=cfg.alpha, lora_dropout=0.0, target_modules=TARGETS,
            tinit=0, tfinal=cfg.final_warmup, deltaT=1, total_step=cfg.total_steps, beta1=0.85, beta2=0.85))
        return Case("PEFT AdaLoRA + update_and_allocate", model, head,
                    hook=model.base_model.update_and_allocate, hook_state=model.base_model.rankallocator,
                    fused=cfg.fused_adamw)
    if kind == "reference_lora":
        encoder.requires_grad_(False)
        for name, module in list(encoder.named_modules()):
            if isinstance(module, nn.Linear) and any(name == t or name.endswith("." + t) for t in TARGETS):
                parent, _, attr = name.rpartition(".")
                setattr(encoder.get_submodule(parent), attr, ReferenceLoRA(module, cfg.r, cfg.alpha))
        return Case("reference LoRA r=8 (info)", encoder, head, fused=cfg.fused_adamw)
    lora2.inject(encoder, TARGETS, r=cfg.r, k=cfg.k, alpha=cfg.alpha, trainable=())
    if kind == "lora2":
        return Case("LoRA² k=r=8", encoder, head, fused=cfg.fused_adamw)
    pruner = lora2.Pruner(encoder, target_rank=cfg.target_rank, total_steps=cfg.total_steps, init_warmup=0,
                          final_warmup=cfg.final_warmup, mask_interval=1)
    if kind == "lora2_pruner":
        return Case("LoRA² + Pruner.step", encoder, head, hook=pruner.step, hook_state=pruner, fused=cfg.fused_adamw)
    if kind == "lora2_pruner_reg":
        return Case("LoRA² + Pruner.step + γ·R (info)", encoder, head, hook=pruner.step, hook_state=pruner,
                    gamma=0.1, fused=cfg.fused_adamw)
    raise ValueError(f"unknown case {kind!r}")


def profile_run(fn, device, title):
    """(torch.profiler table of one call of fn, CUDA kernel launches it made; None off CUDA)."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    sync(device)
    with profile(activities=activities) as prof:
        fn()
        sync(device)
    events = prof.key_averages()
    launches = device_ms = None
    if device.type == "cuda":
        launches = sum(e.count for e in events if "LaunchKernel" in e.key)
        device_ms = sum(e.self_device_time_total for e in events) / 1e3  # time the GPU spent in kernels
    tables = [events.table(sort_by="self_cpu_time_total", row_limit=20)]
    if device.type == "cuda":
        tables.append(events.table(sort_by="self_device_time_total", row_limit=12))
    return f"## {title} (kernel launches: {launches})\n" + "\n".join(tables) + "\n", launches, device_ms


def bench_model(device, cfg, args, kinds=None, cases=None):
    """Build every variant (all stay resident), then time them in interleaved rounds: round i steps each variant
    once, so drifting host speed hits all variants alike. `cases` adds ready-made Case objects (experiments)."""
    missing = [reason for reason in (optional("transformers")[1], optional("peft")[1]) if reason]
    if optional("transformers")[1]:
        return dict(skipped=missing)
    kinds = kinds or ["peft_lora", "reference_lora", "lora2", "lora2_pruner", "adalora", "lora2_pruner_reg"]
    if optional("peft")[1]:
        kinds = [k for k in kinds if not k.startswith(("peft", "adalora"))]
    torch.manual_seed(2)
    batch = (torch.randint(1, cfg.vocab, (cfg.batch, cfg.seq), device=device),
             torch.ones(cfg.batch, cfg.seq, dtype=torch.long, device=device),
             torch.randint(0, 2, (cfg.batch,), device=device))
    built, rows = [], {}
    for make in [lambda kind=kind: make_case(kind, cfg, device) for kind in kinds] + [lambda c=c: c for c in cases or []]:
        before = torch.cuda.memory_allocated(device) if device.type == "cuda" else None
        case = make()
        log(f"model: {case.name}")
        for _ in range(cfg.model_warmup):
            case.step(batch)
        peak, _ = peak_memory(lambda: case.step(batch), device)  # this variant's weights, state and activations
        rows[case.name] = dict(name=case.name, peak=None if peak is None else peak - before,
                               trainable=sum(p.numel() for p in case.params), times=[], hook_times=[])
        built.append(case)
    log(f"model: {cfg.model_steps} interleaved rounds")
    for _ in range(cfg.model_steps):
        for case in built:
            rows[case.name]["times"].append(time_once(lambda: case.step(batch), device))
    hooked = [case for case in built if case.hook is not None]
    for _ in range(cfg.hook_steps):
        for case in hooked:
            case.step(batch, hook_call=lambda f, row=rows[case.name]: row["hook_times"].append(time_once(f, device)))
    count_syncs(lambda: None, device)  # the first switch of the debug mode reports one sync of its own
    for case in hooked:
        row = rows[case.name]
        case.step(batch, hook_call=lambda f, row=row: row.update(zip(("syncs", "sync_sites"), count_syncs(f, device))))
        row["score_bytes"] = state_bytes(case.hook_state, case.encoder)
        if hasattr(case.hook_state, "stats"):
            row["pruner_stats"] = case.hook_state.stats()
    profiles = []
    if args.profile:
        for case in built:
            text, rows[case.name]["launches"], rows[case.name]["kernel_ms"] = profile_run(
                lambda: case.step(batch), device, f"{case.name}: whole step")
            profiles.append(text)
            if case.hook is not None:
                out = []
                case.step(batch, hook_call=lambda f: out.append(profile_run(f, device, f"{case.name}: hook alone")))
                profiles.append(out[0][0])
                rows[case.name]["hook_launches"] = out[0][1]
    for row in rows.values():
        row["step_ms"] = statistics.median(row["times"])
        row["step_q1"], _, row["step_q3"] = statistics.quantiles(row["times"], n=4)
        if row["hook_times"]:
            row["hook_ms"] = statistics.median(row["hook_times"])
    del built
    free(device)
    return dict(rows=list(rows.values()), profiles=profiles, note=missing or None,
                shape=dict(layers=cfg.layers, hidden=cfg.hidden, batch=cfg.batch, seq=cfg.seq,
                           optimizer="AdamW(fused=True)" if cfg.fused_adamw else "AdamW (torch's default: foreach)"))


# ----------------------------------------------------------------------------------------------------------------------
# the whole training step as train_glue.py runs it, eager and compiled (issue 11)

STEP_NAMES = {"lora2": "LoRA² k=r=8 + γ·R + Pruner", "reference_lora": "minimal LoRA r=8", "peft_lora": "PEFT LoRA r=8"}
LAUNCH_APIS = ("cudaLaunchKernel", "cudaLaunchKernelExC", "cuLaunchKernel", "cuLaunchKernelEx", "cudaGraphLaunch",
               "cudaMemcpyAsync", "cudaMemsetAsync")


def step_shapes(args):
    """{label: (bert.BertConfig, batch, tokens)}: the packaged MiniLM (its config.json; random weights) at 32 × 64 and
    BERT-base at 32 × 128; --quick: a 2-layer, 32-wide BERT at 4 × 16."""
    if args.quick:
        return {"tiny 4×16": (bert.tiny_config(vocab_size=1000), 4, 16)}
    shapes = {}
    if "minilm" in args.shapes.split(","):
        minilm = bert.BertConfig.from_json(Path(args.model_dir or bert.default_model_dir()) / "config.json")
        shapes["MiniLM 32×64"] = (minilm, 32, 64)
    if "bert-base" in args.shapes.split(","):
        shapes["BERT-base 32×128"] = (bert.BertConfig(), 32, 128)
    return shapes


class MinimalLoRA:
    """The method interface of train_glue.py for the minimal LoRA (ReferenceLoRA on the same six matrices)."""

    def __init__(self, model, cfg, targets):
        model.requires_grad_(False)
        for name, module in list(model.named_modules()):
            if isinstance(module, nn.Linear) and any(name == t or name.endswith("." + t) for t in targets):
                parent, _, attr = name.rpartition(".")
                setattr(model.get_submodule(parent), attr, ReferenceLoRA(module, cfg.r, cfg.alpha))
        for name, p in model.named_parameters():
            p.requires_grad_(p.requires_grad or bool(set(name.split(".")) & set(lora2.HEAD)))
        self.model = model

    def regularizer(self):
        return None

    def after_step(self, t):
        pass


class TrainStep:
    """One row of the step setting: bert.py's classifier (random weights) with `kind` on the six matrices of every
    layer, stepped as train_glue.py steps: forward, loss + γ·R, backward, clip, AdamW (fused), the linear schedule,
    the method's after_step (LoRA²: Pruner.step, scoring every step, masking every 10th: t_i = 0, cubic phase),
    zero_grad. backend None: eager; else through compiled.py (torch.compile of the pieces with `backend`, "none" for
    no torch.compile, and on CUDA the step replayed from a CUDA graph), exactly as train_glue.py --compile."""

    def __init__(self, kind, config, device, backend=None):
        import compiled
        import glue
        import train_glue

        torch.manual_seed(0)
        cfg = train_glue.Config(r=8, k=8, alpha=16, target_rank=4, steps=10_000, init_warmup=0.0, final_warmup=0.3,
                                mask_interval=10, gamma=0.1, lr=1e-4, compile=backend is not None,
                                compile_backend=backend or "none", device=device.type)
        model = bert.BertForSequenceClassification(config, 2)
        if kind == "lora2":
            method = train_glue.LoRA2(model, cfg, bert.TARGETS, cfg.steps)
        elif kind == "peft_lora":
            from experiments import baselines

            method = baselines.LoRA(model, cfg, bert.TARGETS, cfg.steps)
            for name, p in method.model.named_parameters():
                if ".lora_B." in name:
                    nn.init.normal_(p, std=0.02)  # B = 0 at init; time non-zero data
        else:
            method = MinimalLoRA(model, cfg, bert.TARGETS)
        self.name = STEP_NAMES[kind] + ("" if backend is None else f", compiled ({backend})")
        self.kind, self.backend, self.method, self.t = kind, backend, method, 1
        self.model = model = method.model.to(device).train()
        params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        no_decay = [p for n, p in params if n.endswith("bias") or "LayerNorm" in n]
        decay = [p for n, p in params if not (n.endswith("bias") or "LayerNorm" in n)]
        self.params = [p for _, p in params]
        self.optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": 0.01},
                                            {"params": no_decay, "weight_decay": 0.0}],
                                           **compiled.adamw_options(cfg, device))
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda t: min(1.0, (t + 1) / 600))

        def device_step(batch, labels):  # train_glue.py's, line for line
            with autocast(device):
                logits = train_glue.logits_of(self.model(**batch))
            loss_task = glue.task_loss(logits, labels)
            reg = method.regularizer()
            loss = loss_task if reg is None else loss_task + cfg.gamma * reg
            loss.backward()
            torch.nn.utils.clip_grad_norm_(self.params, cfg.clip)
            self.optimizer.step()
            return loss_task.detach(), None if reg is None else reg.detach()

        self.run = device_step if backend is None else compiled.step(device_step, model, method, self.optimizer, cfg)

    def step(self, batch, labels):
        self.run(batch, labels)
        self.scheduler.step()
        self.method.after_step(self.t)
        self.optimizer.zero_grad(set_to_none=True)
        self.t += 1


def profile_steps(fn, device, n):
    """Per step, over n calls of fn under torch.profiler: host launches (kernels, graphs, copies), device events and
    their total ms, and {kernel name: (count, us)} for the breakdown; None off CUDA."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    if device.type != "cuda":
        return None
    sync(device)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(n):
            fn()
        sync(device)
    events = prof.events()
    on_gpu = [e for e in events if e.device_type == DeviceType.CUDA and not getattr(e, "is_user_annotation", False)]
    launches = sum(1 for e in events if e.device_type == DeviceType.CPU and e.name in LAUNCH_APIS)
    by_name = {}
    for e in on_gpu:
        count, us = by_name.get(e.name, (0, 0.0))
        by_name[e.name] = (count + 1, us + e.time_range.elapsed_us())
    return dict(launches=launches / n, gpu_events=len(on_gpu) / n,
                kernel_ms=sum(us for _, us in by_name.values()) / n / 1e3,
                top={k: (c / n, us / n) for k, (c, us) in sorted(by_name.items(), key=lambda kv: -kv[1][1])[:25]})


def kernel_class(name):
    """A coarse class of a GPU kernel, for where the time goes."""
    low = name.lower()
    for cls, keys in (("matmul", ("gemm", "cutlass", "sm90_", "cublas", "xmma", "splitk")),
                      ("attention", ("fmha", "attention", "flash")), ("AdamW", ("adam",)),
                      ("copy", ("memcpy", "memset", "copy")), ("fused (inductor)", ("triton",)),
                      ("reduction", ("reduce", "norm", "sum")), ):
        if any(k in low for k in keys):
            return cls
    return "elementwise / other"


def bench_step(device, cfg, args):
    """The step setting: for each shape, eager and compiled rows of LoRA², the minimal LoRA and PEFT LoRA (and LoRA²
    as CUDA graphs of its eager kernels), all resident, timed in interleaved rounds; then launches, GPU time and
    host syncs per step. --budget_s: compiled rows not built once the setting has run that long (reported)."""
    _, peft_missing = optional("peft")
    backend = args.backend or ("inductor" if device.type == "cuda" else "aot_eager")
    kinds = [k for k in STEP_NAMES if not (k == "peft_lora" and peft_missing)]
    plan = [(k, None) for k in kinds] + [(k, backend) for k in kinds]
    if device.type == "cuda" and backend != "none":
        plan.append(("lora2", "none"))
    warmup, rounds = (3, 3) if args.quick else (6, cfg.model_steps)
    started, results = time.perf_counter(), []
    for label, (config, batch_size, tokens) in step_shapes(args).items():
        torch.manual_seed(2)
        batch = {"input_ids": torch.randint(1, config.vocab_size, (batch_size, tokens), device=device),
                 "attention_mask": torch.ones(batch_size, tokens, dtype=torch.long, device=device),
                 "token_type_ids": torch.zeros(batch_size, tokens, dtype=torch.long, device=device)}
        labels = torch.randint(0, 2, (batch_size,), device=device)
        built, rows, skipped = [], {}, []
        for kind, be in plan:
            if be is not None and args.budget_s and time.perf_counter() - started > args.budget_s:
                skipped.append(f"{STEP_NAMES[kind]} ({be}): over --budget_s")
                continue
            log(f"step {label}: {STEP_NAMES[kind]}, {'eager' if be is None else be}")
            t0 = time.perf_counter()
            try:
                case = TrainStep(kind, config, device, be)
                for _ in range(warmup):  # compiled: compiles, 2 eager warm-up steps, the capture
                    case.step(batch, labels)
                sync(device)
            except Exception as e:  # a variant that fails is reported, the others still run
                traceback.print_exc()
                skipped.append(f"{STEP_NAMES[kind]} ({be or 'eager'}): {type(e).__name__}: {str(e)[:200]}")
                free(device)
                continue
            rows[case.name] = dict(name=case.name, kind=kind, backend=be, warmup_s=time.perf_counter() - t0,
                                   times=[], trainable=sum(p.numel() for p in case.params))
            built.append(case)
        log(f"step {label}: {rounds} interleaved rounds")
        for _ in range(rounds):
            for case in built:
                rows[case.name]["times"].append(time_once(lambda: case.step(batch, labels), device))
        count_syncs(lambda: None, device)
        for case in built:
            row = rows[case.name]
            row["syncs"], row["sync_sites"] = count_syncs(lambda: case.step(batch, labels), device)
            while case.t % 10 != 1:  # compiled: profile 10 steps, one of them masking; eager: 5, none masking
                case.step(batch, labels)
            n_prof = 2 if args.quick else 5 if case.backend is None else 10
            prof = profile_steps(lambda: case.step(batch, labels), device, n_prof)
            row.update(prof or {})
            row["step_ms"], row["mean_ms"] = statistics.median(row["times"]), statistics.fmean(row["times"])
            row["step_q1"], _, row["step_q3"] = statistics.quantiles(row["times"], n=4) if len(row["times"]) > 1 \
                else (row["step_ms"],) * 3
        results.append(dict(shape=label, batch=batch_size, tokens=tokens, layers=config.num_hidden_layers,
                            hidden=config.hidden_size, rows=list(rows.values()), skipped=skipped))
        print("\n" + report_step(results[-1:], device), flush=True)  # each shape as soon as it is measured
        if args.json:
            write_atomic(args.json + ".partial", json.dumps(results, indent=1, default=str))
        del built, batch, labels
        torch._dynamo.reset()
        free(device)
    return results


def bench_e2e(device, cfg, args):
    """train_glue.py end to end, one subprocess per (mode, seed): SST-2, the packaged MiniLM (--model_dir), batch 32,
    --e2e_steps steps, progress every 100. Sustained steps/s from the progress lines after the first (each line
    waits for the GPU: it prints the summed loss); warm-up = the time to the first line beyond 100 steps at that
    rate (compilation, capture); the dev accuracy from metrics.json."""
    import tempfile

    root = Path(__file__).resolve().parent.parent
    runs = []
    for mode in args.e2e_modes.split(","):
        for seed in [int(x) for x in args.e2e_seeds.split(",")]:
            out = Path(tempfile.mkdtemp(prefix=f"e2e-{mode}-s{seed}-"))
            cmd = [sys.executable, str(root / "train_glue.py"), "--task", "sst2", "--device", device.type,
                   "--batch_size", "32", "--steps", str(args.e2e_steps), "--seed", str(seed), "--log_every", "100",
                   "--train_size", "20000", "--pooling", "cls",  # the settings BENCHMARKS.md measured with
                   "--out_dir", str(out), "--no_download", "--compile" if mode == "compiled" else "--no-compile"]
            cmd += (["--model", args.model_dir] if args.model_dir else []) + (
                ["--compile_backend", args.backend] if args.backend and mode == "compiled" else [])
            log("e2e: " + " ".join(cmd[1:]))
            t_start, lines = time.perf_counter(), []
            proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1,
                                    env={**os.environ, "PYTHONUNBUFFERED": "1"})
            for line in proc.stdout:
                lines.append((time.perf_counter() - t_start, line.rstrip("\n")))
                print("    " + line.rstrip("\n"), flush=True)
            proc.wait()
            run = dict(mode=mode, seed=seed, returncode=proc.returncode, wall_s=time.perf_counter() - t_start,
                       command="python " + " ".join(cmd[1:]))
            header = next((t for t, line in lines if " steps of " in line and " on 1×" in line), None)
            progress = [(t, int(line.split()[1].split("/")[0])) for t, line in lines if line.startswith("step ")]
            if len(progress) >= 3 and header is not None:
                (t1, s1), (tn, sn) = progress[0], progress[-1]
                rate = (sn - s1) / (tn - t1)
                run.update(steps_per_s=rate, first_line_step=s1, warmup_s=(t1 - header) - s1 / rate,
                           loop_s=tn - header)
            metrics = out / "metrics.json"
            if metrics.exists():
                m = json.loads(metrics.read_text())
                run.update(accuracy=m["main_metric"], best_step=m["best_step"], trained_wall_s=m["wall_s"])
            runs.append(run)
            if args.json:
                write_atomic(args.json + ".partial", json.dumps(runs, indent=1, default=str))
    return runs


# ----------------------------------------------------------------------------------------------------------------------
# report


def verdict(value, limit, lower_is_better=True):
    if value is None:
        return "not measured"
    ok = value <= limit if lower_is_better else value >= limit
    return ("met" if ok else "MISSED") + f" ({value:.3f} vs {'≤' if lower_is_better else '≥'} {limit})"


def report_model(res):
    if "skipped" in res:
        return f"model: skipped: {res['skipped']}"
    rows = res["rows"]
    by = {r["name"]: r for r in rows}
    lora = by.get("PEFT LoRA r=8")
    out = [f"### Whole training step: {res['shape']['layers']}-layer {res['shape']['hidden']}-wide BERT encoder, "
           f"batch {res['shape']['batch']} × {res['shape']['seq']}, 6 matrices per layer, {res['shape']['optimizer']}; "
           f"medians of interleaved rounds"]
    if res.get("note"):
        out.append(f"note: {res['note']}")
    table = []
    for r in rows:
        step_ratio = ratio(r["step_ms"], lora and lora["step_ms"])
        hook_pct = None if "hook_ms" not in r else 100 * r["hook_ms"] / r["step_ms"]
        table.append([r["name"], fmt(r["step_ms"]), f"{fmt(r['step_q1'])}–{fmt(r['step_q3'])}",
                      fmt(step_ratio, ".3f"), fmt(mib(r["peak"]), ".0f"),
                      fmt(ratio(r["peak"], lora and lora["peak"]), ".3f"), f"{r['trainable']:,}",
                      fmt(r.get("hook_ms"), ".3f"), fmt(hook_pct, ".1f"),
                      "–" if r.get("syncs") is None else r["syncs"],
                      "–" if "score_bytes" not in r else f"{r['score_bytes']:,}",
                      "–" if r.get("launches") is None else r["launches"],
                      fmt(r.get("kernel_ms")), fmt(ratio(r.get("kernel_ms"), lora and lora.get("kernel_ms")), ".3f"),
                      "–" if r.get("hook_launches") is None else r["hook_launches"]])
    out.append(markdown(["variant", "step ms (median)", "quartiles", "× PEFT LoRA", "peak MiB", "× PEFT LoRA",
                         "trainable params", "hook alone ms", "hook % of step", "host syncs in hook",
                         "score state bytes", "kernel launches / step", "GPU kernel ms / step",
                         "kernel ms × PEFT LoRA", "launches in hook"], table))
    pr, ada = by.get("LoRA² + Pruner.step"), by.get("PEFT AdaLoRA + update_and_allocate")
    targets = []
    if pr and lora:
        targets.append(f"- step LoRA² + Pruner.step / PEFT LoRA: {verdict(pr['step_ms'] / lora['step_ms'], 1.15)}")
    if pr:
        targets.append(f"- Pruner.step / step: {verdict(pr['hook_ms'] / pr['step_ms'], 0.03)}")
    plain = by.get("LoRA² k=r=8")
    if pr and plain:
        targets.append(f"- Pruner.step inside the step (LoRA² + Pruner.step − LoRA²): "
                       f"{pr['step_ms'] - plain['step_ms']:.2f} ms")
    if pr and ada:
        targets.append(f"- update_and_allocate / Pruner.step: {verdict(ada['hook_ms'] / pr['hook_ms'], 10, False)}")
        targets.append(f"- score state: Pruner {pr['score_bytes']:,} B, AdaLoRA {ada['score_bytes']:,} B "
                       f"({ada['score_bytes'] / max(pr['score_bytes'], 1):.0f}×)")
    if pr and "pruner_stats" in pr:
        s = pr["pruner_stats"]
        targets.append(f"- entries scored per step: LoRA² {s['scored']:,} of {s['adapter']:,} adapter entries "
                       f"({100 * s['scored_ratio']:.2f} %); AdaLoRA at the same r scores {s['adalora_scored']:,}")
    for r in rows:
        if r.get("sync_sites"):
            targets.append(f"- {r['name']}: host syncs at {', '.join(r['sync_sites'][:8])}")
    return "\n".join(out + targets)


def report_layer(results, device):
    out = []
    for res in results:
        rows = res["rows"]
        ref, peft_row, mine = rows["reference LoRA r=8"], rows.get("PEFT LoRA r=8"), rows["LoRA2Linear k=r=8"]
        out.append(f"### One layer, forward + backward: d_in = d_out = {res['d']}, {res['tokens']:,} tokens, "
                   f"{'bf16 autocast' if device.type == 'cuda' else 'fp32'}")
        if res.get("note"):
            out.append(f"note: {res['note']}")
        table = []
        for name, r in rows.items():
            table.append([name, fmt(r["ms"], ".3f"), fmt(ratio(r["ms"], ref["ms"]), ".3f"),
                          fmt(ratio(r["ms"], peft_row and peft_row["ms"]), ".3f"),
                          fmt(mib(r.get("peak")), ".1f"), fmt(mib(r.get("extra")), ".1f"),
                          fmt(ratio(r.get("extra"), ref.get("extra")), ".3f"),
                          fmt(ratio(r.get("extra"), peft_row and peft_row.get("extra")), ".3f")])
        out.append(markdown(["variant", "ms (median)", "time × ref LoRA", "time × PEFT LoRA", "peak MiB",
                             "extra MiB", "extra × ref LoRA", "extra × PEFT LoRA"], table))
        limit = 1.05 if res["d"] >= 4096 else 1.25
        for other, r in (("reference LoRA", ref), ("PEFT LoRA", peft_row)):
            if r is None:
                continue
            out.append(f"- LoRA2Linear time / {other}: {verdict(mine['ms'] / r['ms'], limit)}")
            if device.type == "cuda":
                out.append(f"- LoRA2Linear extra memory / {other}: {verdict(mine['extra'] / r['extra'], limit)}; "
                           f"peak: {mine['peak'] / r['peak']:.3f}")
        out.append("- checks (fp32 relative error): " + ", ".join(f"{k}: {v:.1e}" for k, v in res["checks"].items()))
    return "\n".join(out)


def report_merged(results, device):
    out = []
    for res in results:
        rows = res["rows"]
        base = rows["bare nn.Linear"]["ms"]
        out.append(f"### Merged LoRA2Linear vs bare nn.Linear, inference (no grad): d = {res['d']}, "
                   f"{res['tokens']:,} tokens, {'bf16 autocast' if device.type == 'cuda' else 'fp32'}")
        out.append(markdown(["variant", "ms (median)", "× bare nn.Linear"],
                            [[n, fmt(r["ms"], ".4f"), fmt(r["ms"] / base, ".3f")] for n, r in rows.items()]))
        out.append(f"- merged / bare: {verdict(rows['merged LoRA2Linear']['ms'] / base, 1.02)}; "
                   f"merged vs unmerged output: rel. error {res['check_merged_vs_unmerged']:.1e}")
    return "\n".join(out)


def report_step(results, device):
    out = []
    for res in results:
        rows = res["rows"]
        by = {(r["kind"], r["backend"]): r for r in rows}
        out.append(f"### Whole training step as train_glue.py runs it: {res['shape']} ({res['layers']} layers × 6 "
                   f"matrices, hidden {res['hidden']}), {'bf16 autocast' if device.type == 'cuda' else 'fp32'}, "
                   f"fused AdamW, clip, schedule; medians of {len(rows[0]['times']) if rows else 0} interleaved rounds")
        table = []
        for r in rows:
            table.append([r["name"], fmt(r["step_ms"]), f"{fmt(r['step_q1'])}–{fmt(r['step_q3'])}", fmt(r["mean_ms"]),
                          fmt(r.get("kernel_ms")), fmt(ratio(r["step_ms"], r.get("kernel_ms")), ".2f"),
                          fmt(r.get("launches"), ".0f"), fmt(r.get("gpu_events"), ".0f"),
                          "–" if r.get("syncs") is None else r["syncs"], fmt(r["warmup_s"], ".1f")])
        out.append(markdown(["variant", "wall ms / step (median)", "quartiles", "mean", "GPU kernel ms / step",
                             "wall × kernel", "launches / step", "GPU kernels / step", "host syncs / step",
                             "build + warm-up s"], table))
        for line in res["skipped"]:
            out.append(f"- not measured: {line}")
        fast, ref = by.get(("lora2", args_backend(rows))), by.get(("reference_lora", args_backend(rows)))
        slow, peft_eager = by.get(("lora2", None)), by.get(("peft_lora", None))
        if fast and ref:
            out.append(f"- LoRA² compiled / minimal LoRA compiled: {verdict(fast['step_ms'] / ref['step_ms'], 1.15)}")
        if fast and fast.get("kernel_ms"):
            out.append(f"- LoRA² compiled wall / its GPU kernel time: {verdict(fast['step_ms'] / fast['kernel_ms'], 1.3)}")
        if fast and slow:
            out.append(f"- LoRA² eager / LoRA² compiled: {verdict(slow['step_ms'] / fast['step_ms'], 5, False)}")
        if fast and peft_eager:
            out.append(f"- LoRA² compiled / PEFT LoRA eager: {verdict(fast['step_ms'] / peft_eager['step_ms'], 0.25)}")
        if fast and fast.get("top"):
            classes = {}
            for name, (count, us) in fast["top"].items():
                c = classes.setdefault(kernel_class(name), [0, 0.0])
                c[0], c[1] = c[0] + count, c[1] + us
            out.append(f"- where {fast['name']}'s GPU time goes (top 25 kernel names, per step): " + "; ".join(
                f"{cls} {us / 1e3:.2f} ms in {count:.0f} kernels" for cls, (count, us)
                in sorted(classes.items(), key=lambda kv: -kv[1][1])))
    return "\n".join(out)


def args_backend(rows):
    """The main compiled backend of a step table (the first compiled row's)."""
    return next((r["backend"] for r in rows if r["backend"] not in (None, "none")), "none")


def report_e2e(runs):
    table = [[r["mode"], r["seed"], fmt(r.get("steps_per_s"), ".1f"), fmt(r.get("warmup_s"), ".1f"),
              fmt(r.get("wall_s"), ".0f"), fmt(r.get("accuracy"), ".4f"), r["returncode"]] for r in runs]
    out = ["### train_glue.py end to end: SST-2, MiniLM, batch 32",
           markdown(["mode", "seed", "steps/s sustained", "warm-up s (compile, capture)", "process wall s",
                     "dev accuracy", "exit"], table)]
    out += [f"- `{r['command']}`" for r in runs]
    return "\n".join(out)


def environment(device):
    env = dict(python=platform.python_version(), torch=torch.__version__, platform=platform.platform(),
               cpu_count=os.cpu_count(), torch_threads=torch.get_num_threads())
    for name in ("transformers", "peft"):
        mod, _ = optional(name)
        env[name] = getattr(mod, "__version__", None)
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
        env["cuda"] = torch.version.cuda
    return env


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto")
    parser.add_argument("--only", default=None,
                        help=f"comma-separated subset of {','.join(SETTINGS)} "
                             "(default: all on CUDA, layer,merged on the CPU)")
    parser.add_argument("--quick", action="store_true", help="tiny shapes and few repetitions: a smoke run")
    parser.add_argument("--fused", action="store_true",
                        help="AdamW(fused=True) for every model variant (default: torch's default, foreach on CUDA)")
    parser.add_argument("--json", default=None, help="also write every figure to this JSON file")
    parser.add_argument("--profile", default=None,
                        help="write torch.profiler tables of one step per model variant (and of the hook) here")
    parser.add_argument("--backend", default=None, choices=("inductor", "aot_eager", "eager", "none"),
                        help="step/e2e: the compiled rows' torch.compile backend (default: inductor on CUDA, "
                             "aot_eager on the CPU; none: CUDA graphs of the eager kernels)")
    parser.add_argument("--model_dir", default=None, help="step/e2e: the MiniLM folder (default: the packaged one)")
    parser.add_argument("--budget_s", type=float, default=None, help="step: build no compiled row after this long")
    parser.add_argument("--shapes", default="minilm,bert-base", help="step: minilm and/or bert-base")
    parser.add_argument("--e2e_modes", default="eager,compiled", help="e2e: eager and/or compiled")
    parser.add_argument("--e2e_seeds", default="0", help="e2e: comma-separated seeds")
    parser.add_argument("--e2e_steps", type=int, default=1200, help="e2e: optimiser steps per run")
    args = parser.parse_args(argv)
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: torch sees no CUDA device")
    device = torch.device(args.device)
    only = args.only.split(",") if args.only else (
        ["model", "layer", "merged"] if device.type == "cuda" else ["layer", "merged"])
    if set(args.shapes.split(",")) - {"minilm", "bert-base"}:
        raise SystemExit(f"--shapes: {args.shapes!r}; choose from minilm, bert-base")
    unknown = sorted(set(only) - set(SETTINGS))
    if unknown:
        raise SystemExit(f"--only: unknown setting(s) {unknown}; choose from {list(SETTINGS)}")
    cfg = config_for(device, args.quick)
    cfg.fused_adamw = args.fused
    env = environment(device)
    print("## Environment\n" + "\n".join(f"- {k}: {v}" for k, v in env.items()), flush=True)
    print(f"- command: python {' '.join([os.path.basename(sys.argv[0])] + sys.argv[1:])}", flush=True)
    if device.type == "cpu":
        print("- CPU: time only (no allocator peak on the CPU); fp32, no autocast", flush=True)
    results = dict(environment=env, config=asdict(cfg), device=str(device))
    reports = []
    t0 = time.perf_counter()
    for name, bench, report in (("model", bench_model, report_model),
                                ("layer", bench_layer, lambda r: report_layer(r, device)),
                                ("merged", bench_merged, lambda r: report_merged(r, device)),
                                ("step", bench_step, lambda r: report_step(r, device)),
                                ("e2e", bench_e2e, report_e2e)):
        if name in only:
            results[name] = bench(device, cfg, args)
            reports.append(report(results[name]))
            print("\n" + reports[-1], flush=True)
    results["wall_s"] = time.perf_counter() - t0
    print(f"\n(total {results['wall_s']:.0f} s)", flush=True)
    if args.profile:
        text = "".join(results.get("model", {}).get("profiles", [])) or "(no model setting run)\n"
        write_atomic(args.profile, text)
    if args.json:
        results.get("model", {}).pop("profiles", None)
        write_atomic(args.json, json.dumps(results, indent=1, default=str))


def write_atomic(path, text):
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    lora2.atomic_write(path, text)


if __name__ == "__main__":
    main()
