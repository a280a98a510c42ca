"""Pyramid ViG (gkg_pyg.models.pvig) against the published numbers and against
an independent dense Pyramid ViG built from tests/reference_gkgnet.py, whose
state dict is the authors' Pyramid ViG layout (``stem.*``, ``pos_embed``,
``backbone.{j}.*``, ``prediction.*``)."""

import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

import gkg_pyg
from gkg_pyg.models.pvig import PyramidViG
from reference_gkgnet import VARIANTS, Backbone


class ReferencePyramidViG(Backbone):
    """The reference's dense patch path (no label path) + Pyramid ViG's head,
    written as the authors write it: 1x1 convs and BatchNorm2d on a 1x1 map."""

    def __init__(self, variant, num_classes, img_size, groups, k=9):
        channels, blocks = VARIANTS[variant]
        super().__init__(
            channels, blocks, num_classes, img_size, k, groups, num_gcn=1, cross_level=False, drop_path_rate=0.0
        )
        self.prediction = nn.Sequential(
            nn.Conv2d(channels[-1], 1024, 1),
            nn.BatchNorm2d(1024),
            nn.GELU(),
            nn.Dropout(0.0),
            nn.Conv2d(1024, num_classes, 1),
        )

    def forward(self, images):
        _, pooled, _ = super().forward(images)
        return self.prediction(pooled[:, :, None, None]).squeeze(-1).squeeze(-1)


def randomized_state(module, seed):
    """Random values for every tensor of ``module`` (BN statistics included)."""
    gen = torch.Generator().manual_seed(seed)
    state = {}
    for key, value in module.state_dict().items():
        if key.endswith("relative_pos") or key.endswith("num_batches_tracked"):
            state[key] = value
        elif key.endswith("running_var"):
            state[key] = torch.rand(value.shape, generator=gen, dtype=value.dtype) + 0.5
        else:
            state[key] = torch.randn(value.shape, generator=gen, dtype=value.dtype) * 0.2
    return state


def count_params(model):
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def test_registry_lists_both_families():
    names = gkg_pyg.list_models()
    for variant in ("ti", "s", "m", "b"):
        assert f"pvig_{variant}" in names and f"gkgnet_{variant}" in names
    assert gkg_pyg.list_models("pvig_*") == ["pvig_b", "pvig_m", "pvig_s", "pvig_ti"]
    model = gkg_pyg.create_model("pvig_ti", num_classes=10, img_size=96)
    assert isinstance(model, PyramidViG) and model.pretrained_cfg["source"] == "pyramid_vig"
    assert model.pretrained_cfg["filename"] == "pvig_ti_78.5.pth.tar"
    with pytest.raises(ValueError, match="did you mean 'pvig_ti'"):
        gkg_pyg.create_model("pvig_tl")


@pytest.mark.parametrize("variant,expected_m", [("ti", 10.7), ("s", 27.3)])
def test_parameters_match_published(variant, expected_m):
    for groups in (1, 2):  # Group KNN adds no parameter
        with torch.device("meta"):  # shapes only
            model = gkg_pyg.create_model(f"pvig_{variant}", num_classes=1000, img_size=224, groups=groups)
        assert round(count_params(model) / 1e6, 1) == expected_m


@pytest.mark.parametrize("variant,expected_gmacs", [("ti", 1.7), ("s", 4.6)])
def test_macs_match_published(variant, expected_gmacs):
    model = gkg_pyg.create_model(f"pvig_{variant}", num_classes=1000, img_size=224).eval()
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(torch.randn(1, 3, 224, 224))
    gmacs = counter.get_total_flops() / 2e9  # measured: 1.700 (Ti), 4.548 (S)
    assert abs(gmacs - expected_gmacs) / expected_gmacs < 0.03, gmacs


def test_head_shape_and_forward():
    model = gkg_pyg.create_model("pvig_ti", num_classes=7, img_size=96, drop_rate=0.3)
    assert [type(m) for m in model.head_patch] == [nn.Linear, nn.BatchNorm1d, nn.GELU, nn.Dropout, nn.Linear]
    assert model.head_patch[0].out_features == 1024 and model.head_patch[3].p == 0.3
    assert not hasattr(model, "label_embed")
    model.eval()
    x = torch.randn(2, 3, 96, 96)
    logits, graphs = model(x, return_graphs=True)
    assert logits.shape == (2, 7) and len(graphs) == 4
    assert model(torch.randn(1, 3, 128, 112)).shape == (1, 7)  # other and non-square sizes
    model.reset_classifier(3)
    assert model(x).shape == (2, 3)
    fresh = gkg_pyg.create_model("pvig_ti", num_classes=1000, img_size=96)  # Pyramid ViG's Kaiming-normal init
    for layer, fan_in in ((fresh.head_patch[4], 1024), (fresh.stages[2].blocks[0]["ffn"].fc1[0], 240)):
        assert abs(layer.weight.std().item() / (2 / fan_in) ** 0.5 - 1) < 0.05 and not layer.bias.any()
    with pytest.raises(ValueError, match="drop_rate"):
        PyramidViG("ti", drop_rate=1.5)
    with pytest.raises(ValueError, match="groups=7 does not divide"):
        PyramidViG("ti", groups=7)


