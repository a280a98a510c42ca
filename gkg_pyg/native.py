"""Compiled float32 CPU kernels, each with a PyTorch fallback.

:func:`smallest_k`, a row-wise top-k.  ATen's CPU ``topk`` copies each row
into a queue of (value, index) pairs and partially sorts it.
``gkg_smallest_k`` in ``csrc/kernels.c`` finds a threshold from the minima
of 32 or 64 strided buckets with vector instructions, keeps the few entries
below it and ranks only those.  The answer is exact: the same indices as
``torch.topk(k, largest=False)`` in the same order, ties broken by the lower
index (where ``torch.topk`` leaves the order of exact ties unspecified).

:func:`knn_smallest_k`, the dense kNN of :mod:`gkg_pyg.knn` in one pass:
the products, the distances and the selection tile by tile, so that no
distance matrix is written (on GKGNet-S at 224 px the PyTorch path's
``matmul`` + ``topk`` were 21% of an evaluation pass).

:func:`max_relative`, the neighbour maximum of :class:`gkg_pyg.GroupMaxRelConv`
over a regular ``(G, N_dst, k)`` table and the interleaved ``[x, max - x]``
features that follow it, in one pass over the destinations: PyTorch needs k
row gathers, k - 1 maxima, a difference and a stack (at stage 1 the gathers
copy rows of 40 values, which ATen's ``index_select`` does slowly).  Values
and gradients equal the PyTorch path's.

:func:`bn_gelu_linear_backward`, the backward pass of the models' fused
``linear(GELU(BatchNorm(h)))``: its elementwise work (recomputing the
activation, GELU's derivative, BatchNorm's sums and its input gradient) in
three passes over the hidden-width ``h`` instead of about ten PyTorch
operations, several on fresh memory (on GKGNet-S at 224 px those were a
quarter of the backward pass).  GELU follows ATen's vectorised formula; the
values agree with the PyTorch path to float32 rounding, not bit for bit.

The kernels are plain C (no torch headers), compiled on first use with the
system C compiler, ``-march=native`` and OpenMP (whose worker threads are
PyTorch's own) into ``~/.cache/gkg-pyg/native``
(``GKG_PYG_NATIVE_CACHE`` overrides), keyed by the source, the compiler and
the CPU, and called through ``ctypes``.  Without a compiler, or with
``GKG_PYG_NATIVE=0``, everything runs on the PyTorch paths (one warning when
compiling fails).
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shlex
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import warnings
from pathlib import Path
from typing import Optional, Tuple

import torch
from torch import Tensor
from torch.utils._python_dispatch import is_in_torch_dispatch_mode

__all__ = [
    "smallest_k",
    "knn_smallest_k",
    "max_relative",
    "max_relative_backward",
    "bn_gelu_linear_backward",
    "native_available",
    "is_tracing",
]

_SOURCE = Path(__file__).with_name("csrc") / "kernels.c"
_FLAGS = ["-O3", "-march=native", "-ffp-contract=off", "-shared", "-fPIC"]
# OpenMP first: the kernels then share PyTorch's libgomp worker threads; a compiler without it
# builds kernels that run on one thread.
_THREADING = (["-fopenmp"], [])
# Below this many distances (or output values) per call starting the threads outweighs the kernels
# (measured here: 64 rows of 196 sources, k = 9: torch.topk 0.05 ms, the kernel 0.06 ms).
_MIN_ELEMENTS = 1 << 14

_library: Optional[ctypes.CDLL] = None
_tried = False


def is_tracing() -> bool:
    """Whether a compiler, exporter, tracer or dispatch mode (a FLOP counter, fake
    tensors) is recording or intercepting the call: those must see plain ATen
    operators, so the fast paths that leave ATen step aside."""
    return (
        torch.compiler.is_compiling()
        or torch.compiler.is_exporting()
        or torch.jit.is_tracing()
        or torch.onnx.is_in_onnx_export()
        or is_in_torch_dispatch_mode()
    )


def _compiler() -> list:
    """``$CC`` when set; otherwise the first of Python's own compiler, ``cc``, ``gcc``
    and ``clang`` that exists (Python's may be a toolchain that is not installed)."""
    if os.environ.get("CC"):
        return shlex.split(os.environ["CC"])
    for cc in (sysconfig.get_config_var("CC"), "cc", "gcc", "clang"):
        if cc and shutil.which(shlex.split(cc)[0]):
            return shlex.split(cc)
    raise OSError("no C compiler found (tried Python's CC, cc, gcc, clang; set CC)")


def _cpu_signature() -> str:
    try:  # the instruction set that -march=native compiled for
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith(("flags", "Features"))), "")
    except OSError:
        flags = ""
    return platform.machine() + platform.processor() + flags


