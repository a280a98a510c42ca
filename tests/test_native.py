"""Tests of the compiled kernels (gkg_pyg.native): the top-k against torch.topk
and a stable sort (exact indices and order on random rows, ties, infinities,
NaN rows, every (k, n) boundary, threads); the dense kNN kernel against brute
force (exact on products that round alike in any order, the documented
rounding order of its distances, float32 rows within rounding, strides, tiles,
NaN fallback); the neighbour maximum against the PyTorch path; building."""

from __future__ import annotations

import ctypes
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

    def __getattr__(self, name):
        kernel = getattr(self.library, name)

        def counted(*args):
            self.calls += 1
            return kernel(*args)

        return counted


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
    [(1, 64), (2, 65), (9, 196), (9, 100), (16, 64), (16, 3137), (17, 128), (27, 196), (32, 128), (9, 785)]
    + [(9, 9), (9, 31), (9, 32), (9, 49), (17, 63), (27, 49), (32, 32), (32, 64), (32, 127)],  # short rows
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
        lambda: (torch.randn(50, 196), 9),  # too small to pay for the threads
        lambda: (torch.randn(300, 196).bfloat16(), 9),
    ],
)
def test_outside_the_kernel_runs_topk(counting, make):
    dist, k = make()
    assert torch.equal(native.smallest_k(dist, k), dist.topk(k, dim=-1, largest=False).indices)
    assert counting.calls == 0


def test_kernels_reject_unsupported_shapes_themselves(kernel):
    """The C entry points check k, n and c on their own and leave ``out`` alone."""
    dist = torch.randn(4, 100)
    out = torch.full((4, 40), -5, dtype=torch.long)
    for k in (0, 33):
        assert kernel.gkg_smallest_k(dist.data_ptr(), 4, 100, k, out.data_ptr(), 2) == 2
    assert kernel.gkg_smallest_k(dist.data_ptr(), 4, 8, 9, out.data_ptr(), 2) == 2  # k > n
    x, sq = torch.randn(2, 1, 20, 3), torch.zeros(2, 1, 20)
    strides = (ctypes.c_int64 * 3)(*x.stride()[:3])
    for n, c, k in [(20, 3, 21), (20, 3, 0), (20, 3, 33), (20, 0, 9)]:
        args = [x.data_ptr(), strides, sq.data_ptr(), x.data_ptr(), strides, sq.data_ptr(), None]
        assert kernel.gkg_knn(*args, 2, 1, 20, n, c, k, out.data_ptr(), 2) == 2
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


def test_builds_without_openmp(monkeypatch, tmp_path):
    """A compiler that cannot do OpenMP: the kernels are built without it (one
    thread per call) and give the same answers."""
    if not compiler_present():
        pytest.skip("no C compiler")
    real = " ".join(native._compiler())
    wrapper = tmp_path / "cc-without-openmp"
    wrapper.write_text(f'#!/bin/sh\nfor a in "$@"; do [ "$a" = -fopenmp ] && exit 1; done\nexec {real} "$@"\n')
    wrapper.chmod(0o755)
    monkeypatch.setattr(native, "_library", None)
    monkeypatch.setattr(native, "_tried", False)
    monkeypatch.setenv("CC", str(wrapper))
    monkeypatch.setenv("GKG_PYG_NATIVE_CACHE", str(tmp_path / "cache"))
    assert native.native_available()
    assert len(list((tmp_path / "cache").glob("*.so"))) == 1
    dist = torch.randn(300, 196)
    assert torch.equal(native.smallest_k(dist, 9), stable_smallest(dist, 9))


def test_not_used_while_tracing(counting):
    dist = torch.randn(300, 196)
    traced = torch.jit.trace(lambda d: native.smallest_k(d, 9), (dist,), check_trace=False)
    assert counting.calls == 0
    other = torch.randn(300, 196)
    assert torch.equal(traced(other), other.topk(9, dim=-1, largest=False).indices)


def knn_brute_force(dst, src, dst_sq, src_sq, bias, k):
    """Float64 distances ((p * -2 + dst_sq) + src_sq) - bias, sorted stably."""
    p = dst.double() @ src.double().transpose(-1, -2)
    dist = (p * -2 + dst_sq.double().unsqueeze(-1)) + src_sq.double().unsqueeze(-2)
    if bias is not None:
        dist = dist - bias.double()
    return stable_smallest(dist, k), dist


