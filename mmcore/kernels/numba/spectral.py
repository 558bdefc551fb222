"""Numba fallback for the short-time spectral ops (:mod:`mmcore.ops.audio`).

:func:`spectral_numba` takes the same arguments as the native kernel ``mmcore._C.spectral``
(less ``num_threads``) and fills ``out``. It is written independently of the C++ kernel and is
meant as the obviously-correct second implementation, not the fast path: every frame is
transformed with a direct DFT in float64 (``O(frame_length * n_bins)`` per frame, twiddles
``exp(-2 pi i m / n_fft)`` looked up at the exact integer phase ``m = k n mod n_fft``), one frame
per parallel task.

Semantics, for signal ``s`` (a row of ``x``) and frame ``f``:

* ``seg[t] = x_s(f * hop - pad_left + frame_offset + t)`` for ``t < frame_length``, where
  ``x_s`` is extended outside ``[0, T)`` by ``pad_mode``: ``"reflect"`` (NumPy's ``reflect``,
  no edge repeat) or ``"constant"`` (zeros).
* in Kaldi's order: ``seg[t] += dither * N(0, 1)`` (the counter-based normal of
  :func:`dither_normal`, keyed by ``(seed, s, f, t)``), minus the mean of ``seg`` when
  ``remove_dc``, pre-emphasis ``seg[t] -= preemph * seg[t - 1]`` (``t >= 1``) and
  ``seg[0] -= preemph * seg[0]``, then ``seg[t] *= window[t]``.
* the n_fft-point buffer is zero except ``buf[frame_offset + t] = seg[t]``;
  ``X[k] = sum_n buf[n] exp(-2 pi i k n / n_fft)`` for ``k <= n_fft // 2``.
* kind ``"complex"``: ``out[s, k, f] = X[k]``; ``"power"``: ``|X[k]|**power``; ``"mel"``:
  ``out[s, m, f] = sum_i w_m[i] |X[mel_start[m] + i]|**power`` over the sparse filter ``m``.
* for ``"power"`` and ``"mel"``: ``log_mode`` ``"log10"`` / ``"ln"`` maps ``y`` to
  ``log(max(y, log_floor))``; ``whisper_norm`` then maps every value of signal ``s`` to
  ``(max(y, Y_s - 8) + 4) / 4`` with ``Y_s`` the largest value of that signal's output.
"""

from __future__ import annotations

import functools
import math
import threading

import numpy as np
from numba import njit, prange, types

from .dropout import dropout_bits

__all__ = ["spectral_numba", "dither_normal", "DITHER_DOMAIN"]

_KINDS = {"complex": 0, "power": 1, "mel": 2}
_LOG_MODES = {"none": 0, "log10": 1, "ln": 2}
_PAD_MODES = {"constant": 0, "reflect": 1}

_INV_2_24 = 1.0 / 16777216.0
# Domain separator of the dither bits ("dith"): they never coincide with dropout bits.
DITHER_DOMAIN = np.uint64(0x64697468)
_TWO_PI = 6.283185307179586


@njit(cache=True, nogil=True)
def dither_normal(seed, signal, frame, t):
    """A standard normal sample, a pure function of ``(seed, signal, frame, t)``.

    Box-Muller on two 24-bit uniforms ``u = (bits + 0.5) / 2**24``, with the bits
    ``dropout_bits(seed, DITHER_DOMAIN, signal, frame, 2 t)`` and
    ``dropout_bits(seed, DITHER_DOMAIN, signal, frame, 2 t + 1)``:
    ``sqrt(-2 ln u1) cos(2 pi u2)`` in float64. The same function as ``mmcore::dither_normal``
    in ``csrc/include/mmcore/dither.h``.
    """
    u1 = (np.float64(dropout_bits(seed, DITHER_DOMAIN, signal, frame, 2 * t)) + 0.5) * _INV_2_24
    u2 = (np.float64(dropout_bits(seed, DITHER_DOMAIN, signal, frame, 2 * t + 1)) + 0.5) \
        * _INV_2_24
    return math.sqrt(-2.0 * math.log(u1)) * math.cos(_TWO_PI * u2)


@njit(cache=True, nogil=True, inline="always")
def _sample(x, s, i, T, reflect):
    if 0 <= i < T:
        return np.float64(x[s, i])
    if not reflect:
        return 0.0
    if T == 1:
        return np.float64(x[s, 0])
    period = 2 * (T - 1)
    j = i % period
    if j < 0:
        j += period
    if j >= T:
        j = period - j
    return np.float64(x[s, j])


