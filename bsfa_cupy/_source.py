"""Locate the CUDA sources shipped as package data and fold their local headers in.

The compile cache hashes the source string it is given, not files it ``#include``s, so every
``#include "x.cuh"`` is inlined here: the compiled source is one self-contained string and a
header change always misses the cache.
"""
from __future__ import annotations

import functools
import re
import importlib.util
from pathlib import Path

#: A file every kernel includes: where it is, the sources are.
_MARKER = "bsfa_params.cuh"
_INCLUDE = re.compile(r'^\s*#\s*include\s+"([^"]+)"\s*$', re.MULTILINE)


def kernels_dir() -> Path:
    """Directory of the .cu/.cuh files: package data when installed, ``kernels_cu/`` in a checkout."""
    try:  # kernels_cu has no __init__.py: a namespace subpackage, found through its search path
        spec = importlib.util.find_spec("bsfa_cupy.kernels_cu")
    except ModuleNotFoundError:
        spec = None
    for location in (spec.submodule_search_locations or []) if spec else []:
        if (Path(location) / _MARKER).is_file():
            return Path(location)
    path = Path(__file__).resolve().parent.parent / "kernels_cu"
    if (path / _MARKER).is_file():
        return path
    raise FileNotFoundError(
        f"bsfa_cupy: CUDA sources not found (expected {_MARKER} as package data bsfa_cupy/kernels_cu "
        "or in kernels_cu/ of a source checkout); reinstall the package"
    )


@functools.cache
def kernel_source(name: str) -> str:
    """The text of ``kernels_cu/name`` with its local ``#include "..."`` lines inlined (once each)."""
    root = kernels_dir()
    seen: set[str] = set()

    def expand(fname: str) -> str:
        if fname in seen:
            return ""
        seen.add(fname)
        path = root / fname
        if not path.is_file():
            raise FileNotFoundError(f"bsfa_cupy: kernel source {fname!r} not found in {root}")
        text = path.read_text()
        return _INCLUDE.sub(lambda m: f"// ---- {m.group(1)} ----\n" + expand(m.group(1)), text)

    return expand(name)
