"""Hostile files for the decoders: size limits checked before decoding, and paths that are not
regular files (FIFOs, devices, directories) refused without blocking.

Files that would blow up memory are crafted small here (a 1 Hz WAV, a long FLAC of silence, an
8192 x 8192 H.264 frame). The loaders that could allocate gigabytes run in a child process that
reports its peak memory growth, and every call that could hang on a FIFO runs under a time
bound, so a regression fails the test instead of taking the machine or the suite with it.
"""

from __future__ import annotations

import json
import math
import os
import stat
import subprocess
import sys
import tempfile
import textwrap
import time

import numpy as np
import pytest

sf = pytest.importorskip("soundfile")

from _helpers import call_bounded  # noqa: E402
from mmcore.errors import (  # noqa: E402
    ArgumentError,
    AudioDecodeError,
    ConfigError,
    ImageDecodeError,
    VideoDecodeError,
)
from mmcore.features import extract_features  # noqa: E402
from mmcore.preprocess import audio as audio_mod  # noqa: E402
from mmcore.preprocess import load_audio, load_audio_with_rate, load_image  # noqa: E402

TIMEOUT = 120      # seconds: the bound on a child process (generous; the calls take < 2 s)


# -- helpers ------------------------------------------------------------------------------------

def run_child(code: str, *, timeout: float = TIMEOUT, **kw) -> dict:
    """Run ``code`` in a fresh interpreter; it must print one JSON object as its last line.

    ``rss0()`` / ``grown_mb()`` are defined for it: the peak resident memory growth in MiB
    since the imports, so a child measures what its call allocated.
    """
    prelude = textwrap.dedent("""
        import json, math, os, resource, sys, time
        import numpy as np
        import soundfile
        import mmcore.preprocess
        try:
            import av
        except ImportError:
            av = None
        _RSS0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        def grown_mb():
            return (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - _RSS0) / 1024
    """)
    env = dict(os.environ)
    env.setdefault("MMCORE_NUM_THREADS", "1")
    # outside the source tree, so that the child imports the installed package (with its
    # native module), not the checkout's mmcore/ that "-c" would put first on sys.path
    kw.setdefault("cwd", tempfile.gettempdir())
    proc = subprocess.run([sys.executable, "-c", prelude + textwrap.dedent(code)],
                          capture_output=True, text=True, timeout=timeout, env=env, **kw)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def write_video(path, *, n: int = 6, w: int = 64, h: int = 48):
    av = pytest.importorskip("av")
    with av.open(str(path), "w") as c:
        s = c.add_stream("mpeg4", rate=10)
        s.width, s.height, s.pix_fmt = w, h, "yuv420p"
        for i in range(n):
            img = np.full((h, w, 3), 30 * i % 256, np.uint8)
            c.mux(s.encode(av.VideoFrame.from_ndarray(img, format="rgb24")))
        c.mux(s.encode())
    return path


@pytest.fixture
def fifo(tmp_path):
    if not hasattr(os, "mkfifo"):
        pytest.skip("no os.mkfifo on this platform")
    p = tmp_path / "pipe.bin"
    os.mkfifo(p)
    return p


# -- audio: size limits -------------------------------------------------------------------------

@pytest.fixture
def wav_1hz(tmp_path):
    """200 kB of WAV at 1 Hz: 100000 frames, 27.8 hours, 1.6e9 samples once resampled to
    16 kHz (6.4 GB of float32 without a limit)."""
    p = tmp_path / "one_hz.wav"
    sf.write(p, np.zeros(100_000, np.int16), 1, subtype="PCM_16")
    assert os.path.getsize(p) < 250_000
    return p


def test_audio_1hz_wav_refused_by_duration_before_decoding(wav_1hz):
    t0 = time.monotonic()
    with pytest.raises(AudioDecodeError) as e:
        load_audio(wav_1hz)
    msg = str(e.value)
    assert msg.startswith("[load_audio]") and "one_hz.wav" in msg
    assert "max_duration_s=14400" in msg and "math.inf" in msg and "1 Hz" in msg
    assert time.monotonic() - t0 < 10


