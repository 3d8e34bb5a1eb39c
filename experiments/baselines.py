"""The GLUE study's baselines, trained like train_glue.py trains LoRA²: PEFT's LoRA and AdaLoRA, and full fine-tuning.

    python experiments/baselines.py --method lora      # PEFT LoRA of rank --r on LoRA²'s six matrices (needs peft)
    python experiments/baselines.py --method adalora   # PEFT AdaLoRA at LoRA²'s budget and schedule (L7) (needs peft)
    python experiments/baselines.py --method full --lr 5e-5                # every weight trains
    python experiments/baselines.py --method lora --eval_only --load runs/sst2-lora-s0/adapter.pt

Every train_glue.py flag works here, with the same meaning and defaults (--preset paper, --save_every / --resume,
--export_peft as PEFT's save_pretrained, torchrun); the LoRA²-only ones (--k, --init, --cross, --scored) change
nothing. The run goes to runs/<task>-<method>-s<seed> and its metrics.json carries "method". The loop is
train_glue.py's, each step in SPEC §4's order:
    forward → loss = task (+ γ·R, AdaLoRA's regulariser) → backward → clip → optimizer.step → scheduler.step
    → AdaLoRA's update_and_allocate(t), where LoRA² calls pruner.step(t) → zero_grad
from train_glue.py's pieces (configuration, data, AdamW, evaluation, precision, --compile) and rundir.py's files. The
best checkpoint is the best evaluation at AdaLoRA's final budget; LoRA and full fine-tuning prune nothing, so any
evaluation may be it. Not here: LoRA² (train_glue.py, lora2.py), the grid of runs (study.py); --export_peft for full
fine-tuning (there is no adapter to export).
"""
import contextlib
import dataclasses
import functools
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repository: train_glue.py, lora2.py, bert.py
import bert  # noqa: E402
import compiled  # noqa: E402
import glue  # noqa: E402
import lora2  # noqa: E402
import rundir  # noqa: E402
import train_glue  # noqa: E402

# ----------------------------------------------------------------------------------------------------------------------
# the methods


def _peft():
    try:
        import peft
    except ImportError:
        raise ImportError("--method lora / adalora use PEFT's implementation: pip install peft") from None
    return peft


class Baseline:
    """What the baselines share: no regulariser, no pruning, adapter.pt = every trainable tensor apart from the head
    (plus PEFT's adapter buffers), the head as train_glue.py saves it. Each method is built for a
    run of `steps` steps (AdaLoRA's schedule), to train or to evaluate."""
    final_phase = 0  # the first step the best checkpoint is chosen from: nothing is pruned, so any evaluation

    def __init__(self, model):
        self.model = model

    def regularizer(self):
        return None

    def after_step(self, t):
        pass

    def budget(self, t):
        return None

    def rank_pattern(self):
        return {}

    def state_dict(self):  # what train_state.pt keeps in LoRA²'s "pruner" slot
        return None

    def load_state_dict(self, state):
        pass

    def trained_state(self):
        head = rundir.head_state(self.model)
        trainable = {n for n, p in self.model.named_parameters() if p.requires_grad}
        adapter = {n: v.detach().clone() for n, v in self.model.state_dict().items()
                   if n not in head and (n in trainable or "lora_" in n or "ranknum" in n)}
        return {"adapter": adapter, "head": head}

    def load_trained_state(self, state):
        rundir.load_head(self.model, {**state["adapter"], **state["head"]})


def _peft_model(model, config):
    """get_peft_model, with the classification head (lora2.HEAD) trainable as in LoRA²."""
    model = _peft().get_peft_model(model, config)
    for name, p in model.named_parameters():
        if set(name.split(".")) & set(lora2.HEAD):
            p.requires_grad_(True)
    return model


class LoRA(Baseline):
    """PEFT LoRA of rank --r, α = --alpha, on the same target matrices as LoRA²."""

    def __init__(self, model, cfg, targets, steps):
        peft = _peft()
        super().__init__(_peft_model(model, peft.LoraConfig(r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=0.0,
                                                             target_modules=list(targets))))

    def rank_pattern(self):
        return {name.split(".lora_A.")[0].removeprefix("base_model.model."): [True] * p.shape[0]
                for name, p in self.model.named_parameters() if ".lora_A." in name}


