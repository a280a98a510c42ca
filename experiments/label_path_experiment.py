"""Does the label path earn its place? GKGNet vs no cross-level modules vs G = 1.

    OMP_NUM_THREADS=1 python experiments/label_path_experiment.py --out runs/label_path
    python experiments/label_path_experiment.py --out runs/label_path --report   # the table only

Trains each variant with several seeds on the synthetic data set (the demo's
recipe on a smaller set for more epochs: see DEFAULT_OVERRIDES), evaluating
after every epoch. After every epoch it also measures, on a fixed probe batch
(the first 64 evaluation images, or all of fewer; evaluation mode), what each path contributes: the spread
(standard deviation over images and labels) of the patch head's logits and of
the label head's logits, and the gradient norms of the patch path (stem,
stages, patch head) and of the label path (label embedding, cross-level
modules, label projections, label head). One JSON line per (variant, seed,
epoch) goes to <out>/log.jsonl; finished runs are skipped when the command
is run again (so a killed experiment resumes run by run), which must then
have the same overrides (kept in <out>/settings.json: runs of other
settings never mix in one table). The report prints
the final and the best mAP per variant as mean +- standard deviation over the
seeds, the mAP per epoch, and the diagnostics of the last epoch. A mistake
in an option or an override stops with one line, ``error: ...`` (exit
status 2; --debug adds the traceback).
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

if not __package__:  # run as a file (python experiments/label_path_experiment.py): import gkg_pyg from here
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gkg_pyg.builder import build_model  # noqa: E402
from gkg_pyg.cli import ArgumentParser, run_cli  # noqa: E402
from gkg_pyg.errors import UsageError  # noqa: E402
from gkg_pyg.config import add_override_argument, load_config  # noqa: E402
from gkg_pyg.data import collate  # noqa: E402
from gkg_pyg.loss import GKGNetLoss  # noqa: E402
from gkg_pyg.metrics import multilabel_metrics  # noqa: E402
from gkg_pyg.training.distributed import DistInfo  # noqa: E402
from gkg_pyg.training.loaders import build_split, eval_loader, start_epoch, train_loader  # noqa: E402
from gkg_pyg.training.loops import evaluate, steps_per_epoch, train_one_epoch  # noqa: E402
from gkg_pyg.training.optim import build_optimizer, build_schedule  # noqa: E402
from gkg_pyg.training.precision import build_precision  # noqa: E402
from gkg_pyg.training.rng import seed_everything  # noqa: E402

CONFIG = Path(__file__).resolve().parent / "configs" / "demo.yaml"
VARIANTS = {
    "full": [],
    "no_cross_level": ["model.cross_level=false"],
    "groups_1": ["model.groups=1"],
}
# The demo recipe (GKGNet-Ti, K = 4, cosine schedule from 2e-3, batch 32) on 600 + 200 synthetic images at
# 33 px (the smallest input for K = 4) for 10 epochs: small enough for 9 runs on a 2-core CPU shared with
# other jobs (measured: 20-30 s per epoch with one thread, evaluation and probe included).
DEFAULT_OVERRIDES = [
    "data.root=data/synthetic/label_path",
    "data.synthetic={num_train: 600, num_val: 200, image_size: 64, seed: 1}",
    "data.num_workers=0",
    "model.img_size=33",
    "train.epochs=10",
    "output.progress=false",
]
LABEL_PATH = ("label_embed.", "label_modules.", "label_projs.", "head_label.")
CPU = DistInfo(0, 1, 0, torch.device("cpu"))


def probe(model, batch, criterion) -> dict:
    """Logit spreads of both heads and gradient norms of both paths on one batch.

    Evaluation mode (running BatchNorm statistics), so that probing changes
    nothing in the training run. The label head's logits are the model's minus
    those of a pass with the label head zeroed: the patch path never reads the
    label path, so that pass gives the patch head's logits exactly.
    """
    model.eval()
    model.zero_grad(set_to_none=True)
    x, y = batch["image"], batch["target"]
    patch = None
    if model.cross_level:  # the patch head alone: the label head zeroed for one pass
        saved = model.head_label.weight.detach().clone(), model.head_label.bias.detach().clone()
        with torch.no_grad():
            model.head_label.weight.zero_()
            model.head_label.bias.zero_()
            patch = model(x)
            model.head_label.weight.copy_(saved[0])
            model.head_label.bias.copy_(saved[1])
    logits = model(x)
    patch = logits.detach() if patch is None else patch
    # Spread over images and labels, and over images per label (mean over labels): only the latter can
    # change a label's ranking of the images, i.e. its AP.
    out = {"logits_std": logits.std().item(), "patch_logits_std": patch.std().item(),
           "patch_logits_image_std": patch.std(dim=0).mean().item()}  # fmt: skip
    if model.cross_level:
        label = logits.detach() - patch
        out["label_logits_std"] = label.std().item()
        out["label_logits_image_std"] = label.std(dim=0).mean().item()
    criterion(logits, y).backward()
    sums = {"patch": 0.0, "label": 0.0}
    for name, p in model.named_parameters():
        if p.grad is not None:
            sums["label" if name.startswith(LABEL_PATH) else "patch"] += p.grad.pow(2).sum().item()
    out["grad_norm_patch"] = math.sqrt(sums["patch"])
    if model.cross_level:
        out["grad_norm_label"] = math.sqrt(sums["label"])
    model.zero_grad(set_to_none=True)
    model.train()
    return out


@torch.no_grad()
def head_maps(model, loader) -> dict:
    """mAP of the whole model, of its patch head alone and of its label head alone on the loader's images."""
    model.eval()
    full, patch, targets = [], [], []
    weight, bias = model.head_label.weight.detach().clone(), model.head_label.bias.detach().clone()
    for batch in loader:
        full.append(model(batch["image"]))
        model.head_label.weight.zero_()
        model.head_label.bias.zero_()
        patch.append(model(batch["image"]))
        model.head_label.weight.copy_(weight)
        model.head_label.bias.copy_(bias)
        targets.append(batch["target"])
    full, patch, targets = torch.cat(full), torch.cat(patch), torch.cat(targets)
    return {f"mAP_{name}": multilabel_metrics(torch.sigmoid(x), targets)["mAP"]
            for name, x in (("full", full), ("patch_head", patch), ("label_head", full - patch))}  # fmt: skip


