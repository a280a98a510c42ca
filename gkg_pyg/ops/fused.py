"""``gkg_pyg::bn_gelu_linear``: ``linear(GELU(BatchNorm(h)))``, or ``GELU(BatchNorm(h))``
without a linear map, on ``(N, C)`` features, keeping only ``h`` and the batch
statistics for the backward pass, where the normalised and activated tensors
are recomputed (cheap elementwise work against two saved tensors of the
hidden width: GKGNet's FFNs keep one hidden tensor per block instead of
three, the update of :class:`gkg_pyg.GroupMaxRelConv` two instead of three).

The forward pass runs the same ATen kernels as the modules
(``native_batch_norm``, ``gelu``, a linear map), so its values are the
modules'.  The backward pass is the operator
``gkg_pyg::bn_gelu_linear_backward``: on float32 CPU tensors of at least 2^14
values its elementwise work (recomputing the activation, GELU's derivative,
BatchNorm's sums and its input gradient) runs in two or three compiled
passes over ``h`` instead of about ten PyTorch operations, several on fresh
memory; GELU follows ATen's vectorised formula, and the gradients agree with
the PyTorch path to float32 rounding, not bit for bit.  Elsewhere it runs
PyTorch operations.

Higher derivatives: when the backward pass is itself recorded
(``create_graph=True``: a gradient penalty, a Hessian-vector product), the
gradients are recomputed from the saved inputs through ``F.batch_norm``,
``F.gelu`` and ``F.linear``, so every derivative is the plain modules'.
Under a ``torch.func`` transform :func:`bn_gelu_linear` calls those
functions directly.  The backward operator called directly has no
derivative (a clear ``RuntimeError``).
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.flop_counter import register_flop_formula

from . import _native
from ._autograd import functorch_active, no_second_derivative
from ._dtypes import as_dtype
from .linear import grouped_linear, linear_input_grad, linear_weight_grad

__all__ = ["bn_gelu_linear", "fusable", "batchnorm_gelu"]

_HALF = (torch.float16, torch.bfloat16)


def autocasting(device_type: str) -> bool:
    """Whether autocast is on for ``device_type`` (never for a device without autocast, such as meta)."""
    return torch.amp.is_autocast_available(device_type) and torch.is_autocast_enabled(device_type)


def refuse_one_value_per_channel(x: Tensor, channels: int) -> None:
    """F.batch_norm's check before batch statistics: one value per channel has no variance."""
    if channels and x.numel() == channels:
        raise ValueError(f"Expected more than 1 value per channel when training, got input size {tuple(x.shape)}")


def _stat_dtype(h: Tensor, bn_weight: Tensor) -> torch.dtype:
    """The dtype of ATen's batch statistics: float32 for half-precision ``h`` on CUDA
    or with float32 BatchNorm parameters, else ``h``'s."""
    if h.dtype in _HALF and (h.device.type != "cpu" or bn_weight.dtype != h.dtype):
        return torch.float32
    return h.dtype


def _no_output(h: Tensor) -> Tensor:
    return h.new_empty(0)


@torch.library.custom_op("gkg_pyg::bn_gelu_linear", mutates_args=())
def _bn_gelu_linear_op(
    h: Tensor,
    bn_weight: Tensor,
    bn_bias: Tensor,
    weight: Optional[Tensor],
    bias: Optional[Tensor],
    running_mean: Optional[Tensor],
    running_var: Optional[Tensor],
    training: bool,
    momentum: float,
    eps: float,
) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """``(out, stat_a, stat_b, new_running_mean, new_running_var)``: ``out`` is
    ``GELU(BN(h))``, mapped by ``weight`` and ``bias`` when a ``weight`` is given.
    With ``training`` (batch statistics) ``stat_a, stat_b`` are the batch mean
    and inverse standard deviation, and the running statistics updated as
    ``native_batch_norm`` updates them are returned (empty without running
    statistics); otherwise ``stat_a, stat_b`` are copies of the running mean
    and variance."""
    update = training and running_mean is not None
    new_mean = running_mean.clone() if update else None
    new_var = running_var.clone() if update else None
    stats = (new_mean, new_var) if training else (running_mean, running_var)
    if h.shape[0] == 0:  # native_batch_norm refuses no rows; F.batch_norm gives none and keeps its statistics
        z, mean, invstd = h.clone(), h.new_zeros(h.shape[1]), h.new_zeros(h.shape[1])
    else:
        z, mean, invstd = torch.ops.aten.native_batch_norm(h, bn_weight, bn_bias, *stats, training, momentum, eps)
    if training:
        dtype = _stat_dtype(h, bn_weight)
        stat_a, stat_b = mean.to(dtype), invstd.to(dtype)
    else:
        stat_a, stat_b = running_mean.clone(), running_var.clone()
    out = torch.ops.aten.gelu_(z)  # in place: z is ours alone
    if weight is not None:
        out = grouped_linear(as_dtype(out, weight.dtype), weight, bias, 1)
    if not update:
        new_mean, new_var = _no_output(h), _no_output(h)
    return out, stat_a, stat_b, new_mean, new_var


