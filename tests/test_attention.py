"""Tests of mmcore.ops.attention: every backend against the float64 reference and each other."""

from __future__ import annotations

import math
import os
import subprocess
import sys
import tempfile

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import mmcore
from _helpers import HOST_BACKENDS, PROPERTY_SETTINGS, at_isa, examples
from _helpers import need_backend as _need_backend
from mmcore.errors import ArgumentError, BackendError, MMCoreError, ShapeError
from mmcore.ops import attention
from mmcore.ops.attention import dropout_threshold
from reference import attention_ref, dropout_bits_np, dropout_threshold_ref

# float32 tolerances on unit-scale data; float16 inputs are compared against the reference on
# the float16-rounded inputs, so only the float32 compute error remains, with extra slack.
ATOL32, RTOL32 = 2e-5, 1e-4
ATOL16, RTOL16 = 1e-3, 1e-3

SIZES = [1, 2, 5, 31, 37, 61, 63, 64, 65, 127, 128, 129, 255, 257]
SMALL_SIZES = [1, 2, 3, 7, 31, 37, 61, 64, 65]
D_CHOICES = [1, 3, 16, 31, 64, 65, 80, 128]

# MMCORE_TEST_EXAMPLES multiplies the number of hypothesis examples (e.g. 20 for a long soak).


# Subprocesses run outside the source tree so that they import the installed package
# (with its compiled modules), not the mmcore/ folder of a checkout.
_OUTSIDE_SOURCE = tempfile.gettempdir()


def run(q, k, v, backend, **kw):
    """Call attention asking for everything; returns (out, weights, lse)."""
    out, w, lse = attention(q, k, v, backend=backend, return_weights=True, return_lse=True, **kw)
    assert out.dtype == np.float32 and w.dtype == np.float32 and lse.dtype == np.float32
    return out, w, lse


def assert_close(actual, expected, atol=ATOL32, rtol=RTOL32, what=""):
    # assert_allclose treats equal infinities as equal, which the lse of empty rows needs.
    np.testing.assert_allclose(np.asarray(actual, np.float64), np.asarray(expected, np.float64),
                               atol=atol, rtol=rtol, err_msg=what)


def assert_matches_reference(res, ref, atol=ATOL32, rtol=RTOL32):
    out, w, lse = res
    r_out, r_w, r_lse = ref
    assert not np.isnan(out).any() and not np.isnan(w).any() and not np.isnan(lse).any()
    assert_close(w, r_w, atol, rtol, "weights")
    assert_close(out, r_out, atol, rtol, "out")
    assert_close(lse, r_lse, atol, rtol, "lse")


def check_invariants(res, dropout=False, atol=ATOL32):
    out, w, lse = res
    assert np.isfinite(out).all()
    assert np.isfinite(w).all() and (w >= 0).all()
    assert not np.isnan(lse).any() and not np.isposinf(lse).any()
    empty = np.isneginf(lse)
    assert (w[empty] == 0).all()
    assert (out[empty] == 0).all()
    if not dropout:
        sums = w.astype(np.float64).sum(-1)
        assert_close(sums, np.where(empty, 0.0, 1.0), atol=1e-5, rtol=0, what="row sums")
    return empty


def check_out_is_weights_at_v(res, v, atol=ATOL32, rtol=RTOL32):
    out, w, _ = res
    expected = np.matmul(w.astype(np.float64), np.asarray(v, np.float64))
    assert_close(out, expected, atol, rtol, "out vs weights @ v")


# ----------------------------------------------------------------------------------------------
# random cases


def make_case(rng, B, H, Lq, Lk, D, Dv, *, mask_kind=None, mask_density=0.7, kl_kind=None,
              bias_kind=None, bias_neginf=0.0, scale=None, temperature=1.0, dropout_p=0.0,
              seed=0, dtype=np.float32):
    q = rng.standard_normal((B, H, Lq, D)).astype(dtype)
    k = rng.standard_normal((B, H, Lk, D)).astype(dtype)
    v = rng.standard_normal((B, H, Lk, Dv)).astype(dtype)
    kw = {}
    mask_shapes = {
        "full": (B, H, Lq, Lk), "LqLk": (Lq, Lk), "B11Lk": (B, 1, 1, Lk),
        "1HLqLk": (1, H, Lq, Lk), "Lk": (Lk,), "B1Lq1": (B, 1, Lq, 1), "scalar": (),
    }
    if mask_kind is not None:
        m = rng.random(mask_shapes[mask_kind]) < mask_density
        if mask_kind in ("full", "LqLk", "1HLqLk") and Lq > 1:
            m[..., 0, :] = False                     # one fully masked query row
        kw["mask"] = m
    if kl_kind is not None:
        kl = rng.integers(0, Lk + 1, size=B)
        if kl_kind == "zero_first":
            kl[0] = 0
        elif kl_kind == "full":
            kl[:] = Lk
        kw["key_lengths"] = kl
    bias_shapes = {"full": (B, H, Lq, Lk), "LqLk": (Lq, Lk), "1H1Lk": (1, H, 1, Lk),
                   "B1Lq1": (B, 1, Lq, 1)}
    if bias_kind is not None:
        bshape = bias_shapes[bias_kind]
        bb = (0.5 * rng.standard_normal(bshape)).astype(np.float32)
        if bias_neginf > 0:
            bb[rng.random(bshape) < bias_neginf] = -np.inf
            if bias_kind in ("full", "LqLk") and Lq > 2:
                bb[..., 1, :] = -np.inf              # a row excluded by bias alone
        kw["bias"] = bb
    if scale is not None:
        kw["scale"] = scale
    if temperature != 1.0:
        kw["temperature"] = temperature
    if dropout_p:
        kw["dropout_p"] = dropout_p
        kw["seed"] = seed
    return q, k, v, kw


@st.composite
def cases(draw, sizes=SIZES, dropout=True):
    B = draw(st.integers(1, 3))
    H = draw(st.integers(1, 3))
    Lq = draw(st.sampled_from(sizes))
    Lk = draw(st.sampled_from(sizes))
    D = draw(st.sampled_from(D_CHOICES))
    Dv = draw(st.one_of(st.just(D), st.sampled_from(D_CHOICES)))
    if B * H * Lq * Lk * max(D, Dv) > 8_000_000:      # keep each example cheap
        B, H = 1, 1
    opts = dict(
        mask_kind=draw(st.sampled_from([None, None, "full", "LqLk", "B11Lk", "1HLqLk", "Lk",
                                        "B1Lq1", "scalar"])),
        mask_density=draw(st.sampled_from([0.0, 0.3, 0.7, 0.95])),
        kl_kind=draw(st.sampled_from([None, None, "random", "zero_first", "full"])),
        bias_kind=draw(st.sampled_from([None, None, "full", "LqLk", "1H1Lk", "B1Lq1"])),
        bias_neginf=draw(st.sampled_from([0.0, 0.0, 0.2])),
        scale=draw(st.sampled_from([None, None, 0.05, 0.2, 1.0 / D])),
        temperature=draw(st.sampled_from([1.0, 1.0, 0.7, 2.5])),
        dropout_p=draw(st.sampled_from([0.0, 0.0, 0.0, 0.1, 0.5])) if dropout else 0.0,
        seed=draw(st.integers(0, 2**64 - 1)),
    )
    data_seed = draw(st.integers(0, 2**32 - 1))
    return (B, H, Lq, Lk, D, Dv), opts, data_seed


def _ref(q, k, v, kw):
    return attention_ref(q, k, v, **kw)