_f32c2_ro = types.Array(types.float32, 2, "C", readonly=True)
_f32c1_ro = types.Array(types.float32, 1, "C", readonly=True)
_f64c1_ro = types.Array(types.float64, 1, "C", readonly=True)
_i32c1_ro = types.Array(types.int32, 1, "C", readonly=True)
_i64c1_ro = types.Array(types.int64, 1, "C", readonly=True)
_c64c3 = types.Array(types.complex64, 3, "C")
_f32c3 = types.Array(types.float32, 3, "C")

_SIGNATURE = types.void(
    _f32c2_ro, _f32c1_ro, _f64c1_ro, _f64c1_ro,       # x, window, cos table, sin table
    _i32c1_ro, _i32c1_ro, _i64c1_ro, _f32c1_ro,       # mel start, len, offset, weights
    _c64c3, _f32c3,                                   # complex out, float out
    types.int64, types.int64, types.int64, types.int64, types.int64,  # n_fft hop fl off padl
    types.boolean, types.int64,                       # reflect, n_frames
    types.float64, types.uint64, types.boolean, types.float64,  # dither seed remove_dc preemph
    types.int64, types.float64, types.int64, types.float64, types.boolean,
)


@njit(_SIGNATURE, parallel=True, cache=True, nogil=True)
def _spectral_kernel(x, window, cos_t, sin_t, mel_start, mel_len, mel_offset, mel_weights,
                     out_c, out_f, n_fft, hop, frame_length, frame_offset, pad_left, reflect,
                     n_frames, dither, seed, remove_dc, preemph, kind, power, log_mode, log_floor,
                     whisper_norm):
    N = x.shape[0]
    T = x.shape[1]
    n_bins = n_fft // 2 + 1
    n_mels = mel_start.shape[0]
    half_power = power * 0.5
    inv_ln10 = 1.0 / math.log(10.0)
    for job in prange(N * n_frames):
        s = job // n_frames
        f = job - s * n_frames
        seg = np.empty(frame_length, np.float64)
        base = f * hop - pad_left + frame_offset
        for t in range(frame_length):
            seg[t] = _sample(x, s, base + t, T, reflect)
        if dither != 0.0:
            for t in range(frame_length):
                seg[t] += dither * dither_normal(seed, s, f, t)
        if remove_dc:
            mean = 0.0
            for t in range(frame_length):
                mean += seg[t]
            mean /= frame_length
            for t in range(frame_length):
                seg[t] -= mean
        if preemph != 0.0:
            for t in range(frame_length - 1, 0, -1):
                seg[t] -= preemph * seg[t - 1]
            seg[0] -= preemph * seg[0]
        for t in range(frame_length):
            seg[t] *= np.float64(window[t])

        spec = np.empty(n_bins, np.float64)
        for k in range(n_bins):
            re = 0.0
            im = 0.0
            m = (k * frame_offset) % n_fft          # phase index k * n mod n_fft
            for t in range(frame_length):
                re += seg[t] * cos_t[m]
                im -= seg[t] * sin_t[m]
                m += k
                if m >= n_fft:
                    m -= n_fft
            if kind == 0:
                out_c[s, k, f] = np.complex64(complex(re, im))
            else:
                p = re * re + im * im
                if power == 2.0:
                    spec[k] = p
                elif power == 1.0:
                    spec[k] = math.sqrt(p)
                else:
                    spec[k] = p ** half_power
        if kind == 0:
            continue
        n_rows = n_bins if kind == 1 else n_mels
        for r in range(n_rows):
            if kind == 1:
                y = spec[r]
            else:
                y = 0.0
                a = mel_start[r]
                o = mel_offset[r]
                for i in range(mel_len[r]):
                    y += np.float64(mel_weights[o + i]) * spec[a + i]
            if log_mode != 0:
                if not (y > log_floor):      # also maps NaN to the floor: never happens
                    y = log_floor            # for finite input, which the op checks
                y = math.log(y)
                if log_mode == 1:
                    y *= inv_ln10
            out_f[s, r, f] = np.float32(y)

    if kind != 0 and whisper_norm:
        n_rows = out_f.shape[1]
        for s in prange(N):
            top = -np.inf
            for r in range(n_rows):
                for f in range(n_frames):
                    v = np.float64(out_f[s, r, f])
                    if v > top:
                        top = v
            lo = top - 8.0
            for r in range(n_rows):
                for f in range(n_frames):
                    v = np.float64(out_f[s, r, f])
                    if v < lo:
                        v = lo
                    out_f[s, r, f] = np.float32((v + 4.0) / 4.0)


