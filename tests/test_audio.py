"""Tests of the audio ops (stft, mel_filterbank, mel_spectrogram, log_mel_spectrogram, fbank):
native and numba against the float64 references and each other, and against librosa, the
Whisper formula (torch) and kaldi-native-fbank where those are installed."""

from __future__ import annotations

import doctest
import math
import re
import warnings

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import mmcore
from _helpers import HOST_BACKENDS, PROPERTY_SETTINGS, examples
from _helpers import need_backend as _need_backend
from mmcore.errors import ArgumentError, BackendError, ShapeError
from mmcore.ops import fbank, log_mel_spectrogram, mel_filterbank, mel_spectrogram, stft
from reference import (
    fbank_ref,
    kaldi_mel_banks_ref,
    mel_filterbank_ref,
    mel_spectrogram_ref,
    spectral_ref,
    stft_ref,
    whisper_log_mel_ref,
    window_ref,
)

# float32 FFTs: errors relative to the largest magnitude of the result.
REL_SPEC = 1e-4
# log features: absolute error (log10 units / 4 for Whisper, natural log for fbank)
ATOL_WHISPER = 2e-3
ATOL_FBANK = 2e-3

N_FFTS = [2, 3, 5, 16, 31, 64, 100, 257, 400, 512, 1024]
LENGTHS = [1, 2, 3, 7, 17, 64, 97, 101, 256, 401, 1009, 2003]
HOPS = [1, 2, 3, 7, 16, 64, 160, 401, 1100]
BATCHES = [(), (3,), (2, 2)]
STFT_WINDOWS = ["hann", "hamming", "blackman", "povey", "rectangular"]


def make_signal(rng, shape, dtype=np.float32, amp=0.5, tone=True):
    """Noise plus (optionally) a tone and a DC offset, in ``dtype`` (int16: integer samples)."""
    T = shape[-1]
    x = amp * rng.standard_normal(shape)
    if tone:
        f = rng.uniform(0.01, 0.45)
        x = x + amp * np.sin(2 * np.pi * f * np.arange(T) + rng.uniform(0, 6)) \
            + 0.1 * amp * rng.standard_normal(shape[:-1] + (1,))
    if dtype == np.int16:
        return np.clip(np.round(x * 8000), -32768, 32767).astype(np.int16)
    return x.astype(dtype)


def as_seen(x, scale_int16=True):
    """The float64 values an op computes with (float32 rounding, int16 scaling)."""
    x = np.asarray(x)
    if x.dtype == np.int16:
        return x.astype(np.float64) / (32768.0 if scale_int16 else 1.0)
    return x.astype(np.float32).astype(np.float64)


def assert_spec_close(actual, expected, rel=REL_SPEC, what=""):
    actual = np.asarray(actual)
    expected = np.asarray(expected)
    assert actual.shape == expected.shape, (actual.shape, expected.shape, what)
    if actual.size == 0:
        return
    assert np.isfinite(actual).all(), what
    scale = float(np.abs(expected).max())
    err = float(np.abs(actual.astype(np.complex128) - expected).max())
    assert err <= rel * scale + 1e-30, f"{what}: max error {err:.3g} vs scale {scale:.3g}"


def assert_abs_close(actual, expected, atol, what=""):
    actual = np.asarray(actual, np.float64)
    expected = np.asarray(expected, np.float64)
    assert actual.shape == expected.shape, (actual.shape, expected.shape, what)
    if actual.size:
        err = float(np.abs(actual - expected).max())
        assert err <= atol, f"{what}: max abs error {err:.3g} > {atol}"


# ----------------------------------------------------------------------------------------------
# windows and filterbanks


@pytest.mark.parametrize("name", ["hann", "hamming", "blackman", "povey", "rectangular", "ones"])
@pytest.mark.parametrize("n", [1, 2, 3, 16, 31, 400, 401])
def test_windows_match_reference(name, n):
    from mmcore.ops._audio_filters import kaldi_window, window_function
    w = window_function(name, n)
    assert w.dtype == np.float32 and w.shape == (n,) and not w.flags.writeable
    np.testing.assert_allclose(w, window_ref(name, n, periodic=True), atol=1e-7, rtol=0)
    kw = kaldi_window(name, n)
    np.testing.assert_allclose(kw, window_ref(name, n, periodic=False), atol=1e-7, rtol=0)


def test_windows_match_torch():
    torch = pytest.importorskip("torch")
    from mmcore.ops._audio_filters import kaldi_window, window_function
    for n in (1, 2, 16, 400, 401):
        for name, fn in (("hann", torch.hann_window), ("hamming", torch.hamming_window),
                         ("blackman", torch.blackman_window)):
            np.testing.assert_allclose(window_function(name, n), fn(n, dtype=torch.float64),
                                       atol=1e-7, rtol=0)
        povey = torch.hann_window(n, periodic=False, dtype=torch.float64).pow(0.85)
        np.testing.assert_allclose(kaldi_window("povey", n), povey, atol=1e-7, rtol=0)


@pytest.mark.parametrize("sr,n_fft,n_mels", [(16000, 400, 80), (16000, 400, 128),
                                             (22050, 2048, 128), (8000, 256, 40),
                                             (44100, 1024, 64), (16000, 31, 5), (1000, 2, 1)])