@pytest.mark.parametrize("name", HOST_BACKENDS)
@settings(max_examples=examples(200), **PROPERTY_SETTINGS)
@given(case=cases())
def test_property_vs_reference(name, case):
    _need_backend(name)
    shape, opts, data_seed = case
    q, k, v, kw = make_case(np.random.default_rng(data_seed), *shape, **opts)
    res = run(q, k, v, name, **kw)
    assert_matches_reference(res, _ref(q, k, v, kw))
    check_invariants(res, dropout=bool(kw.get("dropout_p")))
    check_out_is_weights_at_v(res, v)


@settings(max_examples=examples(200), **PROPERTY_SETTINGS)
@given(case=cases())
def test_property_native_vs_numba(case):
    _need_backend("numba")
    shape, opts, data_seed = case
    q, k, v, kw = make_case(np.random.default_rng(data_seed), *shape, **opts)
    a = run(q, k, v, "native", **kw)
    b = run(q, k, v, "numba", **kw)
    for x, y, what in zip(a, b, ("out", "weights", "lse")):
        assert_close(x, y, what=what)
    # identical masking / dropout decisions
    np.testing.assert_array_equal(a[1] == 0, b[1] == 0)
    np.testing.assert_array_equal(np.isneginf(a[2]), np.isneginf(b[2]))


@pytest.mark.parametrize("name", HOST_BACKENDS)
@settings(max_examples=examples(50), **PROPERTY_SETTINGS)
@given(case=cases(sizes=SMALL_SIZES, dropout=False))
def test_property_float16(name, case):
    _need_backend(name)
    shape, opts, data_seed = case
    q, k, v, kw = make_case(np.random.default_rng(data_seed), *shape, dtype=np.float16, **opts)
    res = run(q, k, v, name, **kw)
    # reference on the float16-rounded inputs, upcast
    ref = _ref(q.astype(np.float64), k.astype(np.float64), v.astype(np.float64), kw)
    assert_matches_reference(res, ref, atol=ATOL16, rtol=RTOL16)
    check_invariants(res)


@pytest.mark.parametrize("name", HOST_BACKENDS)
@settings(max_examples=examples(60), **PROPERTY_SETTINGS)
@given(case=cases(sizes=SMALL_SIZES))
def test_property_out_only_matches_full(name, case):
    """The no-weights (online softmax) path agrees with the materializing one."""
    _need_backend(name)
    shape, opts, data_seed = case
    q, k, v, kw = make_case(np.random.default_rng(data_seed), *shape, **opts)
    out_only = attention(q, k, v, backend=name, **kw)
    out_lse, lse = attention(q, k, v, backend=name, return_lse=True, **kw)
    out_full, w = attention(q, k, v, backend=name, return_weights=True, **kw)
    ref_out, _, ref_lse = _ref(q, k, v, kw)
    assert isinstance(out_only, np.ndarray)
    assert_close(out_only, ref_out)
    assert_close(out_lse, ref_out)
    assert_close(lse, ref_lse)
    assert_close(out_full, out_only)


# ----------------------------------------------------------------------------------------------
# fixed cases: awkward shapes, empty rows, empty arrays


@pytest.mark.parametrize("Lq,Lk", [(1, 1), (1, 64), (64, 1), (31, 37), (63, 65), (128, 129),
                                   (129, 127), (257, 255)])
@pytest.mark.parametrize("D,Dv", [(1, 1), (3, 5), (64, 64), (80, 16), (128, 65)])
def test_awkward_sizes(backend, Lq, Lk, D, Dv):
    rng = np.random.default_rng(Lq * 1000 + Lk + D)
    q, k, v, kw = make_case(rng, 2, 2, Lq, Lk, D, Dv, mask_kind="LqLk", kl_kind="random")
    res = run(q, k, v, backend, **kw)
    assert_matches_reference(res, _ref(q, k, v, kw))
    check_invariants(res)
    check_out_is_weights_at_v(res, v)


def test_fully_masked_rows(backend):
    rng = np.random.default_rng(1)
    B, H, Lq, Lk, D = 3, 2, 6, 9, 8
    q, k, v, _ = make_case(rng, B, H, Lq, Lk, D, 5)
    mask = np.ones((B, H, Lq, Lk), bool)
    mask[0, 0, 2] = False                             # mask alone
    bias = np.zeros((B, H, Lq, Lk), np.float32)
    bias[1, 1, 3] = -np.inf                           # bias alone
    bias[2, 0, 4, :4] = -np.inf                       # bias + mask together
    mask[2, 0, 4, 4:] = False
    kl = np.array([Lk, Lk, Lk])
    res = run(q, k, v, backend, mask=mask, bias=bias, key_lengths=kl)
    out, w, lse = res
    for idx in [(0, 0, 2), (1, 1, 3), (2, 0, 4)]:
        assert (out[idx] == 0).all() and (w[idx] == 0).all() and lse[idx] == -np.inf
    assert np.isfinite(lse).sum() == B * H * Lq - 3
    assert_matches_reference(res, _ref(q, k, v, dict(mask=mask, bias=bias, key_lengths=kl)))
    check_invariants(res)

    # everything masked, through each mechanism, also with dropout on
    for kw in (dict(mask=np.zeros((Lq, Lk), bool)), dict(key_lengths=np.zeros(B, np.int64)),
               dict(bias=np.full((1, 1, 1, Lk), -np.inf, np.float32)),
               dict(mask=np.zeros((), bool), dropout_p=0.3, seed=1)):
        out, w, lse = run(q, k, v, backend, **kw)
        assert (out == 0).all() and (w == 0).all() and np.isneginf(lse).all()


def test_key_lengths_zero_for_some_batches(backend):
    rng = np.random.default_rng(2)
    q, k, v, _ = make_case(rng, 3, 2, 5, 40, 16, 8)
    kl = np.array([0, 17, 40], np.int32)
    out, w, lse = run(q, k, v, backend, key_lengths=kl)
    assert (out[0] == 0).all() and np.isneginf(lse[0]).all()
    assert (w[1, ..., 17:] == 0).all() and (w[1, ..., :17] > 0).all()
    # the keys beyond the length never matter, not even as NaN
    k2, v2 = k.copy(), v.copy()
    k2[1, :, 17:] = np.nan
    v2[1, :, 17:] = np.nan
    k2[0] = np.nan
    v2[0] = np.nan
    res2 = run(q, k2, v2, backend, key_lengths=kl)
    assert_close(res2[0], out, atol=0, rtol=0)
    assert_matches_reference((out, w, lse), _ref(q, k, v, dict(key_lengths=kl)))


def test_nan_in_excluded_keys_is_ignored(backend):
    """Keys excluded by mask or key_lengths may hold anything (padding): they are never used."""
    rng = np.random.default_rng(20)
    q, k, v, _ = make_case(rng, 2, 2, 6, 50, 8, 4)
    mask = np.ones((6, 50), bool)
    mask[:, 10:20] = False
    kl = np.array([50, 35])
    k2, v2 = k.copy(), v.copy()
    k2[:, :, 10:20] = np.nan                    # under the mask
    k2[1, :, 35:] = np.nan                      # beyond the key length
    v2[1, :, 35:] = np.inf
    a = run(q, k, v, backend, mask=mask, key_lengths=kl)
    b = run(q, k2, v2, backend, mask=mask, key_lengths=kl)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)
    assert_matches_reference(b, _ref(q, k2, v2, dict(mask=mask, key_lengths=kl)))


