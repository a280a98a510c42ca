"""``gkg_pyg::cluster_knn``: torch-cluster's k-nearest-neighbour search as a
PyTorch operator with a static output shape.

``torch_cluster.knn`` returns a ``(2, E)`` edge list whose length ``E`` is only
known after the search (on CUDA it drops the slots it could not fill with a
``masked_select``), and it has no fake implementation, so ``FakeTensorMode``,
``torch.compile`` and ``torch.export`` call its real CPU kernel on fake
tensors (``RuntimeError: Not compiled with CUDA support``).  The group kNN
always asks for ``k <= n_src`` neighbours of finite points, so every query
gets exactly ``k``: this operator returns that regular ``(E, n, k)`` table,
whose shape follows from the inputs' shapes, and its fake implementation
gives that shape on any device.  A search that comes back with another count
(non-finite coordinates; on CUDA distances beyond torch-cluster's 1e10
limit) is a ``RuntimeError`` in the real implementation.

On the CPU, torch-cluster searches a KD-tree on one thread for a batch of
examples (its ``num_workers`` applies only to unbatched calls); the real
implementation splits the queries into one contiguous piece per PyTorch
intra-op thread and searches the pieces concurrently (the kernel releases the
GIL), each with its own tree over the sources of the examples it touches.

This module imports only torch and torch-cluster.
"""

from __future__ import annotations

import math
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import List, Optional, Tuple

import torch
from torch import Tensor

try:  # compiled from source; optional so that a plain `pip install` works
    import torch_cluster
except ImportError:  # pragma: no cover - depends on the environment
    torch_cluster = None

__all__ = ["cluster_knn", "has_torch_cluster", "CUDA_MAX_K"]

# torch-cluster's CUDA kernel keeps at most 100 neighbours per query.
CUDA_MAX_K = 100

_pool: Optional[ThreadPoolExecutor] = None
_pool_workers = 0
_pool_lock = threading.Lock()


def _forget_pool() -> None:
    """A forked child (a DataLoader worker) has none of the parent's threads: start a new pool there."""
    global _pool, _pool_workers, _pool_lock
    _pool, _pool_workers, _pool_lock = None, 0, threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_pool)


def has_torch_cluster() -> bool:
    return torch_cluster is not None


def _executor(workers: int) -> ThreadPoolExecutor:
    global _pool, _pool_workers
    with _pool_lock:
        if _pool is None or _pool_workers < workers:
            _pool, _pool_workers = ThreadPoolExecutor(workers, thread_name_prefix="gkg_pyg-cluster"), workers
        return _pool


def _pieces(count: int, n: int, parts: int) -> List[Tuple[int, int, int, int]]:
    """Split ``count`` examples of ``n`` queries into about ``parts`` pieces
    ``(e0, e1, r0, r1)``: runs of whole examples when there are at least as many
    examples as parts, else row ranges of single examples."""
    if parts <= 1:
        return [(0, count, 0, n)]
    if count >= parts:
        step = math.ceil(count / parts)
        return [(e0, min(e0 + step, count), 0, n) for e0 in range(0, count, step)]
    per = math.ceil(n / math.ceil(parts / count))
    return [(e, e + 1, r0, min(r0 + per, n)) for e in range(count) for r0 in range(0, n, per)]


def _search(sources: Tensor, queries: Tensor, k: int) -> Tensor:
    """One torch-cluster call: ``(E, n_src, D)`` and ``(E, n, D)`` -> ``(E, n, k)``
    local source indices in ascending order."""
    count, n_src, width = sources.shape
    n = queries.shape[1]
    example = torch.arange(count, device=sources.device).view(-1, 1)
    row, col = torch_cluster.knn(
        sources.reshape(-1, width),
        queries.reshape(-1, width),
        k,
        example.expand(count, n_src).reshape(-1),
        example.expand(count, n).reshape(-1),
        batch_size=count,
    )
    if row.numel() != count * n * k:  # a shape, known on the host once the search is done
        raise RuntimeError(
            f"torch_cluster.knn returned {row.numel()} neighbours instead of {count * n * k} "
            "(non-finite coordinates, or on CUDA distances beyond its 1e10 limit?)"
        )
    # torch-cluster promises no order: group by query (its CPU kernel returns them grouped, which a
    # pass over the rows confirms more cheaply than a sort; on CUDA that check would synchronise).
    if sources.device.type != "cpu" or not bool((row[1:] >= row[:-1]).all()):
        col = col[torch.argsort(row, stable=True)]
    col = col.view(count, n, k) - example.view(-1, 1, 1) * n_src
    return col.sort(dim=-1).values


