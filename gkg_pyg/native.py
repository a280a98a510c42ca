"""Two compiled float32 CPU kernels, each with a PyTorch fallback that gives the same values.

:func:`smallest_k`, the dense kNN's row-wise top-k.  ATen's CPU ``topk``
copies each row into a queue of (value, index) pairs and partially sorts it;
on the kNN's rows (k = 9 to 27 of 49 to 3,136 sources) it was 20% of GKGNet's
evaluation time at 224 px and 26% at 448 px.  ``gkg_smallest_k`` in
``csrc/kernels.c`` finds a threshold from the minima of 32 or 64 strided
buckets with vector instructions, keeps the few entries below it, and sorts
only those (2-4x faster than ``torch.topk`` on these rows; see the README,
Benchmark).  The answer is exact: the same indices as
``torch.topk(k, largest=False)`` in the same order, ties broken by the lower
index (where ``torch.topk`` leaves the order of exact ties unspecified).

:func:`max_relative`, the neighbour maximum of :class:`gkg_pyg.GroupMaxRelConv`
over a regular ``(G, N_dst, k)`` table and the interleaved ``[x, max - x]``
features that follow it, in one pass over the destinations: PyTorch needs k
row gathers, k - 1 maxima, a difference and a stack (at stage 1 the gathers
copy rows of 40 values, which ATen's ``index_select`` does slowly).

The kernels are plain C (no torch headers), compiled on first use with the
system C compiler and ``-march=native`` into ``~/.cache/gkg-pyg/native``
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

__all__ = ["smallest_k", "knn_smallest_k", "max_relative", "native_available", "is_tracing"]

_SOURCE = Path(__file__).with_name("csrc") / "kernels.c"
_FLAGS = ["-O3", "-march=native", "-ffp-contract=off", "-shared", "-fPIC", "-pthread"]
# Below this many distances (or output values) per call the thread start-up outweighs the kernels
# (measured here: 64 rows of 196 sources, k = 9: torch.topk 0.05 ms, the kernel 0.06 ms).
_MIN_ELEMENTS = 1 << 14

_library: Optional[ctypes.CDLL] = None
_tried = False


def is_tracing() -> bool:
    """Whether a compiler, exporter or tracer is recording the call: such graphs must
    see plain ATen operators, so the fast paths that leave ATen step aside."""
    return (
        torch.compiler.is_compiling()
        or torch.compiler.is_exporting()
        or torch.jit.is_tracing()
        or torch.onnx.is_in_onnx_export()
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
    command = _compiler() + _FLAGS
    key = hashlib.sha1(
        _SOURCE.read_bytes() + " ".join(command).encode() + _cpu_signature().encode() + sys.platform.encode()
    )
    target = cache / f"kernels-{key.hexdigest()[:16]}.so"
    if target.exists():
        return target
    cache.mkdir(parents=True, exist_ok=True)
    # Compile to a private name and rename: concurrent processes never load a half-written library.
    fd, tmp = tempfile.mkstemp(dir=cache, suffix=".so")
    os.close(fd)
    try:
        subprocess.run(command + [str(_SOURCE), "-o", tmp], check=True, capture_output=True, text=True, timeout=120)
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


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
    fn.argtypes = [ptr, ptr, ptr, ptr, i64, i64, i64, i64, ptr, ctypes.c_int]
    library.gkg_max_relative.restype = ctypes.c_int
    library.gkg_max_relative.argtypes = [ptr, i64, ptr, i64, i64, i64, ptr, i64, ptr, ptr, ctypes.c_int]
    _library = library
    return _library


def native_available() -> bool:
    """Whether the compiled kernels are built and loaded (compiling them now if needed)."""
    return _load() is not None


def _kernel_applies(dist: Tensor, k: int) -> bool:
    if is_tracing():  # first: under a tracer the sizes below are traced values
        return False
    n = dist.shape[-1] if dist.dim() else 0
    if not ((1 <= k <= 16 and n >= 64) or (17 <= k <= 32 and n >= 128)):
        return False
    if dist.device.type != "cpu" or dist.dtype != torch.float32 or dist.numel() < _MIN_ELEMENTS:
        return False
    return not (dist.requires_grad and torch.is_grad_enabled())


def smallest_k(dist: Tensor, k: int) -> Tensor:
    """``dist.topk(k, dim=-1, largest=False).indices``: the indices of the ``k``
    smallest entries of every row, ascending.

    Float32 CPU rows with ``k <= 16`` of at least 64 entries, or ``k <= 32`` of
    at least 128, run on the compiled kernel (ties by the lower index), on up
    to ``torch.get_num_threads()`` threads; everything else, and any row holding
    a NaN, runs on ``torch.topk``.
    """
    out = _kernel_smallest_k(dist.contiguous(), None, None, None, k) if _kernel_applies(dist, k) else None
    return dist.topk(k, dim=-1, largest=False).indices if out is None else out


def knn_smallest_k(products: Tensor, row_add: Tensor, col_add: Tensor, bias: Optional[Tensor], k: int) -> Tensor:
    """:func:`smallest_k` of the dense kNN's distances
    ``((products * -2 + row_add) + col_add) - bias``, each operation rounded in
    this order, as PyTorch's in-place operations round them.

    ``products`` is ``(G, P, R, n)``, ``row_add`` ``(G, P, R, 1)``, ``col_add``
    ``(G, P, 1, n)`` and ``bias`` ``(R, n)`` or ``None``.  The kernel forms each
    row in its cache instead of four passes over the whole block; elsewhere
    ``products`` is turned into the distances in place and ranked by ``topk``.
    """
    if _kernel_applies(products, k) and products.is_contiguous():
        out = _kernel_smallest_k(
            products,
            row_add.contiguous(),
            col_add.contiguous(),
            None if bias is None else bias.contiguous(),
            k,
            block_rows=products.shape[2],
        )
        if out is not None:
            return out
    # The kernel either does not apply here or declined these rows (a NaN): no second attempt.
    dist = products.mul_(-2).add_(row_add).add_(col_add)
    if bias is not None:
        dist.sub_(bias)
    return dist.topk(k, dim=-1, largest=False).indices


def _threads(elements: int) -> int:
    """Up to ``torch.get_num_threads()``, at least 2^14 values per thread (each call starts its threads)."""
    return max(1, min(torch.get_num_threads(), elements // _MIN_ELEMENTS))


def _kernel_smallest_k(dist, row_add, col_add, bias, k: int, block_rows: int = 1) -> Optional[Tensor]:
    if _load() is None:
        return None
    n = dist.shape[-1]
    out = torch.empty(*dist.shape[:-1], k, dtype=torch.long)
    status = _library.gkg_smallest_k(
        *(None if t is None else t.data_ptr() for t in (dist, row_add, col_add, bias)),
        dist.numel() // n,
        n,
        block_rows,
        k,
        out.data_ptr(),
        _threads(dist.numel()),
    )
    return out if status == 0 else None


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
