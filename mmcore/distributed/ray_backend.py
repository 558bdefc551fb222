"""The Ray backend: one actor group per modality, placed with Ray custom resources.

``DistributedConfig(backend="ray", sharding_strategy=ShardingStrategy.modality_specific(
{Modality.IMAGE: 2, ...}), ray_resources={Modality.IMAGE: {"mmcore_vision": 1}})`` starts, for
each modality, that many actors; each loads only its modality from the model directory
(``MultiModalModel.from_pretrained(dir, modalities=[m])``) and serves ``encode`` calls, with
the same inputs and outputs as a socket node. Actors ask for no CPUs (``num_cpus=0``) and for
the modality's custom resources (default ``{"mmcore_<modality>": 1}``), so that node
specialisation maps onto a Ray cluster whose nodes advertise those resources (``ray start
--resources '{"mmcore_vision": 4}'``). When Ray is not running yet, a local instance is started
that advertises exactly the resources the actors need (and is shut down by :meth:`close`).

Ray puts the driver's working directory first on its workers' ``sys.path``: start the backend
from a directory that does not hold an mmcore source tree (a ConfigError says so otherwise).

Requests go to the actor of the modality with the fewest outstanding calls; an actor that dies
or times out is skipped and the call retried on another one, as with socket nodes.
"""

from __future__ import annotations

import concurrent.futures
import os
import shutil
import tempfile
import threading
from typing import TYPE_CHECKING, Any, Callable, Dict, List, TypeVar

from ..errors import ConfigError, MMCoreError, NodeUnavailableError
from ..modality import Modality
from .config import DistributedConfig

if TYPE_CHECKING:
    from .coordinator import Encoded

__all__ = ["RayBackend"]

_T = TypeVar("_T")


def _import_ray():
    try:
        import ray
    except ImportError:
        raise ConfigError("[distributed] backend='ray' needs the ray package: "
                          "pip install 'mmcore[ray]'") from None
    return ray


def _check_working_directory() -> None:
    """Ray puts the driver's working directory first on its workers' ``sys.path``: an mmcore
    source tree there (without its built extension) would shadow the installed package."""
    import mmcore
    here = os.path.join(os.getcwd(), "mmcore")
    if not os.path.isfile(os.path.join(here, "__init__.py")):
        return
    if os.path.realpath(here) == os.path.realpath(os.path.dirname(mmcore.__file__)):
        return
    raise ConfigError(f"[RayBackend] the working directory {os.getcwd()!r} holds an mmcore "
                      "source tree, which Ray would put first on its workers' sys.path instead "
                      "of the installed package; start the Ray backend from another directory")


class _EncoderActorImpl:
    """The body of a Ray actor serving one modality (wrapped by ``ray.remote`` lazily)."""

    def __init__(self, model_dir: str, modality: str):
        from ..model import MultiModalModel
        self.modality = Modality(modality)
        self.model = MultiModalModel.from_pretrained(model_dir, modalities=[self.modality])

    def ping(self) -> Dict[str, Any]:
        return {"modalities": [str(self.modality)], "pid": os.getpid()}

    def encode(self, desc: Dict[str, Any], arrays: List[Any]):
        from .payload import accepted_forms, unpack_input
        tmpdir = tempfile.mkdtemp(prefix="mmcore-ray-")
        try:
            value, mask = unpack_input(desc, list(arrays), tmpdir=tmpdir, with_mask=True,
                                       what=f"modality {str(self.modality)!r}",
                                       **accepted_forms(self.model, self.modality))
            return self.model.encode_modality(self.modality, value, attention_mask=mask)
        finally:
            shutil.rmtree(tmpdir, ignore_errors=True)


class _Actor:
    def __init__(self, handle):
        self.handle = handle
        self.outstanding = 0
        self.healthy = True


