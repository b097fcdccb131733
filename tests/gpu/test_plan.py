"""AttentionPlan on the GPU: plan.run gives bitwise attention's out and lse (torch and CuPy, decode and
prefill, dense and thresholds, causal or not, head dims 64 and 128), runs on torch's current stream,
refuses a mismatched array before launching, takes out=, and never goes through DLPack. ``attention``'s
kept plans give bitwise its full path's results. The baseline is always the full path (``ops._attention``:
every check, view and allocation per call), never a plan."""
from __future__ import annotations

import numpy as np
import pytest

import bsfa_reference as ref
from tests.support.gpu import cp, random_inputs, requires_gpu, thresholds_from_maxima

pytestmark = [pytest.mark.gpu, requires_gpu]


def full_path(*args, **kw):
    from bsfa_cupy.ops import _attention

    return _attention(*args, **kw)

#: decode (1 row; 16 rows: packed GQA heads on the split-KV path) and a prefill shape (the unsplit kernels)
SHAPES = [(1, 4097), (16, 4097), (577, 577)]


def _torch():
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("torch without CUDA")
    return torch


def _inputs(framework, Nq, Nk, D, seed=0):
    dtype = "float16" if D == 128 else "bfloat16"
    rng = np.random.default_rng(seed + Nq + D)
    host = random_inputs(rng, 1, Nq, Nk, 8, 2, D, dtype)
    if framework == "torch":
        torch = _torch()
        import ml_dtypes

        def to_torch(x):
            if x.dtype == ml_dtypes.bfloat16:
                return torch.from_numpy(x.view(np.int16)).view(torch.bfloat16).cuda()
            return torch.from_numpy(x).cuda()

        return host, tuple(to_torch(x) for x in host)
    return host, tuple(cp.asarray(x) for x in host)


def _bits(x):
    """The raw bits of a torch or CuPy result, on the host."""
    if type(x).__module__.startswith("torch"):
        import torch

        as_int = {1: torch.uint8, 2: torch.int16, 4: torch.int32}[x.element_size()]
        return x.contiguous().view(as_int).cpu().numpy()
    return cp.asnumpy(x).view({1: np.uint8, 2: np.uint16, 4: np.uint32}[x.dtype.itemsize])


@pytest.mark.parametrize("framework", ["torch", "cupy"])
@pytest.mark.parametrize("Nq,Nk", SHAPES)
@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("mode", ["dense", "thresholds", "scalar"])
def test_run_is_attention_bitwise(framework, Nq, Nk, D, causal, mode):
    import bsfa_cupy

    host, (q, k, v) = _inputs(framework, Nq, Nk, D)
    thr = None
    if mode == "thresholds":
        thr = thresholds_from_maxima(ref.block_max_scores(host[0], host[1], causal=causal), Nq, Nk)
    elif mode == "scalar":
        thr = 0.25
    want_out, want_lse = full_path(q, k, v, thr, causal=causal, return_lse=True)
    plan = bsfa_cupy.AttentionPlan(q, k, v, thr, causal=causal, return_lse=True)
    for _ in range(2):  # the second run reuses the split-KV partials of the stream
        out, lse = plan.run(q, k, v)
        assert type(out) is type(q) and out.shape == q.shape and out.dtype == q.dtype
        assert np.array_equal(_bits(out), _bits(want_out)), f"{plan}: out differs from attention's"
        assert np.array_equal(_bits(lse), _bits(want_lse)), f"{plan}: lse differs from attention's"
    routed_split = Nq <= 64 and Nk >= 2048
    assert (plan.split is not None) == routed_split, plan
    for _ in range(2):  # attention's kept plan (array thresholds: the full path again)
        out, lse = bsfa_cupy.attention(q, k, v, thr, causal=causal, return_lse=True)
        assert np.array_equal(_bits(out), _bits(want_out)) and np.array_equal(_bits(lse), _bits(want_lse)), mode


@pytest.mark.parametrize("framework", ["torch", "cupy"])
def test_run_forced_split_count_and_backend(framework):
    import bsfa_cupy

    _, (q, k, v) = _inputs(framework, 3, 4097, 128, seed=5)
    for kw in (dict(num_splits=3), dict(backend="splitkv"), dict(backend="sm80")):
        want = full_path(q, k, v, **kw)
        got = bsfa_cupy.AttentionPlan(q, k, v, **kw).run(q, k, v)
        assert np.array_equal(_bits(got), _bits(want)), kw


