"""Bring-your-own-data formats, built from scratch in their real layouts:
COCO instances JSONs (2014 / 2017 layouts found under a root, or explicit
files), CSV multi-label lists (label names or 0/1 columns), and the
up-front image check."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from gkg_pyg.data import (
    MEAN, STD, BadImagesError, CocoDataset, CsvDataset, build_test_transform, check_dataset, coco_split_files,
    collate, csv_class_names, dataset_from_config, find_bad_images, read_class_list,
)  # fmt: skip

from helpers import CATEGORIES, TINY_MODEL, build_format, coco_json, end_failed_loader_workers, run_script, write_image

# End-to-end runs of whole scripts: the quick run (-m "not slow") leaves them out.
pytestmark = pytest.mark.slow


# ---------------------------------------------------------------------- COCO
def write_coco_split(root: Path, name: str, image_dir: Path | None = None, n_images=3) -> Path:
    """annotations/instances_<name>.json + images in <name>/ (or image_dir)."""
    images = [(i + 1, f"{name}_{i}.jpg") for i in range(n_images)]
    anns = [(1, 1, 10.0), (1, 18, 50.0), (2, 3, 99.0)]  # image 3 has no annotation
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    (root / "annotations" / f"instances_{name}.json").write_text(json.dumps(coco_json(images, anns)))
    folder = image_dir or root / name
    for _, f in images:
        write_image(folder / f)
    return root


def test_coco_2017_layout_found(tmp_path):
    root = write_coco_split(tmp_path / "c17", "train2017")
    write_coco_split(root, "val2017")
    ds = CocoDataset(root, "train")
    assert ds.ann_file.name == "instances_train2017.json" and ds.image_dir == root / "train2017"
    # Names and order from the JSON's categories, by id: person (1), car (3), dog (18).
    assert ds.class_names == ["person", "car", "dog"]
    assert ds.targets.tolist() == [[1, 0, 1], [0, 1, 0]] and ds.image_ids == [1, 2]
    assert ds.areas.tolist() == [[10, 0, 50], [0, 99, 0]]
    assert ds.num_without_labels == 1
    assert CocoDataset(root, "val2017").image_dir == root / "val2017"
    assert coco_split_files(root, "val") == (root / "annotations" / "instances_val2017.json", root / "val2017")


def test_coco_images_subfolder_and_plain_names(tmp_path):
    root = tmp_path / "c"
    write_coco_split(root, "train2017", image_dir=root / "images" / "train2017")
    assert CocoDataset(root, "train").image_dir == root / "images" / "train2017"
    write_coco_split(root, "mine")  # a split without a year: annotations/instances_mine.json + mine/
    assert CocoDataset(root, "mine").image_dir == root / "mine"


def test_coco_ambiguous_and_missing_layouts(tmp_path):
    root = write_coco_split(tmp_path / "both", "train2014")
    write_coco_split(root, "train2017")
    with pytest.raises(ValueError, match="ambiguous.*train2014.*train2017.*data.train_split=train2017"):
        CocoDataset(root, "train")
    assert CocoDataset(root, "train2014").ann_file.name == "instances_train2014.json"
    with pytest.raises(FileNotFoundError, match="instances_val2014.json.*instances_val2017.json"):
        CocoDataset(root, "val")
    lonely = tmp_path / "lonely"
    (lonely / "annotations").mkdir(parents=True)
    (lonely / "annotations" / "instances_val2017.json").write_text(json.dumps(coco_json([], [])))
    with pytest.raises(FileNotFoundError, match="image folder not found.*val2017"):
        CocoDataset(lonely, "val")


def test_coco_explicit_files(tmp_path):
    root = tmp_path / "custom"
    images = [(7, "sub/a.png"), (3, "b.png")]
    anns = [(7, 3, 5.0), (3, 1, 6.0), (3, 18, 7.0)]
    (root / "labels").mkdir(parents=True)
    (root / "labels" / "mine.json").write_text(json.dumps(coco_json(images, anns)))
    for _, f in images:
        write_image(root / "pics" / f)
    ds = CocoDataset(root, "train", ann_file="labels/mine.json", image_dir="pics")
    assert ds.paths == [str(root / "pics" / "b.png"), str(root / "pics" / "sub" / "a.png")]
    assert ds.targets.tolist() == [[1, 0, 1], [0, 1, 0]]
    absolute = CocoDataset(None, "x", ann_file=root / "labels" / "mine.json", image_dir=root / "pics")
    assert absolute.paths == ds.paths
    with pytest.raises(ValueError, match="ann_file is given but image_dir is not"):
        CocoDataset(root, "train", ann_file="labels/mine.json")
    with pytest.raises(FileNotFoundError, match="nope.json"):
        CocoDataset(root, "train", ann_file="labels/nope.json", image_dir="pics")


def test_coco_empty_label_policies(tmp_path, caplog):
    root = write_coco_split(tmp_path / "c", "train2017")
    with caplog.at_level("INFO", logger="gkg_pyg"):
        assert len(CocoDataset(root, "train")) == 2
    assert "dropped 1 of the 3 images of" in caplog.text and "instances_train2017.json" in caplog.text
    kept = CocoDataset(root, "train", empty_labels="keep")
    assert len(kept) == 3 and kept.targets[2].tolist() == [0, 0, 0] and kept.image_ids == [1, 2, 3]
    with pytest.raises(ValueError, match="1 of the 3 images.*have no label.*train2017_2.jpg"):
        CocoDataset(root, "train", empty_labels="error")
    with pytest.raises(ValueError, match="empty_labels"):
        CocoDataset(root, "train", empty_labels="maybe")


def test_coco_bad_json(tmp_path):
    root = tmp_path / "bad"
    (root / "annotations").mkdir(parents=True)
    (root / "img").mkdir()
    ann = root / "annotations" / "x.json"

    def load(data):
        ann.write_text(data if isinstance(data, str) else json.dumps(data))
        return CocoDataset(root, "x", ann_file="annotations/x.json", image_dir="img")

    with pytest.raises(ValueError, match="not valid JSON"):
        load("{oops")
    with pytest.raises(ValueError, match="no 'annotations' list"):
        load({"images": [], "categories": []})
    with pytest.raises(ValueError, match="image_id 99"):
        load(coco_json([(1, "a.jpg")], [(99, 1, 1.0)]))
    with pytest.raises(ValueError, match="refers to image_id '1', which is not in its images"):
        load(coco_json([(1, "a.jpg")], [("1", 1, 1.0)]))  # a string id is not image 1: the message shows which
    # Two images under one id: one of them would silently take the other's labels.
    with pytest.raises(ValueError, match=r"x.json lists image id 1 twice \('a.jpg' and 'b.jpg'\)"):
        load(coco_json([(1, "a.jpg"), (1, "b.jpg")], [(1, 1, 1.0)]))
    # One file under two ids: evaluated twice, with two label sets.
    with pytest.raises(ValueError, match=r"x.json lists the file 'a.jpg' under two image ids \(1 and 8\)"):
        load(coco_json([(1, "a.jpg"), (8, "a.jpg")], [(1, 1, 1.0), (8, 1, 1.0)]))
    # A missing field names the file and the entry, not a bare KeyError.
    data = coco_json([(1, "a.jpg"), (2, "b.jpg")], [(1, 1, 1.0)])
    del data["images"][1]["file_name"]
    with pytest.raises(ValueError, match=r"x.json: images\[1\] has no 'file_name'"):
        load(data)
    data = coco_json([(1, "a.jpg")], [(1, 1, 1.0)])
    del data["annotations"][0]["category_id"]
    with pytest.raises(ValueError, match=r"annotations\[0\] has no 'category_id'"):
        load(data)
    with pytest.raises(ValueError, match=r"categories\[0\] has no 'id' or 'name'"):
        load(coco_json([(1, "a.jpg")], [], categories=[{}]))
    with pytest.raises(ValueError, match="category_id 5"):
        load(coco_json([(1, "a.jpg")], [(1, 5, 1.0)]))
    with pytest.raises(ValueError, match="several categories named 'dog'"):
        load(coco_json([(1, "a.jpg")], [(1, 1, 1.0)], CATEGORIES + [{"id": 40, "name": "dog"}]))
    # Without an area field the box area counts (4 x 5).
    data = coco_json([(1, "a.jpg")], [(1, 1, 1.0)])
    del data["annotations"][0]["area"]
    assert load(data).areas.tolist() == [[20.0, 0.0, 0.0]]


# ----------------------------------------------------------------------- CSV
def write_csv(path: Path, text: str, images=(), root: Path | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    for name in images:
        write_image((root or path.parent) / name)
    return path


NAMES_CSV = """image,labels
img/1.jpg,dog person
img/2.jpg,cat
img/3.jpg,  person   dog  cat
"""


def test_csv_names_format(tmp_path):
    path = write_csv(tmp_path / "train.csv", NAMES_CSV, ["img/1.jpg", "img/2.jpg", "img/3.jpg"])
    ds = CsvDataset(path, transform=build_test_transform(16))
    assert ds.class_names == ["cat", "dog", "person"]  # sorted names of the file
    assert ds.targets.tolist() == [[0, 1, 1], [1, 0, 0], [1, 1, 1]]
    assert ds.paths == [str(tmp_path / "img" / f"{i}.jpg") for i in (1, 2, 3)]
    assert ds.areas.abs().sum() == 0
    batch = collate([ds[0], ds[1]])
    assert batch["image"].shape == (2, 3, 16, 16) and batch["target"].tolist() == [[0, 1, 1], [1, 0, 0]]
    # A given class list fixes the order (and may hold classes the file lacks).
    given = CsvDataset(path, classes=["person", "dog", "cat", "bird"])
    assert given.class_names == ["person", "dog", "cat", "bird"]
    assert given.targets.tolist() == [[1, 1, 0, 0], [0, 0, 1, 0], [1, 1, 1, 0]]


def test_csv_label_delimiter_tsv_and_class_file(tmp_path):
    text = "file\ttags\na.png\ttraffic light|fire hydrant\nb.png\tfire hydrant\n"
    path = write_csv(tmp_path / "data" / "list.tsv", text, ["a.png", "b.png"], root=tmp_path / "images")
    classes = tmp_path / "classes.txt"
    classes.write_text("# my classes\nfire hydrant\ntraffic light\n\nstop sign\n")
    assert read_class_list(classes) == ["fire hydrant", "traffic light", "stop sign"]
    ds = CsvDataset(path, tmp_path / "images", fmt="names", classes=classes, image_column="file",
                    labels_column="tags", delimiter="\t", label_delimiter="|")  # fmt: skip
    assert ds.targets.tolist() == [[1, 1, 0], [1, 0, 0]]
    assert ds.paths[0] == str(tmp_path / "images" / "a.png")


def test_csv_columns_format(tmp_path):
    text = "image,dog,cat,person\nx/1.jpg,1,0,1\nx/2.jpg,0,1,0\n"
    path = write_csv(tmp_path / "cols.csv", text, ["x/1.jpg", "x/2.jpg"])
    ds = CsvDataset(path, fmt="columns")
    assert ds.class_names == ["dog", "cat", "person"]  # header order
    assert ds.targets.tolist() == [[1, 0, 1], [0, 1, 0]]
    reordered = CsvDataset(path, fmt="columns", classes=["person", "cat", "dog"])
    assert reordered.class_names == ["person", "cat", "dog"] and reordered.targets.tolist() == [[1, 0, 1], [0, 1, 0]]
    assert csv_class_names(path, "columns") == ["dog", "cat", "person"]
    # A class column the class list lacks (an evaluation CSV with a class the training CSV has not)
    # is an error: its labels would be dropped, and images labelled only with it taken for unlabelled.
    with pytest.raises(ValueError, match=r"cols.csv has class columns \['cat'\] that are not among the 2 classes"):
        CsvDataset(path, fmt="columns", classes=["person", "dog"])


def test_csv_errors_name_file_and_line(tmp_path):
    def make(text, **kwargs):
        return CsvDataset(write_csv(tmp_path / "t.csv", text), **kwargs)

    with pytest.raises(ValueError, match=r"t.csv, line 3: unknown label 'bird'.*cat, dog"):
        make("image,labels\na.jpg,dog\nb.jpg,bird\n", classes=["cat", "dog"])
    with pytest.raises(ValueError, match=r"line 2: column 'cat' holds '2'"):
        make("image,dog,cat\na.jpg,1,2\n", fmt="columns")
    with pytest.raises(ValueError, match=r"no column 'labels'.*\['image', 'tags'\]"):
        make("image,tags\na.jpg,dog\n")
    with pytest.raises(ValueError, match="no column for the classes \\['bird'\\]"):
        make("image,dog\na.jpg,1\n", fmt="columns", classes=["dog", "bird"])
    with pytest.raises(ValueError, match="line 3: image 'a.jpg' is listed twice \\(first on line 2\\)"):
        make("image,labels\na.jpg,dog\na.jpg,cat\n")
    with pytest.raises(ValueError, match="line 2: empty image path"):
        make("image,labels\n,dog\n")
    with pytest.raises(ValueError, match="line 2: 3 cells for 2 columns"):
        make("image,labels\na.jpg,dog,cat\n")
    with pytest.raises(ValueError, match="is empty"):
        make("")
    with pytest.raises(ValueError, match="lists no image"):
        make("image,labels\n", classes=["dog"])
    with pytest.raises(ValueError, match="lists 'dog' more than once"):
        make("image,labels\na.jpg,dog\n", classes=["dog", "dog"])
    with pytest.raises(ValueError, match=r"the header of .*t.csv lists 'dog' more than once"):
        make("image,dog,cat,dog\na.jpg,1,0,1\n", fmt="columns")
    with pytest.raises(FileNotFoundError, match="nothere.csv"):
        CsvDataset(tmp_path / "nothere.csv")
    with pytest.raises(ValueError, match="label delimiter is empty"):
        make("image,labels\na.jpg,dog|cat\n", label_delimiter="")


def test_csv_empty_label_sets(tmp_path, caplog):
    text = "image,labels\na.jpg,dog\nb.jpg,\nc.jpg,cat\n"
    path = write_csv(tmp_path / "e.csv", text)
    with caplog.at_level("INFO", logger="gkg_pyg"):
        dropped = CsvDataset(path)
    assert [Path(p).name for p in dropped.paths] == ["a.jpg", "c.jpg"] and dropped.num_without_labels == 1
    # Never silently: the count, the file and the option that keeps them.
    (record,) = [r for r in caplog.records if r.name.startswith("gkg_pyg.data")]
    assert record.levelname == "INFO"
    assert record.message.startswith(f"dropped 1 of the 3 rows of {path} without any label")
    assert "data.empty_labels: keep" in record.message
    caplog.clear()
    with caplog.at_level("INFO", logger="gkg_pyg"):
        CsvDataset(write_csv(tmp_path / "full.csv", "image,labels\na.jpg,dog\n"))
    assert not caplog.records  # nothing left out, nothing said
    with caplog.at_level("INFO", logger="gkg_pyg"):
        kept = CsvDataset(path, empty_labels="keep")
    assert "kept 1 of the 3 rows" in caplog.text and "all-negative" in caplog.text
    assert kept.targets.tolist() == [[0, 1], [0, 0], [1, 0]]
    with pytest.raises(ValueError, match=r"1 of the 3 images of .*e.csv have no label \(line 3 'b.jpg'\)"):
        CsvDataset(path, empty_labels="error")
    cols = write_csv(tmp_path / "c.csv", "image,dog,cat\na.jpg,0,0\nb.jpg,1,0\n")
    with pytest.raises(ValueError, match="line 2 'a.jpg'"):
        CsvDataset(cols, fmt="columns", empty_labels="error")


def data_section(root: Path, **extra) -> dict:
    """A config's data section (the keys dataset_from_config reads)."""
    base = {"name": "csv", "root": str(root), "train_split": "train", "val_split": "val", "skip_bad_images": False,
            "empty_labels": "drop", "ann_file": {"train": None, "val": None},
            "image_dir": {"train": None, "val": None},
            "csv": {"train": None, "val": None, "format": "names", "classes": None, "image_column": "image",
                    "labels_column": "labels", "delimiter": ",", "label_delimiter": " "}}  # fmt: skip
    for key, value in extra.items():
        if isinstance(value, dict):
            base[key] = {**base[key], **value}
        else:
            base[key] = value
    return base


