"""Distributed inference: modality-specific shard nodes, a socket coordinator, a Ray backend.

A model directory is served by *nodes*, each running the preprocessors and encoders of some
modalities (``mmcore node --model DIR --modality image``); the coordinating process sends each
modality's part of a batch to a node of that modality, concurrently, and runs cross-modal
attention and fusion itself. Nodes speak a framed binary protocol over plain sockets
(:mod:`~mmcore.distributed.protocol`: JSON headers and raw array buffers, never pickle) with
HMAC challenge-response authentication and optional TLS (:mod:`~mmcore.distributed.auth`).
:class:`LocalCluster` starts nodes as local processes; ``DistributedConfig(backend="ray")``
places them as Ray actors instead.

Examples
--------
>>> import tempfile
>>> from mmcore import Modality
>>> from mmcore.model import default_model, MultiModalModel
>>> from mmcore.distributed import LocalCluster
>>> d = tempfile.mkdtemp(); _ = default_model().save(d + "/m")
>>> with LocalCluster(d + "/m", {Modality.TEXT: 1}) as cluster:          # doctest: +SKIP
...     model = MultiModalModel.from_pretrained(d + "/m", distributed=cluster.config())
...     model.infer({"text": ["hello"]}).fused.shape
(1, 64)
"""

from __future__ import annotations

import os
from typing import Any, Optional

from ..errors import ConfigError
from .config import DistributedConfig, ShardingStrategy
from .coordinator import Coordinator, RemoteEncoder, RemoteError
from .cluster import LocalCluster

__all__ = ["DistributedConfig", "ShardingStrategy", "Coordinator", "RemoteEncoder",
           "RemoteError", "LocalCluster", "attach"]


def attach(model: Any, config: DistributedConfig, *, model_dir: Optional[Any] = None) -> Any:
    """Serve ``model``'s modalities named by ``config`` remotely; returns the backend
    (a :class:`Coordinator`, or the Ray backend), also kept as ``model.distributed``.

    Raises
    ------
    ConfigError
        Not a DistributedConfig; the Ray backend without a model directory; early or middle
        fusion.
    ModalityError
        The config names a modality the model does not have.
    """
    if not isinstance(config, DistributedConfig):
        raise ConfigError(f"[distributed] expected a DistributedConfig, got "
                          f"{type(config).__name__}")
    for m in config.modalities:
        model.config.modality_config(m)        # ModalityError when not configured
    if model.fusion.kind in ("early", "middle"):
        raise ConfigError(f"[distributed] {model.fusion.kind} fusion runs its encoders "
                          "jointly; distributed encoders need late, attention or custom fusion")
    if config.backend == "ray":
        if model_dir is None:
            raise ConfigError("[distributed] the Ray backend loads the model in its actors and "
                              "needs a model directory (from_pretrained or with_weights)")
        from .ray_backend import RayBackend
        backend = RayBackend(config, os.fspath(model_dir))
    else:
        backend = Coordinator(config)
    kinds = {m: (model.config.modalities[m].preprocessing.modality
                 if model.config.modalities[m].preprocessing is not None else None)
             for m in config.modalities}
    model.set_remote_encoders({m: RemoteEncoder(backend, m, kinds[m])
                               for m in config.modalities})
    old = getattr(model, "distributed", None)
    if old is not None:
        old.close()
    model.distributed = backend
    return backend
