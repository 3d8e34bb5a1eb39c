"""What a train_glue.py run keeps in its --out_dir: checkpoints, resume, and the final report.

- adapter.pt: the best evaluation's adapter + head and its config (`--eval_only --load` rebuilds the model from it);
- train_state.pt: everything `--resume` needs to continue exactly (weights, optimiser, schedule, pruner, RNG, best);
- metrics.json, the printed summary, the rank pattern as a text heatmap (and rank_pattern.png with --plot).
Every file is written atomically (lora2.atomic_write): a killed run leaves the previous version, never half a file.
Not here: the training loop and the method (train_glue.py, lora2.py).
"""
import dataclasses
import json
import math
import re
import sys

import numpy as np
import torch

import bert
import glue
import lora2

# ----------------------------------------------------------------------------------------------------------------------
# checkpoints

RUN_CONTROL = {  # flags that may differ when a run resumes: they change where and how it runs, not what it computes
    "data_dir", "no_download", "out_dir", "save_every", "resume", "log_every", "export_peft", "plot", "device",
    "compile", "compile_backend"}


def torch_save(obj, path):
    """torch.save, atomically."""
    lora2.atomic_write(path, lambda f: torch.save(obj, f))


def save_train_state(path, cfg, method, optimizer, scheduler, device, run):
    """train_state.pt: config, run state (step, elapsed, best, last metrics), weights, optimiser, schedule, pruner, RNG."""
    rng = {"torch": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None}
    torch_save({"config": dataclasses.asdict(cfg), **run, "model": method.trained_state(), "rng": rng,
                "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                "pruner": method.state_dict()}, path)


def load_train_state(path, cfg, method, optimizer, scheduler, device):
    """Restore what save_train_state wrote, after checking it was written with the same settings."""
    ck = torch.load(path, map_location=device, weights_only=True)
    changed = {k for k, v in dataclasses.asdict(cfg).items() if k not in RUN_CONTROL and ck["config"][k] != v}
    if changed:
        raise ValueError(f"--resume: {path} was written with other settings: "
                         + ", ".join(f"--{k} {ck['config'][k]} (now {getattr(cfg, k)})" for k in sorted(changed)))
    method.load_trained_state(ck["model"])
    optimizer.load_state_dict(ck["optimizer"])
    scheduler.load_state_dict(ck["scheduler"])
    method.load_state_dict(ck["pruner"])
    torch.set_rng_state(ck["rng"]["torch"])
    if device.type == "cuda":
        torch.cuda.set_rng_state(ck["rng"]["cuda"], device)
    return {key: ck[key] for key in ("global_step", "elapsed", "best", "last_metrics")}


def head_state(model):
    """The trained classification head (lora2.HEAD: classifier and pooler), saved beside the adapter."""
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    return {n: v.detach().clone() for n, v in model.state_dict().items()
            if n in trainable and set(n.split(".")) & set(lora2.HEAD)}


def load_head(model, state):
    """Load what head_state saved; a key the model lacks is an error (the checkpoint belongs to another model)."""
    unexpected = model.load_state_dict(state, strict=False).unexpected_keys
    if unexpected:
        raise ValueError(f"checkpoint does not fit the model: unexpected keys {unexpected[:6]}")


# ----------------------------------------------------------------------------------------------------------------------
# the report

SHORT = {"attention.self.query": "query", "attention.self.key": "key", "attention.self.value": "value",
         "attention.self.query_proj": "query", "attention.self.key_proj": "key", "attention.self.value_proj": "value",
         "attention.output.dense": "attn.out", "intermediate.dense": "inter", "output.dense": "output"}
SHADES = " ░▒▓█"


def pattern_grid(pattern):
    """{layer: {module column: kept singular values}} from {matrix name: [kept λ_i]}; layer -1 if the name has none."""
    rows = {}
    for name, kept in pattern.items():
        m = re.search(r"(?:^|\.)(\d+)\.(.+)$", name)  # the first numeric component is the layer
        layer, module = (int(m.group(1)), m.group(2)) if m else (-1, name)
        rows.setdefault(layer, {})[SHORT.get(module, module)] = sum(kept)
    return rows


def rank_heatmap(pattern, r):
    """The rank pattern as text: one row per layer, one column per module type, cells = kept singular values."""
    rows = pattern_grid(pattern)
    columns = list(dict.fromkeys(c for row in rows.values() for c in row))
    width = max(4, *(len(c) for c in columns))
    lines = ["layer " + " ".join(f"{c:>{width}}" for c in columns)]
    for layer in sorted(rows):
        cells = [" " * width if c not in rows[layer] else
                 f"{SHADES[min(4, math.ceil(4 * rows[layer][c] / r))]}{rows[layer][c]:>{width - 1}}" for c in columns]
        lines.append(f"{'L' + str(layer) if layer >= 0 else '-':>5} " + " ".join(cells))
    return "\n".join(lines)


def plot_rank_pattern(pattern, r, path, title):
    """rank_pattern.png: the heatmap as an image (matplotlib); None, with a note, when matplotlib is missing."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("--plot needs matplotlib (pip install matplotlib); skipped the PNG", file=sys.stderr)
        return None
    rows = pattern_grid(pattern)
    columns, layers = list(dict.fromkeys(c for row in rows.values() for c in row)), sorted(rows)
    grid = np.array([[rows[layer].get(c, np.nan) for c in columns] for layer in layers], dtype=float)
    fig, ax = plt.subplots(figsize=(1 + 0.9 * len(columns), 1 + 0.45 * len(layers)))
    image = ax.imshow(grid, cmap="viridis", vmin=0, vmax=r, aspect="auto")
    for (i, j), value in np.ndenumerate(grid):
        if not np.isnan(value):
            ax.text(j, i, int(value), ha="center", va="center", color="w" if value < r / 2 else "k")
    ax.set_xticks(range(len(columns)), columns)
    ax.set_yticks(range(len(layers)), [f"layer {layer}" for layer in layers])
    ax.set_title(title)
    fig.colorbar(image, ax=ax, label="kept singular values")
    fig.tight_layout()
    lora2.atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=120))
    plt.close(fig)
    return path


def report(cfg, method, counts, run, facts, out_dir):
    """The summary (metrics.json); with out_dir (rank 0): print it, write metrics.json, the PNG and the PEFT export."""
    task, best = glue.TASKS[cfg.task], run["best"]
    pattern, (extra, notes) = method.rank_pattern(), method.notes()
    main_name, elapsed = task.metrics[0], run["elapsed"]
    summary = {
        "task": cfg.task, "method": cfg.method, "seed": cfg.seed, "metrics": best["metrics"],
        "main_metric": best["metrics"][main_name], "main_metric_name": main_name, "best_step": best["step"],
        "final_metrics": run["last_metrics"], "steps": facts["steps"], "adapter_params": counts["adapter"],
        "head_params": counts["head"], "trainable_params": counts["trainable"], "total_params": counts["total"],
        "rank_pattern": pattern, "kept_singular_values": sum(sum(k) for k in pattern.values()),
        "scored_ratio": extra.get("scored_ratio"), "wall_s": round(elapsed, 2),
        "examples_per_s": round(facts["steps"] * cfg.batch_size / elapsed, 1) if elapsed else None,
        "non_standard_split": facts["non_standard"], "train_size": facts["train_size"],
        "eval_size": facts["eval_size"], "world_size": facts["world"], "device": facts["device"],
        "args": dataclasses.asdict(cfg),
    }
    if out_dir is None:
        return summary
    lora2.atomic_write(out_dir / "metrics.json", json.dumps(summary, indent=1) + "\n")
    lines = [f"{task.dir} dev {main_name}: {summary['main_metric']:.4f} at step {best['step']} of {facts['steps']} "
             f"(" + ", ".join(f"{k} {v:.4f}" for k, v in best["metrics"].items()) + ")"
             + ("  [NON-STANDARD: train/eval split of dev.tsv]" if facts["non_standard"] else ""),
             f"parameters: {counts['trainable']:,} trainable ({counts['adapter']:,} adapter + {counts['head']:,} head)"
             f" of {counts['total']:,} ({100 * counts['trainable'] / counts['total']:.2f} %)",
             f"training time {fmt_time(elapsed)} on {facts['world']}×{facts['device']}"]
    if pattern:
        lines += [f"rank pattern (kept singular values of r={cfg.r}; {summary['kept_singular_values']} of "
                  f"{cfg.r * len(pattern)} in {len(pattern)} matrices):", rank_heatmap(pattern, cfg.r)]
    lines += notes
    if cfg.plot and pattern:
        png = plot_rank_pattern(pattern, cfg.r, out_dir / "rank_pattern.png", f"{task.dir} {cfg.method} rank pattern")
        lines += [f"wrote {png}"] if png else []
    if cfg.export_peft:
        method.export_peft(cfg.export_peft, cfg.hf or cfg.model or str(bert.default_model_dir(install=False)))
        lines.append(f"wrote a PEFT LoRA adapter to {cfg.export_peft}")
    lines.append(f"wrote {out_dir / 'metrics.json'} and {out_dir / 'adapter.pt'} "
                 f"(python train_glue.py --eval_only --load {out_dir / 'adapter.pt'})")
    print("\n".join(lines), flush=True)
    return summary


def fmt_time(seconds):
    """5s, 2m05s, 1h02m."""
    seconds = max(0, int(round(seconds)))
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds // 60 % 60:02d}m"
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"
