"""Per-class and global F1-optimal thresholds: against brute force over
every candidate threshold, metrics at per-class thresholds against
multilabel_metrics, and storage in a checkpoint (weights_only, atomic)."""

from __future__ import annotations

import math
import os

import numpy as np
import pytest
import torch

from gkg_pyg.errors import CheckpointError
from gkg_pyg.metrics import multilabel_metrics
from gkg_pyg.thresholds import (
    MIN_POSITIVES, best_f1_threshold, choose_thresholds, describe_thresholds, fallback_classes,
    metrics_at_thresholds, read_thresholds, store_thresholds, thresholds_json,
)  # fmt: skip


def _f1(scores, positives, t) -> float:
    pred = scores >= t
    tp = int((pred & positives).sum())
    denominator = int(pred.sum()) + int(positives.sum())
    return 2.0 * tp / denominator if denominator else 0.0


def _brute_best_f1(scores, positives) -> float:
    candidates = np.r_[np.unique(scores), np.inf]
    return max(_f1(scores, positives, t) for t in candidates)


@pytest.mark.parametrize("seed", range(30))
def test_best_f1_threshold_brute_force(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(1, 60))
    # Coarse scores make ties frequent.
    scores = np.round(rng.random(n), int(rng.integers(1, 3)))
    positives = rng.random(n) < rng.uniform(0.05, 0.7)
    t, f1 = best_f1_threshold(scores, positives)
    if not positives.any():
        assert math.isnan(t) and math.isnan(f1)
        return
    best = _brute_best_f1(scores, positives)
    assert f1 == pytest.approx(best, abs=1e-12)
    assert _f1(scores, positives, t) == pytest.approx(best, abs=1e-12)  # the threshold achieves it
    # Not on a score unless every score is predicted; and the highest among the optimal cuts.
    lower = scores[scores < t]
    if lower.size:
        assert t not in set(scores.tolist())
        assert t == pytest.approx(0.5 * (lower.max() + scores[scores >= t].min()))
    higher = np.unique(scores[scores > t])
    assert all(_f1(scores, positives, h) < best - 1e-12 for h in higher if h > scores[scores >= t].min())


def test_best_f1_threshold_hand_case():
    scores = np.array([0.9, 0.8, 0.7, 0.3, 0.2])
    positives = np.array([True, False, True, False, False])
    # cuts: top1 F1 = 2/3, top2 = 1/2, top3 = 4/5, top4 = 2/3, top5 = 4/7
    t, f1 = best_f1_threshold(scores, positives)
    assert f1 == pytest.approx(0.8) and t == pytest.approx(0.5)


def test_choose_thresholds_per_class_and_global():
    rng = np.random.default_rng(7)
    targets = (rng.random((80, 5)) < 0.3).astype(float)
    scores = np.clip(0.35 * targets + rng.random((80, 5)) * 0.7, 0, 1)
    targets[:, 4] = 0  # a class without positives keeps the global threshold
    targets[3, 0] = -1  # ignored entries
    targets[10, 1] = -1
    rec = choose_thresholds(scores, targets, [f"c{i}" for i in range(5)], chosen_on="test")
    valid = targets != -1
    for c in range(4):
        keep = valid[:, c]
        best = _brute_best_f1(scores[keep, c], targets[keep, c] == 1)
        assert rec["f1_per_class"][c].item() == pytest.approx(best)
        assert _f1(scores[keep, c], targets[keep, c] == 1, rec["per_class"][c].item()) == pytest.approx(best)
    assert math.isnan(rec["f1_per_class"][4].item()) and rec["per_class"][4].item() == rec["global"]
    pooled_best = _brute_best_f1(scores[valid], targets[valid] == 1)
    assert rec["global_f1"] == pytest.approx(pooled_best)
    # The global threshold maximises OF1 as multilabel_metrics computes it.
    of1 = multilabel_metrics(scores, targets, rec["global"])["OF1"]
    assert of1 == pytest.approx(100 * pooled_best)
    for t in np.unique(scores):
        assert multilabel_metrics(scores, targets, float(t))["OF1"] <= of1 + 1e-9
    assert rec["class_names"] == ["c0", "c1", "c2", "c3", "c4"] and rec["num_images"] == 80
    with pytest.raises(ValueError, match="no positive"):
        choose_thresholds(scores, np.zeros_like(targets))


def test_metrics_at_thresholds_match_multilabel_metrics():
    rng = np.random.default_rng(3)
    targets = (rng.random((50, 6)) < 0.3).astype(float)
    targets[0, 0] = -1
    scores = rng.random((50, 6))
    for t in (0.2, 0.5, 0.77):
        ours = metrics_at_thresholds(scores, targets, t)
        ref = multilabel_metrics(scores, targets, t)
        for key, value in ours.items():
            assert value == pytest.approx(ref[key]), key
    # Per-class thresholds equal the single-threshold metrics of shifted scores
    # (CP..OF1; the top-3 variants rank the original scores).
    per_class = rng.uniform(0.2, 0.8, 6)
    ours = metrics_at_thresholds(scores, targets, per_class)
    shifted = multilabel_metrics(scores - per_class + 0.5, targets, 0.5)
    for key in ("CP", "CR", "CF1", "OP", "OR", "OF1"):
        assert ours[key] == pytest.approx(shifted[key]), key
    # Hand check of OP / OR.
    pred = scores >= per_class
    pos, neg = targets == 1, targets == 0
    tp, fp, fn = (pred & pos).sum(), (pred & neg).sum(), (~pred & pos).sum()
    assert ours["OP"] == pytest.approx(100 * tp / (tp + fp)) and ours["OR"] == pytest.approx(100 * tp / (tp + fn))


