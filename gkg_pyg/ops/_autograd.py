"""Autograd helpers of the operators: the formula of a backward operator that has
no derivative of its own, and the test for ``torch.func`` transforms."""

from __future__ import annotations

from typing import Callable

import torch


def no_second_derivative(backward: str, forward: str, note: str = "") -> Callable:
    """An autograd formula for the operator ``backward`` that raises a clear error
    instead of the silently missing terms of PyTorch's autograd fallback: higher
    derivatives come from differentiating ``forward`` with ``create_graph=True``."""

    def refuse(ctx, *grads):
        raise RuntimeError(
            f"{backward} has no derivative of its own: differentiate {forward} with create_graph=True instead{note}"
        )

    return refuse


def functorch_active() -> bool:
    """Whether a ``torch.func`` transform (``grad``, ``jacrev``, ``hessian``, ``vmap``, ...)
    is running.  PyTorch cannot run an operator's registered autograd formula
    under one (``torch.library``'s generated ``autograd.Function`` has no
    ``setup_context`` for them), so the operators' callers then take their plain
    PyTorch path, which every transform differentiates and batches."""
    if torch.compiler.is_compiling():  # the compiler runs the operators' formulas itself
        return False
    return torch._C._functorch.peek_interpreter_stack() is not None
