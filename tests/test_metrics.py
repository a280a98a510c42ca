"""Tests of gkg_pyg.metrics against scikit-learn and hand-computed cases."""

import csv
import math

import numpy as np
import pytest
import torch
from sklearn.metrics import average_precision_score, precision_score, recall_score

from gkg_pyg.metrics import (
    format_metrics_table,
    label_frequency_baseline_scores,
    multilabel_metrics,
    per_class_ap_csv,
)


def random_case(seed, n=300, num_classes=7, ignored=True, ties=False):
    """Random scores/targets with a class without positives (class 2)."""
    rng = np.random.default_rng(seed)
    scores = rng.random((n, num_classes))
    if ties:
        scores = np.round(scores, 1)
    targets = (rng.random((n, num_classes)) < 0.3).astype(float)
    # Make scores informative so APs are not all ~positive rate.
    scores = np.clip(scores + 0.3 * targets, 0, 1.2)
    if ignored:
        targets[rng.random((n, num_classes)) < 0.1] = -1
    targets[:, 2] = np.where(targets[:, 2] == 1, 0, targets[:, 2])
    return scores, targets


def sklearn_ap(scores, targets):
    """Per-class AP on the non-ignored entries; NaN where a class has no positives."""
    out = []
    for c in range(targets.shape[1]):
        valid = targets[:, c] != -1
        y, s = targets[valid, c], scores[valid, c]
        out.append(average_precision_score(y, s) if (y == 1).any() else math.nan)
    return np.array(out)


@pytest.mark.parametrize("ignored", [False, True])
@pytest.mark.parametrize("ties", [False, True])
def test_ap_matches_sklearn(ignored, ties):
    scores, targets = random_case(0, ignored=ignored, ties=ties)
    m = multilabel_metrics(scores, targets)
    expected = sklearn_ap(scores, targets)
    np.testing.assert_allclose(m["AP_per_class"] / 100, expected, rtol=1e-12, equal_nan=True)
    assert math.isnan(m["AP_per_class"][2])
    assert m["classes_without_positives"] == [2]
    assert m["mAP"] == pytest.approx(100 * np.nanmean(expected), rel=1e-12)


def test_precision_recall_match_sklearn():
    scores, targets = random_case(1)
    thr = 0.6
    m = multilabel_metrics(scores, targets, threshold=thr)
    pred = scores >= thr
    per_p, per_r = [], []
    for c in range(targets.shape[1]):
        valid = targets[:, c] != -1
        if not (targets[valid, c] == 1).any():
            continue
        per_p.append(precision_score(targets[valid, c], pred[valid, c], zero_division=0))
        per_r.append(recall_score(targets[valid, c], pred[valid, c]))
    cp, cr = 100 * np.mean(per_p), 100 * np.mean(per_r)
    assert m["CP"] == pytest.approx(cp)
    assert m["CR"] == pytest.approx(cr)
    assert m["CF1"] == pytest.approx(2 * cp * cr / (cp + cr))
    valid = targets != -1
    op = 100 * precision_score(targets[valid], pred[valid])
    orr = 100 * recall_score(targets[valid], pred[valid])
    assert m["OP"] == pytest.approx(op)
    assert m["OR"] == pytest.approx(orr)
    assert m["OF1"] == pytest.approx(2 * op * orr / (op + orr))


def test_class_without_predictions_has_precision_zero():
    scores = np.array([[0.9, 0.1], [0.2, 0.3], [0.8, 0.2]])
    targets = np.array([[1, 1], [0, 0], [1, 0]])
    m = multilabel_metrics(scores, targets)
    # class 0: P 1, R 1; class 1: no predictions -> P 0, R 0.
    assert m["CP"] == pytest.approx(50.0)
    assert m["CR"] == pytest.approx(50.0)
    assert m["OP"] == pytest.approx(100.0)
    assert m["OR"] == pytest.approx(200 / 3)


# Hand case: 5 images, 2 classes. Image 4 holds a "difficult" (-1) label of
# class 0 with the highest score; it must change nothing.
HAND_SCORES = np.array([[0.9, 0.2], [0.8, 0.6], [0.3, 0.7], [0.1, 0.55], [0.95, 0.1]])
HAND_TARGETS = np.array([[1, 0], [0, 1], [1, 0], [0, 1], [-1, 0]])


