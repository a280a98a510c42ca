"""Multi-label evaluation: mAP, CP/CR/CF1, OP/OR/OF1, top-3 variants, COCO scale mAP.

Target convention (shared with the data loaders): ``targets`` is an (N, L)
array with 1 (label present), 0 (absent) and -1 (present only through
"difficult" objects, VOC). In evaluation a -1 entry is ignored: it is left
out of that class's AP and of every precision/recall count.

All numbers are computed in float64 numpy and reported in percent.
"""

import csv
import math
import statistics
from pathlib import Path
from typing import NamedTuple

import numpy as np

from .errors import DataError

# COCO object-size boundaries, in pixels of the original image.
SMALL_AREA_MAX = 32**2
LARGE_AREA_MIN = 96**2
TOP_K = 3

SUMMARY_KEYS = ("mAP", "CP", "CR", "CF1", "OP", "OR", "OF1")
TOP3_KEYS = tuple(f"{k}_top3" for k in SUMMARY_KEYS[1:])
SCALE_KEYS = ("mAP_small", "mAP_medium", "mAP_large")


def _as_float64(x, name: str) -> np.ndarray:
    """Torch tensor (any dtype, any device) or array-like -> float64 numpy array."""
    if hasattr(x, "detach"):
        # .double() first: numpy has no bfloat16.
        return x.detach().cpu().double().numpy()
    try:
        return np.asarray(x, dtype=np.float64)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{name} cannot be converted to a float array: {err}") from err


def _check_targets(targets: np.ndarray, name: str = "targets") -> None:
    if targets.ndim != 2:
        raise ValueError(f"{name} must be 2-D (N, L), got shape {targets.shape}")
    bad = ~np.isin(targets, (-1.0, 0.0, 1.0))
    if bad.any():
        found = np.unique(targets[bad])[:5]
        raise ValueError(f"{name} must only hold 1, 0 or -1; found {found.tolist()}")


def _check_scores_targets(scores: np.ndarray, targets: np.ndarray) -> None:
    if scores.ndim != 2:
        raise ValueError(f"scores must be 2-D (N, L), got shape {scores.shape}")
    if scores.shape != targets.shape:
        raise ValueError(f"scores shape {scores.shape} differs from targets shape {targets.shape}")
    if scores.shape[0] == 0 or scores.shape[1] == 0:
        raise ValueError(f"need at least one image and one class, got shape {scores.shape}")
    if not np.isfinite(scores).all():
        raise ValueError(f"scores hold {int((~np.isfinite(scores)).sum())} non-finite values")
    _check_targets(targets)


class _Ranking(NamedTuple):
    """Per-class ranking of (N, L) scores, shared by every AP computed on them.

    A sorted position is a flat index into a class-major (L, N) array:
    class c, rank r (0 = highest score) -> c * N + r.

    order: (L * N,) at each sorted position, the flat index of its entry in
        the class-major (L, N) layout of the inputs.
    group_ends: (E,) increasing sorted positions that end a group of tied
        scores (each class's last position is one).
    num_images: N.
    """

    order: np.ndarray
    group_ends: np.ndarray
    num_images: int


def _ranking(scores: np.ndarray) -> _Ranking:
    n, num_classes = scores.shape
    # Class-major layout: sorting and gathering contiguous rows is fastest.
    by_class = np.ascontiguousarray(scores.T)
    # The order inside a tie group does not matter: AP treats it as one threshold.
    order = np.argsort(-by_class, axis=1)
    order += np.arange(num_classes)[:, None] * n
    order = order.ravel()
    ranked = by_class.ravel()[order].reshape(num_classes, n)
    is_end = np.ones(ranked.shape, dtype=bool)
    is_end[:, :-1] = ranked[:, :-1] != ranked[:, 1:]
    return _Ranking(order, np.flatnonzero(is_end), n)


def _sorted_by_class(ranking: _Ranking, x: np.ndarray) -> np.ndarray:
    """(N, L) array -> (L, N) with each class's entries in ranking order."""
    return np.ascontiguousarray(x.T).ravel()[ranking.order].reshape(-1, ranking.num_images)


