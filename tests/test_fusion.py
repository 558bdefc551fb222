"""Tests of mmcore.ops masked_mean, masked_max and fuse: every backend against the float64
reference and each other, and against PyTorch where it is installed."""

from __future__ import annotations

import doctest

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import mmcore
from _helpers import HOST_BACKENDS, PROPERTY_SETTINGS, examples
from _helpers import need_backend as _need_backend
from mmcore.errors import ArgumentError, BackendError, MMCoreError, ShapeError
from mmcore.ops import fuse, masked_max, masked_mean
from reference import FUSE_STRATEGIES_REF, fuse_ref, masked_max_ref, masked_mean_ref

STRATEGIES = list(FUSE_STRATEGIES_REF)
REDUCTIONS = {"masked_mean": (masked_mean, masked_mean_ref),
              "masked_max": (masked_max, masked_max_ref)}

# float32 tolerances, relative to the scale of the data (the largest |value| that counts)
ATOL, RTOL = 1e-5, 1e-5
ATOL16 = 2e-3

B_SIZES = [1, 2, 3, 5, 7, 13]
L_SIZES = [1, 2, 3, 7, 13, 31, 64, 65, 127]
D_SIZES = [1, 2, 3, 7, 8, 9, 15, 16, 17, 31, 32, 33, 63, 64, 65, 127, 128, 129]
M_SIZES = [1, 2, 3, 5, 7]
MASK_DTYPES = [np.bool_, np.bool_, np.int64, np.int32, np.uint8]


def assert_close(actual, expected, scale=1.0, atol=ATOL, rtol=RTOL, what=""):
    np.testing.assert_allclose(np.asarray(actual, np.float64), np.asarray(expected, np.float64),
                               atol=atol * scale, rtol=rtol, err_msg=what)


def _scale(x, real=None):
    """The largest |value| that takes part (1 when there is none)."""
    x = np.abs(np.asarray(x, np.float64))
    if real is not None:
        x = np.where(real, x, 0.0)
    return max(1e-30, float(x.max())) if x.size else 1.0


# ----------------------------------------------------------------------------------------------
# random cases


def make_tokens(rng, B, L, D, *, scale=1.0, mask_kind="random", density=0.7, mask_dtype=np.bool_,
                padding="zero", dtype=np.float32):
    """x (B, L, D), a mask (or None) and the bool mask of real tokens."""
    x = (scale * rng.standard_normal((B, L, D))).astype(dtype)
    if mask_kind is None:
        return x, None, np.ones((B, L), bool)
    if mask_kind == "lengths":                     # right padding, like a tokenizer's output
        lengths = rng.integers(0, L + 1, size=B)
        real = np.arange(L)[None, :] < lengths[:, None]
    else:
        real = rng.random((B, L)) < density
    if mask_kind in ("random", "lengths") and B > 1:
        real[rng.integers(0, B)] = False           # an all-padding row
    fill = {"zero": None, "nan": np.nan, "huge": 3e38, "neg": -3e38}[padding]
    if fill is not None:
        x[~real] = fill
    return x, real.astype(mask_dtype), real


@st.composite
def token_cases(draw):
    B = draw(st.sampled_from(B_SIZES))
    L = draw(st.sampled_from(L_SIZES))
    D = draw(st.sampled_from(D_SIZES))
    opts = dict(
        scale=draw(st.sampled_from([1.0, 1.0, 1e3, 1e-3])),
        mask_kind=draw(st.sampled_from([None, "random", "random", "lengths", "dense"])),
        density=draw(st.sampled_from([0.0, 0.3, 0.7, 1.0])),
        mask_dtype=draw(st.sampled_from(MASK_DTYPES)),
        padding=draw(st.sampled_from(["zero", "zero", "nan", "huge", "neg"])),
    )
    return (B, L, D), opts, draw(st.integers(0, 2**32 - 1))


def make_modalities(rng, B, M, D, *, scale=1.0, present_kind="random", density=0.7,
                    mask_dtype=np.bool_, absent="zero", weights_kind="shared", query_kind="shared",
                    zero_weight_row=False):
    """emb (B, M, D), present (or None), the bool (B, M) of present modalities, weights, query."""
    emb = (scale * rng.standard_normal((B, M, D))).astype(np.float32)
    if present_kind is None:
        present, real = None, np.ones((B, M), bool)
    elif present_kind == "shared":
        real1 = rng.random(M) < density
        real = np.broadcast_to(real1, (B, M))
        present = real1.astype(mask_dtype)
    else:
        real = rng.random((B, M)) < density
        if B > 1:
            real[rng.integers(0, B)] = False       # a row without any modality
        present = real.astype(mask_dtype)
    fill = {"zero": None, "nan": np.nan, "huge": 3e38}[absent]
    if fill is not None:
        emb[~real] = fill
    wshape = (M,) if weights_kind == "shared" else (B, M)
    weights = rng.random(wshape).astype(np.float32)
    weights[rng.random(wshape) < 0.2] = 0.0        # zero weights are allowed
    if zero_weight_row and weights_kind == "per_row":
        weights[0] = 0.0
    # scores of order 1 whatever the scale of the data
    qshape = (D,) if query_kind == "shared" else (B, D)
    query = (rng.standard_normal(qshape) / scale).astype(np.float32)
    return emb, present, np.ascontiguousarray(real), weights, query


@st.composite
def modality_cases(draw, strategies=STRATEGIES):
    B = draw(st.sampled_from(B_SIZES))
    M = draw(st.sampled_from(M_SIZES))
    D = draw(st.sampled_from(D_SIZES))
    opts = dict(
        scale=draw(st.sampled_from([1.0, 1.0, 1e3, 1e-3])),
        present_kind=draw(st.sampled_from([None, "random", "random", "shared"])),
        density=draw(st.sampled_from([0.0, 0.5, 0.8, 1.0])),
        mask_dtype=draw(st.sampled_from(MASK_DTYPES)),
        absent=draw(st.sampled_from(["zero", "zero", "nan", "huge"])),
        weights_kind=draw(st.sampled_from(["shared", "per_row"])),
        query_kind=draw(st.sampled_from(["shared", "per_row"])),
        zero_weight_row=draw(st.booleans()),
    )
    strategy = draw(st.sampled_from(strategies))
    as_list = draw(st.booleans())
    return (B, M, D), opts, strategy, as_list, draw(st.integers(0, 2**32 - 1))


def _fuse_kwargs(strategy, present, weights, query):
    kw = {"present": present}
    if strategy == "weighted":
        kw["weights"] = weights
    elif strategy == "attention":
        kw["query"] = query
    return kw


