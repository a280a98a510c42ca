"""Group k-nearest-neighbour graph construction.

The feature channels are split into ``groups`` contiguous chunks.  In every
group each destination node picks its ``k`` nearest source nodes of the same
graph, by the squared euclidean distance of the L2-normalised sub-vectors
(that is, by cosine similarity), minus an optional position bias.

Two entry points share the same backend kernels:

* :func:`group_knn`, the library API: PyG node lists with ``batch`` vectors,
  checked input (graph sizes, sortedness, finiteness), PyG edges out.
* :func:`batched_group_knn`, for callers that hold equal-sized graphs as
  ``(B, N, C)`` tensors (the GKGNet model): no host synchronisation, per-image
  neighbour tables out.

Edge format
-----------
:func:`group_knn` returns a ``LongTensor`` of shape ``(groups, 2, num_dst * k)``:
``edge_index[g, 0]`` holds source indices into ``x_src`` and
``edge_index[g, 1]`` destination indices into ``x_dst``.  Within a group the
edges are ordered by destination, then by rank (nearest first), so
``edge_index[g, 0].view(num_dst, k)`` is the neighbour table of group ``g``.
:class:`gkg_pyg.GroupMaxRelConv` consumes this tensor directly; one slice
``edge_index[g]`` is an ordinary PyG ``edge_index``.

Backends
--------
``"dense"``: on the CPU in float32, one compiled pass that forms the
distances tile by tile and ranks each row at once
(:func:`gkg_pyg.native.knn_smallest_k`; ties to the lower source index);
elsewhere blocked matrix products and ``topk`` (chunked so that one distance
block holds at most :data:`DENSE_BLOCK_ELEMENTS` values).  The two round
the products' sums in different orders, so in float32 sources whose
distances lie within a few units in the last place may swap ranks.
Both backends rank in at least float32, also for half-precision features
and under autocast (the features are upcast; the graph costs little next
to the model, and half-precision distances would reorder close neighbours).
``"torch_cluster"``: ``torch_cluster.knn`` on augmented coordinates that fold
the position bias in, then an exact re-ranking of its ``k * dilation``
candidates from the small features (see :func:`_cluster_knn`).
``"auto"``: the dense backend on the CPU, where it measured 5-9x faster
(README, Benchmark; ``experiments/benchmark_knn.py``); on CUDA torch-cluster
when installed and ``k * dilation <= 100`` (the design's choice for GPU edge
sets; not yet measured against the dense backend there).
"""

from __future__ import annotations

import warnings
from contextlib import nullcontext
from typing import List, Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor

from .native import knn_smallest_k, smallest_k

try:  # compiled from source; optional so that a plain `pip install` works
    import torch_cluster
except ImportError:  # pragma: no cover - depends on the environment
    torch_cluster = None

__all__ = ["group_knn", "batched_group_knn", "dense_position_bias", "has_torch_cluster", "resolve_backend"]

PositionBias = Union[Tensor, Tuple[Tensor, Tensor]]

# Upper bound on the elements of one block of the dense distance matrix: 8 MiB in float32, below
# glibc's mmap threshold, so that the blocks reuse heap memory instead of faulting in fresh pages on
# every call (the stage-1 kNN at 448 px, batch 4: 557 -> 452 ms per call against blocks of 2^25;
# eval 1.10x, training step 1.015x).
DENSE_BLOCK_ELEMENTS = 1 << 21
# Upper bound on the bytes of the temporaries of one torch-cluster chunk
# (augmented coordinates, torch-cluster's result, the re-ranked candidates).
CLUSTER_CHUNK_BYTES = 1 << 28
# torch-cluster's CUDA kernel keeps at most 100 neighbours per query.
CLUSTER_CUDA_MAX_K = 100
INSTALL_HINT = "pip install --no-build-isolation torch-cluster (./setup.sh compiles it)"

_warned_no_cluster = False


def has_torch_cluster() -> bool:
    return torch_cluster is not None


