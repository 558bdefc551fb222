"""Tests of the matmul precision knob (mmcore.set_matmul_precision, get_matmul_precision,
matmul_precision) and of the "bf16" / "int8" arithmetic of linear, attention and encoder_layer:
native and numba against the float64 references of tests/reference.py, with tolerances derived
from each precision; PackedWeight and the pack caches."""

from __future__ import annotations

import importlib
import math
import pickle
import threading
import zlib

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import mmcore
from _helpers import HOST_BACKENDS, PROPERTY_SETTINGS, encoder_layer_params, examples, need_backend
from mmcore.errors import ArgumentError, BackendError, ShapeError
from mmcore.ops import PackedWeight, attention, encoder_layer, linear, pack_weight
from mmcore.ops.linear import QuantizedTensor
from reference import (
    activation_ref,
    attention_bf16_ref,
    attention_ref,
    bf16_round,
    encoder_layer_ref,
    layer_norm_ref,
    linear_bf16_ref,
    linear_int8_ref,
    linear_ref,
    quantize_rows_u8,
    quantize_weight_s8,
)

PRECISIONS = ["highest", "bf16", "int8"]
EPS32 = 2.0 ** -24          # float32 unit roundoff
U_BF16 = 2.0 ** -8          # bfloat16 unit roundoff (8 significant bits)


@pytest.fixture(autouse=True)
def _process_wide_precision_restored():
    """Every test starts and ends with the process-wide default."""
    assert mmcore.get_matmul_precision() == "highest"
    yield
    mmcore.set_matmul_precision("highest")


# ----------------------------------------------------------------------------------------------
# the knob


def test_default_is_highest_and_exported():
    assert mmcore.get_matmul_precision() == "highest"
    for name in ("set_matmul_precision", "get_matmul_precision", "matmul_precision"):
        assert name in mmcore.__all__ and callable(getattr(mmcore, name))
    assert mmcore._precision.PRECISIONS == ("highest", "bf16", "int8")


@pytest.mark.parametrize("p", PRECISIONS)
def test_set_and_get(p):
    mmcore.set_matmul_precision(p)
    assert mmcore.get_matmul_precision() == p
    seen = []
    t = threading.Thread(target=lambda: seen.append(mmcore.get_matmul_precision()))
    t.start()
    t.join()
    assert seen == [p]                     # process-wide: other threads see it too


def test_blocks_nest_and_restore():
    mmcore.set_matmul_precision("int8")
    with mmcore.matmul_precision("bf16") as block:
        assert block.precision == "bf16"
        assert mmcore.get_matmul_precision() == "bf16"
        with mmcore.matmul_precision("highest"):
            assert mmcore.get_matmul_precision() == "highest"
            with block:                    # the same object entered again inside itself
                assert mmcore.get_matmul_precision() == "bf16"
            assert mmcore.get_matmul_precision() == "highest"
        assert mmcore.get_matmul_precision() == "bf16"
        mmcore.set_matmul_precision("highest")          # the block still wins in its thread
        assert mmcore.get_matmul_precision() == "bf16"
    assert mmcore.get_matmul_precision() == "highest"


def test_block_restores_on_exception():
    with pytest.raises(KeyError):
        with mmcore.matmul_precision("int8"):
            with mmcore.matmul_precision("bf16"):
                raise KeyError("boom")
    assert mmcore.get_matmul_precision() == "highest"


def test_decorator():
    @mmcore.matmul_precision("int8")
    def inner(fail=False):
        """docstring kept"""
        if fail:
            raise ValueError
        return mmcore.get_matmul_precision()

    assert inner() == "int8" and inner.__doc__ == "docstring kept"
    with mmcore.matmul_precision("bf16"):
        assert inner() == "int8"
        assert mmcore.get_matmul_precision() == "bf16"
    with pytest.raises(ValueError):
        inner(fail=True)
    assert mmcore.get_matmul_precision() == "highest"


def test_blocks_are_per_thread():
    """Two threads in blocks of different precisions, interleaved by barriers: each sees its
    own, and the main thread (outside any block) the process-wide one."""
    barrier = threading.Barrier(3)
    seen: dict = {"a": [], "b": []}
    errors = []

    def run(name, precision):
        try:
            seen[name].append(mmcore.get_matmul_precision())
            with mmcore.matmul_precision(precision):
                barrier.wait(5)            # both threads inside their blocks
                seen[name].append(mmcore.get_matmul_precision())
                barrier.wait(5)            # the main thread changed the process-wide value
                seen[name].append(mmcore.get_matmul_precision())
            seen[name].append(mmcore.get_matmul_precision())
        except BaseException as exc:       # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=("a", "bf16")),
               threading.Thread(target=run, args=("b", "int8"))]
    for t in threads:
        t.start()
    barrier.wait(5)
    assert mmcore.get_matmul_precision() == "highest"
    mmcore.set_matmul_precision("int8")
    barrier.wait(5)
    for t in threads:
        t.join(5)
    assert not errors, errors
    assert seen["a"][1:] == ["bf16", "bf16", "int8"]
    assert seen["b"][1:] == ["int8", "int8", "int8"]


@pytest.mark.parametrize("bad", ["fp8", "BF16", "", None, 1, b"int8"])
def test_bad_values_name_precision(bad):
    if bad is not None:
        with pytest.raises(ArgumentError, match=r"\[set_matmul_precision\] precision must be "
                                                r"one of 'highest', 'bf16', 'int8'; got "):
            mmcore.set_matmul_precision(bad)
    with pytest.raises(ArgumentError, match=r"\[matmul_precision\] precision must be one of"):
        mmcore.matmul_precision(bad)
    assert mmcore.get_matmul_precision() == "highest"
    if bad is None:
        return
    x = np.ones((2, 3), np.float32)
    w = np.ones((4, 3), np.float32)
    q = np.ones((1, 1, 2, 4), np.float32)
    got = repr(bad).replace("'", "\\'")
    with pytest.raises(ArgumentError, match=rf"\[linear\] precision must be .*; got {got}"):
        linear(x, w, precision=bad)
    with pytest.raises(ArgumentError, match=r"\[attention\] precision must be one of"):
        attention(q, q, q, precision=bad)
    with pytest.raises(ArgumentError, match=r"\[encoder_layer\] precision must be one of"):
        encoder_layer(np.ones((1, 2, 4), np.float32), num_heads=1, precision=bad,
                      **encoder_layer_params(np.random.default_rng(0), 4, 3))
    with pytest.raises(ArgumentError, match=r"\[pack_weight\] precision must be one of"):
        pack_weight(w, precision=bad)


