"""The regular fast paths against the general ones: GroupMaxRelConv's
neighbour-table path against its PyG edge_index path (outputs and gradients,
float64), the factored position term against the dense table, and a model
step that reads nothing back to the host."""

from __future__ import annotations

from functools import partial

import pytest
import torch
import torch.nn.functional as F

from gkg_pyg import GroupMaxRelConv, group_knn
from gkg_pyg.geometry import stage_grids
from gkg_pyg.models.positions import relative_position_factors, relative_position_table
from gkg_pyg.models.pvig import Stage

# The oneDNN routing and the kernels' threading are what these tests are about (conftest.py).
pytestmark = pytest.mark.usefixtures("two_threads")


def conv_pair_grads(conv, x_src, x_dst, edges, neighbors, weight_out):
    """Outputs and gradients (sources, destinations, every parameter) of both
    paths for the loss ``(out * weight_out).sum()``."""
    results = []
    for kwargs in (dict(edge_index=edges), dict(neighbors=neighbors)):
        xs, xd = x_src.detach().requires_grad_(True), x_dst.detach().requires_grad_(True)
        conv.zero_grad(set_to_none=True)
        out = conv((xs, xd), **kwargs)
        (out * weight_out).sum().backward()
        grads = {name: p.grad.clone() for name, p in conv.named_parameters()}
        results.append((out.detach(), xs.grad, xd.grad, grads))
    return results


# Stage shapes of GKGNet-S at 224 (one image; n_dst, n_src, channels) and a bipartite label graph.
GKGNET_SHAPES = [
    (3136, 196, 80, "patch"),
    (784, 196, 160, "patch"),
    (196, 196, 400, "self"),
    (49, 49, 640, "self"),
    (80, 3136, 80, "label"),
]


@pytest.mark.parametrize("n_dst,n_src,channels,kind", GKGNET_SHAPES)
@pytest.mark.parametrize("train", [False, True])
def test_regular_path_equals_general_path_on_gkgnet_shapes(n_dst, n_src, channels, kind, train):
    gen = torch.Generator().manual_seed(n_dst + channels)
    torch.manual_seed(0)
    conv = GroupMaxRelConv(channels, 2 * channels, groups=2, conv_groups=4).double().train(train)
    x_dst = torch.randn(2 * n_dst, channels, generator=gen, dtype=torch.float64)
    x_src = x_dst if kind == "self" else torch.randn(2 * n_src, channels, generator=gen, dtype=torch.float64)
    batch_src, batch_dst = torch.arange(2).repeat_interleave(n_src), torch.arange(2).repeat_interleave(n_dst)
    edges = group_knn(
        x_src, x_dst, 9, 2, dilation=2 if kind == "patch" else 1, batch_src=batch_src, batch_dst=batch_dst
    )
    neighbors = edges[:, 0].view(2, 2 * n_dst, 9)
    weight_out = torch.randn(2 * n_dst, 2 * channels, generator=gen, dtype=torch.float64)
    general, regular = conv_pair_grads(conv, x_src, x_dst, edges, neighbors, weight_out)
    torch.testing.assert_close(regular[0], general[0], rtol=0, atol=0)  # the same maxima, the same arithmetic
    if not train:  # without autograd the maxima are used as compared (no second gather)
        with torch.no_grad():
            torch.testing.assert_close(conv((x_src, x_dst), neighbors=neighbors), general[0], rtol=0, atol=0)
    for got, want in zip(regular[1:3], general[1:3]):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    for name in general[3]:
        torch.testing.assert_close(regular[3][name], general[3][name], rtol=1e-12, atol=1e-12)


