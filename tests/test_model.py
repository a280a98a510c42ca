"""GKGNet against the published numbers and against the independent dense
reference in tests/reference_gkgnet.py (same weights, through the authors'
checkpoint layout)."""

import copy

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import gkg_pyg
from gkg_pyg.graph import neighbour_table
from reference_gkgnet import ReferenceGKGNet


def randomize(model, seed=0):
    """Non-trivial BN statistics and position embedding, so that every tensor matters."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=gen) * 0.1)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=gen) + 0.5)
                m.weight.copy_(torch.rand(m.weight.shape, generator=gen) + 0.5)
                m.bias.copy_(torch.randn(m.bias.shape, generator=gen) * 0.1)
        model.pos_embed.copy_(torch.randn(model.pos_embed.shape, generator=gen) * 0.1)
    return model


def paired_models(dtype=torch.float64, num_classes=20, img_size=192, **kw):
    torch.manual_seed(0)
    ours = randomize(gkg_pyg.create_model("gkgnet_ti", num_classes=num_classes, img_size=img_size, **kw)).to(dtype)
    ref = ReferenceGKGNet("ti", num_classes=num_classes, img_size=img_size, **kw).to(dtype)
    ref.load_state_dict(gkg_pyg.export_authors_checkpoint(ours)["state_dict"], strict=True)
    return ours, ref


def per_image_neighbours(data, src, dst, shape):
    """The captured ``src -> dst`` neighbours as the reference returns them:
    ``(B, G, N_dst, K)`` source indices within each image."""
    b, g, n_dst, k = shape
    table = neighbour_table(gkg_pyg.stack_group_edges(data, src, dst), b * n_dst).view(g, b, n_dst, k)
    n_src = data[src].num_nodes // b
    return (table - (torch.arange(b) * n_src).view(1, b, 1, 1)).transpose(0, 1)


@pytest.mark.parametrize("size,expected", [(224, 33.265), (448, 34.018), (576, 34.673)])
def test_trainable_parameters_match_paper(size, expected):
    with torch.device("meta"):  # shapes only
        model = gkg_pyg.create_model("gkgnet_s", num_classes=80, img_size=size)
    count = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert round(count / 1e6, 3) == expected


# The counting is the same at every size: the quick run counts at 224 px, the paper's
# training sizes (a real forward pass of GKGNet-S, seconds each on the CPU) are slow.
@pytest.mark.parametrize(
    "size,expected_gmacs",
    [(224, 5.2), pytest.param(448, 21.9, marks=pytest.mark.slow), pytest.param(576, 40.1, marks=pytest.mark.slow)],
)
def test_macs_match_paper(size, expected_gmacs):
    model = gkg_pyg.create_model("gkgnet_s", num_classes=80, img_size=size).eval()
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(torch.randn(1, 3, size, size))
    gmacs = counter.get_total_flops() / 2e9
    assert abs(gmacs - expected_gmacs) / expected_gmacs < 0.03, gmacs


@pytest.mark.parametrize("mode", ["eval", "train"])
def test_equals_dense_reference_float64(mode):
    ours, ref = paired_models()
    for size in [(192, 192), (160, 224)]:  # the construction size; another size, not square
        getattr(ours, mode)(), getattr(ref, mode)()
        x = torch.randn(2, 3, *size, dtype=torch.float64)
        a, b = ours(x), ref(x)
        assert a.shape == (2, 20)
        assert (a - b).abs().max() <= 1e-8 * b.abs().max(), size


def test_captured_graphs_equal_reference_neighbours():
    ours, ref = paired_models()
    ours.eval(), ref.eval()
    x = torch.randn(2, 3, 224, 224, dtype=torch.float64)
    with torch.no_grad():
        logits, graphs = ours(x, return_graphs=True)
        _, edges = ref(x, return_edges=True)
        assert torch.equal(logits, ours(x))  # capturing changes nothing
    for data, expected in zip(graphs, edges):
        src_type = "pooled_patch" if "pooled_patch" in data.node_types else "patch"
        assert torch.equal(per_image_neighbours(data, src_type, "patch", expected["patch"].shape), expected["patch"])
        assert torch.equal(per_image_neighbours(data, "patch", "label", expected["cross"].shape), expected["cross"])


def test_float32_neighbour_choices_mostly_identical():
    """Rounding differences between two implementations flip near-tied neighbours only.

    Measured at PyTorch's default weight scale: at the authors' kaiming initialisation an untrained
    GKGNet is chaotic (a float32 and a float64 pass of the same implementation already pick different
    cross-level neighbours for most labels from stage 3 on), which says nothing about the implementations."""
    torch.manual_seed(0)
    ours = randomize(gkg_pyg.create_model("gkgnet_ti", num_classes=20, img_size=192))
    for m in ours.modules():
        if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d, gkg_pyg.conv.GroupedLinear)):
            m.reset_parameters()  # PyTorch's default scale: perturbations shrink through the layers
    ref = ReferenceGKGNet("ti", num_classes=20, img_size=192)
    ref.load_state_dict(gkg_pyg.export_authors_checkpoint(ours)["state_dict"], strict=True)
    ours.eval(), ref.eval()
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        _, graphs = ours(x, return_graphs=True)
        _, edges = ref(x, return_edges=True)
    same = total = 0
    for data, expected in zip(graphs, edges):
        local = per_image_neighbours(data, "patch", "label", expected["cross"].shape)
        same += (local == expected["cross"]).sum().item()
        total += local.numel()
    print(f"float32: {same / total:.4%} of cross-level neighbour choices identical")
    assert same / total > 0.95


def test_bfloat16_and_float32_forward():
    """bfloat16 (8 mantissa bits) follows the float32 output: measured 0.5-1.3% of the largest logit.
    At PyTorch's default weight scale, as in the float32 test above: an untrained GKGNet at the authors'
    initialisation is chaotic in evaluation mode (logits ~1e7 that even float32 cannot pin down)."""
    torch.manual_seed(0)
    model = gkg_pyg.create_model("gkgnet_ti", num_classes=5, img_size=96).eval()
    for m in model.modules():
        if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d, gkg_pyg.conv.GroupedLinear)):
            m.reset_parameters()
    x = torch.randn(2, 3, 96, 96)
    with torch.no_grad():
        out32 = model(x)
        out16 = model.to(torch.bfloat16)(x.to(torch.bfloat16))
    assert out16.dtype == torch.bfloat16 and torch.isfinite(out16).all()
    assert out32.shape == out16.shape == (2, 5)
    error = (out16.float() - out32).abs().max() / out32.abs().max()
    assert error < 0.03, f"bfloat16 differs from float32 by {error:.2%} of the largest logit"


def test_input_size_limits():
    k = 9
    smallest = gkg_pyg.min_input_size(k)
    model = gkg_pyg.create_model("gkgnet_ti", num_classes=4, img_size=smallest, k=k).eval()
    with torch.no_grad():
        assert model(torch.randn(1, 3, smallest, smallest)).shape == (1, 4)
        assert model(torch.randn(1, 3, smallest, 2 * smallest)).shape == (1, 4)  # non-square
        with pytest.raises(ValueError, match=f"smallest input is {smallest}x{smallest}"):
            model(torch.randn(1, 3, smallest - 1, smallest - 1))
        with pytest.raises(ValueError, match=r"\(batch, 3, height, width\)"):
            model(torch.randn(3, smallest, smallest))
    with pytest.raises(ValueError, match=f"smallest square size is {smallest}"):
        gkg_pyg.create_model("gkgnet_ti", img_size=smallest - 8, k=k)


@pytest.mark.parametrize(
    "kw",
    [
        dict(groups=1),
        dict(groups=4),
        dict(groups=8),
        dict(cross_level=False),
        dict(k=3),
        dict(k=6),
        dict(k=12),
        dict(num_gcn=2),
    ],
)
def test_ablation_switches(kw):
    model = gkg_pyg.create_model("gkgnet_ti", num_classes=3, img_size=128, **kw).eval()
    with torch.no_grad():
        logits, graphs = model(torch.randn(2, 3, 128, 128), return_graphs=True)
    assert logits.shape == (2, 3)
    g = kw.get("groups", 2)
    assert len(graphs) == 4
    assert sum(1 for et in graphs[0].edge_types if et[2] == "patch") == g
    if kw.get("cross_level", True):
        k = kw.get("k", 9)
        assert graphs[3]["patch", "group_0", "label"].edge_index.shape[1] == 2 * 3 * k
    else:
        assert "label" not in graphs[0].node_types


def test_variants_widths():
    for name, width in [("gkgnet_ti", 384), ("gkgnet_s", 640), ("gkgnet_m", 768), ("gkgnet_b", 1024)]:
        with torch.device("meta"):  # the structure only: no weights to initialise
            model = gkg_pyg.create_model(name, num_classes=7, img_size=224)
        assert model.head_patch.in_features == width
    with pytest.raises(ValueError, match="did you mean 'gkgnet_s'"):
        gkg_pyg.create_model("gkgnet_x")


def test_depths_set_the_blocks_per_stage():
    """depths (model.depths in a config): the variant's widths with these blocks per stage, each block's
    dilation and stochastic-depth rate by its place among all blocks, as in the variants; bad values
    are one ConfigError naming them; weights of the variant's depths do not load."""
    from gkg_pyg.builder import build_model
    from gkg_pyg.checkpoint import CheckpointError
    from gkg_pyg.config import load_config
    from gkg_pyg.errors import ConfigError

    with torch.device("meta"):
        full = gkg_pyg.create_model("gkgnet_ti", num_classes=3, img_size=224, drop_path=0.1)
        short = gkg_pyg.create_model("pvig_ti", num_classes=3, img_size=224, drop_path=0.1, depths=[1, 1, 3, 2])
    assert full.depths == (2, 2, 6, 2) and short.depths == (1, 1, 3, 2)
    assert [len(s.blocks) for s in short.stages] == [1, 1, 3, 2]
    assert [s.dilations for s in short.stages] == [[1], [1], [1, 1, 2], [2, 2]]
    rates = [r for s in short.stages for r in s.drop_paths]
    assert rates[0] == 0.0 and rates[-1] == pytest.approx(0.1) and rates == sorted(rates) and len(rates) == 7
    assert [m.channels for m in (full, short)] == [(48, 96, 240, 384)] * 2
    cfg = load_config(None, ["model.name=gkgnet_ti", "model.img_size=33", "model.k=3", "model.depths=[1,1,1,1]"])
    model = build_model(cfg, ["a", "b"], verbose=False).eval()
    assert [len(s.blocks) for s in model.stages] == [1, 1, 1, 1]
    assert model(torch.randn(2, 3, 33, 33)).shape == (2, 2)
    for bad in ([1, 1, 1], [1, 0, 1, 1], [1, 1, 1.5, 1], "deep"):
        with pytest.raises(ConfigError, match="depths must be four positive block counts, one per stage, got"):
            gkg_pyg.create_model("gkgnet_ti", num_classes=3, img_size=33, k=3, depths=bad)
    standard = gkg_pyg.create_model("gkgnet_ti", num_classes=2, img_size=33, k=3)
    with pytest.raises(CheckpointError):
        gkg_pyg.load_checkpoint(model, standard.state_dict())


