"""Packed variable-length batches on the GPU: FlashAttention's varlen call, in one kernel launch."""
from __future__ import annotations

from bsfa_reference._validate import check_cu_seqlens_pair, check_max_seqlen, check_packed_shapes
from bsfa_reference.tiles import BLOCK_M, BLOCK_N

from . import _launch, _tma
from ._arrays import frame_for, on, to_cupy
from .device_thresholds import kernel_thresholds
from .ops import _check_dtypes, _check_grad, _check_out, _module, _positive_scale, _results, _same_device, _strides
from ._variants import as_backend

__all__ = ["attention_varlen"]

_INT32_MAX = 2**31 - 1


def attention_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, thresholds=None, *, max_seqlen_q=None, max_seqlen_k=None,
                     causal=True, softmax_scale=None, return_lse=False, return_keep=False, out=None,
                     backend="auto"):
    """Block-sparse attention over a packed batch of variable-length sequences, in one launch.

    The layout of ``flash_attn_varlen_func``: q (total_q, Hq, D), k and v (total_k, Hkv, D) on one
    GPU (any strides with a contiguous last dimension, rows 16-byte aligned); sequence s is rows
    [cu_seqlens_q[s], cu_seqlens_q[s+1]) of q and [cu_seqlens_k[s], cu_seqlens_k[s+1]) of k and v.
    ``cu_seqlens_q`` / ``cu_seqlens_k``: 1-D int32 arrays of num_seqs + 1 offsets on the inputs'
    GPU (0 first, non-decreasing, the packed length last). Semantics are exactly those of
    :func:`bsfa_reference.attention_varlen`: every sequence is :func:`attention` of that sequence
    alone (bottom-right causal alignment, tiles, diagonal rule and threshold positions restart at
    its first row and key; ``thresholds`` is shared by all); empty sequences are allowed, and a
    sequence with queries but no keys gives them out 0, lse -inf.

    One launch covers the batch without padding copies: a work tile per (query tile of the longest
    sequence, head, sequence) reads its sequence's offsets and ends at once past its end (a CTA of
    its own, or one step of the persistent warp-specialised kernel, which ``auto`` picks on Hopper
    as for :func:`attention`).

    The offsets are validated on the host (``bsfa_reference``'s check) from a device-to-host copy
    of both arrays (2 * (num_seqs + 1) int32): the call waits for the stream once, before the launch.
    The copy also gives the longest sequences, which size the grid; ``max_seqlen_q`` /
    ``max_seqlen_k`` (default: the longest) only widen the keep layout and must not be smaller than
    a real length, so giving them does not skip the copy.

    Args:
        thresholds, softmax_scale, backend: as in :func:`attention`.
        out: optional preallocated (total_q, Hq, D) output of the inputs' framework and dtype.

    Returns:
        out (total_q, Hq, D) in the input dtype, then lse (Hq, total_q) float32 if ``return_lse``,
        then keep (num_seqs, Hq, nQ, nK) bool if ``return_keep``, nQ = ceil(max_seqlen_q / 128),
        nK = ceil(max_seqlen_k / 64), False outside each sequence's own tiles.
    """
    _check_grad([("q", q), ("k", k), ("v", v)])
    frame = frame_for(q)
    with on(frame) as stream:
        qv, kv, vv = to_cupy(q, "q", frame), to_cupy(k, "k", frame), to_cupy(v, "v", frame)
        Hq, Hkv, D, dtype = _check_packed(qv, kv, vv)
        total_q, total_k = qv.shape[0], kv.shape[0]
        cu_q = to_cupy(cu_seqlens_q, "cu_seqlens_q", frame)
        cu_k = to_cupy(cu_seqlens_k, "cu_seqlens_k", frame)
        _same_device([qv, kv, vv, cu_q, cu_k], ["q", "k", "v", "cu_seqlens_q", "cu_seqlens_k"])
        S, max_q, max_k = plan(cu_q.get(), cu_k.get(), total_q, total_k, max_seqlen_q, max_seqlen_k)
        nQ, nK = -(-max_q // BLOCK_M), -(-max_k // BLOCK_N)
        _launch.check_grid(max(S, 1), Hq, nQ, BLOCK_M)
        backend = as_backend(backend)
        strides = _strides(qv, "q") + _strides(kv, "k") + _strides(vv, "v")
        scale = _positive_scale(softmax_scale, D)
        mode, thr_scalar, thr_arr, T = kernel_thresholds(thresholds, Hq, frame.device_id)
        shape = (total_q, Hq, D)
        if out is None:
            out_native, out_view = frame.empty(shape, dtype)
        else:
            out_native, out_view = out, _check_out(out, frame, shape, dtype, frame.device_id,
                                                        "(total_q, Hq, D)")
        o_strides = _strides(out_view, "out")
        lse_native, lse_view = frame.empty((Hq, total_q), "float32")
        keep_native, keep_view = frame.empty((S, Hq, nQ, nK), "bool") if return_keep else (None, None)

        mod = _module(backend, dtype, D, causal, frame.device_id)
        kern = mod.fwd_varlen
        if kern is None:
            raise ValueError(f"backend {backend.arch!r}: expected a kernel with a packed-batch entry, got "
                             f"{mod.key.name()}, which has none")
        if S and nQ:
            # the kernel indexes the offsets as a dense int32 vector
            cu_q, cu_k = _dense(cu_q), _dense(cu_k)
            params = _launch.pack(
                q=qv, k=kv, v=vv, out=out_view, lse=lse_view, keep=keep_view, thresholds=thr_arr,
                cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, **_row_stride_fields(strides + o_strides),
                Nq=max_q, Nk=max_k, Hq=Hq, Hkv=Hkv, thr_mode=mode, thr_T=T, thr_scalar=thr_scalar,
                softmax_scale=scale, total_q=total_q, B=S,
            )
            kern.launch(S, Hq, nQ, params, _packed_maps(kern, qv, kv, vv))
        frame.finish(stream)

    return _results(frame, (out_native, out_view), (lse_native, lse_view) if return_lse else None,
                    (keep_native, keep_view) if return_keep else None)


def _check_packed(qv, kv, vv):
    """Shapes of q (total_q, Hq, D), k and v (total_k, Hkv, D), refused as bsfa_reference.attention_varlen does."""
    Hq, Hkv, D = check_packed_shapes(qv.shape, kv.shape, vv.shape)
    dtype = _check_dtypes([("q", qv), ("k", kv), ("v", vv)], D)
    return Hq, Hkv, D, dtype


def _packed_maps(kern, qv, kv, vv) -> tuple:
    """The tensor maps of a TMA kernel: each packed (total, H, D) array as one batch element.

    A box starts at its sequence's first row and may run into the next sequence (the kernel masks,
    zeroes or never stores those rows: kernels_cu/bsfa_consumer_sm90ws.cuh); past the packed length
    the TMA reads zeros. With no key at all (total_k = 0) every sequence has Nk = 0 and no key box
    is ever loaded, but a map of zero rows cannot be encoded: q's map stands in for k and v.
    """
    if not kern.tma:
        return ()
    q_map = _tma.tensor_map(qv[None], kern.tma)
    if kv.shape[0] == 0:
        return q_map, q_map, q_map
    return q_map, _tma.tensor_map(kv[None], kern.tma), _tma.tensor_map(vv[None], kern.tma)


def _dense(cu):
    from ._backend import cupy

    return cupy().ascontiguousarray(cu)


def _row_stride_fields(strides):
    """The (sequence, head) strides of q, k, v, out as Params fields; packed arrays have no batch stride."""
    names = [f"{t}_{d}" for t in "qkvo" for d in ("sn", "sh")]
    return dict(zip(names, strides))


def plan(cu_q, cu_k, total_q: int, total_k: int, max_seqlen_q=None, max_seqlen_k=None) -> tuple[int, int, int]:
    """(num_seqs, max_seqlen_q, max_seqlen_k) of a packed batch from host copies of its offsets.

    Every check :func:`attention_varlen` makes of the offsets before its launch: the reference's
    (``check_cu_seqlens``: int32, 1-D, 0 first, non-decreasing, the packed length last, one length
    for both), ``max_seqlen_*`` not below a real length, and every length within the kernels' int32.
    """
    len_q, len_k = check_cu_seqlens_pair(cu_q, cu_k, total_q, total_k)
    max_q = check_max_seqlen(max_seqlen_q, int(len_q.max(initial=0)), "max_seqlen_q", "query sequence")
    max_k = check_max_seqlen(max_seqlen_k, int(len_k.max(initial=0)), "max_seqlen_k", "key sequence")
    if max(max_q, max_k, total_q, total_k) > _INT32_MAX:
        raise ValueError(f"attention_varlen: lengths must stay below 2**31 (the kernels' int32), got "
                         f"total_q={total_q}, total_k={total_k}, max_seqlen_q={max_q}, max_seqlen_k={max_k}")
    return len_q.size, max_q, max_k
