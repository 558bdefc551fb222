"""mmcore.distributed end to end: shard nodes (in-process and as processes), the coordinator,
LocalCluster, failures (killed, stopped, silent and draining nodes), TLS and the CLI."""

from __future__ import annotations

import concurrent.futures
import contextlib
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import wave

import numpy as np
import pytest

import mmcore.distributed
from _helpers import node_address, serving_node
from mmcore import Modality
from mmcore.distributed import (
    Coordinator,
    DistributedConfig,
    LocalCluster,
    RemoteError,
    ShardingStrategy,
)
from mmcore.distributed.auth import server_handshake
from mmcore.distributed.coordinator import NodeClient
from mmcore.distributed.node import READY_PREFIX
from mmcore.distributed.protocol import HEADER, MAGIC, VERSION, MsgType, recv_frame, send_frame
from mmcore.errors import (
    ArgumentError,
    AuthError,
    ConfigError,
    ModalityError,
    NodeUnavailableError,
    ShapeError,
)
from mmcore.model import MultiModalModel, default_model
from mmcore.model.loader import MultiModalLoader

TOKEN = "test-cluster-token"
ATOL = 1e-5
RNG = np.random.default_rng(1234)
TEXTS = ["a cat on a mat", "distributed inference"]
IMAGES = RNG.integers(0, 256, (2, 40, 50, 3), dtype=np.uint8)
WAVES = (0.3 * RNG.standard_normal((2, 8000))).astype(np.float32)
CLIPS = RNG.integers(0, 256, (2, 8, 24, 24, 3), dtype=np.uint8)
RAW = {"text": TEXTS, "image": IMAGES, "audio": WAVES, "video": CLIPS}


def _deadline_wait(pred, timeout, what, step=0.05):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return
        time.sleep(step)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def _assert_same(out, ref, modalities=None):
    np.testing.assert_allclose(out.fused, ref.fused, atol=ATOL, rtol=1e-5)
    for m in (modalities or ref.pooled):
        np.testing.assert_allclose(out.pooled[m], ref.pooled[m], atol=ATOL, rtol=1e-5)
        np.testing.assert_allclose(out.embeddings[m], ref.embeddings[m], atol=ATOL, rtol=1e-5)
        np.testing.assert_array_equal(out.masks[m], ref.masks[m])


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("dist") / "model"
    default_model().save(d)
    return str(d)


@pytest.fixture(scope="module")
def local(model_dir):
    return MultiModalModel.from_pretrained(model_dir)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """A directory outside the source tree for node processes to run in."""
    return str(tmp_path_factory.mktemp("cwd"))


def serving(model_dir, modalities, **kwargs):
    """An in-process node, served by a daemon thread; stopped and joined on exit."""
    kwargs.setdefault("token", TOKEN)
    return serving_node(model_dir, modalities, **kwargs)


_addr = node_address


def _config(nodes, **kwargs):
    kwargs.setdefault("token", TOKEN)
    kwargs.setdefault("heartbeat_s", 0.2)
    kwargs.setdefault("connect_timeout_s", 2.0)
    kwargs.setdefault("request_timeout_s", 10.0)
    return DistributedConfig(sharding_strategy=ShardingStrategy.modality_specific(nodes),
                             **kwargs)


@contextlib.contextmanager
def remote_model(model_dir, cfg):
    model = mmcore.distributed.load(model_dir, cfg)
    try:
        yield model
    finally:
        model.close()


@pytest.fixture(scope="module")
def text_node(model_dir):
    with serving(model_dir, ["text"]) as node:
        yield node


def _good_request(node):
    with Coordinator(_config({"text": [_addr(node)]})) as coord:
        tokens, mask, pooled = coord.encode("text", {"input": {"value": {
            "form": "str", "value": "still here"}}}, [])
    ref = default_model().encode_modality("text", "still here")
    np.testing.assert_allclose(pooled, ref[2], atol=ATOL)


# -- real processes: equality with local inference ----------------------------------------------


@pytest.fixture(scope="module")
def cluster(model_dir):
    c = LocalCluster(model_dir, {Modality.TEXT: 1, Modality.IMAGE: 2, Modality.AUDIO: 1,
                                 Modality.VIDEO: 1}, token=TOKEN, threads_per_node=1,
                     start_timeout_s=60)
    try:
        yield c
    finally:
        c.close()


def test_cluster_equals_local_raw_inputs(cluster, local, model_dir):
    assert len(cluster.addresses["image"]) == 2
    assert all(a.startswith("127.0.0.1:") for ads in cluster.addresses.values() for a in ads)
    with remote_model(model_dir, cluster.config(heartbeat_s=0.2)) as model:
        assert set(model.remote_modalities) == set(Modality(m) for m in RAW)
        _assert_same(model.infer(RAW), local.infer(RAW))
        for m, v in RAW.items():                # each modality alone, and pairs
            _assert_same(model.infer({m: v}), local.infer({m: v}))
        pair = {"text": TEXTS[:1], "audio": WAVES[0]}
        _assert_same(model.infer(pair), local.infer(pair))
        single = {"image": IMAGES[0], "video": CLIPS[0], "text": "one"}
        _assert_same(model.infer(single), local.infer(single))
        as_list = {"audio": [float(x) for x in WAVES[0][:4000]], "text": [b"bytes text"]}
        _assert_same(model.infer(as_list), local.infer(as_list))


