"""Tests of gkg_pyg.graph (the HeteroData views of a stage) on hand-computed
cases, and of the README's PyG usage snippet."""

from __future__ import annotations

import random

import pytest
import torch
import torch.nn.functional as F
from torch_geometric.data import HeteroData

from gkg_pyg import build_stage_graph, group_knn, stack_group_edges
from gkg_pyg.graph import neighbour_table


def test_patch_nodes_hand_case():
    """Two images, 2 x 3 grid on a 8 x 9 image: cells are 4 rows x 3 columns of pixels."""
    patch_x = torch.randn(12, 4)
    data = build_stage_graph(patch_x=patch_x, grid=(2, 3), image_size=(8, 9))
    assert set(data.node_types) == {"patch"}
    assert data.edge_types == []
    assert data["patch"].num_nodes == 12
    assert torch.equal(data["patch"].x, patch_x)
    pos = torch.tensor([[0, 0], [0, 1], [0, 2], [1, 0], [1, 1], [1, 2]])
    assert torch.equal(data["patch"].pos, torch.cat([pos, pos]))
    box = torch.tensor(
        [[0, 0, 3, 4], [3, 0, 6, 4], [6, 0, 9, 4], [0, 4, 3, 8], [3, 4, 6, 8], [6, 4, 9, 8]], dtype=torch.float32
    )
    assert torch.equal(data["patch"].box, torch.cat([box, box]))
    assert torch.equal(data["patch"].batch, torch.tensor([0] * 6 + [1] * 6))
    assert tuple(data["patch"].grid) == (2, 3)


def test_patch_rows_must_fill_the_grid():
    with pytest.raises(ValueError, match=r"13 rows, not a multiple of the 2x3 grid"):
        build_stage_graph(patch_x=torch.randn(13, 4), grid=(2, 3), image_size=(8, 9))


