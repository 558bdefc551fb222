"""The per-item cache stays exact: batch-invariant encoders and weights that cannot change
behind the cache's back.

* Every built-in encoder computes a batch item the same way whatever the other items, the
  padding and the number of threads, so an item encoded alone, inside any padded batch, or
  served from the cache gives the same bits (``np.array_equal``, no tolerance).
* Parameters can only be replaced through the module API (``load_state_dict`` /
  ``set_parameter``), which the cache key follows; an in-place write raises.
"""

from __future__ import annotations

import threading

import numpy as np
import pytest

import mmcore
from mmcore.config import LateFusion
from mmcore.modality import Modality
from mmcore.model import MultiModalInput, default_model
from mmcore.ops import attention

T, I, A, V = Modality.TEXT, Modality.IMAGE, Modality.AUDIO, Modality.VIDEO
N_ITEMS = 10


@pytest.fixture
def threads():
    """Set the native thread count for one test (restored afterwards)."""
    before = mmcore.get_num_threads()
    yield mmcore.set_num_threads
    mmcore.set_num_threads(before)


def _items(n=N_ITEMS, seed=0):
    """Raw items of every modality with lengths (hence padding) that differ a lot."""
    rng = np.random.default_rng(seed)
    short = ["", "a", "hi", "cat"]           # 2 to 5 tokens: the shortest attention calls
    texts = short + ["".join(chr(97 + int(c)) for c in rng.integers(0, 26, int(k)))
                     for k in rng.integers(4, 62, n - len(short))]
    images = [rng.integers(0, 256, (int(h), int(w), 3), dtype=np.uint8)
              for h, w in rng.integers(20, 90, (n, 2))]
    audio = [(rng.standard_normal(int(k)) * 0.1).astype(np.float32)
             for k in rng.integers(400, 32000, n)]
    video = [rng.integers(0, 256, (int(f), 36, 44, 3), dtype=np.uint8)
             for f in rng.integers(2, 12, n)]
    return {"text": texts[:n], "image": images, "audio": audio, "video": video}


def _subset(items, idx):
    return {k: [v[i] for i in idx] for k, v in items.items()}


def _check_rows(out, idx, refs):
    """Row j of ``out`` holds item ``idx[j]`` bit for bit as ``refs[idx[j]]`` (encoded alone,
    without cache); padding tokens are exactly zero."""
    for j, i in enumerate(idx):
        ref = refs[i]
        assert np.array_equal(out.fused[j], ref.fused[0]), f"fused of item {i} (row {j})"
        for m, emb in ref.embeddings.items():
            n = emb.shape[1]
            assert np.array_equal(out.embeddings[m][j, :n], emb[0]), f"{m} tokens of item {i}"
            assert not out.embeddings[m][j, n:].any(), f"{m} padding of item {i}"
            assert np.array_equal(out.masks[m][j, :n], ref.masks[m][0])
            assert np.array_equal(out.pooled[m][j], ref.pooled[m][0]), f"{m} pooled of item {i}"


_COMPOSITIONS = ([0, 1, 2, 3], list(range(N_ITEMS)), [2, 9], [9, 0, 5, 5, 2],
                 list(range(N_ITEMS))[::-1], [1], [3, 8, 1])


# ----------------------------------------------------------------------------------------------
# the kernels: a query row does not depend on the padding or the batch


@pytest.mark.parametrize("nthreads", [1, 3, 8])
def test_attention_row_alone_equals_row_in_padded_batch(threads, nthreads):
    threads(nthreads)
    rng = np.random.default_rng(0)
    B, H, L, D = 3, 4, 70, 16
    q = rng.standard_normal((B, H, L, D), dtype=np.float32)
    k = rng.standard_normal((B, H, L, D), dtype=np.float32)
    v = rng.standard_normal((B, H, L, D), dtype=np.float32)
    for n in (1, 2, 3, 4, 5, 8, 9, 17, 33, 67, 70):
        lengths = np.array([n, L, max(1, L - 7)])
        full = attention(q, k, v, key_lengths=lengths)
        alone = attention(q[:1, :, :n], k[:1, :, :n], v[:1, :, :n])
        assert np.array_equal(alone[0], full[0, :, :n]), f"real length {n}"
        # the same keys with fewer padded queries around the row
        part = attention(q[:1, :, :min(L, n + 2)], k[:1], v[:1], key_lengths=lengths[:1])
        assert np.array_equal(part[0, :, :n], full[0, :, :n]), f"real length {n}"


def test_attention_decode_like_rows_match_the_full_call(threads):
    """A chunk of one to three query rows (a short sequence, or the last chunk of a split
    across threads) is computed like any other row."""
    rng = np.random.default_rng(1)
    q = rng.standard_normal((2, 2, 40, 24), dtype=np.float32)
    k = rng.standard_normal((2, 2, 300, 24), dtype=np.float32)
    v = rng.standard_normal((2, 2, 300, 24), dtype=np.float32)
    threads(1)
    full = attention(q, k, v)
    for nthreads in (1, 2, 8):
        threads(nthreads)
        for a, b in ((0, 1), (0, 3), (5, 7), (37, 40), (0, 40)):
            assert np.array_equal(attention(q[:, :, a:b], k, v), full[:, :, a:b]), (a, b)


