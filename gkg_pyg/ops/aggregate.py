"""``gkg_pyg::max_relative``: the neighbour maximum of
:class:`gkg_pyg.GroupMaxRelConv` over a regular ``(G, N_dst, k)`` table and the
interleaved ``[x, max - x]`` features that follow it, with its backward pass
``gkg_pyg::max_relative_backward`` (the winner scatter).

The compiled kernel does the forward in one pass over the destinations:
PyTorch needs k row gathers, k - 1 maxima, a difference and a stack (at
stage 1 the gathers copy rows of 40 values, which ATen's ``index_select``
does slowly).  Values and gradients equal the PyTorch path's bit for bit.

Autograd: the gradient of the sources goes to the first maximal neighbour of
every (destination, channel), the *winner*; only the winner's rank (one byte
per value for ``k <= 256``) is kept from the forward pass.  The backward
operator is linear in ``grad_out`` for fixed winners, and has its own
autograd formula (its derivative with respect to ``grad_out`` is a gather at
the winners; with respect to the features it is zero), so that second and
higher derivatives are exact.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from . import _native
from ._autograd import functorch_active

__all__ = ["max_relative", "interleaved"]


def interleaved(x_dst: Tensor, rel: Tensor) -> Tensor:
    """``[x_{i,0}, rel_{i,0}, x_{i,1}, rel_{i,1}, ...]``, ``(N_dst, 2C)``: the layout
    :class:`gkg_pyg.GroupMaxRelConv`'s grouped map expects."""
    return torch.stack([x_dst, rel], dim=-1).view(x_dst.shape[0], 2 * x_dst.shape[1])


