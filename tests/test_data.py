"""Tests of gkg_pyg.data: loaders against hand-written fixtures, error
handling, the synthetic generator, transforms and repeat-factor sampling."""

from __future__ import annotations

import io
import itertools
import json
import math
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from gkg_pyg.data import (
    SYNTHETIC_CLASSES,
    VOC_CLASSES,
    CocoDataset,
    CropMix,
    VOC2007Dataset,
    build_dataset,
    build_test_transform,
    build_train_transform,
    collate,
    ensure_synthetic,
    make_synthetic_coco,
    repeat_factor_indices,
    synthetic_params,
)
from gkg_pyg.data import synthetic as synth
from gkg_pyg.data.transforms import MEAN, STD, cropmix_scales


def _write_jpeg(path: Path, colour=(200, 30, 30), size=(20, 14)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path, quality=95)


# ----------------------------------------------------------------- COCO fixture
# Categories listed out of id order and with gaps: columns must follow id order.
COCO_CATEGORIES = [
    {"id": 7, "name": "kite", "supercategory": "x"},
    {"id": 1, "name": "person", "supercategory": "x"},
    {"id": 3, "name": "car", "supercategory": "x"},
]
COCO_IMAGES = [
    {"id": 10, "file_name": "a.jpg", "width": 20, "height": 14},
    {"id": 5, "file_name": "b.jpg", "width": 20, "height": 14},
    {"id": 20, "file_name": "c.jpg", "width": 20, "height": 14},  # no annotation: dropped
]


def _ann(ann_id, image_id, cat, area, crowd=0):
    return {"id": ann_id, "image_id": image_id, "category_id": cat, "area": area,
            "bbox": [0, 0, 2, 2], "iscrowd": crowd, "segmentation": [[0, 0, 2, 0, 2, 2]]}  # fmt: skip


COCO_ANNOTATIONS = [
    _ann(1, 10, 1, 50.0),  # person twice with different areas: keep the largest
    _ann(2, 10, 1, 300.0),
    _ann(3, 10, 7, 2000.0),
    _ann(4, 5, 3, 5000.0, crowd=1),  # crowd annotations label the image too
]
# Expected, images in id order (5, 10), columns in category-id order (1, 3, 7).
COCO_NAMES = ["person", "car", "kite"]
COCO_TARGETS = [[0, 1, 0], [1, 0, 1]]
COCO_AREAS = [[0, 5000, 0], [300, 0, 2000]]


def _write_coco(root: Path, split="train", annotations=COCO_ANNOTATIONS, images=COCO_IMAGES) -> Path:
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    data = {"images": images, "annotations": annotations, "categories": COCO_CATEGORIES}
    (root / "annotations" / f"instances_{split}2014.json").write_text(json.dumps(data))
    for i, img in enumerate(images):
        _write_jpeg(root / f"{split}2014" / img["file_name"], colour=(40 * i, 100, 200))
    return root


@pytest.fixture
def data_coco_root(tmp_path) -> Path:
    return _write_coco(tmp_path / "coco")


# ------------------------------------------------------------------ VOC fixture
VOC_OBJECTS = {
    # dog: one difficult, one not -> 1; cat: difficult only -> -1
    "000001": [("dog", 1), ("dog", 0), ("cat", 1)],
    # person without a <difficult> tag counts as not difficult; bird: a
    # later difficult object must not demote the label to -1
    "000002": [("person", None), ("bird", 0), ("bird", 1)],
}


def _voc_xml(objects) -> str:
    parts = ["<annotation><filename>x.jpg</filename>"]
    for name, difficult in objects:
        tag = "" if difficult is None else f"<difficult>{difficult}</difficult>"
        box = "<bndbox><xmin>1</xmin><ymin>1</ymin><xmax>5</xmax><ymax>5</ymax></bndbox>"
        parts.append(f"<object><name>{name}</name><pose>Left</pose>{tag}{box}</object>")
    return "".join(parts) + "</annotation>"


