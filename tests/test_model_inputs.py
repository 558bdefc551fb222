"""Mistaken inputs at the model boundary: missing / special files, audio channel layouts and
sample rates, channels-last float images, and what ``mmcore run`` cuts."""

from __future__ import annotations

import os

import numpy as np
import pytest

from _helpers import call_bounded  # noqa: E402
from mmcore.errors import (
    ArgumentError,
    AudioDecodeError,
    ImageDecodeError,
    MMCoreError,
    ShapeError,
    VideoDecodeError,
)
from mmcore.model import MultiModalInput, default_model
from mmcore.model.encoders import ModalityEncoder

sf = pytest.importorskip("soundfile")
pytest.importorskip("soxr")

from mmcore.preprocess import AudioPreprocessor, resample  # noqa: E402

CACHE = [pytest.param(None, id="cache-on"), pytest.param(False, id="cache-off")]
ERRORS = {"image": ImageDecodeError, "audio": AudioDecodeError, "video": VideoDecodeError}
EXT = {"image": ".png", "audio": ".wav", "video": ".mp4"}


@pytest.fixture(scope="module")
def models():
    return {None: default_model(seed=0), False: default_model(seed=0, cache=False)}


def _speech(seconds: float, sr: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * sr)) / sr
    x = 0.3 * np.sin(2 * np.pi * 220 * t) + 0.05 * rng.standard_normal(t.shape)
    return x.astype(np.float32)


# --------------------------------------------------------------------------------------------
# item: one error type for a file that is missing or not a regular file, cache on or off

@pytest.mark.parametrize("cache", CACHE)
@pytest.mark.parametrize("kind", ["image", "audio", "video"])
@pytest.mark.parametrize("as_list", [True, False], ids=["list", "path"])
def test_missing_file_raises_the_modalitys_decode_error(models, cache, kind, as_list, tmp_path):
    path = str(tmp_path / f"nonexistent{EXT[kind]}")
    value = [path] if as_list else path
    with pytest.raises(ERRORS[kind], match=r"^\[MultiModalModel\] .*nonexistent.*does not exist"):
        models[cache].infer({kind: value})
    with pytest.raises(ERRORS[kind], match="nonexistent"):
        models[cache].encode_modality(kind, value)        # what a shard node runs


@pytest.mark.parametrize("cache", CACHE)
@pytest.mark.parametrize("kind", ["image", "audio", "video"])
def test_fifo_and_directory_are_refused_without_blocking(models, cache, kind, tmp_path):
    fifo = str(tmp_path / f"pipe{EXT[kind]}")
    os.mkfifo(fifo)
    folder = tmp_path / f"folder{EXT[kind]}"
    folder.mkdir()
    try:
        for path, what in ((fifo, "FIFO"), (str(folder), "directory")):
            exc = call_bounded(lambda path=path: models[cache].infer({kind: [path]}), fifo)
            assert isinstance(exc, ERRORS[kind]), repr(exc)
            assert what in str(exc) and os.path.basename(path) in str(exc)
    finally:
        try:                                   # release a reader stuck on the FIFO, if any
            os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        except OSError:
            pass


def test_cache_keying_reads_only_regular_files(tmp_path):
    """The cache's own file read (the key of a path item) refuses a FIFO too."""
    from mmcore.model.inputs import item_data
    fifo = str(tmp_path / "p.png")
    os.mkfifo(fifo)
    exc = call_bounded(lambda: item_data("image", fifo), fifo)
    assert isinstance(exc, ImageDecodeError) and "FIFO" in str(exc)
    missing = str(tmp_path / "gone.wav")
    with pytest.raises(AudioDecodeError, match="gone.wav"):
        item_data("audio", missing)


