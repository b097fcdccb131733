"""bsfa_block_max_qrs, bsfa_block_max with each consumer warpgroup's rows of Q in registers (the A operand of
a register-sourced wgmma) instead of shared memory: the same products in the same order, so its tile maxima
must equal bsfa_block_max's bitwise, over dtypes, head dims, causal or not, ragged lengths, Nq != Nk, GQA
and batches. Its agreement with the reference is then bsfa_block_max's (test_attention.py)."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from tests.gpu.conftest import _is_hopper
from tests.support.gpu import cp, random_inputs, requires_gpu

pytestmark = [pytest.mark.gpu, requires_gpu,
              pytest.mark.skipif(not _is_hopper(), reason="the sm90ws kernel needs compute capability 9.0")]


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("shape", [(2, 1100, 1300, 8, 2), (1, 577, 577, 3, 1), (3, 300, 2100, 4, 4),
                                   (1, 2100, 300, 6, 2)], ids=lambda s: "x".join(map(str, s)))
def test_q_in_registers_gives_the_same_tile_maxima(monkeypatch, dtype, D, causal, shape):
    import bsfa_cupy
    from bsfa_cupy import ops

    B, Nq, Nk, Hq, Hkv = shape
    rng = np.random.default_rng(Nq * 11 + Nk + D)
    q, k, _ = map(cp.asarray, random_inputs(rng, B, Nq, Nk, Hq, Hkv, D, dtype))
    real, on, seen = ops.get_module, [False], []

    def get_module(key, backend, device_id):
        mod = real(key, backend, device_id)
        if key.arch != "sm90ws" or not on[0]:
            return mod
        swapped = mod.block_max_q_regs()
        assert swapped.block_max.fn is mod.block_max_qrs.fn, f"{key.name()}: no bsfa_block_max_qrs"

        def spy(*args, _fn=swapped.block_max.fn, **kw):
            seen.append("block_max_qrs")
            return _fn(*args, **kw)

        return dataclasses.replace(swapped, block_max=dataclasses.replace(swapped.block_max, fn=spy))

    monkeypatch.setattr(ops, "get_module", get_module)
    runs = []
    for regs in (False, True):
        on[0] = regs
        bsfa_cupy.clear_plan_cache()
        runs.append(cp.asarray(bsfa_cupy.block_max_scores(q, k, causal=causal, backend="sm90ws")))
    assert seen == ["block_max_qrs"], f"expected one launch of bsfa_block_max_qrs, got {seen}"
    a, b = runs
    same = (a == b) | (cp.isnan(a) & cp.isnan(b))
    bad = int((~same).sum())
    if bad:
        both = cp.isfinite(a) & cp.isfinite(b)
        worst = float(cp.abs(a - b)[both].max()) if bool(both.any()) else float("nan")
        raise AssertionError(f"tile maxima: Q in registers differs at {bad} of {a.size} tiles (worst finite {worst:.3e})")
