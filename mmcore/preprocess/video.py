"""Video frame sampling, decoding and batched preprocessing.

``sample_frame_indices``
    Which frames of a video to take: ``"uniform"`` (segment centres) or ``"fps"`` (a target
    frame rate with Qwen2-VL's limits). Pure integer arithmetic, no decoding.
``temporal_windows``
    Overlapping or strided clips of a fixed length, for clip-based video models.
``load_video`` / ``sample_video_array``
    Decode the sampled frames of a file with PyAV, seeking to the key frame before each needed
    frame instead of decoding the whole file; or sample an already decoded ``(T, H, W, 3)``
    array.
``VideoPreprocessor``
    Sampling + one batched ``mmcore.ops.preprocess_image`` call over the frames (+ optional
    temporal patchify), configured by a :class:`~mmcore.config.PreprocessingConfig`
    (``modality="video"``).

PyAV (``pip install "mmcore[video]"``) is imported on first use; only decoding files needs it.
"""

from __future__ import annotations

import bisect
import math
import os
from fractions import Fraction
from typing import (
    Any,
    Dict,
    Iterator,
    List,
    Literal,
    Mapping,
    Optional,
    Sequence,
    Tuple,
    Union,
    overload,
)

import numpy as np

from .. import ops
from .._files import check_regular
from ..config import PreprocessingConfig
from ..errors import ArgumentError, ConfigError, ShapeError, VideoDecodeError
from ..ops._checks import check_int, check_limit, check_rate
from .image import as_preprocessing_config, config_image_kwargs, preprocess_image_op

__all__ = ["sample_frame_indices", "temporal_windows", "load_video", "sample_video_array",
           "video_info", "VideoPreprocessor"]

PathLike = Union[str, bytes, "os.PathLike[str]"]


#: Cost of a seek in decoded frames (the seek, the flush and refilling the decoder's
#: pipeline): :func:`load_video` seeks only when that skips more frames than this.
SEEK_COST = 4

#: Default ``max_pixels`` of :func:`load_video`: the largest ``width * height`` of a frame,
#: 8192 x 4320 (DCI 8K, which also covers 7680 x 4320 UHD 8K).
MAX_VIDEO_FRAME_PIXELS = 8192 * 4320
#: Default ``max_bytes`` of :func:`load_video`: the largest size of the returned uint8 RGB
#: frames together, 8 GiB (768 frames of 1920 x 1080, or 345 of 3840 x 2160).
MAX_VIDEO_BYTES = 8 << 30
# FFmpeg's own max_pixels option is an int
_FFMPEG_MAX_PIXELS = 2 ** 31 - 1

#: The most decoder threads load_video / VideoPreprocessor take (``max_threads``).
MAX_DECODER_THREADS = 16

#: The FFmpeg demuxers load_video opens (FFmpeg's ``format_whitelist``): containers of one
#: file. Playlist and list demuxers (HLS ``.m3u8``, DASH, ``concat``) are left out on purpose:
#: they open the files a playlist names, so a file from a stranger could make the decoder read
#: other files of the machine.
DEMUXERS = ("mov,mp4,m4a,3gp,3g2,mj2,matroska,webm,avi,mpegts,mpeg,mpegvideo,flv,ogg,asf,"
            "h264,hevc,m4v,ivf,yuv4mpegpipe,gif,mjpeg,nut,dv,mxf,rawvideo")


from ..ops.video import STRATEGIES, sample_frame_indices, temporal_windows  # noqa: E402,F401

# --------------------------------------------------------------------------------------------
# arrays

def _check_frames(frames: Any, op: str) -> np.ndarray:
    arr = np.asarray(frames)
    if arr.dtype != np.uint8 or arr.ndim != 4 or arr.shape[3] != 3:
        raise ShapeError(f"[{op}] frames has shape {arr.shape} and dtype {arr.dtype}, expected "
                         "uint8 (T, H, W, 3) RGB frames")
    if arr.shape[0] == 0:
        raise ShapeError(f"[{op}] frames holds no frames (T = 0)")
    return arr


def _indices_for(op: str, num_frames: int, n, fps, video_fps, strategy, min_frames, max_frames,
                 temporal_patch) -> np.ndarray:
    if n is None and fps is None:
        return np.arange(num_frames, dtype=np.int64)
    return sample_frame_indices(num_frames, n=n, fps=fps, video_fps=video_fps,
                                strategy=strategy, min_frames=min_frames,
                                max_frames=max_frames, temporal_patch=temporal_patch)


