"""Compile checks of the CUDA kernels, without a GPU.

Every specialisation of the three kernel files is compiled with nvcc from the very source string the
runtime hands to NVRTC (``bsfa_cupy._source.kernel_source``, headers folded in):

* ``bsfa_fwd_sm80.cu`` (mma.sync) for sm_80 and sm_90: dtype x head dim 32/64/96/128 x causal;
* ``bsfa_fwd_sm90.cu`` (wgmma) and ``bsfa_fwd_sm90ws.cu`` (warp-specialised TMA + wgmma) for
  sm_90a: dtype x head dim 64/128 x causal, with ``-ftz=true`` as the runtime compiles them;
* ``bsfa_fwd_splitkv.cu`` (split-KV mma.sync: bsfa_fwd_split16, bsfa_fwd_split64, bsfa_fwd_split128,
  bsfa_combine)
  for sm_80 and sm_90: dtype x head dim 64/128 x causal.

For each, ptxas must report every entry point (bsfa_fwd, bsfa_fwd_varlen, bsfa_block_max) with
no stack frame and zero spill bytes (a spill in these kernels is local-memory traffic in the
inner loop: a large slowdown no CPU test sees), the compiler must print no warning (a dependent template call written without ``template`` parses as
a comparison and is silently dropped, with only a warning to show for it), the sm_90a build must
carry no ptxas report of serialised wgmma (C7514/C7515) or of an ignored setmaxnreg (C7508), and the cubin must export the launch globals.

The layout of kernels_cu/ is checked too: every file is reachable from the .cu files' include
trees, every header compiles on its own (it includes what it needs), the BSFA tile shape is
defined in bsfa_traits.cuh only, and the only specialisation macros are BSFA_DTYPE, BSFA_HEAD_DIM
and BSFA_CAUSAL.

Sized for a 2-core CI machine: two compiles at a time, about a minute in all.
"""

from __future__ import annotations

import concurrent.futures
import re
import shutil
import subprocess
from pathlib import Path

import pytest

NVCC = shutil.which("nvcc")
KERNELS_DIR = Path(__file__).resolve().parents[2] / "kernels_cu"

SM80_SOURCE = "bsfa_fwd_sm80.cu"
SM90_SOURCE = "bsfa_fwd_sm90.cu"
SM90WS_SOURCE = "bsfa_fwd_sm90ws.cu"
SPLITKV_SOURCE = "bsfa_fwd_splitkv.cu"
SOURCES = (SM80_SOURCE, SM90_SOURCE, SM90WS_SOURCE, SPLITKV_SOURCE)
KERNELS = ("bsfa_fwd", "bsfa_fwd_varlen", "bsfa_block_max")
#: Sources with entry points and launch globals of their own (not those of KERNELS / GLOBALS).
SOURCE_KERNELS = {SPLITKV_SOURCE: ("bsfa_fwd_split16", "bsfa_fwd_split64", "bsfa_fwd_split128", "bsfa_combine"),
                  SM90WS_SOURCE: (*KERNELS, "bsfa_fwd_dense", "bsfa_fwd_split", "bsfa_fwd_split_pack",
                                 "bsfa_fwd_split_dense", "bsfa_fwd_split_pack_dense", "bsfa_block_max_wide",
                                 "bsfa_fwd_lag", "bsfa_fwd_split_lag", "bsfa_fwd_headpair", "bsfa_fwd_split_headpair",
                                 "bsfa_combine")}
SOURCE_GLOBALS = {
    SPLITKV_SOURCE: ("BSFA_SPLIT16_THREADS", "BSFA_SPLIT16_SMEM_BYTES", "BSFA_SPLIT64_THREADS",
                     "BSFA_SPLIT64_SMEM_BYTES", "BSFA_SPLIT128_THREADS", "BSFA_SPLIT128_SMEM_BYTES",
                     "BSFA_COMBINE_WARPS", "BSFA_BLOCK_M", "BSFA_BLOCK_N"),
}
#: Entry points a source does not have (none today: every source exports all three).
MISSING_KERNELS: dict[str, tuple[str, ...]] = {}
#: Entries of head dim 128 only: the cluster entries (an even number of 64-column panels to share between two
#: CTAs).
CLUSTER_KERNELS = {SM90WS_SOURCE: ("bsfa_fwd_mc", "bsfa_fwd_dense_mc", "bsfa_block_max_mc",
                                   "bsfa_fwd_dense_pair")}
