"""Tests of mmcore.cache: TensorCache policies and accounting, content keys, CacheManager."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

import mmcore
from mmcore.cache import CacheItemTooLarge, CacheManager, TensorCache, content_key, nbytes_of
from mmcore.config import CacheConfig, CachePolicy


class FakeClock:
    def __init__(self, t=0.0):
        self.t = float(t)

    def __call__(self):
        return self.t

    def advance(self, dt):
        self.t += dt


def arr(n, fill=0.0, dtype=np.float32):
    return np.full(n, fill, dtype=dtype)


# --------------------------------------------------------------------------------------------
# basics

def test_top_level_export():
    assert mmcore.TensorCache is TensorCache


def test_get_put_stats_clear():
    c = TensorCache(1000)
    assert c.get("a") is None
    c.put("a", arr(10))
    np.testing.assert_array_equal(c.get("a"), arr(10))
    s = c.stats()
    assert (s.hits, s.misses, s.evictions, s.bytes, s.items) == (1, 1, 0, 40, 1)
    c.clear()
    assert c.stats().bytes == 0 and len(c) == 0 and c.get("a") is None


def test_entries_are_read_only_and_copied():
    c = TensorCache(1000)
    x = arr(4, 1.0)
    c.put("x", x)
    x[:] = 7  # the caller's array stays theirs
    got = c.get("x")
    np.testing.assert_array_equal(got, arr(4, 1.0))
    with pytest.raises(ValueError):
        got[0] = 5
    with pytest.raises(ValueError):
        got.flags.writeable = True
    np.testing.assert_array_equal(c.get("x"), arr(4, 1.0))


def test_tuples_and_dicts_accounted_and_frozen():
    c = TensorCache(1000)
    v = {"a": arr(3), "b": (arr(2, dtype=np.float64), np.zeros((2, 2), np.int8))}
    assert nbytes_of(v) == 12 + 16 + 4
    c.put("k", v)
    assert c.stats().bytes == 32
    got = c.get("k")
    with pytest.raises(TypeError):
        got["c"] = 1
    assert isinstance(got["b"], tuple)
    c.put("l", [arr(1), arr(1)])
    assert isinstance(c.get("l"), tuple) and c.bytes == 40


def test_bad_values_and_args():
    with pytest.raises(TypeError):
        TensorCache(100).put("k", object())
    with pytest.raises(TypeError):
        TensorCache(100).put("k", np.array([object()]))
    with pytest.raises(ValueError):
        TensorCache(-1)
    with pytest.raises(ValueError):
        TensorCache(10, policy="random")
    with pytest.raises(ValueError):
        TensorCache(10, policy="ttl")
    with pytest.raises(ValueError):
        TensorCache(10, ttl_s=0)


def test_oversized_item_refused_and_cache_unchanged():
    c = TensorCache(100)
    c.put("a", arr(20))
    with pytest.raises(CacheItemTooLarge):
        c.put("big", arr(26))
    with pytest.raises(ValueError):  # also a ValueError
        c.put("a", arr(26))
    assert c.stats().bytes == 80 and "a" in c and c.stats().rejected == 2
    c.put("exact", arr(25))  # exactly the capacity fits
    assert c.keys() == ["exact"]
    # get_or_compute returns an oversized result without storing it
    out = c.get_or_compute("big", lambda: arr(100))
    assert out.shape == (100,) and "big" not in c


# --------------------------------------------------------------------------------------------
# eviction order per policy

def fill(c, keys):
    for k in keys:
        c.put(k, arr(25))  # 100 bytes each


def test_lru_order():
    c = TensorCache(300, "lru")
    fill(c, "abc")
    c.get("a")
    c.put("d", arr(25))
    assert sorted(c.keys()) == ["a", "c", "d"]
    c.get("c")
    c.put("e", arr(25))
    assert sorted(c.keys()) == ["c", "d", "e"] or sorted(c.keys()) == ["a", "c", "e"]
    assert "a" not in c  # a was least recent after c's hit and d's put
    assert c.stats().evictions == 2


def test_fifo_order_ignores_hits():
    c = TensorCache(300, "fifo")
    fill(c, "abc")
    c.get("a")
    c.get("a")
    c.put("d", arr(25))
    assert c.keys() == ["b", "c", "d"]


def test_lfu_order_ties_to_least_recent():
    c = TensorCache(300, "lfu")
    fill(c, "abc")
    c.get("a"), c.get("a"), c.get("b")
    c.put("d", arr(25))
    assert sorted(c.keys()) == ["a", "b", "d"]
    c.get("d")  # b and d both have 2 uses; b's last use is older
    c.put("e", arr(25))
    assert sorted(c.keys()) == ["a", "d", "e"]


def test_eviction_frees_enough_for_big_item():
    c = TensorCache(300, "lru")
    fill(c, "abc")
    c.put("big", arr(50))  # 200 bytes: two evictions
    assert sorted(c.keys()) == ["big", "c"]
    assert c.stats().evictions == 2 and c.bytes == 300


def test_ttl_expiry_with_fake_clock():
    clock = FakeClock()
    c = TensorCache(1000, "ttl", ttl_s=10, clock=clock)
    c.put("a", arr(1))
    clock.advance(5)
    c.put("b", arr(1))
    assert c.get("a") is not None
    clock.advance(5)  # a is exactly 10 s old: expired
    assert c.get("a") is None and "a" not in c
    assert c.get("b") is not None
    clock.advance(4.5)
    assert "b" in c
    clock.advance(0.5)
    assert c.expire() == 1 and len(c) == 0
    s = c.stats()
    assert s.expired == 2 and s.evictions == 0 and s.bytes == 0


def test_ttl_pressure_evicts_oldest_and_ttl_with_lru():
    clock = FakeClock()
    c = TensorCache(200, "ttl", ttl_s=100, clock=clock)
    fill(c, "ab")
    c.get("a")
    c.put("c", arr(25))
    assert c.keys() == ["b", "c"]
    c2 = TensorCache(1000, "lru", ttl_s=1, clock=clock)
    c2.put("x", arr(1))
    clock.advance(0.5)
    assert c2.get("x") is not None  # a hit does not renew the age
    clock.advance(0.5)
    assert c2.get("x") is None


def test_get_or_compute_counts_and_replace():
    c = TensorCache(1000)
    calls = []

    def f():
        return calls.append(1) or arr(3, 2.0)

    c.get_or_compute("k", f)
    c.get_or_compute("k", f)
    assert len(calls) == 1 and c.stats().hits == 1 and c.stats().misses == 1
    c.put("k", arr(5))
    assert c.bytes == 20 and len(c) == 1


# --------------------------------------------------------------------------------------------
# concurrency

def test_concurrent_get_or_compute_computes_once():
    c = TensorCache(1 << 20)
    calls = []
    lock = threading.Lock()
    barrier = threading.Barrier(32)

    def compute():
        with lock:
            calls.append(1)
        time.sleep(0.05)
        return arr(100, 3.0)

    results = [None] * 32

    def worker(i):
        barrier.wait()
        results[i] = c.get_or_compute("same", compute)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(32)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1
    assert all(np.array_equal(r, arr(100, 3.0)) for r in results)


def test_concurrent_errors_propagate_and_do_not_stick():
    c = TensorCache(1000)
    barrier = threading.Barrier(8)
    errors = []

    def bad():
        time.sleep(0.02)
        raise RuntimeError("boom")

    def worker():
        barrier.wait()
        try:
            c.get_or_compute("k", bad)
        except RuntimeError as e:
            errors.append(e)

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(errors) == 8 and "k" not in c
    assert c.get_or_compute("k", lambda: arr(1)) is not None


def test_many_threads_random_ops_keep_accounting():
    c = TensorCache(4000, "lfu")

    def worker(seed):
        rng = np.random.default_rng(seed)
        for _ in range(400):
            k = int(rng.integers(0, 40))
            op = rng.integers(0, 3)
            if op == 0:
                c.put(k, arr(int(rng.integers(1, 100))))
            elif op == 1:
                c.get(k)
            else:
                c.get_or_compute(k, lambda: arr(10))

    threads = [threading.Thread(target=worker, args=(s,)) for s in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    s = c.stats()
    held = sum(nbytes_of(c.peek(k)) for k in c.keys())
    assert s.bytes == held <= 4000 and s.items == len(c.keys())


# --------------------------------------------------------------------------------------------
# stateful model test

class Model:
    """A plain list model of TensorCache's eviction order."""

    def __init__(self, capacity, policy, ttl):
        self.capacity, self.policy, self.ttl = capacity, policy, ttl
        self.entries = {}  # key -> [nbytes, put_time, uses, last_use, order]
        self.tick = 0
        self.order = 0

    def _expired(self, e, now):
        return self.ttl is not None and now - e[1] >= self.ttl

    def get(self, key, now):
        e = self.entries.get(key)
        if e is None:
            return False
        if self._expired(e, now):
            del self.entries[key]
            return False
        self.tick += 1
        e[2] += 1
        e[3] = self.tick
        if self.policy == "lru":
            self.order += 1
            e[4] = self.order
        return True

    def put(self, key, nbytes, now):
        if nbytes > self.capacity:
            return False
        self.entries.pop(key, None)
        for k in [k for k, e in self.entries.items() if self._expired(e, now)]:
            del self.entries[k]
        while sum(e[0] for e in self.entries.values()) + nbytes > self.capacity:
            if self.policy == "lfu":
                victim = min(self.entries, key=lambda k: (self.entries[k][2], self.entries[k][3]))
            else:
                victim = min(self.entries, key=lambda k: self.entries[k][4])
            del self.entries[victim]
        self.tick += 1
        self.order += 1
        self.entries[key] = [nbytes, now, 1, self.tick, self.order]
        return True


