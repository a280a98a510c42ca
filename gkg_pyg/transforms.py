"""PyG transforms: the group kNN graph built once, in a data pipeline.

:class:`GroupKNNGraph` is :class:`torch_geometric.transforms.KNNGraph` for
:func:`gkg_pyg.group_knn`: one edge set per channel group.

* On a :class:`~torch_geometric.data.Data` it stores the ``(G, 2, E)`` tensor
  as ``data.group_edge_index`` (:data:`GROUP_EDGE_KEY`), the layout
  :class:`gkg_pyg.GroupMaxRelConv` takes.  PyG collates it without help: a key
  containing ``"index"`` is concatenated along its last dimension and
  incremented by the number of nodes (``Data.__cat_dim__`` / ``__inc__``), so a
  :class:`~torch_geometric.data.Batch` holds the ``(G, 2, E_1 + E_2 + ...)``
  edges of all its graphs, each group in its own slice.
* On a :class:`~torch_geometric.data.HeteroData` it stores one edge type per
  group, ``(node_type, "group_g", node_type)`` (or ``(src, "group_g", dst)``
  for a bipartite graph), the convention of :func:`gkg_pyg.stack_group_edges`,
  which rebuilds the ``(G, 2, E)`` tensor.
"""

from __future__ import annotations

from typing import Optional, Tuple, Union

import torch
from torch import Tensor
from torch_geometric.data import Data, HeteroData
from torch_geometric.transforms import BaseTransform

from .knn import group_knn

__all__ = ["GroupKNNGraph", "GROUP_EDGE_KEY"]

GROUP_EDGE_KEY = "group_edge_index"


