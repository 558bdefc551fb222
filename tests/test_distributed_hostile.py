"""Shard nodes under hostile clients: no lockout (handshake floods, drips, stalled payloads),
no node-local paths opened for a client, a bounded memory budget for frames in flight, and
warnings for weak settings. Every attack runs from this process against 127.0.0.1."""

from __future__ import annotations

import contextlib
import io
import os
import select
import shutil
import socket
import ssl
import stat
import subprocess
import sys
import threading
import time
import warnings

import numpy as np
import pytest

import mmcore.distributed
from _helpers import node_address, serving_node
from mmcore.distributed import Coordinator, DistributedConfig, ShardingStrategy
from mmcore.distributed.auth import SecurityWarning, client_handshake, resolve_token
from mmcore.distributed.node import READY_PREFIX, NodeServer
from mmcore.distributed.protocol import (
    HEADER,
    MAGIC,
    VERSION,
    FrameLimits,
    MsgType,
    encode_frame,
    recv_frame,
    send_frame,
)
from mmcore.errors import ConfigError, ProtocolError
from mmcore.model import MultiModalModel, default_model

TOKEN = "hostile-tests-cluster-token"
RNG = np.random.default_rng(7)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("hostile") / "model"
    default_model().save(d)
    return str(d)


def serving(model_dir, modalities=("text",), **kwargs):
    kwargs.setdefault("token", TOKEN)
    return serving_node(model_dir, modalities, **kwargs)


_addr = node_address


def _frame_bytes(mtype, header, arrays=()):
    return b"".join(bytes(b) for b in encode_frame(mtype, header, arrays))


def _legit_client(node, timeout=8.0, tls=None):
    """A legitimate client: client_handshake, HEALTH and a text ENCODE; returns the seconds
    it took (raises if it did not get through). ``tls``: an SSL context."""
    t0 = time.monotonic()
    s = socket.create_connection(node.address, timeout=timeout)
    if tls is not None:
        s = tls.wrap_socket(s, server_hostname="127.0.0.1")
    try:
        s.settimeout(timeout)
        info = client_handshake(s, TOKEN.encode())
        assert "text" in info["modalities"]
        send_frame(s, MsgType.HEALTH, {"id": "h"})
        assert recv_frame(s).type == MsgType.HEALTH_OK
        send_frame(s, MsgType.ENCODE, {"id": "e", "modality": "text", "input": {
            "value": {"form": "str", "value": "still served"}}})
        reply = recv_frame(s)
        assert reply.type == MsgType.RESULT, reply.header
    finally:
        s.close()
    return time.monotonic() - t0


def _authenticated(node, timeout=5.0):
    s = socket.create_connection(node.address, timeout=timeout)
    s.settimeout(timeout)
    client_handshake(s, TOKEN.encode())
    return s


def _closed(socks, timeout):
    """Wait (at most ``timeout`` s) until the node closed every socket of ``socks``
    (anything it sent is read and dropped); returns the set of those it closed."""
    closed = set()
    deadline = time.monotonic() + timeout
    while len(closed) < len(socks) and time.monotonic() < deadline:
        alive = [s for s in socks if s not in closed]
        ready, _, _ = select.select(alive, [], [], min(0.2, max(0.0, deadline -
                                                               time.monotonic())))
        for s in ready:
            try:
                if not s.recv(65536):
                    closed.add(s)
            except (ConnectionResetError, BrokenPipeError):
                closed.add(s)
            except (BlockingIOError, socket.timeout):
                pass
    return closed


def _wait_released(node, timeout=5.0):
    """The node's memory budget comes back to 0 (the serving threads release it after their
    answer is sent)."""
    deadline = time.monotonic() + timeout
    while node._inflight_bytes and time.monotonic() < deadline:
        time.sleep(0.02)
    assert node._inflight_bytes == 0


def _not_closed_yet(socks):
    """The sockets of ``socks`` that the node has not closed (without waiting)."""
    return len(socks) - len(_closed(socks, 0.05))


# -- 1. lockout ----------------------------------------------------------------------------------


