"""Merge benchmark result parts (same GPU, same date) into one JSON/markdown/PNG set.

Usage: python bench/merge.py OUT_TAG part1.json part2.json ...
"""
import json
import sys

from bsfa_cupy.tools.benchmark import write_results

tag, parts = sys.argv[1], [json.load(open(p)) for p in sys.argv[2:]]
gpus = {p["gpu"] for p in parts}
if len(gpus) != 1:
    sys.exit(f"parts come from different GPUs: {sorted(gpus)}; ratios must be measured on one card")
merged = {"gpu": parts[0]["gpu"], "date": max(p["date"] for p in parts), "rows": [r for p in parts for r in p["rows"]]}
for path in write_results(merged, "bench/results", tag):
    print(path)
