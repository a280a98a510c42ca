"""YAML configs: schema, errors, overrides, inheritance, the shipped configs,
build_model and init_from."""

import re
from pathlib import Path

import pytest
import torch

from gkg_pyg.builder import build_model, init_from_checkpoint
from gkg_pyg.config import (
    DEFAULTS, ConfigError, check_option, config_diff, load_config, save_config, validate_config,
)  # fmt: skip
from gkg_pyg.errors import GkgError, MissingFileError

CONFIGS = Path(__file__).resolve().parents[1] / "experiments" / "configs"
SHIPPED = sorted(CONFIGS.glob("*.yaml"))
TINY_MODEL = "model: {name: gkgnet_ti, img_size: 33, k: 3}\n"


def write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_defaults_alone():
    cfg = load_config()
    assert cfg == DEFAULTS and cfg is not DEFAULTS
    cfg["train"]["epochs"] = 1
    assert DEFAULTS["train"]["epochs"] == 80  # a deep copy


@pytest.mark.parametrize(
    "text, bad, suggestion",
    [
        ("train: {epoch: 3}\n", "train.epoch", "train.epochs"),
        ("modle: {k: 3}\n", "modle", "model"),
        ("optim: {weight_decy: 0.1}\n", "optim.weight_decy", "optim.weight_decay"),
        ("data: {augment: {hflp: 0.2}}\n", "data.augment.hflp", "data.augment.hflip"),
    ],
)
def test_unknown_key_suggests_nearest(tmp_path, text, bad, suggestion):
    path = write(tmp_path, "c.yaml", text)
    with pytest.raises(ConfigError) as err:
        load_config(path)
    message = str(err.value)
    assert repr(bad) in message and repr(suggestion) in message and str(path) in message


def test_unknown_override_suggests_nearest():
    with pytest.raises(ConfigError, match="'schedule.milestones'"):
        load_config(None, ["schedule.milestone=[1, 2]"])


def test_bad_yaml_names_the_file(tmp_path):
    path = write(tmp_path, "broken.yaml", "model:\n  k: [1, 2\ntrain: {epochs: 3}\n")
    with pytest.raises(ConfigError, match="broken.yaml"):
        load_config(path)
    with pytest.raises(ConfigError, match="must hold a mapping"):
        load_config(write(tmp_path, "list.yaml", "- 1\n- 2\n"))
    with pytest.raises(FileNotFoundError, match="nothere.yaml"):
        load_config(tmp_path / "nothere.yaml")


def test_type_and_range_errors(tmp_path):
    with pytest.raises(ConfigError, match="train.epochs must be a int"):
        load_config(None, ["train.epochs=three"])
    with pytest.raises(ConfigError, match="train.epochs may not be null"):
        load_config(None, ["train.epochs=null"])
    # Keys whose default is null take null or a value of their type (no traceback from a later comparison).
    for override, message in (
        ("train.num_threads=abc", "train.num_threads must be null or an int, got 'abc'"),
        ("train.num_threads=true", "train.num_threads must be null or an int, got True"),
        ("train.stop_after_epochs=1.5", "train.stop_after_epochs must be null or an int, got 1.5"),
        ("model.num_classes=abc", "model.num_classes must be null or an int"),
        ("single_label.auto_augment=5", "single_label.auto_augment must be null or a string, got 5"),
        ("data.csv.classes=5", "data.csv.classes must be null or a list or a string, got 5"),
    ):
        with pytest.raises(ConfigError, match=re.escape(message)):
            load_config(None, [override])
    for override in ("train.num_threads=2", "model.pretrained=imagenet", "data.csv.classes=[a, b]"):
        load_config(None, [override])
    # Every key whose default is null has its type listed.
    from gkg_pyg.config import DEFAULTS, NULL_DEFAULT_TYPES

    def null_keys(tree, prefix=""):
        for key, value in tree.items():
            if isinstance(value, dict):
                yield from null_keys(value, f"{prefix}{key}.")
            elif value is None:
                yield prefix + key

    assert set(null_keys(DEFAULTS)) == set(NULL_DEFAULT_TYPES)
    with pytest.raises(ConfigError, match="train.amp must be one of"):
        load_config(None, ["train.amp=fp8"])
    with pytest.raises(ConfigError, match="must be a mapping"):
        load_config(None, ["model=gkgnet_ti"])
    with pytest.raises(ConfigError, match="optim.lr must be > 0"):
        load_config(None, ["optim.lr=0"])
    with pytest.raises(ConfigError, match="smallest input for k=9, 65"):
        load_config(None, ["model.img_size=64"])
    with pytest.raises(ConfigError, match="milestones must be increasing"):
        load_config(None, ["schedule.milestones=[50, 10]"])
    with pytest.raises(ConfigError, match="key=value"):
        load_config(None, ["train.epochs"])


