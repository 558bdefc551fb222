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

# short names of the modalities (I is the image one)
T, I, A, V = Modality.TEXT, Modality.IMAGE, Modality.AUDIO, Modality.VIDEO  # noqa: E741
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


# ----------------------------------------------------------------------------------------------
# weights cannot change behind the cache's back

_TEXT_W = "encoders.text.encoder.layers.0.linear1.weight"


def _text_items():
    return {"text": ["a photo of a cat", "hi", "x" * 40]}


def test_in_place_writes_to_parameters_raise():
    model = default_model(seed=0)
    model.infer(_text_items())
    for name, w in model.named_parameters():
        assert not w.flags.writeable, name
        with pytest.raises(ValueError, match="read-only"):
            w[(0,) * w.ndim] = 1.0
        with pytest.raises(ValueError, match="read-only"):
            w *= 2.0
        with pytest.raises(ValueError):             # nor can the flag be switched back
            w.flags.writeable = True
    with pytest.raises(ValueError, match="read-only"):
        np.copyto(model.encoder(T).embedder.token_embedding, 0.0)
    with pytest.raises(AttributeError, match="set_parameter"):
        model.encoder(T).encoder.layers[0].linear1.weight = np.zeros((128, 64), np.float32)
    # nothing changed: the cached result is still the uncached one
    np.testing.assert_array_equal(model.infer(_text_items()).fused,
                                  default_model(seed=0, cache=False).infer(_text_items()).fused)


def _fresh(state, **kw):
    fresh = default_model(seed=0, cache=False, **kw)
    fresh.load_state_dict(state)
    return fresh


@pytest.mark.parametrize("how", ["model.set_parameter", "module.set_parameter",
                                 "module.load_state_dict", "model.load_state_dict"])
def test_replacing_a_weight_after_inference_invalidates_the_cache(how):
    model = default_model(seed=0)
    items = _text_items()
    first = model.infer(items)
    model.infer(items)
    assert model.cache_stats()["caches"]["text"]["hits"] == 3
    ident = model.identity
    old = model.state_dict()[_TEXT_W]
    new = old * np.float32(1.25)
    lin = model.encoder(T).encoder.layers[0].linear1
    if how == "model.set_parameter":
        model.set_parameter(_TEXT_W, new)
    elif how == "module.set_parameter":
        lin.set_parameter("weight", new)
    elif how == "module.load_state_dict":
        lin.load_state_dict({"weight": new, "bias": lin.bias})
    else:
        sd = model.state_dict()
        sd[_TEXT_W] = new
        model.load_state_dict(sd)
    assert model.identity != ident
    second = model.infer(items)
    want = _fresh(model.state_dict()).infer(items)
    np.testing.assert_array_equal(second.fused, want.fused)
    np.testing.assert_array_equal(second.embeddings[T], want.embeddings[T])
    assert not np.array_equal(first.fused, second.fused)
    # setting the old weight back gives the old identity, and the old entries are valid again
    model.set_parameter(_TEXT_W, old)
    assert model.identity == ident
    np.testing.assert_array_equal(model.infer(items).fused, first.fused)


def test_identity_is_cheap_and_stable_while_nothing_changes():
    model = default_model(seed=0)
    ident = model.identity
    default_model(seed=1)                           # other modules change the weights clock
    assert model.identity == ident
    model.infer(_text_items())
    assert model.identity == ident
    v = model.weights_version
    assert model.weights_version == v
    model.encoder(T).encoder.norm.set_parameter("bias", np.full(64, 0.5, np.float32))
    assert model.weights_version > v and model.identity != ident


def test_native_encoder_block_notices_a_replaced_weight():
    from mmcore.model import TransformerEncoderLayer
    layer = TransformerEncoderLayer(32, 4, 64, rng=0)
    x = np.random.default_rng(0).standard_normal((2, 5, 32), dtype=np.float32)
    mask = np.array([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]], bool)
    before = layer(x, attention_mask=mask)
    for name in ("linear1.weight", "self_attn.in_proj_weight", "norm2.bias"):
        sd = layer.state_dict()
        layer.set_parameter(name, sd[name] + np.float32(0.25))
        want = TransformerEncoderLayer.from_state_dict(layer.state_dict(), nhead=4)(
            x, attention_mask=mask)
        got = layer(x, attention_mask=mask)
        np.testing.assert_array_equal(got, want)
        assert not np.array_equal(got, before)
        before = got


def test_set_parameter_is_validated_and_all_or_nothing():
    from mmcore.errors import ModelFormatError
    model = default_model(seed=0)
    ident, old = model.identity, model.state_dict()[_TEXT_W]
    bad = [("encoders.text.nope", old, "no parameter"),
           (_TEXT_W, old[:3], "shape"),
           (_TEXT_W, np.full_like(old, np.nan), "NaN"),
           (_TEXT_W, old.astype(np.int32), "dtype"),
           (_TEXT_W, "weights", "dtype")]
    for name, value, match in bad:
        with pytest.raises(ModelFormatError, match=match) as info:
            model.set_parameter(name, value)
        assert str(info.value).startswith("[MultiModalModel]")
    np.testing.assert_array_equal(model.state_dict()[_TEXT_W], old)
    assert model.identity == ident
    # the given array is copied: writing it afterwards changes nothing
    src = old * np.float32(2.0)
    model.set_parameter(_TEXT_W, src)
    ident2 = model.identity
    src[:] = 0.0
    np.testing.assert_array_equal(model.state_dict()[_TEXT_W], old * np.float32(2.0))
    assert model.identity == ident2