def pooled_stage(groups=2, k=3, num_images=2, grid=(4, 6), pool=2, channels=8, num_labels=3):
    """A full stage: pooled sources, patch-level and cross-level group kNN edges."""
    gen = torch.Generator().manual_seed(0)
    h, w = grid
    patch_x = torch.randn(num_images * h * w, channels, generator=gen)
    knn_x = torch.randn(num_images * h * w, channels, generator=gen)
    maps = knn_x.view(num_images, h, w, channels).permute(0, 3, 1, 2)
    source_x = F.avg_pool2d(maps, pool).permute(0, 2, 3, 1).reshape(-1, channels)
    n_src = (h // pool) * (w // pool)
    patch_batch = torch.arange(num_images).repeat_interleave(h * w)
    src_batch = torch.arange(num_images).repeat_interleave(n_src)
    label_x = torch.randn(num_images * num_labels, channels, generator=gen)
    label_batch = torch.arange(num_images).repeat_interleave(num_labels)
    patch_edges = group_knn(source_x, knn_x, k, groups, batch_src=src_batch, batch_dst=patch_batch)
    label_edges = group_knn(patch_x, label_x, k, groups, batch_src=patch_batch, batch_dst=label_batch)
    names = [f"class{i}" for i in range(num_labels)]
    data = build_stage_graph(
        patch_x=patch_x,
        grid=grid,
        image_size=(16, 18),
        patch_knn_x=knn_x,
        source_x=source_x,
        pool=pool,
        patch_edges=patch_edges,
        label_x=label_x,
        label_edges=label_edges,
        label_names=names,
    )
    return data, patch_edges, label_edges, source_x, label_x


def test_pooled_stage_hand_case():
    data, patch_edges, label_edges, source_x, label_x = pooled_stage()
    assert set(data.node_types) == {"patch", "pooled_patch", "label"}
    assert set(data.edge_types) == (
        {("pooled_patch", f"group_{g}", "patch") for g in range(2)}
        | {("patch", f"group_{g}", "label") for g in range(2)}
    )
    assert data["patch"].num_nodes == 48
    assert data["pooled_patch"].num_nodes == 12 and data["label"].num_nodes == 6
    assert torch.equal(data["pooled_patch"].x, source_x)
    assert tuple(data["pooled_patch"].grid) == (2, 3)
    # Pooled cells of the 16 x 18 image are 8 x 6 pixels.
    pos = torch.tensor([[0, 0], [0, 1], [0, 2], [1, 0], [1, 1], [1, 2]])
    box = torch.tensor(
        [[0, 0, 6, 8], [6, 0, 12, 8], [12, 0, 18, 8], [0, 8, 6, 16], [6, 8, 12, 16], [12, 8, 18, 16]],
        dtype=torch.float32,
    )
    assert torch.equal(data["pooled_patch"].pos, torch.cat([pos, pos]))
    assert torch.equal(data["pooled_patch"].box, torch.cat([box, box]))
    assert torch.equal(data["pooled_patch"].batch, torch.tensor([0] * 6 + [1] * 6))
    # Patch cells are 4 x 3 pixels, 24 per image: node 29 is row 0, col 5 of image 1.
    assert data["patch"].pos[29].tolist() == [0, 5]
    assert data["patch"].box[29].tolist() == [15.0, 0.0, 18.0, 4.0]
    assert data["patch"].box[23].tolist() == [15.0, 12.0, 18.0, 16.0]
    assert torch.equal(data["label"].x, label_x)
    assert torch.equal(data["label"].batch, torch.tensor([0, 0, 0, 1, 1, 1]))
    assert data["label"].name == ["class0", "class1", "class2"]
    for g in range(2):
        assert torch.equal(data["pooled_patch", f"group_{g}", "patch"].edge_index, patch_edges[g])
        assert torch.equal(data["patch", f"group_{g}", "label"].edge_index, label_edges[g])
    data.validate(raise_on_error=True)
    # The stored batch vectors agree with the edges: no edge leaves its image.
    src, dst = data["pooled_patch", "group_1", "patch"].edge_index
    assert torch.equal(data["pooled_patch"].batch[src], data["patch"].batch[dst])
    src, dst = data["patch", "group_0", "label"].edge_index
    assert torch.equal(data["patch"].batch[src], data["label"].batch[dst])


def test_unpooled_stage_uses_patch_sources():
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2 * 9, 4, generator=gen)
    batch = torch.arange(2).repeat_interleave(9)
    edges = group_knn(x, x, 2, 2, batch_src=batch, batch_dst=batch)
    data = build_stage_graph(patch_x=x, grid=(3, 3), image_size=(12, 12), patch_edges=edges)
    assert set(data.node_types) == {"patch"}
    assert set(data.edge_types) == {("patch", "group_0", "patch"), ("patch", "group_1", "patch")}
    assert torch.equal(stack_group_edges(data, "patch", "patch"), edges)


def test_stack_group_edges_round_trip():
    data, patch_edges, label_edges, _, _ = pooled_stage(groups=4)
    assert torch.equal(stack_group_edges(data, "pooled_patch", "patch"), patch_edges)
    assert torch.equal(stack_group_edges(data, "patch", "label"), label_edges)
    with pytest.raises(KeyError, match="label"):
        stack_group_edges(data, "label", "patch")


def test_stack_group_edges_orders_groups_numerically():
    """group_10 comes after group_9, whatever order the edge types were added in."""
    edges = torch.stack([torch.tensor([[g, g + 1], [0, 1]]) for g in range(12)])
    data = HeteroData()
    data["a"].num_nodes, data["b"].num_nodes = 20, 2
    order = list(range(12))
    random.Random(0).shuffle(order)
    for g in order:
        data["a", f"group_{g}", "b"].edge_index = edges[g]
    data["a", "other", "b"].edge_index = torch.zeros(2, 2, dtype=torch.long)
    assert torch.equal(stack_group_edges(data, "a", "b"), edges)


def test_neighbour_table():
    edges = torch.tensor([[[4, 2, 0, 1, 3, 3], [0, 0, 1, 1, 2, 2]], [[1, 0, 2, 4, 0, 1], [0, 0, 1, 1, 2, 2]]])
    expected = torch.tensor([[[4, 2], [0, 1], [3, 3]], [[1, 0], [2, 4], [0, 1]]])
    assert torch.equal(neighbour_table(edges, 3), expected)
    data, patch_edges, _, _, _ = pooled_stage(k=4)
    table = neighbour_table(stack_group_edges(data, "pooled_patch", "patch"), 48)
    assert table.shape == (2, 48, 4)
    assert torch.equal(table, patch_edges[:, 0].view(2, 48, 4))