@pytest.fixture
def data_voc_root(tmp_path) -> Path:
    root = tmp_path / "voc"
    base = root / "VOCdevkit" / "VOC2007"
    (base / "ImageSets" / "Main").mkdir(parents=True)
    (base / "Annotations").mkdir()
    for image_id, objects in VOC_OBJECTS.items():
        (base / "Annotations" / f"{image_id}.xml").write_text(_voc_xml(objects))
        _write_jpeg(base / "JPEGImages" / f"{image_id}.jpg")
    (base / "ImageSets" / "Main" / "trainval.txt").write_text("000001\n000002\n")
    (base / "ImageSets" / "Main" / "test.txt").write_text("000002\n")
    return root


def _voc_expected() -> torch.Tensor:
    expected = torch.zeros(2, 20)
    expected[0, VOC_CLASSES.index("dog")] = 1
    expected[0, VOC_CLASSES.index("cat")] = -1
    expected[1, VOC_CLASSES.index("person")] = 1
    expected[1, VOC_CLASSES.index("bird")] = 1
    return expected


# ------------------------------------------------------------------------ COCO
def test_coco_labels_areas_and_order(data_coco_root):
    ds = build_dataset("coco", data_coco_root, "train")
    assert isinstance(ds, CocoDataset)
    assert ds.class_names == COCO_NAMES
    assert len(ds) == 2 and ds.image_ids == [5, 10]
    assert torch.equal(ds.targets, torch.tensor(COCO_TARGETS, dtype=torch.float32))
    assert torch.equal(ds.areas, torch.tensor(COCO_AREAS, dtype=torch.float32))
    assert [Path(p).name for p in ds.paths] == ["b.jpg", "a.jpg"]


def test_coco_sample_and_collate(data_coco_root):
    ds = build_dataset("coco", data_coco_root, "train", transform=build_test_transform(24))
    sample = ds[1]
    assert sample["image"].shape == (3, 24, 24) and sample["image"].dtype == torch.float32
    assert torch.equal(sample["target"], torch.tensor([1.0, 0.0, 1.0]))
    assert torch.equal(sample["area"], torch.tensor([300.0, 0.0, 2000.0]))
    assert sample["index"] == 1 and sample["path"].endswith("a.jpg")
    batch = collate([ds[0], ds[1]])
    assert batch["image"].shape == (2, 3, 24, 24)
    assert torch.equal(batch["target"], ds.targets)
    assert torch.equal(batch["area"], ds.areas)
    assert batch["index"].tolist() == [0, 1] and batch["num_skipped"] == 0
    assert [Path(p).name for p in batch["path"]] == ["b.jpg", "a.jpg"]
    # Works with DataLoader workers (picklable data set and transform).
    loader = torch.utils.data.DataLoader(ds, batch_size=2, num_workers=1, collate_fn=collate)
    assert torch.equal(next(iter(loader))["target"], ds.targets)


def test_coco_missing_files(tmp_path, data_coco_root):
    with pytest.raises(FileNotFoundError, match="instances_val2014.json"):
        CocoDataset(data_coco_root, "val")
    root = _write_coco(tmp_path / "noimages")
    for f in (root / "train2014").iterdir():
        f.unlink()
    (root / "train2014").rmdir()
    with pytest.raises(FileNotFoundError, match="train2014"):
        CocoDataset(root, "train")


def test_coco_unknown_category(tmp_path):
    root = _write_coco(tmp_path / "badcat", annotations=COCO_ANNOTATIONS + [_ann(9, 5, 99, 10.0)])
    with pytest.raises(ValueError, match="category_id 99"):
        CocoDataset(root, "train")


def test_coco_empty(tmp_path):
    root = _write_coco(tmp_path / "empty", annotations=[])
    with pytest.raises(ValueError, match="no image with at least one label"):
        CocoDataset(root, "train")


