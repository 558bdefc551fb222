"""A shard node: serves preprocess + encode requests for some modalities of a model directory.

``mmcore node --model DIR --modality image [--modality audio] --host 127.0.0.1 --port 0
--token-file F`` runs :func:`run_node`. The node loads only its modalities' preprocessors and
encoders (``MultiModalModel.from_pretrained(DIR, modalities=...)``), listens (port 0: a free
port), prints ``mmcore node listening on HOST:PORT`` once ready, and serves every connection
in its own thread:

* each connection authenticates first (:mod:`mmcore.distributed.auth`), TLS included, under
  one deadline (``handshake_timeout_s``); a wrong token gets AUTH_FAIL and is closed.
  Connections still authenticating have their own budget (``max_pending``; when it is full
  the oldest is closed) and never take the place of an authenticated client;
* once a frame has started, its bytes must keep a minimum pace (``frame_timeout_s``,
  ``min_bytes_per_s``), and every frame reserves its size from a node-wide memory budget
  (``max_inflight_bytes``) before anything is allocated;
* remote inputs are data: a string is never opened as a path on the node (files travel as
  their bytes, into a private temporary directory);
* ENCODE requests (raw or preprocessed inputs of one modality) are answered with RESULT
  frames (tokens, mask, pooled); a request that fails (bad input, a modality this node does
  not serve) gets an ERROR frame naming the error class, and the connection stays open;
* HEALTH requests are answered with the node's modalities, load (requests in flight, served
  so far) and hardware class (``cpu`` / ``gpu``, memory);
* a malformed, truncated or oversized frame closes that connection only, with a logged reason.

On SIGTERM (or :meth:`NodeServer.stop`) the node stops accepting, finishes the requests in
flight (bounded by ``drain_timeout_s``), then exits.

Examples
--------
>>> import tempfile, threading
>>> from mmcore.model import default_model
>>> from mmcore.distributed.node import NodeServer
>>> d = tempfile.mkdtemp(); _ = default_model().save(d + "/m")
>>> node = NodeServer(d + "/m", ["text"], token=b"0123456789abcdef", port=0)
>>> node.address[0]
'127.0.0.1'
>>> node.close()
"""

from __future__ import annotations

import errno
import functools
import ipaddress
import itertools
import logging
import math
import os
import shutil
import signal
import socket
import sys
import tempfile
import threading
import time
import warnings
from collections import OrderedDict
from typing import Any, Dict, Iterable, List, Optional, Tuple

import numpy as np

from .._version import __version__
from ..errors import ConfigError, MMCoreError, ProtocolError
from ..modality import Modality
from .auth import SecurityWarning, resolve_token, server_handshake, server_ssl_context
from .payload import accepted_forms, unpack_input
from .protocol import (
    ConnectionClosed,
    FrameLimits,
    FrameRefused,
    MsgType,
    Pace,
    recv_frame,
    send_frame,
)

__all__ = ["NodeServer", "run_node", "READY_PREFIX"]

log = logging.getLogger("mmcore.node")
READY_PREFIX = "mmcore node listening on "
#: error classes a node reports by name, so that the client raises the same class
REPORTED_ERRORS = ("ShapeError", "ArgumentError", "ModalityError", "ConfigError",
                   "AudioDecodeError", "ImageDecodeError", "VideoDecodeError", "ProtocolError",
                   "BackendError")


#: accept() errors that pass (out of descriptors, buffers or memory; a connection aborted)
_TRANSIENT_ACCEPT = frozenset(getattr(errno, n) for n in (
    "EMFILE", "ENFILE", "ENOBUFS", "ENOMEM", "ECONNABORTED", "EPROTO", "EPERM", "EINTR")
    if hasattr(errno, n))


#: what a frame's JSON header reserves from the memory budget, per byte: parsing JSON made of
#: small objects ("[{},{},...]") takes up to ~28 times its size
_JSON_COST = 32
#: a refused frame's JSON header up to this size is read for its request id even when the
#: budget is full
_SMALL_JSON = 4096


