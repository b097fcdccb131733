"""The issue's performance bar read off benchmark result files, one row per (file, shape, N).

Usage: python bench/bar.py FILE.json ...
e.g.   python bench/bar.py bench/results/*_v8-h100-sweep.json bench/results/*_v8-sweep.json \
           bench/results/*_v8-main-fp16-r2.json        (the v8 table in bench/NOTES.md)
Columns: dense x FA2 (SDPA flash time / ours), sparse / our dense at the rows nearest rho 0.5 / 0.25 / 0.1
(realised rho in brackets), rho~0.1 x FA2 and x cuDNN, with a mark where a ratio misses the bar
(dense >= 1.0x FA2 at 8K-64K; sparse <= 0.76 / 0.64 / 0.56 at N >= 16K; rho~0.1 >= 1.8x FA2 at 16K-64K).
"""
import argparse
import json
from collections import defaultdict
from pathlib import Path

SPARSE_BAR = {0.5: 0.76, 0.25: 0.64, 0.1: 0.56}


def nearest(rows, target):
    return min(rows, key=lambda r: abs(r["rho"] - target)) if rows else None


def main(paths):
    print("| file | dtype | D | Hkv | N | dense × FA2 | sparse / dense at ρ≈0.5 / 0.25 / 0.1 | ρ≈0.1 × FA2 | ρ≈0.1 × cuDNN |")
    print("|---|---|---|---|---|---|---|---|---|")
    for path in paths:
        groups = defaultdict(dict)
        for r in json.load(open(path))["rows"]:
            if r["ms"] is None or not r["causal"]:
                continue
            key = (r["dtype"], r["d"], r["hkv"], r["n"])
            groups[key].setdefault(r["impl"], []).append(r)
        for (dtype, d, hkv, n), impls in sorted(groups.items()):
            dense = impls.get("bsfa-dense", [None])[0]
            if dense is None:
                continue
            flash = impls.get("sdpa-flash", [None])[0]
            cudnn = impls.get("sdpa-cudnn", [None])[0]
            sparse = [r for r in impls.get("bsfa-sparse", []) if r["rho"] is not None and r["rho"] < 0.99]
            cells = []
            for target, limit in SPARSE_BAR.items():
                r = nearest(sparse, target)
                if r is None:
                    cells.append("–")
                    continue
                ratio = r["ms"] / dense["ms"]
                miss = " ✗" if n >= 16384 and ratio > limit else ""
                cells.append(f"{ratio:.3f}{miss}")
            r10 = nearest(sparse, 0.1)
            fa2 = f"{flash['ms'] / dense['ms']:.3f}" if flash else "–"
            if flash and 8192 <= n <= 65536 and d == 128 and flash["ms"] / dense["ms"] < 1.0:
                fa2 += " ✗"
            x_fa2 = f"{flash['ms'] / r10['ms']:.2f}" if flash and r10 else "–"
            if flash and r10 and 16384 <= n <= 65536 and flash["ms"] / r10["ms"] < 1.8:
                x_fa2 += " ✗"
            x_cud = f"{cudnn['ms'] / r10['ms']:.2f}" if cudnn and r10 else "–"
            name = Path(path).stem.split("_", 2)[-1]
            print(f"| {name} | {dtype} | {d} | {hkv} | {n // 1024}K | {fa2} | {' / '.join(cells)} | {x_fa2} | {x_cud} |")


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("files", nargs="+", help="result JSON files of `python -m bsfa_cupy bench` or bench/merge.py")
    main(p.parse_args().files)
