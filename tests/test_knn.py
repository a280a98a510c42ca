"""Tests of gkg_pyg.group_knn against a brute-force loop over groups and
destinations, for both backends: neighbour sets, rank order, the edge format,
error messages, the torch-cluster fallback and the chunked dense path."""

from __future__ import annotations

import warnings

import pytest
import torch

import gkg_pyg.knn as knn_module
from gkg_pyg import batched_group_knn, group_knn

CHANNELS = 12  # splits into 1, 2 and 4 groups


@pytest.fixture(params=["dense", "torch_cluster"])
def backend(request):
    if request.param == "torch_cluster":
        pytest.importorskip("torch_cluster")
    return request.param


def graph_ids(sizes):
    """Sorted PyG batch vector of graphs with ``sizes`` nodes."""
    return torch.arange(len(sizes)).repeat_interleave(torch.tensor(sizes, dtype=torch.long))


def brute_force_knn(x_src, x_dst, k, groups, dilation=1, batch_src=None, batch_dst=None, bias=None, min_gap=1e-9):
    """Brute force, one (group, destination) at a time, in float64.

    Returns ``(groups, N_dst, k)`` global source indices in rank order and a
    ``(groups, N_dst)`` mask of the rows whose ``k * dilation + 1`` nearest
    distances are separated by more than ``min_gap`` (rows with a unique answer).
    """
    x_src, x_dst = x_src.double(), x_dst.double()
    n_src, n_dst = x_src.shape[0], x_dst.shape[0]
    batch_src = torch.zeros(n_src, dtype=torch.long) if batch_src is None else batch_src
    batch_dst = torch.zeros(n_dst, dtype=torch.long) if batch_dst is None else batch_dst
    if isinstance(bias, tuple):
        bias = bias[0].double() @ bias[1].double().t()
    width = x_src.shape[1] // groups
    needed = k * dilation
    out = torch.empty(groups, n_dst, k, dtype=torch.long)
    separated = torch.ones(groups, n_dst, dtype=torch.bool)
    for g in range(groups):
        cols = slice(g * width, (g + 1) * width)
        for i in range(n_dst):
            cand = (batch_src == batch_dst[i]).nonzero().flatten()
            local_i = int((batch_dst[:i] == batch_dst[i]).sum())  # row of the shared bias
            a = x_dst[i, cols] / x_dst[i, cols].norm()
            b = x_src[cand, cols] / x_src[cand, cols].norm(dim=1, keepdim=True)
            dist = ((a - b) ** 2).sum(dim=1)
            if bias is not None:
                dist = dist - bias[local_i, cand - cand[0]].double()
            values, order = torch.sort(dist)
            window = values[: needed + 1]
            separated[g, i] = bool((window[1:] - window[:-1]).min() > min_gap)
            out[g, i] = cand[order[:needed:dilation]]
    return out, separated


def reference_group_knn(x_src, x_dst, k, groups, dilation=1, batch_src=None, batch_dst=None, bias=None):
    """:func:`brute_force_knn` on data without (near) ties: the unique answer."""
    out, separated = brute_force_knn(x_src, x_dst, k, groups, dilation, batch_src, batch_dst, bias)
    assert bool(separated.all()), "tie in the random test data"
    return out


def make_problem(seed, src_sizes, dst_sizes, bias_kind, rank=5):
    """Random float64 features; ``dst_sizes=None`` means a self graph (x_src is x_dst)."""
    gen = torch.Generator().manual_seed(seed)
    x_src = torch.randn(sum(src_sizes), CHANNELS, generator=gen, dtype=torch.float64)
    if dst_sizes is None:
        x_dst, dst_sizes = x_src, src_sizes
    else:
        x_dst = torch.randn(sum(dst_sizes), CHANNELS, generator=gen, dtype=torch.float64)
    multi = len(src_sizes) > 1
    batch_src = graph_ids(src_sizes) if multi else None
    batch_dst = graph_ids(dst_sizes) if multi else None
    n_dst, n_src = dst_sizes[0], src_sizes[0]
    if bias_kind == "dense":
        bias = 0.5 * torch.randn(n_dst, n_src, generator=gen, dtype=torch.float64)
    elif bias_kind == "factored":
        bias = (
            0.5 * torch.randn(n_dst, rank, generator=gen, dtype=torch.float64),
            0.5 * torch.randn(n_src, rank, generator=gen, dtype=torch.float64),
        )
    else:
        bias = None
    return x_src, x_dst, batch_src, batch_dst, bias


# (source graph sizes, destination graph sizes or None for a self graph, position bias)
LAYOUTS = [
    ([7], None, None),
    ([40], None, None),
    ([33], [14], None),
    ([5, 11, 8], None, None),
    ([9, 14, 6], [3, 7, 5], None),
    ([8, 6, 13], [4, 0, 5], None),  # graph 1 has no destinations
    ([20], None, "dense"),
    ([24], [10], "factored"),
    ([10, 10, 10], [6, 6, 6], "dense"),
    ([12, 12], None, "factored"),
]


