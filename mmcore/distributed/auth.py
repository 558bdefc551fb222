"""Shared-token authentication (HMAC-SHA256 challenge-response) and TLS contexts.

The node speaks first: a CHALLENGE frame with a random 32-byte nonce. The client answers with
its own nonce and ``HMAC(token, "mmcore-client" | node nonce | client nonce)``; the node
compares in constant time (:func:`hmac.compare_digest`) and answers AUTH_OK with
``HMAC(token, "mmcore-node" | client nonce | node nonce)``, which the client checks in turn,
or AUTH_FAIL and closes. The token itself never travels.

The token comes from (first found): the ``token`` argument, a token file, or the environment
variable ``MMCORE_CLUSTER_TOKEN``.

Examples
--------
>>> from mmcore.distributed.auth import resolve_token
>>> resolve_token("s3cret")
b's3cret'
"""

from __future__ import annotations

import hashlib
import hmac
import os
import socket
import ssl
import stat
import warnings
from typing import Any, Optional

from .._files import open_regular
from ..errors import AuthError, ConfigError, ProtocolError
from .protocol import FrameLimits, MsgType, recv_frame, send_frame

__all__ = ["TOKEN_ENV", "MIN_TOKEN_BYTES", "SecurityWarning", "resolve_token",
           "server_handshake", "client_handshake",
           "server_ssl_context", "client_ssl_context"]

TOKEN_ENV = "MMCORE_CLUSTER_TOKEN"
_NONCE = 32
_HANDSHAKE_LIMITS = FrameLimits(max_frame_bytes=4096, max_json_bytes=4096, max_arrays=0)
#: tokens shorter than this get a :class:`SecurityWarning` on a node
MIN_TOKEN_BYTES = 16


class SecurityWarning(UserWarning):
    """A node runs with a weak setting: a short token, a token file others can read, or a
    non-loopback address without TLS."""


def _warn(message: str) -> None:
    warnings.warn(message, SecurityWarning, stacklevel=3)


def resolve_token(token: Any = None, *, token_file: Any = None, owner: str = "cluster",
                  warn: bool = False) -> bytes:
    """The shared token as bytes: ``token``, else the contents of ``token_file`` (surrounding
    whitespace stripped), else ``$MMCORE_CLUSTER_TOKEN``.

    With ``warn=True`` (a node) a :class:`SecurityWarning` is issued for a token file whose
    permissions give its group or others any access, and for a token shorter than
    :data:`MIN_TOKEN_BYTES` bytes.

    Raises
    ------
    ConfigError
        No token anywhere, or an empty one.
    """
    if token is None and token_file is not None:
        path = os.fspath(token_file)
        try:
            # a regular file only (a FIFO would block): read without blocking, 64 KiB at most
            with open_regular(path, what="token_file", error=ConfigError, op=owner) as fh:
                mode = os.fstat(fh.fileno()).st_mode
                token = fh.read(1 << 16).strip()
        except OSError as exc:
            raise ConfigError(f"[{owner}] token_file {path!r} cannot be read: "
                              f"{exc.strerror or exc}") from None
        if warn and mode & 0o077:
            _warn(f"[{owner}] token_file {path!r} has permissions "
                  f"{stat.S_IMODE(mode):04o}: its group or others may read the cluster token "
                  "(chmod 600 it)")
    if token is None:
        token = os.environ.get(TOKEN_ENV)
    if token is None:
        raise ConfigError(f"[{owner}] no cluster token: pass token= or token_file=, or set "
                          f"{TOKEN_ENV}")
    if isinstance(token, str):
        token = token.encode("utf-8")
    if not isinstance(token, (bytes, bytearray)) or not token:
        raise ConfigError(f"[{owner}] the cluster token must be a non-empty str or bytes")
    if warn and len(token) < MIN_TOKEN_BYTES:
        _warn(f"[{owner}] the cluster token has {len(token)} bytes, fewer than "
              f"{MIN_TOKEN_BYTES}: it may be guessed (use e.g. secrets.token_hex(32))")
    return bytes(token)


