"""The package's rooms: the library core never imports the ``bsfa`` tools, and imports on its own."""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "bsfa_cupy"
#: ``python -m bsfa_cupy`` runs the command; ``import bsfa_cupy`` never loads this file.
ENTRY_SHIM = PACKAGE / "__main__.py"


def _imports(path: Path) -> list[str]:
    """Absolute module names a file imports (relative imports resolved against its package)."""
    tree = ast.parse(path.read_text(), str(path))
    pkg = ".".join(path.relative_to(ROOT).with_suffix("").parts[:-1])
    names = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = pkg.split(".")[: len(pkg.split(".")) - node.level + 1]
                base = ".".join(parent + ([base] if base else []))
            names += [base] + [f"{base}.{a.name}" for a in node.names]
    return names


def test_nothing_outside_the_tools_imports_them():
    core = [p for p in PACKAGE.rglob("*.py") if "tools" not in p.relative_to(PACKAGE).parts and p != ENTRY_SHIM]
    core += list((ROOT / "reference").rglob("*.py"))
    assert len(core) > 5, f"expected the core modules, found {core}"
    offenders = {str(p.relative_to(ROOT)): [n for n in _imports(p) if n.startswith("bsfa_cupy.tools")] for p in core}
    offenders = {k: v for k, v in offenders.items() if v}
    assert not offenders, f"core modules import the tools subpackage: {offenders}"


def test_core_imports_without_loading_tools_or_gpu_libraries():
    code = (
        "import sys, bsfa_cupy, bsfa_reference\n"
        "bad = sorted(m for m in sys.modules if m.startswith(('bsfa_cupy.tools', 'cupy', 'torch', 'jax', 'matplotlib')))\n"
        "print(bad)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True).stdout
    assert out.strip() == "[]", f"import bsfa_cupy loaded {out.strip()}"
