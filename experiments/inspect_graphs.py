"""Draw the graphs GKGNet builds for one image (paper Fig. 5, 6, A1-A4).

    python experiments/inspect_graphs.py --config C [--checkpoint P] [--set KEY=VALUE] --image IMG \
        [--label NAME ...] [--stage N] [--patch ROW COL] --out DIR [--html] \
        [--dataset DIR [--max-images N]] [--format png|svg]
    gkg-inspect ...                     # the same, installed as a command

Writes to DIR:

* ``label_<name>_stage<N>.<fmt>``: the patches each label connects to, per
  group (default: the three highest-scoring labels, every stage unless
  ``--stage``);
* ``patch_stage<N>_r<ROW>_c<COL>.<fmt>`` with ``--patch`` (needs ``--stage``;
  ROW, COL in that stage's patch grid): one patch and its neighbours;
* ``viewer.html`` with ``--html``: the interactive, self-contained viewer;
* ``histogram_stage<N>.<fmt>`` and ``neighbour_counts.json`` with
  ``--dataset``: distinct-neighbour counts per label over the images of a folder;
* ``summary.json``: scores and, per stage and label, the neighbours, the
  distinct count and the group overlap.

The config is a training config (``experiments/configs/*.yaml``); its
model is built by ``gkg_pyg.builder.build_model``.  Without ``--checkpoint``
the model keeps random weights (seeded by ``--seed``) and every figure says
so.  Class names come from the checkpoint's ``class_names``, else from the
config's data set when model.num_classes is not set, else ``label_i``.
A mistake in an option, the config, the checkpoint or the image stops with
one line, ``error: ...`` (exit status 2; --debug adds the traceback).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from dataclasses import asdict
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

import torch

if not __package__:  # run as a file (python experiments/inspect_graphs.py): import gkg_pyg from this checkout
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import gkg_pyg  # noqa: E402
from gkg_pyg import inspect as gi  # noqa: E402
from gkg_pyg.checkpoint import read_checkpoint  # noqa: E402
from gkg_pyg.builder import build_model  # noqa: E402
from gkg_pyg.cli import ArgumentParser, device_argument, prepare_output, run_cli  # noqa: E402
from gkg_pyg.config import add_override_argument, load_config  # noqa: E402
from gkg_pyg.data import IMAGE_SUFFIXES, class_names_from_config  # noqa: E402
from gkg_pyg.errors import ConfigError, MissingFileError  # noqa: E402


def load_model(
    config: str, checkpoint: Optional[str], seed: int = 0, device="cpu", overrides: Sequence[str] = ()
) -> Tuple[torch.nn.Module, Optional[List[str]], str]:
    """The model of ``config`` (through ``gkg_pyg.builder.build_model``), its
    class names (None: ``label_i``) and the figure note.

    The names come from the checkpoint; without them, and without
    model.num_classes, from the config's data set (read cheaply:
    ``gkg_pyg.data.class_names_from_config``, e.g. the synthetic data set's
    ten names without generating it)."""
    torch.manual_seed(seed)
    cfg = load_config(config, overrides)
    names, note, ckpt = None, gi.RANDOM_WEIGHTS_NOTE, None
    if checkpoint:
        _, ckpt = read_checkpoint(checkpoint)
        names, note = ckpt.get("class_names"), ""
    if names is None and cfg["model"]["num_classes"] is None:
        try:
            names = class_names_from_config(cfg["data"])
        except (OSError, ValueError) as err:
            raise ConfigError(
                f"model.num_classes is not set and the class names cannot be read from the config's "
                f"data set ({err}); pass --checkpoint, or --set model.num_classes=N"
            ) from err
    model = build_model(cfg, names, load_weights=False, verbose=False)
    if ckpt is not None:
        gkg_pyg.load_checkpoint(model, ckpt, name=str(checkpoint))
    return model.to(device).eval(), names, note


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name)


def _resolve_labels(captured: gi.CapturedGraphs, labels: Optional[Sequence[str]]) -> List[int]:
    """Label names (or indices) -> indices; default the three highest scores."""
    if not labels:
        return captured.scores.argsort(descending=True)[:3].tolist()
    out = []
    for label in labels:
        if label not in captured.class_names and label.isdigit():
            out.append(captured.label_index(int(label)))
        else:
            out.append(captured.label_index(label))
    return out


def dataset_images(folder: str, max_images: int) -> List[Path]:
    """The first ``max_images`` images under ``folder`` (recursively, sorted)."""
    files = sorted(p for p in Path(folder).rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise MissingFileError(f"no images ({', '.join(IMAGE_SUFFIXES)}) under {folder}")
    return files[:max_images]


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", required=True, help="YAML config with a 'model:' section")
    add_override_argument(p, help="override a config value (repeatable), e.g. --set model.num_classes=20")
    p.add_argument("--checkpoint", help="weights (gkg-pyg or the authors' layout); none: random weights")
    p.add_argument("--image", required=True, help="the image to inspect")
    p.add_argument("--label", nargs="+", help="label names (or indices); default the 3 highest scores")
    p.add_argument("--stage", type=int, choices=(1, 2, 3, 4), help="one stage (default: all)")
    p.add_argument(
        "--patch",
        type=int,
        nargs=2,
        metavar=("ROW", "COL"),
        help="also draw this patch's neighbours (in the --stage grid)",
    )
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--html", action="store_true", help="also write the interactive viewer.html")
    p.add_argument("--dataset", help="folder of images for the distinct-neighbour histogram")
    p.add_argument("--max-images", type=int, default=200, help="images of --dataset to use")
    p.add_argument("--format", choices=("png", "svg"), default="png", help="figure format")
    p.add_argument("--seed", type=int, default=0, help="seed of the random weights")
    p.add_argument("--device", type=device_argument, default="cpu")
    args = p.parse_args(argv)
    if args.patch and args.stage is None:
        p.error("--patch needs --stage (ROW and COL index that stage's patch grid)")
    if args.max_images < 1:
        p.error(f"--max-images must be at least 1, got {args.max_images}")
    return args


def main(argv: Optional[Sequence[str]] = None) -> int:
    """The command line: a user error is one line on stderr and exit status 2 (``gkg_pyg.cli.run_cli``)."""
    return run_cli(run, argv)


def run(argv: Optional[Sequence[str]] = None) -> dict:
    """Draw what the command line asks for; returns the summary also written to
    ``summary.json``. Raises on errors (``main`` reports them)."""
    args = parse_args(argv)
    # The --dataset images before anything is drawn: a wrong folder writes nothing.
    images = dataset_images(args.dataset, args.max_images) if args.dataset else None
    out = prepare_output(args.out, "--out", folder=True)
    model, ckpt_names, note = load_model(args.config, args.checkpoint, args.seed, args.device, args.overrides)
    if note:
        print(f"note: {note}")
    captured = gi.capture_graphs(model, args.image, class_names=ckpt_names, note=note)
    stages = [args.stage] if args.stage else list(range(1, captured.num_stages + 1))
    labels = _resolve_labels(captured, args.label)
    written = []
    for stage in stages:
        for label in labels:
            path = out / f"label_{_safe(captured.class_names[label])}_stage{stage}.{args.format}"
            gi.plot_label(captured, label, stage, path)
            written.append(path)
    if args.patch:
        row, col = args.patch
        path = out / f"patch_stage{args.stage}_r{row}_c{col}.{args.format}"
        gi.plot_patch(captured, args.stage, row, col, path)
        written.append(path)
    if args.html:
        written.append(gi.write_html_viewer(captured, out / "viewer.html"))
    if images is not None:
        counts = gi.neighbour_count_distribution(model, images, class_names=captured.class_names, note=note)
        for stage in stages:
            path = out / f"histogram_stage{stage}.{args.format}"
            gi.plot_neighbour_histogram(counts, stage, path=path)
            written.append(path)
        table = {
            "images": [str(p) for p in images],
            "k": counts.k,
            "groups": counts.groups,
            "stages": {
                s: {
                    name: {"mean": float(m), "histogram": h.tolist()}
                    for name, m, h in zip(counts.class_names, counts.mean(s), counts.histogram(s))
                }
                for s in stages
            },
        }
        path = out / "neighbour_counts.json"
        path.write_text(json.dumps(table, indent=1))
        written.append(path)
    summary = {
        "image": str(args.image),
        "checkpoint": args.checkpoint,
        "note": note,
        "k": captured.k,
        "groups": captured.groups,
        "scores": dict(zip(captured.class_names, captured.scores.tolist())),
        "labels": [asdict(s) for s in gi.summarize_labels(captured, stages)],
        "patch": asdict(gi.patch_summary(captured, args.stage, *args.patch)) if args.patch else None,
    }
    path = out / "summary.json"
    path.write_text(json.dumps(summary, indent=1))
    written.append(path)
    for path in written:
        print(f"wrote {path}")
    return summary


if __name__ == "__main__":
    sys.exit(main())
