"""The CUDA sources ship inside the wheel as package data and are found from a non-editable install."""
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    out = tmp_path_factory.mktemp("wheel")
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--quiet", "-w", str(out), str(ROOT)],
        capture_output=True, text=True,
    )
    if proc.returncode != 0:
        pytest.fail(f"building the wheel failed (exit {proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    wheels = list(out.glob("bsfa_cupy-*.whl"))
    assert len(wheels) == 1, f"expected one wheel in {out}, got {wheels}"
    return wheels[0]


def test_wheel_holds_kernels_as_package_data(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    sources = sorted(p.name for p in (ROOT / "kernels_cu").iterdir() if p.suffix in (".cu", ".cuh"))
    assert sources, "no CUDA sources in kernels_cu/"
    for name in sources:
        assert f"bsfa_cupy/kernels_cu/{name}" in names, f"{name} missing from the wheel: {names}"
    top = {n.split("/")[0] for n in names}
    assert "kernels_cu" not in top and "reference" not in top, f"unexpected top-level packages: {sorted(top)}"
    assert "bsfa_reference" in top, f"bsfa_reference missing from the wheel: {sorted(top)}"


def test_installed_package_finds_kernel_sources(wheel, tmp_path):
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target", str(target), str(wheel)],
                   check=True, capture_output=True)
    code = (
        "import bsfa_cupy, bsfa_cupy._source as s; "
        "d = s.kernels_dir(); src = s.kernel_source('bsfa_fwd_sm80.cu') + s.kernel_source('bsfa_fwd_sm90.cu'); "
        "print(d); print(len(src)); print('#include \"' in src)"
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["PYTHONPATH"] = str(target)
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    kdir, length, has_include = proc.stdout.split()
    assert Path(kdir).resolve().is_relative_to(target.resolve()), f"sources found outside the install: {kdir}"
    assert int(length) > 1000, f"kernel source unexpectedly short: {length} chars"
    assert has_include == "False", "local #include lines were not inlined"
