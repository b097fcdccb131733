"""BlockMaxPlan without a GPU: construction refuses what block_max_scores refuses (same errors), run's checks name
what was expected and what came and refuse before anything is allocated or launched, and run binds only the
pointers of q, k and the tile maxima, never going through DLPack."""
from __future__ import annotations

import numpy as np
import pytest

import bsfa_cupy
from bsfa_cupy import _arrays, _launch
from bsfa_cupy import block_max_plan as bmp_mod
from bsfa_cupy import plan as plan_mod
from bsfa_cupy.block_max_plan import BlockMaxPlan
from bsfa_cupy.plan import _ParamsTemplate, _Spec
from tests.host.test_plan import FakeCupy, FakeTensor, _Fn, _IO, _Ptr, _Runtime, _error

HOST = np.zeros((1, 8, 2, 64), np.float16)


@pytest.mark.parametrize("args,kw", [
    ((HOST, HOST), dict(q_start=64)),
    ((HOST, HOST), dict(k_start=32)),
    ((HOST, HOST), dict(q_start=-128)),
    ((HOST, HOST), dict(k_start=True)),
    ((HOST, HOST), dict(backend="fa3")),
    ((HOST, HOST), {}),  # host arrays: the clear TypeError
    (([1], [1]), {}),
])
def test_construction_errors_are_block_max_scores(args, kw):
    assert _error(lambda: BlockMaxPlan(*args, **kw)) == _error(lambda: bsfa_cupy.block_max_scores(*args, **kw))


def test_torch_cpu_and_requires_grad_errors_are_block_max_scores():
    torch = pytest.importorskip("torch")
    cpu = torch.zeros(1, 8, 2, 64, dtype=torch.float16)
    assert _error(lambda: BlockMaxPlan(cpu, cpu)) == _error(lambda: bsfa_cupy.block_max_scores(cpu, cpu))
    g = torch.zeros(1, 8, 2, 64, requires_grad=True)
    assert _error(lambda: BlockMaxPlan(g, cpu)) == _error(lambda: bsfa_cupy.block_max_scores(g, cpu))


class _JaxLike:
    pass


_JaxLike.__module__ = "jaxlib.xla_extension"


def test_jax_inputs_are_sent_to_block_max_scores():
    with pytest.raises(TypeError, match=r"for JAX arrays call bsfa_cupy.block_max_scores"):
        BlockMaxPlan(_JaxLike(), _JaxLike())


def _fields():
    return dict(q_sb=4096, q_sn=4096, q_sh=128, k_sb=1 << 20, k_sn=1024, k_sh=128, Nq=300, Nk=4097, Hq=32, Hkv=8,
                B=1, softmax_scale=0.125, k_start=0, qk_shift=3797)


def test_bound_params_are_block_max_scores_byte_for_byte():
    ptrs = dict(q=0x1000, k=0x2000, tile_max=0x3000)
    want = _launch.pack(**_fields(), **{n: _Ptr(p) for n, p in ptrs.items()})
    tmpl = _ParamsTemplate.pack(**_fields())
    got = tmpl.bind_named(**ptrs)
    assert got.dtype == _launch.PARAMS and got.tobytes() == want.tobytes()
    assert tmpl.bind_named(q=1, k=2, tile_max=3)["q"] == 1 and got["q"] == 0x1000  # the template is untouched


def _fake_plan(monkeypatch, device=0, current_device=0):
    log = []
    q = FakeTensor((1, 300, 32, 128), device=f"cuda:{device}")
    k = FakeTensor((1, 4097, 8, 128), device=f"cuda:{device}")
    specs = tuple(_Spec(n, "torch", FakeTensor, plan_mod._torch_layout(x), True, "BlockMaxPlan", "block_max_scores")
                  for n, x in (("q", q), ("k", k)))
    attrs = dict(_specs=specs, _io=_IO(log), _kind="torch", _device_id=device, _runtime=_Runtime(current_device),
                 _out_shape=(1, 32, 3, 65), _dtype="float32", _geoms=(), _params=_ParamsTemplate.pack(**_fields()),
                 _launch=(_Fn(log, "block_max"), (132, 1, 1), (384, 1, 1), 200000))

    def no_dlpack(*a, **k):
        raise AssertionError("run went through DLPack / block_max_scores' conversion")

    monkeypatch.setattr(_arrays, "to_cupy", no_dlpack)
    monkeypatch.setattr(_arrays, "frame_for", no_dlpack)
    monkeypatch.setattr(bmp_mod, "frame_for", no_dlpack)
    return BlockMaxPlan._assemble(**attrs), log, (q, k)


def test_run_binds_pointers_and_launches_the_planned_kernel(monkeypatch):
    plan, log, (q, k) = _fake_plan(monkeypatch)
    tm = plan.run(q, k)
    assert [e[0] for e in log] == ["empty", "block_max"]
    assert log[0][1:] == ((1, 32, 3, 65), "float32")
    name, grid, block, (params,), smem, stream = log[-1]
    assert (grid, block, smem, stream) == ((132, 1, 1), (384, 1, 1), 200000, 0xABC)
    assert (params["q"], params["k"], params["tile_max"]) == (q.data_ptr(), k.data_ptr(), tm.data_ptr())
    assert params["Nk"] == 4097 and params["qk_shift"] == 3797 and params["softmax_scale"] == np.float32(0.125)
    assert params["v"] == 0 and params["out"] == 0


def test_run_refuses_before_anything_and_names_the_plan(monkeypatch):
    plan, log, (q, k) = _fake_plan(monkeypatch)
    with pytest.raises(ValueError, match=r"k: does not match the plan: shape: expected \(1, 4097, 8, 128\), got "
                                         r"\(1, 4096, 8, 128\).*build another BlockMaxPlan for this layout, or call "
                                         r"bsfa_cupy.block_max_scores"):
        plan.run(q, FakeTensor((1, 4096, 8, 128)))
    with pytest.raises(TypeError, match=r"q: expected a .*FakeTensor.*for JAX arrays call bsfa_cupy.block_max_scores"):
        plan.run(FakeCupy((1, 300, 32, 128)), k)
    with pytest.raises(TypeError, match=r"dtype: expected float16, got bfloat16"):
        plan.run(q, FakeTensor((1, 4097, 8, 128), dtype="bfloat16"))
    assert log == [], "nothing allocated or launched"


def test_run_switches_to_the_plans_device_and_back(monkeypatch):
    plan, log, (q, k) = _fake_plan(monkeypatch, device=1, current_device=0)
    plan.run(q, k)
    assert plan._runtime.sets == [1, 0]


def test_attention_plan_errors_still_name_attention():
    x = FakeTensor((1, 1, 32, 128))
    spec = _Spec("q", "torch", FakeTensor, plan_mod._torch_layout(x), True)
    with pytest.raises(ValueError, match=r"build another AttentionPlan for this layout, or call bsfa_cupy.attention"):
        spec.pointer(FakeTensor((1, 2, 32, 128)))
