"""Tests of gkg_pyg.transforms.GroupKNNGraph against brute force, in Data and
HeteroData, through PyG's batch collation and a DataLoader pipeline."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch_geometric.data import Batch, Data, Dataset, HeteroData
from torch_geometric.loader import DataLoader

from gkg_pyg import GroupMaxRelConv, group_knn, stack_group_edges
from gkg_pyg.transforms import GROUP_EDGE_KEY, GroupKNNGraph


def brute_force(x, k, groups, dilation=1, loop=False, batch=None, min_gap=1e-9):
    """(G, N, k) global neighbour indices, one (group, node) at a time, float64."""
    x = x.double()
    n = x.shape[0]
    batch = torch.zeros(n, dtype=torch.long) if batch is None else batch
    width = x.shape[1] // groups
    out = torch.empty(groups, n, k, dtype=torch.long)
    for g in range(groups):
        feats = F.normalize(x[:, g * width : (g + 1) * width], dim=1)
        for i in range(n):
            cand = ((batch == batch[i]) & ((torch.arange(n) != i) | loop)).nonzero().flatten()
            dist = ((feats[i] - feats[cand]) ** 2).sum(1)
            values, order = torch.sort(dist)
            window = values[: k * dilation + 1]
            assert bool((window[1:] - window[:-1]).min() > min_gap), "tie in the random test data"
            out[g, i] = cand[order[: k * dilation : dilation]]
    return out


def table(edges, k):
    groups, _, e = edges.shape
    n = e // k
    assert torch.equal(edges[:, 1], torch.arange(n).repeat_interleave(k).expand(groups, -1))
    return edges[:, 0].view(groups, n, k)


@pytest.mark.parametrize("loop", [False, True])
@pytest.mark.parametrize("dilation", [1, 2])
@pytest.mark.parametrize("groups", [1, 2, 4])
def test_data_matches_brute_force(groups, dilation, loop):
    x = torch.randn(30, 16, generator=torch.Generator().manual_seed(groups * 10 + dilation), dtype=torch.float64)
    data = GroupKNNGraph(4, groups, dilation=dilation, loop=loop)(Data(x=x))
    edges = data[GROUP_EDGE_KEY]
    assert edges.dtype == torch.long and edges.shape == (groups, 2, 30 * 4)
    got = table(edges, 4)
    assert torch.equal(got, brute_force(x, 4, groups, dilation, loop))
    if loop:  # the graph DynamicGroupMaxRelConv builds
        assert torch.equal(edges, group_knn(x, x, 4, groups, dilation=dilation))
    else:
        assert not bool((got == torch.arange(30).view(1, 30, 1)).any()), "self-loop"


def test_pos_attribute():
    pos = torch.randn(25, 3, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    data = GroupKNNGraph(5, 1, attr="pos")(Data(pos=pos))
    assert torch.equal(table(data.group_edge_index, 5), brute_force(pos, 5, 1))


def test_duplicate_nodes_without_loops():
    """A node tied with its own duplicate: the duplicate comes first, the node never."""
    x = torch.randn(12, 4, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    x[7] = x[3]
    got = table(GroupKNNGraph(3, 1)(Data(x=x)).group_edge_index, 3)
    assert got[0, 3, 0] == 7 and got[0, 7, 0] == 3
    assert not bool((got == torch.arange(12).view(1, 12, 1)).any())


class RandomGraphs(Dataset):
    """A tiny in-memory data set of graphs of different sizes, transformed on access."""

    def __init__(self, sizes, transform=None):
        super().__init__(transform=transform)
        gen = torch.Generator().manual_seed(7)
        self.graphs = [Data(x=torch.randn(n, 8, generator=gen, dtype=torch.float64)) for n in sizes]

    def len(self):
        return len(self.graphs)

    def get(self, idx):
        return self.graphs[idx].clone()


@pytest.mark.parametrize("loop", [False, True])
def test_batches_collate_with_increments(loop):
    transform = GroupKNNGraph(3, 2, dilation=2, loop=loop)
    sizes = [10, 14, 9, 12, 11]
    dataset = RandomGraphs(sizes, transform=transform)
    loader = DataLoader(dataset, batch_size=2, shuffle=False)
    seen = 0
    for batch in loader:
        edges = batch.group_edge_index
        assert edges.shape == (2, 2, batch.num_nodes * 3)
        # Each graph's edges, shifted by its node offset, side by side along E.
        parts = [dataset[seen + i].group_edge_index + int(batch.ptr[i]) for i in range(batch.num_graphs)]
        assert torch.equal(edges, torch.cat(parts, dim=-1))
        # ... which is the transform of the whole batch (neighbours stay inside their graphs).
        assert torch.equal(
            edges,
            transform(Batch.from_data_list([dataset.graphs[seen + i] for i in range(batch.num_graphs)]))[
                GROUP_EDGE_KEY
            ],
        )
        assert torch.equal(table(edges, 3), brute_force(batch.x, 3, 2, 2, loop, batch.batch))
        # And the batch splits back into the graphs' own edges.
        for i, graph in enumerate(batch.to_data_list()):
            assert torch.equal(graph.group_edge_index, dataset[seen + i].group_edge_index)
        seen += batch.num_graphs
    assert seen == len(sizes)


def test_conv_on_a_collated_batch_equals_per_graph():
    conv = GroupMaxRelConv(8, 16, groups=2, conv_groups=2).double().eval()
    dataset = RandomGraphs([10, 13, 9], transform=GroupKNNGraph(3, 2))
    batch = next(iter(DataLoader(dataset, batch_size=3)))
    together = conv(batch.x, batch.group_edge_index)
    alone = torch.cat([conv(d.x, d.group_edge_index) for d in dataset])
    assert torch.allclose(together, alone, rtol=0, atol=1e-12)


@pytest.mark.parametrize("loop", [False, True])
def test_hetero_one_node_type(loop):
    x = torch.randn(20, 12, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    hetero = HeteroData()
    hetero["point"].x = x
    hetero = GroupKNNGraph(4, 3, loop=loop)(hetero)
    assert sorted(hetero.edge_types) == [("point", f"group_{g}", "point") for g in range(3)]
    stacked = stack_group_edges(hetero, "point", "point")
    assert torch.equal(stacked, GroupKNNGraph(4, 3, loop=loop)(Data(x=x)).group_edge_index)
    assert torch.equal(table(stacked, 4), brute_force(x, 4, 3, 1, loop))
    # Hetero batches collate with increments too.
    other = HeteroData()
    other["point"].x = torch.randn(15, 12, dtype=torch.float64)
    other = GroupKNNGraph(4, 3, loop=loop)(other)
    batch = Batch.from_data_list([hetero, other])
    expected = torch.cat([stacked, stack_group_edges(other, "point", "point") + 20], dim=-1)
    assert torch.equal(stack_group_edges(batch, "point", "point"), expected)


def test_hetero_bipartite():
    gen = torch.Generator().manual_seed(6)
    hetero = HeteroData()
    hetero["patch"].x = torch.randn(30, 8, generator=gen, dtype=torch.float64)
    hetero["label"].x = torch.randn(5, 8, generator=gen, dtype=torch.float64)
    hetero = GroupKNNGraph(6, 2, node_type=("patch", "label"))(hetero)
    assert torch.equal(
        stack_group_edges(hetero, "patch", "label"), group_knn(hetero["patch"].x, hetero["label"].x, 6, 2)
    )


def test_errors():
    with pytest.raises(ValueError, match=r"needs data.x as a \(num_nodes, channels\) tensor, but it is missing"):
        GroupKNNGraph(3, 2)(Data(pos=torch.randn(10, 3)))
    with pytest.raises(ValueError, match=r"data.x .* of shape \(10,\)"):
        GroupKNNGraph(3, 2)(Data(x=torch.randn(10)))
    with pytest.raises(ValueError, match=r"6 channels cannot be split into 4"):
        GroupKNNGraph(3, 4)(Data(x=torch.randn(10, 6)))
    with pytest.raises(ValueError, match=r"more than k \* dilation = 6 nodes per graph, but graph 1 has 6"):
        GroupKNNGraph(3, 2, dilation=2)(Batch.from_data_list([Data(x=torch.randn(n, 4)) for n in (9, 6)]))
    with pytest.raises(ValueError, match=r"attr must be 'x' or 'pos'"):
        GroupKNNGraph(3, 2, attr="feat")
    hetero = HeteroData()
    hetero["a"].x, hetero["b"].x = torch.randn(10, 4), torch.randn(10, 4)
    with pytest.raises(ValueError, match=r"needs node_type="):
        GroupKNNGraph(3, 2)(hetero)
    with pytest.raises(KeyError, match=r"node type 'c' is not in the HeteroData"):
        GroupKNNGraph(3, 2, node_type="c")(hetero)
    assert repr(GroupKNNGraph(9, 2, dilation=3)) == "GroupKNNGraph(k=9, groups=2, dilation=3, loop=False)"


GUIDE = Path(__file__).resolve().parent.parent / "docs" / "conv.md"


def guide_namespace() -> dict:
    """The names left by docs/conv.md's python examples, run in order (tests/test_docs.py runs every page)."""
    namespace = {"__name__": "docs_example"}
    for code in re.findall(r"^```python\n(.*?)^```", GUIDE.read_text(encoding="utf-8"), flags=re.S | re.M):
        exec(compile(code, str(GUIDE), "exec"), namespace)
    return namespace


def test_guide_examples_build_what_they_say():
    namespace = guide_namespace()
    batch, out, hetero, table_ = namespace["batch"], namespace["out"], namespace["hetero"], namespace["table"]
    assert batch.group_edge_index.shape == (2, 2, 1000) and out.shape == (125, 64)
    assert torch.equal(batch.group_edge_index[:, 1], torch.arange(125).repeat_interleave(8).expand(2, -1))
    assert stack_group_edges(hetero, "point", "point").shape == (2, 2, 320)
    assert table_.shape == (2, 4, 196, 9) and int(table_.min()) >= 0 and int(table_.max()) < 49