def test_cluster_equals_local_file_inputs(cluster, local, model_dir, tmp_path):
    from PIL import Image
    png = tmp_path / "img.png"
    Image.fromarray(IMAGES[0]).save(png)
    jpg = tmp_path / "img.jpg"
    Image.fromarray(IMAGES[1]).save(jpg, quality=95)
    wav = tmp_path / "sound.wav"
    with wave.open(str(wav), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(16000)
        w.writeframes((WAVES[0] * 20000).astype("<i2").tobytes())
    inputs = {"image": [str(png), jpg], "audio": [str(wav), wav], "text": TEXTS}
    with remote_model(model_dir, cluster.config(heartbeat_s=0.2)) as model:
        _assert_same(model.infer(inputs), local.infer(inputs))
        one = {"image": png, "audio": str(wav)}
        _assert_same(model.infer(one), local.infer(one))


def test_cluster_equals_local_preprocessed_inputs(cluster, local, model_dir):
    pre = {m: local.preprocessors[Modality(m)](RAW[m]) for m in ("text", "image", "audio")}
    video = local.preprocessors[Modality.VIDEO](CLIPS[0])
    inputs = {"text": {"input_ids": pre["text"]["input_ids"]},
              "image": pre["image"],
              "audio": {"input_features": pre["audio"]["input_features"]}}
    masks = {"text": pre["text"]["attention_mask"], "audio": pre["audio"]["attention_mask"]}
    from mmcore.model import MultiModalInput
    with remote_model(model_dir, cluster.config(heartbeat_s=0.2)) as model:
        _assert_same(model.infer(MultiModalInput(inputs, attention_masks=masks)),
                     local.infer(MultiModalInput(inputs, attention_masks=masks)))
        plain = {"image": pre["image"]["pixel_values"][:1],
                 "video": {"pixel_values": video["pixel_values"][None]}}
        _assert_same(model.infer(plain), local.infer(plain))


def test_loader_with_distributed_and_health(cluster, local, model_dir):
    cfg = cluster.config(heartbeat_s=0.2)
    with pytest.warns(DeprecationWarning, match="mmcore.distributed.attach"):
        loader = MultiModalLoader(default_model().config).with_weights(model_dir) \
            .with_distributed(cfg)
    model = loader.load()
    try:
        assert model.distributed is not None
        _assert_same(model.infer(RAW), local.infer(RAW))
        _deadline_wait(lambda: all(n["info"].get("load") for ns in
                                   model.distributed.health().values() for n in ns), 10,
                       "heartbeats")
        health = model.distributed.health()
        assert set(health) == {"text", "image", "audio", "video"}
        for m, nodes in health.items():
            for n in nodes:
                assert n["healthy"] and n["outstanding"] == 0
                assert n["info"]["modalities"] == [m]
                assert n["info"]["hardware"]["class"] in ("cpu", "gpu")
                assert set(n["info"]["load"]) >= {"in_flight", "served", "failed"}
    finally:
        model.close()
    assert model.remote_modalities == () and model.distributed is None
    _assert_same(model.infer(RAW), local.infer(RAW))       # local again after close


def test_remote_errors_are_reraised_and_keep_the_node(cluster, local, model_dir):
    cfg = cluster.config(heartbeat_s=0.2)
    bad_image = np.zeros((5, 7, 3), np.float32)     # float (H, W, 3): not a raw uint8 image
    with pytest.raises(Exception) as local_info:
        local.infer({"image": bad_image})
    # a modality map that sends audio requests to the text node
    wrong = _config({"text": cluster.addresses["text"], "audio": cluster.addresses["text"]},
                    token=TOKEN)
    with remote_model(model_dir, cfg) as model:
        with pytest.raises(type(local_info.value)):
            model.infer({"image": bad_image})
        with pytest.raises(ShapeError):
            model.infer({"video": np.zeros((2, 3), np.float32)})
        assert all(n["healthy"] for n in model.distributed.health()["image"])
        _assert_same(model.infer({"image": IMAGES}), local.infer({"image": IMAGES}))
    with remote_model(model_dir, wrong) as model:
        with pytest.raises(ModalityError, match="serves text"):
            model.infer({"audio": WAVES})
        assert model.distributed.health()["audio"][0]["healthy"]
        _assert_same(model.infer({"text": TEXTS}), local.infer({"text": TEXTS}))


def test_kill9_during_a_stream_loses_no_request(model_dir, local):
    images = [RNG.integers(0, 256, (1, 24, 24, 3), dtype=np.uint8) for _ in range(50)]
    refs = [local.infer({"image": im}).fused for im in images]
    with LocalCluster(model_dir, {"image": 2}, token=TOKEN, threads_per_node=1,
                      start_timeout_s=60) as c:
        victim = c.processes[Modality.IMAGE][0]
        with remote_model(model_dir, c.config(heartbeat_s=0.2, connect_timeout_s=2,
                                              request_timeout_s=10)) as model:
            done = []
            killed = threading.Event()

            def one(i):
                out = model.infer({"image": images[i]}).fused
                done.append(i)
                if len(done) >= 15 and not killed.is_set():
                    killed.set()
                    os.kill(victim.pid, signal.SIGKILL)
                return out

            with concurrent.futures.ThreadPoolExecutor(4) as pool:
                outs = list(pool.map(one, range(50), timeout=60))
            assert killed.is_set()
            assert victim.wait(timeout=10) == -signal.SIGKILL
            for out, ref in zip(outs, refs):
                np.testing.assert_allclose(out, ref, atol=ATOL, rtol=1e-5)
            _deadline_wait(lambda: not model.distributed.health()["image"][0]["healthy"], 5,
                           "the killed node to be out of rotation")
            assert model.distributed.health()["image"][1]["healthy"]
            # and a sequential stream after the kill still works
            for i in range(5):
                np.testing.assert_allclose(model.infer({"image": images[i]}).fused, refs[i],
                                           atol=ATOL, rtol=1e-5)


# -- in-process nodes: hostile clients, timeouts, failover ---------------------------------------


def test_node_binds_loopback_and_reports_health(text_node):
    assert text_node.address[0] == "127.0.0.1"
    client = NodeClient(_addr(text_node), TOKEN.encode(), connect_timeout_s=2,
                        request_timeout_s=5)
    try:
        frame = client.request(MsgType.HEALTH, {"id": "h1"})
        assert frame.type == MsgType.HEALTH_OK and frame.header["id"] == "h1"
        assert frame.header["modalities"] == ["text"]
        assert frame.header["hardware"]["class"] in ("cpu", "gpu")
        assert frame.header["draining"] is False
        assert client.info["modalities"] == ["text"]       # sent once the token is proved
    finally:
        client.close()


def test_wrong_token_gets_auth_error_and_node_keeps_serving(text_node, model_dir):
    with Coordinator(_config({"text": [_addr(text_node)]}, token="wrong")) as coord:
        with pytest.raises(AuthError):
            coord.encode("text", {"input": {"value": {"form": "str", "value": "x"}}}, [])
    with remote_model(model_dir, _config({"text": [_addr(text_node)]}, token="nope")) as m:
        with pytest.raises(AuthError):
            m.infer({"text": TEXTS})
    _good_request(text_node)


def _raw_connect(node):
    s = socket.create_connection(node.address, timeout=5)
    challenge = recv_frame(s)
    assert challenge.type == MsgType.CHALLENGE
    return s


def _closed_by_peer(s, timeout=5):
    s.settimeout(timeout)
    try:
        while True:
            if not s.recv(65536):
                return True
    except (ConnectionResetError, BrokenPipeError):
        return True
    except socket.timeout:
        return False


def _authenticated(node):
    client = NodeClient(_addr(node), TOKEN.encode(), connect_timeout_s=2, request_timeout_s=5)
    return client._connect()


@pytest.mark.parametrize("kind", ["garbage", "truncated", "oversized", "bad_json",
                                  "bad_array", "wrong_type", "garbage_after_auth",
                                  "truncated_after_auth", "oversized_after_auth"])
def test_malformed_frames_close_only_that_connection(text_node, caplog, kind):
    caplog.set_level(logging.INFO, logger="mmcore.node")
    bystander = _authenticated(text_node)       # another client, connected throughout
    try:
        s = _authenticated(text_node) if kind.endswith("after_auth") else _raw_connect(text_node)
        try:
            base = kind.replace("_after_auth", "")
            if base == "garbage":
                s.sendall(os.urandom(64) + b"\x00" * 64)
            elif base == "truncated":
                frame = HEADER.pack(MAGIC, VERSION, MsgType.HEALTH, 0, 100, 0) + b'{"id": '
                s.sendall(frame)
                s.shutdown(socket.SHUT_WR)
            elif base == "oversized":
                s.sendall(HEADER.pack(MAGIC, VERSION, MsgType.ENCODE, 0, 64, 1 << 50))
            elif base == "bad_json":
                s.sendall(HEADER.pack(MAGIC, VERSION, MsgType.HEALTH, 0, 5, 0) + b"{{{{{")
            elif base == "bad_array":
                js = b'{"arrays": [{"dtype": "|O", "shape": [1], "offset": 0}]}'
                s.sendall(HEADER.pack(MAGIC, VERSION, MsgType.ENCODE, 0, len(js), 8) + js
                          + bytes(8))
            elif base == "wrong_type":
                send_frame(s, MsgType.RESULT, {"id": "x"})
            assert _closed_by_peer(s), "the node kept a connection that sent a bad frame"
        finally:
            s.close()
        _deadline_wait(lambda: any(r.name == "mmcore.node" and "closing" in r.getMessage()
                                   for r in caplog.records), 5, "a logged reason")
        # the node still serves the other connection and new ones
        send_frame(bystander, MsgType.HEALTH, {"id": "b"})
        bystander.settimeout(5)
        assert recv_frame(bystander).type == MsgType.HEALTH_OK
        _good_request(text_node)
    finally:
        bystander.close()


def test_bad_requests_get_error_frames_and_keep_the_connection(text_node):
    s = _authenticated(text_node)
    try:
        s.settimeout(10)
        for header in ({"id": "a", "modality": "text", "input": {"value": {"form": "pickle"}}},
                       {"id": "b", "modality": "smell", "input": {}},
                       {"id": "c", "modality": "image", "input": {"value": {
                           "form": "str", "value": "x"}}},
                       {"id": "d", "modality": "text"}):
            send_frame(s, MsgType.ENCODE, header)
            reply = recv_frame(s)
            assert reply.type == MsgType.ERROR and reply.header["id"] == header["id"]
            assert reply.header["error"] in ("ProtocolError", "ModalityError", "RemoteError")
        send_frame(s, MsgType.ENCODE, {"id": "ok", "modality": "text", "input": {
            "value": {"form": "str", "value": "fine"}}})
        reply = recv_frame(s)
        assert reply.type == MsgType.RESULT and len(reply.arrays) == 3
        send_frame(s, MsgType.HEALTH, {"id": {"not": "an id"}})
        assert _closed_by_peer(s)
    finally:
        s.close()
    _good_request(text_node)


@contextlib.contextmanager
def silent_node(handshake=False):
    """A fake node that accepts connections and never answers (or answers the handshake
    only, then never answers a request)."""
    srv = socket.create_server(("127.0.0.1", 0))
    srv.settimeout(0.1)
    stop = threading.Event()
    conns = []

    def run():
        while not stop.is_set():
            try:
                c, _ = srv.accept()
            except socket.timeout:
                continue
            except OSError:
                return
            conns.append(c)
            if handshake:
                def hs(c=c):
                    try:
                        c.settimeout(10)
                        server_handshake(c, TOKEN.encode())
                    except Exception:
                        pass
                threading.Thread(target=hs, daemon=True).start()

    t = threading.Thread(target=run, daemon=True)
    t.start()
    try:
        yield "127.0.0.1:%d" % srv.getsockname()[1]
    finally:
        stop.set()
        t.join(5)
        srv.close()
        for c in conns:
            c.close()


@pytest.mark.parametrize("handshake", [False, True])
def test_silent_node_times_out_with_node_unavailable(handshake, model_dir):
    with silent_node(handshake) as addr:
        cfg = _config({"text": [addr]}, connect_timeout_s=0.5, request_timeout_s=0.5,
                      heartbeat_s=5)
        with remote_model(model_dir, cfg) as model:
            t0 = time.monotonic()
            with pytest.raises(NodeUnavailableError, match="'text'"):
                model.infer({"text": TEXTS})
            assert time.monotonic() - t0 < 3
            assert not model.distributed.health()["text"][0]["healthy"]


@pytest.mark.parametrize("handshake", [False, True])
def test_silent_node_fails_over_to_a_live_one(handshake, text_node, model_dir, local):
    with silent_node(handshake) as addr:
        cfg = _config({"text": [addr, _addr(text_node)]}, connect_timeout_s=0.5,
                      request_timeout_s=0.5, heartbeat_s=5)
        with remote_model(model_dir, cfg) as model:
            t0 = time.monotonic()
            _assert_same(model.infer({"text": TEXTS}), local.infer({"text": TEXTS}))
            assert time.monotonic() - t0 < 3
            health = model.distributed.health()["text"]
            assert not health[0]["healthy"] and health[1]["healthy"]


def _closed_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def test_no_node_left_raises_or_drops(text_node, model_dir, local):
    dead = f"127.0.0.1:{_closed_port()}"
    nodes = {"text": [_addr(text_node)], "image": [dead, f"127.0.0.1:{_closed_port()}"]}
    inputs = {"text": TEXTS, "image": IMAGES}
    with remote_model(model_dir, _config(nodes, connect_timeout_s=0.5)) as model:
        with pytest.raises(NodeUnavailableError, match="'image'") as info:
            model.infer(inputs)
        assert "2 tried" in str(info.value)
    with remote_model(model_dir, _config(nodes, connect_timeout_s=0.5,
                                         drop_unavailable=True)) as model:
        out = model.infer(inputs)
        assert set(out.pooled) == {Modality.TEXT}
        _assert_same(out, local.infer({"text": TEXTS}))
        with pytest.raises(ModalityError):
            model.infer({"image": IMAGES})          # nothing left to fuse


def test_least_outstanding_pick(text_node):
    cfg = _config({"text": ["127.0.0.1:1", "127.0.0.1:2", "127.0.0.1:3"]}, heartbeat_s=60)
    with Coordinator(cfg) as coord:
        a, b, c = coord.nodes[Modality.TEXT]
        a.outstanding, b.outstanding, c.outstanding = 3, 1, 2
        assert coord._pick(Modality.TEXT, set()) is b and b.outstanding == 2
        assert coord._pick(Modality.TEXT, {b}) is c
        b.healthy = False
        b.outstanding = 0
        assert coord._pick(Modality.TEXT, set()) in (a, c)     # healthy ones first
        assert coord._pick(Modality.TEXT, {a, c}) is b          # then the others
        assert coord._pick(Modality.TEXT, {a, b, c}) is None


def test_requests_spread_over_nodes(model_dir):
    with serving(model_dir, ["image"]) as n1, serving(model_dir, ["image"]) as n2:
        cfg = _config({"image": [_addr(n1), _addr(n2)]})
        with remote_model(model_dir, cfg) as model:
            big = RNG.integers(0, 256, (16, 48, 48, 3), dtype=np.uint8)
            with concurrent.futures.ThreadPoolExecutor(4) as pool:
                list(pool.map(lambda _: model.infer({"image": big}), range(8), timeout=60))
        # a node counts a request once its answer is sent
        _deadline_wait(lambda: n1._served + n2._served == 8, 5, "the served counters")
        assert n1._served > 0 and n2._served > 0


def test_tls(model_dir, tmp_path, local):
    if shutil.which("openssl") is None:
        pytest.skip("the openssl command is not installed")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    r = subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-subj",
                        "/CN=localhost", "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost",
                        "-days", "1", "-keyout", str(key), "-out", str(cert)],
                       capture_output=True, timeout=60)
    if r.returncode != 0:
        pytest.skip(f"openssl cannot make a self-signed certificate: {r.stderr[-300:]!r}")
    with serving(model_dir, ["text"], certfile=cert, keyfile=key) as node:
        with remote_model(model_dir, _config({"text": [_addr(node)]},
                                             tls_cafile=cert)) as model:
            _assert_same(model.infer({"text": TEXTS}), local.infer({"text": TEXTS}))
        # a plain client cannot talk to a TLS node; the node keeps serving
        with remote_model(model_dir, _config({"text": [_addr(node)]},
                                             connect_timeout_s=1)) as model:
            with pytest.raises(NodeUnavailableError):
                model.infer({"text": TEXTS})
        # a client that does not trust the certificate refuses the node
        other = tmp_path / "other.pem"
        subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-subj",
                        "/CN=localhost", "-days", "1", "-keyout", str(tmp_path / "k2.pem"),
                        "-out", str(other)], capture_output=True, timeout=60, check=True)
        with remote_model(model_dir, _config({"text": [_addr(node)]},
                                             tls_cafile=other)) as model:
            with pytest.raises(NodeUnavailableError):
                model.infer({"text": TEXTS})
        with remote_model(model_dir, _config({"text": [_addr(node)]},
                                             tls_cafile=cert)) as model:
            _assert_same(model.infer({"text": TEXTS}), local.infer({"text": TEXTS}))