def test_audio_absurd_rate_caught_by_output_samples_before_resampling(wav_1hz):
    # the duration check off: the resampled size (1.6e9 samples) is refused before soxr runs
    res = run_child(f"""
        from mmcore.errors import AudioDecodeError
        t0 = time.monotonic()
        try:
            mmcore.preprocess.load_audio({str(wav_1hz)!r}, max_duration_s=math.inf)
            msg = None
        except AudioDecodeError as exc:
            msg = str(exc)
        print(json.dumps({{"msg": msg, "s": time.monotonic() - t0, "mb": grown_mb()}}))
    """)
    assert res["msg"] is not None, "a 1 Hz file resampled to 16 kHz was decoded"
    assert res["msg"].startswith("[load_audio]") and "one_hz.wav" in res["msg"]
    assert "max_samples=536870912" in res["msg"] and "1600000000 samples" in res["msg"]
    assert res["mb"] < 100 and res["s"] < 10
    # without resampling the same file is small, and loads
    y, rate = load_audio_with_rate(wav_1hz, sr=None, max_duration_s=math.inf)
    assert rate == 1 and y.shape == (100_000,)
    # a limit raised far enough lets it through (here: resampled to 2 Hz)
    assert load_audio(wav_1hz, sr=2, max_duration_s=math.inf).shape[0] == 200_000


@pytest.fixture
def flac_silence(tmp_path):
    """8 channels at 48 kHz, 2**23 frames of silence (175 s): about 70 kB of FLAC,
    2**26 samples (256 MiB of float32) when all channels are decoded."""
    p = tmp_path / "silence.flac"
    with sf.SoundFile(p, "w", samplerate=48000, channels=8, format="FLAC",
                      subtype="PCM_16") as f:
        block = np.zeros((1 << 20, 8), np.int16)
        for _ in range(8):
            f.write(block)
    assert os.path.getsize(p) < 1_000_000
    return p


def test_audio_flac_silence_refused_by_samples_before_decoding(flac_silence):
    res = run_child(f"""
        from mmcore.errors import AudioDecodeError
        t0 = time.monotonic()
        try:
            mmcore.preprocess.load_audio({str(flac_silence)!r}, sr=None, mono=False,
                                         max_samples=2**22)
            msg = None
        except AudioDecodeError as exc:
            msg = str(exc)
        print(json.dumps({{"msg": msg, "s": time.monotonic() - t0, "mb": grown_mb()}}))
    """)
    assert res["msg"] is not None
    assert res["msg"].startswith("[load_audio]") and "silence.flac" in res["msg"]
    assert "max_samples=4194304" in res["msg"] and "8 channel(s)" in res["msg"]
    assert res["mb"] < 60 and res["s"] < 10          # nothing decoded


def test_audio_mono_mix_never_holds_all_channels(flac_silence):
    # mono=True (the default) mixes block by block: peak memory about the mono result, not the
    # 256 MiB of the 8 decoded channels
    res = run_child(f"""
        y = mmcore.preprocess.load_audio({str(flac_silence)!r}, sr=None)
        print(json.dumps({{"shape": list(y.shape), "max": float(np.abs(y).max()),
                           "mb": grown_mb()}}))
    """)
    assert res["shape"] == [1 << 23] and res["max"] == 0.0
    assert res["mb"] < 150, f"decoding grew memory by {res['mb']:.0f} MiB"
    # the mono limit counts one channel: 2**23 samples pass a 2**23 limit
    assert load_audio(flac_silence, sr=None, max_samples=2**23).shape == (1 << 23,)
    with pytest.raises(AudioDecodeError, match="max_samples"):
        load_audio(flac_silence, sr=None, max_samples=2**23 - 1)


def test_audio_long_flac_refused_by_default_duration(tmp_path):
    # 2e6 frames at 100 Hz = 5.6 hours, a few kB of FLAC
    p = tmp_path / "long.flac"
    sf.write(p, np.zeros(2_000_000, np.int16), 100, format="FLAC", subtype="PCM_16")
    with pytest.raises(AudioDecodeError, match=r"long\.flac.*20000\.0 s.*max_duration_s"):
        load_audio(p, sr=None)
    assert load_audio(p, sr=None, max_duration_s=6 * 3600).shape == (2_000_000,)