@pytest.mark.parametrize("p", [0.0, 0.3, 1.0])
def test_drop_path_draws_and_scales_like_timms(p):
    """The model's own DropPath (so that building a model does not import
    timm) against timm's: same per-sample masks from the same generator
    state, same values, identity in evaluation."""
    from timm.layers import DropPath as TimmDropPath

    from gkg_pyg.models.layers import DropPath

    x = torch.randn(64, 5, 3)
    ours, theirs = DropPath(p).train(), TimmDropPath(p).train()
    torch.manual_seed(1)
    got = ours(x)
    after_ours = torch.rand(1)
    torch.manual_seed(1)
    want = theirs(x)
    after_theirs = torch.rand(1)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert torch.equal(after_ours, after_theirs)  # the same number of draws
    if 0.0 < p < 1.0:
        kept = got.flatten(1).ne(0).any(1)
        assert 0 < kept.sum() < 64  # some samples dropped, some kept
        torch.testing.assert_close(got[kept], x[kept] / (1 - p))
    assert ours.eval()(x) is x


@pytest.mark.slow  # a fresh interpreter
def test_import_and_build_are_quiet_and_leave_timm_out():
    """``import gkg_pyg`` and building a model in a fresh interpreter: no
    warnings on stderr (torch-scatter's and torch-cluster's torch.jit.script
    deprecation noise is filtered during the import) and no timm import
    (the model's DropPath is its own)."""
    import subprocess
    import sys

    code = (
        "import sys, gkg_pyg; gkg_pyg.create_model('gkgnet_ti', num_classes=3, img_size=96, drop_path=0.1); "
        "print('timm' in sys.modules)"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stderr == "", done.stderr
    assert done.stdout.strip() == "False"


def test_node_linear_layers_stay_nn_linear_modules():
    """The projections of the blocks are ``nn.Linear`` modules (``NodeLinear``,
    whose map goes through ``grouped_linear``): ``isinstance`` finds them, their
    forward hooks run in training, and their output is ``F.linear``'s."""
    torch.manual_seed(0)
    model = gkg_pyg.create_model("gkgnet_ti", num_classes=5, img_size=128).train()
    linear = model.stages[0].blocks[0]["ffn"].fc1[0]
    assert isinstance(linear, torch.nn.Linear) and type(linear).__name__ == "NodeLinear"
    seen = []
    linear.register_forward_hook(lambda module, args, out: seen.append(out.shape))
    model(torch.randn(2, 3, 128, 128))
    assert seen, "the forward hook of a block's NodeLinear did not run"
    x = torch.randn(4096, linear.in_features)
    torch.testing.assert_close(linear(x), torch.nn.functional.linear(x, linear.weight, linear.bias))


@pytest.mark.parametrize("blocks", [1, 2, 12, 22, 24, 31])
def test_drop_path_rates_are_torch_linspaces_values(blocks):
    """The per-block rates, computed without tensors, are the values of
    ``torch.linspace(0, rate, blocks).tolist()`` (float32 steps) for the depths
    of the four variants (12, 22, 24 blocks) and others."""
    from gkg_pyg.models.layers import drop_path_rates

    gen = torch.Generator().manual_seed(blocks)
    for rate in [0.0, 0.1, 0.2, 0.3, 0.5, 1.0, *torch.rand(200, generator=gen, dtype=torch.float64).tolist()]:
        assert drop_path_rates(rate, blocks) == torch.linspace(0, rate, blocks).tolist(), rate


# On CUDA "auto" is torch-cluster's kNN where installed; test_fake_cuda.py's quick cases take fake CUDA tensors.
@pytest.mark.slow
@pytest.mark.parametrize("backend", ["auto", "dense"])
@pytest.mark.parametrize("name", ["gkgnet_ti", "pvig_ti"])
def test_models_build_and_run_on_fake_cuda_tensors(name, backend):
    """Building a model and its forward pass read no tensor value (no ``.item()``,
    ``.tolist()``), so both run on fake tensors: the model built inside
    ``FakeTensorMode`` on a fake ``cuda`` device (``Module.to`` cannot move
    parameters made under the mode), its position tables built there with it;
    on a machine with a GPU also the backward pass."""
    from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode

    with FakeTensorMode(allow_non_fake_inputs=False), torch.device("cuda"):
        model = gkg_pyg.create_model(name, num_classes=5, img_size=96, knn_backend=backend, drop_path=0.1).train()
        logits = model(torch.randn(2, 3, 96, 96))
        if torch.cuda.is_available():  # autograd's engine needs the device itself, even for fake tensors
            logits.sum().backward()
        model.eval()
        with torch.no_grad():
            evaluated = model(torch.randn(2, 3, 112, 96))  # another size: resampled tables
    for out in (logits, evaluated):
        assert isinstance(out, FakeTensor) and out.shape == (2, 5) and out.device.type == "cuda"
    position = model.stages[0].position  # the dense kNN's table, torch-cluster's factors
    for term, dtype in ((position.relative_pos, torch.float32), (position.factor_u, torch.float64)):
        assert isinstance(term, FakeTensor) and term.device.type == "cuda" and term.dtype == dtype
    if torch.cuda.is_available():
        assert all(p.grad is not None and p.grad.device.type == "cuda" for p in model.stages[0].parameters())


def test_image_convolutions_keep_channels_last_weights():
    """The stem's and the downsampling's 3x3 convolutions store their weights
    (and so receive their gradients) in the channels-last layout of the images
    they see, so that a training step copies neither; the state dict holds the
    parameters themselves (as ``nn.Conv2d``'s does), and loading one, saved
    contiguous or not, keeps the layout."""
    channels_last = torch.channels_last
    torch.manual_seed(0)
    model = gkg_pyg.create_model("pvig_ti", num_classes=5, img_size=96).train()
    convs = [model.stem.convs[0], model.stem.convs[3], model.stem.convs[6]]
    convs += [stage.downsample[0] for stage in model.stages if stage.downsample is not None]
    assert len(convs) == 6
    model(torch.randn(2, 3, 96, 96)).sum().backward()
    state = model.state_dict()
    for conv in convs:
        assert conv.weight.is_contiguous(memory_format=channels_last) and not conv.weight.is_contiguous()
        assert conv.weight.grad.stride() == conv.weight.stride()
    names = {id(m): n for n, m in model.named_modules()}
    for conv in convs:
        assert state[names[id(conv)] + ".weight"].data_ptr() == conv.weight.data_ptr()
    other = gkg_pyg.create_model("pvig_ti", num_classes=5, img_size=96)
    other.load_state_dict({k: v.contiguous() for k, v in state.items()})
    assert all(torch.equal(a, b) for a, b in zip(other.state_dict().values(), state.values()))
    assert other.stem.convs[0].weight.is_contiguous(memory_format=channels_last)


@pytest.mark.parametrize("name", ["gkgnet_ti", "pvig_ti"])
def test_models_run_on_the_meta_device(name):
    """A model built under ``torch.device("meta")`` runs forward and backward there
    (shapes without memory, as for sizing a model before loading weights): the
    fused FFN asked meta tensors for their autocast state, which raised ``unknown
    device type for autocast``."""
    with torch.device("meta"):
        model = gkg_pyg.create_model(name, num_classes=5, img_size=96).train()
    logits = model(torch.randn(2, 3, 96, 96, device="meta"))
    assert logits.shape == (2, 5) and logits.device.type == "meta"
    logits.sum().backward()
    assert all(p.grad is not None and p.grad.is_meta for p in model.stages[0].parameters())
    with torch.no_grad():
        assert model.eval()(torch.randn(1, 3, 112, 96, device="meta")).shape == (1, 5)


@pytest.mark.slow  # compiles
def test_compiled_training_batch_norms_are_atens_as_one_operator():
    """In compiled training every BatchNorm of the patch path (images and node
    features) is the operator ``gkg_pyg::batch_norm`` and its backward
    ``gkg_pyg::batch_norm_backward``: outputs, gradients, running statistics
    and batch counts equal eager code's bit for bit; evaluation keeps the modules."""
    from torch.profiler import profile

    from gkg_pyg.models.layers import ImageBatchNorm, NodeBatchNorm, to_nodes

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.image_bn, self.node_bn = ImageBatchNorm(4), NodeBatchNorm(4)

        def forward(self, x):
            return self.node_bn(to_nodes(self.image_bn(x)))

    torch.manual_seed(0)
    eager = Net()
    with torch.no_grad():
        for p in eager.parameters():
            p.uniform_(0.5, 1.5)
    twin = copy.deepcopy(eager)
    compiled = torch.compile(twin, backend="aot_eager", fullgraph=True)
    x, weight = torch.randn(3, 4, 5, 6), torch.randn(3, 30, 4)
    for _ in range(2):
        with profile() as prof:
            (compiled(x) * weight).sum().backward()
        (eager(x) * weight).sum().backward()
        assert {"gkg_pyg::batch_norm", "gkg_pyg::batch_norm_backward"} <= {e.name for e in prof.events()}
    for (name, a), b in zip(eager.state_dict().items(), twin.state_dict().values()):
        assert torch.equal(a, b), name
    for a, b in zip(eager.parameters(), twin.parameters()):
        assert torch.equal(a.grad, b.grad)
    eager.eval(), twin.eval()
    with torch.no_grad(), profile() as prof:
        out = compiled(x)
    assert "gkg_pyg::batch_norm" not in {e.name for e in prof.events()}
    torch.testing.assert_close(out, eager(x), rtol=0, atol=0)


def test_batch_norm_operator_only_in_compiled_cpu_training(monkeypatch):
    """The operator replaces a BatchNorm only where the compiler's own is slow: compiled
    code on the CPU, with batch statistics (not eager code, evaluation, export, a GPU)."""
    from gkg_pyg.ops.norm import opaque_batch_norm

    bn = torch.nn.BatchNorm1d(4)
    assert not opaque_batch_norm(bn)  # eager code
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    assert opaque_batch_norm(bn) and opaque_batch_norm(torch.nn.BatchNorm1d(4, track_running_stats=False).eval())
    assert not opaque_batch_norm(bn.eval()) and not opaque_batch_norm(torch.nn.BatchNorm1d(4).to("meta"))
    assert not opaque_batch_norm(torch.nn.BatchNorm1d(4, affine=False))
    assert not opaque_batch_norm(torch.nn.BatchNorm1d(4, momentum=None))
    monkeypatch.setattr(torch.compiler, "is_exporting", lambda: True)
    assert not opaque_batch_norm(torch.nn.BatchNorm1d(4))


def test_position_terms_are_rebuilt_not_cast_twice():
    """Changing the model's dtype recomputes the position terms: float32 table
    values in any dtype, float64 factors, also after a trip through half
    precision or off the meta device."""
    from gkg_pyg.models.positions import relative_position_factors, relative_position_table

    model = gkg_pyg.create_model("gkgnet_ti", num_classes=5, img_size=96)
    position = model.stages[0].position
    table = relative_position_table(position.grid, position.channels, position.pool)
    u, _ = relative_position_factors(position.grid, position.channels, position.pool)
    model.half().float()
    assert torch.equal(position.relative_pos, table) and torch.equal(position.factor_u, u)
    model.double()
    assert torch.equal(position.relative_pos, table.double()) and position.factor_u.dtype == torch.float64
    with torch.device("meta"):
        meta = gkg_pyg.create_model("gkgnet_ti", num_classes=5, img_size=96)
    meta.to_empty(device="cpu")
    assert torch.equal(meta.stages[0].position.relative_pos, table)


@pytest.mark.slow
@pytest.mark.parametrize("name, size", [("gkgnet_s", (192, 256)), ("pvig_s", (224, 224))])
def test_forward_compiles_without_graph_breaks(name, size):
    """``torch._dynamo.explain`` of an evaluation forward pass (CPU, built for
    224 px, batch 2, dense kNN): one graph, no break; GKGNet at another size than
    its construction size (the resampled position tables; Pyramid ViG's stages are
    the same modules). At the construction size, test_train.test_compile_flag
    counts exactly one graph per mode over a compiled run's training steps and
    evaluation: no break, and no second trace after the first call."""
    torch.manual_seed(0)
    model = gkg_pyg.create_model(name, num_classes=80, img_size=224, knn_backend="dense").eval()
    torch._dynamo.reset()
    with torch.no_grad():
        explanation = torch._dynamo.explain(model)(torch.randn(2, 3, *size))
    reasons = [str(b.reason) for b in explanation.break_reasons]
    assert explanation.graph_break_count == 0, reasons
    assert explanation.graph_count == 1, explanation.graph_count


@pytest.mark.parametrize("train", [False, True])
def test_torch_func_gradients_are_autograds(train):
    """torch.func.grad through the whole model (input saliency in evaluation; in training
    the parameters' gradients with the buffers passed in, as torch.func wants a BatchNorm's):
    the operators' callers take their plain PyTorch paths there, with autograd's gradients
    to float32 rounding and the running statistics updated alike."""
    torch.manual_seed(0)
    model = gkg_pyg.create_model("gkgnet_ti", num_classes=5, img_size=96, drop_path=0.0).train(train)
    images = torch.randn(2, 3, 96, 96)
    params = {name: p.detach() for name, p in model.named_parameters()}
    buffers = {name: b.clone() for name, b in model.named_buffers()}

    def loss(params, buffers, images):
        return torch.func.functional_call(model, (params, buffers), (images,)).square().sum()

    got_params, got_images = torch.func.grad(loss, argnums=(0, 2))(params, buffers, images)
    leaf = images.clone().requires_grad_(True)
    model(leaf).square().sum().backward()
    scale = lambda t: 1e-4 * t.abs().max().item()  # noqa: E731
    torch.testing.assert_close(got_images, leaf.grad, rtol=1e-4, atol=scale(leaf.grad))
    largest = max(p.grad.abs().max().item() for p in model.parameters())
    for name, p in model.named_parameters():  # biases before a BatchNorm: rounding noise around 0
        torch.testing.assert_close(got_params[name], p.grad, rtol=1e-3, atol=1e-5 * largest, msg=name)
    for name, b in model.named_buffers():
        torch.testing.assert_close(buffers[name], b, msg=name)
