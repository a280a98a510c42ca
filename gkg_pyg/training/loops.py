"""One training epoch and one evaluation pass (gathered over processes)."""

from __future__ import annotations

import math
import time
from contextlib import nullcontext
from typing import Iterable, Iterator

import torch
from torch import nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from .distributed import DistInfo, all_gather_cat, all_reduce_min, all_reduce_sum, unwrap
from .optim import LRSchedule
from .precision import Precision


def batch_groups(loader: Iterable[dict], accumulate: int) -> Iterator[list[dict]]:
    """The loader's batches in groups of ``accumulate`` (the last group may be shorter)."""
    group = []
    for batch in loader:
        group.append(batch)
        if len(group) == accumulate:
            yield group
            group = []
    if group:
        yield group


def steps_per_epoch(num_batches: int, accumulate: int) -> int:
    """Optimizer steps of an epoch of ``num_batches`` batches, ``accumulate`` batches per step."""
    return math.ceil(num_batches / accumulate)


def train_one_epoch(
    model: nn.Module, loader: DataLoader, criterion: nn.Module, optimizer: torch.optim.Optimizer,
    schedule: LRSchedule, precision: Precision, info: DistInfo, clip_grad: float | None = None,
    ema=None, accumulate: int = 1, desc: str = "train", progress: bool = True, batch_transform=None,
) -> dict:  # fmt: skip
    """One pass over the loader: an optimizer step (and a schedule step) per
    ``accumulate`` batches. ``batch_transform(x, y) -> (x, y)`` runs on each
    batch on the device before the forward pass (Mixup/CutMix).

    Gradient accumulation: each batch's loss is weighted by its share of the
    step's images before its backward pass, so the summed gradients of 4
    batches of 4 images equal the gradient of one batch of 16 (BatchNorm
    aside: it normalises each batch with its own statistics). Under DDP the
    gradients are all-reduced once per step (``no_sync`` for the other batches).

    Batches whose images were all skipped (unreadable, with skip_bad_images)
    are dropped. Under DDP every rank must run the same number of forward
    passes (SyncBatchNorm gathers statistics in each) and one synchronising
    backward pass per step, so the ranks agree on the smallest number of
    usable batches in the group and each uses that many; a group without a
    usable batch on some rank is skipped by all. (No blank stand-in image:
    it would enter the BatchNorm statistics.)

    With fp16 the loss scaler skips a step whose gradients are not finite;
    such a step counts in ``skipped_steps``, not in the logged loss.

    Returns {"loss": mean over the steps taken, "lr": last, "images": used by
    all ranks, "images_per_s", "seconds", "num_skipped": unreadable images of
    all ranks, "skipped_steps": non-finite steps}.
    """
    if accumulate < 1:
        raise ValueError(f"accumulate must be >= 1, got {accumulate}")
    model.train()
    device = info.device
    total_loss, steps, skipped_steps, images, skipped = 0.0, 0, 0, 0, 0
    start = time.perf_counter()
    bar = tqdm(total=len(loader), desc=desc, disable=not (progress and info.is_main), dynamic_ncols=True,
               leave=False)  # fmt: skip
    for group in batch_groups(loader, accumulate):
        bar.update(len(group))
        skipped += sum(batch["num_skipped"] for batch in group)
        usable = [batch for batch in group if batch["image"] is not None]
        if info.distributed:
            usable = usable[: int(all_reduce_min(len(usable), info))]
        if not usable:
            continue
        group_images = sum(batch["image"].shape[0] for batch in usable)
        optimizer.zero_grad(set_to_none=True)
        step_loss = 0.0
        for i, batch in enumerate(usable):
            x = batch["image"].to(device, non_blocking=True)
            y = batch["target"].to(device, non_blocking=True)
            if batch_transform is not None:
                x, y = batch_transform(x, y)
            last = i == len(usable) - 1
            sync = model.no_sync() if info.distributed and not last and hasattr(model, "no_sync") else nullcontext()
            with sync:
                with precision.autocast():
                    logits = model(x)
                loss = criterion(logits, y) * (x.shape[0] / group_images)
                if not torch.isfinite(loss) and not precision.scaler.is_enabled():
                    raise FloatingPointError(f"{desc}: the loss is {loss.item()} at iteration {schedule.step_count}")
                precision.scaler.scale(loss).backward()
            step_loss += loss.item()
            images += x.shape[0]
        if clip_grad is not None:
            precision.scaler.unscale_(optimizer)
            nn.utils.clip_grad_norm_(model.parameters(), clip_grad)
        scale = precision.scaler.get_scale()
        precision.scaler.step(optimizer)
        precision.scaler.update()
        schedule.step()
        if ema is not None:
            ema.update(unwrap(model), step=schedule.step_count)
        if precision.scaler.is_enabled() and precision.scaler.get_scale() < scale:
            skipped_steps += 1  # the scaler lowers its scale exactly when it skipped a non-finite step
        else:
            total_loss += step_loss
            steps += 1
        rate = images * info.world_size / (time.perf_counter() - start)
        bar.set_postfix(loss=f"{total_loss / max(steps, 1):.4f}", lr=f"{optimizer.param_groups[0]['lr']:.2e}",
                        img_s=f"{rate:.1f}")  # fmt: skip
    bar.close()
    seconds = time.perf_counter() - start
    images = int(all_reduce_sum(images, info))
    return {
        "loss": all_reduce_sum(total_loss, info) / max(all_reduce_sum(steps, info), 1),
        "lr": optimizer.param_groups[0]["lr"],
        "images": images,
        "images_per_s": images / seconds,
        "seconds": seconds,
        "num_skipped": int(all_reduce_sum(skipped, info)),
        "skipped_steps": int(all_reduce_sum(skipped_steps, info)) // (info.world_size if info.distributed else 1),
    }


