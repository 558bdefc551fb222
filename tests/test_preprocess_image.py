"""load_image (Pillow decoding to uint8 RGB), the image fields of PreprocessingConfig and
ImagePreprocessor."""

from __future__ import annotations

import io
import json
import math
import subprocess
import sys
import tempfile

import numpy as np
import pytest

import mmcore
from mmcore.config import PreprocessingConfig
from mmcore.errors import ArgumentError, ConfigError, ImageDecodeError, MMCoreError, ShapeError
from mmcore.preprocess import ImagePreprocessor, load_image

Image = pytest.importorskip("PIL.Image")
from PIL import ImageOps  # noqa: E402

needs_preprocess_image = pytest.mark.skipif(
    not hasattr(mmcore.ops, "preprocess_image"),
    reason="mmcore.ops.preprocess_image is not built yet")

ORIENTATION = 0x0112


# --------------------------------------------------------------------------------------------
# helpers

def quadrants(h: int = 40, w: int = 60) -> np.ndarray:
    """An (h, w, 3) image of four flat, very different colors (robust to JPEG loss)."""
    a = np.zeros((h, w, 3), np.uint8)
    a[: h // 2, : w // 2] = (230, 30, 30)     # top-left red
    a[: h // 2, w // 2:] = (30, 230, 30)     # top-right green
    a[h // 2:, : w // 2] = (30, 30, 230)     # bottom-left blue
    a[h // 2:, w // 2:] = (240, 240, 40)     # bottom-right yellow
    return a


def assert_close_image(got: np.ndarray, want: np.ndarray, tol: float = 6.0) -> None:
    assert got.shape == want.shape
    diff = np.abs(got.astype(np.int32) - want.astype(np.int32))
    assert diff.mean() < tol, diff.mean()


def assert_is_rgb_u8(img: np.ndarray) -> None:
    assert img.dtype == np.uint8 and img.ndim == 3 and img.shape[2] == 3
    assert img.flags.c_contiguous and img.flags.writeable


# --------------------------------------------------------------------------------------------
# plain decoding

def test_rgb_png_is_exact(tmp_path):
    rng = np.random.default_rng(0)
    a = rng.integers(0, 256, (17, 23, 3), dtype=np.uint8)
    path = tmp_path / "noise.png"
    Image.fromarray(a).save(path)
    img = load_image(path)
    assert_is_rgb_u8(img)
    np.testing.assert_array_equal(img, a)
    np.testing.assert_array_equal(load_image(str(path)), a)
    # bytes are an encoded image now, not a file name
    np.testing.assert_array_equal(load_image(path.read_bytes()), a)


def test_file_object(tmp_path):
    a = quadrants()
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, format="PNG")
    buf.seek(0)
    np.testing.assert_array_equal(load_image(buf), a)


@pytest.mark.parametrize("orientation,rot", [(1, 0), (3, 2), (6, -1), (8, 1)])
def test_jpeg_exif_orientation(tmp_path, orientation, rot):
    a = quadrants(40, 60)
    exif = Image.Exif()
    exif[ORIENTATION] = orientation
    path = tmp_path / f"o{orientation}.jpg"
    Image.fromarray(a).save(path, quality=95, exif=exif)
    img = load_image(path)
    want = np.rot90(a, k=rot)   # 6: turn 90 degrees clockwise to display, 8: counter-clockwise
    assert_is_rgb_u8(img)
    assert img.shape == want.shape
    assert_close_image(img, want)
    # the same pixels Pillow's own transpose gives
    with Image.open(path) as im:
        ref = np.asarray(ImageOps.exif_transpose(im).convert("RGB"))
    np.testing.assert_array_equal(img, ref)


def test_grayscale_and_bilevel(tmp_path):
    g = np.tile(np.arange(0, 250, 10, dtype=np.uint8), (5, 1))
    Image.fromarray(g).save(tmp_path / "l.png")
    img = load_image(tmp_path / "l.png")
    assert_is_rgb_u8(img)
    for c in range(3):
        np.testing.assert_array_equal(img[..., c], g)
    bits = Image.fromarray(g > 100).convert("1")
    bits.save(tmp_path / "b.png")
    img = load_image(tmp_path / "b.png")
    np.testing.assert_array_equal(img[..., 0], np.where(g > 100, 255, 0))


def palette_image(transparent_index: int = 0):
    a = quadrants(20, 30)
    p = Image.fromarray(a).quantize(colors=4)
    pal = np.asarray(p.getpalette()[:12], np.uint8).reshape(4, 3)
    idx = np.asarray(p)
    return p, pal, idx


def test_palette_with_transparency(tmp_path):
    p, pal, idx = palette_image()
    t = int(idx[0, 0])              # make the top-left color transparent
    p.info["transparency"] = t
    path = tmp_path / "pal.png"
    p.save(path, transparency=t)
    with Image.open(path) as im:
        assert im.mode == "P" and "transparency" in im.info
    dropped = load_image(path)
    assert_is_rgb_u8(dropped)
    np.testing.assert_array_equal(dropped, pal[idx])          # alpha dropped: palette colors
    white = load_image(path, background=(255, 255, 255))
    want = pal[idx].copy()
    want[idx == t] = 255
    np.testing.assert_array_equal(white, want)


def test_palette_without_transparency(tmp_path):
    p, pal, idx = palette_image()
    p.save(tmp_path / "pal.png")
    np.testing.assert_array_equal(load_image(tmp_path / "pal.png"), pal[idx])


def test_la_image(tmp_path):
    g = np.full((6, 8), 100, np.uint8)
    alpha = np.zeros((6, 8), np.uint8)
    alpha[:, 4:] = 255
    alpha[0, 0] = 128
    Image.fromarray(np.stack([g, alpha], -1), mode="LA").save(tmp_path / "la.png")
    img = load_image(tmp_path / "la.png")
    assert_is_rgb_u8(img)
    assert (img == 100).all()                      # alpha dropped
    comp = load_image(tmp_path / "la.png", background=(255, 255, 255))
    assert (comp[:, 4:] == 100).all()              # opaque
    assert (comp[1:, :4] == 255).all()             # fully transparent -> white
    # 100 * 128 / 255 + 255 * 127 / 255 = 177.2 -> 177
    assert tuple(comp[0, 0]) == (177, 177, 177)


def test_rgba_drop_and_composite(tmp_path):
    rng = np.random.default_rng(1)
    rgba = rng.integers(0, 256, (9, 11, 4), dtype=np.uint8)
    Image.fromarray(rgba, mode="RGBA").save(tmp_path / "rgba.png")
    dropped = load_image(tmp_path / "rgba.png")
    assert_is_rgb_u8(dropped)
    np.testing.assert_array_equal(dropped, rgba[..., :3])
    bg = (10, 200, 30)
    comp = load_image(tmp_path / "rgba.png", background=bg)
    a = rgba[..., 3:4].astype(np.float64) / 255
    want = rgba[..., :3] * a + np.asarray(bg, np.float64) * (1 - a)
    assert np.abs(comp.astype(np.float64) - want).max() <= 0.5 + 1e-9


def test_cmyk_jpeg(tmp_path):
    a = quadrants(32, 48)
    cmyk = Image.fromarray(a).convert("CMYK")
    path = tmp_path / "cmyk.jpg"
    cmyk.save(path, quality=95)
    with Image.open(path) as im:
        assert im.mode == "CMYK"
        ref = np.asarray(im.convert("RGB"))
    img = load_image(path)
    assert_is_rgb_u8(img)
    np.testing.assert_array_equal(img, ref)
    assert_close_image(img, a, tol=8.0)


def test_16bit_png_is_scaled_not_clipped(tmp_path):
    v = np.array([[0, 1, 128, 129, 257, 32768, 65279, 65535]], np.uint16)
    path = tmp_path / "g16.png"
    Image.fromarray(v).save(path)
    with Image.open(path) as im:
        assert im.mode in ("I;16", "I")
    img = load_image(path)
    assert_is_rgb_u8(img)
    want = np.floor(v.astype(np.float64) / 257 + 0.5).astype(np.uint8)
    np.testing.assert_array_equal(img[..., 0], want)
    np.testing.assert_array_equal(img[..., 2], want)
    assert img[0, -1, 0] == 255 and img[0, 5, 0] == 128


def test_32bit_int_and_float_gray_tiff(tmp_path):
    i32 = np.array([[-5, 0, 257, 65535, 100000]], np.int32)
    Image.fromarray(i32, mode="I").save(tmp_path / "i.tif")
    img = load_image(tmp_path / "i.tif")
    np.testing.assert_array_equal(img[0, :, 0], [0, 0, 1, 255, 255])

    unit = np.array([[0.0, 0.5, 1.0, np.nan]], np.float32)
    Image.fromarray(unit, mode="F").save(tmp_path / "unit.tif")
    np.testing.assert_array_equal(load_image(tmp_path / "unit.tif")[0, :, 0], [0, 128, 255, 0])

    wide = np.array([[-10.0, 0.0, 10.0, 30.0]], np.float32)
    Image.fromarray(wide, mode="F").save(tmp_path / "wide.tif")
    np.testing.assert_array_equal(load_image(tmp_path / "wide.tif")[0, :, 0],
                                  [0, 64, 128, 255])     # min-max scaled


def test_gif_first_frame(tmp_path):
    frames = [Image.fromarray(np.full((8, 8, 3), c, np.uint8)) for c in (30, 200)]
    frames[0].save(tmp_path / "anim.gif", save_all=True, append_images=frames[1:])
    img = load_image(tmp_path / "anim.gif")
    assert img.shape == (8, 8, 3) and abs(int(img[0, 0, 0]) - 30) <= 2


# --------------------------------------------------------------------------------------------
# errors: every message names the file

def test_truncated_jpeg(tmp_path):
    rng = np.random.default_rng(2)
    a = rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)
    full = tmp_path / "full.jpg"
    Image.fromarray(a).save(full, quality=90)
    data = full.read_bytes()
    cut = tmp_path / "cut_photo.jpg"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageDecodeError, match="truncated") as info:
        load_image(cut)
    assert "cut_photo.jpg" in str(info.value)
    assert isinstance(info.value, MMCoreError) and isinstance(info.value, ValueError)


def test_text_file_with_png_suffix(tmp_path):
    path = tmp_path / "notes.png"
    path.write_text("this is not an image\n" * 10)
    with pytest.raises(ImageDecodeError, match="notes.png"):
        load_image(path)


def test_empty_file_and_random_bytes(tmp_path):
    (tmp_path / "empty.jpg").write_bytes(b"")
    with pytest.raises(ImageDecodeError, match="empty.jpg"):
        load_image(tmp_path / "empty.jpg")
    (tmp_path / "noise.webp").write_bytes(np.random.default_rng(3).bytes(4096))
    with pytest.raises(ImageDecodeError, match="noise.webp"):
        load_image(tmp_path / "noise.webp")


def test_png_with_corrupt_data(tmp_path):
    a = np.random.default_rng(4).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    path = tmp_path / "bad_crc.png"
    Image.fromarray(a).save(path)
    data = bytearray(path.read_bytes())
    start = data.index(b"IDAT") + 8
    data[start: start + 40] = bytes(40)                  # damage the compressed pixels
    path.write_bytes(bytes(data))
    with pytest.raises(ImageDecodeError, match="bad_crc.png"):
        load_image(path)


def test_missing_and_directory(tmp_path):
    with pytest.raises(ImageDecodeError, match="ghost.png"):
        load_image(tmp_path / "ghost.png")
    with pytest.raises(ImageDecodeError, match="directory"):
        load_image(tmp_path)


def test_decompression_bomb_max_pixels(tmp_path):
    path = tmp_path / "big_bomb.png"
    Image.fromarray(np.zeros((100, 120, 3), np.uint8)).save(path)
    with pytest.raises(ImageDecodeError, match="max_pixels") as info:
        load_image(path, max_pixels=100 * 120 - 1)
    assert "big_bomb.png" in str(info.value) and "decompression bomb" in str(info.value)
    assert load_image(path, max_pixels=100 * 120).shape == (100, 120, 3)
    assert load_image(path, max_pixels=math.inf).shape == (100, 120, 3)


def test_decompression_bomb_pillow_limit(tmp_path, monkeypatch):
    path = tmp_path / "huge.png"
    Image.fromarray(np.zeros((100, 100, 3), np.uint8)).save(path)
    # the default limit is Pillow's MAX_IMAGE_PIXELS: refused above it (no warning)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 6000)
    with pytest.raises(ImageDecodeError, match="huge.png"):
        load_image(path)
    # beyond 2x, Pillow's own DecompressionBombError is turned into ours
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    with pytest.raises(ImageDecodeError, match="huge.png") as info:
        load_image(path, max_pixels=math.inf)
    assert "bomb" in str(info.value)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", None)
    assert load_image(path).shape == (100, 100, 3)


@pytest.mark.parametrize("kwargs,name", [
    (dict(max_pixels=0), "max_pixels"),
    (dict(max_pixels=-5), "max_pixels"),
    (dict(max_pixels="many"), "max_pixels"),
    (dict(max_pixels=float("nan")), "max_pixels"),
    (dict(background=(1, 2)), "background"),
    (dict(background=(0, 0, 256)), "background"),
    (dict(background="white"), "background"),
])
def test_bad_arguments(tmp_path, kwargs, name):
    path = tmp_path / "ok.png"
    Image.fromarray(quadrants()).save(path)
    with pytest.raises(ArgumentError, match=name):
        load_image(path, **kwargs)


def test_bad_path_type():
    with pytest.raises(ArgumentError, match="path"):
        load_image(12345)


# --------------------------------------------------------------------------------------------
# config

def test_image_config_defaults():
    cfg = PreprocessingConfig(modality="image")
    assert cfg.preset == "clip" and cfg.size == 224 and cfg.crop_size is None
    assert type(cfg).__name__ == "ImagePreprocessingConfig"
    # fields of the other modalities read as their old neutral values, with a warning
    with pytest.warns(DeprecationWarning, match="not a field of 'image' configs"):
        assert cfg.padding == "none" and cfg.chunk_length_s is None
    with pytest.warns(DeprecationWarning, match="not a field of 'image' configs"):
        assert cfg.num_frames is None and cfg.tokenizer is None and cfg.max_length is None
    for name in ("resize_mode", "filter", "mean", "std", "patch_size"):
        assert getattr(cfg, name) is None


def test_image_config_normalizes():
    cfg = PreprocessingConfig(modality="IMAGE", preset="SigLIP", size=[384, 384],
                              crop_size=np.int64(384), resize_mode="Squash", filter="BILINEAR",
                              mean=np.array([0.5, 0.5, 0.5]), std=[0.5, 0.5, 0.5], patch_size=16)
    assert cfg.modality == "image" and cfg.preset == "siglip"
    assert cfg.size == (384, 384) and cfg.crop_size == 384 and type(cfg.crop_size) is int
    assert cfg.resize_mode == "squash" and cfg.filter == "bilinear"
    assert cfg.mean == (0.5, 0.5, 0.5) and cfg.std == (0.5, 0.5, 0.5)
    d = cfg.to_dict()
    assert json.loads(json.dumps(d)) == d
    assert PreprocessingConfig.from_dict(d) == cfg
    assert PreprocessingConfig(modality="image", preset=None).preset is None


@pytest.mark.parametrize("field,value", [
    ("preset", "whisper"),
    ("size", 0),
    ("size", (224,)),
    ("size", (224, 0)),
    ("size", 224.0),
    ("size", None),
    ("crop_size", -1),
    ("resize_mode", "stretch"),
    ("filter", "gaussian"),
    ("mean", (0.5, 0.5)),
    ("mean", "0.5"),
    ("mean", (0.5, float("nan"), 0.5)),
    ("std", (0.5, 0.0, 0.5)),
    ("std", (1, 1, -1)),
    ("patch_size", 0),
    ("padding", "longest"),
    ("chunk_length_s", 30.0),
    ("num_frames", 8),          # a video field
    ("fps", 2.0),
    ("max_length", 77),         # a text field
    ("tokenizer", "byte"),
])
def test_image_config_bad_field_names_it(field, value):
    with pytest.raises(ConfigError) as info:
        PreprocessingConfig(modality="image", **{field: value})
    assert f"PreprocessingConfig.{field}" in str(info.value)


def test_image_config_patch_must_divide_crop():
    with pytest.raises(ConfigError, match=r"PreprocessingConfig\.patch_size"):
        PreprocessingConfig(modality="image", crop_size=224, patch_size=15)
    cfg = PreprocessingConfig(modality="image", crop_size=(224, 336), patch_size=14)
    assert cfg.patch_size == 14


def test_image_config_pair_size_needs_squash():
    with pytest.raises(ConfigError, match=r"PreprocessingConfig\.resize_mode"):
        PreprocessingConfig(modality="image", size=(224, 320), resize_mode="shortest_edge")
    cfg = PreprocessingConfig(modality="image", size=(224, 320), resize_mode="squash")
    assert cfg.size == (224, 320)


def test_audio_config_rejects_image_fields():
    with pytest.raises(ConfigError, match=r"PreprocessingConfig\.size applies to modality"):
        PreprocessingConfig(size=224)
    # the neutral values are fine and the audio defaults are unchanged
    cfg = PreprocessingConfig(size=None, mean=None)
    assert cfg.preset == "whisper" and "size" not in cfg.to_dict()
    with pytest.warns(DeprecationWarning, match="'size' is not a field of 'audio' configs"):
        assert cfg.size is None


def test_image_config_from_toml(tmp_path):
    pytest.importorskip("tomllib" if sys.version_info >= (3, 11) else "tomli")
    path = tmp_path / "model.toml"
    path.write_text('[preprocessing.image]\nmodality = "image"\npreset = "none"\n'
                    'size = [256, 320]\ncrop_size = 224\nmean = [0.4, 0.5, 0.6]\n'
                    'std = [0.2, 0.25, 0.3]\nfilter = "none"\n')
    cfg = PreprocessingConfig.from_toml(path, section="preprocessing.image")
    assert cfg.preset is None and cfg.size == (256, 320) and cfg.crop_size == 224
    assert cfg.mean == (0.4, 0.5, 0.6) and cfg.filter is None


# --------------------------------------------------------------------------------------------
# ImagePreprocessor

def test_preprocessor_rejects_other_configs():
    with pytest.raises(ConfigError, match="modality"):
        ImagePreprocessor(PreprocessingConfig())
    with pytest.raises(ConfigError):
        ImagePreprocessor("clip")
    assert ImagePreprocessor({"preset": "siglip"}).config.preset == "siglip"


@pytest.mark.parametrize("images,frag", [
    (np.zeros((8, 8), np.uint8), "shape"),
    (np.zeros((8, 8, 3), np.float32), "dtype"),
    (np.zeros((0, 8, 8, 3), np.uint8), "empty"),
    ([], "empty"),
    ([np.zeros((8, 8, 4), np.uint8)], r"images\[0\]"),
])
def test_preprocessor_bad_inputs(images, frag):
    with pytest.raises(ShapeError, match=frag):
        ImagePreprocessor()(images)


def test_preprocessor_missing_file_names_it(tmp_path):
    with pytest.raises(ImageDecodeError, match="nowhere.jpg"):
        ImagePreprocessor()([np.zeros((8, 8, 3), np.uint8), tmp_path / "nowhere.jpg"])


@needs_preprocess_image
def test_preprocessor_matches_op(tmp_path):
    rng = np.random.default_rng(5)
    a = rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)
    b = rng.integers(0, 256, (70, 50, 3), dtype=np.uint8)
    Image.fromarray(a).save(tmp_path / "a.png")
    op = mmcore.ops.preprocess_image
    pre = ImagePreprocessor()
    one = pre(tmp_path / "a.png")["pixel_values"]
    assert one.dtype == np.float32 and one.shape == (1, 3, 224, 224)
    np.testing.assert_array_equal(one, np.asarray(op(a[None], preset="clip", size=224)))
    np.testing.assert_array_equal(pre(a)["pixel_values"], one)
    mixed = pre([tmp_path / "a.png", b])["pixel_values"]
    assert mixed.shape == (2, 3, 224, 224)
    np.testing.assert_array_equal(mixed[0], one[0])
    np.testing.assert_array_equal(mixed[1:], pre(b)["pixel_values"])
    batch = pre(np.stack([a, a]))["pixel_values"]
    np.testing.assert_array_equal(batch, np.concatenate([one, one]))


