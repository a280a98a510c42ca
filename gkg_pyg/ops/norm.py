"""``gkg_pyg::batch_norm``: a BatchNorm with batch statistics as one opaque call in compiled code.

Eager code runs ATen's BatchNorm kernels.  Under ``torch.compile`` the
compiler would generate the training BatchNorm itself, and on the CPU it
generates the backward pass's sums over the rows of ``(N, C)`` node features
as one scalar loop per channel down a column (strided, not vectorised).  On
the CPU the operator keeps ATen's ``native_batch_norm`` and
``native_batch_norm_backward`` there, the kernels (and values) of eager code;
on a GPU the compiler's own BatchNorm stays.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor, nn

from ._autograd import no_second_derivative
from .fused import _no_output, _stat_dtype, refuse_one_value_per_channel

__all__ = ["batch_norm", "opaque_batch_norm", "batch_norm_with_statistics"]


def batch_norm_with_statistics(
    x: Tensor,
    weight: Tensor,
    bias: Tensor,
    running_mean: Optional[Tensor],
    running_var: Optional[Tensor],
    momentum: float,
    eps: float,
) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """``(out, mean, invstd, new_running_mean, new_running_var)``: ATen's
    ``native_batch_norm`` with batch statistics over dimension 1 of ``x``, the
    updated running statistics returned (empty without them) instead of
    written in place."""
    update = running_mean is not None
    new_mean = running_mean.clone() if update else None
    new_var = running_var.clone() if update else None
    out, mean, invstd = torch.ops.aten.native_batch_norm(x, weight, bias, new_mean, new_var, True, momentum, eps)
    if not update:
        new_mean, new_var = _no_output(x), _no_output(x)
    return out, mean, invstd, new_mean, new_var


_batch_norm_op = torch.library.custom_op("gkg_pyg::batch_norm", batch_norm_with_statistics, mutates_args=())


@_batch_norm_op.register_fake
def _(x, weight, bias, running_mean, running_var, momentum, eps):
    stats = [x.new_empty(x.shape[1], dtype=_stat_dtype(x, weight)) for _ in range(2)]
    if running_mean is None:
        updated = [_no_output(x), _no_output(x)]
    else:
        updated = [running_mean.new_empty(running_mean.shape), running_var.new_empty(running_var.shape)]
    return (torch.empty_like(x), *stats, *updated)


@torch.library.custom_op("gkg_pyg::batch_norm_backward", mutates_args=())
def _batch_norm_backward_op(
    grad_out: Tensor, x: Tensor, weight: Tensor, mean: Tensor, invstd: Tensor, eps: float
) -> Tuple[Tensor, Tensor, Tensor]:
    """``(grad_x, grad_weight, grad_bias)`` of ``gkg_pyg::batch_norm``: ATen's ``native_batch_norm_backward``."""
    return torch.ops.aten.native_batch_norm_backward(
        grad_out, x, weight, None, None, mean, invstd, True, eps, [True, True, True]
    )


@_batch_norm_backward_op.register_fake
def _(grad_out, x, weight, mean, invstd, eps):
    return torch.empty_like(x), weight.new_empty(weight.shape), weight.new_empty(weight.shape)


def _setup(ctx, inputs, output) -> None:
    x, weight, bias, _, _, _, eps = inputs
    ctx.save_for_backward(x, weight, bias, output[1], output[2])
    ctx.eps = eps
    ctx.mark_non_differentiable(*output[1:])


def _backward(ctx, grad_out: Tensor, *_unused):
    x, weight, bias, mean, invstd = ctx.saved_tensors
    if torch.is_grad_enabled():  # the backward pass is itself recorded (create_graph): the plain BatchNorm's
        out = torch.nn.functional.batch_norm(x, None, None, weight, bias, True, 0.0, ctx.eps)
        grads = torch.autograd.grad(out, (x, weight, bias), grad_out, create_graph=True)
    else:
        grads = torch.ops.gkg_pyg.batch_norm_backward(grad_out, x, weight, mean, invstd, ctx.eps)
    return (*grads, None, None, None, None)


_batch_norm_op.register_autograd(_backward, setup_context=_setup)
_batch_norm_backward_op.register_autograd(no_second_derivative("gkg_pyg::batch_norm_backward", "gkg_pyg::batch_norm"))


def opaque_batch_norm(bn: nn.Module) -> bool:
    """Whether :func:`batch_norm` runs ``bn`` as the operator: in compiled code (not
    exported), on the CPU (on a GPU the compiler's generated BatchNorm is the
    fast path), with batch statistics, affine, with a float momentum where it
    tracks running statistics."""
    if not torch.compiler.is_compiling() or torch.compiler.is_exporting() or not bn.affine:
        return False
    batch_stats = bn.training or bn.running_mean is None
    on_cpu = bn.weight.device.type == "cpu"
    return on_cpu and batch_stats and (bn.running_mean is None or bn.momentum is not None)


def batch_norm(x: Tensor, bn: nn.Module) -> Tensor:
    """``bn(x)`` over dimension 1 of ``x`` as the operator ``gkg_pyg::batch_norm``,
    counting ``num_batches_tracked`` and updating the running statistics as the
    module does (check :func:`opaque_batch_norm` first)."""
    refuse_one_value_per_channel(x, x.shape[1])
    momentum = 0.0
    if bn.running_mean is not None:
        bn.num_batches_tracked.add_(1)
        momentum = bn.momentum
    out, _, _, new_mean, new_var = torch.ops.gkg_pyg.batch_norm(
        x, bn.weight, bn.bias, bn.running_mean, bn.running_var, momentum, bn.eps
    )
    if bn.running_mean is not None:
        bn.running_mean.copy_(new_mean)
        bn.running_var.copy_(new_var)
    return out
