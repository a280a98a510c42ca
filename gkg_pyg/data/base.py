"""The image-list data set every loader (COCO, VOC, CSV, ...) builds on."""

from __future__ import annotations

import logging
import warnings
from typing import Callable, Sequence

import torch
from torch.utils.data import Dataset

from ..errors import DataError
from .images import load_rgb

EMPTY_LABELS = ("drop", "keep", "error")
log = logging.getLogger(__name__)


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

    Images are decoded by ``gkg_pyg.data.images.load_rgb`` (every PIL mode
    to upright 8-bit RGB). With ``skip_bad_images`` a missing or undecodable
    image gives ``None`` (and a warning naming the file) instead of an
    exception; ``collate`` drops such samples and counts them. Without it the
    exception names the file.

    Subclasses with more per-image lists name them in ``per_image_fields``
    so that ``exclude`` keeps them aligned.
    """

    per_image_fields: tuple[str, ...] = ()

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
            raise DataError(
                f"targets {tuple(targets.shape)} and areas {tuple(areas.shape)} must both be "
                f"({len(paths)} images, {len(class_names)} classes)"
            )
        self.paths = list(paths)
        self.targets = targets.float()
        self.areas = areas.float()
        self.class_names = list(class_names)
        self.transform = transform
        self.skip_bad_images = skip_bad_images
        self.excluded: list[str] = []

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> dict | None:
        path = self.paths[index]
        try:
            image = load_rgb(path)
        except OSError as err:  # FileNotFoundError and UnreadableImageError name the file
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

    def exclude(self, paths: Sequence[str]) -> int:
        """Remove the images with these paths (e.g. found unreadable up
        front); returns how many were removed. ``excluded`` lists them all."""
        bad = set(paths)
        keep = [i for i, p in enumerate(self.paths) if p not in bad]
        if len(keep) == len(self.paths):
            return 0
        removed = [p for p in self.paths if p in bad]
        index = torch.tensor(keep, dtype=torch.long)
        self.paths = [self.paths[i] for i in keep]
        self.targets = self.targets[index]
        self.areas = self.areas[index]
        for name in self.per_image_fields:
            values = getattr(self, name)
            setattr(self, name, [values[i] for i in keep])
        self.excluded += removed
        return len(removed)

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(images={len(self)}, classes={len(self.class_names)}, transform={self.transform!r})"
        )


def handle_empty_rows(
    targets, policy: str, what: str, describe: Callable[[int], str], unit: str = "images"
) -> tuple[list[int], list[int]]:
    """(rows to keep, rows without any label) of an (N, L) label array under
    ``policy`` for rows without a label (``data.empty_labels``): "drop" them,
    "keep" them (all-negative images) or "error" (DataError naming the first
    few with ``describe(row)``, e.g. their file names).

    Dropped and kept rows are counted in an INFO record of the
    ``gkg_pyg.data`` logger naming ``what`` (the file) and the option, so
    that a run never loses images without a word. ``unit`` names the rows
    ("images", "rows").
    """
    if policy not in EMPTY_LABELS:
        raise DataError(f"empty_labels must be one of {EMPTY_LABELS}, got {policy!r}")
    has_label = (torch.as_tensor(targets) != 0).any(dim=1).tolist() if len(targets) else []
    empty = [i for i, has in enumerate(has_label) if not has]
    if policy == "error" and empty:
        shown = ", ".join(describe(i) for i in empty[:3]) + (", ..." if len(empty) > 3 else "")
        raise DataError(
            f"{len(empty)} of the {len(targets)} images of {what} have no label ({shown}); "
            f"data.empty_labels=drop leaves them out, =keep trains on them as all-negative images"
        )
    if policy == "keep":
        if empty:
            log.info(f"kept {len(empty)} of the {len(targets)} {unit} of {what} without any label as all-negative "
                     "images (data.empty_labels: keep)")  # fmt: skip
        return list(range(len(targets))), empty
    if empty:
        log.info(f"dropped {len(empty)} of the {len(targets)} {unit} of {what} without any label; set "
                 "data.empty_labels: keep to keep them as all-negative images (or error to stop)")  # fmt: skip
    return [i for i, has in enumerate(has_label) if has], empty
