"""Merge ``bsfa quality`` result files of one model, device and texts into one result set (rows unchanged).

Thresholds depend only on (texts, N, rule, k), so runs over different k or rules at the same N and texts
are one sweep; rows are ordered by rule (first appearance) and k. Writes JSON, markdown and PNG.
Usage: python bench/merge_quality.py TAG FILE.json ... [--out DIR]
"""
import argparse
import json
import sys

from bsfa_cupy.tools.quality import write_results


def merge(results: list) -> dict:
    first = results[0]
    for r in results[1:]:
        for key in ("device", "model", "dtype"):
            if r[key] != first[key]:
                raise ValueError(f"{key}: expected {first[key]!r} in every file, got {r[key]!r}")
    runs = {}
    for r in results:
        for run in r["runs"]:
            have = runs.setdefault(run["n"], {**run, "rows": [], "texts": [], "calibration": {}})
            if (run["calib_texts"], run["eval_texts"]) != (have["calib_texts"], have["eval_texts"]):
                raise ValueError(f"N={run['n']}: expected the same calibration and evaluation texts in every file")
            have["rows"] += run["rows"]
            have["texts"] += run["texts"]
            have["calibration"].update(run.get("calibration", {}))
    order = {}
    for run in runs.values():
        for row in run["rows"]:
            order.setdefault(row["rule"], len(order))
        run["rows"].sort(key=lambda row: (order[row["rule"]], row["k"]))
    merged = {**first, "date": max(r["date"] for r in results), "runs": [runs[n] for n in sorted(runs)],
              "needle": [nd for r in results for nd in r.get("needle", [])],
              "merged_from": [r.get("config") for r in results]}
    return merged


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("tag")
    p.add_argument("files", nargs="+")
    p.add_argument("--out", default="bench/results")
    args = p.parse_args(argv)
    results = [json.load(open(f)) for f in args.files]
    for path in write_results(merge(results), args.out, args.tag):
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
