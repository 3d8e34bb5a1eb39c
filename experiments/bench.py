"""What LoRA² costs per step: the whole training step eager and compiled, one layer, merged \
layers, end to end.

Settings (pick with --only; each prints markdown tables):
  step    the whole training step exactly as train_glue.py runs it, for LoRA² (+ γ·R + Pruner.step),
          the minimal LoRA r=8 (ReferenceLoRA below) and PEFT LoRA r=8, on bert.py's BERT with the
          packaged MiniLM's shape at 32 × 64 tokens and BERT-base's at 32 × 128 (random weights).
          CUDA: bf16 autocast, eager and compiled (compiled.py: the blocks through torch.compile,
          the step replayed from CUDA graphs), plus LoRA² as CUDA graphs of its eager kernels
          (backend none). CPU: eager, fp32 (train_glue.py's arithmetic before --precision) and bf16
          autocast (its default on CPUs with bf16 instructions).
          Per step: wall ms (device synchronised before and after), GPU kernel ms, host launches
          (kernels, graphs, copies) and GPU kernels (torch.profiler over 10 steps, one of them
          masking), host synchronisations, and the time to build the row and run its first steps
          (compiling, capturing).
  e2e     train_glue.py end to end on SST-2: its default run and a 600-step run, eager and compiled:
          process wall, sustained steps/s, warm-up, dev accuracy.
  layer   one adapted layer, forward + backward (input requires grad, frozen base): LoRA2Linear |
          PEFT's LoRA Linear | the minimal reference LoRA | the authors' formulation (their dense
          ΔW, AuthorsLoRA2 below). CUDA: bf16 autocast, d_in = d_out = 4096 with 16,384 tokens and
          768 with 4,096. CPU: fp32, 768 with 2,048.
  merged  merged LoRA2Linear (after .merge()) against the bare nn.Linear, inference under no_grad.

Timing: medians after warm-up; on CUDA with CUDA events, the device synchronised after each timed
run. Variants stay resident and are timed in interleaved rounds, so a host that speeds up or slows
down hits all of them alike.
Memory (CUDA only, layer setting): torch.cuda.max_memory_allocated; "extra" is the peak minus what
was allocated before the call.

    python3 experiments/bench.py --only step,e2e --json experiments/bench-h200.json
        # on the GPU machine
    python experiments/bench.py --device cpu --json experiments/bench-cpu.json
        # layer, merged, step
    python experiments/bench.py --report
        # experiments/BENCHMARKS.md from the committed bench-*.json
    python experiments/bench.py --quick --only step --device cpu
        # a smoke run, tiny shapes
"""
import argparse
import copy
import gc
import hashlib
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
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repository root: lora2.py
import bert  # noqa: E402
import formats  # noqa: E402
import lora2  # noqa: E402

SETTINGS = ("step", "e2e", "layer", "merged")


@dataclass
class BenchConfig:
    step_warmup: int = 6  # steps of each row before timing (compiled: compiles, 2 eager steps,
                          # the capture)
    step_rounds: int = 30  # timed rounds (median); a round steps every row once
    layer_shapes: tuple = ((4096, 16384), (768, 4096))  # (d, tokens)
    layer_warmup: int = 3  # rounds before timing
    layer_reps: int = 15  # timed rounds (median); a round times one block of every variant
    inner: int = 10  # calls per block
    r: int = 8  # adapters: LoRA r, LoRA² r = k
    k: int = 8
    alpha: int = 16


def config_for(device, quick):
    if device.type == "cpu":
        cfg = BenchConfig(layer_shapes=((768, 2048),), layer_warmup=3, layer_reps=21, inner=1,
                          step_warmup=3, step_rounds=10)
    else:
        cfg = BenchConfig()
    if quick:
        cfg.layer_shapes, cfg.layer_warmup, cfg.layer_reps, cfg.inner = ((128, 256),), 1, 3, 2
        cfg.step_warmup, cfg.step_rounds = 3, 3
    return cfg


# --------------------------------------------------------------------------------------------------
# measuring


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_once(fn, device):
    """Milliseconds of one call of fn, the device idle before and after (CUDA events, else the host
    clock)."""
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
    """{name: median ms per call} over `reps` rounds after `warmup` rounds; a round times one block
    of `inner` back-to-back calls of every fn in turn, so that drifting load (a shared CPU, clocks)
    hits all of them alike."""
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
    """(number of host-device synchronisations fn makes, their call sites "file:line"), from
    torch.cuda's sync debug mode; (None, []) off CUDA."""
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


# --------------------------------------------------------------------------------------------------
# one layer: the two re-implemented baselines


class ReferenceLoRA(nn.Module):
    """The minimal LoRA: h = W₀x + b + s · B(Ax), A (r, d_in), B (d_out, r), s = α / r."""

    def __init__(self, base, r=8, alpha=16):
        super().__init__()
        self.base = base.requires_grad_(False)
        self.A = nn.Parameter(torch.randn(r, base.in_features, device=base.weight.device)
                              / math.sqrt(base.in_features))
        self.B = nn.Parameter(torch.randn(base.out_features, r, device=base.weight.device)
                              * 0.02)  # not 0: no zeros timed
        self.scaling = alpha / r

    def forward(self, x):  # (..., d_in) -> (..., d_out)
        return self.base(x) + (x @ self.A.T @ self.B.T) * self.scaling


