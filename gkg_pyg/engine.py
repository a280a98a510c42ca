"""What the training, evaluation and prediction scripts share.

* data: data sets, samplers and loaders from a config; a check that every
  image file exists before anything starts;
* optimisation: AdamW parameter groups, the per-iteration learning-rate
  schedule, mixed precision, gradient clipping, EMA;
* one training epoch and one evaluation pass (gathered over processes);
* checkpoints: atomic saves of the whole training state (RNG states
  included) and their restoration;
* distributed helpers for ``torchrun`` (DDP, SyncBatchNorm, gathering).

Data order is a function of (seed, epoch): the sampler is a
DistributedSampler (also with one process) whose permutation depends on
seed + epoch, and the loader's generator, which seeds the workers'
augmentation streams, is re-seeded from (seed, epoch, rank) every epoch.
With ``num_workers = 0`` the augmentations draw from the global torch RNG,
which the checkpoint restores. So resuming from the checkpoint written at
the end of an epoch replays the following epochs exactly.
"""

from __future__ import annotations

import math
import os
import random
import shutil
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler, Subset
from tqdm import tqdm

from .data import (
    build_dataset, build_test_transform, build_train_transform, collate, repeat_factor_indices,
)  # fmt: skip
from .data.coco import ImageLabelDataset
from .models.gkgnet import NodeBatchNorm

# Parameters without weight decay besides norms and biases (all 1-D).
NO_DECAY_NAMES = ("pos_embed", "label_embed.weight")


# ---------------------------------------------------------------------------
# Distributed
# ---------------------------------------------------------------------------
@dataclass(frozen=True)
class DistInfo:
    """Where this process stands: rank among world_size processes, its device."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def init_distributed() -> DistInfo:
    """Read torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK) and join
    the process group: NCCL with one GPU per process, gloo on CPUs. Without
    torchrun (WORLD_SIZE unset or 1): one process on cuda:0 or the CPU."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        device = torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
        return DistInfo(0, 1, 0, device)
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        device, backend = torch.device("cuda", local_rank), "nccl"
    else:
        device, backend = torch.device("cpu"), "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend, init_method="env://")
    return DistInfo(rank, world_size, local_rank, device)


def cleanup_distributed() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


