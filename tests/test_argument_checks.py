"""Scalar arguments of the public ops: wrong types and values out of range (out of the C++ int
types, not finite in float32) raise ArgumentError naming the argument, before any kernel runs;
NumPy scalar types are accepted wherever Python numbers are."""

from __future__ import annotations

from fractions import Fraction

import numpy as np
import pytest

from mmcore.errors import ArgumentError, MMCoreError, ShapeError
from mmcore.ops import (
    attention,
    fbank,
    fuse,
    layer_norm,
    linear,
    log_mel_spectrogram,
    masked_mean,
    mel_filterbank,
    mel_spectrogram,
    normalize,
    patchify,
    preprocess_image,
    resize,
    sample_frame_indices,
    stft,
    temporal_windows,
)
from mmcore.ops._checks import check_bool, check_choice, check_float, check_int

Q = np.ones((1, 2, 3, 8), np.float32)
SIG = (0.1 * np.random.default_rng(0).standard_normal(4000)).astype(np.float32)
RGB = np.zeros((8, 8, 3), np.uint8)
EMB = np.ones((2, 3, 4), np.float32)
X2 = np.ones((2, 4), np.float32)
BIG = 2 ** 63          # one past int64
HUGE = 1e300           # finite in float64, inf in float32
TINY = 1e-300          # > 0 in float64, 0 in float32


def _attention(**kw):
    return attention(Q, Q, Q, **kw)


