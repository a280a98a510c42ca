"""Experiment configuration: YAML files over a schema of defaults.

A config is a nested dict with the sections of ``DEFAULTS`` (model, data,
train, optim, schedule, loss, eval, output) plus ``name`` and ``seed``.
``load_config`` reads a YAML file, merges it over the defaults, applies
``key=value`` overrides and checks every key and type, so a typo fails at
once with the nearest valid key suggested.

Inheritance: a top-level ``base: other.yaml`` (a path relative to the file)
loads that file first and merges this one over it (nested dicts merge key
by key; any other value, lists included, replaces). Bases may chain.

This module reads and checks configs only; ``gkg_pyg.builder.build_model``
turns one into a model.
"""

from __future__ import annotations

import copy
import difflib
import math
from pathlib import Path
from typing import Any, Iterable, Sequence

import yaml

from .errors import ConfigError, MissingFileError
from .geometry import min_input_size

# The smallest image the synthetic data set draws (its shapes need the room).
SYNTHETIC_MIN_IMAGE_SIZE = 64

# Every valid key with its default. A value must have the default's type (an
# int is accepted for a float) or be None where the key is listed in NULLABLE;
# a key whose default is None takes None or a value of its type in NULL_DEFAULT_TYPES.
DEFAULTS: dict[str, Any] = {
    "name": "run",  # run folder: <output.dir>/<name>
    "seed": 0,
    # multi_label: sigmoid scores per label (GKGNet); single_label: one class per
    # image, softmax (Pyramid ViG on image folders / CIFAR; the single_label section).
    "task": "multi_label",
    "model": {
        "name": "gkgnet_s",
        "num_classes": None,  # None: the data set's label count (else it must match)
        "img_size": 448,
        "k": 9,
        "groups": 2,
        "drop_path": 0.1,
        "cross_level": True,
        "num_gcn": 1,
        "drop_rate": 0.0,  # pvig_* only: dropout in the classification head
        "knn_backend": "auto",
        # Blocks per stage, e.g. [1, 1, 3, 1] (None: the variant's; no published weights fit other depths).
        "depths": None,
        # Weights that must fit the model completely (a Pyramid ViG ImageNet
        # checkpoint fills the patch path; see gkg_pyg.load_checkpoint).
        "pretrained": None,
        # Weights of a model trained on other labels (e.g. COCO for VOC):
        # everything must fit except the label table and the heads, which
        # are skipped when their shapes differ.
        "init_from": None,
        # What init_from does with the checkpoint's label embedding and heads:
        # auto (a fresh classifier when the label count or the checkpoint's
        # class names differ from the data set's) | reset (always: a new label
        # set) | keep (they must fit).
        "init_classifier": "auto",
    },
    "data": {
        "name": "coco",  # coco | voc2007 | synthetic | csv (data/README.md)
        "root": "data/coco",
        "train_split": "train",  # coco: train, train2014, train2017, ... (found under root)
        "val_split": "val",
        # coco: an explicit instances JSON and image folder per role (relative
        # to root; both or neither; null: found under root from the split).
        # csv: image_dir is the folder the CSV's image paths are relative to (null: root).
        "ann_file": {"train": None, "val": None},
        "image_dir": {"train": None, "val": None},
        # csv: one row per image (data/README.md); train / val are CSV files
        # relative to root; classes: a list or a text file, null: from the training CSV.
        "csv": {
            "train": None,
            "val": None,
            "format": "names",  # names (a labels column) | columns (one 0/1 column per class)
            "classes": None,
            "image_column": "image",
            "labels_column": "labels",
            "delimiter": ",",  # between columns ("\t" for TSV)
            "label_delimiter": " ",  # between names in the labels column (blank: any whitespace)
        },
        # coco / csv: images without any label: drop | keep (all-negative) | error.
        "empty_labels": "drop",
        # Before anything is written, every image is checked: exists (the file
        # is there) | header (PIL identifies it) | decode (it decodes completely).
        "check_images": "decode",
        "num_workers": 4,
        "skip_bad_images": False,  # leave bad images out (counted) instead of stopping
        "class_balanced_threshold": 0.01,  # None: no oversampling
        # Only for name: synthetic (generated under root when missing).
        "synthetic": {"num_train": 2000, "num_val": 500, "image_size": 256, "seed": 0},
        # Training augmentation (gkg_pyg.data.build_train_transform).
        "augment": {
            "cropmix_prob": 0.5,
            "cropmix_crops": [2, 3, 4],
            "cropmix_min_scale": 0.01,
            "cropmix_mix_ratio": 0.4,
            "cropmix_channel_permute": True,
            "hflip": 0.5,
            "color_jitter": 0.4,
            "trivial_augment": True,
            "random_erasing": 0.5,
        },
    },
    "train": {
        "epochs": 80,
        "batch_size": 16,  # per process (GPU) and forward pass
        # Batches per optimizer step (gradient accumulation): the total batch is
        # batch_size x accumulate x processes; the paper's is 128 (8 GPUs x 16).
        "accumulate": 1,
        "amp": "fp16",  # fp16 | bf16 | none; on the CPU bf16 autocasts, fp16 and none run float32
        "clip_grad": 5.0,  # max L2 norm of all gradients; None: no clipping
        "sync_bn": True,  # SyncBatchNorm when distributed on GPUs
        "ema": False,
        "ema_decay": 0.9998,
        "ema_warmup": False,
        "num_threads": None,  # torch CPU threads per process; None: torch's default
        "stop_after_epochs": None,  # stop (like a kill) once this many epochs are done
    },
    "optim": {
        "name": "adamw",  # adamw | sgd (with momentum; the CIFAR / Flowers recipes of Table 5)
        "lr": 1.0e-4,
        "momentum": 0.9,  # sgd only
        "betas": [0.9, 0.999],
        "weight_decay": 0.05,
        "eps": 1.0e-8,
        # true: what the authors ran (only norms and biases undecayed); false: the
        # model's no_weight_decay() parameters (position and label embeddings) too.
        "decay_embeddings": True,
    },
    "schedule": {
        "name": "step",  # step | cosine; stepped every iteration
        "warmup_epochs": 5.0,
        "warmup_ratio": 1.0e-3,  # warm-up starts at warmup_ratio x lr
        "milestones": [10, 50],  # step: epochs where the lr is multiplied by gamma
        "gamma": 0.1,
        "min_lr_ratio": 0.0,  # cosine: final lr = min_lr_ratio x lr
    },
    "loss": {
        "bce_weight": 1.0,
        "asl_weight": 10.0,
        "label_smoothing": 0.1,
        "gamma_pos": 0.0,
        "gamma_neg": 2.0,
        "clip": 0.05,
        "eps": 1.0e-8,
    },
    # task single_label only: timm's transforms (gkg_pyg.data.single_label.single_label_transform)
    # and Mixup/CutMix (gkg_pyg.single_label.MixupCutmix); the smoothing is loss.label_smoothing.
    "single_label": {
        "mixup_alpha": 0.0,  # Mixup / CutMix (timm, batch mode); both 0: off
        "cutmix_alpha": 0.0,
        "mix_prob": 1.0,  # share of the batches mixed
        "switch_prob": 0.5,  # CutMix instead of Mixup when both are on
        "crop_scale": [0.08, 1.0],  # RandomResizedCrop's area range ([1, 1] and ratio [1, 1]: a plain resize)
        "crop_ratio": [0.75, 1.3333333],
        "hflip": 0.5,
        "auto_augment": None,  # a timm policy, e.g. rand-m9-mstd0.5-inc1 (then no colour jitter)
        "color_jitter": 0.0,
        "random_erasing": 0.0,
        "eval_crop_pct": 1.0,  # evaluation: resize to img_size / eval_crop_pct, centre crop img_size
    },
    "eval": {
        "batch_size": 32,
        "threshold": 0.5,  # in [0, 1]: a label is predicted when its score is >= the threshold
        # evaluate.py --choose-thresholds: a class gets its own threshold only with at least this many
        # positives in the calibration split; the others use the global one (gkg_pyg.thresholds).
        "min_positives": 10,
        "interval": 1,  # evaluate every this many epochs (and after the last)
    },
    "output": {
        "dir": "runs",
        "tensorboard": False,
        "progress": True,
    },
}

