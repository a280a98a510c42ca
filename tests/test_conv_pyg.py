"""GroupMaxRelConv and DynamicGroupMaxRelConv against PyG's own conventions for a
convolution (the checks PyG's test suite runs on EdgeConv): str, shapes, x vs
(x, x), bipartite input, sparse adjacency, torch.compile(fullgraph=True), use
under to_hetero and inside HeteroConv; and errors in the caller's numbering."""

from __future__ import annotations

import pytest
import torch
import torch_geometric.typing
from torch_geometric.nn import HeteroConv, to_hetero
from torch_geometric.utils import to_torch_coo_tensor, to_torch_csc_tensor, to_torch_csr_tensor

from gkg_pyg import DynamicGroupMaxRelConv, GroupMaxRelConv, group_knn


def reference_conv(conv, x_src, x_dst, edge_index):
    """GroupMaxRelConv by definition, one (group, destination) at a time."""
    g, c = conv.groups, conv.in_channels
    w = c // g
    edge_index = edge_index.unsqueeze(0).expand(g, -1, -1) if edge_index.dim() == 2 else edge_index
    rel = torch.zeros_like(x_dst)
    for group in range(g):
        cols = slice(group * w, (group + 1) * w)
        src, dst = edge_index[group]
        for i in range(x_dst.shape[0]):
            nbrs = src[dst == i]
            if len(nbrs):
                rel[i, cols] = x_src[nbrs, cols].max(dim=0).values - x_dst[i, cols]
    interleaved = torch.stack([x_dst, rel], dim=-1).reshape(x_dst.shape[0], 2 * c)
    return conv.nn(interleaved)


def random_edges(n_src, n_dst, num_edges, groups=None, seed=0):
    gen = torch.Generator().manual_seed(seed)
    shape = (num_edges,) if groups is None else (groups, num_edges)
    return torch.stack([torch.randint(n_src, shape, generator=gen), torch.randint(n_dst, shape, generator=gen)], dim=-2)


@pytest.fixture
def conv():
    torch.manual_seed(0)
    return GroupMaxRelConv(16, 32, groups=2, conv_groups=4).double().eval()


def test_str_shapes_and_pair_input(conv):
    assert str(conv) == "GroupMaxRelConv(16, 32, groups=2, conv_groups=4)"
    assert (
        str(DynamicGroupMaxRelConv(16, 32, k=4, groups=2))
        == "DynamicGroupMaxRelConv(16, 32, k=4, groups=2, dilation=1)"
    )
    x = torch.randn(10, 16, dtype=torch.float64)
    edge_index = random_edges(10, 10, 25)
    out = conv(x, edge_index)
    assert out.shape == (10, 32)
    assert torch.allclose(conv((x, x), edge_index), out, rtol=0, atol=1e-12)
    assert torch.allclose(out, reference_conv(conv, x, x, edge_index), rtol=0, atol=1e-12)
    # A (2, E) edge_index is shared by all groups: the same as stacking it per group.
    assert torch.allclose(conv(x, edge_index.expand(2, -1, -1)), out, rtol=0, atol=1e-12)
    # Per-group edge sets; node 9 has no neighbours in group 1.
    per_group = random_edges(10, 10, 30, groups=2, seed=1)
    per_group[1, 1][per_group[1, 1] == 9] = 8
    assert torch.allclose(conv(x, per_group), reference_conv(conv, x, x, per_group), rtol=0, atol=1e-12)


def test_bipartite(conv):
    x1, x2 = torch.randn(12, 16, dtype=torch.float64), torch.randn(5, 16, dtype=torch.float64)
    edge_index = random_edges(12, 5, 20, groups=2, seed=2)
    out = conv((x1, x2), edge_index)
    assert out.shape == (5, 32)
    assert torch.allclose(out, reference_conv(conv, x1, x2, edge_index), rtol=0, atol=1e-12)