def test_dataset_from_config_csv_val_uses_training_classes(tmp_path):
    write_csv(tmp_path / "train.csv", NAMES_CSV)
    write_csv(tmp_path / "val.csv", "image,labels\nv.jpg,person\n")
    cfg = data_section(tmp_path, csv={"train": "train.csv", "val": "val.csv"})
    train, val = dataset_from_config(cfg, "train"), dataset_from_config(cfg, "val")
    assert train.class_names == val.class_names == ["cat", "dog", "person"]
    assert val.targets.tolist() == [[0, 0, 1]]
    write_csv(tmp_path / "val.csv", "image,labels\nv.jpg,horse\n")
    with pytest.raises(ValueError, match="val.csv, line 2: unknown label 'horse'"):
        dataset_from_config(cfg, "val")
    cfg = data_section(
        tmp_path, csv={"train": "train.csv", "val": "val.csv", "classes": ["horse", "cat", "dog", "person"]}
    )
    assert dataset_from_config(cfg, "val").class_names == ["horse", "cat", "dog", "person"]
    cfg["image_dir"] = {"train": "pictures", "val": None}
    assert dataset_from_config(cfg, "train").paths[0] == str(tmp_path / "pictures" / "img" / "1.jpg")
    with pytest.raises(ValueError, match="no CSV file given"):
        dataset_from_config(data_section(tmp_path, csv={"train": "train.csv"}), "val")