@functools.lru_cache(maxsize=8)
def _dft_tables(n_fft: int):
    """cos / sin of ``2 pi m / n_fft`` for ``m < n_fft`` (float64); the kernel indexes them
    with the exact integer phase ``m = k n mod n_fft``, so large products lose no accuracy."""
    phase = np.arange(n_fft, dtype=np.float64) * (2.0 * np.pi / n_fft)
    c, s = np.cos(phase), np.sin(phase)
    c.setflags(write=False)
    s.setflags(write=False)
    return c, s


# Numba's fallback "workqueue" threading layer aborts the process when two threads launch
# parallel kernels at once, so launches are serialized (each launch already uses every core).
_launch_lock = threading.Lock()

_DUMMY_I32 = np.zeros(1, np.int32)
_DUMMY_I64 = np.zeros(1, np.int64)
_DUMMY_F32 = np.zeros(1, np.float32)
_DUMMY_C64_3 = np.zeros((1, 1, 1), np.complex64)
_DUMMY_F32_3 = np.zeros((1, 1, 1), np.float32)
for _a in (_DUMMY_I32, _DUMMY_I64, _DUMMY_F32):
    _a.setflags(write=False)


def spectral_numba(x, out, window, mel_start, mel_len, mel_offset, mel_weights, *, n_fft, hop,
                   frame_length, frame_offset, pad_left, pad_mode, n_frames, dither, seed,
                   remove_dc, preemph, kind, power, log_mode, log_floor, whisper_norm):
    """Fill ``out`` with the short-time spectrum of every row of ``x`` (see the module docstring).

    Parameters
    ----------
    x : float32 C-contiguous (N, T)
    out : C-contiguous, written: complex64 (N, n_fft//2 + 1, n_frames) for ``kind="complex"``,
        float32 (N, n_fft//2 + 1, n_frames) for ``"power"``, float32 (N, n_mels, n_frames) for
        ``"mel"``
    window : float32 (frame_length,)
    mel_start, mel_len : int32 (n_mels,) or None; mel_offset : int64 (n_mels,) or None;
    mel_weights : float32 or None -- the sparse filters, given only for ``kind="mel"``
    n_fft, hop, frame_length, frame_offset, pad_left, n_frames : int
    pad_mode : {"reflect", "constant"}
    dither : float; seed : int (taken modulo 2**64); remove_dc : bool; preemph : float
    kind : {"complex", "power", "mel"}; power : float
    log_mode : {"none", "log10", "ln"}; log_floor : float; whisper_norm : bool

    The arguments are expected to be validated by the public ops in :mod:`mmcore.ops.audio`.
    """
    kind_i = _KINDS[kind]
    N = x.shape[0]
    if N == 0 or n_frames == 0:
        return
    cos_t, sin_t = _dft_tables(int(n_fft))
    if kind_i == 2:
        ms = np.ascontiguousarray(mel_start, dtype=np.int32)
        ml = np.ascontiguousarray(mel_len, dtype=np.int32)
        mo = np.ascontiguousarray(mel_offset, dtype=np.int64)
        mw = np.ascontiguousarray(mel_weights, dtype=np.float32)
        if mw.size == 0:
            mw = _DUMMY_F32
    else:
        ms, ml, mo, mw = _DUMMY_I32[:0], _DUMMY_I32[:0], _DUMMY_I64[:0], _DUMMY_F32
    out_c = out if kind_i == 0 else _DUMMY_C64_3
    out_f = out if kind_i != 0 else _DUMMY_F32_3
    args = (
        np.ascontiguousarray(x, dtype=np.float32), np.ascontiguousarray(window, dtype=np.float32),
        cos_t, sin_t, ms, ml, mo, mw, out_c, out_f,
        int(n_fft), int(hop), int(frame_length), int(frame_offset), int(pad_left),
        _PAD_MODES[pad_mode] == 1, int(n_frames),
        float(dither), np.uint64(int(seed) % (1 << 64)), bool(remove_dc), float(preemph),
        kind_i, float(power), _LOG_MODES[log_mode], float(np.float32(log_floor)),
        bool(whisper_norm),
    )
    with _launch_lock:
        _spectral_kernel(*args)
