"""What LoRA² costs per training step on LLM shapes, against PEFT's LoRA and AdaLoRA (issue 26).

Random-weight Llama models built from a transformers LlamaConfig on the device (no download): bf16
weights, bf16 autocast, eager, a batch of 4 × 512 random tokens, the causal-LM loss (labels = the
tokens), all seven linear layer kinds adapted, r = k = 8, α = 16, fused AdamW over the trainable
parameters, clip_grad_norm_ 1.0. Variants:

    peft_lora      PEFT LoraConfig(r=8, lora_alpha=16)
    peft_adalora   PEFT AdaLoraConfig(init_r=8, target_r=2, orth_reg_weight=0.1, deltaT=100): its
                   forward adds its regulariser (it needs .loss, hence the labels);
                   update_and_allocate(t) at every step, in its cubic phase
    lora2          lora2.inject only
    lora2+R        loss + 0.1 · lora2.orthogonal_regularizer(model)            (L3)
    lora2+P        lora2.Pruner(..., mask_interval=100).step(t) at every step,
                   in its cubic phase                                          (L5)-(L8)
    lora2+R+P      both
    *_compiled     with --compile: torch.compile(model) for peft_lora and lora2+R+P

One step, as SPEC.md §4: forward -> loss = task + γ·R -> backward -> clip -> optimizer.step() ->
pruner.step(t) (or update_and_allocate(t)) -> zero_grad(set_to_none=True). The base model is built
once per shape; each variant is added to it and removed again, so two copies never coexist.
Timing: interleaved rounds (each round builds every variant, runs warm-up steps, then times steps,
the device synchronised before and after each); a row's step_ms is the median over all its rounds'
timed steps. peak_gib: torch.cuda.max_memory_allocated over the variant's steps (stats reset after
it is built), the highest over rounds. The JSON is rewritten after every variant of every round.

    python experiments/bench_llm.py --json experiments/bench-llm.json  # one GPU, both Llama shapes
    python experiments/bench_llm.py --shapes tiny --seq 16 --steps 2    # a smoke run, CPU too
    python experiments/bench.py --report  # BENCHMARKS.md, with a section from bench-llm.json
"""
import argparse
import gc
import hashlib
import json
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # the repository root: lora2.py
import formats  # noqa: E402
import lora2  # noqa: E402

LLAMA = dict(num_attention_heads=32, num_key_value_heads=8, vocab_size=128256)
SHAPES = {  # LlamaConfig arguments; llama-1b is Llama 3.2 1B's shape, llama-8b Llama 3.1 8B's
    "tiny": dict(hidden_size=64, num_hidden_layers=2, intermediate_size=128, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=1000),
    "llama-1b": dict(hidden_size=2048, num_hidden_layers=16, intermediate_size=8192,
                     tie_word_embeddings=True, **LLAMA),
    "llama-8b": dict(hidden_size=4096, num_hidden_layers=32, intermediate_size=14336, **LLAMA),
}
VARIANTS = ("peft_lora", "peft_adalora", "lora2", "lora2+R", "lora2+P", "lora2+R+P")
COMPILED = ("peft_lora_compiled", "lora2+R+P_compiled")
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
R, K, ALPHA, TARGET_RANK, GAMMA, LR, CLIP = 8, 8, 16, 2, 0.1, 1e-4, 1.0
# The pruning schedule of both pruners: the timed steps run at global steps FIRST_TIMED, ... inside
# the cubic phase (t_i < t <= T - t_f), the first of them a masking step (t % MASK_INTERVAL == 0).
TOTAL_STEPS, INIT_WARMUP, FINAL_WARMUP, MASK_INTERVAL, FIRST_TIMED = 1000, 10, 500, 100, 100


def build_base(shape, device):
    """A random-weight LlamaForCausalLM of `shape` in bf16 on `device`, frozen, in train mode."""
    from transformers import LlamaConfig, LlamaForCausalLM
    with torch.device(device):
        model = LlamaForCausalLM._from_config(LlamaConfig(**SHAPES[shape]), dtype=torch.bfloat16)
    return model.requires_grad_(False).train()