def test_bad_images_raise_with_path(data_coco_root):
    ds = CocoDataset(data_coco_root, "train")
    corrupt = data_coco_root / "train2014" / "b.jpg"
    corrupt.write_bytes(b"this is not a jpeg")
    with pytest.raises(OSError, match="b.jpg"):
        ds[0]
    # A truncated JPEG: PIL's own error does not name the file.
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(buf, "JPEG")
    truncated = data_coco_root / "train2014" / "a.jpg"
    truncated.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    with pytest.raises(OSError, match="a.jpg"):
        ds[1]
    truncated.unlink()
    with pytest.raises(FileNotFoundError, match="a.jpg"):
        ds[1]


def test_skip_bad_images(data_coco_root):
    (data_coco_root / "train2014" / "b.jpg").write_bytes(b"\xff\xd8garbage")
    ds = build_dataset("coco", data_coco_root, "train", build_test_transform(16), skip_bad_images=True)
    with pytest.warns(UserWarning, match="b.jpg"):
        bad = ds[0]
    assert bad is None
    batch = collate([bad, ds[1], None])
    assert batch["num_skipped"] == 2
    assert batch["image"].shape == (1, 3, 16, 16) and batch["index"].tolist() == [1]
    empty = collate([None, None])
    assert empty["num_skipped"] == 2 and empty["image"] is None and empty["index"].numel() == 0


def test_unknown_dataset_name(tmp_path):
    with pytest.raises(ValueError, match="imagenet"):
        build_dataset("imagenet", tmp_path, "train")


# ------------------------------------------------------------------------- VOC
def test_voc_labels_difficult(data_voc_root):
    ds = build_dataset("voc2007", data_voc_root, "trainval")
    assert isinstance(ds, VOC2007Dataset)
    assert ds.class_names == list(VOC_CLASSES) and len(VOC_CLASSES) == 20
    assert torch.equal(ds.targets, _voc_expected())
    assert torch.equal(ds.areas, torch.zeros(2, 20))
    # root pointing directly at VOC2007, another split
    direct = VOC2007Dataset(data_voc_root / "VOCdevkit" / "VOC2007", "test", build_test_transform(8))
    assert torch.equal(direct.targets, _voc_expected()[1:])
    sample = direct[0]
    assert sample["image"].shape == (3, 8, 8) and sample["path"].endswith("000002.jpg")


def test_voc_errors(data_voc_root):
    with pytest.raises(FileNotFoundError, match="val.txt"):
        VOC2007Dataset(data_voc_root, "val")
    base = data_voc_root / "VOCdevkit" / "VOC2007"
    (base / "ImageSets" / "Main" / "train.txt").write_text("\n")
    with pytest.raises(ValueError, match="empty"):
        VOC2007Dataset(data_voc_root, "train")
    (base / "ImageSets" / "Main" / "train.txt").write_text("000003\n")
    with pytest.raises(FileNotFoundError, match="000003.xml"):
        VOC2007Dataset(data_voc_root, "train")
    (base / "Annotations" / "000003.xml").write_text(_voc_xml([("unicorn", 0)]))
    with pytest.raises(ValueError, match="unicorn"):
        VOC2007Dataset(data_voc_root, "train")


# ------------------------------------------------------------------- synthetic
@pytest.fixture(scope="module")
def data_synthetic_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("synthetic")
    return make_synthetic_coco(root, num_train=40, num_val=10, image_size=256, seed=0, progress=False)


