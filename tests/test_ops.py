"""Tests of the operator layer gkg_pyg.ops: torch.library.opcheck of every
``gkg_pyg::`` operator (float32 and float64, with and without gradients, the
model's shapes and edge cases); the compiled kernels against the PyTorch
paths inside the operators (the top-k against torch.topk and a stable sort,
the dense kNN against brute force, the neighbour maximum's values and
gradients bit for bit, the fused BatchNorm-GELU-linear backward against
float64 autograd); exact second derivatives of max_relative and a clear
error for bn_gelu_linear's; fake tensors on any device; the profiler and the
FLOP counter; building the kernels and switching them off."""

from __future__ import annotations

import ctypes
import os
import shutil
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch.library import opcheck
from torch.profiler import profile

import gkg_pyg
import gkg_pyg.ops as ops
from gkg_pyg import GroupMaxRelConv
from gkg_pyg.ops import _native
from gkg_pyg.ops.cluster import torch_cluster

# The oneDNN routing and the kernels' threading are what these tests are about (conftest.py).
pytestmark = pytest.mark.usefixtures("two_threads")

QUICK = ("test_schema", "test_autograd_registration", "test_faketensor")  # opcheck without its compile step
DTYPES = (torch.float32, torch.float64)
FULL = QUICK + ("test_aot_dispatch_dynamic",)  # about half a second more per call: once per operator


def compiler_present() -> bool:
    try:
        return shutil.which(_native._compiler()[0]) is not None
    except OSError:
        return False


@pytest.fixture
def kernel():
    """The loaded library; a machine with a C compiler must have built it (no silent skip in CI)."""
    if not compiler_present():
        pytest.skip("no C compiler: the kernels cannot be built here")
    if os.environ.get("GKG_PYG_NATIVE") == "0":
        pytest.skip("the kernels are switched off (GKG_PYG_NATIVE=0)")
    assert ops.native_available()
    return _native._library


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
    monkeypatch.setattr(_native, "_library", counter)
    return counter


@pytest.fixture
def no_kernels(monkeypatch):
    """Switches the kernels off as ``GKG_PYG_NATIVE=0`` does (decided afresh, then cached)."""

    def off():
        monkeypatch.setenv("GKG_PYG_NATIVE", "0")
        monkeypatch.setattr(_native, "_library", None)
        monkeypatch.setattr(_native, "_tried", False)

    return off


def stable_smallest(dist: torch.Tensor, k: int) -> torch.Tensor:
    """Brute force: a stable ascending sort keeps equal values in index order."""
    return torch.sort(dist, dim=-1, stable=True).indices[..., :k]


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ---------------------------------------------------------------------------
# opcheck: schema, fake implementation, autograd registration (and, for one
# case per operator and dtype, the AOT-autograd compile with dynamic shapes)
# ---------------------------------------------------------------------------
def max_relative_inputs(n_src, n_dst, c, g, k, dtype, grad, seed=0, strided=False):
    g_ = gen(seed)
    width = 2 * c if strided else c
    x_src = torch.randn(n_src, width, generator=g_, dtype=dtype)[:, :: 2 if strided else 1]
    x_dst = torch.randn(n_dst, width, generator=g_, dtype=dtype)[:, :: 2 if strided else 1]
    neighbors = torch.randint(0, max(1, n_src), (g, n_dst, k), generator=g_)
    return x_src.requires_grad_(grad), x_dst.requires_grad_(grad), neighbors


MAX_RELATIVE_CASES = {  # n_src, n_dst, c, g, k, strided
    "stage1": (392, 6272, 80, 2, 9, False),  # GKGNet-S stage 1 at 224 px, batch 2
    "labels": (6272, 160, 80, 2, 9, False),  # 80 labels x 2 images against the stage's patches
    "k1": (30, 20, 8, 2, 1, False),
    "single": (1, 1, 4, 2, 1, False),
    "no_destinations": (5, 0, 8, 2, 3, False),
    "strided": (30, 20, 8, 4, 3, True),
}


@pytest.mark.parametrize(
    "case,dtype,grad",
    [("stage1", torch.float32, True)]  # one model-sized check
    + [(case, dtype, grad) for case in list(MAX_RELATIVE_CASES)[1:] for dtype in DTYPES for grad in (False, True)],
)
def test_opcheck_max_relative(case, dtype, grad):
    n_src, n_dst, c, g, k, strided = MAX_RELATIVE_CASES[case]
    x_src, x_dst, neighbors = max_relative_inputs(n_src, n_dst, c, g, k, dtype, grad, strided=strided)
    utils = FULL if case == "k1" and grad and dtype == torch.float64 else QUICK
    opcheck(torch.ops.gkg_pyg.max_relative.default, (x_src, x_dst, neighbors, grad), test_utils=utils)
    _, rank = torch.ops.gkg_pyg.max_relative.default(x_src.detach(), x_dst.detach(), neighbors, True)
    grad_out = torch.randn(n_dst, 2 * c, dtype=dtype, generator=gen(1)).requires_grad_(grad)
    opcheck(torch.ops.gkg_pyg.max_relative_backward.default, (grad_out, neighbors, rank, n_src), test_utils=utils)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_opcheck_smallest_k_and_knn(dtype):
    g_ = gen(2)
    cases = [
        (torch.randn(300 if dtype == torch.float32 else 30, 196, generator=g_, dtype=dtype), 9),  # the kernel's size
        (torch.randn(40, 30, generator=g_, dtype=dtype), 1),
        (torch.randn(1, 1, generator=g_, dtype=dtype), 1),  # a single node
        (torch.randn(0, 12, dtype=dtype), 3),  # no rows
        (torch.randn(2, 40, 60, generator=g_, dtype=dtype)[..., ::2], 5),  # not contiguous
    ]
    for i, (dist, k) in enumerate(cases):
        full = i == 1 and dtype == torch.float64
        opcheck(torch.ops.gkg_pyg.smallest_k.default, (dist, k), test_utils=FULL if full else QUICK)

    def knn_args(g, b, r, n, c, k, bias, strided=False):
        dst = torch.randn(b, r, g, c, generator=g_, dtype=dtype).permute(2, 0, 1, 3)  # the model's layout
        src = torch.randn(g, b, n, 2 * c if strided else c, generator=g_, dtype=dtype)[..., :: 2 if strided else 1]
        b_ = torch.randn(r, n, generator=g_, dtype=dtype) if bias else None
        return dst, src, (dst * dst).sum(-1), (src * src).sum(-1), b_, k

    full = FULL if dtype == torch.float64 else QUICK
    opcheck(torch.ops.gkg_pyg.knn_smallest_k.default, knn_args(2, 3, 10, 12, 4, 1, True), test_utils=full)
    model_sized = [
        knn_args(2, 2, 3136, 196, 40, 9, True),  # stage 1 at 224 px, batch 2, with the position term
        knn_args(2, 2, 80, 3136, 40, 9, False),  # labels against the stage's patches
    ]
    edge_cases = [
        knn_args(1, 1, 1, 1, 3, 1, False),  # a single node
        knn_args(2, 2, 0, 7, 4, 3, True),  # no destinations
        knn_args(2, 2, 9, 15, 6, 4, True, strided=True),
    ]
    for args in (model_sized if dtype == torch.float32 else []) + edge_cases:
        opcheck(torch.ops.gkg_pyg.knn_smallest_k.default, args, test_utils=QUICK)


