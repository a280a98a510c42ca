"""Point-cloud classification: a DGCNN-style network (the shape of PyG's
``examples/dgcnn_classification.py``) with PyG's EdgeConv against the same
network with the group max-relative convolution, same budget and seeds.

Variants (``--variants``):

* ``edgeconv``: PyG's DGCNN example. Layer 1 ``EdgeConv(MLP([6, 64, 64, 64]))``
  on the kNN graph of the positions, layer 2 ``EdgeConv(MLP([128, 128]))`` on a
  kNN graph of the layer-1 features rebuilt at every call: what
  ``DynamicEdgeConv`` computes. PyG 2.8's ``DynamicEdgeConv`` takes its kNN from
  pyg-lib (``torch.ops.pyg.knn``), which has no build for this platform's
  torch, so the graphs come from ``torch_cluster.knn`` (euclidean, each point
  its own nearest neighbour, as in ``DynamicEdgeConv``) and go to PyG's
  ``EdgeConv``: the same computation.
* ``maxrel_g1`` / ``maxrel_g2``: layer 1 ``GroupMaxRelConv(3, 64, groups=1)``
  on the same position graph (three coordinates have no channel groups to
  split, and the group kNN compares L2-normalised vectors, which for raw
  coordinates would be directions from the centre, not neighbourhoods),
  layer 2 ``DynamicGroupMaxRelConv(64, 128, k, groups=G)`` (its own group kNN
  of the features, rebuilt at every call). G = 1 is the max-relative
  convolution of ViG, G = 2 adds Group KNN, so ``maxrel_g1`` vs ``maxrel_g2``
  isolates the grouping.

Everything else is PyG's example: ``Linear(192, 1024)``, global max pooling,
``MLP([1024, 512, 256, classes], dropout=0.5, norm=None)``, Adam 1e-3 with the
rate halved every ``--step`` epochs. Data: the built-in synthetic shapes
(``gkg_pyg.data.pointcloud``) or ModelNet10/40 when the files are there.

    python experiments/pointcloud.py                                 # synthetic, 3 variants x 3 seeds
    python experiments/pointcloud.py --data modelnet10 --root data/ModelNet10 --num-points 1024 --epochs 100

Prints one line per epoch and a table (accuracy per seed, mean and standard
deviation over seeds, seconds per training epoch); ``--out`` also writes it as JSON.
A mistake in an option or missing data stops with one line, ``error: ...``
(exit status 2; --debug adds the traceback).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch_geometric.loader import DataLoader
from torch_geometric.nn import MLP, EdgeConv, global_max_pool

if not __package__:  # run as a file (python experiments/pointcloud.py): import gkg_pyg from this checkout
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from gkg_pyg import DynamicGroupMaxRelConv, GroupMaxRelConv  # noqa: E402
from gkg_pyg.cli import ArgumentParser, run_cli  # noqa: E402
from gkg_pyg.data.pointcloud import SyntheticShapes, load_modelnet  # noqa: E402
from gkg_pyg.metrics import summarise_seeds  # noqa: E402

VARIANTS = ("edgeconv", "maxrel_g1", "maxrel_g2")


def knn_graph(x: Tensor, k: int, batch: Tensor) -> Tensor:
    """``(2, N * k)`` edges from each point's ``k`` euclidean nearest points of its
    own cloud (itself included) to the point: ``DynamicEdgeConv``'s graph."""
    import torch_cluster

    query, neighbour = torch_cluster.knn(x, x, k, batch, batch)
    return torch.stack([neighbour, query])


class DGCNN(nn.Module):
    """The DGCNN classifier of PyG's example with a choice of convolution (see the module docstring)."""

    def __init__(self, num_classes: int, variant: str = "edgeconv", k: int = 20):
        super().__init__()
        if variant not in VARIANTS:
            raise ValueError(f"unknown variant {variant!r}; expected one of {VARIANTS}")
        self.variant, self.k = variant, k
        if variant == "edgeconv":
            self.conv1 = EdgeConv(MLP([2 * 3, 64, 64, 64]), aggr="max")
            self.conv2 = EdgeConv(MLP([2 * 64, 128]), aggr="max")
        else:
            groups = int(variant[-1])
            self.conv1 = GroupMaxRelConv(3, 64, groups=1, conv_groups=1)
            self.conv2 = DynamicGroupMaxRelConv(64, 128, k=k, groups=groups, conv_groups=1)
        self.lin1 = nn.Linear(128 + 64, 1024)
        self.mlp = MLP([1024, 512, 256, num_classes], dropout=0.5, norm=None)

    def forward(self, pos: Tensor, batch: Tensor) -> Tensor:
        x1 = self.conv1(pos, knn_graph(pos, self.k, batch))
        if self.variant == "edgeconv":
            x2 = self.conv2(x1, knn_graph(x1, self.k, batch))
        else:
            x2 = self.conv2(x1, batch)
        out = global_max_pool(self.lin1(torch.cat([x1, x2], dim=1)), batch)
        return self.mlp(out)


