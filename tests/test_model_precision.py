"""The matmul precision in the model runtime: ``ModalityConfig.matmul_precision``, the thread's
precision around ``infer``, the cache keys that carry it, and the packed weights of the layers
(packed once per precision, never stale after a weight is replaced)."""

from __future__ import annotations

import copy
import pickle
import threading

import numpy as np
import pytest

import mmcore
from _helpers import need_backend
from mmcore.config import LateFusion
from mmcore.errors import ModelFormatError
from mmcore.modality import Modality
from mmcore.model import (
    CrossModalAttention,
    Linear,
    MultiModalModel,
    TransformerEncoderLayer,
    default_model,
)
from mmcore.model.io import quantize_int8
from mmcore.model.packing import freeze_quantized
from mmcore.ops import PackedWeight, linear
from mmcore.ops.linear import QuantizedTensor

TEXT, IMAGE, AUDIO = Modality.TEXT, Modality.IMAGE, Modality.AUDIO
PRECISIONS = ("highest", "bf16", "int8")

# Relative error bound of the token and pooled embeddings of the default model (64 wide, two
# pre-norm blocks) under "bf16" and "int8" against float32, per row (L2 norms). bf16 rounds
# each operand to 8 significant bits (relative error <= 2**-9 each, <= 2**-8 per product);
# int8 moves each weight by at most half of 1/127 of its row's largest magnitude and each
# activation by half of 1/255 of its row's range. Errors of either sign partly cancel in the
# sums and the layer norms rescale them, so a row carries a few times 2**-8 at most: measured
# over 8 seeds x 4 items (text int8, image bf16) the worst row was 0.0057 (tokens) and 0.0067
# (pooled). The bound, 0.02 (about 5 x 2**-8), leaves three times that.
REL_BOUND = 0.02

_RNG = np.random.default_rng(7)
INPUTS = {
    "text": ["a cat on a mat", "the quick brown fox jumps over the lazy dog", "x",
             "0123456789" * 6],
    "image": _RNG.integers(0, 256, (4, 70, 90, 3), dtype=np.uint8),
    "audio": (_RNG.standard_normal((4, 16000)) * 0.1).astype(np.float32),
}


def _with_precisions(model_or_cfg, **precisions):
    """The config of ``model_or_cfg`` with ``matmul_precision`` set per modality name."""
    cfg = getattr(model_or_cfg, "config", model_or_cfg)
    mods = {str(m): (mc.replace(matmul_precision=precisions[str(m)])
                     if str(m) in precisions else mc)
            for m, mc in cfg.modalities.items()}
    return cfg.replace(modalities=mods)


def _row_rel(a, b, mask=None):
    """The largest relative L2 error of the rows of ``a`` against ``b`` (real rows only)."""
    if mask is not None:
        a, b = a[mask], b[mask]
    return float((np.linalg.norm(a - b, axis=-1) / np.linalg.norm(b, axis=-1)).max())


def _same(a, b):
    return a.shape == b.shape and a.tobytes() == b.tobytes()


@pytest.fixture(scope="module")
def models():
    """The float32 default model and the same weights with text int8 and image bf16."""
    fusion = LateFusion("mean")
    base = default_model(seed=0, cache=False, fusion=fusion)
    mixed = MultiModalModel(_with_precisions(base, text="int8", image="bf16"), seed=0,
                            cache=False)
    return base, mixed


# ============================================================================================
# per-modality precision


def test_mixed_precision_model_is_close_to_float32(models):
    base, mixed = models
    a, b = base.infer(INPUTS), mixed.infer(INPUTS)
    for m in (TEXT, IMAGE):
        mask = a.masks[m]
        assert np.array_equal(mask, b.masks[m])
        assert _row_rel(b.embeddings[m], a.embeddings[m], mask) < REL_BOUND
        assert _row_rel(b.pooled[m], a.pooled[m]) < REL_BOUND
        # other arithmetic: other bits
        assert not _same(b.embeddings[m], a.embeddings[m])
        assert not _same(b.pooled[m], a.pooled[m])
        assert np.isfinite(b.embeddings[m]).all()
    # the modality without a precision of its own is computed exactly as before
    assert _same(b.embeddings[AUDIO], a.embeddings[AUDIO])
    assert _same(b.pooled[AUDIO], a.pooled[AUDIO])
    assert not _same(b.fused, a.fused)
    assert _row_rel(b.fused, a.fused) < REL_BOUND


