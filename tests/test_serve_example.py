"""examples/serve_ray.py: the Ray Serve deployment answers real HTTP requests on 127.0.0.1 with
the embeddings of local inference, refuses bad requests with JSON 4xx errors, and Serve and
Ray shut down without leaving processes behind. The request parsing runs without Ray too."""

from __future__ import annotations

import base64
import importlib.util
import io
import json
import os
import socket
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request

import numpy as np
import pytest

from mmcore.model import default_model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLE = os.path.join(ROOT, "examples", "serve_ray.py")
ATOL = 1e-5


def _load_example():
    name = "mmcore_serve_ray_example"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, EXAMPLE)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


example = _load_example()


def _jpeg(seed: int, h: int, w: int) -> bytes:
    from PIL import Image
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(buf, "JPEG",
                                                                         quality=90)
    return buf.getvalue()


def _wav(seed: int, n: int, rate: int) -> bytes:
    import soundfile as sf
    rng = np.random.default_rng(seed)
    t = np.arange(n) / rate
    x = 0.3 * np.sin(2 * np.pi * (220 + 40 * seed) * t) + 0.05 * rng.standard_normal(n)
    buf = io.BytesIO()
    sf.write(buf, x.astype(np.float32), rate, format="WAV", subtype="PCM_16")
    return buf.getvalue()


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


@pytest.fixture(scope="module")
def local_model():
    return default_model(seed=0)


def _check_against_local(answer: dict, inputs: dict, local_model, *, remote=()) -> None:
    want = local_model.infer(inputs)
    fused = np.asarray(answer["fused"], np.float32)
    assert fused.shape == want.fused.shape == tuple(answer["shapes"]["fused"])
    np.testing.assert_allclose(fused, want.fused, rtol=0, atol=ATOL)
    assert set(answer["pooled"]) == {str(m) for m in want.pooled} == set(inputs)
    for m, v in want.pooled.items():
        got = np.asarray(answer["pooled"][str(m)], np.float32)
        assert got.shape == v.shape == tuple(answer["shapes"]["pooled"][str(m)])
        np.testing.assert_allclose(got, v, rtol=0, atol=ATOL)
        assert tuple(answer["shapes"]["embeddings"][str(m)]) == want.embeddings[m].shape
    assert answer["batch"] == want.fused.shape[0]
    assert answer["model"] == local_model.identity
    stages = {f"{s}:{m}" for m in inputs if m not in remote for s in ("preprocess", "encode")}
    stages |= {f"remote:{m}" for m in remote}
    assert stages | {"fusion", "total", "parse", "request"} <= set(answer["timings_ms"])
    assert all(v >= 0 for v in answer["timings_ms"].values())


# -- request handling without a server ------------------------------------------------------


def test_parse_request_fields():
    kinds = {"text": "text", "image": "image", "audio": "audio", "custom:x": None}
    got = example.parse_request(json.dumps({
        "text": ["a", "b"], "image": [_b64(b"\xff\xd8x"), "data:image/jpeg;base64,aGk="],
        "audio": _b64(b"RIFF")}).encode(), kinds)
    assert got == {"text": ["a", "b"], "image": [b"\xff\xd8x", b"hi"], "audio": b"RIFF"}
    bad = [b"not json", b"[1, 2]", b"{}", b'{"video": "aGk="}', b'{"custom:x": "aGk="}',
           b'{"image": "not base64!"}', b'{"image": ""}', b'{"image": 3}', b'{"image": []}',
           b'{"text": 3}', b'{"text": ["a", 4]}', b'{"image": "data:image/png,aGk="}',
           b'\xff\xfe{']
    for body in bad:
        with pytest.raises(example.RequestError) as info:
            example.parse_request(body, kinds)
        assert info.value.status == 400, body
    with pytest.raises(example.RequestError, match="at most 2"):
        example.parse_request(b'{"text": ["a", "b", "c"]}', kinds, max_batch=2)


def test_service_answers_like_local_inference(local_model):
    service = example.EmbeddingService(max_body_bytes=1 << 20)
    inputs = {"text": "a photo of a cat", "image": _jpeg(0, 37, 53),
              "audio": _wav(0, 12000, 16000)}
    body = json.dumps({"text": inputs["text"], "image": _b64(inputs["image"]),
                       "audio": _b64(inputs["audio"])}).encode()
    status, answer = service.handle(body)
    assert status == 200, answer
    _check_against_local(json.loads(json.dumps(answer)), inputs, local_model)
    status, err = service.handle(b'{"image": "' + _b64(b"GIF89a-broken").encode() + b'"}')
    assert (status, err["error"]) == (400, "ImageDecodeError")
    status, err = service.handle(b"{" * ((1 << 20) + 1))
    assert (status, err["error"]) == (413, "PayloadTooLarge")
    status, err = service.handle(json.dumps({"text": ["a", "b"],
                                             "image": [_b64(inputs["image"])]}).encode())
    assert (status, err["error"]) == (400, "ShapeError")