@pytest.mark.parametrize("name", HOST_BACKENDS)
@pytest.mark.parametrize("where", ["mask", "bias", "dropout"])
def test_nan_in_values_with_zero_weight_follows_ieee(name, where):
    """out is weights @ v in IEEE arithmetic: NaN in v reaches non-empty rows even at weight 0
    (as in PyTorch's SDPA); use key_lengths for padding that may hold anything."""
    _need_backend(name)
    rng = np.random.default_rng(22)
    q, k, v, _ = make_case(rng, 1, 2, 7, 30, 8, 4)
    kw = {"mask": dict(mask=np.arange(30) % 3 != 0),
          "bias": dict(bias=np.where(np.arange(30) % 3 != 0, 0.0, -np.inf).astype(np.float32)),
          "dropout": dict(dropout_p=0.5, seed=11)}[where]
    if where == "dropout":
        q = q[:, :, :1].copy()                  # one row per head: some keys dropped in all
    clean = run(q, k, v, name, **kw)
    zero_w = (clean[1] == 0).all(axis=(0, 1, 2))           # keys with weight 0 in every row
    assert zero_w.any()
    v2 = v.copy()
    v2[:, :, zero_w, 1] = np.nan
    res = run(q, k, v2, name, **kw)
    np.testing.assert_array_equal(res[1], clean[1])        # weights and lse are untouched
    np.testing.assert_array_equal(res[2], clean[2])
    assert np.isnan(res[0][..., 1]).all()                  # column 1 of every row is NaN
    np.testing.assert_array_equal(np.delete(res[0], 1, axis=-1), np.delete(clean[0], 1, axis=-1))
    ref = _ref(q, k, v2, kw)
    np.testing.assert_array_equal(np.isnan(ref[0]), np.isnan(res[0]))


def test_fully_masked_rows_stay_zero_with_nan_values(backend):
    rng = np.random.default_rng(24)
    q, k, v, _ = make_case(rng, 1, 1, 4, 6, 8, 3)
    mask = np.ones((4, 6), bool)
    mask[2] = False                             # row 2 attends to nothing
    v[0, 0, 3, 0] = np.nan
    out, w, lse = run(q, k, v, backend, mask=mask)
    assert (out[0, 0, 2] == 0).all() and np.isneginf(lse[0, 0, 2]) and (w[0, 0, 2] == 0).all()


@pytest.mark.parametrize("name", HOST_BACKENDS)
@pytest.mark.parametrize("where", ["q_row", "k_key"])
def test_nan_scores_propagate(name, where):
    """A NaN score of an attended key is never hidden: its whole row becomes NaN."""
    _need_backend(name)
    rng = np.random.default_rng(21)
    q, k, v, _ = make_case(rng, 2, 2, 5, 9, 8, 4)
    if where == "q_row":
        q[0, 1, 2, 3] = np.nan                  # one query row
    else:
        k[1, 0, 4, 0] = np.nan                  # one key: every row of (b=1, h=0)
    kw = dict(dropout_p=0.3, seed=5)
    res = run(q, k, v, name, **kw)
    ref = _ref(q, k, v, kw)
    for x, y, what in zip(res, ref, ("out", "weights", "lse")):
        np.testing.assert_array_equal(np.isnan(x), np.isnan(y), err_msg=what)
    assert np.isnan(res[2]).sum() == (1 if where == "q_row" else 5)
    assert_matches_reference(tuple(np.nan_to_num(x, nan=7.0) for x in res),
                             tuple(np.nan_to_num(x, nan=7.0) for x in ref))


def test_nan_in_attended_values_propagates(backend):
    rng = np.random.default_rng(23)
    q, k, v, _ = make_case(rng, 2, 2, 5, 9, 8, 4)
    v[0, 0, 7, 2] = np.nan                      # column 2 of out for (b=0, h=0)
    out, w, lse = run(q, k, v, backend)
    expected = np.zeros(out.shape, bool)
    expected[0, 0, :, 2] = True
    np.testing.assert_array_equal(np.isnan(out), expected)
    assert np.isfinite(w).all() and np.isfinite(lse).all()


@pytest.mark.parametrize("shape", [(0, 2, 3, 4, 4, 5), (2, 0, 3, 4, 4, 5), (2, 2, 0, 4, 4, 5),
                                   (2, 2, 3, 0, 4, 5), (2, 2, 3, 4, 4, 0), (1, 1, 1, 0, 1, 0)])
def test_empty_arrays(backend, shape):
    B, H, Lq, Lk, D, Dv = shape
    rng = np.random.default_rng(3)
    q, k, v, _ = make_case(rng, B, H, Lq, Lk, D, Dv)
    kw = dict(mask=np.ones((Lq, Lk), bool), bias=np.zeros((1, 1, 1, Lk), np.float32),
              key_lengths=np.full(B, Lk))
    out, w, lse = run(q, k, v, backend, **kw)
    assert out.shape == (B, H, Lq, Dv) and w.shape == (B, H, Lq, Lk) and lse.shape == (B, H, Lq)
    assert not np.isnan(out).any() and not np.isnan(lse).any()
    r_out, r_w, r_lse = _ref(q, k, v, kw)
    assert_close(out, r_out)
    assert_close(w, r_w)
    assert_close(lse, r_lse)
    if Lk == 0:
        assert (out == 0).all() and np.isneginf(lse).all()


def test_return_forms(backend):
    q = np.random.default_rng(4).standard_normal((1, 2, 3, 8)).astype(np.float32)
    out = attention(q, q, q, backend=backend)
    assert isinstance(out, np.ndarray) and out.shape == (1, 2, 3, 8)
    r = attention(q, q, q, backend=backend, return_weights=True)
    assert isinstance(r, tuple) and len(r) == 2 and r[1].shape == (1, 2, 3, 3)
    r = attention(q, q, q, backend=backend, return_lse=True)
    assert isinstance(r, tuple) and len(r) == 2 and r[1].shape == (1, 2, 3)
    r = attention(q, q, q, backend=backend, return_weights=True, return_lse=True)
    assert len(r) == 3 and r[1].shape == (1, 2, 3, 3) and r[2].shape == (1, 2, 3)
    for x in r:
        assert x.flags.c_contiguous and x.dtype == np.float32


def test_scale_and_temperature(backend):
    rng = np.random.default_rng(5)
    q, k, v, _ = make_case(rng, 2, 2, 7, 11, 24, 6)
    base = run(q, k, v, backend)
    explicit = run(q, k, v, backend, scale=1 / math.sqrt(24))
    for a, b in zip(base, explicit):
        assert_close(a, b, atol=1e-6, rtol=1e-6)
    t = run(q, k, v, backend, scale=0.3, temperature=2.0)
    s = run(q, k, v, backend, scale=0.15)
    for a, b in zip(t, s):
        assert_close(a, b, atol=1e-6, rtol=1e-6)
    assert_matches_reference(t, _ref(q, k, v, dict(scale=0.3, temperature=2.0)))
    neg = run(q, k, v, backend, scale=-0.5)          # a negative scale is allowed
    assert_matches_reference(neg, _ref(q, k, v, dict(scale=-0.5)))
    zero = run(q, k, v, backend, scale=0.0)          # uniform over attendable keys
    assert_close(zero[1], np.full_like(zero[1], 1 / 11), atol=1e-6)


def test_large_scores_do_not_overflow(backend):
    """Scores far beyond exp's range still give a proper softmax (max subtraction)."""
    rng = np.random.default_rng(6)
    q, k, v, _ = make_case(rng, 1, 2, 9, 33, 16, 4)
    q *= 30
    kw = dict(scale=1.0, bias=np.full((9, 33), 500.0, np.float32))
    res = run(q, k, v, backend, **kw)
    assert np.isfinite(res[0]).all() and np.isfinite(res[2]).all()
    ref = _ref(q, k, v, kw)
    # scores are ~ +-1000 here: the float32 score rounding dominates, so only the weights'
    # structure and the lse (relative) are held tightly
    assert_close(res[2], ref[2], atol=1e-3, rtol=1e-5)
    check_invariants(res)


