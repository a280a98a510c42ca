"""Single-label classification data: an image folder (torchvision's
``ImageFolder`` layout), CIFAR-10/100 from their python-pickle files, and a
built-in synthetic data set of shapes written as an image folder.

A sample is a dict ``{"image": transform(PIL RGB image), "target": () long
class index, "index": int, "path": str}``, or ``None`` for an unreadable image
when skipping bad images; :func:`collate_single_label` stacks them.

Layouts
-------
* image folder: ``root/<split>/<class>/<image>``; the classes are the
  sub-folders of the split, sorted by name (torchvision's order); files are
  images by their ending (:data:`gkg_pyg.data.images.IMAGE_SUFFIXES`), searched
  recursively inside each class folder. ImageNet-1k (``train/``, ``val/`` with
  one folder per synset) and Oxford Flowers-102 sorted into class folders use it.
* CIFAR-10: ``root/cifar-10-batches-py/`` (or ``root`` itself) with
  ``data_batch_1`` .. ``data_batch_5``, ``test_batch`` and ``batches.meta``;
  CIFAR-100: ``root/cifar-100-python/`` (or ``root``) with ``train``, ``test``
  and ``meta``. Each batch is a pickled dict with ``b'data'`` ``(N, 3072)``
  uint8 (the red, green and blue 32 x 32 planes of each image) and
  ``b'labels'`` (CIFAR-10) or ``b'fine_labels'`` (CIFAR-100); the class names
  are ``b'label_names'`` / ``b'fine_label_names'`` of the meta file.
  Splits: ``"train"`` and ``"test"``.
"""

from __future__ import annotations

import json
import math
import pickle
import warnings
from pathlib import Path
from typing import Callable, List, Optional, Sequence, Tuple

import numpy as np
import torch
from PIL import Image, ImageDraw
from torch.utils.data import Dataset

from ..errors import ConfigError, DataError, MissingFileError
from .images import IMAGE_SUFFIXES, load_rgb

__all__ = [
    "CIFARDataset",
    "ImageFolderDataset",
    "SINGLE_LABEL_DATASETS",
    "SYNTHETIC_SHAPES",
    "SingleLabelDataset",
    "collate_single_label",
    "ensure_synthetic_shapes",
    "make_synthetic_shapes",
    "single_label_dataset",
    "single_label_split",
    "single_label_transform",
]


class SingleLabelDataset(Dataset):
    """Images (files, or in-memory ``(N, H, W, 3)`` uint8 arrays) with one class each."""

    def __init__(
        self,
        class_names: Sequence[str],
        labels: Sequence[int],
        transform: Optional[Callable] = None,
        paths: Optional[Sequence[str]] = None,
        pixels: Optional[np.ndarray] = None,
        skip_bad_images: bool = False,
        source: str = "",
    ):
        if (paths is None) == (pixels is None):
            raise ValueError("give either image paths or pixel arrays")
        count = len(paths) if paths is not None else len(pixels)
        if len(labels) != count:
            raise ValueError(f"{len(labels)} labels for {count} images")
        if count == 0:
            raise DataError(f"no images in {source or 'the data set'}")
        self.labels = torch.as_tensor(np.asarray(labels, dtype=np.int64))
        if self.labels.min() < 0 or self.labels.max() >= len(class_names):
            raise ValueError(
                f"labels of {source or 'the data set'} must lie in [0, {len(class_names)}), got "
                f"{int(self.labels.min())}..{int(self.labels.max())}"
            )
        self.class_names = list(class_names)
        # In-memory data sets have no files: an empty path list (nothing to check up front).
        self.paths = list(paths) if paths is not None else []
        self.pixels = pixels
        self.transform, self.skip_bad_images, self.source = transform, skip_bad_images, source
        self.excluded: List[str] = []

    def exclude(self, paths: Sequence[str]) -> int:
        """Remove the images with these paths (found unreadable by the up-front
        check); returns how many were removed. ``excluded`` lists them all."""
        bad = set(paths)
        keep = [i for i, p in enumerate(self.paths) if p not in bad]
        removed = len(self.paths) - len(keep)
        if removed:
            self.excluded += [p for p in self.paths if p in bad]
            self.paths = [self.paths[i] for i in keep]
            self.labels = self.labels[torch.tensor(keep, dtype=torch.long)]
        return removed

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> Optional[dict]:
        if self.pixels is None:
            path = self.paths[index]
            try:
                image = load_rgb(path)
            except OSError as err:
                if not self.skip_bad_images:
                    raise
                warnings.warn(f"skipping unreadable image {path}: {err}", stacklevel=2)
                return None
        else:
            path = f"{self.source}[{index}]"
            image = Image.fromarray(self.pixels[index])
        if self.transform is not None:
            image = self.transform(image)
        return {"image": image, "target": self.labels[index].clone(), "index": int(index), "path": path}

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}({self.source!r}, images={len(self)}, classes={self.num_classes}, "
            f"transform={self.transform!r})"
        )


