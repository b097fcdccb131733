"""bsfa_reference.attention_varlen is attention applied to each packed sequence on its own."""
from __future__ import annotations

import math
import tracemalloc

import numpy as np
import pytest
from hypothesis import event, given, note
from hypothesis import strategies as st

import bsfa_reference as R
from bsfa_reference._memory import attention_varlen_bytes
from bsfa_reference._validate import check_cu_seqlens
from tests.support.reference_helpers import DTYPES, assert_same_mask, draw_thresholds

SMALL = dict(block_m=16, block_n=8)


def cu(lengths):
    return np.concatenate([[0], np.cumsum(lengths, dtype=np.int64)]).astype(np.int32)


def packed(len_q, len_k, Hq, Hkv, D, dtype=np.float64, seed=0):
    rng = np.random.default_rng(seed)
    tq, tk = int(sum(len_q)), int(sum(len_k))
    q = rng.standard_normal((tq, Hq, D)).astype(dtype)
    k = (rng.standard_normal((tk, Hkv, D)) * np.where(rng.random((tk, Hkv, 1)) < 0.2, 3.0, 1.0)).astype(dtype)
    v = rng.standard_normal((tk, Hkv, D)).astype(dtype)
    return q, k, v


def stitched(q, k, v, len_q, len_k, thresholds=None, keep=None, max_q=None, max_k=None, **kw):
    """The spec, one R.attention call per sequence, Nk = 0 rows as 0 / -inf."""
    block_m, block_n = kw.get("block_m", R.BLOCK_M), kw.get("block_n", R.BLOCK_N)
    Hq, D = q.shape[1:]
    max_q = max(len_q, default=0) if max_q is None else max_q
    max_k = max(len_k, default=0) if max_k is None else max_k
    nQ, nK = -(-max_q // block_m), -(-max_k // block_n)
    out = np.zeros((q.shape[0], Hq, D))
    lse = np.full((Hq, q.shape[0]), -np.inf)
    tiles = np.zeros((len(len_q), Hq, nQ, nK), dtype=bool)
    q0 = k0 = 0
    for s, (nq, nk) in enumerate(zip(len_q, len_k)):
        if nq and nk:
            sq, sk = -(-nq // block_m), -(-nk // block_n)
            o, l, t = R.attention(q[q0:q0 + nq][None], k[k0:k0 + nk][None], v[k0:k0 + nk][None], thresholds,
                                  keep=None if keep is None else keep[s:s + 1, :, :sq, :sk],
                                  return_lse=True, return_keep=True, **kw)
            out[q0:q0 + nq], lse[:, q0:q0 + nq], tiles[s, :, :sq, :sk] = o[0], l[0], t[0]
        q0, k0 = q0 + nq, k0 + nk
    return out, lse, tiles


def assert_bitwise(actual, expected, what):
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    assert actual.dtype == np.float64, f"{what}: dtype {actual.dtype}"
    same = (actual == expected) | (np.isnan(actual) & np.isnan(expected))
    assert same.all(), f"{what}: {int((~same).sum())} of {same.size} entries differ"


def assert_matches(got, want):
    assert_bitwise(got[0], want[0], "out")
    assert_bitwise(got[1], want[1], "lse")
    assert_same_mask(got[2], want[2], "keep")


def own_tiles(len_q, len_k, Hq, nQ, nK, block_m, block_n):
    """(num_seqs, Hq, nQ, nK): where each sequence's own tiles lie."""
    inside = np.zeros((len(len_q), Hq, nQ, nK), dtype=bool)
    for s, (nq, nk) in enumerate(zip(len_q, len_k)):
        inside[s, :, :-(-nq // block_m), :-(-nk // block_n)] = True
    return inside


# ---------------------------------------------------------------------------------------------
# property
# ---------------------------------------------------------------------------------------------

lengths = st.integers(0, 300) | st.sampled_from([0, 0, 1, 7, 63, 64, 65, 127, 128, 129])


@given(st.data())
def test_matches_per_sequence_attention(data):
    """out, lse and keep equal per-sequence attention stitched together, bitwise; keep is False
    outside every sequence's own tiles and the padding from max_seqlen."""
    num_seqs = data.draw(st.integers(1, 4), label="num_seqs")
    len_q = data.draw(st.lists(lengths, min_size=num_seqs, max_size=num_seqs), label="len_q")
    len_k = data.draw(st.lists(lengths, min_size=num_seqs, max_size=num_seqs), label="len_k")
    group = data.draw(st.sampled_from([1, 2, 4]), label="group")
    Hkv = data.draw(st.integers(1, 2 if group < 4 else 1), label="Hkv")
    Hq = Hkv * group
    D = data.draw(st.sampled_from([8, 16, 64]), label="D")
    dtype = data.draw(st.sampled_from(DTYPES), label="dtype")
    causal = data.draw(st.booleans(), label="causal")
    block_m, block_n = data.draw(st.sampled_from([(128, 64), (16, 8), (32, 16), (16, 8), (32, 8)]), label="tiles")
    pad_q, pad_k = data.draw(st.sampled_from([(None, None), (0, 0), (5, 70)]), label="max_seqlen padding")
    q, k, v = packed(len_q, len_k, Hq, Hkv, D, dtype, seed=data.draw(st.integers(0, 2**32 - 1), label="seed"))
    kw = dict(causal=causal, block_m=block_m, block_n=block_n)

    maxima = [R.block_max_scores(q[a:a + nq][None], k[b:b + nk][None], **kw).ravel()
              for a, b, nq, nk in zip(cu(len_q)[:-1], cu(len_k)[:-1], len_q, len_k) if nq and nk]
    tile_max = np.concatenate(maxima) if maxima else np.zeros(0)
    nQ = -(-max(len_q) // block_m)
    thr = draw_thresholds(data, tile_max, Hq, max(nQ, 1))
    max_q = None if pad_q is None else max(len_q) + pad_q
    max_k = None if pad_k is None else max(len_k) + pad_k
    note(f"len_q={len_q} len_k={len_k} Hq={Hq} Hkv={Hkv} D={D} {dtype} {kw} max_seqlen=({max_q}, {max_k})")

    got = R.attention_varlen(q, k, v, cu(len_q), cu(len_k), thr, max_seqlen_q=max_q, max_seqlen_k=max_k,
                             return_lse=True, return_keep=True, **kw)
    assert_matches(got, stitched(q, k, v, len_q, len_k, thr, max_q=max_q, max_k=max_k, **kw))
    event(f"sequences with Nq = 0: {'some' if 0 in len_q else 'none'}")
    event(f"Nq > 0 with Nk = 0: {'some' if any(a and not b for a, b in zip(len_q, len_k)) else 'none'}")
    event(f"thresholds: {type(thr).__name__ if thr is None or np.ndim(thr) == 0 else 'array'}")
    dense = stitched(q, k, v, len_q, len_k, max_q=max_q, max_k=max_k, **kw)[2]
    event(f"skipped tiles: {'some' if (dense & ~got[2]).any() else 'none'}")
    assert not (got[2] & ~own_tiles(len_q, len_k, Hq, *got[2].shape[2:], block_m, block_n)).any()
    assert_bitwise(R.attention_varlen(q, k, v, cu(len_q), cu(len_k), thr, **kw), got[0], "bare out")


# ---------------------------------------------------------------------------------------------
# examples
# ---------------------------------------------------------------------------------------------


def test_empty_sequences():
    """Empty first, middle and last sequences; Nq = 0 with keys, Nq > 0 with no keys (out 0,
    lse -inf, no tiles) and 0 / 0, around ordinary sequences."""
    len_q = [0, 40, 50, 0, 33, 0, 20]
    len_k = [30, 45, 0, 0, 17, 9, 0]
    q, k, v = packed(len_q, len_k, 4, 2, 8, seed=1)
    got = R.attention_varlen(q, k, v, cu(len_q), cu(len_k), 1.0, return_lse=True, return_keep=True, **SMALL)
    assert_matches(got, stitched(q, k, v, len_q, len_k, 1.0, **SMALL))
    out, lse, keep = got
    no_keys = np.r_[40:90, 123:143]  # sequences 2 and 6
    assert (out[no_keys] == 0).all() and (lse[:, no_keys] == -np.inf).all()
    assert not keep[[0, 2, 3, 5, 6]].any()
    assert keep[[1, 4]].any()
    assert keep.shape == (7, 4, 4, 6)  # ceil(50 / 16), ceil(45 / 8)


@pytest.mark.parametrize("n", [0, 1, 3])
def test_all_sequences_empty(n):
    q, k, v = packed([0] * n, [0] * n, 2, 1, 8)
    out, lse, keep = R.attention_varlen(q, k, v, cu([0] * n), cu([0] * n), return_lse=True, return_keep=True)
    assert out.shape == (0, 2, 8) and lse.shape == (2, 0) and keep.shape == (n, 2, 0, 0)


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("Nq,Nk", [(300, 300), (130, 257), (257, 65), (1, 200)])
def test_single_sequence_is_attention_with_batch_one(Nq, Nk, causal):
    q, k, v = packed([Nq], [Nk], 4, 1, 16, np.float32, seed=Nq + Nk)
    thr = np.linspace(-1.0, 3.0, 4 * 3, dtype=np.float32).reshape(4, 3)
    want = R.attention(q[None], k[None], v[None], thr, causal=causal, return_lse=True, return_keep=True)
    got = R.attention_varlen(q, k, v, cu([Nq]), cu([Nk]), thr, causal=causal, return_lse=True, return_keep=True)
    assert_bitwise(got[0], want[0][0], "out")
    assert_bitwise(got[1], want[1][0], "lse")
    assert_same_mask(got[2], want[2], "keep")


def test_max_seqlen_larger_than_needed_only_pads_keep():
    len_q, len_k = [70, 5], [40, 90]
    q, k, v = packed(len_q, len_k, 2, 2, 8, seed=2)
    base = R.attention_varlen(q, k, v, cu(len_q), cu(len_k), 0.5, return_lse=True, return_keep=True, **SMALL)
    big = R.attention_varlen(q, k, v, cu(len_q), cu(len_k), 0.5, max_seqlen_q=200, max_seqlen_k=100,
                             return_lse=True, return_keep=True, **SMALL)
    assert_bitwise(big[0], base[0], "out")
    assert_bitwise(big[1], base[1], "lse")
    assert big[2].shape == (2, 2, 13, 13) and base[2].shape == (2, 2, 5, 12)
    assert_same_mask(big[2][:, :, :5, :12], base[2], "keep inside")
    assert not big[2][:, :, 5:].any() and not big[2][:, :, :, 12:].any()
    exact = R.attention_varlen(q, k, v, cu(len_q), cu(len_k), 0.5, max_seqlen_q=70, max_seqlen_k=90,
                               return_keep=True, **SMALL)[1]
    assert_same_mask(exact, base[2], "keep at the exact max_seqlen")


def test_keep_replay():
    """A replayed keep reproduces out and lse; an arbitrary mask equals per-sequence replays, and
    entries outside a sequence's tiles (padding, other sequences' shapes) are ignored."""
    len_q, len_k = [60, 0, 33, 48], [70, 12, 33, 0]
    q, k, v = packed(len_q, len_k, 4, 2, 16, seed=3)
    kw = dict(causal=True, **SMALL)
    out, lse, keep = R.attention_varlen(q, k, v, cu(len_q), cu(len_k), 0.8, max_seqlen_q=64,
                                        return_lse=True, return_keep=True, **kw)
    replay = R.attention_varlen(q, k, v, cu(len_q), cu(len_k), keep=keep, max_seqlen_q=64,
                                return_lse=True, return_keep=True, **kw)
    assert_matches(replay, (out, lse, keep))

    mask = np.random.default_rng(4).random(keep.shape) < 0.5
    got = R.attention_varlen(q, k, v, cu(len_q), cu(len_k), keep=mask, max_seqlen_q=64,
                             return_lse=True, return_keep=True, **kw)
    assert_matches(got, stitched(q, k, v, len_q, len_k, keep=mask, max_q=64, **kw))
    outside = ~own_tiles(len_q, len_k, 4, *mask.shape[2:], 16, 8)
    again = R.attention_varlen(q, k, v, cu(len_q), cu(len_k), keep=mask | outside, max_seqlen_q=64,
                               return_lse=True, return_keep=True, **kw)
    assert_matches(again, got)


def test_thresholds_restart_per_sequence():
    """Tile positions p(a) are per sequence: the same sequence packed after another one gets the
    same keep as alone, although its rows sit at different packed offsets."""
    len_q, len_k = [200, 200], [200, 200]
    q, k, v = packed(len_q, len_k, 2, 1, 8, seed=5)
    q[200:], k[200:], v[200:] = q[:200], k[:200], v[:200]
    thr = np.array([[-np.inf, np.inf, 1.5, 0.5] * 4] * 2, dtype=np.float32)
    out, lse, keep = R.attention_varlen(q, k, v, cu(len_q), cu(len_k), thr, return_lse=True, return_keep=True,
                                        **SMALL)
    assert_same_mask(keep[1], keep[0], "second copy")
    assert_bitwise(out[200:], out[:200], "second copy out")
    assert_bitwise(lse[:, 200:], lse[:, :200], "second copy lse")


# ---------------------------------------------------------------------------------------------
# validation
# ---------------------------------------------------------------------------------------------


@pytest.fixture
def small():
    len_q, len_k = [10, 0, 20], [15, 5, 20]
    q, k, v = packed(len_q, len_k, 4, 2, 8)
    return q, k, v, cu(len_q), cu(len_k)


@pytest.mark.parametrize("bad,exc,match", [
    ([0, 10, 10, 30], TypeError, "cu_seqlens_q: expected a 1-D numpy int32 array, got list"),
    (np.array([0, 10, 10, 30], np.int64), TypeError, "cu_seqlens_q: expected dtype int32, got int64"),
    (np.array([0, 10, 10, 30], np.uint32), TypeError, "cu_seqlens_q: expected dtype int32, got uint32"),
    (np.array([0.0, 10, 10, 30], np.float32), TypeError, "cu_seqlens_q: expected dtype int32, got float32"),
    (np.array([[0, 10, 10, 30]], np.int32), ValueError, r"cu_seqlens_q: expected a 1-D array .* got shape \(1, 4\)"),
    (np.zeros(0, np.int32), ValueError, r"cu_seqlens_q: expected length >= 1 \(num_seqs \+ 1\), got 0"),
    (np.array([2, 10, 10, 30], np.int32), ValueError, r"cu_seqlens_q: expected cu_seqlens_q\[0\] == 0, got 2"),
    (np.array([0, 12, 10, 30], np.int32), ValueError,
     r"cu_seqlens_q: expected non-decreasing offsets, got cu_seqlens_q\[2\] = 10 < cu_seqlens_q\[1\] = 12"),
    (np.array([0, 10, 10, 29], np.int32), ValueError,
     r"cu_seqlens_q: expected last entry 30 \(the packed length\), got 29"),
])
def test_bad_cu_seqlens_q(small, bad, exc, match):
    q, k, v, _, cu_k = small
    with pytest.raises(exc, match=match):
        R.attention_varlen(q, k, v, bad, cu_k)


def test_bad_cu_seqlens_k(small):
    q, k, v, cu_q, cu_k = small
    with pytest.raises(TypeError, match="cu_seqlens_k: expected dtype int32, got int64"):
        R.attention_varlen(q, k, v, cu_q, cu_k.astype(np.int64))
    with pytest.raises(ValueError, match=r"cu_seqlens_k: expected last entry 40 \(the packed length\), got 41"):
        R.attention_varlen(q, k, v, cu_q, cu_k + np.array([0, 1, 1, 1], np.int32))
    with pytest.raises(ValueError, match=r"cu_seqlens_k: expected non-decreasing offsets, got cu_seqlens_k\[3\]"):
        R.attention_varlen(q, k, v, cu_q, np.array([0, 15, 41, 40], np.int32))
    with pytest.raises(ValueError, match=r"cu_seqlens_k: expected length 4 \(the same number of sequences as "
                                         r"cu_seqlens_q\), got 3"):
        R.attention_varlen(q, k, v, cu_q, np.array([0, 15, 40], np.int32))


def test_check_cu_seqlens_alone():
    """The check the GPU API reuses: returns the lengths, checks nothing else."""
    lengths = check_cu_seqlens(np.array([0, 0, 7, 7, 9], np.int32), 9, "offsets")
    assert lengths.tolist() == [0, 7, 0, 2] and lengths.dtype == np.int64
    assert check_cu_seqlens(np.array([0], np.int32), 0, "offsets").size == 0
    with pytest.raises(ValueError, match=r"offsets: expected non-decreasing offsets, got offsets\[4\] = 6"):
        check_cu_seqlens(np.array([0, 0, 7, 7, 6], np.int32), 6, "offsets")


@pytest.mark.parametrize("name", ["max_seqlen_q", "max_seqlen_k"])
def test_bad_max_seqlen(small, name):
    q, k, v, cu_q, cu_k = small
    longest, what = (20, "query sequence") if name == "max_seqlen_q" else (20, "key sequence")
    with pytest.raises(ValueError, match=rf"{name}: expected an int >= {longest} \(the longest {what}\), got 19"):
        R.attention_varlen(q, k, v, cu_q, cu_k, **{name: 19})
    with pytest.raises(TypeError, match=rf"{name}: expected an int or None, got float 30.0"):
        R.attention_varlen(q, k, v, cu_q, cu_k, **{name: 30.0})
    with pytest.raises(TypeError, match=rf"{name}: expected an int or None, got bool"):
        R.attention_varlen(q, k, v, cu_q, cu_k, **{name: True})
    R.attention_varlen(q, k, v, cu_q, cu_k, **{name: np.int64(20)})


def test_bad_packed_shapes(small):
    q, k, v, cu_q, cu_k = small
    with pytest.raises(ValueError, match=r"q: expected rank 3 \(total_q, heads_q, head_dim\), got shape"):
        R.attention_varlen(q[None], k, v, cu_q, cu_k)
    with pytest.raises(ValueError, match=r"k: expected rank 3 \(total_k, heads_kv, head_dim\), got shape"):
        R.attention_varlen(q, k[None], v, cu_q, cu_k)
    with pytest.raises(ValueError, match="v: expected shape"):
        R.attention_varlen(q, k, v[:, :1], cu_q, cu_k)
    with pytest.raises(ValueError, match="k: expected head_dim 8"):
        R.attention_varlen(q, k[..., :4], v[..., :4], cu_q, cu_k)
    with pytest.raises(ValueError, match=r"q heads \(4\) must be a multiple of k/v heads \(3\)"):
        k3 = np.concatenate([k, k[:, :1]], axis=1)
        R.attention_varlen(q, k3, k3, cu_q, cu_k)
    with pytest.raises(ValueError, match="expected heads and head_dim >= 1"):
        R.attention_varlen(q[:, :0], k, v, cu_q, cu_k)
    with pytest.raises(TypeError, match=r"q: expected dtype in"):
        R.attention_varlen(q.astype(np.int32), k, v, cu_q, cu_k)
    with pytest.raises(TypeError, match="v: expected a numpy.ndarray, got list"):
        R.attention_varlen(q, k, v.tolist(), cu_q, cu_k)


def test_bad_options(small):
    q, k, v, cu_q, cu_k = small
    with pytest.raises(ValueError, match="block_m: expected a positive int, got 0"):
        R.attention_varlen(q, k, v, cu_q, cu_k, block_m=0)
    with pytest.raises(TypeError, match="causal: expected a bool"):
        R.attention_varlen(q, k, v, cu_q, cu_k, causal="False")
    with pytest.raises(ValueError, match="softmax_scale: expected a finite float > 0"):
        R.attention_varlen(q, k, v, cu_q, cu_k, softmax_scale=-1.0)
    with pytest.raises(ValueError, match=r"thresholds: expected shape \(4, T\)"):
        R.attention_varlen(q, k, v, cu_q, cu_k, np.zeros((2, 3), np.float32))
    with pytest.raises(ValueError, match="thresholds: NaN is not a threshold"):
        R.attention_varlen(q, k, v, cu_q, cu_k, math.nan)


def test_bad_keep(small):
    q, k, v, cu_q, cu_k = small
    shape = (3, 4, 1, 1)  # 3 sequences, Hq 4, ceil(20 / 128), ceil(20 / 64)
    with pytest.raises(ValueError, match="pass either thresholds or keep"):
        R.attention_varlen(q, k, v, cu_q, cu_k, 0.0, keep=np.ones(shape, bool))
    with pytest.raises(ValueError, match=r"keep: expected shape \(3, 4, 1, 1\)"):
        R.attention_varlen(q, k, v, cu_q, cu_k, keep=np.ones((1, 4, 1, 1), bool))
    with pytest.raises(TypeError, match="keep: expected dtype bool, got int64"):
        R.attention_varlen(q, k, v, cu_q, cu_k, keep=np.ones(shape, np.int64))
    with pytest.raises(ValueError, match=r"keep: expected shape \(3, 4, 2, 1\)"):
        R.attention_varlen(q, k, v, cu_q, cu_k, keep=np.ones(shape, bool), max_seqlen_q=129)


# ---------------------------------------------------------------------------------------------
# memory guard
# ---------------------------------------------------------------------------------------------


def test_memory_guard_counts_the_largest_sequence(monkeypatch):
    """Four sequences of 96 run one at a time: accepted under a bound that one packed sequence of
    384 would exceed; the same bound refuses a single sequence of 384, naming it."""
    len_q = len_k = [96] * 4
    q, k, v = packed(len_q, len_k, 2, 1, 8)
    need, at = attention_varlen_bytes(np.array(len_q), np.array(len_k), 2, 1, 8, 1, 2)
    monkeypatch.setenv("BSFA_REFERENCE_MAX_BYTES", str(need))
    R.attention_varlen(q, k, v, cu(len_q), cu(len_k))
    monkeypatch.setenv("BSFA_REFERENCE_MAX_BYTES", str(need - 1))
    with pytest.raises(ValueError, match=r"^bsfa_reference.attention_varlen: expected inputs that fit in"):
        R.attention_varlen(q, k, v, cu(len_q), cu(len_k))
    monkeypatch.setenv("BSFA_REFERENCE_MAX_BYTES", str(need))
    with pytest.raises(ValueError, match=r"longest work: sequence 1, Nq=384, Nk=384\).*split the sequences"):
        R.attention_varlen(q, k, v, cu([0, 384]), cu([0, 384]))


def test_memory_guard_refuses_before_work(monkeypatch):
    """A long sequence given as zero-stride views is refused without allocating its scores."""
    monkeypatch.delenv("BSFA_REFERENCE_MAX_BYTES", raising=False)
    q = np.broadcast_to(np.zeros((1, 1, 1), np.float16), (10000, 4, 64))
    k = np.broadcast_to(np.zeros((1, 1, 1), np.float16), (10000, 1, 64))
    tracemalloc.start()
    try:
        with pytest.raises(ValueError, match=r"4.00 GiB .*\(longest work: sequence 0, Nq=10000, Nk=10000\)"):
            R.attention_varlen(q, k, k, cu([10000]), cu([10000]))
    finally:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    assert peak < 2**20, f"allocated {peak} bytes before refusing"
