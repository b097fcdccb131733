"""Compile every kernel variant this GPU runs into the on-disk cache, in parallel processes.

A variant that fails to compile shows as one line here, before the GPU tests (which would otherwise
fail wherever they first need it); the whole set takes ~13 s cold on one process, ~5 s on eight (H200).
Variants: backend "sm80" for float16/bfloat16, head dims 32/64/96/128, causal and not; on compute
capability 9.0 also "sm90" and "sm90ws" for head dims 64/128; "splitkv" (split-KV, any GPU) for head dims 64/128. Each process compiles one variant through the public
API (one tiny `attention` call loads the module holding both kernels); prints seconds per variant.
Usage: python bench/warm_cache.py [--jobs 8]
"""
import argparse
import os
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from multiprocessing import get_context

from bsfa_cupy._variants import ARCH_HEAD_DIMS


def compile_one(backend, dtype, d, causal):
    import cupy as cp

    import bsfa_cupy

    t0 = time.perf_counter()
    q = cp.zeros((1, 128, 1, d), dtype=dtype)
    bsfa_cupy.attention(q, q, q, causal=causal, backend=backend)
    cp.cuda.Device().synchronize()
    return time.perf_counter() - t0


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--jobs", type=int, default=min(8, os.cpu_count() or 1), help="processes (default: min(8, CPUs))")
    args = p.parse_args()

    import cupy as cp

    hopper = str(cp.cuda.Device().compute_capability) == "90"
    variants = [(arch, dt, d, c) for arch, dims in ARCH_HEAD_DIMS.items() if arch in ("sm80", "splitkv") or hopper
                for dt in ("float16", "bfloat16") for d in dims for c in (True, False)]
    t0, failed = time.perf_counter(), 0
    with ProcessPoolExecutor(args.jobs, mp_context=get_context("spawn")) as pool:
        futures = {pool.submit(compile_one, *v): v for v in variants}
        for fut in as_completed(futures):
            arch, dt, d, c = futures[fut]
            name = f"{arch} {dt} d={d} causal={int(c)}"
            try:
                print(f"{name:36s} {fut.result():6.1f} s", flush=True)
            except Exception as exc:  # report every variant, then fail
                failed += 1
                print(f"{name:36s} FAILED: {type(exc).__name__}: {str(exc)[:2000]}", flush=True)
    print(f"{len(variants) - failed} of {len(variants)} variants compiled or cached in "
          f"{time.perf_counter() - t0:.0f} s ({args.jobs} processes)")
    raise SystemExit(1 if failed else 0)


if __name__ == "__main__":
    main()