def test_cache_keys_a_large_file_in_bounded_memory(tmp_path):
    """The key of a path item is a digest read in chunks: a 256 MB input file costs the
    cache a chunk, not the file (then the decoder refuses it as not an image)."""
    import tracemalloc
    big = tmp_path / "big.png"
    with open(big, "wb") as fh:
        fh.truncate(256 << 20)
    model = default_model()
    tracemalloc.start()
    try:
        with pytest.raises(ImageDecodeError, match="big.png"):
            model.infer({"image": [str(big)]})
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 32 << 20, peak
    # equal bytes, equal key; other bytes, another key
    from mmcore.model.inputs import item_data
    same = tmp_path / "same.bin"
    same.write_bytes(b"x" * 5000)
    other = tmp_path / "other.bin"
    other.write_bytes(b"x" * 4999 + b"y")
    copy = tmp_path / "copy.bin"
    copy.write_bytes(b"x" * 5000)
    assert item_data("image", str(same)) == item_data("image", str(copy))
    assert item_data("image", str(same)) != item_data("image", str(other))


@pytest.mark.parametrize("cache", CACHE)
def test_bytes_paths_and_devices(models, cache, tmp_path):
    with pytest.raises(ImageDecodeError, match="does not exist"):
        models[cache].infer({"image": str(tmp_path / "none.png")})
    # bytes are an encoded image, never a file name
    with pytest.raises(ImageDecodeError, match="encoded bytes"):
        models[cache].infer({"image": os.fsencode(tmp_path / "none.png")})
    exc = call_bounded(lambda: models[cache].infer({"audio": ["/dev/zero"]}))
    assert isinstance(exc, AudioDecodeError) and "character device" in str(exc)


@pytest.mark.parametrize("cache", CACHE)
@pytest.mark.parametrize("modality, value", [
    ("image", np.zeros((0, 3, 64, 64), np.float32)),
    ("image", np.zeros((0, 64, 64, 3), np.uint8)),
    ("audio", np.zeros((0, 80, 200), np.float32)),
    ("audio", np.zeros((0, 16000), np.float32)),
    ("video", np.zeros((0, 8, 32, 32, 3), np.uint8)),
    ("text", np.zeros((0, 5), np.int64)),
    ("image", {"pixel_values": np.zeros((0, 3, 64, 64), np.float32)}),
])
def test_empty_batches_are_refused(models, cache, modality, value):
    with pytest.raises(ShapeError, match=r"^\[MultiModalInput\] .*empty batch"):
        models[cache].infer({modality: value})


def test_text_path_object_is_refused(models, tmp_path):
    p = tmp_path / "t.txt"
    p.write_text("hello")
    with pytest.raises(ShapeError, match=r"^\[MultiModalInput\].*text.*read the file"):
        models[None].infer({"text": p})


# --------------------------------------------------------------------------------------------
# item: audio channels and sample rates

@pytest.mark.parametrize("cache", CACHE)
@pytest.mark.parametrize("shape", [(88200, 2), (88200, 1), (44100, 8), (88200, 16), (1000, 63),
                                   (88200, 64), (5000, 1000)])
def test_channels_last_audio_is_refused_not_taken_as_tiny_clips(models, cache, shape):
    stereo = np.zeros(shape, np.float32)      # as soundfile.read returns multichannel audio
    exc = call_bounded(lambda: models[cache].infer({"audio": stereo}), bound=20)
    assert isinstance(exc, ShapeError), repr(exc)
    msg = str(exc)
    assert msg.startswith("[MultiModalInput] modality_inputs['audio']")
    assert str(shape) in msg and "(T, C)" in msg and "mean(axis=1)" in msg and "x.T" in msg


def test_large_batches_of_long_clips_are_still_batches():
    from mmcore.preprocess.audio import audio_batch_size
    assert audio_batch_size(np.zeros((3, 100), np.float32)) == 3
    assert audio_batch_size(np.zeros((2000, 1024), np.float32)) == 2000
    assert audio_batch_size(np.zeros((40, 64), np.float32)) == 40


def test_preprocessor_refuses_channels_last_too():
    pre = AudioPreprocessor()
    with pytest.raises(ShapeError, match=r"\(T, C\) multichannel"):
        pre(np.zeros((88200, 2), np.float32))
    with pytest.raises(ShapeError, match=r"item 1 has shape \(16000, 2\).*mean"):
        pre([np.zeros(100, np.float32), np.zeros((16000, 2), np.float32)])