@pytest.mark.parametrize(
    "override, message",
    [
        ("optim.lr=.inf", "optim.lr must be a finite number, got inf"),
        ("optim.lr=.nan", "optim.lr must be > 0, got nan"),
        ("optim.lr=-1e-4", "optim.lr must be > 0"),
        ("optim.weight_decay=.inf", "optim.weight_decay must be a finite number"),
        ("optim.eps=0", "optim.eps must be > 0"),
        ("eval.threshold=-0.1", r"eval.threshold must be in \[0, 1\], got -0.1"),
        ("eval.threshold=1.5", r"eval.threshold must be in \[0, 1\], got 1.5"),
        ("eval.min_positives=0", "eval.min_positives must be >= 1, got 0"),
        ("data.class_balanced_threshold=2", "data.class_balanced_threshold must be <= 1"),
        ("train.accumulate=0", "train.accumulate must be >= 1"),
        ("train.clip_grad=.inf", "train.clip_grad must be a finite number"),
        ("model.k=0", "model.k must be >= 1"),
        ("model.drop_path=1.0", r"model.drop_path must be in \[0, 1\)"),
        ("model.num_classes=0", "model.num_classes must be >= 1"),
        ("loss.label_smoothing=0.5", "loss.label_smoothing must be in"),
        ("loss.eps=0", "loss.eps must be > 0"),
        ("loss.gamma_neg=-1", "loss.gamma_neg must be >= 0"),
        ("data.augment.hflip=1.5", "data.augment.hflip must be in"),
        ("data.augment.cropmix_min_scale=0", "data.augment.cropmix_min_scale must be in"),
        ("data.synthetic.num_val=0", "data.synthetic.num_val must be >= 1"),
        ("data.synthetic.image_size=48", "data.synthetic.image_size must be >= 64, got 48"),
        ("data.augment.cropmix_crops=[]", r"cropmix_crops must be a non-empty list of crop counts >= 2, got \[\]"),
        ("data.augment.cropmix_crops=[1]", r"cropmix_crops must be a non-empty list of crop counts >= 2, got \[1\]"),
        ("schedule.warmup_epochs=.inf", "schedule.warmup_epochs must be a finite number"),
    ],
)
def test_values_that_cannot_work(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [override])
    with pytest.raises(ConfigError, match="may not both be 0"):
        load_config(None, ["loss.bce_weight=0", "loss.asl_weight=0"])


def test_threshold_bounds_are_inclusive():
    """0 predicts every label, 1 only certain ones: both are usable thresholds."""
    assert load_config(None, ["eval.threshold=0"])["eval"]["threshold"] == 0
    assert load_config(None, ["eval.threshold=1"])["eval"]["threshold"] == 1


@pytest.mark.parametrize(
    "key, value, option, message",
    [
        ("eval.threshold", "1.5", "--threshold", r"--threshold 1.5: eval.threshold must be in \[0, 1\], got 1.5"),
        ("eval.threshold", "-1", "--threshold", r"eval.threshold must be in \[0, 1\]"),
        ("eval.threshold", "nan", "--threshold", "eval.threshold must be a finite number, got nan"),
        ("eval.threshold", "half", "--threshold", "eval.threshold must be a float.*half.*option --threshold"),
        ("eval.batch_size", 0, "--batch-size", "--batch-size 0: eval.batch_size must be >= 1"),
        ("eval.min_positives", 0, "--min-positives", "--min-positives 0: eval.min_positives must be >= 1"),
    ],
)
def test_command_line_options_get_the_config_checks(key, value, option, message):
    """A command-line option that stands for a config key is refused exactly where the key would be."""
    with pytest.raises(ConfigError, match=message):
        check_option(key, value, option)
    with pytest.raises(ConfigError):  # the same value as a config override
        load_config(None, [f"{key}={value}"])


def test_command_line_options_take_the_config_types():
    assert check_option("eval.threshold", "0.25", "--threshold") == 0.25
    assert check_option("eval.threshold", "0", "--threshold") == 0.0
    assert check_option("eval.min_positives", 3, "--min-positives") == 3


def test_user_errors_are_gkg_errors(tmp_path):
    """Config mistakes are GkgErrors (one line in the scripts) and keep their builtin bases."""
    with pytest.raises(ConfigError) as err:
        load_config(None, ["train.epoch=3"])
    assert isinstance(err.value, GkgError) and isinstance(err.value, ValueError)
    with pytest.raises(MissingFileError, match="config file not found") as err:
        load_config(tmp_path / "nothere.yaml")
    assert isinstance(err.value, FileNotFoundError)


