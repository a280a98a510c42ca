"""The training checkpoint: everything a resumed run needs (model,
optimiser, schedule, loss scaler, EMA, epoch, RNG states, config), written
atomically, loadable with ``torch.load(..., weights_only=True)``."""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.distributed as dist
from torch import nn

from ..checkpoint import torch_load_weights
from ..errors import CheckpointError
from ..data import preprocess_for_config
from .distributed import DistInfo, unwrap
from .optim import LRSchedule
from .precision import Precision
from .rng import derived_seed, rng_state, seed_everything, set_rng_state

log = logging.getLogger(__name__)


def save_atomic(obj: Any, path: str | Path) -> None:
    """torch.save into a temporary file in the same folder, then rename it
    over ``path``: a kill never leaves a truncated checkpoint."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # (Not mkstemp: its files are private to the user, checkpoints need not be.)
    tmp = path.parent / f".{path.name}.{os.getpid()}.tmp"
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def link_atomic(source: str | Path, path: str | Path) -> None:
    """Make ``path`` a hard link to ``source`` (a copy where links are not
    supported), replacing ``path`` atomically. Checkpoints are only ever
    replaced by ``save_atomic``'s rename, never rewritten in place, so the
    link keeps the content ``source`` had."""
    path = Path(path)
    tmp = path.parent / f".{path.name}.link.tmp"
    tmp.unlink(missing_ok=True)
    try:
        os.link(source, tmp)
    except OSError:
        shutil.copyfile(source, tmp)
    os.replace(tmp, path)


def gather_rng_states(info: DistInfo) -> list[dict]:
    """Every rank's generator states, in rank order (every rank gets them)."""
    state = rng_state()
    if not info.distributed:
        return [state]
    states: list = [None] * info.world_size
    dist.all_gather_object(states, state)
    return states


def training_state(
    model: nn.Module, optimizer: torch.optim.Optimizer, schedule: LRSchedule, precision: Precision,
    ema, epoch: int, best_map: float, cfg: dict, class_names: Sequence[str], rng_states: list[dict],
) -> dict:  # fmt: skip
    """Everything a resumed run needs; loadable with weights_only=True.
    ``epoch`` counts the completed epochs. ``preprocess`` (input size,
    normalisation) lets predict.py and export.py work from the checkpoint alone."""
    return {
        "model": unwrap(model).state_dict(),
        "optimizer": optimizer.state_dict(),
        "schedule": schedule.state_dict(),
        "scaler": precision.scaler.state_dict(),
        "ema": None if ema is None else ema.module.state_dict(),
        "epoch": epoch,
        "step": schedule.step_count,
        "best_map": best_map,
        "config": cfg,
        "class_names": list(class_names),
        "rng": rng_states,
        "preprocess": preprocess_for_config(cfg),
    }


def load_training_checkpoint(path: str | Path) -> dict:
    """Read a checkpoint written by ``training_state`` (on the CPU)."""
    state = torch_load_weights(path)  # tensors and plain containers only; errors name the file
    if not isinstance(state, dict):
        raise CheckpointError(f"{path} is not a gkg-pyg training checkpoint (it holds a {type(state).__name__})")
    missing = [k for k in ("model", "optimizer", "schedule", "epoch", "config", "rng") if k not in state]
    if missing:
        raise CheckpointError(f"{path} is not a gkg-pyg training checkpoint (it lacks {missing})")
    return state


def check_resume_fits(state: dict, model: nn.Module, path: str | Path, changed: Sequence[str] = ()) -> None:
    """Raise a ``CheckpointError`` unless the training checkpoint ``state``
    holds exactly the tensors of ``model``, with their shapes: a resumed run
    continues the same model (its optimiser state is per tensor), so nothing
    is resized or skipped. ``changed``: the config keys that differ from the
    checkpoint's, named in the error."""
    own, theirs = unwrap(model).state_dict(), state["model"]
    problems = [f"it lacks {k!r}" for k in own if k not in theirs]
    problems += [f"it holds {k!r}, which the model does not have" for k in theirs if k not in own]
    problems += [
        f"{k!r} has shape {tuple(theirs[k].shape)} there but {tuple(own[k].shape)} in the model"
        for k in own
        if k in theirs and tuple(theirs[k].shape) != tuple(own[k].shape)
    ]
    if problems:
        model_keys = [k for k in changed if k.startswith("model.")]
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        hint = f"; this config changes {', '.join(model_keys)}: resume with the checkpoint's" if model_keys else ""
        raise CheckpointError(f"{path} does not fit this config's model: {problems[0]}{more}{hint}")


def restore_training_state(
    state: dict, model: nn.Module, optimizer: torch.optim.Optimizer, schedule: LRSchedule,
    precision: Precision, ema, info: DistInfo,
) -> tuple[int, float]:  # fmt: skip
    """Load a ``training_state`` into the objects and restore this rank's
    RNG states. Returns (completed epochs, best mAP)."""
    unwrap(model).load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    schedule.load_state_dict(state["schedule"])
    if state["scaler"]:  # empty when the scaler is disabled
        precision.scaler.load_state_dict(state["scaler"])
    if ema is not None:
        if state["ema"] is None:
            log.info("the checkpoint has no EMA weights: the EMA restarts from the current weights")
            ema.module.load_state_dict(unwrap(model).state_dict())
        else:
            ema.module.load_state_dict(state["ema"])
    rngs = state["rng"]
    if len(rngs) == info.world_size:
        set_rng_state(rngs[info.rank])
    else:
        log.info(f"the checkpoint holds RNG states of {len(rngs)} processes, this run has {info.world_size}: "
                 "reseeding (the data order stays that of (seed, epoch), augmentations differ)")  # fmt: skip
        seed_everything(derived_seed(state["config"]["seed"], state["epoch"], info.rank))
    return int(state["epoch"]), float(state["best_map"])