def test_in_process_node_drains_on_stop(model_dir, local):
    big = RNG.integers(0, 256, (512, 64, 64, 3), dtype=np.uint8)
    with serving(model_dir, ["image"]) as node:
        with remote_model(model_dir, _config({"image": [_addr(node)]})) as model:
            fut = concurrent.futures.ThreadPoolExecutor(1).submit(model.infer, {"image": big})
            _deadline_wait(lambda: node._in_flight > 0 or fut.done(), 20, "the request")
            node.stop()
            out = fut.result(timeout=30)
    np.testing.assert_allclose(out.fused, local.infer({"image": big}).fused, atol=ATOL)


# -- the mmcore node command --------------------------------------------------------------------


@contextlib.contextmanager
def node_process(model_dir, workdir, modalities=("text",), extra=(), env=None):
    tok = os.path.join(workdir, "token")
    with open(tok, "w") as fh:
        fh.write(TOKEN + "\n")
    cmd = [sys.executable, "-m", "mmcore", "node", "--model", model_dir, "--host", "127.0.0.1",
           "--port", "0", "--token-file", tok, "--threads", "1", *extra]
    for m in modalities:
        cmd += ["--modality", m]
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         cwd=workdir, env=dict(os.environ, **(env or {})))
    try:
        line = _read_line(p, 60)
        assert line.startswith(READY_PREFIX), line
        host, port = line[len(READY_PREFIX):].strip().rsplit(":", 1)
        assert host == "127.0.0.1" and 0 < int(port) < 65536
        yield p, f"{host}:{port}"
    finally:
        for sig in (signal.SIGCONT, signal.SIGKILL):
            if p.poll() is None:
                p.send_signal(sig)
        p.wait(timeout=10)
        p.stdout.close()
        p.stderr.close()


