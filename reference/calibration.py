"""Threshold calibration, the paper's rule, streaming over calibration batches."""
from __future__ import annotations

import math
import numbers

import numpy as np

from ._validate import SUPPORTED_DTYPES, check_block, check_flag
from .tiles import BLOCK_M, BLOCK_N, diagonal_tiles, tile_positions

REDUCTIONS = ("mean", "median")


def check_k_values(k_values) -> tuple[int, ...]:
    try:
        ks = tuple(k_values)
    except TypeError:
        raise TypeError(f"k_values: expected a sequence of ints, got {type(k_values).__name__}") from None
    if not ks:
        raise ValueError("k_values: expected at least one k, got an empty sequence")
    for k in ks:
        if isinstance(k, bool) or not isinstance(k, numbers.Integral):
            raise TypeError(f"k_values: expected ints, got {type(k).__name__} {k!r}")
        if k < 1:
            raise ValueError(f"k_values: expected ints >= 1, got {k}")
    if len(set(ks)) != len(ks):
        raise ValueError(f"k_values: expected no duplicates, got {list(ks)}")
    return tuple(int(k) for k in ks)


def sample_thresholds(tile_max, k_values, Nq: int, Nk: int, block_m: int, block_n: int, xp=np):
    """Per-sample thresholds from tile maxima.

    tile_max: (B, Hq, nQ, nK) float (-inf where a tile has no valid entry), an array of ``xp``.
    Returns (len(k_values), B, Hq, nQ) float64 (an ``xp`` array), NaN where a sample has <= k
    candidates, and the clamped position of each query tile (nQ,) int (NumPy).

    Candidates of (b, h, a) are the non-diagonal tiles with a valid entry; the threshold for k is
    the midpoint of the k-th and (k+1)-th largest candidate maxima, so that applying it to the same
    sample keeps exactly k non-diagonal tiles. NaN or +inf maxima (from non-finite q or k) are a
    ValueError: they would silently drop candidates or proposals.

    ``xp`` is the array module (numpy, or cupy for maxima on the GPU), so the sort runs where the
    maxima are and only the small (K, B, Hq, nQ) result has to travel.
    """
    tile_max = xp.asarray(tile_max)
    bad = int((xp.isnan(tile_max) | (tile_max == np.inf)).sum())
    if bad:
        raise ValueError(
            f"tile_max: expected finite maxima or -inf (no valid entry), got {bad} NaN or +inf of "
            f"{tile_max.size} in shape {tuple(tile_max.shape)}; calibrate on finite q and k"
        )
    diag = xp.asarray(diagonal_tiles(Nq, Nk, block_m, block_n))
    cand = (tile_max > -np.inf) & ~diag[None, None]
    # Sorted in the maxima's own dtype (float32 from the GPU: half the memory of float64); the
    # cast to float64 is exact and monotone, so the midpoints below equal those of a float64 sort.
    vals = xp.where(cand, tile_max, xp.asarray(-np.inf, dtype=tile_max.dtype))
    vals = -xp.sort(-vals, axis=-1)  # descending along key tiles
    n_cand = cand.sum(axis=-1)
    nK = vals.shape[-1]
    out = xp.full((len(k_values),) + vals.shape[:-1], np.nan, dtype=np.float64)
    for i, k in enumerate(k_values):
        if k >= nK:
            continue
        mid = 0.5 * vals[..., k - 1].astype(np.float64) + 0.5 * vals[..., k].astype(np.float64)
        out[i] = xp.where(n_cand > k, mid, np.nan)
    pos = np.maximum(tile_positions(Nq, Nk, block_m), 0)
    return out, pos


