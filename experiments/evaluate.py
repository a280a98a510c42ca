"""Evaluate a checkpoint on the evaluation split of a config, and choose
per-class decision thresholds.

    python experiments/evaluate.py experiments/configs/coco_576.yaml --checkpoint runs/coco_576/checkpoint_best.pth
    # the authors' released weights:
    python experiments/evaluate.py experiments/configs/coco_576.yaml --checkpoint gkgnet_coco_576.pth
    # choose F1-optimal thresholds on the validation split and store them in the checkpoint:
    python experiments/evaluate.py CONFIG.yaml --checkpoint runs/NAME/checkpoint_best.pth --choose-thresholds
    gkg-evaluate CONFIG.yaml --checkpoint CKPT                   # the same, installed as a command

Any layout gkg_pyg.load_checkpoint reads works (our training checkpoints,
the authors' mmcls checkpoints). Prints the metrics table (and the EMA
weights' table when the checkpoint has them) and writes metrics.json and
per_class_ap.csv (per_class_ap_ema.csv) into --output (default: an
``eval`` folder beside the checkpoint). Runs under torchrun too.

Thresholds (``gkg_pyg.thresholds``). With --choose-thresholds the
threshold of each class that maximises its F1 on this split, and the one
global threshold that maximises OF1, are chosen for each set of weights;
a class with fewer than --min-positives positives on the split (default
eval.min_positives, 10) keeps the global threshold instead (a threshold
fitted to one or two positives floods the predictions on new images), and
a warning names those classes;
the metrics are printed at 0.5 (eval.threshold), at the per-class and at
the global thresholds, and the thresholds are stored in the checkpoint
(an entry ``thresholds``, rewritten atomically; --thresholds-output PATH
writes a copy with them instead, --no-store leaves every checkpoint
alone) and written to thresholds.json. Metrics at thresholds chosen on
the split they are measured on are optimistic: choose them on a
validation split, then evaluate another split (--set data.val_split=...):
thresholds already stored in the checkpoint are always reported beside
0.5. predict.py uses the stored thresholds.

A mistake in the config, the data or the checkpoint stops the run with one
line, ``error: ...`` (exit status 2; --debug adds the traceback).
--compile runs the evaluation forward pass through ``torch.compile``.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
from pathlib import Path

import torch

if not __package__:  # run as a file (python experiments/evaluate.py): import gkg_pyg from this checkout
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gkg_pyg.builder import build_model, check_trained_settings  # noqa: E402
from gkg_pyg.checkpoint import load_checkpoint, read_checkpoint  # noqa: E402
from gkg_pyg.cli import ArgumentParser, add_compile_backend_argument, compiled, prepare_output, run_cli  # noqa: E402
from gkg_pyg.config import add_override_argument, check_option, load_config  # noqa: E402
from gkg_pyg.errors import CheckpointError, DataError, UsageError  # noqa: E402
from gkg_pyg.training.distributed import cleanup_distributed, init_distributed  # noqa: E402
from gkg_pyg.training.loaders import build_split, check_images, eval_loader  # noqa: E402
from gkg_pyg.training.loops import evaluate  # noqa: E402
from gkg_pyg.training.precision import build_precision  # noqa: E402
from gkg_pyg.single_label import single_label_report  # noqa: E402
from gkg_pyg.metrics import (  # noqa: E402
    SCALE_KEYS, SUMMARY_KEYS, TOP3_KEYS, format_metrics_table, multilabel_metrics, per_class_ap_csv,
)  # fmt: skip
from gkg_pyg.thresholds import (  # noqa: E402
    choose_thresholds, describe_thresholds, format_threshold_table, metrics_at_thresholds, read_thresholds,
    store_thresholds, thresholds_json,
)  # fmt: skip

THRESHOLD_KEYS = SUMMARY_KEYS[1:] + TOP3_KEYS


def parse_args(argv=None) -> argparse.Namespace:
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config", help="YAML config naming the data set and the model")
    p.add_argument("--checkpoint", required=True, help="weights to evaluate")
    add_override_argument(p)
    p.add_argument("--output", help="folder for metrics.json and per_class_ap.csv (default: <checkpoint folder>/eval)")
    p.add_argument(
        "--skip-bad-images",
        action="store_true",
        help="skip missing or unreadable images (data.skip_bad_images) and count them",
    )
    p.add_argument(
        "--choose-thresholds",
        action="store_true",
        help="choose F1-optimal per-class and global thresholds on this split and store them",
    )
    p.add_argument(
        "--thresholds-output",
        metavar="PATH",
        help="write the checkpoint with the chosen thresholds here instead of updating it in place",
    )
    p.add_argument("--no-store", action="store_true", help="choose thresholds but leave every checkpoint file alone")
    p.add_argument(
        "--min-positives",
        type=int,
        metavar="N",
        help="a class gets its own threshold only with N positives on the split (default: eval.min_positives)",
    )
    p.add_argument("--compile", action="store_true", help="run the evaluation forward pass under torch.compile")
    add_compile_backend_argument(p)
    args = p.parse_args(argv)
    given = {
        "--thresholds-output": args.thresholds_output is not None,
        "--no-store": args.no_store,
        "--min-positives": args.min_positives is not None,
    }
    needs_choosing = [option for option, present in given.items() if present]
    if needs_choosing and not args.choose_thresholds:
        p.error(f"{', '.join(needs_choosing)} apply to the thresholds that --choose-thresholds chooses; add it")
    return args


def evaluation_split(cfg: dict, config: str) -> str:
    """Which images were evaluated, in words (stored with chosen thresholds)."""
    data = cfg["data"]
    if data["name"] == "csv" and data["csv"]["val"]:
        where = data["csv"]["val"]
    elif (data.get("ann_file") or {}).get("val"):
        where = data["ann_file"]["val"]
    else:
        where = f"split {data['val_split']}"
    return f"{data['name']} {where} under {data['root']} ({config})"


def threshold_columns(res: dict, threshold: float, record: dict | None) -> dict:
    """Metrics at the single threshold and, with a record, at its per-class and global thresholds."""
    columns = {f"{threshold:g}": metrics_at_thresholds(res["scores"], res["targets"], threshold)}
    if record is not None:
        columns["per-class"] = metrics_at_thresholds(res["scores"], res["targets"], record["per_class"])
        columns[f"global {record['global']:.3f}"] = metrics_at_thresholds(res["scores"], res["targets"],
                                                                           record["global"])  # fmt: skip
    return columns


def main(argv=None) -> int:
    """The command line: a user error is one line on stderr and exit status 2 (``gkg_pyg.cli.run_cli``)."""
    return run_cli(run, argv)


def run(argv=None) -> int:
    """Evaluate as the command line says; raises on errors (``main`` reports them)."""
    args = parse_args(argv)
    info = init_distributed()
    if not info.is_main:  # one copy of the library's messages: rank 0's
        logging.getLogger("gkg_pyg").setLevel(logging.ERROR)
    cfg = load_config(args.config, args.overrides)
    if cfg["task"] == "single_label" and args.choose_thresholds:
        raise UsageError("--choose-thresholds is for multi-label models (task: multi_label); a single-label model "
                         "predicts its most probable class and has no thresholds")  # fmt: skip
    if args.skip_bad_images:
        cfg["data"]["skip_bad_images"] = True
    if args.min_positives is not None:  # the same check as the config key
        cfg["eval"]["min_positives"] = check_option("eval.min_positives", args.min_positives, "--min-positives")
    if cfg["train"]["num_threads"]:
        torch.set_num_threads(cfg["train"]["num_threads"])

    _, checkpoint = read_checkpoint(args.checkpoint)  # before the data: a bad checkpoint fails at once
    out_dir = Path(args.output) if args.output else Path(args.checkpoint).resolve().parent / "eval"
    if info.is_main:  # before evaluating: where the results go can be written
        prepare_output(out_dir, "--output" if args.output else "the output folder", folder=True)
        if args.thresholds_output:
            prepare_output(args.thresholds_output, "--thresholds-output")
    check_trained_settings(cfg, checkpoint, str(args.checkpoint))
    dataset = build_split(cfg, train=False)
    trained_on = checkpoint.get("class_names")
    if trained_on is not None and list(trained_on) != list(dataset.class_names):  # rows would be mislabelled
        raise CheckpointError(
            f"{args.checkpoint} was trained on the labels {list(trained_on)}, the evaluation split has "
            f"{list(dataset.class_names)} (names and order must agree)"
        )
    missing = check_images(dataset, "evaluation", cfg, info.is_main)
    model = build_model(cfg, dataset.class_names, load_weights=False)
    load_checkpoint(model, checkpoint, verbose=info.is_main, name=str(args.checkpoint))
    models = {"model": model}
    if isinstance(checkpoint.get("ema"), dict):
        ema = build_model(cfg, dataset.class_names, load_weights=False)
        load_checkpoint(ema, checkpoint["ema"], verbose=False, name=f"{args.checkpoint} (EMA weights)")
        models["ema"] = ema

    loader = eval_loader(cfg, dataset, info)
    precision = build_precision(cfg["train"]["amp"], info.device)
    models = {name: compiled(net.to(info.device), args) for name, net in models.items()}
    out = {"checkpoint": str(args.checkpoint)}

    def evaluated(name: str, net) -> dict:
        """The model's scores and targets on the split; a DataError where every image was unreadable."""
        res = evaluate(net.to(info.device), loader, info, precision, f"eval {name}", cfg["output"]["progress"],
                       cfg["task"])  # fmt: skip
        if not len(res["targets"]):  # no metric exists
            raise DataError(f"no evaluation image could be read: all {res['num_skipped']} were skipped as unreadable")
        return res

    if cfg["task"] == "single_label":  # top-1 / top-5 / confusion matrix; no thresholds
        results = {name: evaluated(name, net) for name, net in models.items()}
        out.update(single_label_report(out_dir, dataset.class_names, None, results, write=info.is_main))
        if info.is_main:
            (out_dir / "metrics.json").write_text(json.dumps(out, indent=2))
        cleanup_distributed()
        return 0
    chosen = {}
    split = evaluation_split(cfg, args.config)
    for name, net in models.items():
        res = evaluated(name, net)
        metrics = multilabel_metrics(res["scores"], res["targets"], cfg["eval"]["threshold"], res["areas"],
                                     dataset.class_names)  # fmt: skip
        keys = SUMMARY_KEYS + TOP3_KEYS + SCALE_KEYS
        out[name] = {k: (None if math.isnan(metrics[k]) else metrics[k]) for k in keys if k in metrics}
        out[name].update(num_images=len(res["targets"]), num_skipped=res["num_skipped"])
        stored = read_thresholds(checkpoint, name, dataset.class_names)
        if args.choose_thresholds:
            chosen[name] = choose_thresholds(res["scores"], res["targets"], dataset.class_names, chosen_on=split,
                                             min_positives=cfg["eval"]["min_positives"])  # fmt: skip
        record = chosen.get(name, stored)
        columns = threshold_columns(res, cfg["eval"]["threshold"], record)
        if record is not None:
            out[name]["at_thresholds"] = {"chosen_on": record.get("chosen_on"), **{
                rule: dict(values) for rule, values in list(columns.items())[1:]}}  # fmt: skip
        if info.is_main:
            print(f"\n{name} ({args.checkpoint}, {len(res['targets'])} images):")
            print(format_metrics_table(metrics))
            suffix = "" if name == "model" else f"_{name}"
            per_class_ap_csv(metrics, dataset.class_names, out_dir / f"per_class_ap{suffix}.csv")
            if record is not None:
                how = (
                    "chosen now on this split: optimistic here"
                    if name in chosen
                    else f"stored in the checkpoint, chosen on {record.get('chosen_on') or 'another split'}"
                )
                print(f"\n{name} at thresholds ({how}): {describe_thresholds(record)}")
                print(format_threshold_table(columns, THRESHOLD_KEYS))
            if res["num_skipped"] or missing:
                print(f"skipped {res['num_skipped']} unreadable images ({missing} left out by the image check)")
    if info.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "metrics.json").write_text(json.dumps(out, indent=2))
        print(f"\nsaved {out_dir / 'metrics.json'}")
        if chosen:
            (out_dir / "thresholds.json").write_text(json.dumps({n: thresholds_json(r) for n, r in chosen.items()},
                                                                indent=2))  # fmt: skip
            print(f"saved {out_dir / 'thresholds.json'}")
            if not args.no_store:
                written = store_thresholds(args.checkpoint, chosen, args.thresholds_output)
                print(f"stored the thresholds of {', '.join(chosen)} in {written} (used by predict.py)")
    cleanup_distributed()
    return 0


if __name__ == "__main__":
    sys.exit(main())
