"""Thresholds chosen by evaluate.py and used by predict.py, predict.py's
inputs and outputs, and fine-tuning to a new label set (model.init_from),
on a tiny CSV data set trained for one step."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image

from gkg_pyg.builder import build_model
from gkg_pyg.config import load_config
from gkg_pyg.data import build_test_transform, load_rgb
from gkg_pyg.thresholds import choose_thresholds

from helpers import TINY_MODEL, build_format, noise_image, run_script

# End-to-end runs of whole scripts: the quick run (-m "not slow") leaves them out.
pytestmark = pytest.mark.slow

CLASSES = ["bird", "cat", "dog"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("predict")
    root = tmp / "data"
    config = tmp / "tiny.yaml"
    data = build_format("csv_names", root)
    config.write_text(TINY_MODEL.format(name="tiny", root=root, runs=tmp / "runs", data=data))
    assert run_script("train", config) == 0
    return {"tmp": tmp, "root": root, "config": config, "ckpt": tmp / "runs" / "tiny" / "checkpoint_last.pth"}


def scores_by_hand(ckpt: Path, paths) -> torch.Tensor:
    state = torch.load(ckpt, weights_only=True)
    model = build_model(state["config"], state["class_names"], load_weights=False)  # the trained model's settings
    model.load_state_dict(state["model"])
    x = torch.stack([build_test_transform(33)(load_rgb(p)) for p in paths])
    with torch.no_grad():
        return torch.sigmoid(model.eval()(x))


def test_evaluate_chooses_and_stores_thresholds(trained, tmp_path, capsys):
    # in the module's folder: the next test predicts with it, and a passing test's tmp_path is removed
    ckpt = trained["tmp"] / "with_thresholds.pth"
    shutil.copy(trained["ckpt"], ckpt)
    out = tmp_path / "eval"
    # Two validation images, one positive per class: by default every class keeps the global threshold,
    # and the run warns that the split is small for them.
    assert run_script("evaluate", trained["config"], "--checkpoint", ckpt, "--output", out, "--choose-thresholds",
                      "--no-store") == 0  # fmt: skip
    printed = capsys.readouterr()
    assert "warning: the calibration split is small for 3 of the 3 classes" in printed.err
    assert "bird (1), cat (1), dog (1)" in printed.err
    assert "0 of 3 classes their own, 3 with fewer than 10 positives the global" in printed.out
    floor = json.loads((out / "thresholds.json").read_text())["model"]
    assert floor["min_positives"] == 10 and {v["threshold"] for v in floor["per_class"].values()} == {floor["global"]}
    # --min-positives 1 (the check of eval.min_positives): every class its own threshold.
    assert run_script("evaluate", trained["config"], "--checkpoint", ckpt, "--output", out, "--choose-thresholds",
                      "--min-positives", "1") == 0  # fmt: skip
    stored = torch.load(ckpt, weights_only=True)["thresholds"]["model"]
    assert stored["min_positives"] == 1 and stored["num_positives"].tolist() == [1, 1, 1]
    # The same choice from scores computed independently.
    val = [str(trained["root"] / "imgs" / "val" / f"{i}.png") for i in range(2)]
    targets = torch.tensor([[1, 1, 0], [0, 0, 1]], dtype=torch.float64)  # val: cat+bird, dog
    expected = choose_thresholds(scores_by_hand(ckpt, val), targets, CLASSES, min_positives=1)
    assert torch.allclose(stored["per_class"], expected["per_class"], atol=1e-5)
    assert stored["global"] == pytest.approx(expected["global"], abs=1e-5)
    assert stored["class_names"] == CLASSES and stored["num_images"] == 2
    metrics = json.loads((out / "metrics.json").read_text())["model"]
    assert set(metrics["at_thresholds"]) >= {"per-class", "chosen_on"}
    # On the split they were chosen on, each class's F1 at its threshold is the best one, so >= its F1 at 0.5.
    scores = scores_by_hand(ckpt, val).double()

    def f1(c, t):
        pred, pos = scores[:, c] >= t, targets[:, c] == 1
        return 2.0 * float((pred & pos).sum()) / float(pred.sum() + pos.sum())

    per_class = json.loads((out / "thresholds.json").read_text())["model"]["per_class"]
    for c, name in enumerate(CLASSES):
        assert per_class[name]["f1"] == pytest.approx(f1(c, stored["per_class"][c].item()))
        assert per_class[name]["f1"] >= f1(c, 0.5) - 1e-12
    # --thresholds-output writes a copy; --no-store writes nothing.
    before = ckpt.read_bytes()
    copy = tmp_path / "copy.pth"
    run_script("evaluate", trained["config"], "--checkpoint", ckpt, "--output", out, "--choose-thresholds",
               "--min-positives", "1", "--thresholds-output", copy)  # fmt: skip
    assert ckpt.read_bytes() == before and "thresholds" in torch.load(copy, weights_only=True)
    run_script("evaluate", trained["config"], "--checkpoint", trained["ckpt"], "--output", out,
               "--choose-thresholds", "--no-store")  # fmt: skip
    assert "thresholds" not in torch.load(trained["ckpt"], weights_only=True)
    capsys.readouterr()
    assert (
        run_script("evaluate", trained["config"], "--checkpoint", ckpt, "--choose-thresholds", "--min-positives", "0")
        == 2
    )
    assert capsys.readouterr().err == "error: --min-positives 0: eval.min_positives must be >= 1, got 0\n"
    trained["with_thresholds"] = ckpt


def test_predict_files_folders_globs_and_bad_files(trained, tmp_path, capsys):
    images = tmp_path / "images"
    for i in range(5):
        noise_image(images / ("sub" if i % 2 else "") / f"p{i}.jpg", 500 + i)
    (images / "broken.jpg").write_bytes(b"\xff\xd8\xff not a jpeg")
    Image.new("I;16", (40, 30), 40000).save(images / "deep.png")  # 16-bit: decoded by load_rgb
    (images / "notes.txt").write_text("not an image")
    ckpt = trained.get("with_thresholds") or trained["ckpt"]
    out_json = tmp_path / "p.json"
    code = run_script("predict", "--checkpoint", ckpt, images, str(images / "sub" / "*.jpg"), "--output", out_json,
                      "--topk", "2", "--batch-size", "3", "--workers", "0", "--no-progress")  # fmt: skip
    assert code == 0
    # Which thresholds apply, and where they come from, is said on stderr.
    said = capsys.readouterr().err
    if "with_thresholds" in trained:
        assert f"thresholds: per-class (chosen on csv val.csv under {trained['root']}" in said
        assert "3 of 3 classes their own, 0 with fewer than 1 positives" in said and str(ckpt) in said
    else:
        assert "thresholds: 0.5 for every class" in said
    records = json.loads(out_json.read_text())
    names = [Path(r["image"]).name for r in records]
    # The folder (recursive, sorted, only image files), then the glob's files not seen yet: none.
    assert names == ["broken.jpg", "deep.png", "p0.jpg", "p2.jpg", "p4.jpg", "p1.jpg", "p3.jpg"]
    bad = records[0]
    assert "broken.jpg" in bad["error"] and bad["labels"] == [] and bad["top"] == []
    assert "broken.jpg" in said
    good = [r for r in records if r["error"] is None]
    scores = scores_by_hand(ckpt, [r["image"] for r in good])
    state = torch.load(ckpt, weights_only=True)
    thresholds = state.get("thresholds", {}).get("model", {}).get("per_class", torch.full((3,), 0.5))
    for record, row in zip(good, scores):
        order = torch.argsort(row, descending=True).tolist()
        assert [t["label"] for t in record["top"]] == [CLASSES[i] for i in order[:2]]
        assert [t["score"] for t in record["top"]] == pytest.approx([row[i].item() for i in order[:2]], abs=1e-4)
        above = [CLASSES[i] for i in order if row[i].double() >= thresholds[i]]
        assert [x["label"] for x in record["labels"]] == above

    out_csv = tmp_path / "p.csv"
    run_script("predict", "--checkpoint", ckpt, images / "p0.jpg", images / "broken.jpg", "--output", out_csv,
               "--threshold", "0", "--workers", "1", "--no-progress")  # fmt: skip
    rows = list(csv.DictReader(out_csv.open()))
    assert list(rows[0]) == ["image", "labels", "error", "top1", "score1", "top2", "score2", "top3", "score3"]
    assert sorted(rows[0]["labels"].split("|")) == CLASSES and rows[0]["error"] == ""
    assert rows[1]["labels"] == "" and "broken.jpg" in rows[1]["error"]
    # Only unreadable files: exit status 1.
    assert run_script("predict", "--checkpoint", ckpt, images / "broken.jpg", "--no-progress", "--workers", "0") == 1
    capsys.readouterr()
    # User errors: one line each, exit status 2.
    assert run_script("predict", "--checkpoint", ckpt, tmp_path / "nothing_here") == 2
    assert capsys.readouterr().err == f"error: no such file or folder: {tmp_path / 'nothing_here'}\n"
    assert run_script("predict", "--checkpoint", ckpt, images / "p0.jpg", "--threshold", "1.5") == 2
    assert capsys.readouterr().err == "error: --threshold 1.5: eval.threshold must be in [0, 1], got 1.5\n"
    with pytest.raises(FileNotFoundError, match="nothing_here"):  # run() raises; the builtin base is kept
        run_script("predict", "--checkpoint", ckpt, tmp_path / "nothing_here", raising=True)
    if "thresholds" in state:
        run_script("predict", "--checkpoint", ckpt, images / "p0.jpg", "--threshold", "global", "--json",
                   "--workers", "0", "--no-progress")  # fmt: skip
        record = json.loads(capsys.readouterr().out)[0]
        g = state["thresholds"]["model"]["global"]
        row = scores_by_hand(ckpt, [str(images / "p0.jpg")])[0]
        assert [x["label"] for x in record["labels"]] == [CLASSES[i] for i in torch.argsort(row, descending=True)
                                                          if row[i] >= g]  # fmt: skip


def test_finetune_to_a_new_label_set(trained, tmp_path):
    """model.init_from: everything but the label embedding and the heads comes from the
    checkpoint, even when the new label set has as many labels as the old one."""
    root = tmp_path / "new"
    rows = []
    for role in ("train", "val"):
        for i, label in enumerate(["red", "green", "blue", "red green"][: 4 if role == "train" else 2]):
            noise_image(root / role / f"{i}.jpg", 900 + i)
            rows.append((role, f"{role}/{i}.jpg,{label}"))
        (root / f"{role}.csv").write_text("image,labels\n" + "\n".join(r for k, r in rows if k == role) + "\n")
    data = "  name: csv\n  csv: {train: train.csv, val: val.csv}"
    config = tmp_path / "finetune.yaml"
    config.write_text(TINY_MODEL.format(name="ft", root=root, runs=tmp_path / "runs", data=data))
    overrides = [f"model.init_from={trained['ckpt']}"]
    cfg = load_config(config, overrides)
    source = torch.load(trained["ckpt"], weights_only=True)["model"]
    torch.manual_seed(123)
    model = build_model(cfg, ["blue", "green", "red"], verbose=False)  # 3 labels, like the checkpoint's
    label_parts = {"label_embed.weight", "head_label.weight", "head_label.bias", "head_patch.weight",
                   "head_patch.bias"}  # fmt: skip
    for key, value in model.state_dict().items():
        if key in label_parts:
            assert not torch.equal(value, source[key]), key  # fresh, not the old labels' rows
        else:
            assert torch.equal(value, source[key]), key
    keep = build_model(load_config(config, overrides + ["model.init_classifier=keep"]), ["blue", "green", "red"],
                       verbose=False)  # fmt: skip
    assert torch.equal(keep.state_dict()["head_patch.weight"], source["head_patch.weight"])
    same = build_model(load_config(config, overrides), CLASSES, verbose=False)  # the checkpoint's own labels
    assert torch.equal(same.state_dict()["label_embed.weight"], source["label_embed.weight"])
    # And the training entry point runs a step from it.
    assert run_script("train", config, "--set", overrides[0]) == 0
    state = torch.load(tmp_path / "runs" / "ft" / "checkpoint_last.pth", weights_only=True)
    assert state["class_names"] == ["blue", "green", "red"] and state["step"] == 1