def test_modality_precision_equals_the_thread_precision_and_wins_over_it(models):
    base, mixed = models
    b = mixed.infer(INPUTS)
    with mmcore.matmul_precision("int8"):
        text_int8 = base.infer({"text": INPUTS["text"]})
    with mmcore.matmul_precision("bf16"):
        image_bf16 = base.infer({"image": INPUTS["image"]})
    assert _same(b.embeddings[TEXT], text_int8.embeddings[TEXT])
    assert _same(b.embeddings[IMAGE], image_bf16.embeddings[IMAGE])
    # a block around infer: the configured modalities keep theirs, the others follow it
    with mmcore.matmul_precision("bf16"):
        c = mixed.infer(INPUTS)
        audio_bf16 = base.infer({"audio": INPUTS["audio"]})
    assert _same(c.embeddings[TEXT], b.embeddings[TEXT])
    assert _same(c.embeddings[IMAGE], b.embeddings[IMAGE])
    assert _same(c.embeddings[AUDIO], audio_bf16.embeddings[AUDIO])
    assert not _same(c.embeddings[AUDIO], b.embeddings[AUDIO])
    # the block is over: the thread is back at "highest"
    assert mmcore.get_matmul_precision() == "highest"
    assert _same(mixed.infer(INPUTS).embeddings[AUDIO], b.embeddings[AUDIO])


def test_process_precision_applies_to_modalities_without_their_own(models):
    base, mixed = models
    b = mixed.infer(INPUTS)
    with mmcore.matmul_precision("int8"):
        audio_int8 = base.infer({"audio": INPUTS["audio"]}).embeddings[AUDIO]
    mmcore.set_matmul_precision("int8")
    try:
        c = mixed.infer(INPUTS)
    finally:
        mmcore.set_matmul_precision("highest")
    assert _same(c.embeddings[AUDIO], audio_int8)
    assert _same(c.embeddings[IMAGE], b.embeddings[IMAGE])      # its own bf16 wins


def test_highest_precision_config_equals_the_default(models):
    base, _ = models
    exact = MultiModalModel(_with_precisions(base, text="highest", image="highest",
                                             audio="highest"), seed=0, cache=False)
    a = base.infer(INPUTS)
    with mmcore.matmul_precision("int8"):        # the config's "highest" wins over the thread
        b = exact.infer({k: INPUTS[k] for k in ("text", "image", "audio")})
    for m in (TEXT, IMAGE, AUDIO):
        assert _same(a.embeddings[m], b.embeddings[m])


@pytest.mark.parametrize("fusion", ["early", "middle"])
def test_joint_encoders_use_the_modality_precision(fusion):
    strategy = (mmcore.config.EarlyFusion() if fusion == "early"
                else mmcore.config.MiddleFusion(fusion_layer=1))
    base = default_model(seed=2, cache=False, fusion=strategy)
    # audio: its embedder is a linear map (early fusion runs only the embedders per modality)
    mixed = MultiModalModel(_with_precisions(base, audio="int8"), seed=2, cache=False)
    inputs = {"text": INPUTS["text"], "audio": INPUTS["audio"]}
    a, b = base.infer(inputs), mixed.infer(inputs)
    x, mask = mixed._prepare(AUDIO, mixed.config.modalities[AUDIO], INPUTS["audio"], True, None)
    with mmcore.matmul_precision("int8"):
        audio = base.encoder("audio").embed(x, attention_mask=mask)[0]
    assert not _same(audio, base.encoder("audio").embed(x, attention_mask=mask)[0])
    assert not _same(a.fused, b.fused)
    for m in (TEXT, AUDIO):
        assert _row_rel(b.embeddings[m], a.embeddings[m], a.masks[m]) < REL_BOUND


def test_encode_modality_uses_the_modality_precision(models):
    _, mixed = models
    tokens, _, pooled = mixed.encode_modality("text", INPUTS["text"])
    assert _same(tokens, mixed.infer({"text": INPUTS["text"]}).embeddings[TEXT])
    x, mask = mixed._prepare(TEXT, mixed.config.modalities[TEXT], INPUTS["text"], True, None)
    with mmcore.matmul_precision("int8"):
        want = mixed.encoder("text")(x, attention_mask=mask)[2]
    assert _same(pooled, want)
    assert not _same(pooled, mixed.encoder("text")(x, attention_mask=mask)[2])


# ============================================================================================
# cache keys


