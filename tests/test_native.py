"""Tests of the compiled top-k kernel (gkg_pyg.native) against torch.topk and a
stable sort: exact indices and order on random rows, ties, infinities, NaN
rows, every supported (k, n) boundary, threads; the fallbacks; and the dense
kNN with and without the kernel."""

from __future__ import annotations

import shutil

import pytest
import torch

import gkg_pyg.native as native
from gkg_pyg import batched_group_knn


def compiler_present() -> bool:
    try:
        return shutil.which(native._compiler()[0]) is not None
    except OSError:
        return False


@pytest.fixture
def kernel():
    """The loaded library; a machine with a C compiler must have built it (no silent skip in CI)."""
    if not compiler_present():
        pytest.skip("no C compiler: the kernel cannot be built here")
    assert native.native_available()
    return native._library


class CountingLibrary:
    """Stands in for the ctypes library and counts the kernels' calls."""

    def __init__(self, library):
        self.library, self.calls = library, 0

    def gkg_smallest_k(self, *args):
        self.calls += 1
        return self.library.gkg_smallest_k(*args)

    def gkg_max_relative(self, *args):
        self.calls += 1
        return self.library.gkg_max_relative(*args)


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
    dist = torch.randn(301, 196, generator=gen)  # 3.6 x 2^14 values: up to 3 threads
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
    assert kernel.gkg_smallest_k(dist.data_ptr(), None, None, None, 4, 100, 1, 20, out.data_ptr(), 2) == 2
    assert kernel.gkg_smallest_k(dist.data_ptr(), None, None, None, 4, 100, 1, 0, out.data_ptr(), 2) == 2
    rows = torch.zeros(4)  # distances from products need the per-column terms too
    assert kernel.gkg_smallest_k(dist.data_ptr(), rows.data_ptr(), None, None, 4, 100, 1, 9, out.data_ptr(), 2) == 2
    assert (out == -5).all()


def test_compile_failure_warns_once_and_falls_back(monkeypatch, tmp_path):
    monkeypatch.setattr(native, "_library", None)
    monkeypatch.setattr(native, "_tried", False)
    monkeypatch.setenv("CC", str(tmp_path / "no-such-compiler"))
    monkeypatch.setenv("GKG_PYG_NATIVE_CACHE", str(tmp_path / "cache"))
    dist = torch.randn(300, 196)
    with pytest.warns(UserWarning, match="could not compile the CPU kernels kernels.c"):
        got = native.smallest_k(dist, 9)
    assert torch.equal(got, dist.topk(9, dim=-1, largest=False).indices)
    assert not native.native_available()  # decided once, no second warning
    assert list((tmp_path / "cache").glob("*")) == []  # no half-written library left behind


def test_compiler_choice(monkeypatch):
    """$CC wins; without it a Python built with a compiler that is not installed
    (a conda toolchain, say) falls back to cc, gcc or clang."""
    if not compiler_present():
        pytest.skip("no C compiler")
    monkeypatch.setenv("CC", "my-cc -O1")
    assert native._compiler() == ["my-cc", "-O1"]
    monkeypatch.delenv("CC")
    monkeypatch.setattr(native.sysconfig, "get_config_var", lambda name: "x86_64-conda-linux-gnu-cc -pthread")
    assert native._compiler()[0] in ("cc", "gcc", "clang")


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
def test_knn_distances_round_like_the_pytorch_path(counting, monkeypatch, bias):
    """The kernel forms ((p * -2 + row) + col) - B itself. Entries a few units in
    the last place apart (so that another order of the sums reorders some of
    them: p * -2 + (row + col) fails here) rank exactly as the distances made
    by PyTorch's in-place operations, sorted stably."""
    gen = torch.Generator().manual_seed(11)
    g, p, r, n = 2, 3, 500, 196
    products = 0.3 + torch.randint(-40, 40, (g, p, r, n), generator=gen) * 2.0**-25
    row_add = 1.0 + torch.rand(g, p, r, 1, generator=gen) * 2.0**-20
    col_add = 1.0 + torch.rand(g, p, 1, n, generator=gen) * 2.0**-20
    b = torch.rand(r, n, generator=gen) * 2.0**-21 if bias else None
    got = native.knn_smallest_k(products.clone(), row_add, col_add, b, 9)
    assert counting.calls == 1
    dist = products.clone().mul_(-2).add_(row_add).add_(col_add)
    if bias:
        dist.sub_(b)
    assert torch.equal(got, stable_smallest(dist, 9))
    # The fallback makes the same distances in place.
    monkeypatch.setattr(native, "_library", None)
    fallback_input = products.clone()
    native.knn_smallest_k(fallback_input, row_add, col_add, b, 9)
    assert torch.equal(fallback_input, dist)


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


