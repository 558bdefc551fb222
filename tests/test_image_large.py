"""The native uint8 resize passes on large and awkward images: ``preprocess_image`` and
``resize`` against Pillow bit for bit (Pillow's fixed-point arithmetic, then the same float32
normalization), for every filter and resize mode, with 1, 2 and 3 threads, on prime and
one-pixel sizes, rows wider than the kernels' segments, non-contiguous views, batches and each
instruction-set level of the build."""

from __future__ import annotations

import numpy as np
import pytest

import mmcore
from _helpers import at_isa
from mmcore.ops import preprocess_image, resize
from reference import (
    center_crop_ref,
    normalize_ref,
    patchify_ref,
    pillow13_vertical_first,
    preprocess_image_ref,
    shortest_edge_size_ref,
)

Image = pytest.importorskip("PIL.Image")

FILTERS = ["nearest", "bilinear", "bicubic", "lanczos"]
MODES = ["shortest_edge", "squash"]
THREADS = [1, 2, 3]
MEAN = (0.48145466, 0.4578275, 0.40821073)
STD = (0.26862954, 0.26130258, 0.27577711)


@pytest.fixture
def threads():
    """Restores the thread count a test changes."""
    before = mmcore.get_num_threads()
    yield
    mmcore.set_num_threads(before)


_CACHE: dict = {}


