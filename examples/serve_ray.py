"""Serve mmcore embeddings over HTTP with Ray Serve.

One deployment takes encoded inputs (JPEG / PNG images, WAV / FLAC / OGG audio, video files when
PyAV is installed, and text) in a JSON body, runs the model's preprocessing, encoders and fusion,
and answers with the embeddings as JSON.

Request: ``POST /`` (also ``/embed``) with ``Content-Type: application/json`` and a JSON object
whose fields are modality names of the model. ``text`` is a string or a list of strings; every
other modality (``image``, ``audio``, ``video``) is the base64 of the encoded file, or a list of
them (a ``data:...;base64,`` prefix is accepted). Lists make a batch: all fields of a request
must have the same number of items, and a single value is a batch of one::

    {"text": "a cat", "image": "<base64 of a JPEG>", "audio": "<base64 of a WAV>"}

Response (200)::

    {"fused": [[...]],                          # (B, fused_dim)
     "pooled": {"text": [[...]], ...},          # (B, embed_dim) per modality of the request
     "shapes": {"fused": [B, D], "pooled": {...}, "embeddings": {...}},   # token-level shapes too
     "timings_ms": {"parse": ..., "preprocess:image": ..., "encode:image": ...,
                    "fusion": ..., "total": ..., "request": ...},
     "batch": B, "model": "<model identity>"}

Errors are JSON too, ``{"error": "<type>", "message": "..."}``, never a traceback: 400 for a
bad body or an input mmcore refuses (undecodable image or audio, mismatched batch sizes, an
unknown field), 413 for a body over ``max_body_bytes``, 405 for a method other than POST
(``GET /health`` answers 200 with the model's modalities), 503 when the distributed encoders of
a modality are unreachable, 500 (without details) for anything else.

The model is ``mmcore.model.default_model(seed=0)`` unless a model directory is given
(``--model DIR`` or ``$MMCORE_SERVE_MODEL``). With ``--distributed CONFIG.json`` (or
``$MMCORE_SERVE_DISTRIBUTED``) some modalities are encoded by mmcore shard nodes or Ray actors:
the file holds the keyword arguments of :class:`mmcore.distributed.DistributedConfig`, e.g.
``{"sharding_strategy": {"image": ["10.0.0.5:7000"]}, "token_file": "/etc/mmcore/token"}`` (the
token can also come from ``$MMCORE_CLUSTER_TOKEN``); it needs a model directory.

Run it::

    pip install "mmcore[serve]"
    python examples/serve_ray.py --port 8000            # Ctrl-C stops Serve and Ray
    curl -s localhost:8000/ -H 'Content-Type: application/json' \\
         -d "{\\"text\\": \\"a cat\\", \\"image\\": \\"$(base64 -w0 cat.jpg)\\"}"

:class:`EmbeddingService` holds everything but the HTTP plumbing (it needs neither Ray nor a
web framework); :class:`EmbeddingServer` is the Ray Serve deployment around it and
:func:`build_app` the application (``serve run serve_ray:build_app model_dir=DIR`` from this
folder works too).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import binascii
import json
import logging
import os
import signal
import sys
import tempfile
import threading
import time
from typing import Any, Dict, List, Mapping, Optional, Tuple

import numpy as np

LOG = logging.getLogger("mmcore.serve")

#: Largest request body accepted (bytes) unless configured otherwise.
DEFAULT_MAX_BODY_BYTES = 64 << 20
#: Most items in one request (per modality).
DEFAULT_MAX_BATCH = 64
#: The modalities that take encoded files (base64 in the JSON body).
ENCODED_KINDS = ("image", "audio", "video")


class RequestError(Exception):
    """A request the server refuses, with the HTTP status to answer."""

    def __init__(self, status: int, kind: str, message: str):
        super().__init__(message)
        self.status = status
        self.kind = kind
        self.message = message


def _b64(value: Any, where: str) -> bytes:
    if not isinstance(value, str):
        raise RequestError(400, "BadRequest", f"{where} must be a base64 string, got "
                           f"{type(value).__name__}")
    if value.startswith("data:"):                       # data URL: keep what follows ";base64,"
        head, sep, value = value.partition(",")
        if not sep or not head.endswith(";base64"):
            raise RequestError(400, "BadRequest", f"{where} is a data URL without ';base64,'")
    try:
        data = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise RequestError(400, "BadRequest", f"{where} is not valid base64") from None
    if not data:
        raise RequestError(400, "BadRequest", f"{where} is empty")
    return data


def parse_request(body: bytes, modalities: Mapping[str, Optional[str]], *,
                  max_batch: int = DEFAULT_MAX_BATCH) -> Dict[str, Any]:
    """The model inputs of a JSON request body.

    Parameters
    ----------
    body : bytes
        The request body: a JSON object of modality name -> value.
    modalities : mapping
        The model's modality names and their kinds (``"text"``, ``"image"``, ``"audio"``,
        ``"video"``, or None for a modality that is not served over HTTP).
    max_batch : int, keyword-only
        Most items per field.

    Returns
    -------
    dict
        Modality name -> a str, bytes, or a list of them, as ``model.infer`` takes them.

    Raises
    ------
    RequestError
        Status 400 naming the field for anything the server cannot turn into inputs.

    Examples
    --------
    >>> parse_request(b'{"text": "a cat", "image": "aGk="}', {"text": "text", "image": "image"})
    {'text': 'a cat', 'image': b'hi'}
    """
    try:
        payload = json.loads(body)
    except (UnicodeDecodeError, ValueError) as e:
        raise RequestError(400, "BadRequest", f"the body is not JSON: {e}") from None
    if not isinstance(payload, dict):
        raise RequestError(400, "BadRequest", "the body must be a JSON object of modality "
                           f"fields ({', '.join(modalities)}), got {type(payload).__name__}")
    if not payload:
        raise RequestError(400, "BadRequest", "the request has no field; send at least one "
                           f"of {', '.join(modalities)}")
    inputs: Dict[str, Any] = {}
    for name, value in payload.items():
        kind = modalities.get(name)
        if name not in modalities or kind is None:
            served = [m for m, k in modalities.items() if k is not None]
            raise RequestError(400, "BadRequest", f"unknown field {name!r}; this model takes "
                               f"{', '.join(served)}")
        items = value if isinstance(value, list) else None
        if items is not None:
            if not items:
                raise RequestError(400, "BadRequest", f"{name} is an empty list")
            if len(items) > max_batch:
                raise RequestError(400, "BadRequest", f"{name} has {len(items)} items; at most "
                                   f"{max_batch} per request")
        if kind == "text":
            for i, t in enumerate(items if items is not None else [value]):
                if not isinstance(t, str):
                    where = f"{name}[{i}]" if items is not None else name
                    raise RequestError(400, "BadRequest", f"{where} must be a string, got "
                                       f"{type(t).__name__}")
            inputs[name] = list(items) if items is not None else value
        elif items is not None:
            inputs[name] = [_b64(v, f"{name}[{i}]") for i, v in enumerate(items)]
        else:
            inputs[name] = _b64(value, name)
    return inputs


def _floats(a: np.ndarray) -> List[Any]:
    # float32 -> Python float is exact, and json writes the shortest repr that reads back equal
    return np.asarray(a, np.float32).tolist()


def format_response(out: Any, timings: Mapping[str, float], identity: str) -> Dict[str, Any]:
    """The JSON answer for a :class:`mmcore.model.MultiModalOutput`."""
    stats = {k: 1e3 * float(v) for k, v in out.stats.items()}
    stats.update({k: 1e3 * float(v) for k, v in timings.items()})
    return {
        "fused": _floats(out.fused),
        "pooled": {str(m): _floats(v) for m, v in out.pooled.items()},
        "shapes": {"fused": list(out.fused.shape),
                   "pooled": {str(m): list(v.shape) for m, v in out.pooled.items()},
                   "embeddings": {str(m): list(v.shape) for m, v in out.embeddings.items()}},
        "timings_ms": stats,
        "batch": int(out.fused.shape[0]),
        "model": identity,
    }


def load_model(model_dir: Optional[str] = None,
               distributed: Optional[Mapping[str, Any]] = None) -> Any:
    """``default_model(seed=0)``, or the model directory ``model_dir``; with ``distributed``
    (the keyword arguments of :class:`mmcore.distributed.DistributedConfig`) the modalities it
    names are encoded remotely."""
    from mmcore.model import MultiModalModel, default_model
    if distributed:
        if not model_dir:
            raise ValueError("distributed encoders need a model directory (--model DIR): the "
                             "nodes serve that directory")
        import mmcore.distributed
        config = mmcore.distributed.DistributedConfig(**dict(distributed))
        return mmcore.distributed.load(model_dir, config)
    if model_dir:
        return MultiModalModel.from_pretrained(model_dir)
    return default_model(seed=0)


class EmbeddingService:
    """Request handling without the HTTP server: body bytes in, (status, JSON object) out.

    Parameters
    ----------
    model_dir : str, optional
        A model directory; None: ``default_model(seed=0)``.
    distributed : dict, optional
        Keyword arguments of :class:`mmcore.distributed.DistributedConfig`.
    max_body_bytes, max_batch : int
        Limits of one request.
    """

    def __init__(self, model_dir: Optional[str] = None,
                 distributed: Optional[Mapping[str, Any]] = None, *,
                 max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
                 max_batch: int = DEFAULT_MAX_BATCH):
        from mmcore.model.inputs import kind_of
        self.model = load_model(model_dir, distributed)
        self.max_body_bytes = int(max_body_bytes)
        self.max_batch = int(max_batch)
        self.modalities: Dict[str, Optional[str]] = {}
        for m, mc in self.model.config.modalities.items():
            if not mc.enabled:
                continue
            kind = kind_of(m, mc.preprocessing)
            self.modalities[str(m)] = kind if kind in ("text",) + ENCODED_KINDS else None
        self.identity = self.model.identity

    def health(self) -> Tuple[int, Dict[str, Any]]:
        return 200, {"status": "ok", "model": self.identity,
                     "modalities": [m for m, k in self.modalities.items() if k is not None],
                     "remote": [str(m) for m in self.model.remote_modalities]}

    def handle(self, body: bytes) -> Tuple[int, Dict[str, Any]]:
        """Answer one request body: ``(200, response)`` or ``(4xx/5xx, error)``."""
        from mmcore.errors import MMCoreError, NodeUnavailableError
        t0 = time.perf_counter()
        try:
            if len(body) > self.max_body_bytes:
                raise RequestError(413, "PayloadTooLarge", f"the body has {len(body)} bytes; "
                                   f"at most {self.max_body_bytes}")
            inputs = parse_request(body, self.modalities, max_batch=self.max_batch)
            t1 = time.perf_counter()
            out = self.model.infer(inputs)
        except RequestError as e:
            return e.status, {"error": e.kind, "message": e.message}
        except NodeUnavailableError as e:
            return 503, {"error": type(e).__name__, "message": str(e)}
        except MMCoreError as e:          # inputs mmcore refuses: decode errors, shapes, ...
            return 400, {"error": type(e).__name__, "message": str(e)}
        except Exception:                  # a bug, not the client's fault: no details out
            LOG.exception("mmcore serve: request failed")
            return 500, {"error": "InternalError", "message": "the request failed on the "
                         "server; see its log"}
        timings = {"parse": t1 - t0, "request": time.perf_counter() - t0}
        return 200, format_response(out, timings, self.identity)

    def close(self) -> None:
        self.model.close()


class EmbeddingServer:
    """The Ray Serve deployment (an ASGI-style ``__call__`` taking a Starlette request)."""

    def __init__(self, model_dir: Optional[str] = None,
                 distributed: Optional[Mapping[str, Any]] = None, *,
                 max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
                 max_batch: int = DEFAULT_MAX_BATCH):
        self.service = EmbeddingService(model_dir, distributed, max_body_bytes=max_body_bytes,
                                        max_batch=max_batch)

    async def __call__(self, request: Any) -> Any:
        from starlette.responses import JSONResponse
        path = request.url.path
        root = request.scope.get("root_path", "")       # the application's route prefix
        if root and path.startswith(root):
            path = path[len(root):]
        path = path.rstrip("/")
        if request.method == "GET" and path in ("", "/health"):
            status, payload = self.service.health()
            return JSONResponse(payload, status_code=status)
        if path not in ("", "/embed"):
            return JSONResponse({"error": "NotFound", "message": f"no route {path!r}; POST / "
                                 "or /embed, GET /health"}, status_code=404)
        if request.method != "POST":
            return JSONResponse({"error": "MethodNotAllowed", "message": "POST a JSON body"},
                                status_code=405, headers={"Allow": "GET, POST"})
        limit = self.service.max_body_bytes
        try:
            declared = int(request.headers.get("content-length", "0"))
        except ValueError:
            declared = 0
        if declared > limit:
            return JSONResponse({"error": "PayloadTooLarge", "message": f"the body has "
                                 f"{declared} bytes; at most {limit}"}, status_code=413)
        body = await request.body()
        loop = asyncio.get_running_loop()
        # infer is thread-safe and releases the GIL in its kernels: keep the event loop free
        status, payload = await loop.run_in_executor(None, self.service.handle, body)
        return JSONResponse(payload, status_code=status)

    def __del__(self):
        service = getattr(self, "service", None)
        if service is not None:
            service.close()


def read_distributed_config(path: Any) -> Dict[str, Any]:
    """The DistributedConfig arguments in the JSON file ``path``; its relative ``token_file``
    and ``tls_cafile`` are taken from the file's folder (the replicas run elsewhere)."""
    with open(path, encoding="utf-8") as fh:
        config = json.load(fh)
    if not isinstance(config, dict):
        raise ValueError(f"{os.fspath(path)}: expected a JSON object of DistributedConfig "
                         "arguments")
    here = os.path.dirname(os.path.abspath(path))
    for key in ("token_file", "tls_cafile"):
        if isinstance(config.get(key), str):
            config[key] = os.path.join(here, os.path.expanduser(config[key]))
    return config


