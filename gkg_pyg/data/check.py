"""The up-front image check: every file of a data set before anything runs.

``check_dataset(dataset, level)`` tests each image with
``gkg_pyg.data.images.check_image`` (levels "exists", "header", "decode")
in a pool of threads (PIL's decoders release the GIL), with a progress bar.
Bad images stop the run with a list that names them, or, with
``skip_bad_images``, are removed from the data set and counted, so that no
epoch meets them. An image that breaks later anyway (changed on disk, or a
level that does not decode) still stops the run with its path, or is
skipped and counted by the loader.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from tqdm import tqdm

from ..errors import ImageError, MissingFileError
from .base import ImageLabelDataset
from .images import CHECK_LEVELS, check_image

__all__ = ["CHECK_LEVELS", "BadImagesError", "ImageCheck", "MissingImagesError", "check_dataset", "find_bad_images"]


class BadImagesError(ImageError):
    """Images of a data set that are missing or cannot be decoded."""

    def __init__(self, message: str, bad: list[tuple[str, str]] | None = None) -> None:
        super().__init__(message)
        self.bad = bad or []


class MissingImagesError(BadImagesError, MissingFileError):
    """Images of a data set that are all missing (none exists but cannot be decoded)."""


@dataclass
class ImageCheck:
    """What ``check_dataset`` found: ``bad`` (path, reason) pairs, ``missing``
    (how many of them do not exist), ``checked`` (images tested)."""

    level: str
    checked: int
    bad: list[tuple[str, str]] = field(default_factory=list)

    @property
    def missing(self) -> int:
        return sum(reason == "missing file" for _, reason in self.bad)


def find_bad_images(
    paths: list[str], level: str = "decode", workers: int = 4, progress: bool = True, desc: str = "check images"
) -> list[tuple[str, str]]:
    """(path, reason) of every path that fails ``check_image`` at ``level``,
    in the order of ``paths``."""
    if level not in CHECK_LEVELS:
        raise ValueError(f"unknown image check level {level!r}; expected one of {CHECK_LEVELS}")
    workers = max(1, int(workers))
    with ThreadPoolExecutor(workers) as pool:
        # map() keeps the order; chunks of work keep the thread overhead low.
        results = pool.map(lambda p: check_image(p, level), paths)
        reasons = list(tqdm(results, total=len(paths), desc=desc, disable=not progress, leave=False,
                            dynamic_ncols=True, unit="img"))  # fmt: skip
    return [(p, r) for p, r in zip(paths, reasons) if r is not None]


def check_dataset(
    dataset: ImageLabelDataset, level: str = "decode", skip_bad_images: bool = False, what: str = "training",
    workers: int = 4, progress: bool = True,
) -> ImageCheck:  # fmt: skip
    """Check every image of ``dataset`` at ``level`` (see ``check_image``).

    Raises:
        BadImagesError (an OSError and a gkg_pyg.errors.ImageError;
            MissingImagesError, also a FileNotFoundError, when all are
            missing): some images are bad and not ``skip_bad_images``;
            the message gives their number, the first few paths with the
            reason, and how to skip them.
    With ``skip_bad_images`` the bad images are removed from the data set
    (``dataset.exclude``) and returned in the report.
    """
    bad = find_bad_images(dataset.paths, level, workers, progress, desc=f"check {what} images ({level})")
    report = ImageCheck(level, len(dataset.paths), bad)
    if not bad:
        return report
    if not skip_bad_images:
        missing = report.missing
        kinds = " or ".join(k for k, n in (("missing", missing), ("unreadable", len(bad) - missing)) if n)
        shown = "; ".join(f"{p} ({r})" for p, r in bad[:3]) + ("; ..." if len(bad) > 3 else "")
        error = MissingImagesError if missing == len(bad) else BadImagesError
        raise error(
            f"{len(bad)} of the {len(dataset.paths)} {what} images are {kinds}: {shown}; fix the data set "
            f"or pass --skip-bad-images (data.skip_bad_images=true) to leave them out",
            bad,
        )
    dataset.exclude([p for p, _ in bad])
    if len(dataset) == 0:
        raise BadImagesError(f"all {report.checked} {what} images are missing or unreadable "
                             f"(first: {bad[0][0]}: {bad[0][1]})", bad)  # fmt: skip
    return report
