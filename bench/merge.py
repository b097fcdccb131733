"""Merge benchmark result parts (same GPU) into one JSON/markdown/PNG set named GPU_DATE_TAG.

Usage: python bench/merge.py TAG part1.json part2.json ... [--out DIR]   (DIR: default bench/results)
The merged rows are the parts' rows unchanged; the date is the latest part's.
"""
import argparse
import json
from pathlib import Path

p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
p.add_argument("tag", help="suffix of the merged file names, e.g. v8-sweep")
p.add_argument("parts", nargs="+", help="result JSON files written by `python -m bsfa_cupy bench`")
p.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"),
               help="folder for the merged files (default: bench/results of this checkout)")
args = p.parse_args()

from bsfa_cupy.tools.benchmark import write_results  # noqa: E402

parts = [json.load(open(path)) for path in args.parts]
gpus = {part["gpu"] for part in parts}
if len(gpus) != 1:
    raise SystemExit(f"parts come from different GPUs: {sorted(gpus)}; ratios must be measured on one card")
merged = {"gpu": parts[0]["gpu"], "date": max(part["date"] for part in parts),
          "rows": [r for part in parts for r in part["rows"]]}
for path in write_results(merged, args.out, args.tag):
    print(path)
