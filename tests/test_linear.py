"""Tests of mmcore.ops.linear (with fused activations) and mmcore.ops.layer_norm: native and Numba
against the float64 reference and each other, every compiled ISA level, awkward shapes, layouts,
dtypes, bad inputs, threads and torch."""

from __future__ import annotations

import threading

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import mmcore
from _helpers import HOST_BACKENDS, PROPERTY_SETTINGS, at_isa, examples, need_backend
from mmcore import _C
from mmcore.errors import ArgumentError, ShapeError
from mmcore.ops import layer_norm, linear
from reference import (
    activation_ref,
    bf16_round,
    layer_norm_ref,
    linear_bf16_ref,
    linear_int8_ref,
    linear_ref,
)

# sizes around the register tiles (4/6 rows; 4/8/16-lane vectors, 2-4 vectors per block)
SIZES = [1, 2, 3, 5, 6, 7, 8, 13, 15, 16, 17, 31, 32, 33, 47, 48, 49, 63, 64, 65, 97, 128, 129]


def _case(rng, lead, K, N, bias=True):
    x = rng.standard_normal((*lead, K)).astype(np.float32)
    w = (rng.standard_normal((N, K)) / max(1.0, np.sqrt(K))).astype(np.float32)
    b = rng.standard_normal(N).astype(np.float32) if bias else None
    return x, w, b


def _check(y, x, w, b):
    ref = linear_ref(x, w, b)
    assert y.dtype == np.float32 and y.shape == ref.shape
    # each output is a float32 sum of K products: error ~ K * eps * sum |x_k w_k|
    bound = np.abs(np.asarray(x, np.float64)) @ np.abs(np.asarray(w, np.float64)).T
    if b is not None:
        bound = bound + np.abs(b)
    K = x.shape[-1]
    tol = (K + 2) * 1.2e-7 * bound + 1e-30
    assert np.all(np.abs(y - ref) <= tol), float(np.max(np.abs(y - ref) - tol))


@pytest.mark.parametrize("backend", HOST_BACKENDS)
@settings(max_examples=examples(60), **PROPERTY_SETTINGS)
@given(M=st.sampled_from([0, 1, 2, 5, 6, 7, 12, 13, 193, 200]),
       K=st.sampled_from([0] + SIZES), N=st.sampled_from(SIZES),
       bias=st.booleans(), seed=st.integers(0, 2**31 - 1))
def test_matches_reference(backend, M, K, N, bias, seed):
    need_backend(backend)
    x, w, b = _case(np.random.default_rng(seed), (M,), K, N, bias)
    _check(linear(x, w, b, backend=backend), x, w, b)


@pytest.mark.parametrize("isa", ["baseline", "avx2", "avx512"])
def test_every_isa_level(isa):
    with at_isa(isa):
        rng = np.random.default_rng(1)
        for M, K, N in [(1, 1, 1), (7, 13, 17), (64, 64, 64), (13, 129, 200), (300, 48, 65)]:
            x, w, b = _case(rng, (M,), K, N)
            _check(linear(x, w, b), x, w, b)
            y = linear(x, w, b, activation="gelu")
            np.testing.assert_allclose(y, activation_ref(linear_ref(x, w, b), "gelu"),
                                       rtol=1e-5, atol=1e-5)
            g = rng.standard_normal(N).astype(np.float32)
            np.testing.assert_allclose(layer_norm(y, g, b), layer_norm_ref(y, g, b),
                                       rtol=1e-5, atol=1e-5)


def test_native_and_numba_agree_and_leading_axes():
    need_backend("numba")
    rng = np.random.default_rng(2)
    x, w, b = _case(rng, (3, 4, 5), 33, 65)
    a = linear(x, w, b, backend="native")
    c = linear(x, w, b, backend="numba")
    assert a.shape == (3, 4, 5, 65)
    np.testing.assert_allclose(a, c, rtol=1e-5, atol=1e-5)
    _check(a, x, w, b)


def test_rows_do_not_depend_on_the_batch():
    """Each output is one sum in a fixed order: a row gives the same bits alone or in a batch."""
    rng = np.random.default_rng(3)
    x, w, b = _case(rng, (37,), 70, 90)
    full = linear(x, w, b)
    for i in (0, 5, 36):
        np.testing.assert_array_equal(linear(x[i:i + 1], w, b), full[i:i + 1])
    np.testing.assert_array_equal(linear(x[6:19], w, b), full[6:19])


