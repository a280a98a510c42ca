"""The optimiser: AdamW parameter groups (which parameters are decayed) and
the per-iteration learning-rate schedule (warm-up, steps or cosine)."""

from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import nn

from .distributed import unwrap


def param_groups(model: nn.Module, weight_decay: float, decay_embeddings: bool = True) -> list[dict]:
    """Two AdamW groups: with weight decay, and without it.

    Norms and biases (every 1-D parameter) are never decayed, as in the
    authors' config (``norm_decay_mult=0``, ``bias_decay_mult=0``). Their
    ``custom_keys`` name Swin parameters (``absolute_pos_embed``,
    ``relative_position_bias_table``) that match nothing in GKGNet, so the run
    behind the paper decayed the position and the label embeddings:
    ``decay_embeddings=True`` (the default) does the same. False also exempts
    the parameters the model names in ``no_weight_decay()`` (timm's
    convention; GKGNet: ``pos_embed`` and ``label_embed.weight``).
    """
    model = unwrap(model)
    exempt = set() if decay_embeddings or not hasattr(model, "no_weight_decay") else set(model.no_weight_decay())
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if p.ndim <= 1 or name in exempt:
            no_decay.append(p)
        else:
            decay.append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def build_optimizer(cfg: dict, model: nn.Module) -> torch.optim.Optimizer:
    o = cfg["optim"]
    groups = param_groups(model, o["weight_decay"], o["decay_embeddings"])
    if o.get("name") == "sgd":  # the same parameter groups, each with its own weight decay
        return torch.optim.SGD(groups, lr=o["lr"], momentum=o["momentum"])
    # PyTorch's fused kernel (CPU and CUDA): one pass per tensor instead of a dozen operations per
    # parameter (GKGNet-S on 2 CPU threads: 60 -> 20 ms per step; the same update up to rounding).
    fused = all(p.device.type in ("cpu", "cuda") and p.is_floating_point() for g in groups for p in g["params"])
    return torch.optim.AdamW(groups, lr=o["lr"], betas=tuple(o["betas"]), eps=o["eps"], fused=fused or None)


class LRSchedule:
    """Learning rate per iteration: ``lr = base_lr x warmup(step) x regular(step)``.

    regular: ``step`` multiplies by gamma at each milestone epoch (epochs
    counted from 0: milestone 10 applies from the 11th epoch on);
    ``cosine`` decays from 1 to min_lr_ratio over all iterations.
    warmup: linear from warmup_ratio to 1 over the first warmup_epochs x
    steps_per_epoch iterations (mmcv's linear warm-up), 1 afterwards.
    ``step()`` after every optimizer step sets the rate of the next one.
    """

    def __init__(
        self, optimizer: torch.optim.Optimizer, steps_per_epoch: int, epochs: int, name: str = "step",
        warmup_epochs: float = 0.0, warmup_ratio: float = 1.0, milestones: Sequence[int] = (),
        gamma: float = 0.1, min_lr_ratio: float = 0.0,
    ) -> None:  # fmt: skip
        if steps_per_epoch < 1:
            raise ValueError(f"steps_per_epoch must be >= 1, got {steps_per_epoch}")
        if name not in ("step", "cosine"):
            raise ValueError(f"unknown schedule {name!r}; expected 'step' or 'cosine'")
        self.optimizer = optimizer
        # The configured rates, kept in the param groups (as torch's
        # schedulers do), so that they travel with the optimizer's state.
        for group in optimizer.param_groups:
            group.setdefault("initial_lr", group["lr"])
        self.base_lrs = [group["initial_lr"] for group in optimizer.param_groups]
        self.steps_per_epoch, self.total_steps = steps_per_epoch, epochs * steps_per_epoch
        self.name, self.milestones, self.gamma, self.min_lr_ratio = name, list(milestones), gamma, min_lr_ratio
        self.warmup_steps, self.warmup_ratio = round(warmup_epochs * steps_per_epoch), warmup_ratio
        self.step_count = 0
        self._apply()

    def factor(self, step: int) -> float:
        """The multiplier of the base learning rates at iteration ``step``."""
        if self.name == "step":
            epoch = step // self.steps_per_epoch
            regular = self.gamma ** sum(epoch >= m for m in self.milestones)
        else:
            t = min(step / max(self.total_steps, 1), 1.0)
            regular = self.min_lr_ratio + (1.0 - self.min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * t))
        if step < self.warmup_steps:
            regular *= 1.0 - (1.0 - step / self.warmup_steps) * (1.0 - self.warmup_ratio)
        return regular

    def _apply(self) -> None:
        f = self.factor(self.step_count)
        for group, base in zip(self.optimizer.param_groups, self.base_lrs):
            group["lr"] = base * f

    def step(self) -> None:
        self.step_count += 1
        self._apply()

    def state_dict(self) -> dict:
        return {"step_count": self.step_count, "steps_per_epoch": self.steps_per_epoch}

    def load_state_dict(self, state: dict) -> None:
        """Continue at the saved position in epochs: a run resumed with another number of
        processes, batch size or accumulation has another number of steps per epoch, and the
        saved step count alone would put warm-up, milestones and the cosine out of step."""
        steps, saved_per_epoch = int(state["step_count"]), int(state.get("steps_per_epoch", self.steps_per_epoch))
        self.step_count = round(steps * self.steps_per_epoch / max(saved_per_epoch, 1))
        self._apply()


def build_schedule(cfg: dict, optimizer: torch.optim.Optimizer, steps_per_epoch: int) -> LRSchedule:
    s = cfg["schedule"]
    return LRSchedule(
        optimizer, steps_per_epoch, cfg["train"]["epochs"], s["name"], s["warmup_epochs"],
        s["warmup_ratio"], s["milestones"], s["gamma"], s["min_lr_ratio"],
    )  # fmt: skip
