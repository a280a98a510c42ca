"""Train GKGNet from a YAML config.

    python experiments/train.py experiments/configs/demo.yaml
    python experiments/train.py CONFIG.yaml --set train.epochs=3 --set optim.lr=2e-4
    python experiments/train.py CONFIG.yaml --resume            # continue runs/<name>/
    torchrun --nproc_per_node 8 experiments/train.py experiments/configs/coco_576.yaml
    gkg-train CONFIG.yaml ...                                    # the same, installed as a command

Everything is checked before the run folder is touched: the config, the
data sets (non-empty, same labels, image files present), the model (its
label count, the pretrained / init_from weights) and, with --resume, the
checkpoint. Then runs/<name>/ (or --output) receives config.yaml,
log.jsonl (one JSON line per epoch), checkpoint_last.pth (every epoch),
checkpoint_best.pth (best mAP of the model or its EMA) and, at the end, metrics.json and
per_class_ap.csv; the final metrics are printed next to the
label-frequency baseline. With ``task: single_label`` (Pyramid ViG, image
folders, CIFAR) the loss is cross-entropy with label smoothing (and
Mixup/CutMix when configured), checkpoint_best.pth keeps the best top-1,
and the run ends with metrics.json (top-1, top-5, mean class accuracy next
to the majority-class baseline) and confusion_matrix.csv.

A mistake in the config, the data or a checkpoint stops the run with one
line, ``error: ...`` (exit status 2; --debug adds the traceback). --compile
runs the training step and the evaluation forward pass through
``torch.compile`` (the checkpoints are the same; the first steps are slow
while it compiles).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
from pathlib import Path

import torch

if not __package__:  # run as a file (python experiments/train.py): import gkg_pyg from this checkout
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gkg_pyg.builder import build_model  # noqa: E402
from gkg_pyg.cli import ArgumentParser, add_compile_backend_argument, compiled, run_cli  # noqa: E402
from gkg_pyg.errors import CheckpointError, DataError, RunExistsError  # noqa: E402
from gkg_pyg.config import add_override_argument, config_diff, load_config, save_config  # noqa: E402
from gkg_pyg.training.distributed import (  # noqa: E402
    DistInfo, cleanup_distributed, convert_sync_batchnorm, init_distributed,
)  # fmt: skip
from gkg_pyg.training.ema import build_ema  # noqa: E402
from gkg_pyg.training.loaders import build_split, check_images, eval_loader, start_epoch, train_loader  # noqa: E402
from gkg_pyg.training.loops import evaluate, steps_per_epoch, train_one_epoch  # noqa: E402
from gkg_pyg.training.optim import build_optimizer, build_schedule  # noqa: E402
from gkg_pyg.training.precision import build_precision  # noqa: E402
from gkg_pyg.training.rng import derived_seed, seed_everything  # noqa: E402
from gkg_pyg.training.state import (  # noqa: E402
    check_resume_fits, gather_rng_states, link_atomic, load_training_checkpoint, restore_training_state, save_atomic,
    training_state,
)  # fmt: skip
from gkg_pyg.loss import GKGNetLoss  # noqa: E402
from gkg_pyg.single_label import SingleLabelLoss, mixup_from_config, single_label_metrics, single_label_report  # noqa
from gkg_pyg.metrics import (  # noqa: E402
    SCALE_KEYS, SUMMARY_KEYS, TOP3_KEYS, format_metrics_table, label_frequency_baseline_scores,
    multilabel_metrics, per_class_ap_csv,
)  # fmt: skip

SUMMARY = SUMMARY_KEYS + TOP3_KEYS + SCALE_KEYS


def parse_args(argv=None) -> argparse.Namespace:
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config", help="YAML config (experiments/configs/*.yaml)")
    add_override_argument(p, help="override a config value, e.g. --set train.epochs=3 (repeatable)")
    p.add_argument(
        "--resume",
        nargs="?",
        const="",
        default=None,
        metavar="PATH",
        help="continue from PATH, a checkpoint or a run folder (default: the config's latest run, "
        "<output.dir>/<name> or its highest <name>-N)",
    )
    p.add_argument("--output", help="run folder (default: <output.dir>/<name>, or <name>-2, -3, ... if taken)")
    p.add_argument(
        "--skip-bad-images",
        action="store_true",
        help="skip missing or unreadable images (data.skip_bad_images) and count them",
    )
    p.add_argument("--compile", action="store_true", help="run the training step and evaluation under torch.compile")
    add_compile_backend_argument(p)
    return p.parse_args(argv)


def summary(metrics: dict) -> dict:
    """The scalar metrics, NaN as None (strict JSON)."""
    return {k: (None if math.isnan(metrics[k]) else metrics[k]) for k in SUMMARY if k in metrics}


# A folder holds a run once the run has written its config there, at its start (a fresh run creates
# the file exclusively: two runs of one config started together take two folders).
RUN_CONFIG = "config.yaml"


def holds_run(folder: Path) -> bool:
    return (folder / RUN_CONFIG).exists() or (folder / "checkpoint_last.pth").exists()


def numbered_folder(base: Path, number: int) -> Path:
    """``base``, then ``base-2``, ``base-3``, ..."""
    return base.with_name(f"{base.name}-{number}") if number > 1 else base


def first_free_folder(base: Path) -> Path:
    """The first of ``base``, ``base-2``, ... that holds no run."""
    number = 1
    while holds_run(numbered_folder(base, number)):
        number += 1
    return numbered_folder(base, number)


def check_run_folder(run_dir: Path, resuming: bool) -> None:
    """Refuse to start a fresh run over an existing one (its files would be lost)."""
    if not resuming and holds_run(run_dir):
        raise RunExistsError(
            f"{run_dir} already holds a run ({RUN_CONFIG}); continue it with --resume, "
            f"or choose another folder (--output or --set name=...)"
        )


def choose_run_folder(cfg: dict, output, resume):
    """The run folder, the checkpoint to resume from (None: start from scratch)
    and the numbered folders' base (None unless the folder came from the numbering).

    A fresh run without --output takes <output.dir>/<name>, or the first free
    <name>-2, <name>-3, ... (free: no run has started there), so that running a
    config again loses nothing; --resume continues the latest of them (the last
    one taken), --resume PATH PATH's folder (PATH a checkpoint or a run
    folder). A run folder without checkpoint_last.pth (a run stopped in its
    first epoch) is resumed by starting that run over in its folder."""
    if resume and Path(resume).is_dir():
        resume = str(Path(resume) / "checkpoint_last.pth")
    base = None
    if output:
        run_dir = Path(output)
    elif resume:
        run_dir = Path(resume).parent
    elif resume is None:
        base = Path(cfg["output"]["dir"]) / cfg["name"]
        run_dir = first_free_folder(base)
    else:  # --resume: the latest run, the last of the numbered folders taken in a row
        latest = Path(cfg["output"]["dir"]) / cfg["name"]
        copy = 1
        while holds_run(numbered_folder(latest, copy)) and holds_run(numbered_folder(latest, copy + 1)):
            copy += 1
        run_dir = numbered_folder(latest, copy)
    resume_path = None
    if resume is not None:
        resume_path = Path(resume) if resume else run_dir / "checkpoint_last.pth"
        if resume_path == run_dir / "checkpoint_last.pth" and not resume_path.exists() and holds_run(run_dir):
            resume_path = None  # stopped before its first checkpoint: nothing to restore
    check_run_folder(run_dir, resume is not None)
    return run_dir, resume_path, base


def claim_run_folder(run_dir: Path, base) -> Path:
    """Create ``run_dir``'s config file exclusively (the fresh run's claim on its
    folder) and return the folder: where another run claimed it since
    :func:`choose_run_folder`, the next free numbered folder (``base`` given),
    else a :class:`RunExistsError`."""
    while True:
        run_dir.mkdir(parents=True, exist_ok=True)
        try:
            (run_dir / RUN_CONFIG).open("x").close()
            return run_dir
        except FileExistsError:
            if base is None:
                check_run_folder(run_dir, resuming=False)
                raise
        run_dir = first_free_folder(base)


def prepare(args: argparse.Namespace, info: DistInfo) -> dict:
    """Load and check everything; write nothing. Returns the pieces of the run."""
    cfg = load_config(args.config, args.overrides)
    if args.skip_bad_images:
        cfg["data"]["skip_bad_images"] = True
    if cfg["train"]["num_threads"]:
        torch.set_num_threads(cfg["train"]["num_threads"])
    run_dir, resume_path, numbered_base = choose_run_folder(cfg, args.output, args.resume)

    train_set = build_split(cfg, train=True)
    val_set = build_split(cfg, train=False)
    if val_set.class_names != train_set.class_names:
        raise DataError(
            f"the training and evaluation splits have different labels: {len(train_set.class_names)} "
            f"({train_set.class_names[:5]}...) vs {len(val_set.class_names)} ({val_set.class_names[:5]}...)"
        )
    # Every image is checked (data.check_images) before anything is written.
    missing = {
        "train": check_images(train_set, "training", cfg, info.is_main),
        "val": check_images(val_set, "evaluation", cfg, info.is_main),
    }

    # Identical initial weights on every rank; afterwards each rank draws
    # its own augmentation stream.
    seed_everything(cfg["seed"])
    model = build_model(cfg, train_set.class_names, verbose=info.is_main)
    seed_everything(derived_seed(cfg["seed"], info.rank))

    resume_state = None
    if resume_path is not None:
        resume_state = load_training_checkpoint(resume_path)
        if resume_state["class_names"] != train_set.class_names:
            raise CheckpointError(f"{resume_path} was trained on other labels than the data set of {args.config}")
        changed = config_diff(resume_state["config"], cfg)
        check_resume_fits(resume_state, model, resume_path, changed)
        if changed and info.is_main:
            print(f"note: the config differs from the checkpoint's in {', '.join(changed)}")
    return dict(cfg=cfg, run_dir=run_dir, train_set=train_set, val_set=val_set, model=model,
                resume_state=resume_state, resume_path=resume_path, missing=missing,
                fresh=args.resume is None, numbered_base=numbered_base)  # fmt: skip


def final_report(cfg, run_dir, class_names, train_targets, results: dict, info) -> None:
    """Print the metrics next to the label-frequency baseline; save
    metrics.json and per_class_ap.csv (per_class_ap_ema.csv with EMA)."""
    threshold = cfg["eval"]["threshold"]
    first = next(iter(results.values()))
    base_scores = label_frequency_baseline_scores(train_targets, len(first["targets"]))
    baseline = multilabel_metrics(base_scores, first["targets"], threshold, first["areas"], class_names)
    out = {"baseline": summary(baseline)}
    for name, res in results.items():
        metrics = multilabel_metrics(res["scores"], res["targets"], threshold, res["areas"], class_names)
        out[name] = summary(metrics)
        out[name]["num_images"] = len(res["targets"])
        out[name]["num_skipped"] = res["num_skipped"]
        suffix = "" if name == "model" else f"_{name}"
        if info.is_main:
            print(f"\n{name} vs the label-frequency baseline ({len(res['targets'])} images):")
            print(format_metrics_table(metrics, baseline))
            per_class_ap_csv(metrics, class_names, run_dir / f"per_class_ap{suffix}.csv")
    if info.is_main:
        (run_dir / "metrics.json").write_text(json.dumps(out, indent=2))
        print(f"\nsaved {run_dir / 'metrics.json'} and {run_dir / 'per_class_ap.csv'}")


def main(argv=None) -> int:
    """The command line: a user error is one line on stderr and exit status 2 (``gkg_pyg.cli.run_cli``)."""
    return run_cli(run, argv)


def run(argv=None) -> int:
    """Train as the command line says; raises on errors (``main`` reports them)."""
    args = parse_args(argv)
    info = init_distributed()
    if not info.is_main:  # one copy of the library's messages: rank 0's
        logging.getLogger("gkg_pyg").setLevel(logging.ERROR)
    parts = prepare(args, info)
    cfg, run_dir, train_set, val_set = parts["cfg"], parts["run_dir"], parts["train_set"], parts["val_set"]
    tcfg, main_rank = cfg["train"], info.is_main
    if main_rank and any(parts["missing"].values()):
        print(f"left out missing or unreadable images (data.skip_bad_images): {parts['missing']['train']} "
              f"training, {parts['missing']['val']} evaluation")  # fmt: skip

    # Model, optimiser, schedule, precision, EMA.
    model = parts["model"].to(info.device)
    if info.distributed and cfg["train"]["sync_bn"]:
        if info.device.type == "cuda":
            model = convert_sync_batchnorm(model)
        elif main_rank:
            print("note: SyncBatchNorm needs GPUs; on CPUs each process normalises its own batch")
    train_batches = train_loader(cfg, train_set, info)
    val_batches = eval_loader(cfg, val_set, info)
    optimizer = build_optimizer(cfg, model)
    schedule = build_schedule(cfg, optimizer, steps_per_epoch(len(train_batches), tcfg["accumulate"]))
    precision = build_precision(tcfg["amp"], info.device)
    if info.distributed:
        ids = [info.local_rank] if info.device.type == "cuda" else None
        model = torch.nn.parallel.DistributedDataParallel(model, device_ids=ids)
    ema = build_ema(cfg, model)  # after DDP's broadcast: the same on every rank
    # torch.compile wraps what the steps run; checkpoints, the optimizer and the EMA keep the plain model.
    stepped = compiled(model, args)
    ema_eval = None if ema is None else compiled(ema.module, args)
    single = cfg["task"] == "single_label"
    criterion = SingleLabelLoss(cfg["loss"]["label_smoothing"]) if single else GKGNetLoss(**cfg["loss"])
    mix = mixup_from_config(cfg, len(train_set.class_names)) if single else None

    first_epoch, best_map = 0, -1.0
    if parts["resume_state"] is not None:
        first_epoch, best_map = restore_training_state(
            parts["resume_state"], model, optimizer, schedule, precision, ema, info
        )
        if main_rank:
            print(f"resumed from {parts['resume_path']} after epoch {first_epoch}")

    # Only now is anything written.
    log_path = run_dir / "log.jsonl"
    writer = None
    if main_rank:
        if parts["fresh"]:
            run_dir = claim_run_folder(run_dir, parts["numbered_base"])
        elif parts["resume_state"] is None:
            print(f"{run_dir} holds no finished epoch (no checkpoint_last.pth): starting that run over")
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, run_dir / RUN_CONFIG)
        # Keep the log lines of the epochs the checkpoint holds (a killed run
        # may have logged an epoch whose checkpoint it did not write).
        lines = log_path.read_text().splitlines() if (first_epoch and log_path.exists()) else []
        log_path.write_text("".join(line + "\n" for line in lines if json.loads(line)["epoch"] <= first_epoch))
        writer = tensorboard_writer(cfg, run_dir)
        print(f"run folder {run_dir}: {len(train_set)} training images ({len(train_batches.dataset)} per epoch "
              f"with repeats), {len(val_set)} evaluation images, {len(train_set.class_names)} labels, "
              f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f} M parameters, "
              f"{info.world_size} process(es) on {info.device.type}, total batch "
              f"{tcfg['batch_size'] * tcfg['accumulate'] * info.world_size} (batch_size {tcfg['batch_size']} x "
              f"accumulate {tcfg['accumulate']} x {info.world_size} process(es))")  # fmt: skip

    epochs, results = tcfg["epochs"], None
    for epoch in range(first_epoch, epochs):
        start_epoch(train_batches, cfg["seed"], epoch, info.rank)
        stats = train_one_epoch(
            stepped, train_batches, criterion, optimizer, schedule, precision, info, tcfg["clip_grad"], ema,
            tcfg["accumulate"], desc=f"epoch {epoch + 1}/{epochs}", progress=cfg["output"]["progress"],
            batch_transform=mix,
        )  # fmt: skip
        record = {"epoch": epoch + 1, "step": schedule.step_count, **stats}
        results = None
        if (epoch + 1) % cfg["eval"]["interval"] == 0 or epoch + 1 == epochs:
            results = {"model": evaluate(stepped, val_batches, info, precision, "eval",
                                                cfg["output"]["progress"], cfg["task"])}  # fmt: skip
            if ema is not None:
                results["ema"] = evaluate(ema_eval, val_batches, info, precision, "eval EMA",
                                                 cfg["output"]["progress"], cfg["task"])  # fmt: skip
            for name, res in results.items():
                prefix = "" if name == "model" else "ema_"
                if single:
                    m = single_label_metrics(res["scores"], res["targets"])
                    record.update({f"{prefix}{k}": m[k] for k in ("top1", "top5")})
                    continue
                m = multilabel_metrics(res["scores"], res["targets"], cfg["eval"]["threshold"])
                record.update({f"{prefix}{k}": m[k] for k in ("mAP", "CF1", "OF1")})
        best_key = "top1" if single else "mAP"  # what checkpoint_best.pth maximises
        epoch_map = max(record.get(best_key, -1.0), record.get(f"ema_{best_key}", -1.0))
        improved = epoch_map > best_map
        best_map = max(best_map, epoch_map)
        rngs = gather_rng_states(info)
        if main_rank:
            with log_path.open("a") as f:
                f.write(json.dumps(record) + "\n")
            if writer is not None:
                for key, value in record.items():
                    writer.add_scalar(key, value, epoch + 1)
            state = training_state(model, optimizer, schedule, precision, ema, epoch + 1, best_map,
                                          cfg, train_set.class_names, rngs)  # fmt: skip
            save_atomic(state, run_dir / "checkpoint_last.pth")
            if improved:
                link_atomic(run_dir / "checkpoint_last.pth", run_dir / "checkpoint_best.pth")
            shown = {k: round(v, 4) if isinstance(v, float) else v for k, v in record.items()}
            print(json.dumps(shown), flush=True)
        stop = tcfg["stop_after_epochs"]
        if stop is not None and epoch + 1 >= stop and epoch + 1 < epochs:
            if main_rank:
                print(f"stopping after epoch {epoch + 1} (train.stop_after_epochs); continue with --resume")
            cleanup_distributed()
            return 0

    if results is None:  # resumed after the last epoch: evaluate once more
        results = {"model": evaluate(stepped, val_batches, info, precision, task=cfg["task"])}
        if ema is not None:
            results["ema"] = evaluate(ema_eval, val_batches, info, precision, task=cfg["task"])
    if single:  # metrics.json and confusion_matrix.csv
        single_label_report(run_dir, train_set.class_names, train_set.labels, results, write=main_rank)
    else:
        final_report(cfg, run_dir, train_set.class_names, train_set.targets, results, info)
    skipped = stats_skipped(log_path) if main_rank else 0
    if main_rank and (skipped or results["model"]["num_skipped"]):
        print(f"skipped unreadable images: {skipped} in training (all epochs), "
              f"{results['model']['num_skipped']} in the final evaluation")  # fmt: skip
    if writer is not None:
        writer.close()
    cleanup_distributed()
    return 0


def stats_skipped(log_path: Path) -> int:
    """Training images skipped over all logged epochs."""
    return sum(json.loads(line).get("num_skipped", 0) for line in log_path.read_text().splitlines())


def tensorboard_writer(cfg: dict, run_dir: Path):
    """A SummaryWriter under run_dir/tensorboard, or None (disabled or not installed)."""
    if not cfg["output"]["tensorboard"]:
        return None
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        print("note: output.tensorboard is on but tensorboard is not installed (pip install tensorboard)")
        return None
    return SummaryWriter(str(run_dir / "tensorboard"))


if __name__ == "__main__":
    sys.exit(main())