def _build() -> Path:
    cache = Path(os.environ.get("GKG_PYG_NATIVE_CACHE") or Path.home() / ".cache" / "gkg-pyg" / "native")
    source, machine = _SOURCE.read_bytes(), _cpu_signature().encode() + sys.platform.encode()
    commands = [_compiler() + _FLAGS + threading for threading in _THREADING]
    targets = [
        cache / f"kernels-{hashlib.sha1(source + ' '.join(c).encode() + machine).hexdigest()[:16]}.so" for c in commands
    ]
    for target in targets:
        if target.exists():
            return target
    cache.mkdir(parents=True, exist_ok=True)
    for command, target in zip(commands, targets):
        # Compile to a private name and rename: concurrent processes never load a half-written library.
        fd, tmp = tempfile.mkstemp(dir=cache, suffix=".so")
        os.close(fd)
        try:
            subprocess.run(command + [str(_SOURCE), "-o", tmp], check=True, capture_output=True, text=True, timeout=120)
            os.replace(tmp, target)
            return target
        except subprocess.CalledProcessError as error:
            failure = error
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    raise failure


def _load() -> Optional[ctypes.CDLL]:
    global _library, _tried
    if _tried:
        return _library
    _tried = True
    if os.environ.get("GKG_PYG_NATIVE", "1") == "0":
        return None
    try:
        library = ctypes.CDLL(str(_build()))
        fn = library.gkg_smallest_k
    except (OSError, subprocess.SubprocessError) as error:
        detail = getattr(error, "stderr", None) or error
        warnings.warn(
            f"gkg_pyg: could not compile the CPU kernels {_SOURCE.name} ({str(detail).strip()[:300]}); "
            "using the PyTorch paths (the same values, slower on the CPU)",
            stacklevel=3,
        )
        return None
    i64, ptr = ctypes.c_int64, ctypes.c_void_p
    fn.restype = ctypes.c_int
    fn.argtypes = [ptr, i64, i64, i64, ptr, ctypes.c_int]
    library.gkg_knn.restype = ctypes.c_int
    library.gkg_knn.argtypes = [ptr, ptr, ptr, ptr, ptr, ptr, ptr, i64, i64, i64, i64, i64, i64, ptr, ctypes.c_int]
    library.gkg_max_relative.restype = ctypes.c_int
    library.gkg_max_relative.argtypes = [ptr, i64, ptr, i64, i64, i64, ptr, i64, ptr, ptr, ctypes.c_int]
    library.gkg_max_relative_backward.restype = ctypes.c_int
    library.gkg_max_relative_backward.argtypes = [ptr, ptr, ptr, i64, i64, i64, i64, i64, ptr, ctypes.c_int]
    library.gkg_bn_gelu.restype = ctypes.c_int
    library.gkg_bn_gelu.argtypes = [ptr, i64, i64, ptr, ptr, ptr, ctypes.c_int]
    library.gkg_bn_gelu_backward.restype = ctypes.c_int
    library.gkg_bn_gelu_backward.argtypes = [ptr, ptr, i64, i64, ptr, ptr, ptr, ptr, ptr, ctypes.c_int]
    library.gkg_bn_backward.restype = ctypes.c_int
    library.gkg_bn_backward.argtypes = [ptr, ptr, i64, i64, ptr, ptr, ptr, ptr, ctypes.c_int]
    _library = library
    return _library


