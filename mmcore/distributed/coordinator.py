"""The coordinator: sends each modality's part of a batch to a node serving it.

:class:`Coordinator` keeps, per modality, the nodes of a :class:`DistributedConfig`, a pool of
authenticated connections to each, and their health (a heartbeat thread sends HEALTH every
``heartbeat_s``; a node that fails a request or a heartbeat leaves the rotation until it
answers again). :class:`RemoteEncoder` is the model's view of it: ``submit`` returns a future,
and :meth:`MultiModalModel.infer <mmcore.model.MultiModalModel.infer>` submits every remote
modality at once, then runs cross-modal attention and fusion locally.

Load balancing picks the healthy node with the fewest outstanding requests. A request whose
node fails (connection refused or reset, timeout, malformed answer, the node draining) is
sent again, with the same id, to another node of the modality; requests are idempotent (so is
a request a node refuses as ``Busy``, out of memory budget, without leaving rotation). When
every node of the modality failed, :class:`~mmcore.errors.NodeUnavailableError` names the
modality (or the modality is dropped, with ``drop_unavailable=True``). Errors about the
request itself (a bad input: ShapeError, decode errors...) are raised as they are, not retried.
Every wait is bounded by ``connect_timeout_s`` / ``request_timeout_s``.
"""

from __future__ import annotations

import concurrent.futures
import logging
import socket
import threading
import time
import uuid
from typing import Any, Callable, Dict, List, Optional, Tuple, TypeVar

import numpy as np

from .. import errors as _errors
from ..errors import AuthError, MMCoreError, NodeUnavailableError, ProtocolError
from ..modality import Modality
from .auth import client_handshake, client_ssl_context, resolve_token
from .config import DistributedConfig, parse_address
from .node import REPORTED_ERRORS
from .payload import pack_input
from .protocol import ConnectionClosed, FrameLimits, MsgType, recv_frame, send_frame

__all__ = ["Coordinator", "RemoteEncoder", "NodeClient", "RemoteError"]

_T = TypeVar("_T")
#: ``(tokens float32 (B, L, D), mask bool (B, L), pooled float32 (B, D))`` of one modality,
#: or None when no node answered and ``drop_unavailable`` is set.
Encoded = Optional[Tuple[np.ndarray, np.ndarray, np.ndarray]]

log = logging.getLogger("mmcore.coordinator")


class RemoteError(MMCoreError, RuntimeError):
    """A node failed a request with an error of a class the client does not re-raise as is."""


def pick_least_outstanding(lock, workers, tried: set):
    """The worker with the fewest outstanding requests among those not yet ``tried``
    (healthy ones first); its count is raised by one. None when every worker was tried."""
    with lock:
        cands = [w for w in workers if w not in tried]
        if not cands:
            return None
        w = min([c for c in cands if c.healthy] or cands, key=lambda c: c.outstanding)
        w.outstanding += 1
        return w


class _NodeFailure(Exception):
    """The node (not the request) failed: retry elsewhere."""