def train_variant(variant: str, seed: int, overrides: list[str], log_path: Path) -> None:
    cfg = load_config(CONFIG, overrides + VARIANTS[variant] + [f"seed={seed}"])
    torch.set_num_threads(cfg["train"]["num_threads"] or 1)
    train_set, val_set = build_split(cfg, train=True), build_split(cfg, train=False)
    seed_everything(seed)
    model = build_model(cfg, train_set.class_names, verbose=False)
    loader, val = train_loader(cfg, train_set, CPU), eval_loader(cfg, val_set, CPU)
    optimizer = build_optimizer(cfg, model)
    schedule = build_schedule(cfg, optimizer, steps_per_epoch(len(loader), cfg["train"]["accumulate"]))
    precision = build_precision("none", CPU.device)
    criterion = GKGNetLoss(**cfg["loss"])
    probe_batch = collate([val_set[i] for i in range(min(64, len(val_set)))])  # the first 64 evaluation images
    for epoch in range(cfg["train"]["epochs"]):
        start = time.perf_counter()
        start_epoch(loader, seed, epoch, 0)
        stats = train_one_epoch(
            model, loader, criterion, optimizer, schedule, precision, CPU, cfg["train"]["clip_grad"], None,
            cfg["train"]["accumulate"], progress=False,
        )  # fmt: skip
        res = evaluate(model, val, CPU, progress=False)
        m = multilabel_metrics(res["scores"], res["targets"], cfg["eval"]["threshold"])
        record = {"variant": variant, "seed": seed, "epoch": epoch + 1, "loss": stats["loss"], "mAP": m["mAP"],
                  "CF1": m["CF1"], "OF1": m["OF1"], **probe(model, probe_batch, criterion),
                  "seconds": time.perf_counter() - start}  # fmt: skip
        if model.cross_level and epoch + 1 == cfg["train"]["epochs"]:
            record.update(head_maps(model, val))
        with log_path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in record.items()}), flush=True)