@pytest.mark.parametrize("layout", ["csc_t", "csr", "coo"])
@pytest.mark.parametrize("bipartite", [False, True])
def test_sparse_adjacency(conv, layout, bipartite):
    """One edge set as a transposed adjacency adj_t (N_dst x N_src), as PyG convs accept it."""
    n_src, n_dst = (12, 5) if bipartite else (12, 12)
    x1, x2 = torch.randn(n_src, 16, dtype=torch.float64), torch.randn(n_dst, 16, dtype=torch.float64)
    x = (x1, x2) if bipartite else x1
    edge_index = torch.unique(random_edges(n_src, n_dst, 30, seed=3), dim=1)  # an adjacency has no multi-edges
    out = conv(x, edge_index)
    if layout == "csc_t":  # PyG's own test: to_torch_csc_tensor(edge_index).t()
        adj_t = to_torch_csc_tensor(edge_index, size=(n_src, n_dst)).t()
    elif layout == "csr":
        adj_t = to_torch_csr_tensor(edge_index.flip(0), size=(n_dst, n_src))
    else:
        adj_t = to_torch_coo_tensor(edge_index.flip(0), size=(n_dst, n_src))
    assert torch.allclose(conv(x, adj_t), out, rtol=0, atol=1e-12)


def test_uncoalesced_coo_adjacency_is_read_and_left_as_given(conv):
    """Repeated and unsorted COO entries are the edges they list, and the caller's tensor
    stays uncoalesced (PyG's to_edge_index marks it coalesced without sorting it, which
    corrupts what the caller computes from it later)."""
    x = torch.randn(4, 16, dtype=torch.float64)
    entries = torch.tensor([[3, 1, 0, 3], [2, 0, 1, 2]])  # (destination, source), entry (3, 2) twice
    adj_t = torch.sparse_coo_tensor(entries, torch.ones(4, dtype=torch.float64), (4, 4))
    dense_before = adj_t.to_dense()
    out = conv(x, adj_t)
    assert not adj_t.is_coalesced() and torch.equal(adj_t.to_sparse_csr().to_dense(), dense_before)
    assert torch.allclose(out, conv(x, torch.tensor([[2, 0, 1], [3, 1, 0]])), rtol=0, atol=1e-12)


@pytest.mark.skipif(not torch_geometric.typing.WITH_TORCH_SPARSE, reason="torch-sparse is not installed")
def test_sparse_tensor_adjacency(conv):  # pragma: no cover - needs torch-sparse
    from torch_geometric.typing import SparseTensor

    x = torch.randn(12, 16, dtype=torch.float64)
    edge_index = torch.unique(random_edges(12, 12, 30, seed=4), dim=1)
    adj = SparseTensor.from_edge_index(edge_index, sparse_sizes=(12, 12))
    assert torch.allclose(conv(x, adj.t()), conv(x, edge_index), rtol=0, atol=1e-12)


def test_errors_in_the_callers_numbering(conv):
    x = torch.randn(50, 16, dtype=torch.float64)
    edge_index = random_edges(50, 50, 10)
    bad = edge_index.clone()
    bad[0, 3] = 50
    with pytest.raises(ValueError, match=r"^edge_index source index 50 out of range for 50 source nodes"):
        conv(x, bad)
    bad = edge_index.clone()
    bad[1, 7] = -1
    with pytest.raises(ValueError, match=r"^edge_index destination index -1 out of range for 50 destination nodes"):
        conv(x, bad)
    grouped = edge_index.expand(2, -1, -1).clone()
    grouped[1, 0, 4] = 73
    with pytest.raises(ValueError, match=r"^edge_index\[g=1\] source index 73 out of range for 50 source nodes"):
        conv(x, grouped)
    with pytest.raises(ValueError, match=r"destination index 5 out of range for 5 destination nodes"):
        conv((x, x[:5]), random_edges(50, 6, 40, seed=5).clamp(max=5))
    with pytest.raises(ValueError, match=r"edge_index must be \(2, 2, E\) or \(2, E\), got \(3, 10\)$"):
        conv(x, torch.randint(50, (3, 10)))
    with pytest.raises(ValueError, match=r"got \(3, 2, 10\)$"):
        conv(x, torch.randint(50, (3, 2, 10)))
    with pytest.raises(ValueError, match=r"integer indices, got torch.float32"):
        conv(x, edge_index.float())
    adj_t = to_torch_csr_tensor(edge_index.flip(0), size=(50, 60))
    with pytest.raises(ValueError, match=r"adjacency of size \(50, 60\) .* 50 destination and 50 source nodes"):
        conv(x, adj_t)
    with pytest.raises(ValueError, match=r"expects 16 channels, got 8 \(source\)"):
        conv((x[:, :8], x), edge_index)


