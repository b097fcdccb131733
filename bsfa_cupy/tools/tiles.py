"""Tile sets of causal attention with Nq = Nk = n, built on the tile grid: the harnesses' densities need
them at lengths where an (n, n) mask would take gigabytes (n = 128K: 16 GiB, and a padded copy)."""
from __future__ import annotations

import numpy as np

from bsfa_reference.tiles import diagonal_tiles, n_tiles


def causal_tiles(n: int, block_m: int, block_n: int):
    """(valid, gated) bool (nQ, nK): tiles with an entry j <= i, and those of them off the diagonal."""
    a = np.arange(n_tiles(n, block_m))
    c = np.arange(n_tiles(n, block_n))
    last_row = np.minimum((a + 1) * block_m, n) - 1
    valid = (c * block_n)[None, :] <= last_row[:, None]  # the tile's first key is visible to its last query
    return valid, valid & ~diagonal_tiles(n, n, block_m, block_n)
