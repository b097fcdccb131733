"""bsfa_fwd_dense_wide, the sm90ws dense entry of head dim 64 on 192-row query tiles (three consumer
warpgroups): dense calls without a keep mask from 2K rows on take it (the tests below force it at any
length, through Module.wide_rows), and it must equal bsfa_fwd_dense bitwise -- out and
lse -- since each warpgroup multiplies exactly the key tiles of its own 128-row BSFA tile, in the same
order. Non-finite inputs reach exactly the reference's rows (a non-finite v reaches the rows of the BSFA
tiles that keep its key tile, not those of the wider work tile). Calls that ask for keep stay on
bsfa_fwd_dense, whose tiles are the keep mask's.
"""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from tests.gpu.conftest import _is_hopper
from tests.support.gpu import (assert_bitwise, assert_nonfinite_like_reference, cp, planted_nonfinite, poison_outputs,
                               random_inputs, requires_gpu)

pytestmark = [pytest.mark.gpu, requires_gpu,
              pytest.mark.skipif(not _is_hopper(), reason="the sm90ws kernel needs compute capability 9.0")]


def _route(monkeypatch, wide: list, seen: list, force: bool = True):
    """sm90ws modules with their dense calls on the wide entry where ``wide[0]`` (at any length if ``force``,
    else as the library routes them), else on bsfa_fwd_dense; the launches of either entry are recorded in
    ``seen``."""
    import bsfa_cupy
    from bsfa_cupy import ops

    real, cache = ops.get_module, {}

    def get_module(key, backend, device_id):
        mod = real(key, backend, device_id)
        if key.arch != "sm90ws":
            return mod
        if (key, wide[0]) not in cache:
            assert mod.fwd_dense_wide is not None, f"{key.name()}: no wide entry"
            kerns = {}
            for field, name in (("fwd_dense_wide", "wide"), ("fwd_dense", "dense")):
                kern = getattr(mod, field)

                def spy(*args, _fn=kern.fn, _name=name, **kw):
                    seen.append(_name)
                    return _fn(*args, **kw)

                kerns[field] = dataclasses.replace(kern, fn=spy)
            spied = dataclasses.replace(mod, **kerns)
            if wide[0]:
                cache[(key, True)] = spied.wide_rows() if force else spied
            else:  # bsfa_fwd_dense itself, not the cluster entries that even groups take
                cache[(key, False)] = dataclasses.replace(spied.wide_rows(False), dense_clusters=False)
        return cache[(key, wide[0])]

    monkeypatch.setattr(ops, "get_module", get_module)
    bsfa_cupy.clear_plan_cache()


def _both(monkeypatch, q, k, v, causal, **call):
    import bsfa_cupy

    wide, seen, runs = [True], [], []
    _route(monkeypatch, wide, seen)
    for on in (True, False):
        wide[0] = on
        bsfa_cupy.clear_plan_cache()
        runs.append(bsfa_cupy.attention(q, k, v, causal=causal, return_lse=True, backend="sm90ws", **call))
    assert seen == ["wide", "dense"], f"expected the wide entry, then bsfa_fwd_dense, got {seen}"
    return runs


def _assert_bitwise(runs):
    assert_bitwise(("out", "lse"), runs[1], runs[0], "the wide entry (against bsfa_fwd_dense)")


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("shape", [(2, 1100, 1300, 16, 4), (1, 577, 577, 3, 1), (3, 300, 2100, 4, 1),
                                   (1, 2100, 300, 6, 2), (1, 100, 100, 1, 1), (1, 1000, 1000, 2, 2)],
                         ids=lambda s: "x".join(map(str, s)))
def test_wide_entry_equals_plain_dense(monkeypatch, dtype, causal, shape):
    """Odd lengths (ragged 192-row tiles), Nq < Nk and Nq > Nk (bottom-right: rows without keys beside rows
    with), GQA, MHA and batches, a single tile."""
    B, Nq, Nk, Hq, Hkv = shape
    rng = np.random.default_rng(Nq * 3 + Nk + Hq)
    q, k, v = map(cp.asarray, random_inputs(rng, B, Nq, Nk, Hq, Hkv, 64, dtype))
    _assert_bitwise(_both(monkeypatch, q, k, v, causal))


def test_wide_entry_equals_plain_dense_with_offsets(monkeypatch):
    rng = np.random.default_rng(5)
    q, k, v = map(cp.asarray, random_inputs(rng, 1, 700, 900, 4, 2, 64, "float16"))
    _assert_bitwise(_both(monkeypatch, q, k, v, True, q_start=384, k_start=128))


@pytest.mark.parametrize("causal", [True, False])
def test_wide_entry_nonfinite_inputs_reach_exactly_the_reference_rows(monkeypatch, causal):
    import bsfa_cupy

    q, k, v, _ = planted_nonfinite(11 + causal, (1, 333, 400, 4, 2, 64), causal, False,
                                   q_at=[(0, 200, 1, 5), (0, 17, 3, 0)], k_at=[(0, 150, 0, 3), (0, 390, 1, 7)],
                                   v_at=[(0, 70, 1, 2), (0, 300, 0, 0)])
    wide, seen = [True], []
    _route(monkeypatch, wide, seen)
    poison_outputs(monkeypatch)
    out, lse = bsfa_cupy.attention(*map(cp.asarray, (q, k, v)), causal=causal, return_lse=True, backend="sm90ws")
    assert seen == ["wide"], f"expected the wide entry, got {seen}"
    assert_nonfinite_like_reference(q, k, v, causal, cp.asnumpy(out), cp.asnumpy(lse), None)


def test_routing_long_dense_calls_without_keep_only(monkeypatch):
    """From WIDE_MIN_Q_TILES query tiles on, a dense call without keep takes the wide entry by itself; a
    shorter one, one asking for keep, and one with thresholds do not."""
    import bsfa_cupy
    from bsfa_cupy import _kernels

    rng = np.random.default_rng(7)
    n = _kernels.WIDE_MIN_Q_TILES * 128
    # 2 x 16 heads x 16 query tiles fill the GPU: no split-KV; MHA, so that the shorter call's dense entry is
    # bsfa_fwd_dense, not the cluster entry of even groups
    q, k, v = map(cp.asarray, random_inputs(rng, 2, n, n, 16, 16, 64, "float16"))
    wide, seen = [True], []
    _route(monkeypatch, wide, seen, force=False)
    bsfa_cupy.attention(q, k, v, backend="sm90ws")
    bsfa_cupy.attention(q[:, :n - 128], k, v, backend="sm90ws")
    assert seen == ["wide", "dense"], f"expected the wide entry at {n} rows and bsfa_fwd_dense below, got {seen}"
    seen.clear()
    _, _, keep = bsfa_cupy.attention(q, k, v, return_lse=True, return_keep=True, backend="sm90ws")
    assert seen == ["dense"], f"a call asking for keep: expected bsfa_fwd_dense, got {seen}"
    assert bool(cp.asarray(keep).any()), "keep: no tile kept"
    bsfa_cupy.attention(q, k, v, -np.inf, backend="sm90ws")
    assert seen == ["dense"], f"a call with thresholds: expected neither dense entry, got {seen}"
