"""The framed binary protocol between the coordinator and shard nodes.

A frame is a fixed 20-byte header, a small JSON header and the raw bytes of zero or more
arrays::

    offset  size  field
    0       4     magic b"MMCF"
    4       1     protocol version (1)
    5       1     message type (:class:`MsgType`)
    6       2     flags (reserved, 0)
    8       4     length of the JSON header in bytes (little endian)
    12      8     length of the array payload in bytes (little endian)

The JSON header is a UTF-8 object. Its ``"arrays"`` entry lists the arrays of the payload as
``{"dtype": "<f4", "shape": [2, 3], "offset": 0}``; dtypes come from an allow-list (booleans,
integers, floats; never objects), offsets are 64-byte aligned, ascending and do not overlap.
Every length, count and shape is checked against :class:`FrameLimits` *before* anything is
allocated, so a hostile or broken peer cannot make the receiver allocate more than the limits.
Nothing is ever unpickled or evaluated.

Arrays are sent without copies (``socket.sendmsg`` of the header and the arrays' own buffers)
and received into one buffer that the returned arrays view.

Time is bounded too, for a server facing peers that stall or drip: :func:`recv_frame` and
:func:`send_frame` take a ``deadline`` for the whole frame (a handshake) and a :class:`Pace`
(once a frame has started, its bytes must keep a minimum rate), and a server's ``on_header``
callback may refuse a frame by its declared size (:class:`FrameRefused`: the frame is then
read past in small chunks, never buffered).

Examples
--------
>>> import numpy as np
>>> from mmcore.distributed.protocol import encode_frame, decode_frame, MsgType
>>> data = b"".join(bytes(b) for b in encode_frame(MsgType.HEALTH, {"id": "x"},
...                                                  [np.arange(3, dtype=np.float32)]))
>>> f = decode_frame(data)
>>> f.type.name, f.header["id"], f.arrays[0].tolist()
('HEALTH', 'x', [0.0, 1.0, 2.0])
"""

from __future__ import annotations

import enum
import json
import math
import socket
import struct
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence

import numpy as np

from ..errors import ProtocolError

__all__ = ["MAGIC", "VERSION", "HEADER", "MsgType", "FrameLimits", "Frame", "ConnectionClosed",
           "FrameRefused", "Pace", "encode_frame", "decode_frame", "send_frame", "recv_frame",
           "ALLOWED_DTYPES"]

MAGIC = b"MMCF"
VERSION = 1
HEADER = struct.Struct("<4sBBHIQ")
_ALIGN = 64

#: dtypes that may travel (little endian); anything else is refused on both sides.
ALLOWED_DTYPES = frozenset(["|b1", "|u1", "|i1", "<u2", "<i2", "<u4", "<i4", "<u8", "<i8",
                            "<f2", "<f4", "<f8"])


class MsgType(enum.IntEnum):
    """Message types of the protocol."""

    CHALLENGE = 1     # node -> client: a nonce to authenticate against
    AUTH = 2          # client -> node: the client's nonce and HMAC
    AUTH_OK = 3       # node -> client: the node's HMAC (mutual authentication)
    AUTH_FAIL = 4     # node -> client: wrong token; the connection closes
    ENCODE = 5        # client -> node: preprocess + encode one modality's inputs
    RESULT = 6        # node -> client: tokens, mask, pooled
    ERROR = 7         # node -> client: the request failed (error class and message)
    HEALTH = 8        # client -> node: health check
    HEALTH_OK = 9     # node -> client: modalities, load, hardware


class ConnectionClosed(ProtocolError):
    """The peer closed the connection (at a frame boundary or inside a frame:
    :attr:`at_boundary` tells which)."""

    def __init__(self, message: str = "", *, at_boundary: bool = True):
        super().__init__(message)
        self.at_boundary = at_boundary


class FrameRefused(ProtocolError):
    """Raised by a :func:`recv_frame` ``on_header`` callback to refuse a frame whose fixed
    header arrived (a server out of memory budget, say).

    :func:`recv_frame` then reads the frame's JSON header (when ``read_json``; else it skips
    it), reads and drops the payload in small chunks without buffering it, so the connection
    stays at a frame boundary, and re-raises the exception with :attr:`header` set to the
    frame's JSON header (``{}`` when skipped or unparsable).

    Parameters
    ----------
    message : str
    error : str, default "ProtocolError", keyword-only
        The error name a server reports for it.
    read_json : bool, default True, keyword-only
    """

    def __init__(self, message: str = "", *, error: str = "ProtocolError",
                 read_json: bool = True):
        super().__init__(message)
        self.error = error
        self.read_json = read_json
        self.header: Dict[str, Any] = {}


