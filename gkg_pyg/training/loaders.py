"""Data sets, samplers and loaders from a config; the up-front check of
every image before anything starts."""

from __future__ import annotations

import torch
from torch.utils.data import DataLoader, DistributedSampler, Subset

from ..data import (
    build_test_transform, build_train_transform, check_dataset, collate, dataset_from_config, repeat_factor_indices,
)  # fmt: skip
from ..data.coco import ImageLabelDataset
from ..data.single_label import collate_single_label, single_label_split
from .distributed import DistInfo
from .rng import derived_seed


def build_split(cfg: dict, train: bool) -> ImageLabelDataset:
    """The training (``data.train_split``, training transform) or evaluation
    (``data.val_split``, test transform) data set of a config. A synthetic
    data set is generated under data.root first if it is missing or was
    generated with other parameters (``gkg_pyg.data.dataset_from_config``)."""
    if cfg["task"] == "single_label":  # image folders, CIFAR, synthetic shapes; timm's transforms
        return single_label_split(cfg, train)
    data, size = cfg["data"], cfg["model"]["img_size"]
    transform = build_train_transform(size, **data["augment"]) if train else build_test_transform(size)
    return dataset_from_config(data, "train" if train else "val", transform)


def check_images(dataset: ImageLabelDataset, what: str, cfg: dict, progress: bool = True) -> int:
    """Check every image of the data set at data.check_images (exists /
    header / decode; ``gkg_pyg.data.check_dataset``, data.num_workers
    threads, a progress bar). Bad images stop the run with their paths, or
    with data.skip_bad_images are left out of the data set. Returns the
    number left out."""
    data = cfg["data"]
    progress = progress and cfg["output"]["progress"]
    report = check_dataset(dataset, data["check_images"], data["skip_bad_images"], what,
                           workers=max(1, data["num_workers"]), progress=progress)  # fmt: skip
    return len(report.bad)


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
        collate_fn=collate_single_label if cfg["task"] == "single_label" else collate,
        pin_memory=info.device.type == "cuda", drop_last=False,
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
        num_workers=cfg["data"]["num_workers"],
        collate_fn=collate_single_label if cfg["task"] == "single_label" else collate,
        pin_memory=info.device.type == "cuda", generator=torch.Generator().manual_seed(0),
    )  # fmt: skip