class AdaLoRA(Baseline):
    """PEFT AdaLoRA at LoRA²'s budget (init_r = --r, target_r = --target_rank) and schedule (L7), with its own
    regulariser (AdaLoRA eq. 4 as its code computes it: un-squared norms, the mean over P and Q matrices)."""

    def __init__(self, model, cfg, targets, steps):
        peft = _peft()
        t_i, t_f = rundir.warmup_steps(cfg, steps, "--steps")
        config = peft.AdaLoraConfig(init_r=cfg.r, target_r=cfg.target_rank, lora_alpha=cfg.alpha, lora_dropout=0.0,
                                    target_modules=list(targets), tinit=t_i, tfinal=t_f, deltaT=cfg.mask_interval,
                                    beta1=0.85, beta2=0.85, orth_reg_weight=cfg.gamma,
                                    total_step=steps)
        super().__init__(_peft_model(model, config))
        self.final_phase = steps - t_f

    def regularizer(self):
        """PEFT adds its regulariser only to outputs that carry a .loss, so the loop adds it, as γ·R like LoRA²'s."""
        terms = []
        for name, p in self.model.named_parameters():
            if "lora_A" in name or "lora_B" in name:
                gram = p @ p.T if "lora_A" in name else p.T @ p
                terms.append(torch.linalg.matrix_norm(gram - torch.eye(gram.shape[0], device=p.device)))
        return torch.stack(terms).mean()

    def after_step(self, t):
        self.model.base_model.update_and_allocate(t)  # PEFT AdaLoRA's allocator, where LoRA² calls pruner.step

    def budget(self, t):
        return self.model.base_model.rankallocator.budget_schedule(t)[0]

    def rank_pattern(self):
        return {name.split(".lora_E.")[0].removeprefix("base_model.model."): (p.detach() != 0).flatten().tolist()
                for name, p in self.model.named_parameters() if ".lora_E." in name}

    def state_dict(self):
        allocator = self.model.base_model.rankallocator
        state = {key: getattr(allocator, key) for key in ("ipt", "exp_avg_ipt", "exp_avg_unc")}
        return {**state, "rank_pattern": self.model.peft_config["default"].rank_pattern}

    def load_state_dict(self, state):
        allocator = self.model.base_model.rankallocator
        for key in ("ipt", "exp_avg_ipt", "exp_avg_unc"):
            setattr(allocator, key, state[key])
        self.model.peft_config["default"].rank_pattern = state["rank_pattern"]

    def load_trained_state(self, state):
        """Baseline's; a model without a rank pattern yet (--eval_only) takes PEFT's from the loaded
        lora_E (pruned: 0), so that save_pretrained writes the adapter as the run did."""
        super().load_trained_state(state)
        config = self.model.peft_config["default"]
        if config.rank_pattern is None:
            named = self.model.base_model.model.named_parameters()
            config.rank_pattern = {n: (p != 0).flatten().tolist() for n, p in named
                                   if "lora_E" in n}


class Full(Baseline):
    """Full fine-tuning: every weight trains; "adapter" params are the whole backbone."""

    def __init__(self, model, cfg, targets, steps):
        super().__init__(model.requires_grad_(True))


METHODS = {"lora": LoRA, "adalora": AdaLoRA, "full": Full}


# ----------------------------------------------------------------------------------------------------------------------
# configuration: train_glue.py's, and --method


@dataclass
class BaselineConfig(train_glue.Config):
    method: str = train_glue._opt(None, "the baseline: PEFT LoRA, PEFT AdaLoRA, full fine-tuning (no default: "
                                        "required)", tuple(METHODS))

    def __post_init__(self):
        super().__post_init__()
        if self.method is None:
            raise ValueError(f"--method is required: one of {', '.join(METHODS)}")
        if self.method == "full" and self.export_peft:
            raise ValueError("--export_peft needs an adapter method, not full fine-tuning")


# ----------------------------------------------------------------------------------------------------------------------
# training


def train(cfg, stop_at=None):
    """Train per cfg (a BaselineConfig); return (summary dict as in metrics.json, model). stop_at: return early once
    global_step reaches it, without the final evaluation (a stand-in for a killed run in tests)."""
    rank, world, device, started = train_glue.setup_distributed(cfg.device)
    try:
        with rundir.claim(cfg) if rank == 0 else contextlib.nullcontext():  # the folder is this run's
            return _train(cfg, rank, world, device, stop_at)
    finally:
        if started:
            torch.distributed.destroy_process_group()


