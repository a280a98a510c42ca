"""Building and loading the compiled CPU kernels of ``csrc/kernels.c``.

The kernels are plain C (no torch headers), compiled on first use with the
system C compiler, ``-march=native`` and OpenMP (whose worker threads are
PyTorch's own) into ``~/.cache/gkg-pyg/native`` (``GKG_PYG_NATIVE_CACHE``
overrides), keyed by the source, the compiler and the CPU, and called
through ``ctypes`` from the real implementations of the ``gkg_pyg::`` custom
operators.  Without a compiler, or with ``GKG_PYG_NATIVE=0``, every operator
runs its PyTorch path (one warning when compiling fails).
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
from typing import Optional

import torch

SOURCE = Path(__file__).with_name("csrc") / "kernels.c"
_FLAGS = ["-O3", "-march=native", "-ffp-contract=off", "-shared", "-fPIC"]
# OpenMP first: the kernels then share PyTorch's libgomp worker threads; a compiler without it
# builds kernels that run on one thread.
_THREADING = (["-fopenmp"], [])
# Below this many distances (or output values) per call starting the threads outweighs the kernels
# (measured here: 64 rows of 196 sources, k = 9: torch.topk 0.05 ms, the kernel 0.06 ms).
MIN_ELEMENTS = 1 << 14

_library: Optional[ctypes.CDLL] = None
_tried = False


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
    source, machine = SOURCE.read_bytes(), _cpu_signature().encode() + sys.platform.encode()
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
            subprocess.run(command + [str(SOURCE), "-o", tmp], check=True, capture_output=True, text=True, timeout=120)
            os.replace(tmp, target)
            return target
        except subprocess.CalledProcessError as error:
            failure = error
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    raise failure


def _declare(library: ctypes.CDLL) -> None:
    i64, ptr, c_int = ctypes.c_int64, ctypes.c_void_p, ctypes.c_int
    signatures = {
        "gkg_smallest_k": [ptr, i64, i64, i64, ptr, c_int],
        "gkg_knn": [ptr, ptr, ptr, ptr, ptr, ptr, ptr, i64, i64, i64, i64, i64, i64, ptr, c_int],
        "gkg_max_relative": [ptr, i64, ptr, i64, i64, i64, ptr, i64, ptr, ptr, c_int],
        "gkg_max_relative_backward": [ptr, ptr, ptr, i64, i64, i64, i64, i64, ptr, c_int],
        "gkg_bn_gelu": [ptr, i64, i64, ptr, ptr, ptr, c_int],
        "gkg_bn_gelu_backward": [ptr, ptr, ptr, i64, i64, ptr, ptr, ptr, ptr, ptr, c_int],
        "gkg_bn_backward": [ptr, ptr, i64, i64, ptr, ptr, ptr, ptr, c_int],
    }
    for name, argtypes in signatures.items():
        fn = getattr(library, name)
        fn.restype, fn.argtypes = c_int, argtypes


def library() -> Optional[ctypes.CDLL]:
    """The loaded kernels, or ``None`` where they cannot be built or are switched off
    (``GKG_PYG_NATIVE=0``).  Decided once per process: later calls return the cached answer."""
    global _library, _tried
    if _tried:
        return _library
    _tried = True
    if os.environ.get("GKG_PYG_NATIVE", "1") == "0":
        return None
    try:
        loaded = ctypes.CDLL(str(_build()))
        _declare(loaded)
    except (OSError, AttributeError, subprocess.SubprocessError) as error:
        detail = getattr(error, "stderr", None) or error
        warnings.warn(
            f"gkg_pyg: could not compile the CPU kernels {SOURCE.name} ({str(detail).strip()[:300]}); "
            "using the PyTorch paths (the same values, slower on the CPU)",
            stacklevel=3,
        )
        return None
    _library = loaded
    return _library


def native_available() -> bool:
    """Whether the compiled kernels are built and loaded (compiling them now if needed)."""
    return library() is not None


def threads(elements: int) -> int:
    """Up to ``torch.get_num_threads()``, at least 2^14 values per thread (each call opens a parallel region)."""
    return max(1, min(torch.get_num_threads(), elements // MIN_ELEMENTS))
