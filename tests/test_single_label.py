"""Single-label data sets (image folder, CIFAR pickles, synthetic shapes), loss, Mixup/CutMix and metrics.

The CIFAR fixtures are written in the real format: python pickles of dicts
with bytes keys (b'data' (N, 3072) uint8 in R, G, B planes, b'labels' /
b'fine_labels'), and the meta files batches.meta / meta."""

import pickle

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from gkg_pyg.config import DEFAULTS
from gkg_pyg.data.single_label import (
    SYNTHETIC_SHAPES,
    CIFARDataset,
    ImageFolderDataset,
    collate_single_label,
    ensure_synthetic_shapes,
    make_synthetic_shapes,
    single_label_transform,
)
from gkg_pyg.single_label import (
    MixupCutmix,
    SingleLabelLoss,
    confusion_matrix,
    single_label_metrics,
    topk_accuracy,
    write_confusion_matrix,
)

from helpers import load_script, write_cifar


# ---------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["cifar10", "cifar100"])
def test_cifar_reads_the_python_pickles(tmp_path, name):
    expected = write_cifar(tmp_path, name)
    for split, (pixels, labels) in expected.items():
        ds = CIFARDataset(tmp_path, split, name)
        assert len(ds) == len(labels) and ds.num_classes == (10 if name == "cifar10" else 100)
        assert ds.class_names[3] == ("class3" if name == "cifar10" else "fine3")
        for i in (0, len(ds) - 1):
            sample = ds[i]
            assert np.array_equal(np.asarray(sample["image"]), pixels[i])  # planes -> HWC in the right order
            assert sample["target"].dtype == torch.long and int(sample["target"]) == labels[i]
    # the data set folder itself works as root too
    folder = tmp_path / ("cifar-10-batches-py" if name == "cifar10" else "cifar-100-python")
    assert len(CIFARDataset(folder, "test", name)) == len(expected["test"][1])


def test_cifar_errors_name_the_problem(tmp_path):
    with pytest.raises(FileNotFoundError, match="cifar-10-batches-py"):
        CIFARDataset(tmp_path, "train", "cifar10")
    write_cifar(tmp_path, "cifar10")
    with pytest.raises(ValueError, match="split must be 'train' or 'test'"):
        CIFARDataset(tmp_path, "val", "cifar10")
    (tmp_path / "cifar-10-batches-py" / "data_batch_3").write_bytes(b"not a pickle")
    with pytest.raises(ValueError, match="data_batch_3"):
        CIFARDataset(tmp_path, "train", "cifar10")
    with open(tmp_path / "cifar-10-batches-py" / "data_batch_3", "wb") as f:
        pickle.dump({b"data": np.zeros((2, 100), np.uint8), b"labels": [0, 1]}, f)
    with pytest.raises(ValueError, match=r"uint8 \(N, 3072\)"):
        CIFARDataset(tmp_path, "train", "cifar10")


def test_image_folder_layout(tmp_path):
    for split, counts in (("train", {"cat": 3, "dog": 2}), ("val", {"dog": 1})):
        for name, n in counts.items():
            (tmp_path / split / name / "sub").mkdir(parents=True)
            for i in range(n):
                Image.new("RGB", (10 + i, 8), (i * 40, 0, 0)).save(tmp_path / split / name / f"{i}.png")
            (tmp_path / split / name / "notes.txt").write_text("ignored")
    Image.new("L", (5, 5)).save(tmp_path / "train" / "dog" / "sub" / "deep.JPG")  # recursive, any case, grey
    train = ImageFolderDataset(tmp_path, "train")
    assert train.class_names == ["cat", "dog"] and len(train) == 6
    assert train.labels.tolist() == [0, 0, 0, 1, 1, 1]
    assert train[5]["image"].mode == "RGB" and train[5]["path"].endswith("deep.JPG")
    val = ImageFolderDataset(tmp_path, "val", class_names=train.class_names)
    assert val.labels.tolist() == [1]  # the training split's numbering
    with pytest.raises(FileNotFoundError, match="image folder split not found"):
        ImageFolderDataset(tmp_path, "test")
    (tmp_path / "val" / "bird").mkdir()
    with pytest.raises(ValueError, match="not among the 2 classes"):
        ImageFolderDataset(tmp_path, "val", class_names=train.class_names)
    with pytest.raises(FileNotFoundError, match="holds no image"):
        ImageFolderDataset(tmp_path, "val")