# -- the Ray Serve deployment over HTTP -----------------------------------------------------


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _bounded(fn, timeout_s: float, what: str):
    """Run ``fn()`` in a daemon thread; raise if it does not finish within ``timeout_s``."""
    result: dict = {}

    def run():
        try:
            result["value"] = fn()
        except BaseException as e:  # noqa: B036 - handed to the caller
            result["error"] = e

    t = threading.Thread(target=run, name=f"bounded {what}", daemon=True)
    t.start()
    t.join(timeout_s)
    if t.is_alive():
        raise TimeoutError(f"{what} did not finish within {timeout_s} s")
    if "error" in result:
        raise result["error"]
    return result.get("value")


def _process_table() -> dict:
    """pid -> (ppid, command line) of the processes now running (Linux /proc)."""
    table = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as fh:
                stat = fh.read().decode(errors="replace")
            with open(f"/proc/{entry}/cmdline", "rb") as fh:
                cmd = fh.read().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        # the fields after the command name (in parentheses): state, ppid, ...
        table[int(entry)] = (int(stat.rpartition(")")[2].split()[1]), cmd)
    return table


def _ray_processes(session_dir: str) -> set:
    """This process's descendants and any process naming the Ray session directory."""
    table = _process_table()
    mine, grew = {os.getpid()}, True
    while grew:
        new = {pid for pid, (ppid, _) in table.items() if ppid in mine} - mine
        mine |= new
        grew = bool(new)
    tag = os.path.basename(session_dir.rstrip("/"))
    named = {pid for pid, (_, cmd) in table.items() if tag and tag in cmd}
    return (mine | named) - {os.getpid()}


def _alive(pids: set) -> set:
    left = set()
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat", "rb") as fh:
                state = fh.read().decode(errors="replace").rpartition(")")[2].split()[0]
        except OSError:
            continue
        if state != "Z":                       # a zombie has exited (only its entry is left)
            left.add(pid)
    return left


def _request(url: str, body=None, *, method: str = "POST", timeout: float = 30):
    """(status, parsed JSON, content type) of one request."""
    data = body if body is None or isinstance(body, bytes) else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method=method,
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            raw, status, ctype = r.read(), r.status, r.headers.get("Content-Type", "")
    except urllib.error.HTTPError as e:
        raw, status, ctype = e.read(), e.code, e.headers.get("Content-Type", "")
    assert b"Traceback" not in raw, raw[-2000:]
    return status, json.loads(raw), ctype


@pytest.fixture(scope="module")
def server_url():
    pytest.importorskip("ray.serve")
    import ray
    from ray import serve
    if not sys.platform.startswith("linux"):
        pytest.skip("the leftover-process check reads /proc")
    assert not ray.is_initialized()
    port = _free_port()
    here = os.getcwd()
    # Ray puts the driver's working directory first on its workers' sys.path
    os.chdir(tempfile.gettempdir())
    # the deployment class lives in a module loaded from a file: ship it by value
    ray.cloudpickle.register_pickle_by_value(example)
    session_dir, pids = "", set()
    try:
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
                 configure_logging=False)
        node = getattr(getattr(ray, "_private", None), "worker", None)
        node = getattr(node, "_global_node", None)
        session_dir = node.get_session_dir_path() if node is not None else ""
        _bounded(lambda: serve.start(http_options={"host": "127.0.0.1", "port": port}),
                 60, "serve.start")
        _bounded(lambda: serve.run(example.build_app({"num_cpus": 1}), name="mmcore",
                                   route_prefix="/"), 90, "serve.run")
        url = f"http://127.0.0.1:{port}/"
        status, health, _ = _request(url + "health", method="GET")
        assert status == 200 and health["status"] == "ok"
        pids = _ray_processes(session_dir)
        assert len(pids) >= 3, pids               # gcs, raylet, workers: the check sees them
        yield url
    finally:
        try:
            if not pids and session_dir:
                pids = _ray_processes(session_dir)
            try:
                _bounded(serve.shutdown, 60, "serve.shutdown")
            finally:
                ray.shutdown()
        finally:
            ray.cloudpickle.unregister_pickle_by_value(example)
            os.chdir(here)
    assert not ray.is_initialized()
    deadline = time.monotonic() + 30
    while _alive(pids) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not _alive(pids), {p: _process_table().get(p) for p in _alive(pids)}


