"""Tests of GroupMaxRelConv / DynamicGroupMaxRelConv against a naive loop
implementation and the authors' Conv2d layout, gradcheck, use on HeteroData
and a small point-cloud classifier that has to learn."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch_geometric.data import Batch, Data
from torch_geometric.nn import global_max_pool, global_mean_pool

from gkg_pyg import DynamicGroupMaxRelConv, GroupMaxRelConv, build_stage_graph, group_knn, stack_group_edges

# The oneDNN routing and the kernels' threading are what these tests are about (conftest.py).
pytestmark = pytest.mark.usefixtures("two_threads")


def naive_conv(conv, x_src, x_dst, edge_index):
    """The layer written out with loops: per destination and group the max of
    ``x_j - x_i`` over its neighbours, the channel interleave, one matmul per
    weight block, eval-mode BatchNorm from its formula, then the activation."""
    groups, c = conv.groups, conv.in_channels
    if edge_index.dim() == 2:
        edge_index = torch.stack([edge_index] * groups)
    width = c // groups
    n_dst = x_dst.shape[0]
    rel = torch.zeros(n_dst, c, dtype=x_dst.dtype)
    for g in range(groups):
        cols = slice(g * width, (g + 1) * width)
        for i in range(n_dst):
            nbrs = edge_index[g, 0][edge_index[g, 1] == i].tolist()
            if nbrs:
                rel[i, cols] = torch.stack([x_src[j, cols] - x_dst[i, cols] for j in nbrs]).max(dim=0).values
    interleaved = torch.empty(n_dst, 2 * c, dtype=x_dst.dtype)
    for ch in range(c):
        interleaved[:, 2 * ch] = x_dst[:, ch]
        interleaved[:, 2 * ch + 1] = rel[:, ch]
    lin = conv.nn[0]
    blocks, out_ch = conv.conv_groups, conv.out_channels
    in_b, out_b = 2 * c // blocks, out_ch // blocks
    out = torch.empty(n_dst, out_ch, dtype=x_dst.dtype)
    for b in range(blocks):
        w = lin.weight[b * out_b : (b + 1) * out_b]  # (out_b, in_b)
        out[:, b * out_b : (b + 1) * out_b] = interleaved[:, b * in_b : (b + 1) * in_b] @ w.t()
    out = out + lin.bias
    norm = conv.nn[1]
    if isinstance(norm, nn.BatchNorm1d):
        out = (out - norm.running_mean) / torch.sqrt(norm.running_var + norm.eps) * norm.weight + norm.bias
    act = conv.nn[2]
    if isinstance(act, nn.GELU):
        out = 0.5 * out * (1 + torch.erf(out / math.sqrt(2)))
    elif isinstance(act, nn.ReLU):
        out = out.clamp_min(0)
    return out


def make_conv(in_ch, out_ch, groups, conv_groups, seed, act="gelu", norm="batch", cls=GroupMaxRelConv, **kw):
    """A float64 conv in eval mode with random weights and BatchNorm running stats."""
    torch.manual_seed(seed)
    conv = cls(in_ch, out_ch, groups=groups, conv_groups=conv_groups, act=act, norm=norm, **kw).double()
    if norm == "batch":
        bn = conv.nn[1]
        with torch.no_grad():
            bn.running_mean.normal_()
            bn.running_var.uniform_(0.5, 2.0)
            bn.weight.normal_()
            bn.bias.normal_()
    return conv.eval()


def random_edges(gen, n_src, n_dst, per_group, groups):
    """``(groups, 2, per_group)`` distinct random (src, dst) pairs per group:
    irregular degrees, different in every group, destinations 0 and 1 without
    neighbours in group 0 (and destination 0 in every group)."""
    out = []
    for g in range(groups):
        lowest = 2 if g == 0 else 1
        pairs = torch.randperm(n_src * (n_dst - lowest), generator=gen)[:per_group]
        out.append(torch.stack([pairs % n_src, pairs // n_src + lowest]))
    return torch.stack(out)


CONFIGS = [  # in, out, groups, conv_groups, act, norm
    (8, 16, 2, 4, "gelu", "batch"),
    (12, 24, 4, 4, "gelu", "batch"),
    (6, 12, 1, 2, "relu", None),
    (8, 8, 2, 1, None, "batch"),
    (16, 32, 4, 8, "gelu", None),
]


@pytest.mark.parametrize("config", CONFIGS)
def test_bipartite_per_group_edges_match_naive(config):
    in_ch, out_ch, groups, conv_groups, act, norm = config
    conv = make_conv(in_ch, out_ch, groups, conv_groups, seed=1, act=act, norm=norm)
    gen = torch.Generator().manual_seed(2)
    x_src = torch.randn(13, in_ch, generator=gen, dtype=torch.float64)
    x_dst = torch.randn(9, in_ch, generator=gen, dtype=torch.float64)
    edges = random_edges(gen, 13, 9, 30, groups)
    with torch.no_grad():
        got = conv((x_src, x_dst), edges)
        expected = naive_conv(conv, x_src, x_dst, edges)
    assert got.shape == (9, out_ch)
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("config", CONFIGS[:3])
def test_shared_edges_on_one_node_set_match_naive(config):
    in_ch, out_ch, groups, conv_groups, act, norm = config
    conv = make_conv(in_ch, out_ch, groups, conv_groups, seed=3, act=act, norm=norm)
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(11, in_ch, generator=gen, dtype=torch.float64)
    edges = random_edges(gen, 11, 11, 25, 1)[0]  # (2, E), nodes 0 and 1 isolated
    with torch.no_grad():
        got = conv(x, edges)
        expected = naive_conv(conv, x, x, edges)
        # (2, E) is the same as giving every group that edge set.
        stacked = conv(x, torch.stack([edges] * groups))
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(stacked, got, rtol=0, atol=0)


def test_destination_without_neighbours_gets_zero_message():
    """Checked on the interleaved input the weights see: without the update
    map (identity weights) x_i comes through and m_i = 0."""
    conv = GroupMaxRelConv(4, 8, groups=2, conv_groups=1, act=None, norm=None).double()
    with torch.no_grad():
        conv.nn[0].weight.copy_(torch.eye(8, dtype=torch.float64))
        conv.nn[0].bias.zero_()
    x_src = torch.tensor([[1.0, 5.0, -3.0, 2.0], [4.0, -1.0, 0.5, 7.0]], dtype=torch.float64)
    x_dst = torch.tensor([[-2.0, -2.0, 1.0, 1.0], [10.0, 20.0, 30.0, 40.0]], dtype=torch.float64)
    # Group 0: dst 0 <- src 0, 1; group 1: dst 0 <- src 1. Destination 1 has no edges.
    edges = torch.tensor([[[0, 1], [0, 0]], [[1, 1], [0, 0]]])
    out = conv((x_src, x_dst), edges)
    m0 = [max(1.0, 4.0) + 2.0, max(5.0, -1.0) + 2.0, 0.5 - 1.0, 7.0 - 1.0]
    expected = torch.tensor(
        [[-2.0, m0[0], -2.0, m0[1], 1.0, m0[2], 1.0, m0[3]], [10.0, 0.0, 20.0, 0.0, 30.0, 0.0, 40.0, 0.0]],
        dtype=torch.float64,
    )
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-12)


@pytest.mark.parametrize("groups,dilation", [(2, 1), (4, 2)])
def test_group_knn_edges_match_naive(groups, dilation):
    """Bipartite label-style graph from group_knn over two graphs."""
    conv = make_conv(16, 32, groups, 4, seed=5)
    gen = torch.Generator().manual_seed(6)
    x_src = torch.randn(30, 16, generator=gen, dtype=torch.float64)
    x_dst = torch.randn(10, 16, generator=gen, dtype=torch.float64)
    batch_src = torch.tensor([0] * 12 + [1] * 18)
    batch_dst = torch.tensor([0] * 4 + [1] * 6)
    edges = group_knn(x_src, x_dst, 4, groups, dilation=dilation, batch_src=batch_src, batch_dst=batch_dst)
    with torch.no_grad():
        got = conv((x_src, x_dst), edges)
        expected = naive_conv(conv, x_src, x_dst, edges)
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-10)


def authors_layout_forward(conv, x_src, x_dst, nbr):
    """The authors' dense formulation on (B=1, C, N, 1) maps with a grouped
    Conv2d, BatchNorm2d and GELU holding this layer's weights; ``nbr`` is the
    ``(G, N_dst, k)`` neighbour table."""
    groups, c = conv.groups, conv.in_channels
    width = c // groups
    conv2d = nn.Conv2d(2 * c, conv.out_channels, 1, groups=conv.conv_groups).double()
    bn2d = nn.BatchNorm2d(conv.out_channels).double().eval()
    conv2d.load_state_dict({"weight": conv.nn[0].weight[..., None, None], "bias": conv.nn[0].bias})
    bn2d.load_state_dict({k: v for k, v in conv.nn[1].state_dict().items()})
    parts = []
    for g in range(groups):
        cols = slice(g * width, (g + 1) * width)
        x_j = x_src[nbr[g], cols]  # (N_dst, k, width)
        parts.append((x_j - x_dst[:, None, cols]).max(dim=1).values)
    m = torch.cat(parts, dim=1)  # (N_dst, C)
    feat = torch.cat([x_dst.t()[:, None], m.t()[:, None]], dim=1).reshape(1, 2 * c, -1, 1)
    return F.gelu(bn2d(conv2d(feat)))[0, :, :, 0].t()


def test_parameter_layout_maps_to_authors_gconv():
    conv = make_conv(8, 16, 2, 4, seed=7)
    shapes = {name: tuple(t.shape) for name, t in conv.state_dict().items()}
    assert shapes == {
        "nn.0.weight": (16, 2 * 8 // 4),
        "nn.0.bias": (16,),
        "nn.1.weight": (16,),
        "nn.1.bias": (16,),
        "nn.1.running_mean": (16,),
        "nn.1.running_var": (16,),
        "nn.1.num_batches_tracked": (),
    }
    assert isinstance(conv.nn[1], nn.BatchNorm1d) and isinstance(conv.nn[2], nn.GELU)
    gen = torch.Generator().manual_seed(8)
    x_src = torch.randn(20, 8, generator=gen, dtype=torch.float64)
    x_dst = torch.randn(7, 8, generator=gen, dtype=torch.float64)
    edges = group_knn(x_src, x_dst, 3, 2)
    nbr = edges[:, 0].view(2, 7, 3)
    with torch.no_grad():
        torch.testing.assert_close(
            conv((x_src, x_dst), edges), authors_layout_forward(conv, x_src, x_dst, nbr), rtol=1e-10, atol=1e-10
        )


def no_max_ties(x_src, x_dst, edges, groups, margin=1e-3):
    """True if every (destination, channel) max over its neighbours is unique by ``margin``."""
    width = x_src.shape[1] // groups
    for g in range(groups):
        cols = slice(g * width, (g + 1) * width)
        for i in range(x_dst.shape[0]):
            vals = x_src[edges[g, 0][edges[g, 1] == i], cols]
            if vals.shape[0] > 1:
                top2 = vals.topk(2, dim=0).values
                if bool(((top2[0] - top2[1]) < margin).any()):
                    return False
    return True


@pytest.mark.parametrize("act", [None, "gelu"])
def test_gradcheck_bipartite(act):
    conv = make_conv(4, 8, 2, 2, seed=9, act=act, norm=None)
    gen = torch.Generator().manual_seed(10)
    x_src = torch.randn(6, 4, generator=gen, dtype=torch.float64, requires_grad=True)
    x_dst = torch.randn(5, 4, generator=gen, dtype=torch.float64, requires_grad=True)
    edges = random_edges(gen, 6, 5, 9, 2)
    assert no_max_ties(x_src, x_dst, edges, 2)
    weight = conv.nn[0].weight.detach().clone().requires_grad_(True)
    bias = conv.nn[0].bias.detach().clone().requires_grad_(True)

    def fn(xs, xd, w, b):
        params = {"nn.0.weight": w, "nn.0.bias": b}
        return torch.func.functional_call(conv, params, ((xs, xd), edges))

    assert torch.autograd.gradcheck(fn, (x_src, x_dst, weight, bias))


def test_gradcheck_self_graph():
    """One node set: gradients through both the source and destination role."""
    conv = make_conv(4, 8, 2, 4, seed=11, act="gelu", norm=None)
    gen = torch.Generator().manual_seed(12)
    x = torch.randn(7, 4, generator=gen, dtype=torch.float64, requires_grad=True)
    edges = random_edges(gen, 7, 7, 12, 2)
    assert no_max_ties(x, x, edges, 2)
    assert torch.autograd.gradcheck(lambda t: conv(t, edges), (x,))


def test_dynamic_equals_static_on_group_knn_edges():
    dyn = make_conv(8, 16, 2, 4, seed=13, cls=DynamicGroupMaxRelConv, k=3, dilation=2)
    static = make_conv(8, 16, 2, 4, seed=13)
    static.load_state_dict(dyn.state_dict())
    gen = torch.Generator().manual_seed(14)
    x = torch.randn(25, 8, generator=gen, dtype=torch.float64)
    batch = torch.tensor([0] * 10 + [1] * 15)
    edges = group_knn(x, x, 3, 2, dilation=2, batch_src=batch, batch_dst=batch)
    with torch.no_grad():
        got = dyn(x, batch)
        torch.testing.assert_close(got, static(x, edges), rtol=0, atol=0)
        torch.testing.assert_close(got, naive_conv(static, x, x, edges), rtol=1e-10, atol=1e-10)
    # Without a batch vector all nodes form one graph.
    with torch.no_grad():
        assert not torch.allclose(dyn(x), got)


def test_invalid_arguments():
    with pytest.raises(ValueError, match=r"in_channels=10 is not divisible by groups=4"):
        GroupMaxRelConv(10, 20, groups=4)
    with pytest.raises(ValueError, match=r"conv_groups=4 .* input width 2 \* in_channels = 16 and out_channels=18"):
        GroupMaxRelConv(8, 18, groups=2, conv_groups=4)
    for conv_groups in (0, -2, 3):  # not a ZeroDivisionError or a negative-size tensor
        with pytest.raises(ValueError, match=rf"conv_groups={conv_groups} must be positive and divide both .* 16 and"):
            GroupMaxRelConv(8, 16, conv_groups=conv_groups)
    with pytest.raises(ValueError, match="unknown activation 'swish'"):
        GroupMaxRelConv(8, 16, act="swish")
    with pytest.raises(ValueError, match="unknown norm 'layer'"):
        GroupMaxRelConv(8, 16, norm="layer")
    # The neighbour-table path is a maximum over sources: MessagePassing's aggr and flow have one value.
    with pytest.raises(ValueError, match=r"aggregates with aggr='max'; got aggr='mean'"):
        GroupMaxRelConv(8, 16, aggr="mean")
    with pytest.raises(ValueError, match=r"flow='source_to_target'; got flow='target_to_source'"):
        GroupMaxRelConv(8, 16, flow="target_to_source")
    assert GroupMaxRelConv(8, 16, aggr="max", flow="source_to_target").aggr == "max"
    conv = GroupMaxRelConv(8, 16, groups=2)
    x = torch.randn(5, 8)
    with pytest.raises(ValueError, match=r"expects 8 channels, got 6 \(source\) and 8"):
        conv((x[:, :6], x), torch.zeros(2, 2, 1, dtype=torch.long))
    with pytest.raises(ValueError, match=r"edge_index must be \(2, 2, E\) or \(2, E\), got \(3, 2, 4\)"):
        conv(x, torch.zeros(3, 2, 4, dtype=torch.long))


def test_hetero_data_model():
    """Label nodes aggregate patch nodes through the per-group edge types of a HeteroData."""
    gen = torch.Generator().manual_seed(15)
    num_images, grid, channels, num_labels, groups = 2, (4, 5), 8, 3, 2
    patch_x = torch.randn(num_images * 20, channels, generator=gen, dtype=torch.float64)
    label_x = torch.randn(num_images * num_labels, channels, generator=gen, dtype=torch.float64)
    patch_batch = torch.arange(num_images).repeat_interleave(20)
    label_batch = torch.arange(num_images).repeat_interleave(num_labels)
    edges = group_knn(patch_x, label_x, 4, groups, batch_src=patch_batch, batch_dst=label_batch)
    data = build_stage_graph(patch_x=patch_x, grid=grid, image_size=(32, 40), label_x=label_x, label_edges=edges)

    class LabelUpdate(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = GroupMaxRelConv(channels, 2 * channels, groups=groups, conv_groups=4)

        def forward(self, data):
            stacked = stack_group_edges(data, "patch", "label")
            return self.conv((data.x_dict["patch"], data.x_dict["label"]), stacked)

    torch.manual_seed(16)
    model = LabelUpdate().double().eval()
    with torch.no_grad():
        got = model(data)
        expected = naive_conv(model.conv, patch_x, label_x, edges)
    assert got.shape == (num_images * num_labels, 2 * channels)
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-10)


def point_cloud_batch(gen, per_class=8, points=48):
    """Random point clouds of three shape classes (sphere surface, cube
    surface, flat disc), randomly rotated and scaled, as one PyG Batch."""
    clouds = []
    for label in range(3):
        for _ in range(per_class):
            p = torch.randn(points, 3, generator=gen)
            if label == 0:
                p = p / p.norm(dim=1, keepdim=True)
            elif label == 1:
                p = p / p.abs().max(dim=1, keepdim=True).values
            else:
                p[:, 2] = 0.02 * p[:, 2]
                p = p / p[:, :2].norm(dim=1).max()
            q, _ = torch.linalg.qr(torch.randn(3, 3, generator=gen))
            scale = 0.5 + torch.rand(1, generator=gen)
            clouds.append(Data(pos=scale * p @ q, y=torch.tensor([label])))
    return Batch.from_data_list(clouds)


class PointNetLike(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Linear(3, 16)
        self.conv1 = DynamicGroupMaxRelConv(16, 32, k=6, groups=2, conv_groups=4)
        self.conv2 = DynamicGroupMaxRelConv(32, 32, k=6, groups=4, conv_groups=4, dilation=2)
        self.head = nn.Linear(32, 3)

    def forward(self, pos, batch):
        # Centre each cloud: the features the kNN compares then describe shape.
        h = self.embed(pos - global_mean_pool(pos, batch)[batch])
        h = self.conv1(h, batch)
        h = self.conv2(h, batch)
        return self.head(global_max_pool(h, batch))


def test_point_cloud_classifier_learns():
    gen = torch.Generator().manual_seed(17)
    data = point_cloud_batch(gen)
    torch.manual_seed(18)
    model = PointNetLike()
    opt = torch.optim.Adam(model.parameters(), lr=5e-3)
    losses = []
    for _ in range(60):
        opt.zero_grad()
        logits = model(data.pos, data.batch)
        loss = F.cross_entropy(logits, data.y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses
    assert (logits.argmax(1) == data.y).float().mean() > 0.9


@pytest.mark.parametrize("groups", [1, 4])
@pytest.mark.parametrize("shape", [(2, 1100, 32), (2200, 32), (3, 0, 32)])
@pytest.mark.parametrize("strided", [False, True])
def test_grouped_linear_onednn_path_matches_plain_products(groups, shape, strided):
    """The oneDNN 1x1-convolution path of ``grouped_linear`` (float32, CPU,
    several threads, large enough) against float64 products: the values to
    float32 rounding, the gradients (a grouped map's through the operator
    ``gkg_pyg::onednn_linear``), the shape and a contiguous output, also for
    non-contiguous rows; it is not taken with one thread, in float64, under
    autocast, or for small inputs."""
    from gkg_pyg.ops.linear import _onednn_pays, grouped_linear

    torch.manual_seed(0)
    x = torch.randn(*shape[:-1], 2 * shape[-1])[..., ::2] if strided else torch.randn(*shape)
    out_channels = 1024 * groups  # 2^26 multiply-adds and more at 2200 rows
    w, b = torch.randn(out_channels, x.shape[-1] // groups), torch.randn(out_channels)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        if torch.backends.mkldnn.is_available() and x.numel():
            assert _onednn_pays(x, w, b, groups)
            assert not _onednn_pays(x.reshape(-1, x.shape[-1])[:2000], w, b, groups)  # too few rows
            assert not _onednn_pays(x, w[: out_channels // 2], b[: out_channels // 2], groups)  # too little work
            rows, wide = x.reshape(-1, x.shape[-1]), (w.repeat(8, 1), b.repeat(8))  # 2^28 multiply-adds at 1024 rows
            assert _onednn_pays(rows[:1100], *wide, groups) and not _onednn_pays(rows[:1000], *wide, groups)
            assert not _onednn_pays(x.double(), w.double(), b.double(), groups)
            with torch.autocast("cpu", dtype=torch.bfloat16):
                assert not _onednn_pays(x, w, b, groups)
            assert _onednn_pays(x.clone().requires_grad_(), w, b, groups)
        with torch.no_grad():
            out = grouped_linear(x, w, b, groups)
        want = [t.double().requires_grad_() for t in (x, w, b)]  # the float64 reference, with its gradients
        xd = want[0].reshape(-1, groups, x.shape[-1] // groups)
        wd = want[1].view(groups, out_channels // groups, -1)
        expect = torch.einsum("mgi,goi->mgo", xd, wd).reshape(*x.shape[:-1], out_channels) + want[2]
        assert out.shape == expect.shape and out.is_contiguous()
        torch.testing.assert_close(out, expect.detach().float(), rtol=1e-5, atol=1e-4)
        if x.numel():  # the gradients: the convolution's backward, a grouped map's per-group products
            grad = torch.randn(out.shape)
            got = [t.clone().requires_grad_() for t in (x, w, b)]
            torch.autograd.backward(grouped_linear(*got, groups), grad)
            torch.autograd.backward(expect, grad.double())
            for g, e in zip(got, want):
                torch.testing.assert_close(g.grad, e.grad.float(), rtol=1e-4, atol=1e-3)
        torch.set_num_threads(1)
        assert not _onednn_pays(x, w, b, groups)
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize(
    "rows, out_channels, in_channels, onednn",
    [
        (4096, 160, 40, True),
        (25088, 80, 320, True),
        (4095, 160, 40, False),
        (4096, 161, 40, False),
        (300, 30, 7, False),
    ],
)
@pytest.mark.parametrize("strided", [False, True])
def test_linear_weight_grad_matches_float64_product(rows, out_channels, in_channels, onednn, strided):
    """``linear_weight_grad`` against the float64 ``grad_out^T x`` on both sides
    of its oneDNN bounds (at least 4096 rows, at most 160 outputs): the values
    to float32 rounding, a contiguous ``(out, in)`` result (autograd would copy
    any other layout into the parameter's), oneDNN's convolution backward run
    exactly where the bounds say (seen by the profiler), never with one thread
    or in float64."""
    from torch.profiler import profile

    from gkg_pyg.ops.linear import linear_weight_grad

    torch.manual_seed(0)
    grad_out = torch.randn(rows, out_channels)
    x = torch.randn(rows, 2 * in_channels)[:, ::2] if strided else torch.randn(rows, in_channels)
    expect = grad_out.double().t() @ x.double()
    threads = torch.get_num_threads()
    try:
        for n_threads, dtype in ((2, torch.float32), (1, torch.float32), (2, torch.float64)):
            torch.set_num_threads(n_threads)
            with profile() as prof:
                got = linear_weight_grad(grad_out.to(dtype), x.to(dtype))
            ran_onednn = any(e.key == "aten::convolution_backward" for e in prof.key_averages())
            takes_onednn = onednn and n_threads == 2 and dtype == torch.float32
            assert ran_onednn == (takes_onednn and torch.backends.mkldnn.is_available())
            assert got.shape == (out_channels, in_channels) and got.is_contiguous() and got.dtype == dtype
            torch.testing.assert_close(got.double(), expect, rtol=1e-5, atol=1e-5 * expect.abs().max().item())
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize(
    "rows, out_channels, in_channels, onednn",
    [
        (1568, 400, 1600, True),
        (256, 512, 512, True),
        (255, 512, 512, False),
        (640, 80, 320, False),
        (300, 30, 7, False),
    ],
)
def test_linear_input_grad_matches_float64_product(monkeypatch, rows, out_channels, in_channels, onednn):
    """``linear_input_grad`` against the float64 ``grad_out @ weight`` on both
    sides of its oneDNN bounds (at least 256 rows and 2^26 multiply-adds, on
    AVX-512 CPUs, set here on any CPU): the values to float32 rounding,
    a contiguous ``(M, in)`` result, MKL's product written into the given
    buffer, oneDNN's convolution backward run exactly where the bounds say
    (seen by the profiler), never with one thread or in float64."""
    from torch.profiler import profile

    from gkg_pyg.ops import linear

    monkeypatch.setattr(linear, "_ONEDNN_BACKWARD", True)
    torch.manual_seed(0)
    grad_out, weight = torch.randn(rows, out_channels), torch.randn(out_channels, in_channels)
    expect = grad_out.double() @ weight.double()
    threads = torch.get_num_threads()
    try:
        for n_threads, dtype in ((2, torch.float32), (1, torch.float32), (2, torch.float64)):
            torch.set_num_threads(n_threads)
            out = torch.full((rows, in_channels), float("nan"), dtype=dtype)
            with profile() as prof:
                got = linear.linear_input_grad(grad_out.to(dtype), weight.to(dtype), out)
            ran_onednn = any(e.key == "aten::convolution_backward" for e in prof.key_averages())
            takes_onednn = onednn and n_threads == 2 and dtype == torch.float32
            assert ran_onednn == (takes_onednn and torch.backends.mkldnn.is_available())
            assert got.shape == (rows, in_channels) and got.is_contiguous() and got.dtype == dtype
            assert ran_onednn or got.data_ptr() == out.data_ptr()
            torch.testing.assert_close(got.double(), expect, rtol=1e-5, atol=1e-5 * expect.abs().max().item())
    finally:
        torch.set_num_threads(threads)


def test_onednn_backward_only_with_avx512(monkeypatch):
    """Without AVX-512 (where oneDNN's 1x1 backward was slower than MKL's
    products) a map's input gradient is MKL's product into the given buffer at
    any size, and a plain map with gradients runs MKL's products backward (as
    a grouped one does); with AVX-512 autograd's oneDNN backward.  The
    gradients are the plain map's either way."""
    from torch.profiler import profile

    from gkg_pyg.ops import linear

    assert linear._ONEDNN_BACKWARD == linear._onednn_backward_pays(torch.backends.cpu.get_cpu_capability())
    assert not any(map(linear._onednn_backward_pays, ("DEFAULT", "AVX2", "ZVECTOR", "SVE256")))
    assert all(map(linear._onednn_backward_pays, ("AVX512", "AVX512_BF16")))
    torch.manual_seed(1)
    x, weight, bias = torch.randn(4096, 80), torch.randn(320, 80), torch.randn(320)
    grad_out = torch.randn(4096, 320)
    expect = [t.double().requires_grad_(True) for t in (x, weight, bias)]
    torch.nn.functional.linear(*expect).backward(grad_out.double())
    for avx512 in (False, True):
        monkeypatch.setattr(linear, "_ONEDNN_BACKWARD", avx512)
        out = torch.empty(1568, 1600)
        got = linear.linear_input_grad(torch.randn(1568, 400), torch.randn(400, 1600), out)
        assert (got.data_ptr() == out.data_ptr()) == (not avx512 or not torch.backends.mkldnn.is_available())
        leaves = [t.clone().requires_grad_(True) for t in (x, weight, bias)]
        with profile() as prof:
            linear.grouped_linear(*leaves, 1).backward(grad_out)
        names = {e.key for e in prof.key_averages()}
        if torch.backends.mkldnn.is_available():
            assert ("aten::convolution_backward" in names) == avx512
            assert ("gkg_pyg::onednn_linear_backward" in names) == (not avx512)
        for leaf, want in zip(leaves, expect):
            scale = want.grad.abs().max().item()
            torch.testing.assert_close(leaf.grad.double(), want.grad, rtol=1e-5, atol=1e-5 * scale)


