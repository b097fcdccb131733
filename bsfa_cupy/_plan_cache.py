"""The AttentionPlans that ``attention`` keeps by layout, so that repeated calls skip its host work.

A model's layers call attention with one layout many times per step (and a decode loop with a new key
length every step, the same across layers). ``attention`` spends 100-300 us of host time per call on
DLPack views, checks and packing Params; an :class:`AttentionPlan` run binds pointers and launches in
a few. ``attention`` therefore plans each layout once and runs the plan, for the calls a plan serves
exactly: torch CUDA tensors or CuPy arrays, thresholds None, a scalar or a :class:`DeviceThresholds`
(another table of the same shape runs through the same plan), no ``out`` and no ``return_keep``.
Everything else (JAX, host or raw device threshold arrays, which ``attention`` checks per call) takes
the full path. A plan gives bitwise the results of the full path; the cache only moves host work.
"""
from __future__ import annotations

import collections
import numbers
import threading

from .device_thresholds import DeviceThresholds
from .plan import AttentionPlan, _cupy_layout, _torch_layout

#: Plans kept (least recently used dropped first). A split-KV plan holds its fp32 partials per
#: stream (at most a few MB for one call), so the cache stays small.
MAX_PLANS = 32

_plans: collections.OrderedDict = collections.OrderedDict()
_lock = threading.Lock()


def _layouts(q, k, v):
    t = type(q)
    if type(k) is not t or type(v) is not t:
        return None
    mod = t.__module__.split(".")[0]
    if mod == "torch":
        return t, _torch_layout(q), _torch_layout(k), _torch_layout(v)
    if mod == "cupy":
        return t, _cupy_layout(q), _cupy_layout(k), _cupy_layout(v)
    return None


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
    key = (layouts, thr_key, causal, softmax_scale, return_lse, backend, q_start, k_start, num_splits)
    try:
        with _lock:
            plan = _plans.get(key)
            if plan is not None:
                _plans.move_to_end(key)
    except TypeError:  # an unhashable argument: the full path checks and reports it
        return None
    if plan is None:
        plan = AttentionPlan(q, k, v, thresholds, causal=causal, softmax_scale=softmax_scale, return_lse=return_lse,
                             num_splits=num_splits, backend=backend, q_start=q_start, k_start=k_start)
        with _lock:
            _plans[key] = plan
            while len(_plans) > MAX_PLANS:
                _plans.popitem(last=False)
    table = thresholds if isinstance(thresholds, DeviceThresholds) else None
    return plan.run(q, k, v, thresholds=table)


def clear() -> None:
    """Drop every kept plan (and the split-KV partials they hold)."""
    with _lock:
        _plans.clear()
