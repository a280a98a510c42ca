"""``gkg_pyg::smallest_k`` and ``gkg_pyg::knn_smallest_k``: the row-wise top-k
and the dense kNN of :mod:`gkg_pyg.knn` as PyTorch operators.

``smallest_k``: ATen's CPU ``topk`` copies each row into a queue of
(value, index) pairs and partially sorts it.  ``gkg_smallest_k`` in
``csrc/kernels.c`` finds a threshold from the minima of 32 or 64 strided
buckets with vector instructions, keeps the few entries below it and ranks
only those.  The answer is exact: the same indices as
``torch.topk(k, largest=False)`` in the same order, ties broken by the lower
index (where ``torch.topk`` leaves the order of exact ties unspecified).

``knn_smallest_k``: the products, the distances and the selection tile by
tile, so that no distance matrix is written (on GKGNet-S at 224 px the
PyTorch path's ``matmul`` + ``topk`` were 21% of an evaluation pass).

Both operators return indices (no gradient).  Their real implementation
runs the compiled kernel on float32 CPU tensors of at least 2^14 values and
``k <= 32`` and the PyTorch path everywhere else (and where the kernel
declines, on a NaN); their fake implementation gives the shape on any
device, so that ``torch.compile`` and ``torch.export`` keep them as single
opaque calls whose real kernel runs.
"""

from __future__ import annotations

import ctypes
import math
from typing import Optional

import torch
from torch import Tensor
from torch.utils.flop_counter import register_flop_formula

from . import _native

__all__ = ["smallest_k", "knn_smallest_k", "DENSE_BLOCK_ELEMENTS"]

# Upper bound on the elements of one block of the PyTorch path's distance matrix: 8 MiB in float32,
# below glibc's mmap threshold, so that the blocks reuse heap memory instead of faulting in fresh
# pages on every call (the stage-1 kNN at 448 px, batch 4: 557 -> 452 ms per call against blocks of
# 2^25; eval 1.10x, training step 1.015x).
DENSE_BLOCK_ELEMENTS = 1 << 21


def _select_shape_ok(n: int, k: int) -> bool:
    return 1 <= k <= min(32, n)


def _smallest_k_kernel(dist: Tensor, k: int) -> Optional[Tensor]:
    """The compiled top-k, or ``None`` where it does not apply or declines (a NaN row)."""
    n = dist.shape[-1]
    if not _select_shape_ok(n, k) or dist.device.type != "cpu" or dist.dtype != torch.float32:
        return None
    if dist.numel() < _native.MIN_ELEMENTS:
        return None
    library = _native.library()
    if library is None:
        return None
    dist = dist.contiguous()
    out = torch.empty(*dist.shape[:-1], k, dtype=torch.long)
    status = library.gkg_smallest_k(
        dist.data_ptr(), dist.numel() // n, n, k, out.data_ptr(), _native.threads(dist.numel())
    )
    return out if status == 0 else None


def _smallest_k(dist: Tensor, k: int) -> Tensor:
    if math.prod(dist.shape[:-1]) == 0:  # no rows (torch.topk would still check k against their length)
        return torch.empty(*dist.shape[:-1], k, dtype=torch.long, device=dist.device)
    out = _smallest_k_kernel(dist, k)
    return out if out is not None else dist.topk(k, dim=-1, largest=False).indices


@torch.library.custom_op("gkg_pyg::smallest_k", mutates_args=())
def _smallest_k_op(dist: Tensor, k: int) -> Tensor:
    return _smallest_k(dist, k)


@_smallest_k_op.register_fake
def _(dist: Tensor, k: int) -> Tensor:
    return dist.new_empty((*dist.shape[:-1], k), dtype=torch.long)


_SMALLEST_K = torch.ops.gkg_pyg.smallest_k.default


