"""Sizes beyond 2^31 and sums beyond 2^24 terms.

* Image axes longer than 2^31 pixels: the kernels index in 64 bits. The inputs are views that
  cost no memory (zero strides: one row repeated 2^31 times) or untouched ``np.zeros`` pages,
  and the outputs are small, so the results can be held against a small equivalent.
* Work whose scratch cannot fit (an antialiased downscale of 2^31 pixels to a few, whose
  filter tables alone would take tens of GiB) raises :class:`mmcore.errors.ShapeError` with the
  op's prefix, quickly, instead of exhausting memory or crashing.
* Reductions over more than 2^24 terms (where a float32 running sum stalls: 2^24 + 1 == 2^24)
  stay within a few float32 ulps of the float64 reference on every backend.
* The private native bindings refuse what would make them read out of bounds or overflow.
"""

from __future__ import annotations

import tempfile
import time

import numpy as np
import pytest

from mmcore import ops
from mmcore.errors import ShapeError

# children run outside the checkout, so that "-c" does not put its mmcore/ (which lacks the
# native module in a regular install) before the installed package
_OUTSIDE_SOURCE = tempfile.gettempdir()

try:
    import numba  # noqa: F401
    HAVE_NUMBA = True
except ImportError:  # pragma: no cover - numba is a dependency
    HAVE_NUMBA = False

BACKENDS = ["native"] + (["numba"] if HAVE_NUMBA else [])

BIG = 2**31 + 5


def _repeated_rows(row: np.ndarray, H: int) -> np.ndarray:
    """A read-only (H, W, C) view of ``row`` (W, C) repeated H times (row stride 0)."""
    row = np.ascontiguousarray(row)
    return np.lib.stride_tricks.as_strided(row, shape=(H,) + row.shape, strides=(0,) + row.strides,
                                           writeable=False)


def _ulps(got, ref) -> np.ndarray:
    """|got - ref| in units of the float32 spacing at ref."""
    ref32 = np.asarray(ref, np.float64).astype(np.float32)
    return np.abs(np.asarray(got, np.float64) - np.asarray(ref, np.float64)) / np.spacing(
        np.abs(ref32)).astype(np.float64)


# ----------------------------------------------------------------------------------------------
# resize / preprocess_image of images taller or wider than 2^31 pixels


@pytest.mark.parametrize("backend", BACKENDS)
def test_resize_zero_stride_image_taller_than_2_31(backend):
    # The example of the issue: every stride 0, one value; the kernels read it in place.
    img = np.lib.stride_tricks.as_strided(np.full(1, 77, np.uint8), shape=(BIG, 4, 3),
                                          strides=(0, 0, 0))
    out = ops.resize(img, (4, 3), filter="nearest", backend=backend)
    assert out.shape == (4, 3, 3) and out.dtype == np.uint8
    assert (out == 77).all()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("filt", ["nearest", "bilinear", "bicubic", "lanczos"])
