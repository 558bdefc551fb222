"""Distributed inference: modality-specific shard nodes, a socket coordinator, a Ray backend.

A model directory is served by *nodes*, each running the preprocessors and encoders of some
modalities (``mmcore node --model DIR --modality image``); the coordinating process sends each
modality's part of a batch to a node of that modality, concurrently, and runs cross-modal
attention and fusion itself. Nodes speak a framed binary protocol over plain sockets
(:mod:`~mmcore.distributed.protocol`: JSON headers and raw array buffers, never pickle) with
HMAC challenge-response authentication and optional TLS (:mod:`~mmcore.distributed.auth`).
:class:`LocalCluster` starts nodes as local processes; ``DistributedConfig(backend="ray")``
places them as Ray actors instead.

:func:`load` loads a model directory and attaches it to the nodes a :class:`DistributedConfig`
names; :func:`attach` does it for a model already loaded (both in :mod:`~mmcore.distributed.api`).
This package builds on :mod:`mmcore.model`, never the reverse: the model only exposes
:meth:`~mmcore.model.MultiModalModel.set_remote_encoders`.

Examples
--------
>>> import tempfile
>>> import mmcore.distributed
>>> from mmcore import Modality
>>> from mmcore.model import default_model
>>> from mmcore.distributed import LocalCluster
>>> d = tempfile.mkdtemp(); _ = default_model().save(d + "/m")
>>> with LocalCluster(d + "/m", {Modality.TEXT: 1}) as cluster:          # doctest: +SKIP
...     model = mmcore.distributed.load(d + "/m", cluster.config())
...     model.infer({"text": ["hello"]}).fused.shape
(1, 64)
"""

from __future__ import annotations

from .api import attach, load
from .cluster import LocalCluster
from .config import DistributedConfig, ShardingStrategy
from .coordinator import Coordinator, RemoteEncoder, RemoteError

__all__ = ["DistributedConfig", "ShardingStrategy", "Coordinator", "RemoteEncoder",
           "RemoteError", "LocalCluster", "attach", "load"]