def adapt(model, variant):
    """Add `variant`'s adapters to `model` in place. Returns (net to call, regularise?,
    after_step(t) or None, remove()); remove() takes the adapters out, leaving `model` as it was."""
    compile_it = variant.endswith("_compiled")
    variant = variant.removesuffix("_compiled")
    if variant.startswith("peft"):
        import peft
        common = dict(target_modules=TARGETS, lora_alpha=ALPHA, task_type="CAUSAL_LM")
        if variant == "peft_lora":
            config = peft.LoraConfig(r=R, **common)
        else:
            config = peft.AdaLoraConfig(init_r=R, target_r=TARGET_RANK, tinit=INIT_WARMUP,
                                        tfinal=FINAL_WARMUP, deltaT=MASK_INTERVAL,
                                        total_step=TOTAL_STEPS, orth_reg_weight=GAMMA, **common)
        net = peft.get_peft_model(model, config)
        after = net.base_model.update_and_allocate if variant == "peft_adalora" else None
        return (torch.compile(net) if compile_it else net), False, after, net.unload
    lora2.inject(model, TARGETS, r=R, k=K, alpha=ALPHA)  # as lora2's docstring shows
    pruner = None
    if "+P" in variant:
        pruner = lora2.Pruner(model, target_rank=TARGET_RANK, total_steps=TOTAL_STEPS,
                              init_warmup=INIT_WARMUP, final_warmup=FINAL_WARMUP,
                              mask_interval=MASK_INTERVAL)

    @torch.no_grad()
    def remove():  # λ = 0 gives ΔW = 0 (L1): merge_and_unload puts each base layer back unchanged
        if pruner is not None:
            pruner.close()
        for m in lora2.lora2_modules(model).values():
            m.lambda_.zero_()
        lora2.merge_and_unload(model)
    net = torch.compile(model) if compile_it else model
    return net, "+R" in variant, pruner.step if pruner else None, remove


def train_step(net, optimizer, params, batch, regularise, after_step, t):
    """One step in SPEC.md §4's order; returns the loss."""
    with torch.autocast(batch.device.type, dtype=torch.bfloat16):
        loss = net(input_ids=batch, labels=batch).loss  # task loss (+ AdaLoRA's own R)
        if regularise:
            loss = loss + GAMMA * lora2.orthogonal_regularizer(net)  # task + γ·R (L3)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, CLIP)
    optimizer.step()
    if after_step is not None:
        after_step(t)  # pruner.step(t) (L5)-(L8) or AdaLoRA's update_and_allocate(t)
    optimizer.zero_grad(set_to_none=True)
    return loss


def sync(device):
    """Wait for the GPU's queued work (a no-op on the CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def free(device):
    """Give the GPU memory of what is gone back (the next variant's peak starts from the base)."""
    if device.type == "cuda":
        gc.collect()
        torch.cuda.empty_cache()


def run_variant(model, variant, batch, warmup, steps):
    """Adapt `model`, run warmup + steps training steps, remove the adapters. Returns the timed
    steps' milliseconds, the peak GiB (CUDA; else None), the seconds to build and warm up, and the
    last loss."""
    device = batch.device
    t0 = time.perf_counter()
    net, regularise, after_step, remove = adapt(model, variant)
    params = [p for p in net.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=LR, fused=True)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for i in range(warmup + steps):
        sync(device)
        start = time.perf_counter()
        loss = train_step(net, optimizer, params, batch, regularise, after_step,
                          FIRST_TIMED - warmup + i)
        sync(device)
        if i >= warmup:
            times.append((time.perf_counter() - start) * 1e3)
        else:
            warmup_s = time.perf_counter() - t0
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    loss = loss.item()
    remove()
    if variant.endswith("_compiled"):
        torch._dynamo.reset()  # the next build compiles afresh instead of piling up guards
    del net, params, optimizer, after_step, remove
    free(device)
    return times, peak, warmup_s, loss


def run(args, device, on_row):
    """Measure every (shape, variant) in interleaved rounds; call on_row(rows) after each one."""
    rows = []
    for shape in args.shapes:
        model = build_base(shape, device)
        gen = torch.Generator(device).manual_seed(0)
        batch = torch.randint(model.config.vocab_size, (args.batch, args.seq), device=device,
                              generator=gen)
        by_name = {}
        for rnd in range(args.rounds):
            for variant in args.variants:
                times, peak, warmup_s, loss = run_variant(model, variant, batch, args.warmup,
                                                          args.steps)
                if not math.isfinite(loss):
                    raise SystemExit(f"{shape} {variant}: the loss is {loss}, not finite")
                row = by_name.get(variant)
                if row is None:
                    row = by_name[variant] = dict(shape=shape, variant=variant, step_ms_all=[],
                                                  peak_gib=None)
                    rows.append(row)
                row["step_ms_all"] += [round(ms, 3) for ms in times]
                row["step_ms"] = statistics.median(row["step_ms_all"])
                if peak is not None:
                    row["peak_gib"] = max(peak, row.get("peak_gib") or 0.0)
                row.update(rounds=rnd + 1, warmup_s=round(warmup_s, 2), loss=loss)
                print(f"{shape:9s} round {rnd + 1}/{args.rounds}  {variant:20s} "
                      f"median {statistics.median(times):8.2f} ms  "
                      f"peak {'-' if peak is None else f'{peak:.2f} GiB'}  "
                      f"build + warm-up {warmup_s:.1f} s  loss {loss:.3f}", flush=True)
                on_row(rows)
        del model, batch
        free(device)
    return rows


def header(args, argv, device):
    """The raw file's facts about the machine, the software and the settings."""
    import peft
    import transformers
    commit = None  # HEAD, where its lora2.py is the one measured (a copied tree's .git may lag)
    if (ROOT / ".git").exists():
        try:
            same = subprocess.run(["git", "diff", "--quiet", "HEAD", "--", "lora2.py"], cwd=ROOT)
            if same.returncode == 0:
                commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True,
                                        text=True, check=True).stdout.strip()
        except (OSError, subprocess.CalledProcessError):
            pass
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    settings = dict(shapes={s: SHAPES[s] for s in args.shapes}, variants=args.variants,
                    rounds=args.rounds, warmup=args.warmup, steps=args.steps, batch=args.batch,
                    seq=args.seq, targets=TARGETS, r=R, k=K, alpha=ALPHA, target_rank=TARGET_RANK,
                    gamma=GAMMA, lr=LR, clip=CLIP, total_steps=TOTAL_STEPS,
                    init_warmup=INIT_WARMUP, final_warmup=FINAL_WARMUP,
                    mask_interval=MASK_INTERVAL, first_timed_step=FIRST_TIMED,
                    dtype="bfloat16 weights, bfloat16 autocast", optimizer="AdamW(fused=True)")
    return {"device": name, "torch": torch.__version__, "transformers": transformers.__version__,
            "peft": peft.__version__, "lora2_sha256": lora2_sha256(), "commit": commit,
            "command": " ".join(["python", "experiments/bench_llm.py", *argv]),
            "settings": settings, "rows": []}


