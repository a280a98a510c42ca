"""Training machinery and the experiment scripts, on a tiny synthetic set.

One module-scoped pair of runs (2 epochs, gkgnet_ti with one block per stage at its smallest input)
is shared: run A goes uninterrupted, run B is SIGKILLed after its first
epoch's checkpoint and resumed; their final states must be identical.
"""

from __future__ import annotations

import copy

import json
import math
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from torch._dynamo.utils import counters

from gkg_pyg.builder import build_model
from gkg_pyg.config import load_config
from gkg_pyg.training import distributed, loaders, loops, optim, precision, rng, state
from gkg_pyg.data import build_test_transform, load_rgb, make_synthetic_coco
from gkg_pyg.loss import GKGNetLoss
from gkg_pyg.metrics import multilabel_metrics

from helpers import SCRIPT_ENV, load_script, run_script

# End-to-end runs of whole scripts: the quick run (-m "not slow") leaves them out.
pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = REPO / "experiments"
RUN_TIMEOUT = 240

TINY = """\
name: tiny
seed: 3
model: {{name: gkgnet_ti, img_size: 33, k: 3, drop_path: 0.1, depths: [1, 1, 1, 1]}}
data:
  name: synthetic
  root: {root}
  synthetic: {{num_train: 24, num_val: 11, image_size: 64, seed: 0}}
  num_workers: 0
  class_balanced_threshold: 0.2
train: {{epochs: 2, batch_size: 6, amp: none, num_threads: 1, ema: true, ema_decay: 0.9}}
optim: {{lr: 1.0e-3}}
schedule: {{name: step, warmup_epochs: 1, warmup_ratio: 0.1, milestones: [1]}}
eval: {{batch_size: 4}}
output: {{dir: {runs}, progress: false}}
"""


def start(name: str, *args) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, str(SCRIPTS / f"{name}.py"), *map(str, args)],
        env=SCRIPT_ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip


def finish(proc: subprocess.Popen) -> str:
    out, _ = proc.communicate(timeout=RUN_TIMEOUT)
    assert proc.returncode == 0, out[-4000:]
    return out


def snapshot(folder: Path) -> dict:
    """(size, mtime) of every file under folder."""
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns) for p in folder.rglob("*")}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """The tiny config and its two runs: A uninterrupted, B killed after
    epoch 1 and resumed. Both run at once (one thread each)."""
    tmp = tmp_path_factory.mktemp("tiny")
    config = tmp / "tiny.yaml"
    config.write_text(TINY.format(root=tmp / "synthetic", runs=tmp / "runs"))
    make_synthetic_coco(tmp / "synthetic", 24, 11, 64, seed=0, progress=False)
    run_a, run_b = tmp / "runs" / "a", tmp / "runs" / "b"

    proc_a = start("train", config, "--output", run_a)
    proc_b = start("train", config, "--output", run_b)
    deadline = time.time() + RUN_TIMEOUT
    while not (run_b / "checkpoint_last.pth").exists():
        assert proc_b.poll() is None, f"run B ended early:\n{proc_b.communicate()[0][-3000:]}"
        assert time.time() < deadline, "run B wrote no checkpoint"
        time.sleep(0.05)
    proc_b.send_signal(signal.SIGKILL)
    proc_b.communicate()
    killed_epoch = torch.load(run_b / "checkpoint_last.pth", weights_only=True)["epoch"]
    killed_log = (run_b / "log.jsonl").read_text()
    resumed = finish(start("train", config, "--output", run_b, "--resume"))
    out_a = finish(proc_a)
    return dict(config=config, tmp=tmp, run_a=run_a, run_b=run_b, out_a=out_a, resumed=resumed,
                killed_epoch=killed_epoch, killed_log=killed_log)  # fmt: skip