def _average_precision(ranking: _Ranking, positive, valid) -> np.ndarray:
    """Non-interpolated AP of every class, in [0, 1]; NaN for classes without positives.

    AP = mean over positives of the precision at that positive's rank, where
    tied scores form one threshold: the positives of a tie group all get the
    precision at the group's end. This is exactly sklearn's
    average_precision_score (sum over thresholds of (R_n - R_{n-1}) P_n) and,
    without ties, the plain "mean precision at each positive".

    Args:
        ranking: ``_ranking`` of the (N, L) scores.
        positive: (N, L) bool, entries counted as positives.
        valid: (N, L) bool, entries that take part (positives and negatives);
            invalid entries are ignored as if absent from the list.
    Returns:
        (L,) float64.
    """
    pos = _sorted_by_class(ranking, positive & valid)
    num_classes = pos.shape[0]
    tp = np.cumsum(pos, axis=1, dtype=np.int64).ravel()
    seen = np.cumsum(_sorted_by_class(ranking, valid), axis=1, dtype=np.int64).ravel()
    pos_at = np.flatnonzero(pos)
    # End of each positive's tie group: the first group end at or after it
    # (always in the same class, whose last position is an end).
    end_at = ranking.group_ends[np.searchsorted(ranking.group_ends, pos_at)]
    pos_class = pos_at // ranking.num_images
    ap_sum = np.bincount(pos_class, weights=tp[end_at] / seen[end_at], minlength=num_classes)
    n_pos = np.bincount(pos_class, minlength=num_classes)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(n_pos > 0, ap_sum / n_pos, np.nan)


def _f1(p: float, r: float) -> float:
    return 2.0 * p * r / (p + r) if p + r > 0 else 0.0


def _precision_recall(predicted, targets, has_pos) -> dict:
    """CP, CR, CF1, OP, OR, OF1 in percent.

    Args:
        predicted: (N, L) bool, labels predicted present.
        targets: (N, L) in {1, 0, -1}; -1 entries are not counted at all.
        has_pos: (L,) bool, classes over which CP and CR are averaged.
    """
    pos = targets == 1
    neg = targets == 0
    tp = (predicted & pos).sum(axis=0)
    fp = (predicted & neg).sum(axis=0)
    fn = (~predicted & pos).sum(axis=0)
    # A class with no predictions has precision 0 (ML-GCN / ASL convention).
    precision_c = tp / np.maximum(tp + fp, 1)
    recall_c = tp / np.maximum(tp + fn, 1)
    cp = 100.0 * float(precision_c[has_pos].mean())
    cr = 100.0 * float(recall_c[has_pos].mean())
    tp_all, fp_all, fn_all = int(tp.sum()), int(fp.sum()), int(fn.sum())
    op = 100.0 * tp_all / max(tp_all + fp_all, 1)
    orr = 100.0 * tp_all / max(tp_all + fn_all, 1)
    return {"CP": cp, "CR": cr, "CF1": _f1(cp, cr), "OP": op, "OR": orr, "OF1": _f1(op, orr)}


def _top_k_mask(scores: np.ndarray, k: int) -> np.ndarray:
    """(N, L) bool, True at each image's k highest scores (ties: lower class index first)."""
    k = min(k, scores.shape[1])
    kth = -np.partition(-scores, k - 1, axis=1)[:, k - 1 : k]
    mask = scores > kth
    # Fill the slots left with the lowest-index entries equal to the k-th score.
    free = k - mask.sum(axis=1, keepdims=True)
    at_kth = scores == kth
    return mask | (at_kth & (np.cumsum(at_kth, axis=1) <= free))


