"""Pascal VOC2007 multi-label loader.

Labels come from the XML annotations: a class is 1 when the image has at
least one non-difficult object of it, -1 when all its objects are marked
difficult (the VOC convention: such labels are ignored by the evaluation),
0 otherwise. VOC has no scale breakdown, so ``areas`` is all zeros.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from ..errors import DataError, MissingFileError
from .base import ImageLabelDataset

VOC_CLASSES = (
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa",
    "train", "tvmonitor",
)  # fmt: skip


def voc2007_dir(root: str | Path) -> Path:
    """The VOC2007 folder: ``root/VOCdevkit/VOC2007`` if it exists, else
    ``root`` itself (root pointing directly at VOC2007)."""
    root = Path(root)
    nested = root / "VOCdevkit" / "VOC2007"
    return nested if nested.is_dir() else root


def parse_voc_objects(xml_file: Path) -> list[tuple[str, bool]]:
    """(class name, difficult) of every <object> in a VOC annotation file."""
    try:
        tree = ET.parse(xml_file)
    except ET.ParseError as err:
        raise DataError(f"malformed VOC annotation {xml_file}: {err}") from err
    objects = []
    for obj in tree.getroot().iter("object"):
        name = (obj.findtext("name") or "").strip()
        difficult = int((obj.findtext("difficult") or "0").strip() or 0) == 1
        objects.append((name, difficult))
    return objects


class VOC2007Dataset(ImageLabelDataset):
    """Pascal VOC2007 classification, 20 classes in the standard order.

    Layout: ``root/VOCdevkit/VOC2007/{Annotations/<id>.xml,
    ImageSets/Main/<split>.txt, JPEGImages/<id>.jpg}`` (or ``root`` pointing
    at VOC2007). ``split``: ``"trainval"`` (5,011 images) or ``"test"``
    (4,952); ``"train"`` and ``"val"`` work too.
    """

    def __init__(
        self,
        root: str | Path,
        split: str,
        transform: Callable | None = None,
        skip_bad_images: bool = False,
    ) -> None:
        base = voc2007_dir(root)
        split_file = base / "ImageSets" / "Main" / f"{split}.txt"
        if not split_file.is_file():
            raise MissingFileError(
                f"VOC split file not found: {split_file} (root {root} must hold "
                f"VOCdevkit/VOC2007 or be the VOC2007 folder)"
            )
        for folder in ("Annotations", "JPEGImages"):
            if not (base / folder).is_dir():
                raise MissingFileError(f"VOC folder not found: {base / folder}")
        image_ids = [line.split()[0] for line in split_file.read_text().splitlines() if line.strip()]
        if not image_ids:
            raise DataError(f"VOC split {split!r} under {root} is empty ({split_file})")

        column = {name: i for i, name in enumerate(VOC_CLASSES)}
        targets = np.zeros((len(image_ids), len(VOC_CLASSES)), dtype=np.float32)
        for row, image_id in enumerate(image_ids):
            xml_file = base / "Annotations" / f"{image_id}.xml"
            if not xml_file.is_file():
                raise MissingFileError(f"VOC annotation file not found: {xml_file}")
            for name, difficult in parse_voc_objects(xml_file):
                if name not in column:
                    raise DataError(f"unknown VOC class {name!r} in {xml_file}")
                col = column[name]
                if not difficult:
                    targets[row, col] = 1.0
                elif targets[row, col] == 0.0:
                    targets[row, col] = -1.0

        paths = [str(base / "JPEGImages" / f"{i}.jpg") for i in image_ids]
        super().__init__(
            paths,
            torch.from_numpy(targets),
            torch.zeros(targets.shape),
            VOC_CLASSES,
            transform,
            skip_bad_images,
        )
        self.root = Path(root)
        self.split = split
        self.image_ids = image_ids
