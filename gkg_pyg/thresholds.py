"""Decision thresholds: F1-optimal per class and globally, and their storage.

``choose_thresholds(scores, targets)`` picks, on a validation split, for
each class the threshold t_c that maximises that class's F1 of the rule
"score >= t_c", and one global threshold that maximises the F1 of all
labels pooled (OF1). Each threshold lies halfway between the lowest score
that is predicted and the next lower score, so it does not sit on a
validation score. A class without positives (or without any valid label)
in the split keeps the global threshold. -1 entries (VOC "difficult") are
left out, as in ``gkg_pyg.metrics``.

``metrics_at_thresholds`` gives CP/CR/CF1/OP/OR/OF1 (and the top-3
variants) at per-class thresholds, the same definitions as
``gkg_pyg.metrics.multilabel_metrics`` at a single one.

Stored with a checkpoint (``store_thresholds``): an entry ``"thresholds"``
of the checkpoint dict, one record per set of weights ("model", "ema")::

    {"per_class": (L,) float64 tensor, "global": float, "class_names": [...],
     "f1_per_class": (L,) float64 tensor (NaN without positives),
     "num_images": int, "chosen_on": str}

only tensors, numbers, strings and lists, so ``torch.load(...,
weights_only=True)`` reads it. The file is rewritten atomically (a
temporary file in the same folder, then a rename): a kill leaves the old
file or the new one, never a truncated one; a hard link (a run's
``checkpoint_best.pth`` may share its data with ``checkpoint_last.pth``)
is replaced by the new file, so the other name keeps the weights it had,
without thresholds.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import torch

from .metrics import TOP_K, _as_float64, _check_scores_targets, _precision_recall, _top_k_mask

__all__ = [
    "best_f1_threshold", "choose_thresholds", "format_threshold_table", "metrics_at_thresholds", "read_thresholds",
    "store_thresholds", "thresholds_json",
]  # fmt: skip


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


def choose_thresholds(scores, targets, class_names: Sequence[str] | None = None, chosen_on: str = "") -> dict:
    """F1-optimal per-class thresholds and the OF1-optimal global threshold.

    Args:
        scores: (N, L) scores (probabilities).
        targets: (N, L) with 1 / 0 / -1 (-1 left out).
        class_names: optional names, stored with the thresholds.
        chosen_on: a note on the data (e.g. "val split of coco_576.yaml").
    Returns the record ``store_thresholds`` stores (module docstring).
    """
    scores = _as_float64(scores, "scores")
    targets = _as_float64(targets, "targets")
    _check_scores_targets(scores, targets)
    valid = targets != -1
    if class_names is not None and len(class_names) != scores.shape[1]:
        raise ValueError(f"got {len(class_names)} class names for {scores.shape[1]} classes")
    global_t, global_f1 = best_f1_threshold(scores[valid], targets[valid] == 1)
    if math.isnan(global_t):
        raise ValueError("no positive label in the split: thresholds cannot be chosen")
    per_class, f1 = np.full(scores.shape[1], global_t), np.full(scores.shape[1], math.nan)
    for c in range(scores.shape[1]):
        keep = valid[:, c]
        t, f = best_f1_threshold(scores[keep, c], targets[keep, c] == 1)
        if not math.isnan(t):
            per_class[c], f1[c] = t, f
    return {
        "per_class": torch.from_numpy(per_class),
        "global": float(global_t),
        "global_f1": float(global_f1),
        "f1_per_class": torch.from_numpy(f1),
        "class_names": list(class_names) if class_names is not None else None,
        "num_images": int(scores.shape[0]),
        "chosen_on": str(chosen_on),
    }


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
        raise ValueError("no class has a positive label")
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
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - torch raises UnpicklingError / RuntimeError variants
        raise ValueError(
            f"{path} does not load with weights_only=True, so thresholds are not written into it "
            f"({type(err).__name__}); convert it to a plain state-dict checkpoint first"
        ) from err
    if not isinstance(ckpt, dict):
        raise ValueError(f"{path} is not a checkpoint dict")
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
    ``class_names`` is refused (ValueError): it belongs to other labels."""
    stored = checkpoint.get("thresholds") if isinstance(checkpoint, Mapping) else None
    if not stored or weights not in stored:
        return None
    record = stored[weights]
    names = record.get("class_names")
    if class_names is not None and names is not None and list(names) != list(class_names):
        raise ValueError("the stored thresholds belong to other class names than the model's")
    per_class = torch.as_tensor(record["per_class"], dtype=torch.float64)
    if class_names is not None and per_class.numel() != len(class_names):
        raise ValueError(f"{per_class.numel()} stored thresholds for {len(class_names)} classes")
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
    return {
        "global": record["global"],
        "global_f1": record.get("global_f1"),
        "num_images": record.get("num_images"),
        "chosen_on": record.get("chosen_on"),
        "per_class": {n: {"threshold": float(t), "f1": None if math.isnan(f) else f}
                      for n, t, f in zip(names, torch.as_tensor(record["per_class"]).tolist(), f1)},
    }  # fmt: skip
