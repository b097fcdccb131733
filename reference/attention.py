"""The exact float64 definition of block-sparse FlashAttention (BSFA) forward."""
from __future__ import annotations

import numpy as np

from ._memory import attention_bytes, block_max_bytes, check_memory
from ._validate import (
    check_array,
    check_block,
    check_flag,
    check_offsets,
    check_qk,
    check_thresholds,
    check_v,
    softmax_scale_or_default,
)
from .tiles import (
    BLOCK_M,
    BLOCK_N,
    diagonal_tiles_at,
    n_tiles,
    tile_positions_at,
    tile_reduce_any,
    tile_reduce_max,
    valid_mask_at,
)

#: q*k products held at once while the scores of non-finite inputs are classified (8 MiB)
NONFINITE_CHUNK = 2**20

_ATTENTION_WAY_OUT = ("pass fewer batch elements or heads per call (they are independent), shorter sequences, "
                      "or run it on the GPU with bsfa_cupy.attention")
_BLOCK_MAX_WAY_OUT = ("pass fewer batch elements or heads per call, take the maxima in bands of query rows, "
                      "or run it on the GPU with bsfa_cupy.block_max_scores")


def _dot_scores(q64, k64, scale, Hq, Hkv, rows_contiguous):
    """(B, Hq, Nq, Nk) float64 scaled scores; query head h reads kv head h // (Hq // Hkv)."""
    group = Hq // Hkv
    kh = np.repeat(k64, group, axis=2)  # GQA as an explicit gather, (B, Nk, Hq, D)
    s = np.einsum("bihd,bjhd->bhij", q64, kh, optimize=True)
    if rows_contiguous and not s.flags.c_contiguous:
        # einsum may hand back a transposed view; the softmax's row sums must run along
        # contiguous keys to round as scipy's logsumexp does
        return np.multiply(s, scale, order="C")
    s *= scale  # the same rounding as scale * s, without a second score array
    return s