def _train(cfg, rank, world, device, stop_at):
    say = functools.partial(print, file=sys.stderr, flush=True) if rank == 0 else (lambda *a, **k: None)
    out_dir = rundir.out_dir_of(cfg)
    if cfg.batch_size % world:
        raise ValueError(f"--batch_size {cfg.batch_size} is the global batch; it must divide by {world} ranks")
    if cfg.method != "full":
        _peft()  # missing: said before anything loads
    torch.manual_seed(cfg.seed)
    cfg = dataclasses.replace(cfg, pooling=cfg.pooling or ("cls" if cfg.hf else "mean"))

    # model: the backbone, checked before any data; the method wraps it once the steps are known (AdaLoRA's schedule)
    backbone, tokenize, pad_id, targets = bert.load_classifier(
        glue.TASKS[cfg.task].num_labels, cfg.model, cfg.hf, cfg.classifier_dropout, cfg.max_len, cfg.pooling,
        cfg.dropout)

    # data, and the run's length, precision and compilation
    task, data, train_enc, train_y, dev_data = train_glue.load_run_data(cfg, rank, world, tokenize)
    lengths = tuple(len(ids) for ids, _ in train_enc)
    precision, why_precision = train_glue.resolve_precision(cfg.precision, device)
    steps, why_steps = train_glue.run_length(cfg, len(data.train), precision)
    rundir.warmup_steps(cfg, steps, why_steps)  # AdaLoRA's schedule (L7), checked before training
    use_compile, why_compile = compiled.resolve(cfg.compile, device, world, steps)
    cfg = dataclasses.replace(cfg, steps=steps, epochs=None, precision=precision, compile=use_compile)
    method = METHODS[cfg.method](backbone, cfg, targets, steps)
    model = method.model.to(device)
    counts = lora2.count_parameters(model)
    say(rundir.header(task, data, cfg.method, counts, steps, cfg, world, device,
                          (why_steps, why_precision, why_compile)))

    optimizer, scheduler, params = train_glue.adamw(model, cfg, steps)
    net = torch.nn.parallel.DistributedDataParallel(model) if world > 1 else model

    # what a checkpoint carries (AdaLoRA's allocator in the pruner's place); --resume restores it
    run = {"global_step": 0, "elapsed": 0.0, "best": None, "last_metrics": None}
    state_path = out_dir / "train_state.pt"
    if cfg.resume and state_path.exists():
        run = rundir.load_train_state(state_path, cfg, method.load_trained_state, method, optimizer, scheduler,
                                      device)
        say(f"resumed from {state_path} at step {run['global_step']}")
    if cfg.overwrite and rank == 0:
        rundir.clear(out_dir)  # the previous run goes now, all checks passed

    def device_step(batch, labels):
        with train_glue.autocast(device, precision):
            logits = train_glue.logits_of(net(**batch))               # (B / world, num_labels)
        loss_task = glue.task_loss(logits, labels)
        reg = method.regularizer()                                     # AdaLoRA's R, else None
        (loss_task if reg is None else loss_task + cfg.gamma * reg).backward()  # loss = task (+ γ·R)
        if cfg.clip:                                                   # 0: no clipping
            torch.nn.utils.clip_grad_norm_(params, cfg.clip)
        optimizer.step()
        return loss_task.detach(), None if reg is None else reg.detach()
    step = compiled.step(device_step, model, optimizer, cfg) if use_compile else device_step
    buckets = glue.length_buckets(cfg.max_len) if use_compile else None  # compiled: a few batch shapes

    # the loop
    model.train()
    global_step = run["global_step"]
    t0, start_step, loss_sum, reg_sum, n_sum = time.time(), global_step, 0.0, 0.0, 0
    while global_step < steps:
        if stop_at is not None and global_step >= stop_at:
            return {"stopped_at": global_step}, model
        index = glue.batch_index(global_step, lengths, cfg.batch_size, cfg.seed, cfg.length_groups)[rank::world]
        batch, labels = glue.collate(train_enc, index, pad_id, device, buckets), glue.to_device(train_y[index], device)
        loss_task, reg = step(batch, labels)  # forward → loss (+ γ·R) → backward → clip → optimizer.step
        scheduler.step()
        method.after_step(global_step)        # AdaLoRA: update_and_allocate(t), where LoRA² calls pruner.step(t)
        optimizer.zero_grad(set_to_none=True)
        global_step += 1

        loss_sum, reg_sum, n_sum = loss_sum + loss_task, reg_sum + (0.0 if reg is None else reg), n_sum + 1
        evaluating = global_step == steps or (cfg.eval_every and global_step % cfg.eval_every == 0)
        saving = rank == 0 and cfg.save_every and (global_step % cfg.save_every == 0
                                                   or global_step == steps)
        if global_step % cfg.log_every == 0 or evaluating or saving:  # diverged: stop, keep nothing
            rundir.check_finite(global_step, n_sum, cfg, loss_sum, reg_sum)
        if global_step % cfg.log_every == 0 or global_step == steps:
            rate = (global_step - start_step) / (time.time() - t0)
            budget = method.budget(global_step - 1)
            say(rundir.progress(global_step, steps, float(loss_sum) / n_sum, float(reg_sum) / n_sum,
                                    scheduler.get_last_lr()[0], "-" if budget is None else budget, rate,
                                    cfg.batch_size))
            loss_sum, reg_sum, n_sum = 0.0, 0.0, 0
        if evaluating:
            eval_start = time.time()
            run["last_metrics"] = metrics = train_glue.evaluate(model, dev_data, task, pad_id, device, precision)
            best, main = run["best"], task.metrics[0]
            is_best = global_step >= method.final_phase and (best is None or metrics[main] > best["metrics"][main])
            if is_best:  # AdaLoRA: the best evaluation at its final budget; the others: the best of all
                run["best"] = {"step": global_step, "metrics": metrics, "state": method.trained_state()}
                if rank == 0:
                    rundir.save_adapter(out_dir / "adapter.pt", cfg, global_step, metrics, run["best"]["state"])
            say(f"eval at step {global_step}: " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items())
                + (" (best)" if is_best else ""))
            t0 += time.time() - eval_start  # evaluation time is not training time
        if saving:
            rundir.save_train_state(state_path, cfg, method.trained_state(), method, optimizer, scheduler, device,
                                    {**run, "global_step": global_step,
                                     "elapsed": run["elapsed"] + time.time() - t0})
    run["elapsed"] += time.time() - t0

    # the report: the best checkpoint's metrics, its rank pattern, --export_peft through PEFT's save_pretrained
    method.load_trained_state(run["best"]["state"])
    summary = rundir.report(cfg, counts, run, data, world, device, out_dir if rank == 0 else None,
                            method.rank_pattern(), export=lambda path, base: model.save_pretrained(path))
    return summary, model


