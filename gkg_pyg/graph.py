"""Heterogeneous PyG views of the graphs GKGNet builds.

One :class:`~torch_geometric.data.HeteroData` per stage, covering a batch of
images:

* node type ``patch``: the stage's patch grid (``x`` the patch features the
  label nodes aggregate, ``knn_x`` the features the patch-level kNN compared,
  ``pos`` grid row/col, ``box`` the pixel box ``x0, y0, x1, y1`` in the input
  image, ``batch`` the image id);
* node type ``pooled_patch`` (stages whose sources are pooled, ``r > 1``):
  the ``r x r``-averaged source grid of the patch-level graph, same attributes;
* node type ``label`` (``x`` the label-node features that chose their
  neighbours, ``batch``, and ``name`` when known);
* edge types ``(src, 'group_g', 'patch')`` for the patch-level graph of the
  stage's last patch block (``src`` is ``pooled_patch`` or ``patch``) and
  ``('patch', 'group_g', 'label')`` for the cross-level graph, one per group.

Edges point from source to destination, as in PyG.
"""

from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch
from torch import Tensor
from torch_geometric.data import HeteroData


def grid_nodes(num_images: int, grid: Tuple[int, int], stride: Tuple[float, float], device=None):
    """Row/col positions ``(B*h*w, 2)``, pixel boxes ``(B*h*w, 4)`` and batch ids
    of ``num_images`` row-major ``h x w`` grids whose cells are ``stride`` pixels."""
    h, w = grid
    rows, cols = torch.meshgrid(torch.arange(h, device=device), torch.arange(w, device=device), indexing="ij")
    pos = torch.stack([rows.reshape(-1), cols.reshape(-1)], dim=1)
    sy, sx = stride
    box = torch.stack([pos[:, 1] * sx, pos[:, 0] * sy, (pos[:, 1] + 1) * sx, (pos[:, 0] + 1) * sy], 1).float()
    batch = torch.arange(num_images, device=device).repeat_interleave(h * w)
    return pos.repeat(num_images, 1), box.repeat(num_images, 1), batch


def build_stage_graph(
    *,
    patch_x: Tensor,
    grid: Tuple[int, int],
    image_size: Tuple[int, int],
    patch_knn_x: Optional[Tensor] = None,
    source_x: Optional[Tensor] = None,
    pool: int = 1,
    patch_edges: Optional[Tensor] = None,
    label_x: Optional[Tensor] = None,
    label_edges: Optional[Tensor] = None,
    label_names: Optional[Sequence[str]] = None,
) -> HeteroData:
    """Assemble one stage's :class:`HeteroData` (see the module docstring).

    Args:
        patch_x: ``(B*h*w, C)`` patch features, images stored one after another.
        grid: ``(h, w)`` of the stage's patch grid.
        image_size: ``(H, W)`` of the input images, for the pixel boxes.
        patch_knn_x: ``(B*h*w, C)`` features the patch-level kNN compared.
        source_x: ``(B*h*w/pool^2, C)`` pooled source features (``pool > 1``).
        pool: the source pooling factor ``r`` of the patch-level graph.
        patch_edges: ``(G, 2, E)`` patch-level edges from :func:`group_knn`.
        label_x: ``(B*L, C)`` label-node features.
        label_edges: ``(G, 2, E)`` cross-level edges (patch -> label).
        label_names: the ``L`` label names.
    """
    h, w = grid
    num_images = patch_x.shape[0] // (h * w)
    if num_images * h * w != patch_x.shape[0]:
        raise ValueError(f"patch_x has {patch_x.shape[0]} rows, not a multiple of the {h}x{w} grid")
    stride = (image_size[0] / h, image_size[1] / w)
    data = HeteroData()
    data["patch"].x = patch_x
    data["patch"].pos, data["patch"].box, data["patch"].batch = grid_nodes(num_images, grid, stride, patch_x.device)
    data["patch"].grid = grid
    if patch_knn_x is not None:
        data["patch"].knn_x = patch_knn_x
    src_type = "patch"
    if pool > 1:
        src_type = "pooled_patch"
        pgrid = (h // pool, w // pool)
        data[src_type].pos, data[src_type].box, data[src_type].batch = grid_nodes(
            num_images, pgrid, (stride[0] * pool, stride[1] * pool), patch_x.device
        )
        data[src_type].grid = pgrid
        data[src_type].num_nodes = num_images * pgrid[0] * pgrid[1]
        if source_x is not None:
            data[src_type].x = source_x
    if patch_edges is not None:
        for g in range(patch_edges.shape[0]):
            data[src_type, f"group_{g}", "patch"].edge_index = patch_edges[g]
    if label_x is not None:
        num_labels = label_x.shape[0] // num_images
        data["label"].x = label_x
        data["label"].batch = torch.arange(num_images, device=label_x.device).repeat_interleave(num_labels)
        if label_names is not None:
            data["label"].name = list(label_names)
    if label_edges is not None:
        for g in range(label_edges.shape[0]):
            data["patch", f"group_{g}", "label"].edge_index = label_edges[g]
    return data


def stack_group_edges(data: HeteroData, src: str, dst: str) -> Tensor:
    """The ``(G, 2, E)`` per-group edge tensor of ``src -> dst`` in ``data``,
    ready for :class:`gkg_pyg.GroupMaxRelConv` (edge types ``group_0 .. group_{G-1}``)."""
    rels = sorted(
        (int(rel.split("_")[1]), et)
        for et in data.edge_types
        for s, rel, d in [et]
        if s == src and d == dst and rel.startswith("group_")
    )
    if not rels:
        raise KeyError(f"no ('{src}', 'group_g', '{dst}') edge types in {data.edge_types}")
    return torch.stack([data[et].edge_index for _, et in rels])


def neighbour_table(edges: Tensor, num_dst: int) -> Tensor:
    """``(G, 2, num_dst*k)`` edges in :func:`group_knn` order -> ``(G, num_dst, k)`` sources."""
    return edges[:, 0].reshape(edges.shape[0], num_dst, -1)


def flat_neighbour_table(neighbors: Tensor, num_src: int) -> Tensor:
    """A per-image neighbour table ``(G, B, N, k)`` of source indices within each
    image -> ``(G, B * N, k)`` indices into the sources of all images stacked
    as ``(B * num_src, C)``, the table :class:`gkg_pyg.GroupMaxRelConv` takes."""
    g, b, n, k = neighbors.shape
    offsets = torch.arange(b, device=neighbors.device).view(1, b, 1, 1) * num_src
    return (neighbors + offsets).view(g, b * n, k)


def table_edges(neighbors: Tensor, num_src: int) -> Tensor:
    """A per-image neighbour table ``(G, B, N, k)`` as :func:`gkg_pyg.group_knn`'s
    ``(G, 2, B * N * k)`` edges over the stacked node sets (the inverse of
    :func:`neighbour_table` on :func:`flat_neighbour_table`'s result)."""
    table = flat_neighbour_table(neighbors, num_src)
    g, n, k = table.shape
    dst = torch.arange(n, device=table.device).repeat_interleave(k).expand(g, -1)
    return torch.stack([table.reshape(g, -1), dst], dim=1)