def test_cache_never_serves_one_precision_for_another():
    cached = default_model(seed=0, fusion=LateFusion("mean"))
    plain = default_model(seed=0, cache=False, fusion=LateFusion("mean"))
    inputs = {"text": INPUTS["text"], "image": INPUTS["image"]}
    results = {}
    for p in PRECISIONS + PRECISIONS:                 # second round: from the cache
        with mmcore.matmul_precision(p):
            out = cached.infer(inputs)
            want = plain.infer(inputs)
        for m in (TEXT, IMAGE):
            assert _same(out.embeddings[m], want.embeddings[m]), (p, m)
        assert _same(out.fused, want.fused)
        results.setdefault(p, out.fused)
    st = cached.cache_stats()["caches"]
    assert st["text"]["hits"] == 4 * 3 and st["text"]["misses"] == 4 * 3
    assert len({results[p].tobytes() for p in PRECISIONS}) == 3
    # the keys themselves differ by precision
    keys = {}
    for p in PRECISIONS:
        item_keys: dict = {}
        with mmcore.matmul_precision(p):
            cached._encode_one(TEXT, cached.config.modalities[TEXT],
                               mmcore.model.MultiModalInput({"text": ["a key"]}), {}, True,
                               item_keys)
        keys[p] = item_keys[TEXT][0]
    assert len(set(keys.values())) == 3


def test_fused_vector_key_carries_the_fusion_precision():
    # every modality fixes its own precision, so the item keys are the same under any thread
    # precision; the attention fusion runs under the thread's, and its cache must follow it
    base = default_model(seed=0)
    cfg = _with_precisions(base, text="int8", image="bf16")
    cached = MultiModalModel(cfg, seed=0)
    plain = MultiModalModel(cfg, seed=0, cache=False)
    inputs = {"text": INPUTS["text"][:2], "image": INPUTS["image"][:2]}
    first = cached.infer(inputs).fused
    with mmcore.matmul_precision("bf16"):
        second = cached.infer(inputs).fused
        want = plain.infer(inputs).fused
    assert _same(second, want) and not _same(second, first)
    st = cached.cache_stats()["caches"]
    assert st["text"]["hits"] == 2 and st["fusion"]["hits"] == 0
    assert _same(cached.infer(inputs).fused, first)             # both now cached
    assert cached.cache_stats()["caches"]["fusion"]["hits"] == 2


# ============================================================================================
# packed weights


@pytest.mark.parametrize("p", PRECISIONS)
def test_linear_packed_equals_the_plain_weight(p):
    lin = Linear(37, 29, rng=1)
    x = np.random.default_rng(2).standard_normal((3, 5, 37), dtype=np.float32)
    with mmcore.matmul_precision(p):
        y = lin(x)
        y2 = lin(x)
    assert _same(y, linear(x, lin.weight, lin.bias, precision=p)) and _same(y, y2)
    pw = lin.packed_weight("weight")
    assert isinstance(pw, PackedWeight) and p in pw.cached_precisions
    assert lin.packed_weight("weight") is pw                     # packed once, kept


def test_linear_packed_on_numba_equals_the_plain_weight():
    need_backend("numba")
    lin = Linear(19, 7, rng=3)
    x = np.random.default_rng(4).standard_normal((4, 19), dtype=np.float32)
    for p in PRECISIONS:
        with mmcore.use_backend("numba"), mmcore.matmul_precision(p):
            got = lin(x)
        assert _same(got, linear(x, lin.weight, lin.bias, precision=p, backend="numba"))


@pytest.mark.parametrize("p", PRECISIONS)
def test_replacing_a_weight_after_a_call_changes_the_next_result(p):
    rng = np.random.default_rng(5)
    x = rng.standard_normal((2, 9, 32), dtype=np.float32)
    layer = TransformerEncoderLayer(32, 4, 48, rng=6)
    with mmcore.matmul_precision(p):
        before = layer(x)
        new = rng.standard_normal((48, 32)).astype(np.float32) * 0.2
        layer.set_parameter("linear1.weight", new)
        after = layer(x)
        fresh = TransformerEncoderLayer.from_state_dict(layer.state_dict(), nhead=4)
        assert _same(after, fresh(x)) and not _same(after, before)
        # load_state_dict, on the attention projection the fused block reads
        sd = layer.state_dict()
        sd["self_attn.in_proj_weight"] = sd["self_attn.in_proj_weight"][::-1].copy()
        layer.load_state_dict(sd)
        again = layer(x)
        assert _same(again, TransformerEncoderLayer.from_state_dict(sd, nhead=4)(x))
        assert not _same(again, after)
        # a quantized weight in place of a float32 one (of other values: under "int8" a
        # weight quantized as the precision quantizes it gives the same bits)
        q, scale = quantize_int8(sd["linear2.weight"][::-1])
        layer.set_parameter("linear2.weight", QuantizedTensor(q, "int8", scale=scale))
        quant = layer(x)
        sd["linear2.weight"] = QuantizedTensor(q, "int8", scale=scale)
        assert _same(quant, TransformerEncoderLayer.from_state_dict(sd, nhead=4)(x))
        assert not _same(quant, again)
        # the step-by-step path (causal) reads the same packs
        causal = layer(x, is_causal=True)
        assert _same(causal, TransformerEncoderLayer.from_state_dict(sd, nhead=4)(
            x, is_causal=True))