def _read_line(p, timeout):
    result = []
    t = threading.Thread(target=lambda: result.append(p.stdout.readline()), daemon=True)
    t.start()
    t.join(timeout)
    if not result:
        raise AssertionError("the node printed no ready line in time")
    return result[0]


def test_cli_node_sigterm_drains_in_flight_request(model_dir, workdir, local):
    big = RNG.integers(0, 256, (2048, 64, 64, 3), dtype=np.uint8)
    with node_process(model_dir, workdir, ["image"]) as (p, addr):
        with remote_model(model_dir, _config({"image": [addr]}, request_timeout_s=60)) as model:
            probe = NodeClient(addr, TOKEN.encode(), connect_timeout_s=2, request_timeout_s=5)
            try:
                with concurrent.futures.ThreadPoolExecutor(1) as pool:
                    fut = pool.submit(model.infer, {"image": big})

                    def busy():
                        h = probe.request(MsgType.HEALTH, {"id": "p"})
                        return h.header["load"]["in_flight"] > 0 or fut.done()
                    _deadline_wait(busy, 30, "the big request to reach the node")
                    assert not fut.done(), "the request finished before SIGTERM; make it bigger"
                    p.send_signal(signal.SIGTERM)
                    out = fut.result(timeout=60)
            finally:
                probe.close()
            assert p.wait(timeout=30) == 0
            health = model.distributed.check_health(model.distributed.nodes[Modality.IMAGE][0])
            assert health is False
    np.testing.assert_allclose(out.fused, local.infer({"image": big}).fused, atol=ATOL)