@pytest.mark.parametrize("dtype", [np.uint8, np.float32])
def test_resize_taller_than_2_31_matches_small_equivalent(backend, filt, dtype):
    rng = np.random.default_rng(0)
    row = rng.integers(0, 256, (6, 4)).astype(dtype)   # W = 6, RGBA for uint8
    if dtype == np.float32:
        row = row[:, :3] / np.float32(255)             # float32: any C
    big = _repeated_rows(row, BIG)
    small = _repeated_rows(row, 64).copy()
    # Every input row is the same, so the vertical filter (weights summing to 1) gives that row
    # back and only the horizontal filter, the same for both, shapes the result.
    got = ops.resize(big, (5, 4), filter=filt, antialias=False, backend=backend)
    want = ops.resize(small, (5, 4), filter=filt, antialias=False, backend=backend)
    assert got.shape == want.shape == (5, 4, row.shape[1])
    if dtype == np.uint8:
        np.testing.assert_array_equal(got, want)
        assert (got == got[:1]).all()  # every output row is the same
    else:  # weights summing to 1 within float32 rounding
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(got, np.broadcast_to(got[:1], got.shape), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_resize_batch_and_list_of_tall_images(backend):
    row = np.arange(12, dtype=np.uint8).reshape(4, 3)
    big = _repeated_rows(row, BIG)
    outs = ops.resize([big, row[None]], (2, 2), filter="bilinear", antialias=False,
                      backend=backend)
    np.testing.assert_array_equal(outs[0], outs[1])
    batch = np.lib.stride_tricks.as_strided(big, shape=(3,) + big.shape, strides=(0,) + big.strides)
    out = ops.resize(batch, (2, 2), filter="bilinear", antialias=False, backend=backend)
    assert out.shape == (3, 2, 2, 3)
    np.testing.assert_array_equal(out[2], outs[1])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("filt", ["bilinear", "bicubic", "lanczos"])
def test_antialiased_downscale_of_2_31_rows_raises_shape_error(backend, filt):
    big = _repeated_rows(np.zeros((4, 3), np.uint8), BIG)
    t0 = time.monotonic()
    with pytest.raises(ShapeError, match=r"^\[resize\] resizing 2147483653 rows to 4 with "
                                         r"antialiasing needs .* GiB of filter tables"):
        ops.resize(big, (4, 4), filter=filt, backend=backend)
    assert time.monotonic() - t0 < 60  # refused up front, not after filtering (generous bound)


@pytest.mark.parametrize("backend", BACKENDS)
def test_resize_wider_than_2_31(backend):
    # 2 GiB of untouched zero pages: only the pixels the taps read are ever mapped.
    W = BIG
    img = np.zeros((1, W, 1), np.uint8)
    scale = W / 4
    centres = [int((i + 0.5) * scale) for i in range(4)]
    for i, c in enumerate(centres):
        img[0, c - 8:c + 8, 0] = 10 * (i + 1)
    out = ops.resize(img, (1, 4), filter="nearest", backend=backend)
    np.testing.assert_array_equal(out[0, :, 0], [10, 20, 30, 40])
    out = ops.resize(img, (2, 4), filter="bicubic", antialias=False, backend=backend)
    np.testing.assert_array_equal(out[:, :, 0], [[10, 20, 30, 40]] * 2)
    with pytest.raises(ShapeError, match=r"^\[resize\] resizing 2147483653 columns to 4"):
        ops.resize(img, (1, 4), filter="bilinear", backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_preprocess_image_taller_than_2_31(backend):
    rng = np.random.default_rng(1)
    row = rng.integers(0, 256, (8, 3)).astype(np.uint8)
    # shortest edge 8 -> 16: the resized image has 2^32 + 10 rows and the crop starts past 2^31
    got = ops.preprocess_image(_repeated_rows(row, BIG), size=16, backend=backend)
    want = ops.preprocess_image(_repeated_rows(row, 1000), size=16, backend=backend)
    assert got.shape == want.shape == (3, 16, 16)
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("backend", BACKENDS)
def test_rgba_tall_zero_stride_is_not_copied(backend):
    # uint8 RGBA is premultiplied before filtering: the repeated row is premultiplied once.
    row = np.array([[200, 100, 50, 128], [10, 20, 30, 255], [0, 0, 0, 0], [255, 255, 255, 64]],
                   np.uint8)
    got = ops.resize(_repeated_rows(row, BIG), (3, 3), filter="bicubic", antialias=False,
                     backend=backend)
    want = ops.resize(_repeated_rows(row, 16).copy(), (3, 3), filter="bicubic", antialias=False,
                      backend=backend)
    np.testing.assert_array_equal(got, want)


_RSS_CHILD = r"""
import resource, sys
import numpy as np
from mmcore import ops
backend, case = sys.argv[1], sys.argv[2]
def run(scale):
    if case == "horizontal_first":
        # 32768 rows of 1 x 1 x 3 pixels -> (1, 16384): the intermediate of the first pass
        # would hold every source row at the output width (1.5 GiB)
        x = np.broadcast_to(np.zeros((1, 1, 3), np.uint8), (32768 // scale, 32768 // scale, 3))
        out = ops.resize(x, (1, 16384 // scale), filter="bilinear", backend=backend)
        assert out.shape == (1, 16384 // scale, 3) and not out.any()
    else:
        # 2^20 rows of one 96 KiB row -> (8192, 4) nearest: vertical pass first, whose
        # intermediate would hold every output row at the span of the 4 columns (576 MiB)
        row = np.full((1, 32768 // scale, 3), 9, np.uint8)
        x = np.broadcast_to(row, (2**20 // scale, 32768 // scale, 3))
        out = ops.resize(x, (8192 // scale, 4), filter="nearest", backend=backend)
        assert out.shape == (8192 // scale, 4, 3) and (out == 9).all()
run(64)  # the same code paths, small: compiled and warmed before measuring
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
run(1)
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print("growth_kib", after - before)
"""


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", ["horizontal_first", "vertical_first"])
def test_resize_of_repeated_rows_keeps_memory_bounded(backend, case):
    # A tiny broadcast image (row stride 0) made resize allocate an intermediate image of the
    # whole (virtual) source height, or of every output row at the source width: ~0.5-0.8 GiB
    # here, gigabytes for slightly larger sizes. Now one repeated row stands for all of them
    # (horizontal pass first), and the vertical-first order runs in bands of output rows.
    import subprocess
    import sys
    r = subprocess.run([sys.executable, "-c", _RSS_CHILD, backend, case], capture_output=True,
                       text=True, timeout=600, cwd=_OUTSIDE_SOURCE)
    assert r.returncode == 0, r.stderr[-2000:]
    growth_mib = int(r.stdout.split("growth_kib")[1]) / 1024
    assert growth_mib < 200, growth_mib


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [np.uint8, np.float32])
@pytest.mark.parametrize("filt", ["nearest", "bilinear", "bicubic", "lanczos"])
@pytest.mark.parametrize("size", [(7, 50), (5, 3), (40, 9)])
def test_resize_of_repeated_rows_matches_a_copy(backend, dtype, filt, size):
    # (300, 40) -> (7, 50): vertical pass first; (5, 3) and (40, 9) from (300, 400): horizontal
    # first (the stride-0 shortcut); each must equal the resize of the materialized image.
    rng = np.random.default_rng(7)
    W = 40 if size == (7, 50) else 400
    row = (rng.random((W, 4)) * 255).astype(dtype)
    view = _repeated_rows(row, 300)
    got = ops.resize(view, size, filter=filt, backend=backend)
    want = ops.resize(view.copy(), size, filter=filt, backend=backend)
    np.testing.assert_array_equal(got, want)
    if filt != "nearest":
        got = ops.resize(view, size, filter=filt, antialias=False, backend=backend)
        want = ops.resize(view.copy(), size, filter=filt, antialias=False, backend=backend)
        np.testing.assert_array_equal(got, want)


@pytest.mark.skipif(not HAVE_NUMBA, reason="numba is not installed")
@pytest.mark.parametrize("dtype", [np.uint8, np.float32])
def test_numba_vertical_first_bands_match_one_piece(monkeypatch, dtype):
    from mmcore.kernels.numba import image as nb_image
    rng = np.random.default_rng(3)
    img = (rng.random((300, 40, 3)) * 255).astype(dtype)
    want = ops.resize(img, (37, 50), filter="bicubic", backend="numba")
    # intermediate rows of 40 columns: a band of 3 rows at a time, the last band shorter
    monkeypatch.setattr(nb_image, "_MAX_INTER_BYTES", 3 * 40 * 3 * img.itemsize)
    got = ops.resize(img, (37, 50), filter="bicubic", backend="numba")
    np.testing.assert_array_equal(got, want)
    if dtype == np.uint8:  # fixed point: the native kernels give the same numbers
        np.testing.assert_array_equal(got, ops.resize(img, (37, 50), filter="bicubic",
                                                      backend="native"))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("filt,H", [("bicubic", 2**62), ("lanczos", 2**61), ("bilinear", 2**62),
                                    ("bilinear", 2**62 - 1)])
def test_resize_tap_count_beyond_int64_raises(backend, filt, H):
    # A stride-0 view of 2^61-2^62 rows costs one byte; the antialiased kernel of a 2^62:1
    # downscale has ~1e19 taps, whose integer count overflowed (UB): a silent [0] or a raw
    # "cannot create std::vector larger than max_size()".
    x = np.broadcast_to(np.full((1, 1, 1), 200, np.uint8), (H, 1, 1))
    with pytest.raises(ShapeError, match=rf"^\[resize\] resizing {H} rows to 1 with antialiasing "
                                         r"needs "):
        ops.resize(x, (1, 1), filter=filt, backend=backend)
    # float32 (a quarter of the rows, to stay within NumPy's byte count) and another output size
    xf = np.broadcast_to(np.full((1, 1, 1), 0.5, np.float32), (H // 4, 1, 1))
    with pytest.raises(ShapeError, match=rf"^\[resize\] resizing {H // 4} rows to 3 with "):
        ops.resize(xf, (3, 2), filter=filt, backend=backend)


# ----------------------------------------------------------------------------------------------
# the private native bindings


def _native():
    from mmcore import _backend
    return _backend.native_module()


def test_native_preprocess_image_without_geoms_raises():
    C = _native()
    img = np.zeros((4, 4, 3), np.uint8)
    out = np.empty((1, 3, 2, 2), np.float32)
    m = np.zeros(3, np.float32)
    s = np.ones(3, np.float32)
    with pytest.raises(ValueError, match=r"^\[preprocess_image\] geoms is required"):
        C.preprocess_image([img], out, None, m, s, crop_h=2, crop_w=2, filter="bilinear",
                           antialias=True, scale=1.0, patch=0, num_threads=1)
    geoms = np.array([[4, 4, 2**63 - 1, 0]], np.int64)  # crop origin near int64's end
    with pytest.raises(ValueError, match=r"^\[preprocess_image\] geoms values"):
        C.preprocess_image([img], out, geoms, m, s, crop_h=2, crop_w=2, filter="bilinear",
                           antialias=True, scale=1.0, patch=0, num_threads=1)


def test_native_bindings_refuse_overflowing_sizes():
    C = _native()
    x = np.zeros((1, 100), np.float32)
    out = np.empty((1, 3, 2), np.float32)
    win = np.ones(4, np.float32)
    kw = dict(frame_length=4, frame_offset=0, pad_left=0, pad_mode="constant", n_frames=2,
              dither=0.0, seed=0, remove_dc=False, preemph=0.0, kind="power", power=2.0,
              log_mode="none", log_floor=1e-10, whisper_norm=False, num_threads=1)
    with pytest.raises(ValueError, match=r"^\[spectral\] .*too large"):
        C.spectral(x, out, win, None, None, None, None, n_fft=4, hop=2**62 + 1, **kw)
    with pytest.raises(ValueError, match=r"^\[spectral\] the frame"):
        C.spectral(x, out, win, None, None, None, None, n_fft=4, hop=1,
                   **{**kw, "frame_offset": 2**63 - 2})
    # Python ints beyond int64 are refused by the binding itself (a TypeError, no crash).
    with pytest.raises(TypeError):
        C.spectral(x, out, win, None, None, None, None, n_fft=4, hop=2**63, **kw)
    # products of sizes that overflow int64 are refused, not wrapped around
    with pytest.raises(ValueError, match=r"^\[patchify\] sizes overflow"):
        C.patchify(np.zeros((1, 0, 1, 0, 0), np.float32), np.empty((1, 0, 1), np.float32),
                   patch=2**32, temporal_patch=2**32, num_threads=1)


def test_native_spectral_refuses_huge_n_fft():
    # The FFT plan lengths (a power of two above 2 n_fft for odd sizes) overflow or loop for
    # n_fft near 2^62; the binding refuses n_fft beyond 2^40 up front.
    C = _native()
    x = np.zeros((1, 8), np.float32)
    out = np.empty((1, 5, 1), np.float32)
    win = np.ones(8, np.float32)
    kw = dict(frame_length=8, frame_offset=0, pad_left=0, pad_mode="constant", dither=0.0, seed=0,
              remove_dc=False, preemph=0.0, kind="power", power=2.0, log_mode="none",
              log_floor=1e-10, whisper_norm=False, num_threads=1)
    for n_fft in (2**40 + 1, 2**61 + 1, 2**62 - 1, 2**62):
        with pytest.raises(ValueError, match=r"^\[spectral\] n_fft must be <= 2\^40"):
            C.spectral(x, out, win, None, None, None, None, n_fft=n_fft, hop=1, n_frames=1, **kw)


def test_native_spectral_n_fft_beyond_the_scratch_budget_raises():
    C = _native()
    n_fft = 2**26  # the per-thread FFT scratch (>= 64 x the spectrum) would exceed 2 GiB
    x = np.zeros((1, 8), np.float32)
    out = np.empty((1, n_fft // 2 + 1, 1), np.float32)  # 128 MiB, never touched
    win = np.ones(8, np.float32)
    kw = dict(frame_length=8, frame_offset=0, pad_left=0, pad_mode="constant", dither=0.0, seed=0,
              remove_dc=False, preemph=0.0, kind="power", power=2.0, log_mode="none",
              log_floor=1e-10, whisper_norm=False, num_threads=1)
    with pytest.raises(ShapeError, match=r"^\[spectral\] n_fft = 67108864 needs .* of FFT scratch"):
        C.spectral(x, out, win, None, None, None, None, n_fft=n_fft, hop=1, n_frames=1, **kw)
    # no frames: nothing to compute, nothing refused
    C.spectral(x, out[:, :, :0], win, None, None, None, None, n_fft=n_fft, hop=1, n_frames=0, **kw)


# ----------------------------------------------------------------------------------------------
# sums of more than 2^24 terms


@pytest.fixture(scope="module")
def long_ones():
    return np.ones((1, 2**25, 1), np.float32)


@pytest.fixture(scope="module")
def long_random():
    rng = np.random.default_rng(7)
    x = rng.random((1, 2**25 + 7, 1), dtype=np.float32)
    x += np.float32(0.5)
    return x


@pytest.mark.parametrize("backend", BACKENDS)
def test_masked_mean_of_2_25_ones_is_one(backend, long_ones):
    out = ops.masked_mean(long_ones, backend=backend)
    assert out.tolist() == [[1.0]]
    mask = np.ones(long_ones.shape[:2], bool)
    mask[0, 1::2] = False
    assert ops.masked_mean(long_ones, mask, backend=backend).tolist() == [[1.0]]


@pytest.mark.parametrize("backend", BACKENDS)
def test_masked_mean_long_random_within_ulps(backend, long_random):
    ref = long_random.astype(np.float64).mean(axis=1)
    got = ops.masked_mean(long_random, backend=backend)
    assert _ulps(got, ref).max() <= 2
    mixed = long_random - np.float32(1.0)  # mean near 0: measured against the mean of |x|
    ref = mixed.astype(np.float64).mean(axis=1)
    got = ops.masked_mean(mixed, backend=backend)
    scale = np.abs(mixed).astype(np.float64).mean()
    assert abs(float(got[0, 0]) - float(ref[0, 0])) <= 4 * np.spacing(np.float32(scale))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("strategy", ["mean", "sum", "weighted"])
def test_fuse_over_2_25_modalities(backend, strategy, long_ones, long_random):
    kw = {}
    if strategy == "weighted":
        kw["weights"] = np.ones(long_ones.shape[1], np.float32)
    out = ops.fuse(long_ones, strategy=strategy, backend=backend, **kw)
    want = float(2**25) if strategy == "sum" else 1.0
    assert out.tolist() == [[want]]
    if strategy != "weighted":
        ref = long_random.astype(np.float64).sum(axis=1)
        if strategy == "mean":
            ref = ref / long_random.shape[1]
        got = ops.fuse(long_random, strategy=strategy, backend=backend)
        assert _ulps(got, ref).max() <= 2


@pytest.mark.parametrize("backend", BACKENDS)
def test_fuse_attention_long_dot_products(backend):
    # The scores are dot products over D = 2^24 values (float64 totals of float32 partials).
    D = 2**24
    rng = np.random.default_rng(3)
    emb = rng.random((1, 2, D), dtype=np.float32)
    emb[0, 1] *= np.float32(1.5)
    q = np.full(D, 2.0**-12, np.float32)
    out, w = ops.fuse(emb, strategy="attention", query=q, return_weights=True, backend=backend)
    s = (emb[0].astype(np.float64) @ q.astype(np.float64)) / np.sqrt(D)
    ref_w = np.exp(s - s.max()) / np.exp(s - s.max()).sum()
    np.testing.assert_allclose(w[0], ref_w, rtol=1e-5)
    ref = ref_w @ emb[0, :, :1024].astype(np.float64)
    np.testing.assert_allclose(out[0, :1024], ref, rtol=1e-5)


# A valid call of every native binding; the fuzz below replaces one argument at a time.
_BINDING_CALLS = r'''
import numpy as np
from mmcore import _backend
C = _backend.native_module()
f32 = lambda *s: np.zeros(s, np.float32)
img = np.zeros((4, 4, 3), np.uint8)
calls = {
    "attention": (C.attention, [f32(1, 1, 2, 4), f32(1, 1, 3, 4), f32(1, 1, 3, 4), f32(1, 1, 2, 4),
                                None, None, None, None, None],
                  dict(scale=0.5, dropout=False, seed=0, threshold=0, dropout_scale=1.0,
                       num_threads=1)),
    "spectral": (C.spectral, [f32(1, 64), f32(1, 9, 5), np.ones(16, np.float32), None, None, None,
                              None],
                 dict(n_fft=16, hop=8, frame_length=16, frame_offset=0, pad_left=8,
                  pad_mode="reflect", n_frames=5, dither=0.0, seed=0, remove_dc=False, preemph=0.0,
                  kind="power", power=2.0, log_mode="none", log_floor=1e-10, whisper_norm=False,
                  num_threads=1)),
    "masked_mean": (C.masked_mean, [f32(2, 3, 4), np.ones((2, 3), bool), f32(2, 4)],
                    dict(num_threads=1)),
    "masked_max": (C.masked_max, [f32(2, 3, 4), np.ones((2, 3), bool), f32(2, 4)],
                   dict(num_threads=1)),
    "linear": (C.linear, [f32(2, 4), f32(3, 4), f32(3), f32(2, 3)], dict(num_threads=1)),
    "layer_norm": (C.layer_norm, [f32(2, 4), np.ones(4, np.float32), f32(4), f32(2, 4)],
                   dict(eps=1e-5, num_threads=1)),
    "fuse": (C.fuse, [f32(2, 3, 4), np.ones((2, 3), bool), np.ones(3, np.float32), None,
                      f32(2, 4), f32(2, 3)], dict(strategy="weighted", num_threads=1)),
    "resize": (C.resize, [[img], [np.zeros((2, 2, 3), np.uint8)]],
               dict(filter="bilinear", antialias=True, num_threads=1)),
    "normalize": (C.normalize, [img[None], f32(1, 3, 4, 4), np.zeros(3, np.float32),
                                np.ones(3, np.float32)],
                  dict(scale=1.0, layout="chw", num_threads=1)),
    "patchify": (C.patchify, [f32(1, 1, 1, 4, 4), f32(1, 4, 4)],
                 dict(patch=2, temporal_patch=1, num_threads=1)),
    "preprocess_image": (C.preprocess_image, [[img], f32(1, 3, 2, 2),
                                              np.array([[4, 4, 1, 1]], np.int64),
                                              np.zeros(3, np.float32), np.ones(3, np.float32)],
                         dict(crop_h=2, crop_w=2, filter="bilinear", antialias=True, scale=1.0,
                              patch=0, num_threads=1)),
}
'''


def test_native_bindings_survive_none_in_every_argument():
    # Each binding gets None (and a 0-d array) in place of each of its array arguments, in a
    # child process: a null dereference would kill the child, not the test run.
    import subprocess
    import sys
    script = _BINDING_CALLS + r'''
import sys
bad = []
for name, (fn, args, kw) in calls.items():
    fn(*args, **kw)  # the valid call itself works
    for i in range(len(args)):
        for repl in (None, np.float32(1.0), np.zeros(0, np.float32)):
            a = list(args)
            a[i] = repl
            try:
                fn(*a, **kw)
            except (ValueError, TypeError, RuntimeError):
                pass
print("survived")
'''
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                       cwd=_OUTSIDE_SOURCE)
    assert r.returncode == 0 and "survived" in r.stdout, (r.returncode, r.stdout, r.stderr[-2000:])


# ----------------------------------------------------------------------------------------------
# FFT sizes with a large prime factor (Bluestein instead of an O(n p) direct DFT stage)


@pytest.fixture(params=["baseline", "avx2", "avx512"])
def isa(request):
    C = _native()
    before = C.isa_level()
    if request.param not in C.compiled_isas() or not C.set_isa_cap(request.param):
        C.set_isa_cap(before)
        pytest.skip(f"{request.param} not available here")
    yield request.param
    C.set_isa_cap(before)


@pytest.mark.parametrize("n_fft", [131, 254, 4099, 65521, 2 * 65521])
def test_stft_large_prime_n_fft_is_fast_and_accurate(isa, n_fft):
    # A prime n_fft of 65521 took minutes per call (a direct DFT stage of n * p work); Bluestein
    # makes it O(n log n).
    rng = np.random.default_rng(n_fft)
    x = rng.standard_normal(n_fft + 160 * 12).astype(np.float32)
    t0 = time.monotonic()
    got = ops.stft(x, n_fft=n_fft, hop_length=160, center=False, backend="native")
    assert time.monotonic() - t0 < 30  # generous: well under a second here
    # float64 reference: frames times the periodic Hann window, NumPy's FFT
    win = 0.5 - 0.5 * np.cos(2 * np.pi * np.arange(n_fft) / n_fft)
    frames = np.stack([x[f * 160:f * 160 + n_fft].astype(np.float64) * win
                       for f in range(got.shape[-1])], axis=1)
    ref = np.fft.rfft(frames, axis=0)
    assert got.shape == ref.shape == (n_fft // 2 + 1, 13)
    scale = np.abs(ref).max()
    assert np.abs(got - ref).max() <= 2e-6 * scale * np.log2(n_fft)