@pytest.mark.parametrize("tls", [False, True])
def test_dripping_handshakes_do_not_lock_out_clients(model_dir, tmp_path, tls):
    """50 connections drip one byte per 0.5 s of their handshake: a legitimate client gets in
    at once, and each dripper is closed at the handshake deadline whatever it sends."""
    kwargs = {"handshake_timeout_s": 2.0}
    ctx = None
    if tls:
        cert, key = _self_signed(tmp_path)
        kwargs.update(certfile=cert, keyfile=key)
        ctx = ssl.create_default_context(cafile=str(cert))
    with serving(model_dir, **kwargs) as node:
        if tls:
            drip = b"\x16\x03\x01\x02\x00" + os.urandom(512)      # a TLS record, slowly
        else:
            drip = _frame_bytes(MsgType.AUTH, {"nonce": "00" * 32, "mac": "11" * 32})
        socks = [socket.create_connection(node.address, timeout=5) for _ in range(50)]
        stop = threading.Event()

        def dripper():
            for i in range(60):                                   # bounded: 30 s at most
                if stop.wait(0.5):
                    return
                for s in socks:
                    try:
                        s.send(drip[i % len(drip):i % len(drip) + 1])
                    except OSError:
                        pass
        t = threading.Thread(target=dripper, daemon=True)
        t.start()
        try:
            time.sleep(0.6)                                       # the drip has begun
            took = _legit_client(node, tls=ctx)
            assert took < 5.0, f"a legitimate client needed {took:.1f} s"
            closed = _closed(socks, 2.0 + 6.0)
            assert len(closed) == len(socks), \
                f"{len(socks) - len(closed)} dripping connections outlived the deadline"
        finally:
            stop.set()
            t.join(5)
            for s in socks:
                s.close()
        _legit_client(node, tls=ctx)


def test_idle_connection_flood_does_not_lock_out_clients(model_dir):
    """300 idle connections (more than the pending budget): the oldest pending ones are
    closed to make room, a legitimate client gets through at once, while most attackers are
    still connected, and the rest are closed at the handshake deadline."""
    with serving(model_dir, handshake_timeout_s=3.0) as node:
        socks = []
        try:
            for _ in range(300):
                socks.append(socket.create_connection(node.address, timeout=5))
            took = _legit_client(node)
            assert took < 5.0, f"a legitimate client needed {took:.1f} s"
            # it did not wait for the flood to expire: most attackers still hold their slot
            assert _not_closed_yet(socks) >= 200
            assert node._evicted >= 300 - 256
            closed = _closed(socks, 3.0 + 6.0)
            assert len(closed) == len(socks)
        finally:
            for s in socks:
                s.close()
        _legit_client(node)


def test_small_pending_budget_evicts_the_oldest(model_dir):
    with serving(model_dir, max_pending=4, handshake_timeout_s=30.0) as node:
        socks = [socket.create_connection(node.address, timeout=5) for _ in range(10)]
        try:
            # the 6 oldest were closed to make room for the 4 newest
            closed = _closed(socks[:6], 5.0)
            assert len(closed) == 6
            assert _not_closed_yet(socks[6:]) == 4
            _legit_client(node)                          # evicts one more, gets through
            assert _not_closed_yet(socks[6:]) >= 3
        finally:
            for s in socks:
                s.close()


def test_unauthenticated_connections_do_not_count_against_clients(model_dir):
    with serving(model_dir, max_connections=2, handshake_timeout_s=3.0) as node:
        idle = [socket.create_connection(node.address, timeout=5) for _ in range(20)]
        try:
            a, b = _authenticated(node), _authenticated(node)
            for s in (a, b):
                send_frame(s, MsgType.HEALTH, {"id": "x"})
                assert recv_frame(s).type == MsgType.HEALTH_OK
            # a third authenticated connection is over max_connections: closed
            c = _authenticated(node)
            assert len(_closed([c], 5.0)) == 1
            c.close()
            b.close()
            deadline = time.monotonic() + 5
            while node._info()["load"]["connections"] > 1 and time.monotonic() < deadline:
                time.sleep(0.02)
            _legit_client(node)                          # b's place is free again
            a.close()
        finally:
            for s in idle:
                s.close()


