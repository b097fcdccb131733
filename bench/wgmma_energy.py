"""Joules per multiply-add of the skip path's S product shapes, at the card's power limit.

Usage: python bench/wgmma_energy.py [--binary ./wgmma_rate] [--modes 0 1 2 7] [--wgs 2] [--seconds 3]

Builds on bench/wgmma_rate.cu (build it first: the command is in its header): for each mode, the GPU idles 1 s,
then `wgmma_rate sustain MODE WGS SECONDS` launches that mode's kernel back to back (132 CTAs, operands already in
shared memory, no TMA) while `nvidia-smi` samples the SM clock and the power draw every 20 ms. Over the second half
of each run: the median launch time, the dense-equivalent TFLOP/s, the mean clock and power, and picojoules per
multiply-add (power over the multiply-add rate). At the power limit a call's time is its energy over the limit
(bench/NOTES.md v38), so a shape's picojoules say what it would cost the skip path there. Modes: 0 today's S (two
m64n64 chains, Q and K from shared memory), 1 S^T (one m64n128 chain, K Q^T), 2 Q in registers (two m64n64 chains,
K from shared memory), 7 four m64n32 chains; 5 and 9 are 0 and 1 each followed by a skipped block's gate (the max of the
64 accumulators and a vote of the warpgroup).
"""
import argparse
import os
import subprocess
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from sustained import SmiSampler  # noqa: E402

NAMES = {0: "ss m64n64 x2 (today's S)", 1: "ss m64n128 transposed (S^T)", 2: "rs m64n64 x2 (Q in registers)",
         5: "today's S + the gate", 7: "ss m64n32 x4", 9: "S^T + the gate"}


def parse_sustain(text):
    """(launch times in ms, multiply-adds a launch) from `wgmma_rate sustain`'s output."""
    launches, macs = [], None
    for line in text.splitlines():
        word, _, value = line.partition(" ")
        if word == "launch":
            launches.append(float(value))
        elif word == "macs":
            macs = float(value)
    if not launches or macs is None:
        raise ValueError(f"expected 'launch MS' lines and a 'macs N' line from wgmma_rate sustain, got: {text[-300:]!r}")
    return np.array(launches), macs


def energy_row(launch_ms, macs, samples, window):
    """Median launch ms over the run's second half, TFLOP/s, mean MHz and W of the samples in window, pJ a
    multiply-add."""
    ms = float(np.median(launch_ms[len(launch_ms) // 2:]))
    sel = (samples[:, 0] >= window[0]) & (samples[:, 0] <= window[1]) if len(samples) else np.zeros(0, bool)
    if not sel.any():
        raise ValueError(f"no power sample in the window {window}")
    mhz, watts = float(samples[sel, 1].mean()), float(samples[sel, 2].mean())
    rate = macs / (ms * 1e-3)
    return dict(ms=ms, tflops=2 * rate / 1e12, mhz=mhz, w=watts, pj_per_mac=watts / rate * 1e12)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--binary", default="./wgmma_rate")
    p.add_argument("--modes", type=int, nargs="+", default=[0, 1, 2, 7])
    p.add_argument("--wgs", type=int, default=2)
    p.add_argument("--seconds", type=float, default=3.0)
    args = p.parse_args(argv)
    rows = {}
    for mode in args.modes:
        time.sleep(1.0)
        smi = SmiSampler((os.environ.get("CUDA_VISIBLE_DEVICES") or "0").split(",")[0])
        start = time.time()
        run = subprocess.run([args.binary, "sustain", str(mode), str(args.wgs), str(args.seconds)],
                             capture_output=True, text=True)
        end = time.time()
        samples = smi.stop()
        if run.returncode != 0:
            raise SystemExit(f"wgmma_rate sustain {mode} failed ({run.returncode}): {run.stdout[-300:]} {run.stderr[-300:]}")
        launch_ms, macs = parse_sustain(run.stdout)
        rows[mode] = r = energy_row(launch_ms, macs, samples, (start + (end - start) / 2, end))
        print(f"mode {mode} {NAMES.get(mode, '?'):32s} wgs={args.wgs}: {r['ms']:.3f} ms a launch, {r['tflops']:.0f} TFLOP/s, "
              f"{r['mhz']:.0f} MHz, {r['w']:.0f} W, {r['pj_per_mac']:.3f} pJ a multiply-add", flush=True)
    if 0 in rows:
        for mode, r in rows.items():
            print(f"mode {mode}: pJ a multiply-add x mode 0's {r['pj_per_mac'] / rows[0]['pj_per_mac']:.3f}, "
                  f"time x mode 0's {r['ms'] / rows[0]['ms']:.3f}")


if __name__ == "__main__":
    main()