@pytest.mark.parametrize("p", PRECISIONS)
def test_cross_attention_slices_follow_the_weights(p):
    rng = np.random.default_rng(8)
    q = rng.standard_normal((2, 5, 24), dtype=np.float32)
    ctx = rng.standard_normal((2, 7, 24), dtype=np.float32)
    for kdim in (None, 16):
        c = ctx if kdim is None else ctx[..., :16].copy()
        layer = CrossModalAttention(24, 4, kdim=kdim, vdim=kdim, rng=9)
        with mmcore.matmul_precision(p):
            first = (layer(q, c), layer(q, c, value=c * 2))
            name = "in_proj_weight" if kdim is None else "k_proj_weight"
            w = layer.state_dict()[name]
            layer.set_parameter(name, w * -1.5)
            second = (layer(q, c), layer(q, c, value=c * 2))
            fresh = CrossModalAttention.from_state_dict(layer.state_dict(), num_heads=4)
            third = (fresh(q, c), fresh(q, c, value=c * 2))
        for a, b, f in zip(first, second, third):
            assert _same(b, f) and not _same(a, b)


def test_replacing_a_model_weight_changes_its_outputs():
    model = default_model(seed=0, cache=False, fusion=LateFusion("mean"))
    cfg = _with_precisions(model, text="int8")
    model = MultiModalModel(cfg, seed=0, cache=False)
    first = model.infer({"text": INPUTS["text"]}).embeddings[TEXT]
    enc = model.encoder("text")
    key = "encoder.layers.0.linear2.weight"
    enc.set_parameter(key, enc.state_dict()[key] * 0.5)
    second = model.infer({"text": INPUTS["text"]}).embeddings[TEXT]
    fresh = MultiModalModel(cfg, seed=0, cache=False)
    fresh.load_state_dict(model.state_dict())
    assert _same(second, fresh.infer({"text": INPUTS["text"]}).embeddings[TEXT])
    assert not _same(first, second)


def test_packs_are_dropped_with_the_weights_and_left_out_of_copies():
    lin = Linear(8, 6, rng=0)
    x = np.ones((2, 8), np.float32)
    with mmcore.matmul_precision("int8"):
        lin(x)
    pw = lin.packed_weight("weight")
    assert pw.cached_precisions == ("int8",) and np.shares_memory(pw.source, lin.weight)
    assert lin.packed_nbytes() == pw.packed("int8").nbytes > 0    # the packs, not the weight
    lin.set_parameter("bias", np.zeros(6, np.float32))          # any replacement drops them
    assert lin.packed_nbytes() == 0 and lin.packed_weight("weight") is not pw
    lin(x)
    with pytest.raises(AttributeError, match="set_parameter"):
        lin.weight = np.zeros((6, 8), np.float32)
    with pytest.raises(ValueError, match="read-only"):
        lin.weight[0, 0] = 1.0
    for other in (copy.copy(lin), copy.deepcopy(lin), pickle.loads(pickle.dumps(lin))):
        assert "_packs" not in other.__dict__ and _same(other(x), lin(x))
        other.set_parameter("weight", np.zeros((6, 8), np.float32))
        assert not _same(other(x), lin(x))
    layer = TransformerEncoderLayer(16, 2, 24, rng=0)
    layer(np.ones((1, 3, 16), np.float32))
    assert "_native_args" in layer.__dict__
    clone = pickle.loads(pickle.dumps(layer))
    assert "_native_args" not in clone.__dict__
    assert _same(clone(np.ones((1, 3, 16), np.float32)), layer(np.ones((1, 3, 16), np.float32)))


def test_packed_weight_of_an_absent_parameter_is_an_error():
    lin = Linear(3, 2, bias=False, rng=0)
    with pytest.raises(ModelFormatError, match=r"\[Linear\] packed_weight: no parameter 'bias'"):
        lin.packed_weight("bias")
    with pytest.raises(ModelFormatError, match=r"no parameter 'nope' \(present: \['weight'\]\)"):
        lin.packed_weight("nope")


