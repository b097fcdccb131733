"""AttentionPlan without a GPU: construction refuses what attention refuses (same errors), run's checks name
what was expected and what came, refuse before any launch, bind only pointers and never go through DLPack."""
from __future__ import annotations

import types

import numpy as np
import pytest

import bsfa_cupy
from bsfa_cupy import _arrays, _launch, _splitkv, plan as plan_mod
from bsfa_cupy.plan import AttentionPlan, _ParamsTemplate, _Spec

HOST = np.zeros((1, 8, 2, 64), np.float16)


def _error(fn):
    with pytest.raises(Exception) as info:
        fn()
    return type(info.value), str(info.value)


@pytest.mark.parametrize("args,kw", [
    ((HOST, HOST, HOST), dict(q_start=64)),
    ((HOST, HOST, HOST), dict(k_start=32)),
    ((HOST, HOST, HOST), dict(q_start=-128)),
    ((HOST, HOST, HOST), dict(k_start=True)),
    ((HOST, HOST, HOST), dict(q_start=128.0)),
    ((HOST, HOST, HOST), dict(num_splits=0)),
    ((HOST, HOST, HOST), dict(num_splits=1.5)),
    ((HOST, HOST, HOST), dict(num_splits=2, backend="sm90ws")),
    ((HOST, HOST, HOST), dict(backend="fa3")),
    ((HOST, HOST, HOST), dict(backend=90)),
    ((HOST, HOST, HOST), {}),  # host arrays: the clear TypeError
    (([1], [1], [1]), {}),
])
def test_construction_errors_are_attentions(args, kw):
    assert _error(lambda: AttentionPlan(*args, **kw)) == _error(lambda: bsfa_cupy.attention(*args, **kw))


def test_torch_cpu_and_requires_grad_errors_are_attentions():
    torch = pytest.importorskip("torch")
    cpu = torch.zeros(1, 8, 2, 64, dtype=torch.float16)
    assert _error(lambda: AttentionPlan(cpu, cpu, cpu)) == _error(lambda: bsfa_cupy.attention(cpu, cpu, cpu))
    g = torch.zeros(1, 8, 2, 64, requires_grad=True)
    assert _error(lambda: AttentionPlan(g, cpu, cpu)) == _error(lambda: bsfa_cupy.attention(g, cpu, cpu))


class _JaxLike:
    pass


_JaxLike.__module__ = "jaxlib.xla_extension"


def test_jax_inputs_are_sent_to_attention():
    with pytest.raises(TypeError, match=r"for JAX arrays call bsfa_cupy.attention"):
        AttentionPlan(_JaxLike(), _JaxLike(), _JaxLike())


# --- run's checks, on stand-ins shaped like torch tensors and CuPy arrays --------------------------------

class FakeTensor:
    """The attributes run reads off a torch tensor."""

    def __init__(self, shape, stride=None, dtype="float16", device="cuda:0", ptr=0x7F0000000000):
        self.shape = tuple(shape)
        if stride is None:
            stride = tuple(int(np.prod(shape[i + 1:])) for i in range(len(shape)))
        self._stride, self.dtype, self.device, self._ptr = tuple(stride), dtype, device, ptr
        self.requires_grad = False

    def stride(self):
        return self._stride

    def data_ptr(self):
        return self._ptr


class FakeCupy:
    """The attributes run reads off a CuPy array (strides in bytes, device.id, data.ptr)."""

    def __init__(self, shape, strides=None, dtype=np.dtype(np.float16), device=0, ptr=0x7F0000000000):
        self.shape = tuple(shape)
        if strides is None:
            strides = tuple(int(np.prod(shape[i + 1:])) * dtype.itemsize for i in range(len(shape)))
        self.strides, self.dtype = tuple(strides), dtype
        self.device = types.SimpleNamespace(id=device)
        self.data = types.SimpleNamespace(ptr=ptr)


def _torch_spec(name="q", shape=(1, 1, 32, 128), **kw):
    x = FakeTensor(shape, **kw)
    return _Spec(name, "torch", FakeTensor, plan_mod._torch_layout(x), True), x