class NodeSyncBatchNorm(nn.SyncBatchNorm):
    """SyncBatchNorm over all nodes of all images: ``(..., C)`` in and out
    (the synchronised twin of gkg_pyg's NodeBatchNorm)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.reshape(-1, x.shape[-1])).view_as(x)


def _sync_twin(bn: nn.modules.batchnorm._BatchNorm) -> nn.SyncBatchNorm:
    cls = NodeSyncBatchNorm if isinstance(bn, NodeBatchNorm) else nn.SyncBatchNorm
    twin = cls(bn.num_features, bn.eps, bn.momentum, bn.affine, bn.track_running_stats)
    twin.load_state_dict(bn.state_dict())
    return twin.to(next(iter(bn.state_dict().values())).device).train(bn.training)


def convert_sync_batchnorm(module: nn.Module) -> nn.Module:
    """Replace every BatchNorm by a SyncBatchNorm with the same state.

    torch's own ``nn.SyncBatchNorm.convert_sync_batchnorm`` would turn the
    model's NodeBatchNorm (BatchNorm1d over ``(B, N, C)`` node tensors) into
    a SyncBatchNorm that takes N as the channel axis; NodeBatchNorm becomes
    NodeSyncBatchNorm instead. Parameter names do not change.
    """
    for name, child in module.named_children():
        if isinstance(child, nn.modules.batchnorm._BatchNorm) and not isinstance(child, nn.SyncBatchNorm):
            setattr(module, name, _sync_twin(child))
        else:
            convert_sync_batchnorm(child)
    return module


def all_gather_cat(tensor: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """Concatenate (n_r, ...) tensors of all ranks along dim 0 (rank order);
    n_r may differ between ranks. Without distribution: the tensor itself."""
    if not info.distributed:
        return tensor
    size = torch.tensor([tensor.shape[0]], device=tensor.device)
    sizes = [torch.zeros_like(size) for _ in range(info.world_size)]
    dist.all_gather(sizes, size)
    longest = int(max(s.item() for s in sizes))
    padded = tensor.new_zeros((longest,) + tuple(tensor.shape[1:]))
    padded[: tensor.shape[0]] = tensor
    parts = [torch.zeros_like(padded) for _ in range(info.world_size)]
    dist.all_gather(parts, padded)
    return torch.cat([p[: int(s.item())] for p, s in zip(parts, sizes)])


def all_reduce_sum(value: float, info: DistInfo) -> float:
    """Sum a number over all ranks."""
    if not info.distributed:
        return value
    t = torch.tensor([float(value)], dtype=torch.float64, device=info.device)
    dist.all_reduce(t)
    return float(t.item())


def unwrap(model: nn.Module) -> nn.Module:
    """The model inside a DistributedDataParallel wrapper."""
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


# ---------------------------------------------------------------------------
# Seeds and RNG states
# ---------------------------------------------------------------------------
def seed_everything(seed: int) -> None:
    """Seed python's, numpy's and torch's (CPU and CUDA) global generators."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def derived_seed(*parts: int) -> int:
    """A 63-bit seed from integers (e.g. seed, epoch, rank); numpy's
    SeedSequence mixes them, so nearby tuples give unrelated seeds."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1, np.uint64)[0] >> np.uint64(1))


def rng_state() -> dict:
    """This process's generator states, in types that ``torch.load(...,
    weights_only=True)`` accepts (no numpy objects)."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": {
            "name": name, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
            "has_gauss": int(has_gauss), "cached_gaussian": float(cached),
        },
        "torch": torch.get_rng_state(),
    }  # fmt: skip
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    """Restore what ``rng_state`` returned."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    n = state["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))  # fmt: skip
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ---------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------
def build_split(cfg: dict, train: bool) -> ImageLabelDataset:
    """The training (``data.train_split``, training transform) or evaluation
    (``data.val_split``, test transform) data set of a config. A synthetic
    data set is generated under data.root first if it is missing or was
    generated with other parameters."""
    data, size = cfg["data"], cfg["model"]["img_size"]
    transform = build_train_transform(size, **data["augment"]) if train else build_test_transform(size)
    split = data["train_split"] if train else data["val_split"]
    synthetic = data["synthetic"] if data["name"] == "synthetic" else None
    return build_dataset(data["name"], data["root"], split, transform, data["skip_bad_images"], synthetic)


def missing_images(dataset: ImageLabelDataset) -> list[str]:
    """Image files of the data set that do not exist."""
    return [p for p in dataset.paths if not os.path.isfile(p)]


def check_images(dataset: ImageLabelDataset, what: str, skip: bool) -> int:
    """Fail early when image files are missing, unless skipping bad images
    (then the loader skips them). Returns the number missing."""
    missing = missing_images(dataset)
    if missing and not skip:
        shown = ", ".join(missing[:3]) + (", ..." if len(missing) > 3 else "")
        raise FileNotFoundError(
            f"{len(missing)} of the {len(dataset)} {what} images are missing ({shown}); "
            f"fix the data set or pass --skip-bad-images (data.skip_bad_images=true) to skip them"
        )
    return len(missing)


def train_loader(cfg: dict, dataset: ImageLabelDataset, info: DistInfo) -> DataLoader:
    """Shuffled (DistributedSampler, also for one process) loader over the
    data set, with class-balanced repetition when
    data.class_balanced_threshold is set. Call ``start_epoch`` before
    iterating it."""
    threshold = cfg["data"]["class_balanced_threshold"]
    source = dataset if threshold is None else Subset(dataset, repeat_factor_indices(dataset.targets, threshold))
    sampler = DistributedSampler(
        source, num_replicas=info.world_size, rank=info.rank, shuffle=True, seed=cfg["seed"]
    )
    workers = cfg["data"]["num_workers"]
    return DataLoader(
        source, batch_size=cfg["train"]["batch_size"], sampler=sampler, num_workers=workers,
        collate_fn=collate, pin_memory=info.device.type == "cuda", drop_last=False,
        generator=torch.Generator(), persistent_workers=False,
    )  # fmt: skip


def start_epoch(loader: DataLoader, seed: int, epoch: int, rank: int) -> None:
    """Make the epoch's order and augmentation seeds functions of (seed, epoch, rank)."""
    loader.sampler.set_epoch(epoch)
    loader.generator.manual_seed(derived_seed(seed, epoch, rank))