def test_audio_stereo_mono_mix_is_unchanged(tmp_path):
    # block-wise mixing gives exactly the mean of the channels
    rng = np.random.default_rng(0)
    x = rng.uniform(-0.9, 0.9, (300_001, 3)).astype(np.float32)
    p = tmp_path / "three.wav"
    sf.write(p, x, 8000, subtype="FLOAT")
    np.testing.assert_array_equal(load_audio(p, sr=None), x.mean(axis=1, dtype=np.float32))
    np.testing.assert_array_equal(load_audio(p, sr=None, mono=False), x.T)


def test_audio_stream_longer_than_its_header_is_stopped_while_decoding():
    # a decoder that does not know its length (declared=-1) and never ends, like a stream of
    # /dev/zero: the limits are checked as blocks come in
    class Endless:
        frames = -1

        def seekable(self):
            return False

        def read(self, frames, dtype, always_2d):
            return np.zeros((frames, 2), np.float32)

    limits = audio_mod._Limits("load_audio", "'endless'", sr=None, mono=True,
                               max_duration_s=math.inf, max_samples=3_000_000)
    with pytest.raises(AudioDecodeError, match=r"decodes to .* max_samples=3000000"):
        audio_mod._read(Endless(), limits, 16000, 2, -1)
    limits = audio_mod._Limits("load_audio", "'endless'", sr=16000, mono=False,
                               max_duration_s=60.0, max_samples=math.inf)
    with pytest.raises(AudioDecodeError, match=r"max_duration_s=60"):
        audio_mod._read(Endless(), limits, 16000, 2, -1)


def test_audio_flac_without_a_length_is_bounded_while_decoding(tmp_path):
    # a FLAC stream whose STREAMINFO leaves total_samples at 0 (unknown, as a streaming encoder
    # writes it): libsndfile reports 2**63 - 1 frames, so the header cannot be checked; the
    # limits apply while it decodes, and it still decodes in full
    x = (np.random.default_rng(1).standard_normal(48_000) * 0.1).astype(np.float32)
    p = tmp_path / "nolength.flac"
    sf.write(p, x, 16000, format="FLAC")
    expected = sf.read(p, dtype="float32")[0]
    raw = bytearray(p.read_bytes())
    assert raw[:4] == b"fLaC"
    field = int.from_bytes(raw[18:26], "big") & ~((1 << 36) - 1)   # clear total_samples
    raw[18:26] = field.to_bytes(8, "big")
    p.write_bytes(bytes(raw))
    assert sf.info(p).frames >= 2**62
    np.testing.assert_array_equal(load_audio(p, sr=None), expected)
    with pytest.raises(AudioDecodeError, match=r"nolength\.flac' decodes to .*max_samples=10000"):
        load_audio(p, sr=None, max_samples=10_000)
    with pytest.raises(AudioDecodeError, match=r"decodes to .*max_duration_s=1\b"):
        load_audio(p, sr=None, max_duration_s=1)


@pytest.mark.parametrize("bad", [0, -1, float("nan"), "big", True, [1]])
def test_audio_limit_arguments(wav_1hz, bad):
    for name in ("max_duration_s", "max_samples"):
        with pytest.raises(ArgumentError, match=rf"\[load_audio\] {name}"):
            load_audio(wav_1hz, **{name: bad})


# -- video: size limits -------------------------------------------------------------------------