# ---------------------------------------------------------------------------
# The shared runs
# ---------------------------------------------------------------------------
def test_run_outputs(tiny):
    run = tiny["run_a"]
    for name in ("config.yaml", "log.jsonl", "checkpoint_last.pth", "checkpoint_best.pth", "metrics.json",
                 "per_class_ap.csv", "per_class_ap_ema.csv"):  # fmt: skip
        assert (run / name).is_file(), name
    assert not list(run.glob(".*tmp")), "temporary checkpoint files left behind"
    assert load_config(run / "config.yaml") == load_config(tiny["config"])

    log = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in log] == [1, 2]
    steps_per_epoch = log[0]["step"]
    assert log[1]["step"] == 2 * steps_per_epoch
    # Class-balanced repeats: more than the 24 images per epoch.
    assert log[0]["images"] > 24
    # Schedule: warm-up over epoch 1 ends at the full lr, the milestone at
    # epoch 1 multiplies by 0.1 (the logged lr is the next iteration's).
    assert log[0]["lr"] == pytest.approx(1e-4)
    assert all(math.isfinite(r["loss"]) and 0 <= r["mAP"] <= 100 for r in log)

    last = torch.load(run / "checkpoint_last.pth", weights_only=True)
    best = torch.load(run / "checkpoint_best.pth", weights_only=True)
    assert last["epoch"] == 2 and last["step"] == 2 * steps_per_epoch
    best_epoch = max(log, key=lambda r: max(r["mAP"], r["ema_mAP"]))["epoch"]
    assert best["epoch"] == best_epoch
    assert best["best_map"] == pytest.approx(max(max(r["mAP"], r["ema_mAP"]) for r in log))
    assert last["class_names"][:3] == ["circle", "square", "triangle"]

    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["model"]["mAP"] == pytest.approx(log[-1]["mAP"])
    assert metrics["ema"]["mAP"] == pytest.approx(log[-1]["ema_mAP"])
    assert metrics["model"]["num_images"] == 11
    assert "label-frequency baseline" in tiny["out_a"] and "mAP" in tiny["out_a"]
    assert metrics["baseline"]["CF1"] == 0.0  # frequencies are all < 0.5: nothing predicted


def test_resume_after_kill_is_exact(tiny):
    assert tiny["killed_epoch"] == 1, "the kill should land between epoch 1's checkpoint and the end"
    assert [json.loads(line)["epoch"] for line in tiny["killed_log"].splitlines()] == [1]
    assert "resumed from" in tiny["resumed"] and "after epoch 1" in tiny["resumed"]
    a = torch.load(tiny["run_a"] / "checkpoint_last.pth", weights_only=True)
    b = torch.load(tiny["run_b"] / "checkpoint_last.pth", weights_only=True)
    assert a["epoch"] == b["epoch"] == 2 and a["step"] == b["step"]
    for part in ("model", "ema"):
        assert a[part].keys() == b[part].keys()
        for key in a[part]:
            assert torch.equal(a[part][key], b[part][key]), f"{part}.{key} differs after resuming"
    for pa, pb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        for key in pa:
            assert torch.equal(torch.as_tensor(pa[key]), torch.as_tensor(pb[key]))
    assert a["best_map"] == b["best_map"]
    # Same log apart from timings, epoch 1 kept once.
    timing = ("seconds", "images_per_s")
    log_a = [{k: v for k, v in json.loads(line).items() if k not in timing}
             for line in (tiny["run_a"] / "log.jsonl").read_text().splitlines()]  # fmt: skip
    log_b = [{k: v for k, v in json.loads(line).items() if k not in timing}
             for line in (tiny["run_b"] / "log.jsonl").read_text().splitlines()]  # fmt: skip
    assert log_a == log_b
    assert (
        json.loads((tiny["run_a"] / "metrics.json").read_text())["model"]
        == json.loads((tiny["run_b"] / "metrics.json").read_text())["model"]
    )


def test_evaluate_script_matches_training(tiny, tmp_path):
    threads = torch.get_num_threads()
    try:
        load_script("evaluate").main([str(tiny["config"]), "--checkpoint", str(tiny["run_a"] / "checkpoint_last.pth"),
                                      "--output", str(tmp_path)])  # fmt: skip
    finally:
        torch.set_num_threads(threads)
    ours = json.loads((tmp_path / "metrics.json").read_text())
    trained = json.loads((tiny["run_a"] / "metrics.json").read_text())
    for name in ("model", "ema"):
        for key in ("mAP", "CF1", "OF1", "mAP_small"):
            assert ours[name][key] == pytest.approx(trained[name][key], abs=1e-9), (name, key)
    assert (tmp_path / "per_class_ap.csv").read_text().startswith("class,AP\ncircle,")