class ImageFolderDataset(SingleLabelDataset):
    """``root/<split>/<class>/<image>`` (see the module docstring).

    ``class_names`` (e.g. the training split's) fixes the classes and their
    order; a class folder that is not among them is an error, a class without
    a folder in this split simply has no images here.
    """

    def __init__(
        self,
        root,
        split: str = "train",
        transform: Optional[Callable] = None,
        skip_bad_images: bool = False,
        class_names: Optional[Sequence[str]] = None,
    ):
        folder = Path(root) / split
        if not folder.is_dir():
            raise MissingFileError(
                f"image folder split not found: {folder} (expected {Path(root)}/{split}/<class>/<image>)"
            )
        found = sorted(p.name for p in folder.iterdir() if p.is_dir())
        if not found:
            raise MissingFileError(f"no class folders in {folder} (expected {folder}/<class>/<image>)")
        if class_names is None:
            class_names = found
        else:
            extra = [c for c in found if c not in class_names]
            if extra:
                raise DataError(
                    f"{folder} has class folders that are not among the {len(class_names)} classes: {extra[:5]}"
                )
        suffixes = tuple(s.lower() for s in IMAGE_SUFFIXES)
        paths, labels = [], []
        for label, name in enumerate(class_names):
            if not (folder / name).is_dir():
                continue
            files = sorted(p for p in (folder / name).rglob("*") if p.is_file() and p.suffix.lower() in suffixes)
            if not files:
                raise MissingFileError(
                    f"class folder {folder / name} holds no image (endings {', '.join(IMAGE_SUFFIXES)})"
                )
            paths += [str(p) for p in files]
            labels += [label] * len(files)
        super().__init__(
            class_names, labels, transform, paths=paths, skip_bad_images=skip_bad_images, source=str(folder)
        )
        self.root, self.split = Path(root), split


_CIFAR = {
    # name: (folder, {split: files}, meta file, label key, class-name key)
    "cifar10": (
        "cifar-10-batches-py",
        {"train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"]},
        "batches.meta",
        b"labels",
        b"label_names",
    ),
    "cifar100": (
        "cifar-100-python",
        {"train": ["train"], "test": ["test"]},
        "meta",
        b"fine_labels",
        b"fine_label_names",
    ),
}


def _unpickle(path: Path) -> dict:
    if not path.is_file():
        raise MissingFileError(f"CIFAR file not found: {path}")
    try:
        with open(path, "rb") as f:
            out = pickle.load(f, encoding="bytes")
    except (pickle.UnpicklingError, EOFError, ValueError) as err:
        raise DataError(f"cannot read CIFAR file {path}: not a python pickle ({err})") from None
    if not isinstance(out, dict):
        raise DataError(f"CIFAR file {path} holds a {type(out).__name__}, expected a dict")
    return out


def _key(d: dict, key: bytes, path: Path):
    for k in (key, key.decode()):  # files re-pickled under Python 3 may use str keys
        if k in d:
            return d[k]
    raise DataError(f"CIFAR file {path} has no {key!r} entry (keys: {sorted(map(str, d))[:6]})")


