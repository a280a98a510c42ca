"""One registry for every model family (timm style): ``name -> (builder, pretrained_cfg)``.

Model files register their names next to the model (``register_model``);
``create_model`` and ``list_models`` see all of them.  Where published
weights are and how they are fetched is :mod:`gkg_pyg.models.hub`
(``create_model(name, pretrained=True)``).  The registry imports no model
file, so model files can import it without a cycle;
``gkg_pyg.models`` imports every model file, so importing any of them fills
the whole table.
"""

from __future__ import annotations

import difflib
import fnmatch
import os
from typing import Callable, Dict, List, Optional, Tuple

import torch
from torch import nn
from torch._subclasses.fake_tensor import FakeTensor

from ..checkpoint import load_checkpoint
from ..errors import ConfigError, MissingFileError
from .hub import check_available, load_pretrained, pretrained_tags, resolve_pretrained_cfg

__all__ = ["create_model", "get_pretrained_cfg", "list_models", "register_model", "resolve_pretrained"]

_MODELS: Dict[str, Tuple[Callable[..., nn.Module], dict]] = {}


def register_model(name: str, builder: Callable[..., nn.Module], pretrained_cfg: Optional[dict] = None) -> None:
    """Register ``builder(**kwargs)`` under ``name``; a name is registered once."""
    if name in _MODELS:
        raise ValueError(f"model {name!r} is already registered")
    _MODELS[name] = (builder, dict(pretrained_cfg or {}))


