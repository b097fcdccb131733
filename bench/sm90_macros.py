"""A/B timing of kernel builds side by side in one process: a backend and extra compile-time macros each.

Usage: python bench/sm90_macros.py NAME=[ARCH:][MACRO=VALUE[,MACRO=VALUE]] ... [--n 16384 ...]
           [--rhos 0.5 0.1] [--thresholds handle|array|both] [--d 128] [--hkv 8] [--dtype float16]
e.g.   python bench/sm90_macros.py base= other=BSFA_SOME_MACRO=1 --n 16384
       python bench/sm90_macros.py mma.sync=sm80: wgmma=sm90: --n 8192 16384
ARCH is sm90 (the wgmma kernel, the default), sm90ws (the warp-specialised one) or sm80 (the mma.sync
kernel); each build runs as
bsfa_cupy.Backend(ARCH, {MACRO: VALUE, ...}), its own compiled and cached module. Prints, per N and
build, dense and sparse times and the ratio to the first build's dense (B=1, Hq=32, causal). Sparse
calls pass a DeviceThresholds (validated once; "handle") and/or the plain device array ("array": a
NaN check with a stream wait per call). Time the peers (torch SDPA) with `python -m bsfa_cupy bench`.
"""
import argparse


def parse_build(spec):
    """NAME=[ARCH:][MACRO=VALUE,...] -> (name, arch, {macro: value})."""
    name, _, rest = spec.partition("=")
    arch, sep, macros = rest.partition(":")
    if not sep or arch not in ("sm80", "sm90", "sm90ws"):
        arch, macros = "sm90", rest
    defines = {}
    for item in filter(None, macros.split(",")):
        macro, _, value = item.partition("=")
        defines[macro] = value or "1"
    return name, arch, defines


p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
p.add_argument("--n", type=int, nargs="+", default=[16384])
p.add_argument("--d", type=int, default=128)
p.add_argument("--hkv", type=int, default=8)
p.add_argument("--dtype", choices=("float16", "bfloat16"), default="float16")
p.add_argument("--rhos", type=float, nargs="+", default=[0.5, 0.1])
p.add_argument("--thresholds", choices=["handle", "array", "both"], default="handle")
p.add_argument("builds", nargs="+", help="NAME=[ARCH:][MACRO=VALUE,...]")
args = p.parse_args()
builds = [parse_build(s) for s in args.builds]

import cupy as cp  # noqa: E402  (after argparse: --help works without a GPU)
import torch  # noqa: E402

import bsfa_cupy  # noqa: E402
from bsfa_cupy.tools.benchmark import Timer, _input_sets, dense_flops, realised_rho, thresholds_for_rho  # noqa: E402

backends = {name: bsfa_cupy.Backend(arch, defines) for name, arch, defines in builds}
timer = Timer(repeats=7, inner=4)
paths = ["handle", "array"] if args.thresholds == "both" else [args.thresholds]
as_passed = {"array": lambda t: t, "handle": bsfa_cupy.DeviceThresholds}
l2 = torch.cuda.get_device_properties(0).L2_cache_size
print(f"{torch.cuda.get_device_name()}; B=1 Hq=32 Hkv={args.hkv} D={args.d} {args.dtype} causal; builds: "
      + ", ".join(f"{name}={b.arch}{dict(b.defines) or ''}" for name, b in backends.items()), flush=True)
with torch.inference_mode():
    for n in args.n:
        sets = _input_sets(1, n, 32, args.hkv, args.d, args.dtype, l2)
        first = next(iter(backends.values()))
        tmax = [cp.from_dlpack(bsfa_cupy.block_max_scores(q, k, backend=first))[0] for q, k, _ in sets]
        thr = {rho: [thresholds_for_rho(t, rho, n) for t in tmax] for rho in args.rhos}
        flops = dense_flops(1, 32, n, args.d, True)
        base = None
        for name, backend in backends.items():
            dense = timer(lambda i: bsfa_cupy.attention(*sets[i], backend=backend), len(sets))
            base = base or dense
            line = (f"n={n} {name:14s} dense {dense:.3f} ms {flops / dense / 1e9:.0f} TFLOP/s "
                    f"({dense / base:.3f} of first)")
            for rho in args.rhos:
                _, keep = bsfa_cupy.attention(*sets[0], thr[rho][0], return_keep=True, backend=backend)
                got = realised_rho(cp.from_dlpack(keep), n)
                line += f" | rho={got:.2f}"
                for path in paths:
                    t = [as_passed[path](x) for x in thr[rho]]
                    ms = timer(lambda i: bsfa_cupy.attention(*sets[i], t[i], backend=backend), len(sets))
                    line += f" {path} {ms:.3f} ms {ms / dense:.3f}"
            print(line, flush=True)
        sets = tmax = thr = None  # free the inputs before the next N
        torch.cuda.empty_cache()
        cp.get_default_memory_pool().free_all_blocks()
