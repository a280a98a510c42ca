"""Distributed training under ``torchrun``: process info, SyncBatchNorm for
node tensors, gathering results over ranks."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from ..models.layers import NodeBatchNorm


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


def all_reduce_min(value: float, info: DistInfo) -> float:
    """The smallest value over all ranks."""
    if not info.distributed:
        return value
    t = torch.tensor([float(value)], dtype=torch.float64, device=info.device)
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return float(t.item())


def unwrap(model: nn.Module) -> nn.Module:
    """The model inside its wrappers: ``torch.compile``'s (``_orig_mod``) and
    DistributedDataParallel's (``module``), in any nesting."""
    while True:
        if isinstance(model, nn.parallel.DistributedDataParallel):
            model = model.module
        elif isinstance(getattr(model, "_orig_mod", None), nn.Module):  # torch.compile's OptimizedModule
            model = model._orig_mod
        else:
            return model
