"""Video: frame-index sampling, temporal windows, PyAV decoding with seeking, the video fields of
PreprocessingConfig and VideoPreprocessor."""

from __future__ import annotations

import json
import math
import sys
from fractions import Fraction

import numpy as np
import pytest

import mmcore
from mmcore.config import PreprocessingConfig
from mmcore.errors import ArgumentError, ConfigError, MMCoreError, ShapeError, VideoDecodeError
from mmcore.preprocess import (
    VideoPreprocessor,
    load_video,
    sample_frame_indices,
    sample_video_array,
    temporal_windows,
    video_info,
)
from mmcore.preprocess.video import _VideoReader

needs_preprocess_image = pytest.mark.skipif(
    not hasattr(mmcore.ops, "preprocess_image"),
    reason="mmcore.ops.preprocess_image is not built yet")
needs_patchify = pytest.mark.skipif(not hasattr(mmcore.ops, "patchify"),
                                    reason="mmcore.ops.patchify is not built yet")

FPS = 30
N_FRAMES = 90          # 3 s
W, H = 160, 120
GOP = 12


# --------------------------------------------------------------------------------------------
# sample_frame_indices: "uniform"

def uniform_reference(num_frames: int, n: int):
    return [math.floor((Fraction(i) + Fraction(1, 2)) * num_frames / n) for i in range(n)]


@pytest.mark.parametrize("num_frames", [1, 2, 3, 7, 8, 31, 90, 97, 300, 1001])
@pytest.mark.parametrize("n", [1, 2, 3, 4, 8, 16, 32, 100])
def test_uniform_is_segment_centres(num_frames, n):
    idx = sample_frame_indices(num_frames, n=n)
    assert idx.dtype == np.int64 and idx.shape == (n,)
    assert idx.tolist() == uniform_reference(num_frames, n)
    assert idx.min() >= 0 and idx.max() <= num_frames - 1
    assert (np.diff(idx) >= 0).all()
    if n <= num_frames:
        assert len(set(idx.tolist())) == n          # distinct when there are enough frames


def test_uniform_examples():
    assert sample_frame_indices(100, n=4).tolist() == [12, 37, 62, 87]
    assert sample_frame_indices(10, n=1).tolist() == [5]
    assert sample_frame_indices(1, n=3).tolist() == [0, 0, 0]
    assert sample_frame_indices(3, n=6).tolist() == [0, 0, 1, 1, 2, 2]     # repeats
    # strategy given explicitly; limits and temporal_patch do not apply to "uniform"
    assert sample_frame_indices(90, n=3, strategy="UNIFORM", min_frames=8,
                                temporal_patch=2).tolist() == [15, 45, 75]


# --------------------------------------------------------------------------------------------
# sample_frame_indices: "fps"

