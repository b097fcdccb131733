"""BSFA as a transformers (>= 5) attention backend, for causal prefill.

An optional integration, imported explicitly (the library never imports it)::

    import bsfa_cupy.hf

    model = AutoModelForCausalLM.from_pretrained(name, dtype=torch.bfloat16).cuda()
    thr = bsfa_cupy.hf.calibrate(model, batches, k_values=[16, 32, 64])   # token batches (B, N)
    bsfa_cupy.hf.enable(model, thr, k=32)                                 # selects attn "bsfa"
    model.generate(...)                                                   # prefill on BSFA
    bsfa_cupy.hf.stats(model)                                             # {"bsfa": 30, "sdpa_decode": 90, ...}

With ``enable(..., tile_stats=True)`` every BSFA call also counts its tiles per layer
(:func:`tile_stats`): the gated (off-diagonal) candidate tiles it kept and skipped, and the
diagonal ones (always kept).

On CUDA tensors the kernel runs (``bsfa_cupy.attention``); on CPU tensors the exact float64
reference (``bsfa_reference.attention``, slow), so a model can be checked without a GPU.

Routing, per call of the attention function (the first rule that applies; every path is counted,
see :func:`stats`):

* attention sinks (``s_aux`` passed or ``module.sinks``, as in gpt-oss): a ValueError, never a
  silently different softmax
* logit soft-capping (``softcap`` passed or ``config.attn_logit_softcapping``): the model's own
  ``eager_attention_forward`` (SDPA has no soft-capping; it applies the mask, sliding windows
  included), "eager_softcap"
* not causal (``is_causal=False`` passed, or ``module.is_causal`` False; encoders): SDPA,
  "sdpa_not_causal"
* sliding-window layer (``sliding_window`` passed or a non-None ``module.sliding_window``): SDPA,
  "sdpa_sliding_window"
* dropout > 0, or autograd recording (the kernel is forward-only): SDPA, "sdpa_dropout" / "sdpa_grad"
* fewer than 128 new queries (one query tile; q_len == 1 is a decode step): on CUDA against at least
  ``SHORT_MIN_KV`` cached keys (``DECODE_MIN_KV`` for one query), with a supported dtype and head dim,
  the causal mask (none for a decode step) and no padding, dense BSFA through the split-KV kernel,
  "bsfa_short" / "bsfa_decode": exact attention,
  faster there than SDPA (see SHORT_MIN_KV). The thresholds are not applied: they were calibrated on
  the maxima of full 128-row tiles, and a tile of a few rows has lower maxima, so they would skip
  far more than calibrated (measured at decode on SmolLM2: +132 % perplexity). Otherwise SDPA,
  "sdpa_decode" / "sdpa_short"
* CUDA with a dtype other than float16/bfloat16 or a head dim the kernel lacks: SDPA,
  "sdpa_dtype" / "sdpa_head_dim"; a device other than CPU or CUDA: SDPA, "sdpa_device"
* no mask and q_len == kv_len (unpadded prefill): BSFA, "bsfa". No mask and q_len < kv_len only
  comes from an empty static cache (transformers' SDPA crops the keys to q_len the same way): BSFA
  on the first q_len keys, "bsfa"
* a bool (B, 1, q_len, kv_len) mask that is exactly "causal, bottom-right, over the real keys of
  each row" (left or right padding, with or without a cache): without padding one batched BSFA
  call ("bsfa"; chunked prefill on top of a cache), with padding one packed (varlen) BSFA call on
  every row's real queries and keys, padded query positions' outputs zero ("bsfa_padded")
* any other mask: SDPA, "sdpa_mask"
"""
from __future__ import annotations

import collections
import functools
import inspect
import math
import numbers
import sys

import numpy as np

try:
    import torch
    import transformers
    from transformers import AttentionInterface, AttentionMaskInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.masking_utils import sdpa_mask
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError(
        f"bsfa_cupy.hf needs torch and transformers >= 5 ({exc}): pip install torch 'transformers>=5'"
    ) from exc

import bsfa_reference

from bsfa_reference._validate import check_block
from bsfa_reference.calibration import REDUCTIONS, check_k_values
from bsfa_reference.tiles import BLOCK_M, BLOCK_N

from ._variants import HEAD_DIMS
from .calibration import Calibrator as GpuCalibrator
from .thresholds import Thresholds

if int(transformers.__version__.split(".")[0]) < 5:  # pragma: no cover
    raise ImportError(f"bsfa_cupy.hf needs transformers >= 5, found {transformers.__version__}")

__all__ = ["attention_forward", "calibrate", "enable", "head_stats", "register", "reset_stats", "stats", "tile_stats"]