def test_cli_node_heartbeat_sigstop_sigcont(model_dir, workdir, local):
    with node_process(model_dir, workdir, ["text", "audio"]) as (p, addr):
        cfg = _config({"text": [addr]}, heartbeat_s=0.2, connect_timeout_s=0.5,
                      request_timeout_s=1.0)
        with remote_model(model_dir, cfg) as model:
            _assert_same(model.infer({"text": TEXTS}), local.infer({"text": TEXTS}))
            node = model.distributed.nodes[Modality.TEXT][0]
            _deadline_wait(lambda: node.info.get("modalities") == ["text", "audio"], 5,
                           "a heartbeat")
            p.send_signal(signal.SIGSTOP)
            try:
                _deadline_wait(lambda: not node.healthy, 10, "the stopped node to be unhealthy")
                t0 = time.monotonic()
                with pytest.raises(NodeUnavailableError, match="'text'"):
                    model.infer({"text": TEXTS})
                assert time.monotonic() - t0 < 5
            finally:
                p.send_signal(signal.SIGCONT)
            _deadline_wait(lambda: node.healthy, 10, "the node to come back")
            _assert_same(model.infer({"text": TEXTS}), local.infer({"text": TEXTS}))


def test_cli_node_errors(model_dir, workdir, tmp_path):
    def run(args, env=None):
        e = dict(os.environ, **(env or {}))
        e.pop("MMCORE_CLUSTER_TOKEN", None) if env is None else None
        return subprocess.run([sys.executable, "-m", "mmcore", "node", *args], cwd=workdir,
                              capture_output=True, text=True, timeout=60, env=e)
    r = run(["--model", str(tmp_path / "missing"), "--modality", "text"],
            env={"MMCORE_CLUSTER_TOKEN": "x"})
    assert r.returncode == 2 and "mmcore node:" in r.stderr
    r = run(["--model", model_dir, "--modality", "text"])
    assert r.returncode == 2 and "token" in r.stderr
    r = run(["--model", model_dir, "--modality", "smell"], env={"MMCORE_CLUSTER_TOKEN": "x"})
    assert r.returncode != 0


