"""bsfa_cupy.attention_varlen (one launch over a packed batch) on every kernel's packed entry against
bsfa_reference.attention_varlen, and its refusal of bad offsets before any launch.

Cost: the float64 reference of a problem is computed once and shared by the kernels' runs
(expected_for): the derandomized hypothesis profiles draw the same problems for each backend, and
the edge-length cases differ between backends and array kinds only on the GPU side.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass, field

import numpy as np
import pytest
from hypothesis import HealthCheck, given, note, settings
from hypothesis import strategies as st

import bsfa_reference as ref
from tests.support.gpu import (
    kernel_backend,
    HOST_DTYPES,
    check_against_reference,
    cp,
    gate_exemptions,
    poison_outputs,
    reference_outputs,
    requires_gpu,
    rounding_margin,
    scalar_threshold,
    thresholds_from_maxima,
    without_head_pairs,
)

pytestmark = [pytest.mark.gpu, requires_gpu]

BM, BN = ref.BLOCK_M, ref.BLOCK_N
#: lengths at the tile edges, and empty sequences
EDGE_LENGTHS = [0, 1, 127, 128, 129, 577]


def _is_hopper() -> bool:
    return cp is not None and str(cp.cuda.Device().compute_capability) == "90"


@pytest.fixture(params=["sm80", "sm90", "sm90ws"])
def backend(request):
    """Every packed-batch entry, named explicitly: "sm80" (mma.sync) everywhere, and on Hopper "sm90" (one
    warpgroup) and "sm90ws" (warp-specialised, TMA; it needs cuda-bindings), which "auto" runs there
    (test_varlen_equals_separate_calls_bitwise checks that). Tests map head dims other than 64 / 128 to
    "sm80" (kernel_backend)."""
    if request.param != "sm80" and not _is_hopper():
        pytest.skip(f"off Hopper, {request.param!r} does not run")
    if request.param == "sm90ws":
        from bsfa_cupy import _tma

        if not _tma.available():
            pytest.skip("sm90ws needs cuda-bindings for its tensor maps")
    return request.param


def _torch_cuda():
    try:
        import torch
    except ImportError:
        return None
    return torch if torch.cuda.is_available() else None


def packed_inputs(rng, len_q, len_k, Hq, Hkv, D, dtype):
    """Host q (total_q, Hq, D), k, v (total_k, Hkv, D) and int32 cu_seqlens for the given lengths."""
    ht = HOST_DTYPES[dtype]
    cu_q = np.concatenate([[0], np.cumsum(len_q)]).astype(np.int32)
    cu_k = np.concatenate([[0], np.cumsum(len_k)]).astype(np.int32)
    q = rng.standard_normal((int(cu_q[-1]), Hq, D)).astype(ht)
    k = rng.standard_normal((int(cu_k[-1]), Hkv, D)).astype(ht)
    v = rng.standard_normal((int(cu_k[-1]), Hkv, D)).astype(ht)
    return q, k, v, cu_q, cu_k


def shared_thresholds(q, k, cu_q, cu_k, causal, mode, D):
    """Thresholds for the whole batch from its longest sequence's tile maxima (None / scalar / (Hq, T))."""
    if mode == "none":
        return None
    lq = np.diff(cu_q)
    s = int(np.argmax(lq))
    if lq[s] == 0 or cu_k[s + 1] == cu_k[s]:
        return 0.0
    qs, ks = q[cu_q[s]:cu_q[s + 1]][None], k[cu_k[s]:cu_k[s + 1]][None]
    tile_max = ref.block_max_scores(qs, ks, causal=causal)
    margin = rounding_margin(qs, ks, causal, D)
    if mode == "scalar":
        return scalar_threshold(tile_max, margin)
    return thresholds_from_maxima(tile_max, qs.shape[1], ks.shape[1], margin=margin)


def to_device(x, kind):
    if kind == "torch":
        torch = _torch_cuda()
        if x.dtype == HOST_DTYPES["bfloat16"]:
            return torch.from_numpy(x.view(np.int16)).cuda().view(torch.bfloat16)
        return torch.from_numpy(x).cuda()
    return cp.asarray(x)


