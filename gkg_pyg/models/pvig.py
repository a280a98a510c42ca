"""Pyramid ViG (Han et al., NeurIPS 2022), the backbone GKGNet builds on, with
the group kNN graph of GKGNet as an option (the GKGNet paper's Table 5).

The patch path, :class:`PyramidViGBackbone`:

* stem: three 3x3 convolutions (stride 2, 2, 1) with BatchNorm and GELU,
  ``H/4 x W/4`` patches, plus a learnable absolute position embedding;
* four :class:`Stage` s (before stages 2-4 a 3x3 stride-2 convolution + BN),
  each a sequence of blocks ``x <- FFN(Grapher(x))`` on patch nodes ``(B, N, C)``:
  the :class:`Grapher` projects ``y = BN(W1 x)``, links every patch to its
  ``k`` nearest sources (``y`` averaged over ``r x r`` patches, ``r = 4, 2, 1, 1``)
  in each channel group with the relative-position term subtracted from the
  distance, aggregates ``max_j y_j - y_i`` (:class:`gkg_pyg.GroupMaxRelConv`)
  and adds ``BN(W2 m)`` back; block ``b`` (counted over the network) keeps
  every ``d``-th of the ``k d`` nearest, ``d = min(b // 4 + 1, 49 // k)``.

:meth:`PyramidViGBackbone.forward_features` returns the patch features of
every stage.  :class:`PyramidViG` is the backbone plus Pyramid ViG's ImageNet
classifier on the averaged patches of the last stage (1x1 conv to 1024, BN,
GELU, dropout, 1x1 conv to the classes); ``groups=1`` is the original model
(its ImageNet checkpoints load completely), ``groups=2`` is the paper's
"+ Group KNN": the same weights (the group split changes which neighbours
are chosen, not the parameters).  :class:`gkg_pyg.GKGNet` is the backbone
plus the label path.

Both models are subclasses of :class:`PyramidViGBackbone` rather than owners
of one as a submodule: the backbone registers ``stem``, ``pos_embed`` and
``stages`` on the model itself, so the state-dict keys are ``stem.convs.*``,
``pos_embed``, ``stages.{i}.*`` in both, as the checkpoints written so far
have them (a submodule would prefix every key).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Dict, List, NamedTuple, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..conv import GroupMaxRelConv
from ..errors import ConfigError, InputSizeError
from ..graph import build_stage_graph, flat_neighbour_table, table_edges
from ..knn import PositionBias, batched_group_knn, resolve_backend
from .convert import filter_checkpoint
from ..geometry import POOL, check_input_size, stage_grids
from .layers import (
    FFN,
    DropPath,
    ImageBatchNorm,
    LinearBatchNorm,
    avg_pool,
    drop_path_rates,
    init_like_authors,
    residual,
    to_image,
    to_nodes,
)
from .positions import RelativePosition
from .registry import register_model

__all__ = [
    "VARIANTS",
    "Grapher",
    "Stage",
    "PatchGraph",
    "PyramidViGBackbone",
    "PyramidViG",
    "pretrained_cfgs",
    "checkpoint_filter_fn",
]


@dataclass(frozen=True)
class Variant:
    channels: Tuple[int, int, int, int]
    depths: Tuple[int, int, int, int]


# Pyramid ViG's widths and depths; GKGNet's variants are the same.
VARIANTS: Dict[str, Variant] = {
    "ti": Variant((48, 96, 240, 384), (2, 2, 6, 2)),
    "s": Variant((80, 160, 400, 640), (2, 2, 6, 2)),
    "m": Variant((96, 192, 384, 768), (2, 2, 16, 2)),
    "b": Variant((128, 256, 512, 1024), (2, 2, 18, 2)),
}

# Pyramid ViG's ImageNet weights were trained and are evaluated with mean = std = 0.5
# (timm's resolve_data_config over the model's default_cfg), on the 0-255 scale here.
PVIG_MEAN = (127.5, 127.5, 127.5)
PVIG_STD = (127.5, 127.5, 127.5)
HEAD_HIDDEN = 1024

# Metadata of the published ImageNet-1k weights (github.com/huawei-noah/Efficient-AI-Backbones,
# release "pyramid-vig"; files are not downloaded: pass their path to gkg_pyg.load_checkpoint).
_PUBLISHED = {
    "ti": ("pvig_ti_78.5.pth.tar", 78.5, 10.7, 1.7, 0.9),
    "s": ("pvig_s_82.1.pth.tar", 82.1, 27.3, 4.6, 0.9),
    "m": ("pvig_m_83.1.pth.tar", 83.1, 51.7, 8.9, 0.9),
    "b": ("pvig_b_83.66.pth.tar", 83.7, 82.6, 16.8, 0.95),
}
pretrained_cfgs: Dict[str, dict] = {
    f"pvig_{v}": dict(
        file=file,
        source="pyramid_vig",
        num_classes=1000,
        input_size=(3, 224, 224),
        crop_pct=crop,
        interpolation="bicubic",
        mean=PVIG_MEAN,
        std=PVIG_STD,
        imagenet_top1=top1,
        params_m=params,
        gflops=gflops,
    )
    for v, (file, top1, params, gflops, crop) in _PUBLISHED.items()
}


# ---------------------------------------------------------------------------
# Blocks
# ---------------------------------------------------------------------------
class Grapher(nn.Module):
    """The Grapher of a Pyramid ViG block with GKGNet's group graph
    convolution (paper Fig. 2), also the first half of GKGNet's cross-level module:

    1. project the destinations: ``y = BN(W1 x)`` (``fc1``, called by the owner);
    2. the owner picks the sources and builds the group kNN graph from them to ``y``;
    3. :meth:`forward`: ``m = GELU(BN(W_g [y_i, max_j s_j - y_i]))`` (``graph_conv``,
       the interleaved relative features, ``2C`` channels) and
       ``x + droppath(BN(W2 m))`` (``fc2``).
    """

    def __init__(self, channels: int, groups: int, drop_path: float = 0.0):
        super().__init__()
        self.fc1 = LinearBatchNorm(channels, channels)
        # The owner's kNN builds the neighbour tables: their range needs no check (which reads values to the host).
        self.graph_conv = GroupMaxRelConv(channels, 2 * channels, groups=groups, conv_groups=4, check_neighbors=False)
        self.fc2 = LinearBatchNorm(2 * channels, channels)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: Tensor, y: Tensor, sources: Tensor, neighbors: Tensor) -> Tensor:
        """``x``, ``y``: ``(B, N, C)`` destinations before and after ``fc1``;
        ``sources``: ``(B, N_src, C)``; ``neighbors``: ``(G, B, N, k)`` source
        indices within each image -> ``(B, N, C)``."""
        c = y.shape[-1]
        table = flat_neighbour_table(neighbors, sources.shape[1])
        # Under autocast a cross-level module's label features are half precision and the patches
        # float32: the aggregation runs in the promoted dtype, as y_j - y_i would.
        sources, y = sources.reshape(-1, c), y.reshape(-1, c)
        if sources.dtype != y.dtype:
            dtype = torch.promote_types(sources.dtype, y.dtype)
            sources, y = sources.to(dtype), y.to(dtype)
        m = self.graph_conv((sources, y), neighbors=table)
        return residual(x, self.drop_path(self.fc2(m).view(x.shape)))


class PatchGraph(NamedTuple):
    """What the last patch block of a stage compared and chose (for :mod:`gkg_pyg.graph`)."""

    neighbors: Tensor  # (G, B, N, k) source indices within each image
    knn_x: Tensor  # (B, N, C) the destinations y = BN(W1 x)
    sources: Tensor  # (B, N_src, C) pooled y


class ImageConv(nn.Conv2d):
    """An ``nn.Conv2d`` whose weight is stored channels-last, the layout of the
    images it sees (the stem's input is made channels-last, and a stage's
    ``(B, N, C)`` nodes are one as an image): with a contiguous weight every
    training step copied each weight to that layout and its gradient back
    (GKGNet-S at 224 px: 9 ms of copies).  Keys, shapes and values are
    ``nn.Conv2d``'s; the state dict's weight is the parameter itself, so it is
    channels-last too (``.contiguous()`` it for a format that needs that,
    such as ``safetensors``)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.weight = nn.Parameter(self.weight.detach().contiguous(memory_format=torch.channels_last))


