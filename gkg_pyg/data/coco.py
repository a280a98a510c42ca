"""COCO-format multi-label loader: any instances JSON plus an image folder.

Labels follow the usual multi-label COCO protocol (ASL, ML-GCN, the GKGNet
authors' data lists): an image is labelled with every category that has at
least one instance annotation, crowd annotations (``iscrowd=1``) included;
by default only images with at least one label are kept (82,081 train /
40,137 val images for COCO 2014; how many were left out is logged). For the small / medium / large breakdown
each label also carries the largest annotation ``area`` (segmentation area
in original-image pixels, the field COCO's own scale buckets use).

Where the files are: either explicitly (``ann_file`` and ``image_dir``) or
found under a root in the 2014 or 2017 layout (``coco_split_files``).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from ..errors import DataError, MissingFileError
from .base import EMPTY_LABELS, ImageLabelDataset, handle_empty_rows
from .images import load_rgb

__all__ = ["CocoDataset", "ImageLabelDataset", "coco_category_names", "coco_paths", "coco_split_files", "load_rgb"]


def coco_paths(root: str | Path, split: str) -> tuple[Path, Path]:
    """(annotation json, image folder) of the COCO 2014 layout of ``split``
    under ``root`` (what the synthetic generator writes)."""
    root = Path(root)
    return root / "annotations" / f"instances_{split}2014.json", root / f"{split}2014"


def _layouts(root: Path, name: str) -> list[tuple[Path, Path]]:
    ann = root / "annotations" / f"instances_{name}.json"
    return [(ann, root / name), (ann, root / "images" / name)]


def coco_split_files(root: str | Path, split: str) -> tuple[Path, Path]:
    """(instances JSON, image folder) of ``split`` under ``root``.

    Looks for ``annotations/instances_<name>.json`` with its images in
    ``<name>/`` or ``images/<name>/``, where ``<name>`` is the split itself
    (``train2017``, ``val2014``, or any name such as ``train``) and, for a
    split without a year, also ``<split>2014`` and ``<split>2017``. Exactly
    one complete match must exist.

    Raises:
        FileNotFoundError: nothing matches (the message lists what was looked for).
        ValueError: several layouts match (e.g. both 2014 and 2017 under one root).
    """
    root = Path(root)
    names = [split] if re.search(r"\d{4}$", split) else [split, f"{split}2014", f"{split}2017"]
    found, tried = [], []
    for name in names:
        for ann, images in _layouts(root, name):
            tried.append((ann, images))
            if ann.is_file() and images.is_dir():
                found.append((ann, images))
                break
    if len(found) == 1:
        return found[0]
    if found:
        years = ", ".join(f"{a.name} + {i.relative_to(root)}/" for a, i in found)
        raise DataError(
            f"COCO split {split!r} is ambiguous under {root}: {years}; name the split with its year "
            f"(e.g. data.train_split=train2017) or give data.ann_file / data.image_dir"
        )
    anns = sorted({str(a) for a, _ in tried if a.is_file()})
    if anns:  # an annotation file without its image folder
        folders = ", ".join(str(i) for a, i in tried if str(a) in anns)
        raise MissingFileError(f"COCO image folder not found for {', '.join(anns)}: looked for {folders}")
    looked = ", ".join(dict.fromkeys(str(a.relative_to(root)) for a, _ in tried))
    raise MissingFileError(
        f"COCO annotation file not found under {root} for split {split!r}: looked for {looked} "
        f"(or give data.ann_file and data.image_dir)"
    )


def _read_json(ann_file: Path) -> dict:
    try:
        with ann_file.open("rb") as f:
            data = json.load(f)
    except json.JSONDecodeError as err:
        raise DataError(f"{ann_file} is not valid JSON: {err}") from err
    if not isinstance(data, dict):
        raise DataError(f"{ann_file} is not a COCO annotation file (top level is not an object)")
    for key in ("images", "annotations", "categories"):
        if not isinstance(data.get(key), list):
            raise DataError(f"{ann_file} is not a COCO instances file: it has no {key!r} list")
    for key, fields in (("images", ("id", "file_name")), ("annotations", ("image_id", "category_id")),
                        ("categories", ("id", "name"))):  # fmt: skip
        for i, entry in enumerate(data[key]):
            missing = [f for f in fields if not isinstance(entry, dict) or f not in entry]
            if missing:
                raise DataError(f"{ann_file}: {key}[{i}] has no {' or '.join(map(repr, missing))}")
    return data


def _sorted_categories(data: dict, ann_file: Path) -> list[dict]:
    """The categories in increasing id order; their names must be unique."""
    categories = sorted(data["categories"], key=lambda c: c["id"])
    if not categories:
        raise DataError(f"{ann_file} has no categories")
    if len({c["id"] for c in categories}) != len(categories):
        raise DataError(f"{ann_file} lists a category id twice")
    names = [str(c["name"]) for c in categories]
    if len(set(names)) != len(names):
        twice = sorted({n for n in names if names.count(n) > 1})
        raise DataError(f"{ann_file} has several categories named {', '.join(map(repr, twice))}")
    return categories


def coco_category_names(ann_file: str | Path) -> list[str]:
    """The class names of an instances JSON, in increasing category-id order."""
    ann_file = Path(ann_file)
    if not ann_file.is_file():
        raise MissingFileError(f"COCO annotation file not found: {ann_file}")
    return [str(c["name"]) for c in _sorted_categories(_read_json(ann_file), ann_file)]


def _area(ann: dict) -> float:
    """The annotation's ``area``; without one, its box area; else 0 (unknown)."""
    if ann.get("area") is not None:
        return float(ann["area"])
    box = ann.get("bbox")
    return float(box[2] * box[3]) if box and len(box) == 4 else 0.0