def _mac(token: bytes, label: bytes, a: bytes, b: bytes) -> bytes:
    return hmac.new(token, label + a + b, hashlib.sha256).digest()


def _hex_field(header, key: str, n: int) -> bytes:
    value = header.get(key)
    try:
        raw = bytes.fromhex(value) if isinstance(value, str) else b""
    except ValueError:
        raw = b""
    if len(raw) != n:
        raise ProtocolError(f"[auth] handshake field {key!r} is missing or malformed")
    return raw


def server_handshake(sock: socket.socket, token: bytes, *, info: Optional[dict] = None,
                     deadline: Optional[float] = None) -> bool:
    """Authenticate a client on ``sock`` (node side). True when it proved the token; False
    after sending AUTH_FAIL. ProtocolError / OSError on a broken handshake; ``socket.timeout``
    when the whole exchange is not over by ``deadline`` (a ``time.monotonic()`` time; None:
    the socket's timeout applies to each read and write)."""
    nonce = os.urandom(_NONCE)
    send_frame(sock, MsgType.CHALLENGE, {"nonce": nonce.hex()}, deadline=deadline)
    frame = recv_frame(sock, limits=_HANDSHAKE_LIMITS, deadline=deadline)
    if frame.type != MsgType.AUTH:
        raise ProtocolError(f"[auth] expected AUTH, got {frame.type.name}")
    client_nonce = _hex_field(frame.header, "nonce", _NONCE)
    mac = _hex_field(frame.header, "mac", 32)
    if not hmac.compare_digest(mac, _mac(token, b"mmcore-client", nonce, client_nonce)):
        send_frame(sock, MsgType.AUTH_FAIL, {"reason": "wrong cluster token"},
                   deadline=deadline)
        return False
    # the node's info (modalities, load, hardware) only goes to a client that proved the token
    send_frame(sock, MsgType.AUTH_OK, {"mac": _mac(token, b"mmcore-node", client_nonce,
                                                   nonce).hex(), "node": info or {}},
               deadline=deadline)
    return True


def client_handshake(sock: socket.socket, token: bytes) -> dict:
    """Authenticate to a node on ``sock`` (client side); returns the node's info.

    Raises
    ------
    AuthError
        The node refused the token, or could not prove it knows the token.
    ProtocolError
        The peer does not speak the protocol.
    """
    frame = recv_frame(sock, limits=FrameLimits(max_frame_bytes=1 << 16,
                                                max_json_bytes=1 << 16, max_arrays=0))
    if frame.type != MsgType.CHALLENGE:
        raise ProtocolError(f"[auth] expected CHALLENGE, got {frame.type.name}")
    nonce = _hex_field(frame.header, "nonce", _NONCE)
    mine = os.urandom(_NONCE)
    send_frame(sock, MsgType.AUTH, {"nonce": mine.hex(),
                                    "mac": _mac(token, b"mmcore-client", nonce, mine).hex()})
    reply = recv_frame(sock, limits=_HANDSHAKE_LIMITS)
    if reply.type == MsgType.AUTH_FAIL:
        raise AuthError("[auth] the node refused the cluster token")
    if reply.type != MsgType.AUTH_OK:
        raise ProtocolError(f"[auth] expected AUTH_OK, got {reply.type.name}")
    if not hmac.compare_digest(_hex_field(reply.header, "mac", 32),
                               _mac(token, b"mmcore-node", mine, nonce)):
        raise AuthError("[auth] the node could not prove it knows the cluster token")
    node = reply.header.get("node")
    return node if isinstance(node, dict) else {}


def server_ssl_context(certfile: Any, keyfile: Any = None) -> ssl.SSLContext:
    """A TLS server context (TLS 1.2+) from a certificate chain and key file."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(os.fspath(certfile), None if keyfile is None else os.fspath(keyfile))
    return ctx


def client_ssl_context(cafile: Any = None, *, check_hostname: bool = True) -> ssl.SSLContext:
    """A TLS client context that verifies the node against ``cafile`` (or the system CAs)."""
    ctx = ssl.create_default_context(cafile=None if cafile is None else os.fspath(cafile))
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.check_hostname = check_hostname
    return ctx