class CacheMachine(RuleBasedStateMachine):
    @initialize(policy=st.sampled_from(["lru", "lfu", "fifo", "ttl"]),
                capacity=st.integers(0, 400), use_ttl=st.booleans())
    def setup(self, policy, capacity, use_ttl):
        ttl = 5.0 if (policy == "ttl" or use_ttl) else None
        self.clock = FakeClock()
        self.cache = TensorCache(capacity, policy, ttl, clock=self.clock)
        self.model = Model(capacity, policy, ttl)

    keys = st.integers(0, 7)

    @rule(key=keys, n=st.integers(0, 40), dtype=st.sampled_from([np.float32, np.float64,
                                                                  np.int8]))
    def put(self, key, n, dtype):
        value = (np.zeros(n, dtype), np.ones(1, np.int8)) if n % 3 == 0 else np.zeros(n, dtype)
        nb = nbytes_of(value)
        ok = self.model.put(key, nb, self.clock())
        if ok:
            self.cache.put(key, value)
        else:
            with pytest.raises(CacheItemTooLarge):
                self.cache.put(key, value)

    @rule(key=keys)
    def get(self, key):
        hit = self.model.get(key, self.clock())
        miss = object()
        assert (self.cache.get(key, default=miss) is not miss) == hit

    @rule(dt=st.sampled_from([0.5, 1.0, 2.5]))
    def tick(self, dt):
        self.clock.advance(dt)

    @rule()
    def clear(self):
        self.cache.clear()
        self.model.entries.clear()

    @invariant()
    def same_contents_and_bytes(self):
        if not hasattr(self, "cache"):
            return
        assert set(self.cache.keys()) == set(self.model.entries)
        expected = sum(e[0] for e in self.model.entries.values())
        s = self.cache.stats()
        assert s.bytes == expected <= self.cache.capacity_bytes
        assert s.items == len(self.model.entries)


