"""attention's kept plans, on the host: which calls a plan serves, the key (layout, thresholds kind,
arguments), reuse, a per-run thresholds table, and the size bound. AttentionPlan is stood in for by a
recorder (the GPU tests compare the kept plans' results with the full path bitwise)."""
from __future__ import annotations

import numpy as np
import pytest

from bsfa_cupy import _plan_cache
from bsfa_cupy.device_thresholds import DeviceThresholds

torch = pytest.importorskip("torch")


class _Recorder:
    built: list = []

    def __init__(self, q, k, v, thresholds, **kw):
        self.thresholds, self.kw, self.runs = thresholds, kw, []
        _Recorder.built.append(self)

    def run(self, q, k, v, *, thresholds=None):
        self.runs.append(thresholds)
        return ("result of", self)


def _recording(monkeypatch, name, recorder):
    """_plan_cache's plan class `name` replaced by recorder, over an empty cache; yields the plans it builds."""
    monkeypatch.setattr(_plan_cache, name, recorder)
    monkeypatch.setattr(recorder, "built", [])
    _plan_cache.clear()
    yield recorder.built
    _plan_cache.clear()


@pytest.fixture
def plans(monkeypatch):
    yield from _recording(monkeypatch, "AttentionPlan", _Recorder)


def _qkv(Nq=1, Nk=256, Hq=4, Hkv=2, D=64):
    return (torch.zeros(1, Nq, Hq, D, dtype=torch.float16), torch.zeros(1, Nk, Hkv, D, dtype=torch.float16),
            torch.zeros(1, Nk, Hkv, D, dtype=torch.float16))


def _call(q, k, v, thresholds=None, **kw):
    args = dict(causal=True, softmax_scale=None, return_lse=False, backend="auto", q_start=None, k_start=0,
                num_splits=None)
    args.update(kw)
    return _plan_cache.run(q, k, v, thresholds, *args.values())


def _table(shape=(4, 3)):
    return DeviceThresholds._adopt(np.zeros(shape, np.float32), 0)


def test_one_plan_per_layout_and_arguments(plans):
    q, k, v = _qkv()
    first = _call(q, k, v)
    assert first[0] == "result of" and len(plans) == 1
    assert _call(*_qkv()) == first, "a second call of the same layout must reuse the plan"
    assert len(plans) == 1 and plans[0].runs == [None, None]
    _call(*_qkv(Nk=257))  # decode: the next step's key length is another layout
    _call(q, k, v, causal=False)
    _call(q, k, v, return_lse=True)
    _call(q, k, v, softmax_scale=0.5)
    _call(q, k, v, num_splits=3)
    _call(q, k, v, q_start=128)
    _call(q, k.transpose(1, 2).contiguous().transpose(1, 2), v)  # same shape, other strides
    assert len(plans) == 8


def test_thresholds_kinds(plans):
    q, k, v = _qkv()
    _call(q, k, v, 0.5)
    _call(q, k, v, np.float32(0.5))  # the same scalar value
    _call(q, k, v, 0.25)
    assert len(plans) == 2
    a, b = _table(), _table()
    _call(q, k, v, a)
    _call(q, k, v, b)
    assert len(plans) == 3, "tables of one shape share a plan"
    assert plans[2].runs == [a, b], "each run must bind its own table"
    _call(q, k, v, _table((4, 5)))
    assert len(plans) == 4


@pytest.mark.parametrize("thresholds", [np.zeros((4, 3), np.float32), True, [0.5]])
def test_per_call_thresholds_take_the_full_path(plans, thresholds):
    """Host arrays (copied per call), bools (refused by the full path) and other objects are not planned."""
    assert _call(*_qkv(), thresholds) is None and not plans


def test_mixed_or_unknown_arrays_take_the_full_path(plans):
    q, k, v = _qkv()
    assert _call(q, k.numpy(), v) is None
    assert _call(q.numpy(), k.numpy(), v.numpy()) is None
    assert not plans


def test_unhashable_argument_takes_the_full_path(plans):
    assert _call(*_qkv(), softmax_scale=[1.0]) is None and not plans


def test_oldest_plan_dropped_past_the_bound(plans, monkeypatch):
    monkeypatch.setattr(_plan_cache, "MAX_PLANS", 3)
    for Nk in (256, 257, 258):
        _call(*_qkv(Nk=Nk))
    _call(*_qkv(Nk=256))  # most recently used now
    _call(*_qkv(Nk=259))  # drops 257
    assert len(_plan_cache._plans) == 3
    _call(*_qkv(Nk=256))
    assert len(plans) == 4, "256 must still be kept"
    _call(*_qkv(Nk=257))
    assert len(plans) == 5, "257 was the least recently used and must have been dropped"


def test_clear_plan_cache(plans):
    import bsfa_cupy

    _call(*_qkv())
    bsfa_cupy.clear_plan_cache()
    _call(*_qkv())
    assert len(plans) == 2


class _BlockMaxRecorder:
    built: list = []

    def __init__(self, q, k, **kw):
        self.kw, self.runs = kw, 0
        _BlockMaxRecorder.built.append(self)

    def run(self, q, k):
        self.runs += 1
        return ("maxima of", self)


@pytest.fixture
def block_max_plans(monkeypatch):
    yield from _recording(monkeypatch, "BlockMaxPlan", _BlockMaxRecorder)


def _block_max(q, k, **kw):
    args = dict(causal=True, softmax_scale=None, backend="auto", q_start=None, k_start=0)
    args.update(kw)
    return _plan_cache.run_block_max(q, k, *args.values())


def test_block_max_one_plan_per_layout_and_arguments(block_max_plans):
    q, k, _ = _qkv(Nq=300)
    first = _block_max(q, k)
    assert first[0] == "maxima of" and _block_max(*_qkv(Nq=300)[:2]) == first
    assert len(block_max_plans) == 1 and block_max_plans[0].runs == 2
    _block_max(q, k, causal=False)
    _block_max(q, k, softmax_scale=0.5)
    _block_max(q, k, q_start=128)
    _block_max(q, k, k_start=64)
    _block_max(q, k, backend="sm80")
    _block_max(*_qkv(Nq=301)[:2])
    assert len(block_max_plans) == 7
    assert block_max_plans[1].kw == dict(causal=False, softmax_scale=None, backend="auto", q_start=None, k_start=0)


def test_block_max_and_attention_plans_share_the_bound(block_max_plans, plans, monkeypatch):
    monkeypatch.setattr(_plan_cache, "MAX_PLANS", 2)
    q, k, v = _qkv()
    _call(q, k, v)
    _block_max(q, k)
    _block_max(q, k, causal=False)  # drops the attention plan
    _call(q, k, v)
    assert len(plans) == 2 and len(block_max_plans) == 2 and len(_plan_cache._plans) == 2


def test_block_max_unplanned_calls_take_the_full_path(block_max_plans):
    q, k, _ = _qkv()
    assert _block_max(q, k.numpy()) is None
    assert _block_max(q.numpy(), k.numpy()) is None
    assert _block_max(q, k, softmax_scale=[1.0]) is None
    assert not block_max_plans
