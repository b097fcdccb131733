"""Where the harnesses write: the current directory by default, file names that keep the whole tag,
and no path of the source checkout (``bench/``) anywhere in the installable package."""
from __future__ import annotations

import inspect
import io
import tokenize
from pathlib import Path

from bsfa_cupy.tools import accuracy, benchmark

PACKAGE = Path(__file__).resolve().parents[2] / "bsfa_cupy"


def _strings(path):
    """Every string literal of a module, docstrings and f-string pieces included."""
    kinds = {tokenize.STRING} | {getattr(tokenize, n) for n in ("FSTRING_MIDDLE",) if hasattr(tokenize, n)}
    for tok in tokenize.generate_tokens(io.StringIO(path.read_text()).readline):
        if tok.type in kinds:
            yield tok.start[0], tok.string


def test_no_string_in_the_package_names_the_checkouts_bench_folder():
    hits = [f"{p.relative_to(PACKAGE.parent)}:{line}" for p in sorted(PACKAGE.rglob("*.py"))
            for line, text in _strings(p) if "bench/" in text]
    assert not hits, f"the installed package would write into or point at bench/: {hits}"


def test_the_tools_never_mention_the_bench_folder():
    hits = [f"{p.name}:{i}" for p in sorted((PACKAGE / "tools").rglob("*.py"))
            for i, line in enumerate(p.read_text().splitlines(), 1) if "bench/" in line]
    assert not hits, hits


def test_library_entry_points_write_to_the_current_directory_by_default():
    for fn in (benchmark.run, benchmark.write_results, accuracy.run, accuracy.write_results):
        assert inspect.signature(fn).parameters["out_dir"].default == ".", fn.__qualname__


def test_benchmark_tags_keep_their_dots(tmp_path):
    result = {"gpu": "NVIDIA H200", "date": "2025-01-01", "rows": []}
    first = benchmark.write_results(result, tmp_path, tag="v1.2")
    second = benchmark.write_results(result, tmp_path, tag="v1.3")
    assert [p.name for p in first] == ["NVIDIA-H200_2025-01-01_v1.2.json", "NVIDIA-H200_2025-01-01_v1.2.md"]
    assert [p.name for p in second] == ["NVIDIA-H200_2025-01-01_v1.3.json", "NVIDIA-H200_2025-01-01_v1.3.md"]
    assert all(p.is_file() for p in first + second)


def test_causal_tile_sets_equal_the_mask_reduction():
    """The harnesses' densities come from the tile grid; the (n, n) mask they replace gives the same sets."""
    from bsfa_cupy.tools.tiles import causal_tiles
    from bsfa_reference.tiles import diagonal_tiles, tile_reduce_any, valid_mask

    for n in (1, 5, 63, 64, 65, 127, 128, 129, 200, 300, 1000, 1027):
        valid, gated = causal_tiles(n, 128, 64)
        want = tile_reduce_any(valid_mask(n, n, True), 128, 64)
        assert (valid == want).all(), n
        assert (gated == (want & ~diagonal_tiles(n, n, 128, 64))).all(), n
