"""Tests of mmcore.model layers: equivalence with PyTorch, state dicts, masks, init."""

from __future__ import annotations

import ast
import math
import pathlib

import numpy as np
import pytest

from mmcore.errors import ConfigError, ModelFormatError, ShapeError
from mmcore.model import (
    CrossModalAttention,
    LayerNorm,
    Linear,
    MultiHeadSelfAttention,
    TransformerEncoderLayer,
    gelu,
    padding_mask_to_attention,
)
from mmcore.model import nn as mnn

ATOL = 1e-5


def _rand(rng, shape):
    return rng.standard_normal(shape, dtype=np.float32)


def _lengths_mask(lengths, L):
    """HF mask (True = real token) with right padding."""
    return np.arange(L)[None, :] < np.asarray(lengths)[:, None]


def _torch_sd(module):
    return {k: v.detach().cpu().numpy() for k, v in module.state_dict().items()}


# ----------------------------------------------------------------------------------------------
# float64 reference (independent of PyTorch)


def _ref_mha(layer, query, key, value, keep=None, temperature=1.0):
    """Multi-head attention in float64 from the layer's state dict; keep (B, Lk) True = real."""
    sd = {k: v.astype(np.float64) for k, v in layer.state_dict().items()}
    E, H = layer.embed_dim, layer.num_heads
    hd = E // H
    if "in_proj_weight" in sd:
        wq, wk, wv = np.split(sd["in_proj_weight"], 3)
    else:
        wq, wk, wv = sd["q_proj_weight"], sd["k_proj_weight"], sd["v_proj_weight"]
    bq, bk, bv = np.split(sd.get("in_proj_bias", np.zeros(3 * E)), 3)
    q = query.astype(np.float64) @ wq.T + bq
    k = key.astype(np.float64) @ wk.T + bk
    v = value.astype(np.float64) @ wv.T + bv
    B, Lq, Lk = q.shape[0], q.shape[1], k.shape[1]
    q = q.reshape(B, Lq, H, hd).transpose(0, 2, 1, 3)
    k = k.reshape(B, Lk, H, hd).transpose(0, 2, 1, 3)
    v = v.reshape(B, Lk, H, hd).transpose(0, 2, 1, 3)
    s = q @ k.transpose(0, 1, 3, 2) / math.sqrt(hd) / temperature
    if keep is not None:
        s = np.where(keep[:, None, None, :], s, -np.inf)
    s = s - s.max(-1, keepdims=True)
    w = np.exp(s)
    w /= w.sum(-1, keepdims=True)
    o = (w @ v).transpose(0, 2, 1, 3).reshape(B, Lq, E)
    return o @ sd["out_proj.weight"].T + sd.get("out_proj.bias", 0.0), w


# ----------------------------------------------------------------------------------------------
# equivalence with torch.nn.MultiheadAttention


MHA_CASES = [
    # embed_dim, num_heads, kdim, vdim, Lq, Lk
    (32, 4, None, None, 5, 9),
    (32, 4, 16, 24, 7, 13),
    (48, 3, 20, 20, 1, 33),
    (24, 1, 40, 8, 6, 1),
]


