"""The benchmark's timing protocol (bsfa_cupy.tools.benchmark.Timer), on a recorded stand-in for CUDA events:
every timed batch runs right after untimed calls of the same implementation, never right after another's."""
import pytest

torch = pytest.importorskip("torch")

from bsfa_cupy.tools.benchmark import Timer  # noqa: E402


@pytest.fixture
def log(monkeypatch):
    calls = []

    class Event:
        def __init__(self, enable_timing=False):
            self.at = None

        def record(self):
            calls.append(("event", self))
            self.at = len(calls)

        def synchronize(self):
            pass

        def elapsed_time(self, end):
            return float(end.at - self.at)

    monkeypatch.setattr(torch.cuda, "Event", Event)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a, **k: None)
    return calls


def _fns(log, names):
    return {name: (lambda i, name=name: log.append((name, i))) for name in names}


def _batches(log):
    """(calls just before the start event, calls between start and stop) for every timed batch."""
    events = [j for j, (what, _) in enumerate(log) if what == "event"]
    assert len(events) % 2 == 0, f"unpaired events at {events}"
    return [(log[:start], log[start + 1:stop]) for start, stop in zip(events[::2], events[1::2])]


@pytest.mark.parametrize("warmup", [1, 2, 3])
def test_every_timed_batch_follows_untimed_calls_of_its_own(log, warmup):
    names = ("dense", "sparse", "cudnn")
    got = Timer(repeats=5, inner=4, warmup=warmup, warmup_ms=0).many(_fns(log, names), n_sets=3)
    assert set(got) == set(names) and all(isinstance(v, float) and v > 0 for v in got.values()), got
    batches = _batches(log)
    assert len(batches) == 5 * len(names), f"expected {5 * len(names)} timed batches, got {len(batches)}"
    for before, timed in batches:
        name = timed[0][0]
        assert [c[0] for c in timed] == [name] * 4, f"a timed batch mixes calls: {timed}"
        lead = [c[0] for c in before[-warmup:]]
        assert lead == [name] * warmup, f"timed {name} right after {lead}, expected {warmup} calls of {name}"
        # The input sets rotate through the warm-up into the batch: the first timed call is not on the set the
        # last warm-up call just brought into L2.
        assert before[-1][1] != timed[0][1], f"warm-up and timed call on the same input set: {before[-1]}, {timed[0]}"


def test_without_warmup_a_timed_batch_follows_another_implementation(log):
    # The protocol before the warm-up: the same test then sees batches timed right after another's calls.
    Timer(repeats=3, inner=2, warmup=0, warmup_ms=0).many(_fns(log, ("a", "b")), n_sets=2)
    last = [next(c[0] for c in reversed(before) if c[0] != "event") for before, _ in _batches(log)]
    followed = [prev != timed[0][0] for prev, (_, timed) in zip(last, _batches(log))]
    assert sum(followed) >= 3, f"expected batches timed right after the other implementation's calls, got {followed}"


def test_a_negative_warmup_is_refused():
    with pytest.raises(ValueError, match="warmup: expected a count of calls >= 0, got -1"):
        Timer(repeats=1, inner=1, warmup=-1)


@pytest.mark.parametrize("call_ms, want", [(5.0, 20), (40.0, 3), (250.0, 2), (0.01, Timer.MAX_LEAD)])
def test_the_warm_up_lasts_warmup_ms_at_the_call_time(log, call_ms, want):
    now = [0.0]

    def fn(i):
        log.append(("f", i))
        now[0] += call_ms / 1e3

    timer = Timer(repeats=2, inner=3, warmup=2, warmup_ms=100.0, clock=lambda: now[0])
    assert timer.lead_calls(call_ms) == want, f"{call_ms} ms a call: expected {want} lead calls"
    timer.many({"f": fn}, n_sets=2)
    for k, (before, _) in enumerate(_batches(log)):
        last_event = max((j for j, c in enumerate(before) if c[0] == "event"), default=-1)
        # before the first batch also the two untimed calls that measure fn's call time
        lead = len(before) - last_event - 1 - (2 if k == 0 else 0)
        assert lead == want, f"{call_ms} ms a call: {lead} untimed calls before a timed batch, expected {want}"


def test_a_negative_or_nan_warmup_ms_is_refused():
    for bad in (-1.0, float("nan")):
        with pytest.raises(ValueError, match="warmup_ms: expected a time >= 0"):
            Timer(repeats=1, inner=1, warmup_ms=bad)