def _shutdown(sock: socket.socket) -> None:
    """Shut a connection down (both ways) so that a thread blocked on it wakes up; a TLS
    socket is shut down underneath its TLS layer (which another thread may be using)."""
    try:
        socket.socket.shutdown(sock, socket.SHUT_RDWR)
    except OSError:
        pass


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host.split("%", 1)[0]).is_loopback
    except ValueError:
        return False


#: what one item of a request is charged against the memory budget once decoded and encoded,
#: as a multiple of its output tokens (the encoder's intermediates: QKV, MLP, attention)
_ITEM_EXPANSION = 16


class _Busy(MMCoreError):
    """A request that found no room in the node's memory budget (answered as ``Busy``)."""


def _item_bytes(model: Any, m: Modality) -> int:
    """What one item of modality ``m`` may take while it is preprocessed and encoded: its
    output tokens (the encoder's positions, else 4096) x width x 4 bytes x
    :data:`_ITEM_EXPANSION`."""
    emb = getattr(model.encoder(m), "embedder", None)
    pos = getattr(emb, "position_embedding", None)
    tokens = int(pos.shape[0]) if pos is not None and getattr(pos, "ndim", 0) == 2 else 4096
    return _ITEM_EXPANSION * tokens * int(model.config.modalities[m].embed_dim) * 4


def _hardware() -> Dict[str, Any]:
    try:
        mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):  # pragma: no cover - non-POSIX
        mem = 0
    info = {"class": "cpu", "memory_bytes": int(mem), "cpus": os.cpu_count() or 1}
    try:
        from .._backend import backends
        cuda = backends().get("cuda", {})
        if cuda.get("available"):
            info["class"] = "gpu"
            info["devices"] = [str(d.get("name")) for d in cuda.get("devices", [])]
    except Exception:  # pragma: no cover - reporting only
        pass
    return info


