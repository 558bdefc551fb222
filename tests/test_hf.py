"""mmcore.hf: drop-in Hugging Face processors, against transformers' Pillow-backed classes built
from the same preprocessor_config.json (skipped where transformers is not installed)."""

from __future__ import annotations

import json
import os
import warnings

import numpy as np
import pytest

from mmcore.errors import ArgumentError, ConfigError, ShapeError
from mmcore.hf import (
    BatchFeature,
    CLIPImageProcessor,
    SiglipImageProcessor,
    ViTImageProcessor,
    WhisperFeatureExtractor,
    from_pretrained,
)

# The preprocessor_config.json files of openai/clip-vit-base-patch32 (its legacy int sizes),
# google/siglip-base-patch16-224 and openai/whisper-tiny (without its stored mel_filters).
CLIP = {"crop_size": 224, "do_center_crop": True, "do_normalize": True, "do_resize": True,
        "feature_extractor_type": "CLIPFeatureExtractor",
        "image_mean": [0.48145466, 0.4578275, 0.40821073],
        "image_std": [0.26862954, 0.26130258, 0.27577711], "resample": 3, "size": 224}
SIGLIP = {"do_normalize": True, "do_rescale": True, "do_resize": True,
          "image_mean": [0.5, 0.5, 0.5], "image_processor_type": "SiglipImageProcessor",
          "image_std": [0.5, 0.5, 0.5], "processor_class": "SiglipProcessor", "resample": 3,
          "rescale_factor": 0.00392156862745098, "size": {"height": 224, "width": 224}}
VIT = {"do_normalize": True, "do_rescale": True, "do_resize": True,
       "image_mean": [0.5, 0.5, 0.5], "image_processor_type": "ViTImageProcessor",
       "image_std": [0.5, 0.5, 0.5], "resample": 2, "rescale_factor": 0.00392156862745098,
       "size": {"height": 224, "width": 224}}
WHISPER = {"chunk_length": 30, "feature_extractor_type": "WhisperFeatureExtractor",
           "feature_size": 80, "hop_length": 160, "n_fft": 400, "n_samples": 480000,
           "nb_max_frames": 3000, "padding_side": "right", "padding_value": 0.0,
           "processor_class": "WhisperProcessor", "return_attention_mask": False,
           "sampling_rate": 16000}

FAMILIES = {"clip": (CLIP, CLIPImageProcessor, "CLIPImageProcessorPil"),
            "siglip": (SIGLIP, SiglipImageProcessor, "SiglipImageProcessorPil"),
            "vit": (VIT, ViTImageProcessor, "ViTImageProcessorPil")}

#: Tolerances: images are float32 rounding apart (the uint8 resize is Pillow's exactly);
#: Whisper's features differ by torch.stft's float32 rounding (~1e-5 observed).
IMAGE_ATOL = 2e-6
WHISPER_ATOL = 2e-4


def write_config(folder, cfg):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "preprocessor_config.json").write_text(json.dumps(cfg))
    return str(folder)


@pytest.fixture(scope="module")
def transformers():
    tf = pytest.importorskip("transformers")
    pytest.importorskip("PIL")
    tf.logging.set_verbosity_error()
    return tf


def _photo(name):
    data = pytest.importorskip("skimage.data")
    return getattr(data, name)()


def _rgba():
    a = _photo("astronaut")[:301, :257]
    alpha = np.tile(np.linspace(0, 255, a.shape[1]).astype(np.uint8), (a.shape[0], 1))
    alpha[:40] = 0
    return np.dstack([a, alpha])


