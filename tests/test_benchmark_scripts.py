"""The benchmark scripts' own logic: benchmarks/authors.py names a missing
harness or GPU; benchmarks/throughput.py prints its table with positive rates,
and its torch.compile row."""

from __future__ import annotations

import statistics
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from helpers import load_benchmark

# End-to-end runs of whole scripts: the quick run (-m "not slow") leaves them out.
pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]


def test_authors_benchmark_names_a_missing_harness(tmp_path):
    script = load_benchmark("authors")
    with pytest.raises(SystemExit, match="no official_model.py there; build it with"):
        script.main(["--harness", str(tmp_path), "--rounds", "1"])


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message of a machine without a GPU")
def test_authors_benchmark_without_a_gpu_says_so(tmp_path, capsys):
    script = load_benchmark("authors")
    with pytest.raises(SystemExit):
        script.main(["--harness", str(tmp_path), "--device", "cuda", "--amp", "fp16"])
    assert "--device cuda: no GPU visible to torch" in capsys.readouterr().err


def test_authors_benchmark_pairs_rounds():
    """Speed-ups are taken round by round, then summarised: a drift that slows both sides of a
    round alike leaves them unchanged, where a ratio of the two medians would move."""
    script = load_benchmark("authors")
    baseline, timed = [2.0, 4.0, 8.0], [1.0, 2.2, 4.0]  # seconds: speed-ups 2.0, 1.82, 2.0
    assert script.paired_speedup(baseline, timed) == "2.00x (1.82-2.00)"
    assert script.paired_speedup(baseline, timed, digits=3) == "2.000x (1.82-2.00)"
    assert statistics.median(baseline) / statistics.median(timed) != 2.0
    with pytest.raises(ValueError):
        script.paired_speedup(baseline, timed[:2])


def test_authors_benchmark_warms_up_every_configuration(tmp_path, capsys, monkeypatch):
    """``--warmup`` untimed steps of each configuration come before the timed rounds
    (a stand-in for the authors' model counts its calls), every other round runs the
    configurations in reverse order, and fewer than one warm-up step is refused."""
    (tmp_path / "official_model.py").write_text(
        "import torch\n"
        "class OfficialGKGNet(torch.nn.Module):\n"
        "    calls = 0\n"
        "    def __init__(self, size, choice):\n"
        "        super().__init__()\n"
        "        self.head = torch.nn.Linear(3, 80)\n"
        "    def forward(self, x):\n"
        "        type(self).calls += 1\n"
        "        return self.head(x.mean((2, 3)))\n"
    )
    script = load_benchmark("authors")
    argv = ["--harness", str(tmp_path), "--img-size", "96", "--batch", "1", "--tasks", "eval", "--rounds", "2"]
    monkeypatch.setattr(sys, "path", list(sys.path))  # main puts the harness first on the path
    order, step = [], script.step
    monkeypatch.setattr(script, "step", lambda model, *args: order.append(type(model).__name__) or step(model, *args))
    try:
        script.main(argv + ["--warmup", "3"])
        assert sys.modules["official_model"].OfficialGKGNet.calls == 3 + 2
    finally:
        sys.modules.pop("official_model", None)
    rounds = order[2 * 3 :]
    assert rounds == ["OfficialGKGNet", "GKGNet", "GKGNet", "OfficialGKGNet"]
    assert "| eval | gkg-pyg, fp32 |" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        script.main(argv + ["--warmup", "0"])
    assert "--warmup must be at least 1" in capsys.readouterr().err


def table_rows(out: str) -> dict:
    lines = [line for line in out.splitlines() if line.startswith("|")]
    return {cells[0]: cells for cells in ([c.strip() for c in line.strip("|").split("|")] for line in lines[2:])}


def test_throughput_prints_its_table_with_flop_rates_and_a_compile_row():
    """The header names the device's matrix-product rate; every row has positive
    images/s and GFLOP/s (the flop counter saw the model's products, the gkg_pyg
    operators included) and the eager model row a kNN share; the torch.compile
    row reports the seconds of its first (compiling) step. The command is the GPU
    script's bench step's (at its smoke settings, GKGNet-Ti at 96 px), and that step
    reads the table. The compiled row uses torch.compile's eager backend (dynamo's
    capture without code generation): inductor's C++ code for the whole model takes
    40 s from a warm cache and 115 s from a cold one on 2 cores (the operators under
    inductor: test_conv_pyg.py)."""
    gpu_check = load_benchmark("gpu_check")
    args, cpu = gpu_check.parse_args(["--smoke"]), torch.device("cpu")
    cmd = gpu_check.bench_command(args, cpu, 96) + ["--model", "gkgnet_ti", "--skip-train", "--compile"]
    cmd += ["--compile-backend", "eager"]
    out = subprocess.run(list(map(str, cmd)), capture_output=True, text=True, check=True, timeout=900, cwd=ROOT).stdout
    header = next(line for line in out.splitlines() if line.startswith("#"))
    assert "dense matrix products" in header and float(header.split("products ")[1].split()[0]) > 0
    assert "compile backend eager" in header
    rows = table_rows(out)
    assert set(rows) == {"gkg_pyg[dense]", "gkg_pyg[dense]+compile", "group_knn[dense]"}
    for cells in rows.values():
        assert float(cells[3]) > 0 and float(cells[5]) >= 0  # images/s, GFLOP/s
    assert float(rows["gkg_pyg[dense]"][5]) > 0  # the flop counter saw the model's products
    assert 0 < float(rows["gkg_pyg[dense]"][6].rstrip("%")) < 100  # kNN share
    assert float(rows["gkg_pyg[dense]+compile"][7]) > 0  # seconds of the first step
    parsed = gpu_check.bench_rows(out, args, cpu, 96)
    assert [(name.split()[-2:], result) for name, result, _ in parsed] == [
        (["eval,", "dense"], "ok"),
        (["eval,", "dense+compile"], "ok"),
    ], parsed


def test_throughput_refuses_an_unknown_compile_backend(capsys):
    """One error line naming the known backends, before any row's process starts."""
    with pytest.raises(SystemExit) as stop:
        load_benchmark("throughput").main(["--compile", "--compile-backend", "nope", "--device", "cpu"])
    assert stop.value.code == 2
    assert "--compile-backend 'nope' is not a torch.compile backend; known: [" in capsys.readouterr().err