def test_dataset_from_config_coco(tmp_path):
    root = write_coco_split(tmp_path / "c", "train2017")
    write_coco_split(root, "val2017")
    cfg = data_section(root, name="coco")
    assert dataset_from_config(cfg, "val").ann_file.name == "instances_val2017.json"
    cfg["ann_file"] = {"train": "annotations/instances_val2017.json", "val": None}
    cfg["image_dir"] = {"train": "val2017", "val": None}
    assert dataset_from_config(cfg, "train").ann_file.name == "instances_val2017.json"
    cfg["empty_labels"] = "keep"
    assert len(dataset_from_config(cfg, "val")) == 3


# ------------------------------------------------------------ up-front check
def test_check_dataset_raises_or_excludes(tmp_path):
    names = [f"img/{i}.jpg" for i in range(6)]
    text = "image,labels\n" + "".join(f"{n},{'dog' if i % 2 else 'cat'}\n" for i, n in enumerate(names))
    path = write_csv(tmp_path / "l.csv", text, names)
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(buf, "JPEG")
    (tmp_path / "img" / "2.jpg").write_bytes(buf.getvalue()[:900])  # truncated
    (tmp_path / "img" / "4.jpg").unlink()

    ds = CsvDataset(path)
    # The header check does not decode JPEG data: only the missing file is found.
    assert find_bad_images(ds.paths, "header", workers=2, progress=False) == [(str(tmp_path / "img" / "4.jpg"),
                                                                               "missing file")]  # fmt: skip
    with pytest.raises(
        BadImagesError,
        match=r"2 of the 6 training images are missing or unreadable: .*2.jpg "
        r"\(.*truncated.*\); .*4.jpg \(missing file\).*--skip-bad-images",
    ):
        check_dataset(ds, "decode", progress=False)
    assert len(ds) == 6

    report = check_dataset(ds, "decode", skip_bad_images=True, what="evaluation", progress=False)
    assert report.checked == 6 and report.missing == 1 and len(report.bad) == 2
    assert len(ds) == 4 and ds.excluded == [str(tmp_path / "img" / "2.jpg"), str(tmp_path / "img" / "4.jpg")]
    assert [Path(p).name for p in ds.paths] == ["0.jpg", "1.jpg", "3.jpg", "5.jpg"]
    assert ds.targets.tolist() == [[1, 0], [0, 1], [0, 1], [0, 1]]
    assert ds[2]["path"].endswith("3.jpg")

    only_missing = CsvDataset(path, classes=["cat", "dog"])
    (tmp_path / "img" / "2.jpg").unlink()
    with pytest.raises(FileNotFoundError, match="2 of the 6 training images are missing: "):
        check_dataset(only_missing, "exists", progress=False)


