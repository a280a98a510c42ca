"""A small procedurally generated multi-label data set in COCO format.

Ten object classes (shapes and textured patches) are drawn on cluttered
backgrounds, one to four objects per image, at small, medium and large
scale (absolute COCO area buckets: < 32^2, 32^2..96^2, > 96^2 pixels), with
five class pairs that tend to appear together. The result is written
exactly like COCO 2014 (``annotations/instances_{train,val}2014.json`` with
images, annotations (bbox, area, RLE segmentation, category_id, iscrowd=0,
id) and categories; JPEGs in ``{train,val}2014/``), so the ordinary COCO
loader reads it. data/README.md describes the design.

Generation is deterministic for a seed (each image has its own random
stream, derived from (seed, split, image number)), atomic (the new data
set is swapped in at the end, annotation files last, so a killed run leaves
the previous complete data set or none, never a partial one that looks
complete) and guarded by a file lock (concurrent callers, e.g. distributed ranks, generate once).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import math
import multiprocessing
import os
import shutil
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
from PIL import Image, ImageDraw
from pycocotools import mask as mask_utils
from tqdm import tqdm

from ..config import SYNTHETIC_MIN_IMAGE_SIZE
from ..errors import DataError
from .coco import coco_paths

GENERATOR = "gkg-pyg synthetic shapes"
GENERATOR_VERSION = 1

SYNTHETIC_CLASSES = (
    "circle", "square", "triangle", "star", "ring",
    "cross", "semicircle", "diamond", "stripes", "checker",
)  # fmt: skip
TEXTURED = ("stripes", "checker")
# Co-occurring pairs: a further object is the partner of an object already
# in the image with probability PARTNER_PROB.
PARTNER_PAIRS = (
    ("circle", "cross"),
    ("square", "ring"),
    ("triangle", "stripes"),
    ("star", "checker"),
    ("semicircle", "diamond"),
)
PARTNER_PROB = 0.5
NUM_OBJECTS_PROBS = (0.25, 0.35, 0.25, 0.15)  # 1, 2, 3, 4 objects

# Target object areas (pixels) per scale bucket, kept clear of the COCO
# thresholds 32^2 = 1024 and 96^2 = 9216 so that rasterisation does not move
# an object across a bucket boundary. The large range ends at
# LARGE_MAX_FRACTION of the image.
SCALE_BUCKETS = ("small", "medium", "large")
SCALE_PROBS = (0.35, 0.40, 0.25)
AREA_RANGES = {"small": (180.0, 800.0), "medium": (1500.0, 7500.0), "large": (11000.0, None)}
LARGE_MAX_FRACTION = 0.35
MAX_RADIUS_FRACTION = 0.46  # circumradius cap, so the object fits the image
MIN_VISIBLE_FRACTION = 0.6  # an object keeps >= 60% of its pixels when occluded
PLACEMENT_TRIES = 20

STAR_INNER = 0.45
RING_INNER = 0.55
CROSS_HALF_WIDTH = 0.3
DIAMOND_MINOR = 0.5
# Area of each shape for circumradius 1, used to size an object for a
# target area (the stored area is the measured one).
UNIT_AREA = {
    "circle": math.pi,
    "square": 2.0,
    "triangle": 3.0 * math.sqrt(3.0) / 4.0,
    "star": 5.0 * STAR_INNER * math.sin(math.radians(36.0)),
    "ring": math.pi * (1.0 - RING_INNER**2),
    "cross": 8.0 * CROSS_HALF_WIDTH - 4.0 * CROSS_HALF_WIDTH**2,
    "semicircle": math.pi / 2.0,
    "diamond": 2.0 * DIAMOND_MINOR,
    "stripes": 2.0,
    "checker": 2.0,
}
CHUNK = 50  # images per worker task


@dataclass
class SynthObject:
    """One object of an image layout, before placement."""

    label: int  # index into SYNTHETIC_CLASSES
    bucket: str  # intended scale bucket
    target_area: float  # pixels


def _partner_table() -> dict[int, int]:
    table = {}
    for a, b in PARTNER_PAIRS:
        ia, ib = SYNTHETIC_CLASSES.index(a), SYNTHETIC_CLASSES.index(b)
        table[ia], table[ib] = ib, ia
    return table


PARTNER = _partner_table()


def sample_objects(rng: np.random.Generator, image_size: int) -> list[SynthObject]:
    """Classes, scale buckets and target areas of one image's objects,
    largest first (the drawing order, so small objects stay visible)."""
    count = 1 + int(rng.choice(len(NUM_OBJECTS_PROBS), p=NUM_OBJECTS_PROBS))
    labels = [int(rng.integers(len(SYNTHETIC_CLASSES)))]
    while len(labels) < count:
        if rng.random() < PARTNER_PROB:
            labels.append(PARTNER[labels[int(rng.integers(len(labels)))]])
        else:
            labels.append(int(rng.integers(len(SYNTHETIC_CLASSES))))
    objects = []
    for label in labels:
        bucket = SCALE_BUCKETS[int(rng.choice(len(SCALE_BUCKETS), p=SCALE_PROBS))]
        if bucket == "large" and any(o.bucket == "large" for o in objects):
            bucket = "medium"  # one large object per image leaves room for the rest
        low, high = AREA_RANGES[bucket]
        if high is None:
            high = max(low, LARGE_MAX_FRACTION * image_size**2)
        objects.append(SynthObject(label, bucket, float(rng.uniform(low, high))))
    return sorted(objects, key=lambda o: -o.target_area)


def _rotated(points: np.ndarray, cx: float, cy: float, radius: float, theta: float) -> list:
    """Unit-radius polygon (K, 2) scaled, rotated by theta and moved to (cx, cy)."""
    c, s = math.cos(theta), math.sin(theta)
    x = radius * (points[:, 0] * c - points[:, 1] * s) + cx
    y = radius * (points[:, 0] * s + points[:, 1] * c) + cy
    return list(zip(x.tolist(), y.tolist()))


def _star_polygon(corners: int, radii: tuple[float, ...]) -> np.ndarray:
    """Unit polygon with corners * len(radii) vertices cycling through radii."""
    n = corners * len(radii)
    angles = np.arange(n) * 2.0 * math.pi / n - math.pi / 2.0
    r = np.array([radii[i % len(radii)] for i in range(n)])
    return np.stack([r * np.cos(angles), r * np.sin(angles)], axis=1)


_W = CROSS_HALF_WIDTH
UNIT_POLYGONS = {
    "square": _star_polygon(4, (1.0,)),
    "stripes": _star_polygon(4, (1.0,)),
    "checker": _star_polygon(4, (1.0,)),
    "triangle": _star_polygon(3, (1.0,)),
    "star": _star_polygon(5, (1.0, STAR_INNER)),
    "diamond": np.array([[1.0, 0.0], [0.0, DIAMOND_MINOR], [-1.0, 0.0], [0.0, -DIAMOND_MINOR]]),
    "cross": np.array(
        [
            [1, _W],
            [_W, _W],
            [_W, 1],
            [-_W, 1],
            [-_W, _W],
            [-1, _W],
            [-1, -_W],
            [-_W, -_W],
            [-_W, -1],
            [_W, -1],
            [_W, -_W],
            [1, -_W],
        ],
        dtype=np.float64,
    ),  # fmt: skip
}


def shape_mask(name: str, size: int, cx: float, cy: float, radius: float, theta: float) -> np.ndarray:
    """(size, size) bool mask of one shape with circumradius ``radius``
    centred at (cx, cy), rotated by ``theta`` radians."""
    mask = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(mask)
    box = [cx - radius, cy - radius, cx + radius, cy + radius]
    if name == "circle":
        draw.ellipse(box, fill=255)
    elif name == "ring":
        draw.ellipse(box, fill=255)
        inner = RING_INNER * radius
        draw.ellipse([cx - inner, cy - inner, cx + inner, cy + inner], fill=0)
    elif name == "semicircle":
        start = math.degrees(theta)
        draw.pieslice(box, start, start + 180.0, fill=255)
    else:
        draw.polygon(_rotated(UNIT_POLYGONS[name], cx, cy, radius, theta), fill=255)
    return np.asarray(mask) > 127


def _vivid_colour(rng: np.random.Generator) -> np.ndarray:
    """A saturated RGB colour (objects); clutter uses _muted_colour."""
    hue = rng.uniform(0.0, 6.0)
    sat, val = rng.uniform(0.65, 1.0), rng.uniform(0.55, 1.0)
    return _hsv_to_rgb(hue, sat, val)


def _muted_colour(rng: np.random.Generator) -> np.ndarray:
    return _hsv_to_rgb(rng.uniform(0.0, 6.0), rng.uniform(0.0, 0.25), rng.uniform(0.2, 0.85))


def _hsv_to_rgb(hue6: float, sat: float, val: float) -> np.ndarray:
    """HSV (hue in [0, 6)) to an RGB float32 array in 0..255."""
    k = (np.array([5.0, 3.0, 1.0]) + hue6) % 6.0
    rgb = val - val * sat * np.clip(np.minimum(k, 4.0 - k), 0.0, 1.0)
    return (rgb * 255.0).astype(np.float32)


def _as_fill(rgb: np.ndarray) -> tuple[int, int, int]:
    """PIL fill colour from an RGB float array."""
    r, g, b = (int(round(float(v))) for v in rgb)
    return r, g, b


def _ramp(
    rng: np.random.Generator, xx: np.ndarray, yy: np.ndarray,
    centre: tuple[float, float], span: float, amplitude: float,
) -> np.ndarray:  # fmt: skip
    """(h, w, 1) linear shading in a random direction over pixel grids xx, yy:
    -amplitude .. +amplitude across ``span`` pixels around ``centre``."""
    phi = rng.uniform(0.0, 2.0 * math.pi)
    ramp = (math.cos(phi) * (xx - centre[0]) + math.sin(phi) * (yy - centre[1])) * (2.0 * amplitude / span)
    return ramp[..., None]


def _background(rng: np.random.Generator, xx: np.ndarray, yy: np.ndarray) -> np.ndarray:
    """(S, S, 3) float32 image: muted gradient, low-frequency blotches and
    clutter (lines and elongated ellipses in muted colours)."""
    size = xx.shape[0]
    image = _muted_colour(rng) + _ramp(rng, xx, yy, (size / 2, size / 2), size, 40.0)
    # Blotches: 6 x 6 random colour offsets upsampled bilinearly (stored
    # around 128 so that one uint8 RGB resize does all channels).
    coarse = np.clip(128.0 + rng.normal(0.0, 18.0, size=(6, 6, 3)), 0, 255).astype(np.uint8)
    blotches = np.asarray(Image.fromarray(coarse).resize((size, size), Image.BILINEAR), dtype=np.float32)
    canvas = Image.fromarray(np.clip(image + blotches - 128.0, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(canvas)
    for _ in range(int(rng.integers(2, 9))):
        ends = rng.uniform(0, size, size=4).tolist()
        draw.line(ends, fill=_as_fill(_muted_colour(rng)), width=int(rng.integers(1, 4)))
    for _ in range(int(rng.integers(0, 4))):
        # Rotated ellipse as a polygon; aspect >= 2 keeps it apart from circles.
        rx = rng.uniform(6.0, size / 6.0)
        ry = rx / rng.uniform(2.0, 3.5)
        t = np.linspace(0.0, 2.0 * math.pi, 24, endpoint=False)
        unit = np.stack([np.cos(t), (ry / rx) * np.sin(t)], axis=1)
        poly = _rotated(unit, *rng.uniform(0, size, size=2), rx, rng.uniform(0, math.pi))
        colour = _as_fill(_muted_colour(rng))
        if rng.random() < 0.5:
            draw.polygon(poly, fill=colour)
        else:
            draw.polygon(poly, outline=colour)
    return np.asarray(canvas).astype(np.float32)


def _appearance(
    name: str, rng: np.random.Generator, xx: np.ndarray, yy: np.ndarray,
    centre: tuple[float, float], radius: float, theta: float,
) -> np.ndarray:  # fmt: skip
    """(h, w, 3) float32 colour field over the pixel grids xx, yy that an
    object is cut out of: a shaded vivid colour, or a two-colour texture
    (stripes / checkerboard) for the textured classes."""
    first = _vivid_colour(rng) + _ramp(rng, xx, yy, centre, 2.0 * radius, 25.0)
    if name not in TEXTURED:
        return first
    second = _vivid_colour(rng) * np.float32(rng.uniform(0.2, 0.6))  # a darker second colour
    side = radius * math.sqrt(2.0)
    if name == "stripes":
        period = max(4.0, side / rng.uniform(3.0, 5.0))
        phi = theta + rng.choice([0.0, math.pi / 2]) + rng.uniform(-0.3, 0.3)
        u = math.cos(phi) * xx + math.sin(phi) * yy
        odd = np.floor(2.0 * u / period) % 2 == 1
    else:
        cell = max(3.0, side / rng.uniform(3.0, 4.5))
        c, s = math.cos(theta), math.sin(theta)
        u = (c * xx + s * yy) / cell
        v = (-s * xx + c * yy) / cell
        odd = (np.floor(u) + np.floor(v)) % 2 == 1
    return np.where(odd[..., None], second, first)


def render_image(rng: np.random.Generator, image_size: int) -> tuple[np.ndarray, list[tuple[int, np.ndarray]]]:
    """Draw one image. Returns the (S, S, 3) uint8 image and, per object
    kept, (label, visible (S, S) bool mask)."""
    yy, xx = np.mgrid[0:image_size, 0:image_size].astype(np.float32)
    image = _background(rng, xx, yy)
    placed: list[tuple[int, np.ndarray, float]] = []  # label, visible mask, full area
    for obj in sample_objects(rng, image_size):
        name = SYNTHETIC_CLASSES[obj.label]
        radius = min(math.sqrt(obj.target_area / UNIT_AREA[name]), MAX_RADIUS_FRACTION * image_size)
        for _ in range(PLACEMENT_TRIES):
            cx, cy = rng.uniform(radius, image_size - radius, size=2)
            theta = rng.uniform(0.0, 2.0 * math.pi)
            mask = shape_mask(name, image_size, cx, cy, radius, theta)
            # Bounded occlusion keeps every label honestly visible.
            if mask.any() and all(
                np.count_nonzero(vis & ~mask) >= MIN_VISIBLE_FRACTION * full for _, vis, full in placed
            ):
                break
        else:
            continue  # no acceptable spot: the image gets one object fewer
        # Colour only the mask's bounding window (cheaper than the frame).
        rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
        window = (slice(rows[0], rows[-1] + 1), slice(cols[0], cols[-1] + 1))
        colour = _appearance(name, rng, xx[window], yy[window], (cx, cy), radius, theta)
        inside = mask[window]
        image[window][inside] = colour[inside]
        placed = [(label, vis & ~mask, full) for label, vis, full in placed]
        placed.append((obj.label, mask, float(np.count_nonzero(mask))))
    image += np.float32(rng.uniform(2.0, 10.0)) * rng.standard_normal(image.shape, dtype=np.float32)
    return np.clip(image, 0, 255).astype(np.uint8), [(label, vis) for label, vis, _ in placed]


def _object_annotation(label: int, visible: np.ndarray) -> dict:
    """COCO annotation fields (no ids yet) of one object's visible mask."""
    rle = mask_utils.encode(np.asfortranarray(visible.astype(np.uint8)))
    x, y, w, h = mask_utils.toBbox(rle).tolist()
    return {
        "category_id": label + 1,
        "bbox": [x, y, w, h],
        "area": float(mask_utils.area(rle)),
        "iscrowd": 0,
        "segmentation": {"size": rle["size"], "counts": rle["counts"].decode("ascii")},
    }


