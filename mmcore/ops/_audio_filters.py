"""Windows, mel scales and mel filterbanks for the audio ops (:mod:`mmcore.ops.audio`).

Everything here is computed in float64 and rounded to float32 once at the end (the Slaney
normalization is applied after that rounding, which is how ``librosa.filters.mel`` builds its
float32 filters). Results are cached per parameter set and returned read-only; the public
:func:`mmcore.ops.mel_filterbank` hands out writable copies.

Examples
--------
>>> from mmcore.ops._audio_filters import window_function, hz_to_mel, mel_to_hz
>>> window_function("hann", 4).tolist()
[0.0, 0.5, 1.0, 0.5]
>>> round(float(mel_to_hz(hz_to_mel(440.0, htk=True), htk=True)), 6)
440.0
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple, Optional

import numpy as np

__all__ = ["STFT_WINDOWS", "KALDI_WINDOWS", "window_function", "kaldi_window", "hz_to_mel",
           "mel_to_hz", "mel_filters", "kaldi_mel_filters", "SparseMel", "sparse_mel",
           "mel_filters_sparse", "kaldi_mel_filters_sparse"]

# Names accepted by stft / mel_spectrogram (periodic, as torch.*_window and librosa's
# get_window(fftbins=True)); "povey" is Kaldi's symmetric window.
STFT_WINDOWS = ("hann", "hamming", "blackman", "povey", "rectangular", "ones")
# Names accepted by fbank, with Kaldi's symmetric definitions (denominator N - 1).
KALDI_WINDOWS = ("povey", "hann", "hanning", "hamming", "blackman", "rectangular", "ones")

_SLANEY_F_SP = 200.0 / 3.0          # Hz per mel below the break frequency
_SLANEY_BREAK_HZ = 1000.0
_SLANEY_BREAK_MEL = _SLANEY_BREAK_HZ / _SLANEY_F_SP  # 15 mels
_SLANEY_LOGSTEP = math.log(6.4) / 27.0               # log-spaced part: 27 mels per factor 6.4


def _readonly(a: np.ndarray) -> np.ndarray:
    a.setflags(write=False)
    return a


def _cosine_sum(n: np.ndarray, denom: int, coeffs) -> np.ndarray:
    """``sum_k (-1)^k c_k cos(2 pi k n / denom)`` in float64."""
    phase = 2.0 * np.pi * n / denom
    w = np.zeros(n.shape, np.float64)
    sign = 1.0
    for k, c in enumerate(coeffs):
        w += sign * c * np.cos(k * phase)
        sign = -sign
    return w


_COSINE_COEFFS = {
    "hann": (0.5, 0.5),
    "hanning": (0.5, 0.5),
    "hamming": (0.54, 0.46),
    "blackman": (0.42, 0.5, 0.08),
}


@functools.lru_cache(maxsize=64)
def _window_cached(name: str, length: int, periodic: bool) -> np.ndarray:
    if name in ("rectangular", "ones") or length == 1:
        # A one-point window is [1] for every shape (torch.*_window and scipy agree).
        return _readonly(np.ones(length, np.float32))
    n = np.arange(length, dtype=np.float64)
    if name == "povey":
        # Kaldi: symmetric Hann raised to 0.85, whatever ``periodic`` says.
        w = (0.5 - 0.5 * np.cos(2.0 * np.pi * n / (length - 1))) ** 0.85
    else:
        w = _cosine_sum(n, length if periodic else length - 1, _COSINE_COEFFS[name])
        if name == "blackman":
            w = np.maximum(w, 0.0)   # the endpoints are -1e-17 in floating point
    return _readonly(w.astype(np.float32))


def window_function(name: str, length: int, *, periodic: bool = True) -> np.ndarray:
    """A float32 analysis window (read-only, cached).

    Parameters
    ----------
    name : {"hann", "hamming", "blackman", "povey", "rectangular", "ones", "hanning"}
        ``hann = 0.5 - 0.5 cos(2 pi n / M)``, ``hamming = 0.54 - 0.46 cos(2 pi n / M)``,
        ``blackman = 0.42 - 0.5 cos(2 pi n / M) + 0.08 cos(4 pi n / M)`` with ``M = length``
        when ``periodic`` (the default of ``torch.hann_window`` and of librosa's STFT windows)
        and ``M = length - 1`` otherwise. ``povey = (0.5 - 0.5 cos(2 pi n / (length - 1)))**0.85``
        is always symmetric (Kaldi). ``rectangular`` and ``ones`` are all ones.
    length : int
        Number of samples, >= 1. A one-sample window is ``[1.0]``.
    periodic : bool, default True

    Examples
    --------
    >>> [round(float(v), 2) for v in window_function("hamming", 4)]
    [0.08, 0.54, 1.0, 0.54]
    """
    return _window_cached(name, int(length), bool(periodic))


def kaldi_window(name: str, length: int) -> np.ndarray:
    """Kaldi's window ``name`` of ``length`` samples: symmetric, float32 (read-only)."""
    return _window_cached(name, int(length), False)


def hz_to_mel(freq, *, htk: bool = False):
    """Frequency in Hz to mels (float64), Slaney's scale (default) or HTK's.

    Slaney: linear ``f / (200/3)`` below 1 kHz, ``15 + ln(f / 1000) / (ln(6.4) / 27)`` above.
    HTK: ``2595 log10(1 + f / 700)``.
    """
    f = np.asarray(freq, dtype=np.float64)
    if htk:
        return 2595.0 * np.log10(1.0 + f / 700.0)
    linear = f / _SLANEY_F_SP
    with np.errstate(divide="ignore", invalid="ignore"):
        logpart = _SLANEY_BREAK_MEL + np.log(f / _SLANEY_BREAK_HZ) / _SLANEY_LOGSTEP
    return np.where(f >= _SLANEY_BREAK_HZ, logpart, linear)


def mel_to_hz(mels, *, htk: bool = False):
    """Mels to Hz (float64); the inverse of :func:`hz_to_mel`."""
    m = np.asarray(mels, dtype=np.float64)
    if htk:
        return 700.0 * (10.0 ** (m / 2595.0) - 1.0)
    linear = _SLANEY_F_SP * m
    with np.errstate(over="ignore"):
        logpart = _SLANEY_BREAK_HZ * np.exp(_SLANEY_LOGSTEP * (m - _SLANEY_BREAK_MEL))
    return np.where(m >= _SLANEY_BREAK_MEL, logpart, linear)


@functools.lru_cache(maxsize=32)
def mel_filters(sr: float, n_fft: int, n_mels: int, fmin: float, fmax: float, htk: bool,
                norm: Optional[str]) -> np.ndarray:
    """Triangular mel filters (n_mels, n_fft//2 + 1) as float32, read-only (arguments checked
    by the caller).

    The ``n_mels + 2`` edge frequencies are evenly spaced in mels between ``fmin`` and ``fmax``;
    filter ``m`` rises linearly (in Hz) from edge ``m`` to edge ``m + 1`` and falls to edge
    ``m + 2``, evaluated at the bin frequencies ``k * sr / n_fft``. With ``norm="slaney"`` each
    filter is scaled by ``2 / (edge[m + 2] - edge[m])`` (constant energy per filter).
    """
    n_bins = n_fft // 2 + 1
    bin_hz = np.arange(n_bins, dtype=np.float64) * (float(sr) / n_fft)
    edges = mel_to_hz(np.linspace(hz_to_mel(fmin, htk=htk), hz_to_mel(fmax, htk=htk), n_mels + 2),
                      htk=htk)
    widths = np.diff(edges)
    left, right = edges[:-2, None], edges[2:, None]
    rising = (bin_hz[None, :] - left) / widths[:-1, None]
    falling = (right - bin_hz[None, :]) / widths[1:, None]
    w = np.maximum(0.0, np.minimum(rising, falling)).astype(np.float32)
    if norm == "slaney":
        w = (w * (2.0 / (edges[2:] - edges[:-2]))[:, None]).astype(np.float32)
    return _readonly(w)


def kaldi_mel_scale(freq):
    """Kaldi's mel scale ``1127 ln(1 + f / 700)`` (float64)."""
    return 1127.0 * np.log1p(np.asarray(freq, dtype=np.float64) / 700.0)


@functools.lru_cache(maxsize=32)
def kaldi_mel_filters(sr: float, n_fft: int, n_mels: int, low_freq: float,
                      high_freq: float) -> np.ndarray:
    """Kaldi's mel banks as a dense float32 (n_mels, n_fft//2 + 1) matrix, read-only.

    ``high_freq`` is the absolute upper edge (already resolved from Kaldi's ``<= 0`` offset
    form). Triangles are linear in Kaldi's mel scale, with edges evenly spaced in mels from
    ``low_freq`` to ``high_freq``, evaluated at the bin frequencies ``k * sr / n_fft`` for
    ``k < n_fft // 2``; the Nyquist bin gets weight 0 and nothing is normalized.
    """
    n_bins = n_fft // 2 + 1
    lo, hi = kaldi_mel_scale(low_freq), kaldi_mel_scale(high_freq)
    delta = (hi - lo) / (n_mels + 1)
    m = np.arange(n_mels, dtype=np.float64)[:, None]
    left, center, right = lo + m * delta, lo + (m + 1) * delta, lo + (m + 2) * delta
    mel = kaldi_mel_scale(np.arange(n_fft // 2, dtype=np.float64) * (float(sr) / n_fft))[None, :]
    up = (mel - left) / (center - left)
    down = (right - mel) / (right - center)
    w = np.zeros((n_mels, n_bins), np.float32)
    w[:, : n_fft // 2] = np.maximum(0.0, np.minimum(up, down))
    return _readonly(w)


class SparseMel(NamedTuple):
    """Row spans of a dense filterbank: row ``m`` covers bins ``[start[m], start[m] + length[m])``
    with weights ``weights[offset[m] : offset[m] + length[m]]``."""
    start: np.ndarray    # int32 (n_mels,)
    length: np.ndarray   # int32 (n_mels,)
    offset: np.ndarray   # int64 (n_mels,)
    weights: np.ndarray  # float32 (sum of lengths,)


def sparse_mel(dense: np.ndarray) -> SparseMel:
    """The nonzero span of each row of a dense float32 filterbank (rows of zeros get length 0)."""
    dense = np.asarray(dense, dtype=np.float32)
    n_mels = dense.shape[0]
    start = np.zeros(n_mels, np.int32)
    length = np.zeros(n_mels, np.int32)
    pieces = []
    for m in range(n_mels):
        nz = np.flatnonzero(dense[m])
        if nz.size:
            a, b = int(nz[0]), int(nz[-1]) + 1
            start[m], length[m] = a, b - a
            pieces.append(dense[m, a:b])
    offset = np.zeros(n_mels, np.int64)
    if n_mels > 1:
        offset[1:] = np.cumsum(length[:-1], dtype=np.int64)
    weights = (np.concatenate(pieces) if pieces else np.zeros(0, np.float32)).astype(np.float32)
    return SparseMel(_readonly(start), _readonly(length), _readonly(offset),
                     _readonly(np.ascontiguousarray(weights)))


@functools.lru_cache(maxsize=32)
def mel_filters_sparse(*args) -> SparseMel:
    """:func:`sparse_mel` of :func:`mel_filters` with the same arguments (cached)."""
    return sparse_mel(mel_filters(*args))


@functools.lru_cache(maxsize=32)
def kaldi_mel_filters_sparse(*args) -> SparseMel:
    """:func:`sparse_mel` of :func:`kaldi_mel_filters` with the same arguments (cached)."""
    return sparse_mel(kaldi_mel_filters(*args))
