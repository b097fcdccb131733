"""Test helpers: a reporting ``assert_close``, hypothesis strategies for BSFA problems, input makers.

Imported as ``from tests.support.reference_helpers import ...`` (``tests`` is a package; pytest puts the
repository root on ``sys.path``).
"""
from __future__ import annotations

import dataclasses
import math

import ml_dtypes
import numpy as np
from hypothesis import strategies as st

DTYPES = (np.dtype(np.float32), np.dtype(np.float64), np.dtype(np.float16), np.dtype(ml_dtypes.bfloat16))

#: tolerances for comparisons between two float64 computations of the same quantity
RTOL64 = 1e-10
ATOL64 = 1e-10


# ---------------------------------------------------------------------------------------------
# assert_close
# ---------------------------------------------------------------------------------------------


def assert_close(actual, expected, rtol, atol, what):
    """Assert |actual - expected| <= atol + rtol * |expected| elementwise.

    Infinities must match exactly (same sign, same place) and NaN only matches NaN. On failure the
    message names ``what``, the number of mismatches, the worst absolute error, its index and the
    two values there.
    """
    a = np.asarray(actual, dtype=np.float64)
    e = np.asarray(expected, dtype=np.float64)
    assert a.shape == e.shape, f"{what}: shape {a.shape} != expected {e.shape}"
    nan_a, nan_e = np.isnan(a), np.isnan(e)
    same = (a == e) | (nan_a & nan_e)  # exact equality also covers matching infinities
    finite = np.isfinite(a) & np.isfinite(e)
    with np.errstate(invalid="ignore", over="ignore"):
        err = np.where(finite, np.abs(a - e), np.inf)
        ok = same | (finite & (err <= atol + rtol * np.abs(np.where(finite, e, 0.0))))
    ok &= ~(nan_a ^ nan_e)
    if ok.all():
        return
    bad = ~ok
    n_bad = int(bad.sum())
    err_bad = np.where(bad, err, -1.0)
    idx = np.unravel_index(int(np.argmax(err_bad)), a.shape) if a.ndim else ()
    raise AssertionError(
        f"{what}: {n_bad} of {a.size} elements differ (rtol={rtol:g}, atol={atol:g}); "
        f"worst abs error {float(err_bad[idx]):.3e} at index {tuple(int(i) for i in idx)}: "
        f"actual {float(a[idx])!r}, expected {float(e[idx])!r}"
    )


def assert_same_mask(actual, expected, what):
    """Assert two bool arrays are equal, reporting the mismatch count and the first mismatches."""
    a, e = np.asarray(actual), np.asarray(expected)
    assert a.shape == e.shape, f"{what}: shape {a.shape} != expected {e.shape}"
    assert a.dtype == np.bool_, f"{what}: dtype {a.dtype}, expected bool"
    diff = a != e
    if diff.any():
        where = [tuple(int(i) for i in ix) for ix in np.argwhere(diff)[:5]]
        raise AssertionError(
            f"{what}: {int(diff.sum())} of {a.size} entries differ; first at {where} "
            f"(actual {[bool(a[w]) for w in where]}, expected {[bool(e[w]) for w in where]})"
        )


# ---------------------------------------------------------------------------------------------
# problems
# ---------------------------------------------------------------------------------------------


def n_tiles(n, block):
    return (n + block - 1) // block


@dataclasses.dataclass(frozen=True)
class Problem:
    B: int
    Nq: int
    Nk: int
    Hq: int
    Hkv: int
    D: int
    dtype: np.dtype
    causal: bool
    block_m: int
    block_n: int
    softmax_scale: float | None
    spread: float
    seed: int

    @property
    def nQ(self):
        return n_tiles(self.Nq, self.block_m)

    @property
    def nK(self):
        return n_tiles(self.Nk, self.block_n)

    @property
    def scale(self):
        return 1.0 / math.sqrt(self.D) if self.softmax_scale is None else float(self.softmax_scale)

    def kwargs(self):
        """Keyword arguments shared by attention / block_max_scores / Calibrator."""
        return dict(causal=self.causal, softmax_scale=self.softmax_scale, block_m=self.block_m,
                    block_n=self.block_n)

    def arrays(self):
        """q (B, Nq, Hq, D), k and v (B, Nk, Hkv, D) in ``dtype``; deterministic in ``seed``."""
        return make_qkv(self.B, self.Nq, self.Nk, self.Hq, self.Hkv, self.D, self.dtype, self.seed,
                        self.spread)