@pytest.mark.filterwarnings("ignore::DeprecationWarning:pycocotools")
def test_synthetic_readable_by_coco_loader(data_synthetic_root):
    ds = build_dataset("synthetic", data_synthetic_root, "train", build_test_transform(32))
    assert len(ds) == 40 and ds.class_names == list(SYNTHETIC_CLASSES)
    assert len(build_dataset("coco", data_synthetic_root, "val")) == 10
    counts = ds.targets.sum(dim=1)
    assert counts.min() >= 1 and counts.max() <= 4
    assert counts.float().mean() > 1.3  # multi-label, not one object per image
    # area > 0 exactly where the label is present
    assert torch.equal(ds.areas > 0, ds.targets == 1)
    assert ds[0]["image"].shape == (3, 32, 32)
    # The json matches real COCO's structure and pycocotools reads masks back.
    data = json.loads((data_synthetic_root / "annotations" / "instances_train2014.json").read_text())
    ann = data["annotations"][0]
    assert {"id", "image_id", "category_id", "bbox", "area", "iscrowd", "segmentation"} <= set(ann)
    from pycocotools.coco import COCO

    coco = COCO(str(data_synthetic_root / "annotations" / "instances_train2014.json"))
    assert coco.annToMask(ann).sum() == ann["area"]


def test_synthetic_scale_buckets_and_cooccurrence(data_synthetic_root):
    ds = CocoDataset(data_synthetic_root, "train")
    areas = ds.areas[ds.targets == 1]
    assert (areas < 32**2).any(), "no small object"
    assert ((areas >= 32**2) & (areas <= 96**2)).any(), "no medium object"
    assert (areas > 96**2).any(), "no large object"
    pairs = [(SYNTHETIC_CLASSES.index(a), SYNTHETIC_CLASSES.index(b)) for a, b in synth.PARTNER_PAIRS]
    together = sum(int(((ds.targets[:, a] == 1) & (ds.targets[:, b] == 1)).sum()) for a, b in pairs)
    assert together >= 3


def test_synthetic_partner_classes_cooccur():
    # Label statistics of many layouts (no rendering): P(partner | class)
    # must clearly exceed P(other class | class).
    rng = np.random.default_rng(123)
    present = np.zeros((4000, len(SYNTHETIC_CLASSES)), dtype=bool)
    for i in range(len(present)):
        for obj in synth.sample_objects(rng, 256):
            present[i, obj.label] = True
    for a, b in synth.PARTNER_PAIRS:
        ia, ib = SYNTHETIC_CLASSES.index(a), SYNTHETIC_CLASSES.index(b)
        p_partner = present[present[:, ia], ib].mean()
        others = [c for c in range(len(SYNTHETIC_CLASSES)) if c not in (ia, ib)]
        p_other = present[present[:, ia]][:, others].mean()
        assert p_partner > 2.0 * p_other, (a, b, p_partner, p_other)


def _tree_bytes(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file() and not p.name.startswith(".")
    }


def test_synthetic_deterministic(tmp_path):
    kw = dict(num_train=5, num_val=2, image_size=96, progress=False)
    a = _tree_bytes(make_synthetic_coco(tmp_path / "a", seed=3, **kw))
    b = _tree_bytes(make_synthetic_coco(tmp_path / "b", seed=3, **kw))
    c = _tree_bytes(make_synthetic_coco(tmp_path / "c", seed=4, **kw))
    assert len(a) == 2 + 5 + 2
    assert a == b
    assert a.keys() == c.keys() and a != c
    # More images than one worker chunk: the output does not depend on workers.
    kw = dict(num_train=synth.CHUNK + 10, num_val=1, image_size=64, seed=0, progress=False)
    one = _tree_bytes(make_synthetic_coco(tmp_path / "w1", workers=1, **kw))
    two = _tree_bytes(make_synthetic_coco(tmp_path / "w2", workers=2, **kw))
    assert one == two


