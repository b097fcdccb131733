"""The transformers backend on CUDA (the kernel path of bsfa_cupy.hf), on a tiny random bfloat16 Llama.

What ``bsfa quality --device gpu`` relies on: calibration through the GPU calibrator, every layer on
the kernel, tile and head statistics that add up, a dense-equivalent k matching SDPA, per-layer k,
and tiles other than the kernel's refused on CUDA.
"""
from __future__ import annotations

import numpy as np
import pytest

from tests.support.gpu import requires_gpu

pytestmark = [pytest.mark.gpu, requires_gpu]

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers", minversion="5")

N = 512  # 4 query tiles x 8 key tiles: at most 6 gated tiles per query tile
LAYERS, HQ, VOCAB = 2, 2, 256
#: bfloat16 kernel vs bfloat16 SDPA through two layers, relative to the largest |logit|
DENSE_RTOL = 3e-2


@pytest.fixture(scope="module")
def tiny():
    if not torch.cuda.is_available():
        pytest.skip("torch without CUDA")
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=128, intermediate_size=256, num_hidden_layers=LAYERS,
                      num_attention_heads=HQ, num_key_value_heads=1, max_position_embeddings=2 * N)  # head dim 64
    model = LlamaForCausalLM(cfg).to("cuda", torch.bfloat16).eval()
    model.set_attn_implementation("sdpa")
    return model


def _ids(seed):
    return torch.randint(0, VOCAB, (1, N), generator=torch.Generator().manual_seed(seed)).cuda()


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False).logits.float()


def test_calibrate_enable_and_statistics_on_the_kernel(tiny):
    import bsfa_cupy.hf as hf

    thr = hf.calibrate(tiny, [_ids(1), _ids(2)], [1, 16], progress=False)
    assert (thr.block_m, thr.block_n) == (128, 64) and thr.num_layers == LAYERS
    dense = _logits(tiny, _ids(3))
    hf.enable(tiny, thr, k=16, tile_stats=True, head_stats=True)  # more than 6: no threshold anywhere
    hf.reset_stats(tiny)
    got = _logits(tiny, _ids(3))
    assert hf.stats(tiny) == {"bsfa": LAYERS}
    err = float((got - dense).abs().max() / dense.abs().max())
    assert err < DENSE_RTOL, f"dense-equivalent k vs SDPA: worst relative |Δlogit| {err:.3e}"
    cand, diag = hf._candidate_tiles(N, N)
    assert all(v == (HQ * (cand - diag), 0, HQ * diag) for v in hf.tile_stats(tiny).values())
    heads = hf.head_stats(tiny)
    assert sorted(heads) == list(range(LAYERS))
    for h in heads.values():  # the gated and dense kernel variants may round differently: near zero, not zero
        assert np.all(h["rows"] == N) and np.all(h["mass"] / h["rows"] < 1e-5) and np.all(h["err2"] <= 1e-4 * h["ref2"])

    hf.enable(tiny, thr, k=1, tile_stats=True, head_stats=True)
    hf.reset_stats(tiny)
    _logits(tiny, _ids(4))
    tiles = hf.tile_stats(tiny)
    assert all(sum(v) == HQ * cand and v[1] > 0 for v in tiles.values()), tiles
    for layer, h in hf.head_stats(tiny).items():
        mean = h["mass"] / h["rows"]
        assert np.all((mean > 0) & (mean < 1)) and np.all(h["mass_max"] <= 1 + 1e-6), (layer, h)
        assert np.all(h["err2"] > 0) and np.all(h["ref2"] > 0)
    tiny.set_attn_implementation("sdpa")


def test_per_layer_k_and_foreign_tiles(tiny):
    import bsfa_cupy.hf as hf

    thr = hf.calibrate(tiny, [_ids(1)], [1, 2], progress=False, reduce="median")
    hf.enable(tiny, thr, k=[1, None], tile_stats=True)
    hf.reset_stats(tiny)
    _logits(tiny, _ids(5))
    t = hf.tile_stats(tiny)
    assert t[0][1] > 0 and t[1][1] == 0, f"layer 0 gated at k=1, layer 1 dense: got {t}"
    fine = hf.calibrate(tiny, [_ids(1)], [1], progress=False, block_m=64)  # the reference calibrator
    with pytest.raises(ValueError, match="kernel's 128x64 tiles"):
        hf.enable(tiny, fine, k=1)
    tiny.set_attn_implementation("sdpa")


def test_quality_measure_runs_every_layer_on_the_kernel(tiny):
    from bsfa_cupy.tools import quality

    items = [("a", _ids(3)), ("b", _ids(4))]
    for rule, targets in ((quality.RULES["paper"], ()), (quality.RULES["layer-k"], (0.0, 1.0))):
        rows, _, _, _ = quality.measure(tiny, [_ids(1), _ids(2)], items, (1, 2, 16), rule=rule,
                                        mass_targets=targets, head_stats=True, progress=False)
        assert len(rows) == (len(targets) or 3)
        for r in rows:
            assert 0.0 <= r["skipped_all"] <= r["skipped_gated"] <= 1.0 and 0.0 <= r["mass_mean"] <= 1.0
