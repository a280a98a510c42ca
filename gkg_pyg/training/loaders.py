"""Data sets, samplers and loaders from a config; a check that every image
file exists before anything starts."""

from __future__ import annotations

import os

import torch
from torch.utils.data import DataLoader, DistributedSampler, Subset

from ..data import build_dataset, build_test_transform, build_train_transform, collate, repeat_factor_indices
from ..data.coco import ImageLabelDataset
from .distributed import DistInfo
from .rng import derived_seed


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
    sampler = DistributedSampler(source, num_replicas=info.world_size, rank=info.rank, shuffle=True, seed=cfg["seed"])
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
