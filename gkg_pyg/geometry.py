"""Where the patches of a Pyramid ViG / GKGNet lie: the four stage grids of an
input size, the source pooling of each stage's patch-level graph, and the
smallest input whose every stage still has ``k`` kNN sources.

The stem halves the image twice (two 3x3 stride-2 convolutions: ``H/4 x W/4``
patches in stage 1) and a 3x3 stride-2 convolution before stages 2, 3, 4 halves
it again, so stage ``i`` sees about ``H / 2^(i+1) x W / 2^(i+1)`` patches.  The
patch-level kNN of stage ``i`` takes its sources averaged over ``r x r``
patches, ``r = POOL[i]``.

Pure Python on integers: nothing here imports a model (``gkg_pyg.config``
validates sizes with it, and ``gkg_pyg.models`` builds on it) or reads a tensor.
"""

from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

from .errors import InputSizeError

__all__ = ["POOL", "stage_grids", "too_small", "min_input_size", "check_input_size"]

POOL = (4, 2, 1, 1)  # source pooling factor r of the patch-level graph per stage

Grid = Tuple[int, int]


def _down(size: int) -> int:
    """Output size of a 3x3 stride-2 convolution with padding 1."""
    return (size - 1) // 2 + 1


def stage_grids(height: int, width: int) -> List[Grid]:
    """Patch grids ``(h, w)`` of the four stages for an input of ``height x width``."""
    h, w = _down(_down(height)), _down(_down(width))
    grids = [(h, w)]
    for _ in range(3):
        h, w = _down(h), _down(w)
        grids.append((h, w))
    return grids


def too_small(grids: Sequence[Grid], k: int) -> Optional[str]:
    """What makes the stage ``grids`` too small for ``k`` neighbours (a stage with
    fewer than ``k`` pooled kNN sources or patches), or ``None`` when they fit."""
    for i, (h, w) in enumerate(grids):
        n_src = (h // POOL[i]) * (w // POOL[i])
        if n_src < k:
            return f"stage {i + 1} has {h}x{w} patches ({n_src} kNN sources after {POOL[i]}x{POOL[i]} pooling)"
        if h * w < k:
            return f"stage {i + 1} has only {h * w} patches"
    return None


def min_input_size(k: int = 9) -> int:
    """Smallest square input whose every stage has at least ``k`` kNN sources."""
    size = 4
    while too_small(stage_grids(size, size), k):
        size += 1
    return size


def check_input_size(height: int, width: int, k: int, what: str = "input") -> List[Grid]:
    """The stage grids of a ``height x width`` input; an :class:`InputSizeError`
    (a ``ValueError``) that names the stage too small for ``k`` neighbours and
    the smallest square size that fits.

    ``what`` names the size in the message: ``"input"`` for images given to a
    forward pass, ``"img_size"`` for a model's construction size."""
    grids = stage_grids(height, width)
    problem = too_small(grids, k)
    if problem:
        smallest = min_input_size(k)
        size = f"input {height}x{width}" if what == "input" else f"{what} {(height, width)}"
        hint = (
            f"the smallest input is {smallest}x{smallest}"
            if what == "input"
            else f"the smallest square size is {smallest}"
        )
        raise InputSizeError(f"{size} is too small for k={k}: {problem}; {hint}")
    return grids