def _no_graph_breaks(module, *args, **kwargs):
    explanation = torch._dynamo.explain(module)(*args, **kwargs)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1


@pytest.mark.parametrize(
    "edges", ["grouped", "neighbors"] + [pytest.param(e, marks=pytest.mark.slow) for e in ("shared", "bipartite")]
)
def test_torch_compile_fullgraph(edges):
    """Static edges: one graph without breaks (torch._dynamo.explain), and the
    compiled module (fullgraph=True) gives the eager outputs and gradients."""
    torch.manual_seed(1)
    conv = GroupMaxRelConv(16, 32, groups=2, conv_groups=4)
    x = torch.randn(30, 16)
    x_dst = torch.randn(8, 16) if edges == "bipartite" else x
    table = group_knn(x, x_dst, 4, 2)
    kwargs = {}
    if edges == "grouped" or edges == "bipartite":
        args = ((x, x_dst) if edges == "bipartite" else x, table)
    elif edges == "shared":
        args = (x, table[0])
    else:
        args, kwargs = (x,), dict(neighbors=table[:, 0].view(2, 30, 4))
    torch._dynamo.reset()
    _no_graph_breaks(conv, *args, **kwargs)
    compiled = torch.compile(conv, fullgraph=True, backend="aot_eager")
    results = []
    for module in (conv, compiled):  # training mode: BatchNorm updates its statistics in both calls
        out = module(*args, **kwargs)
        results.append((out, torch.autograd.grad(out.square().sum(), list(conv.parameters()))))
    (eager_out, eager_grads), (compiled_out, compiled_grads) = results
    assert torch.allclose(compiled_out, eager_out, atol=1e-6)
    for a, b in zip(eager_grads, compiled_grads):
        assert torch.allclose(a, b, atol=1e-5)


@pytest.mark.slow  # generates and compiles C++
def test_torch_compile_inductor():
    """The default backend (inductor, C++ on the CPU) on the group edges."""
    torch.manual_seed(2)
    conv = GroupMaxRelConv(16, 32, groups=2, conv_groups=4).eval()
    x = torch.randn(30, 16)
    edge_index = group_knn(x, x, 4, 2)
    torch._dynamo.reset()
    compiled = torch.compile(conv, fullgraph=True)
    assert torch.allclose(compiled(x, edge_index), conv(x, edge_index), atol=1e-5)


