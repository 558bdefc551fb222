"""Float64 NumPy references for the mmcore kernels, independent of every backend.

Nothing here imports mmcore: the references restate the documented semantics directly, in the
most obvious (materialize everything, compute in float64) way.
"""

from __future__ import annotations

import math

import numpy as np

__all__ = ["dropout_bits_np", "dropout_threshold_ref", "attention_ref"]

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)


def _mix(x: np.ndarray) -> np.ndarray:
    x = x ^ (x >> np.uint64(30))
    x = x * _M1
    x = x ^ (x >> np.uint64(27))
    x = x * _M2
    x = x ^ (x >> np.uint64(31))
    return x


def dropout_bits_np(seed: int, b, h, i, j) -> np.ndarray:
    """24 random bits per element of the broadcast of the index arrays ``b, h, i, j``.

    splitmix64-chained hash of ``(seed, b, h, i, j)`` with uint64 wraparound; the top 24 bits of
    the final state.
    """
    with np.errstate(over="ignore"):
        s = np.array([int(seed) % (1 << 64)], dtype=np.uint64)
        x = _mix(s + _GOLDEN)
        for idx in (b, h, i, j):
            idx = np.asarray(idx).astype(np.uint64)
            x = _mix(x + idx * _GOLDEN)
        return (x >> np.uint64(40)).astype(np.int64)


def dropout_threshold_ref(p: float) -> int:
    """The 24-bit keep threshold: a weight is kept iff its bits are ``>=`` this value."""
    return int(math.floor(p * (1 << 24) + 0.5))