def to_host(x, dtype=None):
    if type(x).__module__.split(".")[0] == "torch":
        import torch

        if x.dtype == torch.bfloat16:
            return x.view(torch.int16).cpu().numpy().view(HOST_DTYPES["bfloat16"])
        return x.cpu().numpy()
    return cp.asnumpy(x)


@dataclass
class Expected:
    """One problem's host inputs and what the reference says of them, shared by every kernel's run."""

    q: np.ndarray
    k: np.ndarray
    v: np.ndarray
    cu_q: np.ndarray
    cu_k: np.ndarray
    thr: object
    ref_lse: np.ndarray
    ref_keep: np.ndarray
    exempt: np.ndarray  # keep tiles whose decision may flip with fp32 rounding (gate_exemptions)
    outputs: dict = field(default_factory=dict)  # (sequence, its keep as bytes) -> reference_outputs

    def sequence_outputs(self, s, keep, causal, scale, dtype):
        """reference_outputs of sequence s replaying ``keep`` (a kernel's; almost always the reference's)."""
        key = (s, keep.shape, keep.tobytes())
        if key not in self.outputs:
            q0, q1, k0, k1 = (int(x) for x in (self.cu_q[s], self.cu_q[s + 1], self.cu_k[s], self.cu_k[s + 1]))
            self.outputs[key] = reference_outputs(self.q[q0:q1][None], self.k[k0:k1][None], self.v[k0:k1][None],
                                                  keep, causal, scale, dtype)
        return self.outputs[key]


def problem_key(p) -> tuple:
    """p as a hashable key, without what only the GPU side depends on (the array kind)."""
    return tuple(sorted((name, tuple(x) if isinstance(x, list) else x) for name, x in p.items() if name != "kind"))


