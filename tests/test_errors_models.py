"""The models' and the model builder's user errors are gkg_pyg.errors classes
(still ValueErrors), and a script prints each as one line, ``error: <message>``,
with exit status 2: a too-small or misshapen input (InputSizeError), model
arguments, model names and pretrained requests (ConfigError), checkpoints that
do not fit or hold too little (CheckpointError), evaluation data without any
positive label (DataError), an inspection the model cannot give (UsageError).
Also: the download notice of published weights is a log record, and
``gkg_pyg.models.gkgnet`` exports only its own names."""

from __future__ import annotations

import logging

import pytest
import torch

import gkg_pyg
from gkg_pyg.builder import build_model, init_from_checkpoint, load_trained_model, model_kwargs
from gkg_pyg.cli import LOGGER, setup_logging
from gkg_pyg.config import load_config
from gkg_pyg.errors import CheckpointError, ConfigError, DataError, GkgError, InputSizeError, UsageError
from gkg_pyg.metrics import multilabel_metrics
from gkg_pyg.models import hub
from gkg_pyg.models.convert import detect_layout, filter_checkpoint
from gkg_pyg.geometry import check_input_size
from gkg_pyg.models.pvig import PyramidViG, PyramidViGBackbone
from gkg_pyg.thresholds import metrics_at_thresholds

from helpers import TINY_MODEL, build_format, run_script

NAMES = ["bird", "cat", "dog"]  # the labels of build_format's data sets, sorted


def one_error_line(capsys) -> str:
    """What the last command wrote to stderr, which must be exactly one ``error:`` line."""
    err = capsys.readouterr().err
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


