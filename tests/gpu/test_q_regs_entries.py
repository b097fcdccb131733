"""bsfa_block_max_qrs and bsfa_fwd_dense_qrs (head dim 128): bsfa_block_max and bsfa_fwd_dense with each
consumer warpgroup's rows of Q in registers (the A operand of a register-sourced wgmma) instead of shared
memory. The same products in the same order, so the tile maxima must equal bsfa_block_max's, and out, lse
and keep bsfa_fwd_dense's, bitwise, over dtypes, head dims, causal or not, ragged lengths, Nq != Nk, GQA
and batches. Their agreement with the reference is then the plain entries' (test_attention.py)."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from tests.gpu.conftest import _is_hopper
from tests.support.gpu import assert_bitwise, cp, random_inputs, requires_gpu, swap_sm90ws_entry

pytestmark = [pytest.mark.gpu, requires_gpu,
              pytest.mark.skipif(not _is_hopper(), reason="the sm90ws kernel needs compute capability 9.0")]


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("shape", [(2, 1100, 1300, 8, 2), (1, 577, 577, 3, 1), (3, 300, 2100, 4, 4),
                                   (1, 2100, 300, 6, 2)], ids=lambda s: "x".join(map(str, s)))
def test_q_in_registers_gives_the_same_tile_maxima(monkeypatch, dtype, D, causal, shape):
    import bsfa_cupy

    B, Nq, Nk, Hq, Hkv = shape
    rng = np.random.default_rng(Nq * 11 + Nk + D)
    q, k, _ = map(cp.asarray, random_inputs(rng, B, Nq, Nk, Hq, Hkv, D, dtype))
    on, seen = [False], []
    swap_sm90ws_entry(monkeypatch, on, lambda mod: mod.block_max_q_regs(), "block_max", seen)
    runs = []
    for regs in (False, True):
        on[0] = regs
        bsfa_cupy.clear_plan_cache()
        runs.append(cp.asarray(bsfa_cupy.block_max_scores(q, k, causal=causal, backend="sm90ws")))
    assert seen == ["block_max"], f"expected one launch of bsfa_block_max_qrs, got {seen}"
    assert_bitwise(("tile maxima",), [runs[0]], [runs[1]], "Q in registers (against bsfa_block_max)")


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("shape", [(2, 1100, 1300, 16, 4), (1, 577, 577, 3, 1), (3, 300, 2100, 4, 4),
                                   (1, 2100, 300, 6, 2), (1, 100, 100, 1, 1)], ids=lambda s: "x".join(map(str, s)))
def test_dense_q_in_registers_gives_the_same_results(monkeypatch, dtype, causal, shape):
    import bsfa_cupy

    B, Nq, Nk, Hq, Hkv = shape
    rng = np.random.default_rng(Nq * 13 + Nk + Hq)
    q, k, v = map(cp.asarray, random_inputs(rng, B, Nq, Nk, Hq, Hkv, 128, dtype))
    on, seen = [False], []
    # off: bsfa_fwd_dense itself, not the cluster or tile-pair entries
    swap_sm90ws_entry(monkeypatch, on, lambda mod: mod.dense_q_regs(), "fwd_dense", seen,
                      off=lambda mod: dataclasses.replace(mod, dense_clusters=False))
    runs = []
    for regs in (False, True):
        on[0] = regs
        bsfa_cupy.clear_plan_cache()
        runs.append(bsfa_cupy.attention(q, k, v, causal=causal, return_lse=True, return_keep=True, backend="sm90ws"))
    assert seen == ["fwd_dense"], f"expected one launch of bsfa_fwd_dense_qrs, got {seen}"
    assert_bitwise(("out", "lse", "keep"), runs[0], runs[1], "Q in registers (against bsfa_fwd_dense)")
