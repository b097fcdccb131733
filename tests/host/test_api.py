"""The GPU API's behaviour that needs no GPU: import without CuPy, clear errors for host inputs."""
from __future__ import annotations

import dataclasses
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
    from bsfa_cupy._variants import VariantKey, all_variants

    keys = all_variants()
    # 16 mma.sync + 8 wgmma + 8 warp-specialised + 8 split-KV
    assert len({k.name() for k in keys}) == len(keys) == 40
    assert len({(k.source, k.defines()) for k in keys}) == len(keys)
    assert "-DBSFA_HEAD_DIM=128" in VariantKey("bfloat16", 128, True, "sm90").defines()
    with pytest.raises(ValueError, match=r"the sm90 kernel takes \(64, 128\), got 96"):
        VariantKey("float16", 96, True, "sm90")


@pytest.mark.parametrize("cc", ["90", "80", "100"])
def test_auto_backend_uses_the_wgmma_kernel_only_on_hopper_head_dims_64_128(cc):
    from bsfa_cupy._variants import HEAD_DIMS, Backend, select

    for d in HEAD_DIMS:
        hopper = cc == "90" and d in (64, 128)
        key = select(Backend(), "bfloat16", d, True, cc)
        assert (key.arch == "sm90ws") == hopper, f"cc {cc}, head dim {d}: {key.name()}"
        # Without cuda-bindings (no tensor maps) auto takes the one-warpgroup wgmma kernel.
        assert (select(Backend(), "bfloat16", d, True, cc, tma=False).arch == "sm90") == hopper
        assert select(Backend("sm80"), "bfloat16", d, True, cc).arch == "sm80"


def test_explicit_backends_refuse_what_they_cannot_run():
    from bsfa_cupy._variants import Backend, as_backend, select

    with pytest.raises(ValueError, match=r"backend 'sm90': .* compute capability 9.0 .* got 8.0"):
        select(Backend("sm90"), "float16", 128, True, "80")
    with pytest.raises(ValueError, match=r"backend 'sm90': expected head_dim in \(64, 128\), got 32"):
        select(Backend("sm90"), "float16", 32, True, "90")
    with pytest.raises(ValueError, match=r"backend 'sm90ws': .* compute capability 9.0 .* got 8.0"):
        select(Backend("sm90ws"), "float16", 128, True, "80")
    assert select(Backend("sm90ws"), "float16", 64, False, "90").source == "bsfa_fwd_sm90ws.cu"
    with pytest.raises(ValueError, match=r"compute capability >= 8.0, got 7.5"):
        select(Backend(), "float16", 64, True, "75")
    with pytest.raises(ValueError, match=r"expected 'auto', 'sm80', 'sm90', 'sm90ws' or 'splitkv', got 'fa3'"):
        Backend("fa3")
    with pytest.raises(ValueError, match=r"macro names other than .* got 'BSFA_HEAD_DIM'"):
        Backend("sm90", {"BSFA_HEAD_DIM": 64})
    with pytest.raises(ValueError, match=r"BSFA_X: expected a number or identifier, got '1; rm'"):
        Backend("sm90", {"BSFA_X": "1; rm"})
    assert Backend("sm90", {"B": 1, "A": True}).options() == ("-DA=1", "-DB=1")
    with pytest.raises(TypeError, match="backend: expected 'auto', 'sm80', 'sm90', 'sm90ws', 'splitkv' or a bsfa_cupy.Backend, got int"):
        as_backend(90)


def test_device_thresholds_refuse_a_scalar_before_needing_cupy():
    with pytest.raises(TypeError, match="scalar needs no device copy"):
        bsfa_cupy.DeviceThresholds(0.5)


