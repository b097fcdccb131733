"""Tile geometry of BSFA: validity mask, diagonal key tiles, threshold positions, tile maxima."""
from __future__ import annotations

import numpy as np

from ._validate import check_offsets

#: The paper's (and the kernel's) tile geometry: 128 query rows x 64 keys.
BLOCK_M = 128
BLOCK_N = 64


def n_tiles(n: int, block: int) -> int:
    return -(-n // block)


def valid_mask(Nq: int, Nk: int, causal: bool, *, q_start=None, k_start=0) -> np.ndarray:
    """(Nq, Nk) bool: causal (i, j) valid iff k_start + j <= q_start + i (see attention).

    The default q_start = k_start + Nk - Nq is bottom-right alignment: j <= i + Nk - Nq.
    """
    return valid_mask_at(Nq, Nk, causal, *check_offsets(q_start, k_start, Nq, Nk))


def valid_mask_at(Nq: int, Nk: int, causal: bool, q0: int, k0: int) -> np.ndarray:
    """:func:`valid_mask` for resolved absolute positions q0, k0 of row 0 and key 0 (q0 may be < 0)."""
    if not causal:
        return np.ones((Nq, Nk), dtype=bool)
    i = np.arange(Nq)[:, None]
    j = np.arange(Nk)[None, :]
    return j <= i + (q0 - k0)


def candidate_tiles(Nq: int, Nk: int, block_m: int, block_n: int, causal: bool) -> np.ndarray:
    """(nQ, nK) bool: tiles holding a valid entry of a bottom-right call, from the tile grid alone.

    Equal to ``tile_reduce_any(valid_mask(Nq, Nk, causal), block_m, block_n)`` without the (Nq, Nk)
    mask, which takes gigabytes at long lengths: causal, a tile has one iff its first key is visible
    to its last query row.
    """
    nQ, nK = n_tiles(Nq, block_m), n_tiles(Nk, block_n)
    if not causal:
        return np.ones((nQ, nK), dtype=bool)
    last_row_limit = np.minimum((np.arange(nQ) + 1) * block_m, Nq) - 1 + (Nk - Nq)
    return (np.arange(nK) * block_n)[None, :] <= last_row_limit[:, None]


def diagonal_tiles(Nq: int, Nk: int, block_m: int, block_n: int, *, q_start=None, k_start=0) -> np.ndarray:
    """(nQ, nK) bool: key tiles overlapping the absolute span of each query tile.

    Query tile a spans the absolute positions [q0 + a*block_m, q0 + min((a+1)*block_m, Nq) - 1]
    (q0 = q_start, default k_start + Nk - Nq), both ends raised to 0 if negative; the call's key
    tiles whose absolute keys [k_start + c*block_n, k_start + min((c+1)*block_n, Nk) - 1] overlap
    it are diagonal. A span entirely outside the call's keys has no diagonal tile, so that a split
    call marks exactly the full call's diagonal tiles. With the defaults this is the span
    [a*block_m + Nk - Nq, min((a+1)*block_m, Nq) - 1 + Nk - Nq] clipped into [0, Nk - 1].
    """
    return diagonal_tiles_at(Nq, Nk, block_m, block_n, *check_offsets(q_start, k_start, Nq, Nk, block_m, block_n))


def diagonal_tiles_at(Nq: int, Nk: int, block_m: int, block_n: int, q0: int, k0: int) -> np.ndarray:
    """:func:`diagonal_tiles` for resolved absolute positions q0, k0 of row 0 and key 0."""
    nQ, nK = n_tiles(Nq, block_m), n_tiles(Nk, block_n)
    diag = np.zeros((nQ, nK), dtype=bool)
    for a in range(nQ):
        # bottom-right rows before the sequence start (Nq > Nk) sit at position 0, as they always have
        lo = max(q0 + a * block_m, 0)
        hi = max(q0 + min((a + 1) * block_m, Nq) - 1, 0)
        lo, hi = max(lo, k0) - k0, min(hi, k0 + Nk - 1) - k0
        if lo <= hi:
            diag[a, lo // block_n : hi // block_n + 1] = True
    return diag


def tile_positions(Nq: int, Nk: int, block_m: int, *, q_start=None, k_start=0) -> np.ndarray:
    """(nQ,) int: absolute position p(a) = (q0 + a*block_m) // block_m, before clamping.

    q0 = q_start, default k_start + Nk - Nq, which gives (a*block_m + Nk - Nq) // block_m.
    """
    return tile_positions_at(Nq, block_m, check_offsets(q_start, k_start, Nq, Nk, block_m)[0])


def tile_positions_at(Nq: int, block_m: int, q0: int) -> np.ndarray:
    """:func:`tile_positions` for the resolved absolute position q0 of row 0."""
    a = np.arange(n_tiles(Nq, block_m))
    return (a * block_m + q0) // block_m


def tile_reduce_any(mask: np.ndarray, block_m: int, block_n: int) -> np.ndarray:
    """(..., Nq, Nk) bool -> (..., nQ, nK): whether any entry of each tile is set."""
    return _tile_reduce(mask, block_m, block_n, False, np.logical_or.reduce)


def tile_reduce_max(s: np.ndarray, block_m: int, block_n: int) -> np.ndarray:
    """(..., Nq, Nk) float64 with -inf at invalid entries -> (..., nQ, nK) tile maxima.

    The maximum of each block_m x block_n box, entries past Nq / Nk counting as -inf, NaN
    ignored (IEEE maxNum, as the kernels' fmaxf): NaN only for a box that is all NaN.
    """
    *_, Nq, Nk = s.shape
    t = np.fmax.reduceat(s, np.arange(0, Nk, block_n), axis=-1)  # no padded copy of s
    t = np.fmax.reduceat(t, np.arange(0, Nq, block_m), axis=-2)
    if Nq % block_m:  # the last boxes reach past Nq: their missing rows count as -inf
        t[..., -1, :] = np.fmax(t[..., -1, :], -np.inf)
    if Nk % block_n:
        t[..., -1] = np.fmax(t[..., -1], -np.inf)
    return t


def _tile_reduce(x, block_m, block_n, fill, reduce):
    *lead, Nq, Nk = x.shape
    nQ, nK = n_tiles(Nq, block_m), n_tiles(Nk, block_n)
    pad = [(0, 0)] * len(lead) + [(0, nQ * block_m - Nq), (0, nK * block_n - Nk)]
    xp = np.pad(x, pad, constant_values=fill)
    xp = xp.reshape(*lead, nQ, block_m, nK, block_n)
    return reduce(xp, axis=(-3, -1))


def expand_tiles(tiles: np.ndarray, Nq: int, Nk: int, block_m: int, block_n: int) -> np.ndarray:
    """(..., nQ, nK) -> (..., Nq, Nk): each tile's value broadcast to its entries."""
    x = np.repeat(np.repeat(tiles, block_m, axis=-2), block_n, axis=-1)
    return x[..., :Nq, :Nk]
