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
