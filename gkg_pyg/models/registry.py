"""One registry for every model family (timm style): ``name -> (builder, pretrained_cfg)``.

Model files register their names next to the model (``register_model``);
``create_model`` and ``list_models`` see all of them.  The registry imports
no model file, so model files can import it without a cycle;
``gkg_pyg.models`` imports every model file, so importing any of them fills
the whole table.
"""

from __future__ import annotations

import difflib
import fnmatch
from typing import Callable, Dict, List, Optional, Tuple

from torch import nn

__all__ = ["create_model", "get_pretrained_cfg", "list_models", "register_model"]

_MODELS: Dict[str, Tuple[Callable[..., nn.Module], dict]] = {}


def register_model(name: str, builder: Callable[..., nn.Module], pretrained_cfg: Optional[dict] = None) -> None:
    """Register ``builder(**kwargs)`` under ``name``; a name is registered once."""
    if name in _MODELS:
        raise ValueError(f"model {name!r} is already registered")
    _MODELS[name] = (builder, dict(pretrained_cfg or {}))


def get_pretrained_cfg(name: str) -> dict:
    """A copy of the ``pretrained_cfg`` of a registered model (weights, input size, mean/std), without building it."""
    if name not in _MODELS:
        raise ValueError(f"unknown model {name!r}; available: {list_models()}")
    return dict(_MODELS[name][1])


def list_models(pattern: Optional[str] = None) -> List[str]:
    """Registered names, sorted; ``pattern`` filters them shell-style (``"pvig_*"``)."""
    names = sorted(_MODELS)
    return names if pattern is None else [n for n in names if fnmatch.fnmatch(n, pattern)]


def create_model(name: str, pretrained: Optional[str] = None, **kwargs) -> nn.Module:
    """Build a registered model: ``gkgnet_{ti,s,m,b}`` (:class:`gkg_pyg.GKGNet`)
    or ``pvig_{ti,s,m,b}`` (:class:`gkg_pyg.models.pvig.PyramidViG`); keyword
    arguments go to the model class.  ``pretrained`` is a checkpoint path
    loaded with :func:`gkg_pyg.load_checkpoint`; the model's
    ``pretrained_cfg`` describes the published weights."""
    if name not in _MODELS:
        close = difflib.get_close_matches(name, list(_MODELS), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ValueError(f"unknown model {name!r}{hint}; available: {list_models()}")
    builder, cfg = _MODELS[name]
    model = builder(**kwargs)
    model.pretrained_cfg = dict(cfg)
    if pretrained:
        from ..checkpoint import load_checkpoint

        load_checkpoint(model, pretrained)
    return model
