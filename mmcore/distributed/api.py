"""Attach a model to distributed encoders: :func:`load` a model directory, or :func:`attach` one.

:mod:`mmcore.model` knows nothing of this package: a model serves a modality remotely once it
is given remote encoders (:meth:`~mmcore.model.MultiModalModel.set_remote_encoders`), and
:func:`attach` gives it those of a :class:`~mmcore.distributed.DistributedConfig` (shard nodes
reached through a :class:`~mmcore.distributed.Coordinator`, or Ray actors). Cross-modal
attention and fusion stay in the local process.

Examples
--------
>>> import tempfile
>>> import mmcore.distributed
>>> from mmcore.model import default_model
>>> from mmcore.distributed import LocalCluster
>>> d = tempfile.mkdtemp() + "/m"; _ = default_model().save(d)
>>> with LocalCluster(d, {"text": 1}) as cluster:                       # doctest: +SKIP
...     model = mmcore.distributed.load(d, cluster.config())
...     model.infer({"text": ["hello"]}).fused.shape
(1, 64)
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any, Optional, Union

from ..errors import ArgumentError, ConfigError
from .config import DistributedConfig
from .coordinator import Coordinator, RemoteEncoder

if TYPE_CHECKING:  # pragma: no cover
    from ..model import MultiModalModel
    from .ray_backend import RayBackend

__all__ = ["attach", "load"]


def _check_config(config: Any, op: str) -> DistributedConfig:
    if not isinstance(config, DistributedConfig):
        raise ConfigError(f"[{op}] expected a DistributedConfig, got {type(config).__name__}")
    return config


def attach(model: "MultiModalModel", config: DistributedConfig, *,
           model_dir: Optional[Any] = None) -> Any:
    """Serve ``model``'s modalities named by ``config`` remotely; returns the backend
    (a :class:`~mmcore.distributed.Coordinator`, or the Ray backend), also kept as
    ``model.distributed`` (a backend attached before is closed).

    Parameters
    ----------
    model : MultiModalModel
        Late, attention or custom fusion (early and middle fusion encode jointly).
    config : DistributedConfig
    model_dir : path-like, optional, keyword-only
        The model directory ``model`` was loaded from (the Ray backend's actors load it).

    Raises
    ------
    ConfigError
        Not a DistributedConfig; the Ray backend without a model directory; early or middle
        fusion.
    ModalityError
        The config names a modality the model does not have.

    Examples
    --------
    >>> import tempfile
    >>> import mmcore.distributed
    >>> from mmcore.model import MultiModalModel, default_model
    >>> from mmcore.distributed import LocalCluster
    >>> d = tempfile.mkdtemp() + "/m"; _ = default_model().save(d)
    >>> model = MultiModalModel.from_pretrained(d)
    >>> with LocalCluster(d, {"text": 1}) as cluster:                   # doctest: +SKIP
    ...     backend = mmcore.distributed.attach(model, cluster.config(), model_dir=d)
    ...     model.remote_modalities, model.infer({"text": ["hi"]}).fused.shape
    ...     model.close()
    ((Modality.TEXT,), (1, 64))
    """
    _check_config(config, "distributed")
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
        backend: Union[Coordinator, RayBackend] = RayBackend(config, os.fspath(model_dir))
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


def load(path: Any, config: DistributedConfig, **from_pretrained_kwargs: Any
         ) -> "MultiModalModel":
    """Load the model directory ``path`` and serve the modalities ``config`` names remotely.

    ``MultiModalModel.from_pretrained(path, **from_pretrained_kwargs)`` followed by
    :func:`attach` (with ``model_dir=path``): shard nodes (or Ray actors) preprocess and
    encode those modalities, the returned model runs cross-modal attention and fusion. Call
    ``model.close()`` to release the connections (threads, actors).

    Parameters
    ----------
    path : path-like
        The model directory (the one the nodes serve).
    config : DistributedConfig
        The nodes, e.g. :meth:`LocalCluster.config() <mmcore.distributed.LocalCluster.config>`.
    **from_pretrained_kwargs
        ``verify``, ``encoders``, ``modalities``: as for
        :meth:`~mmcore.model.MultiModalModel.from_pretrained`.

    Raises
    ------
    ConfigError
        ``config`` is not a DistributedConfig (checked before anything is read), or see
        :func:`attach`.
    ArgumentError
        ``distributed`` among the keyword arguments (``config`` is that).
    ModelFormatError, ModalityError
        As :meth:`~mmcore.model.MultiModalModel.from_pretrained` and :func:`attach` raise.

    Examples
    --------
    >>> import tempfile
    >>> import mmcore.distributed
    >>> from mmcore.model import default_model
    >>> from mmcore.distributed import LocalCluster
    >>> d = tempfile.mkdtemp() + "/m"; _ = default_model().save(d)
    >>> with LocalCluster(d, {"text": 1}) as cluster:                   # doctest: +SKIP
    ...     model = mmcore.distributed.load(d, cluster.config())
    ...     model.remote_modalities, model.infer({"text": ["hi"]}).fused.shape
    ...     model.close()
    ((Modality.TEXT,), (1, 64))
    """
    _check_config(config, "distributed.load")
    if "distributed" in from_pretrained_kwargs:
        raise ArgumentError("[distributed.load] pass the DistributedConfig as config, not as "
                            "distributed=")
    from ..model import MultiModalModel
    model = MultiModalModel.from_pretrained(path, **from_pretrained_kwargs)
    attach(model, config, model_dir=os.fspath(path))
    return model