@pytest.mark.parametrize("case", MHA_CASES, ids=lambda c: f"E{c[0]}H{c[1]}k{c[2]}v{c[3]}")
@pytest.mark.parametrize("padding", ["none", "right", "holes"])
@pytest.mark.parametrize("average", [True, False])
def test_cross_attention_matches_torch(case, padding, average):
    torch = pytest.importorskip("torch")
    E, H, kdim, vdim, Lq, Lk = case
    B = 3
    torch.manual_seed(E + H + Lk)
    ref = torch.nn.MultiheadAttention(E, H, kdim=kdim, vdim=vdim, batch_first=True).eval()
    with torch.no_grad():  # non-zero biases so that they are exercised
        ref.in_proj_bias.normal_()
        ref.out_proj.bias.normal_()
    layer = CrossModalAttention.from_state_dict(_torch_sd(ref), num_heads=H)
    assert (layer.kdim, layer.vdim) == (kdim or E, vdim or E)

    rng = np.random.default_rng(Lq * 100 + Lk)
    q = _rand(rng, (B, Lq, E))
    k = _rand(rng, (B, Lk, kdim or E))
    v = _rand(rng, (B, Lk, vdim or E))
    if padding == "none":
        keep = None
    elif padding == "right":
        keep = _lengths_mask([Lk, max(1, Lk // 2), 1], Lk)
    else:
        keep = rng.random((B, Lk)) < 0.6
        keep[:, 0] = True  # no fully masked row here (PyTorch gives NaN there)

    with torch.no_grad():
        t_out, t_w = ref(torch.from_numpy(q), torch.from_numpy(k), torch.from_numpy(v),
                         key_padding_mask=None if keep is None else torch.from_numpy(~keep),
                         need_weights=True, average_attn_weights=average)
    out, w = layer(q, k, value=v, context_mask=keep, return_weights=True, average_weights=average)
    assert out.dtype == np.float32 and w.dtype == np.float32
    assert out.shape == (B, Lq, E)
    assert w.shape == ((B, Lq, Lk) if average else (B, H, Lq, Lk))
    np.testing.assert_allclose(out, t_out.numpy(), atol=ATOL, rtol=0)
    np.testing.assert_allclose(w, t_w.numpy(), atol=ATOL, rtol=0)

    # without weights: same output
    out2 = layer(q, k, value=v, context_mask=keep)
    np.testing.assert_allclose(out2, out, atol=1e-6, rtol=0)
    # and the float64 reference agrees
    r_out, _ = _ref_mha(layer, q, k, v, keep)
    np.testing.assert_allclose(out, r_out, atol=ATOL, rtol=0)


@pytest.mark.parametrize("kdim", [12, 32])
def test_cross_attention_context_as_values(kdim):
    torch = pytest.importorskip("torch")
    torch.manual_seed(kdim)
    ref = torch.nn.MultiheadAttention(32, 2, kdim=kdim, vdim=kdim, batch_first=True).eval()
    with torch.no_grad():
        ref.in_proj_bias.normal_()
    layer = CrossModalAttention.from_state_dict(_torch_sd(ref), num_heads=2)
    assert layer.packed == (kdim == 32)
    rng = np.random.default_rng(1)
    q, c = _rand(rng, (2, 4, 32)), _rand(rng, (2, 10, kdim))
    keep = _lengths_mask([10, 3], 10)
    with torch.no_grad():
        t_out, _ = ref(torch.from_numpy(q), torch.from_numpy(c), torch.from_numpy(c),
                       key_padding_mask=torch.from_numpy(~keep))
    np.testing.assert_allclose(layer(q, c, context_mask=keep), t_out.numpy(), atol=ATOL, rtol=0)


@pytest.mark.parametrize("causal", [False, True])
def test_self_attention_matches_torch(causal):
    torch = pytest.importorskip("torch")
    torch.manual_seed(3)
    E, H, B, L = 40, 5, 3, 11
    ref = torch.nn.MultiheadAttention(E, H, batch_first=True).eval()
    with torch.no_grad():
        ref.in_proj_bias.normal_()
        ref.out_proj.bias.normal_()
    sa = MultiHeadSelfAttention.from_state_dict(_torch_sd(ref), num_heads=H)
    rng = np.random.default_rng(4)
    x = _rand(rng, (B, L, E))
    keep = _lengths_mask([L, 7, 3], L)
    t_mask = torch.triu(torch.ones(L, L, dtype=torch.bool), 1) if causal else None
    with torch.no_grad():
        t_out, t_w = ref(*(torch.from_numpy(x),) * 3, key_padding_mask=torch.from_numpy(~keep),
                         attn_mask=t_mask, need_weights=True, average_attn_weights=False)
    out, w = sa(x, attention_mask=keep.astype(np.int64), is_causal=causal, return_weights=True,
                average_weights=False)
    np.testing.assert_allclose(out, t_out.numpy(), atol=ATOL, rtol=0)
    np.testing.assert_allclose(w, t_w.numpy(), atol=ATOL, rtol=0)


def test_temperature_divides_scores():
    layer = CrossModalAttention(16, 2, kdim=8, vdim=8, temperature=2.5, rng=0)
    rng = np.random.default_rng(5)
    q, c = _rand(rng, (2, 3, 16)), _rand(rng, (2, 6, 8))
    r_out, _ = _ref_mha(layer, q, c, c, temperature=2.5)
    np.testing.assert_allclose(layer(q, c), r_out, atol=ATOL, rtol=0)
    cold = CrossModalAttention.from_state_dict(layer.state_dict(), num_heads=2)
    assert not np.allclose(cold(q, c), layer(q, c), atol=1e-4)


def test_attn_bias_is_added():
    layer = CrossModalAttention(16, 4, rng=2)
    rng = np.random.default_rng(6)
    q, c = _rand(rng, (1, 3, 16)), _rand(rng, (1, 5, 16))
    bias = np.zeros((1, 1, 3, 5), np.float32)
    bias[..., 3:] = -np.inf
    keep = _lengths_mask([3], 5)
    np.testing.assert_allclose(layer(q, c, attn_bias=bias), layer(q, c, context_mask=keep),
                               atol=1e-6, rtol=0)


# ----------------------------------------------------------------------------------------------
# equivalence with torch.nn.TransformerEncoderLayer


ENC_CASES = [
    # d_model, nhead, ff, norm_first, activation, bias
    (32, 4, 64, True, "gelu", True),
    (48, 6, 80, False, "gelu", True),
    (32, 2, 48, True, "relu", True),
    (24, 3, 40, True, "gelu", False),
]


@pytest.mark.parametrize("case", ENC_CASES, ids=lambda c: f"d{c[0]}-{c[3]}-{c[4]}-b{c[5]}")
def test_encoder_layer_matches_torch(case):
    torch = pytest.importorskip("torch")
    d, h, ff, norm_first, act, bias = case
    torch.manual_seed(d + ff)
    ref = torch.nn.TransformerEncoderLayer(d, h, ff, dropout=0.0, activation=act, batch_first=True,
                                           norm_first=norm_first, bias=bias).eval()
    with torch.no_grad():  # non-trivial norms
        for norm in (ref.norm1, ref.norm2):
            norm.weight.uniform_(0.5, 1.5)
            if bias:
                norm.bias.normal_(0, 0.1)
    layer = TransformerEncoderLayer.from_state_dict(_torch_sd(ref), nhead=h, activation=act,
                                                    norm_first=norm_first)
    assert (layer.d_model, layer.dim_feedforward) == (d, ff)
    assert list(layer.state_dict()) == list(ref.state_dict())

    rng = np.random.default_rng(d)
    B, L = 3, 10
    x = _rand(rng, (B, L, d))
    keep = _lengths_mask([10, 6, 2], L)
    t_x = torch.from_numpy(x)
    t_kpm = torch.from_numpy(~keep)
    out = layer(x, attention_mask=keep)
    assert out.dtype == np.float32 and np.isfinite(out).all()
    with torch.no_grad():  # inference fast path where PyTorch takes it
        fast = ref(t_x, src_key_padding_mask=t_kpm).numpy()
    slow = ref(t_x, src_key_padding_mask=t_kpm).detach().numpy()  # autograd on: the slow path
    np.testing.assert_allclose(out[keep], fast[keep], atol=ATOL, rtol=0)
    np.testing.assert_allclose(out, slow, atol=ATOL, rtol=0)

    # unpadded
    with torch.no_grad():
        t_full = ref(t_x).numpy()
    np.testing.assert_allclose(layer(x), t_full, atol=ATOL, rtol=0)


def test_encoder_layer_causal_and_weights():
    torch = pytest.importorskip("torch")
    torch.manual_seed(11)
    ref = torch.nn.TransformerEncoderLayer(32, 4, 64, dropout=0.0, activation="gelu",
                                           batch_first=True, norm_first=True).eval()
    layer = TransformerEncoderLayer.from_state_dict(_torch_sd(ref), nhead=4)
    x = _rand(np.random.default_rng(12), (2, 7, 32))
    causal = torch.nn.Transformer.generate_square_subsequent_mask(7)
    t_out = ref(torch.from_numpy(x), src_mask=causal, is_causal=True).detach().numpy()
    out, w = layer(x, is_causal=True, return_weights=True)
    np.testing.assert_allclose(out, t_out, atol=ATOL, rtol=0)
    assert w.shape == (2, 7, 7)
    np.testing.assert_allclose(w.sum(-1), 1.0, atol=1e-5)
    assert np.all(np.triu(w, 1) == 0)


def test_encoder_layer_bert_style_activation_callable():
    layer = TransformerEncoderLayer(16, 2, 32, activation=lambda h: np.tanh(h), norm_first=False,
                                    rng=0)
    x = _rand(np.random.default_rng(0), (1, 4, 16))
    out = layer(x)
    # post-norm: every output row is normalised
    np.testing.assert_allclose(out.mean(-1), 0.0, atol=1e-5)
    assert "norm_first=False" in repr(layer)


# ----------------------------------------------------------------------------------------------
# building blocks


def test_linear_layernorm_gelu_match_torch():
    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    x = _rand(rng, (4, 6, 20)) * 3

    t_lin = torch.nn.Linear(20, 12)
    lin = Linear.from_state_dict(_torch_sd(t_lin))
    with torch.no_grad():
        np.testing.assert_allclose(lin(x), t_lin(torch.from_numpy(x)).numpy(), atol=ATOL, rtol=0)
    t_nob = torch.nn.Linear(20, 5, bias=False)
    nob = Linear.from_state_dict(_torch_sd(t_nob))
    assert nob.bias is None and list(nob.state_dict()) == ["weight"]

    t_ln = torch.nn.LayerNorm(20)
    with torch.no_grad():
        t_ln.weight.uniform_(0.5, 2)
        t_ln.bias.normal_()
    ln = LayerNorm.from_state_dict(_torch_sd(t_ln))
    with torch.no_grad():
        np.testing.assert_allclose(ln(x + 5), t_ln(torch.from_numpy(x + 5)).numpy(), atol=ATOL,
                                   rtol=0)

    z = np.linspace(-12, 12, 20001, dtype=np.float32)
    tz = torch.from_numpy(z)
    # PyTorch's float32 GELU is itself up to ~1e-6 away from the float64 value
    np.testing.assert_allclose(gelu(z), torch.nn.functional.gelu(tz).numpy(), atol=1.5e-6, rtol=0)
    np.testing.assert_allclose(gelu(z, approximate="tanh"),
                               torch.nn.functional.gelu(tz, approximate="tanh").numpy(),
                               atol=1e-6, rtol=0)
    np.testing.assert_allclose(mnn.quick_gelu(z), (tz * torch.sigmoid(1.702 * tz)).numpy(),
                               atol=1e-6, rtol=0)


def test_erf_fallback_accuracy():
    z = np.linspace(-10, 10, 400001)
    exact = np.array([math.erf(t) for t in z[::50]])
    assert np.abs(mnn._erf_approx(z[::50]) - exact).max() <= 1.5e-7
    zz = z[::10]
    g_exact = 0.5 * zz * (1 + np.array([math.erf(t / math.sqrt(2)) for t in zz]))
    g_approx = 0.5 * zz * (1 + mnn._erf_approx(zz / math.sqrt(2)))
    assert np.abs(g_approx - g_exact).max() <= 2.2e-7
    assert np.array_equal(mnn._erf_approx(np.array([np.inf, -np.inf])), [1.0, -1.0])
    assert np.array_equal(mnn._erf_approx(-z), -mnn._erf_approx(z))


@pytest.mark.parametrize("use_fallback", [False, True])
def test_gelu_against_float64(monkeypatch, use_fallback):
    if use_fallback:
        monkeypatch.setattr(mnn, "_erf_impl", mnn._erf_approx)
    z = np.linspace(-8, 8, 4001, dtype=np.float32)
    exact = np.array([0.5 * t * (1 + math.erf(t / math.sqrt(2))) for t in z.astype(np.float64)])
    # float32 rounding of the result (<= 2.4e-7 near |x| = 4) plus the erf error
    np.testing.assert_allclose(gelu(z), exact, atol=6e-7, rtol=0)


def test_gelu_rejects_bad_input():
    with pytest.raises(ShapeError, match="dtype"):
        gelu(np.array([1, 2]))
    with pytest.raises(ConfigError, match="approximate"):
        gelu(np.ones(2, np.float32), approximate="fast")
    assert gelu(np.float32(1.0)).shape == ()


# ----------------------------------------------------------------------------------------------
# state dicts


def test_state_dict_keys_match_torch():
    torch = pytest.importorskip("torch")
    for kw in ({}, {"kdim": 8, "vdim": 12}, {"bias": False}, {"kdim": 8, "vdim": 8, "bias": False}):
        ref = torch.nn.MultiheadAttention(16, 2, batch_first=True, **kw)
        layer = CrossModalAttention(16, 2, rng=0, **kw)
        t_sd = ref.state_dict()
        sd = layer.state_dict()
        assert list(sd) == list(t_sd), kw
        assert all(sd[k].shape == tuple(t_sd[k].shape) for k in sd)
        back = CrossModalAttention.from_state_dict(_torch_sd(ref), num_heads=2)
        assert back.bias == kw.get("bias", True)


@pytest.mark.parametrize("kw", [{}, {"kdim": 6, "vdim": 10}, {"bias": False}])
def test_state_dict_round_trip(kw):
    layer = CrossModalAttention(24, 3, rng=7, **kw)
    sd = layer.state_dict()
    back = CrossModalAttention.from_state_dict(sd, num_heads=3)
    assert list(back.state_dict()) == list(sd)
    for k in sd:
        np.testing.assert_array_equal(back.state_dict()[k], sd[k])
    rng = np.random.default_rng(8)
    q = _rand(rng, (2, 3, 24))
    c = _rand(rng, (2, 5, layer.kdim))
    v = _rand(rng, (2, 5, layer.vdim))
    np.testing.assert_array_equal(back(q, c, value=v), layer(q, c, value=v))
    # the returned dict is a copy
    sd[next(iter(sd))][...] = 0
    assert np.abs(layer.state_dict()[next(iter(sd))]).max() > 0


def test_packed_layer_accepts_separate_projections():
    layer = CrossModalAttention(16, 2, rng=1)
    sd = layer.state_dict()
    wq, wk, wv = np.split(sd.pop("in_proj_weight"), 3)
    sd.update(q_proj_weight=wq, k_proj_weight=wk, v_proj_weight=wv)
    back = CrossModalAttention.from_state_dict(sd, num_heads=2)
    assert back.packed
    np.testing.assert_array_equal(back.in_proj_weight, layer.in_proj_weight)
    sa = MultiHeadSelfAttention.from_state_dict(sd, num_heads=2)
    np.testing.assert_array_equal(sa.in_proj_weight, layer.in_proj_weight)


def test_encoder_state_dict_round_trip_with_prefix():
    layer = TransformerEncoderLayer(16, 2, 24, rng=3)
    sd = {f"encoder.layers.0.{k}": v for k, v in layer.state_dict().items()}
    sd["encoder.layers.1.linear1.weight"] = np.zeros((2, 2), np.float32)   # other layer: ignored
    back = TransformerEncoderLayer.from_state_dict(sd, nhead=2, prefix="encoder.layers.0.")
    x = _rand(np.random.default_rng(0), (2, 5, 16))
    np.testing.assert_array_equal(back(x), layer(x))


def test_from_state_dict_accepts_float64_and_tensors():
    torch = pytest.importorskip("torch")
    ref = torch.nn.MultiheadAttention(8, 2, batch_first=True)
    sd64 = {k: v.detach().numpy().astype(np.float64) for k, v in ref.state_dict().items()}
    a = CrossModalAttention.from_state_dict(sd64, num_heads=2)
    b = CrossModalAttention.from_state_dict(ref.state_dict(), num_heads=2)  # tensors as is
    assert all(v.dtype == np.float32 for v in a.state_dict().values())
    for k, v in a.state_dict().items():
        np.testing.assert_array_equal(v, b.state_dict()[k])


def _good_cross_sd():
    return CrossModalAttention(16, 2, kdim=8, vdim=4, rng=0).state_dict()


@pytest.mark.parametrize("mutate, key", [
    (lambda sd: sd.pop("out_proj.weight"), "out_proj.weight"),
    (lambda sd: sd.pop("v_proj_weight"), "v_proj_weight"),
    (lambda sd: sd.pop("out_proj.bias"), "out_proj.bias"),
    (lambda sd: sd.pop("in_proj_bias"), "in_proj_bias"),
    (lambda sd: sd.update(in_proj_bias=np.zeros(47, np.float32)), "in_proj_bias"),
    (lambda sd: sd.update(k_proj_weight=np.zeros((16, 8, 1), np.float32)), "k_proj_weight"),
    (lambda sd: sd.update({"out_proj.weight": np.zeros((16, 15), np.float32)}), "out_proj.weight"),
    (lambda sd: sd.update(bias_k=np.zeros((1, 1, 16), np.float32)), "bias_k"),
    (lambda sd: sd.update(bias_v=np.zeros((1, 1, 16), np.float32)), "bias_v"),
    (lambda sd: sd.update(extra=np.zeros(3, np.float32)), "extra"),
    (lambda sd: sd.update(in_proj_bias=np.zeros(48, np.int32)), "in_proj_bias"),
    (lambda sd: sd.__setitem__("out_proj.bias", np.full(16, np.nan, np.float32)), "out_proj.bias"),
    (lambda sd: [sd.pop(k) for k in ("q_proj_weight", "k_proj_weight", "v_proj_weight")],
     "in_proj_weight"),
])
def test_bad_cross_state_dict(mutate, key):
    sd = _good_cross_sd()
    mutate(sd)
    with pytest.raises(ModelFormatError, match=key):
        CrossModalAttention.from_state_dict(sd, num_heads=2)


def test_bias_kv_rejected_even_when_not_strict():
    torch = pytest.importorskip("torch")
    ref = torch.nn.MultiheadAttention(16, 2, add_bias_kv=True, batch_first=True)
    with pytest.raises(ModelFormatError, match="bias_k.*add_bias_kv"):
        CrossModalAttention.from_state_dict(_torch_sd(ref), num_heads=2, strict=False)
    layer = CrossModalAttention(16, 2, rng=0)
    with pytest.raises(ModelFormatError, match="add_bias_kv"):
        layer.load_state_dict(_torch_sd(ref), strict=False)
    enc = TransformerEncoderLayer(16, 2, 8, rng=0)
    sd = enc.state_dict()
    sd["self_attn.bias_v"] = np.zeros((1, 1, 16), np.float32)
    with pytest.raises(ModelFormatError, match="self_attn.bias_v"):
        enc.load_state_dict(sd, strict=False)


def test_non_strict_ignores_unknown_keys():
    good = _good_cross_sd()
    sd = dict(good, something_else=np.zeros(2))
    with pytest.raises(ModelFormatError, match="something_else"):
        CrossModalAttention.from_state_dict(sd, num_heads=2)
    loaded = CrossModalAttention.from_state_dict(sd, num_heads=2, strict=False)
    assert (loaded.embed_dim, loaded.kdim, loaded.vdim) == (16, 8, 4)
    got = loaded.state_dict()
    assert sorted(got) == sorted(good)
    for k, v in good.items():
        np.testing.assert_array_equal(got[k], v, err_msg=k)
    reference = CrossModalAttention.from_state_dict(good, num_heads=2)
    rng = np.random.default_rng(0)
    query, context, value = _rand(rng, (2, 3, 16)), _rand(rng, (2, 5, 8)), _rand(rng, (2, 5, 4))
    np.testing.assert_array_equal(loaded(query, context, value=value),
                                  reference(query, context, value=value))
    layer = CrossModalAttention(16, 2, kdim=8, vdim=4, rng=1)
    assert layer.load_state_dict(sd, strict=False) is layer
    for k, v in layer.state_dict().items():
        np.testing.assert_array_equal(v, good[k], err_msg=k)


def test_failed_load_changes_nothing():
    layer = CrossModalAttention(16, 2, kdim=8, vdim=4, rng=0)
    before = layer.state_dict()
    sd = CrossModalAttention(16, 2, kdim=8, vdim=4, rng=1).state_dict()
    sd["out_proj.weight"] = np.zeros((3, 3), np.float32)   # the last key checked
    with pytest.raises(ModelFormatError, match="out_proj.weight"):
        layer.load_state_dict(sd)
    for k, v in layer.state_dict().items():
        np.testing.assert_array_equal(v, before[k])


@pytest.mark.parametrize("mutate, key", [
    (lambda sd: sd.pop("norm2.bias"), "norm2.bias"),
    (lambda sd: sd.pop("linear1.weight"), "linear1.weight"),
    (lambda sd: sd.pop("self_attn.in_proj_weight"), "self_attn.in_proj_weight"),
    (lambda sd: sd.update({"linear2.weight": np.zeros((16, 23), np.float32)}), "linear2.weight"),
    (lambda sd: sd.update({"self_attn.in_proj_weight": np.zeros((47, 16), np.float32)}),
     "self_attn.in_proj_weight"),
    (lambda sd: sd.update({"norm1.weight": np.zeros(15, np.float32)}), "norm1.weight"),
    (lambda sd: sd.update({"layers.0.oops": np.zeros(1, np.float32)}), "layers.0.oops"),
])
def test_bad_encoder_state_dict(mutate, key):
    sd = TransformerEncoderLayer(16, 2, 24, rng=0).state_dict()
    mutate(sd)
    with pytest.raises(ModelFormatError, match=key.replace(".", r"\.")):
        TransformerEncoderLayer.from_state_dict(sd, nhead=2)


def test_self_attention_rejects_cross_state_dict():
    with pytest.raises(ModelFormatError, match="kdim"):
        MultiHeadSelfAttention.from_state_dict(_good_cross_sd(), num_heads=2)


def test_pickle_and_repr():
    import pickle
    layer = TransformerEncoderLayer(16, 2, 32, rng=0)
    back = pickle.loads(pickle.dumps(layer))
    x = _rand(np.random.default_rng(0), (1, 3, 16))
    np.testing.assert_array_equal(back(x), layer(x))
    text = repr(layer)
    assert "(self_attn): MultiHeadSelfAttention(" in text and "dim_feedforward=32" in text
    assert "kdim=8" in repr(CrossModalAttention(16, 2, kdim=8, vdim=4, rng=0))


def test_parameters_are_read_only_attributes():
    layer = CrossModalAttention(8, 2, rng=0)
    with pytest.raises(AttributeError):
        layer.in_proj_weight = np.zeros((24, 8), np.float32)
    assert layer.num_parameters() == 3 * 8 * 8 + 3 * 8 + 8 * 8 + 8


# ----------------------------------------------------------------------------------------------
# masks and empty rows


def test_fully_masked_context_gives_zeros():
    layer = CrossModalAttention(16, 4, kdim=8, vdim=8, rng=0)
    rng = np.random.default_rng(9)
    q, c = _rand(rng, (3, 4, 16)), _rand(rng, (3, 6, 8))
    keep = np.ones((3, 6), bool)
    keep[1] = False
    keep[2, ::2] = False                      # holes: the boolean-mask path
    for mask in (keep, keep[:, ::-1].copy(), _lengths_mask([6, 0, 3], 6)):
        out, w = layer(q, c, context_mask=mask, return_weights=True, average_weights=False)
        assert np.isfinite(out).all() and np.isfinite(w).all()
        assert np.all(out[1] == 0) and np.all(w[1] == 0)
        assert np.abs(out[0]).max() > 0 and np.abs(out[2]).max() > 0
        np.testing.assert_allclose(w[[0, 2]].sum(-1), 1.0, atol=1e-5)


def test_empty_rows_from_bias_and_empty_context():
    layer = CrossModalAttention(8, 2, rng=0)
    rng = np.random.default_rng(10)
    q, c = _rand(rng, (1, 3, 8)), _rand(rng, (1, 4, 8))
    bias = np.zeros((1, 1, 3, 4), np.float32)
    bias[0, 0, 1] = -np.inf                   # query row 1 may attend nothing
    out = layer(q, c, attn_bias=bias)
    assert np.all(out[0, 1] == 0) and np.all(out[0, [0, 2]] != 0)
    out, w = layer(q, np.zeros((1, 0, 8), np.float32), return_weights=True)
    assert out.shape == (1, 3, 8) and np.all(out == 0) and w.shape == (1, 3, 0)
    assert layer(np.zeros((1, 0, 8), np.float32), c).shape == (1, 0, 8)
    sa = MultiHeadSelfAttention(8, 2, rng=0)
    y = sa(q, attention_mask=np.zeros((1, 3), bool))
    assert np.all(y == 0)


def test_mask_forms_agree():
    layer = CrossModalAttention(16, 2, kdim=8, vdim=8, rng=4)
    rng = np.random.default_rng(11)
    q, c = _rand(rng, (2, 3, 16)), _rand(rng, (2, 7, 8))
    keep = _lengths_mask([7, 4], 7)
    a = layer(q, c, context_mask=keep)
    b = layer(q, c, context_mask=keep.astype(np.int64))
    np.testing.assert_array_equal(a, b)
    # the same keys, shuffled into a non-prefix pattern, give the same result
    perm = np.array([6, 0, 5, 1, 4, 2, 3])
    c2, keep2 = c[:, perm], keep[:, perm]
    assert padding_mask_to_attention(keep2, 2, 7)[0] is None
    np.testing.assert_allclose(layer(q, c2, context_mask=keep2), a, atol=1e-5, rtol=0)
    # an all-True mask is the same as no mask
    np.testing.assert_array_equal(layer(q, c, context_mask=np.ones((2, 7), bool)), layer(q, c))


@pytest.mark.parametrize("mask, match", [
    (np.ones((2, 6), bool), r"context_mask has shape \(2, 6\)"),
    (np.ones((2, 7), np.float32), "context_mask has dtype float32"),
    (np.full((2, 7), 2), "0 and 1"),
])
def test_bad_context_mask(mask, match):
    layer = CrossModalAttention(16, 2, kdim=8, vdim=8, rng=4)
    q, c = np.zeros((2, 3, 16), np.float32), np.zeros((2, 7, 8), np.float32)
    with pytest.raises(ShapeError, match=match):
        layer(q, c, context_mask=mask)


def test_bad_inputs_name_the_argument():
    layer = CrossModalAttention(16, 2, kdim=8, vdim=12, rng=0)
    q, c, v = (np.zeros((2, 3, 16), np.float32), np.zeros((2, 5, 8), np.float32),
               np.zeros((2, 5, 12), np.float32))
    with pytest.raises(ShapeError, match="context has last dim 12"):
        layer(q, v, value=v)
    with pytest.raises(ShapeError, match="query has 2 dims"):
        layer(q[0], c, value=v)
    with pytest.raises(ShapeError, match="batch size"):
        layer(q[:1], c, value=v)
    with pytest.raises(ShapeError, match="value="):
        layer(q, c)
    with pytest.raises(ShapeError, match=r"value has \(B, Lk\)"):
        layer(q, c, value=v[:, :4])
    with pytest.raises(ShapeError, match="query has dtype int64"):
        layer(q.astype(np.int64), c, value=v)
    with pytest.raises(ShapeError, match="x has last dim"):
        TransformerEncoderLayer(16, 2, 8, rng=0)(np.zeros((1, 2, 8), np.float32))


def test_float16_and_float64_inputs():
    layer = CrossModalAttention(16, 2, kdim=8, vdim=8, rng=0)
    rng = np.random.default_rng(12)
    q, c = _rand(rng, (1, 3, 16)), _rand(rng, (1, 5, 8))
    ref = layer(q, c)
    out64 = layer(q.astype(np.float64), c.astype(np.float64))
    assert out64.dtype == np.float32
    np.testing.assert_array_equal(out64, ref)
    out16 = layer(q.astype(np.float16), c.astype(np.float16))
    assert out16.dtype == np.float32
    np.testing.assert_allclose(out16, ref, atol=5e-3)


@pytest.mark.parametrize("kwargs, match", [
    (dict(embed_dim=10, num_heads=3), "divisible"),
    (dict(embed_dim=0, num_heads=1), "embed_dim"),
    (dict(embed_dim=8, num_heads=2, kdim=0), "kdim"),
    (dict(embed_dim=8, num_heads=2, dropout=1.0), "dropout"),
    (dict(embed_dim=8, num_heads=2, temperature=0.0), "temperature"),
    (dict(embed_dim=8, num_heads=2, rng="seed"), "rng"),
])
def test_bad_constructor_arguments(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        CrossModalAttention(**kwargs)


def test_dropout_is_inactive():
    a = CrossModalAttention(16, 2, rng=0)
    b = CrossModalAttention(16, 2, dropout=0.5, rng=0)
    x = _rand(np.random.default_rng(0), (1, 4, 16))
    assert b.dropout == 0.5
    np.testing.assert_array_equal(a(x, x), b(x, x))


# ----------------------------------------------------------------------------------------------
# initialisation


def test_init_is_deterministic_and_torch_like():
    a = CrossModalAttention(64, 4, kdim=32, vdim=48, rng=123).state_dict()
    b = CrossModalAttention(64, 4, kdim=32, vdim=48, rng=123).state_dict()
    c = CrossModalAttention(64, 4, kdim=32, vdim=48, rng=124).state_dict()
    for k in a:
        assert a[k].dtype == np.float32
        np.testing.assert_array_equal(a[k], b[k])
    assert not np.array_equal(a["q_proj_weight"], c["q_proj_weight"])
    assert np.all(a["in_proj_bias"] == 0) and np.all(a["out_proj.bias"] == 0)
    assert np.abs(a["k_proj_weight"]).max() <= math.sqrt(6 / (64 + 32))
    assert np.abs(a["k_proj_weight"]).max() > 0.9 * math.sqrt(6 / (64 + 32))
    assert np.abs(a["out_proj.weight"]).max() <= 1 / 8
    packed = CrossModalAttention(64, 4, rng=0).in_proj_weight
    assert np.abs(packed).max() <= math.sqrt(6 / (64 + 192))

    gen = np.random.default_rng(5)
    l1 = TransformerEncoderLayer(16, 2, 32, rng=gen)
    l2 = TransformerEncoderLayer(16, 2, 32, rng=gen)
    assert not np.array_equal(l1.linear1.weight, l2.linear1.weight)
    e1 = TransformerEncoderLayer(16, 2, 32, rng=9).state_dict()
    e2 = TransformerEncoderLayer(16, 2, 32, rng=9).state_dict()
    assert all(np.array_equal(e1[k], e2[k]) for k in e1)
    assert np.all(e1["norm1.weight"] == 1) and np.all(e1["norm1.bias"] == 0)
    # unseeded layers still work
    x = np.ones((1, 2, 16), np.float32)
    assert np.isfinite(TransformerEncoderLayer(16, 2, 32)(x)).all()


# ----------------------------------------------------------------------------------------------
# package hygiene and documentation


def test_model_imports_only_allowed_layers():
    root = pathlib.Path(__file__).resolve().parents[1] / "mmcore" / "model"
    forbidden = ("distributed", "preprocess", "cli", "viz")
    for path in sorted(root.glob("*.py")):
        tree = ast.parse(path.read_text())
        for node in tree.body:  # module level only
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [("." * node.level) + (node.module or "")]
            for name in names:
                assert "torch" not in name, (path.name, name)
                assert not any(part in forbidden for part in name.replace(".", " ").split()), \
                    (path.name, name)


# ----------------------------------------------------------------------------------------------
# the native pre-norm block (one call) against the step-by-step layers


def _steps(layer, x, mask):
    """The block computed layer by layer in Python (what the native call replaces)."""
    y = x + layer.self_attn(layer.norm1(x), attention_mask=mask)
    return y + layer._mlp(layer.norm2(y))


@pytest.mark.parametrize("act", ["gelu", "gelu_tanh", "quick_gelu", "relu"])
@pytest.mark.parametrize("d,h,ff,L", [(8, 1, 8, 1), (24, 3, 40, 7), (64, 4, 128, 33),
                                      (96, 6, 200, 70)])
def test_native_block_equals_the_steps(act, d, h, ff, L):
    layer = TransformerEncoderLayer(d, h, ff, activation=act, rng=d + ff)
    rng = np.random.default_rng(L)
    norms = {"norm1.weight": rng.uniform(0.5, 1.5, d), "norm2.bias": rng.normal(0, 0.1, d)}
    layer.load_state_dict({**layer.state_dict(), **{k: v.astype(np.float32)
                                                    for k, v in norms.items()}})
    x = _rand(rng, (3, L, d))
    lengths = [L, max(1, L // 2), 0]
    for mask in (None, _lengths_mask(lengths, L)):
        native = layer._native_block(x, mask)
        assert native is not None
        np.testing.assert_array_equal(native, _steps(layer, x, mask))
        np.testing.assert_array_equal(layer(x, attention_mask=mask), native)


def test_native_block_with_quantized_weights_and_fallbacks():
    from mmcore.model.io import quantize_int8
    from mmcore.ops.linear import QuantizedTensor
    layer = TransformerEncoderLayer(32, 4, 64, rng=3)
    sd = layer.state_dict()
    q, s = quantize_int8(sd["linear1.weight"])
    sd["linear1.weight"] = QuantizedTensor(q, "int8", scale=s)
    sd["self_attn.in_proj_weight"] = QuantizedTensor(
        sd["self_attn.in_proj_weight"].astype(np.float16), "float16")
    layer.load_state_dict(sd)
    assert isinstance(layer.linear1.weight, QuantizedTensor)
    x = _rand(np.random.default_rng(4), (2, 9, 32))
    keep = _lengths_mask([9, 4], 9)
    np.testing.assert_array_equal(layer(x, attention_mask=keep), _steps(layer, x, keep))
    # not right-padded, causal, weights: the step-by-step path (and still the same math)
    holes = keep.copy()
    holes[0, 2] = False
    assert layer._native_block(x, holes) is None
    np.testing.assert_allclose(layer(x, attention_mask=holes), _steps(layer, x, holes),
                               atol=1e-6, rtol=0)
    out, w = layer(x, attention_mask=keep, return_weights=True)
    np.testing.assert_allclose(out, _steps(layer, x, keep), atol=1e-6, rtol=0)
    custom = TransformerEncoderLayer(32, 4, 64, rng=3, activation=lambda t: t * 0.5)
    assert custom._native_block(x, keep) is None


def test_native_block_follows_new_weights():
    layer = TransformerEncoderLayer(16, 2, 32, rng=5)
    x = _rand(np.random.default_rng(6), (2, 5, 16))
    before = layer(x)
    sd = layer.state_dict()
    sd["linear2.weight"] = sd["linear2.weight"] * np.float32(2.0)
    layer.load_state_dict(sd)
    after = layer(x)
    assert not np.array_equal(before, after)
    np.testing.assert_array_equal(after, _steps(layer, x, None))


def test_native_block_follows_changes_below_it():
    layer = TransformerEncoderLayer(16, 2, 24, rng=7)
    x = _rand(np.random.default_rng(8), (2, 5, 16))
    layer(x)                                                  # builds the native call
    sd = layer.linear1.state_dict()
    sd["weight"] = sd["weight"] * np.float32(3.0)
    layer.linear1.load_state_dict(sd)                         # a child, not the layer
    np.testing.assert_array_equal(layer(x), _steps(layer, x, None))
    layer.add_module("linear2", Linear(24, 16, rng=9))
    np.testing.assert_array_equal(layer(x), _steps(layer, x, None))
    layer.norm1.eps = 1e-2
    layer.self_attn.temperature = 2.0
    np.testing.assert_array_equal(layer(x), _steps(layer, x, None))
