"""Where a kernel's warps spend their time, per SASS instruction: a summary of Nsight Compute's source page.

Usage: python bench/ncu_sass.py FILE.csv[.gz] [--top 30] [--range LO HI]
FILE is `ncu -i REPORT --page source --csv --print-source sass` of a report collected with
`--section SourceCounters` (warp-state sampling per instruction). Prints the sampled warp time by instruction
class (HGMMA issue, wgmma waits, barriers, mbarrier waits, FMNMX, exponentials, shuffles and votes, the rest),
then the instructions with the most samples, each with its offset in the function, executions and its top
stall reasons. --range keeps the offsets LO..HI (hex), e.g. one loop. Samples are warp time, so the shares
count every warp, the producer's idle waits included (NOTES v29 reads them).
"""
import argparse
import csv
import gzip
import re
from collections import Counter

CLASSES = [  # (name, pattern on the SASS text), first match wins
    ("HGMMA issue", r"^HGMMA"),
    ("wgmma wait", r"^WARPGROUP\.(DEPBAR|ARRIVE)"),
    ("named barrier / vote", r"^(BAR\.|B2R)"),
    ("mbarrier", r"SYNCS\."),
    ("FMNMX", r"^FMNMX"),
    ("MUFU.EX2", r"^MUFU\.EX2"),
    ("shuffle / vote", r"^(SHFL|VOTE)"),
    ("shared memory", r"^(STSM|LDSM|STS|LDS)"),
    ("branch", r"BRA\b"),
]


def load(path):
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rt") as f:
        rows = list(csv.reader(f))
    start = next(i for i, r in enumerate(rows) if r and r[0] == "Address")
    return rows[start], rows[start + 1:]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("csv")
    p.add_argument("--top", type=int, default=30)
    p.add_argument("--range", nargs=2, metavar=("LO", "HI"), help="offsets (hex) to keep")
    args = p.parse_args(argv)
    hdr, data = load(args.csv)
    col = {h: i for i, h in enumerate(hdr)}
    stalls = [i for i, h in enumerate(hdr) if h.startswith("stall_") and "Not Issued" not in h]
    base = int(data[0][col["Address"]], 16)
    rows = []
    for r in data:
        off = int(r[col["Address"]], 16) - base
        if args.range and not int(args.range[0], 16) <= off <= int(args.range[1], 16):
            continue
        sass = re.sub(r"^@!?U?P\w+\s+", "", r[col["Source"]].strip())
        samples = int(r[col["Warp Stall Sampling (All Samples)"]] or 0)
        rows.append((off, sass, samples, r[col["Instructions Executed"]], r))
    total = sum(s for _, _, s, _, _ in rows) or 1
    by_class = Counter()
    for _, sass, s, _, _ in rows:
        name = next((n for n, pat in CLASSES if re.search(pat, sass)), "other")
        by_class[name] += s
    print(f"{total} samples over {len(rows)} instructions")
    for name, s in by_class.most_common():
        print(f"  {name:22s} {s:8d} {100 * s / total:5.1f} %")
    print()
    for off, sass, s, ex, r in sorted(rows, key=lambda x: -x[2])[:args.top]:
        why = sorted(((int(r[i]), hdr[i][6:]) for i in stalls if r[i] not in ("", "0")), reverse=True)[:2]
        why = ", ".join(f"{k} {n}" for n, k in why)
        print(f"{off:6x} {s:7d} {100 * s / total:5.1f} % ex {ex:>8}  {sass[:58]:58s} {why}")


if __name__ == "__main__":
    main()