# ----------------------------------------------------------------------------------------------
# linear


def _int8_weight(w):
    """An int8 QuantizedTensor of ``w`` with one scale per row (q = rint(w / s))."""
    s = np.maximum(np.abs(w).max(axis=1), 1e-30) / 127
    q = np.clip(np.rint(w / s[:, None]), -127, 127).astype(np.int8)
    return QuantizedTensor(q, "int8", scale=s.astype(np.float32))


def _freeze(qt):
    """Mark the arrays of a QuantizedTensor read-only, as a model does."""
    qt.data.flags.writeable = False
    if qt.scale is not None:
        qt.scale.flags.writeable = False
    return qt


def _bf16_bits(w):
    return (bf16_round(w).astype(np.float32).view(np.uint32) >> 16).astype(np.uint16)


WEIGHT_KINDS = ["float32", "float16", "bfloat16", "int8", "packed", "packed_int8"]


def _weight(w, kind):
    """``w`` (float32) as a weight of ``kind``, and the float32 matrix that weight stands for."""
    if kind == "float32":
        return w, w
    if kind == "float16":
        qt = QuantizedTensor(w.astype(np.float16), "float16")
    elif kind == "bfloat16":
        qt = QuantizedTensor(_bf16_bits(w), "bfloat16")
    elif kind in ("int8", "packed_int8"):
        qt = _int8_weight(w)
    else:
        return PackedWeight(w), w
    deq = np.asarray(qt)
    return (PackedWeight(qt) if kind == "packed_int8" else qt), deq


def _stored_int8(weight):
    """(q, scale) of an int8 weight used as stored under "int8", else None."""
    if isinstance(weight, PackedWeight):
        weight = weight.source
    if isinstance(weight, QuantizedTensor) and weight.kind == "int8":
        return weight.data, weight.scale
    return None


def _check_linear(y, x, weight, deq, b, precision, activation=None, what=""):
    """``y`` against the float64 reference of ``precision``.

    "highest": each output is a float32 sum of K products, within (K + 2) eps32 of the summed
    magnitudes. "bf16": the same float32 sum, of the bfloat16-rounded operands. "int8": the
    integer sums are exact, so only the float32 epilogue remains: float32(acc), sx * sw, the
    product and the bias add, four roundings of (|acc sx sw| + |b|).
    """
    x = np.asarray(x, np.float32)
    K = x.shape[-1]
    if precision == "int8":
        stored = _stored_int8(weight)
        if stored is None:
            ref = linear_int8_ref(x, deq, b)
            q, sw = quantize_weight_s8(deq)
        else:
            ref = linear_int8_ref(x, b=b, q=stored[0], scale=stored[1])
            q, sw = np.asarray(stored[0], np.int64), stored[1]
        a, sx = quantize_rows_u8(x.reshape(-1, K))
        mag = np.abs(a @ q.T) * np.abs(sx.astype(np.float64)[:, None] * sw)
        mag = mag.reshape(ref.shape)
        tol = 5 * EPS32 * (mag + (0 if b is None else np.abs(b)))
    else:
        xr, wr = ((bf16_round(x), bf16_round(deq)) if precision == "bf16"
                  else (x.astype(np.float64), deq.astype(np.float64)))
        ref = linear_bf16_ref(x, deq, b) if precision == "bf16" else linear_ref(x, deq, b)
        mag = np.abs(xr) @ np.abs(wr).T + (0 if b is None else np.abs(b))
        tol = (K + 2) * 1.2e-7 * mag
    if activation is not None:
        ref = activation_ref(ref, activation)
        tol = 1.2 * tol + 4 * EPS32 * np.abs(ref) + 1e-12
    assert y.dtype == np.float32 and y.shape == ref.shape, (y.shape, ref.shape)
    err = np.abs(y.astype(np.float64) - ref)
    bad = ~(err <= tol + 1e-30)
    assert not bad.any(), (f"{what}: {int(bad.sum())} outputs off, max excess "
                           f"{float(np.max(np.where(bad, err - tol, -np.inf)))}")


# (M, K, N): 1, primes, around the register tiles (15/16/17, 63/64/65) and the packing panel
SHAPES = [(1, 1, 1), (1, 7, 13), (7, 13, 97), (13, 97, 7), (2, 1, 65), (15, 15, 15),
          (16, 16, 16), (17, 17, 17), (63, 64, 65), (65, 63, 64), (64, 65, 63), (97, 17, 16),
          (5, 130, 129)]


def _data(rng, shape, scale=1.0):
    return (scale * rng.standard_normal(shape)).astype(np.float32)


@pytest.mark.parametrize("kind", WEIGHT_KINDS)
@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("backend", HOST_BACKENDS)
def test_linear_matches_reference(backend, precision, kind):
    need_backend(backend)
    rng = np.random.default_rng(zlib.crc32(f"{precision}/{kind}".encode()))
    for M, K, N in SHAPES:
        x = _data(rng, (M, K))
        w = _data(rng, (N, K), 1 / math.sqrt(K))
        weight, deq = _weight(w, kind)
        for b in (None, _data(rng, N)):
            y = linear(x, weight, b, precision=precision, backend=backend)
            _check_linear(y, x, weight, deq, b, precision, what=f"{(M, K, N)} bias={b is not None}")


@pytest.mark.parametrize("activation", ["gelu", "gelu_tanh", "quick_gelu", "relu"])
@pytest.mark.parametrize("precision", ["bf16", "int8"])
@pytest.mark.parametrize("backend", HOST_BACKENDS)
def test_linear_activations(backend, precision, activation):
    need_backend(backend)
    rng = np.random.default_rng(7)
    for M, K, N in [(1, 1, 1), (13, 17, 65), (64, 63, 16)]:
        x, w, b = _data(rng, (M, K)), _data(rng, (N, K), 1 / math.sqrt(K)), _data(rng, N)
        y = linear(x, w, b, activation=activation, precision=precision, backend=backend)
        _check_linear(y, x, w, w, b, precision, activation, what=f"{(M, K, N)}")