def test_serve_embeddings_equal_local_inference(server_url, local_model):
    inputs = {"text": "a photo of a cat", "image": _jpeg(1, 240, 320),
              "audio": _wav(1, 16000, 16000)}
    status, answer, ctype = _request(server_url, {
        "text": inputs["text"], "image": _b64(inputs["image"]),
        "audio": _b64(inputs["audio"])})
    assert status == 200, answer
    assert ctype.startswith("application/json")
    _check_against_local(answer, inputs, local_model)
    assert answer["shapes"]["fused"] == [1, local_model.output_dim]

    # a batch: images of different sizes, audio at another rate (resampled), on /embed
    batch = {"text": ["one", "two words", "three"],
             "image": [_jpeg(2, 31, 97), _jpeg(3, 480, 640), _jpeg(4, 64, 64)],
             "audio": [_wav(2, 8000, 16000), _wav(3, 30000, 22050), _wav(4, 701, 8000)]}
    status, answer, _ = _request(server_url + "embed", {
        "text": batch["text"], "image": [_b64(b) for b in batch["image"]],
        "audio": [_b64(b) for b in batch["audio"]]})
    assert status == 200, answer
    _check_against_local(answer, batch, local_model)

    # one modality alone
    status, answer, _ = _request(server_url, {"image": _b64(inputs["image"])})
    assert status == 200, answer
    _check_against_local(answer, {"image": inputs["image"]}, local_model)


def test_serve_bad_requests_get_json_4xx(server_url):
    jpeg = _b64(_jpeg(5, 20, 20))
    cases = [
        (b"this is not json", 400, "BadRequest"),
        ({"image": _b64(b"\x89PNG\r\n\x1a\n but not a png")}, 400, "ImageDecodeError"),
        ({"audio": _b64(b"RIFF\x00\x00\x00\x00WAVEfmt ")}, 400, "AudioDecodeError"),
        ({"image": "%%% not base64 %%%"}, 400, "BadRequest"),
        ({"pointcloud": jpeg}, 400, "BadRequest"),
        ({"text": ["a", "b"], "image": [jpeg]}, 400, "ShapeError"),
        ({}, 400, "BadRequest"),
    ]
    for body, want_status, want_error in cases:
        status, err, ctype = _request(server_url, body)
        assert (status, err["error"]) == (want_status, want_error), (body, err)
        assert ctype.startswith("application/json") and err["message"]
    status, err, _ = _request(server_url + "embed", method="PUT", body=b"{}")
    assert (status, err["error"]) == (405, "MethodNotAllowed")
    status, err, _ = _request(server_url + "nowhere", body=b"{}")
    assert (status, err["error"]) == (404, "NotFound")
    # the replica still serves after the errors
    status, answer, _ = _request(server_url, {"text": "still here"})
    assert status == 200 and answer["shapes"]["fused"] == [1, 64]


def test_serve_with_distributed_encoders(server_url, local_model, tmp_path):
    """A second application whose images are encoded by a shard node (mmcore.distributed)."""
    from ray import serve

    from mmcore.distributed import LocalCluster
    model_dir = str(tmp_path / "model")
    local_model.save(model_dir)
    with LocalCluster(model_dir, {"image": 1}, threads_per_node=1) as cluster:
        config = {"sharding_strategy": {"image": cluster.addresses["image"]},
                  "token_file": cluster.token_file, "request_timeout_s": 30}
        app = example.build_app({"model_dir": model_dir, "distributed": config,
                                 "num_cpus": 0.5})
        try:
            _bounded(lambda: serve.run(app, name="mmcore-dist", route_prefix="/dist"), 90,
                     "serve.run")
            url = server_url + "dist/"
            status, health, _ = _request(url + "health", method="GET")
            assert status == 200 and health["remote"] == ["image"]
            inputs = {"text": ["a", "bb"], "image": [_jpeg(6, 90, 120), _jpeg(7, 50, 40)]}
            status, answer, _ = _request(url + "embed", {
                "text": inputs["text"], "image": [_b64(b) for b in inputs["image"]]})
            assert status == 200, answer
            _check_against_local(answer, inputs, local_model, remote=("image",))
            status, err, _ = _request(url, {"image": _b64(b"not an image")})
            assert (status, err["error"]) == (400, "ImageDecodeError"), err
        finally:
            _bounded(lambda: serve.delete("mmcore-dist"), 60, "serve.delete")