def resolve_backend(backend: str, device: torch.device, needed: Optional[int] = None) -> str:
    """Map a requested backend to the one that runs for ``needed = k * dilation``
    neighbours on ``device``.

    ``"auto"`` is the dense backend on the CPU (it measured 5-9x faster
    than torch-cluster there) and torch-cluster on CUDA when it is installed
    and ``needed`` fits its CUDA kernel (else the dense backend, with a one-time
    warning when the package is missing).  An explicit ``"torch_cluster"``
    never falls back: without the package it raises an ``ImportError``.
    """
    global _warned_no_cluster
    if backend not in ("auto", "dense", "torch_cluster"):
        raise ValueError(f"unknown kNN backend {backend!r}; expected 'auto', 'dense' or 'torch_cluster'")
    device = torch.device(device)
    too_many = device.type == "cuda" and needed is not None and needed > CLUSTER_CUDA_MAX_K
    if backend == "torch_cluster":
        if torch_cluster is None:
            raise ImportError(
                "kNN backend 'torch_cluster' needs the torch-cluster package, which is not "
                f"installed: {INSTALL_HINT}; or use backend='auto' or 'dense'"
            )
        if too_many:
            raise ValueError(
                f"torch-cluster's CUDA kNN keeps at most {CLUSTER_CUDA_MAX_K} neighbours, but "
                f"k * dilation = {needed}; use backend='dense'"
            )
        return "torch_cluster"
    if backend == "dense" or device.type != "cuda" or too_many:
        return "dense"
    if torch_cluster is None:
        if not _warned_no_cluster:
            warnings.warn(
                f"torch-cluster is not installed: group_knn uses the dense backend on CUDA ({INSTALL_HINT})",
                stacklevel=3,
            )
            _warned_no_cluster = True
        return "dense"
    return "torch_cluster"


def _bias_shape(position_bias: PositionBias) -> Tuple[int, int]:
    if isinstance(position_bias, Tensor):
        if position_bias.dim() != 2:
            raise ValueError(f"position_bias must be (n_dst, n_src), got shape {tuple(position_bias.shape)}")
        return tuple(position_bias.shape)
    u, v = position_bias
    if u.dim() != 2 or v.dim() != 2 or u.shape[1] != v.shape[1]:
        raise ValueError(
            "a factored position_bias (U, V) needs U: (n_dst, r) and V: (n_src, r), "
            f"got {tuple(u.shape)} and {tuple(v.shape)}"
        )
    return u.shape[0], v.shape[0]


def dense_position_bias(position_bias: PositionBias) -> Tensor:
    """The (n_dst, n_src) matrix of a dense or factored ``(U, V)`` position bias (``U @ V.T``)."""
    if isinstance(position_bias, Tensor):
        return position_bias
    u, v = position_bias
    return u @ v.t()


def _check_arguments(channels: int, k: int, groups: int, dilation: int) -> None:
    if groups < 1 or channels % groups:
        raise ValueError(f"{channels} channels cannot be split into {groups} equal groups")
    if k < 1 or dilation < 1:
        raise ValueError(f"k and dilation must be positive, got k={k}, dilation={dilation}")


