"""bsfa_fwd_lag, the sm90ws entry of unsplit calls with thresholds: bsfa_fwd with each consumer warpgroup's S issued
a block ahead of the gate exchange, its votes posted as soon as it retires, and at head dim 128 P V reading P
from shared memory. The decisions, the order of the key blocks and the arithmetic are bsfa_fwd's, so out, lse and
keep must equal bsfa_fwd's (Module.unlagged()) bitwise, at keep fractions from none to all of the gated tiles,
over dtypes, causal or not, ragged lengths, Nq != Nk, GQA and batches. Its agreement with the reference is then
bsfa_fwd's."""
from __future__ import annotations

import numpy as np
import pytest

from tests.gpu.conftest import _is_hopper
from tests.support.gpu import assert_bitwise, cp, random_inputs, requires_gpu, swap_sm90ws_entry

pytestmark = [pytest.mark.gpu, requires_gpu,
              pytest.mark.skipif(not _is_hopper(), reason="the sm90ws kernel needs compute capability 9.0")]


def _lagged_vs_unlagged(monkeypatch, field, q, k, v, causal, names, **call):
    """The call at thresholds skipping every gated tile, about a quarter and three quarters kept, and all kept,
    on the module's lagged entry in ``field`` and on Module.unlagged()'s: ``names`` of the results bitwise
    equal, one launch of the lagged entry each. Returns (thresholds, the launch spy's list)."""
    import bsfa_cupy

    tm = cp.asarray(bsfa_cupy.block_max_scores(q, k, causal=causal, backend="sm90ws"))
    finite = tm[cp.isfinite(tm)]
    thresholds = [np.inf] + ([float(cp.quantile(finite, f)) for f in (0.75, 0.25)] if finite.size else []) + [-np.inf]
    on, seen = [False], []
    # head_pairs(False): even GQA groups stay on the lagged entry instead of bsfa_fwd_headpair
    swap_sm90ws_entry(monkeypatch, on, lambda mod: mod.head_pairs(False), field, seen, off=lambda mod: mod.unlagged())
    for thr in thresholds:
        runs = []
        for lag in (False, True):
            on[0] = lag
            bsfa_cupy.clear_plan_cache()
            runs.append(bsfa_cupy.attention(q, k, v, thr, causal=causal, return_lse=True, backend="sm90ws", **call))
        assert_bitwise(names, runs[0], runs[1], f"{field} at threshold {thr:.4g}")
    assert seen == [field] * len(thresholds), f"expected one launch of the lagged entry per threshold, got {seen}"
    return thresholds, seen


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("shape", [(2, 1100, 1300, 8, 2), (1, 577, 577, 3, 1), (3, 300, 2100, 4, 4),
                                   (1, 2100, 300, 6, 2), (1, 100, 100, 1, 1)], ids=lambda s: "x".join(map(str, s)))
def test_lagged_gate_equals_bsfa_fwd(monkeypatch, dtype, D, causal, shape):
    B, Nq, Nk, Hq, Hkv = shape
    rng = np.random.default_rng(Nq * 17 + Nk + Hq + D)
    q, k, v = map(cp.asarray, random_inputs(rng, B, Nq, Nk, Hq, Hkv, D, dtype))
    _lagged_vs_unlagged(monkeypatch, "fwd", q, k, v, causal, ("out", "lse", "keep"), return_keep=True)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("shape,num_splits", [((1, 128, 2100, 8, 2), 3), ((2, 200, 1300, 4, 4), 2),
                                              ((1, 100, 700, 2, 1), 64)], ids=lambda x: str(x))
def test_lagged_split_equals_bsfa_fwd_split(monkeypatch, dtype, D, causal, shape, num_splits):
    """bsfa_fwd_split_lag, the split entry of calls with thresholds and without keep (one head a tile),
    against bsfa_fwd_split: the same partials, so the same merged out and lse bitwise; empty splits too (64)."""
    import bsfa_cupy

    B, Nq, Nk, Hq, Hkv = shape
    rng = np.random.default_rng(Nq * 7 + Nk + D)
    q, k, v = map(cp.asarray, random_inputs(rng, B, Nq, Nk, Hq, Hkv, D, dtype))
    thresholds, seen = _lagged_vs_unlagged(monkeypatch, "fwd_split_lag", q, k, v, causal, ("out", "lse"),
                                           num_splits=num_splits)
    # with keep the call stays on bsfa_fwd_split, which writes it
    seen.clear()
    bsfa_cupy.clear_plan_cache()
    bsfa_cupy.attention(q, k, v, thresholds[1], causal=causal, return_keep=True, backend="sm90ws",
                        num_splits=num_splits)
    assert seen == [], f"a call returning keep launched {seen}"