@pytest.mark.parametrize("Lq,Lk", [(1, 1500), (300, 2000)])
def test_large(backend, Lq, Lk):
    rng = np.random.default_rng(Lk)
    q, k, v, kw = make_case(rng, 1, 2, Lq, Lk, 64, 48, mask_kind="B11Lk", mask_density=0.9,
                            kl_kind="random", bias_kind="1H1Lk")
    kw["key_lengths"] = np.array([Lk - 123])
    res = run(q, k, v, backend, **kw)
    assert_matches_reference(res, _ref(q, k, v, kw))
    check_invariants(res)
    check_out_is_weights_at_v(res, v)


def test_large_native_vs_numba():
    _need_backend("numba")
    rng = np.random.default_rng(7)
    q, k, v, kw = make_case(rng, 2, 3, 300, 2000, 64, 64, mask_kind="LqLk", kl_kind="random",
                            dropout_p=0.2, seed=99)
    a = attention(q, k, v, backend="native", return_lse=True, **kw)
    b = attention(q, k, v, backend="numba", return_lse=True, **kw)
    assert_close(a[0], b[0])
    assert_close(a[1], b[1])


def test_concurrent_calls(backend):
    """Calls from several Python threads at once give the sequential results."""
    from concurrent.futures import ThreadPoolExecutor
    rng = np.random.default_rng(17)
    inputs = [make_case(rng, 2, 2, 40, 90, 32, 16, mask_kind="LqLk", dropout_p=0.1, seed=s)
              for s in range(6)]
    expected = [run(q, k, v, backend, **kw) for q, k, v, kw in inputs]
    with ThreadPoolExecutor(4) as pool:
        got = list(pool.map(lambda c: run(c[0], c[1], c[2], backend, **c[3]), inputs * 3))
    for i, res in enumerate(got):
        for x, y in zip(res, expected[i % len(inputs)]):
            np.testing.assert_array_equal(x, y)


def test_thread_count_does_not_change_results():
    rng = np.random.default_rng(18)
    q, k, v, kw = make_case(rng, 3, 5, 77, 301, 64, 40, mask_kind="B11Lk", kl_kind="random",
                            dropout_p=0.2, seed=8)
    old = mmcore.get_num_threads()
    try:
        results = []
        for n in (1, 2, 3, 8):
            mmcore.set_num_threads(n)
            results.append(run(q, k, v, "native", **kw))
    finally:
        mmcore.set_num_threads(old)
    for res in results[1:]:
        for x, y in zip(res, results[0]):
            np.testing.assert_array_equal(x, y)


# ----------------------------------------------------------------------------------------------
# dropout


def test_dropout_bits_reference_known_values():
    # fixed values of the hash, so that a change of the dropout function anywhere is noticed
    bits = dropout_bits_np(123, 0, 1, 2, 3)
    assert bits.shape == (1,) and int(bits[0]) == 11112340
    assert int(dropout_bits_np(2**64 - 1, 5, 6, 7, 8)[0]) == 5397013
    grid = dropout_bits_np(7, np.arange(2)[:, None, None, None], np.arange(3)[:, None, None],
                           np.arange(4)[:, None], np.arange(5))
    assert grid.shape == (2, 3, 4, 5) and grid.min() >= 0 and grid.max() < 2**24
    assert len(np.unique(grid)) == grid.size


def test_numba_dropout_bits_match_reference():
    pytest.importorskip("numba")
    from mmcore.kernels.numba.dropout import dropout_bits
    rng = np.random.default_rng(8)
    for seed in [0, 1, 2**63, 2**64 - 1, int(rng.integers(0, 2**63))]:
        idx = rng.integers(0, 5000, size=(50, 4))
        got = [dropout_bits(np.uint64(seed), *map(int, row)) for row in idx]
        want = dropout_bits_np(seed, idx[:, 0], idx[:, 1], idx[:, 2], idx[:, 3])
        np.testing.assert_array_equal(got, want)


def test_dropout_threshold():
    for p in [0.0, 1e-9, 0.1, 0.25, 0.5, 0.9, 1 - 2**-30]:
        assert dropout_threshold(p) == dropout_threshold_ref(p)
    assert dropout_threshold(0.5) == 2**23
    assert dropout_threshold(1e-9) == 0                 # rounds to "no dropout"


def _dropout_case(seed=1234, p=0.3):
    rng = np.random.default_rng(9)
    q, k, v, kw = make_case(rng, 2, 3, 33, 65, 16, 8, mask_kind="LqLk", mask_density=0.8,
                            kl_kind="random", dropout_p=p, seed=seed)
    return q, k, v, kw


def test_dropout_matches_reference(backend):
    q, k, v, kw = _dropout_case()
    res = run(q, k, v, backend, **kw)
    ref = _ref(q, k, v, kw)
    assert_matches_reference(res, ref)
    np.testing.assert_array_equal(res[1] == 0, ref[1] == 0)
    check_invariants(res, dropout=True)
    check_out_is_weights_at_v(res, v)
    # kept weights are the undropped ones times 1 / (1 - p)
    plain = run(q, k, v, backend, **{key: val for key, val in kw.items()
                                      if key not in ("dropout_p", "seed")})
    kept = res[1] != 0
    assert_close(res[1][kept], plain[1][kept] / (1 - kw["dropout_p"]), atol=1e-6, rtol=1e-5)
    assert_close(res[2], plain[2], atol=1e-6, rtol=1e-6)   # lse is taken before dropout


def test_dropout_mask_is_the_hash(backend):
    B, H, Lq, Lk, p, seed = 2, 2, 17, 300, 0.4, 2**63 + 5
    q = np.zeros((B, H, Lq, 4), np.float32)           # uniform weights 1 / Lk
    v = np.ones((B, H, Lk, 1), np.float32)
    out, w, _ = run(q, q[:, :, :1].repeat(Lk, 2), v, backend, dropout_p=p, seed=seed)
    bb, hh, ii, jj = np.meshgrid(*map(np.arange, (B, H, Lq, Lk)), indexing="ij", sparse=True)
    keep = dropout_bits_np(seed, bb, hh, ii, jj) >= dropout_threshold_ref(p)
    np.testing.assert_array_equal(w != 0, keep)
    assert_close(w[keep], 1 / Lk / (1 - p), atol=1e-7, rtol=1e-6)
    assert abs(keep.mean() - (1 - p)) < 0.02
    assert_close(out[..., 0], keep.sum(-1) / Lk / (1 - p), atol=1e-6, rtol=1e-5)


def test_dropout_identical_across_backends():
    _need_backend("numba")
    q, k, v, kw = _dropout_case(seed=77, p=0.5)
    a = run(q, k, v, "native", **kw)
    b = run(q, k, v, "numba", **kw)
    np.testing.assert_array_equal(a[1] == 0, b[1] == 0)
    for x, y in zip(a, b):
        assert_close(x, y)


def test_dropout_seeds_differ(backend):
    q, k, v, kw = _dropout_case()
    masks = []
    for seed in (0, 1, 2, 2**64 - 1):
        kw["seed"] = seed
        masks.append(run(q, k, v, backend, **kw)[1] != 0)
    for i in range(len(masks)):
        for j in range(i + 1, len(masks)):
            assert (masks[i] != masks[j]).any()
    # same seed, same mask; a negative seed means seed mod 2**64
    kw["seed"] = -1
    np.testing.assert_array_equal(run(q, k, v, backend, **kw)[1] != 0, masks[-1])
    kw["seed"] = 1
    np.testing.assert_array_equal(run(q, k, v, backend, **kw)[1] != 0, masks[1])