class Stage(nn.Module):
    """Optional downsampling, then patch blocks (Grapher + FFN) on one grid.

    ``grid`` is the construction grid (that of the model's ``img_size``) of the
    relative-position term; ``pool`` the source pooling ``r``; ``dilations`` and
    ``drop_paths`` one per block."""

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
            else nn.Sequential(ImageConv(cin, channels, 3, stride=2, padding=1), ImageBatchNorm(channels))
        )
        self.blocks = nn.ModuleList(
            nn.ModuleDict(dict(grapher=Grapher(channels, groups, dp), ffn=FFN(channels, dp))) for dp in drop_paths
        )
        self.position = RelativePosition(grid, channels, pool)
        self.grid, self.pool, self.channels = tuple(grid), pool, channels
        self.dilations, self.drop_paths = list(dilations), list(drop_paths)
        self.k, self.groups, self.knn_backend = k, groups, knn_backend

    def _like(self) -> Tensor:
        """A weight of the stage: the position terms follow its device and dtype."""
        return self.blocks[0]["grapher"].fc1[0].weight

    def construction_table(self) -> Tensor:
        """The ``(n, n_src)`` position term at the construction grid."""
        return self.position.table(self._like())

    def position_bias(self, grid: Tuple[int, int]) -> Tensor:
        """The ``(N, N_src)`` position term at a runtime grid."""
        return self.position.bias(grid, self._like())

    def position_factors(self, grid: Tuple[int, int]) -> Tuple[Tensor, Tensor]:
        """``(U, V)`` float64 with ``U @ V.T`` the position term at a runtime grid."""
        return self.position.factors(grid, self._like().device)

    def knn_position_bias(self, grid: Tuple[int, int], backend: str, dtype: torch.dtype) -> PositionBias:
        """The position term as ``backend`` takes it (table or factors)."""
        return self.position.for_knn(grid, backend, dtype, self._like())

    def pool_sources(self, y: Tensor, grid: Tuple[int, int]) -> Tensor:
        """The kNN sources: ``y`` averaged over ``pool x pool`` patches, ``(B, N_src, C)``."""
        if self.pool == 1:
            return y
        return to_nodes(avg_pool(to_image(y, grid), self.pool))

    def forward(self, x: Tensor, in_grid: Tuple[int, int], grid: Tuple[int, int], return_graph: bool = False):
        """``x``: ``(B, N_in, C_in)`` on ``in_grid`` -> ``(B, N, C)`` on ``grid``;
        with ``return_graph`` also the last block's :class:`PatchGraph`."""
        if self.downsample is not None:
            x = to_nodes(self.downsample(to_image(x, in_grid)))
        n_src = self.position.num_sources(grid)
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
            x = block["ffn"](grapher(x, y, src, neighbors))  # 3. aggregate and update; the FFN
            if return_graph:
                graph = PatchGraph(neighbors, y, src)
        return (x, graph) if return_graph else x