# ---------------------------------------------------------------------------
# max_relative: the neighbour maximum and the interleaved [x, max - x]
# ---------------------------------------------------------------------------
def max_relative_both_ways(monkeypatch, x_src, x_dst, neighbors, counting):
    """Values and gradients of GroupMaxRelConv's neighbour-table path with the
    kernel and with the PyTorch path (the kernel switched off)."""
    from gkg_pyg.conv import _MaxRelative

    results = []
    for library in (counting, None):
        monkeypatch.setattr(native, "_library", library)
        xs, xd = x_src.clone().requires_grad_(True), x_dst.clone().requires_grad_(True)
        out = _MaxRelative.apply(xs, xd, neighbors)
        weight = torch.randn(out.shape, generator=torch.Generator().manual_seed(9))
        (out * weight).sum().backward()
        results.append((out.detach(), xs.grad, xd.grad))
    return results


@pytest.mark.parametrize(
    "n_dst,n_src,c,g,k",
    [
        (25088, 1568, 80, 2, 9),
        (6272, 1568, 160, 2, 9),
        (1568, 1568, 400, 2, 18),
        (392, 392, 640, 4, 27),
        (700, 50, 36, 3, 1),
    ],
)
def test_max_relative_equals_the_pytorch_path(monkeypatch, counting, n_dst, n_src, c, g, k):
    """GKGNet's stage shapes (and a group width that is no multiple of 8, k = 1):
    bit-identical values and gradients, with tied maxima (features rounded to
    a few values) so that the rank of the first maximal neighbour matters."""
    gen = torch.Generator().manual_seed(n_dst + k)
    x_src = torch.randint(-3, 4, (n_src, c), generator=gen).float() / 2
    x_dst = torch.randn(n_dst, c, generator=gen)
    neighbors = torch.randint(0, n_src, (g, n_dst, k), generator=gen)
    (out, gs, gd), (ref, rs, rd) = max_relative_both_ways(monkeypatch, x_src, x_dst, neighbors, counting)
    assert counting.calls == 1
    assert torch.equal(out, ref) and torch.equal(gs, rs) and torch.equal(gd, rd)
    assert torch.equal(out[:, 0::2], x_dst)


def test_max_relative_nan_and_bad_indices_take_the_pytorch_path(monkeypatch, counting):
    from gkg_pyg.conv import _MaxRelative

    gen = torch.Generator().manual_seed(0)
    x_src, x_dst = torch.randn(300, 64, generator=gen), torch.randn(400, 64, generator=gen)
    neighbors = torch.randint(0, 300, (2, 400, 9), generator=gen)
    x_src[17, 5] = float("nan")
    (out, gs, _), (ref, rs, _) = max_relative_both_ways(monkeypatch, x_src, x_dst, neighbors, counting)
    assert counting.calls == 1 and out.isnan().any()
    torch.testing.assert_close(out, ref, rtol=0, atol=0, equal_nan=True)
    torch.testing.assert_close(gs, rs, rtol=0, atol=0, equal_nan=True)
    monkeypatch.setattr(native, "_library", counting)
    neighbors[1, 7, 3] = 300
    with pytest.raises((IndexError, RuntimeError), match="out of range|index"):
        _MaxRelative.apply(x_src.nan_to_num(), x_dst, neighbors)


def test_max_relative_outside_the_kernel(counting):
    """float64, small outputs and k > 256 with a gradient keep the PyTorch path."""
    from gkg_pyg.conv import _MaxRelative

    gen = torch.Generator().manual_seed(1)
    cases = [
        (torch.randn(300, 64, dtype=torch.float64), torch.randn(400, 64, dtype=torch.float64), 9, False),
        (torch.randn(30, 16), torch.randn(40, 16), 9, False),
        (torch.randn(400, 64), torch.randn(300, 64), 300, True),
    ]
    for x_src, x_dst, k, grad in cases:
        neighbors = torch.randint(0, x_src.shape[0], (2, x_dst.shape[0], k), generator=gen)
        out = _MaxRelative.apply(x_src.requires_grad_(grad), x_dst, neighbors)
        best = x_src.detach().view(-1, 2, x_src.shape[1] // 2)[
            neighbors.permute(1, 0, 2), torch.arange(2).view(1, 2, 1)
        ]
        best = best.amax(dim=2).view(x_dst.shape[0], -1)  # brute force: (N_dst, G, k, C/G) -> max over k
        assert torch.equal(out[:, 1::2], best - x_dst)
    assert counting.calls == 0