#: Entries of head dim 64 only, and the registers a thread of theirs gets at launch: bsfa_fwd_dense_wide's
#: 512 threads (three consumer warpgroups) leave 65536 / 512.
WIDE_KERNELS = {SM90WS_SOURCE: {"bsfa_fwd_dense_wide": 65536 // 512 // 8 * 8}}
GLOBALS = (
    "BSFA_FWD_THREADS",
    "BSFA_FWD_SMEM_BYTES",
    "BSFA_BLOCK_MAX_THREADS",
    "BSFA_BLOCK_MAX_SMEM_BYTES",
    "BSFA_BLOCK_M",
    "BSFA_BLOCK_N",
    "BSFA_GRID",
    "BSFA_FWD_TMA",
    "BSFA_BLOCK_MAX_TMA",
    "BSFA_FWD_VARLEN",
)
SOURCE_GLOBALS[SM90WS_SOURCE] = (*GLOBALS, "BSFA_COMBINE_WARPS", "BSFA_FWD_SPLIT_PACK_Q_BOX", "BSFA_FWD_MC",
                                 "BSFA_FWD_WIDE_THREADS", "BSFA_FWD_WIDE_SMEM_BYTES", "BSFA_FWD_WIDE_Q_BOX",
                                 "BSFA_FWD_LAG", "BSFA_FWD_LAG_THREADS", "BSFA_FWD_LAG_SMEM_BYTES",
                                 "BSFA_BLOCK_MAX_WIDE_THREADS", "BSFA_BLOCK_MAX_WIDE_SMEM_BYTES",
                                 "BSFA_BLOCK_MAX_WIDE_Q_BOX")
#: Registers a thread of every warp-specialised entry at launch: __launch_bounds__(384, 1) lets ptxas use
#: 65536 / 384 rounded down to a multiple of 8.
WS_LAUNCH_REGS = 65536 // 384 // 8 * 8
SPECIALISATION_MACROS = {"BSFA_DTYPE", "BSFA_HEAD_DIM", "BSFA_CAUSAL"}

DTYPES = (0, 1)  # BSFA_DTYPE: 0 = float16, 1 = bfloat16
CAUSAL = (0, 1)
# (source, target, nvcc target flags, head dims)
TARGETS = (
    (SM80_SOURCE, "sm_80", ("-arch=sm_80",), (32, 64, 96, 128)),
    (SM80_SOURCE, "sm_90", ("-arch=sm_90",), (32, 64, 96, 128)),
    (SM90_SOURCE, "sm_90a", ("-gencode=arch=compute_90a,code=sm_90a", "-ftz=true"), (64, 128)),
    (SM90WS_SOURCE, "sm_90a-ws", ("-gencode=arch=compute_90a,code=sm_90a", "-ftz=true"), (64, 128)),
    (SPLITKV_SOURCE, "sm_80-splitkv", ("-arch=sm_80",), (64, 128)),
    (SPLITKV_SOURCE, "sm_90-splitkv", ("-arch=sm_90",), (64, 128)),
)
VARIANTS = [
    (source, target, dtype, head_dim, causal)
    for source, target, _, head_dims in TARGETS
    for dtype in DTYPES
    for head_dim in head_dims
    for causal in CAUSAL
]
_TARGET_FLAGS = {target: flags for _, target, flags, _ in TARGETS}

# The runtime compiles with NVRTC and -std=c++17 (no --use_fast_math).
BASE_FLAGS = ("-std=c++17", "-Xptxas", "-v")
WORKERS = 2

_FUNC_RE = re.compile(r"Function properties for (\S+)")
_FRAME_RE = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_REGS_RE = re.compile(r"Used (\d+) registers")
_INCLUDE_RE = re.compile(r'^\s*#\s*include\s+"([^"]+)"', re.MULTILINE)
_CONDITIONAL_RE = re.compile(r"^\s*#\s*(?:if|ifdef|ifndef|elif)\b(.*)$", re.MULTILINE)

requires_nvcc = pytest.mark.skipif(NVCC is None, reason="nvcc is not on PATH: the kernel compile checks need the CUDA toolkit")


def _variant_id(variant) -> str:
    source, target, dtype, head_dim, causal = variant
    return f"{target}-{('f16', 'bf16')[dtype]}-d{head_dim}-causal{causal}"


def _defines(dtype: int, head_dim: int, causal: int) -> list[str]:
    return [f"-DBSFA_DTYPE={dtype}", f"-DBSFA_HEAD_DIM={head_dim}", f"-DBSFA_CAUSAL={causal}"]


def _per_function(ptxas_log: str, pattern: re.Pattern, value) -> dict:
    """Maps each function of a ``ptxas -v`` log to ``value(match, line)`` of the first line after its
    "Function properties" line that ``pattern`` matches."""
    result = {}
    current = None
    for line in ptxas_log.splitlines():
        m = _FUNC_RE.search(line)
        if m:
            current = m.group(1)
            continue
        m = pattern.search(line)
        if m and current is not None:
            result[current] = value(m, line)
            current = None
    return result


def parse_frames(ptxas_log: str) -> dict[str, tuple[int, int, int, str]]:
    """Maps each function of a ``ptxas -v`` log to (stack frame, spill store, spill load bytes, its line)."""
    return _per_function(ptxas_log, _FRAME_RE,
                         lambda m, line: (int(m.group(1)), int(m.group(2)), int(m.group(3)), line.strip()))


def parse_registers(ptxas_log: str) -> dict[str, int]:
    """Maps each function of a ``ptxas -v`` log to the registers per thread it is launched with."""
    return _per_function(ptxas_log, _REGS_RE, lambda m, line: int(m.group(1)))


def _includes(name: str) -> list[str]:
    return _INCLUDE_RE.findall((KERNELS_DIR / name).read_text())


def _include_tree(root: str) -> set[str]:
    seen: set[str] = set()
    todo = [root]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        todo.extend(_includes(name))
    return seen


def _kernel_files() -> list[str]:
    return sorted(p.name for p in KERNELS_DIR.iterdir() if p.suffix in (".cu", ".cuh"))


# ------------------------------------------------------------------ layout (no compiler needed)


def test_parse_frames_reads_both_log_formats():
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
    assert parse_frames(nvcc_log)["bsfa_fwd"][:3] == (16, 16, 20)
    assert parse_frames(nvrtc_log)["bsfa_block_max"][:3] == (0, 0, 0)
    assert parse_registers(nvcc_log) == {"bsfa_fwd": 255}


def test_every_kernel_file_is_in_an_include_tree():
    files = set(_kernel_files())
    reached = set().union(*(_include_tree(source) for source in SOURCES))
    missing = sorted(name for name in reached if not (KERNELS_DIR / name).is_file())
    assert not missing, f"included but not in kernels_cu/: {missing}"
    orphans = sorted(files - reached)
    assert not orphans, f"kernels_cu/ files that none of {SOURCES} includes: {orphans}"


def test_tile_shape_is_defined_once():
    shape = re.compile(r"\b(?:k?Block_?[MN]|BLOCK_[MN])\s*=\s*\d+", re.IGNORECASE)
    where = {name: shape.findall((KERNELS_DIR / name).read_text()) for name in _kernel_files()}
    assert sorted(where.pop("bsfa_traits.cuh")) == ["kBlockM = 128", "kBlockN = 64"]
    others = {name: found for name, found in where.items() if found}
    assert not others, f"the tile shape must come from bsfa_traits.cuh only: {others}"


def test_only_the_specialisation_macros_are_tested():
    for name in _kernel_files():
        for condition in _CONDITIONAL_RE.findall((KERNELS_DIR / name).read_text()):
            macros = set(re.findall(r"\bBSFA_\w+", condition))
            assert macros <= SPECIALISATION_MACROS, f"{name}: #if on {sorted(macros - SPECIALISATION_MACROS)}"


def test_every_kernel_file_says_what_it_is():
    for name in _kernel_files():
        text = (KERNELS_DIR / name).read_text()
        assert text.startswith("//"), f"{name} must open with a comment on its role"
        if name.endswith(".cuh"):
            assert "#pragma once" in text, f"{name} needs #pragma once"


# ------------------------------------------------------------------ compiles


@pytest.fixture(scope="module")
def runtime_sources(tmp_path_factory):
    """The sources NVRTC gets (headers folded in), written to files for nvcc."""
    from bsfa_cupy._source import kernel_source

    out = tmp_path_factory.mktemp("bsfa_kernels")
    sources = {}
    for name in SOURCES:
        text = kernel_source(name)
        (out / name).write_text(text)
        sources[name] = (text, out / name)
    return sources


def _nvcc(args, timeout=600) -> subprocess.CompletedProcess:
    return subprocess.run([NVCC, *args], capture_output=True, text=True, timeout=timeout)


def _compile_variant(runtime_sources, out_dir, variant) -> tuple[subprocess.CompletedProcess, Path]:
    source, target, dtype, head_dim, causal = variant
    cubin = Path(out_dir) / f"{_variant_id(variant)}.cubin"
    args = [*BASE_FLAGS, *_TARGET_FLAGS[target], "-cubin", *_defines(dtype, head_dim, causal)]
    return _nvcc([*args, str(runtime_sources[source][1]), "-o", str(cubin)]), cubin


def _compile_header(out_dir, header) -> subprocess.CompletedProcess:
    unit = Path(out_dir) / f"{header}.cu"
    unit.write_text(f'#include "{header}"\n')
    obj = Path(out_dir) / f"{header}.o"
    return _nvcc(["-std=c++17", "-arch=sm_90a", "-c", f"-I{KERNELS_DIR}", str(unit), "-o", str(obj)])


@pytest.fixture(scope="module")
def compiled(runtime_sources, tmp_path_factory):
    """Starts every compile at once on WORKERS threads (nvcc is single-threaded); tests wait for theirs."""
    out_dir = tmp_path_factory.mktemp("bsfa_cubins")
    pool = concurrent.futures.ThreadPoolExecutor(max_workers=WORKERS)
    futures = {v: pool.submit(_compile_variant, runtime_sources, out_dir, v) for v in VARIANTS}
    headers = [name for name in _kernel_files() if name.endswith(".cuh")]
    futures.update({("header", h): pool.submit(_compile_header, out_dir, h) for h in headers})
    yield futures
    pool.shutdown(wait=True, cancel_futures=True)


@pytest.mark.parametrize("name", SOURCES)
def test_runtime_source_has_no_includes(runtime_sources, name):
    """NVRTC gets no CUDA or system headers: local headers must all be folded in."""
    src, _ = runtime_sources[name]
    includes = [line for line in src.splitlines() if line.lstrip().startswith("#include")]
    assert not includes, f"kernel_source({name!r}) still has include lines: {includes}"


@pytest.mark.nvcc
@requires_nvcc
@pytest.mark.parametrize("variant", VARIANTS, ids=_variant_id)
def test_compiles_without_spills(compiled, variant):
    proc, cubin = compiled[variant].result()
    name = _variant_id(variant)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"{name}: nvcc failed (exit {proc.returncode}):\n{log[-4000:]}"
    # The folded source keeps each header's #pragma once; the host preprocessor notes them, harmlessly.
    warnings = [line for line in log.splitlines() if "warning" in line.lower() and "#pragma once in main file" not in line]
    assert not warnings, f"{name}: compiler warnings:\n" + "\n".join(warnings)
    frames = parse_frames(log)
    cluster = CLUSTER_KERNELS.get(variant[0], ()) if variant[3] % 128 == 0 else ()
    wide = WIDE_KERNELS.get(variant[0], {}) if variant[3] == 64 else {}
    for kernel in (*SOURCE_KERNELS.get(variant[0], KERNELS), *cluster, *wide):
        if kernel in MISSING_KERNELS.get(variant[0], ()):
            assert kernel not in frames, f"{name}: exports {kernel}: drop it from MISSING_KERNELS"
            continue
        assert kernel in frames, f"{name}: no ptxas report for {kernel} (is it exported extern \"C\"?):\n{log[-4000:]}"
        stack, stores, loads, line = frames[kernel]
        assert (stack, stores, loads) == (0, 0, 0), f"{name}: {kernel} uses a stack frame or spills: {line}"
    if variant[0] == SM90WS_SOURCE:
        # setmaxnreg hands the producer's registers to the consumers within the CTA's launch allocation,
        # which kernels_cu/bsfa_traits_sm90ws.cuh (kLaunchRegs) takes to be 384 threads x 168: with fewer, a
        # consumer's raise would wait forever.
        regs = parse_registers(log)
        for kernel in (*SOURCE_KERNELS[SM90WS_SOURCE], *cluster):
            if kernel != "bsfa_combine":
                assert regs.get(kernel) == WS_LAUNCH_REGS, (
                    f"{name}: {kernel} is launched with {regs.get(kernel)} registers a thread, expected {WS_LAUNCH_REGS}")
        for kernel, launch_regs in wide.items():
            assert regs.get(kernel) == launch_regs, (
                f"{name}: {kernel} is launched with {regs.get(kernel)} registers a thread, expected {launch_regs}")
    if variant[1].startswith("sm_90a"):
        serialised = [line for line in log.splitlines()
                      if any(code in line for code in ("C7514", "C7515", "C7520", "C7508")) or "serialized" in line]
        assert not serialised, f"{name}: ptxas serialises the wgmma pipeline: {serialised}"
    if variant[3] % 128 != 0:  # nor does a module without them export them
        assert not any(k.encode() + b"\0" in cubin.read_bytes() for k in CLUSTER_KERNELS.get(variant[0], ())), name
    if variant[3] != 64:
        assert not any(k.encode() + b"\0" in cubin.read_bytes() for k in WIDE_KERNELS.get(variant[0], {})), name
    image = cubin.read_bytes()
    for symbol in (*SOURCE_KERNELS.get(variant[0], KERNELS), *cluster, *wide, *SOURCE_GLOBALS.get(variant[0], GLOBALS)):
        if symbol in MISSING_KERNELS.get(variant[0], ()):
            continue
        assert symbol.encode() + b"\0" in image, f"{name}: the cubin exports no {symbol}"


@pytest.mark.nvcc
@requires_nvcc
@pytest.mark.parametrize("header", [n for n in _kernel_files() if n.endswith(".cuh")])
def test_header_compiles_on_its_own(compiled, header):
    proc = compiled[("header", header)].result()
    assert proc.returncode == 0, f"{header} does not include what it needs:\n{(proc.stdout + proc.stderr)[-4000:]}"


@pytest.mark.nvcc
@requires_nvcc
@pytest.mark.parametrize(
    ("source", "defines", "macro"),
    [
        (SM80_SOURCE, _defines(0, 80, 0), "BSFA_HEAD_DIM"),
        (SM90_SOURCE, _defines(0, 96, 1), "BSFA_HEAD_DIM"),
        (SM80_SOURCE, ["-DBSFA_DTYPE=2", "-DBSFA_HEAD_DIM=64", "-DBSFA_CAUSAL=0"], "BSFA_DTYPE"),
        (SM90_SOURCE, ["-DBSFA_DTYPE=0", "-DBSFA_HEAD_DIM=64"], "BSFA_CAUSAL"),
    ],
)
def test_bad_specialisation_is_a_clear_error(runtime_sources, source, defines, macro):
    proc = _nvcc(["-std=c++17", "-E", *defines, str(runtime_sources[source][1])], timeout=120)
    assert proc.returncode != 0
    errors = [line for line in proc.stderr.splitlines() if "#error" in line or "error" in line]
    assert any(macro in line for line in errors), f"expected an #error naming {macro}:\n{proc.stderr[-2000:]}"
