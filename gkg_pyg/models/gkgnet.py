"""GKGNet: Group K-nearest-neighbour Graph Convolutional Network for
multi-label image recognition (Yao et al., ECCV 2024).

The paper's structure:

* **Patch path**: a Pyramid ViG (:class:`~gkg_pyg.models.pvig.PyramidViGBackbone`):
  a stem, then four stages of Grapher + FFN blocks over the image patches,
  each Grapher a group KGCN: the channels are split into ``G`` groups, every
  patch links, in each group, to its ``K`` nearest (pooled) patches, with a
  relative-position term subtracted from the distance, and aggregates
  ``m_ig = max_j (y_jg - y_ig)`` (eq. 1), updated through ``W [y, m]`` (eq. 2).
* **Label path**: ``L`` label nodes, a learnable embedding ``(L, C_1)``.  After
  every stage ``i`` a :class:`CrossLevelModule` (a cross-level group KGCN)
  lets each label node aggregate, in each group, from its ``K`` nearest
  patches of the stage output: ``z = BN(W1 l)``; the group kNN graph from all
  patches (no pooling, no position term, no dilation) to ``z``;
  ``l <- l + droppath(BN(W2 GELU(BN(W_g [z, max_j p_j - z]))))``; then an FFN.
  Between stages, ``Linear(C_i -> C_{i+1})`` maps the label nodes to the next width.
* **Heads**: for label ``l``, ``w_l . l_l + b_l`` on its final label node
  (``head_label``), plus ``Linear(C_4 -> L)`` of the averaged last-stage patches
  (``head_patch``); the score is ``sigmoid`` of their sum.

Features live in node layout ``(B, N, C)`` so that every 1x1 convolution is a
linear map and the graph layers see PyG node tensors; only the stem and the
downsampling convolutions run on the image layout.
"""

from __future__ import annotations

from functools import partial
from typing import Dict, List, NamedTuple, Optional, Sequence

import torch
from torch import Tensor, nn

from ..errors import ConfigError
from ..knn import batched_group_knn
from .convert import export_authors_checkpoint, filter_checkpoint
from ..geometry import min_input_size, stage_grids
from .layers import FFN, init_like_authors
from .pvig import VARIANTS, Grapher, PyramidViGBackbone, stage_graph
from .registry import create_model, list_models, register_model

__all__ = [
    "GKGNet",
    "CrossLevelModule",
    "create_model",
    "list_models",
    "min_input_size",
    "pretrained_cfgs",
    "checkpoint_filter_fn",
    "export_authors_checkpoint",
]

IMAGENET_MEAN = (123.675, 116.28, 103.53)
IMAGENET_STD = (58.395, 57.12, 57.375)

# What a model of each variant takes (its published weights and their metadata, such as the
# authors' COCO checkpoint for gkgnet_s, are the tags of gkg_pyg.models.hub.PRETRAINED).
pretrained_cfgs: Dict[str, dict] = {
    f"gkgnet_{_name}": dict(
        file=None,
        source="gkgnet_mmcls",
        num_classes=80,
        input_size=(3, 448, 448),
        interpolation="bicubic",
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        backbone_init=f"pvig_{_name}_*.pth.tar (Pyramid ViG-{_name.upper()}, ImageNet)",
    )
    for _name in ("ti", "s", "m", "b")
}


class LabelGraph(NamedTuple):
    """What a cross-level module compared and chose."""

    neighbors: Tensor  # (G, B, L, k) patch indices within each image
    knn_x: Tensor  # (B, L, C) the label destinations z = BN(W1 labels)