@pytest.mark.parametrize(
    "g,b,r,n,c,k",
    [
        (2, 3, 3136, 196, 40, 9),  # GKGNet-S stage 1 at 224 px
        (2, 2, 80, 3137, 40, 9),  # labels against patches; n one past a tile of sources
        (1, 3, 196, 196, 200, 27),  # a dilated stage 3
        (2, 4, 49, 49, 320, 27),  # stage 4: a short row (every source a candidate)
        (3, 3, 7, 300, 5, 1),  # fewer destinations than a tile
        (1, 2, 301, 33, 17, 32),  # k = 32 of 33
        (2, 8, 200, 9, 16, 9),  # every source chosen
        (2, 2, 5000, 1, 3, 1),  # one source
        (1, 1, 40, 500, 700, 9),  # panels wider than a block of the second-level cache
    ],
)
@pytest.mark.parametrize("with_bias", [False, True])
def test_knn_kernel_is_exact_where_products_round_alike(counting, g, b, r, n, c, k, with_bias):
    """Small-integer features, squared norms and bias make every product, sum
    and distance exact in float32 whatever the order of the operations, with
    many exact ties: the kernel must return the stable ranking of brute force
    exactly (tiles, pairs, strides, short rows and tails all included)."""
    gen = torch.Generator().manual_seed(r + n + c + k)
    # (B, N, G, c) memory as the model's normalised features are laid out, viewed (G, B, N, c)
    dst = torch.randint(-3, 4, (b, r, g, c), generator=gen).float().permute(2, 0, 1, 3)
    src = torch.randint(-3, 4, (b, n, g, c), generator=gen).float().permute(2, 0, 1, 3)
    dst_sq = torch.randint(0, 50, (g, b, r), generator=gen).float()
    src_sq = torch.randint(0, 50, (g, b, n), generator=gen).float()
    bias = torch.randint(-20, 20, (r, n), generator=gen).float() if with_bias else None
    got = native.knn_smallest_k(dst, src, dst_sq, src_sq, bias, k)
    assert counting.calls == 1
    expected, _ = knn_brute_force(dst, src, dst_sq, src_sq, bias, k)
    assert got.dtype == torch.long and got.shape == (g, b, r, k)
    assert torch.equal(got, expected)


@pytest.mark.parametrize("with_bias", [False, True])
def test_knn_distances_round_in_the_documented_order(counting, with_bias):
    """Exact products 0.3 + m 2^-25 (all in one binade) next to squared norms
    and a bias that are not multiples of it: the ranking depends on the order
    of the roundings, and must be that of ((p * -2 + dst_sq) + src_sq) - bias
    rounded step by step in float32 (checked to fail for p * -2 + (dst_sq + src_sq))."""
    gen = torch.Generator().manual_seed(11)
    g, b, r, n = 2, 3, 500, 196
    dst = torch.stack([torch.ones(g, b, r), torch.ones(g, b, r)], dim=-1)
    m = torch.randint(-40, 40, (g, b, n), generator=gen).float()
    src = torch.stack([torch.full((g, b, n), 0.3), m * 2.0**-25], dim=-1)
    dst_sq = 1.0 + torch.rand(g, b, r, generator=gen) * 2.0**-20
    src_sq = 1.0 + torch.rand(g, b, n, generator=gen) * 2.0**-20
    bias = torch.rand(r, n, generator=gen) * 2.0**-21 if with_bias else None
    got = native.knn_smallest_k(dst, src, dst_sq, src_sq, bias, 9)
    assert counting.calls == 1
    p = dst @ src.transpose(-1, -2)  # exact
    assert torch.equal(p, 0.3 + m.unsqueeze(-2).expand(g, b, r, n) * 2.0**-25)
    dist = p.mul(-2).add_(dst_sq.unsqueeze(-1)).add_(src_sq.unsqueeze(-2))
    if with_bias:
        dist.sub_(bias)
    assert torch.equal(got, stable_smallest(dist, 9))


