"""Single-label classification: loss, Mixup/CutMix and metrics.

* :class:`SingleLabelLoss`: cross-entropy with label smoothing for class
  indices, and the soft-target cross-entropy for the mixed targets that
  Mixup/CutMix produce (which already carry the smoothing).
* :class:`MixupCutmix`: timm's ``Mixup`` (batch mode), also for odd batches.
* :func:`single_label_metrics`: top-1 and top-5 accuracy, mean per-class
  accuracy, per-class accuracy and the confusion matrix;
  :func:`write_confusion_matrix` writes the matrix as CSV.
"""

from __future__ import annotations

import csv
import logging
import os
from typing import Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "MixupCutmix",
    "SingleLabelLoss",
    "confusion_matrix",
    "format_single_label_table",
    "majority_baseline_scores",
    "mixup_from_config",
    "single_label_metrics",
    "single_label_report",
    "topk_accuracy",
    "write_confusion_matrix",
]

log = logging.getLogger(__name__)


class SingleLabelLoss(nn.Module):
    """Cross-entropy for ``(B, C)`` logits.

    ``target`` is either ``(B,)`` class indices, taken with label smoothing
    ``eps`` (the target is ``(1 - eps)`` on the class plus ``eps / C`` on
    every class, as ``torch.nn.CrossEntropyLoss(label_smoothing=eps)``), or
    ``(B, C)`` probabilities (Mixup/CutMix output, smoothing already applied),
    for which the loss is ``-sum_c t_c log softmax(z)_c`` averaged over the batch.
    """

    def __init__(self, label_smoothing: float = 0.1):
        super().__init__()
        if not 0.0 <= label_smoothing < 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}")
        self.label_smoothing = label_smoothing

    def forward(self, logits: Tensor, target: Tensor) -> Tensor:
        if target.dim() == 1:
            return F.cross_entropy(logits, target, label_smoothing=self.label_smoothing)
        if target.shape != logits.shape:
            raise ValueError(
                f"soft targets must have the logits' shape {tuple(logits.shape)}, got {tuple(target.shape)}"
            )
        return -(target * F.log_softmax(logits, dim=-1)).sum(-1).mean()

    def extra_repr(self) -> str:
        return f"label_smoothing={self.label_smoothing}"


class MixupCutmix:
    """timm's ``Mixup`` in batch mode: with probability ``prob`` a batch is
    mixed, by CutMix with probability ``switch_prob`` when both are on, else
    by Mixup; the targets become smoothed, mixed probabilities ``(B, C)``.

    timm mixes a batch with its reversal and so needs an even batch; of an
    odd batch the first ``B - 1`` images are mixed and the last one keeps its
    image and gets the smoothed one-hot target.
    """

    def __init__(
        self,
        num_classes: int,
        mixup_alpha: float = 0.8,
        cutmix_alpha: float = 1.0,
        prob: float = 1.0,
        switch_prob: float = 0.5,
        label_smoothing: float = 0.1,
    ):
        from timm.data import Mixup

        if mixup_alpha < 0 or cutmix_alpha < 0 or not (mixup_alpha or cutmix_alpha):
            raise ValueError(
                f"need mixup_alpha >= 0, cutmix_alpha >= 0 and one of them positive, got {mixup_alpha}, {cutmix_alpha}"
            )
        self.num_classes, self.label_smoothing = num_classes, label_smoothing
        self.mixup = Mixup(
            mixup_alpha=mixup_alpha,
            cutmix_alpha=cutmix_alpha,
            prob=prob,
            switch_prob=switch_prob,
            mode="batch",
            label_smoothing=label_smoothing,
            num_classes=num_classes,
        )

    def smoothed(self, target: Tensor) -> Tensor:
        off = self.label_smoothing / self.num_classes
        return F.one_hot(target, self.num_classes).float() * (1.0 - self.label_smoothing) + off

    def __call__(self, images: Tensor, target: Tensor):
        """``(B, 3, H, W)`` images and ``(B,)`` classes -> mixed images, ``(B, C)`` targets."""
        if len(images) < 2:
            return images, self.smoothed(target)
        even = len(images) - len(images) % 2
        mixed, soft = self.mixup(images[:even].clone(), target[:even])
        if even == len(images):
            return mixed, soft
        return torch.cat([mixed, images[even:]]), torch.cat([soft, self.smoothed(target[even:]).to(soft)])

    def __repr__(self) -> str:
        m = self.mixup
        return (
            f"MixupCutmix(mixup_alpha={m.mixup_alpha}, cutmix_alpha={m.cutmix_alpha}, prob={m.mix_prob}, "
            f"switch_prob={m.switch_prob}, label_smoothing={self.label_smoothing})"
        )


