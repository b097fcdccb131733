"""Packed variable-length batches (FlashAttention's varlen call) on top of :func:`attention`."""
from __future__ import annotations

import numpy as np

from ._memory import attention_varlen_bytes, check_memory
from ._validate import (
    check_array,
    check_block,
    check_cu_seqlens_pair,
    check_flag,
    check_max_seqlen,
    check_packed_shapes,
    check_thresholds,
    softmax_scale_or_default,
)
from .attention import _check_keep, attention
from .tiles import BLOCK_M, BLOCK_N, n_tiles

_WAY_OUT = ("split the sequences over several calls, pass fewer heads per call (they are independent), "
            "or run it on the GPU")


def _check_packed(q, k, v):
    """Shapes of q (total_q, Hq, D), k and v (total_k, Hkv, D); returns (Hq, Hkv, D)."""
    check_array(q, "q")
    check_array(k, "k")
    check_array(v, "v")
    return check_packed_shapes(q.shape, k.shape, v.shape)


def attention_varlen(
    q,
    k,
    v,
    cu_seqlens_q,
    cu_seqlens_k,
    thresholds=None,
    *,
    max_seqlen_q=None,
    max_seqlen_k=None,
    causal=True,
    softmax_scale=None,
    block_m=BLOCK_M,
    block_n=BLOCK_N,
    keep=None,
    return_lse=False,
    return_keep=False,
):
    """Block-sparse attention forward over a packed batch of variable-length sequences.

    Layout of ``flash_attn_varlen_func``: q (total_q, Hq, D), k and v (total_k, Hkv, D); sequence
    s is rows [cu_seqlens_q[s], cu_seqlens_q[s+1]) of q and [cu_seqlens_k[s], cu_seqlens_k[s+1])
    of k and v. ``cu_seqlens_q`` / ``cu_seqlens_k`` are 1-D int32 NumPy arrays of num_seqs + 1
    offsets (0 first, non-decreasing, the packed length last), of the same length.

    Each sequence is exactly :func:`attention` of that sequence alone (B = 1): the causal
    alignment (bottom-right), tiles, diagonal rule and threshold positions p(a) all restart at the
    sequence's first row and key, and ``thresholds`` (None, a scalar or (Hq, T)) is shared by
    every sequence. Empty sequences are allowed: Nq = 0 contributes nothing; Nq > 0 with Nk = 0
    (which :func:`attention` refuses) gives its rows out = 0 and lse = -inf, like any row with no
    valid key, and no tiles.

    ``max_seqlen_q`` / ``max_seqlen_k`` (default: the longest sequence) size the keep layout; they
    must be >= every sequence's length and may be larger. ``keep`` replays a
    (num_seqs, Hq, max_nQ, max_nK) bool mask instead of the gate (excludes ``thresholds``); entries
    outside a sequence's own tiles are ignored.

    Memory: sequences run one at a time; the largest one's :func:`attention` peak plus the packed
    outputs must fit the bound of :func:`attention`, else ValueError before any work.

    Returns:
        out (total_q, Hq, D) float64, then lse (Hq, total_q) float64 if ``return_lse``, then keep
        (num_seqs, Hq, max_nQ, max_nK) bool if ``return_keep`` (max_nQ = ceil(max_seqlen_q /
        block_m), max_nK = ceil(max_seqlen_k / block_n); False outside a sequence's own
        ceil(Nq / block_m) x ceil(Nk / block_n) tiles); a bare ``out`` when neither is asked for.
    """
    Hq, Hkv, D = _check_packed(q, k, v)
    block_m, block_n = check_block(block_m, "block_m"), check_block(block_n, "block_n")
    scale = softmax_scale_or_default(softmax_scale, D)
    causal = check_flag(causal, "causal")
    total_q, total_k = q.shape[0], k.shape[0]
    len_q, len_k = check_cu_seqlens_pair(cu_seqlens_q, cu_seqlens_k, total_q, total_k)
    num_seqs = len_q.size
    max_q = check_max_seqlen(max_seqlen_q, int(len_q.max(initial=0)), "max_seqlen_q", "query sequence")
    max_k = check_max_seqlen(max_seqlen_k, int(len_k.max(initial=0)), "max_seqlen_k", "key sequence")
    nQ, nK = n_tiles(max_q, block_m), n_tiles(max_k, block_n)
    thr = check_thresholds(thresholds, Hq)
    if keep is not None:
        if thr is not None:
            raise ValueError("pass either thresholds or keep (a tile mask to replay), not both")
        keep = _check_keep(keep, (num_seqs, Hq, nQ, nK))
    need, at = attention_varlen_bytes(len_q, len_k, Hq, Hkv, D, nQ, nK, block_n)
    shapes = (f"num_seqs={num_seqs}, total_q={total_q}, total_k={total_k}, Hq={Hq}, Hkv={Hkv}, D={D}"
              + (f" (longest work: sequence {at}, Nq={int(len_q[at])}, Nk={int(len_k[at])})" if at >= 0 else ""))
    check_memory(need, "bsfa_reference.attention_varlen", shapes, _WAY_OUT)

    out = np.zeros((total_q, Hq, D), dtype=np.float64)
    lse = np.full((Hq, total_q), -np.inf, dtype=np.float64)
    tiles = np.zeros((num_seqs, Hq, nQ, nK), dtype=bool)
    starts_q, starts_k = cu_seqlens_q[:-1].tolist(), cu_seqlens_k[:-1].tolist()
    for s, (q0, k0, Nq, Nk) in enumerate(zip(starts_q, starts_k, len_q.tolist(), len_k.tolist())):
        if Nq == 0 or Nk == 0:  # nothing, or rows with no key: the 0 / -inf already there
            continue
        sq, sk = n_tiles(Nq, block_m), n_tiles(Nk, block_n)
        o, l, t = attention(
            q[q0:q0 + Nq][None], k[k0:k0 + Nk][None], v[k0:k0 + Nk][None], thr,
            causal=causal, softmax_scale=scale, block_m=block_m, block_n=block_n,
            keep=None if keep is None else keep[s:s + 1, :, :sq, :sk],
            return_lse=True, return_keep=True,
        )
        out[q0:q0 + Nq] = o[0]
        lse[:, q0:q0 + Nq] = l[0]
        tiles[s, :, :sq, :sk] = t[0]

    result = (out,)
    if return_lse:
        result += (lse,)
    if return_keep:
        result += (tiles,)
    return result[0] if len(result) == 1 else result