DEFAULT_NAME = "bsfa"
#: shortest query chunk sent to BSFA with thresholds: one query tile
MIN_Q_LEN = BLOCK_M
#: fewest cached keys for which a short chunk (1 < q_len < 128) runs dense BSFA rather than SDPA: with a
#: bottom-right causal mask, transformers' SDPA path repeats K and V for every query head (no GQA with a
#: mask) and SDPA takes a masked kernel, while the split-KV kernel reads K and V once per GQA group.
SHORT_MIN_KV = 2048
#: ... and for a decode step (q_len == 1, no mask: SDPA's GQA kernels).
DECODE_MIN_KV = math.inf
_GPU_DTYPES = (torch.float16, torch.bfloat16)


class _ModelState:
    """What :func:`enable` and :func:`calibrate` attach to a model's attention modules."""

    def __init__(self):
        self.tables: dict[int, np.ndarray | None] | None = None  # (Hq, T) float32 per layer; None: dense
        self.k: int | tuple | None = None
        self.block = (BLOCK_M, BLOCK_N)  # the thresholds' tiles: the kernel's, or others on the reference
        self.device_tables: dict[tuple[int, int], object] = {}  # (layer, device) -> DeviceThresholds
        self.calibrators: dict[int, object] | None = None  # set while calibrate runs
        self.k_values: tuple[int, ...] = ()
        self.tile_stats = False
        self.head_stats = False
        self.calibration = {"reduce": "mean", "block_m": BLOCK_M}  # options of the running calibrate()


# ---------------------------------------------------------------------------- public API
def register(name: str = DEFAULT_NAME) -> str:
    """Register the BSFA attention function and its mask function under ``name``; idempotent.

    Afterwards ``from_pretrained(..., attn_implementation=name)`` or
    ``model.set_attn_implementation(name)`` selects it (dense BSFA until :func:`enable` attaches
    thresholds). The mask function is transformers' ``sdpa_mask``: unpadded prefill and decode
    get no mask, padded batches and chunks over a cache a bool (B, 1, Nq, Nk) one.
    """
    if not isinstance(name, str):
        raise TypeError(f"name: expected a str, got {type(name).__name__} {name!r}")
    # transformers treats names with "flash" as FlashAttention and "org/repo" names as hub kernels
    if not name or "flash" in name.lower() or "/" in name or "|" in name:
        raise ValueError(f"name: expected a plain name without 'flash', '/' or '|', got {name!r}")
    AttentionInterface.register(name, attention_forward)
    AttentionMaskInterface.register(name, sdpa_mask)
    return name


def enable(model, thresholds: Thresholds | None = None, k=None, *, name: str = DEFAULT_NAME,
           tile_stats: bool = False, head_stats: bool = False):
    """Run ``model``'s attention through BSFA with ``thresholds`` at ``k`` (dense BSFA when None).

    Registers ``name`` if needed and selects it on the model. The thresholds must match the model
    (layers, query heads, causal calibration, the softmax scale they were calibrated with; the
    kernel's 128x64 tiles on a GPU, any tiles on the CPU reference). ``k``: one of their k values for
    every layer, or a list with one entry per layer, each a k value or None (that layer dense).
    ``tile_stats``: count every BSFA call's kept and skipped tiles for :func:`tile_stats` (one extra
    reduction and device sync per call). ``head_stats``: also run every BSFA call densely and record
    per head the dropped softmax mass and the output error for :func:`head_stats` (a second
    attention per call). Returns the model.
    """
    _check_model(model)
    for flag, value in (("tile_stats", tile_stats), ("head_stats", head_stats)):
        if not isinstance(value, bool):
            raise TypeError(f"{flag}: expected a bool, got {type(value).__name__} {value!r}")
    state = _state_of(model)
    block = (BLOCK_M, BLOCK_N)
    if thresholds is None:
        if k is not None:
            raise ValueError(f"k: expected None without thresholds (dense), got {k!r}")
        tables = None
    else:
        if not isinstance(thresholds, Thresholds):
            raise TypeError(f"thresholds: expected a bsfa_cupy.Thresholds or None, got {type(thresholds).__name__}")
        _check_thresholds(model, thresholds)
        per_layer = _per_layer_k(k, thresholds)
        tables = {i: None if per_layer[i] is None else thresholds.for_layer(i, per_layer[i])
                  for i in range(thresholds.num_layers)}
        k = per_layer[0] if isinstance(k, numbers.Integral) else tuple(per_layer)
        block = (thresholds.block_m, thresholds.block_n)
    state.tables, state.k, state.block = tables, k, block
    state.device_tables = {}
    state.tile_stats = tile_stats
    state.head_stats = head_stats
    register(name)
    if model.config._attn_implementation != name:
        model.set_attn_implementation(name)
    return model


