"""The sm90ws entries compiled without the gate (bsfa_fwd_dense, bsfa_fwd_split_dense,
bsfa_fwd_split_pack_dense): dense calls take them, and they equal the gated entries keeping every tile
(thresholds -inf) bitwise -- out, lse and the keep mask -- over dtypes, head dims, causal or not, odd
lengths and GQA; so does bsfa_fwd_dense_mc, the cluster entry that dense calls of even GQA groups take at
head dim 128. Their agreement with the reference is the dense examples of the other GPU tests, which
run on them through ``auto`` on Hopper.
"""
from __future__ import annotations

import numpy as np
import pytest

from tests.gpu.conftest import _is_hopper
from tests.support.gpu import assert_bitwise, cp, random_inputs, requires_gpu

pytestmark = [pytest.mark.gpu, requires_gpu,
              pytest.mark.skipif(not _is_hopper(), reason="the sm90ws kernel needs compute capability 9.0")]

ENTRIES = ("fwd", "fwd_dense", "fwd_split", "fwd_split_dense", "fwd_split_pack", "fwd_split_pack_dense")
CLUSTER_ENTRIES = ("fwd_dense",)  # recorded as fwd_dense_mc: dense calls of even GQA groups at head dim 128


def _record_entries(monkeypatch):
    """Names of the sm90ws entries launched, in order."""
    from bsfa_cupy import ops

    seen = []
    real = ops.get_module

    def get_module(key, backend, device_id):
        mod = real(key, backend, device_id)
        if key.arch == "sm90ws":
            mc = mod.clustered()
            kerns = [(name, getattr(mod, name)) for name in ENTRIES]
            kerns += [(name + "_mc", getattr(mc, name)) for name in CLUSTER_ENTRIES if mc is not mod]
            for name, kern in kerns:
                if getattr(kern.fn, "_bsfa_spied", False):
                    continue
                kern.grid(1, 2, 1)  # a cluster entry's occupancy query needs the real function: asked before the spy

                def spy(*args, _fn=kern.fn, _name=name, **kw):
                    seen.append(_name)
                    return _fn(*args, **kw)

                spy._bsfa_spied = True
                monkeypatch.setattr(kern, "fn", spy)  # undone after the test
            # calls with thresholds of even groups on fwd (bsfa_fwd_lag), whose arithmetic is the dense entries',
            # not on bsfa_fwd_headpair (tests/gpu/test_head_pairs.py)
            return mod.head_pairs(False)
        return mod

    monkeypatch.setattr(ops, "get_module", get_module)
    return seen


def _dense_and_gated(monkeypatch, shape, dtype, D, causal, **call):
    """(dense call, call with thresholds -inf) results, and the entries they launched."""
    import bsfa_cupy

    B, Nq, Nk, Hq, Hkv = shape
    rng = np.random.default_rng(Nq * 7 + Nk + D)
    q, k, v = map(cp.asarray, random_inputs(rng, B, Nq, Nk, Hq, Hkv, D, dtype))
    seen = _record_entries(monkeypatch)
    runs = [bsfa_cupy.attention(q, k, v, thr, causal=causal, return_lse=True, return_keep=True, backend="sm90ws",
                                **call) for thr in (None, -np.inf)]
    return runs, seen


def _assert_bitwise(runs):
    assert_bitwise(("out", "lse", "keep"), runs[1], runs[0], "the dense entry (against the gated one keeping every tile)")


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("Hkv", [4, 16])
def test_unsplit_dense_entry_equals_gated(monkeypatch, dtype, D, causal, Hkv):
    # 2 x 16 heads x 9 query tiles fill the GPU without a split, so both calls take the unsplit entries.
    # GQA groups of 4 at head dim 128 pair up: the dense call takes the cluster entry; groups of 1 do not.
    runs, seen = _dense_and_gated(monkeypatch, (2, 1100, 1300, 16, Hkv), dtype, D, causal)
    dense = "fwd_dense_mc" if D == 128 and Hkv == 4 else "fwd_dense"
    assert seen == [dense, "fwd"], f"expected {dense} then the gated unsplit entry, got {seen}"
    _assert_bitwise(runs)


@pytest.mark.parametrize("Nq,G,entry", [(300, 4, "fwd_split"), (577, 1, "fwd_split"), (48, 4, "fwd_split_pack"),
                                        (33, 2, "fwd_split_pack")])
@pytest.mark.parametrize("causal", [True, False])
def test_split_dense_entries_equal_gated(monkeypatch, Nq, G, entry, causal):
    runs, seen = _dense_and_gated(monkeypatch, (1, Nq, 2100, 2 * G, 2), "float16", 128, causal, num_splits=3)
    assert seen == [entry + "_dense", entry], f"expected {entry}_dense then {entry}, got {seen}"
    _assert_bitwise(runs)
