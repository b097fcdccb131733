"""Host time of one `attention` call: a tiny problem launched back to back, so the host is the bottleneck.

Usage: python bench/host_overhead.py [--calls 2000] [--backend auto|sm80|sm90]
Prints microseconds per call for CuPy and torch inputs, dense (through attention's kept plans, and through its
full path that redoes every check per call), with a DeviceThresholds, with a plain device
thresholds array (NaN check and stream wait per call) and with `return_lse=True, return_keep=True`; then the
same calls through an AttentionPlan (`plan.run`), a decode shape (1 row against 32K keys, B=1, Hq=32, Hkv=8,
D=128: the split-KV path) through attention and a plan, and what the split-KV partials would cost allocated per
call (CuPy's pool under torch's stream) instead of kept per stream by the plan; and `block_max_scores` on the
tiny problem through its kept plans, its full path and a BlockMaxPlan.
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
from bsfa_cupy.block_max_plan import BlockMaxPlan  # noqa: E402
from bsfa_cupy.ops import _attention, _block_max_scores  # noqa: E402

attention = functools.partial(bsfa_cupy.attention, backend=args.backend)
full_path = functools.partial(_attention, backend=args.backend)  # no kept plans: all host work per call


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
    "cupy dense, full path": lambda: full_path(q, k, v),
    "cupy DeviceThresholds": lambda: attention(q, k, v, handle),
    "cupy device array": lambda: attention(q, k, v, arr),
    "cupy dense, lse+keep": lambda: attention(q, k, v, return_lse=True, return_keep=True),
}
try:
    import torch

    tq, tk, tv = (torch.from_dlpack(x) for x in (q, k, v))
    cases["torch dense"] = lambda: attention(tq, tk, tv)
    cases["torch dense, full path"] = lambda: full_path(tq, tk, tv)
    cases["torch DeviceThresholds"] = lambda: attention(tq, tk, tv, handle)
except ImportError:
    pass
for name, fn in cases.items():
    print(f"{name:24s} {per_call_us(fn):8.1f} us/call", flush=True)

plan_cases = {
    "cupy plan.run": (bsfa_cupy.AttentionPlan(q, k, v, backend=args.backend), (q, k, v)),
    "cupy plan.run thr": (bsfa_cupy.AttentionPlan(q, k, v, handle, backend=args.backend), (q, k, v)),
}
try:
    plan_cases["torch plan.run"] = (bsfa_cupy.AttentionPlan(tq, tk, tv, backend=args.backend), (tq, tk, tv))
except NameError:  # no torch
    pass
for name, (plan, xs) in plan_cases.items():
    print(f"{name:24s} {per_call_us(lambda: plan.run(*xs)):8.1f} us/call", flush=True)

# Decode: the split-KV route (backend "auto" only: an explicit kernel would not take it).
dq = rng.standard_normal((1, 1, 32, 128), dtype=cp.float32).astype(cp.float16)
dk = rng.standard_normal((1, 32768, 8, 128), dtype=cp.float32).astype(cp.float16)
dv = rng.standard_normal((1, 32768, 8, 128), dtype=cp.float32).astype(cp.float16)
decode = {
    "decode cupy attention": lambda: bsfa_cupy.attention(dq, dk, dv),
    "decode cupy full path": lambda: _attention(dq, dk, dv),
}
dplan = bsfa_cupy.AttentionPlan(dq, dk, dv)
decode["decode cupy plan.run"] = lambda: dplan.run(dq, dk, dv)
try:
    import torch

    dtq, dtk, dtv = (torch.from_dlpack(x) for x in (dq, dk, dv))
    tplan = bsfa_cupy.AttentionPlan(dtq, dtk, dtv)
    decode["decode torch attention"] = lambda: bsfa_cupy.attention(dtq, dtk, dtv)
    decode["decode torch full path"] = lambda: _attention(dtq, dtk, dtv)
    decode["decode torch plan.run"] = lambda: tplan.run(dtq, dtk, dtv)
    decode["decode torch sdpa"] = lambda: torch.nn.functional.scaled_dot_product_attention(
        dtq.transpose(1, 2), dtk.transpose(1, 2), dtv.transpose(1, 2), enable_gqa=True)

    # The partials' alternatives: per call from CuPy's pool with torch's stream made current (what a plan
    # would need without its per-stream cache), against the cache's dict look-up.
    from bsfa_cupy import _splitkv
    from bsfa_cupy._arrays import _external_stream

    sp = dplan.split
    ext = _external_stream(cp, torch.cuda.current_stream().cuda_stream, 0)

    def per_call_partials():
        with cp.cuda.Device(0), ext:
            _splitkv.workspace(sp, dplan._launch_split[2], 1, 1, 32, 128)

    decode["partials per call"] = per_call_partials
    decode["partials cached"] = lambda: tplan._workspace(tplan._io.stream())
except ImportError:
    pass


def host_us(fn, n=200):
    """Host time alone: n calls queued behind a synchronised device, timed before the queue can fill."""
    for _ in range(5):
        fn()
    cp.cuda.Device().synchronize()
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    t = time.perf_counter() - t0
    cp.cuda.Device().synchronize()
    return t / n * 1e6


print(f"decode plan: {dplan!r}")
for name, fn in decode.items():
    print(f"{name:24s} {per_call_us(fn):8.1f} us/call back to back, {host_us(fn):8.1f} us host", flush=True)

bm = {
    "block_max cupy": lambda: bsfa_cupy.block_max_scores(q, k, backend=args.backend),
    "block_max cupy full": lambda: _block_max_scores(q, k, True, None, args.backend, None, 0),
}
bm_plan = BlockMaxPlan(q, k, backend=args.backend)
bm["block_max cupy plan.run"] = lambda: bm_plan.run(q, k)
try:
    bm["block_max torch"] = lambda: bsfa_cupy.block_max_scores(tq, tk, backend=args.backend)
    bm["block_max torch full"] = lambda: _block_max_scores(tq, tk, True, None, args.backend, None, 0)
    bm_tplan = BlockMaxPlan(tq, tk, backend=args.backend)
    bm["block_max torch plan.run"] = lambda: bm_tplan.run(tq, tk)
except NameError:  # no torch
    pass
for name, fn in bm.items():
    print(f"{name:24s} {per_call_us(fn):8.1f} us/call back to back, {host_us(fn):8.1f} us host", flush=True)