def native_available() -> bool:
    """Whether the compiled kernels are built and loaded (compiling them now if needed)."""
    return _load() is not None


def _shape_supported(n: int, k: int) -> bool:
    return 1 <= k <= min(32, n)


def _kernel_applies(dist: Tensor, k: int) -> bool:
    if is_tracing():  # first: under a tracer the sizes below are traced values
        return False
    if not _shape_supported(dist.shape[-1] if dist.dim() else 0, k):
        return False
    if dist.device.type != "cpu" or dist.dtype != torch.float32 or dist.numel() < _MIN_ELEMENTS:
        return False
    return not (dist.requires_grad and torch.is_grad_enabled())


def smallest_k(dist: Tensor, k: int) -> Tensor:
    """``dist.topk(k, dim=-1, largest=False).indices``: the indices of the ``k``
    smallest entries of every row, ascending.

    Float32 CPU rows with ``k <= 32`` run on the compiled kernel (ties by the
    lower index), on up to ``torch.get_num_threads()`` threads; everything
    else, and any row holding a NaN, runs on ``torch.topk``.
    """
    if _kernel_applies(dist, k) and _load() is not None:
        dist = dist.contiguous()
        n = dist.shape[-1]
        out = torch.empty(*dist.shape[:-1], k, dtype=torch.long)
        status = _library.gkg_smallest_k(
            dist.data_ptr(), dist.numel() // n, n, k, out.data_ptr(), _threads(dist.numel())
        )
        if status == 0:
            return out
    return dist.topk(k, dim=-1, largest=False).indices


def knn_smallest_k(
    dst: Tensor, src: Tensor, dst_sq: Tensor, src_sq: Tensor, bias: Optional[Tensor], k: int
) -> Optional[Tensor]:
    """The dense kNN's ``k`` nearest sources of every destination in one pass,
    or ``None`` where the kernel does not apply or declines (a NaN distance):
    the caller then runs its PyTorch path.

    ``dst`` is ``(G, B, R, c)``, ``src`` ``(G, B, n, c)`` (any strides with
    contiguous channels), ``dst_sq`` ``(G, B, R)``, ``src_sq`` ``(G, B, n)`` and
    ``bias`` ``(R, n)`` or ``None``.  The distances are
    ``((p * -2 + dst_sq) + src_sq) - bias`` with ``p = dst @ src^T``, each
    operation rounded once in this order as in the PyTorch path.  ``p`` is
    accumulated over the channels in order with fused multiply-adds; the
    PyTorch path's ``matmul`` rounds in an order MKL picks per shape (the same
    as this one for most of GKGNet's products, measured), so a pair of
    sources whose distances lie within a few units in the last place may swap
    ranks between the two paths.  The kernel forms the products in tiles and
    ranks each row at once: the ``(R, n)`` distance matrix is never written.
    Returns ``(G, B, R, k)`` int64, ranked as :func:`smallest_k` ranks.
    """
    g, b, r, c = dst.shape
    n = src.shape[2]
    tensors = (dst, src, dst_sq, src_sq) + (() if bias is None else (bias,))
    if is_tracing() or not _shape_supported(n, k) or g * b * r * n < _MIN_ELEMENTS or c < 1:
        return None
    if any(t.device.type != "cpu" or t.dtype != torch.float32 for t in tensors) or _load() is None:
        return None
    dst, src = (t if t.stride(-1) == 1 else t.contiguous() for t in (dst, src))
    dst_sq, src_sq = dst_sq.contiguous(), src_sq.contiguous()
    bias = None if bias is None else bias.contiguous()
    out = torch.empty(g, b, r, k, dtype=torch.long)
    strides = [(ctypes.c_int64 * 3)(*t.stride()[:3]) for t in (dst, src)]
    status = _library.gkg_knn(
        dst.data_ptr(),
        strides[0],
        dst_sq.data_ptr(),
        src.data_ptr(),
        strides[1],
        src_sq.data_ptr(),
        None if bias is None else bias.data_ptr(),
        g,
        b,
        r,
        n,
        c,
        k,
        out.data_ptr(),
        _threads(g * b * r * n),
    )
    return out if status == 0 else None


