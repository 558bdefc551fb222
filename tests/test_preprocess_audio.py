"""PreprocessingConfig, audio decoding/resampling and the batched AudioPreprocessor."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import subprocess
import sys
import tempfile

import numpy as np
import pytest

import mmcore
from mmcore.config import PreprocessingConfig
from mmcore.errors import ArgumentError, AudioDecodeError, ConfigError, MMCoreError, ShapeError
from mmcore.preprocess import AudioPreprocessor, load_audio, load_audio_with_rate, resample

sf = pytest.importorskip("soundfile")
pytest.importorskip("soxr")

_OUTSIDE_SOURCE = tempfile.gettempdir()

needs_log_mel = pytest.mark.skipif(not hasattr(mmcore.ops, "log_mel_spectrogram"),
                                   reason="mmcore.ops.log_mel_spectrogram is not built yet")
needs_fbank = pytest.mark.skipif(not hasattr(mmcore.ops, "fbank"),
                                 reason="mmcore.ops.fbank is not built yet")
needs_mel = pytest.mark.skipif(not hasattr(mmcore.ops, "mel_spectrogram"),
                               reason="mmcore.ops.mel_spectrogram is not built yet")


# --------------------------------------------------------------------------------------------
# synthetic speech-like audio

def speech_like(seconds: float, sr: int, *, seed: int = 0, channels: int = 1) -> np.ndarray:
    """Harmonics of a gliding, vibrato pitch under a syllable-rate amplitude envelope.

    The pitch moves between ~100 and ~220 Hz; harmonics up to 3.4 kHz fall off like 1/k with
    two formant-like bumps; the envelope opens and closes ~4 times a second. Returns float32
    (T,) or (T, channels) with the later channels scaled copies plus a little noise.
    """
    rng = np.random.default_rng(seed)
    n = int(round(seconds * sr))
    t = np.arange(n) / sr
    f0 = 160.0 + 50.0 * np.sin(2 * np.pi * 0.7 * t + rng.uniform(0, 2 * np.pi)) \
        + 6.0 * np.sin(2 * np.pi * 5.5 * t)
    phase = 2 * np.pi * np.cumsum(f0) / sr
    y = np.zeros(n)
    for k in range(1, 22):
        fk = k * 160.0
        amp = (1.0 / k) * (1.0 + 1.5 * math.exp(-((fk - 700) / 250) ** 2)
                           + 1.0 * math.exp(-((fk - 1800) / 350) ** 2))
        y += amp * np.sin(k * phase + rng.uniform(0, 2 * np.pi))
    env = 0.55 + 0.45 * np.sin(2 * np.pi * 4.0 * t) ** 2
    y *= env
    y *= 0.5 / np.max(np.abs(y))
    y = y.astype(np.float32)
    if channels == 1:
        return y
    cols = [y] + [(0.6 / c) * y + 0.01 * rng.standard_normal(n).astype(np.float32)
                  for c in range(1, channels)]
    return np.stack(cols, axis=1).astype(np.float32)


def band_power(x: np.ndarray, sr: int, lo: float = 100.0, hi: float = 3000.0) -> float:
    """Mean power of ``x`` in [lo, hi] Hz (Parseval over the rfft bins of the band)."""
    x = np.asarray(x, np.float64)
    spec = np.abs(np.fft.rfft(x)) ** 2
    freqs = np.fft.rfftfreq(x.size, 1.0 / sr)
    band = (freqs >= lo) & (freqs <= hi)
    return float(2.0 * spec[band].sum() / x.size ** 2)


def rms(x) -> float:
    return float(np.sqrt(np.mean(np.asarray(x, np.float64) ** 2)))


@pytest.fixture
def wav_dir(tmp_path):
    return tmp_path


# --------------------------------------------------------------------------------------------
# PreprocessingConfig

def test_config_defaults_are_whisper():
    cfg = PreprocessingConfig()
    assert cfg.modality == "audio" and cfg.preset == "whisper"
    assert (cfg.sample_rate, cfg.n_mels, cfg.n_fft, cfg.hop_length) == (16000, 80, 400, 160)
    assert cfg.chunk_length_s == 30.0 and cfg.padding == "max_length"
    assert cfg.max_length_s is None and cfg.truncation is True and cfg.mono is True
    assert cfg.extra == {}
    assert cfg.target_length == 480000 and cfg.max_samples is None


def test_config_preset_dependent_defaults():
    fb = PreprocessingConfig(preset="fbank")
    assert fb.chunk_length_s is None and fb.padding == "longest" and fb.target_length is None
    plain = PreprocessingConfig(preset=None, n_fft=512, hop_length=128, n_mels=64)
    assert plain.preset is None and plain.padding == "longest"
    # explicit values win over the preset defaults
    cfg = PreprocessingConfig(preset="fbank", chunk_length_s=10.0, padding="max_length")
    assert cfg.target_length == 160000


def test_config_normalizes_spellings():
    cfg = PreprocessingConfig(preset="WHISPER", padding="Longest", sample_rate=np.int64(16000))
    assert cfg.preset == "whisper" and cfg.padding == "longest"
    assert type(cfg.sample_rate) is int
    assert PreprocessingConfig(padding=True).padding == "longest"
    assert PreprocessingConfig(padding=False, chunk_length_s=None).padding == "none"
    assert PreprocessingConfig(chunk_length_s=10).chunk_length_s == 10.0

    class FakeModality:  # anything whose str() is the modality name
        def __str__(self):
            return "audio"

    assert PreprocessingConfig(modality=FakeModality()).modality == "audio"


@pytest.mark.parametrize("field,value", [
    ("modality", "smell"),
    ("modality", 3),
    ("preset", "mfcc"),
    ("preset", 1),
    ("sample_rate", 0),
    ("sample_rate", -16000),
    ("sample_rate", 16000.0),
    ("sample_rate", True),
    ("n_mels", 0),
    ("n_mels", "80"),
    ("n_fft", 512),           # whisper needs 400
    ("hop_length", 0),
    ("hop_length", 200),      # whisper needs 160
    ("chunk_length_s", 0.0),
    ("chunk_length_s", -30.0),
    ("chunk_length_s", float("inf")),
    ("chunk_length_s", "30"),
    ("padding", "max"),
    ("padding", 7),
    ("max_length_s", 0),
    ("max_length_s", float("nan")),
    ("truncation", "yes"),
    ("truncation", 1),
    ("mono", None),
    ("extra", [("a", 1)]),
    ("extra", {1: "x"}),
])
def test_config_bad_field_names_it(field, value):
    with pytest.raises(ConfigError) as info:
        PreprocessingConfig(**{field: value})
    assert f"PreprocessingConfig.{field}" in str(info.value)
    assert isinstance(info.value, MMCoreError) and isinstance(info.value, ValueError)


@pytest.mark.parametrize("kwargs,field", [
    (dict(preset="whisper", sample_rate=22050), "sample_rate"),
    (dict(preset="whisper", n_mels=64), "n_mels"),                # whisper has 80 or 128
    (dict(preset=None, padding="max_length"), "padding"),        # nothing to pad to
    (dict(chunk_length_s=1e-6), "chunk_length_s"),               # under one sample
])
def test_config_cross_field_errors(kwargs, field):
    with pytest.raises(ConfigError, match=rf"PreprocessingConfig\.{field}\b"):
        PreprocessingConfig(**kwargs)


def test_config_is_frozen_and_replace_revalidates():
    cfg = PreprocessingConfig()
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.n_mels = 128  # type: ignore[misc]
    assert cfg.replace(n_mels=128).n_mels == 128
    with pytest.raises(ConfigError, match="n_mels"):
        cfg.replace(n_mels=-1)


@pytest.mark.parametrize("kwargs", [
    {},
    dict(n_mels=128, max_length_s=12.5, truncation=False, extra={"a": [1, 2], "b": {"c": None}}),
    dict(preset="fbank", mono=False),
    dict(preset=None, n_fft=512, hop_length=128, n_mels=40, padding="none", sample_rate=22050),
    dict(preset=None, padding="max_length", chunk_length_s=None, max_length_s=4.0),
])
def test_config_dict_round_trip(kwargs):
    cfg = PreprocessingConfig(**kwargs)
    d = cfg.to_dict()
    assert json.loads(json.dumps(d)) == d            # JSON-friendly values only
    back = PreprocessingConfig.from_dict(d)
    assert back == cfg and back.to_dict() == d
    d["extra"]["mutated"] = True                     # the dict is a copy
    assert "mutated" not in cfg.extra


def test_config_hashable():
    a = PreprocessingConfig(extra={"x": [1, 2]})
    b = PreprocessingConfig.from_dict(a.to_dict())
    assert hash(a) == hash(b) and {a: 1}[b] == 1
    assert hash(a) != hash(a.replace(n_mels=128))


def test_config_extra_is_copied():
    extra = {"k": [1]}
    cfg = PreprocessingConfig(extra=extra)
    extra["k"].append(2)
    assert cfg.extra == {"k": [1]}


def test_config_from_dict_rejects_unknown_keys():
    with pytest.raises(ConfigError, match="'n_mel'"):
        PreprocessingConfig.from_dict({"n_mel": 80})
    with pytest.raises(ConfigError):
        PreprocessingConfig.from_dict([("n_mels", 80)])


def test_config_from_json(tmp_path):
    path = tmp_path / "pre.json"
    path.write_text(json.dumps({"n_mels": 128, "max_length_s": 20, "preset": "whisper",
                                "extra": {"note": "x"}}))
    cfg = PreprocessingConfig.from_json(path)
    assert cfg.n_mels == 128 and cfg.max_length_s == 20.0 and cfg.extra == {"note": "x"}
    assert PreprocessingConfig.from_json(str(path)) == cfg

    nested = tmp_path / "model.json"
    nested.write_text(json.dumps({"preprocessing": {"audio": {"preset": None}}}))
    cfg2 = PreprocessingConfig.from_json(nested, section="preprocessing.audio")
    assert cfg2.preset is None and cfg2.padding == "longest"
    with pytest.raises(ConfigError, match="section"):
        PreprocessingConfig.from_json(nested, section="preprocessing.video")

    bad = tmp_path / "bad.json"
    bad.write_text('{"n_mels": 80,,}')
    with pytest.raises(ConfigError, match="bad.json"):
        PreprocessingConfig.from_json(bad)
    bad_value = tmp_path / "bad_value.json"
    bad_value.write_text('{"n_mels": -3}')
    with pytest.raises(ConfigError, match="n_mels"):
        PreprocessingConfig.from_json(bad_value)
    with pytest.raises(ConfigError, match="missing.json"):
        PreprocessingConfig.from_json(tmp_path / "missing.json")
    listy = tmp_path / "list.json"
    listy.write_text("[1, 2]")
    with pytest.raises(ConfigError, match="list"):
        PreprocessingConfig.from_json(listy)


def test_config_from_toml(tmp_path):
    pytest.importorskip("tomllib" if sys.version_info >= (3, 11) else "tomli")
    path = tmp_path / "pre.toml"
    path.write_text('preset = "fbank"\nn_mels = 64\nmax_length_s = 8.0\ntruncation = false\n'
                    '[extra]\nlanguage = "en"\n')
    cfg = PreprocessingConfig.from_toml(path)
    assert (cfg.preset, cfg.n_mels, cfg.max_length_s, cfg.truncation) == ("fbank", 64, 8.0, False)
    assert cfg.extra == {"language": "en"}

    nested = tmp_path / "model.toml"
    nested.write_text('[preprocessing.audio]\npreset = "none"\nchunk_length_s = "none"\n'
                      'padding = "none"\n')
    cfg2 = PreprocessingConfig.from_toml(nested, section="preprocessing.audio")
    # "none" is None for the Optional fields, and the literal mode for padding
    assert cfg2.preset is None and cfg2.chunk_length_s is None and cfg2.padding == "none"

    bad = tmp_path / "bad.toml"
    bad.write_text("n_mels = = 3\n")
    with pytest.raises(ConfigError, match="bad.toml"):
        PreprocessingConfig.from_toml(bad)
    bad_value = tmp_path / "bad_value.toml"
    bad_value.write_text('padding = "sideways"\n')
    with pytest.raises(ConfigError, match="padding"):
        PreprocessingConfig.from_toml(bad_value)


def test_config_toml_json_agree(tmp_path):
    cfg = PreprocessingConfig(n_mels=128, max_length_s=25.0, extra={"x": 1})
    j = tmp_path / "c.json"
    j.write_text(json.dumps(cfg.to_dict()))
    t = tmp_path / "c.toml"
    t.write_text('n_mels = 128\nmax_length_s = 25.0\n[extra]\nx = 1\n')
    assert PreprocessingConfig.from_json(j) == cfg == PreprocessingConfig.from_toml(t)


# --------------------------------------------------------------------------------------------
# load_audio

@pytest.mark.parametrize("file_sr", [22050, 44100])
def test_load_audio_resamples_to_16k(wav_dir, file_sr):
    x = speech_like(2.3, file_sr, seed=file_sr)
    path = wav_dir / f"speech_{file_sr}.wav"
    sf.write(path, x, file_sr, subtype="FLOAT")
    y = load_audio(path)
    assert y.dtype == np.float32 and y.ndim == 1 and y.flags.c_contiguous
    assert abs(y.shape[0] - round(x.shape[0] * 16000 / file_sr)) <= 1
    # the speech band survives: band power and overall RMS within 2 %
    p_in, p_out = band_power(x, file_sr), band_power(y, 16000)
    assert p_out == pytest.approx(p_in, rel=0.02)
    assert rms(y) == pytest.approx(rms(x), rel=0.02)
    # same as resampling the array directly
    np.testing.assert_allclose(y, resample(x, file_sr, 16000), atol=1e-6)


def test_resampling_keeps_spectral_shape_and_filters_aliases(wav_dir):
    x = speech_like(2.0, 44100, seed=21)
    tone = 0.3 * np.sin(2 * np.pi * 10000.0 * np.arange(x.size) / 44100)  # above 8 kHz
    path = wav_dir / "speech_plus_tone.wav"
    sf.write(path, (x + tone).astype(np.float32), 44100, subtype="FLOAT")
    y = load_audio(path)
    # each speech sub-band keeps its power (a resampler, not a decimator)
    for lo, hi in [(100, 500), (500, 1000), (1000, 2000), (2000, 3000)]:
        assert band_power(y, 16000, lo, hi) == pytest.approx(band_power(x, 44100, lo, hi),
                                                              rel=0.03), (lo, hi)
    # the 10 kHz tone is gone instead of folding down to 6 kHz
    assert band_power(y, 16000, 5500, 6500) < 1e-4 * band_power(tone, 44100, 9500, 10500)
    assert band_power(y, 16000, 100, 8000) == pytest.approx(band_power(x, 44100, 100, 8000),
                                                             rel=0.03)


def test_load_audio_pcm16_scaling_and_keep_rate(wav_dir):
    x = speech_like(0.5, 22050)
    path = wav_dir / "pcm16.wav"
    sf.write(path, x, 22050, subtype="PCM_16")
    y, rate = load_audio_with_rate(path, sr=None)
    assert rate == 22050 and y.shape == x.shape and y.dtype == np.float32
    np.testing.assert_allclose(y, x, atol=1.0 / 32768)
    y2, rate2 = load_audio_with_rate(path)
    assert rate2 == 16000 and abs(y2.shape[0] - round(x.shape[0] * 16000 / 22050)) <= 1
    # no resampling when the rates already match
    np.testing.assert_array_equal(load_audio(path, sr=22050), y)


def test_load_audio_stereo(wav_dir):
    x = speech_like(1.7, 44100, channels=2, seed=3)
    path = wav_dir / "stereo.wav"
    sf.write(path, x, 44100, subtype="FLOAT")
    both = load_audio(path, sr=None, mono=False)
    assert both.shape == (2, x.shape[0]) and both.dtype == np.float32
    np.testing.assert_array_equal(both, x.T)
    mono = load_audio(path, sr=None)
    np.testing.assert_allclose(mono, x.mean(axis=1), atol=1e-7)
    mono16 = load_audio(path)
    assert abs(mono16.shape[0] - round(x.shape[0] * 16000 / 44100)) <= 1
    assert band_power(mono16, 16000) == pytest.approx(band_power(x.mean(axis=1), 44100), rel=0.02)
    both16 = load_audio(path, mono=False)
    assert both16.shape == (2, mono16.shape[0])
    np.testing.assert_allclose(both16.mean(axis=0), mono16, atol=1e-5)


def test_load_audio_file_object(wav_dir):
    x = speech_like(0.3, 16000)
    path = wav_dir / "obj.wav"
    sf.write(path, x, 16000, subtype="FLOAT")
    with open(path, "rb") as f:
        y = load_audio(f)
    np.testing.assert_array_equal(y, x)


def test_load_audio_empty_file(wav_dir):
    path = wav_dir / "empty.wav"
    sf.write(path, np.zeros(0, np.float32), 22050)
    y = load_audio(path)
    assert y.shape == (0,) and y.dtype == np.float32


@pytest.mark.parametrize("fmt,ext,lossless", [("FLAC", "flac", True), ("OGG", "ogg", False),
                                               ("MP3", "mp3", False)])
def test_load_audio_compressed_round_trip(wav_dir, fmt, ext, lossless):
    if fmt not in sf.available_formats():
        pytest.skip(f"the installed libsndfile has no {fmt}")
    x = speech_like(2.0, 44100, seed=11)
    path = wav_dir / f"speech.{ext}"
    try:
        if fmt == "FLAC":
            sf.write(path, x, 44100, format="FLAC", subtype="PCM_16")
        else:
            sf.write(path, x, 44100, format=fmt)
    except Exception as exc:  # e.g. a libsndfile that decodes MP3 but cannot encode it
        pytest.skip(f"cannot write {fmt} here: {exc}")
    y = load_audio(path, sr=None)
    if lossless:
        assert y.shape == x.shape
        np.testing.assert_allclose(y, x, atol=1.0 / 32768)
    else:
        # lossy codecs may add encoder delay/padding; the band energy is what must survive
        assert abs(y.shape[0] - x.shape[0]) < 0.05 * x.shape[0]
        assert band_power(y, 44100) == pytest.approx(band_power(x, 44100), rel=0.05)
    y16 = load_audio(path)
    assert abs(y16.shape[0] - round(y.shape[0] * 16000 / 44100)) <= 1
    assert band_power(y16, 16000) == pytest.approx(band_power(y, 44100), rel=0.02)


def _assert_decode_error(path, *fragments):
    with pytest.raises(AudioDecodeError) as info:
        load_audio(path)
    msg = str(info.value)
    assert os.path.basename(str(path)) in msg
    for frag in fragments:
        assert frag in msg.lower()
    assert isinstance(info.value, MMCoreError) and isinstance(info.value, ValueError)


def test_load_audio_missing_file(wav_dir):
    _assert_decode_error(wav_dir / "nope_missing.wav", "does not exist")


def test_load_audio_directory(wav_dir):
    d = wav_dir / "a_directory.wav"
    d.mkdir()
    _assert_decode_error(d, "directory")


def test_load_audio_random_bytes(wav_dir):
    path = wav_dir / "garbage_bytes.wav"
    path.write_bytes(np.random.default_rng(5).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    _assert_decode_error(path)


def test_load_audio_text_file(wav_dir):
    path = wav_dir / "notes_text.txt"
    path.write_text("this is not audio\n" * 20)
    _assert_decode_error(path)


@pytest.mark.parametrize("keep", [0.5, 0.9])
def test_load_audio_truncated_wav(wav_dir, keep):
    path = wav_dir / "full.wav"
    sf.write(path, speech_like(1.0, 16000), 16000, subtype="PCM_16")
    data = path.read_bytes()
    cut = wav_dir / f"cut_{int(keep * 100)}.wav"
    cut.write_bytes(data[: int(len(data) * keep)])
    _assert_decode_error(cut, "truncated")


def test_load_audio_header_only_wav(wav_dir):
    path = wav_dir / "full.wav"
    sf.write(path, speech_like(0.2, 16000), 16000, subtype="PCM_16")
    cut = wav_dir / "header_cut.wav"
    cut.write_bytes(path.read_bytes()[:30])
    _assert_decode_error(cut)


def test_load_audio_truncated_flac(wav_dir):
    if "FLAC" not in sf.available_formats():
        pytest.skip("no FLAC in this libsndfile")
    path = wav_dir / "full.flac"
    sf.write(path, speech_like(1.0, 16000), 16000, format="FLAC")
    cut = wav_dir / "cut_flac.flac"
    cut.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    _assert_decode_error(cut)


def test_load_audio_bad_arguments(wav_dir):
    path = wav_dir / "ok.wav"
    sf.write(path, np.zeros(100, np.float32), 16000)
    for sr in (0, -1, 16000.0, True, "16k"):
        with pytest.raises(ArgumentError, match="sr"):
            load_audio(path, sr=sr)
    with pytest.raises(ArgumentError, match="mono"):
        load_audio(path, mono="yes")
    with pytest.raises(ArgumentError, match="path"):
        load_audio(12345)


def test_import_is_lazy_about_decoders():
    code = ("import sys, mmcore, mmcore.preprocess, mmcore.config\n"
            "bad = [m for m in ('soundfile', 'soxr', 'librosa', 'torch') if m in sys.modules]\n"
            "bad += [m for m in sys.modules if m.startswith('mmcore.model')]\n"
            "print(bad)\n"
            "assert not bad, bad\n")
    res = subprocess.run([sys.executable, "-c", code], cwd=_OUTSIDE_SOURCE, capture_output=True,
                         text=True, timeout=120)
    assert res.returncode == 0, res.stdout + res.stderr


# --------------------------------------------------------------------------------------------
# AudioPreprocessor: no features needed

def test_preprocessor_rejects_non_audio_config():
    with pytest.raises(ConfigError):
        AudioPreprocessor("whisper")  # type: ignore[arg-type]
    pre = AudioPreprocessor({"n_mels": 128})
    assert pre.config.n_mels == 128


@pytest.mark.parametrize("preset,offset", [("whisper", 200), (None, 200), ("fbank", 0)])
def test_frame_mask_rule(preset, offset):
    pre = AudioPreprocessor(PreprocessingConfig(preset=preset))
    lengths = [0, 1, 159, 160, 161, 16000, 479999, 480000, 10 ** 7]
    m = pre.frame_mask(lengths, 3000)
    assert m.shape == (len(lengths), 3000) and m.dtype == bool
    for row, L in zip(m, lengths):
        n = row.sum()
        assert row[:n].all() and not row[n:].any()            # real frames come first
        expected = 0 if L == 0 else min(3000, math.ceil((L + offset) / 160))
        assert n == expected
        if 0 < n < 3000:
            # frame n-1 sees a real sample, frame n only padding
            assert (n - 1) * 160 - offset < L <= n * 160 - offset


def _bad_input_cases():
    return [
        (np.zeros((2, 3, 4), np.float32), "dims"),
        (np.zeros(100, np.int16), "int16"),
        (np.array([0.0, np.nan], np.float32), "NaN"),
        ([np.zeros(10, np.float32), np.zeros((2, 10), np.float32)], "item 1"),
        ([], "empty"),
        (np.zeros((0, 100), np.float32), "empty"),
        ([np.zeros(0, np.float32)], "empty"),
    ]


@pytest.mark.parametrize("audio,frag", _bad_input_cases())
def test_preprocessor_bad_inputs(audio, frag):
    pre = AudioPreprocessor(PreprocessingConfig(preset=None, padding="longest"))
    with pytest.raises(ShapeError, match=frag):
        pre(audio)


def test_preprocessor_length_errors():
    short = np.zeros(16000, np.float32)
    long = np.zeros(16000 * 3, np.float32)
    pre = AudioPreprocessor(PreprocessingConfig(max_length_s=2.0, truncation=False))
    with pytest.raises(ShapeError, match="item 1.*max_length_s"):
        pre([short, long])
    pre = AudioPreprocessor(PreprocessingConfig(chunk_length_s=2.0, truncation=False))
    with pytest.raises(ShapeError, match="truncation=False"):
        pre([short, long])
    pre = AudioPreprocessor(PreprocessingConfig(preset=None, padding="none"))
    with pytest.raises(ShapeError, match="equal length"):
        pre([short, long])
    with pytest.raises(ArgumentError, match="sampling_rate"):
        pre(short, sampling_rate=0)


def test_preprocessor_multichannel_file(wav_dir):
    path = wav_dir / "two_channels.wav"
    sf.write(path, speech_like(0.5, 16000, channels=2), 16000)
    pre = AudioPreprocessor(PreprocessingConfig(mono=False))
    with pytest.raises(ShapeError, match="two_channels.wav.*channels"):
        pre(path)


def test_preprocessor_missing_file_names_it(wav_dir):
    pre = AudioPreprocessor()
    with pytest.raises(AudioDecodeError, match="ghost_file.wav"):
        pre([np.zeros(100, np.float32), wav_dir / "ghost_file.wav"])


# --------------------------------------------------------------------------------------------
# AudioPreprocessor with the feature ops

def _items(lengths, seed=0):
    rng = np.random.default_rng(seed)
    return [speech_like(n / 16000, 16000, seed=int(rng.integers(1 << 30))) for n in lengths]


def _pad(items, T):
    batch = np.zeros((len(items), T), np.float32)
    for row, x in zip(batch, items):
        n = min(len(x), T)
        row[:n] = x[:n]
    return batch


@needs_log_mel
def test_whisper_preset_matches_padded_log_mel():
    lengths = [16000 * 5, 16000 * 12 + 37, 480000 + 1234, 480000, 1]
    items = _items(lengths)
    out = AudioPreprocessor(PreprocessingConfig())(items)
    feats, mask = out["input_features"], out["attention_mask"]
    assert feats.shape == (5, 80, 3000) and feats.dtype == np.float32
    assert mask.shape == (5, 3000) and mask.dtype == bool
    assert np.isfinite(feats).all()
    expected_real = [min(3000, math.ceil((min(L, 480000) + 200) / 160)) for L in lengths]
    assert mask.sum(axis=1).tolist() == expected_real
    for row, n in zip(mask, expected_real):
        assert row[:n].all() and not row[n:].any()
    ref = mmcore.ops.log_mel_spectrogram(_pad(items, 480000), n_mels=80, preset="whisper")
    np.testing.assert_array_equal(feats, ref)


@needs_log_mel
def test_whisper_batch_equals_single_and_2d_input():
    items = _items([16000 * 3, 16000 * 7 + 11, 16000 * 2 - 5], seed=2)
    pre = AudioPreprocessor()
    batch = pre(items)
    for i, x in enumerate(items):
        single = pre(x)
        assert single["input_features"].shape == (1, 80, 3000)
        np.testing.assert_allclose(single["input_features"][0], batch["input_features"][i],
                                   rtol=0, atol=1e-6)
        np.testing.assert_array_equal(single["attention_mask"][0], batch["attention_mask"][i])
    # an equal-length 2-D batch and the same rows as a list give the same features
    two_d = _pad(items, 16000 * 7 + 11)
    np.testing.assert_allclose(pre(two_d)["input_features"], pre(list(two_d))["input_features"],
                               rtol=0, atol=0)
    # tuples, lists of floats, float64 and float16 arrays are accepted
    x = items[0]
    ref = pre(x)["input_features"]
    np.testing.assert_allclose(pre(x.astype(np.float64))["input_features"], ref, atol=1e-6)
    np.testing.assert_allclose(pre(tuple(items))["input_features"][0], ref[0], atol=1e-6)
    np.testing.assert_allclose(pre(x[:4000].tolist())["input_features"],
                               pre(x[:4000])["input_features"], atol=1e-6)
    assert pre(x.astype(np.float16))["input_features"].shape == (1, 80, 3000)


@needs_log_mel
def test_whisper_128_mels_and_max_length():
    items = _items([16000 * 4, 16000 * 9])
    cfg = PreprocessingConfig(n_mels=128, max_length_s=6.0)
    out = AudioPreprocessor(cfg)(items)
    assert out["input_features"].shape == (2, 128, 3000)
    # the 9 s item is cut to 6 s before padding to 30 s
    assert out["attention_mask"].sum(axis=1).tolist() == [math.ceil((64000 + 200) / 160),
                                                          math.ceil((96000 + 200) / 160)]
    ref = mmcore.ops.log_mel_spectrogram(_pad([items[0], items[1][:96000]], 480000), n_mels=128,
                                         preset="whisper")
    np.testing.assert_array_equal(out["input_features"], ref)


@needs_log_mel
def test_whisper_longest_padding():
    items = _items([16000, 16000 * 2 + 100])
    out = AudioPreprocessor(PreprocessingConfig(padding="longest"))(items)
    T = 16000 * 2 + 100
    assert out["input_features"].shape == (2, 80, T // 160)
    ref = mmcore.ops.log_mel_spectrogram(_pad(items, T), n_mels=80, preset="whisper")
    np.testing.assert_array_equal(out["input_features"], ref)
    assert out["attention_mask"][1].all()


@needs_log_mel
def test_preprocessor_files_and_resampling(wav_dir):
    a = speech_like(3.0, 44100, seed=4)
    b = speech_like(2.0, 16000, seed=5)
    pa, pb = wav_dir / "a44k.wav", wav_dir / "b16k.flac"
    sf.write(pa, a, 44100, subtype="FLOAT")
    sf.write(pb, b, 16000, subtype="PCM_24", format="FLAC")
    pre = AudioPreprocessor()
    from_files = pre([pa, str(pb)])
    from_arrays = pre([load_audio(pa), load_audio(pb)])
    np.testing.assert_array_equal(from_files["input_features"], from_arrays["input_features"])
    np.testing.assert_array_equal(from_files["attention_mask"], from_arrays["attention_mask"])
    # a single path, and arrays at another rate resampled by the preprocessor
    np.testing.assert_array_equal(pre(pa)["input_features"][0], from_files["input_features"][0])
    resampled = pre([a], sampling_rate=44100)
    np.testing.assert_allclose(resampled["input_features"][0], from_files["input_features"][0],
                               atol=1e-5)


@needs_fbank
def test_fbank_preset_shape_and_mask():
    lengths = [16000 * 2, 16000 + 555, 12345]
    items = _items(lengths, seed=7)
    pre = AudioPreprocessor(PreprocessingConfig(preset="fbank"))
    out = pre(items)
    feats, mask = out["input_features"], out["attention_mask"]
    T = max(lengths)
    frames = 1 + (T - 400) // 160                    # Kaldi framing with snip_edges
    assert feats.shape == (3, frames, 80) and feats.dtype == np.float32
    assert mask.shape == (3, frames)
    assert np.isfinite(feats).all()
    assert mask.sum(axis=1).tolist() == [min(frames, math.ceil(L / 160)) for L in lengths]
    ref = mmcore.ops.fbank(_pad(items, T) * np.float32(32768), sr=16000, n_mels=80)
    np.testing.assert_array_equal(feats, ref)
    # batch vs single
    single = pre(items[0])["input_features"][0]
    np.testing.assert_allclose(single, feats[0], rtol=0, atol=1e-4)


@needs_fbank
def test_fbank_preset_other_framing():
    # 8 kHz with Kaldi's 25 ms / 10 ms framing: n_fft and hop_length are frame length and shift
    cfg = PreprocessingConfig(preset="fbank", sample_rate=8000, n_fft=200, hop_length=80,
                              n_mels=40)
    x = speech_like(1.0, 8000, seed=3)
    out = AudioPreprocessor(cfg)([x, x[:4000]])
    frames = 1 + (8000 - 200) // 80
    assert out["input_features"].shape == (2, frames, 40)
    ref = mmcore.ops.fbank(x * np.float32(32768), sr=8000, n_mels=40)  # Kaldi defaults at 8 kHz
    np.testing.assert_allclose(out["input_features"][0], ref, rtol=0, atol=1e-5)
    assert out["attention_mask"].sum(axis=1).tolist() == [frames, 50]


@needs_log_mel
def test_whisper_preset_matches_openai_formula():
    torch = pytest.importorskip("torch")
    librosa = pytest.importorskip("librosa")
    items = _items([16000 * 7 + 3, 16000 * 29], seed=13)
    out = AudioPreprocessor()(items)["input_features"]
    filters = torch.from_numpy(librosa.filters.mel(sr=16000, n_fft=400, n_mels=80))
    for i, x in enumerate(items):
        # whisper.audio.log_mel_spectrogram(whisper.pad_or_trim(x))
        a = torch.from_numpy(_pad([x], 480000)[0])
        stft = torch.stft(a, 400, 160, window=torch.hann_window(400), return_complex=True)
        mel = filters @ stft[..., :-1].abs() ** 2
        log_spec = torch.clamp(mel, min=1e-10).log10()
        log_spec = torch.maximum(log_spec, log_spec.max() - 8.0)
        ref = ((log_spec + 4.0) / 4.0).numpy()
        np.testing.assert_allclose(out[i], ref, rtol=0, atol=2e-4)


@needs_mel
def test_plain_log_mel_preset():
    items = _items([16000, 8000], seed=9)
    cfg = PreprocessingConfig(preset=None, n_fft=512, hop_length=128, n_mels=64)
    out = AudioPreprocessor(cfg)(items)
    mel = mmcore.ops.mel_spectrogram(_pad(items, 16000), sr=16000, n_fft=512, hop_length=128,
                                     n_mels=64)
    np.testing.assert_allclose(out["input_features"], np.log(np.maximum(mel, 1e-10)),
                               rtol=1e-6, atol=1e-6)
    assert out["input_features"].shape == (2, 64, 1 + 16000 // 128)
    assert out["attention_mask"].sum(axis=1).tolist() == [126, math.ceil((8000 + 256) / 128)]