class CIFARDataset(SingleLabelDataset):
    """CIFAR-10 (``name="cifar10"``) or CIFAR-100 (``"cifar100"``, fine labels)
    from the python version of the data set (see the module docstring)."""

    def __init__(self, root, split: str = "train", name: str = "cifar10", transform: Optional[Callable] = None):
        if name not in _CIFAR:
            raise ValueError(f"unknown CIFAR data set {name!r}; expected one of {sorted(_CIFAR)}")
        folder_name, files, meta_name, label_key, names_key = _CIFAR[name]
        if split not in files:
            raise ValueError(f"CIFAR split must be 'train' or 'test', got {split!r}")
        root = Path(root)
        folder = root / folder_name if (root / folder_name).is_dir() else root
        if not (folder / meta_name).is_file():
            raise MissingFileError(
                f"{name} not found under {root}: expected {root / folder_name / meta_name} "
                f"(the python version of the data set, unpacked)"
            )
        meta_path = folder / meta_name
        class_names = [
            n.decode() if isinstance(n, bytes) else str(n) for n in _key(_unpickle(meta_path), names_key, meta_path)
        ]
        arrays, labels = [], []
        for file in files[split]:
            path = folder / file
            batch = _unpickle(path)
            data, batch_labels = np.asarray(_key(batch, b"data", path)), list(_key(batch, label_key, path))
            if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
                raise DataError(f"CIFAR file {path}: b'data' must be uint8 (N, 3072), got {data.dtype} {data.shape}")
            if len(batch_labels) != len(data):
                raise DataError(f"CIFAR file {path}: {len(batch_labels)} labels for {len(data)} images")
            arrays.append(data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))  # planes -> (N, 32, 32, RGB)
            labels += batch_labels
        super().__init__(
            class_names,
            labels,
            transform,
            pixels=np.ascontiguousarray(np.concatenate(arrays)),
            source=f"{name}:{split}",
        )
        self.root, self.split, self.name = root, split, name


def collate_single_label(batch: Sequence[Optional[dict]]) -> dict:
    """Stack samples, dropping ``None`` (skipped) ones: ``{"image": (B, 3, H, W),
    "target": (B,) long, "index": (B,) long, "path": list, "num_skipped": int}``
    (``image`` and ``target`` are None when every sample was skipped)."""
    kept = [s for s in batch if s is not None]
    return {
        "image": torch.stack([s["image"] for s in kept]) if kept else None,
        "target": torch.stack([s["target"] for s in kept]) if kept else None,
        "index": torch.tensor([s["index"] for s in kept], dtype=torch.long),
        "path": [s["path"] for s in kept],
        "num_skipped": len(batch) - len(kept),
    }


# ---------------------------------------------------------------------------
# From a config (``task: single_label``)
# ---------------------------------------------------------------------------
SINGLE_LABEL_DATASETS = ("image_folder", "cifar10", "cifar100", "synthetic_shapes")


def single_label_transform(
    img_size: int, train: bool, mean: Sequence[float], std: Sequence[float], options: dict
) -> Callable:
    """timm's ImageNet transforms (what Pyramid ViG's recipe uses), bicubic.

    Training: RandomResizedCrop(``crop_scale``, ``crop_ratio``; ``[1, 1]`` and
    ``[1, 1]`` is a plain resize of a square image, e.g. CIFAR to 224),
    horizontal flip (``hflip``), ``auto_augment`` (a timm string such as
    ``"rand-m9-mstd0.5-inc1"``; timm then leaves colour jitter out) or
    ``color_jitter``, normalisation, random erasing (``random_erasing``,
    per-pixel noise). Evaluation: resize to ``img_size / eval_crop_pct``,
    centre crop ``img_size``, normalisation. ``mean``/``std`` on the 0-1 scale.
    """
    from timm.data import create_transform

    if not train:
        return create_transform(
            img_size,
            is_training=False,
            interpolation="bicubic",
            mean=tuple(mean),
            std=tuple(std),
            crop_pct=options["eval_crop_pct"],
        )
    try:
        return create_transform(
            img_size,
            is_training=True,
            scale=tuple(options["crop_scale"]),
            ratio=tuple(options["crop_ratio"]),
            hflip=options["hflip"],
            vflip=0.0,
            color_jitter=options["color_jitter"],
            auto_augment=options["auto_augment"],
            interpolation="bicubic",
            mean=tuple(mean),
            std=tuple(std),
            re_prob=options["random_erasing"],
            re_mode="pixel",
        )
    except (AssertionError, KeyError, ValueError) as err:  # timm asserts on a policy string it cannot parse
        if not options["auto_augment"]:
            raise
        raise ConfigError(
            f"single_label.auto_augment: timm cannot build the policy {options['auto_augment']!r} ({err}); "
            "for example rand-m9-mstd0.5-inc1, augmix-m5-w4-d2 or original"
        ) from None


