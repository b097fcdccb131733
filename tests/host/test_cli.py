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
    assert "no such folder" in error(str(tmp_path / "one.npz"), "--device", "cpu", "--out", str(tmp_path / "no" / "t.npz"))


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


# ---------------------------------------------------------------------------------------------
# hostile inputs: one line on stderr naming the file or option, exit code 2, before any work
# ---------------------------------------------------------------------------------------------


@pytest.fixture
def no_work(monkeypatch):
    """Makes any calibration, demo or accuracy computation fail loudly: validation must come first."""
    from bsfa_cupy.tools import accuracy, demo, dumps

    def started(*args, **kwargs):
        raise AssertionError("work started before the arguments were validated")

    monkeypatch.setattr(dumps.HostCalibrator, "update", started)
    monkeypatch.setattr(demo, "make_sample", started)
    monkeypatch.setattr(accuracy, "make_sample", started)
    monkeypatch.setattr(accuracy, "run", started)


def _qk_entries(N=256, layers=1, fmt="{}_{}"):
    rng = np.random.default_rng(3)
    out = {}
    for layer in range(layers):
        out[fmt.format("q", layer)] = rng.standard_normal((1, N, HQ, D)).astype(np.float32)
        out[fmt.format("k", layer)] = rng.standard_normal((1, N, HKV, D)).astype(np.float32)
    return out


def _error(capsys, command, *args):
    return _assert_one_line_error(*_cli(capsys, command, *args)[::2], command)


def test_zero_padded_layer_names_are_read(tmp_path, capsys):
    np.savez(tmp_path / "plain.npz", **_qk_entries(layers=2))
    np.savez(tmp_path / "padded.npz", **_qk_entries(layers=2, fmt="{}_{:02d}"))
    outs = []
    for name in ("plain", "padded"):
        out = tmp_path / f"{name}-thr.npz"
        code, _, err = _cli(capsys, "calibrate", str(tmp_path / f"{name}.npz"), "--k", "1", "--device", "cpu",
                            "--out", str(out), "--quiet")
        assert code == 0, err
        outs.append(Thresholds.load(out).values)
    np.testing.assert_array_equal(outs[0], outs[1])

    np.savez(tmp_path / "both.npz", **_qk_entries(), q_00=_qk_entries()["q_0"])
    line = _error(capsys, "calibrate", str(tmp_path / "both.npz"), "--device", "cpu", "--quiet",
                  "--out", str(tmp_path / "t.npz"))
    assert str(tmp_path / "both.npz") in line and "q_0" in line and "q_00" in line


