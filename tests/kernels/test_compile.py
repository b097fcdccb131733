"""Compile checks of the CUDA kernels, without a GPU.

The Hopper forward (kernels_cu/bsfa_fwd_sm90.cu) is compiled for sm_90a in every specialisation
(dtype x head dim 64/128 x causal): zero spills, and no ptxas report of serialised wgmma (C7515),
which would silently cost most of its speed.

Every specialisation of kernels_cu/bsfa_fwd.cu (dtype x head dim x causal x
V order) is compiled with nvcc for sm_80 and sm_90 from the very source the
runtime hands to NVRTC (``bsfa_cupy._source.kernel_source``), and ptxas must
report zero spill bytes for both kernels: a spill in these kernels means local
memory traffic in the inner loop, i.e. a large slowdown that no CPU test sees.
The tuning knobs (BSFA_HEAVY_FIRST, BSFA_K_STAGES, BSFA_V_FORCED_EARLY,
BSFA_PV_UNROLL, BSFA_FAST_LOADS, BSFA_QK_PINGPONG, BSFA_PV_PINGPONG) are compiled in a covering set of combinations at hdim 64 and
128 (where register pressure is highest), alternating arch, dtype and causal.
"""

from __future__ import annotations

import concurrent.futures
import itertools
import os
import re
import shutil
import subprocess

import pytest

NVCC = shutil.which("nvcc")

pytestmark = [
    pytest.mark.nvcc,
    pytest.mark.skipif(NVCC is None, reason="nvcc is not on PATH: the kernel compile checks need the CUDA toolkit"),
]

ARCHS = ("sm_80", "sm_90")
DTYPES = (0, 1)  # BSFA_DTYPE: 0 = float16, 1 = bfloat16
HEAD_DIMS = (32, 64, 96, 128)
CAUSAL = (0, 1)
V_SPECULATIVE = (0, 1)
KERNELS = ("bsfa_fwd", "bsfa_block_max")

# Speculative V needs the two-stage K ring (the default is three stages).
SPEC_EXTRA = (("BSFA_K_STAGES", 2), ("BSFA_V_FORCED_EARLY", 0))

# Knob combinations beyond the defaults (K_STAGES=3, V_FORCED_EARLY=1,
# HEAVY_FIRST=1, PV_UNROLL=0): (BSFA_V_SPECULATIVE, extra macros).  Each is
# compiled at hdim 64 and 128, for sm_90 (float16, causal) and sm_80
# (bfloat16, non-causal).
KNOB_SETS = (
    (0, (("BSFA_K_STAGES", 2),)),
    (0, (("BSFA_V_FORCED_EARLY", 0),)),
    (0, (("BSFA_K_STAGES", 2), ("BSFA_V_FORCED_EARLY", 0), ("BSFA_HEAVY_FIRST", 0))),
    (0, (("BSFA_PV_UNROLL", 1),)),
    (0, (("BSFA_K_STAGES", 2), ("BSFA_PV_UNROLL", 1), ("BSFA_HEAVY_FIRST", 0))),
    (1, SPEC_EXTRA + (("BSFA_PV_UNROLL", 1), ("BSFA_HEAVY_FIRST", 0))),
    # The pre-v4 loops (checked loads, one-step QK^T / P V loops).
    (0, (("BSFA_FAST_LOADS", 0), ("BSFA_QK_PINGPONG", 0), ("BSFA_PV_PINGPONG", 0))),
    (0, (("BSFA_QK_PINGPONG", 0),)),
    (0, (("BSFA_PV_PINGPONG", 0), ("BSFA_K_STAGES", 2))),
    (1, SPEC_EXTRA + (("BSFA_FAST_LOADS", 0),)),
)
KNOB_SHAPES = (("sm_90", 0, 1), ("sm_80", 1, 0))  # (arch, dtype, causal)

VARIANTS = [(*v, SPEC_EXTRA if v[-1] else ()) for v in itertools.product(ARCHS, DTYPES, HEAD_DIMS, CAUSAL, V_SPECULATIVE)]
VARIANTS += [
    (arch, dtype, head_dim, causal, spec, extra)
    for spec, extra in KNOB_SETS
    for arch, dtype, causal in KNOB_SHAPES
    for head_dim in (64, 128)
]

# The runtime compiles with NVRTC and -std=c++17 (no --use_fast_math).
BASE_FLAGS = ("-std=c++17", "-Xptxas", "-v")

