"""Loading checkpoints safely: no unpickling of arbitrary objects (through the
API and through every command line that takes a checkpoint), strict loading
for inference, clear errors for empty, truncated and foreign files."""

from __future__ import annotations

import pickle
import re
from pathlib import Path

import pytest
import torch

import gkg_pyg
from gkg_pyg.builder import build_model
from gkg_pyg.checkpoint import CheckpointError, load_checkpoint, read_checkpoint
from gkg_pyg.config import load_config
from gkg_pyg.data import make_synthetic_coco
from gkg_pyg.training.state import load_training_checkpoint

from helpers import load_script

TINY = """\
name: tiny
model: {{name: gkgnet_ti, img_size: 33, k: 3}}
data:
  name: synthetic
  root: {root}
  synthetic: {{num_train: 6, num_val: 4, image_size: 64, seed: 0}}
  num_workers: 0
train: {{epochs: 1, batch_size: 2, amp: none, num_threads: 1}}
eval: {{batch_size: 2}}
output: {{dir: {runs}, progress: false}}
"""


class Planted:
    """Unpickling this object creates ``path`` (what a malicious file could do)."""

    def __init__(self, path: Path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny config, its synthetic data, a trained-shape training checkpoint
    (written by the real training code) and a planted file."""
    tmp = tmp_path_factory.mktemp("safety")
    make_synthetic_coco(tmp / "synthetic", 6, 4, 64, seed=0, progress=False)
    config = tmp / "tiny.yaml"
    config.write_text(TINY.format(root=tmp / "synthetic", runs=tmp / "runs"))
    threads = torch.get_num_threads()
    try:
        assert load_script("train").main([str(config), "--output", str(tmp / "run")]) == 0
    finally:
        torch.set_num_threads(threads)
    ckpt = tmp / "run" / "checkpoint_last.pth"
    image = sorted((tmp / "synthetic" / "val2014").glob("*.jpg"))[0]
    return dict(tmp=tmp, config=config, ckpt=ckpt, image=image)


def planted_file(tmp: Path, model_state: dict) -> tuple[Path, Path]:
    """A checkpoint with real weights plus an object whose unpickling creates a marker file."""
    marker = tmp / "marker_created_by_unpickling"
    marker.unlink(missing_ok=True)
    path = tmp / "planted.pth"
    torch.save({"model": model_state, "config": {}, "payload": Planted(marker)}, path)
    return path, marker


def test_the_planted_file_would_run_code(tiny):
    """The test below can fail: loading the planted file the unsafe way does create the marker."""
    state = torch.load(tiny["ckpt"], weights_only=True)["model"]
    path, marker = planted_file(tiny["tmp"], state)
    torch.load(path, weights_only=False)
    assert marker.exists()
    marker.unlink()


@pytest.mark.slow  # every script and loader
def test_planted_file_is_refused_everywhere(tiny, capsys):
    tmp = tiny["tmp"]
    state = torch.load(tiny["ckpt"], weights_only=True)["model"]
    path, marker = planted_file(tmp, state)
    cfg = load_config(tiny["config"])
    names = torch.load(tiny["ckpt"], weights_only=True)["class_names"]
    model = build_model(cfg, names, load_weights=False)
    refused = r"refusing to load .*planted\.pth.*weights_only=True"
    attempts = {
        "read_checkpoint": lambda: read_checkpoint(path),
        "load_checkpoint": lambda: load_checkpoint(model, path),
        "gkg_pyg.load_checkpoint": lambda: gkg_pyg.load_checkpoint(model, str(path)),
        "create_model(pretrained=...)": lambda: gkg_pyg.create_model(
            "gkgnet_ti", pretrained=str(path), num_classes=len(names), img_size=33, k=3),
        "build_model(model.pretrained)": lambda: build_model(
            load_config(tiny["config"], [f"model.pretrained={path}"]), names),
        "build_model(model.init_from)": lambda: build_model(
            load_config(tiny["config"], [f"model.init_from={path}"]), names),
        "load_training_checkpoint": lambda: load_training_checkpoint(path),
        "train.py --resume": lambda: load_script("train").run(
            [str(tiny["config"]), "--output", str(tmp / "resume_run"), "--resume", str(path),
             "--set", "train.num_threads=null"]),
        "evaluate.py": lambda: load_script("evaluate").run(
            [str(tiny["config"]), "--checkpoint", str(path), "--output", str(tmp / "eval_out")]),
        "predict.py": lambda: load_script("predict").run(["--checkpoint", str(path), str(tiny["image"])]),
        "inspect_graphs.py": lambda: load_script("inspect_graphs").run(
            ["--config", str(tiny["config"]), "--checkpoint", str(path), "--image", str(tiny["image"]),
             "--out", str(tmp / "inspect_out")]),
    }  # fmt: skip
    for what, attempt in attempts.items():
        with pytest.raises(CheckpointError, match=refused):
            attempt()
        assert not marker.exists(), f"{what} unpickled the planted object"
    capsys.readouterr()
    # The command line says it in one line (exit status 2).
    assert load_script("predict").main(["--checkpoint", str(path), str(tiny["image"])]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: refusing to load {path}") and err.count("\n") == 1
    assert not marker.exists()


def test_training_checkpoint_is_plain_tensors_and_containers(tiny):
    """Training checkpoints load with weights_only=True (RNG states and configs as tensors and plain values)."""
    state = torch.load(tiny["ckpt"], weights_only=True)
    for key in ("model", "optimizer", "schedule", "scaler", "epoch", "config", "rng", "class_names"):
        assert key in state
    assert load_training_checkpoint(tiny["ckpt"])["epoch"] == 1


@pytest.mark.parametrize(
    "content, problem",
    [
        (b"", "the file is empty"),
        (b"this is a text file, not a checkpoint\n", "not a PyTorch checkpoint"),
        ("truncated", "the file is truncated"),
        (pickle.dumps([1, 2, 3]), "expected a dict of tensors, got list"),
    ],
)
def test_unreadable_files_name_the_file_and_the_problem(tiny, content, problem):
    path = tiny["tmp"] / "bad.pth"
    if content == "truncated":
        data = tiny["ckpt"].read_bytes()
        content = data[: len(data) // 2]
    if isinstance(content, bytes) and content.startswith(b"\x80"):
        torch.save([1, 2, 3], path)
    else:
        path.write_bytes(content)
    model = build_model(load_config(tiny["config"]), [f"c{i}" for i in range(10)], load_weights=False)
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(model, path)
    assert str(path) in str(err.value) and problem in str(err.value)
    with pytest.raises(ValueError, match=str(path)):
        load_training_checkpoint(path)


@pytest.mark.slow  # every script
def test_inference_loads_strictly(tiny, caplog):
    """A training checkpoint with the heads and the label path removed is refused by
    every inference entry point, with the missing tensors listed."""
    tmp = tiny["tmp"]
    full = torch.load(tiny["ckpt"], weights_only=True)
    removed = [k for k in full["model"] if k.startswith(("head_", "label_"))]
    assert len(removed) > 10
    cut = dict(full, model={k: v for k, v in full["model"].items() if k not in removed})
    cut.pop("ema", None)
    path = tmp / "cut.pth"
    torch.save(cut, path)
    listed = rf"{len(removed)} model tensors missing from it: .*head_"
    named = re.escape(str(path)) + r" does not match the model .*" + listed  # the file, also when read first
    with pytest.raises(CheckpointError, match=named):
        load_script("predict").run(["--checkpoint", str(path), str(tiny["image"])])
    with pytest.raises(CheckpointError, match=named):
        load_script("evaluate").run([str(tiny["config"]), "--checkpoint", str(path), "--output", str(tmp / "e")])
    with pytest.raises(CheckpointError, match=named):
        load_script("inspect_graphs").run(["--config", str(tiny["config"]), "--checkpoint", str(path),
                                            "--image", str(tiny["image"]), "--out", str(tmp / "i")])  # fmt: skip
    model = build_model(load_config(tiny["config"]), full["class_names"], load_weights=False)
    with pytest.raises(CheckpointError, match=listed):
        gkg_pyg.create_model("gkgnet_ti", pretrained=str(path), num_classes=10, img_size=33, k=3)

    # An unexpected tensor is an error too; strict=False loads what fits and reports the rest.
    extra = dict(full["model"], **{"stages.9.extra.weight": torch.zeros(2)})
    with pytest.raises(CheckpointError, match=r"1 unexpected tensors in it: stages\.9\.extra\.weight"):
        load_checkpoint(model, extra)
    with caplog.at_level("INFO", logger="gkg_pyg"):
        report = load_checkpoint(model, cut, strict=False)
    assert sorted(report["missing"]) == sorted(removed)
    assert f"missing {len(removed)} model keys" in caplog.text  # the report goes to the gkg_pyg logger
