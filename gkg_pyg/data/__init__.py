"""Data: COCO 2014, VOC2007 and a synthetic COCO-format data set, their
transforms, collation and class-balanced oversampling.

A sample is a dict {"image": (3, H, W) float tensor, "target": (L,) float
(1 / 0 / -1 difficult-only), "area": (L,) float (largest object area in
original-image pixels, 0 where absent or unknown), "index": int, "path": str}
or None for an unreadable image when skipping bad images.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Sequence

import torch

from .coco import CocoDataset, ImageLabelDataset, load_rgb
from .sampling import repeat_factor_indices, repeat_factors
from .synthetic import SYNTHETIC_CLASSES, ensure_synthetic, make_synthetic_coco, synthetic_params
from .transforms import MEAN, STD, CropMix, build_test_transform, build_train_transform
from .voc import VOC_CLASSES, VOC2007Dataset

DATASETS = ("coco", "voc2007", "synthetic")

__all__ = [
    "DATASETS", "MEAN", "STD", "SYNTHETIC_CLASSES", "VOC_CLASSES",
    "CocoDataset", "CropMix", "ImageLabelDataset", "VOC2007Dataset",
    "build_dataset", "build_test_transform", "build_train_transform", "collate",
    "ensure_synthetic", "load_rgb", "make_synthetic_coco", "repeat_factor_indices",
    "repeat_factors", "synthetic_params",
]  # fmt: skip


def build_dataset(
    name: str,
    root: str | Path,
    split: str,
    transform: Callable | None = None,
    skip_bad_images: bool = False,
    synthetic: dict | None = None,
) -> ImageLabelDataset:
    """Build a data set.

    Args:
        name: "coco" (split "train" / "val"), "voc2007" ("trainval" /
            "test") or "synthetic" ("train" / "val").
        root: the data set folder (layouts in data/README.md).
        split: see name.
        transform: applied to the PIL RGB image.
        skip_bad_images: return None (with a warning) for unreadable images
            instead of raising.
        synthetic: only for "synthetic": generation parameters for
            ``ensure_synthetic`` (num_train, num_val, image_size, seed,
            progress). Given, the data set under root is (re)generated
            unless it matches them; None uses a complete synthetic data set
            under root whatever its parameters, generating the default one
            (2000 + 500 images) when there is none.

    Raises:
        ValueError: unknown name, empty data set, unknown category.
        FileNotFoundError: missing annotation file or image folder.
    """
    if name == "coco":
        return CocoDataset(root, split, transform, skip_bad_images)
    if name == "voc2007":
        return VOC2007Dataset(root, split, transform, skip_bad_images)
    if name == "synthetic":
        if synthetic is not None or synthetic_params(root) is None:
            ensure_synthetic(root, **(synthetic or {}))
        return CocoDataset(root, split, transform, skip_bad_images)
    raise ValueError(f"unknown data set {name!r}; expected one of {DATASETS}")


def collate(batch: Sequence[dict | None]) -> dict:
    """Stack samples into a batch, dropping None (skipped) samples.

    Returns {"image": (B, 3, H, W), "target": (B, L), "area": (B, L),
    "index": (B,) long, "path": list[str], "num_skipped": int}, B the number
    of kept samples. When every sample was skipped, image / target / area
    are None and index is empty.
    """
    kept = [s for s in batch if s is not None]
    num_skipped = len(batch) - len(kept)
    if not kept:
        return {
            "image": None,
            "target": None,
            "area": None,
            "index": torch.empty(0, dtype=torch.long),
            "path": [],
            "num_skipped": num_skipped,
        }
    return {
        "image": torch.stack([s["image"] for s in kept]),
        "target": torch.stack([s["target"] for s in kept]),
        "area": torch.stack([s["area"] for s in kept]),
        "index": torch.tensor([s["index"] for s in kept], dtype=torch.long),
        "path": [s["path"] for s in kept],
        "num_skipped": num_skipped,
    }
