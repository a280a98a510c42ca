"""Linear maps on node features routed to oneDNN where that pays.

:func:`grouped_linear` and :func:`linear_weight_grad` choose between MKL's
matrix products and oneDNN's 1x1 convolutions by size.  In eager code they
are plain ATen calls.  Under ``torch.compile`` a map routed to oneDNN is the
operator ``gkg_pyg::onednn_linear`` (its backward pass the operator
``gkg_pyg::onednn_linear_backward``), so that the compiler's own layout
choices around a traced convolution do not copy the rows; exporters, tracers
and dispatch modes (:func:`_recorded`) see the plain matrix product.
"""

from __future__ import annotations

from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils._python_dispatch import is_in_torch_dispatch_mode

from ._autograd import no_second_derivative

__all__ = ["grouped_linear", "linear_weight_grad"]


_ONEDNN_BUILT = torch.backends.mkldnn.is_available()


def _onednn_linear(x: Tensor, weight: Tensor, bias: Optional[Tensor], groups: int) -> Tensor:
    """:func:`grouped_linear` as a oneDNN 1x1 convolution over a channels-last view of the rows (no copy)."""
    m, n = x.numel() // x.shape[-1], weight.shape[0]
    rows = x.reshape(1, m, 1, x.shape[-1]).permute(0, 3, 1, 2)  # (1, in, M, 1), channels-last strides
    out = F.conv2d(rows, weight.reshape(n, weight.shape[1], 1, 1), bias, groups=groups)
    return out.permute(0, 2, 3, 1).reshape(*x.shape[:-1], n)


@torch.library.custom_op("gkg_pyg::onednn_linear", mutates_args=())
def _onednn_linear_op(x: Tensor, weight: Tensor, bias: Optional[Tensor], groups: int) -> Tensor:
    """:func:`_onednn_linear` as one operator, for compiled code: the compiler's own layout choices
    around a traced convolution would copy the rows."""
    return _onednn_linear(x, weight, bias, groups).contiguous()


@_onednn_linear_op.register_fake
def _(x: Tensor, weight: Tensor, bias: Optional[Tensor], groups: int) -> Tensor:
    return x.new_empty(*x.shape[:-1], weight.shape[0])


@torch.library.custom_op("gkg_pyg::onednn_linear_backward", mutates_args=())
def _onednn_linear_backward_op(
    grad_out: Tensor, x: Tensor, weight: Tensor, groups: int, output_mask: List[bool]
) -> Tuple[Tensor, Tensor, Tensor]:
    """``(grad_x, grad_weight, grad_bias)`` of ``gkg_pyg::onednn_linear`` from oneDNN's 1x1 convolution
    backward over the same channels-last views (what autograd runs for :func:`_onednn_linear` in eager
    code); an output left out by ``output_mask`` is empty."""
    m, n = x.numel() // x.shape[-1], weight.shape[0]
    rows = x.reshape(1, m, 1, x.shape[-1]).permute(0, 3, 1, 2)
    grad_rows = grad_out.reshape(1, m, 1, n).permute(0, 3, 1, 2)
    grad_x, grad_weight, grad_bias = torch.ops.aten.convolution_backward(
        grad_rows, rows, weight.reshape(n, weight.shape[1], 1, 1), [n], [1, 1], [0, 0], [1, 1], False, [0, 0],
        groups, output_mask,
    )  # fmt: skip
    empty = x.new_empty(0)
    return (
        grad_x.permute(0, 2, 3, 1).reshape(x.shape).contiguous() if output_mask[0] else empty,
        grad_weight.reshape(weight.shape).contiguous() if output_mask[1] else empty.clone(),
        grad_bias if output_mask[2] else empty.clone(),
    )


@_onednn_linear_backward_op.register_fake
def _(grad_out, x, weight, groups, output_mask):
    return (
        x.new_empty(x.shape) if output_mask[0] else x.new_empty(0),
        weight.new_empty(weight.shape) if output_mask[1] else x.new_empty(0),
        weight.new_empty(weight.shape[0]) if output_mask[2] else x.new_empty(0),
    )


