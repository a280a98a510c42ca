"""The command lines' contract: a user mistake (config, data, checkpoint,
image, option) is one line on stderr, ``error: <message>``, and exit status
2; ``--debug`` adds the traceback; any other exception keeps its traceback.
Also: the library's log messages as the scripts print them, and the console
commands (gkg-train, ...) of the installed package."""

from __future__ import annotations

import importlib.metadata
import json
import logging
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from gkg_pyg.builder import build_model
from gkg_pyg.cli import one_line, run_cli, setup_logging
from gkg_pyg.config import load_config
from gkg_pyg.data import UnreadableImageError
from gkg_pyg.errors import ConfigError, GkgError, ImageError

from helpers import REPO, SCRIPT_ENV, TINY_MODEL, build_format, end_failed_loader_workers, noise_image, run_script

COMMANDS = {"gkg-train": "train", "gkg-evaluate": "evaluate", "gkg-predict": "predict", "gkg-export": "export",
            "gkg-inspect": "inspect_graphs"}  # fmt: skip


def one_error_line(capsys) -> str:
    """What the last command wrote to stderr, which must be exactly one ``error:`` line."""
    err = capsys.readouterr().err
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A 4 + 2 image CSV data set, its config, a checkpoint of the tiny model and an image."""
    tmp = tmp_path_factory.mktemp("cli")
    root = tmp / "data"
    config = tmp / "tiny.yaml"
    config.write_text(TINY_MODEL.format(name="cli", root=root, runs=tmp / "runs", data=build_format("csv_names", root)))
    cfg = load_config(config)
    model = build_model(cfg, ["bird", "cat", "dog"], load_weights=False)
    ckpt = tmp / "ckpt.pth"
    torch.save({"model": model.state_dict(), "config": cfg, "class_names": ["bird", "cat", "dog"]}, ckpt)
    return {"tmp": tmp, "root": root, "config": config, "ckpt": ckpt, "image": root / "imgs" / "val" / "0.png"}


# ---------------------------------------------------------------------------
# Every script: one line and exit status 2
# ---------------------------------------------------------------------------
def test_train_bad_config_key(tiny, capsys):
    assert run_script("train", tiny["config"], "--set", "train.epoch=3") == 2
    line = one_error_line(capsys)
    assert line == "error: unknown config key 'train.epoch' in override 'train.epoch=3'; did you mean 'train.epochs'?"


def test_train_bad_csv(tiny, tmp_path, capsys):
    root = tmp_path / "data"
    data = build_format("csv_names", root)
    (root / "val.csv").write_text("image,labels\nimgs/val/0.png,cat|zebra\n")
    config = tmp_path / "bad_csv.yaml"
    config.write_text(TINY_MODEL.format(name="bad", root=root, runs=tmp_path / "runs", data=data))
    assert run_script("train", config) == 2
    line = one_error_line(capsys)
    assert line.startswith(f"error: {root / 'val.csv'}, line 2: unknown label 'zebra'")
    assert not (tmp_path / "runs").exists()  # nothing written


def test_evaluate_missing_checkpoint(tiny, capsys):
    missing = tiny["tmp"] / "nothere.pth"
    assert run_script("evaluate", tiny["config"], "--checkpoint", missing) == 2
    assert one_error_line(capsys) == f"error: checkpoint not found: {missing}"


def test_evaluate_refuses_a_checkpoint_of_other_labels_or_graph(tiny, capsys):
    """k and groups change no tensor shape: a config with other values would load the weights and
    silently evaluate another graph."""
    assert run_script("evaluate", tiny["config"], "--checkpoint", tiny["ckpt"], "--set", "model.groups=1") == 2
    line = one_error_line(capsys)
    assert "was trained with model.groups=2, the config has model.groups=1" in line, line
    assert line.endswith("--set model.groups=2")
    # Labels of another name or order: every row of the results would be mislabelled.
    renamed = tiny["tmp"] / "renamed.pth"
    torch.save({**torch.load(tiny["ckpt"], weights_only=True), "class_names": ["cat", "bird", "dog"]}, renamed)
    assert run_script("evaluate", tiny["config"], "--checkpoint", renamed) == 2
    line = one_error_line(capsys)
    assert "was trained on the labels ['cat', 'bird', 'dog'], the evaluation split has ['bird', 'cat', 'dog']" in line
    other = tiny["tmp"] / "groups1.yaml"
    other.write_text(tiny["config"].read_text().replace("k: 3,", "k: 3, groups: 1,"))
    assert run_script("predict", "--checkpoint", tiny["ckpt"], "--config", other, tiny["image"]) == 2
    assert "was trained with model.groups=2, the config has model.groups=1" in one_error_line(capsys)


def test_evaluate_image_broken_after_the_check(tiny, tmp_path, capsys):
    """An image that breaks inside a DataLoader worker: the worker's traceback stays out of the line."""
    root = tmp_path / "data"
    data = build_format("csv_names", root)
    (root / "imgs" / "val" / "1.png").write_bytes(b"\x89PNG not really")
    config = tmp_path / "workers.yaml"
    config.write_text(TINY_MODEL.format(name="w", root=root, runs=tmp_path / "runs", data=data))
    code = run_script("evaluate", config, "--checkpoint", tiny["ckpt"], "--output", tmp_path / "eval",
                      "--set", "data.check_images=exists", "--set", "data.num_workers=1")  # fmt: skip
    assert code == 2
    line = one_error_line(capsys)
    assert line.startswith(f"error: cannot read image {root / 'imgs' / 'val' / '1.png'}:")
    assert "Traceback" not in line and "DataLoader" not in line
    end_failed_loader_workers()