class NodeServer:
    """Serve some modalities of a model directory over the protocol.

    Parameters
    ----------
    model_dir : path-like
        A model directory (``MultiModalModel.save``).
    modalities : iterable of Modality or str
        The modalities this node serves.
    token : str or bytes, optional, keyword-only
        The cluster token (else ``token_file``, else ``$MMCORE_CLUSTER_TOKEN``). A token
        shorter than 16 bytes, or a token file whose group or others have any permission,
        gets a :class:`~mmcore.distributed.auth.SecurityWarning`.
    token_file : path-like, optional, keyword-only
    host : str, default "127.0.0.1", keyword-only
        Address to bind (loopback unless told otherwise; a non-loopback address without TLS
        gets a :class:`~mmcore.distributed.auth.SecurityWarning`).
    port : int, default 0, keyword-only
        0: a free port (see :attr:`address`).
    certfile, keyfile : path-like, optional, keyword-only
        Serve TLS with this certificate chain and key.
    limits : FrameLimits, optional, keyword-only
        Bounds on request frames.
    max_connections : int, default 64, keyword-only
        Authenticated connections served at once. A client that authenticates while this
        many are open is closed (its coordinator counts the node as failed for that request).
        Connections still authenticating do not count here (see ``max_pending``).
    max_pending : int, default 256, keyword-only
        Connections still authenticating (TLS and challenge-response), counted apart from
        the authenticated ones. A new connection beyond this closes the *oldest* pending one:
        idle or slow connections cannot keep a new client out, they only age out.
    idle_timeout_s : float, default 600, keyword-only
        An authenticated connection silent between frames for this long is closed.
    handshake_timeout_s : float, default 5, keyword-only
        Deadline of the whole handshake (TLS included) from the connection's accept; a
        connection not authenticated by then is closed. (Before, this bounded each read.)
    frame_timeout_s : float, default 10, keyword-only
        Once a frame's first byte has arrived, its bytes must keep coming: byte ``k`` by
        ``frame_timeout_s + k / min_bytes_per_s`` seconds (:class:`~.protocol.Pace`), so a
        client that declares a frame and stalls is closed after ``frame_timeout_s``; answers
        are sent under the same pace (a client that does not read them is closed).
    min_bytes_per_s : float, default 256 KiB/s, keyword-only
    max_inflight_bytes : int, default 2 GiB, keyword-only
        Node-wide budget for the bytes of request frames being received or served. A frame
        reserves its payload's size plus 32 times its JSON header's (what parsing it may
        take) from its fixed header on, before anything is allocated, and releases it when
        its answer is sent; once its input is unpacked, the request also reserves what its
        items take when decoded and encoded (each: the encoder's output tokens x width x 4
        bytes x 16, so a small frame cannot carry a huge batch). A frame (or batch) that does
        not fit waits up to ``frame_timeout_s`` for room, then gets an ERROR frame naming the
        limit (``Busy``, which a coordinator retries; one larger than the whole budget gets
        ``ProtocolError`` at once); a refused frame's payload is read and dropped in small
        chunks, never buffered, and the connection stays open.
    drain_timeout_s : float, default 30, keyword-only
        How long :meth:`stop` waits for requests in flight.
    verify : bool, default True, keyword-only
        Check the model files' SHA-256 on load.

    Notes
    -----
    Remote inputs are data: a "str" or "bytes" input for a modality whose preprocessor
    would open it as a path (anything but text) is refused with ProtocolError before it
    reaches the model, whether or not such a file exists on the node; files travel as their
    bytes and are written to the node's private temporary directory.
    """

    def __init__(self, model_dir: Any, modalities: Iterable[Any], *, token: Any = None,
                 token_file: Any = None, host: str = "127.0.0.1", port: int = 0,
                 certfile: Any = None, keyfile: Any = None,
                 limits: Optional[FrameLimits] = None, max_connections: int = 64,
                 max_pending: int = 256, idle_timeout_s: float = 600.0,
                 handshake_timeout_s: float = 5.0, frame_timeout_s: float = 10.0,
                 min_bytes_per_s: float = 256.0 * 1024, max_inflight_bytes: int = 2 << 30,
                 drain_timeout_s: float = 30.0, verify: bool = True):
        from ..model import MultiModalModel
        for name, v in (("max_connections", max_connections), ("max_pending", max_pending),
                        ("max_inflight_bytes", max_inflight_bytes)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ConfigError(f"[NodeServer] {name} must be an integer >= 1, got {v!r}")
        for name, x in (("idle_timeout_s", idle_timeout_s),
                        ("handshake_timeout_s", handshake_timeout_s),
                        ("frame_timeout_s", frame_timeout_s),
                        ("min_bytes_per_s", min_bytes_per_s),
                        ("drain_timeout_s", drain_timeout_s)):
            if isinstance(x, bool) or not isinstance(x, (int, float)) or not (
                    math.isfinite(x) and x > 0):
                raise ConfigError(f"[NodeServer] {name} must be a finite number > 0, got "
                                  f"{x!r}")
        self._token = resolve_token(token, token_file=token_file, owner="NodeServer",
                                    warn=True)
        mods = [Modality(m) for m in ([modalities] if isinstance(modalities, (str, Modality))
                                      else modalities)]
        self.model = MultiModalModel.from_pretrained(model_dir, modalities=mods,
                                                     verify=verify)
        self.modalities = tuple(self.model.modalities)
        # the input forms each modality accepts (remote inputs are data: strings only where
        # the preprocessor takes them as text, files only as their bytes)
        self._forms = {m: accepted_forms(self.model, m) for m in self.modalities}
        from ..model.inputs import batch_size
        self._batch_size = batch_size
        self._item_bytes = {m: _item_bytes(self.model, m) for m in self.modalities}
        self._ssl = server_ssl_context(certfile, keyfile) if certfile is not None else None
        self._limits = limits or FrameLimits()
        self._max_connections = int(max_connections)
        self._max_pending = int(max_pending)
        self._idle_timeout = float(idle_timeout_s)
        self._handshake_timeout = float(handshake_timeout_s)
        self._pace = Pace(float(frame_timeout_s), float(min_bytes_per_s))
        self._max_inflight_bytes = int(max_inflight_bytes)
        self._drain_timeout = float(drain_timeout_s)
        self._hardware = _hardware()
        self._lock = threading.Lock()
        self._idle = threading.Condition(self._lock)
        self._budget = threading.Condition(threading.Lock())
        self._inflight_bytes = 0
        self._in_flight = 0
        self._served = 0
        self._failed = 0
        self._evicted = 0
        self._keys = itertools.count()
        self._conns: Dict[int, socket.socket] = {}          # authenticated
        self._pending: "OrderedDict[int, socket.socket]" = OrderedDict()   # oldest first
        self._stopping = threading.Event()
        self._stopped = threading.Event()
        self._sock = socket.create_server(
            (host, int(port)), backlog=max(128, min(4096, self._max_pending)))
        try:                       # nothing is left behind when the constructor fails
            self._sock.settimeout(0.2)
            h, p = self._sock.getsockname()[:2]
            self.address: Tuple[str, int] = (h, int(p))
            if self._ssl is None and not _is_loopback(h):
                warnings.warn(f"[NodeServer] listening on {h}:{p}, which is not a loopback "
                              "address, without TLS: requests, inputs and embeddings travel "
                              "in clear (pass certfile= and keyfile=)", SecurityWarning,
                              stacklevel=2)
            self._tmp_root = tempfile.mkdtemp(prefix="mmcore-node-")
        except BaseException:
            self._sock.close()
            raise

    # -- serving --------------------------------------------------------------------------------

    def serve_forever(self) -> None:
        """Accept connections until :meth:`stop`; then drain and close."""
        try:
            while not self._stopping.is_set():
                try:
                    conn, peer = self._sock.accept()
                except socket.timeout:
                    continue
                except OSError as exc:
                    if self._stopping.is_set():
                        break
                    if exc.errno not in _TRANSIENT_ACCEPT:
                        raise
                    # out of descriptors or memory: make room, wait a little, go on
                    log.warning("accept failed: %s", exc)
                    with self._lock:
                        self._evict_oldest()
                    time.sleep(0.05)
                    continue
                key = next(self._keys)
                with self._lock:
                    # unauthenticated connections have their own budget; when it is full the
                    # oldest goes, so that attackers cannot keep a newcomer out
                    while len(self._pending) >= self._max_pending:
                        self._evict_oldest()
                    self._pending[key] = conn
                try:
                    threading.Thread(target=self._serve_conn, args=(key, conn, peer),
                                     daemon=True, name=f"mmcore-node-conn-{peer[1]}").start()
                except RuntimeError as exc:             # no thread to be had
                    log.warning("refusing %s: %s", peer, exc)
                    with self._lock:
                        self._pending.pop(key, None)
                    conn.close()
        finally:
            self._drain_and_close()

    def _evict_oldest(self) -> None:
        """Shut down the oldest pending connection (the lock is held: a connection's thread
        closes its socket only after leaving ``_pending``, so the socket is still open)."""
        if not self._pending:
            return
        _, old = self._pending.popitem(last=False)
        self._evicted += 1
        _shutdown(old)
        log.info("closing the oldest connection still authenticating (%d pending)",
                 self._max_pending)

    def _drain_and_close(self) -> None:
        try:
            self._sock.close()
        except OSError:  # pragma: no cover
            pass
        deadline = time.monotonic() + self._drain_timeout
        with self._idle:
            while self._in_flight and time.monotonic() < deadline:
                self._idle.wait(max(0.0, min(0.1, deadline - time.monotonic())))
            conns = list(self._conns.values()) + list(self._pending.values())
            self._pending.clear()
            for c in conns:
                _shutdown(c)
        with self._budget:
            self._budget.notify_all()
        shutil.rmtree(self._tmp_root, ignore_errors=True)
        self._stopped.set()

    def stop(self) -> None:
        """Stop accepting; :meth:`serve_forever` then drains the requests in flight and returns."""
        self._stopping.set()

    def close(self) -> None:
        """Stop and release the listening socket (for a server that never served)."""
        self._stopping.set()
        if not self._stopped.is_set():
            self._drain_and_close()

    def _authenticate(self, key: int, box: List[socket.socket], peer) -> bool:
        """TLS and the challenge-response under one deadline (``box[0]``: the socket, replaced
        by its TLS wrapper); True once the client proved the token and was counted as
        authenticated."""
        deadline = time.monotonic() + self._handshake_timeout
        conn = box[0]
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        conn.settimeout(self._handshake_timeout)
        if self._ssl is not None:
            with self._lock:
                if key not in self._pending:
                    return False                         # evicted meanwhile
                conn = self._ssl.wrap_socket(conn, server_side=True,
                                             do_handshake_on_connect=False)
                box[0] = self._pending[key] = conn       # what an eviction shuts down
            left = deadline - time.monotonic()
            if left <= 0:
                raise socket.timeout("TLS handshake deadline passed")
            conn.settimeout(left)                        # do_handshake: one total timeout
            conn.do_handshake()
        ok = server_handshake(conn, self._token, info=self._info(), deadline=deadline)
        if not ok:
            log.warning("closing %s: wrong cluster token", peer)
            return False
        with self._lock:
            if self._pending.pop(key, None) is None:
                return False                             # evicted at the last moment
            if len(self._conns) >= self._max_connections:
                full = True
            else:
                full = False
                self._conns[key] = conn
        if full:
            log.warning("closing %s: %d authenticated connections already", peer,
                        self._max_connections)
            return False
        return True

    def _reserve(self, jlen: int, plen: int, held: List[int]) -> None:
        """Reserve a frame's bytes from the node-wide budget (``held`` receives what was
        reserved); FrameRefused when it does not fit (see ``max_inflight_bytes``)."""
        need = plen + _JSON_COST * jlen
        limit = self._max_inflight_bytes
        size = f"a request frame of {jlen + plen} bytes"
        if jlen > _SMALL_JSON:
            size += f" (reserving {need}: {_JSON_COST}x its JSON header)"
        with self._budget:
            if need > limit:
                error = "ProtocolError"
                message = (f"[node] {size} exceeds this node's memory budget for requests "
                           f"(max_inflight_bytes={limit}); send smaller batches")
            else:
                if self._take(need, held):
                    return
                error = "Busy"
                message = (f"[node] busy: {self._inflight_bytes} of max_inflight_bytes="
                           f"{limit} bytes are in flight, no room for {size}")
            # refused: its JSON header is still read (for the request id) if it fits, or if
            # it is small (a fixed allowance per connection, outside the budget)
            need = _JSON_COST * jlen
            read_json = jlen <= _SMALL_JSON or self._inflight_bytes + need <= limit
            if read_json and jlen > _SMALL_JSON:
                self._inflight_bytes += need
                held.append(need)
        raise FrameRefused(message, error=error, read_json=read_json)

    def _reserve_items(self, m: Modality, items: int, held: List[int]) -> None:
        """Reserve what ``items`` items of ``m`` take once decoded and encoded (a small frame
        can carry a large batch); ProtocolError when the whole budget is too small, ``Busy``
        when no room is found within ``frame_timeout_s``."""
        need = items * self._item_bytes[m]
        limit = self._max_inflight_bytes
        what = f"{items} {m} items (about {need} bytes once decoded and encoded)"
        if need > limit:
            raise ProtocolError(f"[node] {what} exceed this node's memory budget for requests "
                                f"(max_inflight_bytes={limit}); send smaller batches")
        with self._budget:
            if not self._take(need, held):
                raise _Busy(f"[node] busy: {self._inflight_bytes} of max_inflight_bytes="
                            f"{limit} bytes are in flight, no room for {what}")

    def _take(self, need: int, held: List[int]) -> bool:
        """With ``self._budget`` held: wait up to ``frame_timeout_s`` for ``need`` bytes of
        room and take them (True), or give up (False)."""
        limit = self._max_inflight_bytes
        deadline = time.monotonic() + self._pace.base_s
        while self._inflight_bytes + need > limit and not self._stopping.is_set():
            left = deadline - time.monotonic()
            if left <= 0:
                break
            self._budget.wait(min(left, 0.5))
        if self._inflight_bytes + need > limit:
            return False
        self._inflight_bytes += need
        held.append(need)
        return True

    def _release(self, held: List[int]) -> None:
        if held:
            with self._budget:
                self._inflight_bytes -= sum(held)
                held.clear()
                self._budget.notify_all()

    def _frame_started(self, counted: List[bool], held: List[int], mtype: MsgType, jlen: int,
                       plen: int) -> None:
        """``on_header`` of a request's frame: an ENCODE request counts as in flight (``counted``
        notes whether the node was stopping then), and the frame's bytes are reserved into
        ``held``."""
        if mtype == MsgType.ENCODE:
            with self._lock:
                self._in_flight += 1
            counted.append(self._stopping.is_set())
        self._reserve(jlen, plen, held)

    def _serve_conn(self, key: int, conn: socket.socket, peer) -> None:
        box = [conn]              # the socket to close: the TLS one once wrapped
        try:
            if not self._authenticate(key, box, peer):
                return
            conn = box[0]
            conn.settimeout(self._idle_timeout)
            while True:
                # an ENCODE request is in flight from its header on: a drain waits for it
                counted: List[bool] = []
                held: List[int] = []
                started = functools.partial(self._frame_started, counted, held)
                try:
                    try:
                        frame = recv_frame(conn, limits=self._limits, on_header=started,
                                           pace=self._pace)
                    except ConnectionClosed as exc:
                        if not exc.at_boundary:         # a truncated frame
                            log.warning("closing %s: %s", peer, exc)
                        return
                    except FrameRefused as exc:
                        rid = exc.header.get("id")
                        log.warning("refusing a request from %s: %s", peer, exc)
                        with self._lock:
                            self._failed += 1
                        send_frame(conn, MsgType.ERROR, {
                            "id": rid if isinstance(rid, (str, int)) else None,
                            "error": exc.error, "message": str(exc)}, pace=self._pace)
                        continue
                    if not self._handle(conn, frame, late=bool(counted and counted[0]),
                                        held=held):
                        return
                finally:
                    self._release(held)
                    if counted:
                        with self._idle:
                            self._in_flight -= 1
                            self._idle.notify_all()
        except ProtocolError as exc:
            # (INFO for a connection that never authenticated: a flood must not flood the log)
            with self._lock:
                authed = key in self._conns
            log.log(logging.WARNING if authed else logging.INFO, "closing %s: %s", peer, exc)
        except socket.timeout as exc:
            log.info("closing %s: timed out%s", peer, f" ({exc})" if str(exc) else "")
        except (OSError, ValueError) as exc:
            log.info("closing %s: %s", peer, exc)
        finally:
            with self._lock:
                self._pending.pop(key, None)
                self._conns.pop(key, None)
            try:
                box[0].close()
            except OSError:  # pragma: no cover
                pass

    def _info(self) -> Dict[str, Any]:
        with self._lock:
            load = {"in_flight": self._in_flight, "served": self._served,
                    "failed": self._failed, "connections": len(self._conns)}
        return {"modalities": [str(m) for m in self.modalities], "load": load,
                "hardware": self._hardware, "pid": os.getpid(), "version": __version__,
                "draining": self._stopping.is_set()}

    def _handle(self, conn: socket.socket, frame, late: bool = False,
                held: Optional[List[int]] = None) -> bool:
        """Answer one frame (``late``: it began to arrive after the drain started, so it is
        refused with a Draining error; ``held``: the request's budget reservations, to which
        its items' cost is added); False closes the connection."""
        rid = frame.header.get("id")
        if not isinstance(rid, (str, int, type(None))):
            raise ProtocolError("[node] request id must be a string or an integer")
        if frame.type == MsgType.HEALTH:
            send_frame(conn, MsgType.HEALTH_OK, dict(self._info(), id=rid), pace=self._pace)
            return True
        if frame.type != MsgType.ENCODE:
            raise ProtocolError(f"[node] unexpected {frame.type.name} frame")
        if late:
            send_frame(conn, MsgType.ERROR, {"id": rid, "error": "Draining",
                                             "message": "[node] the node is shutting down"},
                       pace=self._pace)
            return False
        tmpdir = None
        try:
            try:
                m = Modality(frame.header.get("modality"))
                if m not in self.modalities:
                    from ..errors import ModalityError
                    raise ModalityError(f"[node] this node serves "
                                        f"{', '.join(map(str, self.modalities))}, not "
                                        f"{str(m)!r}")
                tmpdir = tempfile.mkdtemp(dir=self._tmp_root)
                value, mask = unpack_input(frame.header.get("input"), frame.arrays,
                                           tmpdir=tmpdir, with_mask=True,
                                           what=f"modality {str(m)!r}", **self._forms[m])
                items = self._batch_size(m, self.model.config.modalities[m].preprocessing,
                                         value, where=f"modality {str(m)!r}")
                self._reserve_items(m, items, held if held is not None else [])
                t0 = time.perf_counter()
                timings: Dict[str, float] = {}
                tokens, tmask, pooled = self.model.encode_modality(m, value,
                                                                   attention_mask=mask,
                                                                   timings=timings)
                timings["node"] = time.perf_counter() - t0
            except Exception as exc:
                # the request failed, not the connection: answer ERROR and keep serving (an
                # unexpected error is logged with its traceback and reported as RemoteError)
                if not isinstance(exc, (MMCoreError, ValueError, TypeError, OSError)):
                    log.exception("request %s failed", rid)
                name = "Busy" if isinstance(exc, _Busy) else type(exc).__name__
                with self._lock:
                    self._failed += 1
                reported = name in REPORTED_ERRORS or name == "Busy"
                send_frame(conn, MsgType.ERROR, {
                    "id": rid, "error": name if reported else "RemoteError",
                    "message": (str(exc) if reported else f"{name}: {exc}")[:2000]},
                    pace=self._pace)
                return True
            send_frame(conn, MsgType.RESULT, {"id": rid, "stats": timings},
                       [np.ascontiguousarray(tokens, np.float32),
                        np.ascontiguousarray(tmask, np.bool_),
                        np.ascontiguousarray(pooled, np.float32)], pace=self._pace)
            with self._lock:
                self._served += 1
            return True
        finally:
            if tmpdir is not None:
                shutil.rmtree(tmpdir, ignore_errors=True)


def run_node(model_dir: Any, modalities: Iterable[Any], *, host: str = "127.0.0.1",
             port: int = 0, token: Any = None, token_file: Any = None, certfile: Any = None,
             keyfile: Any = None, drain_timeout_s: float = 30.0,
             max_inflight_bytes: int = 2 << 30, out=None) -> int:
    """Run a node until SIGTERM / SIGINT (the ``mmcore node`` command); returns 0.
    ``max_inflight_bytes``: see :class:`NodeServer`."""
    out = sys.stdout if out is None else out
    server = NodeServer(model_dir, modalities, host=host, port=port, token=token,
                        token_file=token_file, certfile=certfile, keyfile=keyfile,
                        drain_timeout_s=drain_timeout_s,
                        max_inflight_bytes=max_inflight_bytes)

    def _on_signal(signum, _frame):
        log.info("signal %d: draining", signum)
        server.stop()

    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGINT, _on_signal)
    h, p = server.address
    print(f"{READY_PREFIX}{h}:{p}", file=out, flush=True)
    server.serve_forever()
    return 0