def test_cli_node_token_from_env(model_dir, workdir, local):
    env = {"MMCORE_CLUSTER_TOKEN": "env-token"}
    tok_dir = os.path.join(workdir, "envtok")
    os.makedirs(tok_dir, exist_ok=True)
    cmd = [sys.executable, "-m", "mmcore", "node", "--model", model_dir, "--modality", "text",
           "--threads", "1"]
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                         cwd=tok_dir, env=dict(os.environ, **env))
    try:
        line = _read_line(p, 60)
        addr = line[len(READY_PREFIX):].strip()
        with remote_model(model_dir, _config({"text": [addr]}, token="env-token")) as model:
            _assert_same(model.infer({"text": TEXTS}), local.infer({"text": TEXTS}))
        p.send_signal(signal.SIGTERM)
        assert p.wait(timeout=30) == 0
    finally:
        if p.poll() is None:
            p.kill()
            p.wait(timeout=10)
        p.stdout.close()


# -- LocalCluster --------------------------------------------------------------------------------


def test_local_cluster_validation_and_failed_start(model_dir, tmp_path):
    for counts in ({}, {"text": 0}, {"text": True}, {"text": 1.5}, ["text"]):
        with pytest.raises(ConfigError, match="counts"):
            LocalCluster(model_dir, counts)
    t0 = time.monotonic()
    with pytest.raises(NodeUnavailableError, match="exited"):
        LocalCluster(tmp_path / "missing", {"text": 1}, threads_per_node=1,
                     start_timeout_s=60)
    assert time.monotonic() - t0 < 30