class NodeClient:
    """Authenticated connections to one node, pooled; one request per connection at a time."""

    def __init__(self, address: str, token: bytes, *, connect_timeout_s: float,
                 request_timeout_s: float, ssl_context=None,
                 limits: Optional[FrameLimits] = None):
        self.address = address
        self.host, self.port = parse_address(address, "address")
        self._token = token
        self._connect_timeout = connect_timeout_s
        self._request_timeout = request_timeout_s
        self._ssl = ssl_context
        self._limits = limits or FrameLimits()
        self._idle: List[socket.socket] = []
        self._lock = threading.Lock()
        self.outstanding = 0
        self.healthy = True
        self.info: Dict[str, Any] = {}
        self.last_error: Optional[str] = None
        self.closed = False

    def _connect(self) -> socket.socket:
        try:
            sock = socket.create_connection((self.host, self.port),
                                            timeout=self._connect_timeout)
        except OSError as exc:
            raise _NodeFailure(f"connect to {self.address}: {exc}") from None
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if self._ssl is not None:
                sock = self._ssl.wrap_socket(sock, server_hostname=self.host)
            sock.settimeout(self._connect_timeout)
            self.info = client_handshake(sock, self._token)
            return sock
        except AuthError:
            sock.close()
            raise
        except (OSError, ProtocolError) as exc:
            sock.close()
            raise _NodeFailure(f"handshake with {self.address}: {exc}") from None

    def request(self, msg_type: MsgType, header: Dict[str, Any], arrays=(),
                *, timeout: Optional[float] = None):
        """Send one request and return the answer frame (_NodeFailure when the node fails).

        A pooled connection that turns out to be closed (the node's idle timeout, a restart)
        before any byte of the answer arrived is replaced by a fresh one, once."""
        with self._lock:
            sock = self._idle.pop() if self._idle else None
        reused = sock is not None
        while True:
            if sock is None:
                sock = self._connect()
            try:
                sock.settimeout(self._request_timeout if timeout is None else timeout)
                send_frame(sock, msg_type, header, arrays)
                frame = recv_frame(sock, limits=self._limits)
                # (an ERROR without an id answers this request: one request per connection
                # at a time; a node that refused a frame unread cannot know its id)
                if frame.header.get("id") != header.get("id") and not (
                        frame.type == MsgType.ERROR and frame.header.get("id") is None):
                    raise ProtocolError("[coordinator] answer for another request id")
                break
            except (ConnectionClosed, BrokenPipeError, ConnectionResetError) as exc:
                sock.close()
                sock = None
                stale = reused and getattr(exc, "at_boundary", True)
                if not stale:
                    raise _NodeFailure(f"{self.address}: {exc or type(exc).__name__}") from None
                reused = False                    # retry once on a fresh connection
            except (OSError, ProtocolError) as exc:
                sock.close()
                raise _NodeFailure(f"{self.address}: {exc or type(exc).__name__}") from None
            except BaseException:
                sock.close()
                raise
        with self._lock:
            if self.closed or len(self._idle) >= 32:
                sock.close()
            else:
                self._idle.append(sock)
        return frame

    def close(self) -> None:
        with self._lock:
            self.closed = True
            idle, self._idle = self._idle, []
        for s in idle:
            try:
                s.close()
            except OSError:  # pragma: no cover
                pass


def _raise_remote(header: Dict[str, Any]) -> None:
    name = header.get("error")
    msg = str(header.get("message", ""))
    cls = getattr(_errors, name, None) if name in REPORTED_ERRORS else None
    if isinstance(cls, type) and issubclass(cls, Exception):
        raise cls(msg)
    raise RemoteError(f"[coordinator] node error {name}: {msg}")


