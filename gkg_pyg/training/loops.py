"""One training epoch and one evaluation pass (gathered over processes)."""

from __future__ import annotations

import time
from contextlib import nullcontext

import torch
from torch import nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from .distributed import DistInfo, all_gather_cat, all_reduce_sum, unwrap
from .optim import LRSchedule
from .precision import Precision


def train_one_epoch(
    model: nn.Module, loader: DataLoader, criterion: nn.Module, optimizer: torch.optim.Optimizer,
    schedule: LRSchedule, precision: Precision, info: DistInfo, clip_grad: float | None = None,
    ema=None, desc: str = "train", progress: bool = True,
) -> dict:  # fmt: skip
    """One pass over the loader; the schedule steps every iteration.

    A batch whose images were all skipped (unreadable, with
    skip_bad_images) is dropped; under DDP it still runs on one blank image
    with zero loss weight, because every rank must take part in each
    gradient all-reduce.

    Returns {"loss": mean over steps, "lr": last, "images": seen by all
    ranks, "images_per_s", "seconds", "num_skipped": all ranks}.
    """
    model.train()
    device = info.device
    total_loss, steps, images, skipped = 0.0, 0, 0, 0
    start = time.perf_counter()
    bar = tqdm(loader, desc=desc, disable=not (progress and info.is_main), dynamic_ncols=True, leave=False)
    for batch in bar:
        skipped += batch["num_skipped"]
        weight = 1.0
        if batch["image"] is None:
            if not info.distributed:
                continue
            size = unwrap(model).img_size
            num_classes = unwrap(model).num_classes
            batch = {"image": torch.zeros(1, 3, *size), "target": torch.zeros(1, num_classes)}
            weight = 0.0
        x = batch["image"].to(device, non_blocking=True)
        y = batch["target"].to(device, non_blocking=True)
        with precision.autocast():
            logits = model(x)
        loss = criterion(logits, y) * weight
        if not torch.isfinite(loss) and not precision.scaler.is_enabled():
            raise FloatingPointError(f"{desc}: the loss is {loss.item()} at iteration {schedule.step_count}")
        optimizer.zero_grad(set_to_none=True)
        precision.scaler.scale(loss).backward()
        if clip_grad is not None:
            precision.scaler.unscale_(optimizer)
            nn.utils.clip_grad_norm_(model.parameters(), clip_grad)
        precision.scaler.step(optimizer)
        precision.scaler.update()
        schedule.step()
        if ema is not None:
            ema.update(unwrap(model), step=schedule.step_count)
        total_loss += loss.item()
        steps += 1
        images += x.shape[0] if weight else 0
        rate = images * info.world_size / (time.perf_counter() - start)
        bar.set_postfix(loss=f"{total_loss / steps:.4f}", lr=f"{optimizer.param_groups[0]['lr']:.2e}",
                        img_s=f"{rate:.1f}")  # fmt: skip
    seconds = time.perf_counter() - start
    images = int(all_reduce_sum(images, info))
    return {
        "loss": all_reduce_sum(total_loss, info) / max(all_reduce_sum(steps, info), 1),
        "lr": optimizer.param_groups[0]["lr"],
        "images": images,
        "images_per_s": images / seconds,
        "seconds": seconds,
        "num_skipped": int(all_reduce_sum(skipped, info)),
    }


@torch.no_grad()
def evaluate(
    model: nn.Module, loader: DataLoader, info: DistInfo, precision: Precision | None = None,
    desc: str = "eval", progress: bool = True,
) -> dict:  # fmt: skip
    """Sigmoid scores of every image of the loader's data set, gathered
    from all ranks (every rank gets the result).

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
        scores.append(torch.sigmoid(logits.float()))
        targets.append(batch["target"].to(info.device))
        areas.append(batch["area"].to(info.device))
        index.append(batch["index"].to(info.device))
    # A rank whose images were all skipped still takes part in the gathering.
    empty = torch.zeros(0, unwrap(model).num_classes, device=info.device)
    no_index = torch.zeros(0, dtype=torch.long, device=info.device)
    out = {
        "scores": all_gather_cat(torch.cat(scores) if scores else empty, info),
        "targets": all_gather_cat(torch.cat(targets) if targets else empty, info),
        "areas": all_gather_cat(torch.cat(areas) if areas else empty, info),
        "index": all_gather_cat(torch.cat(index) if index else no_index, info),
    }
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