def test_evaluate_every_image_unreadable(tiny, tmp_path, capsys):
    """Every evaluation image skipped as unreadable: one line saying so, not a traceback from the metrics."""
    root = tmp_path / "data"
    data = build_format("csv_names", root)
    for image in (root / "imgs" / "val").iterdir():
        image.write_bytes(b"\x89PNG not really")
    config = tmp_path / "broken.yaml"
    config.write_text(TINY_MODEL.format(name="b", root=root, runs=tmp_path / "runs", data=data))
    code = run_script("evaluate", config, "--checkpoint", tiny["ckpt"], "--output", tmp_path / "eval",
                      "--set", "data.check_images=exists", "--skip-bad-images")  # fmt: skip
    assert code == 2
    assert one_error_line(capsys) == "error: no evaluation image could be read: all 2 were skipped as unreadable"


def test_outputs_that_cannot_be_written_are_refused_before_the_work(tiny, tmp_path, capsys):
    """--output (evaluate, predict), --thresholds-output and --out (inspect) under a file or where
    nothing can be written: one line before the model runs (it was a traceback after all the work)."""
    a_file = tmp_path / "a_file"
    a_file.write_text("keep me")
    base = ("evaluate", tiny["config"], "--checkpoint", tiny["ckpt"])
    assert run_script(*base, "--output", a_file) == 2
    assert one_error_line(capsys) == f"error: --output {a_file} is a file; give a folder"
    assert run_script(*base, "--choose-thresholds", "--thresholds-output", a_file / "t.pth") == 2
    assert one_error_line(capsys).startswith(f"error: --thresholds-output {a_file / 't.pth'}: cannot write there")
    for output in (a_file / "p.csv", "/proc/gkg-pyg-test/p.json"):
        assert run_script("predict", "--checkpoint", tiny["ckpt"], tiny["image"], "--output", output) == 2
        assert one_error_line(capsys).startswith(f"error: --output {output}: cannot write there (")
    code = run_script("inspect_graphs", "--config", tiny["config"], "--checkpoint", tiny["ckpt"], "--image",
                      tiny["image"], "--out", a_file)  # fmt: skip
    assert code == 2 and one_error_line(capsys) == f"error: --out {a_file} is a file; give a folder"
    assert a_file.read_text() == "keep me"
    # A new file in a new folder is fine: the folder is made and nothing is left behind until the end
    ok = tmp_path / "new" / "predictions.csv"
    assert run_script("predict", "--checkpoint", tiny["ckpt"], tiny["image"], "--output", ok) == 0
    assert ok.read_text().startswith("image,")


