"""The README's Python examples run as written (on a GPU machine)."""
import re
from pathlib import Path

import pytest

from tests.support.gpu import requires_gpu

README = Path(__file__).resolve().parents[2] / "README.md"
# Every Python block that starts with an import is a complete example; others are fragments of one.
BLOCKS = [b for b in re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S) if b.startswith("import")]


def test_readme_has_python_examples():
    assert len(BLOCKS) >= 2, f"expected a CuPy and a torch example in the README, found {len(BLOCKS)} blocks"


@pytest.mark.gpu
@requires_gpu
@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_readme_example_runs(index, capsys):
    code = BLOCKS[index]
    if "import torch" in code:
        torch = pytest.importorskip("torch")
        if not torch.cuda.is_available():
            pytest.skip("torch without CUDA")
    namespace = {"__name__": f"readme_example_{index}"}
    exec(compile(code, f"README.md[python block {index}]", "exec"), namespace)
    if "out" in namespace and hasattr(namespace["out"], "shape"):
        assert namespace["out"].shape == namespace["q"].shape
