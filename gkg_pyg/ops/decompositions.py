"""The ``gkg_pyg::`` operators as plain ATen operations, for exporters.

``torch.export`` keeps each ``gkg_pyg::`` operator as one call (the program
then needs ``gkg_pyg.ops`` imported wherever it is loaded or run).  An
exporter that knows only ATen operators (``torch.onnx.export``) needs them
decomposed first::

    program = torch.export.export(model, args, dynamic_shapes=...)
    program = program.run_decompositions(gkg_pyg.ops.plain_decompositions())
    torch.onnx.export(program, args, "model.onnx", dynamo=True)

Each decomposition is the operator's PyTorch path (the values the operator
gives without its compiled kernels): ``topk`` for the selections, blocked
matrix products for the dense kNN (every block holding all graphs, so that
the graph count stays symbolic), the gathers and maxima of the neighbour
maximum.
"""

from __future__ import annotations

from typing import Callable, Dict, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from . import cluster  # noqa: F401  (registers gkg_pyg::cluster_knn)
from ._dtypes import as_dtype
from .aggregate import _max_relative_backward_pytorch, _no_rank, interleaved
from .fused import _stat_dtype
from .knn import DENSE_BLOCK_ELEMENTS
from .linear import _plain_grouped_linear
from .norm import batch_norm_with_statistics

__all__ = ["plain_decompositions"]


def _topk_smallest(dist: Tensor, k: int) -> Tensor:
    return dist.topk(k, dim=-1, largest=False).indices


