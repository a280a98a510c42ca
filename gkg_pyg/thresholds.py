"""Decision thresholds: F1-optimal per class and globally, and their storage.

``choose_thresholds(scores, targets)`` picks, on a validation split, for
each class the threshold t_c that maximises that class's F1 of the rule
"score >= t_c", and one global threshold that maximises the F1 of all
labels pooled (OF1). Each threshold lies halfway between the lowest score
that is predicted and the next lower score, so it does not sit on a
validation score. -1 entries (VOC "difficult") are left out, as in
``gkg_pyg.metrics``.

A per-class threshold needs positives to rest on: with one positive, the
best F1 puts the threshold just below that image's score, however low it
is, and such thresholds flood the predictions on new images. So a class
gets its own threshold only with at least ``min_positives`` positives in
the split (:data:`MIN_POSITIVES` = 10 by default; config key
``eval.min_positives``, evaluate.py ``--min-positives``); every other
class keeps the global threshold, which rests on all labels together.
The classes that fell back are logged (``gkg_pyg.thresholds``), as a
warning: the calibration split is small for them.

``metrics_at_thresholds`` gives CP/CR/CF1/OP/OR/OF1 (and the top-3
variants) at per-class thresholds, the same definitions as
``gkg_pyg.metrics.multilabel_metrics`` at a single one.

Stored with a checkpoint (``store_thresholds``): an entry ``"thresholds"``
of the checkpoint dict, one record per set of weights ("model", "ema")::

    {"per_class": (L,) float64 tensor, "global": float, "class_names": [...],
     "f1_per_class": (L,) float64 tensor (F1 at the threshold used; NaN without positives),
     "num_positives": (L,) int64 tensor (positives per class in the split),
     "min_positives": int (the floor: classes below it use "global"),
     "num_images": int, "chosen_on": str}

(records stored before the floor existed lack the last two but ``num_images``.)

only tensors, numbers, strings and lists, so ``torch.load(...,
weights_only=True)`` reads it. The file is rewritten atomically (a
temporary file in the same folder, then a rename): a kill leaves the old
file or the new one, never a truncated one; a hard link (a run's
``checkpoint_best.pth`` may share its data with ``checkpoint_last.pth``)
is replaced by the new file, so the other name keeps the weights it had,
without thresholds.
"""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import torch

from .errors import CheckpointError, DataError, MissingFileError, UsageError
from .metrics import TOP_K, _as_float64, _check_scores_targets, _precision_recall, _top_k_mask

__all__ = [
    "MIN_POSITIVES", "best_f1_threshold", "choose_thresholds", "describe_thresholds", "fallback_classes",
    "format_threshold_table", "metrics_at_thresholds", "read_thresholds", "store_thresholds", "thresholds_json",
]  # fmt: skip

# The fewest positives in the calibration split on which a class gets its own threshold.
MIN_POSITIVES = 10
log = logging.getLogger(__name__)


def best_f1_threshold(scores, positives) -> tuple[float, float]:
    """(threshold, F1) of the rule ``score >= threshold`` that maximises F1.

    Args:
        scores: (n,) scores.
        positives: (n,) bool, the true labels.
    Returns (nan, nan) without positives. Among equal F1 values the highest
    threshold (fewest predictions) wins. The threshold is the midpoint
    between the lowest predicted score and the next lower score (the lowest
    predicted score itself when every score is predicted).
    """
    scores = np.asarray(scores, dtype=np.float64).ravel()
    positives = np.asarray(positives, dtype=bool).ravel()
    if scores.shape != positives.shape:
        raise ValueError(f"scores {scores.shape} and positives {positives.shape} differ in shape")
    num_pos = int(positives.sum())
    if num_pos == 0:
        return math.nan, math.nan
    order = np.argsort(-scores, kind="stable")
    s, p = scores[order], positives[order]
    # The last index of each group of equal scores: a cut can only fall there.
    ends = np.flatnonzero(np.r_[s[1:] != s[:-1], True])
    tp = np.cumsum(p)[ends]
    predicted = ends + 1
    f1 = 2.0 * tp / (predicted + num_pos)
    best = int(np.argmax(f1))  # first maximum: the highest threshold
    lowest = s[ends[best]]
    threshold = lowest if best + 1 == len(ends) else 0.5 * (lowest + s[ends[best] + 1])
    return float(threshold), float(f1[best])


