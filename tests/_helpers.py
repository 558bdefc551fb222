"""Helpers shared by the kernel test files (the ``backend`` fixture lives in conftest.py)."""

from __future__ import annotations

import contextlib
import os
import threading

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


def call_bounded(fn, *fifos, bound: float = 30.0):
    """``fn()``'s return value, or the exception it raised, failing the test when it has not
    returned within ``bound`` seconds. A call blocked in ``open()`` of one of ``fifos`` is
    released first (a writer is opened and closed on them), so the suite goes on."""
    box: dict = {}

    def target():
        try:
            box["value"] = fn()
        except BaseException as exc:  # noqa: BLE001 - handed to the test
            box["error"] = exc

    t = threading.Thread(target=target, daemon=True)
    t.start()
    t.join(bound)
    if t.is_alive():
        for f in fifos:
            try:
                os.close(os.open(f, os.O_WRONLY | os.O_NONBLOCK))
            except OSError:
                pass
        t.join(5)
        pytest.fail(f"the call did not return within {bound} s (blocked on a FIFO?)")
    return box["error"] if "error" in box else box.get("value")


@contextlib.contextmanager
def serving_node(model_dir, modalities, **kwargs):
    """An in-process shard node (``NodeServer(model_dir, modalities, **kwargs)``) served by a
    daemon thread; stopped and joined on exit."""
    from mmcore.distributed.node import NodeServer
    node = NodeServer(model_dir, list(modalities), **kwargs)
    t = threading.Thread(target=node.serve_forever, daemon=True)
    t.start()
    try:
        yield node
    finally:
        node.stop()
        t.join(20)
        assert not t.is_alive(), "node did not stop"


def node_address(node) -> str:
    """``"host:port"`` of a node, as shard configs name it."""
    return f"{node.address[0]}:{node.address[1]}"


@contextlib.contextmanager
def at_isa(isa: str):
    """Run the block with the native kernels capped at instruction-set level ``isa``; skips
    the test when this build or CPU cannot run that level. The level in force before is
    restored afterwards."""
    from mmcore import _C

    before = _C.isa_level()
    if isa not in _C.compiled_isas() or not _C.set_isa_cap(isa):
        _C.set_isa_cap(before)
        pytest.skip(f"{isa} not available here")
    try:
        yield
    finally:
        _C.set_isa_cap(before)


def encoder_layer_params(rng, E, F, *, bias=True, norms=True):
    """Random weights of one encoder block (keyword arguments of ``mmcore.ops.encoder_layer``),
    scaled like trained ones: matrices N(0, 1 / fan_in), small biases, norms near identity."""
    import numpy as np

    def w(*shape):
        return (rng.standard_normal(shape) / np.sqrt(shape[-1])).astype(np.float32)

    p = dict(in_proj_weight=w(3 * E, E), out_proj_weight=w(E, E), linear1_weight=w(F, E),
             linear2_weight=w(E, F))
    if bias:
        p.update(in_proj_bias=w(3 * E) * 0.3, out_proj_bias=w(E) * 0.3, linear1_bias=w(F) * 0.3,
                 linear2_bias=w(E) * 0.3)
    if norms:
        p.update(norm1_weight=1 + 0.2 * w(E), norm1_bias=0.2 * w(E),
                 norm2_weight=1 + 0.2 * w(E), norm2_bias=0.2 * w(E))
    return p
