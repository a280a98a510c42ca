"""GKGNet starts from the authors' initialisation: per-layer distribution
statistics against the independent reference (tests/reference_gkgnet.py),
which follows the authors' mmcls code, and against the closed forms."""

from __future__ import annotations

import math

import pytest
import torch

import gkg_pyg
from gkg_pyg.models.convert import authors_key_map

from reference_gkgnet import ReferenceGKGNet

# Two independent draws of the same distribution differ in std by a few per
# cent for the smallest tensor here (648 values); PyTorch's default Linear
# initialisation is sqrt(6) = 2.45 times smaller than kaiming-normal, so a
# bound of 1.25 separates the two by far.
RATIO = 1.25


def models(cross_level=True, seed=0):
    torch.manual_seed(seed)
    ours = gkg_pyg.create_model("gkgnet_ti", num_classes=20, img_size=128, k=5, cross_level=cross_level)
    torch.manual_seed(seed + 1)
    ref = ReferenceGKGNet("ti", num_classes=20, img_size=128, k=5, cross_level=cross_level)
    return ours, ref


def expected_std(key: str, tensor: torch.Tensor) -> float | None:
    """The closed form of the authors' initialisation for our key (None: PyTorch's default)."""
    if key.startswith("label_projs."):
        return None  # nn.Linear in their code too: PyTorch's default, checked against the reference only
    if key == "label_embed.weight":
        return 1.0
    if key.startswith(("head_label.", "head_patch.")):
        return 0.01
    fan_in = tensor[0].numel()
    return math.sqrt(2.0 / fan_in)  # kaiming_normal_, fan-in, gain sqrt(2)


@pytest.mark.parametrize("cross_level", [True, False])
def test_per_layer_statistics_match_the_authors(cross_level):
    ours, ref = models(cross_level)
    theirs = ref.state_dict()
    params = dict(ours.named_parameters())
    checked = 0
    for key, (their_key, _) in authors_key_map(ours).items():
        if key not in params:
            continue
        a, b = params[key].detach(), theirs[their_key].reshape(params[key].shape)
        is_norm = a.dim() == 1 and key.rsplit(".", 1)[0] + ".running_mean" in ours.state_dict()
        if is_norm or key == "pos_embed":
            assert torch.equal(a, b), key  # BatchNorm ones/zeros, zero position embedding
            continue
        if key.endswith(".bias"):
            if key.startswith("label_projs."):  # PyTorch's default: uniform, nonzero
                assert a.abs().max() > 0 and b.abs().max() > 0, key
            else:
                assert torch.count_nonzero(a) == 0 and torch.count_nonzero(b) == 0, key
            continue
        ratio = (a.std() / b.std()).item()
        assert 1 / RATIO < ratio < RATIO, f"{key}: std {a.std():.4g} vs the reference's {b.std():.4g}"
        assert abs(a.mean().item()) < 5 * a.std().item() / math.sqrt(a.numel()), key
        want = expected_std(key, a)
        if want is not None:
            assert 1 / RATIO < a.std().item() / want < RATIO, f"{key}: std {a.std():.4g}, expected {want:.4g}"
        checked += 1
    assert checked >= 40


def test_the_bound_separates_pytorch_defaults():
    """The bound would catch PyTorch's default Linear initialisation where kaiming-normal belongs."""
    torch.manual_seed(0)
    default = torch.nn.Linear(96, 96).weight.std().item()
    assert math.sqrt(2 / 96) / default > 1.5 * RATIO  # 2.45


def test_reset_classifier_initialises_like_the_constructor():
    torch.manual_seed(0)
    model = gkg_pyg.create_model("gkgnet_ti", num_classes=20, img_size=65, class_names=[f"c{i}" for i in range(20)])
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model.reset_classifier(7, list("abcdefg"))
    assert model.num_classes == 7 and model.class_names == list("abcdefg")
    assert model.label_embed.weight.shape == (7, 48) and model.head_patch.weight.shape == (7, 384)
    assert 0.7 < model.label_embed.weight.std().item() < 1.3
    assert 0.007 < model.head_label.weight.std().item() < 0.013 and not model.head_label.bias.any()
    for key, value in model.state_dict().items():
        if not key.startswith(("label_embed.", "head_")):
            assert torch.equal(value, before[key]), key
    assert model(torch.randn(2, 3, 65, 65)).shape == (2, 7)
    with pytest.raises(ValueError, match="3 class names for 4 classes"):
        model.reset_classifier(4, ["a", "b", "c"])


@pytest.mark.parametrize("name, default_draws", [("gkgnet_ti", 3), ("pvig_ti", 0)])
def test_create_model_sets_every_value_once(name, default_draws, monkeypatch):
    """``create_model`` builds on the meta device and initialises once: with uninitialised memory
    filled with NaN nothing is left unset, the constant parameters and every buffer are those of
    the class's own construction, the drawn ones follow the same distributions, and PyTorch's
    default initialisation runs only where the authors keep it (GKGNet's three label projections)."""
    kaiming_uniform = torch.nn.init.kaiming_uniform_
    draws = []

    def counted(tensor, *args, **kwargs):
        if not tensor.is_meta:  # on the meta device nothing is drawn
            draws.append(tensor.shape)
        return kaiming_uniform(tensor, *args, **kwargs)

    monkeypatch.setattr(torch.nn.init, "kaiming_uniform_", counted)
    deterministic, fill = (
        torch.are_deterministic_algorithms_enabled(),
        torch.utils.deterministic.fill_uninitialized_memory,
    )
    torch.use_deterministic_algorithms(True)
    torch.utils.deterministic.fill_uninitialized_memory = True  # torch.empty gives NaN
    try:
        model = gkg_pyg.create_model(name, num_classes=20, img_size=96)
    finally:
        torch.use_deterministic_algorithms(deterministic)
        torch.utils.deterministic.fill_uninitialized_memory = fill
    assert len(draws) == default_draws
    cls = type(model)
    direct = cls(variant="ti", num_classes=20, img_size=96)
    ours = dict(model.named_parameters()) | dict(model.named_buffers())
    theirs = dict(direct.named_parameters()) | dict(direct.named_buffers())
    assert ours.keys() == theirs.keys()
    buffers = dict(direct.named_buffers())
    drawn = 0
    for key, value in ours.items():
        want = theirs[key]
        assert (value.shape, value.dtype, value.stride()) == (want.shape, want.dtype, want.stride()), key
        assert not value.is_floating_point() or torch.isfinite(value).all(), f"{key} was left unset"
        if key in buffers or bool((want == want.flatten()[0]).all()):  # a buffer or a constant
            assert torch.equal(value, want), key
        else:
            assert 1 / RATIO < (value.std() / want.std()).item() < RATIO, key
            drawn += 1
    assert drawn > 50
