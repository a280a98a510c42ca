"""Time image decoding and the up-front image check per image.

    python benchmarks/data_loading.py [--images 200] [--size 640 480] [--workers 1 2]

Writes --images photo-like JPEGs (smooth colour fields plus noise, quality
90, like camera images) of --size into a temporary folder and prints a
table of milliseconds per image: PIL's plain ``open + convert("RGB")``
(the reference), ``gkg_pyg.data.load_rgb`` (what the loaders use), and
``gkg_pyg.data.find_bad_images`` at each check level with each number of
threads. The best of --repeat rounds is reported; each round runs every
candidate once, so load changes on a shared machine hit all alike (the
page cache is warm after the first round: disk reads are not measured).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from gkg_pyg.data import find_bad_images, load_rgb  # noqa: E402


def make_images(folder: Path, count: int, width: int, height: int) -> list[str]:
    rng = np.random.default_rng(0)
    paths = []
    yy, xx = np.mgrid[0:height, 0:width] / max(width, height)
    for i in range(count):
        a, b, c = rng.uniform(-3, 3, 3)
        field = np.stack([np.sin(a * xx + b * yy + c + k) for k in range(3)], axis=-1) * 90 + 128
        pixels = np.clip(field + rng.normal(0, 12, field.shape), 0, 255).astype(np.uint8)
        path = folder / f"{i:05d}.jpg"
        Image.fromarray(pixels).save(path, quality=90)
        paths.append(str(path))
    return paths


def best_ms_per_image(candidates: dict, count: int, repeat: int) -> dict:
    """Milliseconds per image of each candidate, the best of ``repeat`` rounds;
    every round runs all candidates, so a change in machine load hits them alike."""
    best = {name: float("inf") for name in candidates}
    for _ in range(repeat):
        for name, fn in candidates.items():
            start = time.perf_counter()
            fn()
            best[name] = min(best[name], time.perf_counter() - start)
    return {name: 1000.0 * seconds / count for name, seconds in best.items()}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=200)
    p.add_argument("--size", type=int, nargs=2, default=(640, 480), metavar=("WIDTH", "HEIGHT"))
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    p.add_argument("--repeat", type=int, default=3)
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        paths = make_images(Path(tmp), args.images, *args.size)

        def pil_convert():
            for path in paths:
                with Image.open(path) as image:
                    image.convert("RGB")

        def decode():
            for path in paths:
                load_rgb(path)  # not kept: a list of decoded images would time page faults too

        candidates = {("PIL open + convert('RGB')", 1): pil_convert, ("load_rgb", 1): decode}
        for level in ("exists", "header", "decode"):
            for workers in args.workers:
                candidates[(f"check {level}", workers)] = partial(
                    find_bad_images, paths, level, workers, progress=False
                )
        times = best_ms_per_image(candidates, len(paths), args.repeat)
        rows = [(name, workers, ms) for (name, workers), ms in times.items()]
    print(f"{args.images} JPEGs of {args.size[0]} x {args.size[1]}, best of {args.repeat}")
    print(f"{'what':<28}{'threads':>8}{'ms/image':>10}{'images/s':>10}")
    for name, workers, ms in rows:
        print(f"{name:<28}{workers:>8}{ms:>10.2f}{1000.0 / ms:>10.0f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
