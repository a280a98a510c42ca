"""task: single_label through the same config system and scripts as GKGNet:
train.py (with Mixup/CutMix) and evaluate.py on the synthetic shapes and on a
CIFAR-10 fixture in its real pickle format, the shipped pvig_*.yaml recipes,
and the config checks."""

import json
from pathlib import Path

import pytest
import torch

from gkg_pyg.builder import build_model
from gkg_pyg.config import ConfigError, load_config
from gkg_pyg.training.optim import build_optimizer
from helpers import load_script, write_cifar

# End-to-end runs of whole scripts: the quick run (-m "not slow") leaves them out.
pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "experiments" / "configs"


def tiny(tmp_path, *extra):
    return [
        "--set",
        "train.epochs=2",
        "--set",
        f"data.root={tmp_path / 'shapes'}",
        "--set",
        "data.synthetic={num_train: 48, num_val: 24, image_size: 64, seed: 0}",
        "--set",
        f"output.dir={tmp_path / 'runs'}",
        "--set",
        "output.progress=false",
        "--set",
        "data.num_workers=0",
        "--set",
        "train.batch_size=16",
        *extra,
    ]


def test_train_and_evaluate_single_label(tmp_path):
    config = str(CONFIGS / "pvig_demo.yaml")
    assert (
        load_script("train").main(
            [config, *tiny(tmp_path, "--set", "single_label.mixup_alpha=0.8", "--set", "single_label.cutmix_alpha=1.0")]
        )
        == 0
    )
    run = tmp_path / "runs" / "pvig_demo"
    log = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in log] == [1, 2] and all("top1" in r and "top5" in r and "mAP" not in r for r in log)
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["model"]["num_images"] == 24 and metrics["baseline"]["top1"] == pytest.approx(100 / 8)
    assert metrics["model"]["top1"] == pytest.approx(log[-1]["top1"])
    rows = (run / "confusion_matrix.csv").read_text().splitlines()
    assert len(rows) == 9 and sum(sum(map(int, r.split(",")[1:])) for r in rows[1:]) == 24
    # evaluate.py on the same split gives the same top-1
    out = tmp_path / "eval"
    assert (
        load_script("evaluate").main(
            [config, "--checkpoint", str(run / "checkpoint_last.pth"), "--output", str(out), *tiny(tmp_path)]
        )
        == 0
    )
    evaluated = json.loads((out / "metrics.json").read_text())
    assert evaluated["model"]["top1"] == pytest.approx(metrics["model"]["top1"])
    assert (out / "confusion_matrix.csv").is_file()
    # Thresholds are for multi-label models: asking for them is a usage error, not silently nothing.
    checkpoint = str(run / "checkpoint_last.pth")
    assert (
        load_script("evaluate").main([config, "--checkpoint", checkpoint, "--choose-thresholds", *tiny(tmp_path)]) == 2
    )


def test_cifar_recipe_runs_on_a_cifar_fixture(tmp_path):
    write_cifar(tmp_path / "cifar10", "cifar10", images_per_file=4)
    args = [
        str(CONFIGS / "pvig_ti_cifar10_g2.yaml"),
        "--set",
        "train.epochs=1",
        "--set",
        "model.img_size=72",
        "--set",
        f"data.root={tmp_path / 'cifar10'}",
        "--set",
        f"output.dir={tmp_path / 'runs'}",
        "--set",
        "output.progress=false",
        "--set",
        "data.num_workers=0",
        "--set",
        "train.batch_size=8",
        "--set",
        "train.amp=none",
        "--set",
        "schedule.milestones=[]",
    ]
    assert load_script("train").main(args) == 0
    metrics = json.loads((tmp_path / "runs" / "pvig_ti_cifar10_g2" / "metrics.json").read_text())
    assert metrics["model"]["num_images"] == 4  # test_batch


