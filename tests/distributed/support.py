"""Shared inputs for the context-parallel tests: problems, thresholds that skip tiles, the whole-sequence call."""
from __future__ import annotations

import numpy as np

import bsfa_reference as R
from bsfa_reference.tiles import diagonal_tiles
from tests.support.reference_helpers import make_qkv

#: out and lse of float32 tensors against the float64 reference: each part is rounded to float32 and the
#: parts are merged in float32, a few units in the last place of values of order 1 (float32 eps 1.2e-7)
RTOL32 = 1e-5
ATOL32 = 1e-6
#: float64 tensors merge in float64: the reference's own split-call tolerance
RTOL64 = 1e-12
ATOL64 = 1e-12

HQ, HKV, D = 4, 2, 16


def problem(n, *, batch=1, seed=0, dtype=np.float32):
    """q, k, v of one whole sequence of n positions (float64 values rounded to ``dtype``)."""
    return make_qkv(batch, n, n, HQ, HKV, D, dtype=dtype, seed=seed, spread=3.0)


def thresholds_that_skip(q, k, *, causal=True, frac=0.5):
    """(Hq, T) float32 thresholds, T = n / 128: per head and query-tile position, a value halfway between
    two neighbouring tile maxima of that row's gated tiles (about ``frac`` of them below), so that no
    tile maximum sits within rounding of a threshold and split calls decide exactly as the whole call."""
    tm = R.block_max_scores(q, k, causal=causal)  # (B, Hq, nQ, nK)
    n = q.shape[1]
    diag = diagonal_tiles(n, n, R.BLOCK_M, R.BLOCK_N)
    B, Hq, nQ, nK = tm.shape
    thr = np.zeros((Hq, nQ), dtype=np.float32)
    for h in range(Hq):
        for a in range(nQ):
            vals = np.unique(tm[:, h, a][:, ~diag[a]])
            vals = vals[np.isfinite(vals)]
            if vals.size >= 2:
                i = min(max(int(frac * vals.size), 1), vals.size - 1)
                thr[h, a] = np.float32((vals[i - 1] + vals[i]) / 2)
    return thr


def scalar_that_skips(q, k, *, causal=True):
    """One threshold halfway between the two middle distinct maxima of all gated tiles."""
    tm = R.block_max_scores(q, k, causal=causal)
    n = q.shape[1]
    gated = tm[:, :, ~diagonal_tiles(n, n, R.BLOCK_M, R.BLOCK_N)]
    vals = np.unique(gated[np.isfinite(gated)])
    i = max(vals.size // 2, 1)
    return float((vals[i - 1] + vals[i]) / 2)


def whole_call(q, k, v, thresholds, causal=True):
    """out, lse, keep of one reference call on the whole sequence."""
    return R.attention(q, k, v, thresholds, causal=causal, return_lse=True, return_keep=True)