def test_a_matching_array_gives_its_pointer():
    spec, x = _torch_spec()
    assert spec.pointer(FakeTensor((1, 1, 32, 128), ptr=0x7F0000000010)) == 0x7F0000000010
    c = FakeCupy((1, 1, 32, 128))
    cspec = _Spec("k", "cupy", FakeCupy, plan_mod._cupy_layout(c), True)
    assert cspec.pointer(FakeCupy((1, 1, 32, 128), ptr=0x1000)) == 0x1000


@pytest.mark.parametrize("got,exc,message", [
    (FakeTensor((1, 2, 32, 128)), ValueError,
     r"q: does not match the plan: shape: expected \(1, 1, 32, 128\), got \(1, 2, 32, 128\); "
     r"strides \(elements\): expected \(4096, 4096, 128, 1\), got \(8192, 4096, 128, 1\)"),
    (FakeTensor((1, 1, 32, 128), stride=(4096, 4096, 256, 1)), ValueError,
     r"strides \(elements\): expected \(4096, 4096, 128, 1\), got \(4096, 4096, 256, 1\)"),
    (FakeTensor((1, 1, 32, 128), dtype="bfloat16"), TypeError, r"dtype: expected float16, got bfloat16"),
    (FakeTensor((1, 1, 32, 128), device="cuda:1"), ValueError, r"device: expected cuda:0, got cuda:1"),
    (FakeTensor((1, 1, 32, 128), ptr=0x7F0000000008), ValueError,
     r"q: rows must start on 16-byte boundaries, got data pointer 0x7f0000000008"),
    (FakeCupy((1, 1, 32, 128)), TypeError,
     r"q: expected a .*FakeTensor like the plan's example arrays, got .*FakeCupy .*for JAX arrays call "
     r"bsfa_cupy.attention"),
])
def test_mismatches_name_what_was_expected_and_what_came(got, exc, message):
    spec, _ = _torch_spec()
    with pytest.raises(exc, match=message):
        spec.pointer(got)


def test_cupy_mismatches_are_in_bytes_and_device_ids():
    c = FakeCupy((1, 1, 32, 128))
    spec = _Spec("v", "cupy", FakeCupy, plan_mod._cupy_layout(c), True)
    with pytest.raises(ValueError, match=r"v: .*strides \(bytes\): expected \(8192, 8192, 256, 2\), got "
                                         r"\(8192, 8192, 512, 2\); device: expected cuda:0, got cuda:1"):
        spec.pointer(FakeCupy((1, 1, 32, 128), strides=(8192, 8192, 512, 2), device=1))


def test_empty_arrays_skip_the_alignment_check():
    x = FakeTensor((1, 0, 32, 128), ptr=0)
    spec = _Spec("q", "torch", FakeTensor, plan_mod._torch_layout(x), False)
    assert spec.pointer(FakeTensor((1, 0, 32, 128), ptr=3)) == 3


def _fields():
    return dict(q_sb=4096, q_sn=4096, q_sh=128, k_sb=1 << 20, k_sn=1024, k_sh=128, v_sb=1 << 20, v_sn=1024,
                v_sh=128, o_sb=4096, o_sn=4096, o_sh=128, Nq=1, Nk=4097, Hq=32, Hkv=8, B=1, thr_mode=1, thr_T=1,
                thr_scalar=-0.5, softmax_scale=0.125, k_start=0, qk_shift=4096, num_splits=7, pack_heads=4)


class _Ptr:
    def __init__(self, p):
        self.data = types.SimpleNamespace(ptr=p)


def test_bound_params_are_attentions_byte_for_byte():
    ptrs = dict(q=0x1000, k=0x2000, v=0x3000, out=0x4000, lse=0x5000, o_part=0x6000, lse_part=0x7000,
                thresholds=0x8000)
    want = _launch.pack(**_fields(), **{n: _Ptr(p) for n, p in ptrs.items()})
    tmpl = _ParamsTemplate.pack(**_fields(), thresholds=_Ptr(0x8000)).with_pointers(o_part=0x6000, lse_part=0x7000)
    got = tmpl.bind(0x1000, 0x2000, 0x3000, 0x4000, 0x5000)
    assert got.dtype == _launch.PARAMS and got.tobytes() == want.tobytes()
    again = tmpl.bind(0x1100, 0x2000, 0x3000, 0x4000, 0x5000)  # the template itself is untouched
    assert again["q"] == 0x1100 and tmpl.bind(1, 2, 3, 4, 5)["o_part"] == 0x6000 and got["q"] == 0x1000


