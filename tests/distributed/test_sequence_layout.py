"""shard / unshard and the chunk positions of the two layouts, on NumPy arrays and torch tensors."""
from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")


from bsfa_cupy.distributed import shard, unshard  # noqa: E402
from bsfa_cupy._sequence_layout import Span, spans  # noqa: E402


def test_zigzag_gives_each_rank_one_early_and_one_late_chunk():
    assert spans(0, 4, 256, "zigzag") == [Span(0, 0, 128), Span(128, 896, 128)]
    assert spans(3, 4, 256, "zigzag") == [Span(0, 384, 128), Span(128, 512, 128)]
    assert spans(2, 4, 256, "contiguous") == [Span(0, 512, 256)]
    positions = sorted(s.start for r in range(4) for s in spans(r, 4, 256, "zigzag"))
    assert positions == list(range(0, 1024, 128)), "the chunks of all ranks tile the sequence once"


@pytest.mark.parametrize("layout", ["zigzag", "contiguous"])
@pytest.mark.parametrize("world", [1, 2, 3, 4])
@pytest.mark.parametrize("kind", ["numpy", "torch"])
def test_unshard_inverts_shard(layout, world, kind):
    n = 2 * world * 3
    x = np.arange(2 * n * 5).reshape(2, n, 5)
    if kind == "torch":
        x = torch.from_numpy(x)
    for dim, y in ((1, x), (0, x.swapaxes(0, 1))):
        parts = [shard(y, r, world, layout, dim) for r in range(world)]
        back = unshard(parts, layout, dim)
        assert type(back) is type(y)
        assert np.array_equal(np.asarray(back), np.asarray(y)), f"round trip along dim {dim}"
    rows = np.asarray(shard(x, world - 1, world, layout, 1))[0, :, 0] // 5
    chunk = n // world // (2 if layout == "zigzag" else 1)
    want = [p for s in spans(world - 1, world, n // world, layout) for p in range(s.start, s.start + chunk)]
    assert rows.tolist() == want, "the last rank holds the positions its spans name"


def test_shard_takes_negative_dims():
    x = np.arange(8 * 3).reshape(3, 8)
    assert np.array_equal(shard(x, 1, 2, dim=-1), x[:, [2, 3, 4, 5]])


@pytest.mark.parametrize("call,error,message", [
    (lambda: shard(np.zeros((1, 10)), 0, 3), ValueError,
     r"x: a zigzag layout over 3 ranks cuts axis 1 into 6 equal chunks; expected a length divisible by 6, got 10"),
    (lambda: shard(np.zeros((1, 10)), 0, 4, "contiguous"), ValueError, "divisible by 4, got 10"),
    (lambda: shard(np.zeros((1, 8)), 2, 2), ValueError, r"rank: expected 0 <= rank < world = 2, got 2"),
    (lambda: shard(np.zeros((1, 8)), 0, 0), ValueError, "world: expected an int >= 1, got 0"),
    (lambda: shard(np.zeros((1, 8)), 0.0, 2), TypeError, "rank: expected an int, got float"),
    (lambda: shard(np.zeros((1, 8)), 0, 2, "ring"), ValueError, r"layout: expected one of \('zigzag', 'contiguous'\)"),
    (lambda: shard(np.zeros((1, 8)), 0, 2, dim=2), ValueError, "dim: expected an axis of a 2-dimensional array, got 2"),
    (lambda: unshard([np.zeros((1, 4)), np.zeros((1, 6))]), ValueError,
     r"parts\[1\]: expected shape \(1, 4\) \(that of parts\[0\]\), got \(1, 6\)"),
    (lambda: unshard(np.zeros((2, 4))), TypeError, "parts: expected a non-empty list of shards"),
    (lambda: unshard([np.zeros((1, 3))]), ValueError, "a zigzag shard holds 2 equal chunks; expected a length "
                                                        "divisible by 2, got 3"),
])
def test_bad_arguments_are_refused(call, error, message):
    with pytest.raises(error, match=message):
        call()