class RayBackend:
    """Ray actors per modality (see the module docstring); the model's remote encoders call
    :meth:`encode` through :meth:`submit`.

    Parameters
    ----------
    config : DistributedConfig
        ``backend="ray"``, actor counts per modality.
    model_dir : str
        The model directory the actors load.
    """

    def __init__(self, config: DistributedConfig, model_dir: str):
        if config.backend != "ray":
            raise ConfigError("[RayBackend] config.backend must be 'ray'")
        ray = _import_ray()
        self._ray = ray
        self.config = config
        _check_working_directory()
        resources = {m: dict((config.ray_resources or {}).get(m) or {f"mmcore_{m}": 1.0})
                     for m in config.modalities}
        self._started_ray = False
        if not ray.is_initialized():
            total: Dict[str, float] = {}
            for m, n in config.sharding_strategy.actor_counts().items():
                for k, v in resources[m].items():
                    total[k] = total.get(k, 0.0) + float(v) * int(n)
            ray.init(resources=total, include_dashboard=False, log_to_driver=False,
                     configure_logging=False)
            self._started_ray = True
        actor_cls = ray.remote(_EncoderActorImpl)
        self.actors: Dict[Modality, List[_Actor]] = {}
        for m, n in config.sharding_strategy.actor_counts().items():
            self.actors[m] = [
                _Actor(actor_cls.options(num_cpus=0, resources=resources[m],
                                         max_concurrency=4).remote(model_dir, str(m)))
                for _ in range(int(n))]
        # wait until every actor has loaded its model (errors surface here)
        try:
            ray.get([a.handle.ping.remote() for acts in self.actors.values() for a in acts],
                    timeout=max(60.0, config.request_timeout_s))
        except Exception:
            self.close()
            raise
        self._lock = threading.Lock()
        self._pool = concurrent.futures.ThreadPoolExecutor(
            max_workers=config.max_workers, thread_name_prefix="mmcore-ray")

    def _pick(self, m: Modality, tried: set):
        from .coordinator import pick_least_outstanding
        return pick_least_outstanding(self._lock, self.actors.get(m, []), tried)

    def encode(self, m: Modality, header: Dict[str, Any], arrays: List[Any]) -> Encoded:
        """Encode one request on an actor of ``m`` (retried on another actor on failure)."""
        ray = self._ray
        m = Modality(m)
        acts = self.actors.get(m, [])
        attempts = self.config.max_attempts or max(2, len(acts))
        tried: set = set()
        seen = []
        for _ in range(attempts):
            a = self._pick(m, tried)
            if a is None:
                break
            tried.add(a)
            try:
                tokens, mask, pooled = ray.get(a.handle.encode.remote(header["input"], arrays),
                                               timeout=self.config.request_timeout_s)
                a.healthy = True
                return tokens, mask, pooled
            except ray.exceptions.RayTaskError as exc:      # the request's own error
                cause = getattr(exc, "cause", None)
                if isinstance(cause, MMCoreError):
                    raise cause from None
                from .coordinator import RemoteError
                raise RemoteError(f"[RayBackend] actor error: {str(exc)[-2000:]}") from None
            except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError) as exc:
                a.healthy = False
                seen.append(f"{type(exc).__name__}: {str(exc)[:200]}")
            finally:
                with self._lock:
                    a.outstanding -= 1
        if self.config.drop_unavailable:
            return None
        raise NodeUnavailableError(f"[RayBackend] no actor of modality {str(m)!r} could serve "
                                   f"the request ({'; '.join(seen) or 'none available'})")

    def submit(self, fn: Callable[..., _T], *args: Any) -> concurrent.futures.Future[_T]:
        """Run ``fn(*args)`` on the request threads."""
        return self._pool.submit(fn, *args)

    def close(self) -> None:
        """Kill the actors (and the local Ray instance this backend started)."""
        pool = getattr(self, "_pool", None)
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
        for acts in getattr(self, "actors", {}).values():
            for a in acts:
                try:
                    self._ray.kill(a.handle)
                except Exception:  # pragma: no cover - best effort
                    pass
        self.actors = {}
        if self._started_ray and self._ray.is_initialized():
            self._ray.shutdown()
            self._started_ray = False
