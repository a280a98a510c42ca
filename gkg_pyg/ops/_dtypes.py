"""The dtype helpers of the library's code paths, written so that a traced program
(``torch.export``, ONNX) records nothing where the dtype stays as it is."""

from __future__ import annotations

import torch
from torch import Tensor


def as_dtype(x: Tensor, dtype: torch.dtype) -> Tensor:
    """``x`` in ``dtype``: ``x`` itself where it is already, else ``x.to(dtype)``.  The same values as
    ``x.to(dtype)``, but a traced program (``torch.export``, ONNX) records even a cast that changes
    nothing as nodes of its own."""
    return x if x.dtype == dtype else x.to(dtype)


def at_least_float32(dtype: torch.dtype) -> torch.dtype:
    """``torch.promote_types(dtype, torch.float32)``: float32 and float64 as they are, half
    precisions (and integers) as float32.  Decided in Python for those two, because a traced program
    records every ``promote_types`` call as a node."""
    return dtype if dtype in (torch.float32, torch.float64) else torch.promote_types(dtype, torch.float32)
