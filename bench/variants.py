"""Time compile-time kernel variants side by side (one process, one GPU): dense and sparse rows.

Usage: python bench/variants.py [--n 16384 ...] [--d 128] [--hkv 8] [--dtype float16]
Prints one line per (variant, rho) and writes bench/results/<gpu>_<date>_variants.json.
"""
import argparse
import json
from pathlib import Path

import cupy as cp
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

import bsfa_cupy
from bsfa_cupy import _kernels
from bsfa_cupy.tools.benchmark import Timer, _input_sets, dense_flops, gpu_name, realised_rho, slug, thresholds_for_rho

VARIANTS = {  # knobs relative to the defaults
    "wgmma": dict(sm90=True),
    "mma.sync": dict(sm90=False),
}

p = argparse.ArgumentParser()
p.add_argument("--n", type=int, nargs="+", default=[16384])
p.add_argument("--d", type=int, default=128)
p.add_argument("--hkv", type=int, default=8)
p.add_argument("--dtype", default="float16")
p.add_argument("--rhos", type=float, nargs="+", default=[1.0, 0.5, 0.25, 0.1])
p.add_argument("--out", default="bench/results")
args = p.parse_args()

timer = Timer(repeats=7, inner=4)
rows = []
l2 = torch.cuda.get_device_properties(0).L2_cache_size
with torch.inference_mode():
    for n in args.n:
        sets = _input_sets(1, n, 32, args.hkv, args.d, args.dtype, l2)
        flops = dense_flops(1, 32, n, args.d, True)
        tmax = [cp.from_dlpack(bsfa_cupy.block_max_scores(q, k))[0] for q, k, _ in sets]
        def sdpa(i):
            with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                return torch.nn.functional.scaled_dot_product_attention(
                    *(x.transpose(1, 2) for x in sets[i]), is_causal=True, enable_gqa=True)

        def cudnn(i):
            with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
                return torch.nn.functional.scaled_dot_product_attention(
                    *(x.transpose(1, 2) for x in sets[i]), is_causal=True, enable_gqa=True)

        flash = timer(sdpa, len(sets))
        rows.append(dict(variant="sdpa-flash", n=n, rho=None, ms=flash))
        print(f"n={n} sdpa-flash {flash:.3f} ms {flops / flash / 1e9:.0f} TFLOP/s", flush=True)
        try:
            cud = timer(cudnn, len(sets))
            rows.append(dict(variant="sdpa-cudnn", n=n, rho=None, ms=cud))
            print(f"n={n} sdpa-cudnn {cud:.3f} ms {flops / cud / 1e9:.0f} TFLOP/s ({flash / cud:.3f}x flash)",
                  flush=True)
        except RuntimeError as exc:
            print(f"n={n} sdpa-cudnn unavailable: {exc}", flush=True)
        for name, knobs in VARIANTS.items():
            with _kernels.tuning(**knobs):
                ms = timer(lambda i: bsfa_cupy.attention(*sets[i]), len(sets))
                rows.append(dict(variant=name, n=n, rho=None, ms=ms))
                print(f"n={n} {name:18s} dense    {ms:.3f} ms {flops / ms / 1e9:.0f} TFLOP/s "
                      f"({flash / ms:.3f}x flash)", flush=True)
                for rho in args.rhos:
                    thr = [bsfa_cupy.DeviceThresholds(thresholds_for_rho(t, rho, n)) for t in tmax]
                    _, keep = bsfa_cupy.attention(*sets[0], thr[0], return_keep=True)
                    got = realised_rho(cp.from_dlpack(keep), n)
                    ms_s = timer(lambda i: bsfa_cupy.attention(*sets[i], thr[i]), len(sets))
                    rows.append(dict(variant=name, n=n, rho=got, ms=ms_s))
                    print(f"n={n} {name:18s} rho={got:.3f} {ms_s:.3f} ms ({ms_s / ms:.3f} of dense, "
                          f"{flash / ms_s:.2f}x flash)", flush=True)
        del sets
        torch.cuda.empty_cache()

meta = {"gpu": gpu_name(), "d": args.d, "hkv": args.hkv, "dtype": args.dtype, "rows": rows}
out = Path(args.out) / f"{slug(meta['gpu'])}_variants.json"
out.parent.mkdir(parents=True, exist_ok=True)
out.write_text(json.dumps(meta, indent=1))
print("wrote", out)
