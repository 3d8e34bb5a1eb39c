"""The GLUE study's baselines, trained by train_glue.py's loop: PEFT's LoRA and AdaLoRA, and full
fine-tuning.

    python experiments/baselines.py --method lora      # PEFT LoRA of rank --r on LoRA²'s matrices
    python experiments/baselines.py --method adalora   # PEFT AdaLoRA at LoRA²'s budget,
                                                         schedule (L7)
    python experiments/baselines.py --method full --lr 5e-5                 # every weight trains
    python experiments/baselines.py --method lora --eval_only --load runs/sst2-lora-s0/adapter.pt

Every train_glue.py flag works here, with the same meaning and defaults (--preset paper,
--save_every / --resume, --export_peft as PEFT's save_pretrained, torchrun); the LoRA²-only ones
(--k, --init, --cross, --scored) change nothing. The run goes to runs/<task>-<method>-s<seed> and
its metrics.json carries "method". Each method is a class with the members of train_glue.LoRA2,
which train_glue.train runs in its loop, each step in SPEC §4's order:
    forward → loss = task (+ γ·R, AdaLoRA's regulariser) → backward → clip → optimizer.step
    → scheduler.step → pruner.step(t) (AdaLoRA's update_and_allocate(t)) → zero_grad
The best checkpoint is the best evaluation at AdaLoRA's final budget; LoRA and full fine-tuning
prune nothing, so any evaluation may be it. Not here: LoRA² (train_glue.py, lora2.py), the grid of
runs (study.py); --export_peft for full fine-tuning (there is no adapter to export).
"""
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repository's files
import lora2  # noqa: E402
import rundir  # noqa: E402
import train_glue  # noqa: E402

# --------------------------------------------------------------------------------------------------
# the methods


def _peft():
    try:
        import peft
    except ImportError:
        raise ImportError("--method lora / adalora use PEFT's implementation: pip install peft") \
            from None
    return peft


class NoPruner:
    """The pruner of a method that prunes nothing: its step does nothing, it has no budget."""

    def step(self, t):
        pass

    def budget(self, t):
        return None

    def state_dict(self):
        return None

    def load_state_dict(self, state):
        pass

    def close(self):
        pass


class Baseline:
    """What the baselines share: no regulariser, no pruning; checkpoints keep every trainable
    tensor apart from the head (plus PEFT's adapter buffers) as "adapter", the head (lora2.HEAD) as
    "head". Built on the backbone before any data (LoRA, full fine-tuning) or once the steps are
    known (AdaLoRA's schedule)."""
    name = None
    final_phase = 0  # the first step the best checkpoint is chosen from: any evaluation
    pruner = NoPruner()

    def __init__(self, model, cfg, targets):
        self.model, self.cfg, self.targets = model, cfg, targets

    def schedule(self, steps, t_i, t_f):
        pass

    def regularizer(self):
        return torch.zeros((), device=next(self.model.parameters()).device)

    def state(self):
        trainable = {n for n, p in self.model.named_parameters() if p.requires_grad}
        state = {n: v.detach().clone() for n, v in self.model.state_dict().items()
                 if n in trainable or "lora_" in n or "ranknum" in n}
        head = {n: v for n, v in state.items() if set(n.split(".")) & set(lora2.HEAD)}
        return {"adapter": {n: v for n, v in state.items() if n not in head}, "head": head}

    def load_state(self, state):
        merged, own = {**state["adapter"], **state["head"]}, self.model.state_dict()
        unexpected = [k for k in merged if k not in own]
        if unexpected:
            raise ValueError(f"checkpoint does not fit the model: unexpected keys {unexpected[:6]}")
        for k, v in merged.items():
            if v.shape != own[k].shape:
                raise ValueError(f"checkpoint does not fit the model: {k} has shape "
                                 f"{tuple(v.shape)}, the model's {tuple(own[k].shape)}")
        self.model.load_state_dict(merged, strict=False)

    def rank_pattern(self):
        return {}

    def export(self, path, base):
        self.model.save_pretrained(path)

    def notes(self):
        return []


def _peft_model(model, config):
    """get_peft_model, with the classification head (lora2.HEAD) trainable as in LoRA²."""
    model = _peft().get_peft_model(model, config)
    for name, p in model.named_parameters():
        if set(name.split(".")) & set(lora2.HEAD):
            p.requires_grad_(True)
    return model


class LoRA(Baseline):
    """PEFT LoRA of rank --r, α = --alpha, on the same target matrices as LoRA²."""
    name = "lora"

    def __init__(self, model, cfg, targets):
        super().__init__(model, cfg, targets)
        self.model = _peft_model(model, _peft().LoraConfig(
            r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=0.0, target_modules=list(targets)))

    def rank_pattern(self):
        return {name.split(".lora_A.")[0].removeprefix("base_model.model."): [True] * p.shape[0]
                for name, p in self.model.named_parameters() if ".lora_A." in name}