def topk_accuracy(scores: Tensor, target: Tensor, k: int) -> float:
    """Share of rows whose class is among their ``k`` highest scores (ties by index order),
    in percent; ``k`` larger than the class count counts every row."""
    k = min(k, scores.shape[1])
    top = scores.sort(dim=1, descending=True, stable=True).indices[:, :k]  # topk's order of ties is unspecified
    return 100.0 * (top == target[:, None]).any(dim=1).float().mean().item()


def confusion_matrix(pred: Tensor, target: Tensor, num_classes: int) -> Tensor:
    """``(C, C)`` counts, row = true class, column = predicted class."""
    index = target.long() * num_classes + pred.long()
    return torch.bincount(index, minlength=num_classes * num_classes).view(num_classes, num_classes)


def single_label_metrics(scores: Tensor, target: Tensor, class_names: Optional[Sequence[str]] = None) -> dict:
    """Metrics of ``(N, C)`` scores (logits or probabilities) against ``(N,)`` classes.

    Returns ``{"top1", "top5", "mean_class_accuracy", "per_class_accuracy",
    "confusion", "num_images"}``: accuracies in percent (top-5 is top-C when
    there are fewer than 5 classes), the mean over the classes present in
    ``target`` of their accuracies, per-class accuracies (NaN for an absent
    class) and the ``(C, C)`` confusion matrix (rows true, columns predicted).
    """
    if scores.dim() != 2 or target.dim() != 1 or len(scores) != len(target):
        raise ValueError(f"expected scores (N, C) and target (N,), got {tuple(scores.shape)} and {tuple(target.shape)}")
    if len(target) == 0:
        raise ValueError("no images to evaluate")
    num_classes = scores.shape[1]
    if class_names is not None and len(class_names) != num_classes:
        raise ValueError(f"{len(class_names)} class names for {num_classes} classes")
    if target.min() < 0 or target.max() >= num_classes:
        raise ValueError(
            f"targets must be class indices in [0, {num_classes}), got {int(target.min())}..{int(target.max())}"
        )
    scores, target = scores.float().cpu(), target.long().cpu()
    confusion = confusion_matrix(scores.argmax(1), target, num_classes)
    support = confusion.sum(1)
    per_class = torch.where(support > 0, confusion.diagonal() / support.clamp_min(1), torch.nan) * 100.0
    return dict(
        top1=topk_accuracy(scores, target, 1),
        top5=topk_accuracy(scores, target, 5),
        mean_class_accuracy=per_class[support > 0].mean().item(),
        per_class_accuracy=per_class.tolist(),
        confusion=confusion,
        num_images=len(target),
    )


def write_confusion_matrix(
    path: Union[str, os.PathLike], confusion: Tensor, class_names: Optional[Sequence[str]] = None
) -> None:
    """CSV: a header ``true \\ predicted, <names>``, then one row per true class."""
    names = list(class_names) if class_names is not None else [str(i) for i in range(len(confusion))]
    if confusion.shape != (len(names), len(names)):
        raise ValueError(f"confusion matrix {tuple(confusion.shape)} for {len(names)} class names")
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["true \\ predicted"] + names)
        for name, row in zip(names, confusion.tolist()):
            writer.writerow([name] + row)