def single_label_dataset(data: dict, role: str, transform: Optional[Callable] = None) -> SingleLabelDataset:
    """The ``role`` ("train" or "val") data set of a config's ``data`` section
    for ``data.name`` in :data:`SINGLE_LABEL_DATASETS` (``synthetic_shapes`` is
    generated under ``data.root`` from ``data.synthetic`` when missing or
    different). An image folder's evaluation split takes the training
    split's class list, so that both number the classes alike."""
    if role not in ("train", "val"):
        raise ValueError(f"role must be 'train' or 'val', got {role!r}")
    name, root, split = data["name"], Path(data["root"]), data[f"{role}_split"]
    if name not in SINGLE_LABEL_DATASETS:
        raise ConfigError(f"unknown single-label data set {name!r}; expected one of {SINGLE_LABEL_DATASETS}")
    if name in ("cifar10", "cifar100"):
        return CIFARDataset(root, split, name, transform)
    if name == "synthetic_shapes":
        ensure_synthetic_shapes(root, **data["synthetic"], progress=True)
    classes = None
    train_folder = root / data["train_split"]
    if role == "val" and train_folder.is_dir():
        classes = sorted(p.name for p in train_folder.iterdir() if p.is_dir()) or None
    return ImageFolderDataset(root, split, transform, data["skip_bad_images"], class_names=classes)


def single_label_normalisation(model_name: str) -> Tuple[List[float], List[float]]:
    """The model's ``pretrained_cfg`` mean and std on the 0-1 scale (Pyramid ViG: 0.5, 0.5)."""
    from ..models.registry import get_pretrained_cfg

    pcfg = get_pretrained_cfg(model_name)
    return [m / 255.0 for m in pcfg["mean"]], [s / 255.0 for s in pcfg["std"]]


def single_label_split(cfg: dict, train: bool) -> SingleLabelDataset:
    """The training or evaluation data set of a ``task: single_label`` config,
    with :func:`single_label_transform` (``single_label`` section) normalised
    with :func:`single_label_normalisation`."""
    mean, std = single_label_normalisation(cfg["model"]["name"])
    transform = single_label_transform(cfg["model"]["img_size"], train, mean, std, cfg["single_label"])
    return single_label_dataset(cfg["data"], "train" if train else "val", transform)


# ---------------------------------------------------------------------------
# The built-in synthetic data set
# ---------------------------------------------------------------------------
SYNTHETIC_SHAPES = ("circle", "ring", "triangle", "square", "hexagon", "star", "cross", "crescent")
_PARAMS_FILE = "synthetic_shapes.json"


def _polygon(cx: float, cy: float, radius: float, corners: int, angle: float, inner: float = 1.0) -> List[tuple]:
    """Corners of a regular polygon (``inner < 1``: a star alternating radii)."""
    points = []
    steps = corners * (2 if inner < 1 else 1)
    for i in range(steps):
        r = radius * (inner if inner < 1 and i % 2 else 1.0)
        a = angle + 2 * math.pi * i / steps
        points.append((cx + r * math.cos(a), cy + r * math.sin(a)))
    return points


def _draw_shape(
    draw: ImageDraw.ImageDraw, name: str, cx: float, cy: float, r: float, angle: float, colour, background
) -> None:
    box = (cx - r, cy - r, cx + r, cy + r)
    if name == "circle":
        draw.ellipse(box, fill=colour)
    elif name == "ring":
        draw.ellipse(box, fill=colour)
        draw.ellipse((cx - 0.55 * r, cy - 0.55 * r, cx + 0.55 * r, cy + 0.55 * r), fill=background)
    elif name in ("triangle", "square", "hexagon"):
        draw.polygon(_polygon(cx, cy, r, {"triangle": 3, "square": 4, "hexagon": 6}[name], angle), fill=colour)
    elif name == "star":
        draw.polygon(_polygon(cx, cy, r, 5, angle, inner=0.45), fill=colour)
    elif name == "cross":  # two bars of width r / 2
        c, s = math.cos(angle), math.sin(angle)
        for dx, dy in ((c, s), (-s, c)):
            w = 0.25 * r
            draw.polygon(
                [
                    (cx + r * dx - w * dy, cy + r * dy + w * dx),
                    (cx + r * dx + w * dy, cy + r * dy - w * dx),
                    (cx - r * dx + w * dy, cy - r * dy - w * dx),
                    (cx - r * dx - w * dy, cy - r * dy + w * dx),
                ],
                fill=colour,
            )
    elif name == "crescent":
        draw.ellipse(box, fill=colour)
        ox, oy = 0.45 * r * math.cos(angle), 0.45 * r * math.sin(angle)
        draw.ellipse((cx + ox - 0.85 * r, cy + oy - 0.85 * r, cx + ox + 0.85 * r, cy + oy + 0.85 * r), fill=background)
    else:
        raise ValueError(f"unknown shape {name!r}")


