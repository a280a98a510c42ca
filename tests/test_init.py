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
