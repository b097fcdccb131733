"""The public GPU API: block-sparse attention and tile maxima on any framework's GPU arrays."""
from __future__ import annotations

import functools
from dataclasses import dataclass

from bsfa_reference._validate import check_offsets, check_qk, check_v, softmax_scale_or_default

from bsfa_reference.tiles import BLOCK_M, BLOCK_N

from . import _launch, _splitkv, _tma
from ._arrays import frame_for, framework_of, on, to_cupy
from ._kernels import compute_capability, get_module, get_splitkv_module, sm_count
from ._variants import DTYPES, HEAD_DIMS, Backend, as_backend, select
from .device_thresholds import kernel_thresholds

__all__ = ["Backend", "attention", "block_max_scores", "clear_plan_cache"]

_ALIGN = 16  # cp.async moves 16-byte rows
_INT32_MAX = 2**31 - 1  # the kernels hold positions in int32


def _dtype_name(x, name):
    dt = str(x.dtype)
    if dt not in DTYPES:
        raise TypeError(f"{name}: expected dtype float16 or bfloat16, got {dt}")
    return dt


def _check_grad(arrays):
    for name, x in arrays:
        if framework_of(x) == "torch" and x.requires_grad:
            import torch

            if torch.is_grad_enabled():
                raise ValueError(
                    f"{name}: requires_grad=True with grad mode on, but bsfa_cupy is forward-only (no backward); "
                    "call it under torch.no_grad() / torch.inference_mode() or pass tensors .detach()ed"
                )


