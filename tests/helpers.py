"""What several test modules share: small data sets written in their real
formats, a tiny training config, and running the experiment scripts in
this process. (Test modules import from here, never from each other.)"""

from __future__ import annotations

import gc
import importlib.util
import json
import os
import pickle
from pathlib import Path

import numpy as np
import torch
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
# The environment of the scripts the tests start as processes: the checkout importable, warnings quiet.
SCRIPT_ENV = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
              "PYTHONWARNINGS": "ignore"}  # fmt: skip


def write_image(path: Path, colour=(200, 30, 30), size=(20, 14)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path)
    return path


CATEGORIES = [{"id": 18, "name": "dog"}, {"id": 1, "name": "person"}, {"id": 3, "name": "car"}]


def coco_json(images, annotations, categories=CATEGORIES) -> dict:
    return {"images": [{"id": i, "file_name": f, "width": 20, "height": 14} for i, f in images],
            "annotations": [{"id": n, "image_id": i, "category_id": c, "area": a, "bbox": [0, 0, 4, 5],
                             "iscrowd": 0} for n, (i, c, a) in enumerate(annotations)],
            "categories": categories}  # fmt: skip


def write_cifar(root, name, images_per_file=6, seed=0):
    """A miniature CIFAR-10 or -100 in its python format; returns {split: (pixels (N, 32, 32, 3), labels)}."""
    rng = np.random.default_rng(seed)
    if name == "cifar10":
        folder, files = (
            root / "cifar-10-batches-py",
            {"train": ["data_batch_%d" % i for i in range(1, 6)], "test": ["test_batch"]},
        )
        classes, label_key = [f"class{i}".encode() for i in range(10)], b"labels"
        folder.mkdir(parents=True)
        with open(folder / "batches.meta", "wb") as f:
            pickle.dump({b"label_names": classes, b"num_cases_per_batch": images_per_file, b"num_vis": 3072}, f)
    else:
        folder, files = root / "cifar-100-python", {"train": ["train"], "test": ["test"]}
        classes, label_key = [f"fine{i}".encode() for i in range(100)], b"fine_labels"
        folder.mkdir(parents=True)
        with open(folder / "meta", "wb") as f:
            pickle.dump({b"fine_label_names": classes, b"coarse_label_names": [b"c"] * 20}, f)
    expected = {}
    for split, names in files.items():
        pixels, labels = [], []
        for file in names:
            img = rng.integers(0, 256, (images_per_file, 32, 32, 3), dtype=np.uint8)
            lab = rng.integers(0, len(classes), images_per_file).tolist()
            data = img.transpose(0, 3, 1, 2).reshape(images_per_file, 3072)  # R plane, G plane, B plane
            batch = {b"batch_label": b"x", b"data": data, label_key: lab, b"filenames": [b"f.png"] * images_per_file}
            if name == "cifar100":
                batch[b"coarse_labels"] = [0] * images_per_file
            with open(folder / file, "wb") as f:
                pickle.dump(batch, f, protocol=2)
            pixels.append(img)
            labels += lab
        expected[split] = (np.concatenate(pixels), labels)
    return expected


TINY_MODEL = """\
name: {name}
seed: 0
model: {{name: gkgnet_ti, img_size: 33, k: 3, drop_path: 0.0, depths: [1, 1, 1, 1]}}
data:
  root: {root}
  num_workers: 0
  class_balanced_threshold: null
  augment: {{cropmix_prob: 0.0, color_jitter: 0.0, trivial_augment: false, random_erasing: 0.0}}
{data}
train: {{epochs: 1, batch_size: 4, amp: none, num_threads: 1}}
schedule: {{name: cosine, warmup_epochs: 0}}
eval: {{batch_size: 4}}
output: {{dir: {runs}, progress: false}}
"""