def test_stalled_or_dripping_payload_is_closed_at_the_frame_deadline(model_dir):
    """Authenticated clients that declare a large frame and stall (or drip it) are closed
    after frame_timeout_s (not the 600 s idle timeout) and release their memory budget;
    the node keeps serving others meanwhile."""
    with serving(model_dir, frame_timeout_s=1.0, min_bytes_per_s=64 * 1024,
                 max_inflight_bytes=64 << 20) as node:
        js = b'{"id":"big","modality":"text","input":{"value":{"form":"array","index":0}},' \
             b'"arrays":[{"dtype":"|u1","shape":[8000000],"offset":0}]}'
        head = HEADER.pack(MAGIC, VERSION, MsgType.ENCODE, 0, len(js), 8_000_000)
        stallers = [_authenticated(node) for _ in range(6)]
        drippers = [_authenticated(node) for _ in range(2)]
        for s in stallers:
            s.sendall(head + js[:10])
        for s in drippers:
            s.sendall(head + js)
        stop = threading.Event()

        def drip():
            for _ in range(100):                                   # bounded
                if stop.wait(0.2):
                    return
                for s in drippers:
                    try:
                        s.send(b"\x00")
                    except OSError:
                        pass
        t = threading.Thread(target=drip, daemon=True)
        t.start()
        try:
            deadline = time.monotonic() + 5
            while node._inflight_bytes < 8 * 8_000_000 and time.monotonic() < deadline:
                time.sleep(0.01)
            assert node._inflight_bytes >= 8 * 8_000_000          # the attackers reserved
            took = _legit_client(node)
            assert took < 5.0
            closed = _closed(stallers + drippers, 1.0 + 6.0)
            assert len(closed) == 8, "a stalled frame held its connection past the deadline"
            _wait_released(node)
        finally:
            stop.set()
            t.join(5)
            for s in stallers + drippers:
                s.close()
        _legit_client(node)


def test_client_that_does_not_read_answers_is_closed(model_dir):
    """Requests pipelined without ever reading the answers: once the socket buffers fill,
    the node's send misses its pace and the connection is closed (no thread held for the
    idle timeout)."""
    with serving(model_dir, frame_timeout_s=1.0, min_bytes_per_s=4 << 20) as node:
        s = _authenticated(node)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        req = _frame_bytes(MsgType.ENCODE, {"id": "r", "modality": "text", "input": {
            "value": {"form": "list", "items": [{"form": "str", "value": "x" * 500}] * 64}}})
        t0 = time.monotonic()
        try:
            s.settimeout(0.5)
            sent = 0
            while time.monotonic() - t0 < 20:                      # bounded
                try:
                    s.sendall(req)
                    sent += 1
                except socket.timeout:
                    break                                          # the node stopped reading
                except OSError:
                    break                                          # the node closed it
            assert sent > 1
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline and node._info()["load"]["connections"]:
                time.sleep(0.1)
            assert node._info()["load"]["connections"] == 0
        finally:
            s.close()
        _legit_client(node)


# -- 2. remote inputs are data, never node-local paths ------------------------------------------