def raised(cls, call, *args, **kwargs) -> str:
    """The message of the exception ``call`` raises, which must be exactly ``cls``."""
    with pytest.raises(cls) as info:
        call(*args, **kwargs)
    assert type(info.value) is cls, repr(info.value)
    assert isinstance(info.value, GkgError)
    return str(info.value)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A 4 + 2 image CSV data set, its config (gkgnet_ti, 33 x 33, k=3), a training
    checkpoint without EMA weights, a bare state dict and a checkpoint of 2 labels."""
    tmp = tmp_path_factory.mktemp("errors_models")
    root = tmp / "data"
    config = tmp / "tiny.yaml"
    config.write_text(TINY_MODEL.format(name="err", root=root, runs=tmp / "runs", data=build_format("csv_names", root)))
    cfg = load_config(config)
    torch.manual_seed(0)
    model = build_model(cfg, NAMES, load_weights=False)
    ckpt = tmp / "ckpt.pth"
    torch.save({"model": model.state_dict(), "config": cfg, "class_names": NAMES}, ckpt)
    bare = tmp / "bare.pth"
    torch.save(model.state_dict(), bare)
    two = tmp / "two_labels.pth"
    torch.save({"model": build_model(cfg, ["a", "b"], load_weights=False).state_dict()}, two)
    return {"tmp": tmp, "root": root, "config": config, "cfg": cfg, "model": model, "ckpt": ckpt, "bare": bare,
            "two": two, "image": root / "imgs" / "val" / "0.png"}  # fmt: skip


# ---------------------------------------------------------------------------
# InputSizeError: gkg_pyg/geometry.py and PyramidViGBackbone.check_input
# ---------------------------------------------------------------------------
def test_too_small_input_is_an_input_size_error(tiny):
    """Below the smallest size the model refuses the images; the size the message
    names is the first at which the model itself runs (found by trying sizes)."""
    model = tiny["model"].eval()
    smallest, messages = None, []
    with torch.no_grad():
        for size in range(24, 40):
            try:
                model(torch.zeros(1, 3, size, size))
            except InputSizeError as err:
                assert type(err) is InputSizeError and isinstance(err, ValueError)
                messages.append(str(err))
                continue
            smallest = size
            break
    assert smallest is not None and messages  # 24 is too small for k=3, something below 40 is not
    assert all(m.endswith(f"the smallest input is {smallest}x{smallest}") for m in messages), messages
    message = raised(InputSizeError, check_input_size, smallest, smallest - 1, 3)
    assert message.startswith(f"input {smallest}x{smallest - 1} is too small for k=3: stage ")
    # A model built below the smallest size: the same class, naming img_size.
    message = raised(InputSizeError, gkg_pyg.create_model, "gkgnet_ti", num_classes=3, img_size=smallest - 1, k=3)
    assert message.startswith(f"img_size {(smallest - 1, smallest - 1)} is too small for k=3")


@pytest.mark.parametrize("shape", [(3, 33, 33), (1, 1, 33, 33), (1, 4, 33, 33)])
def test_images_of_another_shape_are_an_input_size_error(tiny, shape):
    message = raised(InputSizeError, tiny["model"].check_input, torch.zeros(shape))
    assert message == f"expected images of shape (batch, 3, height, width), got {shape}"


@pytest.mark.parametrize("dtype", [torch.uint8, torch.int64, torch.bool])
def test_integer_images_are_an_input_size_error(tiny, dtype):
    """Raw pixels instead of normalised floats: named, with the transform that makes them."""
    message = raised(InputSizeError, tiny["model"], torch.zeros(1, 3, 33, 33, dtype=dtype))
    assert message.startswith(f"expected floating-point images, normalised per channel with the model's mean and std, "
                              f"got {dtype}; gkg_pyg.data.build_test_transform(img_size)")  # fmt: skip


def test_export_too_small_img_size_is_one_line(tiny, capsys):
    """export.py --img-size below the model's smallest input: the forward pass's InputSizeError."""
    code = run_script("export", "--checkpoint", tiny["ckpt"], "--output", tiny["tmp"] / "m.onnx", "--img-size", "16",
                      "--no-check")  # fmt: skip
    assert code == 2
    assert one_error_line(capsys).startswith("error: input 16x16 is too small for k=3: stage 1 ")
    assert not (tiny["tmp"] / "m.onnx").exists()


def test_config_img_size_too_small_is_one_line(tiny, capsys):
    """model.img_size is checked with the config (ConfigError), before a model is built."""
    assert run_script("train", tiny["config"], "--set", "model.img_size=20") == 2
    assert one_error_line(capsys).startswith("error: model.img_size 20 is below the smallest input for k=3")


# ---------------------------------------------------------------------------
# ConfigError: model arguments (gkgnet.py, pvig.py)
# ---------------------------------------------------------------------------
@pytest.mark.parametrize(
    "build, expected",
    [
        (lambda: gkg_pyg.create_model("gkgnet_ti", num_classes=0, img_size=33, k=3),
         "num_classes and num_gcn must be positive, got 0 and 1"),
        (lambda: gkg_pyg.create_model("gkgnet_ti", num_classes=3, num_gcn=0, img_size=33, k=3),
         "num_classes and num_gcn must be positive, got 3 and 0"),
        (lambda: gkg_pyg.create_model("gkgnet_ti", num_classes=3, class_names=["a"], img_size=33, k=3),
         "1 class names for 3 classes"),
        (lambda: PyramidViGBackbone("xl", 33, k=3), "unknown variant 'xl'; expected one of ['b', 'm', 's', 'ti']"),
        (lambda: PyramidViGBackbone("ti", 33, k=3, groups=0), "groups must be positive, got 0"),
        (lambda: PyramidViGBackbone("ti", 33, k=3, groups=5),
         "groups=5 does not divide the stage width 48 of variant 'ti'"),
        (lambda: PyramidViGBackbone("ti", 33, k=0), "k must be positive, got 0"),
        (lambda: PyramidViG("ti", num_classes=0, img_size=33, k=3), "num_classes must be positive, got 0"),
        (lambda: PyramidViG("ti", num_classes=2, img_size=33, k=3, class_names=["a"]), "1 class names for 2 classes"),
        (lambda: PyramidViG("ti", num_classes=2, img_size=33, k=3, drop_rate=1.0),
         "drop_rate must be in [0, 1), got 1.0"),
    ],
)  # fmt: skip
def test_model_arguments_are_config_errors(build, expected):
    assert raised(ConfigError, build) == expected


def test_reset_classifier_arguments_are_config_errors(tiny):
    model = gkg_pyg.create_model("gkgnet_ti", num_classes=3, img_size=33, k=3)
    assert raised(ConfigError, model.reset_classifier, 0) == "num_classes must be positive, got 0"
    assert raised(ConfigError, model.reset_classifier, 2, ["a"]) == "1 class names for 2 classes"
    assert model.num_classes == 3 and model.head_patch.out_features == 3  # nothing changed


def test_model_argument_from_the_config_is_one_line(tiny, capsys):
    """model.groups passes the config's range check but does not divide a stage width."""
    assert run_script("train", tiny["config"], "--set", "model.groups=5") == 2
    assert one_error_line(capsys) == "error: groups=5 does not divide the stage width 48 of variant 'ti'"
    assert not (tiny["tmp"] / "runs").exists()


