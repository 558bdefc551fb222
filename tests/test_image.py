"""Tests of the image ops (resize, normalize, patchify, preprocess_image): native and numba
against the float64 references and each other, and against Pillow, scikit-image's sample
photographs and Hugging Face's image processors where those are installed."""

from __future__ import annotations

import doctest

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import mmcore
from _helpers import HOST_BACKENDS, PROPERTY_SETTINGS, examples
from _helpers import need_backend as _need_backend
from mmcore.errors import ArgumentError, BackendError, ShapeError
from mmcore.ops import normalize, patchify, preprocess_image, resize
from reference import (
    IMAGE_PRESETS_REF,
    center_crop_ref,
    nearest_indices_ref,
    normalize_ref,
    patchify_ref,
    pillow13_vertical_first,
    preprocess_image_ref,
    resize_coeffs_ref,
    resize_ref,
    shortest_edge_size_ref,
)

FILTERS = ["nearest", "bilinear", "bicubic", "lanczos"]

# float32 resize: error relative to the largest magnitude of the input
REL_F32 = 1e-4


# ----------------------------------------------------------------------------------------------
# test images


def synthetic_photo(h, w, seed=0, channels=3):
    """A photograph-like uint8 image: smooth lighting gradients, hard-edged shapes (discs,
    rectangles), oriented stripes, a fine checkerboard patch and sensor noise."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w].astype(np.float64)
    yn, xn = y / max(h - 1, 1), x / max(w - 1, 1)
    base = np.empty((h, w, 3))
    for c in range(3):
        a, b, cc = rng.uniform(-1, 1, 3)
        base[..., c] = (0.45 + 0.25 * (a * xn + b * yn)
                        + 0.1 * np.sin(2 * np.pi * (cc * xn + a * yn) * 1.5))
    for _ in range(8):
        col = rng.uniform(0, 1, 3)
        if rng.random() < 0.5:
            cy, cx = rng.uniform(0, h), rng.uniform(0, w)
            r = rng.uniform(0.03, 0.2) * min(h, w)
            m = (y - cy) ** 2 + (x - cx) ** 2 < r * r
        else:
            y0, x0 = rng.uniform(0, h), rng.uniform(0, w)
            m = ((y >= y0) & (y < y0 + rng.uniform(0.05, 0.3) * h)
                 & (x >= x0) & (x < x0 + rng.uniform(0.05, 0.3) * w))
        base[m] = 0.3 * base[m] + 0.7 * col
    f = rng.uniform(0.05, 0.3)
    stripes = 0.08 * np.sin(2 * np.pi * f * (x * np.cos(0.7) + y * np.sin(0.7)))
    base += (stripes * (xn > 0.5))[..., None]
    checker = ((y.astype(int) // 2 + x.astype(int) // 2) % 2 - 0.5) * 0.15
    base += (checker * ((yn > 0.6) & (xn < 0.4)))[..., None]
    base += rng.normal(0, 0.02, base.shape)
    img = np.clip(np.round(base * 255), 0, 255).astype(np.uint8)
    if channels == 1:
        return np.round(img @ np.array([0.299, 0.587, 0.114])).astype(np.uint8)[..., None]
    if channels == 4:
        alpha = np.clip(np.round(255 * (0.6 + 0.4 * np.sin(xn * 3 + yn * 2))), 0, 255)
        return np.concatenate([img, alpha.astype(np.uint8)[..., None]], axis=-1)
    return img


_PHOTOS = {}


def photo(h=480, w=640, seed=0, channels=3):
    key = (h, w, seed, channels)
    if key not in _PHOTOS:
        img = synthetic_photo(h, w, seed, channels)
        img.setflags(write=False)
        _PHOTOS[key] = img
    return _PHOTOS[key]


def skimage_photos():
    """scikit-image's bundled sample photographs (RGB and grayscale), if it is installed."""
    data = pytest.importorskip("skimage.data")
    out = {}
    for name in ("astronaut", "coffee", "chelsea", "camera"):
        try:
            img = getattr(data, name)()
        except Exception:   # a sample missing from this install
            continue
        out[name] = np.ascontiguousarray(img, dtype=np.uint8)
    if not out:
        pytest.skip("no scikit-image sample images available")
    return out


# ----------------------------------------------------------------------------------------------
# Pillow helpers


def _pil():
    return pytest.importorskip("PIL.Image")


def pil_resize(img, size, filt):
    """Pillow's Image.resize of (H, W[, C]) uint8 or (H, W[, 1]) float32 to (h, w): mode "L",
    "RGB", "RGBA" (filtered premultiplied) or "F"."""
    Image = _pil()
    a = np.asarray(img)
    im = Image.fromarray(np.ascontiguousarray(a[..., 0] if a.ndim == 3 and a.shape[2] == 1
                                              else a))
    out = np.asarray(im.resize((int(size[1]), int(size[0])), _pil_filter(filt),
                               reducing_gap=None))
    return out.reshape(out.shape[:2] + a.shape[2:]) if a.ndim == 3 else out


def _pil_filter(f):
    Image = _pil()
    return {"nearest": Image.Resampling.NEAREST, "bilinear": Image.Resampling.BILINEAR,
            "bicubic": Image.Resampling.BICUBIC, "lanczos": Image.Resampling.LANCZOS}[f]


def pillow_vertical_first(H, W, oh, ow):
    """True where the installed Pillow's pass order differs from mmcore's. mmcore follows
    Pillow >= 13, which filters vertically first when the height shrinks by more than twice as
    many pixels as the width; older Pillow always filters horizontally first, so there results
    may differ by the rounding of the intermediate."""
    import PIL
    major = int(PIL.__version__.split(".")[0])
    return major < 13 and pillow13_vertical_first(H, W, oh, ow)


def assert_levels(actual, expected, levels, what=""):
    actual = np.asarray(actual)
    expected = np.asarray(expected)
    assert actual.shape == expected.shape, (actual.shape, expected.shape, what)
    assert actual.dtype == expected.dtype, (actual.dtype, expected.dtype, what)
    if actual.size:
        d = np.abs(actual.astype(np.int64) - expected.astype(np.int64))
        assert d.max() <= levels, f"{what}: max difference {d.max()} levels > {levels} " \
                                  f"({int((d > levels).sum())} values)"


