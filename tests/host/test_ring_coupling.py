"""bench/ring_coupling.py, the model of what sharing one K/V ring between heads costs a sparse call."""
from __future__ import annotations

import numpy as np
import pytest

from tests.support.bench_scripts import load_bench_script


def test_one_head_a_ring_loses_nothing_and_more_heads_lose_more():
    rc = load_bench_script("ring_coupling")
    losses = [rc.coupling_loss(4096, 0.5, h, 3, 50) for h in (1, 2, 4)]
    assert losses[0] == pytest.approx(0.0, abs=1e-12), losses
    assert 0.0 < losses[1] < losses[2] < 0.2, f"expected 0 < loss(2 heads) < loss(4 heads) < 20 %, got {losses}"


def test_deeper_rings_and_uniform_blocks_lose_less():
    rc = load_bench_script("ring_coupling")
    by_stages = [rc.coupling_loss(4096, 0.5, 2, s, 50) for s in (2, 3, 6)]
    assert by_stages[0] > by_stages[1] > by_stages[2] > 0.0, by_stages
    # every gated block kept (rho 1) or none (rho 0): all heads' costs are equal, nothing to wait for
    for rho in (1.0, 0.0):
        assert rc.coupling_loss(4096, rho, 4, 3, 10) == pytest.approx(0.0, abs=1e-12), rho


def test_the_slowest_head_sets_a_ring_of_one_stage():
    rc = load_bench_script("ring_coupling")
    cost = np.array([[[1.0, 2.0, 1.0], [2.0, 1.0, 2.0]]])  # (trials, heads, blocks)
    # one stage: each block starts once both heads finished the one before it: 2 + 2 + 2
    assert rc.tile_finish(cost, 1)[0] == pytest.approx(6.0)
    # stages >= blocks: the heads never wait, the slower one's own sum
    assert rc.tile_finish(cost, 3)[0] == pytest.approx(5.0)