def smallest_k(dist: Tensor, k: int) -> Tensor:
    """``dist.topk(k, dim=-1, largest=False).indices``: the indices of the ``k``
    smallest entries of every row of ``dist`` ``(..., n)``, ascending, int64
    ``(..., k)``; the operator ``gkg_pyg::smallest_k``.

    Float32 CPU rows with ``k <= 32`` run on the compiled kernel (ties by the
    lower index), on up to ``torch.get_num_threads()`` threads; everything
    else, and any call with a row holding a NaN, runs on ``torch.topk``.
    """
    if dist.dim() == 0 or k < 0 or (k > dist.shape[-1] and math.prod(dist.shape[:-1]) > 0):
        raise ValueError(f"smallest_k needs 0 <= k <= n for rows (..., n); got k={k} for shape {tuple(dist.shape)}")
    return _SMALLEST_K(dist, k)


# ---------------------------------------------------------------------------
# The dense kNN
# ---------------------------------------------------------------------------
def _knn_kernel(dst: Tensor, src: Tensor, dst_sq: Tensor, src_sq: Tensor, bias: Optional[Tensor], k: int):
    """The compiled kNN, or ``None`` where it does not apply or declines (a NaN distance)."""
    g, b, r, c = dst.shape
    n = src.shape[2]
    if not _select_shape_ok(n, k) or g * b * r * n < _native.MIN_ELEMENTS or c < 1:
        return None
    tensors = (dst, src, dst_sq, src_sq) + (() if bias is None else (bias,))
    if any(t.device.type != "cpu" or t.dtype != torch.float32 for t in tensors):
        return None
    library = _native.library()
    if library is None:
        return None
    dst, src = (t if t.stride(-1) == 1 else t.contiguous() for t in (dst, src))
    dst_sq, src_sq = dst_sq.contiguous(), src_sq.contiguous()
    bias = None if bias is None else bias.contiguous()
    out = torch.empty(g, b, r, k, dtype=torch.long)
    strides = [(ctypes.c_int64 * 3)(*t.stride()[:3]) for t in (dst, src)]
    status = library.gkg_knn(
        dst.data_ptr(),
        strides[0],
        dst_sq.data_ptr(),
        src.data_ptr(),
        strides[1],
        src_sq.data_ptr(),
        None if bias is None else bias.data_ptr(),
        g,
        b,
        r,
        n,
        c,
        k,
        out.data_ptr(),
        _native.threads(g * b * r * n),
    )
    return out if status == 0 else None


