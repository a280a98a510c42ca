"""Mixed precision: the autocast dtype and the loss scaler."""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass

import torch

from ..errors import ConfigError


@dataclass
class Precision:
    """Mixed precision: autocast dtype (None: float32) and the loss scaler
    (enabled for fp16 only)."""

    dtype: torch.dtype | None
    scaler: torch.amp.GradScaler
    device_type: str

    def autocast(self):
        if self.dtype is None:
            return nullcontext()
        return torch.autocast(device_type=self.device_type, dtype=self.dtype)


def build_precision(amp: str, device: torch.device) -> Precision:
    """fp16 (with a GradScaler) or bf16 autocast on CUDA; bf16 autocast on the
    CPU (fp16 there runs float32: CPUs have no fast fp16 matrix products);
    float32 for amp "none"."""
    if amp not in ("fp16", "bf16", "none"):
        raise ConfigError(f"amp must be 'fp16', 'bf16' or 'none', got {amp!r}")
    dtype = None
    if device.type == "cuda" and amp != "none":
        if amp == "bf16" and not torch.cuda.is_bf16_supported():
            raise ConfigError("train.amp=bf16 but this GPU does not support bfloat16; use fp16")
        dtype = torch.float16 if amp == "fp16" else torch.bfloat16
    elif device.type == "cpu" and amp == "bf16":
        dtype = torch.bfloat16
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    return Precision(dtype, scaler, device.type)
