"""What each part of a GKGNet training step costs, measured by taking it out.

    python experiments/benchmark_parts.py --img-size 224 --batch 8 --rounds 10

``torch.profiler``'s per-operator times inflate memory-bound operators 2-3x on
this project's CPU machine, and a part timed on its own runs with warm caches
that it does not have inside the model. This script builds one GKGNet-S per
variant, each with the same weights: the whole step, and one with a part
replaced by a cheap stand-in. Every round runs one training step of each
variant (forward, backward, AdamW, float32), the order alternating from round
to round, and the table gives the median step time of each and the median over
rounds of the whole step's time minus the variant's: what the part costs in the
model. The stand-ins keep shapes and magnitudes, not values (a variant's
weights drift from the whole step's; its time does not depend on them):

- ``group kNN``: every :func:`gkg_pyg.batched_group_knn` call of the model
  returns the neighbour table that call returned in the first step.
- ``kNN kernel``: only the compiled kNN (``gkg_pyg.native.knn_smallest_k``)
  is replayed so; the features are still normalised and their norms taken.
- ``fused backward passes``: the three compiled elementwise passes of
  :func:`gkg_pyg.native.bn_gelu_linear_backward`; its two matrix products stay.
- ``AdamW``: the optimiser step.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "experiments")]
import gkg_pyg  # noqa: E402
from benchmark_authors import step  # noqa: E402
from gkg_pyg import knn as knn_module  # noqa: E402
from gkg_pyg import native  # noqa: E402
from gkg_pyg.conv import linear_weight_grad  # noqa: E402
from gkg_pyg.models import gkgnet  # noqa: E402


class Replay:
    """Wraps ``fn``: in recording mode its results in call order, then the same results
    again in that order (the model calls it in the same order every step)."""

    def __init__(self, fn):
        self.fn, self.results, self.replaying, self.calls = fn, [], False, 0

    def __call__(self, *args, **kwargs):
        if not self.replaying:
            self.results.append(self.fn(*args, **kwargs))
            return self.results[-1]
        result = self.results[self.calls % len(self.results)]
        self.calls += 1
        return result


class ProductsOnly:
    """``bn_gelu_linear_backward``'s two matrix products without its three elementwise passes."""

    calls = 0

    def __call__(self, grad_out, h, mean, invstd, bn_weight, bn_bias, weight, training):
        self.calls += 1
        return grad_out @ weight, torch.zeros_like(mean), torch.zeros_like(mean), linear_weight_grad(grad_out, h)


class NoUpdate:
    """The optimiser of the variant without AdamW: gradients cleared as before, no step."""

    def __init__(self, optimizer):
        self.zero_grad = optimizer.zero_grad

    def step(self):
        pass


# variant -> (module, attribute, stand-in; None: a Replay of the attribute), or None for AdamW
PARTS = {
    "group kNN": (gkgnet, "batched_group_knn", None),
    "kNN kernel": (knn_module, "knn_smallest_k", None),
    "fused backward passes": (native, "bn_gelu_linear_backward", ProductsOnly()),
    "AdamW": None,
}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="gkgnet_s")
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    x = torch.randn(args.batch, 3, args.img_size, args.img_size)
    y = (torch.rand(args.batch, 80) > 0.9).float()
    variants = {}
    for name in ["whole step", *PARTS]:
        torch.manual_seed(0)
        model = gkg_pyg.create_model(args.model, num_classes=80, img_size=args.img_size).train()
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
        variants[name] = (model, NoUpdate(optimizer) if name == "AdamW" else optimizer)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    stand_ins = {
        name: patch[2] or Replay(getattr(patch[0], patch[1])) for name, patch in PARTS.items() if patch is not None
    }

    def train_step(name):  # benchmark_authors.step, with the variant's stand-in in place
        patch = PARTS.get(name)
        if patch is not None:
            saved = getattr(patch[0], patch[1])
            setattr(patch[0], patch[1], stand_ins[name])
        try:
            return step(*variants[name], scaler, "train", x, y, None)
        finally:
            if patch is not None:
                setattr(patch[0], patch[1], saved)

    for name in variants:  # warm-up; the replays record this step's results
        train_step(name)
    for stand_in in stand_ins.values():
        stand_in.calls = 0
        if isinstance(stand_in, Replay):
            stand_in.replaying = True
    times = {name: [] for name in variants}
    for r in range(args.rounds):
        for name in list(variants) if r % 2 == 0 else list(variants)[::-1]:
            times[name].append(train_step(name))
    whole = times["whole step"]
    print(f"{args.model}, {args.img_size} px, batch {args.batch}, CPU, {args.threads} threads, {args.rounds} rounds")
    print("| variant | calls replaced per step | step ms (median) | the part's cost, ms (median of rounds, min-max) |")
    print("|---|---|---|---|")
    for name, t in times.items():
        diffs = [1e3 * (w - v) for w, v in zip(whole, t)]
        if name == "whole step":
            print(f"| whole step | - | {1e3 * statistics.median(t):.1f} | - |")
            continue
        calls = stand_ins[name].calls // args.rounds if name in stand_ins else "-"
        cost = f"{statistics.median(diffs):.1f} ({min(diffs):.1f} to {max(diffs):.1f})"
        print(f"| without {name} | {calls} | {1e3 * statistics.median(t):.1f} | {cost} |")
    return times


if __name__ == "__main__":
    main()