def _synthetic_image(label: int, size: int, rng: np.random.Generator) -> Image.Image:
    """One shape of class ``label`` (random colour, size, position and rotation) over
    a random colour gradient with pixel noise and two small distractor dots."""
    background = tuple(int(v) for v in rng.integers(0, 256, 3))
    colour = tuple(int(v) for v in rng.integers(0, 256, 3))
    while sum(abs(a - b) for a, b in zip(colour, background)) < 150:  # keep the shape visible
        colour = tuple(int(v) for v in rng.integers(0, 256, 3))
    image = Image.new("RGB", (size, size), background)
    draw = ImageDraw.Draw(image)
    r = size * rng.uniform(0.18, 0.32)
    cx, cy = rng.uniform(r, size - r, 2)
    _draw_shape(draw, SYNTHETIC_SHAPES[label], cx, cy, r, rng.uniform(0, 2 * math.pi), colour, background)
    for _ in range(2):
        d = size * 0.04
        x, y = rng.uniform(0, size, 2)
        draw.ellipse((x - d, y - d, x + d, y + d), fill=tuple(int(v) for v in rng.integers(0, 256, 3)))
    pixels = np.asarray(image, dtype=np.float32)
    ramp = np.linspace(-1, 1, size, dtype=np.float32)
    gradient = (
        rng.uniform(-40, 40, 3).astype(np.float32) * ramp[:, None, None]
        + rng.uniform(-40, 40, 3).astype(np.float32) * ramp[None, :, None]
    )
    pixels = pixels + gradient + rng.normal(0, 12, pixels.shape).astype(np.float32)
    return Image.fromarray(np.clip(pixels, 0, 255).round().astype(np.uint8))


def make_synthetic_shapes(
    root, num_train: int = 2000, num_val: int = 400, image_size: int = 64, seed: int = 0, progress: bool = False
) -> Path:
    """Write the synthetic single-label data set as an image folder:
    ``root/{train,val}/<shape>/<nnnnnn>.png``, classes :data:`SYNTHETIC_SHAPES`
    in turn (balanced), and ``root/synthetic_shapes.json`` with the parameters
    (written last: its presence marks a complete data set). Image ``i`` of a
    split depends on ``(seed, split, i)`` only."""
    if num_train < 1 or num_val < 1 or image_size < 16:
        raise ValueError(f"need num_train, num_val >= 1 and image_size >= 16, got {num_train}, {num_val}, {image_size}")
    root = Path(root)
    (root / _PARAMS_FILE).unlink(missing_ok=True)
    for split_id, (split, count) in enumerate((("train", num_train), ("val", num_val))):
        for name in SYNTHETIC_SHAPES:
            (root / split / name).mkdir(parents=True, exist_ok=True)
        indices = range(count)
        if progress:
            from tqdm import tqdm

            indices = tqdm(indices, desc=f"synthetic shapes ({split})", unit="img")
        for i in indices:
            label = i % len(SYNTHETIC_SHAPES)
            rng = np.random.default_rng([seed, split_id, i])
            _synthetic_image(label, image_size, rng).save(root / split / SYNTHETIC_SHAPES[label] / f"{i:06d}.png")
    params = dict(num_train=num_train, num_val=num_val, image_size=image_size, seed=seed)
    (root / _PARAMS_FILE).write_text(json.dumps(params))
    return root


def ensure_synthetic_shapes(
    root, num_train: int = 2000, num_val: int = 400, image_size: int = 64, seed: int = 0, progress: bool = False
) -> Path:
    """The synthetic data set under ``root``, generated unless a complete one
    with these parameters is there (a different one is regenerated; stale
    image files of a larger earlier data set are removed first)."""
    root = Path(root)
    params = dict(num_train=num_train, num_val=num_val, image_size=image_size, seed=seed)
    marker = root / _PARAMS_FILE
    if marker.is_file():
        try:
            if json.loads(marker.read_text()) == params:
                return root
        except json.JSONDecodeError:
            pass
    for split in ("train", "val"):
        for name in SYNTHETIC_SHAPES:
            for old in (root / split / name).glob("*.png"):
                old.unlink()
    return make_synthetic_shapes(root, **params, progress=progress)