def test_predict_json(tiny, capsys):
    images = sorted((tiny["tmp"] / "synthetic" / "val2014").glob("*.jpg"))[:2]
    ckpt = tiny["run_a"] / "checkpoint_last.pth"
    assert run_script("predict", "--checkpoint", ckpt, "--json", "--threshold", "0", *images) == 0
    out = json.loads(capsys.readouterr().out)
    assert [r["image"] for r in out] == [str(p) for p in images]

    # Reference: the same model built by hand.
    saved = torch.load(ckpt, weights_only=True)
    model = build_model(load_config(tiny["config"]), saved["class_names"], load_weights=False)
    model.load_state_dict(saved["model"])
    model.eval()
    torch.save(model.state_dict(), tiny["tmp"] / "weights_only.pth")

    x = torch.stack([build_test_transform(33)(load_rgb(str(p))) for p in images])
    with torch.no_grad():
        expected = torch.sigmoid(model(x))
    for result, scores in zip(out, expected):
        assert len(result["labels"]) == 10  # threshold 0: every label, best first
        got = {d["label"]: d["score"] for d in result["labels"]}
        for name, s in zip(saved["class_names"], scores.tolist()):
            assert got[name] == pytest.approx(s, abs=1e-4)
        listed = [d["score"] for d in result["labels"]]
        assert listed == sorted(listed, reverse=True)

    predict = load_script("predict")
    predict.main(["--checkpoint", str(ckpt), "--json", "--topk", "2", *map(str, images)])
    top = json.loads(capsys.readouterr().out)
    assert [len(r["top"]) for r in top] == [2, 2]  # the 2 best labels, whatever the threshold
    assert [d["label"] for d in top[0]["top"]] == [d["label"] for d in out[0]["labels"][:2]]
    predict.main(["--checkpoint", str(ckpt), "--ema", "--threshold", "0.99", str(images[0])])
    assert capsys.readouterr().out.startswith(f"{images[0]}: ")
    with pytest.raises(ValueError, match="holds no config"):
        predict.run(["--checkpoint", str(tiny["tmp"] / "weights_only.pth"), str(images[0])])


@pytest.mark.slow
def test_compile_flag(tiny, tmp_path, capsys, monkeypatch):
    """--compile runs the training step and the evaluation forward pass under torch.compile (here its
    eager backend: the graph capture without code generation, which inductor's compile time on 2 CPU
    cores would make a 5-minute test): the run trains what the plain run trains, its checkpoint holds
    the plain model's names, and its compiled evaluation measures what evaluate.py measures of its
    checkpoint. evaluate.py --compile hands its model to torch.compile with the backend asked for.

    Batches of 23 split the epoch's 46 images evenly and the 11 evaluation images are one batch, so
    each compiled forward pass is traced once per mode (a last, smaller batch would trace it again).
    Exactly two graphs also mean no graph break in the forward pass, and no second trace of the
    training step: its first call changes no module state (the position terms exist from construction)."""
    common = ("--set", "train.epochs=1", "--set", "train.ema=false", "--set", "train.batch_size=23")
    compiled_run, plain_run = tmp_path / "compiled", tmp_path / "plain"
    eager = ("--compile", "--compile-backend", "eager")
    torch._dynamo.reset()  # the runs' traces neither meet nor leave others' in this process
    try:
        graphs = counters["stats"]["unique_graphs"]
        assert run_script("train", tiny["config"], "--output", compiled_run, *eager, *common) == 0
        assert counters["stats"]["unique_graphs"] - graphs == 2  # training and evaluation, each traced once
    finally:
        torch._dynamo.reset()
    assert run_script("train", tiny["config"], "--output", plain_run, *common) == 0
    state = torch.load(compiled_run / "checkpoint_last.pth", weights_only=True)
    plain = torch.load(plain_run / "checkpoint_last.pth", weights_only=True)
    assert state["model"].keys() == plain["model"].keys()  # no _orig_mod. prefix
    for key, value in plain["model"].items():
        torch.testing.assert_close(state["model"][key], value, rtol=1e-5, atol=1e-6, msg=key)

    # The compiled run's evaluation (after its only epoch: the checkpoint's weights) against evaluate.py's.
    compiled_eval = json.loads((compiled_run / "metrics.json").read_text())["model"]
    handed = []
    monkeypatch.setattr(torch, "compile", lambda module, backend: handed.append((module, backend)) or module)
    for flags in ((), eager):
        folder = tmp_path / f"eval{len(flags)}"
        code = run_script("evaluate", tiny["config"], "--checkpoint", compiled_run / "checkpoint_last.pth",
                          "--output", folder, "--set", "eval.batch_size=11", *flags)  # fmt: skip
        assert code == 0, capsys.readouterr().err[-3000:]
        measured = json.loads((folder / "metrics.json").read_text())["model"]
        for key in ("mAP", "CF1", "OF1"):
            assert compiled_eval[key] == pytest.approx(measured[key], abs=1e-6), key
    assert [(type(m).__name__, backend) for m, backend in handed] == [("GKGNet", "eager")]
    capsys.readouterr()
    bad_backend = ("--compile", "--compile-backend", "nope")
    assert run_script("train", tiny["config"], "--output", tmp_path / "bad", *bad_backend) == 2
    assert capsys.readouterr().err.splitlines()[-1].startswith("error: --compile-backend 'nope' is not")