@pytest.mark.parametrize("name", ["imagenet", "cifar10", "cifar100", "flowers"])
def test_shipped_pvig_recipes(name):
    g1, g2 = (load_config(CONFIGS / f"pvig_ti_{name}_g{g}.yaml") for g in (1, 2))
    for cfg, groups in ((g1, 1), (g2, 2)):
        assert cfg["task"] == "single_label" and cfg["model"]["name"] == "pvig_ti"
        assert cfg["model"]["groups"] == groups and cfg["model"]["img_size"] == 224
    assert {k: v for k, v in g1.items() if k not in ("name", "model")} == {
        k: v for k, v in g2.items() if k not in ("name", "model")
    }  # the same recipe for both
    o, s, sl = g1["optim"], g1["schedule"], g1["single_label"]
    if name == "imagenet":
        assert (o["name"], o["lr"], o["weight_decay"], s["name"], g1["train"]["epochs"]) == (
            "adamw",
            2e-3,
            0.05,
            "cosine",
            300,
        )
        assert (sl["mixup_alpha"], sl["cutmix_alpha"]) == (0.8, 1.0)
    elif name.startswith("cifar"):
        assert (o["name"], o["lr"], o["weight_decay"], s["name"], s["milestones"], g1["train"]["epochs"]) == (
            "sgd",
            0.1,
            1e-4,
            "step",
            [100, 150],
            200,
        )
        assert sl["crop_scale"] == [1.0, 1.0] and g1["data"]["name"] == name
    else:
        assert (o["name"], o["lr"], s["name"], s["milestones"], g1["train"]["epochs"]) == (
            "sgd",
            0.1,
            "step",
            [30, 60, 90],
            100,
        )
    model = build_model(g1, [f"c{i}" for i in range(10)], load_weights=False)
    optimiser = build_optimizer(g1, model)
    assert isinstance(optimiser, torch.optim.SGD if o["name"] == "sgd" else torch.optim.AdamW)
    if o["name"] == "sgd":
        assert optimiser.param_groups[0]["momentum"] == 0.9


def test_config_checks_task_and_family_keys(tmp_path):
    demo = CONFIGS / "pvig_demo.yaml"
    with pytest.raises(ConfigError, match="single-label data set but task is 'multi_label'"):
        load_config(demo, ["task=multi_label"])
    with pytest.raises(ConfigError, match="multi-label data set but task is 'single_label'"):
        load_config(CONFIGS / "demo.yaml", ["task=single_label"])
    with pytest.raises(ConfigError, match="class_balanced_threshold must be null"):
        load_config(demo, ["data.class_balanced_threshold=0.01"])
    with pytest.raises(ConfigError, match="crop_scale"):
        load_config(demo, ["single_label.crop_scale=[0.5, 0.2]"])
    with pytest.raises(ConfigError, match="model.cross_level applies to gkgnet_"):
        build_model(load_config(demo, ["model.cross_level=false"]), ["a", "b"], load_weights=False)
    with pytest.raises(ConfigError, match="model.drop_rate applies to pvig_"):
        build_model(load_config(CONFIGS / "demo.yaml", ["model.drop_rate=0.2"]), ["a", "b"], load_weights=False)
    model = build_model(load_config(demo, ["model.drop_rate=0.2"]), ["a", "b"], load_weights=False)
    assert model.head_patch[3].p == 0.2 and model.class_names == ["a", "b"]


def test_predict_and_export_on_a_single_label_checkpoint(tmp_path):
    """predict.py on a single-label checkpoint: softmax probabilities, the most
    probable class as the one label, and the evaluation transform of training
    (timm's resize + centre crop, the model's normalisation); export.py says
    it does not support it."""
    from PIL import Image

    from gkg_pyg.data import transform_from_preprocess
    from gkg_pyg.data.single_label import single_label_split

    config = str(CONFIGS / "pvig_demo.yaml")
    assert load_script("train").main([config, *tiny(tmp_path, "--set", "train.epochs=1")]) == 0
    ckpt = tmp_path / "runs" / "pvig_demo" / "checkpoint_last.pth"
    state = torch.load(ckpt, weights_only=True)
    assert state["preprocess"]["resize"] == "bicubic_center_crop"
    # The stored preprocessing is the evaluation transform of the training run.
    cfg = load_config(config, [a for a in tiny(tmp_path) if a != "--set"])
    image = Image.fromarray((torch.rand(50, 70, 3) * 255).byte().numpy())
    torch.testing.assert_close(
        transform_from_preprocess(state["preprocess"])(image), single_label_split(cfg, False).transform(image)
    )
    images = sorted((tmp_path / "shapes").rglob("*.png"))[:3]
    assert images
    out = tmp_path / "pred.json"
    predict = load_script("predict")
    assert predict.main(["--checkpoint", str(ckpt), *map(str, images), "--output", str(out), "--topk", "8"]) == 0
    records = json.loads(out.read_text())
    for r in records:
        assert len(r["labels"]) == 1 and r["labels"][0] == r["top"][0]
        assert sum(t["score"] for t in r["top"]) == pytest.approx(1.0, abs=1e-3)  # softmax over 8 classes
    # An older checkpoint that stored the multi-label transform gets the config's instead.
    state["preprocess"] = {"img_size": 64, "resize": "bicubic", "mean": [0.4] * 3, "std": [0.2] * 3}
    old = tmp_path / "old.pth"
    torch.save(state, old)
    _, _, preprocess, _, single = predict.load_model(predict.parse_args(["--checkpoint", str(old), str(images[0])]))
    assert single and preprocess["resize"] == "bicubic_center_crop"
    with pytest.raises(ValueError, match="single-label checkpoint"):
        load_script("export").run(["--checkpoint", str(ckpt), "--output", str(tmp_path / "m.onnx")])
