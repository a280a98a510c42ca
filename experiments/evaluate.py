"""Evaluate a checkpoint on the evaluation split of a config.

    python experiments/evaluate.py experiments/configs/coco_576.yaml --checkpoint runs/coco_576/checkpoint_best.pth
    # the authors' released weights:
    python experiments/evaluate.py experiments/configs/coco_576.yaml --checkpoint gkgnet_coco_576.pth

Any layout gkg_pyg.load_checkpoint reads works (our training checkpoints,
the authors' mmcls checkpoints). Prints the metrics table (and the EMA
weights' table when the checkpoint has them) and writes metrics.json and
per_class_ap.csv (per_class_ap_ema.csv) into --output (default: an
``eval`` folder beside the checkpoint). Runs under torchrun too.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from gkg_pyg.builder import build_model  # noqa: E402
from gkg_pyg.checkpoint import load_checkpoint, read_checkpoint  # noqa: E402
from gkg_pyg.config import load_config  # noqa: E402
from gkg_pyg.training.distributed import cleanup_distributed, init_distributed  # noqa: E402
from gkg_pyg.training.loaders import build_split, check_images, eval_loader  # noqa: E402
from gkg_pyg.training.loops import evaluate  # noqa: E402
from gkg_pyg.training.precision import build_precision  # noqa: E402
from gkg_pyg.metrics import (  # noqa: E402
    SCALE_KEYS, SUMMARY_KEYS, TOP3_KEYS, format_metrics_table, multilabel_metrics, per_class_ap_csv,
)  # fmt: skip


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config", help="YAML config naming the data set and the model")
    p.add_argument("--checkpoint", required=True, help="weights to evaluate")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value (repeatable)")
    p.add_argument("--output", help="folder for metrics.json and per_class_ap.csv (default: <checkpoint folder>/eval)")
    p.add_argument("--skip-bad-images", action="store_true",
                   help="skip missing or unreadable images (data.skip_bad_images) and count them")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    info = init_distributed()
    cfg = load_config(args.config, args.overrides)
    if args.skip_bad_images:
        cfg["data"]["skip_bad_images"] = True
    if cfg["train"]["num_threads"]:
        torch.set_num_threads(cfg["train"]["num_threads"])

    dataset = build_split(cfg, train=False)
    missing = check_images(dataset, "evaluation", cfg["data"]["skip_bad_images"])
    model = build_model(cfg, dataset.class_names, load_weights=False)
    _, checkpoint = read_checkpoint(args.checkpoint)
    load_checkpoint(model, checkpoint, verbose=info.is_main)
    models = {"model": model}
    if isinstance(checkpoint.get("ema"), dict):
        ema = build_model(cfg, dataset.class_names, load_weights=False)
        load_checkpoint(ema, checkpoint["ema"], verbose=False)
        models["ema"] = ema

    loader = eval_loader(cfg, dataset, info)
    precision = build_precision(cfg["train"]["amp"], info.device)
    out_dir = Path(args.output) if args.output else Path(args.checkpoint).resolve().parent / "eval"
    out = {"checkpoint": str(args.checkpoint)}
    for name, net in models.items():
        res = evaluate(net.to(info.device), loader, info, precision, f"eval {name}", cfg["output"]["progress"])
        metrics = multilabel_metrics(res["scores"], res["targets"], cfg["eval"]["threshold"], res["areas"],
                                     dataset.class_names)  # fmt: skip
        keys = SUMMARY_KEYS + TOP3_KEYS + SCALE_KEYS
        out[name] = {k: (None if math.isnan(metrics[k]) else metrics[k]) for k in keys if k in metrics}
        out[name].update(num_images=len(res["targets"]), num_skipped=res["num_skipped"])
        if info.is_main:
            print(f"\n{name} ({args.checkpoint}, {len(res['targets'])} images):")
            print(format_metrics_table(metrics))
            suffix = "" if name == "model" else f"_{name}"
            per_class_ap_csv(metrics, dataset.class_names, out_dir / f"per_class_ap{suffix}.csv")
            if res["num_skipped"] or missing:
                print(f"skipped {res['num_skipped']} unreadable images ({missing} missing files)")
    if info.is_main:
        (out_dir / "metrics.json").write_text(json.dumps(out, indent=2))
        print(f"\nsaved {out_dir / 'metrics.json'}")
    cleanup_distributed()
    return 0


if __name__ == "__main__":
    sys.exit(main())