class AdaLoRA(Baseline):
    """PEFT AdaLoRA at LoRA²'s budget (init_r = --r, target_r = --target_rank) and schedule (L7),
    with its own regulariser (AdaLoRA eq. 4 as its code computes it: un-squared norms, the mean
    over P and Q matrices)."""
    name = "adalora"

    def __init__(self, model, cfg, targets):
        _peft()  # missing: said before any data is read
        super().__init__(model, cfg, targets)

    def schedule(self, steps, t_i, t_f):
        cfg = self.cfg
        config = _peft().AdaLoraConfig(
            init_r=cfg.r, target_r=cfg.target_rank, lora_alpha=cfg.alpha, lora_dropout=0.0,
            target_modules=list(self.targets), tinit=t_i, tfinal=t_f, deltaT=cfg.mask_interval,
            beta1=0.85, beta2=0.85, orth_reg_weight=cfg.gamma, total_step=steps)
        self.model = _peft_model(self.model, config)
        self.pruner, self.final_phase = AdaLoRAAllocator(self.model), steps - t_f

    def regularizer(self):
        """PEFT adds its regulariser only to outputs that carry a .loss, so the loop adds it, as
        γ·R like LoRA²'s."""
        terms = []
        for name, p in self.model.named_parameters():
            if "lora_A" in name or "lora_B" in name:
                gram = p @ p.T if "lora_A" in name else p.T @ p
                terms.append(torch.linalg.matrix_norm(gram - torch.eye(gram.shape[0],
                                                                       device=p.device)))
        return torch.stack(terms).mean()

    def rank_pattern(self):
        return {name.split(".lora_E.")[0].removeprefix("base_model.model."):
                (p.detach() != 0).flatten().tolist()
                for name, p in self.model.named_parameters() if ".lora_E." in name}

    def load_state(self, state):
        """Baseline's; a model without a rank pattern yet (--eval_only) takes PEFT's from the
        loaded lora_E (pruned: 0), so that save_pretrained writes the adapter as the run did."""
        super().load_state(state)
        config = self.model.peft_config["default"]
        if config.rank_pattern is None:
            named = self.model.base_model.model.named_parameters()
            config.rank_pattern = {n: (p != 0).flatten().tolist() for n, p in named
                                   if "lora_E" in n}


class AdaLoRAAllocator(NoPruner):
    """PEFT AdaLoRA's allocator where LoRA²'s Pruner steps: update_and_allocate(t), its budget, its
    state for train_state.pt."""
    KEYS = ("ipt", "exp_avg_ipt", "exp_avg_unc")

    def __init__(self, model):
        self.model = model

    def step(self, t):
        self.model.base_model.update_and_allocate(t)

    def budget(self, t):
        return self.model.base_model.rankallocator.budget_schedule(t)[0]

    def state_dict(self):
        allocator = self.model.base_model.rankallocator
        return {**{key: getattr(allocator, key) for key in self.KEYS},
                "rank_pattern": self.model.peft_config["default"].rank_pattern}

    def load_state_dict(self, state):
        allocator = self.model.base_model.rankallocator
        for key in self.KEYS:
            setattr(allocator, key, state[key])
        self.model.peft_config["default"].rank_pattern = state["rank_pattern"]


class Full(Baseline):
    """Full fine-tuning: every weight trains; "adapter" params are the whole backbone."""
    name = "full"

    def __init__(self, model, cfg, targets):
        super().__init__(model.requires_grad_(True), cfg, targets)


METHODS = {"lora": LoRA, "adalora": AdaLoRA, "full": Full}


# --------------------------------------------------------------------------------------------------
# configuration: train_glue.py's, and --method


@dataclass
class BaselineConfig(train_glue.Config):
    method: str = train_glue._opt(None, "the baseline: PEFT LoRA, PEFT AdaLoRA, full fine-tuning "
                                        "(no default: required)", tuple(METHODS))

    def __post_init__(self):
        if self.method is None:
            raise ValueError(f"--method is required: one of {', '.join(METHODS)}")
        if self.method == "full" and self.export_peft:
            raise ValueError("--export_peft needs an adapter method, not full fine-tuning")
        super().__post_init__()

    def prunes(self):
        return self.method == "adalora"


def train(cfg, stop_at=None):
    """train_glue.train with cfg's baseline: (metrics.json's summary, model)."""
    return train_glue.train(cfg, METHODS[cfg.method], stop_at)


def evaluate_checkpoint(cfg):
    """--eval_only --load PATH with cfg's baseline (rundir.evaluate_saved): the metrics."""
    return rundir.evaluate_saved(cfg, METHODS[cfg.method])


def main(argv=None):
    """The command line, as train_glue.py's, with --method."""
    try:
        cfg = train_glue.parse_config(argv, BaselineConfig)
        if cfg.eval_only:
            rundir.evaluate_saved(cfg, METHODS[cfg.method])
        else:
            train(cfg)
    except (ValueError, ImportError, OSError) as e:
        # user mistakes, bad files, full disks: one line
        sys.exit(f"baselines.py: error: {' '.join(str(e).split())}")


if __name__ == "__main__":
    main()