def attention_ref(q, k, v, *, mask=None, key_lengths=None, bias=None, scale=None, temperature=1.0,
                  dropout_p=0.0, seed=0):
    """Reference scaled dot-product attention in float64.

    Returns ``(out (B, H, Lq, Dv), weights (B, H, Lq, Lk), lse (B, H, Lq))``; ``weights`` are
    after dropout (``out == weights @ v``), ``lse`` is the natural log-sum-exp of the masked
    scores before dropout, ``-inf`` for rows with no attendable key (those rows give zeros).
    Keys past ``key_lengths`` never matter, whatever they hold, nor does ``k`` of a masked key;
    a NaN score of an attendable key makes its whole row NaN; ``out`` is ``weights @ v`` in IEEE
    arithmetic over the keys before ``key_lengths`` (NaN in ``v`` reaches non-empty rows even at
    weight 0, as in PyTorch's SDPA).
    """
    q = np.asarray(q, dtype=np.float64)
    k = np.asarray(k, dtype=np.float64)
    v = np.asarray(v, dtype=np.float64)
    B, H, Lq, D = q.shape
    Lk = k.shape[2]
    full = (B, H, Lq, Lk)
    if scale is None:
        scale = 1.0 / math.sqrt(D)
    eff = float(scale) / float(temperature)

    scores = np.matmul(q, np.swapaxes(k, -1, -2)) * eff
    if bias is not None:
        scores = scores + np.broadcast_to(np.asarray(bias, dtype=np.float64), full)
    allowed = np.ones(full, dtype=bool)
    if mask is not None:
        allowed &= np.broadcast_to(np.asarray(mask, dtype=bool), full)
    if key_lengths is not None:
        kl = np.asarray(key_lengths).astype(np.int64).reshape(B, 1, 1, 1)
        allowed &= np.arange(Lk).reshape(1, 1, 1, Lk) < kl
    allowed &= ~np.isneginf(scores)                         # NaN scores stay and propagate
    s = np.where(allowed, scores, -np.inf)

    if Lk > 0:
        row_max = s.max(axis=-1, keepdims=True)
    else:
        row_max = np.full(full[:3] + (1,), -np.inf)
    empty = row_max == -np.inf                              # (B, H, Lq, 1)
    safe_max = np.where(empty, 0.0, row_max)
    e = np.where(allowed, np.exp(s - safe_max), 0.0)
    total = e.sum(axis=-1, keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        w = np.where(empty, 0.0, e / np.where(empty, 1.0, total))
        lse = np.where(empty, -np.inf, safe_max + np.log(np.where(empty, 1.0, total)))[..., 0]

    if dropout_p > 0:
        thr = dropout_threshold_ref(dropout_p)
        if thr > 0:
            bb, hh, ii, jj = np.meshgrid(np.arange(B), np.arange(H), np.arange(Lq), np.arange(Lk),
                                         indexing="ij", sparse=True)
            keep = dropout_bits_np(seed, bb, hh, ii, jj) >= thr
            w = np.where(keep, w * (1.0 / (1.0 - dropout_p)), 0.0)
    # a NaN score poisons its whole row (weights, lse, out)
    w = np.where(np.isnan(row_max), np.nan, w)

    # out = weights @ v in IEEE arithmetic over the keys before key_lengths (a NaN in v there
    # reaches every non-empty row, even at weight 0); keys past key_lengths are never read.
    v_used = v
    if key_lengths is not None:
        kl_v = np.asarray(key_lengths).astype(np.int64).reshape(B, 1, 1, 1)
        v_used = np.where(np.arange(Lk).reshape(1, 1, Lk, 1) < kl_v, v, 0.0)
    with np.errstate(invalid="ignore"):
        out = np.matmul(w, v_used)
    out = np.where(empty, 0.0, out)
    return out, w, lse


# ----------------------------------------------------------------------------------------------
# audio: windows, mel filterbanks, STFT and the mel / log-mel / Kaldi fbank pipelines
#
# Written from the definitions (librosa's and Kaldi's documented formulas), one scalar at a time
# where that is clearer; everything in float64.

__all__ += ["window_ref", "hz_to_mel_ref", "mel_to_hz_ref", "mel_filterbank_ref",
            "kaldi_mel_banks_ref", "dither_normal_ref", "stft_ref", "power_spectrogram_ref",
            "mel_spectrogram_ref", "whisper_log_mel_ref", "fbank_ref", "spectral_ref"]

DITHER_DOMAIN_REF = 0x64697468   # "dith": the domain word of the dither bits


def window_ref(name, n, periodic=True):
    """Window ``name`` of ``n`` samples in float64.

    Periodic windows use the denominator ``n``, symmetric ones ``n - 1``; "povey" (Kaldi) is
    always symmetric. A one-sample window is [1].
    """
    if name in ("rectangular", "ones") or n == 1:
        return np.ones(n)
    out = np.empty(n)
    for i in range(n):
        if name == "povey":
            out[i] = (0.5 - 0.5 * math.cos(2 * math.pi * i / (n - 1))) ** 0.85
            continue
        a = 2 * math.pi * i / (n if periodic else n - 1)
        if name in ("hann", "hanning"):
            out[i] = 0.5 - 0.5 * math.cos(a)
        elif name == "hamming":
            out[i] = 0.54 - 0.46 * math.cos(a)
        elif name == "blackman":
            out[i] = max(0.0, 0.42 - 0.5 * math.cos(a) + 0.08 * math.cos(2 * a))
        else:
            raise ValueError(name)
    return out


def hz_to_mel_ref(f, htk=False):
    """Hz -> mel. HTK: 2595 log10(1 + f/700). Slaney: f / (200/3) below 1 kHz, then
    15 + 27 log(f / 1000) / log(6.4)."""
    f = float(f)
    if htk:
        return 2595.0 * math.log10(1.0 + f / 700.0)
    if f < 1000.0:
        return 3.0 * f / 200.0
    return 15.0 + math.log(f / 1000.0) * 27.0 / math.log(6.4)


def mel_to_hz_ref(m, htk=False):
    m = float(m)
    if htk:
        return 700.0 * (10.0 ** (m / 2595.0) - 1.0)
    if m < 15.0:
        return 200.0 * m / 3.0
    return 1000.0 * math.exp((m - 15.0) * math.log(6.4) / 27.0)


def mel_filterbank_ref(sr, n_fft, n_mels, fmin=0.0, fmax=None, htk=False, norm="slaney"):
    """Triangular mel filters (n_mels, n_fft//2 + 1): edges evenly spaced in mels, triangles
    linear in Hz at the bin frequencies k * sr / n_fft; "slaney" scales filter m by
    2 / (f[m + 2] - f[m])."""
    if fmax is None:
        fmax = sr / 2.0
    lo, hi = hz_to_mel_ref(fmin, htk), hz_to_mel_ref(fmax, htk)
    edges = [mel_to_hz_ref(lo + (hi - lo) * i / (n_mels + 1), htk) for i in range(n_mels + 2)]
    n_bins = n_fft // 2 + 1
    w = np.zeros((n_mels, n_bins))
    for m in range(n_mels):
        a, b, c = edges[m], edges[m + 1], edges[m + 2]
        for k in range(n_bins):
            f = k * sr / n_fft
            if a < f <= b:
                w[m, k] = (f - a) / (b - a)
            elif b < f < c:
                w[m, k] = (c - f) / (c - b)
        if norm == "slaney":
            w[m] *= 2.0 / (c - a)
    return w


def kaldi_mel_banks_ref(sr, n_fft, n_mels, low_freq=20.0, high_freq=0.0):
    """Kaldi's mel banks as a dense (n_mels, n_fft//2 + 1) matrix: mel(f) = 1127 ln(1 + f/700),
    triangles linear in mel over the bins k < n_fft/2 (Nyquist bin weight 0), no normalization.
    ``high_freq <= 0`` means nyquist + high_freq."""
    nyquist = sr / 2.0
    if high_freq <= 0:
        high_freq += nyquist
    mel = lambda f: 1127.0 * math.log(1.0 + f / 700.0)  # noqa: E731
    lo, hi = mel(low_freq), mel(high_freq)
    delta = (hi - lo) / (n_mels + 1)
    w = np.zeros((n_mels, n_fft // 2 + 1))
    for m in range(n_mels):
        left, center, right = lo + m * delta, lo + (m + 1) * delta, lo + (m + 2) * delta
        for k in range(n_fft // 2):
            z = mel(k * sr / n_fft)
            if left < z <= center:
                w[m, k] = (z - left) / (center - left)
            elif center < z < right:
                w[m, k] = (right - z) / (right - center)
    return w


def dither_normal_ref(seed, signal, frame, t):
    """Standard normal noise for sample t of frame ``frame`` of signal ``signal`` (arrays
    broadcast): Box-Muller on the 24-bit uniforms (bits + 0.5) / 2**24 of
    dropout_bits(seed, "dith", signal, frame, 2t) and (..., 2t + 1)."""
    t = np.asarray(t, dtype=np.int64)
    b1 = dropout_bits_np(seed, DITHER_DOMAIN_REF, signal, frame, 2 * t)
    b2 = dropout_bits_np(seed, DITHER_DOMAIN_REF, signal, frame, 2 * t + 1)
    u1 = (b1.astype(np.float64) + 0.5) / 2.0 ** 24
    u2 = (b2.astype(np.float64) + 0.5) / 2.0 ** 24
    return np.sqrt(-2.0 * np.log(u1)) * np.cos(2.0 * np.pi * u2)


def _extend(sig, i, pad_mode):
    """Sample i of a 1-D signal extended by NumPy's 'reflect' (no edge repeat) or zeros."""
    T = sig.shape[0]
    if 0 <= i < T:
        return sig[i]
    if pad_mode == "constant":
        return 0.0
    while not 0 <= i < T:
        i = -i if i < 0 else 2 * (T - 1) - i
    return sig[i]


def spectral_ref(x, window, *, n_fft, hop, frame_length, frame_offset, pad_left, pad_mode,
                 n_frames, dither=0.0, seed=0, remove_dc=False, preemph=0.0, kind="power",
                 power=2.0, mel=None, log_mode="none", log_floor=1e-10, whisper_norm=False):
    """The spectral kernel contract on x (N, T): framing, per-frame processing, rfft,
    |X|**power, dense mel projection, log and Whisper normalization. complex128 or float64."""
    x = np.asarray(x, dtype=np.float64)
    N = x.shape[0]
    window = np.asarray(window, dtype=np.float64)
    frames = np.zeros((N, n_frames, n_fft))
    for s in range(N):
        for f in range(n_frames):
            seg = np.array([_extend(x[s], f * hop - pad_left + frame_offset + t, pad_mode)
                            for t in range(frame_length)])
            if dither:
                seg = seg + dither * dither_normal_ref(seed, s, f, np.arange(frame_length))
            if remove_dc:
                seg = seg - seg.mean()
            if preemph:
                seg = np.concatenate([seg[:1] * (1.0 - preemph), seg[1:] - preemph * seg[:-1]])
            frames[s, f, frame_offset:frame_offset + frame_length] = seg * window
    X = np.fft.rfft(frames, axis=-1).transpose(0, 2, 1)      # (N, bins, frames)
    if kind == "complex":
        return X
    y = np.abs(X) ** power
    if kind == "mel":
        y = np.einsum("mk,nkf->nmf", np.asarray(mel, np.float64), y)
    if log_mode != "none":
        y = np.log(np.maximum(y, log_floor))
        if log_mode == "log10":
            y = y / math.log(10.0)
    if whisper_norm:
        top = y.reshape(N, -1).max(axis=1).reshape(N, 1, 1)
        y = (np.maximum(y, top - 8.0) + 4.0) / 4.0
    return y


def _rows(x):
    x = np.asarray(x, dtype=np.float64)
    return x.reshape(-1, x.shape[-1]), x.shape[:-1]


def stft_ref(x, n_fft, hop_length, win_length=None, window="hann", center=True,
             pad_mode="reflect"):
    """torch.stft / librosa.stft of real x (..., T): complex128 (..., n_fft//2 + 1, frames)."""
    rows, batch = _rows(x)
    win_length = n_fft if win_length is None else win_length
    w = window_ref(window, win_length) if isinstance(window, str) else np.asarray(window)
    full = np.zeros(n_fft)
    off = (n_fft - win_length) // 2
    full[off:off + win_length] = w
    out = []
    for sig in rows:
        if center:
            sig = np.pad(sig, n_fft // 2, mode=pad_mode)
        F = 1 + (sig.shape[0] - n_fft) // hop_length
        frames = np.stack([sig[f * hop_length:f * hop_length + n_fft] * full for f in range(F)])
        out.append(np.fft.rfft(frames, axis=-1).T)
    return np.stack(out).reshape(batch + out[0].shape)


def power_spectrogram_ref(x, n_fft, hop_length, power=2.0, **kw):
    return np.abs(stft_ref(x, n_fft, hop_length, **kw)) ** power


def mel_spectrogram_ref(x, *, sr=16000, n_fft=400, hop_length=160, win_length=None,
                        window="hann", n_mels=80, fmin=0.0, fmax=None, center=True,
                        pad_mode="reflect", power=2.0, htk=False, norm="slaney", filters=None):
    """filters @ |stft|**power (the filters default to :func:`mel_filterbank_ref`)."""
    S = power_spectrogram_ref(x, n_fft, hop_length, power, win_length=win_length,
                              window=window, center=center, pad_mode=pad_mode)
    fb = mel_filterbank_ref(sr, n_fft, n_mels, fmin, fmax, htk, norm) if filters is None \
        else np.asarray(filters, np.float64)
    return np.einsum("mk,...kf->...mf", fb, S)


def whisper_log_mel_ref(x, n_mels=80, filters=None):
    """openai-whisper's log_mel_spectrogram per signal: STFT(400, 160, periodic Hann, centred,
    reflect), drop the last frame, power, mel, log10(max(., 1e-10)), max(., max - 8),
    (. + 4) / 4 with the max over each signal's own output."""
    S = power_spectrogram_ref(x, 400, 160)[..., :-1]
    fb = mel_filterbank_ref(16000, 400, n_mels) if filters is None else filters
    m = np.einsum("mk,...kf->...mf", np.asarray(fb, np.float64), S)
    y = np.log10(np.maximum(m, 1e-10))
    top = y.max(axis=(-2, -1), keepdims=True)
    return (np.maximum(y, top - 8.0) + 4.0) / 4.0


def fbank_ref(x, *, sr=16000, n_mels=80, frame_length_ms=25.0, frame_shift_ms=10.0,
              dither=0.0, seed=0, preemphasis=0.97, remove_dc_offset=True, window="povey",
              round_to_power_of_two=True, snip_edges=True, low_freq=20.0, high_freq=0.0,
              use_log=True, use_power=True):
    """Kaldi's compute-fbank-feats on x (..., T) taken as given: (..., frames, n_mels).

    Per frame: dither (signal index = row of the flattened batch), DC removal, pre-emphasis,
    symmetric window, zero padding to n_fft, |rfft|**2 (or |rfft|), Kaldi mel banks,
    ln(max(., float32 eps)). snip_edges=False centres frame f at f*shift + shift//2 and
    mirrors the signal with the edge sample repeated.
    """
    rows, batch = _rows(x)
    L = int(round(sr * frame_length_ms / 1000.0))
    shift = int(round(sr * frame_shift_ms / 1000.0))
    n_fft = 1 << (L - 1).bit_length() if round_to_power_of_two else L
    w = window_ref(window, L, periodic=False)
    fb = kaldi_mel_banks_ref(sr, n_fft, n_mels, low_freq, high_freq)
    out = []
    for s, sig in enumerate(rows):
        T = sig.shape[0]
        if snip_edges:
            F = 1 + (T - L) // shift
            starts = [f * shift for f in range(F)]
        else:
            F = (T + shift // 2) // shift
            starts = [f * shift + shift // 2 - L // 2 for f in range(F)]
        feats = np.zeros((F, n_mels))
        for f, a in enumerate(starts):
            seg = np.empty(L)
            for t in range(L):
                i = a + t
                while not 0 <= i < T:               # Kaldi: mirror, repeating the edge sample
                    i = -i - 1 if i < 0 else 2 * T - 1 - i
                seg[t] = sig[i]
            if dither:
                seg += dither * dither_normal_ref(seed, s, f, np.arange(L))
            if remove_dc_offset:
                seg -= seg.mean()
            for t in range(L - 1, 0, -1):
                seg[t] -= preemphasis * seg[t - 1]
            seg[0] -= preemphasis * seg[0]
            buf = np.zeros(n_fft)
            buf[:L] = seg * w
            mag = np.abs(np.fft.rfft(buf))
            e = fb @ (mag ** 2 if use_power else mag)
            feats[f] = np.log(np.maximum(e, np.finfo(np.float32).eps)) if use_log else e
        out.append(feats)
    return np.stack(out).reshape(batch + out[0].shape)


# ----------------------------------------------------------------------------------------------
# Image: resize with Pillow's conventions, normalize, patchify, the fused preprocess.
#
# Separable resampling. For an axis of ``n_in`` samples resized to ``n_out``: scale = n_in / n_out;
# the filter is stretched by fs = max(scale, 1) when antialiasing (fs = 1 otherwise), so its
# support is ``support * fs``; output sample i is centred at (i + 0.5) * scale and takes the input
# samples [xmin, xmax) with xmin = trunc(center - support + 0.5) >= 0, xmax = trunc(center +
# support + 0.5) <= n_in, weighted by filter((j - center + 0.5) / fs), normalized to sum 1.
# uint8 images: the weights are rounded to 22-bit fixed point (half away from zero), each pass
# adds 2**21 and shifts right by 22, clamping to [0, 255]; the horizontal pass runs first and
# is stored as uint8. Nearest takes sample trunc(x_i) with x_0 = scale / 2, x_{i+1} = x_i + scale,
# accumulated in double precision (Pillow's affine scaler).

__all__ += ["image_filter_ref", "resize_coeffs_ref", "fixed_point_ref", "nearest_indices_ref",
            "resize_ref", "normalize_ref", "patchify_ref", "shortest_edge_size_ref",
            "center_crop_ref", "preprocess_image_ref", "IMAGE_FILTER_SUPPORT",
            "IMAGE_PRESETS_REF"]

IMAGE_FILTER_SUPPORT = {"bilinear": 1.0, "bicubic": 2.0, "lanczos": 3.0}
_PRECISION_BITS = 22


def image_filter_ref(name, x):
    """The resampling kernels in float64: triangle, Keys cubic with a = -0.5, Lanczos-3."""
    x = np.asarray(x, dtype=np.float64)
    ax = np.abs(x)
    if name == "bilinear":
        return np.where(ax < 1.0, 1.0 - ax, 0.0)
    if name == "bicubic":
        a = -0.5
        inner = ((a + 2.0) * ax - (a + 3.0)) * ax * ax + 1.0
        outer = ((a * ax - 5.0 * a) * ax + 8.0 * a) * ax - 4.0 * a
        return np.where(ax < 1.0, inner, np.where(ax < 2.0, outer, 0.0))
    if name == "lanczos":
        return np.where((x >= -3.0) & (x < 3.0), np.sinc(x) * np.sinc(x / 3.0), 0.0)
    raise ValueError(name)


def resize_coeffs_ref(n_in, n_out, filter, antialias=True):
    """(xmin (n_out,) int64, weights (n_out, K) float64) of one axis; weights past each row's
    own span are 0 and every row sums to 1."""
    scale = n_in / n_out
    fs = max(scale, 1.0) if antialias else 1.0
    support = IMAGE_FILTER_SUPPORT[filter] * fs
    center = (np.arange(n_out) + 0.5) * scale
    xmin = np.maximum(np.trunc(center - support + 0.5).astype(np.int64), 0)
    xmax = np.minimum(np.trunc(center + support + 0.5).astype(np.int64), n_in)
    K = int((xmax - xmin).max())
    k = np.arange(K)
    valid = k[None, :] < (xmax - xmin)[:, None]
    w = image_filter_ref(filter, (xmin[:, None] + k[None, :] - center[:, None] + 0.5) * (1.0 / fs))
    w = np.where(valid, w, 0.0)
    total = w.sum(axis=1, keepdims=True)
    w = np.where(total != 0.0, w / np.where(total != 0.0, total, 1.0), w)
    return xmin, w


def fixed_point_ref(w):
    """Weights as int64 in 22-bit fixed point, rounded half away from zero."""
    scaled = np.asarray(w, np.float64) * float(1 << _PRECISION_BITS)
    return np.trunc(np.where(scaled < 0, scaled - 0.5, scaled + 0.5)).astype(np.int64)


def nearest_indices_ref(n_in, n_out):
    """Source index of every output sample of a nearest-neighbour resize."""
    scale = n_in / n_out
    x = scale * 0.5
    idx = np.empty(n_out, np.int64)
    for i in range(n_out):
        idx[i] = min(int(x), n_in - 1)
        x += scale
    return idx


def _resample_axis_ref(img, axis, n_out, filter, antialias, fixed):
    """Resample ``axis`` of ``img`` (int64 for uint8 images, float64 otherwise)."""
    n_in = img.shape[axis]
    if n_out == n_in:
        return img
    a = np.moveaxis(img, axis, 0)
    if filter == "nearest":
        out = a[nearest_indices_ref(n_in, n_out)]
    else:
        xmin, w = resize_coeffs_ref(n_in, n_out, filter, antialias)
        idx = np.minimum(xmin[:, None] + np.arange(w.shape[1])[None, :], n_in - 1)
        g = a[idx]                                               # (n_out, K, ...)
        if fixed:
            wf = fixed_point_ref(w).reshape(w.shape + (1,) * (a.ndim - 1))
            acc = (g * wf).sum(axis=1) + (1 << (_PRECISION_BITS - 1))
            out = np.clip(acc >> _PRECISION_BITS, 0, 255)
        else:
            out = (g * w.reshape(w.shape + (1,) * (a.ndim - 1))).sum(axis=1)
    return np.moveaxis(out, 0, axis)


def pillow13_vertical_first(H, W, oh, ow):
    """Pillow >= 13 filters vertically first when the height shrinks by more than twice as many
    pixels as the width."""
    return oh < H and (H - oh) > 2 * (W - ow)


def resize_ref(img, size, filter="bicubic", antialias=True, vertical_first=None):
    """Resize (H, W[, C]) to ``size = (h, w)``: horizontal pass, then vertical, or the other
    way round with ``vertical_first`` (default: Pillow 13's rule,
    :func:`pillow13_vertical_first`).

    uint8 images go through the fixed-point passes with a uint8 intermediate and give uint8;
    anything else is resampled in float64 and returned as float64. uint8 (H, W, 4) images are
    RGBA: unless the filter is nearest or the size is unchanged, the colour channels are
    premultiplied by alpha, rounded as ``(t + (t >> 8)) >> 8`` with ``t = v * a + 128``, and
    divided again afterwards (``min(255 * v // a, 255)``; alpha 0 and 255 leave ``v``).
    """
    img = np.asarray(img)
    fixed = img.dtype == np.uint8
    x = img.astype(np.int64 if fixed else np.float64)
    rgba = (fixed and img.ndim == 3 and img.shape[2] == 4 and filter != "nearest"
            and tuple(img.shape[:2]) != (int(size[0]), int(size[1])))
    if rgba:
        t = x[..., :3] * x[..., 3:] + 128
        x = np.concatenate([(t + (t >> 8)) >> 8, x[..., 3:]], axis=-1)
    if vertical_first is None:
        vertical_first = pillow13_vertical_first(img.shape[0], img.shape[1], int(size[0]),
                                                 int(size[1]))
    for axis in ((0, 1) if vertical_first else (1, 0)):
        x = _resample_axis_ref(x, axis, int(size[axis]), filter, antialias, fixed)
    if rgba:
        a = x[..., 3:]
        keep = (a == 0) | (a == 255)
        divided = np.minimum(255 * x[..., :3] // np.maximum(a, 1), 255)
        x[..., :3] = np.where(keep, x[..., :3], divided)
    return x.astype(np.uint8) if fixed else x


def normalize_ref(img, mean, std, scale=1.0 / 255.0, layout="chw"):
    """(img * scale - mean) / std over the last (channel) axis in float32 arithmetic, as the
    kernels compute it; ``layout="chw"`` moves channels before the spatial axes."""
    x = np.asarray(img).astype(np.float32)
    mean = np.asarray(mean, np.float32)
    std = np.asarray(std, np.float32)
    y = (x * np.float32(scale) - mean) / std
    if layout == "chw":
        y = np.moveaxis(y, -1, -3)
    return y


def patchify_ref(x, p, temporal_patch=1):
    """Patches of x (..., C, H, W) -> (..., (H/p)(W/p), C p p), or with temporal_patch tp
    x (..., T, C, H, W) -> (..., (T/tp)(H/p)(W/p), C tp p p), each patch flattened (c, t, y, x),
    patches t-major then row-major."""
    x = np.asarray(x)
    tp = temporal_patch
    if tp == 1:
        *lead, C, H, W = x.shape
        y = x.reshape(*lead, C, H // p, p, W // p, p)
        n = len(lead)
        y = y.transpose(*range(n), n + 1, n + 3, n, n + 2, n + 4)
        return y.reshape(*lead, (H // p) * (W // p), C * p * p)
    *lead, T, C, H, W = x.shape
    y = x.reshape(*lead, T // tp, tp, C, H // p, p, W // p, p)
    n = len(lead)
    # axes: gt=n, t=n+1, c=n+2, gy=n+3, py=n+4, gx=n+5, px=n+6
    y = y.transpose(*range(n), n, n + 3, n + 5, n + 2, n + 1, n + 4, n + 6)
    return y.reshape(*lead, (T // tp) * (H // p) * (W // p), C * tp * p * p)


def shortest_edge_size_ref(h, w, size):
    """The short side becomes ``size``, the long side int(size * long / short)."""
    if h <= w:
        return size, int(size * w / h)
    return int(size * h / w), size


def center_crop_ref(img, crop_h, crop_w):
    """Crop (H, W, C) at top = (H - crop_h) // 2, left = (W - crop_w) // 2; parts outside the
    image are zeros."""
    H, W = img.shape[:2]
    top, left = (H - crop_h) // 2, (W - crop_w) // 2
    out = np.zeros((crop_h, crop_w) + img.shape[2:], img.dtype)
    y0, y1 = max(top, 0), min(top + crop_h, H)
    x0, x1 = max(left, 0), min(left + crop_w, W)
    if y1 > y0 and x1 > x0:
        out[y0 - top:y1 - top, x0 - left:x1 - left] = img[y0:y1, x0:x1]
    return out


IMAGE_PRESETS_REF = {
    "clip": dict(size=224, crop=224, mode="shortest_edge", filter="bicubic",
                 mean=(0.48145466, 0.4578275, 0.40821073),
                 std=(0.26862954, 0.26130258, 0.27577711)),
    "siglip": dict(size=224, crop=224, mode="squash", filter="bicubic",
                   mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5)),
    "imagenet": dict(size=256, crop=224, mode="shortest_edge", filter="bilinear",
                     mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225)),
}


def preprocess_image_ref(img, *, size, crop, mode, filter, mean, std, scale=1.0 / 255.0,
                         patch=None):
    """resize (shortest edge or squash) -> center crop -> normalize (CHW float32) [-> patches]
    of one uint8 (H, W, 3) image, with :func:`resize_ref`."""
    H, W = img.shape[:2]
    rh, rw = shortest_edge_size_ref(H, W, size) if mode == "shortest_edge" else (size, size)
    r = resize_ref(img, (rh, rw), filter)
    c = center_crop_ref(r, crop, crop)
    y = normalize_ref(c, mean, std, scale, "chw")
    return y if patch is None else patchify_ref(y, patch)


# ----------------------------------------------------------------------------------------------
# fusion reductions: masked mean / max over tokens, fusion over modalities
#
# Everything in float64, materialized; padding tokens and absent modalities are replaced before
# any arithmetic so that whatever they hold (NaN included) never matters.

__all__ += [
    "masked_mean_ref", "masked_max_ref", "fuse_ref", "FUSE_STRATEGIES_REF", "encoder_layer_ref",
]

FUSE_STRATEGIES_REF = ("concat", "mean", "sum", "max", "weighted", "attention")


def _real_tokens(mask, B, L):
    if mask is None:
        return np.ones((B, L), bool)
    return np.broadcast_to(np.asarray(mask) != 0, (B, L))


def masked_mean_ref(x, mask=None):
    """Mean over the real tokens (``mask`` True / 1) of ``x`` (B, L, D); zeros for rows without
    real tokens. Returns float64 (B, D)."""
    x = np.asarray(x, dtype=np.float64)
    B, L, D = x.shape
    real = _real_tokens(mask, B, L)
    count = real.sum(axis=1)
    total = np.where(real[..., None], x, 0.0).sum(axis=1)
    return np.where(count[:, None] > 0, total / np.maximum(count, 1)[:, None], 0.0)


def masked_max_ref(x, mask=None):
    """Elementwise max over the real tokens of ``x`` (B, L, D); zeros for rows without real
    tokens; a NaN in a real token propagates. Returns float64 (B, D)."""
    x = np.asarray(x, dtype=np.float64)
    B, L, D = x.shape
    real = _real_tokens(mask, B, L)
    if L == 0:
        return np.zeros((B, D))
    best = np.where(real[..., None], x, -np.inf).max(axis=1)
    return np.where(real.any(axis=1)[:, None], best, 0.0)


def fuse_ref(embeddings, strategy, *, weights=None, query=None, present=None):
    """Fusion of M modality embeddings, float64.

    ``embeddings``: a list of M arrays (B, D_m) or one (B, M, D) array. ``present``: (B, M) or
    (M,), True / 1 = the modality is there (default: all). Returns ``(out, w)`` where ``w`` is the
    (B, M) weight matrix for "weighted" and "attention" and None otherwise.

    * concat: ``[e_0 | e_1 | ...]`` (B, sum D_m) with absent modalities as zeros.
    * mean / sum / max: over the present modalities; a row with none present gives zeros.
    * weighted: ``w = weights`` ((M,) or (B, M), >= 0) zeroed where absent and divided by its
      row sum (a zero sum gives zero weights); ``out = sum_m w_m e_m``.
    * attention: ``s_m = (query . e_m) / sqrt(D)`` over the present modalities, ``w = softmax(s)``
      (0 where absent, all 0 with none present); ``out = sum_m w_m e_m``. A NaN score makes the
      row's out and present weights NaN.

    Modalities of weight exactly 0 (weighted, attention) take no part in the sum, so a NaN or
    inf they hold never matters.
    """
    if isinstance(embeddings, (list, tuple)):
        embs = [np.asarray(e, dtype=np.float64) for e in embeddings]
    else:
        arr = np.asarray(embeddings, dtype=np.float64)
        embs = [arr[:, m] for m in range(arr.shape[1])]
    M = len(embs)
    B = embs[0].shape[0]
    pres = (np.ones((B, M), bool) if present is None
            else np.broadcast_to(np.asarray(present) != 0, (B, M)))
    # absent modalities never matter, whatever they hold
    embs = [np.where(pres[:, m:m + 1], e, 0.0) for m, e in enumerate(embs)]
    if strategy == "concat":
        return np.concatenate(embs, axis=1) if M else np.zeros((B, 0)), None
    E = np.stack(embs, axis=1)                               # (B, M, D)
    D = E.shape[2]
    count = pres.sum(axis=1)
    some = (count > 0)[:, None]
    if strategy == "sum":
        return E.sum(axis=1), None
    if strategy == "mean":
        return np.where(some, E.sum(axis=1) / np.maximum(count, 1)[:, None], 0.0), None
    if strategy == "max":
        best = np.where(pres[..., None], E, -np.inf).max(axis=1)
        return np.where(some, best, 0.0), None
    if strategy == "weighted":
        w = np.broadcast_to(np.asarray(weights, dtype=np.float64), (B, M))
        w = np.where(pres, w, 0.0)
        total = w.sum(axis=1, keepdims=True)
        w = np.where(total > 0, w / np.where(total > 0, total, 1.0), 0.0)
    elif strategy == "attention":
        q = np.broadcast_to(np.asarray(query, dtype=np.float64), (B, D))
        s = np.einsum("bmd,bd->bm", E, q) / math.sqrt(D)
        s = np.where(pres, s, -np.inf)
        smax = s.max(axis=1, keepdims=True)
        safe = np.where(np.isneginf(smax), 0.0, smax)
        e = np.where(pres, np.exp(s - safe), 0.0)
        total = e.sum(axis=1, keepdims=True)
        # a NaN score makes the present weights NaN; no present modality gives zeros
        w = np.where(pres & (total != 0), e / np.where(total == 0, 1.0, total), 0.0)
    else:
        raise ValueError(f"unknown strategy {strategy!r}")
    # a modality of weight exactly 0 takes no part (whatever its embedding holds)
    terms = np.where((w != 0)[..., None], w[..., None] * np.where((w != 0)[..., None], E, 0.0),
                     0.0)
    return terms.sum(axis=1), w


# ----------------------------------------------------------------------------------------------
# linear


def linear_ref(x, w, b=None):
    """``x @ w.T + b`` over the last axis, in float64."""
    y = np.asarray(x, np.float64) @ np.asarray(w, np.float64).T
    if b is not None:
        y = y + np.asarray(b, np.float64)
    return y


def activation_ref(y, name):
    """The activations :func:`mmcore.ops.linear` fuses, in float64."""
    import math
    y = np.asarray(y, np.float64)
    if name == "gelu":
        return 0.5 * y * (1.0 + np.vectorize(math.erf)(y / math.sqrt(2.0)))
    if name == "gelu_tanh":
        return 0.5 * y * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (y + 0.044715 * y ** 3)))
    if name == "quick_gelu":
        return y / (1.0 + np.exp(-1.702 * y))
    if name == "relu":
        return np.maximum(y, 0.0)
    return y


def layer_norm_ref(x, weight=None, bias=None, eps=1e-5):
    """Layer normalisation over the last axis, in float64."""
    x = np.asarray(x, np.float64)
    mean = x.mean(axis=-1, keepdims=True)
    var = ((x - mean) ** 2).mean(axis=-1, keepdims=True)
    y = (x - mean) / np.sqrt(var + eps)
    if weight is not None:
        y = y * np.asarray(weight, np.float64)
    if bias is not None:
        y = y + np.asarray(bias, np.float64)
    return y


def encoder_layer_ref(x, *, num_heads, in_proj_weight, out_proj_weight, linear1_weight,
                      linear2_weight, in_proj_bias=None, out_proj_bias=None, linear1_bias=None,
                      linear2_bias=None, norm1_weight=None, norm1_bias=None, norm2_weight=None,
                      norm2_bias=None, key_lengths=None, activation="gelu", eps1=1e-5,
                      eps2=1e-5, scale=None, temperature=1.0):
    """A pre-norm transformer encoder block (``torch.nn.TransformerEncoderLayer``,
    ``norm_first=True``, eval mode) in float64; a row with ``key_lengths[b] == 0`` gets a zero
    attention output."""
    x = np.asarray(x, np.float64)
    B, L, E = x.shape
    if x.size == 0:
        return x.copy()
    H = num_heads
    hd = E // H
    h = layer_norm_ref(x, norm1_weight, norm1_bias, eps1)
    qkv = linear_ref(h, in_proj_weight, in_proj_bias).reshape(B, L, 3, H, hd)
    q, k, v = (qkv[:, :, i].transpose(0, 2, 1, 3) for i in range(3))     # (B, H, L, hd)
    s = (1.0 / math.sqrt(hd) if scale is None else scale) / temperature
    scores = np.einsum("bhqd,bhkd->bhqk", q, k) * s
    if key_lengths is not None:
        keep = np.arange(L)[None, :] < np.asarray(key_lengths)[:, None]   # (B, L)
        scores = np.where(keep[:, None, None, :], scores, -np.inf)
    m = scores.max(axis=-1, keepdims=True)
    m = np.where(np.isfinite(m), m, 0.0)
    p = np.exp(scores - m)
    tot = p.sum(axis=-1, keepdims=True)
    w = np.divide(p, tot, out=np.zeros_like(p), where=tot > 0)
    o = (w @ v).transpose(0, 2, 1, 3).reshape(B, L, E)
    a = linear_ref(o, out_proj_weight, out_proj_bias)
    if key_lengths is not None:
        a[np.asarray(key_lengths) == 0] = 0.0
    y = x + a
    h = layer_norm_ref(y, norm2_weight, norm2_bias, eps2)
    f = activation_ref(linear_ref(h, linear1_weight, linear1_bias), activation)
    return y + linear_ref(f, linear2_weight, linear2_bias)


# ----------------------------------------------------------------------------------------------
# matmul precisions ("bf16", "int8"): the operand rules, then the products on the rounded or
# quantized operands in float64. The quantization rules are stated in float32 arithmetic, so
# they are restated here with float32 scalars, one row at a time.

__all__ += ["bf16_round", "quantize_rows_u8", "quantize_weight_s8", "linear_bf16_ref",
            "linear_int8_ref", "attention_bf16_ref"]

_BF16_MAX_EXP = 128        # bfloat16 has the exponent range of float32: |v| >= 2**128 is inf
_BF16_MIN_EXP = -125       # frexp exponent of the smallest normal, 2**-126 = 0.5 * 2**-125


def bf16_round(x):
    """float32 values rounded to bfloat16 (8 significant bits, nearest, ties to even; subnormal
    spacing 2**-133), as float64; NaN stays NaN, values rounding to 2**128 or more are inf."""
    with np.errstate(invalid="ignore"):             # signalling NaNs widen to quiet ones
        x = np.asarray(x, np.float32).astype(np.float64)
    out = x.copy()
    fin = np.isfinite(x) & (x != 0)
    v = x[fin]
    _, e = np.frexp(v)                                  # v = m 2**e, 0.5 <= |m| < 1
    ulp = np.ldexp(1.0, np.maximum(e, _BF16_MIN_EXP) - 8)
    r = np.rint(v / ulp) * ulp                          # v / ulp is exact; rint: ties to even
    out[fin] = np.where(np.abs(r) >= 2.0 ** _BF16_MAX_EXP, np.copysign(np.inf, r), r)
    return out


def quantize_rows_u8(x):
    """The "int8" rule for activations, per row of ``x`` (M, K) in float32 arithmetic:
    ``(a, sx)`` with ``a`` int64 in [-255, 255] and ``sx`` float32 (NaN for a row holding inf or
    NaN, whose ``a`` is 0)."""
    f32 = np.float32
    x = np.asarray(x, np.float32)
    M, K = x.shape
    a = np.zeros((M, K), np.int64)
    sx = np.zeros(M, np.float32)
    for m in range(M):
        row = x[m]
        if not np.all(np.isfinite(row)):
            sx[m] = np.nan
            continue
        lo = min(f32(0), row.min()) if K else f32(0)
        hi = max(f32(0), row.max()) if K else f32(0)
        s = f32(f32(hi - lo) / f32(255))
        with np.errstate(over="ignore"):
            if s == 0 or not np.isfinite(f32(1) / s):       # 0, or a range so small 1/s overflows
                s = f32(1)
        inv = f32(f32(1) / s)
        zp = min(max(np.rint(f32(-lo * inv)), 0), 255)
        for k in range(K):
            t = np.rint(f32(row[k] * inv)) + zp
            a[m, k] = int(min(max(t, 0), 255) - zp)
        sx[m] = s
    return a, sx


def quantize_weight_s8(w):
    """The "int8" rule for a float weight (N, K), per row in float32 arithmetic: ``(q, sw)``
    with ``q`` int64 in [-127, 127] and ``sw`` float32 (NaN for a row holding inf or NaN, whose
    ``q`` is 0)."""
    f32 = np.float32
    w = np.asarray(w, np.float32)
    N, K = w.shape
    q = np.zeros((N, K), np.int64)
    sw = np.zeros(N, np.float32)
    for n in range(N):
        row = w[n]
        if not np.all(np.isfinite(row)):
            sw[n] = np.nan
            continue
        amax = np.abs(row).max() if K else f32(0)
        s = f32(amax / f32(127))
        with np.errstate(over="ignore"):
            if s == 0 or not np.isfinite(f32(1) / s):
                s = f32(1)
        inv = f32(f32(1) / s)
        for k in range(K):
            q[n, k] = int(min(max(np.rint(f32(row[k] * inv)), -127), 127))
        sw[n] = s
    return q, sw


def linear_bf16_ref(x, w, b=None):
    """The "bf16" linear map in float64: ``bf16(x) @ bf16(w).T + b`` over the last axis."""
    y = bf16_round(x) @ bf16_round(w).T
    if b is not None:
        y = y + np.asarray(b, np.float64)
    return y


def linear_int8_ref(x, w=None, b=None, *, q=None, scale=None):
    """The "int8" linear map of ``x`` (..., K): the integer products exactly, then
    ``acc * (sx * sw) + b`` in float64 (the kernels do this epilogue in float32).

    The weight is a float ``w`` (N, K), quantized by :func:`quantize_weight_s8`, or an int8
    weight given as stored, ``q`` (N, K) with ``scale`` (N,).
    """
    x = np.asarray(x, np.float32)
    lead, K = x.shape[:-1], x.shape[-1]
    a, sx = quantize_rows_u8(x.reshape(int(np.prod(lead)), K))
    if q is None:
        q, sw = quantize_weight_s8(w)
    else:
        q, sw = np.asarray(q).astype(np.int64), np.asarray(scale, np.float32)
    acc = a @ np.asarray(q, np.int64).T                             # exact integers
    with np.errstate(invalid="ignore"):
        y = acc.astype(np.float64) * (sx.astype(np.float64)[:, None] * sw.astype(np.float64))
    if b is not None:
        y = y + np.asarray(b, np.float64)
    return y.reshape(*lead, q.shape[0])


def attention_bf16_ref(q, k, v, *, mask=None, key_lengths=None, bias=None, scale=None,
                       temperature=1.0):
    """The "bf16" attention in float64: ``q``, ``k``, ``v`` rounded to bfloat16; the softmax
    numerators ``P = exp(s - max s)`` rounded to bfloat16 before ``P @ v``, divided by the sum
    of the unrounded ``P``. Returns ``(out, weights, lse)``, the weights and lse unrounded
    (``P / sum P``); rows without a key to attend to give zeros and ``lse = -inf``."""
    q, k, v = bf16_round(q), bf16_round(k), bf16_round(v)
    B, H, Lq, D = q.shape
    Lk = k.shape[2]
    full = (B, H, Lq, Lk)
    eff = (1.0 / math.sqrt(D) if scale is None else float(scale)) / float(temperature)
    s = np.matmul(q, np.swapaxes(k, -1, -2)) * eff
    if bias is not None:
        s = s + np.broadcast_to(np.asarray(bias, np.float64), full)
    allowed = ~np.isneginf(s)
    if mask is not None:
        allowed &= np.broadcast_to(np.asarray(mask, bool), full)
    if key_lengths is not None:
        allowed &= np.arange(Lk) < np.asarray(key_lengths).reshape(B, 1, 1, 1)
    s = np.where(allowed, s, -np.inf)
    m = s.max(axis=-1, keepdims=True) if Lk else np.full(full[:3] + (1,), -np.inf)
    empty = np.isneginf(m)
    p = np.where(allowed, np.exp(s - np.where(empty, 0.0, m)), 0.0)
    total = np.where(empty, 1.0, p.sum(axis=-1, keepdims=True))
    w = p / total
    lse = np.where(empty, -np.inf, np.where(empty, 0.0, m) + np.log(total))[..., 0]
    v_used = v
    if key_lengths is not None:
        v_used = np.where(np.arange(Lk).reshape(1, 1, Lk, 1)
                          < np.asarray(key_lengths).reshape(B, 1, 1, 1), v, 0.0)
    out = np.where(empty, 0.0, np.matmul(bf16_round(p), v_used) / total)
    return out, w, lse
