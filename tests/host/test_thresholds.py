"""bsfa_cupy.Thresholds: the .npz round trip, per-layer access, geometry checks, the paper's file format."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

import bsfa_reference as ref
from bsfa_cupy import BLOCK_M, BLOCK_N, Thresholds

PROV = {"source": "unit test", "date": "2025-01-01", "samples": "3", "reduce": "mean"}


def _values(K=2, L=3, H=4, T=5, seed=0):
    v = np.random.default_rng(seed).standard_normal((K, L, H, T)).astype(np.float32)
    v[:, :, :, 0] = -np.inf  # a position where every tile is kept
    return v


def test_npz_round_trip_keeps_everything(tmp_path):
    thr = Thresholds(_values(), [16, 32], causal=False, provenance=PROV)
    path = thr.save(tmp_path / "thr.npz")
    back = Thresholds.load(path)
    np.testing.assert_array_equal(back.values, thr.values)
    assert back.values.dtype == np.float32
    assert back.k_values == (16, 32)
    assert (back.block_m, back.block_n, back.causal) == (BLOCK_M, BLOCK_N, False)
    assert back.provenance == PROV
    assert (back.num_layers, back.num_heads, back.num_positions) == (3, 4, 5)
    with np.load(path, allow_pickle=False) as raw:  # plain arrays only, provenance as JSON text
        assert json.loads(str(raw["provenance"])) == PROV


def test_save_writes_exactly_the_given_path(tmp_path):
    path = Thresholds(_values(), [16, 32]).save(tmp_path / "model.thr")
    assert path == tmp_path / "model.thr" and path.is_file()
    assert Thresholds.load(path).k_values == (16, 32)


def test_numbers_in_provenance_are_stored_as_text():
    assert Thresholds(_values(), [1, 2], provenance={"samples": 16}).provenance == {"samples": "16"}
    with pytest.raises(TypeError, match=r"provenance\['x'\]: expected a str"):
        Thresholds(_values(), [1, 2], provenance={"x": [1]})
    with pytest.raises(TypeError, match="expected a dict"):
        Thresholds(_values(), [1, 2], provenance="text")


def test_for_layer_takes_a_k_value_and_returns_a_copy():
    v = _values()
    thr = Thresholds(v, [16, 32])
    got = thr.for_layer(2, 32)
    assert got.shape == (4, 5) and got.dtype == np.float32 and got.flags.c_contiguous
    np.testing.assert_array_equal(got, v[1, 2])
    got[:] = 0
    np.testing.assert_array_equal(thr.for_layer(2, 32), v[1, 2])
    with pytest.raises(ValueError, match=r"k: 1 was not calibrated; expected one of the k values \[16, 32\]"):
        thr.for_layer(0, 1)  # an index, not a k value
    with pytest.raises(ValueError, match=r"expected 0 <= layer < 3, got 3"):
        thr.for_layer(3, 16)
    with pytest.raises(TypeError, match="k: expected an int"):
        thr.for_layer(0, 16.0)


def test_for_layer_feeds_the_reference_attention():
    rng = np.random.default_rng(1)
    q, k, v = (rng.standard_normal((1, 256, 2, 16)) for _ in range(3))
    thr = Thresholds(np.full((1, 1, 2, 2), 0.5, np.float32), [8])
    out = ref.attention(q, k, v, thr.for_layer(0, 8))
    assert out.shape == q.shape


def test_constructor_rejects_bad_values():
    with pytest.raises(ValueError, match=r"expected shape \(2, layers, Hq, T\).*got \(3, 3, 4, 5\)"):
        Thresholds(_values(K=3), [16, 32])
    bad = _values()
    bad[0, 0, 0, 1] = np.nan
    with pytest.raises(ValueError, match="1 NaN values; use -inf"):
        Thresholds(bad, [16, 32])
    with pytest.raises(ValueError, match="duplicates"):
        Thresholds(_values(), [16, 16])
    with pytest.raises(TypeError, match="expected a float array"):
        Thresholds(np.zeros((2, 1, 1, 1), bool), [16, 32])


def test_geometry_mismatch_is_refused_unless_inspecting(tmp_path):
    path = Thresholds(_values(), [16, 32], block_n=128).save(tmp_path / "t.npz")
    with pytest.raises(ValueError, match=r"calibrated on 128x128 tiles .* kernel uses 128x64.*check_geometry=False"):
        Thresholds.load(path)
    assert Thresholds.load(path, check_geometry=False).block_n == 128


def test_load_gives_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError):
        Thresholds.load(tmp_path / "missing.npz")
    junk = tmp_path / "junk.npz"
    junk.write_bytes(b"not a zip file")
    with pytest.raises(ValueError, match="not a readable .npz file"):
        Thresholds.load(junk)
    other = tmp_path / "other.npz"
    np.savez(other, thresholds=np.zeros(3))
    with pytest.raises(ValueError, match=r"not a bsfa thresholds file: missing \['format_version'.*load_official"):
        Thresholds.load(other)


def test_from_calibrators_pads_T_by_repeating_the_last_column():
    rng = np.random.default_rng(2)
    cals = []
    for n in (300, 700):  # T = 3 and T = 6 (positions of 128-row query tiles)
        cal = ref.Calibrator([1, 2])
        cal.update(rng.standard_normal((2, n, 2, 16)), rng.standard_normal((2, n, 1, 16)))
        cals.append(cal)
    thr = Thresholds.from_calibrators(cals, provenance={"model": "toy"})
    assert thr.values.shape == (2, 2, 2, 6)
    short = cals[0].thresholds()
    np.testing.assert_array_equal(thr.values[:, 0, :, :3], short)
    np.testing.assert_array_equal(thr.values[:, 0, :, 3:], np.repeat(short[:, :, -1:], 3, axis=2))
    np.testing.assert_array_equal(thr.values[:, 1], cals[1].thresholds())
    assert thr.provenance["model"] == "toy" and thr.provenance["samples"] == "2"
    assert thr.provenance["reduce"] == "mean"
    # padding changes nothing: attention clamps positions >= T to T - 1
    q, k, v = (rng.standard_normal((1, 700, 2, 16)) for _ in range(3))
    k, v = k[:, :, :1], v[:, :, :1]
    keep_short = ref.attention(q, k, v, short[1], return_keep=True)[1]
    keep_padded = ref.attention(q, k, v, thr.for_layer(0, 2), return_keep=True)[1]
    np.testing.assert_array_equal(keep_short, keep_padded)


def test_from_calibrators_refuses_mismatched_layers():
    rng = np.random.default_rng(3)
    a, b = ref.Calibrator([1, 2]), ref.Calibrator([1, 3])
    for cal in (a, b):
        cal.update(rng.standard_normal((1, 256, 2, 16)), rng.standard_normal((1, 256, 2, 16)))
    with pytest.raises(ValueError, match=r"calibrators\[1\]: expected \(k_values"):
        Thresholds.from_calibrators([a, b])
    with pytest.raises(ValueError, match="at least one Calibrator"):
        Thresholds.from_calibrators([])


# ---------------------------------------------------------------------------------------------
# the paper's published format
# ---------------------------------------------------------------------------------------------


def _official(torch, **over):
    d = {
        "thresholds": torch.from_numpy(_values()),
        "k_values": [16, 32],
        "max_num_blocks": 5,
        "num_layers": 3,
        "num_heads": 4,
        "q_block_size": 128,
        "k_block_size": 64,
        "aggregation_method": "mean",
        "shape_description": "[num_k_values, num_layers, num_heads, max_num_q_blocks]",
    }
    d.update(over)
    return d


def test_official_file_written_by_torch_loads(tmp_path):
    torch = pytest.importorskip("torch")
    path = tmp_path / "thr.inference.pt"
    torch.save(_official(torch), path)
    thr = Thresholds.load_official(path)
    np.testing.assert_array_equal(thr.values, _values())
    assert thr.k_values == (16, 32) and (thr.block_m, thr.block_n) == (128, 64)
    assert thr.provenance["aggregation_method"] == "mean"
    assert "thr.inference.pt" in thr.provenance["source"]
    np.testing.assert_array_equal(thr.for_layer(1, 16), _values()[0, 1])


def test_official_file_with_their_default_128_key_tiles_fails_geometry(tmp_path):
    torch = pytest.importorskip("torch")
    path = tmp_path / "thr.pt"
    torch.save(_official(torch, k_block_size=128), path)
    with pytest.raises(ValueError, match=r"128x128 tiles .* 128x64"):
        Thresholds.load_official(path)
    assert Thresholds.load_official(path, check_geometry=False).block_n == 128


def test_official_file_errors(tmp_path):
    torch = pytest.importorskip("torch")
    path = tmp_path / "thr.pt"
    torch.save({k: v for k, v in _official(torch).items() if k != "num_heads"}, path)
    with pytest.raises(ValueError, match=r"missing keys \['num_heads'\]"):
        Thresholds.load_official(path)
    torch.save(_official(torch, max_num_blocks=7), path)
    with pytest.raises(ValueError, match=r"expected thresholds of shape \(2, 3, 4, 7\)"):
        Thresholds.load_official(path)
    torch.save(_official(torch, extra=np.dtype("int8").type), path)  # not loadable with weights_only
    with pytest.raises(ValueError, match="weights_only=True"):
        Thresholds.load_official(path)


def test_official_loader_without_torch_names_torch(tmp_path):
    code = (
        "import sys; sys.modules['torch'] = None\n"
        "from bsfa_cupy import Thresholds\n"
        "try:\n"
        "    Thresholds.load_official('x.pt')\n"
        "except ImportError as e:\n"
        "    print('IMPORTERROR', e)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "IMPORTERROR" in proc.stdout and "pip install torch" in proc.stdout, proc.stdout