class CocoDataset(ImageLabelDataset):
    """Multi-label classification from a COCO instances file.

    Args:
        root: folder searched for the 2014 / 2017 layout (``coco_split_files``)
            when ``ann_file`` is not given; relative ``ann_file`` /
            ``image_dir`` are taken relative to it.
        split: the split to find under ``root`` (``train``, ``val``,
            ``train2017``, ...); only a name when ``ann_file`` is given.
        transform: applied to the PIL RGB image.
        skip_bad_images: see ``ImageLabelDataset``.
        ann_file, image_dir: explicit files (both or neither); the images'
            ``file_name`` are relative to ``image_dir``.
        empty_labels: images without any annotation: "drop" (default, the
            standard protocol), "keep" (all-negative rows) or "error".

    Classes are the JSON's categories in increasing category-id order (the
    order COCO lists them; 80 for COCO, ids 1..90 with gaps mapped to
    0..79), named by their ``name``. Images are in increasing image-id order.
    """

    per_image_fields = ("image_ids",)

    def __init__(
        self,
        root: str | Path | None = None,
        split: str = "train",
        transform: Callable | None = None,
        skip_bad_images: bool = False,
        ann_file: str | Path | None = None,
        image_dir: str | Path | None = None,
        empty_labels: str = "drop",
    ) -> None:
        if empty_labels not in EMPTY_LABELS:
            raise DataError(f"empty_labels must be one of {EMPTY_LABELS}, got {empty_labels!r}")
        base = Path(root) if root is not None else Path(".")
        if (ann_file is None) != (image_dir is None):
            given, other = ("ann_file", "image_dir") if ann_file is not None else ("image_dir", "ann_file")
            raise DataError(f"COCO split {split!r}: {given} is given but {other} is not; give both or neither")
        if ann_file is None:
            if root is None:
                raise DataError("CocoDataset needs a root or ann_file and image_dir")
            ann_path, image_path = coco_split_files(base, split)
        else:
            ann_path, image_path = base / ann_file, base / image_dir
            if not ann_path.is_file():
                raise MissingFileError(f"COCO annotation file not found: {ann_path}")
            if not image_path.is_dir():
                raise MissingFileError(f"COCO image folder not found: {image_path}")
        data = _read_json(ann_path)

        categories = _sorted_categories(data, ann_path)
        column = {c["id"]: i for i, c in enumerate(categories)}
        names = [str(c["name"]) for c in categories]
        images, id_of_file = {}, {}
        for img in data["images"]:
            if img["id"] in images:
                raise DataError(
                    f"{ann_path} lists image id {img['id']!r} twice ({images[img['id']]['file_name']!r} and "
                    f"{img['file_name']!r})"
                )
            if img["file_name"] in id_of_file:  # one file, two label sets: evaluated twice, once wrong
                raise DataError(
                    f"{ann_path} lists the file {img['file_name']!r} under two image ids "
                    f"({id_of_file[img['file_name']]!r} and {img['id']!r})"
                )
            images[img["id"]] = img
            id_of_file[img["file_name"]] = img["id"]
        by_image: dict = {}
        for ann in data["annotations"]:
            if ann["category_id"] not in column:
                raise DataError(
                    f"annotation {ann.get('id')} (image {ann.get('image_id')!r}) in {ann_path} has "
                    f"category_id {ann['category_id']!r}, which is not in its categories {sorted(column)}"
                )
            if ann["image_id"] not in images:
                raise DataError(
                    f"annotation {ann.get('id')} in {ann_path} refers to image_id {ann['image_id']!r}, "
                    f"which is not in its images"
                )
            by_image.setdefault(ann["image_id"], []).append(ann)

        all_ids = sorted(images)
        # numpy, not tensor element access: COCO train has ~600k annotations.
        targets = np.zeros((len(all_ids), len(categories)), dtype=np.float32)
        areas = np.zeros((len(all_ids), len(categories)), dtype=np.float32)
        for row, image_id in enumerate(all_ids):
            for ann in by_image.get(image_id, ()):
                col = column[ann["category_id"]]
                targets[row, col] = 1.0
                areas[row, col] = max(areas[row, col], _area(ann))
        keep, empty = handle_empty_rows(
            targets, empty_labels, f"{ann_path}", lambda r: str(images[all_ids[r]]["file_name"])
        )
        image_ids = [all_ids[r] for r in keep]
        if not image_ids:
            raise DataError(
                f"COCO split {split!r} ({ann_path}) has no image with at least one label"
                + (" (data.empty_labels=keep keeps unlabelled images)" if empty else "")
            )
        paths = [str(image_path / images[i]["file_name"]) for i in image_ids]
        super().__init__(
            paths,
            torch.from_numpy(targets[keep]),
            torch.from_numpy(areas[keep]),
            names,
            transform,
            skip_bad_images,
        )
        self.root = base
        self.split = split
        self.ann_file = ann_path
        self.image_dir = image_path
        self.image_ids = image_ids
        self.num_without_labels = len(empty)