SUMMARY_KEYS = ("top1", "top5", "mean_class_accuracy")


def majority_baseline_scores(train_labels: Tensor, num_images: int, num_classes: int) -> Tensor:
    """``(num_images, C)`` scores that rank the classes by their training frequency
    (top-1 = always the most frequent training class): the floor any model must beat."""
    freq = torch.bincount(train_labels.long(), minlength=num_classes).float()
    return freq.expand(num_images, num_classes)


def format_single_label_table(metrics: dict, baseline: Optional[dict] = None) -> str:
    """``metric | model | baseline`` rows of the summary metrics (percent)."""
    lines = [
        "| metric | model |" + (" majority-class baseline |" if baseline else ""),
        "|---|---|" + ("---|" if baseline else ""),
    ]
    for key in SUMMARY_KEYS:
        row = f"| {key} | {metrics[key]:.2f} |"
        lines.append(row + (f" {baseline[key]:.2f} |" if baseline else ""))
    return "\n".join(lines)


def single_label_report(
    run_dir: Union[str, os.PathLike],
    class_names: Sequence[str],
    train_labels: Optional[Tensor],
    results: dict,
    write: bool = True,
) -> dict:
    """The final report of a single-label run: for every evaluated model in
    ``results`` (``{"model": evaluate(...), "ema": ...}`` with softmax
    ``scores`` (N, C), ``targets`` (N,), ``num_skipped``) the metrics next to
    the majority-class baseline (when ``train_labels`` are given), logged
    (INFO, ``gkg_pyg.single_label``: the scripts print it);
    with ``write``, ``metrics.json`` and ``confusion_matrix.csv``
    (``confusion_matrix_ema.csv``) in ``run_dir``. Returns the JSON content."""
    import json
    import math
    from pathlib import Path

    def scalars(m: dict) -> dict:
        return {k: (None if math.isnan(m[k]) else m[k]) for k in SUMMARY_KEYS}

    first = next(iter(results.values()))
    base, out = None, {}
    if train_labels is not None:
        base = single_label_metrics(
            majority_baseline_scores(train_labels, len(first["targets"]), len(class_names)),
            first["targets"],
            class_names,
        )
        out["baseline"] = scalars(base)
    for name, res in results.items():
        metrics = single_label_metrics(res["scores"], res["targets"], class_names)
        out[name] = dict(scalars(metrics), num_images=metrics["num_images"], num_skipped=res.get("num_skipped", 0))
        if write:
            against = " vs the majority-class baseline" if base is not None else ""
            log.info(f"\n{name}{against} ({metrics['num_images']} images):\n{format_single_label_table(metrics, base)}")
            suffix = "" if name == "model" else f"_{name}"
            Path(run_dir).mkdir(parents=True, exist_ok=True)
            write_confusion_matrix(Path(run_dir) / f"confusion_matrix{suffix}.csv", metrics["confusion"], class_names)
    if write:
        Path(run_dir).mkdir(parents=True, exist_ok=True)
        (Path(run_dir) / "metrics.json").write_text(json.dumps(out, indent=2))
        log.info(f"\nsaved {Path(run_dir) / 'metrics.json'} and {Path(run_dir) / 'confusion_matrix.csv'}")
    return out


def mixup_from_config(cfg: dict, num_classes: int) -> Optional[MixupCutmix]:
    """The ``single_label`` section's Mixup/CutMix (smoothing from ``loss.label_smoothing``),
    or None when both alphas are 0."""
    s = cfg["single_label"]
    if not (s["mixup_alpha"] or s["cutmix_alpha"]):
        return None
    return MixupCutmix(
        num_classes,
        s["mixup_alpha"],
        s["cutmix_alpha"],
        s["mix_prob"],
        s["switch_prob"],
        cfg["loss"]["label_smoothing"],
    )