def test_options_that_need_another_are_refused(tiny, capsys):
    """evaluate's threshold options without --choose-thresholds did nothing, silently; predict --workers -1
    was a DataLoader traceback."""
    base = ("evaluate", tiny["config"], "--checkpoint", tiny["ckpt"])
    for extra in (["--thresholds-output", "t.pth"], ["--no-store"], ["--min-positives", "3"]):
        assert run_script(*base, *extra) == 2
        assert one_error_line(capsys).startswith(f"error: {extra[0]} apply to the thresholds that --choose-thresholds")
    assert run_script("predict", "--checkpoint", tiny["ckpt"], tiny["image"], "--workers", "-1") == 2
    assert one_error_line(capsys).startswith("error: --workers must be >= 0, got -1")


def test_predict_missing_checkpoint_and_bad_option(tiny, capsys):
    assert run_script("predict", "--checkpoint", tiny["tmp"] / "nothere.pth", tiny["image"]) == 2
    assert one_error_line(capsys) == f"error: checkpoint not found: {tiny['tmp'] / 'nothere.pth'}"
    assert run_script("predict", "--checkpoint", tiny["ckpt"], tiny["image"], "--topk", "x") == 2
    assert one_error_line(capsys).startswith("error: argument --topk: invalid int value: 'x' (see ")


@pytest.mark.parametrize(
    "device,message",
    [("foo", "'foo' is not a device"), ("cuda:7", "'cuda:7': this machine has"), ("xla", "'xla': use cpu, cuda")],
)
def test_predict_and_inspect_name_a_device_this_machine_lacks(tiny, tmp_path, capsys, device, message):
    """--device is checked when the options are read: one error line, not a traceback from the first tensor."""
    if device == "cuda:7" and torch.cuda.device_count() > 7:
        pytest.skip("this machine has a cuda:7")
    assert run_script("predict", "--checkpoint", tiny["ckpt"], tiny["image"], "--device", device) == 2
    assert one_error_line(capsys).startswith(f"error: argument --device: {message}")
    code = run_script("inspect_graphs", "--config", tiny["config"], "--checkpoint", tiny["ckpt"], "--image",
                      tiny["image"], "--out", tmp_path / "out", "--device", device)  # fmt: skip
    assert code == 2 and one_error_line(capsys).startswith(f"error: argument --device: {message}")


def test_export_missing_checkpoint(tiny, capsys):
    missing = tiny["tmp"] / "nothere.pth"
    assert run_script("export", "--checkpoint", missing, "--output", tiny["tmp"] / "m.onnx") == 2
    assert one_error_line(capsys) == f"error: checkpoint not found: {missing}"


def test_inspect_bad_image(tiny, tmp_path, capsys):
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"\xff\xd8\xff not a jpeg")
    code = run_script("inspect_graphs", "--config", tiny["config"], "--checkpoint", tiny["ckpt"], "--image", bad,
                      "--out", tmp_path / "out")  # fmt: skip
    assert code == 2
    assert one_error_line(capsys).startswith(f"error: cannot read image {bad}:")
    assert run_script("inspect_graphs", "--config", tiny["config"], "--checkpoint", tiny["ckpt"], "--image",
                      tmp_path / "nothere.png", "--out", tmp_path / "out") == 2  # fmt: skip
    assert one_error_line(capsys) == f"error: image not found: {tmp_path / 'nothere.png'}"
    # A --dataset folder without images: refused before anything is drawn.
    out = tmp_path / "figures"
    assert run_script("inspect_graphs", "--config", tiny["config"], "--checkpoint", tiny["ckpt"], "--image",
                      tiny["image"], "--out", out, "--dataset", tmp_path / "nothere") == 2  # fmt: skip
    assert one_error_line(capsys).startswith("error: no images (") and not out.exists()