TestCacheMachine = CacheMachine.TestCase
TestCacheMachine.settings = settings(max_examples=200, stateful_step_count=50, deadline=None)


# --------------------------------------------------------------------------------------------
# content keys

def test_keys_that_must_differ():
    x = np.arange(12, dtype=np.float32)
    base = content_key(x, modality="image")
    variants = [
        content_key(x.reshape(3, 4), modality="image"),            # shape
        content_key(x.view(np.int32), modality="image"),           # dtype, same bytes
        content_key(x.view(np.uint8), modality="image"),
        content_key(x, modality="audio"),                          # modality
        content_key(x, modality="image", model="m1"),              # model identity
        content_key(x, modality="image", config={"size": 224}),    # preprocessing
        content_key(x, modality="image", item_id="a"),             # namespaced item id
        content_key(x.tobytes(), modality="image"),                # raw bytes vs array
        content_key(x.astype(">f4"), modality="image"),            # byte order
        content_key((x[:6], x[6:]), modality="image"),             # split differently
        content_key((x[:5], x[5:]), modality="image"),
        content_key(x, modality="image", algorithm="blake2b") if mmcore.cache.HASH_ALGORITHM
        != "blake2b" else content_key(x + 1, modality="image"),
    ]
    assert len(set(variants + [base])) == len(variants) + 1
    assert content_key(x, modality="image", model="m1") != content_key(x, modality="image",
                                                                       model="m2")
    assert content_key(x, modality="image", item_id="a") != content_key(x + 1,
                                                                        modality="image",
                                                                        item_id="a")


