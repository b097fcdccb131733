"""bsfa_cupy.Thresholds: the .npz round trip, per-layer access, geometry checks, the paper's file format."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
import warnings
import zipfile
from pathlib import Path

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


# ---------------------------------------------------------------------------------------------
# saving replaces the file atomically
# ---------------------------------------------------------------------------------------------


def _fail_after_some_bytes(monkeypatch, exc=OSError(28, "No space left on device")):
    def savez(file, **arrays):
        file.write(b"PK\x03\x04" + b"\x00" * 100)  # a partial archive, then the disk fills up
        raise exc

    monkeypatch.setattr(np, "savez", savez)


def test_failed_save_keeps_the_previous_file_and_leaves_no_temporary(tmp_path, monkeypatch):
    path = tmp_path / "thr.npz"
    Thresholds(_values(), [16, 32], provenance=PROV).save(path)
    before = path.read_bytes()
    _fail_after_some_bytes(monkeypatch)
    with pytest.raises(OSError, match="No space left"):
        Thresholds(_values(seed=1), [16, 32]).save(path)
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["thr.npz"]
    np.testing.assert_array_equal(Thresholds.load(path).values, _values())


def test_interrupted_save_of_a_new_file_leaves_nothing(tmp_path, monkeypatch):
    _fail_after_some_bytes(monkeypatch, KeyboardInterrupt())
    with pytest.raises(KeyboardInterrupt):
        Thresholds(_values(), [16, 32]).save(tmp_path / "new.npz")
    assert list(tmp_path.iterdir()) == []


def test_failed_rename_keeps_the_previous_file(tmp_path, monkeypatch):
    path = tmp_path / "thr.npz"
    Thresholds(_values(), [16, 32]).save(path)
    before = path.read_bytes()
    renames = []

    def replace(src, dst):
        renames.append((Path(src), Path(dst)))
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(PermissionError):
        Thresholds(_values(seed=1), [16, 32]).save(path)
    assert path.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["thr.npz"]
    (src, dst), = renames
    assert dst == path and src.parent == tmp_path  # same folder: the rename is atomic
    assert str(os.getpid()) in src.name and str(threading.get_ident()) in src.name


def test_concurrent_saves_of_one_path_leave_one_complete_file(tmp_path):
    path = tmp_path / "thr.npz"
    tables = [Thresholds(_values(seed=s), [16, 32]) for s in range(4)]
    errors = []

    def writer(t):
        try:
            for _ in range(10):
                t.save(path)
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(t,)) for t in tables]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert not errors
    got = Thresholds.load(path).values
    assert any(np.array_equal(got, t.values) for t in tables)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["thr.npz"]


# ---------------------------------------------------------------------------------------------
# damaged and mistyped files: one ValueError that starts with the path
# ---------------------------------------------------------------------------------------------


def _saved(tmp_path, name="thr.npz", **fields):
    """A file as Thresholds.save writes it, with ``fields`` replaced."""
    arrays = dict(format_version=np.int64(1), thresholds=_values(), k_values=np.array([16, 32]),
                  block_m=np.int64(BLOCK_M), block_n=np.int64(BLOCK_N), causal=np.bool_(True),
                  provenance=np.str_(json.dumps(PROV)))
    arrays.update(fields)
    path = tmp_path / name
    with open(path, "wb") as f:
        np.savez(f, **arrays)
    return path


def _load_error(path):
    with pytest.raises(ValueError) as info:
        Thresholds.load(path)
    msg = str(info.value)
    assert msg.startswith(f"{path}: "), msg
    return msg


def test_truncated_file_is_a_value_error(tmp_path):
    good = _saved(tmp_path).read_bytes()
    path = tmp_path / "cut.npz"
    # every length through the central directory at the end, every 11th before it
    for n in sorted(set(range(0, len(good), 11)) | set(range(len(good) - 600, len(good)))):
        path.write_bytes(good[:n])
        _load_error(path)
    path.write_bytes(good[: len(good) // 2])
    assert "not a readable .npz file (truncated or corrupt)" in _load_error(path)


def test_zero_byte_file(tmp_path):
    path = tmp_path / "empty.npz"
    path.write_bytes(b"")
    assert "not a readable .npz file (truncated or corrupt)" in _load_error(path)


def test_corrupted_bytes_load_or_raise_value_error(tmp_path):
    good = _saved(tmp_path).read_bytes()
    path = tmp_path / "flipped.npz"
    rng = np.random.default_rng(0)
    for _ in range(400):
        bad = bytearray(good)
        bad[rng.integers(len(bad))] = rng.integers(256)
        path.write_bytes(bytes(bad))
        try:
            Thresholds.load(path)
        except ValueError as exc:
            assert str(exc).startswith(f"{path}: ")


def test_zip_members_that_are_not_npy(tmp_path):
    path = tmp_path / "zip.npz"
    with zipfile.ZipFile(path, "w") as z:
        for key in ("format_version", "thresholds", "k_values", "block_m", "block_n", "causal", "provenance"):
            z.writestr(f"{key}.npy", b"\x93NUMPY garbage")
    assert "field 'format_version' could not be read" in _load_error(path)
    with zipfile.ZipFile(path, "w") as z:  # members without .npy data come back as raw bytes
        for key in ("format_version", "thresholds", "k_values", "block_m", "block_n", "causal", "provenance"):
            z.writestr(key, b"text")
    assert "field 'format_version': expected a 0-d integer array, got bytes" in _load_error(path)


def test_missing_file_and_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.npz"):
        Thresholds.load(tmp_path / "missing.npz")
    assert "not a readable .npz file" in _load_error(tmp_path)


@pytest.mark.parametrize("field,value,expected", [
    ("causal", np.str_("False"), "field 'causal': expected a 0-d bool array, got dtype <U5"),
    ("causal", np.int64(0), "field 'causal': expected a 0-d bool array, got dtype int64"),
    ("causal", np.array([True]), r"field 'causal': expected a 0-d bool array, got dtype bool, shape \(1,\)"),
    ("block_m", np.float64(128.9), "field 'block_m': expected a 0-d integer array, got dtype float64"),
    ("block_n", np.float32(64), "field 'block_n': expected a 0-d integer array, got dtype float32"),
    ("block_n", np.bool_(True), "field 'block_n': expected a 0-d integer array, got dtype bool"),
    ("format_version", np.float64(1.0), "field 'format_version': expected a 0-d integer array"),
    ("format_version", np.int64(2), "expected format_version 1, got 2"),
    ("k_values", np.array([16.0, 32.0]), "field 'k_values': expected a 1-d integer array, got dtype float64"),
    ("k_values", np.array([True, False]), "field 'k_values': expected a 1-d integer array, got dtype bool"),
    ("k_values", np.array([16, 16]), "k_values: expected no duplicates"),
    ("thresholds", _values().astype(np.complex64), "field 'thresholds': expected a 4-d float array, got dtype complex64"),
    ("thresholds", np.zeros((2, 3, 4, 5), np.int32), "field 'thresholds': expected a 4-d float array, got dtype int32"),
    ("thresholds", _values()[0], r"field 'thresholds': expected a 4-d float array, got dtype float32, shape \(3, 4, 5\)"),
    ("thresholds", np.where(_values() > 1, np.nan, _values()), "NaN values; use -inf"),
    ("provenance", np.str_("[1, 2]"), "provenance: expected a dict"),
    ("provenance", np.str_("{"), "provenance is not JSON text"),
    ("provenance", np.int64(3), "field 'provenance': expected a 0-d str array"),
])
def test_mistyped_fields(tmp_path, field, value, expected):
    path = _saved(tmp_path, **{field: value})
    msg = _load_error(path)
    assert re.search(expected, msg), msg


def test_object_array_field(tmp_path):
    path = _saved(tmp_path, thresholds=np.array([None, 1.0], dtype=object))  # np.savez pickles it
    assert "field 'thresholds' could not be read" in _load_error(path)


def test_constructor_types_are_strict():
    with pytest.raises(TypeError, match="causal: expected a bool, got str 'False'"):
        Thresholds(_values(), [16, 32], causal="False")
    with pytest.raises(TypeError, match="causal: expected a bool, got int"):
        Thresholds(_values(), [16, 32], causal=1)
    assert Thresholds(_values(), [16, 32], causal=np.bool_(False)).causal is False
    for bad in (_values().astype(np.complex128), np.zeros((2, 3, 4, 5), np.int64), _values().astype(object),
                [[[[1 + 0j]]]]):
        with pytest.raises(TypeError, match="values: expected a float array"):
            Thresholds(bad, [16, 32] if np.ndim(bad) == 4 and np.shape(bad)[0] == 2 else [1])
    with pytest.raises(TypeError, match="block_m: expected a positive int, got float 128.9"):
        Thresholds(_values(), [16, 32], block_m=128.9)
    with pytest.raises(TypeError, match="k_values: expected ints, got float"):
        Thresholds(_values(), [16.0, 32.0])


@pytest.mark.parametrize("key,value,expected", [
    ("q_block_size", 128.9, "'q_block_size': expected an int, got float 128.9"),
    ("k_block_size", np.float64(64.0), "'k_block_size': expected an int, got float"),
    ("num_layers", 3.0, "'num_layers': expected an int, got float 3.0"),
    ("num_heads", True, "'num_heads': expected an int, got bool"),
    ("max_num_blocks", np.array(5.5), "'max_num_blocks': expected an int, got float 5.5"),
    ("k_values", [16.0, 32.0], "'k_values': expected an int, got float 16.0"),
    ("k_values", 16, "'k_values': expected a list of ints, got int"),
    ("thresholds", _values().astype(np.complex64), "'thresholds': expected a real float array, got dtype complex64"),
    ("thresholds", np.zeros((2, 3, 4, 5), np.int32), "'thresholds': expected a real float array, got dtype int32"),
])
def test_official_dict_fields_are_strict(key, value, expected):
    """The published format read without torch: no truncation of 128.9 to 128, no complex
    thresholds cast to float32 with only a warning."""
    data = dict(thresholds=_values(), k_values=[16, 32], max_num_blocks=5, num_layers=3, num_heads=4,
                q_block_size=128, k_block_size=64)
    assert Thresholds.from_official(dict(data), name="thr.pt").values.shape == (2, 3, 4, 5)
    data[key] = value
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a ComplexWarning would be the old silent cast
        with pytest.raises(ValueError) as info:
            Thresholds.from_official(data, name="thr.pt")
    assert str(info.value).startswith("thr.pt: ") and expected in str(info.value), str(info.value)


def test_official_file_damaged_or_mistyped(tmp_path):
    torch = pytest.importorskip("torch")
    path = tmp_path / "thr.pt"
    torch.save(_official(torch, q_block_size=128.9), path)
    with pytest.raises(ValueError, match=rf"^{re.escape(str(path))}: 'q_block_size': expected an int"):
        Thresholds.load_official(path)
    good = path.read_bytes()
    path.write_bytes(good[: len(good) // 2])
    with pytest.raises(ValueError, match=rf"^{re.escape(str(path))}: torch.load"):
        Thresholds.load_official(path)


def test_for_decode_takes_each_tiles_last_row_of_a_row_calibration():
    T = 300  # row positions 0..299: 128-row positions 0, 1, 2 take rows 127, 255 and 299 (the last)
    vals = np.arange(2 * 3 * 4 * T, dtype=np.float32).reshape(2, 3, 4, T)
    vals[0, 1, 2, 255] = -np.inf  # keep-all stays keep-all
    rows = Thresholds(vals, [4, 8], block_m=1, block_n=64, provenance={"source": "test"})
    dec = rows.for_decode()
    assert (dec.block_m, dec.block_n, dec.k_values, dec.num_positions) == (128, 64, (4, 8), 3)
    np.testing.assert_array_equal(dec.values, vals[..., [127, 255, 299]])
    assert dec.values[0, 1, 2, 1] == -np.inf
    assert dec.provenance["source"] == "test" and "for_decode" in dec.provenance
    np.testing.assert_array_equal(Thresholds(vals[..., :100], [4, 8], block_m=1).for_decode().values,
                                  vals[..., [99]])  # fewer rows than one tile: the last one


def test_for_decode_refuses_tile_calibrated_thresholds():
    with pytest.raises(ValueError, match="expected row-calibrated thresholds \\(block_m=1\\), got block_m=128"):
        Thresholds(np.zeros((1, 1, 2, 4)), [8]).for_decode()