# ---------------------------------------------------------------------------
# ConfigError: model names and pretrained requests (registry.py, hub.py)
# ---------------------------------------------------------------------------
def test_model_names_and_pretrained_requests_are_config_errors(tiny):
    message = raised(ConfigError, gkg_pyg.create_model, "gkgnet_sx")
    assert message.startswith("unknown model 'gkgnet_sx' (did you mean 'gkgnet_s'?); available: ")
    assert raised(ConfigError, gkg_pyg.create_model, "gkgnet_ti.coco_576") == (
        "gkgnet_ti has no pretrained tag 'coco_576'; its tags: ['imagenet']"
    )
    assert raised(ConfigError, gkg_pyg.create_model, "gkgnet_s.imagenet", pretrained="coco_576") == (
        "model gkgnet_s.imagenet with pretrained='coco_576': two different tags"
    )
    assert raised(ConfigError, gkg_pyg.create_model, "pvig_ti.imagenet", pretrained=str(tiny["bare"])) == (
        f"model pvig_ti.imagenet names published weights, but pretrained is a path ({tiny['bare']})"
    )
    message = raised(ConfigError, gkg_pyg.create_model, "pvig_ti", pretrained_cfg_overlay=dict(url="http://x/y.pth"))
    assert message.startswith("pretrained_cfg_overlay names weights (file= or url=) but pretrained is False")
    message = raised(ConfigError, gkg_pyg.create_model, "pvig_ti", pretrained=str(tiny["bare"]),
                     pretrained_cfg_overlay=dict(file=str(tiny["bare"])))  # fmt: skip
    assert message.endswith("is a path: pretrained_cfg_overlay file= or url= would be ignored")
    # hub.py: the cfg of published weights
    assert raised(ConfigError, hub.resolve_pretrained_cfg, "pvig_ti", "coco") == (
        "pvig_ti has no pretrained tag 'coco'; its tags: ['imagenet']"
    )
    message = raised(ConfigError, hub.resolve_pretrained_cfg, "pvig_ti", overlay={"fle": "x"})
    assert message.startswith("unknown pretrained_cfg_overlay key 'fle' (did you mean 'file'?); known: ")
    message = raised(ConfigError, hub.resolve_pretrained_cfg, "pvig_ti", overlay={"loads": "all"})
    assert message == "pretrained_cfg loads must be one of ('full', 'backbone'), got 'all'"
    cfg = hub.resolve_pretrained_cfg("pvig_ti", overlay={"url": "http://host/"})
    assert raised(ConfigError, hub.cache_path, cfg).startswith("cannot name a cache file after the URL 'http://host/'")
    # Published weights that cannot be had stay their own GkgError (an OSError)
    assert issubclass(hub.PretrainedWeightsError, GkgError) and issubclass(hub.PretrainedWeightsError, OSError)
    with pytest.raises(hub.PretrainedWeightsError, match="no direct download"):
        gkg_pyg.create_model("gkgnet_s.coco_576", pretrained=True)


@pytest.mark.parametrize(
    "name, expected",
    [
        ("gkgnet_sx", "error: unknown model 'gkgnet_sx' (did you mean 'gkgnet_s'?); available: "),
        ("gkgnet_ti.coco_576", "error: gkgnet_ti has no pretrained tag 'coco_576'; its tags: ['imagenet']"),
    ],
)
def test_model_name_from_the_config_is_one_line(tiny, capsys, name, expected):
    assert run_script("train", tiny["config"], "--set", f"model.name={name}") == 2
    assert one_error_line(capsys).startswith(expected)


# ---------------------------------------------------------------------------
# ConfigError: the model section (builder.py)
# ---------------------------------------------------------------------------
def test_model_section_mistakes_are_config_errors(tiny):
    cfg = load_config(tiny["config"], ["model.num_classes=5"])
    assert raised(ConfigError, model_kwargs, cfg, NAMES) == "model.num_classes is 5 but the data set has 3 labels"
    assert model_kwargs(cfg)["num_classes"] == 5  # without class names the config's count is used
    cfg = load_config(tiny["config"])
    assert raised(ConfigError, build_model, cfg) == "model.num_classes is not set and no class names were given"
    assert raised(ConfigError, init_from_checkpoint, tiny["model"], tiny["ckpt"], classifier="drop") == (
        "model.init_classifier must be one of ('auto', 'reset', 'keep'), got 'drop'"
    )