def calibrate(model, batches, k_values, *, samples: int | None = None, progress: bool = True,
              name: str = DEFAULT_NAME, reduce: str = "mean", block_m: int = BLOCK_M) -> Thresholds:
    """Calibrate BSFA thresholds on ``model``'s own post-RoPE queries and keys.

    batches: an iterable of unpadded LongTensor input_ids, each (B, N) or (N,); every row is one
        sample. samples: stop after this many samples (None: all). k_values: the k to calibrate.

    The model runs its forward (no cache, no grad) with the BSFA attention function in calibration
    mode: each layer's q and k go to one Calibrator (``bsfa_cupy.Calibrator`` for float16/bfloat16
    CUDA tensors of a head dim it serves, ``bsfa_reference.Calibrator`` otherwise) while attention
    itself runs densely through SDPA. The model's attention implementation is restored afterwards.
    ``reduce`` ("mean" or "median") aggregates the per-sample proposals; ``block_m`` other than the
    kernel's 128 query rows per gate decision calibrates on the reference (its thresholds then run on
    the CPU reference only).
    """
    _check_model(model)
    k_values = check_k_values(k_values)
    if samples is not None:
        if isinstance(samples, bool) or not isinstance(samples, numbers.Integral):
            raise TypeError(f"samples: expected a positive int or None, got {type(samples).__name__} {samples!r}")
        if samples < 1:
            raise ValueError(f"samples: expected a positive int or None, got {samples}")
    _check_causal_model(model)
    if reduce not in REDUCTIONS:
        raise ValueError(f"reduce: expected one of {REDUCTIONS}, got {reduce!r}")
    block_m = check_block(block_m, "block_m")
    state = _state_of(model)
    state.calibration = {"reduce": reduce, "block_m": block_m}
    previous = model.config._attn_implementation
    register(name)
    device = next(model.parameters()).device
    lengths: list[int] = []
    state.calibrators, state.k_values = {}, k_values
    try:
        if previous != name:
            model.set_attn_implementation(name)
        total = samples
        if total is None and isinstance(batches, (list, tuple)):
            total = sum(b.shape[0] if getattr(b, "ndim", 1) > 1 else 1 for b in batches)
        bar = _progress(total=total, enabled=progress)
        with torch.no_grad():
            for i, ids in enumerate(batches):
                ids = _check_batch(ids, i)
                if samples is not None:
                    ids = ids[: samples - len(lengths)]
                model(input_ids=ids.to(device), use_cache=False)
                lengths += [ids.shape[1]] * ids.shape[0]
                bar.update(ids.shape[0])
                if samples is not None and len(lengths) >= samples:
                    break
        bar.close()
        cals = state.calibrators
        if not lengths:
            raise ValueError("batches: expected at least one batch of input_ids, got none")
        layers = _num_layers(model)
        missing = [i for i in range(layers) if i not in cals]
        if missing:
            raise ValueError(f"calibrate: expected every layer's attention to run through {name!r}, got no "
                             f"queries from layers {missing}")
        provenance = {
            "source": "bsfa_cupy.hf.calibrate",
            "model": str(getattr(model.config, "name_or_path", "") or type(model).__name__),
            "lengths": ",".join(map(str, lengths)),
        }
        return Thresholds.from_calibrators([cals[i] for i in range(layers)], provenance=provenance)
    finally:
        state.calibrators = None
        if model.config._attn_implementation != previous:
            model.set_attn_implementation(previous)


def stats(model) -> dict[str, int]:
    """Calls of the attention function per path since the last :func:`reset_stats`, summed over layers.

    Keys are the path names of the module docstring ("bsfa", "bsfa_padded", "sdpa_decode", ...), plus
    "calibrate" for the calls :func:`calibrate` made; a path never taken is absent.
    """
    total: collections.Counter = collections.Counter()
    for m in model.modules():
        total.update(getattr(m, "_bsfa_counts", {}))
    return dict(sorted(total.items()))


def head_stats(model) -> dict[int, dict[str, np.ndarray]]:
    """Per layer, sums over the BSFA calls since the last :func:`reset_stats` (enabled with
    ``head_stats=True``), each an (Hq,) float64 array: ``rows`` (query rows), ``mass`` (their dropped
    softmax mass, ``bsfa_reference.dropped_mass``: 1 - exp(lse_sparse - lse_dense)), ``mass_max``
    (the largest row's), ``err2`` (squared output difference sparse - dense) and ``ref2`` (squared
    dense output). Mean dropped mass is mass / rows, relative output error sqrt(err2 / ref2).
    """
    out = {}
    for m in _attention_modules(model):
        acc = getattr(m, "_bsfa_heads", None)
        if acc is not None:
            out[int(m.layer_idx)] = {key: v.copy() for key, v in acc.items()}
    return dict(sorted(out.items()))