NULLABLE = {
    "model.pretrained", "model.init_from", "data.class_balanced_threshold",
    "train.clip_grad", "train.num_threads", "train.stop_after_epochs",
    "single_label.auto_augment",
}  # fmt: skip
NULL_DEFAULT_TYPES = {
    "model.num_classes": int,
    "model.pretrained": (str, bool),
    "model.init_from": str,
    "model.depths": list,
    "data.ann_file.train": str,
    "data.ann_file.val": str,
    "data.image_dir.train": str,
    "data.image_dir.val": str,
    "data.csv.train": str,
    "data.csv.val": str,
    "data.csv.classes": (list, str),
    "train.num_threads": int,
    "train.stop_after_epochs": int,
    "single_label.auto_augment": str,
}
CHOICES = {
    "data.name": ("coco", "voc2007", "synthetic", "csv", "image_folder", "cifar10", "cifar100", "synthetic_shapes"),
    "task": ("multi_label", "single_label"),
    "optim.name": ("adamw", "sgd"),
    "data.empty_labels": ("drop", "keep", "error"),
    "data.check_images": ("exists", "header", "decode"),
    "data.csv.format": ("names", "columns"),
    "train.amp": ("fp16", "bf16", "none"),
    "schedule.name": ("step", "cosine"),
    "model.knn_backend": ("auto", "dense", "torch_cluster"),
    "model.init_classifier": ("auto", "reset", "keep"),
}