def _knn_blocked(dst: Tensor, src: Tensor, dst_sq: Tensor, src_sq: Tensor, bias: Optional[Tensor], k: int) -> Tensor:
    """The PyTorch path: blocked ``matmul`` + top-k over (groups, graphs,
    destinations, sources) blocks of at most :data:`DENSE_BLOCK_ELEMENTS`
    distances, each ``((p * -2 + dst_sq) + src_sq) - bias`` in place
    (bit-identical to the out-of-place expression: ``-2x`` is exact and
    ``a + (-2x)`` equals ``a - 2x``)."""
    groups, num_graphs, n_dst, _ = dst.shape
    n_src = src.shape[2]
    out = torch.empty(groups, num_graphs, n_dst, k, dtype=torch.long, device=dst.device)
    src_sq = src_sq.unsqueeze(-2)  # (groups, graphs, 1, n_src)
    dst_sq = dst_sq.unsqueeze(-1)  # (groups, graphs, n_dst, 1)
    # Blocks of `per` graphs x `rows` destinations.  Whenever per > 1 one block holds all
    # destinations, so the row blocks are the same for every graph chunk and each block of the bias
    # is converted once.
    per = max(1, DENSE_BLOCK_ELEMENTS // max(1, groups * n_dst * n_src))
    rows = max(1, DENSE_BLOCK_ELEMENTS // max(1, groups * per * n_src))
    graph_blocks = [slice(b0, b0 + per) for b0 in range(0, num_graphs, per)]
    for r0 in range(0, n_dst, rows):
        block_bias = None if bias is None else bias[r0 : r0 + rows].to(src.dtype)
        for graphs in graph_blocks:
            s, dd = src[:, graphs], dst[:, graphs, r0 : r0 + rows]
            dist = torch.matmul(dd, s.transpose(-1, -2)).mul_(-2).add_(dst_sq[:, graphs, r0 : r0 + rows])
            dist = dist.add_(src_sq[:, graphs])
            if block_bias is not None:
                dist = dist.sub_(block_bias)
            out[:, graphs, r0 : r0 + rows] = _smallest_k(dist, k)
    return out


@torch.library.custom_op("gkg_pyg::knn_smallest_k", mutates_args=())
def _knn_smallest_k_op(
    dst: Tensor, src: Tensor, dst_sq: Tensor, src_sq: Tensor, bias: Optional[Tensor], k: int
) -> Tensor:
    out = _knn_kernel(dst, src, dst_sq, src_sq, bias, k)
    return out if out is not None else _knn_blocked(dst, src, dst_sq, src_sq, bias, k)


@_knn_smallest_k_op.register_fake
def _(dst: Tensor, src: Tensor, dst_sq: Tensor, src_sq: Tensor, bias: Optional[Tensor], k: int) -> Tensor:
    g, b, r, _ = dst.shape
    return dst.new_empty((g, b, r, k), dtype=torch.long)


@register_flop_formula(torch.ops.gkg_pyg.knn_smallest_k)
def _knn_flops(dst_shape, src_shape, *args, out_shape=None, **kwargs) -> int:
    """The products ``dst @ src^T`` (what a FLOP counter counted on the PyTorch path)."""
    g, b, r, c = dst_shape
    return 2 * g * b * r * src_shape[2] * c


_KNN_SMALLEST_K = torch.ops.gkg_pyg.knn_smallest_k.default


def knn_smallest_k(dst: Tensor, src: Tensor, dst_sq: Tensor, src_sq: Tensor, bias: Optional[Tensor], k: int) -> Tensor:
    """The dense kNN's ``k`` nearest sources of every destination: the operator
    ``gkg_pyg::knn_smallest_k``, ``(G, B, R, k)`` int64, ranked as
    :func:`smallest_k` ranks.

    ``dst`` is ``(G, B, R, c)``, ``src`` ``(G, B, n, c)`` (any strides),
    ``dst_sq`` ``(G, B, R)``, ``src_sq`` ``(G, B, n)`` and ``bias`` ``(R, n)`` or
    ``None``.  The distances are ``((p * -2 + dst_sq) + src_sq) - bias`` with
    ``p = dst @ src^T``, each operation rounded once in this order.

    On float32 CPU tensors (``k <= 32``, at least 2^14 distances) the compiled
    kernel forms the products in tiles and ranks each row at once: the
    ``(R, n)`` distance matrix is never written.  It accumulates ``p`` over the
    channels in order with fused multiply-adds; the PyTorch path (everywhere
    else, and where the kernel declines on a NaN distance) computes blocked
    ``matmul`` products, which MKL rounds in an order it picks per shape (the
    same as the kernel's for most of GKGNet's products, measured), so a pair
    of sources whose distances lie within a few units in the last place may
    swap ranks between the two paths.
    """
    if dst.dim() != 4 or src.dim() != 4 or dst.shape[:2] != src.shape[:2] or dst.shape[3] != src.shape[3]:
        raise ValueError(
            f"knn_smallest_k needs dst (G, B, R, c) and src (G, B, n, c), got {tuple(dst.shape)} and {tuple(src.shape)}"
        )
    g, b, r, _ = dst.shape
    n = src.shape[2]
    if dst_sq.shape != (g, b, r) or src_sq.shape != (g, b, n):
        raise ValueError(
            f"knn_smallest_k needs dst_sq {(g, b, r)} and src_sq {(g, b, n)}, "
            f"got {tuple(dst_sq.shape)} and {tuple(src_sq.shape)}"
        )
    if bias is not None and bias.shape != (r, n):
        raise ValueError(f"knn_smallest_k needs a bias of shape {(r, n)}, got {tuple(bias.shape)}")
    if k < 0 or (k > n and g * b * r > 0):
        raise ValueError(f"knn_smallest_k: k={k} nearest sources requested, but there are {n}")
    return _KNN_SMALLEST_K(dst, src, dst_sq, src_sq, bias, k)