def eval_loader(cfg: dict, dataset: ImageLabelDataset, info: DistInfo) -> DataLoader:
    """In-order loader; with several processes each takes a shard (the
    sampler pads the last shard with repeats, which ``evaluate`` drops)."""
    sampler = None
    if info.distributed:
        sampler = DistributedSampler(dataset, num_replicas=info.world_size, rank=info.rank, shuffle=False)
    return DataLoader(
        dataset, batch_size=cfg["eval"]["batch_size"], sampler=sampler, shuffle=False,
        num_workers=cfg["data"]["num_workers"], collate_fn=collate,
        pin_memory=info.device.type == "cuda", generator=torch.Generator().manual_seed(0),
    )  # fmt: skip


# ---------------------------------------------------------------------------
# Optimisation
# ---------------------------------------------------------------------------
def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two AdamW groups: with weight decay, and without it for norms and
    biases (every 1-D parameter), the position embedding and the label table."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if p.ndim <= 1 or name in NO_DECAY_NAMES:
            no_decay.append(p)
        else:
            decay.append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def build_optimizer(cfg: dict, model: nn.Module) -> torch.optim.AdamW:
    o = cfg["optim"]
    return torch.optim.AdamW(
        param_groups(model, o["weight_decay"]), lr=o["lr"], betas=tuple(o["betas"]), eps=o["eps"]
    )


class LRSchedule:
    """Learning rate per iteration: ``lr = base_lr x warmup(step) x regular(step)``.

    regular: ``step`` multiplies by gamma at each milestone epoch (epochs
    counted from 0: milestone 10 applies from the 11th epoch on);
    ``cosine`` decays from 1 to min_lr_ratio over all iterations.
    warmup: linear from warmup_ratio to 1 over the first warmup_epochs x
    steps_per_epoch iterations (mmcv's linear warm-up), 1 afterwards.
    ``step()`` after every optimizer step sets the rate of the next one.
    """

    def __init__(
        self, optimizer: torch.optim.Optimizer, steps_per_epoch: int, epochs: int, name: str = "step",
        warmup_epochs: float = 0.0, warmup_ratio: float = 1.0, milestones: Sequence[int] = (),
        gamma: float = 0.1, min_lr_ratio: float = 0.0,
    ) -> None:  # fmt: skip
        if steps_per_epoch < 1:
            raise ValueError(f"steps_per_epoch must be >= 1, got {steps_per_epoch}")
        if name not in ("step", "cosine"):
            raise ValueError(f"unknown schedule {name!r}; expected 'step' or 'cosine'")
        self.optimizer = optimizer
        # The configured rates, kept in the param groups (as torch's
        # schedulers do), so that they travel with the optimizer's state.
        for group in optimizer.param_groups:
            group.setdefault("initial_lr", group["lr"])
        self.base_lrs = [group["initial_lr"] for group in optimizer.param_groups]
        self.steps_per_epoch, self.total_steps = steps_per_epoch, epochs * steps_per_epoch
        self.name, self.milestones, self.gamma, self.min_lr_ratio = name, list(milestones), gamma, min_lr_ratio
        self.warmup_steps, self.warmup_ratio = round(warmup_epochs * steps_per_epoch), warmup_ratio
        self.step_count = 0
        self._apply()

    def factor(self, step: int) -> float:
        """The multiplier of the base learning rates at iteration ``step``."""
        if self.name == "step":
            epoch = step // self.steps_per_epoch
            regular = self.gamma ** sum(epoch >= m for m in self.milestones)
        else:
            t = min(step / max(self.total_steps, 1), 1.0)
            regular = self.min_lr_ratio + (1.0 - self.min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * t))
        if step < self.warmup_steps:
            regular *= 1.0 - (1.0 - step / self.warmup_steps) * (1.0 - self.warmup_ratio)
        return regular

    def _apply(self) -> None:
        f = self.factor(self.step_count)
        for group, base in zip(self.optimizer.param_groups, self.base_lrs):
            group["lr"] = base * f

    def step(self) -> None:
        self.step_count += 1
        self._apply()

    def state_dict(self) -> dict:
        return {"step_count": self.step_count}

    def load_state_dict(self, state: dict) -> None:
        self.step_count = int(state["step_count"])
        self._apply()