def _cluster_knn(sources: Tensor, queries: Tensor, k: int) -> Tensor:
    count, _, _ = sources.shape
    n = queries.shape[1]
    if count * n == 0 or k == 0:
        return torch.empty(count, n, k, dtype=torch.long, device=queries.device)
    sources, queries = sources.contiguous(), queries.contiguous()
    threads = torch.get_num_threads() if sources.device.type == "cpu" else 1
    pieces = _pieces(count, n, min(threads, count * n))
    if len(pieces) == 1:
        return _search(sources, queries, k)
    out = torch.empty(count, n, k, dtype=torch.long, device=queries.device)

    def run(piece):
        e0, e1, r0, r1 = piece
        out[e0:e1, r0:r1] = _search(sources[e0:e1], queries[e0:e1, r0:r1], k)

    for future in [_executor(len(pieces)).submit(run, piece) for piece in pieces]:
        future.result()  # re-raises a piece's error
    return out


@torch.library.custom_op("gkg_pyg::cluster_knn", mutates_args=())
def _cluster_knn_op(sources: Tensor, queries: Tensor, k: int) -> Tensor:
    return _cluster_knn(sources, queries, k)


@_cluster_knn_op.register_fake
def _(sources: Tensor, queries: Tensor, k: int) -> Tensor:
    return queries.new_empty((queries.shape[0], queries.shape[1], k), dtype=torch.long)


_CLUSTER_KNN = torch.ops.gkg_pyg.cluster_knn.default


def cluster_knn(sources: Tensor, queries: Tensor, k: int) -> Tensor:
    """The ``k`` nearest sources (squared euclidean distance) of every query, per
    example, by ``torch_cluster.knn``: the operator ``gkg_pyg::cluster_knn``.

    Args:
        sources: ``(E, n_src, D)`` floating-point points of ``E`` examples.
        queries: ``(E, n, D)``, same dtype and device.
        k: neighbours per query, ``1 <= k <= n_src`` (and ``<= 100`` on CUDA).

    Returns:
        ``LongTensor (E, n, k)``: the chosen sources' indices within their
        example (``0 .. n_src - 1``), in ascending index order (a set: the
        caller ranks them).  Ties at the ``k``-th distance are broken as
        torch-cluster breaks them.  Carries no gradient.
    """
    if torch_cluster is None:
        raise ImportError("gkg_pyg::cluster_knn needs the torch-cluster package, which is not installed")
    if sources.dim() != 3 or queries.dim() != 3 or sources.shape[0] != queries.shape[0]:
        raise ValueError(
            "cluster_knn needs sources (E, n_src, D) and queries (E, n, D), got "
            f"{tuple(sources.shape)} and {tuple(queries.shape)}"
        )
    if sources.shape[2] != queries.shape[2]:
        raise ValueError(f"cluster_knn: sources have {sources.shape[2]} coordinates, queries {queries.shape[2]}")
    if sources.dtype != queries.dtype or not sources.is_floating_point():
        raise ValueError(
            f"cluster_knn needs floating-point points of one dtype, got {sources.dtype} and {queries.dtype}"
        )
    if sources.device != queries.device:
        raise ValueError(f"cluster_knn: sources on {sources.device}, queries on {queries.device}")
    n_src = sources.shape[1]
    if queries.shape[0] * queries.shape[1] > 0 and not 1 <= k <= n_src:
        raise ValueError(f"cluster_knn: k={k} nearest sources requested, but the examples have {n_src}")
    if sources.device.type == "cuda" and k > CUDA_MAX_K:
        raise ValueError(f"torch-cluster's CUDA kNN keeps at most {CUDA_MAX_K} neighbours, got k={k}")
    return _CLUSTER_KNN(sources, queries, k)
