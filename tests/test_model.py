"""MultiModalModel, MultiModalInput and default_model."""

from __future__ import annotations

import threading

import numpy as np
import pytest

import mmcore
from mmcore.config import (
    AttentionFusion,
    CustomFusion,
    EarlyFusion,
    LateFusion,
    MiddleFusion,
    ModalityConfig,
    MultiModalConfig,
)
from mmcore.errors import ConfigError, ModalityError, ModelFormatError, ShapeError
from mmcore.modality import Modality
from mmcore.model import MultiModalInput, MultiModalModel, MultiModalOutput, default_model
from mmcore.model.model import LatencyStats, default_config
from mmcore.preprocess import (
    AudioPreprocessor,
    ImagePreprocessor,
    TextPreprocessor,
    VideoPreprocessor,
)

# short names of the modalities (I is the image one)
T, I, A, V = Modality.TEXT, Modality.IMAGE, Modality.AUDIO, Modality.VIDEO  # noqa: E741


@pytest.fixture(scope="module")
def model():
    return default_model(seed=0)


def _raw(batch=2, seed=0):
    rng = np.random.default_rng(seed)
    t = np.arange(16000, dtype=np.float32) / 16000
    texts = ["a photo of a cat", "tone"][:batch] + ["x" * k for k in range(max(0, batch - 2))]
    return {
        "text": texts,
        "image": rng.integers(0, 256, (batch, 40, 56, 3), dtype=np.uint8),
        "audio": [np.sin(2 * np.pi * (220 + 110 * i) * t[: 16000 - 4000 * (i % 2)]
                         ).astype(np.float32) * 0.5 for i in range(batch)],
        "video": rng.integers(0, 256, (batch, 12, 36, 44, 3), dtype=np.uint8),
    }


def test_default_model_all_modalities_shapes(model):
    out = model.infer(MultiModalInput(_raw()), return_weights=True)
    assert isinstance(out, MultiModalOutput)
    assert out.fused.shape == (2, 64) and out.fused.dtype == np.float32
    assert np.isfinite(out.fused).all()
    assert set(out.embeddings) == {T, I, A, V}
    assert out.embeddings[I].shape == (2, 16, 64)
    assert out.embeddings[A].shape == (2, 50, 64)
    assert out.embeddings[V].shape == (2, 16, 64)
    assert out.embeddings[T].shape[::2] == (2, 64)
    for m in (T, I, A, V):
        assert out.pooled[m].shape == (2, 64)
        assert out.masks[m].shape == out.embeddings[m].shape[:2]
    # the shorter tone has fewer real audio tokens
    assert out.masks[A][1].sum() < out.masks[A][0].sum()
    assert out.attention_weights[T].shape == (2, out.embeddings[T].shape[1])
    assert (T, I) in out.attention_weights
    for stage in ("preprocess:text", "encode:video", "fusion", "total"):
        assert out.stats[stage] >= 0


def test_single_items_and_dict_input(model):
    out = model.infer({"text": "hello", "image": np.zeros((30, 30, 3), np.uint8),
                       "audio": np.zeros(3200, np.float32),
                       "video": np.zeros((5, 32, 32, 3), np.uint8)})
    assert out.fused.shape == (1, 64)


def test_preprocessed_inputs_match_raw(model):
    raw = _raw()
    cfg = model.config
    txt = TextPreprocessor.from_config(cfg.modalities[T].preprocessing)(raw["text"])
    img = ImagePreprocessor(cfg.modalities[I].preprocessing)(raw["image"])
    aud = AudioPreprocessor(cfg.modalities[A].preprocessing)(raw["audio"])
    vpre = VideoPreprocessor(cfg.modalities[V].preprocessing)
    vid = np.stack([vpre(c)["pixel_values"] for c in raw["video"]])
    pre = MultiModalInput(
        {"text": txt["input_ids"], "image": img["pixel_values"],
         "audio": aud["input_features"], "video": vid},
        attention_masks={"text": txt["attention_mask"], "audio": aud["attention_mask"]})
    assert pre.raw == {T: False, I: False, A: False, V: False}
    a = model.infer(MultiModalInput(raw))
    b = model.infer(pre)
    np.testing.assert_allclose(a.fused, b.fused, rtol=1e-6, atol=1e-6)
    # preprocessor output dicts are accepted as they are
    c = model.infer({"text": txt, "audio": aud, "image": img, "video": vid})
    np.testing.assert_allclose(a.fused, c.fused, rtol=1e-6, atol=1e-6)


