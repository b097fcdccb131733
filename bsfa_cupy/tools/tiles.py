"""Tile sets of causal attention with Nq = Nk = n, built on the tile grid: the harnesses' densities need
them at lengths where an (n, n) mask would take gigabytes (n = 128K: 16 GiB, and a padded copy)."""
from __future__ import annotations

from bsfa_reference.tiles import candidate_tiles, diagonal_tiles


def causal_tiles(n: int, block_m: int, block_n: int):
    """(valid, gated) bool (nQ, nK): tiles with an entry j <= i, and those of them off the diagonal."""
    valid = candidate_tiles(n, n, block_m, block_n, causal=True)
    return valid, valid & ~diagonal_tiles(n, n, block_m, block_n)