def _cases():
    c = [
        # attention
        ("attention", _attention, dict(scale=HUGE), "scale"),
        ("attention", _attention, dict(scale=float("nan")), "scale"),
        ("attention", _attention, dict(scale="0.5"), "scale"),
        ("attention", _attention, dict(scale=True), "scale"),
        ("attention", _attention, dict(scale=1e30, temperature=1e-30), "scale / temperature"),
        ("attention", _attention, dict(temperature=TINY), "temperature"),
        ("attention", _attention, dict(temperature=0), "temperature"),
        ("attention", _attention, dict(temperature=None), "temperature"),
        ("attention", _attention, dict(dropout_p=1.0), "dropout_p"),
        ("attention", _attention, dict(dropout_p=True), "dropout_p"),
        ("attention", _attention, dict(dropout_p="0.1"), "dropout_p"),
        ("attention", _attention, dict(dropout_p=0.1, seed=2.5), "seed"),
        ("attention", _attention, dict(dropout_p=0.1, seed=True), "seed"),
        ("attention", _attention, dict(return_weights="yes"), "return_weights"),
        ("attention", _attention, dict(return_lse=1), "return_lse"),
        # stft
        ("stft", lambda **kw: stft(SIG, **kw), dict(n_fft=2 ** 20 + 1), "n_fft"),
        ("stft", lambda **kw: stft(SIG, **kw), dict(n_fft=BIG), "n_fft"),
        ("stft", lambda **kw: stft(SIG, **kw), dict(n_fft=np.float64(400)), "n_fft"),
        ("stft", lambda **kw: stft(SIG, **kw), dict(n_fft=True), "n_fft"),
        ("stft", lambda **kw: stft(SIG, **kw), dict(n_fft=400, hop_length=BIG), "hop_length"),
        ("stft", lambda **kw: stft(SIG, **kw), dict(n_fft=400, hop_length=-1), "hop_length"),
        ("stft", lambda **kw: stft(SIG, **kw), dict(n_fft=400, win_length=BIG), "win_length"),
        ("stft", lambda **kw: stft(SIG, **kw), dict(n_fft=400, center=1), "center"),
        ("stft", lambda **kw: stft(SIG, **kw), dict(n_fft=400, pad_mode=None), "pad_mode"),
        # mel_filterbank / mel_spectrogram
        ("mel_filterbank", mel_filterbank, dict(sr=HUGE, n_fft=400), "sr"),
        ("mel_filterbank", mel_filterbank, dict(sr=True, n_fft=400), "sr"),
        ("mel_filterbank", mel_filterbank, dict(sr=16000, n_fft=BIG), "n_fft"),
        ("mel_filterbank", mel_filterbank, dict(sr=16000, n_fft=400, n_mels=80.0), "n_mels"),
        ("mel_filterbank", mel_filterbank, dict(sr=16000, n_fft=400, fmin="0"), "fmin"),
        ("mel_filterbank", mel_filterbank, dict(sr=16000, n_fft=400, fmax=HUGE), "fmax"),
        ("mel_spectrogram", lambda **kw: mel_spectrogram(SIG, **kw), dict(power=TINY), "power"),
        ("mel_spectrogram", lambda **kw: mel_spectrogram(SIG, **kw), dict(power=1e39), "power"),
        ("mel_spectrogram", lambda **kw: mel_spectrogram(SIG, **kw), dict(power=float("inf")),
         "power"),
        ("mel_spectrogram", lambda **kw: mel_spectrogram(SIG, **kw), dict(sr=HUGE), "sr"),
        ("mel_spectrogram", lambda **kw: mel_spectrogram(SIG, **kw), dict(hop_length=BIG),
         "hop_length"),
        ("mel_spectrogram", lambda **kw: mel_spectrogram(SIG, **kw), dict(n_mels=BIG), "n_mels"),
        ("mel_spectrogram", lambda **kw: mel_spectrogram(SIG, **kw), dict(htk=1), "htk"),
        ("mel_spectrogram", lambda **kw: mel_spectrogram(SIG, **kw), dict(norm="l1"), "norm"),
        # log_mel_spectrogram
        ("log_mel_spectrogram", lambda **kw: log_mel_spectrogram(SIG, **kw), dict(n_mels=80.0),
         "n_mels"),
        ("log_mel_spectrogram", lambda **kw: log_mel_spectrogram(SIG, **kw), dict(n_mels=True),
         "n_mels"),
        ("log_mel_spectrogram", lambda **kw: log_mel_spectrogram(SIG, **kw), dict(preset=None),
         "preset"),
        ("log_mel_spectrogram", lambda **kw: log_mel_spectrogram(SIG, **kw), dict(padding=BIG),
         "padding"),
        ("log_mel_spectrogram", lambda **kw: log_mel_spectrogram(SIG, **kw), dict(padding=1.0),
         "padding"),
        ("log_mel_spectrogram", lambda **kw: log_mel_spectrogram(SIG, **kw),
         dict(padding=2 ** 26 + 1), "padding"),
        # fbank
        ("fbank", lambda **kw: fbank(SIG, **kw), dict(sr=HUGE), "sr"),
        ("fbank", lambda **kw: fbank(SIG, **kw), dict(sr=1e30), "frame_length_ms"),
        ("fbank", lambda **kw: fbank(SIG, **kw), dict(frame_length_ms=TINY), "frame_length_ms"),
        ("fbank", lambda **kw: fbank(SIG, **kw), dict(frame_shift_ms=HUGE), "frame_shift_ms"),
        ("fbank", lambda **kw: fbank(SIG, **kw), dict(dither=1e39), "dither"),
        ("fbank", lambda **kw: fbank(SIG, **kw), dict(dither=1.0, seed=1.5), "seed"),
        ("fbank", lambda **kw: fbank(SIG, **kw), dict(preemphasis=float("nan")), "preemphasis"),
        ("fbank", lambda **kw: fbank(SIG, **kw), dict(low_freq=1e39), "low_freq"),
        ("fbank", lambda **kw: fbank(SIG, **kw), dict(high_freq="8000"), "high_freq"),
        ("fbank", lambda **kw: fbank(SIG, **kw), dict(n_mels=np.float32(80)), "n_mels"),
        ("fbank", lambda **kw: fbank(SIG, **kw), dict(use_log=1), "use_log"),
        ("fbank", lambda **kw: fbank(SIG, **kw), dict(window=None), "window"),
        # resize / normalize / patchify / preprocess_image
        ("resize", lambda **kw: resize(RGB, **kw), dict(size=(2 ** 40, 2)), r"size\[0\]"),
        ("resize", lambda **kw: resize(RGB, **kw), dict(size=(2, BIG)), r"size\[1\]"),
        ("resize", lambda **kw: resize(RGB, **kw), dict(size=(True, 2)), r"size\[0\]"),
        ("resize", lambda **kw: resize(RGB, **kw), dict(size="44"), "size"),
        ("resize", lambda **kw: resize(RGB, **kw), dict(size=(4, 4), filter=None), "filter"),
        ("resize", lambda **kw: resize(RGB, **kw), dict(size=(4, 4), antialias=1), "antialias"),
        ("normalize", lambda **kw: normalize(RGB, **kw), dict(mean=0, std=1, scale=HUGE), "scale"),
        ("normalize", lambda **kw: normalize(RGB, **kw), dict(mean=0, std=1, scale="1"), "scale"),
        ("normalize", lambda **kw: normalize(RGB, **kw), dict(mean=1e39, std=1), "mean"),
        ("normalize", lambda **kw: normalize(RGB, **kw), dict(mean=0, std=1e-46), "std"),
        ("normalize", lambda **kw: normalize(RGB, **kw), dict(mean=0, std="abc"), "std"),
        ("normalize", lambda **kw: normalize(RGB, **kw), dict(mean=0, std=1, layout=1), "layout"),
        ("patchify", lambda **kw: patchify(np.zeros((3, 8, 8), np.float32), **kw),
         dict(patch_size=BIG), "patch_size"),
        ("patchify", lambda **kw: patchify(np.zeros((3, 8, 8), np.float32), **kw),
         dict(patch_size=True), "patch_size"),
        ("patchify", lambda **kw: patchify(np.zeros((3, 8, 8), np.float32), **kw),
         dict(patch_size=4, temporal_patch=0.5), "temporal_patch"),
        ("preprocess_image", lambda **kw: preprocess_image(RGB, **kw), dict(size=2 ** 40), "size"),
        ("preprocess_image", lambda **kw: preprocess_image(RGB, **kw), dict(size=True), "size"),
        ("preprocess_image", lambda **kw: preprocess_image(RGB, **kw), dict(crop_size=(2 ** 31, 1)),
         r"crop_size\[0\]"),
        ("preprocess_image", lambda **kw: preprocess_image(RGB, **kw), dict(scale=HUGE), "scale"),
        ("preprocess_image", lambda **kw: preprocess_image(RGB, **kw),
         dict(mean=(float("nan"), 0, 0)), "mean"),
        ("preprocess_image", lambda **kw: preprocess_image(RGB, **kw), dict(preset=1), "preset"),
        ("preprocess_image", lambda **kw: preprocess_image(RGB, **kw), dict(patch_size=2.0),
         "patch_size"),
        ("preprocess_image", lambda **kw: preprocess_image(RGB, **kw), dict(filter=0), "filter"),
        # fusion
        ("fuse", lambda **kw: fuse(EMB, **kw), dict(strategy=None), "strategy"),
        ("fuse", lambda **kw: fuse(EMB, **kw), dict(strategy="mean", return_weights=1),
         "return_weights"),
        ("fuse", lambda **kw: fuse(EMB, **kw), dict(strategy="weighted", weights=[1e39, 1, 1]),
         "weights"),
        ("fuse", lambda **kw: fuse(EMB, **kw), dict(strategy="weighted", weights="uniform"),
         "weights"),
        ("masked_mean", lambda **kw: masked_mean(None, **kw), dict(), "x"),
        # linear / layer_norm
        ("layer_norm", lambda **kw: layer_norm(X2, **kw), dict(eps=0), "eps"),
        ("layer_norm", lambda **kw: layer_norm(X2, **kw), dict(eps=True), "eps"),
        ("layer_norm", lambda **kw: layer_norm(X2, **kw), dict(eps=float("nan")), "eps"),
        ("layer_norm", lambda **kw: layer_norm(X2, **kw), dict(eps="1e-5"), "eps"),
        ("linear", lambda **kw: linear(X2, np.ones((3, 4), np.float32), **kw),
         dict(activation="tanh"), "activation"),
        ("linear", lambda **kw: linear(X2, np.ones((3, 4), np.float32), **kw),
         dict(activation=["gelu"]), "activation"),
        # video index arithmetic
        ("sample_frame_indices", lambda **kw: sample_frame_indices(**kw),
         dict(num_frames=2 ** 31, n=4), "num_frames"),
        ("sample_frame_indices", lambda **kw: sample_frame_indices(**kw),
         dict(num_frames=100, n=2 ** 25), "n"),
        ("sample_frame_indices", lambda **kw: sample_frame_indices(**kw),
         dict(num_frames=100, fps=True, video_fps=30.0), "fps"),
        ("sample_frame_indices", lambda **kw: sample_frame_indices(**kw),
         dict(num_frames=100, fps=2.0, video_fps="30"), "video_fps"),
        ("sample_frame_indices", lambda **kw: sample_frame_indices(**kw),
         dict(num_frames=100, fps=2.0, video_fps=30.0, min_frames=1.5), "min_frames"),
        ("temporal_windows", lambda **kw: temporal_windows(100, **kw),
         dict(window=BIG, stride=1), "window"),
        ("temporal_windows", lambda **kw: temporal_windows(100, **kw),
         dict(window=4, stride=np.float32(1)), "stride"),
        ("temporal_windows", lambda **kw: temporal_windows(**kw),
         dict(num_frames=2 ** 31 - 1, window=1, stride=1), "num_frames"),
    ]
    return [pytest.param(fn, kw, name, op, id=f"{op}-{name}-{i}")
            for i, (op, fn, kw, name) in enumerate(c)]