def _flat_keys(tree: dict, prefix: str = "") -> list[str]:
    keys = []
    for key, value in tree.items():
        keys.append(prefix + key)
        if isinstance(value, dict):
            keys.extend(_flat_keys(value, f"{prefix}{key}."))
    return keys


def _unknown_key_error(path: str, source: str) -> ConfigError:
    valid = _flat_keys(DEFAULTS)
    close = difflib.get_close_matches(path, valid, n=1, cutoff=0.5)
    if not close:  # a typo in the last part only: compare against the section's keys
        section, _, last = path.rpartition(".")
        siblings = [k for k in valid if k.rpartition(".")[0] == section]
        tails = difflib.get_close_matches(last, [k.rpartition(".")[2] for k in siblings], n=1, cutoff=0.5)
        close = [f"{section}.{tails[0]}" if section else tails[0]] if tails else []
    hint = f"; did you mean {close[0]!r}?" if close else ""
    return ConfigError(f"unknown config key {path!r} in {source}{hint}")


# Whether a value has a type of the schema: an int is a float too, a bool is neither.
_HAS_TYPE = {
    bool: lambda v: isinstance(v, bool),
    int: lambda v: isinstance(v, int) and not isinstance(v, bool),
    float: lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
    str: lambda v: isinstance(v, str),
    list: lambda v: isinstance(v, list),
    dict: lambda v: isinstance(v, dict),
}
_TYPE_NAMES = {int: "an int", str: "a string", bool: "true/false", list: "a list"}


def _check_value(path: str, value: Any, default: Any, source: str) -> None:
    if value is None:
        if default is not None and path not in NULLABLE:
            raise ConfigError(f"{path} may not be null ({source})")
        return
    if default is None:  # every such key is listed in NULL_DEFAULT_TYPES
        kinds = NULL_DEFAULT_TYPES[path]
        kinds = kinds if isinstance(kinds, tuple) else (kinds,)
        if not any(_HAS_TYPE[kind](value) for kind in kinds):
            names = " or ".join(_TYPE_NAMES[kind] for kind in kinds)
            raise ConfigError(f"{path} must be null or {names}, got {value!r} ({source})")
        return
    if not _HAS_TYPE[type(default)](value):
        raise ConfigError(
            f"{path} must be a {type(default).__name__} (like its default {default!r}), got {value!r} ({source})"
        )
    if path in CHOICES and value not in CHOICES[path]:
        raise ConfigError(f"{path} must be one of {CHOICES[path]}, got {value!r} ({source})")


def _merge(base: dict, update: dict, schema: dict, source: str, prefix: str = "") -> dict:
    """Merge ``update`` over ``base`` (both nested dicts) in place, checking
    every key of ``update`` against ``schema``. Returns ``base``."""
    if not isinstance(update, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'the config'} must be a mapping, got {update!r} ({source})")
    for key, value in update.items():
        path = f"{prefix}{key}"
        if not isinstance(key, str) or key not in schema:
            raise _unknown_key_error(path, source)
        default = schema[key]
        if isinstance(default, dict):
            if not isinstance(value, dict):
                raise ConfigError(f"{path} must be a mapping of {sorted(default)}, got {value!r} ({source})")
            _merge(base[key], value, default, source, path + ".")
        else:
            value = _yaml_float(value) if isinstance(default, float) else value
            _check_value(path, value, default, source)
            base[key] = value
    return base