def test_paths_in_requests_are_never_opened(model_dir, tmp_path):
    from PIL import Image
    png = tmp_path / "exists.png"
    Image.fromarray(RNG.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(png)
    fifo = tmp_path / "fifo.png"
    os.mkfifo(fifo)
    missing = tmp_path / "missing.png"
    with serving(model_dir, ["text", "image", "audio", "video"]) as node:
        s = _authenticated(node, timeout=10)
        try:
            answers = []
            for m in ("image", "audio", "video"):
                for path in (png, missing, fifo, "/etc/passwd"):
                    for value in ({"form": "str", "value": str(path)},
                                  {"form": "list", "items": [{"form": "str",
                                                              "value": str(path)}]}):
                        send_frame(s, MsgType.ENCODE, {"id": "p", "modality": m,
                                                       "input": {"value": value}})
                        r = recv_frame(s)
                        assert r.type == MsgType.ERROR
                        answers.append((m, "str", r.header["error"], r.header["message"]))
                    # bytes are encoded data: a file name sent as bytes is decoded (and
                    # fails to decode), never opened
                    data = np.frombuffer(os.fsencode(str(path)), np.uint8)
                    send_frame(s, MsgType.ENCODE, {"id": "b", "modality": m, "input": {
                        "value": {"form": "bytes", "index": 0}}}, [data])
                    r = recv_frame(s)
                    assert r.type == MsgType.ERROR
                    assert r.header["error"] == f"{m.capitalize()}DecodeError", r.header
                    assert "root:" not in r.header["message"]
                    assert "FIFO" not in r.header["message"]
            # one answer per modality for a string, whatever the path names (an existing
            # file, a missing one, a FIFO)
            for m in ("image", "audio", "video"):
                mine = {(e, msg) for mm, f, e, msg in answers if (mm, f) == (m, "str")}
                assert len(mine) == 1, mine
                ((error, message),) = mine
                assert error == "ProtocolError"
                assert message.startswith("[distributed]") and f"'{m}'" in message
                assert "'str'" in message
                assert "path" in message and str(tmp_path) not in message
            # a text modality takes no files (it would read the temporary name as text)
            send_frame(s, MsgType.ENCODE, {"id": "f", "modality": "text", "input": {
                "value": {"form": "file", "index": 0, "name": "a.txt"}}},
                       [np.frombuffer(b"hello", np.uint8)])
            r = recv_frame(s)
            assert r.type == MsgType.ERROR and r.header["error"] == "ProtocolError"
            # the file form (its bytes) still works, and so does text
            send_frame(s, MsgType.ENCODE, {"id": "ok", "modality": "image", "input": {
                "value": {"form": "file", "index": 0, "name": "x.png"}}},
                       [np.frombuffer(png.read_bytes(), np.uint8)])
            r = recv_frame(s)
            assert r.type == MsgType.RESULT, r.header
            ref = default_model().encode_modality("image", str(png))
            np.testing.assert_allclose(r.arrays[2], ref[2], atol=1e-5)
            # and so does an encoded image sent as bytes
            send_frame(s, MsgType.ENCODE, {"id": "eb", "modality": "image", "input": {
                "value": {"form": "bytes", "index": 0}}},
                       [np.frombuffer(png.read_bytes(), np.uint8)])
            r = recv_frame(s)
            assert r.type == MsgType.RESULT, r.header
            np.testing.assert_allclose(r.arrays[2], ref[2], atol=1e-5)
        finally:
            s.close()
        _legit_client(node)


def test_many_fifo_paths_do_not_hang_the_node(model_dir, tmp_path):
    fifos = []
    for i in range(64):
        f = tmp_path / f"f{i}.wav"
        os.mkfifo(f)
        fifos.append(str(f))
    with serving(model_dir, ["text", "audio"]) as node:
        socks = [_authenticated(node) for _ in range(8)]
        try:
            for k, s in enumerate(socks):
                for f in fifos[k * 8:(k + 1) * 8]:
                    send_frame(s, MsgType.ENCODE, {"id": f, "modality": "audio", "input": {
                        "value": {"form": "str", "value": f}}})
            for s in socks:
                for _ in range(8):
                    r = recv_frame(s)
                    assert r.type == MsgType.ERROR and r.header["error"] == "ProtocolError"
        finally:
            for s in socks:
                s.close()
        _legit_client(node)


def test_one_array_named_by_many_items_is_refused(model_dir):
    """A 1 MiB array named by 4096 "bytes" items would be 4 GiB of copies on the node."""
    with serving(model_dir, ["text"]) as node:
        s = _authenticated(node, timeout=20)
        try:
            send_frame(s, MsgType.ENCODE, {"id": "amp", "modality": "text", "input": {
                "value": {"form": "list", "items": [{"form": "bytes", "index": 0}] * 4096}}},
                       [np.zeros(1 << 20, np.uint8)])
            r = recv_frame(s)
            assert r.type == MsgType.ERROR and r.header["error"] == "ProtocolError"
            assert "more than once" in r.header["message"]
        finally:
            s.close()
        _legit_client(node)


def test_coordinator_path_inputs_still_travel_as_bytes(model_dir, tmp_path):
    """The client side is unchanged: a path given to a remote image modality is read by the
    client and sent as a file's bytes."""
    from PIL import Image
    png = tmp_path / "img.png"
    Image.fromarray(RNG.integers(0, 256, (20, 20, 3), dtype=np.uint8)).save(png)
    local = MultiModalModel.from_pretrained(model_dir)
    with serving(model_dir, ["image"]) as node:
        cfg = DistributedConfig(sharding_strategy=ShardingStrategy.modality_specific(
            {"image": [_addr(node)]}), token=TOKEN, heartbeat_s=5)
        model = mmcore.distributed.load(model_dir, cfg)
        try:
            np.testing.assert_allclose(model.infer({"image": str(png)}).fused,
                                       local.infer({"image": str(png)}).fused, atol=1e-5)
            # encoded bytes (and a file object, read on entry) travel as bytes
            data = png.read_bytes()
            np.testing.assert_allclose(model.infer({"image": [data, io.BytesIO(data)]}).fused,
                                       local.infer({"image": [str(png), str(png)]}).fused,
                                       atol=1e-5)
        finally:
            model.close()


# -- 3. memory budget ----------------------------------------------------------------------------


def test_frame_over_the_whole_budget_gets_an_error_and_the_connection_stays(model_dir):
    with serving(model_dir, max_inflight_bytes=1 << 20) as node:
        s = _authenticated(node, timeout=20)
        try:
            big = np.zeros(2 << 20, np.uint8)
            send_frame(s, MsgType.HEALTH, {"id": "big"}, [big])
            r = recv_frame(s)
            assert r.type == MsgType.ERROR and r.header["id"] == "big"
            assert r.header["error"] == "ProtocolError"
            assert "max_inflight_bytes=1048576" in r.header["message"]
            assert r.header["message"].startswith("[node]")
            send_frame(s, MsgType.HEALTH, {"id": "after"})         # same connection
            r = recv_frame(s)
            assert r.type == MsgType.HEALTH_OK and r.header["id"] == "after"
        finally:
            s.close()
        # a JSON header that parsing would blow up ("[{},{},...]": ~25x its size) is
        # charged for that: refused unparsed, and the connection is still usable
        s = _authenticated(node, timeout=20)
        try:
            js = ("[" + ",".join(["{}"] * 20_000) + "]").encode()
            s.sendall(HEADER.pack(MAGIC, VERSION, MsgType.HEALTH, 0, len(js), 0) + js)
            r = recv_frame(s)
            assert r.type == MsgType.ERROR and r.header["error"] == "ProtocolError"
            assert "max_inflight_bytes=1048576" in r.header["message"]
            send_frame(s, MsgType.HEALTH, {"id": "after"})
            assert recv_frame(s).type == MsgType.HEALTH_OK
        finally:
            s.close()
        _wait_released(node)
        # through the coordinator: the same clear error class, not a node failure
        cfg = DistributedConfig(sharding_strategy=ShardingStrategy.modality_specific(
            {"text": [_addr(node)]}), token=TOKEN, heartbeat_s=5)
        with Coordinator(cfg) as coord:
            with pytest.raises(ProtocolError, match="max_inflight_bytes"):
                coord.encode("text", {"input": {"value": {"form": "array", "index": 0}}},
                             [np.zeros((1, 300_000), np.int64)])
            assert coord.nodes[list(coord.nodes)[0]][0].healthy
        _legit_client(node)


def test_concurrent_large_frames_stay_within_the_budget(model_dir):
    """Four connections send 600 KB frames at once, slowly, to a node with a 1 MiB budget:
    one at a time fits; the others wait frame_timeout_s, then get an ERROR naming the limit
    (their payload read past, not buffered) and their connections keep working."""
    budget = 1 << 20
    with serving(model_dir, max_inflight_bytes=budget, frame_timeout_s=0.5,
                 min_bytes_per_s=50_000) as node:
        peak = [0]
        real = node._reserve

        def watched(jlen, plen, held):
            try:
                real(jlen, plen, held)
            finally:
                peak[0] = max(peak[0], node._inflight_bytes)
        node._reserve = watched
        data = _frame_bytes(MsgType.HEALTH, {"id": "big"}, [np.zeros(600_000, np.uint8)])
        socks = [_authenticated(node, timeout=30) for _ in range(4)]
        replies = [None] * 4

        def send_slowly(i):
            s = socks[i]
            for k in range(0, len(data), 20_000):                 # ~200 KB/s: about 3 s
                s.sendall(data[k:k + 20_000])
                time.sleep(0.1)
            replies[i] = recv_frame(s)

        threads = [threading.Thread(target=send_slowly, args=(i,), daemon=True)
                   for i in range(4)]
        try:
            for t in threads:
                t.start()
            for t in threads:
                t.join(60)
            assert all(r is not None for r in replies)
            ok = [r for r in replies if r.type == MsgType.HEALTH_OK]
            errors = [r for r in replies if r.type == MsgType.ERROR]
            assert ok and errors
            for r in errors:
                assert r.header["error"] == "Busy" and r.header["id"] == "big"
                assert f"max_inflight_bytes={budget}" in r.header["message"]
            assert 0 < peak[0] <= budget
            for s in socks:                                        # every connection works
                send_frame(s, MsgType.HEALTH, {"id": "after"})
                assert recv_frame(s).type == MsgType.HEALTH_OK
        finally:
            for s in socks:
                s.close()
        _wait_released(node)
        _legit_client(node)


def test_busy_node_is_retried_elsewhere_and_stays_in_rotation(model_dir):
    from mmcore.errors import NodeUnavailableError
    with serving(model_dir, max_inflight_bytes=1 << 20, frame_timeout_s=0.3) as busy, \
            serving(model_dir) as free:
        with busy._budget:
            busy._inflight_bytes = 1 << 20                 # as if frames filled the budget
        req = {"input": {"value": {"form": "str", "value": "hello"}}}
        cfg = DistributedConfig(sharding_strategy=ShardingStrategy.modality_specific(
            {"text": [_addr(busy)]}), token=TOKEN, heartbeat_s=60)
        with Coordinator(cfg) as coord:
            with pytest.raises(NodeUnavailableError, match="busy.*max_inflight_bytes"):
                coord.encode("text", req, [])
            assert coord.nodes[list(coord.nodes)[0]][0].healthy
        cfg = DistributedConfig(sharding_strategy=ShardingStrategy.modality_specific(
            {"text": [_addr(busy), _addr(free)]}), token=TOKEN, heartbeat_s=60)
        with Coordinator(cfg) as coord:
            for _ in range(3):                             # whichever node is picked first
                assert coord.encode("text", req, [])[2].shape == (1, 64)
        with busy._budget:
            busy._inflight_bytes = 0
        _legit_client(busy)


def test_a_small_frame_carrying_a_huge_batch_is_charged_for_its_items(model_dir):
    """100,000 1x1 images are 300 kB on the wire but ~6 GB once encoded: the node charges
    each item's decoded and encoded size against its budget, refuses the batch before
    preprocessing it, and keeps serving."""
    with serving(model_dir, ["image"], max_inflight_bytes=1 << 20) as node:
        s = _authenticated(node, timeout=20)
        try:
            x = np.zeros((100_000, 1, 1, 3), np.uint8)
            t0 = time.monotonic()
            send_frame(s, MsgType.ENCODE, {"id": "amp", "modality": "image", "input": {
                "value": {"form": "array", "index": 0}}}, [x])
            r = recv_frame(s)
            assert time.monotonic() - t0 < 10
            assert r.type == MsgType.ERROR and r.header["error"] == "ProtocolError"
            assert "100000 image items" in r.header["message"]
            assert "max_inflight_bytes=1048576" in r.header["message"]
            send_frame(s, MsgType.ENCODE, {"id": "ok", "modality": "image", "input": {
                "value": {"form": "array", "index": 0}}}, [x[:4]])
            r = recv_frame(s)
            assert r.type == MsgType.RESULT and r.arrays[2].shape[0] == 4
        finally:
            s.close()
        _wait_released(node)


def test_a_momentarily_busy_only_node_is_tried_again(model_dir):
    with serving(model_dir, max_inflight_bytes=1 << 20, frame_timeout_s=0.3) as node:
        with node._budget:
            node._inflight_bytes = 1 << 20                 # as if frames filled the budget

        def release():
            with node._budget:
                node._inflight_bytes = 0
                node._budget.notify_all()
        timer = threading.Timer(0.5, release)
        timer.start()
        try:
            req = {"input": {"value": {"form": "str", "value": "hello"}}}
            cfg = DistributedConfig(sharding_strategy=ShardingStrategy.modality_specific(
                {"text": [_addr(node)]}), token=TOKEN, heartbeat_s=60)
            with Coordinator(cfg) as coord:
                assert coord.encode("text", req, [])[2].shape == (1, 64)
        finally:
            timer.cancel()
            release()


def test_many_connections_declaring_huge_frames_allocate_nothing(model_dir):
    """Eight connections declare 1 GiB frames and stall: the budget (64 MiB) refuses all of
    them before anything is allocated, the node keeps serving, then closes them."""
    with serving(model_dir, max_inflight_bytes=64 << 20, frame_timeout_s=1.0,
                 limits=FrameLimits()) as node:
        js = b'{"id":"x","arrays":[]}'
        socks = [_authenticated(node) for _ in range(8)]
        try:
            for s in socks:
                s.sendall(HEADER.pack(MAGIC, VERSION, MsgType.ENCODE, 0, len(js),
                                      (1 << 30) - len(js)) + js)
            took = _legit_client(node)
            assert took < 5.0
            assert node._inflight_bytes <= 64 << 20
            assert len(_closed(socks, 1.0 + 6.0)) == 8
        finally:
            for s in socks:
                s.close()
        _legit_client(node)


# -- 4. warnings for weak settings ---------------------------------------------------------------


def test_short_token_warns(model_dir):
    with pytest.warns(SecurityWarning, match="fewer than 16"):
        NodeServer(model_dir, ["text"], token="short").close()
    with warnings.catch_warnings():
        warnings.simplefilter("error", SecurityWarning)
        NodeServer(model_dir, ["text"], token="x" * 16).close()
        resolve_token("short")                       # clients do not warn


def test_token_file_readable_by_others_warns(model_dir, tmp_path):
    tok = tmp_path / "token"
    tok.write_text(TOKEN)
    os.chmod(tok, 0o644)
    with pytest.warns(SecurityWarning, match="0644"):
        NodeServer(model_dir, ["text"], token_file=tok).close()
    os.chmod(tok, 0o640)
    with pytest.warns(SecurityWarning, match="group or others"):
        NodeServer(model_dir, ["text"], token_file=tok).close()
    os.chmod(tok, 0o600)
    with warnings.catch_warnings():
        warnings.simplefilter("error", SecurityWarning)
        NodeServer(model_dir, ["text"], token_file=tok).close()
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    with pytest.raises(ConfigError, match="token_file.*FIFO"):       # no hang
        resolve_token(token_file=fifo)


def test_non_loopback_without_tls_warns(model_dir, tmp_path, monkeypatch):
    from mmcore.distributed import node as node_mod
    assert node_mod._is_loopback("127.0.0.1") and node_mod._is_loopback("::1")
    assert not node_mod._is_loopback("0.0.0.0") and not node_mod._is_loopback("10.1.2.3")
    assert not node_mod._is_loopback("::")
    with warnings.catch_warnings():
        warnings.simplefilter("error", SecurityWarning)
        NodeServer(model_dir, ["text"], token=TOKEN).close()           # loopback: quiet
    # a non-loopback bind, simulated on 127.0.0.1 (tests stay on the loopback interface)
    monkeypatch.setattr(node_mod, "_is_loopback", lambda host: False)
    with pytest.warns(SecurityWarning, match="without TLS"):
        NodeServer(model_dir, ["text"], token=TOKEN).close()
    cert, key = _self_signed(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("error", SecurityWarning)
        NodeServer(model_dir, ["text"], token=TOKEN, certfile=cert, keyfile=key).close()


@contextlib.contextmanager
def cli_node(model_dir, tmp_path, token, mode, *extra):
    """``mmcore node`` in a child process with a token file of ``mode``: yields
    ``(address, stderr_box)``; the stderr text is in ``stderr_box[0]`` after the block."""
    tok = tmp_path / "token"
    tok.write_text(token)
    os.chmod(tok, mode)
    p = subprocess.Popen([sys.executable, "-m", "mmcore", "node", "--model", model_dir,
                          "--modality", "text", "--token-file", str(tok), "--threads", "1",
                          *extra],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         cwd=str(tmp_path))
    err = []
    try:
        line = []
        t = threading.Thread(target=lambda: line.append(p.stdout.readline()), daemon=True)
        t.start()
        t.join(60)
        assert line and line[0].startswith(READY_PREFIX), line
        host, port = line[0][len(READY_PREFIX):].strip().rsplit(":", 1)
        yield (host, int(port)), err
        p.terminate()
        err.append(p.communicate(timeout=30)[1])
    finally:
        if p.poll() is None:
            p.kill()
            p.wait(10)


def test_cli_node_warns_on_stderr(model_dir, tmp_path):
    with cli_node(model_dir, tmp_path, "short\n", 0o644) as (_, err):
        pass
    assert "SecurityWarning" in err[0] and "0644" in err[0] and "fewer than 16" in err[0]


def test_cli_node_takes_the_memory_budget(model_dir, tmp_path):
    with cli_node(model_dir, tmp_path, TOKEN, 0o600, "--max-inflight-bytes", "1048576") as (
            address, _):
        s = socket.create_connection(address, timeout=20)
        try:
            client_handshake(s, TOKEN.encode())
            send_frame(s, MsgType.HEALTH, {"id": "big"}, [np.zeros(2 << 20, np.uint8)])
            r = recv_frame(s)
            assert r.type == MsgType.ERROR and r.header["id"] == "big"
            assert "max_inflight_bytes=1048576" in r.header["message"]
        finally:
            s.close()


def test_new_node_settings_are_checked(model_dir):
    for kw in ({"max_pending": 0}, {"max_inflight_bytes": -1}, {"frame_timeout_s": 0},
               {"min_bytes_per_s": float("nan")}, {"handshake_timeout_s": True}):
        with pytest.raises(ConfigError, match=next(iter(kw))):
            NodeServer(model_dir, ["text"], token=TOKEN, **kw)


def _self_signed(tmp_path):
    if shutil.which("openssl") is None:
        pytest.skip("the openssl command is not installed")
    cert, key = tmp_path / "c.pem", tmp_path / "k.pem"
    r = subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-subj",
                        "/CN=localhost", "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost",
                        "-days", "1", "-keyout", str(key), "-out", str(cert)],
                       capture_output=True, timeout=60)
    if r.returncode != 0:
        pytest.skip(f"openssl cannot make a self-signed certificate: {r.stderr[-300:]!r}")
    os.chmod(key, stat.S_IRUSR | stat.S_IWUSR)
    return cert, key


