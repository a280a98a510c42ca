"""Group max-relative graph convolution (GKGNet, paper eq. 1 and 2)."""

from __future__ import annotations

from typing import Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch_geometric.nn import MessagePassing
from torch_geometric.typing import SparseTensor
from torch_geometric.utils import is_sparse, to_edge_index

from .knn import group_knn
from .native import is_tracing, max_relative, max_relative_backward

PairTensor = Tuple[Tensor, Tensor]


class GroupedLinear(nn.Module):
    """A linear map with ``groups`` independent weight blocks: a 1x1 grouped
    convolution on node features ``(N, in_channels) -> (N, out_channels)``.

    ``weight`` is ``(out_channels, in_channels // groups)``, the layout of a
    grouped ``Conv2d`` weight without its trailing ``1 x 1``.
    """

    def __init__(self, in_channels: int, out_channels: int, groups: int = 1, bias: bool = True):
        super().__init__()
        if in_channels % groups or out_channels % groups:
            raise ValueError(
                f"in_channels={in_channels} and out_channels={out_channels} must both be divisible by groups={groups}"
            )
        self.in_channels, self.out_channels, self.groups = in_channels, out_channels, groups
        self.weight = nn.Parameter(torch.empty(out_channels, in_channels // groups))
        self.bias = nn.Parameter(torch.empty(out_channels)) if bias else None
        self.reset_parameters()

    def reset_parameters(self):
        # Same initialisation as a grouped Conv2d of this shape.
        nn.init.kaiming_uniform_(self.weight, a=5**0.5)
        if self.bias is not None:
            bound = 1 / (self.weight.shape[1] ** 0.5)
            nn.init.uniform_(self.bias, -bound, bound)

    def forward(self, x: Tensor) -> Tensor:
        return grouped_linear(x, self.weight, self.bias, self.groups)

    def extra_repr(self) -> str:
        return f"{self.in_channels}, {self.out_channels}, groups={self.groups}, bias={self.bias is not None}"


def grouped_linear(x: Tensor, weight: Tensor, bias: Optional[Tensor], groups: int) -> Tensor:
    """:class:`GroupedLinear`'s map with the given ``(out, in / groups)`` weight
    (``groups=1``: ``F.linear``).

    On the CPU in float32 with more than one thread (where ATen runs 1x1
    convolutions with oneDNN), the map runs as a 1x1 convolution over a
    channels-last view of the ``(M, in)`` rows, which needs no copy: on many
    rows (GKGNet's first stages) it measured up to 2x faster than MKL's
    ``addmm`` and ``bmm``, on small inputs slower (see :func:`_onednn_pays`).
    A grouped map takes this path only without autograd, since oneDNN's
    grouped backward measured slower than ``bmm``'s.  The values agree with
    ``F.linear`` to float32 rounding (a different summation order).
    """
    if _onednn_pays(x, weight, bias, groups):
        m, n = x.numel() // x.shape[-1], weight.shape[0]
        rows = x.reshape(1, m, 1, x.shape[-1]).permute(0, 3, 1, 2)  # (1, in, M, 1), channels-last strides
        out = F.conv2d(rows, weight.reshape(n, weight.shape[1], 1, 1), bias, groups=groups)
        return out.permute(0, 2, 3, 1).reshape(*x.shape[:-1], n)
    if groups == 1:
        return F.linear(x, weight, bias)
    out_channels, in_per_group = weight.shape
    w = weight.view(groups, out_channels // groups, in_per_group)
    out = torch.bmm(x.reshape(-1, groups, in_per_group).transpose(0, 1), w.transpose(1, 2))
    out = out.transpose(0, 1).reshape(*x.shape[:-1], out_channels)
    if bias is None:
        return out
    # In place (out is bmm's fresh result or a copy of it; autograd keeps neither) unless the sum
    # promotes, as a half-precision out and a float32 bias do under autocast.
    return out.add_(bias) if bias.dtype == out.dtype else out + bias


# (rows, multiply-adds) from which oneDNN's faster kernel outweighs its per-call overhead (measured here:
# 640 rows of 80 -> 80 channels 0.44x, 640 x 640 -> 2560 0.74x, 2048 x 64 -> 128 0.77x the speed of addmm;
# GKGNet-S's stage 3 at 224 px batch 8, 1568 rows of 400 -> 1600 channels and the like: a whole evaluation
# pass 1.03-1.04x faster in paired runs, a training step unchanged).
_ONEDNN_SIZES = ((2048, 1 << 26), (1024, 1 << 27))


def _onednn_pays(x: Tensor, weight: Tensor, bias: Optional[Tensor], groups: int) -> bool:
    """Whether :func:`grouped_linear` runs as a oneDNN 1x1 convolution: rows
    that :func:`_onednn_usable` accepts, a float32 weight and bias, at least 2048
    rows and 2^26 multiply-adds or 1024 and 2^27, and for a grouped map no
    gradient to compute."""
    if x.dim() < 2 or x.numel() == 0 or not _onednn_usable(x):
        return False
    if any(t is not None and t.dtype != torch.float32 for t in (weight, bias)):
        return False
    rows = x.numel() // x.shape[-1]
    if not any(rows >= r and rows * weight.numel() >= macs for r, macs in _ONEDNN_SIZES):
        return False
    return groups == 1 or not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad))


def _onednn_usable(x: Tensor) -> bool:
    """Float32 CPU work that ATen's oneDNN convolutions can take: oneDNN built
    and on, more than one thread (with one, ATen runs its own slower 1x1
    kernel), not under autocast (whose half-precision ``linear`` is oneDNN
    already), and no compiler, exporter or dispatch mode watching (a compiled
    or exported graph keeps a plain matrix product and its compiler's own
    choices)."""
    if is_tracing() or x.device.type != "cpu" or x.dtype != torch.float32:
        return False
    if torch.get_num_threads() < 2 or not torch.backends.mkldnn.is_available():
        return False
    return torch.backends.mkldnn.enabled and not torch.is_autocast_enabled("cpu")


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
        grad_rows = grad_out.reshape(1, rows, 1, out_channels).permute(0, 3, 1, 2)  # (1, out, M, 1), channels-last
        x_rows = x.reshape(1, rows, 1, in_channels).permute(0, 3, 1, 2)
        weight = grad_out.new_empty(out_channels, in_channels, 1, 1)  # its sizes only: never read
        _, grad_weight, _ = torch.ops.aten.convolution_backward(
            grad_rows, x_rows, weight, None, [1, 1], [0, 0], [1, 1], False, [0, 0], 1, [False, True, False]
        )
        return grad_weight.view(out_channels, in_channels)
    return grad_out.t() @ x


def _activation(name: Optional[str]) -> nn.Module:
    acts = {"gelu": nn.GELU, "relu": nn.ReLU, None: nn.Identity, "none": nn.Identity}
    if name not in acts:
        raise ValueError(f"unknown activation {name!r}; expected one of {sorted(map(str, acts))}")
    return acts[name]()


class _MaxRelative(torch.autograd.Function):
    """The interleaved ``[x_dst[i, c], m[i, c] - x_dst[i, c]]``, ``(N_dst, 2C)``, with
    ``m[i, c] = max_j x_src[neighbors[g(c), i, j], c]`` for a ``(G, N_dst, k)``
    table, ``g(c)`` the group of channel ``c``.

    On float32 CPU tensors the compiled kernel of :func:`gkg_pyg.native.max_relative`
    does it in one pass.  Otherwise one ``(N_dst, C)`` gather per neighbour rank
    is folded into a running maximum: on the CPU several times faster than
    gathering all ``(N_dst, k, C)`` candidates and reducing over ``k`` (it stays in
    cache).  Both give the same values.  For the backward pass only the rank of
    each winner (the first maximal neighbour, nearest first; one byte per value
    when ``k <= 256``) is kept, and the gradient goes to the winners with one
    index scatter (the compiled :func:`gkg_pyg.native.max_relative_backward`
    on float32 CPU tensors, the same sums in the same order).
    """

    @staticmethod
    def forward(ctx, x_src: Tensor, x_dst: Tensor, neighbors: Tensor) -> Tensor:
        g, n_dst, k = neighbors.shape
        n_src, c = x_src.shape
        with_rank = ctx.needs_input_grad[0]
        fused = max_relative(x_src, x_dst, neighbors, with_rank)
        if fused is not None:
            out, rank = fused
        else:
            best, rank = _neighbor_max(x_src, neighbors, with_rank)
            out = _interleaved(x_dst, best.view(n_dst, c) - x_dst)
        if with_rank:
            ctx.save_for_backward(neighbors, rank)
        ctx.n_src = n_src
        return out

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        grad = grad_out.reshape(grad_out.shape[0], -1, 2)
        grad_max = grad[..., 1]
        grad_src = grad_dst = None
        if ctx.needs_input_grad[0]:
            neighbors, rank = ctx.saved_tensors
            grad_src = max_relative_backward(grad_out, neighbors, rank, ctx.n_src)
            if grad_src is None:
                g, n_dst, _ = neighbors.shape
                c = grad_max.shape[1]
                winners = neighbors.transpose(0, 1).gather(2, rank.view(n_dst, g, c // g).long())  # (N_dst, G, C / G)
                grad_src = grad_out.new_zeros(ctx.n_src, c).scatter_add_(0, winners.view(n_dst, c), grad_max)
        if ctx.needs_input_grad[1]:
            grad_dst = grad[..., 0] - grad_max
        return grad_src, grad_dst, None


def _interleaved(x_dst: Tensor, rel: Tensor) -> Tensor:
    """``[x_{i,0}, rel_{i,0}, x_{i,1}, rel_{i,1}, ...]``, ``(N_dst, 2C)``: the layout the
    conv's grouped map expects (and :meth:`_MaxRelative.backward` splits again)."""
    return torch.stack([x_dst, rel], dim=-1).view(x_dst.shape[0], -1)


def _neighbor_max(x_src: Tensor, neighbors: Tensor, with_rank: bool) -> Tuple[Tensor, Optional[Tensor]]:
    """PyTorch path of :class:`_MaxRelative`: the maximum ``(N_dst * G, C / G)`` and,
    ``with_rank``, the rank of the first maximal neighbour."""
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


def _check_edge_range(edge_index: Tensor, n_src: int, n_dst: int) -> None:
    """Raise a ``ValueError`` naming the first out-of-range index of a ``(2, E)``
    or ``(G, 2, E)`` ``edge_index`` in the caller's own numbering.  The happy path
    reads one small ``(..., 2, 2)`` tensor of minima and maxima back to the host."""
    if edge_index.numel() == 0:
        return
    bounds = torch.stack([edge_index.amin(dim=-1), edge_index.amax(dim=-1)], dim=-1).view(-1, 2, 2).tolist()
    for g, rows in enumerate(bounds):
        for row, (name, n) in enumerate((("source", n_src), ("destination", n_dst))):
            if rows[row][0] < 0 or rows[row][1] >= n:
                index = edge_index[row] if edge_index.dim() == 2 else edge_index[g, row]
                value = int(index[(index < 0) | (index >= n)][0])
                where = "edge_index" if edge_index.dim() == 2 else f"edge_index[g={g}]"
                raise ValueError(
                    f"{where} {name} index {value} out of range for {n} {name} nodes (valid: 0 to {n - 1})"
                )


def _norm(name: Optional[str], channels: int) -> nn.Module:
    if name == "batch":
        return nn.BatchNorm1d(channels)
    if name in (None, "none"):
        return nn.Identity()
    raise ValueError(f"unknown norm {name!r}; expected 'batch' or None")


class GroupMaxRelConv(MessagePassing):
    r"""The group max-relative graph convolution of GKGNet
    (`"Group K-Nearest Neighbor based Graph Convolutional Network for
    Multi-Label Image Recognition" <https://arxiv.org/abs/2308.14378>`_).

    The channels are split into :math:`G` contiguous groups; group :math:`g`
    aggregates over its own neighbour set :math:`\mathcal{N}_g(i)` (paper eq. 1)

    .. math::
        \mathbf{m}_{i,g} = \max_{j \in \mathcal{N}_g(i)} \left(
        \mathbf{x}_{j,g} - \mathbf{x}_{i,g} \right)
        = \max_{j \in \mathcal{N}_g(i)} \mathbf{x}_{j,g} - \mathbf{x}_{i,g},

    and the update (paper eq. 2, as the authors implement it) interleaves the
    destination features with the concatenated messages channel by channel,

    .. math::
        \mathbf{x}'_i = \sigma\left(\mathrm{Norm}\left(\mathbf{W}
        [x_{i,0}, m_{i,0}, x_{i,1}, m_{i,1}, \ldots]\right)\right),

    with :math:`\mathbf{W}` a linear map of ``conv_groups`` weight blocks.
    A destination without neighbours in a group gets :math:`\mathbf{m} = 0`.

    Args:
        in_channels (int): node feature size :math:`C` (divisible by ``groups``).
        out_channels (int): output size (divisible by ``conv_groups``; GKGNet
            uses :math:`2C`).
        groups (int): number of channel groups :math:`G`. (default: ``2``)
        conv_groups (int): weight groups of the update map. (default: ``4``)
        act (str, optional): ``"gelu"``, ``"relu"`` or ``None``.
        norm (str, optional): ``"batch"`` or ``None``.
        **kwargs: arguments of :class:`torch_geometric.nn.conv.MessagePassing`.

    Shapes:
        - **input:** node features :math:`(|\mathcal{V}|, C)` or
          :math:`((|\mathcal{V}_s|, C), (|\mathcal{V}_t|, C))` if bipartite;
          edge indices :math:`(G, 2, |\mathcal{E}|)` (one edge set per group,
          as returned by :func:`gkg_pyg.group_knn`) or :math:`(2, |\mathcal{E}|)`
          (shared by all groups), or one sparse adjacency ``adj_t``
          :math:`(|\mathcal{V}_t|, |\mathcal{V}_s|)` (``torch.sparse`` or
          ``SparseTensor``, shared by all groups); or, instead of edge indices, a regular
          neighbour table ``neighbors`` :math:`(G, |\mathcal{V}_t|, k)` of source
          indices (the fast path: a gather and a max over the :math:`k`
          neighbours, whose backward is one index scatter)
        - **output:** node features :math:`(|\mathcal{V}_t|, C_{out})`

    Edge indices are checked in the caller's numbering (an out-of-range index
    is a ``ValueError`` naming it, its group and the node count); that check
    reads two numbers per group back to the host and is skipped under
    ``torch.compile``.  The ``neighbors`` table is checked by shape only.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        groups: int = 2,
        conv_groups: int = 4,
        act: Optional[str] = "gelu",
        norm: Optional[str] = "batch",
        **kwargs,
    ):
        kwargs.setdefault("aggr", "max")
        super().__init__(**kwargs)
        if in_channels % groups:
            raise ValueError(f"in_channels={in_channels} is not divisible by groups={groups}")
        self.in_channels, self.out_channels = in_channels, out_channels
        self.groups, self.conv_groups = groups, conv_groups
        self.nn = nn.Sequential(
            GroupedLinear(2 * in_channels, out_channels, conv_groups), _norm(norm, out_channels), _activation(act)
        )
        self.reset_parameters()

    def reset_parameters(self):
        super().reset_parameters()
        for module in self.nn:
            if hasattr(module, "reset_parameters"):
                module.reset_parameters()

    def forward(
        self,
        x: Union[Tensor, PairTensor],
        edge_index: Union[Tensor, SparseTensor, None] = None,
        *,
        neighbors: Optional[Tensor] = None,
    ) -> Tensor:
        """Aggregate over ``edge_index`` (any PyG graph) or over a regular
        ``neighbors`` table ``(G, N_dst, k)`` of source indices (exactly ``k``
        per destination and group, as :func:`gkg_pyg.group_knn` builds:
        ``neighbors = edge_index[:, 0].view(G, N_dst, k)``). Pass one of the two."""
        return self.nn(self.relative_features(x, edge_index, neighbors=neighbors))

    def relative_features(
        self,
        x: Union[Tensor, PairTensor],
        edge_index: Union[Tensor, SparseTensor, None] = None,
        *,
        neighbors: Optional[Tensor] = None,
    ) -> Tensor:
        """The interleaved ``[x_{i,0}, m_{i,0}, x_{i,1}, m_{i,1}, ...]``,
        ``(N_dst, 2C)``, that :meth:`forward` maps through ``self.nn`` (for
        callers that fuse that map with what follows it)."""
        x_src, x_dst = (x, x) if isinstance(x, Tensor) else x
        g, c = self.groups, self.in_channels
        if x_src.shape[-1] != c or x_dst.shape[-1] != c:
            raise ValueError(
                f"{self.__class__.__name__} expects {c} channels, got "
                f"{x_src.shape[-1]} (source) and {x_dst.shape[-1]} (destination)"
            )
        if (edge_index is None) == (neighbors is None):
            raise ValueError("pass exactly one of edge_index (any graph) and neighbors (a (G, N_dst, k) table)")
        if neighbors is not None:
            if neighbors.dim() != 3 or neighbors.shape[:2] != (g, x_dst.shape[0]) or neighbors.shape[2] < 1:
                raise ValueError(
                    f"neighbors must be ({g}, {x_dst.shape[0]}, k) with k >= 1, got {tuple(neighbors.shape)}"
                )
            return _MaxRelative.apply(x_src, x_dst, neighbors)
        rel = self._general_max_rel(x_src, x_dst, self._group_edges(edge_index, x_src.shape[0], x_dst.shape[0]))
        return _interleaved(x_dst, rel)

    def _group_edges(self, edge_index: Union[Tensor, SparseTensor], n_src: int, n_dst: int) -> Tensor:
        """The caller's edges as ``(G, 2, E)``, checked in the caller's shape and
        numbering: a ``(2, E)`` ``edge_index`` or a sparse ``adj_t`` is shared by all groups."""
        g = self.groups
        if is_sparse(edge_index):  # adj_t: rows are destinations, columns sources (PyG's convention)
            size = tuple(edge_index.sizes()) if isinstance(edge_index, SparseTensor) else tuple(edge_index.shape)
            if size != (n_dst, n_src):
                raise ValueError(
                    f"adj_t must be (N_dst, N_src); got an adjacency of size {size} for {n_dst} "
                    f"destination and {n_src} source nodes"
                )
            (dst, src), _ = to_edge_index(edge_index)
            edge_index = torch.stack([src, dst])
        if edge_index.is_floating_point() or edge_index.is_complex() or edge_index.dtype == torch.bool:
            raise ValueError(f"edge_index must hold integer indices, got {edge_index.dtype}")
        shape = tuple(edge_index.shape)
        if edge_index.dim() not in (2, 3) or shape[-2] != 2 or (edge_index.dim() == 3 and shape[0] != g):
            raise ValueError(f"edge_index must be ({g}, 2, E) or (2, E), got {shape}")
        if not torch.compiler.is_compiling():
            _check_edge_range(edge_index, n_src, n_dst)
        return edge_index.unsqueeze(0).expand(g, -1, -1) if edge_index.dim() == 2 else edge_index

    def _general_max_rel(self, x_src: Tensor, x_dst: Tensor, edge_index: Tensor) -> Tensor:
        """``max_j x_j - x_i`` per group over ``(G, 2, E)`` edges (0 without neighbours), ``(N_dst, C)``."""
        g, c = self.groups, self.in_channels
        # Group g of node n becomes sub-node n * G + g, so one max aggregation
        # over sub-nodes is the per-group aggregation over per-group edges.
        group_id = torch.arange(g, device=edge_index.device).view(g, 1)
        sub_edges = (edge_index * g + group_id.unsqueeze(1)).transpose(0, 1).reshape(2, -1)
        n_src, n_dst = x_src.shape[0], x_dst.shape[0]
        sub_src, sub_dst = x_src.reshape(n_src * g, c // g), x_dst.reshape(n_dst * g, c // g)
        nbr_max = self.propagate(sub_edges, x=(sub_src, sub_dst), size=(n_src * g, n_dst * g))
        has_nbr = torch.zeros(n_dst * g, 1, dtype=torch.bool, device=x_dst.device)
        has_nbr[sub_edges[1]] = True
        return torch.where(has_nbr, nbr_max - sub_dst, torch.zeros_like(sub_dst)).view(n_dst, c)

    def message(self, x_j: Tensor) -> Tensor:
        return x_j

    def __repr__(self) -> str:
        return (
            f"{self.__class__.__name__}({self.in_channels}, {self.out_channels}, groups={self.groups}, "
            f"conv_groups={self.conv_groups})"
        )


class DynamicGroupMaxRelConv(GroupMaxRelConv):
    r""":class:`GroupMaxRelConv` on a group kNN graph rebuilt from the input
    features at every call (like :class:`torch_geometric.nn.DynamicEdgeConv`),
    for point clouds and other feature spaces.

    Args:
        in_channels (int), out_channels (int), groups (int), conv_groups (int):
            as in :class:`GroupMaxRelConv`.
        k (int): neighbours per node and group.
        dilation (int): keep every ``dilation``-th of the ``k * dilation`` nearest.
        backend (str): kNN backend of :func:`gkg_pyg.group_knn`.

    Shapes:
        - **input:** node features :math:`(|\mathcal{V}|, C)` or
          :math:`((|\mathcal{V}_s|, C), (|\mathcal{V}_t|, C))` if bipartite,
          optional batch vector :math:`(|\mathcal{V}|)` or
          :math:`((|\mathcal{V}_s|), (|\mathcal{V}_t|))` if bipartite
        - **output:** node features :math:`(|\mathcal{V}_t|, C_{out})`
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        k: int,
        groups: int = 2,
        dilation: int = 1,
        conv_groups: int = 4,
        backend: str = "auto",
        **kwargs,
    ):
        super().__init__(in_channels, out_channels, groups=groups, conv_groups=conv_groups, **kwargs)
        self.k, self.dilation, self.backend = k, dilation, backend

    def forward(
        self, x: Union[Tensor, PairTensor], batch: Union[Tensor, Tuple[Optional[Tensor], Optional[Tensor]], None] = None
    ) -> Tensor:
        x_src, x_dst = (x, x) if isinstance(x, Tensor) else x
        batch_src, batch_dst = (batch, batch) if batch is None or isinstance(batch, Tensor) else batch
        edge_index = group_knn(
            x_src,
            x_dst,
            self.k,
            self.groups,
            dilation=self.dilation,
            batch_src=batch_src,
            batch_dst=batch_dst,
            backend=self.backend,
        )
        # group_knn's edges are regular: k per destination, ordered by destination.
        return super().forward(x, neighbors=edge_index[:, 0].view(self.groups, x_dst.shape[0], self.k))

    def __repr__(self) -> str:
        return (
            f"{self.__class__.__name__}({self.in_channels}, {self.out_channels}, k={self.k}, "
            f"groups={self.groups}, dilation={self.dilation})"
        )