def bn_gelu_linear_args(n, c, c_out, dtype, grad, training, seed=3, strided=False):
    g_ = gen(seed)
    h = torch.randn(n, 2 * c if strided else c, generator=g_, dtype=dtype)[:, :: 2 if strided else 1] * 2 + 0.5
    params = [
        torch.rand(c, generator=g_, dtype=dtype) + 0.5,
        torch.randn(c, generator=g_, dtype=dtype),
        torch.randn(c_out, c, generator=g_, dtype=dtype) / c**0.5,
        torch.randn(c_out, generator=g_, dtype=dtype),
    ]
    running = [torch.randn(c, generator=g_, dtype=dtype), torch.rand(c, generator=g_, dtype=dtype) + 0.5]
    tensors = [t.requires_grad_(grad) for t in [h] + params]
    return (*tensors, *running, training, 0.1, 1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("training", [True, False])
def test_opcheck_bn_gelu_linear(dtype, training):
    cases = [
        dict(n=64, c=16, c_out=8),
        dict(n=160, c=320, c_out=80),  # the label path's FFN after stage 1: 80 labels x 2 images
        dict(n=1, c=5, c_out=3),  # a single node
        dict(n=0, c=5, c_out=3),  # no nodes
        dict(n=40, c=12, c_out=6, strided=True),
    ]
    for i, case in enumerate(cases):
        for grad in (False, True):
            args = bn_gelu_linear_args(dtype=dtype, grad=grad, training=training, **case)
            if i == 1:  # GroupMaxRelConv's update: no linear map
                args = args[:3] + (None, None) + args[5:]
            if case["n"] < 2 and training:
                continue  # batch statistics of fewer than two rows: undefined variance
            full = i == 0 and grad and dtype == torch.float64 and training
            opcheck(torch.ops.gkg_pyg.bn_gelu_linear.default, args, test_utils=FULL if full else QUICK)
            if case["n"] == 0:
                continue
            h, bn_weight, bn_bias, weight, bias, mean, var = args[:7]
            with torch.no_grad():
                out, a, b, _, _ = torch.ops.gkg_pyg.bn_gelu_linear.default(*args)
            grad_out = torch.randn(out.shape, generator=gen(4), dtype=dtype)
            backward_args = (grad_out, h, a, b, bn_weight, bn_bias, weight, training, 1e-5)
            opcheck(torch.ops.gkg_pyg.bn_gelu_linear_backward.default, backward_args, test_utils=QUICK)


def batch_norm_args(shape, dtype, grad, running=True, seed=5, strided=False):
    g_ = gen(seed)
    c = shape[1]
    x = torch.randn(*shape[:-1], 2 * shape[-1] if strided else shape[-1], generator=g_, dtype=dtype)
    x = (x[..., ::2] if strided else x) * 2 + 0.5
    params = [torch.rand(c, generator=g_, dtype=dtype) + 0.5, torch.randn(c, generator=g_, dtype=dtype)]
    stats = [torch.randn(c, generator=g_, dtype=dtype), torch.rand(c, generator=g_, dtype=dtype) + 0.5]
    return (x.requires_grad_(grad), *[t.requires_grad_(grad) for t in params], *(stats if running else [None] * 2))


@pytest.mark.parametrize("dtype", DTYPES)
def test_opcheck_batch_norm(dtype):
    """``gkg_pyg::batch_norm`` (compiled code's training BatchNorm) on node
    features and images, with and without running statistics, and its backward."""
    cases = [dict(shape=(64, 16)), dict(shape=(2, 3, 5, 4)), dict(shape=(9, 6), running=False)]
    cases.append(dict(shape=(12, 5), strided=True))
    for i, case in enumerate(cases):
        for grad in (False, True):
            args = batch_norm_args(dtype=dtype, grad=grad, **case)
            full = i == 0 and grad and dtype == torch.float64
            opcheck(torch.ops.gkg_pyg.batch_norm.default, args + (0.1, 1e-5), test_utils=FULL if full else QUICK)
        x, weight = args[0].detach(), args[1].detach()
        _, mean, invstd, _, _ = torch.ops.gkg_pyg.batch_norm.default(*args, 0.1, 1e-5)
        grad_out = torch.randn(x.shape, generator=gen(6), dtype=dtype)
        opcheck(torch.ops.gkg_pyg.batch_norm_backward.default, (grad_out, x, weight, mean, invstd, 1e-5))


def test_batch_norm_operator_is_atens_batch_norm_to_the_second_derivative():
    """Values, updated running statistics and gradients equal ``F.batch_norm``'s
    bit for bit (the same ATen kernels); second derivatives (``create_graph``)
    are ``F.batch_norm``'s, and the backward operator alone has none (a clear error)."""
    x, weight, bias, mean, var = batch_norm_args((2, 3, 5, 4), torch.float64, True)
    out, _, _, new_mean, new_var = torch.ops.gkg_pyg.batch_norm(x, weight, bias, mean, var, 0.1, 1e-5)
    plain_mean, plain_var = mean.clone(), var.clone()
    plain = F.batch_norm(x, plain_mean, plain_var, weight, bias, True, 0.1, 1e-5)
    assert torch.equal(out, plain) and torch.equal(new_mean, plain_mean) and torch.equal(new_var, plain_var)
    first = [torch.autograd.grad((y**3).sum(), (x, weight, bias), retain_graph=True) for y in (out, plain)]
    assert all(torch.equal(a, b) for a, b in zip(*first))
    seconds = []
    for y in (out, plain):
        grads = torch.autograd.grad((y**3).sum(), (x, weight, bias), create_graph=True)
        seconds.append(torch.autograd.grad(sum((g**2).sum() for g in grads), (x, weight, bias)))
    for got, want in zip(*seconds):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    x_, weight_ = x.detach(), weight.detach()
    _, m, s, _, _ = torch.ops.gkg_pyg.batch_norm(x_, weight_, bias.detach(), None, None, 0.0, 1e-5)
    grad_out = torch.randn(x_.shape, dtype=torch.float64, requires_grad=True)
    grad_x, _, _ = torch.ops.gkg_pyg.batch_norm_backward(grad_out, x_, weight_, m, s, 1e-5)
    with pytest.raises(RuntimeError, match="no derivative of its own"):
        grad_x.sum().backward()


def test_fake_implementations_on_any_device():
    """Under FakeTensorMode every operator gives its outputs' shapes, dtypes and
    device for CUDA tensors too (no GPU needed)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        cuda = dict(device="cuda")
        dist = torch.empty(5, 30, **cuda)
        assert_meta(ops.smallest_k(dist, 4), (5, 4), torch.long, "cuda")
        dst, src = torch.empty(2, 3, 7, 4, **cuda), torch.empty(2, 3, 11, 4, **cuda)
        table = ops.knn_smallest_k(dst, src, torch.empty(2, 3, 7, **cuda), torch.empty(2, 3, 11, **cuda), None, 5)
        assert_meta(table, (2, 3, 7, 5), torch.long, "cuda")
        x_src = torch.empty(20, 8, dtype=torch.float16, requires_grad=True, **cuda)
        x_dst = torch.empty(9, 8, dtype=torch.float16, **cuda)
        out, rank = torch.ops.gkg_pyg.max_relative.default(
            x_src, x_dst, torch.empty(2, 9, 3, dtype=torch.long, **cuda), True
        )
        assert_meta(out, (9, 16), torch.float16, "cuda")
        assert_meta(rank, (9, 8), torch.uint8, "cuda")
        h = torch.empty(12, 6, dtype=torch.float16, **cuda)
        params = [torch.empty(6, **cuda), torch.empty(6, **cuda), torch.empty(4, 6, dtype=torch.float16, **cuda)]
        running = [torch.empty(6, **cuda), torch.empty(6, **cuda)]
        op = torch.ops.gkg_pyg.bn_gelu_linear.default
        out, mean, invstd, new_mean, _ = op(h, *params, None, *running, True, 0.1, 1e-5)
        assert_meta(out, (12, 4), torch.float16, "cuda")
        assert_meta(mean, (6,), torch.float32, "cuda")  # ATen's CUDA statistics of half-precision input
        assert_meta(new_mean, (6,), torch.float32, "cuda")


def assert_meta(t, shape, dtype, device):
    assert tuple(t.shape) == shape and t.dtype == dtype and t.device.type == device


# ---------------------------------------------------------------------------
# smallest_k: the kernel against torch.topk
# ---------------------------------------------------------------------------
@pytest.mark.parametrize(
    "k,n", [(1, 64), (9, 196), (16, 3137), (17, 128), (27, 196), (32, 32), (9, 9), (9, 31), (32, 127)]
)
def test_smallest_k_matches_topk(counting, k, n):
    g_ = gen(k * 1000 + n)
    dist = torch.randn(_native.MIN_ELEMENTS // n + 3, n, generator=g_)
    expected = dist.topk(k, dim=-1, largest=False)
    got = ops.smallest_k(dist, k)
    assert counting.calls == 1
    assert got.dtype == torch.long and torch.equal(got, expected.indices)


def test_smallest_k_ties_infinities_and_nan(counting):
    """Ties by the lower index (a stable sort); infinities and signed zeros; a row
    holding a NaN sends the whole call to torch.topk (the kernel declines)."""
    g_ = gen(1)
    dist = torch.randint(0, 7, (512, 196), generator=g_).float()
    dist[0] = 0.0
    dist[1, ::2] = float("-inf")
    dist[2, 100:] = float("inf")
    dist[3, :50] = -0.0
    assert torch.equal(ops.smallest_k(dist, 27), stable_smallest(dist, 27))
    dist[7, 3] = float("nan")
    assert torch.equal(ops.smallest_k(dist, 9), dist.topk(9, dim=-1, largest=False).indices)
    assert counting.calls == 2


@pytest.mark.parametrize(
    "make",
    [
        lambda: (torch.randn(300, 196, dtype=torch.float64), 9),
        lambda: (torch.randn(300, 196), 33),  # k beyond the kernel's buckets
        lambda: (torch.randn(50, 196), 9),  # too small to pay for the threads
    ],
)
def test_smallest_k_outside_the_kernel_runs_topk(counting, make):
    dist, k = make()
    assert torch.equal(ops.smallest_k(dist, k), dist.topk(k, dim=-1, largest=False).indices)
    assert counting.calls == 0


@pytest.mark.parametrize("threads", [1, 3])
def test_kernels_on_any_thread_count(counting, threads):
    dist = torch.randn(301, 196, generator=gen(4))
    x_src, x_dst, neighbors = max_relative_inputs(300, 600, 64, 2, 9, torch.float32, False)
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        got = ops.smallest_k(dist, 9)
        out = ops.max_relative(x_src, x_dst, neighbors)
    finally:
        torch.set_num_threads(previous)
    assert counting.calls == 2
    assert torch.equal(got, dist.topk(9, dim=-1, largest=False).indices)
    best = x_src.view(300, 2, 32)[neighbors.permute(1, 0, 2), torch.arange(2).view(1, 2, 1)].amax(2).reshape(600, 64)
    assert torch.equal(out[:, 1::2], best - x_dst)


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


def test_user_mistakes_raise_clear_errors():
    with pytest.raises(ValueError, match=r"0 <= k <= n .* k=5 for shape \(3, 4\)"):
        ops.smallest_k(torch.randn(3, 4), 5)
    dst, src = torch.randn(2, 1, 5, 3), torch.randn(2, 1, 4, 3)
    with pytest.raises(ValueError, match=r"k=5 nearest sources requested, but there are 4"):
        ops.knn_smallest_k(dst, src, torch.zeros(2, 1, 5), torch.zeros(2, 1, 4), None, 5)
    with pytest.raises(ValueError, match=r"bias of shape \(5, 4\), got \(4, 5\)"):
        ops.knn_smallest_k(dst, src, torch.zeros(2, 1, 5), torch.zeros(2, 1, 4), torch.zeros(4, 5), 2)
    x = torch.randn(6, 4)
    with pytest.raises(ValueError, match=r"neighbors \(G, N_dst=6, k\) .* got \(3, 6, 2\)"):
        ops.max_relative(x, x, torch.zeros(3, 6, 2, dtype=torch.long))
    with pytest.raises(ValueError, match=r"int64 or int32 neighbour indices, got torch.float32"):
        ops.max_relative(x, x, torch.zeros(2, 6, 2))
    with pytest.raises(ValueError, match=r"one dtype, got torch.float32 and torch.float64"):
        ops.max_relative(x, x.double(), torch.zeros(2, 6, 2, dtype=torch.long))
    args = bn_gelu_linear_args(10, 4, 3, torch.float32, False, True)
    with pytest.raises(ValueError, match=r"weight \(C_out, C\) or None; got h \(10, 4\), .* weight \(3, 5\)"):
        ops.bn_gelu_linear(*args[:3], torch.zeros(3, 5), *args[4:])
    with pytest.raises(ValueError, match="a bias without a weight"):
        ops.bn_gelu_linear(*args[:3], None, *args[4:])
    with pytest.raises(ValueError, match="affine BatchNorm"):
        ops.bn_gelu_linear(args[0], None, *args[2:])


# ---------------------------------------------------------------------------
# knn_smallest_k: the kernel against brute force and the operator's PyTorch path
# ---------------------------------------------------------------------------
def knn_brute_force(dst, src, dst_sq, src_sq, bias, k):
    """Float64 distances ((p * -2 + dst_sq) + src_sq) - bias, sorted stably."""
    p = dst.double() @ src.double().transpose(-1, -2)
    dist = (p * -2 + dst_sq.double().unsqueeze(-1)) + src_sq.double().unsqueeze(-2)
    if bias is not None:
        dist = dist - bias.double()
    return stable_smallest(dist, k), dist


def integer_knn_inputs(g, b, r, n, c, with_bias, seed):
    """Small-integer features, squared norms and bias: every product, sum and
    distance is exact in float32 whatever the order of the operations, with many
    exact ties, so that the kernel and the PyTorch path must agree exactly."""
    g_ = gen(seed)
    dst = torch.randint(-3, 4, (b, r, g, c), generator=g_).float().permute(2, 0, 1, 3)
    src = torch.randint(-3, 4, (b, n, g, c), generator=g_).float().permute(2, 0, 1, 3)
    dst_sq = torch.randint(0, 50, (g, b, r), generator=g_).float()
    src_sq = torch.randint(0, 50, (g, b, n), generator=g_).float()
    bias = torch.randint(-20, 20, (r, n), generator=g_).float() if with_bias else None
    return dst, src, dst_sq, src_sq, bias


@pytest.mark.parametrize(
    "g,b,r,n,c,k,with_bias",
    [
        (2, 2, 3136, 196, 40, 9, True),  # GKGNet-S stage 1 at 224 px
        (2, 2, 80, 3137, 40, 9, False),  # labels against patches; n one past a tile of sources
        (2, 4, 49, 49, 320, 27, True),  # stage 4: a short row (every source a candidate)
        (1, 2, 301, 33, 17, 32, False),  # k = 32 of 33
        (2, 2, 5000, 1, 3, 1, True),  # one source
    ],
)
def test_knn_is_exact_where_products_round_alike(counting, no_kernels, g, b, r, n, c, k, with_bias):
    """The kernel returns the stable ranking of brute force exactly; the operator
    with the kernels switched off (the blocked PyTorch path, torch.topk, which
    orders exact ties as it likes) the same distances rank by rank."""
    args = integer_knn_inputs(g, b, r, n, c, with_bias, seed=r + n + c + k)
    got = ops.knn_smallest_k(*args, k)
    assert counting.calls == 1
    expected, dist = knn_brute_force(*args, k)
    assert got.dtype == torch.long and got.shape == (g, b, r, k)
    assert torch.equal(got, expected)
    no_kernels()
    assert torch.equal(dist.gather(-1, ops.knn_smallest_k(*args, k)), dist.gather(-1, expected))


@pytest.mark.parametrize("with_bias", [False, True])
def test_knn_distances_round_in_the_documented_order(counting, with_bias):
    """Exact products 0.3 + m 2^-25 next to squared norms and a bias that are not
    multiples of it: the ranking depends on the order of the roundings, and must
    be that of ((p * -2 + dst_sq) + src_sq) - bias rounded step by step."""
    g_ = gen(11)
    g, b, r, n = 2, 3, 500, 196
    dst = torch.stack([torch.ones(g, b, r), torch.ones(g, b, r)], dim=-1)
    m = torch.randint(-40, 40, (g, b, n), generator=g_).float()
    src = torch.stack([torch.full((g, b, n), 0.3), m * 2.0**-25], dim=-1)
    dst_sq = 1.0 + torch.rand(g, b, r, generator=g_) * 2.0**-20
    src_sq = 1.0 + torch.rand(g, b, n, generator=g_) * 2.0**-20
    bias = torch.rand(r, n, generator=g_) * 2.0**-21 if with_bias else None
    got = ops.knn_smallest_k(dst, src, dst_sq, src_sq, bias, 9)
    assert counting.calls == 1
    dist = (dst @ src.transpose(-1, -2)).mul(-2).add_(dst_sq.unsqueeze(-1)).add_(src_sq.unsqueeze(-2))
    if with_bias:
        dist.sub_(bias)
    assert torch.equal(got, stable_smallest(dist, 9))


def test_knn_on_float32_features_is_right_within_rounding(counting):
    """Random normalised features of stage 1: every chosen neighbour is among the
    k nearest up to float32 rounding, and well-separated rows rank exactly as brute force."""
    g_ = gen(5)
    g, b, r, n, c, k = 2, 2, 3136, 196, 40, 9
    dst = F.normalize(torch.randn(g, b, r, c, generator=g_), dim=-1)
    src = F.normalize(torch.randn(g, b, n, c, generator=g_), dim=-1)
    bias = torch.randn(r, n, generator=g_) / 10
    dst_sq, src_sq = (dst * dst).sum(-1), (src * src).sum(-1)
    got = ops.knn_smallest_k(dst, src, dst_sq, src_sq, bias, k)
    expected, dist = knn_brute_force(dst, src, dst_sq, src_sq, bias, k)
    ranked = dist.sort(dim=-1).values
    assert (dist.gather(-1, got) - ranked[..., :k]).abs().max() < 1e-5
    separated = (ranked[..., 1 : k + 1] - ranked[..., :k]).min(-1).values > 1e-5
    assert separated.float().mean() > 0.9
    assert torch.equal(got[separated], expected[separated])
    assert counting.calls == 1


def test_knn_nan_falls_back_inside_the_operator(counting, no_kernels):
    """A NaN feature: the kernel declines and the operator answers with its
    PyTorch path (the same table as with the kernels switched off)."""
    dst, src, dst_sq, src_sq, _ = integer_knn_inputs(2, 2, 784, 196, 24, False, seed=6)
    src[1, 1, 17, 3] = float("nan")
    src_sq = (src * src).sum(-1)
    got = ops.knn_smallest_k(dst, src, dst_sq, src_sq, None, 9)
    assert counting.calls == 2  # the kNN kernel declined, then the top-k kernel on the NaN rows declined
    no_kernels()
    assert torch.equal(got, ops.knn_smallest_k(dst, src, dst_sq, src_sq, None, 9))


# ---------------------------------------------------------------------------
# max_relative: the kernel against the PyTorch path; second derivatives
# ---------------------------------------------------------------------------
def max_relative_values_and_grads(x_src, x_dst, neighbors):
    xs, xd = x_src.clone().requires_grad_(True), x_dst.clone().requires_grad_(True)
    out = ops.max_relative(xs, xd, neighbors)
    (out * torch.randn(out.shape, generator=gen(9), dtype=out.dtype)).sum().backward()
    return out.detach(), xs.grad, xd.grad


@pytest.mark.parametrize(
    "n_dst,n_src,c,g,k",
    [(6272, 392, 80, 2, 9), (200, 100, 160, 4, 27), (700, 50, 36, 3, 1)],
)
def test_max_relative_kernel_equals_the_pytorch_path(counting, no_kernels, n_dst, n_src, c, g, k):
    """GKGNet's stage-1 shape, four groups of 40 with k = 27, and a group width that
    is no multiple of 8 with k = 1:
    bit-identical values and gradients, with tied maxima (features rounded to a
    few values) so that the rank of the first maximal neighbour matters."""
    g_ = gen(n_dst + k)
    x_src = torch.randint(-3, 4, (n_src, c), generator=g_).float() / 2
    x_dst = torch.randn(n_dst, c, generator=g_)
    neighbors = torch.randint(0, n_src, (g, n_dst, k), generator=g_)
    out, gs, gd = max_relative_values_and_grads(x_src, x_dst, neighbors)
    assert counting.calls == 2  # forward and backward
    no_kernels()
    ref, rs, rd = max_relative_values_and_grads(x_src, x_dst, neighbors)
    assert torch.equal(out, ref) and torch.equal(gs, rs) and torch.equal(gd, rd)
    assert torch.equal(out[:, 0::2], x_dst)


def test_max_relative_nan_and_bad_indices(counting):
    """A NaN source: the forward kernel declines and the PyTorch path propagates it;
    an index out of range: PyTorch's index error, never a silent value; the backward
    kernel declines a rank out of range (the PyTorch scatter then reports it)."""
    x_src, x_dst, neighbors = max_relative_inputs(300, 400, 64, 2, 9, torch.float32, False)
    x_src[17, 5] = float("nan")
    out = ops.max_relative(x_src, x_dst, neighbors)
    assert out.isnan().any() and counting.calls == 1
    neighbors[1, 7, 3] = 300
    with pytest.raises((IndexError, RuntimeError), match="out of range|index"):
        ops.max_relative(x_src.nan_to_num(), x_dst, neighbors)
    neighbors[1, 7, 3] = 0
    grad_out, rank = torch.randn(400, 128), torch.zeros(400, 64, dtype=torch.uint8)
    rank[5, 7] = 9
    with pytest.raises(RuntimeError, match="index"):
        torch.ops.gkg_pyg.max_relative_backward.default(grad_out, neighbors, rank, 300)


def test_max_relative_int32_and_long_rank_tables(counting):
    """An int32 table and k > 256 (int64 ranks) take the PyTorch path with the
    gradients of an int64 table."""
    x_src, x_dst, neighbors = max_relative_inputs(300, 400, 64, 2, 9, torch.float32, False)
    grads = [max_relative_values_and_grads(x_src, x_dst, t)[1] for t in (neighbors.int(), neighbors)]
    assert torch.equal(grads[0], grads[1])
    x_src, x_dst, neighbors = max_relative_inputs(400, 300, 64, 2, 300, torch.float32, False)
    _, rank = torch.ops.gkg_pyg.max_relative.default(x_src, x_dst, neighbors, True)
    assert rank.dtype == torch.long and rank.shape == (300, 64)
    _, gs, _ = max_relative_values_and_grads(x_src, x_dst, neighbors)
    x = x_src.clone().requires_grad_(True)
    best = x.view(400, 2, 32)[neighbors.permute(1, 0, 2), torch.arange(2).view(1, 2, 1)].amax(2).reshape(300, 64)
    (torch.stack([x_dst, best - x_dst], -1).view(300, 128) * torch.randn(300, 128, generator=gen(9))).sum().backward()
    # Float32 sums of up to 300 terms, accumulated in another (threaded) order: relative to the largest.
    torch.testing.assert_close(gs, x.grad, rtol=1e-5, atol=1e-5 * x.grad.abs().max().item())


def test_max_relative_without_rank_refuses_a_source_gradient():
    x_src, x_dst, neighbors = max_relative_inputs(30, 20, 8, 2, 3, torch.float32, True)
    out, _ = torch.ops.gkg_pyg.max_relative.default(x_src, x_dst, neighbors, False)
    with pytest.raises(RuntimeError, match="with_rank=False"):
        out.sum().backward()


def second_derivative(conv, x, **graph):
    x = x.clone().requires_grad_(True)
    out = conv(x, **graph)
    (grad,) = torch.autograd.grad((out**2).sum(), x, create_graph=True)
    (second,) = torch.autograd.grad((grad**2).sum(), x)
    return grad.detach(), second


def test_second_derivatives_of_the_conv_are_exact(counting):
    """The issue's example: ``grad((grad((out**2).sum(), x, create_graph=True)[0]**2).sum(), x)``
    through GroupMaxRelConv(64, 64, groups=2) on a regular table of 3000 nodes,
    k = 9, float32: the kernel path equals the plain edge_index path (PyG's max
    aggregation) to float32 rounding and float64, where the winner scatter's
    derivative had been dropped."""
    torch.manual_seed(0)
    conv = GroupMaxRelConv(64, 64, groups=2)
    n, k = 3000, 9
    x = torch.randn(n, 64, generator=gen(10))
    neighbors = torch.randint(0, n, (2, n, k), generator=gen(11))
    edges = torch.stack([neighbors.reshape(2, -1), torch.arange(n).repeat_interleave(k).expand(2, -1)], dim=1)
    fast_grad, fast = second_derivative(conv, x, neighbors=neighbors)
    assert counting.calls >= 3  # forward, backward, and the backward's own backward ran through the kernel ops
    plain_grad, plain = second_derivative(conv, x, edge_index=edges)
    exact_grad, exact = second_derivative(conv.double(), x.double(), neighbors=neighbors)
    for got in (fast, plain):
        torch.testing.assert_close(got.double(), exact, rtol=1e-4, atol=1e-4 * exact.abs().max().item())
    torch.testing.assert_close(fast_grad, plain_grad, rtol=1e-4, atol=1e-4 * plain_grad.abs().max().item())
    assert (fast - plain).norm() < 1e-4 * plain.norm()


def test_max_relative_double_backward_gradcheck():
    """gradgradcheck in float64 on tie-free features: the backward operator's own
    formula (a gather at the winners) is the exact derivative."""
    x_src, x_dst, neighbors = max_relative_inputs(12, 9, 4, 2, 3, torch.float64, True, seed=12)
    assert torch.autograd.gradcheck(ops.max_relative, (x_src, x_dst, neighbors))
    assert torch.autograd.gradgradcheck(ops.max_relative, (x_src, x_dst, neighbors))


# ---------------------------------------------------------------------------
# bn_gelu_linear
# ---------------------------------------------------------------------------
def modules_float64(h, bn_weight, bn_bias, weight, bias, running_mean, running_var, training):
    leaves = [t.detach().double().requires_grad_(True) for t in (h, bn_weight, bn_bias, weight, bias) if t is not None]
    rm, rv = running_mean.double().clone(), running_var.double().clone()
    out = F.gelu(F.batch_norm(leaves[0], rm, rv, leaves[1], leaves[2], training, 0.1, 1e-5))
    if weight is not None:
        out = F.linear(out, *leaves[3:])
    return out, leaves, (rm, rv)


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("rows,c,c_out", [(6272, 320, 80), (1000, 37, 19), (3136, 160, None)])
def test_bn_gelu_linear_matches_the_modules(counting, no_kernels, training, rows, c, c_out):
    """Values equal F.linear(F.gelu(F.batch_norm(...))) (the same ATen kernels;
    ``c_out=None``: without the linear map, F.gelu(F.batch_norm(...))), the
    running statistics are updated alike, and every gradient (the compiled passes,
    then the PyTorch path) is within float32 rounding of float64 autograd."""
    args = bn_gelu_linear_args(rows, c, c_out or 1, torch.float32, True, training, seed=rows + c)
    h, bn_weight, bn_bias, weight, bias, running_mean, running_var = args[:7]
    names = ("h", "bn_weight", "bn_bias", "weight", "bias")
    if c_out is None:
        weight = bias = None
        names = names[:3]
    grad_out = torch.randn(rows, c_out or c, generator=gen(7))
    want, leaves, want_running = modules_float64(h, bn_weight, bn_bias, weight, bias, *args[5:8])
    want.backward(grad_out.double())
    plain_running = running_mean.clone(), running_var.clone()
    plain = F.gelu(F.batch_norm(h, *plain_running, bn_weight, bn_bias, training, 0.1, 1e-5))
    if c_out is not None:
        plain = ops.grouped_linear(plain, weight, bias, 1)  # the map the operator runs (oneDNN or MKL)
    for kernels in (True, False):
        if not kernels:
            no_kernels()
        running = running_mean.clone(), running_var.clone()
        params = [t.detach().clone().requires_grad_(True) for t in (h, bn_weight, bn_bias)]
        maps = [t.detach().clone().requires_grad_(True) for t in (weight, bias)] if c_out else [None, None]
        out = ops.bn_gelu_linear(*params, *maps, *running, training, 0.1, 1e-5)
        assert torch.equal(out, plain.detach())
        assert all(torch.equal(a, b) for a, b in zip(running, plain_running))
        out.backward(grad_out)
        if kernels:  # gkg_bn_gelu (for the weight's gradient), gkg_bn_gelu_backward, gkg_bn_backward (batch stats)
            assert counting.calls == (c_out is not None) + 1 + training
        for name, got, leaf in zip(names, params + maps, leaves):
            error = (got.grad.double() - leaf.grad).abs().max() / leaf.grad.abs().max()
            assert got.grad.dtype == torch.float32 and error < 2e-5, (name, kernels, error.item())
    for a, b in zip(want_running, plain_running):
        torch.testing.assert_close(a.float(), b)


def test_bn_gelu_linear_under_autocast_and_leading_dimensions():
    """Under CPU autocast the linear map runs in bfloat16 as F.linear would (BatchNorm
    and GELU in h's float32), on (B, N, C) features; gradients flow in each input's dtype."""
    args = bn_gelu_linear_args(300, 16, 8, torch.float32, True, True, seed=8)
    h = args[0].detach().view(3, 100, 16).requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = ops.bn_gelu_linear(h, *args[1:])
        normalized = F.batch_norm(h.detach().view(300, 16), None, None, *args[1:3], True)
        want = F.linear(F.gelu(normalized), *args[3:5]).view(3, 100, 8)
    assert out.shape == (3, 100, 8) and out.dtype == torch.bfloat16
    torch.testing.assert_close(out, want)
    out.float().sum().backward()
    assert h.grad.dtype == torch.float32 and args[3].grad.dtype == torch.float32


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("linear", [True, False])
def test_bn_gelu_linear_higher_derivatives_are_the_modules(training, linear):
    """With create_graph the gradients are recomputed through the plain modules:
    gradgradcheck passes in float64, and a second derivative in float32 on a
    size the kernels take equals the modules' (the backward operator itself, called
    directly, has no derivative: a clear error)."""
    args = list(bn_gelu_linear_args(12, 5, 3, torch.float64, True, training))
    if not linear:
        args[3:5] = [None, None]
    running = args[5:7]

    def fused(h, bn_weight, bn_bias, *maps):
        return ops.bn_gelu_linear(h, bn_weight, bn_bias, *(maps or (None, None)), *running, training, 0.1, 1e-5)

    inputs = [t for t in args[:5] if t is not None]
    assert torch.autograd.gradgradcheck(fused, inputs)

    args32 = list(bn_gelu_linear_args(2000, 24, 8, torch.float32, True, training, seed=5))
    if not linear:
        args32[3:5] = [None, None]
    h = args32[0]
    results = []
    for plain in (False, True):
        rm, rv = args32[5].clone(), args32[6].clone()
        if plain:
            out = F.gelu(F.batch_norm(h, rm, rv, *args32[1:3], training, 0.1, 1e-5))
            out = F.linear(out, *args32[3:5]) if linear else out
        else:
            out = ops.bn_gelu_linear(*args32[:5], rm, rv, training, 0.1, 1e-5)
        (grad_h,) = torch.autograd.grad(out.square().sum(), h, create_graph=True)
        results.append(torch.autograd.grad(grad_h.square().sum(), h)[0])
    torch.testing.assert_close(results[0], results[1], rtol=1e-4, atol=1e-4 * results[1].abs().max().item())

    with torch.no_grad():
        out, a, b, _, _ = torch.ops.gkg_pyg.bn_gelu_linear.default(*args)
    grad_out = torch.randn(out.shape, dtype=torch.float64, requires_grad=True)
    backward = torch.ops.gkg_pyg.bn_gelu_linear_backward.default(
        grad_out, args[0], a, b, args[1], args[2], args[3], training, 1e-5
    )
    with pytest.raises(RuntimeError, match=r"bn_gelu_linear_backward has no derivative of its own"):
        torch.autograd.grad(backward[0].sum(), grad_out)


# ---------------------------------------------------------------------------
# torch.func transforms
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_max_relative_under_torch_func_is_the_operator(dtype):
    """torch.func.grad, vmap and hessian run (an operator's autograd formula cannot run under
    them: the differentiable PyTorch path does), with the operator's values and its
    gradients: to the first maximal neighbour on tied integer features, where ``max``
    over a dimension may pick another; float32 to rounding (another summation order)."""
    x_src, x_dst, neighbors = max_relative_inputs(400, 300, 64, 2, 9, dtype, False, seed=21)
    x_src = x_src.round()  # many ties
    weights = torch.randn(300, 128, generator=gen(22), dtype=dtype)
    loss = lambda s, d: (ops.max_relative(s, d, neighbors) * weights).sum()  # noqa: E731
    leaves = [t.clone().requires_grad_(True) for t in (x_src, x_dst)]
    loss(*leaves).backward()
    grads = torch.func.grad(loss, argnums=(0, 1))(x_src, x_dst)
    for got, leaf in zip(grads, leaves):
        assert torch.equal(got != 0, leaf.grad != 0)
        torch.testing.assert_close(got, leaf.grad, rtol=0, atol=0 if dtype == torch.float64 else 1e-5)
    batch = torch.randn(3, 400, 64, generator=gen(23), dtype=dtype)
    mapped = torch.func.vmap(lambda s: ops.max_relative(s, x_dst, neighbors))(batch)
    assert torch.equal(mapped, torch.stack([ops.max_relative(s, x_dst, neighbors) for s in batch]))
    if dtype == torch.float64:  # the Hessian of a cubic loss: torch.func's against the operator's own formulas
        small_src, small_dst, small_nb = max_relative_inputs(7, 5, 4, 2, 3, dtype, False, seed=24)
        cubic = lambda s: (ops.max_relative(s, small_dst, small_nb) ** 3).sum()  # noqa: E731
        want = torch.autograd.functional.hessian(cubic, small_src)
        assert want.abs().max() > 0
        torch.testing.assert_close(torch.func.hessian(cubic)(small_src), want)


@pytest.mark.parametrize("training", [True, False])
def test_bn_gelu_linear_under_torch_func_is_the_modules(training):
    """Under torch.func.grad the operator's caller runs F.batch_norm, F.gelu and F.linear:
    the gradients are the operator's (to float32 rounding) and the running statistics
    are updated alike."""
    args = list(bn_gelu_linear_args(3000, 24, 8, torch.float32, False, training, seed=25))
    running = [args[5].clone(), args[6].clone()]
    loss = lambda h, w: ops.bn_gelu_linear(h, *args[1:3], w, args[4], *running, *args[7:]).square().sum()  # noqa: E731
    grads = torch.func.grad(loss, argnums=(0, 1))(args[0], args[3])
    leaves = [args[0].clone().requires_grad_(True), args[3].clone().requires_grad_(True)]
    operator_running = [args[5].clone(), args[6].clone()]
    ops.bn_gelu_linear(
        leaves[0], *args[1:3], leaves[1], args[4], *operator_running, *args[7:]
    ).square().sum().backward()
    for got, leaf in zip(grads, leaves):
        torch.testing.assert_close(got, leaf.grad, rtol=1e-4, atol=1e-4 * leaf.grad.abs().max().item())
    for got, want in zip(running, operator_running):
        assert torch.equal(got, want)


# ---------------------------------------------------------------------------
# Compilers, profilers, FLOP counters
# ---------------------------------------------------------------------------
def test_profiler_shows_each_operator():
    x_src, x_dst, neighbors = max_relative_inputs(300, 400, 64, 2, 9, torch.float32, True)
    args = bn_gelu_linear_args(64, 8, 4, torch.float32, True, True)
    dst, src, dst_sq, src_sq, bias = integer_knn_inputs(2, 1, 30, 20, 4, True, seed=1)
    with profile() as prof:
        ops.max_relative(x_src, x_dst, neighbors).sum().backward()
        ops.bn_gelu_linear(*args).sum().backward()
        ops.knn_smallest_k(dst, src, dst_sq, src_sq, bias, 3)
        ops.smallest_k(torch.randn(40, 30), 3)
    names = {e.key for e in prof.key_averages()}
    for op in ("max_relative", "max_relative_backward", "bn_gelu_linear", "bn_gelu_linear_backward"):
        assert f"gkg_pyg::{op}" in names
    assert {"gkg_pyg::knn_smallest_k", "gkg_pyg::smallest_k"} <= names


def test_flop_counter_counts_the_products():
    """The FLOP counter sees each operator once and counts the kNN's products and
    the fused block's linear maps (forward and backward) as the plain modules'."""
    from torch.utils.flop_counter import FlopCounterMode

    dst, src, dst_sq, src_sq, bias = integer_knn_inputs(2, 2, 784, 196, 48, True, seed=2)
    args = bn_gelu_linear_args(500, 32, 16, torch.float32, True, True)
    with FlopCounterMode(display=False) as flops:
        ops.knn_smallest_k(dst, src, dst_sq, src_sq, bias, 9)
    assert flops.get_total_flops() == 2 * 2 * 2 * 784 * 196 * 48
    with FlopCounterMode(display=False) as flops:
        ops.bn_gelu_linear(*args).sum().backward()
    assert flops.get_total_flops() == 3 * 2 * 500 * 32 * 16


def test_torch_compile_runs_the_kernels(counting):
    """Under torch.compile the operators are opaque calls whose real kernels run
    (no graph break); the compiled values and gradients equal eager ones."""
    x_src, x_dst, neighbors = max_relative_inputs(300, 400, 64, 2, 9, torch.float32, True)

    def fn(x_src, x_dst):
        return ops.max_relative(x_src, x_dst, neighbors).square().sum()

    torch._dynamo.reset()
    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    got = compiled(x_src, x_dst)
    got.backward()
    assert counting.calls == 2
    grads = x_src.grad.clone(), x_dst.grad.clone()
    x_src.grad = x_dst.grad = None
    want = fn(x_src, x_dst)
    want.backward()
    assert torch.equal(got, want) and torch.equal(grads[0], x_src.grad) and torch.equal(grads[1], x_dst.grad)


# ---------------------------------------------------------------------------
# Building the kernels, switching them off
# ---------------------------------------------------------------------------
def test_switched_off_by_environment(no_kernels, recwarn):
    no_kernels()
    assert not ops.native_available()
    dist = torch.randn(300, 196)
    assert torch.equal(ops.smallest_k(dist, 9), dist.topk(9, dim=-1, largest=False).indices)
    assert not [w for w in recwarn if "compile" in str(w.message)]  # switched off on purpose: no warning


def test_compile_failure_warns_once_and_falls_back(monkeypatch, tmp_path):
    monkeypatch.delenv("GKG_PYG_NATIVE", raising=False)
    monkeypatch.setattr(_native, "_library", None)
    monkeypatch.setattr(_native, "_tried", False)
    monkeypatch.setenv("CC", str(tmp_path / "no-such-compiler"))
    monkeypatch.setenv("GKG_PYG_NATIVE_CACHE", str(tmp_path / "cache"))
    dist = torch.randn(300, 196)
    with pytest.warns(UserWarning, match="could not compile the CPU kernels kernels.c"):
        got = ops.smallest_k(dist, 9)
    assert torch.equal(got, dist.topk(9, dim=-1, largest=False).indices)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert not ops.native_available()  # decided once, no second warning
    assert list((tmp_path / "cache").glob("*")) == []  # no half-written library left behind


def test_compiler_choice(monkeypatch):
    """$CC wins; without it a Python built with a compiler that is not installed
    (a conda toolchain, say) falls back to cc, gcc or clang."""
    if not compiler_present():
        pytest.skip("no C compiler")
    monkeypatch.setenv("CC", "my-cc -O1")
    assert _native._compiler() == ["my-cc", "-O1"]
    monkeypatch.delenv("CC")
    monkeypatch.setattr(_native.sysconfig, "get_config_var", lambda name: "x86_64-conda-linux-gnu-cc -pthread")
    assert _native._compiler()[0] in ("cc", "gcc", "clang")


@pytest.mark.slow  # a compiler run
def test_builds_without_openmp_into_a_fresh_cache(monkeypatch, tmp_path):
    """A compiler that cannot do OpenMP: the kernels are built without it (one
    thread per call) into the given cache and give the same answers."""
    if not compiler_present():
        pytest.skip("no C compiler")
    real = " ".join(_native._compiler())
    wrapper = tmp_path / "cc-without-openmp"
    wrapper.write_text(f'#!/bin/sh\nfor a in "$@"; do [ "$a" = -fopenmp ] && exit 1; done\nexec {real} "$@"\n')
    wrapper.chmod(0o755)
    monkeypatch.delenv("GKG_PYG_NATIVE", raising=False)
    monkeypatch.setattr(_native, "_library", None)
    monkeypatch.setattr(_native, "_tried", False)
    monkeypatch.setenv("CC", str(wrapper))
    monkeypatch.setenv("GKG_PYG_NATIVE_CACHE", str(tmp_path / "cache"))
    assert ops.native_available()
    assert [p.suffix for p in (tmp_path / "cache").iterdir()] == [".so"]
    dist = torch.randn(300, 196)
    assert torch.equal(ops.smallest_k(dist, 9), stable_smallest(dist, 9))


def test_plain_decompositions_leave_only_aten():
    """An exported program keeps the gkg_pyg operators (and runs them); after
    run_decompositions(plain_decompositions()) only ATen operations remain, with
    the same values (float64: no rounding to hide behind), for any batch size."""

    class Model(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.bias = torch.nn.Buffer(torch.randn(20, 20, generator=gen(13), dtype=torch.float64))
            self.bn = [torch.rand(8, generator=gen(14), dtype=torch.float64) + 0.5 for _ in range(4)]
            self.weight = torch.randn(6, 8, generator=gen(15), dtype=torch.float64)

        def forward(self, x):  # (B, 20, 8)
            b = x.shape[0]
            xg = x.view(b, 20, 2, 4).permute(2, 0, 1, 3)
            sq = (xg * xg).sum(-1)
            table = ops.knn_smallest_k(xg, xg, sq, sq, self.bias, 3)  # (2, B, 20, 3)
            table = (table + torch.arange(b).view(1, b, 1, 1) * 20).view(2, b * 20, 3)
            rel = ops.max_relative(x.reshape(b * 20, 8), x.reshape(b * 20, 8), table)
            first = ops.smallest_k(rel, 2)
            out = ops.bn_gelu_linear(rel[:, ::2], *self.bn[:2], self.weight, None, *self.bn[2:], False, 0.1, 1e-5)
            return out, first

    model = Model()
    x = torch.randn(2, 20, 8, generator=gen(16), dtype=torch.float64)
    program = torch.export.export(model, (x,), dynamic_shapes=({0: torch.export.Dim("batch")},))
    plain = program.run_decompositions(ops.plain_decompositions())

    def targets(p):
        return {str(n.target) for m in p.graph_module.modules() for n in m.graph.nodes if n.op == "call_function"}

    assert {f"gkg_pyg.{op}.default" for op in ("knn_smallest_k", "max_relative", "smallest_k", "bn_gelu_linear")} <= (
        targets(program)
    )
    assert not [t for t in targets(plain) if "gkg_pyg" in t]
    x3 = torch.randn(3, 20, 8, generator=gen(17), dtype=torch.float64)
    for got in (program.module()(x3), plain.module()(x3)):
        for a, b in zip(got, model(x3)):
            assert torch.equal(a, b)


def test_plain_decompositions_equal_the_operators():
    """Each decomposition called directly gives every output of its operator (float64,
    the PyTorch paths): BatchNorm with and without running statistics, ranks included
    (batch_norm, an ATen BatchNorm in compiled training, decomposes to ATen's)."""
    table = ops.plain_decompositions()
    for training, running in ((True, True), (True, False), (False, True)):
        args = bn_gelu_linear_args(50, 8, 4, torch.float64, False, training)
        args = args if running else args[:5] + (None, None) + args[7:]
        op = torch.ops.gkg_pyg.bn_gelu_linear.default
        for got, want in zip(table[op](*args), op(*args)):
            assert torch.equal(got, want)
    x_src, x_dst, neighbors = max_relative_inputs(30, 20, 8, 2, 4, torch.float64, False)  # repeated neighbours
    cases = [(x_src, x_dst, neighbors)]
    for name in ("k1", "no_destinations", "strided"):
        *shape, strided = MAX_RELATIVE_CASES[name]
        cases.append(max_relative_inputs(*shape, torch.float64, False, strided=strided))
    max_relative = [(torch.ops.gkg_pyg.max_relative.default, (*c, rank)) for c in cases for rank in (True, False)]
    for op, args in [
        *max_relative,
        (torch.ops.gkg_pyg.knn_smallest_k.default, (*integer_knn_inputs(2, 3, 40, 30, 4, True, seed=3), 5)),
        (torch.ops.gkg_pyg.smallest_k.default, (torch.randn(30, 20, generator=gen(3), dtype=torch.float64), 4)),
        (torch.ops.gkg_pyg.batch_norm.default, (*batch_norm_args((2, 3, 4, 5), torch.float64, False), 0.1, 1e-5)),
    ]:
        got, want = table[op](*args), op(*args)
        for a, b in zip(got, want) if isinstance(want, tuple) else [(got, want)]:
            assert torch.equal(a, b)
    _, rank = torch.ops.gkg_pyg.max_relative.default(x_src, x_dst, neighbors, True)
    grad_out = torch.randn(20, 16, generator=gen(4), dtype=torch.float64)
    op = torch.ops.gkg_pyg.max_relative_backward.default
    assert torch.equal(table[op](grad_out, neighbors, rank, 30), op(grad_out, neighbors, rank, 30))


@pytest.mark.skipif(torch_cluster is None, reason="torch-cluster is not installed")
def test_a_torch_cluster_model_decomposes_to_plain_aten():
    """gkg_pyg::cluster_knn decomposes too (the set of nearest sources, ascending, from products and
    topk): the torch-cluster backend's group kNN (a model's, with a position term) exports to ATen
    only, with the same neighbours."""
    op = torch.ops.gkg_pyg.cluster_knn.default
    sources, queries = torch.randn(3, 50, 7, generator=gen(5)), torch.randn(3, 20, 7, generator=gen(6))
    assert torch.equal(ops.plain_decompositions()[op](sources, queries, 6), op(sources, queries, 6))

    class GroupKNN(torch.nn.Module):
        def forward(self, x_src, x_dst, u, v):  # (B, 40, 8), (B, 30, 8), position factors (30, 3), (40, 3)
            return gkg_pyg.batched_group_knn(x_src, x_dst, 4, 2, position_bias=(u, v), backend="torch_cluster")

    args = (torch.randn(2, 40, 8, generator=gen(7)), torch.randn(2, 30, 8, generator=gen(8)))
    args += (torch.randn(30, 3, generator=gen(9), dtype=torch.float64),)
    args += (torch.randn(40, 3, generator=gen(10), dtype=torch.float64),)
    program = torch.export.export(GroupKNN(), args)
    plain = program.run_decompositions(ops.plain_decompositions())

    def targets(p):  # the kNN runs without autograd: in a submodule of the graph
        return {str(n.target) for m in p.graph_module.modules() for n in m.graph.nodes if n.op == "call_function"}

    assert "gkg_pyg.cluster_knn.default" in targets(program)
    assert not [t for t in targets(plain) if "gkg_pyg" in t]
    assert torch.equal(plain.module()(*args), GroupKNN()(*args))


@pytest.mark.parametrize("groups", [1, 4])
def test_onednn_linear_operator(groups):
    """The oneDNN map that compiled code calls as one operator: opcheck with and
    without gradients, the values of F.linear / the grouped map and its plain
    decomposition, gradients equal to the plain map's (its backward operator),
    and higher derivatives through the plain map (gradgradcheck in float64)."""
    from gkg_pyg.ops.linear import _plain_grouped_linear

    for grad in (False, True):
        x = torch.randn(3, 50, 16, generator=gen(31)).requires_grad_(grad)
        weight, bias = torch.randn(8, 16 // groups, generator=gen(32)), torch.randn(8, generator=gen(33))
        weight.requires_grad_(grad), bias.requires_grad_(grad)
        opcheck(torch.ops.gkg_pyg.onednn_linear.default, (x, weight, bias, groups), test_utils=QUICK)
    got = torch.ops.gkg_pyg.onednn_linear(x, weight, bias, groups)
    plain = _plain_grouped_linear(x, weight, bias, groups)
    torch.testing.assert_close(got, plain, rtol=1e-5, atol=1e-5)
    if groups == 1:
        torch.testing.assert_close(got, F.linear(x, weight, bias), rtol=1e-5, atol=1e-5)
    grad_out = torch.randn(got.shape, generator=gen(37))
    for a, b in zip(
        torch.autograd.grad(got, (x, weight, bias), grad_out), torch.autograd.grad(plain, (x, weight, bias), grad_out)
    ):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-4)
    x64, weight64, bias64 = (
        t.detach()[:1, :8].double().requires_grad_() if t is x else t.detach().double().requires_grad_()
        for t in (x, weight, bias)
    )
    assert torch.autograd.gradgradcheck(lambda *a: torch.ops.gkg_pyg.onednn_linear(*a, groups), (x64, weight64, bias64))
    no_rows = torch.randn(0, 16, requires_grad=True)
    out = torch.ops.gkg_pyg.onednn_linear(no_rows, weight, bias, groups)
    assert out.shape == (0, 8)
    grads = torch.autograd.grad(out.sum(), (no_rows, weight, bias))
    assert grads[0].shape == (0, 16) and not grads[1].any() and not grads[2].any()


def test_compiled_code_calls_the_onednn_operators():
    """Under torch.compile a large float32 map stays one oneDNN call (the compiler's
    layout choices made it slower than eager), with gradients its backward pass
    another (oneDNN's convolution backward, as eager autograd runs it); so does a
    grouped map with gradients, as in eager code."""
    if not torch.backends.mkldnn.is_available():
        pytest.skip("needs oneDNN")
    x = torch.randn(4096, 64, generator=gen(34))
    weight, bias = torch.randn(1024, 64, generator=gen(35)), torch.randn(1024, generator=gen(36))
    compiled = torch.compile(ops.grouped_linear, backend="aot_eager", fullgraph=True)
    with torch.no_grad(), profile() as prof:
        got = compiled(x, weight, bias, 1)
    assert "gkg_pyg::onednn_linear" in {e.name for e in prof.events()}
    torch.testing.assert_close(got, F.linear(x, weight, bias), rtol=1e-4, atol=1e-4)
    leaves = [t.clone().requires_grad_() for t in (x, weight, bias)]
    with profile() as prof:
        out = compiled(*leaves, 1)
        out.square().sum().backward()
    assert {"gkg_pyg::onednn_linear", "gkg_pyg::onednn_linear_backward"} <= {e.name for e in prof.events()}
    want = [t.clone().requires_grad_() for t in (x, weight, bias)]
    F.linear(*want).square().sum().backward()
    for got_leaf, want_leaf in zip(leaves, want):  # float32 sums over 4096 rows in another order
        scale = want_leaf.grad.abs().max().item()
        torch.testing.assert_close(got_leaf.grad, want_leaf.grad, rtol=1e-4, atol=1e-5 * scale)
    grouped = torch.randn(1024, 16, generator=gen(38), requires_grad=True)
    with profile() as prof:
        compiled(x, grouped, bias, 4).sum().backward()
    assert {"gkg_pyg::onednn_linear", "gkg_pyg::onednn_linear_backward"} <= {e.name for e in prof.events()}


@pytest.mark.parametrize("groups", [2, 4])
def test_grouped_map_with_gradients_runs_onednn_forward_and_per_group_products_backward(two_threads, groups):
    """A large grouped float32 map with gradients in eager code: one
    ``gkg_pyg::onednn_linear`` call (oneDNN's grouped convolution) whose backward
    operator runs one product per group on column blocks of the rows; values and
    gradients equal the ``bmm`` map's in float64 to float32 rounding (grouped
    blocks that leaked into each other would give O(1) errors)."""
    if not torch.backends.mkldnn.is_available():
        pytest.skip("needs oneDNN")
    from gkg_pyg.ops.linear import _plain_grouped_linear

    x = torch.randn(8192, 128, generator=gen(40), requires_grad=True)
    weight = torch.randn(256, 128 // groups, generator=gen(41), requires_grad=True)
    bias = torch.randn(256, generator=gen(42), requires_grad=True)
    grad_out = torch.randn(8192, 256, generator=gen(43))
    with profile() as prof:
        out = ops.grouped_linear(x, weight, bias, groups)
        grads = torch.autograd.grad(out, (x, weight, bias), grad_out)
    assert {"gkg_pyg::onednn_linear", "gkg_pyg::onednn_linear_backward"} <= {e.name for e in prof.events()}
    leaves = [t.detach().double().requires_grad_() for t in (x, weight, bias)]
    want = _plain_grouped_linear(*leaves, groups)
    want_grads = torch.autograd.grad(want, leaves, grad_out.double())
    torch.testing.assert_close(out.double(), want.detach(), rtol=1e-5, atol=1e-4)
    for got, expected in zip(grads, want_grads):
        scale = expected.abs().max().item()
        torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-5 * scale)