class AuthorsLoRA2(nn.Module):
    """The authors' forward (SPEC §1, §7; their SVDLinear.forward): the dense d_in × d_out update
    Q_outerᵀ Q_innerᵀ diag(λ) P_innerᵀ P_outerᵀ is built in every call, then
    h = W₀x + b + x · ΔWᵀ · α / (r + 1e-5)."""

    def __init__(self, base, r=8, k=8, alpha=16):
        super().__init__()
        self.base = base.requires_grad_(False)
        dev = base.weight.device
        self.Q_outer = nn.Parameter(torch.randn(k, base.in_features, device=dev)
                                    * 0.02)  # (k, d_in)                             lora_A
        self.Q_inner = nn.Parameter(torch.randn(r, k, device=dev) * 0.02)  # (r, k)  lora_B
        self.lambda_ = nn.Parameter(torch.randn(r, device=dev) * 0.1)  # (r,)        lora_E
        self.P_inner = nn.Parameter(torch.randn(k, r, device=dev) * 0.02)  # (k, r)  lora_aa
        self.P_outer = nn.Parameter(torch.randn(base.out_features, k, device=dev)
                                    * 0.02)  # (d_out, k)                            lora_bb
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
    inject_adapter_in_model(LoraConfig(r=r, lora_alpha=alpha, lora_dropout=0.0,
                                       target_modules=["lin"]), holder)
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
    """fp32 agreement of the re-implementations with the library layers on the same parameters
    (rel. error)."""
    mine, authors = variants["LoRA2Linear k=r=8"], variants["authors' dense ΔW"]
    for name in ("Q_outer", "Q_inner", "lambda_", "P_inner", "P_outer"):
        getattr(authors, name).copy_(getattr(mine, name))
    x = torch.randn(64, mine.in_features, device=device)
    checks = {}
    ref = mine(x)
    checks["authors' dense ΔW vs LoRA2Linear"] = ((authors(x) - ref).norm() / ref.norm()).item()
    checks["LoRA2Linear vs base + delta_weight()"] = ((mine.base(x) + x @ mine.delta_weight().T
                                                       - ref).norm() / ref.norm()).item()
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
            raise ValueError(f"check failed: merged vs unmerged LoRA2Linear: relative error "
                             f"{err:.3g}")
        act_dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        x = torch.randn(tokens, d, device=device, dtype=act_dtype)

        def infer(module):
            def call():
                with torch.no_grad(), autocast(device):
                    module(x)
            return call

        medians = interleaved_medians({"bare nn.Linear": infer(base),
                                       "merged LoRA2Linear": infer(mine)},
                                      device, cfg.layer_warmup, cfg.layer_reps, cfg.inner)
        rows = {name: dict(ms=ms) for name, ms in medians.items()}
        results.append(dict(d=d, tokens=tokens, rows=rows, check_merged_vs_unmerged=err))
        del base, mine, x
        free(device)
    return results


# --------------------------------------------------------------------------------------------------
# the whole training step as train_glue.py runs it, eager and compiled (issue 11)

STEP_NAMES = {"lora2": "LoRA² k=r=8 + γ·R + Pruner", "reference_lora": "minimal LoRA r=8",
              "peft_lora": "PEFT LoRA r=8"}
LAUNCH_APIS = ("cudaLaunchKernel", "cudaLaunchKernelExC", "cuLaunchKernel", "cuLaunchKernelEx",
               "cudaGraphLaunch", "cudaMemcpyAsync", "cudaMemsetAsync")


def step_shapes(args):
    """{label: (bert.BertConfig, batch, tokens)}: the packaged MiniLM (its config.json; random
    weights) at 32 × 64 and BERT-base at 32 × 128; --quick: a 2-layer, 32-wide BERT at 4 × 16."""
    if args.quick:
        return {"tiny 4×16": (bert.tiny_config(vocab_size=1000), 4, 16)}
    shapes = {}
    if "minilm" in args.shapes.split(","):
        minilm = bert.BertConfig.from_json(Path(args.model_dir or bert.default_model_dir())
                                           / "config.json")
        shapes["MiniLM 32×64"] = (minilm, 32, 64)
    if "bert-base" in args.shapes.split(","):
        shapes["BERT-base 32×128"] = (bert.BertConfig(), 32, 128)
    return shapes


def minimal_lora(model, r, alpha, targets):
    """ReferenceLoRA on the target matrices of `model`, the rest frozen but the head
    (lora2.HEAD)."""
    model.requires_grad_(False)
    for name, module in list(model.named_modules()):
        if isinstance(module, nn.Linear) and any(name == t or name.endswith("." + t)
                                                 for t in targets):
            parent, _, attr = name.rpartition(".")
            setattr(model.get_submodule(parent), attr, ReferenceLoRA(module, r, alpha))
    for name, p in model.named_parameters():
        p.requires_grad_(p.requires_grad or bool(set(name.split(".")) & set(lora2.HEAD)))
    return model