@pytest.mark.parametrize("htk", [False, True])
@pytest.mark.parametrize("norm", ["slaney", None])
def test_mel_filterbank_matches_reference(sr, n_fft, n_mels, htk, norm):
    fb = mel_filterbank(sr=sr, n_fft=n_fft, n_mels=n_mels, htk=htk, norm=norm)
    ref = mel_filterbank_ref(sr, n_fft, n_mels, htk=htk, norm=norm)
    assert fb.dtype == np.float32 and fb.shape == (n_mels, n_fft // 2 + 1)
    np.testing.assert_allclose(fb, ref, atol=1e-6 * max(1.0, ref.max()), rtol=1e-5)
    fb2 = mel_filterbank(sr=sr, n_fft=n_fft, n_mels=n_mels, fmin=0.1 * sr / 2,
                         fmax=0.8 * sr / 2, htk=htk, norm=norm)
    ref2 = mel_filterbank_ref(sr, n_fft, n_mels, 0.1 * sr / 2, 0.8 * sr / 2, htk, norm)
    np.testing.assert_allclose(fb2, ref2, atol=1e-6 * max(1.0, ref2.max()), rtol=1e-5)


def test_mel_filterbank_returns_fresh_arrays():
    a = mel_filterbank(sr=16000, n_fft=400, n_mels=80)
    a[:] = 7.0
    b = mel_filterbank(sr=16000, n_fft=400, n_mels=80)
    assert b.flags.writeable and not (b == 7.0).all()


def test_mel_filterbank_matches_librosa():
    librosa = pytest.importorskip("librosa")
    grid = [(sr, n_fft, n_mels, fmin, fmax, htk, norm)
            for sr in (8000, 16000, 22050, 44100)
            for n_fft in (256, 400, 512, 1023, 2048)
            for n_mels in (40, 80, 128)
            for fmin, fmax in ((0.0, None), (20.0, None), (300.0, 4000.0))
            for htk in (False, True)
            for norm in ("slaney", None)
            if n_mels <= n_fft // 2 + 1]
    worst = 0.0
    for sr, n_fft, n_mels, fmin, fmax, htk, norm in grid:
        ours = mel_filterbank(sr=sr, n_fft=n_fft, n_mels=n_mels, fmin=fmin, fmax=fmax, htk=htk,
                              norm=norm)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")      # librosa warns about empty filters
            theirs = librosa.filters.mel(sr=sr, n_fft=n_fft, n_mels=n_mels, fmin=fmin,
                                         fmax=fmax, htk=htk, norm=norm)
        assert ours.dtype == theirs.dtype == np.float32
        worst = max(worst, float(np.abs(ours - theirs).max()))
    assert worst <= 1e-7


def test_kaldi_mel_banks_match_reference():
    from mmcore.ops._audio_filters import kaldi_mel_filters
    cases = [(16000, 512, 80, 20.0, 8000.0), (16000, 512, 23, 20.0, 7600.0),
             (8000, 256, 40, 0.0, 4000.0), (44100, 2048, 128, 60.0, 20000.0)]
    for sr, n_fft, n_mels, lo, hi in cases:
        ours = kaldi_mel_filters(float(sr), n_fft, n_mels, lo, hi)
        ref = kaldi_mel_banks_ref(sr, n_fft, n_mels, lo, hi)
        np.testing.assert_allclose(ours, ref, atol=1e-6, rtol=0)
        assert (ours[:, -1] == 0).all()                  # the Nyquist bin is never used


# ----------------------------------------------------------------------------------------------
# property tests: stft


@st.composite
def stft_cases(draw):
    n_fft = draw(st.sampled_from(N_FFTS))
    win_length = draw(st.one_of(st.just(None), st.integers(1, n_fft)))
    center = draw(st.booleans())
    pad_mode = draw(st.sampled_from(["reflect", "constant"]))
    need = (n_fft // 2 + 1 if pad_mode == "reflect" else 1) if center else n_fft
    T = draw(st.sampled_from(LENGTHS))
    if T < need:
        T = need + draw(st.sampled_from([0, 1, 2, 13, 100]))
    hop = draw(st.sampled_from(HOPS + [n_fft + 1]))
    batch = draw(st.sampled_from(BATCHES))
    rows = int(np.prod(batch)) if batch else 1
    frames = lambda h: 1 + ((T + 2 * (n_fft // 2) - n_fft) if center else T - n_fft) // h  # noqa
    while rows * frames(hop) * n_fft * (n_fft // 2 + 1) > 2e7:       # keep the DFT cheap
        hop *= 2
    window = draw(st.sampled_from(STFT_WINDOWS))
    dtype = draw(st.sampled_from([np.float32, np.float32, np.float64, np.int16]))
    amp = draw(st.sampled_from([1e-3, 0.5, 100.0]))
    seed = draw(st.integers(0, 2**32 - 1))
    kw = dict(n_fft=n_fft, hop_length=hop, win_length=win_length, window=window, center=center,
              pad_mode=pad_mode)
    return batch + (T,), dtype, amp, seed, kw


def _stft_ref(x, kw):
    return stft_ref(as_seen(x), kw["n_fft"], kw["hop_length"], kw["win_length"], kw["window"],
                    kw["center"], kw["pad_mode"])


@pytest.mark.parametrize("name", HOST_BACKENDS)
@settings(max_examples=examples(100), **PROPERTY_SETTINGS)
@given(case=stft_cases())
def test_property_stft_vs_reference(name, case):
    _need_backend(name)
    shape, dtype, amp, seed, kw = case
    x = make_signal(np.random.default_rng(seed), shape, dtype, amp)
    X = stft(x, backend=name, **kw)
    assert X.dtype == np.complex64
    assert_spec_close(X, _stft_ref(x, kw), what=f"stft {kw}")


@settings(max_examples=examples(100), **PROPERTY_SETTINGS)
@given(case=stft_cases())
def test_property_stft_native_vs_numba(case):
    _need_backend("numba")
    shape, dtype, amp, seed, kw = case
    x = make_signal(np.random.default_rng(seed), shape, dtype, amp)
    a = stft(x, backend="native", **kw)
    b = stft(x, backend="numba", **kw)
    assert_spec_close(a, b, what=f"stft {kw}")


# ----------------------------------------------------------------------------------------------
# property tests: mel spectrogram, whisper log-mel, fbank


@st.composite
def mel_cases(draw):
    sr = draw(st.sampled_from([8000, 16000, 22050]))
    n_fft = draw(st.sampled_from([64, 100, 257, 400, 512]))
    n_mels = min(draw(st.sampled_from([1, 10, 26, 40])), n_fft // 2 + 1)
    hop = draw(st.sampled_from([16, 64, 160, 401]))
    center = draw(st.booleans())
    pad_mode = draw(st.sampled_from(["reflect", "constant"]))
    T = draw(st.sampled_from([n_fft, 1009, 2003, 4001]))
    fmin, fmax = draw(st.sampled_from([(0.0, None), (30.0, 0.4 * sr), (500.0, 0.5 * sr)]))
    kw = dict(sr=sr, n_fft=n_fft, hop_length=hop, n_mels=n_mels, center=center,
              pad_mode=pad_mode, fmin=fmin, fmax=fmax,
              win_length=draw(st.sampled_from([None, n_fft // 2 + 1])),
              window=draw(st.sampled_from(["hann", "hamming"])),
              power=draw(st.sampled_from([1.0, 2.0])), htk=draw(st.booleans()),
              norm=draw(st.sampled_from(["slaney", None])))
    batch = draw(st.sampled_from(BATCHES))
    dtype = draw(st.sampled_from([np.float32, np.float64, np.int16]))
    return batch + (T,), dtype, draw(st.integers(0, 2**32 - 1)), kw


@pytest.mark.parametrize("name", HOST_BACKENDS)
@settings(max_examples=examples(40), **PROPERTY_SETTINGS)
@given(case=mel_cases())
def test_property_mel_spectrogram_vs_reference(name, case):
    _need_backend(name)
    shape, dtype, seed, kw = case
    x = make_signal(np.random.default_rng(seed), shape, dtype)
    M = mel_spectrogram(x, backend=name, **kw)
    assert M.dtype == np.float32
    assert_spec_close(M, mel_spectrogram_ref(as_seen(x), **kw), what=f"mel {kw}")
    if name == "numba":
        assert_spec_close(mel_spectrogram(x, backend="native", **kw), M, what="native vs numba")


@st.composite
def whisper_cases(draw):
    T = draw(st.sampled_from([201, 202, 401, 1009, 3203, 8000]))
    return (draw(st.sampled_from(BATCHES)) + (T,), draw(st.sampled_from([80, 128])),
            draw(st.sampled_from([np.float32, np.float64, np.int16])),
            draw(st.sampled_from([1e-3, 0.3, 30.0])), draw(st.integers(0, 2**32 - 1)))


@pytest.mark.parametrize("name", HOST_BACKENDS)
@settings(max_examples=examples(30), **PROPERTY_SETTINGS)
@given(case=whisper_cases())
def test_property_whisper_log_mel_vs_reference(name, case):
    _need_backend(name)
    shape, n_mels, dtype, amp, seed = case
    x = make_signal(np.random.default_rng(seed), shape, dtype, amp)
    L = log_mel_spectrogram(x, n_mels=n_mels, backend=name)
    assert L.dtype == np.float32 and L.shape == shape[:-1] + (n_mels, shape[-1] // 160)
    assert_abs_close(L, whisper_log_mel_ref(as_seen(x), n_mels), ATOL_WHISPER, "whisper")
    top = L.reshape(-1, n_mels * L.shape[-1]).max(axis=1)
    low = L.reshape(-1, n_mels * L.shape[-1]).min(axis=1)
    assert (low >= top - 2.0 - 1e-6).all()          # the floor at max - 8 (in log10), / 4
    if name == "numba":
        assert_abs_close(log_mel_spectrogram(x, n_mels=n_mels, backend="native"), L,
                         ATOL_WHISPER, "native vs numba")


@st.composite
def fbank_cases(draw):
    sr = draw(st.sampled_from([8000, 16000]))
    length_ms, shift_ms = draw(st.sampled_from([(25.0, 10.0), (20.0, 10.0), (32.0, 8.0),
                                                (25.0, 30.0)]))
    L = int(round(sr * length_ms / 1000))
    T = draw(st.sampled_from([L, L + 1, 2003, 4001, 8000]))
    kw = dict(sr=sr, frame_length_ms=length_ms, frame_shift_ms=shift_ms,
              n_mels=draw(st.sampled_from([5, 23, 40])),
              preemphasis=draw(st.sampled_from([0.97, 0.0, 0.5])),
              remove_dc_offset=draw(st.booleans()),
              window=draw(st.sampled_from(["povey", "hann", "hamming", "rectangular",
                                           "blackman"])),
              round_to_power_of_two=draw(st.booleans()),
              snip_edges=draw(st.booleans()),
              low_freq=draw(st.sampled_from([20.0, 0.0, 300.0])),
              high_freq=draw(st.sampled_from([0.0, -400.0, 3000.0])),
              use_log=draw(st.booleans()), use_power=draw(st.booleans()))
    if draw(st.booleans()):
        kw.update(dither=draw(st.sampled_from([0.5, 3.0])), seed=draw(st.integers(0, 2**64 - 1)))
    batch = draw(st.sampled_from(BATCHES))
    dtype = draw(st.sampled_from([np.float32, np.float64, np.int16]))
    return batch + (T,), dtype, draw(st.integers(0, 2**32 - 1)), kw


def _fbank_close(a, ref, kw, what):
    if kw["use_log"]:
        assert_abs_close(a, ref, ATOL_FBANK, what)
    else:
        assert_spec_close(a, ref, what=what)


@pytest.mark.parametrize("name", HOST_BACKENDS)
@settings(max_examples=examples(30), **PROPERTY_SETTINGS)
@given(case=fbank_cases())
def test_property_fbank_vs_reference(name, case):
    _need_backend(name)
    shape, dtype, seed, kw = case
    x = make_signal(np.random.default_rng(seed), shape, dtype, amp=3000.0)
    F = fbank(x, backend=name, **kw)
    assert F.dtype == np.float32 and F.shape[-1] == kw["n_mels"]
    ref = fbank_ref(as_seen(x, scale_int16=False), **kw)
    _fbank_close(F, ref, kw, f"fbank {kw}")
    if name == "numba":
        _fbank_close(fbank(x, backend="native", **kw), F, kw, "native vs numba")


# ----------------------------------------------------------------------------------------------
# the kernel contract itself (power spectra, log modes, pad offsets that no op uses)


@st.composite
def kernel_cases(draw):
    n_fft = draw(st.sampled_from([2, 5, 16, 31, 64]))
    frame_length = draw(st.integers(1, n_fft))
    frame_offset = draw(st.integers(0, n_fft - frame_length))
    T = draw(st.sampled_from([5, 17, 64, 97]))
    pad_mode = draw(st.sampled_from(["reflect", "constant"]))
    pad_left = draw(st.integers(0, min(T - 1, n_fft)))
    hop = draw(st.sampled_from([1, 3, 16, 70]))
    n_frames = draw(st.integers(1, 12))
    # stay within one reflection of the signal
    if pad_mode == "reflect":
        while (n_frames - 1) * hop - pad_left + n_fft - 1 > 2 * (T - 1) and n_frames > 1:
            n_frames -= 1
        if (n_frames - 1) * hop - pad_left + n_fft - 1 > 2 * (T - 1):
            pad_mode = "constant"
    kind = draw(st.sampled_from(["complex", "power", "mel"]))
    kw = dict(n_fft=n_fft, hop=hop, frame_length=frame_length, frame_offset=frame_offset,
              pad_left=pad_left, pad_mode=pad_mode, n_frames=n_frames,
              dither=draw(st.sampled_from([0.0, 0.0, 0.3])), seed=draw(st.integers(0, 2**64 - 1)),
              remove_dc=draw(st.booleans()), preemph=draw(st.sampled_from([0.0, 0.97])),
              kind=kind, power=draw(st.sampled_from([1.0, 2.0, 1.5])),
              log_mode=draw(st.sampled_from(["none", "log10", "ln"])) if kind != "complex"
              else "none", log_floor=1e-6)
    kw["whisper_norm"] = kind == "mel" and kw["log_mode"] == "log10" and draw(st.booleans())
    n_mels = draw(st.integers(1, n_fft // 2 + 1))
    return draw(st.integers(1, 3)), T, n_mels, draw(st.integers(0, 2**32 - 1)), kw


@settings(max_examples=examples(100), **PROPERTY_SETTINGS)
@given(case=kernel_cases())
def test_property_kernel_contract(case):
    _need_backend("numba")
    from mmcore._backend import native_module
    from mmcore.kernels.numba.spectral import spectral_numba
    from mmcore.ops._audio_filters import sparse_mel
    N, T, n_mels, seed, kw = case
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((N, T)).astype(np.float32)
    window = rng.uniform(0.1, 1.0, kw["frame_length"]).astype(np.float32)
    n_bins = kw["n_fft"] // 2 + 1
    dense = None
    mel_args = (None, None, None, None)
    if kw["kind"] == "mel":
        dense = (rng.random((n_mels, n_bins)) * (rng.random((n_mels, n_bins)) < 0.6))
        dense = dense.astype(np.float32)
        mel_args = tuple(sparse_mel(dense))
    rows = n_mels if kw["kind"] == "mel" else n_bins
    dtype = np.complex64 if kw["kind"] == "complex" else np.float32
    ref = spectral_ref(x, window, mel=dense, **kw)
    outs = []
    for run in ("native", "numba"):
        out = np.full((N, rows, kw["n_frames"]), np.nan, dtype)
        if run == "native":
            native_module().spectral(x, out, window, *mel_args, num_threads=2, **kw)
        else:
            spectral_numba(x, out, window, *mel_args, **kw)
        outs.append(out)
        if kw["log_mode"] == "none":
            assert_spec_close(out, ref, what=f"{run} {kw}")
        else:
            assert_abs_close(out, ref, 1e-3, f"{run} {kw}")
    assert_spec_close(outs[0], outs[1], rel=2e-3 if kw["log_mode"] != "none" else REL_SPEC)


# ----------------------------------------------------------------------------------------------
# agreement with librosa, the Whisper formula and Kaldi


def speech_like(seconds=3.0, sr=16000, seed=0):
    """Harmonics of a gliding pitch with syllable-rate amplitude modulation, plus noise."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * sr)) / sr
    f0 = 120 + 30 * np.sin(2 * np.pi * 0.7 * t)
    phase = 2 * np.pi * np.cumsum(f0) / sr
    voiced = sum(np.sin(h * phase) / h for h in range(1, 25))
    envelope = 0.5 + 0.5 * np.sin(2 * np.pi * 4 * t) ** 2
    x = voiced * envelope + 0.02 * rng.standard_normal(t.size)
    return (0.4 * x / np.abs(x).max()).astype(np.float32)


@pytest.mark.parametrize("pad_mode", ["reflect", "constant"])
@pytest.mark.parametrize("power,htk,norm", [(2.0, False, "slaney"), (1.0, True, None),
                                            (2.0, True, "slaney")])
def test_mel_spectrogram_matches_librosa(backend, pad_mode, power, htk, norm):
    librosa = pytest.importorskip("librosa")
    x = speech_like(2.0, 22050, seed=1)
    kw = dict(sr=22050, n_fft=1024, hop_length=256, n_mels=64, fmin=30.0, fmax=8000.0,
              power=power, htk=htk, norm=norm)
    ours = mel_spectrogram(x, center=True, pad_mode=pad_mode, backend=backend, **kw)
    theirs = librosa.feature.melspectrogram(y=x, center=True, pad_mode=pad_mode, **kw)
    assert_spec_close(ours, theirs, rel=1e-5)
    # Whisper-sized settings and win_length < n_fft
    ours = mel_spectrogram(x[:16000], sr=16000, win_length=300, pad_mode=pad_mode,
                           backend=backend)
    theirs = librosa.feature.melspectrogram(y=x[:16000], sr=16000, n_fft=400, hop_length=160,
                                            win_length=300, n_mels=80, pad_mode=pad_mode)
    assert_spec_close(ours, theirs, rel=1e-5)


def test_stft_matches_librosa_and_torch(backend):
    librosa = pytest.importorskip("librosa")
    torch = pytest.importorskip("torch")
    x = speech_like(1.0, seed=2)
    for n_fft, hop, win in [(400, 160, None), (512, 128, 400), (31, 7, 20), (4, 1, None),
                            (2, 1, None)]:
        ours = stft(x, n_fft=n_fft, hop_length=hop, win_length=win, backend=backend)
        tw = torch.hann_window(win or n_fft)
        tor = torch.stft(torch.from_numpy(x), n_fft, hop, win_length=win, window=tw,
                         return_complex=True).numpy()
        assert_spec_close(ours, tor, rel=2e-6 * max(1, math.log2(n_fft)))
        if n_fft > 2:   # librosa's last frame for n_fft = 2 repeats the edge sample
            lib = librosa.stft(x, n_fft=n_fft, hop_length=hop, win_length=win,
                               pad_mode="reflect")
            assert_spec_close(ours, lib, rel=2e-6 * max(1, math.log2(n_fft)))


def whisper_formula(x, n_mels):
    """openai-whisper's log_mel_spectrogram, restated with torch and librosa's filters."""
    torch = pytest.importorskip("torch")
    librosa = pytest.importorskip("librosa")
    audio = torch.from_numpy(np.asarray(x, np.float32))
    window = torch.hann_window(400)
    spec = torch.stft(audio, 400, 160, window=window, return_complex=True)
    magnitudes = spec[..., :-1].abs() ** 2
    filters = torch.from_numpy(librosa.filters.mel(sr=16000, n_fft=400, n_mels=n_mels))
    mel_spec = filters @ magnitudes
    log_spec = torch.clamp(mel_spec, min=1e-10).log10()
    log_spec = torch.maximum(log_spec, log_spec.max() - 8.0)
    return ((log_spec + 4.0) / 4.0).numpy()


@pytest.mark.parametrize("n_mels", [80, 128])
def test_whisper_matches_torch_formula(backend, n_mels):
    x = speech_like(4.0, seed=3)
    ours = log_mel_spectrogram(x, n_mels=n_mels, backend=backend)
    theirs = whisper_formula(x, n_mels)
    assert ours.shape == theirs.shape == (n_mels, 400)
    assert float(np.abs(ours - theirs).max()) <= 1e-4
    # 30 s model input through padding, and a quiet signal where the floor at max - 8 bites
    quiet = speech_like(1.5, seed=4) * 1e-3
    ours = log_mel_spectrogram(quiet, n_mels=n_mels, padding=480000 - quiet.size,
                               backend=backend)
    theirs = whisper_formula(np.pad(quiet, (0, 480000 - quiet.size)), n_mels)
    assert ours.shape == theirs.shape == (n_mels, 3000)
    assert float(np.abs(ours - theirs).max()) <= 1e-4


def _knf_fbank(x, *, sr=16000, n_mels=80, frame_length_ms=25.0, frame_shift_ms=10.0,
               preemphasis=0.97, remove_dc_offset=True, window="povey",
               round_to_power_of_two=True, snip_edges=True, low_freq=20.0, high_freq=0.0,
               use_log=True, use_power=True):
    knf = pytest.importorskip("kaldi_native_fbank")
    opts = knf.FbankOptions()
    fo = opts.frame_opts
    fo.dither = 0.0
    fo.samp_freq = float(sr)
    fo.frame_length_ms = frame_length_ms
    fo.frame_shift_ms = frame_shift_ms
    fo.preemph_coeff = preemphasis
    fo.remove_dc_offset = remove_dc_offset
    fo.window_type = {"hann": "hanning"}.get(window, window)
    fo.round_to_power_of_two = round_to_power_of_two
    fo.snip_edges = snip_edges
    opts.mel_opts.num_bins = n_mels
    opts.mel_opts.low_freq = low_freq
    opts.mel_opts.high_freq = high_freq
    opts.use_energy = False
    opts.use_log_fbank = use_log
    opts.use_power = use_power
    comp = knf.OnlineFbank(opts)
    comp.accept_waveform(float(sr), np.asarray(x, np.float32).tolist())
    comp.input_finished()
    return np.array([comp.get_frame(i) for i in range(comp.num_frames_ready)], np.float32)


@pytest.mark.parametrize("opts", [
    {},
    dict(snip_edges=False),
    dict(n_mels=23),
    dict(n_mels=110),
    dict(n_mels=64, low_freq=0.0),
    dict(window="hamming", preemphasis=0.0),
    dict(window="hann", remove_dc_offset=False),
    dict(window="rectangular", round_to_power_of_two=False),
    dict(sr=8000, n_mels=40, high_freq=-200.0),
    dict(frame_length_ms=32.0, frame_shift_ms=16.0, low_freq=60.0, high_freq=7000.0),
    dict(use_power=False),
])
def test_fbank_matches_kaldi_native_fbank(backend, opts):
    pytest.importorskip("kaldi_native_fbank")
    sr = opts.get("sr", 16000)
    x = speech_like(2.0, sr, seed=5) * 32768.0
    ours = fbank(x, backend=backend, **opts)
    theirs = _knf_fbank(x, **opts)
    assert ours.shape == theirs.shape
    assert float(np.abs(ours - theirs).max()) <= 1e-3


def test_fbank_rejects_empty_mel_bins_like_kaldi():
    knf = pytest.importorskip("kaldi_native_fbank")
    opts = knf.FbankOptions()
    opts.mel_opts.num_bins = 128
    opts.mel_opts.low_freq = 0.0
    with pytest.raises(ValueError):      # kaldi_native_fbank: "num_mel_bins too large"
        knf.OnlineFbank(opts)
    with pytest.raises(ArgumentError, match=r"mel bin 0 covers no FFT bin"):
        fbank(speech_like(1.0), n_mels=128, low_freq=0.0)


def test_fbank_int16_matches_kaldi_native_fbank(backend):
    pytest.importorskip("kaldi_native_fbank")
    x = np.round(speech_like(1.0, seed=6) * 32768.0).astype(np.int16)
    ours = fbank(x, backend=backend)
    theirs = _knf_fbank(x.astype(np.float32))
    assert float(np.abs(ours - theirs).max()) <= 1e-3


# ----------------------------------------------------------------------------------------------
# batches, dtypes, layouts


def _all_ops():
    return [
        ("stft", lambda x, b: stft(x, n_fft=64, hop_length=16, backend=b)),
        ("stft_odd", lambda x, b: stft(x, n_fft=31, hop_length=40, win_length=20,
                                       window="hamming", center=False, backend=b)),
        ("mel_spectrogram", lambda x, b: mel_spectrogram(x, backend=b)),
        ("mel_power1", lambda x, b: mel_spectrogram(x, power=1.0, pad_mode="constant",
                                                    htk=True, norm=None, backend=b)),
        ("log_mel", lambda x, b: log_mel_spectrogram(x, backend=b)),
        ("log_mel128", lambda x, b: log_mel_spectrogram(x, n_mels=128, backend=b)),
        ("fbank", lambda x, b: fbank(x, backend=b)),
        ("fbank_nosnip", lambda x, b: fbank(x, snip_edges=False, use_log=False, backend=b)),
    ]


@pytest.mark.parametrize("op", _all_ops(), ids=lambda o: o[0])
def test_batch_equals_per_item(backend, op):
    _, fn = op
    rng = np.random.default_rng(7)
    x = make_signal(rng, (2, 3, 1601))
    x[1, 2] *= 1e-3                              # rows of very different level
    full = fn(x, backend)
    assert full.shape[:2] == (2, 3)
    for i in range(2):
        for j in range(3):
            np.testing.assert_array_equal(full[i, j], fn(x[i, j], backend))
    np.testing.assert_array_equal(fn(x.reshape(6, -1), backend).reshape(full.shape), full)


@pytest.mark.parametrize("op", _all_ops(), ids=lambda o: o[0])
def test_empty_batch(backend, op):
    _, fn = op
    x = np.zeros((0, 3, 1601), np.float32)
    out = fn(x, backend)
    ref_shape = fn(np.zeros(1601, np.float32) + 0.1, backend).shape
    assert out.shape == (0, 3) + ref_shape


@pytest.mark.parametrize("op", _all_ops(), ids=lambda o: o[0])
def test_int16_scaling(backend, op):
    name, fn = op
    x = make_signal(np.random.default_rng(8), (2, 1601), np.int16)
    a = fn(x, backend)
    scale = 1.0 if name.startswith("fbank") else 1.0 / 32768.0
    b = fn(x.astype(np.float32) * np.float32(scale), backend)
    np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("op", _all_ops(), ids=lambda o: o[0])
def test_dtypes_layouts_and_inputs_untouched(backend, op):
    _, fn = op
    x = make_signal(np.random.default_rng(9), (2, 1601), np.float64)
    ref = fn(x.astype(np.float32), backend)
    x_copy = x.copy()
    np.testing.assert_array_equal(fn(x, backend), ref)                        # float64 is cast
    np.testing.assert_array_equal(x, x_copy)
    wide = np.zeros((2, 3202), np.float32)
    wide[:, ::2] = x
    np.testing.assert_array_equal(fn(wide[:, ::2], backend), ref)             # strided view
    ro = x.astype(np.float32)
    ro.setflags(write=False)
    np.testing.assert_array_equal(fn(ro, backend), ref)                       # read-only
    np.testing.assert_array_equal(fn(x.astype(np.float32).tolist(), backend), ref)  # lists
    h = fn(x.astype(np.float16), backend)                                     # float16
    np.testing.assert_array_equal(h, fn(x.astype(np.float16).astype(np.float32), backend))


def test_thread_count_does_not_change_results():
    x = make_signal(np.random.default_rng(10), (3, 8000))
    before = mmcore.get_num_threads()
    try:
        mmcore.set_num_threads(1)
        a = [fbank(x * 1000), log_mel_spectrogram(x), stft(x, n_fft=512, hop_length=100)]
        mmcore.set_num_threads(3)
        b = [fbank(x * 1000), log_mel_spectrogram(x), stft(x, n_fft=512, hop_length=100)]
    finally:
        mmcore.set_num_threads(before)
    for u, v in zip(a, b):
        np.testing.assert_array_equal(u, v)


def test_stft_default_hop_and_shapes(backend):
    x = make_signal(np.random.default_rng(11), (1000,))
    assert stft(x, n_fft=64, backend=backend).shape == (33, 1 + 1000 // 16)
    assert stft(x, n_fft=3, backend=backend).shape == (2, 1000)       # hop max(1, 3 // 4)
    assert stft(x, n_fft=64, center=False, backend=backend).shape == (33, 1 + (1000 - 64) // 16)
    assert stft(x, n_fft=65, hop_length=10, backend=backend).shape == (33, 1 + 999 // 10)
    np.testing.assert_array_equal(stft(x, n_fft=64, backend=backend),
                                  stft(x, n_fft=64, hop_length=16, win_length=64,
                                       window="hann", backend=backend))


@pytest.mark.parametrize("n_fft", [1000, 2047, 2048, 4099, 8191])
def test_stft_large_and_prime_sizes(backend, n_fft):
    rows = 1 if n_fft > 4096 else 2      # a direct DFT for large primes is slow on every backend
    x = make_signal(np.random.default_rng(n_fft), (rows, 2 * n_fft + 5))
    hop = n_fft - 1
    X = stft(x, n_fft=n_fft, hop_length=hop, win_length=n_fft - 7, backend=backend)
    assert_spec_close(X, stft_ref(as_seen(x), n_fft, hop, n_fft - 7))


def test_stft_window_array(backend):
    x = make_signal(np.random.default_rng(12), (700,))
    w = np.random.default_rng(0).uniform(0.2, 1.0, 48)
    X = stft(x, n_fft=64, hop_length=10, win_length=48, window=w, backend=backend)
    assert_spec_close(X, stft_ref(as_seen(x), 64, 10, 48, w.astype(np.float32)))


def test_stft_signal_just_long_enough(backend):
    x = make_signal(np.random.default_rng(13), (201,))
    assert_spec_close(stft(x, n_fft=400, hop_length=160, backend=backend),
                      stft_ref(as_seen(x), 400, 160))
    x1 = np.array([0.25], np.float32)
    X = stft(x1, n_fft=16, pad_mode="constant", backend=backend)
    assert_spec_close(X, stft_ref(x1, 16, 4, pad_mode="constant"))
    X = stft(make_signal(np.random.default_rng(14), (64,)), n_fft=64, center=False,
             backend=backend)
    assert X.shape == (33, 1)


def test_log_mel_shapes_and_padding(backend):
    x = make_signal(np.random.default_rng(15), (2, 16000))
    assert log_mel_spectrogram(x, backend=backend).shape == (2, 80, 100)
    padded = log_mel_spectrogram(x, padding=1000, backend=backend)
    assert padded.shape == (2, 80, 106)
    np.testing.assert_array_equal(
        padded, log_mel_spectrogram(np.pad(x, ((0, 0), (0, 1000))), backend=backend))


def test_silence(backend):
    """All-zero input: floors, no NaN or -inf anywhere."""
    z = np.zeros(4000, np.float32)
    assert (stft(z, n_fft=64, backend=backend) == 0).all()
    L = log_mel_spectrogram(z, backend=backend)
    np.testing.assert_allclose(L, (-10.0 + 4.0) / 4.0, rtol=0, atol=1e-6)
    F = fbank(z, backend=backend)
    np.testing.assert_allclose(F, np.log(np.finfo(np.float32).eps), rtol=1e-6)


# ----------------------------------------------------------------------------------------------
# dither


def test_dither_reproducible_and_matches_reference(backend):
    x = make_signal(np.random.default_rng(16), (2, 2000), amp=100.0)
    kw = dict(dither=1.0, seed=1234, n_mels=23)
    a = fbank(x, backend=backend, **kw)
    np.testing.assert_array_equal(a, fbank(x, backend=backend, **kw))
    assert_abs_close(a, fbank_ref(as_seen(x), **kw), ATOL_FBANK, "dither vs reference")
    b = fbank(x, backend=backend, dither=1.0, seed=1235, n_mels=23)
    assert not np.array_equal(a, b)
    c = fbank(x, backend=backend, dither=1.0, n_mels=23)          # a random seed
    assert c.shape == a.shape and np.isfinite(c).all()


def test_dither_same_on_both_backends():
    _need_backend("numba")
    x = np.zeros((2, 1600), np.float32)        # pure noise: the features are the dither itself
    kw = dict(dither=1.0, seed=99, use_log=False, preemphasis=0.0, remove_dc_offset=False)
    a = fbank(x, backend="native", **kw)
    b = fbank(x, backend="numba", **kw)
    assert_spec_close(a, b)
    assert_spec_close(a, fbank_ref(x, **kw))


def test_dither_normal_statistics_and_reference():
    pytest.importorskip("numba")
    from mmcore.kernels.numba.spectral import dither_normal
    from reference import dither_normal_ref
    t = np.arange(20000)
    ref = dither_normal_ref(7, 1, 2, t)
    assert abs(ref.mean()) < 0.03 and abs(ref.std() - 1.0) < 0.03
    ours = np.array([dither_normal(np.uint64(7), 1, 2, i) for i in range(50)])
    np.testing.assert_allclose(ours, ref[:50], rtol=1e-12, atol=1e-12)


# ----------------------------------------------------------------------------------------------
# bad inputs


GOOD = np.zeros(4000, np.float32) + 0.01


BAD_CASES = [
    # stft
    (lambda: stft(GOOD, n_fft=1), r"\[stft\] n_fft must be >= 2"),
    (lambda: stft(GOOD, n_fft=400.0), r"\[stft\] n_fft must be an int"),
    (lambda: stft(GOOD, n_fft=True), r"\[stft\] n_fft must be an int"),
    (lambda: stft(GOOD, n_fft=400, hop_length=0), r"\[stft\] hop_length must be >= 1, got 0"),
    (lambda: stft(GOOD, n_fft=400, hop_length=-3), r"\[stft\] hop_length"),
    (lambda: stft(GOOD, n_fft=400, win_length=401), r"\[stft\] win_length"),
    (lambda: stft(GOOD, n_fft=400, win_length=0), r"\[stft\] win_length"),
    (lambda: stft(GOOD, n_fft=400, window="kaiser"), r"\[stft\] window"),
    (lambda: stft(GOOD, n_fft=400, window=np.ones(300)), r"\[stft\] window has shape"),
    (lambda: stft(GOOD, n_fft=400, pad_mode="edge"), r"\[stft\] pad_mode"),
    (lambda: stft(GOOD, n_fft=400, center="yes"), r"\[stft\] center"),
    (lambda: stft(np.zeros(0, np.float32), n_fft=16), r"\[stft\] x is empty"),
    (lambda: stft(np.zeros((3, 0), np.float32), n_fft=16), r"\[stft\] x is empty"),
    (lambda: stft(np.float32(1.0), n_fft=16), r"\[stft\] x has 0 dims"),
    (lambda: stft(GOOD[:200], n_fft=400), r"\[stft\] x has T = 200 samples, too short"),
    (lambda: stft(GOOD[:399], n_fft=400, center=False), r"\[stft\] x has T = 399 .*n_fft"),
    (lambda: stft(GOOD.astype(np.int32), n_fft=16), r"\[stft\] x has dtype int32"),
    (lambda: stft(GOOD.astype(np.complex64), n_fft=16), r"\[stft\] x has dtype complex64"),
    (lambda: stft(GOOD > 0, n_fft=16), r"\[stft\] x has dtype bool"),
    (lambda: stft(None, n_fft=16), r"\[stft\] x is required"),
    # mel_filterbank
    (lambda: mel_filterbank(sr=16000, n_fft=400, n_mels=202), r"\[mel_filterbank\] n_mels = 202"),
    (lambda: mel_filterbank(sr=16000, n_fft=400, n_mels=0), r"\[mel_filterbank\] n_mels"),
    (lambda: mel_filterbank(sr=16000, n_fft=400, fmax=8001.0), r"\[mel_filterbank\] fmax"),
    (lambda: mel_filterbank(sr=16000, n_fft=400, fmin=-1.0), r"\[mel_filterbank\] fmin"),
    (lambda: mel_filterbank(sr=16000, n_fft=400, fmin=5000.0, fmax=4000.0),
     r"\[mel_filterbank\] fmax = 4000.0 must be greater than fmin"),
    (lambda: mel_filterbank(sr=0, n_fft=400), r"\[mel_filterbank\] sr must be > 0"),
    (lambda: mel_filterbank(sr=float("nan"), n_fft=400), r"\[mel_filterbank\] sr must be finite"),
    (lambda: mel_filterbank(sr=16000, n_fft=1), r"\[mel_filterbank\] n_fft"),
    (lambda: mel_filterbank(sr=16000, n_fft=400, norm="l2"), r"\[mel_filterbank\] norm"),
    (lambda: mel_filterbank(sr=16000, n_fft=400, htk="yes"), r"\[mel_filterbank\] htk"),
    # mel_spectrogram
    (lambda: mel_spectrogram(GOOD, power=0.0), r"\[mel_spectrogram\] power must be > 0"),
    (lambda: mel_spectrogram(GOOD, n_mels=300), r"\[mel_spectrogram\] n_mels = 300"),
    (lambda: mel_spectrogram(GOOD, fmax=9000.0), r"\[mel_spectrogram\] fmax"),
    (lambda: mel_spectrogram(GOOD, hop_length=0), r"\[mel_spectrogram\] hop_length must be >= 1"),
    (lambda: mel_spectrogram(GOOD, n_fft=1), r"\[mel_spectrogram\] n_fft"),
    (lambda: mel_spectrogram(GOOD[:100]), r"\[mel_spectrogram\] x has T = 100"),
    # log_mel_spectrogram
    (lambda: log_mel_spectrogram(GOOD, n_mels=64), r"\[log_mel_spectrogram\] n_mels must be 80"),
    (lambda: log_mel_spectrogram(GOOD, preset="kaldi"), r"\[log_mel_spectrogram\] preset"),
    (lambda: log_mel_spectrogram(GOOD[:200]), r"\[log_mel_spectrogram\] x has T = 200"),
    (lambda: log_mel_spectrogram(GOOD, padding=-1), r"\[log_mel_spectrogram\] padding"),
    (lambda: log_mel_spectrogram(GOOD.astype(np.uint8)), r"\[log_mel_spectrogram\] x has dtype"),
    # fbank
    (lambda: fbank(GOOD[:399]), r"\[fbank\] x has T = 399 samples, fewer than one frame"),
    (lambda: fbank(GOOD, high_freq=9000.0), r"\[fbank\] .*high_freq"),
    (lambda: fbank(GOOD, low_freq=7000.0, high_freq=6000.0), r"\[fbank\] .*low_freq"),
    (lambda: fbank(GOOD, low_freq=-1.0), r"\[fbank\] .*low_freq"),
    (lambda: fbank(GOOD, n_mels=300), r"\[fbank\] n_mels = 300"),
    (lambda: fbank(GOOD, n_mels=200), r"\[fbank\] n_mels = 200 .*covers no FFT bin"),
    (lambda: fbank(GOOD, n_mels=0), r"\[fbank\] n_mels"),
    (lambda: fbank(GOOD, dither=-1.0), r"\[fbank\] dither"),
    (lambda: fbank(GOOD, dither=1.0, seed="abc"), r"\[fbank\] seed"),
    (lambda: fbank(GOOD, preemphasis=1.5), r"\[fbank\] preemphasis"),
    (lambda: fbank(GOOD, window="kaiser"), r"\[fbank\] window"),
    (lambda: fbank(GOOD, window=np.ones(400)), r"\[fbank\] window"),
    (lambda: fbank(GOOD, frame_shift_ms=0.0), r"\[fbank\] frame_shift_ms"),
    (lambda: fbank(GOOD, frame_length_ms=0.01), r"\[fbank\] frame_length_ms"),
    (lambda: fbank(GOOD, frame_length_ms=25.0625, round_to_power_of_two=False),
     r"\[fbank\] the FFT size must be even"),
    (lambda: fbank(GOOD, sr=-16000), r"\[fbank\] sr"),
    (lambda: fbank(GOOD, snip_edges=None), r"\[fbank\] snip_edges"),
    (lambda: fbank(GOOD[:4], snip_edges=False), r"\[fbank\] x has T = 4 samples: no frame"),
    (lambda: fbank(GOOD.astype(np.int64)), r"\[fbank\] x has dtype int64"),
]


def _expected_error(match):
    """Problems of the signal array (rank, size, dtype) and of a window array's shape are
    ShapeErrors; every other bad argument (types, names, scalars) is an ArgumentError."""
    array_problem = re.search(r"\] (x has|x is empty|window has shape)", match)
    return ShapeError if array_problem else ArgumentError


@pytest.mark.parametrize("case", BAD_CASES, ids=lambda c: c[1][:40])
def test_bad_inputs_raise(case):
    fn, match = case
    with pytest.raises(_expected_error(match), match=match):
        fn()


@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("op", _all_ops(), ids=lambda o: o[0])
def test_non_finite_samples_raise(backend, op, value):
    _, fn = op
    x = make_signal(np.random.default_rng(17), (2, 1601))
    x[1, 777] = value
    with pytest.raises(ShapeError, match=r"contains (NaN|Inf) samples"):
        fn(x, backend)
    big = x.astype(np.float64)
    big[1, 777] = 1e300                                    # overflows float32
    with pytest.raises(ShapeError, match=r"contains Inf samples"):
        fn(big, backend)


def test_errors_are_value_errors_and_cuda_needs_device_arrays():
    with pytest.raises(ValueError):
        stft(GOOD, n_fft=1)
    with pytest.raises(BackendError):
        stft(GOOD, n_fft=16, backend="cuda")
    with pytest.raises(BackendError):
        fbank(GOOD, backend="nope")


# ----------------------------------------------------------------------------------------------
# documentation examples and the cuda backend


def test_docstring_examples():
    import mmcore.ops._audio_filters as filters_mod
    import mmcore.ops.audio as audio_mod
    for mod in (audio_mod, filters_mod):
        failures, tried = doctest.testmod(mod, optionflags=doctest.NORMALIZE_WHITESPACE)
        assert tried > 0 and failures == 0


@pytest.mark.cuda
def test_cuda_matches_host():
    cp = pytest.importorskip("cupy")
    x = make_signal(np.random.default_rng(18), (2, 16000))
    xd = cp.asarray(x)
    for fn in (lambda a: stft(a, n_fft=400, hop_length=160), lambda a: mel_spectrogram(a),
               lambda a: log_mel_spectrogram(a), lambda a: fbank(a * 32768)):
        dev = fn(xd)
        assert isinstance(dev, cp.ndarray)
        assert_spec_close(cp.asnumpy(dev), fn(x), rel=2e-3)
