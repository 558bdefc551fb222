"""Encoded audio bytes as inputs of load_audio / load_audio_with_rate / AudioPreprocessor.

``bytes``, ``bytearray`` and ``memoryview`` are the encoded contents of an audio file (they were
a file name before); paths are ``str`` / ``os.PathLike``; binary file objects stay accepted.
"""

from __future__ import annotations

import io
import math
import os

import numpy as np
import pytest

import mmcore
from mmcore.config import PreprocessingConfig
from mmcore.errors import ArgumentError, AudioDecodeError, ShapeError
from mmcore.preprocess import AudioPreprocessor, load_audio, load_audio_with_rate
from mmcore.preprocess import audio as audio_mod

sf = pytest.importorskip("soundfile")
pytest.importorskip("soxr")

needs_log_mel = pytest.mark.skipif(not hasattr(mmcore.ops, "log_mel_spectrogram"),
                                   reason="mmcore.ops.log_mel_spectrogram is not built")

RATE = 22050          # not 16000: load_audio's default sr=16000 resamples


def _wave(frames: int, channels: int, *, seed: int = 0) -> np.ndarray:
    """(frames, channels) float32 in [-0.5, 0.5]: tones plus noise, different per channel."""
    rng = np.random.default_rng(seed)
    t = np.arange(frames) / RATE
    cols = [0.3 * np.sin(2 * np.pi * (220.0 + 110.0 * c) * t) + 0.05 * rng.standard_normal(frames)
            for c in range(channels)]
    return np.clip(np.stack(cols, axis=1), -0.5, 0.5).astype(np.float32)


# (format, subtype); OGG/Vorbis only where the installed libsndfile writes it
FORMATS = [("WAV", "PCM_16"), ("WAV", "FLOAT"), ("FLAC", "PCM_16"), ("OGG", "VORBIS")]


def _encode(x: np.ndarray, fmt: str, subtype: str, rate: int = RATE) -> bytes:
    if fmt not in sf.available_formats():
        pytest.skip(f"no {fmt} in this libsndfile")
    buf = io.BytesIO()
    sf.write(buf, x, rate, format=fmt, subtype=subtype)
    return buf.getvalue()


CONTAINERS = {
    "bytes": lambda b: b,
    "bytearray": bytearray,
    "memoryview": memoryview,
    "memoryview-2d": lambda b: memoryview(np.frombuffer(b, np.uint8).reshape(1, -1)),
    "memoryview-strided": lambda b: memoryview(np.repeat(np.frombuffer(b, np.uint8), 2)[::2]),
    "BytesIO": io.BytesIO,
}


# --------------------------------------------------------------------------------------------
# same arrays as from disk