@_bn_gelu_linear_op.register_fake
def _(h, bn_weight, bn_bias, weight, bias, running_mean, running_var, training, momentum, eps):
    if weight is None:
        out = h.new_empty(h.shape)
    else:
        out = h.new_empty(h.shape[0], weight.shape[0], dtype=weight.dtype)
    if training:
        dtype = _stat_dtype(h, bn_weight)
        stats = [h.new_empty(h.shape[1], dtype=dtype) for _ in range(2)]
    else:
        stats = [running_mean.new_empty(running_mean.shape), running_var.new_empty(running_var.shape)]
    if training and running_mean is not None:
        updated = [running_mean.new_empty(running_mean.shape), running_var.new_empty(running_var.shape)]
    else:
        updated = [_no_output(h), _no_output(h)]
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


def _kernels(*tensors: Optional[Tensor]):
    """The compiled kernels where they apply to these tensors (float32 CPU, the
    first of at least 2^14 values and at least one column), else ``None``."""
    h = tensors[0]
    if h.numel() < _native.MIN_ELEMENTS or h.shape[1] < 1:
        return None
    if any(t is not None and (t.device.type != "cpu" or t.dtype != torch.float32) for t in tensors):
        return None
    return _native.library()


def _input_grad_kernels(
    library, grad_in: Tensor, grad: Tensor, h: Tensor, mean: Tensor, invstd: Tensor, alpha: Tensor, beta: Tensor,
    training: bool,
) -> Optional[Tuple[Tensor, Tensor, Tensor]]:  # fmt: skip
    """``(grad_h, grad_bn_weight, grad_bn_bias)`` of ``GELU(h * alpha + beta)`` for the
    incoming gradient ``grad_in`` (of GELU's output), ``grad_h`` written into
    ``grad`` (which may be ``grad_in``): ``grad * GELU'(BN(h))`` with BatchNorm's
    two sums in one pass, then BatchNorm's input gradient in place (with the
    batch statistics' gradient when ``training``), as ATen's formula gives it.
    ``None`` if the kernel could not allocate its sums."""
    n, c = h.shape
    threads = _native.threads(h.numel())
    sums = torch.empty(2 * c, dtype=torch.float64)
    fixed_scale = None if training else alpha  # fixed statistics: grad_h = grad_z * invstd * bn_weight, same pass
    status = library.gkg_bn_gelu_backward(
        h.data_ptr(),
        grad_in.data_ptr(),
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
    return grad, grad_bn_weight, grad_bn_bias


def _backward_kernels(
    grad_out: Tensor,
    h: Tensor,
    mean: Tensor,
    invstd: Tensor,
    bn_weight: Tensor,
    bn_bias: Tensor,
    weight: Optional[Tensor],
    training: bool,
) -> Optional[Tuple[Tensor, Tensor, Tensor, Optional[Tensor]]]:
    """``(grad_h, grad_bn_weight, grad_bn_bias, grad_weight)`` from the compiled
    passes, or ``None`` where they do not apply (:func:`_kernels`).

    ``BN(h) = (h - mean) * invstd * bn_weight + bn_bias = h * alpha + beta``.  With
    a ``weight``, first ``a = GELU(BN(h))`` for ``grad_weight = grad_out^T a``, then
    ``grad_out @ weight`` (:func:`~gkg_pyg.ops.linear.linear_input_grad`: into the
    same buffer, or from oneDNN into a new one: two hidden-width temporaries for
    a moment); then :func:`_input_grad_kernels`.
    """
    library = _kernels(h, grad_out, mean, invstd, bn_weight, bn_bias, weight)
    if library is None:
        return None
    n, c = h.shape
    h = h.contiguous()
    alpha = (invstd * bn_weight).contiguous()  # ATen's form of the affine map
    beta = (bn_bias - mean * alpha).contiguous()
    mean = mean.contiguous()
    grad_weight = None
    if weight is None:
        grad_in = grad_out.contiguous()
        grad = torch.empty_like(h)
    else:
        grad = torch.empty_like(h)
        threads = _native.threads(h.numel())
        library.gkg_bn_gelu(h.data_ptr(), n, c, alpha.data_ptr(), beta.data_ptr(), grad.data_ptr(), threads)
        grad_weight = linear_weight_grad(grad_out, grad)
        grad_in = grad = linear_input_grad(grad_out, weight, out=grad)
    grads = _input_grad_kernels(library, grad_in, grad, h, mean, invstd, alpha, beta, training)
    return None if grads is None else (*grads, grad_weight)


def _backward_pytorch(
    grad_out: Tensor,
    h: Tensor,
    stat_a: Tensor,
    stat_b: Tensor,
    m: Tensor,
    s: Tensor,
    bn_weight: Tensor,
    bn_bias: Tensor,
    weight: Optional[Tensor],
    training: bool,
    eps: float,
) -> Tuple[Tensor, Tensor, Tensor, Optional[Tensor]]:
    """The PyTorch path.  Under autocast the linear map ran in ``weight``'s (half)
    dtype while ``h`` may be half or float32: ``z`` is recomputed in ``h``'s dtype
    as the forward pass did, the products run in ``grad_out``'s.  The hidden-width
    temporaries are updated in place and reused (the same kernels, so the same
    values): three of them at most, ``h`` included, where out-of-place steps and
    ATen's CPU BatchNorm backward (which allocates a scratch copy) had made the
    heap grow at the widest FFNs."""
    z = (h - m).mul_(s * bn_weight).add_(bn_bias).to(h.dtype)
    grad_weight = None
    if weight is None:
        grad_z = torch.ops.aten.gelu_backward(grad_out.to(h.dtype), z)
    else:
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
    weight: Optional[Tensor],
    training: bool,
    eps: float,
) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """``(grad_h, grad_bn_weight, grad_bn_bias, grad_weight, grad_bias)`` of
    ``gkg_pyg::bn_gelu_linear`` from its saved ``stat_a, stat_b``, each in its
    input's dtype (``grad_bias`` in ``weight``'s; both empty without a ``weight``)."""
    m, s = (stat_a, stat_b) if training else (stat_a, torch.rsqrt(stat_b + eps))
    grads = _backward_kernels(grad_out, h, m, s, bn_weight, bn_bias, weight, training)
    if grads is None:
        grads = _backward_pytorch(grad_out, h, stat_a, stat_b, m, s, bn_weight, bn_bias, weight, training, eps)
    grad_h, grad_bn_weight, grad_bn_bias, grad_weight = grads
    if weight is None:
        grad_weight, grad_bias = _no_output(h), _no_output(h)  # two tensors: outputs may not alias
    else:
        grad_weight, grad_bias = grad_weight.to(weight.dtype), grad_out.sum(0).to(weight.dtype)
    return (
        grad_h.to(h.dtype).contiguous(),
        grad_bn_weight.to(bn_weight.dtype),
        grad_bn_bias.to(bn_bias.dtype),
        grad_weight,
        grad_bias,
    )


