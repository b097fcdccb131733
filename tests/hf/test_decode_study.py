"""bench/decode_quality.py's decode path on a tiny random Llama (CPU reference, no files): dense decode steps
through BSFA give the full SDPA forward's logits, thresholded ones are counted tile by tile and skip."""
from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers", minversion="5")

from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

import bsfa_cupy.hf as hf  # noqa: E402
from tests.support.bench_scripts import load_bench_script  # noqa: E402

# bench/decode_quality.py steps the cache with `past_key_values=`, which later transformers 5.x releases rename to
# `cache=` with a FutureWarning; the old name works across 5.x (as in test_routing.py).
pytestmark = pytest.mark.filterwarnings("ignore:`past_key_values` is deprecated:FutureWarning")

LAYERS, PROMPT, N = 2, 300, 310


def _study():
    mod = load_bench_script("decode_quality")
    mod.register()
    return mod


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128,
                                         num_hidden_layers=LAYERS, num_attention_heads=4, num_key_value_heads=2,
                                         head_dim=16, max_position_embeddings=1024)).eval()
    ids = torch.randint(0, 128, (1, N), generator=torch.Generator().manual_seed(1))
    thr = hf.calibrate(model, [ids[:, :PROMPT]], k_values=[1, 2], progress=False)
    return _study(), model, ids, thr


def test_dense_decode_steps_match_one_sdpa_forward(setup):
    mod, model, ids, thr = setup
    logits, tiles = mod.run_decode(model, thr, None, ids, PROMPT)
    assert logits.shape == (N - PROMPT - 1, 128)
    model.set_attn_implementation("sdpa")
    with torch.no_grad():
        full = model(input_ids=ids, use_cache=False).logits[0, PROMPT:-1]
    err = float((logits - full).abs().max() / full.abs().max())
    assert err <= 1e-5, f"dense decode vs SDPA forward: worst relative logit error {err:.2e}"
    assert tiles[1] == 0 and tiles[0] > 0  # dense: every gated tile kept


def test_thresholded_decode_counts_and_skips_tiles(setup):
    mod, model, ids, thr = setup
    steps = N - PROMPT - 1
    _, dense_tiles = mod.run_decode(model, thr, None, ids, PROMPT)
    logits, tiles = mod.run_decode(model, thr, 1, ids, PROMPT)
    assert np.isfinite(logits.numpy()).all()
    # every step sees the same tiles, kept or skipped, as the dense run: a count, not a sample
    assert tiles.sum() == dense_tiles.sum() and tiles[2] == dense_tiles[2]
    # one query row against 301..309 keys: 5 key tiles, the last one diagonal, per head and layer and step
    assert tiles[2] == LAYERS * 4 * steps
    share = mod.skipped_share(tiles)
    assert 0.0 < share <= 1.0, f"k=1 thresholds skipped {share:.3f} of the gated decode tiles"
    assert mod.skipped_share(np.array([3, 1, 9])) == 0.25


def test_row_calibration_for_decode_runs_at_decode_as_the_kernels_table(setup):
    mod, model, ids, _ = setup
    rows = hf.calibrate(model, [ids[:, :PROMPT]], k_values=[1, 2], progress=False, block_m=1)
    thr = rows.for_decode()
    assert (thr.block_m, thr.num_positions) == (128, 3)  # 300 calibrated rows
    logits, tiles = mod.run_decode(model, thr, 1, ids, PROMPT)
    assert np.isfinite(logits.numpy()).all()
    # decode rows at 300..308 clamp to position 2, row 299's thresholds: about k = 1 of the 4 gated tiles kept
    share = mod.skipped_share(tiles)
    assert 0.25 <= share <= 1.0, f"k=1 row thresholds skipped {share:.3f} of the gated decode tiles"