@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("backend", HOST_BACKENDS)
def test_linear_layouts_and_empty(backend, precision):
    """Non-contiguous and broadcast x, leading axes, a transposed weight, empty sizes."""
    need_backend(backend)
    rng = np.random.default_rng(11)
    x, w, b = _data(rng, (20, 24)), _data(rng, (40, 24), 0.2), _data(rng, 40)
    strided = np.repeat(x, 2, axis=0)[::2]
    for xx, ww in [(strided, w), (x[:, ::-1], w[:, ::-1]), (np.broadcast_to(x[:1], (5, 24)), w),
                   (x, np.asfortranarray(w)), (x.reshape(4, 5, 24), w)]:
        y = linear(xx, ww, b, precision=precision, backend=backend)
        _check_linear(y, xx, ww, np.asarray(ww, np.float32), b, precision)
        # the layout never changes the result
        same = linear(np.ascontiguousarray(xx), np.ascontiguousarray(ww), b,
                      precision=precision, backend=backend)
        np.testing.assert_array_equal(y, same)
    for M, K, N in [(0, 5, 3), (3, 0, 4), (3, 5, 0), (0, 0, 0)]:
        y = linear(np.zeros((M, K), np.float32), np.ones((N, K), np.float32),
                   np.arange(N, dtype=np.float32), precision=precision, backend=backend)
        np.testing.assert_array_equal(y, np.broadcast_to(np.arange(N, dtype=np.float32),
                                                         (M, N)))


@pytest.mark.parametrize("backend", HOST_BACKENDS)
def test_bf16_rounds_the_operands(backend):
    need_backend(backend)
    # 1 + 2**-10 keeps 8 significant bits as 1; 1 + 3 * 2**-8 ties and goes to even (1 + 2**-6)
    x = np.array([[1 + 2.0 ** -10, 1 + 3 * 2.0 ** -8, 0.0]], np.float32)
    for col, want in ((0, 1.0), (1, 1 + 2.0 ** -6)):
        w = np.zeros((1, 3), np.float32)
        w[0, col] = 1
        assert float(linear(x, w, precision="bf16", backend=backend)[0, 0]) == want
        assert float(linear(x, w, precision="highest", backend=backend)[0, 0]) == x[0, col]
    # the weight too, and the bias is not rounded
    w = np.array([[1 + 2.0 ** -10, 0, 0]], np.float32)
    b = np.array([2.0 ** -12], np.float32)
    assert float(linear(np.ones((1, 3), np.float32), w, b, precision="bf16",
                        backend=backend)[0, 0]) == 1 + 2.0 ** -12


@pytest.mark.parametrize("backend", HOST_BACKENDS)
def test_int8_quantization_steps(backend):
    """A row of x takes steps of (max(0, max x) - min(0, min x)) / 255 with a zero point; a
    weight row steps of max |w| / 127."""
    need_backend(backend)
    x = np.array([[-1.0, 0.5, 2.0], [0.0, 0.0, 0.0], [3.0, 1.0, 0.25]], np.float32)
    y = linear(x, np.eye(3, dtype=np.float32), precision="int8", backend=backend)
    a, sx = quantize_rows_u8(x)
    assert a.tolist() == [[-85, 42, 170], [0, 0, 0], [255, 85, 21]]
    expected = (a * 127).astype(np.float32) * (sx[:, None] * np.float32(1 / 127))
    np.testing.assert_allclose(y, expected, rtol=4 * EPS32, atol=0)
    # an int8 weight is used as stored: its own scales, no second quantization
    qt = QuantizedTensor(np.array([[100, -3, 0]], np.int8), "int8",
                         scale=np.array([0.01], np.float32))
    y = linear(x, qt, precision="int8", backend=backend)
    want = (a @ np.array([100, -3, 0])) * (sx.astype(np.float64) * np.float64(np.float32(0.01)))
    np.testing.assert_allclose(y[:, 0], want, rtol=5 * EPS32, atol=0)


@pytest.mark.parametrize("precision", ["bf16", "int8"])
@pytest.mark.parametrize("backend", HOST_BACKENDS)
def test_non_finite_values(backend, precision):
    """NaN and inf never vanish: under "int8" a row of x (or of the weight) holding one gives
    NaN outputs, the other rows stay exact."""
    need_backend(backend)
    rng = np.random.default_rng(5)
    x, w = _data(rng, (4, 9)), _data(rng, (5, 9))
    x[1, 3] = np.nan
    x[2, 0] = np.inf
    w[4, 2] = -np.inf
    y = linear(x, w, precision=precision, backend=backend)
    assert np.isnan(y[1]).all()
    if precision == "int8":
        assert np.isnan(y[2]).all() and np.isnan(y[:, 4]).all()
        ok = np.ix_([0, 3], range(4))
        _check_linear(y[ok], x[[0, 3]], w[:4], w[:4], None, precision)
    else:
        assert not np.isfinite(y[2]).any() and not np.isfinite(y[:, 4]).any()
        _check_linear(y[np.ix_([0, 3], range(4))], x[[0, 3]], w[:4], w[:4], None, precision)


def test_int8_in_features_limit():
    x = np.zeros((1, 65537), np.float32)
    w = np.zeros((1, 65537), np.float32)
    for backend in HOST_BACKENDS:
        need_backend(backend)
        with pytest.raises(ShapeError, match=r"\[linear\] in_features = 65537: precision 'int8' "
                                             r"takes at most 65536"):
            linear(x, w, precision="int8", backend=backend)
        assert linear(x, w, precision="bf16",
                      backend=backend).shape == (1, 1)
    with pytest.raises(ShapeError, match=r"\[pack_weight\] in_features = 65537"):
        pack_weight(w, precision="int8")


