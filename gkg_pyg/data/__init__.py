"""Data: COCO-format (2014, 2017 or any instances JSON), VOC2007, CSV
multi-label lists and a synthetic COCO-format data set; image decoding, the
up-front image check, transforms, collation and class-balanced oversampling.

A sample is a dict {"image": (3, H, W) float tensor, "target": (L,) float
(1 / 0 / -1 difficult-only), "area": (L,) float (largest object area in
original-image pixels, 0 where absent or unknown), "index": int, "path": str}
or None for an unreadable image when skipping bad images.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Sequence

import torch

from ..errors import ConfigError
from .base import EMPTY_LABELS, ImageLabelDataset
from .check import (
    CHECK_LEVELS, BadImagesError, ImageCheck, MissingImagesError, check_dataset, find_bad_images,
)  # fmt: skip
from .coco import CocoDataset, coco_category_names, coco_split_files
from .csv import CSV_FORMATS, CsvDataset, csv_class_names, read_class_list
from .images import IMAGE_SUFFIXES, UnreadableImageError, check_image, find_images, load_rgb, to_rgb
from .sampling import repeat_factor_indices, repeat_factors
from .synthetic import SYNTHETIC_CLASSES, ensure_synthetic, make_synthetic_coco, synthetic_params
from .transforms import (
    MEAN, STD, CropMix, build_test_transform, build_train_transform, checkpoint_preprocess, preprocess_for_config,
    preprocess_info, transform_from_preprocess,
)  # fmt: skip
from .voc import VOC_CLASSES, VOC2007Dataset

DATASETS = ("coco", "voc2007", "synthetic", "csv")

__all__ = [
    "CHECK_LEVELS", "CSV_FORMATS", "DATASETS", "EMPTY_LABELS", "IMAGE_SUFFIXES", "MEAN", "STD",
    "SYNTHETIC_CLASSES", "VOC_CLASSES",
    "BadImagesError", "CocoDataset", "CropMix", "CsvDataset", "ImageCheck", "ImageLabelDataset",
    "MissingImagesError", "UnreadableImageError", "VOC2007Dataset",
    "build_dataset", "build_test_transform", "build_train_transform", "check_dataset", "check_image",
    "checkpoint_preprocess",
    "class_names_from_config", "coco_category_names", "coco_split_files", "collate", "csv_class_names",
    "dataset_from_config", "ensure_synthetic",
    "find_bad_images", "find_images", "load_rgb", "make_synthetic_coco", "preprocess_for_config", "preprocess_info",
    "read_class_list",
    "repeat_factor_indices", "repeat_factors", "synthetic_params", "to_rgb", "transform_from_preprocess",
]  # fmt: skip


def build_dataset(
    name: str,
    root: str | Path,
    split: str,
    transform: Callable | None = None,
    skip_bad_images: bool = False,
    synthetic: dict | None = None,
    *,
    ann_file: str | Path | None = None,
    image_dir: str | Path | None = None,
    empty_labels: str = "drop",
    csv: dict | None = None,
) -> ImageLabelDataset:
    """Build a data set.

    Args:
        name: "coco" (split "train" / "val" / "train2017" / ..., or any name
            with ``ann_file``), "voc2007" ("trainval" / "test"), "synthetic"
            ("train" / "val") or "csv" (split: a name only).
        root: the data set folder (layouts in data/README.md); relative
            ``ann_file``, ``image_dir`` and CSV files are taken relative to it.
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
        ann_file, image_dir: "coco": explicit instances JSON and image folder
            (both or neither; default: found under root). "csv": image_dir is
            the folder the CSV's image paths are relative to (default root).
        empty_labels: "coco" / "csv": images without any label are
            "drop"ped (default), kept ("keep", all-negative) or an "error".
        csv: only for "csv": ``{"file": CSV file, "format": "names" |
            "columns", "classes": list / class-list file / None, "image_column",
            "labels_column", "delimiter", "label_delimiter"}`` (``CsvDataset``
            arguments; only "file" is required).

    Raises:
        ConfigError / DataError (ValueErrors): unknown name, empty data set,
            unknown category or label.
        MissingFileError (a FileNotFoundError): missing annotation file, CSV
            file or image folder.
    """
    if name in ("coco", "synthetic"):
        if name == "synthetic" and (synthetic is not None or synthetic_params(root) is None):
            ensure_synthetic(root, **(synthetic or {}))
        return CocoDataset(root, split, transform, skip_bad_images, ann_file=ann_file, image_dir=image_dir,
                           empty_labels=empty_labels)  # fmt: skip
    if name == "voc2007":
        return VOC2007Dataset(root, split, transform, skip_bad_images)
    if name == "csv":
        options = dict(csv or {})
        if not options.get("file"):
            raise ConfigError(f"data set 'csv', split {split!r}: no CSV file given (data.csv.{split})")
        csv_file = Path(root) / options.pop("file")
        image_root = Path(root) / image_dir if image_dir is not None else Path(root)
        return CsvDataset(csv_file, image_root, transform, skip_bad_images, fmt=options.pop("format", "names"),
                          empty_labels=empty_labels, **options)  # fmt: skip
    raise ConfigError(f"unknown data set {name!r}; expected one of {DATASETS}")


def dataset_from_config(data: dict, role: str, transform: Callable | None = None) -> ImageLabelDataset:
    """The ``role`` ("train" or "val") data set of a config's ``data`` section.

    The split is ``data.train_split`` / ``data.val_split``; ``data.ann_file``,
    ``data.image_dir`` and ``data.csv`` hold one entry per role. A CSV data
    set without ``data.csv.classes`` takes its class list from the training
    CSV for both roles, so that they agree.
    """
    if role not in ("train", "val"):
        raise ValueError(f"role must be 'train' or 'val', got {role!r}")
    name, root = data["name"], data["root"]
    split = data[f"{role}_split"]
    synthetic = data.get("synthetic") if name == "synthetic" else None
    csv_options = None
    if name == "csv":
        c = data["csv"]
        classes = c.get("classes")
        if classes is None and c.get("train"):
            classes = csv_class_names(Path(root) / c["train"], c["format"], c["image_column"], c["labels_column"],
                                      c["delimiter"], c["label_delimiter"])  # fmt: skip
        elif isinstance(classes, str):
            classes = str(Path(root) / classes)
        csv_options = {"file": c.get(role), "format": c["format"], "classes": classes,
                       "image_column": c["image_column"], "labels_column": c["labels_column"],
                       "delimiter": c["delimiter"], "label_delimiter": c["label_delimiter"]}  # fmt: skip
    return build_dataset(
        name, root, split, transform, data["skip_bad_images"], synthetic,
        ann_file=(data.get("ann_file") or {}).get(role), image_dir=(data.get("image_dir") or {}).get(role),
        empty_labels=data.get("empty_labels", "drop"), csv=csv_options,
    )  # fmt: skip


def class_names_from_config(data: dict) -> list[str]:
    """The class list of a config's data set, read cheaply (no image, no
    generation): fixed lists for "synthetic" and "voc2007", the categories of
    the evaluation split's instances JSON for "coco", the given or training
    class list for "csv"; other data sets are built (``dataset_from_config``).
    """
    name = data["name"]
    if name == "synthetic":
        return list(SYNTHETIC_CLASSES)
    if name == "voc2007":
        return list(VOC_CLASSES)
    if name == "csv":
        c = data["csv"]
        if c.get("classes") is not None:
            classes = c["classes"]
            return read_class_list(str(Path(data["root"]) / classes) if isinstance(classes, str) else classes)
        if not c.get("train"):
            raise ConfigError("data.csv.train is not set, so the CSV class list is unknown (set data.csv.classes)")
        return csv_class_names(Path(data["root"]) / c["train"], c["format"], c["image_column"], c["labels_column"],
                               c["delimiter"], c["label_delimiter"])  # fmt: skip
    if name == "coco":
        explicit = (data.get("ann_file") or {}).get("val")
        ann = Path(data["root"]) / explicit if explicit else coco_split_files(data["root"], data["val_split"])[0]
        return coco_category_names(ann)
    return dataset_from_config(data, "val").class_names


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