def test_hand_case():
    m = multilabel_metrics(HAND_SCORES, HAND_TARGETS, class_names=["cat", "dog"])
    # class 0 ranking (ignoring img 4): + - + -  -> AP = (1 + 2/3) / 2 = 5/6
    # class 1 ranking: - + + - -               -> AP = (1/2 + 2/3) / 2 = 7/12
    np.testing.assert_allclose(m["AP_per_class"], [500 / 6, 700 / 12])
    assert m["mAP"] == pytest.approx(100 * 17 / 24)
    # threshold 0.5: class 0 predicts img 0, 1 (tp 1, fp 1, fn 1): P 1/2, R 1/2
    # class 1 predicts img 1, 2, 3 (tp 2, fp 1, fn 0): P 2/3, R 1
    assert m["CP"] == pytest.approx(100 * 7 / 12)
    assert m["CR"] == pytest.approx(75.0)
    assert m["CF1"] == pytest.approx(65.625)
    assert m["OP"] == pytest.approx(60.0)  # 3 tp of 5 predictions
    assert m["OR"] == pytest.approx(75.0)  # 3 tp of 4 positives
    assert m["OF1"] == pytest.approx(2 * 60 * 75 / 135)
    assert m["classes_without_positives"] == []


def test_hand_case_top3():
    scores = np.array([[0.9, 0.8, 0.7, 0.6, 0.4], [0.3, 0.2, 0.95, 0.9, 0.85]])
    targets = np.array([[1, 0, 0, 1, 0], [0, 1, 1, 0, 1]])
    m = multilabel_metrics(scores, targets)
    # top-3 drops class 3 of image 0 (4th highest, though >= 0.5).
    # per class (P, R): c0 (1, 1), c1 (0, 0), c2 (1/2, 1), c3 (0, 0), c4 (1, 1)
    assert m["CP_top3"] == pytest.approx(50.0)
    assert m["CR_top3"] == pytest.approx(60.0)
    assert m["CF1_top3"] == pytest.approx(6000 / 110)
    assert m["OP_top3"] == pytest.approx(50.0)  # 3 tp of 6 predictions
    assert m["OR_top3"] == pytest.approx(60.0)  # 3 tp of 5 positives
    assert m["OF1_top3"] == pytest.approx(6000 / 110)
    # without top-3, class 3 gets (1/2, 1): CP 60, CR 80, OP 4/7, OR 4/5
    assert m["CP"] == pytest.approx(60.0)
    assert m["CR"] == pytest.approx(80.0)
    assert m["OP"] == pytest.approx(400 / 7)
    assert m["OR"] == pytest.approx(80.0)


def test_top3_below_threshold_not_predicted():
    scores = np.array([[0.4, 0.3, 0.2, 0.1]])
    targets = np.array([[1, 1, 0, 0]])
    m = multilabel_metrics(scores, targets)
    assert m["OP_top3"] == 0.0 and m["OR_top3"] == 0.0


def test_hand_case_scales():
    scores = np.array([[0.9, 0.1], [0.8, 0.2], [0.7, 0.3], [0.6, 0.4], [0.5, 0.5]])
    targets = np.array([[1, 0], [0, 0], [1, 1], [1, 0], [0, 0]])
    areas = np.array([[500, 0], [0, 0], [96.0**2, 32.0**2], [20000, np.nan], [0, 0]])
    m = multilabel_metrics(scores, targets, areas=areas)
    # class 0: small {img 0} ranked first -> 1; medium {img 2, 96^2 is medium}
    #   behind negative img 1 -> 1/2; large {img 3} behind img 1 -> 1/2
    # class 1: medium {img 2, 32^2 is medium} behind img 4, 3 -> 1/3; no small/large
    assert m["mAP_small"] == pytest.approx(100.0)
    assert m["mAP_medium"] == pytest.approx(100 * (1 / 2 + 1 / 3) / 2)
    assert m["mAP_large"] == pytest.approx(50.0)


def test_scales_match_sklearn_subsets():
    scores, targets = random_case(2, n=400)
    rng = np.random.default_rng(3)
    areas = np.where(targets == 1, rng.uniform(1, 150**2, targets.shape), 0.0)
    m = multilabel_metrics(scores, targets, areas=areas)
    buckets = {
        "mAP_small": areas < 32**2,
        "mAP_medium": (areas >= 32**2) & (areas <= 96**2),
        "mAP_large": areas > 96**2,
    }
    for key, in_scale in buckets.items():
        aps = []
        for c in range(targets.shape[1]):
            pos = (targets[:, c] == 1) & in_scale[:, c]
            keep = pos | (targets[:, c] == 0)
            if pos.any():
                aps.append(average_precision_score(pos[keep], scores[keep, c]))
        assert m[key] == pytest.approx(100 * np.mean(aps), rel=1e-12), key


def test_label_frequency_baseline_ap_is_positive_rate():
    rng = np.random.default_rng(4)
    train = (rng.random((50, 4)) < [0.1, 0.5, 0.3, 0.8]).astype(float)
    scores = label_frequency_baseline_scores(train, 60)
    assert scores.shape == (60, 4)
    np.testing.assert_allclose(scores[17], train.mean(axis=0))
    test_targets = (rng.random((60, 4)) < 0.4).astype(float)
    m = multilabel_metrics(scores, test_targets)
    # all scores of a class tie: one threshold, AP = positive rate
    rate = test_targets.mean(axis=0)
    np.testing.assert_allclose(m["AP_per_class"], 100 * rate)
    np.testing.assert_allclose(m["AP_per_class"] / 100, sklearn_ap(scores, test_targets))


