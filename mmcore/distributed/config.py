"""Cluster configuration: which nodes serve which modality, and how to talk to them.

Examples
--------
>>> from mmcore import Modality
>>> from mmcore.distributed import DistributedConfig, ShardingStrategy
>>> cfg = DistributedConfig(sharding_strategy=ShardingStrategy.modality_specific(
...     {Modality.IMAGE: ["127.0.0.1:7001", "127.0.0.1:7002"]}), token="t")
>>> cfg.sharding_strategy.nodes[Modality.IMAGE]
('127.0.0.1:7001', '127.0.0.1:7002')
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Dict, Mapping, Optional, Tuple, Union

from ..errors import ConfigError
from ..modality import Modality

__all__ = ["ShardingStrategy", "DistributedConfig", "parse_address"]

_OWNER = "DistributedConfig"


def parse_address(addr: Any, where: str) -> Tuple[str, int]:
    """``(host, port)`` of ``"host:port"`` (``"[::1]:7000"`` for IPv6) or a (host, port) pair."""
    if isinstance(addr, (tuple, list)) and len(addr) == 2:
        host, port = addr
    elif isinstance(addr, str) and ":" in addr:
        host, _, port = addr.rpartition(":")
        host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    else:
        raise ConfigError(f"[{_OWNER}] {where} must be 'host:port', got {addr!r}")
    try:
        port = int(port)
    except (TypeError, ValueError):
        raise ConfigError(f"[{_OWNER}] {where} has a bad port: {addr!r}") from None
    if not host or not 0 < port < 65536:
        raise ConfigError(f"[{_OWNER}] {where} must name a host and a port in 1..65535, got "
                          f"{addr!r}")
    return str(host), port


@dataclass(frozen=True)
class ShardingStrategy:
    """Which workers serve which modality.

    Build it with :meth:`modality_specific`: for the socket backend a list of node
    addresses per modality; for the Ray backend a number of actors per modality.
    """

    nodes: Dict[Modality, Union[Tuple[str, ...], int]] = field(default_factory=dict)

    @classmethod
    def modality_specific(cls, assignment: Mapping[Any, Any]) -> "ShardingStrategy":
        """``{modality: ["host:port", ...]}`` (socket nodes) or ``{modality: n}`` (Ray actors).

        Raises
        ------
        ConfigError
            An empty assignment, a modality without nodes, or a bad address.
        """
        if not isinstance(assignment, Mapping) or not assignment:
            raise ConfigError(f"[{_OWNER}] sharding_strategy needs at least one modality "
                              "with nodes")
        nodes: Dict[Modality, Union[Tuple[str, ...], int]] = {}
        for key, value in assignment.items():
            m = Modality(key)
            where = f"sharding_strategy[{str(m)!r}]"
            if isinstance(value, bool):
                raise ConfigError(f"[{_OWNER}] {where} must be addresses or a count")
            if isinstance(value, int):
                if value < 1:
                    raise ConfigError(f"[{_OWNER}] {where} must be >= 1, got {value}")
                nodes[m] = int(value)
                continue
            if isinstance(value, str):
                value = [value]
            addrs = []
            for i, a in enumerate(value):
                h, p = parse_address(a, f"{where}[{i}]")
                addrs.append(f"[{h}]:{p}" if ":" in h else f"{h}:{p}")
            if not addrs:
                raise ConfigError(f"[{_OWNER}] {where} has no nodes")
            nodes[m] = tuple(addrs)
        return cls(nodes)

    @property
    def modalities(self) -> Tuple[Modality, ...]:
        return tuple(self.nodes)

    def node_addresses(self) -> Dict[Modality, Tuple[str, ...]]:
        """The socket nodes' addresses per modality (ConfigError for a modality given an
        actor count: that is a Ray assignment).

        Examples
        --------
        >>> from mmcore.distributed import ShardingStrategy
        >>> ShardingStrategy.modality_specific({"text": "127.0.0.1:7000"}).node_addresses()
        {Modality.TEXT: ('127.0.0.1:7000',)}
        """
        out: Dict[Modality, Tuple[str, ...]] = {}
        for m, v in self.nodes.items():
            if isinstance(v, int):
                raise ConfigError(f"[{_OWNER}] sharding_strategy[{str(m)!r}] is an actor count, "
                                  "not node addresses")
            out[m] = v
        return out

    def actor_counts(self) -> Dict[Modality, int]:
        """The number of Ray actors per modality (ConfigError for a modality given node
        addresses: that is a socket assignment).

        Examples
        --------
        >>> from mmcore.distributed import ShardingStrategy
        >>> ShardingStrategy.modality_specific({"image": 2}).actor_counts()
        {Modality.IMAGE: 2}
        """
        out: Dict[Modality, int] = {}
        for m, v in self.nodes.items():
            if not isinstance(v, int):
                raise ConfigError(f"[{_OWNER}] sharding_strategy[{str(m)!r}] gives node "
                                  "addresses, not an actor count")
            out[m] = v
        return out

    def to_dict(self) -> Dict[str, Any]:
        return {"type": "modality_specific",
                "nodes": {str(m): (v if isinstance(v, int) else list(v))
                          for m, v in self.nodes.items()}}


def _positive(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (
            math.isfinite(value) and value > 0):
        raise ConfigError(f"[{_OWNER}] {name} must be a finite number > 0, got {value!r}")
    return float(value)


@dataclass
class DistributedConfig:
    """How a model reaches its remote encoders.

    Parameters
    ----------
    sharding_strategy : ShardingStrategy
        Nodes (socket backend) or actor counts (Ray backend) per modality; modalities it does
        not name are encoded locally.
    backend : {"socket", "ray"}, default "socket"
    token : str or bytes, optional
        The shared cluster token; None: ``token_file``, else ``$MMCORE_CLUSTER_TOKEN``.
    token_file : path-like, optional
    connect_timeout_s : float, default 5
    request_timeout_s : float, default 60
        Per attempt; a node that does not answer in time counts as failed and the request
        goes to another node of the modality.
    heartbeat_s : float, default 2
        Health-check period; a node that fails one is taken out of rotation until it answers
        again.
    drop_unavailable : bool, default False
        When no node of a modality is left: False raises NodeUnavailableError naming the
        modality; True drops the modality from the request (fusion over the others).
    max_attempts : int, optional
        Attempts per request (default: every node of the modality once, at least 2).
    tls_cafile : path-like, optional
        Connect with TLS, verifying nodes against this CA file; ``tls_check_hostname``
        (default True) checks the certificate's host name too.
    ray_resources : dict, optional
        Ray backend: custom resources per modality for its actors, e.g.
        ``{"image": {"mmcore_vision": 1}}``.
    max_workers : int, default 16
        Threads that send requests concurrently.
    """

    sharding_strategy: ShardingStrategy
    backend: str = "socket"
    token: Optional[Any] = field(default=None, repr=False)
    token_file: Optional[Any] = None
    connect_timeout_s: float = 5.0
    request_timeout_s: float = 60.0
    heartbeat_s: float = 2.0
    drop_unavailable: bool = False
    max_attempts: Optional[int] = None
    tls_cafile: Optional[Any] = None
    tls_check_hostname: bool = True
    ray_resources: Optional[Mapping[Any, Mapping[str, float]]] = None
    max_workers: int = 16

    def __post_init__(self):
        if not isinstance(self.sharding_strategy, ShardingStrategy):
            if isinstance(self.sharding_strategy, Mapping):
                self.sharding_strategy = ShardingStrategy.modality_specific(
                    self.sharding_strategy)
            else:
                raise ConfigError(f"[{_OWNER}] sharding_strategy must be a ShardingStrategy, "
                                  f"got {type(self.sharding_strategy).__name__}")
        if self.backend not in ("socket", "ray"):
            raise ConfigError(f"[{_OWNER}] backend must be 'socket' or 'ray', got "
                              f"{self.backend!r}")
        for m, v in self.sharding_strategy.nodes.items():
            if (self.backend == "socket") == isinstance(v, int):
                want = "node addresses" if self.backend == "socket" else "an actor count"
                raise ConfigError(f"[{_OWNER}] sharding_strategy[{str(m)!r}] must give {want} "
                                  f"for backend={self.backend!r}")
        self.connect_timeout_s = _positive("connect_timeout_s", self.connect_timeout_s)
        self.request_timeout_s = _positive("request_timeout_s", self.request_timeout_s)
        self.heartbeat_s = _positive("heartbeat_s", self.heartbeat_s)
        if not isinstance(self.drop_unavailable, bool):
            raise ConfigError(f"[{_OWNER}] drop_unavailable must be a bool")
        if self.max_attempts is not None and (isinstance(self.max_attempts, bool) or not
                                              isinstance(self.max_attempts, int)
                                              or self.max_attempts < 1):
            raise ConfigError(f"[{_OWNER}] max_attempts must be an integer >= 1 or None, got "
                              f"{self.max_attempts!r}")
        if (isinstance(self.max_workers, bool) or not isinstance(self.max_workers, int)
                or self.max_workers < 1):
            raise ConfigError(f"[{_OWNER}] max_workers must be an integer >= 1, got "
                              f"{self.max_workers!r}")
        res = {}
        for key, r in (self.ray_resources or {}).items():
            m = Modality(key)
            if not isinstance(r, Mapping) or not all(
                    isinstance(k, str) and isinstance(v, (int, float)) and v >= 0
                    for k, v in r.items()):
                raise ConfigError(f"[{_OWNER}] ray_resources[{str(m)!r}] must map resource "
                                  "names to amounts >= 0")
            res[m] = dict(r)
        self.ray_resources = res

    @property
    def modalities(self) -> Tuple[Modality, ...]:
        """The modalities encoded remotely."""
        return self.sharding_strategy.modalities

    def attach(self, model: Any, *, model_dir: Optional[Any] = None) -> Any:
        """Serve ``model``'s modalities named by this config remotely: same as
        :func:`mmcore.distributed.attach(model, self, model_dir=model_dir)
        <mmcore.distributed.api.attach>`, whose backend it returns.

        This is the hook through which the deprecated ``from_pretrained(..., distributed=cfg)``
        and ``MultiModalLoader.with_distributed(cfg)`` reach this package (the model calls it
        and never imports :mod:`mmcore.distributed`).
        """
        from .api import attach
        return attach(model, self, model_dir=model_dir)
