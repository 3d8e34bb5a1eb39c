"""The baselines of the GLUE study, plugged into train_glue.py's loop: PEFT's LoRA and AdaLoRA, and full fine-tuning.

    python train_glue.py --method lora      # PEFT LoRA of rank --r on the same six matrices (needs peft)
    python train_glue.py --method adalora   # PEFT AdaLoRA at LoRA²'s budget and schedule (L7) (needs peft)
    python train_glue.py --method full      # every weight trains (lr about 5e-5)

Each class has the interface of train_glue.LoRA2 (model, regularizer, after_step, budget, rank_pattern, final_phase,
state_dict / load_state_dict, trained_state / load_trained_state, notes, export_peft), so the loop has no branch on the
method. Not here: LoRA² itself (train_glue.py, lora2.py), the grid of runs (study.py).
"""
import torch

import lora2
import rundir


def _peft():
    try:
        import peft
    except ImportError:
        raise ImportError("--method lora / adalora use PEFT's implementation: pip install peft") from None
    return peft


class Baseline:
    """What the baselines share: no regulariser, no pruning, adapter.pt = every trainable tensor apart from the head
    (plus PEFT's adapter buffers), the head as train_glue saves it."""
    final_phase = 0  # nothing is pruned: any evaluation may be the best

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

    def state_dict(self):
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

    def notes(self):
        return {}, []

    def export_peft(self, path, base):
        self.model.save_pretrained(path)


def _peft_model(model, config):
    """get_peft_model, with the classification head (lora2.HEAD) trainable as in LoRA²."""
    model = _peft().get_peft_model(model, config)
    for name, p in model.named_parameters():
        if set(name.split(".")) & set(lora2.HEAD):
            p.requires_grad_(True)
    return model


class LoRA(Baseline):
    """PEFT LoRA of rank --r, α = --alpha, on the same target matrices as LoRA²."""

    def __init__(self, model, cfg, targets, steps=None):
        peft = _peft()
        super().__init__(_peft_model(model, peft.LoraConfig(r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=0.0,
                                                             target_modules=list(targets))))

    def rank_pattern(self):
        return {name.split(".lora_A.")[0].removeprefix("base_model.model."): [True] * p.shape[0]
                for name, p in self.model.named_parameters() if ".lora_A." in name}


class AdaLoRA(Baseline):
    """PEFT AdaLoRA at LoRA²'s budget (init_r = --r, target_r = --target_rank) and schedule (L7), with its own
    regulariser (AdaLoRA eq. 4 as its code computes it: un-squared norms, the mean over P and Q matrices)."""

    def __init__(self, model, cfg, targets, steps=None):
        peft = _peft()
        t_i, t_f = (round(cfg.init_warmup * steps), round(cfg.final_warmup * steps)) if steps else (0, 0)
        config = peft.AdaLoraConfig(init_r=cfg.r, target_r=cfg.target_rank, lora_alpha=cfg.alpha, lora_dropout=0.0,
                                    target_modules=list(targets), tinit=t_i, tfinal=t_f, deltaT=cfg.mask_interval,
                                    beta1=0.85, beta2=0.85, orth_reg_weight=cfg.gamma, total_step=steps or cfg.steps)
        super().__init__(_peft_model(model, config))
        self.final_phase = (steps or 0) - t_f

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


class Full(Baseline):
    """Full fine-tuning: every weight trains; "adapter" params are the whole backbone."""

    def __init__(self, model, cfg, targets, steps=None):
        if cfg.export_peft:
            raise ValueError("--export_peft needs an adapter method, not full fine-tuning")
        super().__init__(model.requires_grad_(True))


METHODS = {"lora": LoRA, "adalora": AdaLoRA, "full": Full}
