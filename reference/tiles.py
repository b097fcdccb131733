"""Tile geometry of BSFA: validity mask, diagonal key tiles, threshold positions, tile maxima."""
from __future__ import annotations

import numpy as np

#: The paper's (and the kernel's) tile geometry: 128 query rows x 64 keys.
BLOCK_M = 128
BLOCK_N = 64


def n_tiles(n: int, block: int) -> int:
    return -(-n // block)


def valid_mask(Nq: int, Nk: int, causal: bool) -> np.ndarray:
    """(Nq, Nk) bool: causal is bottom-right aligned, (i, j) valid iff j <= i + Nk - Nq."""
    if not causal:
        return np.ones((Nq, Nk), dtype=bool)
    i = np.arange(Nq)[:, None]
    j = np.arange(Nk)[None, :]
    return j <= i + (Nk - Nq)


def diagonal_tiles(Nq: int, Nk: int, block_m: int, block_n: int) -> np.ndarray:
    """(nQ, nK) bool: key tiles overlapping the aligned span of each query tile.

    Query tile a spans rows [a*block_m, min((a+1)*block_m, Nq) - 1]; shifted by Nk - Nq into key
    coordinates and clipped into [0, Nk - 1], the key tiles it overlaps are always kept.
    """
    nQ, nK = n_tiles(Nq, block_m), n_tiles(Nk, block_n)
    diag = np.zeros((nQ, nK), dtype=bool)
    for a in range(nQ):
        lo = a * block_m + Nk - Nq
        hi = min((a + 1) * block_m, Nq) - 1 + Nk - Nq
        lo, hi = min(max(lo, 0), Nk - 1), min(max(hi, 0), Nk - 1)
        diag[a, lo // block_n : hi // block_n + 1] = True
    return diag


def tile_positions(Nq: int, Nk: int, block_m: int) -> np.ndarray:
    """(nQ,) int: absolute position p(a) = (a*block_m + Nk - Nq) // block_m, before clamping."""
    a = np.arange(n_tiles(Nq, block_m))
    return (a * block_m + Nk - Nq) // block_m


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