def _max_relative(x_src: Tensor, x_dst: Tensor, neighbors: Tensor, with_rank: bool):
    """The operator's maxima and ranks out of place (a decomposition must be functional) in
    a few large operations per group, for exporters: the group's columns of all ``k``
    neighbours gathered at once, their maximum and, ``with_rank``, the first maximal rank
    (``argmax``).  Without viewing ``x_src`` as sub-rows (an exported program fixes a view
    to the strides it was traced with), and with ``split`` and ``select`` rather than
    indexing, which also records full-range slices: an exporter writes every operation
    as a node of its own, and an ONNX optimizer's time grows with the square of their number."""
    g, _, k = neighbors.shape
    bests, ranks = [], []
    for group, cols in enumerate(x_src.split(x_src.shape[1] // g, dim=1)):
        candidates = cols.index_select(0, neighbors.select(0, group).reshape(-1)).view(-1, k, cols.shape[1])
        bests.append(candidates.amax(dim=1))
        if with_rank:
            ranks.append(candidates.argmax(dim=1).to(torch.uint8 if k <= 256 else torch.long))
    out = interleaved(x_dst, torch.cat(bests, dim=1) - x_dst)
    return out, torch.cat(ranks, dim=1) if with_rank else _no_rank(x_src)


def _rows(t: Tensor, dim: int, start: int, length: int) -> Tensor:
    """``length`` rows of ``t`` along ``dim`` from ``start``; ``t`` itself when that is all of
    them, which records no slice operator."""
    return t if start == 0 and length == t.shape[dim] else t.narrow(dim, start, length)


def _knn_smallest_k(dst: Tensor, src: Tensor, dst_sq: Tensor, src_sq: Tensor, bias: Optional[Tensor], k: int):
    """The blocked PyTorch path of :func:`gkg_pyg.ops.knn.knn_smallest_k` out of
    place (the same operations, so the same values): blocks of destination rows,
    each holding all graphs, so that the graph count stays symbolic."""
    groups, _, n_dst, _ = dst.shape
    n_src = src.shape[2]
    rows = max(1, DENSE_BLOCK_ELEMENTS // max(1, groups * n_src))
    src_t, src_sq = src.transpose(-1, -2), src_sq.unsqueeze(-2)
    blocks = []
    for r0 in range(0, n_dst, rows):
        n = min(rows, n_dst - r0)
        dist = torch.matmul(_rows(dst, 2, r0, n), src_t) * -2 + _rows(dst_sq, 2, r0, n).unsqueeze(-1)
        dist = dist + src_sq
        if bias is not None:
            dist = dist - as_dtype(_rows(bias, 0, r0, n), src.dtype)
        blocks.append(_topk_smallest(dist, k))
    if not blocks:
        return torch.empty(*dst.shape[:3], k, dtype=torch.long, device=dst.device)
    return torch.cat(blocks, dim=2) if len(blocks) > 1 else blocks[0]


def _cluster_knn(sources: Tensor, queries: Tensor, k: int) -> Tensor:
    """``gkg_pyg::cluster_knn`` without torch-cluster: the ``k`` nearest sources by
    squared distance from blocked products (:func:`_knn_smallest_k`), in ascending
    index order as the operator returns them.  Sources whose distances tie at the
    ``k``-th place, or lie within rounding of it, may be chosen otherwise."""
    sq = lambda t: (t * t).sum(-1).unsqueeze(0)  # noqa: E731
    nearest = _knn_smallest_k(queries.unsqueeze(0), sources.unsqueeze(0), sq(queries), sq(sources), None, k)[0]
    return nearest.sort(dim=-1).values


def _bn_gelu_linear(h, bn_weight, bn_bias, weight, bias, running_mean, running_var, training, momentum, eps):
    """``gkg_pyg::bn_gelu_linear`` (with or without its linear map) with ATen's functional
    BatchNorm variants (the same kernels as ``native_batch_norm``) and an out-of-place GELU."""
    empty = (h.new_empty(0), h.new_empty(0))
    if not training:
        z, _, _ = torch.ops.aten._native_batch_norm_legit_no_training(
            h, bn_weight, bn_bias, running_mean, running_var, momentum, eps
        )
        stats, updated = (running_mean.clone(), running_var.clone()), empty
    elif running_mean is None:
        z, mean, invstd = torch.ops.aten._native_batch_norm_legit.no_stats(h, bn_weight, bn_bias, True, momentum, eps)
        stats, updated = (mean, invstd), empty
    else:
        z, mean, invstd, new_mean, new_var = torch.ops.aten._native_batch_norm_legit_functional(
            h, bn_weight, bn_bias, running_mean, running_var, True, momentum, eps
        )
        stats, updated = (mean, invstd), (new_mean, new_var)
    if training:
        dtype = _stat_dtype(h, bn_weight)
        stats = tuple(t.to(dtype) for t in stats)
    out = F.gelu(z)
    if weight is not None:
        out = F.linear(as_dtype(out, weight.dtype), weight, bias)
    return (out, *stats, *updated)


def plain_decompositions() -> Dict[torch._ops.OpOverload, Callable]:
    """``{operator: function}`` for ``ExportedProgram.run_decompositions``: every
    forward ``gkg_pyg::`` operator (and ``max_relative_backward``) as its PyTorch
    path, and nothing else (ATen operators stay as they are, so an exporter
    applies its own decompositions to them).  ``bn_gelu_linear_backward``,
    ``onednn_linear_backward`` and ``batch_norm_backward`` have none: export the model for inference."""
    return {
        torch.ops.gkg_pyg.smallest_k.default: _topk_smallest,
        torch.ops.gkg_pyg.knn_smallest_k.default: _knn_smallest_k,
        torch.ops.gkg_pyg.max_relative.default: _max_relative,
        torch.ops.gkg_pyg.max_relative_backward.default: _max_relative_backward_pytorch,
        torch.ops.gkg_pyg.bn_gelu_linear.default: _bn_gelu_linear,
        torch.ops.gkg_pyg.onednn_linear.default: _plain_grouped_linear,
        torch.ops.gkg_pyg.batch_norm.default: batch_norm_with_statistics,
        torch.ops.gkg_pyg.cluster_knn.default: _cluster_knn,
    }