def test_quantized_weights_are_read_only_and_replaceable(tmp_path):
    from mmcore.config import ModalityConfig, MultiModalConfig
    from mmcore.model import MultiModalModel
    from mmcore.model.model import default_config
    from mmcore.ops.linear import QuantizedTensor
    cfg = default_config(fusion=LateFusion("mean"))
    mods = [ModalityConfig.from_dict({**mc.to_dict(), "quantization": "int8"})
            if m == T else mc for m, mc in cfg.modalities.items()]
    cfg = MultiModalConfig(mods, fusion=LateFusion("mean"))
    MultiModalModel(cfg, seed=0).save(tmp_path / "m")
    model = MultiModalModel.from_pretrained(tmp_path / "m")
    items = _text_items()
    first = model.infer(items)
    # quantized encoders are batch-invariant too
    model.clear_cache()
    for i, text in enumerate(items["text"]):
        alone = model.encode_modality(T, [text])
        n = alone[0].shape[1]
        np.testing.assert_array_equal(first.embeddings[T][i, :n], alone[0][0])
        np.testing.assert_array_equal(first.pooled[T][i], alone[2][0])
    w = model.encoder(T).encoder.layers[0].linear1.weight
    assert isinstance(w, QuantizedTensor)
    with pytest.raises(ValueError, match="read-only"):
        w.data[0, 0] = 5
    with pytest.raises(ValueError, match="read-only"):
        w.scale[0] = 5.0
    # replace it (quantized), then infer: equals a fresh uncached model with the same weights
    q = QuantizedTensor(np.ascontiguousarray(w.data[::-1]), "int8",
                        scale=np.ascontiguousarray(w.scale[::-1]))
    model.set_parameter(_TEXT_W, q)
    assert model.encoder(T).encoder.layers[0].linear1.weight is q and not q.data.flags.writeable
    second = model.infer(items)
    fresh = MultiModalModel.from_pretrained(tmp_path / "m")          # a cold cache
    fresh.set_parameter(_TEXT_W, QuantizedTensor(q.data.copy(), "int8", scale=q.scale.copy()))
    np.testing.assert_array_equal(second.fused, fresh.infer(items).fused)
    assert not np.array_equal(first.fused, second.fused)
    # save and load keep working with read-only parameters
    model.save(tmp_path / "m2")
    again = MultiModalModel.from_pretrained(tmp_path / "m2")
    np.testing.assert_array_equal(again.infer(items).fused, second.fused)


def test_copies_of_a_module_have_read_only_parameters_too():
    import copy
    import pickle
    model = default_model(seed=0, cache=False)
    enc = model.encoder(T)
    for other in (copy.deepcopy(enc), pickle.loads(pickle.dumps(enc))):
        for name, w in other.named_parameters():
            assert not w.flags.writeable, name
            np.testing.assert_array_equal(w, enc.state_dict()[name])
    # a shallow copy shares no container: replacing its weight leaves the original (and the
    # model's identity) alone
    ident = model.identity
    lin = enc.encoder.layers[0].linear1
    shallow = copy.copy(lin)
    shallow.set_parameter("weight", np.zeros_like(lin.weight))
    assert lin.weight.any() and model.identity == ident
    sd = model.state_dict()                          # state dicts are writeable copies
    assert all(v.flags.writeable for v in sd.values())


def test_results_computed_while_weights_change_are_not_cached(monkeypatch):
    """A weight replaced while a request encodes (another thread ignoring the documented
    rule): that request's outputs are returned but not cached, so no key ever maps to
    outputs of mixed weights."""
    from mmcore.model import MultiModalModel
    model = default_model(seed=0, fusion=LateFusion("mean"))
    items = _text_items()
    new = model.state_dict()[_TEXT_W] * np.float32(0.5)
    real_encoder = MultiModalModel.encoder

    def racing_encoder(self, m):
        enc = real_encoder(self, m)

        def run(*args, **kwargs):
            self.set_parameter(_TEXT_W, new)        # "another thread" writes meanwhile
            return enc(*args, **kwargs)
        return run

    monkeypatch.setattr(MultiModalModel, "encoder", racing_encoder)
    model.infer(items)
    monkeypatch.setattr(MultiModalModel, "encoder", real_encoder)
    caches = model.cache_stats()["caches"]
    assert caches["text"]["items"] == 0 and caches["fusion"]["items"] == 0
    got = model.infer(items)
    want = _fresh(model.state_dict(), fusion=LateFusion("mean")).infer(items)
    np.testing.assert_array_equal(got.fused, want.fused)
    assert model.cache_stats()["caches"]["text"]["items"] == 3