def test_image(h: int, w: int, seed: int = 0, channels: int = 3) -> np.ndarray:
    """A read-only uint8 (h, w, channels) image that stresses the fixed-point passes: smooth
    gradients, hard black / white blocks (the bicubic and Lanczos overshoot is clamped) and
    per-pixel noise over the whole range."""
    key = (h, w, seed, channels)
    if key not in _CACHE:
        rng = np.random.default_rng(seed)
        yy = np.arange(h, dtype=np.float32)[:, None, None]
        xx = np.arange(w, dtype=np.float32)[None, :, None]
        ch = np.arange(channels, dtype=np.float32)[None, None, :]
        img = 128 + 90 * np.sin(xx / (37.0 + 11 * ch) + yy / 53.0) + 0 * ch
        img = img + rng.normal(0, 25, img.shape).astype(np.float32)
        for _ in range(6):
            y0, x0 = int(rng.integers(0, h)), int(rng.integers(0, w))
            img[y0:y0 + max(1, h // 5), x0:x0 + max(1, w // 7)] = 255.0 * rng.integers(0, 2)
        a = np.clip(img, 0, 255).astype(np.uint8)
        a.setflags(write=False)
        _CACHE[key] = a
    return _CACHE[key]


test_image.__test__ = False  # a helper, not a test


def _pil_filter(f):
    return {"nearest": Image.Resampling.NEAREST, "bilinear": Image.Resampling.BILINEAR,
            "bicubic": Image.Resampling.BICUBIC, "lanczos": Image.Resampling.LANCZOS}[f]


def pil_resize(img, h, w, filt):
    """Pillow's Image.resize of a uint8 (H, W, C) image (C = 1: mode "L", 4: "RGBA") to (h, w)."""
    a = np.ascontiguousarray(img)
    im = Image.fromarray(a[..., 0] if a.shape[2] == 1 else a)
    out = np.asarray(im.resize((w, h), _pil_filter(filt), reducing_gap=None))
    return out.reshape(h, w, a.shape[2])


def _skip_old_pillow_order(H, W, rh, rw):
    import PIL
    if int(PIL.__version__.split(".")[0]) < 13 and pillow13_vertical_first(H, W, rh, rw):
        pytest.skip("Pillow < 13 filters this shape horizontally first")


def pillow_preprocess(img, *, size, crop, mode, filt, mean=MEAN, std=STD, scale=1.0 / 255.0):
    """preprocess_image done with Pillow: Image.resize, Hugging Face's center crop (zeros
    outside), then the kernels' float32 normalization; (3, crop_h, crop_w)."""
    H, W = img.shape[:2]
    if isinstance(size, tuple):
        rh, rw = size
    else:
        rh, rw = shortest_edge_size_ref(H, W, size) if mode == "shortest_edge" else (size, size)
    _skip_old_pillow_order(H, W, rh, rw)
    r = pil_resize(img, rh, rw, filt)
    return normalize_ref(center_crop_ref(r, crop[0], crop[1]), mean, std, scale, "chw")


def run_preprocess(img, *, size, crop, mode, filt, n_threads):
    mmcore.set_num_threads(n_threads)
    kw = dict(resize_mode="squash") if isinstance(size, tuple) else dict(resize_mode=mode)
    return preprocess_image(img, preset=None, size=size, crop_size=crop, filter=filt, mean=MEAN,
                            std=STD, backend="native", **kw)


# ----------------------------------------------------------------------------------------------
# preprocess_image against Pillow


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("filt", FILTERS)
def test_large_photo_equals_pillow_at_every_thread_count(threads, filt, mode):
    img = test_image(2999, 4001, seed=1)
    want = pillow_preprocess(img, size=224, crop=(224, 224), mode=mode, filt=filt)
    for n in THREADS:
        got = run_preprocess(img, size=224, crop=(224, 224), mode=mode, filt=filt, n_threads=n)
        np.testing.assert_array_equal(got, want, err_msg=f"{filt} {mode} threads={n}")


# (H, W): primes, one-pixel edges, rows wider than a segment, shapes Pillow 13 filters vertically
# first, upscales (taps of weight 1), an unchanged size and an exact 2x reduction.
AWKWARD = [(4001, 2999), (1009, 997), (1, 4001), (4001, 1), (2, 3), (1, 1), (13, 5003),
           (5003, 13), (4001, 613), (257, 4099), (100, 151), (224, 224), (448, 672), (31, 8209)]


@pytest.mark.parametrize("hw", AWKWARD, ids=[f"{h}x{w}" for h, w in AWKWARD])
def test_awkward_sizes_equal_pillow(threads, hw):
    H, W = hw
    img = test_image(H, W, seed=H + W)
    # A shortest edge of 224 would stretch a one-pixel side to hundreds of thousands of pixels.
    edge = 224 if min(H, W) >= 100 else 3
    cases = [(edge, (224, 224), "shortest_edge"), (211, (199, 227), "squash"),
             (97 if edge == 224 else 2, (101, 89), "shortest_edge"), ((1, 3), (1, 3), "squash"),
             ((7, 1), (7, 1), "squash")]
    for filt in FILTERS:
        for size, crop, mode in cases:
            want = pillow_preprocess(img, size=size, crop=crop, mode=mode, filt=filt)
            outs = [run_preprocess(img, size=size, crop=crop, mode=mode, filt=filt, n_threads=n)
                    for n in THREADS]
            for n, got in zip(THREADS, outs):
                np.testing.assert_array_equal(got, want,
                                              err_msg=f"{hw} {filt} {size} {crop} threads={n}")


def test_small_awkward_sizes_equal_reference():
    """The float64-free fixed-point reference agrees on the small shapes (independent of
    Pillow's version: the reference follows Pillow 13's pass order)."""
    for H, W in [(1, 1), (2, 3), (1, 17), (19, 1), (23, 29), (61, 7), (7, 61)]:
        img = test_image(H, W, seed=H * W)
        for filt in FILTERS:
            for mode in MODES:
                want = preprocess_image_ref(img, size=5, crop=6, mode=mode, filter=filt,
                                            mean=MEAN, std=STD)
                got = preprocess_image(img, preset=None, size=5, crop_size=6, resize_mode=mode,
                                       filter=filt, mean=MEAN, std=STD, backend="native")
                np.testing.assert_array_equal(got, want, err_msg=f"{(H, W)} {filt} {mode}")


def test_non_contiguous_views_equal_their_copies_and_pillow(threads):
    big = test_image(1201, 1603, seed=7)
    views = {
        "strided": big[::2, ::3],
        "cropped rows": big[5:-7, 11:-13],
        "mirrored": big[:, ::-1],
        "bgr": big[..., ::-1],
        "transposed": np.swapaxes(big, 0, 1),
    }
    for name, v in views.items():
        assert not v.flags.c_contiguous, name
        for filt in FILTERS:
            want = pillow_preprocess(v, size=224, crop=(224, 224), mode="shortest_edge", filt=filt)
            copy = run_preprocess(np.ascontiguousarray(v), size=224, crop=(224, 224),
                                  mode="shortest_edge", filt=filt, n_threads=2)
            np.testing.assert_array_equal(copy, want, err_msg=f"{name} {filt} copy")
            for n in THREADS:
                got = run_preprocess(v, size=224, crop=(224, 224), mode="shortest_edge", filt=filt,
                                     n_threads=n)
                np.testing.assert_array_equal(got, want, err_msg=f"{name} {filt} threads={n}")


def test_batch_of_large_images_equals_one_at_a_time(threads):
    imgs = [test_image(2999, 4001, seed=1), test_image(1080, 1920, seed=2),
            test_image(4001, 613, seed=3), test_image(480, 640, seed=4)]
    for filt in ("bicubic", "bilinear"):
        mmcore.set_num_threads(1)
        singles = [preprocess_image(a, preset="clip", filter=filt, backend="native") for a in imgs]
        for n in THREADS:
            mmcore.set_num_threads(n)
            out = preprocess_image(imgs, preset="clip", filter=filt, backend="native")
            for i, s in enumerate(singles):
                np.testing.assert_array_equal(out[i], s, err_msg=f"{filt} image {i} threads={n}")
            same = preprocess_image(np.stack([imgs[3]] * 5), preset="clip", filter=filt,
                                    backend="native")
            for i in range(5):
                np.testing.assert_array_equal(same[i], singles[3])


def test_patches_of_a_large_image_are_the_patchified_output():
    img = test_image(2999, 4001, seed=5)
    full = preprocess_image(img, preset="clip", backend="native")
    np.testing.assert_array_equal(preprocess_image(img, preset="clip", patch_size=14,
                                                   backend="native"), patchify_ref(full, 14))


@pytest.mark.parametrize("isa", ["baseline", "avx2", "avx512"])
def test_every_isa_level_equals_pillow(isa):
    """Each compiled instruction-set level (the generic passes and the wider ones) gives
    Pillow's numbers."""
    img = test_image(1999, 2503, seed=6)
    wants = {f: pillow_preprocess(img, size=224, crop=(224, 224), mode="shortest_edge", filt=f)
             for f in FILTERS}
    with at_isa(isa):
        for f in FILTERS:
            got = preprocess_image(img, preset=None, size=224, filter=f, mean=MEAN, std=STD,
                                   backend="native")
            np.testing.assert_array_equal(got, wants[f], err_msg=f"{isa} {f}")


# ----------------------------------------------------------------------------------------------
# resize (uint8) against Pillow: gray, RGB and RGBA (filtered premultiplied)


@pytest.mark.parametrize("channels", [1, 3, 4])
@pytest.mark.parametrize("filt", FILTERS)
def test_large_resize_equals_pillow(threads, channels, filt):
    img = test_image(2003, 3001, seed=channels, channels=channels)
    if channels == 4:   # varied alpha, 0 and 255 included
        img = img.copy()
        img[..., 3] = np.clip(test_image(2003, 3001, seed=9, channels=1)[..., 0], 0, 255)
    for h, w in [(211, 283), (2003, 97), (5, 3001), (1, 1), (2011, 3307)]:
        _skip_old_pillow_order(2003, 3001, h, w)
        want = pil_resize(img, h, w, filt)
        for n in THREADS:
            mmcore.set_num_threads(n)
            got = resize(img, (h, w), filter=filt, backend="native")
            np.testing.assert_array_equal(got, want, err_msg=f"C={channels} {(h, w)} threads={n}")


@pytest.mark.parametrize("filt", ["bilinear", "bicubic", "lanczos"])
def test_upscale_with_taps_of_weight_one_equals_pillow(threads, filt):
    """An exact 3x upscale puts every third output on a source pixel centre: a tap of weight 1
    (2^22 in fixed point), where the AVX2 passes hand over to the 32-bit-multiply ones."""
    for channels in (1, 3, 4):
        img = test_image(37, 53, seed=11, channels=channels)
        for h, w in [(111, 159), (111, 53), (37, 159), (111, 20)]:
            _skip_old_pillow_order(37, 53, h, w)
            want = pil_resize(img, h, w, filt)
            for n in THREADS:
                mmcore.set_num_threads(n)
                got = resize(img, (h, w), filter=filt, backend="native")
                np.testing.assert_array_equal(got, want, err_msg=f"C={channels} {(h, w)} {n}")
    big = test_image(301, 4001, seed=12)
    want = pillow_preprocess(big, size=903, crop=(224, 224), mode="shortest_edge", filt=filt)
    got = run_preprocess(big, size=903, crop=(224, 224), mode="shortest_edge", filt=filt,
                         n_threads=2)
    np.testing.assert_array_equal(got, want)