@pytest.mark.parametrize("backend", HOST_BACKENDS)
def test_highest_is_bit_identical_to_no_precision(backend):
    need_backend(backend)
    rng = np.random.default_rng(3)
    x, w, b = _data(rng, (37, 70)), _data(rng, (90, 70), 0.1), _data(rng, 90)
    plain = linear(x, w, b, activation="gelu", backend=backend)
    np.testing.assert_array_equal(linear(x, w, b, activation="gelu", precision="highest",
                                         backend=backend), plain)
    with mmcore.matmul_precision("highest"):
        np.testing.assert_array_equal(linear(x, w, b, activation="gelu", backend=backend), plain)
    np.testing.assert_array_equal(linear(x, PackedWeight(w), b, activation="gelu",
                                         backend=backend), plain)
    qt = _int8_weight(w)
    deq = np.asarray(qt)
    np.testing.assert_array_equal(linear(x, qt, b, precision="highest", backend=backend),
                                  linear(x, deq, b, backend=backend))
    np.testing.assert_array_equal(linear(x, PackedWeight(qt), b, backend=backend),
                                  linear(x, deq, b, backend=backend))
    q = _data(rng, (2, 3, 17, 16))
    k, v = _data(rng, (2, 3, 29, 16)), _data(rng, (2, 3, 29, 5))
    plain_a = attention(q, k, v, key_lengths=np.array([29, 11]), backend=backend)
    for p in ("highest", "int8"):           # attention has no int8 arithmetic
        np.testing.assert_array_equal(
            attention(q, k, v, key_lengths=np.array([29, 11]), precision=p, backend=backend),
            plain_a)
    params = encoder_layer_params(rng, 8, 16)
    xe = _data(rng, (2, 5, 8))
    plain_e = encoder_layer(xe, num_heads=2, backend=backend, **params)
    np.testing.assert_array_equal(encoder_layer(xe, num_heads=2, precision="highest",
                                                backend=backend, **params), plain_e)


@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("backend", HOST_BACKENDS)
def test_the_knob_reaches_the_ops(backend, precision):
    """A call without precision= uses the thread's current precision; an explicit one wins."""
    need_backend(backend)
    rng = np.random.default_rng(4)
    x, w = _data(rng, (9, 33)), _data(rng, (17, 33))
    want = linear(x, w, precision=precision, backend=backend)
    plain = linear(x, w, backend=backend)
    with mmcore.matmul_precision(precision):
        np.testing.assert_array_equal(linear(x, w, backend=backend), want)
        np.testing.assert_array_equal(linear(x, w, precision="highest", backend=backend), plain)
    mmcore.set_matmul_precision(precision)
    np.testing.assert_array_equal(linear(x, w, backend=backend), want)
    q = _data(rng, (1, 2, 7, 8))
    np.testing.assert_array_equal(attention(q, q, q, backend=backend),
                                  attention(q, q, q, precision=precision, backend=backend))
    mmcore.set_matmul_precision("highest")
    if precision != "highest":
        assert not np.array_equal(linear(x, w, backend=backend), want)


@pytest.mark.parametrize("precision", PRECISIONS)
def test_packed_weights_give_the_bits_of_plain_ones(precision):
    """The native kernel gives the same bits from a PackedWeight, from a frozen QuantizedTensor
    (its cached pack) and from the plain arrays (packed inside the call)."""
    rng = np.random.default_rng(6)
    for M, K, N in [(1, 1, 1), (7, 13, 97), (65, 63, 64), (3, 200, 129)]:
        x, w, b = _data(rng, (M, K)), _data(rng, (N, K), 0.3), _data(rng, N)
        plain = linear(x, w, b, precision=precision)
        np.testing.assert_array_equal(linear(x, PackedWeight(w), b, precision=precision), plain)
        np.testing.assert_array_equal(linear(x, pack_weight(w, precision=precision), b,
                                             precision=precision), plain)
        for kind in ("float16", "bfloat16", "int8"):
            qt, _ = _weight(w, kind)
            loose = linear(x, qt, b, precision=precision)          # writable: read in place
            assert not qt.frozen and qt.packed_nbytes == 0
            _freeze(qt)
            np.testing.assert_array_equal(linear(x, qt, b, precision=precision), loose)
            np.testing.assert_array_equal(linear(x, PackedWeight(qt), b, precision=precision),
                                          loose)
            if precision != "highest":                 # "highest" reads it in place
                assert qt.packed_nbytes > 0


def test_a_build_without_precision_says_so(monkeypatch):
    """A native module older than the precisions still runs "highest" and names the op for
    the others (a BackendError, so that callers can fall back)."""
    import types

    from mmcore import _backend
    calls = []

    def old_linear(x, weight, bias, out, *, activation="none", weight_kind="float32",
                   weight_scale=None, num_threads):
        """linear(x, weight, bias, out, *, activation, weight_kind, weight_scale, num_threads)"""
        calls.append(activation)

    monkeypatch.setattr(_backend, "native_module", lambda: types.SimpleNamespace(
        linear=old_linear))
    x, w = np.ones((2, 3), np.float32), np.ones((4, 3), np.float32)
    linear(x, w, backend="native")
    assert calls == ["none"]
    for p in ("bf16", "int8"):
        with pytest.raises(BackendError, match=rf"\[linear\] this build of mmcore._C has no "
                                               rf"precision '{p}' in its linear kernel"):
            linear(x, w, precision=p, backend="native")
    with pytest.raises(BackendError, match=r"\[PackedWeight.packed\] this build of mmcore._C "
                                           "has no pack_weight kernel"):
        PackedWeight(w).packed("highest")
    assert calls == ["none"]


# ----------------------------------------------------------------------------------------------
# PackedWeight and the pack caches