@_bn_gelu_linear_backward_op.register_fake
def _(grad_out, h, stat_a, stat_b, bn_weight, bn_bias, weight, training, eps):
    no_weight = weight is None
    return (
        h.new_empty(h.shape),
        bn_weight.new_empty(bn_weight.shape),
        bn_bias.new_empty(bn_bias.shape),
        _no_output(h) if no_weight else weight.new_empty(weight.shape),
        _no_output(h) if no_weight else weight.new_empty(weight.shape[0]),
    )


_bn_gelu_linear_backward_op.register_autograd(
    no_second_derivative(
        "gkg_pyg::bn_gelu_linear_backward",
        "gkg_pyg::bn_gelu_linear",
        " (which recomputes its gradients through the plain modules)",
    )
)
_BACKWARD = torch.ops.gkg_pyg.bn_gelu_linear_backward.default


def _setup(ctx, inputs, output) -> None:
    h, bn_weight, bn_bias, weight, bias, _, _, training, _, eps = inputs
    _, stat_a, stat_b, new_mean, new_var = output
    ctx.save_for_backward(h, bn_weight, bn_bias, weight, bias, stat_a, stat_b)
    ctx.training, ctx.eps = training, eps
    ctx.mark_non_differentiable(stat_a, stat_b, new_mean, new_var)


