"""MultiModalModel.save / from_pretrained and MultiModalLoader."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

import mmcore
from mmcore.errors import ConfigError, ModalityError, ModelFormatError, ShapeError
from mmcore.model import MultiModalLoader, MultiModalModel, default_config, default_model
from mmcore.model import io as mio
from mmcore.model.io import dir_nbytes, load_model_dir, save_model_dir


def _inputs():
    rng = np.random.default_rng(0)
    return {"text": ["a cat", "a dog on a mat"],
            "image": rng.integers(0, 256, (2, 48, 48, 3)).astype(np.uint8),
            "audio": (rng.standard_normal((2, 8000)) * 0.1).astype(np.float32),
            "video": rng.integers(0, 256, (2, 8, 32, 32, 3)).astype(np.uint8)}


def _quantized(model, mode):
    cfg = model.config
    mods = {m: mc.replace(quantization=mode) for m, mc in cfg.modalities.items()}
    q = MultiModalModel(cfg.replace(modalities=mods), seed=0)
    q.load_state_dict(model.state_dict())
    return q


@pytest.fixture(scope="module")
def base():
    return default_model(seed=0)


@pytest.fixture(scope="module")
def saved(base, tmp_path_factory):
    path = str(tmp_path_factory.mktemp("models") / "f32")
    base.save(path)
    return path


@pytest.fixture(scope="module")
def small_dir(tmp_path_factory):
    """A small model directory and its config/state, for corrupting."""
    model = default_model(seed=2, embed_dim=32, num_layers=1)
    path = str(tmp_path_factory.mktemp("small") / "m")
    model.save(path)
    return path, model


# ----------------------------------------------------------------------------------------------
# save / from_pretrained


def test_round_trip_float32_is_exact(base, saved):
    meta = json.load(open(os.path.join(saved, "mmcore.json")))
    assert meta["name"] == base.config.name and meta["version"] == base.config.version
    assert all(e["quantization"] is None for e in meta["tensors"].values())
    loaded = MultiModalModel.from_pretrained(saved)
    assert loaded.config == base.config
    a, b = base.infer(_inputs()), loaded.infer(_inputs())
    np.testing.assert_array_equal(a.fused, b.fused)
    for m in a.pooled:
        np.testing.assert_array_equal(a.pooled[m], b.pooled[m])
    sd = loaded.state_dict()
    for k, v in base.state_dict().items():
        np.testing.assert_array_equal(sd[k], v)


def test_save_returns_metadata_and_name(base, tmp_path):
    meta = base.save(tmp_path / "m", name="demo", version="7")
    assert meta["name"] == "demo" and meta["version"] == "7"
    assert sorted(meta["modalities"]) == sorted(str(m) for m in base.modalities)
    _, _, on_disk = load_model_dir(tmp_path / "m")
    assert on_disk["tensors"] == meta["tensors"]


@pytest.mark.parametrize("mode", ["float16", "bfloat16", "int8"])
def test_round_trip_quantized(base, saved, mode, tmp_path):
    q = _quantized(base, mode)
    meta = q.save(tmp_path / mode)
    for key, e in meta["tensors"].items():
        if key.startswith("fusion."):
            assert e["quantization"] is None, key           # fusion stays float32
        elif key.startswith("encoders.") and len(e["shape"]) >= 2:
            assert e["quantization"] == mode, key
    assert dir_nbytes(tmp_path / mode) < 0.65 * dir_nbytes(saved)
    if mode == "int8":
        assert dir_nbytes(tmp_path / mode) < 0.4 * dir_nbytes(saved)
    loaded = MultiModalModel.from_pretrained(tmp_path / mode)
    assert loaded.config.modalities[loaded.modalities[0]].quantization == mode
    # weight errors within the tolerances documented in mmcore.model.io
    orig, back = base.state_dict(), loaded.state_dict()
    for key, w in orig.items():
        if meta["tensors"][key]["quantization"] is None:
            np.testing.assert_array_equal(back[key], w)
            continue
        err = np.abs(back[key] - w)
        if mode == "float16":
            assert (err <= np.abs(w) * 2.0 ** -11 + 3e-8).all(), key
        elif mode == "bfloat16":
            assert (err <= np.abs(w) * 2.0 ** -8 + 1e-30).all(), key
        else:
            bound = np.abs(w).reshape(w.shape[0], -1).max(axis=1) / 254 * (1 + 1e-5) + 1e-8
            assert (err.reshape(w.shape[0], -1) <= bound[:, None]).all(), key
    ref = base.infer(_inputs()).fused
    out = loaded.infer(_inputs()).fused
    tol = {"float16": 2e-3, "bfloat16": 1e-2, "int8": 2e-2}[mode] * float(np.abs(ref).max())
    assert np.abs(out - ref).max() <= tol


def test_save_with_tokenizer_file(base, tmp_path):
    tok = tmp_path / "tokenizer.json"
    tok.write_text('{"model": {}}')
    meta = base.save(tmp_path / "m", tokenizer=tok)
    assert "tokenizer.json" in meta["files"]
    assert (tmp_path / "m" / "tokenizer.json").read_text() == '{"model": {}}'
    MultiModalModel.from_pretrained(tmp_path / "m")  # byte tokenizer config: unchanged


def test_atomic_save_keeps_previous_directory(base, tmp_path, monkeypatch):
    path = tmp_path / "m"
    base.save(path)
    before = {f: (path / f).read_bytes() for f in os.listdir(path)}
    other = default_model(seed=5)

    def boom(_path):
        raise OSError("disk full")

    monkeypatch.setattr(mio, "_fsync_dir", boom)
    with pytest.raises(OSError, match="disk full"):
        other.save(path)
    monkeypatch.undo()
    assert {f: (path / f).read_bytes() for f in os.listdir(path)} == before
    assert sorted(os.listdir(tmp_path)) == ["m"]          # no temporary directory left behind
    loaded = MultiModalModel.from_pretrained(path)
    np.testing.assert_array_equal(loaded.infer(_inputs()).fused, base.infer(_inputs()).fused)


# ----------------------------------------------------------------------------------------------
# corrupt directories


def _resave(src, dst, *, config=None, state_fn=None):
    cfg, state, meta = load_model_dir(src)
    if config is not None:
        cfg = config(cfg)
    if state_fn is not None:
        state = state_fn(dict(state))
    save_model_dir(dst, config=cfg, state=state, name=meta["name"], version=meta["version"])
    return dst


def _no_model(path, match):
    result = None
    with pytest.raises(ModelFormatError, match=match):
        result = MultiModalModel.from_pretrained(path)
    assert result is None
    with pytest.raises(ModelFormatError, match=match):
        result = MultiModalLoader().with_weights(path).load()
    assert result is None


def test_truncated_weights(small_dir, tmp_path):
    src, _ = small_dir
    dst = _resave(src, str(tmp_path / "t"))
    wpath = os.path.join(dst, "model.safetensors")
    data = open(wpath, "rb").read()
    open(wpath, "wb").write(data[: len(data) // 2])
    _no_model(dst, "model.safetensors")


def test_missing_tensor(small_dir, tmp_path):
    src, model = small_dir
    key = next(k for k in model.state_dict() if k.startswith("encoders.image."))
    dst = _resave(src, str(tmp_path / "t"), state_fn=lambda s: {k: v for k, v in s.items()
                                                                if k != key})
    _no_model(dst, repr(key).replace("[", r"\[").replace(".", r"\."))


def test_wrong_shape(small_dir, tmp_path):
    src, model = small_dir
    key = next(k for k, v in model.state_dict().items()
               if k.startswith("encoders.text.") and v.ndim == 2)

    def fn(s):
        s[key] = np.zeros((s[key].shape[0] + 1, s[key].shape[1]), np.float32)
        return s
    dst = _resave(src, str(tmp_path / "t"), state_fn=fn)
    _no_model(dst, "shape")


def test_unknown_modality_in_file(small_dir, tmp_path):
    src, _ = small_dir

    def fn(s):
        s["encoders.custom:9.proj.weight"] = np.zeros((4, 4), np.float32)
        return s
    dst = _resave(src, str(tmp_path / "t"), state_fn=fn)
    _no_model(dst, "custom:9")


def test_invalid_config_in_file(small_dir, tmp_path):
    src, _ = small_dir

    def bad(cfg):
        cfg["modalities"]["text"]["embed_dim"] = -3
        return cfg
    dst = _resave(src, str(tmp_path / "t"), config=bad)
    _no_model(dst, "embed_dim")


def test_missing_directory(tmp_path):
    with pytest.raises(ModelFormatError):
        MultiModalModel.from_pretrained(tmp_path / "nope")


# ----------------------------------------------------------------------------------------------
# MultiModalLoader


def test_loader_with_weights_matches_from_pretrained(base, saved):
    model = MultiModalLoader().with_weights(saved).load()
    assert isinstance(model, MultiModalModel)
    np.testing.assert_array_equal(model.infer(_inputs()).fused, base.infer(_inputs()).fused)
    # an explicit config takes the same weights
    model2 = MultiModalLoader(base.config, {"verify": False}).with_weights(saved).load()
    np.testing.assert_array_equal(model2.infer(_inputs()).fused, base.infer(_inputs()).fused)


def test_loader_seed_without_weights():
    a = MultiModalLoader(default_config(), {"seed": 4}).load()
    b = default_model(seed=4)
    np.testing.assert_array_equal(a.infer(_inputs()).fused, b.infer(_inputs()).fused)


def test_with_modality_path_swaps_one_modality(base, saved, tmp_path):
    other = default_model(seed=9)
    other.save(tmp_path / "other")
    model = (MultiModalLoader().with_weights(saved)
             .with_modality_path("image", tmp_path / "other").load())
    sd, sd_base, sd_other = model.state_dict(), base.state_dict(), other.state_dict()
    for k, v in sd.items():
        expect = sd_other[k] if k.startswith("encoders.image.") else sd_base[k]
        np.testing.assert_array_equal(v, expect, err_msg=k)
    assert any(not np.array_equal(sd[k], sd_base[k]) for k in sd if k.startswith("encoders.image."))
    # audio still runs the base model's encoder
    out = model.infer(_inputs())
    np.testing.assert_array_equal(out.embeddings[mmcore.Modality("audio")],
                                  base.infer(_inputs()).embeddings[mmcore.Modality("audio")])


def test_with_modality_path_from_single_modality_dir(base, tmp_path):
    from mmcore.config import LateFusion
    cfg = base.config
    text_only = cfg.replace(modalities={m: mc for m, mc in cfg.modalities.items()
                                        if str(m) == "text"},
                            fusion=LateFusion(), cross_attention=None)
    t = MultiModalModel(text_only, seed=11)
    t.save(tmp_path / "text")
    model = MultiModalLoader(cfg).with_modality_path("text", tmp_path / "text").load()
    for k, v in t.state_dict().items():
        np.testing.assert_array_equal(model.state_dict()[k], v)
    with pytest.raises(ModelFormatError, match="no modality 'image'"):
        MultiModalLoader(cfg).with_modality_path("image", tmp_path / "text").load()


def test_with_modality_path_dims_mismatch(small_dir, base):
    src, _ = small_dir                                   # embed_dim 32, one layer
    result = None
    with pytest.raises(ModelFormatError, match="embed_dim"):
        result = MultiModalLoader(base.config).with_modality_path("text", src).load()
    assert result is None


def test_builder_validates_eagerly(base, tmp_path):
    loader = MultiModalLoader(base.config)
    assert loader.with_encoder("audio", lambda x: x) is loader
    with pytest.raises(ModalityError):
        loader.with_modality_path("custom:3", tmp_path)
    with pytest.raises(ModalityError):
        loader.with_encoder("smell", lambda x: x)
    with pytest.raises(ModelFormatError, match="does not exist"):
        loader.with_modality_path("text", tmp_path / "missing")
    with pytest.raises(ModelFormatError, match="mmcore.json"):
        loader.with_weights(tmp_path)                   # exists, but not a model directory
    with pytest.raises(ConfigError):
        loader.with_encoder("audio", 42)
    with pytest.raises(ConfigError):
        MultiModalLoader(base.config, {"verfy": True})
    with pytest.raises(ConfigError, match="no config"):
        MultiModalLoader().load()


def test_with_encoder_toy_callables(base):
    calls = []

    def pooled(x):                                       # (B, D)
        calls.append(np.shape(x))
        return np.full((len(x), 64), 0.5, np.float32)

    def tokens(x, attention_mask=None):                  # (tokens, mask)
        B = np.shape(x)[0]
        t = np.ones((B, 3, 64), np.float32)
        return t, np.ones((B, 3), bool)

    model = (MultiModalLoader(base.config).with_encoder("audio", pooled)
             .with_encoder("video", tokens).load())
    out = model.infer(_inputs())
    A, V = mmcore.Modality("audio"), mmcore.Modality("video")
    assert calls and calls[0][0] == 2
    assert out.embeddings[A].shape == (2, 1, 64)
    np.testing.assert_allclose(out.pooled[A], 0.5)
    assert out.embeddings[V].shape == (2, 3, 64)
    np.testing.assert_allclose(out.pooled[V], 1.0)
    assert out.fused.shape == (2, 64)
    assert not any(k.startswith(("encoders.audio.", "encoders.video."))
                   for k in model.state_dict())

    bad = MultiModalLoader(base.config).with_encoder("audio", lambda x: np.ones((len(x), 7))
                                                     ).load()
    with pytest.raises(ShapeError, match="audio"):
        bad.infer({"audio": _inputs()["audio"]})


def test_with_encoder_ignores_file_tensors_of_that_modality(base, saved):
    model = (MultiModalLoader().with_weights(saved)
             .with_encoder("audio", lambda x: np.zeros((len(x), 64), np.float32)).load())
    sd = base.state_dict()
    for k, v in model.state_dict().items():
        np.testing.assert_array_equal(v, sd[k])


def test_verify_option(small_dir, tmp_path):
    src, _ = small_dir
    dst = _resave(src, str(tmp_path / "t"))
    wpath = os.path.join(dst, "model.safetensors")
    data = bytearray(open(wpath, "rb").read())
    data[-4] ^= 1                                         # lowest byte of the last float
    open(wpath, "wb").write(bytes(data))
    with pytest.raises(ModelFormatError, match="checksum"):
        MultiModalLoader().with_weights(dst).load()
    assert isinstance(MultiModalLoader(None, {"verify": False}).with_weights(dst).load(),
                      MultiModalModel)


def test_with_distributed_checks_the_config(base):
    with pytest.warns(DeprecationWarning, match="with_distributed is deprecated"):
        loader = MultiModalLoader(base.config).with_distributed({"nodes": 2})
    with pytest.raises(ConfigError, match="DistributedConfig"):
        loader.load()
    with pytest.raises(ConfigError, match="None"), pytest.warns(DeprecationWarning):
        MultiModalLoader(base.config).with_distributed(None)


def test_lazy_top_level_export():
    code = ("import sys, mmcore; assert 'mmcore.model' not in sys.modules; "
            "L = mmcore.MultiModalLoader; assert 'mmcore.model' in sys.modules; "
            "from mmcore.model import MultiModalLoader; assert L is MultiModalLoader; "
            "assert 'MultiModalLoader' in dir(mmcore)")
    subprocess.run([sys.executable, "-c", code], check=True)
