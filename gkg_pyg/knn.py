"""Group k-nearest-neighbour graph construction.

The feature channels are split into ``groups`` contiguous chunks.  In every
group each destination node picks its ``k`` nearest source nodes of the same
graph, by the squared euclidean distance of the L2-normalised sub-vectors
(that is, by cosine similarity), minus an optional position bias.

Edge format
-----------
:func:`group_knn` returns a ``LongTensor`` of shape ``(groups, 2, num_dst * k)``:
``edge_index[g, 0]`` holds source indices into ``x_src`` and
``edge_index[g, 1]`` destination indices into ``x_dst``.  Within a group the
edges are ordered by destination, then by rank (nearest first), so
``edge_index[g, 0].view(num_dst, k)`` is the neighbour table of group ``g``.
:class:`gkg_pyg.GroupMaxRelConv` consumes this tensor directly; one slice
``edge_index[g]`` is an ordinary PyG ``edge_index``.
"""
from __future__ import annotations

import warnings
from typing import Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor

try:  # compiled from source; optional so that a plain `pip install` works
    import torch_cluster
except ImportError:  # pragma: no cover - depends on the environment
    torch_cluster = None

PositionBias = Union[Tensor, Tuple[Tensor, Tensor]]

# Upper bound on the elements of one block of the dense distance matrix.
DENSE_BLOCK_ELEMENTS = 1 << 25

_warned_no_cluster = False


def has_torch_cluster() -> bool:
    return torch_cluster is not None


def resolve_backend(backend: str, device: torch.device) -> str:
    """Map ``"auto"`` to a concrete backend, warning once if torch-cluster is missing."""
    global _warned_no_cluster
    if backend not in ("auto", "dense", "torch_cluster"):
        raise ValueError(f"unknown kNN backend {backend!r}; expected 'auto', 'dense' or 'torch_cluster'")
    if backend == "dense":
        return "dense"
    if torch_cluster is None:
        if not _warned_no_cluster:
            warnings.warn("torch-cluster is not installed: group_knn falls back to the dense backend "
                          "(install it with `pip install --no-build-isolation torch-cluster`)")
            _warned_no_cluster = True
        return "dense"
    if backend == "torch_cluster":
        return "torch_cluster"
    # On the CPU blocked matrix products beat torch-cluster's per-query search
    # (experiments/benchmark.py measures both); on CUDA torch-cluster is used.
    return "torch_cluster" if device.type == "cuda" else "dense"


def _graph_sizes(batch: Optional[Tensor], num_nodes: int, name: str) -> Tensor:
    if batch is None:
        return torch.tensor([num_nodes])
    if batch.dim() != 1 or batch.numel() != num_nodes:
        raise ValueError(f"{name} must be a vector of length {num_nodes} (one graph id per node), "
                         f"got shape {tuple(batch.shape)}")
    if num_nodes > 1 and bool((batch[1:] < batch[:-1]).any()):
        raise ValueError(f"{name} must be sorted (nodes of one graph stored contiguously)")
    return torch.bincount(batch.cpu()) if num_nodes else torch.zeros(0, dtype=torch.long)


def _bias_shape(position_bias: PositionBias) -> Tuple[int, int]:
    if isinstance(position_bias, Tensor):
        if position_bias.dim() != 2:
            raise ValueError(f"position_bias must be (n_dst, n_src), got shape {tuple(position_bias.shape)}")
        return tuple(position_bias.shape)
    u, v = position_bias
    if u.dim() != 2 or v.dim() != 2 or u.shape[1] != v.shape[1]:
        raise ValueError("a factored position_bias (U, V) needs U: (n_dst, r) and V: (n_src, r), "
                         f"got {tuple(u.shape)} and {tuple(v.shape)}")
    return u.shape[0], v.shape[0]


def dense_position_bias(position_bias: PositionBias) -> Tensor:
    """The (n_dst, n_src) matrix of a dense or factored ``(U, V)`` position bias (``U @ V.T``)."""
    if isinstance(position_bias, Tensor):
        return position_bias
    u, v = position_bias
    return u @ v.t()