def fps_reference(num_frames, fps, video_fps, min_frames=4, max_frames=768, tp=2):
    """The documented rule, step by step, in plain Python."""
    count = math.floor(num_frames / video_fps * fps + 0.5)
    count = min(max(count, min_frames), max_frames, num_frames)
    r = math.floor(count / tp + 0.5) * tp
    if r > min(max_frames, num_frames):
        r = (min(max_frames, num_frames) // tp) * tp
    count = max(r, tp)
    if count == 1:
        return [0]
    step = (num_frames - 1) / (count - 1)
    out = []
    for i in range(count):
        v = i * step
        out.append(int(np.round(v)))                      # half to even, like torch.round
    return out


@pytest.mark.parametrize("num_frames,video_fps,fps", [
    (300, 30.0, 1.0), (300, 30.0, 2.0), (90, 30.0, 2.0), (91, 29.97, 2.0), (1000, 25.0, 0.5),
    (7, 30.0, 2.0), (5, 30.0, 30.0), (3, 30.0, 2.0), (1, 30.0, 2.0), (2, 24.0, 1.0),
    (100000, 30.0, 2.0), (240, 24.0, 24.0), (61, 30.0, 1.0),
])
@pytest.mark.parametrize("tp", [1, 2, 3])
def test_fps_strategy_rule(num_frames, video_fps, fps, tp):
    idx = sample_frame_indices(num_frames, fps=fps, video_fps=video_fps, temporal_patch=tp)
    want = fps_reference(num_frames, fps, video_fps, tp=tp)
    assert idx.dtype == np.int64
    assert idx.tolist() == want
    assert len(idx) % tp == 0 and len(idx) >= tp
    assert idx[0] == 0 and idx[-1] == num_frames - 1
    assert len(idx) <= 768


def test_fps_examples():
    # 10 s at 30 fps sampled at 1 fps: 10 frames, first and last included
    assert sample_frame_indices(300, fps=1.0, video_fps=30.0).tolist() == \
        [0, 33, 66, 100, 133, 166, 199, 233, 266, 299]
    # 3 s at 2 fps -> 6 frames
    assert sample_frame_indices(90, fps=2.0, video_fps=30.0).tolist() == [0, 18, 36, 53, 71, 89]
    # min_frames lifts a short clip: 1 s at 1 fps -> 1 -> 4 frames
    assert len(sample_frame_indices(30, fps=1.0, video_fps=30.0)) == 4
    # max_frames caps a long one (and the result stays a multiple of temporal_patch)
    assert len(sample_frame_indices(100000, fps=2.0, video_fps=30.0)) == 768
    assert len(sample_frame_indices(100000, fps=2.0, video_fps=30.0, max_frames=99)) == 100 - 2
    # count 7 (odd) rounds half up to 8 with temporal_patch 2 ...
    assert len(sample_frame_indices(70, fps=3.0, video_fps=30.0, min_frames=1)) == 8
    # ... unless that exceeds the video: 7 frames -> 6
    assert len(sample_frame_indices(7, fps=30.0, video_fps=30.0)) == 6
    # shorter than one temporal patch: the frame repeats
    assert sample_frame_indices(1, fps=2.0, video_fps=30.0).tolist() == [0, 0]
    assert sample_frame_indices(1, fps=2.0, video_fps=30.0, temporal_patch=1).tolist() == [0]


def test_strategy_is_inferred():
    a = sample_frame_indices(300, fps=2.0, video_fps=30.0)
    b = sample_frame_indices(300, fps=2.0, video_fps=30.0, strategy="fps")
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(sample_frame_indices(300, n=5),
                                  sample_frame_indices(300, n=5, strategy="uniform"))


@pytest.mark.parametrize("kwargs,name", [
    (dict(num_frames=0, n=4), "num_frames"),
    (dict(num_frames=-3, n=4), "num_frames"),
    (dict(num_frames=10.0, n=4), "num_frames"),
    (dict(num_frames=True, n=4), "num_frames"),
    (dict(num_frames=10, n=0), "n"),
    (dict(num_frames=10, n=-1), "n"),
    (dict(num_frames=10, n=2.5), "n"),
    (dict(num_frames=10), "n"),                                     # nothing to sample by
    (dict(num_frames=10, fps=0.0, video_fps=30.0), "fps"),
    (dict(num_frames=10, fps=-1.0, video_fps=30.0), "fps"),
    (dict(num_frames=10, fps=float("nan"), video_fps=30.0), "fps"),
    (dict(num_frames=10, fps=float("inf"), video_fps=30.0), "fps"),
    (dict(num_frames=10, fps="2", video_fps=30.0), "fps"),
    (dict(num_frames=10, fps=2.0), "video_fps"),
    (dict(num_frames=10, fps=2.0, video_fps=0), "video_fps"),
    (dict(num_frames=10, n=4, strategy="fps", video_fps=30.0), "n"),
    (dict(num_frames=10, fps=2.0, video_fps=30.0, strategy="uniform"), "fps"),
    (dict(num_frames=10, n=4, strategy="random"), "strategy"),
    (dict(num_frames=10, fps=2.0, video_fps=30.0, min_frames=0), "min_frames"),
    (dict(num_frames=10, fps=2.0, video_fps=30.0, min_frames=8, max_frames=4), "max_frames"),
    (dict(num_frames=10, fps=2.0, video_fps=30.0, temporal_patch=0), "temporal_patch"),
])
def test_sample_frame_indices_errors_name_the_argument(kwargs, name):
    with pytest.raises(ArgumentError) as info:
        sample_frame_indices(**kwargs)
    msg = str(info.value)
    assert msg.startswith("[sample_frame_indices]") and f" {name} " in f" {msg} "
    assert isinstance(info.value, ValueError) and isinstance(info.value, MMCoreError)


# --------------------------------------------------------------------------------------------
# temporal_windows

def test_temporal_windows_examples():
    assert temporal_windows(10, window=4, stride=4).tolist() == \
        [[0, 1, 2, 3], [4, 5, 6, 7], [6, 7, 8, 9]]
    assert temporal_windows(8, window=4, stride=4).tolist() == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert temporal_windows(10, window=4, stride=2).tolist() == \
        [[0, 1, 2, 3], [2, 3, 4, 5], [4, 5, 6, 7], [6, 7, 8, 9]]
    assert temporal_windows(4, window=4, stride=3).tolist() == [[0, 1, 2, 3]]
    assert temporal_windows(3, window=5, stride=2).tolist() == [[0, 1, 2, 2, 2]]
    assert temporal_windows(1, window=3, stride=1).tolist() == [[0, 0, 0]]
    assert temporal_windows(20, window=2, stride=8).tolist() == \
        [[0, 1], [8, 9], [16, 17], [18, 19]]                       # stride > window skips


@pytest.mark.parametrize("num_frames", [1, 5, 16, 17, 33, 100])
@pytest.mark.parametrize("window,stride", [(1, 1), (4, 1), (8, 4), (8, 8), (16, 5), (3, 7)])
def test_temporal_windows_properties(num_frames, window, stride):
    w = temporal_windows(num_frames, window=window, stride=stride)
    assert w.dtype == np.int64 and w.ndim == 2 and w.shape[1] == window
    assert w.min() == 0 and w.max() == num_frames - 1
    if num_frames >= window:
        assert (np.diff(w, axis=1) == 1).all()                       # contiguous clips
        starts = w[:, 0]
        assert (np.diff(starts) > 0).all()
        regular = starts[: len(range(0, num_frames - window + 1, stride))]
        assert regular.tolist() == list(range(0, num_frames - window + 1, stride))
        assert w[-1, -1] == num_frames - 1                           # the end is covered
        if stride <= window:
            assert set(w.ravel().tolist()) == set(range(num_frames))
    else:
        assert w.shape[0] == 1


@pytest.mark.parametrize("kwargs,name", [
    (dict(num_frames=0, window=4, stride=1), "num_frames"),
    (dict(num_frames=10, window=0, stride=1), "window"),
    (dict(num_frames=10, window=4, stride=0), "stride"),
    (dict(num_frames=10, window=4.0, stride=1), "window"),
    (dict(num_frames=10, window=4, stride=None), "stride"),
])
def test_temporal_windows_errors(kwargs, name):
    with pytest.raises(ArgumentError, match=rf"\[temporal_windows\] {name} "):
        temporal_windows(**kwargs)


# --------------------------------------------------------------------------------------------
# arrays

def numbered_frames(n: int = 40, h: int = 6, w: int = 5) -> np.ndarray:
    return np.broadcast_to(np.arange(n, dtype=np.uint8)[:, None, None, None],
                           (n, h, w, 3)).copy()


def test_sample_video_array():
    v = numbered_frames(40)
    clip, ts = sample_video_array(v, n=4, video_fps=10.0)
    want = sample_frame_indices(40, n=4)
    assert clip.shape == (4, 6, 5, 3) and clip.flags.c_contiguous
    np.testing.assert_array_equal(clip[:, 0, 0, 0], want)
    np.testing.assert_allclose(ts, want / 10.0)
    clip, ts = sample_video_array(v, fps=2.0, video_fps=10.0)
    np.testing.assert_array_equal(clip[:, 0, 0, 0],
                                  sample_frame_indices(40, fps=2.0, video_fps=10.0))
    clip, ts = sample_video_array(v, n=3)
    assert ts is None
    clip, ts = sample_video_array(v)                     # no sampling: every frame
    np.testing.assert_array_equal(clip, v)


@pytest.mark.parametrize("frames,frag", [
    (np.zeros((4, 6, 5), np.uint8), "shape"),
    (np.zeros((4, 6, 5, 3), np.float32), "dtype"),
    (np.zeros((0, 6, 5, 3), np.uint8), "no frames"),
])
def test_sample_video_array_bad_frames(frames, frag):
    with pytest.raises(ShapeError, match=frag):
        sample_video_array(frames, n=2)


def test_sample_video_array_fps_needs_video_fps():
    with pytest.raises(ArgumentError, match="video_fps"):
        sample_video_array(numbered_frames(), fps=2.0)


# --------------------------------------------------------------------------------------------
# decoding with PyAV: test videos carry their frame index in two flat blocks

av = pytest.importorskip("av")


def has_encoder(name: str) -> bool:
    try:
        av.codec.Codec(name, "w")
    except Exception:
        return False
    return True


def frame_image(i: int, bg: np.ndarray) -> np.ndarray:
    """Frame ``i``: a fixed gradient with two flat blocks holding ``i % 16`` and ``i // 16``
    as gray levels ``16 * digit + 8`` (so codec loss of up to +-7 levels still decodes)."""
    a = bg.copy()
    h, w = a.shape[:2]
    a[h // 4: 3 * h // 4, w // 8: w // 2 - 4] = (i % 16) * 16 + 8
    a[h // 4: 3 * h // 4, w // 2 + 4: 7 * w // 8] = (i // 16) * 16 + 8
    return a


def frame_numbers(frames: np.ndarray) -> np.ndarray:
    h, w = frames.shape[1:3]
    lo = frames[:, 3 * h // 8: 5 * h // 8, 3 * w // 16: 7 * w // 16].mean(axis=(1, 2, 3))
    hi = frames[:, 3 * h // 8: 5 * h // 8, 9 * w // 16: 13 * w // 16].mean(axis=(1, 2, 3))
    return (np.round((hi - 8) / 16) * 16 + np.round((lo - 8) / 16)).astype(np.int64)


def write_video(path, codec: str, *, n: int = N_FRAMES, fps: int = FPS, gop: int = GOP,
                w: int = W, h: int = H) -> None:
    yy, xx = np.mgrid[0:h, 0:w]
    bg = np.stack([xx * 255 // w, yy * 255 // h, (xx + yy) * 255 // (w + h)], -1).astype(np.uint8)
    with av.open(str(path), "w") as c:
        s = c.add_stream(codec, rate=fps)
        s.width, s.height, s.pix_fmt = w, h, "yuv420p"
        s.codec_context.gop_size = gop
        if codec == "libx264":
            s.options = {"keyint": str(gop), "min-keyint": str(gop), "scenecut": "0",
                         "crf": "12"}
        elif codec == "mpeg4":
            s.options = {"g": str(gop), "qscale": "2"}
        else:
            s.options = {"g": str(gop)}
        for i in range(n):
            frame = av.VideoFrame.from_ndarray(frame_image(i, bg), format="rgb24")
            for packet in s.encode(frame):
                c.mux(packet)
        for packet in s.encode():
            c.mux(packet)


FORMATS = [("mp4", "libx264"), ("avi", "mpeg4"), ("mkv", "libx264"), ("webm", "libvpx-vp9")]


@pytest.fixture(scope="module")
def videos(tmp_path_factory):
    root = tmp_path_factory.mktemp("videos")
    out = {}
    for ext, codec in FORMATS:
        if has_encoder(codec):
            path = root / f"count_{codec}.{ext}"
            write_video(path, codec)
            out[(ext, codec)] = path
    if not out:
        pytest.skip("PyAV has none of the test encoders")
    return out


@pytest.fixture(scope="module")
def main_video(videos):
    for key in (("mp4", "libx264"), ("avi", "mpeg4")):
        if key in videos:
            return videos[key]
    return next(iter(videos.values()))


def test_test_videos_decode_to_their_numbers(videos):
    for path in videos.values():
        frames, ts = load_video(path)
        assert frames.shape == (N_FRAMES, H, W, 3) and frames.dtype == np.uint8
        np.testing.assert_array_equal(frame_numbers(frames), np.arange(N_FRAMES))
        np.testing.assert_allclose(ts, np.arange(N_FRAMES) / FPS, atol=1e-3)


def test_video_info(main_video):
    info = video_info(main_video)
    assert info["num_frames"] == N_FRAMES and info["fps"] == pytest.approx(FPS)
    assert (info["width"], info["height"]) == (W, H)
    assert info["duration"] == pytest.approx(N_FRAMES / FPS, abs=0.05)
    kf = info["keyframes"]
    assert info["num_frames_exact"] and kf[0] == 0 and max(np.diff(kf)) <= GOP
    # every decoded key frame is listed, at its index
    with av.open(str(main_video)) as c:
        want = [i for i, f in enumerate(c.decode(c.streams.video[0])) if f.key_frame]
    assert kf == want
    np.testing.assert_allclose(info["timestamps"], np.arange(N_FRAMES) / FPS, atol=1e-9)


@pytest.mark.parametrize("fmt", FORMATS, ids=lambda f: f"{f[0]}-{f[1]}")
@pytest.mark.parametrize("indices", [
    [0], [11], [12], [13], [89], [88, 89], [35, 36], [0, 5, 11, 12, 13, 50, 89],
    [89, 3, 3, 47], list(range(10, 90, 7)), [47, 83], [5, 40, 41, 42, 80],
])
def test_load_video_seeks_to_the_right_frames(videos, fmt, indices):
    if fmt not in videos:
        pytest.skip(f"no {fmt[1]} encoder")
    frames, ts, idx = load_video(videos[fmt], indices=indices, return_indices=True)
    assert frames.shape == (len(indices), H, W, 3) and frames.flags.c_contiguous
    np.testing.assert_array_equal(idx, indices)
    np.testing.assert_array_equal(frame_numbers(frames), indices)
    np.testing.assert_allclose(ts, np.asarray(indices) / FPS, atol=1e-3)


@pytest.mark.parametrize("n", [1, 4, 8, 32, 90, 120])
def test_load_video_uniform(main_video, n):
    frames, ts, idx = load_video(main_video, n=n, return_indices=True)
    want = sample_frame_indices(N_FRAMES, n=n)
    np.testing.assert_array_equal(idx, want)
    np.testing.assert_array_equal(frame_numbers(frames), want)
    np.testing.assert_allclose(ts, want / FPS, atol=1e-3)
    f2, t2 = load_video(main_video, n=n)
    np.testing.assert_array_equal(f2, frames)


def test_load_video_fps(main_video):
    frames, ts, idx = load_video(main_video, fps=2.0, return_indices=True)
    want = sample_frame_indices(N_FRAMES, fps=2.0, video_fps=FPS)
    assert want.tolist() == [0, 18, 36, 53, 71, 89]
    np.testing.assert_array_equal(idx, want)
    np.testing.assert_array_equal(frame_numbers(frames), want)
    np.testing.assert_allclose(ts, want / FPS, atol=1e-3)
    _, _, idx1 = load_video(main_video, fps=2.0, temporal_patch=4, min_frames=1,
                            return_indices=True)
    assert len(idx1) == 8


def test_sparse_reads_seek_instead_of_decoding_everything(main_video):
    with _VideoReader(main_video, max_threads=2, op="test") as r:
        frames, _ = r.read(np.array([5, 80]))
        np.testing.assert_array_equal(frame_numbers(frames), [5, 80])
        assert r.seeks == 2
        assert r.frames_decoded <= 2 * GOP + 8        # about one GOP per frame, not 81
    with _VideoReader(main_video, max_threads=2, op="test") as r:
        r.read(np.array([88]))
        assert r.frames_decoded <= GOP + 4


def test_dense_reads_decode_sequentially(main_video):
    with _VideoReader(main_video, max_threads=2, op="test") as r:
        frames, _ = r.read(np.arange(N_FRAMES))
        assert r.seeks == 1 and r.frames_decoded == N_FRAMES
    with _VideoReader(main_video, max_threads=1, op="test") as r:
        r.read(np.arange(3, 40, 2))                  # gaps of 2: never worth a seek
        assert r.seeks == 1


def test_matroska_reads_seek(videos):
    path = videos.get(("webm", "libvpx-vp9")) or videos.get(("mkv", "libx264"))
    if path is None:
        pytest.skip("no Matroska/WebM test video")
    with _VideoReader(path, max_threads=2, op="test") as r:
        frames, _ = r.read(np.array([0, 30, 60, 89]))
        np.testing.assert_array_equal(frame_numbers(frames), [0, 30, 60, 89])
        assert r.frames_decoded < N_FRAMES


def test_load_video_file_object(main_video):
    with open(main_video, "rb") as f:
        frames, ts = load_video(f, n=3)
    np.testing.assert_array_equal(frame_numbers(frames), sample_frame_indices(N_FRAMES, n=3))


def test_load_video_argument_errors(main_video):
    with pytest.raises(ShapeError, match="indices"):
        load_video(main_video, indices=[0, N_FRAMES])
    with pytest.raises(ShapeError, match="indices"):
        load_video(main_video, indices=[-1])
    with pytest.raises(ArgumentError, match="not both"):
        load_video(main_video, indices=[0], n=2)
    with pytest.raises(ArgumentError, match="max_threads"):
        load_video(main_video, n=2, max_threads=0)
    with pytest.raises(ArgumentError, match=r"\bn\b"):
        load_video(main_video, n=0)
    with pytest.raises(ArgumentError, match="path"):
        load_video(3.5)


# --------------------------------------------------------------------------------------------
# broken files: every error names the file

def test_missing_file_and_directory(tmp_path):
    with pytest.raises(VideoDecodeError, match="ghost.mp4"):
        load_video(tmp_path / "ghost.mp4", n=2)
    with pytest.raises(VideoDecodeError, match="directory"):
        load_video(tmp_path, n=2)


def test_random_bytes(tmp_path):
    path = tmp_path / "garbage_clip.mp4"
    path.write_bytes(np.random.default_rng(0).bytes(20000))
    with pytest.raises(VideoDecodeError, match="garbage_clip.mp4") as info:
        load_video(path, n=4)
    assert isinstance(info.value, MMCoreError) and isinstance(info.value, ValueError)


def test_text_file(tmp_path):
    path = tmp_path / "readme.mkv"
    path.write_text("not a video\n" * 100)
    with pytest.raises(VideoDecodeError, match="readme.mkv"):
        load_video(path)


def test_truncated_mp4(tmp_path, main_video):
    data = main_video.read_bytes()
    path = tmp_path / "half_clip" / "cut.mp4"
    path.parent.mkdir()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(VideoDecodeError, match="cut.mp4"):
        load_video(path, n=8)


def test_truncated_avi_names_the_file(tmp_path, videos):
    src = videos.get(("avi", "mpeg4"))
    if src is None:
        pytest.skip("no mpeg4 encoder")
    data = src.read_bytes()
    path = tmp_path / "cut_short.avi"
    path.write_bytes(data[: int(len(data) * 0.6)])      # the frame index at the end is gone
    # the frame index is made from the packets there are: the frames past the cut are not
    # in it, those before it decode to their own numbers
    count = video_info(path)["num_frames"]
    assert 30 < count < N_FRAMES
    with pytest.raises(ShapeError, match=rf"\[0, {count - 1}\]"):
        load_video(path, indices=[5, 85])
    frames, _ = load_video(path, indices=[5, count - 2])
    np.testing.assert_array_equal(frame_numbers(frames), [5, count - 2])
    path.write_bytes(data[:5000])
    with pytest.raises(VideoDecodeError, match="cut_short.avi"):
        load_video(path)


def test_audio_only_file_has_no_video_stream(tmp_path):
    path = tmp_path / "speech_only.mka"
    with av.open(str(path), "w") as c:
        s = c.add_stream("pcm_s16le", rate=8000)
        frame = av.AudioFrame.from_ndarray(np.zeros((1, 800), np.int16), format="s16",
                                           layout="mono")
        frame.sample_rate = 8000
        for packet in s.encode(frame):
            c.mux(packet)
        for packet in s.encode():
            c.mux(packet)
    with pytest.raises(VideoDecodeError, match="speech_only.mka.*no video stream"):
        load_video(path, n=2)


def test_zero_frame_video(tmp_path):
    if not has_encoder("mpeg4"):
        pytest.skip("no mpeg4 encoder")
    path = tmp_path / "empty_clip.avi"
    c = av.open(str(path), "w")
    s = c.add_stream("mpeg4", rate=30)
    s.width, s.height, s.pix_fmt = 64, 48, "yuv420p"
    c.start_encoding()
    c.close()
    with pytest.raises(VideoDecodeError, match="empty_clip.avi.*no frames"):
        load_video(path, n=2)
    # an MP4 with no samples keeps no video track at all
    path = tmp_path / "empty_clip.mp4"
    c = av.open(str(path), "w")
    s = c.add_stream("mpeg4", rate=30)
    s.width, s.height, s.pix_fmt = 64, 48, "yuv420p"
    c.start_encoding()
    c.close()
    with pytest.raises(VideoDecodeError, match="empty_clip.mp4"):
        load_video(path)


def test_missing_pyav_is_a_clear_import_error(monkeypatch, main_video):
    monkeypatch.setitem(sys.modules, "av", None)
    with pytest.raises(ImportError, match="pip install av"):
        load_video(main_video, n=2)


# --------------------------------------------------------------------------------------------
# config

def test_video_config_defaults_and_inference():
    cfg = PreprocessingConfig(modality="video")
    assert (cfg.sampling, cfg.num_frames, cfg.fps) == ("uniform", 8, None)
    assert (cfg.min_frames, cfg.max_frames, cfg.temporal_patch) == (4, 768, 2)
    assert cfg.preset == "clip" and cfg.size == 224
    with pytest.warns(DeprecationWarning, match="'padding' is not a field of 'video' configs"):
        assert cfg.padding == "none"
    cfg = PreprocessingConfig(modality="video", fps=2)
    assert (cfg.sampling, cfg.num_frames, cfg.fps) == ("fps", None, 2.0)
    d = cfg.to_dict()
    assert json.loads(json.dumps(d)) == d and PreprocessingConfig.from_dict(d) == cfg
    cfg = PreprocessingConfig(modality="video", num_frames=16, sampling="Uniform",
                              patch_size=14, temporal_patch=1)
    assert cfg.sampling == "uniform" and cfg.temporal_patch == 1


@pytest.mark.parametrize("kwargs,field", [
    (dict(num_frames=0), "num_frames"),
    (dict(num_frames=2.5), "num_frames"),
    (dict(fps=0.0), "fps"),
    (dict(fps=-2.0), "fps"),
    (dict(fps=float("inf")), "fps"),
    (dict(sampling="random"), "sampling"),
    (dict(sampling="fps"), "fps"),                        # fps strategy without fps
    (dict(sampling="uniform", num_frames=None), "num_frames"),
    (dict(fps=2.0, num_frames=8), "num_frames"),
    (dict(sampling="uniform", fps=2.0, num_frames=8), "fps"),
    (dict(min_frames=0), "min_frames"),
    (dict(max_frames=2), "max_frames"),                   # below min_frames=4
    (dict(temporal_patch=0), "temporal_patch"),
    (dict(size=0), "size"),
    (dict(max_length=16), "max_length"),                  # a text field
])
def test_video_config_bad_field_names_it(kwargs, field):
    with pytest.raises(ConfigError, match=rf"PreprocessingConfig\.{field}\b"):
        PreprocessingConfig(modality="video", **kwargs)


def test_other_modalities_reject_video_fields():
    for modality in ("audio", "image", "text"):
        for field, value in (("num_frames", 8), ("fps", 2.0), ("sampling", "fps"),
                             ("temporal_patch", 2)):
            with pytest.raises(ConfigError, match=rf"PreprocessingConfig\.{field} applies"):
                PreprocessingConfig(modality=modality, **{field: value})


# --------------------------------------------------------------------------------------------
# VideoPreprocessor

def test_preprocessor_rejects_other_configs():
    with pytest.raises(ConfigError, match="modality"):
        VideoPreprocessor(PreprocessingConfig(modality="image"))
    assert VideoPreprocessor({"num_frames": 4}).config.num_frames == 4


def test_preprocessor_bad_inputs():
    pre = VideoPreprocessor()
    with pytest.raises(ShapeError, match="frames"):
        pre(np.zeros((4, 8, 8), np.uint8))
    with pytest.raises(ArgumentError, match="video_fps"):
        VideoPreprocessor({"fps": 2.0})(numbered_frames(), video_fps=None)
    with pytest.raises(ArgumentError, match="video_fps"):
        pre(numbered_frames(), video_fps=-1)


@needs_preprocess_image
def test_preprocessor_array_matches_batched_op():
    rng = np.random.default_rng(1)
    video = rng.integers(0, 256, (40, 48, 64, 3), dtype=np.uint8)
    out = VideoPreprocessor({"num_frames": 4, "size": 32})(video, video_fps=10.0)
    want_idx = sample_frame_indices(40, n=4)
    np.testing.assert_array_equal(out["frame_indices"], want_idx)
    np.testing.assert_allclose(out["timestamps"], want_idx / 10.0)
    px = out["pixel_values"]
    assert px.dtype == np.float32 and px.shape == (4, 3, 32, 32)
    want = mmcore.ops.preprocess_image(video[want_idx], preset="clip", size=32)
    np.testing.assert_array_equal(px, want)
    out = VideoPreprocessor({"num_frames": 3})(video)
    assert out["timestamps"] is None and out["pixel_values"].shape == (3, 3, 224, 224)


@needs_preprocess_image
def test_preprocessor_file(main_video):
    out = VideoPreprocessor({"num_frames": 8, "preset": "siglip", "size": 64})(main_video)
    idx = sample_frame_indices(N_FRAMES, n=8)
    np.testing.assert_array_equal(out["frame_indices"], idx)
    np.testing.assert_allclose(out["timestamps"], idx / FPS, atol=1e-3)
    frames, _ = load_video(main_video, indices=idx)
    want = mmcore.ops.preprocess_image(frames, preset="siglip", size=64)
    assert out["pixel_values"].shape == (8, 3, 64, 64)
    np.testing.assert_array_equal(out["pixel_values"], want)
    out = VideoPreprocessor({"fps": 2.0, "size": 32})(main_video)
    assert out["frame_indices"].tolist() == [0, 18, 36, 53, 71, 89]
    assert out["pixel_values"].shape == (6, 3, 32, 32)


@needs_preprocess_image
@needs_patchify
def test_preprocessor_temporal_patches():
    rng = np.random.default_rng(2)
    video = rng.integers(0, 256, (30, 40, 40, 3), dtype=np.uint8)
    cfg = PreprocessingConfig(modality="video", num_frames=5, size=28, patch_size=14,
                              temporal_patch=2)
    out = VideoPreprocessor(cfg)(video, video_fps=30.0)
    idx = sample_frame_indices(30, n=5)
    # 5 frames padded to 6 by repeating the last one, as Qwen2-VL does
    assert out["frame_indices"].tolist() == idx.tolist() + [idx[-1]]
    px = mmcore.ops.preprocess_image(video[out["frame_indices"]], preset="clip", size=28)
    want = mmcore.ops.patchify(px, 14, temporal_patch=2)
    assert out["pixel_values"].shape == (3 * 2 * 2, 3 * 2 * 14 * 14)
    np.testing.assert_array_equal(out["pixel_values"], want)
    # temporal_patch 1: per-frame patches
    cfg = cfg.replace(temporal_patch=1)
    out = VideoPreprocessor(cfg)(video)
    assert out["pixel_values"].shape == (5, 4, 3 * 14 * 14)