def choose_thresholds(
    scores, targets, class_names: Sequence[str] | None = None, chosen_on: str = "", min_positives: int = MIN_POSITIVES
) -> dict:
    """F1-optimal per-class thresholds and the OF1-optimal global threshold.

    Args:
        scores: (N, L) scores (probabilities).
        targets: (N, L) with 1 / 0 / -1 (-1 left out).
        class_names: optional names, stored with the thresholds.
        chosen_on: a note on the data (e.g. "val split of coco_576.yaml").
        min_positives: a class with fewer positives than this keeps the
            global threshold (module docstring).
    Returns the record ``store_thresholds`` stores (module docstring).
    """
    if isinstance(min_positives, bool) or not isinstance(min_positives, int) or min_positives < 1:
        raise UsageError(f"min_positives must be an integer >= 1, got {min_positives!r}")
    scores = _as_float64(scores, "scores")
    targets = _as_float64(targets, "targets")
    _check_scores_targets(scores, targets)
    valid = targets != -1
    if class_names is not None and len(class_names) != scores.shape[1]:
        raise ValueError(f"got {len(class_names)} class names for {scores.shape[1]} classes")
    global_t, global_f1 = best_f1_threshold(scores[valid], targets[valid] == 1)
    if math.isnan(global_t):
        raise DataError("no positive label in the split: thresholds cannot be chosen")
    positives = ((targets == 1) & valid).sum(axis=0).astype(np.int64)
    per_class, f1 = np.full(scores.shape[1], global_t), np.full(scores.shape[1], math.nan)
    for c in range(scores.shape[1]):
        keep = valid[:, c]
        pos = targets[keep, c] == 1
        if positives[c] >= min_positives:
            per_class[c], f1[c] = best_f1_threshold(scores[keep, c], pos)
        elif positives[c] > 0:  # the F1 this class gets at the global threshold it keeps
            predicted = scores[keep, c] >= global_t
            f1[c] = 2.0 * float((predicted & pos).sum()) / float(predicted.sum() + pos.sum())
    record = {
        "per_class": torch.from_numpy(per_class),
        "global": float(global_t),
        "global_f1": float(global_f1),
        "f1_per_class": torch.from_numpy(f1),
        "num_positives": torch.from_numpy(positives),
        "min_positives": int(min_positives),
        "class_names": list(class_names) if class_names is not None else None,
        "num_images": int(scores.shape[0]),
        "chosen_on": str(chosen_on),
    }
    fell_back = fallback_classes(record)
    if fell_back:
        counts = positives.tolist()
        shown = ", ".join(f"{name} ({counts[c]})" for c, name in fell_back[:12]) + (", ..." if len(fell_back) > 12
                                                                                  else "")  # fmt: skip
        log.warning(
            f"the calibration split is small for {len(fell_back)} of the {scores.shape[1]} classes: they have "
            f"fewer than {min_positives} positives among its {scores.shape[0]} images and use the global "
            f"threshold {global_t:.4f} instead of their own: {shown} (positives in brackets; eval.min_positives / "
            "--min-positives sets the floor)"
        )
    return record


def fallback_classes(record: Mapping) -> list[tuple[int, str]]:
    """(index, name) of the classes of a ``choose_thresholds`` record that use
    the global threshold for want of positives; empty for records stored
    without the counts."""
    if "num_positives" not in record or "min_positives" not in record:
        return []
    counts = torch.as_tensor(record["num_positives"]).tolist()
    names = record.get("class_names") or [str(c) for c in range(len(counts))]
    return [(c, names[c]) for c, n in enumerate(counts) if n < record["min_positives"]]


def describe_thresholds(record: Mapping) -> str:
    """Which thresholds a stored record applies, in words (for predict.py and evaluate.py)."""
    total = len(torch.as_tensor(record["per_class"]))
    where = f"chosen on {record['chosen_on']}" if record.get("chosen_on") else "chosen on an unnamed split"
    if "min_positives" not in record:
        return (
            f"per-class ({where}, stored without a floor on the positives per class: a class with few "
            "positives may have a very low threshold; choose them again with evaluate.py --choose-thresholds)"
        )
    fell_back = len(fallback_classes(record))
    return (f"per-class ({where}): {total - fell_back} of {total} classes their own, {fell_back} with fewer than "
            f"{record['min_positives']} positives the global {record['global']:.4f}")  # fmt: skip


def metrics_at_thresholds(scores, targets, thresholds) -> dict:
    """CP, CR, CF1, OP, OR, OF1 and their top-3 variants (percent) when
    label c is predicted if its score >= thresholds[c] (a number or (L,)).

    Averaging and conventions as ``gkg_pyg.metrics.multilabel_metrics``
    (over the classes with positives; -1 ignored; top-3: also among the
    image's 3 highest scores)."""
    scores = _as_float64(scores, "scores")
    targets = _as_float64(targets, "targets")
    _check_scores_targets(scores, targets)
    thresholds = np.broadcast_to(_as_float64(thresholds, "thresholds"), scores.shape[1:])
    if not np.isfinite(thresholds).all():
        raise ValueError("thresholds must be finite")
    has_pos = (targets == 1).any(axis=0)
    if not has_pos.any():
        raise DataError("no class has a positive label")
    above = scores >= thresholds
    out = _precision_recall(above, targets, has_pos)
    top = _precision_recall(above & _top_k_mask(scores, TOP_K), targets, has_pos)
    out.update({f"{k}_top3": v for k, v in top.items()})
    return out