def tile_stats(model) -> dict[int, tuple[int, int, int]]:
    """Tiles of the BSFA calls per layer since the last :func:`reset_stats`, summed over calls, batch
    rows and query heads: ``{layer: (kept_gated, skipped_gated, diagonal)}``.

    Gated tiles are the off-diagonal candidates (tiles with a causally valid entry), the ones the
    thresholds decide on; diagonal candidates are always kept. The P·V work of a call is
    proportional to its kept tiles, so ``skipped_gated / (kept_gated + skipped_gated + diagonal)`` is
    the share of it skipped. Counted only while enabled with ``tile_stats=True``; layers without a
    counted BSFA call are absent.
    """
    out = {}
    for m in _attention_modules(model):
        tiles = getattr(m, "_bsfa_tiles", None)
        if tiles is not None:
            out[int(m.layer_idx)] = tuple(tiles)
    return dict(sorted(out.items()))


def reset_stats(model) -> None:
    """Zero the counters of :func:`stats` and :func:`tile_stats`."""
    for m in model.modules():
        counts = getattr(m, "_bsfa_counts", None)
        if counts is not None:
            counts.clear()
        if getattr(m, "_bsfa_tiles", None) is not None:
            m._bsfa_tiles = None
        if getattr(m, "_bsfa_heads", None) is not None:
            m._bsfa_heads = None


