"""Time gkg_pyg.metrics.multilabel_metrics on COCO-sized inputs and print a table.

    python benchmarks/metrics.py [--repeats 3]

Random scores and targets (4% positives, as in COCO) with object areas; the
table gives the best of --repeats runs per size, with and without the
COCO scale mAPs. Timings are machine-dependent: compare rows within one run.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from gkg_pyg.metrics import multilabel_metrics  # noqa: E402

SIZES = [(5_000, 20), (40_000, 80), (120_000, 80)]  # VOC-like, COCO val2014, three times COCO


def case(n: int, num_classes: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    targets = (rng.random((n, num_classes)) < 0.04).astype(float)
    scores = rng.random((n, num_classes)) + 0.2 * targets
    areas = np.where(targets == 1, rng.uniform(1, 200**2, targets.shape), 0.0)
    return scores, targets, areas


def best_time(repeats: int, *args, **kwargs) -> float:
    """Seconds of the fastest of ``repeats`` calls of multilabel_metrics(*args, **kwargs)."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        multilabel_metrics(*args, **kwargs)
        times.append(time.perf_counter() - start)
    return min(times)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args(argv)
    print("| images | classes | all metrics (ms) | + scale mAPs (ms) |")
    print("|---|---|---|---|")
    for n, num_classes in SIZES:
        scores, targets, areas = case(n, num_classes)
        plain = best_time(args.repeats, scores, targets)
        scaled = best_time(args.repeats, scores, targets, areas=areas)
        print(f"| {n} | {num_classes} | {1000 * plain:.0f} | {1000 * scaled:.0f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