class TrainStep:
    """One row of the step setting: bert.py's classifier (random weights) with `kind` on the six
    matrices of every layer, stepped as train_glue.py steps: forward, loss + γ·R, backward, clip,
    AdamW (fused), the linear schedule, for LoRA² Pruner.step (scoring every step, masking every
    10th: t_i = 0, cubic phase), zero_grad; in `precision` (bf16 autocast or fp32, train_glue's
    --precision). backend None: eager; else through compiled.py (the blocks through torch.compile
    with `backend`, "none" for no torch.compile, and on CUDA the step replayed from a CUDA graph),
    exactly as train_glue.py --compile."""

    def __init__(self, kind, config, device, backend=None, precision="bf16"):
        import compiled
        import glue
        import rundir
        import train_glue

        torch.manual_seed(0)
        cfg = train_glue.Config(r=8, k=8, alpha=16, target_rank=4, steps=10_000, init_warmup=0.0,
                                final_warmup=0.3, mask_interval=10, gamma=0.1, lr=1e-4,
                                compile=backend is not None, compile_backend=backend or "none",
                                device=device.type, precision=precision)
        model = bert.BertForSequenceClassification(config, 2)
        self.pruner = None
        if kind == "lora2":
            lora2.inject(model, bert.TARGETS, r=cfg.r, k=cfg.k, alpha=cfg.alpha, init=cfg.init)
        elif kind == "peft_lora":
            from peft import LoraConfig, get_peft_model

            model = get_peft_model(model, LoraConfig(r=cfg.r, lora_alpha=cfg.alpha,
                                                     lora_dropout=0.0,
                                                     target_modules=list(bert.TARGETS)))
            for name, p in model.named_parameters():
                if set(name.split(".")) & set(lora2.HEAD):
                    p.requires_grad_(True)
                if ".lora_B." in name:
                    nn.init.normal_(p, std=0.02)  # B = 0 at init; time non-zero data
        else:
            model = minimal_lora(model, cfg.r, cfg.alpha, bert.TARGETS)
        self.name = STEP_NAMES[kind] + ("" if backend is None else f", compiled ({backend})") + (
            "" if device.type == "cuda" else f", {precision}")
        self.kind, self.backend, self.precision, self.t = kind, backend, precision, 1
        self.model = model = model.to(device).train()
        if kind == "lora2":
            self.pruner = lora2.Pruner(model, cfg.target_rank, cfg.steps, 0,
                                       round(cfg.final_warmup * cfg.steps), cfg.mask_interval)
        self.optimizer, self.scheduler, self.params = rundir.adamw(model, cfg.lr, cfg.weight_decay,
                                                                   cfg.warmup, cfg.steps)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer,
                                                           lambda t: min(1.0, (t + 1) / 600))

        def device_step(batch, labels):  # train_glue.py's, line for line
            with phase("forward"), compiled.autocast(device, precision):  # phase: the CPU profile's
                                                                          # labels
                logits = bert.logits(self.model(**batch))
            loss_task = glue.task_loss(logits, labels)
            with phase("regulariser"):
                reg = (lora2.orthogonal_regularizer(self.model, cross=cfg.cross) if kind == "lora2"
                       else torch.zeros((), device=device))
            with phase("backward"):
                (loss_task + cfg.gamma * reg).backward()
            with phase("clip"):
                torch.nn.utils.clip_grad_norm_(self.params, cfg.clip)
            with phase("AdamW"):
                self.optimizer.step()
            return loss_task.detach(), reg.detach()

        self.run = device_step if backend is None else compiled.step(device_step, model,
                                                                     self.optimizer,
                                                                     cfg.compile_backend)

    def step(self, batch, labels):
        self.run(batch, labels)
        self.scheduler.step()
        if self.pruner is not None:
            with phase("Pruner.step"):
                self.pruner.step(self.t)
        self.optimizer.zero_grad(set_to_none=True)
        self.t += 1


PHASES = ("forward", "regulariser", "backward", "clip", "AdamW", "Pruner.step")


def phase(name):
    """A torch.profiler label for one phase of a step (PHASES); the CPU profile adds them up."""
    return torch.profiler.record_function(f"phase: {name}")