def test_dropout_seed_none_draws_a_mask(backend):
    q, k, v, kw = _dropout_case()
    kw["seed"] = None
    out, w, _ = run(q, k, v, backend, **kw)
    assert np.isfinite(out).all() and (w == 0).any()


def test_dropout_zero_is_unaffected(backend):
    q, k, v, kw = _dropout_case()
    plain = {key: val for key, val in kw.items() if key not in ("dropout_p", "seed")}
    a = run(q, k, v, backend, **plain)
    for extra in (dict(dropout_p=0.0), dict(dropout_p=0.0, seed=5), dict(dropout_p=1e-12, seed=5)):
        b = run(q, k, v, backend, **plain, **extra)
        for x, y in zip(a, b):
            assert_close(x, y, atol=0, rtol=0)
    check_invariants(a)


# ----------------------------------------------------------------------------------------------
# layouts and dtypes


def test_non_contiguous_inputs(backend):
    rng = np.random.default_rng(10)
    B, H, Lq, Lk, D, Dv = 2, 3, 13, 29, 16, 12
    q = rng.standard_normal((B, Lq, H, D)).astype(np.float32).transpose(0, 2, 1, 3)
    k = rng.standard_normal((B, H, Lk, D)).astype(np.float32)[:, :, ::-1]
    v = rng.standard_normal((B, H, Lk, 2 * Dv)).astype(np.float32)[..., ::-2]
    mask = (rng.random((Lk, Lq)) < 0.8).T                      # transposed bool view
    bias = rng.standard_normal((1, H, 1, 2 * Lk)).astype(np.float32)[..., ::-2]
    kl = np.array([Lk, 0, 7, 3], np.int32)[::-2]                # [3, 0]... negative stride
    kw = dict(mask=mask, bias=bias, key_lengths=kl)
    assert not q.flags.c_contiguous and not k.flags.c_contiguous and not v.flags.c_contiguous
    res = run(q, k, v, backend, **kw)
    kw_c = {key: np.ascontiguousarray(val) for key, val in kw.items()}
    res_c = run(np.ascontiguousarray(q), np.ascontiguousarray(k), np.ascontiguousarray(v),
                backend, **kw_c)
    for x, y in zip(res, res_c):
        assert_close(x, y, atol=1e-6, rtol=1e-6)
    assert_matches_reference(res, _ref(q, k, v, kw))


def test_float64_inputs_are_cast(backend):
    rng = np.random.default_rng(11)
    q, k, v, kw = make_case(rng, 1, 2, 9, 14, 8, 3, dtype=np.float64, bias_kind="LqLk",
                            mask_kind="LqLk")
    kw["bias"] = kw["bias"].astype(np.float64)
    res = run(q, k, v, backend, **kw)
    res32 = run(q.astype(np.float32), k.astype(np.float32), v.astype(np.float32), backend,
                **dict(kw, bias=kw["bias"].astype(np.float32)))
    for x, y in zip(res, res32):
        assert x.dtype == np.float32
        assert_close(x, y, atol=1e-6, rtol=1e-6)


def test_mixed_dtypes_and_lists(backend):
    rng = np.random.default_rng(12)
    q, k, v, _ = make_case(rng, 1, 1, 3, 4, 2, 2)
    res = run(q.astype(np.float16), k, v.astype(np.float64), backend)
    ref = _ref(q.astype(np.float16).astype(np.float64), k, v, {})
    assert_matches_reference(res, ref, atol=ATOL16, rtol=RTOL16)
    out = attention(q.tolist(), k.tolist(), v.tolist(), backend=backend)
    assert_close(out, _ref(q, k, v, {})[0])


def test_inputs_not_modified(backend):
    q, k, v, kw = _dropout_case()
    copies = [x.copy() for x in (q, k, v, kw["mask"], kw["key_lengths"])]
    run(q, k, v, backend, **kw)
    for a, b in zip(copies, (q, k, v, kw["mask"], kw["key_lengths"])):
        np.testing.assert_array_equal(a, b)


def test_read_only_inputs(backend):
    q, k, v, kw = _dropout_case()
    for x in (q, k, v, kw["mask"], kw["key_lengths"]):
        x.setflags(write=False)
    res = run(q, k, v, backend, **kw)
    assert_matches_reference(res, _ref(q, k, v, kw))


# ----------------------------------------------------------------------------------------------
# PyTorch scaled_dot_product_attention


def _sdpa(q, k, v, **kw):
    torch = pytest.importorskip("torch")
    tq, tk, tv = (torch.from_numpy(np.ascontiguousarray(x)) for x in (q, k, v))
    if "attn_mask" in kw:
        kw["attn_mask"] = torch.from_numpy(np.ascontiguousarray(kw["attn_mask"]))
    return torch.nn.functional.scaled_dot_product_attention(tq, tk, tv, **kw).numpy()


@pytest.mark.parametrize("case", ["plain", "bool_mask", "float_bias", "scale", "cross", "dv"])
def test_matches_torch_sdpa(backend, case):
    pytest.importorskip("torch")
    rng = np.random.default_rng(13)
    Lq, Lk, D, Dv = 37, 37, 32, 32
    if case in ("cross", "bool_mask", "float_bias"):
        Lq, Lk = 21, 65
    if case == "dv":
        Lq, Lk, Dv = 19, 50, 24
    q, k, v, _ = make_case(rng, 2, 4, Lq, Lk, D, Dv)
    ours, theirs = {}, {}
    if case == "bool_mask":
        m = rng.random((2, 1, Lq, Lk)) < 0.6
        m[..., 0] = True                             # torch gives NaN for fully masked rows
        ours["mask"], theirs["attn_mask"] = m, m
    elif case == "float_bias":
        bb = rng.standard_normal((1, 4, Lq, Lk)).astype(np.float32)
        bb[..., 3:9] = -np.inf
        ours["bias"], theirs["attn_mask"] = bb, bb
    elif case == "scale":
        ours["scale"], theirs["scale"] = 0.37, 0.37
    out = attention(q, k, v, backend=backend, **ours)
    assert_close(out, _sdpa(q, k, v, **theirs), atol=ATOL32, rtol=RTOL32)


def test_matches_torch_multihead_layout(backend):
    """The (B, L, H, D) layout of nn.MultiheadAttention via transposed views."""
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(14)
    B, Lq, Lk, H, D = 2, 10, 15, 4, 8
    q = rng.standard_normal((B, Lq, H, D)).astype(np.float32)
    k = rng.standard_normal((B, Lk, H, D)).astype(np.float32)
    v = rng.standard_normal((B, Lk, H, D)).astype(np.float32)
    pad = np.arange(Lk)[None, :] < np.array([[15], [9]])
    ours = attention(q.transpose(0, 2, 1, 3), k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3),
                     key_lengths=pad.sum(1), backend=backend)
    theirs = torch.nn.functional.scaled_dot_product_attention(
        *(torch.from_numpy(x).transpose(1, 2) for x in (q, k, v)),
        attn_mask=torch.from_numpy(pad[:, None, None, :]))
    assert_close(ours, theirs.numpy(), atol=ATOL32, rtol=RTOL32)


# ----------------------------------------------------------------------------------------------
# bad inputs


def _good():
    rng = np.random.default_rng(15)
    q = rng.standard_normal((2, 3, 4, 8)).astype(np.float32)
    k = rng.standard_normal((2, 3, 5, 8)).astype(np.float32)
    v = rng.standard_normal((2, 3, 5, 6)).astype(np.float32)
    return q, k, v