def batched_group_knn(
    x_src: Tensor,
    x_dst: Tensor,
    k: int,
    groups: int,
    *,
    dilation: int = 1,
    position_bias: Optional[PositionBias] = None,
    backend: str = "auto",
) -> Tensor:
    r"""Group kNN of :func:`group_knn` for ``B`` equal-sized graphs held as dense tensors.

    The same neighbours as :func:`group_knn` on the flattened nodes (the same
    kernels), without host synchronisation: only shapes are checked, features
    are not checked for NaN/inf (non-finite features give unspecified
    neighbours on the dense backend and a ``RuntimeError`` on torch-cluster).

    Args:
        x_src: source features ``(B, N_src, C)``.
        x_dst: destination features ``(B, N_dst, C)``.
        k, groups, dilation, backend: as in :func:`group_knn`.
        position_bias: ``(N_dst, N_src)`` matrix or factors ``(U, V)`` with
            ``B = U @ V.T``, shared by all ``B`` graphs.  Pass factors to the
            torch-cluster backend: its extra coordinates are ``r`` wide
            instead of ``N_src``.

    Returns:
        ``LongTensor (groups, B, N_dst, k)``: for each group, graph and
        destination the chosen sources as indices within the graph
        (``0 .. N_src - 1``), nearest first.  Carries no gradient.
    """
    if x_src.dim() != 3 or x_dst.dim() != 3 or x_src.shape[0] != x_dst.shape[0] or x_src.shape[2] != x_dst.shape[2]:
        raise ValueError(
            "batched_group_knn needs x_src (B, N_src, C) and x_dst (B, N_dst, C), got "
            f"{tuple(x_src.shape)} and {tuple(x_dst.shape)}"
        )
    _check_arguments(x_src.shape[2], k, groups, dilation)
    n_src, n_dst, needed = x_src.shape[1], x_dst.shape[1], k * dilation
    if n_src < needed and n_dst > 0:
        raise ValueError(
            f"k * dilation = {k} * {dilation} = {needed} neighbours requested, but the graphs "
            f"have only {n_src} source nodes"
        )
    if position_bias is not None and _bias_shape(position_bias) != (n_dst, n_src):
        raise ValueError(
            f"position_bias is {_bias_shape(position_bias)} but the graphs have {n_dst} "
            f"destinations and {n_src} sources"
        )
    backend = resolve_backend(backend, x_dst.device, needed)
    with torch.no_grad():
        src, dst = _normalized_groups(x_src.detach(), groups), _normalized_groups(x_dst.detach(), groups)
        table = _knn_table(src, dst, needed, position_bias, backend)
    return table[..., ::dilation].contiguous() if dilation > 1 else table