def stage_graph(
    stage: Stage,
    x: Tensor,
    patch: PatchGraph,
    grid: Tuple[int, int],
    image_size: Sequence[int],
    label_x: Optional[Tensor] = None,
    label_neighbors: Optional[Tensor] = None,
    label_names: Optional[Sequence[str]] = None,
):
    """One stage's :class:`~torch_geometric.data.HeteroData` (:func:`gkg_pyg.build_stage_graph`):
    the stage output ``x`` ``(B, N, C)``, its last patch block's graph and, for
    GKGNet, the label nodes ``label_x`` ``(B, L, C)`` that chose their patches
    ``label_neighbors`` ``(G, B, L, k)``."""
    flat = lambda t: t.detach().reshape(-1, t.shape[-1])  # noqa: E731
    return build_stage_graph(
        patch_x=flat(x),
        grid=grid,
        image_size=tuple(image_size),
        patch_knn_x=flat(patch.knn_x),
        source_x=flat(patch.sources),
        pool=stage.pool,
        patch_edges=table_edges(patch.neighbors, patch.sources.shape[1]),
        label_x=None if label_x is None else flat(label_x),
        label_edges=None if label_neighbors is None else table_edges(label_neighbors, x.shape[1]),
        label_names=label_names,
    )


# ---------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------
def _image_size(img_size) -> Tuple[int, int]:
    """``img_size`` (an int, or ``(H, W)`` ints) as ``(H, W)``; anything else a ConfigError."""
    size = (img_size, img_size) if isinstance(img_size, int) else img_size
    if not isinstance(size, (tuple, list)) or len(size) != 2 or not all(isinstance(s, int) for s in size):
        raise ConfigError(f"img_size must be an int or (height, width) ints, got {img_size!r}")
    return tuple(size)


