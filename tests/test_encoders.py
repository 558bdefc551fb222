"""Tests of the built-in encoders (mmcore.model.encoders) and the fusion layer
(mmcore.model.fusion)."""

from __future__ import annotations

import numpy as np
import pytest

from mmcore.config import (
    AttentionFusion,
    CrossModalAttentionConfig,
    CustomFusion,
    EarlyFusion,
    EncoderConfig,
    LateFusion,
    MiddleFusion,
    ModalityConfig,
    MultiModalConfig,
)
from mmcore.errors import ConfigError, ModalityError, ModelFormatError, ShapeError
from mmcore.modality import Modality
from mmcore.model import (
    FeatureEmbedder,
    FusionLayer,
    MelFrameEmbedder,
    ModalityEncoder,
    PatchEmbedder,
    TokenEmbedder,
    TransformerEncoder,
    VideoEmbedder,
)
from mmcore.ops import patchify

ATOL = 1e-5
# short names of the modalities (I is the image one)
T, I, A, V = Modality.TEXT, Modality.IMAGE, Modality.AUDIO, Modality.VIDEO  # noqa: E741


def _rand(rng, shape):
    return rng.standard_normal(shape, dtype=np.float32)


def _enc_cfg(**kw):
    base = dict(num_layers=2, num_heads=2)
    base.update(kw)
    return EncoderConfig(**base)


# ----------------------------------------------------------------------------------------------
# embedders


def test_token_embedder_shapes_and_values():
    emb = TokenEmbedder(11, 8, 6, rng=0)
    ids = np.array([[1, 2, 3, 0], [4, 0, 0, 0]])
    tok, mask = emb(ids, attention_mask=ids > 0)
    assert tok.shape == (2, 4, 8) and tok.dtype == np.float32
    assert mask.tolist() == [[True, True, True, False], [True, False, False, False]]
    np.testing.assert_array_equal(tok[1, 0], emb.token_embedding[4] + emb.position_embedding[0])
    with pytest.raises(ShapeError):
        emb(np.array([[11]]))
    with pytest.raises(ShapeError):
        emb(np.zeros((1, 7), np.int64))          # longer than the position table
    with pytest.raises(ShapeError):
        emb(np.zeros((1, 2), np.float32))


def test_patch_embedder_matches_manual_and_prepatchified():
    rng = np.random.default_rng(0)
    emb = PatchEmbedder(3, 4, 10, 12, rng=1)
    x = _rand(rng, (2, 3, 8, 12))
    tok, mask = emb(x)
    assert tok.shape == (2, 6, 10) and mask.all()
    p = patchify(x, 4)
    ref = p @ emb.proj.weight.T + emb.proj.bias + emb.position_embedding[:6]
    np.testing.assert_allclose(tok, ref, atol=ATOL)
    np.testing.assert_allclose(emb(p)[0], tok, atol=ATOL)
    with pytest.raises(ShapeError):
        emb(_rand(rng, (2, 1, 8, 8)))


def test_mel_frame_embedder_stride_and_mask():
    rng = np.random.default_rng(1)
    emb = MelFrameEmbedder(5, 8, 20, rng=0)
    x = _rand(rng, (2, 5, 7))
    tok, mask = emb(x)
    assert tok.shape == (2, 7, 8)
    ref = x.transpose(0, 2, 1) @ emb.proj.weight.T + emb.proj.bias + emb.position_embedding[:7]
    np.testing.assert_allclose(tok, ref, atol=ATOL)

    s = MelFrameEmbedder(5, 8, 4, frame_stride=2, rng=0)
    fm = np.array([[1] * 7, [1] * 3 + [0] * 4], bool)
    tok, mask = s(x, attention_mask=fm)
    assert tok.shape == (2, 4, 8)
    assert mask.tolist() == [[True] * 4, [True, True, False, False]]
    # token 1 of row 1 averages only the real frame 2
    frame = x[1, :, 2]
    np.testing.assert_allclose(tok[1, 1], frame @ s.proj.weight.T + s.proj.bias
                               + s.position_embedding[1], atol=ATOL)