def _strides(x, name):
    """Element strides of a 4-D view whose last dim is contiguous and rows 16-byte aligned."""
    item = x.dtype.itemsize
    if x.size == 0:  # nothing is read or written: any strides (CuPy gives empty arrays zero strides)
        return [0] * (x.ndim - 1)
    if x.strides[-1] != item and x.shape[-1] != 1:
        raise ValueError(
            f"{name}: expected a contiguous last dimension (stride {item} bytes), got strides {x.strides} "
            f"for shape {x.shape}; pass .contiguous() / cupy.ascontiguousarray"
        )
    bad = [s for s in x.strides[:-1] if s % _ALIGN] + ([x.data.ptr] if x.data.ptr % _ALIGN else [])
    if bad:
        raise ValueError(
            f"{name}: rows must start on {_ALIGN}-byte boundaries (data pointer and batch/seq/head strides "
            f"multiples of {_ALIGN} bytes), got pointer {x.data.ptr:#x}, strides {x.strides}"
        )
    return [s // item for s in x.strides[:-1]]


def _same_device(views, names):
    ids = [v.device.id for v in views]
    if len(set(ids)) > 1:
        got = ", ".join(f"{n} on cuda:{i}" for n, i in zip(names, ids))
        raise ValueError(f"all arrays must be on one GPU, got {got}")


def _check_out(out, frame, shape, dtype, device_id, layout="(B, Nq, Hq, D)"):
    if framework_of(out) != framework_of_frame(frame):
        raise TypeError(f"out: expected a {frame.kind} array like the inputs, got {type(out).__name__}")
    if frame.kind == "jax":
        raise TypeError("out: JAX arrays are immutable; call without out= and use the returned array")
    view = to_cupy(out, "out", frame)
    if tuple(view.shape) != shape:
        raise ValueError(f"out: expected shape {shape} {layout}, got {tuple(view.shape)}")
    if str(view.dtype) != dtype:
        raise TypeError(f"out: expected dtype {dtype} (the inputs' dtype), got {view.dtype}")
    if view.device.id != device_id:
        raise ValueError(f"out: expected an array on cuda:{device_id} (the inputs' GPU), got cuda:{view.device.id}")
    return view


def framework_of_frame(frame):
    return "cupy" if frame.kind == "dlpack" else frame.kind


def attention(q, k, v, thresholds=None, *, causal=True, softmax_scale=None, return_lse=False,
              return_keep=False, out=None, backend="auto", q_start=None, k_start=0, num_splits=None):
    """Block-sparse FlashAttention forward on the GPU (semantics of ``bsfa_reference.attention``).

    q: (B, Nq, Hq, D), k and v: (B, Nk, Hkv, D), float16 or bfloat16, D in {64, 128}, on one GPU,
    any strides with a contiguous last dimension. CuPy arrays, torch CUDA tensors and JAX GPU
    arrays are taken zero-copy and the results come back in the caller's array type, allocated by
    its framework. The kernel runs on the caller's stream: CuPy's current stream, torch's current
    stream of the device; JAX inputs are waited for and the result is ready when returned.

    ``causal=True`` is the default (BSFA targets causal prefill), bottom-right aligned like
    FlashAttention >= 2.1 — see :func:`bsfa_reference.attention` for the mask drawn for Nq != Nk.
    Tiles are fixed at 128 queries x 64 keys.

    ``q_start`` / ``k_start`` place the call in a longer sequence (split calls: context
    parallelism, split-KV, chunked prefill), exactly as in :func:`bsfa_reference.attention`: query
    row i sits at absolute position q_start + i and key j at k_start + j; the causal mask, the
    diagonal tiles and the threshold positions follow from those positions, so a full call cut at
    multiples of 128 queries and 64 keys gives, merged with :func:`bsfa_reference.merge_partials`,
    the full call's output and keep blocks. An explicit ``q_start`` must be a multiple of 128 and
    ``k_start`` of 64 (ints >= 0); ``q_start=None`` is bottom-right (k_start + Nk - Nq), the
    default behaviour.

    Args:
        thresholds: None (dense), a scalar, or an (Hq, T) array — host NumPy (copied, cast to
            float32) or a float32 device array of any of the three frameworks. Query tile a of head h
            uses thresholds[h, clamp(p(a), 0, T - 1)], p(a) = (q_start + 128a) // 128 (by default
            (128a + Nk - Nq) // 128). A device array is checked for NaN with one small reduction,
            which waits for the stream; a :class:`DeviceThresholds`, validated once when built,
            skips that check (per-layer loops).
        q_start, k_start: the absolute positions of query row 0 and key 0 (see above).
        out: optional preallocated (B, Nq, Hq, D) output of the inputs' framework and dtype.
        backend: "auto" (on compute capability 9.0 for head dims 64 and 128 the warp-specialised
            TMA/wgmma kernel, or the one-warpgroup wgmma kernel where NVIDIA's cuda-bindings is
            missing; else the mma.sync one; few query rows against long keys take the split-KV
            kernel, see below), "sm80" (mma.sync, any GPU of compute capability >= 8.0),
            "sm90" / "sm90ws" (the two wgmma kernels; an error elsewhere), "splitkv" (the split-KV
            kernel, any GPU of compute capability >= 8.0, head dims 64 and 128), or a
            :class:`Backend` carrying extra compile-time defines.
        num_splits: None (a heuristic from the SM count) or an int >= 1: how many CTAs share the
            key tiles of one query tile in the split-KV kernels. Giving it selects a split kernel
            (``backend`` "auto" or "splitkv", or "sm90ws" for that kernel's own split entry); for
            tests and benchmarks.

    Split-KV (decode, chunked prefill): with ``backend="auto"``, head dims 64 and 128 and
    Nk >= 2048, calls with Nq <= 64, or whose B * Hq * ceil(Nq / 128) query tiles would not fill
    the GPU, run a kernel that packs the query heads of a GQA group into one CTA and splits the
    key tiles of each query tile over several CTAs, merging their fp32 partials by the rule of
    :func:`bsfa_reference.merge_partials`. On Hopper, such calls with Nq >= 33 (where a split CTA
    would hold one head's rows), or Nq >= 17 with GQA groups of an even size, take the warp-specialised
    kernel's split entry instead: one head per 128-row tile (two heads of a group for Nq <= 64, each
    deciding its own gates), the key blocks split over its persistent grid (unsplit where its tiles fill
    the GPU as they are). Semantics are unchanged: the gate is still decided per
    (head, 128-row query tile, 64-key tile); out and lse depend on the split count only through
    fp32 rounding of the merge, keep not at all.

    Repeated calls of one layout (a decode loop, a model's layers): ``plan = AttentionPlan(q, k, v,
    thresholds, ...)`` with this function's arguments runs all of the above once, and
    ``plan.run(q, k, v)`` per call only checks the arrays' type, shape, strides, dtype, device and
    alignment, allocates the outputs and launches: the same kernel and Params, so bitwise the same
    results, at a fraction of the host time (torch and CuPy arrays; see :class:`AttentionPlan`).
    This function keeps such plans itself (the last 32 layouts; :func:`clear_plan_cache` drops
    them) for torch and CuPy calls with thresholds None, a scalar or a :class:`DeviceThresholds`,
    without ``out`` or ``return_keep``; other calls take the full path every time.

    Calibration and decode: the threshold of a query tile is that of its absolute position
    (q_start + 128a) // 128, so a decode step (one row at position P) uses the threshold of
    prefill tile P // 128. Thresholds calibrated on prefill compare against the maximum over 128
    query rows of a tile, while a decode tile's maximum runs over the few rows of the call (one,
    for plain decode), which is lower: fewer gated tiles pass the same threshold, i.e. decode skips
    more than the prefill it was calibrated on. Check quality at decode before relying on prefill
    thresholds there (or calibrate thresholds for decode separately).

    Returns:
        out (input dtype), then lse (B, Hq, Nq) float32 if ``return_lse``, then keep
        (B, Hq, nQ, nK) bool if ``return_keep``. Rows with no kept valid key give 0 and -inf.
    """
    if out is None and not return_keep:
        from . import _plan_cache  # imports plan, which imports this module

        res = _plan_cache.run(q, k, v, thresholds, causal, softmax_scale, return_lse, backend, q_start, k_start,
                              num_splits)
        if res is not None:
            return res
    return _attention(q, k, v, thresholds, causal=causal, softmax_scale=softmax_scale, return_lse=return_lse,
                      return_keep=return_keep, out=out, backend=backend, q_start=q_start, k_start=k_start,
                      num_splits=num_splits)


def _attention(q, k, v, thresholds=None, *, causal=True, softmax_scale=None, return_lse=False, return_keep=False,
               out=None, backend="auto", q_start=None, k_start=0, num_splits=None):
    """attention without the kept plans: every check, view and allocation on each call."""
    num_splits, backend = _call_args(q, k, v, q_start, k_start, num_splits, backend)
    frame = frame_for(q)
    with on(frame) as stream:
        qv, kv, vv = to_cupy(q, "q", frame), to_cupy(k, "k", frame), to_cupy(v, "v", frame)
        prob = _problem(frame, qv, kv, vv, thresholds, softmax_scale, backend, num_splits, q_start, k_start)
        (out_native, out_view), (lse_native, lse_view), (keep_native, keep_view) = _outputs(prob, out, return_keep)
        fields = _output_fields(out_view, lse_view, keep_view)
        target = _target(prob, backend, causal, num_splits, keep=return_keep)
        if target.mod is not None:
            maps = ()
            if target.split.ws:
                rows = _splitkv.ws_box_rows(target.mod, target.split)
                maps = tuple(_tma.tensor_map(x, r) for x, r in zip((qv, kv, vv), rows))
            _splitkv.launch(target.mod, frame, prob.params(fields), target.split, prob.B, prob.Nq, prob.Hq,
                            prob.Hkv, prob.D, _launch.pack, maps)
        elif target.kern is not None:
            kern = target.kern
            maps = tuple(_tma.tensor_map(x, r) for x, r in zip((qv, kv, vv), kern.box_rows())) if kern.tma else ()
            kern.launch(prob.B, prob.Hq, prob.nQ, _launch.pack(**prob.params(fields)), maps)
        frame.finish(stream)

    return _results(frame, (out_native, out_view), (lse_native, lse_view) if return_lse else None,
                    (keep_native, keep_view) if return_keep else None)


def clear_plan_cache() -> None:
    """Drop the plans :func:`attention` and :func:`block_max_scores` keep by layout (and the split-KV partials
    they hold)."""
    from . import _plan_cache

    _plan_cache.clear()


def _call_args(q, k, v, q_start, k_start, num_splits, backend):
    """attention's checks before any array is touched: (num_splits, Backend)."""
    _check_grad([("q", q), ("k", k), ("v", v)])
    _check_offset_args(q_start, k_start)
    num_splits = _splitkv.check_num_splits(num_splits)
    backend = as_backend(backend)
    if num_splits is not None and backend.arch not in ("auto", "splitkv", "sm90ws"):
        raise ValueError(
            "num_splits: applies to the split-KV kernels (backend 'auto', 'splitkv' or 'sm90ws'), got backend "
            f"{backend.arch!r}"
        )
    return num_splits, backend


@dataclass
class _Problem:
    """One attention call's arrays checked: sizes, the route (split-KV or not), and the Params fields that
    do not depend on the outputs. Shared by ``attention`` and ``AttentionPlan`` so both validate alike."""

    frame: object
    B: int
    Nq: int
    Nk: int
    Hq: int
    Hkv: int
    D: int
    dtype: str
    nQ: int
    nK: int
    split: bool
    fields: dict  # q, k, v, thresholds, their strides, sizes, positions, scale

    @property
    def out_shape(self):
        return (self.B, self.Nq, self.Hq, self.D)

    @property
    def lse_shape(self):
        return (self.B, self.Hq, self.Nq)

    def params(self, outputs: dict) -> dict:
        """The Params fields of a call given its outputs' (from ``_output_fields``)."""
        return {**self.fields, **outputs}


def _problem(frame, qv, kv, vv, thresholds, softmax_scale, backend, num_splits, q_start, k_start) -> _Problem:
    B, Nq, Nk, Hq, Hkv, D, dtype = _check_qkv(qv, kv, vv)
    k0, shift = positions(q_start, k_start, Nq, Nk)
    nQ, nK = -(-Nq // BLOCK_M), -(-Nk // BLOCK_N)
    _launch.check_grid(B, Hq, nQ, BLOCK_M)
    _same_device([qv, kv, vv], ["q", "k", "v"])
    split = _splitkv.wanted(backend.arch, num_splits, B, Nq, Nk, Hq, D, sm_count(frame.device_id))
    strides = _strides(qv, "q") + _strides(kv, "k") + _strides(vv, "v")
    scale = _positive_scale(softmax_scale, D)
    mode, thr_scalar, thr_arr, T = kernel_thresholds(thresholds, Hq, frame.device_id)
    fields = dict(
        q=qv, k=kv, v=vv, thresholds=thr_arr, **_stride_fields("qkv", strides), Nq=Nq, Nk=Nk, Hq=Hq, Hkv=Hkv, B=B,
        thr_mode=mode, thr_T=T, thr_scalar=thr_scalar, softmax_scale=scale, k_start=k0, qk_shift=shift,
    )
    return _Problem(frame, B, Nq, Nk, Hq, Hkv, D, dtype, nQ, nK, split, fields)


def _outputs(prob: _Problem, out, return_keep: bool):
    """(native, view) pairs of out (given and checked, or allocated), lse and keep ((None, None) unless asked)."""
    frame = prob.frame
    if out is None:
        out_pair = frame.empty(prob.out_shape, prob.dtype)
    else:
        out_pair = out, _check_out(out, frame, prob.out_shape, prob.dtype, frame.device_id)
    _strides(out_pair[1], "out")  # checked before anything else is allocated
    lse_pair = frame.empty(prob.lse_shape, "float32")
    keep_pair = frame.empty((prob.B, prob.Hq, prob.nQ, prob.nK), "bool") if return_keep else (None, None)
    return out_pair, lse_pair, keep_pair


def _output_fields(out_view, lse_view, keep_view) -> dict:
    return dict(out=out_view, lse=lse_view, keep=keep_view, **_stride_fields("o", _strides(out_view, "out")))


@dataclass
class _Target:
    """What a call launches: the unsplit forward kernel, or the split-KV module and its plan, or nothing
    (an empty split-KV call)."""

    kern: object = None
    mod: object = None  # the split-KV module, or the sm90ws module for a ws plan
    split: object = None  # _splitkv.Plan


def _target(prob: _Problem, backend, causal, num_splits, keep: bool = False) -> _Target:
    dev = prob.frame.device_id
    if prob.split:
        cc = compute_capability(dev)
        gated = prob.fields["thr_mode"] != 0
        if _splitkv.ws_wanted(backend.arch, prob.Nq, prob.Hq // prob.Hkv, cc == "90" and _tma.available()):
            mod = _module(_ws_backend(backend), prob.dtype, prob.D, causal, dev)
            if prob.B * prob.Hq * prob.Nq == 0:
                return _Target()
            plan = _splitkv.plan(prob.B, prob.Nq, prob.Nk, prob.Hq, prob.Hkv, sm_count(dev), num_splits, gated,
                                 ws=True, head_pairs=mod.split_head_pairs(gated))
            if plan.splits == 1 and num_splits is None:  # the tiles fill the GPU as they are: no merge
                return _Target(kern=mod.forward(gated, prob.Hq // prob.Hkv, prob.nQ, keep))
            return _Target(mod=mod, split=plan)
        key = select(_splitkv_backend(backend), prob.dtype, prob.D, causal, cc)
        if prob.B * prob.Hq * prob.Nq == 0:
            return _Target()
        mod = get_splitkv_module(key, _splitkv_backend(backend), dev)
        plan = _splitkv.plan(prob.B, prob.Nq, prob.Nk, prob.Hq, prob.Hkv, sm_count(dev), num_splits, gated)
        return _Target(mod=mod, split=plan)
    mod = _module(backend, prob.dtype, prob.D, causal, dev)
    return _Target(kern=mod.forward(prob.fields["thr_mode"] != 0, prob.Hq // prob.Hkv, prob.nQ, keep))


def block_max_scores(q, k, *, causal=True, softmax_scale=None, backend="auto", q_start=None, k_start=0):
    """Per-tile maxima of the scaled scores on the GPU, without materialising the N x N scores.

    q: (B, Nq, Hq, D), k: (B, Nk, Hkv, D) as in :func:`attention`. Returns (B, Hq, nQ, nK) float32
    in the caller's array type: the maximum of ``softmax_scale * <q_i, k_j>`` over each
    (128-query x 64-key) tile's valid entries, -inf where a tile has none (the reference's
    ``bsfa_reference.block_max_scores`` rounded to float32). ``causal=True`` is the default;
    ``backend``, ``q_start`` and ``k_start`` as in :func:`attention`.

    Torch and CuPy calls run through a :class:`~bsfa_cupy.block_max_plan.BlockMaxPlan` kept per layout (with
    :func:`attention`'s, dropped by :func:`clear_plan_cache`): bitwise the same maxima, a fraction of the host time.
    """
    from . import _plan_cache  # imports block_max_plan, which imports this module

    res = _plan_cache.run_block_max(q, k, causal, softmax_scale, backend, q_start, k_start)
    return _block_max_scores(q, k, causal, softmax_scale, backend, q_start, k_start) if res is None else res


def _block_max_scores(q, k, causal, softmax_scale, backend, q_start, k_start):
    """block_max_scores without the kept plans: every check, view and allocation on each call."""
    _check_grad([("q", q), ("k", k)])
    _check_offset_args(q_start, k_start)
    frame = frame_for(q)
    with on(frame) as stream:
        bm = _block_max_problem(frame, q, k, causal, softmax_scale, backend, q_start, k_start)
        tm_native, tm_view = frame.empty(bm.out_shape, "float32")
        params = _launch.pack(q=bm.qv, k=bm.kv, tile_max=tm_view, **bm.fields)
        maps = tuple(_tma.tensor_map(x, r) for x, r in zip((bm.qv, bm.kv), bm.kern.box_rows())) if bm.kern.tma else ()
        bm.kern.launch(*bm.out_shape[:3], params, maps)
        frame.finish(stream)
    return frame.wrap(tm_native, tm_view)


@dataclass
class _BlockMaxProblem:
    """A block_max_scores call checked: the CuPy views of q and k, the kernel, the Params fields other than the
    pointers, and the (B, Hq, nQ, nK) shape of the tile maxima."""

    qv: object
    kv: object
    kern: object
    fields: dict
    out_shape: tuple


def _block_max_problem(frame, q, k, causal, softmax_scale, backend, q_start, k_start) -> _BlockMaxProblem:
    """block_max_scores' checks and kernel choice (also :class:`~bsfa_cupy.block_max_plan.BlockMaxPlan`'s),
    inside ``on(frame)``; _check_grad and _check_offset_args come first, before any array is touched."""
    qv, kv = to_cupy(q, "q", frame), to_cupy(k, "k", frame)
    B, Nq, Nk, Hq, Hkv, D = check_qk(qv, kv)
    dtype = _check_dtypes([("q", qv), ("k", kv)], D)
    k0, shift = positions(q_start, k_start, Nq, Nk)
    _same_device([qv, kv], ["q", "k"])
    strides = _strides(qv, "q") + _strides(kv, "k")
    scale = _positive_scale(softmax_scale, D)
    nQ, nK = -(-Nq // BLOCK_M), -(-Nk // BLOCK_N)
    _launch.check_grid(B, Hq, nQ, BLOCK_M)
    kern = _module(as_backend(backend), dtype, D, causal, frame.device_id).block_max
    fields = dict(**_stride_fields("qk", strides), Nq=Nq, Nk=Nk, Hq=Hq, Hkv=Hkv, B=B, softmax_scale=scale,
                  k_start=k0, qk_shift=shift)
    return _BlockMaxProblem(qv, kv, kern, fields, (B, Hq, nQ, nK))


@functools.lru_cache(maxsize=64)  # Backend is frozen and hashable; spares a call its checks twice
def _splitkv_backend(backend):
    """The split-KV variant of a call's backend ('auto' or 'splitkv'), its extra defines kept."""
    return Backend("splitkv", backend.defines)


@functools.lru_cache(maxsize=64)
def _ws_backend(backend):
    """The warp-specialised variant of a call's backend ('auto' or 'sm90ws'), its extra defines kept."""
    return Backend("sm90ws", backend.defines)


def _check_offset_args(q_start, k_start):
    """The reference's type and tile-alignment checks of q_start / k_start, before any array is touched."""
    check_offsets(q_start, k_start, 0, 0, BLOCK_M, BLOCK_N)


def positions(q_start, k_start, Nq, Nk):
    """(k_start, q0 - k_start) of a call, the kernels' Params.k_start and qk_shift (bsfa_problem.cuh).

    q0 = q_start, or k_start + Nk - Nq by default (bottom-right), as bsfa_reference.attention; every
    absolute position of the call must fit the kernels' int32.
    """
    q0, k0 = check_offsets(q_start, k_start, Nq, Nk, BLOCK_M, BLOCK_N)
    if max(q0 + Nq, k0 + Nk) > _INT32_MAX:
        raise ValueError(
            f"q_start / k_start: the call's absolute positions must stay below 2**31 (the kernels' int32), got "
            f"queries at [{q0}, {q0 + Nq}) and keys at [{k0}, {k0 + Nk})"
        )
    return k0, q0 - k0


def _results(frame, out, lse=None, keep=None):
    """out, then lse and keep where asked for ((native, view) pairs), in the caller's array type."""
    result = tuple(frame.wrap(*pair) for pair in (out, lse, keep) if pair is not None)
    return result[0] if len(result) == 1 else result


def _check_dtypes(named, D):
    dts = {name: str(x.dtype) for name, x in named}
    if len(set(dts.values())) > 1:
        raise TypeError(f"q, k, v must share one dtype, got {dts}")
    dtype = _dtype_name(named[0][1], named[0][0])
    if D not in HEAD_DIMS:
        raise ValueError(f"head_dim: expected one of {HEAD_DIMS}, got {D}")
    return dtype


def _positive_scale(softmax_scale, D):
    scale = softmax_scale_or_default(softmax_scale, D)
    if scale <= 0:  # the kernel takes max(scale * s) as scale * max(s)
        raise ValueError(f"softmax_scale: the GPU kernel needs a positive scale, got {scale}")
    return scale


def _module(backend, dtype, D, causal, device_id):
    if backend.arch == "splitkv":
        raise ValueError("backend 'splitkv': the split-KV kernel serves bsfa_cupy.attention only")
    key = select(backend, dtype, D, causal, compute_capability(device_id), tma=_tma.available())
    return get_module(key, backend, device_id)


def _stride_fields(tensors, strides):
    """{"q_sb": ..., "q_sn": ..., "q_sh": ..., ...} for the tensors named by their letters."""
    names = [f"{t}_{d}" for t in tensors for d in ("sb", "sn", "sh")]
    return dict(zip(names, strides))


def _check_qkv(qv, kv, vv):
    B, Nq, Nk, Hq, Hkv, D = check_qk(qv, kv)
    check_v(vv, kv)
    dtype = _check_dtypes([("q", qv), ("k", kv), ("v", vv)], D)
    return B, Nq, Nk, Hq, Hkv, D, dtype