@pytest.mark.parametrize("dilation", [1, 2, 3])
@pytest.mark.parametrize("groups", [1, 2, 4])
@pytest.mark.parametrize("layout", range(len(LAYOUTS)))
def test_matches_brute_force(backend, layout, groups, dilation):
    src_sizes, dst_sizes, bias_kind = LAYOUTS[layout]
    k = min(4, min(src_sizes) // dilation)
    x_src, x_dst, batch_src, batch_dst, bias = make_problem(
        100 * layout + 10 * groups + dilation, src_sizes, dst_sizes, bias_kind
    )
    edges = group_knn(
        x_src,
        x_dst,
        k,
        groups,
        dilation=dilation,
        batch_src=batch_src,
        batch_dst=batch_dst,
        position_bias=bias,
        backend=backend,
    )
    expected = reference_group_knn(x_src, x_dst, k, groups, dilation, batch_src, batch_dst, bias)
    got = edges[:, 0].view(groups, x_dst.shape[0], k)
    assert torch.equal(got.sort(dim=-1).values, expected.sort(dim=-1).values), "neighbour sets differ"
    assert torch.equal(got, expected), "rank order differs"


@pytest.mark.parametrize("bias_kind", ["dense", "factored"])
def test_position_bias_changes_the_graph(backend, bias_kind):
    """Guards the bias cases above: the bias must matter, and be subtracted (not added)."""
    x_src, x_dst, _, _, bias = make_problem(7, [30], [12], bias_kind)
    with_bias = group_knn(x_src, x_dst, 4, 2, position_bias=bias, backend=backend)
    without = group_knn(x_src, x_dst, 4, 2, backend=backend)
    assert not torch.equal(with_bias, without)
    dense = bias if bias_kind == "dense" else bias[0] @ bias[1].t()
    added = reference_group_knn(x_src, x_dst, 4, 2, bias=-dense)
    assert not torch.equal(with_bias[:, 0].view(2, 12, 4), added)


def test_self_graph_node_is_its_own_nearest(backend):
    x, _, batch, _, _ = make_problem(3, [9, 15], None, None)
    edges = group_knn(x, x, 3, 2, batch_src=batch, batch_dst=batch, backend=backend)
    assert torch.equal(edges[:, 0].view(2, 24, 3)[:, :, 0], torch.arange(24).expand(2, -1))


@pytest.mark.parametrize("dilation", [1, 2])
def test_output_format(backend, dilation):
    src_sizes, dst_sizes, groups, k = [11, 7, 16], [5, 9, 4], 4, 3
    x_src, x_dst, batch_src, batch_dst, _ = make_problem(11, src_sizes, dst_sizes, None)
    n_dst = x_dst.shape[0]
    edges = group_knn(
        x_src, x_dst, k, groups, dilation=dilation, batch_src=batch_src, batch_dst=batch_dst, backend=backend
    )
    assert edges.dtype == torch.long
    assert edges.shape == (groups, 2, n_dst * k)
    for g in range(groups):
        src, dst = edges[g]
        assert torch.equal(dst, torch.arange(n_dst).repeat_interleave(k))
        assert torch.equal(torch.bincount(dst, minlength=n_dst), torch.full((n_dst,), k))
        assert int(src.min()) >= 0 and int(src.max()) < x_src.shape[0]
        assert torch.equal(batch_src[src], batch_dst[dst]), "an edge crosses graphs"
        # No source twice for one destination.
        table = src.view(n_dst, k)
        assert all(len(set(row.tolist())) == k for row in table)
        # Nearest first: the distances along each row never decrease.
        cols = slice(g * CHANNELS // groups, (g + 1) * CHANNELS // groups)
        a = torch.nn.functional.normalize(x_dst[:, cols], dim=-1)
        b = torch.nn.functional.normalize(x_src[:, cols], dim=-1)
        dist = ((a.unsqueeze(1) - b[table]) ** 2).sum(-1)
        assert bool((dist[:, 1:] >= dist[:, :-1]).all())


def test_no_gradient(backend):
    x_src, x_dst, _, _, bias = make_problem(5, [20], [8], "dense")
    x_src.requires_grad_(True)
    x_dst.requires_grad_(True)
    bias.requires_grad_(True)
    edges = group_knn(x_src, x_dst, 3, 2, position_bias=bias, backend=backend)
    assert edges.grad_fn is None and not edges.requires_grad
    expected = reference_group_knn(x_src.detach(), x_dst.detach(), 3, 2, bias=bias.detach())
    assert torch.equal(edges[:, 0].view(2, 8, 3), expected)
    # The inputs are left usable for autograd.
    (x_src.sum() + x_dst.sum() + bias.sum()).backward()
    assert x_src.grad is not None


@pytest.mark.parametrize("bias_kind", [None, "dense", "factored"])
def test_float32_matches_brute_force(backend, bias_kind):
    """float32, as in the model: agree wherever the float64 answer is separated
    by more than float32 rounding could blur."""
    x_src, x_dst, batch_src, batch_dst, bias = make_problem(21, [49, 49], [196, 196], bias_kind)
    x_src, x_dst = x_src.float(), x_dst.float()
    if bias_kind == "dense":
        bias = bias.float()
    elif bias_kind == "factored":
        bias = (bias[0].float(), bias[1].float())
    edges = group_knn(
        x_src, x_dst, 9, 2, dilation=2, batch_src=batch_src, batch_dst=batch_dst, position_bias=bias, backend=backend
    )
    expected, separated = brute_force_knn(x_src, x_dst, 9, 2, 2, batch_src, batch_dst, bias, min_gap=1e-4)
    assert separated.float().mean() > 0.9
    got = edges[:, 0].view(2, 392, 9)
    assert torch.equal(got[separated], expected[separated])


def test_error_messages():
    x = torch.randn(10, 8)
    batch = graph_ids([5, 5])
    with pytest.raises(ValueError, match=r"3 \* 2 = 6 .*graph 1 has only 2 source"):
        group_knn(x[:9], x[:9], 3, 2, dilation=2, batch_src=graph_ids([7, 2]), batch_dst=graph_ids([7, 2]))
    with pytest.raises(ValueError, match=r"3 \* 4 = 12 .*graph 0 has only 10 source"):
        group_knn(x, x, 3, 2, dilation=4)
    with pytest.raises(ValueError, match=r"\b8 channels cannot be split into 3\b"):
        group_knn(x, x, 2, 3)
    with pytest.raises(ValueError, match=r"batch_src must be a vector of length 10.*\(9,\)"):
        group_knn(x, x, 2, 2, batch_src=batch[:9], batch_dst=batch)
    with pytest.raises(ValueError, match=r"batch_dst must be a vector of length 10.*\(11,\)"):
        group_knn(x, x, 2, 2, batch_src=batch, batch_dst=torch.zeros(11, dtype=torch.long))
    with pytest.raises(ValueError, match=r"batch_dst must be sorted"):
        group_knn(x, x, 2, 2, batch_src=batch, batch_dst=batch.flip(0))
    with pytest.raises(ValueError, match=r"batch_src holds a negative graph id \(-1\)"):
        group_knn(x, x, 2, 2, batch_src=batch - 1, batch_dst=batch)
    bad = x.clone()
    bad[3, 1] = float("nan")
    with pytest.raises(ValueError, match="non-finite"):
        group_knn(x, bad, 2, 2)
    bad[3, 1] = float("inf")
    with pytest.raises(ValueError, match="non-finite"):
        group_knn(bad, x, 2, 2)
    with pytest.raises(ValueError, match=r"position_bias is \(5, 6\).*\[5, 5\] destinations and \[5, 5\] sources"):
        group_knn(x, x, 2, 2, batch_src=batch, batch_dst=batch, position_bias=torch.zeros(5, 6))
    with pytest.raises(ValueError, match=r"U: \(n_dst, r\) and V: \(n_src, r\), got \(10, 3\) and \(10, 2\)"):
        group_knn(x, x, 2, 2, position_bias=(torch.zeros(10, 3), torch.zeros(10, 2)))
    with pytest.raises(ValueError, match=r"position_bias is \(10, 9\)"):
        group_knn(x, x, 2, 2, position_bias=(torch.zeros(10, 3), torch.zeros(9, 3)))
    for bad_bias in ((torch.zeros(10, 3),), [torch.zeros(10, 3)] * 3, ([[0.0]], [[0.0]]), "table"):
        with pytest.raises(ValueError, match="an \\(n_dst, n_src\\) tensor or a pair \\(U, V\\)"):
            group_knn(x, x, 2, 2, position_bias=bad_bias)
    with pytest.raises(ValueError, match=r"x_src has 8 channels but x_dst has 6"):
        group_knn(x, x[:, :6], 2, 2)
    with pytest.raises(ValueError, match=r"k=0, dilation=1"):
        group_knn(x, x, 0, 2)
    with pytest.raises(ValueError, match=r"unknown kNN backend 'faiss'"):
        group_knn(x, x, 2, 2, backend="faiss")


def test_auto_without_torch_cluster(monkeypatch):
    """ "auto" runs the dense backend on the CPU (no warning: nothing is missed
    there) and warns once where it would have used torch-cluster (CUDA)."""
    monkeypatch.setattr(knn_module, "torch_cluster", None)
    monkeypatch.setattr(knn_module, "_warned_no_cluster", False)
    x_src, x_dst, batch_src, batch_dst, _ = make_problem(13, [9, 12], [4, 6], None)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        first = group_knn(x_src, x_dst, 3, 2, batch_src=batch_src, batch_dst=batch_dst, backend="auto")
        assert knn_module.resolve_backend("auto", torch.device("cpu")) == "dense"
        assert not [w for w in caught if "torch-cluster" in str(w.message)]
        # resolve_backend looks at the device type only, so CUDA's choice is testable without a GPU.
        assert knn_module.resolve_backend("auto", torch.device("cuda")) == "dense"
        assert knn_module.resolve_backend("auto", torch.device("cuda")) == "dense"
    messages = [str(w.message) for w in caught if "torch-cluster" in str(w.message)]
    assert len(messages) == 1, messages
    assert "pip install" in messages[0]
    expected = reference_group_knn(x_src, x_dst, 3, 2, 1, batch_src, batch_dst)
    assert torch.equal(first[:, 0].view(2, 10, 3), expected)


def test_explicit_torch_cluster_without_the_package_raises(monkeypatch):
    monkeypatch.setattr(knn_module, "torch_cluster", None)
    x = torch.randn(10, 8)
    for call in (
        lambda: group_knn(x, x, 2, 2, backend="torch_cluster"),
        lambda: batched_group_knn(x[None], x[None], 2, 2, backend="torch_cluster"),
        lambda: knn_module.resolve_backend("torch_cluster", torch.device("cuda")),
    ):
        with pytest.raises(
            ImportError,
            match=r"needs the torch-cluster package.*pip install "
            r"--no-build-isolation torch-cluster",
        ):
            call()


def test_cuda_neighbour_limit_of_torch_cluster(monkeypatch):
    """torch-cluster's CUDA kernel keeps at most 100 neighbours: "auto" uses
    the dense backend beyond that, an explicit request gets an error."""
    monkeypatch.setattr(knn_module, "torch_cluster", object())  # "installed"
    cuda = torch.device("cuda")
    assert knn_module.resolve_backend("auto", cuda, needed=100) == "torch_cluster"
    assert knn_module.resolve_backend("auto", cuda, needed=101) == "dense"
    assert knn_module.resolve_backend("torch_cluster", torch.device("cpu"), needed=101) == "torch_cluster"
    with pytest.raises(ValueError, match=r"at most 100 neighbours, but k \* dilation = 101"):
        knn_module.resolve_backend("torch_cluster", cuda, needed=101)


@pytest.mark.parametrize("block", [1, 7, 100, 700])
@pytest.mark.parametrize(
    "layout", [([10, 10, 10], [6, 6, 6], "dense"), ([9, 14, 6], [3, 7, 5], None), ([25], None, "factored")]
)
def test_chunked_dense_is_identical(monkeypatch, block, layout):
    src_sizes, dst_sizes, bias_kind = layout
    x_src, x_dst, batch_src, batch_dst, bias = make_problem(17, src_sizes, dst_sizes, bias_kind)
    kwargs = dict(dilation=2, batch_src=batch_src, batch_dst=batch_dst, position_bias=bias, backend="dense")
    whole = group_knn(x_src, x_dst, 3, 2, **kwargs)
    monkeypatch.setattr(knn_module, "DENSE_BLOCK_ELEMENTS", block)
    chunked = group_knn(x_src, x_dst, 3, 2, **kwargs)
    assert torch.equal(chunked, whole)
    expected = reference_group_knn(x_src, x_dst, 3, 2, 2, batch_src, batch_dst, bias)
    assert torch.equal(chunked[:, 0].view(2, x_dst.shape[0], 3), expected)


# ---------------------------------------------------------------------------
# batched_group_knn: (B, N, C) tensors, per-image neighbour tables
# ---------------------------------------------------------------------------
def local_reference(x_src, x_dst, k, groups, dilation, bias):
    """Brute force of (B, N, C) problems as PyG graphs, converted to per-image indices."""
    num, n_src, c = x_src.shape
    n_dst = x_dst.shape[1]
    ids_src, ids_dst = graph_ids([n_src] * num), graph_ids([n_dst] * num)
    out = reference_group_knn(x_src.reshape(-1, c), x_dst.reshape(-1, c), k, groups, dilation, ids_src, ids_dst, bias)
    return out.view(groups, num, n_dst, k) - (torch.arange(num) * n_src).view(1, num, 1, 1)


def batched_problem(seed, num, n_src, n_dst, bias_kind, rank=5):
    gen = torch.Generator().manual_seed(seed)
    x_src = torch.randn(num, n_src, CHANNELS, generator=gen, dtype=torch.float64)
    x_dst = x_src if n_dst is None else torch.randn(num, n_dst, CHANNELS, generator=gen, dtype=torch.float64)
    n_dst = x_dst.shape[1]
    if bias_kind == "dense":
        bias = 0.5 * torch.randn(n_dst, n_src, generator=gen, dtype=torch.float64)
    elif bias_kind == "factored":
        bias = (
            0.5 * torch.randn(n_dst, rank, generator=gen, dtype=torch.float64),
            0.5 * torch.randn(n_src, rank, generator=gen, dtype=torch.float64),
        )
    else:
        bias = None
    return x_src, x_dst, bias


@pytest.mark.parametrize("bias_kind", [None, "dense", "factored"])
@pytest.mark.parametrize("dilation", [1, 3])
@pytest.mark.parametrize("groups", [1, 2, 4])
@pytest.mark.parametrize("shape", [(1, 30, 12), (3, 16, None), (4, 20, 7)])
def test_batched_matches_brute_force(backend, shape, groups, dilation, bias_kind):
    num, n_src, n_dst = shape
    x_src, x_dst, bias = batched_problem(num * n_src + groups + dilation, num, n_src, n_dst, bias_kind)
    got = batched_group_knn(x_src, x_dst, 4, groups, dilation=dilation, position_bias=bias, backend=backend)
    assert got.dtype == torch.long and got.shape == (groups, num, x_dst.shape[1], 4)
    assert torch.equal(got, local_reference(x_src, x_dst, 4, groups, dilation, bias))
    # The library API on the same graphs (flattened, batch vectors) picks the same neighbours.
    edges = group_knn(
        x_src.reshape(-1, CHANNELS),
        x_dst.reshape(-1, CHANNELS),
        4,
        groups,
        dilation=dilation,
        batch_src=graph_ids([n_src] * num),
        batch_dst=graph_ids([x_dst.shape[1]] * num),
        position_bias=bias,
        backend=backend,
    )
    offset = (torch.arange(num) * n_src).view(1, num, 1, 1)
    assert torch.equal(edges[:, 0], (got + offset).reshape(groups, -1))


def test_batched_dense_and_factored_bias_agree(backend):
    x_src, x_dst, (u, v) = batched_problem(31, 3, 25, 40, "factored", rank=6)
    factored = batched_group_knn(x_src, x_dst, 5, 2, dilation=2, position_bias=(u, v), backend=backend)
    dense = batched_group_knn(x_src, x_dst, 5, 2, dilation=2, position_bias=u @ v.t(), backend=backend)
    assert torch.equal(factored, dense)
    assert not torch.equal(factored, batched_group_knn(x_src, x_dst, 5, 2, dilation=2, backend=backend))
    # The factors as a list are the same pair (the dense backend took a list for a matrix)
    as_list = batched_group_knn(x_src, x_dst, 5, 2, dilation=2, position_bias=[u, v], backend=backend)
    assert torch.equal(as_list, dense)
    flat = dict(x_src=x_src[0], x_dst=x_dst[0], k=5, groups=2, backend=backend)
    assert torch.equal(group_knn(**flat, position_bias=[u, v]), group_knn(**flat, position_bias=(u, v)))


def test_batched_backends_agree_in_float32():
    """Both backends on GKGNet-like float32 input (GKGNet-S stage 4 at 224:
    49 sources with the position term), where the answer is separated."""
    pytest.importorskip("torch_cluster")
    gen = torch.Generator().manual_seed(3)
    x_src = torch.randn(4, 49, 16, generator=gen)
    x_dst = x_src + 0.3 * torch.randn(4, 49, 16, generator=gen)
    u, v = torch.randn(49, 8, generator=gen) / 8, torch.randn(49, 8, generator=gen) / 8
    tables = [
        batched_group_knn(x_src, x_dst, 9, 2, dilation=3, position_bias=(u, v), backend=b)
        for b in ("dense", "torch_cluster")
    ]
    expected, separated = brute_force_knn(
        x_src.reshape(-1, 16),
        x_dst.reshape(-1, 16),
        9,
        2,
        3,
        graph_ids([49] * 4),
        graph_ids([49] * 4),
        (u, v),
        min_gap=1e-4,
    )
    separated = separated.view(2, 4, 49)
    assert separated.float().mean() > 0.9
    expected = expected.view(2, 4, 49, 9) - (torch.arange(4) * 49).view(1, 4, 1, 1)
    for table in tables:
        assert torch.equal(table[separated], expected[separated])


def test_batched_error_messages():
    x = torch.randn(2, 10, 8)
    with pytest.raises(ValueError, match=r"x_src \(B, N_src, C\) and x_dst \(B, N_dst, C\), got \(20, 8\)"):
        batched_group_knn(x.reshape(20, 8), x, 2, 2)
    with pytest.raises(ValueError, match=r"got \(2, 10, 8\) and \(3, 10, 8\)"):
        batched_group_knn(x, torch.randn(3, 10, 8), 2, 2)
    with pytest.raises(ValueError, match=r"3 \* 4 = 12 .*only 10 source"):
        batched_group_knn(x, x, 3, 2, dilation=4)
    with pytest.raises(ValueError, match=r"\b8 channels cannot be split into 3\b"):
        batched_group_knn(x, x, 2, 3)
    with pytest.raises(ValueError, match=r"position_bias is \(10, 9\) but the graphs have 10 destinations and 10"):
        batched_group_knn(x, x, 2, 2, position_bias=torch.zeros(10, 9))
    with pytest.raises(ValueError, match=r"unknown kNN backend 'faiss'"):
        batched_group_knn(x, x, 2, 2, backend="faiss")
    assert batched_group_knn(x, x[:, :0], 2, 2).shape == (2, 2, 0, 2)


def test_batched_dense_never_reads_values():
    """No host synchronisation: on meta tensors (shapes without data) every
    .item(), .tolist(), bool(tensor) or data-dependent shape would fail."""
    x_src, x_dst = torch.empty(3, 49, 32, device="meta"), torch.empty(3, 196, 32, device="meta")
    bias = (torch.empty(196, 32, device="meta"), torch.empty(49, 32, device="meta"))
    out = batched_group_knn(x_src, x_dst, 9, 2, dilation=2, position_bias=bias, backend="dense")
    assert out.shape == (2, 3, 196, 9) and out.device.type == "meta"


@pytest.mark.parametrize("bias_kind", [None, "dense", "factored"])
def test_batched_cluster_code_never_reads_values(monkeypatch, bias_kind):
    """The same for the torch-cluster backend: its code around the search and the
    search itself (the operator gkg_pyg::cluster_knn, whose fake implementation
    gives the table's shape) on meta tensors, in several chunks."""
    pytest.importorskip("torch_cluster")
    monkeypatch.setattr(knn_module, "CLUSTER_CHUNK_BYTES", 200_000)  # several chunks
    x_src, x_dst = torch.empty(3, 49, 32, device="meta"), torch.empty(3, 196, 32, device="meta")
    bias = {
        None: None,
        "dense": torch.empty(196, 49, device="meta"),
        "factored": (torch.empty(196, 32, device="meta"), torch.empty(49, 32, device="meta")),
    }[bias_kind]
    out = batched_group_knn(x_src, x_dst, 9, 2, dilation=2, position_bias=bias, backend="torch_cluster")
    assert out.shape == (2, 3, 196, 9) and out.device.type == "meta"


def test_group_knn_reads_no_values_without_batch_vectors():
    """One graph (no batch vectors) on tensors without data: shapes only. With
    batch vectors the sizes need values: an error naming the batched API."""
    x_src, x_dst = torch.empty(49, 32, device="meta"), torch.empty(196, 32, device="meta")
    assert group_knn(x_src, x_dst, 9, 2, backend="dense").shape == (2, 2, 196 * 9)
    batch = torch.zeros(49, dtype=torch.long, device="meta")
    with pytest.raises(ValueError, match=r"batch vectors reads the graph sizes.*batched_group_knn"):
        group_knn(x_src, x_src, 9, 2, batch_src=batch, batch_dst=batch)


@pytest.mark.parametrize("budget", [1, 5_000, 60_000, 1 << 30])
@pytest.mark.parametrize("bias_kind", [None, "dense", "factored"])
def test_chunked_cluster_is_identical(monkeypatch, budget, bias_kind):
    """Chunks of (group, graph) pairs or of destinations (budget 1: one
    destination at a time) give the same tables as one call and brute force."""
    pytest.importorskip("torch_cluster")
    x_src, x_dst, bias = batched_problem(41, 3, 18, 30, bias_kind)
    whole = batched_group_knn(x_src, x_dst, 3, 2, dilation=2, position_bias=bias, backend="torch_cluster")
    monkeypatch.setattr(knn_module, "CLUSTER_CHUNK_BYTES", budget)
    chunked = batched_group_knn(x_src, x_dst, 3, 2, dilation=2, position_bias=bias, backend="torch_cluster")
    assert torch.equal(chunked, whole)
    assert torch.equal(chunked, local_reference(x_src, x_dst, 3, 2, 2, bias))


def test_cluster_ties_keep_the_lower_source_first():
    """Exact ties (duplicate sources) are ordered by source index by the
    torch-cluster backend's re-ranking, whatever order torch-cluster returns."""
    pytest.importorskip("torch_cluster")
    gen = torch.Generator().manual_seed(5)
    x_src = torch.randn(1, 20, 4, generator=gen, dtype=torch.float64)
    x_src[0, 3] = x_src[0, 17] = x_src[0, 11]  # three equal sources
    x_dst = x_src[:, [11, 0]] + 1e-3 * torch.randn(1, 2, 4, generator=gen, dtype=torch.float64)
    table = batched_group_knn(x_src, x_dst, 4, 1, backend="torch_cluster")
    assert table[0, 0, 0, :3].tolist() == [3, 11, 17]
    assert table[0, 0, 0, 3] not in (3, 11, 17)


def test_model_with_explicit_torch_cluster_without_the_package_raises(monkeypatch):
    """Issue 11: an explicitly requested backend that is missing is an error also through the model."""
    import gkg_pyg

    monkeypatch.setattr(knn_module, "torch_cluster", None)
    model = gkg_pyg.create_model("gkgnet_ti", num_classes=3, img_size=96, knn_backend="torch_cluster").eval()
    with pytest.raises(ImportError, match="torch-cluster"), torch.no_grad():
        model(torch.randn(1, 3, 96, 96))
    model.set_knn_backend("auto")
    with torch.no_grad():
        assert model(torch.randn(1, 3, 96, 96)).shape == (1, 3)


@pytest.mark.parametrize("autocast", [False, True])
def test_half_precision_features_rank_in_float32(backend, autocast):
    """bfloat16 features (or features under CPU bf16 autocast) get the
    neighbours that float32 ranking gives for the same values, where ranking
    in bfloat16 itself (8 mantissa bits) would reorder many of them."""
    gen = torch.Generator().manual_seed(5)
    x_src = torch.randn(2, 196, 16, generator=gen).bfloat16()
    x_dst = torch.randn(2, 300, 16, generator=gen).bfloat16()
    bias = (torch.randn(300, 196, generator=gen) * 0.05).bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        got = batched_group_knn(x_src, x_dst, 9, 2, position_bias=bias, backend=backend)
        got_edges = group_knn(x_src[0], x_dst[0], 9, 2, backend=backend)
    want = batched_group_knn(x_src.float(), x_dst.float(), 9, 2, position_bias=bias.float(), backend=backend)
    assert torch.equal(got, want)
    assert torch.equal(got_edges, group_knn(x_src[0].float(), x_dst[0].float(), 9, 2, backend=backend))
    # The same ranking carried out in bfloat16 differs: the upcast is what the test checks.
    a = torch.nn.functional.normalize(x_dst.view(2, 300, 2, 8), dim=-1).permute(2, 0, 1, 3)
    b = torch.nn.functional.normalize(x_src.view(2, 196, 2, 8), dim=-1).permute(2, 0, 1, 3)
    in_bf16 = (-2 * a @ b.transpose(-1, -2) - bias).topk(9, dim=-1, largest=False).indices
    assert (in_bf16 != want).float().mean() > 0.05


# ---------------------------------------------------------------------------
# The operator gkg_pyg::cluster_knn (torch-cluster with a static shape)
# ---------------------------------------------------------------------------
def cluster_problem(seed, count, n_src, n, width, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    return (
        torch.randn(count, n_src, width, generator=gen, dtype=dtype),
        torch.randn(count, n, width, generator=gen, dtype=dtype),
    )


def brute_force_sets(sources, queries, k):
    """The k nearest sources of every query as sorted index sets (float64 distances)."""
    dist = torch.cdist(queries.double(), sources.double())
    return dist.topk(k, dim=-1, largest=False).indices.sort(dim=-1).values


def test_cluster_knn_operator_matches_brute_force():
    pytest.importorskip("torch_cluster")
    from gkg_pyg.ops.cluster import cluster_knn

    sources, queries = cluster_problem(0, 3, 40, 25, 7)
    got = cluster_knn(sources, queries, 6)
    assert got.dtype == torch.long and got.shape == (3, 25, 6)
    assert torch.equal(got, brute_force_sets(sources, queries, 6))


@pytest.mark.parametrize("threads", [2, 3, 8])
@pytest.mark.parametrize("count", [1, 2, 5])
def test_cluster_knn_threaded_pieces_are_identical(monkeypatch, threads, count):
    """On the CPU the queries are searched in one piece per thread (whole
    examples, or row ranges of one example): the same table as one call."""
    pytest.importorskip("torch_cluster")
    from gkg_pyg.ops import cluster

    sources, queries = cluster_problem(1 + count, count, 30, 17, 5)
    whole = cluster._search(sources, queries, 4)
    monkeypatch.setattr(cluster.torch, "get_num_threads", lambda: threads)
    pieces = cluster._pieces(count, 17, threads)
    assert len(pieces) > 1
    covered = torch.zeros(count, 17, dtype=torch.long)
    for e0, e1, r0, r1 in pieces:
        covered[e0:e1, r0:r1] += 1
    assert bool((covered == 1).all()), "the pieces must cover every query once"
    assert torch.equal(cluster.cluster_knn(sources, queries, 4), whole)
    assert torch.equal(whole, brute_force_sets(sources, queries, 4))


def test_cluster_knn_opcheck():
    """torch.library.opcheck: schema, fake implementation (shape, dtype, device
    match the real one), and tracing by torch.compile's machinery."""
    pytest.importorskip("torch_cluster")
    from gkg_pyg.ops.cluster import cluster_knn  # noqa: F401  (registers the operator)

    for dtype in (torch.float32, torch.float64):
        sources, queries = cluster_problem(2, 2, 20, 9, 6, dtype)
        torch.library.opcheck(torch.ops.gkg_pyg.cluster_knn.default, (sources, queries, 5))


def test_cluster_knn_fake_shape_and_errors():
    pytest.importorskip("torch_cluster")
    from torch._subclasses.fake_tensor import FakeTensorMode

    from gkg_pyg.ops.cluster import cluster_knn

    with FakeTensorMode(), torch.device("cuda"):
        out = cluster_knn(torch.randn(4, 50, 12), torch.randn(4, 70, 12), 27)
        assert out.shape == (4, 70, 27) and out.dtype == torch.long and out.device.type == "cuda"
        with pytest.raises(ValueError, match=r"at most 100 neighbours, got k=101"):
            cluster_knn(torch.randn(1, 200, 3), torch.randn(1, 5, 3), 101)
    sources, queries = cluster_problem(3, 2, 10, 4, 3)
    with pytest.raises(ValueError, match=r"k=11 nearest sources requested, but the examples have 10"):
        cluster_knn(sources, queries, 11)
    with pytest.raises(ValueError, match=r"sources \(E, n_src, D\) and queries \(E, n, D\)"):
        cluster_knn(sources[0], queries, 3)
    with pytest.raises(ValueError, match="sources have 3 coordinates, queries 2"):
        cluster_knn(sources, queries[..., :2], 3)
    with pytest.raises(ValueError, match="one dtype"):
        cluster_knn(sources, queries.float(), 3)
    bad = queries.clone()
    bad[1, 2, 0] = float("nan")
    with pytest.raises(RuntimeError, match=r"returned \d+ neighbours instead of \d+ \(non-finite"):
        cluster_knn(sources, bad, 3)


def test_cluster_knn_empty():
    pytest.importorskip("torch_cluster")
    from gkg_pyg.ops.cluster import cluster_knn

    sources, queries = cluster_problem(4, 2, 10, 0, 3)
    assert cluster_knn(sources, queries, 3).shape == (2, 0, 3)


def test_graphs_without_destinations_give_empty_edges(backend):
    """No destination nodes (and no nodes at all): empty edges and tables on both backends,
    with or without batch vectors; the PyG transform passes an empty graph through."""
    from torch_geometric.data import Data

    from gkg_pyg.transforms import GroupKNNGraph

    for n_src in (10, 0):
        edges = group_knn(torch.randn(n_src, 8), torch.randn(0, 8), k=3, groups=2, backend=backend)
        assert edges.shape == (2, 2, 0) and edges.dtype == torch.long
    table = batched_group_knn(torch.randn(2, 20, 8), torch.randn(2, 0, 8), k=3, groups=2, backend=backend)
    assert table.shape == (2, 2, 0, 3)
    assert batched_group_knn(torch.randn(0, 20, 8), torch.randn(0, 5, 8), 3, 2, backend=backend).shape == (2, 0, 5, 3)
    graph = GroupKNNGraph(k=3, groups=2, backend=backend)(Data(x=torch.randn(0, 8)))
    assert graph.group_edge_index.shape == (2, 2, 0)


@pytest.mark.parametrize("bias_kind", ["dense", "factored"])
def test_cluster_bias_coordinates_order_like_the_biased_distance(bias_kind):
    """The appended coordinates: |p - q|^2 - |a - b|^2 + B_ij is the same for all
    sources of a destination (so the euclidean order is the biased order)."""
    gen = torch.Generator().manual_seed(9)
    a = torch.nn.functional.normalize(torch.randn(6, 8, generator=gen, dtype=torch.float64), dim=-1)
    b = torch.nn.functional.normalize(torch.randn(11, 8, generator=gen, dtype=torch.float64), dim=-1)
    if bias_kind == "dense":
        u, v = torch.randn(6, 11, generator=gen, dtype=torch.float64), None
        dense = u
    else:
        u, v = (
            torch.randn(6, 4, generator=gen, dtype=torch.float64),
            torch.randn(11, 4, generator=gen, dtype=torch.float64),
        )
        dense = u @ v.t()
    extra_src = knn_module._source_bias_coordinates(v, 11, torch.float64, torch.device("cpu"))
    extra_dst = u * 0.5**0.5
    if v is not None:
        extra_dst = torch.cat([extra_dst, torch.zeros(6, 1, dtype=torch.float64)], dim=-1)
    p, q = torch.cat([a, extra_dst], -1), torch.cat([b, extra_src], -1)
    offset = torch.cdist(p, q) ** 2 - (torch.cdist(a, b) ** 2 - dense)
    torch.testing.assert_close(offset, offset[:, :1].expand(-1, 11), rtol=0, atol=1e-12)
