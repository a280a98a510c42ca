"""Group max-relative graph convolution (GKGNet, paper eq. 1 and 2)."""

from __future__ import annotations

from typing import Optional, Tuple, Union

import torch
from torch import Tensor, nn
from torch_geometric.nn import MessagePassing
from torch_geometric.typing import SparseTensor
from torch_geometric.utils import is_sparse, to_edge_index

from .knn import _has_no_data, group_knn
from .ops.linear import grouped_linear
from .ops.aggregate import interleaved, max_relative
from .ops.fused import autocasting, batchnorm_gelu, fusable

PairTensor = Tuple[Tensor, Tensor]


class GroupedLinear(nn.Module):
    """A linear map with ``groups`` independent weight blocks: a 1x1 grouped
    convolution on node features ``(N, in_channels) -> (N, out_channels)``.

    ``weight`` is ``(out_channels, in_channels // groups)``, the layout of a
    grouped ``Conv2d`` weight without its trailing ``1 x 1``.
    """

    def __init__(self, in_channels: int, out_channels: int, groups: int = 1, bias: bool = True):
        super().__init__()
        if groups < 1:
            raise ValueError(f"groups must be a positive integer, got {groups}")
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


def _activation(name: Optional[str]) -> nn.Module:
    acts = {"gelu": nn.GELU, "relu": nn.ReLU, None: nn.Identity, "none": nn.Identity}
    if name not in acts:
        raise ValueError(f"unknown activation {name!r}; expected one of {sorted(map(str, acts))}")
    return acts[name]()


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