def test_synthetic_idempotent_and_atomic(tmp_path, monkeypatch):
    root = tmp_path / "s"
    kw = dict(num_train=3, num_val=2, image_size=64, seed=0, progress=False)
    ensure_synthetic(root, **kw)
    ann = root / "annotations" / "instances_train2014.json"
    stamp = ann.stat().st_mtime_ns
    assert synthetic_params(root) == {k: kw[k] for k in ("num_train", "num_val", "image_size", "seed")}
    ensure_synthetic(root, **kw)
    assert ann.stat().st_mtime_ns == stamp  # same parameters: nothing regenerated
    # build_dataset without parameters uses the existing data set as it is.
    assert len(build_dataset("synthetic", root, "train")) == 3
    assert len(build_dataset("synthetic", root, "train", synthetic=dict(kw, num_train=4))) == 4

    # A generation killed half-way never leaves a data set that looks
    # complete: the old one stays intact (it is only replaced at the end),
    # a fresh root gets no annotation file, and the next call regenerates.
    real = synth._generate_split

    def killed(out_dir, split, *args):
        if split == "val":
            raise KeyboardInterrupt
        return real(out_dir, split, *args)

    monkeypatch.setattr(synth, "_generate_split", killed)
    with pytest.raises(KeyboardInterrupt):
        ensure_synthetic(root, **dict(kw, num_train=2))
    assert synthetic_params(root)["num_train"] == 4 and len(CocoDataset(root, "train")) == 4
    fresh = tmp_path / "fresh"
    with pytest.raises(KeyboardInterrupt):
        ensure_synthetic(fresh, **kw)
    assert not (fresh / "annotations" / "instances_train2014.json").exists()
    assert synthetic_params(fresh) is None
    monkeypatch.setattr(synth, "_generate_split", real)
    ensure_synthetic(root, **dict(kw, num_train=2))
    assert len(CocoDataset(root, "train")) == 2 and not (root / ".synthetic-staging").exists()


def test_synthetic_refuses_foreign_root(data_coco_root):
    with pytest.raises(ValueError, match="refusing to overwrite"):
        make_synthetic_coco(data_coco_root, num_train=2, num_val=1, image_size=64, progress=False)
    assert (data_coco_root / "train2014" / "a.jpg").exists()


# ------------------------------------------------------------------ transforms
def test_test_transform_normalisation():
    colour = (124, 116, 104)
    out = build_test_transform(40)(Image.new("RGB", (70, 30), colour))
    assert out.shape == (3, 40, 40) and out.dtype == torch.float32
    expected = torch.tensor([(c / 255.0 - m) / s for c, m, s in zip(colour, MEAN, STD)])
    assert torch.allclose(out.mean(dim=(1, 2)), expected, atol=1e-5)
    assert torch.allclose(torch.tensor(MEAN) * 255, torch.tensor([123.675, 116.28, 103.53]))


def test_train_transform_shapes_and_pickle():
    torch.manual_seed(0)
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (50, 80, 3), dtype=np.uint8))
    transform = pickle.loads(pickle.dumps(build_train_transform(48)))
    for _ in range(6):
        out = transform(image)
        assert out.shape == (3, 48, 48) and out.dtype == torch.float32 and torch.isfinite(out).all()
    plain = build_train_transform(
        32, cropmix_prob=0.0, hflip=0.0, color_jitter=0.0, trivial_augment=False, random_erasing=0.0
    )
    assert torch.allclose(plain(image), build_test_transform(32)(image))


def test_cropmix_scales():
    assert cropmix_scales(2, 0.01) == [(0.01, 1.0), (0.99, 1.0)]
    s4 = cropmix_scales(4, 0.2)
    assert len(s4) == 4 and s4[-1] == (0.99, 1.0)
    for k, (lo, hi) in enumerate(s4[:3]):
        assert math.isclose(lo, 0.2 + k * 0.2) and math.isclose(hi, 0.2 + (k + 1) * 0.2)


