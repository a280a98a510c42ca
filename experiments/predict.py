"""Predict the labels of images with a trained checkpoint.

    python experiments/predict.py --checkpoint runs/demo/checkpoint_best.pth photos/ "more/**/*.png" one.jpg
    python experiments/predict.py --checkpoint CKPT photos/ --output predictions.csv --topk 5
    python experiments/predict.py --checkpoint CKPT img.jpg --json --threshold 0.3
    gkg-predict --checkpoint CKPT photos/                        # the same, installed as a command

Sources are image files, folders (searched recursively for image files)
and glob patterns (quote them; ``**`` spans folders). Images are read in
batches by --workers loader processes, with a progress bar on stderr.

Everything else comes from the checkpoint: the model (its config), the
class names, the preprocessing (input size, normalisation: the checkpoint's
``preprocess`` entry, else its config's model.img_size with the package's
normalisation) and the decision thresholds that ``evaluate.py
--choose-thresholds`` stored (per class, where a class had enough
positives on the calibration split, else the global one; --threshold
global or a number in [0, 1] overrides them; without stored thresholds
0.5). Which thresholds apply is printed on stderr. --config is needed only
for weights without a config (e.g. the authors' checkpoints).

Output, one record per image (in the order found): ``image``, ``labels``
(the labels whose score reaches their threshold, best first), ``top`` (the
--topk best labels with their scores) and ``error`` (why an image could not
be read; such images are reported on stderr, skipped, and get no labels).
A single-label checkpoint (``task: single_label``, e.g. Pyramid ViG) gives
softmax probabilities and one label, the most probable class (--threshold
does not apply); its preprocessing is timm's resize and centre crop.
--output FILE.csv writes columns image, labels (joined by
--label-delimiter, default "|"), error, top1, score1, ... topK, scoreK;
--output FILE.json (or --json on stdout) writes a list of records; without
either, one line per image is printed.

A mistake in an option or the checkpoint stops with one line, ``error:
...`` (exit status 2; --debug adds the traceback); images that cannot be
read are reported and skipped (exit status 1 when no image could be read).
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

if not __package__:  # run as a file (python experiments/predict.py): import gkg_pyg from this checkout
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gkg_pyg.builder import load_trained_model  # noqa: E402
from gkg_pyg.cli import ArgumentParser, device_argument, prepare_output, run_cli  # noqa: E402
from gkg_pyg.config import check_option  # noqa: E402
from gkg_pyg.errors import MissingFileError, UsageError  # noqa: E402
from gkg_pyg.data import checkpoint_preprocess, find_images, load_rgb  # noqa: E402
from gkg_pyg.data import transform_from_preprocess  # noqa: E402
from gkg_pyg.thresholds import describe_thresholds, read_thresholds  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("sources", nargs="+", metavar="IMAGE", help="image files, folders (recursive), glob patterns")
    p.add_argument("--checkpoint", required=True, help="trained weights")
    p.add_argument("--config", help="YAML config (default: the one saved in the checkpoint)")
    p.add_argument(
        "--threshold",
        default="per-class",
        help="'per-class' (the thresholds stored by evaluate.py --choose-thresholds, else 0.5), "
        "'global' (the stored global one) or a number in [0, 1] (as eval.threshold)",
    )
    p.add_argument("--topk", type=int, default=5, help="report the k best labels with their scores (default 5)")
    p.add_argument("--ema", action="store_true", help="use the checkpoint's EMA weights")
    p.add_argument("--output", help="write FILE.csv or FILE.json (default: print)")
    p.add_argument("--json", action="store_true", help="print JSON instead of one line per image")
    p.add_argument("--label-delimiter", default="|", help="joins the labels in the CSV output (default |)")
    p.add_argument("--batch-size", type=int, default=16, help="images per forward pass (as eval.batch_size)")
    p.add_argument("--workers", type=int, default=2, help="image loading processes (0: in this process)")
    p.add_argument("--device", type=device_argument, default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = p.parse_args(argv)
    if args.topk < 1:
        p.error(f"--topk must be >= 1, got {args.topk}")
    if args.workers < 0:
        p.error(f"--workers must be >= 0, got {args.workers}")
    args.batch_size = check_option("eval.batch_size", args.batch_size, "--batch-size")
    if args.threshold not in ("per-class", "global"):  # a number: the checks of eval.threshold
        args.threshold = check_option("eval.threshold", args.threshold, "--threshold")
    if args.output and Path(args.output).suffix.lower() not in (".csv", ".json"):
        p.error(f"--output must end in .csv or .json, got {args.output}")
    if args.output:  # before the model runs: the predictions can be written there
        prepare_output(args.output, "--output")
    return args


def load_model(args: argparse.Namespace):
    """(model with its weights, class names, preprocess record, checkpoint dict, single-label?)."""
    model, class_names, cfg, checkpoint = load_trained_model(args.checkpoint, args.config, args.ema)
    single = cfg.get("task") == "single_label"
    return model, class_names, checkpoint_preprocess(checkpoint, cfg), checkpoint, single


def decision_thresholds(args, checkpoint: dict, class_names: list[str]) -> tuple[torch.Tensor, str]:
    """(L,) thresholds and a note on which they are and where they come from.
    ``args.threshold`` is "per-class", "global" or a number ``parse_args`` checked."""
    record = read_thresholds(checkpoint, "ema" if args.ema else "model", class_names)
    if args.threshold == "per-class":
        if record is None:
            return torch.full((len(class_names),), 0.5, dtype=torch.float64), (
                f"0.5 for every class ({args.checkpoint} holds no thresholds; evaluate.py --choose-thresholds "
                "chooses them)"
            )
        return torch.as_tensor(record["per_class"], dtype=torch.float64), (
            f"{describe_thresholds(record)}, from {args.checkpoint}"
        )
    if args.threshold == "global":
        if record is None:
            raise UsageError(f"--threshold global: {args.checkpoint} holds no thresholds "
                             f"(choose them with evaluate.py --choose-thresholds)")  # fmt: skip
        value = float(record["global"])
        return torch.full((len(class_names),), value, dtype=torch.float64), (
            f"global {value:.4f} for every class, from {args.checkpoint}"
        )
    value = float(args.threshold)
    return torch.full((len(class_names),), value, dtype=torch.float64), f"{value:g} for every class (--threshold)"


class ImageFiles(Dataset):
    """(tensor or None, path, error or None) per file: unreadable files do not stop the others."""

    def __init__(self, paths: list[str], transform) -> None:
        self.paths, self.transform = paths, transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int):
        path = self.paths[index]
        try:
            return self.transform(load_rgb(path)), path, None
        except OSError as err:  # FileNotFoundError, UnreadableImageError
            return None, path, str(err)


def keep_all(batch):
    return batch


def predict(model, dataset: ImageFiles, thresholds, class_names, args, single: bool = False) -> list[dict]:
    """One record per file, in the dataset's order. Multi-label: sigmoid scores,
    the labels at or above their threshold; single-label (``single``): softmax
    probabilities, the most probable class."""
    loader = DataLoader(dataset, batch_size=args.batch_size, num_workers=args.workers, collate_fn=keep_all)
    records = []
    bar = tqdm(total=len(dataset), desc="predict", unit="img", disable=args.no_progress, file=sys.stderr)
    device = args.device
    model.to(device)
    k = min(args.topk, len(class_names))
    for batch in loader:
        good = [(x, p) for x, p, e in batch if e is None]
        scores = {}
        if good:
            with torch.no_grad():
                logits = model(torch.stack([x for x, _ in good]).to(device)).float()
                s = (logits.softmax(dim=-1) if single else logits.sigmoid()).cpu()
            scores = {p: row for (_, p), row in zip(good, s)}
        for _, path, error in batch:
            if error is not None:
                print(f"skipped: {error}", file=sys.stderr)
                records.append({"image": path, "labels": [], "top": [], "error": error})
                continue
            row = scores[path]
            order = torch.argsort(row, descending=True).tolist()
            chosen = order[:1] if single else [i for i in order if row[i].double() >= thresholds[i]]
            labels = [{"label": class_names[i], "score": round(float(row[i]), 4)} for i in chosen]
            top = [{"label": class_names[i], "score": round(float(row[i]), 4)} for i in order[:k]]
            records.append({"image": path, "labels": labels, "top": top, "error": None})
        bar.update(len(batch))
    bar.close()
    return records


def write_csv(records: list[dict], path: Path, topk: int, delimiter: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        top_columns = [c for i in range(1, topk + 1) for c in (f"top{i}", f"score{i}")]
        writer.writerow(["image", "labels", "error", *top_columns])
        for r in records:
            top = [c for t in r["top"] for c in (t["label"], f"{t['score']:.4f}")]
            top += [""] * (2 * topk - len(top))
            writer.writerow([r["image"], delimiter.join(x["label"] for x in r["labels"]), r["error"] or ""] + top)


def main(argv=None) -> int:
    """The command line: a user error is one line on stderr and exit status 2 (``gkg_pyg.cli.run_cli``)."""
    return run_cli(run, argv)


def run(argv=None) -> int:
    """Predict as the command line says; raises on errors (``main`` reports them)."""
    args = parse_args(argv)
    paths = find_images(args.sources)
    if not paths:
        raise MissingFileError(f"no image files found in {args.sources}")
    model, class_names, preprocess, checkpoint, single = load_model(args)
    thresholds = None  # single-label: the most probable class
    if not single:
        thresholds, rule = decision_thresholds(args, checkpoint, class_names)
        print(f"thresholds: {rule}", file=sys.stderr)
    dataset = ImageFiles(paths, transform_from_preprocess(preprocess))
    records = predict(model, dataset, thresholds, class_names, args, single)
    failed = sum(r["error"] is not None for r in records)
    if args.output:
        out = Path(args.output)
        if out.suffix.lower() == ".csv":
            write_csv(records, out, min(args.topk, len(class_names)), args.label_delimiter)
        else:
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps(records, indent=2))
        print(f"wrote {len(records)} predictions to {out}", file=sys.stderr)
    elif args.json:
        print(json.dumps(records, indent=2))
    else:
        for r in records:
            if r["error"] is not None:
                print(f"{r['image']}: ERROR {r['error']}")
                continue
            shown = ", ".join(f"{x['label']} {x['score']:.3f}" for x in r["labels"]) or "(no label above threshold)"
            print(f"{r['image']}: {shown}")
    if failed:
        print(f"{failed} of {len(records)} images could not be read (listed above)", file=sys.stderr)
    return 1 if failed == len(records) else 0


if __name__ == "__main__":
    sys.exit(main())