def test_label_count_mismatch_is_one_line(tiny, capsys):
    assert run_script("train", tiny["config"], "--set", "model.num_classes=5") == 2
    assert one_error_line(capsys) == "error: model.num_classes is 5 but the data set has 3 labels"


# ---------------------------------------------------------------------------
# CheckpointError: builder.py and models/convert.py
# ---------------------------------------------------------------------------
def test_checkpoint_mistakes_are_checkpoint_errors(tiny):
    model = build_model(tiny["cfg"], NAMES, load_weights=False)
    message = raised(CheckpointError, init_from_checkpoint, model, tiny["two"], verbose=False, classifier="keep")
    assert message == f"model.init_classifier=keep but {tiny['two']} has 2 labels and the model 3"
    assert raised(CheckpointError, load_trained_model, tiny["bare"]) == (
        f"{tiny['bare']} holds no config (not a gkg-pyg training checkpoint): pass --config"
    )
    assert raised(CheckpointError, load_trained_model, tiny["ckpt"], ema=True) == (
        f"--ema: {tiny['ckpt']} holds no EMA weights"
    )
    # convert.py: the layout of a foreign checkpoint
    odd = {"foo.weight": torch.zeros(2)}
    assert raised(CheckpointError, detect_layout, odd).startswith(
        "cannot tell the checkpoint layout from its keys (first keys: ['foo.weight'])"
    )
    assert raised(CheckpointError, filter_checkpoint, model.state_dict(), model, source="mmcls") == (
        "unknown checkpoint source 'mmcls'; expected one of ('auto', 'gkg_pyg', 'gkgnet_mmcls', 'pyramid_vig')"
    )
    # ... read as published weights: the message names the file
    path = tiny["tmp"] / "odd.pth"
    torch.save(odd, path)
    message = raised(CheckpointError, gkg_pyg.create_model, "pvig_ti", pretrained=True, img_size=33, k=3,
                     pretrained_cfg_overlay=dict(file=str(path)))  # fmt: skip
    assert message.startswith(f"{path}: cannot tell the checkpoint layout from its keys")


def test_checkpoint_mistakes_are_one_line(tiny, capsys):
    code = run_script("train", tiny["config"], "--set", f"model.init_from={tiny['two']}",
                      "--set", "model.init_classifier=keep")  # fmt: skip
    assert code == 2
    assert one_error_line(capsys) == f"error: model.init_classifier=keep but {tiny['two']} has 2 labels and the model 3"
    assert run_script("predict", "--checkpoint", tiny["bare"], tiny["image"]) == 2
    assert one_error_line(capsys) == (
        f"error: {tiny['bare']} holds no config (not a gkg-pyg training checkpoint): pass --config"
    )
    assert run_script("predict", "--checkpoint", tiny["ckpt"], "--ema", tiny["image"]) == 2
    assert one_error_line(capsys) == f"error: --ema: {tiny['ckpt']} holds no EMA weights"
    path = tiny["tmp"] / "odd_layout.pth"
    torch.save({"foo.weight": torch.zeros(2)}, path)
    assert run_script("train", tiny["config"], "--set", f"model.pretrained={path}") == 2
    assert one_error_line(capsys).startswith(f"error: {path}: cannot tell the checkpoint layout from its keys")


# ---------------------------------------------------------------------------
# DataError (metrics.py, thresholds.py) and UsageError (inspect.py)
# ---------------------------------------------------------------------------
def test_no_positive_label_is_a_data_error():
    scores, targets = torch.rand(4, 3).numpy(), torch.zeros(4, 3).numpy()
    assert raised(DataError, multilabel_metrics, scores, targets) == "no class has a positive label: mAP is undefined"
    assert raised(DataError, metrics_at_thresholds, scores, targets, 0.5) == "no class has a positive label"
    targets[1, 2] = 1  # one positive: both compute
    assert multilabel_metrics(scores, targets)["classes_without_positives"] == [0, 1]
    assert set(metrics_at_thresholds(scores, targets, 0.5)) >= {"CF1", "OF1"}