def _plain_grouped_linear(
    x: Tensor, weight: Tensor, bias: Optional[Tensor], groups: int, bias_in_place: bool = False
) -> Tensor:
    """The grouped map with ``bmm`` (``groups == 1``: ``F.linear``).  ``bias_in_place``: the bias
    is added into the product (a fresh tensor autograd does not keep), not into a new tensor;
    without it the map is functional (what decompositions need).  Under autocast the bias is cast
    to the half-precision product, as ``F.linear`` and ``conv2d`` do, so the output stays half."""
    if groups == 1:
        return F.linear(x, weight, bias)
    out_channels, in_per_group = weight.shape
    w = weight.view(groups, out_channels // groups, in_per_group)
    out = torch.bmm(x.reshape(-1, groups, in_per_group).transpose(0, 1), w.transpose(1, 2))
    out = out.transpose(0, 1).reshape(*x.shape[:-1], out_channels)
    if bias is None:
        return out
    return out.add_(bias.to(out.dtype)) if bias_in_place else out + bias.to(out.dtype)


def _onednn_setup(ctx, inputs, output) -> None:
    x, weight, bias, groups = inputs
    ctx.save_for_backward(x, weight, bias)
    ctx.groups = groups


def _onednn_backward(ctx, grad_out: Tensor):
    x, weight, bias = ctx.saved_tensors
    mask = [ctx.needs_input_grad[0], ctx.needs_input_grad[1], bias is not None and ctx.needs_input_grad[2]]
    if torch.is_grad_enabled():  # the backward pass is itself recorded (create_graph): the plain map's gradients
        wanted = [t for t, need in zip((x, weight, bias), mask) if need]
        out = _plain_grouped_linear(x, weight, bias, ctx.groups)
        grads = iter(torch.autograd.grad(out, wanted, grad_out, create_graph=True))
        return tuple(next(grads) if need else None for need in mask) + (None,)
    grads = torch.ops.gkg_pyg.onednn_linear_backward(grad_out, x, weight, ctx.groups, mask)
    return tuple(g if need else None for g, need in zip(grads, mask)) + (None,)


_onednn_linear_op.register_autograd(_onednn_backward, setup_context=_onednn_setup)
_onednn_linear_backward_op.register_autograd(
    no_second_derivative("gkg_pyg::onednn_linear_backward", "gkg_pyg::onednn_linear")
)


def _recorded() -> bool:
    """Whether a compiler, exporter, tracer or dispatch mode (a FLOP counter, fake
    tensors) records or intercepts the call: the oneDNN routing then steps aside,
    so that they see the plain matrix product."""
    return (
        torch.compiler.is_compiling()
        or torch.compiler.is_exporting()
        or torch.jit.is_tracing()
        or torch.onnx.is_in_onnx_export()
        or is_in_torch_dispatch_mode()
    )


def grouped_linear(x: Tensor, weight: Tensor, bias: Optional[Tensor], groups: int) -> Tensor:
    """A linear map with ``groups`` independent weight blocks (a 1x1 grouped
    convolution on ``(..., in)`` node features) with the ``(out, in / groups)``
    weight of a grouped ``Conv2d`` without its trailing ``1 x 1`` (``groups=1``:
    ``F.linear``).

    On the CPU in float32 with more than one thread (where ATen runs 1x1
    convolutions with oneDNN), the map runs as a 1x1 convolution over a
    channels-last view of the ``(M, in)`` rows, which needs no copy: on many
    rows (GKGNet's first stages) it measured up to 2x faster than MKL's
    ``addmm`` and ``bmm``, on small inputs slower (see :func:`_onednn_pays`).
    A grouped map takes this path only without autograd, since oneDNN's
    grouped backward measured slower than ``bmm``'s.  The values agree with
    ``F.linear`` to float32 rounding (a different summation order).
    """
    if _onednn_pays(x, weight, bias, groups):
        if torch.compiler.is_compiling():  # one opaque call: the compiler's layout choices would copy the rows
            return torch.ops.gkg_pyg.onednn_linear(x, weight, bias, groups)
        return _onednn_linear(x, weight, bias, groups)
    return _plain_grouped_linear(x, weight, bias, groups, bias_in_place=True)


# (rows, multiply-adds) from which oneDNN's faster kernel outweighs its per-call overhead (measured here:
# 640 rows of 80 -> 80 channels 0.44x, 640 x 640 -> 2560 0.74x, 2048 x 64 -> 128 0.77x the speed of addmm;
# GKGNet-S's stage 3 at 224 px batch 8, 1568 rows of 400 -> 1600 channels and the like: a whole evaluation
# pass 1.03-1.04x faster in paired runs, a training step unchanged).
_ONEDNN_SIZES = ((2048, 1 << 26), (1024, 1 << 27))


def _onednn_pays(x: Tensor, weight: Tensor, bias: Optional[Tensor], groups: int) -> bool:
    """Whether :func:`grouped_linear` runs as a oneDNN 1x1 convolution: rows
    that :func:`_onednn_usable` accepts, a float32 weight and bias, at least 2048
    rows and 2^26 multiply-adds or 1024 and 2^27, and for a grouped map no
    gradient to compute."""
    if x.dim() < 2 or x.numel() == 0 or not _onednn_usable(x):
        return False
    if any(t is not None and t.dtype != torch.float32 for t in (weight, bias)):
        return False
    rows = x.numel() // x.shape[-1]
    if not any(rows >= r and rows * weight.numel() >= macs for r, macs in _ONEDNN_SIZES):
        return False
    return groups == 1 or not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad))