def test_pointcloud_missing_data(tmp_path, capsys):
    assert run_script("pointcloud", "--data", "modelnet10", "--root", tmp_path / "ModelNet10") == 2
    assert one_error_line(capsys).startswith(f"error: ModelNet10 not found under {tmp_path / 'ModelNet10'}")


@pytest.mark.slow
def test_label_path_experiment_keeps_its_settings(tmp_path, capsys):
    """A tiny run (fewer than 64 evaluation images: the probe takes them all), then the same
    command again (the finished run is skipped) and one with another override (refused: its
    table would mix runs of two settings)."""
    small = ["--out", tmp_path / "out", "--seeds", "0", "--variants", "full", "--set", "train.epochs=1",
             "--set", f"data.root={tmp_path / 'data'}", "--set",
             "data.synthetic={num_train: 64, num_val: 24, image_size: 64, seed: 1}"]  # fmt: skip
    assert run_script("label_path_experiment", *small) == 0
    assert "== full, seed 0" in capsys.readouterr().out
    assert run_script("label_path_experiment", *small) == 0
    assert "== full, seed 0" not in capsys.readouterr().out  # finished: skipped
    assert run_script("label_path_experiment", *small, "--set", "optim.lr=1e-6") == 2
    line = one_error_line(capsys)
    assert "holds runs made with other overrides (differing: optim.lr=1e-6)" in line, line


def test_label_path_experiment_bad_override(tmp_path, capsys):
    assert run_script("label_path_experiment", "--out", tmp_path, "--set", "train.epoch=3") == 2
    assert one_error_line(capsys).startswith("error: unknown config key 'train.epoch'")


def test_pvig_groups_bad_option(tmp_path, capsys):
    assert run_script("pvig_groups", "--root", tmp_path, "--k", "0") == 2
    assert one_error_line(capsys).startswith("error: --epochs, --batch-size, --k, --num-train, --num-val and --ima")
    assert run_script("pvig_groups", "--root", tmp_path, "--num-train", "0") == 2
    assert one_error_line(capsys).startswith("error: --epochs, --batch-size, --k, --num-train")
    assert run_script("pvig_groups", "--root", tmp_path, "--lr", "-1") == 2
    assert one_error_line(capsys).startswith("error: --lr must be > 0")
    assert not list(tmp_path.iterdir())  # refused before generating any data


# ---------------------------------------------------------------------------
# As real processes: the exit status, and --debug
# ---------------------------------------------------------------------------
def command(*args) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, *map(str, args)], env=SCRIPT_ENV, capture_output=True, text=True, timeout=300
    )


@pytest.mark.slow  # a process
def test_exit_status_and_debug_traceback(tiny, capsys):
    """As a process: exit status 2 and the one line. --debug puts the traceback before that line."""
    plain = command(REPO / "experiments" / "train.py", tiny["config"], "--set", "train.epoch=3")
    assert plain.returncode == 2, plain.stderr
    assert plain.stderr.splitlines() == [
        "error: unknown config key 'train.epoch' in override 'train.epoch=3'; did you mean 'train.epochs'?"
    ]
    assert run_script("train", tiny["config"], "--set", "train.epoch=3", "--debug") == 2
    debug = capsys.readouterr().err
    assert debug.startswith("Traceback (most recent call last):")
    assert "gkg_pyg.errors.ConfigError: unknown config key 'train.epoch'" in debug
    assert debug.splitlines()[-1] == plain.stderr.splitlines()[0]


