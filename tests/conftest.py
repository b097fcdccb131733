"""Shared pytest/hypothesis configuration for the bsfa test suite.

Hypothesis profiles:

* ``ci``  - loaded when the ``CI`` environment variable is set: few, derandomized examples so a
  2-core CI runner stays well under its time budget and runs are reproducible.
* ``dev`` - the default locally: more (random) examples.
* ``gpu`` - for runs on a GPU machine, where the kernels are cheap: many examples.

``HYPOTHESIS_PROFILE=<name>`` overrides the choice.

BLAS threads: the tests multiply many small matrices (the float64 reference the GPU tests check
against included); a multi-threaded OpenBLAS spins on them and slows them down several-fold, on a
loaded 2-core runner and on a many-core GPU host alike (tests/gpu/test_varlen.py: 1.5-4 s per case
against 0.2-0.5 s on one thread), so NumPy's OpenBLAS gets one thread by default
(OPENBLAS_NUM_THREADS; on CI also OMP_NUM_THREADS / MKL_NUM_THREADS, which outside CI are left to
torch's CPU tests; set any of them yourself to override). This only works because NumPy is not
imported before this file.
"""
from __future__ import annotations

import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # small matrices: BLAS threads only fight each other
if os.environ.get("CI"):  # a 2-core runner: every thread pool fights the others there
    for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(_var, "1")

from hypothesis import HealthCheck, settings  # noqa: E402

settings.register_profile(
    "ci",
    max_examples=40,
    deadline=None,
    derandomize=True,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.register_profile(
    "dev",
    max_examples=150,
    deadline=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.register_profile(
    "gpu",
    max_examples=500,
    deadline=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE") or ("ci" if os.environ.get("CI") else "dev"))