class Coordinator:
    """Nodes per modality, their health, and request routing (see the module docstring).

    Parameters
    ----------
    config : DistributedConfig
        With ``backend="socket"``.

    Raises
    ------
    ConfigError
        No token, or a config for another backend.
    """

    def __init__(self, config: DistributedConfig):
        from ..errors import ConfigError
        if not isinstance(config, DistributedConfig):
            raise ConfigError("[Coordinator] config must be a DistributedConfig")
        if config.backend != "socket":
            raise ConfigError("[Coordinator] config.backend must be 'socket'")
        self.config = config
        token = resolve_token(config.token, token_file=config.token_file, owner="Coordinator")
        ctx = None
        if config.tls_cafile is not None:
            ctx = client_ssl_context(config.tls_cafile,
                                     check_hostname=config.tls_check_hostname)
        self.nodes: Dict[Modality, List[NodeClient]] = {
            m: [NodeClient(a, token, connect_timeout_s=config.connect_timeout_s,
                           request_timeout_s=config.request_timeout_s, ssl_context=ctx)
                for a in addrs]
            for m, addrs in config.sharding_strategy.node_addresses().items()}
        self._lock = threading.Lock()
        self._pool = concurrent.futures.ThreadPoolExecutor(
            max_workers=config.max_workers, thread_name_prefix="mmcore-coord")
        self._stop = threading.Event()
        self._heartbeat = threading.Thread(target=self._heartbeat_loop, daemon=True,
                                           name="mmcore-heartbeat")
        self._heartbeat.start()

    # -- health ---------------------------------------------------------------------------------

    def check_health(self, node: NodeClient) -> bool:
        """One health check of ``node`` (updates its state); True when it answered."""
        try:
            frame = node.request(MsgType.HEALTH, {"id": uuid.uuid4().hex},
                                 timeout=min(self.config.request_timeout_s,
                                             max(1.0, 2 * self.config.heartbeat_s)))
            ok = frame.type == MsgType.HEALTH_OK and not frame.header.get("draining")
            if ok:
                node.info = frame.header
        except (_NodeFailure, AuthError) as exc:
            node.last_error = str(exc)
            ok = False
        if ok != node.healthy:
            log.warning("node %s is %s", node.address, "back" if ok else
                        f"out of rotation ({node.last_error})")
        node.healthy = ok
        return ok

    def _heartbeat_loop(self) -> None:
        while not self._stop.wait(self.config.heartbeat_s):
            for nodes in list(self.nodes.values()):
                for node in nodes:
                    if self._stop.is_set():
                        return
                    self.check_health(node)

    def health(self) -> Dict[str, List[Dict[str, Any]]]:
        """Per modality, each node's address, health, outstanding requests and last info."""
        return {str(m): [{"address": n.address, "healthy": n.healthy,
                          "outstanding": n.outstanding, "info": dict(n.info),
                          "last_error": n.last_error} for n in nodes]
                for m, nodes in self.nodes.items()}

    # -- requests -------------------------------------------------------------------------------

    def _pick(self, m: Modality, tried: set) -> Optional[NodeClient]:
        return pick_least_outstanding(self._lock, self.nodes[m], tried)

    def encode(self, m: Modality, header: Dict[str, Any], arrays: List[np.ndarray]
               ) -> Encoded:
        """Run one ENCODE request on a node of ``m`` with retries (see the module docstring)."""
        m = Modality(m)
        nodes = self.nodes.get(m)
        if not nodes:
            raise NodeUnavailableError(f"[coordinator] no node serves modality {str(m)!r}")
        attempts = self.config.max_attempts or max(2, len(nodes))
        tried: set = set()
        busy: set = set()
        errors_seen = []
        header = dict(header, id=uuid.uuid4().hex, modality=str(m))
        for attempt in range(attempts):
            node = self._pick(m, tried)
            if node is None and busy:
                # every node left was out of memory budget: try those again after a pause
                time.sleep(min(1.0, 0.1 * (attempt + 1)))
                tried -= busy
                busy.clear()
                node = self._pick(m, tried)
            if node is None:
                break
            tried.add(node)
            try:
                frame = node.request(MsgType.ENCODE, header, arrays)
            except _NodeFailure as exc:
                node.healthy = False
                node.last_error = str(exc)
                errors_seen.append(str(exc))
                log.warning("request %s to %s failed: %s", header["id"], node.address, exc)
                continue
            finally:
                with self._lock:
                    node.outstanding -= 1
            if frame.type == MsgType.RESULT and len(frame.arrays) == 3:
                tokens, mask, pooled = frame.arrays
                return tokens, mask.astype(np.bool_, copy=False), pooled
            if frame.type == MsgType.ERROR and frame.header.get("error") == "Draining":
                node.healthy = False
                errors_seen.append(f"{node.address}: draining")
                continue
            if frame.type == MsgType.ERROR and frame.header.get("error") == "Busy":
                # out of memory budget for now: another node may have room (or this one, a
                # little later); still healthy
                errors_seen.append(f"{node.address}: {str(frame.header.get('message'))[:300]}")
                busy.add(node)
                continue
            if frame.type == MsgType.ERROR:
                _raise_remote(frame.header)
            node.healthy = False
            errors_seen.append(f"{node.address}: unexpected {frame.type.name} answer")
        if self.config.drop_unavailable:
            log.warning("dropping modality %s: no node answered (%s)", m,
                        "; ".join(errors_seen))
            return None
        raise NodeUnavailableError(
            f"[coordinator] no node of modality {str(m)!r} could serve the request "
            f"({len(tried)} tried: {'; '.join(errors_seen) or 'none available'})")

    def submit(self, fn: Callable[..., _T], *args: Any) -> concurrent.futures.Future[_T]:
        """Run ``fn(*args)`` on the request threads."""
        return self._pool.submit(fn, *args)

    def close(self) -> None:
        """Stop the heartbeat, the request threads and every connection."""
        self._stop.set()
        self._pool.shutdown(wait=True, cancel_futures=True)
        for nodes in self.nodes.values():
            for n in nodes:
                n.close()
        self._heartbeat.join(timeout=5)

    def __enter__(self) -> "Coordinator":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


class RemoteEncoder:
    """The remote encoder of one modality, as :meth:`MultiModalModel.set_remote_encoders`
    expects it: ``submit(value, *, is_raw, attention_mask) -> Future``."""

    def __init__(self, backend: Any, modality: Modality, kind: Optional[str]):
        self.backend = backend
        self.modality = Modality(modality)
        self.kind = kind

    def submit(self, value: Any, *, is_raw: bool = True, attention_mask: Any = None
               ) -> concurrent.futures.Future[Encoded]:
        """Encode ``value`` on a node (or actor) of the modality, in the background."""
        desc, arrays = pack_input(self.kind, value, attention_mask=attention_mask)
        return self.backend.submit(self.backend.encode, self.modality, {"input": desc}, arrays)

    def __repr__(self) -> str:
        return f"RemoteEncoder({str(self.modality)!r}, {type(self.backend).__name__})"