def _inputs(name):
    from PIL import Image
    if name == "astronaut PIL":
        return Image.fromarray(_photo("astronaut"))
    if name == "chelsea HWC":
        return _photo("chelsea")
    if name == "coffee CHW":
        return np.ascontiguousarray(_photo("coffee").transpose(2, 0, 1))
    if name == "odd 97x311":
        return _photo("astronaut")[5:102, 11:322]
    if name == "tiny 7x5":
        return _photo("chelsea")[100:107, 200:205]
    if name == "1x1":
        return _photo("chelsea")[:1, :1]
    if name == "strided view":
        return _photo("coffee")[::3, ::2]
    if name == "gray PIL":
        return Image.fromarray(_photo("camera"))
    if name == "gray HW1":
        return _photo("camera")[:, :, None]
    if name == "RGBA PIL":
        return Image.fromarray(_rgba(), "RGBA")
    if name == "RGBA array":
        return _rgba()
    if name == "LA PIL":
        return Image.fromarray(_rgba(), "RGBA").convert("LA")
    if name == "P with transparency":
        im = Image.fromarray(_photo("chelsea")).convert("P", palette=Image.ADAPTIVE)
        im.info["transparency"] = 0
        return im
    if name == "float in [0, 1]":
        return _photo("chelsea").astype(np.float32) / 255
    if name == "list":
        ast = _photo("astronaut")
        return [ast, _photo("chelsea")[:200], _photo("coffee"), ast[:13, :211],
                _photo("camera")[:100, :150, None]]
    if name == "NHWC batch":
        return np.stack([_photo("astronaut")[:300, :300], _photo("chelsea")[:300, :300]])
    raise KeyError(name)


IMAGE_INPUTS = ["astronaut PIL", "chelsea HWC", "coffee CHW", "odd 97x311", "tiny 7x5", "1x1",
                "strided view", "gray PIL", "gray HW1", "RGBA PIL", "RGBA array", "LA PIL",
                "P with transparency", "float in [0, 1]", "list", "NHWC batch"]
_NEEDS_RGB = ("gray", "RGBA", "LA", "P with", "list")   # ViT converts only when asked


def _pair(transformers, family, tmp_path, **over):
    cfg, ours, theirs = FAMILIES[family]
    d = write_config(tmp_path / family, cfg)
    return (getattr(transformers, theirs).from_pretrained(d, **over),
            ours.from_pretrained(d, **over))


def _assert_close(h, m, atol):
    h = h if isinstance(h, list) else list(h)
    m = m if isinstance(m, list) else list(m)
    assert len(h) == len(m)
    for a, b in zip(h, m):
        a, b = np.asarray(a), np.asarray(b)
        assert a.shape == b.shape and a.dtype == b.dtype
        np.testing.assert_allclose(b.astype(np.float64), a, rtol=0, atol=atol)


@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize("name", IMAGE_INPUTS)
def test_images_equal_transformers(transformers, tmp_path, family, name):
    theirs, ours = _pair(transformers, family, tmp_path)
    kw = {"do_convert_rgb": True} if family == "vit" and name.startswith(_NEEDS_RGB) else {}
    if name == "1x1":                   # (1, 1, 3) would be inferred channels-first
        kw["input_data_format"] = "channels_last"
    x = _inputs(name)
    h = theirs(x, **kw)["pixel_values"]
    m = ours(x, **kw)["pixel_values"]
    _assert_close(h, m, IMAGE_ATOL)
    hn = theirs(x, return_tensors="np", **kw)["pixel_values"]
    mn = ours(x, return_tensors="np", **kw)["pixel_values"]
    assert isinstance(mn, np.ndarray) and mn.shape == hn.shape and mn.dtype == np.float32


@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize("options", [
    {"do_resize": False}, {"do_rescale": False}, {"do_normalize": False},
    {"do_rescale": False, "do_normalize": False}, {"resample": 0}, {"resample": 1},
    {"resample": 2}, {"image_mean": 0.25, "image_std": 2.0}, {"rescale_factor": 1 / 127.5},
    {"size": {"height": 97, "width": 13}},
])
def test_options_equal_transformers(transformers, tmp_path, family, options):
    theirs, ours = _pair(transformers, family, tmp_path)
    x = [_photo("chelsea"), _photo("coffee")[:57, :301]]
    _assert_close(theirs(x, **options)["pixel_values"], ours(x, **options)["pixel_values"],
                  IMAGE_ATOL)