def test_keys_stable_and_content_based():
    x = np.arange(12, dtype=np.float32).reshape(3, 4)
    k = content_key(x, modality="image", config={"b": 1, "a": 2})
    assert k == content_key(x.copy(), modality="image", config={"a": 2, "b": 1})
    assert k == content_key(np.asfortranarray(x), modality="image", config={"a": 2, "b": 1})
    assert k == content_key(x.T.T, modality="image", config={"b": 1, "a": 2})
    assert len(k) == 64 and int(k, 16) >= 0
    from mmcore.config import PreprocessingConfig
    c1, c2 = PreprocessingConfig(), PreprocessingConfig(n_mels=128)
    assert content_key(x, modality="audio", config=c1) != content_key(x, modality="audio",
                                                                      config=c2)
    assert content_key(x, modality="audio", config=c1) == content_key(
        x, modality="audio", config=PreprocessingConfig())
    assert content_key("hi", modality="text") != content_key(b"hi", modality="text")
    with pytest.raises(TypeError):
        content_key(np.array([object()]), modality="text")


# --------------------------------------------------------------------------------------------
# storage dtype

def test_float16_storage_halves_bytes_and_states_exactness():
    rng = np.random.default_rng(0)
    x = rng.standard_normal(1000).astype(np.float32)
    c = TensorCache(10_000, storage_dtype="float16")
    c.put("e", x)
    assert c.bytes == 2000  # half of float32
    got = c.get("e")
    assert got.dtype == np.float32
    np.testing.assert_array_equal(got, x.astype(np.float16).astype(np.float32))
    normal = np.abs(x) >= np.finfo(np.float16).tiny
    assert np.all(np.abs(got - x)[normal] <= np.abs(x[normal]) * 2.0 ** -11)
    assert np.all(np.abs(got - x)[~normal] <= 2.0 ** -25)
    big = np.array([1e6, 1.0], np.float32)  # would overflow: kept exactly
    c.put("big", big)
    np.testing.assert_array_equal(c.get("big"), big)
    ints = np.arange(4, dtype=np.int64)
    c.put("i", ints)
    np.testing.assert_array_equal(c.get("i"), ints)


def test_bfloat16_storage():
    x = np.array([1.0, -3.14159, 1e30, np.nan, np.inf, 0.0], np.float32)
    c = TensorCache(1000, storage_dtype="bfloat16")
    c.put("k", (x,))
    assert c.bytes == 12
    got = c.get("k")[0]
    fin = np.isfinite(x)
    assert np.all(np.abs(got[fin] - x[fin]) <= np.abs(x[fin]) * 2.0 ** -8)
    assert np.isnan(got[3]) and got[4] == np.inf


# --------------------------------------------------------------------------------------------
# manager

