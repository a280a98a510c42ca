"""Tests of the compiled top-k kernel (gkg_pyg.native) against torch.topk and a
stable sort: exact indices and order on random rows, ties, infinities, NaN
rows, every supported (k, n) boundary, threads; the fallbacks; and the dense
kNN with and without the kernel."""

from __future__ import annotations

import shutil
import sysconfig

import pytest
import torch

import gkg_pyg.native as native
from gkg_pyg import batched_group_knn


def compiler_present() -> bool:
    cc = (sysconfig.get_config_var("CC") or "cc").split()[0]
    return shutil.which(cc) is not None or shutil.which("cc") is not None


@pytest.fixture
def kernel():
    """The loaded library; a machine with a C compiler must have built it (no silent skip in CI)."""
    if not compiler_present():
        pytest.skip("no C compiler: the kernel cannot be built here")
    assert native.native_available()
    return native._library


class CountingLibrary:
    """Stands in for the ctypes library and counts the kernel's calls."""

    def __init__(self, library):
        self.library, self.calls = library, 0

    def gkg_smallest_k(self, *args):
        self.calls += 1
        return self.library.gkg_smallest_k(*args)


@pytest.fixture
def counting(kernel, monkeypatch):
    counter = CountingLibrary(kernel)
    monkeypatch.setattr(native, "_library", counter)
    return counter


def stable_smallest(dist: torch.Tensor, k: int) -> torch.Tensor:
    """Brute force: a stable ascending sort keeps equal values in index order."""
    return torch.sort(dist, dim=-1, stable=True).indices[..., :k]