# ---------------------------------------------------------------------------
# Bad input: clear errors before training, nothing written
# ---------------------------------------------------------------------------
def run_train_inprocess(*args):
    """train.py's run(): errors propagate (main() would print them as one line)."""
    threads = torch.get_num_threads()
    try:
        return load_script("train").run([*map(str, args), "--set", "train.num_threads=null"])
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def broken_root(tiny, tmp_path_factory):
    """A copy of the tiny data set with one training image file removed, and the removed file's name."""
    broken = tmp_path_factory.mktemp("broken") / "synthetic"
    shutil.copytree(tiny["tmp"] / "synthetic", broken)
    victim = sorted((broken / "train2014").glob("*.jpg"))[5]
    victim.unlink()
    return broken, victim.name


def test_bad_inputs_fail_before_writing(tiny, broken_root, tmp_path):
    config, run = tiny["config"], tiny["run_a"]
    before = snapshot(run)

    # A fresh run over an existing one.
    with pytest.raises(FileExistsError, match="--resume"):
        run_train_inprocess(config, "--output", run)

    # A pretrained checkpoint with another label count (5 vs 10).
    cfg5 = load_config(config)
    five = build_model(cfg5, [f"c{i}" for i in range(5)])
    torch.save(five.state_dict(), tmp_path / "five.pth")
    with pytest.raises(ValueError, match=r"label_embed\.weight.*\(5, 48\).*\(10, 48\)"):
        run_train_inprocess(config, "--output", run, "--resume", "--set", f"model.pretrained={tmp_path / 'five.pth'}")
    with pytest.raises(ValueError, match="model.num_classes is 5 but the data set has 10 labels"):
        run_train_inprocess(config, "--output", run, "--resume", "--set", "model.num_classes=5")

    # An empty data set: annotation files without any labelled image.
    empty = tmp_path / "empty"
    for split in ("train", "val"):
        (empty / f"{split}2014").mkdir(parents=True)
    (empty / "annotations").mkdir()
    for split in ("train", "val"):
        data = {"images": [{"id": 1, "file_name": "x.jpg", "width": 64, "height": 64}], "annotations": [],
                "categories": [{"id": 1, "name": "thing"}]}  # fmt: skip
        (empty / "annotations" / f"instances_{split}2014.json").write_text(json.dumps(data))
    with pytest.raises(ValueError, match="no image with at least one label"):
        run_train_inprocess(config, "--output", run, "--resume", "--set", "data.name=coco",
                            "--set", f"data.root={empty}")  # fmt: skip

    # A missing image file.
    broken, victim = broken_root
    missing = f"1 of the 24 training images are missing.*{victim}.*--skip-bad-images"
    with pytest.raises(FileNotFoundError, match=missing):
        run_train_inprocess(config, "--output", run, "--resume", "--set", f"data.root={broken}")

    # A resume checkpoint of another model: one error before anything is written, naming the change
    # (the weights would not load; a resized position embedding would not fit the optimiser state).
    with pytest.raises(ValueError, match=r"does not fit this config's model: 'pos_embed' has shape .*model.img_size"):
        run_train_inprocess(config, "--output", run, "--resume", "--set", "model.img_size=96")
    with pytest.raises(ValueError, match=r"does not fit this config's model: .*model.name"):
        run_train_inprocess(config, "--output", run, "--resume", "--set", "model.name=pvig_ti")

    # A resume checkpoint that does not exist.
    with pytest.raises(FileNotFoundError, match="nothere.pth"):
        run_train_inprocess(config, "--output", run, "--resume", str(tmp_path / "nothere.pth"))

    assert snapshot(run) == before, "a failed start changed the run folder"


