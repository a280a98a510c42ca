"""The benchmark scripts' own logic: benchmarks/authors.py names a missing
harness or GPU; benchmarks/throughput.py prints its table with positive rates,
and its torch.compile row."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest
import torch

# End-to-end runs of whole scripts: the quick run (-m "not slow") leaves them out.
pytestmark = pytest.mark.slow

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def load_script(name: str):
    spec = importlib.util.spec_from_file_location(f"benchmark_{name}", BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_authors_benchmark_names_a_missing_harness(tmp_path):
    script = load_script("authors")
    with pytest.raises(SystemExit, match="no official_model.py there; build it with"):
        script.main(["--harness", str(tmp_path), "--rounds", "1"])


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message of a machine without a GPU")
def test_authors_benchmark_without_a_gpu_says_so(tmp_path, capsys):
    script = load_script("authors")
    with pytest.raises(SystemExit):
        script.main(["--harness", str(tmp_path), "--device", "cuda", "--amp", "fp16"])
    assert "--device cuda: no GPU visible to torch" in capsys.readouterr().err


def table_rows(out: str) -> dict:
    lines = [line for line in out.splitlines() if line.startswith("|")]
    return {cells[0]: cells for cells in ([c.strip() for c in line.strip("|").split("|")] for line in lines[2:])}


def run_throughput(*extra: str) -> str:
    cmd = [sys.executable, str(BENCHMARKS / "throughput.py"), "--model", "gkgnet_ti", "--img-size", "96"]
    cmd += ["--batch", "1", "--iters", "1", "--backend", "dense", "--device", "cpu", *extra]
    return subprocess.run(cmd, capture_output=True, text=True, check=True, timeout=900).stdout


def test_throughput_prints_its_table_with_flop_rates_and_a_compile_row():
    """The header names the device's matrix-product rate; every row has positive
    images/s and GFLOP/s (the flop counter saw the model's products, the gkg_pyg
    operators included) and the eager model row a kNN share; the torch.compile
    row reports the seconds of its first (compiling) step."""
    out = run_throughput("--skip-train", "--compile")
    header = next(line for line in out.splitlines() if line.startswith("#"))
    assert "dense matrix products" in header and float(header.split("products ")[1].split()[0]) > 0
    rows = table_rows(out)
    assert set(rows) == {"gkg_pyg[dense]", "gkg_pyg[dense]+compile", "group_knn[dense]"}
    for cells in rows.values():
        assert float(cells[3]) > 0 and float(cells[5]) >= 0  # images/s, GFLOP/s
    assert float(rows["gkg_pyg[dense]"][5]) > 0  # the flop counter saw the model's products
    assert 0 < float(rows["gkg_pyg[dense]"][6].rstrip("%")) < 100  # kNN share
    assert float(rows["gkg_pyg[dense]+compile"][7]) > 0  # seconds of the first step