@pytest.mark.parametrize("options", [
    {"do_center_crop": False}, {"crop_size": {"height": 500, "width": 700}},
    {"crop_size": 31}, {"size": {"shortest_edge": 100, "longest_edge": 120}},
    {"size": {"shortest_edge": 300, "longest_edge": 310}}, {"do_resize": False},
])
def test_clip_geometry_equals_transformers(transformers, tmp_path, options):
    """Crops larger than the image (padded with 0), no crop (ragged list), longest_edge."""
    theirs, ours = _pair(transformers, "clip", tmp_path, **options)
    x = [_photo("chelsea"), _photo("astronaut")[:41, :400], _photo("camera")[:3, :5, None]]
    _assert_close(theirs(x)["pixel_values"], ours(x)["pixel_values"], IMAGE_ATOL)


def test_gray_without_rgb_conversion_keeps_one_channel(transformers, tmp_path):
    theirs, ours = _pair(transformers, "vit", tmp_path)
    gray = _photo("camera")[:, :, None]
    h = theirs(gray, image_mean=0.5, image_std=0.5, return_tensors="np")["pixel_values"]
    m = ours(gray, image_mean=0.5, image_std=0.5, return_tensors="np")["pixel_values"]
    assert m.shape == (1, 1, 224, 224)
    _assert_close(h, m, IMAGE_ATOL)
    with pytest.raises(ShapeError, match=r"\[ViTImageProcessor\] image_mean"):
        ours(gray)                          # 3 means for 1 channel: transformers refuses too
    with pytest.raises(ShapeError, match="do_convert_rgb"):
        ours(_rgba())


def _speech(seconds, seed=0):
    t = np.arange(int(16000 * seconds)) / 16000
    x = 0.3 * np.sin(2 * np.pi * (100 + 400 * t) * t)
    return (x + 0.02 * np.random.default_rng(seed).standard_normal(t.size)).astype(np.float32)


WHISPER_CASES = {
    "1 s": (lambda: _speech(1), {}),
    "40 s, truncated": (lambda: _speech(40), {}),
    "1 s, attention mask": (lambda: _speech(1), {"return_attention_mask": True}),
    "1 s and 2.5 s, longest": (lambda: [_speech(1), _speech(2.5, 1)],
                               {"padding": "longest", "return_attention_mask": True}),
    "1 s and 40 s": (lambda: [_speech(1), _speech(40, 1)], {"return_attention_mask": True}),
    "do_normalize": (lambda: _speech(1), {"do_normalize": True}),
    "do_normalize, batch": (lambda: [_speech(1), _speech(2, 2)],
                            {"do_normalize": True, "return_attention_mask": True}),
    "pad_to_multiple_of": (lambda: _speech(1.00625),
                           {"padding": "longest", "pad_to_multiple_of": 400,
                            "return_attention_mask": True}),
    "max_length": (lambda: [_speech(3), _speech(1, 4)],
                   {"max_length": 32000, "return_attention_mask": True}),
    "no truncation, longest": (lambda: [_speech(31), _speech(1, 5)],
                               {"truncation": False, "padding": True}),
    "list of floats": (lambda: _speech(0.5).tolist(), {}),
    "2-D float64, no padding": (lambda: np.stack([_speech(1), _speech(1, 3)]).astype(np.float64),
                                {"padding": False}),
}


