"""Where the harnesses write: output folders and files checked before any work, and result file names.

The checks raise ValueError with the option name first, so ``bsfa`` prints them as its one-line errors.
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Callable

_TAG = re.compile(r"[A-Za-z0-9._+-]*")


def slug(text: str) -> str:
    """A device name as a file-name part: runs of anything but letters and digits become one dash."""
    return re.sub(r"[^A-Za-z0-9]+", "-", text).strip("-")


def check_tag(tag: str, option: str = "--tag") -> str:
    """A tag goes into file names verbatim (dots included), so it may not hold a path separator."""
    if not _TAG.fullmatch(tag):
        raise ValueError(f"{option} {tag!r}: expected letters, digits and . _ + - only (it becomes part of file "
                         "names)")
    return tag


def result_stem(*parts: str, tag: str = "") -> str:
    """``part_part[_tag]``; callers append suffixes to it as text (Path.with_suffix would cut a dotted tag)."""
    return "_".join(parts) + (f"_{check_tag(tag, 'tag')}" if tag else "")


def write_result_files(out_dir, stem: str, result: dict, text: str, plot: Callable[[Path], list]) -> list[Path]:
    """``stem.json`` and ``stem.md`` in ``out_dir`` (created), then ``plot(out_dir / stem)``'s PNGs.

    Without matplotlib the plot's ImportError is reported and noted at the end of the markdown.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / f"{stem}.json", out / f"{stem}.md"]
    paths[0].write_text(json.dumps(result, indent=1) + "\n")
    try:
        paths += plot(out / stem)
    except ImportError as exc:
        print(f"PNG skipped: {exc}")
        text += f"\nPNG skipped: {exc}\n"
    paths[1].write_text(text)
    return paths


def check_out_dir(path, option: str = "--out") -> Path:
    """A results folder that exists and is writable, or that can be created under a writable folder."""
    p = Path(path)
    if p.exists():
        if not p.is_dir():
            raise ValueError(f"{option} {p}: not a folder")
        if not os.access(p, os.W_OK | os.X_OK):
            raise ValueError(f"{option} {p}: folder is not writable")
        return p
    ancestor = next((a for a in p.absolute().parents if a.exists()), None)
    if ancestor is None or not ancestor.is_dir():
        raise ValueError(f"{option} {p}: cannot create it, {ancestor} is not a folder")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise ValueError(f"{option} {p}: cannot create it, {ancestor} is not writable")
    return p


def check_out_file(path, option: str = "--out", inputs=()) -> Path:
    """An output file whose folder exists and is writable, that is not a folder and none of ``inputs``."""
    p = Path(path)
    if p.is_dir():
        raise ValueError(f"{option} {p}: is a folder; expected a file name")
    parent = p.parent
    if not parent.exists():
        raise ValueError(f"{option} {p}: no such folder {parent}")
    if not parent.is_dir():
        raise ValueError(f"{option} {p}: {parent} is not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ValueError(f"{option} {p}: folder {parent} is not writable")
    if p.exists() and not os.access(p, os.W_OK):
        raise ValueError(f"{option} {p}: file is not writable")
    for src in inputs:
        if same_file(p, src):
            raise ValueError(f"{option} {p}: is the input {src}, which writing would destroy; choose another file")
    return p


def same_file(a, b) -> bool:
    """Whether two paths name one file: through symlinks, ``..`` and hard links alike."""
    a, b = Path(a), Path(b)
    try:
        if a.exists() and b.exists() and os.path.samefile(a, b):
            return True
    except OSError:
        pass
    return a.resolve() == b.resolve()