def group_knn(
    x_src: Tensor,
    x_dst: Tensor,
    k: int,
    groups: int,
    *,
    dilation: int = 1,
    batch_src: Optional[Tensor] = None,
    batch_dst: Optional[Tensor] = None,
    position_bias: Optional[PositionBias] = None,
    backend: str = "auto",
) -> Tensor:
    r"""Per-group (dilated) k-nearest-neighbour graphs between two node sets.

    For group :math:`g` with sub-vectors :math:`\hat{x}_{i,g}` (L2-normalised),

    .. math::
        d_g(i, j) = \lVert \hat{x}^{dst}_{i,g} - \hat{x}^{src}_{j,g} \rVert^2 - B_{ij},

    and destination :math:`i` keeps the sources of ranks :math:`0, d, 2d, \ldots,
    (k-1)d` of :math:`d_g(i, \cdot)` among the sources of its own graph.

    Args:
        x_src: source features ``(N_src, C)``.
        x_dst: destination features ``(N_dst, C)`` (pass ``x`` twice for a
            graph over one node set; a node is then its own nearest neighbour).
        k: neighbours per destination and group.
        groups: number of contiguous channel groups; ``C % groups == 0``.
        dilation: keep every ``dilation``-th of the ``k * dilation`` nearest.
        batch_src, batch_dst: sorted graph ids of the nodes (PyG ``batch``).
        position_bias: ``B``, subtracted from the distance, shared by all graphs
            (which must then all have ``n_dst`` destinations and ``n_src``
            sources): a ``(n_dst, n_src)`` matrix or factors ``(U, V)`` with
            ``B = U @ V.T`` (cheaper for the torch-cluster backend).
        backend: ``"auto"``, ``"dense"`` or ``"torch_cluster"`` (see the module
            docstring; an explicit ``"torch_cluster"`` without the package
            raises an ``ImportError``).

    Returns:
        ``LongTensor (groups, 2, N_dst * k)``: sources in row 0, destinations
        in row 1, ordered by destination then rank.  Carries no gradient.

    Graphs of equal size are computed together by the kernels of
    :func:`batched_group_knn`; graphs of different sizes one at a time.
    """
    if x_src.dim() != 2 or x_dst.dim() != 2:
        raise ValueError(
            f"x_src and x_dst must be (num_nodes, channels), got {tuple(x_src.shape)} and {tuple(x_dst.shape)}"
        )
    channels = x_src.shape[1]
    if x_dst.shape[1] != channels:
        raise ValueError(f"x_src has {channels} channels but x_dst has {x_dst.shape[1]}")
    _check_arguments(channels, k, groups, dilation)
    sizes_src = _graph_sizes(batch_src, x_src.shape[0], "batch_src")
    sizes_dst = _graph_sizes(batch_dst, x_dst.shape[0], "batch_dst")
    num_graphs = max(len(sizes_src), len(sizes_dst))
    sizes_src += [0] * (num_graphs - len(sizes_src))
    sizes_dst += [0] * (num_graphs - len(sizes_dst))
    needed = k * dilation
    for g, (n_src, n_dst) in enumerate(zip(sizes_src, sizes_dst)):
        if n_src < needed and n_dst > 0:
            raise ValueError(
                f"k * dilation = {k} * {dilation} = {needed} neighbours requested, but graph {g} "
                f"has only {n_src} source nodes"
            )
    if position_bias is not None:
        n_dst, n_src = _bias_shape(position_bias)
        if any(s != n_src for s in sizes_src) or any(d != n_dst for d in sizes_dst):
            raise ValueError(
                f"position_bias is ({n_dst}, {n_src}) but the graphs have "
                f"{sizes_dst} destinations and {sizes_src} sources"
            )
    if not (_all_finite(x_src) and _all_finite(x_dst)):
        raise ValueError("group_knn got non-finite (NaN or inf) node features")

    backend = resolve_backend(backend, x_dst.device, needed)
    with torch.no_grad():
        # (groups, 1, N, C / groups): all graphs' nodes, normalised once.
        src, dst = _normalized_groups(x_src.detach()[None], groups), _normalized_groups(x_dst.detach()[None], groups)
        if len(set(sizes_src)) == 1 and len(set(sizes_dst)) == 1:  # one batched problem
            n_src, n_dst = sizes_src[0], sizes_dst[0]
            table = _knn_table(
                src.reshape(groups, num_graphs, n_src, -1),
                dst.reshape(groups, num_graphs, n_dst, -1),
                needed,
                position_bias,
                backend,
            )
            offset = torch.arange(num_graphs, device=table.device).view(1, -1, 1, 1) * n_src
            nbr = (table + offset).view(groups, x_dst.shape[0], needed)
        else:  # graphs of different sizes: one problem per graph
            nbr = torch.empty(groups, x_dst.shape[0], needed, dtype=torch.long, device=x_dst.device)
            off_src = off_dst = 0
            for n_src, n_dst in zip(sizes_src, sizes_dst):
                if n_dst:
                    table = _knn_table(
                        src[:, :, off_src : off_src + n_src],
                        dst[:, :, off_dst : off_dst + n_dst],
                        needed,
                        position_bias,
                        backend,
                    )
                    nbr[:, off_dst : off_dst + n_dst] = table[:, 0] + off_src
                off_src, off_dst = off_src + n_src, off_dst + n_dst
        nbr = nbr[:, :, ::dilation]  # (groups, N_dst, k): global source indices
        dst = torch.arange(x_dst.shape[0], device=nbr.device).view(1, -1, 1).expand_as(nbr)
        return torch.stack([nbr.reshape(groups, -1), dst.reshape(groups, -1)], dim=1)