def test_missing_modality_degrades(model):
    raw = _raw()
    out = model.infer({"text": raw["text"], "audio": raw["audio"]})
    assert out.fused.shape == (2, 64) and set(out.pooled) == {T, A}
    full = model.infer(raw)
    assert not np.allclose(out.fused, full.fused)
    # pooled embeddings of a modality do not depend on the others (no cross-attention on audio)
    np.testing.assert_allclose(out.pooled[A], full.pooled[A], rtol=1e-5, atol=1e-6)


def test_required_modality_missing():
    cfg = default_config()
    mods = dict(cfg.modalities)
    mods[T] = mods[T].replace(required=True)
    m = MultiModalModel(cfg.replace(modalities=mods), seed=0)
    with pytest.raises(ModalityError, match="required"):
        m.infer({"image": np.zeros((32, 32, 3), np.uint8)})
    assert m.infer({"text": ["ok"]}).fused.shape == (1, 64)
    with pytest.raises(ConfigError):
        m.disable("text")


def test_unknown_and_disabled_modalities():
    m = default_model(seed=1)
    with pytest.raises(ModalityError):
        MultiModalInput({"smell": [1.0]})
    with pytest.raises(ModalityError, match="does not have"):
        m.infer({"text": ["a"], "custom:3": np.zeros((1, 2, 4), np.float32)})
    m.disable("image")
    # inputs of a disabled modality are ignored: the fusion runs over the enabled ones
    img = np.zeros((32, 32, 3), np.uint8)
    out = m.infer({"text": ["a"], "image": img})
    assert set(out.embeddings) == {T}
    np.testing.assert_array_equal(out.fused, m.infer({"text": ["a"]}).fused)
    with pytest.raises(ModalityError, match="no input for any enabled modality"):
        m.infer({"image": img})
    with pytest.raises(ModalityError):
        m.infer({})


def test_enable_disable_at_run_time():
    m = default_model(seed=2)
    img = np.full((32, 32, 3), 100, np.uint8)
    before = m.infer({"text": ["a"], "image": img}).fused
    m.disable(I)
    assert I not in m.enabled_modalities
    only_text = m.infer({"text": ["a"]}).fused
    m.enable("image")
    assert I in m.enabled_modalities
    np.testing.assert_array_equal(m.infer({"text": ["a"], "image": img}).fused, before)
    assert not np.allclose(only_text, before)
    with pytest.raises(ModalityError):
        m.enable("custom:9")


def test_input_validation():
    with pytest.raises(ShapeError, match="batch size"):
        MultiModalInput({"text": ["a", "b"], "image": np.zeros((3, 8, 8, 3), np.uint8)})
    with pytest.raises(ShapeError, match="batch_size"):
        MultiModalInput({"text": ["a", "b"]}, batch_size=3)
    with pytest.raises(ShapeError):
        MultiModalInput({"image": np.zeros((8, 8), np.float32)})
    with pytest.raises(ShapeError, match="preprocessed"):
        MultiModalInput({"text": ["a"]}, attention_masks={"text": [[1]]})
    with pytest.raises(ModalityError):
        MultiModalInput({"text": ["a"]}, attention_masks={"image": [[1]]})
    inp = MultiModalInput({"audio": np.zeros((3, 100), np.float32)})
    assert inp.batch_size == 3 and inp.raw[A]
    assert MultiModalInput({"audio": np.zeros((3, 80, 10), np.float32)}).raw == {A: False}


def test_determinism_same_seed():
    raw = _raw(seed=3)
    a = default_model(seed=5).infer(raw).fused
    b = default_model(seed=5).infer(raw).fused
    np.testing.assert_array_equal(a, b)
    c = default_model(seed=6).infer(raw).fused
    assert not np.allclose(a, c)


def test_concurrent_infer_matches_serial(model):
    requests = [_raw(batch=1 + i % 2, seed=i) for i in range(8)]
    serial = [model.infer(r).fused for r in requests]
    results = [None] * 8
    errors = []
    barrier = threading.Barrier(8)

    def work(i):
        try:
            barrier.wait()
            for _ in range(2):
                results[i] = model.infer(requests[i]).fused
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    for s, r in zip(serial, results):
        np.testing.assert_allclose(r, s, rtol=1e-5, atol=1e-6)


@pytest.fixture(scope="module")
def small_raw():
    raw = _raw()
    return raw