def build_schedule(cfg: dict, optimizer: torch.optim.Optimizer, steps_per_epoch: int) -> LRSchedule:
    s = cfg["schedule"]
    return LRSchedule(
        optimizer, steps_per_epoch, cfg["train"]["epochs"], s["name"], s["warmup_epochs"],
        s["warmup_ratio"], s["milestones"], s["gamma"], s["min_lr_ratio"],
    )  # fmt: skip


@dataclass
class Precision:
    """Mixed precision: autocast dtype (None: float32) and the loss scaler
    (enabled for fp16 only)."""

    dtype: torch.dtype | None
    scaler: torch.amp.GradScaler
    device_type: str

    def autocast(self):
        if self.dtype is None:
            return nullcontext()
        return torch.autocast(device_type=self.device_type, dtype=self.dtype)


def build_precision(amp: str, device: torch.device) -> Precision:
    """fp16 (with a GradScaler) or bf16 autocast on CUDA; float32 on the CPU
    (and for amp "none")."""
    if amp not in ("fp16", "bf16", "none"):
        raise ValueError(f"amp must be 'fp16', 'bf16' or 'none', got {amp!r}")
    dtype = None
    if device.type == "cuda" and amp != "none":
        if amp == "bf16" and not torch.cuda.is_bf16_supported():
            raise ValueError("train.amp=bf16 but this GPU does not support bfloat16; use fp16")
        dtype = torch.float16 if amp == "fp16" else torch.bfloat16
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    return Precision(dtype, scaler, device.type)


def build_ema(cfg: dict, model: nn.Module):
    """timm's ModelEmaV3 of the (unwrapped) model, or None when train.ema is off."""
    if not cfg["train"]["ema"]:
        return None
    from timm.utils import ModelEmaV3

    return ModelEmaV3(unwrap(model), decay=cfg["train"]["ema_decay"], use_warmup=cfg["train"]["ema_warmup"])


# ---------------------------------------------------------------------------
# Training and evaluation passes
# ---------------------------------------------------------------------------
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


# ---------------------------------------------------------------------------
# Checkpoints
# ---------------------------------------------------------------------------
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
    ``epoch`` counts the completed epochs."""
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
    }


def load_training_checkpoint(path: str | Path) -> dict:
    """Read a checkpoint written by ``training_state`` (on the CPU)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    state = torch.load(path, map_location="cpu", weights_only=True)
    missing = [k for k in ("model", "optimizer", "schedule", "epoch", "config", "rng") if k not in state]
    if missing:
        raise ValueError(f"{path} is not a gkg-pyg training checkpoint (it lacks {missing})")
    return state


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
            print("the checkpoint has no EMA weights: the EMA restarts from the current weights")
            ema.module.load_state_dict(unwrap(model).state_dict())
        else:
            ema.module.load_state_dict(state["ema"])
    rngs = state["rng"]
    if len(rngs) == info.world_size:
        set_rng_state(rngs[info.rank])
    else:
        print(f"the checkpoint holds RNG states of {len(rngs)} processes, this run has {info.world_size}: "
              "reseeding (the data order stays that of (seed, epoch), augmentations differ)")  # fmt: skip
        seed_everything(derived_seed(state["config"]["seed"], state["epoch"], info.rank))
    return int(state["epoch"]), float(state["best_map"])