@dataclass(frozen=True)
class Pace:
    """How fast a frame must move once it has started (bounds a peer that stalls or drips).

    A frame being received (from its first byte) or sent must have moved ``k`` bytes by
    ``start + base_s + k / min_bytes_per_s``; otherwise the read or write times out
    (``socket.timeout``). A frame of ``n`` bytes thus takes at most
    ``base_s + n / min_bytes_per_s`` seconds, and a peer that stops sending is dropped
    after ``base_s`` seconds however large the frame it declared.

    Parameters
    ----------
    base_s : float, default 10
    min_bytes_per_s : float, default 256 KiB/s
    """

    base_s: float = 10.0
    min_bytes_per_s: float = 256.0 * 1024

    def __post_init__(self):
        for name in ("base_s", "min_bytes_per_s"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not (
                    math.isfinite(v) and v > 0):
                raise ProtocolError(f"[protocol] Pace.{name} must be a finite number > 0, got "
                                    f"{v!r}")


@dataclass(frozen=True)
class FrameLimits:
    """Upper bounds checked before a frame is allocated.

    Parameters
    ----------
    max_frame_bytes : int, default 1 GiB
        JSON header plus payload.
    max_json_bytes : int, default 1 MiB
    max_arrays : int, default 4096
    max_ndim : int, default 8
    """

    max_frame_bytes: int = 1 << 30
    max_json_bytes: int = 1 << 20
    max_arrays: int = 4096
    max_ndim: int = 8


DEFAULT_LIMITS = FrameLimits()


@dataclass
class Frame:
    """A decoded frame: its type, flags, JSON header and arrays (views of one buffer)."""

    type: MsgType
    header: Dict[str, Any]
    arrays: List[np.ndarray] = field(default_factory=list)
    flags: int = 0


def _wire_dtype(a: np.ndarray) -> np.dtype:
    dt = a.dtype
    if dt.byteorder == ">" or (dt.byteorder == "=" and not np.little_endian):
        dt = dt.newbyteorder("<")
    return dt


def encode_frame(msg_type: int, header: Optional[Dict[str, Any]] = None,
                 arrays: Sequence[np.ndarray] = (), *, flags: int = 0) -> List[memoryview]:
    """The buffers of one frame, ready for ``sendmsg`` (the arrays are not copied when they
    are C-contiguous little-endian).

    Raises
    ------
    ProtocolError
        A dtype outside :data:`ALLOWED_DTYPES`, a header that is not a JSON object, or a
        header that already has an ``"arrays"`` entry.
    """
    hdr = dict(header or {})
    if "arrays" in hdr:
        raise ProtocolError("[protocol] header must not have an 'arrays' entry (it is written "
                            "by encode_frame)")
    bufs: List[memoryview] = []
    descs = []
    offset = 0
    for i, a in enumerate(arrays):
        a = np.asarray(a)
        dt = _wire_dtype(a)
        if dt.str not in ALLOWED_DTYPES:
            raise ProtocolError(f"[protocol] arrays[{i}] has dtype {a.dtype}, which the "
                                "protocol does not carry")
        a = np.asarray(a, dtype=dt, order="C")     # keeps 0-d arrays 0-d
        pad = (-offset) % _ALIGN
        if pad:
            bufs.append(memoryview(bytes(pad)))
            offset += pad
        descs.append({"dtype": dt.str, "shape": list(a.shape), "offset": offset})
        if a.nbytes:
            bufs.append(a.reshape(-1).data.cast("B"))
        offset += a.nbytes
    hdr["arrays"] = descs
    try:
        js = json.dumps(hdr, separators=(",", ":"), allow_nan=False).encode("utf-8")
    except (TypeError, ValueError) as exc:
        raise ProtocolError(f"[protocol] header is not plain JSON: {exc}") from None
    head = HEADER.pack(MAGIC, VERSION, int(msg_type), int(flags), len(js), offset)
    return [memoryview(head + js)] + bufs


def _parse_fixed(head: bytes, limits: FrameLimits):
    magic, version, mtype, flags, jlen, plen = HEADER.unpack(head)
    if magic != MAGIC:
        raise ProtocolError(f"[protocol] bad magic {magic!r} (expected {MAGIC!r})")
    if version != VERSION:
        raise ProtocolError(f"[protocol] unsupported protocol version {version} (this side "
                            f"speaks {VERSION})")
    try:
        mtype = MsgType(mtype)
    except ValueError:
        raise ProtocolError(f"[protocol] unknown message type {mtype}") from None
    if jlen > limits.max_json_bytes:
        raise ProtocolError(f"[protocol] JSON header of {jlen} bytes exceeds the limit of "
                            f"{limits.max_json_bytes}")
    if jlen + plen > limits.max_frame_bytes:
        raise ProtocolError(f"[protocol] frame of {jlen + plen} bytes exceeds the limit of "
                            f"{limits.max_frame_bytes}")
    return mtype, flags, jlen, plen


def _parse_json(raw: bytes) -> Dict[str, Any]:
    try:
        hdr = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise ProtocolError(f"[protocol] JSON header does not parse: {exc}") from None
    if not isinstance(hdr, dict):
        raise ProtocolError("[protocol] JSON header is not an object")
    return hdr


def _check_arrays(hdr: Dict[str, Any], plen: int, limits: FrameLimits) -> List[tuple]:
    """``[(dtype, shape, offset, nbytes)]`` of the header's array list, all bounds checked."""
    descs = hdr.pop("arrays", [])
    if not isinstance(descs, list):
        raise ProtocolError("[protocol] 'arrays' is not a list")
    if len(descs) > limits.max_arrays:
        raise ProtocolError(f"[protocol] {len(descs)} arrays exceed the limit of "
                            f"{limits.max_arrays}")
    out = []
    end = 0
    for i, d in enumerate(descs):
        if not isinstance(d, dict):
            raise ProtocolError(f"[protocol] arrays[{i}] is not an object")
        dts, shape, off = d.get("dtype"), d.get("shape"), d.get("offset")
        if not isinstance(dts, str) or dts not in ALLOWED_DTYPES:
            raise ProtocolError(f"[protocol] arrays[{i}] has dtype {dts!r}, which is not "
                                "allowed")
        if (not isinstance(shape, list) or len(shape) > limits.max_ndim
                or not all(type(n) is int and n >= 0 for n in shape)):
            raise ProtocolError(f"[protocol] arrays[{i}] has a bad shape {shape!r}")
        if type(off) is not int or off < end or off % _ALIGN:
            raise ProtocolError(f"[protocol] arrays[{i}] has a bad offset {off!r}")
        dt = np.dtype(dts)
        count = math.prod(shape)
        nbytes = count * dt.itemsize
        if math.prod(max(n, 1) for n in shape) * dt.itemsize > limits.max_frame_bytes:
            # (also for empty arrays: NumPy refuses shapes whose other dims overflow)
            raise ProtocolError(f"[protocol] arrays[{i}] shape {shape} exceeds the frame limit")
        if off + nbytes > plen:
            raise ProtocolError(f"[protocol] arrays[{i}] ({nbytes} bytes at {off}) runs past "
                                f"the payload of {plen} bytes")
        out.append((dt, tuple(shape), off, count))
        end = off + nbytes
    return out


def _views(payload, specs) -> List[np.ndarray]:
    return [np.frombuffer(payload, dtype=dt, count=count, offset=off).reshape(shape)
            for dt, shape, off, count in specs]


def decode_frame(data: bytes, *, limits: FrameLimits = DEFAULT_LIMITS) -> Frame:
    """Decode one whole frame from bytes (the inverse of :func:`encode_frame`).

    Raises
    ------
    ProtocolError
        Anything malformed: bad magic or version, unknown type, limits exceeded, a JSON
        header that does not parse, bad array descriptions, or a length that does not match.
    """
    data = memoryview(data).cast("B") if not isinstance(data, bytes) else data
    if len(data) < HEADER.size:
        raise ProtocolError(f"[protocol] frame of {len(data)} bytes is shorter than the "
                            f"{HEADER.size}-byte header")
    mtype, flags, jlen, plen = _parse_fixed(bytes(data[:HEADER.size]), limits)
    if len(data) != HEADER.size + jlen + plen:
        raise ProtocolError(f"[protocol] frame has {len(data)} bytes, its header says "
                            f"{HEADER.size + jlen + plen}")
    hdr = _parse_json(bytes(data[HEADER.size:HEADER.size + jlen]))
    specs = _check_arrays(hdr, plen, limits)
    payload = bytearray(data[HEADER.size + jlen:])
    return Frame(mtype, hdr, _views(payload, specs), flags)


class _Clock:
    """The timeout of each read or write of one frame on ``sock``: the socket's own timeout
    while waiting for a frame's first byte, then the :class:`Pace` of the frame (once
    :meth:`start` ran), never past ``deadline`` (``time.monotonic()``); the socket's timeout
    is restored by :meth:`restore`."""

    def __init__(self, sock, deadline: Optional[float], pace: Optional[Pace]):
        self.sock = sock
        self.deadline = deadline
        self.pace = pace
        self.own = sock.gettimeout()
        self.current = self.own
        self.t0: Optional[float] = None
        self.moved = 0
        self.why = ""                 # what the current timeout stands for

    def timed_out(self) -> socket.timeout:
        return socket.timeout(f"[protocol] timed out: {self.why}" if self.why else
                              "timed out")

    def start(self) -> None:
        self.t0 = time.monotonic()
        self.moved = 0

    def arm(self, what: str) -> None:
        if self.deadline is None and (self.pace is None or self.t0 is None):
            self.why = ""
            return
        now = time.monotonic()
        left = self.own
        why = ""
        if self.pace is not None and self.t0 is not None:
            p = self.t0 + self.pace.base_s + self.moved / self.pace.min_bytes_per_s - now
            if left is None or p < left:
                left, why = p, (f"the {what} moves slower than "
                                f"{self.pace.min_bytes_per_s:.0f} bytes/s after "
                                f"{self.pace.base_s:g} s")
        if self.deadline is not None and (left is None or self.deadline - now < left):
            left, why = self.deadline - now, f"the deadline passed during the {what}"
        self.why = why
        if left is not None and left <= 0:
            raise self.timed_out()
        if left != self.current:
            self.sock.settimeout(left)
            self.current = left

    def restore(self) -> None:
        if self.current != self.own:
            try:
                self.sock.settimeout(self.own)
            except OSError:
                pass
            self.current = self.own


def _recv_exact(sock: socket.socket, view: memoryview, what: str,
                clock: Optional[_Clock] = None) -> None:
    got = 0
    n = len(view)
    while got < n:
        if clock is None:
            k = sock.recv_into(view[got:], n - got)
        else:
            clock.arm(what)
            try:
                k = sock.recv_into(view[got:], n - got)
            except socket.timeout:
                raise clock.timed_out() from None
        if k == 0:
            boundary = got == 0 and what == "header"
            raise ConnectionClosed(f"[protocol] connection closed "
                                   f"{'before a frame' if boundary else 'inside a frame'}"
                                   f" ({got} of {n} bytes of the {what})",
                                   at_boundary=boundary)
        got += k
        if clock is not None:
            if clock.pace is not None and clock.t0 is None:
                clock.start()                    # the frame's first byte arrived
            clock.moved += k


_DISCARD_CHUNK = 1 << 20


def _discard(sock: socket.socket, n: int, what: str, clock: _Clock) -> None:
    """Read and drop ``n`` bytes (a chunk at a time: nothing the size of ``n`` is held)."""
    buf = memoryview(bytearray(min(n, _DISCARD_CHUNK)))
    while n > 0:
        k = min(n, len(buf))
        _recv_exact(sock, buf[:k], what, clock)
        n -= k


def recv_frame(sock: socket.socket, *, limits: FrameLimits = DEFAULT_LIMITS,
               on_header: Optional[Callable[[MsgType, int, int], None]] = None,
               deadline: Optional[float] = None, pace: Optional[Pace] = None) -> Frame:
    """Read one frame from a socket.

    Parameters
    ----------
    sock : socket.socket
    limits : FrameLimits, keyword-only
    on_header : callable, optional, keyword-only
        ``on_header(type, json_bytes, payload_bytes)`` is called once the fixed header has
        arrived and been checked, before the rest of the frame is read or allocated: a server
        counts the request as in flight and reserves memory for it there. It may raise
        :class:`FrameRefused` to have the frame read past and dropped.
    deadline : float, optional, keyword-only
        A ``time.monotonic()`` time by which the whole frame must have arrived (a handshake).
    pace : Pace, optional, keyword-only
        Once the frame's first byte has arrived, the rest must keep this pace (see
        :class:`Pace`; its clock restarts after ``on_header``). Without it and ``deadline``
        the socket's timeout applies to every read, as it does to the wait for the first
        byte; the socket's timeout is left as it was.

    Raises
    ------
    ConnectionClosed
        The peer closed the connection.
    FrameRefused
        From ``on_header``, once the frame was read past (its JSON header in ``.header``).
    ProtocolError
        A malformed frame (see :func:`decode_frame`); nothing beyond the limits is allocated.
    socket.timeout, OSError
        From the socket, or the deadline / pace missed.
    """
    clock = _Clock(sock, deadline, pace)
    try:
        head = bytearray(HEADER.size)
        _recv_exact(sock, memoryview(head), "header", clock)
        mtype, flags, jlen, plen = _parse_fixed(bytes(head), limits)
        if on_header is not None:
            try:
                on_header(mtype, jlen, plen)
            except FrameRefused as refusal:
                if pace is not None:
                    clock.start()
                if refusal.read_json:
                    js = bytearray(jlen)
                    _recv_exact(sock, memoryview(js), "JSON header", clock)
                    try:
                        refusal.header = _parse_json(bytes(js))
                    except ProtocolError:
                        refusal.header = {}
                    refusal.header.pop("arrays", None)
                else:
                    _discard(sock, jlen, "JSON header", clock)
                _discard(sock, plen, "payload", clock)
                raise
        if pace is not None:
            clock.start()            # (time spent in on_header is not the peer's)
        js = bytearray(jlen)
        _recv_exact(sock, memoryview(js), "JSON header", clock)
        hdr = _parse_json(bytes(js))
        specs = _check_arrays(hdr, plen, limits)
        payload = np.empty(plen, np.uint8)        # not zero-filled: every byte is received
        if plen:
            _recv_exact(sock, payload.data, "payload", clock)
        return Frame(mtype, hdr, _views(payload, specs), flags)
    finally:
        clock.restore()


def _send_buffers(sock: socket.socket, bufs: List[memoryview],
                  clock: Optional[_Clock] = None) -> None:
    if not hasattr(sock, "sendmsg") or type(sock).__name__ == "SSLSocket":
        for b in bufs:
            if clock is None:
                sock.sendall(b)
                continue
            for i in range(0, len(b), _DISCARD_CHUNK):    # paced: one chunk per timeout
                clock.arm("frame being sent")
                try:
                    sock.sendall(b[i:i + _DISCARD_CHUNK])
                except socket.timeout:
                    raise clock.timed_out() from None
                clock.moved += len(b[i:i + _DISCARD_CHUNK])
        return
    pending = [b for b in bufs if len(b)]
    while pending:
        if clock is None:
            sent = sock.sendmsg(pending[:512])
        else:
            clock.arm("frame being sent")
            try:
                sent = sock.sendmsg(pending[:512])
            except socket.timeout:
                raise clock.timed_out() from None
            clock.moved += sent
        while sent:
            if sent >= len(pending[0]):
                sent -= len(pending[0])
                pending.pop(0)
            else:
                pending[0] = pending[0][sent:]
                sent = 0


def send_frame(sock: socket.socket, msg_type: int, header: Optional[Dict[str, Any]] = None,
               arrays: Sequence[np.ndarray] = (), *, flags: int = 0,
               deadline: Optional[float] = None, pace: Optional[Pace] = None) -> None:
    """Encode and send one frame (scatter-gather, no copy of contiguous arrays).

    ``deadline`` (a ``time.monotonic()`` time) and ``pace`` (:class:`Pace`, from the first
    byte) bound the time a peer that does not read may hold the sender (``socket.timeout``);
    without them the socket's timeout applies to each write. The socket's timeout is left as
    it was.
    """
    bufs = encode_frame(msg_type, header, arrays, flags=flags)
    if deadline is None and pace is None:
        _send_buffers(sock, bufs)
        return
    clock = _Clock(sock, deadline, pace)
    if pace is not None:
        clock.start()
    try:
        _send_buffers(sock, bufs, clock)
    finally:
        clock.restore()