def test_overrides_are_yaml_values():
    cfg = load_config(None, [
        "train.epochs=3", "optim.lr=1e-3", "optim.betas=[0.8, 0.9]", "model.pretrained=null",
        "model.cross_level=false", "train.amp=bf16", "name=my run", "schedule.warmup_epochs=2",
    ])  # fmt: skip
    assert cfg["train"]["epochs"] == 3
    assert cfg["optim"]["lr"] == 1e-3  # PyYAML alone would read "1e-3" as a string
    assert cfg["optim"]["betas"] == [0.8, 0.9]
    assert cfg["model"]["pretrained"] is None and cfg["model"]["cross_level"] is False
    assert cfg["train"]["amp"] == "bf16" and cfg["name"] == "my run"
    assert cfg["schedule"]["warmup_epochs"] == 2  # an int is accepted for a float key
    # Untouched siblings keep their defaults.
    assert cfg["train"]["batch_size"] == DEFAULTS["train"]["batch_size"]


def test_base_inheritance_chain(tmp_path):
    write(tmp_path, "root.yaml", "name: root\nmodel: {k: 6, groups: 4}\noptim: {lr: 2.0e-4}\n")
    (tmp_path / "sub").mkdir()
    write(tmp_path / "sub", "mid.yaml", "base: ../root.yaml\nname: mid\nmodel: {groups: 1}\n")
    leaf = write(tmp_path / "sub", "leaf.yaml", "base: mid.yaml\nname: leaf\nschedule: {milestones: [3]}\n")
    cfg = load_config(leaf, ["model.k=3"])
    assert cfg["name"] == "leaf"
    assert cfg["model"]["groups"] == 1  # mid over root
    assert cfg["model"]["k"] == 3  # override over root
    assert cfg["optim"]["lr"] == 2e-4  # from root
    assert cfg["schedule"]["milestones"] == [3]  # a list replaces, not merges
    assert "base" not in cfg


def test_base_errors(tmp_path):
    write(tmp_path, "a.yaml", "base: b.yaml\n")
    write(tmp_path, "b.yaml", "base: a.yaml\n")
    with pytest.raises(ConfigError, match="inheritance loop"):
        load_config(tmp_path / "a.yaml")
    bad = write(tmp_path, "child.yaml", "base: parent.yaml\n")
    write(tmp_path, "parent.yaml", "train: {epochz: 1}\n")
    with pytest.raises(ConfigError, match=r"parent\.yaml.*'train.epochs'"):
        load_config(bad)


def test_save_and_reload_roundtrip(tmp_path):
    cfg = load_config(CONFIGS / "ablation_k6.yaml", ["train.epochs=7"])
    save_config(cfg, tmp_path / "out" / "config.yaml")
    again = load_config(tmp_path / "out" / "config.yaml")
    assert again == cfg and config_diff(again, cfg) == []
    assert validate_config(cfg) == cfg
    assert config_diff(cfg, load_config(CONFIGS / "ablation_k6.yaml")) == ["train.epochs"]


def test_shipped_configs_load():
    names = {p.stem for p in SHIPPED}
    expected = {"coco_224", "coco_448", "coco_576", "voc2007_576", "demo",
                "ablation_g1", "ablation_no_cross", "ablation_k3", "ablation_k6", "ablation_k12"}  # fmt: skip
    assert expected <= names
    cfgs = {p.stem: load_config(p) for p in SHIPPED}
    for stem, cfg in cfgs.items():
        assert cfg["name"] == stem, f"{stem}.yaml must name its run folder after itself"

    recipe = cfgs["coco_576"]
    assert recipe["model"]["name"] == "gkgnet_s" and recipe["model"]["img_size"] == 576
    assert recipe["model"]["drop_path"] == 0.1 and recipe["model"]["pretrained"] == "imagenet"  # published weights
    assert recipe["optim"] == {"name": "adamw", "lr": 1e-4, "momentum": 0.9, "betas": [0.9, 0.999],
                               "weight_decay": 0.05, "eps": 1e-8, "decay_embeddings": True}  # fmt: skip
    assert recipe["schedule"]["milestones"] == [10, 50] and recipe["schedule"]["warmup_epochs"] == 5
    assert recipe["schedule"]["warmup_ratio"] == 1e-3 and recipe["schedule"]["name"] == "step"
    assert recipe["train"]["epochs"] == 80 and recipe["train"]["batch_size"] == 16
    assert recipe["train"]["accumulate"] == 1  # x 8 GPUs: the paper's total batch of 128
    assert recipe["train"]["amp"] == "fp16" and recipe["train"]["clip_grad"] == 5.0
    assert recipe["data"]["class_balanced_threshold"] == 0.01
    assert cfgs["coco_448"]["model"]["img_size"] == 448 and cfgs["coco_224"]["model"]["img_size"] == 224
    assert config_diff(cfgs["coco_448"], recipe) == ["model.img_size", "name"]

    voc = cfgs["voc2007_576"]
    assert voc["data"]["name"] == "voc2007" and voc["schedule"]["milestones"] == [5, 50]
    assert voc["model"]["init_from"] and voc["model"]["pretrained"] is None

    for stem, key, value in [
        ("ablation_g1", "groups", 1),
        ("ablation_no_cross", "cross_level", False),
        ("ablation_k3", "k", 3),
        ("ablation_k6", "k", 6),
        ("ablation_k12", "k", 12),
    ]:
        assert config_diff(cfgs[stem], cfgs["coco_448"]) == sorted([f"model.{key}", "name"])
        assert cfgs[stem]["model"][key] == value
        assert len((CONFIGS / f"{stem}.yaml").read_text().strip().splitlines()) <= 3

    demo = cfgs["demo"]
    assert demo["data"]["name"] == "synthetic" and demo["model"]["name"] == "gkgnet_ti"