@pytest.mark.parametrize("backend", HOST_BACKENDS)
def test_layouts_and_dtypes(backend):
    need_backend(backend)
    rng = np.random.default_rng(4)
    x, w, b = _case(rng, (20,), 24, 40)
    # strided rows, a transposed (non-contiguous) weight, a broadcast x, float16 / float64
    xs = np.repeat(x, 2, axis=0)[::2]
    wt = np.asfortranarray(w)
    xb = np.broadcast_to(x[:1], (5, 24))
    for xx, ww, bb in [(xs, w, b), (x, wt, b), (xb, w, None), (x[:, ::-1], w[:, ::-1], b),
                       (x.astype(np.float64), w.astype(np.float16), b.astype(np.float64))]:
        y = linear(xx, ww, bb, backend=backend)
        _check(y, np.asarray(xx, np.float32), np.asarray(ww, np.float32),
               None if bb is None else np.asarray(bb, np.float32))
    np.testing.assert_array_equal(linear(xs, w, b, backend=backend),
                                  linear(np.ascontiguousarray(xs), w, b, backend=backend))


def test_k_zero_gives_the_bias_and_empty_batches():
    w = np.zeros((4, 0), np.float32)
    b = np.arange(4, dtype=np.float32)
    np.testing.assert_array_equal(linear(np.zeros((3, 0), np.float32), w, b), np.tile(b, (3, 1)))
    assert linear(np.zeros((0, 5), np.float32), np.ones((2, 5), np.float32)).shape == (0, 2)


def test_nan_and_inf_propagate():
    x = np.ones((2, 3), np.float32)
    x[0, 1] = np.nan
    w = np.ones((4, 3), np.float32)
    y = linear(x, w)
    assert np.isnan(y[0]).all() and np.all(y[1] == 3)


def test_bad_inputs_name_the_argument():
    x = np.ones((2, 3), np.float32)
    w = np.ones((4, 3), np.float32)
    with pytest.raises(ShapeError, match=r"\[linear\] x has 5 features"):
        linear(np.ones((2, 5), np.float32), w)
    with pytest.raises(ShapeError, match=r"\[linear\] weight has 3 dims"):
        linear(x, np.ones((4, 3, 1), np.float32))
    with pytest.raises(ShapeError, match=r"\[linear\] bias has shape"):
        linear(x, w, np.ones(5, np.float32))
    with pytest.raises(ShapeError, match=r"\[linear\] x has dtype int64"):
        linear(np.ones((2, 3), np.int64), w)
    with pytest.raises(ShapeError, match=r"\[linear\] x must have at least 1 dim"):
        linear(np.float32(1), w)
    with pytest.raises(ValueError, match=r"\[linear\] out must be writable"):
        _readonly_out_call(x, w)


def _readonly_out_call(x, w):
    out = np.zeros((2, 4), np.float32)
    out.setflags(write=False)
    _C.linear(x, w, None, out, num_threads=1)


def test_threads_and_concurrency_give_the_same_bits():
    rng = np.random.default_rng(5)
    x, w, b = _case(rng, (257,), 96, 160)
    before = mmcore.get_num_threads()
    try:
        mmcore.set_num_threads(1)
        one = linear(x, w, b)
        mmcore.set_num_threads(max(2, before))
        many = linear(x, w, b)
    finally:
        mmcore.set_num_threads(before)
    np.testing.assert_array_equal(one, many)
    results = [None] * 4

    def work(i):
        results[i] = linear(x, w, b)

    ts = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in ts:
        t.start()
    for t in ts:
        t.join(timeout=60)
    for r in results:
        np.testing.assert_array_equal(r, one)