def profile_steps(fn, device, n):
    """Per step, over n calls of fn under torch.profiler. CUDA: host launches (kernels, graphs,
    copies), device events and their total ms, and {kernel name: (count, us)} for the breakdown.
    CPU: ms per phase of the step (PHASES) and {operator: (count, self ms)} of the 15 costliest
    operators."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    if device.type != "cuda":
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(n):
                fn()
        events = prof.key_averages()
        phases = {e.key.removeprefix("phase: "): e.cpu_time_total / n / 1e3 for e in events
                  if e.key.startswith("phase: ")}
        ops = sorted((e for e in events if not e.key.startswith(("phase: ", "ProfilerStep"))),
                     key=lambda e: -e.self_cpu_time_total)[:15]
        return dict(phases={p: phases.get(p, 0.0) for p in PHASES},
                    top_ops={e.key: (e.count / n, e.self_cpu_time_total / n / 1e3) for e in ops})
    sync(device)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(n):
            fn()
        sync(device)
    events = prof.events()
    on_gpu = [e for e in events
              if e.device_type == DeviceType.CUDA and not getattr(e, "is_user_annotation", False)]
    launches = sum(1 for e in events if e.device_type == DeviceType.CPU and e.name in LAUNCH_APIS)
    by_name = {}
    for e in on_gpu:
        count, us = by_name.get(e.name, (0, 0.0))
        by_name[e.name] = (count + 1, us + e.time_range.elapsed_us())
    return dict(launches=launches / n, gpu_events=len(on_gpu) / n,
                kernel_ms=sum(us for _, us in by_name.values()) / n / 1e3,
                top={k: (c / n, us / n)
                     for k, (c, us) in sorted(by_name.items(), key=lambda kv: -kv[1][1])[:25]})


def kernel_class(name):
    """A coarse class of a GPU kernel, for where the time goes."""
    low = name.lower()
    for cls, keys in (("attention", ("fmha", "attention", "flash", "sdpa")),
                      ("matmul", ("gemm", "cutlass", "sm90_", "sm80_", "cublas", "xmma", "splitk",
                                  "nvjet")),
                      ("AdamW", ("adam",)), ("copy", ("memcpy", "memset", "copy")),
                      ("fused (inductor)", ("triton",)), ("reduction", ("reduce", "norm", "sum"))):
        if any(k in low for k in keys):
            return cls
    return "elementwise / other"


def bench_step(device, cfg, args):
    """The step setting: for each shape, eager and compiled rows of LoRA², the minimal LoRA and PEFT
    LoRA (and LoRA² as CUDA graphs of its eager kernels), all resident, timed in interleaved rounds;
    then launches, GPU time and host syncs per step. --budget_s: compiled rows not built once the
    setting has run that long (reported)."""
    _, peft_missing = optional("peft")
    kinds = [k for k in STEP_NAMES if not (k == "peft_lora" and peft_missing)]
    if device.type == "cuda":  # eager and compiled, bf16 autocast (train_glue.py's precision on
                               # CUDA)
        backend = args.backend or "inductor"
        plan = [(k, None, "bf16") for k in kinds] + [(k, backend, "bf16")
                                                     for k in ("lora2", "reference_lora")]
        plan += [("lora2", "none", "bf16")] if backend != "none" else []
    else:  # the CPU: fp32 (the default before --precision) and bf16 autocast, eager; compiled only
           # if asked
        plan = [(k, None, precision) for precision in ("fp32", "bf16") for k in kinds]
        plan += [(k, args.backend, "bf16") for k in kinds] if args.backend else []
    warmup, rounds = cfg.step_warmup, cfg.step_rounds
    startup = warm_compiler(device, plan)
    started, results = time.perf_counter(), []
    for label, (config, batch_size, tokens) in step_shapes(args).items():
        torch.manual_seed(2)
        batch = {"input_ids": torch.randint(1, config.vocab_size, (batch_size, tokens),
                                            device=device),
                 "attention_mask": torch.ones(batch_size, tokens, dtype=torch.long, device=device),
                 "token_type_ids": torch.zeros(batch_size, tokens, dtype=torch.long, device=device)}
        labels = torch.randint(0, 2, (batch_size,), device=device)
        built, rows, skipped = [], {}, []
        for kind, be, precision in plan:
            if be is not None and args.budget_s and time.perf_counter() - started > args.budget_s:
                skipped.append(f"{STEP_NAMES[kind]} ({be}): over --budget_s")
                continue
            log(f"step {label}: {STEP_NAMES[kind]}, {'eager' if be is None else be}, {precision}")
            t0 = time.perf_counter()
            try:
                case = TrainStep(kind, config, device, be, precision)
                for _ in range(warmup):  # compiled: compiles, 2 eager warm-up steps, the capture
                    case.step(batch, labels)
                sync(device)
            except Exception as e:  # a variant that fails is reported, the others still run
                traceback.print_exc()
                skipped.append(f"{STEP_NAMES[kind]} ({be or 'eager'}, {precision}): "
                               f"{type(e).__name__}: {str(e)[:200]}")
                free(device)
                continue
            rows[case.name] = dict(name=case.name, kind=kind, backend=be, precision=precision,
                                   times=[], warmup_s=time.perf_counter() - t0,
                                   trainable=sum(p.numel() for p in case.params))
            built.append(case)
        log(f"step {label}: {rounds} interleaved rounds")
        for _ in range(rounds):
            for case in built:
                rows[case.name]["times"].append(time_once(lambda: case.step(batch, labels), device))
        count_syncs(lambda: None, device)
        for case in built:
            row = rows[case.name]
            row["syncs"], row["sync_sites"] = count_syncs(lambda: case.step(batch, labels), device)
            while case.t % 10 != 1:  # compiled: profile 10 steps, one of them masking; eager: 5,
                                     # none masking
                case.step(batch, labels)
            n_prof = (2 if args.quick else 3 if device.type == "cpu" else 5 if case.backend is None
                      else 10)
            prof = profile_steps(lambda: case.step(batch, labels), device, n_prof)
            row.update(prof or {})
            row["step_ms"], row["mean_ms"] = (statistics.median(row["times"]),
                                              statistics.fmean(row["times"]))
            row["step_q1"], _, row["step_q3"] = statistics.quantiles(row["times"], n=4) \
                if len(row["times"]) > 1 else (row["step_ms"],) * 3
        results.append(dict(shape=label, batch=batch_size, tokens=tokens,
                            layers=config.num_hidden_layers, hidden=config.hidden_size,
                            rows=list(rows.values()), skipped=skipped, compiler_startup_s=startup))
        print("\n" + report_step(results[-1:], device), flush=True)  # each shape as soon as it is
                                                                     # measured
        if args.json:
            write_atomic(args.json + ".partial", json.dumps(results, indent=1, default=str))
        del built, batch, labels
        torch._dynamo.reset()
        free(device)
    return results


def warm_compiler(device, plan):
    """Seconds to compile and run a tiny function forward and backward with each backend of `plan`
    before any row is built: the compiler's one-time start (imports, worker processes), which would
    otherwise land on the first compiled row's build + warm-up time; a fresh train_glue.py pays it
    once (the e2e setting's warm-up includes it)."""
    t0 = time.perf_counter()
    for backend in sorted({be for _, be, _ in plan if be not in (None, "none")}):
        x = torch.randn(64, 64, device=device, requires_grad=True)
        torch.compile(lambda t: (t.sin() @ t).relu().sum(), backend=backend)(x).backward()
        sync(device)
    torch._dynamo.reset()
    return time.perf_counter() - t0


def bench_e2e(device, cfg, args):
    """train_glue.py end to end, one subprocess per (run length, mode, seed): its default SST-2 run
    (the packaged MiniLM or --model_dir, the shipped data) for each of --e2e_steps ("default": its
    own number of steps), progress every 100 steps. Process wall time (the figure that decides
    --compile's default), sustained steps/s from the progress lines after the first (each waits for
    the GPU: it prints the summed loss), warm-up = the time to the first line beyond what its steps
    take at that rate (compilation, capture), the dev accuracy from metrics.json."""
    import tempfile

    root = Path(__file__).resolve().parent.parent
    runs = []
    plan = [(steps, mode, int(seed)) for steps in args.e2e_steps.split(",")
            for mode in args.e2e_modes.split(",") for seed in args.e2e_seeds.split(",")]
    for steps, mode, seed in plan:
        out = Path(tempfile.mkdtemp(prefix=f"e2e-{steps}-{mode}-s{seed}-"))
        cmd = [sys.executable, str(root / "train_glue.py"), "--device", device.type, "--seed",
               str(seed), "--log_every", "100", "--out_dir", str(out), "--no_download",
               "--compile" if mode == "compiled" else "--no-compile"]
        cmd += [] if steps == "default" else ["--steps", steps]
        cmd += (["--model", args.model_dir] if args.model_dir else []) + (
            ["--compile_backend", args.backend] if args.backend and mode == "compiled" else [])
        log("e2e: " + " ".join(cmd[1:]))
        t_start, lines = time.perf_counter(), []
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                bufsize=1, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        for line in proc.stdout:
            lines.append((time.perf_counter() - t_start, line.rstrip("\n")))
            print("    " + line.rstrip("\n"), flush=True)
        proc.wait()
        run = dict(steps=steps, mode=mode, seed=seed, returncode=proc.returncode,
                   wall_s=time.perf_counter() - t_start, command="python " + " ".join(cmd[1:]))
        header = next((t for t, line in lines
                       if " steps (" in line and " on 1×" in line), None)  # the first line
        progress = [(t, int(line.split()[1].split("/")[0])) for t, line in lines
                    if line.startswith("step ")]
        if len(progress) >= 3 and header is not None:
            (t1, s1), (tn, sn) = progress[0], progress[-1]
            rate = (sn - s1) / (tn - t1)
            run.update(steps_per_s=rate, first_line_step=s1, warmup_s=(t1 - header) - s1 / rate,
                       loop_s=tn - header)
        metrics = out / "metrics.json"
        if metrics.exists():
            m = json.loads(metrics.read_text())
            run.update(accuracy=m["main_metric"], best_step=m["best_step"],
                       trained_wall_s=m["wall_s"])
        runs.append(run)
        if args.json:
            write_atomic(args.json + ".partial", json.dumps(runs, indent=1, default=str))
    return runs


# --------------------------------------------------------------------------------------------------
# report


def verdict(value, limit, lower_is_better=True):
    """"met (1.044 vs ≤ 1.05)" or "MISSED (...)": decided on the unrounded value, shown with as many
    digits (3 or more) as put the figure on the same side of the limit."""
    if value is None:
        return "not measured"
    def holds(x):
        return x <= limit if lower_is_better else x >= limit
    ok = holds(value)
    digits = next((d for d in range(3, 16) if holds(round(value, d)) == ok), 16)
    sign = "≤" if lower_is_better else "≥"
    return ("met" if ok else "MISSED") + f" ({value:.{digits}f} vs {sign} {limit})"


def report_layer(results, device):
    out = []
    for res in results:
        rows = res["rows"]
        ref, peft_row, mine = (rows["reference LoRA r=8"], rows.get("PEFT LoRA r=8"),
                               rows["LoRA2Linear k=r=8"])
        out.append(f"### One layer, forward + backward: d_in = d_out = {res['d']}, "
                   f"{res['tokens']:,} tokens, "
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
        out.append(markdown(["variant", "ms (median)", "time × ref LoRA", "time × PEFT LoRA",
                             "peak MiB", "extra MiB", "extra × ref LoRA",
                             "extra × PEFT LoRA"], table))
        limit = 1.05 if res["d"] >= 4096 else 1.25
        for other, r in (("reference LoRA", ref), ("PEFT LoRA", peft_row)):
            if r is None:
                continue
            out.append(f"- LoRA2Linear time / {other}: {verdict(mine['ms'] / r['ms'], limit)}")
            if device.type == "cuda":
                out.append(f"- LoRA2Linear extra memory / {other}: "
                           f"{verdict(mine['extra'] / r['extra'], limit)}; "
                           f"peak: {mine['peak'] / r['peak']:.3f}")
        out.append("- checks (fp32 relative error): "
                   + ", ".join(f"{k}: {v:.1e}" for k, v in res["checks"].items()))
    return "\n".join(out)


def report_merged(results, device):
    out = []
    for res in results:
        rows = res["rows"]
        base = rows["bare nn.Linear"]["ms"]
        out.append(f"### Merged LoRA2Linear vs bare nn.Linear, inference (no grad): "
                   f"d = {res['d']}, {res['tokens']:,} tokens, "
                   f"{'bf16 autocast' if device.type == 'cuda' else 'fp32'}")
        out.append(markdown(["variant", "ms (median)", "× bare nn.Linear"],
                            [[n, fmt(r["ms"], ".4f"), fmt(r["ms"] / base, ".3f")]
                             for n, r in rows.items()]))
        out.append(f"- merged / bare: {verdict(rows['merged LoRA2Linear']['ms'] / base, 1.02)}; "
                   f"merged vs unmerged output: rel. error {res['check_merged_vs_unmerged']:.1e}")
    return "\n".join(out)


def report_step(results, device):
    out = []
    for res in results:
        rows = res["rows"]
        by = {(r["kind"], r["backend"], r.get("precision", "bf16")): r for r in rows}
        out.append(f"### Whole training step as train_glue.py runs it: {res['shape']} "
                   f"({res['layers']} layers × 6 matrices, hidden {res['hidden']}), "
                   f"{'bf16 autocast' if device.type == 'cuda' else 'fp32 / bf16'}, fused AdamW, "
                   f"clip, schedule; medians of {len(rows[0]['times']) if rows else 0} "
                   f"interleaved rounds")
        table = []
        for r in rows:
            table.append([r["name"], fmt(r["step_ms"]), f"{fmt(r['step_q1'])}–{fmt(r['step_q3'])}",
                          fmt(r["mean_ms"]), fmt(r.get("kernel_ms")),
                          fmt(ratio(r["step_ms"], r.get("kernel_ms")), ".2f"),
                          fmt(r.get("launches"), ".0f"), fmt(r.get("gpu_events"), ".0f"),
                          "–" if r.get("syncs") is None else r["syncs"], fmt(r["warmup_s"], ".1f")])
        out.append(markdown(["variant", "wall ms / step (median)", "quartiles", "mean",
                             "GPU kernel ms / step", "wall × kernel", "launches / step",
                             "GPU kernels / step", "host syncs / step", "build + warm-up s"],
                            table))
        for line in res["skipped"]:
            out.append(f"- not measured: {line}")
        profiled = [r for r in rows if r.get("phases")]
        if profiled:
            out.append("\nWhere the time of a CPU step goes (torch.profiler over 3 steps; "
                       "ms per step by phase, then the costliest operators of the LoRA² rows "
                       "by self time):\n")
            out.append(markdown(["variant", *PHASES, "sum"],
                                [[r["name"], *(fmt(r["phases"][p], ".1f") for p in PHASES),
                                  fmt(sum(r["phases"].values()), ".1f")] for r in profiled]))
            for r in profiled:
                if r["kind"] == "lora2":
                    out.append(f"- {r['name']}: " + "; ".join(f"{k} {ms:.1f} ms ({c:.0f}×)"
                                                            for k, (c, ms) in r["top_ops"].items()))
        if (res.get("compiler_startup_s") or 0) > 0.05:
            out.append(f"- the compiler's one-time start (compiling a tiny function first: "
                       f"imports, worker processes) took {res['compiler_startup_s']:.1f} s before "
                       f"any row was built; a fresh train_glue.py pays it once (the e2e warm-ups "
                       f"include it)")
        fast, ref = (by.get(("lora2", args_backend(rows), "bf16")),
                     by.get(("reference_lora", args_backend(rows), "bf16")))
        slow, peft_eager = by.get(("lora2", None, "bf16")), by.get(("peft_lora", None, "bf16"))
        cpu_fp32 = by.get(("lora2", None, "fp32"))
        if cpu_fp32 and slow:
            out.append(f"- LoRA² eager steps/s, bf16 autocast / fp32: "
                       f"{verdict(cpu_fp32['step_ms'] / slow['step_ms'], 1.3, False)}")
        if fast:
            out.append(f"- LoRA² compiled build + warm-up: {verdict(fast['warmup_s'], 30)} s")
        if fast and ref:
            out.append(f"- LoRA² compiled / minimal LoRA compiled: "
                       f"{verdict(fast['step_ms'] / ref['step_ms'], 1.15)}")
        if fast and fast.get("kernel_ms"):
            out.append(f"- LoRA² compiled wall / its GPU kernel time: "
                       f"{verdict(fast['step_ms'] / fast['kernel_ms'], 1.3)}")
        if fast and slow:
            out.append(f"- LoRA² eager / LoRA² compiled: "
                       f"{verdict(slow['step_ms'] / fast['step_ms'], 5, False)}")
        if fast and peft_eager:
            out.append(f"- LoRA² compiled / PEFT LoRA eager: "
                       f"{verdict(fast['step_ms'] / peft_eager['step_ms'], 0.25)}")
        if fast and fast.get("top"):
            classes = {}
            for name, (count, us) in fast["top"].items():
                c = classes.setdefault(kernel_class(name), [0, 0.0])
                c[0], c[1] = c[0] + count, c[1] + us
            out.append(f"- where {fast['name']}'s GPU time goes (top 25 kernel names, per step): "
                       + "; ".join(f"{cls} {us / 1e3:.2f} ms in {count:.0f} kernels"
                                   for cls, (count, us)
                                   in sorted(classes.items(), key=lambda kv: -kv[1][1])))
    return "\n".join(out)


def args_backend(rows):
    """The main compiled backend of a step table (the first compiled row's)."""
    return next((r["backend"] for r in rows if r["backend"] not in (None, "none")), "none")


def report_e2e(runs):
    table = [[r.get("steps", "–"), r["mode"], r["seed"], fmt(r.get("steps_per_s"), ".1f"),
              fmt(r.get("warmup_s"), ".1f"), fmt(r.get("wall_s"), ".0f"),
              fmt(r.get("accuracy"), ".4f"), r["returncode"]] for r in runs]
    out = ["### train_glue.py end to end: its default SST-2 run, MiniLM, batch 32",
           markdown(["steps", "mode", "seed", "steps/s sustained", "warm-up s (compile, capture)",
                     "process wall s", "dev accuracy", "exit"], table)]
    for steps in dict.fromkeys(r.get("steps") for r in runs):
        by = {r["mode"]: r for r in runs
              if r.get("steps") == steps and r["seed"] == runs[0]["seed"]}
        if "eager" in by and "compiled" in by:
            out.append(f"- {steps} steps: compiled process wall / eager: "
                       f"{verdict(by['compiled']['wall_s'] / by['eager']['wall_s'], 1.0)}")
    out += [f"- `python train_glue.py{r['command'].split('train_glue.py', 1)[1]}`" for r in runs]
    return "\n".join(out)


def environment(device):
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo")
                if line.startswith("model name")),
               platform.processor()) if os.path.exists("/proc/cpuinfo") else platform.processor()
    env = dict(python=platform.python_version(), torch=torch.__version__,
               platform=platform.platform(), cpu=cpu, cpu_count=os.cpu_count(),
               torch_threads=torch.get_num_threads(),
               cpu_capability=torch.backends.cpu.get_cpu_capability())
    for name in ("transformers", "peft"):
        mod, _ = optional(name)
        env[name] = getattr(mod, "__version__", None)
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
        env["cuda"] = torch.version.cuda
    return env