def _graph_sizes(batch: Optional[Tensor], num_nodes: int, name: str) -> List[int]:
    if batch is None:
        return [num_nodes]
    if batch.dim() != 1 or batch.numel() != num_nodes:
        raise ValueError(
            f"{name} must be a vector of length {num_nodes} (one graph id per node), got shape {tuple(batch.shape)}"
        )
    if num_nodes > 1 and bool((batch[1:] < batch[:-1]).any()):
        raise ValueError(f"{name} must be sorted (nodes of one graph stored contiguously)")
    return torch.bincount(batch.cpu()).tolist() if num_nodes else []


def _all_finite(x: Tensor) -> bool:
    if x.numel() == 0:
        return True
    lo, hi = torch.aminmax(x)  # one pass; NaN and inf propagate to the extremes
    return bool(torch.isfinite(lo) & torch.isfinite(hi))


# ---------------------------------------------------------------------------
# Kernels: normalised (groups, B, N_src, c) and (groups, B, N_dst, c) ->
# (groups, B, N_dst, needed) local source indices, nearest first.  Shapes
# only, no host synchronisation.
# ---------------------------------------------------------------------------
def _knn_table(src: Tensor, dst: Tensor, needed: int, position_bias: Optional[PositionBias], backend: str) -> Tensor:
    kernel = _cluster_knn if backend == "torch_cluster" else _dense_knn
    # Rank in the features' (>= float32) precision; meta tensors have no autocast to turn off.
    device_type = src.device.type
    no_autocast = (
        torch.autocast(device_type, enabled=False) if torch.amp.is_autocast_available(device_type) else nullcontext()
    )
    with no_autocast:
        return kernel(src, dst, needed, position_bias)


