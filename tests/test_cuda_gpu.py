"""The CUDA paths of every op against the native CPU op and the float64 references.

Every test here is marked ``cuda``: conftest.py skips them when the cuda backend cannot run (no
mmcore._cuda, no driver or no device), and each test skips when CuPy is missing. Only numpy,
pytest, cupy, mmcore and tests/reference.py are imported, so ``pytest -m cuda`` runs on a
machine without the other test dependencies.

Tolerances are per input dtype: float32 inputs are computed in float32 throughout; float16 and
bfloat16 attention on compute capability >= 8.0 multiplies on tensor cores with the softmax
probabilities rounded to the input type (float32 accumulation), so ``out`` carries one rounding
of the probabilities (2**-11 for float16, 2**-8 for bfloat16) relative to the values. The
references get the inputs as the device sees them (rounded to float16 / bfloat16).
"""

from __future__ import annotations

import numpy as np
import pytest

import mmcore
from mmcore import ops
from reference import (
    IMAGE_PRESETS_REF,
    attention_ref,
    fuse_ref,
    masked_max_ref,
    masked_mean_ref,
    mel_spectrogram_ref,
    normalize_ref,
    patchify_ref,
    preprocess_image_ref,
    resize_ref,
    stft_ref,
    whisper_log_mel_ref,
)

pytestmark = pytest.mark.cuda


@pytest.fixture(scope="module")
def cp():
    return pytest.importorskip("cupy")


def host(x):
    """NumPy copy of a CuPy array (or of a list / tuple of them)."""
    if isinstance(x, (list, tuple)):
        return type(x)(host(a) for a in x)
    import cupy
    return cupy.asnumpy(x) if isinstance(x, cupy.ndarray) else np.asarray(x)


def assert_close(actual, expected, atol, rtol, what=""):
    actual = np.asarray(actual, np.float64)
    expected = np.asarray(expected, np.float64)
    assert actual.shape == expected.shape, (actual.shape, expected.shape, what)
    np.testing.assert_allclose(actual, expected, atol=atol, rtol=rtol, err_msg=what)


# ----------------------------------------------------------------------------------------------
# attention

#: (atol, rtol) of out / weights and of lse, per input dtype.
ATTN_TOL = {
    "float32": ((3e-5, 1e-4), (3e-5, 1e-5)),
    "float16": ((2e-3, 2e-3), (1e-4, 1e-5)),
    "bfloat16": ((1.5e-2, 1e-2), (2e-4, 1e-5)),
}


def to_bf16_bits(x):
    """float32 -> bfloat16 bits (uint16), round to nearest even."""
    u = np.ascontiguousarray(x, np.float32).view(np.uint32).astype(np.uint64)
    u = (u + 0x7FFF + ((u >> 16) & 1)) >> 16
    return u.astype(np.uint16)


def bf16_bits_to_f32(u):
    return (np.asarray(u, np.uint16).astype(np.uint32) << 16).view(np.float32)


class Bf16DeviceArray:
    """A bfloat16 device array as PyTorch exposes one: ``__cuda_array_interface__`` with typestr
    "<V2" over the raw 16-bit data (here a CuPy uint16 array)."""

    def __init__(self, bits):
        self._bits = bits
        iface = dict(bits.__cuda_array_interface__)
        iface["typestr"] = "<V2"
        iface.pop("descr", None)
        self.__cuda_array_interface__ = iface


def make_inputs(cp, dtype, shape_q, shape_k, shape_v, seed=0):
    """(device q, k, v in ``dtype``; float32 host copies holding exactly the device values)."""
    rng = np.random.default_rng(seed)
    host32 = [rng.standard_normal(s).astype(np.float32) for s in (shape_q, shape_k, shape_v)]
    dev, seen = [], []
    for a in host32:
        if dtype == "bfloat16":
            bits = to_bf16_bits(a)
            dev.append(Bf16DeviceArray(cp.asarray(bits)))
            seen.append(bf16_bits_to_f32(bits))
        else:
            a = a.astype(dtype)
            dev.append(cp.asarray(a))
            seen.append(a.astype(np.float32))
    return dev, seen