def _file_name(split: str, image_id: int) -> str:
    return f"COCO_{split}2014_{image_id:012d}.jpg"


@dataclass
class _Chunk:
    """Images start..stop-1 of a split, rendered by one worker task."""

    image_dir: Path
    split: str
    split_code: int
    first_image_id: int
    seed: int
    image_size: int
    start: int
    stop: int


def _render_chunk(chunk: _Chunk) -> list[list[dict]]:
    """Render and save a chunk's JPEGs; per image, its objects' annotations.
    Image n draws from its own stream (seed, split, n): the result does not
    depend on how images are split over workers."""
    per_image = []
    for n in range(chunk.start, chunk.stop):
        rng = np.random.default_rng([chunk.seed, chunk.split_code, n])
        pixels, objects = render_image(rng, chunk.image_size)
        path = chunk.image_dir / _file_name(chunk.split, chunk.first_image_id + n)
        Image.fromarray(pixels).save(path, quality=90)
        per_image.append([_object_annotation(label, visible) for label, visible in objects])
    return per_image


def _params(num_train: int, num_val: int, image_size: int, seed: int) -> dict:
    return {"num_train": num_train, "num_val": num_val, "image_size": image_size, "seed": seed}


def _generate_split(
    out_dir: Path, split: str, split_code: int, count: int, first_image_id: int,
    first_ann_id: int, params: dict, progress: bool, workers: int,
) -> dict:  # fmt: skip
    """Render ``count`` images into out_dir/{split}2014 (``workers``
    processes) and return the COCO json dict (not yet written)."""
    image_dir = out_dir / f"{split}2014"
    image_dir.mkdir(parents=True)
    size = params["image_size"]
    chunks = [
        _Chunk(image_dir, split, split_code, first_image_id, params["seed"], size, a, min(a + CHUNK, count))
        for a in range(0, count, CHUNK)
    ]
    bar = tqdm(total=count, desc=f"synthetic {split}", disable=not progress)
    results = []
    with contextlib.ExitStack() as stack:
        if workers > 1 and len(chunks) > 1:
            # fork: workers need no re-import; they touch only numpy / PIL.
            pool = stack.enter_context(ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("fork")))
            outputs = pool.map(_render_chunk, chunks)
        else:
            outputs = map(_render_chunk, chunks)
        for chunk, per_image in zip(chunks, outputs):
            results.extend(per_image)
            bar.update(chunk.stop - chunk.start)
    bar.close()

    images, annotations = [], []
    for n, objects in enumerate(results):
        image_id = first_image_id + n
        images.append({"id": image_id, "file_name": _file_name(split, image_id), "width": size, "height": size})
        for ann in objects:
            annotations.append({"id": first_ann_id + len(annotations), "image_id": image_id, **ann})
    return {
        "info": {"description": GENERATOR, "version": GENERATOR_VERSION, "params": params},
        "licenses": [],
        "images": images,
        "annotations": annotations,
        "categories": [
            {"id": i + 1, "name": name, "supercategory": "texture" if name in TEXTURED else "shape"}
            for i, name in enumerate(SYNTHETIC_CLASSES)
        ],
    }