class GroupKNNGraph(BaseTransform):
    r"""Creates the group k-NN graph of :func:`gkg_pyg.group_knn` from node
    features (``data.x`` by default, or ``data.pos``).

    The channels are split into ``groups`` contiguous chunks; in each group every
    node picks the ``k`` nodes of its own graph whose L2-normalised sub-vectors
    are nearest (cosine similarity), keeping ranks :math:`0, d, \ldots, (k-1)d`
    for dilation :math:`d`.  Edges point from the chosen neighbour to the node
    (``flow="source_to_target"``: every node has exactly ``k`` incoming edges
    per group), ordered by destination, then nearest first.

    Args:
        k (int): neighbours per node and group.
        groups (int): channel groups :math:`G` (must divide the feature size).
        dilation (int): keep every ``dilation``-th of the ``k * dilation``
            nearest. (default: ``1``)
        loop (bool): if ``False`` (as in :class:`~torch_geometric.transforms.KNNGraph`),
            a node is not its own neighbour; if ``True`` it is (then the graph
            equals ``group_knn(x, x, ...)``, which :class:`gkg_pyg.DynamicGroupMaxRelConv`
            builds). (default: ``False``)
        attr (str): node attribute holding the features, ``"x"`` or ``"pos"``
            (the distance is a cosine: positions compare by direction from the
            origin). (default: ``"x"``)
        node_type (str or (str, str), optional): for :class:`HeteroData`, the
            node type of a graph over one node set, or ``(src, dst)`` for a
            bipartite graph (``loop`` does not apply); may be left out when
            there is a single node type.
        backend (str): kNN backend of :func:`gkg_pyg.group_knn`. (default: ``"auto"``)

    A ``batch`` vector on the data (an already collated batch) keeps the
    neighbours within each graph.
    """

    def __init__(
        self,
        k: int,
        groups: int,
        dilation: int = 1,
        loop: bool = False,
        attr: str = "x",
        node_type: Optional[Union[str, Tuple[str, str]]] = None,
        backend: str = "auto",
    ):
        if k < 1 or groups < 1 or dilation < 1:
            raise ValueError(
                f"k, groups and dilation must be positive, got k={k}, groups={groups}, dilation={dilation}"
            )
        if attr not in ("x", "pos"):
            raise ValueError(f"attr must be 'x' or 'pos', got {attr!r}")
        self.k, self.groups, self.dilation, self.loop = k, groups, dilation, loop
        self.attr, self.node_type, self.backend = attr, node_type, backend

    def forward(self, data: Union[Data, HeteroData]) -> Union[Data, HeteroData]:
        if isinstance(data, HeteroData):
            src, dst = self._hetero_types(data)
            edges = self._edges(data[src], data[dst], f"data[{src!r}]", f"data[{dst!r}]", src == dst)
            for g in range(edges.shape[0]):
                data[src, f"group_{g}", dst].edge_index = edges[g]
        else:
            data[GROUP_EDGE_KEY] = self._edges(data, data, "data", "data", True)
        return data

    def _hetero_types(self, data: HeteroData) -> Tuple[str, str]:
        if self.node_type is None:
            if len(data.node_types) != 1:
                raise ValueError(
                    f"GroupKNNGraph on a HeteroData with node types {data.node_types} needs "
                    "node_type= (a type, or (src, dst))"
                )
            return data.node_types[0], data.node_types[0]
        src, dst = (self.node_type, self.node_type) if isinstance(self.node_type, str) else self.node_type
        for t in (src, dst):
            if t not in data.node_types:
                raise KeyError(f"node type {t!r} is not in the HeteroData (node types: {data.node_types})")
        return src, dst

    def _features(self, store, where: str) -> Tensor:
        x = getattr(store, self.attr, None)
        if not isinstance(x, Tensor) or x.dim() != 2:
            found = "missing" if x is None else f"of shape {tuple(x.shape)}" if isinstance(x, Tensor) else type(x)
            raise ValueError(
                f"GroupKNNGraph(attr={self.attr!r}) needs {where}.{self.attr} as a "
                f"(num_nodes, channels) tensor, but it is {found}"
            )
        return x

    def _edges(self, src_store, dst_store, src_name: str, dst_name: str, same: bool) -> Tensor:
        x_src, x_dst = self._features(src_store, src_name), self._features(dst_store, dst_name)
        batch_src, batch_dst = getattr(src_store, "batch", None), getattr(dst_store, "batch", None)
        k, groups, dilation = self.k, self.groups, self.dilation
        if not same or self.loop:
            return group_knn(
                x_src,
                x_dst,
                k,
                groups,
                dilation=dilation,
                batch_src=batch_src,
                batch_dst=batch_dst,
                backend=self.backend,
            )
        # Without self-loops: the k * dilation + 1 nearest, self removed, then every dilation-th.
        needed, n = k * dilation, x_dst.shape[0]
        sizes = [n] if batch_dst is None or n == 0 else torch.bincount(batch_dst.cpu()).tolist()
        small = [(g, s) for g, s in enumerate(sizes) if 0 < s <= needed]
        if small:
            raise ValueError(
                f"{self} without self-loops needs more than k * dilation = {needed} nodes per graph, "
                f"but graph {small[0][0]} has {small[0][1]}"
            )
        edges = group_knn(
            x_src, x_dst, needed + 1, groups, batch_src=batch_src, batch_dst=batch_dst, backend=self.backend
        )
        table = edges[:, 0].view(groups, n, needed + 1)
        drop = table == torch.arange(n, device=table.device).view(1, n, 1)
        # A node appears at most once in its own list; where ties pushed it out, drop the farthest instead.
        drop[..., -1] |= ~drop.any(dim=-1)
        table = table[~drop].view(groups, n, needed)[..., ::dilation]
        dst = torch.arange(n, device=table.device).view(1, n, 1).expand_as(table)
        return torch.stack([table.reshape(groups, -1), dst.reshape(groups, -1)], dim=1)

    def __repr__(self) -> str:
        return (
            f"{self.__class__.__name__}(k={self.k}, groups={self.groups}, dilation={self.dilation}, loop={self.loop})"
        )