def _threads(elements: int) -> int:
    """Up to ``torch.get_num_threads()``, at least 2^14 values per thread (each call opens a parallel region)."""
    return max(1, min(torch.get_num_threads(), elements // _MIN_ELEMENTS))


def max_relative(
    x_src: Tensor, x_dst: Tensor, neighbors: Tensor, with_rank: bool
) -> Optional[Tuple[Tensor, Optional[Tensor]]]:
    """``(out, rank)`` from the compiled kernel, or ``None`` where it does not apply
    (then the caller runs its PyTorch path, which also reports bad indices).

    ``out`` is ``(N_dst, 2C)``: ``out[i, 2c] = x_dst[i, c]`` and
    ``out[i, 2c + 1] = max_j x_src[neighbors[g(c), i, j], c] - x_dst[i, c]``;
    ``rank`` (uint8, ``(N_dst, C)``, only ``with_rank``) is the rank of the first
    maximal neighbour.  Float32 CPU tensors, at least 2^14 output values.
    """
    g, n_dst, k = neighbors.shape
    n_src, c = x_src.shape
    if is_tracing() or n_dst * c < _MIN_ELEMENTS or (with_rank and k > 256):
        return None
    if any(t.device.type != "cpu" for t in (x_src, x_dst, neighbors)) or neighbors.dtype != torch.long:
        return None
    if x_src.dtype != torch.float32 or x_dst.dtype != torch.float32 or _load() is None:
        return None
    x_src, x_dst, neighbors = x_src.contiguous(), x_dst.contiguous(), neighbors.contiguous()
    out = torch.empty(n_dst, 2 * c)
    rank = torch.empty(n_dst, c, dtype=torch.uint8) if with_rank else None
    status = _library.gkg_max_relative(
        x_src.data_ptr(),
        n_src,
        x_dst.data_ptr(),
        n_dst,
        c,
        g,
        neighbors.data_ptr(),
        k,
        out.data_ptr(),
        None if rank is None else rank.data_ptr(),
        _threads(out.numel()),
    )
    return (out, rank) if status == 0 else None


def max_relative_backward(grad_out: Tensor, neighbors: Tensor, rank: Tensor, n_src: int) -> Optional[Tensor]:
    """The gradient of :func:`max_relative`'s sources, ``(N_src, C)``: each
    ``grad_out[i, 2c + 1]`` added to the first maximal neighbour of ``(i, c)``
    (``rank`` as :func:`max_relative` returns it), summed over ``i`` in order as
    ``scatter_add_`` sums, without the ``(N_dst, C)`` table of winners.  ``None``
    where the kernel does not apply (the caller scatters in PyTorch)."""
    g, n_dst, k = neighbors.shape
    c = grad_out.shape[1] // 2
    if is_tracing() or n_dst * c < _MIN_ELEMENTS or rank.dtype != torch.uint8 or grad_out.dtype != torch.float32:
        return None
    if any(t.device.type != "cpu" for t in (grad_out, neighbors, rank)) or neighbors.dtype != torch.long:
        return None
    if _load() is None:
        return None
    grad_out, neighbors, rank = grad_out.contiguous(), neighbors.contiguous(), rank.contiguous()
    grad_src = grad_out.new_zeros(n_src, c)
    status = _library.gkg_max_relative_backward(
        grad_out.data_ptr(),
        neighbors.data_ptr(),
        rank.data_ptr(),
        n_src,
        n_dst,
        c,
        g,
        k,
        grad_src.data_ptr(),
        _threads(n_dst * c),
    )
    return grad_src if status == 0 else None


def bn_gelu_linear_backward(
    grad_out: Tensor,
    h: Tensor,
    mean: Tensor,
    invstd: Tensor,
    bn_weight: Tensor,
    bn_bias: Tensor,
    weight: Tensor,
    training: bool,
) -> Optional[Tuple[Tensor, Tensor, Tensor, Tensor]]:
    """The backward pass of ``linear(GELU(BN(h)))`` without the linear map's bias:
    ``(grad_h, grad_bn_weight, grad_bn_bias, grad_weight)``, or ``None`` where the
    kernels do not apply (float32 CPU tensors, ``h`` ``(N, C)`` with at least
    2^14 values; the caller then runs its PyTorch path).

    ``BN(h) = (h - mean) * invstd * bn_weight + bn_bias`` with the batch's
    statistics when ``training`` (their gradient included) or fixed ones.  The
    passes: ``a = GELU(BN(h))`` for ``grad_weight = grad_out^T a``; then
    ``grad_z = (grad_out @ weight) * GELU'(BN(h))`` with BatchNorm's two sums;
    then BatchNorm's input gradient, in place, as ATen's formula gives it.
    """
    n, c = h.shape
    tensors = (grad_out, h, mean, invstd, bn_weight, bn_bias, weight)
    if is_tracing() or h.numel() < _MIN_ELEMENTS or c < 1:
        return None
    if any(t.device.type != "cpu" or t.dtype != torch.float32 for t in tensors) or _load() is None:
        return None
    h = h.contiguous()
    threads = _threads(h.numel())
    alpha = (invstd * bn_weight).contiguous()  # BN(h) = h * alpha + beta, ATen's form of the affine map
    beta = (bn_bias - mean * alpha).contiguous()
    mean = mean.contiguous()
    activated = torch.empty_like(h)
    _library.gkg_bn_gelu(h.data_ptr(), n, c, alpha.data_ptr(), beta.data_ptr(), activated.data_ptr(), threads)
    from .conv import linear_weight_grad  # conv imports this module

    grad_weight = linear_weight_grad(grad_out, activated)
    # grad_z into the same buffer: one hidden-width temporary, whose pages pass 1 has touched already
    grad = torch.mm(grad_out, weight, out=activated)
    sums = torch.empty(2 * c, dtype=torch.float64)
    # fixed statistics: grad_h = grad_z * invstd * bn_weight, in the same pass
    fixed_scale = None if training else alpha
    status = _library.gkg_bn_gelu_backward(
        h.data_ptr(),
        grad.data_ptr(),
        n,
        c,
        alpha.data_ptr(),
        beta.data_ptr(),
        mean.data_ptr(),
        None if fixed_scale is None else fixed_scale.data_ptr(),
        sums.data_ptr(),
        threads,
    )
    if status != 0:
        return None
    sum_grad, dot = sums[:c], sums[c:]
    grad_bn_weight, grad_bn_bias = (dot * invstd).float(), sum_grad.float()
    if training:  # (g - mean(g) - (h - mean) invstd^2 mean(g (h - mean))) invstd bn_weight
        alpha64 = alpha.double()
        xmu_scale = (-dot * invstd.double() ** 2 / n * alpha64).float()
        shift = (-sum_grad / n * alpha64).float()
        _library.gkg_bn_backward(
            h.data_ptr(),
            grad.data_ptr(),
            n,
            c,
            mean.data_ptr(),
            alpha.data_ptr(),
            xmu_scale.data_ptr(),
            shift.data_ptr(),
            threads,
        )
    return grad, grad_bn_weight, grad_bn_bias, grad_weight