def test_matches_torch_linear():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(6)
    x, w, b = _case(rng, (4, 9), 64, 192)
    want = torch.nn.functional.linear(torch.from_numpy(x), torch.from_numpy(w),
                                      torch.from_numpy(b)).numpy()
    np.testing.assert_allclose(linear(x, w, b), want, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------------------------
# fused activations


@pytest.mark.parametrize("backend", HOST_BACKENDS)
@pytest.mark.parametrize("act", ["gelu", "gelu_tanh", "quick_gelu", "relu"])
@settings(max_examples=examples(15), **PROPERTY_SETTINGS)
@given(M=st.sampled_from([1, 5, 6, 7, 64]), K=st.sampled_from([0, 1, 17, 64]),
       N=st.sampled_from([1, 15, 16, 17, 65]), seed=st.integers(0, 2**31 - 1))
def test_fused_activation_matches_reference(backend, act, M, K, N, seed):
    need_backend(backend)
    x, w, b = _case(np.random.default_rng(seed), (M,), K, N)
    x *= 3                                        # reach the curved parts of the activations
    y = linear(x, w, b, activation=act, backend=backend)
    pre = linear_ref(x, w, b)
    ref = activation_ref(pre, act)
    # the product's rounding (bounded as in _check), through an activation of slope <= 1.13
    bound = np.abs(x.astype(np.float64)) @ np.abs(w.astype(np.float64)).T + np.abs(b)
    tol = 1.2 * ((K + 2) * 1.2e-7 * bound) + 2.4e-7 * np.abs(ref) + 1e-6
    assert y.dtype == np.float32 and y.shape == ref.shape
    assert np.all(np.abs(y - ref) <= tol), float(np.max(np.abs(y - ref) - tol))


def test_fused_activation_matches_torch_and_bad_names():
    torch = pytest.importorskip("torch")
    F = torch.nn.functional
    rng = np.random.default_rng(7)
    x, w, b = _case(rng, (3, 11), 48, 96)
    y = F.linear(torch.from_numpy(x), torch.from_numpy(w), torch.from_numpy(b))
    for act, ref in [("gelu", F.gelu(y)), ("gelu_tanh", F.gelu(y, approximate="tanh")),
                     ("quick_gelu", y * torch.sigmoid(1.702 * y)), ("relu", F.relu(y))]:
        np.testing.assert_allclose(linear(x, w, b, activation=act), ref.numpy(),
                                   rtol=1e-5, atol=1e-5)
    with pytest.raises(ArgumentError, match=r"\[linear\] activation must be one of"):
        linear(x, w, b, activation="swish")


# ----------------------------------------------------------------------------------------------
# layer norm


@pytest.mark.parametrize("backend", HOST_BACKENDS)
@settings(max_examples=examples(40), **PROPERTY_SETTINGS)
@given(rows=st.sampled_from([0, 1, 2, 7, 64, 300]), D=st.sampled_from([1, 2, 3, 15, 16, 17, 64,
                                                                       127, 768]),
       affine=st.sampled_from(["none", "weight", "both"]), offset=st.sampled_from([0.0, 1e3]),
       seed=st.integers(0, 2**31 - 1))
def test_layer_norm_matches_reference(backend, rows, D, affine, offset, seed):
    need_backend(backend)
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal((rows, D)) * 2 + offset).astype(np.float32)
    w = rng.standard_normal(D).astype(np.float32) if affine != "none" else None
    b = rng.standard_normal(D).astype(np.float32) if affine == "both" else None
    y = layer_norm(x, w, b, eps=1e-5, backend=backend)
    ref = layer_norm_ref(x, w, b, 1e-5)
    scale = 1.0 if w is None else np.abs(w).astype(np.float64)
    # mean subtracted in float32 (an error of ~|x| ulp), then a few float32 roundings
    tol = (6e-7 * (np.abs(x).astype(np.float64) + 1) / np.sqrt(
        np.var(x.astype(np.float64), axis=-1, keepdims=True) + 1e-5)) * scale + 1e-6 + (
        0 if b is None else 1.2e-7 * np.abs(b))
    assert y.shape == x.shape and y.dtype == np.float32
    assert np.all(np.abs(y - ref) <= tol), float(np.max(np.abs(y - ref) - tol))


def test_layer_norm_layouts_torch_and_errors():
    rng = np.random.default_rng(8)
    x = rng.standard_normal((4, 6, 40)).astype(np.float32)
    w = rng.standard_normal(40).astype(np.float32)
    b = rng.standard_normal(40).astype(np.float32)
    y = layer_norm(x, w, b)
    np.testing.assert_array_equal(layer_norm(x[:, ::2], w, b), y[:, ::2])     # strided rows
    np.testing.assert_allclose(layer_norm(x.astype(np.float64), w, b), y, rtol=0, atol=0)
    torch = pytest.importorskip("torch")
    ref = torch.nn.functional.layer_norm(torch.from_numpy(x), (40,), torch.from_numpy(w),
                                         torch.from_numpy(b), 1e-5).numpy()
    np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-5)
    with pytest.raises(ShapeError, match=r"\[layer_norm\] weight has shape"):
        layer_norm(x, np.ones(3, np.float32))
    with pytest.raises(ArgumentError, match=r"\[layer_norm\] bias needs a weight"):
        layer_norm(x, None, b)
    with pytest.raises(ArgumentError, match=r"\[layer_norm\] eps must be"):
        layer_norm(x, eps=0.0)
    with pytest.raises(ShapeError, match=r"\[layer_norm\] x has dtype int32"):
        layer_norm(np.ones((2, 3), np.int32))


# ----------------------------------------------------------------------------------------------
# quantized weights read in place


