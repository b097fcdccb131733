"""Independent formulations of BSFA used to check ``bsfa_reference``.

Written from the specification, not from the reference code:

* :func:`online_softmax_attention` walks the problem tile by tile the way a FlashAttention kernel
  does: for every query tile it loops over the key tiles, computes the score tile, masks it,
  takes the tile maximum, gates the tile (diagonal, or maximum >= threshold), and folds kept tiles
  into a running row maximum / denominator / output accumulator (online softmax). All batch
  elements and heads are processed side by side (one "program" each), so the loops are over
  tiles only.
* :func:`dense_softmax_attention` is plain masked softmax attention with ``scipy.special``, one
  (batch, head) at a time, optionally restricted to an explicit entry mask.
"""
from __future__ import annotations

import math

import numpy as np
import scipy.special


def _scale(softmax_scale, D):
    return 1.0 / math.sqrt(D) if softmax_scale is None else float(softmax_scale)


def threshold_for(thresholds, h, position):
    """The float32-rounded threshold of head ``h`` at absolute query-tile ``position``, as a float
    (None when dense). Positions are clamped into the table."""
    if thresholds is None:
        return None
    t = np.asarray(thresholds, dtype=np.float32)
    if t.ndim == 0:
        return float(t)
    T = t.shape[1]
    return float(t[h, min(max(position, 0), T - 1)])


def diagonal_span(a, Nq, Nk, block_m):
    """Query tile ``a``'s aligned key span [lo, hi], clipped into [0, Nk - 1]."""
    first_row = a * block_m
    last_row = min(first_row + block_m, Nq) - 1
    lo = first_row + (Nk - Nq)
    hi = last_row + (Nk - Nq)
    return min(max(lo, 0), Nk - 1), min(max(hi, 0), Nk - 1)


def is_diagonal(a, c, Nq, Nk, block_m, block_n):
    """Key tile ``c`` overlaps query tile ``a``'s aligned span (interval overlap test)."""
    lo, hi = diagonal_span(a, Nq, Nk, block_m)
    first_key = c * block_n
    last_key = min(first_key + block_n, Nk) - 1
    return first_key <= hi and last_key >= lo


def position_of(a, Nq, Nk, block_m):
    """Absolute position p(a) = floor((a * block_m + Nk - Nq) / block_m), unclamped."""
    return math.floor((a * block_m + Nk - Nq) / block_m)