def lora2_sha256():
    """The sha256 of the lora2.py measured: the report calls the file stale when it differs."""
    return hashlib.sha256((ROOT / "lora2.py").read_bytes()).hexdigest()


def parse_args(argv):
    """The flags, checked before anything is built; a bad one is a one-line error."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", default="llama-1b,llama-8b",
                        help=f"comma-separated, from {', '.join(SHAPES)}")
    parser.add_argument("--rounds", type=int, default=2, help="interleaved rounds")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps a variant and round")
    parser.add_argument("--steps", type=int, default=10, help="timed steps a variant and round")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=512, help="tokens a sequence")
    parser.add_argument("--compile", action="store_true",
                        help=f"also the rows {', '.join(COMPILED)} (torch.compile(model))")
    parser.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto")
    parser.add_argument("--json", default=None, help="write the raw figures to this file")
    args = parser.parse_args(argv)
    args.shapes = [s for s in args.shapes.split(",") if s]
    unknown = [s for s in args.shapes if s not in SHAPES]
    if unknown or not args.shapes:
        parser.error(f"--shapes: unknown {unknown or args.shapes}; choose from {', '.join(SHAPES)}")
    for flag, low in (("rounds", 1), ("steps", 1), ("batch", 1), ("seq", 2), ("warmup", 1)):
        if getattr(args, flag) < low:
            parser.error(f"--{flag} must be >= {low}, got {getattr(args, flag)}")
    most_warmup = FIRST_TIMED - INIT_WARMUP - 1
    most_steps = TOTAL_STEPS - FINAL_WARMUP - FIRST_TIMED
    if args.warmup > most_warmup or args.steps > most_steps:
        parser.error(f"--warmup must be <= {most_warmup} and --steps <= {most_steps}: every step "
                     f"must fall in the pruners' cubic phase")
    if args.json and os.path.isdir(args.json):
        parser.error(f"--json {args.json}: a folder; give a file name, e.g. "
                     f"{os.path.join(args.json, 'bench-llm.json')}")
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: torch sees no CUDA device")
    if args.device == "cpu" and set(args.shapes) - {"tiny"}:
        parser.error(f"--shapes {','.join(args.shapes)}: the Llama shapes need a CUDA device; use "
                     f"--shapes tiny on the CPU")
    args.variants = list(VARIANTS) + (list(COMPILED) if args.compile else [])
    return args


def main(argv=None):
    """Measure, printing a line per variant and round, and rewrite --json after each."""
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    for name in ("transformers", "peft"):
        try:
            __import__(name)
        except ImportError as e:
            raise SystemExit(f"bench_llm.py needs {name} ({e}): pip install {name}")
    device = torch.device(args.device)
    results = header(args, argv, device)
    print(f"# {results['device']}, torch {results['torch']}, transformers "
          f"{results['transformers']}, peft {results['peft']}: {results['command']}", flush=True)

    def on_row(rows):
        results["rows"] = rows
        if args.json:
            os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
            formats.atomic_write(args.json, json.dumps(results, indent=1) + "\n")
    on_row([])  # the file exists (without rows) before the first measurement
    t0 = time.perf_counter()
    run(args, device, on_row)
    wrote = f"; wrote {args.json}" if args.json else ""
    print(f"# done in {time.perf_counter() - t0:.0f} s{wrote}", flush=True)


if __name__ == "__main__":
    main()