def test_channels_first_stereo_is_a_batch_of_channels(models):
    x = np.stack([_speech(1.0, 16000, 1), _speech(1.0, 16000, 2)])         # (C, T)
    out = models[False].infer({"audio": x})
    assert out.fused.shape == (2, 64)
    mono = models[False].infer({"audio": x.T.mean(axis=1)})
    assert mono.fused.shape == (1, 64)


@pytest.mark.parametrize("cache", CACHE)
def test_audio_pair_is_resampled_like_load_audio(models, cache):
    model = models[cache]
    model.clear_cache()
    w44 = _speech(1.5, 44100, 3)
    w22 = _speech(0.7, 22050, 4)
    ref = model.infer({"audio": [resample(w44, 44100, 16000),
                                 resample(w22, 22050, 16000)]}).fused
    got = model.infer({"audio": [(w44, 44100), (w22, 22050)]}).fused
    np.testing.assert_array_equal(got, ref)
    one = model.infer({"audio": (w44, 44100)}).fused
    np.testing.assert_array_equal(one[0], ref[0])
    as_list = model.infer({"audio": [w44, 44100]}).fused            # a pair given as a list
    np.testing.assert_array_equal(as_list, one)
    w16 = _speech(1.0, 16000, 5)
    np.testing.assert_array_equal(model.infer({"audio": (w16, 16000)}).fused,
                                  model.infer({"audio": w16}).fused)


def test_audio_pair_rate_is_part_of_the_cache_key(models):
    cached, plain = models[None], models[False]
    cached.clear_cache()
    w = _speech(1.0, 16000, 6)
    for rate in (16000, 32000, 8000):
        np.testing.assert_array_equal(cached.infer({"audio": (w, rate)}).fused,
                                      plain.infer({"audio": (w, rate)}).fused)
    assert not np.array_equal(cached.infer({"audio": (w, 32000)}).fused,
                              cached.infer({"audio": (w, 16000)}).fused)


def test_audio_pair_through_the_preprocessor():
    pre = AudioPreprocessor()
    w = _speech(1.0, 48000, 7)
    np.testing.assert_array_equal(pre((w, 48000))["input_features"],
                                  pre(w, sampling_rate=48000)["input_features"])
    # the pair's own rate wins over sampling_rate
    np.testing.assert_array_equal(pre([(w, 48000)], sampling_rate=8000)["input_features"],
                                  pre(w, sampling_rate=48000)["input_features"])


@pytest.mark.parametrize("value, error, frag", [
    ((np.zeros(16000, np.float32), 0), ArgumentError, "sample_rate=0"),
    ((np.zeros(16000, np.float32), 44100.5), ArgumentError, "whole number"),
    ((np.zeros(16000, np.float32), 10 ** 9), ArgumentError, "768000"),
    (("some.wav", 44100), ArgumentError, "files carry their own rate"),
    ((np.zeros((2, 16000), np.float32), 44100), ShapeError, r"waveform .*\(2, 16000\)"),
    ([(np.zeros(16000, np.int16), 44100)], ShapeError, "int16"),
])
def test_bad_audio_pairs(models, value, error, frag):
    with pytest.raises(error, match=frag):
        models[None].infer({"audio": value})
    with pytest.raises(error, match=frag):
        AudioPreprocessor()(value)


def test_audio_pair_survives_the_distributed_payload(models):
    from mmcore.distributed.payload import pack_input, unpack_input
    w = _speech(1.0, 44100, 8)
    desc, arrays = pack_input("audio", (w, 44100))
    value = unpack_input(desc, arrays, tmpdir=None)
    model = models[False]
    got = model.encode_modality("audio", value)
    ref = model.encode_modality("audio", (w, 44100))
    for a, b in zip(got, ref):
        np.testing.assert_array_equal(a, b)