def test_broken_dump_files_are_one_line_errors_naming_the_file(tmp_path, capsys, no_work):
    import zipfile

    def error(path, *more):
        line = _error(capsys, "calibrate", str(path), "--device", "cpu", "--quiet",
                      "--out", str(tmp_path / "t.npz"), *more)
        assert str(path) in line, line
        return line

    raw = tmp_path / "raw.npz"
    with zipfile.ZipFile(raw, "w") as z:
        z.writestr("q_0", b"not an array")
        z.writestr("k_0.npy", b"junk")
    assert "q_0" in error(raw)

    good = tmp_path / "good.npz"
    np.savez(good, **_qk_entries())
    data = good.read_bytes()
    truncated = tmp_path / "truncated.npz"
    truncated.write_bytes(data[: len(data) // 2])
    assert "not a readable .npz file" in error(truncated)

    flipped = tmp_path / "flipped.npz"  # a bit flipped in an array: the zip's CRC check fails
    i = data.index(b"k_0.npy") + 400
    flipped.write_bytes(data[:i] + bytes([data[i] ^ 0xFF]) + data[i + 1 :])
    error(flipped)

    cut_npy = tmp_path / "cut"
    cut_npy.mkdir()
    for name, x in _qk_entries().items():
        np.save(cut_npy / f"{name}.npy", x)
    blob = (cut_npy / "k_0.npy").read_bytes()
    (cut_npy / "k_0.npy").write_bytes(blob[: len(blob) - 100])
    line = error(cut_npy)
    assert "k_0" in line

    objects = tmp_path / "objects.npz"
    np.savez(objects, q_0=np.array([{"a": 1}], dtype=object), k_0=_qk_entries()["k_0"])
    error(objects)


def test_dump_errors_come_before_any_work(tmp_path, capsys, no_work):
    """A later dump with the wrong heads or a truncated array is found before the first is calibrated."""
    np.savez(tmp_path / "a.npz", **_qk_entries())
    bad = _qk_entries()
    bad["q_0"] = bad["q_0"][:, :, :2]
    np.savez(tmp_path / "b.npz", **bad)
    line = _error(capsys, "calibrate", str(tmp_path), "--device", "cpu", "--quiet", "--out", str(tmp_path / "t.npz"))
    assert "b.npz" in line and "expected 4 query heads" in line


def test_non_finite_dump_values_are_refused(tmp_path, capsys):
    entries = _qk_entries()
    entries["k_0"][0, 100, 1, 3] = np.nan
    np.savez(tmp_path / "nan.npz", **entries)
    line = _error(capsys, "calibrate", str(tmp_path / "nan.npz"), "--device", "cpu", "--quiet",
                  "--out", str(tmp_path / "t.npz"))
    assert "nan.npz" in line and "k_0" in line and "finite" in line


@pytest.mark.parametrize("k", ["99999999999999999999999", "2147483648"])
def test_calibrate_refuses_an_absurd_k_before_any_work(tmp_path, capsys, no_work, k):
    np.savez(tmp_path / "one.npz", **_qk_entries())
    line = _error(capsys, "calibrate", str(tmp_path / "one.npz"), "--k", k, "--device", "cpu", "--quiet",
                  "--out", str(tmp_path / "t.npz"))
    assert "--k" in line


def test_repeated_k_is_refused_before_any_work(tmp_path, capsys, no_work):
    np.savez(tmp_path / "one.npz", **_qk_entries())
    line = _error(capsys, "calibrate", str(tmp_path / "one.npz"), "--k", "16", "32", "16", "--device", "cpu",
                  "--quiet", "--out", str(tmp_path / "t.npz"))
    assert "--k" in line and "16" in line
    assert "--k" in _error(capsys, "accuracy", "--device", "cpu", "--k", "8", "8", "--quiet", "--out", str(tmp_path))


@pytest.mark.parametrize("scale", ["0", "-1", "-0.0", "nan", "inf", "-inf", "abc"])
def test_calibrate_refuses_a_non_positive_or_non_finite_softmax_scale(tmp_path, capsys, no_work, scale):
    np.savez(tmp_path / "one.npz", **_qk_entries())
    line = _error(capsys, "calibrate", str(tmp_path / "one.npz"), f"--softmax-scale={scale}", "--device", "cpu",
                  "--quiet", "--out", str(tmp_path / "t.npz"))
    assert "--softmax-scale" in line


def test_calibrate_never_overwrites_its_inputs(tmp_path, capsys, no_work):
    folder = tmp_path / "dumps"
    folder.mkdir()
    np.savez(folder / "a.npz", **_qk_entries())
    npy = folder / "b"
    npy.mkdir()
    for name, x in _qk_entries().items():
        np.save(npy / f"{name}.npy", x)
    before = {p: p.read_bytes() for p in (folder / "a.npz", npy / "q_0.npy")}
    for target in (folder / "a.npz", npy / "q_0.npy", folder / "." / "a.npz", npy / ".." / "a.npz"):
        line = _error(capsys, "calibrate", str(folder), "--device", "cpu", "--quiet", "--out", str(target))
        assert "--out" in line and "input" in line, line
    os.link(folder / "a.npz", tmp_path / "hardlink.npz")
    (tmp_path / "symlink.npz").symlink_to(folder / "a.npz")
    for alias in ("hardlink.npz", "symlink.npz"):
        line = _error(capsys, "calibrate", str(folder), "--device", "cpu", "--quiet", "--out", str(tmp_path / alias))
        assert "input" in line
    assert {p: p.read_bytes() for p in before} == before


def test_calibrate_checks_its_output_path_before_any_work(tmp_path, capsys, no_work):
    np.savez(tmp_path / "one.npz", **_qk_entries())

    def error(out):
        return _error(capsys, "calibrate", str(tmp_path / "one.npz"), "--device", "cpu", "--quiet", "--out", str(out))

    missing = tmp_path / "no" / "t.npz"
    line = error(missing)
    assert "--out" in line and str(missing.parent) in line and "no such folder" in line
    line = error(tmp_path)
    assert "--out" in line and "folder" in line
    (tmp_path / "file").write_text("")
    assert "--out" in error(tmp_path / "file" / "t.npz")


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write anywhere")
def test_calibrate_refuses_an_unwritable_output_folder(tmp_path, capsys, no_work):
    np.savez(tmp_path / "one.npz", **_qk_entries())
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        line = _error(capsys, "calibrate", str(tmp_path / "one.npz"), "--device", "cpu", "--quiet",
                      "--out", str(locked / "t.npz"))
    finally:
        locked.chmod(0o700)
    assert "writable" in line


def test_demo_refuses_sizes_it_cannot_run(capsys, no_work):
    line = _error(capsys, "demo", "--device", "cpu", "--n", "1", "--quiet")
    assert "--n" in line


def test_demo_refuses_an_n_the_cpu_reference_cannot_hold(capsys, monkeypatch, no_work):
    from bsfa_cupy.tools import sizes

    monkeypatch.setattr(sizes, "available_memory", lambda: 16 * 2**30)
    line = _error(capsys, "demo", "--device", "cpu", "--n", "100000", "--quiet")
    assert "--n" in line and "100000" in line and "GiB" in line and "GPU" in line
    line = _error(capsys, "accuracy", "--device", "cpu", "--n", "1024", "100000", "--quiet", "--out", "x")
    assert "--n" in line and "100000" in line and "GPU" in line


def test_demo_refuses_n_beyond_any_machine_in_a_real_process():
    proc = _run("demo", "--device", "cpu", "--n", "1000000", "--quiet")
    _assert_one_line_error(proc.returncode, proc.stderr, "demo")
    assert "1000000" in proc.stderr


def test_cpu_reference_memory_estimate_covers_the_measured_peak():
    import tracemalloc

    from bsfa_cupy.tools import demo, sizes

    n = 512
    tracemalloc.start()
    try:
        demo.run(False, n=n, progress=False, echo=lambda *a: None)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    estimate = sizes.host_reference_bytes(n, demo.CPU_CONFIG.hq, demo.CPU_CONFIG.d)
    assert peak <= estimate <= 2 * peak, (peak, estimate)


def test_demo_checks_its_plot_path_before_any_work(tmp_path, capsys, monkeypatch, no_work):
    from bsfa_cupy.tools import plots

    line = _error(capsys, "demo", "--device", "cpu", "--quiet", "--plot", str(tmp_path / "no" / "keep.png"))
    assert "--plot" in line and "no such folder" in line
    line = _error(capsys, "demo", "--device", "cpu", "--quiet", "--plot", str(tmp_path))
    assert "--plot" in line

    def missing():
        raise ImportError("plots need matplotlib: pip install 'bsfa-cupy[plot]'")

    monkeypatch.setattr(plots, "_pyplot", missing)
    assert "matplotlib" in _error(capsys, "demo", "--device", "cpu", "--quiet", "--plot", str(tmp_path / "k.png"))


def test_bench_checks_its_arguments_before_looking_for_a_gpu(tmp_path, capsys):
    (tmp_path / "file").write_text("")
    assert "--out" in _error(capsys, "bench", "--out", str(tmp_path / "file"))
    assert "--out" in _error(capsys, "bench", "--out", str(tmp_path / "file" / "sub"))
    assert "--hkv" in _error(capsys, "bench", "--hkv", "3", "--out", str(tmp_path))
    assert "--hkv" in _error(capsys, "bench", "--hkv", "64", "--out", str(tmp_path))
    assert "--tag" in _error(capsys, "bench", "--tag", "a/b", "--out", str(tmp_path))
    assert "--n" in _error(capsys, "bench", "--n", "2", "--out", str(tmp_path))
    assert "--peers" in _error(capsys, "bench", "--peers-only", "--peers", "--out", str(tmp_path))
    assert "--repeats" in _error(capsys, "bench", "--repeats", "0", "--out", str(tmp_path))
    assert "--warmup" in _error(capsys, "bench", "--warmup", "-1", "--out", str(tmp_path))
    assert "--warmup-ms" in _error(capsys, "bench", "--warmup-ms", "-5", "--out", str(tmp_path))
    assert "--warmup-ms" in _error(capsys, "bench", "--warmup-ms", "nan", "--out", str(tmp_path))


def test_accuracy_checks_its_arguments_before_any_work(tmp_path, capsys, no_work):
    (tmp_path / "file").write_text("")
    assert "--out" in _error(capsys, "accuracy", "--device", "cpu", "--out", str(tmp_path / "file"))
    assert "--tag" in _error(capsys, "accuracy", "--device", "cpu", "--tag", "../up", "--out", str(tmp_path))
    assert "--n" in _error(capsys, "accuracy", "--device", "cpu", "--n", "3", "--out", str(tmp_path))
    assert "--calib-samples" in _error(capsys, "accuracy", "--device", "cpu", "--calib-samples", "-1")


def test_output_folders_default_to_the_current_directory(capsys):
    from bsfa_cupy.tools.cli import build_parser

    parser = build_parser()
    for command in ("bench", "accuracy"):
        assert parser.parse_args([command]).out == "."
        code, out, _ = _cli(capsys, command, "--help")
        assert code == 0 and "current directory" in " ".join(out.split()), out


def test_user_errors_are_one_line_even_when_the_message_is_not(monkeypatch, capsys):
    from bsfa_cupy.tools import demo

    def fail(*args, **kwargs):
        raise ValueError("first line\nsecond line")

    monkeypatch.setattr(demo, "run", fail)
    line = _error(capsys, "demo", "--device", "cpu", "--quiet")
    assert "first line" in line and "second line" in line


def test_running_out_of_memory_is_a_one_line_error(monkeypatch, capsys):
    from bsfa_cupy.tools import demo

    def fail(*args, **kwargs):
        raise MemoryError("Unable to allocate 298. GiB for an array")

    monkeypatch.setattr(demo, "run", fail)
    line = _error(capsys, "demo", "--device", "cpu", "--quiet")
    assert "298" in line and "--n" in line


@pytest.mark.parametrize("exc", [KeyError("x"), AttributeError("x"), IndexError("x"), RuntimeError("x")])
def test_genuine_bugs_keep_their_traceback(monkeypatch, exc):
    from bsfa_cupy.tools import demo

    def fail(*args, **kwargs):
        raise exc

    monkeypatch.setattr(demo, "run", fail)
    with pytest.raises(type(exc)):
        main(["demo", "--device", "cpu", "--quiet"])


def test_hostile_files_in_a_real_process_have_no_traceback(tmp_path):
    good = tmp_path / "good.npz"
    np.savez(good, **_qk_entries())
    data = good.read_bytes()
    (tmp_path / "truncated.npz").write_bytes(data[: len(data) // 2])
    proc = _run("calibrate", str(tmp_path / "truncated.npz"), "--device", "cpu", "--quiet",
                "--out", str(tmp_path / "t.npz"))
    line = _assert_one_line_error(proc.returncode, proc.stderr, "calibrate")
    assert "truncated.npz" in line
    proc = _run("demo", "--n", "1", "--device", "cpu", "--quiet")
    _assert_one_line_error(proc.returncode, proc.stderr, "demo")


def test_demo_on_the_gpu_checks_its_host_memory_before_any_work(monkeypatch, no_work):
    """The GPU demo builds its samples on the host: a length beyond the host's memory is refused up front
    (checked without a GPU: the sizing comes before the engine)."""
    from bsfa_cupy.tools import demo, sizes

    monkeypatch.setattr(sizes, "available_memory", lambda: 16 * 2**30)
    with pytest.raises(ValueError, match=r"--n 100000000: the demo needs about .* GiB of host memory.*at most \d+"):
        demo.check(True, n=100_000_000)
    assert demo.check(True).n == demo.GPU_CONFIG.n