# ----------------------------------------------------------------------------------------------
# each built-in encoder alone vs in padded batches


@pytest.mark.parametrize("modality", ["text", "image", "audio", "video"])
@pytest.mark.parametrize("nthreads", [1, 8])
def test_encoder_outputs_do_not_depend_on_the_batch(threads, modality, nthreads):
    threads(nthreads)
    model = default_model(seed=1, cache=False)
    m = Modality(modality)
    items = _items(seed=2)[modality]
    alone = [model.encode_modality(m, [it]) for it in items]
    for idx in _COMPOSITIONS:
        tokens, mask, pooled = model.encode_modality(m, [items[i] for i in idx])
        for j, i in enumerate(idx):
            t1, m1, p1 = alone[i]
            n = t1.shape[1]
            assert np.array_equal(tokens[j, :n], t1[0]), (modality, idx, i)
            assert np.array_equal(mask[j, :n], m1[0])
            assert not mask[j, n:].any()
            assert np.array_equal(pooled[j], p1[0]), (modality, idx, i)


def test_video_clip_alone_equals_clip_padded_with_frames():
    """A clip whose frame count is not a multiple of the tubelet depth, padded with frames
    inside a longer batch, gives the tokens it gives alone (its last tubelet repeats its last
    frame in both cases)."""
    model = default_model(seed=1, cache=False)
    enc = model.encoder(V)
    rng = np.random.default_rng(3)
    clips = [rng.standard_normal((t, 3, 32, 32)).astype(np.float32) for t in (3, 5, 8, 1)]
    T_max = 8
    x = np.zeros((len(clips), T_max, 3, 32, 32), np.float32)
    fmask = np.zeros((len(clips), T_max), np.bool_)
    for i, c in enumerate(clips):
        x[i, :len(c)] = c
        x[i, len(c):] = 7.0                     # padding frames hold anything
        fmask[i, :len(c)] = True
    x_before = x.copy()
    tokens, mask, pooled = enc(x, attention_mask=fmask)
    np.testing.assert_array_equal(x, x_before)   # the caller's frames are not modified
    for i, c in enumerate(clips):
        t1, m1, p1 = enc(c[None])
        n = t1.shape[1]
        assert np.array_equal(tokens[i, :n], t1[0]), i
        assert not mask[i, n:].any()
        assert np.array_equal(pooled[i], p1[0]), i


# ----------------------------------------------------------------------------------------------
# the model: cached == uncached, whatever the request history and the threads


@pytest.fixture(scope="module")
def items():
    return _items()


@pytest.fixture(scope="module", params=["attention", "late-mean"])
def fusion(request):
    return {"attention": {}, "late-mean": {"fusion": LateFusion("mean")}}[request.param]


@pytest.fixture(scope="module")
def refs(items, fusion):
    plain = default_model(seed=0, cache=False, **fusion)
    return [plain.infer(_subset(items, [i])) for i in range(N_ITEMS)]


def test_uncached_batches_equal_items_alone(items, fusion, refs):
    plain = default_model(seed=0, cache=False, **fusion)
    for idx in _COMPOSITIONS:
        _check_rows(plain.infer(_subset(items, idx)), idx, refs)


def test_cached_results_do_not_depend_on_request_history(items, fusion, refs):
    """The issue's case: an item first cached inside a padded batch, then asked alone."""
    for order in (_COMPOSITIONS, _COMPOSITIONS[::-1]):
        cached = default_model(seed=0, **fusion)
        for idx in order:
            _check_rows(cached.infer(_subset(items, idx)), idx, refs)
        for i in range(N_ITEMS):                # every item now comes from the cache
            _check_rows(cached.infer(_subset(items, [i])), [i], refs)
        assert cached.cache_stats()["total"]["hits"] > 0


@pytest.mark.parametrize("nthreads", [1, 8])
def test_concurrent_cached_inference_equals_serial(items, fusion, refs, threads, nthreads):
    """8 threads x 8 requests of random compositions with the cache on: all 64 results equal
    the serial, uncached, one-item results bit for bit."""
    threads(nthreads)
    cached = default_model(seed=0, **fusion)
    results, errors = {}, []

    def worker(t):
        try:
            rng = np.random.default_rng(100 + t)
            for r in range(8):
                idx = [int(i) for i in rng.choice(N_ITEMS, size=int(rng.integers(1, 5)))]
                results[(t, r)] = (idx, cached.infer(MultiModalInput(_subset(items, idx))))
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    workers = [threading.Thread(target=worker, args=(t,)) for t in range(8)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(timeout=300)
    assert not errors, errors[0]
    assert len(results) == 64
    bad = []
    for key, (idx, out) in sorted(results.items()):
        try:
            _check_rows(out, idx, refs)
        except AssertionError as exc:
            bad.append((key, str(exc)))
    assert not bad, f"{len(bad)} of 64 results differ from the serial ones: {bad[:3]}"