@pytest.mark.parametrize("act,norm", [("gelu", "batch"), ("relu", "batch"), (None, "batch"), ("gelu", None)])
@pytest.mark.parametrize("grad", [False, True])
def test_eval_fold_equals_the_modules(act, norm, grad):
    """In evaluation the conv folds the BatchNorm into the grouped map and runs
    the activation in place where no gradient flows: float32 values within
    rounding of the unfused modules (and of float64), the same gradients when
    one flows, and the modules' own path in training."""
    torch.manual_seed(19)
    conv = GroupMaxRelConv(40, 80, groups=2, conv_groups=4, act=act, norm=norm)
    if norm == "batch":
        with torch.no_grad():
            conv.nn[1].running_mean.normal_()
            conv.nn[1].running_var.uniform_(0.5, 2.0)
            conv.nn[1].weight.normal_()
            conv.nn[1].bias.normal_()
    conv.eval()
    gen = torch.Generator().manual_seed(20)
    x = torch.randn(300, 40, generator=gen).requires_grad_(grad)
    neighbors = torch.randint(0, 300, (2, 300, 9), generator=gen)
    with torch.set_grad_enabled(grad):
        got = conv(x, neighbors=neighbors)
        features = conv._aggregate(x, neighbors=neighbors)
        want = conv.nn(features)  # the modules one by one
        exact = conv.double().nn(features.double())
    conv.float()
    assert got.shape == (300, 80)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got.double(), exact, rtol=1e-5, atol=1e-5)
    if grad:
        (grad_got,) = torch.autograd.grad(got.sum(), x)
        (grad_want,) = torch.autograd.grad(want.sum(), x)
        torch.testing.assert_close(grad_got, grad_want, rtol=1e-4, atol=1e-5)
    conv.train()  # training: the modules (batch statistics), so the fold must not apply
    with torch.no_grad():
        trained = conv(x, neighbors=neighbors)
        torch.testing.assert_close(trained, conv.nn(conv._aggregate(x, neighbors=neighbors)), rtol=0, atol=0)
    if norm == "batch":
        assert not torch.allclose(trained, got, atol=1e-3)