def test_bad_image_is_skipped_or_reported(tmp_path):
    (tmp_path / "train" / "a").mkdir(parents=True)
    Image.new("RGB", (4, 4)).save(tmp_path / "train" / "a" / "good.png")
    (tmp_path / "train" / "a" / "bad.png").write_bytes(b"\x89PNG broken")
    with pytest.raises(OSError, match="bad.png"):
        ImageFolderDataset(tmp_path, "train")[0]
    ds = ImageFolderDataset(tmp_path, "train", skip_bad_images=True, transform=lambda im: torch.zeros(3, 4, 4))
    with pytest.warns(UserWarning, match="bad.png"):
        batch = collate_single_label([ds[0], ds[1]])
    assert batch["num_skipped"] == 1 and batch["image"].shape == (1, 3, 4, 4) and batch["target"].tolist() == [0]
    bad = str(tmp_path / "train" / "a" / "bad.png")
    assert ds.exclude([bad, "not/there.png"]) == 1  # what the up-front image check does with --skip-bad-images
    assert len(ds) == 1 and ds.excluded == [bad] and ds[0]["path"].endswith("good.png")


def test_synthetic_shapes_is_deterministic_and_balanced(tmp_path):
    root = make_synthetic_shapes(tmp_path / "a", num_train=24, num_val=8, image_size=32, seed=3)
    train = ImageFolderDataset(root, "train")
    assert sorted(train.class_names) == sorted(SYNTHETIC_SHAPES)
    assert torch.bincount(train.labels).tolist() == [3] * 8
    again = make_synthetic_shapes(tmp_path / "b", num_train=24, num_val=8, image_size=32, seed=3)
    other = make_synthetic_shapes(tmp_path / "c", num_train=24, num_val=8, image_size=32, seed=4)
    a, b, c = (np.asarray(Image.open(r / "train" / "star" / "000005.png")) for r in (root, again, other))
    assert a.shape == (32, 32, 3) and np.array_equal(a, b) and not np.array_equal(a, c)
    stamp = (root / "train" / "star" / "000005.png").stat().st_mtime_ns
    ensure_synthetic_shapes(root, num_train=24, num_val=8, image_size=32, seed=3)  # complete: untouched
    assert (root / "train" / "star" / "000005.png").stat().st_mtime_ns == stamp
    ensure_synthetic_shapes(root, num_train=16, num_val=8, image_size=32, seed=3)  # other parameters: regenerated
    assert len(ImageFolderDataset(root, "train")) == 16


# ---------------------------------------------------------------------------
# Loss and Mixup/CutMix
# ---------------------------------------------------------------------------
def test_loss_with_label_smoothing_matches_the_formula():
    torch.manual_seed(0)
    logits, target = torch.randn(5, 4, dtype=torch.float64), torch.tensor([0, 3, 1, 1, 2])
    eps = 0.1
    soft = torch.full((5, 4), eps / 4, dtype=torch.float64) + (1 - eps) * F.one_hot(target, 4)
    expected = -(soft * logits.log_softmax(-1)).sum(-1).mean()
    assert torch.allclose(SingleLabelLoss(eps)(logits, target), expected)
    assert torch.allclose(SingleLabelLoss(0.3)(logits, soft), expected)  # soft targets are taken as given
    with pytest.raises(ValueError, match="label_smoothing"):
        SingleLabelLoss(1.0)
    with pytest.raises(ValueError, match="soft targets"):
        SingleLabelLoss()(logits, soft[:, :3])


@pytest.mark.parametrize("batch", [8, 7])
def test_mixup_cutmix_targets_are_smoothed_mixtures(batch):
    torch.manual_seed(0)
    mix = MixupCutmix(num_classes=5, mixup_alpha=0.8, cutmix_alpha=1.0, label_smoothing=0.1)
    images, target = torch.randn(batch, 3, 16, 16), torch.arange(batch) % 5
    mixed, soft = mix(images, target)
    assert mixed.shape == images.shape and soft.shape == (batch, 5)
    assert torch.allclose(soft.sum(1), torch.ones(batch))
    assert (soft >= 0.1 / 5 - 1e-6).all()  # smoothing floor
    assert not torch.equal(mixed[: batch - batch % 2], images[: batch - batch % 2])
    if batch % 2:  # the odd one out keeps its image and its smoothed one-hot target
        assert torch.equal(mixed[-1], images[-1])
        assert torch.allclose(soft[-1], mix.smoothed(target[-1:])[0])
    with pytest.raises(ValueError, match="one of them positive"):
        MixupCutmix(5, mixup_alpha=0.0, cutmix_alpha=0.0)