def test_manager_per_modality_budgets_and_policies():
    cfg = CacheConfig(global_budget_bytes=10_000, default=CachePolicy(policy="lru"),
                      per_modality={"image": CachePolicy(policy="fifo", budget_bytes=300,
                                                         priority=5, dtype="float16"),
                                    "text": CachePolicy(enabled=False)})
    m = CacheManager(cfg)
    img = m.cache_for("image")
    assert (img.capacity_bytes, img.policy, img.storage_dtype) == (300, "fifo", "float16")
    assert m.cache_for("audio").capacity_bytes == 10_000
    assert m.put("image", "k", arr(100))  # 400 bytes float32 -> 200 stored
    assert img.bytes == 200
    assert not m.put("text", "k", arr(1)) and m.get("text", "k") is None
    assert m.get_or_compute("text", "k", lambda: 5) == 5
    assert not m.put("image", "big", arr(1000))  # too large for the image budget
    st_ = m.stats()
    assert st_["caches"]["image"]["items"] == 1 and st_["total"]["bytes"] == 200


def test_manager_global_budget_evicts_lowest_priority_first():
    cfg = CacheConfig(global_budget_bytes=1000,
                      per_modality={"image": CachePolicy(priority=10),
                                    "audio": CachePolicy(priority=1),
                                    "text": CachePolicy(priority=5)})
    m = CacheManager(cfg, attention_policy=CachePolicy(priority=20),
                     fusion_policy=CachePolicy(priority=20))
    for i in range(2):
        m.put("image", i, arr(100))
        m.put("audio", i, arr(100))
    assert m.bytes <= 1000
    assert len(m.cache_for("image")) == 2  # audio (priority 1) paid
    m.put("text", 0, arr(100))
    # text (priority 5) is still below image (10): the new text entry is the one to go
    assert m.bytes <= 1000 and len(m.cache_for("image")) == 2 and len(m.cache_for("text")) == 0
    m.put(CacheManager.FUSION, "f", arr(100))  # priority 20: image pays now
    assert m.bytes <= 1000 and len(m.cache_for("image")) == 1 and len(m.fusion) == 1
    assert len(m.cache_for("audio")) == 0
    m.clear()
    assert m.bytes == 0


def test_manager_low_memory_sheds_lowest_priority():
    frac = [0.5]
    clock = FakeClock()
    cfg = CacheConfig(global_budget_bytes=10_000,
                      per_modality={"image": CachePolicy(priority=10),
                                    "audio": CachePolicy(priority=1)})
    m = CacheManager(cfg, memory_probe=lambda: frac[0], clock=clock, low_memory_fraction=0.1)
    m.put("image", 0, arr(250))
    m.put("audio", 0, arr(250))
    assert m.bytes == 2000
    frac[0] = 0.01
    clock.advance(2)
    m.put("image", 1, arr(10))
    # half of the 2040 bytes is shed: all of audio (priority 1) first, then image's oldest
    assert len(m.cache_for("audio")) == 0 and m.bytes <= 1020
    assert m.cache_for("image").keys() == [1]
    assert m.stats()["total"]["low_memory_events"] == 1


def test_manager_attention_and_fusion_keys():
    m = CacheManager(CacheConfig())
    a = m.attention_key("d1", "d2", 3, query_modality="text", context_modality="image")
    assert a != m.attention_key("d2", "d1", 3, query_modality="text", context_modality="image")
    assert a != m.attention_key("d1", "d2", 4, query_modality="text", context_modality="image")
    f = m.fusion_key({"text": "d1", "image": "d2"}, strategy="concat")
    assert f == m.fusion_key({"image": "d2", "text": "d1"}, strategy="concat")
    assert f != m.fusion_key({"image": "d2", "text": "d1"}, strategy="mean")
    m.put(CacheManager.ATTENTION, a, (arr(4), arr(2)))
    m.put(CacheManager.FUSION, f, arr(8))
    assert m.get(CacheManager.ATTENTION, a)[0].shape == (4,)
    assert m.get(CacheManager.FUSION, f).shape == (8,)


def test_manager_from_multimodal_config():
    from mmcore.config import ModalityConfig, MultiModalConfig
    from mmcore.modality import Modality
    mm = MultiModalConfig([ModalityConfig(Modality.TEXT),
                           ModalityConfig(Modality.IMAGE,
                                          cache=CachePolicy(policy="lfu", priority=3))])
    m = CacheManager.from_multimodal_config(mm)
    assert m.cache_for("image").policy == "lfu" and m.cache_for("text").policy == "lru"