def test_regular_path_sends_a_tied_maximum_to_one_neighbour():
    """Exact ties (duplicated source rows): both paths give the same maxima and
    the same total gradient per tied pair and channel; the regular path sends
    it all to the first maximal neighbour in table order (the nearest), where
    scatter-max may split it among the tied sources. With identity weights the
    output's odd channels are the messages, so the expected gradient is explicit."""
    gen = torch.Generator().manual_seed(1)
    conv = GroupMaxRelConv(4, 8, groups=2, conv_groups=1, act=None, norm=None).double()
    with torch.no_grad():
        conv.nn[0].weight.copy_(torch.eye(8, dtype=torch.float64))
        conv.nn[0].bias.zero_()
    base = torch.randn(3, 4, generator=gen, dtype=torch.float64)
    x_src = torch.cat([base, base])  # source j + 3 duplicates source j
    x_dst = torch.randn(2, 4, generator=gen, dtype=torch.float64)
    neighbors = torch.tensor([[[0, 3, 1], [4, 1, 2]], [[5, 2, 0], [1, 4, 3]]])  # (G=2, N_dst=2, k=3), all tied pairs
    dst = torch.arange(2).repeat_interleave(3).expand(2, -1)
    edges = torch.stack([neighbors.reshape(2, -1), dst], dim=1)
    weight_out = torch.randn(2, 8, generator=gen, dtype=torch.float64)
    general, regular = conv_pair_grads(conv, x_src, x_dst, edges, neighbors, weight_out)
    torch.testing.assert_close(regular[0], general[0], rtol=0, atol=0)
    torch.testing.assert_close(regular[2], general[2], rtol=1e-12, atol=1e-12)  # destinations: no ties there
    torch.testing.assert_close(regular[1][:3] + regular[1][3:], general[1][:3] + general[1][3:], rtol=1e-12, atol=1e-12)
    expected = torch.zeros_like(x_src)
    for g in range(2):
        for i in range(2):
            for ch in range(2 * g, 2 * g + 2):
                vals = x_src[neighbors[g, i], ch]
                first = int(neighbors[g, i, int((vals == vals.max()).nonzero()[0])])
                expected[first, ch] += weight_out[i, 2 * ch + 1]
    torch.testing.assert_close(regular[1], expected, rtol=0, atol=1e-12)


def test_neighbor_table_and_edge_index_arguments():
    conv = GroupMaxRelConv(8, 16, groups=2)
    x = torch.randn(5, 8)
    table = torch.zeros(2, 5, 3, dtype=torch.long)
    with pytest.raises(ValueError, match="exactly one of edge_index"):
        conv(x)
    with pytest.raises(ValueError, match="exactly one of edge_index"):
        conv(x, torch.zeros(2, 4, dtype=torch.long), neighbors=table)
    with pytest.raises(ValueError, match=r"neighbors must be \(2, 5, k\).*got \(2, 4, 3\)"):
        conv(x, neighbors=table[:, :4])
    with pytest.raises(ValueError, match=r"neighbors must be \(2, 5, k\).*got \(1, 5, 3\)"):
        conv(x, neighbors=table[:1])


def test_regular_path_on_group_knn_table_matches_group_knn_edges_dilated():
    """DynamicGroupMaxRelConv uses the table of group_knn's regular edges."""
    from gkg_pyg import DynamicGroupMaxRelConv

    torch.manual_seed(3)
    dyn = DynamicGroupMaxRelConv(8, 16, k=3, groups=2, dilation=2).double().eval()
    x = torch.randn(25, 8, dtype=torch.float64)
    batch = torch.tensor([0] * 10 + [1] * 15)
    edges = group_knn(x, x, 3, 2, dilation=2, batch_src=batch, batch_dst=batch)
    with torch.no_grad():
        torch.testing.assert_close(dyn(x, batch), GroupMaxRelConv.forward(dyn, x, edges), rtol=0, atol=0)


