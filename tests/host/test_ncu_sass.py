"""bench/ncu_sass.py on a small source page of the shape Nsight Compute writes: samples by instruction class, the
top instructions with their stall reasons, --range, and gzip input (the committed profiles are gzipped)."""
from __future__ import annotations

import csv
import gzip

import pytest

from tests.support.bench_scripts import load_bench_script

HEADER = ["Address", "Source", "Warp Stall Sampling (All Samples)", "Warp Stall Sampling (Not-issued Samples)",
          "# Samples", "Instructions Executed", "stall_barrier", "stall_wait", "stall_barrier (Not Issued)"]
ROWS = [  # offset, SASS, samples, executed, barrier, wait
    (0x00, "HGMMA.64x64x16.F32 R24, gdesc[UR4], R24", 30, 10, 0, 20),
    (0x10, "WARPGROUP.DEPBAR.LE gsb0, 0x0 ;", 50, 10, 45, 5),
    (0x20, "FMNMX R1, R2, R3, !PT ;", 15, 10, 0, 12),
    (0x30, "@!P0 BRA 0x7f00 ;", 5, 10, 0, 1),
]


def _load():
    return load_bench_script("ncu_sass")


def _write(path, opener=open):
    base = 0x7F0000001000
    with opener(path, "wt", newline="") as f:
        w = csv.writer(f)
        w.writerow(["Kernel Name", "bsfa_fwd_headpair", ""])
        w.writerow(HEADER)
        for off, sass, s, ex, bar, wait in ROWS:
            w.writerow([hex(base + off), "      " + sass, s, s - 1, s, ex, bar, wait, bar])


@pytest.mark.parametrize("gz", [False, True])
def test_classes_and_top_instructions(tmp_path, capsys, gz):
    path = tmp_path / ("page.csv.gz" if gz else "page.csv")
    _write(path, gzip.open if gz else open)
    _load().main([str(path), "--top", "2"])
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "100 samples over 4 instructions", out[0]
    shares = {line[:24].strip(): line[24:].split() for line in out[1:6]}
    assert shares["wgmma wait"] == ["50", "50.0", "%"] and shares["HGMMA issue"] == ["30", "30.0", "%"]
    assert shares["FMNMX"] == ["15", "15.0", "%"] and shares["branch"] == ["5", "5.0", "%"]
    top = [line for line in out if line.startswith("    10") or line.startswith("     0")]
    assert len(top) == 2 and "DEPBAR" in top[0] and "barrier 45, wait 5" in top[0] and "HGMMA" in top[1], top


def test_range_keeps_the_offsets_asked_for(tmp_path, capsys):
    path = tmp_path / "page.csv"
    _write(path)
    _load().main([str(path), "--range", "10", "20"])
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "65 samples over 2 instructions", out[0]
