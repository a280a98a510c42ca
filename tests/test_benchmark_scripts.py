"""The benchmark scripts' own logic: experiments/gpu_check.py (the one-call GPU
check of issue 8) run on the CPU at small sizes passes, and a wrong kNN answer
fails it; experiments/benchmark_authors.py names a missing harness."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch

import pytest

EXPERIMENTS = Path(__file__).resolve().parents[1] / "experiments"


def load_script(name="gpu_check"):
    spec = importlib.util.spec_from_file_location(name, EXPERIMENTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_gpu_check_passes_on_the_cpu(capsys):
    gpu_check = load_script()
    assert gpu_check.main(["--device", "cpu", "--quick"]) == 0
    out = capsys.readouterr().out
    assert out.count("PASS") >= 5 and "FAIL" not in out


def test_gpu_check_reports_a_wrong_neighbour_table(monkeypatch, capsys):
    gpu_check = load_script()
    real, calls = gpu_check.batched_group_knn, []

    def every_second_call_wrong(*args, **kwargs):  # the device side of each comparison
        calls.append(1)
        table = real(*args, **kwargs)
        return table.flip(-1) if len(calls) % 2 == 0 else table

    monkeypatch.setattr(gpu_check, "batched_group_knn", every_second_call_wrong)
    gpu_check.check_knn(torch.device("cpu"), 64, 1)
    assert gpu_check.FAILURES and "FAIL  kNN dense" in capsys.readouterr().out


def test_benchmark_authors_names_a_missing_harness(tmp_path):
    script = load_script("benchmark_authors")
    with pytest.raises(SystemExit, match="no official_model.py there; build it with"):
        script.main(["--harness", str(tmp_path), "--rounds", "1"])


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message of a machine without a GPU")
def test_benchmark_authors_without_a_gpu_says_so(tmp_path, capsys):
    script = load_script("benchmark_authors")
    with pytest.raises(SystemExit):
        script.main(["--harness", str(tmp_path), "--device", "cuda", "--amp", "fp16"])
    assert "--device cuda: no GPU visible to torch" in capsys.readouterr().err


def test_benchmark_prints_its_table_with_flop_rates():
    """experiments/benchmark.py end to end at a small size: the header names
    the device's matrix-product rate, every row has a positive GFLOP/s (the
    flop counter saw the model's products, also the reference's in eval) and images/s."""
    import subprocess
    import sys

    cmd = [sys.executable, str(EXPERIMENTS / "benchmark.py"), "--model", "gkgnet_ti", "--img-size", "192"]
    cmd += ["--batch", "1", "--iters", "1", "--backend", "dense", "--skip-train", "--device", "cpu"]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, timeout=600).stdout
    header, *lines = [line for line in out.splitlines() if line.startswith(("#", "|"))]
    assert "dense matrix products" in header and float(header.split("products ")[1].split()[0]) > 0
    rows = {cells[0]: cells for cells in ([c.strip() for c in line.strip("|").split("|")] for line in lines[2:])}
    assert set(rows) == {"gkg_pyg[dense]", "reference", "group_knn[dense]"}
    for cells in rows.values():
        assert float(cells[3]) > 0 and float(cells[5]) > 0  # images/s, GFLOP/s


def test_benchmark_revisions_times_a_revision_against_the_working_tree():
    """experiments/benchmark_revisions.py end to end at a small size against
    HEAD: both rows, the revision's ratio to itself 1, a bad revision named."""
    import subprocess
    import sys

    cmd = [sys.executable, str(EXPERIMENTS / "benchmark_revisions.py"), "--base", "HEAD", "--model", "gkgnet_ti"]
    cmd += ["--img-size", "96", "--batch", "1", "--rounds", "2", "--tasks", "eval", "train"]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, timeout=600).stdout
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in out.splitlines() if line.startswith("| ")]
    assert [(r[0], r[1]) for r in rows[1:]] == [(t, n) for t in ("eval", "train") for n in ("HEAD", "working tree")]
    for _task, name, images_per_s, ratio in rows[1:]:
        assert float(images_per_s) > 0 and float(ratio.split("x")[0]) > 0
        if name == "HEAD":
            assert ratio.startswith("1.000x")
    bad = subprocess.run(cmd[:3] + ["no-such-revision"], capture_output=True, text=True, timeout=600)
    assert bad.returncode != 0 and "--base no-such-revision: git archive failed" in bad.stderr


def test_benchmark_revisions_refuses_a_package_that_imports_itself_by_name():
    script = load_script("benchmark_revisions")
    assert script._ABSOLUTE_IMPORT.search("x = 1\nfrom gkg_pyg.knn import group_knn\n")
    assert script._ABSOLUTE_IMPORT.search("    import gkg_pyg\n")
    assert not script._ABSOLUTE_IMPORT.search("from .knn import group_knn\nimport gkg_pyg_base\n")


def test_benchmark_parts_replaces_each_part_and_puts_it_back(capsys):
    """experiments/benchmark_parts.py at a small size: a row per variant, every
    stand-in called in every step, and the model's own functions back in place
    afterwards."""
    from gkg_pyg import knn, native
    from gkg_pyg.models import gkgnet

    originals = (gkgnet.batched_group_knn, knn.knn_smallest_k, native.bn_gelu_linear_backward)
    script = load_script("benchmark_parts")
    threads = torch.get_num_threads()
    try:
        times = script.main(["--model", "gkgnet_ti", "--img-size", "96", "--batch", "2", "--rounds", "2"])
    finally:
        torch.set_num_threads(threads)
    assert (gkgnet.batched_group_knn, knn.knn_smallest_k, native.bn_gelu_linear_backward) == originals
    assert list(times) == ["whole step", "group kNN", "kNN kernel", "fused backward passes", "AdamW"]
    assert all(len(t) == 2 and min(t) > 0 for t in times.values())
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in capsys.readouterr().out.splitlines()]
    rows = {r[0]: r[1:] for r in rows if r[0].startswith(("whole", "without"))}
    assert set(rows) == {"whole step", *(f"without {name}" for name in list(times)[1:])}
    for name in ("group kNN", "kNN kernel", "fused backward passes"):
        assert int(rows[f"without {name}"][0]) > 0, name  # calls replaced per step