def test_quantized_weights_are_used_in_place_and_frozen():
    w = np.random.default_rng(1).standard_normal((12, 10)).astype(np.float32)
    q, scale = quantize_int8(w)
    lin = Linear(10, 12, rng=0)
    lin.set_parameter("weight", QuantizedTensor(q, "int8", scale=scale))
    qt = lin.weight
    assert isinstance(qt, QuantizedTensor) and qt.frozen
    assert lin.packed_weight("weight") is qt                     # no float32 copy of it
    x = np.random.default_rng(2).standard_normal((3, 10), dtype=np.float32)
    for p in PRECISIONS:
        with mmcore.matmul_precision(p):
            assert _same(lin(x), linear(x, qt, lin.bias, precision=p))
    assert set(qt._packs.packs) == {"bf16", "int8"}              # "highest" reads int8 in place
    h = QuantizedTensor(w.astype(np.float16), "float16")
    lin.set_parameter("weight", h)
    with mmcore.matmul_precision("highest"):
        assert _same(lin(x), linear(x, h.dequantize(), lin.bias))
    assert set(lin.weight._packs.packs) == {"highest"}          # float16: widened once
    # float16 bits viewed as uint16: the base array becomes read-only too, so it is frozen
    h = w.astype(np.float16)
    lin.set_parameter("weight", QuantizedTensor(h, "float16"))
    assert lin.weight.frozen and not h.flags.writeable


# ============================================================================================
# threads


def test_thread_precisions_do_not_leak_between_concurrent_encodings():
    cfg = default_model(seed=0, fusion=LateFusion("mean")).config
    model = MultiModalModel(cfg, seed=0)                         # with its cache
    plain = MultiModalModel(cfg, seed=0, cache=False)
    texts = [[f"item {i} of thread {t}" for i in range(3)] for t in range(2)]
    want = {}
    for t, p in enumerate(("int8", "highest")):
        with mmcore.matmul_precision(p):
            want[t] = plain.infer({"text": texts[t], "image": INPUTS["image"][:3]})
    rounds = 6
    barrier = threading.Barrier(2, timeout=60)
    errors = []
    got = {0: [], 1: []}

    def run(t, p):
        try:
            for r in range(rounds):
                barrier.wait()
                if p == "int8":
                    with mmcore.matmul_precision("int8"):
                        out = model.infer({"text": texts[t], "image": INPUTS["image"][:3]})
                        got[t].append((out, mmcore.get_matmul_precision()))
                else:
                    out = model.infer({"text": texts[t], "image": INPUTS["image"][:3]})
                    got[t].append((out, mmcore.get_matmul_precision()))
                if r == 2:
                    model.clear_cache()
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(t, p))
               for t, p in enumerate(("int8", "highest"))]
    for th in threads:
        th.start()
    for th in threads:
        th.join(120)
    assert not errors, errors
    for t, p in enumerate(("int8", "highest")):
        assert len(got[t]) == rounds
        for out, seen in got[t]:
            assert seen == p
            for m in (TEXT, IMAGE):
                assert _same(out.embeddings[m], want[t].embeddings[m]), (t, m)
            assert _same(out.fused, want[t].fused)
    assert mmcore.get_matmul_precision() == "highest"


def test_freeze_copies_quantized_data_over_a_writable_buffer():
    """Data viewing a buffer that others can still write (a bytearray) is copied when frozen,
    so a later write to the buffer cannot reach the kept packs."""
    buf = bytearray(np.ones((2, 4), np.float16).tobytes())
    q = QuantizedTensor(np.frombuffer(buf, np.uint16).reshape(2, 4), "float16")
    frozen = freeze_quantized(q)
    assert frozen.frozen and frozen is not q
    x = np.ones((1, 4), np.float32)
    with mmcore.matmul_precision("bf16"):
        before = linear(x, frozen)
        buf[:] = np.full((2, 4), 2, np.float16).tobytes()
        after = linear(x, frozen)
    np.testing.assert_array_equal(before, after)
    np.testing.assert_array_equal(after, np.full((1, 2), 4, np.float32))
    # an array owning its memory is only marked read-only, not copied
    h = np.ones((2, 4), np.float16)
    q2 = freeze_quantized(QuantizedTensor(h, "float16"))
    assert np.shares_memory(q2.data, h)