def _scale_maps(ranking: _Ranking, targets, areas) -> dict:
    """mAP_small / mAP_medium / mAP_large in percent (NaN when no class has a positive)."""
    area = np.where(np.isfinite(areas), areas, 0.0)
    pos = (targets == 1) & (area > 0)
    neg = targets == 0
    buckets = {
        "mAP_small": pos & (area < SMALL_AREA_MAX),
        "mAP_medium": pos & (area >= SMALL_AREA_MAX) & (area <= LARGE_AREA_MIN),
        "mAP_large": pos & (area > LARGE_AREA_MIN),
    }
    out = {}
    for key, in_scale in buckets.items():
        ap = _average_precision(ranking, in_scale, in_scale | neg)
        has = ~np.isnan(ap)
        out[key] = 100.0 * float(ap[has].mean()) if has.any() else math.nan
    return out


def multilabel_metrics(scores, targets, threshold=0.5, areas=None, class_names=None) -> dict:
    """All multi-label metrics of GKGNet's evaluation, in percent.

    Args:
        scores: (N, L) torch tensor or array of probabilities (any monotone
            score works for AP; the thresholded metrics compare to ``threshold``).
        targets: (N, L) with 1 / 0 / -1 (see module docstring).
        threshold: a label is predicted present when its score >= threshold.
        areas: optional (N, L), for COCO: the area in pixels of the original
            image of the largest object of that label in that image; 0 or NaN
            where the label is absent.
        class_names: optional list of L names, used in
            ``classes_without_positives``.

    Returns a dict with:
        mAP: mean over classes that have at least one positive of the
            per-class non-interpolated AP (mean precision at each positive in
            the score-sorted list; tied scores form one threshold, so it equals
            sklearn's average_precision_score). -1 entries are left out.
        AP_per_class: (L,) float64, NaN for classes without positives.
        classes_without_positives: indices (or names) of the classes left out.
        CP, CR: per-class precision / recall at ``threshold``, averaged over
            the classes that have positives (the same classes as mAP; on the
            COCO and VOC test sets this is every class). A class with no
            predictions has precision 0, as in the ML-GCN / ASL evaluation code.
        CF1: 2 CP CR / (CP + CR) (0 when both are 0).
        OP, OR, OF1: the same over all labels of all classes pooled.
        *_top3: the same six with a label predicted only if its score is
            >= threshold and it is among its image's 3 highest scores (ties
            for third place go to the lower class index).
        mAP_small, mAP_medium, mAP_large (only with ``areas``): for scale s,
            each class's AP uses as positives only the positive labels whose
            largest object falls in s (small: area < 32^2; medium:
            32^2 <= area <= 96^2; large: area > 96^2), ignores the positives of
            other scales (and positives without a valid area), keeps all
            negatives; the mean is over classes with at least one positive in s.

    The -1 entries are ignored in P/R/F1; the authors' mmcls code instead
    counts them as negatives there (a predicted "difficult" label is a false
    positive). This only matters for VOC.
    """
    scores = _as_float64(scores, "scores")
    targets = _as_float64(targets, "targets")
    _check_scores_targets(scores, targets)
    if not math.isfinite(threshold):
        raise ValueError(f"threshold must be finite, got {threshold}")
    num_classes = scores.shape[1]
    if class_names is not None and len(class_names) != num_classes:
        raise ValueError(f"got {len(class_names)} class names for {num_classes} classes")

    ranking = _ranking(scores)
    valid = targets != -1
    ap = _average_precision(ranking, targets == 1, valid)
    has_pos = ~np.isnan(ap)
    if not has_pos.any():
        raise DataError("no class has a positive label: mAP is undefined")
    missing = np.flatnonzero(~has_pos).tolist()
    if class_names is not None:
        missing = [class_names[i] for i in missing]

    above = scores >= threshold
    out = {"mAP": 100.0 * float(ap[has_pos].mean())}
    out.update(_precision_recall(above, targets, has_pos))
    top3 = _precision_recall(above & _top_k_mask(scores, TOP_K), targets, has_pos)
    out.update({f"{k}_top3": v for k, v in top3.items()})
    out["AP_per_class"] = 100.0 * ap
    out["classes_without_positives"] = missing

    if areas is not None:
        areas = _as_float64(areas, "areas")
        if areas.shape != scores.shape:
            raise ValueError(f"areas shape {areas.shape} differs from scores shape {scores.shape}")
        out.update(_scale_maps(ranking, targets, areas))
    return out