@pytest.mark.slow  # float64 against the reference; test_model.py does so for GKGNet in the quick run
@pytest.mark.parametrize("groups", [1, 2])
def test_authors_layout_loads_completely_and_equals_reference(groups):
    torch.manual_seed(0)
    ref = ReferencePyramidViG("ti", num_classes=10, img_size=192, groups=groups).double()
    ref.load_state_dict(randomized_state(ref, seed=groups))
    state = ref.state_dict()
    assert any(k.startswith("prediction.4.") for k in state) and "stem.convs.0.weight" in state
    ours = gkg_pyg.create_model("pvig_ti", num_classes=10, img_size=192, groups=groups).double()
    report = gkg_pyg.load_checkpoint(ours, {"state_dict": state}, verbose=False)
    assert report["source"] == "pyramid_vig"
    assert report["missing"] == []  # head included
    assert report["skipped"] and all(k.endswith(".relative_pos") for k in report["skipped"])
    assert torch.equal(ours.head_patch[4].weight, state["prediction.4.weight"].flatten(1))
    for mode in ("eval", "train"):
        getattr(ours, mode)(), getattr(ref, mode)()
        for size in [(192, 192), (224, 160)]:
            x = torch.randn(2, 3, *size, dtype=torch.float64)
            a, b = ours(x), ref(x)
            assert a.shape == (2, 10)
            assert (a - b).abs().max() <= 1e-8 * b.abs().max(), (mode, size)


def test_checkpoint_with_other_class_count_is_refused():
    ref = ReferencePyramidViG("ti", num_classes=1000, img_size=192, groups=1)
    ours = gkg_pyg.create_model("pvig_ti", num_classes=10, img_size=192)
    with pytest.raises(ValueError, match="prediction.4.weight"):
        gkg_pyg.load_checkpoint(ours, ref.state_dict(), verbose=False)


def test_gkgnet_still_takes_only_the_patch_path_of_a_pvig_checkpoint():
    ref = ReferencePyramidViG("ti", num_classes=1000, img_size=192, groups=1)
    gkg = gkg_pyg.create_model("gkgnet_ti", num_classes=20, img_size=192)
    report = gkg_pyg.load_checkpoint(gkg, ref.state_dict(), verbose=False)
    assert not any(k.startswith("prediction.") for k in report["used"])
    assert all(k.startswith(("label_", "head_")) for k in report["missing"])


def test_gkgnet_has_a_pyramid_vig_patch_path():
    """GKGNet's patch path is a Pyramid ViG backbone: the same keys in the same
    order (``stem.convs.*``, ``pos_embed``, ``stages.*``) and, with the same
    weights, the same features at every stage; neither model is the other."""
    torch.manual_seed(0)
    pvig = gkg_pyg.create_model("pvig_ti", num_classes=10, img_size=96, groups=2).eval()
    gkg = gkg_pyg.create_model("gkgnet_ti", num_classes=5, img_size=96).eval()
    backbone = [k for k in pvig.state_dict() if not k.startswith("head_patch.")]
    assert backbone == [k for k in gkg.state_dict() if k.startswith(("stem.", "pos_embed", "stages."))]
    assert {k.split(".")[0] for k in gkg.state_dict()} - {"stem", "pos_embed", "stages"} == {
        "label_embed",
        "label_modules",
        "label_projs",
        "head_label",
        "head_patch",
    }
    pvig_state = pvig.state_dict()
    gkg.load_state_dict({k: pvig_state[k] for k in backbone}, strict=False)
    x = torch.randn(2, 3, 96, 112)
    with torch.no_grad():
        ours, theirs = gkg.forward_features(x), pvig.forward_features(x)
    assert [f.shape[1:] for f in ours] == [(24 * 28, 48), (12 * 14, 96), (6 * 7, 240), (3 * 4, 384)]
    assert all(torch.equal(a, b) for a, b in zip(ours, theirs))
    assert not isinstance(gkg, PyramidViG) and not isinstance(pvig, gkg_pyg.GKGNet)