def run_fuse(emb, strategy, backend, **kw):
    """fuse asking for the weights where there are any; returns (out, weights or None)."""
    res = fuse(emb, strategy=strategy, backend=backend,
               return_weights=strategy in ("weighted", "attention"), **kw)
    out, w = res if isinstance(res, tuple) else (res, None)
    assert out.dtype == np.float32 and out.flags.c_contiguous
    if w is not None:
        assert w.dtype == np.float32 and w.shape == (out.shape[0], _num_modalities(emb))
    return out, w


def _num_modalities(emb):
    return len(emb) if isinstance(emb, (list, tuple)) else emb.shape[1]


def check_fuse(res, ref, emb, real, strategy):
    out, w = res
    r_out, r_w = ref
    scale = _scale(emb, real[..., None])
    M = real.shape[1]
    tol = scale * (M if strategy == "sum" else 1)
    assert not np.isnan(out).any()
    assert_close(out, r_out, tol, what=f"{strategy} out")
    if r_w is not None:
        assert not np.isnan(w).any()
        assert_close(w, r_w, what=f"{strategy} weights")
        assert (w[~real] == 0).all()
        sums = w.astype(np.float64).sum(1)
        nonzero = r_w.sum(1) > 0
        assert_close(sums[nonzero], 1.0, atol=1e-5, what="weight row sums")
        assert (w[~nonzero] == 0).all()
    none = ~real.any(axis=1)
    if strategy != "concat":
        assert (out[none] == 0).all()


# ----------------------------------------------------------------------------------------------
# masked_mean / masked_max: properties


@pytest.mark.parametrize("op", list(REDUCTIONS))
@pytest.mark.parametrize("name", HOST_BACKENDS)
@settings(max_examples=examples(200), **PROPERTY_SETTINGS)
@given(case=token_cases())
def test_property_reduce_vs_reference(name, op, case):
    _need_backend(name)
    fn, ref_fn = REDUCTIONS[op]
    shape, opts, seed = case
    x, mask, real = make_tokens(np.random.default_rng(seed), *shape, **opts)
    out = fn(x, mask, backend=name)
    assert out.dtype == np.float32 and out.shape == (shape[0], shape[2])
    assert not np.isnan(out).any()
    assert_close(out, ref_fn(x, mask), _scale(x, real[..., None]))
    assert (out[~real.any(axis=1)] == 0).all()


@pytest.mark.parametrize("op", list(REDUCTIONS))
@settings(max_examples=examples(200), **PROPERTY_SETTINGS)
@given(case=token_cases())
def test_property_reduce_native_vs_numba(op, case):
    _need_backend("native")
    _need_backend("numba")
    fn, _ = REDUCTIONS[op]
    shape, opts, seed = case
    x, mask, real = make_tokens(np.random.default_rng(seed), *shape, **opts)
    a = fn(x, mask, backend="native")
    b = fn(x, mask, backend="numba")
    assert_close(a, b, _scale(x, real[..., None]))
    if op == "masked_max":
        np.testing.assert_array_equal(a, b)        # a max is exact


# ----------------------------------------------------------------------------------------------
# fuse: properties


@pytest.mark.parametrize("name", HOST_BACKENDS)
@settings(max_examples=examples(300), **PROPERTY_SETTINGS)
@given(case=modality_cases())
def test_property_fuse_vs_reference(name, case):
    _need_backend(name)
    (B, M, D), opts, strategy, as_list, seed = case
    emb, present, real, weights, query = make_modalities(np.random.default_rng(seed), B, M, D,
                                                         **opts)
    kw = _fuse_kwargs(strategy, present, weights, query)
    arg = [emb[:, m] for m in range(M)] if as_list else emb
    res = run_fuse(arg, strategy, name, **kw)
    assert res[0].shape == (B, M * D if strategy == "concat" else D)
    check_fuse(res, fuse_ref(emb, strategy, **kw), emb, real, strategy)


@settings(max_examples=examples(250), **PROPERTY_SETTINGS)
@given(case=modality_cases())
def test_property_fuse_native_vs_numba(case):
    _need_backend("native")
    _need_backend("numba")
    (B, M, D), opts, strategy, as_list, seed = case
    emb, present, real, weights, query = make_modalities(np.random.default_rng(seed), B, M, D,
                                                         **opts)
    kw = _fuse_kwargs(strategy, present, weights, query)
    a = run_fuse(emb, strategy, "native", **kw)
    b = run_fuse(emb, strategy, "numba", **kw)
    scale = _scale(emb, real[..., None]) * (M if strategy == "sum" else 1)
    assert_close(a[0], b[0], scale)
    if strategy in ("concat", "max"):
        np.testing.assert_array_equal(a[0], b[0])
    if a[1] is not None:
        assert_close(a[1], b[1])
        np.testing.assert_array_equal(a[1] == 0, b[1] == 0)


@pytest.mark.parametrize("name", HOST_BACKENDS)
@settings(max_examples=examples(80), **PROPERTY_SETTINGS)
@given(B=st.sampled_from(B_SIZES), widths=st.lists(st.sampled_from([0] + D_SIZES), min_size=1,
                                                   max_size=6),
       with_present=st.booleans(), seed=st.integers(0, 2**32 - 1))
def test_property_concat_different_widths(name, B, widths, with_present, seed):
    _need_backend(name)
    rng = np.random.default_rng(seed)
    dtypes = [np.float32, np.float16, np.float64]
    embs = [rng.standard_normal((B, w)).astype(dtypes[i % 3]) for i, w in enumerate(widths)]
    present = rng.random((B, len(widths))) < 0.6 if with_present else None
    if present is not None:
        for m, e in enumerate(embs):
            e[~present[:, m]] = np.nan             # absent: never read
    out = fuse(embs, strategy="concat", present=present, backend=name)
    assert out.shape == (B, sum(widths)) and out.dtype == np.float32 and out.flags.c_contiguous
    ref, _ = fuse_ref(embs, "concat", present=present)
    np.testing.assert_array_equal(out, ref.astype(np.float32))


# ----------------------------------------------------------------------------------------------
# fixed cases


@pytest.mark.parametrize("op", list(REDUCTIONS))
@pytest.mark.parametrize("L,D", [(1, 1), (1, 65), (7, 8), (31, 7), (64, 16), (65, 17),
                                 (127, 63), (128, 64), (129, 65), (300, 129), (1024, 33)])