class Calibrator:
    """Streaming BSFA threshold calibration for one model layer (the paper's rule).

    For every head h, query-tile position p and k in ``k_values``, each sample (batch element) whose
    query tile at p has more than k candidate tiles (non-diagonal, with a valid entry) proposes the
    midpoint of its k-th and (k+1)-th largest candidate tile maxima. :meth:`thresholds` aggregates the
    proposals by ``reduce`` ("mean" or "median"); positions with no proposal get -inf (keep all).

    Call :meth:`update` once per calibration batch of post-RoPE q (B, Nq, Hq, D) and k (B, Nk, Hkv, D);
    neither is kept. Hq, Hkv and D must not change between updates. ``causal=True`` is the default.
    q or k with a NaN or ±inf is refused (ValueError), as are batches whose tile maxima would need
    more memory than :func:`bsfa_reference.block_max_scores` allows (4 GiB, or
    ``BSFA_REFERENCE_MAX_BYTES``).
    """

    #: array module of the tile maxima from :meth:`_tile_max` (the GPU subclass uses cupy)
    _xp = np

    def __init__(self, k_values, *, causal=True, softmax_scale=None, block_m=BLOCK_M, block_n=BLOCK_N,
                 reduce="mean"):
        self.k_values = check_k_values(k_values)
        self.causal = check_flag(causal, "causal")
        self.softmax_scale = softmax_scale
        self.block_m = check_block(block_m, "block_m")
        self.block_n = check_block(block_n, "block_n")
        if reduce not in REDUCTIONS:
            raise ValueError(f"reduce: expected one of {REDUCTIONS}, got {reduce!r}")
        self.reduce = reduce
        self._shape = None  # (Hq, Hkv, D) of the first update
        self._obs: list[tuple[np.ndarray, ...]] = []  # finite proposals: (k index, head, position, value)
        self._T = 0
        self.num_samples = 0

    def _tile_max(self, q, k):
        from .attention import _block_max

        return _block_max(q, k, self.causal, self.softmax_scale, self.block_m, self.block_n,
                          "bsfa_reference.Calibrator.update")

    def _count_nonfinite(self, x, name: str) -> int:
        """NaN and ±inf entries of ``x``; 0 for what is not a float array (refused later, by type)."""
        if not isinstance(x, np.ndarray) or x.dtype.newbyteorder("=") not in SUPPORTED_DTYPES:
            return 0
        return int(x.size - np.count_nonzero(np.isfinite(x)))

    def _check_finite(self, x, name: str) -> None:
        # One NaN would make every maximum of its row or key NaN or -inf (skipped by the rule)
        # and bias or erase the thresholds without a sign; refuse it instead.
        bad = self._count_nonfinite(x, name)
        if bad:
            shape = tuple(int(n) for n in x.shape)  # torch's .size is a method: count from the shape
            raise ValueError(
                f"{name}: expected finite values, got {bad} NaN or ±inf of {math.prod(shape)} in shape {shape}; "
                "calibrate on finite activations"
            )

    def _check_shape(self, q, k):
        if getattr(q, "ndim", None) != 4 or getattr(k, "ndim", None) != 4:
            raise ValueError(
                "q and k: expected rank 4 (batch, seqlen, heads, head_dim), got shapes "
                f"{getattr(q, 'shape', None)} and {getattr(k, 'shape', None)}"
            )
        shape = (q.shape[2], k.shape[2], q.shape[3])
        if self._shape is not None and shape != self._shape:
            raise ValueError(
                f"Calibrator.update: expected (Hq, Hkv, D) = {self._shape} as in earlier updates, got {shape}; "
                "use one Calibrator per layer"
            )
        return shape

    def update(self, q, k) -> None:
        """Add the samples of one calibration batch (every batch element is a sample)."""
        shape = self._check_shape(q, k)
        self._check_finite(q, "q")
        self._check_finite(k, "k")
        xp = self._xp
        tile_max = self._tile_max(q, k)
        self._shape = shape
        Nq, Nk = q.shape[1], k.shape[1]
        thr, pos = sample_thresholds(tile_max, self.k_values, Nq, Nk, self.block_m, self.block_n, xp=xp)
        self._add(getattr(xp, "asnumpy", np.asarray)(thr), pos)  # cupy.asnumpy for device results
        self.num_samples += q.shape[0]

    def _add(self, thr: np.ndarray, pos: np.ndarray) -> None:
        """Record per-sample thresholds (K, B, Hq, nQ) at clamped positions (nQ,)."""
        self._T = max(self._T, int(pos.max()) + 1)
        ki, _, h, a = np.nonzero(np.isfinite(thr))
        self._obs.append((ki, h, pos[a], thr[np.isfinite(thr)]))

    def thresholds(self) -> np.ndarray:
        """float32 (len(k_values), Hq, T); T is the largest position seen + 1."""
        if self._shape is None:
            raise ValueError("Calibrator.thresholds: no samples yet; call update(q, k) first")
        return aggregate(self._obs, (len(self.k_values), self._shape[0], self._T), self.reduce)


def aggregate(observations, shape, reduce: str) -> np.ndarray:
    """Reduce proposals [(k index, head, position, value) arrays] to a (K, Hq, T) float32 array.

    Several query tiles of one sample that clamp to position 0 (queries placed before the key
    sequence starts) each count as one proposal there. No proposal: -inf (keep all).
    """
    ki, h, p, val = (np.concatenate(parts) for parts in zip(*observations)) if observations else ([],) * 4
    flat = np.ravel_multi_index((ki, h, p), shape) if len(val) else np.zeros(0, dtype=np.intp)
    size = int(np.prod(shape))
    out = np.full(size, -np.inf)
    if reduce == "mean":
        sums = np.bincount(flat, weights=val, minlength=size)
        counts = np.bincount(flat, minlength=size)
        np.divide(sums, counts, out=out, where=counts > 0)
    else:
        order = np.argsort(flat, kind="stable")
        keys, starts = np.unique(flat[order], return_index=True)
        for key, group in zip(keys, np.split(val[order], starts[1:])):
            out[key] = np.median(group)
    return out.reshape(shape).astype(np.float32)
