"""The layers of Pyramid ViG and GKGNet blocks, on node features ``(B, N, C)``.

Every 1x1 convolution of the authors' code is a linear map here
(:class:`NodeLinear`, an ``nn.Linear``) and every BatchNorm2d over a feature
map a BatchNorm over all nodes of all images (:class:`NodeBatchNorm`): the
same statistics, the same parameters.

The helpers take the cheaper route where it gives the same values:

* evaluation (:func:`folds`): a BatchNorm with running statistics is folded
  into the linear map before it (:func:`linear_then_bn`, one pass instead of
  two), and GELUs and residual sums run in place on fresh tensors where no
  gradient flows (:func:`activate`, :func:`residual`);
* training: the FFN's ``W2 GELU(BN(h))`` runs through
  :func:`gkg_pyg.ops.bn_gelu_linear`, which keeps only ``h`` for the backward
  pass (:func:`bn_act_linear`).
"""

from __future__ import annotations

import copy
import struct
from typing import List, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..conv import GroupedLinear, fold_batchnorm
from ..ops import grouped_linear
from ..ops.fused import batchnorm_gelu, fusable
from ..ops.norm import batch_norm, opaque_batch_norm

__all__ = [
    "NodeBatchNorm",
    "ImageBatchNorm",
    "DropPath",
    "drop_path_rates",
    "NodeLinear",
    "init_like_authors",
    "LinearBatchNorm",
    "FFN",
    "folds",
    "linear_then_bn",
    "fold_batchnorms",
    "activate",
    "residual",
    "bn_act_linear",
    "avg_pool",
    "to_nodes",
    "to_image",
]


class NodeBatchNorm(nn.BatchNorm1d):
    """BatchNorm over all nodes of all images: ``(..., C)`` in and out."""

    def forward(self, x: Tensor) -> Tensor:
        rows = x.reshape(-1, x.shape[-1])
        return (batch_norm(rows, self) if opaque_batch_norm(self) else super().forward(rows)).view_as(x)


class ImageBatchNorm(nn.BatchNorm2d):
    """``nn.BatchNorm2d`` on ``(B, C, H, W)`` images (the stem and the downsamplings);
    in compiled training one operator (:func:`gkg_pyg.ops.norm.batch_norm`)."""

    def forward(self, x: Tensor) -> Tensor:
        return batch_norm(x, self) if opaque_batch_norm(self) else super().forward(x)


class DropPath(nn.Module):
    """Stochastic depth on ``(B, ...)`` tensors: in training each sample's
    residual branch is zeroed with probability ``p`` and the kept ones are
    scaled by ``1 / (1 - p)``.  timm's ``DropPath`` (same random draws, same
    values), here so that building a model does not import timm (42 MiB of
    resident memory and half a second of import on a small CPU machine)."""

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


def _f32(value: float) -> float:
    """``value`` rounded to the nearest float32."""
    return struct.unpack("f", struct.pack("f", value))[0]


def drop_path_rates(rate: float, blocks: int) -> List[float]:
    """Stochastic-depth rates growing linearly from 0 to ``rate`` over ``blocks``
    blocks: the values of ``torch.linspace(0, rate, blocks).tolist()`` (float32
    steps, the second half counted back from ``rate``), in Python arithmetic so
    that building a model reads no tensor (it can then be built on fake or meta
    tensors).  ATen forms ``rate - step * m`` with one fused multiply-add:
    exact here, since the float32 ``step`` times a small integer is exact in a double."""
    if blocks == 1:
        return [0.0]
    end = _f32(rate)
    step = _f32(end / (blocks - 1))
    half = blocks // 2
    return [_f32(step * i) if i < half else _f32(end - step * (blocks - 1 - i)) for i in range(blocks)]


# ---------------------------------------------------------------------------
# Fused and folded steps
# ---------------------------------------------------------------------------
def _plain_batchnorm(bn: nn.Module) -> bool:
    """An affine BatchNorm over node features whose statistics are its own
    (not a SyncBatchNorm, whose statistics need its own forward)."""
    return type(bn) in (NodeBatchNorm, nn.BatchNorm1d) and bn.affine


def folds(bn: nn.Module) -> bool:
    """Whether ``bn`` normalises with fixed running statistics (evaluation),
    so that it can be folded into the linear map before it."""
    return _plain_batchnorm(bn) and not bn.training and bn.running_mean is not None


