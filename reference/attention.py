"""The exact float64 definition of block-sparse FlashAttention (BSFA) forward."""
from __future__ import annotations

import numpy as np
from scipy.special import logsumexp

from ._validate import (
    as_float64,
    check_block,
    check_qk,
    check_thresholds,
    check_v,
    softmax_scale_or_default,
)
from .tiles import (
    BLOCK_M,
    BLOCK_N,
    diagonal_tiles,
    expand_tiles,
    n_tiles,
    tile_positions,
    tile_reduce_any,
    tile_reduce_max,
    valid_mask,
)


def _scores(q64, k64, scale, Hq, Hkv):
    """(B, Hq, Nq, Nk) float64 scaled scores; query head h reads kv head h // (Hq // Hkv)."""
    group = Hq // Hkv
    kh = np.repeat(k64, group, axis=2)  # GQA as an explicit gather, (B, Nk, Hq, D)
    return scale * np.einsum("bihd,bjhd->bhij", q64, kh, optimize=True)


def block_max_scores(q, k, *, causal=True, softmax_scale=None, block_m=BLOCK_M, block_n=BLOCK_N):
    """Per-tile maximum of the scaled scores.

    q: (B, Nq, Hq, D); k: (B, Nk, Hkv, D). Returns (B, Hq, nQ, nK) float64 with
    nQ = ceil(Nq / block_m), nK = ceil(Nk / block_n). Each entry is the maximum of
    ``softmax_scale * <q_i, k_j>`` over the *valid* (i, j) of that tile (causal mask applied, rows
    >= Nq and columns >= Nk never count), and -inf for a tile with no valid entry.
    ``causal=True`` is the default, bottom-right aligned as in :func:`attention`.
    """
    q64, k64 = as_float64(q, "q"), as_float64(k, "k")
    block_m, block_n = check_block(block_m, "block_m"), check_block(block_n, "block_n")
    B, Nq, Nk, Hq, Hkv, D = check_qk(q64, k64)
    scale = softmax_scale_or_default(softmax_scale, D)
    s = _scores(q64, k64, scale, Hq, Hkv)
    s = np.where(valid_mask(Nq, Nk, bool(causal)), s, -np.inf)
    return tile_reduce_max(s, block_m, block_n)


def gate(tile_max, thresholds, Nq, Nk, block_m, block_n):
    """keep (B, Hq, nQ, nK) from tile maxima and checked thresholds (None / 0-d / (Hq, T) float32)."""
    has_valid = tile_max > -np.inf
    if thresholds is None:
        return has_valid
    if thresholds.ndim == 0:
        thr = np.broadcast_to(np.float64(thresholds), tile_max.shape[1:3])  # (Hq, nQ)
    else:
        T = thresholds.shape[1]
        pos = np.clip(tile_positions(Nq, Nk, block_m), 0, T - 1)
        thr = thresholds[:, pos].astype(np.float64)  # (Hq, nQ)
    above = tile_max >= thr[None, :, :, None]
    diag = diagonal_tiles(Nq, Nk, block_m, block_n)[None, None]
    return has_valid & (diag | above)