def test_video_8192_frame_refused_before_decoding(tmp_path):
    if not _has_encoder("libx264"):
        pytest.skip("no libx264 encoder in this PyAV")
    p = tmp_path / "huge.mp4"
    # one 8192 x 8192 H.264 frame (about 200 kB; ~1 s and a few hundred MB to encode, so in
    # a child of its own)
    run_child(f"""
        with av.open({str(p)!r}, "w") as c:
            s = c.add_stream("libx264", rate=1, options={{"preset": "ultrafast",
                             "tune": "zerolatency", "threads": "1"}})
            s.width = s.height = 8192
            s.pix_fmt = "yuv420p"
            f = av.VideoFrame(8192, 8192, "yuv420p")
            for plane in f.planes:
                memoryview(plane)[:] = b"\\x10" * plane.buffer_size
            f.pts = 0
            c.mux(s.encode(f))
            c.mux(s.encode())
        print(json.dumps({{}}))
    """)
    assert os.path.getsize(p) < 2_000_000
    res = run_child(f"""
        from mmcore.errors import VideoDecodeError
        from mmcore.preprocess import load_video, video_info, VideoPreprocessor
        out = {{}}
        t0 = time.monotonic()
        for name, call in (("load", lambda: load_video({str(p)!r})),
                           ("pre", lambda: VideoPreprocessor({{"num_frames": 1}})({str(p)!r}))):
            try:
                call()
                out[name] = None
            except VideoDecodeError as exc:
                out[name] = str(exc)
        out["s"] = time.monotonic() - t0
        out["info"] = video_info({str(p)!r})
        out["mb"] = grown_mb()
        print(json.dumps(out))
    """)
    for name, op in (("load", "load_video"), ("pre", "VideoPreprocessor")):
        msg = res[name]
        assert msg is not None, f"{op} decoded an 8192 x 8192 frame"
        assert msg.startswith(f"[{op}]") and "huge.mp4" in msg
        assert "8192 x 8192" in msg and "max_pixels=35389440" in msg and "math.inf" in msg
    # video_info reports the size without decoding a frame
    assert (res["info"]["width"], res["info"]["height"]) == (8192, 8192)
    # nothing of the frame's size (100 MB as YUV, 200 MB as RGB) was allocated: not even by
    # the probing decode that opening a file does
    assert res["mb"] < 80, f"grew by {res['mb']:.0f} MiB"
    assert res["s"] < 30


def _has_encoder(name: str) -> bool:
    av = pytest.importorskip("av")
    return name in av.codecs_available


def test_video_limits_with_small_values(tmp_path):
    from mmcore.preprocess import VideoPreprocessor, load_video

    p = write_video(tmp_path / "clip.mp4", n=6, w=64, h=48)
    with pytest.raises(VideoDecodeError) as e:
        load_video(p, n=2, max_pixels=64 * 48 - 1)
    msg = str(e.value)
    assert msg.startswith("[load_video]") and "clip.mp4" in msg and "64 x 48" in msg
    assert "max_pixels=3071" in msg
    assert load_video(p, n=2, max_pixels=64 * 48)[0].shape == (2, 48, 64, 3)
    # the bytes of all sampled frames (repeats included)
    one = 64 * 48 * 3
    with pytest.raises(VideoDecodeError, match=rf"3 frame\(s\).*{3 * one} bytes.*max_bytes"):
        load_video(p, indices=[0, 1, 1], max_bytes=3 * one - 1)
    assert load_video(p, indices=[0, 1, 1], max_bytes=3 * one)[0].shape[0] == 3
    # every frame (no sampling): refused from the frame count before anything is decoded
    with pytest.raises(VideoDecodeError, match=r"6 frame\(s\).*max_bytes"):
        load_video(p, max_bytes=5 * one)
    assert load_video(p, max_bytes=math.inf, max_pixels=math.inf)[0].shape == (6, 48, 64, 3)
    # the preprocessor: attributes like ImagePreprocessor's max_pixels
    if hasattr(__import__("mmcore").ops, "preprocess_image"):
        pre = VideoPreprocessor({"num_frames": 2}, max_pixels=1000)
        assert pre.max_pixels == 1000 and pre.max_bytes is None
        with pytest.raises(VideoDecodeError, match=r"\[VideoPreprocessor\].*max_pixels=1000"):
            pre(p)
        pre.max_pixels = None
        assert pre(p)["pixel_values"].shape[0] == 2
    for bad in (0, -5, float("nan"), "x", True):
        with pytest.raises(ArgumentError, match=r"\[load_video\] max_pixels"):
            load_video(p, max_pixels=bad)
        with pytest.raises(ArgumentError, match=r"\[load_video\] max_bytes"):
            load_video(p, max_bytes=bad)
        with pytest.raises(ArgumentError, match=r"max_pixels"):
            VideoPreprocessor(max_pixels=bad)