class TwoLayers(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = GroupMaxRelConv(16, 32, groups=2, conv_groups=4)
        self.conv2 = GroupMaxRelConv(32, 8, groups=2, conv_groups=2, act=None, norm=None)

    def forward(self, x, edge_index):
        return self.conv2(self.conv1(x, edge_index), edge_index)


def hetero_inputs(seed=0):
    gen = torch.Generator().manual_seed(seed)
    x_dict = {
        "paper": torch.randn(12, 16, generator=gen, dtype=torch.float64),
        "author": torch.randn(7, 16, generator=gen, dtype=torch.float64),
    }
    edge_index_dict = {
        ("paper", "cites", "paper"): random_edges(12, 12, 30, groups=2, seed=seed),
        ("author", "writes", "paper"): random_edges(7, 12, 20, seed=seed + 1),
        ("paper", "rev_writes", "author"): random_edges(12, 7, 20, groups=2, seed=seed + 2),
    }
    return x_dict, edge_index_dict


def test_to_hetero():
    x_dict, edge_index_dict = hetero_inputs()
    metadata = (list(x_dict), list(edge_index_dict))
    model = to_hetero(TwoLayers(), metadata, aggr="sum").double().eval()
    out = model(x_dict, edge_index_dict)
    assert out["paper"].shape == (12, 8) and out["author"].shape == (7, 8)

    def layer(convs, xs):  # what to_hetero must compute: one conv per edge type, summed per destination
        res = {}
        for (src, rel, dst), ei in edge_index_dict.items():
            conv = convs[f"{src}__{rel}__{dst}"]
            y = conv(xs[src], ei) if src == dst else conv((xs[src], xs[dst]), ei)
            res[dst] = res[dst] + y if dst in res else y
        return res

    expected = layer(model.conv2, layer(model.conv1, x_dict))
    for key in out:
        assert torch.allclose(out[key], expected[key], rtol=0, atol=1e-12)


def test_inside_hetero_conv():
    x_dict, edge_index_dict = hetero_inputs(seed=3)
    torch.manual_seed(3)
    convs = {et: GroupMaxRelConv(16, 32, groups=2, conv_groups=4).double().eval() for et in edge_index_dict}
    hetero = HeteroConv(convs, aggr="sum")
    out = hetero(x_dict, edge_index_dict)
    cites, writes, rev = (edge_index_dict[et] for et in convs)
    conv_c, conv_w, conv_r = convs.values()
    expected_paper = conv_c(x_dict["paper"], cites) + conv_w((x_dict["author"], x_dict["paper"]), writes)
    assert torch.allclose(out["paper"], expected_paper, rtol=0, atol=1e-12)
    assert torch.allclose(out["author"], conv_r((x_dict["paper"], x_dict["author"]), rev), rtol=0, atol=1e-12)
    assert torch.allclose(
        out["paper"],
        reference_conv(conv_c, x_dict["paper"], x_dict["paper"], cites)
        + reference_conv(conv_w, x_dict["author"], x_dict["paper"], writes),
        rtol=0,
        atol=1e-12,
    )


def test_dynamic_conv_pairs_and_batches():
    """DynamicEdgeConv's call forms: x, (x, batch), (x1, x2), ((x1, x2), (b1, b2))."""
    torch.manual_seed(4)
    conv = DynamicGroupMaxRelConv(16, 32, k=2, groups=2).double().eval()
    x1, x2 = torch.randn(8, 16, dtype=torch.float64), torch.randn(4, 16, dtype=torch.float64)
    batch1, batch2 = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1]), torch.tensor([0, 0, 1, 1])
    assert torch.allclose(conv(x1), GroupMaxRelConv.forward(conv, x1, group_knn(x1, x1, 2, 2)), atol=1e-12)
    out12 = conv(x1, batch1)
    assert out12.shape == (8, 32)
    assert torch.allclose(
        out12,
        GroupMaxRelConv.forward(conv, x1, group_knn(x1, x1, 2, 2, batch_src=batch1, batch_dst=batch1)),
        atol=1e-12,
    )
    out21 = conv((x1, x2))
    assert out21.shape == (4, 32)
    assert torch.allclose(out21, GroupMaxRelConv.forward(conv, (x1, x2), group_knn(x1, x2, 2, 2)), atol=1e-12)
    out22 = conv((x1, x2), (batch1, batch2))
    edges = group_knn(x1, x2, 2, 2, batch_src=batch1, batch_dst=batch2)
    assert torch.allclose(out22, GroupMaxRelConv.forward(conv, (x1, x2), edges), atol=1e-12)
    assert not torch.allclose(out22, out21)


def test_dynamic_conv_batch_with_an_empty_graph():
    """A PyG Batch whose second and last graphs have no nodes: the conv on the
    batch equals the conv on each graph alone (the empty ones give 0 rows)."""
    from torch_geometric.data import Batch, Data

    torch.manual_seed(5)
    conv = DynamicGroupMaxRelConv(16, 32, k=3, groups=2).double()
    gen = torch.Generator().manual_seed(6)
    sizes = [7, 0, 9, 0]
    graphs = [Data(x=torch.randn(n, 16, generator=gen, dtype=torch.float64)) for n in sizes]
    batch = Batch.from_data_list(graphs)
    assert batch.num_graphs == 4 and batch.x.shape == (16, 16)
    conv.eval()
    out = conv(batch.x, batch.batch)
    parts = [conv(g.x) for g in graphs]
    assert [p.shape for p in parts] == [(n, 32) for n in sizes]
    assert out.shape == (16, 32) and torch.allclose(out, torch.cat(parts), rtol=0, atol=1e-12)
    conv.train()  # batch statistics over the 16 nodes: finite, the empty graphs add nothing
    out = conv(batch.x, batch.batch)
    assert out.shape == (16, 32) and torch.isfinite(out).all() and torch.isfinite(conv.nn[1].running_var).all()
