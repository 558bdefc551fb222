"""Every compiled instruction-set level of the spectral kernel against the float64 reference."""

from __future__ import annotations

import numpy as np
import pytest

from _helpers import at_isa
from mmcore.ops import fbank, log_mel_spectrogram, mel_spectrogram, stft
from reference import fbank_ref, mel_spectrogram_ref, stft_ref, whisper_log_mel_ref


@pytest.fixture(params=["baseline", "avx2", "avx512"])
def isa(request):
    with at_isa(request.param):
        yield request.param


def _signal(n, seed=0):
    rng = np.random.default_rng(seed)
    t = np.arange(n) / 16000.0
    x = 0.3 * np.sin(2 * np.pi * 330 * t) * (0.6 + 0.4 * np.sin(2 * np.pi * 2 * t))
    return (x + 0.02 * rng.standard_normal(n)).astype(np.float32)


@pytest.mark.parametrize("n_fft,hop,win", [(400, 160, None), (512, 128, 400), (31, 7, 20),
                                           (257, 100, None), (64, 1, 64), (2, 1, None)])
def test_stft_every_isa(isa, n_fft, hop, win):
    x = _signal(3001).reshape(1, -1)
    got = stft(x, n_fft=n_fft, hop_length=hop, win_length=win)
    ref = stft_ref(x, n_fft, hop, win_length=win)
    scale = np.abs(ref).max()
    assert np.abs(got - ref).max() <= 2e-6 * scale * max(1.0, np.log2(n_fft))


def test_mel_and_whisper_every_isa(isa):
    x = np.stack([_signal(48000, 1),
                  _signal(47000, 2)[:47000].tolist() + [0.0] * 1000]).astype(np.float32)
    m = mel_spectrogram(x)
    mr = mel_spectrogram_ref(x)
    assert np.abs(m - mr).max() <= 1e-5 * np.abs(mr).max()
    for n_mels in (80, 128):
        w = log_mel_spectrogram(x, n_mels=n_mels)
        assert np.abs(w - whisper_log_mel_ref(x, n_mels=n_mels)).max() <= 1e-4


def test_fbank_every_isa(isa):
    x = _signal(16000, 3) * 32768
    got = fbank(x)
    ref = fbank_ref(x)
    assert np.abs(got - ref).max() <= 2e-3
