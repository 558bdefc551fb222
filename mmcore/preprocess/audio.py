"""Audio decoding, resampling and batched feature extraction.

``load_audio`` / ``load_audio_with_rate``
    Decode a file, a binary file object or encoded audio bytes with soundfile (libsndfile:
    WAV, FLAC, OGG/Vorbis, MP3, ... whatever the installed libsndfile supports), mix to mono,
    resample with soxr.
``resample``
    soxr resampling of float32 audio, (T,) or (channels, T).
``AudioPreprocessor``
    Waveforms, files or encoded audio bytes -> padded batch -> one call of the feature op
    chosen by a :class:`~mmcore.config.PreprocessingConfig` -> ``{"input_features",
    "attention_mask"}``.

soundfile and soxr are imported on first use, so ``import mmcore`` does not need them.
"""

from __future__ import annotations

import io
import math
import os
import struct
from typing import (
    Any,
    BinaryIO,
    Dict,
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
from .._files import open_regular
from ..config import MAX_AUDIO_ITEM_S, PreprocessingConfig
from ..errors import ArgumentError, AudioDecodeError, ConfigError, ShapeError
from ..ops._checks import check_limit

__all__ = ["load_audio", "load_audio_with_rate", "resample", "AudioPreprocessor"]

#: What :func:`load_audio` reads: a path (``str`` / ``os.PathLike``), encoded audio data
#: (``bytes`` / ``bytearray`` / ``memoryview``) or a binary file object.
AudioSource = Union[str, "os.PathLike[str]", bytes, bytearray, memoryview, BinaryIO]
#: Former name of :data:`AudioSource`.
PathLike = AudioSource
#: Types taken as the encoded bytes of an audio file (WAV, FLAC, OGG, ...), never as a file name.
AUDIO_BYTES_TYPES = (bytes, bytearray, memoryview)
#: Types taken as a file name.
AUDIO_PATH_TYPES = (str, os.PathLike)
# A path or encoded bytes: one item of a batch, decoded by load_audio.
_SOURCE_TYPES = AUDIO_PATH_TYPES + AUDIO_BYTES_TYPES
# Encoded inputs up to this size that read as text get a hint that bytes are no longer a path.
_PATH_HINT_MAX_BYTES = 4096

#: soxr quality used by :func:`resample` and :func:`load_audio` ("HQ": 20-bit precision,
#: 91% passband; the quality librosa and torchaudio use for their soxr paths).
RESAMPLE_QUALITY = "HQ"

# Kaldi scales features of int16 PCM: the fbank preset multiplies float audio by this first.
KALDI_INT16_SCALE = 32768.0
# data-chunk sizes from this one up are placeholders of streaming writers (sox: 0x7FFFF000,
# ffmpeg: 0xFFFFFFFF), not a length.
_WAV_UNKNOWN_SIZE = 0x7FFFF000
# Formats whose frame count libsndfile may only estimate.
_ESTIMATED_LENGTH_FORMATS = ("MP3", "MPEG")
# Natural-log floor of the plain log-mel (preset None).
LOG_MEL_FLOOR = 1e-10

#: Default ``max_duration_s`` of :func:`load_audio`: 4 hours, read from the file's header
#: (frames / sample rate) before decoding.
MAX_AUDIO_DURATION_S = MAX_AUDIO_ITEM_S
#: Default ``max_samples`` of :func:`load_audio`: 2**29 samples (2 GiB as float32), counted
#: over the channels kept (1 with ``mono=True``), both as decoded at the file's rate and as
#: returned after resampling: 9.3 hours at 16 kHz, 3.1 hours at 48 kHz.
MAX_AUDIO_SAMPLES = 1 << 29
# Frames read per call while decoding (divided by the channel count).
_READ_BLOCK = 1 << 20
# libsndfile's frame count for a length it does not know (SF_COUNT_MAX) and above
_UNKNOWN_FRAMES = 1 << 62


# --------------------------------------------------------------------------------------------
# decoding

def _import_soundfile():
    try:
        import soundfile
    except ImportError as exc:  # pragma: no cover - soundfile is a core dependency
        raise ImportError("mmcore.preprocess.load_audio needs the 'soundfile' package "
                          f"(pip install soundfile): {exc}") from exc
    except OSError as exc:  # pragma: no cover - the wheel's libsndfile failed to load
        raise ImportError(f"soundfile is installed but libsndfile cannot be loaded: {exc}") from exc
    return soundfile


def _import_soxr():
    try:
        import soxr
    except ImportError as exc:  # pragma: no cover - soxr is a core dependency
        raise ImportError("mmcore.preprocess needs the 'soxr' package to resample "
                          f"(pip install soxr): {exc}") from exc
    return soxr


@overload
def _check_rate(op: str, name: str, value: Any, *, optional: Literal[False]) -> int: ...


@overload
def _check_rate(op: str, name: str, value: Any, *, optional: bool) -> Optional[int]: ...


def _check_rate(op: str, name: str, value: Any, *, optional: bool) -> Optional[int]:
    if value is None and optional:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        expected = "a positive int" + (" or None" if optional else "")
        raise ArgumentError(f"[{op}] {name} must be {expected}, got {value!r}")
    return int(value)


def _wav_truncation(f: BinaryIO, size: Optional[int] = None) -> Optional[str]:
    """For a RIFF/WAVE file open in ``f`` (``size`` bytes long; None: its ``fstat`` size), say
    how it is truncated (None: complete or not a RIFF file). Leaves ``f`` at offset 0.

    libsndfile reads a WAV file whose ``data`` chunk is shorter than its header declares
    without complaint, returning the samples that are there; this reads the chunk headers to
    catch that. Streaming writers that leave the size unset (0, or a placeholder near 2**31 or
    2**32) are not flagged.
    """
    try:
        if size is None:
            size = os.fstat(f.fileno()).st_size
        f.seek(0)
        head = f.read(12)
        if len(head) < 12 or head[:4] != b"RIFF" or head[8:12] != b"WAVE":
            return None
        pos = 12
        while pos + 8 <= size:
            f.seek(pos)
            chunk = f.read(8)
            if len(chunk) < 8:
                return None
            cid, csize = chunk[:4], struct.unpack("<I", chunk[4:])[0]
            if cid == b"data":
                if csize == 0 or csize >= _WAV_UNKNOWN_SIZE:
                    return None
                have = size - (pos + 8)
                if have < csize:
                    return (f"truncated: the header declares {csize} bytes of audio data but "
                            f"the file holds {have}")
                return None
            pos += 8 + csize + (csize & 1)
        return None  # no data chunk: libsndfile reports that itself
    except OSError:
        return None
    finally:
        try:
            f.seek(0)
        except OSError:
            pass


def _raise_hint(name: str) -> str:
    return f"pass {name}= a larger value, or math.inf, to load it anyway"


class _Limits:
    """The size limits of one :func:`load_audio` call, checked against a file's header and
    while decoding."""

    def __init__(self, op: str, label: str, *, sr: Optional[int], mono: bool,
                 max_duration_s: float, max_samples: float):
        self.op, self.label, self.sr, self.mono = op, label, sr, mono
        self.max_duration_s, self.max_samples = max_duration_s, max_samples

    def _fail(self, msg: str) -> AudioDecodeError:
        return AudioDecodeError(f"[{self.op}] {self.label} {msg}")

    def kept(self, channels: int) -> int:
        return 1 if self.mono else channels

    def check(self, frames: int, rate: int, channels: int, *, decoded: bool = False) -> None:
        """Refuse ``frames`` frames at ``rate`` Hz (from the header, or ``decoded`` so far)."""
        what = "decodes to" if decoded else "declares"
        seconds = frames / rate
        if seconds > self.max_duration_s:
            raise self._fail(f"{what} {frames} frames at {rate} Hz = {seconds:.1f} s, longer "
                             f"than max_duration_s={self.max_duration_s:g} "
                             f"({_raise_hint('max_duration_s')})")
        ch = self.kept(channels)
        held = frames * ch
        if held > self.max_samples:
            raise self._fail(f"{what} {frames} frames x {ch} channel(s) = {held} samples at "
                             f"{rate} Hz, more than max_samples={self.max_samples:.0f} "
                             f"({_raise_hint('max_samples')})")
        if self.sr is not None and self.sr != rate:
            out = math.ceil(frames * self.sr / rate) * ch
            if out > self.max_samples:
                raise self._fail(f"{what} {frames} frames at {rate} Hz, which resample to "
                                 f"{out} samples at {self.sr} Hz, more than max_samples="
                                 f"{self.max_samples:.0f} ({_raise_hint('max_samples')})")


def _read(f, limits: "_Limits", rate: int, channels: int, declared: int) -> np.ndarray:
    """Read the rest of the open SoundFile ``f``: float32 (frames, channels kept), mixed to
    mono block by block (so the file's channels are never held all at once) with
    ``limits.mono``. The frame count is checked against ``limits`` as blocks come in, so a
    header that understates the length cannot get past them."""
    kept = limits.kept(channels)
    block = max(1, _READ_BLOCK // channels)
    if declared >= 0 and (kept == channels or channels == 1):
        # exact length and nothing to mix: one read into the result
        out = np.empty((declared, channels), np.float32)
        got = f.read(out=out) if declared else out
        return out[:len(got)]
    if declared >= 0:
        out = np.empty((declared, 1), np.float32)
        n = 0
        while n < declared:
            data = f.read(min(block, declared - n), dtype="float32", always_2d=True)
            if data.shape[0] == 0:
                break
            data.mean(axis=1, dtype=np.float32, out=out[n:n + data.shape[0], 0])
            n += data.shape[0]
        return out[:n]
    parts = []
    n = 0
    read = f.read
    if f.seekable() and int(f.frames) >= _UNKNOWN_FRAMES:
        read = _unpositioned_reader(f, channels)
    while True:
        data = read(block, dtype="float32", always_2d=True)
        if data.shape[0] == 0:
            break
        n += data.shape[0]
        limits.check(n, rate, channels, decoded=True)
        if kept == 1 and channels > 1:
            data = data.mean(axis=1, dtype=np.float32)[:, None]
        parts.append(data)
    if not parts:
        return np.zeros((0, kept), np.float32)
    return np.concatenate(parts) if len(parts) > 1 else parts[0]


def _unpositioned_reader(f, channels: int):
    """``f.read`` for a file whose length libsndfile does not know: soundfile's ``read`` seeks
    to the new position after each read, which fails at the end of such a file (e.g. a FLAC
    stream with ``total_samples = 0``), so this calls libsndfile's ``sf_readf_float``
    directly (falling back to ``f.read`` when soundfile's internals are not there)."""
    import soundfile as sf

    snd, ffi, handle = getattr(sf, "_snd", None), getattr(sf, "_ffi", None), getattr(f, "_file",
                                                                                      None)
    if snd is None or ffi is None or handle is None:  # pragma: no cover - other soundfile
        return f.read

    def read(frames: int, dtype: str = "float32", always_2d: bool = True) -> np.ndarray:
        buf = np.empty((frames, channels), np.float32)
        got = snd.sf_readf_float(handle, ffi.cast("float *", buf.ctypes.data), frames)
        err = snd.sf_error(handle)
        if err:
            raise RuntimeError(ffi.string(snd.sf_error_number(err)).decode("utf-8", "replace"))
        return buf[:max(int(got), 0)]

    return read


def _byte_view(data: Any) -> memoryview:
    """``data`` (bytes, bytearray, memoryview) as a flat unsigned-byte memoryview."""
    mv = memoryview(data)
    if mv.ndim == 1 and mv.format == "B" and mv.c_contiguous:
        return mv
    if mv.c_contiguous:
        return mv.cast("B")
    return memoryview(mv.tobytes())      # a strided view: copied into one run of bytes


def _text_hint(mv: memoryview) -> str:
    """A hint for encoded data that failed to decode and reads like a file name."""
    data = bytes(mv[:_PATH_HINT_MAX_BYTES + 1])
    if len(data) > _PATH_HINT_MAX_BYTES or b"\0" in data:
        return ""
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return ""
    return ("; bytes are encoded audio data, not a file name (they were a file name before): "
            "pass a file name as a str or os.PathLike")


def _decode(path: Any, op: str, *, sr: Optional[int], mono: bool, max_duration_s: float,
            max_samples: float, name: str = "path") -> Tuple[np.ndarray, int]:
    """Decode ``path`` (a file name, encoded bytes or a binary file object; ``name`` is the
    argument's name in messages) to float32 (frames, channels kept) and its sample rate,
    refusing inputs whose header exceeds the limits before decoding them."""
    sf = _import_soundfile()
    fh: Optional[BinaryIO] = None
    text_hint = ""
    if isinstance(path, AUDIO_PATH_TYPES):
        fname = os.fsdecode(path)   # an os.PathLike may give bytes: still a file name
        label = f"audio file {fname!r}"
        # regular files only: a FIFO or a device would block or never end
        fh = open_regular(fname, what="audio file", error=AudioDecodeError, op=op)
        problem = _wav_truncation(fh)
        if problem is not None:
            fh.close()
            raise AudioDecodeError(f"[{op}] cannot decode {label}: {problem}")
        source: Any = fh.fileno()
        # libsndfile reads the descriptor from its offset (the buffered seek above may not
        # have moved it)
        os.lseek(source, 0, os.SEEK_SET)
    elif isinstance(path, AUDIO_BYTES_TYPES):
        mv = _byte_view(path)
        label = f"{name} (encoded audio, {type(path).__name__} of {len(mv)} bytes)"
        if len(mv) == 0:
            raise AudioDecodeError(f"[{op}] cannot decode {label}: it is empty; expected the "
                                   "bytes of an audio file (WAV, FLAC, OGG, ...)")
        # a bytes object is shared by BytesIO, not copied
        source = io.BytesIO(path if isinstance(path, bytes) else mv)
        problem = _wav_truncation(source, len(mv))
        if problem is not None:
            raise AudioDecodeError(f"[{op}] cannot decode {label}: {problem}")
        text_hint = _text_hint(mv)
    elif hasattr(path, "read"):
        source = path
        label = "audio file " + repr(getattr(path, "name", None) or f"<{type(path).__name__}>")
        try:    # read from its start (libsndfile would read from the current position)
            path.seek(0)
        except (AttributeError, OSError, ValueError):
            pass    # a stream that cannot seek: libsndfile reports it
    else:
        raise ArgumentError(f"[{op}] {name} must be a str or os.PathLike (a file name), bytes, "
                            f"bytearray or memoryview (encoded audio) or a binary file object, "
                            f"got {type(path).__name__}")
    limits = _Limits(op, label, sr=sr, mono=mono, max_duration_s=max_duration_s,
                     max_samples=max_samples)
    try:
        try:
            with sf.SoundFile(source, closefd=False) as f:
                rate = int(f.samplerate)
                channels = int(f.channels)
                if rate < 1 or channels < 1:
                    raise AudioDecodeError(f"[{op}] cannot decode {label}: its header "
                                           f"declares {rate} Hz and {channels} channel(s)")
                # MP3 frame counts can be estimates (VBR without a seek table): checked against
                # the limits, not for truncation. A length the header leaves unknown (a FLAC
                # stream's total_samples = 0) reads as 2**63 - 1: checked while decoding.
                known = f.seekable() and 0 <= int(f.frames) < _UNKNOWN_FRAMES
                exact = known and f.format not in _ESTIMATED_LENGTH_FORMATS
                if known:
                    limits.check(int(f.frames), rate, channels)
                declared = int(f.frames) if exact else -1
                data = _read(f, limits, rate, channels, declared)
        except AudioDecodeError:
            raise
        except (RuntimeError, TypeError, ValueError, OSError, EOFError) as exc:
            # soundfile.LibsndfileError (a RuntimeError) for unknown formats and decoder errors
            msg = str(exc).replace(f"Error opening {source!r}: ", "").strip().rstrip(".")
            msg = msg.replace("Error : ", "")
            hint = ""
            if "not recognised" in msg.lower() or "unsupported" in msg.lower():
                hint = ("; the installed libsndfile reads: "
                        + ", ".join(sorted(sf.available_formats())))
            raise AudioDecodeError(f"[{op}] cannot decode {label}: {msg}{hint}{text_hint}"
                                   ) from exc
    finally:
        if fh is not None:
            fh.close()
    if declared >= 0 and data.shape[0] < declared:
        raise AudioDecodeError(f"[{op}] cannot decode {label}: truncated, "
                               f"{data.shape[0]} of the {declared} frames it declares are present")
    if data.size and not np.isfinite(data).all():
        raise AudioDecodeError(f"[{op}] {label} holds NaN or infinite samples")
    return data, rate


def resample(x: np.ndarray, orig_sr: int, target_sr: int, *,
             quality: str = RESAMPLE_QUALITY) -> np.ndarray:
    """Resample float audio along its last axis with soxr.

    Parameters
    ----------
    x : array (T,) or (channels, T)
        Float audio; computed in float32.
    orig_sr, target_sr : int
        Rates in Hz.
    quality : str, default "HQ"
        soxr quality: "QQ", "LQ", "MQ", "HQ" or "VHQ".

    Returns
    -------
    float32 array of the same rank, ``round(T * target_sr / orig_sr)`` (+-1) samples long.

    Examples
    --------
    >>> import numpy as np
    >>> from mmcore.preprocess import resample
    >>> resample(np.zeros(44100, np.float32), 44100, 16000).shape
    (16000,)
    """
    orig_sr = _check_rate("resample", "orig_sr", orig_sr, optional=False)
    target_sr = _check_rate("resample", "target_sr", target_sr, optional=False)
    x = np.asarray(x, dtype=np.float32)
    if x.ndim not in (1, 2):
        raise ShapeError(f"[resample] x has {x.ndim} dims, expected 1 (T,) or 2 (channels, T)")
    if orig_sr == target_sr:
        return np.ascontiguousarray(x)
    if x.shape[-1] == 0:
        return np.zeros(x.shape[:-1] + (0,), np.float32)
    soxr = _import_soxr()
    if x.ndim == 1:
        y = soxr.resample(np.ascontiguousarray(x), orig_sr, target_sr, quality=quality)
    else:
        # soxr takes (frames, channels)
        y = soxr.resample(np.ascontiguousarray(x.T), orig_sr, target_sr, quality=quality).T
    return np.ascontiguousarray(y, dtype=np.float32)


def load_audio_with_rate(path: AudioSource, *, sr: Optional[int] = 16000, mono: bool = True,
                         max_duration_s: Optional[float] = None,
                         max_samples: Optional[float] = None) -> Tuple[np.ndarray, int]:
    """Like :func:`load_audio`, but also return the sample rate of the result.

    With ``sr=None`` the audio is not resampled and the rate returned is the file's own; with
    an int, the rate returned is ``sr``. ``path`` is read as by :func:`load_audio`: ``bytes``,
    ``bytearray`` and ``memoryview`` are encoded audio data (bytes were a file name before).

    Examples
    --------
    >>> import io, os, tempfile, numpy as np, soundfile
    >>> from mmcore.preprocess import load_audio_with_rate
    >>> path = os.path.join(tempfile.mkdtemp(), "tone.wav")
    >>> soundfile.write(path, np.zeros(22050, np.float32), 22050)
    >>> audio, rate = load_audio_with_rate(path, sr=None)
    >>> audio.shape, rate
    ((22050,), 22050)
    >>> buf = io.BytesIO()
    >>> soundfile.write(buf, np.zeros(8000, np.float32), 8000, format="FLAC")
    >>> audio, rate = load_audio_with_rate(buf.getvalue(), sr=None)   # encoded bytes
    >>> audio.shape, rate
    ((8000,), 8000)
    """
    return _load_with_rate(path, op="load_audio", name="path", sr=sr, mono=mono,
                           max_duration_s=max_duration_s, max_samples=max_samples)


def _load_with_rate(path: Any, *, op: str, name: str, sr: Optional[int], mono: Any,
                    max_duration_s: Optional[float], max_samples: Optional[float]
                    ) -> Tuple[np.ndarray, int]:
    sr = _check_rate(op, "sr", sr, optional=True)
    if not isinstance(mono, (bool, np.bool_)):
        raise ArgumentError(f"[{op}] mono must be True or False, got {mono!r}")
    max_duration_s = check_limit("max_duration_s", max_duration_s, op=op,
                                 default=MAX_AUDIO_DURATION_S, lo=0.0)
    max_samples = check_limit("max_samples", max_samples, op=op, default=MAX_AUDIO_SAMPLES)
    data, rate = _decode(path, op, sr=sr, mono=bool(mono), max_duration_s=max_duration_s,
                         max_samples=max_samples, name=name)   # (frames, channels kept)
    audio = data[:, 0] if mono else data.T          # (frames,) or (channels, frames)
    if sr is not None and sr != rate:
        audio = resample(audio, rate, sr)
        rate = sr
    return np.ascontiguousarray(audio, dtype=np.float32), rate


def load_audio(path: AudioSource, *, sr: Optional[int] = 16000, mono: bool = True,
               max_duration_s: Optional[float] = None,
               max_samples: Optional[float] = None) -> np.ndarray:
    """Decode an audio file, or its encoded bytes, to float32 samples in [-1, 1], resampled
    to ``sr``.

    Parameters
    ----------
    path : str, os.PathLike, bytes, bytearray, memoryview or binary file object
        Any format the installed libsndfile decodes (``soundfile.available_formats()``: WAV,
        FLAC, OGG/Vorbis, MP3 with libsndfile >= 1.1, ...). A ``str`` or ``os.PathLike`` is a
        file name and must name a regular file: FIFOs, devices (``/dev/zero``,
        ``/dev/stdin``) and directories are refused without being read. ``bytes``,
        ``bytearray`` and ``memoryview`` are the encoded contents of an audio file (e.g. an
        HTTP body), decoded from memory with the same limits and checks as a file (bytes were
        a file name before: pass ``os.fsdecode(name)`` for a file name held in bytes). A
        binary file object (``open(name, "rb")``, ``io.BytesIO``) is read from its start.
    sr : int or None, default 16000
        Target sample rate in Hz; the audio is resampled with soxr (quality "HQ") when the
        file's rate differs. None keeps the file's rate (use :func:`load_audio_with_rate` to
        get it).
    mono : bool, default True
        Average the channels (``(T,)`` result); False keeps them (``(channels, T)``). The
        channels are averaged block by block while decoding, so a many-channel file never
        sits in memory whole.
    max_duration_s : float, math.inf or None, default None
        Longest accepted duration in seconds (the header's frame count / sample rate),
        checked before decoding. None uses :data:`MAX_AUDIO_DURATION_S` (4 hours);
        ``math.inf`` disables the check.
    max_samples : int, math.inf or None, default None
        Most samples (frames times the channels kept: 1 with ``mono=True``) accepted both as
        decoded at the file's rate and as returned after resampling to ``sr``, checked from
        the header before decoding (so an absurd source rate, e.g. 1 Hz resampled to
        16 kHz, is refused before soxr runs) and again while decoding files whose length
        the header does not give exactly. None uses :data:`MAX_AUDIO_SAMPLES` (2**29, 2 GiB
        as float32: 9.3 hours at 16 kHz); ``math.inf`` disables the check.

    Returns
    -------
    float32 ndarray, (T,) or (channels, T)

    Raises
    ------
    AudioDecodeError
        If the file is missing, not a regular file (a directory, FIFO or device), unreadable,
        corrupt, truncated (detected exactly for WAV from its header; for compressed formats
        when the decoder notices), in a format libsndfile does not support, holds NaN/inf
        samples, or is longer or larger than ``max_duration_s`` / ``max_samples``. Also for
        empty or undecodable bytes. The message names the file or, for bytes, the argument
        and its size (and the limit, with how to raise it).
    ArgumentError
        For a bad ``max_duration_s`` or ``max_samples``, or a ``path`` of another type.

    Examples
    --------
    >>> import os, tempfile, numpy as np, soundfile
    >>> from mmcore.preprocess import load_audio
    >>> path = os.path.join(tempfile.mkdtemp(), "stereo.wav")
    >>> soundfile.write(path, np.zeros((44100, 2), np.float32), 44100)
    >>> load_audio(path).shape                 # mono, resampled to 16 kHz
    (16000,)
    >>> load_audio(path, sr=None, mono=False).shape
    (2, 44100)
    >>> with open(path, "rb") as fh:
    ...     data = fh.read()
    >>> load_audio(data).shape                 # the file's bytes: the same audio
    (16000,)
    """
    return load_audio_with_rate(path, sr=sr, mono=mono, max_duration_s=max_duration_s,
                                max_samples=max_samples)[0]


# --------------------------------------------------------------------------------------------
# batched features

#: A 2-D float array is a batch ``(B, T)`` of ``B`` clips of ``T`` samples. With ``T`` up to
#: this many it is refused as a ``(T, C)`` multichannel layout (what ``soundfile.read``
#: returns for stereo: ``(T, 2)``), which would otherwise be taken as ``T`` clips of ``C``
#: samples.
CHANNEL_LIKE_MAX = 8
#: A 2-D float array with clips shorter than this (in samples, 4 ms at 16 kHz) is refused as
#: ambiguous as well: no such batch is meaningful audio, while a (T, C) array with many
#: channels is.
MIN_BATCH_CLIP_SAMPLES = 64
#: A 2-D float array with more clips than samples per clip, and clips shorter than this, is
#: refused as ambiguous too (a (T, C) array with many channels; taken as a batch, every one of
#: its T "clips" would be padded to the model's clip length).
AMBIGUOUS_BATCH_CLIP_SAMPLES = 1024
#: Sample rates a ``(waveform, sample_rate)`` item may carry, in Hz (resampling from far
#: below the target rate would multiply the clip's length).
MIN_ITEM_SAMPLE_RATE = 1000
MAX_ITEM_SAMPLE_RATE = 768000

_CHANNELS_HINT = ("average the channels to one mono clip with x.mean(axis=1), or pass one "
                  "clip per channel with x.T (a (C, T) batch)")


def _is_scalar_number(x: Any) -> bool:
    if isinstance(x, (bool, np.bool_)):
        return False
    if isinstance(x, (int, float, np.integer, np.floating)):
        return True
    return isinstance(x, np.ndarray) and x.ndim == 0 and x.dtype.kind in "iuf"


def split_audio_pair(value: Any, *, op: str = "AudioPreprocessor", where: str = "audio"
                     ) -> Optional[Tuple[Any, int]]:
    """``(waveform, sample_rate)`` when ``value`` is such a pair, else None.

    A pair is a 2-element tuple or list whose first element is a waveform (an array or a
    list of numbers, not a number) and whose second is a number: the clip's sample rate in
    Hz (an int, an integral float, or a 0-d integer array, as the distributed payload carries
    it). Two numbers are a 2-sample waveform, not a pair.

    Raises
    ------
    ArgumentError
        The rate is not a whole number in [MIN_ITEM_SAMPLE_RATE, MAX_ITEM_SAMPLE_RATE], or
        the first element is a file path or encoded audio bytes (files carry their own rate).
    """
    if (not isinstance(value, (list, tuple)) or len(value) != 2
            or not _is_scalar_number(value[1]) or _is_scalar_number(value[0])):
        return None
    wave, rate = value
    if isinstance(wave, AUDIO_PATH_TYPES):
        raise ArgumentError(f"[{op}] {where} pairs the file {os.fsdecode(wave)!r} with a sample "
                            "rate; files carry their own rate: pass the path alone")
    if isinstance(wave, AUDIO_BYTES_TYPES):
        raise ArgumentError(f"[{op}] {where} pairs encoded audio ({type(wave).__name__}) with a "
                            "sample rate; encoded audio carries its own rate: pass the bytes "
                            "alone (raw PCM: a float array in a (waveform, rate) pair)")
    r = rate.item() if isinstance(rate, np.ndarray) else rate
    if (isinstance(r, (float, np.floating)) and not float(r).is_integer()) or not (
            MIN_ITEM_SAMPLE_RATE <= float(r) <= MAX_ITEM_SAMPLE_RATE):
        raise ArgumentError(f"[{op}] {where} is a (waveform, sample_rate) pair with sample_rate="
                            f"{r!r}; expected a whole number of Hz in [{MIN_ITEM_SAMPLE_RATE}, "
                            f"{MAX_ITEM_SAMPLE_RATE}]")
    return wave, int(r)


def _float_dtype_error(op: str, where: str, arr: np.ndarray) -> ShapeError:
    hint = (" (integer PCM: divide int16 by 32768)"
            if np.issubdtype(arr.dtype, np.integer) else "")
    return ShapeError(f"[{op}] {where} has shape {arr.shape} and dtype {arr.dtype}, expected "
                      f"float audio in [-1, 1]{hint}")


def _check_clip(op: str, where: str, clip: Any) -> None:
    """ShapeError unless ``clip`` is one 1-D float waveform (lists of numbers included)."""
    arr = clip if isinstance(clip, np.ndarray) else np.asarray(clip)
    if arr.dtype == object:
        raise ShapeError(f"[{op}] {where} is not a numeric array (ragged or mixed items?); "
                         "expected a 1-D float waveform (T,)")
    if arr.ndim != 1:
        hint = ""
        if arr.ndim == 2 and min(arr.shape) <= CHANNEL_LIKE_MAX:
            hint = ("; for a multichannel clip (T, C) or (C, T), average the channels to one "
                    "mono clip (x.mean(axis=1) for (T, C), x.mean(axis=0) for (C, T))")
        raise ShapeError(f"[{op}] {where} has shape {arr.shape}, expected a 1-D waveform "
                         f"(T,){hint}")
    if arr.dtype.kind != "f":
        raise _float_dtype_error(op, where, arr)


def check_clip_batch(shape: Tuple[int, ...], *, op: str = "AudioPreprocessor",
                     where: str = "audio") -> None:
    """Refuse a 2-D float array of ``shape`` that is not clearly a ``(B, T)`` batch of clips.

    A ``(B, T)`` array is never taken for anything else: with ``T <= CHANNEL_LIKE_MAX`` (it
    looks like soundfile's ``(T, C)`` multichannel layout), ``T < MIN_BATCH_CLIP_SAMPLES``,
    or ``B > T`` with ``T < AMBIGUOUS_BATCH_CLIP_SAMPLES`` it is refused with a ShapeError
    saying how to pass channels, and an empty batch (``B = 0``) is refused too.
    """
    B, T = int(shape[0]), int(shape[1])
    if B == 0:
        raise ShapeError(f"[{op}] {where} is an empty batch (B = 0)")
    if T <= CHANNEL_LIKE_MAX:
        raise ShapeError(f"[{op}] {where} has shape {tuple(shape)}: a 2-D array is a batch "
                         f"(B, T) of B clips of T samples, and {T} sample(s) per clip looks "
                         f"like a (T, C) multichannel layout (soundfile.read returns stereo "
                         f"as (T, 2)), which is not taken as {B} clips; {_CHANNELS_HINT}")
    if T < MIN_BATCH_CLIP_SAMPLES:
        raise ShapeError(f"[{op}] {where} has shape {tuple(shape)}: a 2-D array is a batch "
                         f"(B, T) of B clips of T samples, and clips of {T} samples (fewer "
                         f"than {MIN_BATCH_CLIP_SAMPLES}) are too short to be audio; if it is "
                         f"a (T, C) multichannel array, {_CHANNELS_HINT}")
    if B > T and T < AMBIGUOUS_BATCH_CLIP_SAMPLES:
        raise ShapeError(f"[{op}] {where} has shape {tuple(shape)}: a 2-D array is a batch "
                         f"(B, T) of B clips of T samples, and {B} clips of {T} samples each "
                         f"(more clips than samples per clip, each shorter than "
                         f"{AMBIGUOUS_BATCH_CLIP_SAMPLES}) is ambiguous with a (T, C) "
                         f"multichannel array; if it is one, {_CHANNELS_HINT}; for a batch of "
                         "short clips pass a list of 1-D arrays")


def audio_batch_size(audio: Any, *, op: str = "AudioPreprocessor", where: str = "audio") -> int:
    """The number of clips in a raw audio input, after checking its layout (not its values).

    Accepted (see :class:`AudioPreprocessor`): a path (``str`` / ``os.PathLike``); encoded
    audio (``bytes`` / ``bytearray`` / ``memoryview``: one clip, not an array of bytes); a
    1-D float waveform ``(T,)`` (or a list of numbers); a ``(waveform, sample_rate)`` pair; a
    2-D float batch ``(B, T)`` (see :func:`check_clip_batch`); a list/tuple of paths, encoded
    audio, 1-D waveforms and pairs.

    Raises
    ------
    ShapeError
        Any other rank, dtype or layout; the message names ``where`` and what is accepted.
    ArgumentError
        A pair with an invalid rate (see :func:`split_audio_pair`).
    """
    if isinstance(audio, _SOURCE_TYPES):
        return 1
    pair = split_audio_pair(audio, op=op, where=where)
    if pair is not None:
        _check_clip(op, f"the waveform of {where}", pair[0])
        return 1
    if isinstance(audio, (list, tuple)):
        if len(audio) == 0:
            raise ShapeError(f"[{op}] {where} is an empty batch")
        if all(_is_scalar_number(a) for a in audio):
            return 1                                        # one waveform as a list
        for i, a in enumerate(audio):
            if isinstance(a, _SOURCE_TYPES):
                continue
            p = split_audio_pair(a, op=op, where=f"{where} item {i}")
            _check_clip(op, f"{where} item {i}" if p is None
                        else f"the waveform of {where} item {i}", a if p is None else p[0])
        return len(audio)
    try:
        arr = np.asarray(audio)
    except Exception as exc:
        raise ShapeError(f"[{op}] {where} cannot be converted to an array: {exc}") from None
    if arr.dtype == object or arr.ndim == 0:
        raise ShapeError(f"[{op}] {where} has shape {arr.shape} and dtype {arr.dtype}, "
                         "expected a 1-D float waveform (T,), a (B, T) batch, a "
                         "(waveform, sample_rate) pair, a path, encoded audio bytes, or a "
                         "list of those")
    if arr.dtype.kind != "f":
        raise _float_dtype_error(op, where, arr)
    if arr.ndim == 1:
        return 1
    if arr.ndim == 2:
        check_clip_batch(arr.shape, op=op, where=where)
        return int(arr.shape[0])
    raise ShapeError(f"[{op}] {where} has {arr.ndim} dims (shape {arr.shape}), expected 1 (T,) "
                     "or 2 (B, T), a (waveform, sample_rate) pair, a path or a list of those")


class AudioPreprocessor:
    """Turn waveforms or audio files into a padded batch of features in one op call.

    Parameters
    ----------
    config : PreprocessingConfig, mapping or None
        The audio settings (a mapping is passed to :meth:`PreprocessingConfig.from_dict`;
        None uses the defaults, Whisper). ``config.modality`` must be ``"audio"``.

    Call
    ----
    ``preprocessor(audio, *, sampling_rate=None)`` where ``audio`` is one of

    * a 1-D float array ``(T,)`` (one waveform) or a list of numbers;
    * a ``(waveform, sample_rate)`` pair (a 2-element tuple or list): one 1-D waveform and
      its rate in Hz (an int in [1000, 768000]);
    * a 2-D float array ``(B, T)``: a batch of ``B`` equal-length waveforms, one per row;
    * a list/tuple of 1-D arrays of different lengths, ``(waveform, sample_rate)`` pairs,
      file paths and/or encoded audio;
    * a file path (str or os.PathLike);
    * encoded audio: the bytes of an audio file (``bytes``, ``bytearray`` or ``memoryview``;
      WAV, FLAC, OGG, ... as :func:`load_audio` reads them; bytes were a file name before).

    Channels: a 2-D array is always a batch of clips, never channels. soundfile returns
    multichannel audio as ``(T, C)``; such an array (``T <= 8``, fewer than 64 samples per
    "clip", or more "clips" than samples per clip with fewer than 1024) is refused with a
    :class:`~mmcore.errors.ShapeError` rather than taken as ``T`` tiny clips: average it to
    mono yourself (``x.mean(axis=1)``), or pass ``x.T`` to encode one clip per channel.
    Files are mixed to mono by the decoder (``config.mono``).

    Files and encoded audio are decoded with :func:`load_audio` at ``config.sample_rate``
    (mixed to mono when ``config.mono``). A pair's waveform is at the pair's rate; other
    arrays are taken to be at ``sampling_rate`` Hz (default ``config.sample_rate``; like a
    pair's rate it must lie in [1000, 768000] Hz, so that no rate can multiply a clip's
    length). Either is resampled to ``config.sample_rate`` with :func:`resample` (soxr "HQ",
    as :func:`load_audio` does) when it differs. Arrays must be floating point (float16/32/64,
    computed in float32) and finite; integer PCM must be scaled first (int16: divide by 32768).

    Lengths: an item longer than ``config.max_length_s`` is cut to it (raises ShapeError with
    ``truncation=False``). Then ``padding="max_length"`` zero-pads or cuts every item to
    ``config.target_length`` samples (``chunk_length_s``, 30 s = 480000 samples for Whisper,
    like ``whisper.pad_or_trim``); ``"longest"`` zero-pads to the longest item; ``"none"``
    requires equal lengths. The padded batch goes through ONE call of

    * ``preset="whisper"``: ``mmcore.ops.log_mel_spectrogram(x, n_mels=..., preset="whisper")``
      -> ``(B, n_mels, T // hop_length)`` (3000 frames for 30 s);
    * ``preset="fbank"``: ``mmcore.ops.fbank(x * 32768, sr=..., n_mels=..., frame_length_ms=
      n_fft / sr, frame_shift_ms=hop_length / sr)`` (Kaldi defaults otherwise: no dither,
      snip_edges) -> ``(B, frames, n_mels)``; the audio is scaled to the int16 range first, as
      Kaldi expects;
    * ``preset=None``: ``log(max(mmcore.ops.mel_spectrogram(x, sr, n_fft, hop_length,
      n_mels), 1e-10))`` (natural log of the power mel spectrogram) -> ``(B, n_mels, frames)``.

    Returns
    -------
    dict
        ``"input_features"``: float32, ``(B, n_mels, frames)`` (fbank: ``(B, frames, n_mels)``).
        ``"attention_mask"``: bool ``(B, frames)``, True = real frame. A frame is real when its
        analysis window overlaps at least one real (not padded) sample: with ``center=True``
        framing (whisper, None) frame ``i`` starts at sample ``i * hop - n_fft // 2``, with
        Kaldi framing (fbank, snip_edges) at ``i * hop``, so an item of ``L > 0`` samples has
        ``min(frames, ceil((L + n_fft // 2) / hop))`` (resp. ``ceil(L / hop)``) real frames, all
        at the start; an empty item has none. (Hugging Face's Whisper extractor counts a frame
        real when its *centre* sample is real, ``ceil(L / hop)`` frames, which leaves out the
        one or two last frames that still see some real audio.)

    Examples
    --------
    >>> import numpy as np
    >>> from mmcore.config import PreprocessingConfig
    >>> from mmcore.preprocess import AudioPreprocessor
    >>> pre = AudioPreprocessor(PreprocessingConfig())          # Whisper, 80 mels, 30 s
    >>> out = pre([np.zeros(16000, np.float32), np.zeros(8000, np.float32)])
    >>> out["input_features"].shape, out["attention_mask"].sum(axis=1).tolist()
    ((2, 80, 3000), [102, 52])
    """

    def __init__(self, config: Union[PreprocessingConfig, Mapping[str, Any], None] = None):
        cfg: PreprocessingConfig
        if config is None:
            cfg = PreprocessingConfig()
        elif isinstance(config, Mapping):
            cfg = PreprocessingConfig.from_dict(config)
        elif isinstance(config, PreprocessingConfig):
            cfg = config
        else:
            raise ConfigError(f"AudioPreprocessor.config must be a PreprocessingConfig, a mapping "
                              f"or None, got {type(config).__name__}")
        if cfg.modality != "audio":
            raise ConfigError(f"AudioPreprocessor.config.modality must be 'audio', "
                              f"got {cfg.modality!r}")
        self.config = cfg

    def __repr__(self) -> str:
        return f"AudioPreprocessor({self.config!r})"

    # -- inputs ---------------------------------------------------------------------------------
    def _items(self, audio: Any, sampling_rate: Optional[int]) -> List[np.ndarray]:
        cfg = self.config
        if isinstance(audio, _SOURCE_TYPES):
            return [self._load(audio, 0)]
        audio_batch_size(audio)                          # layout checks (ShapeError)
        pair = split_audio_pair(audio)
        if pair is not None:
            return [self._array(pair[0], 0, pair[1])]
        if isinstance(audio, (list, tuple)):
            if all(_is_scalar_number(a) for a in audio):
                return [self._array(audio, 0, sampling_rate)]  # one waveform as a list
            items = []
            for i, a in enumerate(audio):
                if isinstance(a, _SOURCE_TYPES):
                    items.append(self._load(a, i))
                    continue
                p = split_audio_pair(a, where=f"audio item {i}")
                items.append(self._array(a, i, sampling_rate) if p is None
                             else self._array(p[0], i, p[1]))
            return items
        arr = self._as_float(audio, "audio")
        if arr.ndim == 1:
            return [self._resampled(arr, sampling_rate)]
        if arr.ndim == 2:
            if sampling_rate is not None and sampling_rate != cfg.sample_rate:
                arr = resample(arr, sampling_rate, cfg.sample_rate)
            return list(arr)
        raise ShapeError(f"[AudioPreprocessor] audio has {arr.ndim} dims, expected 1 (T,) or "
                         "2 (B, T), a list of waveforms, file paths or encoded audio")

    def _load(self, path: Any, i: int) -> np.ndarray:
        cfg = self.config
        x, _ = _load_with_rate(path, op="load_audio", name=f"audio item {i}",
                               sr=cfg.sample_rate, mono=cfg.mono, max_duration_s=None,
                               max_samples=None)
        if x.ndim != 1:
            if x.shape[0] == 1:
                return x[0]
            shown = (repr(os.fsdecode(path)) if isinstance(path, AUDIO_PATH_TYPES)
                     else f"encoded audio, {type(path).__name__}")
            raise ShapeError(f"[AudioPreprocessor] item {i} ({shown}) has "
                             f"{x.shape[0]} channels; features are computed per 1-D waveform: "
                             "use mono=True to average them")
        return x

    @staticmethod
    def _as_float(a: Any, name: str) -> np.ndarray:
        try:
            arr = np.asarray(a)
        except Exception as exc:
            raise ShapeError(f"[AudioPreprocessor] {name} cannot be converted to an array: "
                             f"{exc}") from None
        if arr.dtype == object:
            raise ShapeError(f"[AudioPreprocessor] {name} is not a numeric array (ragged or "
                             "mixed items?); pass a list of 1-D arrays")
        if not np.issubdtype(arr.dtype, np.floating):
            hint = (" (integer PCM: divide int16 by 32768)"
                    if np.issubdtype(arr.dtype, np.integer) else "")
            raise ShapeError(f"[AudioPreprocessor] {name} has dtype {arr.dtype}, expected float "
                             f"audio in [-1, 1]{hint}")
        arr = np.asarray(arr, dtype=np.float32)
        if arr.size and not np.isfinite(arr).all():
            raise ShapeError(f"[AudioPreprocessor] {name} holds NaN or infinite samples")
        return arr

    def _array(self, a: Any, i: int, sampling_rate: Optional[int]) -> np.ndarray:
        arr = self._as_float(a, f"item {i}")
        if arr.ndim != 1:
            _check_clip("AudioPreprocessor", f"item {i}", arr)
        return self._resampled(arr, sampling_rate)

    def _resampled(self, x: np.ndarray, sampling_rate: Optional[int]) -> np.ndarray:
        if sampling_rate is not None and sampling_rate != self.config.sample_rate:
            return resample(x, sampling_rate, self.config.sample_rate)
        return x

    # -- lengths --------------------------------------------------------------------------------
    def _fit_lengths(self, items: List[np.ndarray]) -> Tuple[np.ndarray, np.ndarray]:
        """Cut/pad to the batch layout; returns the (B, T) float32 batch and real lengths."""
        cfg = self.config
        sr = cfg.sample_rate
        max_n = cfg.max_samples
        if max_n is not None:
            for i, x in enumerate(items):
                if x.shape[0] > max_n:
                    if not cfg.truncation:
                        raise ShapeError(
                            f"[AudioPreprocessor] item {i} lasts {x.shape[0] / sr:.3f} s "
                            f"({x.shape[0]} samples), longer than max_length_s={cfg.max_length_s} "
                            f"({max_n} samples), and truncation=False")
                    items[i] = x[:max_n]
        lengths = np.array([x.shape[0] for x in items], dtype=np.int64)
        if cfg.padding == "max_length":
            T = cfg.target_length
            over = np.flatnonzero(lengths > T)
            if over.size and not cfg.truncation:
                i = int(over[0])
                raise ShapeError(f"[AudioPreprocessor] item {i} lasts {lengths[i] / sr:.3f} s "
                                 f"({lengths[i]} samples), longer than the {T} samples it is "
                                 "padded to, and truncation=False")
            lengths = np.minimum(lengths, T)
        elif cfg.padding == "longest":
            T = int(lengths.max())
        else:  # "none"
            T = int(lengths[0])
            if (lengths != T).any():
                raise ShapeError(f"[AudioPreprocessor] padding='none' needs items of equal length, "
                                 f"got lengths {lengths.tolist()} (use padding='longest')")
        if T == 0:
            raise ShapeError("[AudioPreprocessor] every item is empty (0 samples)")
        if len(items) == 1 and lengths[0] == T and items[0].flags.c_contiguous:
            batch = items[0][None, :T]
        else:
            batch = np.zeros((len(items), T), np.float32)
            for row, x, n in zip(batch, items, lengths):
                row[:n] = x[:n]
        return batch, lengths

    # -- features -------------------------------------------------------------------------------
    @staticmethod
    def _op(name: str):
        fn = getattr(ops, name, None)
        if fn is None:
            raise ConfigError(f"AudioPreprocessor: this mmcore build has no mmcore.ops.{name}")
        return fn

    def _features(self, batch: np.ndarray) -> np.ndarray:
        """Features of the padded (B, T) batch: one op call."""
        cfg = self.config
        if cfg.preset == "whisper":
            feats = self._op("log_mel_spectrogram")(batch, n_mels=cfg.n_mels, preset="whisper")
            return feats
        if cfg.preset == "fbank":
            sr = cfg.sample_rate
            feats = self._op("fbank")(batch * np.float32(KALDI_INT16_SCALE), sr=sr,
                                      n_mels=cfg.n_mels,
                                      frame_length_ms=cfg.n_fft * 1000.0 / sr,
                                      frame_shift_ms=cfg.hop_length * 1000.0 / sr)
            return feats
        mel = self._op("mel_spectrogram")(batch, sr=cfg.sample_rate, n_fft=cfg.n_fft,
                                          hop_length=cfg.hop_length, n_mels=cfg.n_mels)
        mel = np.asarray(mel, dtype=np.float32)
        if not mel.flags.writeable:
            mel = mel.copy()
        np.maximum(mel, np.float32(LOG_MEL_FLOOR), out=mel)
        np.log(mel, out=mel)
        return mel

    def frame_mask(self, lengths: Union[Sequence[int], np.ndarray], n_frames: int) -> np.ndarray:
        """The ``attention_mask`` for items of ``lengths`` real samples and ``n_frames`` frames.

        See the class docstring for the rule (a frame is real when its window overlaps a real
        sample).
        """
        cfg = self.config
        offset = 0 if cfg.preset == "fbank" else cfg.n_fft // 2
        L = np.asarray(lengths, dtype=np.int64)
        real = -(-(L + offset) // cfg.hop_length)          # ceil((L + offset) / hop)
        real = np.where(L > 0, np.minimum(real, n_frames), 0)
        return np.arange(n_frames)[None, :] < real[:, None]

    def __call__(self, audio: Any, *, sampling_rate: Optional[int] = None) -> Dict[str, np.ndarray]:
        """Features and frame mask of ``audio`` (see the class docstring)."""
        sampling_rate = _check_rate("AudioPreprocessor", "sampling_rate", sampling_rate,
                                    optional=True)
        if sampling_rate is not None and not (
                MIN_ITEM_SAMPLE_RATE <= sampling_rate <= MAX_ITEM_SAMPLE_RATE):
            # as for (waveform, rate) pairs: a tiny rate would multiply the clip's length
            raise ArgumentError(f"[AudioPreprocessor] sampling_rate must be in "
                                f"[{MIN_ITEM_SAMPLE_RATE}, {MAX_ITEM_SAMPLE_RATE}] Hz, got "
                                f"{sampling_rate}")
        items = self._items(audio, sampling_rate)
        batch, lengths = self._fit_lengths(items)
        feats = self._features(batch)
        feats = np.ascontiguousarray(feats, dtype=np.float32)
        frame_axis = 1 if self.config.preset == "fbank" else 2
        mask = self.frame_mask(lengths, feats.shape[frame_axis])
        return {"input_features": feats, "attention_mask": mask}
