"""Load and export GKGNet weights in three layouts.

* ``"gkg_pyg"``: this library's own state dict (optionally under ``model``
  or ``state_dict``, as the training script saves it).
* ``"gkgnet_mmcls"``: the authors' GKGNet checkpoints (mmcls
  ``ImageClassifier``, under ``state_dict``): ``backbone.stem.*``,
  ``backbone.pos_embed``, ``backbone.backbone.{j}.*``, ``backbone.label_lt``,
  ``backbone.gcn_label.*``, ``backbone.ffn_label.*``, ``head.fc{1,2}.*``.
* ``"pyramid_vig"``: Pyramid ViG ImageNet checkpoints (``pvig_*.pth.tar``):
  the patch path only, without the ``backbone.`` prefix; the ImageNet head
  (``prediction.*``) is dropped.

Foreign 1x1 convolution weights ``(out, in, 1, 1)`` become linear weights
``(out, in)``; the relative-position tables are recomputed, never read; an
absolute position embedding of another grid is resized bicubically.
"""
from __future__ import annotations

import os
import pickle
from typing import Dict, Mapping, Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor

from .models.gkgnet import GKGNet

SOURCES = ("auto", "gkg_pyg", "gkgnet_mmcls", "pyramid_vig")


def authors_key_map(model: GKGNet) -> Dict[str, Tuple[str, bool]]:
    """Our key -> (the authors' mmcls key, stored as a 1x1 conv weight).

    Our modules mirror theirs, so each key maps by renaming its module
    prefix; their linear maps inside blocks are 1x1 convolutions."""
    rules = [("stem.", "backbone.stem."), ("pos_embed", "backbone.pos_embed"),
             ("label_embed.", "backbone.label_lt."), ("head_label.", "head.fc1."), ("head_patch.", "head.fc2.")]
    j = 0  # index into the authors' flat sequence of blocks and downsamplings
    for s, stage in enumerate(model.stages):
        if stage.downsample is not None:
            rules.append((f"stages.{s}.downsample.", f"backbone.backbone.{j}.conv."))
            j += 1
        for b in range(len(stage.blocks)):
            rules += [(f"stages.{s}.blocks.{b}.grapher.", f"backbone.backbone.{j}.0."),
                      (f"stages.{s}.blocks.{b}.ffn.", f"backbone.backbone.{j}.1.")]
            j += 1
    rules += [("label_modules.", "backbone.gcn_label."), ("label_projs.", "backbone.ffn_label.")]
    out = {}
    for key, tensor in model.state_dict().items():
        ours, theirs = next((o, t) for o, t in rules if key.startswith(o))
        rest = key[len(ours):]
        if ours == "label_projs.":  # their label maps sit in a Sequential: ffn_label.{s}.0.*
            stage, _, rest = rest.partition(".")
            rest = f"{stage}.0.{rest}"
        theirs = (theirs + rest).replace(".graph_conv.nn.", ".graph_conv.gconv.nn.")
        conv = tensor.dim() == 2 and theirs.startswith(("backbone.backbone.", "backbone.gcn_label."))
        out[key] = (theirs, conv)
    return out


def _relative_pos_keys(model: GKGNet) -> Dict[str, Tensor]:
    """The authors' stored, negated position tables ``(1, n, n_src)`` per block."""
    out, j = {}, 0
    for stage in model.stages:
        j += stage.downsample is not None
        for _ in stage.blocks:
            out[f"backbone.backbone.{j}.0.relative_pos"] = -stage.construction_table().float().unsqueeze(0)
            j += 1
    return out


def read_checkpoint(path_or_state_dict) -> Tuple[Mapping[str, Tensor], dict]:
    """``(state_dict, whole checkpoint)`` of a path or dict: the state dict is
    unwrapped from ``state_dict`` or ``model`` and loses DDP's ``module.`` prefix."""
    if isinstance(path_or_state_dict, (str, os.PathLike)):
        path = os.fspath(path_or_state_dict)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"checkpoint not found: {path}")
        try:
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError:  # training checkpoints also hold RNG states and configs
            ckpt = torch.load(path, map_location="cpu", weights_only=False)
    else:
        ckpt = path_or_state_dict
    if not isinstance(ckpt, Mapping):
        raise ValueError(f"a checkpoint must be a dict of tensors, got {type(ckpt).__name__}")
    outer = ckpt
    for wrapper in ("state_dict", "model"):
        if isinstance(ckpt.get(wrapper), Mapping):
            ckpt = ckpt[wrapper]
            break
    state = {(k[7:] if k.startswith("module.") else k): v for k, v in ckpt.items() if isinstance(v, Tensor)}
    if not state:
        raise ValueError("the checkpoint holds no tensors")
    return state, outer