def _load_file(path: Path, module_name: str):
    spec = importlib.util.spec_from_file_location(module_name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def load_script(name: str):
    """experiments/<name>.py as a fresh module (as a file, the way ``python experiments/<name>.py`` runs it)."""
    return _load_file(REPO / "experiments" / f"{name}.py", f"script_{name}")


def load_benchmark(name: str):
    """benchmarks/<name>.py as a fresh module (as a file, the way ``python benchmarks/<name>.py`` runs it)."""
    return _load_file(REPO / "benchmarks" / f"{name}.py", f"benchmark_{name}")


def run_script(name: str, *args, raising: bool = False):
    """The script's command line in this process: ``main`` (the exit status; a user
    error is one line on stderr and status 2) or, with ``raising``, ``run`` (what it
    returns; errors propagate). torch's thread count is restored afterwards."""
    threads = torch.get_num_threads()
    try:
        module = load_script(name)
        return (module.run if raising else module.main)([str(a) for a in args])
    finally:
        torch.set_num_threads(threads)


def end_failed_loader_workers() -> None:
    """End now the worker processes of DataLoader iterators that a worker's exception left
    behind (held in reference cycles through the exception's frames).

    torch shuts such an iterator down when the garbage collector frees it and waits up to
    ``MP_STATUS_CHECK_INTERVAL`` (5 s) for each worker to join before terminating it; after a
    batch that raised in the worker the wait runs out (measured: 5.0 s), in whichever later
    test the collection happens to run. Here it is collected at once, with a short wait.
    """
    from torch.utils.data import _utils as data_utils

    interval = data_utils.MP_STATUS_CHECK_INTERVAL
    data_utils.MP_STATUS_CHECK_INTERVAL = 0.1
    try:
        gc.collect()
    finally:
        data_utils.MP_STATUS_CHECK_INTERVAL = interval


def noise_image(path: Path, seed: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, (40, 48, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)


def build_format(kind: str, root: Path) -> str:
    """Write a 4 + 2 image data set of ``kind`` under root; return the config's data lines."""
    labels = {"train": [["cat"], ["dog", "cat"], ["bird"], ["dog"]], "val": [["cat", "bird"], ["dog"]]}
    if kind.startswith("coco"):
        cats = [{"id": 5, "name": "dog"}, {"id": 2, "name": "cat"}, {"id": 9, "name": "bird"}]
        ids = {c["name"]: c["id"] for c in cats}
        for role in ("train", "val"):
            name = f"{role}2017" if kind == "coco2017" else role
            folder = root / name if kind == "coco2017" else root / "pictures" / role
            images, anns = [], []
            for i, names in enumerate(labels[role]):
                noise_image(folder / f"{i}.jpg", i + 100 * (role == "val"))
                images.append((i + 1, f"{i}.jpg"))
                anns += [(i + 1, ids[n], 100.0) for n in names]
            ann = root / "annotations" / (f"instances_{name}.json" if kind == "coco2017" else f"my_{role}.json")
            ann.parent.mkdir(parents=True, exist_ok=True)
            ann.write_text(json.dumps(coco_json(images, anns, cats)))
        if kind == "coco2017":
            return "  name: coco"
        return (
            "  name: coco\n  ann_file: {train: annotations/my_train.json, val: annotations/my_val.json}\n"
            "  image_dir: {train: pictures/train, val: pictures/val}"
        )
    classes = ["bird", "cat", "dog"]
    for role in ("train", "val"):
        rows = []
        for i, names in enumerate(labels[role]):
            noise_image(root / "imgs" / role / f"{i}.png", i + 100 * (role == "val"))
            if kind == "csv_names":
                rows.append(f"imgs/{role}/{i}.png,{'|'.join(names)}")
            else:
                rows.append(f"imgs/{role}/{i}.png," + ",".join("1" if c in names else "0" for c in classes))
        header = "image,labels" if kind == "csv_names" else "image," + ",".join(classes)
        (root / f"{role}.csv").write_text(header + "\n" + "\n".join(rows) + "\n")
    fmt = "names" if kind == "csv_names" else "columns"
    return f"  name: csv\n  csv: {{train: train.csv, val: val.csv, format: {fmt}, label_delimiter: '|'}}"


def order_for_workers(items: list, workers: int, long_files: dict) -> list:
    """The tests in the order for pytest-xdist's work stealing, which hands each of the ``workers``
    a contiguous block of the list and lets an idle worker take tests from the end of another's
    block: each long file (``{file name: seconds}``) goes to the block with the least work so far,
    at its start, and the other files fill the blocks in their order.  The long files then run at
    once on all workers, the end is short tests, and a file's tests stay on one worker (a module
    fixture is built once)."""
    workers = max(1, workers)
    by_file: dict = {}
    for item in items:
        by_file.setdefault(item.path.name, []).append(item)
    blocks, work = [[] for _ in range(workers)], [0] * workers
    # by weight, then name: the same order in every worker (xdist compares their collections)
    for name in sorted(set(by_file) & set(long_files), key=lambda n: (-long_files[n], n)):
        least = work.index(min(work))
        blocks[least] += by_file[name]
        work[least] += long_files[name]
    rest = [item for name, tests in by_file.items() if name not in long_files for item in tests]
    ordered, remaining = [], len(items)
    for i, block in enumerate(blocks):
        size = remaining // (workers - i)  # the block xdist hands worker i
        fill = max(0, size - len(block))
        ordered += block + rest[:fill]
        rest, remaining = rest[fill:], remaining - size
    return ordered + rest
