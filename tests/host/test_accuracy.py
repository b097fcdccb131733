"""The accuracy harness on the CPU path (the float64 reference) at a tiny size."""
from __future__ import annotations

import json

import numpy as np
import pytest

import bsfa_reference as ref
from bsfa_cupy.tools import accuracy
from bsfa_reference.tiles import expand_tiles, valid_mask


def test_kept_mass_is_exp_of_the_lse_difference():
    """The harness's 'mass dropped' needs no N x N matrix: the dense softmax mass on the kept
    entries of a row equals exp(lse_sparse - lse_dense). Checked here against the explicit sum."""
    rng = np.random.default_rng(0)
    q, k, v = (rng.standard_normal((1, 384, 2, 16)) * s for s in (2, 2, 1))
    _, lse_dense = ref.attention(q, k, v, return_lse=True)
    _, lse_sparse, keep = ref.attention(q, k, v, 1.0, return_lse=True, return_keep=True)
    assert 0 < keep.mean() < 1
    s = np.einsum("bihd,bjhd->bhij", q, np.repeat(k, 1, axis=2)) / 4.0
    p = np.exp(np.where(valid_mask(384, 384, True), s, -np.inf) - lse_dense[..., None])
    kept = valid_mask(384, 384, True) & expand_tiles(keep, 384, 384, 128, 64)
    np.testing.assert_allclose(np.exp(lse_sparse - lse_dense), np.where(kept, p, 0).sum(-1), rtol=1e-12)


def test_cpu_harness_writes_results(tmp_path):
    cfg = accuracy.Config(ns=(512,), ks=(1, 2, 64), calib_samples=2)
    result, paths = accuracy.run(cfg, progress=False, out_dir=tmp_path, tag="t")
    names = [p.name for p in paths]
    stem = f"accuracy_cpu-reference_{result['date']}_t"
    assert names[:2] == [f"{stem}.json", f"{stem}.md"]
    assert json.loads(paths[0].read_text())["rows"] == result["rows"]
    rows = {r["k"]: r for r in result["rows"]}
    assert set(rows) == {1, 2, 64}
    # k = 64 > every query tile's candidates at N = 512: dense exactly
    assert rows[64]["density"] == 1.0 and rows[64]["mass_dropped"] == 0.0 and rows[64]["rel_err"] == 0.0
    assert rows[1]["density"] < rows[2]["density"] < 1.0
    assert rows[1]["mass_dropped"] >= rows[2]["mass_dropped"] > 0.0
    assert all(r["needles"] == 4 for r in rows.values())
    table = paths[1].read_text()
    assert "| 512 | 64 | 1.000 | 1.000 | 0.00e+00 | 0.00e+00 | 4/4 |" in table


def test_png_is_skipped_with_a_note_without_matplotlib(tmp_path, monkeypatch, capsys):
    from bsfa_cupy.tools import plots

    def missing():
        raise ImportError("plots need matplotlib: pip install 'bsfa-cupy[plot]'")

    monkeypatch.setattr(plots, "_pyplot", missing)
    result = {"device": "cpu-reference", "date": "2025-01-01", "config": vars(accuracy.Config(ns=(512,))),
              "calib_seeds": [1000, 1003], "eval_seed": 7,
              "rows": [dict(n=512, k=1, density=0.5, gated_kept=0.2, mass_dropped=0.1, rel_err=0.2, needles_hit=3,
                            needles=4)]}
    paths = accuracy.write_results(result, tmp_path)
    assert [p.suffix for p in paths] == [".json", ".md"]
    assert "PNG skipped" in capsys.readouterr().out


@pytest.mark.parametrize("ns,ks", [(None, None), ((256,), (8,))])
def test_config_for_the_cpu_is_small(ns, ks):
    cfg = accuracy.Config.for_device(False, ns=ns, ks=ks)
    assert max(cfg.ns) <= 4096 and cfg.hq <= 4
    assert accuracy.EVAL_SEED not in range(accuracy.CALIB_SEED0, accuracy.CALIB_SEED0 + cfg.calib_samples)


def _tiny_result():
    return {"device": "cpu-reference", "date": "2025-01-01", "config": vars(accuracy.Config(ns=(512,))),
            "calib_seeds": [1000, 1003], "eval_seed": 7,
            "rows": [dict(n=512, k=1, density=0.5, gated_kept=0.2, mass_dropped=0.1, rel_err=0.2, needles_hit=3,
                          needles=4)]}


def test_tags_keep_their_dots(tmp_path):
    first = accuracy.write_results(_tiny_result(), tmp_path, tag="v1.2")
    second = accuracy.write_results(_tiny_result(), tmp_path, tag="v1.3")
    for paths, tag in ((first, "v1.2"), (second, "v1.3")):
        stem = f"accuracy_cpu-reference_2025-01-01_{tag}"
        assert [p.name for p in paths] == [f"{stem}.json", f"{stem}.md", f"{stem}.png"][: len(paths)]
        assert len(paths) >= 2 and all(p.is_file() for p in paths)