def detect_source(state: Mapping[str, Tensor]) -> str:
    keys = list(state)
    if any(k.startswith(("backbone.label_lt", "backbone.backbone.", "head.fc")) for k in keys):
        return "gkgnet_mmcls"
    if any(k.startswith("stages.") for k in keys):
        return "gkg_pyg"
    if "stem.convs.0.weight" in state and any(k.startswith("backbone.") for k in keys):
        return "pyramid_vig"
    raise ValueError("cannot tell the checkpoint layout from its keys (first keys: "
                     f"{keys[:5]}); pass source='gkg_pyg', 'gkgnet_mmcls' or 'pyramid_vig'")


def load_checkpoint(model: GKGNet, path_or_state_dict: Union[str, os.PathLike, Mapping],
                    source: str = "auto", verbose: bool = True) -> dict:
    """Load weights of any supported layout into ``model``.

    Returns a report ``{"source", "used", "skipped", "missing", "resized"}``
    (checkpoint keys used, checkpoint keys skipped, model keys not loaded,
    keys resized) and prints a summary when ``verbose``.  A tensor whose shape
    does not fit raises ``ValueError`` naming the key and both shapes, before
    anything is loaded.
    """
    if source not in SOURCES:
        raise ValueError(f"unknown checkpoint source {source!r}; expected one of {SOURCES}")
    state, _ = read_checkpoint(path_or_state_dict)
    if source == "auto":
        source = detect_source(state)
    own = model.state_dict()
    if source == "gkg_pyg":
        mapping = {k: (k, False) for k in own}
    else:
        mapping = authors_key_map(model)
        if source == "pyramid_vig":
            label_path = ("backbone.label_lt", "backbone.gcn_label", "backbone.ffn_label")
            mapping = {ours: (theirs[len("backbone."):], conv) for ours, (theirs, conv) in mapping.items()
                       if theirs.startswith("backbone.") and not theirs.startswith(label_path)}
    converted, used, resized = {}, [], []
    for ours, (theirs, _) in mapping.items():
        if theirs not in state:
            continue
        tensor, target = state[theirs], own[ours]
        if tensor.dim() == 4 and target.dim() == 2 and tensor.shape[2:] == (1, 1):
            tensor = tensor.flatten(1)
        if ours == "pos_embed" and tensor.dim() == 4 and tensor.shape[:2] == target.shape[:2] \
                and tensor.shape != target.shape:
            tensor = F.interpolate(tensor.float(), size=target.shape[2:], mode="bicubic", align_corners=False)
            resized.append(f"{theirs} {tuple(state[theirs].shape)} -> {tuple(target.shape)}")
        if tensor.shape != target.shape:
            raise ValueError(f"checkpoint does not fit the model: {theirs!r} has shape {tuple(state[theirs].shape)} "
                             f"but the model's {ours!r} has shape {tuple(target.shape)}")
        converted[ours] = tensor
        used.append(theirs)
    used_set = set(used)
    skipped = [k for k in state if k not in used_set]
    missing = [k for k in own if k not in converted]
    model.load_state_dict(converted, strict=False)
    report = dict(source=source, used=used, skipped=skipped, missing=missing, resized=resized)
    if verbose:
        print(format_report(report))
    return report


def format_report(report: dict, show: int = 6) -> str:
    def few(keys):
        return ", ".join(keys[:show]) + (f", ... (+{len(keys) - show})" if len(keys) > show else "")
    lines = [f"loaded {len(report['used'])} tensors ({report['source']} layout)"]
    if report["resized"]:
        lines.append(f"  resized: {few(report['resized'])}")
    if report["skipped"]:
        lines.append(f"  skipped {len(report['skipped'])} checkpoint keys: {few(report['skipped'])}")
    if report["missing"]:
        lines.append(f"  missing {len(report['missing'])} model keys (left as initialised): {few(report['missing'])}")
    return "\n".join(lines)


def export_authors_checkpoint(model: GKGNet, path: Optional[Union[str, os.PathLike]] = None) -> dict:
    """The model's weights in the authors' mmcls layout, ``{"state_dict": ...}``
    (1x1 conv weights 4-D, position tables included), saved to ``path`` if given."""
    own = model.state_dict()
    state = {}
    for ours, (theirs, conv) in authors_key_map(model).items():
        tensor = own[ours]
        state[theirs] = tensor[:, :, None, None] if conv else tensor
    state.update(_relative_pos_keys(model))
    ckpt = {"state_dict": state}
    if path is not None:
        torch.save(ckpt, path)
    return ckpt