def test_launch_grids_and_their_limits():
    from bsfa_cupy._launch import GRID_CHUNKED, GRID_PER_HEAD, GRID_PERSISTENT, check_grid, grid

    assert grid(GRID_PER_HEAD, 2, 32, 128) == (128, 32, 2)
    assert grid(GRID_CHUNKED, 2, 32, 128) == (4, 128, 16)
    assert grid(GRID_CHUNKED, 3, 2, 5) == (2, 5, 3)
    assert grid(GRID_CHUNKED, 1, 5, 7) == (1, 7, 5)
    assert grid(GRID_CHUNKED, 40000, 8, 2) == (5, 2, 64000)  # chunks widen until gridDim.z fits
    assert grid(GRID_CHUNKED, 65537, 3, 2) == (65537, 2, 3)
    with pytest.raises(ValueError, match="BSFA_GRID: expected 0, 1 or 2, got 7"):
        grid(7, 1, 1, 1)
    assert grid(GRID_PERSISTENT, 1, 32, 128, sms=132) == (132, 1, 1)
    assert grid(GRID_PERSISTENT, 1, 2, 3, sms=132) == (6, 1, 1)  # fewer tiles than SMs: one CTA each
    with pytest.raises(ValueError, match=r"at most 2147483647 work tiles .* got 65535 \* 65535 \* 2"):
        grid(GRID_PERSISTENT, 65535, 2, 65535, sms=132)
    check_grid(65535, 65535, 65535, 128)
    with pytest.raises(ValueError, match=r"at most 65535 query tiles .* got 65536 query tiles, B=1, Hq=8"):
        check_grid(1, 8, 65536, 128)
    with pytest.raises(ValueError, match=r"got 1 query tiles, B=1, Hq=65536"):
        check_grid(1, 65536, 1, 128)


def test_cluster_entries_walk_pairs_of_heads_on_whole_clusters():
    from bsfa_cupy._kernels import Kernel
    from bsfa_cupy._launch import GRID_PERSISTENT

    # cluster_slots: what the driver's occupancy query found resident (asked on the GPU, given here)
    k = Kernel(fn=None, threads=384, smem=0, grid_kind=GRID_PERSISTENT, sms=132, cluster=2, cluster_slots=66)
    assert k.grid(1, 32, 128) == (132, 1, 1)  # 66 clusters, one CTA per SM
    assert k.grid(1, 2, 3) == (6, 1, 1)  # 3 head-pair tiles: a cluster each
    k64 = Kernel(fn=None, threads=384, smem=0, grid_kind=GRID_PERSISTENT, sms=132, cluster=2, cluster_slots=64)
    assert k64.grid(2, 8, 64) == (128, 1, 1)  # only 64 clusters resident: a grid of 64
    with pytest.raises(ValueError, match="query heads 2 at a time, got Hq=3"):
        k.grid(1, 3, 8)
    # bsfa_fwd_dense_pair: a cluster takes two query tiles of one head, any head count
    pair = Kernel(fn=None, threads=384, smem=0, grid_kind=GRID_PERSISTENT, sms=132, cluster=2, cluster_slots=66,
                  pair_tiles=True)
    assert pair.grid(1, 3, 9) == (30, 1, 1)  # 5 tile pairs (the last one a lone tile) x 3 heads
    assert pair.grid(1, 1, 1) == (2, 1, 1)
    assert pair.grid(1, 32, 128) == (132, 1, 1)


