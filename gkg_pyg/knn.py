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
(:func:`gkg_pyg.ops.knn_smallest_k`; ties to the lower source index);
elsewhere blocked matrix products and ``topk`` (chunked so that one distance
block holds at most :data:`DENSE_BLOCK_ELEMENTS` values).  The two round
the products' sums in different orders, so in float32 sources whose
distances lie within a few units in the last place may swap ranks.
Both backends rank in at least float32, also for half-precision features
and under autocast (the features are upcast; the graph costs little next
to the model, and half-precision distances would reorder close neighbours).
``"torch_cluster"``: ``torch_cluster.knn`` (through the operator
``gkg_pyg::cluster_knn``, which has a fake implementation and a static
``(E, n, k)`` shape) on augmented coordinates that fold the position bias
in, then an exact re-ranking of its ``k * dilation`` candidates from the
small features (see :func:`_cluster_knn`).
``"auto"``: see :func:`resolve_backend` and docs/knn_backends.md (the
measurements behind the rule).

Host reads: :func:`batched_group_knn` reads no value back to the host, on any
device.  :func:`group_knn` with batch vectors reads the graph sizes back once
per call (one synchronisation on CUDA, with the features' finiteness check
folded into the same transfer); without batch vectors it reads nothing on a
GPU (the finiteness check then runs on CPU tensors only).
"""

from __future__ import annotations

import warnings
from contextlib import nullcontext
from typing import List, Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor
from torch._subclasses.fake_tensor import is_fake

from .ops import knn_smallest_k, smallest_k
from .ops._dtypes import as_dtype, at_least_float32
from .ops.cluster import CUDA_MAX_K, cluster_knn
from .ops.cluster import torch_cluster  # None without the package (compiled from source, optional)

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
CLUSTER_CUDA_MAX_K = CUDA_MAX_K
INSTALL_HINT = "pip install --no-build-isolation torch-cluster (./setup.sh compiles it)"

_warned_no_cluster = False


def has_torch_cluster() -> bool:
    return torch_cluster is not None


def resolve_backend(backend: str, device: torch.device, needed: Optional[int] = None) -> str:
    """Map a requested backend to the one that runs for ``needed = k * dilation``
    neighbours on ``device``.

    ``"auto"`` is the dense backend on the CPU (faster there than
    torch-cluster's single-threaded KD-tree search even when that runs on
    every core: GKGNet-S at 448 px, see docs/knn_backends.md) and
    torch-cluster on CUDA when it is installed and ``needed`` fits its CUDA
    kernel (else the dense backend, with a one-time warning when the package
    is missing); the CUDA choice is the design's, not yet measured there
    (``benchmarks/gpu.sh`` measures both).  An explicit ``"torch_cluster"``
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
    pair = isinstance(position_bias, (tuple, list)) and len(position_bias) == 2
    if not pair or not all(isinstance(t, Tensor) for t in position_bias):
        raise ValueError(
            f"position_bias must be an (n_dst, n_src) tensor or a pair (U, V) of factors, got {type(position_bias)}"
        )
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
    sizes_src, sizes_dst, finite = _read_graphs(x_src, x_dst, batch_src, batch_dst)
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
    if not finite:
        raise ValueError("group_knn got non-finite (NaN or inf) node features")

    backend = resolve_backend(backend, x_dst.device, needed)
    with torch.no_grad():
        # (groups, 1, N, C / groups): all graphs' nodes, normalised once.
        src, dst = _normalized_groups(x_src.detach()[None], groups), _normalized_groups(x_dst.detach()[None], groups)
        if len(set(sizes_src)) == 1 and len(set(sizes_dst)) == 1:  # one batched problem
            n_src, n_dst = sizes_src[0], sizes_dst[0]
            table = _knn_table(  # explicit widths: -1 cannot be inferred for a side without nodes
                src.reshape(groups, num_graphs, n_src, channels // groups),
                dst.reshape(groups, num_graphs, n_dst, channels // groups),
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


def _read_graphs(
    x_src: Tensor, x_dst: Tensor, batch_src: Optional[Tensor], batch_dst: Optional[Tensor]
) -> Tuple[List[int], List[int], bool]:
    """The graph sizes of ``batch_src`` and ``batch_dst`` (checked: vectors of the
    nodes' length, sorted) and whether the features are finite, read back to the
    host at most once.

    With batch vectors the sizes must reach the host (they set the problems'
    shapes): the vectors, and on CUDA the features' finiteness flag with them,
    come back in one transfer (one synchronisation per call on CUDA).  Without
    batch vectors nothing is read on a GPU, so the features' finiteness is
    checked on the CPU only (there the check costs one pass and no
    synchronisation).  Tensors without data (fake or meta) cannot give sizes:
    with batch vectors that is an error naming :func:`batched_group_knn`.
    """
    vectors = []
    for batch, num_nodes, name in ((batch_src, x_src.shape[0], "batch_src"), (batch_dst, x_dst.shape[0], "batch_dst")):
        if batch is not None and (batch.dim() != 1 or batch.numel() != num_nodes):
            raise ValueError(
                f"{name} must be a vector of length {num_nodes} (one graph id per node), got shape {tuple(batch.shape)}"
            )
        vectors.append(batch)
    on_cpu = x_src.device.type == "cpu" and x_dst.device.type == "cpu"
    readable = not any(_has_no_data(t) for t in (x_src, x_dst, *[b for b in vectors if b is not None]))
    if not any(b is not None for b in vectors):
        finite = _all_finite(x_src) and _all_finite(x_dst) if on_cpu and readable else True
        return [x_src.shape[0]], [x_dst.shape[0]], finite
    if not readable:
        raise ValueError(
            "group_knn with batch vectors reads the graph sizes back to the host, which tensors "
            "without data (fake or meta) cannot do; use batched_group_knn on (B, N, C) tensors"
        )
    parts = [b.reshape(-1).long() for b in vectors if b is not None]
    if on_cpu:
        finite = _all_finite(x_src) and _all_finite(x_dst)
    else:  # the flag travels with the batch vectors
        parts.append(~(_finite_flag(x_src) & _finite_flag(x_dst)).long().view(1))
    host = torch.cat([p.to(parts[0].device) for p in parts]).cpu()
    if not on_cpu:
        finite, host = not bool(host[-1]), host[:-1]
    sizes = []
    for batch, num_nodes, name in ((batch_src, x_src.shape[0], "batch_src"), (batch_dst, x_dst.shape[0], "batch_dst")):
        if batch is None:
            sizes.append([num_nodes])
            continue
        ids, host = host[:num_nodes], host[num_nodes:]
        if num_nodes > 1 and bool((ids[1:] < ids[:-1]).any()):
            raise ValueError(f"{name} must be sorted (nodes of one graph stored contiguously)")
        if num_nodes and int(ids[0]) < 0:
            raise ValueError(f"{name} holds a negative graph id ({int(ids[0])}); graph ids count from 0")
        sizes.append(torch.bincount(ids).tolist() if num_nodes else [])
    return sizes[0], sizes[1], finite


def _has_no_data(t: Tensor) -> bool:
    """Fake or meta tensors: shapes without values to read."""
    return t.device.type == "meta" or is_fake(t)


def _finite_flag(x: Tensor) -> Tensor:
    """A 0-dim bool tensor on ``x``'s device: all of ``x`` finite (no host read)."""
    if x.numel() == 0:
        return torch.ones((), dtype=torch.bool, device=x.device)
    lo, hi = torch.aminmax(x)  # one pass; NaN and inf propagate to the extremes
    return torch.isfinite(lo) & torch.isfinite(hi)


def _all_finite(x: Tensor) -> bool:
    return bool(_finite_flag(x))


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
    x = as_dtype(x, at_least_float32(x.dtype))
    return F.normalize(x.reshape(b, n, groups, c // groups), dim=-1).permute(2, 0, 1, 3)


def _dense_knn(src: Tensor, dst: Tensor, needed: int, position_bias: Optional[PositionBias]) -> Tensor:
    """The compiled kernel on float32 CPU features (dense or no bias); elsewhere
    blocked ``matmul`` + top-k over (groups, graphs, destinations, sources)
    blocks of at most :data:`DENSE_BLOCK_ELEMENTS` distances."""
    groups, num_graphs, n_src, _ = src.shape
    n_dst = dst.shape[2]
    s_sq = (src * src).sum(-1).unsqueeze(-2)  # (groups, graphs, 1, n_src)
    if position_bias is None or isinstance(position_bias, Tensor):  # the kernel takes no factors
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
        bias = None if position_bias is None else as_dtype(_bias_rows(position_bias, r0, r0 + rows), src.dtype)
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
    """``gkg_pyg::cluster_knn`` (torch-cluster) for the candidates, then an exact re-ranking.

    Every (group, graph) pair is one torch-cluster example.  A position bias
    ``B = U V^T`` turns the biased cosine order into a plain euclidean order by
    appending coordinates: destinations become ``p = [a, U_i / sqrt 2, 0]`` and
    sources ``q = [b, V_j / sqrt 2, sqrt(M - |V_j|^2 / 2)]`` (``M`` the largest
    ``|V_j|^2 / 2``), so that ``|p - q|^2 = |a - b|^2 - B_ij + |U_i|^2 / 2 + M``
    orders the sources of destination ``i`` exactly like ``|a - b|^2 - B_ij``
    (``c + r + 1`` coordinates for a factored bias with ``r`` columns; a dense
    bias is factored as ``B @ I``: ``c + n_src`` coordinates, the last one
    being 0).  The sources' coordinates are built once per call.

    The ``needed`` candidates of each destination are then ranked by
    ``|a - b|^2 - B_ij`` computed from the small normalised features and the
    bias rows (never from the appended coordinates), ties broken by the lower
    source index.  A factored bias is multiplied out once per block of
    destination rows, for all examples together (one product instead of
    gathering ``r`` factor values per candidate edge).  The work runs in
    chunks of (group, graph) pairs, or of destinations when one pair is too
    large, whose temporaries stay below about :data:`CLUSTER_CHUNK_BYTES`.
    Peak memory is therefore the inputs, the sources' coordinates, the
    ``(groups, B, N_dst, needed)`` output and one chunk, for any batch.  The computation runs in at least
    float32 (half-precision coordinates would lose the order).
    """
    groups, num_graphs, n_src, c = src.shape
    n_dst = dst.shape[2]
    dtype = torch.promote_types(src.dtype, torch.float32)
    entries = groups * num_graphs
    if n_dst == 0 or entries == 0:  # nothing to rank (and no row blocks to step through)
        return torch.empty(groups, num_graphs, n_dst, needed, dtype=torch.long, device=dst.device)
    src = src.reshape(entries, n_src, c).to(dtype)
    dst = dst.reshape(entries, n_dst, c).to(dtype)
    u = v = None
    if isinstance(position_bias, Tensor):
        u = position_bias.to(dtype)
    elif position_bias is not None:
        u, v = position_bias[0].to(dtype), position_bias[1].to(dtype)
    extra_src = None if u is None else _source_bias_coordinates(v, n_src, dtype, src.device)
    width = c + (0 if extra_src is None else extra_src.shape[1])
    size = dtype.itemsize
    # Bytes per candidate edge: the operator's indices and their sorted copies (int64), the
    # gathered source features, the candidates' bias and distances.
    per_edge = 12 * 8 + (c + 4) * size
    per_dst, per_src = width * size + needed * per_edge, width * size
    bias_row = 0 if u is None else n_src * size  # one row of the bias, shared by a chunk's examples
    whole = n_src * per_src + n_dst * per_dst  # one example, all destinations
    if whole + n_dst * bias_row <= CLUSTER_CHUNK_BYTES:
        rows, count = n_dst, max(1, (CLUSTER_CHUNK_BYTES - n_dst * bias_row) // whole)
    else:  # one example at a time, in blocks of destinations
        rows, count = max(1, (CLUSTER_CHUNK_BYTES - n_src * per_src) // (per_dst + bias_row)), 1
    # The sources' coordinates, once for all examples (n_src is at most n_dst in the models: small
    # next to the destinations' side), reused by every block of destination rows.
    q_all = src if extra_src is None else torch.cat([src, extra_src.expand(entries, -1, -1)], dim=-1)
    out = torch.empty(entries, n_dst, needed, dtype=torch.long, device=dst.device)
    for r0 in range(0, n_dst, rows):
        bias = extra_dst = None
        if u is not None:  # rows r0:r0 + rows of the bias, for every example
            bias = _bias_rows(position_bias if v is None else (u, v), r0, r0 + rows).to(dtype)
            extra_dst = u[r0 : r0 + rows] * 0.5**0.5
            if v is not None:
                extra_dst = torch.cat([extra_dst, torch.zeros_like(extra_dst[:, :1])], dim=-1)
        for e0 in range(0, entries, count):
            s, d = src[e0 : e0 + count], dst[e0 : e0 + count, r0 : r0 + rows]
            p = d if extra_dst is None else torch.cat([d, extra_dst.expand(d.shape[0], -1, -1)], dim=-1)
            cand = cluster_knn(q_all[e0 : e0 + count], p, needed)  # (count, rows, needed), ascending index
            out[e0 : e0 + count, r0 : r0 + rows] = _rank_candidates(s, d, cand, bias)
    return out.view(groups, num_graphs, n_dst, needed)


def _source_bias_coordinates(v: Optional[Tensor], n_src: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """The sources' appended coordinates ``[V_j / sqrt 2, sqrt(M - |V_j|^2 / 2)]``
    ``(n_src, r + 1)``; for a dense bias (``V = I``) ``I / sqrt 2`` alone (the
    norm coordinate would be 0)."""
    if v is None:
        return torch.eye(n_src, dtype=dtype, device=device) * 0.5**0.5
    half = v * 0.5**0.5
    sq = (half * half).sum(-1, keepdim=True)
    return torch.cat([half, (sq.amax() - sq).clamp_min(0).sqrt()], dim=-1)


def _rank_candidates(s: Tensor, d: Tensor, cand: Tensor, bias: Optional[Tensor]) -> Tensor:
    """Order the candidates ``(E, n, needed)`` of destinations ``d`` ``(E, n, c)``
    by ``|a - b|^2 - B_ij`` (``bias``: the destinations' ``(n, n_src)`` rows of
    ``B``, or ``None``), stable: equal distances keep the lower source index first."""
    count, n, needed = cand.shape
    n_src, c = s.shape[1], s.shape[2]
    rows = (cand + torch.arange(count, device=cand.device).view(-1, 1, 1) * n_src).view(-1)
    b = s.reshape(-1, c).index_select(0, rows).view(count, n, needed, c)  # whole rows: faster than gather
    dist = (d * d).sum(-1, keepdim=True) - 2 * (b @ d.unsqueeze(-1)).squeeze(-1) + (b * b).sum(-1)
    if bias is not None:
        dist = dist - bias.expand(count, -1, -1).gather(2, cand)
    return cand.gather(-1, dist.sort(dim=-1, stable=True).indices)
