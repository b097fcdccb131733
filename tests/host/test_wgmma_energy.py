"""bench/wgmma_energy.py's parsing and arithmetic on the host (the measurement itself needs a GPU)."""
import importlib.util
from pathlib import Path

import numpy as np
import pytest


def _load():
    path = Path(__file__).resolve().parents[2] / "bench" / "wgmma_energy.py"
    spec = importlib.util.spec_from_file_location("wgmma_energy", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_parse_sustain_reads_every_launch_and_the_multiply_adds():
    ms, macs = _load().parse_sustain("launch 1.5\nlaunch 2.5\nnoise\nmacs 8.6e11\n")
    assert ms.tolist() == [1.5, 2.5], f"launch times: expected [1.5, 2.5], got {ms.tolist()}"
    assert macs == 8.6e11, f"multiply-adds: expected 8.6e11, got {macs}"


def test_parse_sustain_refuses_output_without_launches():
    with pytest.raises(ValueError, match="expected 'launch MS' lines"):
        _load().parse_sustain("sustain: expected MODE 0, 1, 2, 5, 7 or 9, got 4\n")


def test_energy_row_is_power_over_the_multiply_add_rate_in_the_window():
    samples = np.array([[0.0, 1000.0, 100.0], [10.0, 1700.0, 690.0], [11.0, 1500.0, 650.0], [30.0, 900.0, 90.0]])
    row = _load().energy_row(np.array([9.0, 9.0, 2.0, 2.0]), 1e12, samples, (10.0, 11.0))
    assert row["ms"] == 2.0, f"median of the second half: expected 2.0 ms, got {row['ms']}"
    assert row["w"] == 670.0 and row["mhz"] == 1600.0, f"window means: got {row['w']} W {row['mhz']} MHz"
    assert row["pj_per_mac"] == pytest.approx(670.0 / 5e14 * 1e12), f"pJ a multiply-add: got {row['pj_per_mac']}"
    with pytest.raises(ValueError, match="no power sample"):
        _load().energy_row(np.array([1.0]), 1e12, samples, (40.0, 50.0))