def test_a_clustered_module_loads_its_cluster_entries_once_into_the_plain_places(monkeypatch):
    from bsfa_cupy import _kernels
    from bsfa_cupy._kernels import Kernel, Module
    from bsfa_cupy._variants import VariantKey

    exported = {"BSFA_FWD_MC": 2}
    loads = []
    monkeypatch.setattr(_kernels, "_read_int", lambda raw, symbol: exported[symbol])

    def load(raw, name, prefix, grid_kind, sms, tma, n_maps, cluster=1):
        loads.append(name)
        return Kernel(fn=name, threads=384, smem=0, grid_kind=grid_kind, sms=sms, tma=tma, cluster=cluster)

    monkeypatch.setattr(_kernels, "_kernel", load)
    plain = Kernel(fn="plain", threads=384, smem=0, grid_kind=2, sms=132, tma=128)

    def module(arch):
        return Module(key=VariantKey("float16", 128, True, arch), defines=(), fwd=plain, fwd_varlen="varlen",
                      block_max=plain, raw=None, fwd_dense=plain, fwd_split="split")

    assert module("sm90").clustered().fwd is plain  # no cluster entries outside sm90ws
    mod = module("sm90ws")
    mc = mod.clustered()
    assert (mc.forward(True).fn, mc.forward(False).fn, mc.block_max.fn) == (
        "bsfa_fwd_mc", "bsfa_fwd_dense_mc", "bsfa_block_max_mc")
    assert (mc.fwd.cluster, mc.fwd_varlen, mc.fwd_split) == (2, "varlen", "split")
    assert (mc.fwd_dense_pair.fn, mc.fwd_dense_pair.cluster, mc.fwd_dense_pair.pair_tiles) == (
        "bsfa_fwd_dense_pair", 2, True)
    assert mod.clustered() is mc and len(loads) == 4  # loaded at the first call only
    # dense calls whose GQA groups pair up take the cluster entry; calls with thresholds and odd groups do not
    assert mod.forward(False, 4).fn == "bsfa_fwd_dense_mc"
    assert mod.forward(False, 1) is plain and mod.forward(False, 3) is plain and mod.forward(True, 4) is plain
    assert dataclasses.replace(mod, dense_clusters=False).forward(False, 4) is plain
    # long dense calls of odd groups take the tile-pair entry, causal or not; shorter or gated ones do not
    long = _kernels.PAIR_MIN_Q_TILES
    assert [mod.forward(False, g, long).fn for g in (1, 3)] == ["bsfa_fwd_dense_pair"] * 2
    assert mod.forward(False, 4, long).fn == "bsfa_fwd_dense_mc"
    assert mod.forward(False, 1, long - 1) is plain and mod.forward(True, 1, long) is plain
    assert dataclasses.replace(mod, dense_clusters=False).forward(False, 1, long) is plain
    acausal = dataclasses.replace(mod, key=VariantKey("float16", 128, False, "sm90ws"), _clustered=None)
    assert acausal.forward(False, 1, long).fn == "bsfa_fwd_dense_pair" and acausal.forward(False, 1, long - 1) is plain
    # head dim 64: dense calls without keep take the 192-row entry, any group; with keep, or gated, they do not
    wide = Kernel(fn="wide", threads=512, smem=0, grid_kind=2, sms=132, tma=128, q_box=192)
    d64 = dataclasses.replace(module("sm90ws"), key=VariantKey("float16", 64, True, "sm90ws"), fwd_dense_wide=wide)
    exported["BSFA_FWD_MC"] = 0
    few = _kernels.WIDE_MIN_Q_TILES
    assert [d64.forward(False, g, q).fn for g, q in ((1, few), (4, 300))] == ["wide", "wide"]
    assert d64.forward(False, 1, few - 1) is plain  # short calls: the last 192-row tile would be mostly empty
    assert d64.forward(False, 4, 300, keep=True) is plain and d64.forward(True, 4, 300) is plain
    assert d64.wide_rows(False).forward(False, 4, 300) is plain
    assert d64.wide_rows().forward(False, 4, 300, keep=True) is wide and d64.wide_rows().fwd is plain
    assert module("sm90ws").wide_rows().fwd_dense is plain  # no wide entry: itself
    assert wide.box_rows() == (192, 128, 128) and plain.box_rows() == (128, 128, 128)
    # narrow_block_max(): block_max_scores on bsfa_block_max (128-row boxes of q) where the module has moved it
    # to bsfa_block_max_wide (256-row ones)
    bmw = Kernel(fn="bmw", threads=384, smem=0, grid_kind=2, sms=132, tma=128, q_box=256)
    with_bmw = dataclasses.replace(module("sm90ws"), block_max=bmw, block_max_narrow=plain)
    narrow = with_bmw.narrow_block_max()
    assert narrow.block_max is plain and narrow.narrow_block_max().block_max is plain
    assert module("sm90ws").narrow_block_max().block_max is plain and bmw.box_rows()[:2] == (256, 128)
    # unlagged(): calls with thresholds on bsfa_fwd where the module sends them to bsfa_fwd_lag; dense ones keep theirs
    lag = Kernel(fn="lag", threads=384, smem=0, grid_kind=2, sms=132, tma=128)
    with_lag = dataclasses.replace(module("sm90ws"), fwd=lag, fwd_unlagged=plain)
    assert with_lag.forward(True, 4) is lag and with_lag.forward(False, 1) is plain
    assert with_lag.unlagged().forward(True, 4) is plain and with_lag.unlagged().unlagged().fwd is plain
    assert module("sm90ws").unlagged().fwd is plain
    # split calls with thresholds, one head a tile and no keep take bsfa_fwd_split_lag; unlagged() drops it
    sl, sp, sd, spd = (Kernel(fn=n, threads=384, smem=0, grid_kind=2, sms=132, tma=128)
                       for n in ("split_lag", "split_pack", "split_dense", "split_pack_dense"))
    split_mod = dataclasses.replace(with_lag, fwd_split=plain, fwd_split_lag=sl, fwd_split_pack=sp,
                                    fwd_split_dense=sd, fwd_split_pack_dense=spd)
    assert [split_mod.split_entry(pack, gated) for pack, gated in ((False, True), (False, False), (True, True),
                                                                  (True, False))] == [sl, sd, sp, spd]
    assert split_mod.split_entry(False, True, keep=True) is plain  # the lagged split entry writes no keep
    assert split_mod.unlagged().split_entry(False, True) is plain
    exported["BSFA_FWD_MC"] = 2
    assert with_lag.clustered().fwd_unlagged is None  # the cluster entries have no unlagged twins
    # calls with thresholds of even GQA groups take bsfa_fwd_headpair (q boxes of 128 rows, k and v of 64, a CTA per
    # head pair); head_pairs(False), unlagged() and clustered() take them off it, head_pairs(dense=True) adds the
    # dense calls of even groups
    hp = Kernel(fn="hp", threads=384, smem=0, grid_kind=2, sms=132, tma=64, q_box=128, head_pairs=True)
    with_hp = dataclasses.replace(with_lag, fwd_headpair=hp)
    assert [with_hp.forward(True, g) for g in (2, 4, 1, 3)] == [hp, hp, lag, lag]
    assert with_hp.forward(False, 4) is not hp and with_hp.forward(False, 1) is plain
    assert with_hp.head_pairs(False).forward(True, 4) is lag and with_hp.unlagged().forward(True, 4) is plain
    assert [with_hp.head_pairs(dense=True).forward(False, g) for g in (2, 1)] == [hp, plain]
    assert with_hp.clustered().forward(True, 4).fn == "bsfa_fwd_mc"
    assert module("sm90ws").head_pairs().forward(True, 4) is plain  # no head-pair entry: itself
    # split calls: with thresholds, the plan's head pairs take bsfa_fwd_split_headpair while the module routes them
    sh = Kernel(fn="split_hp", threads=384, smem=0, grid_kind=2, sms=132, tma=64, q_box=128, head_pairs=True)
    with_sh = dataclasses.replace(with_hp, fwd_split_headpair=sh, fwd_split=plain)
    assert with_sh.split_head_pairs(True) and not with_sh.split_head_pairs(False)
    assert not with_sh.head_pairs(False).split_head_pairs(True) and not with_sh.unlagged().split_head_pairs(True)
    assert with_sh.split_entry(True, True, head_pairs=True) is sh and not with_hp.split_head_pairs(True)
    assert hp.box_rows() == (128, 64, 64) and hp.grid(1, 32, 128) == (132, 1, 1) and hp.grid(2, 4, 3) == (12, 1, 1)
    with pytest.raises(ValueError, match="two at a time"):
        hp.grid(1, 3, 1)
    # tile_pairs(): every dense call, any group, on the tile-pair entry; calls with thresholds keep the plain one
    tp = mod.tile_pairs()
    assert [tp.forward(False, g).fn for g in (1, 3, 4)] == ["bsfa_fwd_dense_pair"] * 3
    assert tp.forward(True, 4) is plain and mod.forward(False, 1) is plain
    assert mod.fwd is plain  # the module calls run keeps its plain entries
    exported["BSFA_FWD_MC"] = 0  # head dim 64: none
    assert module("sm90ws").clustered().fwd is plain
    assert module("sm90ws").forward(False, 4) is plain
    none = module("sm90ws")
    assert none.tile_pairs() is none


def test_params_packing_takes_pointers_and_refuses_unknown_fields():
    from bsfa_cupy._launch import PARAMS, pack

    class Dev:  # the shape of a CuPy array's data pointer
        class data:
            ptr = 0x7F00

    rec = pack(q=Dev(), keep=None, Nq=5, softmax_scale=0.5)
    assert rec["q"] == 0x7F00 and rec["keep"] == 0 and rec["Nq"] == 5 and rec["softmax_scale"] == np.float32(0.5)
    assert rec.dtype == PARAMS and PARAMS.itemsize % 8 == 0
    with pytest.raises(TypeError, match=r"no field\(s\) \['q_stride'\]"):
        pack(q_stride=1)