def test_evaluating_a_split_without_positives_is_one_line(tiny, capsys):
    (tiny["root"] / "val_negative.csv").write_text("image,labels\nimgs/val/0.png,\nimgs/val/1.png,\n")
    code = run_script("evaluate", tiny["config"], "--checkpoint", tiny["ckpt"], "--output", tiny["tmp"] / "eval",
                      "--set", "data.csv.val=val_negative.csv", "--set", "data.empty_labels=keep")  # fmt: skip
    assert code == 2
    assert one_error_line(capsys) == "error: no class has a positive label: mAP is undefined"


def test_inspecting_what_the_model_lacks_is_a_usage_error(tiny, capsys):
    from gkg_pyg import inspect as gi

    model = gkg_pyg.create_model("gkgnet_ti", num_classes=3, img_size=33, k=3, cross_level=False)
    captured = gi.capture_graphs(model, torch.zeros(3, 33, 33))
    assert raised(UsageError, gi.label_neighbours, captured, 1) == (
        "these graphs have no label nodes (a model built with cross_level=False)"
    )
    assert raised(UsageError, gi.neighbour_count_distribution, tiny["model"], [], progress=False) == (
        "no images to count over"
    )
    code = run_script("inspect_graphs", "--config", tiny["config"], "--image", tiny["image"],
                      "--out", tiny["tmp"] / "inspect", "--set", "model.cross_level=false")  # fmt: skip
    assert code == 2
    assert one_error_line(capsys) == "error: these graphs have no label nodes (a model built with cross_level=False)"


# ---------------------------------------------------------------------------
# The download notice (hub.py) and gkgnet.py's exports
# ---------------------------------------------------------------------------
def test_download_notice_is_a_warning_record(tmp_path, monkeypatch, caplog, capsys):
    """fetch_pretrained announces a download as a WARNING of gkg_pyg.models.hub
    (shown without any logging set up); the scripts print it as one stderr line."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    monkeypatch.setattr(torch.hub, "_hub_dir", None)
    weights = {"w": torch.arange(3.0)}

    def fake_download(url, dst, progress=None):  # what download() returns: a complete file next to dst
        dst.parent.mkdir(parents=True, exist_ok=True)
        tmp = dst.with_name(dst.name + ".partial")
        torch.save(weights, tmp)
        return tmp

    monkeypatch.setattr(hub, "download", fake_download)
    url = "http://127.0.0.1:9/release/w.pth"
    cfg = hub.resolve_pretrained_cfg("pvig_ti", overlay={"url": url})
    dst = hub.cache_path(cfg)
    caplog.set_level(logging.INFO, logger=LOGGER)
    logger = logging.getLogger(LOGGER)
    handlers, level = list(logger.handlers), logger.level
    try:
        setup_logging()
        checkpoint, where = hub.fetch_pretrained(cfg)
    finally:  # leave the logger as it was for the other tests
        logger.handlers[:], logger.level = handlers, level
    assert torch.equal(checkpoint["w"], weights["w"]) and where == str(dst)
    records = [r for r in caplog.records if r.name == "gkg_pyg.models.hub"]
    expected = f"downloading the pretrained weights of pvig_ti.imagenet: {url} -> {dst}"
    assert [(r.levelno, r.getMessage()) for r in records] == [(logging.WARNING, expected)]
    printed = capsys.readouterr()
    assert printed.err == f"warning: {expected}\n" and printed.out == ""
    # From the cache: no download, no notice; verbose=False: no notice either.
    caplog.clear()
    hub.fetch_pretrained(cfg)
    dst.unlink()
    hub.fetch_pretrained(cfg, verbose=False)
    assert dst.is_file() and not [r for r in caplog.records if r.name == "gkg_pyg.models.hub"]


def test_gkgnet_exports_its_own_names_only():
    from gkg_pyg import geometry
    from gkg_pyg.models import gkgnet, positions, pvig

    moved = {"POOL": geometry, "stage_grids": geometry, "relative_position_table": positions, "VARIANTS": pvig,
             "Stage": pvig}  # fmt: skip
    assert not set(moved) & set(gkgnet.__all__)
    assert all(hasattr(module, name) and name in module.__all__ for name, module in moved.items())
    assert all(hasattr(gkgnet, name) for name in gkgnet.__all__)
