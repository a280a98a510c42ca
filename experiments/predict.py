"""Predict the labels of images with a trained checkpoint.

    python experiments/predict.py --checkpoint runs/demo/checkpoint_best.pth img1.jpg img2.jpg
    python experiments/predict.py --checkpoint runs/demo/checkpoint_best.pth --topk 3 --json img.jpg

The model config and the class names come from the training checkpoint;
--config is needed only for weights that lack them (e.g. the authors'
checkpoints: the class names then come from the config's data set).
Prints the labels whose score is >= --threshold (default 0.5), or the
--topk best labels, with their scores; --json prints
``[{"image": path, "labels": [{"label": name, "score": s}, ...]}, ...]``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from gkg_pyg.checkpoint import read_checkpoint, load_checkpoint  # noqa: E402
from gkg_pyg.builder import build_model  # noqa: E402
from gkg_pyg.config import load_config, validate_config  # noqa: E402
from gkg_pyg.data import build_test_transform, load_rgb  # noqa: E402
from gkg_pyg.training.loaders import build_split  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("images", nargs="+", help="image files")
    p.add_argument("--checkpoint", required=True, help="trained weights")
    p.add_argument("--config", help="YAML config (default: the one saved in the checkpoint)")
    choice = p.add_mutually_exclusive_group()
    choice.add_argument("--threshold", type=float, default=0.5, help="print labels with score >= this")
    choice.add_argument("--topk", type=int, help="print the k best labels instead")
    p.add_argument("--ema", action="store_true", help="use the checkpoint's EMA weights")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--batch-size", type=int, default=16)
    return p.parse_args(argv)


def load_model(args: argparse.Namespace):
    """The model with its weights, its class names and its input size."""
    _, checkpoint = read_checkpoint(args.checkpoint)
    if args.config:
        cfg = load_config(args.config)
    elif isinstance(checkpoint.get("config"), dict):
        cfg = validate_config(checkpoint["config"])
    else:
        raise ValueError(f"{args.checkpoint} holds no config (not a gkg-pyg training checkpoint): pass --config")
    class_names = checkpoint.get("class_names") or build_split(cfg, train=False).class_names
    model = build_model(cfg, class_names, load_weights=False)
    if args.ema:
        if not isinstance(checkpoint.get("ema"), dict):
            raise ValueError(f"--ema: {args.checkpoint} holds no EMA weights")
        checkpoint = checkpoint["ema"]
    load_checkpoint(model, checkpoint, verbose=False)
    return model.eval(), list(class_names), cfg["model"]["img_size"]


def select(scores: torch.Tensor, class_names: list[str], threshold: float, topk: int | None) -> list[dict]:
    """Labels of one image's (L,) scores: the top k, or all >= threshold, best first."""
    order = torch.argsort(scores, descending=True).tolist()
    if topk is not None:
        order = order[:topk]
    else:
        order = [i for i in order if scores[i] >= threshold]
    return [{"label": class_names[i], "score": round(float(scores[i]), 4)} for i in order]


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.topk is not None and args.topk < 1:
        raise ValueError(f"--topk must be >= 1, got {args.topk}")
    model, class_names, img_size = load_model(args)
    transform = build_test_transform(img_size)
    results = []
    for start in range(0, len(args.images), args.batch_size):
        paths = args.images[start : start + args.batch_size]
        batch = torch.stack([transform(load_rgb(p)) for p in paths])
        with torch.no_grad():
            scores = torch.sigmoid(model(batch))
        for path, s in zip(paths, scores):
            results.append({"image": path, "labels": select(s, class_names, args.threshold, args.topk)})
    if args.json:
        print(json.dumps(results, indent=2))
    else:
        for r in results:
            shown = ", ".join(f"{x['label']} {x['score']:.3f}" for x in r["labels"]) or "(no label >= threshold)"
            print(f"{r['image']}: {shown}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
