"""``gkg_pyg::bn_gelu_linear``: ``linear(GELU(BatchNorm(h)))`` on ``(N, C)`` that
keeps only ``h`` and the batch statistics for the backward pass, where the
normalised and activated tensors are recomputed (cheap elementwise work
against two saved tensors of the hidden width: GKGNet's FFNs and Graphers
keep one hidden tensor per block instead of three).

The forward pass runs the same ATen kernels as the modules
(``native_batch_norm``, ``gelu``, a linear map), so its values are the
modules'.  The backward pass is the operator
``gkg_pyg::bn_gelu_linear_backward``: on float32 CPU tensors of at least 2^14
values its elementwise work (recomputing the activation, GELU's derivative,
BatchNorm's sums and its input gradient) runs in three compiled passes over
``h`` instead of about ten PyTorch operations, several on fresh memory (on
GKGNet-S at 224 px those were a quarter of the backward pass); GELU follows
ATen's vectorised formula, and the gradients agree with the PyTorch path to
float32 rounding, not bit for bit.  Elsewhere it runs PyTorch operations.
Its second derivative is not implemented: asking for one raises a
``RuntimeError``.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor
from torch.utils.flop_counter import register_flop_formula

from . import _native
from .linear import grouped_linear, linear_weight_grad

__all__ = ["bn_gelu_linear"]

_HALF = (torch.float16, torch.bfloat16)


def _stat_dtype(h: Tensor, bn_weight: Tensor) -> torch.dtype:
    """The dtype of ATen's batch statistics: float32 for half-precision ``h`` on CUDA
    or with float32 BatchNorm parameters, else ``h``'s."""
    if h.dtype in _HALF and (h.device.type != "cpu" or bn_weight.dtype != h.dtype):
        return torch.float32
    return h.dtype


@torch.library.custom_op("gkg_pyg::bn_gelu_linear", mutates_args=())
def _bn_gelu_linear_op(
    h: Tensor,
    bn_weight: Tensor,
    bn_bias: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    running_mean: Optional[Tensor],
    running_var: Optional[Tensor],
    training: bool,
    momentum: float,
    eps: float,
) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """``(out, stat_a, stat_b, new_running_mean, new_running_var)``: with ``training``
    (batch statistics) ``stat_a, stat_b`` are the batch mean and inverse standard
    deviation, and the running statistics updated as ``native_batch_norm``
    updates them are returned (empty without running statistics); otherwise
    ``stat_a, stat_b`` are copies of the running mean and variance."""
    update = training and running_mean is not None
    new_mean = running_mean.clone() if update else None
    new_var = running_var.clone() if update else None
    stats = (new_mean, new_var) if training else (running_mean, running_var)
    z, mean, invstd = torch.ops.aten.native_batch_norm(h, bn_weight, bn_bias, *stats, training, momentum, eps)
    if training:
        dtype = _stat_dtype(h, bn_weight)
        stat_a, stat_b = mean.to(dtype), invstd.to(dtype)
    else:
        stat_a, stat_b = running_mean.clone(), running_var.clone()
    a = torch.ops.aten.gelu_(z)  # in place: z is ours alone
    out = grouped_linear(a if a.dtype == weight.dtype else a.to(weight.dtype), weight, bias, 1)
    if not update:
        new_mean, new_var = h.new_empty(0), h.new_empty(0)
    return out, stat_a, stat_b, new_mean, new_var


@_bn_gelu_linear_op.register_fake
def _(h, bn_weight, bn_bias, weight, bias, running_mean, running_var, training, momentum, eps):
    out = h.new_empty(h.shape[0], weight.shape[0], dtype=weight.dtype)
    if training:
        dtype = _stat_dtype(h, bn_weight)
        stats = [h.new_empty(h.shape[1], dtype=dtype) for _ in range(2)]
    else:
        stats = [running_mean.new_empty(running_mean.shape), running_var.new_empty(running_var.shape)]
    if training and running_mean is not None:
        updated = [running_mean.new_empty(running_mean.shape), running_var.new_empty(running_var.shape)]
    else:
        updated = [h.new_empty(0), h.new_empty(0)]
    return (out, *stats, *updated)


