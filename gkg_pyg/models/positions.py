"""The relative-position term of the patch-level group kNN graphs.

For a stage whose construction grid is ``h x w = n`` patches of ``C`` channels,
``P`` is the MAE 2-D sine-cosine embedding of the grid (``(n, C)``: half the
dimensions encode the row, half the column, each half ``[sin(pos omega),
cos(pos omega)]`` with ``omega_j = 1 / 10000^(j / (C/4))``) and the table is
``T = 2 P P^T / C``, in closed form

    T_ij = (2 / C) sum_k [cos(omega_k dy_ij) + cos(omega_k dx_ij)],

rounded to float32 and resampled bicubically (``align_corners=False``) over
the flattened source index to the ``r x r``-pooled sources, ``(n, n / r^2)``.
At another runtime grid the table is resampled again to ``(N, N / r^2)``.  The
kNN distance is ``dist - T``: nearer patches are preferred.

:class:`RelativePosition` holds one stage's term: the dense table for the
dense kNN and the rank-``C`` factors ``(U, V)``, ``U V^T = T``, for
torch-cluster's kNN (buffers built with the module, moved by ``.to()``).
"""

from __future__ import annotations

from typing import Dict, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch._subclasses.fake_tensor import FakeTensor

from ..knn import PositionBias
from ..ops._dtypes import as_dtype, at_least_float32

__all__ = ["relative_position_table", "relative_position_factors", "resample_rows", "RelativePosition"]

Grid = Tuple[int, int]