def test_skip_bad_images_counts(tiny, broken_root, tmp_path, capsys):
    broken, _ = broken_root
    one_epoch = ("--set", "train.epochs=1", "--set", "train.ema=false")
    code = run_script("train", tiny["config"], "--output", tmp_path / "run", "--skip-bad-images",
                      "--set", f"data.root={broken}", *one_epoch)  # fmt: skip
    assert code == 0
    # The up-front check leaves the missing image out, so no epoch meets it.
    out = capsys.readouterr().out
    assert "left out missing or unreadable images (data.skip_bad_images): 1 training, 0 evaluation" in out
    log = json.loads((tmp_path / "run" / "log.jsonl").read_text())
    assert log["num_skipped"] == 0 and log["images"] >= 23  # the other images were trained on


# ---------------------------------------------------------------------------
# Distributed: two CPU processes with gloo
# ---------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank: int, world: int, port: int, config: str, out_dir: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))  # fmt: skip
    torch.set_num_threads(1)
    cfg = load_config(config, ["train.epochs=1"])
    info = distributed.init_distributed()
    train_set, val_set = loaders.build_split(cfg, True), loaders.build_split(cfg, False)
    torch.manual_seed(100 + rank)  # different initial weights: DDP must broadcast rank 0's
    model = torch.nn.parallel.DistributedDataParallel(build_model(cfg, train_set.class_names))
    loader = loaders.train_loader(cfg, train_set, info)
    loaders.start_epoch(loader, cfg["seed"], 0, rank)
    optimizer = optim.build_optimizer(cfg, model)
    schedule = optim.build_schedule(cfg, optimizer, len(loader))
    amp = precision.build_precision("fp16", info.device)  # float32 on the CPU
    stats = loops.train_one_epoch(model, loader, GKGNetLoss(), optimizer, schedule, amp, info, 5.0,
                                   progress=False)  # fmt: skip
    result = loops.evaluate(model, loaders.eval_loader(cfg, val_set, info), info, progress=False)
    torch.save({"state": distributed.unwrap(model).state_dict(), "eval": result, "stats": stats,
                "shard": list(iter(loader.sampler))}, Path(out_dir) / f"rank{rank}.pt")  # fmt: skip
    distributed.cleanup_distributed()


def single_process_eval(config, state_dict):
    """A one-process evaluation of ``state_dict`` on the config's val split."""
    cfg = load_config(config)
    val_set = loaders.build_split(cfg, False)
    model = build_model(cfg, val_set.class_names, load_weights=False)
    model.load_state_dict(state_dict)
    single = distributed.DistInfo(0, 1, 0, torch.device("cpu"))
    return loops.evaluate(model, loaders.eval_loader(cfg, val_set, single), single, progress=False), val_set