def _plain_modules(h, bn_weight, bn_bias, weight, bias, running_mean, running_var, training, momentum, eps) -> Tensor:
    """``F.linear(F.gelu(F.batch_norm(h, ...)))`` (no linear map without a ``weight``) on ``(N, C)``
    rows: the plain modules, which autograd and ``torch.func`` differentiate to any order."""
    out = F.gelu(F.batch_norm(h, running_mean, running_var, bn_weight, bn_bias, training, momentum, eps))
    if weight is not None:
        out = F.linear(as_dtype(out, weight.dtype), weight, bias)
    return out


def _recorded_gradients(ctx, grad_out: Tensor, inputs: Tuple[Optional[Tensor], ...], stat_a: Tensor, stat_b: Tensor):
    """The gradients of the plain modules' ``F.linear(F.gelu(F.batch_norm(h)))``
    recomputed from the saved inputs, with their own graph (``create_graph``), so
    that every higher derivative is the plain path's."""
    running = (None, None) if ctx.training else (stat_a, stat_b)
    out = _plain_modules(*inputs, *running, ctx.training, 0.0, ctx.eps)
    wanted = [t is not None and need for t, need in zip(inputs, ctx.needs_input_grad)]
    grads = iter(
        torch.autograd.grad(
            out, [t for t, w in zip(inputs, wanted) if w], grad_out, create_graph=True, allow_unused=True
        )
    )
    return tuple(next(grads) if w else None for w in wanted)


def _backward(ctx, grad_out: Tensor, *_unused):
    h, bn_weight, bn_bias, weight, bias, stat_a, stat_b = ctx.saved_tensors
    if torch.is_grad_enabled():  # the backward pass is itself being recorded (create_graph=True)
        grads = _recorded_gradients(ctx, grad_out, (h, bn_weight, bn_bias, weight, bias), stat_a, stat_b)
    else:
        grad_h, grad_bn_weight, grad_bn_bias, grad_weight, grad_bias = _BACKWARD(
            grad_out, h, stat_a, stat_b, bn_weight, bn_bias, weight, ctx.training, ctx.eps
        )
        has_weight, has_bias = weight is not None, bias is not None
        grads = (grad_h, grad_bn_weight, grad_bn_bias, grad_weight if has_weight else None)
        grads += (grad_bias if has_bias else None,)
    return grads + (None,) * 5


_bn_gelu_linear_op.register_autograd(_backward, setup_context=_setup)
_BN_GELU_LINEAR = torch.ops.gkg_pyg.bn_gelu_linear.default


@register_flop_formula(torch.ops.gkg_pyg.bn_gelu_linear)
def _forward_flops(h_shape, bn_weight_shape, bn_bias_shape, weight_shape, *args, out_shape=None, **kwargs) -> int:
    """The linear map's product (what a FLOP counter counts on the modules)."""
    return 0 if weight_shape is None else 2 * h_shape[0] * weight_shape[0] * weight_shape[1]


@register_flop_formula(torch.ops.gkg_pyg.bn_gelu_linear_backward)
def _backward_flops(grad_out_shape, h_shape, *args, out_shape=None, **kwargs) -> int:
    """Its two products: ``grad_out @ weight`` and ``grad_out^T @ GELU(BN(h))``."""
    weight_shape = args[4]
    return 0 if weight_shape is None else 4 * h_shape[0] * h_shape[1] * grad_out_shape[1]