def online_softmax_attention(q, k, v, thresholds=None, *, causal=True, softmax_scale=None,
                             block_m=128, block_n=64, keep=None):
    """Tile-by-tile online-softmax BSFA forward.

    Returns (out (B, Nq, Hq, D), lse (B, Hq, Nq), keep (B, Hq, nQ, nK), tile_max (B, Hq, nQ, nK)),
    all float64 except keep (bool). ``keep`` given replays that mask instead of the gate.
    """
    q = np.asarray(q).astype(np.float64)
    k = np.asarray(k).astype(np.float64)
    v = np.asarray(v).astype(np.float64)
    B, Nq, Hq, D = q.shape
    Nk, Hkv = k.shape[1], k.shape[2]
    scale = _scale(softmax_scale, D)
    nQ, nK = -(-Nq // block_m), -(-Nk // block_n)
    kv_head = np.arange(Hq) // (Hq // Hkv)  # query head h reads kv head h // group

    # (B, Hq, N, D) per-head views, the layout a kernel program sees
    Qh = q.transpose(0, 2, 1, 3)
    Kh = k[:, :, kv_head, :].transpose(0, 2, 1, 3)
    Vh = v[:, :, kv_head, :].transpose(0, 2, 1, 3)

    out = np.zeros((B, Hq, Nq, D))
    lse = np.full((B, Hq, Nq), -np.inf)
    kept = np.zeros((B, Hq, nQ, nK), dtype=bool)
    tile_max = np.full((B, Hq, nQ, nK), -np.inf)

    for a in range(nQ):
        r0, r1 = a * block_m, min((a + 1) * block_m, Nq)
        rows = np.arange(r0, r1)
        Qa = Qh[:, :, r0:r1, :]
        thr = None
        if keep is None and thresholds is not None:
            p = position_of(a, Nq, Nk, block_m)
            thr = np.array([threshold_for(thresholds, h, p) for h in range(Hq)])  # (Hq,)

        m = np.full((B, Hq, r1 - r0), -np.inf)  # running row maximum
        l = np.zeros((B, Hq, r1 - r0))  # running denominator
        acc = np.zeros((B, Hq, r1 - r0, D))  # running unnormalised output

        for c in range(nK):
            c0, c1 = c * block_n, min((c + 1) * block_n, Nk)
            cols = np.arange(c0, c1)
            if causal:
                mask = cols[None, :] <= rows[:, None] + (Nk - Nq)
            else:
                mask = np.ones((r1 - r0, c1 - c0), dtype=bool)
            if not mask.any():
                continue  # nothing valid: tile max stays -inf and the tile never runs
            S = scale * np.matmul(Qa, Kh[:, :, c0:c1, :].transpose(0, 1, 3, 2))  # (B, Hq, r, c)
            S = np.where(mask, S, -np.inf)
            M = S.max(axis=(-2, -1))  # (B, Hq)
            tile_max[:, :, a, c] = M

            if keep is not None:
                use = np.asarray(keep[:, :, a, c], dtype=bool)
            elif thr is None:
                use = np.ones((B, Hq), dtype=bool)
            elif is_diagonal(a, c, Nq, Nk, block_m, block_n):
                use = np.ones((B, Hq), dtype=bool)
            else:
                use = M >= thr[None, :]
            kept[:, :, a, c] = use
            if not use.any():
                continue

            S = np.where(use[:, :, None, None], S, -np.inf)
            m_new = np.maximum(m, S.max(axis=-1))
            started = np.isfinite(m_new)
            m_ref = np.where(started, m_new, 0.0)
            alpha = np.where(started, np.exp(m - m_ref), 1.0)
            P = np.exp(S - m_ref[..., None])
            l = alpha * l + P.sum(axis=-1)
            acc = alpha[..., None] * acc + np.matmul(P, Vh[:, :, c0:c1, :])
            m = m_new

        nonempty = l > 0
        out[:, :, r0:r1, :] = np.where(nonempty[..., None], acc / np.where(nonempty, l, 1.0)[..., None], 0.0)
        lse[:, :, r0:r1] = np.where(nonempty, m + np.log(np.where(nonempty, l, 1.0)), -np.inf)

    return out.transpose(0, 2, 1, 3), lse, kept, tile_max


def valid_entries(Nq, Nk, causal):
    """(Nq, Nk) bool, bottom-right aligned causal mask (or all True)."""
    if not causal:
        return np.ones((Nq, Nk), dtype=bool)
    return np.tril(np.ones((Nq, Nk), dtype=bool), k=Nk - Nq)


def dense_softmax_attention(q, k, v, *, causal=True, softmax_scale=None, allowed=None):
    """Masked softmax attention with scipy, one (batch, head) at a time.

    ``allowed`` (B, Hq, Nq, Nk) bool further restricts the entries (e.g. an expanded tile mask).
    Rows with nothing left get out = 0 and lse = -inf. Returns (out (B, Nq, Hq, D), lse (B, Hq, Nq)).
    """
    q = np.asarray(q).astype(np.float64)
    k = np.asarray(k).astype(np.float64)
    v = np.asarray(v).astype(np.float64)
    B, Nq, Hq, D = q.shape
    Nk, Hkv = k.shape[1], k.shape[2]
    group = Hq // Hkv
    scale = _scale(softmax_scale, D)
    valid = valid_entries(Nq, Nk, causal)
    out = np.zeros((B, Nq, Hq, D))
    lse = np.full((B, Hq, Nq), -np.inf)
    for b in range(B):
        for h in range(Hq):
            s = scale * (q[b, :, h, :] @ k[b, :, h // group, :].T)
            mask = valid if allowed is None else valid & allowed[b, h]
            live = mask.any(axis=1)
            if not live.any():
                continue
            sm = np.where(mask[live], s[live], -np.inf)
            p = scipy.special.softmax(sm, axis=1)
            out[b, live, h, :] = p @ v[b, :, h // group, :]
            lse[b, h, live] = scipy.special.logsumexp(sm, axis=1)
    return out, lse