def _omega(channels: int) -> Tensor:
    """The ``C / 4`` frequencies ``1 / 10000^(j / (C/4))`` of one axis, float64."""
    if channels % 4:
        raise ValueError(f"the relative-position table needs channels divisible by 4, got {channels}")
    return 1.0 / 10000 ** (torch.arange(channels // 4, dtype=torch.float64, device="cpu") / (channels // 4))


def _axis_table(size: int, channels: int) -> Tensor:
    """``(size, size)``: ``(2/C) sum_k cos(omega_k (a - b))`` along one grid axis."""
    pos = torch.arange(size, dtype=torch.float64, device="cpu")
    offsets = pos[:, None] - pos[None, :]
    return torch.cos(offsets[..., None] * _omega(channels)).sum(-1) * (2.0 / channels)


def relative_position_table(grid: Grid, channels: int, pool: int) -> Tensor:
    """The position term of one stage at its construction grid, ``(n, n_src)`` float32.

    ``T = 2 P P^T / C`` of the MAE 2-D sine-cosine embedding ``P`` of the
    ``h x w`` grid, which in closed form is ``Ty[row_i, row_j] + Tx[col_i, col_j]``
    (``Tx``, ``Ty`` from :func:`_axis_table`), rounded to float32 and resampled
    bicubically over the flattened source index to the ``pool x pool``-reduced
    sources, as the authors do.  Bicubic resampling leaves an axis of
    unchanged size untouched, so the rows are built and resampled in chunks
    (bit-identical to one call, without the ``n x n`` matrix in memory).
    """
    h, w = grid
    n, n_src = h * w, (h // pool) * (w // pool)
    ty, tx = _axis_table(h, channels), _axis_table(w, channels)
    index = torch.arange(n, device="cpu")
    rows, cols = index // w, index % w
    out = torch.empty(n, n_src, device="cpu")
    # Chunks of about 2 MB stay in the cache between the sum and the resampling: at 576 px
    # (n = 20736) the table takes a quarter of the time of 2048-row chunks.  Fake tensors (a
    # model built under FakeTensorMode) hold no values: one chunk, a few operations to trace.
    rows_per_chunk = n if isinstance(out, FakeTensor) else max(1, 2**19 // n)
    buffer = torch.empty(rows_per_chunk, h, w, device="cpu")
    for r0 in range(0, n, rows_per_chunk):
        r, c = rows[r0 : r0 + rows_per_chunk], cols[r0 : r0 + rows_per_chunk]
        # source j = (a, b) at flat index a * w + b: a broadcast sum in float64, rounded to
        # float32 as it is written (one pass, no float64 chunk)
        chunk = torch.add(ty[r][:, :, None], tx[c][:, None, :], out=buffer[: len(r)]).view(len(r), n)
        if n_src == n:
            out[r0 : r0 + len(r)] = chunk
        else:
            out[r0 : r0 + len(r)] = F.interpolate(
                chunk[None, None], size=(len(r), n_src), mode="bicubic", align_corners=False
            )[0, 0]
    return out


def relative_position_factors(grid: Grid, channels: int, pool: int) -> Tuple[Tensor, Tensor]:
    """``(U, V)`` float64, ``(n, C)`` and ``(n_src, C)``, with ``U @ V.T`` the
    position term of :func:`relative_position_table` before its float32 rounding.

    ``T = (2/C) P P^T`` of the sine-cosine embedding ``P`` (``n x C``) has rank at
    most ``C``, and bicubic resampling over the source index is a linear map
    ``R``, so the resampled table is ``U V^T`` with ``U = (2/C) P`` and
    ``V = R P``: ``C`` coordinates per node instead of ``n_src``.  The table
    itself is rounded to float32 before it is resampled (the authors' order),
    which no rank-``C`` form reproduces bit for bit: the two differ by about
    1e-7 (tests/test_fast_paths.py).
    """
    omega = _omega(channels)
    h, w = grid
    n, n_src = h * w, (h // pool) * (w // pool)
    index = torch.arange(n, device="cpu")
    rows = (index // w).double()[:, None] * omega
    cols = (index % w).double()[:, None] * omega
    p = torch.cat([rows.sin(), rows.cos(), cols.sin(), cols.cos()], dim=1)  # cos(a - b) = sin a sin b + cos a cos b
    v = p if n_src == n else resample_rows(p, n_src)
    return p * (2.0 / channels), v


def resample_rows(x: Tensor, rows: int) -> Tensor:
    """Bicubic resampling (``align_corners=False``) of ``x``'s rows to ``rows``,
    the one-axis part of a 2-D bicubic ``F.interpolate`` over a row index."""
    return F.interpolate(x.t()[None, None], size=(x.shape[1], rows), mode="bicubic", align_corners=False)[0, 0].t()


class RelativePosition(nn.Module):
    """One stage's relative-position term at its construction ``grid`` and at
    runtime grids, for the dense kNN (the table) and for torch-cluster's (the
    factors).

    Nothing here is part of a checkpoint (the authors' stored tables are
    recomputed, never read).  The construction grid's table and factors are
    non-persistent buffers built with the module, in the default device and
    dtype (the factors in float64), and ``.to()`` moves them like any buffer.
    They exist before the first forward pass so that a compiled model's first
    call changes no module state (that would make its second call compile
    again).  A change of dtype rebuilds them (the table's values stay float32
    values, the factors float64), as does leaving the meta device.  The
    resampled table and the factors of the last runtime grid are cached.  No
    value is read back to the host, so the term can be built on fake or meta
    tensors.
    """

    def __init__(self, grid: Grid, channels: int, pool: int):
        super().__init__()
        self.grid, self.channels, self.pool = tuple(grid), channels, pool
        device = torch.empty(0).device  # the default device (a torch.device context included)
        if device.type == "meta":  # shapes only: leaving the meta device computes the values (_apply)
            n, n_src = grid[0] * grid[1], self.num_sources(self.grid)
            table = torch.empty(n, n_src)
            u, v = (torch.empty(rows, channels, dtype=torch.float64) for rows in (n, n_src))
        else:
            table, (u, v) = self._table(), self._factors()
        self.register_buffer("relative_pos", table.to(device, torch.get_default_dtype()), persistent=False)
        self.register_buffer("factor_u", u.to(device), persistent=False)
        self.register_buffer("factor_v", v.to(device), persistent=False)
        self._bias_cache: Dict[tuple, Tensor] = {}
        self._factor_cache: Dict[tuple, Tuple[Tensor, Tensor]] = {}

    def _table(self) -> Tensor:
        return relative_position_table(self.grid, self.channels, self.pool)

    def _factors(self) -> Tuple[Tensor, Tensor]:
        return relative_position_factors(self.grid, self.channels, self.pool)

    def _apply(self, fn, recurse=True):
        before = self.relative_pos
        super()._apply(fn, recurse)
        table, u = self.relative_pos, self.factor_u
        if table.dtype != before.dtype or before.is_meta:  # recomputed, not converted twice (or made up)
            self.relative_pos = self._table().to(table.device, table.dtype)
        if u.dtype != torch.float64 or before.is_meta:
            self.factor_u, self.factor_v = (f.to(u.device) for f in self._factors())
        self._bias_cache.clear()
        self._factor_cache.clear()
        return self

    def num_sources(self, grid: Grid) -> int:
        """Sources of the patch-level graph at ``grid``: ``(h // r) (w // r)``."""
        return (grid[0] // self.pool) * (grid[1] // self.pool)

    def table(self, like: Tensor) -> Tensor:
        """The ``(n, n_src)`` term at the construction grid in ``like``'s device and
        dtype (the buffer itself where they are the buffer's)."""
        table = self.relative_pos
        return table if (table.device, table.dtype) == (like.device, like.dtype) else table.to(like)

    def bias(self, grid: Grid, like: Tensor) -> Tensor:
        """The ``(N, N_src)`` term at a runtime grid (resampled bicubically from
        the construction grid's table when they differ)."""
        table = self.table(like)
        grid = tuple(grid)  # HeteroData.to() turns stored grids into lists
        if grid == self.grid:
            return table
        key = (grid, table.dtype, table.device)
        if key not in self._bias_cache:
            self._bias_cache.clear()
            size = (grid[0] * grid[1], self.num_sources(grid))
            self._bias_cache[key] = F.interpolate(table[None, None], size=size, mode="bicubic", align_corners=False)[
                0, 0
            ]
        return self._bias_cache[key]

    def factors(self, grid: Grid, device: torch.device) -> Tuple[Tensor, Tensor]:
        """``(U, V)``, ``(N, C)`` and ``(N_src, C)`` float64 on ``device``, with
        ``U @ V.T`` the term at a runtime grid before float32 rounding
        (:func:`relative_position_factors`, resampled like :meth:`bias`)."""
        grid = tuple(grid)
        if grid == self.grid:
            return self.factor_u.to(device), self.factor_v.to(device)
        key = (grid, device)
        if key not in self._factor_cache:
            self._factor_cache.clear()
            u, v = self._factors()  # bicubic resampling is separable: resample the factor rows
            u, v = resample_rows(u, grid[0] * grid[1]), resample_rows(v, self.num_sources(grid))
            self._factor_cache[key] = (u.to(device), v.to(device))
        return self._factor_cache[key]

    def for_knn(self, grid: Grid, backend: str, dtype: torch.dtype, like: Tensor) -> PositionBias:
        """The term for ``backend``: the exact dense table for the dense kNN,
        factors (``r = C`` extra coordinates) for torch-cluster, in ``dtype``
        promoted to float32 at least (the kNN ranks in float32 at least, also under autocast)."""
        dtype = at_least_float32(dtype)
        if backend == "torch_cluster":
            u, v = self.factors(grid, like.device)
            return u.to(dtype), v.to(dtype)
        return as_dtype(self.bias(grid, like), dtype)

    def extra_repr(self) -> str:
        return f"grid={self.grid}, channels={self.channels}, pool={self.pool}"
