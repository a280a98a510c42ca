"""Pyramid ViG (Han et al., NeurIPS 2022) for single-label classification,
with the group kNN graph of GKGNet as an option (the paper's Table 5).

A Pyramid ViG is GKGNet's patch path (stem, absolute position embedding,
four stages of Grapher + FFN blocks with the relative-position term, pooled
sources and dilations) followed by Pyramid ViG's own classifier on the
averaged patches: 1x1 conv to 1024, BN, GELU, dropout, 1x1 conv to the
classes.  ``groups=1`` is the original model (its ImageNet checkpoints load
completely), ``groups=2`` is the paper's "+ Group KNN": the same weights
(the group split changes which neighbours are chosen, not the parameters).

The model reuses :class:`~gkg_pyg.GKGNet` with the label path switched off,
so the patch path, input-size handling, kNN backends and graph capture
(``return_graphs=True``) are the same code as GKGNet's.
"""

from __future__ import annotations

from functools import partial
from typing import Dict, Optional, Sequence

import torch
from torch import Tensor, nn

from ..conv import GroupedLinear
from .gkgnet import VARIANTS, GKGNet, checkpoint_filter_fn
from .registry import register_model

__all__ = ["PyramidViG", "pretrained_cfgs"]

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


class PyramidViG(GKGNet):
    """Pyramid ViG classifier.

    Args:
        variant: ``"ti"``, ``"s"``, ``"m"`` or ``"b"``.
        num_classes: number of classes.
        img_size: construction size (int or ``(H, W)``): sets the position
            tables and embedding (224 for the ImageNet weights); other input
            sizes are resampled as in :class:`~gkg_pyg.GKGNet`.
        k: neighbours per node (and group).
        groups: channel groups of the kNN graphs (1: Pyramid ViG; 2: "+ Group KNN").
        drop_path: final stochastic-depth rate (linear from 0 over the blocks).
        drop_rate: dropout before the last layer of the head.
        knn_backend: backend of :func:`gkg_pyg.group_knn`.
        class_names: class names, attached to captured graphs.

    ``forward(images)`` takes normalised ``(B, 3, H, W)`` images and returns
    logits ``(B, num_classes)`` (softmax scores); ``return_graphs=True``
    also returns one :class:`~torch_geometric.data.HeteroData` per stage.

    The head works on the averaged ``(B, C)`` patch features, where Pyramid
    ViG's 1x1 convolutions on a ``1 x 1`` map are linear maps and its
    BatchNorm2d is a BatchNorm1d (the same statistics over the batch).
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
    ):
        super().__init__(
            variant,
            num_classes,
            img_size,
            k=k,
            groups=groups,
            drop_path=drop_path,
            cross_level=False,
            knn_backend=knn_backend,
            class_names=class_names,
        )
        if not 0.0 <= drop_rate < 1.0:
            raise ValueError(f"drop_rate must be in [0, 1), got {drop_rate}")
        # GKGNet's forward applies head_patch to the averaged patches of the last stage.
        self.head_patch = nn.Sequential(
            nn.Linear(VARIANTS[variant].channels[-1], HEAD_HIDDEN),
            nn.BatchNorm1d(HEAD_HIDDEN),
            nn.GELU(),
            nn.Dropout(drop_rate),
            nn.Linear(HEAD_HIDDEN, num_classes),
        )
        self.drop_rate = drop_rate
        self.init_weights()  # again, now that the head exists (GKGNet.__init__ ran it before)

    @torch.no_grad()
    def init_weights(self) -> None:
        """Pyramid ViG's initialisation (``DeepGCN.model_init``): Kaiming-normal
        weights and zero biases for every convolution, head included, here also
        for the 1x1 ones that are linear maps (the fan-in of a ``(out, in)`` or
        grouped ``(out, in / g)`` weight is that of the ``1 x 1`` convolution it
        stands for). Overrides GKGNet's, whose heads are N(0, 0.01)."""
        for module in self.modules():
            if isinstance(module, (nn.Conv2d, nn.Linear, GroupedLinear)):
                nn.init.kaiming_normal_(module.weight)
                if module.bias is not None:
                    module.bias.zero_()

    def reset_classifier(self, num_classes: int, class_names: Optional[Sequence[str]] = None) -> None:
        """A new, freshly initialised last layer for ``num_classes`` classes
        (timm's ``reset_classifier``, e.g. to fine-tune ImageNet weights)."""
        if num_classes < 1:
            raise ValueError(f"num_classes must be positive, got {num_classes}")
        if class_names is not None and len(class_names) != num_classes:
            raise ValueError(f"{len(class_names)} class names for {num_classes} classes")
        old = self.head_patch[-1]
        new = nn.Linear(old.in_features, num_classes)
        nn.init.kaiming_normal_(new.weight)
        nn.init.zeros_(new.bias)
        self.head_patch[-1] = new.to(device=old.weight.device, dtype=old.weight.dtype)
        self.num_classes, self.class_names = num_classes, list(class_names) if class_names else None

    def filter_checkpoint(self, state_dict: Dict[str, Tensor], source: str = "auto") -> dict:
        """A checkpoint's tensors in this model's names: GKGNet's
        :func:`~gkg_pyg.models.gkgnet.checkpoint_filter_fn` for the patch path,
        and for the authors' Pyramid ViG layout also the head,
        ``prediction.{0,1,4}.*`` (1x1 conv, BN, 1x1 conv) -> ``head_patch.{0,1,4}.*``.

        The Pyramid ViG layout: ``stem.convs.*``, ``pos_embed``,
        ``backbone.{j}.0.*`` (Grapher) / ``backbone.{j}.1.*`` (FFN) /
        ``backbone.{j}.conv.*`` (downsampling) over one flat sequence,
        ``backbone.{j}.0.relative_pos`` (recomputed, never read), ``prediction.*``.
        """
        out = checkpoint_filter_fn(state_dict, self, source)
        if out["source"] != "pyramid_vig":
            return out
        for key, target in self.state_dict().items():
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
        last = state_dict.get("prediction.4.weight")
        out["num_classes"] = None if last is None else int(last.shape[0])
        return out


for _variant in VARIANTS:
    register_model(f"pvig_{_variant}", partial(PyramidViG, _variant), pretrained_cfgs[f"pvig_{_variant}"])