def test_store_and_read_thresholds(tmp_path):
    path = tmp_path / "ckpt.pth"
    weights = {"w": torch.randn(3, 2)}
    torch.save({"model": weights, "class_names": ["a", "b", "c"]}, path)
    best = tmp_path / "best.pth"
    os.link(path, best)  # like a run's checkpoint_best.pth
    rng = np.random.default_rng(0)
    rec = choose_thresholds(rng.random((20, 3)), (rng.random((20, 3)) < 0.4).astype(float), ["a", "b", "c"])
    store_thresholds(best, {"model": rec})
    loaded = torch.load(best, weights_only=True)
    assert torch.equal(loaded["model"]["w"], weights["w"]) and loaded["class_names"] == ["a", "b", "c"]
    got = read_thresholds(loaded, "model", ["a", "b", "c"])
    assert torch.equal(got["per_class"], rec["per_class"]) and got["global"] == rec["global"]
    assert read_thresholds(loaded, "ema") is None
    assert "thresholds" not in torch.load(path, weights_only=True)  # the linked file kept its content
    assert not list(tmp_path.glob(".*tmp"))
    # A second record is added beside the first.
    store_thresholds(best, {"ema": rec})
    assert set(torch.load(best, weights_only=True)["thresholds"]) == {"model", "ema"}
    # Into another file, leaving the original alone.
    copy = store_thresholds(path, {"model": rec}, output=tmp_path / "with_thresholds.pth")
    assert "thresholds" in torch.load(copy, weights_only=True)
    assert "thresholds" not in torch.load(path, weights_only=True)
    with pytest.raises(ValueError, match="other class names"):
        read_thresholds(loaded, "model", ["x", "y", "z"])


def test_store_refuses_pickled_objects(tmp_path):
    path = tmp_path / "pickled.pth"
    torch.save({"model": {}, "extra": np.dtype("float32")}, path)
    with pytest.raises(ValueError, match="weights_only"):
        store_thresholds(path, {"model": {"per_class": torch.zeros(1), "global": 0.5}})


def test_classes_with_few_positives_keep_the_global_threshold(caplog):
    """A class gets its own threshold only with min_positives positives on the calibration split.

    Class 1 has one positive with a low score: its own F1-optimal threshold would sit just below
    that score and predict the class on most images; it keeps the global threshold instead.
    """
    rng = np.random.default_rng(11)
    n = 300
    targets = np.zeros((n, 5))
    targets[:60, 0] = 1  # 60 positives: its own threshold
    targets[7, 1] = 1  # 1 positive
    targets[100:109, 2] = 1  # 9 positives: one short of the default floor
    targets[200:210, 3] = 1  # exactly 10: its own
    targets[rng.random(n) < 0.2, 4] = 1
    scores = np.clip(0.3 * targets + rng.random((n, 5)) * 0.7, 0, 1)
    scores[7, 1] = 0.02  # the lone positive scores low
    names = ["often", "once", "nine", "ten", "other"]
    with caplog.at_level("WARNING", logger="gkg_pyg"):
        rec = choose_thresholds(scores, targets, names)
    assert rec["min_positives"] == MIN_POSITIVES == 10
    assert rec["num_positives"].tolist() == [60, 1, 9, 10, int(targets[:, 4].sum())]
    for c in (0, 3, 4):  # their own F1-optimal thresholds, as brute force finds them
        best = _brute_best_f1(scores[:, c], targets[:, c] == 1)
        assert _f1(scores[:, c], targets[:, c] == 1, rec["per_class"][c].item()) == pytest.approx(best)
        assert rec["per_class"][c].item() != rec["global"]
    for c in (1, 2):  # the global threshold, and the F1 they get there
        assert rec["per_class"][c].item() == rec["global"]
        assert rec["f1_per_class"][c].item() == pytest.approx(_f1(scores[:, c], targets[:, c] == 1, rec["global"]))
    assert fallback_classes(rec) == [(1, "once"), (2, "nine")]
    # The warning names the classes, their positives and the option.
    (warning,) = [r for r in caplog.records if r.name.startswith("gkg_pyg")]
    assert warning.levelname == "WARNING"
    assert "2 of the 5 classes" in warning.message and "once (1), nine (9)" in warning.message
    assert "eval.min_positives" in warning.message
    assert "2 with fewer than 10 positives" in describe_thresholds(rec)
    as_json = thresholds_json(rec)["per_class"]
    assert as_json["once"]["positives"] == 1 and as_json["once"]["own"] is False and as_json["ten"]["own"] is True

    # Without the floor the lone positive drags its threshold below 0.02: the class would flood predictions.
    caplog.clear()
    loose = choose_thresholds(scores, targets, names, min_positives=1)
    assert loose["per_class"][1].item() < 0.02 and (scores[:, 1] >= loose["per_class"][1].item()).mean() > 0.9
    assert fallback_classes(loose) == [] and not caplog.records
    with pytest.raises(ValueError, match="min_positives"):
        choose_thresholds(scores, targets, names, min_positives=0)


def test_read_thresholds_refuses_values_outside_0_1():
    rec = {"per_class": torch.tensor([0.3, 1.5]), "global": 0.4, "class_names": ["a", "b"]}
    with pytest.raises(CheckpointError, match=r"must lie in \[0, 1\]"):
        read_thresholds({"thresholds": {"model": rec}}, "model", ["a", "b"])
    old = {"per_class": torch.tensor([0.3, 0.5]), "global": 0.4, "class_names": ["a", "b"]}  # stored before the floor
    assert fallback_classes(old) == [] and "stored without a floor" in describe_thresholds(old)
