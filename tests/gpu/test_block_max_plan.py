"""BlockMaxPlan on the GPU: plan.run gives bitwise block_max_scores' tile maxima (torch and CuPy, head dims 64 and
128, causal or not, Nq != Nk, offsets, the sm90ws entry with its tensor maps and the mma.sync one without), for
other arrays of the planned layout too (their own maxima, not the examples'), on torch's current stream, and
refuses a mismatched array before launching; block_max_scores' kept plans give its full path's maxima. The baseline is
always the full path (ops._block_max_scores), never a plan."""
from __future__ import annotations

import numpy as np
import pytest

from tests.gpu.test_plan import _bits, _inputs, _torch
from tests.support.gpu import cp, requires_gpu

pytestmark = [pytest.mark.gpu, requires_gpu]


def full_path(q, k, *, causal=True, softmax_scale=None, backend="auto", q_start=None, k_start=0):
    from bsfa_cupy.ops import _block_max_scores

    return _block_max_scores(q, k, causal, softmax_scale, backend, q_start, k_start)


@pytest.mark.parametrize("framework", ["torch", "cupy"])
@pytest.mark.parametrize("Nq,Nk", [(577, 577), (300, 2100), (2100, 300)])
@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("backend", ["auto", "sm80"])
def test_run_is_block_max_scores_bitwise(framework, Nq, Nk, D, causal, backend, monkeypatch):
    from bsfa_cupy.block_max_plan import BlockMaxPlan
    from tests.support.gpu import poison_outputs

    poison_outputs(monkeypatch)

    _, (q, k, _) = _inputs(framework, Nq, Nk, D)
    _, (q2, k2, _) = _inputs(framework, Nq, Nk, D, seed=7)  # same layout, other values
    plan = BlockMaxPlan(q, k, causal=causal, backend=backend)
    for qq, kk in ((q, k), (q2, k2), (q, k)):
        want = full_path(qq, kk, causal=causal, backend=backend)
        got = plan.run(qq, kk)
        assert type(got) is type(want) and tuple(got.shape) == tuple(want.shape), f"{plan}: {got.shape}"
        same = _bits(got) == _bits(want)
        assert same.all(), f"{plan}: {int((~same).sum())} of {same.size} tile maxima differ from block_max_scores'"


def test_run_with_offsets_is_block_max_scores_bitwise():
    from bsfa_cupy.block_max_plan import BlockMaxPlan

    _, (q, k, _) = _inputs("cupy", 300, 700, 128)
    for q0, k0 in ((384, 128), (0, 512)):
        want = full_path(q, k, q_start=q0, k_start=k0)
        got = BlockMaxPlan(q, k, q_start=q0, k_start=k0).run(q, k)
        assert np.array_equal(_bits(got), _bits(want)), f"q_start={q0} k_start={k0}: tile maxima differ"


def test_run_launches_on_torchs_current_stream():
    torch = _torch()
    from bsfa_cupy.block_max_plan import BlockMaxPlan

    _, (q, k, _) = _inputs("torch", 577, 577, 128)
    want = full_path(q, k)
    plan = BlockMaxPlan(q, k)
    s = torch.cuda.Stream()
    with torch.cuda.stream(s):
        assert plan._io.stream().ptr == s.cuda_stream, "the plan does not launch on torch's current stream"
        got = plan.run(q, k)
    s.synchronize()
    assert np.array_equal(_bits(got), _bits(want)), "tile maxima differ when run on a side stream"


def test_run_refuses_a_mismatched_array_before_launching():
    from bsfa_cupy.block_max_plan import BlockMaxPlan

    _, (q, k, _) = _inputs("cupy", 577, 577, 64)
    plan = BlockMaxPlan(q, k)
    with pytest.raises(ValueError, match=r"k: does not match the plan: shape: expected \(1, 577, 2, 64\), got "
                                         r"\(1, 576, 2, 64\)"):
        plan.run(q, k[:, :576])
    with pytest.raises(TypeError, match=r"dtype: expected bfloat16, got float16"):
        plan.run(q, cp.zeros(k.shape, cp.float16))


@pytest.mark.parametrize("framework", ["torch", "cupy"])
def test_block_max_scores_keeps_one_plan_per_layout(framework, monkeypatch):
    """block_max_scores called repeatedly: one kept plan per layout, each call bitwise its full path, the tile
    maxima poisoned before the kernel."""
    import bsfa_cupy
    from bsfa_cupy import _plan_cache
    from tests.support.gpu import poison_outputs

    poison_outputs(monkeypatch)
    bsfa_cupy.clear_plan_cache()
    _, (q, k, _) = _inputs(framework, 577, 2100, 128, seed=3)
    _, (q2, k2, _) = _inputs(framework, 577, 2100, 128, seed=5)
    for qq, kk in ((q, k), (q2, k2), (q, k)):
        want = full_path(qq, kk)
        got = bsfa_cupy.block_max_scores(qq, kk)
        same = _bits(got) == _bits(want)
        assert type(got) is type(want) and same.all(), f"{int((~same).sum())} of {same.size} tile maxima differ"
    bsfa_cupy.block_max_scores(q, k, causal=False)
    assert len(_plan_cache._plans) == 2, "one plan per layout and arguments"
    bsfa_cupy.clear_plan_cache()
