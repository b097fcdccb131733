"""GPU timing with CUDA events: warm-up, then the median of repeats."""
from __future__ import annotations

import numpy as np

from .._backend import cupy


def time_ms(fn, *, warmup=3, repeats=10, setup=None) -> float:
    """Median milliseconds of ``fn()`` on CuPy's current stream, timed by events around each call.

    ``setup(i)`` (optional) runs before call i outside the timed region, e.g. to rotate inputs so
    repeated calls do not find them in L2.
    """
    cp = cupy()
    for i in range(warmup):
        if setup:
            setup(i)
        fn()
    stream = cp.cuda.get_current_stream()
    stream.synchronize()
    times = []
    for i in range(repeats):
        if setup:
            setup(i)
        start, stop = cp.cuda.Event(), cp.cuda.Event()
        start.record(stream)
        fn()
        stop.record(stream)
        stop.synchronize()
        times.append(cp.cuda.get_elapsed_time(start, stop))
    return float(np.median(times))