def fold_batchnorm(weight: Tensor, bias: Optional[Tensor], bn: nn.Module) -> Tuple[Tensor, Tensor]:
    """The weight and bias of one linear map equal to ``bn(linear(x))`` in
    evaluation, for a linear map's ``(out, in)`` or grouped ``(out, in / g)``
    ``weight`` and ``bias`` (or None) and a BatchNorm with running statistics:
    ``W' = s W``, ``b' = s (b - mu) + beta`` with ``s = gamma / sqrt(var + eps)``."""
    scale = torch.rsqrt(bn.running_var + bn.eps)
    if bn.weight is not None:
        scale = bn.weight * scale
    shift = -bn.running_mean * scale
    if bn.bias is not None:
        shift = shift + bn.bias
    if bias is not None:
        shift = shift + bias * scale
    return weight * scale.unsqueeze(1), shift


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
        in_channels (int): node feature size :math:`C` (positive, divisible by ``groups``).
        out_channels (int): output size (divisible by ``conv_groups``; GKGNet
            uses :math:`2C`).
        groups (int): number of channel groups :math:`G`. (default: ``2``)
        conv_groups (int): weight groups of the update map. (default: ``4``)
        act (str, optional): ``"gelu"``, ``"relu"`` or ``None``.
        norm (str, optional): ``"batch"`` or ``None``.
        check_neighbors (bool): check every index of a ``neighbors`` table
            against the source count (a ``ValueError`` naming the first bad
            one). Callers that build their tables themselves (the models)
            switch it off. (default: ``True``)
        **kwargs: arguments of :class:`torch_geometric.nn.conv.MessagePassing`
            (the aggregation is the maximum and messages flow from sources to
            targets: ``aggr`` and ``flow`` take no other value).

    Shapes:
        - **input:** floating-point node features :math:`(|\mathcal{V}|, C)` or
          :math:`((|\mathcal{V}_s|, C), (|\mathcal{V}_t|, C))` if bipartite;
          edge indices :math:`(G, 2, |\mathcal{E}|)` (one edge set per group,
          as returned by :func:`gkg_pyg.group_knn`) or :math:`(2, |\mathcal{E}|)`
          (shared by all groups), or one sparse adjacency ``adj_t``
          :math:`(|\mathcal{V}_t|, |\mathcal{V}_s|)` (``torch.sparse`` or
          ``SparseTensor``, shared by all groups); or, instead of edge indices, a regular
          neighbour table ``neighbors`` :math:`(G, |\mathcal{V}_t|, k)` of source
          indices (the fast path: the operator ``gkg_pyg::max_relative``, a
          gather and a max over the :math:`k` neighbours in one pass, whose
          backward is one index scatter)
        - **output:** node features :math:`(|\mathcal{V}_t|, C_{out})`
          (:math:`(0, C_{out})` for a graph without nodes)

    Edge indices and, with ``check_neighbors``, neighbour tables are checked in
    the caller's numbering (an out-of-range index is a ``ValueError`` naming
    it, its group and the node count); that check reads a few numbers back to
    the host and is skipped under ``torch.compile``.

    With the default update map (:class:`GroupedLinear`, ``BatchNorm1d`` and an
    activation) two paths give the modules' values with less work: in
    training with autograd, BatchNorm and the exact GELU run as the operator
    ``gkg_pyg::bn_gelu_linear``, which keeps only the map's output for the
    backward pass (not also the normalised tensor) and recomputes the rest
    there in two compiled passes (derivatives of any order, higher ones
    through the plain modules); in evaluation the BatchNorm's running
    statistics are folded into the grouped linear map (one pass over the
    features instead of two) and the activation runs in place where no
    gradient flows (equal to rounding).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        groups: int = 2,
        conv_groups: int = 4,
        act: Optional[str] = "gelu",
        norm: Optional[str] = "batch",
        check_neighbors: bool = True,
        **kwargs,
    ):
        # Both paths (edge_index and the neighbour table) compute max_j x_j - x_i over sources j of target i.
        for name, only in (("aggr", "max"), ("flow", "source_to_target")):
            if kwargs.setdefault(name, only) != only:
                raise ValueError(f"GroupMaxRelConv aggregates with {name}={only!r}; got {name}={kwargs[name]!r}")
        super().__init__(**kwargs)
        if in_channels < 1 or out_channels < 1:
            raise ValueError(
                f"in_channels and out_channels must be positive, got in_channels={in_channels}, "
                f"out_channels={out_channels}"
            )
        if groups < 1 or in_channels % groups:
            raise ValueError(f"in_channels={in_channels} is not divisible by groups={groups}")
        if conv_groups < 1 or (2 * in_channels) % conv_groups or out_channels % conv_groups:
            raise ValueError(
                f"conv_groups={conv_groups} must be positive and divide both the update's input width "
                f"2 * in_channels = {2 * in_channels} and out_channels={out_channels}"
            )
        self.in_channels, self.out_channels = in_channels, out_channels
        self.groups, self.conv_groups = groups, conv_groups
        self.check_neighbors = check_neighbors
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
        ``neighbors = edge_index[:, 0].view(G, N_dst, k)``), then update. Pass one of the two."""
        return self._update(self._aggregate(x, edge_index, neighbors=neighbors))

    def _aggregate(
        self,
        x: Union[Tensor, PairTensor],
        edge_index: Union[Tensor, SparseTensor, None] = None,
        *,
        neighbors: Optional[Tensor] = None,
        trusted: bool = False,
    ) -> Tensor:
        """The interleaved ``[x_{i,0}, m_{i,0}, x_{i,1}, m_{i,1}, ...]``, ``(N_dst, 2C)``,
        that :meth:`_update` maps through ``self.nn``.  ``trusted``: the table's
        indices are known to be in range (skips the check)."""
        x_src, x_dst = (x, x) if isinstance(x, Tensor) else x
        self._check_features(x_src, x_dst)
        if (edge_index is None) == (neighbors is None):
            raise ValueError("pass exactly one of edge_index (any graph) and neighbors (a (G, N_dst, k) table)")
        if neighbors is not None:
            self._check_table(neighbors, x_src.shape[0], x_dst.shape[0], check_range=not trusted)
            return max_relative(x_src, x_dst, neighbors)
        rel = self._general_max_rel(x_src, x_dst, self._group_edges(edge_index, x_src.shape[0], x_dst.shape[0]))
        return interleaved(x_dst, rel)

    def _update(self, features: Tensor) -> Tensor:
        """``self.nn(features)``; with the default map, in training with autograd the
        BatchNorm and exact GELU as one operator, in evaluation one grouped linear
        map with the BatchNorm folded in, then the activation (in place where no
        gradient flows)."""
        # the Sequential's modules in one pass (under torch.compile, indexing it traces several calls)
        maps = list(self.nn) if isinstance(self.nn, nn.Sequential) else []
        if len(maps) != 3 or type(maps[0]) is not GroupedLinear:
            return self.nn(features)
        linear, norm, act = maps
        if self.training:
            if torch.is_grad_enabled() and fusable(norm, act):
                return batchnorm_gelu(linear(features), norm)
            return self.nn(features)
        if type(act) not in (nn.GELU, nn.ReLU, nn.Identity):
            return self.nn(features)
        if type(norm) is nn.BatchNorm1d and not norm.training and norm.running_mean is not None:
            out = grouped_linear(features, *fold_batchnorm(linear.weight, linear.bias, norm), linear.groups)
        elif type(norm) is nn.Identity:
            out = linear(features)
        else:
            return self.nn(features)
        if type(act) is nn.Identity:
            return out
        if torch.is_grad_enabled() and out.requires_grad:
            return act(out)
        # out is fresh (the linear map's result): the activation in place saves a tensor of its size
        if type(act) is nn.GELU:
            return torch.ops.aten.gelu_(out, approximate=act.approximate)
        return torch.relu_(out)

    def _check_features(self, x_src: Tensor, x_dst: Tensor) -> None:
        c = self.in_channels
        for name, t in (("source", x_src), ("destination", x_dst)):
            if not isinstance(t, Tensor) or t.dim() != 2:
                shape = tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__
                raise ValueError(f"{self.__class__.__name__} expects {name} node features (N, {c}), got {shape}")
            if not t.is_floating_point():
                raise ValueError(
                    f"{self.__class__.__name__} expects floating-point node features, got {t.dtype} ({name})"
                )
        if x_src.shape[-1] != c or x_dst.shape[-1] != c:
            raise ValueError(
                f"{self.__class__.__name__} expects {c} channels, got "
                f"{x_src.shape[-1]} (source) and {x_dst.shape[-1]} (destination)"
            )
        if x_src.dtype != x_dst.dtype:
            raise ValueError(
                f"{self.__class__.__name__} expects source and destination features of one dtype, got "
                f"{x_src.dtype} and {x_dst.dtype}"
            )
        weight = next(self.nn.parameters(), None)
        if weight is not None and x_src.dtype != weight.dtype and not autocasting(x_src.device.type):
            # (autocast casts for the layer)
            raise ValueError(
                f"{self.__class__.__name__}'s parameters are {weight.dtype} and the node features {x_src.dtype}: "
                f"convert one of them (e.g. conv.to({x_src.dtype}) or x.to({weight.dtype}))"
            )

    def _check_table(self, neighbors: Tensor, n_src: int, n_dst: int, check_range: bool) -> None:
        """The table's shape and dtype; with ``check_neighbors`` (not under
        ``torch.compile``, nor on fake or meta tensors, which hold no values) its
        range: a ``ValueError`` naming the first index outside ``0 .. n_src - 1``
        and its group."""
        g = self.groups
        if neighbors.dim() != 3 or neighbors.shape[:2] != (g, n_dst) or neighbors.shape[2] < 1:
            raise ValueError(f"neighbors must be ({g}, {n_dst}, k) with k >= 1, got {tuple(neighbors.shape)}")
        if neighbors.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"neighbors must hold int64 (or int32) source indices, got {neighbors.dtype}")
        skip = not (check_range and self.check_neighbors) or neighbors.numel() == 0 or torch.compiler.is_compiling()
        if skip or _has_no_data(neighbors):  # fake or meta tensors: no values to read
            return
        low, high = torch.stack(torch.aminmax(neighbors)).tolist()  # one read back to the host
        if low >= 0 and high < n_src:
            return
        bad = (neighbors < 0) | (neighbors >= n_src)
        group, dst, rank = (int(i) for i in bad.nonzero()[0])
        raise ValueError(
            f"neighbors[{group}, {dst}, {rank}] = {int(neighbors[group, dst, rank])} is out of range for "
            f"{n_src} source nodes (valid: 0 to {n_src - 1}); pass check_neighbors=False only for tables "
            "known to be in range"
        )

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
            if isinstance(edge_index, Tensor) and edge_index.layout == torch.sparse_coo:
                # Its entries as stored: PyG's to_edge_index would mark the caller's uncoalesced tensor as
                # coalesced without sorting it (repeated entries are harmless to a maximum).
                dst, src = edge_index._indices().long()
            else:
                (dst, src), _ = to_edge_index(edge_index)
            edge_index = torch.stack([src, dst])
        if edge_index.is_floating_point() or edge_index.is_complex() or edge_index.dtype == torch.bool:
            raise ValueError(f"edge_index must hold integer indices, got {edge_index.dtype}")
        shape = tuple(edge_index.shape)
        if edge_index.dim() not in (2, 3) or shape[-2] != 2 or (edge_index.dim() == 3 and shape[0] != g):
            raise ValueError(f"edge_index must be ({g}, 2, E) or (2, E), got {shape}")
        if not torch.compiler.is_compiling() and not _has_no_data(edge_index):  # fake or meta: no values to read
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
        self._check_features(x_src, x_dst)
        batch_src, batch_dst = (batch, batch) if batch is None or isinstance(batch, Tensor) else batch
        if x_dst.shape[0] == 0:  # no destinations: nothing to search
            table = torch.empty(self.groups, 0, self.k, dtype=torch.long, device=x_dst.device)
        else:
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
            table = edge_index[:, 0].view(self.groups, x_dst.shape[0], self.k)
        return self._update(self._aggregate(x, neighbors=table, trusted=True))

    def __repr__(self) -> str:
        return (
            f"{self.__class__.__name__}({self.in_channels}, {self.out_channels}, k={self.k}, "
            f"groups={self.groups}, dilation={self.dilation})"
        )