def _stage_depths(depths) -> Tuple[int, int, int, int]:
    """``depths`` as four positive block counts, or a ``ConfigError`` naming the value."""
    if (
        not isinstance(depths, (tuple, list))
        or len(depths) != 4
        or not all(isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in depths)
    ):
        raise ConfigError(f"depths must be four positive block counts, one per stage, got {depths!r}")
    return tuple(depths)


class PyramidViGBackbone(nn.Module):
    """The Pyramid ViG patch path: stem, absolute position embedding, four stages.

    Args:
        variant: ``"ti"``, ``"s"``, ``"m"`` or ``"b"`` (:data:`VARIANTS`).
        img_size: construction size ``S`` (int or ``(H, W)``); sets the position
            tables and embedding, other input sizes are resampled.
        k: neighbours per node and group.
        groups: channel groups ``G`` of the group kNN graphs.
        drop_path: final stochastic-depth rate (linear from 0 over the blocks).
        knn_backend: backend of :func:`gkg_pyg.group_knn`.
        depths: blocks per stage (four positive integers); None: the variant's
            (Pyramid ViG's). Other depths make a model of the variant's widths
            that no published weights fit (shallower models for quick runs and studies).
    """

    def __init__(
        self,
        variant: str,
        img_size=224,
        k: int = 9,
        groups: int = 1,
        drop_path: float = 0.0,
        knn_backend: str = "auto",
        depths: Optional[Sequence[int]] = None,
    ):
        super().__init__()
        if variant not in VARIANTS:
            raise ConfigError(f"unknown variant {variant!r}; expected one of {sorted(VARIANTS)}")
        spec = VARIANTS[variant]
        if groups < 1:
            raise ConfigError(f"groups must be positive, got {groups}")
        for c in spec.channels:
            if c % groups:
                raise ConfigError(f"groups={groups} does not divide the stage width {c} of variant {variant!r}")
        if k < 1:
            raise ConfigError(f"k must be positive, got {k}")
        self.img_size = _image_size(img_size)
        self.variant, self.k, self.groups = variant, k, groups
        grids = check_input_size(*self.img_size, k, what="img_size")
        chans, depths = spec.channels, spec.depths if depths is None else _stage_depths(depths)
        self.depths = tuple(depths)
        c0 = chans[0]
        self.stem = nn.Module()
        self.stem.convs = nn.Sequential(
            ImageConv(3, c0 // 2, 3, stride=2, padding=1),
            ImageBatchNorm(c0 // 2),
            nn.GELU(),
            ImageConv(c0 // 2, c0, 3, stride=2, padding=1),
            ImageBatchNorm(c0),
            nn.GELU(),
            ImageConv(c0, c0, 3, stride=1, padding=1),
            ImageBatchNorm(c0),
        )
        self.pos_embed = nn.Parameter(torch.zeros(1, c0, *grids[0]))
        total = sum(depths)
        rates = drop_path_rates(drop_path, total)
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

    @property
    def channels(self) -> Tuple[int, int, int, int]:
        """Widths of the four stages."""
        return VARIANTS[self.variant].channels

    @property
    def knn_backend(self) -> str:
        return self.stages[0].knn_backend

    def set_knn_backend(self, backend: str) -> None:
        """The kNN backend of every graph the model builds."""
        for module in self.modules():
            if "knn_backend" in vars(module):
                module.knn_backend = backend

    def check_input(self, images: Tensor) -> List[Tuple[int, int]]:
        """The stage grids of ``(B, 3, H, W)`` images; an :class:`InputSizeError` (a
        ``ValueError``) for any other shape, for integer images (raw pixels: the model
        takes normalised floats) or an input too small for ``k`` neighbours."""
        if images.dim() != 4 or images.shape[1] != 3:
            raise InputSizeError(f"expected images of shape (batch, 3, height, width), got {tuple(images.shape)}")
        if not images.is_floating_point():
            raise InputSizeError(
                f"expected floating-point images, normalised per channel with the model's mean and std, got "
                f"{images.dtype}; gkg_pyg.data.build_test_transform(img_size) makes them from PIL images"
            )
        return check_input_size(images.shape[2], images.shape[3], self.k)

    def forward_features(self, images: Tensor, return_graphs: bool = False):
        """The patch features of the four stages, ``(B, N_i, C_i)`` on the stage
        grids of ``images`` ``(B, 3, H, W)``; with ``return_graphs`` also each
        stage's last :class:`PatchGraph`."""
        grids = self.check_input(images)
        # Channels-last (NHWC) images: oneDNN's convolutions run without reordering their
        # input, and the stem's output is already the (B, N, C) node layout.
        x = self.stem.convs(images.contiguous(memory_format=torch.channels_last))
        pos = self.pos_embed
        if tuple(pos.shape[2:]) != grids[0]:
            pos = F.interpolate(pos, size=grids[0], mode="bicubic", align_corners=False)
        x = to_nodes(x + pos)
        features, graphs = [], []
        for i, stage in enumerate(self.stages):
            if return_graphs:
                x, graph = stage(x, grids[max(i - 1, 0)], grids[i], return_graph=True)
                graphs.append(graph)
            else:
                x = stage(x, grids[max(i - 1, 0)], grids[i])
            features.append(x)
        return (features, graphs) if return_graphs else features

    def init_patch_path(self) -> None:
        """Kaiming-normal weights and zero biases for every convolution of the
        patch path, the 1x1 ones that are linear maps here included, fresh
        BatchNorms (:func:`init_like_authors`) and a zero position embedding."""
        init_like_authors(self.stem)
        init_like_authors(self.stages)
        nn.init.zeros_(self.pos_embed)

    def no_weight_decay(self) -> set:
        """Names of the parameters besides norms and biases that are not
        weight-decayed (timm's convention; read by the optimiser's parameter groups)."""
        return {"pos_embed"}


class PyramidViG(PyramidViGBackbone):
    """Pyramid ViG classifier.

    Args:
        variant: ``"ti"``, ``"s"``, ``"m"`` or ``"b"``.
        num_classes: number of classes.
        img_size: construction size (int or ``(H, W)``): sets the position
            tables and embedding (224 for the ImageNet weights); other input
            sizes are resampled.
        k: neighbours per node (and group).
        groups: channel groups of the kNN graphs (1: Pyramid ViG; 2: "+ Group KNN").
        drop_path: final stochastic-depth rate (linear from 0 over the blocks).
        drop_rate: dropout before the last layer of the head.
        knn_backend: backend of :func:`gkg_pyg.group_knn`.
        class_names: class names, attached to captured graphs.
        depths: blocks per stage; None: the variant's (see :class:`PyramidViGBackbone`).

    Built on the meta device (shapes only) the model is left uninitialised:
    ``to_empty(device=...)`` then :meth:`init_weights` give it values.

    ``forward(images)`` takes normalised ``(B, 3, H, W)`` images and returns
    logits ``(B, num_classes)`` (softmax scores); ``return_graphs=True``
    also returns one :class:`~torch_geometric.data.HeteroData` per stage.

    The head works on the averaged ``(B, C)`` patch features, where Pyramid
    ViG's 1x1 convolutions on a ``1 x 1`` map are linear maps and its
    BatchNorm2d is a BatchNorm1d (the same statistics over the batch); it is
    named ``head_patch`` (keys ``head_patch.{0,1,4}.*``, the authors'
    ``prediction.{0,1,4}.*``).
    """

    def __init__(
        self,
        variant: str = "ti",
        num_classes: int = 1000,
        img_size=224,
        k: int = 9,
        groups: int = 1,
        drop_path: float = 0.0,
        drop_rate: float = 0.0,
        knn_backend: str = "auto",
        class_names: Optional[Sequence[str]] = None,
        depths: Optional[Sequence[int]] = None,
    ):
        super().__init__(
            variant, img_size, k=k, groups=groups, drop_path=drop_path, knn_backend=knn_backend, depths=depths
        )
        if num_classes < 1:
            raise ConfigError(f"num_classes must be positive, got {num_classes}")
        if class_names is not None and len(class_names) != num_classes:
            raise ConfigError(f"{len(class_names)} class names for {num_classes} classes")
        if not 0.0 <= drop_rate < 1.0:
            raise ConfigError(f"drop_rate must be in [0, 1), got {drop_rate}")
        self.num_classes, self.class_names = num_classes, list(class_names) if class_names else None
        self.drop_rate = drop_rate
        self.head_patch = nn.Sequential(
            nn.Linear(self.channels[-1], HEAD_HIDDEN),
            nn.BatchNorm1d(HEAD_HIDDEN),
            nn.GELU(),
            nn.Dropout(drop_rate),
            nn.Linear(HEAD_HIDDEN, num_classes),
        )
        if not self.pos_embed.is_meta:  # shapes only: init_weights() after to_empty() sets the values
            self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        """Pyramid ViG's initialisation (``DeepGCN.model_init``): Kaiming-normal
        weights and zero biases for every convolution, head included."""
        self.init_patch_path()
        init_like_authors(self.head_patch)

    def reset_classifier(self, num_classes: int, class_names: Optional[Sequence[str]] = None) -> None:
        """A new, freshly initialised last layer for ``num_classes`` classes
        (timm's ``reset_classifier``, e.g. to fine-tune ImageNet weights)."""
        if num_classes < 1:
            raise ConfigError(f"num_classes must be positive, got {num_classes}")
        if class_names is not None and len(class_names) != num_classes:
            raise ConfigError(f"{len(class_names)} class names for {num_classes} classes")
        old = self.head_patch[-1]
        new = nn.Linear(old.in_features, num_classes)
        nn.init.kaiming_normal_(new.weight)
        nn.init.zeros_(new.bias)
        self.head_patch[-1] = new.to(device=old.weight.device, dtype=old.weight.dtype).train(self.training)
        self.num_classes, self.class_names = num_classes, list(class_names) if class_names else None

    def filter_checkpoint(self, state_dict: Dict[str, Tensor], source: str = "auto") -> dict:
        """A checkpoint's tensors in this model's names (:func:`checkpoint_filter_fn`)."""
        return checkpoint_filter_fn(state_dict, self, source)

    def forward_head(self, x: Tensor) -> Tensor:
        """Logits of the last stage's ``(B, N, C)`` patch features."""
        return self.head_patch(x.mean(dim=1))

    def forward(self, images: Tensor, return_graphs: bool = False):
        if not return_graphs:
            return self.forward_head(self.forward_features(images)[-1])
        features, patch_graphs = self.forward_features(images, return_graphs=True)
        grids = stage_grids(*images.shape[2:])
        graphs = [
            stage_graph(stage, x, patch, grid, images.shape[2:])
            for stage, x, patch, grid in zip(self.stages, features, patch_graphs, grids)
        ]
        return self.forward_head(features[-1]), graphs


def checkpoint_filter_fn(state_dict: Dict[str, Tensor], model: PyramidViG, source: str = "auto") -> dict:
    """A checkpoint's tensors in a :class:`PyramidViG`'s names: the patch path by
    :func:`gkg_pyg.models.convert.filter_checkpoint`, and for the authors'
    Pyramid ViG layout also the head, ``prediction.{0,1,4}.*`` (1x1 conv, BN,
    1x1 conv) -> ``head_patch.{0,1,4}.*``.

    The Pyramid ViG layout: ``stem.convs.*``, ``pos_embed``,
    ``backbone.{j}.0.*`` (Grapher) / ``backbone.{j}.1.*`` (FFN) /
    ``backbone.{j}.conv.*`` (downsampling) over one flat sequence,
    ``backbone.{j}.0.relative_pos`` (recomputed, never read), ``prediction.*``.
    """
    out = filter_checkpoint(state_dict, model, source)
    if out["source"] == "pyramid_vig":
        _take_prediction_head(state_dict, model, out)
    last = out["state_dict"].get("head_patch.4.weight")  # the classifier (GKGNet's is head_patch.weight)
    out["num_classes"] = None if last is None else int(last.shape[0])
    return out


def _take_prediction_head(state_dict: Dict[str, Tensor], model: PyramidViG, out: dict) -> None:
    """The authors' ``prediction.*`` head into ``out`` as ``head_patch.*``."""
    for key, target in model.state_dict().items():
        if not key.startswith("head_patch."):
            continue
        theirs = "prediction." + key[len("head_patch.") :]
        if theirs in state_dict:
            tensor = state_dict[theirs]
            if tensor.dim() == 4 and target.dim() == 2 and tensor.shape[2:] == (1, 1):
                tensor = tensor.flatten(1)
            out["state_dict"][key], out["names"][key] = tensor, theirs
    out["skipped"] = [k for k in out["skipped"] if not k.startswith("prediction.")]
    out["absent"] = [k for k in out["absent"] if not k.startswith("head_patch.")]


for _variant in VARIANTS:
    register_model(f"pvig_{_variant}", partial(PyramidViG, _variant), pretrained_cfgs[f"pvig_{_variant}"])