def _bad_cases():
    q, k, v = _good()
    f = np.float32
    cases = [
        # (id, args, kwargs, argument name that the message must name)
        ("q_rank", (q[0], k, v), {}, "q"),
        ("k_rank", (q, k[0], v), {}, "k"),
        ("v_rank", (q, k, v[None]), {}, "v"),
        ("q_scalar", (np.float32(1), k, v), {}, "q"),
        ("k_batch", (q, k[:1], v[:1]), {}, "k"),
        ("k_heads", (q, k[:, :2], v[:, :2]), {}, "k"),
        ("k_dim", (q, k[..., :7], v), {}, "k"),
        ("v_keys", (q, k, v[:, :, :4]), {}, "v"),
        ("v_batch", (q, k, v[:1]), {}, "v"),
        ("q_zero_dim", (q[..., :0], k[..., :0], v), {}, "q"),
        ("q_int", (q.astype(np.int32), k, v), {}, "q"),
        ("k_complex", (q, k.astype(np.complex64), v), {}, "k"),
        ("v_int", (q, k, v.astype(np.int64)), {}, "v"),
        ("v_bool", (q, k, v > 0), {}, "v"),
        ("q_object", (np.empty(q.shape, dtype=object), k, v), {}, "q"),
        ("mask_shape", (q, k, v), dict(mask=np.ones((4, 4), bool)), "mask"),
        ("mask_rank", (q, k, v), dict(mask=np.ones((1, 2, 3, 4, 5), bool)), "mask"),
        ("mask_int", (q, k, v), dict(mask=np.ones((4, 5), np.int8)), "mask"),
        ("mask_float", (q, k, v), dict(mask=np.ones((4, 5), f)), "mask"),
        ("kl_negative", (q, k, v), dict(key_lengths=np.array([-1, 2])), "key_lengths"),
        ("kl_too_long", (q, k, v), dict(key_lengths=np.array([6, 2])), "key_lengths"),
        ("kl_shape", (q, k, v), dict(key_lengths=np.array([1, 2, 3])), "key_lengths"),
        ("kl_2d", (q, k, v), dict(key_lengths=np.array([[1, 2]])), "key_lengths"),
        ("kl_scalar", (q, k, v), dict(key_lengths=3), "key_lengths"),
        ("kl_float", (q, k, v), dict(key_lengths=np.array([1.0, 2.0])), "key_lengths"),
        ("kl_bool", (q, k, v), dict(key_lengths=np.array([True, False])), "key_lengths"),
        ("scale_nan", (q, k, v), dict(scale=float("nan")), "scale"),
        ("scale_inf", (q, k, v), dict(scale=float("inf")), "scale"),
        ("scale_str", (q, k, v), dict(scale="big"), "scale"),
        ("scale_overflow", (q, k, v), dict(scale=1e300, temperature=1e-300), "scale"),
        ("temperature_zero", (q, k, v), dict(temperature=0.0), "temperature"),
        ("temperature_negative", (q, k, v), dict(temperature=-1.0), "temperature"),
        ("temperature_nan", (q, k, v), dict(temperature=float("nan")), "temperature"),
        ("temperature_inf", (q, k, v), dict(temperature=float("inf")), "temperature"),
        ("bias_nan", (q, k, v), dict(bias=np.array([0.0, np.nan, 0, 0, 0], f)), "bias"),
        ("bias_posinf", (q, k, v), dict(bias=np.full((4, 5), np.inf, f)), "bias"),
        ("bias_shape", (q, k, v), dict(bias=np.zeros((3, 5), f)), "bias"),
        ("bias_int", (q, k, v), dict(bias=np.zeros((4, 5), np.int32)), "bias"),
        ("bias_bool", (q, k, v), dict(bias=np.zeros((4, 5), bool)), "bias"),
        ("dropout_negative", (q, k, v), dict(dropout_p=-0.1), "dropout_p"),
        ("dropout_one", (q, k, v), dict(dropout_p=1.0), "dropout_p"),
        ("dropout_nan", (q, k, v), dict(dropout_p=float("nan")), "dropout_p"),
        ("dropout_str", (q, k, v), dict(dropout_p="half"), "dropout_p"),
        ("seed_float", (q, k, v), dict(dropout_p=0.1, seed=1.5), "seed"),
        ("seed_str", (q, k, v), dict(dropout_p=0.1, seed="1"), "seed"),
    ]
    return [pytest.param(a, kw, name, id=cid) for cid, a, kw, name in cases]


# Scalar options: a mistake in them is an ArgumentError (also a TypeError and a ValueError);
# array problems stay ShapeError.
_SCALAR_NAMES = ("scale", "temperature", "dropout_p", "seed")


@pytest.mark.parametrize("args,kwargs,name", _bad_cases())
def test_bad_inputs_raise_shape_error(backend, args, kwargs, name):
    expected = ArgumentError if name in _SCALAR_NAMES else ShapeError
    with pytest.raises(expected, match=rf"^\[attention\] {name}\b") as info:
        attention(*args, backend=backend, **kwargs)
    assert isinstance(info.value, ValueError) and isinstance(info.value, MMCoreError)


def test_none_inputs_raise():
    q, k, v = _good()
    with pytest.raises(ArgumentError, match=r"\bv\b"):
        attention(q, k, None)


def test_unknown_backend():
    q, k, v = _good()
    with pytest.raises(BackendError, match="unknown backend 'tpu'"):
        attention(q, k, v, backend="tpu")
    with pytest.raises(BackendError, match="unknown backend"):
        with mmcore.use_backend("tpu"):
            pass


def test_cuda_backend_with_host_arrays():
    q, k, v = _good()
    with pytest.raises(BackendError, match="cuda"):
        attention(q, k, v, backend="cuda")


def test_backend_selection(monkeypatch):
    _need_backend("numba")
    q, k, v = _good()
    ref = _ref(q, k, v, {})[0]
    with mmcore.use_backend("numba"):
        assert_close(attention(q, k, v), ref)
    monkeypatch.setenv("MMCORE_BACKEND", "numba")
    assert_close(attention(q, k, v), ref)
    monkeypatch.setenv("MMCORE_BACKEND", "nonsense")
    with pytest.raises(BackendError, match="nonsense"):
        attention(q, k, v)
    assert_close(attention(q, k, v, backend="native"), ref)