def test_ddp_two_cpu_processes(tiny, tmp_path):
    mp.spawn(_ddp_worker, args=(2, free_port(), str(tiny["config"]), str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in (0, 1))
    for key in r0["state"]:
        assert torch.equal(r0["state"][key], r1["state"][key]), f"{key} differs between ranks"
    # The two shards split one epoch: disjoint up to the sampler's padding.
    assert len(r0["shard"]) == len(r1["shard"])
    union = set(r0["shard"]) | set(r1["shard"])
    assert union == set(range(len(union))) and 2 * len(r0["shard"]) - len(union) <= 1
    assert r0["stats"]["images"] == r1["stats"]["images"] == len(r0["shard"]) * 2
    # Gathered evaluation (11 images, 6 per rank): every image once, in
    # order, the same on both ranks, equal to a one-process evaluation.
    for r in (r0, r1):
        assert r["eval"]["index"].tolist() == list(range(11))  # the sampler's padding repeat dropped
    assert torch.equal(r0["eval"]["scores"], r1["eval"]["scores"])
    ref, val_set = single_process_eval(tiny["config"], r0["state"])
    torch.testing.assert_close(r0["eval"]["scores"], ref["scores"], rtol=1e-5, atol=1e-5)
    assert torch.equal(r0["eval"]["targets"], val_set.targets)


def test_torchrun_train_script(tiny, tmp_path):
    """train.py under torchrun: 2 CPU processes, rank 0 writes, the
    evaluation is gathered over both."""
    torchrun = Path(sys.executable).with_name("torchrun")
    proc = subprocess.run(
        [str(torchrun), "--standalone", "--nproc_per_node", "2", str(SCRIPTS / "train.py"), str(tiny["config"]),
         "--output", str(tmp_path / "run"), "--set", "train.epochs=1", "--set", "train.ema=false"],
        env=SCRIPT_ENV, capture_output=True, text=True, timeout=RUN_TIMEOUT,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert proc.stdout.count("run folder") == 1  # rank 0 alone reports
    assert "2 process(es)" in proc.stdout
    saved = torch.load(tmp_path / "run" / "checkpoint_last.pth", weights_only=True)
    assert len(saved["rng"]) == 2 and not torch.equal(saved["rng"][0]["torch"], saved["rng"][1]["torch"])
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["model"]["num_images"] == 11
    # The gathered evaluation equals a one-process evaluation of the weights.
    ref, _ = single_process_eval(tiny["config"], saved["model"])
    assert metrics["model"]["mAP"] == pytest.approx(multilabel_metrics(ref["scores"], ref["targets"])["mAP"])


# ---------------------------------------------------------------------------
# Engine pieces
# ---------------------------------------------------------------------------
def test_lr_schedule_by_hand():
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=2.0)
    # 4 iterations per epoch, warm-up 1.5 epochs (6 iterations) from 0.1 x lr,
    # step at epochs 2 and 3.
    sched = optim.LRSchedule(opt, 4, 5, "step", 1.5, 0.1, [2, 3], 0.1)
    lrs = []
    for _ in range(20):
        lrs.append(opt.param_groups[0]["lr"])
        sched.step()
    warm = [2.0 * (1 - (1 - i / 6) * 0.9) for i in range(6)]
    expected = warm + [2.0] * 2 + [0.2] * 4 + [0.02] * 8
    assert lrs == pytest.approx(expected)

    cos = optim.LRSchedule(torch.optim.SGD([p], lr=1.0), 10, 2, "cosine", 0, 1.0, min_lr_ratio=0.1)
    assert cos.factor(0) == pytest.approx(1.0)
    assert cos.factor(10) == pytest.approx(0.55)
    assert cos.factor(20) == pytest.approx(0.1)
    restored = optim.LRSchedule(opt, 4, 5, "step", 1.5, 0.1, [2, 3], 0.1)
    restored.load_state_dict(sched.state_dict())
    assert opt.param_groups[0]["lr"] == pytest.approx(expected[-1])


@pytest.mark.parametrize("name", ["cosine", "step"])
def test_resumed_schedule_keeps_its_epoch_with_other_steps_per_epoch(name):
    """A run resumed with another process count, batch size or accumulation (here 6 steps per epoch
    instead of 4): the schedule continues at the same epoch, warm-up and milestones included, and
    ends where an uninterrupted run with the new step count ends."""
    p = torch.nn.Parameter(torch.zeros(1))
    first = optim.LRSchedule(torch.optim.SGD([p], lr=1.0), 4, 3, name, 1.5, 0.1, [2], 0.1)
    for _ in range(2 * 4):  # two epochs
        first.step()
    opt = torch.optim.SGD([p], lr=1.0)
    resumed = optim.LRSchedule(opt, 6, 3, name, 1.5, 0.1, [2], 0.1)
    resumed.load_state_dict(first.state_dict())
    assert resumed.step_count == 2 * 6
    uninterrupted = optim.LRSchedule(torch.optim.SGD([p], lr=1.0), 6, 3, name, 1.5, 0.1, [2], 0.1)
    for _ in range(6):
        assert opt.param_groups[0]["lr"] == pytest.approx(uninterrupted.factor(resumed.step_count))
        resumed.step()
    assert resumed.step_count == uninterrupted.total_steps
    # A checkpoint of an older version (no steps_per_epoch): its step count as it is.
    resumed.load_state_dict({"step_count": 5})
    assert resumed.step_count == 5


def test_param_groups_no_decay():
    model = build_model(load_config(None, ["model.name=gkgnet_ti", "model.img_size=33", "model.k=3"]), ["a", "b"])
    names = {id(p): n for n, p in model.named_parameters()}
    embeddings = {"pos_embed", "label_embed.weight"}
    assert model.no_weight_decay() == embeddings
    # The authors' run: only norms and biases undecayed (their custom_keys match nothing in GKGNet).
    decay, no_decay = optim.param_groups(model, 0.05)
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0
    plain = {names[id(p)] for p in no_decay["params"]}
    assert {"stem.convs.1.weight", "head_label.bias"} <= plain and not embeddings & plain
    assert all(p.ndim == 1 for p in no_decay["params"])
    assert all(names[id(p)].endswith(("bias", "weight")) for p in no_decay["params"])
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))
    # The option: also exempt the model's no_weight_decay() names.
    decay, no_decay = optim.param_groups(model, 0.05, decay_embeddings=False)
    assert {names[id(p)] for p in no_decay["params"]} == plain | embeddings
    assert all(p.ndim >= 2 and names[id(p)] not in embeddings for p in decay["params"])
    cfg = load_config(None, ["model.name=gkgnet_ti", "model.img_size=33", "model.k=3",
                             "optim.decay_embeddings=false"])  # fmt: skip
    groups = optim.build_optimizer(cfg, model).param_groups
    assert {names[id(p)] for p in groups[1]["params"]} == plain | embeddings


