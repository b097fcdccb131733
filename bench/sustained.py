"""Clocks and power under sustained calls: per-call time, SM clock and board power of each implementation run alone,
back to back, for a few seconds.

Usage: python bench/sustained.py [--shapes 16384x8 8192x32] [--seconds 2] [--tag T] [--out DIR]

B=1, Hq=32, D=128, float16, causal; a shape is NxHkv. For each shape and each of our dense call, our calls with
thresholds at rho ~0.5 and ~0.1 of the gated tiles, our block_max_scores and torch SDPA's cuDNN backend: the GPU idles
1 s, then the implementation runs back to back for --seconds while `nvidia-smi` samples the SM clock and the power
draw every 20 ms. Per implementation: the median call time over the first 10 ms and over the last half, and the mean
clock and power over the last half. `bsfa bench` times each implementation after at least --warmup-ms of its own
calls (bench/transient.py: how long a hotter predecessor's slowdown lasts); this says what the steady state it
then meets costs each implementation in clock. Results: DIR/GPU_DATE_[TAG-]sustained.{json,md}.
"""
import argparse
import datetime
import os
import subprocess
import sys
import tempfile
import time

import numpy as np


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shapes", nargs="+", default=["16384x8", "8192x32"])
    p.add_argument("--seconds", type=float, default=2.0)
    p.add_argument("--tag", default="")
    p.add_argument("--out", default="bench/results")
    return p.parse_args(argv)


class SmiSampler:
    """A background nvidia-smi writing its clock time, the SM clock (MHz) and the power draw (W) every 20 ms into a
    temporary file (a pipe fills within a minute of samples, and nvidia-smi then stops sampling); stop() ends it and
    returns parse_smi's rows."""

    def __init__(self, index):
        self._log = tempfile.TemporaryFile(mode="w+")
        self._proc = subprocess.Popen(["nvidia-smi", "-i", index, "--query-gpu=timestamp,clocks.sm,power.draw",
                                       "--format=csv,noheader,nounits", "-lms", "20"], stdout=self._log, text=True)

    def stop(self):
        self._proc.terminate()
        self._proc.wait()
        self._log.seek(0)
        text = self._log.read()
        self._log.close()
        return parse_smi(text)


def parse_smi(text):
    """(seconds since the epoch, MHz, W) rows of SmiSampler's output, as a float array; lines that do not parse
    (nvidia-smi's "[N/A]", a line cut off when it was stopped) are left out."""
    rows = []
    for line in text.splitlines():
        parts = [s.strip() for s in line.split(",")]
        if len(parts) != 3:
            continue
        try:
            t = datetime.datetime.strptime(parts[0], "%Y/%m/%d %H:%M:%S.%f").timestamp()
            rows.append((t, float(parts[1]), float(parts[2])))
        except ValueError:
            continue
    return np.array(rows) if rows else np.zeros((0, 3))


