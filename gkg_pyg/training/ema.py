"""An exponential moving average of the weights (timm's ModelEmaV3)."""

from __future__ import annotations

from torch import nn

from .distributed import unwrap


def build_ema(cfg: dict, model: nn.Module):
    """timm's ModelEmaV3 of the (unwrapped) model, or None when train.ema is off."""
    if not cfg["train"]["ema"]:
        return None
    from timm.utils import ModelEmaV3

    return ModelEmaV3(unwrap(model), decay=cfg["train"]["ema_decay"], use_warmup=cfg["train"]["ema_warmup"])