def attention(
    q,
    k,
    v,
    thresholds=None,
    *,
    causal=True,
    softmax_scale=None,
    block_m=BLOCK_M,
    block_n=BLOCK_N,
    keep=None,
    return_lse=False,
    return_keep=False,
):
    """Block-sparse attention forward, computed exactly in float64.

    Shapes follow FlashAttention: q (B, Nq, Hq, D), k and v (B, Nk, Hkv, D), Hq a multiple of Hkv
    (GQA/MQA: query head h reads kv head h // (Hq // Hkv)). float16, bfloat16 (ml_dtypes),
    float32 and float64 inputs are accepted; everything is computed in float64.

    ``causal=True`` is the default here (BSFA is for causal prefill), unlike ``flash_attn_func``.
    The causal mask is aligned to the bottom-right corner, as in FlashAttention >= 2.1: (i, j) is
    valid iff j <= i + Nk - Nq, i.e. the queries are the last Nq positions of an Nk-long sequence.
    For Nq = 2, Nk = 5 (1 = valid)::

        1 1 1 1 0
        1 1 1 1 1

    and for Nq = 5, Nk = 2::

        0 0
        0 0
        0 0
        1 0
        1 1

    A row with no valid key (the first three above) or no *kept* valid key returns out = 0 and
    lse = -inf.

    Tiling and the gate: query tile a holds rows [a*block_m, (a+1)*block_m), key tile c holds keys
    [c*block_n, (c+1)*block_n). The tile maximum M is the maximum scaled score over the tile's
    valid entries (-inf if none; padding rows/columns never count). Key tiles overlapping query
    tile a's aligned span [a*block_m + Nk - Nq, min((a+1)*block_m, Nq) - 1 + Nk - Nq] (clipped into
    [0, Nk - 1]) are diagonal and always kept. Any other tile with a valid entry is kept iff
    M >= threshold, compared in float32 precision (strictly below is skipped). Query tile a sits at
    position p(a) = (a*block_m + Nk - Nq) // block_m and head h uses thresholds[h, clamp(p(a), 0, T-1)].

    Skipped tiles leave the softmax entirely: the output is the softmax over the kept valid
    scores only (renormalised), and lse covers the kept scores only.

    Args:
        thresholds: None (dense: every tile with a valid entry is kept), a scalar for all heads
            and tiles, or an (Hq, T) array (cast to float32). ±inf are allowed, NaN is an error.
        softmax_scale: defaults to 1 / sqrt(D).
        keep: optional (B, Hq, nQ, nK) bool mask to replay instead of the gate (for checking a
            kernel's reported mask); tiles with no valid entry stay dropped. Excludes ``thresholds``.

    Returns:
        out (B, Nq, Hq, D) float64, then lse (B, Hq, Nq) float64 natural-log logsumexp if
        ``return_lse``, then keep (B, Hq, nQ, nK) bool (the tiles that contributed) if
        ``return_keep``, in that order; a bare ``out`` when neither is asked for.
    """
    q64, k64 = as_float64(q, "q"), as_float64(k, "k")
    v64 = as_float64(v, "v")
    block_m, block_n = check_block(block_m, "block_m"), check_block(block_n, "block_n")
    B, Nq, Nk, Hq, Hkv, D = check_qk(q64, k64)
    check_v(v64, k64)
    scale = softmax_scale_or_default(softmax_scale, D)
    thr = check_thresholds(thresholds, Hq)
    nQ, nK = n_tiles(Nq, block_m), n_tiles(Nk, block_n)
    causal = bool(causal)

    s = _scores(q64, k64, scale, Hq, Hkv)  # (B, Hq, Nq, Nk)
    valid = valid_mask(Nq, Nk, causal)
    if keep is not None:
        if thr is not None:
            raise ValueError("pass either thresholds or keep (a tile mask to replay), not both")
        keep = _check_keep(keep, (B, Hq, nQ, nK))
        tiles = keep & tile_reduce_any(valid, block_m, block_n)[None, None]
    else:
        tile_max = tile_reduce_max(np.where(valid, s, -np.inf), block_m, block_n)
        tiles = gate(tile_max, thr, Nq, Nk, block_m, block_n)

    entries = valid & expand_tiles(tiles, Nq, Nk, block_m, block_n)
    s = np.where(entries, s, -np.inf)
    with np.errstate(divide="ignore", invalid="ignore"):
        lse = logsumexp(s, axis=-1)  # -inf for rows with nothing kept
        p = np.where(entries, np.exp(s - np.where(np.isfinite(lse), lse, 0.0)[..., None]), 0.0)
    group = Hq // Hkv
    vh = np.repeat(v64, group, axis=2)
    out = np.einsum("bhij,bjhd->bihd", p, vh, optimize=True)

    result = (out,)
    if return_lse:
        result += (lse,)
    if return_keep:
        result += (tiles,)
    return result[0] if len(result) == 1 else result


def _check_keep(keep, shape):
    if not isinstance(keep, np.ndarray):
        raise TypeError(f"keep: expected a numpy bool array of shape {shape}, got {type(keep).__name__}")
    if keep.dtype != np.bool_:
        raise TypeError(f"keep: expected dtype bool, got {keep.dtype}")
    if keep.shape != shape:
        raise ValueError(f"keep: expected shape {shape} (B, Hq, nQ, nK), got {keep.shape}")
    return keep