def _yaml_float(value: Any) -> Any:
    """PyYAML reads ``1e-4`` (no dot) as a string; a float key takes it as 1e-4."""
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    return value


def _read_yaml(path: Path) -> dict:
    if not path.is_file():
        raise MissingFileError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise ConfigError(f"cannot parse config file {path}: {err}") from err
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping, got {type(data).__name__}")
    return data


def _load_tree(path: Path, seen: tuple[Path, ...] = ()) -> list[tuple[dict, str]]:
    """The YAML mappings of ``path`` and its chain of bases, base first,
    each with its file name (for error messages)."""
    path = path.resolve()
    if path in seen:
        raise ConfigError(f"config inheritance loop: {' -> '.join(map(str, seen + (path,)))}")
    data = _read_yaml(path)
    base = data.pop("base", None)
    chain = []
    if base is not None:
        if not isinstance(base, str):
            raise ConfigError(f"base must be a file name, got {base!r} ({path})")
        chain = _load_tree(path.parent / base, seen + (path,))
    return chain + [(data, str(path))]


def parse_override(item: str) -> tuple[str, Any]:
    """``"train.epochs=3"`` -> ("train.epochs", 3); the value is parsed as a
    YAML scalar or flow collection (``null``, ``true``, ``1e-3``, ``[5, 50]``)."""
    key, sep, text = item.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError(f"override {item!r} must look like key=value (e.g. train.epochs=3)")
    try:
        value = yaml.safe_load(text) if text.strip() else None
    except yaml.YAMLError as err:
        raise ConfigError(f"cannot parse the value of override {item!r}: {err}") from err
    return key, value


def add_override_argument(parser, help: str = "override a config value (repeatable)") -> None:
    """The scripts' shared ``--set KEY=VALUE`` option (collected in ``args.overrides``, for :func:`apply_overrides`)."""
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help=help)


def apply_overrides(cfg: dict, overrides: Iterable[str]) -> dict:
    """Apply ``key=value`` overrides to ``cfg`` in place (checked like a
    config file); returns cfg."""
    for item in overrides:
        key, value = parse_override(item)
        update: Any = value
        for part in reversed(key.split(".")):
            update = {part: update}
        _merge(cfg, update, DEFAULTS, f"override {item!r}")
    return cfg


def check_option(key: str, value: Any, option: str) -> Any:
    """Check a command-line option that stands for config key ``key`` (e.g.
    predict.py's ``--threshold`` for ``eval.threshold``) with the very checks
    a config value gets: the key's type, then ``check_values``' range.

    Returns the value as a config holds it (``"0.3"`` -> 0.3 for a float key).
    Raises ConfigError naming the option, e.g. ``--threshold 1.5:
    eval.threshold must be in [0, 1], got 1.5``.
    """
    update: Any = value
    for part in reversed(key.split(".")):
        update = {part: update}
    cfg = default_config()
    try:
        _merge(cfg, update, DEFAULTS, f"option {option}")
        check_values(cfg)
    except ConfigError as err:
        message = str(err)
        raise ConfigError(message if option in message else f"{option} {value}: {message}") from None
    for part in key.split("."):
        cfg = cfg[part]
    return cfg


def default_config() -> dict:
    """A deep copy of ``DEFAULTS``."""
    return copy.deepcopy(DEFAULTS)


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


# Data sets of task single_label (gkg_pyg.data.single_label); every other data.name is multi-label.
SINGLE_LABEL_DATASETS = ("image_folder", "cifar10", "cifar100", "synthetic_shapes")