def assert_rel_close(actual, expected, scale, rel=REL_F32, what=""):
    actual = np.asarray(actual, np.float64)
    expected = np.asarray(expected, np.float64)
    assert actual.shape == expected.shape, (actual.shape, expected.shape, what)
    if actual.size:
        err = float(np.abs(actual - expected).max())
        assert err <= rel * max(scale, 1e-30), f"{what}: max error {err:.3g} vs scale {scale:.3g}"


# ----------------------------------------------------------------------------------------------
# the references themselves


def test_reference_taps_sum_to_one_and_nearest_ties():
    for n_in, n_out in [(1, 1), (1, 7), (7, 1), (640, 224), (97, 1031), (13, 5)]:
        for f in ("bilinear", "bicubic", "lanczos"):
            xmin, w = resize_coeffs_ref(n_in, n_out, f)
            np.testing.assert_allclose(w.sum(axis=1), 1.0, atol=1e-12)
            assert (xmin >= 0).all() and (xmin < n_in).all()
    # Pillow accumulates the nearest source coordinate: 2 -> 7 picks 0 for output 3
    # ((3 + 0.5) * 2 / 7 is exactly 1.0, the accumulated sum lands just below it)
    assert nearest_indices_ref(2, 7).tolist() == [0, 0, 0, 0, 1, 1, 1]


def test_reference_matches_pillow_exactly():
    _pil()
    rng = np.random.default_rng(7)
    for _ in range(25):
        H, W = (int(v) for v in rng.integers(1, 48, 2))
        oh, ow = (int(v) for v in rng.integers(1, 64, 2))
        if pillow_vertical_first(H, W, oh, ow):
            continue
        C = int(rng.choice([1, 3, 4]))
        img = rng.integers(0, 256, (H, W, C), dtype=np.uint8)
        for f in FILTERS:
            exp = pil_resize(img, (oh, ow), f)
            np.testing.assert_array_equal(resize_ref(img, (oh, ow), f), exp,
                                          err_msg=f"{(H, W, C)} -> {(oh, ow)} {f}")


# ----------------------------------------------------------------------------------------------
# property tests: resize

SIZES = [1, 2, 3, 5, 7, 8, 13, 17, 31, 33, 61, 97]