def test_knn_kernel_on_float32_features_is_right_within_rounding(counting):
    """Random normalised features of GKGNet's stage 1 and 3: every chosen
    neighbour is among the k nearest up to float32 rounding (distances within
    1e-5 of brute force's, rank by rank), and rows whose float64 distances are
    separated by more than that rank exactly as brute force."""
    gen = torch.Generator().manual_seed(5)
    for g, b, r, n, c, k in [(2, 2, 3136, 196, 40, 9), (2, 2, 196, 196, 200, 18)]:
        dst = torch.nn.functional.normalize(torch.randn(g, b, r, c, generator=gen), dim=-1)
        src = torch.nn.functional.normalize(torch.randn(g, b, n, c, generator=gen), dim=-1)
        bias = torch.randn(r, n, generator=gen) / 10
        dst_sq, src_sq = (dst * dst).sum(-1), (src * src).sum(-1)
        got = native.knn_smallest_k(dst, src, dst_sq, src_sq, bias, k)
        expected, dist = knn_brute_force(dst, src, dst_sq, src_sq, bias, k)
        ranked = dist.sort(dim=-1).values
        assert (dist.gather(-1, got) - ranked[..., :k]).abs().max() < 1e-5
        separated = (ranked[..., 1 : k + 1] - ranked[..., :k]).min(-1).values > 1e-5
        assert separated.float().mean() > 0.9
        assert torch.equal(got[separated], expected[separated])
    assert counting.calls == 2


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_knn_kernel_any_thread_count(counting, threads):
    gen = torch.Generator().manual_seed(8)
    dst, src = torch.randint(-3, 4, (2, 3, 301, 8), generator=gen).float(), torch.randint(-3, 4, (2, 3, 97, 8)).float()
    sq = [torch.zeros(t.shape[:3]) for t in (dst, src)]
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        got = native.knn_smallest_k(dst, src, *sq, None, 9)
    finally:
        torch.set_num_threads(previous)
    assert torch.equal(got, knn_brute_force(dst, src, *sq, None, 9)[0])


def test_knn_kernel_declines_nan_and_the_dense_knn_falls_back(counting, monkeypatch):
    """A NaN feature: the kernel returns None, and batched_group_knn's PyTorch
    path answers (as it does with the kernels switched off)."""
    gen = torch.Generator().manual_seed(6)
    x_dst, x_src = torch.randn(2, 784, 48, generator=gen), torch.randn(2, 196, 48, generator=gen)
    x_src[1, 17, 3] = float("nan")
    got = batched_group_knn(x_src, x_dst, 9, 2)
    assert counting.calls == 2  # the kNN kernel declined, then the top-k kernel on the NaN rows
    monkeypatch.setattr(native, "_library", None)
    assert torch.equal(got, batched_group_knn(x_src, x_dst, 9, 2))


def test_dispatch_modes_see_the_products(counting):
    """Under a dispatch mode (here PyTorch's FLOP counter) the kernels step
    aside, so that the mode sees, and counts, the kNN's matrix products."""
    from torch.utils.flop_counter import FlopCounterMode

    x_dst, x_src = torch.randn(2, 784, 48), torch.randn(2, 196, 48)
    with FlopCounterMode(display=False) as flops:
        got = batched_group_knn(x_src, x_dst, 9, 2)
    assert counting.calls == 0
    assert flops.get_total_flops() == 2 * 2 * 784 * 196 * 48
    assert torch.equal(got[:, :, :5], batched_group_knn(x_src, x_dst[:, :5], 9, 2))


def test_knn_kernel_outside_its_domain(counting):
    """float64, k > 32 and tiny problems are left to the PyTorch path."""
    dst, src = torch.randn(1, 2, 300, 8), torch.randn(1, 2, 200, 8)
    sq = [(t * t).sum(-1) for t in (dst, src)]
    assert native.knn_smallest_k(dst.double(), src.double(), sq[0].double(), sq[1].double(), None, 9) is None
    assert native.knn_smallest_k(dst, src, *sq, None, 33) is None
    assert native.knn_smallest_k(dst[:, :, :20], src[:, :, :20], sq[0][:, :, :20], sq[1][:, :, :20], None, 9) is None
    assert counting.calls == 0


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
    assert counting.calls == 2  # forward and backward
    assert torch.equal(out, ref) and torch.equal(gs, rs) and torch.equal(gd, rd)
    assert torch.equal(out[:, 0::2], x_dst)


def test_max_relative_nan_and_bad_indices_take_the_pytorch_path(monkeypatch, counting):
    from gkg_pyg.conv import _MaxRelative

    gen = torch.Generator().manual_seed(0)
    x_src, x_dst = torch.randn(300, 64, generator=gen), torch.randn(400, 64, generator=gen)
    neighbors = torch.randint(0, 300, (2, 400, 9), generator=gen)
    x_src[17, 5] = float("nan")
    (out, gs, _), (ref, rs, _) = max_relative_both_ways(monkeypatch, x_src, x_dst, neighbors, counting)
    assert counting.calls == 2 and out.isnan().any()  # the forward kernel declined; the backward's ran
    torch.testing.assert_close(out, ref, rtol=0, atol=0, equal_nan=True)
    torch.testing.assert_close(gs, rs, rtol=0, atol=0, equal_nan=True)
    monkeypatch.setattr(native, "_library", counting)
    neighbors[1, 7, 3] = 300
    with pytest.raises((IndexError, RuntimeError), match="out of range|index"):
        _MaxRelative.apply(x_src.nan_to_num(), x_dst, neighbors)


