"""The frame index and the seeking frame reader behind :mod:`mmcore.preprocess.video`.

Frame index
    Every packet of the first video stream is demuxed once, without decoding (as decord does):
    its presentation timestamp (the decode timestamp when it has none), decode timestamp and
    key-frame and discard flags. Sorting the timestamps of the packets that make frames gives
    the frames in presentation order: frame ``i`` is the ``i``-th of them, whatever the
    container (MP4, Matroska, MPEG-TS, AVI ...), frame rate (constant or variable) or start
    time. Packets flagged for discarding (an MP4 edit list that starts after them) are decoded
    but make no frame, as in a plain decode.
Seeking
    Frame ``i`` is decoded from the last key frame at or before its packet (in decode order)
    whose timestamp is not after the frame's own, so the leading pictures of an open GOP are
    decoded from the key frame before theirs. The container is asked to seek to that key
    frame's decode timestamp; the packets before it that the seek lands on are skipped without
    decoding, and a seek that lands after it is retried further back.
Checking
    Every decoded frame is matched to the index by its timestamp; a frame is returned only
    when its own timestamp comes out of a decoding run that started at a key frame at or
    before it. A frame the decoder does not produce raises :class:`VideoDecodeError` naming
    its index; no other frame is returned in its place.
Streams without usable timestamps
    (raw H.264 elementary streams, or two packets with the same timestamp): the index is made
    by decoding the whole stream once, and frames are read by decoding from the start, so
    frame ``i`` is the ``i``-th decoded frame.
"""

from __future__ import annotations

import io
import math
import os
from array import array
from fractions import Fraction
from typing import Any, Dict, Generator, Iterator, List, Optional, Tuple

import numpy as np

from .._files import check_regular
from ..errors import ArgumentError, VideoDecodeError

__all__ = ["SEEK_COST", "REORDER_LIMIT", "MAX_INDEX_PACKETS", "DEMUXERS", "VideoReader"]

#: Cost of a seek in decoded frames (the seek, the flush and refilling the decoder's
#: pipeline): a read seeks only when that skips more packets than this.
SEEK_COST = 4

#: Packets fed to the decoder after a frame's own packet before a frame that has not come out
#: counts as not produced (H.264 reorders at most 16 frames; frame threads add one frame of
#: delay per thread, at most 16).
REORDER_LIMIT = 64

#: The most packets of a video stream the frame index takes (about 78 hours at 30 fps);
#: a longer stream is refused rather than indexed (the index keeps 17 bytes per packet).
MAX_INDEX_PACKETS = 1 << 23

#: The FFmpeg demuxers the reader opens (FFmpeg's ``format_whitelist``): containers of one
#: file. Playlist and list demuxers (HLS ``.m3u8``, DASH, ``concat``) are left out on purpose:
#: they open the files a playlist names, so a file from a stranger could make the decoder read
#: other files of the machine.
DEMUXERS = ("mov,mp4,m4a,3gp,3g2,mj2,matroska,webm,avi,mpegts,mpeg,mpegvideo,flv,ogg,asf,"
            "h264,hevc,m4v,ivf,yuv4mpegpipe,gif,mjpeg,nut,dv,mxf,rawvideo")

# FFmpeg's own max_pixels option is an int
_FFMPEG_MAX_PIXELS = 2 ** 31 - 1
_NO_TS = np.iinfo(np.int64).min
_KEY, _DISCARD = 1, 2


def ffmpeg_max_pixels(limit: float) -> int:
    """FFmpeg's ``max_pixels`` option for our ``max_pixels`` limit: FFmpeg checks sizes with
    its padding (edges, alignment; several times the frame for tiny MPEG-4 frames), so it gets
    ``(sqrt(limit) + 512) ** 2``, the exact limit being checked by mmcore itself (the default
    8192 x 4320 gives FFmpeg 41.7 M pixels, still below an 8192 x 8192 frame's 67.1 M)."""
    return int(min((math.sqrt(limit) + 512.0) ** 2, _FFMPEG_MAX_PIXELS))


def import_av():
    try:
        import av
    except ImportError as exc:
        raise ImportError("mmcore.preprocess.load_video needs PyAV: pip install av "
                          f"(or pip install \"mmcore[video]\"): {exc}") from exc
    return av