def _split_name(name: str) -> Tuple[str, Optional[str]]:
    """``(architecture, tag)`` of ``"gkgnet_s"`` or timm's ``"gkgnet_s.coco_576"``; unknown names raise."""
    if not isinstance(name, str):
        raise TypeError(f"a model name must be a string, got {type(name).__name__}")
    arch, dot, tag = name.partition(".")
    if arch not in _MODELS:
        close = difflib.get_close_matches(arch, list(_MODELS), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ConfigError(f"unknown model {name!r}{hint}; available: {list_models()}")
    if dot and tag not in pretrained_tags(arch):
        raise ConfigError(f"{arch} has no pretrained tag {tag!r}; its tags: {pretrained_tags(arch) or 'none'}")
    return arch, (tag if dot else None)


def get_pretrained_cfg(name: str) -> dict:
    """The ``pretrained_cfg`` of a registered model (weights, input size,
    mean/std) for its default weights, or for ``"name.tag"``'s, without
    building it: the model's own cfg merged with
    :data:`gkg_pyg.models.hub.PRETRAINED`."""
    arch, tag = _split_name(name)
    return resolve_pretrained_cfg(arch, tag, base=_MODELS[arch][1])


def list_models(pattern: Optional[str] = None) -> List[str]:
    """Registered names, sorted; ``pattern`` filters them shell-style (``"pvig_*"``)."""
    names = sorted(_MODELS)
    return names if pattern is None else [n for n in names if fnmatch.fnmatch(n, pattern)]


def _pretrained_request(arch: str, name_tag: Optional[str], pretrained) -> Tuple[Optional[str], Optional[str], bool]:
    """``(tag, path, load)`` of ``create_model``'s ``pretrained`` argument."""
    if pretrained is None or pretrained is False or pretrained == "":
        return name_tag, None, False
    if pretrained is True:
        return name_tag, None, True
    if not isinstance(pretrained, (str, os.PathLike)):
        raise TypeError(f"pretrained must be True/False, a pretrained tag or a checkpoint path, got {pretrained!r}")
    value = os.fspath(pretrained)
    tags = pretrained_tags(arch)
    if isinstance(pretrained, str) and value in tags and not os.path.isfile(value):
        if name_tag is not None and value != name_tag:
            raise ConfigError(f"model {arch}.{name_tag} with pretrained={value!r}: two different tags")
        return value, None, True
    if not os.path.isfile(value):
        raise MissingFileError(
            f"checkpoint not found: {value} (pretrained= is neither an existing file nor a pretrained tag of "
            f"{arch}: {tags or 'it has none'})"
        )
    if name_tag is not None:
        raise ConfigError(f"model {arch}.{name_tag} names published weights, but pretrained is a path ({value})")
    return None, value, True


def resolve_pretrained(
    name: str, pretrained=False, pretrained_cfg_overlay: Optional[dict] = None
) -> Tuple[dict, Optional[str], bool]:
    """What ``create_model(name, pretrained, pretrained_cfg_overlay)`` loads,
    checked before any model is built: ``(pretrained_cfg, checkpoint path or
    None, whether weights are loaded)``; with a path, the cfg is the
    default tag's."""
    arch, name_tag = _split_name(name)
    tag, path, load = _pretrained_request(arch, name_tag, pretrained)
    overlay = dict(pretrained_cfg_overlay or {})
    names_weights = overlay.get("file") is not None or overlay.get("url") is not None
    if not load and names_weights:
        raise ConfigError(
            "pretrained_cfg_overlay names weights (file= or url=) but pretrained is False: pass pretrained=True"
        )
    if path is not None and names_weights:
        raise ConfigError(f"pretrained={path!r} is a path: pretrained_cfg_overlay file= or url= would be ignored")
    cfg = resolve_pretrained_cfg(arch, tag, base=_MODELS[arch][1], overlay=overlay)
    if load and path is None:
        check_available(cfg)  # weights with no direct download: say where to get them, before building
    return cfg, path, load


def create_model(name: str, pretrained=False, pretrained_cfg_overlay: Optional[dict] = None, **kwargs) -> nn.Module:
    """Build a registered model (timm's ``create_model``):
    ``gkgnet_{ti,s,m,b}`` (:class:`gkg_pyg.GKGNet`) or ``pvig_{ti,s,m,b}``
    (:class:`gkg_pyg.models.pvig.PyramidViG`), optionally ``"name.tag"`` to
    pick published weights; keyword arguments go to the model class.

    Args:
        name: a registered name, optionally with a pretrained tag
            (``"gkgnet_s.coco_576"``).
        pretrained: False: fresh weights. True: the published weights of the
            name's tag or the model's default tag
            (:data:`gkg_pyg.models.hub.PRETRAINED`: ``gkgnet_*`` get their
            patch path from the Pyramid ViG ImageNet weights, ``pvig_*`` all
            of them), downloaded once into ``torch.hub.get_dir()/checkpoints``;
            a classifier of another label count is left out. A tag string
            (``"imagenet"``, ``"coco_576"``): those weights. A path (an
            existing file): that checkpoint, loaded strictly
            (:func:`gkg_pyg.load_checkpoint`).
        pretrained_cfg_overlay: changes to the model's ``pretrained_cfg``:
            ``dict(file=PATH)`` loads a local file instead of downloading
            (e.g. offline, or the GKGNet-S COCO weights from Google Drive),
            ``dict(url=URL)`` downloads another URL.

    The model's ``pretrained_cfg`` is its registered cfg merged with the
    tag's entry and the overlay. Loading logs what was loaded (logger
    ``gkg_pyg``, INFO).

    Raises:
        gkg_pyg.errors.ConfigError (a ValueError): an unknown name or tag, or
            a ``pretrained`` / ``pretrained_cfg_overlay`` that contradict each other.
        gkg_pyg.errors.MissingFileError (a FileNotFoundError): ``pretrained``
            neither a tag nor an existing file.
        gkg_pyg.models.hub.PretrainedWeightsError: weights with no direct
            download (the error says where to get them), or a download that
            failed (naming the URL, the cache file and the offline way).
        gkg_pyg.checkpoint.CheckpointError: a checkpoint that cannot be read
            or does not fit.
    """
    cfg, path, load = resolve_pretrained(name, pretrained, pretrained_cfg_overlay)
    model_class = _MODELS[cfg["architecture"]][0]
    like = torch.empty(0)  # on the caller's default device; a fake tensor under a FakeTensorMode
    if like.is_meta or isinstance(like, FakeTensor):  # no values to draw
        model = model_class(**kwargs)
    else:
        # Built on the meta device and materialised uninitialised, then initialised once: the
        # layers' own initialisation, which the authors' redraws, was a fifth to a quarter of the build.
        with torch.device("meta"):
            model = model_class(**kwargs)
        model = model.to_empty(device=like.device)
        model.init_weights()
    model.pretrained_cfg = cfg
    if path is not None:
        load_checkpoint(model, path)
    elif load:
        load_pretrained(model, cfg)
    return model