@pytest.mark.parametrize(
    "k,n",
    [(1, 64), (2, 65), (9, 196), (9, 100), (16, 64), (16, 3137), (17, 128), (27, 196), (32, 128), (9, 785)],
)
@pytest.mark.parametrize("rows", [1, 3, 257])
def test_matches_topk_on_random_rows(counting, k, n, rows):
    gen = torch.Generator().manual_seed(k * 1000 + n + rows)
    # Row counts below the size limit repeat to reach it; the last rows differ.
    dist = torch.randn(max(rows, native._MIN_ELEMENTS // n + 1), n, generator=gen)
    expected = dist.topk(k, dim=-1, largest=False)
    got = native.smallest_k(dist, k)
    assert counting.calls == 1
    assert got.dtype == torch.long and got.shape == (dist.shape[0], k)
    assert torch.equal(got, expected.indices)
    assert torch.equal(dist.gather(-1, got), expected.values)


@pytest.mark.parametrize("k", [9, 27])
def test_ties_are_broken_by_the_lower_index(counting, k):
    """Integer-valued rows (hundreds of exact ties): the order of a stable sort."""
    gen = torch.Generator().manual_seed(k)
    dist = torch.randint(0, 7, (512, 196), generator=gen).float()
    dist[0] = 0.0  # a constant row
    dist[1, ::2] = -1.0  # many minima
    assert torch.equal(native.smallest_k(dist, k), stable_smallest(dist, k))
    assert counting.calls == 1


def test_infinities_and_signed_zeros(counting):
    gen = torch.Generator().manual_seed(1)
    dist = torch.randn(300, 200, generator=gen)
    dist[:, 5] = float("-inf")
    dist[::3, 100:] = float("inf")
    dist[1] = float("inf")
    dist[2, :50] = -0.0
    dist[2, 50:100] = 0.0
    assert torch.equal(native.smallest_k(dist, 12), stable_smallest(dist, 12))
    assert counting.calls == 1


def test_nan_rows_fall_back_to_topk(counting):
    gen = torch.Generator().manual_seed(2)
    dist = torch.randn(200, 196, generator=gen)
    dist[7, 3] = float("nan")
    dist[150, 195] = float("nan")  # in the tail past the last full block of buckets
    for k in (9, 20):
        assert torch.equal(native.smallest_k(dist, k), dist.topk(k, dim=-1, largest=False).indices)
    assert counting.calls == 2  # the kernel saw the NaN and declined


def test_views_and_leading_dimensions(counting):
    gen = torch.Generator().manual_seed(3)
    base = torch.randn(2, 4, 300, 400, generator=gen)
    dist = base[..., 50:250]  # not contiguous
    got = native.smallest_k(dist, 9)
    assert got.shape == (2, 4, 300, 9)
    assert torch.equal(got, dist.topk(9, dim=-1, largest=False).indices)


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_any_thread_count(counting, threads):
    gen = torch.Generator().manual_seed(4)
    dist = torch.randn(101, 196, generator=gen)
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        got = native.smallest_k(dist, 9)
    finally:
        torch.set_num_threads(previous)
    assert torch.equal(got, dist.topk(9, dim=-1, largest=False).indices)


@pytest.mark.parametrize(
    "make",
    [
        lambda: (torch.randn(300, 196, dtype=torch.float64), 9),  # float64
        lambda: (torch.randn(300, 196), 33),  # k beyond the kernel's buckets
        lambda: (torch.randn(300, 127), 17),  # k > 16 needs 128 entries
        lambda: (torch.randn(600, 63), 9),  # k <= 16 needs 64 entries
        lambda: (torch.randn(50, 196), 9),  # too small to pay for the threads
        lambda: (torch.randn(300, 196).bfloat16(), 9),
    ],
)
def test_outside_the_kernel_runs_topk(counting, make):
    dist, k = make()
    assert torch.equal(native.smallest_k(dist, k), dist.topk(k, dim=-1, largest=False).indices)
    assert counting.calls == 0


def test_kernel_rejects_unsupported_shapes_itself(kernel):
    """The C entry point checks (k, n) on its own and leaves ``out`` alone."""
    dist = torch.randn(4, 100)
    out = torch.full((4, 20), -5, dtype=torch.long)
    assert kernel.gkg_smallest_k(dist.data_ptr(), 4, 100, 20, out.data_ptr(), 2) == 2
    assert kernel.gkg_smallest_k(dist.data_ptr(), 4, 100, 0, out.data_ptr(), 2) == 2
    assert (out == -5).all()


def test_compile_failure_warns_once_and_falls_back(monkeypatch, tmp_path):
    monkeypatch.setattr(native, "_library", None)
    monkeypatch.setattr(native, "_tried", False)
    monkeypatch.setenv("CC", str(tmp_path / "no-such-compiler"))
    monkeypatch.setenv("GKG_PYG_NATIVE_CACHE", str(tmp_path / "cache"))
    dist = torch.randn(300, 196)
    with pytest.warns(UserWarning, match="could not compile the top-k kernel smallest_k.c"):
        got = native.smallest_k(dist, 9)
    assert torch.equal(got, dist.topk(9, dim=-1, largest=False).indices)
    assert not native.native_available()  # decided once, no second warning
    assert list((tmp_path / "cache").glob("*")) == []  # no half-written library left behind


def test_disabled_by_environment(monkeypatch):
    monkeypatch.setattr(native, "_library", None)
    monkeypatch.setattr(native, "_tried", False)
    monkeypatch.setenv("GKG_PYG_NATIVE", "0")
    assert not native.native_available()


def test_builds_into_a_fresh_cache(monkeypatch, tmp_path):
    if not compiler_present():
        pytest.skip("no C compiler")
    monkeypatch.setattr(native, "_library", None)
    monkeypatch.setattr(native, "_tried", False)
    monkeypatch.setenv("GKG_PYG_NATIVE_CACHE", str(tmp_path))
    assert native.native_available()
    assert [p.suffix for p in tmp_path.iterdir()] == [".so"]


def test_not_used_while_tracing(counting):
    dist = torch.randn(300, 196)
    traced = torch.jit.trace(lambda d: native.smallest_k(d, 9), (dist,), check_trace=False)
    assert counting.calls == 0
    other = torch.randn(300, 196)
    assert torch.equal(traced(other), other.topk(9, dim=-1, largest=False).indices)


@pytest.mark.parametrize("bias", [False, True])
def test_dense_knn_same_tables_with_and_without_the_kernel(counting, monkeypatch, bias):
    """GKGNet-S stage 1 at 224 px (3,136 destinations, 196 pooled sources,
    two groups) and a dilated stage (k * dilation = 18 and 27)."""
    gen = torch.Generator().manual_seed(6)
    x_dst = torch.randn(2, 3136, 48, generator=gen)
    x_src = torch.randn(2, 196, 48, generator=gen)
    position = (torch.randn(3136, 24, generator=gen) / 5, torch.randn(196, 24, generator=gen) / 5) if bias else None
    cases = [(x_src, x_dst, 9, 1), (x_src, x_src, 9, 2), (x_src, x_src, 9, 3)]
    fast = [
        batched_group_knn(s, d, k, 2, dilation=dl, position_bias=position if d is x_dst else None)
        for s, d, k, dl in cases
    ]
    assert counting.calls > 0
    monkeypatch.setattr(native, "_library", None)
    slow = [
        batched_group_knn(s, d, k, 2, dilation=dl, position_bias=position if d is x_dst else None)
        for s, d, k, dl in cases
    ]
    for a, b in zip(fast, slow):
        assert torch.equal(a, b)