def _save_atomic(obj, path: Path) -> None:
    tmp = path.parent / f".{path.name}.{os.getpid()}.thresholds.tmp"
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def store_thresholds(
    checkpoint: str | os.PathLike, records: Mapping[str, dict], output: str | os.PathLike | None = None
) -> Path:
    """Add ``records`` (weights name -> ``choose_thresholds`` record) to the
    checkpoint's ``"thresholds"`` entry (records of other weights already
    there are kept) and write it atomically to ``output`` (default: in place).

    The checkpoint must load with ``weights_only=True`` (ours do); a file
    that does not is refused rather than rewritten through pickle.
    Returns the path written.
    """
    path = Path(checkpoint)
    if not path.is_file():
        raise MissingFileError(f"checkpoint not found: {path}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - torch raises UnpicklingError / RuntimeError variants
        raise CheckpointError(
            f"{path} does not load with weights_only=True, so thresholds are not written into it "
            f"({type(err).__name__}); convert it to a plain state-dict checkpoint first"
        ) from err
    if not isinstance(ckpt, dict):
        raise CheckpointError(f"{path} is not a checkpoint dict")
    stored = dict(ckpt.get("thresholds") or {})
    for name, record in records.items():
        stored[name] = {k: v for k, v in record.items() if v is not None}
    ckpt["thresholds"] = stored
    out = Path(output) if output is not None else path
    out.parent.mkdir(parents=True, exist_ok=True)
    _save_atomic(ckpt, out)
    return out


def read_thresholds(checkpoint: Mapping, weights: str = "model", class_names: Sequence[str] | None = None):
    """The stored record of ``weights`` ("model" / "ema") of a loaded
    checkpoint dict, or None. A record whose class names differ from
    ``class_names`` (it belongs to other labels) or whose thresholds are not
    numbers in [0, 1] is refused (CheckpointError)."""
    stored = checkpoint.get("thresholds") if isinstance(checkpoint, Mapping) else None
    if not stored or weights not in stored:
        return None
    record = stored[weights]
    names = record.get("class_names")
    if class_names is not None and names is not None and list(names) != list(class_names):
        raise CheckpointError("the stored thresholds belong to other class names than the model's")
    per_class = torch.as_tensor(record["per_class"], dtype=torch.float64)
    if class_names is not None and per_class.numel() != len(class_names):
        raise CheckpointError(f"{per_class.numel()} stored thresholds for {len(class_names)} classes")
    values = torch.cat([per_class.flatten(), torch.tensor([float(record["global"])], dtype=torch.float64)])
    if not bool(((values >= 0) & (values <= 1)).all()):
        raise CheckpointError(f"the stored thresholds of {weights!r} must lie in [0, 1]")
    return record


def format_threshold_table(columns: Mapping[str, Mapping[str, float]], keys: Sequence[str] | None = None) -> str:
    """Plain-text table: one row per metric, one column per threshold rule
    (e.g. {"0.5": metrics, "per-class": metrics, "global": metrics})."""
    keys = list(keys or next(iter(columns.values())).keys())
    rows = [["metric", *columns]] + [[k, *(f"{m[k]:.2f}" for m in columns.values())] for k in keys]
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))) for r in rows]
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join(lines)


def thresholds_json(record: Mapping) -> dict:
    """A stored record as plain JSON (per class by name when names are known)."""
    names = record.get("class_names") or [str(i) for i in range(len(record["per_class"]))]
    f1 = torch.as_tensor(record.get("f1_per_class", torch.full((len(names),), math.nan))).tolist()
    counts = torch.as_tensor(record.get("num_positives", [-1] * len(names))).tolist()
    return {
        "global": record["global"],
        "global_f1": record.get("global_f1"),
        "num_images": record.get("num_images"),
        "chosen_on": record.get("chosen_on"),
        "min_positives": record.get("min_positives"),
        "per_class": {n: {"threshold": float(t), "f1": None if math.isnan(f) else f,
                          "positives": None if p < 0 else p,
                          "own": None if p < 0 else p >= record["min_positives"]}
                      for n, t, f, p in zip(names, torch.as_tensor(record["per_class"]).tolist(), f1, counts)},
    }  # fmt: skip