@pytest.mark.parametrize("case", sorted(WHISPER_CASES))
@pytest.mark.parametrize("config_mask", [False, True])
def test_whisper_equals_transformers(transformers, tmp_path, case, config_mask):
    d = write_config(tmp_path, dict(WHISPER, return_attention_mask=config_mask))
    theirs = transformers.WhisperFeatureExtractor.from_pretrained(d)
    ours = WhisperFeatureExtractor.from_pretrained(d)
    make, kw = WHISPER_CASES[case]
    x = make()
    h = theirs(x, sampling_rate=16000, return_tensors="np", **kw)
    m = ours(x, sampling_rate=16000, return_tensors="np", **kw)
    assert list(m) == list(h)
    np.testing.assert_allclose(m["input_features"], h["input_features"], rtol=0,
                               atol=WHISPER_ATOL)
    assert m["input_features"].dtype == np.float32
    if "attention_mask" in h:
        assert m["attention_mask"].dtype == h["attention_mask"].dtype
        np.testing.assert_array_equal(m["attention_mask"], h["attention_mask"])


def test_whisper_left_padding_and_padding_value(transformers, tmp_path):
    d = write_config(tmp_path, dict(WHISPER, padding_side="left", padding_value=0.25))
    theirs = transformers.WhisperFeatureExtractor.from_pretrained(d)
    ours = WhisperFeatureExtractor.from_pretrained(d)
    x = [_speech(1), _speech(0.3, 1)]
    kw = dict(sampling_rate=16000, padding="longest", return_attention_mask=True)
    h, m = theirs(x, **kw), ours(x, **kw)
    np.testing.assert_allclose(m["input_features"], h["input_features"], rtol=0,
                               atol=WHISPER_ATOL)
    np.testing.assert_array_equal(m["attention_mask"], h["attention_mask"])


# ------------------------------------------------------------------------------------------
# without transformers


def test_transparent_pixels_become_white():
    rgba = np.zeros((40, 30, 4), np.uint8)
    rgba[..., :3] = 17                          # any colour, fully transparent
    white = np.full((40, 30, 3), 255, np.uint8)
    proc = SiglipImageProcessor()
    np.testing.assert_array_equal(proc(rgba, return_tensors="np")["pixel_values"],
                                  proc(white, return_tensors="np")["pixel_values"])
    half = rgba.copy()
    half[..., 3] = 128                          # 17 * 128/255 + 255 * 127/255 = 135.5 -> 136
    out = proc(half, do_resize=False, do_rescale=False, do_normalize=False)["pixel_values"][0]
    assert out.dtype == np.uint8 and np.all(out == 136)


def test_every_alpha_composites_as_pillow_and_load_image():
    """Every (colour, alpha) pair: the array path (transformers' float formula), the PIL path
    (Pillow's alpha_composite) and load_image(background=white) give the same pixels."""
    import io

    from PIL import Image

    from mmcore.hf._images import to_hwc
    from mmcore.preprocess import load_image
    v = np.arange(256, dtype=np.uint8)
    rgba = np.stack(np.broadcast_arrays(v[:, None], v[None, ::-1], v[::-1, None], v[None, :]),
                    axis=-1).astype(np.uint8)           # (256, 256, 4): every (c, alpha) pair
    arr = to_hwc("t", "img", rgba, convert_rgb=True, channels_first=False)
    pil = to_hwc("t", "img", Image.fromarray(rgba, "RGBA"), convert_rgb=True,
                 channels_first=None)
    buf = io.BytesIO()
    Image.fromarray(rgba, "RGBA").save(buf, "PNG")
    loaded = load_image(buf.getvalue(), background=(255, 255, 255))
    np.testing.assert_array_equal(arr, pil)
    np.testing.assert_array_equal(loaded, pil)
    assert pil[0, 0].tolist() == [255, 255, 255] and pil[255, 0, 0] == 255


def test_return_tensors_and_batch_feature():
    proc = CLIPImageProcessor()
    x = np.random.default_rng(0).integers(0, 256, (2, 50, 70, 3), dtype=np.uint8)
    out = proc(x)
    assert isinstance(out, BatchFeature) and isinstance(out["pixel_values"], list)
    assert out.pixel_values is out["pixel_values"]
    with pytest.raises(AttributeError):
        assert out.input_ids is None            # never reached
    arr = proc(x, return_tensors="np").pixel_values
    assert arr.shape == (2, 3, 224, 224)
    ragged = [x[0], x[1, :20]]
    assert [a.shape for a in proc(ragged, do_center_crop=False)["pixel_values"]] == \
        [(3, 224, 313), (3, 224, 784)]
    with pytest.raises(ArgumentError, match="return_tensors"):
        proc(ragged, do_center_crop=False, return_tensors="np")
    with pytest.raises(ArgumentError, match="return_tensors"):
        proc(x, return_tensors="tf")
    with pytest.raises(ArgumentError, match="unknown options"):
        proc(x, do_resize_please=True)