def test_unreadable_image_mid_epoch_names_path_or_is_counted(tmp_path):
    """An image that breaks after the check: the loader's error names it, or it is skipped and counted."""
    names = ["a.jpg", "b.jpg", "c.jpg"]
    path = write_csv(tmp_path / "l.csv", "image,labels\n" + "".join(f"{n},x\n" for n in names), names)
    ds = CsvDataset(path, transform=build_test_transform(8))
    check_dataset(ds, "decode", progress=False)
    (tmp_path / "b.jpg").write_bytes(b"\xff\xd8\xff broken")
    loader = torch.utils.data.DataLoader(ds, batch_size=3, num_workers=1, collate_fn=collate)
    with pytest.raises(OSError, match="b.jpg"):
        next(iter(loader))
    end_failed_loader_workers()
    ds.skip_bad_images = True
    with pytest.warns(UserWarning, match="b.jpg"):
        batch = collate([ds[i] for i in range(3)])
    assert batch["num_skipped"] == 1 and batch["image"].shape[0] == 2


# --------------------------------------------------- training on each format
@pytest.mark.parametrize("kind", ["coco2017", "coco_files", "csv_names", "csv_columns"])
def test_train_one_step_on_each_format(tmp_path, kind, capsys):
    root = tmp_path / "data"
    config = tmp_path / f"{kind}.yaml"
    config.write_text(TINY_MODEL.format(name=kind, root=root, runs=tmp_path / "runs", data=build_format(kind, root)))
    if kind == "csv_names":  # a fifth training row without labels: left out, and the run says so
        with (root / "train.csv").open("a") as f:
            f.write("imgs/train/0.png_unlabelled.png,\n")
    assert run_script("train", config) == 0
    printed = capsys.readouterr().out
    assert "4 training images" in printed
    if kind == "csv_names":
        assert f"dropped 1 of the 5 rows of {root / 'train.csv'} without any label" in printed
        assert printed.index("dropped 1 of the 5 rows") < printed.index("4 training images")
    run = tmp_path / "runs" / kind
    state = torch.load(run / "checkpoint_last.pth", weights_only=True)
    # COCO: category-id order (cat 2, dog 5, bird 9); CSV: sorted names / header order.
    expected = ["cat", "dog", "bird"] if kind.startswith("coco") else ["bird", "cat", "dog"]
    assert state["class_names"] == expected
    assert state["step"] == 1 and state["epoch"] == 1  # 4 images, batch 4: one optimiser step
    assert state["preprocess"] == {"img_size": 33, "resize": "bicubic", "mean": list(MEAN), "std": list(STD)}
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["model"]["num_images"] == 2 and metrics["model"]["num_skipped"] == 0