def test_packed_weight_copies_its_source():
    w = np.arange(12, dtype=np.float32).reshape(4, 3)
    pw = PackedWeight(w)
    x = np.ones((2, 3), np.float32)
    before = linear(x, pw)
    w[:] = -1                               # a change to the array it came from never reaches it
    np.testing.assert_array_equal(linear(x, pw), before)
    np.testing.assert_array_equal(np.asarray(pw), np.arange(12, dtype=np.float32).reshape(4, 3))
    assert not pw.source.flags.writeable
    with pytest.raises(ValueError):
        pw.source.flags.writeable = True
    assert pw.shape == (4, 3) and pw.kind == "float32" and pw.dtype == np.float32
    assert len(pw) == 4 and pw.ndim == 2 and "PackedWeight" in repr(pw)
    qt = _int8_weight(np.ones((2, 3), np.float32))
    pq = PackedWeight(qt)
    qt.data[:] = 0
    assert pq.kind == "int8" and pq.source.frozen and int(pq.source.data.sum()) == 6 * 127
    assert PackedWeight(pq).source is pq.source          # already immutable: shared
    # an array that can never be written (over bytes, as a model's frozen parameters) is shared;
    # a read-only array that owns its memory can be made writable again, so it is copied
    frozen = np.frombuffer(np.ones(6, np.float32).tobytes(), np.float32).reshape(2, 3)
    assert np.shares_memory(PackedWeight(frozen).source, frozen)
    owned = np.ones((2, 3), np.float32)
    owned.flags.writeable = False
    assert not np.shares_memory(PackedWeight(owned).source, owned)


def test_packed_weight_bad_input():
    with pytest.raises(ShapeError, match=r"\[PackedWeight\] weight has 3 dims"):
        PackedWeight(np.ones((2, 3, 4), np.float32))
    with pytest.raises(ShapeError, match=r"\[PackedWeight\] weight has dtype int64"):
        PackedWeight(np.ones((2, 3), np.int64))
    with pytest.raises(ShapeError, match=r"\[linear\] x has 4 features"):
        linear(np.ones((1, 4), np.float32), PackedWeight(np.ones((2, 3), np.float32)))


def test_pack_cache_one_pack_per_precision():
    pw = PackedWeight(np.ones((5, 7), np.float32))
    assert pw.cached_precisions == () and pw.nbytes == 5 * 7 * 4
    x = np.ones((2, 7), np.float32)
    for p in ("int8", "highest", "bf16", "int8"):
        linear(x, pw, precision=p)
    assert pw.cached_precisions == ("highest", "bf16", "int8")
    assert pw.packed("bf16") is pw.packed("bf16")
    assert pw.packed("int8").precision == "int8" and pw.packed("int8").shape == (5, 7)
    assert pw.nbytes > 5 * 7 * 4
    with mmcore.matmul_precision("bf16"):
        assert pw.packed() is pw.packed("bf16")
    # the numba backend reads the source and makes no pack
    if "numba" in HOST_BACKENDS:
        need_backend("numba")
        fresh = PackedWeight(np.ones((5, 7), np.float32))
        linear(x, fresh, precision="int8", backend="numba")
        assert fresh.cached_precisions == ()