def _read_info(ann_file: Path) -> dict | None:
    """The json's "info" dict, or None when the file does not exist."""
    if not ann_file.is_file():
        return None
    with open(ann_file) as f:
        return json.load(f).get("info", {})


def synthetic_params(root: str | Path) -> dict | None:
    """Generation parameters of a complete synthetic data set under root
    (both annotation files present, written by this generator version with
    the same parameters), else None."""
    infos = [_read_info(coco_paths(root, split)[0]) for split in ("train", "val")]
    if any(info is None or info.get("description") != GENERATOR for info in infos):
        return None
    if infos[0].get("version") != GENERATOR_VERSION or infos[0].get("params") != infos[1].get("params"):
        return None
    return infos[0]["params"]


@contextlib.contextmanager
def _locked(root: Path) -> Iterator[None]:
    """Exclusive lock on root/.synthetic.lock (blocks other generators)."""
    root.mkdir(parents=True, exist_ok=True)
    with open(root / ".synthetic.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _check_args(num_train: int, num_val: int, image_size: int) -> None:
    if num_train < 1 or num_val < 1:
        raise ValueError(f"num_train ({num_train}) and num_val ({num_val}) must be >= 1")
    if image_size < SYNTHETIC_MIN_IMAGE_SIZE:
        raise ValueError(f"image_size must be >= {SYNTHETIC_MIN_IMAGE_SIZE}, got {image_size}")


def _generate(root: Path, params: dict, progress: bool, workers: int | None) -> None:
    """Generate into a staging folder, then swap it in; the annotation files
    are moved last, so they exist only when the data set is complete."""
    for split in ("train", "val"):
        info = _read_info(coco_paths(root, split)[0])
        if info is not None and info.get("description") != GENERATOR:
            raise DataError(
                f"{coco_paths(root, split)[0]} exists and was not written by the synthetic "
                f"generator; refusing to overwrite {root}"
            )
    if workers is None:
        workers = min(4, os.cpu_count() or 1)
    staging = root / ".synthetic-staging"
    shutil.rmtree(staging, ignore_errors=True)  # leftover of a killed run
    train = _generate_split(staging, "train", 0, params["num_train"], 1, 1, params, progress, workers)
    val = _generate_split(
        staging, "val", 1, params["num_val"], params["num_train"] + 1,
        len(train["annotations"]) + 1, params, progress, workers,
    )  # fmt: skip
    (staging / "annotations").mkdir()
    for split, data in (("train", train), ("val", val)):
        with open(staging / "annotations" / f"instances_{split}2014.json", "w") as f:
            json.dump(data, f)

    (root / "annotations").mkdir(exist_ok=True)
    for split in ("train", "val"):
        coco_paths(root, split)[0].unlink(missing_ok=True)
    for split in ("train", "val"):
        image_dir = coco_paths(root, split)[1]
        shutil.rmtree(image_dir, ignore_errors=True)
        os.replace(staging / image_dir.name, image_dir)
    for split in ("train", "val"):
        ann_file = coco_paths(root, split)[0]
        os.replace(staging / "annotations" / ann_file.name, ann_file)
    shutil.rmtree(staging)


def make_synthetic_coco(
    root: str | Path,
    num_train: int = 2000,
    num_val: int = 500,
    image_size: int = 256,
    seed: int = 0,
    progress: bool = True,
    workers: int | None = None,
) -> Path:
    """Generate the synthetic data set under ``root`` (always; replaces an
    earlier synthetic data set there). Returns root as a Path.

    Args:
        root: output folder (COCO 2014 layout).
        num_train, num_val: images per split (every image has >= 1 label).
        image_size: square image side in pixels; below ~190 px no object
            can exceed 96^2 px, so the "large" bucket stays empty.
        seed: the output is a function of (seed, sizes) only.
        progress: tqdm progress bars.
        workers: rendering processes (None: min(4, CPU count)); the output
            does not depend on it.

    Raises:
        ValueError: bad sizes, or root holds annotation files that this
            generator did not write (e.g. real COCO).
    """
    _check_args(num_train, num_val, image_size)
    root = Path(root)
    with _locked(root):
        _generate(root, _params(num_train, num_val, image_size, seed), progress, workers)
    return root


def ensure_synthetic(
    root: str | Path,
    num_train: int = 2000,
    num_val: int = 500,
    image_size: int = 256,
    seed: int = 0,
    progress: bool = True,
    workers: int | None = None,
) -> Path:
    """Return ``root`` after generating the synthetic data set there unless a
    complete one with exactly these parameters already exists (arguments
    as in ``make_synthetic_coco``; progress and workers do not count)."""
    _check_args(num_train, num_val, image_size)
    root = Path(root)
    params = _params(num_train, num_val, image_size, seed)
    with _locked(root):
        if synthetic_params(root) != params:
            _generate(root, params, progress, workers)
    return root