HERE = Path(__file__).resolve().parent
RAW_FILES = ("bench-h200.json", "bench-cpu.json")  # what BENCHMARKS.md is made from, in its order
LLM_FILE = "bench-llm.json"  # experiments/bench_llm.py's raw file: its own section, last
LLM_TARGETS = {"llama-8b": 1.05, "llama-1b": 1.10}  # lora2+R+P step ≤ this × peft_lora's (issue 26)


def run_settings(device, only, args):
    """Measure the settings of `only`; print each table as it is done; return everything
    measured."""
    cfg = config_for(device, args.quick)
    env = environment(device)
    command = "python " + " ".join([f"experiments/{os.path.basename(sys.argv[0])}"] + sys.argv[1:])
    print("## Environment\n" + "\n".join(f"- {k}: {v}" for k, v in env.items())
          + f"\n- command: {command}", flush=True)
    results = dict(environment=env, config=asdict(cfg), device=str(device), command=command)
    t0 = time.perf_counter()
    for name, bench in (("step", bench_step), ("e2e", bench_e2e), ("layer", bench_layer),
                        ("merged", bench_merged)):
        if name in only:
            results[name] = bench(device, cfg, args)
            print("\n" + report_setting(name, results[name], device), flush=True)
    results["wall_s"] = time.perf_counter() - t0
    print(f"\n(total {results['wall_s']:.0f} s)", flush=True)
    return results