# ---------------------------------------------------------------------------
# Metrics
# ---------------------------------------------------------------------------
def test_metrics_against_brute_force(tmp_path):
    gen = torch.Generator().manual_seed(1)
    scores, target = torch.randn(200, 7, generator=gen), torch.randint(0, 7, (200,), generator=gen)
    target[target == 6] = 5  # class 6 absent
    m = single_label_metrics(scores, target, [f"c{i}" for i in range(7)])
    order = scores.argsort(dim=1, descending=True)
    brute1 = sum(int(order[i, 0] == target[i]) for i in range(200)) / 2
    brute5 = sum(int(target[i] in order[i, :5].tolist()) for i in range(200)) / 2
    assert m["top1"] == pytest.approx(brute1) and m["top5"] == pytest.approx(brute5)
    cm = torch.zeros(7, 7, dtype=torch.long)
    for t, p in zip(target.tolist(), scores.argmax(1).tolist()):
        cm[t, p] += 1
    assert torch.equal(m["confusion"], cm) and m["num_images"] == 200
    per_class = [100 * cm[c, c].item() / cm[c].sum().item() if cm[c].sum() else float("nan") for c in range(7)]
    assert np.allclose(m["per_class_accuracy"], per_class, equal_nan=True)
    assert m["mean_class_accuracy"] == pytest.approx(np.mean(per_class[:6]))
    assert topk_accuracy(scores[:, :3], target.clamp(max=2), 5) == 100.0  # k above the class count
    path = tmp_path / "confusion.csv"
    write_confusion_matrix(path, m["confusion"], [f"c{i}" for i in range(7)])
    rows = path.read_text().splitlines()
    assert rows[0] == "true \\ predicted,c0,c1,c2,c3,c4,c5,c6"
    assert rows[3] == "c2," + ",".join(map(str, cm[2].tolist()))
    assert torch.equal(confusion_matrix(torch.tensor([1, 1]), torch.tensor([0, 1]), 2), torch.tensor([[0, 1], [0, 1]]))
    with pytest.raises(ValueError, match=r"class indices in \[0, 7\)"):
        single_label_metrics(scores, target + 2)


@pytest.mark.slow  # a whole experiment
def test_groups_experiment_script_runs(tmp_path):
    module = load_script("pvig_groups")
    rows = module.run(
        [
            "--root",
            str(tmp_path / "shapes"),
            "--epochs",
            "1",
            "--num-train",
            "16",
            "--num-val",
            "8",
            "--seeds",
            "0",
            "1",
            "--batch-size",
            "8",
            "--image-size",
            "48",
            "--out",
            str(tmp_path / "out.json"),
        ]
    )
    assert [r["groups"] for r in rows] == [1, 2]
    for r in rows:
        assert len(r["top1"]) == 2 and all(0 <= a <= 100 for a in r["top1"]) and r["seconds_per_epoch"] > 0
    assert (tmp_path / "out.json").is_file() and (tmp_path / "shapes" / "val").is_dir()


def test_tied_scores_rank_by_class_index_in_every_metric():
    """All-tied scores (the majority baseline of a balanced split): top-1 and the confusion
    matrix both take the first class (torch.topk took another)."""
    scores, target = torch.zeros(4, 12), torch.tensor([0, 0, 0, 5])
    assert topk_accuracy(scores, target, 1) == 75.0
    metrics = single_label_metrics(scores, target)
    assert metrics["top1"] == 75.0 and metrics["confusion"][0, 0] == 3
    assert topk_accuracy(scores, target, 5) == 75.0 and topk_accuracy(scores, target, 6) == 100.0


def test_unknown_auto_augment_policy_is_a_config_error():
    options = dict(DEFAULTS["single_label"], auto_augment="bogus")
    with pytest.raises(ValueError, match=r"single_label.auto_augment: timm cannot build the policy 'bogus'"):
        single_label_transform(64, True, (0.5,) * 3, (0.5,) * 3, options)
    options["auto_augment"] = "rand-m9-mstd0.5-inc1"
    assert single_label_transform(64, True, (0.5,) * 3, (0.5,) * 3, options) is not None