# ---------------------------------------------------------------------------- the attention function
def attention_forward(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """transformers' attention signature: q (B, Hq, Nq, D), k/v (B, Hkv, Nk, D) -> ((B, Nq, Hq, D), None)."""
    state = getattr(module, "_bsfa_state", None)
    if state is not None and state.calibrators is not None:
        return _calibration_step(state, module, query, key, value, attention_mask, scaling, dropout, kwargs)
    path = _route(module, query, key, attention_mask, dropout, kwargs)
    if path == "eager_softcap":
        return _eager_softcap(module, query, key, value, attention_mask, scaling, dropout, kwargs)
    if path in ("bsfa_short", "bsfa_decode"):  # dense: see the module docstring
        _count(module, path)
        return _bsfa(query, key, value, None, scaling), None
    if isinstance(path, str) and path != "bsfa":
        _count(module, path)
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    Nq = query.shape[2]
    thr = _layer_thresholds(state, module, query)
    tally = _Tally(module, state.block, state.tile_stats, state.head_stats) if state is not None else None
    if tally is not None and not (tally.tiles or tally.heads):
        tally = None
    if attention_mask is None:
        # only an empty static cache gives Nk > Nq without a mask: keys past Nq are unwritten slots
        out = _bsfa(query, key[:, :, :Nq], value[:, :, :Nq], thr, scaling, tally)
        _count(module, "bsfa")
        return out, None
    kv_valid, q_valid, unpadded = path  # from _route: a mask that matched the causal pattern
    if unpadded:
        out = _bsfa(query, key, value, thr, scaling, tally)
        _count(module, "bsfa")
        return out, None
    out = _bsfa_packed(query, key, value, q_valid, kv_valid, thr, scaling, tally)
    _count(module, "bsfa_padded")
    return out, None


def _route(module, query, key, attention_mask, dropout, kwargs):
    """A fallback path name (str), "bsfa", or (kv_valid, q_valid) for a matching bool mask."""
    if kwargs.get("s_aux") is not None or getattr(module, "sinks", None) is not None:
        # Sinks add a per-head logit to every softmax row; neither BSFA nor this backend's fallbacks
        # model them, and dropping them would be a silently different model.
        raise ValueError(
            f"bsfa: {type(module).__name__} uses attention sinks (s_aux / module.sinks), which the bsfa backend "
            "does not support; load this model with attn_implementation='eager'"
        )
    if _softcap(module, kwargs) is not None:  # first: SDPA refuses softcap on every other path
        return "eager_softcap"
    is_causal = kwargs.get("is_causal")
    if is_causal is None:
        is_causal = getattr(module, "is_causal", True)
    if not is_causal:
        return "sdpa_not_causal"
    if kwargs.get("sliding_window") is not None or getattr(module, "sliding_window", None) is not None:
        return "sdpa_sliding_window"
    if dropout and dropout > 0:
        return "sdpa_dropout"
    if torch.is_grad_enabled() and (query.requires_grad or key.requires_grad):
        return "sdpa_grad"
    Nq, Nk = query.shape[2], key.shape[2]
    short = None
    if Nq < MIN_Q_LEN:
        short = "decode" if Nq == 1 else "short"
        if query.device.type != "cuda" or Nk < (DECODE_MIN_KV if Nq == 1 else SHORT_MIN_KV):
            return "sdpa_" + short
    if query.device.type == "cuda":
        if query.dtype not in _GPU_DTYPES:
            return "sdpa_dtype"
        if query.shape[-1] not in HEAD_DIMS:
            return "sdpa_head_dim"
    elif query.device.type != "cpu":
        return "sdpa_device"
    elif not query.dtype.is_floating_point:
        return "sdpa_dtype"
    if attention_mask is None:
        if Nk < Nq:
            return "sdpa_mask"
        if short == "short":  # no mask over a cache: an empty static one (see attention_forward), nothing cached
            return "sdpa_short"
        return "bsfa" if short is None else "bsfa_decode"  # one query sees every key, as SDPA's unmasked call
    plan = _mask_rows(attention_mask, query.shape[0], Nq, Nk)
    if plan is None:
        return "sdpa_mask"
    if short is not None:  # padded short chunks stay on SDPA (one launch; packing them would cost more)
        return "bsfa_" + short if plan[2] else "sdpa_" + short
    return plan


def _mask_rows(mask, B, Nq, Nk):
    """(kv_valid, q_valid, no padding) of a causal ``mask`` (see :func:`_causal_rows`), else None.

    Found at the first layer's call and kept on the mask tensor with its in-place version: transformers hands
    every layer of a forward the same mask, and the check (a few small kernels and a device sync) would
    otherwise cost each layer as much as a short chunk's attention.
    """
    key = (_version(mask), B, Nq, Nk)
    kept = getattr(mask, "_bsfa_rows", None)
    if kept is None or kept[0] != key:
        rows = _causal_rows(mask, B, Nq, Nk)
        kept = (key, None if rows is None else (*rows, bool(rows[0].all())))
        if isinstance(mask, torch.Tensor):
            mask._bsfa_rows = kept
    return kept[1]


def _version(mask):
    # Inference-mode tensors keep no version counter: such a mask is trusted not to be written in place once
    # made (transformers never does).
    if not isinstance(mask, torch.Tensor):
        return None
    return -1 if mask.is_inference() else mask._version


def _causal_rows(mask, B, Nq, Nk):
    """(kv_valid (B, Nk), q_valid (B, Nq)) if ``mask`` is causal bottom-right over each row's real keys.

    A query's own key is real unless the query is padding, so the real keys are the columns any
    query attends to and a query is real when its own key (position Nk - Nq + i) is. The mask must
    then be, for every real query i, exactly: key real and j <= Nk - Nq + i. Padded query rows are
    not checked (their outputs are set to zero).
    """
    if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool or mask.ndim != 4:
        return None
    if mask.shape[1] != 1 or mask.shape[2:] != (Nq, Nk) or mask.shape[0] not in (1, B) or Nk < Nq:
        return None
    m = mask[:, 0].expand(B, Nq, Nk)
    kv_valid = m.any(dim=1)
    q_valid = kv_valid[:, Nk - Nq:]
    cols = torch.arange(Nk, device=mask.device)
    causal = cols[None, :] <= cols[Nk - Nq:, None]  # (Nq, Nk), bottom-right
    expected = kv_valid[:, None, :] & causal[None]
    rows = q_valid[:, :, None]
    if not torch.equal(m & rows, expected & rows):
        return None
    return kv_valid, q_valid


class _Tally:
    """What one BSFA call records, and on which module: tile counts, per-head statistics, or both."""

    def __init__(self, module, block, tiles: bool, heads: bool):
        self.module, self.block, self.tiles, self.heads = module, block, tiles, heads


def _bsfa(query, key, value, thr, scaling, tally=None, block=(BLOCK_M, BLOCK_N)):
    """BSFA on (B, H, N, D) tensors; returns (B, Nq, Hq, D) in the query's dtype.

    tally: None, or a :class:`_Tally` naming the attention module whose counters (:func:`tile_stats`,
    :func:`head_stats`) this call adds to. block: the thresholds' tiles (the kernel's on CUDA).
    """
    if tally is not None:
        block = tally.block
    q, k, v = query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2)
    want_keep = tally is not None and tally.tiles
    want_lse = tally is not None and tally.heads
    cuda = query.device.type == "cuda"
    if cuda:
        from .ops import attention

        if tuple(block) != (BLOCK_M, BLOCK_N):
            raise ValueError(f"thresholds: expected the kernel's {BLOCK_M}x{BLOCK_N} tiles on CUDA, got "
                             f"{block[0]}x{block[1]} (other tiles run on the CPU reference only)")
        run = functools.partial(attention, q, k, v, causal=True, softmax_scale=scaling)
    else:
        run = functools.partial(bsfa_reference.attention, _host(q), _host(k), _host(v), causal=True,
                                softmax_scale=scaling, block_m=block[0], block_n=block[1])
    res = run(thr, return_lse=want_lse, return_keep=want_keep)
    res = res if isinstance(res, tuple) else (res,)
    out = res[0]
    if want_keep:
        B, Hq, Nq = query.shape[:3]
        _count_tiles(tally.module, res[-1], Hq, [(Nq, key.shape[2])] * B, block)
    if want_lse:
        dense_out, dense_lse = run(None, return_lse=True)
        _count_heads(tally.module, out, res[1], dense_out, dense_lse, cuda)
    if cuda:
        return out
    return torch.from_numpy(out).to(query.dtype)


