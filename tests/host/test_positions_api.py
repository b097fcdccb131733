"""The GPU API's offsets (q_start / k_start) and packed batches (attention_varlen): every check that runs
before an array is touched or a kernel launched, without a GPU."""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import bsfa_cupy
from bsfa_reference._validate import check_offsets
from bsfa_cupy.ops import positions
from bsfa_cupy.varlen import plan

HOST = np.zeros((1, 8, 2, 64), np.float16)

BAD_OFFSETS = [
    (dict(q_start=64), ValueError, r"q_start: expected a multiple of block_m = 128 .* got 64"),
    (dict(k_start=32), ValueError, r"k_start: expected a multiple of block_n = 64 .* got 32"),
    (dict(q_start=-128), ValueError, r"q_start: expected an int >= 0, got -128"),
    (dict(k_start=-64), ValueError, r"k_start: expected an int >= 0, got -64"),
    (dict(q_start=128.0), TypeError, r"q_start: expected an int >= 0 or None, got float"),
    (dict(k_start=None), TypeError, r"k_start: expected an int >= 0, got NoneType"),
    (dict(k_start=True), TypeError, r"k_start: expected an int >= 0, got bool"),
]


@pytest.mark.parametrize("kw,error,message", BAD_OFFSETS)
def test_bad_offsets_are_refused_before_the_arrays(kw, error, message):
    """The reference's errors, raised before the (host, hence refused) inputs are even looked at."""
    with pytest.raises(error, match=message):
        bsfa_cupy.attention(HOST, HOST, HOST, **kw)
    with pytest.raises(error, match=message):
        bsfa_cupy.block_max_scores(HOST, HOST, **kw)


def test_valid_offsets_reach_the_array_checks():
    with pytest.raises(TypeError, match=r"host numpy.ndarray"):
        bsfa_cupy.attention(HOST, HOST, HOST, q_start=256, k_start=192)
    with pytest.raises(TypeError, match=r"host numpy.ndarray"):
        bsfa_cupy.block_max_scores(HOST, HOST, q_start=np.int64(128), k_start=np.int32(64))


@given(st.one_of(st.none(), st.integers(0, 50).map(lambda t: 128 * t)), st.integers(0, 50).map(lambda t: 64 * t),
       st.integers(1, 5000), st.integers(1, 5000))
def test_positions_are_the_references(q_start, k_start, Nq, Nk):
    """Params.k_start and qk_shift = q0 - k_start, q0 the reference's resolved query position."""
    q0, k0 = check_offsets(q_start, k_start, Nq, Nk, 128, 64)
    assert positions(q_start, k_start, Nq, Nk) == (k0, q0 - k0)


def test_default_positions_are_bottom_right():
    assert positions(None, 0, 300, 100) == (0, -200)  # rows before the sequence start
    assert positions(None, 64, 100, 300) == (64, 200)
    assert positions(256, 64, 100, 300) == (64, 192)


def test_positions_must_fit_int32():
    positions(2**31 - 384, 0, 256, 10)
    with pytest.raises(ValueError, match=r"below 2\*\*31 .* queries at \[2147483392, 2147483648\)"):
        positions(2**31 - 256, 0, 256, 10)
    with pytest.raises(ValueError, match=r"keys at \[2147483584, 2147483648\)"):
        positions(0, 2**31 - 64, 10, 64)


def _cu(*x):
    return np.array(x, np.int32)


def test_varlen_plan_of_a_good_batch():
    assert plan(_cu(0, 100, 100, 300), _cu(0, 5, 105, 110), 300, 110) == (3, 200, 100)
    assert plan(_cu(0, 100, 100, 300), _cu(0, 5, 105, 110), 300, 110, 1000, 100) == (3, 1000, 100)
    assert plan(_cu(0), _cu(0), 0, 0) == (0, 0, 0)
    assert plan(_cu(0, 0, 0), _cu(0, 7, 7), 0, 7) == (2, 0, 7)


