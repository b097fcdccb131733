"""The Hopper forward's bar read off benchmark result files: every ratio against torch SDPA's cuDNN backend.

Usage: python bench/bar_cudnn.py FILE.json ...
e.g.   python bench/bar_cudnn.py O/*_v12-bar-*.json        (after `TAG=v12 bench/sweep.sh bar`)
One row per (file, dtype, D, Hkv, B, N, causal): dense × cuDNN (cuDNN time / ours), sparse × cuDNN at the rows
nearest ρ 0.5 / 0.25 / 0.1 (realised ρ in brackets), block_max / our dense; a ✗ marks a ratio that misses:
dense ≥ 1.0× at causal D=128 N=8K..128K, ≥ 0.95× non-causal and at D=64, ≥ 0.9× for B > 1; sparse ≥ 1.3 / 1.55 /
1.8× at N ≥ 16K (fp16, Hkv=8); block_max ≤ 0.45 of dense at N ≥ 16K.
"""
import argparse
import json
from collections import defaultdict
from pathlib import Path

SPARSE_BAR = {0.5: 1.3, 0.25: 1.55, 0.1: 1.8}
BLOCKMAX_BAR = 0.45


def dense_bar(d, b, causal):
    if b > 1:
        return 0.9
    return 1.0 if causal and d == 128 else 0.95


def nearest(rows, target):
    return min(rows, key=lambda r: abs(r["rho"] - target)) if rows else None


def row_cells(dtype, d, hkv, b, n, causal, impls):
    dense = impls["bsfa-dense"][0]
    cudnn = impls.get("sdpa-cudnn", [None])[0]
    x_dense = "–"
    if cudnn:
        ratio = cudnn["ms"] / dense["ms"]
        x_dense = f"{ratio:.2f}" + (" ✗" if ratio < dense_bar(d, b, causal) else "")
    sparse = [r for r in impls.get("bsfa-sparse", []) if r["rho"] is not None and r["rho"] < 0.99]
    cells = []
    for target, limit in SPARSE_BAR.items():
        r = nearest(sparse, target)
        if r is None or cudnn is None or abs(r["rho"] - target) > 0.3 * target:
            cells.append("–")
            continue
        ratio = cudnn["ms"] / r["ms"]
        gated = n >= 16384 and dtype == "float16" and hkv == 8
        cells.append(f"{ratio:.2f} ({r['rho']:.2f})" + (" ✗" if gated and ratio < limit else ""))
    bm = impls.get("bsfa-blockmax", [None])[0]
    x_bm = "–"
    if bm:
        ratio = bm["ms"] / dense["ms"]
        x_bm = f"{ratio:.2f}" + (" ✗" if n >= 16384 and ratio > BLOCKMAX_BAR else "")
    return x_dense, cells, x_bm


def main(paths):
    print("| file | dtype | D | Hkv | B | N | causal | dense × cuDNN | sparse × cuDNN at ρ≈0.5 / 0.25 / 0.1 "
          "| block_max / dense |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for path in paths:
        groups = defaultdict(lambda: defaultdict(list))
        for r in json.load(open(path))["rows"]:
            if r["ms"] is None:
                continue
            key = (r["dtype"], r["d"], r["hkv"], r.get("b", 1), r["n"], r["causal"])
            groups[key][r["impl"]].append(r)
        for key, impls in sorted(groups.items()):
            if "bsfa-dense" not in impls:
                continue
            x_dense, cells, x_bm = row_cells(*key, impls)
            dtype, d, hkv, b, n, causal = key
            name = Path(path).stem.split("_", 2)[-1]
            n_txt = f"{n // 1024}K" if n >= 1024 else str(n)
            print(f"| {name} | {dtype} | {d} | {hkv} | {b} | {n_txt} | {'yes' if causal else 'no'} | {x_dense} "
                  f"| {' / '.join(cells)} | {x_bm} |")


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("files", nargs="+", help="result JSON files of `python -m bsfa_cupy bench` or bench/merge.py")
    main(p.parse_args().files)