def test_pack_cache_is_thread_safe(monkeypatch):
    """Threads asking for the same precision at once share one pack, made once."""
    linear_mod = importlib.import_module("mmcore.ops.linear")
    made = []
    real = linear_mod._native_pack

    def counting(*args, **kwargs):
        made.append(args[3])
        threading.Event().wait(0.05)        # widen the window for a race
        return real(*args, **kwargs)

    monkeypatch.setattr(linear_mod, "_native_pack", counting)
    pw = PackedWeight(np.ones((64, 32), np.float32))
    got, barrier = [], threading.Barrier(8)

    def run():
        barrier.wait(5)
        got.append(pw.packed("int8"))

    threads = [threading.Thread(target=run) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert made == ["int8"] and len(got) == 8 and all(p is got[0] for p in got)


def test_quantized_tensor_caches_only_when_frozen():
    w = np.random.default_rng(0).standard_normal((6, 10)).astype(np.float32)
    qt = _int8_weight(w)
    assert not qt.frozen
    assert qt.packed("int8") is not qt.packed("int8")       # writable: made anew each time
    x = np.ones((3, 10), np.float32)
    before = linear(x, qt, precision="int8")
    qt.data[0, 0] = 0                                        # ... so a change is seen
    assert not np.array_equal(linear(x, qt, precision="int8"), before)
    _freeze(qt)
    assert qt.frozen and qt.packed("int8") is qt.packed("int8")
    # row slices of a frozen tensor are frozen, with their own cache
    assert qt[1:3].frozen and qt[1:3].packed_nbytes == 0


def test_pickle_drops_the_packs():
    pw = pack_weight(np.eye(4, dtype=np.float32), precision="bf16")
    qt = _freeze(_int8_weight(np.eye(4, dtype=np.float32)))
    qt.packed("int8")
    pw2, qt2 = pickle.loads(pickle.dumps((pw, qt)))
    assert pw2.cached_precisions == () and qt2.packed_nbytes == 0
    x = np.arange(8, dtype=np.float32).reshape(2, 4)
    np.testing.assert_array_equal(linear(x, pw2, precision="bf16"),
                                  linear(x, pw, precision="bf16"))
    np.testing.assert_array_equal(linear(x, qt2, precision="int8"),
                                  linear(x, qt, precision="int8"))


# ----------------------------------------------------------------------------------------------
# attention


def _attention_case(rng, B, H, Lq, Lk, D, Dv):
    return (_data(rng, (B, H, Lq, D)), _data(rng, (B, H, Lk, D)), _data(rng, (B, H, Lk, Dv)))


def _check_attention_bf16(res, q, k, v, **kw):
    """Against attention_bf16_ref (q, k, v rounded; P rounded before P @ v, divided by the
    unrounded sum). The native kernel rounds P relative to its running maximum and the numba
    kernel does not round it: either way out is within 2**-8 of w @ |v| of the unrounded P, so
    within 2 * 2**-8 of the reference. Scores are float32 sums of D products of the rounded
    operands (a weight moves by at most expm1(2 ds) of itself)."""
    out, w, lse = res
    r_out, r_w, r_lse = attention_bf16_ref(q, k, v, **kw)
    D = q.shape[-1]
    qr, kr, vr = bf16_round(q), bf16_round(k), bf16_round(v)
    eff = 1 / math.sqrt(D) if kw.get("scale") is None else kw["scale"]
    finite_lse = np.where(np.isfinite(r_lse), np.abs(r_lse), 0.0)[..., None]
    ds = ((D + 2) * 1.2e-7 * eff * np.matmul(np.abs(qr), np.swapaxes(np.abs(kr), -1, -2))
          ).max(axis=-1, keepdims=True, initial=0.0) + 2e-7 * (1 + finite_lse)
    assert np.all(np.abs(w - r_w) <= r_w * (np.expm1(2 * ds) + U_BF16) + 1e-7), "weights"
    mag = np.matmul(r_w, np.abs(vr))
    out_tol = (2 * U_BF16 + np.expm1(2 * ds)) * mag + 4e-7 * (1 + mag)
    assert np.all(np.abs(out - r_out) <= out_tol), (
        f"out: max excess {float(np.max(np.abs(out - r_out) - out_tol))}")
    np.testing.assert_allclose(lse, r_lse, rtol=1e-6, atol=1e-5)
    # and within the bfloat16 bound of the exact float64 attention: scores move by at most
    # (2 u + u**2) eff |q| . |k|, the values by u |v|, P by u
    e_w, exact, _ = attention_ref(q, k, v, **kw)
    d_exact = ((2 * U_BF16 + U_BF16 ** 2) * eff
               * np.matmul(np.abs(q), np.swapaxes(np.abs(k), -1, -2))).max(axis=-1, initial=0.0,
                                                                           keepdims=True)
    bound = (np.expm1(2 * (d_exact + ds)) + 3 * U_BF16) * np.matmul(exact, np.abs(v))
    assert np.all(np.abs(out - e_w) <= bound + 1e-6), "out vs the exact attention"


ATTN_SHAPES = [(1, 1, 1, 1, 1, 1), (1, 2, 7, 13, 16, 5), (2, 1, 63, 64, 17, 3),
               (1, 3, 65, 97, 1, 16), (2, 2, 16, 65, 15, 17), (1, 1, 97, 1, 8, 8),
               (1, 1, 0, 5, 4, 4), (1, 2, 3, 0, 4, 4), (0, 1, 3, 5, 4, 4)]


@pytest.mark.parametrize("backend", HOST_BACKENDS)
def test_attention_bf16_matches_reference(backend):
    need_backend(backend)
    rng = np.random.default_rng(8)
    for B, H, Lq, Lk, D, Dv in ATTN_SHAPES:
        q, k, v = _attention_case(rng, B, H, Lq, Lk, D, Dv)
        kl = rng.integers(0, Lk + 1, B)
        mask = rng.random((1, 1, Lq, Lk)) < 0.8
        bias = _data(rng, (1, H, 1, Lk), 0.5)
        for kw in ({}, {"key_lengths": kl}, {"mask": mask, "bias": bias, "scale": 0.3}):
            res = attention(q, k, v, precision="bf16", return_weights=True, return_lse=True,
                            backend=backend, **kw)
            _check_attention_bf16(res, q, k, v, **kw)
    # non-contiguous q, k and v give the bits of their contiguous copies
    q, k, v = _attention_case(rng, 2, 2, 14, 26, 16, 10)
    views = (q[:, :, ::2], k[:, :, ::2, :], v[:, :, ::2, ::-1])
    res = attention(*views, precision="bf16", backend=backend)
    np.testing.assert_array_equal(res, attention(*(np.ascontiguousarray(a) for a in views),
                                                 precision="bf16", backend=backend))
    _check_attention_bf16(attention(*views, precision="bf16", return_weights=True,
                                    return_lse=True, backend=backend), *views)


@pytest.mark.parametrize("backend", HOST_BACKENDS)
def test_attention_bf16_rounds_q_k_v(backend):
    """One key: out is that key's value, rounded to bfloat16 under "bf16" only."""
    need_backend(backend)
    v = np.full((1, 1, 1, 4), 1 + 2.0 ** -10, np.float32)
    q = k = np.ones((1, 1, 3, 4), np.float32)[:, :, :1]
    assert np.all(attention(q, k, v, precision="bf16", backend=backend) == 1.0)
    for p in ("highest", "int8"):
        assert np.all(attention(q, k, v, precision=p, backend=backend) == 1 + 2.0 ** -10)


def test_native_attention_bf16_rounds_the_softmax_numerators():
    """Two keys with scores 0 and -d: P = (1, exp(-d)); the native kernel rounds exp(-d) to
    bfloat16 before P @ v and divides by the unrounded sum."""
    d = 0.3
    q = np.array([[[[1.0]]]], np.float32)
    k = np.array([[[[0.0], [-d]]]], np.float32)             # scores 0 and -d with scale 1
    v = np.array([[[[0.0], [1.0]]]], np.float32)
    out = float(attention(q, k, v, scale=1.0, precision="bf16")[0, 0, 0, 0])
    p1 = float(np.float32(math.exp(float(bf16_round(np.float32(-d))))))
    want = bf16_round(np.float32(p1)) / (1 + p1)
    assert abs(out - want) <= 1e-6 * want and abs(out - p1 / (1 + p1)) > 1e-4 * want


def test_attention_takes_bfloat16_inputs():
    ml_dtypes = pytest.importorskip("ml_dtypes")
    rng = np.random.default_rng(9)
    q, k, v = (a.astype(ml_dtypes.bfloat16) for a in _attention_case(rng, 2, 2, 7, 13, 16, 5))
    bias = _data(rng, (1, 1, 7, 13)).astype(ml_dtypes.bfloat16)
    wide = [a.astype(np.float32) for a in (q, k, v, bias)]
    for backend in HOST_BACKENDS:
        need_backend(backend)
        out = attention(q, k, v, bias=bias, backend=backend)
        assert out.dtype == np.float32
        # widening bfloat16 is exact: the same bits as the float32 copies
        np.testing.assert_array_equal(out, attention(*wide[:3], bias=wide[3], backend=backend))
        mixed = attention(q, wide[1], v, bias=bias, backend=backend)
        np.testing.assert_array_equal(mixed, out)
    torch = pytest.importorskip("torch")
    tq, tk, tv = (torch.from_numpy(a).to(torch.bfloat16) for a in wide[:3])
    np.testing.assert_array_equal(attention(tq, tk, tv), attention(*wide[:3]))
    np.testing.assert_array_equal(attention(tq.requires_grad_(), tk, tv), attention(*wide[:3]))


# ----------------------------------------------------------------------------------------------
# encoder_layer


def _linear_bound(X, eX, W, b, precision):
    """Bound on |computed - exact| of X @ W.T + b, given |error of X| <= eX: the error carried
    through the exact product, the operand rounding or quantization of ``precision``, and float32
    sums (first order, elementwise)."""
    K = X.shape[-1]
    aW = np.abs(W)
    mag = (np.abs(X) + eX) @ aW.T + (0 if b is None else np.abs(b))
    e = eX @ aW.T + (K + 2) * 1.2e-7 * mag
    if precision == "bf16":
        e = e + (2 * U_BF16 + U_BF16 ** 2) * mag
    elif precision == "int8":
        # a row of x moves by at most 1.5 of its steps sx (rounding, and the zero point's
        # rounding at the clamp); a weight row by half a step sw
        hi = np.maximum(0, (X + eX).max(axis=-1)) - np.minimum(0, (X - eX).min(axis=-1))
        sx = hi / 255
        sw = np.abs(W).max(axis=-1) / 127
        e = e + (1.5 * sx[..., None] * aW.sum(axis=-1)
                 + 0.5 * sw * (np.abs(X) + eX + 1.5 * sx[..., None]).sum(axis=-1)[..., None])
    return e


def _layer_norm_bound(X, eX, g, eps):
    """|d layer_norm| <= |g| / sigma * max|dx| * (2 + |z|) per row, plus float32 rounding."""
    mean = X.mean(axis=-1, keepdims=True)
    sigma = np.sqrt(((X - mean) ** 2).mean(axis=-1, keepdims=True) + eps)
    z = (X - mean) / sigma
    gg = 1.0 if g is None else np.abs(g)
    return (gg / sigma * eX.max(axis=-1, keepdims=True) * (2 + np.abs(z))
            + 1e-6 * gg * (1 + np.abs(z)))


def _encoder_bound(x, p, precision, key_lengths, num_heads, activation):
    """A bound on |computed - exact float64 block| per output, propagating the bounds of the
    two layer norms, the four linear maps (with the arithmetic of ``precision``) and the
    attention through the block of encoder_layer_ref."""
    x = x.astype(np.float64)
    B, L, E = x.shape
    H, hd = num_heads, E // num_heads
    T = B * L
    g = {n: (None if p.get(n) is None else p[n].astype(np.float64))
         for n in ("norm1_weight", "norm1_bias", "norm2_weight", "norm2_bias")}
    W = {n: p[n].astype(np.float64) for n in ("in_proj_weight", "out_proj_weight",
                                               "linear1_weight", "linear2_weight")}
    bias = {n: p.get(n) for n in ("in_proj_bias", "out_proj_bias", "linear1_bias",
                                   "linear2_bias")}
    x2 = x.reshape(T, E)
    h = layer_norm_ref(x2, g["norm1_weight"], g["norm1_bias"])
    eh = _layer_norm_bound(x2, np.zeros_like(x2), g["norm1_weight"], 1e-5)
    qkv = linear_ref(h, W["in_proj_weight"], bias["in_proj_bias"])
    eqkv = _linear_bound(h, eh, W["in_proj_weight"], bias["in_proj_bias"], precision)

    def heads(a):
        return a.reshape(B, L, 3, H, hd).transpose(2, 0, 3, 1, 4)

    (q, k, v), (eq, ek, ev) = heads(qkv), heads(eqkv)
    if precision == "bf16":              # q, k, v rounded as they are read
        eq, ek, ev = (e + U_BF16 * (np.abs(a) + e) for a, e in ((q, eq), (k, ek), (v, ev)))
    eff = 1 / math.sqrt(hd)
    _, w, _ = attention_ref(q, k, v, key_lengths=key_lengths)
    aq, ak = np.abs(q), np.abs(k)
    ds = eff * (aq @ np.swapaxes(ek, -1, -2) + eq @ np.swapaxes(ak, -1, -2)
                + eq @ np.swapaxes(ek, -1, -2) + (hd + 2) * 1.2e-7 * aq @ np.swapaxes(ak, -1, -2))
    dmax = ds.max(axis=-1, keepdims=True) + 1e-6
    dw = w * (np.expm1(2 * dmax) + (U_BF16 if precision == "bf16" else 0.0))
    eo = dw @ (np.abs(v) + ev) + w @ ev + 1e-6 * (w @ np.abs(v))
    o = (w @ v).transpose(0, 2, 1, 3).reshape(T, E)
    eo = eo.transpose(0, 2, 1, 3).reshape(T, E)
    ea = _linear_bound(o, eo, W["out_proj_weight"], bias["out_proj_bias"], precision)
    y = x2 + linear_ref(o, W["out_proj_weight"], bias["out_proj_bias"])
    ey = ea + EPS32 * np.abs(y)
    h2 = layer_norm_ref(y, g["norm2_weight"], g["norm2_bias"])
    eh2 = _layer_norm_bound(y, ey, g["norm2_weight"], 1e-5)
    f_pre = linear_ref(h2, W["linear1_weight"], bias["linear1_bias"])
    ef = 1.13 * _linear_bound(h2, eh2, W["linear1_weight"], bias["linear1_bias"], precision)
    f = activation_ref(f_pre, activation)
    ef = ef + 1e-6 * (1 + np.abs(f))
    e2 = _linear_bound(f, ef, W["linear2_weight"], bias["linear2_bias"], precision)
    return (ey + e2).reshape(B, L, E)


ENC_CASES = [(1, 1, 1, 1, 1), (2, 7, 2, 8, 13), (1, 13, 3, 5, 17), (2, 17, 4, 16, 65),
             (1, 5, 1, 63, 64)]


@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("backend", HOST_BACKENDS)
def test_encoder_layer_within_the_precision_bound(backend, precision):
    """Against the float64 block, within the error bound propagated from each step's
    arithmetic; native and numba within twice that of each other."""
    need_backend(backend)
    rng = np.random.default_rng(12)
    for B, L, H, hd, F in ENC_CASES:
        E = H * hd
        p = encoder_layer_params(rng, E, F)
        x = _data(rng, (B, L, E))
        kl = rng.integers(1, L + 1, B)
        for act in ("gelu", "relu"):
            y = encoder_layer(x, num_heads=H, key_lengths=kl, activation=act,
                              precision=precision, backend=backend, **p)
            ref = encoder_layer_ref(x, num_heads=H, key_lengths=kl, activation=act, **p)
            tol = 2 * _encoder_bound(x, p, precision, kl, H, act) + 1e-5 * (1 + np.abs(ref))
            err = np.abs(y - ref)
            assert np.all(err <= tol), (f"{(B, L, H, hd, F)} {act}: max excess "
                                        f"{float(np.max(err - tol))}")
            if precision != "highest" and E * F > 8:
                # the precision is applied (the results are not the float32 ones)
                assert not np.array_equal(y, encoder_layer(
                    x, num_heads=H, key_lengths=kl, activation=act, backend=backend, **p))
    # empty batches and a non-contiguous x
    E, F = 8, 13
    p = encoder_layer_params(rng, E, F)
    for shape in [(0, 3, E), (2, 0, E)]:
        y = encoder_layer(np.zeros(shape, np.float32), num_heads=2, precision=precision,
                          backend=backend, **p)
        assert y.shape == shape and y.dtype == np.float32
    big = _data(rng, (2, 14, E))
    x = big[:, ::2]
    y = encoder_layer(x, num_heads=2, precision=precision, backend=backend, **p)
    np.testing.assert_array_equal(y, encoder_layer(np.ascontiguousarray(x), num_heads=2,
                                                   precision=precision, backend=backend, **p))
    ref = encoder_layer_ref(x, num_heads=2, **p)
    tol = 2 * _encoder_bound(x, p, precision, None, 2, "gelu") + 1e-5 * (1 + np.abs(ref))
    assert np.all(np.abs(y - ref) <= tol)


@pytest.mark.parametrize("precision", PRECISIONS)
def test_encoder_layer_weight_kinds(precision):
    """PackedWeight and QuantizedTensor weights: packed ones give the bits of plain ones; int8
    QuantizedTensors are used as stored under "int8"; numba agrees within the bound."""
    rng = np.random.default_rng(13)
    B, L, H, hd, F = 2, 9, 2, 8, 24
    E = H * hd
    p = encoder_layer_params(rng, E, F)
    x = _data(rng, (B, L, E))
    names = ("in_proj_weight", "out_proj_weight", "linear1_weight", "linear2_weight")
    plain = encoder_layer(x, num_heads=H, precision=precision, **p)
    packed = dict(p, **{n: PackedWeight(p[n]) for n in names})
    np.testing.assert_array_equal(encoder_layer(x, num_heads=H, precision=precision, **packed),
                                  plain)
    qts = {n: _int8_weight(p[n]) for n in names}
    deq = dict(p, **{n: np.asarray(qts[n]) for n in names})
    with_q = dict(p, **qts)
    yq = encoder_layer(x, num_heads=H, precision=precision, **with_q)
    for qt in qts.values():
        _freeze(qt)
    np.testing.assert_array_equal(encoder_layer(x, num_heads=H, precision=precision, **with_q),
                                  yq)                  # frozen: the cached packs
    np.testing.assert_array_equal(
        encoder_layer(x, num_heads=H, precision=precision,
                      **dict(p, **{n: PackedWeight(qts[n]) for n in names})), yq)
    if precision == "highest":
        np.testing.assert_array_equal(yq, encoder_layer(x, num_heads=H, **deq))
    ref = encoder_layer_ref(x, num_heads=H, **deq)
    bound = _encoder_bound(x, deq, precision, None, H, "gelu")
    assert np.all(np.abs(yq - ref) <= 2 * bound + 1e-5 * (1 + np.abs(ref)))
    if "numba" in HOST_BACKENDS:
        need_backend("numba")
        yn = encoder_layer(x, num_heads=H, precision=precision, backend="numba", **with_q)
        assert np.all(np.abs(yn - yq) <= 4 * bound + 2e-5 * (1 + np.abs(ref)))
        yp = encoder_layer(x, num_heads=H, precision=precision, backend="numba", **packed)
        np.testing.assert_array_equal(
            yp, encoder_layer(x, num_heads=H, precision=precision, backend="numba", **p))


def test_encoder_layer_int8_width_limit():
    rng = np.random.default_rng(0)
    p = encoder_layer_params(rng, 2, 65537, bias=False, norms=False)
    with pytest.raises(ShapeError, match=r"\[encoder_layer\] in_features = 65537"):
        encoder_layer(np.ones((1, 1, 2), np.float32), num_heads=1, precision="int8", **p)


# ----------------------------------------------------------------------------------------------
# properties


@pytest.mark.parametrize("backend", HOST_BACKENDS)
@settings(max_examples=examples(40), **PROPERTY_SETTINGS)
@given(M=st.integers(1, 40), K=st.integers(1, 150), N=st.integers(1, 70),
       precision=st.sampled_from(PRECISIONS), kind=st.sampled_from(WEIGHT_KINDS),
       bias=st.booleans(), scale=st.sampled_from([1e-3, 1.0, 300.0]), zero_rows=st.booleans(),
       seed=st.integers(0, 2**31 - 1))
def test_linear_property(backend, M, K, N, precision, kind, bias, scale, zero_rows, seed):
    need_backend(backend)
    rng = np.random.default_rng(seed)
    x = _data(rng, (M, K), scale)
    if zero_rows:
        x[::3] = 0
    w = _data(rng, (N, K), 1 / math.sqrt(K))
    weight, deq = _weight(w, kind)
    b = _data(rng, N) if bias else None
    y = linear(x, weight, b, precision=precision, backend=backend)
    _check_linear(y, x, weight, deq, b, precision)


def test_one_block_object_shared_by_asyncio_tasks_and_async_decorator():
    import asyncio

    block = mmcore.matmul_precision("int8")

    async def task(delay):
        with block:
            await asyncio.sleep(delay)
            inside = mmcore.get_matmul_precision()
        return inside, mmcore.get_matmul_precision()

    @mmcore.matmul_precision("bf16")
    async def decorated():
        await asyncio.sleep(0)
        return mmcore.get_matmul_precision()

    async def main():
        return await asyncio.gather(task(0.01), task(0.0), decorated())

    a, b, c = asyncio.run(main())
    assert a == b == ("int8", "highest")
    assert c == "bf16"
    assert mmcore.get_matmul_precision() == "highest"