# ----------------------------------------------------------------------------------------------------------------------
# --eval_only, and the command line


def evaluate_checkpoint(cfg):
    """--eval_only --load PATH: rebuild the saved run's model and method, load adapter + head, evaluate on the same
    data; with --export_peft, then save it as PEFT's save_pretrained does."""
    method = rundir.load_checkpoint(cfg.load, "adapter")["config"].get("method", "lora2")
    if method not in METHODS:
        raise ValueError(f"{cfg.load} is a LoRA² run; evaluate it with python train_glue.py --eval_only --load "
                         f"{cfg.load}")
    if method != cfg.method:
        raise ValueError(f"{cfg.load} is a --method {method} run; pass --method {method}")
    ck, saved = rundir.load_adapter(cfg)
    _, _, device, _ = train_glue.setup_distributed(saved.device)
    task = glue.TASKS[saved.task]
    backbone, tokenize, pad_id, targets = bert.load_classifier(
        task.num_labels, saved.model, saved.hf, saved.classifier_dropout, saved.max_len,
        saved.pooling, saved.dropout)
    method = METHODS[saved.method](backbone, saved, targets, saved.steps)
    rundir.load_trained(method.load_trained_state, ck, cfg.load)
    model = method.model.to(device)
    dev = glue.load(saved.task, saved.data_dir, saved.dev_split, saved.train_size, saved.eval_size,
                    fetch=not saved.no_download).dev
    dev_data = {s: glue.encode(tokenize, ex, saved.max_len) for s, ex in dev.items()}
    precision = train_glue.resolve_precision(saved.precision, device)[0]
    metrics = train_glue.evaluate(model, dev_data, task, pad_id, device, precision)
    print(f"{task.dir} {saved.method} (step {ck['step']} of {cfg.load}): "
          + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
    if saved.export_peft:
        print(rundir.export_peft(saved, lambda path, base: model.save_pretrained(path),
                                 "the evaluation above is complete"))
    return metrics


def main(argv=None):
    try:
        cfg = train_glue.parse_config(argv, config=BaselineConfig, description=__doc__.split("\n\n")[0])
        if cfg.eval_only:
            evaluate_checkpoint(cfg)
        else:
            train(cfg)
    except (ValueError, ImportError, OSError) as e:  # user mistakes, bad files, full disks: one line
        sys.exit(f"baselines.py: error: {' '.join(str(e).split())}")


if __name__ == "__main__":
    main()