def _fmt(value) -> str:
    return "-" if value is None else f"{value:.2f}"


def format_metrics_table(metrics: dict, baseline: dict | None = None) -> str:
    """Plain-text table of the summary numbers, optionally beside a baseline's.

    Args:
        metrics: a ``multilabel_metrics`` result.
        baseline: another ``multilabel_metrics`` result, shown as a second column.
    """
    keys = [k for k in SUMMARY_KEYS + TOP3_KEYS + SCALE_KEYS if k in metrics]
    header = ["metric", "model"] + (["baseline"] if baseline is not None else [])
    rows = [header]
    for key in keys:
        row = [key, _fmt(metrics[key])]
        if baseline is not None:
            row.append(_fmt(baseline.get(key)))
        rows.append(row)
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    lines = [
        "  ".join(cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in enumerate(zip(r, widths)))
        for r in rows
    ]
    lines.insert(1, "-" * len(lines[0]))
    missing = metrics.get("classes_without_positives")
    if missing:
        # A name holding the separator is quoted, so that the list reads back ("car, red" is one class).
        shown = (repr(str(n)) if "," in str(n) else str(n) for n in missing)
        lines.append(f"left out of mAP (no positives): {', '.join(shown)}")
    return "\n".join(lines)


def label_frequency_baseline_scores(train_targets, num_images: int) -> np.ndarray:
    """Scores of the "predict the training label frequencies" baseline.

    Every image gets the same vector: the fraction of training images where
    each label is present (1 or -1, as in training). All scores of a class tie,
    so its AP equals the class's positive rate.

    Args:
        train_targets: (N_train, L) with 1 / 0 / -1.
        num_images: number of images to score.
    Returns:
        (num_images, L) float64.
    """
    train_targets = _as_float64(train_targets, "train_targets")
    _check_targets(train_targets, "train_targets")
    if train_targets.shape[0] == 0:
        raise ValueError("train_targets has no images")
    if int(num_images) != num_images or num_images < 1:
        raise ValueError(f"num_images must be a positive integer, got {num_images}")
    frequency = (train_targets != 0).mean(axis=0)
    return np.tile(frequency, (int(num_images), 1))


def per_class_ap_csv(metrics: dict, class_names, path) -> None:
    """Write ``class,AP`` rows (AP in percent, "nan" for classes without positives)."""
    ap = np.asarray(metrics["AP_per_class"])
    if len(class_names) != len(ap):
        raise ValueError(f"got {len(class_names)} class names for {len(ap)} AP values")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["class", "AP"])
        for name, value in zip(class_names, ap):
            writer.writerow([name, f"{value:.4f}"])


def summarise_seeds(runs: list, by: str, metric: str, scale: float = 1.0) -> list:
    """Repeated runs of an experiment, one row per value of ``run[by]`` (in
    first-seen order).  Each run is a dict with ``seed``, ``metric`` and
    ``seconds_per_epoch``; a row holds ``by``, the fields equal in all of its
    runs (e.g. a parameter count), ``seeds``, ``metric`` as the list of the
    per-seed values times ``scale``, their ``mean`` and sample ``std`` (0 for
    one seed) and the mean ``seconds_per_epoch``."""
    rows = []
    for key in dict.fromkeys(r[by] for r in runs):
        mine = [r for r in runs if r[by] == key]
        values = [scale * r[metric] for r in mine]
        shared = {
            k: v
            for k, v in mine[0].items()
            if k not in ("seed", metric, "seconds_per_epoch") and all(r.get(k) == v for r in mine)
        }
        rows.append(
            dict(
                shared,
                seeds=[r["seed"] for r in mine],
                **{metric: values},
                mean=statistics.mean(values),
                std=statistics.stdev(values) if len(values) > 1 else 0.0,
                seconds_per_epoch=statistics.mean(r["seconds_per_epoch"] for r in mine),
            )
        )
    return rows
