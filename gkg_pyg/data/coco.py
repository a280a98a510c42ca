"""MS-COCO 2014 multi-label loader (and the image-list base class shared
with VOC).

Labels follow the usual multi-label COCO protocol (ASL, ML-GCN, the GKGNet
authors' data lists): an image is labelled with every category that has at
least one instance annotation, crowd annotations (``iscrowd=1``) included,
and only images with at least one label are kept (82,081 train / 40,137 val
images for COCO 2014). For the small / medium / large breakdown each label
also carries the largest annotation ``area`` (segmentation area in
original-image pixels, the field COCO's own scale buckets use).
"""

from __future__ import annotations

import contextlib
import io
import warnings
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from PIL import Image
from pycocotools.coco import COCO
from torch.utils.data import Dataset


def load_rgb(path: str) -> Image.Image:
    """Open ``path`` as an RGB PIL image, fully decoded.

    Raises:
        FileNotFoundError: the file does not exist (its ``filename`` is the
            path).
        OSError: the file is not a decodable image (truncated, corrupt, not
            an image); the message names the path.
    """
    try:
        with Image.open(path) as img:
            # convert() forces the full decode, so truncated files fail here
            # and not later inside a transform.
            return img.convert("RGB")
    except FileNotFoundError:
        raise
    except (OSError, SyntaxError) as err:
        # PIL raises SyntaxError for some malformed headers, and its OSError
        # for a truncated JPEG does not name the file.
        raise OSError(f"cannot read image {path}: {err}") from err


class ImageLabelDataset(Dataset):
    """Images on disk with a fixed (N, L) label matrix.

    Each sample is a dict::

        image:  transform(PIL RGB image); a (3, H, W) float tensor with the
                package's transforms; the PIL image when transform is None
        target: (L,) float tensor, 1 present, 0 absent, -1 present only
                through difficult objects (VOC)
        area:   (L,) float tensor, largest object area of each present label
                in original-image pixels, 0 where absent or unknown
        index:  int, position in the data set
        path:   str, the image file

    With ``skip_bad_images`` a missing or undecodable image gives ``None``
    (and a warning naming the file) instead of an exception; ``collate``
    drops such samples and counts them.
    """

    def __init__(
        self,
        paths: Sequence[str],
        targets: torch.Tensor,
        areas: torch.Tensor,
        class_names: Sequence[str],
        transform: Callable | None = None,
        skip_bad_images: bool = False,
    ) -> None:
        if targets.shape != areas.shape or targets.shape != (len(paths), len(class_names)):
            raise ValueError(
                f"targets {tuple(targets.shape)} and areas {tuple(areas.shape)} must both be "
                f"({len(paths)} images, {len(class_names)} classes)"
            )
        self.paths = list(paths)
        self.targets = targets.float()
        self.areas = areas.float()
        self.class_names = list(class_names)
        self.transform = transform
        self.skip_bad_images = skip_bad_images

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> dict | None:
        path = self.paths[index]
        try:
            image = load_rgb(path)
        except OSError as err:
            if not self.skip_bad_images:
                raise
            warnings.warn(f"skipping unreadable image {path}: {err}", stacklevel=2)
            return None
        if self.transform is not None:
            image = self.transform(image)
        # clone(): a row view would carry the whole (N, L) storage along when
        # a DataLoader worker ships the sample.
        return {
            "image": image,
            "target": self.targets[index].clone(),
            "area": self.areas[index].clone(),
            "index": int(index),
            "path": path,
        }

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(images={len(self)}, classes={len(self.class_names)}, "
            f"transform={self.transform!r})"
        )


def coco_paths(root: str | Path, split: str) -> tuple[Path, Path]:
    """(annotation json, image folder) of a COCO 2014 ``split`` under ``root``."""
    root = Path(root)
    return root / "annotations" / f"instances_{split}2014.json", root / f"{split}2014"


def _load_coco_quietly(ann_file: Path) -> COCO:
    # pycocotools prints progress lines to stdout on every load.
    with contextlib.redirect_stdout(io.StringIO()):
        return COCO(str(ann_file))


class CocoDataset(ImageLabelDataset):
    """COCO 2014 multi-label classification.

    Layout: ``root/annotations/instances_{split}2014.json`` and
    ``root/{split}2014/<file_name>``, ``split`` being ``"train"`` or ``"val"``
    (any name whose two paths exist works, e.g. the synthetic data set).
    Classes are the json's categories in increasing category-id order
    (80 for COCO, mapped to 0..79). Images are in increasing image-id order.
    """

    def __init__(
        self,
        root: str | Path,
        split: str,
        transform: Callable | None = None,
        skip_bad_images: bool = False,
    ) -> None:
        ann_file, image_dir = coco_paths(root, split)
        if not ann_file.is_file():
            raise FileNotFoundError(f"COCO annotation file not found: {ann_file}")
        if not image_dir.is_dir():
            raise FileNotFoundError(f"COCO image folder not found: {image_dir}")
        coco = _load_coco_quietly(ann_file)

        categories = sorted(coco.loadCats(coco.getCatIds()), key=lambda c: c["id"])
        column = {c["id"]: i for i, c in enumerate(categories)}
        for ann in coco.dataset.get("annotations", []):
            if ann["category_id"] not in column:
                raise ValueError(
                    f"annotation {ann.get('id')} (image {ann.get('image_id')}) in {ann_file} has "
                    f"category_id {ann['category_id']}, which is not in its categories "
                    f"{sorted(column)}"
                )

        # Crowd annotations count: the standard multi-label COCO labels
        # come from all instance annotations of an image.
        image_ids = [i for i in sorted(coco.getImgIds()) if coco.imgToAnns.get(i)]
        if not image_ids:
            raise ValueError(
                f"COCO split {split!r} under {root} has no image with at least one label "
                f"({ann_file})"
            )
        # numpy, not tensor element access: COCO train has ~600k annotations.
        targets = np.zeros((len(image_ids), len(categories)), dtype=np.float32)
        areas = np.zeros((len(image_ids), len(categories)), dtype=np.float32)
        for row, image_id in enumerate(image_ids):
            for ann in coco.imgToAnns[image_id]:
                col = column[ann["category_id"]]
                targets[row, col] = 1.0
                areas[row, col] = max(areas[row, col], float(ann["area"]))
        paths = [str(image_dir / coco.imgs[i]["file_name"]) for i in image_ids]

        super().__init__(
            paths,
            torch.from_numpy(targets),
            torch.from_numpy(areas),
            [c["name"] for c in categories],
            transform,
            skip_bad_images,
        )
        self.root = Path(root)
        self.split = split
        self.image_ids = image_ids