def report_setting(name, result, device):
    return {"step": report_step, "e2e": lambda r, d: report_e2e(r), "layer": report_layer,
            "merged": report_merged}[name](result, device)


def find_row(rows, kind, backend, precision="bf16"):
    return next((r for r in rows if r["kind"] == kind and r["backend"] == backend
                 and r.get("precision", "bf16") == precision), None)


def targets(files):
    """The targets table: [target, measured, verdict] rows from the raw files' step, e2e and layer
    settings."""
    rows = []
    h200, cpu = files.get("bench-h200.json"), files.get("bench-cpu.json")
    for res in (h200 or {}).get("step", []):
        fast, ref = (find_row(res["rows"], "lora2", "inductor"),
                     find_row(res["rows"], "reference_lora", "inductor"))
        if fast and ref:
            rows.append([f"{res['shape']}: LoRA² compiled step ≤ 1.15× a compiled "
                         f"minimal LoRA step",
                         f"{fast['step_ms']:.2f} / {ref['step_ms']:.2f} ms",
                         verdict(fast["step_ms"] / ref["step_ms"], 1.15)])
        if fast and fast.get("kernel_ms"):
            rows.append([f"{res['shape']}: LoRA² compiled wall ≤ 1.3× its GPU kernel time",
                         f"{fast['step_ms']:.2f} / {fast['kernel_ms']:.2f} ms",
                         verdict(fast["step_ms"] / fast["kernel_ms"], 1.3)])
        if fast:
            rows.append([f"{res['shape']}: LoRA² compiled warm-up ≤ 30 s (build + first steps: "
                         f"compile, capture)",
                         f"{fast['warmup_s']:.1f} s (minimal LoRA {ref['warmup_s']:.1f} s)"
                         if ref else "",
                         verdict(fast["warmup_s"], 30)])
    runs = (h200 or {}).get("e2e", [])
    for steps in dict.fromkeys(r.get("steps") for r in runs):
        by = {r["mode"]: r for r in runs if r.get("steps") == steps}
        if "eager" in by and "compiled" in by:
            rows.append([f"train_glue.py, {steps} steps: compiled process wall < eager",
                         f"{by['compiled']['wall_s']:.0f} / {by['eager']['wall_s']:.0f} s",
                         verdict(by["compiled"]["wall_s"] / by["eager"]["wall_s"], 1.0)])
    for res in (cpu or {}).get("step", []):
        fp32, bf16 = (find_row(res["rows"], "lora2", None, "fp32"),
                      find_row(res["rows"], "lora2", None, "bf16"))
        if fp32 and bf16:
            rows.append([f"CPU, {res['shape']}: the default LoRA² step (bf16 autocast) "
                         f"≥ 1.3× fp32 steps/s",
                         f"{fp32['step_ms']:.0f} / {bf16['step_ms']:.0f} ms",
                         verdict(fp32["step_ms"] / bf16["step_ms"], 1.3, False)])
    for res in (cpu or {}).get("layer", []):
        mine, ref = res["rows"]["LoRA2Linear k=r=8"], res["rows"]["reference LoRA r=8"]
        rows.append([f"CPU, one layer d={res['d']}: LoRA2Linear ≤ 1.0× the reference LoRA's time",
                     f"{mine['ms']:.2f} / {ref['ms']:.2f} ms",
                     verdict(mine["ms"] / ref["ms"], 1.0)])
    return rows