_FUNC_RE = re.compile(r"Function properties for (\S+)")
_SPILL_RE = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")


_KNOB_ABBREV = {
    "BSFA_HEAVY_FIRST": "heavy",
    "BSFA_K_STAGES": "k",
    "BSFA_V_FORCED_EARLY": "vforced",
    "BSFA_PV_UNROLL": "pvunroll",
    "BSFA_FAST_LOADS": "fastld",
    "BSFA_QK_PINGPONG": "qkpp",
    "BSFA_PV_PINGPONG": "pvpp",
}


SM90_FLAGS = ("-gencode=arch=compute_90a,code=sm_90a",)
SM90_VARIANTS = [(dtype, head_dim, causal) for dtype in DTYPES for head_dim in (64, 128) for causal in CAUSAL]


def _sm90_id(variant) -> str:
    dtype, head_dim, causal = variant
    return f"sm_90a-{('f16', 'bf16')[dtype]}-d{head_dim}-causal{causal}"


def _nvcc(source_path, out_dir, name, arch_flags, defines) -> subprocess.CompletedProcess:
    cmd = [NVCC, *BASE_FLAGS, *arch_flags, "-cubin", *defines, str(source_path)]
    cmd += ["-o", os.path.join(out_dir, name + ".cubin")]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600)


def _compile_sm90(source_path, out_dir, variant) -> subprocess.CompletedProcess:
    dtype, head_dim, causal = variant
    defines = [f"-DBSFA_DTYPE={dtype}", f"-DBSFA_HEAD_DIM={head_dim}", f"-DBSFA_CAUSAL={causal}"]
    return _nvcc(source_path, out_dir, _sm90_id(variant), SM90_FLAGS, defines)


def _variant_id(variant) -> str:
    arch, dtype, head_dim, causal, spec, extra = variant
    knobs = "".join(f"-{_KNOB_ABBREV[m]}{v}" for m, v in extra)
    return f"{arch}-{('f16', 'bf16')[dtype]}-d{head_dim}-causal{causal}-vspec{spec}{knobs}"


def _defines(dtype: int, head_dim: int, causal: int, spec: int, extra=()) -> list[str]:
    return [
        f"-DBSFA_DTYPE={dtype}",
        f"-DBSFA_HEAD_DIM={head_dim}",
        f"-DBSFA_CAUSAL={causal}",
        f"-DBSFA_V_SPECULATIVE={spec}",
        *(f"-D{m}={v}" for m, v in extra),
    ]


def _compile(source_path, out_dir, variant) -> subprocess.CompletedProcess:
    arch, dtype, head_dim, causal, spec, extra = variant
    defines = _defines(dtype, head_dim, causal, spec, extra)
    return _nvcc(source_path, out_dir, _variant_id(variant), (f"-arch={arch}",), defines)


def parse_spills(ptxas_log: str) -> dict[str, tuple[int, int, str]]:
    """Maps each function in a ``ptxas -v`` log to (spill store bytes, spill load bytes, the ptxas line)."""
    result: dict[str, tuple[int, int, str]] = {}
    current = None
    for line in ptxas_log.splitlines():
        m = _FUNC_RE.search(line)
        if m:
            current = m.group(1)
            continue
        m = _SPILL_RE.search(line)
        if m and current is not None:
            result[current] = (int(m.group(1)), int(m.group(2)), line.strip())
            current = None
    return result


def _runtime_source(tmp_path_factory, name):
    """The source NVRTC gets (headers inlined), written to a file for nvcc."""
    from bsfa_cupy._source import kernel_source

    src = kernel_source(name)
    path = tmp_path_factory.mktemp("bsfa_kernels") / name
    path.write_text(src)
    return src, path


@pytest.fixture(scope="module")
def fwd_source(tmp_path_factory):
    return _runtime_source(tmp_path_factory, "bsfa_fwd.cu")


@pytest.fixture(scope="module")
def sm90_source(tmp_path_factory):
    return _runtime_source(tmp_path_factory, "bsfa_fwd_sm90.cu")


