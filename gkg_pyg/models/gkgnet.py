"""GKGNet: Group K-nearest-neighbour Graph Convolutional Network for
multi-label image recognition (Yao et al., ECCV 2024).

A Pyramid ViG patch path (four stages of Grapher + FFN blocks over patch
nodes) and a label path (one node per label) that, after every stage, looks
at the stage's patches through a cross-level group kNN graph.  Features live
in node layout ``(B, N, C)`` so every 1x1 convolution is a linear map and the
graph layers see PyG node tensors; only the stem and the downsampling
convolutions run on the image layout.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Dict, List, NamedTuple, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import native
from ..conv import GroupedLinear, GroupMaxRelConv, grouped_linear
from ..graph import build_stage_graph
from ..knn import PositionBias, batched_group_knn, resolve_backend
from .registry import create_model, list_models, register_model

__all__ = [
    "GKGNet",
    "create_model",
    "list_models",
    "min_input_size",
    "relative_position_table",
    "checkpoint_filter_fn",
    "export_authors_checkpoint",
]

IMAGENET_MEAN = (123.675, 116.28, 103.53)
IMAGENET_STD = (58.395, 57.12, 57.375)


@dataclass(frozen=True)
class Variant:
    channels: Tuple[int, int, int, int]
    depths: Tuple[int, int, int, int]


VARIANTS: Dict[str, Variant] = {
    "ti": Variant((48, 96, 240, 384), (2, 2, 6, 2)),
    "s": Variant((80, 160, 400, 640), (2, 2, 6, 2)),
    "m": Variant((96, 192, 384, 768), (2, 2, 16, 2)),
    "b": Variant((128, 256, 512, 1024), (2, 2, 18, 2)),
}

# Metadata of the published weights (files are not downloaded: pass their
# path to gkg_pyg.load_checkpoint).
pretrained_cfgs: Dict[str, dict] = {
    "gkgnet_s": dict(
        file="GKGNet-S COCO checkpoint of the authors (mmcls layout)",
        source="gkgnet_mmcls",
        num_classes=80,
        input_size=(3, 576, 576),
        interpolation="bicubic",
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        coco_map=87.65,
        backbone_init="pvig_s_82.1.pth.tar (Pyramid ViG-S, ImageNet)",
    ),
}
for _name in ("ti", "m", "b"):
    pretrained_cfgs[f"gkgnet_{_name}"] = dict(
        file=None,
        source="gkgnet_mmcls",
        num_classes=80,
        input_size=(3, 448, 448),
        interpolation="bicubic",
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        backbone_init=f"pvig_{_name}_*.pth.tar (Pyramid ViG-{_name.upper()}, ImageNet)",
    )


# ---------------------------------------------------------------------------
# Geometry
# ---------------------------------------------------------------------------
def _down(size: int) -> int:
    """Output size of a 3x3 stride-2 convolution with padding 1."""
    return (size - 1) // 2 + 1


def stage_grids(height: int, width: int) -> List[Tuple[int, int]]:
    """Patch grids of the four stages for an input of ``height x width``."""
    h, w = _down(_down(height)), _down(_down(width))
    grids = [(h, w)]
    for _ in range(3):
        h, w = _down(h), _down(w)
        grids.append((h, w))
    return grids


POOL = (4, 2, 1, 1)  # source pooling factor r of the patch-level graph per stage


def _too_small(grids, k: int) -> Optional[str]:
    for i, (h, w) in enumerate(grids):
        n_src = (h // POOL[i]) * (w // POOL[i])
        if n_src < k:
            return f"stage {i + 1} has {h}x{w} patches ({n_src} kNN sources after {POOL[i]}x{POOL[i]} pooling)"
        if h * w < k:
            return f"stage {i + 1} has only {h * w} patches"
    return None


def min_input_size(k: int = 9) -> int:
    """Smallest square input whose every stage has at least ``k`` kNN sources."""
    size = 4
    while _too_small(stage_grids(size, size), k):
        size += 1
    return size


def _axis_table(size: int, channels: int) -> Tensor:
    """``(size, size)``: ``(2/C) sum_k cos(omega_k (a - b))`` along one grid axis."""
    if channels % 4:
        raise ValueError(f"the relative-position table needs channels divisible by 4, got {channels}")
    omega = 1.0 / 10000 ** (torch.arange(channels // 4, dtype=torch.float64) / (channels // 4))
    pos = torch.arange(size, dtype=torch.float64)
    offsets = pos[:, None] - pos[None, :]
    return torch.cos(offsets[..., None] * omega).sum(-1) * (2.0 / channels)


def relative_position_table(grid: Tuple[int, int], channels: int, pool: int, rows_per_chunk: int = 2048) -> Tensor:
    """The position term of one stage at its construction grid, ``(n, n_src)`` float32.

    ``T = 2 P P^T / C`` of the MAE 2-D sine-cosine embedding ``P`` of the
    ``h x w`` grid, which in closed form is ``Ty[row_i, row_j] + Tx[col_i, col_j]``
    (``Tx``, ``Ty`` from :func:`_axis_table`), rounded to float32 and resampled
    bicubically over the flattened source index to the ``pool x pool``-reduced
    sources, as the authors do.  Bicubic resampling leaves an axis of
    unchanged size untouched, so the rows are built and resampled in chunks
    (bit-identical to one call, without the ``n x n`` matrix in memory).
    """
    h, w = grid
    n, n_src = h * w, (h // pool) * (w // pool)
    ty, tx = _axis_table(h, channels), _axis_table(w, channels)
    rows, cols = torch.arange(n) // w, torch.arange(n) % w
    out = torch.empty(n, n_src)
    for r0 in range(0, n, rows_per_chunk):
        r, c = rows[r0 : r0 + rows_per_chunk], cols[r0 : r0 + rows_per_chunk]
        chunk = (ty[r][:, rows] + tx[c][:, cols]).float()
        if n_src == n:
            out[r0 : r0 + len(r)] = chunk
        else:
            out[r0 : r0 + len(r)] = F.interpolate(
                chunk[None, None], size=(len(r), n_src), mode="bicubic", align_corners=False
            )[0, 0]
    return out


def relative_position_factors(grid: Tuple[int, int], channels: int, pool: int) -> Tuple[Tensor, Tensor]:
    """``(U, V)`` float64, ``(n, C)`` and ``(n_src, C)``, with ``U @ V.T`` the
    position term of :func:`relative_position_table` before its float32 rounding.

    ``T = (2/C) P P^T`` of the sine-cosine embedding ``P`` (``n x C``) has rank at
    most ``C``, and bicubic resampling over the source index is a linear map
    ``R``, so the resampled table is ``U V^T`` with ``U = (2/C) P`` and
    ``V = R P``: ``C`` coordinates per node instead of ``n_src``.  The table
    itself is rounded to float32 before it is resampled (the authors' order),
    which no rank-``C`` form reproduces bit for bit: the two differ by about
    1e-7 (tests/test_fast_paths.py).
    """
    if channels % 4:
        raise ValueError(f"the relative-position table needs channels divisible by 4, got {channels}")
    h, w = grid
    n, n_src = h * w, (h // pool) * (w // pool)
    omega = 1.0 / 10000 ** (torch.arange(channels // 4, dtype=torch.float64) / (channels // 4))
    rows = (torch.arange(n) // w).double()[:, None] * omega
    cols = (torch.arange(n) % w).double()[:, None] * omega
    p = torch.cat([rows.sin(), rows.cos(), cols.sin(), cols.cos()], dim=1)  # cos(a - b) = sin a sin b + cos a cos b
    v = p if n_src == n else _resample_rows(p, n_src)
    return p * (2.0 / channels), v


def _resample_rows(x: Tensor, rows: int) -> Tensor:
    """Bicubic resampling (``align_corners=False``) of ``x``'s rows to ``rows``,
    the one-axis part of a 2-D bicubic ``F.interpolate`` over a row index."""
    return F.interpolate(x.t()[None, None], size=(x.shape[1], rows), mode="bicubic", align_corners=False)[0, 0].t()


# ---------------------------------------------------------------------------
# Blocks
# ---------------------------------------------------------------------------
class NodeBatchNorm(nn.BatchNorm1d):
    """BatchNorm over all nodes of all images: ``(..., C)`` in and out."""

    def forward(self, x: Tensor) -> Tensor:
        return super().forward(x.reshape(-1, x.shape[-1])).view_as(x)


class DropPath(nn.Module):
    """Stochastic depth on ``(B, ...)`` tensors: in training each sample's
    residual branch is zeroed with probability ``p`` and the kept ones are
    scaled by ``1 / (1 - p)``.  timm's ``DropPath`` (same random draws, same
    values), here so that building a model does not import timm (42 MiB of
    resident memory and half a second of import, measured on this project's CPU machine)."""

    def __init__(self, p: float = 0.0):
        super().__init__()
        self.p = p

    def forward(self, x: Tensor) -> Tensor:
        if self.p == 0.0 or not self.training:
            return x
        keep = 1.0 - self.p
        mask = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(keep)
        return x * (mask.div_(keep) if keep > 0.0 else mask)

    def extra_repr(self) -> str:
        return f"p={self.p}"


class _BatchNormGeluLinear(torch.autograd.Function):
    """``linear(GELU(BatchNorm(h)))`` on ``(N, C)`` that keeps only ``h`` and the
    batch statistics for the backward pass, where the normalised and activated
    tensors are recomputed (cheap elementwise work against two saved tensors
    of the hidden width).  The forward pass runs the same ATen kernels as the
    modules, so its values are unchanged.  On float32 CPU tensors the backward
    pass's elementwise work runs in the compiled passes of
    :func:`gkg_pyg.native.bn_gelu_linear_backward` (the same gradients to
    float32 rounding); elsewhere in PyTorch operations."""

    @staticmethod
    def forward(ctx, h, bn_weight, bn_bias, weight, bias, running_mean, running_var, training, momentum, eps):
        z, mean, invstd = torch.ops.aten.native_batch_norm(
            h, bn_weight, bn_bias, running_mean, running_var, training, momentum, eps
        )
        ctx.save_for_backward(h, bn_weight, bn_bias, weight, mean, invstd)
        ctx.running, ctx.training, ctx.eps = (running_mean, running_var), training, eps
        return grouped_linear(torch.ops.aten.gelu_(z), weight, bias, 1)  # GELU in place: z is ours alone

    @staticmethod
    def backward(ctx, grad_out):
        h, bn_weight, bn_bias, weight, mean, invstd = ctx.saved_tensors
        running_mean, running_var = ctx.running
        m, s = (mean, invstd) if ctx.training else (running_mean, torch.rsqrt(running_var + ctx.eps))
        fast = native.bn_gelu_linear_backward(grad_out, h, m, s, bn_weight, bn_bias, weight, ctx.training)
        if fast is not None:  # float32 on the CPU: three compiled passes over h
            grad_h, grad_bn_weight, grad_bn_bias, grad_weight = fast
            return grad_h, grad_bn_weight, grad_bn_bias, grad_weight, grad_out.sum(0), None, None, None, None, None
        # Under autocast the linear map ran in grad_out's (half) dtype while h may be half or
        # float32: recompute z in h's dtype as the forward pass did, multiply in grad_out's, and
        # return each gradient in its input's dtype.  The hidden-width temporaries are updated in
        # place and reused (the same kernels, so the same values): three of them at most, h
        # included, where out-of-place steps and ATen's CPU BatchNorm backward (which allocates a
        # scratch copy) had made the heap grow at the widest FFNs.
        z = (h - m).mul_(s * bn_weight).add_(bn_bias).to(h.dtype)
        grad_z = (grad_out @ weight.to(grad_out.dtype)).to(h.dtype)
        grad_z = torch.ops.aten.gelu_backward.grad_input(grad_z, z, grad_input=grad_z)
        grad_weight = (grad_out.t() @ torch.ops.aten.gelu_(z).to(grad_out.dtype)).to(weight.dtype)
        grad_bias = grad_out.sum(0).to(weight.dtype)
        if h.device.type == "cpu" and h.dtype in (torch.float32, torch.float64):
            grad_h, grad_bn_weight, grad_bn_bias = _batch_norm_backward(grad_z, h, m, s, bn_weight, ctx.training, z)
        else:  # ATen's kernel: on CUDA one fused kernel; for half-precision h it accumulates in float32
            del z
            grad_h, grad_bn_weight, grad_bn_bias = torch.ops.aten.native_batch_norm_backward(
                grad_z, h, bn_weight, running_mean, running_var, mean, invstd, ctx.training, ctx.eps, [True] * 3
            )
        return grad_h, grad_bn_weight, grad_bn_bias, grad_weight, grad_bias, None, None, None, None, None


def _batch_norm_backward(
    grad: Tensor, x: Tensor, mean: Tensor, invstd: Tensor, weight: Tensor, training: bool, out: Tensor
):
    """The gradients of ``BN(x) = (x - mean) * invstd * weight + bias`` on a
    float32 or float64 ``(N, C)`` (batch statistics when ``training``), with
    ``grad_x`` written into ``out``, a scratch tensor of ``x``'s shape:
    ``grad_x, grad_weight, grad_bias``.

    ATen's formula, ``(g - mean(g) - (x - mean) invstd^2 mean(g (x - mean)))
    invstd weight``, without ATen's full-size scratch copy: ``out`` first
    holds ``x - mean``, and both passes go over blocks of rows (4 MiB in
    float32) that stay in cache."""
    rows = max(1, (1 << 20) // x.shape[1])
    blocks = list(zip(out.split(rows), x.split(rows), grad.split(rows)))
    sum_grad = grad.sum(0)
    dot = sum((torch.sub(xb, mean, out=ob) * gb).sum(0) for ob, xb, gb in blocks)  # out holds x - mean
    grad_weight, grad_bias, scale = dot * invstd, sum_grad, invstd * weight
    if not training:
        return torch.mul(grad, scale, out=out), grad_weight, grad_bias
    n = x.shape[0]
    xmu_scale, shift = -dot * invstd * invstd / n * scale, -sum_grad / n * scale
    for ob, _, gb in blocks:  # (g - mean(g) - (x - mean) k) * scale, as shift + (x - mean) k' + g scale
        torch.addcmul(shift, ob, xmu_scale, out=ob).addcmul_(gb, scale)
    return out, grad_weight, grad_bias


def bn_gelu_linear(h: Tensor, bn: nn.BatchNorm1d, act: nn.Module, linear: nn.Linear) -> Tensor:
    """``linear(act(bn(h)))`` for ``(..., C)`` node features; with a plain
    BatchNorm, exact GELU and autograd on (and no SyncBatchNorm, whose
    statistics need its own forward) through :class:`_BatchNormGeluLinear`,
    also under autocast."""
    fused = (
        torch.is_grad_enabled()
        and _plain_batchnorm(bn)
        and bn.track_running_stats
        and bn.momentum is not None
        and isinstance(act, nn.GELU)
        and act.approximate == "none"
    )
    if not fused:
        return linear(act(bn(h)))
    if bn.training:
        bn.num_batches_tracked.add_(1)  # as _BatchNorm.forward does
    out = _BatchNormGeluLinear.apply(
        h.reshape(-1, h.shape[-1]),
        bn.weight,
        bn.bias,
        linear.weight,
        linear.bias,
        bn.running_mean,
        bn.running_var,
        bn.training,
        bn.momentum,
        bn.eps,
    )
    return out.view(*h.shape[:-1], out.shape[-1])


def _plain_batchnorm(bn: nn.Module) -> bool:
    """An affine BatchNorm over node features whose statistics are its own
    (not a SyncBatchNorm, whose statistics need its own forward)."""
    return type(bn) in (NodeBatchNorm, nn.BatchNorm1d) and bn.affine


def folds(bn: nn.Module) -> bool:
    """Whether ``bn`` normalises with fixed running statistics (evaluation),
    so that it can be folded into the linear map before it."""
    return _plain_batchnorm(bn) and not bn.training and bn.running_mean is not None


def linear_then_bn(x: Tensor, linear: nn.Module, bn: nn.Module) -> Tensor:
    """``bn(linear(x))`` for an ``nn.Linear`` or :class:`GroupedLinear`; in
    evaluation one linear map with the BatchNorm folded into its weight and
    bias (one pass over the features instead of two)."""
    if not folds(bn):
        return bn(linear(x))
    scale = bn.weight * torch.rsqrt(bn.running_var + bn.eps)
    bias = bn.bias - bn.running_mean * scale
    if linear.bias is not None:
        bias = bias + linear.bias * scale
    weight = linear.weight * scale.unsqueeze(1)
    return grouped_linear(x, weight, bias, getattr(linear, "groups", 1))


def _no_grad_for(t: Tensor) -> bool:
    return not (torch.is_grad_enabled() and t.requires_grad)


def activate(h: Tensor, act: nn.Module) -> Tensor:
    """``act(h)`` for a fresh ``h``: a GELU in place where no gradient flows.  A new
    tensor of the FFN's hidden width costs fresh pages (at stage 1 at 224 px the
    out-of-place GELU measured 2.6x slower in the model than on reused memory)."""
    if type(act) is nn.GELU and _no_grad_for(h):
        return torch.ops.aten.gelu_(h, approximate=act.approximate)
    return act(h)


def residual(x: Tensor, branch: Tensor) -> Tensor:
    """``x + branch`` for a fresh ``branch``, in place into it where no gradient flows
    (the same values: the sum is commutative)."""
    return branch.add_(x) if _no_grad_for(branch) and _no_grad_for(x) and branch.shape == x.shape else x + branch


class NodeLinear(nn.Linear):
    """An ``nn.Linear`` on ``(..., C)`` node features whose map runs through
    :func:`~gkg_pyg.conv.grouped_linear` (oneDNN on the CPU where that pays);
    the parameters, state dict and everything else are ``nn.Linear``'s."""

    def forward(self, x: Tensor) -> Tensor:
        return grouped_linear(x, self.weight, self.bias, 1)


class LinearBatchNorm(nn.Sequential):
    """A 1x1 convolution + BatchNorm on node features (``[0]`` the
    :class:`NodeLinear`, ``[1]`` the :class:`NodeBatchNorm`), folded in evaluation."""

    def __init__(self, cin: int, cout: int):
        super().__init__(NodeLinear(cin, cout), NodeBatchNorm(cout))

    def forward(self, x: Tensor) -> Tensor:
        return linear_then_bn(x, self[0], self[1])


class FFN(nn.Module):
    """``x + droppath(BN(W2 GELU(BN(W1 x))))`` with a 4x hidden width."""

    def __init__(self, channels: int, drop_path: float = 0.0):
        super().__init__()
        self.fc1 = LinearBatchNorm(channels, 4 * channels)
        self.act = nn.GELU()
        self.fc2 = LinearBatchNorm(4 * channels, channels)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        if folds(self.fc1[1]):
            return residual(x, self.drop_path(self.fc2(activate(self.fc1(x), self.act))))
        # fc2's linear map of GELU(fc1(x)), keeping one hidden tensor for backward instead of three
        h = bn_gelu_linear(self.fc1[0](x), self.fc1[1], self.act, self.fc2[0])
        return residual(x, self.drop_path(self.fc2[1](h)))


class GroupGraphBlock(nn.Module):
    """The Grapher of a patch block or a cross-level module (paper Fig. 2),
    whose steps :class:`Stage` and :class:`CrossLevelModule` call one by one:

    1. project: ``y = BN(W1 x_dst)`` (``fc1``);
    2. pick the sources (pooled ``y`` or another node set) and build the group
       kNN graph from the sources to ``y`` (:func:`gkg_pyg.batched_group_knn`);
    3. aggregate: ``r = [y_i, max_j s_j - y_i]`` interleaved, ``2C`` channels
       (``graph_conv.relative_features``);
    4. update: ``x_dst + droppath(BN(W2 m))`` (``fc2``) with
       ``m = GELU(BN(W_g r))`` (``graph_conv.nn``), so ``m`` is ``graph_conv``'s
       output.  Step 4 runs ``graph_conv.nn`` and ``fc2`` together: in training
       only ``W_g r`` is kept for the backward pass, in evaluation the
       BatchNorms are folded into the linear maps.
    """

    def __init__(self, channels: int, groups: int, drop_path: float = 0.0):
        super().__init__()
        self.fc1 = LinearBatchNorm(channels, channels)
        self.graph_conv = GroupMaxRelConv(channels, 2 * channels, groups=groups, conv_groups=4)
        self.fc2 = LinearBatchNorm(2 * channels, channels)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def aggregate(self, sources: Tensor, y: Tensor, neighbors: Tensor) -> Tensor:
        """``(B, N_src, C)`` sources -> ``(B, N, 2C)`` relative features at the
        ``(B, N, C)`` destinations ``y``, over the per-image neighbour table ``(G, B, N, k)``."""
        b, n, c = y.shape
        table = _flat_neighbors(neighbors, sources.shape[1])
        r = self.graph_conv.relative_features((sources.reshape(-1, c), y.reshape(-1, c)), neighbors=table)
        return r.view(b, n, 2 * c)

    def update(self, x: Tensor, r: Tensor) -> Tensor:
        conv_linear, bn, act = self.graph_conv.nn
        r = r.reshape(-1, r.shape[-1])  # graph_conv.nn's BatchNorm1d takes (nodes, channels)
        if folds(bn):
            m = self.fc2(activate(linear_then_bn(r, conv_linear, bn), act))
        else:
            m = self.fc2[1](bn_gelu_linear(conv_linear(r), bn, act, self.fc2[0]))
        return residual(x, self.drop_path(m.view(x.shape)))


def _flat_neighbors(neighbors: Tensor, n_src: int) -> Tensor:
    """``(G, B, N, k)`` source indices within each image -> ``(G, B * N, k)``
    indices into the sources of all images flattened to ``(B * N_src, C)``."""
    g, b, n, k = neighbors.shape
    offsets = torch.arange(b, device=neighbors.device).view(1, b, 1, 1) * n_src
    return (neighbors + offsets).view(g, b * n, k)


def _edge_index(neighbors: Tensor, n_src: int) -> Tensor:
    """A per-image neighbour table ``(G, B, N, k)`` as :func:`gkg_pyg.group_knn`'s
    ``(G, 2, B * N * k)`` edges over the flattened node sets."""
    table = _flat_neighbors(neighbors, n_src)
    g, n, k = table.shape
    dst = torch.arange(n, device=table.device).repeat_interleave(k).expand(g, -1)
    return torch.stack([table.reshape(g, -1), dst], dim=1)


class _AvgPool(torch.autograd.Function):
    """``F.avg_pool2d(x, p, p)`` (non-overlapping ``p x p`` windows) whose
    backward pass keeps no tensor: the gradient of a window average is the
    output gradient divided by ``p^2`` on each of its inputs (the value ATen's
    kernel gives).  ATen's pooling keeps its input for the backward pass,
    which would keep the kNN destinations ``y`` alive for nothing else."""

    @staticmethod
    def forward(ctx, x: Tensor, p: int) -> Tensor:
        ctx.p, ctx.shape = p, x.shape
        return F.avg_pool2d(x, p, p)

    @staticmethod
    def backward(ctx, grad: Tensor):
        p, (b, c, h, w) = ctx.p, ctx.shape
        hp, wp = grad.shape[-2:]
        spread = (grad / (p * p)).reshape(b, c, hp, 1, wp, 1).expand(b, c, hp, p, wp, p)
        spread = spread.reshape(b, c, hp * p, wp * p)
        return F.pad(spread, (0, w - wp * p, 0, h - hp * p)), None  # rows and columns past the last window: 0


class PatchGraph(NamedTuple):
    """What the last patch block of a stage compared and chose (for :mod:`gkg_pyg.graph`)."""

    neighbors: Tensor  # (G, B, N, k) source indices within each image
    knn_x: Tensor  # (B, N, C) the destinations y = BN(W1 x)
    sources: Tensor  # (B, N_src, C) pooled y


class LabelGraph(NamedTuple):
    """What a cross-level module compared and chose."""

    neighbors: Tensor  # (G, B, L, k) patch indices within each image
    knn_x: Tensor  # (B, L, C) the label destinations z = BN(W1 labels)


def _to_image(x: Tensor, grid: Tuple[int, int]) -> Tensor:
    b, n, c = x.shape
    return x.transpose(1, 2).reshape(b, c, *grid)


def _to_nodes(x: Tensor) -> Tensor:
    # Contiguous (B, N, C) once here: a transposed view would make every linear map, BatchNorm
    # and residual sum after it copy or fall back to slower strided kernels.
    return x.flatten(2).transpose(1, 2).contiguous()


class Stage(nn.Module):
    """Optional downsampling, then patch blocks (Grapher + FFN) on one grid."""

    def __init__(
        self,
        cin: int,
        channels: int,
        grid: Tuple[int, int],
        pool: int,
        dilations: Sequence[int],
        drop_paths: Sequence[float],
        k: int,
        groups: int,
        knn_backend: str,
        downsample: bool,
    ):
        super().__init__()
        self.downsample = (
            None
            if not downsample
            else nn.Sequential(nn.Conv2d(cin, channels, 3, stride=2, padding=1), nn.BatchNorm2d(channels))
        )
        self.blocks = nn.ModuleList(
            nn.ModuleDict(dict(grapher=GroupGraphBlock(channels, groups, dp), ffn=FFN(channels, dp)))
            for dp in drop_paths
        )
        self.grid, self.pool, self.dilations = grid, pool, list(dilations)
        self.k, self.groups, self.knn_backend = k, groups, knn_backend
        # Fixed and recomputed, never part of a checkpoint; built on first use
        # (it is large: 20736 x 1296 at 576 px), then moved by .to() like any buffer.
        self.channels = channels
        self.register_buffer("relative_pos", None, persistent=False)
        self._bias_cache: Dict[tuple, Tensor] = {}
        self._factor_cache: Dict[tuple, Tuple[Tensor, Tensor]] = {}

    def construction_table(self) -> Tensor:
        """The ``(n, n_src)`` position term at the construction grid."""
        if self.relative_pos is None:
            like = self.blocks[0]["grapher"].fc1[0].weight  # follow the model's device and dtype
            self.relative_pos = relative_position_table(self.grid, self.channels, self.pool).to(like)
        return self.relative_pos

    def position_bias(self, grid: Tuple[int, int]) -> Tensor:
        """The ``(N, N_src)`` position term at a runtime grid (resampled
        bicubically from the construction grid's table when they differ)."""
        self.construction_table()
        grid = tuple(grid)  # HeteroData.to() turns stored grids into lists
        if grid == self.grid:
            return self.relative_pos
        n_src = (grid[0] // self.pool) * (grid[1] // self.pool)
        key = (grid, self.relative_pos.dtype, self.relative_pos.device)
        if key not in self._bias_cache:
            self._bias_cache.clear()
            self._bias_cache[key] = F.interpolate(
                self.relative_pos[None, None], size=(grid[0] * grid[1], n_src), mode="bicubic", align_corners=False
            )[0, 0]
        return self._bias_cache[key]

    def position_factors(self, grid: Tuple[int, int]) -> Tuple[Tensor, Tensor]:
        """``(U, V)``, ``(N, C)`` and ``(N_src, C)`` float64, with ``U @ V.T`` the
        position term at a runtime grid before float32 rounding
        (:func:`relative_position_factors`, resampled like :meth:`position_bias`)."""
        grid = tuple(grid)
        device = self.blocks[0]["grapher"].fc1[0].weight.device
        key = (grid, device)
        if key not in self._factor_cache:
            self._factor_cache.clear()
            u, v = relative_position_factors(self.grid, self.channels, self.pool)
            if grid != self.grid:  # bicubic resampling is separable: resample the factor rows
                n_src = (grid[0] // self.pool) * (grid[1] // self.pool)
                u, v = _resample_rows(u, grid[0] * grid[1]), _resample_rows(v, n_src)
            self._factor_cache[key] = (u.to(device), v.to(device))
        return self._factor_cache[key]

    def knn_position_bias(self, grid: Tuple[int, int], backend: str, dtype: torch.dtype) -> PositionBias:
        """The position term for ``backend``: the exact dense table for the
        dense kNN, factors (``r = C`` extra coordinates) for torch-cluster."""
        dtype = torch.promote_types(dtype, torch.float32)  # the kNN ranks in float32 at least, also under autocast
        if backend == "torch_cluster":
            u, v = self.position_factors(grid)
            return u.to(dtype), v.to(dtype)
        return self.position_bias(grid).to(dtype)

    def pool_sources(self, y: Tensor, grid: Tuple[int, int]) -> Tensor:
        """The kNN sources: ``y`` averaged over ``pool x pool`` patches, ``(B, N_src, C)``."""
        if self.pool == 1:
            return y
        return _to_nodes(_AvgPool.apply(_to_image(y, grid), self.pool))

    def forward(self, x: Tensor, in_grid: Tuple[int, int], grid: Tuple[int, int], return_graph: bool = False):
        """``x``: ``(B, N_in, C_in)`` on ``in_grid`` -> ``(B, N, C)`` on ``grid``;
        with ``return_graph`` also the last block's :class:`PatchGraph`."""
        if self.downsample is not None:
            x = _to_nodes(self.downsample(_to_image(x, in_grid)))
        n_src = (grid[0] // self.pool) * (grid[1] // self.pool)
        graph = None
        for block, dilation in zip(self.blocks, self.dilations):
            grapher = block["grapher"]
            y = grapher.fc1(x)  # 1. project
            src = self.pool_sources(y, grid)  # 2. sources: pooled y
            dilation = max(1, min(dilation, n_src // self.k))  # small inputs: cap to the sources there are
            backend = resolve_backend(self.knn_backend, x.device, self.k * dilation)
            bias = self.knn_position_bias(grid, backend, y.dtype)
            neighbors = batched_group_knn(
                src, y, self.k, self.groups, dilation=dilation, position_bias=bias, backend=backend
            )  # 2. group kNN graph, per image
            x = grapher.update(x, grapher.aggregate(src, y, neighbors))  # 3. aggregate, 4. update
            x = block["ffn"](x)
            if return_graph:
                graph = PatchGraph(neighbors, y, src)
        return (x, graph) if return_graph else x


class CrossLevelModule(GroupGraphBlock):
    """Label nodes aggregate from the patches of a stage (cross-level group
    KGCN): the Grapher on a group kNN graph from all patches (no pooling, no
    position term, no dilation) to the label nodes, then an FFN."""

    def __init__(self, channels: int, k: int, groups: int, drop_path: float, knn_backend: str):
        super().__init__(channels, groups, drop_path)
        self.ffn = FFN(channels, drop_path)
        self.k, self.groups, self.knn_backend = k, groups, knn_backend

    def forward(self, labels: Tensor, patches: Tensor, return_graph: bool = False):
        """``labels`` ``(B, L, C)``, ``patches`` ``(B, N, C)`` -> new labels;
        with ``return_graph`` also the :class:`LabelGraph`."""
        z = self.fc1(labels)  # 1. project the label nodes
        neighbors = batched_group_knn(patches, z, self.k, self.groups, backend=self.knn_backend)  # 2. kNN
        labels = self.ffn(self.update(labels, self.aggregate(patches, z, neighbors)))  # 3. aggregate, 4. update
        return (labels, LabelGraph(neighbors, z)) if return_graph else labels


class GKGNet(nn.Module):
    """GKGNet for multi-label recognition.

    Args:
        variant: ``"ti"``, ``"s"``, ``"m"`` or ``"b"`` (Pyramid ViG widths/depths).
        num_classes: number of labels ``L``.
        img_size: construction size ``S`` (int or ``(H, W)``); sets the
            position tables and embedding, other input sizes are resampled.
        k: neighbours per node and group.
        groups: channel groups ``G`` of the group kNN graphs.
        drop_path: final stochastic-depth rate (linear from 0 over the blocks).
        cross_level: label path on/off (off: patch logits only; an ablation).
        num_gcn: cross-level modules after the last stage.
        knn_backend: backend of :func:`gkg_pyg.group_knn`.
        class_names: label names, attached to captured graphs.

    ``forward(images)`` takes normalised ``(B, 3, H, W)`` images and returns
    logits ``(B, L)``; ``forward(images, return_graphs=True)`` also returns
    one :class:`~torch_geometric.data.HeteroData` per stage
    (see :mod:`gkg_pyg.graph`).
    """

    def __init__(
        self,
        variant: str = "s",
        num_classes: int = 80,
        img_size=448,
        k: int = 9,
        groups: int = 2,
        drop_path: float = 0.0,
        cross_level: bool = True,
        num_gcn: int = 1,
        knn_backend: str = "auto",
        class_names: Optional[Sequence[str]] = None,
    ):
        super().__init__()
        if variant not in VARIANTS:
            raise ValueError(f"unknown variant {variant!r}; expected one of {sorted(VARIANTS)}")
        spec = VARIANTS[variant]
        for c in spec.channels:
            if c % groups:
                raise ValueError(f"groups={groups} does not divide the stage width {c} of variant {variant!r}")
        if k < 1 or num_classes < 1 or num_gcn < 1:
            raise ValueError(f"k, num_classes and num_gcn must be positive, got {k}, {num_classes}, {num_gcn}")
        if class_names is not None and len(class_names) != num_classes:
            raise ValueError(f"{len(class_names)} class names for {num_classes} classes")
        self.img_size = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
        self.variant, self.num_classes, self.k, self.groups = variant, num_classes, k, groups
        self.cross_level, self.class_names = cross_level, list(class_names) if class_names else None
        grids = stage_grids(*self.img_size)
        problem = _too_small(grids, k)
        if problem:
            raise ValueError(
                f"img_size {self.img_size} is too small for k={k}: {problem}; "
                f"the smallest square size is {min_input_size(k)}"
            )
        chans, depths = spec.channels, spec.depths
        c0 = chans[0]
        self.stem = nn.Module()
        self.stem.convs = nn.Sequential(
            nn.Conv2d(3, c0 // 2, 3, stride=2, padding=1),
            nn.BatchNorm2d(c0 // 2),
            nn.GELU(),
            nn.Conv2d(c0 // 2, c0, 3, stride=2, padding=1),
            nn.BatchNorm2d(c0),
            nn.GELU(),
            nn.Conv2d(c0, c0, 3, stride=1, padding=1),
            nn.BatchNorm2d(c0),
        )
        self.pos_embed = nn.Parameter(torch.zeros(1, c0, *grids[0]))
        total = sum(depths)
        rates = torch.linspace(0, drop_path, total).tolist()
        dilations = [min(b // 4 + 1, 49 // k) for b in range(total)]
        starts = [sum(depths[:i]) for i in range(4)]
        self.stages = nn.ModuleList(
            Stage(
                chans[max(i - 1, 0)],
                chans[i],
                grids[i],
                POOL[i],
                dilations[starts[i] : starts[i] + depths[i]],
                rates[starts[i] : starts[i] + depths[i]],
                k,
                groups,
                knn_backend,
                downsample=i > 0,
            )
            for i in range(4)
        )
        if cross_level:
            self.label_embed = nn.Embedding(num_classes, c0)  # initialised N(0, 1)
            self.label_modules = nn.ModuleList(
                nn.ModuleList(
                    CrossLevelModule(chans[i], k, groups, rates[starts[i]], knn_backend)
                    for _ in range(num_gcn if i == 3 else 1)
                )
                for i in range(4)
            )
            self.label_projs = nn.ModuleList(nn.Linear(chans[i], chans[i + 1]) for i in range(3))
            # Per-label linear head on the label nodes: logit_l = w_l . x_l + b_l.
            self.head_label = nn.Linear(chans[3], num_classes)
        self.head_patch = nn.Linear(chans[3], num_classes)
        self.init_weights()

    @property
    def knn_backend(self) -> str:
        return self.stages[0].knn_backend

    def set_knn_backend(self, backend: str) -> None:
        for module in self.modules():
            if isinstance(module, (Stage, CrossLevelModule)):
                module.knn_backend = backend

    def init_weights(self) -> None:
        """The authors' initialisation (mmcls ``GKGNet.model_init`` and ``LabelQueryHead``).

        Every layer that is an ``nn.Conv2d`` in their code, i.e. the stem and
        downsampling convolutions and every 1x1 convolution of the Graphers,
        FFNs and graph convolutions in the patch path and in the label path
        (linear maps here), gets ``kaiming_normal_`` (fan-in, gain sqrt 2) and
        a zero bias. Their label projections are ``nn.Linear`` and keep
        PyTorch's default; the label embedding is N(0, 1) (``nn.Embedding``'s
        default); both heads are N(0, 0.01) with zero bias (``_init_classifier``).
        """
        conv_like = (nn.Conv2d, nn.Linear, GroupedLinear)
        paths = [self.stem, self.stages] + ([self.label_modules] if self.cross_level else [])
        for path in paths:
            for module in path.modules():
                if isinstance(module, conv_like):
                    nn.init.kaiming_normal_(module.weight)
                    if module.bias is not None:
                        nn.init.zeros_(module.bias)
        self._init_classifier()

    def _init_classifier(self) -> None:
        """Label embedding N(0, 1); heads N(0, 0.01) with zero bias (mmcls ``Normal(std=0.01)``)."""
        heads = [self.head_patch]
        if self.cross_level:
            nn.init.normal_(self.label_embed.weight)
            heads.append(self.head_label)
        for head in heads:
            nn.init.normal_(head.weight, std=0.01)
            nn.init.zeros_(head.bias)

    def no_weight_decay(self) -> set:
        """Names of the parameters besides norms and biases that are not
        weight-decayed (timm's convention; read by the optimiser's parameter groups)."""
        return {"pos_embed", "label_embed.weight"} if self.cross_level else {"pos_embed"}

    def reset_classifier(self, num_classes: int, class_names: Optional[Sequence[str]] = None) -> None:
        """New, freshly initialised label-dependent parts for ``num_classes``
        labels: the label embedding and both heads (timm's ``reset_classifier``;
        e.g. to fine-tune a COCO model on VOC)."""
        if num_classes < 1:
            raise ValueError(f"num_classes must be positive, got {num_classes}")
        if class_names is not None and len(class_names) != num_classes:
            raise ValueError(f"{len(class_names)} class names for {num_classes} classes")
        like = self.head_patch.weight
        self.num_classes, self.class_names = num_classes, list(class_names) if class_names else None
        if self.cross_level:
            self.label_embed = nn.Embedding(num_classes, self.label_embed.embedding_dim)
            self.head_label = nn.Linear(self.head_label.in_features, num_classes)
        self.head_patch = nn.Linear(self.head_patch.in_features, num_classes)
        self._init_classifier()
        for name in ("label_embed", "head_label", "head_patch"):
            if hasattr(self, name):
                getattr(self, name).to(device=like.device, dtype=like.dtype)

    def filter_checkpoint(self, state_dict: Dict[str, Tensor], source: str = "auto") -> dict:
        """A checkpoint's tensors in this model's names (:func:`checkpoint_filter_fn`)."""
        return checkpoint_filter_fn(state_dict, self, source)

    def _check_input(self, images: Tensor) -> List[Tuple[int, int]]:
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"expected images of shape (batch, 3, height, width), got {tuple(images.shape)}")
        grids = stage_grids(images.shape[2], images.shape[3])
        problem = _too_small(grids, self.k)
        if problem:
            raise ValueError(
                f"input {images.shape[2]}x{images.shape[3]} is too small for k={self.k}: {problem}; "
                f"the smallest input is {min_input_size(self.k)}x{min_input_size(self.k)}"
            )
        return grids

    def forward(self, images: Tensor, return_graphs: bool = False):
        grids = self._check_input(images)
        # Channels-last (NHWC) images: oneDNN's convolutions run without reordering their
        # input, and the stem's output is already the (B, N, C) node layout.
        x = self.stem.convs(images.contiguous(memory_format=torch.channels_last))
        pos = self.pos_embed
        if tuple(pos.shape[2:]) != grids[0]:
            pos = F.interpolate(pos, size=grids[0], mode="bicubic", align_corners=False)
        x = _to_nodes(x + pos)
        labels = None
        if self.cross_level:  # a lookup, not a view of the weight: views of leaves break autograd hooks
            labels = self.label_embed(torch.arange(self.num_classes, device=x.device)).expand(x.shape[0], -1, -1)
        graphs = []
        for i, stage in enumerate(self.stages):
            x, patch_graph = stage(x, grids[max(i - 1, 0)], grids[i], return_graph=True)
            label_graph = None
            if self.cross_level:
                for module in self.label_modules[i]:
                    labels, label_graph = module(labels, x, return_graph=True)
                if i < 3:
                    labels = self.label_projs[i](labels)
            if return_graphs:
                graphs.append(self._stage_graph(i, stage, x, patch_graph, label_graph, grids[i], images.shape[2:]))
        logits = self.head_patch(x.mean(dim=1))
        if self.cross_level:
            logits = logits + (labels * self.head_label.weight).sum(-1) + self.head_label.bias
        return (logits, graphs) if return_graphs else logits

    def _stage_graph(
        self,
        i: int,
        stage: Stage,
        x: Tensor,
        patch: PatchGraph,
        label: Optional[LabelGraph],
        grid: Tuple[int, int],
        image_size,
    ):
        """One stage's :class:`~torch_geometric.data.HeteroData` for ``return_graphs``."""
        flat = lambda t: t.detach().reshape(-1, t.shape[-1])  # noqa: E731
        return build_stage_graph(
            patch_x=flat(x),
            grid=grid,
            image_size=tuple(image_size),
            patch_knn_x=flat(patch.knn_x),
            source_x=flat(patch.sources),
            pool=stage.pool,
            patch_edges=_edge_index(patch.neighbors, patch.sources.shape[1]),
            label_x=None if label is None else flat(label.knn_x),
            label_edges=None if label is None else _edge_index(label.neighbors, x.shape[1]),
            label_names=self.class_names,
        )


# ---------------------------------------------------------------------------
# Registry (shared with the other model families: gkg_pyg.models.registry)
# ---------------------------------------------------------------------------
for _variant in VARIANTS:
    register_model(f"gkgnet_{_variant}", partial(GKGNet, _variant), pretrained_cfgs[f"gkgnet_{_variant}"])


# ---------------------------------------------------------------------------
# Foreign checkpoints (timm style: the key maps and the filter live next to the
# model they describe; gkg_pyg.checkpoint reads files and loads generically)
# ---------------------------------------------------------------------------
LAYOUTS = ("gkg_pyg", "gkgnet_mmcls", "pyramid_vig")
_LABEL_PATH = ("backbone.label_lt", "backbone.gcn_label", "backbone.ffn_label")


def authors_key_map(model: GKGNet) -> Dict[str, Tuple[str, bool]]:
    """Our key -> (the authors' mmcls key, stored as a 1x1 conv weight).

    Our modules mirror theirs, so each key maps by renaming its module
    prefix; their linear maps inside blocks are 1x1 convolutions."""
    rules = [
        ("stem.", "backbone.stem."),
        ("pos_embed", "backbone.pos_embed"),
        ("label_embed.", "backbone.label_lt."),
        ("head_label.", "head.fc1."),
        ("head_patch.", "head.fc2."),
    ]
    j = 0  # index into the authors' flat sequence of blocks and downsamplings
    for s, stage in enumerate(model.stages):
        if stage.downsample is not None:
            rules.append((f"stages.{s}.downsample.", f"backbone.backbone.{j}.conv."))
            j += 1
        for b in range(len(stage.blocks)):
            rules += [
                (f"stages.{s}.blocks.{b}.grapher.", f"backbone.backbone.{j}.0."),
                (f"stages.{s}.blocks.{b}.ffn.", f"backbone.backbone.{j}.1."),
            ]
            j += 1
    rules += [("label_modules.", "backbone.gcn_label."), ("label_projs.", "backbone.ffn_label.")]
    out = {}
    for key, tensor in model.state_dict().items():
        ours, theirs = next((o, t) for o, t in rules if key.startswith(o))
        rest = key[len(ours) :]
        if ours == "label_projs.":  # their label maps sit in a Sequential: ffn_label.{s}.0.*
            stage, _, rest = rest.partition(".")
            rest = f"{stage}.0.{rest}"
        theirs = (theirs + rest).replace(".graph_conv.nn.", ".graph_conv.gconv.nn.")
        conv = tensor.dim() == 2 and theirs.startswith(("backbone.backbone.", "backbone.gcn_label."))
        out[key] = (theirs, conv)
    return out


def relative_pos_keys(model: GKGNet) -> Dict[str, Tensor]:
    """The authors' stored, negated position tables ``(1, n, n_src)`` per block."""
    out, j = {}, 0
    for stage in model.stages:
        j += stage.downsample is not None
        for _ in stage.blocks:
            out[f"backbone.backbone.{j}.0.relative_pos"] = -stage.construction_table().float().unsqueeze(0)
            j += 1
    return out


def detect_layout(state_dict: Dict[str, Tensor]) -> str:
    """``"gkgnet_mmcls"``, ``"gkg_pyg"`` or ``"pyramid_vig"``, from the keys."""
    keys = list(state_dict)
    if any(k.startswith(("backbone.label_lt", "backbone.backbone.", "head.fc")) for k in keys):
        return "gkgnet_mmcls"
    if any(k.startswith("stages.") for k in keys):
        return "gkg_pyg"
    if "stem.convs.0.weight" in state_dict and any(k.startswith("backbone.") for k in keys):
        return "pyramid_vig"
    raise ValueError(
        "cannot tell the checkpoint layout from its keys (first keys: "
        f"{keys[:5]}); pass source='gkg_pyg', 'gkgnet_mmcls' or 'pyramid_vig'"
    )


def checkpoint_filter_fn(state_dict: Dict[str, Tensor], model: GKGNet, source: str = "auto") -> dict:
    """Turn a checkpoint of any supported layout into this model's names.

    Layouts (``source``; ``"auto"`` detects it from the keys):

    * ``"gkg_pyg"``: this library's own state dict;
    * ``"gkgnet_mmcls"``: the authors' GKGNet checkpoints (mmcls ``ImageClassifier``):
      ``backbone.stem.*``, ``backbone.pos_embed``, ``backbone.backbone.{j}.*``,
      ``backbone.label_lt``, ``backbone.gcn_label.*``, ``backbone.ffn_label.*``, ``head.fc{1,2}.*``;
    * ``"pyramid_vig"``: Pyramid ViG ImageNet checkpoints (``pvig_*.pth.tar``): the patch
      path only, without the ``backbone.`` prefix; the ImageNet head (``prediction.*``) is
      not used, and the label path and the heads are absent.

    Foreign 1x1 convolution weights ``(out, in, 1, 1)`` become linear weights
    ``(out, in)``; the relative-position tables are recomputed, never read; an
    absolute position embedding of another grid is resized bicubically.

    Returns ``{"source", "state_dict" (ours -> tensor), "names" (ours -> their
    key), "skipped" (their keys deliberately not used), "absent" (our keys the
    layout cannot hold), "resized", "num_classes" (of the checkpoint, or None)}``.
    Keys of the checkpoint that are neither used nor skipped are unexpected.
    """
    if source not in ("auto",) + LAYOUTS:
        raise ValueError(f"unknown checkpoint source {source!r}; expected one of {('auto',) + LAYOUTS}")
    if source == "auto":
        source = detect_layout(state_dict)
    own = model.state_dict()
    if source == "gkg_pyg":
        mapping = {k: (k, False) for k in own}
    else:
        mapping = authors_key_map(model)
    absent, skipped = [], []
    if source == "pyramid_vig":
        absent = [
            ours
            for ours, (theirs, _) in mapping.items()
            if not theirs.startswith("backbone.") or theirs.startswith(_LABEL_PATH)
        ]
        mapping = {
            ours: (theirs[len("backbone.") :], conv) for ours, (theirs, conv) in mapping.items() if ours not in absent
        }
        skipped = [k for k in state_dict if k.startswith("prediction.")]
    if source != "gkg_pyg":
        skipped += [k for k in state_dict if k.endswith(".relative_pos")]
    converted, names, resized = {}, {}, []
    for ours, (theirs, _) in mapping.items():
        if theirs not in state_dict:
            continue
        tensor, target = state_dict[theirs], own[ours]
        if tensor.dim() == 4 and target.dim() == 2 and tensor.shape[2:] == (1, 1):
            tensor = tensor.flatten(1)
        if (
            ours == "pos_embed"
            and tensor.dim() == 4
            and tensor.shape[:2] == target.shape[:2]
            and tensor.shape != target.shape
        ):
            tensor = F.interpolate(tensor.float(), size=target.shape[2:], mode="bicubic", align_corners=False)
            resized.append(f"{theirs} {tuple(state_dict[theirs].shape)} -> {tuple(target.shape)}")
        converted[ours], names[ours] = tensor, theirs
    head = converted.get("head_patch.weight")
    return dict(
        source=source,
        state_dict=converted,
        names=names,
        skipped=skipped,
        absent=absent,
        resized=resized,
        num_classes=None if head is None else int(head.shape[0]),
    )


def export_authors_checkpoint(model: GKGNet, path=None) -> dict:
    """The model's weights in the authors' mmcls layout, ``{"state_dict": ...}``
    (1x1 conv weights 4-D, position tables included), saved to ``path`` if given."""
    own = model.state_dict()
    state = {}
    for ours, (theirs, conv) in authors_key_map(model).items():
        tensor = own[ours]
        state[theirs] = tensor[:, :, None, None] if conv else tensor
    state.update(relative_pos_keys(model))
    ckpt = {"state_dict": state}
    if path is not None:
        torch.save(ckpt, path)
    return ckpt