@pytest.mark.parametrize("Nq,Nk", [(1, 4097), (577, 577)])
def test_run_on_torchs_current_side_stream(Nq, Nk):
    """Inputs produced on a busy side stream and consumed there by plan.run: correct with no synchronisation
    (a launch on another stream would read q before it is written)."""
    torch = _torch()
    import bsfa_cupy

    _, (q0, k0, v0) = _inputs("torch", Nq, Nk, 128, seed=9)
    want = full_path(q0, k0, v0)
    plan = bsfa_cupy.AttentionPlan(q0, k0, v0)
    torch.cuda.synchronize()
    side = torch.cuda.Stream()
    big = torch.randn(4096, 4096, device="cuda")
    with torch.cuda.stream(side):
        for _ in range(20):
            big = big @ big.T / 4096
        q = q0 + (big[0, 0] * 0).nan_to_num().to(q0.dtype)
        out = plan.run(q, k0, v0)
        same = torch.equal(out, want)  # on the side stream, after the run
    side.synchronize()
    assert same, "plan.run on torch's current (side) stream differs from attention's result"
    again = plan.run(q0, k0, v0)  # back on the default stream: its own partials
    torch.cuda.synchronize()
    assert torch.equal(again, want)


def test_run_on_cupys_current_stream():
    import bsfa_cupy

    _, (q, k, v) = _inputs("cupy", 1, 4097, 128, seed=11)
    want = full_path(q, k, v)
    plan = bsfa_cupy.AttentionPlan(q, k, v)
    s = cp.cuda.Stream(non_blocking=True)
    with s:
        out = plan.run(q, k, v)
    s.synchronize()
    assert np.array_equal(_bits(out), _bits(want))
    assert s.ptr in plan._workspaces


@pytest.mark.parametrize("framework", ["torch", "cupy"])
def test_mismatched_arrays_raise_before_any_launch(framework, monkeypatch):
    import bsfa_cupy
    from bsfa_cupy import _splitkv

    _, (q, k, v) = _inputs(framework, 1, 4097, 128, seed=2)
    plan = bsfa_cupy.AttentionPlan(q, k, v)
    launches = []
    monkeypatch.setattr(_splitkv, "launch_kernels", lambda *a, **kw: launches.append(a))
    _, (q2, k2, _) = _inputs(framework, 2, 4096, 128, seed=2)
    with pytest.raises(ValueError, match=r"q: does not match the plan: shape: expected \(1, 1, 8, 128\), got "
                                         r"\(1, 2, 8, 128\)"):
        plan.run(q2, k, v)
    with pytest.raises(ValueError, match=r"k: does not match the plan: shape: expected \(1, 4097, 2, 128\)"):
        plan.run(q, k2, v)
    other = q.to(dtype=_torch().bfloat16) if framework == "torch" else q.astype("float32")
    with pytest.raises(TypeError, match=r"q: does not match the plan: .*dtype: expected"):
        plan.run(other, k, v)
    if _has_torch():
        import torch

        wrong = cp.from_dlpack(q) if framework == "torch" else torch.from_dlpack(q)
        with pytest.raises(TypeError, match=r"q: expected a .* like the plan's example arrays"):
            plan.run(wrong, k, v)
    with pytest.raises(ValueError, match=r"out: does not match the plan"):
        plan.run(q, k, v, out=k)
    assert not launches


def _has_torch():
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:
        return False


@pytest.mark.parametrize("framework", ["torch", "cupy"])
@pytest.mark.parametrize("Nq,Nk", [(16, 4097), (577, 577)])
def test_out_is_written_in_place(framework, Nq, Nk):
    import bsfa_cupy

    _, (q, k, v) = _inputs(framework, Nq, Nk, 128, seed=4)
    want = full_path(q, k, v)
    plan = bsfa_cupy.AttentionPlan(q, k, v)
    out = (q * 0 + float("nan")) if framework == "cupy" else q.clone().fill_(float("nan"))
    got = plan.run(q, k, v, out=out)
    assert got is out and np.array_equal(_bits(out), _bits(want))


@pytest.mark.parametrize("framework", ["torch", "cupy"])
def test_run_never_goes_through_dlpack(framework, monkeypatch):
    import bsfa_cupy

    _, (q, k, v) = _inputs(framework, 1, 4097, 128, seed=6)
    plan = bsfa_cupy.AttentionPlan(q, k, v, return_lse=True)
    want = plan.run(q, k, v)

    def refuse(*a, **kw):
        raise AssertionError("plan.run went through DLPack")

    monkeypatch.setattr(cp, "from_dlpack", refuse)
    if framework == "torch":
        import torch

        monkeypatch.setattr(torch.Tensor, "__dlpack__", refuse)
    out, lse = plan.run(q, k, v)
    monkeypatch.undo()
    assert np.array_equal(_bits(out), _bits(want[0])) and np.array_equal(_bits(lse), _bits(want[1]))