def test_local_cluster_ready_line_after_buffered_output(model_dir, tmp_path, local):
    # a node that writes other lines just before its ready line, in one block
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text("print('first startup line')\n"
                                           "print('second startup line')\n")
    pp = os.pathsep.join([str(site)] + [p for p in [os.environ.get("PYTHONPATH")] if p])
    t0 = time.monotonic()
    with LocalCluster(model_dir, {"text": 1}, threads_per_node=1, start_timeout_s=20,
                      env={"PYTHONPATH": pp, "PYTHONUNBUFFERED": ""}) as c:
        assert time.monotonic() - t0 < 15
        (pid,) = [p.pid for p in c.processes[Modality.TEXT]]
        assert any("first startup line" in line for line in c.output[pid])
        with remote_model(model_dir, c.config(heartbeat_s=0.2)) as model:
            _assert_same(model.infer({"text": TEXTS}), local.infer({"text": TEXTS}))
        procs = [p for ps in c.processes.values() for p in ps]
    assert all(p.returncode == 0 for p in procs)           # SIGTERM: clean exit


def test_unexpected_node_error_is_a_remote_error_not_a_dead_node(model_dir, caplog):
    caplog.set_level(logging.ERROR, logger="mmcore.node")
    with serving(model_dir, ["text"]) as node:
        real = node.model.encode_modality

        def broken(m, value, **kw):
            if value == "boom":
                raise RuntimeError("internal failure")
            return real(m, value, **kw)
        node.model.encode_modality = broken
        with remote_model(model_dir, _config({"text": [_addr(node)]})) as model:
            with pytest.raises(RemoteError, match="RuntimeError: internal failure"):
                model.infer({"text": "boom"})
            assert model.distributed.health()["text"][0]["healthy"]
            assert model.infer({"text": "fine"}).fused.shape[0] == 1
        assert any("internal failure" in (r.exc_text or "") or r.exc_info
                   for r in caplog.records)


def test_stale_pooled_connection_is_replaced_not_a_node_failure(model_dir, local):
    """A pooled connection the node closed while idle is retried once on a fresh one."""
    with serving(model_dir, ["text"], idle_timeout_s=0.3) as node:
        cfg = _config({"text": [_addr(node)]}, heartbeat_s=60.0)   # no heartbeat in between
        with Coordinator(cfg) as coord:
            client = coord.nodes[Modality.TEXT][0]
            req = {"input": {"value": {"form": "str", "value": "stale"}}}
            first = coord.encode("text", req, [])
            assert len(client._idle) == 1
            _deadline_wait(lambda: node._info()["load"]["connections"] == 0, 10,
                           "the node closing the idle connection")
            second = coord.encode("text", req, [])
            assert client.healthy
            np.testing.assert_array_equal(first[2], second[2])


def test_drain_serves_a_request_still_arriving(model_dir):
    """A request whose frame began to arrive before the drain is served, not dropped."""
    from mmcore.distributed.payload import pack_input
    from mmcore.distributed.protocol import MsgType, encode_frame, recv_frame
    img = RNG.integers(0, 256, (2, 40, 40, 3), dtype=np.uint8)
    desc, arrays = pack_input("image", img)
    data = b"".join(bytes(b) for b in encode_frame(
        MsgType.ENCODE, {"id": "slow", "modality": "image", "input": desc}, arrays))
    with serving(model_dir, ["image"]) as node:
        sock = _authenticated(node)
        try:
            sock.settimeout(20)
            sock.sendall(data[:64])                       # header and part of the rest
            _deadline_wait(lambda: node._in_flight == 1, 10, "the request to count")
            node.stop()
            time.sleep(0.3)                               # the drain is waiting for it
            sock.sendall(data[64:])
            frame = recv_frame(sock)
        finally:
            sock.close()
    assert frame.type == MsgType.RESULT and frame.header["id"] == "slow"
    ref = default_model().encode_modality("image", img)
    np.testing.assert_allclose(frame.arrays[2], ref[2], atol=ATOL)


class _FakeRemote:
    """A remote encoder whose future gives a fixed result."""

    def __init__(self, result):
        self.result = result

    def submit(self, value, *, is_raw=True, attention_mask=None):
        fut = concurrent.futures.Future()
        fut.set_result(self.result)
        return fut


def test_required_modality_dropped_and_bad_remote_results_raise():
    from mmcore.errors import NodeUnavailableError, ShapeError
    from mmcore.model.model import default_config
    cfg = default_config()
    mods = [mc.replace(required=True) if str(m) == "text" else mc
            for m, mc in cfg.modalities.items()]
    model = MultiModalModel(cfg.replace(modalities=mods), seed=0)
    img = RNG.integers(0, 256, (1, 32, 32, 3), dtype=np.uint8)
    model.set_remote_encoders({"text": _FakeRemote(None)})
    with pytest.raises(NodeUnavailableError, match="'text' is required"):
        model.infer({"text": ["a"], "image": img})
    bad = (np.zeros((1, 4, 32), np.float32), np.ones((1, 4), bool), np.zeros((1, 32), np.float32))
    model.set_remote_encoders({"text": _FakeRemote(bad)})            # embed_dim is 64
    with pytest.raises(ShapeError, match="same model"):
        model.infer({"text": ["a"], "image": img})
    good = (np.zeros((1, 4, 64), np.float32), np.ones((1, 4), bool), np.zeros((1, 64), np.float32))
    model.set_remote_encoders({"text": _FakeRemote(good)})
    assert model.infer({"text": ["a"], "image": img}).fused.shape == (1, 64)