def _neighbor_max(x_src: Tensor, neighbors: Tensor, with_rank: bool) -> Tuple[Tensor, Optional[Tensor]]:
    """The PyTorch path: the maximum ``(N_dst * G, C / G)`` and, ``with_rank``, the
    rank of the first maximal neighbour.  One ``(N_dst, C)`` gather per neighbour
    rank is folded into a running maximum: on the CPU several times faster than
    gathering all ``(N_dst, k, C)`` candidates and reducing over ``k`` (it stays
    in cache)."""
    g, n_dst, k = neighbors.shape
    n_src, c = x_src.shape
    # Sub-row n * G + g of x_src viewed as (N_src * G, C / G) is group g of node n; row i * G + g
    # of the result is group g of destination i.
    sub = x_src.reshape(n_src * g, c // g)
    index = (neighbors * g + torch.arange(g, device=neighbors.device).view(g, 1, 1)).permute(2, 1, 0)
    index = index.reshape(k, n_dst * g)  # (k, N_dst * G): rank j's sub-rows
    best = sub.index_select(0, index[0])
    for j in range(1, k):
        torch.maximum(best, sub.index_select(0, index[j]), out=best)
    if not with_rank:
        return best, None
    # The rank of the first maximal neighbour is the number of ranks j whose running maximum over
    # ranks 0..j is still below the final one (a second running maximum; cheaper than masked writes).
    rank_dtype = torch.uint8 if k <= 256 else torch.long
    running, candidate = sub.index_select(0, index[0]), torch.empty_like(best)
    below = torch.lt(running, best)
    rank = below.to(rank_dtype)
    for j in range(1, k - 1):
        torch.maximum(running, torch.index_select(sub, 0, index[j], out=candidate), out=running)
        rank.add_(torch.lt(running, best, out=below))
    return best, rank


def _max_relative_kernel(x_src: Tensor, x_dst: Tensor, neighbors: Tensor, with_rank: bool):
    """``(out, rank)`` from the compiled kernel, or ``None`` where it does not apply
    or declines (a NaN source feature, an index out of range: the PyTorch path then
    propagates the NaN or reports the index)."""
    g, n_dst, k = neighbors.shape
    n_src, c = x_src.shape
    if n_dst * c < _native.MIN_ELEMENTS or (with_rank and k > 256) or neighbors.dtype != torch.long:
        return None
    if x_src.dtype != torch.float32 or x_dst.dtype != torch.float32:
        return None
    if any(t.device.type != "cpu" for t in (x_src, x_dst, neighbors)):
        return None
    library = _native.library()
    if library is None:
        return None
    x_src, x_dst, neighbors = x_src.contiguous(), x_dst.contiguous(), neighbors.contiguous()
    out = torch.empty(n_dst, 2 * c)
    rank = torch.empty(n_dst, c, dtype=torch.uint8) if with_rank else None
    status = library.gkg_max_relative(
        x_src.data_ptr(),
        n_src,
        x_dst.data_ptr(),
        n_dst,
        c,
        g,
        neighbors.data_ptr(),
        k,
        out.data_ptr(),
        None if rank is None else rank.data_ptr(),
        _native.threads(out.numel()),
    )
    return (out, rank) if status == 0 else None


def differentiable_max_relative(x_src: Tensor, x_dst: Tensor, neighbors: Tensor) -> Tensor:
    """:func:`max_relative` in PyTorch operations that autograd and every ``torch.func``
    transform differentiate: per group, all ``(N_dst, k, C / G)`` candidates and
    a gather at the first maximal one (a NaN counts as maximal), so that the
    gradient goes to the operator's winner (``max`` over a dimension may pick
    another of tied candidates)."""
    g = neighbors.shape[0]
    cg = x_src.shape[1] // g
    best = []
    for i in range(g):
        candidates = x_src[:, i * cg : (i + 1) * cg][neighbors[i]]  # (N_dst, k, C / G)
        values = candidates.detach()
        hit = (values == values.amax(dim=1, keepdim=True)) | values.isnan()
        winner = hit.to(torch.uint8).argmax(dim=1, keepdim=True)  # the first maximal rank
        best.append(candidates.gather(1, winner).squeeze(1))
    return interleaved(x_dst, torch.cat(best, dim=1) - x_dst)


def _no_rank(x: Tensor) -> Tensor:
    """The rank output of a call without ``with_rank``: empty and one-dimensional
    (a real rank table is ``(N_dst, C)``)."""
    return x.new_empty(0, dtype=torch.uint8)


def _max_relative_pytorch(x_src: Tensor, x_dst: Tensor, neighbors: Tensor, with_rank: bool) -> Tuple[Tensor, Tensor]:
    n_dst, c = x_dst.shape
    best, rank = _neighbor_max(x_src, neighbors, with_rank)
    out = interleaved(x_dst, best.view(n_dst, c) - x_dst)
    return out, (rank.view(n_dst, c) if rank is not None else _no_rank(x_src))


@torch.library.custom_op("gkg_pyg::max_relative", mutates_args=())
def _max_relative_op(x_src: Tensor, x_dst: Tensor, neighbors: Tensor, with_rank: bool) -> Tuple[Tensor, Tensor]:
    fused = _max_relative_kernel(x_src, x_dst, neighbors, with_rank)
    if fused is None:
        return _max_relative_pytorch(x_src, x_dst, neighbors, with_rank)
    out, rank = fused
    return out, (rank if rank is not None else _no_rank(x_src))


@_max_relative_op.register_fake
def _(x_src: Tensor, x_dst: Tensor, neighbors: Tensor, with_rank: bool) -> Tuple[Tensor, Tensor]:
    n_dst, c = x_dst.shape
    out = x_dst.new_empty(n_dst, 2 * c)
    if not with_rank:
        return out, _no_rank(x_src)
    return out, x_src.new_empty(n_dst, c, dtype=torch.uint8 if neighbors.shape[2] <= 256 else torch.long)


def _winners(neighbors: Tensor, rank: Tensor) -> Tensor:
    """``(N_dst, C)`` int64: the source index of the first maximal neighbour of every
    destination and channel."""
    g, n_dst, _ = neighbors.shape
    c = rank.shape[1]
    winners = neighbors.transpose(0, 1).gather(2, rank.reshape(n_dst, g, c // g).long())  # (N_dst, G, C / G)
    return winners.reshape(n_dst, c).long()


def _max_relative_backward_kernel(grad_out: Tensor, neighbors: Tensor, rank: Tensor, n_src: int) -> Optional[Tensor]:
    """The compiled winner scatter (the same sums in the same order as ``scatter_add_``),
    or ``None`` where it does not apply or declines (an index out of range)."""
    g, n_dst, k = neighbors.shape
    c = grad_out.shape[1] // 2
    if n_dst * c < _native.MIN_ELEMENTS or rank.dtype != torch.uint8 or grad_out.dtype != torch.float32:
        return None
    if any(t.device.type != "cpu" for t in (grad_out, neighbors, rank)) or neighbors.dtype != torch.long:
        return None
    library = _native.library()
    if library is None:
        return None
    grad_out, neighbors, rank = grad_out.contiguous(), neighbors.contiguous(), rank.contiguous()
    grad_src = grad_out.new_zeros(n_src, c)
    status = library.gkg_max_relative_backward(
        grad_out.data_ptr(),
        neighbors.data_ptr(),
        rank.data_ptr(),
        n_src,
        n_dst,
        c,
        g,
        k,
        grad_src.data_ptr(),
        _native.threads(n_dst * c),
    )
    return grad_src if status == 0 else None


def _max_relative_backward_pytorch(grad_out: Tensor, neighbors: Tensor, rank: Tensor, n_src: int) -> Tensor:
    n_dst, c = rank.shape
    grad_max = grad_out.reshape(n_dst, c, 2)[..., 1]
    return grad_out.new_zeros(n_src, c).scatter_add_(0, _winners(neighbors, rank), grad_max)


@torch.library.custom_op("gkg_pyg::max_relative_backward", mutates_args=())
def _max_relative_backward_op(grad_out: Tensor, neighbors: Tensor, rank: Tensor, n_src: int) -> Tensor:
    grad_src = _max_relative_backward_kernel(grad_out, neighbors, rank, n_src)
    if grad_src is None:
        return _max_relative_backward_pytorch(grad_out, neighbors, rank, n_src)
    return grad_src


@_max_relative_backward_op.register_fake
def _(grad_out: Tensor, neighbors: Tensor, rank: Tensor, n_src: int) -> Tensor:
    return grad_out.new_empty(n_src, grad_out.shape[1] // 2)


def _setup_backward_backward(ctx, inputs, output) -> None:
    _, neighbors, rank, _ = inputs
    ctx.save_for_backward(neighbors, rank)


def _backward_backward(ctx, grad_grad_src: Tensor):
    """``grad_src[j, c] = sum_i grad_out[i, 2c + 1] [winner(i, c) = j]`` is linear in
    ``grad_out``: its adjoint reads ``grad_grad_src`` at the winners into the odd
    channels (plain PyTorch operations, so that this formula is differentiable too)."""
    neighbors, rank = ctx.saved_tensors
    n_dst, c = rank.shape
    picked = grad_grad_src.gather(0, _winners(neighbors, rank))  # (N_dst, C)
    return torch.stack([torch.zeros_like(picked), picked], dim=-1).view(n_dst, 2 * c), None, None, None


_max_relative_backward_op.register_autograd(_backward_backward, setup_context=_setup_backward_backward)
_MAX_RELATIVE_BACKWARD = torch.ops.gkg_pyg.max_relative_backward.default


def _setup(ctx, inputs, output) -> None:
    x_src, _, neighbors, _ = inputs
    _, rank = output
    ctx.save_for_backward(neighbors, rank)
    ctx.n_src = x_src.shape[0]


def _backward(ctx, grad_out: Tensor, _grad_rank: Optional[Tensor]):
    neighbors, rank = ctx.saved_tensors
    grad_src = grad_dst = None
    if ctx.needs_input_grad[0]:
        if rank.dim() != 2:
            raise RuntimeError(
                "gkg_pyg::max_relative ran with with_rank=False, so it kept no winners for the gradient of "
                "x_src; call it with with_rank=True when x_src needs a gradient (gkg_pyg.ops.max_relative does)"
            )
        grad_src = _MAX_RELATIVE_BACKWARD(grad_out, neighbors, rank, ctx.n_src)
    if ctx.needs_input_grad[1]:
        grad = grad_out.reshape(grad_out.shape[0], grad_out.shape[1] // 2, 2)
        grad_dst = grad[..., 0] - grad[..., 1]
    return grad_src, grad_dst, None, None


_max_relative_op.register_autograd(_backward, setup_context=_setup)
_MAX_RELATIVE = torch.ops.gkg_pyg.max_relative.default


def max_relative(x_src: Tensor, x_dst: Tensor, neighbors: Tensor) -> Tensor:
    """The interleaved ``[x_dst[i, c], m[i, c] - x_dst[i, c]]``, ``(N_dst, 2C)``, with
    ``m[i, c] = max_j x_src[neighbors[g(c), i, j], c]`` for a ``(G, N_dst, k)`` table
    of source indices, ``g(c)`` the group of channel ``c`` (``G`` contiguous groups
    of ``C / G`` channels): the operator ``gkg_pyg::max_relative``.

    ``x_src`` is ``(N_src, C)``, ``x_dst`` ``(N_dst, C)`` of the same dtype and
    device.  Float32 CPU tensors with at least 2^14 output values run on the
    compiled kernel, everything else on the PyTorch path; both give the same
    values and gradients.  Under a ``torch.func`` transform it runs
    :func:`differentiable_max_relative` (the same values and gradients).  The
    indices are not checked here (the kernel declines an index out of range
    and the PyTorch path raises PyTorch's ``index out of range`` error):
    :class:`gkg_pyg.GroupMaxRelConv` checks them.
    """
    if x_src.dim() != 2 or x_dst.dim() != 2 or x_src.shape[1] != x_dst.shape[1]:
        raise ValueError(
            f"max_relative needs x_src (N_src, C) and x_dst (N_dst, C), got {tuple(x_src.shape)} and "
            f"{tuple(x_dst.shape)}"
        )
    if x_src.dtype != x_dst.dtype:
        raise ValueError(f"max_relative needs x_src and x_dst of one dtype, got {x_src.dtype} and {x_dst.dtype}")
    shape = tuple(neighbors.shape)
    if len(shape) != 3 or shape[0] < 1 or shape[1] != x_dst.shape[0] or shape[2] < 1 or x_src.shape[1] % shape[0]:
        raise ValueError(
            f"max_relative needs neighbors (G, N_dst={x_dst.shape[0]}, k) with k >= 1 and G >= 1 dividing "
            f"C={x_src.shape[1]}, got {shape}"
        )
    if neighbors.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"max_relative needs int64 or int32 neighbour indices, got {neighbors.dtype}")
    if functorch_active():
        return differentiable_max_relative(x_src, x_dst, neighbors)
    with_rank = x_src.requires_grad and torch.is_grad_enabled()
    return _MAX_RELATIVE(x_src, x_dst, neighbors, with_rank)[0]