def linear_then_bn(x: Tensor, linear: nn.Module, bn: nn.Module) -> Tensor:
    """``bn(linear(x))`` for an ``nn.Linear`` or a grouped linear map (a
    ``groups`` attribute); in evaluation one linear map with the BatchNorm
    folded into its weight and bias: ``W' = s W``, ``b' = s (b - mu) + beta``
    with ``s = gamma / sqrt(var + eps)`` (one pass over the features instead of two)."""
    if not folds(bn):
        return bn(linear(x))
    return grouped_linear(x, *fold_batchnorm(linear.weight, linear.bias, bn), getattr(linear, "groups", 1))


def fold_batchnorms(model: nn.Module) -> nn.Module:
    """A copy of ``model`` for inference in which every BatchNorm over
    features that follows a linear map in an ``nn.Sequential`` (each
    :class:`LinearBatchNorm`, the graph convolutions' update maps, Pyramid
    ViG's head) is folded into that map once and replaced by ``nn.Identity``.

    The copy computes what the model computes in evaluation (which folds at
    every call, :func:`linear_then_bn`: the same values; Pyramid ViG's head,
    which evaluation runs as modules, to float rounding), with fewer
    operations in a traced graph: GKGNet-Ti's ``torch.export`` graph has a
    third fewer nodes.  The folded weights are constants (no gradient) and
    the copy cannot train as the model does (its BatchNorms are gone); the
    model itself is left as it is.
    """
    model = copy.deepcopy(model).eval()
    for sequence in model.modules():
        if not isinstance(sequence, nn.Sequential):
            continue
        names = list(sequence._modules)
        for first, second in zip(names, names[1:]):
            linear, bn = sequence._modules[first], sequence._modules[second]
            if isinstance(linear, (nn.Linear, GroupedLinear)) and folds(bn):
                with torch.no_grad():
                    weight, bias = fold_batchnorm(linear.weight, linear.bias, bn)
                # Constants, as the folded weights of evaluation are (ATen's matmul picks its kernel by requires_grad).
                linear.weight, linear.bias = nn.Parameter(weight, False), nn.Parameter(bias, False)
                sequence._modules[second] = nn.Identity()
    return model


def _no_grad_for(t: Tensor) -> bool:
    return not (torch.is_grad_enabled() and t.requires_grad)


def activate(h: Tensor, act: nn.Module) -> Tensor:
    """``act(h)`` for a fresh ``h``: a GELU in place where no gradient flows (a new
    tensor of the FFN's hidden width costs fresh pages: at stage 1 at 224 px the
    out-of-place GELU ran 2.6x slower in the model than on reused memory)."""
    if type(act) is nn.GELU and _no_grad_for(h):
        return torch.ops.aten.gelu_(h, approximate=act.approximate)
    return act(h)


def residual(x: Tensor, branch: Tensor) -> Tensor:
    """``x + branch`` for a fresh ``branch``, in place into it where no gradient flows
    (the same values: the sum is commutative)."""
    return branch.add_(x) if _no_grad_for(branch) and _no_grad_for(x) and branch.shape == x.shape else x + branch


def bn_act_linear(h: Tensor, bn: nn.BatchNorm1d, act: nn.Module, linear: nn.Linear) -> Tensor:
    """``linear(act(bn(h)))`` for ``(..., C)`` node features; with a plain
    BatchNorm, exact GELU and autograd on through :func:`gkg_pyg.ops.bn_gelu_linear`,
    which keeps only ``h`` and the batch statistics for the backward pass,
    also under autocast."""
    if torch.is_grad_enabled() and fusable(bn, act, (NodeBatchNorm, nn.BatchNorm1d)):
        return batchnorm_gelu(h, bn, linear)
    return linear(act(bn(h)))


# ---------------------------------------------------------------------------
# Linear maps and the FFN
# ---------------------------------------------------------------------------
class NodeLinear(nn.Linear):
    """An ``nn.Linear`` on ``(..., C)`` node features whose map runs through
    :func:`gkg_pyg.ops.grouped_linear` (oneDNN on the CPU where that pays);
    the parameters, state dict and everything else are ``nn.Linear``'s."""

    def forward(self, x: Tensor) -> Tensor:
        return grouped_linear(x, self.weight, self.bias, 1)