def test_video_embedder_positions_and_padding():
    rng = np.random.default_rng(2)
    emb = VideoEmbedder(3, 4, 2, 6, 4, max_temporal=3, rng=0)
    x = _rand(rng, (2, 4, 3, 8, 8))
    tok, mask = emb(x)
    assert tok.shape == (2, 8, 6) and mask.all()
    p = patchify(x, 4, temporal_patch=2)                       # (B, 2*4, 3*2*16)
    ref = p @ emb.proj.weight.T + emb.proj.bias
    pos = (emb.spatial_position[np.arange(8) % 4] + emb.temporal_position[np.arange(8) // 4])
    np.testing.assert_allclose(tok, ref + pos, atol=ATOL)
    # odd frame count: the last frame is repeated; frame mask -> tubelet mask
    tok3, mask3 = emb(x[:, :3], attention_mask=np.array([[1, 1, 1], [1, 0, 0]], bool))
    assert tok3.shape == (2, 8, 6)
    assert mask3[1].tolist() == [True] * 4 + [False] * 4
    x3 = np.concatenate([x[:, :3], x[:, 2:3]], axis=1)
    np.testing.assert_allclose(tok3[0], emb(x3)[0][0], atol=ATOL)
    # row 1 has one real frame: its tubelet repeats it, as the clip alone does (batch invariance)
    np.testing.assert_array_equal(tok3[1, :4], emb(x[1:2, :1])[0][0])
    # temporal_patch 1
    e1 = VideoEmbedder(3, 4, 1, 6, 4, max_temporal=4, rng=0)
    assert e1(x)[0].shape == (2, 16, 6)


def test_feature_embedder():
    emb = FeatureEmbedder(5, 8, 10, rng=0)
    tok, mask = emb(np.zeros((2, 3, 5), np.float32))
    np.testing.assert_allclose(tok[0], emb.proj.bias + emb.position_embedding[:3], atol=ATOL)


# ----------------------------------------------------------------------------------------------
# transformer encoder


def test_transformer_encoder_split_equals_full():
    rng = np.random.default_rng(3)
    enc = TransformerEncoder(16, 4, 4, rng=0)
    x = _rand(rng, (2, 7, 16))
    mask = np.arange(7)[None] < np.array([[7], [4]])
    full = enc(x, attention_mask=mask)
    for k in range(5):
        h = enc(x, attention_mask=mask, end_layer=k)
        np.testing.assert_allclose(enc(h, attention_mask=mask, start_layer=k), full,
                                   atol=1e-5, rtol=1e-5)
    h = enc(x, attention_mask=mask, end_layer=1)
    h = enc(h, attention_mask=mask, start_layer=1, end_layer=3)
    np.testing.assert_allclose(enc(h, attention_mask=mask, start_layer=3), full,
                               atol=1e-5, rtol=1e-5)
    with pytest.raises(ConfigError):
        enc(x, start_layer=3, end_layer=2)
    assert enc.dim_feedforward == 64
    assert list(enc.state_dict())[-2:] == ["norm.weight", "norm.bias"]


def test_transformer_encoder_deterministic_and_round_trip():
    a, b, c = (TransformerEncoder(8, 2, 2, rng=s) for s in (5, 5, 6))
    sa = a.state_dict()
    for k, v in b.state_dict().items():
        np.testing.assert_array_equal(v, sa[k])
    assert any(not np.array_equal(v, sa[k]) for k, v in c.state_dict().items())
    c.load_state_dict(sa)
    x = np.random.default_rng(0).standard_normal((1, 3, 8), dtype=np.float32)
    np.testing.assert_array_equal(c(x), a(x))
    with pytest.raises(ModelFormatError):
        c.load_state_dict({k: v for k, v in sa.items() if k != "norm.bias"})


def test_transformer_encoder_matches_torch():
    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    D, H, FF, N = 16, 4, 40, 3
    layer = torch.nn.TransformerEncoderLayer(D, H, FF, dropout=0.0, activation="gelu",
                                             batch_first=True, norm_first=True)
    tenc = torch.nn.TransformerEncoder(layer, N, norm=torch.nn.LayerNorm(D),
                                       enable_nested_tensor=False).eval()
    sd = {k: v.detach().numpy() for k, v in tenc.state_dict().items()}
    enc = TransformerEncoder(D, N, H, dim_feedforward=FF, rng=1).load_state_dict(sd)
    rng = np.random.default_rng(4)
    x = _rand(rng, (3, 9, D))
    lengths = np.array([9, 5, 1])
    mask = np.arange(9)[None] < lengths[:, None]
    with torch.no_grad():
        ref = tenc(torch.from_numpy(x), src_key_padding_mask=torch.from_numpy(~mask)).numpy()
    out = enc(x, attention_mask=mask)
    np.testing.assert_allclose(out[mask], ref[mask], atol=2e-5, rtol=1e-4)


# ----------------------------------------------------------------------------------------------
# modality encoders


def _text_cfg(pooling="mean", hidden=None, embed=16):
    return ModalityConfig("text", embed_dim=embed, encoder_config=_enc_cfg(
        vocab_size=50, max_positions=12, pooling=pooling, hidden_dim=hidden))


@pytest.mark.parametrize("pooling", ["mean", "max", "cls"])
def test_text_encoder_padding_does_not_change_pooled(pooling):
    enc = ModalityEncoder.from_config(_text_cfg(pooling, hidden=8), rng=0)
    ids = np.array([[3, 4, 5, 6, 7], [8, 9, 10, 0, 0]])
    mask = ids > 0
    tokens, m, pooled = enc(ids, attention_mask=mask)
    extra = 1 if pooling == "cls" else 0
    assert tokens.shape == (2, 5 + extra, 16) and pooled.shape == (2, 16)
    assert m.shape == (2, 5 + extra)
    t1, _, p1 = enc(ids[1:, :3])
    np.testing.assert_allclose(pooled[1], p1[0], atol=ATOL)
    np.testing.assert_allclose(tokens[1, :3 + extra], t1[0], atol=ATOL)
    if pooling == "cls":
        np.testing.assert_array_equal(pooled, tokens[:, 0])


def test_modality_encoder_determinism_and_state_dict():
    cfg = _text_cfg("cls", hidden=8)
    a = ModalityEncoder.from_config(cfg, rng=3)
    b = ModalityEncoder.from_config(cfg, rng=3)
    c = ModalityEncoder.from_config(cfg, rng=np.random.default_rng(4))
    sd = a.state_dict()
    keys = list(sd)
    assert "embedder.token_embedding" in keys and "cls_token" in keys
    assert "encoder.layers.1.linear2.weight" in keys and "proj.weight" in keys
    ids = np.array([[1, 2, 3]])
    np.testing.assert_array_equal(a(ids)[2], b(ids)[2])
    assert not np.allclose(a(ids)[2], c(ids)[2])
    c.load_state_dict(sd)
    np.testing.assert_array_equal(a(ids)[2], c(ids)[2])


@pytest.mark.parametrize("kind", ["image", "audio", "video"])
def test_builtin_encoders_from_config(kind):
    rng = np.random.default_rng(5)
    ec = _enc_cfg(hidden_dim=8, patch_size=None if kind == "audio" else 4,
                  max_positions=16 if kind != "video" else 4)
    pre = {"image": {"size": 8}, "audio": {"n_mels": 6, "preset": None},
           "video": {"size": 8, "num_frames": 4}}[kind]
    mc = ModalityConfig(kind, embed_dim=12, encoder_config=ec, preprocessing=pre)
    enc = ModalityEncoder.from_config(mc, rng=0)
    if kind == "image":
        x = _rand(rng, (2, 3, 8, 8))
        L = 4
        tokens, mask, pooled = enc(x)
    elif kind == "audio":
        x = _rand(rng, (2, 6, 10))
        fm = np.arange(10)[None] < np.array([[10], [6]])
        tokens, mask, pooled = enc(x, attention_mask=fm)
        L = 10
        _, _, p1 = enc(x[1:, :, :6])
        np.testing.assert_allclose(pooled[1], p1[0], atol=ATOL)
    else:
        x = _rand(rng, (2, 4, 3, 8, 8))
        L = 8
        tokens, mask, pooled = enc(x)
    assert tokens.shape == (2, L, 12) and mask.shape == (2, L) and pooled.shape == (2, 12)
    assert np.isfinite(tokens).all()


def test_custom_modality_needs_input_spec():
    mc = ModalityConfig("custom:3", embed_dim=8, encoder_config=_enc_cfg(extra={"in_features": 5}))
    enc = ModalityEncoder.from_config(mc, rng=0)
    assert enc(np.zeros((1, 4, 5), np.float32))[2].shape == (1, 8)
    with pytest.raises(ConfigError):
        ModalityEncoder.from_config(ModalityConfig("custom:3", embed_dim=8,
                                                   encoder_config=_enc_cfg()), rng=0)


def test_zero_layer_encoder_is_embedding():
    mc = ModalityConfig("text", embed_dim=8, encoder_config=_enc_cfg(
        num_layers=0, vocab_size=20, max_positions=4))
    enc = ModalityEncoder.from_config(mc, rng=0)
    ids = np.array([[1, 2]])
    np.testing.assert_allclose(enc(ids)[0], enc.embedder(ids)[0], atol=0)


# ----------------------------------------------------------------------------------------------
# fusion


def _mm(fusion, *, fused_dim=16, cross=None, dims=(8, 12)):
    return MultiModalConfig(
        [ModalityConfig("text", embed_dim=dims[0], encoder_config=_enc_cfg()),
         ModalityConfig("image", embed_dim=dims[1], encoder_config=_enc_cfg(num_layers=3)),
         ModalityConfig("audio", embed_dim=dims[0], encoder_config=_enc_cfg())],
        fusion=fusion, fused_dim=fused_dim, cross_attention=cross)


def _embeddings(cfg, seed=0, B=2):
    rng = np.random.default_rng(seed)
    out = {}
    for i, (m, mc) in enumerate(cfg.modalities.items()):
        L = 3 + i
        ec = mc.encoder_config
        D = ec.hidden_dim or mc.embed_dim
        mask = np.ones((B, L), bool)
        mask[-1, L - 1 - i:] = False
        out[m] = (_rand(rng, (B, L, D)), mask, _rand(rng, (B, D)))
    return out


_STRATEGIES = [EarlyFusion(), MiddleFusion(fusion_layer=1), LateFusion("mean"),
               LateFusion("concat"), LateFusion("max"), LateFusion("sum"),
               LateFusion("weighted"), LateFusion("attention"),
               AttentionFusion(attention_dim=8, num_heads=2)]


@pytest.mark.parametrize("strategy", _STRATEGIES, ids=lambda s: s.TYPE + getattr(s, "reduce", ""))
def test_every_strategy_with_missing_modality(strategy):
    cross = CrossModalAttentionConfig(num_heads=2) if strategy.TYPE == "attention" else None
    cfg = _mm(strategy, cross=cross)
    fl = FusionLayer.from_config(cfg, rng=0)
    emb = _embeddings(cfg)
    out = fl(emb, return_weights=True)
    assert out["fused"].shape == (2, cfg.output_dim) and out["fused"].dtype == np.float32
    assert np.isfinite(out["fused"]).all()
    assert isinstance(out["attention_weights"], dict)
    part = {m: v for m, v in emb.items() if m != I}
    out2 = fl(part)
    assert out2["fused"].shape == (2, cfg.output_dim) and np.isfinite(out2["fused"]).all()
    # an all-padding modality behaves as a missing one (token-level strategies and late)
    allpad = dict(part)
    t, mask, p = emb[I]
    allpad[I] = (t, np.zeros_like(mask), p)
    np.testing.assert_allclose(fl(allpad)["fused"], out2["fused"], atol=1e-5)
    # deterministic from the seed
    fl2 = FusionLayer.from_config(cfg, rng=0)
    np.testing.assert_array_equal(fl2(emb)["fused"], out["fused"])
    # state dict round trip
    fl3 = FusionLayer.from_config(cfg, rng=7).load_state_dict(fl.state_dict())
    np.testing.assert_array_equal(fl3(emb)["fused"], out["fused"])
    with pytest.raises(ModalityError):
        fl({})


def test_middle_fusion_joint_depth_and_interface():
    cfg = _mm(MiddleFusion(fusion_layer=2))
    fl = FusionLayer.from_config(cfg, rng=0)
    assert fl.joint_encoder.num_layers == 1 and fl.joint_encoder.dim == 16
    out = fl.joint({m: (t, mask) for m, (t, mask, _) in _embeddings(cfg).items()})
    assert out["tokens"].shape == (2, 3 + 4 + 5, 16) and out["fused"].shape == (2, 16)


def test_early_fusion_padding_invariance():
    cfg = _mm(EarlyFusion())
    fl = FusionLayer.from_config(cfg, rng=0)
    emb = _embeddings(cfg)
    out = fl(emb)
    # drop the padding of the last row and run it alone
    row = {}
    for m, (t, mask, p) in emb.items():
        n = int(mask[-1].sum())
        row[m] = (t[-1:, :n], mask[-1:, :n], p[-1:])
    np.testing.assert_allclose(fl(row)["fused"][0], out["fused"][-1], atol=1e-5)


def _np_fuse(vecs, present, reduce, weights=None, query=None):
    vecs = [v.astype(np.float64) for v in vecs]
    B = vecs[0].shape[0]
    if reduce == "concat":
        return np.concatenate([np.where(present[:, i:i + 1], v, 0) for i, v in enumerate(vecs)],
                              axis=1)
    out = []
    for b in range(B):
        es = [v[b] for i, v in enumerate(vecs) if present[b, i]]
        if reduce == "mean":
            out.append(np.mean(es, axis=0))
        elif reduce == "max":
            out.append(np.max(es, axis=0))
        elif reduce == "sum":
            out.append(np.sum(es, axis=0))
        elif reduce == "weighted":
            w = np.array([weights[i] for i in range(len(vecs)) if present[b, i]], np.float64)
            out.append(np.tensordot(w / w.sum(), np.array(es), axes=1))
        elif reduce == "attention":
            e = np.array(es)
            s = e @ query.astype(np.float64) / np.sqrt(e.shape[1])
            w = np.exp(s - s.max())
            out.append((w / w.sum()) @ e)
    return np.array(out)


@pytest.mark.parametrize("reduce", ["mean", "sum", "max", "concat", "weighted", "attention"])
def test_late_fusion_matches_numpy(reduce):
    weights = {"text": 2.0, "image": 1.0, "audio": 0.5} if reduce == "weighted" else None
    cfg = _mm(LateFusion(reduce, weights=weights))
    fl = FusionLayer.from_config(cfg, rng=1)
    emb = _embeddings(cfg, seed=3, B=3)
    emb[A] = (emb[A][0], np.array([[1] * 5, [0] * 5, [1] * 5], bool), emb[A][2])
    del emb[I]
    out = fl(emb, return_weights=True)
    vecs, present = [], np.zeros((3, 3), bool)
    for i, m in enumerate((T, I, A)):
        if m in emb:
            lin = fl.input_proj.get(str(m))
            vecs.append(emb[m][2].astype(np.float64) @ lin.weight.T.astype(np.float64) + lin.bias)
            present[:, i] = emb[m][1].any(axis=1)
        else:
            vecs.append(np.zeros((3, 16)))
    ref = _np_fuse(vecs, present, reduce, weights=[2.0, 1.0, 0.5],
                   query=fl.query if reduce == "attention" else None)
    np.testing.assert_allclose(out["fused"], ref, atol=1e-5, rtol=1e-5)
    if reduce in ("weighted", "attention"):
        w = np.stack([out["attention_weights"][m] for m in (T, I, A)], axis=1)
        np.testing.assert_allclose(w.sum(axis=1), 1.0, atol=1e-6)
        assert (w[:, 1] == 0).all() and w[1, 2] == 0


def test_late_concat_without_fused_dim_keeps_widths():
    cfg = _mm(LateFusion("concat"), fused_dim=None)
    fl = FusionLayer.from_config(cfg, rng=0)
    emb = _embeddings(cfg)
    out = fl({T: emb[T], A: emb[A]})["fused"]
    assert out.shape == (2, 8 + 12 + 8)
    np.testing.assert_array_equal(out[:, :8], emb[T][2])
    np.testing.assert_array_equal(out[:, 8:20], 0)


def test_attention_fusion_weights_respect_masks():
    cfg = _mm(AttentionFusion(attention_dim=8, num_heads=2),
              cross=CrossModalAttentionConfig(num_heads=2, pairs=[("text", "image")]))
    fl = FusionLayer.from_config(cfg, rng=0)
    emb = _embeddings(cfg)
    out = fl(emb, return_weights=True)
    aw = out["attention_weights"]
    assert set(aw) == {T, I, A, (T, I)}
    total = sum(aw[m].sum(axis=1) for m in (T, I, A))
    np.testing.assert_allclose(total, 1.0, atol=1e-5)
    for m in (T, I, A):
        assert (aw[m][~emb[m][1]] == 0).all()
    assert aw[(T, I)].shape == (2, 3, 4)


def test_custom_fusion_receives_pooled():
    seen = {}

    def fn(emb, *, scale=1.0):
        seen.update(emb)
        return scale * sum(emb.values())

    cfg = _mm(CustomFusion(fn, options={"scale": 2.0}))
    fl = FusionLayer.from_config(cfg, rng=0)
    emb = _embeddings(cfg)
    out = fl({T: emb[T], I: emb[I]})
    assert set(seen) == {T, I} and all(v.shape == (2, 16) for v in seen.values())
    np.testing.assert_allclose(out["fused"], 2.0 * (seen[T] + seen[I]), atol=1e-6)
    bad = FusionLayer.from_config(_mm(CustomFusion(lambda e: np.zeros(3))), rng=0)
    with pytest.raises(ShapeError):
        bad({T: emb[T]})


def test_fusion_rejects_unknown_modality_and_bad_width():
    cfg = _mm(LateFusion("mean"))
    fl = FusionLayer.from_config(cfg, rng=0)
    emb = _embeddings(cfg)
    with pytest.raises(ModalityError):
        fl({V: emb[T]})
    with pytest.raises(ShapeError):
        fl({T: emb[I]})


def test_docstring_examples():
    import doctest

    import mmcore.model.encoders as enc_mod
    import mmcore.model.fusion as fusion_mod
    for mod in (enc_mod, fusion_mod):
        failures, tried = doctest.testmod(mod, optionflags=doctest.NORMALIZE_WHITESPACE)
        assert tried > 0 and failures == 0, mod.__name__