@pytest.mark.parametrize("n", [2, 3])
def test_cropmix_blends_views(monkeypatch, n):
    # Record the crops CropMix takes and fix every mixup weight to 0.3: the
    # output must be the sequential blend of the recorded crops in some order.
    views = []
    real_crop = CropMix._crop

    def recording_crop(self, image, scale):
        view = real_crop(self, image, scale)
        views.append(view)
        return view

    monkeypatch.setattr(CropMix, "_crop", recording_crop)
    monkeypatch.setattr(torch.distributions.Beta, "sample", lambda self, *a: torch.tensor(0.3))
    image = Image.fromarray(np.random.default_rng(1).integers(0, 255, (60, 60, 3), dtype=np.uint8))
    torch.manual_seed(0)
    out = CropMix(32, crops=(n,), min_scale=0.05, channel_permute=False)(image)
    assert out.size == (32, 32) and len(views) == n
    assert not torch.allclose(views[0], views[1], atol=0.05)  # different crops
    result = torch.from_numpy(np.array(out)).permute(2, 0, 1).float() / 255.0
    errors = []
    for order in itertools.permutations(views):
        mixed = order[0]
        for view in order[1:]:
            mixed = 0.3 * mixed + 0.7 * view
        errors.append((mixed - result).abs().max().item())
    assert min(errors) <= 0.5 / 255.0 + 1e-5


def test_cropmix_with_probability_one_changes_colours():
    # A uniform red image: every crop is red, so only blending with a
    # channel-permuted view can change its colour; p=0 never does.
    red = Image.new("RGB", (40, 40), (255, 0, 0))
    torch.manual_seed(0)
    only_crop = dict(hflip=0.0, color_jitter=0.0, trivial_augment=False, random_erasing=0.0)
    mixed = build_train_transform(16, cropmix_prob=1.0, **only_crop)
    plain = build_train_transform(16, cropmix_prob=0.0, **only_crop)
    expected_red = build_test_transform(16)(red)
    # About 40% of draws visibly change the colour (the U-shaped Beta often
    # gives a near-0/1 weight, and 1 in 6 permutations is the identity).
    changed = sum(not torch.allclose(mixed(red), expected_red, atol=0.05) for _ in range(40))
    assert changed >= 8
    assert all(torch.allclose(plain(red), expected_red) for _ in range(5))


def test_transform_argument_errors():
    with pytest.raises(ValueError, match="cropmix_prob"):
        build_train_transform(32, cropmix_prob=1.5)
    with pytest.raises(ValueError, match="crop counts"):
        build_train_transform(32, cropmix_crops=(1, 2))


# -------------------------------------------------------------------- sampling
def test_repeat_factor_indices_hand_case():
    targets = torch.tensor(
        [
            [1, 0, 0, 0],  # class 0: f = 4/8, r = sqrt(2)   -> 2
            [1, 1, 0, 0],  # class 1: f = 1/8, r = sqrt(8)   -> 3
            [1, 0, 1, 0],  # class 2: f = 2/8, r = 2         -> 2
            [0, 0, 1, -1],  # difficult-only class 3 does not count
            [0, 0, 0, 0],  # no label: r = 1
            [0, 0, 0, 1],  # class 3: f = 1/8 (not 2/8)      -> 3
            [1, 0, 0, 0],
            [0, 0, 0, 0],
        ],
        dtype=torch.float32,
    )
    expected = [0, 0, 1, 1, 1, 2, 2, 3, 3, 4, 5, 5, 5, 6, 6, 7]
    assert repeat_factor_indices(targets, threshold=1.0) == expected
    assert repeat_factor_indices(targets, threshold=1e-3) == list(range(8))


def test_repeat_factor_indices_brute_force():
    rng = np.random.default_rng(0)
    targets = (rng.random((60, 7)) < rng.random(7) * 0.3).astype(np.float32)
    threshold = 0.05
    freq = targets.mean(axis=0)
    expected = []
    for i, row in enumerate(targets):
        r = max([max(1.0, math.sqrt(threshold / freq[c])) for c in range(7) if row[c] == 1], default=1.0)
        expected += [i] * math.ceil(r)
    assert repeat_factor_indices(torch.from_numpy(targets), threshold) == expected
