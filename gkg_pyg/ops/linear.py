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

import functools
from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils._python_dispatch import is_in_torch_dispatch_mode

from ._autograd import functorch_active, no_second_derivative
from ._dtypes import as_dtype

__all__ = ["grouped_linear", "linear_weight_grad", "linear_input_grad"]


_ONEDNN_BUILT = torch.backends.mkldnn.is_available()


def _onednn_backward_pays(cpu_capability: str) -> bool:
    """Whether oneDNN's 1x1 convolution backward beats MKL's products on a CPU of
    ATen's ``cpu_capability``: only where oneDNN runs AVX-512 kernels.

    With AVX-512 (Zen 4, 2 threads) oneDNN's input gradient measured 1.03-1.25x
    MKL's product (392 to 25088 rows of 80 .. 640 -> 320 .. 2560 channels) and a
    training step 1.25-1.7% faster with it.  With AVX2 (Zen 3) MKL's products
    were faster: both gradients of GKGNet-S's large maps 1.05-1.28x (25088 rows
    of 80 -> 320: 25 against 32 ms), the input gradient alone as fast, and a
    training step 1.02-1.06x faster with MKL's input gradient into the caller's
    buffer, in three paired runs."""
    return cpu_capability.startswith("AVX512")


_ONEDNN_BACKWARD = _onednn_backward_pays(torch.backends.cpu.get_cpu_capability())


@functools.lru_cache(maxsize=256)
def _image_width(rows: int) -> int:
    """The largest divisor of ``rows`` up to 64 (1 for no rows)."""
    return next((w for w in range(min(64, rows), 0, -1) if rows % w == 0), 1)


