"""The one dtype helper of the library's code paths."""

from __future__ import annotations

import torch
from torch import Tensor


def as_dtype(x: Tensor, dtype: torch.dtype) -> Tensor:
    """``x`` in ``dtype``: ``x`` itself where it is already, else ``x.to(dtype)``.  The same values as
    ``x.to(dtype)``, but a traced program (``torch.export``, ONNX) records even a cast that changes
    nothing as nodes of its own."""
    return x if x.dtype == dtype else x.to(dtype)