@pytest.fixture(scope="module")
def compiled(fwd_source, sm90_source, tmp_path_factory):
    """Starts every variant's compile at once (nvcc is single-threaded); tests wait for their own."""
    _, path = fwd_source
    _, path90 = sm90_source
    out_dir = str(tmp_path_factory.mktemp("bsfa_cubins"))
    pool = concurrent.futures.ThreadPoolExecutor(max_workers=max(1, os.cpu_count() or 1))
    futures = {v: pool.submit(_compile, path, out_dir, v) for v in VARIANTS}
    futures.update({("sm90", v): pool.submit(_compile_sm90, path90, out_dir, v) for v in SM90_VARIANTS})
    yield futures
    pool.shutdown(wait=True, cancel_futures=True)


def test_parse_spills_reads_both_log_formats():
    nvcc_log = (
        "ptxas info    : Compiling entry function 'bsfa_fwd' for 'sm_80'\n"
        "ptxas info    : Function properties for bsfa_fwd\n"
        "    16 bytes stack frame, 16 bytes spill stores, 20 bytes spill loads\n"
        "ptxas info    : Used 255 registers, used 1 barriers\n"
    )
    nvrtc_log = (
        "ptxas info    : Function properties for bsfa_block_max\n"
        "ptxas         .     0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads\n"
    )
    assert parse_spills(nvcc_log)["bsfa_fwd"][:2] == (16, 20)
    assert parse_spills(nvrtc_log)["bsfa_block_max"][:2] == (0, 0)


def test_runtime_source_has_no_includes(fwd_source, sm90_source):
    """NVRTC gets no CUDA or system headers: local headers must all be inlined."""
    for name, (src, _) in (("bsfa_fwd.cu", fwd_source), ("bsfa_fwd_sm90.cu", sm90_source)):
        includes = [line for line in src.splitlines() if line.lstrip().startswith("#include")]
        assert not includes, f"kernel_source({name!r}) still has include lines: {includes}"


def _assert_compiled_without_spills(proc, name) -> str:
    """nvcc succeeded and ptxas reports 0 spill bytes for every kernel of KERNELS; returns the log."""
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"{name}: nvcc failed (exit {proc.returncode}):\n{log[-4000:]}"
    spills = parse_spills(log)
    for kernel in KERNELS:
        assert kernel in spills, f"{name}: no ptxas report for {kernel} (is it exported extern \"C\"?):\n{log[-4000:]}"
        stores, loads, line = spills[kernel]
        assert stores == 0 and loads == 0, f"{name}: {kernel} spills registers: {line}"
    return log


@pytest.mark.parametrize("variant", SM90_VARIANTS, ids=_sm90_id)
def test_sm90_compiles_without_spills_or_serialised_wgmma(compiled, variant):
    proc = compiled[("sm90", variant)].result()
    name = _sm90_id(variant)
    log = _assert_compiled_without_spills(proc, name)
    serialised = [ln for ln in log.splitlines() if "C7515" in ln or "serialized" in ln]
    assert not serialised, f"{name}: ptxas serialises the wgmma pipeline: {serialised}"


def test_sm90_unsupported_head_dim_is_a_compile_error(sm90_source, tmp_path):
    _, path = sm90_source
    cmd = [NVCC, *BASE_FLAGS, *SM90_FLAGS, "-cubin", "-DBSFA_DTYPE=0", "-DBSFA_HEAD_DIM=96", "-DBSFA_CAUSAL=1",
           str(path), "-o", str(tmp_path / "x.cubin")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode != 0
    assert "BSFA_HEAD_DIM" in proc.stdout + proc.stderr


@pytest.mark.parametrize("variant", VARIANTS, ids=_variant_id)
def test_compiles_without_spills(compiled, variant):
    _assert_compiled_without_spills(compiled[variant].result(), _variant_id(variant))


def test_unsupported_head_dim_is_a_compile_error(fwd_source, tmp_path):
    _, path = fwd_source
    cmd = [NVCC, *BASE_FLAGS, "-arch=sm_80", "-cubin", *_defines(0, 80, 0, 1), str(path), "-o", str(tmp_path / "x.cubin")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode != 0
    assert "BSFA_HEAD_DIM" in proc.stdout + proc.stderr


def test_k_stages_3_with_speculative_v_is_a_compile_error(fwd_source, tmp_path):
    _, path = fwd_source
    defines = _defines(0, 64, 0, 1, (("BSFA_K_STAGES", 3),))
    cmd = [NVCC, *BASE_FLAGS, "-arch=sm_80", "-cubin", *defines, str(path), "-o", str(tmp_path / "x.cubin")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode != 0
    assert "BSFA_K_STAGES" in proc.stdout + proc.stderr
