"""A shard node: serves preprocess + encode requests for some modalities of a model directory.

``mmcore node --model DIR --modality image [--modality audio] --host 127.0.0.1 --port 0
--token-file F`` runs :func:`run_node`. The node loads only its modalities' preprocessors and
encoders (``MultiModalModel.from_pretrained(DIR, modalities=...)``), listens (port 0: a free
port), prints ``mmcore node listening on HOST:PORT`` once ready, and serves every connection
in its own thread:

* each connection authenticates first (:mod:`mmcore.distributed.auth`); a wrong token gets
  AUTH_FAIL and is closed;
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
>>> node = NodeServer(d + "/m", ["text"], token=b"t", port=0)
>>> node.address[0]
'127.0.0.1'
>>> node.close()
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import socket
import sys
import tempfile
import threading
import time
from typing import Any, Dict, Iterable, Optional, Tuple

import numpy as np

from .. import __version__
from ..errors import MMCoreError, ProtocolError
from ..modality import Modality
from .auth import resolve_token, server_handshake, server_ssl_context
from .payload import unpack_input
from .protocol import ConnectionClosed, FrameLimits, MsgType, recv_frame, send_frame

__all__ = ["NodeServer", "run_node", "READY_PREFIX"]

log = logging.getLogger("mmcore.node")
READY_PREFIX = "mmcore node listening on "
#: error classes a node reports by name, so that the client raises the same class
REPORTED_ERRORS = ("ShapeError", "ModalityError", "ConfigError", "AudioDecodeError",
                   "ImageDecodeError", "VideoDecodeError", "ProtocolError", "BackendError")


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
        The cluster token (else ``token_file``, else ``$MMCORE_CLUSTER_TOKEN``).
    token_file : path-like, optional, keyword-only
    host : str, default "127.0.0.1", keyword-only
        Address to bind (loopback unless told otherwise).
    port : int, default 0, keyword-only
        0: a free port (see :attr:`address`).
    certfile, keyfile : path-like, optional, keyword-only
        Serve TLS with this certificate chain and key.
    limits : FrameLimits, optional, keyword-only
        Bounds on request frames.
    max_connections : int, default 64, keyword-only
        Connections served at once, at most 16 of them still authenticating (their node info
        is sent only after the token is proved); more are closed at once.
    idle_timeout_s : float, default 600, keyword-only
        A connection silent for this long is closed.
    handshake_timeout_s : float, default 10, keyword-only
    drain_timeout_s : float, default 30, keyword-only
        How long :meth:`stop` waits for requests in flight.
    verify : bool, default True, keyword-only
        Check the model files' SHA-256 on load.
    """

    def __init__(self, model_dir: Any, modalities: Iterable[Any], *, token: Any = None,
                 token_file: Any = None, host: str = "127.0.0.1", port: int = 0,
                 certfile: Any = None, keyfile: Any = None,
                 limits: Optional[FrameLimits] = None, max_connections: int = 64,
                 idle_timeout_s: float = 600.0, handshake_timeout_s: float = 10.0,
                 drain_timeout_s: float = 30.0, verify: bool = True):
        from ..model import MultiModalModel
        self._token = resolve_token(token, token_file=token_file, owner="NodeServer")
        mods = [Modality(m) for m in ([modalities] if isinstance(modalities, (str, Modality))
                                      else modalities)]
        self.model = MultiModalModel.from_pretrained(model_dir, modalities=mods,
                                                     verify=verify)
        self.modalities = tuple(self.model.modalities)
        self._ssl = server_ssl_context(certfile, keyfile) if certfile is not None else None
        self._limits = limits or FrameLimits()
        self._max_connections = int(max_connections)
        self._idle_timeout = float(idle_timeout_s)
        self._handshake_timeout = float(handshake_timeout_s)
        self._drain_timeout = float(drain_timeout_s)
        self._hardware = _hardware()
        self._lock = threading.Lock()
        self._idle = threading.Condition(self._lock)
        self._in_flight = 0
        self._served = 0
        self._failed = 0
        self._conns: Dict[int, socket.socket] = {}
        self._handshaking = 0
        self._max_handshakes = max(1, min(16, self._max_connections))
        self._stopping = threading.Event()
        self._stopped = threading.Event()
        self._tmp_root = tempfile.mkdtemp(prefix="mmcore-node-")
        self._sock = socket.create_server((host, int(port)), backlog=128)
        self._sock.settimeout(0.2)
        h, p = self._sock.getsockname()[:2]
        self.address: Tuple[str, int] = (h, int(p))

    # -- serving --------------------------------------------------------------------------------

    def serve_forever(self) -> None:
        """Accept connections until :meth:`stop`; then drain and close."""
        try:
            while not self._stopping.is_set():
                try:
                    conn, peer = self._sock.accept()
                except socket.timeout:
                    continue
                except OSError:
                    if self._stopping.is_set():
                        break
                    raise
                with self._lock:      # counted here, so a burst cannot pass the limits
                    full = len(self._conns) >= self._max_connections
                    busy = self._handshaking >= self._max_handshakes
                    if not (full or busy):
                        self._conns[id(conn)] = conn
                        self._handshaking += 1
                if full or busy:
                    log.warning("refusing %s: %s", peer,
                                f"{self._max_connections} connections already" if full else
                                f"{self._max_handshakes} handshakes in progress")
                    conn.close()
                    continue
                threading.Thread(target=self._serve_conn, args=(conn, peer), daemon=True,
                                 name=f"mmcore-node-conn-{peer[1]}").start()
        finally:
            self._drain_and_close()

    def _drain_and_close(self) -> None:
        try:
            self._sock.close()
        except OSError:  # pragma: no cover
            pass
        deadline = time.monotonic() + self._drain_timeout
        with self._idle:
            while self._in_flight and time.monotonic() < deadline:
                self._idle.wait(max(0.0, min(0.1, deadline - time.monotonic())))
            conns = list(self._conns.values())
        for c in conns:
            try:
                c.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
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

    def _serve_conn(self, conn: socket.socket, peer) -> None:
        key = id(conn)
        handshaking = True
        try:
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            conn.settimeout(self._handshake_timeout)
            if self._ssl is not None:
                conn = self._ssl.wrap_socket(conn, server_side=True)
            with self._lock:
                self._conns[key] = conn
            ok = server_handshake(conn, self._token, info=self._info())
            with self._lock:
                self._handshaking -= 1
            handshaking = False
            if not ok:
                log.warning("closing %s: wrong cluster token", peer)
                return
            conn.settimeout(self._idle_timeout)
            while True:
                # an ENCODE request is in flight from its header on: a drain waits for it
                counted = []

                def started(mtype):
                    if mtype == MsgType.ENCODE:
                        with self._lock:
                            self._in_flight += 1
                        counted.append(self._stopping.is_set())
                try:
                    try:
                        frame = recv_frame(conn, limits=self._limits, on_header=started)
                    except ConnectionClosed as exc:
                        if not exc.at_boundary:         # a truncated frame
                            log.warning("closing %s: %s", peer, exc)
                        return
                    if not self._handle(conn, frame, late=bool(counted and counted[0])):
                        return
                finally:
                    if counted:
                        with self._idle:
                            self._in_flight -= 1
                            self._idle.notify_all()
        except ProtocolError as exc:
            log.warning("closing %s: %s", peer, exc)
        except socket.timeout:
            log.info("closing %s: timed out", peer)
        except (OSError, ValueError) as exc:
            log.info("closing %s: %s", peer, exc)
        finally:
            with self._lock:
                self._conns.pop(key, None)
                if handshaking:
                    self._handshaking -= 1
            try:
                conn.close()
            except OSError:  # pragma: no cover
                pass

    def _info(self) -> Dict[str, Any]:
        with self._lock:
            load = {"in_flight": self._in_flight, "served": self._served,
                    "failed": self._failed, "connections": len(self._conns)}
        return {"modalities": [str(m) for m in self.modalities], "load": load,
                "hardware": self._hardware, "pid": os.getpid(), "version": __version__,
                "draining": self._stopping.is_set()}

    def _handle(self, conn: socket.socket, frame, late: bool = False) -> bool:
        """Answer one frame (``late``: it began to arrive after the drain started, so it is
        refused with a Draining error); False closes the connection."""
        rid = frame.header.get("id")
        if not isinstance(rid, (str, int, type(None))):
            raise ProtocolError("[node] request id must be a string or an integer")
        if frame.type == MsgType.HEALTH:
            send_frame(conn, MsgType.HEALTH_OK, dict(self._info(), id=rid))
            return True
        if frame.type != MsgType.ENCODE:
            raise ProtocolError(f"[node] unexpected {frame.type.name} frame")
        if late:
            send_frame(conn, MsgType.ERROR, {"id": rid, "error": "Draining",
                                             "message": "[node] the node is shutting down"})
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
                                           tmpdir=tmpdir, with_mask=True)
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
                name = type(exc).__name__
                with self._lock:
                    self._failed += 1
                reported = name in REPORTED_ERRORS
                send_frame(conn, MsgType.ERROR, {
                    "id": rid, "error": name if reported else "RemoteError",
                    "message": (str(exc) if reported else f"{name}: {exc}")[:2000]})
                return True
            send_frame(conn, MsgType.RESULT, {"id": rid, "stats": timings},
                       [np.ascontiguousarray(tokens, np.float32),
                        np.ascontiguousarray(tmask, np.bool_),
                        np.ascontiguousarray(pooled, np.float32)])
            with self._lock:
                self._served += 1
            return True
        finally:
            if tmpdir is not None:
                shutil.rmtree(tmpdir, ignore_errors=True)


def run_node(model_dir: Any, modalities: Iterable[Any], *, host: str = "127.0.0.1",
             port: int = 0, token: Any = None, token_file: Any = None, certfile: Any = None,
             keyfile: Any = None, drain_timeout_s: float = 30.0, out=None) -> int:
    """Run a node until SIGTERM / SIGINT (the ``mmcore node`` command); returns 0."""
    out = sys.stdout if out is None else out
    server = NodeServer(model_dir, modalities, host=host, port=port, token=token,
                        token_file=token_file, certfile=certfile, keyfile=keyfile,
                        drain_timeout_s=drain_timeout_s)

    def _on_signal(signum, _frame):
        log.info("signal %d: draining", signum)
        server.stop()

    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGINT, _on_signal)
    h, p = server.address
    print(f"{READY_PREFIX}{h}:{p}", file=out, flush=True)
    server.serve_forever()
    return 0
