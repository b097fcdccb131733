"""The host-side analysis of bench/transient.py (a call's slowdown after a hotter one) and bench/sustained.py
(clocks and power under sustained calls), on made-up call times and nvidia-smi output."""
from __future__ import annotations

import math
import os
import time

import numpy as np
import pytest

from tests.support.bench_scripts import load_bench_script


def test_recovery_finds_the_slow_spans_and_when_they_end():
    transient = load_bench_script("transient")
    calls = [2.2] * 15 + [2.0] * 100  # 10 % slow for the first 33 ms, steady at 2.0 after
    spans, back = transient.recovery(calls, steady_ms=2.0)
    assert spans[0] == pytest.approx(1.1) and spans[1] == pytest.approx(1.1), spans
    # (20, 40]: six slow calls (ending 22.0 .. 33.0) and three steady ones
    assert spans[2] == pytest.approx((6 * 2.2 + 3 * 2.0) / 9 / 2.0), spans
    assert spans[3] == pytest.approx(1.0) and spans[4] == pytest.approx(1.0), spans
    # the window (30, 40] still averages 2.5 % slow, (40, 50] is steady
    assert back == 40.0, f"expected the last slow window to end at 40 ms, got {back}"


def test_recovery_of_a_steady_follower_is_immediate_and_short_runs_leave_spans_empty():
    transient = load_bench_script("transient")
    spans, back = transient.recovery([3.0] * 100, steady_ms=3.0)
    assert back == 0.0 and all(v == pytest.approx(1.0) for v in spans), (spans, back)
    spans, back = transient.recovery([3.0] * 5, steady_ms=3.0)  # 15 ms of calls: the later spans have none
    assert math.isnan(spans[-1]) and back == 0.0, (spans, back)


def test_parse_smi_keeps_the_samples_it_can_read():
    sustained = load_bench_script("sustained")
    text = ("2026/11/30 09:42:15.120, 1650, 690.12\n"
            "2026/11/30 09:42:15.140, [N/A], 689.00\n"
            "2026/11/30 09:42:15.160, 1455, 681.50\n"
            "2026/11/30 09:42:15.1")  # cut off when nvidia-smi was stopped
    got = sustained.parse_smi(text)
    assert got.shape == (2, 3), got
    assert got[1, 0] - got[0, 0] == pytest.approx(0.04, abs=1e-5) and list(got[:, 1]) == [1650.0, 1455.0], got
    assert sustained.parse_smi("").shape == (0, 3)


def test_settled_summarises_the_start_and_the_second_half():
    sustained = load_bench_script("sustained")
    calls = [1.0] * 10 + [1.2] * 90
    samples = np.array([[0.0, 1980.0, 400.0], [5.0, 1600.0, 690.0], [6.0, 1500.0, 700.0]])
    row = sustained.settled(calls, samples, late_from=4.0, late_to=10.0)
    assert row["calls"] == 100 and row["first_10ms"] == 1.0 and row["late_ms"] == 1.2, row
    assert row["sm_mhz"] == 1550.0 and row["power_w"] == 695.0, row
    assert sustained.settled(calls, samples, late_from=20.0, late_to=30.0)["sm_mhz"] is None


@pytest.mark.parametrize("name", ["transient", "sustained"])
def test_the_scripts_parse_their_options_without_a_gpu(name):
    mod = load_bench_script(name)
    args = mod.parse_args(["--tag", "t", "--out", "o"])
    assert args.tag == "t" and args.out == "o"


def test_smi_sampler_keeps_more_samples_than_a_pipe_holds(tmp_path, monkeypatch):
    # A stand-in nvidia-smi that prints 200 KB of samples at once and then keeps running, as the real one does
    # under -lms: with its output on a pipe it would block once the pipe's buffer filled, and the samples after
    # the first minute of an A/B would be lost.
    fake = tmp_path / "nvidia-smi"
    fake.write_text("#!/bin/sh\n"
                    "i=0; while [ $i -lt 5000 ]; do echo \"2026/11/30 09:42:15.120, 1650, 690.12\"; i=$((i+1)); done\n"
                    "exec sleep 30\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}:{os.environ['PATH']}")
    sustained = load_bench_script("sustained")
    smi = sustained.SmiSampler("0")
    deadline = time.time() + 20
    while smi._log.tell() < 5000 * 38 and time.time() < deadline:
        time.sleep(0.05)
    got = smi.stop()
    assert got.shape == (5000, 3), f"expected 5000 samples back, got {got.shape[0]}"
    assert np.all(got[:, 1] == 1650) and np.all(got[:, 2] == pytest.approx(690.12)), got[:3]