def bn_gelu_linear(
    h: Tensor,
    bn_weight: Tensor,
    bn_bias: Tensor,
    weight: Optional[Tensor],
    bias: Optional[Tensor],
    running_mean: Optional[Tensor],
    running_var: Optional[Tensor],
    training: bool,
    momentum: Optional[float],
    eps: float,
) -> Tensor:
    """``F.linear(F.gelu(F.batch_norm(h, running_mean, running_var, bn_weight,
    bn_bias, training, momentum, eps)), weight, bias)`` on ``(..., C)`` features
    (BatchNorm over all leading dimensions), ``(..., C_out)`` out; with ``weight``
    ``None`` no linear map: ``F.gelu(F.batch_norm(...))``, ``(..., C)``.  The
    operator ``gkg_pyg::bn_gelu_linear``, which keeps only ``h`` and the ``C``
    batch statistics for the backward pass.

    As ``F.batch_norm``: with ``training`` (or without running statistics) it
    normalises with the batch statistics and, given running statistics,
    updates them in place with ``momentum`` (a float: for a cumulative average
    pass ``1 / num_batches_tracked``); counting ``num_batches_tracked`` is the
    caller's.  Under autocast the linear map runs in the autocast dtype (as
    ``F.linear`` would), BatchNorm and GELU in ``h``'s.  Derivatives of any
    order (higher ones through the plain modules: see the module's docstring).
    """
    c = h.shape[-1] if h.dim() else 0
    if bn_weight is None or bn_bias is None:
        raise ValueError("bn_gelu_linear needs an affine BatchNorm (bn_weight and bn_bias)")
    bad_weight = weight is not None and (weight.dim() != 2 or weight.shape[1] != c)
    if h.dim() < 2 or bn_weight.shape != (c,) or bn_bias.shape != (c,) or bad_weight:
        raise ValueError(
            f"bn_gelu_linear needs h (..., C), bn_weight and bn_bias (C,), weight (C_out, C) or None; got h "
            f"{tuple(h.shape)}, bn_weight {tuple(bn_weight.shape)}, bn_bias {tuple(bn_bias.shape)}, "
            f"weight {None if weight is None else tuple(weight.shape)}"
        )
    if weight is None and bias is not None:
        raise ValueError("bn_gelu_linear: a bias without a weight")
    if (running_mean is None) != (running_var is None):
        raise ValueError("bn_gelu_linear needs both running_mean and running_var, or neither")
    batch_stats = training or running_mean is None
    if batch_stats and running_mean is not None and momentum is None:
        raise ValueError("bn_gelu_linear needs a float momentum to update the running statistics")
    if batch_stats:
        refuse_one_value_per_channel(h, c)
    device_type = h.device.type
    if weight is not None and autocasting(device_type) and weight.dtype != torch.float64:
        dtype = torch.get_autocast_dtype(device_type)  # F.linear's dtype under autocast
        weight, bias = weight.to(dtype), None if bias is None else bias.to(dtype)
    rows = h.reshape(-1, c)
    if functorch_active():  # the plain modules, which torch.func transforms differentiate
        out = _plain_modules(rows, bn_weight, bn_bias, weight, bias, running_mean, running_var, batch_stats,
                             momentum or 0.0, eps)  # fmt: skip
        return out.view(*h.shape[:-1], out.shape[-1])
    out, _, _, new_mean, new_var = _BN_GELU_LINEAR(
        rows, bn_weight, bn_bias, weight, bias, running_mean, running_var, batch_stats, momentum or 0.0, eps
    )
    if batch_stats and running_mean is not None:
        running_mean.copy_(new_mean)
        running_var.copy_(new_var)
    return out.view(*h.shape[:-1], out.shape[-1])


def fusable(bn: nn.Module, act: nn.Module, batch_norms: Tuple[type, ...] = (nn.BatchNorm1d,)) -> bool:
    """Whether ``act(bn(h))`` can run through :func:`batchnorm_gelu`: ``bn`` is
    exactly one of ``batch_norms`` (a subclass might change the forward pass; a
    ``SyncBatchNorm`` needs its own), affine, tracking running statistics with a
    float momentum, and ``act`` is the exact GELU."""
    return (
        type(bn) in batch_norms
        and bn.affine
        and bn.track_running_stats
        and bn.momentum is not None
        and type(act) is nn.GELU
        and act.approximate == "none"
    )


def batchnorm_gelu(h: Tensor, bn: nn.BatchNorm1d, linear: Optional[nn.Module] = None) -> Tensor:
    """``GELU(bn(h))``, then ``linear`` (an ``nn.Linear``) if given, through
    :func:`bn_gelu_linear` with ``bn``'s parameters and statistics, counting
    ``num_batches_tracked`` as ``bn``'s own forward would (check :func:`fusable` first)."""
    weight, bias = (None, None) if linear is None else (linear.weight, linear.bias)
    out = bn_gelu_linear(
        h, bn.weight, bn.bias, weight, bias, bn.running_mean, bn.running_var, bn.training, bn.momentum, bn.eps
    )
    if bn.training:  # counted after the call, which may refuse the input (fusable: momentum is a float)
        bn.num_batches_tracked.add_(1)
    return out
