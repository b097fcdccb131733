"""The GPU API's behaviour that needs no GPU: import without CuPy, clear errors for host inputs."""
from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

import bsfa_cupy
from bsfa_cupy import _backend


def test_import_without_cupy_then_call_names_the_extra():
    code = (
        "import sys; sys.modules['cupy'] = None\n"
        "import bsfa_cupy, bsfa_cupy.ops\n"
        "try:\n"
        "    bsfa_cupy._backend.cupy()\n"
        "except ImportError as e:\n"
        "    print('IMPORTERROR', e)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "IMPORTERROR" in proc.stdout and "bsfa-cupy[cuda12]" in proc.stdout, proc.stdout


def test_numpy_inputs_get_a_clear_type_error():
    q = np.zeros((1, 8, 2, 64), np.float16)
    with pytest.raises(TypeError, match=r"host numpy.ndarray.*GPU"):
        bsfa_cupy.attention(q, q, q)
    with pytest.raises(TypeError, match=r"host numpy.ndarray"):
        bsfa_cupy.block_max_scores(q, q)


def test_unknown_inputs_get_a_type_error():
    with pytest.raises(TypeError, match="expected a CuPy, PyTorch or JAX GPU array"):
        bsfa_cupy.attention([1, 2], [1, 2], [1, 2])


def test_torch_cpu_tensor_is_rejected():
    torch = pytest.importorskip("torch")
    q = torch.zeros(1, 8, 2, 64, dtype=torch.float16)
    with pytest.raises(TypeError, match="CUDA tensor"):
        bsfa_cupy.attention(q, q, q)


def test_torch_requires_grad_is_rejected_before_anything_else():
    torch = pytest.importorskip("torch")
    q = torch.zeros(1, 8, 2, 64, requires_grad=True)
    with pytest.raises(ValueError, match="forward-only"):
        bsfa_cupy.attention(q, q.detach(), q.detach())


def test_has_gpu_is_a_bool():
    assert isinstance(_backend.has_gpu(), bool)


def test_specialisation_keys_are_distinct():
    from bsfa_cupy._kernels import VariantKey, all_variants

    keys = all_variants()
    assert len({k.name() for k in keys}) == len(keys) == 24
    assert len({k.options() for k in keys}) == len(keys)
    assert "-DBSFA_HEAD_DIM=128" in VariantKey("bfloat16", 128, True).options()


@pytest.mark.parametrize("cc", ["90", "80", "100"])
def test_launcher_uses_the_wgmma_kernel_only_on_hopper_head_dims_64_128(monkeypatch, cc):
    from bsfa_cupy import _kernels

    monkeypatch.setattr(_kernels, "compute_capability", lambda device_id: cc)
    for d in _kernels.HEAD_DIMS:
        key = _kernels.key_for("bfloat16", d, True, 0)
        assert key.sm90 == (cc == "90" and d in _kernels.SM90_HEAD_DIMS), f"cc {cc}, head dim {d}: {key.name()}"
        with _kernels.tuning(sm90=False):
            assert not _kernels.key_for("bfloat16", d, True, 0).sm90
    assert "-DBSFA_HEAD_DIM=128" in _kernels.VariantKey("float16", 128, False, sm90=True).options()


def test_device_thresholds_refuse_a_scalar_before_needing_cupy():
    with pytest.raises(TypeError, match="scalar needs no device copy"):
        bsfa_cupy.DeviceThresholds(0.5)


def test_launch_grids_and_their_limits():
    from bsfa_cupy._kernels import Kernel
    from bsfa_cupy.ops import _check_grid

    per_head, chunked = Kernel(None, 128, 0), Kernel(None, 128, 0, chunked_grid=True)
    assert per_head.grid(2, 32, 128) == (128, 32, 2)
    assert chunked.grid(2, 32, 128) == (4, 128, 16)
    assert chunked.grid(3, 2, 5) == (2, 5, 3)
    assert chunked.grid(1, 5, 7) == (1, 7, 5)
    assert chunked.grid(40000, 8, 2) == (5, 2, 64000)  # chunks widen until gridDim.z fits
    assert chunked.grid(65537, 3, 2) == (65537, 2, 3)
    _check_grid(65535, 65535, 65535)
    with pytest.raises(ValueError, match=r"at most 65535 query tiles .* got 65536 query tiles, B=1, Hq=8"):
        _check_grid(1, 8, 65536)
    with pytest.raises(ValueError, match=r"got 1 query tiles, B=1, Hq=65536"):
        _check_grid(1, 65536, 1)