@pytest.mark.parametrize("fmt,subtype", FORMATS, ids=lambda v: str(v))
@pytest.mark.parametrize("channels", [1, 2])
def test_bytes_decode_like_the_file(tmp_path, fmt, subtype, channels):
    x = _wave(RATE // 2 + 7, channels)
    data = _encode(x, fmt, subtype)
    path = tmp_path / f"clip.{fmt.lower()}"
    path.write_bytes(data)
    if subtype == "PCM_16":
        # the file itself holds what was written (independent of mmcore)
        pcm = np.round(np.clip(x, -1, 1) * 32767).astype(np.int16)
        read = sf.read(path, dtype="int16", always_2d=True)[0]
        assert np.abs(read.astype(np.int32) - pcm).max() <= 1
    for sr in (None, 16000):
        for mono in (True, False):
            want, want_rate = load_audio_with_rate(path, sr=sr, mono=mono)
            assert want_rate == (RATE if sr is None else sr)
            assert want.shape == ((want.shape[-1],) if mono else (channels, want.shape[-1]))
            if sr is None and fmt != "OGG":
                exact = sf.read(path, dtype="float32", always_2d=True)[0]
                np.testing.assert_array_equal(want, exact.mean(axis=1, dtype=np.float32)
                                              if mono else exact.T)
            for name, wrap in CONTAINERS.items():
                got, rate = load_audio_with_rate(wrap(data), sr=sr, mono=mono)
                assert rate == want_rate, name
                assert got.dtype == np.float32 and got.flags.c_contiguous, name
                np.testing.assert_array_equal(got, want, err_msg=f"{name} sr={sr} mono={mono}")
                np.testing.assert_array_equal(load_audio(wrap(data), sr=sr, mono=mono), want)


def test_bytes_input_is_not_modified_and_can_be_read_twice():
    data = bytearray(_encode(_wave(4000, 1), "WAV", "PCM_16"))
    before = bytes(data)
    a = load_audio(data, sr=None)
    b = load_audio(memoryview(data), sr=None)
    assert bytes(data) == before
    np.testing.assert_array_equal(a, b)
    assert a.shape == (4000,)


def test_file_object_is_read_from_its_start():
    data = _encode(_wave(4000, 1), "WAV", "PCM_16")
    fh = io.BytesIO(data)
    fh.seek(10)
    np.testing.assert_array_equal(load_audio(fh, sr=None), load_audio(data, sr=None))


# --------------------------------------------------------------------------------------------
# paths stay paths; bytes are never a file name

def test_str_and_pathlike_paths_still_open_files(tmp_path):
    x = _wave(3000, 1)
    path = tmp_path / "p.wav"
    sf.write(path, x, RATE, subtype="FLOAT")
    np.testing.assert_array_equal(load_audio(str(path), sr=None), x[:, 0])
    np.testing.assert_array_equal(load_audio(path, sr=None), x[:, 0])


def test_bytes_naming_an_existing_file_are_not_opened(tmp_path, monkeypatch):
    path = tmp_path / "real.wav"
    sf.write(path, _wave(3000, 1), RATE, subtype="PCM_16")
    assert load_audio(str(path)).shape == (math.ceil(3000 * 16000 / RATE),)

    def no_open(*args, **kwargs):
        raise AssertionError("bytes were opened as a file name")

    monkeypatch.setattr(audio_mod, "open_regular", no_open)
    for value in (os.fsencode(path), bytearray(os.fsencode(path))):
        with pytest.raises(AudioDecodeError) as info:
            load_audio(value)
        msg = str(info.value)
        assert msg.startswith("[load_audio] cannot decode path (encoded audio, "), msg
        assert "not a file name" in msg and "str or os.PathLike" in msg
    with pytest.raises(AudioDecodeError):
        AudioPreprocessor()([os.fsencode(path)])


# --------------------------------------------------------------------------------------------
# empty and undecodable bytes

@pytest.mark.parametrize("empty", [b"", bytearray(), memoryview(b"")], ids=["bytes", "bytearray",
                                                                          "memoryview"])
def test_empty_bytes_are_a_decode_error(empty):
    kind = type(empty).__name__
    with pytest.raises(AudioDecodeError, match=rf"^\[load_audio\] cannot decode path \(encoded "
                       rf"audio, {kind} of 0 bytes\): it is empty"):
        load_audio(empty)


@pytest.mark.parametrize("garbage", [
    np.random.default_rng(5).integers(0, 256, 4096, dtype=np.uint8).tobytes(),
    b"this is not audio\n" * 20,
    b"RIFF\x00\x00",
    b"fLaC" + bytes(60),
], ids=["random", "text", "riff-stub", "flac-stub"])
def test_garbage_bytes_are_a_decode_error(garbage):
    with pytest.raises(AudioDecodeError) as info:
        load_audio(garbage)
    msg = str(info.value)
    assert msg.startswith(f"[load_audio] cannot decode path (encoded audio, bytes of "
                          f"{len(garbage)} bytes): "), msg
    assert isinstance(info.value, ValueError)
    # the hint that bytes are no longer a file name: only for short text without NUL bytes
    assert ("not a file name" in msg) == (garbage.startswith(b"this is not audio"))


def test_truncated_wav_bytes_are_refused():
    data = _encode(_wave(RATE, 1), "WAV", "PCM_16")
    for keep in (0.5, 0.9):
        with pytest.raises(AudioDecodeError, match=r"encoded audio.*truncated: the header "
                           r"declares \d+ bytes of audio data but the file holds \d+"):
            load_audio(data[: int(len(data) * keep)])
    with pytest.raises(AudioDecodeError, match=r"\[load_audio\] cannot decode path"):
        load_audio(data[:30])


def test_nan_samples_in_bytes_are_refused():
    x = _wave(1000, 1)
    x[500, 0] = np.nan
    data = _encode(x, "WAV", "FLOAT")
    with pytest.raises(AudioDecodeError, match=r"path \(encoded audio.*NaN or infinite"):
        load_audio(data, sr=None)


@pytest.mark.parametrize("bad", [123, 1.5, None, ["a.wav"], np.zeros(10, np.uint8)])
def test_other_types_are_an_argument_error(bad):
    with pytest.raises(ArgumentError, match=r"^\[load_audio\] path must be a str or os.PathLike "
                       r"\(a file name\), bytes, bytearray or memoryview"):
        load_audio(bad)


# --------------------------------------------------------------------------------------------
# limits apply to bytes, from the header before decoding

@pytest.fixture
def no_decoding(monkeypatch):
    """Fail if any sample is decoded."""
    def refuse(*args, **kwargs):
        raise AssertionError("decoded although the header exceeds the limits")

    monkeypatch.setattr(audio_mod, "_read", refuse)


def test_long_flac_bytes_refused_from_the_header(no_decoding):
    if "FLAC" not in sf.available_formats():
        pytest.skip("no FLAC in this libsndfile")
    # 2e6 frames at 100 Hz = 5.6 hours, a few kB of FLAC
    buf = io.BytesIO()
    sf.write(buf, np.zeros(2_000_000, np.int16), 100, format="FLAC", subtype="PCM_16")
    data = buf.getvalue()
    assert len(data) < 200_000
    with pytest.raises(AudioDecodeError, match=r"^\[load_audio\] path \(encoded audio, bytes of "
                       r"\d+ bytes\) declares 2000000 frames at 100 Hz = 20000\.0 s.*"
                       r"max_duration_s"):
        load_audio(data, sr=None)
    # resampled to 16 kHz it would be 3.2e8 samples: max_samples is checked before decoding
    with pytest.raises(AudioDecodeError, match=r"resample to 320000000 samples at 16000 Hz, "
                       r"more than max_samples=3000000"):
        load_audio(bytearray(data), max_duration_s=math.inf, max_samples=3_000_000)


def test_bytes_limits_accept_up_to_the_limit():
    data = _encode(_wave(8000, 2), "WAV", "PCM_16")
    assert load_audio(data, sr=None, max_samples=8000).shape == (8000,)
    with pytest.raises(AudioDecodeError, match=r"8000 frames x 2 channel\(s\) = 16000 samples"):
        load_audio(data, sr=None, mono=False, max_samples=8000)
    with pytest.raises(AudioDecodeError, match=r"max_duration_s=0\.1"):
        load_audio(memoryview(data), sr=None, max_duration_s=0.1)


def test_flac_bytes_without_a_length_are_bounded_while_decoding():
    if "FLAC" not in sf.available_formats():
        pytest.skip("no FLAC in this libsndfile")
    x = _wave(48_000, 1)
    raw = bytearray(_encode(x, "FLAC", "PCM_16"))
    expected = load_audio(bytes(raw), sr=None)
    assert raw[:4] == b"fLaC"
    field = int.from_bytes(raw[18:26], "big") & ~((1 << 36) - 1)   # clear total_samples
    raw[18:26] = field.to_bytes(8, "big")
    np.testing.assert_array_equal(load_audio(raw, sr=None), expected)
    with pytest.raises(AudioDecodeError, match=r"encoded audio.* decodes to .*max_samples=10000"):
        load_audio(raw, sr=None, max_samples=10_000)


# --------------------------------------------------------------------------------------------
# AudioPreprocessor and its helpers

@needs_log_mel
def test_preprocessor_mixes_bytes_paths_and_arrays(tmp_path):
    pre = AudioPreprocessor(PreprocessingConfig(padding="longest"))
    x1, x2 = _wave(RATE, 2, seed=1), _wave(RATE // 3, 1, seed=2)
    p1 = tmp_path / "one.flac"
    sf.write(p1, x1, RATE, format="FLAC")
    b2 = _encode(x2, "OGG", "VORBIS") if "OGG" in sf.available_formats() else \
        _encode(x2, "WAV", "FLOAT")
    arr = _wave(12_345, 1, seed=3)[:, 0]
    items = [p1.read_bytes(), str(p1), arr, bytearray(b2), (arr, 22050), memoryview(b2), p1]
    out = pre(items)
    as_arrays = [load_audio(p1), load_audio(p1), arr, load_audio(b2),
                 audio_mod.resample(arr, 22050, 16000), load_audio(b2), load_audio(p1)]
    ref = pre(as_arrays)
    np.testing.assert_array_equal(out["input_features"], ref["input_features"])
    np.testing.assert_array_equal(out["attention_mask"], ref["attention_mask"])
    assert out["input_features"].shape[0] == len(items)
    assert audio_mod.audio_batch_size(items) == len(items)
    # one encoded clip alone is one item, not an array of bytes
    for one in (p1.read_bytes(), bytearray(p1.read_bytes()), memoryview(p1.read_bytes())):
        assert audio_mod.audio_batch_size(one) == 1
        single = pre(one)
        np.testing.assert_array_equal(single["input_features"][0], ref["input_features"][0])


def test_preprocessor_errors_name_the_item():
    pre = AudioPreprocessor()
    good = np.zeros(1600, np.float32)
    with pytest.raises(AudioDecodeError, match=r"^\[load_audio\] cannot decode audio item 1 "
                       r"\(encoded audio, bytes of 9 bytes\)"):
        pre([good, b"not audio"])
    with pytest.raises(AudioDecodeError, match=r"audio item 0 \(encoded audio, bytearray of 0 "
                       r"bytes\): it is empty"):
        pre([bytearray()])
    stereo = _encode(_wave(4000, 2), "WAV", "PCM_16")
    with pytest.raises(ShapeError, match=r"item 0 \(encoded audio, bytes\) has 2 channels"):
        AudioPreprocessor(PreprocessingConfig(mono=False))([stereo])
    with pytest.raises(ArgumentError, match=r"pairs encoded audio \(bytes\) with a sample rate"):
        pre([(stereo, 16000)])
    with pytest.raises(ArgumentError, match=r"pairs encoded audio \(bytes\) with a sample rate"):
        audio_mod.audio_batch_size((stereo, 16000))
