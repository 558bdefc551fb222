"""Helpers shared by the kernel test files (the ``backend`` fixture lives in conftest.py)."""

from __future__ import annotations

import os

import pytest

try:
    from hypothesis import HealthCheck
except ImportError:  # the GPU-only test runs (pytest -m cuda) need no hypothesis
    HealthCheck = None

#: The backends that run on host arrays.
HOST_BACKENDS = ["native", "numba"]

#: MMCORE_TEST_EXAMPLES=N multiplies every hypothesis example count (longer soak runs).
_EXAMPLES_FACTOR = float(os.environ.get("MMCORE_TEST_EXAMPLES", "1"))

PROPERTY_SETTINGS = (dict(deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                 HealthCheck.data_too_large])
                     if HealthCheck is not None else dict(deadline=None))


def examples(n):
    """A hypothesis example count, scaled by MMCORE_TEST_EXAMPLES."""
    return max(1, int(n * _EXAMPLES_FACTOR))


def need_backend(name):
    """Skip when an optional backend is not installed (numba); native is always built."""
    if name == "numba":
        pytest.importorskip("numba")