def check_settings(path: Path, overrides: list[str], log_path: Path) -> None:
    """The runs in ``log_path`` were made with ``overrides`` (recorded in ``path`` by the
    first run), else a UsageError: finished runs of other settings would be skipped and
    reported as if they were this command's."""
    if path.exists():
        saved = json.loads(path.read_text())["overrides"]
        if saved != overrides:
            changed = sorted(set(saved) ^ set(overrides))
            raise UsageError(f"{log_path} holds runs made with other overrides (differing: {', '.join(changed)}); "
                             f"give another --out, or the same overrides to continue those runs")  # fmt: skip
    elif load_log(log_path):
        raise UsageError(f"{log_path} holds runs without {path.name}: give another --out")
    else:
        path.write_text(json.dumps({"overrides": overrides}, indent=1))


def load_log(log_path: Path) -> list[dict]:
    if not log_path.exists():
        return []
    return [json.loads(line) for line in log_path.read_text().splitlines() if line.strip()]


def mean_std(values: list[float]) -> str:
    if not values:
        return "-"
    spread = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{mean(values):.1f} +- {spread:.1f}"


def mean(values):
    return sum(values) / len(values)


def _mean_of(records: list[dict], key: str) -> str:
    values = [r[key] for r in records if key in r]
    return f"{mean(values):.3g}" if values else "-"


def report(records: list[dict], epochs: int) -> str:
    lines = ["| variant | seeds | final mAP | best mAP | mAP per epoch (mean over seeds) |", "|---|---|---|---|---|"]
    diag = ["| variant | patch logits std (per label) | label logits std (per label) | grad norm patch path | "
            "grad norm label path | mAP patch head alone | mAP label head alone |",
            "|---|---|---|---|---|---|---|"]  # fmt: skip
    for variant in VARIANTS:
        runs = {}
        for r in records:
            if r["variant"] == variant:
                runs.setdefault(r["seed"], []).append(r)
        done = {s: rs for s, rs in runs.items() if len(rs) == epochs}
        if not done:
            continue
        finals = [rs[-1]["mAP"] for rs in done.values()]
        bests = [max(r["mAP"] for r in rs) for rs in done.values()]
        curve = " ".join(f"{mean([rs[e]['mAP'] for rs in done.values()]):.1f}" for e in range(epochs))
        lines.append(f"| {variant} | {len(done)} | {mean_std(finals)} | {mean_std(bests)} | {curve} |")
        last = [rs[-1] for rs in done.values()]
        cols = [
            f"{_mean_of(last, key)} ({_mean_of(last, key.replace('_std', '_image_std'))})"
            for key in ("patch_logits_std", "label_logits_std")
        ]
        cols += [_mean_of(last, key) for key in ("grad_norm_patch", "grad_norm_label", "mAP_patch_head",
                                                 "mAP_label_head")]  # fmt: skip
        diag.append(f"| {variant} | " + " | ".join(cols) + " |")
    return "\n".join(lines) + "\n\nlast epoch, probe batch of 64 images:\n\n" + "\n".join(diag)


def main(argv=None) -> int:
    """The command line: a user error is one line on stderr and exit status 2 (``gkg_pyg.cli.run_cli``)."""
    return run_cli(run, argv)


def run(argv=None) -> int:
    """Train and report as the command line says; raises on errors (``main`` reports them)."""
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/label_path", help="folder of log.jsonl")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    add_override_argument(p, help="more config overrides (after DEFAULT_OVERRIDES)")
    p.add_argument("--report", action="store_true", help="print the table of the runs so far and stop")
    args = p.parse_args(argv)
    overrides = DEFAULT_OVERRIDES + args.overrides
    epochs = load_config(CONFIG, overrides)["train"]["epochs"]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    log_path = out / "log.jsonl"
    if not args.report:
        check_settings(out / "settings.json", overrides, log_path)
        for seed in args.seeds:
            for variant in args.variants:
                rows = [r for r in load_log(log_path) if r["variant"] == variant and r["seed"] == seed]
                if len(rows) == epochs:
                    continue
                if rows:  # a killed run: drop its partial lines and run it again
                    keep = [r for r in load_log(log_path) if not (r["variant"] == variant and r["seed"] == seed)]
                    log_path.write_text("".join(json.dumps(r) + "\n" for r in keep))
                print(f"== {variant}, seed {seed}", flush=True)
                train_variant(variant, seed, overrides, log_path)
    print(report(load_log(log_path), epochs))
    return 0


if __name__ == "__main__":
    sys.exit(main())