def test_ray_actor_body_never_opens_paths_either(model_dir, tmp_path):
    from PIL import Image

    from mmcore.distributed.ray_backend import _EncoderActorImpl
    png = tmp_path / "exists.png"
    Image.fromarray(RNG.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(png)
    actor = _EncoderActorImpl(model_dir, "image")
    for path in (png, tmp_path / "missing.png"):
        with pytest.raises(ProtocolError, match="modality 'image'"):
            actor.encode({"value": {"form": "str", "value": str(path)}}, [])
    text = _EncoderActorImpl(model_dir, "text")
    tokens, mask, pooled = text.encode({"value": {"form": "str", "value": "a cat"}}, [])
    assert pooled.shape[0] == 1


def test_failed_node_start_leaves_no_socket_or_directory(model_dir, tmp_path, monkeypatch):
    import tempfile as _tempfile
    monkeypatch.setattr(_tempfile, "tempdir", str(tmp_path))
    with serving(model_dir) as node:
        taken = node.address[1]
        with pytest.raises(OSError):                     # the port is in use
            NodeServer(model_dir, ["text"], token=TOKEN, port=taken)
    with warnings.catch_warnings():
        warnings.simplefilter("error", SecurityWarning)
        with pytest.raises(SecurityWarning):
            NodeServer(model_dir, ["text"], token=TOKEN, host="0.0.0.0", port=0)
    assert not [n for n in os.listdir(tmp_path) if n.startswith("mmcore-node-")]