# --- run end to end with the GPU pieces stood in for -----------------------------------------------------

class _Runtime:
    def __init__(self, current=0):
        self.current, self.sets = current, []

    def getDevice(self):
        return self.current

    def setDevice(self, d):
        self.sets.append(d)
        self.current = d


class _IO:
    def __init__(self, log):
        self.log, self.n = log, 0

    def empty(self, shape, dtype):
        self.n += 1
        x = FakeTensor(shape, dtype=dtype, ptr=0x9000000 + 0x100000 * self.n)
        self.log.append(("empty", shape, dtype))
        return x

    def stream(self):
        return plan_mod._RawStream(0xABC)

    def current(self, stream, device_id):
        import contextlib

        self.log.append(("current", stream.ptr, device_id))
        return contextlib.nullcontext()


class _Fn:
    def __init__(self, log, name):
        self.log, self.name = log, name

    def __call__(self, grid, block, args, shared_mem=0, stream=None):
        self.log.append((self.name, grid, block, args, shared_mem, stream.ptr))


def _fake_plan(monkeypatch, split: bool, return_lse=False, device=0, current_device=0):
    log = []
    q = FakeTensor((1, 1, 32, 128), device=f"cuda:{device}")
    kv = FakeTensor((1, 4097, 8, 128), device=f"cuda:{device}")
    out = FakeTensor((1, 1, 32, 128), device=f"cuda:{device}")
    specs = tuple(_Spec(n, "torch", FakeTensor, plan_mod._torch_layout(x), True)
                  for n, x in (("q", q), ("k", kv), ("v", kv), ("out", out)))
    tmpl = _ParamsTemplate.pack(**_fields())
    attrs = dict(_specs=specs, _io=_IO(log), _kind="torch", _device_id=device, _runtime=_Runtime(current_device),
                 _out_shape=(1, 1, 32, 128), _lse_shape=(1, 32, 1), _dtype="float16", _lse_dtype="float32",
                 _return_lse=return_lse, _workspaces={}, _geoms=(), _params=tmpl, split=None, thresholds=None,
                 shapes={})
    if split:
        p = _splitkv.Plan(64, 4, 1, 7)
        mod = types.SimpleNamespace(split={64: (_Fn(log, "split64"), 128, 1000)}, combine=_Fn(log, "combine"),
                                    combine_warps=4)
        attrs.update(_launch_split=(mod, p, (7, 8, 1), 32), _launch_fwd=None, split=p)

        def workspace(plan, g, B, Nq, Hq, D):
            log.append(("workspace", g, (B, Nq, Hq, D)))
            return _Ptr(0x6000), _Ptr(0x7000), _Ptr(0x8000)

        monkeypatch.setattr(_splitkv, "workspace", workspace)
    else:
        attrs.update(_launch_split=None, _launch_fwd=(_Fn(log, "fwd"), (1, 32, 1), (384, 1, 1), 5000))

    def no_dlpack(*a, **k):
        raise AssertionError("run went through DLPack / attention's conversion")

    monkeypatch.setattr(_arrays, "to_cupy", no_dlpack)
    monkeypatch.setattr(_arrays, "frame_for", no_dlpack)
    monkeypatch.setattr(plan_mod, "to_cupy", no_dlpack)
    monkeypatch.setattr(plan_mod, "frame_for", no_dlpack)
    return AttentionPlan._assemble(**attrs), log, (q, kv)


def test_run_binds_pointers_and_launches_the_planned_kernel(monkeypatch):
    plan, log, (q, kv) = _fake_plan(monkeypatch, split=False, return_lse=True)
    out, lse = plan.run(q, kv, kv)
    assert [e[0] for e in log] == ["empty", "empty", "fwd"]
    name, grid, block, (params,), smem, stream = log[-1]
    assert (grid, block, smem, stream) == ((1, 32, 1), (384, 1, 1), 5000, 0xABC)
    assert (params["q"], params["k"], params["v"]) == (q.data_ptr(), kv.data_ptr(), kv.data_ptr())
    assert params["out"] == out.data_ptr() and params["lse"] == lse.data_ptr()
    assert params["Nk"] == 4097 and params["softmax_scale"] == np.float32(0.125)