def sample_video_array(frames: Any, *, n: Optional[int] = None, fps: Optional[float] = None,
                       video_fps: Optional[float] = None, strategy: Optional[str] = None,
                       min_frames: int = 4, max_frames: int = 768, temporal_patch: int = 2
                       ) -> Tuple[np.ndarray, Optional[np.ndarray]]:
    """Sample the frames of an already decoded video, like :func:`load_video` does a file.

    Parameters
    ----------
    frames : uint8 array (T, H, W, 3)
    n, fps, video_fps, strategy, min_frames, max_frames, temporal_patch
        As in :func:`sample_frame_indices` with ``num_frames = T``. With neither ``n`` nor
        ``fps`` every frame is kept.

    Returns
    -------
    frames : uint8 ndarray (count, H, W, 3)
        A new C-contiguous array (``frames[indices]``).
    timestamps : float64 ndarray (count,) or None
        ``indices / video_fps`` in seconds; None when ``video_fps`` is not given.

    Examples
    --------
    >>> import numpy as np
    >>> from mmcore.preprocess import sample_video_array
    >>> video = np.zeros((90, 4, 4, 3), np.uint8)
    >>> clip, ts = sample_video_array(video, n=3, video_fps=30.0)
    >>> clip.shape, ts.tolist()
    ((3, 4, 4, 3), [0.5, 1.5, 2.5])
    """
    op = "sample_video_array"
    arr = _check_frames(frames, op)
    video_fps = check_rate(op, "video_fps", video_fps, optional=True)
    idx = _indices_for(op, arr.shape[0], n, fps, video_fps, strategy, min_frames, max_frames,
                       temporal_patch)
    out = np.ascontiguousarray(arr[idx])
    ts = None if video_fps is None else idx.astype(np.float64) / video_fps
    return out, ts


# --------------------------------------------------------------------------------------------
# decoding

def _ffmpeg_max_pixels(limit: float) -> int:
    """FFmpeg's ``max_pixels`` option for our ``max_pixels`` limit: FFmpeg checks sizes with
    its padding (edges, alignment; several times the frame for tiny MPEG-4 frames), so it gets
    ``(sqrt(limit) + 512) ** 2``, the exact limit being checked by mmcore itself (the default
    8192 x 4320 gives FFmpeg 41.7 M pixels, still below an 8192 x 8192 frame's 67.1 M)."""
    return int(min((math.sqrt(limit) + 512.0) ** 2, _FFMPEG_MAX_PIXELS))


def _import_av():
    try:
        import av
    except ImportError as exc:
        raise ImportError("mmcore.preprocess.load_video needs PyAV: pip install av "
                          f"(or pip install \"mmcore[video]\"): {exc}") from exc
    return av