def build_data(args):
    if args.data == "synthetic":
        common = dict(num_points=args.num_points, noise=args.noise, seed=args.data_seed)
        return (
            SyntheticShapes("train", args.per_class, **common),
            SyntheticShapes("test", args.test_per_class, **common),
        )
    name = args.data[len("modelnet") :]
    root = args.root or f"data/ModelNet{name}"
    return (load_modelnet(root, name, True, args.num_points), load_modelnet(root, name, False, args.num_points))


def run_one(variant: str, seed: int, train_set, test_set, args) -> dict:
    torch.manual_seed(seed)
    model = DGCNN(train_set.num_classes, variant, args.k)
    optimiser = torch.optim.Adam(model.parameters(), lr=args.lr)
    schedule = torch.optim.lr_scheduler.StepLR(optimiser, step_size=args.step, gamma=0.5)
    loader = DataLoader(
        train_set, batch_size=args.batch_size, shuffle=True, generator=torch.Generator().manual_seed(seed)
    )
    epoch_times = []
    for epoch in range(1, args.epochs + 1):
        model.train()
        start, total = time.perf_counter(), 0.0
        for data in loader:
            optimiser.zero_grad()
            loss = F.cross_entropy(model(data.pos, data.batch), data.y)
            loss.backward()
            optimiser.step()
            total += float(loss) * data.num_graphs
        epoch_times.append(time.perf_counter() - start)
        schedule.step()
        print(
            f"  {variant} seed {seed} epoch {epoch:3d}/{args.epochs}: loss {total / len(train_set):.4f} "
            f"({epoch_times[-1]:.1f} s)",
            flush=True,
        )
    accuracy = evaluate(model, test_set, args.batch_size)
    print(f"  {variant} seed {seed}: test accuracy {100 * accuracy:.2f}%", flush=True)
    return dict(
        variant=variant,
        seed=seed,
        accuracy=accuracy,
        seconds_per_epoch=statistics.mean(epoch_times),
        parameters=sum(p.numel() for p in model.parameters()),
    )


@torch.no_grad()
def evaluate(model: nn.Module, dataset, batch_size: int) -> float:
    model.eval()
    correct = 0
    for data in DataLoader(dataset, batch_size=batch_size):
        correct += int((model(data.pos, data.batch).argmax(1) == data.y).sum())
    return correct / len(dataset)


def format_table(rows: list) -> str:
    lines = [
        "| variant | parameters | test accuracy per seed (%) | mean ± std (%) | s / epoch |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        per_seed = ", ".join(f"{a:.1f}" for a in r["accuracy"])
        lines.append(
            f"| {r['variant']} | {r['parameters']:,} | {per_seed} | {r['mean']:.1f} ± {r['std']:.1f} "
            f"| {r['seconds_per_epoch']:.2f} |"
        )
    return "\n".join(lines)


def main(argv=None) -> int:
    """The command line: a user error is one line on stderr and exit status 2 (``gkg_pyg.cli.run_cli``)."""
    return run_cli(run, argv)


def run(argv=None) -> list:
    """Run the comparison the command line asks for; returns the table's rows. Raises on errors."""
    parser = ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default="synthetic", choices=("synthetic", "modelnet10", "modelnet40"))
    parser.add_argument("--root", default=None, help="ModelNet folder (default data/ModelNet10 or 40)")
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated, from {VARIANTS}")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--step", type=int, default=20, help="halve the learning rate every this many epochs")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--k", type=int, default=20)
    parser.add_argument("--num-points", type=int, default=256)
    parser.add_argument("--per-class", type=int, default=40, help="synthetic: training clouds per class")
    parser.add_argument("--test-per-class", type=int, default=25, help="synthetic: test clouds per class")
    parser.add_argument("--noise", type=float, default=0.01, help="synthetic: noise relative to the shape size")
    parser.add_argument("--data-seed", type=int, default=0, help="synthetic: the data set's seed")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--out", default=None, help="write the runs and the table here as JSON")
    args = parser.parse_args(argv)
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown or not variants:
        parser.error(f"unknown variant(s) {unknown}; choose from {VARIANTS}")
    if min(args.epochs, args.k, args.batch_size, args.num_points, args.step) < 1:
        parser.error("--epochs, --k, --batch-size, --num-points and --step must be positive")
    if args.k > args.num_points:
        parser.error(f"--k {args.k} is larger than --num-points {args.num_points}")
    if min(args.per_class, args.test_per_class) < 1:
        parser.error("--per-class and --test-per-class must be positive")
    if not (args.noise >= 0 and args.lr > 0 and math.isfinite(args.noise) and math.isfinite(args.lr)):
        parser.error(f"--noise must be >= 0 and --lr > 0 (finite), got {args.noise} and {args.lr}")
    if args.threads:
        torch.set_num_threads(args.threads)
    train_set, test_set = build_data(args)
    print(
        f"data: {args.data}, {len(train_set)} training and {len(test_set)} test clouds, "
        f"{train_set.num_classes} classes",
        flush=True,
    )
    runs = [run_one(v, s, train_set, test_set, args) for v in variants for s in args.seeds]
    rows = summarise_seeds(runs, "variant", "accuracy", scale=100)
    print(format_table(rows))
    if args.out:
        Path(args.out).write_text(json.dumps(dict(args=vars(args), runs=runs, summary=rows), indent=2))
    return rows


if __name__ == "__main__":
    sys.exit(main())
