"""The autograd formula of a backward operator that has no derivative of its own."""

from __future__ import annotations

from typing import Callable


def no_second_derivative(backward: str, forward: str, note: str = "") -> Callable:
    """An autograd formula for the operator ``backward`` that raises a clear error
    instead of the silently missing terms of PyTorch's autograd fallback: higher
    derivatives come from differentiating ``forward`` with ``create_graph=True``."""

    def refuse(ctx, *grads):
        raise RuntimeError(
            f"{backward} has no derivative of its own: differentiate {forward} with create_graph=True instead{note}"
        )

    return refuse