class _PayloadRemote:
    """A remote encoder that sends its input through the distributed payload to a node model
    (what mmcore.distributed does over a socket)."""

    def __init__(self, node, modality):
        self.node, self.modality = node, modality

    def submit(self, value, *, is_raw, attention_mask):
        from concurrent.futures import Future

        from mmcore.distributed.payload import pack_input, unpack_input
        fut = Future()
        try:
            desc, arrays = pack_input(self.modality, value, attention_mask=attention_mask)
            v, mask = unpack_input(desc, arrays, tmpdir=None, with_mask=True)
            fut.set_result(self.node.encode_modality(self.modality, v, attention_mask=mask))
        except BaseException as exc:  # noqa: BLE001 - delivered through the future
            fut.set_exception(exc)
        return fut


def test_batches_of_audio_pairs_reach_remote_encoders():
    local = default_model(seed=0, cache=False)
    coord = default_model(seed=0, cache=False)
    coord.set_remote_encoders({"audio": _PayloadRemote(default_model(seed=0, cache=False),
                                                       "audio")})
    w44, w22 = _speech(1.2, 44100, 11), _speech(0.8, 22050, 12)
    for value in ([(w44, 44100), (w22, 22050)], (w44, 44100), [w44[:16000], (w22, 22050)]):
        np.testing.assert_array_equal(coord.infer({"audio": value}).fused,
                                      local.infer({"audio": value}).fused)


# --------------------------------------------------------------------------------------------
# item: layouts and dtypes checked where they enter infer

@pytest.fixture
def no_encoder_calls(monkeypatch):
    calls = []
    orig = ModalityEncoder.__call__

    def spy(self, *a, **kw):
        calls.append(self.modality)
        return orig(self, *a, **kw)

    monkeypatch.setattr(ModalityEncoder, "__call__", spy)
    monkeypatch.setattr(ModalityEncoder, "embed",
                        lambda self, *a, **kw: calls.append(self.modality))
    yield calls
    assert calls == [], f"encoders ran before the input was refused: {calls}"


@pytest.mark.parametrize("cache", CACHE)
def test_float_channels_last_image_is_refused_at_entry(models, cache, no_encoder_calls):
    x = np.zeros((2, 48, 64, 3), np.float32)
    with pytest.raises(ShapeError) as info:
        models[cache].infer({"text": ["a", "b"], "image": x})
    msg = str(info.value)
    assert msg.startswith("[MultiModalInput] modality_inputs['image']")
    assert "(2, 48, 64, 3)" in msg and "float32" in msg
    assert "transpose to (B, 3, H, W)" in msg and "uint8" in msg and "preprocessed" in msg


@pytest.mark.parametrize("value, frags", [
    (np.zeros((2, 3, 48, 48), np.uint8), ["channels-first", "transpose(0, 2, 3, 1)"]),
    (np.zeros((3, 48, 48), np.uint8), ["channels-first", "transpose(1, 2, 0)"]),
    (np.zeros((48, 48), np.uint8), ["RGB"]),
    (np.zeros((1, 48, 48, 4), np.uint8), ["RGB"]),
    (np.zeros((1, 48, 48, 3), np.int64), ["int64", "astype(np.uint8)"]),
    (np.zeros((48, 48, 3), np.float32), ["(H, W, C)", "uint8"]),
    (np.zeros((1, 3, 40, 40), np.float32), ["modality 'image'", "multiples of 16"]),
    (np.zeros((1, 16, 100), np.float32), ["modality 'image'", "patches (B, N, 768)"]),
])
def test_image_layout_errors_name_what_is_expected(models, value, frags, no_encoder_calls):
    with pytest.raises(ShapeError) as info:
        models[None].infer({"image": value})
    msg = str(info.value)
    assert msg.startswith("[MultiModalInput]") or msg.startswith("[MultiModalModel]")
    assert "image" in msg and str(value.shape) in msg
    for f in frags:
        assert f in msg, msg