def _scores(q64, k64, scale, Hq, Hkv, rows_contiguous=False):
    """Scaled scores with IEEE semantics, and whether they are known to be all finite.

    Finite inputs take the plain product; the bound |s| <= scale * D * max|q| * max|k| shows
    without a pass over the scores that none overflowed. Pairs touching a non-finite input are
    classified term by term (see _classify) rather than trusting BLAS with them: some BLAS skip
    zero multiplicands, which would turn inf * 0 = NaN into 0.
    """
    qf, kf = np.isfinite(q64), np.isfinite(k64)
    if qf.all() and kf.all():
        s = _dot_scores(q64, k64, scale, Hq, Hkv, rows_contiguous)
        with np.errstate(over="ignore"):
            bound = scale * q64.shape[-1] * float(np.abs(q64).max()) * float(np.abs(k64).max())
        return s, bool(bound < 1e300) or bool(np.isfinite(s).all())
    s = _dot_scores(np.where(qf, q64, 0.0), np.where(kf, k64, 0.0), scale, Hq, Hkv, rows_contiguous)
    group = Hq // Hkv
    Nq, Nk, D = q64.shape[1], k64.shape[1], q64.shape[3]
    rb, ri, rh = np.nonzero(~qf.all(axis=-1))  # query rows (b, i, h) with a non-finite entry
    step = max(1, NONFINITE_CHUNK // (Nk * D))
    for c in range(0, len(rb), step):
        b, i, h = rb[c:c + step], ri[c:c + step], rh[c:c + step]
        terms = q64[b, i, h][:, None, :] * k64[b, :, h // group]  # (rows, Nk, D)
        s[b, h, i] = _classify(terms)
    kb, kj, kh = np.nonzero(~kf.all(axis=-1))  # keys (b, j, kv head) with a non-finite entry
    step = max(1, NONFINITE_CHUNK // (Nq * group * D))
    for c in range(0, len(kb), step):
        b, j = kb[c:c + step, None], kj[c:c + step, None]
        heads = kh[c:c + step, None] * group + np.arange(group)  # (keys, group)
        terms = q64[b, :, heads] * k64[b, j, kh[c:c + step, None]][:, :, None, :]  # (keys, group, Nq, D)
        s[b, heads, :, j] = _classify(terms)
    return s, False


def _classify(terms):
    """The sum of products ``terms`` (..., D) that contain a non-finite one: NaN if a product is NaN
    (NaN input, inf * 0) or both +inf and -inf occur, else the sign of the infinite products
    (finite ones cannot cancel them). Independent of summation order, unlike a float sum."""
    nan = np.isnan(terms).any(axis=-1)
    pos = (terms == np.inf).any(axis=-1)
    neg = (terms == -np.inf).any(axis=-1)
    out = np.where(pos, np.inf, -np.inf)
    out[nan | (pos & neg)] = np.nan
    return out


def _check_inputs(q, k, causal, softmax_scale, block_m, block_n):
    check_array(q, "q")
    check_array(k, "k")
    block_m, block_n = check_block(block_m, "block_m"), check_block(block_n, "block_n")
    B, Nq, Nk, Hq, Hkv, D = check_qk(q, k)
    scale = softmax_scale_or_default(softmax_scale, D)
    return (B, Nq, Nk, Hq, Hkv, D), scale, check_flag(causal, "causal"), block_m, block_n


def _describe(B, Nq, Nk, Hq, Hkv, D):
    return f"B={B}, Nq={Nq}, Nk={Nk}, Hq={Hq}, Hkv={Hkv}, D={D}"


def block_max_scores(q, k, *, causal=True, softmax_scale=None, block_m=BLOCK_M, block_n=BLOCK_N, q_start=None,
                     k_start=0):
    """Per-tile maximum of the scaled scores.

    q: (B, Nq, Hq, D); k: (B, Nk, Hkv, D). Returns (B, Hq, nQ, nK) float64 with
    nQ = ceil(Nq / block_m), nK = ceil(Nk / block_n). Entry (a, c) is the maximum of
    ``softmax_scale * <q_i, k_j>`` over the tile's block_m x block_n box, where invalid entries
    (causal mask, rows >= Nq, columns >= Nk) count as -inf and NaN scores are ignored (IEEE
    maxNum, the kernels' fmaxf): -inf for a tile with no valid entry, NaN only when every entry of
    the box is valid and NaN. See :func:`attention` for non-finite inputs.
    ``causal=True`` is the default, bottom-right aligned as in :func:`attention`; ``q_start`` /
    ``k_start`` place the call in a longer sequence as in :func:`attention`, and then every entry
    is the same tile's entry of the unsplit call: -inf at the same tiles, other values up to the
    last bits (float64 BLAS rounds a dot product differently for different matrix shapes).

    Memory: about 8 bytes per score (one float64 (B, Hq, Nq, Nk) array) at the peak. Inputs
    estimated to need more than 4 GiB, or the byte count in the environment variable
    ``BSFA_REFERENCE_MAX_BYTES``, are refused with a ValueError before anything is allocated.
    """
    return _block_max(q, k, causal, softmax_scale, block_m, block_n, "bsfa_reference.block_max_scores",
                      q_start, k_start)


def _block_max(q, k, causal, softmax_scale, block_m, block_n, what, q_start=None, k_start=0):
    shape, scale, causal, block_m, block_n = _check_inputs(q, k, causal, softmax_scale, block_m, block_n)
    B, Nq, Nk, Hq, Hkv, D = shape
    q0, k0 = check_offsets(q_start, k_start, Nq, Nk, block_m, block_n)
    check_memory(block_max_bytes(B, Nq, Nk, Hq, Hkv, D, block_n), what, _describe(*shape), _BLOCK_MAX_WAY_OUT)
    s, _ = _scores(q.astype(np.float64), k.astype(np.float64), scale, Hq, Hkv)
    np.copyto(s, -np.inf, where=~valid_mask_at(Nq, Nk, causal, q0, k0))
    return tile_reduce_max(s, block_m, block_n)


def gate(tile_max, thresholds, Nq, Nk, block_m, block_n, *, causal, q_start=None, k_start=0):
    """keep (B, Hq, nQ, nK) from tile maxima (B, Hq, nQ, nK) and thresholds (as :func:`attention`).

    Candidates are the tiles with a valid entry (from the mask, never from the maximum); diagonal
    candidates are kept, the others iff M >= threshold (a NaN M is skipped). ``q_start`` /
    ``k_start`` as in :func:`attention`.
    """
    q0, k0 = check_offsets(q_start, k_start, Nq, Nk, block_m, block_n)
    tile_max = np.asarray(tile_max, dtype=np.float64)
    shape = (n_tiles(Nq, block_m), n_tiles(Nk, block_n))
    if tile_max.ndim != 4 or tile_max.shape[2:] != shape:
        raise ValueError(f"tile_max: expected shape (B, Hq, {shape[0]}, {shape[1]}), got {tile_max.shape}")
    thr = check_thresholds(thresholds, tile_max.shape[1])
    cand = tile_reduce_any(valid_mask_at(Nq, Nk, check_flag(causal, "causal"), q0, k0),
                           block_m, block_n)
    return _gate(tile_max, thr, cand, Nq, Nk, block_m, block_n, q0, k0)


def _gate(tile_max, thr, cand, Nq, Nk, block_m, block_n, q0, k0):
    if thr is None:
        return np.broadcast_to(cand, tile_max.shape).copy()
    if thr.ndim == 0:
        t = np.broadcast_to(np.float64(thr), tile_max.shape[1:3])  # (Hq, nQ)
    else:
        pos = np.clip(tile_positions_at(Nq, block_m, q0), 0, thr.shape[1] - 1)
        t = thr[:, pos].astype(np.float64)  # (Hq, nQ)
    above = tile_max >= t[None, :, :, None]  # False for a NaN maximum
    return cand & (diagonal_tiles_at(Nq, Nk, block_m, block_n, q0, k0) | above)


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
    q_start=None,
    k_start=0,
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

    Absolute positions (for split calls, e.g. context parallelism or split-KV): query row i sits
    at P_q(i) = q0 + i and key j at P_k(j) = k_start + j, where q0 = ``q_start``, or by default
    q0 = k_start + Nk - Nq (bottom-right: the queries end where the keys end; with k_start = 0
    this is the alignment above, negative positions included). Causal (i, j) is valid iff
    P_k(j) <= P_q(i); non-causal every pair is. An explicit ``q_start`` must be a multiple of
    block_m and ``k_start`` of block_n (both >= 0), so that the call's tiles are tiles of the full
    sequence; the default q0 needs no alignment.

    Tiling and the gate: query tile a holds rows [a*block_m, (a+1)*block_m), key tile c holds keys
    [c*block_n, (c+1)*block_n) (counted from the call's own row 0 and key 0). Tiles with a valid
    entry are the candidates. The tile maximum M is the maximum scaled score over the tile's valid
    entries (-inf if none; padding rows/columns never count). Query tile a's diagonal span is the
    absolute interval [q0 + a*block_m, q0 + min((a+1)*block_m, Nq) - 1], each end raised to 0 if
    negative; the call's key tiles whose absolute keys [k_start + c*block_n,
    k_start + min((c+1)*block_n, Nk) - 1] overlap it are diagonal (none if the span lies outside
    the call's keys), and diagonal candidates are always kept. With the default offsets the span
    is [a*block_m + Nk - Nq, min((a+1)*block_m, Nq) - 1 + Nk - Nq] clipped into [0, Nk - 1]. Any
    other candidate is kept iff M >= threshold, compared in float32 precision (strictly below is
    skipped). Query tile a sits at position p(a) = (q0 + a*block_m) // block_m (by default
    (a*block_m + Nk - Nq) // block_m) and head h uses thresholds[h, clamp(p(a), 0, T-1)].

    Split calls: cut the queries of a full call (q0 = k_start = 0, e.g. Nq = Nk) at multiples of
    block_m and the keys at multiples of block_n, call this function on every (query part, key
    part) pair with its offsets, and combine each query part's results over its key parts with
    :func:`merge_partials`: out and lse equal the full call's up to float64 rounding, and each
    part's keep is the full keep's block at (q_start // block_m, k_start // block_n), exactly
    unless a threshold lies within the last bits of a tile maximum (see :func:`block_max_scores`).
    A key part entirely after a causal query part has no valid entry: out 0, lse -inf, no tiles.

    Skipped tiles leave the softmax entirely: the output is the softmax over the kept valid
    scores only (renormalised), and lse covers the kept scores only.

    Non-finite inputs (the kernels' behaviour; they are tested against it):

    * Scores s = scale * <q_i, k_j> in IEEE float64: a NaN product (NaN input, inf * 0), or +inf
      and -inf products together, give NaN; otherwise infinite products give ±inf (as do finite
      products that overflow).
    * Candidates come from the mask alone. M is the fmax (NaN ignored) over the tile's whole
      block_m x block_n box with invalid entries as -inf: NaN only if the whole box is valid and
      NaN. A NaN M fails every threshold, -inf included (``thresholds=None`` keeps every
      candidate); diagonal candidates are kept whatever their M.
    * A row with a NaN or +inf among its kept valid scores gets out = NaN in every column and
      lse = NaN; kept -inf scores add exp(-inf) = 0 (only -inf: an empty row, out 0, lse -inf).
    * A non-finite v[b, j, g, d] makes out[b, i, h, d] NaN for every head h reading kv head g and
      every row i of every query tile that keeps j's key tile, including rows where j is masked
      and empty rows: the kernels multiply whole P and V tiles (0 * inf = NaN). Where every factor
      was positive the kernels may give ±inf instead; compare non-finite masks.
    * Everything else is as for finite inputs; ``keep`` replays follow the same rules.

    Args:
        thresholds: None (dense: every tile with a valid entry is kept), a scalar for all heads
            and tiles, or an (Hq, T) array (cast to float32). ±inf are allowed, NaN is an error.
        softmax_scale: a finite float > 0; defaults to 1 / sqrt(D).
        keep: optional (B, Hq, nQ, nK) bool mask to replay instead of the gate (for checking a
            kernel's reported mask); tiles with no valid entry stay dropped. Excludes ``thresholds``.
        q_start: None (bottom-right) or the absolute position of query row 0, an int >= 0 that is
            a multiple of block_m.
        k_start: the absolute position of key 0, an int >= 0 that is a multiple of block_n.

    Memory: about 17 bytes per score (B*Hq*Nq*Nk; two float64 arrays and a bool one) at the peak.
    Inputs estimated to need more than 4 GiB, or the byte count in the environment variable
    ``BSFA_REFERENCE_MAX_BYTES``, are refused with a ValueError before anything is allocated.

    Returns:
        out (B, Nq, Hq, D) float64, then lse (B, Hq, Nq) float64 natural-log logsumexp if
        ``return_lse``, then keep (B, Hq, nQ, nK) bool (the tiles that contributed) if
        ``return_keep``, in that order; a bare ``out`` when neither is asked for.
    """
    shape, scale, causal, block_m, block_n = _check_inputs(q, k, causal, softmax_scale, block_m, block_n)
    B, Nq, Nk, Hq, Hkv, D = shape
    check_array(v, "v")
    check_v(v, k)
    q0, k0 = check_offsets(q_start, k_start, Nq, Nk, block_m, block_n)
    thr = check_thresholds(thresholds, Hq)
    nQ, nK = n_tiles(Nq, block_m), n_tiles(Nk, block_n)
    if keep is not None:
        if thr is not None:
            raise ValueError("pass either thresholds or keep (a tile mask to replay), not both")
        keep = _check_keep(keep, (B, Hq, nQ, nK))
    check_memory(attention_bytes(B, Nq, Nk, Hq, Hkv, D, block_n), "bsfa_reference.attention", _describe(*shape),
                 _ATTENTION_WAY_OUT)

    s, finite = _scores(q.astype(np.float64), k.astype(np.float64), scale, Hq, Hkv, rows_contiguous=True)
    valid = valid_mask_at(Nq, Nk, causal, q0, k0)
    np.copyto(s, -np.inf, where=~valid)
    cand = tile_reduce_any(valid, block_m, block_n)
    if keep is not None:
        tiles = keep & cand
    else:
        tiles = _gate(tile_reduce_max(s, block_m, block_n), thr, cand, Nq, Nk, block_m, block_n, q0, k0)
    skipped = tiles[..., np.arange(Nq)[:, None] // block_m, np.arange(Nk)[None, :] // block_n]
    np.logical_not(skipped, out=skipped)
    np.copyto(s, -np.inf, where=skipped)  # from here on only kept valid entries are above -inf
    del skipped
    poisoned = None
    if not finite:
        with np.errstate(invalid="ignore"):
            poisoned = ~(s.max(axis=-1) < np.inf)  # a NaN or +inf kept valid score
        s[poisoned] = -np.inf
    lse, p = _softmax(s)
    del s

    v64 = v.astype(np.float64)
    vf = np.isfinite(v64)
    v_finite = bool(vf.all())
    if not v_finite:
        v64 = np.where(vf, v64, 0.0)  # marked explicitly below, not left to BLAS
    vh = np.repeat(v64, Hq // Hkv, axis=2)
    out = np.einsum("bhij,bjhd->bihd", p, vh, optimize=True)
    del p, vh
    if poisoned is not None:
        lse[poisoned] = np.nan
        out[poisoned.transpose(0, 2, 1)] = np.nan
    if not v_finite:
        out[_v_poisoned(~vf, tiles, Nq, Hq, block_m, block_n)] = np.nan

    result = (out,)
    if return_lse:
        result += (lse,)
    if return_keep:
        result += (tiles,)
    return result[0] if len(result) == 1 else result


def _softmax(s):
    """lse over the last axis and p = exp(s - lse), overwriting ``s`` (-inf entries are not in it).

    The same float operations as scipy.special.logsumexp (>= 1.15: the maximal terms split off,
    log1p of the rest) but without its five score-sized temporaries; rows of -inf give lse -inf
    and p 0.
    """
    m = s.max(axis=-1, keepdims=True)
    empty = m == -np.inf
    t = s - np.where(empty, 0.0, m)
    at_max = t == 0  # s == m
    count = at_max.sum(axis=-1, keepdims=True).astype(np.float64)
    np.copyto(t, -np.inf, where=at_max)
    del at_max
    np.exp(t, out=t)
    rest = t.sum(axis=-1, keepdims=True)
    rest = np.where(rest == 0, rest, rest / np.where(empty, 1.0, count))
    with np.errstate(divide="ignore"):
        lse = np.log1p(rest) + np.log(count) + m
    lse[empty] = -np.inf
    lse = lse[..., 0]
    np.subtract(s, np.where(empty[..., 0], 0.0, lse)[..., None], out=t)
    np.exp(t, out=t)
    return lse, t


def _v_poisoned(v_bad, tiles, Nq, Hq, block_m, block_n):
    """(B, Nq, Hq, D) bool: out entries a non-finite v reaches through a kept tile's P @ V."""
    B, Nk, Hkv, D = v_bad.shape
    bad_tile = np.logical_or.reduceat(v_bad, np.arange(0, Nk, block_n), axis=1)  # (B, nK, Hkv, D)
    bad_tile = bad_tile[:, :, np.arange(Hq) // (Hq // Hkv)].transpose(0, 2, 1, 3)  # (B, Hq, nK, D)
    hits = np.matmul(tiles.astype(np.float64), bad_tile.astype(np.float64)) > 0  # (B, Hq, nQ, D)
    return hits[:, :, np.arange(Nq) // block_m].transpose(0, 2, 1, 3)


def _check_keep(keep, shape):
    if not isinstance(keep, np.ndarray):
        raise TypeError(f"keep: expected a numpy bool array of shape {shape}, got {type(keep).__name__}")
    if keep.dtype != np.bool_:
        raise TypeError(f"keep: expected dtype bool, got {keep.dtype}")
    if keep.shape != shape:
        raise ValueError(f"keep: expected shape {shape} (B, Hq, nQ, nK), got {keep.shape}")
    return keep