def time_by_class(row):
    """{kernel class: (count, ms)} per step from a row's top kernels, the rest as "other (outside
    the top 25)"."""
    classes = {}
    for name, (count, us) in row.get("top", {}).items():
        c = classes.setdefault(kernel_class(name), [0.0, 0.0])
        c[0], c[1] = c[0] + count, c[1] + us / 1e3
    rest = row["kernel_ms"] - sum(ms for _, ms in classes.values())
    classes["other (outside the top 25 names)"] = [row["gpu_events"]
                                                   - sum(n for n, _ in classes.values()), rest]
    return classes


def where_the_time_goes(res):
    """LoRA² compiled against the compiled minimal LoRA: GPU time and kernels per step by class of
    kernel."""
    fast, ref = (find_row(res["rows"], "lora2", "inductor"),
                 find_row(res["rows"], "reference_lora", "inductor"))
    if not (fast and ref and fast.get("top") and ref.get("top")):
        return ""
    a, b = time_by_class(fast), time_by_class(ref)
    table = [[c, f"{a.get(c, [0, 0])[1]:.3f} ({a.get(c, [0, 0])[0]:.0f})",
              f"{b.get(c, [0, 0])[1]:.3f} ({b.get(c, [0, 0])[0]:.0f})",
              f"{a.get(c, [0, 0])[1] - b.get(c, [0, 0])[1]:+.3f}"]
             for c in sorted(set(a) | set(b), key=lambda c: -a.get(c, [0, 0])[1])]
    table.append(["all", f"{fast['kernel_ms']:.3f} ({fast['gpu_events']:.0f})",
                  f"{ref['kernel_ms']:.3f} ({ref['gpu_events']:.0f})",
                  f"{fast['kernel_ms'] - ref['kernel_ms']:+.3f}"])
    return (f"Where the GPU time of a compiled step goes, {res['shape']} (ms per step, kernels in "
            f"brackets; torch.profiler over 10 steps, one of them masking):\n\n"
            + markdown(["kernels", "LoRA² compiled", "minimal LoRA compiled", "difference"], table))


def write_report(path=HERE / "BENCHMARKS.md"):
    """BENCHMARKS.md from the committed raw files (RAW_FILES): every figure in it is in one of
    them."""
    lines = ["# Benchmarks: what LoRA² costs per step", "",
             "Generated by `python experiments/bench.py --report` from the raw files beside it "
             + ", ".join(f"[{name}]({name})" for name in (*RAW_FILES, LLM_FILE)
                         if (HERE / name).exists())
             + "; each section names the command that measured it, and rerunning that command "
             "measures again. Ratios between rows of one file are what carry over to another "
             "machine; absolute times depend on the host, so compare figures only within a "
             "file.", ""]
    files = {name: json.loads((HERE / name).read_text()) for name in RAW_FILES
             if (HERE / name).exists()}
    lines += ["## Targets", "", markdown(["target", "measured", "verdict"], targets(files)), ""]
    for name, results in files.items():
        device = torch.device("cuda" if results["device"].startswith("cuda") else "cpu")
        env = results["environment"]
        where = (env.get("gpu")
                 or f"{env['cpu_count']} CPU cores ({env.get('cpu', platform.processor())})")
        lines += [f"## {where}: `{results['command']}`", "",
                  "- " + "; ".join(f"{k} {v}" for k, v in env.items() if v is not None), ""]
        for setting in SETTINGS:
            if setting in results:
                lines += [report_setting(setting, results[setting], device), ""]
            if setting == "step" and device.type == "cuda":
                lines += [text + "\n" for text in map(where_the_time_goes, results.get("step", []))
                          if text]
    if (HERE / LLM_FILE).exists():
        lora2_sha256 = hashlib.sha256(Path(lora2.__file__).read_bytes()).hexdigest()
        lines += [report_llm(json.loads((HERE / LLM_FILE).read_text()), lora2_sha256), ""]
    write_atomic(path, "\n".join(lines))
    print(f"wrote {path}")