def test_import_does_not_import_numba():
    root = os.path.dirname(os.path.dirname(os.path.abspath(mmcore.__file__)))
    code = ("import sys, numpy as np, mmcore\n"
            "q = np.ones((1, 1, 2, 4), np.float32)\n"
            "mmcore.ops.attention(q, q, q, backend='native')\n"
            "assert 'numba' not in sys.modules, 'numba was imported'\n")
    env = dict(os.environ, PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop("MMCORE_BACKEND", None)
    proc = subprocess.run(cwd=_OUTSIDE_SOURCE, args=[sys.executable, "-c", code], env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr


# ----------------------------------------------------------------------------------------------
# CUDA


@pytest.fixture
def cp():
    return pytest.importorskip("cupy")


def _to_device(cp, q, k, v, kw):
    kw_d = {key: (cp.asarray(val) if isinstance(val, np.ndarray) else val)
            for key, val in kw.items()}
    return cp.asarray(q), cp.asarray(k), cp.asarray(v), kw_d


@pytest.mark.cuda
@pytest.mark.parametrize("shape", [(1, 1, 1, 1, 1, 1), (2, 3, 31, 37, 64, 32),
                                   (1, 2, 65, 257, 128, 80), (2, 1, 128, 129, 80, 80),
                                   (1, 1, 300, 2000, 64, 64), (1, 2, 1, 1500, 3, 16)])
@pytest.mark.parametrize("extras", ["none", "mask_kl", "bias", "dropout"])
def test_cuda_vs_reference(cp, shape, extras):
    rng = np.random.default_rng(sum(shape))
    opts = {"none": {}, "mask_kl": dict(mask_kind="LqLk", kl_kind="zero_first"),
            "bias": dict(bias_kind="full", bias_neginf=0.2, temperature=0.7),
            "dropout": dict(mask_kind="B11Lk", dropout_p=0.25, seed=4321)}[extras]
    q, k, v, kw = make_case(rng, *shape, **opts)
    qd, kd, vd, kwd = _to_device(cp, q, k, v, kw)
    out, w, lse = attention(qd, kd, vd, return_weights=True, return_lse=True, **kwd)
    assert isinstance(out, cp.ndarray) and isinstance(w, cp.ndarray) and isinstance(lse, cp.ndarray)
    res = tuple(cp.asnumpy(x) for x in (out, w, lse))
    ref = _ref(q, k, v, kw)
    assert_matches_reference(res, ref, atol=5e-5, rtol=2e-4)
    np.testing.assert_array_equal(res[1] == 0, ref[1] == 0)
    out_only = attention(qd, kd, vd, **kwd)
    assert_close(cp.asnumpy(out_only), ref[0], atol=5e-5, rtol=2e-4)
    native = run(q, k, v, "native", **kw)
    np.testing.assert_array_equal(native[1] == 0, res[1] == 0)


@pytest.mark.cuda
def test_cuda_fully_masked_and_float16(cp):
    rng = np.random.default_rng(16)
    q, k, v, kw = make_case(rng, 2, 2, 9, 40, 16, 8, dtype=np.float16, mask_kind="full",
                            kl_kind="zero_first")
    qd, kd, vd, kwd = _to_device(cp, q, k, v, kw)
    out, w, lse = (cp.asnumpy(x) for x in attention(qd, kd, vd, return_weights=True,
                                                    return_lse=True, **kwd))
    assert not np.isnan(out).any() and np.isneginf(lse[0]).all() and (out[0] == 0).all()
    ref = _ref(q.astype(np.float64), k.astype(np.float64), v.astype(np.float64), kw)
    assert_matches_reference((out, w, lse), ref, atol=ATOL16, rtol=RTOL16)


@pytest.mark.cuda
def test_cuda_host_key_lengths_and_strided_views(cp):
    rng = np.random.default_rng(19)
    q, k, v, kw = make_case(rng, 2, 3, 20, 70, 32, 16, mask_kind="B11Lk", bias_kind="LqLk")
    kl = [70, 0]                                        # a host sequence of B integers is fine
    ref = _ref(q, k, v, dict(kw, key_lengths=np.array(kl)))
    qd = cp.asarray(np.ascontiguousarray(q.transpose(0, 2, 1, 3))).transpose(0, 2, 1, 3)
    kd = cp.asarray(k[:, :, ::-1].copy())[:, :, ::-1]
    vd = cp.asarray(v)
    _, _, _, kwd = _to_device(cp, q, k, v, kw)
    out, lse = attention(qd, kd, vd, key_lengths=kl, return_lse=True, **kwd)
    assert_close(cp.asnumpy(out), ref[0], atol=5e-5, rtol=2e-4)
    assert_close(cp.asnumpy(lse), ref[2], atol=5e-5, rtol=2e-4)


@pytest.mark.cuda
def test_cuda_rejects_bad_inputs(cp):
    q, k, v = (cp.asarray(x) for x in _good())
    with pytest.raises(BackendError):
        attention(q, cp.asnumpy(k), v)                  # mixed host and device
    with pytest.raises(BackendError):
        attention(q, k, v, backend="numba")
    with pytest.raises(ShapeError, match=r"^\[attention\] k\b"):
        attention(q, k[0], v)
    with pytest.raises(ShapeError, match=r"^\[attention\] v\b"):
        attention(q, k, v[:, :, :3])
    with pytest.raises(ShapeError, match=r"^\[attention\] mask\b"):
        attention(q, k, v, mask=cp.ones((4, 5), cp.int8))
    with pytest.raises(ShapeError, match=r"^\[attention\] bias\b"):
        attention(q, k, v, bias=cp.full((4, 5), cp.nan, cp.float32))
    with pytest.raises(ShapeError, match=r"^\[attention\] key_lengths\b"):
        attention(q, k, v, key_lengths=cp.asarray([6, 1]))
    with pytest.raises(ShapeError, match=r"^\[attention\] temperature\b"):
        attention(q, k, v, temperature=0.0)


def test_huge_finite_bias_is_not_an_empty_row(backend):
    """A finite bias near -FLT_MAX is a (very negative) score, not a mask."""
    q = np.full((1, 1, 2, 1), -1.0, np.float32)
    k = np.ones((1, 1, 3, 1), np.float32)
    v = np.random.default_rng(25).standard_normal((1, 1, 3, 2)).astype(np.float32)
    bias = np.full(3, -3.4e38, np.float32)
    out, w, lse = run(q, k, v, backend, bias=bias, scale=1.0)
    assert_close(w, np.full((1, 1, 2, 3), 1 / 3))
    assert_close(out, np.broadcast_to(v.mean(axis=2, keepdims=True), out.shape), atol=1e-6)
    assert np.isfinite(lse).all()


# ----------------------------------------------------------------------------------------------
# the native kernel at every instruction-set level: precision "bf16", the query split and the
# bit-identity of the float32 path across thread counts


@pytest.fixture(params=["baseline", "avx2", "avx512"])
def isa(request):
    with at_isa(request.param):
        yield request.param


def _with_threads(n, fn):
    old = mmcore.get_num_threads()
    try:
        mmcore.set_num_threads(n)
        return fn()
    finally:
        mmcore.set_num_threads(old)


def _bf16_dropout_ref(q, k, v, *, seed, dropout_p, **kw):
    """attention_bf16_ref with dropout: the kept numerators, scaled by 1 / (1 - p), are what is
    rounded to bfloat16 before P @ v (the native kernel's order)."""
    from reference import bf16_round
    q, k, v = bf16_round(q), bf16_round(k), bf16_round(v)
    _, w, lse = attention_ref(q, k, v, **kw)          # softmax of the rounded operands
    B, H, Lq, _ = q.shape
    Lk = k.shape[2]
    bb, hh, ii, jj = np.meshgrid(np.arange(B), np.arange(H), np.arange(Lq), np.arange(Lk),
                                 indexing="ij", sparse=True)
    keep = dropout_bits_np(seed, bb, hh, ii, jj) >= dropout_threshold_ref(dropout_p)
    # P = exp(s - max s) = w * sum P, and the largest weight is 1 / sum P
    with np.errstate(divide="ignore"):
        total = 1.0 / w.max(axis=-1, keepdims=True)  # inf for a row without keys
    p = np.where(np.isfinite(total), w * total, 0.0)
    pd = bf16_round(np.where(keep, p * np.float64(np.float32(1.0 / (1.0 - dropout_p))), 0.0))
    out = np.matmul(pd, v) / np.where(np.isfinite(total), total, 1.0)
    return np.where(np.isfinite(lse)[..., None], out, 0.0)


# (B, H, Lq, Lk, D, Dv): Lq and Lk at 1, primes and around the register tiles (8, 16), the key
# block (128) and the query chunk (256); Dv != D
BF16_SHAPES = [(1, 1, 1, 1, 1, 1), (2, 1, 1, 128, 64, 64), (1, 2, 7, 1, 3, 5),
               (1, 1, 8, 9, 16, 16), (2, 2, 15, 127, 31, 8), (1, 2, 16, 128, 64, 40),
               (2, 1, 17, 129, 65, 17), (1, 1, 31, 255, 80, 64), (1, 1, 127, 256, 64, 1),
               (1, 1, 129, 257, 8, 33), (1, 1, 255, 61, 16, 16), (1, 1, 257, 300, 64, 64)]


@pytest.mark.parametrize("shape", BF16_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_native_bf16_every_isa(isa, shape):
    from reference import attention_bf16_ref, bf16_round
    B, H, Lq, Lk, D, Dv = shape
    rng = np.random.default_rng(sum(shape))
    q, k, v, _ = make_case(rng, B, H, Lq, Lk, D, Dv)
    mask = rng.random((1, 1, Lq, Lk)) < 0.8
    kl = rng.integers(0, Lk + 1, B)
    kl[0] = Lk
    bias = (0.5 * rng.standard_normal((1, H, 1, Lk))).astype(np.float32)
    for kw in ({}, {"mask": mask, "key_lengths": kl}, {"bias": bias, "scale": 0.3}):
        out, w, lse = attention(q, k, v, precision="bf16", return_weights=True, return_lse=True,
                                backend="native", **kw)
        r_out, r_w, r_lse = attention_bf16_ref(q, k, v, **kw)
        # the weights and lse are those of the rounded q and k, to float32 accuracy
        assert_close(w, r_w, what="weights")
        assert_close(lse, r_lse, what="lse")
        # out: P is rounded relative to the running maximum, so within two bfloat16 roundings
        # of P (2**-8 relative) of the reference, weighted by |v|
        mag = np.matmul(r_w, np.abs(bf16_round(v)))
        err = np.abs(out - r_out)
        assert np.all(err <= 2.0 ** -8 * mag + 2e-5 * (1 + mag)), float(np.max(err))
        if Lk <= 128 and out.size >= 64:
            # one key block: the kernel's P is the reference's P to float32 accuracy, so the
            # same bfloat16 values almost everywhere (without rounding P, or rounding it
            # elsewhere, the typical error would be about 1e-4)
            assert np.median(err) <= 2e-6, float(np.median(err))
        # every row as a batch of one gives the same bits (batch invariance)
        i = Lq // 2
        kw1 = dict(kw)
        if "mask" in kw1:
            kw1["mask"] = mask[:, :, i:i + 1]
        one = attention(q[:, :, i:i + 1], k, v, precision="bf16", backend="native", **kw1)
        np.testing.assert_array_equal(one, out[:, :, i:i + 1])


def test_native_bf16_dropout(isa):
    """Dropout under "bf16": the kept numerators scaled by 1 / (1 - p) are rounded to bfloat16."""
    rng = np.random.default_rng(31)
    q, k, v, _ = make_case(rng, 2, 2, 40, 100, 32, 24)
    kw = dict(dropout_p=0.3, seed=12345)
    out = attention(q, k, v, precision="bf16", backend="native", **kw)
    ref = _bf16_dropout_ref(q, k, v, **kw)
    err = np.abs(out - ref)
    assert np.all(err <= 2.0 ** -8 * 1.5 * np.abs(v).max() + 2e-5)
    assert np.median(err) <= 2e-6, float(np.median(err))
    # and the same mask as float32
    _, w32 = attention(q, k, v, backend="native", return_weights=True, **kw)
    _, wbf = attention(q, k, v, precision="bf16", backend="native", return_weights=True, **kw)
    np.testing.assert_array_equal(w32 == 0, wbf == 0)


def test_native_bf16_nan_and_overflow(isa):
    """NaN stays NaN; a finite float32 beyond the bfloat16 range rounds to infinity."""
    rng = np.random.default_rng(32)
    q, k, v, _ = make_case(rng, 1, 1, 5, 20, 8, 4)
    q[0, 0, 1, 3] = np.nan
    v[0, 0, 7, 2] = np.float32(3.4e38)                # rounds to inf in bfloat16
    out = attention(q, k, v, precision="bf16", backend="native")
    out32 = attention(q, k, v, backend="native")
    assert np.isnan(out[0, 0, 1]).all() and np.isnan(out32[0, 0, 1]).all()
    others = [0, 2, 3, 4]
    assert np.isposinf(out[0, 0, others, 2]).all()
    assert np.isfinite(out32[0, 0, others, 2]).all()
    assert np.isfinite(out[0, 0, others][:, [0, 1, 3]]).all()


@pytest.mark.parametrize("precision", ["highest", "bf16"])
@pytest.mark.parametrize("shape", [(1, 1, 1, 1, 1, 1), (1, 1, 300, 200, 64, 64),
                                   (1, 2, 77, 577, 64, 48), (3, 1, 33, 129, 16, 7),
                                   (1, 1, 1, 1500, 64, 64), (2, 1, 513, 3, 8, 8),
                                   (1, 1, 1100, 260, 32, 24)], ids=lambda s: "x".join(map(str, s)))
def test_native_bits_do_not_depend_on_thread_count(isa, precision, shape):
    """The query split changes with the thread count (down to one query group per task for few
    heads); every row is computed in the same order whatever the split, so the bits agree,
    also with the row computed alone, and the results match the reference."""
    B, H, Lq, Lk, D, Dv = shape
    rng = np.random.default_rng(Lq + Lk)
    q, k, v, kw = make_case(rng, B, H, Lq, Lk, D, Dv, mask_kind="B11Lk", kl_kind="random",
                            bias_kind="1H1Lk")
    results = [_with_threads(n, lambda: run(q, k, v, "native", precision=precision, **kw))
               for n in (1, 2, 3)]
    for res in results[1:]:
        for x, y in zip(res, results[0]):
            np.testing.assert_array_equal(x, y)
    rows = sorted({0, Lq // 3, Lq - 1})
    alone = _with_threads(3, lambda: [attention(q[:, :, i:i + 1], k, v, precision=precision,
                                                backend="native", **kw) for i in rows])
    for i, one in zip(rows, alone):
        np.testing.assert_array_equal(one, results[0][0][:, :, i:i + 1])
    if precision == "highest":
        assert_matches_reference(results[0], _ref(q, k, v, kw))
    else:
        from reference import attention_bf16_ref
        r_out, r_w, _ = attention_bf16_ref(q, k, v, **kw)
        assert_close(results[0][1], r_w, what="weights")
        assert np.all(np.abs(results[0][0] - r_out) <= 2.0 ** -8 * np.abs(v).max() + 2e-5)


def test_native_bf16_rounds_values_like_the_reference(isa):
    """One key with P = 1: out is bf16(v) itself, for random float32 bit patterns (NaN,
    infinities, subnormals, ties, values that round to infinity); zeros compare by value (the
    multiply-add gives +0 for -0)."""
    from reference import bf16_round
    bits = np.random.default_rng(33).integers(0, 2**32, size=50000, dtype=np.uint64)
    special = [0x7F7FFFFF, 0xFF7FFFFF, 0x7F7F8000, 0x7F7F7FFF, 0x7FFFFFFF, 0xFFFFFFFF, 0x7F800001,
               0x7FBFFFFF, 0x00000001, 0x80008000, 0x00018000, 0x00008000, 0x3F808000,
               0x3F818000, 0x3F80FFFF, 0x7F800000, 0xFF800000]
    v = np.concatenate([bits.astype(np.uint32), np.array(special, np.uint32)]).view(np.float32)
    one = np.ones((1, 1, 1, 1), np.float32)
    with np.errstate(all="ignore"):
        out = attention(one, one, v.reshape(1, 1, 1, -1), precision="bf16", backend="native")
        want = bf16_round(v).astype(np.float32)
    out = out.ravel()
    np.testing.assert_array_equal(np.isnan(out), np.isnan(want))
    finite = ~np.isnan(want)
    np.testing.assert_array_equal(out[finite], want[finite])
    nonzero = finite & (want != 0)
    np.testing.assert_array_equal(out[nonzero].view(np.uint32), want[nonzero].view(np.uint32))