def attention_cases():
    B, H = 2, 3
    cases = {
        "plain": dict(B=B, H=H, Lq=77, Lk=130, D=64, Dv=64),
        "d128": dict(B=1, H=2, Lq=70, Lk=100, D=128, Dv=128),
        "odd_dims": dict(B=B, H=2, Lq=19, Lk=45, D=40, Dv=72),
        "tiny_dims": dict(B=1, H=1, Lq=5, Lk=3, D=3, Dv=5),
        "wide": dict(B=1, H=2, Lq=33, Lk=50, D=160, Dv=300),  # the float32 kernel for all dtypes
        "one_query": dict(B=B, H=H, Lq=1, Lk=577, D=64, Dv=64),
    }
    return cases


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
@pytest.mark.parametrize("case", sorted(attention_cases()))
@pytest.mark.parametrize("extras", ["none", "masks", "masks_weights"])
def test_attention_matches_native_and_reference(cp, dtype, case, extras):
    c = attention_cases()[case]
    B, H, Lq, Lk, D, Dv = (c[n] for n in ("B", "H", "Lq", "Lk", "D", "Dv"))
    (q, k, v), (q32, k32, v32) = make_inputs(cp, dtype, (B, H, Lq, D), (B, H, Lk, D),
                                             (B, H, Lk, Dv), seed=Lq * 7 + Lk)
    rng = np.random.default_rng(1)
    kw = {}
    if extras != "none":
        mask = rng.random((B, 1, Lq, Lk)) > 0.3
        mask[:, :, Lq // 2, :] = False                 # fully masked rows
        bias = (0.5 * rng.standard_normal((B, H, 1, Lk))).astype(np.float32)
        bias[..., 0] = -np.inf                          # a -inf bias entry acts as a mask
        key_lengths = np.array([Lk - Lk // 3] + [Lk] * (B - 1), np.int64)
        if B > 1:
            key_lengths[-1] = 0                          # every row of this item is empty
        kw = dict(mask=mask, bias=bias, key_lengths=key_lengths)
    want_w = extras == "masks_weights"

    dev_kw = {name: cp.asarray(a) for name, a in kw.items()}
    res = ops.attention(q, k, v, return_weights=want_w, return_lse=True, **dev_kw)
    assert all(isinstance(r, cp.ndarray) for r in res)
    assert all(r.dtype == cp.float32 for r in res)
    res = host(res)
    nat = ops.attention(q32, k32, v32, return_weights=want_w, return_lse=True, backend="native",
                        **kw)
    r_out, r_w, r_lse = attention_ref(q32, k32, v32, **kw)
    refs = (r_out, r_w, r_lse) if want_w else (r_out, r_lse)

    # the probabilities are rounded to the input type on the tensor-core path only, which
    # return_weights never takes
    (atol, rtol), (atol_l, rtol_l) = ATTN_TOL["float32" if want_w else dtype]
    names = ("out", "weights", "lse") if want_w else ("out", "lse")
    for name, got, n, r in zip(names, res, nat, refs):
        a, rt = (atol_l, rtol_l) if name == "lse" else (atol, rtol)
        assert_close(got, r, a, rt, f"{name} vs reference ({dtype}, {case}, {extras})")
        assert_close(got, n, a, rt, f"{name} vs native ({dtype}, {case}, {extras})")
    assert np.isfinite(res[0]).all()
    if extras != "none":
        dead = np.isneginf(r_lse)
        assert dead.any()
        assert (res[0][dead] == 0).all() and np.isneginf(res[-1][dead]).all()
        if want_w:
            assert (res[1][dead] == 0).all()


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_attention_no_keys(cp, dtype):
    (q, k, v), _ = make_inputs(cp, dtype, (1, 2, 4, 16), (1, 2, 0, 16), (1, 2, 0, 8))
    out, w, lse = host(ops.attention(q, k, v, return_weights=True, return_lse=True))
    assert out.shape == (1, 2, 4, 8) and (out == 0).all()
    assert w.shape == (1, 2, 4, 0) and np.isneginf(lse).all()


def test_attention_dropout_matches_native(cp):
    (q, k, v), (q32, k32, v32) = make_inputs(cp, "float32", (2, 2, 30, 32), (2, 2, 41, 32),
                                             (2, 2, 41, 16))
    kw = dict(dropout_p=0.3, seed=1234, return_weights=True, return_lse=True)
    got = host(ops.attention(q, k, v, **kw))
    nat = ops.attention(q32, k32, v32, backend="native", **kw)
    ref = attention_ref(q32, k32, v32, dropout_p=0.3, seed=1234)
    for g, n, r, name in zip(got, nat, ref, ("out", "weights", "lse")):
        assert_close(g, r, 3e-5, 1e-4, name + " vs reference")
        assert_close(g, n, 3e-5, 1e-4, name + " vs native")
        if name == "weights":
            assert ((g == 0) == (n == 0)).all()         # the same dropout mask


def test_attention_strided_and_float64_inputs(cp):
    rng = np.random.default_rng(3)
    q = rng.standard_normal((1, 40, 2, 32))            # (B, Lq, H, D): transposed below
    k = rng.standard_normal((1, 2, 50, 32)).astype(np.float32)
    v = rng.standard_normal((1, 2, 50, 24)).astype(np.float32)
    qd = cp.asarray(q).transpose(0, 2, 1, 3)            # float64, not contiguous
    out = host(ops.attention(qd, cp.asarray(k), cp.asarray(v)))
    q32 = np.ascontiguousarray(q.transpose(0, 2, 1, 3)).astype(np.float32)
    assert_close(out, attention_ref(q32, k, v)[0], 3e-5, 1e-4, "out")


def test_attention_mixed_bfloat16_and_float32(cp):
    (q, _, _), (q32, _, _) = make_inputs(cp, "bfloat16", (1, 2, 9, 16), (1, 2, 1, 16),
                                         (1, 2, 1, 8))
    rng = np.random.default_rng(4)
    k = rng.standard_normal((1, 2, 12, 16)).astype(np.float32)
    v = rng.standard_normal((1, 2, 12, 8)).astype(np.float32)
    out = host(ops.attention(q, cp.asarray(k), cp.asarray(v)))   # widened to float32
    assert_close(out, attention_ref(q32, k, v)[0], 3e-5, 1e-4, "out")


def test_attention_torch_bfloat16_tensors(cp):
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("torch without CUDA")
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn((2, 4, 77, 64), device="cuda", generator=g, dtype=torch.bfloat16)
               for _ in range(3))
    out = host(ops.attention(q, k, v))
    f = [t.float().cpu().numpy() for t in (q, k, v)]
    atol, rtol = ATTN_TOL["bfloat16"][0]
    assert_close(out, attention_ref(*f)[0], atol, rtol, "out vs reference")
    sdpa = torch.nn.functional.scaled_dot_product_attention(*(t.float() for t in (q, k, v)))
    assert_close(out, sdpa.cpu().numpy(), atol, rtol, "out vs torch SDPA")


def test_attention_uses_the_current_stream(cp):
    (q, k, v), (q32, k32, v32) = make_inputs(cp, "float16", (2, 2, 64, 64), (2, 2, 256, 64),
                                             (2, 2, 256, 64))
    s = cp.cuda.Stream(non_blocking=True)
    with s:
        out = ops.attention(q, k, v)
    s.synchronize()
    atol, rtol = ATTN_TOL["float16"][0]
    assert_close(host(out), attention_ref(q32, k32, v32)[0], atol, rtol, "out")


def test_attention_rejects_host_arrays_mixed_with_device(cp):
    q = cp.zeros((1, 1, 2, 4), cp.float32)
    with pytest.raises(mmcore.errors.BackendError):
        ops.attention(q, np.zeros((1, 1, 2, 4), np.float32), q)


# ----------------------------------------------------------------------------------------------
# fusion reductions

FUSION_TOL = (1e-5, 1e-5)


@pytest.mark.parametrize("op,ref", [("masked_mean", masked_mean_ref),
                                    ("masked_max", masked_max_ref)])
@pytest.mark.parametrize("with_mask", [False, True])
def test_masked_reductions(cp, op, ref, with_mask):
    rng = np.random.default_rng(5)
    x = rng.standard_normal((4, 37, 300)).astype(np.float32)
    mask = None
    if with_mask:
        mask = rng.random((4, 37)) > 0.4
        mask[2] = False                                  # a row without real tokens
        x[~mask] = np.nan                                # padding is never read
    fn = getattr(ops, op)
    got = fn(cp.asarray(x), None if mask is None else cp.asarray(mask))
    assert isinstance(got, cp.ndarray)
    got = host(got)
    assert_close(got, ref(x, mask), *FUSION_TOL, what=op + " vs reference")
    assert_close(got, fn(x, mask, backend="native"), *FUSION_TOL, what=op + " vs native")


@pytest.mark.parametrize("strategy", ["concat", "mean", "sum", "max", "weighted", "attention"])
def test_fuse(cp, strategy):
    rng = np.random.default_rng(6)
    B, M, D = 5, 3, 64
    emb = rng.standard_normal((B, M, D)).astype(np.float32)
    present = rng.random((B, M)) > 0.3
    present[0] = False
    present[1] = True
    kw = {}
    if strategy == "weighted":
        kw["weights"] = rng.random((B, M)).astype(np.float32)
    if strategy == "attention":
        kw["query"] = rng.standard_normal((B, D)).astype(np.float32)
    want_w = strategy in ("weighted", "attention")
    dev_kw = {n: cp.asarray(a) for n, a in kw.items()}
    got = ops.fuse(cp.asarray(emb), strategy=strategy, present=cp.asarray(present),
                   return_weights=want_w, **dev_kw)
    nat = ops.fuse(emb, strategy=strategy, present=present, return_weights=want_w,
                   backend="native", **kw)
    r_out, r_w = fuse_ref(emb, strategy, present=present, **kw)
    got, nat = host(got), host(nat)
    if want_w:
        assert_close(got[1], r_w, *FUSION_TOL, what="weights vs reference")
        assert_close(got[1], nat[1], *FUSION_TOL, what="weights vs native")
        got, nat = got[0], nat[0]
    assert_close(got, r_out, *FUSION_TOL, what="out vs reference")
    assert_close(got, nat, *FUSION_TOL, what="out vs native")


# ----------------------------------------------------------------------------------------------
# spectral ops

REL_SPEC = 1e-4         # max error relative to the largest magnitude, float32 FFTs
LOG_MEL_ATOL = 2e-3     # log-mel features are O(1)


def signals(shape, seed=7):
    rng = np.random.default_rng(seed)
    T = shape[-1]
    t = np.arange(T) / 16000.0
    x = 0.3 * rng.standard_normal(shape) + 0.5 * np.sin(2 * np.pi * 440.0 * t)
    return x.astype(np.float32)


def assert_spec_close(actual, expected, rel, what):
    actual = np.asarray(actual)
    expected = np.asarray(expected)
    assert actual.shape == expected.shape, (actual.shape, expected.shape, what)
    assert np.isfinite(actual).all(), what
    scale = float(np.abs(expected).max())
    err = float(np.abs(actual.astype(np.complex128) - expected).max())
    assert err <= rel * scale + 1e-30, f"{what}: max error {err:.3g} vs scale {scale:.3g}"


@pytest.mark.parametrize("n_fft,hop,win,center", [(400, 160, None, True), (512, 128, 400, True),
                                                  (401, 100, None, False), (2048, 512, None, True),
                                                  (7, 3, None, True)])
def test_stft(cp, n_fft, hop, win, center):
    x = signals((3, 8000))
    kw = dict(n_fft=n_fft, hop_length=hop, win_length=win, center=center)
    got = ops.stft(cp.asarray(x), **kw)
    assert isinstance(got, cp.ndarray) and got.dtype == cp.complex64
    got = host(got)
    assert_spec_close(got, stft_ref(x, n_fft, hop, win_length=win, center=center), REL_SPEC,
                      f"stft {kw} vs reference")
    assert_spec_close(got, ops.stft(x, backend="native", **kw), REL_SPEC, f"stft {kw} vs native")


@pytest.mark.parametrize("kw", [dict(), dict(n_mels=128, n_fft=512, hop_length=128),
                                dict(power=1.0, htk=True, norm=None, fmin=30.0, fmax=7000.0)])
def test_mel_spectrogram(cp, kw):
    x = signals((2, 3, 6000))
    got = host(ops.mel_spectrogram(cp.asarray(x), **kw))
    assert_spec_close(got, mel_spectrogram_ref(x, **kw), REL_SPEC, f"mel {kw} vs reference")
    assert_spec_close(got, ops.mel_spectrogram(x, backend="native", **kw), REL_SPEC,
                      f"mel {kw} vs native")


@pytest.mark.parametrize("n_mels,padding", [(80, 0), (128, 16000)])
def test_log_mel_spectrogram(cp, n_mels, padding):
    x = signals((3, 32000))
    got = host(ops.log_mel_spectrogram(cp.asarray(x), n_mels=n_mels, padding=padding))
    xp = np.pad(x, ((0, 0), (0, padding)))
    assert_close(got, whisper_log_mel_ref(xp, n_mels), LOG_MEL_ATOL, 0, "log-mel vs reference")
    assert_close(got, ops.log_mel_spectrogram(x, n_mels=n_mels, padding=padding,
                                              backend="native"),
                 LOG_MEL_ATOL, 0, "log-mel vs native")


# ----------------------------------------------------------------------------------------------
# image ops


def images(shape, seed=8):
    rng = np.random.default_rng(seed)
    H, W = shape[-3], shape[-2]
    yy, xx = np.mgrid[0:H, 0:W]
    smooth = (127 + 100 * np.sin(xx / 7.0) * np.cos(yy / 5.0))[..., None]
    noisy = smooth + rng.normal(0, 25, shape)
    return np.clip(noisy, 0, 255).astype(np.uint8)


@pytest.mark.parametrize("filt", ["nearest", "bilinear", "bicubic", "lanczos"])
@pytest.mark.parametrize("size", [(37, 53), (200, 90)])
def test_resize_uint8_batch(cp, filt, size):
    batch = images((4, 81, 120, 3))
    got = ops.resize(cp.asarray(batch), size, filter=filt)
    assert isinstance(got, cp.ndarray) and got.dtype == cp.uint8
    got = host(got)
    np.testing.assert_array_equal(got, ops.resize(batch, size, filter=filt, backend="native"))
    for i in range(len(batch)):
        np.testing.assert_array_equal(got[i], resize_ref(batch[i], size, filt))


def test_resize_list_of_sizes_and_float32(cp):
    ims = [images((50, 70, 3), 1), images((120, 33, 4), 2), images((9, 9, 1), 3)]
    got = host(ops.resize([cp.asarray(a) for a in ims], (40, 44), filter="bicubic"))
    nat = ops.resize(ims, (40, 44), filter="bicubic", backend="native")
    for g, n, a in zip(got, nat, ims):
        np.testing.assert_array_equal(g, n)
        np.testing.assert_array_equal(g, resize_ref(a, (40, 44), "bicubic"))
    f = images((2, 60, 45, 3)).astype(np.float32) / 255.0
    gotf = host(ops.resize(cp.asarray(f), (31, 70), filter="lanczos"))
    assert_close(gotf, ops.resize(f, (31, 70), filter="lanczos", backend="native"), 1e-5, 1e-5,
                 "float32 resize vs native")
    for i in range(2):
        assert_close(gotf[i], resize_ref(f[i], (31, 70), "lanczos"), 1e-4, 0,
                     "float32 resize vs reference")


@pytest.mark.parametrize("dtype", ["uint8", "float32"])
@pytest.mark.parametrize("layout", ["chw", "hwc"])
def test_normalize(cp, dtype, layout):
    x = images((3, 20, 30, 3))
    if dtype == "float32":
        x = x.astype(np.float32) * 0.7
    mean, std = (0.48, 0.45, 0.40), (0.26, 0.26, 0.27)
    got = host(ops.normalize(cp.asarray(x), mean=mean, std=std, layout=layout))
    nat = ops.normalize(x, mean=mean, std=std, layout=layout, backend="native")
    assert_close(got, nat, 1e-6, 1e-6, "normalize vs native")
    ref = np.stack([normalize_ref(a, mean, std, layout=layout) for a in x])
    assert_close(got, ref, 1e-5, 1e-6, "normalize vs reference")


@pytest.mark.parametrize("shape,p,tp", [((2, 3, 32, 48), 16, 1), ((2, 4, 3, 28, 28), 14, 2),
                                        ((3, 14, 14), 7, 1)])
def test_patchify(cp, shape, p, tp):
    x = np.random.default_rng(9).standard_normal(shape).astype(np.float32)
    got = host(ops.patchify(cp.asarray(x), p, temporal_patch=tp))
    np.testing.assert_array_equal(got, ops.patchify(x, p, temporal_patch=tp, backend="native"))
    np.testing.assert_array_equal(got, patchify_ref(x, p, tp).astype(np.float32))


@pytest.mark.parametrize("preset", ["clip", "siglip", "imagenet"])
@pytest.mark.parametrize("patch", [None, 16])
def test_preprocess_image_batch(cp, preset, patch):
    batch = images((6, 180, 260, 3))
    got = ops.preprocess_image(cp.asarray(batch), preset=preset, patch_size=patch)
    assert isinstance(got, cp.ndarray) and got.dtype == cp.float32
    got = host(got)
    nat = ops.preprocess_image(batch, preset=preset, patch_size=patch, backend="native")
    assert_close(got, nat, 1e-6, 1e-6, "preprocess_image vs native")
    r = IMAGE_PRESETS_REF[preset]
    for i in range(len(batch)):
        ref = preprocess_image_ref(batch[i], patch=patch, **r)
        assert_close(got[i], ref, 1e-5, 1e-6, f"preprocess_image[{i}] vs reference")


def test_preprocess_image_list_of_sizes(cp):
    ims = [images((100, 300, 3), 1), images((224, 224, 3), 2), images((50, 40, 3), 3)]
    got = host(ops.preprocess_image([cp.asarray(a) for a in ims], preset="clip"))
    nat = ops.preprocess_image(ims, preset="clip", backend="native")
    assert_close(np.asarray(got), np.asarray(nat), 1e-6, 1e-6, "vs native")
    for i, a in enumerate(ims):
        ref = preprocess_image_ref(a, **IMAGE_PRESETS_REF["clip"])
        assert_close(np.asarray(got)[i], ref, 1e-5, 1e-6, f"[{i}] vs reference")