def _check_single_label(cfg: dict) -> None:
    """The task and the data set agree; the single_label section's ranges."""
    d, m, o, sl = cfg["data"], cfg["model"], cfg["optim"], cfg["single_label"]
    single = cfg["task"] == "single_label"
    _require(
        single == (d["name"] in SINGLE_LABEL_DATASETS),
        f"data.name {d['name']!r} is a {'single' if d['name'] in SINGLE_LABEL_DATASETS else 'multi'}-label "
        f"data set but task is {cfg['task']!r} (single-label data sets: {', '.join(SINGLE_LABEL_DATASETS)})",
    )
    _require(
        not single or d["class_balanced_threshold"] is None,
        "data.class_balanced_threshold must be null for task single_label (it oversamples rare labels of "
        "multi-label images)",
    )
    _require(0 <= m["drop_rate"] < 1, f"model.drop_rate must be in [0, 1), got {m['drop_rate']}")
    _require(o["momentum"] >= 0, f"optim.momentum must be >= 0, got {o['momentum']}")
    for key in ("mixup_alpha", "cutmix_alpha", "color_jitter"):
        _require(sl[key] >= 0, f"single_label.{key} must be >= 0, got {sl[key]}")
    for key in ("mix_prob", "switch_prob", "hflip", "random_erasing"):
        _require(0 <= sl[key] <= 1, f"single_label.{key} must be in [0, 1], got {sl[key]}")
    for key, upper in (("crop_scale", 1.0), ("crop_ratio", float("inf"))):
        v = sl[key]
        _require(
            len(v) == 2 and all(isinstance(x, (int, float)) for x in v) and 0 < v[0] <= v[1] <= upper,
            f"single_label.{key} must be two increasing numbers in (0, {upper:g}], got {v}",
        )
    _require(0 < sl["eval_crop_pct"] <= 1, f"single_label.eval_crop_pct must be in (0, 1], got {sl['eval_crop_pct']}")


def check_values(cfg: dict) -> None:
    """Range checks the types alone do not cover (a ConfigError names the key)."""
    m, d, t, o, s, e = (cfg[k] for k in ("model", "data", "train", "optim", "schedule", "eval"))
    for key in ("k", "groups", "num_gcn"):
        _require(m[key] >= 1, f"model.{key} must be >= 1, got {m[key]}")
    _require(
        m["img_size"] >= min_input_size(m["k"]),
        f"model.img_size {m['img_size']} is below the smallest input for k={m['k']}, {min_input_size(m['k'])}",
    )
    for key, value in (
        ("train.epochs", t["epochs"]),
        ("train.batch_size", t["batch_size"]),
        ("train.accumulate", t["accumulate"]),
        ("eval.batch_size", e["batch_size"]),
        ("eval.interval", e["interval"]),
    ):
        _require(value >= 1, f"{key} must be >= 1, got {value}")
    _require(d["num_workers"] >= 0, f"data.num_workers must be >= 0, got {d['num_workers']}")
    threshold = d["class_balanced_threshold"]
    _require(threshold is None or threshold > 0, f"data.class_balanced_threshold must be > 0, got {threshold}")
    _require(o["lr"] > 0, f"optim.lr must be > 0, got {o['lr']}")
    _require(o["weight_decay"] >= 0, f"optim.weight_decay must be >= 0, got {o['weight_decay']}")
    _require(
        len(o["betas"]) == 2 and all(isinstance(b, (int, float)) and 0 <= b < 1 for b in o["betas"]),
        f"optim.betas must be two numbers in [0, 1), got {o['betas']}",
    )
    _require(s["warmup_epochs"] >= 0, f"schedule.warmup_epochs must be >= 0, got {s['warmup_epochs']}")
    _require(0 < s["warmup_ratio"] <= 1, f"schedule.warmup_ratio must be in (0, 1], got {s['warmup_ratio']}")
    _require(
        all(isinstance(x, int) and x >= 0 for x in s["milestones"]) and s["milestones"] == sorted(s["milestones"]),
        f"schedule.milestones must be increasing epoch numbers, got {s['milestones']}",
    )
    _require(s["gamma"] > 0, f"schedule.gamma must be > 0, got {s['gamma']}")
    _require(0 <= s["min_lr_ratio"] <= 1, f"schedule.min_lr_ratio must be in [0, 1], got {s['min_lr_ratio']}")
    _require(0 < t["ema_decay"] < 1, f"train.ema_decay must be in (0, 1), got {t['ema_decay']}")
    for key in ("clip_grad", "num_threads", "stop_after_epochs"):
        _require(t[key] is None or t[key] > 0, f"train.{key} must be > 0 or null, got {t[key]}")
    # Values that pass the type check but cannot work.
    for key, value in _flat_items(cfg):
        finite = not isinstance(value, float) or math.isfinite(value)
        _require(finite, f"{key} must be a finite number, got {value}")
    _require(o["eps"] > 0, f"optim.eps must be > 0, got {o['eps']}")
    _require(0 <= e["threshold"] <= 1, f"eval.threshold must be in [0, 1], got {e['threshold']}")
    _require(e["min_positives"] >= 1, f"eval.min_positives must be >= 1, got {e['min_positives']}")
    _require(threshold is None or threshold <= 1, f"data.class_balanced_threshold must be <= 1, got {threshold}")
    _require(
        m["num_classes"] is None or m["num_classes"] >= 1, f"model.num_classes must be >= 1, got {m['num_classes']}"
    )
    _require(0 <= m["drop_path"] < 1, f"model.drop_path must be in [0, 1), got {m['drop_path']}")
    _check_single_label(cfg)
    loss = cfg["loss"]
    _require(
        0 <= loss["label_smoothing"] < 0.5, f"loss.label_smoothing must be in [0, 0.5), got {loss['label_smoothing']}"
    )
    for key in ("bce_weight", "asl_weight", "gamma_pos", "gamma_neg"):
        _require(loss[key] >= 0, f"loss.{key} must be >= 0, got {loss[key]}")
    _require(loss["bce_weight"] + loss["asl_weight"] > 0, "loss.bce_weight and loss.asl_weight may not both be 0")
    _require(0 <= loss["clip"] < 1, f"loss.clip must be in [0, 1), got {loss['clip']}")
    _require(loss["eps"] > 0, f"loss.eps must be > 0, got {loss['eps']}")
    aug = d["augment"]
    for key in ("cropmix_prob", "hflip", "random_erasing", "cropmix_mix_ratio"):
        _require(0 <= aug[key] <= 1, f"data.augment.{key} must be in [0, 1], got {aug[key]}")
    _require(
        0 < aug["cropmix_min_scale"] <= 1,
        f"data.augment.cropmix_min_scale must be in (0, 1], got {aug['cropmix_min_scale']}",
    )
    _require(aug["color_jitter"] >= 0, f"data.augment.color_jitter must be >= 0, got {aug['color_jitter']}")
    crops = aug["cropmix_crops"]
    _require(
        isinstance(crops, list) and crops and all(type(n) is int and n >= 2 for n in crops),
        f"data.augment.cropmix_crops must be a non-empty list of crop counts >= 2, got {crops}",
    )
    syn = d["synthetic"]
    for key in ("num_train", "num_val"):
        _require(syn[key] >= 1, f"data.synthetic.{key} must be >= 1, got {syn[key]}")
    size, least = syn["image_size"], SYNTHETIC_MIN_IMAGE_SIZE
    _require(size >= least, f"data.synthetic.image_size must be >= {least}, got {size}")


