"""bench/step_trace.py's summary of an instrumented head-pair build's step clocks, on a trace built here with
known parts: per kind of block the cycles of the waits, S, gate, rest, tail and loop, the split by the previous
block, each warpgroup's mean step, the seams between work tiles, and the overlap of the two warpgroups' S
windows."""
from __future__ import annotations

import numpy as np
import pytest

from tests.support.bench_scripts import load_bench_script

WAITS, S, GATE, REST_KEPT, REST_SKIPPED, TAIL, PERIOD = 40, 100, 50, 300, 20, 10, 1000
KEPT = [1, 0, 1, 0, 0, 1]  # two work tiles of three blocks each
SEAM_EXTRA = 700  # more time before the second tile's first step


def _trace(shift_wg1):
    st = load_bench_script("step_trace")
    trace = np.zeros(st.SHAPE, dtype=np.uint64)
    for wg, shift in ((0, 0), (1, shift_wg1)):
        for i, kept in enumerate(KEPT):
            tw = 10 + PERIOD * i + (SEAM_EXTRA if i >= 3 else 0) + shift
            t0 = tw + WAITS
            t1, t2 = t0 + S, t0 + S + GATE
            t3 = t2 + (REST_KEPT if kept else REST_SKIPPED)
            t4 = t3 + TAIL
            prev = KEPT[i - 1] if i % 3 else 0
            flags = (kept << 2) | (prev << 1) | (1 if i % 3 == 0 else 0)
            trace[0, wg, i] = [tw, t0, t1, t2, t3, t4 | (flags << 61)]
    return st, trace


def test_parts_by_kind_and_the_seams():
    st, trace = _trace(0)
    got = st.summarize(trace)
    assert got["counts"]["kept"] == 2 * KEPT.count(1) and got["counts"]["skipped"] == 2 * KEPT.count(0), got["counts"]
    for kind in ("kept", "skipped"):
        assert got[kind]["waits"] == WAITS and got[kind]["S"] == S and got[kind]["gate"] == GATE, (kind, got[kind])
        assert got[kind]["tail"] == TAIL, (kind, got[kind])
    assert got["kept"]["rest"] == REST_KEPT and got["skipped"]["rest"] == REST_SKIPPED, got
    # by the previous block of the tile (a tile's first block counts as after a skipped one): KEPT = 1 0 1 | 0 0 1
    assert got["counts"]["kept after skipped"] == 2 * 3 and got["counts"]["kept after kept"] == 0, got["counts"]
    assert got["counts"]["skipped after kept"] == 2 * 1 and got["counts"]["skipped after skipped"] == 2 * 2, got
    # loop: the next step's first clock minus this step's end, within a tile only; a tile's last step has none of
    # its own, its time to the next tile's first step is a seam
    def start(i):
        return 10 + PERIOD * i + (SEAM_EXTRA if i >= 3 else 0)

    def end(i):
        return start(i) + WAITS + S + GATE + (REST_KEPT if KEPT[i] else REST_SKIPPED) + TAIL

    loops = {"kept": [], "skipped": []}
    for i, kept in enumerate(KEPT):
        loops["kept" if kept else "skipped"].append(start(i + 1) - end(i) if i % 3 != 2 else 0)
    for kind in loops:
        assert got[kind]["loop"] == pytest.approx(np.mean(loops[kind])), (kind, got[kind], loops[kind])
    seam = start(3) - end(2)
    steps = sum(got[k][p] * got["counts"][k] for k in ("kept", "skipped") for p in st.PARTS)
    assert got["seams"] == pytest.approx(2 * seam / (steps + 2 * seam)), got["seams"]
    assert got["wg_step"][0] == pytest.approx(steps / 2 / len(KEPT)) == got["wg_step"][1], got["wg_step"]
    assert got["s_overlap"] == pytest.approx(1.0), got["s_overlap"]
    lines = st.report({"rho0.5": got})
    assert lines[0].startswith("rho0.5: 6 kept and 6 skipped"), lines
    assert any(line.lstrip().startswith("skipped after skipped (    4)") for line in lines), lines


def test_half_shifted_warpgroups_overlap_by_half():
    st, trace = _trace(S // 2)
    assert st.summarize(trace)["s_overlap"] == pytest.approx(0.5)


def test_a_trace_of_another_shape_is_refused():
    st = load_bench_script("step_trace")
    with pytest.raises(ValueError, match=r"expected shape \(CTAs, 2, 2048, 6\), got \(8, 2, 2048, 4\)"):
        st.summarize(np.zeros((8, 2, 2048, 4), dtype=np.uint64))


@pytest.mark.parametrize("argv, message", [
    (["--n", "1000"], "--n: expected a positive multiple of 128, got 1000"),
    (["--rhos", "0.5", "1.5"], "--rhos: expected keep fractions in [0, 1], got [1.5]"),
])
def test_run_refuses_bad_options_before_any_gpu_work(argv, message, capsys):
    st = load_bench_script("step_trace")
    with pytest.raises(SystemExit):
        st.main(["run", "T.cu", "out.npz", *argv])
    assert message in capsys.readouterr().err