def _quantized(w, kind):
    from mmcore.model.io import float32_to_bfloat16_bits, quantize_int8
    from mmcore.ops.linear import QuantizedTensor
    if kind == "int8":
        q, s = quantize_int8(w)
        return QuantizedTensor(q, "int8", scale=s)
    if kind == "float16":
        return QuantizedTensor(w.astype(np.float16), "float16")
    return QuantizedTensor(float32_to_bfloat16_bits(w), "bfloat16")


@pytest.mark.parametrize("kind", ["float16", "bfloat16", "int8"])
@pytest.mark.parametrize("M,K,N", [(1, 1, 1), (7, 13, 17), (64, 64, 64), (33, 129, 200)])
def test_quantized_weights_equal_their_dequantized_matrix(kind, M, K, N):
    x, w, b = _case(np.random.default_rng(M * K + N), (M,), K, N)
    qw = _quantized(w, kind)
    deq = np.asarray(qw)
    assert deq.dtype == np.float32 and deq.shape == (N, K)
    assert qw.nbytes < w.nbytes or w.size == 1          # int8 scales cost 4 bytes a row
    # the kernel widens while packing: the same bits as the float32 matrix
    np.testing.assert_array_equal(linear(x, qw, b), linear(x, deq, b))
    np.testing.assert_array_equal(linear(x, qw, b, activation="gelu"),
                                  linear(x, deq, b, activation="gelu"))
    rows = qw[2:N]                                       # row slices stay quantized
    assert type(rows) is type(qw) and rows.shape == (max(N - 2, 0), K)
    if N > 2:
        np.testing.assert_array_equal(linear(x, rows, b[2:]), linear(x, deq[2:], b[2:]))
    if "numba" in HOST_BACKENDS:
        need_backend("numba")
        np.testing.assert_allclose(linear(x, qw, b, backend="numba"), linear(x, deq, b),
                                   rtol=1e-5, atol=1e-5)


def test_float16_special_values_widen_exactly():
    from mmcore.ops.linear import QuantizedTensor
    bits = np.array([0x0001, 0x03FF, 0x0400, 0x7C00, 0xFC00, 0x8001, 0x3C00, 0x7BFF, 0x0000,
                     0x7E00], np.uint16)
    y = linear(np.ones((1, 1), np.float32), QuantizedTensor(bits.reshape(-1, 1), "float16"))
    np.testing.assert_array_equal(y.ravel(), bits.view(np.float16).astype(np.float32))


def test_quantized_tensor_errors():
    from mmcore.ops.linear import QuantizedTensor
    with pytest.raises(ArgumentError, match="kind must be one of"):
        QuantizedTensor(np.zeros((2, 2), np.int8), "int4")
    with pytest.raises(ArgumentError, match="needs scale"):
        QuantizedTensor(np.zeros((2, 2), np.int8), "int8")
    with pytest.raises(ShapeError, match=r"scale has shape"):
        QuantizedTensor(np.zeros((2, 2), np.int8), "int8", scale=np.ones(3, np.float32))
    with pytest.raises(ShapeError, match="uint16 bit patterns"):
        QuantizedTensor(np.zeros((2, 2), np.float32), "bfloat16")
    with pytest.raises(ShapeError, match="2 dims"):
        QuantizedTensor(np.zeros(4, np.uint16), "bfloat16")
    qw = QuantizedTensor(np.zeros((4, 3), np.uint16), "bfloat16")
    with pytest.raises(ShapeError, match=r"\[linear\] x has 5 features"):
        linear(np.ones((2, 5), np.float32), qw)


# --- precisions at every ISA level, and packed weights across levels --------------------------

_PRECISION_SHAPES = [(1, 1, 1), (7, 13, 17), (6, 16, 16), (5, 15, 65), (200, 96, 130),
                     (13, 777, 67), (9, 1031, 33), (2, 2, 64)]


def _precision_check(y, x, w, b, precision):
    if precision == "int8":
        ref = linear_int8_ref(x, w, b)
        tol = 1e-5 * (np.abs(ref).max() + 1.0)       # integer part exact: float32 epilogue only
    else:
        ref = linear_bf16_ref(x, w, b)
        tol = 2e-6 * np.sqrt(x.shape[-1]) * (np.abs(bf16_round(x)) @ np.abs(bf16_round(w)).T
                                             ).max() + 1e-6
    np.testing.assert_allclose(y, ref, rtol=0, atol=tol)


