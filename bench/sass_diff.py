#!/usr/bin/env python3
"""Compare the SASS of every default kernel variant between two versions of kernels_cu/.

    python bench/sass_diff.py HEAD~1 kernels_cu            # a git revision against the work tree
    python bench/sass_diff.py old_dir new_dir --params     # ignore kernel-parameter offsets
    python bench/sass_diff.py HEAD kernels_cu --only sm90ws  # one kernel family

Each side is a git revision (its kernels_cu/ is exported to a temporary directory) or a directory
of kernel sources.  Both are compiled as the compile test does (nvcc -cubin, -std=c++17; the
mma.sync file for sm_80 and sm_90, dtype x head dim 32/64/96/128 x causal; the two sm_90a files,
one-warpgroup and warp-specialised, with -ftz=true, head dim 64/128; the split-KV file
(bsfa_fwd_split16/64/128, bsfa_combine) for sm_80 and sm_90, head dim 64/128), disassembled with nvdisasm,
and compared kernel by kernel with addresses dropped, branch labels renumbered and the compiler's
numbering of its internal helpers (which counts the kernels that call them) dropped.  --params
also replaces every c[0x0][...] operand (kernel parameters) by one placeholder, for comparing
across a change of the parameter layout.

Prints per variant and kernel: registers, stack frame / spill bytes, instruction count, and the
number of differing SASS lines, as is and with register names ignored.  Exits 1 if any kernel
present on both sides differs (a kernel on one side only is listed as new or gone).  Needs nvcc
and nvdisasm (CUDA toolkit; pip package nvidia-cuda-nvdisasm otherwise, pointed to with
--nvdisasm).  Not a test: pytest does not collect it.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import difflib
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# The mma.sync file under its current and its earlier name.
SM80_NAMES = ("bsfa_fwd_sm80.cu", "bsfa_fwd.cu")
SM90_NAME = "bsfa_fwd_sm90.cu"
SM90WS_NAME = "bsfa_fwd_sm90ws.cu"
SPLITKV_NAME = "bsfa_fwd_splitkv.cu"
DTYPES = (0, 1)
CAUSAL = (0, 1)


def variants():
    for target in ("sm_80", "sm_90"):
        for dt in DTYPES:
            for hd in (32, 64, 96, 128):
                for c in CAUSAL:
                    yield ("sm80", target, (f"-arch={target}",), dt, hd, c)
    for kind in ("sm90", "sm90ws"):
        for dt in DTYPES:
            for hd in (64, 128):
                for c in CAUSAL:
                    yield (kind, "sm_90a", ("-gencode=arch=compute_90a,code=sm_90a", "-ftz=true"), dt, hd, c)
    # As tests/kernels/test_compile.py compiles SPLITKV_SOURCE: no -ftz, plain -arch.
    for target in ("sm_80", "sm_90"):
        for dt in DTYPES:
            for hd in (64, 128):
                for c in CAUSAL:
                    yield ("splitkv", target, (f"-arch={target}",), dt, hd, c)


def materialise(spec: str, tmp: Path) -> Path:
    path = Path(spec)
    if path.is_dir():
        return path.resolve()
    out = tmp / re.sub(r"\W", "_", spec)
    out.mkdir()
    names = subprocess.run(
        ["git", "-C", str(REPO), "ls-tree", "--name-only", f"{spec}:kernels_cu"],
        check=True, capture_output=True, text=True,
    ).stdout.split()
    for name in names:
        blob = subprocess.run(["git", "-C", str(REPO), "show", f"{spec}:kernels_cu/{name}"], check=True, capture_output=True)
        (out / name).write_bytes(blob.stdout)
    return out


def build(src: Path, out: Path, variant, nvdisasm: str):
    kind, target, flags, dt, hd, c = variant
    wanted = {"sm80": SM80_NAMES, "sm90": (SM90_NAME,), "sm90ws": (SM90WS_NAME,), "splitkv": (SPLITKV_NAME,)}[kind]
    suffix = {"sm90ws": "-ws", "splitkv": "-splitkv"}.get(kind, "")
    stem = f"{target}{suffix}-{('f16', 'bf16')[dt]}-d{hd}-causal{c}"
    name = next((n for n in wanted if (src / n).is_file()), None)
    if name is None:
        if kind == "splitkv":  # a revision from before the split-KV kernels: its kernels count as new / gone
            return stem, "", ""
        raise FileNotFoundError(f"{src}: no {'/'.join(wanted)}")
    cubin = out / f"{stem}.cubin"
    cmd = ["nvcc", "-std=c++17", "-Xptxas", "-v", *flags, "-cubin", f"-DBSFA_DTYPE={dt}", f"-DBSFA_HEAD_DIM={hd}",
           f"-DBSFA_CAUSAL={c}", f"-I{src}", str(src / name), "-o", str(cubin)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{stem}: nvcc failed:\n{proc.stdout}{proc.stderr}")
    sass = subprocess.run([nvdisasm, "-c", str(cubin)], check=True, capture_output=True, text=True).stdout
    return stem, proc.stdout + proc.stderr, sass


def resources(log: str) -> dict:
    res, cur = {}, None
    for line in log.splitlines():
        m = re.search(r"Compiling entry function '(\w+)'", line) or re.search(r"Function properties for (\w+)", line)
        if m:
            cur = m.group(1)
        m = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", line)
        if m and cur:
            res.setdefault(cur, {})["frame"] = "/".join(m.groups())
        m = re.search(r"Used (\d+) registers", line)
        if m and cur:
            res.setdefault(cur, {})["regs"] = int(m.group(1))
    return res


def kernels(sass: str, params: bool, noregs: bool) -> dict[str, list[str]]:
    funcs, cur, labels = {}, None, {}
    for line in sass.splitlines():
        m = re.match(r"\s*\.text\.(\w+):", line)
        if m:
            cur, labels = m.group(1), {}
            funcs[cur] = []
            continue
        m = re.match(r"\s*/\*[0-9a-f]{4,}\*/\s+(.*?)\s*;?\s*$", line)
        if not (m and cur):
            continue
        ins = re.sub(r"\.L_x_\d+", lambda x: labels.setdefault(x.group(0), f"L{len(labels)}"), m.group(1))
        ins = re.sub(r"MOV (R\d+), 0x[0-9a-f]+$", r"MOV \1, RETURN_ADDRESS", ins)  # call return addresses
        ins = re.sub(r"\$__internal_\d+_\$", "$__internal_$", ins)  # helper numbering: a count of their callers
        if params:
            ins = re.sub(r"c\[0x0\]\[0x[0-9a-f]+\]", "c[0x0][PARAM]", ins)
        if noregs:
            ins = re.sub(r"\bU?P\d\b", "P", re.sub(r"\bU?R\d+\b", "R", ins)).replace(".reuse", "")
        funcs[cur].append(ins)
    return funcs


def ndiff(a: list[str], b: list[str]) -> int:
    return sum(1 for l in difflib.unified_diff(a, b, lineterm="", n=0) if l[:1] in "+-" and l[:3] not in ("---", "+++"))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("old")
    ap.add_argument("new")
    ap.add_argument("--params", action="store_true", help="ignore kernel-parameter constant-bank offsets")
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--nvdisasm", default=shutil.which("nvdisasm") or "nvdisasm")
    ap.add_argument("--only", choices=("sm80", "sm90", "sm90ws", "splitkv"),
                    help="compare only this kernel family's variants")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        sides = []
        for i, spec in enumerate((args.old, args.new)):
            src = materialise(spec, tmp)
            out = tmp / f"out{i}"
            out.mkdir()
            with concurrent.futures.ThreadPoolExecutor(args.jobs) as pool:
                sides.append({s: (l, a) for s, l, a in pool.map(lambda v: build(src, out, v, args.nvdisasm),
                                                                            [v for v in variants()
                                                                             if args.only in (None, v[0])])})
    differing = compared = 0
    print(f"{'variant':32s} {'kernel':17s} {'registers':>10s} {'frame/spill':>18s} {'instructions':>13s}  diff (ignoring registers)")
    for stem in sides[0]:
        (la, sa), (lb, sb) = sides[0][stem], sides[1][stem]
        ra, rb = resources(la), resources(lb)
        fa, fb = kernels(sa, args.params, False), kernels(sb, args.params, False)
        na, nb = kernels(sa, args.params, True), kernels(sb, args.params, True)
        for fn in sorted(set(fa) | set(fb)):
            d, dn = ndiff(fa.get(fn, []), fb.get(fn, [])), ndiff(na.get(fn, []), nb.get(fn, []))
            both = fn in fa and fn in fb
            differing += both and d > 0
            compared += both
            regs = f"{ra.get(fn, {}).get('regs')}->{rb.get(fn, {}).get('regs')}"
            frame = f"{ra.get(fn, {}).get('frame')}->{rb.get(fn, {}).get('frame')}"
            count = f"{len(fa.get(fn, []))}->{len(fb.get(fn, []))}"
            verdict = "identical" if not d else f"{d} lines ({dn})"
            verdict = "new" if fn not in fa else "gone" if fn not in fb else verdict
            print(f"{stem:32s} {fn:17s} {regs:>10s} {frame:>18s} {count:>13s}  {verdict}")
    print(f"{compared} kernels compared in {len(sides[0])} variants")
    print(f"{differing} kernels differ")
    return 1 if differing else 0


if __name__ == "__main__":
    sys.exit(main())