# ---------------------------------------------------------------------------
# Factored position term
# ---------------------------------------------------------------------------
@pytest.mark.parametrize(
    "grid, channels, pool", [((24, 24), 80, 4), ((12, 20), 160, 2), ((9, 7), 40, 1), ((250, 3), 8, 1)]
)
def test_position_table_is_the_one_call_build_bit_for_bit(grid, channels, pool):
    """The chunked build equals the whole ``n x n`` table summed in float64, rounded to
    float32 and resampled in one ``F.interpolate`` call (the authors' order), bit for bit;
    (250, 3) spans several chunks with a last partial one."""
    h, w = grid
    omega = 1.0 / 10000 ** (torch.arange(channels // 4, dtype=torch.float64) / (channels // 4))
    pos = torch.arange(h * w)
    y, x = (pos // w).double(), (pos % w).double()
    cos_sum = lambda a: torch.cos((a[:, None] - a[None, :])[..., None] * omega).sum(-1)  # noqa: E731
    table = ((cos_sum(y) * (2.0 / channels)) + (cos_sum(x) * (2.0 / channels))).float()
    n_src = (h // pool) * (w // pool)
    if n_src != h * w:
        table = F.interpolate(table[None, None], size=(h * w, n_src), mode="bicubic", align_corners=False)[0, 0]
    assert torch.equal(relative_position_table(grid, channels, pool), table)


@pytest.mark.parametrize("size", [224, 96])
def test_position_factors_reproduce_the_dense_table(size):
    """U @ V.T equals the dense table up to its float32 rounding (the table is
    rounded before the authors resample it; no rank-C form keeps that bit for bit)."""
    for grid, channels, pool in zip(stage_grids(size, size), (80, 160, 400, 640), (4, 2, 1, 1)):
        u, v = relative_position_factors(grid, channels, pool)
        n, n_src = grid[0] * grid[1], (grid[0] // pool) * (grid[1] // pool)
        assert u.shape == (n, channels) and v.shape == (n_src, channels) and u.dtype == torch.float64
        table = relative_position_table(grid, channels, pool).double()
        assert (u @ v.t() - table).abs().max() < 2e-7


def test_position_factors_at_a_runtime_grid_follow_the_resampled_table():
    stage = Stage(80, 80, (14, 14), 2, [1], [0.0], 9, 2, "dense", downsample=False).double()
    for grid in [(14, 14), (20, 18), (9, 11)]:
        u, v = stage.position_factors(grid)
        torch.testing.assert_close(u @ v.t(), stage.position_bias(grid), rtol=0, atol=2e-7)


# ---------------------------------------------------------------------------
# No host synchronisation in the model's forward and backward pass
# ---------------------------------------------------------------------------
SYNCING = ("item", "tolist", "cpu", "numpy", "nonzero", "__bool__", "__int__", "__float__")


@pytest.mark.parametrize("cross_level", [True, False])
def test_model_step_reads_no_tensor_back_to_the_host(monkeypatch, cross_level):
    """Every Tensor method that copies a value to the host raises during a
    training step (forward and backward) and an eval forward, so the model's
    hot path cannot wait on the device (on a GPU each would be a sync)."""
    import gkg_pyg

    torch.manual_seed(0)
    model = gkg_pyg.create_model("gkgnet_ti", num_classes=5, img_size=96, cross_level=cross_level)
    images = torch.randn(2, 3, 96, 96)
    model(images)  # builds the position tables (once, outside the hot path)

    def forbidden(name):
        def raise_(*args, **kwargs):
            raise AssertionError(f"Tensor.{name} called in the model's hot path")

        return raise_

    for name in SYNCING:
        monkeypatch.setattr(torch.Tensor, name, forbidden(name))
    model.train()(images).sum().backward()
    with torch.no_grad():
        model.eval()(images)
    monkeypatch.undo()
    with pytest.raises(AssertionError):  # the guard itself works
        for name in SYNCING:
            monkeypatch.setattr(torch.Tensor, name, forbidden(name))
        bool(torch.ones(1))


# ---------------------------------------------------------------------------
# Blocks: the FFN's BatchNorm + GELU + linear map with recomputation in the
# backward pass; the Grapher through the graph convolution's forward
# ---------------------------------------------------------------------------
def saved_bytes(fn):
    """Bytes of the tensors autograd keeps for the backward pass of ``fn()``."""
    total = 0

    def pack(t):
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, total


def _relative_features(y, sources, neighbors):
    """``[y_i, max_j s_j - y_i]`` interleaved channel by channel, ``(B, N, 2C)``, by
    brute force: per group ``g`` its channels' maximum over the ``k`` sources
    ``neighbors[g, b, i]`` of image ``b``."""
    g = neighbors.shape[0]
    b, n, c = y.shape
    width = c // g
    messages = []
    for group in range(g):
        chans = slice(group * width, (group + 1) * width)
        gathered = torch.stack([sources[i][neighbors[group, i]][..., chans] for i in range(b)])  # (B, N, k, C/G)
        messages.append(gathered.max(dim=2).values - y[..., chans])
    return torch.stack([y, torch.cat(messages, dim=-1)], dim=-1).reshape(b, n, 2 * c)


def _modules_one_by_one(block, inputs):
    """What the FFN / the Grapher computes without fusion and folding: every
    linear map, BatchNorm and GELU as its own module call (the Grapher's
    relative features by brute force)."""
    from gkg_pyg.models.layers import FFN

    def lin_bn(seq, h):
        return seq[1](seq[0](h))

    if isinstance(block, FFN):
        return inputs + lin_bn(block.fc2, block.act(lin_bn(block.fc1, inputs)))
    x, y, sources, neighbors = inputs
    conv_linear, bn, act = block.graph_conv.nn
    r = _relative_features(y, sources, neighbors).reshape(-1, 2 * y.shape[-1])
    return x + lin_bn(block.fc2, act(bn(conv_linear(r)))).view(x.shape)


def _randomise_batchnorms(module):
    with torch.no_grad():
        for bn in module.modules():
            if isinstance(bn, torch.nn.BatchNorm1d):
                bn.running_mean.normal_(), bn.running_var.uniform_(0.5, 2), bn.weight.normal_(), bn.bias.normal_()


def _block_pair(kind, channels, dtype):
    """Two blocks with the same random weights and BatchNorm statistics."""
    from gkg_pyg.models.layers import FFN
    from gkg_pyg.models.pvig import Grapher

    make = (lambda: FFN(channels)) if kind == "ffn" else (lambda: Grapher(channels, groups=2))
    block = make().to(dtype)
    _randomise_batchnorms(block)
    plain = make().to(dtype)
    plain.load_state_dict(block.state_dict())
    return block, plain


def _block_inputs(kind, b, n, channels, dtype, gen):
    """The block's inputs: ``x`` for the FFN; ``x``, ``y``, sources and a ``(2, B, N, 3)``
    neighbour table into 6 sources per image for the Grapher (float ones requiring grad)."""
    x = torch.randn(b, n, channels, generator=gen, dtype=dtype)
    if kind == "ffn":
        return [x.requires_grad_(True)]
    y = torch.randn(b, n, channels, generator=gen, dtype=dtype)
    sources = torch.randn(b, 6, channels, generator=gen, dtype=dtype)
    neighbors = torch.randint(0, 6, (2, b, n, 3), generator=gen)
    return [x.requires_grad_(True), y.requires_grad_(True), sources.requires_grad_(True), neighbors]


def _clone_inputs(inputs):
    return [t.detach().clone().requires_grad_(t.requires_grad) for t in inputs]


@pytest.mark.parametrize("kind", ["ffn", "grapher"])
@pytest.mark.parametrize("train", [True, False])
def test_fused_and_folded_blocks_equal_the_modules(kind, train):
    """FFN in training: BN + GELU + linear map in one autograd function that
    keeps only its input (same forward bit for bit, same gradients and running
    statistics, much less kept for backward). Grapher in training: the graph
    convolution's forward and fc2 as modules, bit for bit the brute-force
    relative features through the same modules. Evaluation: the BatchNorms
    folded into the linear maps (same values up to rounding, float64)."""
    torch.manual_seed(0)
    block, plain = _block_pair(kind, 16, torch.float64)
    block.train(train), plain.train(train)
    inputs = _block_inputs(kind, 3, 10, 16, torch.float64, torch.Generator().manual_seed(1))
    copies = _clone_inputs(inputs)
    weight_out = torch.randn(3, 10, 16, dtype=torch.float64)
    out_block, bytes_block = saved_bytes(partial(block, *inputs))
    out_plain, bytes_plain = saved_bytes(partial(_modules_one_by_one, plain, copies[0] if kind == "ffn" else copies))
    exact = dict(rtol=0, atol=0) if train else dict(rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(out_block, out_plain, **exact)
    (out_block * weight_out).sum().backward()
    (out_plain * weight_out).sum().backward()
    for got, want in zip(inputs, copies):
        if got.requires_grad:
            torch.testing.assert_close(got.grad, want.grad, rtol=1e-10, atol=1e-12)
    for (name, p), q in zip(block.named_parameters(), plain.parameters()):
        if q.grad is None:  # the Grapher's fc1 runs before it (its owner projects y)
            assert p.grad is None and name.startswith("fc1."), name
            continue
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-10, atol=1e-12, msg=name)
    for (name, b), c in zip(block.named_buffers(), plain.buffers()):
        torch.testing.assert_close(b, c, rtol=0, atol=0, msg=name)  # running statistics, num_batches_tracked
    if train and kind == "ffn":  # one hidden tensor instead of three
        assert bytes_block < 0.6 * bytes_plain, (bytes_block, bytes_plain)


def test_regular_max_keeps_one_byte_per_value_for_backward():
    """The fast path keeps the neighbour table and the winners' ranks (uint8),
    never an (N_dst, k, C) tensor or (N_dst, C) int64 indices. With the update
    map frozen, its weight is all the rest it keeps (no (N_dst, 2C) input)."""
    conv = GroupMaxRelConv(80, 160, groups=2, act=None, norm=None).requires_grad_(False)
    x_src, x_dst = torch.randn(196, 80, requires_grad=True), torch.randn(3136, 80)
    neighbors = torch.randint(0, 196, (2, 3136, 9))
    _, kept = saved_bytes(lambda: conv((x_src, x_dst), neighbors=neighbors))
    assert kept == neighbors.numel() * 8 + 3136 * 80 + conv.nn[0].weight.numel() * 4, kept


@pytest.mark.parametrize("kind", ["ffn", "grapher"])
def test_blocks_under_bf16_autocast(kind):
    """Under CPU bfloat16 autocast the blocks run the modules' kernels in the
    forward pass (same values); the FFN's fused path returns gradients in the
    parameters' float32 (close to the modules' within bfloat16 rounding) and
    keeps less."""
    torch.manual_seed(0)
    block, plain = _block_pair(kind, 32, torch.float32)
    block.train(), plain.train()
    inputs = _block_inputs(kind, 4, 50, 32, torch.float32, torch.Generator().manual_seed(1))
    weight_out = torch.randn(4, 50, 32)
    steps = {
        block: lambda args: block(*args),
        plain: lambda args: _modules_one_by_one(plain, args[0] if kind == "ffn" else args),
    }
    results = []
    for module, step in steps.items():
        args = _clone_inputs(inputs)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out, kept = saved_bytes(partial(step, args))
        (out.float() * weight_out).sum().backward()
        results.append((out, kept, args[0].grad, [p.grad for p in module.parameters()]))
    (out_f, kept_f, gx_f, gp_f), (out_p, kept_p, gx_p, gp_p) = results
    assert out_f.dtype == out_p.dtype  # float32: the residual sum of float32 x and a bfloat16 branch
    torch.testing.assert_close(out_f, out_p, rtol=0, atol=0)
    torch.testing.assert_close(gx_f, gx_p, rtol=2e-2, atol=2e-2)
    for a, b in zip(gp_f, gp_p):
        if a is None:  # the Grapher's fc1 is not part of its forward
            assert b is None
            continue
        assert a.dtype == b.dtype == torch.float32
        torch.testing.assert_close(a, b, rtol=5e-2, atol=5e-2)
    if kind == "ffn":
        assert kept_f < 0.8 * kept_p, (kept_f, kept_p)


def test_folding_needs_running_statistics_and_an_affine_batchnorm():
    """Only a plain, affine BatchNorm in evaluation with running statistics is
    folded; the others run as modules and still give their own result."""
    from gkg_pyg.models.layers import LinearBatchNorm, NodeBatchNorm, folds

    torch.manual_seed(0)
    block = LinearBatchNorm(6, 4).double()
    x = torch.randn(3, 5, 6, dtype=torch.float64)
    block.train()(x)  # running statistics away from their initial values
    block.eval()
    assert folds(block[1])
    torch.testing.assert_close(block(x), block[1](block[0](x)), rtol=1e-12, atol=1e-12)
    for bn in (NodeBatchNorm(4, affine=False), NodeBatchNorm(4, track_running_stats=False)):
        block[1] = bn.double().eval()
        assert not folds(block[1])
        torch.testing.assert_close(block(x), bn(block[0](x)), rtol=0, atol=0)


@pytest.mark.parametrize("name", ["gkgnet_ti", "pvig_ti"])
def test_folded_copy_gives_the_models_values_with_fewer_operations(name):
    """fold_batchnorms: a copy without the BatchNorms that follow linear maps (every
    one over node features, and Pyramid ViG's head's) whose evaluation output is the
    model's (bit for bit where evaluation folds them too), with no folding arithmetic
    left to run (or to trace); the model itself keeps its modules and weights."""
    import gkg_pyg
    from gkg_pyg.models.layers import fold_batchnorms
    from torch.utils._python_dispatch import TorchDispatchMode

    class CountOps(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            name = func.overloadpacket.__name__
            self.counts[name] = self.counts.get(name, 0) + 1
            return func(*args, **(kwargs or {}))

    torch.manual_seed(0)
    model = gkg_pyg.create_model(name, num_classes=5, img_size=40, k=3)
    for m in model.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.momentum = None
    with torch.no_grad():
        model.train()(torch.randn(4, 3, 40, 40))  # running statistics away from 0 and 1
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm1d):  # and the affine maps
                m.weight.add_(0.1 * torch.randn_like(m.weight))
                m.bias.add_(0.1 * torch.randn_like(m.bias))
    model.eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    folded = fold_batchnorms(model)
    node_norms = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm1d)]
    assert node_norms and not [m for m in folded.modules() if isinstance(m, torch.nn.BatchNorm1d)]
    x = torch.randn(2, 3, 40, 40)
    runs = []
    for module in (model, folded):
        with torch.no_grad(), CountOps() as counter:
            counter.counts = {}
            runs.append((module(x), counter.counts))
    (out, ops), (out_folded, ops_folded) = runs
    if name == "pvig_ti":  # the head's BatchNorm1d, run as a module in evaluation: folded, other rounding
        torch.testing.assert_close(out_folded, out, rtol=1e-5, atol=1e-5)
    else:
        assert torch.equal(out_folded, out)
    folded_each_call = len(node_norms) - (name == "pvig_ti")  # all but Pyramid ViG's head's BatchNorm
    assert ops["rsqrt"] == folded_each_call and "rsqrt" not in ops_folded
    assert sum(ops_folded.values()) <= sum(ops.values()) - 4 * ops["rsqrt"]
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert sorted(before) == sorted(model.state_dict())


def test_exported_graph_holds_no_cast_that_changes_nothing():
    """The program ``torch.export`` records for the export's folded float32 model has no cast to the
    dtype its input has and no ``promote_types`` (``gkg_pyg.ops._dtypes``): each would be nodes of
    their own to trace, decompose and convert."""
    import gkg_pyg
    from gkg_pyg.models.layers import fold_batchnorms

    torch.manual_seed(0)
    model = gkg_pyg.create_model("gkgnet_ti", num_classes=5, img_size=40, k=3, depths=[1, 1, 1, 1]).eval()
    x = torch.randn(2, 3, 40, 40)
    with torch.no_grad():
        model(x)  # the position tables
    graph = torch.export.export(fold_batchnorms(model), (x,)).graph
    assert not [n for n in graph.nodes if "promote_types" in str(n.target)]
    ops = [n for n in graph.nodes if isinstance(n.target, torch._ops.OpOverload)]
    casts = [n for n in ops if n.target.overloadpacket.__name__ in ("to", "_to_copy")]
    no_ops = [n for n in casts if n.args[0].meta["val"].dtype == n.meta["val"].dtype]
    assert not no_ops, [str(n.target) for n in no_ops]


@pytest.mark.parametrize("shape", [(2, 3, 8, 12), (1, 4, 9, 11)])
def test_source_pooling_equals_avg_pool2d_and_keeps_nothing(shape):
    """The kNN sources' pooling: ATen's forward, and the same input gradient as
    ``F.avg_pool2d``'s backward (float32 bit for bit; sizes with leftover
    rows and columns get 0 there), with nothing kept for the backward pass."""
    from gkg_pyg.models.layers import _AvgPool

    torch.manual_seed(0)
    x = torch.randn(shape)
    grads = []
    for pool in (lambda t: _AvgPool.apply(t, 2), lambda t: torch.nn.functional.avg_pool2d(t, 2, 2)):
        xs = x.clone().requires_grad_(True)
        out, kept = saved_bytes(partial(pool, xs))
        weight = torch.randn(out.shape, generator=torch.Generator().manual_seed(1))
        (out * weight).sum().backward()
        grads.append((out, kept, xs.grad))
    (out_a, kept_a, grad_a), (out_b, kept_b, grad_b) = grads
    torch.testing.assert_close(out_a, out_b, rtol=0, atol=0)
    torch.testing.assert_close(grad_a, grad_b, rtol=0, atol=0)
    assert kept_a == 0 and kept_b >= x.numel() * 4


@pytest.mark.parametrize("grid, pool", [((8, 12), 2), ((9, 11), 2), ((12, 12), 4)])
def test_source_pooling_gradient_comes_back_in_node_layout(grid, pool):
    """The model pools a view of ``(B, N, C)`` nodes (:func:`to_image`, channels
    last): the gradient of that image is channels last too, so it reaches the
    nodes without a transposed copy, with F.avg_pool2d's values bit for bit."""
    from gkg_pyg.models.layers import avg_pool, to_image, to_nodes

    torch.manual_seed(0)
    nodes = torch.randn(2, grid[0] * grid[1], 5)
    weight = torch.randn(2, (grid[0] // pool) * (grid[1] // pool), 5)
    grads = []
    for pooling in (avg_pool, lambda t, p: torch.nn.functional.avg_pool2d(t, p, p)):
        image = to_image(nodes.clone().requires_grad_(True), grid)
        (grad,) = torch.autograd.grad((to_nodes(pooling(image, pool)) * weight).sum(), image)
        grads.append(grad)
    assert torch.equal(grads[0], grads[1])
    assert grads[0].flatten(2).transpose(1, 2).is_contiguous()  # the (B, N, C) node layout, as a view


def test_evaluation_in_place_steps_equal_the_plain_ones(monkeypatch):
    """Without autograd the evaluation path runs its GELUs and residual sums in
    place (no fresh hidden-width tensors): the logits equal those of the plain
    ``act(h)`` and ``x + branch``, bit for bit; with an input gradient
    (saliency) the plain steps run (and the grouped maps take their autograd
    route, which rounds differently) and the logits agree to float32 rounding."""
    import gkg_pyg.models.layers as layers
    import gkg_pyg.models.pvig as pvig
    from gkg_pyg import create_model

    torch.manual_seed(0)
    model = create_model("gkgnet_ti", num_classes=5, img_size=96).eval()
    x = torch.randn(2, 3, 96, 96)
    with torch.no_grad():
        fast = model(x)
    with monkeypatch.context() as patch:
        patch.setattr(layers, "activate", lambda h, act: act(h))
        for module in (layers, pvig):  # the FFN's and the Grapher's residual sums
            patch.setattr(module, "residual", lambda x, branch: x + branch)
        with torch.no_grad():
            plain = model(x)
    assert torch.equal(fast, plain)
    x.requires_grad_(True)
    with_grad = model(x)
    with_grad.sum().backward()
    torch.testing.assert_close(with_grad.detach(), fast, rtol=1e-5, atol=0)
    assert x.grad.abs().sum() > 0
