"""Shared test configuration: the ``cuda`` and ``slow`` markers and the hypothesis profiles."""

from __future__ import annotations

import os

import pytest

from _helpers import HOST_BACKENDS, need_backend

# Hypothesis profiles, chosen by HYPOTHESIS_PROFILE (the older MMCORE_HYPOTHESIS_PROFILE is read
# too): "dev" (the default) draws new examples on each run and keeps failures in the local
# example database; "ci" (set by .ci/run) draws the same examples on every run, keeps no
# database and prints the blob that reproduces a failure (@reproduce_failure). Both keep the
# example counts that each test sets (scaled by MMCORE_TEST_EXAMPLES, see _helpers.examples).
try:
    from hypothesis import HealthCheck, settings
except ImportError:  # pragma: no cover - hypothesis is a test dependency
    settings = None
else:
    _common = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                         HealthCheck.data_too_large])
    settings.register_profile("dev", **_common)
    settings.register_profile("default", **_common)      # the former name of "dev"
    settings.register_profile("ci", derandomize=True, database=None, print_blob=True,
                              **_common)
    settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE")
                          or os.environ.get("MMCORE_HYPOTHESIS_PROFILE") or "dev")


def _cuda_reason():
    """None when the cuda backend can run, else why it cannot."""
    try:
        import mmcore
        status = mmcore.backends()["cuda"]
    except Exception as exc:  # a missing native module also means no cuda
        return f"mmcore backends unavailable: {exc}"
    if not status.get("available"):
        return f"cuda backend unavailable: {status.get('reason')}"
    return None


def _is_property_test(item):
    """A hypothesis test: @given, or the runTest of a rule-based state machine."""
    return bool(getattr(getattr(item, "obj", None), "is_hypothesis_test", False))


@pytest.hookimpl(tryfirst=True)  # before `-m` deselects by marker
def pytest_collection_modifyitems(config, items):
    # The property tests take most of the suite's time (many examples each, Numba compiles);
    # they are all `slow`, so that `pytest -m "not slow"` gives a quick run. CI runs everything.
    for item in items:
        if _is_property_test(item):
            item.add_marker(pytest.mark.slow)
    cuda_items = [item for item in items if item.get_closest_marker("cuda") is not None]
    if not cuda_items:
        return
    reason = _cuda_reason()
    if reason is None:
        return
    skip = pytest.mark.skip(reason=reason)
    for item in cuda_items:
        item.add_marker(skip)


def pytest_terminal_summary(terminalreporter):
    """How many docstring examples ran (tests/test_doctests.py)."""
    count = modules = 0
    for reports in terminalreporter.stats.values():
        for report in reports:
            for key, value in getattr(report, "user_properties", ()):
                if key == "doctest_examples" and getattr(report, "when", "") == "call":
                    count += value
                    modules += value > 0
    if modules:
        terminalreporter.write_line(f"docstring examples run: {count} in {modules} modules")


@pytest.fixture(params=HOST_BACKENDS)
def backend(request):
    """Each host backend in turn (numba skipped when it is not installed)."""
    need_backend(request.param)
    return request.param