def test_torch_input_matches_numpy():
    scores, targets = random_case(5)
    m_np = multilabel_metrics(scores, targets)
    m_t = multilabel_metrics(torch.tensor(scores), torch.tensor(targets, dtype=torch.int64))
    for key in ("mAP", "CP", "OF1_top3"):
        assert m_t[key] == m_np[key]


def test_names_for_classes_without_positives():
    scores, targets = random_case(6)
    names = [f"c{i}" for i in range(targets.shape[1])]
    assert multilabel_metrics(scores, targets, class_names=names)["classes_without_positives"] == ["c2"]
    names[2] = "car, red"  # a name with the list's separator is quoted in the printed table
    table = format_metrics_table(multilabel_metrics(scores, targets, class_names=names))
    assert table.splitlines()[-1] == "left out of mAP (no positives): 'car, red'"


def test_bad_inputs():
    scores, targets = random_case(7)
    with pytest.raises(ValueError, match="shape"):
        multilabel_metrics(scores[:, :3], targets)
    bad = targets.copy()
    bad[0, 0] = 2
    with pytest.raises(ValueError, match="1, 0 or -1"):
        multilabel_metrics(scores, bad)
    nan_scores = scores.copy()
    nan_scores[1, 1] = np.nan
    with pytest.raises(ValueError, match="non-finite"):
        multilabel_metrics(nan_scores, targets)
    with pytest.raises(ValueError, match="no class has a positive"):
        multilabel_metrics(scores, np.zeros_like(targets))


def test_table_and_csv(tmp_path):
    m = multilabel_metrics(HAND_SCORES, HAND_TARGETS)
    base = multilabel_metrics(label_frequency_baseline_scores(HAND_TARGETS, 5), HAND_TARGETS)
    table = format_metrics_table(m, base)
    lines = table.splitlines()
    assert lines[0].split() == ["metric", "model", "baseline"]
    assert lines[2].split() == ["mAP", f"{m['mAP']:.2f}", f"{base['mAP']:.2f}"]
    assert "OF1_top3" in table and "mAP_small" not in table
    path = tmp_path / "ap.csv"
    per_class_ap_csv(m, ["cat", "dog"], path)
    rows = list(csv.reader(path.open()))
    assert rows[0] == ["class", "AP"]
    assert rows[1][0] == "cat" and float(rows[1][1]) == pytest.approx(500 / 6, abs=1e-4)
    with pytest.raises(ValueError, match="class names"):
        per_class_ap_csv(m, ["cat"], path)


def test_coco_sized_input_matches_sklearn():
    """A COCO-sized evaluation (40k images, 80 classes) gives scikit-learn's APs;
    its speed is measured by experiments/benchmark_metrics.py, not asserted here."""
    rng = np.random.default_rng(8)
    scores = rng.random((40_000, 80))
    targets = (rng.random((40_000, 80)) < 0.04).astype(float)
    scores = scores + 0.2 * targets
    areas = np.where(targets == 1, rng.uniform(1, 200**2, targets.shape), 0.0)
    m = multilabel_metrics(scores, targets, areas=areas)
    some = [0, 17, 79]
    expected = [average_precision_score(targets[:, c], scores[:, c]) for c in some]
    np.testing.assert_allclose(m["AP_per_class"][some] / 100, expected, rtol=1e-9)
    assert all(key in m for key in ("mAP_small", "mAP_medium", "mAP_large", "OF1_top3"))


def test_summarise_seeds_groups_runs_and_keeps_shared_fields():
    """One row per variant in first-seen order, per-seed values (scaled), mean
    and sample std, and the fields equal across a variant's runs."""
    from gkg_pyg.metrics import summarise_seeds

    runs = [
        dict(variant="b", seed=0, accuracy=0.50, seconds_per_epoch=2.0, parameters=10, loss=1.0),
        dict(variant="a", seed=0, accuracy=0.25, seconds_per_epoch=1.0, parameters=7, loss=2.0),
        dict(variant="b", seed=1, accuracy=0.70, seconds_per_epoch=4.0, parameters=10, loss=0.5),
    ]
    rows = summarise_seeds(runs, "variant", "accuracy", scale=100)
    assert [r["variant"] for r in rows] == ["b", "a"]
    b, a = rows
    assert b["seeds"] == [0, 1] and b["accuracy"] == pytest.approx([50.0, 70.0])
    assert b["mean"] == pytest.approx(60.0) and b["std"] == pytest.approx(200**0.5)  # sample std
    assert b["seconds_per_epoch"] == pytest.approx(3.0) and b["parameters"] == 10
    assert "loss" not in b  # differs between the seeds
    assert a["std"] == 0.0 and a["loss"] == 2.0 and a["accuracy"] == pytest.approx([25.0])
