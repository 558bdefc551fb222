"""Per-item caching of encoder outputs in MultiModalModel.infer."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from mmcore.config import CacheConfig, LateFusion, MiddleFusion
from mmcore.modality import Modality
from mmcore.model import MultiModalInput, MultiModalModel, default_model
from mmcore.model.encoders import ModalityEncoder
from mmcore.model.model import default_config

# short names of the modalities (I is the image one)
T, I, A, V = Modality.TEXT, Modality.IMAGE, Modality.AUDIO, Modality.VIDEO  # noqa: E741

# the encoders mask padding, so an item's outputs do not depend on the other items of its
# batch; floating-point kernels may still round differently for other batch shapes
ATOL, RTOL = 1e-5, 1e-5


def _items(n, seed=0):
    rng = np.random.default_rng(seed)
    t = np.arange(16000, dtype=np.float32) / 16000
    return {
        "text": ["a photo of a cat", "tone", "x" * 30, "dog"][:n] + ["y" * k for k in range(n - 4)],
        "image": rng.integers(0, 256, (n, 40, 56, 3), dtype=np.uint8),
        "audio": [(np.sin(2 * np.pi * (220 + 110 * i) * t[: 16000 - 4000 * (i % 2)]) * 0.5
                   ).astype(np.float32) for i in range(n)],
        "video": rng.integers(0, 256, (n, 6, 36, 44, 3), dtype=np.uint8),
    }


def _subset(inputs, idx):
    out = {}
    for k, v in inputs.items():
        out[k] = [v[i] for i in idx] if isinstance(v, list) else v[np.asarray(idx)]
    return out


def _assert_same(a, b, exact=False):
    check = (np.testing.assert_array_equal if exact else
             lambda x, y: np.testing.assert_allclose(x, y, rtol=RTOL, atol=ATOL))
    check(a.fused, b.fused)
    assert set(a.embeddings) == set(b.embeddings)
    for m in a.embeddings:
        assert a.embeddings[m].shape == b.embeddings[m].shape
        np.testing.assert_array_equal(a.masks[m], b.masks[m])
        check(a.embeddings[m], b.embeddings[m])
        check(a.pooled[m], b.pooled[m])


@pytest.fixture(scope="module", params=["attention", "late-mean", "late-concat"])
def pair(request):
    fusion = {"attention": None, "late-mean": LateFusion("mean"),
              "late-concat": LateFusion("concat")}[request.param]
    cfg = default_config(fusion=fusion)
    return MultiModalModel(cfg, seed=3), MultiModalModel(cfg, seed=3, cache=False)


def test_cache_on_by_default():
    m = default_model(seed=0)
    assert m.cache is not None
    st = m.cache_stats()
    assert st["enabled"] is True
    assert st["total"]["global_budget_bytes"] == m.config.cache.global_budget_bytes


def test_identical_with_and_without_cache_all_modalities(pair):
    cached, plain = pair
    cached.clear_cache()
    full = _items(4)
    # warm with some items, in other batches of other shapes
    cached.infer(_subset(full, [1]))
    cached.infer(_subset(full, [3, 0]))
    for idx in ([0, 1, 2, 3], [2, 1], [3]):
        inp = _subset(full, idx)
        ref = plain.infer(inp)
        got = cached.infer(inp)
        # every kernel treats batch rows independently and in a fixed order: bit-identical
        _assert_same(got, ref, exact=True)
        again = cached.infer(inp)
        _assert_same(again, got, exact=True)
    assert cached.cache_stats()["total"]["hits"] > 0


def test_cold_cache_is_bit_identical(pair):
    cached, plain = pair
    cached.clear_cache()
    inp = _items(3, seed=5)
    _assert_same(cached.infer(inp), plain.infer(inp), exact=True)


def test_preprocessed_inputs_are_cached():
    cached, plain = default_model(seed=1), default_model(seed=1, cache=False)
    rng = np.random.default_rng(0)
    px = rng.standard_normal((4, 3, 64, 64)).astype(np.float32)
    ids = rng.integers(0, 256, (4, 10))
    am = np.ones((4, 10), np.int64)
    am[1, 6:] = 0
    inp = MultiModalInput({"image": px, "text": ids}, attention_masks={"text": am})
    cached.infer(MultiModalInput({"image": px[:2], "text": ids[:2]},
                                 attention_masks={"text": am[:2]}))
    _assert_same(cached.infer(inp), plain.infer(inp))
    st = cached.cache_stats()["caches"]
    assert st["image"]["hits"] == 2 and st["text"]["hits"] == 2


def test_three_of_four_images_seen_encode_one(monkeypatch):
    model = default_model(seed=0)
    imgs = np.random.default_rng(1).integers(0, 256, (4, 48, 48, 3), dtype=np.uint8)
    model.infer({"image": imgs[:3]})
    calls = []
    orig = ModalityEncoder.__call__

    def counting(self, inputs, *, attention_mask=None):
        calls.append((self.modality, int(np.shape(inputs)[0])))
        return orig(self, inputs, attention_mask=attention_mask)

    monkeypatch.setattr(ModalityEncoder, "__call__", counting)
    before = model.cache_stats()["caches"]["image"]
    out = model.infer({"image": imgs})
    after = model.cache_stats()["caches"]["image"]
    assert calls == [(I, 1)]
    assert after["hits"] - before["hits"] == 3
    assert after["misses"] - before["misses"] == 1
    calls.clear()
    out2 = model.infer({"image": imgs[::-1]})
    assert calls == []
    np.testing.assert_array_equal(out2.pooled[I], out.pooled[I][::-1])


def test_duplicates_in_one_batch_encode_once(monkeypatch):
    model = default_model(seed=0)
    calls = []
    orig = ModalityEncoder.__call__

    def counting(self, inputs, *, attention_mask=None):
        calls.append(int(np.shape(inputs)[0]))
        return orig(self, inputs, attention_mask=attention_mask)

    monkeypatch.setattr(ModalityEncoder, "__call__", counting)
    out = model.infer({"text": ["same", "same", "other", "same"]})
    assert calls == [2]
    np.testing.assert_array_equal(out.pooled[T][0], out.pooled[T][3])


def test_cache_disabled(monkeypatch):
    off = default_model(seed=0).__class__(default_config(), seed=0, cache=False)
    assert off.cache is None
    assert off.cache_stats()["enabled"] is False
    off.clear_cache()
    cfg = default_config().replace(cache=CacheConfig(enabled=False))
    off2 = MultiModalModel(cfg, seed=0)
    assert off2.cache is None
    imgs = np.zeros((2, 32, 32, 3), np.uint8)
    calls = []
    orig = ModalityEncoder.__call__

    def counting(self, inputs, *, attention_mask=None):
        calls.append(int(np.shape(inputs)[0]))
        return orig(self, inputs, attention_mask=attention_mask)

    monkeypatch.setattr(ModalityEncoder, "__call__", counting)
    a = off2.infer({"image": imgs})
    b = off2.infer({"image": imgs})
    assert calls == [2, 2]
    np.testing.assert_array_equal(a.fused, b.fused)


def test_budget_from_config():
    cfg = default_config().replace(cache=CacheConfig(global_budget_bytes=1 << 20))
    model = MultiModalModel(cfg, seed=0)
    assert model.cache.global_budget_bytes == 1 << 20
    model.infer(_items(4))
    assert model.cache.bytes <= 1 << 20


def test_load_state_dict_changes_identity():
    a, b = default_model(seed=0), default_model(seed=1)
    img = np.random.default_rng(2).integers(0, 256, (1, 48, 48, 3), dtype=np.uint8)
    old = a.identity
    before = a.infer({"image": img}).pooled[I]
    a.load_state_dict(b.state_dict())
    assert a.identity != old and a.identity == b.identity
    after = a.infer({"image": img}).pooled[I]
    np.testing.assert_array_equal(after, default_model(seed=1, cache=False)
                                  .infer({"image": img}).pooled[I])
    assert not np.array_equal(before, after)
    assert a.cache_stats()["caches"]["image"]["hits"] == 0


def test_middle_fusion_not_cached_but_correct():
    cfg = default_config(fusion=MiddleFusion(fusion_layer=1))
    cached, plain = MultiModalModel(cfg, seed=0), MultiModalModel(cfg, seed=0, cache=False)
    inp = _items(2)
    _assert_same(cached.infer(inp), plain.infer(inp), exact=True)
    assert cached.cache_stats()["total"]["items"] == 0


def test_concurrent_overlapping_items():
    model, plain = default_model(seed=0), default_model(seed=0, cache=False)
    full = _items(6, seed=9)
    batches = [[0, 1, 2], [1, 2, 3], [2, 3, 4, 5], [0, 5], [4, 1]] * 3
    refs = {tuple(b): plain.infer(_subset(full, b)) for b in batches}
    errors = []

    def worker(bs):
        try:
            for b in bs:
                _assert_same(model.infer(_subset(full, b)), refs[tuple(b)])
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(batches[i::4],)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors[0]
    assert model.cache_stats()["total"]["hits"] > 0


# ----------------------------------------------------------------------------------------------
# the per-item fusion result cache


@pytest.mark.parametrize("fusion", [None, LateFusion("mean"), LateFusion("attention")])
def test_fusion_results_are_cached_per_item_and_exact(fusion):
    kw = {} if fusion is None else {"fusion": fusion}
    cached, plain = default_model(seed=4, **kw), default_model(seed=4, cache=False, **kw)
    full = _items(4, seed=11)
    cached.infer(_subset(full, [0, 2]))
    before = cached.cache_stats()["caches"]["fusion"]
    got = cached.infer(full)
    after = cached.cache_stats()["caches"]["fusion"]
    assert after["hits"] - before["hits"] == 2          # items 0 and 2
    assert after["misses"] - before["misses"] == 2      # items 1 and 3
    want = plain.infer(full)
    np.testing.assert_array_equal(got.fused, want.fused)
    # a row fuses to the same bits whatever batch (and padding) it came with
    for idx in ([3, 1], [2], [1, 0, 3]):
        np.testing.assert_array_equal(cached.infer(_subset(full, idx)).fused, want.fused[idx])
        np.testing.assert_array_equal(plain.infer(_subset(full, idx)).fused, want.fused[idx])


def test_fusion_cache_can_be_switched_off_and_weights_bypass_it():
    from mmcore.cache import CacheManager
    from mmcore.config import CachePolicy
    cfg = default_config()
    mgr = CacheManager(cfg.cache, fusion_policy=CachePolicy(enabled=False))
    model = MultiModalModel(cfg, seed=0, cache=mgr)
    full = _items(2, seed=12)
    model.infer(full)
    model.infer(full)
    st = model.cache_stats()["caches"]
    assert st["fusion"]["items"] == 0 and st["fusion"]["hits"] == 0
    assert st["text"]["hits"] == 2                       # the encoder outputs still hit
    on = default_model(seed=0)
    on.infer(full)
    hits = on.cache_stats()["caches"]["fusion"]["hits"]
    out = on.infer(full, return_weights=True)            # weights need the fusion itself
    assert on.cache_stats()["caches"]["fusion"]["hits"] == hits
    assert out.attention_weights
    np.testing.assert_array_equal(out.fused, on.infer(full).fused)


def test_fusion_cache_key_follows_the_weights():
    model = default_model(seed=5)
    full = _items(2, seed=13)
    first = model.infer(full).fused
    sd = model.state_dict()
    key = next(k for k in sd if k.startswith("fusion.") and sd[k].ndim == 2)
    sd = dict(sd)
    sd[key] = sd[key] * np.float32(1.5)
    model.load_state_dict(sd)
    second = model.infer(full).fused
    fresh = default_model(seed=5, cache=False)
    fresh.load_state_dict(sd)
    np.testing.assert_array_equal(second, fresh.infer(full).fused)
    assert not np.array_equal(first, second)


def test_switching_other_modalities_keeps_the_cache_warm():
    model = default_model(seed=6)
    full = _items(2, seed=14)
    model.infer(full)
    hits = model.cache_stats()["caches"]["text"]["hits"]
    model.disable("audio")
    model.enable("audio")
    model.infer(full)
    assert model.cache_stats()["caches"]["text"]["hits"] == hits + 2


def test_config_keys_follow_the_config_values():
    import dataclasses

    items = default_model(seed=0).item_cache
    cfg = default_config()
    mc = cfg.modalities[T]
    same = dataclasses.replace(mc)
    assert same is not mc
    assert items.config_key(same) == items.config_key(mc)
    assert items.config_key(mc).startswith("config:")
    # settings that do not decide the cached values leave the key alone
    assert items.config_key(dataclasses.replace(mc, priority=mc.priority + 1)) == \
        items.config_key(mc)
    assert items.config_key(dataclasses.replace(mc, embed_dim=mc.embed_dim * 2)) != \
        items.config_key(mc)
    assert items.config_key(cfg.modalities[I]) != items.config_key(mc)
    assert items.config_key(default_config()) == items.config_key(cfg)
    assert items.config_key(dataclasses.replace(cfg, fused_dim=1024)) != \
        items.config_key(cfg)