def test_save_atomic_and_rng_roundtrip(tmp_path):
    torch.manual_seed(1)
    saved = {"rng": [rng.rng_state()]}
    expected = (torch.rand(3), np.random.rand(2).tolist(), random.random())
    state.save_atomic(saved, tmp_path / "ck.pth")
    state.save_atomic(saved, tmp_path / "ck.pth")  # replacing works
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck.pth"]
    loaded = torch.load(tmp_path / "ck.pth", weights_only=True)  # no pickled numpy objects
    rng.set_rng_state(loaded["rng"][0])
    again = (torch.rand(3), np.random.rand(2).tolist(), random.random())
    assert torch.equal(expected[0], again[0]) and expected[1:] == again[1:]

    state.link_atomic(tmp_path / "ck.pth", tmp_path / "best.pth")
    state.save_atomic({"other": 1}, tmp_path / "ck.pth")
    assert "rng" in torch.load(tmp_path / "best.pth", weights_only=True)  # the link kept the old content


def test_sync_batchnorm_conversion_keeps_outputs():
    torch.manual_seed(0)
    model = build_model(load_config(None, ["model.name=gkgnet_ti", "model.img_size=33", "model.k=3"]), ["a", "b"])
    x = torch.randn(2, 3, 33, 33)
    model(x)  # move the running statistics away from their initial values
    model.eval()
    keys = list(model.state_dict())
    converted = distributed.convert_sync_batchnorm(copy.deepcopy(model))
    kinds = {type(m).__name__ for m in converted.modules()}
    assert "NodeSyncBatchNorm" in kinds and "SyncBatchNorm" in kinds
    assert not {"NodeBatchNorm", "ImageBatchNorm", "BatchNorm2d"} & kinds
    assert list(converted.state_dict()) == keys
    # Evaluation mode uses the running statistics, so the outputs must match. In float64: the
    # plain BatchNorms are folded into the linear maps in evaluation, SyncBatchNorm is not, and
    # a float32 rounding difference could flip a neighbour choice.
    model, converted, x = model.double(), converted.double(), x.double()
    torch.testing.assert_close(converted(x), model(x), rtol=1e-10, atol=1e-10)


def test_loss_scaler_path_equals_plain_float32():
    """With a GradScaler the gradients are unscaled before clipping: the
    result equals training without one (a power-of-two scale is exact)."""
    cfg = load_config(None, ["model.name=gkgnet_ti", "model.img_size=33", "model.k=3"])
    gen = torch.Generator().manual_seed(0)
    batches = [
        {
            "image": torch.randn(4, 3, 33, 33, generator=gen),
            "target": (torch.rand(4, 5, generator=gen) > 0.5).float(),
            "num_skipped": 0,
        }
        for _ in range(3)
    ]
    info = distributed.DistInfo(0, 1, 0, torch.device("cpu"))
    states = []
    for scaled in (False, True):
        torch.manual_seed(0)
        model = build_model(cfg, list("abcde"))
        optimizer = optim.build_optimizer(cfg, model)
        schedule = optim.LRSchedule(optimizer, 3, 1)
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12, enabled=scaled)
        amp = precision.Precision(None, scaler, "cpu")
        stats = loops.train_one_epoch(model, batches, GKGNetLoss(), optimizer, schedule, amp, info,
                                       clip_grad=0.5, progress=False)  # fmt: skip
        assert stats["images"] == 12 and schedule.step_count == 3
        states.append(model.state_dict())
    for key in states[0]:
        torch.testing.assert_close(states[1][key], states[0][key], rtol=1e-6, atol=1e-7, msg=key)