@needs_preprocess_image
def test_preprocessor_passes_config_fields():
    rng = np.random.default_rng(6)
    a = rng.integers(0, 256, (60, 80, 3), dtype=np.uint8)
    cfg = PreprocessingConfig(modality="image", preset="siglip", size=64)
    got = ImagePreprocessor(cfg)(a)["pixel_values"]
    want = np.asarray(mmcore.ops.preprocess_image(a[None], preset="siglip", size=64))
    np.testing.assert_array_equal(got, want)
    cfg = PreprocessingConfig(modality="image", preset="clip", size=32, crop_size=32,
                              patch_size=16)
    patches = ImagePreprocessor(cfg)(a)["pixel_values"]
    want = np.asarray(mmcore.ops.preprocess_image(a[None], preset="clip", size=32,
                                                  crop_size=32, patch_size=16))
    np.testing.assert_array_equal(patches, want)
    assert patches.shape == (1, 4, 3 * 16 * 16)


def test_import_is_lazy_about_image_video_text_libraries():
    code = ("import sys, mmcore, mmcore.preprocess, mmcore.config\n"
            "bad = [m for m in ('PIL', 'av', 'tokenizers', 'cv2', 'transformers') "
            "if m in sys.modules]\n"
            "print(bad)\n"
            "assert not bad, bad\n")
    res = subprocess.run([sys.executable, "-c", code], cwd=tempfile.gettempdir(),
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stdout + res.stderr