def test_video_size_forgotten_by_ffmpeg_is_read_again(tmp_path):
    # for MPEG-4 part 2, FFmpeg drops a frame size above its max_pixels option while opening
    # the file (width = height = 0); the size is read again with every frame skipped, so the
    # refusal still names it
    from mmcore.preprocess import load_video
    from mmcore.preprocess.video import _ffmpeg_max_pixels

    p = write_video(tmp_path / "wide.mp4", n=2, w=1024, h=1024)
    assert _ffmpeg_max_pixels(1000) < 1024 * 1024
    with pytest.raises(VideoDecodeError, match=r"wide\.mp4' has 1024 x 1024 .*max_pixels=1000"):
        load_video(p, max_pixels=1000)


# -- FIFOs, devices, directories ----------------------------------------------------------------

def _is_refusal(result, error, path, kind):
    assert isinstance(result, error), f"expected {error.__name__}, got {result!r}"
    msg = str(result)
    assert repr(str(path)) in msg and kind in msg and "not a regular file" in msg, msg
    return msg


def test_load_image_audio_video_refuse_a_fifo(fifo, tmp_path):
    r = call_bounded(lambda: load_image(fifo), fifo)
    assert _is_refusal(r, ImageDecodeError, fifo, "a FIFO").startswith("[load_image]")
    r = call_bounded(lambda: load_audio(fifo), fifo)
    assert _is_refusal(r, AudioDecodeError, fifo, "a FIFO").startswith("[load_audio]")
    av = pytest.importorskip("av")  # noqa: F841
    from mmcore.preprocess import load_video, video_info
    r = call_bounded(lambda: load_video(fifo), fifo)
    assert _is_refusal(r, VideoDecodeError, fifo, "a FIFO").startswith("[load_video]")
    r = call_bounded(lambda: video_info(fifo), fifo)
    assert _is_refusal(r, VideoDecodeError, fifo, "a FIFO").startswith("[video_info]")


def test_symlink_to_fifo_directory_and_devices_are_refused(fifo, tmp_path):
    from mmcore.preprocess import load_video
    link = tmp_path / "link.wav"
    os.symlink(fifo, link)
    cases = [(link, "a FIFO"), (tmp_path, "a directory")]
    if os.path.exists("/dev/zero"):
        cases.append(("/dev/zero", "a character device"))
    loaders = [(load_image, ImageDecodeError), (load_audio, AudioDecodeError)]
    try:
        import av  # noqa: F401
        loaders.append((load_video, VideoDecodeError))
    except ImportError:
        pass
    for path, kind in cases:
        for fn, error in loaders:
            # call_bounded runs the call before returning: binding the loop variables is for
            # clarity only
            r = call_bounded(lambda fn=fn, path=path: fn(path), fifo)
            _is_refusal(r, error, path, kind)


@pytest.mark.skipif(not os.path.exists("/dev/stdin"), reason="no /dev/stdin")
def test_dev_stdin_is_refused_without_reading(tmp_path):
    # stdin is a pipe nobody writes to or closes: reading it would block until the timeout
    code = """
        from mmcore.errors import MMCoreError
        from mmcore.preprocess import load_audio, load_image
        out = {}
        fns = [("image", load_image), ("audio", load_audio)]
        if av is not None:
            from mmcore.preprocess import load_video
            fns.append(("video", load_video))
        for name, fn in fns:
            try:
                fn("/dev/stdin")
                out[name] = None
            except MMCoreError as exc:
                out[name] = str(exc)
        print(json.dumps(out))
    """
    r, w = os.pipe()    # the write end stays open: no end-of-file either
    try:
        res = run_child(code, stdin=r, timeout=60)
    finally:
        os.close(r)
        os.close(w)
    for name, msg in res.items():
        assert msg is not None and "/dev/stdin" in msg and "not a regular file" in msg, (name, msg)