def report_llm(results, lora2_sha256):
    """The section of experiments/bench_llm.py's raw file: a table per shape (step ms, × peft_lora,
    peak GiB) and issue 26's targets, met or MISSED; stale when lora2.py changed since the run."""
    rows, cfg, sha = results["rows"], results["settings"], results["lora2_sha256"]
    out = [f"## LLM shapes, one {results['device']}: `{results['command']}`", "",
           f"- torch {results['torch']}; transformers {results['transformers']}; peft "
           f"{results['peft']}; commit {results['commit']}; lora2.py sha256 {sha[:12]}",
           f"- random-weight Llama shapes, bf16 weights, bf16 autocast, eager, batch "
           f"{cfg['batch']} × {cfg['seq']}, all seven linear layer kinds adapted, r = k = "
           f"{cfg['r']}, α = {cfg['alpha']}, fused AdamW, clip {cfg['clip']}, γ = {cfg['gamma']}; "
           f"pruners in their cubic phase, masking every {cfg['mask_interval']} steps; medians "
           f"over {cfg['rounds']} interleaved rounds of {cfg['steps']} timed steps"]
    if sha != lora2_sha256:
        out.append(f"- **stale**: measured with another lora2.py than the current one (sha256 "
                   f"{sha[:12]} vs {lora2_sha256[:12]}); rerun the command")
    for shape in dict.fromkeys(r["shape"] for r in rows):
        by = {r["variant"]: r for r in rows if r["shape"] == shape}
        lora = by.get("peft_lora", {})
        table = [[v, fmt(r["step_ms"]), fmt(ratio(r["step_ms"], lora.get("step_ms")), ".3f"),
                  fmt(r.get("peak_gib")), len(r["step_ms_all"]), fmt(r.get("warmup_s"), ".1f")]
                 for v, r in by.items()]
        arch = cfg["shapes"][shape]
        headers = ["variant", "step ms (median)", "× peft_lora", "peak GiB", "timed steps",
                   "build + warm-up s"]
        out += ["", f"### {shape}: {arch['num_hidden_layers']} layers, hidden "
                f"{arch['hidden_size']}", "", markdown(headers, table)]
        if shape in LLM_TARGETS:
            limit = LLM_TARGETS[shape]
            out += ["", target_line(f"lora2+R+P step ≤ {limit}× peft_lora's", by, "lora2+R+P",
                                "peft_lora", "step_ms", "ms", limit),
                    target_line("lora2+R+P peak memory ≤ peft_lora's", by, "lora2+R+P",
                                "peft_lora", "peak_gib", "GiB", 1.0),
                    target_line("peft_adalora step ≥ 1.6× lora2+R+P's", by, "peft_adalora",
                                "lora2+R+P", "step_ms", "ms", 1.6, False)]
    return "\n".join(out)


def target_line(target, by, variant, other, key, unit, limit, lower_is_better=True):
    """"- target: a / b unit, met (ratio vs limit)" for by[variant][key] / by[other][key]."""
    a, b = by.get(variant, {}).get(key), by.get(other, {}).get(key)
    if a is None or not b:
        return f"- {target}: not measured"
    return f"- {target}: {a:.2f} / {b:.2f} {unit}, {verdict(a / b, limit, lower_is_better)}"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto")
    parser.add_argument("--only", default=None,
                        help=f"comma-separated subset of {','.join(SETTINGS)} (default: step,e2e "
                             f"on CUDA, step,layer,merged on the CPU)")
    parser.add_argument("--report", action="store_true",
                        help="write BENCHMARKS.md from the committed JSON files")
    parser.add_argument("--quick", action="store_true",
                        help="tiny shapes and few repetitions: a smoke run")
    parser.add_argument("--json", default=None, help="also write every figure to this JSON file")
    parser.add_argument("--backend", default=None,
                        choices=("inductor", "aot_eager", "eager", "none"),
                        help="step/e2e: the compiled rows' torch.compile backend (default: "
                             "inductor on CUDA, no compiled rows on the CPU; none: CUDA graphs of "
                             "the eager kernels)")
    parser.add_argument("--model_dir", default=None,
                        help="step/e2e: the MiniLM folder (default: the packaged one)")
    parser.add_argument("--budget_s", type=float, default=None,
                        help="step: build no compiled row after this long")
    parser.add_argument("--shapes", default=None,
                        help="step: minilm and/or bert-base (default: both on CUDA, "
                             "minilm on the CPU)")
    parser.add_argument("--e2e_modes", default="eager,compiled", help="e2e: eager and/or compiled")
    parser.add_argument("--e2e_seeds", default="0", help="e2e: comma-separated seeds")
    parser.add_argument("--e2e_steps", default="default,600",
                        help="e2e: comma-separated run lengths (default: train_glue.py's own)")
    args = parser.parse_args(argv)
    if args.report:
        return write_report()
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: torch sees no CUDA device")
    device = torch.device(args.device)
    only = args.only.split(",") if args.only else (
        ["step", "e2e"] if device.type == "cuda" else ["step", "layer", "merged"])
    args.shapes = args.shapes or ("minilm,bert-base" if device.type == "cuda" else "minilm")
    if set(args.shapes.split(",")) - {"minilm", "bert-base"}:
        raise SystemExit(f"--shapes: {args.shapes!r}; choose from minilm, bert-base")
    unknown = sorted(set(only) - set(SETTINGS))
    if unknown:
        raise SystemExit(f"--only: unknown setting(s) {unknown}; choose from {list(SETTINGS)}")
    results = run_settings(device, only, args)
    if args.json:
        write_atomic(args.json, json.dumps(results, indent=1, default=str))


def write_atomic(path, text):
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    formats.atomic_write(path, text)


if __name__ == "__main__":
    main()