def build_app(args: Optional[Mapping[str, Any]] = None) -> Any:
    """The Ray Serve application (also an application builder for ``serve run``).

    ``args`` keys (all optional): ``model_dir``, ``distributed`` (a dict, or the path of a JSON
    file), ``num_replicas`` (1), ``num_cpus`` per replica (1), ``max_body_bytes``,
    ``max_batch``, ``max_ongoing_requests`` (8).
    """
    from ray import serve
    args = dict(args or {})
    distributed = args.get("distributed")
    if isinstance(distributed, (str, os.PathLike)):
        distributed = read_distributed_config(distributed)
    model_dir = args.get("model_dir")
    deployment = serve.deployment(
        name="mmcore-embed", num_replicas=int(args.get("num_replicas", 1)),
        ray_actor_options={"num_cpus": float(args.get("num_cpus", 1))},
        max_ongoing_requests=int(args.get("max_ongoing_requests", 8)))(EmbeddingServer)
    return deployment.bind(
        os.path.abspath(model_dir) if model_dir else None, distributed,
        max_body_bytes=int(args.get("max_body_bytes", DEFAULT_MAX_BODY_BYTES)),
        max_batch=int(args.get("max_batch", DEFAULT_MAX_BATCH)))


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description="Serve mmcore embeddings over HTTP with Ray Serve.")
    p.add_argument("--model", default=os.environ.get("MMCORE_SERVE_MODEL"),
                   help="model directory (default: $MMCORE_SERVE_MODEL, else "
                        "default_model(seed=0))")
    p.add_argument("--distributed", default=os.environ.get("MMCORE_SERVE_DISTRIBUTED"),
                   help="JSON file of DistributedConfig arguments (default: "
                        "$MMCORE_SERVE_DISTRIBUTED)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--replicas", type=int, default=1)
    p.add_argument("--num-cpus", type=float, default=1, help="CPUs per replica")
    p.add_argument("--max-body-mb", type=float, default=DEFAULT_MAX_BODY_BYTES / 2**20)
    p.add_argument("--ray-address", default=None,
                   help="an existing Ray cluster (default: start a local one)")
    a = p.parse_args(argv)

    import ray
    from ray import serve
    args: Dict[str, Any] = {"num_replicas": a.replicas, "num_cpus": a.num_cpus,
                            "max_body_bytes": int(a.max_body_mb * 2**20)}
    if a.model:
        args["model_dir"] = os.path.abspath(a.model)
    if a.distributed:
        args["distributed"] = os.path.abspath(a.distributed)
    app = build_app(args)
    # Ray puts the driver's working directory first on its workers' sys.path: start from one
    # that cannot hold an mmcore source tree that would shadow the installed package
    os.chdir(tempfile.gettempdir())
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    ray.init(address=a.ray_address, include_dashboard=False)
    try:
        serve.start(http_options={"host": a.host, "port": a.port})
        serve.run(app, name="mmcore", route_prefix="/")
        print(f"mmcore embeddings on http://{a.host}:{a.port}/ (POST JSON; GET /health); "
              "Ctrl-C stops", flush=True)
        while not stop.wait(1.0):
            pass
    finally:
        serve.shutdown()
        ray.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