def _batch_norm_backward(
    grad: Tensor, x: Tensor, mean: Tensor, invstd: Tensor, weight: Tensor, training: bool, out: Tensor
) -> Tuple[Tensor, Tensor, Tensor]:
    """The gradients of ``BN(x) = (x - mean) * invstd * weight + bias`` on a
    float32 or float64 ``(N, C)`` (batch statistics when ``training``), with
    ``grad_x`` written into ``out``, a scratch tensor of ``x``'s shape:
    ``grad_x, grad_weight, grad_bias``.

    ATen's formula, ``(g - mean(g) - (x - mean) invstd^2 mean(g (x - mean)))
    invstd weight``, without ATen's full-size scratch copy: ``out`` first
    holds ``x - mean``, and both passes go over blocks of rows (4 MiB in
    float32) that stay in cache."""
    rows = max(1, (1 << 20) // max(1, x.shape[1]))
    blocks = list(zip(out.split(rows), x.split(rows), grad.split(rows)))
    sum_grad = grad.sum(0)
    dot = sum((torch.sub(xb, mean, out=ob) * gb).sum(0) for ob, xb, gb in blocks)  # out holds x - mean
    if not blocks:  # no rows
        dot = torch.zeros_like(sum_grad)
    grad_weight, grad_bias, scale = dot * invstd, sum_grad, invstd * weight
    if not training:
        return torch.mul(grad, scale, out=out), grad_weight, grad_bias
    n = x.shape[0]
    xmu_scale, shift = -dot * invstd * invstd / n * scale, -sum_grad / n * scale
    for ob, _, gb in blocks:  # (g - mean(g) - (x - mean) k) * scale, as shift + (x - mean) k' + g scale
        torch.addcmul(shift, ob, xmu_scale, out=ob).addcmul_(gb, scale)
    return out, grad_weight, grad_bias


def _backward_kernels(
    grad_out: Tensor,
    h: Tensor,
    mean: Tensor,
    invstd: Tensor,
    bn_weight: Tensor,
    bn_bias: Tensor,
    weight: Tensor,
    training: bool,
) -> Optional[Tuple[Tensor, Tensor, Tensor, Tensor]]:
    """``(grad_h, grad_bn_weight, grad_bn_bias, grad_weight)`` from the compiled
    passes, or ``None`` where they do not apply (float32 CPU tensors, ``h`` with
    at least 2^14 values).

    ``BN(h) = (h - mean) * invstd * bn_weight + bn_bias``.  The passes:
    ``a = GELU(BN(h))`` for ``grad_weight = grad_out^T a``; then
    ``grad_z = (grad_out @ weight) * GELU'(BN(h))`` with BatchNorm's two sums;
    then BatchNorm's input gradient (with the batch statistics' gradient when
    ``training``), in place, as ATen's formula gives it.
    """
    n, c = h.shape
    tensors = (grad_out, h, mean, invstd, bn_weight, bn_bias, weight)
    if h.numel() < _native.MIN_ELEMENTS or c < 1:
        return None
    if any(t.device.type != "cpu" or t.dtype != torch.float32 for t in tensors):
        return None
    library = _native.library()
    if library is None:
        return None
    h = h.contiguous()
    threads = _native.threads(h.numel())
    alpha = (invstd * bn_weight).contiguous()  # BN(h) = h * alpha + beta, ATen's form of the affine map
    beta = (bn_bias - mean * alpha).contiguous()
    mean = mean.contiguous()
    activated = torch.empty_like(h)
    library.gkg_bn_gelu(h.data_ptr(), n, c, alpha.data_ptr(), beta.data_ptr(), activated.data_ptr(), threads)
    grad_weight = linear_weight_grad(grad_out, activated)
    # grad_z into the same buffer: one hidden-width temporary, whose pages pass 1 has touched already
    grad = torch.mm(grad_out, weight, out=activated)
    sums = torch.empty(2 * c, dtype=torch.float64)
    # fixed statistics: grad_h = grad_z * invstd * bn_weight, in the same pass
    fixed_scale = None if training else alpha
    status = library.gkg_bn_gelu_backward(
        h.data_ptr(),
        grad.data_ptr(),
        n,
        c,
        alpha.data_ptr(),
        beta.data_ptr(),
        mean.data_ptr(),
        None if fixed_scale is None else fixed_scale.data_ptr(),
        sums.data_ptr(),
        threads,
    )
    if status != 0:
        return None
    sum_grad, dot = sums[:c], sums[c:]
    grad_bn_weight, grad_bn_bias = (dot * invstd).float(), sum_grad.float()
    if training:  # (g - mean(g) - (h - mean) invstd^2 mean(g (h - mean))) invstd bn_weight
        alpha64 = alpha.double()
        xmu_scale = (-dot * invstd.double() ** 2 / n * alpha64).float()
        shift = (-sum_grad / n * alpha64).float()
        library.gkg_bn_backward(
            h.data_ptr(),
            grad.data_ptr(),
            n,
            c,
            mean.data_ptr(),
            alpha.data_ptr(),
            xmu_scale.data_ptr(),
            shift.data_ptr(),
            threads,
        )
    return grad, grad_bn_weight, grad_bn_bias, grad_weight


def _backward_pytorch(
    grad_out: Tensor,
    h: Tensor,
    stat_a: Tensor,
    stat_b: Tensor,
    m: Tensor,
    s: Tensor,
    bn_weight: Tensor,
    bn_bias: Tensor,
    weight: Tensor,
    training: bool,
    eps: float,
) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """The PyTorch path.  Under autocast the linear map ran in ``weight``'s (half)
    dtype while ``h`` may be half or float32: ``z`` is recomputed in ``h``'s dtype
    as the forward pass did, the products run in ``grad_out``'s.  The hidden-width
    temporaries are updated in place and reused (the same kernels, so the same
    values): three of them at most, ``h`` included, where out-of-place steps and
    ATen's CPU BatchNorm backward (which allocates a scratch copy) had made the
    heap grow at the widest FFNs."""
    z = (h - m).mul_(s * bn_weight).add_(bn_bias).to(h.dtype)
    grad_z = (grad_out @ weight.to(grad_out.dtype)).to(h.dtype)
    grad_z = torch.ops.aten.gelu_backward.grad_input(grad_z, z, grad_input=grad_z)
    grad_weight = grad_out.t() @ torch.ops.aten.gelu_(z).to(grad_out.dtype)
    if h.device.type == "cpu" and h.dtype in (torch.float32, torch.float64):
        grad_h, grad_bn_weight, grad_bn_bias = _batch_norm_backward(grad_z, h, m, s, bn_weight, training, z)
    else:  # ATen's kernel: on CUDA one fused kernel; for half-precision h it accumulates in float32
        del z
        # with batch statistics the saved mean and inverse deviation, else the running mean and variance
        running = (None, None) if training else (stat_a, stat_b)
        grad_h, grad_bn_weight, grad_bn_bias = torch.ops.aten.native_batch_norm_backward(
            grad_z, h, bn_weight, *running, m, s, training, eps, [True] * 3
        )
    return grad_h, grad_bn_weight, grad_bn_bias, grad_weight


@torch.library.custom_op("gkg_pyg::bn_gelu_linear_backward", mutates_args=())
def _bn_gelu_linear_backward_op(
    grad_out: Tensor,
    h: Tensor,
    stat_a: Tensor,
    stat_b: Tensor,
    bn_weight: Tensor,
    bn_bias: Tensor,
    weight: Tensor,
    training: bool,
    eps: float,
) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """``(grad_h, grad_bn_weight, grad_bn_bias, grad_weight, grad_bias)`` of
    ``gkg_pyg::bn_gelu_linear`` from its saved ``stat_a, stat_b``, each in its
    input's dtype (``grad_bias`` in ``weight``'s)."""
    m, s = (stat_a, stat_b) if training else (stat_a, torch.rsqrt(stat_b + eps))
    grads = _backward_kernels(grad_out, h, m, s, bn_weight, bn_bias, weight, training)
    if grads is None:
        grads = _backward_pytorch(grad_out, h, stat_a, stat_b, m, s, bn_weight, bn_bias, weight, training, eps)
    grad_h, grad_bn_weight, grad_bn_bias, grad_weight = grads
    return (
        grad_h.to(h.dtype).contiguous(),
        grad_bn_weight.to(bn_weight.dtype),
        grad_bn_bias.to(bn_bias.dtype),
        grad_weight.to(weight.dtype),
        grad_out.sum(0).to(weight.dtype),
    )


@_bn_gelu_linear_backward_op.register_fake
def _(grad_out, h, stat_a, stat_b, bn_weight, bn_bias, weight, training, eps):
    return (
        h.new_empty(h.shape),
        bn_weight.new_empty(bn_weight.shape),
        bn_bias.new_empty(bn_bias.shape),
        weight.new_empty(weight.shape),
        weight.new_empty(weight.shape[0]),
    )


def _no_second_derivative(ctx, *grads):
    raise RuntimeError(
        "the second derivative of gkg_pyg::bn_gelu_linear is not supported; for double backward (a gradient "
        "penalty, say) run the modules unfused: linear(GELU(BatchNorm(h)))"
    )


# Without a formula PyTorch's autograd fallback would only warn and return wrong (missing) terms.
_bn_gelu_linear_backward_op.register_autograd(_no_second_derivative)
_BACKWARD = torch.ops.gkg_pyg.bn_gelu_linear_backward.default


def _setup(ctx, inputs, output) -> None:
    h, bn_weight, bn_bias, weight, bias, _, _, training, _, eps = inputs
    _, stat_a, stat_b, new_mean, new_var = output
    ctx.save_for_backward(h, bn_weight, bn_bias, weight, stat_a, stat_b)
    ctx.training, ctx.eps, ctx.has_bias = training, eps, bias is not None
    ctx.mark_non_differentiable(stat_a, stat_b, new_mean, new_var)


def _backward(ctx, grad_out: Tensor, *_unused):
    h, bn_weight, bn_bias, weight, stat_a, stat_b = ctx.saved_tensors
    grad_h, grad_bn_weight, grad_bn_bias, grad_weight, grad_bias = _BACKWARD(
        grad_out, h, stat_a, stat_b, bn_weight, bn_bias, weight, ctx.training, ctx.eps
    )
    return (
        grad_h,
        grad_bn_weight,
        grad_bn_bias,
        grad_weight,
        grad_bias if ctx.has_bias else None,
    ) + (None,) * 5


_bn_gelu_linear_op.register_autograd(_backward, setup_context=_setup)
_BN_GELU_LINEAR = torch.ops.gkg_pyg.bn_gelu_linear.default


@register_flop_formula(torch.ops.gkg_pyg.bn_gelu_linear)
def _forward_flops(h_shape, bn_weight_shape, bn_bias_shape, weight_shape, *args, out_shape=None, **kwargs) -> int:
    """The linear map's product (what a FLOP counter counts on the modules)."""
    return 2 * h_shape[0] * weight_shape[0] * weight_shape[1]


@register_flop_formula(torch.ops.gkg_pyg.bn_gelu_linear_backward)
def _backward_flops(grad_out_shape, h_shape, *args, out_shape=None, **kwargs) -> int:
    """Its two products: ``grad_out @ weight`` and ``grad_out^T @ GELU(BN(h))``."""
    return 4 * h_shape[0] * h_shape[1] * grad_out_shape[1]


def bn_gelu_linear(
    h: Tensor,
    bn_weight: Tensor,
    bn_bias: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    running_mean: Optional[Tensor],
    running_var: Optional[Tensor],
    training: bool,
    momentum: Optional[float],
    eps: float,
) -> Tensor:
    """``F.linear(F.gelu(F.batch_norm(h, running_mean, running_var, bn_weight,
    bn_bias, training, momentum, eps)), weight, bias)`` on ``(..., C)`` features
    (BatchNorm over all leading dimensions), ``(..., C_out)`` out: the operator
    ``gkg_pyg::bn_gelu_linear``, which keeps only ``h`` and the ``C`` batch
    statistics for the backward pass.

    As ``F.batch_norm``: with ``training`` (or without running statistics) it
    normalises with the batch statistics and, given running statistics,
    updates them in place with ``momentum`` (a float: for a cumulative average
    pass ``1 / num_batches_tracked``); counting ``num_batches_tracked`` is the
    caller's.  Under autocast the linear map runs in the autocast dtype (as
    ``F.linear`` would), BatchNorm and GELU in ``h``'s.  Gradients: first
    order only (a second derivative raises a ``RuntimeError``).
    """
    c = h.shape[-1] if h.dim() else 0
    if bn_weight is None or bn_bias is None:
        raise ValueError("bn_gelu_linear needs an affine BatchNorm (bn_weight and bn_bias)")
    if h.dim() < 2 or bn_weight.shape != (c,) or bn_bias.shape != (c,) or weight.dim() != 2 or weight.shape[1] != c:
        raise ValueError(
            f"bn_gelu_linear needs h (..., C), bn_weight and bn_bias (C,), weight (C_out, C); got h "
            f"{tuple(h.shape)}, bn_weight {tuple(bn_weight.shape)}, bn_bias {tuple(bn_bias.shape)}, "
            f"weight {tuple(weight.shape)}"
        )
    if (running_mean is None) != (running_var is None):
        raise ValueError("bn_gelu_linear needs both running_mean and running_var, or neither")
    batch_stats = training or running_mean is None
    if batch_stats and running_mean is not None and momentum is None:
        raise ValueError("bn_gelu_linear needs a float momentum to update the running statistics")
    device_type = h.device.type
    if torch.is_autocast_enabled(device_type) and weight.dtype != torch.float64:
        dtype = torch.get_autocast_dtype(device_type)  # F.linear's dtype under autocast
        weight, bias = weight.to(dtype), None if bias is None else bias.to(dtype)
    rows = h.reshape(-1, c)
    out, _, _, new_mean, new_var = _BN_GELU_LINEAR(
        rows, bn_weight, bn_bias, weight, bias, running_mean, running_var, batch_stats, momentum or 0.0, eps
    )
    if batch_stats and running_mean is not None:
        running_mean.copy_(new_mean)
        running_var.copy_(new_var)
    return out.view(*h.shape[:-1], out.shape[-1])
