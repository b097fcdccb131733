"""The host's packing of ``bsfa::Params`` matches the header field by field.

kernels_cu/bsfa_params.cuh is plain C++: the host C++ compiler prints every member's offset and
size, which must equal ``bsfa_cupy._launch.PARAMS`` (names, order, offsets, item sizes, total).
"""
from __future__ import annotations

import re
import shutil
import subprocess

import pytest

from bsfa_cupy._launch import PARAMS
from bsfa_cupy._source import kernels_dir

CXX = shutil.which("g++") or shutil.which("c++") or shutil.which("clang++")


def _header_fields(text: str) -> list[str]:
    body = text[text.index("struct Params {") : text.index("};", text.index("struct Params {"))]
    body = re.sub(r"//[^\n]*", "", body)
    names = []
    for decl in body.split(";")[:-1]:
        decl = decl.replace("struct Params {", "")
        for part in decl.split(","):
            names.append(re.findall(r"[A-Za-z_][A-Za-z0-9_]*", part)[-1])
    return names


@pytest.mark.skipif(CXX is None, reason="no host C++ compiler")
def test_params_layout_matches_the_header(tmp_path):
    header = kernels_dir() / "bsfa_params.cuh"
    fields = _header_fields(header.read_text())
    assert tuple(fields) == PARAMS.names, f"field order differs:\n header {fields}\n host   {list(PARAMS.names)}"
    lines = "\n".join(
        f'    std::printf("{f} %zu %zu\\n", offsetof(bsfa::Params, {f}), sizeof(((bsfa::Params*)0)->{f}));'
        for f in fields
    )
    src = tmp_path / "layout.cpp"
    src.write_text(
        f'#include <cstddef>\n#include <cstdio>\n#include "{header}"\nint main() {{\n{lines}\n'
        '    std::printf("sizeof %zu\\n", sizeof(bsfa::Params));\n}\n'
    )
    exe = tmp_path / "layout"
    subprocess.run([CXX, "-std=c++17", "-o", str(exe), str(src)], check=True, capture_output=True, text=True)
    out = subprocess.run([str(exe)], check=True, capture_output=True, text=True).stdout.split("\n")
    got = {name: (int(off), int(size)) for name, off, size in (line.split() for line in out if line[:6] != "sizeof" and line)}
    want = {name: (PARAMS.fields[name][1], PARAMS.fields[name][0].itemsize) for name in PARAMS.names}
    bad = {n: (got[n], want[n]) for n in want if got[n] != want[n]}
    assert not bad, f"(offset, size) header vs host differ for {bad}"
    size = int(next(line for line in out if line.startswith("sizeof")).split()[1])
    assert size == PARAMS.itemsize, f"sizeof(bsfa::Params) {size} != host itemsize {PARAMS.itemsize}"