@pytest.mark.parametrize("fn,kwargs,name,op", _cases())
def test_bad_scalar_raises_argument_error_naming_it(fn, kwargs, name, op):
    with pytest.raises(ArgumentError, match=rf"^\[{op}\] {name}(?!\w)") as info:
        fn(**kwargs)
    err = info.value
    assert isinstance(err, MMCoreError) and isinstance(err, TypeError)
    assert isinstance(err, ValueError) and not isinstance(err, ShapeError)


def test_numpy_scalar_types_are_accepted():
    x = np.stack([SIG, SIG[::-1].copy()])
    np.testing.assert_array_equal(stft(x, n_fft=np.int64(400), hop_length=np.int32(160)),
                                  stft(x, n_fft=400, hop_length=160))
    np.testing.assert_array_equal(
        mel_spectrogram(x, sr=np.float32(16000), n_mels=np.uint8(40), power=np.float16(1.0)),
        mel_spectrogram(x, sr=16000, n_mels=40, power=1.0))
    np.testing.assert_array_equal(fbank(x, sr=np.int64(16000), dither=np.float32(0.0)),
                                  fbank(x, sr=16000))
    np.testing.assert_array_equal(attention(Q, Q, Q, scale=np.float32(0.5), temperature=np.int8(2)),
                                  attention(Q, Q, Q, scale=0.25))
    np.testing.assert_array_equal(attention(Q, Q, Q, scale=np.array(0.25)),
                                  attention(Q, Q, Q, scale=0.25))

    class ZeroDim:                             # a 0-d array-like (a CPU torch tensor, say)
        def __array__(self, dtype=None, copy=None):
            return np.array(0.25)

    np.testing.assert_array_equal(attention(Q, Q, Q, scale=ZeroDim()),
                                  attention(Q, Q, Q, scale=0.25))
    with pytest.raises(ArgumentError, match="scale"):
        attention(Q, Q, Q, scale=np.array([0.25]))       # one value, but not a scalar
    np.testing.assert_array_equal(resize(RGB, (np.int64(4), np.uint16(4))), resize(RGB, (4, 4)))
    np.testing.assert_array_equal(preprocess_image(RGB, size=np.int32(16), scale=Fraction(1, 255)),
                                  preprocess_image(RGB, size=16, scale=1 / 255))
    np.testing.assert_array_equal(layer_norm(X2, eps=np.float32(1e-5)), layer_norm(X2, eps=1e-5))
    assert layer_norm(X2, eps=1).shape == X2.shape
    np.testing.assert_array_equal(sample_frame_indices(np.int64(100), n=np.int32(4)),
                                  sample_frame_indices(100, n=4))
    np.testing.assert_array_equal(
        sample_frame_indices(300, fps=Fraction(2), video_fps=np.float32(30)),
        sample_frame_indices(300, fps=2.0, video_fps=30.0))