@functools.lru_cache(maxsize=64)
def expected_for(key) -> Expected:
    p = dict(key)
    rng = np.random.default_rng(p["seed"])
    D, dtype, causal = p["D"], p["dtype"], p["causal"]
    q, k, v, cu_q, cu_k = packed_inputs(rng, p["len_q"], p["len_k"], p["Hq"], p["Hkv"], D, dtype)
    thr = shared_thresholds(q, k, cu_q, cu_k, causal, p["mode"], D)
    _, ref_lse, ref_keep = ref.attention_varlen(q, k, v, cu_q, cu_k, thr, causal=causal, return_lse=True,
                                                return_keep=True, max_seqlen_q=p.get("max_seqlen_q"))
    exempt = np.zeros_like(ref_keep)
    if thr is not None:
        for s in range(len(p["len_q"])):
            q0, q1, k0, k1 = int(cu_q[s]), int(cu_q[s + 1]), int(cu_k[s]), int(cu_k[s + 1])
            if q1 == q0 or k1 == k0:
                continue
            qs, ks = q[q0:q1][None], k[k0:k1][None]
            tm = ref.block_max_scores(qs, ks, causal=causal)
            am = ref.block_max_scores(np.abs(qs.astype(np.float64)), np.abs(ks.astype(np.float64)), causal=causal)
            sq, sk = -(-(q1 - q0) // BM), -(-(k1 - k0) // BN)
            exempt[s:s + 1, :, :sq, :sk] = gate_exemptions(tm, am, np.asarray(thr, np.float32), q1 - q0, k1 - k0, D)
    return Expected(q, k, v, cu_q, cu_k, thr, ref_lse, ref_keep, exempt)


def run_varlen(p, monkeypatch, backend):
    """One attention_varlen call against the reference; every sequence checked as its own attention."""
    import bsfa_cupy

    backend = kernel_backend(backend, p["D"])
    D, dtype, causal = p["D"], p["dtype"], p["causal"]
    if p["kind"] == "torch" and _torch_cuda() is None:
        pytest.skip("needs torch with CUDA")
    e = expected_for(problem_key(p))
    q, cu_q, cu_k = e.q, e.cu_q, e.cu_k
    dev = [to_device(x, p["kind"]) for x in (q, e.k, e.v, cu_q, cu_k)]
    poison_outputs(monkeypatch)
    out, lse, keep = bsfa_cupy.attention_varlen(*dev, e.thr, causal=causal, return_lse=True, return_keep=True,
                                                max_seqlen_q=p.get("max_seqlen_q"), backend=backend)
    assert type(out).__module__.split(".")[0] == ("torch" if p["kind"] == "torch" else "cupy")
    out, lse = to_host(out).astype(np.float64), to_host(lse).astype(np.float64)
    keep_u8 = to_host(keep).view(np.uint8)
    assert set(np.unique(keep_u8)) <= {0, 1}, f"keep has unwritten entries: values {np.unique(keep_u8)}"
    kernel_keep = keep_u8.astype(bool)

    ref_lse, ref_keep = e.ref_lse, e.ref_keep
    assert out.shape == q.shape[:2] + (D,) and lse.shape == ref_lse.shape and keep_u8.shape == ref_keep.shape, (
        f"shapes: out {out.shape}, lse {lse.shape} (want {ref_lse.shape}), keep {keep_u8.shape} (want {ref_keep.shape})"
    )
    scale = 1.0 / np.sqrt(D)
    worst = (0.0, 0.0)
    for s in range(len(p["len_q"])):
        q0, q1, k0, k1 = int(cu_q[s]), int(cu_q[s + 1]), int(cu_k[s]), int(cu_k[s + 1])
        sq, sk = -(-(q1 - q0) // BM), -(-(k1 - k0) // BN)
        if q1 == q0:
            continue
        if k1 == k0:  # rows without keys: out 0, lse -inf
            assert not out[q0:q1].any(), f"sequence {s}: rows without keys must give out 0"
            assert (lse[:, q0:q1] == -np.inf).all(), f"sequence {s}: rows without keys must give lse -inf"
            continue
        keep_s = kernel_keep[s:s + 1, :, :sq, :sk]
        errs = check_against_reference(out[q0:q1][None], lse[:, q0:q1][None], q[q0:q1][None], e.k[k0:k1][None],
                                       e.v[k0:k1][None], keep_s, causal, scale, dtype,
                                       what=f"{backend}: sequence {s} of {p}",
                                       expected=e.sequence_outputs(s, keep_s, causal, scale, dtype))
        worst = max(worst, errs)
    differ = (kernel_keep != ref_keep) & ~e.exempt
    assert not differ.any(), (
        f"{backend}: keep differs from the reference at {int(differ.sum())} tiles "
        f"(first {np.argwhere(differ)[:5].tolist()})"
    )
    return f"exempt tiles {int(e.exempt.sum())}, kept {int(kernel_keep.sum())}", worst


@st.composite
def varlen_problems(draw):
    n = draw(st.integers(1, 4))
    length = st.one_of(st.sampled_from(EDGE_LENGTHS), st.integers(1, 300))
    len_q = draw(st.lists(length, min_size=n, max_size=n))
    self_attn = draw(st.booleans())
    len_k = len_q if self_attn else draw(st.lists(length, min_size=n, max_size=n))
    Hkv = draw(st.integers(1, 2))
    return dict(
        len_q=len_q, len_k=len_k, Hkv=Hkv, Hq=Hkv * draw(st.sampled_from([1, 2, 4])),
        D=draw(st.sampled_from([64, 128, 64, 128, 32, 96])),
        dtype=draw(st.sampled_from(["float16", "bfloat16"])),
        causal=draw(st.booleans()),
        mode=draw(st.sampled_from(["none", "scalar", "maxima", "maxima"])),
        # torch inputs only where torch has CUDA (a skip inside a hypothesis example would skip the test)
        kind=draw(st.sampled_from(["cupy", "cupy", "torch"] if _torch_cuda() is not None else ["cupy"])),
        seed=draw(st.integers(0, 2**31 - 1)),
    )


@given(varlen_problems())
@settings(suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])  # examples: profile
def test_varlen_matches_reference(monkeypatch, backend, p):
    with monkeypatch.context() as m:
        info, (err, base_err) = run_varlen(p, m, backend)
    note(f"{info}; out error {err:.2e} vs low-precision baseline {base_err:.2e}")


@pytest.mark.parametrize("kind", ["cupy", "torch"])
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("D", [64, 128])
def test_varlen_edge_lengths(monkeypatch, backend, kind, causal, D):
    """Every edge length in one batch (empty sequences first, in the middle and last), queries and keys of
    different lengths, and a max_seqlen_q wider than the longest sequence."""
    p = dict(len_q=[0, 1, 127, 0, 128, 129, 577, 0], len_k=[5, 1, 200, 0, 128, 64, 577, 3], Hkv=2, Hq=4, D=D,
             dtype="bfloat16", causal=causal, mode="maxima", kind=kind, seed=D + causal, max_seqlen_q=700)
    run_varlen(p, monkeypatch, backend)


def test_varlen_equals_separate_calls_bitwise(monkeypatch, backend):
    """Each sequence of a packed call is bit for bit the fixed-length call on that sequence alone (on the entries
    of the packed kernel's arithmetic: not bsfa_fwd_headpair, whose 64-key blocks round differently)."""
    import bsfa_cupy

    without_head_pairs(monkeypatch)
    rng = np.random.default_rng(3)
    len_q = len_k = [300, 129, 640]
    q, k, v, cu_q, cu_k = packed_inputs(rng, len_q, len_k, 4, 2, 128, "float16")
    dev = [cp.asarray(x) for x in (q, k, v, cu_q, cu_k)]
    out, lse, keep = bsfa_cupy.attention_varlen(*dev, 1.0, return_lse=True, return_keep=True, backend=backend)
    if backend == "sm90ws":  # what "auto" runs on Hopper, where cuda-bindings is there
        auto = bsfa_cupy.attention_varlen(*dev, 1.0, return_lse=True, return_keep=True)
        for name, a, b in zip(("out", "lse", "keep"), auto, (out, lse, keep)):
            assert cp.array_equal(a, b), f"auto: {name} differs from sm90ws's"
    for s in range(3):
        q0, q1, k0, k1 = cu_q[s], cu_q[s + 1], cu_k[s], cu_k[s + 1]
        o, l, kp = bsfa_cupy.attention(dev[0][None, q0:q1], dev[1][None, k0:k1], dev[2][None, k0:k1], 1.0,
                                       return_lse=True, return_keep=True, backend=backend)
        assert cp.array_equal(out[q0:q1], o[0]), f"sequence {s}: out differs from its own call"
        assert cp.array_equal(lse[:, q0:q1], l[0]), f"sequence {s}: lse differs from its own call"
        assert cp.array_equal(keep[s, :, :kp.shape[2], :kp.shape[3]], kp[0]), f"sequence {s}: keep differs"
        assert not keep[s, :, kp.shape[2]:].any() and not keep[s, :, :, kp.shape[3]:].any()


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("D,dtype", [(64, "bfloat16"), (128, "float16")])
def test_non_finite_rows_stay_in_their_sequence(monkeypatch, backend, causal, D, dtype):
    """NaN / inf in a sequence's first rows of q, k and v, right where the boxes of the sequence before it
    (ragged: 200 queries and keys) run past its end, poison no other sequence: every clean sequence is
    finite and bit for bit its own fixed-length call (P = 0 times a non-finite V would be NaN; on the packed
    kernel's arithmetic, as test_varlen_equals_separate_calls_bitwise)."""
    without_head_pairs(monkeypatch)
    import bsfa_cupy

    rng = np.random.default_rng(5)
    len_q, len_k = [200, 129, 64], [200, 70, 300]
    q, k, v, cu_q, cu_k = packed_inputs(rng, len_q, len_k, 2, 1, D, dtype)
    q[200, 0, :4], k[201, 0, :4], v[200, 0, 0], v[202, 0, 1] = np.nan, np.inf, np.nan, -np.inf
    dev = [cp.asarray(x) for x in (q, k, v, cu_q, cu_k)]
    backend = kernel_backend(backend, D)
    for thr in (None, 1.0):
        out, lse = bsfa_cupy.attention_varlen(*dev, thr, causal=causal, return_lse=True, backend=backend)
        for s in (0, 2):  # sequence 1 holds the non-finite rows
            q0, q1, k0, k1 = cu_q[s], cu_q[s + 1], cu_k[s], cu_k[s + 1]
            o, l = bsfa_cupy.attention(dev[0][None, q0:q1], dev[1][None, k0:k1], dev[2][None, k0:k1], thr,
                                       causal=causal, return_lse=True, backend=backend)
            assert cp.isfinite(out[q0:q1]).all(), f"sequence {s} (thresholds {thr}): non-finite out"
            assert cp.array_equal(out[q0:q1], o[0]), f"sequence {s} (thresholds {thr}): out differs from its own call"
            assert cp.array_equal(lse[:, q0:q1], l[0]), f"sequence {s} (thresholds {thr}): lse differs"


def test_varlen_without_rows(backend):
    """No sequence, and only empty sequences: empty results of the documented shapes, nothing launched."""
    import bsfa_cupy

    for cu in ([0], [0, 0, 0]):
        cu_d = cp.asarray(np.array(cu, np.int32))
        q = cp.zeros((0, 2, 64), cp.float16)
        out, lse, keep = bsfa_cupy.attention_varlen(q, q, q, cu_d, cu_d, return_lse=True, return_keep=True,
                                                    backend=backend)
        assert out.shape == (0, 2, 64) and lse.shape == (2, 0) and keep.shape == (len(cu) - 1, 2, 0, 0)


def _bad_offset_cases():
    good = np.array([0, 100, 100, 300], np.int32)
    return [
        ("dtype", dict(cu_q=good.astype(np.int64)), TypeError, r"cu_seqlens_q: expected dtype int32, got int64"),
        ("decreasing", dict(cu_q=np.array([0, 200, 100, 300], np.int32)), ValueError,
         r"cu_seqlens_q: expected non-decreasing offsets, got cu_seqlens_q\[2\] = 100 < cu_seqlens_q\[1\] = 200"),
        ("first", dict(cu_k=np.array([1, 100, 100, 300], np.int32)), ValueError, r"cu_seqlens_k\[0\] == 0, got 1"),
        ("last", dict(cu_q=np.array([0, 100, 100, 299], np.int32)), ValueError,
         r"cu_seqlens_q: expected last entry 300 \(the packed length\), got 299"),
        ("count", dict(cu_k=np.array([0, 300], np.int32)), ValueError,
         r"cu_seqlens_k: expected length 4 \(the same number of sequences as cu_seqlens_q\), got 2"),
        ("rank", dict(cu_q=good[None]), ValueError, r"cu_seqlens_q: expected a 1-D array"),
        ("max_q", dict(max_seqlen_q=199), ValueError, r"max_seqlen_q: expected an int >= 200"),
        ("max_k", dict(max_seqlen_k=1.5), TypeError, r"max_seqlen_k: expected an int or None, got float"),
    ]


@pytest.mark.parametrize("name,kw,error,message", _bad_offset_cases(), ids=[c[0] for c in _bad_offset_cases()])
def test_bad_cu_seqlens_are_refused_before_launch(backend, name, kw, error, message):
    import bsfa_cupy

    good = np.array([0, 100, 100, 300], np.int32)
    q = cp.ones((300, 2, 64), cp.float16)
    out = cp.full(q.shape, np.nan, cp.float16)
    kw = dict(kw)  # shared by both backends' runs
    cu_q, cu_k = cp.asarray(kw.pop("cu_q", good)), cp.asarray(kw.pop("cu_k", good))
    with pytest.raises(error, match=message):
        bsfa_cupy.attention_varlen(q, q, q, cu_q, cu_k, out=out, backend=backend, **kw)
    cp.cuda.get_current_stream().synchronize()
    assert cp.isnan(out).all(), "the kernel ran although the offsets were refused"


def test_host_or_foreign_cu_seqlens_are_refused(backend):
    import bsfa_cupy

    good = np.array([0, 100, 300], np.int32)
    q = cp.ones((300, 2, 64), cp.float16)
    with pytest.raises(TypeError, match=r"cu_seqlens_q: got a host numpy.ndarray"):
        bsfa_cupy.attention_varlen(q, q, q, good, cp.asarray(good), backend=backend)
    torch = _torch_cuda()
    if torch is not None:
        with pytest.raises(TypeError, match=r"cu_seqlens_k: got a torch tensor on cpu"):
            bsfa_cupy.attention_varlen(q, q, q, cp.asarray(good), torch.from_numpy(good), backend=backend)
    if cp.cuda.runtime.getDeviceCount() > 1:
        with cp.cuda.Device(1):
            other = cp.asarray(good)
        with pytest.raises(ValueError, match=r"all arrays must be on one GPU, got .*cu_seqlens_q on cuda:1"):
            bsfa_cupy.attention_varlen(q, q, q, other, cp.asarray(good), backend=backend)
