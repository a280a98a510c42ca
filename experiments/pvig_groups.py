"""Pyramid ViG with and without Group KNN (the paper's Table 5 question) on
the built-in synthetic single-label data set, same budget and seeds.

Both models are the same ``pvig_*`` network with the same parameters; only
``groups`` (1: Pyramid ViG, 2: "+ Group KNN") differs. Each seed fixes the
initial weights and the data order, identical for the two; the data set is
fixed (``--data-seed``). Training: AdamW, cosine schedule with a linear
warm-up of one epoch, cross-entropy with label smoothing 0.1, horizontal
flips; evaluation: top-1 on the validation split after the last epoch.

    python experiments/pvig_groups.py                      # 2 x 3 runs, about 40 core-minutes on a 2-core CPU
    python experiments/pvig_groups.py --epochs 1 --num-train 64 --num-val 32 --seeds 0   # a smoke test

Prints one line per epoch and a table (top-1 per seed, mean and standard
deviation, seconds per training epoch); ``--out`` also writes it as JSON.
A mistake in an option or the data stops with one line, ``error: ...``
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
from torch.utils.data import DataLoader
from torchvision import transforms as T

if not __package__:  # run as a file (python experiments/pvig_groups.py): import gkg_pyg from this checkout
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import gkg_pyg  # noqa: E402
from gkg_pyg.cli import ArgumentParser, run_cli  # noqa: E402
from gkg_pyg.data.single_label import ImageFolderDataset, collate_single_label, ensure_synthetic_shapes  # noqa: E402
from gkg_pyg.data.transforms import MEAN, STD  # noqa: E402
from gkg_pyg.metrics import summarise_seeds  # noqa: E402
from gkg_pyg.single_label import SingleLabelLoss, single_label_metrics  # noqa: E402


def run_one(groups: int, seed: int, train_set, val_set, args) -> dict:
    torch.manual_seed(seed)
    model = gkg_pyg.create_model(
        args.model, num_classes=train_set.num_classes, img_size=args.image_size, k=args.k, groups=groups
    )
    optimiser = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    loader = DataLoader(
        train_set,
        batch_size=args.batch_size,
        shuffle=True,
        collate_fn=collate_single_label,
        generator=torch.Generator().manual_seed(seed),
        drop_last=True,
    )
    total_steps, warmup = args.epochs * len(loader), len(loader)

    def rate(step: int) -> float:  # linear warm-up over the first epoch, then cosine to 0
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(total_steps - warmup, 1)))

    schedule = torch.optim.lr_scheduler.LambdaLR(optimiser, rate)
    criterion = SingleLabelLoss(0.1)
    epoch_times = []
    for epoch in range(1, args.epochs + 1):
        model.train()
        start, total = time.perf_counter(), 0.0
        for batch in loader:
            loss = criterion(model(batch["image"]), batch["target"])
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
            schedule.step()
            total += loss.item()
        epoch_times.append(time.perf_counter() - start)
        print(
            f"  groups={groups} seed {seed} epoch {epoch}/{args.epochs}: loss {total / len(loader):.4f} "
            f"({epoch_times[-1]:.0f} s)",
            flush=True,
        )
    model.eval()
    scores, targets = [], []
    with torch.no_grad():
        for batch in DataLoader(val_set, batch_size=64, collate_fn=collate_single_label):
            scores.append(model(batch["image"]))
            targets.append(batch["target"])
    metrics = single_label_metrics(torch.cat(scores), torch.cat(targets), val_set.class_names)
    print(f"  groups={groups} seed {seed}: top-1 {metrics['top1']:.2f}%", flush=True)
    return dict(
        groups=groups,
        seed=seed,
        top1=metrics["top1"],
        top5=metrics["top5"],
        seconds_per_epoch=statistics.mean(epoch_times),
    )


def format_table(rows: list) -> str:
    lines = ["| groups | top-1 per seed (%) | mean ± std (%) | s / epoch |", "|---|---|---|---|"]
    for r in rows:
        lines.append(
            f"| {r['groups']} | {', '.join(f'{a:.1f}' for a in r['top1'])} | {r['mean']:.1f} ± "
            f"{r['std']:.1f} | {r['seconds_per_epoch']:.0f} |"
        )
    return "\n".join(lines)


def main(argv=None) -> int:
    """The command line: a user error is one line on stderr and exit status 2 (``gkg_pyg.cli.run_cli``)."""
    return run_cli(run, argv)


def run(argv=None) -> list:
    """Run the comparison the command line asks for; returns the table's rows. Raises on errors."""
    parser = ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", default="data/synthetic_shapes", help="where the data set is (generated if needed)")
    parser.add_argument("--model", default="pvig_ti", choices=gkg_pyg.list_models("pvig_*"))
    parser.add_argument("--groups", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--weight-decay", type=float, default=0.05)
    parser.add_argument("--k", type=int, default=4)
    parser.add_argument("--image-size", type=int, default=64, help="image and model size")
    parser.add_argument("--num-train", type=int, default=2000)
    parser.add_argument("--num-val", type=int, default=400)
    parser.add_argument("--data-seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--out", default=None, help="write the runs and the table here as JSON")
    args = parser.parse_args(argv)
    if min(args.epochs, args.batch_size, args.k, args.num_train, args.num_val, args.image_size) < 1:
        parser.error("--epochs, --batch-size, --k, --num-train, --num-val and --image-size must be positive")
    if not args.lr > 0 or not args.weight_decay >= 0 or min(args.groups) < 1:
        parser.error("--lr must be > 0, --weight-decay >= 0 and --groups positive")
    if args.threads:
        torch.set_num_threads(args.threads)
    root = ensure_synthetic_shapes(
        args.root, args.num_train, args.num_val, args.image_size, args.data_seed, progress=True
    )
    normalise = [T.ToTensor(), T.Normalize(MEAN, STD)]
    train_set = ImageFolderDataset(root, "train", T.Compose([T.RandomHorizontalFlip()] + normalise))
    val_set = ImageFolderDataset(root, "val", T.Compose(normalise), class_names=train_set.class_names)
    if len(train_set) < args.batch_size:
        parser.error(f"--batch-size {args.batch_size} is larger than the {len(train_set)} training images")
    print(
        f"{args.model}, {len(train_set)} training and {len(val_set)} validation images of "
        f"{args.image_size} px, {train_set.num_classes} classes, k={args.k}",
        flush=True,
    )
    runs = [run_one(g, s, train_set, val_set, args) for g in args.groups for s in args.seeds]
    rows = summarise_seeds(runs, "groups", "top1")
    print(format_table(rows))
    if args.out:
        Path(args.out).write_text(json.dumps(dict(args=vars(args), runs=runs, summary=rows), indent=2))
    return rows


if __name__ == "__main__":
    sys.exit(main())
