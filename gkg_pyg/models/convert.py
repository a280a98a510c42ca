"""The authors' checkpoint layouts, both ways.

* ``"gkgnet_mmcls"``: the authors' GKGNet (mmcls ``ImageClassifier``, under
  ``state_dict``): ``backbone.stem.*``, ``backbone.pos_embed``,
  ``backbone.backbone.{j}.*`` (``j`` indexes the flat sequence of patch blocks
  and downsamplings: a block's ``.0`` is the Grapher, ``.1`` the FFN, a
  downsampling's ``.conv``), ``backbone.label_lt``, ``backbone.gcn_label.{s}.{r}.*``,
  ``backbone.ffn_label.{s}.0.*``, ``head.fc1.*`` (label head), ``head.fc2.*`` (patch head);
* ``"pyramid_vig"``: Pyramid ViG's ImageNet checkpoints, the patch path of the
  same layout without the ``backbone.`` prefix, and ``prediction.*`` (its head);
* ``"gkg_pyg"``: this library's own state dict.

Their linear maps inside blocks are 1x1 convolutions (``(out, in, 1, 1)``
weights) and every Grapher stores its negated relative-position table
(``relative_pos``), which is recomputed here, never read.  The models' own
``checkpoint_filter_fn`` (next to each model, timm style) call
:func:`filter_checkpoint`; :func:`export_authors_checkpoint` writes the
authors' GKGNet layout.
"""

from __future__ import annotations

from typing import Dict, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import CheckpointError

__all__ = [
    "LAYOUTS",
    "authors_key_map",
    "relative_pos_keys",
    "detect_layout",
    "filter_checkpoint",
    "export_authors_checkpoint",
]

LAYOUTS = ("gkg_pyg", "gkgnet_mmcls", "pyramid_vig")
_LABEL_PATH = ("backbone.label_lt", "backbone.gcn_label", "backbone.ffn_label")


def authors_key_map(model: nn.Module) -> Dict[str, Tuple[str, bool]]:
    """Our key -> (the authors' mmcls key, stored as a 1x1 conv weight), for
    every key of ``model``'s state dict (a GKGNet or a Pyramid ViG).

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


def relative_pos_keys(model: nn.Module) -> Dict[str, Tensor]:
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
    raise CheckpointError(
        "cannot tell the checkpoint layout from its keys (first keys: "
        f"{keys[:5]}); pass source='gkg_pyg', 'gkgnet_mmcls' or 'pyramid_vig'"
    )


def filter_checkpoint(state_dict: Dict[str, Tensor], model: nn.Module, source: str = "auto") -> dict:
    """Turn a checkpoint of any layout in :data:`LAYOUTS` into ``model``'s names
    (``source="auto"`` detects the layout from the keys).

    Foreign 1x1 convolution weights ``(out, in, 1, 1)`` become linear weights
    ``(out, in)``; the relative-position tables are recomputed, never read; an
    absolute position embedding of another grid is resized bicubically.  From
    a Pyramid ViG checkpoint only the patch path is taken: the label path and
    the heads are absent, its ImageNet head (``prediction.*``) is skipped.

    Returns ``{"source", "state_dict" (ours -> tensor), "names" (ours -> their
    key), "skipped" (their keys deliberately not used), "absent" (our keys the
    layout cannot hold), "resized", "num_classes" (of the checkpoint, or None)}``.
    Keys of the checkpoint that are neither used nor skipped are unexpected.
    """
    if source not in ("auto",) + LAYOUTS:
        raise CheckpointError(f"unknown checkpoint source {source!r}; expected one of {('auto',) + LAYOUTS}")
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


def export_authors_checkpoint(model: nn.Module, path=None) -> dict:
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
