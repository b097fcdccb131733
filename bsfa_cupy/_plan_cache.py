"""The plans that ``attention`` and ``block_max_scores`` keep by layout, so that repeated calls skip their host work.

A model's layers call attention with one layout many times per step (and a decode loop with a new key
length every step, the same across layers). ``attention`` spends 100-300 us of host time per call on
DLPack views, checks and packing Params; an :class:`AttentionPlan` run binds pointers and launches in
a few. ``attention`` therefore plans each layout once and runs the plan, for the calls a plan serves
exactly: torch CUDA tensors or CuPy arrays, thresholds None, a scalar or a :class:`DeviceThresholds`
(another table of the same shape runs through the same plan), no ``out`` and no ``return_keep``.
Everything else (JAX, host or raw device threshold arrays, which ``attention`` checks per call) takes
the full path. ``block_max_scores`` keeps a :class:`BlockMaxPlan` per layout of torch or CuPy q and k the same
way (~440 us of host time a call otherwise, a third of a 16K call's kernel time on an H200). A plan gives bitwise
the results of the full path; the cache only moves host work.
"""
from __future__ import annotations

import collections
import numbers
import threading

from .block_max_plan import BlockMaxPlan
from .device_thresholds import DeviceThresholds
from .plan import AttentionPlan, _cupy_layout, _torch_layout

#: Plans kept (least recently used dropped first). A split-KV plan holds its fp32 partials per
#: stream (at most a few MB for one call), so the cache stays small.
MAX_PLANS = 32

_plans: collections.OrderedDict = collections.OrderedDict()
_lock = threading.Lock()


def _layouts(*arrays):
    t = type(arrays[0])
    if any(type(x) is not t for x in arrays):
        return None
    mod = t.__module__.split(".")[0]
    if mod == "torch":
        return (t, *map(_torch_layout, arrays))
    if mod == "cupy":
        return (t, *map(_cupy_layout, arrays))
    return None


def _kept(key, build):
    """The plan kept under key (built by build() the first time), or None for an unhashable key."""
    try:
        with _lock:
            plan = _plans.get(key)
            if plan is not None:
                _plans.move_to_end(key)
    except TypeError:  # an unhashable argument: the full path checks and reports it
        return None
    if plan is None:
        plan = build()
        with _lock:
            _plans[key] = plan
            while len(_plans) > MAX_PLANS:
                _plans.popitem(last=False)
    return plan


def _thresholds_key(thresholds):
    if thresholds is None:
        return (None,)
    if isinstance(thresholds, DeviceThresholds):
        return ("table", tuple(thresholds.array.shape), thresholds.device_id)
    if isinstance(thresholds, numbers.Real) and not isinstance(thresholds, bool):
        return ("scalar", float(thresholds))
    return None


def run(q, k, v, thresholds, causal, softmax_scale, return_lse, backend, q_start, k_start, num_splits):
    """The call's result through a kept plan, or None where a plan does not serve the call."""
    layouts = _layouts(q, k, v)
    thr_key = _thresholds_key(thresholds)
    if layouts is None or thr_key is None:
        return None
    key = ("attention", layouts, thr_key, causal, softmax_scale, return_lse, backend, q_start, k_start, num_splits)
    plan = _kept(key, lambda: AttentionPlan(q, k, v, thresholds, causal=causal, softmax_scale=softmax_scale,
                                            return_lse=return_lse, num_splits=num_splits, backend=backend,
                                            q_start=q_start, k_start=k_start))
    if plan is None:
        return None
    table = thresholds if isinstance(thresholds, DeviceThresholds) else None
    return plan.run(q, k, v, thresholds=table)


def run_block_max(q, k, causal, softmax_scale, backend, q_start, k_start):
    """block_max_scores' result through a kept plan, or None where a plan does not serve the call."""
    layouts = _layouts(q, k)
    if layouts is None:
        return None
    key = ("block_max", layouts, causal, softmax_scale, backend, q_start, k_start)
    plan = _kept(key, lambda: BlockMaxPlan(q, k, causal=causal, softmax_scale=softmax_scale, backend=backend,
                                           q_start=q_start, k_start=k_start))
    return None if plan is None else plan.run(q, k)


def clear() -> None:
    """Drop every kept plan (and the split-KV partials they hold)."""
    with _lock:
        _plans.clear()
