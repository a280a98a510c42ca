"""Tests of gkg_pyg.loss against torch's BCE and a per-element loop of the ASL formula."""

import math

import pytest
import torch
import torch.nn.functional as F

from gkg_pyg.loss import GKGNetLoss, asymmetric_loss, smoothed_bce_loss


def random_batch(seed, b=6, num_classes=5, with_ignored=True):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(b, num_classes, generator=g) * 3
    targets = torch.randint(0, 2, (b, num_classes), generator=g)
    if with_ignored:
        targets[0, 0] = -1
        targets[3, 2] = -1
    return logits, targets


def asl_loop(logits, targets, gamma_pos, gamma_neg, clip, eps):
    """The mmcls asymmetric loss, one element at a time, in float64 Python."""
    total = 0.0
    b, num_classes = logits.shape
    for i in range(b):
        for j in range(num_classes):
            p = 1.0 / (1.0 + math.exp(-float(logits[i, j])))
            if targets[i, j] != 0:
                pt, gamma = p, gamma_pos
            else:
                pt, gamma = min(1.0 - p + clip, 1.0), gamma_neg
            total += -((1.0 - pt) ** gamma) * math.log(max(pt, eps))
    return total / b


def test_bce_part_matches_torch():
    logits, targets = random_batch(0)
    soft = torch.where(targets != 0, 0.9, 0.1)
    expected = F.binary_cross_entropy_with_logits(logits, soft, reduction="sum") / logits.shape[0]
    loss = GKGNetLoss(bce_weight=1.0, asl_weight=0.0)(logits, targets)
    torch.testing.assert_close(loss, expected)
    # and against the formula itself
    p = torch.sigmoid(logits.double())
    by_hand = -(soft * p.log() + (1 - soft) * (1 - p).log()).sum() / logits.shape[0]
    torch.testing.assert_close(smoothed_bce_loss(logits, targets).double(), by_hand, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("gamma_pos,gamma_neg,clip", [(0.0, 2.0, 0.05), (1.0, 4.0, 0.05), (0.5, 3.0, 0.0)])
def test_asl_part_matches_loop(gamma_pos, gamma_neg, clip):
    logits, targets = random_batch(1)
    expected = asl_loop(logits, targets, gamma_pos, gamma_neg, clip, 1e-8)
    got = asymmetric_loss(logits, targets, gamma_pos, gamma_neg, clip, 1e-8)
    assert got.item() == pytest.approx(expected, rel=1e-5)
    module = GKGNetLoss(bce_weight=0.0, asl_weight=1.0, gamma_pos=gamma_pos, gamma_neg=gamma_neg, clip=clip)
    assert module(logits, targets).item() == pytest.approx(expected, rel=1e-5)


def test_eps_clamp_matches_loop():
    logits = torch.tensor([[-30.0, 30.0], [25.0, -25.0]])
    targets = torch.tensor([[1, 0], [0, 1]])
    expected = asl_loop(logits, targets, 0.0, 2.0, 0.0, 1e-8)
    assert asymmetric_loss(logits, targets, 0.0, 2.0, 0.0, 1e-8).item() == pytest.approx(expected, rel=1e-5)


def test_asl_without_focusing_and_clip_is_bce():
    logits, targets = random_batch(2, with_ignored=False)
    expected = F.binary_cross_entropy_with_logits(logits, targets.float(), reduction="sum") / logits.shape[0]
    got = asymmetric_loss(logits, targets, gamma_pos=0.0, gamma_neg=0.0, clip=0.0)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


def test_default_total_is_bce_plus_ten_asl():
    logits, targets = random_batch(3)
    loss_fn = GKGNetLoss()
    expected = smoothed_bce_loss(logits, targets, 0.1) + 10.0 * asymmetric_loss(logits, targets, 0.0, 2.0, 0.05, 1e-8)
    torch.testing.assert_close(loss_fn(logits, targets), expected)
    parts = loss_fn.parts(logits, targets)
    torch.testing.assert_close(parts["bce"] + parts["asl"], expected)


def test_ignored_targets_are_positives():
    logits, targets = random_batch(4)
    assert (targets == -1).any()
    loss_fn = GKGNetLoss()
    torch.testing.assert_close(loss_fn(logits, targets), loss_fn(logits, targets.abs()))
    assert not torch.allclose(loss_fn(logits, targets), loss_fn(logits, targets.clamp(min=0)))


def test_focusing_weight_keeps_gradient():
    logits, targets = random_batch(5)
    logits = logits.double().requires_grad_()
    assert torch.autograd.gradcheck(lambda x: asymmetric_loss(x, targets, 1.0, 4.0, 0.05, 1e-8), (logits,))


@pytest.mark.parametrize("value", [50.0, -50.0])
def test_gradient_finite_for_extreme_logits(value):
    targets = torch.tensor([[1, 0, -1, 1], [0, 0, 1, -1]])
    for clip in (0.05, 0.0):
        logits = torch.full((2, 4), value, requires_grad=True)
        loss = GKGNetLoss(clip=clip)(logits, targets)
        loss.backward()
        assert torch.isfinite(loss)
        assert torch.isfinite(logits.grad).all()


def test_bf16_autocast_computes_in_float32():
    logits, targets = random_batch(6)
    loss_fn = GKGNetLoss()
    reference = loss_fn(logits.bfloat16().float(), targets)
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        x = logits.bfloat16().requires_grad_()
        loss = loss_fn(x, targets)
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, reference)
    loss.backward()
    assert x.grad.dtype == torch.bfloat16 and torch.isfinite(x.grad.float()).all()


def test_bad_inputs():
    logits, targets = random_batch(7)
    loss_fn = GKGNetLoss()
    with pytest.raises(ValueError, match="shape"):
        loss_fn(logits, targets[:, :3])
    bad = targets.clone()
    bad[1, 1] = 2
    with pytest.raises(ValueError, match="1, 0 or -1"):
        loss_fn(logits, bad)
    with pytest.raises(ValueError, match="label_smoothing"):
        GKGNetLoss(label_smoothing=0.7)