def _flat_items(tree: dict, prefix: str = ""):
    """(dotted key, value) of every leaf of a nested dict."""
    for key, value in tree.items():
        if isinstance(value, dict):
            yield from _flat_items(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


def load_config(path: str | Path | None = None, overrides: Sequence[str] = ()) -> dict:
    """Defaults, then the YAML file (after its ``base`` chain), then overrides.

    Args:
        path: a YAML file, or None for the defaults alone.
        overrides: ``"section.key=value"`` strings.
    Raises:
        FileNotFoundError: a missing file (or base file).
        ConfigError (a ValueError): unparsable YAML (naming the file), an
            unknown key (with the nearest valid key), a wrong type, a value
            out of range (``check_values``).
    """
    cfg = default_config()
    if path is not None:
        for data, source in _load_tree(Path(path)):
            _merge(cfg, data, DEFAULTS, source)
    apply_overrides(cfg, overrides)
    check_values(cfg)
    return cfg


def validate_config(cfg: dict) -> dict:
    """Check a config dict (e.g. one stored in a checkpoint) against the
    schema; returns it merged over the defaults."""
    merged = _merge(default_config(), cfg, DEFAULTS, "the config")
    check_values(merged)
    return merged


def save_config(cfg: dict, path: str | Path) -> None:
    """Write the resolved config as YAML (no ``base``: every key spelled out)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(cfg, sort_keys=False, default_flow_style=None))


def config_diff(a: dict, b: dict, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two configs."""
    out = []
    for key in sorted(set(a) | set(b)):
        va, vb = a.get(key), b.get(key)
        if isinstance(va, dict) and isinstance(vb, dict):
            out.extend(config_diff(va, vb, f"{prefix}{key}."))
        elif va != vb:
            out.append(f"{prefix}{key}")
    return out