def describe(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def is_video_source(video: Any) -> bool:
    """Whether ``video`` is something the reader opens (a path, encoded bytes or a file
    object) rather than an array of decoded frames."""
    return (isinstance(video, (str, bytes, bytearray, memoryview, os.PathLike))
            or hasattr(video, "read"))


class VideoReader:
    """One open video stream: metadata, the frame index, and frames by index.

    ``source``: a ``str`` / ``os.PathLike`` path (a regular file), ``bytes`` / ``bytearray``
    / ``memoryview`` holding the encoded file, or a seekable binary file object.
    """

    def __init__(self, source: Any, *, max_threads: int, op: str,
                 max_pixels: float = math.inf, max_bytes: float = math.inf,
                 check_pixels: bool = True):
        av = import_av()
        self.av = av
        self.op = op
        self.max_pixels = max_pixels
        self.max_bytes = max_bytes
        self.max_threads = max_threads
        self._path: Optional[str] = None
        self._file: Any = None
        self._file_start = 0
        self.container: Any = None
        if isinstance(source, (str, os.PathLike)):
            fname = os.fsdecode(os.fspath(source))
            self.shown = repr(fname)
            # regular files only: a FIFO or a device would block FFmpeg or never end
            self._path = check_regular(fname, what="video file", error=VideoDecodeError, op=op)
        elif isinstance(source, (bytes, bytearray, memoryview)):
            mv = memoryview(source)
            self.shown = f"<{type(source).__name__} of {mv.nbytes} bytes>"
            if mv.nbytes == 0:
                raise self._error("the video data is empty (0 bytes)")
            self._file = io.BytesIO(mv.tobytes() if isinstance(source, memoryview) else source)
        elif hasattr(source, "read"):
            self.shown = repr(getattr(source, "name", None) or f"<{type(source).__name__}>")
            seekable = getattr(source, "seekable", None)
            if seekable is not None and not seekable():
                raise ArgumentError(f"[{op}] path: the file object {self.shown} is not "
                                    "seekable (the frame index is read before the frames); "
                                    "pass its contents as bytes instead")
            self._file = source
            try:
                self._file_start = int(source.tell())
            except Exception:  # a file object without tell(): read from where it is
                self._file_start = 0
        else:
            raise ArgumentError(f"[{op}] path must be a str or os.PathLike path, bytes / "
                                "bytearray / memoryview holding the encoded video, or a binary "
                                f"file object, got {type(source).__name__}")
        # FFmpeg's decoders refuse frames above max_pixels, also in the decoding that opening
        # a file may do to probe its streams (without this, an 8192 x 8192 H.264 frame is
        # decoded while the file is opened, before its size can be checked)
        self._ff_opts = ({} if math.isinf(max_pixels) else
                         {"max_pixels": str(ffmpeg_max_pixels(max_pixels))})
        try:
            self.container = self._open(self._ff_opts)
        except Exception as exc:  # av.FFmpegError subclasses, OSError, ValueError ...
            raise self._error(f"not a video FFmpeg can open ({describe(exc)})", exc) from None
        try:
            self._setup(check_pixels)
        except BaseException:
            self.close()
            raise

    # -- helpers --------------------------------------------------------------------------------
    def _open(self, options: Dict[str, str]) -> Any:
        if self._file is not None:
            self._file.seek(self._file_start)
            src: Any = self._file
        else:
            src = self._path
        return self.av.open(src, mode="r", options=dict(options, format_whitelist=DEMUXERS))

    def _error(self, msg: str, exc: Optional[BaseException] = None) -> VideoDecodeError:
        err = VideoDecodeError(f"[{self.op}] cannot decode video {self.shown}: {msg}")
        if exc is not None:
            err.__cause__ = exc
        return err

    def close(self) -> None:
        c = self.container
        if c is not None:
            try:
                c.close()
            except Exception:  # pragma: no cover - closing a broken container
                pass
            self.container = None

    def __enter__(self) -> "VideoReader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _limit_error(self, msg: str, name: str) -> VideoDecodeError:
        return VideoDecodeError(f"[{self.op}] video {self.shown} {msg}, more than "
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

    # -- opening ------------------------------------------------------------------------------
    def _setup(self, check_pixels: bool) -> None:
        streams = self.container.streams.video
        if len(streams) == 0:
            raise self._error("it has no video stream")
        self._stream_index = streams[0].index
        self._configure(streams[0])
        cc = self.stream.codec_context
        self.codec = cc.name
        self.width, self.height = int(cc.width or 0), int(cc.height or 0)
        if (not self.width or not self.height) and self._ff_opts:
            # FFmpeg forgets a size above its max_pixels option for some codecs (MPEG-4 part
            # 2): read it again with every frame skipped, so nothing is decoded
            self.width, self.height = self._probe_size()
        if check_pixels:
            # from the header, before any frame is decoded
            self.check_pixels(self.width, self.height)
        st = self.stream
        tb = st.time_base
        self.time_base = Fraction(tb) if tb else Fraction(1, 1_000_000)
        rate = st.average_rate or st.guessed_rate or st.base_rate
        self.stream_rate = Fraction(rate) if rate else None
        self.frames_decoded = 0   # statistics of read(): frames decoded and seeks made
        self.seeks = 0
        self._build_index()
        self.fps = self._frame_rate()

    def _configure(self, st: Any) -> None:
        self.stream = st
        cc = st.codec_context
        try:
            st.thread_type = "AUTO"
            cc.thread_count = self.max_threads
        except Exception:  # pragma: no cover - codecs without threading support
            pass
        if self._ff_opts:
            # and the decoder refuses larger frames in the stream (a mid-stream size change)
            try:
                cc.options = dict(cc.options or {}, **self._ff_opts)
            except Exception:  # pragma: no cover - a PyAV without codec options
                pass

    def _reopen(self) -> None:
        """Open the container again, positioned at its start (for decoding from the start
        where seeking is not used)."""
        self.close()
        try:
            self.container = self._open(self._ff_opts)
        except Exception as exc:
            raise self._error(f"opening it again failed ({describe(exc)})", exc) from None
        st = [s for s in self.container.streams.video if s.index == self._stream_index]
        if not st:  # pragma: no cover - the same file opened twice
            raise self._error("its video stream is gone when opened again")
        self._configure(st[0])

    def _probe_size(self) -> Tuple[int, int]:
        """(width, height) of the first video stream, opening the file again with the
        decoder skipping every frame; (0, 0) when unknown."""
        try:
            with self._open({"skip_frame": "all"}) as c:
                cc = c.streams.video[0].codec_context
                return int(cc.width or 0), int(cc.height or 0)
        except Exception:  # the first open worked; a failure here leaves the size unknown
            return 0, 0

    def duration(self) -> Optional[float]:
        """The stream's (else the container's) declared duration in seconds, or None."""
        st = self.stream
        if st.duration and st.time_base:
            return float(st.duration * st.time_base)
        if self.container is not None and self.container.duration:
            return self.container.duration / 1_000_000
        return None

    # -- the frame index ----------------------------------------------------------------------
    def _build_index(self) -> None:
        """Demux every packet of the stream (no decoding) and index its frames."""
        keys, dts, flags = array("q"), array("q"), bytearray()
        untimed = 0
        try:
            for packet in self.container.demux(self.stream):
                if not packet.size:     # the empty packet that ends demuxing
                    continue
                if len(flags) >= MAX_INDEX_PACKETS:
                    raise self._error(f"its video stream has more than {MAX_INDEX_PACKETS} "
                                      "packets, more than the frame index takes")
                p, d = packet.pts, packet.dts
                k = p if p is not None else d
                if k is None:
                    untimed += 1
                    k = _NO_TS
                keys.append(k)
                dts.append(_NO_TS if d is None else d)
                flags.append((_KEY if packet.is_keyframe else 0)
                             | (_DISCARD if packet.is_discard else 0))
        except VideoDecodeError:
            raise
        except Exception as exc:  # av.FFmpegError (corrupt data), OSError ...
            raise self._error(f"reading its packets failed ({describe(exc)})", exc) from None
        self._keys = np.frombuffer(keys, np.int64).copy() if keys else np.zeros(0, np.int64)
        self._dts = np.frombuffer(dts, np.int64).copy() if dts else np.zeros(0, np.int64)
        fl = np.frombuffer(bytes(flags), np.uint8)
        self.sequential = False
        frame_pos = np.flatnonzero((fl & _DISCARD) == 0)
        if len(frame_pos) == 0:
            raise self._error("the video stream has no frames")
        sorted_keys = np.sort(self._keys)
        if untimed or (len(sorted_keys) > 1 and bool((np.diff(sorted_keys) == 0).any())):
            # no timestamps to tell the frames apart: count them by decoding instead
            self._index_by_decoding()
            return
        kf = np.flatnonzero(fl & _KEY)
        if len(kf) == 0:
            # no key frame to seek to: decode from the start, as a plain decode does
            self._index_by_decoding()
            return
        fkeys = self._keys[frame_pos]
        order = np.argsort(fkeys, kind="stable")
        self.frame_pts = fkeys[order]            # presentation timestamp of frame i
        self.frame_pos = frame_pos[order]        # decode position of frame i's packet
        self._pkt_order = np.argsort(self._keys, kind="stable")
        self._pkt_sorted = self._keys[self._pkt_order]
        self._kf = kf if kf[0] == 0 else np.concatenate([[0], kf]).astype(np.int64)
        k1 = int(kf[0])
        head = (self.frame_pos < k1) | (self.frame_pts < self._keys[k1])
        if head.any():
            # frames before the first key frame (a stream cut mid-GOP) or leading it (an open
            # GOP): a plain decode outputs only those it can decode, so keep those
            keep = ~head | np.isin(self.frame_pts, self._decodable_head(k1))
            self.frame_pts, self.frame_pos = self.frame_pts[keep], self.frame_pos[keep]
            if len(self.frame_pts) == 0:  # pragma: no cover - a key frame makes a frame
                raise self._error("the video stream has no frames")
        frame_of_pkt = np.full(len(fl), -1, np.int64)
        frame_of_pkt[self.frame_pos] = np.arange(len(self.frame_pos))
        self.keyframes = sorted(int(i) for i in frame_of_pkt[kf] if i >= 0)
        self.num_frames = len(self.frame_pts)

    def _decodable_head(self, k1: int) -> np.ndarray:
        """Timestamps of the frames a decode from the stream's start outputs before the
        first frame presented at or after the first key frame (packet ``k1``)."""
        limit = int(self._keys[k1])
        seen: List[int] = []
        run = self._run(0)
        try:
            for _, frame in run:
                key = frame.pts if frame.pts is not None else frame.dts
                if key is None:
                    continue
                if key >= limit or self.next_pos - 1 - k1 > REORDER_LIMIT:
                    break
                seen.append(int(key))
        except Exception as exc:  # av.FFmpegError: corrupt data before the first key frame
            raise self._error(f"decoding its first frames failed ({describe(exc)})",
                              exc) from None
        finally:
            run.close()
        self.frames_decoded = self.seeks = 0
        return np.asarray(seen, np.int64)

    def _index_by_decoding(self) -> None:
        """The index of a stream without usable packet timestamps: decode it all once."""
        self.sequential = True
        self._reopen()
        pts: List[Optional[int]] = []
        keyframes: List[int] = []
        try:
            for frame in self.container.decode(self.stream):
                if len(pts) >= MAX_INDEX_PACKETS:
                    raise self._error(f"its video stream has more than {MAX_INDEX_PACKETS} "
                                      "frames, more than the frame index takes")
                if frame.key_frame:
                    keyframes.append(len(pts))
                pts.append(frame.pts)
        except VideoDecodeError:
            raise
        except Exception as exc:
            raise self._error(f"decoding failed ({describe(exc)})", exc) from None
        if not pts:
            raise self._error("the video stream has no frames")
        self.num_frames = len(pts)
        self.keyframes = keyframes
        seq: Optional[np.ndarray] = None
        if all(p is not None for p in pts):
            seq = np.asarray(pts, np.int64)
            if len(seq) > 1 and not bool((np.diff(seq) > 0).all()):
                seq = None        # timestamps that do not increase tell no times
        self._seq_pts = seq

    def _frame_rate(self) -> float:
        """The stream's average frame rate when the frames' mean rate agrees with it within
        1 %, else the frames' mean rate ``(N - 1) / (last - first timestamp)``."""
        mean: Optional[Fraction] = None
        pts = self.frame_times_ticks()
        if pts is not None and len(pts) > 1 and pts[-1] > pts[0]:
            mean = Fraction(len(pts) - 1) / (Fraction(int(pts[-1] - pts[0])) * self.time_base)
        rate = self.stream_rate
        if rate is not None and rate > 0 and (mean is None or abs(rate / mean - 1) <= 0.01):
            return float(rate)
        if mean is not None:
            return float(mean)
        dur = self.duration()
        if dur:
            return self.num_frames / dur
        raise self._error("the video stream has no frame rate or timestamps")

    def frame_times_ticks(self) -> Optional[np.ndarray]:
        """Presentation timestamps of the frames in stream time-base ticks (None when the
        stream has none)."""
        return self._seq_pts if self.sequential else self.frame_pts

    def frame_times(self, indices: np.ndarray) -> np.ndarray:
        """Seconds from the first frame's presentation to that of each frame of
        ``indices``."""
        pts = self.frame_times_ticks()
        idx = np.asarray(indices, np.int64)
        if pts is None:
            return idx.astype(np.float64) / self.fps
        rel = (pts[idx] - pts[0]) * self.time_base.numerator   # exact in int64 ticks
        return rel.astype(np.float64) / self.time_base.denominator

    def frames_at(self, positions: np.ndarray) -> np.ndarray:
        """The frame on screen at each of ``positions``, given on the nominal frame grid:
        position ``p`` is the time ``first + p * (last - first) / (N - 1)`` (first and last
        frame timestamps), and its frame is the last one whose timestamp is at most that time
        plus one time-base tick (so the timestamps a container rounded to its time base still
        give frame ``p`` of a constant-rate video)."""
        pos = np.asarray(positions, np.int64)
        pts = self.frame_times_ticks()
        n = self.num_frames
        if pts is None or n == 1 or pts[-1] <= pts[0]:
            return pos.copy()
        first, span = int(pts[0]), int(pts[-1] - pts[0])
        thr = np.asarray([first + (int(p) * span) // (n - 1) + 1 for p in pos], np.int64)
        out = np.searchsorted(pts, thr, side="right") - 1
        return np.clip(out, 0, n - 1).astype(np.int64)

    # -- reading ------------------------------------------------------------------------------
    def read(self, indices: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
        """uint8 (len(indices), H, W, 3) RGB frames and their timestamps in seconds."""
        # the result's size from the header, before decoding
        self.check_bytes(len(indices))
        self._count = len(indices)
        uniq, inverse = np.unique(indices, return_inverse=True)
        targets = [int(i) for i in uniq]
        try:
            if self.sequential:
                frames = self._read_from_start(targets)
            else:
                frames = self._read_seeking(targets)
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
            raise self._error(f"decoding failed ({describe(exc)}){hint}", exc) from None
        times = self.frame_times(uniq)
        if len(uniq) == len(indices) and np.array_equal(uniq, indices):
            return frames, times
        inv = inverse.ravel()
        return np.ascontiguousarray(frames[inv]), times[inv]

    def _missing(self, i: int, why: str) -> VideoDecodeError:
        return self._error(f"frame {i} of {self.num_frames} could not be decoded ({why})")

    def _new_store(self, count: int):
        state: Dict[str, Any] = {"out": None, "shape": None}
        # one converter for all frames: frame.to_ndarray(format=...) makes a new swscale
        # context per frame, which costs more than decoding a small frame (same bits)
        rf = self.av.video.reformatter.VideoReformatter()

        def store(k: int, frame) -> None:
            shape = state["shape"]
            if shape is None:
                shape = state["shape"] = (frame.height, frame.width)
                # the decoded size may differ from the header's
                self.check_pixels(frame.width, frame.height)
                self.check_bytes(max(self._count, count), frame.width, frame.height)
            if (frame.height, frame.width) != shape:
                img = rf.reformat(frame, format="rgb24", width=shape[1],
                                  height=shape[0]).to_ndarray()
            else:
                img = rf.reformat(frame, format="rgb24").to_ndarray()
            if state["out"] is None:
                state["out"] = np.empty((count,) + img.shape, np.uint8)
            state["out"][k] = img
        return state, store

    def _pos_of(self, key: Optional[int]) -> int:
        """Decode position of the packet with timestamp ``key``, or -1 when not indexed."""
        if key is None:
            return -1
        j = int(np.searchsorted(self._pkt_sorted, key))
        if j < len(self._pkt_sorted) and int(self._pkt_sorted[j]) == key:
            return int(self._pkt_order[j])
        return -1

    def _frame_of(self, frame) -> int:
        """Index of a decoded frame from its timestamp, or -1 when it is not in the index."""
        key = frame.pts if frame.pts is not None else frame.dts
        if key is None:
            return -1
        j = int(np.searchsorted(self.frame_pts, key))
        if j < len(self.frame_pts) and int(self.frame_pts[j]) == key:
            return j
        return -1

    def start_of(self, i: int) -> int:
        """Decode position of the key frame that decoding frame ``i`` starts from: the last
        key frame at or before frame ``i``'s packet whose timestamp is not after frame
        ``i``'s (the stream's first packet when there is none)."""
        d = int(self.frame_pos[i])
        p = int(self.frame_pts[i])
        j = int(np.searchsorted(self._kf, d, side="right")) - 1
        while j > 0 and int(self._keys[self._kf[j]]) > p:
            j -= 1
        return int(self._kf[max(j, 0)])

    def _seek_ts(self, pos: int) -> int:
        d = int(self._dts[pos])
        return d if d != _NO_TS else int(self._keys[pos])

    def _packets_from(self, s: int) -> Iterator[Tuple[int, Any]]:
        """Seek so that the next packet is the one at decode position ``s`` (a key frame, or
        the first packet); yields (position or -1, packet) from there on.

        The seek goes to the key frame's decode timestamp (what MP4 and MPEG-TS seek by;
        Matroska's cues hold presentation times, never later); packets before ``s`` are
        skipped undecoded. When the seek lands after ``s`` it is retried from the key frames
        1, 2, 4 ... before, then from the stream's start.
        """
        ki = int(np.searchsorted(self._kf, s))
        tries: List[Optional[int]] = []
        step = 1
        while ki > 0:
            tries.append(ki)
            ki -= step
            step *= 2
        tries += [0, None]        # None: open the file again, at its start
        for kt in tries:
            if kt is None:
                self._reopen()
            else:
                ts = self._seek_ts(int(self._kf[kt]))
                self.container.seek(ts, backward=True, any_frame=False, stream=self.stream)
                self.stream.codec_context.flush_buffers()
            self.seeks += 1
            it = self.container.demux(self.stream)
            landed = -1
            for packet in it:
                if not packet.size:
                    continue
                pos = self._pos_of(packet.pts if packet.pts is not None else packet.dts)
                if 0 <= pos < s:
                    continue          # before the key frame: skipped, undecoded
                if pos > s:
                    landed = pos
                    break
                if pos == s:
                    landed = pos
                    break
                # pos < 0: a packet the index does not know (a resync point): skipped
            if landed == s:
                yield s, packet
                for packet in it:
                    if packet.size:
                        yield self._pos_of(packet.pts if packet.pts is not None
                                           else packet.dts), packet
                return
        raise self._error(f"seeking to its packet {s} failed (the stream's packets differ "
                          "from those read when it was indexed)")

    def _run(self, s: int) -> Generator[Tuple[int, Any], None, None]:
        """Decode from the key frame at decode position ``s``: yields (frame index or -1,
        frame) for the frames the decoder outputs, ending after the decoder is flushed."""
        self.next_pos = s
        for pos, packet in self._packets_from(s):
            if pos >= 0:
                self.next_pos = pos + 1
            # (the stream's, read each time: seeking may have opened the file again)
            for frame in self.stream.codec_context.decode(packet):
                self.frames_decoded += 1
                yield self._frame_of(frame), frame
        for frame in self.stream.codec_context.decode(None):
            self.frames_decoded += 1
            yield self._frame_of(frame), frame

    def _read_seeking(self, targets: List[int]) -> np.ndarray:
        state, store = self._new_store(len(targets))
        slot = {t: k for k, t in enumerate(targets)}
        done = np.zeros(len(targets), bool)
        run: Optional[Iterator[Tuple[int, Any]]] = None
        run_pts = 0           # timestamp of the key frame the current run started from
        self.next_pos = -1    # decode position of the next packet the run feeds
        for k, t in enumerate(targets):
            if done[k]:
                continue
            s = self.start_of(t)
            if run is None or s > self.next_pos + SEEK_COST:
                run = self._run(s)
                # a run from the stream's first packet is a plain decode: all its frames count
                run_pts = int(self._keys[s]) if s > 0 else _NO_TS
            own = int(self.frame_pos[t])
            for j, frame in run:
                if j >= 0 and int(self.frame_pts[j]) >= run_pts:
                    kj = slot.get(j)
                    if kj is not None and not done[kj]:
                        store(kj, frame)
                        done[kj] = True
                if done[k]:
                    break
                if self.next_pos - 1 - own > REORDER_LIMIT:
                    raise self._missing(t, f"the decoder did not output it within "
                                        f"{REORDER_LIMIT} packets of its own")
            else:
                run = None
                if not done[k]:
                    raise self._missing(t, "the decoder did not output it before the end of "
                                        "the stream")
        assert state["out"] is not None
        return state["out"]

    def _read_from_start(self, targets: List[int]) -> np.ndarray:
        state, store = self._new_store(len(targets))
        self._reopen()
        self.seeks += 1
        k = 0
        j = -1
        for j, frame in enumerate(self.container.decode(self.stream)):
            self.frames_decoded += 1
            if j == targets[k]:
                store(k, frame)
                k += 1
                if k == len(targets):
                    break
        if k < len(targets):
            raise self._missing(targets[k], f"the stream decoded to {j + 1} frames this time")
        assert state["out"] is not None
        return state["out"]
