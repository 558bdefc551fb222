"""Video frame sampling, decoding and batched preprocessing.

``sample_frame_indices``
    Which frames of a video to take: ``"uniform"`` (segment centres) or ``"fps"`` (a target
    frame rate with Qwen2-VL's limits). Pure integer arithmetic, no decoding.
``temporal_windows``
    Overlapping or strided clips of a fixed length, for clip-based video models.
``load_video`` / ``sample_video_array``
    Decode the sampled frames of a video (a path, encoded bytes or a file object) with PyAV:
    a frame index made from the stream's packets, then seeking to the key frame before each
    needed frame instead of decoding the whole file (see :mod:`._video_reader`); or sample an
    already decoded ``(T, H, W, 3)`` array.
``VideoPreprocessor``
    Sampling + one batched ``mmcore.ops.preprocess_image`` call over the frames (+ optional
    temporal patchify), configured by a :class:`~mmcore.config.PreprocessingConfig`
    (``modality="video"``).

PyAV (``pip install "mmcore[video]"``) is imported on first use; only decoding files needs it.
"""

from __future__ import annotations

from typing import (
    Any,
    Dict,
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
from ..config import PreprocessingConfig
from ..errors import ArgumentError, ConfigError, ShapeError, VideoDecodeError  # noqa: F401
from ..ops._checks import check_int, check_limit, check_rate
from ._video_reader import (  # noqa: F401
    DEMUXERS,
    MAX_INDEX_PACKETS,
    REORDER_LIMIT,
    SEEK_COST,
    VideoReader,
    is_video_source,
)
from ._video_reader import ffmpeg_max_pixels as _ffmpeg_max_pixels  # noqa: F401
from .image import as_preprocessing_config, config_image_kwargs, preprocess_image_op

__all__ = ["sample_frame_indices", "temporal_windows", "load_video", "sample_video_array",
           "video_info", "VideoPreprocessor"]

#: Default ``max_pixels`` of :func:`load_video`: the largest ``width * height`` of a frame,
#: 8192 x 4320 (DCI 8K, which also covers 7680 x 4320 UHD 8K).
MAX_VIDEO_FRAME_PIXELS = 8192 * 4320
#: Default ``max_bytes`` of :func:`load_video`: the largest size of the returned uint8 RGB
#: frames together, 8 GiB (768 frames of 1920 x 1080, or 345 of 3840 x 2160).
MAX_VIDEO_BYTES = 8 << 30

#: The most decoder threads load_video / VideoPreprocessor take (``max_threads``).
MAX_DECODER_THREADS = 16

# the reader's former name, kept for callers of the private API
_VideoReader = VideoReader


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

def _video_indices(reader: VideoReader, n, fps, strategy, min_frames, max_frames,
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
    idx = _indices_for(op, reader.num_frames, n, fps, reader.fps, strategy, min_frames,
                       max_frames, temporal_patch)
    return _on_screen(reader, idx, strategy, fps)


def _on_screen(reader: VideoReader, idx: np.ndarray, strategy: Optional[str],
               fps: Optional[float]) -> np.ndarray:
    """Time-based sampling (``strategy="fps"``) takes the frame on screen at each sampled
    time (see :meth:`VideoReader.frames_at`); index-based ("uniform") takes ``idx``."""
    if (strategy or ("fps" if fps is not None else "uniform")).lower() == "fps":
        return reader.frames_at(idx)
    return idx


def video_info(path: Any) -> Dict[str, Any]:
    """Stream metadata of a video, from its packets, without decoding frames.

    ``path`` is anything :func:`load_video` takes (a path, the encoded bytes or a file
    object).

    Returns
    -------
    dict
        ``num_frames`` (the frames of the index made from the stream's packets; counted by
        decoding the stream only when its packets carry no usable timestamps),
        ``num_frames_exact`` (True: the count is the frames there are, not the header's),
        ``fps`` (the average frame rate, see :func:`load_video`), ``width``, ``height``,
        ``duration`` (seconds, as declared by the container, or None), ``codec``,
        ``keyframes`` (indices of the key frames, in presentation order),
        ``timestamps`` (a list of the seconds of every frame from the first one's).

    Raises
    ------
    VideoDecodeError
        As :func:`load_video`.

    Examples
    --------
    >>> import io, numpy as np, av
    >>> from mmcore.preprocess import video_info
    >>> buf = io.BytesIO()
    >>> with av.open(buf, "w", format="mp4") as c:
    ...     s = c.add_stream("mpeg4", rate=25)
    ...     s.width, s.height, s.pix_fmt = 32, 32, "yuv420p"
    ...     for i in range(10):
    ...         f = av.VideoFrame.from_ndarray(np.zeros((32, 32, 3), np.uint8), "rgb24")
    ...         c.mux(s.encode(f))
    ...     c.mux(s.encode())
    >>> info = video_info(buf.getvalue())
    >>> info["num_frames"], info["fps"], info["timestamps"][:3]
    (10, 25.0, [0.0, 0.04, 0.08])
    """
    # the frames are not decoded, so their size is reported, not checked (but opening
    # the file decodes no frame above the default max_pixels)
    with VideoReader(path, max_threads=1, op="video_info", max_pixels=MAX_VIDEO_FRAME_PIXELS,
                     check_pixels=False) as r:
        return {"num_frames": r.num_frames, "num_frames_exact": True, "fps": r.fps,
                "width": r.width, "height": r.height,
                "duration": r.duration(), "codec": r.codec, "keyframes": list(r.keyframes),
                "timestamps": r.frame_times(np.arange(r.num_frames)).tolist()}


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
    """Decode the sampled frames of a video with PyAV, seeking exactly to each.

    Parameters
    ----------
    path : str, os.PathLike, bytes, bytearray, memoryview or binary file object
        The video: a path (``str`` / ``os.PathLike``; it must name a regular file: FIFOs,
        devices and directories are refused without being opened), the encoded file itself
        as ``bytes`` / ``bytearray`` / ``memoryview`` (``bytes`` are video data, no longer a
        file name as they used to be: pass ``os.fsdecode(name)`` for a bytes file name), or a
        seekable binary file object (read from its current position). Any container/codec
        the FFmpeg inside PyAV reads (MP4, MKV, WebM, MPEG-TS, AVI, ...); the first video
        stream is used.
    n, fps, strategy, min_frames, max_frames, temporal_patch
        Frame sampling, as in :func:`sample_frame_indices` with the stream's frame count and
        frame rate: ``n`` ("uniform") picks frame indices; ``fps`` ("fps") picks times and
        returns the frame on screen at each (see Notes). With neither ``n`` nor ``fps`` (nor
        ``indices``) every frame is decoded.
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
        Presentation time of each returned frame in seconds from the first frame's (for a
        constant frame rate, ``index / fps``).
    indices : int64 ndarray (T,)
        Only with ``return_indices=True``.

    Notes
    -----
    Frame index: frame ``i`` is the ``i``-th frame in presentation order, which is the
    ``i``-th frame a plain decode of the whole stream outputs, on every container and at any
    frame rate, constant or variable. The index is built from the stream's packets without
    decoding (their presentation timestamps, or decode timestamps where a packet has none;
    packets an MP4 edit list discards make no frame), so the frame count is the number of
    frames there are, not the header's. Streams whose packets carry no usable timestamps (raw
    H.264, ...) are indexed by decoding them once and read by decoding from the start.

    Times: ``timestamps`` are seconds from the first frame's presentation time (frame 0 is at
    0.0 even when the stream starts later, as MPEG-TS streams do). ``fps`` sampling takes the
    sample positions of :func:`sample_frame_indices` on the nominal frame grid and turns
    position ``p`` into the time ``p * (last - first) / (N - 1)`` (so the times span the
    first to the last frame); each sample is the frame on screen at that time, the last frame
    whose timestamp is at most it (plus one tick of the stream's time base, so timestamps
    rounded by the container still give frame ``p`` of a constant-rate video, where this is
    the same as index-based sampling). The frame rate used for the count (and returned by
    :func:`video_info`) is the stream's average rate, or the frames' mean rate
    ``(N - 1) / (last - first)`` when the two differ by more than 1 %.

    Seeking: the needed frames are read in presentation order. Each is decoded from the last
    key frame at or before its packet (in decode order) whose timestamp is not after the
    frame's (so the leading pictures of an open GOP are decoded from the GOP before):
    the container seeks to that key frame's decode timestamp, packets before it are skipped
    undecoded, and decoding goes forward. The reader keeps decoding instead of seeking when
    the key frame is at most :data:`SEEK_COST` packets ahead, so dense reads decode the
    stream once and sparse ones about one GOP per frame. Every decoded frame is matched to
    the index by its timestamp; a frame the decoder does not output raises
    :class:`VideoDecodeError` naming its index (no other frame is returned in its place).

    Raises
    ------
    VideoDecodeError
        If the file does not exist, is not a regular file (a directory, FIFO or device), is
        not a video FFmpeg can open (bytes that are not a video), has no video stream, has no
        frames, has frames larger than ``max_pixels`` or would decode to more than
        ``max_bytes``, has more than :data:`MAX_INDEX_PACKETS` (2**23) packets, or decoding
        fails (corrupt data, or a frame of the index that the decoder does not output: the
        message names its index). The message names the file,
        or the type and size of the data (and the limit, with how to raise it).
    ArgumentError
        For bad sampling arguments, ``max_threads``, ``max_pixels`` or ``max_bytes`` (naming
        them), a ``path`` of another type or a file object that is not seekable.
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
    with VideoReader(path, max_threads=max_threads, op=op, max_pixels=max_pixels,
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
    ``preprocessor(video, *, video_fps=None)`` where ``video`` is a file path, the encoded
    video as ``bytes`` / ``bytearray`` / ``memoryview``, a binary file object (each decoded
    with :func:`load_video`'s reader, seeking to the sampled frames, ``sampling="fps"``
    taking the frame on screen at each sampled time) or a uint8 ``(T, H, W, 3)`` array of
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

    def _sample(self, num_frames: int, video_fps: Optional[float],
                reader: Optional[VideoReader] = None) -> np.ndarray:
        cfg = self.config
        op = "VideoPreprocessor"
        if cfg.sampling == "fps" and video_fps is None:
            raise ArgumentError(f"[{op}] sampling='fps' needs the video's frame rate: pass "
                                "video_fps= with an array of frames")
        idx = sample_frame_indices(num_frames, n=cfg.num_frames, fps=cfg.fps,
                                   video_fps=video_fps, strategy=cfg.sampling,
                                   min_frames=cfg.min_frames, max_frames=cfg.max_frames,
                                   temporal_patch=cfg.temporal_patch)
        if reader is not None:
            idx = _on_screen(reader, idx, cfg.sampling, cfg.fps)
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
        if is_video_source(video):
            max_pixels = check_limit("max_pixels", self.max_pixels, op=op,
                                     default=MAX_VIDEO_FRAME_PIXELS)
            max_bytes = check_limit("max_bytes", self.max_bytes, op=op, default=MAX_VIDEO_BYTES)
            with VideoReader(video, max_threads=self.max_threads, op=op, max_pixels=max_pixels,
                             max_bytes=max_bytes) as reader:
                idx = self._sample(reader.num_frames, reader.fps, reader)
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