@pytest.mark.parametrize("modality, value, frags", [
    ("video", np.zeros((1, 8, 32, 32, 3), np.float32), ["(B, T, 3, H, W)",
                                                         "transpose(0, 1, 4, 2, 3)"]),
    ("video", np.zeros((1, 8, 3, 32, 32), np.uint8), ["channels-first"]),
    ("video", np.zeros((8, 3, 32, 32), np.float32), ["batch axis"]),
    ("audio", np.zeros((2, 200, 80), np.float32), ["modality 'audio'", "(B, 80, frames)",
                                                   "transpose(0, 2, 1)"]),
    ("audio", np.zeros((2, 16000), np.int16), ["int16", "32768"]),
    ("audio", np.zeros((2, 3, 4, 5), np.float32), ["4 dims"]),
    ("text", np.zeros(5, np.int64), ["batch axis"]),
    ("text", np.zeros((1, 5), np.float32), ["integers"]),
])
def test_other_layout_errors(models, modality, value, frags, no_encoder_calls):
    with pytest.raises(ShapeError) as info:
        models[None].infer({modality: value})
    msg = str(info.value)
    assert isinstance(info.value, MMCoreError) and msg.startswith("[")
    assert modality in msg and str(value.shape) in msg
    for f in frags:
        assert f in msg, msg


def test_accepted_layouts_still_work(models):
    m = models[False]
    assert m.infer({"image": np.zeros((2, 3, 64, 64), np.float32)}).fused.shape == (2, 64)
    assert m.infer({"image": np.zeros((48, 40, 3), np.uint8)}).fused.shape == (1, 64)
    assert m.infer({"audio": np.zeros((3, 100), np.float32)}).fused.shape == (3, 64)
    assert m.infer({"audio": np.zeros((2, 80, 200), np.float32)}).fused.shape == (2, 64)
    assert MultiModalInput({"video": {"pixel_values": np.zeros((8, 3, 32, 32),
                                                               np.float32)}}).batch_size == 1


# --------------------------------------------------------------------------------------------
# item: mmcore run says what it cuts

def test_run_reports_truncated_text_and_audio(tmp_path, capsys):
    from mmcore.cli import main
    wav = tmp_path / "five_seconds.wav"
    sf.write(wav, _speech(5.0, 22050, 9), 22050)
    assert main(["run", "--text", "x" * 200, "--audio", str(wav)]) == 0
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if "note" in ln]
    assert len(lines) == 2, err
    text = next(ln for ln in lines if "--text" in ln)
    assert "201 tokens" in text and "64 tokens" in text and "max_length=64" in text
    audio = next(ln for ln in lines if "--audio" in ln)
    assert "five_seconds.wav" in audio and "5.00 s" in audio and "2.00 s" in audio
    assert "chunk_length_s=2" in audio


def test_run_is_quiet_when_nothing_is_cut(tmp_path, capsys):
    from mmcore.cli import main
    wav = tmp_path / "short.wav"
    sf.write(wav, _speech(1.5, 22050, 10), 22050)
    assert main(["run", "--text", "x" * 60, "--audio", str(wav)]) == 0
    assert "note" not in capsys.readouterr().err


def test_run_refuses_a_fifo_without_blocking(tmp_path, capsys):
    from mmcore.cli import main
    fifo = str(tmp_path / "pipe.wav")
    os.mkfifo(fifo)
    rc = call_bounded(lambda: main(["run", "--audio", fifo]), fifo)
    assert rc == 1
    assert "FIFO" in capsys.readouterr().err


def test_preprocessor_sampling_rate_is_bounded_like_pairs():
    pre = AudioPreprocessor()
    clip = np.zeros(1600, np.float32)
    for bad in (1, 999, 768001):
        with pytest.raises(ArgumentError, match="sampling_rate"):
            pre(clip, sampling_rate=bad)
    assert pre(clip, sampling_rate=8000)["input_features"].shape[0] == 1


def test_image_and_audio_file_objects_are_read_from_their_start():
    import io

    from PIL import Image

    png = io.BytesIO()
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(png, "PNG")
    wav = io.BytesIO()
    sf.write(wav, _speech(0.5, 16000, 10), 16000, format="WAV")
    for kind, fh in (("image", png), ("audio", wav)):
        fh.seek(7)
        got = MultiModalInput(modality_inputs={kind: fh}).modality_inputs
        assert list(got.values()) == [fh.getvalue()]
        fh.seek(7)
        got = MultiModalInput(modality_inputs={kind: [fh]}).modality_inputs
        assert list(got.values()) == [[fh.getvalue()]]