def _as_image(t: Tensor, channels: int) -> Tensor:
    """``(..., channels)`` rows as a ``(1, channels, M / W, W)`` channels-last image (a view where
    the rows are contiguous).  oneDNN's 1x1 backward kernels block over the image width: a width of
    one (a column of M pixels) ran up to 15% slower (1568 rows of 1600 -> 400 channels, 2 threads)."""
    m = t.numel() // channels
    w = _image_width(m)
    return t.reshape(1, m // w, w, channels).permute(0, 3, 1, 2)


def _conv1x1_backward(
    grad_out: Tensor, x: Tensor, weight: Tensor, output_mask: List[bool]
) -> Tuple[Optional[Tensor], Optional[Tensor], Optional[Tensor]]:
    """``(grad_x, grad_weight, grad_bias)`` of the map ``x @ weight^T`` on ``(M, in)``
    rows (an ``(out, in)`` weight), from oneDNN's 1x1 convolution backward over
    channels-last views of the rows (``x`` is read only for the weight gradient):
    contiguous ``(M, in)`` and ``(out, in)`` results, ``None`` where ``output_mask``
    leaves one out."""
    n, k = weight.shape
    grad_x, grad_weight, grad_bias = torch.ops.aten.convolution_backward(
        _as_image(grad_out, n), _as_image(x, k), weight.reshape(n, k, 1, 1), [n],
        [1, 1], [0, 0], [1, 1], False, [0, 0], 1, output_mask,
    )  # fmt: skip
    return (
        grad_x.permute(0, 2, 3, 1).reshape(-1, k).contiguous() if output_mask[0] else None,
        grad_weight.reshape(n, k).contiguous() if output_mask[1] else None,
        grad_bias if output_mask[2] else None,
    )


def _onednn_linear(x: Tensor, weight: Tensor, bias: Optional[Tensor], groups: int) -> Tensor:
    """:func:`grouped_linear` as a oneDNN 1x1 convolution over a channels-last view of the rows (no copy)."""
    if x.numel() == 0:  # a convolution refuses an empty image
        return _plain_grouped_linear(x, weight, bias, groups)
    n = weight.shape[0]
    out = F.conv2d(_as_image(x, x.shape[-1]), weight.reshape(n, weight.shape[1], 1, 1), bias, groups=groups)
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
    """``(grad_x, grad_weight, grad_bias)`` of ``gkg_pyg::onednn_linear``: without groups, where
    :data:`_ONEDNN_BACKWARD`, oneDNN's 1x1 convolution backward over the same channels-last views (what
    autograd runs for :func:`_onednn_linear`); otherwise (and for no rows) MKL's products of
    :func:`_grouped_linear_backward`; an output left out by ``output_mask`` is empty."""
    if groups > 1 or x.numel() == 0 or not _ONEDNN_BACKWARD:
        return _grouped_linear_backward(grad_out, x, weight, groups, output_mask)
    grad_x, grad_weight, grad_bias = _conv1x1_backward(grad_out, x, weight, output_mask)
    empty = x.new_empty(0)
    return (
        grad_x.view(x.shape) if output_mask[0] else empty,
        grad_weight if output_mask[1] else empty.clone(),
        grad_bias if output_mask[2] else empty.clone(),
    )


def _grouped_linear_backward(
    grad_out: Tensor, x: Tensor, weight: Tensor, groups: int, output_mask: List[bool]
) -> Tuple[Tensor, Tensor, Tensor]:
    """The gradients of a grouped map (``groups == 1``: a plain one) as one MKL product per group and
    gradient, each reading and writing column blocks of the ``(M, channels)`` rows in place: oneDNN's
    grouped 1x1 backward and ``bmm`` over transposed copies measured slower (GKGNet-S's first stage at
    224 px batch 8, 25088 rows of 160 channels in 4 groups: 10 ms against 13 and 15, 2 threads)."""
    out_channels, in_per_group = weight.shape
    out_per_group = out_channels // groups
    grad_rows = grad_out.reshape(-1, out_channels)
    rows = x.reshape(-1, in_per_group * groups)
    empty = x.new_empty(0)
    grad_x = torch.empty_like(rows) if output_mask[0] else empty
    grad_weight = torch.empty_like(weight) if output_mask[1] else empty.clone()
    for g in range(groups):
        outs, ins = slice(g * out_per_group, (g + 1) * out_per_group), slice(g * in_per_group, (g + 1) * in_per_group)
        if output_mask[0]:
            torch.mm(grad_rows[:, outs], weight[outs], out=grad_x[:, ins])
        if output_mask[1]:
            torch.mm(grad_rows[:, outs].t(), rows[:, ins], out=grad_weight[outs])
    return (
        grad_x.view(x.shape) if output_mask[0] else empty,
        grad_weight,
        grad_rows.sum(0) if output_mask[2] else empty.clone(),
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
    bias = as_dtype(bias, out.dtype)
    return out.add_(bias) if bias_in_place else out + bias


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
    """Whether a compiler, exporter, tracer, dispatch mode (a FLOP counter, fake
    tensors) or ``torch.func`` transform records or intercepts the call: the
    oneDNN routing then steps aside, so that they see the plain matrix product."""
    return (
        functorch_active()
        or torch.compiler.is_compiling()
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
    A map with gradients runs oneDNN forward and, if grouped or on a CPU
    without AVX-512 (:func:`_onednn_backward_pays`), MKL's products backward
    (the operator ``gkg_pyg::onednn_linear``); otherwise autograd's oneDNN
    backward.  The values agree with ``F.linear`` to
    float32 rounding (a different summation order).
    """
    if _onednn_pays(x, weight, bias, groups):
        # One operator in compiled code (the compiler's layout choices would copy the rows), and for a map with
        # gradients whose backward pass runs MKL's products (grouped, or without _ONEDNN_BACKWARD).
        if torch.compiler.is_compiling() or ((groups > 1 or not _ONEDNN_BACKWARD) and _needs_grad(x, weight, bias)):
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
    rows and 2^26 multiply-adds or 1024 and 2^27."""
    if x.dim() < 2 or x.numel() == 0 or not _onednn_usable(x):
        return False
    # Plain conditions, no generators: torch.compile traces this for every linear map of the model.
    if weight.dtype != torch.float32 or (bias is not None and bias.dtype != torch.float32):
        return False
    rows = x.numel() // x.shape[-1]
    for least_rows, least_macs in _ONEDNN_SIZES:
        if rows >= least_rows and rows * weight.numel() >= least_macs:
            return True
    return False


def _needs_grad(*tensors: Optional[Tensor]) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


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
        weight = grad_out.new_empty(out_channels, in_channels)  # its sizes only: never read
        return _conv1x1_backward(grad_out, x, weight, [False, True, False])[1]
    return grad_out.t() @ x


# Rows and multiply-adds from which oneDNN's input gradient beat MKL's product where _ONEDNN_BACKWARD (Zen 4,
# 2 threads: 392 to 25088 rows of 80 .. 640 -> 320 .. 2560 channels, 1.03-1.25x; 640 rows of 160 -> 640 as
# fast, of 80 -> 320 0.8x).
_ONEDNN_INPUT_GRAD = (256, 1 << 26)


def linear_input_grad(grad_out: Tensor, weight: Tensor, out: Tensor) -> Tensor:
    """``grad_out @ weight``: the ``(M, in)`` input gradient of a linear map with
    an ``(out, in)`` weight, for ``(M, out)`` rows of ``grad_out``.

    Where :data:`_ONEDNN_BACKWARD` (a CPU with AVX-512), from
    :data:`_ONEDNN_INPUT_GRAD` on (rows that :func:`_onednn_usable` accepts),
    oneDNN's 1x1 convolution input gradient over channels-last views of the
    rows, into a new tensor; otherwise MKL's product into ``out`` (an
    ``(M, in)`` buffer).  The result is contiguous;
    the values agree to rounding (a different summation order).
    """
    min_rows, min_macs = _ONEDNN_INPUT_GRAD
    rows = grad_out.shape[0]
    big = _ONEDNN_BACKWARD and rows >= min_rows and rows * weight.numel() >= min_macs
    if big and weight.dtype == torch.float32 and _onednn_usable(grad_out):
        return _conv1x1_backward(grad_out, out, weight, [True, False, False])[0]  # out: its sizes only
    return torch.mm(grad_out, weight, out=out)