@pytest.mark.parametrize("isa", ["baseline", "avx2", "avx512"])
@pytest.mark.parametrize("precision", ["bf16", "int8"])
def test_precisions_at_every_isa_level(isa, precision):
    with at_isa(isa):
        rng = np.random.default_rng(5)
        for M, K, N in _PRECISION_SHAPES:
            x, w, b = _case(rng, (M,), K, N)
            y = np.empty((M, N), np.float32)
            _C.linear(x, w, b, y, precision=precision, num_threads=3)
            _precision_check(y, x, w, b, precision)
            # the same weight packed once gives the same bits
            packed = _C.pack_weight(w, precision=precision)
            y2 = np.empty_like(y)
            _C.linear(x, packed, b, y2, precision=precision, num_threads=1)
            np.testing.assert_array_equal(y2, y)


@pytest.mark.parametrize("precision", ["highest", "bf16", "int8"])
def test_packed_weight_serves_every_isa_level(precision):
    """The packed layout is the same for every target: a weight packed at one level gives the
    results of the plain weight at every other level."""
    before = _C.isa_level()
    levels = [i for i in _C.compiled_isas() if _C.set_isa_cap(i)]
    _C.set_isa_cap(before)
    rng = np.random.default_rng(6)
    x, w, b = _case(rng, (37,), 777, 131)
    try:
        for pack_at in levels:
            _C.set_isa_cap(pack_at)
            packed = _C.pack_weight(w, precision=precision)
            for run_at in levels:
                _C.set_isa_cap(run_at)
                y = np.empty((37, 131), np.float32)
                y_plain = np.empty_like(y)
                _C.linear(x, packed, b, y, precision=precision, num_threads=2)
                _C.linear(x, w, b, y_plain, precision=precision, num_threads=2)
                np.testing.assert_array_equal(y, y_plain)
    finally:
        _C.set_isa_cap(before)


def test_int8_weights_as_stored_and_quantized_once():
    rng = np.random.default_rng(7)
    x = rng.standard_normal((11, 70)).astype(np.float32)
    q = rng.integers(-128, 128, (19, 70)).astype(np.int8)
    s = (rng.random(19) * 0.1 + 0.01).astype(np.float32)
    y = np.empty((11, 19), np.float32)
    _C.linear(x, q, None, y, weight_kind="int8", weight_scale=s, precision="int8", num_threads=2)
    ref = linear_int8_ref(x, q=q, scale=s)
    np.testing.assert_allclose(y, ref, rtol=0, atol=1e-5 * np.abs(ref).max())
    # a row of x holding a NaN or an infinity gives NaN outputs in that row only
    x[3, 5] = np.nan
    x[4, 0] = np.inf
    _C.linear(x, q, None, y, weight_kind="int8", weight_scale=s, precision="int8", num_threads=2)
    assert np.isnan(y[3]).all() and np.isnan(y[4]).all()
    assert np.isfinite(np.delete(y, [3, 4], axis=0)).all()


def test_packed_weight_mismatch_and_int8_depth_are_refused():
    w = np.ones((4, 3), np.float32)
    x = np.ones((2, 3), np.float32)
    y = np.empty((2, 4), np.float32)
    packed = _C.pack_weight(w, precision="int8")
    assert packed.shape == (4, 3) and packed.precision == "int8" and packed.nbytes > 0
    with pytest.raises(ValueError, match=r"\[linear\] weight was packed for another precision"):
        _C.linear(x, packed, None, y, precision="bf16", num_threads=1)
    with pytest.raises(ValueError, match=r"\[linear\] weight is packed with shape \(4, 3\)"):
        _C.linear(np.ones((2, 5), np.float32), packed, None, y, precision="int8", num_threads=1)
    with pytest.raises(ValueError, match=r"\[linear\] precision must be one of"):
        _C.linear(x, w, None, y, precision="fp8", num_threads=1)
    big = np.zeros((1, 65537), np.float32)
    with pytest.raises(ValueError, match=r"\[pack_weight\] precision 'int8' supports in_features"):
        _C.pack_weight(big, precision="int8")


@pytest.mark.parametrize("backend", HOST_BACKENDS)
def test_int8_rows_of_tiny_range_quantize_to_zero(backend):
    """A row whose range is so small that 1 / scale overflows takes scale 1 (so its values
    quantize to 0), in the kernels, the numba fallback and the reference alike."""
    need_backend(backend)
    x = np.array([[1e-38, 0, -1e-38, 5e-39], [1.0, 2.0, -1.0, 0.5]], np.float32)
    w = np.array([[1e-38, 0, 0, 0], [1.0, 1.0, 1.0, 1.0]], np.float32)
    y = linear(x, w, precision="int8", backend=backend)
    ref = linear_int8_ref(x, w)
    assert np.isfinite(y).all()
    np.testing.assert_allclose(y, ref, rtol=1e-6, atol=1e-30)
    assert y[0, 1] == 0.0 and y[1, 0] == 0.0