def group_knn(x_src: Tensor, x_dst: Tensor, k: int, groups: int, *, dilation: int = 1,
              batch_src: Optional[Tensor] = None, batch_dst: Optional[Tensor] = None,
              position_bias: Optional[PositionBias] = None, backend: str = "auto") -> Tensor:
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
        backend: ``"auto"``, ``"dense"`` or ``"torch_cluster"``.

    Returns:
        ``LongTensor (groups, 2, N_dst * k)``: sources in row 0, destinations
        in row 1, ordered by destination then rank.  Carries no gradient.
    """
    if x_src.dim() != 2 or x_dst.dim() != 2:
        raise ValueError(f"x_src and x_dst must be (num_nodes, channels), got {tuple(x_src.shape)} "
                         f"and {tuple(x_dst.shape)}")
    channels = x_src.shape[1]
    if x_dst.shape[1] != channels:
        raise ValueError(f"x_src has {channels} channels but x_dst has {x_dst.shape[1]}")
    if groups < 1 or channels % groups:
        raise ValueError(f"{channels} channels cannot be split into {groups} equal groups")
    if k < 1 or dilation < 1:
        raise ValueError(f"k and dilation must be positive, got k={k}, dilation={dilation}")
    sizes_src = _graph_sizes(batch_src, x_src.shape[0], "batch_src")
    sizes_dst = _graph_sizes(batch_dst, x_dst.shape[0], "batch_dst")
    num_graphs = max(len(sizes_src), len(sizes_dst))
    sizes_src = F.pad(sizes_src, (0, num_graphs - len(sizes_src)))
    sizes_dst = F.pad(sizes_dst, (0, num_graphs - len(sizes_dst)))
    needed = k * dilation
    starved = (sizes_src < needed) & (sizes_dst > 0)
    if bool(starved.any()):
        g = int(starved.nonzero()[0])
        raise ValueError(f"k * dilation = {k} * {dilation} = {needed} neighbours requested, but graph {g} "
                         f"has only {int(sizes_src[g])} source nodes")
    if position_bias is not None:
        n_dst, n_src = _bias_shape(position_bias)
        if bool((sizes_src != n_src).any()) or bool((sizes_dst != n_dst).any()):
            raise ValueError(f"position_bias is ({n_dst}, {n_src}) but the graphs have "
                             f"{sizes_dst.tolist()} destinations and {sizes_src.tolist()} sources")
    if not (_all_finite(x_src) and _all_finite(x_dst)):
        raise ValueError("group_knn got non-finite (NaN or inf) node features")

    backend = resolve_backend(backend, x_dst.device)
    with torch.no_grad():
        x_src, x_dst = x_src.detach(), x_dst.detach()
        if backend == "torch_cluster":
            nbr = _cluster_knn(x_src, x_dst, needed, groups, sizes_src, sizes_dst, position_bias)
        else:
            nbr = _dense_knn(x_src, x_dst, needed, groups, sizes_src, sizes_dst, position_bias)
        nbr = nbr[:, :, ::dilation]  # (groups, N_dst, k): global source indices
        dst = torch.arange(x_dst.shape[0], device=nbr.device).view(1, -1, 1).expand_as(nbr)
        return torch.stack([nbr.reshape(groups, -1), dst.reshape(groups, -1)], dim=1)


def _all_finite(x: Tensor) -> bool:
    if x.numel() == 0:
        return True
    lo, hi = torch.aminmax(x)  # one pass; NaN and inf propagate to the extremes
    return bool(torch.isfinite(lo) & torch.isfinite(hi))


def _normalized_groups(x: Tensor, groups: int) -> Tensor:
    """(N, C) -> (groups, N, C / groups), each sub-vector L2-normalised."""
    n, c = x.shape
    return F.normalize(x.view(n, groups, c // groups), dim=-1).transpose(0, 1)


def _dense_knn(x_src, x_dst, needed, groups, sizes_src, sizes_dst, position_bias) -> Tensor:
    """Blocked ``matmul`` + ``topk``; graphs of equal size are processed together."""
    src, dst = _normalized_groups(x_src, groups), _normalized_groups(x_dst, groups)
    bias = None if position_bias is None else dense_position_bias(position_bias).to(src.dtype)
    out = torch.empty(groups, x_dst.shape[0], needed, dtype=torch.long, device=x_dst.device)
    same_size = bool((sizes_src == sizes_src[0]).all()) and bool((sizes_dst == sizes_dst[0]).all())
    if same_size:  # batched problems (groups, graphs, n_dst, n_src), chunked over graphs
        n_src, n_dst = int(sizes_src[0]), int(sizes_dst[0])
        per = max(1, DENSE_BLOCK_ELEMENTS // max(1, groups * n_dst * n_src))
        runs = [(g, min(per, len(sizes_src) - g), n_src, n_dst) for g in range(0, len(sizes_src), per)]
    else:
        runs = [(g, 1, int(sizes_src[g]), int(sizes_dst[g])) for g in range(len(sizes_src))]
    off_src = torch.cat([sizes_src.new_zeros(1), sizes_src.cumsum(0)]).tolist()
    off_dst = torch.cat([sizes_dst.new_zeros(1), sizes_dst.cumsum(0)]).tolist()
    for first, count, n_src, n_dst in runs:
        if n_dst == 0:
            continue
        s = src[:, off_src[first]:off_src[first + count]].reshape(groups, count, n_src, -1)
        d = dst[:, off_dst[first]:off_dst[first + count]].reshape(groups, count, n_dst, -1)
        s_sq = (s * s).sum(-1).unsqueeze(-2)  # (groups, count, 1, n_src)
        rows = max(1, DENSE_BLOCK_ELEMENTS // max(1, groups * count * n_src))
        for r0 in range(0, n_dst, rows):
            dd = d[:, :, r0:r0 + rows]
            dist = (dd * dd).sum(-1, keepdim=True) - 2 * dd @ s.transpose(-1, -2) + s_sq
            if bias is not None:
                dist = dist - bias[r0:r0 + rows]
            idx = dist.topk(needed, dim=-1, largest=False).indices  # sorted, nearest first
            idx = idx + (torch.arange(count, device=idx.device) * n_src).view(1, count, 1, 1)
            block = out[:, off_dst[first]:off_dst[first + count]].view(groups, count, n_dst, needed)
            block[:, :, r0:r0 + rows] = idx + off_src[first]
    return out


def _cluster_knn(x_src, x_dst, needed, groups, sizes_src, sizes_dst, position_bias) -> Tensor:
    """All graphs and groups in one ``torch_cluster.knn`` call.

    Each (graph, group) pair is one batch entry.  A position bias turns the
    biased cosine order into a plain euclidean order by the reduction from
    maximum inner product search to nearest-neighbour search: destinations
    become ``p = [a, U, 1, 0]``, sources ``q = [2b, V, -|b|^2, sqrt(M - |q'|^2)]``
    so that ``|p - q|^2 = const_i - 2 (2 a.b + B_ij - |b|^2)`` orders sources
    exactly like ``|a - b|^2 - B_ij``.
    """
    src, dst = _normalized_groups(x_src, groups), _normalized_groups(x_dst, groups)
    num_graphs = len(sizes_src)
    dev = x_src.device
    graph_src = torch.repeat_interleave(torch.arange(num_graphs), sizes_src).to(dev)
    graph_dst = torch.repeat_interleave(torch.arange(num_graphs), sizes_dst).to(dev)
    if position_bias is not None:
        if isinstance(position_bias, Tensor):  # exact rank-n_src factorisation B = B @ I
            u, v = position_bias, torch.eye(position_bias.shape[1], device=dev)
        else:
            u, v = position_bias
        u, v = u.to(src.dtype), v.to(src.dtype)
        u_all = u.repeat(num_graphs, 1).expand(groups, -1, -1)
        v_all = v.repeat(num_graphs, 1).expand(groups, -1, -1)
        b_sq = (src * src).sum(-1, keepdim=True)
        q = torch.cat([2 * src, v_all, -b_sq], dim=-1)
        q_sq = (q * q).sum(-1, keepdim=True)
        q = torch.cat([q, (q_sq.max() - q_sq).clamp_min(0).sqrt()], dim=-1)
        ones = torch.ones_like(dst[..., :1])
        p = torch.cat([dst, u_all, ones, torch.zeros_like(ones)], dim=-1)
        src, dst = q, p
    # Batch ids (group, graph) must be sorted: order nodes group-major.
    batch_src = (torch.arange(groups, device=dev).view(-1, 1) * num_graphs + graph_src).reshape(-1)
    batch_dst = (torch.arange(groups, device=dev).view(-1, 1) * num_graphs + graph_dst).reshape(-1)
    flat_src = src.reshape(-1, src.shape[-1]).contiguous()
    flat_dst = dst.reshape(-1, dst.shape[-1]).contiguous()
    row, col = torch_cluster.knn(flat_src, flat_dst, needed, batch_src, batch_dst)
    # torch-cluster does not promise an order: sort by query, then by distance.
    dist = (flat_dst[row] - flat_src[col]).pow(2).sum(-1)
    order = torch.sort(dist, stable=True).indices
    order = order[torch.sort(row[order], stable=True).indices]
    if order.numel() != flat_dst.shape[0] * needed:
        raise RuntimeError("torch_cluster.knn returned an unexpected number of neighbours")
    col = col[order].view(groups, x_dst.shape[0], needed)
    return col - torch.arange(groups, device=dev).view(-1, 1, 1) * x_src.shape[0]