class CrossLevelModule(Grapher):
    """Label nodes aggregate from the patches of a stage (cross-level group
    KGCN): the :class:`~gkg_pyg.models.pvig.Grapher` on a group kNN graph from
    all patches (no pooling, no position term, no dilation) to the label
    nodes, then an FFN."""

    def __init__(self, channels: int, k: int, groups: int, drop_path: float, knn_backend: str):
        super().__init__(channels, groups, drop_path)
        self.ffn = FFN(channels, drop_path)
        self.k, self.groups, self.knn_backend = k, groups, knn_backend

    def forward(self, labels: Tensor, patches: Tensor, return_graph: bool = False):
        """``labels`` ``(B, L, C)``, ``patches`` ``(B, N, C)`` -> new labels;
        with ``return_graph`` also the :class:`LabelGraph`."""
        z = self.fc1(labels)  # 1. project the label nodes
        neighbors = batched_group_knn(patches, z, self.k, self.groups, backend=self.knn_backend)  # 2. kNN
        labels = self.ffn(super().forward(labels, z, patches, neighbors))  # 3. aggregate and update; the FFN
        return (labels, LabelGraph(neighbors, z)) if return_graph else labels


class GKGNet(PyramidViGBackbone):
    """GKGNet for multi-label recognition: a Pyramid ViG patch path (this
    class's ``stem``, ``pos_embed`` and ``stages``, from
    :class:`~gkg_pyg.models.pvig.PyramidViGBackbone`), the label path and two heads.

    Args:
        variant: ``"ti"``, ``"s"``, ``"m"`` or ``"b"`` (Pyramid ViG widths/depths).
        num_classes: number of labels ``L``.
        img_size: construction size ``S`` (int or ``(H, W)``); sets the position
            tables and embedding, other input sizes are resampled.
        k: neighbours per node and group.
        groups: channel groups ``G`` of the group kNN graphs.
        drop_path: final stochastic-depth rate (linear from 0 over the patch
            blocks; a stage's label module takes the rate of its first block).
        cross_level: label path on/off (off: patch logits only; an ablation).
        num_gcn: cross-level modules after the last stage.
        knn_backend: backend of :func:`gkg_pyg.group_knn`.
        class_names: label names, attached to captured graphs.
        depths: patch blocks per stage; None: the variant's (see
            :class:`~gkg_pyg.models.pvig.PyramidViGBackbone`).

    Built on the meta device (shapes only) the model is left uninitialised:
    ``to_empty(device=...)`` then :meth:`init_weights` give it values
    (what :func:`~gkg_pyg.models.create_model` does).

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
        depths: Optional[Sequence[int]] = None,
    ):
        if num_classes < 1 or num_gcn < 1:
            raise ConfigError(f"num_classes and num_gcn must be positive, got {num_classes} and {num_gcn}")
        if class_names is not None and len(class_names) != num_classes:
            raise ConfigError(f"{len(class_names)} class names for {num_classes} classes")
        super().__init__(
            variant, img_size, k=k, groups=groups, drop_path=drop_path, knn_backend=knn_backend, depths=depths
        )
        self.num_classes, self.class_names = num_classes, list(class_names) if class_names else None
        self.cross_level = cross_level
        chans = self.channels
        if cross_level:
            self.label_embed = nn.Embedding(num_classes, chans[0])  # initialised N(0, 1)
            self.label_modules = nn.ModuleList(
                nn.ModuleList(
                    CrossLevelModule(chans[i], k, groups, self.stages[i].drop_paths[0], knn_backend)
                    for _ in range(num_gcn if i == 3 else 1)
                )
                for i in range(4)
            )
            self.label_projs = nn.ModuleList(nn.Linear(chans[i], chans[i + 1]) for i in range(3))
            # Per-label linear head on the label nodes: logit_l = w_l . x_l + b_l.
            self.head_label = nn.Linear(chans[3], num_classes)
        self.head_patch = nn.Linear(chans[3], num_classes)
        if not self.pos_embed.is_meta:  # shapes only: init_weights() after to_empty() sets the values
            self.init_weights()

    def init_weights(self) -> None:
        """The authors' initialisation (mmcls ``GKGNet.model_init`` and ``LabelQueryHead``).

        Every layer that is an ``nn.Conv2d`` in their code, i.e. the stem and
        downsampling convolutions and every 1x1 convolution of the Graphers,
        FFNs and graph convolutions in the patch path and in the label path
        (linear maps here), gets ``kaiming_normal_`` (fan-in, gain sqrt 2) and
        a zero bias; every BatchNorm is fresh. Their label projections are
        ``nn.Linear`` and get PyTorch's default; the label embedding is N(0, 1)
        (``nn.Embedding``'s default); both heads are N(0, 0.01) with zero bias
        (``_init_classifier``). This sets every parameter and buffer.
        """
        self.init_patch_path()
        if self.cross_level:
            init_like_authors(self.label_modules)
            for proj in self.label_projs:
                proj.reset_parameters()
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
        return super().no_weight_decay() | ({"label_embed.weight"} if self.cross_level else set())

    def reset_classifier(self, num_classes: int, class_names: Optional[Sequence[str]] = None) -> None:
        """New, freshly initialised label-dependent parts for ``num_classes``
        labels: the label embedding and both heads (timm's ``reset_classifier``;
        e.g. to fine-tune a COCO model on VOC)."""
        if num_classes < 1:
            raise ConfigError(f"num_classes must be positive, got {num_classes}")
        if class_names is not None and len(class_names) != num_classes:
            raise ConfigError(f"{len(class_names)} class names for {num_classes} classes")
        like = self.head_patch.weight
        self.num_classes, self.class_names = num_classes, list(class_names) if class_names else None
        if self.cross_level:
            self.label_embed = nn.Embedding(num_classes, self.label_embed.embedding_dim)
            self.head_label = nn.Linear(self.head_label.in_features, num_classes)
        self.head_patch = nn.Linear(self.head_patch.in_features, num_classes)
        self._init_classifier()
        for name in ("label_embed", "head_label", "head_patch"):
            if hasattr(self, name):
                getattr(self, name).to(device=like.device, dtype=like.dtype).train(self.training)

    def filter_checkpoint(self, state_dict: Dict[str, Tensor], source: str = "auto") -> dict:
        """A checkpoint's tensors in this model's names (:func:`checkpoint_filter_fn`)."""
        return checkpoint_filter_fn(state_dict, self, source)

    def forward_labels(self, features: List[Tensor], return_graphs: bool = False):
        """The label path over the stage outputs ``features`` (``(B, N_i, C_i)``):
        the final label nodes ``(B, L, C_4)``; with ``return_graphs`` also each
        stage's last :class:`LabelGraph`."""
        b = features[0].shape[0]
        # A lookup, not a view of the weight: views of leaves break autograd hooks.
        labels = self.label_embed(torch.arange(self.num_classes, device=features[0].device)).expand(b, -1, -1)
        graphs = []
        for i, patches in enumerate(features):
            for module in self.label_modules[i]:
                labels, graph = module(labels, patches, return_graph=True)
            graphs.append(graph)
            if i < 3:
                labels = self.label_projs[i](labels)
        return (labels, graphs) if return_graphs else labels

    def forward(self, images: Tensor, return_graphs: bool = False):
        if return_graphs:
            features, patch_graphs = self.forward_features(images, return_graphs=True)
        else:
            features = self.forward_features(images)
        logits = self.head_patch(features[-1].mean(dim=1))
        label_graphs: List[Optional[LabelGraph]] = [None] * 4
        if self.cross_level:
            labels, label_graphs = self.forward_labels(features, return_graphs=True)
            logits = logits + (labels * self.head_label.weight).sum(-1) + self.head_label.bias
        if not return_graphs:
            return logits
        graphs = [
            stage_graph(
                stage,
                x,
                patch,
                grid,
                images.shape[2:],
                label_x=None if label is None else label.knn_x,
                label_neighbors=None if label is None else label.neighbors,
                label_names=self.class_names,
            )
            for stage, x, patch, label, grid in zip(
                self.stages, features, patch_graphs, label_graphs, stage_grids(*images.shape[2:])
            )
        ]
        return logits, graphs


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

    See :func:`gkg_pyg.models.convert.filter_checkpoint` for the conversion and the result.
    """
    return filter_checkpoint(state_dict, model, source)


for _variant in VARIANTS:
    register_model(f"gkgnet_{_variant}", partial(GKGNet, _variant), pretrained_cfgs[f"gkgnet_{_variant}"])