def test_return_tensors_pt_shares_memory():
    torch = pytest.importorskip("torch")
    x = np.random.default_rng(0).integers(0, 256, (3, 40, 60, 3), dtype=np.uint8)
    out = SiglipImageProcessor()(x, return_tensors="pt")
    t = out["pixel_values"]
    assert isinstance(t, torch.Tensor) and t.dtype == torch.float32 and tuple(t.shape) == \
        (3, 3, 224, 224)
    np.testing.assert_array_equal(t.numpy(), SiglipImageProcessor()(x, return_tensors="np")[
        "pixel_values"])
    w = WhisperFeatureExtractor()(_speech(1), return_tensors="pt", return_attention_mask=True)
    assert w["input_features"].dtype == torch.float32 and w["attention_mask"].dtype == torch.int32


def test_zero_copy_pt():
    torch = pytest.importorskip("torch")
    from mmcore.hf._output import to_tensors
    a = np.zeros((2, 3), np.float32)
    t = to_tensors("op", {"x": a}, "pt")["x"]
    assert isinstance(t, torch.Tensor)
    a[0, 0] = 5
    assert float(t[0, 0]) == 5.0                # from_numpy: the same memory


def test_from_pretrained_paths(tmp_path):
    d = write_config(tmp_path / "clip", CLIP)
    p1 = CLIPImageProcessor.from_pretrained(d)
    p2 = CLIPImageProcessor.from_pretrained(os.path.join(d, "preprocessor_config.json"))
    assert p1.to_dict() == p2.to_dict() and p1.size == 224 and p1.crop_size == 224
    assert isinstance(from_pretrained(d), CLIPImageProcessor)
    assert isinstance(from_pretrained(write_config(tmp_path / "w", WHISPER)),
                      WhisperFeatureExtractor)
    assert CLIPImageProcessor.from_pretrained(d, do_center_crop=False).do_center_crop is False
    missing = tmp_path / "empty"
    missing.mkdir()
    with pytest.raises(ConfigError, match="preprocessor_config.json"):
        CLIPImageProcessor.from_pretrained(missing)
    with pytest.raises(ConfigError, match="does not exist"):
        CLIPImageProcessor.from_pretrained(str(tmp_path / "nope" / "x.json"))
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        CLIPImageProcessor.from_pretrained(tmp_path / "bad.json")
    (tmp_path / "list.json").write_text("[1, 2]")
    with pytest.raises(ConfigError, match="JSON object"):
        WhisperFeatureExtractor.from_pretrained(tmp_path / "list.json")
    with pytest.raises(ConfigError, match="image_processor_type"):
        from_pretrained(write_config(tmp_path / "x", {"image_processor_type": "DetrProcessor"}))


def test_from_pretrained_hub_cache(tmp_path):
    """A hub id is looked up in the local cache only (a cache laid out as huggingface_hub's)."""
    pytest.importorskip("huggingface_hub")
    cache = tmp_path / "hub"
    snap = cache / "models--org--tiny-clip" / "snapshots" / ("a" * 40)
    write_config(snap, SIGLIP)
    (cache / "models--org--tiny-clip" / "refs").mkdir(parents=True)
    (cache / "models--org--tiny-clip" / "refs" / "main").write_text("a" * 40)
    proc = SiglipImageProcessor.from_pretrained("org/tiny-clip", cache_dir=str(cache))
    assert proc.size == {"height": 224, "width": 224}
    with pytest.raises(ConfigError, match="org/absent.*cache"):
        SiglipImageProcessor.from_pretrained("org/absent", cache_dir=str(cache))