def _onednn_usable(x: Tensor) -> bool:
    """Float32 CPU work that ATen's oneDNN convolutions can take: oneDNN built
    and on, more than one thread (with one, ATen runs its own slower 1x1
    kernel), not under autocast (whose half-precision ``linear`` is oneDNN
    already), and nothing recording the call (:func:`_recorded`)."""
    if x.device.type != "cpu" or x.dtype != torch.float32 or torch.is_autocast_enabled("cpu"):
        return False
    if torch.compiler.is_compiling():
        # Compiled code calls the oneDNN map as one operator, with its backward pass as another (the
        # thread count and oneDNN's switch are no values a graph can read: those of the process hold).
        return _ONEDNN_BUILT and not torch.compiler.is_exporting()
    if _recorded() or torch.get_num_threads() < 2 or not torch.backends.mkldnn.is_available():
        return False
    return torch.backends.mkldnn.enabled


# Rows and outputs from which oneDNN's weight gradient beat MKL's (measured here, 2 threads: 4096 to
# 50176 rows of 64 .. 160 -> 160 .. 640 channels, 145-191 GFLOP/s against MKL's 105-161; with more
# outputs (1568 rows of 400 -> 800 or 1600) MKL was as fast or faster).
_ONEDNN_WEIGHT_GRAD = (4096, 160)


def linear_weight_grad(grad_out: Tensor, x: Tensor) -> Tensor:
    """``grad_out^T @ x``: the ``(out, in)`` weight gradient of a linear map
    from ``(M, in)`` rows ``x`` to rows whose gradient is ``(M, out)``.

    On many rows into few outputs (at least 4096 rows, at most 160 outputs)
    where :func:`_onednn_usable` allows, oneDNN's 1x1 convolution weight
    gradient over channels-last views of the rows (no copies): GKGNet-S's
    first stage at 224 px, 25088 rows of 80 x 320, ran at 170-190 GFLOP/s
    there against MKL's 110-135.  Otherwise MKL's ``grad_out.t() @ x``.  Both
    return a contiguous result (the parameter's layout: autograd would copy
    any other into it); the values agree to rounding (a different summation
    order).
    """
    rows, out_channels = grad_out.shape
    in_channels = x.shape[1]
    min_rows, max_outputs = _ONEDNN_WEIGHT_GRAD
    if rows >= min_rows and out_channels <= max_outputs and grad_out.dtype == torch.float32 and _onednn_usable(x):
        grad_rows = grad_out.reshape(1, rows, 1, out_channels).permute(0, 3, 1, 2)  # (1, out, M, 1), channels-last
        x_rows = x.reshape(1, rows, 1, in_channels).permute(0, 3, 1, 2)
        weight = grad_out.new_empty(out_channels, in_channels, 1, 1)  # its sizes only: never read
        _, grad_weight, _ = torch.ops.aten.convolution_backward(
            grad_rows, x_rows, weight, None, [1, 1], [0, 0], [1, 1], False, [0, 0], 1, [False, True, False]
        )
        return grad_weight.view(out_channels, in_channels)
    return grad_out.t() @ x
