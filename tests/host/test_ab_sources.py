"""bench/ab_sources.py's CPU side: `expand` writes exactly the text NVRTC is given for a tree, and the text of a
git revision; `time`'s argument parsing refuses a malformed build before any GPU work."""
from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from tests.support.bench_scripts import load_bench_script

ROOT = Path(__file__).resolve().parents[2]


def _load():
    return load_bench_script("ab_sources")


@pytest.mark.parametrize("source", ["bsfa_fwd_sm90ws.cu", "bsfa_fwd_sm80.cu"])
def test_expand_of_a_tree_is_the_runtime_source(tmp_path, source):
    from bsfa_cupy._source import kernel_source

    out = tmp_path / "k.cu"
    _load().main(["expand", str(ROOT), str(out), "--source", source])
    assert out.read_text() == kernel_source(source)


def test_expand_of_a_revision_folds_its_headers(tmp_path):
    if shutil.which("git") is None or subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"],
                                                     capture_output=True).returncode != 0:
        pytest.skip("not a git checkout")
    out = tmp_path / "k.cu"
    _load().main(["expand", "HEAD", str(out)])  # from any working directory: git runs in the checkout
    text = out.read_text()
    assert '#include "' not in text, "a local include was left unfolded"
    assert 'extern "C" __global__' in text and "bsfa_fwd" in text


def test_time_refuses_an_unknown_case_set():
    with pytest.raises(SystemExit):
        _load().main(["time", "a=x.cu", "--cases", "nosuch"])


@pytest.mark.parametrize("bad", ["-1", "nan"])
def test_time_refuses_a_warm_up_that_is_not_a_time(bad, capsys):
    with pytest.raises(SystemExit):
        _load().main(["time", "a=x.cu", "--warmup-ms", bad])
    assert "--warmup-ms: expected a time in ms >= 0" in capsys.readouterr().err


VARIANTS = sorted((ROOT / "bench" / "variants").glob("*.diff"))


@pytest.mark.parametrize("patch", VARIANTS, ids=[p.stem for p in VARIANTS])
def test_every_kept_variant_applies_to_the_tree_and_changes_the_source(tmp_path, patch):
    from bsfa_cupy._source import kernel_source

    out = tmp_path / "k.cu"
    _load().main(["expand", str(ROOT), str(out), "--patch", str(patch)])
    text = out.read_text()
    assert '#include "' not in text, "a local include was left unfolded"
    assert text != kernel_source("bsfa_fwd_sm90ws.cu"), f"{patch.name} changed nothing"


def test_expand_applies_a_patch_to_the_tree(tmp_path):
    import difflib

    name = "kernels_cu/bsfa_consumer_headpair_sm90ws.cuh"
    lines = (ROOT / name).read_text().splitlines(keepends=True)
    changed = ["// a variant\n", *lines]
    patch = tmp_path / "v.diff"
    patch.write_text("".join(difflib.unified_diff(lines, changed, "a/" + name, "b/" + name)))
    out = tmp_path / "k.cu"
    _load().main(["expand", str(ROOT), str(out), "--patch", str(patch)])
    assert "// a variant\n" in out.read_text()


def test_expand_refuses_a_patch_that_does_not_apply(tmp_path):
    bad = tmp_path / "bad.diff"
    bad.write_text("--- a/kernels_cu/nosuch.cuh\n+++ b/kernels_cu/nosuch.cuh\n@@ -1 +1 @@\n-x\n+y\n")
    with pytest.raises(SystemExit, match="does not apply"):
        _load().main(["expand", str(ROOT), str(tmp_path / "k.cu"), "--patch", str(bad)])


def test_clocks_by_label_averages_the_samples_inside_each_labels_spans():
    import numpy as np

    samples = np.array([[0.5, 1980.0, 300.0], [1.5, 1600.0, 690.0], [2.5, 1700.0, 680.0], [9.0, 1000.0, 100.0]])
    got = _load().clocks_by_label(samples, {"a:dense": [(1.0, 2.0), (2.0, 3.0)], "b:dense": [(0.0, 1.0)],
                                            "c:dense": [(4.0, 5.0)]})
    assert got["a:dense"] == (1650.0, 685.0), got
    assert got["b:dense"] == (1980.0, 300.0) and got["c:dense"] is None, got


def test_energy_per_call_is_power_times_time_and_cycles_clock_times_time():
    row = {"cudnn": 4.0, "base:rho0.5": 2.0, "n": 16384}
    clocks = {"cudnn": (1500.0, 600.0), "base:rho0.5": (1700.0, 690.0), "old:rho0.5": (1700.0, 690.0),
              "base:dense": None}
    got = _load().energy_per_call(row, clocks)
    assert set(got) == {"cudnn", "base:rho0.5"}, f"labels without a time or a clock must drop out, got {sorted(got)}"
    assert got["cudnn"] == (2400.0, 6.0), f"cudnn: expected (2400 mJ, 6.0 Mcyc), got {got['cudnn']}"
    assert got["base:rho0.5"] == (1380.0, 3.4), f"base:rho0.5: expected (1380 mJ, 3.4 Mcyc), got {got['base:rho0.5']}"
