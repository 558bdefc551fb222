"""Exact frame seeking on every container: load_video's frames equal a plain PyAV decode of
the whole stream, frame for frame, on MP4 / Matroska / WebM / MPEG-TS (H.264 with B-frames,
MPEG-2, remuxed, non-zero start), variable frame rate, open GOPs and MP4 edit lists; and
video given as bytes / file objects."""

from __future__ import annotations

import io
import random
import zlib
from fractions import Fraction

import numpy as np
import pytest

from mmcore.errors import ArgumentError, ShapeError, VideoDecodeError
from mmcore.preprocess import VideoPreprocessor, load_video, sample_frame_indices, video_info
from mmcore.preprocess.video import _VideoReader

av = pytest.importorskip("av")

W, H = 64, 48
N = 72
GOP = 12
X264 = "keyint=12:min-keyint=12:scenecut=0:bframes=3:b-pyramid=normal"


def has_encoder(name: str) -> bool:
    return name in av.codec.codecs_available


def frame_image(i: int) -> np.ndarray:
    """Frame ``i``: two flat blocks holding ``i % 16`` and ``i // 16`` as gray levels
    ``16 * digit + 8`` on a background that changes with ``i``."""
    a = np.empty((H, W, 3), np.uint8)
    a[:] = (i * 37) % 200
    a[H // 4: 3 * H // 4, W // 8: W // 2 - 4] = (i % 16) * 16 + 8
    a[H // 4: 3 * H // 4, W // 2 + 4: 7 * W // 8] = (i // 16) * 16 + 8
    return a


def frame_numbers(frames: np.ndarray) -> np.ndarray:
    lo = frames[:, 3 * H // 8: 5 * H // 8, 3 * W // 16: 7 * W // 16].mean(axis=(1, 2, 3))
    hi = frames[:, 3 * H // 8: 5 * H // 8, 9 * W // 16: 13 * W // 16].mean(axis=(1, 2, 3))
    return (np.round((hi - 8) / 16) * 16 + np.round((lo - 8) / 16)).astype(np.int64)


def encode(path, codec: str, *, fmt=None, n: int = N, options=None, pts=None, time_base=None,
           max_b_frames=None) -> None:
    with av.open(str(path), "w", format=fmt) as c:
        s = c.add_stream(codec, rate=30)
        s.width, s.height, s.pix_fmt = W, H, "yuv420p"
        s.codec_context.gop_size = GOP
        if max_b_frames is not None:
            s.codec_context.max_b_frames = max_b_frames
        if time_base is not None:
            s.codec_context.time_base = time_base
        if options:
            s.options = options
        for i in range(n):
            f = av.VideoFrame.from_ndarray(frame_image(i), format="rgb24")
            if pts is not None:
                f.pts, f.time_base = pts[i], time_base
            for p in s.encode(f):
                c.mux(p)
        for p in s.encode():
            c.mux(p)


def remux(src, dst, *, shift_frames: float = 0.0, fmt=None) -> None:
    """Copy the video packets of ``src`` into ``dst``, timestamps moved by ``shift_frames``
    frames (negative: the first frames fall before 0, which MP4 keeps as an edit list)."""
    with av.open(str(src)) as i, av.open(str(dst), "w", format=fmt) as o:
        s = i.streams.video[0]
        out = o.add_stream_from_template(s)
        shift = int(round(shift_frames / 30 / s.time_base))
        for p in i.demux(s):
            if p.dts is None and p.pts is None:
                continue
            if p.pts is not None:
                p.pts += shift
            if p.dts is not None:
                p.dts += shift
            p.stream = out
            o.mux(p)


def vfr_pts(n: int, tick: int) -> list:
    rng = random.Random(5)
    steps = [rng.choice([1, 1, 2, 3, 5, 8]) for _ in range(n)]
    return [int(x) * tick for x in np.concatenate([[0], np.cumsum(steps[:-1])])]


def x264(p) -> None:
    encode(p, "libx264", options={"x264-params": X264})


CASES = {
    # name: (needed encoders, writer)
    "mp4-h264-bframes": (["libx264"], x264),
    "mkv-h264-bframes": (["libx264"], x264),
    "webm-vp9": (["libvpx-vp9"], lambda p: encode(p, "libvpx-vp9")),
    "webm-vp8": (["libvpx"], lambda p: encode(p, "libvpx", options={"auto-alt-ref": "1",
                                                                    "lag-in-frames": "16"})),
    "ts-h264-bframes": (["libx264"], x264),
    "ts-mpeg2": (["mpeg2video"], lambda p: encode(p, "mpeg2video", max_b_frames=2,
                                                  options={"b": "4M"})),
    "ts-h264-open-gop": (["libx264"], lambda p: encode(
        p, "libx264", options={"x264-params": X264 + ":open-gop=1"})),
    "mkv-h264-open-gop": (["libx264"], lambda p: encode(
        p, "libx264", options={"x264-params": X264 + ":open-gop=1"})),
    "mkv-hevc-open-gop": (["libx265"], lambda p: encode(p, "libx265", options={
        "x265-params": "keyint=12:min-keyint=12:bframes=3:open-gop=1:log-level=error"})),
    "ts-hevc-open-gop": (["libx265"], lambda p: encode(p, "libx265", options={
        "x265-params": "keyint=12:min-keyint=12:bframes=3:open-gop=1:log-level=error"})),
    "mp4-vfr": (["libx264"], lambda p: encode(p, "libx264", options={"x264-params": X264},
                                               pts=vfr_pts(N, 10), time_base=Fraction(1, 300))),
    "mkv-vfr": (["libx264"], lambda p: encode(p, "libx264", options={"x264-params": X264},
                                               pts=vfr_pts(N, 10), time_base=Fraction(1, 300))),
    "avi-mpeg4": (["mpeg4"], lambda p: encode(p, "mpeg4", options={"g": str(GOP), "qscale": "2"})),
    "h264-raw": (["libx264"], lambda p: encode(p, "libx264", fmt="h264", n=40,
                                               options={"x264-params": X264})),
}
REMUXED = {
    # name: (source case, shift in frames, container format)
    "ts-remuxed-from-mp4": ("mp4-h264-bframes", 0.0, "mpegts"),
    "mp4-edit-list-start-offset": ("mp4-h264-bframes", 30.0, None),
    "mp4-edit-list-cut": ("mp4-h264-bframes", -5.0, None),
    "mkv-remuxed-from-ts-mpeg2": ("ts-mpeg2", 0.0, None),
}
CUT = {
    # name: (source case, bytes dropped from the start: 188-byte TS packets, mid-GOP)
    "ts-h264-cut-mid-gop": ("ts-h264-bframes", 188 * 75),
    "ts-h264-open-gop-cut": ("ts-h264-open-gop", 188 * 40),
    "ts-mpeg2-cut-mid-gop": ("ts-mpeg2", 188 * 120),
}
EXT = {"mp4": "mp4", "mkv": "mkv", "webm": "webm", "ts": "ts", "avi": "avi", "h264": "h264"}


def decode_all(path):
    """Every frame by a plain PyAV decode, and their timestamps."""
    with av.open(str(path)) as c:
        st = c.streams.video[0]
        frames, pts = [], []
        for f in c.decode(st):
            frames.append(f.to_ndarray(format="rgb24"))
            pts.append(f.pts)
        return np.stack(frames), pts, Fraction(st.time_base)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("seek")
    out = {}
    for name, (encoders, write) in CASES.items():
        if all(has_encoder(e) for e in encoders):
            path = root / f"{name}.{EXT[name.split('-')[0]]}"
            write(path)
            out[name] = path
    for name, (src, shift, fmt) in REMUXED.items():
        if src in out:
            path = root / f"{name}.{EXT[name.split('-')[0]]}"
            remux(out[src], path, shift_frames=shift, fmt=fmt)
            out[name] = path
    for name, (src, cut) in CUT.items():
        if src in out:
            path = root / f"{name}.ts"
            path.write_bytes(out[src].read_bytes()[cut:])
            out[name] = path
    return out


ALL = list(CASES) + list(REMUXED) + list(CUT)


@pytest.fixture(scope="module")
def reference(files):
    return {name: decode_all(path) for name, path in files.items()}


def get(files, reference, name):
    if name not in files:
        pytest.skip(f"no encoder for {name}")
    return files[name], reference[name]


def test_the_test_files_are_what_they_claim(files, reference):
    def packets(name):
        with av.open(str(files[name])) as c:
            st = c.streams.video[0]
            return [(p.pts, p.dts, p.is_keyframe, p.is_discard) for p in c.demux(st) if p.size]
    for name in files:
        frames, pts, _ = reference[name]
        n = 40 if name == "h264-raw" else N
        # a plain decode gives back every encoded frame, in order (the numbers survive)
        if name in CUT:
            # a stream cut mid-GOP: what a plain decode can decode, up to the last frame
            nums = frame_numbers(frames)
            assert nums[-1] == N - 1 and 20 < len(nums) < N - GOP, name
            continue
        start = 5 if name == "mp4-edit-list-cut" else 0
        np.testing.assert_array_equal(frame_numbers(frames), np.arange(start, n), err_msg=name)
    if "mp4-h264-bframes" in files:
        pk = packets("mp4-h264-bframes")
        assert any(p[0] != p[1] for p in pk)                     # B-frames: pts != dts
    for name in ("ts-h264-bframes", "ts-mpeg2"):
        if name in files:
            assert reference[name][1][0] > 0                     # a non-zero start time
    for name in ("ts-h264-open-gop", "mkv-h264-open-gop", "mkv-hevc-open-gop", "ts-mpeg2"):
        if name in files:
            # open GOPs: pictures decoded after a key frame but shown before it
            pk = packets(name)
            assert any(q[0] < p[0] for i, p in enumerate(pk) if p[2] and i > 0
                       for q in pk[i + 1:i + 6]), name
    if "mp4-edit-list-cut" in files:
        assert sum(p[3] for p in packets("mp4-edit-list-cut")) == 5   # an edit list cut
    if "mp4-edit-list-start-offset" in files:
        assert reference["mp4-edit-list-start-offset"][1][0] > 0
    if "mp4-vfr" in files:
        d = np.diff(reference["mp4-vfr"][1])
        assert len(set(d.tolist())) > 3                           # variable frame rate
    if "h264-raw" in files:
        assert all(p[0] is None for p in packets("h264-raw"))    # no timestamps at all
    for name in CUT:
        if name in files:
            pk = packets(name)
            assert not pk[0][2]                                   # starts with no key frame
            assert len(pk) > len(reference[name][0])              # packets a decode drops


@pytest.mark.parametrize("name", ALL)
def test_every_frame_equals_a_plain_decode(files, reference, name):
    path, (ref, pts, tb) = get(files, reference, name)
    frames, ts, idx = load_video(path, return_indices=True)
    assert frames.shape == ref.shape
    np.testing.assert_array_equal(idx, np.arange(len(ref)))
    np.testing.assert_array_equal(frames, ref)
    if pts[0] is not None:
        want = np.asarray([float((p - pts[0]) * tb) for p in pts])
        np.testing.assert_allclose(ts, want, rtol=0, atol=1e-9)
    info = video_info(path)
    assert info["num_frames"] == len(ref) and info["num_frames_exact"]
    assert (info["width"], info["height"]) == (W, H)
    np.testing.assert_allclose(info["timestamps"], ts, rtol=0, atol=1e-12)


@pytest.mark.parametrize("name", ALL)
def test_random_subsets_first_last_and_range(files, reference, name):
    path, (ref, _, _) = get(files, reference, name)
    n = len(ref)
    rng = np.random.default_rng(zlib.crc32(name.encode()))
    subsets = [[0], [n - 1], [n - 1, 0], [0, n - 1, 0], [n // 2, n // 2 - 1, n // 2 + 1]]
    subsets += [rng.integers(0, n, int(rng.integers(1, 12))).tolist() for _ in range(8)]
    subsets += [sorted(rng.choice(n, 20, replace=False).tolist())]
    subsets += [list(range(k, n, GOP)) for k in (0, 5, GOP - 1)]
    for idx in subsets:
        frames, ts = load_video(path, indices=idx)
        assert frames.shape == (len(idx), H, W, 3) and frames.flags.c_contiguous
        np.testing.assert_array_equal(frames, ref[idx], err_msg=f"{name} indices={idx}")
    for bad in ([n], [0, n], [-1], [n + 50]):
        with pytest.raises(ShapeError, match=rf"\[0, {n - 1}\]"):
            load_video(path, indices=bad)


def on_screen_reference(pts, nominal):
    """The frame on screen at each nominal position, computed in fractions: time
    ``first + p * (last - first) / (N - 1)``, the last frame whose timestamp is at most that
    time plus one tick."""
    n = len(pts)
    out = []
    for p in nominal:
        t = pts[0] + Fraction(int(p) * (pts[-1] - pts[0]), n - 1)
        out.append(max(i for i in range(n) if pts[i] <= t + 1))
    return out


@pytest.mark.parametrize("name", ["mp4-vfr", "mkv-vfr", "ts-h264-bframes", "mkv-h264-bframes",
                                  "webm-vp9", "mp4-edit-list-start-offset"])
@pytest.mark.parametrize("fps", [1.0, 2.0, 7.5])
def test_fps_sampling_gives_the_frame_on_screen(files, reference, name, fps):
    path, (ref, pts, tb) = get(files, reference, name)
    frames, ts, idx = load_video(path, fps=fps, return_indices=True)
    info = video_info(path)
    nominal = sample_frame_indices(len(ref), fps=fps, video_fps=info["fps"])
    want = on_screen_reference(pts, nominal)
    np.testing.assert_array_equal(idx, want)
    np.testing.assert_array_equal(frames, ref[want])
    if "vfr" not in name:
        # constant frame rate: the on-screen frame is the nominal one
        np.testing.assert_array_equal(idx, nominal)
    else:
        # the sampled times span the video: the first and the last frame are included
        assert idx[0] == 0 and idx[-1] == len(ref) - 1
        span = (pts[-1] - pts[0]) * tb
        # the stream's average rate, or the frames' mean rate where they differ by > 1 %
        assert info["fps"] == pytest.approx((len(ref) - 1) / float(span), rel=0.01)


@pytest.mark.parametrize("name", ["mp4-vfr", "mkv-vfr"])
def test_vfr_uniform_is_by_index_and_every_frame_appears_once(files, reference, name):
    path, (ref, pts, _) = get(files, reference, name)
    frames, _, idx = load_video(path, n=10, return_indices=True)
    np.testing.assert_array_equal(idx, sample_frame_indices(len(ref), n=10))
    np.testing.assert_array_equal(frames, ref[idx])
    frames, _ = load_video(path)
    assert sorted(frame_numbers(frames).tolist()) == list(range(N))


@pytest.mark.parametrize("name", ["ts-h264-bframes", "mp4-h264-bframes", "mkv-vfr",
                                  "ts-mpeg2"])
def test_sparse_reads_seek_to_key_frames(files, reference, name):
    path, (ref, _, _) = get(files, reference, name)
    n = len(ref)
    with _VideoReader(path, max_threads=2, op="test") as r:
        frames, _ = r.read(np.array([n - 1]))
        np.testing.assert_array_equal(frames[0], ref[n - 1])
        assert r.frames_decoded <= 2 * GOP + 4        # one GOP (or two: open GOP), not n
    with _VideoReader(path, max_threads=2, op="test") as r:
        frames, _ = r.read(np.array([3, n // 2, n - 3]))
        np.testing.assert_array_equal(frames, ref[[3, n // 2, n - 3]])
        assert r.seeks == 3 and r.frames_decoded <= 5 * GOP


def test_dense_reads_decode_once(files, reference):
    path, (ref, _, _) = get(files, reference, "ts-h264-bframes")
    with _VideoReader(path, max_threads=2, op="test") as r:
        r.read(np.arange(len(ref)))
        assert r.seeks == 1 and r.frames_decoded == len(ref)
    with _VideoReader(path, max_threads=1, op="test") as r:
        r.read(np.arange(3, len(ref), 3))             # gaps of 3: never worth a seek
        assert r.seeks == 1


def test_a_frame_the_decoder_does_not_produce_raises_naming_it(files, reference, monkeypatch):
    import mmcore.preprocess._video_reader as R
    path, (ref, _, _) = get(files, reference, "mkv-h264-bframes")
    with _VideoReader(path, max_threads=1, op="test") as r:
        r.frame_pts[7] += 1
        monkeypatch.setattr(R, "REORDER_LIMIT", 8)
        with pytest.raises(VideoDecodeError, match=r"frame 7 of .* within 8 packets of its own"):
            r.read(np.array([7, 9]))
        monkeypatch.undo()
    with _VideoReader(path, max_threads=1, op="test") as r:
        r.frame_pts[7] += 1       # frame 7's timestamp no longer matches any decoded frame
        with pytest.raises(VideoDecodeError, match=rf"frame 7 of {N} could not be decoded"):
            r.read(np.array([2, 7, 9]))
    with _VideoReader(path, max_threads=1, op="test") as r:
        r.frame_pts[-1] += 1
        with pytest.raises(VideoDecodeError, match=rf"frame {N - 1} of {N} .*end of the stream"):
            r.read(np.array([N - 1]))


@pytest.mark.parametrize("kind", ["bytes", "bytearray", "memoryview", "file", "bytesio"])
@pytest.mark.parametrize("name", ["ts-h264-bframes", "mp4-vfr", "webm-vp9"])
def test_bytes_and_file_objects(files, reference, name, kind):
    path, (ref, _, _) = get(files, reference, name)
    data = path.read_bytes()
    idx = [len(ref) - 1, 0, 40, 40, 13]
    want_frames, want_ts = load_video(path, indices=idx)
    if kind == "file":
        with open(path, "rb") as f:
            frames, ts = load_video(f, indices=idx)
    else:
        src = {"bytes": data, "bytearray": bytearray(data), "memoryview": memoryview(data),
               "bytesio": io.BytesIO(data)}[kind]
        frames, ts = load_video(src, indices=idx)
    np.testing.assert_array_equal(frames, want_frames)
    np.testing.assert_array_equal(ts, want_ts)
    assert video_info(data)["num_frames"] == len(ref)


def test_bytes_are_data_not_a_file_name(files, tmp_path):
    if "mp4-h264-bframes" not in files:
        pytest.skip("no libx264")
    # the bytes of a file name are not a video
    with pytest.raises(VideoDecodeError, match=r"<bytes of \d+ bytes>.*not a video"):
        load_video(str(files["mp4-h264-bframes"]).encode(), n=2)
    with pytest.raises(VideoDecodeError, match="empty"):
        load_video(b"", n=2)
    with pytest.raises(VideoDecodeError, match="<bytearray of 5000 bytes>"):
        load_video(bytearray(5000), n=2)

    class Pipe(io.RawIOBase):
        def readable(self):
            return True

        def seekable(self):
            return False

    with pytest.raises(ArgumentError, match="not seekable"):
        load_video(Pipe(), n=2)


def test_preprocessor_takes_bytes(files):
    import mmcore
    if not hasattr(mmcore.ops, "preprocess_image"):
        pytest.skip("no mmcore.ops.preprocess_image")
    if "mkv-vfr" not in files:
        pytest.skip("no libx264")
    path = files["mkv-vfr"]
    pre = VideoPreprocessor({"fps": 2.0, "size": 32})
    a = pre(path.read_bytes())
    b = pre(path)
    np.testing.assert_array_equal(a["frame_indices"], b["frame_indices"])
    np.testing.assert_array_equal(a["pixel_values"], b["pixel_values"])
    frames, ts, idx = load_video(path, fps=2.0, return_indices=True)
    np.testing.assert_array_equal(a["frame_indices"], idx)
    np.testing.assert_array_equal(a["timestamps"], ts)


def test_packet_count_limit(files, monkeypatch):
    import mmcore.preprocess._video_reader as R
    if "mkv-h264-bframes" not in files:
        pytest.skip("no libx264")
    monkeypatch.setattr(R, "MAX_INDEX_PACKETS", 50)
    with pytest.raises(VideoDecodeError, match=r"mkv-h264-bframes.mkv.*more than 50 packets"):
        load_video(files["mkv-h264-bframes"], n=2)


@pytest.mark.parametrize("name", ["ts-h264-bframes", "mp4-h264-bframes", "mkv-vfr",
                                  "ts-h264-cut-mid-gop"])
def test_seeks_that_land_late_are_retried_then_read_from_the_start(files, reference, name,
                                                                    monkeypatch):
    from mmcore.preprocess._video_reader import VideoReader
    path, (ref, _, _) = get(files, reference, name)
    n = len(ref)
    # every seek goes to the end of the stream: each read falls back to opening it again
    monkeypatch.setattr(VideoReader, "_seek_ts", lambda self, pos: int(self._keys.max()))
    idx = [n - 1, 0, n // 2, n // 2]
    frames, _ = load_video(path, indices=idx)
    np.testing.assert_array_equal(frames, ref[idx])
