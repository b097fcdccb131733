"""bench/decode.py's CPU-side logic (its --dry-run): thresholds for a target ρ, the bars, the result files."""
from __future__ import annotations

import json

import numpy as np
import pytest

from tests.support.bench_scripts import load_bench_script


def _load():
    return load_bench_script("decode")


def test_dry_run_writes_results_and_bars(tmp_path, capsys):
    mod = _load()
    mod.main(["--dry-run", "--out", str(tmp_path), "--shapes", "1x4096", "16x8192", "300x8192"])
    files = sorted(p.name for p in tmp_path.iterdir())
    assert any(f.endswith("_decode.json") for f in files) and any(f.endswith("_decode.md") for f in files)
    result = json.loads(next(tmp_path.glob("*_decode.json")).read_text())
    assert {(r["nq"], r["nk"]) for r in result["rows"]} == {(1, 4096), (16, 8192), (300, 8192)}
    assert any(b.startswith("PASS") or b.startswith("FAIL") for b in result["bars"])
    sparse = [r for r in result["rows"] if r["impl"] == "bsfa-sparse"]
    assert all(abs(r["rho"] - 0.25) < 0.1 for r in sparse)


def test_dry_run_shared_q_sparse_rows_load_v_for_rho_of_the_tiles(tmp_path, capsys):
    mod = _load()
    mod.main(["--dry-run", "--shared-q-sparse", "--out", str(tmp_path), "--tag", "dq", "--shapes", "1x4096", "16x8192"])
    result = json.loads(next(tmp_path.glob("*_dq.json")).read_text())
    assert result["shared_q_sparse"] is True
    indep = {(r["nq"], r["nk"]): r for r in result["rows"] if r["impl"] == "bsfa-sparse"}
    shared = {(r["nq"], r["nk"]): r for r in result["rows"] if r["impl"] == "bsfa-sparse-shared"}
    assert set(shared) == set(indep) == {(1, 4096), (16, 8192)}
    for key, r in shared.items():
        # one decision per group: V for rho of the gated tiles; independent heads need it far more often
        assert abs(r["v_share"] - r["rho"]) < 1e-9 and abs(r["rho"] - 0.25) < 0.1, r
        assert indep[key]["v_share"] > r["v_share"] + 0.2, (indep[key]["v_share"], r["v_share"])
    lines = [b for b in result["bars"] if "one decision per GQA group" in b]
    assert len(lines) == 2 and all("(bsfa-sparse-shared-plan)" in b for b in lines), result["bars"]


def test_shared_q_flags_exclude_each_other(tmp_path, capsys):
    mod = _load()
    with pytest.raises(SystemExit) as exc:
        mod.main(["--dry-run", "--shared-q-sparse", "--group-shared-q", "--out", str(tmp_path)])
    assert exc.value.code == 2
    assert "take one" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())


def test_thresholds_for_rho_keep_the_top_share_per_tile_row():
    mod = _load()
    rng = np.random.default_rng(0)
    Nq, Nk = 1, 64 * 40
    tm = rng.standard_normal((2, 1, 40)).astype(np.float32)  # as block_max_scores gives
    thr = mod.thresholds_for_rho(tm, 0.25, Nq, Nk)
    pos = (Nk - Nq) // 128
    assert thr.shape == (2, pos + 1) and np.isinf(thr[:, :pos]).all()
    kept = tm[:, 0, :39] >= thr[:, pos][:, None]  # the last tile is the diagonal one
    assert (kept.sum(axis=1) == 10).all()  # ceil(0.25 * 39)
    assert abs(mod.floor_ms(1, 1, 131072, 32, 8, 128, 2, 4.8) - 0.1118) < 1e-3


def test_bars_take_the_faster_of_attention_and_plan_and_say_which():
    mod = _load()
    fl = mod.floor_ms(1, 1, 131072, 32, 8, 128, 2, 4.8)
    base = dict(nq=1, nk=131072, floor_ms=fl, floor_ach_ms=fl, error=None)
    rows = [dict(impl="bsfa-auto", ms=0.30, **base), dict(impl="bsfa-plan", ms=0.12, **base),
            dict(impl="bsfa-sparse", ms=0.05, **base), dict(impl="bsfa-sparse-plan", ms=0.08, **base),
            dict(impl="sdpa-cudnn", ms=0.135, **base)]
    bars = mod.bars(rows, 4.2)
    assert bars[0].startswith("PASS") and "0.120 ms (bsfa-plan)" in bars[0]
    assert "0.050 ms (bsfa-sparse)" in bars[2] and bars[2].startswith("PASS")
    rows[1]["ms"] = None  # the plan failed: attention's timing stands
    assert "0.300 ms (bsfa-auto)" in mod.bars(rows, 4.2)[0]


def test_floor_bar_names_a_tensor_core_floor_out_of_reach():
    mod = _load()
    nk = 131072
    rows = []
    for nq in (16, 128):
        fl = mod.floor_ms(1, nq, nk, 32, 8, 128, 2, 4.2)
        rows += [dict(impl="bsfa-plan", ms=1.0, nq=nq, nk=nk, floor_ms=fl, floor_ach_ms=fl, error=None)]
    lines = mod.bars(rows, 4.2)
    floor16 = next(x for x in lines if x.startswith("FAIL 16x") and "memory floor" in x)
    floor128 = next(x for x in lines if x.startswith("FAIL 128x") and "memory floor" in x)
    assert "out of reach" not in floor16
    assert "out of reach" in floor128
    # 128 rows: 4 * 32 * (128 * 131072 - 127 * 64) * 128 FLOP at 989 TFLOP/s.
    assert abs(mod.compute_floor_ms(1, 128, nk, 32, 128) - 0.2780) < 1e-3