def make_qkv(B, Nq, Nk, Hq, Hkv, D, dtype=np.float64, seed=0, spread=1.0):
    """Random q, k, v; ``spread`` > 1 scales a random subset of keys to make tile maxima vary."""
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((B, Nq, Hq, D))
    k = rng.standard_normal((B, Nk, Hkv, D))
    v = rng.standard_normal((B, Nk, Hkv, D))
    if spread != 1.0:
        k *= np.where(rng.random((B, Nk, Hkv, 1)) < 0.2, spread, 1.0)
    dtype = np.dtype(dtype)
    return q.astype(dtype), k.astype(dtype), v.astype(dtype)


SMALL_GEOMETRIES = [(bm, bn) for bm in (16, 32, 128) for bn in (8, 16, 64)]


@st.composite
def problems(draw, *, max_n=300, max_batch=2, dtypes=DTYPES, causal=None, geometries=None,
             default_geometry_prob=True, max_hq=8):
    """A random BSFA problem: shapes (Nq, Nk not tile multiples, either larger), GQA ratio
    1/2/4/8, D in [8, 256], dtype, causal flag, tile geometry (small tiles mostly, sometimes the
    default 128 x 64), softmax scale and a data seed."""
    if geometries is None:
        geometries = SMALL_GEOMETRIES
    if default_geometry_prob and draw(st.integers(0, 4)) == 0:
        block_m, block_n = 128, 64
    else:
        block_m, block_n = draw(st.sampled_from(geometries))
    # half of the draws from the upper half of the range, so that many tiles are common
    sizes = st.integers(1, max_n) | st.integers(max(1, max_n // 2), max_n)
    Nq = draw(sizes)
    Nk = draw(sizes)
    group = draw(st.sampled_from([g for g in (1, 2, 4, 8) if g <= max_hq]))
    Hkv = draw(st.integers(1, max(1, max_hq // group // 2) if group > 1 else 2))
    Hq = Hkv * group
    D = draw(st.sampled_from([8, 16, 24, 32, 64, 96, 128, 256]))
    dtype = np.dtype(draw(st.sampled_from(dtypes)))
    if causal is None:
        causal = draw(st.booleans())
    softmax_scale = draw(st.one_of(st.none(), st.floats(0.02, 1.0)))
    spread = draw(st.sampled_from([1.0, 3.0]))
    B = draw(st.integers(1, max_batch))
    seed = draw(st.integers(0, 2**32 - 1))
    return Problem(B, Nq, Nk, Hq, Hkv, D, dtype, bool(causal), block_m, block_n, softmax_scale,
                   spread, seed)


def draw_thresholds(data, tile_max, Hq, nQ, *, kinds=("none", "scalar", "array", "array")):
    """Draw thresholds for a problem whose (B, Hq, nQ, nK) tile maxima are ``tile_max``.

    Finite values are spread over the range of the finite tile maxima (so some tiles are kept and
    some skipped), with occasional +-inf. Returns None, a scalar (Python float, NumPy float32 /
    float64 or a 0-d array) or an (Hq, T) float32 array with T in [1, nQ + 2].
    """
    kind = data.draw(st.sampled_from(kinds), label="threshold kind")
    finite = tile_max[np.isfinite(tile_max)]
    lo, hi = (float(finite.min()), float(finite.max())) if finite.size else (-1.0, 1.0)
    pad = 0.05 * (hi - lo) + 1e-3
    lo, hi = lo - pad, hi + pad
    if kind == "none":
        return None
    if kind == "scalar":
        value = data.draw(st.one_of(st.floats(lo, hi), st.sampled_from([-math.inf, math.inf])),
                          label="scalar threshold")
        wrap = data.draw(st.sampled_from(["float", "float32", "float64", "0d"]), label="scalar type")
        return {"float": float, "float32": np.float32, "float64": np.float64,
                "0d": lambda x: np.array(x, dtype=np.float32)}[wrap](value)
    T = data.draw(st.integers(1, nQ + 2), label="T")
    seed = data.draw(st.integers(0, 2**32 - 1), label="threshold seed")
    rng = np.random.default_rng(seed)
    thr = rng.uniform(lo, hi, size=(Hq, T))
    special = rng.random((Hq, T))
    thr[special < 0.05] = -np.inf
    thr[special > 0.95] = np.inf
    return thr.astype(np.float32)