def test_build_small_shipped_model():
    cfg = load_config(CONFIGS / "demo.yaml")
    model = build_model(cfg, [f"c{i}" for i in range(10)])
    assert model.num_classes == 10 and model.img_size == (cfg["model"]["img_size"],) * 2
    assert model.k == cfg["model"]["k"] and model.class_names[3] == "c3"


def tiny_cfg(*overrides):
    return load_config(None, ["model.name=gkgnet_ti", "model.img_size=33", "model.k=3", *overrides])


def test_build_model_label_count():
    with pytest.raises(ValueError, match="model.num_classes is 4 but the data set has 3 labels"):
        build_model(tiny_cfg("model.num_classes=4"), ["a", "b", "c"])
    with pytest.raises(ValueError, match="not set"):
        build_model(tiny_cfg())
    assert build_model(tiny_cfg("model.num_classes=4")).num_classes == 4


def test_pretrained_must_fit(tmp_path):
    torch.manual_seed(0)
    source = build_model(tiny_cfg(), ["a", "b", "c", "d", "e"])
    torch.save(source.state_dict(), tmp_path / "five.pth")
    model = build_model(tiny_cfg(f"model.pretrained={tmp_path / 'five.pth'}"), ["a", "b", "c", "d", "e"])
    loaded = model.state_dict()
    for key, value in source.state_dict().items():
        assert torch.equal(loaded[key], value), key
    with pytest.raises(ValueError, match="label_embed.weight.*\\(5, 48\\).*\\(3, 48\\)"):
        build_model(tiny_cfg(f"model.pretrained={tmp_path / 'five.pth'}"), ["a", "b", "c"])


def test_init_from_drops_only_the_head(tmp_path):
    torch.manual_seed(0)
    source = build_model(tiny_cfg(), ["a", "b", "c", "d", "e"])
    torch.save({"model": source.state_dict(), "epoch": 3}, tmp_path / "five.pth")
    torch.manual_seed(1)
    model = build_model(tiny_cfg(f"model.init_from={tmp_path / 'five.pth'}"), ["x", "y", "z"])
    heads = {"label_embed.weight", "head_label.weight", "head_label.bias", "head_patch.weight", "head_patch.bias"}
    fresh = build_model(tiny_cfg(), ["x", "y", "z"])  # seed 1 again would differ: compare shapes only
    fresh_state, source_state = fresh.state_dict(), source.state_dict()
    for key, value in model.state_dict().items():
        if key in heads:
            assert value.shape == fresh_state[key].shape
            assert value.shape != source_state[key].shape
        else:
            assert torch.equal(value, source_state[key]), key
    report = init_from_checkpoint(fresh, tmp_path / "five.pth", verbose=False)
    assert sorted(report["dropped_head"]) == sorted(heads)
    assert sorted(report["missing"]) == sorted(heads)

    # Pyramid ViG's classifier is head_patch.4: reset for other labels, of another count or the same count.
    pvig = ["model.name=pvig_ti", "model.img_size=64", "model.k=4"]
    torch.save({"model": build_model(load_config(None, pvig), ["cat", "dog", "eel"]).state_dict(),
                "class_names": ["cat", "dog", "eel"]}, tmp_path / "pvig3.pth")  # fmt: skip
    for labels in (["a", "b"], ["xx", "yy", "zz"]):
        pvig_model = build_model(load_config(None, pvig), labels, load_weights=False)
        report = init_from_checkpoint(pvig_model, tmp_path / "pvig3.pth", verbose=False)
        assert sorted(report["dropped_head"]) == ["head_patch.4.bias", "head_patch.4.weight"], labels

    # Any other mismatch is an error: groups 1 vs 2 changes no shape, a
    # wider variant does.
    other = load_config(None, ["model.name=gkgnet_s", "model.img_size=33", "model.k=3"])
    torch.save(build_model(other, ["a"]).state_dict(), tmp_path / "small.pth")
    with pytest.raises(ValueError, match="does not fit"):
        init_from_checkpoint(fresh, tmp_path / "small.pth", verbose=False)