@pytest.mark.parametrize("fusion", [
    EarlyFusion(), MiddleFusion(fusion_layer=1), LateFusion("mean"), LateFusion("concat"),
    LateFusion("weighted"), LateFusion("attention"), AttentionFusion(attention_dim=32,
                                                                     num_heads=4),
    CustomFusion(lambda pooled: sum(pooled.values()) / len(pooled)),
], ids=lambda f: f.TYPE + (":" + f.reduce if isinstance(f, LateFusion) else ""))
def test_every_fusion_strategy(fusion, small_raw):
    m = default_model(seed=0, fusion=fusion, num_layers=2)
    out = m.infer(small_raw, return_weights=True)
    assert out.fused.shape == (2, m.output_dim) and np.isfinite(out.fused).all()
    assert out.attention_weights is not None
    for mod in (T, I, A, V):
        assert out.pooled[mod].shape[0] == 2
        assert out.embeddings[mod].shape[:2] == out.masks[mod].shape
    part = m.infer({"text": small_raw["text"], "video": small_raw["video"]})
    assert part.fused.shape == (2, m.output_dim)
    assert set(part.pooled) == {T, V}


def test_stats_counts_and_percentiles():
    m = default_model(seed=0)
    raw = {"text": ["abc", "de"], "image": np.zeros((2, 32, 32, 3), np.uint8)}
    for _ in range(5):
        m.infer(raw)
    m.infer({"text": ["x"]})
    s = m.stats()
    assert s["total"]["count"] == 6 and s["total"]["items"] == 11
    assert s["preprocess:text"]["count"] == 6 and s["encode:image"]["count"] == 5
    assert s["fusion"]["count"] == 6
    for st in s.values():
        assert 0 <= st["p50_s"] <= st["p95_s"] and st["total_s"] > 0
    assert "encode:audio" not in s
    m.reset_stats()
    assert m.stats() == {}

    ls = LatencyStats(window=3)
    for v in (10.0, 1.0, 2.0, 3.0):
        ls.record("x", v)
    snap = ls.snapshot()["x"]
    assert snap["count"] == 4 and snap["total_s"] == 16.0 and snap["p50_s"] == 2.0
    with pytest.raises(ConfigError):
        LatencyStats(window=0)


def test_prometheus_collector():
    prom = pytest.importorskip("prometheus_client")
    m = default_model(seed=0)
    m.infer({"text": ["a"]})
    reg = prom.CollectorRegistry()
    reg.register(m.prometheus_collector())
    text = prom.generate_latest(reg).decode()
    assert 'mmcore_model_stage_seconds_count{stage="total"} 1.0' in text


def test_state_dict_round_trip():
    a = default_model(seed=0)
    b = default_model(seed=1)
    sd = a.state_dict()
    assert any(k.startswith("encoders.text.") for k in sd)
    assert any(k.startswith("encoders.video.") for k in sd)
    assert any(k.startswith("fusion.") for k in sd)
    raw = _raw()
    assert not np.allclose(a.infer(raw).fused, b.infer(raw).fused)
    b.load_state_dict(sd)
    np.testing.assert_array_equal(a.infer(raw).fused, b.infer(raw).fused)
    bad = dict(sd)
    bad.pop(next(iter(bad)))
    with pytest.raises(ModelFormatError):
        b.load_state_dict(bad)


def test_external_encoder_and_lazy_import():
    cfg = MultiModalConfig(
        [ModalityConfig("text", embed_dim=16, preprocessing={"max_length": 8},
                        encoder_config={"num_layers": 1, "num_heads": 2}),
         ModalityConfig("custom:1", embed_dim=16, encoder="external")],
        fusion=LateFusion("mean"))
    with pytest.raises(ConfigError, match="encoders="):
        MultiModalModel(cfg, seed=0)

    def ext(x, *, attention_mask=None):
        x = np.asarray(x, np.float32)
        mask = np.ones(x.shape[:2], bool)
        return x, mask, x.mean(axis=1)

    m = MultiModalModel(cfg, seed=0, encoders={"custom:1": ext})
    feats = np.ones((2, 3, 16), np.float32)
    out = m.infer({"text": ["a", "b"], "custom:1": feats})
    assert out.fused.shape == (2, 16)
    np.testing.assert_allclose(out.pooled[Modality.custom(1)], 1.0)
    assert mmcore.default_model is default_model
    assert mmcore.MultiModalModel is MultiModalModel


def test_constructor_errors():
    with pytest.raises(ConfigError):
        MultiModalModel({"modalities": []})
    with pytest.raises(ConfigError):
        MultiModalModel(default_config(), seed=0, rng=0)
    with pytest.raises(ModalityError):
        MultiModalModel(default_config(), encoders={"custom:4": lambda x: x})
