"""Host time of one `attention` call: a tiny problem launched back to back, so the host is the bottleneck.

Usage: python bench/host_overhead.py [--calls 2000] [--backend auto|sm80|sm90]
Prints microseconds per call for CuPy and torch inputs, dense, with a DeviceThresholds, with a plain device
thresholds array (NaN check and stream wait per call) and with `return_lse=True, return_keep=True`.
"""
import argparse
import functools
import time

p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
p.add_argument("--calls", type=int, default=2000)
p.add_argument("--backend", choices=("auto", "sm80", "sm90"), default="auto", help="kernel (default: auto)")
args = p.parse_args()

import cupy as cp  # noqa: E402  (after argparse: --help works without a GPU)

import bsfa_cupy  # noqa: E402

attention = functools.partial(bsfa_cupy.attention, backend=args.backend)


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
    "cupy dense": lambda: attention(q, k, v),
    "cupy DeviceThresholds": lambda: attention(q, k, v, handle),
    "cupy device array": lambda: attention(q, k, v, arr),
    "cupy dense, lse+keep": lambda: attention(q, k, v, return_lse=True, return_keep=True),
}
try:
    import torch

    tq, tk, tv = (torch.from_dlpack(x) for x in (q, k, v))
    cases["torch dense"] = lambda: attention(tq, tk, tv)
    cases["torch DeviceThresholds"] = lambda: attention(tq, tk, tv, handle)
except ImportError:
    pass
for name, fn in cases.items():
    print(f"{name:24s} {per_call_us(fn):8.1f} us/call", flush=True)