def test_max_relative_backward_checks_its_indices(kernel):
    """The backward kernel declines a rank or source index out of range (the
    PyTorch scatter then reports it)."""
    gen = torch.Generator().manual_seed(3)
    grad_out, rank = torch.randn(400, 128, generator=gen), torch.zeros(400, 64, dtype=torch.uint8)
    neighbors = torch.randint(0, 300, (2, 400, 9), generator=gen)
    assert native.max_relative_backward(grad_out, neighbors, rank, 300) is not None
    rank[5, 7] = 9
    assert native.max_relative_backward(grad_out, neighbors, rank, 300) is None
    rank[5, 7] = 0
    neighbors[0, 399, 0] = 300
    assert native.max_relative_backward(grad_out, neighbors, rank, 300) is None


def test_max_relative_backward_leaves_other_index_dtypes_to_pytorch(monkeypatch, counting):
    """An int32 table (the PyTorch path of the forward takes one) never reaches
    the kernel, which reads int64; the gradients equal those of an int64 table."""
    from gkg_pyg.conv import _MaxRelative

    gen = torch.Generator().manual_seed(4)
    x_src, x_dst = torch.randn(300, 64, generator=gen), torch.randn(400, 64, generator=gen)
    neighbors = torch.randint(0, 300, (2, 400, 9), generator=gen)
    grads = []
    for table in (neighbors.int(), neighbors):
        xs = x_src.clone().requires_grad_(True)
        _MaxRelative.apply(xs, x_dst, table).sum().backward()
        grads.append(xs.grad)
        if table.dtype == torch.int32:
            assert counting.calls == 0  # neither the forward nor the backward kernel
    assert torch.equal(grads[0], grads[1])


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


# ---------------------------------------------------------------------------
# bn_gelu_linear_backward: the backward of the fused linear(GELU(BatchNorm(h)))
# ---------------------------------------------------------------------------
def bn_gelu_linear_float64(grad_out, h, mean, invstd, bn_weight, bn_bias, weight, training, eps=1e-5):
    """Autograd in float64 through the plain modules' formula (batch statistics
    recomputed from h when training, so their gradient flows)."""
    h = h.double().requires_grad_(True)
    bn_weight, bn_bias, weight = (t.double().requires_grad_(True) for t in (bn_weight, bn_bias, weight))
    if training:
        mean, invstd = h.mean(0), torch.rsqrt(h.var(0, unbiased=False) + eps)
    else:
        mean, invstd = mean.double(), invstd.double()
    out = torch.nn.functional.gelu((h - mean) * invstd * bn_weight + bn_bias) @ weight.t()
    out.backward(grad_out.double())
    return h.grad, bn_weight.grad, bn_bias.grad, weight.grad


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("rows,c,c_out", [(25088, 320, 80), (1568, 1600, 400), (1000, 37, 19), (2048, 40, 8)])
def test_bn_gelu_linear_backward_is_right_within_float32_rounding(counting, training, rows, c, c_out):
    """GKGNet's widest hidden layers and channel counts that leave a vector tail
    (37, 40): every gradient within float32 rounding of float64 autograd, on
    activations from -12 to 12 (GELU's tails included)."""
    gen = torch.Generator().manual_seed(rows + c)
    h = torch.randn(rows, c, generator=gen) * 3 + torch.randn(c, generator=gen)
    bn_weight, bn_bias = torch.rand(c, generator=gen) + 0.5, torch.randn(c, generator=gen)
    weight, grad_out = torch.randn(c_out, c, generator=gen) / c**0.5, torch.randn(rows, c_out, generator=gen)
    if training:
        _, mean, invstd = torch.ops.aten.native_batch_norm(h, bn_weight, bn_bias, None, None, True, 0.1, 1e-5)
    else:
        mean, invstd = h.mean(0) + torch.randn(c, generator=gen), torch.rand(c, generator=gen) + 0.3
    got = native.bn_gelu_linear_backward(grad_out, h, mean, invstd, bn_weight, bn_bias, weight, training)
    assert got is not None and counting.calls == (3 if training else 2)
    want = bn_gelu_linear_float64(grad_out, h, mean, invstd, bn_weight, bn_bias, weight, training)
    for name, g, w in zip(("h", "bn_weight", "bn_bias", "weight"), got, want):
        assert g.dtype == torch.float32 and g.shape == w.shape
        error = (g.double() - w).abs().max() / w.abs().max()
        assert error < 2e-5, (name, error.item())


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_bn_gelu_linear_backward_any_thread_count(counting, threads):
    gen = torch.Generator().manual_seed(5)
    h, grad_out = torch.randn(3001, 48, generator=gen), torch.randn(3001, 16, generator=gen)
    bn = (torch.zeros(48), torch.ones(48), torch.ones(48), torch.zeros(48))
    weight = torch.randn(16, 48, generator=gen)
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        got = native.bn_gelu_linear_backward(grad_out, h, *bn, weight, True)
    finally:
        torch.set_num_threads(previous)
    want = bn_gelu_linear_float64(grad_out, h, *bn, weight, False)  # statistics fixed at 0 and 1: the same map
    mean, invstd = h.mean(0), torch.rsqrt(h.var(0, unbiased=False) + 1e-5)
    got_fixed = native.bn_gelu_linear_backward(grad_out, h, mean, invstd, bn[2], bn[3], weight, True)
    want_batch = bn_gelu_linear_float64(grad_out, h, mean, invstd, bn[2], bn[3], weight, True)
    for g, w in zip(got[1:], want[1:]):  # the parameter gradients do not depend on the statistics' gradient
        torch.testing.assert_close(g.double(), w, rtol=1e-4, atol=1e-4)
    for g, w in zip(got_fixed, want_batch):
        torch.testing.assert_close(g.double(), w, rtol=1e-4, atol=1e-4)