def test_float32_bounds_keep_what_float32_can_hold():
    # the largest float32 value and the smallest positive one are accepted
    f32 = np.finfo(np.float32)
    assert check_float("scale", float(f32.max), op="op") == float(f32.max)
    tiny = float(np.nextafter(np.float32(0), np.float32(1)))
    assert check_float("power", tiny, op="op", lo=0.0, lo_open=True) == tiny
    assert attention(Q, Q, Q, scale=float(f32.max) / 1e30).shape == (1, 2, 3, 8)
    # float64 values that round into range are fine; ones that round out of it are not
    with pytest.raises(ArgumentError, match=r"rounds to 0\.0 in float32"):
        check_float("power", tiny / 4, op="op", lo=0.0, lo_open=True)
    assert check_float("eps", TINY, op="op", lo=0.0, lo_open=True, float32=False) == TINY


def test_check_helpers_messages_and_types():
    assert check_int("n", np.uint64(2 ** 63 - 1), op="op") == 2 ** 63 - 1
    assert type(check_int("n", np.int16(3), op="op")) is int
    with pytest.raises(ArgumentError, match=r"^\[op\] n must be <= 9223372036854775807"):
        check_int("n", np.uint64(2 ** 63), op="op")
    with pytest.raises(ArgumentError, match=r"^\[op\] n must be >= -3, got -4$"):
        check_int("n", -4, op="op", lo=-3)
    with pytest.raises(ArgumentError, match=r"^\[op\] p must lie in \[0\.0, 1\.0\), got 1\.0$"):
        check_float("p", 1.0, op="op", lo=0.0, hi=1.0, hi_open=True)
    with pytest.raises(ArgumentError, match=r"^\[op\] f must be a real number, got 1j$"):
        check_float("f", 1j, op="op")
    with pytest.raises(ArgumentError, match=r"beyond the float64 range"):
        check_float("f", 10 ** 400, op="op")
    with pytest.raises(ArgumentError, match=r"^\[op\] flag must be True or False, got 0$"):
        check_bool("flag", 0, op="op")
    with pytest.raises(ArgumentError, match=r"^\[op\] mode must be one of 'a', 'b', got \['a'\]$"):
        check_choice("mode", ["a"], ("a", "b"), op="op")
    long = "x" * 500
    with pytest.raises(ArgumentError) as info:
        check_choice("mode", long, ("a",), op="op")
    assert len(str(info.value)) < 200                  # long values are cut in messages


@pytest.mark.parametrize("flip", ["rows", "batch"])
def test_one_row_image_with_negative_row_stride_is_copied(flip):
    rng = np.random.default_rng(3)
    base = rng.integers(0, 256, (1, 37, 3), dtype=np.uint8)
    if flip == "rows":
        img = base[::-1]                      # NumPy calls it contiguous; its row stride is < 0
        assert img.strides[0] < 0 and img.flags.c_contiguous
        want = base
    else:
        img = np.stack([base, base])[:, ::-1]
        want = np.stack([base, base])
    np.testing.assert_array_equal(resize(img, (5, 11)), resize(want, (5, 11)))
    np.testing.assert_array_equal(preprocess_image(img, size=16), preprocess_image(want, size=16))
