"""bsfa_reference.dropped_mass and layer_k_for_mass: hand-checked cases and the lse identity."""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import bsfa_reference as R
from tests.support.reference_helpers import draw_thresholds, make_qkv, problems


def test_uniform_scores_drop_the_share_of_skipped_keys():
    # q = 0: every valid score is 0, so a row's softmax is uniform over its valid keys. N = 4 with
    # 2 x 2 tiles, causal; threshold +inf skips every non-diagonal tile: query tile 1 (rows 2, 3)
    # loses key tile 0 (keys 0, 1), i.e. 2 of 3 keys for row 2 and 2 of 4 for row 3; tile 0 is all diagonal.
    q = np.zeros((1, 4, 1, 8))
    k = np.random.default_rng(0).standard_normal((1, 4, 1, 8))
    got = R.dropped_mass(q, k, [np.inf, None, -np.inf], block_m=2, block_n=2)
    assert got.shape == (3, 1, 1, 4)
    np.testing.assert_allclose(got[0, 0, 0], [0.0, 0.0, 2 / 3, 0.5], rtol=0, atol=1e-15)
    assert not got[1:].any(), "dense and -inf thresholds keep everything: nothing dropped"


def test_a_row_without_valid_keys_drops_nothing():
    q, k, _ = make_qkv(1, 3, 2, 1, 1, 4)  # causal bottom-right: row 0 sees no key
    got = R.dropped_mass(q, k, [np.inf], block_m=1, block_n=1)
    assert got[0, 0, 0, 0] == 0.0 and np.isfinite(got).all()


@settings(max_examples=25, deadline=None)
@given(problems(max_n=160, max_batch=2), st.data())
def test_equals_one_minus_the_kept_share_from_attention_lse(p, data):
    # the definition through attention(): 1 - exp(lse_kept - lse_dense), per row
    q, k, v = make_qkv(p.B, p.Nq, p.Nk, p.Hq, p.Hkv, p.D, p.dtype, p.seed, p.spread)
    kw = dict(causal=p.causal, softmax_scale=p.softmax_scale, block_m=p.block_m, block_n=p.block_n)
    tile_max = R.block_max_scores(q, k, **kw)
    thr = draw_thresholds(data, tile_max, p.Hq, tile_max.shape[2])
    got = R.dropped_mass(q, k, [thr], **kw)[0]
    _, lse_dense = R.attention(q, k, v, None, return_lse=True, **kw)
    _, lse_kept = R.attention(q, k, v, thr, return_lse=True, **kw)
    has = lse_dense > -np.inf
    with np.errstate(invalid="ignore"):
        want = np.where(has, 1.0 - np.exp(lse_kept - np.where(has, lse_dense, 0.0)), 0.0)
    err = np.abs(got - want)
    # float64 rounding of two lse computed by different summation orders; masses are in [0, 1]
    assert err.max() <= 1e-12, f"worst |error| {err.max():.3e}, {(err > 1e-12).sum()} of {err.size} rows"
    assert ((got >= 0) & (got <= 1)).all()


def test_layer_k_takes_the_smallest_k_within_the_target():
    mass = [[0.10, 0.05, 0.01],   # layer 0: k=4 is the first within 0.05
            [0.50, 0.40, 0.30],   # layer 1: none: dense
            [0.00, 0.00, 0.00]]   # layer 2: the smallest k
    assert R.layer_k_for_mass(mass, (2, 4, 8), 0.05) == [4, None, 2]
    # the order of k_values does not matter: columns follow it
    assert R.layer_k_for_mass(np.asarray(mass)[:, ::-1], (8, 4, 2), 0.05) == [4, None, 2]
    assert R.layer_k_for_mass(mass, (2, 4, 8), 1.0) == [2, 2, 2]


@pytest.mark.parametrize("mass, ks, target, err, match", [
    ([[0.1, 0.2]], (2, 4, 8), 0.1, ValueError, r"expected shape \(layers, 3\)"),
    ([[0.1, np.nan, 0.2]], (2, 4, 8), 0.1, ValueError, "values in \\[0, 1\\]"),
    ([[0.1, 1.5, 0.2]], (2, 4, 8), 0.1, ValueError, "values in \\[0, 1\\]"),
    ([[0.1, 0.1, 0.2]], (2, 4, 8), -0.1, ValueError, "target: expected a dropped mass"),
    ([[0.1, 0.1, 0.2]], (2, 2, 8), 0.1, ValueError, "no duplicates"),
    ([[0.1, 0.1, 0.2]], (2, 4, 8), True, ValueError, "target"),
])
def test_layer_k_refuses_bad_input(mass, ks, target, err, match):
    with pytest.raises(err, match=match):
        R.layer_k_for_mass(mass, ks, target)


def test_dropped_mass_refuses_a_bare_threshold():
    q, k, _ = make_qkv(1, 8, 8, 1, 1, 4)
    with pytest.raises(TypeError, match="tables: expected a list or tuple"):
        R.dropped_mass(q, k, 0.5)
