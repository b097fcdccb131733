"""The test helpers themselves (so that a broken helper cannot make tests pass vacuously), and the
public signatures of bsfa_reference."""
from __future__ import annotations

import inspect
import math

import numpy as np
import pytest

import bsfa_reference as R
from tests.support.reference_helpers import assert_close, assert_same_mask, make_qkv
from tests.support.online_softmax import dense_softmax_attention, online_softmax_attention


def test_assert_close_passes_within_tolerance():
    assert_close([1.0, -np.inf, np.inf, np.nan], [1.0 + 1e-12, -np.inf, np.inf, np.nan], 1e-10, 0, "ok")
    assert_close(np.zeros((2, 3)), np.full((2, 3), 1e-11), 0, 1e-10, "atol")


@pytest.mark.parametrize("actual,expected,match", [
    ([1.0, 2.0, 3.0], [1.0, 2.5, 3.0], r"x: 1 of 3 elements differ .* worst abs error 5\.000e-01 at index \(1,\)"),
    ([np.inf, 0.0], [-np.inf, 0.0], r"1 of 2 elements differ"),
    ([np.nan, 0.0], [0.0, 0.0], r"1 of 2 elements differ"),
    ([0.0, 0.0], [np.nan, 0.0], r"1 of 2 elements differ"),
    ([-np.inf, 1.0], [0.0, 1.0], r"1 of 2 elements differ"),
    ([[0.0, 1.0], [2.0, 9.0]], [[0.1, 1.0], [2.0, 3.0]], r"2 of 4 elements differ.*at index \(1, 1\): actual 9\.0, expected 3\.0"),
])
def test_assert_close_reports(actual, expected, match):
    with pytest.raises(AssertionError, match=match):
        assert_close(actual, expected, 1e-10, 1e-10, "x")


def test_assert_close_shape_and_masks():
    with pytest.raises(AssertionError, match="shape"):
        assert_close(np.zeros(3), np.zeros(4), 0, 0, "x")
    assert_same_mask(np.array([True, False]), np.array([True, False]), "m")
    with pytest.raises(AssertionError, match=r"m: 1 of 2 entries differ; first at \[\(1,\)\]"):
        assert_same_mask(np.array([True, False]), np.array([True, True]), "m")


def test_independent_formulations_on_a_hand_case():
    """Two keys with scores 0 and log 3 give weights 1/4, 3/4 and lse log 4."""
    q = np.ones((1, 1, 1, 1))
    k = np.array([0.0, math.log(3)]).reshape(1, 2, 1, 1)
    v = np.array([4.0, 8.0]).reshape(1, 2, 1, 1)
    for out, lse in (online_softmax_attention(q, k, v, softmax_scale=1.0, block_m=1, block_n=1)[:2],
                     dense_softmax_attention(q, k, v, softmax_scale=1.0),
                     R.attention(q, k, v, softmax_scale=1.0, return_lse=True)):
        assert_close(out, [[[[7.0]]]], 1e-14, 1e-14, "out")
        assert_close(lse, [[[math.log(4)]]], 1e-14, 1e-14, "lse")


def test_online_loop_matches_scipy_dense():
    q, k, v = make_qkv(2, 77, 93, 4, 1, 16, seed=11)
    for causal in (True, False):
        o1, l1, keep, _ = online_softmax_attention(q, k, v, causal=causal, block_m=16, block_n=8)
        o2, l2 = dense_softmax_attention(q, k, v, causal=causal)
        assert_close(o1, o2, 1e-12, 1e-12, "loop vs scipy out")
        assert_close(l1, l2, 1e-12, 1e-12, "loop vs scipy lse")


def test_public_signatures():
    P = inspect.Parameter
    sig = inspect.signature(R.attention)
    assert list(sig.parameters) == ["q", "k", "v", "thresholds", "causal", "softmax_scale", "block_m", "block_n",
                                    "keep", "return_lse", "return_keep", "q_start", "k_start"]
    assert sig.parameters["thresholds"].default is None
    kw = {n: p for n, p in sig.parameters.items() if p.kind is P.KEYWORD_ONLY}
    assert {n: p.default for n, p in kw.items()} == dict(causal=True, softmax_scale=None, block_m=128, block_n=64,
                                                          keep=None, return_lse=False, return_keep=False,
                                                          q_start=None, k_start=0)
    sig = inspect.signature(R.block_max_scores)
    assert {n: p.default for n, p in sig.parameters.items() if p.kind is P.KEYWORD_ONLY} == dict(
        causal=True, softmax_scale=None, block_m=128, block_n=64, q_start=None, k_start=0)
    sig = inspect.signature(R.Calibrator)
    assert list(sig.parameters)[0] == "k_values"
    assert {n: p.default for n, p in sig.parameters.items() if p.kind is P.KEYWORD_ONLY} == dict(
        causal=True, softmax_scale=None, block_m=128, block_n=64, reduce="mean")
    cal = R.Calibrator([1])
    assert callable(cal.update) and callable(cal.thresholds)


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("Nq,Nk", [(1, 1), (577, 641), (641, 577), (300, 100), (128, 64), (1000, 1), (5, 700)])
def test_candidate_tiles_from_the_grid_equal_the_mask_reduction(Nq, Nk, causal):
    from bsfa_reference.tiles import candidate_tiles, tile_reduce_any, valid_mask

    for bm, bn in ((128, 64), (16, 8), (5, 3)):
        want = tile_reduce_any(valid_mask(Nq, Nk, causal), bm, bn)
        np.testing.assert_array_equal(candidate_tiles(Nq, Nk, bm, bn, causal), want, err_msg=f"{Nq}x{Nk} {bm}x{bn}")