def test_run_split_kv_keeps_partials_per_stream(monkeypatch):
    plan, log, (q, kv) = _fake_plan(monkeypatch, split=True)
    out = plan.run(q, kv, kv)
    plan.run(q, kv, kv)
    names = [e[0] for e in log]
    assert names.count("current") == 1, "partials are allocated once per stream"
    assert names.count("split64") == 2 and names.count("combine") == 2
    assert [e[1:] for e in log if e[0] == "workspace"] == [((7, 8, 1), (1, 1, 32, 128))]
    split = [e for e in log if e[0] == "split64"][0]
    params = split[3][0]
    assert params["o_part"] == 0x6000 and params["lse_part"] == 0x7000 and params["out"] == out.data_ptr()
    assert params["split_done"] == 0x8000  # the stream's counters, zeroed once and reset by the kernel
    assert split[1] == (7, 8, 1) and split[2] == (128, 1, 1) and split[4] == 1000
    combine = [e for e in log if e[0] == "combine"][0]
    assert combine[1] == (8, 1, 1) and combine[2] == (128, 1, 1)  # 32 rows, 4 warps a block


def test_run_refuses_before_launching_and_takes_out(monkeypatch):
    plan, log, (q, kv) = _fake_plan(monkeypatch, split=False)
    with pytest.raises(ValueError, match=r"k: does not match the plan: shape: expected \(1, 4097, 8, 128\), got "
                                         r"\(1, 4096, 8, 128\)"):
        plan.run(q, FakeTensor((1, 4096, 8, 128)), kv)
    with pytest.raises(ValueError, match=r"out: .*strides \(elements\): expected \(4096, 4096, 128, 1\)"):
        plan.run(q, kv, kv, out=FakeTensor((1, 1, 32, 128), stride=(8192, 8192, 256, 1)))
    assert log == [], "nothing allocated or launched"
    out = FakeTensor((1, 1, 32, 128), ptr=0x5550)
    assert plan.run(q, kv, kv, out=out) is out
    assert log[-1][3][0]["out"] == 0x5550 and [e[0] for e in log] == ["empty", "fwd"]  # lse only


def test_run_switches_to_the_plans_device_and_back(monkeypatch):
    plan, log, (q, kv) = _fake_plan(monkeypatch, split=False, device=1, current_device=0)
    plan.run(q, kv, kv)
    assert plan._runtime.sets == [1, 0]


def test_plan_is_exported_and_documented():
    assert "AttentionPlan" in bsfa_cupy.__all__ and bsfa_cupy.AttentionPlan is AttentionPlan
    assert "AttentionPlan" in bsfa_cupy.attention.__doc__


def _table(shape, device=0, ptr=0xA000):
    from bsfa_cupy.device_thresholds import DeviceThresholds

    arr = types.SimpleNamespace(shape=shape, data=types.SimpleNamespace(ptr=ptr))
    return DeviceThresholds._adopt(arr, device)


def test_run_takes_another_layers_thresholds_of_the_planned_shape(monkeypatch):
    plan, log, (q, kv) = _fake_plan(monkeypatch, split=True)
    with pytest.raises(ValueError, match="built without a thresholds array"):
        plan.run(q, kv, kv, thresholds=_table((32, 33)))
    plan.thresholds = _table((32, 33), ptr=0x8000)
    with pytest.raises(TypeError, match="expected a bsfa_cupy.DeviceThresholds"):
        plan.run(q, kv, kv, thresholds=np.zeros((32, 33), np.float32))
    with pytest.raises(ValueError, match=r"expected shape \(32, 33\) \(Hq, T\) as planned, got \(32, 34\)"):
        plan.run(q, kv, kv, thresholds=_table((32, 34)))
    with pytest.raises(ValueError, match="expected a table on cuda:0, got cuda:1"):
        plan.run(q, kv, kv, thresholds=_table((32, 33), device=1))
    assert log == [], "nothing allocated or launched"
    plan.run(q, kv, kv, thresholds=_table((32, 33), ptr=0xB000))
    plan.run(q, kv, kv)
    split = [e for e in log if e[0] == "split64"]
    assert split[0][3][0]["thresholds"] == 0xB000
    assert split[1][3][0]["thresholds"] == 0, "without thresholds= the template's pointer stays"
