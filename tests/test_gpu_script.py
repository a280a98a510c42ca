"""benchmarks/gpu.sh and benchmarks/gpu_check.py without a GPU: the script's
syntax and argument checks, the checks' ability to fail, the summary table,
and (slow) the whole ``--dry-run``: every step on the CPU at tiny sizes."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

# End-to-end runs of whole scripts: the quick run (-m "not slow") leaves them out.
pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu.sh"


def load_gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "benchmarks" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def bash(*args, **kwargs) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHON=sys.executable, OUT=str(kwargs.pop("out")))
    return subprocess.run(["bash", str(SCRIPT), *args], cwd=ROOT, env=env, capture_output=True, text=True, **kwargs)


def test_script_syntax():
    assert subprocess.run(["bash", "-n", str(SCRIPT)]).returncode == 0


def test_script_names_a_missing_sdist_or_harness(tmp_path):
    proc = bash("--sdist", str(tmp_path / "nothing.tar.gz"), out=tmp_path)
    assert proc.returncode == 2 and "no such file" in proc.stderr
    proc = bash("--harness", str(tmp_path), out=tmp_path)
    assert proc.returncode == 2 and "no peak_memory.py" in proc.stderr


def test_checks_report_a_wrong_neighbour_table(monkeypatch, capsys):
    """The device check compares tables: a wrong one on "the device" is a FAIL row."""
    gpu_check = load_gpu_check()
    real, calls = gpu_check.batched_group_knn, []

    def every_second_call_wrong(*args, **kwargs):
        calls.append(1)
        out = real(*args, **kwargs)
        return out.flip(-1) if len(calls) % 2 == 0 else out

    monkeypatch.setattr(gpu_check, "batched_group_knn", every_second_call_wrong)
    gpu_check.check_knn(torch.device("cpu"), 64, 1)
    assert gpu_check.FAILURES and "FAIL  kNN dense" in capsys.readouterr().out
    assert any(result == "FAIL" for _, result, _ in gpu_check.ROWS)


def test_summary_is_one_markdown_table(tmp_path):
    gpu_check = load_gpu_check()
    gpu_check.row("bench", "ok", "12.5 img/s | peak 3000 MiB")
    gpu_check.row("train", "FAIL", "loss did not fall")
    args = gpu_check.argparse.Namespace()
    text = gpu_check.report(args, torch.device("cpu"))
    table = [line for line in text.splitlines() if line.startswith("|")]
    assert table[0] == "| step | result | details |" and len(table) == 4
    assert all(line.count("|") == 4 for line in table), "a cell's own | must not split the row"
    assert "1 failed" in text


@pytest.mark.slow
def test_dry_run_runs_every_step_on_the_cpu(tmp_path):
    """The whole script on the CPU at tiny sizes: every step leaves a row, and the
    report is written. The training demo runs without --compile (compiling it takes
    minutes on 2 cores; torch.compile of the model and of the training scripts is
    tested in test_model.py, test_train.py and test_benchmark_scripts.py)."""
    harness = os.environ.get("GKG_PYG_AUTHORS_HARNESS", "/work/authors_harness")
    args = ["--dry-run"] + (["--harness", harness] if Path(harness, "peak_memory.py").exists() else [])
    args += ["--no-compile"]  # gpu.sh's own options first: the rest goes to gpu_check.py
    proc = bash(*args, out=tmp_path, timeout=1800)
    report = (tmp_path / "gpu_report.md").read_text()
    # bf16 rows where this CPU computes bfloat16 natively, else float32 rows
    precision = load_gpu_check().precision(torch.device("cpu"))
    for step in (
        "| check |",
        "| tests: fake CUDA |",
        f"| GKGNet-S 224 px b1 {precision}",
        "| estimated peak",
        f"| training demo ({precision}, resume) | PASS |",
    ):
        assert step in report, f"no {step!r} row:\n{report}\n{proc.stdout[-3000:]}"
    assert proc.returncode == report.count("| FAIL |"), report
    # The throughput step parsed its table: a measured row per task (a FAIL row also names the size).
    assert f"| GKGNet-S 224 px b1 {precision} eval, dense | ok |" in report, report