@pytest.mark.parametrize("field, value", [
    ("resample", 4), ("resample", 5), ("resample", "bicubic"), ("do_pad", True),
    ("size", {"max_height": 100, "max_width": 100}), ("size", {"longest_edge": 100}),
    ("size", 0), ("crop_size", {"shortest_edge": 3}), ("image_std", [0.5, 0.0, 0.5]),
    ("image_mean", "imagenet"), ("data_format", "channels_last"), ("do_resize", "yes"),
    ("rescale_factor", float("nan")), ("input_data_format", "sideways"),
])
def test_unsupported_image_fields_are_named(field, value):
    with pytest.raises(ConfigError, match=rf"\[CLIPImageProcessor\] {field}"):
        CLIPImageProcessor(**{field: value})


@pytest.mark.parametrize("field, value", [
    ("n_fft", 512), ("hop_length", 320), ("sampling_rate", 8000), ("feature_size", 64),
    ("dither", 1e-4), ("padding_side", "middle"), ("chunk_length", 0),
    ("padding_value", float("inf")),
])
def test_unsupported_whisper_fields_are_named(field, value):
    with pytest.raises(ConfigError, match=rf"\[WhisperFeatureExtractor\] {field}"):
        WhisperFeatureExtractor(**{field: value})


def test_bad_image_inputs():
    proc = CLIPImageProcessor()
    with pytest.raises(ShapeError, match="empty"):
        proc(np.zeros((0, 5, 3), np.uint8), input_data_format="channels_last")
    with pytest.raises(ShapeError, match="no axis of 1, 3 or 4 channels"):
        proc(np.zeros((5, 6, 7), np.uint8))
    with pytest.raises(ShapeError, match="5 dims"):
        proc(np.zeros((1, 1, 5, 6, 3), np.uint8))
    with pytest.raises(ShapeError, match="outside"):
        proc(np.full((5, 6, 3), 300, np.int64))
    with pytest.raises(ShapeError, match="do_resize"):
        proc(np.full((5, 6, 3), 0.5, np.float32), do_resize=False)
    with pytest.raises(ArgumentError, match="images must be"):
        proc("photo.jpg")
    with pytest.raises(ShapeError, match="empty list"):
        proc([])
    # (3, H, W) is read channels-first, as transformers infers it; input_data_format overrides
    x = np.random.default_rng(1).integers(0, 256, (3, 40, 3), dtype=np.uint8)
    a = proc(x, return_tensors="np")["pixel_values"]
    b = proc(np.ascontiguousarray(x.transpose(1, 2, 0)), return_tensors="np")["pixel_values"]
    np.testing.assert_array_equal(a, b)
    c = proc(x, input_data_format="channels_last", return_tensors="np")["pixel_values"]
    assert not np.array_equal(a, c)


def test_bad_speech_inputs():
    fe = WhisperFeatureExtractor()
    with pytest.raises(ArgumentError, match="sampling_rate"):
        fe(_speech(1), sampling_rate=8000)
    with pytest.raises(ShapeError, match="more than 200"):
        fe(_speech(0.01), padding="longest")
    with pytest.raises(ShapeError, match="do_not_pad"):
        fe([_speech(1), _speech(0.5)], padding=False)
    with pytest.raises(ArgumentError, match="padding"):
        fe(_speech(1), padding="everything")
    with pytest.raises(ShapeError, match="3 dims"):
        fe(np.zeros((1, 2, 16000), np.float32))
    with pytest.raises(ShapeError, match="non-empty"):
        fe([np.zeros(0, np.float32)])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = fe(_speech(1))                    # no sampling_rate: fine, no warning
    assert out["input_features"].shape == (1, 80, 3000)
    assert WhisperFeatureExtractor(feature_size=128)(_speech(1))["input_features"].shape == \
        (1, 128, 3000)