def _bsfa_packed(query, key, value, q_valid, kv_valid, thr, scaling, tally=None):
    """BSFA on each batch row's real queries and keys (masks (B, Nq), (B, Nk)), as one varlen call.

    The real rows are gathered into packed (total, H, D) arrays (unpad), attended as sequences of
    their own (bottom-right, like the mask :func:`_causal_rows` accepted), and scattered back into a
    (B, Nq, Hq, D) output whose padded query positions are zero.
    """
    q, k, v = query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2)  # (B, N, H, D)
    q_p, k_p, v_p = q[q_valid], k[kv_valid], v[kv_valid]  # row-major gather: sequence by sequence
    len_q, len_k = q_valid.sum(dim=1, dtype=torch.int32), kv_valid.sum(dim=1, dtype=torch.int32)
    # Padded batches count tiles (the kernel's) but take no per-head statistics.
    want_keep = tally is not None and tally.tiles
    if query.device.type == "cuda":
        from .varlen import attention_varlen

        # The masks may live on the host: the offsets go to the inputs' GPU (a few bytes).
        cu_q = torch.nn.functional.pad(torch.cumsum(len_q, 0, dtype=torch.int32), (1, 0)).to(query.device)
        cu_k = torch.nn.functional.pad(torch.cumsum(len_k, 0, dtype=torch.int32), (1, 0)).to(query.device)
        res = attention_varlen(q_p, k_p, v_p, cu_q, cu_k, thr, causal=True, softmax_scale=scaling,
                               return_keep=want_keep)
    else:
        cu_q = np.concatenate([[0], np.cumsum(len_q.numpy())]).astype(np.int32)
        cu_k = np.concatenate([[0], np.cumsum(len_k.numpy())]).astype(np.int32)
        res = bsfa_reference.attention_varlen(_host(q_p), _host(k_p), _host(v_p), cu_q, cu_k, thr, causal=True,
                                              softmax_scale=scaling, return_keep=want_keep)
    out_p, keep = res if want_keep else (res, None)
    if query.device.type != "cuda":
        out_p = torch.from_numpy(out_p).to(query.dtype)
    if want_keep:
        _count_tiles(tally.module, keep, q.shape[2], list(zip(len_q.tolist(), len_k.tolist())))
    out = query.new_zeros(q.shape)
    out[q_valid] = out_p
    return out


def _count_heads(module, out, lse, dense_out, dense_lse, cuda: bool) -> None:
    """Adds one call's per-head sums to ``module._bsfa_heads`` (see :func:`head_stats`)."""
    if cuda:
        lse, dense_lse = torch.as_tensor(lse).double(), torch.as_tensor(dense_lse).double()
        out, dense_out = torch.as_tensor(out).double(), torch.as_tensor(dense_out).double()
    else:
        lse, dense_lse = torch.from_numpy(lse), torch.from_numpy(dense_lse)
        out, dense_out = torch.from_numpy(out), torch.from_numpy(dense_out)
    has_key = dense_lse > -math.inf  # (B, Hq, Nq)
    gap = torch.where(has_key, lse - torch.where(has_key, dense_lse, 0.0), 0.0).clamp(max=0.0)
    mass = torch.where(has_key, -torch.expm1(gap), 0.0) + 0.0  # no kept key: lse -inf, mass 1; + 0.0: no -0.0
    sums = {
        "rows": torch.full((mass.shape[1],), float(mass.shape[0] * mass.shape[2]), dtype=torch.float64),
        "mass": mass.sum(dim=(0, 2)).cpu(),
        "mass_max": mass.amax(dim=(0, 2)).cpu(),
        "err2": ((out - dense_out) ** 2).sum(dim=(0, 1, 3)).cpu(),
        "ref2": (dense_out ** 2).sum(dim=(0, 1, 3)).cpu(),
    }
    acc = getattr(module, "_bsfa_heads", None)
    if acc is None:
        module._bsfa_heads = {key: v.numpy().copy() for key, v in sums.items()}
        return
    for key, v in sums.items():
        acc[key] = np.maximum(acc[key], v.numpy()) if key == "mass_max" else acc[key] + v.numpy()


@functools.lru_cache(maxsize=64)
def _candidate_tiles(Nq: int, Nk: int, block=(BLOCK_M, BLOCK_N)) -> tuple[int, int]:
    """(candidates, diagonal candidates) per (batch row, head) of a causal bottom-right call.

    From the tile grid, not an (Nq, Nk) mask, which would take gigabytes at the kernel's lengths.
    """
    cand = bsfa_reference.tiles.candidate_tiles(Nq, Nk, *block, causal=True)
    diag = bsfa_reference.tiles.diagonal_tiles(Nq, Nk, *block)
    return int(cand.sum()), int((cand & diag).sum())