def test_extract_features_lists_a_fifo_and_goes_on(fifo, tmp_path):
    from PIL import Image

    good_img = tmp_path / "good.png"
    Image.fromarray(np.zeros((20, 30, 3), np.uint8)).save(good_img)
    good_wav = tmp_path / "good.wav"
    sf.write(good_wav, np.zeros(8000, np.float32), 16000)
    runs = [("image", good_img, ImageDecodeError), ("audio", good_wav, AudioDecodeError)]
    try:
        import av  # noqa: F401
        runs.append(("video", write_video(tmp_path / "good.mp4"), VideoDecodeError))
    except ImportError:
        pass
    for modality, good, error in runs:
        rep = call_bounded(lambda modality=modality, good=good: extract_features(
            modality, [good, fifo, tmp_path], None, progress=False), fifo)
        assert not isinstance(rep, BaseException), rep
        assert list(rep.keys.values()) == [str(good)]
        assert [p for p, _ in rep.failed] == [str(fifo), str(tmp_path)]
        assert error.__name__ in rep.failed[0][1] and "a FIFO" in rep.failed[0][1]
        assert "a directory" in rep.failed[1][1]


def test_cli_features_with_a_fifo(fifo, tmp_path):
    from PIL import Image

    good = tmp_path / "good.png"
    Image.fromarray(np.zeros((20, 30, 3), np.uint8)).save(good)
    out = tmp_path / "out.safetensors"
    env = dict(os.environ, MMCORE_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "mmcore", "features", "image", str(good),
                           str(fifo), "-o", str(out), "-q"], capture_output=True, text=True,
                          timeout=TIMEOUT, env=env, cwd=str(tmp_path))
    assert proc.returncode == 1, proc.stderr
    assert str(fifo) in proc.stderr and "is a FIFO, not a regular file" in proc.stderr
    from safetensors.numpy import load_file
    assert list(load_file(out)) == ["0000_good.png"]


def test_features_output_must_not_be_a_fifo_or_device(fifo, tmp_path):
    from PIL import Image

    good = tmp_path / "good.png"
    Image.fromarray(np.zeros((20, 30, 3), np.uint8)).save(good)
    for target, kind in [(fifo, "a FIFO")] + ([("/dev/null", "a character device")]
                                              if os.path.exists("/dev/null") else []):
        r = call_bounded(
            lambda target=target: extract_features("image", [good], target, progress=False), fifo)
        assert isinstance(r, ConfigError), r
        assert str(r).startswith("[extract_features]") and kind in str(r)
    assert stat.S_ISFIFO(os.stat(fifo).st_mode)     # left as it was


def test_video_playlists_never_open_the_files_they_name(tmp_path):
    """An HLS playlist naming a file of this machine is refused (FFmpeg's HLS demuxer would
    open and decode it); the same .ts file opened directly still decodes."""
    from mmcore.preprocess import load_video
    secret = write_video(tmp_path / "secret.ts")
    frames, _ = load_video(secret, n=2)
    assert frames.shape[0] == 2
    playlist = tmp_path / "list.m3u8"
    playlist.write_text("#EXTM3U\n#EXT-X-TARGETDURATION:10\n#EXTINF:2.0,\n"
                        f"{secret}\n#EXT-X-ENDLIST\n")
    with pytest.raises(VideoDecodeError, match="list.m3u8"):
        load_video(playlist, n=2)


def test_received_files_keep_only_media_suffixes(tmp_path):
    from mmcore.distributed.payload import pack_input, unpack_input
    playlist = tmp_path / "list.m3u8"
    playlist.write_text("#EXTM3U\n")
    for name, suffix in (("list.m3u8", ""), ("clip.MP4", ".mp4"), ("a.wav", ".wav"),
                         ("x.concat", ""), ("noext", "")):
        target = tmp_path / name
        target.write_bytes(b"data")
        desc, arrays = pack_input("video", str(target))
        out = tmp_path / f"out-{name}"
        out.mkdir()
        path = unpack_input(desc, arrays, tmpdir=str(out))
        assert os.path.basename(path) == f"input1{suffix}", path


def test_decoder_threads_are_capped():
    from mmcore.preprocess import VideoPreprocessor, load_video
    from mmcore.preprocess.video import MAX_DECODER_THREADS
    with pytest.raises(ArgumentError, match="max_threads"):
        load_video("unused.mp4", max_threads=MAX_DECODER_THREADS + 1)
    with pytest.raises(ArgumentError, match="max_threads"):
        VideoPreprocessor(max_threads=3000)