def test_local_cluster_relative_model_dir(model_dir, tmp_path, monkeypatch):
    import shutil as _sh
    _sh.copytree(model_dir, tmp_path / "m")
    monkeypatch.chdir(tmp_path)
    with LocalCluster("m", {"text": 1}, threads_per_node=1) as cluster:
        assert cluster.model_dir == str(tmp_path / "m")
        tmp = cluster._tmp
    assert not os.path.exists(tmp)
    with pytest.raises(NodeUnavailableError):     # the node exits: no such model directory
        LocalCluster("missing", {"text": 1}, threads_per_node=1, start_timeout_s=60)


# -- attaching a model: mmcore.distributed.load / attach, and the deprecated model-side entries ----


def test_load_and_attach_serve_the_named_modalities(text_node, model_dir, local):
    cfg = _config({"text": [_addr(text_node)]})
    inputs = {"text": ["a cat", "a dog"], "image": RAW["image"]}
    model = mmcore.distributed.load(model_dir, cfg)
    try:
        assert model.remote_modalities == (Modality.TEXT,)
        assert isinstance(model.distributed, Coordinator)
        _assert_same(model.infer(inputs), local.infer(inputs))
    finally:
        model.close()
    assert model.distributed is None and model.remote_modalities == ()
    # attach: a model already loaded; the backend is returned and kept on the model
    model = MultiModalModel.from_pretrained(model_dir)
    backend = mmcore.distributed.attach(model, cfg, model_dir=model_dir)
    try:
        assert model.distributed is backend and model.remote_modalities == (Modality.TEXT,)
        _assert_same(model.infer(inputs), local.infer(inputs))
    finally:
        model.close()


def test_load_checks_its_arguments_before_reading(tmp_path, model_dir, text_node):
    missing = str(tmp_path / "no-such-model")
    with pytest.raises(ConfigError, match=r"^\[distributed.load\] expected a DistributedConfig"):
        mmcore.distributed.load(missing, {"text": ["127.0.0.1:1"]})
    with pytest.raises(ArgumentError, match="distributed="):
        mmcore.distributed.load(model_dir, _config({"text": [_addr(text_node)]}),
                                distributed=_config({"text": [_addr(text_node)]}))
    with pytest.raises(ConfigError, match="expected a DistributedConfig"):
        mmcore.distributed.attach(default_model(), {"text": ["127.0.0.1:1"]})


def test_deprecated_from_pretrained_distributed_still_attaches(text_node, model_dir, local):
    cfg = _config({"text": [_addr(text_node)]})
    with pytest.warns(DeprecationWarning, match=r"mmcore\.distributed\.load"):
        model = MultiModalModel.from_pretrained(model_dir, distributed=cfg)
    try:
        assert model.remote_modalities == (Modality.TEXT,)
        assert isinstance(model.distributed, Coordinator)
        _assert_same(model.infer({"text": ["hello"]}), local.infer({"text": ["hello"]}))
    finally:
        model.close()
    # the model hands the object it was given its attach(): anything else is refused
    with pytest.warns(DeprecationWarning), \
            pytest.raises(ConfigError, match=r"^\[MultiModalModel.from_pretrained\] expected a "
                                             r"DistributedConfig \(from mmcore.distributed\), "
                                             r"got dict"):
        MultiModalModel.from_pretrained(model_dir, distributed={"text": 1})


def test_distributed_config_attach_is_the_model_side_hook(model_dir):
    """DistributedConfig.attach(model, model_dir=) is what the deprecated model-side entries
    call (the model never imports mmcore.distributed)."""
    calls = []

    class Recorder:
        def attach(self, model, *, model_dir=None):
            calls.append((model, model_dir))
            return "backend"

    from mmcore.model.model import attach_remote
    model = default_model()
    assert attach_remote(model, Recorder(), model_dir="d", op="op") == "backend"
    assert calls == [(model, "d")]
    with pytest.raises(ConfigError, match=r"^\[op\] expected a DistributedConfig"):
        attach_remote(model, DistributedConfig, model_dir=None, op="op")
    cfg = _config({"text": ["127.0.0.1:1"]}, connect_timeout_s=0.2)
    backend = cfg.attach(model, model_dir=model_dir)
    try:
        assert model.distributed is backend and model.remote_modalities == (Modality.TEXT,)
    finally:
        model.close()


def test_distributed_unavailable_error_is_a_deprecated_alias():
    import mmcore.model
    import mmcore.model.loader
    for mod in (mmcore.model, mmcore.model.loader):
        with pytest.warns(DeprecationWarning, match="DistributedUnavailableError is deprecated"):
            cls = mod.DistributedUnavailableError
        assert cls is NodeUnavailableError
    with pytest.warns(DeprecationWarning):
        exec("from mmcore.model import DistributedUnavailableError", {})
    assert "DistributedUnavailableError" not in mmcore.model.__all__
    assert not hasattr(mmcore.model, "NoSuchName") and not hasattr(mmcore.model.loader, "Nope")