def init_like_authors(module: nn.Module) -> None:
    """The authors' initialisation of every layer of ``module``: Kaiming-normal
    weights (fan-in, gain sqrt 2) and zero biases for the layers that are
    convolutions in their code (``nn.Conv2d`` and the linear maps that stand for
    1x1 convolutions: the fan-in of an ``(out, in)`` or grouped ``(out, in / g)``
    weight is that of the 1x1 convolution), PyTorch's own
    (``reset_parameters``) for the others that hold parameters or buffers
    (the BatchNorms: weight 1, bias 0, fresh running statistics).  Together
    this sets every parameter and buffer of the layers, so that a model built
    on the meta device and materialised uninitialised (``to_empty``) needs
    nothing else."""
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear, GroupedLinear)):
            nn.init.kaiming_normal_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif (m._parameters or m._buffers) and hasattr(m, "reset_parameters"):
            m.reset_parameters()


class LinearBatchNorm(nn.Sequential):
    """A 1x1 convolution + BatchNorm on node features (``[0]`` the
    :class:`NodeLinear`, ``[1]`` the :class:`NodeBatchNorm`), folded in evaluation."""

    def __init__(self, cin: int, cout: int):
        super().__init__(NodeLinear(cin, cout), NodeBatchNorm(cout))

    # By name: indexing a Sequential traces several calls under torch.compile (the model makes 64 of these).
    @property
    def linear(self) -> NodeLinear:
        return self._modules["0"]

    @property
    def bn(self) -> NodeBatchNorm:
        return self._modules["1"]

    def forward(self, x: Tensor) -> Tensor:
        return linear_then_bn(x, self.linear, self.bn)


class FFN(nn.Module):
    """``x + droppath(BN(W2 GELU(BN(W1 x))))`` with a 4x hidden width."""

    def __init__(self, channels: int, drop_path: float = 0.0):
        super().__init__()
        self.fc1 = LinearBatchNorm(channels, 4 * channels)
        self.act = nn.GELU()
        self.fc2 = LinearBatchNorm(4 * channels, channels)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        if folds(self.fc1.bn):
            return residual(x, self.drop_path(self.fc2(activate(self.fc1(x), self.act))))
        # fc2's linear map of GELU(fc1(x)), keeping one hidden tensor for backward instead of three
        h = bn_act_linear(self.fc1.linear(x), self.fc1.bn, self.act, self.fc2.linear)
        return residual(x, self.drop_path(self.fc2.bn(h)))


# ---------------------------------------------------------------------------
# Node and image layouts, source pooling
# ---------------------------------------------------------------------------
def to_image(x: Tensor, grid: Tuple[int, int]) -> Tensor:
    """``(B, h * w, C)`` nodes -> a ``(B, C, h, w)`` view."""
    b, n, c = x.shape
    return x.transpose(1, 2).reshape(b, c, *grid)


def to_nodes(x: Tensor) -> Tensor:
    """``(B, C, h, w)`` -> contiguous ``(B, h * w, C)`` nodes, row-major.

    Contiguous once here: a transposed view would make every linear map,
    BatchNorm and residual sum after it copy or fall back to slower strided kernels."""
    return x.flatten(2).transpose(1, 2).contiguous()


class _AvgPool(torch.autograd.Function):
    """``F.avg_pool2d(x, p, p)`` (non-overlapping ``p x p`` windows) whose
    backward pass keeps no tensor: the gradient of a window average is the
    output gradient divided by ``p^2`` on each of its inputs (the value ATen's
    kernel gives).  ATen's pooling keeps its input for the backward pass,
    which would keep the kNN destinations ``y`` alive for nothing else.
    (``setup_context`` and the generated vmap rule: ``torch.func`` transforms run it.)"""

    generate_vmap_rule = True

    @staticmethod
    def forward(x: Tensor, p: int) -> Tensor:
        return F.avg_pool2d(x, p, p)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        x, p = inputs
        ctx.p, ctx.shape = p, x.shape

    @staticmethod
    def backward(ctx, grad: Tensor):
        p, (b, c, h, w) = ctx.p, ctx.shape
        hp, wp = grad.shape[-2:]
        # Spread in channels-last order: the pooled image is a view of (B, N, C) nodes, so the
        # gradient goes back to the nodes without a transposed copy.
        spread = (grad / (p * p)).permute(0, 2, 3, 1).reshape(b, hp, 1, wp, 1, c).expand(b, hp, p, wp, p, c)
        spread = spread.reshape(b, hp * p, wp * p, c)
        if (hp * p, wp * p) != (h, w):  # rows and columns past the last window: 0
            spread = F.pad(spread, (0, 0, 0, w - wp * p, 0, h - hp * p))
        return spread.permute(0, 3, 1, 2), None


def avg_pool(x: Tensor, p: int) -> Tensor:
    """``F.avg_pool2d(x, p, p)`` on ``(B, C, h, w)`` that keeps nothing for the backward pass."""
    return _AvgPool.apply(x, p)