def _count_tiles(module, keep, Hq: int, shapes, block=(BLOCK_M, BLOCK_N)) -> None:
    """Adds a call's tiles to the module's counters; ``shapes``: (Nq, Nk) of each batch row or sequence."""
    # keep holds exactly the kept candidates, every diagonal one among them: its sum alone
    # (one reduction) splits into the three counts
    counts = [_candidate_tiles(Nq, Nk, tuple(block)) for Nq, Nk in shapes if Nq > 0 and Nk > 0]
    cand, diag = sum(c for c, _ in counts), sum(d for _, d in counts)
    kept = int(keep.sum())
    n_diag = Hq * diag
    tiles = getattr(module, "_bsfa_tiles", None) or [0, 0, 0]
    tiles[0] += kept - n_diag
    tiles[1] += Hq * cand - kept
    tiles[2] += n_diag
    module._bsfa_tiles = tiles


def _layer_thresholds(state, module, query):
    if state is None or state.tables is None:
        return None
    layer = _layer_idx(module)
    table = state.tables[layer]
    if table is None or query.device.type != "cuda":
        return table
    dev = query.device.index if query.device.index is not None else torch.cuda.current_device()
    cached = state.device_tables.get((layer, dev))
    if cached is None:  # validated and copied once per layer and GPU, not per call
        from .device_thresholds import DeviceThresholds

        cached = state.device_tables[(layer, dev)] = DeviceThresholds(table, device=dev)
    return cached


def _calibration_step(state, module, query, key, value, attention_mask, scaling, dropout, kwargs):
    Nq, Nk = query.shape[2], key.shape[2]
    if attention_mask is not None or Nq != Nk:
        got = None if attention_mask is None else tuple(attention_mask.shape)
        raise ValueError(f"calibrate: expected unpadded batches without a cache (no mask, q_len == kv_len), got "
                         f"q_len {Nq}, kv_len {Nk}, mask {got}")
    layer = _layer_idx(module)
    cal = state.calibrators.get(layer)
    opts = state.calibration
    on_gpu = (query.device.type == "cuda" and query.dtype in _GPU_DTYPES and query.shape[-1] in (64, 128)
              and opts["block_m"] == BLOCK_M)
    if cal is None:
        scale = None if scaling is None else float(scaling)
        if on_gpu:
            cal = GpuCalibrator(state.k_values, causal=True, softmax_scale=scale, reduce=opts["reduce"])
        else:
            cal = bsfa_reference.Calibrator(state.k_values, causal=True, softmax_scale=scale,
                                            reduce=opts["reduce"], block_m=opts["block_m"])
        state.calibrators[layer] = cal
    q, k = query.detach().transpose(1, 2), key.detach().transpose(1, 2)
    if isinstance(cal, GpuCalibrator):
        cal.update(q, k)
    else:
        cal.update(_host(q), _host(k))
    _count(module, "calibrate")
    return sdpa_attention_forward(module, query, key, value, None, dropout=dropout, scaling=scaling, **kwargs)


def _eager_softcap(module, query, key, value, attention_mask, scaling, dropout, kwargs):
    eager = getattr(sys.modules.get(type(module).__module__), "eager_attention_forward", None)
    # an eager function without a softcap parameter would drop the capping silently
    if eager is None or "softcap" not in inspect.signature(eager).parameters:
        raise ValueError(f"softcap: expected a model whose modeling file defines eager_attention_forward(..., "
                         f"softcap) (SDPA has no logit soft-capping), got {type(module).__name__} from "
                         f"{type(module).__module__}")
    _count(module, "eager_softcap")
    # Eager functions add the mask to the scores: a float mask with the causal part included, where
    # the bool-or-None masks of sdpa_mask leave causality to is_causal.
    Nq, Nk = query.shape[2], key.shape[2]
    if attention_mask is None and Nq > 1:
        if Nk > Nq:  # an empty static cache: keys past Nq are unwritten slots (as in _route)
            key, value, Nk = key[:, :, :Nq], value[:, :, :Nq], Nq
        rows = torch.arange(Nq, device=query.device)[:, None] + (Nk - Nq)
        attention_mask = (torch.arange(Nk, device=query.device)[None, :] <= rows)[None, None]
    if attention_mask is not None and attention_mask.dtype == torch.bool:
        attention_mask = torch.zeros(attention_mask.shape, dtype=query.dtype, device=query.device).masked_fill(
            ~attention_mask, torch.finfo(query.dtype).min)
    kwargs = dict(kwargs)
    kwargs.setdefault("softcap", _softcap(module, kwargs))
    return eager(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)


# ---------------------------------------------------------------------------- model and argument checks
def _softcap(module, kwargs):
    cap = kwargs.get("softcap")
    if cap is None:
        cap = getattr(getattr(module, "config", None), "attn_logit_softcapping", None)
    return cap


def _host(x: torch.Tensor) -> np.ndarray:
    """A NumPy view of a CPU tensor (a copy only for CUDA or bfloat16); the reference computes in float64."""
    x = x.detach()
    if x.dtype not in (torch.float16, torch.float32, torch.float64):
        x = x.float()
    return x.cpu().numpy()