def test_unexpected_errors_keep_their_traceback(capsys):
    """A bug is not a user error: run_cli lets it through (Python prints the traceback, status 1)."""

    def buggy(argv):
        raise KeyError("internal")

    with pytest.raises(KeyError):
        run_cli(buggy, [])
    assert capsys.readouterr().err == ""

    def mistaken(argv):
        raise ConfigError("a\nmulti-line   message")

    assert run_cli(mistaken, []) == 2
    assert capsys.readouterr().err == "error: a multi-line   message\n"
    assert run_cli(lambda argv: None, []) == 0 and run_cli(lambda argv: 1, []) == 1


def test_one_line_of_a_dataloader_worker_error():
    """torch re-raises a worker's exception as the same type with the worker's traceback as message."""
    message = (
        "Caught UnreadableImageError in DataLoader worker process 0.\nOriginal Traceback (most recent call last):\n"
        '  File "x.py", line 3, in f\n    raise err\n'
        "gkg_pyg.data.images.UnreadableImageError: cannot read image a.png: broken data stream"
    )
    err = UnreadableImageError(message)
    assert isinstance(err, ImageError) and isinstance(err, OSError) and isinstance(err, GkgError)
    assert one_line(err) == "cannot read image a.png: broken data stream"


def test_library_messages_print_like_the_scripts(capsys):
    """INFO records of the gkg_pyg loggers go to stdout as plain text, warnings to stderr with a prefix."""
    logger = setup_logging()
    setup_logging()  # once only, however often it is called
    assert sum(type(h).__name__ == "_ConsoleHandler" for h in logger.handlers) == 1
    logging.getLogger("gkg_pyg.data.base").info("dropped 1 of the 40 rows")
    logging.getLogger("gkg_pyg.thresholds").warning("the calibration split is small")
    logging.getLogger("gkg_pyg.checkpoint").debug("not shown at INFO")
    printed = capsys.readouterr()
    assert printed.out == "dropped 1 of the 40 rows\n"
    assert printed.err == "warning: the calibration split is small\n"


# ---------------------------------------------------------------------------
# Console commands of the installed package
# ---------------------------------------------------------------------------
def test_console_commands_resolve():
    try:
        importlib.metadata.distribution("gkg-pyg")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("gkg-pyg is not installed (pip install -e .): no console commands to check")
    found = {ep.name: ep for ep in importlib.metadata.entry_points(group="console_scripts") if ep.name in COMMANDS}
    assert set(found) == set(COMMANDS), "console commands missing: re-run pip install -e ."
    for name, script in COMMANDS.items():
        main = found[name].load()
        assert callable(main) and main.__name__ == "main"
        assert Path(sys.modules[main.__module__].__file__).resolve() == REPO / "experiments" / f"{script}.py"


@pytest.mark.slow  # a process
def test_console_command_runs(tiny):
    """gkg-predict, as installed: the same one-line error as the script."""
    exe = Path(sys.executable).with_name("gkg-predict")
    if not exe.exists():
        pytest.skip(f"{exe} is not installed (pip install -e .)")
    missing = tiny["tmp"] / "nothere.pth"
    proc = subprocess.run([str(exe), "--checkpoint", str(missing), str(tiny["image"])], env=SCRIPT_ENV,
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 2 and proc.stderr == f"error: checkpoint not found: {missing}\n"


def test_predict_json_output_stays_clean(tiny, capsys):
    """The threshold note and the library's messages stay off stdout, so --json output parses."""
    noise_image(tiny["tmp"] / "p.jpg", 3)
    code = run_script("predict", "--checkpoint", tiny["ckpt"], tiny["tmp"] / "p.jpg", "--json", "--workers", "0",
                      "--no-progress")  # fmt: skip
    assert code == 0
    printed = capsys.readouterr()
    assert json.loads(printed.out)[0]["image"] == str(tiny["tmp"] / "p.jpg")
    assert "thresholds: 0.5 for every class" in printed.err