def test_device_thresholds_and_private_copies():
    """A plan's array thresholds are its own copy: later writes to the source do not reach it."""
    import bsfa_cupy

    host, (q, k, v) = _inputs("cupy", 16, 4097, 128, seed=8)
    thr = cp.asarray(thresholds_from_maxima(ref.block_max_scores(host[0], host[1]), 16, 4097))
    want = full_path(q, k, v, thr)
    plan = bsfa_cupy.AttentionPlan(q, k, v, thr)
    thr.fill(-np.inf)  # keep everything, from now on, for anyone reading thr itself
    assert np.array_equal(_bits(plan.run(q, k, v)), _bits(want))
    handle = bsfa_cupy.DeviceThresholds(cp.asnumpy(thr))
    assert bsfa_cupy.AttentionPlan(q, k, v, handle).thresholds is handle


def test_launches_name_torchs_current_stream(monkeypatch):
    torch = _torch()
    import bsfa_cupy
    from bsfa_cupy import _splitkv

    _, (q, k, v) = _inputs("torch", 1, 4097, 128, seed=12)
    plan = bsfa_cupy.AttentionPlan(q, k, v)
    seen = []
    real = _splitkv.launch_kernels

    def spy(*a, stream=None, **kw):
        seen.append(stream.ptr)
        return real(*a, stream=stream, **kw)

    monkeypatch.setattr(_splitkv, "launch_kernels", spy)
    side = torch.cuda.Stream()
    with torch.cuda.stream(side):
        plan.run(q, k, v)
    plan.run(q, k, v)
    torch.cuda.synchronize()
    assert seen == [side.cuda_stream, torch.cuda.current_stream().cuda_stream]


@pytest.mark.parametrize("Nq,Nk", [(1, 4097), (577, 577)])
def test_one_plan_serves_every_layers_thresholds(Nq, Nk):
    """A model step: one plan (layer 0's table), each layer's DeviceThresholds passed to run — bitwise each
    layer's own attention call, on the split-KV and the unsplit path."""
    import bsfa_cupy

    host, (q, k, v) = _inputs("cupy", Nq, Nk, 128, seed=3)
    tm = ref.block_max_scores(host[0], host[1], causal=True)
    tables = [bsfa_cupy.DeviceThresholds(thresholds_from_maxima(tm, Nq, Nk) + shift) for shift in (0.0, 0.5, -0.5)]
    plan = bsfa_cupy.AttentionPlan(q, k, v, tables[0], return_lse=True)
    for thr in tables:
        want_out, want_lse = full_path(q, k, v, thr, return_lse=True)
        out, lse = plan.run(q, k, v, thresholds=thr)
        assert np.array_equal(_bits(out), _bits(want_out)) and np.array_equal(_bits(lse), _bits(want_lse)), plan
    with pytest.raises(ValueError, match=r"as planned"):
        plan.run(q, k, v, thresholds=bsfa_cupy.DeviceThresholds(np.zeros((8, 1), np.float32)))


@pytest.mark.parametrize("framework", ["torch", "cupy"])
@pytest.mark.parametrize("Nq,Nk", [(1, 4097), (577, 577)])
def test_attention_keeps_one_plan_for_every_layers_tables(framework, Nq, Nk, monkeypatch):
    """attention called as a model's layers call it (one layout, each layer's DeviceThresholds, a scalar, dense):
    one kept plan per kind of thresholds, each call bitwise its full path, outputs poisoned before the kernel."""
    import bsfa_cupy
    from bsfa_cupy import _plan_cache
    from tests.support.gpu import poison_outputs

    poison_outputs(monkeypatch)
    host, (q, k, v) = _inputs(framework, Nq, Nk, 128, seed=13)
    tm = ref.block_max_scores(host[0], host[1], causal=True)
    tables = [bsfa_cupy.DeviceThresholds(thresholds_from_maxima(tm, Nq, Nk) + shift) for shift in (0.0, 0.5, -0.5)]
    bsfa_cupy.clear_plan_cache()
    for thr in tables + [0.25, None] + tables:
        want_out, want_lse = full_path(q, k, v, thr, return_lse=True)
        out, lse = bsfa_cupy.attention(q, k, v, thr, return_lse=True)
        assert type(out) is type(q) and out.shape == q.shape
        assert np.array_equal(_bits(out), _bits(want_out)) and np.array_equal(_bits(lse), _bits(want_lse)), thr
    assert len(_plan_cache._plans) == 3, "one plan for the tables, one for the scalar, one dense"
    bsfa_cupy.clear_plan_cache()
