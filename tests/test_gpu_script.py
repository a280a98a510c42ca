"""benchmarks/gpu.sh and benchmarks/gpu_check.py without a GPU: the script's
syntax and argument checks, the checks' ability to fail, the summary table,
each step on the CPU at tiny sizes, and (slow) ``--dry-run`` end to end."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from helpers import load_benchmark, run_script

# End-to-end runs of whole scripts: the quick run (-m "not slow") leaves them out.
pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu.sh"


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
    gpu_check = load_benchmark("gpu_check")
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
    gpu_check = load_benchmark("gpu_check")
    gpu_check.row("bench", "ok", "12.5 img/s | peak 3000 MiB")
    gpu_check.row("train", "FAIL", "loss did not fall")
    args = gpu_check.argparse.Namespace()
    text = gpu_check.report(args, torch.device("cpu"))
    table = [line for line in text.splitlines() if line.startswith("|")]
    assert table[0] == "| step | result | details |" and len(table) == 4
    assert all(line.count("|") == 4 for line in table), "a cell's own | must not split the row"
    assert "1 failed" in text


@pytest.mark.slow
def test_dry_run_checks_on_the_cpu(tmp_path):
    """The script end to end on the CPU at tiny sizes (gpu.sh, gpu_check.py --smoke, the checks, the
    report). The other steps run other processes (pytest, the benchmark scripts, a process per row,
    train.py twice): their commands and what they read of their output are tested with the scripts
    themselves (test_benchmark_scripts.py, test_memory.py), on recorded output and, for the training
    demo, with train.py run in this process (below)."""
    # gpu.sh's own options first: the rest goes to gpu_check.py
    proc = bash("--dry-run", "--steps", "checks", out=tmp_path, timeout=1800)
    report = (tmp_path / "gpu_report.md").read_text()
    assert "| check | PASS |" in report, f"no check rows:\n{report}\n{proc.stdout[-3000:]}"
    assert proc.returncode == report.count("| FAIL |") == 0, report


def test_train_step_stops_resumes_and_reports(monkeypatch, capsys):
    """The training demo step's two runs of experiments/train.py (stopped after epoch 2, resumed to
    the end), each run by its command line in this process instead of a process of its own: the
    step reads the log and the resume message and writes one PASS row."""
    gpu_check = load_benchmark("gpu_check")
    commands = []

    def run(cmd, timeout=3600):
        cmd = [str(c) for c in cmd]
        commands.append(cmd)
        assert cmd[:2] == [sys.executable, "experiments/train.py"]
        capsys.readouterr()
        code = run_script("train", *cmd[2:])
        printed = capsys.readouterr()
        return subprocess.CompletedProcess(cmd, code, printed.out, printed.err)

    monkeypatch.chdir(ROOT)  # the step's paths are relative to the repository, as its processes' are
    monkeypatch.setattr(gpu_check, "run", run)
    cpu = torch.device("cpu")
    gpu_check.run_step("train", gpu_check.parse_args(["--smoke", "--no-compile"]), cpu)
    ((name, result, details),) = gpu_check.ROWS
    assert (name, result) == (f"training demo ({gpu_check.precision(cpu)}, resume)", "PASS"), details
    assert "checkpoint after epoch 2, resumed to epoch 3" in details and details.count("->") == 2
    assert "train.stop_after_epochs=2" in commands[0] and "--resume" in commands[1]


THROUGHPUT = """# GKGNet-S ... dense matrix products 138 GFLOP/s
| model | task | ms/step | images/s | peak MiB | GFLOP/s | kNN share | first step s |
|---|---|---|---|---|---|---|---|
| gkg_pyg[dense] | eval | 140.3 | 7.13 | 909 | 74 | 14% | 0.2 |
| gkg_pyg[dense] | train | nan | nan | nan | nan | | |
| gkg_pyg[dense]+compile | eval | 120.0 | 8.33 | 900 | 80 | | 40.1 |
| group_knn[dense] | knn stage 1 | 3.4 | 291.55 | 795 | 29 | 100% | |
"""
MEMORY = """| size | batch | precision | gkg-pyg kNN | gkg-pyg MiB | authors MiB | gkg-pyg / authors |
|---:|---:|---|---|---:|---:|---:|
| 96 | 1 | fp16 | dense | 743 | 1200 | 0.62x |
"""
AUTHORS = """GKGNet-S, 96 px, batch 1, cpu, 1 rounds
| task | configuration | images/s (median) | speed / authors fp32 (median of rounds, min-max) |
|---|---|---|---|
| eval | gkg-pyg, fp32 | 9.40 | 3.80x (3.35-4.23) |
| train | gkg-pyg, fp32 | 3.48 | 2.20x (1.82-2.23) |
"""


def test_bench_memory_and_authors_steps_read_their_scripts_tables(monkeypatch, tmp_path):
    """The steps that run the benchmark scripts, on their tables (the real scripts' tables are
    parsed in test_benchmark_scripts.py and test_memory.py): a row per measurement, a FAIL row for a
    measuring process that failed or a script that exited with an error."""
    gpu_check = load_benchmark("gpu_check")
    (tmp_path / "peak_memory.py").write_text("")
    args = gpu_check.parse_args(["--smoke", "--harness", str(tmp_path)])
    args.sizes = [96]
    commands = []

    def run(cmd, timeout=3600):
        cmd = [str(c) for c in cmd]
        commands.append(cmd)
        script = Path(cmd[1]).name
        out = {"throughput.py": THROUGHPUT, "memory.py": MEMORY, "authors.py": AUTHORS}.get(script, "peak 812 MiB")
        code = 1 if script == "peak_memory.py" and cmd[2] == "authors" else 0
        return subprocess.CompletedProcess(cmd, code, out, "")

    monkeypatch.setattr(gpu_check, "run", run)
    cpu = torch.device("cpu")
    for step in ("bench", "memory", "authors"):
        gpu_check.run_step(step, args, cpu)
    p = gpu_check.precision(cpu)
    rows = {name: (result, details) for name, result, details in gpu_check.ROWS}
    assert rows[f"GKGNet-S 96 px b1 {p} eval, dense"] == ("ok", "7.13 img/s, peak 909 MiB, kNN 14% of the step")
    assert rows[f"GKGNet-S 96 px b1 {p} train, dense"] == ("FAIL", "the measuring process failed")
    assert rows[f"GKGNet-S 96 px b1 {p} eval, dense+compile"][0] == "ok"
    assert rows["estimated peak, train step 96 px b1 fp16, dense"] == (
        "ok",
        "gkg-pyg 743 MiB, authors 1200 MiB (0.62x)",
    )
    assert rows["paired 96 px b1 train: gkg-pyg, fp32"] == ("ok", "3.48 img/s, 2.20x (1.82-2.23)")
    amp = "amp" if gpu_check.amp_name(cpu) else "fp32"
    assert rows[f"harness peak memory 96 px b1 train {amp}, authors"][0] == "FAIL"
    assert rows[f"harness peak memory 96 px b1 train {amp}, gkg_pyg"] == ("ok", "peak 812 MiB")
    assert [Path(c[1]).name for c in commands] == ["throughput.py", "memory.py", "authors.py"] + ["peak_memory.py"] * 2
    assert commands[1][-2:] == ["--authors", str(tmp_path)]  # the memory step puts the authors' estimate beside

    gpu_check.ROWS.clear()
    monkeypatch.setattr(gpu_check, "run", lambda cmd, timeout=3600: subprocess.CompletedProcess(cmd, 2, "", "error: x"))
    gpu_check.run_step("bench", args, cpu)
    gpu_check.run_step("memory", args, cpu)
    assert [(name, result) for name, result, _ in gpu_check.ROWS] == [
        (f"GKGNet-S 96 px b1 {p}", "FAIL"),
        ("estimated peak, train step 96 px b1 fp16", "FAIL"),
    ]


def test_tests_step_reports_each_pytest_run(monkeypatch):
    """The tests step: one pytest process per suite (no workers: pytest-xdist may be missing on the
    GPU machine), its summary line in the row, FAIL where pytest failed."""
    gpu_check = load_benchmark("gpu_check")
    outputs = iter([(0, "...\n= 1016 passed, 2 skipped in 80.1s ="), (1, "F.\n= 1 failed, 75 passed in 60.0s =")])
    commands = []

    def run(cmd, timeout=3600):
        commands.append([str(c) for c in cmd])
        code, out = next(outputs)
        return subprocess.CompletedProcess(cmd, code, out, "")

    monkeypatch.setattr(gpu_check, "run", run)
    gpu_check.run_step("tests", gpu_check.parse_args(["--device", "cpu"]), torch.device("cpu"))
    assert gpu_check.ROWS == [
        ("tests: not slow", "PASS", "1016 passed, 2 skipped in 80.1s"),
        ("tests: fake CUDA", "FAIL", "1 failed, 75 passed in 60.0s"),
    ]
    assert all(c[1:3] == ["-m", "pytest"] and "addopts=-ra" in c for c in commands)
    assert commands[0][-2:] == ["-m", "not slow"] and commands[1][-1] == "tests/test_fake_cuda.py"