@st.composite
def resize_cases(draw):
    H = draw(st.sampled_from(SIZES) | st.integers(1, 70))
    W = draw(st.sampled_from(SIZES) | st.integers(1, 70))

    def out_size(n):
        how = draw(st.sampled_from(["up", "down", "any", "same"]))
        k = draw(st.sampled_from([1, 2, 3, 5, 7]))
        if how == "up":
            return n * k + draw(st.integers(0, 2))
        if how == "down":
            return max(1, n // k)
        if how == "same":
            return n
        return draw(st.integers(1, 90))

    oh, ow = out_size(H), out_size(W)
    dtype = draw(st.sampled_from(["uint8", "float32"]))
    C = draw(st.sampled_from([1, 3, 4]))
    filt = draw(st.sampled_from(FILTERS))
    aa = draw(st.booleans())
    layout = draw(st.sampled_from(["contiguous", "flipped", "crop", "rows"]))
    seed = draw(st.integers(0, 2 ** 32 - 1))
    return H, W, C, oh, ow, dtype, filt, aa, layout, seed


def make_case_image(H, W, C, dtype, layout, seed):
    """An (H, W, C) image with the given memory layout (always the same pixel values)."""
    rng = np.random.default_rng(seed)
    if dtype == "uint8":
        img = rng.integers(0, 256, (H, W, C), dtype=np.uint8)
        if rng.random() < 0.5:      # smooth content too, not only noise
            img = photo(H, W, seed % 7, C) if C in (1, 3, 4) else img
    else:
        img = (rng.standard_normal((H, W, C)) * 3).astype(np.float32)
    if layout == "flipped":         # negative column stride: copied by the op
        return np.ascontiguousarray(img[:, ::-1])[:, ::-1]
    if layout == "crop":            # rows further apart than W * C
        big = np.zeros((H + 3, W + 5, C), img.dtype)
        big[2:2 + H, 3:3 + W] = img
        return big[2:2 + H, 3:3 + W]
    if layout == "rows":            # every other row of a taller image
        big = np.zeros((2 * H, W, C), img.dtype)
        big[::2] = img
        return big[::2]
    return np.ascontiguousarray(img)


def check_resize_vs_reference(out, img, size, filt, aa, what):
    ref = resize_ref(np.ascontiguousarray(img), size, filt, aa)
    if img.dtype == np.uint8:
        assert_levels(out, ref, 1, what)
    else:
        assert out.dtype == np.float32
        assert_rel_close(out, ref, float(np.abs(img).max()), what=what)


@pytest.mark.parametrize("name", HOST_BACKENDS)
@settings(max_examples=examples(60), **PROPERTY_SETTINGS)
@given(case=resize_cases())
def test_property_resize_vs_reference(name, case):
    _need_backend(name)
    H, W, C, oh, ow, dtype, filt, aa, layout, seed = case
    img = make_case_image(H, W, C, dtype, layout, seed)
    before = img.copy()
    out = resize(img, (oh, ow), filter=filt, antialias=aa, backend=name)
    assert out.shape == (oh, ow, C) and out.dtype == img.dtype
    check_resize_vs_reference(out, img, (oh, ow), filt, aa, f"{name} {case}")
    np.testing.assert_array_equal(img, before)


@settings(max_examples=examples(60), **PROPERTY_SETTINGS)
@given(case=resize_cases())
def test_property_resize_native_vs_numba(case):
    _need_backend("numba")
    H, W, C, oh, ow, dtype, filt, aa, layout, seed = case
    img = make_case_image(H, W, C, dtype, layout, seed)
    a = resize(img, (oh, ow), filter=filt, antialias=aa, backend="native")
    b = resize(img, (oh, ow), filter=filt, antialias=aa, backend="numba")
    if img.dtype == np.uint8:
        assert_levels(a, b, 1, str(case))
    else:
        assert_rel_close(a, b, float(np.abs(img).max()), what=str(case))


def test_resize_uint8_exact_on_random_sizes(backend):
    """uint8 results are exact (not merely within a level) on a spread of shapes."""
    rng = np.random.default_rng(3)
    for _ in range(30):
        H, W = (int(v) for v in rng.integers(1, 50, 2))
        oh, ow = (int(v) for v in rng.integers(1, 70, 2))
        img = rng.integers(0, 256, (H, W, int(rng.choice([1, 3, 4]))), dtype=np.uint8)
        for f in FILTERS:
            out = resize(img, (oh, ow), filter=f, backend=backend)
            np.testing.assert_array_equal(out, resize_ref(img, (oh, ow), f),
                                          err_msg=f"{img.shape} -> {(oh, ow)} {f}")


# ----------------------------------------------------------------------------------------------
# resize against Pillow on photographs

PHOTO_SIZES = [(168, 224), (61, 97), (777, 1031)]


@pytest.mark.parametrize("filt", FILTERS)
@pytest.mark.parametrize("size", PHOTO_SIZES)
def test_resize_matches_pillow_on_photo(filt, size):
    img = photo()
    expected = pil_resize(img, size, filt)
    out = resize(img, size, filter=filt)
    assert_levels(out, expected, 1, f"native {size} {filt}")
    # horizontal-first shapes are Pillow's own arithmetic: exact
    np.testing.assert_array_equal(out, expected)


@pytest.mark.parametrize("filt", FILTERS)
def test_resize_numba_matches_pillow_on_photo(filt):
    _need_backend("numba")
    img = photo()
    for size in ((61, 97), (777, 1031)):
        assert_levels(resize(img, size, filter=filt, backend="numba"), pil_resize(img, size, filt),
                      1, f"numba {size} {filt}")


@pytest.mark.parametrize("channels", [1, 4])
@pytest.mark.parametrize("filt", FILTERS)
def test_resize_matches_pillow_gray_and_rgba(channels, filt):
    img = photo(240, 320, 1, channels)
    for size in ((168, 224), (61, 97), (331, 517)):
        assert_levels(resize(img, size, filter=filt), pil_resize(img, size, filt), 1,
                      f"C={channels} {size} {filt}")


@pytest.mark.parametrize("filt", FILTERS)
def test_resize_float32_matches_pillow_mode_f(filt):
    img = photo(120, 160, 2, 1)[..., 0].astype(np.float32) / 255.0
    for size in ((61, 97), (250, 333), (120, 37)):
        exp = pil_resize(img, size, filt)
        out = resize(img, size, filter=filt)
        assert out.shape == size and out.dtype == np.float32
        assert_rel_close(out, exp, 1.0, what=f"{size} {filt}")


def test_resize_matches_pillow_odd_sizes():
    """Odd and prime sizes, crops of photographs, up and down, every filter: exact (where
    Pillow also filters horizontally first)."""
    rng = np.random.default_rng(11)
    base = photo(300, 400, 5)
    for _ in range(16):
        H, W = (int(v) for v in rng.integers(5, 300, 2))
        y0, x0 = int(rng.integers(0, 300 - H + 1)), int(rng.integers(0, 400 - W + 1))
        img = base[y0:y0 + H, x0:x0 + W]
        oh = int(rng.choice([max(1, H // 3), max(1, H // 7) + 2, 2 * H + 1,
                             int(rng.integers(1, 400))]))
        ow = int(rng.choice([max(1, W // 5), 3 * W - 1, int(rng.integers(1, 400))]))
        if pillow_vertical_first(H, W, oh, ow):   # see test_resize_pillow13_vertical_first_shapes
            continue
        for f in FILTERS:
            np.testing.assert_array_equal(resize(img, (oh, ow), filter=f),
                                          pil_resize(img, (oh, ow), f),
                                          err_msg=f"{(H, W)} -> {(oh, ow)} {f}")


# Shapes where Pillow >= 13 filters vertically first: the height shrinks by more than twice as
# many pixels as the width (tall reductions, and any vertical reduction with a horizontal
# enlargement).
VERTICAL_FIRST_SHAPES = [((900, 300), (672, 224)), ((900, 300), (100, 290)),
                         ((227, 284), (34, 851)), ((480, 640), (200, 1000))]


def test_reference_reproduces_pillow13_pass_order():
    """The rule above, checked on photographs: with the passes in Pillow's order the
    reference equals Pillow exactly."""
    import PIL
    if int(PIL.__version__.split(".")[0]) < 13:
        pytest.skip("Pillow < 13 always filters horizontally first")
    for (H, W), size in VERTICAL_FIRST_SHAPES:
        assert pillow13_vertical_first(H, W, *size)
        img = photo(H, W, 4)
        for f in FILTERS:
            np.testing.assert_array_equal(resize_ref(img, size, f, vertical_first=True),
                                          pil_resize(img, size, f), err_msg=f"{size} {f}")


@pytest.mark.parametrize("filt", FILTERS)
def test_resize_pillow13_vertical_first_shapes(filt):
    import PIL
    if int(PIL.__version__.split(".")[0]) < 13:
        pytest.skip("Pillow < 13 always filters horizontally first")
    for (H, W), size in VERTICAL_FIRST_SHAPES:
        img = photo(H, W, 4)
        np.testing.assert_array_equal(resize(img, size, filter=filt), pil_resize(img, size, filt),
                                      err_msg=f"{(H, W)} -> {size} {filt}")


@pytest.mark.parametrize("filt", FILTERS)
def test_resize_matches_pillow_on_skimage_samples(filt):
    for name, img in skimage_photos().items():
        H, W = img.shape[:2]
        for size in ((168, 224), (61, 97), (777, 1031), (H // 3 + 1, W // 2 - 1)):
            if pillow_vertical_first(H, W, *size):
                continue
            np.testing.assert_array_equal(resize(img, size, filter=filt),
                                          pil_resize(img, size, filt), err_msg=f"{name} {size}")


# ----------------------------------------------------------------------------------------------
# resize: batches, layouts, dtypes


def test_resize_batch_and_list_equal_per_image(backend):
    rng = np.random.default_rng(5)
    batch = rng.integers(0, 256, (3, 37, 53, 3), dtype=np.uint8)
    out = resize(batch, (19, 80), filter="lanczos", backend=backend)
    assert out.shape == (3, 19, 80, 3)
    for i in range(3):
        np.testing.assert_array_equal(out[i], resize(batch[i], (19, 80), filter="lanczos",
                                                     backend=backend))
    imgs = [photo(40, 30, 1), photo(7, 90, 2), photo(1, 1, 3), photo(64, 64, 4)]
    outs = resize(imgs, (33, 21), backend=backend)
    assert isinstance(outs, list) and len(outs) == 4
    for img, o in zip(imgs, outs):
        np.testing.assert_array_equal(o, resize(img, (33, 21), backend=backend))
    fl = [rng.standard_normal((9, 4, 2)).astype(np.float32),
          rng.standard_normal((3, 11, 2)).astype(np.float32)]
    for img, o in zip(fl, resize(fl, (5, 6), filter="bilinear", backend=backend)):
        np.testing.assert_array_equal(o, resize(img, (5, 6), filter="bilinear", backend=backend))


def test_resize_noncontiguous_inputs(backend):
    img = photo(60, 80, 6)
    cases = {
        "flip_columns": img[:, ::-1],
        "flip_rows": img[::-1],
        "crop": img[5:50, 7:71],
        "row_step": img[::3],
        "col_step": img[:, ::2],
        "from_chw": np.ascontiguousarray(img.transpose(2, 0, 1)).transpose(1, 2, 0),
        "bgr": img[..., ::-1],
    }
    for what, view in cases.items():
        expected = resize(np.ascontiguousarray(view), (23, 41), backend=backend)
        np.testing.assert_array_equal(resize(view, (23, 41), backend=backend), expected,
                                      err_msg=what)
    batch = np.stack([img, img[::-1]])[:, ::2, 1:]
    out = resize(batch, (11, 12), backend=backend)
    np.testing.assert_array_equal(out, resize(np.ascontiguousarray(batch), (11, 12),
                                              backend=backend))


def test_resize_gray_dtypes_and_empty(backend):
    gray = photo(30, 40, 1, 1)[..., 0]
    out = resize(gray, (15, 20), backend=backend)
    assert out.shape == (15, 20) and out.dtype == np.uint8
    np.testing.assert_array_equal(out, resize(gray[..., None], (15, 20), backend=backend)[..., 0])
    for dt in (np.float16, np.float64):
        x = gray.astype(dt)
        o = resize(x, (15, 20), filter="bilinear", backend=backend)
        assert o.dtype == np.float32
        np.testing.assert_allclose(o, resize(gray.astype(np.float32), (15, 20),
                                             filter="bilinear", backend=backend), rtol=1e-6)
    empty = resize(np.zeros((0, 5, 6, 3), np.uint8), (2, 3), backend=backend)
    assert empty.shape == (0, 2, 3, 3) and empty.dtype == np.uint8
    assert resize([], (2, 3), backend=backend) == []
    same = photo(20, 30, 2)
    np.testing.assert_array_equal(resize(same, (20, 30), backend=backend), same)
    np.testing.assert_array_equal(resize(same, (20, 30), filter="nearest", backend=backend),
                                  same)
    f = np.random.default_rng(0).standard_normal((6, 7, 9)).astype(np.float32)  # 9 channels
    check_resize_vs_reference(resize(f, (4, 13), backend=backend), f, (4, 13), "bicubic", True,
                              "float32 with 9 channels")


def test_resize_constant_image_stays_constant(backend):
    for v in (0, 1, 128, 255):
        img = np.full((31, 17, 3), v, np.uint8)
        for f in FILTERS:
            for size in ((7, 3), (64, 40), (31, 99)):
                out = resize(img, size, filter=f, backend=backend)
                assert (out == v).all(), (v, f, size)


def test_thread_count_does_not_change_results():
    img = photo()
    batch = [photo(100, 90, 1), photo(51, 300, 2), img]
    before = mmcore.get_num_threads()
    try:
        results = []
        for n in (1, 2, 3):
            mmcore.set_num_threads(n)
            results.append((resize(img, (123, 77)), resize(batch, (50, 61), filter="lanczos"),
                            preprocess_image(batch), normalize(img, mean=0.5, std=0.25)))
    finally:
        mmcore.set_num_threads(before)
    for r in results[1:]:
        np.testing.assert_array_equal(r[0], results[0][0])
        for a, b in zip(r[1], results[0][1]):
            np.testing.assert_array_equal(a, b)
        np.testing.assert_array_equal(r[2], results[0][2])
        np.testing.assert_array_equal(r[3], results[0][3])


# ----------------------------------------------------------------------------------------------
# normalize


@st.composite
def normalize_cases(draw):
    batch = draw(st.sampled_from([(), (1,), (3,)]))
    H = draw(st.sampled_from([1, 2, 7, 31, 33]))
    W = draw(st.sampled_from([1, 3, 16, 17, 64]))
    C = draw(st.sampled_from([1, 3, 4, 5]))
    dtype = draw(st.sampled_from(["uint8", "float32"]))
    layout = draw(st.sampled_from(["chw", "hwc"]))
    scale = draw(st.sampled_from([1.0 / 255.0, 1.0, 0.5, 2.0 / 255.0]))
    seed = draw(st.integers(0, 2 ** 32 - 1))
    return batch, H, W, C, dtype, layout, scale, seed


@pytest.mark.parametrize("name", HOST_BACKENDS)
@settings(max_examples=examples(40), **PROPERTY_SETTINGS)
@given(case=normalize_cases())
def test_property_normalize_exact(name, case):
    _need_backend(name)
    batch, H, W, C, dtype, layout, scale, seed = case
    rng = np.random.default_rng(seed)
    shape = batch + (H, W, C)
    x = rng.integers(0, 256, shape, dtype=np.uint8) if dtype == "uint8" \
        else rng.standard_normal(shape).astype(np.float32)
    mean = rng.uniform(0, 1, C)
    std = rng.uniform(0.1, 1, C)
    out = normalize(x, mean=mean, std=std, scale=scale, layout=layout, backend=name)
    np.testing.assert_array_equal(out, normalize_ref(x, mean, std, scale, layout))


def test_normalize_layouts_and_scalars(backend):
    img = photo(20, 30, 3)
    chw = normalize(img, mean=0.5, std=0.25, backend=backend)
    hwc = normalize(img, mean=(0.5,) * 3, std=[0.25] * 3, layout="hwc", backend=backend)
    assert chw.shape == (3, 20, 30) and hwc.shape == (20, 30, 3) and chw.dtype == np.float32
    np.testing.assert_array_equal(chw, hwc.transpose(2, 0, 1))
    batch = np.stack([img, img[::-1]])
    out = normalize(batch, mean=0.5, std=0.25, backend=backend)
    assert out.shape == (2, 3, 20, 30)
    np.testing.assert_array_equal(out[0], chw)
    np.testing.assert_array_equal(out[1], normalize(img[::-1], mean=0.5, std=0.25,
                                                    backend=backend))
    f64 = img.astype(np.float64)
    np.testing.assert_array_equal(normalize(f64, mean=0.5, std=0.25, backend=backend), chw)
    assert normalize(np.zeros((0, 4, 5, 3), np.uint8), mean=0, std=1,
                     backend=backend).shape == (0, 3, 4, 5)


# ----------------------------------------------------------------------------------------------
# patchify


@st.composite
def patchify_cases(draw):
    lead = draw(st.sampled_from([(), (1,), (2,), (2, 3)]))
    tp = draw(st.sampled_from([1, 1, 2, 3]))
    T = tp * draw(st.integers(1, 3))
    C = draw(st.sampled_from([1, 3, 4]))
    p = draw(st.sampled_from([1, 2, 3, 7, 14, 16]))
    gh, gw = draw(st.integers(1, 4)), draw(st.integers(1, 4))
    seed = draw(st.integers(0, 2 ** 32 - 1))
    return lead, tp, T, C, p, gh * p, gw * p, seed


@pytest.mark.parametrize("name", HOST_BACKENDS)
@settings(max_examples=examples(40), **PROPERTY_SETTINGS)
@given(case=patchify_cases())
def test_property_patchify_vs_reference(name, case):
    _need_backend(name)
    lead, tp, T, C, p, H, W, seed = case
    rng = np.random.default_rng(seed)
    shape = lead + ((T,) if tp > 1 else ()) + (C, H, W)
    x = rng.standard_normal(shape).astype(np.float32)
    out = patchify(x, p, temporal_patch=tp, backend=name)
    np.testing.assert_array_equal(out, patchify_ref(x, p, tp))


def test_patchify_is_a_conv2d_patch_embedding(backend):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 3, 28, 42)).astype(np.float32)
    w = rng.standard_normal((8, 3, 14, 14)).astype(np.float32)          # Conv2d(3, 8, 14, 14)
    emb = patchify(x, 14, backend=backend) @ w.reshape(8, -1).T         # (2, 6, 8)
    conv = np.einsum("bchpwq,ocpq->bhwo", x.reshape(2, 3, 2, 14, 3, 14), w)
    np.testing.assert_allclose(emb, conv.reshape(2, 6, 8), rtol=1e-4, atol=1e-4)
    # temporal patches: a Conv3d with kernel (2, 14, 14) over (T, C, H, W) clips
    v = rng.standard_normal((4, 3, 14, 28)).astype(np.float32)
    w3 = rng.standard_normal((5, 3, 2, 14, 14)).astype(np.float32)
    emb3 = patchify(v, 14, temporal_patch=2, backend=backend) @ w3.reshape(5, -1).T
    conv3 = np.einsum("gtchpwq,octpq->ghwo", v.reshape(2, 2, 3, 1, 14, 2, 14), w3)
    np.testing.assert_allclose(emb3, conv3.reshape(4, 5), rtol=1e-4, atol=1e-4)


def test_patchify_layouts_and_dtypes(backend):
    x = np.arange(2 * 3 * 8 * 12, dtype=np.float64).reshape(2, 3, 8, 12)
    ref = patchify_ref(x, 4)
    np.testing.assert_array_equal(patchify(x, 4, backend=backend), ref)
    view = np.ascontiguousarray(x[:, :, :, ::-1])[:, :, :, ::-1]
    np.testing.assert_array_equal(patchify(view, 4, backend=backend), ref)
    hwc = np.ascontiguousarray(x.transpose(0, 2, 3, 1)).transpose(0, 3, 1, 2)
    np.testing.assert_array_equal(patchify(hwc, 4, backend=backend), ref)
    assert patchify(np.zeros((0, 3, 8, 8), np.float32), 4, backend=backend).shape == (0, 4, 48)


# ----------------------------------------------------------------------------------------------
# preprocess_image


def pillow_pipeline(img, preset, size=None):
    """The preset done with Pillow + NumPy: PIL resize, HF-style center crop (zero padding),
    float64 rescale and normalize, CHW."""
    cfg = dict(IMAGE_PRESETS_REF[preset])
    H, W = img.shape[:2]
    if cfg["mode"] == "shortest_edge":
        rh, rw = shortest_edge_size_ref(H, W, cfg["size"])
    else:
        rh, rw = cfg["size"], cfg["size"]
    r = pil_resize(img, (rh, rw), cfg["filter"])
    c = center_crop_ref(r, cfg["crop"], cfg["crop"]).astype(np.float64)
    y = (c / 255.0 - np.array(cfg["mean"])) / np.array(cfg["std"])
    return y.transpose(2, 0, 1)


def assert_within_levels_normalized(out, expected, std, levels, what=""):
    assert out.shape == expected.shape, (out.shape, expected.shape, what)
    tol = levels / 255.0 / np.asarray(std, np.float64).reshape(-1, 1, 1) + 1e-5
    err = np.abs(out.astype(np.float64) - expected)
    assert (err <= tol).all(), f"{what}: max error {(err / tol).max():.3g} x tolerance"


PIPELINE_PHOTOS = [(480, 640, 0), (640, 480, 1), (224, 224, 2), (333, 501, 3), (900, 300, 4),
                   (120, 90, 5), (57, 1000, 6)]


@pytest.mark.parametrize("preset", ["clip", "siglip", "imagenet"])
def test_preprocess_matches_pillow_pipeline(preset, backend):
    std = IMAGE_PRESETS_REF[preset]["std"]
    for h, w, seed in PIPELINE_PHOTOS:
        img = photo(h, w, seed)
        out = preprocess_image(img, preset=preset, backend=backend)
        assert out.shape == (3, 224, 224) and out.dtype == np.float32
        assert_within_levels_normalized(out, pillow_pipeline(img, preset), std, 2,
                                        f"{preset} {backend} {(h, w)}")


@pytest.mark.parametrize("preset", ["clip", "siglip", "imagenet"])
def test_preprocess_matches_pillow_pipeline_on_skimage_samples(preset):
    std = IMAGE_PRESETS_REF[preset]["std"]
    for name, img in skimage_photos().items():
        rgb = img if img.ndim == 3 else np.repeat(img[..., None], 3, axis=2)
        assert_within_levels_normalized(preprocess_image(img, preset=preset),
                                        pillow_pipeline(rgb, preset), std, 2, f"{preset} {name}")


@pytest.mark.parametrize("preset", ["clip", "siglip", "imagenet"])
def test_preprocess_equals_reference(preset, backend):
    for h, w, seed in PIPELINE_PHOTOS[:5]:
        img = photo(h, w, seed)
        ref = preprocess_image_ref(img, **IMAGE_PRESETS_REF[preset])
        np.testing.assert_array_equal(preprocess_image(img, preset=preset, backend=backend), ref,
                                      err_msg=f"{preset} {(h, w)}")


def test_preprocess_matches_transformers_processors():
    transformers = pytest.importorskip("transformers")
    from PIL import Image
    imgs = [photo(h, w, s) for h, w, s in PIPELINE_PHOTOS]
    procs = {
        "clip": transformers.CLIPImageProcessor(),
        "siglip": transformers.SiglipImageProcessor(),
        "imagenet": transformers.ConvNextImageProcessor(
            size={"shortest_edge": 224}, crop_pct=0.875, resample=Image.Resampling.BILINEAR,
            image_mean=list(IMAGE_PRESETS_REF["imagenet"]["mean"]),
            image_std=list(IMAGE_PRESETS_REF["imagenet"]["std"])),
    }
    for preset, proc in procs.items():
        expected = proc(imgs, return_tensors="np")["pixel_values"]
        out = preprocess_image(imgs, preset=preset)
        assert out.shape == expected.shape
        std = IMAGE_PRESETS_REF[preset]["std"]
        for i in range(len(imgs)):
            assert_within_levels_normalized(out[i], expected[i].astype(np.float64), std, 2,
                                            f"transformers {preset} {i}")


@st.composite
def preprocess_cases(draw):
    H = draw(st.sampled_from([1, 2, 5, 13, 31, 64]) | st.integers(1, 90))
    W = draw(st.sampled_from([1, 3, 7, 17, 33, 97]) | st.integers(1, 90))
    size = draw(st.integers(1, 60))
    crop = draw(st.integers(1, 70))          # larger than the resized image: zero padding
    mode = draw(st.sampled_from(["shortest_edge", "squash"]))
    filt = draw(st.sampled_from(FILTERS))
    seed = draw(st.integers(0, 2 ** 32 - 1))
    return H, W, size, crop, mode, filt, seed


@pytest.mark.parametrize("name", HOST_BACKENDS)
@settings(max_examples=examples(30), **PROPERTY_SETTINGS)
@given(case=preprocess_cases())
def test_property_preprocess_vs_reference(name, case):
    _need_backend(name)
    H, W, size, crop, mode, filt, seed = case
    rng = np.random.default_rng(seed)
    img = rng.integers(0, 256, (H, W, 3), dtype=np.uint8)
    mean = rng.uniform(0, 1, 3)
    std = rng.uniform(0.2, 1, 3)
    out = preprocess_image(img, preset=None, size=size, crop_size=crop, resize_mode=mode,
                           filter=filt, mean=mean, std=std, backend=name)
    ref = preprocess_image_ref(img, size=size, crop=crop, mode=mode, filter=filt, mean=mean,
                               std=std)
    assert_within_levels_normalized(out, ref.astype(np.float64), std, 1, f"{name} {case}")


def test_preprocess_batch_and_list_equal_per_image(backend):
    same = np.stack([photo(300, 400, s) for s in range(3)])
    out = preprocess_image(same, backend=backend)
    assert out.shape == (3, 3, 224, 224)
    for i in range(3):
        np.testing.assert_array_equal(out[i], preprocess_image(same[i], backend=backend))
    mixed = [photo(h, w, s) for h, w, s in PIPELINE_PHOTOS]
    out = preprocess_image(mixed, preset="imagenet", patch_size=16, backend=backend)
    assert out.shape == (len(mixed), 196, 768)
    for i, img in enumerate(mixed):
        np.testing.assert_array_equal(out[i], preprocess_image(img, preset="imagenet",
                                                               patch_size=16, backend=backend))


def test_preprocess_patches_equal_patchify(backend):
    img = photo(333, 501, 3)
    full = preprocess_image(img, preset="siglip", size=(224, 336), backend=backend)
    assert full.shape == (3, 224, 336)
    patches = preprocess_image(img, preset="siglip", size=(224, 336), patch_size=14,
                               backend=backend)
    np.testing.assert_array_equal(patches, patchify(full, 14, backend=backend))


def test_preprocess_small_images_are_padded(backend):
    img = photo(100, 150, 8)
    out = preprocess_image(img, preset="clip", size=64, crop_size=(96, 80), backend=backend)
    assert out.shape == (3, 96, 80)
    mean = np.array(IMAGE_PRESETS_REF["clip"]["mean"], np.float32)
    std = np.array(IMAGE_PRESETS_REF["clip"]["std"], np.float32)
    pad = (np.float32(0) - mean) / std
    # resized to (64, 96): rows 0..15 and 80..95 of the crop are padding, columns all inside
    np.testing.assert_array_equal(out[:, :16], np.broadcast_to(pad[:, None, None], (3, 16, 80)))
    np.testing.assert_array_equal(out[:, 80:], np.broadcast_to(pad[:, None, None], (3, 16, 80)))
    resized = resize(img, (64, 96), filter="bicubic", backend=backend)
    inner = normalize_ref(resized[:, 8:88], mean, std)
    np.testing.assert_array_equal(out[:, 16:80], inner)
    tiny = preprocess_image(photo(3, 5, 9), preset="siglip", size=2, crop_size=7,
                            backend=backend)
    np.testing.assert_array_equal(tiny, preprocess_image_ref(
        photo(3, 5, 9), size=2, crop=7, mode="squash", filter="bicubic",
        mean=(0.5,) * 3, std=(0.5,) * 3))


def test_preprocess_gray_rgba_and_layouts(backend):
    rgb = photo(150, 200, 10)
    gray = photo(150, 200, 10, 1)
    rgba = np.concatenate([rgb, np.full(rgb.shape[:2] + (1,), 7, np.uint8)], axis=2)
    gray3 = np.repeat(gray, 3, axis=2)
    np.testing.assert_array_equal(preprocess_image(gray, backend=backend),
                                  preprocess_image(gray3, backend=backend))
    np.testing.assert_array_equal(preprocess_image(gray[..., 0], backend=backend),
                                  preprocess_image(gray3, backend=backend))
    np.testing.assert_array_equal(preprocess_image(rgba, backend=backend),
                                  preprocess_image(rgb, backend=backend))
    listed = preprocess_image([gray[..., 0], rgba, rgb[::-1], rgb[10:, ::2]], backend=backend)
    np.testing.assert_array_equal(listed[0], preprocess_image(gray3, backend=backend))
    np.testing.assert_array_equal(listed[2], preprocess_image(np.ascontiguousarray(rgb[::-1]),
                                                              backend=backend))
    np.testing.assert_array_equal(listed[3], preprocess_image(
        np.ascontiguousarray(rgb[10:, ::2]), backend=backend))


def test_preprocess_options(backend):
    img = photo(240, 320, 12)
    cfg = IMAGE_PRESETS_REF["imagenet"]
    # imagenet: size is the output; the short side goes to int(size / 0.875)
    np.testing.assert_array_equal(
        preprocess_image(img, preset="imagenet", size=224, backend=backend),
        preprocess_image_ref(img, **cfg))
    np.testing.assert_array_equal(
        preprocess_image(img, preset="imagenet", size=160, backend=backend),
        preprocess_image_ref(img, **dict(cfg, size=182, crop=160)))
    # every preset choice can be overridden
    out = preprocess_image(img, preset="clip", size=96, crop_size=64, filter="lanczos",
                           mean=0.25, std=(0.5, 0.25, 0.125), scale=1 / 127.5, backend=backend)
    np.testing.assert_array_equal(out, preprocess_image_ref(
        img, size=96, crop=64, mode="shortest_edge", filter="lanczos", mean=(0.25,) * 3,
        std=(0.5, 0.25, 0.125), scale=1 / 127.5))
    sq = preprocess_image(img, preset="clip", resize_mode="squash", size=50, backend=backend)
    np.testing.assert_array_equal(sq, preprocess_image_ref(
        img, **dict(IMAGE_PRESETS_REF["clip"], size=50, crop=50, mode="squash")))
    raw = preprocess_image(img, preset=None, size=32, backend=backend)
    np.testing.assert_array_equal(raw, normalize_ref(center_crop_ref(
        resize(img, (32, 42), backend=backend), 32, 32), 0.0, 1.0))
    assert preprocess_image(np.zeros((0, 9, 9, 3), np.uint8),
                            backend=backend).shape == (0, 3, 224, 224)


# ----------------------------------------------------------------------------------------------
# bad inputs

RGB = np.zeros((8, 8, 3), np.uint8)

BAD_INPUTS = [
    (lambda: resize(np.zeros(5, np.uint8), (2, 2)), "img has 1 dims"),
    (lambda: resize(np.zeros((1, 2, 3, 4, 3), np.uint8), (2, 2)), "img has 5 dims"),
    (lambda: resize(np.zeros((0, 4, 3), np.uint8), (2, 2)), "img is empty"),
    (lambda: resize(np.zeros((4, 0, 3), np.uint8), (2, 2)), "img is empty"),
    (lambda: resize(np.zeros((4, 4, 0), np.float32), (2, 2)), "img has no channels"),
    (lambda: resize(np.zeros((4, 4, 2), np.uint8), (2, 2)), "2 channels"),
    (lambda: resize(np.zeros((4, 4, 3), np.int32), (2, 2)), "img has dtype int32"),
    (lambda: resize(np.zeros((4, 4, 3), bool), (2, 2)), "img has dtype bool"),
    (lambda: resize(RGB, (0, 2)), "size[0] must be >= 1"),
    (lambda: resize(RGB, 4), "size must be a pair"),
    (lambda: resize(RGB, (2, 2, 2)), "size must be a pair"),
    (lambda: resize(RGB, (2.5, 2)), "size[0] must be an int"),
    (lambda: resize(RGB, (2, 2), filter="cubic"), "filter must be one of"),
    (lambda: resize(RGB, (2, 2), antialias=1), "antialias must be True or False"),
    (lambda: resize([RGB, np.zeros((3, 3, 3), np.float32)], (2, 2)), "img[1] has dtype float32"),
    (lambda: resize([RGB, np.zeros((3, 3, 3, 3), np.uint8)], (2, 2)), "img[1] has 4 dims"),
    (lambda: normalize(np.zeros((4, 4), np.uint8), mean=0, std=1), "img has 2 dims"),
    (lambda: normalize(RGB, mean=(0, 0), std=1), "mean has shape (2,)"),
    (lambda: normalize(RGB, mean=0, std=(1, 1, 1, 1)), "std has shape (4,)"),
    (lambda: normalize(RGB, mean=0, std=0), "std must be non-zero"),
    (lambda: normalize(RGB, mean=np.nan, std=1), "mean must be finite"),
    (lambda: normalize(RGB, mean=0, std=1, layout="nchw"), "layout must be one of"),
    (lambda: normalize(RGB, mean=0, std=1, scale=float("inf")), "scale must be finite"),
    (lambda: normalize(np.zeros((4, 4, 3), np.int16), mean=0, std=1), "img has dtype int16"),
    (lambda: normalize(np.zeros((0, 4, 3), np.uint8), mean=0, std=1), "img is empty"),
    (lambda: patchify(np.zeros((3, 8, 8), np.float32), 3), "patch_size = 3 does not divide"),
    (lambda: patchify(np.zeros((3, 8, 8), np.float32), 0), "patch_size must be >= 1"),
    (lambda: patchify(np.zeros((3, 3, 8, 8), np.float32), 4, temporal_patch=2),
     "temporal_patch = 2 does not divide T = 3"),
    (lambda: patchify(np.zeros((3, 8, 8), np.float32), 4, temporal_patch=2), "x has 3 dims"),
    (lambda: patchify(np.zeros((8, 8), np.float32), 4), "x has 2 dims"),
    (lambda: patchify(np.zeros((3, 8, 8), np.uint8), 4), "x has dtype uint8"),
    (lambda: patchify(np.zeros((0, 8, 8), np.float32), 4), "x is empty"),
    (lambda: preprocess_image(RGB, preset="openai"), "preset must be one of"),
    (lambda: preprocess_image(RGB, filter="area"), "filter must be one of"),
    (lambda: preprocess_image(RGB, resize_mode="longest_edge"), "resize_mode must be one of"),
    (lambda: preprocess_image(RGB, size=(10, 12), resize_mode="shortest_edge"),
     "needs resize_mode='squash'"),
    (lambda: preprocess_image(RGB, size=0), "size must be >= 1"),
    (lambda: preprocess_image(RGB, crop_size=(0, 3)), "crop_size[0] must be >= 1"),
    (lambda: preprocess_image(RGB, patch_size=15), "patch_size = 15 does not divide"),
    (lambda: preprocess_image(RGB, mean=(0.5, 0.5)), "mean has shape (2,)"),
    (lambda: preprocess_image(RGB, std=(0.5, 0.0, 0.5)), "std must be non-zero"),
    (lambda: preprocess_image(RGB.astype(np.float32)), "img has dtype float32"),
    (lambda: preprocess_image(np.zeros((8, 8, 2), np.uint8)), "img has 2 channels"),
    (lambda: preprocess_image([RGB, np.zeros((4, 4, 5), np.uint8)]), "img[1] has 5 channels"),
    (lambda: preprocess_image(np.zeros((0, 8, 3), np.uint8)), "img is empty"),
]


# Bad options (types, names, sizes, scalars): ArgumentError; the rest concern the arrays' rank,
# shape, dtype or channels: ShapeError.
ARGUMENT_MATCHES = {
    "size[0] must be >= 1", "size must be a pair", "size[0] must be an int",
    "filter must be one of", "antialias must be True or False", "std must be non-zero",
    "mean must be finite", "layout must be one of", "scale must be finite",
    "patch_size must be >= 1", "preset must be one of", "resize_mode must be one of",
    "needs resize_mode='squash'", "size must be >= 1", "crop_size[0] must be >= 1",
    "patch_size = 15 does not divide"}


@pytest.mark.parametrize("case", range(len(BAD_INPUTS)))
def test_bad_inputs_raise(case):
    fn, match = BAD_INPUTS[case]
    expected = ArgumentError if match in ARGUMENT_MATCHES else ShapeError
    with pytest.raises(expected) as info:
        fn()
    assert match in str(info.value), str(info.value)
    assert str(info.value).startswith("["), str(info.value)


def test_errors_are_value_errors_and_cuda_needs_device_arrays():
    with pytest.raises(ValueError):
        resize(RGB, (0, 1))
    with pytest.raises(BackendError):
        resize(RGB, (2, 2), backend="cuda")
    with pytest.raises(BackendError):
        preprocess_image(RGB, backend="gpu")


def test_docstring_examples():
    import mmcore.ops.image as mod
    failures, tried = doctest.testmod(mod, optionflags=doctest.NORMALIZE_WHITESPACE)
    assert tried > 0 and failures == 0


# ----------------------------------------------------------------------------------------------
# CUDA


@pytest.mark.cuda
def test_cuda_matches_host():
    cp = pytest.importorskip("cupy")
    img = photo()
    for f in FILTERS:
        out = resize(cp.asarray(img), (168, 224), filter=f)
        assert isinstance(out, cp.ndarray)
        assert_levels(cp.asnumpy(out), resize(img, (168, 224), filter=f), 1, f"cuda {f}")
    imgs = [photo(h, w, s) for h, w, s in PIPELINE_PHOTOS]
    outs = resize([cp.asarray(i) for i in imgs], (61, 97), filter="bicubic")
    for o, i in zip(outs, imgs):
        assert_levels(cp.asnumpy(o), resize(i, (61, 97)), 1, "cuda list")
    x = img.astype(np.float32) / 255
    np.testing.assert_allclose(cp.asnumpy(resize(cp.asarray(x), (61, 97), filter="lanczos")),
                               resize(x, (61, 97), filter="lanczos"), atol=1e-4)
    np.testing.assert_allclose(cp.asnumpy(normalize(cp.asarray(img), mean=0.5, std=0.25)),
                               normalize(img, mean=0.5, std=0.25), rtol=1e-6, atol=1e-6)
    v = np.random.default_rng(0).standard_normal((2, 4, 3, 28, 28)).astype(np.float32)
    np.testing.assert_array_equal(cp.asnumpy(patchify(cp.asarray(v), 14, temporal_patch=2)),
                                  patchify(v, 14, temporal_patch=2))
    for preset in ("clip", "siglip", "imagenet"):
        got = cp.asnumpy(preprocess_image([cp.asarray(i) for i in imgs], preset=preset))
        std = IMAGE_PRESETS_REF[preset]["std"]
        host = preprocess_image(imgs, preset=preset)
        for i in range(len(imgs)):
            assert_within_levels_normalized(got[i], host[i].astype(np.float64), std, 1,
                                            f"cuda {preset} {i}")