def test_bn_gelu_linear_backward_outside_the_kernel(counting):
    """float64, half precision, small inputs and tracing return None (the caller's PyTorch path)."""
    gen = torch.Generator().manual_seed(2)
    h, grad_out, weight = torch.randn(1000, 64, generator=gen), torch.randn(1000, 8), torch.randn(8, 64)
    stats = (h.mean(0), torch.ones(64), torch.ones(64), torch.zeros(64))
    assert native.bn_gelu_linear_backward(grad_out, h, *stats, weight, True) is not None
    counting.calls = 0
    as64 = [t.double() for t in (grad_out, h, *stats, weight)]
    assert native.bn_gelu_linear_backward(*as64, True) is None
    assert native.bn_gelu_linear_backward(grad_out.bfloat16(), h, *stats, weight, True) is None
    assert native.bn_gelu_linear_backward(grad_out[:100], h[:100], *stats, weight, True) is None
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False):
        assert native.bn_gelu_linear_backward(grad_out, h, *stats, weight, True) is None
    assert counting.calls == 0


@pytest.mark.parametrize("kind", ["ffn", "grapher"])
def test_fused_blocks_train_through_the_kernels(monkeypatch, counting, kind):
    """A float32 training step of GKGNet's fused blocks runs the kernels, and its
    gradients equal the PyTorch path's within float32 rounding (the forward
    values are untouched: the kernels only serve the backward pass)."""
    from gkg_pyg.models.gkgnet import FFN, GroupGraphBlock

    torch.manual_seed(0)
    block = FFN(40) if kind == "ffn" else GroupGraphBlock(40, 4)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2048, 40, generator=gen)
    r = torch.randn(2048, 80, generator=gen)
    weight = torch.randn(2048, 40, generator=gen)
    results = []
    for library in (counting, None):
        monkeypatch.setattr(native, "_library", library)
        inputs = (x.clone().requires_grad_(True), r.clone().requires_grad_(True))
        out = block(inputs[0]) if kind == "ffn" else block.update(*inputs)
        (out * weight).sum().backward()
        grads = [inputs[0].grad] + ([inputs[1].grad] if kind == "grapher" else [])
        results.append((out.detach(), grads + [p.grad.clone() for p in block.parameters() if p.grad is not None]))
        block.zero_grad()
    assert counting.calls >= 3
    assert torch.equal(results[0][0], results[1][0])
    # One scale for all: the linear maps' biases before a BatchNorm have a gradient of 0 up to rounding.
    scale = max(w.abs().max().item() for w in results[1][1])
    for g, w in zip(results[0][1], results[1][1]):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-5 * scale)