class _VideoReader:
    """One open video stream: metadata, and frames by index with seeking.

    Frame ``i`` is the frame presented at time ``i / average_rate`` after the stream's start:
    decoded frames are matched to indices by their presentation timestamps,
    ``round((pts - start_time) * time_base * fps)``.
    """

    def __init__(self, path: Any, *, max_threads: int, op: str,
                 max_pixels: float = math.inf, max_bytes: float = math.inf,
                 check_pixels: bool = True):
        av = _import_av()
        self.av = av
        self.op = op
        self.max_pixels = max_pixels
        self.max_bytes = max_bytes
        if isinstance(path, (str, bytes, os.PathLike)):
            fname = os.fsdecode(path)
            self.shown = repr(fname)
            # regular files only: a FIFO or a device would block FFmpeg or never end
            source: Any = check_regular(fname, what="video file", error=VideoDecodeError, op=op)
            self._path: Optional[str] = source
        elif hasattr(path, "read"):
            source = path
            self._path = None
            self.shown = repr(getattr(path, "name", None) or f"<{type(path).__name__}>")
        else:
            raise ArgumentError(f"[{op}] path must be a str, os.PathLike or a binary file object, "
                                f"got {type(path).__name__}")
        # FFmpeg's decoders refuse frames above max_pixels, also in the decoding that opening
        # a file may do to probe its streams (without this, an 8192 x 8192 H.264 frame is
        # decoded while the file is opened, before its size can be checked)
        self._ff_opts = ({} if math.isinf(max_pixels) else
                         {"max_pixels": str(_ffmpeg_max_pixels(max_pixels))})
        try:
            self.container = av.open(source, mode="r",
                                     options=dict(self._ff_opts, format_whitelist=DEMUXERS))
        except Exception as exc:  # av.FFmpegError subclasses, OSError, ValueError ...
            raise self._error(f"not a video file FFmpeg can open ({_describe(exc)})",
                              exc) from None
        try:
            self._setup(max_threads, check_pixels)
        except BaseException:
            self.close()
            raise

    # -- helpers --------------------------------------------------------------------------------
    def _error(self, msg: str, exc: Optional[BaseException] = None) -> VideoDecodeError:
        err = VideoDecodeError(f"[{self.op}] cannot decode video file {self.shown}: {msg}")
        if exc is not None:
            err.__cause__ = exc
        return err

    def close(self) -> None:
        c = getattr(self, "container", None)
        if c is not None:
            try:
                c.close()
            except Exception:  # pragma: no cover - closing a broken container
                pass
            self.container = None

    def __enter__(self) -> "_VideoReader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _limit_error(self, msg: str, name: str) -> VideoDecodeError:
        return VideoDecodeError(f"[{self.op}] video file {self.shown} {msg}, more than "
                                f"{name}={getattr(self, name):.0f} (pass {name}= a larger value, "
                                "or math.inf, to decode it anyway)")

    def check_pixels(self, width: int, height: int) -> None:
        """Refuse frames of more than ``max_pixels`` pixels."""
        if width * height > self.max_pixels:
            raise self._limit_error(f"has {width} x {height} = {width * height}-pixel frames",
                                    "max_pixels")

    def check_bytes(self, count: int, width: Optional[int] = None,
                    height: Optional[int] = None) -> None:
        """Refuse returning ``count`` uint8 RGB frames of more than ``max_bytes`` in all
        (frame size from the stream's header unless given)."""
        w = self.width if width is None else width
        h = self.height if height is None else height
        total = count * max(w * h, 1) * 3
        if total > self.max_bytes:
            raise self._limit_error(f"would decode to {count} frame(s) of {w} x {h} RGB = "
                                    f"{total} bytes", "max_bytes")

    def _setup(self, max_threads: int, check_pixels: bool) -> None:
        streams = self.container.streams.video
        if len(streams) == 0:
            raise self._error("it has no video stream")
        st = streams[0]
        self.stream = st
        cc = st.codec_context
        self.width, self.height = int(cc.width or 0), int(cc.height or 0)
        if (not self.width or not self.height) and self._ff_opts and self._path is not None:
            # FFmpeg forgets a size above its max_pixels option for some codecs (MPEG-4 part
            # 2): read it again with every frame skipped, so nothing is decoded
            self.width, self.height = self._probe_size()
        if check_pixels:
            # from the header, before any frame is decoded
            self.check_pixels(self.width, self.height)
        try:
            st.thread_type = "AUTO"
            cc.thread_count = max_threads
        except Exception:  # pragma: no cover - codecs without threading support
            pass
        if self._ff_opts:
            # and the decoder refuses larger frames in the stream (a mid-stream size change)
            try:
                cc.options = dict(cc.options or {}, **self._ff_opts)
            except Exception:  # pragma: no cover - a PyAV without codec options
                pass
        tb = st.time_base
        self.time_base = Fraction(tb) if tb else None
        rate = st.average_rate or st.guessed_rate or st.base_rate
        self.rate = Fraction(rate) if rate else None
        self.start = int(st.start_time) if st.start_time is not None else 0

        frames = int(st.frames or 0)
        self.exact_count = frames > 0
        if frames <= 0:
            frames = self._estimate_count()
        if frames <= 0:
            raise self._error("the video stream has no frames")
        self.num_frames = frames
        if self.rate is None or self.rate <= 0:
            dur = self._duration()
            if dur:
                self.rate = Fraction(frames) / Fraction(dur).limit_denominator(1 << 30)
        if self.rate is None or self.rate <= 0 or self.time_base is None:
            raise self._error("the video stream has no frame rate or time base")
        self.fps = float(self.rate)
        pos = self._keyframe_positions()
        self.index_complete = pos is not None
        self.known_keyframes: List[int] = list(pos or [])
        # key-frame spacing assumed until a wider one is seen (without a complete index)
        self.gop = max(12, int(round(self.fps)))
        self.frames_decoded = 0   # statistics of read(): frames decoded and seeks made
        self.seeks = 0

    def _probe_size(self) -> Tuple[int, int]:
        """(width, height) of the first video stream, opening the file again with the
        decoder skipping every frame; (0, 0) when unknown."""
        try:
            with self.av.open(self._path, mode="r", options={"skip_frame": "all",
                                                                "format_whitelist": DEMUXERS}) as c:
                cc = c.streams.video[0].codec_context
                return int(cc.width or 0), int(cc.height or 0)
        except Exception:  # the first open worked; a failure here leaves the size unknown
            return 0, 0

    def _duration(self) -> Optional[float]:
        st = self.stream
        if st.duration and self.time_base:
            return float(st.duration * self.time_base)
        if self.container.duration:
            return self.container.duration / 1_000_000
        return None

    def _estimate_count(self) -> int:
        """Frames from duration * rate, else by counting the stream's packets."""
        dur = self._duration()
        if dur and self.rate:
            return int(math.floor(dur * float(self.rate) + 0.5))
        count = 0
        try:
            for packet in self.container.demux(self.stream):
                if packet.size:
                    count += 1
            # (reading always starts with a seek, so the position is not restored here)
        except Exception as exc:
            raise self._error(f"reading its packets failed ({_describe(exc)})", exc) from None
        return count

    def _keyframe_positions(self) -> Optional[List[int]]:
        """Frame indices of the key frames from the container's index, or None if unknown.

        A complete index (one entry per frame: MP4/MOV, AVI) gives exact positions in decode
        order; a sparse one (Matroska cues) is mapped through its timestamps.
        """
        entries = getattr(self.stream, "index_entries", None)
        if entries is None:
            return None
        try:
            n = len(entries)
            if n == 0:
                return None
            if n == self.num_frames:
                pos = [i for i, e in enumerate(entries) if e.is_keyframe]
            elif n > 1:
                pos = sorted({self._index_of_pts(e.timestamp) for e in entries if e.is_keyframe})
            else:
                return None
        except Exception:  # pragma: no cover - an index PyAV cannot read
            return None
        return pos or None

    def _index_of_pts(self, pts: int) -> int:
        assert self.time_base is not None and self.rate is not None  # _setup checked both
        return int(math.floor(float((pts - self.start) * self.time_base * self.rate) + 0.5))

    def _pts_of_index(self, i: int) -> int:
        assert self.time_base is not None and self.rate is not None  # _setup checked both
        return self.start + int(math.floor(Fraction(i) / self.rate / self.time_base))

    def _should_seek(self, last: Optional[int], t: int) -> bool:
        """Whether to seek for frame ``t`` when frame ``last`` was decoded last.

        Going on costs ``t - last`` decoded frames; seeking costs ``t - kf`` (``kf``: the key
        frame at or before ``t``) plus about :data:`SEEK_COST` frames for the seek and the
        decoder's pipeline, so seeking pays off when ``kf > last + SEEK_COST``.
        """
        if last is None:
            return True
        if t - last <= SEEK_COST:
            return False
        known = self.known_keyframes
        k = bisect.bisect_right(known, t) - 1
        if k >= 0 and known[k] > last + SEEK_COST:
            return True
        if self.index_complete:
            return False
        # no complete index: past the widest key-frame spacing there must be a key frame
        return t - last > self.gop

    def _note_keyframe(self, i: int, continuous: bool) -> None:
        known = self.known_keyframes
        k = bisect.bisect_left(known, i)
        if k < len(known) and known[k] == i:
            return
        if continuous and k > 0:
            self.gop = max(self.gop, i - known[k - 1])
        known.insert(k, i)

    def _seek(self, i: int) -> None:
        pts = self._pts_of_index(max(i, 0))
        self.container.seek(pts, backward=True, any_frame=False, stream=self.stream)
        self.seeks += 1
        if not self.index_complete and self.seeks == 1:
            # some demuxers (Matroska cues) load their index on the first seek
            pos = self._keyframe_positions()
            if pos:
                for kf in pos:
                    self._note_keyframe(kf, False)
                self.index_complete = True

    def _decode(self) -> Iterator[Tuple[int, Any]]:
        """Frames from the current position, as (index, frame), noting key frames."""
        first = True
        for frame in self.container.decode(self.stream):
            i = self._frame_index(frame)
            if frame.key_frame:
                self._note_keyframe(i, not first)
            first = False
            yield i, frame

    # -- reading --------------------------------------------------------------------------------
    def read(self, indices: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
        """uint8 (len(indices), H, W, 3) RGB frames and their timestamps in seconds."""
        # the result's size from the header, before decoding
        self.check_bytes(len(indices))
        self._count = len(indices)
        uniq, inverse = np.unique(indices, return_inverse=True)
        try:
            frames, times = self._read_sorted([int(i) for i in uniq])
        except VideoDecodeError:
            raise
        except Exception as exc:  # av.FFmpegError (InvalidDataError, ...), OSError, ValueError
            ff_error = isinstance(exc, self.av.error.FFmpegError)
            if isinstance(exc, MemoryError) and not ff_error:
                raise
            hint = ""
            if self._ff_opts and ff_error and isinstance(exc, (ValueError, MemoryError)):
                # FFmpeg's decoder refuses frames above its max_pixels with EINVAL or ENOMEM
                hint = (f"; frames of more than max_pixels={self.max_pixels:.0f} pixels are "
                        "refused (pass max_pixels= a larger value, or math.inf, to decode "
                        "them anyway)")
            raise self._error(f"decoding failed ({_describe(exc)}){hint}", exc) from None
        if len(uniq) == len(indices) and np.array_equal(uniq, indices):
            return frames, times
        return np.ascontiguousarray(frames[inverse.ravel()]), times[inverse.ravel()]

    def _seek_before(self, t: int, last: Optional[Tuple[int, Any]]
                     ) -> Tuple[Iterator[Tuple[int, Any]], Optional[Tuple[int, Any]]]:
        """Seek so that decoding starts at or before frame ``t``; returns the iterator and
        its first (index, frame), or None at the end of the stream."""
        back = 0
        while True:
            self._seek(t - back)
            it = self._decode()
            first = next(it, None)
            if first is None or first[0] <= t or t - back <= 0:
                break
            # landed after the target (some indexes time key frames by decode time, which
            # leads presentation): seek further back
            back = max(2 * back, self.gop)
        if first is not None and last is not None and first[0] <= last[0]:
            # the seek went back to a key frame already passed: key frames are at least
            # this far apart
            self.gop = max(self.gop, t - first[0])
        return it, first

    def _read_sorted(self, targets: List[int]) -> Tuple[np.ndarray, np.ndarray]:
        out: Optional[np.ndarray] = None
        times = np.zeros(len(targets), np.float64)
        shape: Optional[Tuple[int, int]] = None
        it: Iterator[Tuple[int, Any]] = iter(())   # (index, frame) iterator since the last seek
        last: Optional[Tuple[int, Any]] = None     # (index, frame) decoded last
        # frames that may be missing at the end before the stream counts as truncated
        tol = max(2, self.num_frames // 50) if self.exact_count else self.num_frames

        def store(k: int, frame) -> None:
            nonlocal out, shape
            if shape is None:
                shape = (frame.height, frame.width)
                # the decoded size may differ from the header's
                self.check_pixels(frame.width, frame.height)
                self.check_bytes(max(self._count, len(targets)), frame.width, frame.height)
            if (frame.height, frame.width) != shape:
                img = frame.to_ndarray(format="rgb24", width=shape[1], height=shape[0])
            else:
                img = frame.to_ndarray(format="rgb24")
            if out is None:
                out = np.empty((len(targets),) + img.shape, np.uint8)
            out[k] = img
            pts = frame.pts if frame.pts is not None else self._pts_of_index(targets[k])
            assert self.time_base is not None  # _setup checked it
            times[k] = float((pts - self.start) * self.time_base)

        for k, t in enumerate(targets):
            if last is not None and last[0] >= t:
                store(k, last[1])     # irregular timestamps: the frame already decoded
                continue
            found: Optional[Tuple[int, Any]] = None
            if self._should_seek(last[0] if last else None, t):
                it, first = self._seek_before(t, last)
                if first is not None:
                    last = first
                    if first[0] >= t:
                        found = first
            if found is None:
                for item in it:
                    last = item
                    if item[0] >= t:
                        found = item
                        break
            if found is None:
                # end of the stream before frame t
                if last is None:
                    raise self._error(f"no frame could be decoded (frame {t} requested)")
                if t - last[0] > tol:
                    raise self._error(
                        f"truncated or corrupt: the stream declares {self.num_frames} frames "
                        f"but decoding ended at frame {last[0]} (frame {t} requested)")
                found = last
            store(k, found[1])
        assert out is not None
        return out, times

    def _frame_index(self, frame) -> int:
        self.frames_decoded += 1
        pts = frame.pts
        if pts is None:
            pts = frame.dts
        if pts is None:
            raise self._error("its frames carry no timestamps")
        return self._index_of_pts(pts)


def _describe(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _video_indices(reader: _VideoReader, n, fps, strategy, min_frames, max_frames,
                   temporal_patch, indices) -> np.ndarray:
    op = reader.op
    if indices is None and n is None and fps is None:
        # every frame: refuse a frame count too large to return before making its indices
        reader.check_bytes(reader.num_frames)
    if indices is not None:
        if n is not None or fps is not None:
            raise ArgumentError(f"[{op}] give indices or n/fps, not both")
        idx = np.asarray(indices)
        if idx.ndim != 1 or idx.size == 0 or not np.issubdtype(idx.dtype, np.integer):
            raise ShapeError(f"[{op}] indices must be a non-empty 1-D integer array, got shape "
                             f"{idx.shape} and dtype {idx.dtype}")
        if idx.min() < 0 or idx.max() >= reader.num_frames:
            raise ShapeError(f"[{op}] indices must lie in [0, {reader.num_frames - 1}] (the "
                             f"video has {reader.num_frames} frames), got {int(idx.min())}.."
                             f"{int(idx.max())}")
        return idx.astype(np.int64)
    return _indices_for(op, reader.num_frames, n, fps, reader.fps, strategy, min_frames,
                        max_frames, temporal_patch)


def video_info(path: Any) -> Dict[str, Any]:
    """Stream metadata of a video file, without decoding frames.

    Returns
    -------
    dict
        ``num_frames`` (from the container, else estimated from duration * fps, else counted
        from packets), ``num_frames_exact`` (whether the container declared it), ``fps``
        (average frame rate), ``width``, ``height``, ``duration`` (seconds, or None),
        ``codec``, ``keyframes`` (frame indices of key frames from the container's index, or
        None when it has none).

    Raises
    ------
    VideoDecodeError
        As :func:`load_video`.
    """
    # the frames are not decoded, so their size is reported, not checked (but opening
    # the file decodes no frame above the default max_pixels)
    with _VideoReader(path, max_threads=1, op="video_info", max_pixels=MAX_VIDEO_FRAME_PIXELS,
                      check_pixels=False) as r:
        return {"num_frames": r.num_frames, "num_frames_exact": r.exact_count, "fps": r.fps,
                "width": r.stream.codec_context.width, "height": r.stream.codec_context.height,
                "duration": r._duration(), "codec": r.stream.codec_context.name,
                "keyframes": list(r.known_keyframes) if r.index_complete else None}


# ``(frames, timestamps)``, or with return_indices=True ``(frames, timestamps, indices)``.
@overload
def load_video(path: Any, *, n: Optional[int] = None, fps: Optional[float] = None,
               strategy: Optional[str] = None, min_frames: int = 4, max_frames: int = 768,
               temporal_patch: int = 2, indices: Optional[Sequence[int]] = None,
               max_threads: int = 2, return_indices: Literal[False] = False,
               max_pixels: Optional[float] = None,
               max_bytes: Optional[float] = None) -> Tuple[np.ndarray, np.ndarray]: ...
@overload
def load_video(path: Any, *, n: Optional[int] = None, fps: Optional[float] = None,
               strategy: Optional[str] = None, min_frames: int = 4, max_frames: int = 768,
               temporal_patch: int = 2, indices: Optional[Sequence[int]] = None,
               max_threads: int = 2, return_indices: Literal[True],
               max_pixels: Optional[float] = None,
               max_bytes: Optional[float] = None) -> Tuple[np.ndarray, np.ndarray, np.ndarray]: ...
@overload
def load_video(path: Any, *, n: Optional[int] = None, fps: Optional[float] = None,
               strategy: Optional[str] = None, min_frames: int = 4, max_frames: int = 768,
               temporal_patch: int = 2, indices: Optional[Sequence[int]] = None,
               max_threads: int = 2, return_indices: bool = False,
               max_pixels: Optional[float] = None, max_bytes: Optional[float] = None
               ) -> Union[Tuple[np.ndarray, np.ndarray], Tuple[np.ndarray, np.ndarray, np.ndarray]]:
    ...
def load_video(path: Any, *, n: Optional[int] = None, fps: Optional[float] = None,
               strategy: Optional[str] = None, min_frames: int = 4, max_frames: int = 768,
               temporal_patch: int = 2, indices: Optional[Sequence[int]] = None,
               max_threads: int = 2, return_indices: bool = False,
               max_pixels: Optional[float] = None, max_bytes: Optional[float] = None
               ) -> Union[Tuple[np.ndarray, np.ndarray], Tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Decode the sampled frames of a video file with PyAV.

    Parameters
    ----------
    path : str, os.PathLike or binary file object
        Any container/codec the FFmpeg inside PyAV reads (MP4, MKV, WebM, AVI, ...). The first
        video stream is used. A path must name a regular file: FIFOs, devices and
        directories are refused without being opened.
    n, fps, strategy, min_frames, max_frames, temporal_patch
        Frame sampling, as in :func:`sample_frame_indices` with the stream's frame count and
        average frame rate. With neither ``n`` nor ``fps`` (nor ``indices``) every frame is
        decoded.
    indices : sequence of int, optional
        Explicit frame indices instead (any order, repeats allowed).
    max_threads : int, default 2
        Decoder threads (``codec_context.thread_count``, ``thread_type="AUTO"``), at most
        :data:`MAX_DECODER_THREADS` (16, FFmpeg's own cap for most decoders): each one holds
        its own decoder state.
    return_indices : bool, default False
        Also return the frame indices.
    max_pixels : int, math.inf or None, default None
        Largest accepted frame ``width * height``, checked from the stream's header before any
        frame is decoded (and given to FFmpeg's decoder as its ``max_pixels`` option, so that
        neither opening the file nor a frame that changes size mid-stream decodes a larger
        one). None uses :data:`MAX_VIDEO_FRAME_PIXELS` (8192 x 4320); ``math.inf`` disables
        the check.
    max_bytes : int, math.inf or None, default None
        Largest accepted size of the returned frames together (``T * H * W * 3`` bytes),
        checked from the header and the number of frames sampled before decoding. None uses
        :data:`MAX_VIDEO_BYTES` (8 GiB); ``math.inf`` disables the check.

    Returns
    -------
    frames : uint8 ndarray (T, H, W, 3)
        RGB frames (converted by FFmpeg's swscale), in the order of the indices.
    timestamps : float64 ndarray (T,)
        Presentation time of each returned frame in seconds from the stream's start (for a
        constant frame rate, ``index / fps``).
    indices : int64 ndarray (T,)
        Only with ``return_indices=True``.

    Notes
    -----
    Frame ``i`` is the frame shown at ``i / average_rate`` seconds: decoded frames are
    matched to indices through their timestamps, so seeking returns the same frames a full
    decode would. The frame count comes from the container; when it does not declare one, it
    is estimated as ``duration * fps`` (rounded), or counted from the stream's packets.

    Seeking: the needed frames are read in increasing order. For each, when the decoder can
    get there without passing a key frame (per the container's index, e.g. MP4/AVI; without
    an index, when the gap is at most the widest key-frame spacing seen so far and at least
    ``max(12, fps)`` frames) it keeps decoding forward; otherwise it seeks
    (``container.seek(pts, backward=True, any_frame=False, stream=stream)``) to the key frame
    before the target and decodes forward from there. Sparse samples of a long video therefore
    decode about one GOP per frame, dense ones decode sequentially without re-seeking.

    Raises
    ------
    VideoDecodeError
        If the file does not exist, is not a regular file (a directory, FIFO or device), is
        not a video FFmpeg can open, has no video stream, has no frames, has frames larger
        than ``max_pixels`` or would decode to more than ``max_bytes``, or decoding fails
        (corrupt data, or a stream that ends well before the frame count it declares). The
        message names the file (and the limit, with how to raise it).
    ArgumentError
        For bad sampling arguments, ``max_threads``, ``max_pixels`` or ``max_bytes`` (naming
        them).
    ShapeError
        For ``indices`` that are not a non-empty 1-D integer array within the stream.
    ImportError
        When PyAV is not installed.

    Examples
    --------
    >>> import os, tempfile, numpy as np, av
    >>> from mmcore.preprocess import load_video
    >>> path = os.path.join(tempfile.mkdtemp(), "clip.mp4")
    >>> with av.open(path, "w") as c:
    ...     s = c.add_stream("mpeg4", rate=30)
    ...     s.width, s.height, s.pix_fmt = 64, 48, "yuv420p"
    ...     for i in range(60):
    ...         f = av.VideoFrame.from_ndarray(np.full((48, 64, 3), 4 * i, np.uint8), "rgb24")
    ...         c.mux(s.encode(f))
    ...     c.mux(s.encode())
    >>> frames, ts = load_video(path, n=4)
    >>> frames.shape, ts.round(3).tolist()
    ((4, 48, 64, 3), [0.233, 0.733, 1.233, 1.733])
    """
    op = "load_video"
    max_threads = check_int("max_threads", max_threads, op=op, lo=1, hi=MAX_DECODER_THREADS)
    max_pixels = check_limit("max_pixels", max_pixels, op=op, default=MAX_VIDEO_FRAME_PIXELS)
    max_bytes = check_limit("max_bytes", max_bytes, op=op, default=MAX_VIDEO_BYTES)
    with _VideoReader(path, max_threads=max_threads, op=op, max_pixels=max_pixels,
                      max_bytes=max_bytes) as reader:
        idx = _video_indices(reader, n, fps, strategy, min_frames, max_frames, temporal_patch,
                             indices)
        frames, times = reader.read(idx)
    if return_indices:
        return frames, times, idx
    return frames, times


# --------------------------------------------------------------------------------------------
# batched preprocessing

class VideoPreprocessor:
    """Sample a video's frames and preprocess them in one batched op call.

    Parameters
    ----------
    config : PreprocessingConfig, mapping or None
        The video settings (``modality="video"``; a mapping is passed to
        :meth:`PreprocessingConfig.from_dict` with that modality filled in; None: 8 uniformly
        sampled frames, CLIP preprocessing at 224).
    max_threads : int, default 2
        Decoder threads for files.
    max_pixels, max_bytes : int, math.inf or None, default None
        Passed to :func:`load_video`'s decoding for files (None: its defaults, 8192 x 4320
        pixels per frame and 8 GiB of decoded frames); kept as attributes of the same names.

    Call
    ----
    ``preprocessor(video, *, video_fps=None)`` where ``video`` is a file path (decoded with
    :func:`load_video`, seeking to the sampled frames) or a uint8 ``(T, H, W, 3)`` array of
    decoded frames (sampled with :func:`sample_frame_indices`; ``video_fps`` is then the
    array's frame rate, required by ``sampling="fps"`` and for timestamps).

    Frames are sampled per the config (``num_frames`` uniform, or ``fps`` with ``min_frames``
    / ``max_frames`` / ``temporal_patch``), then ``mmcore.ops.preprocess_image`` runs ONCE on
    the ``(T, H, W, 3)`` stack of sampled frames with the config's image fields, giving
    ``(T, 3, S, S)``. With ``patch_size`` set, the frame count is first made a multiple of
    ``temporal_patch`` by repeating the last sampled frame (as Qwen2-VL does), and the result
    is patchified with ``mmcore.ops.patchify(x, patch_size, temporal_patch=temporal_patch)``.

    Returns
    -------
    dict
        ``"pixel_values"``: float32 ``(T, 3, S, S)``, or the patches;
        ``"frame_indices"``: int64 ``(T,)``, the source frame of each row (repeats included);
        ``"timestamps"``: float64 ``(T,)`` seconds, or None for an array without
        ``video_fps``.

    Examples
    --------
    >>> import numpy as np, mmcore
    >>> from mmcore.preprocess import VideoPreprocessor
    >>> video = np.zeros((90, 48, 64, 3), np.uint8)
    >>> if hasattr(mmcore.ops, "preprocess_image"):
    ...     out = VideoPreprocessor({"num_frames": 4})(video, video_fps=30.0)
    ...     assert out["pixel_values"].shape == (4, 3, 224, 224)
    ...     assert out["frame_indices"].tolist() == [11, 33, 56, 78]
    """

    def __init__(self, config: Union[PreprocessingConfig, Mapping[str, Any], None] = None, *,
                 max_threads: int = 2, max_pixels: Optional[float] = None,
                 max_bytes: Optional[float] = None):
        self.config = as_preprocessing_config(config, "video", "VideoPreprocessor")
        self.max_threads = check_int("max_threads", max_threads, op="VideoPreprocessor", lo=1,
                                     hi=MAX_DECODER_THREADS)
        check_limit("max_pixels", max_pixels, op="VideoPreprocessor",
                    default=MAX_VIDEO_FRAME_PIXELS)
        check_limit("max_bytes", max_bytes, op="VideoPreprocessor", default=MAX_VIDEO_BYTES)
        self.max_pixels = max_pixels
        self.max_bytes = max_bytes

    def __repr__(self) -> str:
        return f"VideoPreprocessor({self.config!r})"

    def _sample(self, num_frames: int, video_fps: Optional[float]) -> np.ndarray:
        cfg = self.config
        op = "VideoPreprocessor"
        if cfg.sampling == "fps" and video_fps is None:
            raise ArgumentError(f"[{op}] sampling='fps' needs the video's frame rate: pass "
                                "video_fps= with an array of frames")
        idx = sample_frame_indices(num_frames, n=cfg.num_frames, fps=cfg.fps,
                                   video_fps=video_fps, strategy=cfg.sampling,
                                   min_frames=cfg.min_frames, max_frames=cfg.max_frames,
                                   temporal_patch=cfg.temporal_patch)
        tp = cfg.temporal_patch
        if cfg.patch_size is not None and tp > 1 and len(idx) % tp:
            pad = tp - len(idx) % tp
            idx = np.concatenate([idx, np.full(pad, idx[-1], np.int64)])
        return idx

    def __call__(self, video: Any, *, video_fps: Optional[float] = None) -> Dict[str, Any]:
        """``{"pixel_values", "frame_indices", "timestamps"}`` (see the class docstring)."""
        op = "VideoPreprocessor"
        video_fps = check_rate(op, "video_fps", video_fps, optional=True)
        fn = preprocess_image_op()
        times: Optional[np.ndarray]
        if isinstance(video, (str, bytes, os.PathLike)) or hasattr(video, "read"):
            max_pixels = check_limit("max_pixels", self.max_pixels, op=op,
                                     default=MAX_VIDEO_FRAME_PIXELS)
            max_bytes = check_limit("max_bytes", self.max_bytes, op=op, default=MAX_VIDEO_BYTES)
            with _VideoReader(video, max_threads=self.max_threads, op=op, max_pixels=max_pixels,
                              max_bytes=max_bytes) as reader:
                idx = self._sample(reader.num_frames, reader.fps)
                frames, times = reader.read(idx)
        else:
            arr = _check_frames(video, op)
            idx = self._sample(arr.shape[0], video_fps)
            frames = np.ascontiguousarray(arr[idx])
            times = None if video_fps is None else idx.astype(np.float64) / video_fps
        cfg = self.config
        kw = config_image_kwargs(cfg)
        patch = kw.pop("patch_size", None)
        pixels = fn(frames, **kw)
        if patch is not None:
            patchify = getattr(ops, "patchify", None)
            if patchify is None:
                raise ConfigError("VideoPreprocessor: this mmcore build has no mmcore.ops.patchify")
            pixels = patchify(pixels, patch, temporal_patch=cfg.temporal_patch)
        return {"pixel_values": np.asarray(pixels, dtype=np.float32), "frame_indices": idx,
                "timestamps": times}