@pytest.mark.parametrize("cu_q,cu_k,kw,error,message", [
    (_cu(0, 100, 300).astype(np.int64), _cu(0, 100, 300), {}, TypeError,
     r"cu_seqlens_q: expected dtype int32, got int64"),
    ([0, 100, 300], _cu(0, 100, 300), {}, TypeError, r"cu_seqlens_q: expected a 1-D numpy int32 array, got list"),
    (_cu(0, 200, 100, 300), _cu(0, 100, 200, 300), {}, ValueError,
     r"cu_seqlens_q: expected non-decreasing offsets, got cu_seqlens_q\[2\] = 100 < cu_seqlens_q\[1\] = 200"),
    (_cu(0, 100, 300), _cu(3, 100, 300), {}, ValueError, r"cu_seqlens_k: expected cu_seqlens_k\[0\] == 0, got 3"),
    (_cu(0, 100, 299), _cu(0, 100, 300), {}, ValueError,
     r"cu_seqlens_q: expected last entry 300 \(the packed length\), got 299"),
    (_cu(0, 100, 300), _cu(0, 300), {}, ValueError,
     r"cu_seqlens_k: expected length 3 \(the same number of sequences as cu_seqlens_q\), got 2"),
    (_cu(0, 100, 300)[None], _cu(0, 100, 300), {}, ValueError, r"cu_seqlens_q: expected a 1-D array"),
    (_cu(), _cu(), {}, ValueError, r"cu_seqlens_q: expected length >= 1"),
    (_cu(0, 100, 300), _cu(0, 100, 300), dict(max_seqlen_q=199), ValueError,
     r"max_seqlen_q: expected an int >= 200 \(the longest query sequence\), got 199"),
    (_cu(0, 100, 300), _cu(0, 100, 300), dict(max_seqlen_k=200.0), TypeError,
     r"max_seqlen_k: expected an int or None, got float"),
    (_cu(0, 100, 300), _cu(0, 100, 300), dict(max_seqlen_q=2**31), ValueError,
     r"lengths must stay below 2\*\*31 .* max_seqlen_q=2147483648"),
])
def test_varlen_plan_refuses_bad_offsets(cu_q, cu_k, kw, error, message):
    """The checks attention_varlen runs on the host copy of its offsets before the launch."""
    with pytest.raises(error, match=message):
        plan(cu_q, cu_k, 300 if len(cu_q) else 0, 300 if len(cu_k) else 0, **kw)


def test_varlen_host_inputs_get_a_clear_type_error():
    q = np.zeros((8, 2, 64), np.float16)
    with pytest.raises(TypeError, match=r"q: got a host numpy.ndarray.*GPU"):
        bsfa_cupy.attention_varlen(q, q, q, _cu(0, 8), _cu(0, 8))


def test_varlen_is_exported():
    assert "attention_varlen" in bsfa_cupy.__all__ and bsfa_cupy.attention_varlen.__module__ == "bsfa_cupy.varlen"


def test_params_carry_positions_and_offsets():
    from bsfa_cupy._launch import PARAMS, pack

    class Dev:  # the shape of a CuPy array's data pointer
        class data:
            ptr = 0x7F10

    rec = pack(cu_seqlens_q=Dev(), cu_seqlens_k=None, k_start=64, qk_shift=-200, total_q=7)
    assert rec["cu_seqlens_q"] == 0x7F10 and rec["cu_seqlens_k"] == 0
    assert (rec["k_start"], rec["qk_shift"], rec["total_q"]) == (64, -200, 7)
    names = PARAMS.names
    assert names.index("cu_seqlens_k") < names.index("q_sb"), "8-byte members first"


@pytest.mark.parametrize("shapes", [
    ((8, 4, 64, 1), (8, 2, 64), (8, 2, 64)),   # q not rank 3
    ((8, 4, 64), (8, 64), (8, 64)),            # k not rank 3
    ((8, 0, 64), (8, 2, 64), (8, 2, 64)),      # no heads
    ((8, 4, 64), (8, 2, 32), (8, 2, 32)),      # head dims differ
    ((8, 4, 64), (8, 3, 64), (8, 3, 64)),      # heads not a multiple
    ((8, 4, 64), (8, 2, 64), (9, 2, 64)),      # v unlike k
])
def test_varlen_packed_shapes_are_refused_as_the_reference_does(shapes):
    """The GPU API's packed-shape check runs before anything touches the GPU; its error is the reference's."""
    import numpy as np

    import bsfa_reference as ref
    from bsfa_cupy.varlen import _check_packed

    arrays = [np.zeros(s, np.float16) for s in shapes]
    with pytest.raises(ValueError) as want:
        ref.attention_varlen(*arrays, _cu(0, 8), _cu(0, 8))
    with pytest.raises(ValueError) as got:
        _check_packed(*arrays)
    assert str(got.value) == str(want.value)