def _count(module, path: str) -> None:
    counts = getattr(module, "_bsfa_counts", None)
    if counts is None:
        counts = module._bsfa_counts = collections.Counter()
    counts[path] += 1


def _layer_idx(module) -> int:
    layer = getattr(module, "layer_idx", None)
    if isinstance(layer, bool) or not isinstance(layer, numbers.Integral):
        raise ValueError(f"module: expected an attention module with an int layer_idx, got "
                         f"{type(module).__name__} with layer_idx {layer!r}")
    return int(layer)


def _attention_modules(model):
    return [m for m in model.modules()
            if isinstance(getattr(m, "layer_idx", None), int) and hasattr(m, "is_causal")]


def _state_of(model) -> _ModelState:
    state = getattr(model, "_bsfa_state", None)
    if state is None:
        state = _ModelState()
        for m in [model, *_attention_modules(model)]:
            m._bsfa_state = state
    return state


def _check_model(model) -> None:
    if not (isinstance(model, torch.nn.Module) and hasattr(model, "config")
            and hasattr(model, "set_attn_implementation")):
        raise TypeError(f"model: expected a transformers PreTrainedModel, got {type(model).__name__}")


def _text_config(model):
    cfg = model.config
    return cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg


def _num_layers(model) -> int:
    return int(_text_config(model).num_hidden_layers)


def _check_causal_model(model) -> None:
    mods = _attention_modules(model)
    if not mods or not any(bool(m.is_causal) for m in mods):
        raise ValueError(f"model: expected a causal decoder (attention modules with is_causal=True), got "
                         f"{type(model).__name__}; BSFA only runs causal attention")


def _check_thresholds(model, thr: Thresholds) -> None:
    cfg = _text_config(model)
    if thr.num_layers != cfg.num_hidden_layers:
        raise ValueError(f"thresholds: expected {cfg.num_hidden_layers} layers (config.num_hidden_layers), "
                         f"got {thr.num_layers}")
    if thr.num_heads != cfg.num_attention_heads:
        raise ValueError(f"thresholds: expected {cfg.num_attention_heads} query heads (config.num_attention_heads), "
                         f"got {thr.num_heads}")
    on_cpu = all(p.device.type == "cpu" for p in model.parameters())
    if (thr.block_m, thr.block_n) != (BLOCK_M, BLOCK_N) and not on_cpu:
        raise ValueError(f"thresholds: expected the kernel's {BLOCK_M}x{BLOCK_N} tiles for a model on a GPU "
                         f"(other tiles run on the CPU reference only), got {thr.block_m}x{thr.block_n}")
    _check_causal_model(model)
    if not thr.causal:
        raise ValueError("thresholds: expected thresholds calibrated with the causal mask (the model is causal), "
                         "got causal=False")
    scale = thr.provenance.get("softmax_scale")
    if scale is not None:
        for m in _attention_modules(model):
            s = getattr(m, "scaling", None)
            if s is not None and not math.isclose(float(scale), float(s), rel_tol=1e-6):
                raise ValueError(f"thresholds: expected softmax_scale {float(s)!r} (layer {m.layer_idx}'s scaling), "
                                 f"got thresholds calibrated with {scale}")


def _per_layer_k(k, thr: Thresholds) -> list:
    """``k`` (an int, or one int-or-None per layer) as one entry per layer, each checked."""
    def one(value, what):
        if value is None and what != "k":
            return None
        if isinstance(value, bool) or not isinstance(value, numbers.Integral):
            raise TypeError(f"{what}: expected an int, one of the k values {list(thr.k_values)}, got "
                            f"{type(value).__name__} {value!r}")
        if value not in thr.k_values:
            raise ValueError(f"{what}: expected one of the k values {list(thr.k_values)}, got {value}")
        return int(value)

    if isinstance(k, (list, tuple)):
        if len(k) != thr.num_layers:
            raise ValueError(f"k: expected one entry per layer ({thr.num_layers}), got {len(k)}")
        return [one(v, f"k[{i}]") for i, v in enumerate(k)]
    return [one(k, "k")] * thr.num_layers


def _check_batch(ids, i: int):
    if not isinstance(ids, torch.Tensor):
        raise TypeError(f"batches[{i}]: expected a LongTensor of input_ids, got {type(ids).__name__}")
    if ids.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"batches[{i}]: expected integer input_ids, got dtype {ids.dtype}")
    if ids.ndim == 1:
        ids = ids[None]
    if ids.ndim != 2 or ids.shape[0] < 1 or ids.shape[1] < 1:
        raise ValueError(f"batches[{i}]: expected shape (B, N) or (N,), got {tuple(ids.shape)}")
    return ids


def _progress(total, enabled):
    from tqdm.auto import tqdm

    return tqdm(total=total, disable=not enabled, desc="bsfa calibrate", unit="sample")