def _normalized_groups(x: Tensor, groups: int) -> Tensor:
    """(B, N, C) -> (groups, B, N, C / groups), each sub-vector L2-normalised,
    in at least float32: half-precision distances (8 or 11 mantissa bits)
    would reorder neighbours whose similarities differ in the third digit."""
    b, n, c = x.shape
    x = x.to(torch.promote_types(x.dtype, torch.float32))
    return F.normalize(x.reshape(b, n, groups, c // groups), dim=-1).permute(2, 0, 1, 3)


def _dense_knn(src: Tensor, dst: Tensor, needed: int, position_bias: Optional[PositionBias]) -> Tensor:
    """The compiled kernel on float32 CPU features (dense or no bias); elsewhere
    blocked ``matmul`` + top-k over (groups, graphs, destinations, sources)
    blocks of at most :data:`DENSE_BLOCK_ELEMENTS` distances."""
    groups, num_graphs, n_src, _ = src.shape
    n_dst = dst.shape[2]
    s_sq = (src * src).sum(-1).unsqueeze(-2)  # (groups, graphs, 1, n_src)
    if not isinstance(position_bias, tuple):
        table = knn_smallest_k(dst, src, (dst * dst).sum(-1), s_sq.squeeze(-2), position_bias, needed)
        if table is not None:
            return table
    out = torch.empty(groups, num_graphs, n_dst, needed, dtype=torch.long, device=dst.device)
    # Blocks of `per` graphs x `rows` destinations.  Whenever per > 1 one block
    # holds all destinations, so the row blocks are the same for every graph
    # chunk and each block of the bias is made (or multiplied out) once.
    per = max(1, DENSE_BLOCK_ELEMENTS // max(1, groups * n_dst * n_src))
    rows = max(1, DENSE_BLOCK_ELEMENTS // max(1, groups * per * n_src))
    if torch.compiler.is_exporting():
        # All graphs in each block: a loop over them would fix the batch size of an exported graph.
        graph_blocks = [slice(None)]
    else:
        graph_blocks = [slice(b0, b0 + per) for b0 in range(0, num_graphs, per)]
    for r0 in range(0, n_dst, rows):
        bias = None if position_bias is None else _bias_rows(position_bias, r0, r0 + rows).to(src.dtype)
        for graphs in graph_blocks:
            s, dd = src[:, graphs], dst[:, graphs, r0 : r0 + rows]
            # |a|^2 - 2 a.b + |b|^2 - B as ((-2 a.b + |a|^2) + |b|^2) - B, in place (bit-identical to
            # the out-of-place expression: -2x is exact and a + (-2x) equals a - 2x).
            dist = torch.matmul(dd, s.transpose(-1, -2)).mul_(-2).add_((dd * dd).sum(-1, keepdim=True))
            dist = dist.add_(s_sq[:, graphs])
            if bias is not None:
                dist = dist.sub_(bias)
            out[:, graphs, r0 : r0 + rows] = smallest_k(dist, needed)
    return out


def _bias_rows(position_bias: PositionBias, r0: int, r1: int) -> Tensor:
    """Rows ``r0:r1`` of the dense bias (a factored bias is multiplied out per block)."""
    if isinstance(position_bias, Tensor):
        return position_bias[r0:r1]
    u, v = position_bias
    return u[r0:r1] @ v.t()


def _cluster_knn(src: Tensor, dst: Tensor, needed: int, position_bias: Optional[PositionBias]) -> Tensor:
    """``torch_cluster.knn`` for the candidates, then an exact re-ranking.

    Every (group, graph) pair is one torch-cluster example.  A position bias
    turns the biased cosine order into a plain euclidean order by the
    reduction from maximum inner product search to nearest-neighbour search:
    destinations become ``p = [a, U_i, 1, 0]``, sources
    ``q = [2b, V_j, -|b|^2, sqrt(M - |q'|^2)]``, so that
    ``|p - q|^2 = const_i - 2 (2 a.b + B_ij - |b|^2)`` orders sources exactly
    like ``|a - b|^2 - B_ij``.  A factored bias adds ``r`` coordinates; a dense
    one is factored as ``B @ I`` (``n_src`` coordinates).

    The ``needed`` candidates of each destination are then ranked by
    ``|a - b|^2 - B_ij`` computed from the small normalised features and the
    bias (never from the augmented coordinates), ties broken by the lower
    source index.  The work runs in chunks of (group, graph) pairs, or of
    destinations when one pair is too large, whose temporaries stay below
    about :data:`CLUSTER_CHUNK_BYTES`: the augmented coordinates of the chunk
    and, per candidate edge, torch-cluster's indices and the gathered
    features and bias factors.  Peak memory is therefore the inputs, the
    ``(groups, B, N_dst, needed)`` output and one chunk, for any batch.
    The computation runs in at least float32 (half-precision augmented
    coordinates would lose the order).
    """
    groups, num_graphs, n_src, c = src.shape
    n_dst = dst.shape[2]
    dtype = torch.promote_types(src.dtype, torch.float32)
    entries = groups * num_graphs
    src = src.reshape(entries, n_src, c).to(dtype)
    dst = dst.reshape(entries, n_dst, c).to(dtype)
    u = v = None
    if isinstance(position_bias, Tensor):
        u = position_bias.to(dtype)
    elif position_bias is not None:
        u, v = position_bias[0].to(dtype), position_bias[1].to(dtype)
    r = 0 if u is None else u.shape[1]
    width = c if u is None else c + r + 2
    # Bytes per candidate edge: torch-cluster's row/col and their sorted copies
    # (int64), the gathered source features and bias factors.
    per_edge = 16 * 8 + (c + (r if v is not None else 1)) * dtype.itemsize
    per_dst, per_src = width * dtype.itemsize + needed * per_edge, width * dtype.itemsize
    per_entry = n_src * per_src + n_dst * per_dst
    count = max(1, CLUSTER_CHUNK_BYTES // max(1, per_entry))
    rows = (
        n_dst
        if count > 1 or per_entry <= CLUSTER_CHUNK_BYTES
        else max(1, (CLUSTER_CHUNK_BYTES - n_src * per_src) // per_dst)
    )
    out = torch.empty(entries, n_dst, needed, dtype=torch.long, device=dst.device)
    for e0 in range(0, entries, count):
        s = src[e0 : e0 + count]
        q = s if u is None else _augment_sources(s, v)
        for r0 in range(0, n_dst, rows):
            d = dst[e0 : e0 + count, r0 : r0 + rows]
            p = d if u is None else _augment_destinations(d, u[r0 : r0 + rows])
            cand = _cluster_candidates(q, p, needed)  # (count, rows, needed), ascending source index
            out[e0 : e0 + count, r0 : r0 + rows] = _rank_candidates(s, d, cand, u, v, r0)
    return out.view(groups, num_graphs, n_dst, needed)


def _augment_sources(s: Tensor, v: Optional[Tensor]) -> Tensor:
    """``q = [2b, V_j, -|b|^2, sqrt(M - |q'|^2)]`` (``V = I`` for a dense bias)."""
    count, n_src, _ = s.shape
    if v is None:
        v = torch.eye(n_src, dtype=s.dtype, device=s.device)
    b_sq = (s * s).sum(-1, keepdim=True)
    q = torch.cat([2 * s, v.expand(count, -1, -1), -b_sq], dim=-1)
    q_sq = (q * q).sum(-1, keepdim=True)
    return torch.cat([q, (q_sq.amax(dim=1, keepdim=True) - q_sq).clamp_min(0).sqrt()], dim=-1)


def _augment_destinations(d: Tensor, u: Tensor) -> Tensor:
    """``p = [a, U_i, 1, 0]``."""
    ones = torch.ones_like(d[..., :1])
    return torch.cat([d, u.expand(d.shape[0], -1, -1), ones, torch.zeros_like(ones)], dim=-1)


def _cluster_candidates(q: Tensor, p: Tensor, needed: int) -> Tensor:
    """The ``needed`` nearest of ``q`` ``(E, n_src, D)`` for every row of ``p``
    ``(E, n, D)``, example by example: ``(E, n, needed)`` local source indices
    in ascending index order."""
    count, n_src, width = q.shape
    n = p.shape[1]
    example = torch.arange(count, device=q.device).view(-1, 1)
    row, col = torch_cluster.knn(
        q.reshape(-1, width),
        p.reshape(-1, width),
        needed,
        example.expand(count, n_src).reshape(-1),
        example.expand(count, n).reshape(-1),
        batch_size=count,
    )
    if row.numel() != count * n * needed:  # a shape, known on the host: no synchronisation
        raise RuntimeError(
            f"torch_cluster.knn returned {row.numel()} neighbours instead of {count * n * needed} "
            "(non-finite features, or on CUDA distances beyond its 1e10 limit?)"
        )
    # torch-cluster does not promise an order: group by destination, then by source index.
    col = col[torch.argsort(row)].view(count, n, needed) - example.view(-1, 1, 1) * n_src
    return col.sort(dim=-1).values


def _rank_candidates(s: Tensor, d: Tensor, cand: Tensor, u: Optional[Tensor], v: Optional[Tensor], r0: int) -> Tensor:
    """Order the candidates ``(E, n, needed)`` of destinations ``d`` ``(E, n, c)``
    by ``|a - b|^2 - B_ij`` (``B`` from ``U`` rows ``r0:`` and ``V``, or the
    dense bias ``U``), stable: equal distances keep the lower source index first."""
    count, n, needed = cand.shape
    b = s.gather(1, cand.view(count, n * needed, 1).expand(-1, -1, s.shape[-1])).view(count, n, needed, -1)
    dist = (d * d).sum(-1, keepdim=True) - 2 * (b @ d.unsqueeze(-1)).squeeze(-1) + (b * b).sum(-1)
    if v is not None:  # factored: B_ij = U_i . V_j for the candidates only
        dist = dist - (v[cand] @ u[r0 : r0 + n].unsqueeze(-1)).squeeze(-1)
    elif u is not None:  # dense (n_dst, n_src) bias
        dist = dist - u[r0 : r0 + n].expand(count, -1, -1).gather(2, cand)
    return cand.gather(-1, dist.sort(dim=-1, stable=True).indices)
