"""Tests of mmcore.ops.encoder_layer: native (one fused call) and numba (the composition of the
numba kernels) against the float64 reference and each other, awkward shapes, layouts, quantized
weights, and bad arguments raising errors that name them."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from _helpers import HOST_BACKENDS, PROPERTY_SETTINGS, encoder_layer_params, examples, need_backend
from mmcore.errors import ArgumentError, BackendError, ShapeError
from mmcore.ops import encoder_layer
from mmcore.ops.linear import QuantizedTensor
from reference import encoder_layer_ref

ACTS = ["gelu", "gelu_tanh", "quick_gelu", "relu", None]


def _assert_close(y, ref, what=""):
    assert y.dtype == np.float32 and y.shape == ref.shape
    err = np.abs(y.astype(np.float64) - ref)
    tol = 2e-4 * (1.0 + np.abs(ref))
    assert np.all(err <= tol), f"{what}: max excess {float(np.max(err - tol))}"


@pytest.mark.parametrize("backend", HOST_BACKENDS)
@settings(max_examples=examples(25), **PROPERTY_SETTINGS)
@given(B=st.sampled_from([0, 1, 2, 3]), L=st.sampled_from([1, 2, 5, 7, 13]),
       H=st.sampled_from([1, 2, 3]), hd=st.sampled_from([1, 2, 5, 8]),
       F=st.sampled_from([1, 3, 17]), act=st.sampled_from(ACTS), bias=st.booleans(),
       norms=st.booleans(), padded=st.booleans(), layout=st.sampled_from(["c", "strided",
                                                                          "float64"]),
       seed=st.integers(0, 2**31 - 1))
def test_matches_reference(backend, B, L, H, hd, F, act, bias, norms, padded, layout, seed):
    need_backend(backend)
    rng = np.random.default_rng(seed)
    E = H * hd
    p = encoder_layer_params(rng, E, F, bias=bias, norms=norms)
    x = rng.standard_normal((B, L, E)).astype(np.float32)
    if layout == "strided":       # every other row of a bigger array: not contiguous
        big = np.zeros((B, 2 * L, E), np.float32)
        big[:, ::2] = x
        x_in = big[:, ::2]
        assert not x_in.flags.c_contiguous or B * L <= 1
    elif layout == "float64":
        x_in = x.astype(np.float64)
    else:
        x_in = x
    kl = rng.integers(0, L + 1, B) if padded else None
    y = encoder_layer(x_in, num_heads=H, activation=act, key_lengths=kl, backend=backend, **p)
    ref = encoder_layer_ref(x, num_heads=H, activation=act, key_lengths=kl, **p)
    _assert_close(y, ref, backend)


@pytest.mark.parametrize("E,H,F,L", [(1, 1, 1, 1), (7, 7, 11, 13), (12, 3, 31, 17),
                                     (64, 4, 128, 33)])
def test_native_and_numba_agree(E, H, F, L):
    need_backend("numba")
    rng = np.random.default_rng(E * 100 + L)
    p = encoder_layer_params(rng, E, F)
    x = rng.standard_normal((3, L, E)).astype(np.float32)
    kl = np.array([L, 0, max(1, L // 2)])
    a = encoder_layer(x, num_heads=H, key_lengths=kl, backend="native", **p)
    b = encoder_layer(x, num_heads=H, key_lengths=kl, backend="numba", **p)
    np.testing.assert_allclose(a, b, rtol=2e-4, atol=2e-4)
    ref = encoder_layer_ref(x, num_heads=H, key_lengths=kl, **p)
    _assert_close(a, ref, "native")


def test_zero_key_lengths_row_is_x_plus_mlp():
    rng = np.random.default_rng(1)
    E, F = 8, 16
    p = encoder_layer_params(rng, E, F)
    x = rng.standard_normal((2, 4, E)).astype(np.float32)
    y0 = encoder_layer(x, num_heads=2, key_lengths=np.array([0, 4]), **p)
    # with no key to attend to, the attention half adds exactly nothing (no NaN, no out bias)
    ref = encoder_layer_ref(x, num_heads=2, key_lengths=np.array([0, 4]), **p)
    assert np.isfinite(y0).all()
    _assert_close(y0, ref)


@pytest.mark.parametrize("backend", HOST_BACKENDS)
@pytest.mark.parametrize("kind", ["float16", "bfloat16", "int8"])
def test_quantized_weights(backend, kind):
    need_backend(backend)
    rng = np.random.default_rng(2)
    E, F = 16, 24
    p = encoder_layer_params(rng, E, F)
    q = {}
    for name in ("in_proj_weight", "out_proj_weight", "linear1_weight", "linear2_weight"):
        w = p[name]
        if kind == "float16":
            q[name] = QuantizedTensor(w.astype(np.float16), "float16")
        elif kind == "bfloat16":
            bits = (w.view(np.uint32) >> 16).astype(np.uint16)
            q[name] = QuantizedTensor(bits, "bfloat16")
        else:
            s = (np.abs(w).max(axis=1) / 127).astype(np.float32)
            q[name] = QuantizedTensor(np.round(w / s[:, None]).astype(np.int8), "int8", scale=s)
    x = rng.standard_normal((2, 5, E)).astype(np.float32)
    y = encoder_layer(x, num_heads=4, backend=backend, **{**p, **q})
    ref = encoder_layer_ref(x, num_heads=4, **{**p, **{k: np.asarray(v) for k, v in q.items()}})
    _assert_close(y, ref, kind)


def test_scale_and_temperature():
    rng = np.random.default_rng(3)
    E, F = 8, 8
    p = encoder_layer_params(rng, E, F)
    x = rng.standard_normal((1, 6, E)).astype(np.float32)
    y = encoder_layer(x, num_heads=2, scale=0.3, temperature=2.0, **p)
    _assert_close(y, encoder_layer_ref(x, num_heads=2, scale=0.3, temperature=2.0, **p))
    a = encoder_layer(x, num_heads=2, temperature=0.5, **p)
    b = encoder_layer(x, num_heads=2, scale=2.0 / np.sqrt(4), **p)
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)


def test_matches_the_layer():
    from mmcore.model import TransformerEncoderLayer
    layer = TransformerEncoderLayer(12, 3, 20, rng=0)
    x = np.random.default_rng(4).standard_normal((2, 5, 12)).astype(np.float32)
    mask = np.array([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0]])
    y = encoder_layer(x, num_heads=3, key_lengths=mask.sum(1),
                      in_proj_weight=layer.self_attn.in_proj_weight,
                      in_proj_bias=layer.self_attn.in_proj_bias,
                      out_proj_weight=layer.self_attn.out_proj.weight,
                      out_proj_bias=layer.self_attn.out_proj.bias,
                      linear1_weight=layer.linear1.weight, linear1_bias=layer.linear1.bias,
                      linear2_weight=layer.linear2.weight, linear2_bias=layer.linear2.bias,
                      norm1_weight=layer.norm1.weight, norm1_bias=layer.norm1.bias,
                      norm2_weight=layer.norm2.weight, norm2_bias=layer.norm2.bias)
    np.testing.assert_array_equal(y, layer(x, attention_mask=mask))


# ----------------------------------------------------------------------------------------------
# bad arguments


def _good(E=8, F=16):
    return encoder_layer_params(np.random.default_rng(5), E, F)


@pytest.mark.parametrize("change,err,msg", [
    (dict(num_heads=3), ArgumentError, r"\[encoder_layer\] num_heads = 3 does not divide E = 8"),
    (dict(num_heads=True), ArgumentError, r"\[encoder_layer\] num_heads must be an int"),
    (dict(num_heads=0), ArgumentError, r"\[encoder_layer\] num_heads must be >= 1"),
    (dict(activation="swish"), ArgumentError, r"\[encoder_layer\] activation must be one of"),
    (dict(eps1=0.0), ArgumentError, r"\[encoder_layer\] eps1 must be > 0"),
    (dict(eps2=float("nan")), ArgumentError, r"\[encoder_layer\] eps2 must be finite"),
    (dict(temperature=0.0), ArgumentError, r"\[encoder_layer\] temperature must be > 0"),
    (dict(scale="1"), ArgumentError, r"\[encoder_layer\] scale must be a real number"),
    (dict(in_proj_weight=np.zeros((8, 8), np.float32)), ShapeError,
     r"\[encoder_layer\] in_proj_weight has shape \(8, 8\), expected \(24, 8\)"),
    (dict(linear2_weight=np.zeros((8, 15), np.float32)), ShapeError,
     r"\[encoder_layer\] linear2_weight has shape \(8, 15\), expected \(8, 16\)"),
    (dict(linear1_weight=np.zeros((16, 8), np.int32)), ShapeError,
     r"\[encoder_layer\] linear1_weight has dtype int32"),
    (dict(out_proj_weight=np.zeros(8, np.float32)), ShapeError,
     r"\[encoder_layer\] out_proj_weight has 1 dims, expected 2"),
    (dict(linear1_bias=np.zeros(8, np.float32)), ShapeError,
     r"\[encoder_layer\] linear1_bias has shape \(8,\), expected \(16,\)"),
    (dict(norm1_weight=None, norm1_bias=np.zeros(8, np.float32)), ArgumentError,
     r"\[encoder_layer\] norm1_bias needs norm1_weight"),
    (dict(key_lengths=np.array([9, 1])), ShapeError,
     r"\[encoder_layer\] key_lengths must lie in \[0, L = 4\]"),
    (dict(key_lengths=np.array([1.0, 1.0])), ShapeError,
     r"\[encoder_layer\] key_lengths has dtype float64"),
    (dict(key_lengths=np.array([1])), ShapeError,
     r"\[encoder_layer\] key_lengths has shape \(1,\), expected \(2,\)"),
    (dict(backend="cuda"), BackendError, r"\[encoder_layer\] backend 'cuda' needs arrays"),
    (dict(backend="tpu"), ArgumentError, r"\[encoder_layer\] unknown backend 'tpu'"),
])
def test_bad_arguments_are_named(change, err, msg):
    kw = dict(num_heads=2, **_good())
    kw.update(change)
    x = np.zeros((2, 4, 8), np.float32)
    with pytest.raises(err, match=msg):
        encoder_layer(x, **kw)


@pytest.mark.parametrize("x,msg", [
    (np.zeros((4, 8), np.float32), r"\[encoder_layer\] x has 2 dims, expected 3 \(B, L, E\)"),
    (np.zeros((2, 4, 8), np.int64), r"\[encoder_layer\] x has dtype int64"),
    (np.zeros((2, 4, 0), np.float32), r"\[encoder_layer\] x has E = 0 features"),
    (np.zeros((2, 4, 6), np.float32), r"\[encoder_layer\] in_proj_weight has shape"),
])
def test_bad_x(x, msg):
    with pytest.raises(ShapeError, match=msg):
        encoder_layer(x, num_heads=2, **_good())


def test_empty_batch_and_sequence():
    for shape in [(0, 4, 8), (2, 0, 8)]:
        y = encoder_layer(np.zeros(shape, np.float32), num_heads=2, **_good())
        assert y.shape == shape and y.dtype == np.float32


def test_public_and_doctest():
    import doctest
    import importlib

    import mmcore
    mod = importlib.import_module("mmcore.ops.encoder_layer")
    assert mmcore.ops.encoder_layer is encoder_layer and "encoder_layer" in mmcore.ops.__all__
    failures, tried = doctest.testmod(mod, optionflags=doctest.NORMALIZE_WHITESPACE)
    assert tried > 0 and failures == 0