def test_run_folder_numbering(tmp_path):
    train = load_script("train")
    cfg = {"output": {"dir": str(tmp_path)}, "name": "demo"}
    first, resume, base = train.choose_run_folder(cfg, None, None)
    assert first == tmp_path / "demo" and resume is None and base == tmp_path / "demo"
    assert train.claim_run_folder(first, base) == first
    # A run holds its folder from its start (its config), not from its first checkpoint.
    second, _, _ = train.choose_run_folder(cfg, None, None)
    assert second == tmp_path / "demo-2"  # a second fresh run keeps the first
    again, resume, base = train.choose_run_folder(cfg, None, "")
    assert again == first and resume is None and base is None  # no finished epoch: that run starts over
    (first / "checkpoint_last.pth").write_bytes(b"x")
    again, resume, _ = train.choose_run_folder(cfg, None, "")
    assert again == first and resume == first / "checkpoint_last.pth"
    elsewhere, resume, _ = train.choose_run_folder(cfg, None, str(second / "checkpoint_last.pth"))
    assert elsewhere == second and resume == second / "checkpoint_last.pth"
    with pytest.raises(FileExistsError, match="already holds a run"):
        train.choose_run_folder(cfg, str(first), None)
    # A second run killed in demo-2 before its first checkpoint: --resume continues it (the latest run,
    # from its start), not the finished first one.
    train.claim_run_folder(second, tmp_path / "demo")
    latest, resume, _ = train.choose_run_folder(cfg, None, "")
    assert latest == second and resume is None
    (second / "checkpoint_last.pth").write_bytes(b"x")
    latest, resume, _ = train.choose_run_folder(cfg, None, "")
    assert latest == second and resume == second / "checkpoint_last.pth"
    assert train.choose_run_folder(cfg, None, None)[0] == tmp_path / "demo-3"
    # --resume RUN_FOLDER: that folder's checkpoint_last.pth.
    assert train.choose_run_folder(cfg, None, str(first)) == (first, first / "checkpoint_last.pth", None)


def test_runs_started_together_take_separate_folders(tmp_path):
    """Two fresh runs of one config chose the same folder before either wrote: the first to
    claim it keeps it, the other moves to the next free number; with --output it stops."""
    train = load_script("train")
    cfg = {"output": {"dir": str(tmp_path)}, "name": "race"}
    (one, _, base), (two, _, _) = train.choose_run_folder(cfg, None, None), train.choose_run_folder(cfg, None, None)
    assert one == two == tmp_path / "race"
    assert train.claim_run_folder(one, base) == tmp_path / "race"
    assert train.claim_run_folder(two, base) == tmp_path / "race-2"
    assert train.claim_run_folder(tmp_path / "race", base) == tmp_path / "race-3"
    with pytest.raises(FileExistsError, match="already holds a run"):
        train.claim_run_folder(tmp_path / "race-2", None)


def test_adamw_is_fused_and_updates_like_the_per_parameter_loop():
    """The recipe's AdamW runs PyTorch's fused kernel on the CPU; three steps with
    both parameter groups give the weights of torch's reference for loop."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.LayerNorm(32), torch.nn.Linear(32, 4))
    twin = copy.deepcopy(model)
    cfg = {"optim": {"lr": 1e-2, "betas": [0.9, 0.999], "weight_decay": 0.05, "eps": 1e-8, "decay_embeddings": True}}
    fused = optim.build_optimizer(cfg, model)
    assert fused.defaults["fused"] is True
    loop = torch.optim.AdamW(optim.param_groups(twin, 0.05), lr=1e-2, betas=(0.9, 0.999), eps=1e-8, foreach=False)
    for step in range(3):
        x = torch.randn(8, 16, generator=torch.Generator().manual_seed(step))
        for net, opt in ((model, fused), (twin, loop)):
            opt.zero_grad()
            net(x).square().mean().backward()
            opt.step()
    for (name, a), b in zip(model.named_parameters(), twin.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)