def test_reduce_awkward_sizes(backend, op, L, D):
    fn, ref_fn = REDUCTIONS[op]
    rng = np.random.default_rng(L * 1000 + D)
    x, mask, real = make_tokens(rng, 5, L, D, mask_kind="lengths", padding="nan")
    out = fn(x, mask, backend=backend)
    assert_close(out, ref_fn(x, mask), _scale(x, real[..., None]))


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("M,D", [(1, 1), (1, 64), (2, 7), (3, 8), (3, 9), (4, 15), (5, 16),
                                 (7, 17), (2, 63), (3, 64), (4, 65), (2, 1024), (11, 129)])
def test_fuse_awkward_sizes(backend, strategy, M, D):
    rng = np.random.default_rng(M * 1000 + D)
    emb, present, real, weights, query = make_modalities(rng, 9, M, D, absent="nan",
                                                         weights_kind="per_row")
    kw = _fuse_kwargs(strategy, present, weights, query)
    res = run_fuse(emb, strategy, backend, **kw)
    check_fuse(res, fuse_ref(emb, strategy, **kw), emb, real, strategy)


@pytest.mark.parametrize("op", list(REDUCTIONS))
def test_reduce_batch_equals_rows(backend, op):
    fn, _ = REDUCTIONS[op]
    rng = np.random.default_rng(30)
    x, mask, real = make_tokens(rng, 13, 77, 65, mask_kind="lengths")
    batch = fn(x, mask, backend=backend)
    for b in range(x.shape[0]):
        row = fn(x[b:b + 1], mask[b:b + 1], backend=backend)
        assert_close(batch[b:b + 1], row, _scale(x[b], real[b, :, None]), atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_fuse_batch_equals_rows(backend, strategy):
    rng = np.random.default_rng(31)
    emb, present, real, weights, query = make_modalities(rng, 11, 4, 33, weights_kind="per_row",
                                                         query_kind="per_row")
    kw = _fuse_kwargs(strategy, present, weights, query)
    out, w = run_fuse(emb, strategy, backend, **kw)
    for b in range(emb.shape[0]):
        kw_b = {k: (v[b:b + 1] if isinstance(v, np.ndarray) else v) for k, v in kw.items()}
        o_b, w_b = run_fuse(emb[b:b + 1], strategy, backend, **kw_b)
        assert_close(out[b:b + 1], o_b, _scale(emb[b]), atol=1e-6, rtol=1e-6)
        if w is not None:
            assert_close(w[b:b + 1], w_b, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("op", list(REDUCTIONS))
def test_reduce_nan_padding_is_never_read(backend, op):
    fn, ref_fn = REDUCTIONS[op]
    rng = np.random.default_rng(32)
    x, mask, real = make_tokens(rng, 4, 40, 24, mask_kind="lengths")
    clean = fn(x, mask, backend=backend)
    for fill in (np.nan, np.inf, -np.inf):
        x2 = x.copy()
        x2[~real] = fill
        np.testing.assert_array_equal(fn(x2, mask, backend=backend), clean)
    # NaN in a real token propagates to its column of the row
    b, t = np.argwhere(real)[0]
    x2 = x.copy()
    x2[b, t, 5] = np.nan
    out = fn(x2, mask, backend=backend)
    expected = np.zeros(out.shape, bool)
    expected[b, 5] = True
    np.testing.assert_array_equal(np.isnan(out), expected)
    np.testing.assert_array_equal(np.isnan(ref_fn(x2, mask)), expected)


def test_masked_max_infinities(backend):
    x = np.array([[[-np.inf, 1.0], [-np.inf, np.inf], [5.0, 5.0]]], np.float32)
    mask = np.array([[True, True, False]])
    np.testing.assert_array_equal(masked_max(x, mask, backend=backend), [[-np.inf, np.inf]])
    np.testing.assert_array_equal(masked_mean(x, mask, backend=backend), [[-np.inf, np.inf]])
    # all values negative: the max is negative, not 0
    y = -np.abs(np.random.default_rng(33).standard_normal((2, 9, 17))).astype(np.float32) - 1
    assert (masked_max(y, backend=backend) < 0).all()


def test_reduce_all_padding_and_no_mask(backend):
    rng = np.random.default_rng(34)
    x = rng.standard_normal((3, 10, 9)).astype(np.float32)
    for fn, ref_fn in REDUCTIONS.values():
        np.testing.assert_array_equal(fn(x, np.zeros((3, 10), bool), backend=backend), 0)
        np.testing.assert_array_equal(fn(x, np.zeros((3, 10), np.int64), backend=backend), 0)
        assert_close(fn(x, backend=backend), ref_fn(x))
        assert_close(fn(x, None, backend=backend), fn(x, np.ones((3, 10), bool), backend=backend),
                     atol=0, rtol=0)


@pytest.mark.parametrize("shape", [(0, 5, 4), (3, 0, 4), (3, 5, 0), (0, 0, 0)])
def test_reduce_empty(backend, shape):
    x = np.ones(shape, np.float32)
    for fn in (masked_mean, masked_max):
        for mask in (None, np.ones(shape[:2], bool)):
            out = fn(x, mask, backend=backend)
            assert out.shape == (shape[0], shape[2]) and out.dtype == np.float32
            assert (out == 0).all()


def test_fuse_empty_batch(backend):
    emb = np.ones((0, 3, 4), np.float32)
    for s in STRATEGIES:
        kw = _fuse_kwargs(s, np.ones((0, 3), bool), np.ones(3, np.float32), np.ones(4, np.float32))
        out, w = run_fuse(emb, s, backend, **kw)
        assert out.shape == (0, 12 if s == "concat" else 4)
        assert w is None or w.shape == (0, 3)
    out = fuse([np.ones((0, 2)), np.ones((0, 5))], strategy="concat", backend=backend)
    assert out.shape == (0, 7)
    for s in ("concat", "mean", "sum", "max"):                     # D = 0
        out = fuse(np.ones((2, 3, 0), np.float32), strategy=s, backend=backend)
        assert out.shape == (2, 0)


def test_fuse_absent_modalities_are_never_read(backend):
    rng = np.random.default_rng(35)
    emb, present, real, weights, query = make_modalities(rng, 8, 4, 20, weights_kind="per_row")
    for s in STRATEGIES:
        kw = _fuse_kwargs(s, present, weights, query)
        clean = run_fuse(emb, s, backend, **kw)
        for fill in (np.nan, np.inf, -np.inf):
            e2 = emb.copy()
            e2[~real] = fill
            got = run_fuse(e2, s, backend, **kw)
            for x, y in zip(got, clean):
                if x is not None:
                    np.testing.assert_array_equal(x, y, err_msg=f"{s} {fill}")


def test_fuse_nan_in_present_embedding(backend):
    rng = np.random.default_rng(36)
    emb, _, _, weights, query = make_modalities(rng, 3, 3, 8, present_kind=None)
    emb[1, 2, 4] = np.nan
    for s in ("mean", "sum", "max", "weighted"):
        kw = _fuse_kwargs(s, None, np.ones(3, np.float32), query)
        out = fuse(emb, strategy=s, backend=backend, **kw)
        expected = np.zeros(out.shape, bool)
        expected[1, 4] = True
        np.testing.assert_array_equal(np.isnan(out), expected, err_msg=s)
    out, w = fuse(emb, strategy="attention", query=query, backend=backend)
    assert np.isnan(out[1]).all() and np.isnan(w[1]).all()
    assert not np.isnan(out[[0, 2]]).any() and not np.isnan(w[[0, 2]]).any()
    # with an absent modality: its weight stays 0
    present = np.ones((3, 3), bool)
    present[1, 0] = False
    out, w = fuse(emb, strategy="attention", query=query, present=present, backend=backend)
    assert np.isnan(out[1]).all() and w[1, 0] == 0 and np.isnan(w[1, 1:]).all()
    ref_out, ref_w = fuse_ref(emb, "attention", query=query, present=present)
    np.testing.assert_array_equal(np.isnan(out), np.isnan(ref_out))
    np.testing.assert_array_equal(np.isnan(w), np.isnan(ref_w))


def test_fuse_zero_weight_modality_is_not_read(backend):
    rng = np.random.default_rng(53)
    emb = rng.standard_normal((4, 3, 12)).astype(np.float32)
    weights = np.ones((4, 3), np.float32)
    weights[:, 1] = 0
    clean = fuse(emb, strategy="weighted", weights=weights, backend=backend)
    for fill in (np.nan, np.inf):
        e2 = emb.copy()
        e2[:, 1] = fill
        out = fuse(e2, strategy="weighted", weights=weights, backend=backend)
        np.testing.assert_array_equal(out, clean)
        np.testing.assert_array_equal(out, fuse_ref(e2, "weighted", weights=weights)[0]
                                      .astype(np.float32))
    # attention weights that are 0: a -inf score, and one that underflows
    q = np.zeros(12, np.float32)
    q[0] = 1e4
    e3 = emb.copy()
    e3[:, :, 0] = [-np.inf, 1.0, 0.0]                     # scores -inf, 1e4 / sqrt(12), 0
    out, w = fuse(e3, strategy="attention", query=q, backend=backend)
    np.testing.assert_array_equal(w, np.tile([0.0, 1.0, 0.0], (4, 1)))
    np.testing.assert_array_equal(out, e3[:, 1])


def test_fuse_semantics_by_hand(backend):
    e = np.array([[[1.0, 2.0], [3.0, -4.0], [5.0, 0.0]]], np.float32)       # B=1, M=3, D=2
    p = np.array([[True, False, True]])

    def f(s, **kw):
        return fuse(e, strategy=s, backend=backend, **kw)

    np.testing.assert_array_equal(f("concat"), [[1, 2, 3, -4, 5, 0]])
    np.testing.assert_array_equal(f("concat", present=p), [[1, 2, 0, 0, 5, 0]])
    np.testing.assert_array_equal(f("sum"), [[9, -2]])
    np.testing.assert_array_equal(f("sum", present=p), [[6, 2]])
    np.testing.assert_array_equal(f("mean", present=p), [[3, 1]])
    np.testing.assert_array_equal(f("max"), [[5, 2]])
    np.testing.assert_array_equal(f("max", present=p), [[5, 2]])
    out, w = f("weighted", weights=[1.0, 2.0, 3.0], present=p, return_weights=True)
    assert_close(w, [[0.25, 0.0, 0.75]])
    assert_close(out, [[4.0, 0.5]])
    out, w = f("attention", query=[0.0, 0.0])                            # uniform
    assert_close(w, [[1 / 3] * 3])
    assert_close(out, [[3.0, -2 / 3]])
    out, w = f("attention", query=[np.sqrt(2.0), 0.0], present=p)        # scores 1, 5
    ew = np.exp([1.0, 5.0]) / np.exp([1.0, 5.0]).sum()
    assert_close(w, [[ew[0], 0.0, ew[1]]])
    assert_close(out, [[ew[0] * 1 + ew[1] * 5, ew[0] * 2]])


def test_fuse_rows_without_modalities_or_weight(backend):
    rng = np.random.default_rng(37)
    emb = rng.standard_normal((3, 4, 6)).astype(np.float32)
    present = np.ones((3, 4), bool)
    present[1] = False
    weights = np.ones((3, 4), np.float32)
    weights[2] = [0, 0, 5, 0]
    weights[0] = 0
    for s in STRATEGIES:
        kw = _fuse_kwargs(s, present, weights, np.ones(6, np.float32))
        out, w = run_fuse(emb, s, backend, **kw)
        assert (out[1] == 0).all() and (w is None or (w[1] == 0).all())
    out, w = run_fuse(emb, "weighted", backend, present=present, weights=weights)
    assert (out[0] == 0).all() and (w[0] == 0).all()                  # present weights sum to 0
    assert_close(w[2], [0, 0, 1, 0])
    assert_close(out[2], emb[2, 2])


def test_fuse_weights_are_renormalized(backend):
    rng = np.random.default_rng(38)
    emb = rng.standard_normal((5, 3, 16)).astype(np.float32)
    base = fuse(emb, strategy="weighted", weights=[1.0, 2.0, 3.0], backend=backend)
    scaled = fuse(emb, strategy="weighted", weights=np.array([10.0, 20.0, 30.0]), backend=backend)
    per_row = fuse(emb, strategy="weighted", weights=np.tile([1.0, 2.0, 3.0], (5, 1)),
                   backend=backend)
    assert_close(base, scaled, atol=1e-6)
    assert_close(base, per_row, atol=1e-6)
    mean = fuse(emb, strategy="mean", backend=backend)
    assert_close(fuse(emb, strategy="weighted", weights=np.ones(3), backend=backend), mean,
                 atol=1e-6)
    assert_close(fuse(emb, strategy="weighted", weights=np.ones(3, np.int64), backend=backend),
                 mean, atol=1e-6)


def test_fuse_sequence_equals_stacked(backend):
    rng = np.random.default_rng(39)
    emb, present, real, weights, query = make_modalities(rng, 6, 3, 40, absent="nan")
    for s in STRATEGIES:
        kw = _fuse_kwargs(s, present, weights, query)
        a = run_fuse(emb, s, backend, **kw)
        b = run_fuse([emb[:, m] for m in range(3)], s, backend, **kw)
        c = run_fuse(tuple(emb[:, m].astype(np.float64) for m in range(3)), s, backend, **kw)
        for x, y, z in zip(a, b, c):
            if x is not None:
                np.testing.assert_array_equal(x, y)
                np.testing.assert_array_equal(x, z)


def test_fuse_single_modality(backend):
    rng = np.random.default_rng(40)
    e = rng.standard_normal((4, 1, 10)).astype(np.float32)
    for s in ("concat", "mean", "sum", "max"):
        np.testing.assert_array_equal(fuse(e, strategy=s, backend=backend), e[:, 0], err_msg=s)
    out, w = fuse(e, strategy="attention", query=np.ones(10), backend=backend)
    np.testing.assert_array_equal(w, 1.0)
    assert_close(out, e[:, 0], atol=1e-6)
    out, w = fuse([e[:, 0]], strategy="weighted", weights=[0.3], return_weights=True,
                  backend=backend)
    np.testing.assert_array_equal(w, 1.0)


def test_fuse_return_forms(backend):
    rng = np.random.default_rng(41)
    emb = rng.standard_normal((2, 3, 4)).astype(np.float32)
    for s in ("concat", "mean", "sum", "max"):
        assert isinstance(fuse(emb, strategy=s, backend=backend), np.ndarray)
    r = fuse(emb, strategy="weighted", weights=[1, 1, 1], backend=backend)
    assert isinstance(r, np.ndarray) and r.shape == (2, 4)
    r = fuse(emb, strategy="weighted", weights=[1, 1, 1], return_weights=True, backend=backend)
    assert isinstance(r, tuple) and len(r) == 2 and r[1].shape == (2, 3)
    for rw in (False, True):
        r = fuse(emb, strategy="attention", query=np.ones(4), return_weights=rw, backend=backend)
        assert isinstance(r, tuple) and len(r) == 2 and r[1].shape == (2, 3)
        for x in r:
            assert x.dtype == np.float32 and x.flags.c_contiguous


# ----------------------------------------------------------------------------------------------
# layouts, dtypes, masks


def test_non_contiguous_inputs(backend):
    rng = np.random.default_rng(42)
    B, L, D, M = 4, 23, 17, 3
    x = rng.standard_normal((L, B, 2 * D)).astype(np.float32).transpose(1, 0, 2)[..., ::2]
    real = rng.random((L, B)) < 0.7
    mask = real.T                                          # transposed bool view
    assert not x.flags.c_contiguous and not mask.flags.c_contiguous
    for fn, ref_fn in REDUCTIONS.values():
        out = fn(x, mask, backend=backend)
        assert_close(out, ref_fn(x, mask), _scale(x))
        np.testing.assert_array_equal(
            out, fn(np.ascontiguousarray(x), np.ascontiguousarray(mask), backend=backend))
    emb = rng.standard_normal((M, B, D)).astype(np.float32).transpose(1, 0, 2)[:, ::-1]
    present = (rng.random((M, B)) < 0.7).T
    weights = rng.random((M, 2 * B)).astype(np.float32).T[::2]    # (B, M), strided
    query = rng.standard_normal(2 * D).astype(np.float32)[::2]
    for s in STRATEGIES:
        kw = _fuse_kwargs(s, present, weights, query)
        res = run_fuse(emb, s, backend, **kw)
        kw_c = {k: (np.ascontiguousarray(v) if isinstance(v, np.ndarray) else v)
                for k, v in kw.items()}
        res_c = run_fuse(np.ascontiguousarray(emb), s, backend, **kw_c)
        for a, b in zip(res, res_c):
            if a is not None:
                np.testing.assert_array_equal(a, b)
        check_fuse(res, fuse_ref(emb, s, **kw), emb, np.ascontiguousarray(present), s)
    # strided sequence items
    items = [np.asfortranarray(emb[:, m]) for m in range(M)]
    assert not items[1].flags.c_contiguous
    np.testing.assert_array_equal(fuse(items, strategy="sum", backend=backend),
                                  fuse(np.ascontiguousarray(emb), strategy="sum", backend=backend))


@pytest.mark.parametrize("dtype", [np.float16, np.float64])
def test_other_float_dtypes(backend, dtype):
    rng = np.random.default_rng(43)
    x, mask, real = make_tokens(rng, 3, 19, 33, mask_kind="lengths", dtype=dtype)
    for fn, ref_fn in REDUCTIONS.values():
        out = fn(x, mask, backend=backend)
        assert out.dtype == np.float32
        assert_close(out, ref_fn(x, mask), _scale(x), atol=ATOL16 if dtype == np.float16 else ATOL)
    emb, present, real, weights, query = make_modalities(rng, 5, 3, 9)
    for s in STRATEGIES:
        kw = _fuse_kwargs(s, present, weights, query)
        e = emb.astype(dtype)
        res = run_fuse(e, s, backend, **kw)
        ref = fuse_ref(e.astype(np.float64), s, **kw)
        tol = 3 * ATOL16 if dtype == np.float16 else ATOL
        assert_close(res[0], ref[0], _scale(e), atol=tol, rtol=tol)
        if ref[1] is not None:
            assert_close(res[1], ref[1], atol=tol, rtol=tol)


@pytest.mark.parametrize("mask_dtype", [np.bool_, np.int64, np.int32, np.int8, np.uint8,
                                        np.uint64])
def test_integer_masks(backend, mask_dtype):
    rng = np.random.default_rng(44)
    x, mask, real = make_tokens(rng, 4, 12, 8, mask_kind="lengths", mask_dtype=mask_dtype,
                                padding="nan")
    for fn, _ in REDUCTIONS.values():
        np.testing.assert_array_equal(fn(x, mask, backend=backend), fn(x, real, backend=backend))
    emb, present, real, _, _ = make_modalities(rng, 4, 3, 8, mask_dtype=mask_dtype, absent="nan")
    np.testing.assert_array_equal(fuse(emb, strategy="mean", present=present, backend=backend),
                                  fuse(emb, strategy="mean", present=real, backend=backend))
    # Python lists work too
    lst = real.astype(int).tolist()
    np.testing.assert_array_equal(fuse(emb, strategy="max", present=lst, backend=backend),
                                  fuse(emb, strategy="max", present=real, backend=backend))


def test_present_shared_over_batch(backend):
    rng = np.random.default_rng(45)
    emb = rng.standard_normal((6, 4, 5)).astype(np.float32)
    p1 = np.array([True, False, True, True])
    for s in ("concat", "mean", "max"):
        np.testing.assert_array_equal(
            fuse(emb, strategy=s, present=p1, backend=backend),
            fuse(emb, strategy=s, present=np.tile(p1, (6, 1)), backend=backend))


def test_inputs_not_modified_and_read_only(backend):
    rng = np.random.default_rng(46)
    x, mask, _ = make_tokens(rng, 3, 10, 8, mask_kind="lengths", mask_dtype=np.int64)
    emb, present, _, weights, query = make_modalities(rng, 3, 4, 8, weights_kind="per_row")
    arrays = (x, mask, emb, present, weights, query)
    copies = [a.copy() for a in arrays]
    for a in arrays:
        a.setflags(write=False)
    for fn in (masked_mean, masked_max):
        fn(x, mask, backend=backend)
    for s in STRATEGIES:
        run_fuse(emb, s, backend, **_fuse_kwargs(s, present, weights, query))
        run_fuse([emb[:, m] for m in range(4)], s, backend, **_fuse_kwargs(s, present, weights,
                                                                          query))
    for a, c in zip(arrays, copies):
        np.testing.assert_array_equal(a, c)


def test_large_beyond_cache(backend):
    rng = np.random.default_rng(47)
    x, mask, real = make_tokens(rng, 3, 2048, 515, mask_kind="lengths")
    for fn, ref_fn in REDUCTIONS.values():
        assert_close(fn(x, mask, backend=backend), ref_fn(x, mask), _scale(x))
    emb, present, real, weights, query = make_modalities(rng, 2000, 4, 129)
    for s in ("mean", "attention", "concat"):
        kw = _fuse_kwargs(s, present, weights, query)
        check_fuse(run_fuse(emb, s, backend, **kw), fuse_ref(emb, s, **kw), emb, real, s)


def test_thread_count_does_not_change_results():
    _need_backend("native")
    rng = np.random.default_rng(48)
    x, mask, _ = make_tokens(rng, 7, 301, 67, mask_kind="lengths")
    emb, present, _, weights, query = make_modalities(rng, 301, 5, 67)
    old = mmcore.get_num_threads()
    results = []
    try:
        for n in (1, 2, 3, 8):
            mmcore.set_num_threads(n)
            r = [masked_mean(x, mask), masked_max(x, mask)]
            for s in STRATEGIES:
                r += [a for a in run_fuse(emb, s, "native", **_fuse_kwargs(s, present, weights,
                                                                             query))
                      if a is not None]
            results.append(r)
    finally:
        mmcore.set_num_threads(old)
    for r in results[1:]:
        for a, b in zip(r, results[0]):
            np.testing.assert_array_equal(a, b)


def test_concurrent_calls(backend):
    from concurrent.futures import ThreadPoolExecutor
    rng = np.random.default_rng(49)
    cases = [make_tokens(rng, 5, 200, 64, mask_kind="lengths")[:2] for _ in range(4)]
    expected = [masked_mean(x, m, backend=backend) for x, m in cases]
    with ThreadPoolExecutor(4) as pool:
        got = list(pool.map(lambda c: masked_mean(c[0], c[1], backend=backend), cases * 3))
    for i, out in enumerate(got):
        np.testing.assert_array_equal(out, expected[i % len(cases)])


# ----------------------------------------------------------------------------------------------
# PyTorch


def test_masked_mean_matches_torch(backend):
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(50)
    x, mask, real = make_tokens(rng, 6, 77, 64, mask_kind="lengths", mask_dtype=np.int64)
    real[:, 0] = True                               # torch divides 0 by 0 for empty rows
    mask = real.astype(np.int64)
    tx, tm = torch.from_numpy(x), torch.from_numpy(mask)
    want = (tx * tm[..., None]).sum(1) / tm.sum(1, keepdim=True)
    assert_close(masked_mean(x, mask, backend=backend), want.numpy())
    want_max = tx.masked_fill(~tm.bool()[..., None], float("-inf")).amax(1)
    np.testing.assert_array_equal(masked_max(x, mask, backend=backend), want_max.numpy())


def test_fuse_attention_matches_torch(backend):
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(51)
    B, M, D = 8, 4, 32
    emb, present, real, _, query = make_modalities(rng, B, M, D, query_kind="per_row")
    real[:, 0] = True                               # softmax of all -inf is NaN in torch
    te, tq = torch.from_numpy(emb), torch.from_numpy(query)
    scores = torch.einsum("bmd,bd->bm", te, tq) / D ** 0.5
    w = torch.softmax(scores.masked_fill(~torch.from_numpy(real), float("-inf")), dim=1)
    want = torch.einsum("bm,bmd->bd", w, te.masked_fill(~torch.from_numpy(real)[..., None], 0))
    out, got_w = fuse(emb, strategy="attention", query=query, present=real, backend=backend)
    assert_close(got_w, w.numpy())
    assert_close(out, want.numpy())


# ----------------------------------------------------------------------------------------------
# bad inputs


def _good():
    rng = np.random.default_rng(52)
    x = rng.standard_normal((2, 5, 4)).astype(np.float32)
    emb = rng.standard_normal((2, 3, 4)).astype(np.float32)
    return x, emb


def _bad_reduce_cases():
    x, _ = _good()
    m = np.ones((2, 5), bool)
    cases = [
        ("x_rank2", (x[0], m), "x"),
        ("x_rank4", (x[None], m), "x"),
        ("x_scalar", (np.float32(1), None), "x"),
        ("x_none", (None, m), "x"),
        ("x_int", (x.astype(np.int32), m), "x"),
        ("x_bool", (x > 0, m), "x"),
        ("x_complex", (x.astype(np.complex64), m), "x"),
        ("x_object", (np.empty(x.shape, object), m), "x"),
        ("x_ragged", ([[[1.0]], [[1.0, 2.0]]], None), "x"),
        ("mask_shape", (x, m[:, :4]), "mask"),
        ("mask_batch", (x, m[:1]), "mask"),
        ("mask_rank1", (x, m[0]), "mask"),
        ("mask_rank3", (x, m[..., None]), "mask"),
        ("mask_float", (x, m.astype(np.float32)), "mask"),
        ("mask_int_two", (x, np.full((2, 5), 2, np.int64)), "mask"),
        ("mask_int_negative", (x, np.full((2, 5), -1, np.int8)), "mask"),
        ("mask_str", (x, np.full((2, 5), "a")), "mask"),
    ]
    return [pytest.param(op, a, n, id=f"{op}-{cid}") for cid, a, n in cases
            for op in REDUCTIONS]


@pytest.mark.parametrize("op,args,name", _bad_reduce_cases())
def test_bad_reduce_inputs_raise_shape_error(backend, op, args, name):
    fn, _ = REDUCTIONS[op]
    expected = ArgumentError if args[0] is None else ShapeError    # None is not an array
    with pytest.raises(expected, match=rf"^\[{op}\] {name}\b") as info:
        fn(*args, backend=backend)
    assert isinstance(info.value, ValueError) and isinstance(info.value, MMCoreError)


def _bad_fuse_cases():
    _, emb = _good()
    f = np.float32
    e0, e1 = emb[:, 0], emb[:, 1]
    w, q = np.ones(3, f), np.ones(4, f)
    cases = [
        # (id, embeddings, kwargs, argument the message must name)
        ("emb_empty_list", [], dict(strategy="mean"), "embeddings"),
        ("emb_rank2", emb[:, 0], dict(strategy="mean"), "embeddings"),
        ("emb_rank4", emb[None], dict(strategy="mean"), "embeddings"),
        ("emb_M0", emb[:, :0], dict(strategy="mean"), "embeddings"),
        ("emb_M0_concat", emb[:, :0], dict(strategy="concat"), "embeddings"),
        ("emb_int", emb.astype(np.int64), dict(strategy="sum"), "embeddings"),
        ("emb_none", None, dict(strategy="sum"), "embeddings"),
        ("item_rank1", [e0, e1[0]], dict(strategy="concat"), "embeddings"),
        ("item_rank3", [e0, emb], dict(strategy="mean"), "embeddings"),
        ("item_batch", [e0, e1[:1]], dict(strategy="concat"), "embeddings"),
        ("item_width", [e0, e1[:, :3]], dict(strategy="mean"), "embeddings"),
        ("item_width_attention", [e0, e1[:, :3]], dict(strategy="attention", query=q),
         "embeddings"),
        ("item_int", [e0, e1.astype(np.int32)], dict(strategy="concat"), "embeddings"),
        ("item_none", [e0, None], dict(strategy="concat"), "embeddings"),
        ("D0_attention", emb[..., :0], dict(strategy="attention", query=q[:0]), "embeddings"),
        ("D0_weighted", emb[..., :0], dict(strategy="weighted", weights=w), "embeddings"),
        ("strategy_unknown", emb, dict(strategy="median"), "strategy"),
        ("strategy_case", emb, dict(strategy="Mean"), "strategy"),
        ("strategy_none", emb, dict(strategy=None), "strategy"),
        ("strategy_int", emb, dict(strategy=1), "strategy"),
        ("weights_missing", emb, dict(strategy="weighted"), "weights"),
        ("weights_unused", emb, dict(strategy="mean", weights=w), "weights"),
        ("weights_shape", emb, dict(strategy="weighted", weights=np.ones(4, f)), "weights"),
        ("weights_shape2", emb, dict(strategy="weighted", weights=np.ones((3, 3), f)), "weights"),
        ("weights_rank3", emb, dict(strategy="weighted", weights=np.ones((2, 3, 1), f)), "weights"),
        ("weights_nan", emb, dict(strategy="weighted", weights=[1.0, np.nan, 1.0]), "weights"),
        ("weights_inf", emb, dict(strategy="weighted", weights=[1.0, np.inf, 1.0]), "weights"),
        ("weights_f32_overflow", emb, dict(strategy="weighted", weights=[1e39, 1.0, 1.0]),
         "weights"),
        ("weights_negative", emb, dict(strategy="weighted", weights=[1.0, -0.5, 1.0]), "weights"),
        ("weights_bool", emb, dict(strategy="weighted", weights=np.ones(3, bool)), "weights"),
        ("weights_str", emb, dict(strategy="weighted", weights="uniform"), "weights"),
        ("query_missing", emb, dict(strategy="attention"), "query"),
        ("query_unused", emb, dict(strategy="max", query=q), "query"),
        ("query_shape", emb, dict(strategy="attention", query=np.ones(5, f)), "query"),
        ("query_batch", emb, dict(strategy="attention", query=np.ones((3, 4), f)), "query"),
        ("query_nan", emb, dict(strategy="attention", query=[0.0, np.nan, 0, 0]), "query"),
        ("query_complex", emb, dict(strategy="attention", query=q.astype(np.complex64)), "query"),
        ("present_shape", emb, dict(strategy="mean", present=np.ones((2, 4), bool)), "present"),
        ("present_batch", emb, dict(strategy="mean", present=np.ones((3, 3), bool)), "present"),
        ("present_rank3", emb, dict(strategy="mean", present=np.ones((2, 3, 1), bool)), "present"),
        ("present_float", emb, dict(strategy="mean", present=np.ones((2, 3), f)), "present"),
        ("present_int_two", emb, dict(strategy="concat", present=np.full((2, 3), 2)), "present"),
        ("present_list_shape", [e0, e1], dict(strategy="concat", present=[1, 1, 1]), "present"),
        ("return_weights_mean", emb, dict(strategy="mean", return_weights=True),
         "return_weights"),
        ("return_weights_concat", [e0, e1], dict(strategy="concat", return_weights=True),
         "return_weights"),
        ("return_weights_str", emb, dict(strategy="weighted", weights=w, return_weights="yes"),
         "return_weights"),
    ]
    return [pytest.param(e, kw, name, ArgumentError if cid in _FUSE_ARGUMENT_CASES else ShapeError,
                         id=cid) for cid, e, kw, name in cases]


# Mistakes that are not about an array's rank, shape or dtype: ArgumentError.
_FUSE_ARGUMENT_CASES = {
    "emb_none", "item_none", "strategy_unknown", "strategy_case", "strategy_none", "strategy_int",
    "weights_missing", "weights_unused", "weights_nan", "weights_inf", "weights_f32_overflow",
    "weights_negative", "weights_str", "query_missing", "query_unused", "return_weights_mean",
    "return_weights_concat", "return_weights_str"}


@pytest.mark.parametrize("embeddings,kwargs,name,expected", _bad_fuse_cases())
def test_bad_fuse_inputs_raise_shape_error(backend, embeddings, kwargs, name, expected):
    with pytest.raises(expected, match=rf"^\[fuse\] {name}\b") as info:
        fuse(embeddings, backend=backend, **kwargs)
    assert isinstance(info.value, ValueError) and isinstance(info.value, MMCoreError)


def test_strategy_is_keyword_only():
    _, emb = _good()
    with pytest.raises(TypeError):
        fuse(emb, "mean")                                   # noqa
    with pytest.raises(TypeError):
        fuse(emb)                                           # noqa
    with pytest.raises(TypeError):
        masked_mean(emb, None, "native")                    # noqa


def test_backend_selection(monkeypatch):
    _need_backend("numba")
    x, emb = _good()
    ref = masked_mean_ref(x)
    with mmcore.use_backend("numba"):
        assert_close(masked_mean(x), ref)
        assert_close(fuse(emb, strategy="mean"), fuse_ref(emb, "mean")[0])
    monkeypatch.setenv("MMCORE_BACKEND", "numba")
    assert_close(masked_max(x), masked_max_ref(x))
    monkeypatch.setenv("MMCORE_BACKEND", "nonsense")
    with pytest.raises(BackendError, match="nonsense"):
        masked_mean(x)
    with pytest.raises(BackendError, match="unknown backend 'tpu'"):
        fuse(emb, strategy="sum", backend="tpu")
    with pytest.raises(BackendError, match="cuda"):
        masked_max(x, backend="cuda")


def test_docstring_examples():
    import mmcore.ops.fusion as mod
    failures, tried = doctest.testmod(mod, optionflags=doctest.NORMALIZE_WHITESPACE)
    assert tried > 0 and failures == 0


def test_public_names():
    assert mmcore.ops.masked_mean is masked_mean and mmcore.ops.fuse is fuse
    for n in ("masked_mean", "masked_max", "fuse"):
        assert n in mmcore.ops.__all__


# ----------------------------------------------------------------------------------------------
# CUDA


@pytest.fixture
def cp():
    cupy = pytest.importorskip("cupy")
    try:
        from mmcore.kernels.cuda import fusion  # noqa: F401
    except ImportError as exc:
        pytest.skip(f"no CUDA fusion kernels in this build: {exc}")
    return cupy


@pytest.mark.cuda
@pytest.mark.parametrize("shape", [(1, 1, 1), (3, 31, 7), (5, 65, 64), (2, 300, 129),
                                   (64, 128, 1024)])
def test_cuda_reduce_vs_reference(cp, shape):
    rng = np.random.default_rng(sum(shape))
    x, mask, real = make_tokens(rng, *shape, mask_kind="lengths", padding="nan",
                                mask_dtype=np.int64)
    for fn, ref_fn in REDUCTIONS.values():
        out = fn(cp.asarray(x), cp.asarray(mask))
        assert isinstance(out, cp.ndarray) and out.dtype == cp.float32
        assert_close(cp.asnumpy(out), ref_fn(x, mask), _scale(x, real[..., None]))


@pytest.mark.cuda
@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("shape", [(1, 1, 1), (7, 3, 17), (33, 4, 64), (1000, 5, 129)])
def test_cuda_fuse_vs_reference(cp, strategy, shape):
    rng = np.random.default_rng(sum(shape))
    emb, present, real, weights, query = make_modalities(rng, *shape, absent="nan",
                                                         weights_kind="per_row")
    kw = _fuse_kwargs(strategy, present, weights, query)
    kw_d = {k: cp.asarray(v) for k, v in kw.items()}
    res = fuse(cp.asarray(emb), strategy=strategy, return_weights=strategy == "weighted", **kw_d)
    res = res if isinstance(res, tuple) else (res, None)
    assert isinstance(res[0], cp.ndarray)
    got = tuple(None if r is None else cp.asnumpy(r) for r in res)
    check_fuse(got, fuse_ref(emb, strategy, **kw), emb, real, strategy)
    # a sequence of device arrays
    got_l = fuse([cp.asarray(emb[:, m]) for m in range(shape[1])], strategy=strategy,
                 return_weights=strategy == "weighted", **kw_d)
    got_l = got_l if isinstance(got_l, tuple) else (got_l, None)
    assert_close(cp.asnumpy(got_l[0]), got[0], atol=0, rtol=0)


@pytest.mark.cuda
def test_cuda_rejects_mixed_and_bad_inputs(cp):
    x, emb = _good()
    with pytest.raises(BackendError):
        masked_mean(cp.asarray(x), np.ones((2, 5), bool))           # mixed host and device
    with pytest.raises(BackendError):
        fuse(cp.asarray(emb), strategy="mean", backend="numba")
    with pytest.raises(ShapeError, match=r"^\[masked_max\] mask\b"):
        masked_max(cp.asarray(x), cp.full((2, 5), 2))
    with pytest.raises(ShapeError, match=r"^\[fuse\] weights\b"):
        fuse(cp.asarray(emb), strategy="weighted", weights=cp.asarray([1.0, cp.nan, 1.0]))



@pytest.mark.parametrize("backend", HOST_BACKENDS)
def test_out_is_written_and_returned(backend):
    _need_backend(backend)
    rng = np.random.default_rng(21)
    x = rng.standard_normal((3, 5, 7)).astype(np.float32)
    mask = rng.random((3, 5)) < 0.7
    for op in (masked_mean, masked_max):
        out = np.full((3, 7), np.nan, np.float32)
        res = op(x, mask, out=out, backend=backend)
        assert res is out
        np.testing.assert_array_equal(out, op(x, mask, backend=backend))
    emb = rng.standard_normal((3, 4, 7)).astype(np.float32)
    present = rng.random((3, 4)) < 0.8
    for strategy, width in (("mean", 7), ("concat", 28), ("max", 7)):
        out = np.full((3, width), np.nan, np.float32)
        res = fuse(emb, strategy=strategy, present=present, out=out, backend=backend)
        assert res is out
        np.testing.assert_array_equal(out, fuse(emb, strategy=strategy, present=present,
                                                backend=backend))
    parts = [emb[:, 0], emb[:, 1, :3]]
    out = np.empty((3, 10), np.float32)
    assert fuse(parts, strategy="concat", out=out, backend=backend) is out
    np.testing.assert_array_equal(out, fuse(parts, strategy="concat", backend=backend))
    fused, w = fuse(emb, strategy="attention", query=np.ones(7, np.float32),
                    out=np.empty((3, 7), np.float32), backend=backend)
    assert fused.shape == (3, 7) and w.shape == (3, 4)
    empty = np.full((0, 7), np.nan, np.float32)
    assert masked_mean(np.zeros((0, 5, 7), np.float32), out=empty) is empty


def test_bad_out_names_the_argument():
    x = np.ones((2, 3, 4), np.float32)
    with pytest.raises(ShapeError, match=r"\[masked_mean\] out has shape"):
        masked_mean(x, out=np.empty((2, 5), np.float32))
    with pytest.raises(ShapeError, match=r"\[masked_max\] out has dtype float64"):
        masked_max(x, out=np.empty((2, 4), np.float64))
    with pytest.raises(ShapeError, match=r"\[fuse\] out must be C-contiguous"):
        fuse(x, strategy="mean", out=np.empty((4, 2), np.float32).T)
    ro = np.empty((2, 4), np.float32)
    ro.setflags(write=False)
    with pytest.raises(ShapeError, match=r"\[fuse\] out must be writable"):
        fuse(x, strategy="sum", out=ro)
    with pytest.raises(ArgumentError, match=r"\[fuse\] out must be an array"):
        fuse(x, strategy="sum", out=[[0.0] * 4] * 2)