@pytest.mark.parametrize("grad", [True, False])
def test_training_update_equals_the_modules(grad):
    """In training with autograd the default update's BatchNorm and GELU run as
    the operator gkg_pyg::bn_gelu_linear (seen by the profiler): the modules'
    output, running statistics and batch count, and gradients for the input and
    every parameter as close to float64 autograd through the modules as the
    float32 modules' own.  Without autograd the modules run as they are."""
    from torch.profiler import profile

    torch.manual_seed(23)
    conv = GroupMaxRelConv(40, 80, groups=2, conv_groups=4).train()
    plain, reference = copy.deepcopy(conv), copy.deepcopy(conv).double()
    gen = torch.Generator().manual_seed(24)
    x = torch.randn(700, 40, generator=gen)
    neighbors = torch.randint(0, 700, (2, 700, 9), generator=gen)
    inputs = [x.clone().requires_grad_(grad) for _ in range(2)] + [x.double().requires_grad_(grad)]
    with torch.set_grad_enabled(grad):
        with profile() as prof:
            got = conv(inputs[0], neighbors=neighbors)
        modules = [m.nn(m._aggregate(xi, neighbors=neighbors)) for m, xi in zip((plain, reference), inputs[1:])]
    assert ("gkg_pyg::bn_gelu_linear" in {e.key for e in prof.key_averages()}) == grad
    torch.testing.assert_close(got, modules[0], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(got.double(), modules[1], rtol=1e-5, atol=1e-5)
    bn, bn64 = conv.nn[1], reference.nn[1]
    torch.testing.assert_close(bn.running_mean.double(), bn64.running_mean, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(bn.running_var.double(), bn64.running_var, rtol=1e-5, atol=1e-6)
    assert int(bn.num_batches_tracked) == int(bn64.num_batches_tracked) == 1
    if not grad:
        return
    grad_out = torch.randn(got.shape, generator=gen)
    for out in (got, modules[0], modules[1]):
        out.backward(grad_out.to(out.dtype))
    named = [("x", inputs)] + [
        (name, [dict(m.named_parameters())[name] for m in (conv, plain, reference)])
        for name, _ in conv.named_parameters()
    ]
    for name, (fused, float32, exact) in named:
        scale = exact.grad.abs().max().item()
        fused_error = (fused.grad.double() - exact.grad).abs().max().item()
        modules_error = (float32.grad.double() - exact.grad).abs().max().item()
        assert fused_error <= 4 * modules_error + 2e-6 * scale, (name, fused_error, modules_error, scale)


@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("graph", ["shared", "grouped", "neighbors", "bipartite", "sparse"])
def test_empty_graph_gives_an_empty_output(mode, graph):
    """A graph without nodes or edges: an empty ``(0, out_channels)`` output for
    every input form, and in training the BatchNorm statistics stay finite."""
    torch.manual_seed(21)
    conv = GroupMaxRelConv(8, 16, groups=2, conv_groups=4)
    getattr(conv, mode)()
    x = torch.empty(0, 8, requires_grad=True)
    no_edges = torch.empty(2, 0, dtype=torch.long)
    if graph == "shared":
        out = conv(x, no_edges)
    elif graph == "grouped":
        out = conv(x, torch.empty(2, 2, 0, dtype=torch.long))
    elif graph == "neighbors":
        out = conv(x, neighbors=torch.empty(2, 0, 3, dtype=torch.long))
    elif graph == "bipartite":  # sources, but no destinations
        out = conv((torch.randn(5, 8), x), no_edges)
    else:
        out = conv(x, torch.sparse_coo_tensor(no_edges, torch.ones(0), (0, 0)))
    assert out.shape == (0, 16) and out.dtype == torch.float32
    out.sum().backward()
    assert x.grad.shape == (0, 8)
    assert torch.isfinite(conv.nn[1].running_mean).all() and torch.isfinite(conv.nn[1].running_var).all()
    dynamic = DynamicGroupMaxRelConv(8, 16, k=3, groups=2)
    getattr(dynamic, mode)()
    assert dynamic(torch.empty(0, 8)).shape == (0, 16)
    assert dynamic(torch.empty(0, 8), torch.empty(0, dtype=torch.long)).shape == (0, 16)


def test_user_mistakes_raise_clear_errors():
    with pytest.raises(ValueError, match=r"in_channels and out_channels must be positive, got in_channels=0"):
        GroupMaxRelConv(0, 16)
    with pytest.raises(ValueError, match=r"in_channels and out_channels must be positive"):
        DynamicGroupMaxRelConv(0, 16, k=3)
    conv = GroupMaxRelConv(8, 16, groups=2)
    edges = torch.zeros(2, 4, dtype=torch.long)
    with pytest.raises(ValueError, match=r"floating-point node features, got torch.int64 \(source\)"):
        conv(torch.zeros(5, 8, dtype=torch.long), edges)
    with pytest.raises(ValueError, match=r"floating-point node features, got torch.bool \(destination\)"):
        conv((torch.zeros(5, 8), torch.zeros(5, 8, dtype=torch.bool)), edges)
    with pytest.raises(ValueError, match=r"floating-point node features, got torch.int32"):
        DynamicGroupMaxRelConv(8, 16, k=2)(torch.zeros(5, 8, dtype=torch.int32))
    with pytest.raises(ValueError, match=r"expects 8 channels, got 0 \(source\) and 0 \(destination\)"):
        conv(torch.zeros(5, 0), edges)
    with pytest.raises(ValueError, match=r"node features \(N, 8\), got \(5, 2, 4\)"):
        conv(torch.zeros(5, 2, 4), edges)
    with pytest.raises(ValueError, match=r"neighbors must hold int64 \(or int32\) source indices, got torch.float32"):
        conv(torch.zeros(5, 8), neighbors=torch.zeros(2, 5, 3))
    with pytest.raises(
        ValueError, match=r"source and destination features of one dtype, got torch.float32 and torch.f"
    ):
        conv((torch.zeros(5, 8), torch.zeros(5, 8, dtype=torch.float64)), edges)
    with pytest.raises(ValueError, match=r"parameters are torch.float32 and the node features torch.float64: convert"):
        conv(torch.zeros(5, 8, dtype=torch.float64), edges)
    with pytest.raises(ValueError, match=r"parameters are torch.float64 and the node features torch.float32"):
        DynamicGroupMaxRelConv(8, 16, k=2).double()(torch.zeros(5, 8))
    with pytest.raises(ValueError, match=r"parameters are torch.float32 and the node features torch.float64"):
        GroupMaxRelConv(8, 16, groups=2).to("meta")(torch.zeros(5, 8, dtype=torch.float64, device="meta"), edges)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # autocast casts inside the layer: no mismatch
        assert conv(torch.randn(5, 8, dtype=torch.bfloat16), edges).shape == (5, 16)


def test_the_conv_runs_on_fake_and_meta_tensors():
    """The range checks of neighbors / edge_index read values, which fake and meta tensors lack:
    they are skipped there (the default check_neighbors=True), as under torch.compile."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode(), torch.device("cuda"):
        conv = GroupMaxRelConv(64, 64, groups=2)
        out = conv(torch.randn(300, 64), neighbors=torch.randint(0, 300, (2, 300, 9)))
        assert out.shape == (300, 64) and out.device.type == "cuda"
        assert conv(torch.randn(300, 64), torch.randint(0, 300, (2, 2, 900))).shape == (300, 64)
    with torch.device("meta"):
        conv = GroupMaxRelConv(64, 64, groups=2)
        assert conv(torch.randn(300, 64), neighbors=torch.randint(0, 300, (2, 300, 9))).is_meta
        assert conv(torch.randn(300, 64), torch.randint(0, 300, (2, 900))).shape == (300, 64)


@pytest.mark.parametrize("grad", [False, True])
def test_one_destination_in_training_is_refused_as_batch_norm_refuses_it(grad):
    """BatchNorm in training has no variance from one value per channel: the conv raises
    F.batch_norm's error on every path (the fused update, taken with gradients, gave
    near-zero outputs and wrote NaN into running_var) and changes no statistic."""
    conv = GroupMaxRelConv(8, 16, groups=2).train()
    x_src, x_dst = torch.randn(5, 8, requires_grad=grad), torch.randn(1, 8)
    before = {name: t.clone() for name, t in conv.state_dict().items()}
    for kwargs in (dict(edge_index=torch.tensor([[0, 1, 2], [0, 0, 0]])), dict(neighbors=torch.tensor([[[0, 1]]] * 2))):
        with pytest.raises(ValueError, match="Expected more than 1 value per channel when training"):
            conv((x_src, x_dst), **kwargs)
    assert all(torch.equal(t, before[name]) for name, t in conv.state_dict().items())


def test_neighbor_table_indices_are_checked():
    """An index outside 0 .. N_src - 1 is a ValueError naming it, its place and
    the valid range; ``check_neighbors=False`` skips the check (then PyTorch's
    own index error, never a silent value)."""
    torch.manual_seed(22)
    conv = GroupMaxRelConv(8, 16, groups=2).eval()
    x_src, x_dst = torch.randn(30, 8), torch.randn(20, 8)
    neighbors = torch.randint(0, 30, (2, 20, 4))
    conv((x_src, x_dst), neighbors=neighbors)
    for bad, value in (((1, 7, 2), 30), ((0, 3, 0), -1), ((1, 19, 3), 1000)):
        table = neighbors.clone()
        table[bad] = value
        where = ", ".join(map(str, bad))
        with pytest.raises(
            ValueError, match=rf"neighbors\[{where}\] = {value} is out of range for 30 source nodes \(valid: 0 to 29\)"
        ):
            conv((x_src, x_dst), neighbors=table)
    unchecked = GroupMaxRelConv(8, 16, groups=2, check_neighbors=False).eval()
    assert not unchecked.check_neighbors
    with pytest.raises((IndexError, RuntimeError), match="out of range|index"):
        unchecked((x_src, x_dst), neighbors=table)
