"""Host time of one `attention` call: a tiny problem launched back to back, so the host is the bottleneck.

Usage: python bench/host_overhead.py [--calls 2000]
Prints microseconds per call for CuPy and torch inputs, dense, with a DeviceThresholds, with a plain device
thresholds array (NaN check and stream wait per call) and with `return_lse=True, return_keep=True`.
"""
import argparse
import time

import cupy as cp

import bsfa_cupy

p = argparse.ArgumentParser()
p.add_argument("--calls", type=int, default=2000)
args = p.parse_args()


def per_call_us(fn):
    for _ in range(20):
        fn()
    cp.cuda.Device().synchronize()
    t0 = time.perf_counter()
    for _ in range(args.calls):
        fn()
    cp.cuda.Device().synchronize()
    return (time.perf_counter() - t0) / args.calls * 1e6


rng = cp.random.default_rng(0)
q = rng.standard_normal((1, 256, 2, 128), dtype=cp.float32).astype(cp.float16)
k = rng.standard_normal((1, 256, 1, 128), dtype=cp.float32).astype(cp.float16)
v = rng.standard_normal((1, 256, 1, 128), dtype=cp.float32).astype(cp.float16)
arr = cp.zeros((2, 2), cp.float32)
handle = bsfa_cupy.DeviceThresholds(arr)
cases = {
    "cupy dense": lambda: bsfa_cupy.attention(q, k, v),
    "cupy DeviceThresholds": lambda: bsfa_cupy.attention(q, k, v, handle),
    "cupy device array": lambda: bsfa_cupy.attention(q, k, v, arr),
    "cupy dense, lse+keep": lambda: bsfa_cupy.attention(q, k, v, return_lse=True, return_keep=True),
}
try:
    import torch

    tq, tk, tv = (torch.from_dlpack(x) for x in (q, k, v))
    cases["torch dense"] = lambda: bsfa_cupy.attention(tq, tk, tv)
    cases["torch DeviceThresholds"] = lambda: bsfa_cupy.attention(tq, tk, tv, handle)
except ImportError:
    pass
for name, fn in cases.items():
    print(f"{name:24s} {per_call_us(fn):8.1f} us/call", flush=True)