@torch.no_grad()
def evaluate(
    model: nn.Module, loader: DataLoader, info: DistInfo, precision: Precision | None = None,
    desc: str = "eval", progress: bool = True, task: str = "multi_label",
) -> dict:  # fmt: skip
    """Sigmoid scores of every image of the loader's data set, gathered
    from all ranks (every rank gets the result). ``task="single_label"``:
    softmax scores, ``targets`` (N,) class indices and no ``areas``.

    Returns {"scores": (N, L) float32, "targets": (N, L), "areas": (N, L),
    "index": (N,) long, increasing, "num_skipped"}: one row per image that
    could be read (padding repeats of the distributed sampler dropped).
    """
    model.eval()
    scores, targets, areas, index = [], [], [], []
    skipped = 0
    bar = tqdm(loader, desc=desc, disable=not (progress and info.is_main), dynamic_ncols=True, leave=False)
    for batch in bar:
        skipped += batch["num_skipped"]
        if batch["image"] is None:
            continue
        x = batch["image"].to(info.device, non_blocking=True)
        with precision.autocast() if precision is not None else nullcontext():
            logits = model(x)
        single = task == "single_label"
        scores.append(torch.softmax(logits.float(), dim=1) if single else torch.sigmoid(logits.float()))
        targets.append(batch["target"].to(info.device))
        if not single:
            areas.append(batch["area"].to(info.device))
        index.append(batch["index"].to(info.device))
    # A rank whose images were all skipped still takes part in the gathering.
    empty = torch.zeros(0, unwrap(model).num_classes, device=info.device)
    no_index = torch.zeros(0, dtype=torch.long, device=info.device)
    out = {
        "scores": all_gather_cat(torch.cat(scores) if scores else empty, info),
        "targets": all_gather_cat(
            torch.cat(targets) if targets else (no_index if task == "single_label" else empty), info
        ),
        "index": all_gather_cat(torch.cat(index) if index else no_index, info),
    }
    if task != "single_label":
        out["areas"] = all_gather_cat(torch.cat(areas) if areas else empty, info)
    # Sort by data-set index and drop the distributed sampler's repeats.
    order = torch.argsort(out["index"], stable=True)
    keep = torch.ones_like(order, dtype=torch.bool)
    sorted_index = out["index"][order]
    keep[1:] = sorted_index[1:] != sorted_index[:-1]
    result = {key: value[order][keep].cpu() for key, value in out.items()}
    # Skipped images are counted once per rank that read them; padding
    # repeats are rare enough not to correct for.
    result["num_skipped"] = int(all_reduce_sum(skipped, info))
    return result
