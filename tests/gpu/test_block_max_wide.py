"""bsfa_block_max_wide, the sm90ws entry of block_max_scores: bsfa_block_max on 256-row query tiles, each consumer
warpgroup a whole 128-row BSFA tile, so that each K block serves twice the rows. The same S (m64n128 wgmma per 64
rows), masks and maxima, so the tile maxima must equal bsfa_block_max's (Module.narrow_block_max()) bitwise, over
dtypes, head dims, causal or not, tile counts odd and even (a 256-row tile whose second half lies past Nq), Nq !=
Nk (rows without keys), GQA, batches, offsets and non-finite inputs. Their agreement with the reference is then
bsfa_block_max's."""
from __future__ import annotations

import numpy as np
import pytest

from tests.gpu.conftest import _is_hopper
from tests.support.gpu import assert_bitwise, cp, random_inputs, requires_gpu, swap_sm90ws_entry

pytestmark = [pytest.mark.gpu, requires_gpu,
              pytest.mark.skipif(not _is_hopper(), reason="the sm90ws kernel needs compute capability 9.0")]


def _both(monkeypatch, q, k, causal, **call):
    import bsfa_cupy

    on, seen = [False], []
    swap_sm90ws_entry(monkeypatch, on, lambda mod: mod, "block_max", seen, off=lambda mod: mod.narrow_block_max())
    runs = []
    for wide in (False, True):
        on[0] = wide
        bsfa_cupy.clear_plan_cache()  # a kept plan holds the entry it was built with
        runs.append(cp.asarray(bsfa_cupy.block_max_scores(q, k, causal=causal, backend="sm90ws", **call)))
    assert seen == ["block_max"], f"expected one launch of bsfa_block_max_wide, got {seen}"
    assert_bitwise(("tile maxima",), [runs[0]], [runs[1]], "256-row tiles (against bsfa_block_max)")


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("shape", [(2, 1100, 1300, 8, 2), (1, 577, 577, 3, 1), (3, 300, 2100, 4, 4),
                                   (1, 2100, 300, 6, 2), (1, 100, 100, 1, 1), (1, 1024, 1024, 2, 1)],
                         ids=lambda s: "x".join(map(str, s)))
def test_wide_tiles_give_the_same_tile_maxima(monkeypatch, dtype, D, causal, shape):
    B, Nq, Nk, Hq, Hkv = shape
    rng = np.random.default_rng(Nq * 13 + Nk + D)
    q, k, _ = map(cp.asarray, random_inputs(rng, B, Nq, Nk, Hq, Hkv, D, dtype))
    _both(monkeypatch, q, k, causal)


def test_wide_tiles_with_offsets(monkeypatch):
    rng = np.random.default_rng(3)
    q, k, _ = map(cp.asarray, random_inputs(rng, 1, 700, 900, 4, 2, 128, "float16"))
    _both(monkeypatch, q, k, True, q_start=384, k_start=128)


@pytest.mark.parametrize("causal", [True, False])
def test_wide_tiles_with_non_finite_inputs(monkeypatch, causal):
    rng = np.random.default_rng(4)
    q, k, _ = random_inputs(rng, 1, 600, 650, 4, 2, 64, "float16")
    q[0, 300, 1, 5] = np.nan
    q[0, 17, 3, 0] = np.inf
    k[0, 150, 0, 3] = -np.inf
    k[0, 640, 1, 7] = np.nan
    _both(monkeypatch, cp.asarray(q), cp.asarray(k), causal)
