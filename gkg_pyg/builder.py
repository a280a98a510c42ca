"""Turn a config into a model: the one place where that happens.

``build_model(cfg)``: the ``model`` section's ``name`` and keyword arguments
go to :func:`gkg_pyg.create_model`; then ``model.pretrained`` and
``model.init_from`` (a model trained on other labels: loaded strictly at its
own label count, then the classifier is reset to ours with
``model.reset_classifier``) are loaded.

``model.pretrained`` is ``true`` or a tag of the model's published weights
(``imagenet``: the registry's default, :data:`gkg_pyg.models.hub.PRETRAINED`;
for ``gkgnet_*`` the patch path from the Pyramid ViG ImageNet weights),
downloaded once into torch's hub cache as ``create_model(name,
pretrained=True)`` does; or the path of an existing checkpoint, whose
weights must fit (strict loading, where a Pyramid ViG ImageNet checkpoint
fills the patch path). A string that is an existing file is always a path.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Sequence

from torch import nn

from .config import DEFAULTS
from .errors import CheckpointError, ConfigError, MissingFileError
from .checkpoint import convert_checkpoint, format_report, load_checkpoint, read_checkpoint
from .models import create_model
from .models.hub import load_pretrained, load_resetting_classifier
from .models.registry import resolve_pretrained

log = logging.getLogger(__name__)

# Model-section keys of one model family only: left out for the others, where they must keep their default.
FAMILY_KEYS = {"cross_level": "gkgnet_", "num_gcn": "gkgnet_", "drop_rate": "pvig_"}
# Keys of the model section that are not create_model arguments.
WEIGHT_KEYS = ("name", "pretrained", "init_from", "init_classifier")
# model.init_classifier: what init_from does with the checkpoint's label-specific parts.
INIT_CLASSIFIER = ("auto", "reset", "keep")


def model_kwargs(cfg: dict, class_names: Sequence[str] | None = None) -> dict:
    """create_model keyword arguments of a config's model section.

    With ``class_names`` the label count comes from them (and must equal
    model.num_classes when that is set); without, model.num_classes must
    be set.
    """
    section = cfg["model"]
    kwargs = {k: v for k, v in section.items() if k not in WEIGHT_KEYS and k != "num_classes"}
    for key, family in FAMILY_KEYS.items():  # keys the other model families do not take
        if not section["name"].startswith(family):
            if kwargs.pop(key) != DEFAULTS["model"][key]:
                raise ConfigError(f"model.{key} applies to {family}* models only, not to {section['name']}")
    num_classes = section["num_classes"]
    if class_names is not None:
        if num_classes is not None and num_classes != len(class_names):
            raise ConfigError(f"model.num_classes is {num_classes} but the data set has {len(class_names)} labels")
        kwargs["num_classes"] = len(class_names)
        kwargs["class_names"] = list(class_names)
    elif num_classes is None:
        raise ConfigError("model.num_classes is not set and no class names were given")
    else:
        kwargs["num_classes"] = num_classes
    return kwargs


def init_from_checkpoint(model: nn.Module, path: str | Path, verbose: bool = True, classifier: str = "auto") -> dict:
    """Load a checkpoint trained on another label set (fine-tuning, e.g. COCO
    -> VOC): the model's classifier (label embedding and heads) is reset to
    the checkpoint's label count, everything is loaded strictly, then the
    classifier is reset to the model's labels (freshly initialised).

    ``classifier`` (config key model.init_classifier) says when that reset
    happens: "auto" when the label count differs or the checkpoint names
    its classes (``class_names``, as our training checkpoints do) and they
    are not the model's, i.e. a new label set even of the same size;
    "reset" always (fine-tuning to a new label set from a checkpoint that
    does not name its classes); "keep" never (the classifier must fit).

    Returns load_checkpoint's report plus ``"dropped_head"``: the model keys
    whose checkpoint tensors were left out (the reset classifier; they are
    also listed as ``"missing"``).
    """
    if classifier not in INIT_CLASSIFIER:
        raise ConfigError(f"model.init_classifier must be one of {INIT_CLASSIFIER}, got {classifier!r}")
    state, outer = read_checkpoint(path)  # read once, used twice
    filtered = convert_checkpoint(model, state)
    theirs, ours, names = filtered["num_classes"], model.num_classes, model.class_names
    their_names = outer.get("class_names")
    other_labels = theirs != ours or (their_names is not None and names is not None and list(their_names) != names)
    if classifier == "keep" and theirs is not None and theirs != ours:
        raise CheckpointError(f"model.init_classifier=keep but {path} has {theirs} labels and the model {ours}")
    reset = theirs is not None and (classifier == "reset" or (classifier == "auto" and other_labels))
    name = os.fspath(path) if isinstance(path, (str, os.PathLike)) else "the checkpoint"
    report = load_resetting_classifier(model, state, theirs if reset else None, name=name, source=filtered["source"])
    if verbose:
        lines = [f"init_from {path}:", format_report(report)]
        if report["dropped_head"]:
            lines.append(
                f"  reset the classifier ({theirs} -> {ours} labels, init_classifier={classifier}): "
                f"{', '.join(report['dropped_head'])}"
            )
        log.info("\n".join(lines))
    return report


def build_model(
    cfg: dict, class_names: Sequence[str] | None = None, load_weights: bool = True, verbose: bool = True
) -> nn.Module:
    """The model of a config: ``create_model(model.name, **kwargs)``, then
    ``model.pretrained`` (must fit) and ``model.init_from`` (head may differ)
    when ``load_weights``.

    Args:
        cfg: a loaded config (``gkg_pyg.config.load_config``).
        class_names: the data set's labels (fix num_classes); None uses
            model.num_classes.
        load_weights: False to skip pretrained / init_from (the caller loads
            a trained checkpoint instead).
        verbose: log what the weights loading used and skipped (INFO,
            loggers ``gkg_pyg.*``, which the scripts print).
    Raises:
        ConfigError (a ValueError): a label-count mismatch or a bad model section.
        CheckpointError (a ValueError): a checkpoint that does not fit.
        MissingFileError (a FileNotFoundError): a missing weights file.
    """
    section = cfg["model"]
    weights = section["pretrained"] if load_weights else None
    if weights is not None and not isinstance(weights, (bool, str)):
        raise ConfigError(
            f"model.pretrained must be true/false, a pretrained tag (imagenet) or a checkpoint path, got {weights!r}"
        )
    try:  # checked before the model is built
        pretrained_cfg, path, load = resolve_pretrained(section["name"], weights)
    except FileNotFoundError as err:
        raise MissingFileError(f"model.pretrained: {err}") from None
    model = create_model(section["name"], **model_kwargs(cfg, class_names))
    model.pretrained_cfg = pretrained_cfg
    if path is not None:
        if verbose:
            log.info(f"pretrained {path}:")
        load_checkpoint(model, path, verbose=verbose)
    elif load:
        load_pretrained(model, pretrained_cfg, verbose=verbose)
    if load_weights and section["init_from"]:
        init_from_checkpoint(model, section["init_from"], verbose=verbose, classifier=section["init_classifier"])
    return model


# Model settings that define the graph a set of weights was trained on; k and groups change no tensor
# shape, so a checkpoint loads into a model with other values and silently runs another graph.
GRAPH_KEYS = ("name", "k", "groups", "cross_level", "num_gcn")


def check_trained_settings(cfg: dict, checkpoint: dict, name: str) -> None:
    """Raise a ``CheckpointError`` where the config's :data:`GRAPH_KEYS` differ
    from those a training checkpoint (one holding its config) was trained with;
    other checkpoints, and other keys (``img_size`` resamples), pass."""
    trained = checkpoint.get("config")
    trained = trained.get("model") if isinstance(trained, dict) else None
    if not isinstance(trained, dict):
        return
    differ = [k for k in GRAPH_KEYS if k in trained and trained[k] != cfg["model"][k]]
    if differ:
        theirs = ", ".join(f"model.{k}={trained[k]}" for k in differ)
        ours = ", ".join(f"model.{k}={cfg['model'][k]}" for k in differ)
        raise CheckpointError(
            f"{name} was trained with {theirs}, the config has {ours}: the weights would run another graph; "
            f"use the training config or --set {' --set '.join(f'model.{k}={trained[k]}' for k in differ)}"
        )


def load_trained_model(checkpoint_path: str | Path, config_path: str | Path | None = None, ema: bool = False):
    """A trained model for inference, ``(model in eval mode, class names, config, checkpoint dict)``.

    The config comes from ``config_path`` or, by default, from the training
    checkpoint itself; the weights (the EMA copy with ``ema=True``) load strictly.
    """
    from .config import load_config, validate_config
    from .data import class_names_from_config

    _, checkpoint = read_checkpoint(checkpoint_path)
    if config_path:
        cfg = load_config(config_path)
        check_trained_settings(cfg, checkpoint, str(checkpoint_path))
    elif isinstance(checkpoint.get("config"), dict):
        cfg = validate_config(checkpoint["config"])
    else:
        raise CheckpointError(f"{checkpoint_path} holds no config (not a gkg-pyg training checkpoint): pass --config")
    class_names = list(checkpoint.get("class_names") or class_names_from_config(cfg["data"]))
    model = build_model(cfg, class_names, load_weights=False, verbose=False)
    weights = checkpoint
    if ema:
        if not isinstance(checkpoint.get("ema"), dict):
            raise CheckpointError(f"--ema: {checkpoint_path} holds no EMA weights")
        weights = checkpoint["ema"]
    load_checkpoint(model, weights, verbose=False, name=f"{checkpoint_path}{' (EMA weights)' if ema else ''}")
    return model.eval(), class_names, cfg, checkpoint