def settled(call_ms, samples, late_from, late_to):
    """The row of one run: median call time over the first 10 ms and over the second half, and the mean SM clock
    and power of the (time, MHz, W) samples in [late_from, late_to] (None where none fell there)."""
    ms = np.asarray(call_ms, dtype=float)
    early = ms[np.cumsum(ms) <= 10.0]
    late = samples[(samples[:, 0] >= late_from) & (samples[:, 0] <= late_to)] if len(samples) else samples
    return dict(calls=len(ms), first_10ms=float(np.median(early)) if len(early) else float(ms[0]),
                late_ms=float(np.median(ms[len(ms) // 2:])),
                sm_mhz=float(late[:, 1].mean()) if len(late) else None,
                power_w=float(late[:, 2].mean()) if len(late) else None)


def sustain(fn, seconds):
    """fn back to back for about `seconds`; per-call ms and the wall-clock window of the second half."""
    import torch

    torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    one = max(time.perf_counter() - t0, 1e-5)
    count = max(8, int(seconds / one))
    ev = [torch.cuda.Event(enable_timing=True) for _ in range(count + 1)]
    start = time.time()
    ev[0].record()
    for i in range(count):
        fn()
        ev[i + 1].record()
    ev[-1].synchronize()
    end = time.time()
    ms = np.array([ev[i].elapsed_time(ev[i + 1]) for i in range(count)])
    return ms, (start + (end - start) / 2, end)


def main(argv=None):
    args = parse_args(argv)
    import cupy as cp
    import torch

    import bsfa_cupy
    from bsfa_cupy.tools.benchmark import _input_sets, _peer_fns, gpu_name, thresholds_for_rho
    from bsfa_cupy.tools.outputs import result_stem, slug, write_result_files

    # nvidia-smi counts every GPU of the machine: the first visible one (an index or a UUID, both of which
    # nvidia-smi -i takes) is the one torch uses here
    index = (os.environ.get("CUDA_VISIBLE_DEVICES") or "0").split(",")[0]
    rows = []
    with torch.inference_mode():
        for shape in args.shapes:
            n, hkv = (int(x) for x in shape.split("x"))
            l2 = torch.cuda.get_device_properties(0).L2_cache_size
            q, k, v = _input_sets(1, n, 32, hkv, 128, "float16", l2)[0]
            tm = cp.from_dlpack(bsfa_cupy.block_max_scores(q, k))[0]
            thr = {r: bsfa_cupy.DeviceThresholds(thresholds_for_rho(tm, r, n)) for r in (0.5, 0.1)}
            cudnn = _peer_fns("sdpa-cudnn", [(q, k, v)], True, n)
            fns = {"bsfa-dense": lambda: bsfa_cupy.attention(q, k, v),
                   "bsfa-sparse@0.5": lambda: bsfa_cupy.attention(q, k, v, thr[0.5]),
                   "bsfa-sparse@0.1": lambda: bsfa_cupy.attention(q, k, v, thr[0.1]),
                   "bsfa-blockmax": lambda: bsfa_cupy.block_max_scores(q, k),
                   "sdpa-cudnn": lambda: cudnn(0)}
            for fn in fns.values():
                fn()
            for name, fn in fns.items():
                torch.cuda.synchronize()
                time.sleep(1.0)
                smi = SmiSampler(index)
                time.sleep(0.2)
                ms, (a, b) = sustain(fn, args.seconds)
                samples = smi.stop()
                rows.append(dict(n=n, hkv=hkv, impl=name, **settled(ms, samples, a, b)))
    lines = [f"# Sustained calls, {gpu_name()}, {datetime.date.today()}", "",
             f"B=1 Hq=32 D=128 fp16 causal; each implementation alone for {args.seconds:g} s after 1 s idle. "
             "`first 10 ms` and `late` are median call times (ms) over the first 10 ms and the second half; clock and "
             "power are nvidia-smi's means over the second half.", "",
             "| N | Hkv | impl | first 10 ms | late | late / first | SM MHz | power W |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        mhz = f"{r['sm_mhz']:.0f}" if r["sm_mhz"] is not None else "–"
        pw = f"{r['power_w']:.0f}" if r["power_w"] is not None else "–"
        lines.append(f"| {r['n']} | {r['hkv']} | {r['impl']} | {r['first_10ms']:.3f} | {r['late_ms']:.3f} | "
                     f"{r['late_ms'] / r['first_10ms']:.3f} | {mhz} | {pw} |")
    text = "\n".join(lines) + "\n"
    print(text)
    tag = f"{args.tag}-sustained" if args.tag else "sustained"
    stem = result_stem(slug(gpu_name()), str(datetime.date.today()), tag=tag)
    write_result_files(args.out, stem, dict(seconds=args.seconds, gpu=gpu_name(), rows=rows), text, lambda _: [])
    return 0


if __name__ == "__main__":
    sys.exit(main())
