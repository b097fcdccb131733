"""The ``bsfa`` command line: demo end to end, calibrate from dumps, one-line errors with exit code 2."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest

import bsfa_reference as ref
from bsfa_cupy import Thresholds
from bsfa_cupy.tools.cli import main

ROOT = Path(__file__).resolve().parents[2]
LAYERS, HQ, HKV, D = 2, 4, 2, 16


def _run(*args):
    """`python -m bsfa_cupy ARGS` from the checkout, as a user would run it."""
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run([sys.executable, "-m", "bsfa_cupy", *args], capture_output=True, text=True, cwd=ROOT,
                          env=env, timeout=120)


def _cli(capsys, *args):
    """main() in-process: (exit code, stdout, stderr); argparse errors exit through SystemExit."""
    try:
        code = main(list(args))
    except SystemExit as exc:
        code = exc.code
    out, err = capsys.readouterr()
    return code, out, err


def _assert_one_line_error(code, err, command):
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"bsfa {command}: error: "), err
    assert "Traceback" not in err
    return lines[0]


def test_demo_runs_end_to_end_on_the_cpu():
    proc = _run("demo", "--device", "cpu", "--n", "512", "--quiet")
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    for promised in ("N=512", "kept-tile density", "P.V work skipped", "output error vs dense", "needles retrieved"):
        assert promised in out, f"{promised!r} missing from:\n{out}"
    assert "Traceback" not in proc.stderr


# ---------------------------------------------------------------------------------------------
# calibrate
# ---------------------------------------------------------------------------------------------


def _layer_qk(rng, B, N):
    return [(rng.standard_normal((B, N, HQ, D)), rng.standard_normal((B, N, HKV, D))) for _ in range(LAYERS)]


@pytest.fixture
def dumps(tmp_path):
    """Three dumps in the three documented forms; returns (folder, per-dump [(q, k) per layer] as read)."""
    rng = np.random.default_rng(0)
    folder = tmp_path / "dumps"
    folder.mkdir()
    expected = []
    # 1: float32 .npz, (B, N, H, D)
    a = [(q.astype(np.float32), k.astype(np.float32)) for q, k in _layer_qk(rng, 1, 384)]
    np.savez(folder / "a.npz", **{f"{n}_{i}": x for i, qk in enumerate(a) for n, x in zip("qk", qk)},
             input_ids=np.arange(3))  # other entries are ignored
    expected.append(a)
    # 2: bfloat16 bits as uint16 with dtype = "bfloat16", a batch of two samples
    b = [(q.astype(ml_dtypes.bfloat16), k.astype(ml_dtypes.bfloat16)) for q, k in _layer_qk(rng, 2, 256)]
    np.savez(folder / "b.npz", dtype="bfloat16",
             **{f"{n}_{i}": x.view(np.uint16) for i, qk in enumerate(b) for n, x in zip("qk", qk)})
    expected.append(b)
    # 3: a folder of float16 .npy files, (N, H, D) without the batch axis
    c = [(q.astype(np.float16)[0], k.astype(np.float16)[0]) for q, k in _layer_qk(rng, 1, 300)]
    (folder / "c").mkdir()
    for i, (q, k) in enumerate(c):
        np.save(folder / "c" / f"q_{i}.npy", q)
        np.save(folder / "c" / f"k_{i}.npy", k)
    expected.append([(q[None], k[None]) for q, k in c])
    return folder, expected


def test_calibrate_from_dumps_matches_the_reference(dumps, tmp_path, capsys):
    folder, expected = dumps
    out = tmp_path / "thr.npz"
    code, stdout, err = _cli(capsys, "calibrate", str(folder), "--k", "1", "2", "4", "--out", str(out),
                             "--device", "cpu", "--reduce", "median", "--model", "toy-2L", "--quiet")
    assert code == 0, err
    thr = Thresholds.load(out)
    cals = [ref.Calibrator([1, 2, 4], reduce="median") for _ in range(LAYERS)]
    for dump in expected:
        for cal, (q, k) in zip(cals, dump):
            cal.update(q, k)
    want = Thresholds.from_calibrators(cals)
    assert thr.values.shape == (3, LAYERS, HQ, 3)
    np.testing.assert_allclose(thr.values, want.values, rtol=1e-9)
    np.testing.assert_array_equal(np.isinf(thr.values), np.isinf(want.values))
    assert thr.k_values == (1, 2, 4) and thr.causal
    assert thr.provenance["model"] == "toy-2L" and thr.provenance["samples"] == "4"
    assert thr.provenance["reduce"] == "median" and "a.npz" in thr.provenance["dumps"]
    summary = stdout.strip().splitlines()[-1]
    for part in (str(out), "2 layers", "4 heads", "T=3", "k = 1 2 4", "4 samples from 3 dumps"):
        assert part in summary, summary


def test_calibrate_errors_are_one_line(tmp_path, capsys):
    def error(*args):
        return _assert_one_line_error(*_cli(capsys, "calibrate", *args, "--quiet")[::2], "calibrate")

    assert "--reduce" in error(str(tmp_path), "--reduce", "max")
    assert "--k" in error(str(tmp_path), "--k", "0")
    assert "no such file" in error(str(tmp_path / "missing.npz"), "--device", "cpu")

    junk = tmp_path / "junk.npz"
    junk.write_bytes(b"not a zip")
    assert "not a readable .npz file" in error(str(junk), "--device", "cpu")

    rng = np.random.default_rng(1)
    q, k = rng.standard_normal((1, 128, HQ, D)), rng.standard_normal((1, 128, HKV, D))
    np.savez(tmp_path / "gap.npz", q_0=q, k_0=k, q_1=q)
    assert "layers [1] with only one of them" in error(str(tmp_path / "gap.npz"), "--device", "cpu")

    np.savez(tmp_path / "heads.npz", q_0=q, k_0=k, q_1=q[:, :, :2], k_1=k)
    assert "expected 4 query heads as layer 0, got 2" in error(str(tmp_path / "heads.npz"), "--device", "cpu")

    np.savez(tmp_path / "bits.npz", q_0=q.astype(np.float16).view(np.uint16), k_0=k.astype(np.float16).view(np.uint16))
    assert "dtype = 'bfloat16'" in error(str(tmp_path / "bits.npz"), "--device", "cpu")

    np.savez(tmp_path / "k.npz", q_0=q, k_0=k[:, :, :, :8])
    assert "head_dim" in error(str(tmp_path / "k.npz"), "--device", "cpu")

    np.savez(tmp_path / "one.npz", q_0=q, k_0=k)
    assert "No such file" in error(str(tmp_path / "one.npz"), "--device", "cpu", "--out", str(tmp_path / "no" / "t.npz"))


def test_device_gpu_without_a_gpu_is_a_one_line_error(tmp_path, capsys):
    from bsfa_cupy import has_gpu

    if has_gpu():
        pytest.skip("a GPU is present")
    line = _assert_one_line_error(*_cli(capsys, "calibrate", str(tmp_path), "--device", "gpu")[::2], "calibrate")
    assert "no CUDA GPU" in line


def test_errors_from_a_real_process_have_no_traceback(tmp_path):
    junk = tmp_path / "junk.npz"
    junk.write_bytes(b"\x00" * 10)
    proc = _run("calibrate", str(junk), "--device", "cpu", "--quiet")
    _assert_one_line_error(proc.returncode, proc.stderr, "calibrate")
    proc = _run("demo", "--n", "abc")
    _assert_one_line_error(proc.returncode, proc.stderr, "demo")


def test_calibrate_help_documents_the_dump_format(capsys):
    code, out, _ = _cli(capsys, "calibrate", "--help")
    assert code == 0
    for part in ("q_L", "k_L", "(B, N, Hq, D)", "bfloat16", "uint16", ".npy", "--non-causal", "--reduce"):
        assert part in out, part
