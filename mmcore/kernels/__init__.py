"""The kernel launchers behind :mod:`mmcore.ops`, one place per backend.

Every public op follows the same three steps (see :mod:`mmcore.ops`):

1. pick the backend (:func:`mmcore._backend.resolve_backend`);
2. validate its arguments once, against the array module of that backend (NumPy for
   ``native`` and ``numba``, CuPy for ``cuda``), with the shared checks of
   :mod:`mmcore.ops._checks`, producing normalized arrays (dtype, layout, outputs allocated);
3. call a launcher of this package, which only launches the kernel:

   ``native``
       :mod:`mmcore.kernels.cpu`, one function per kernel of ``mmcore._C``;
   ``numba``
       :mod:`mmcore.kernels.numba`, one module per op family (``<kernel>_numba``);
   ``cuda``
       :mod:`mmcore.kernels.cuda`, one module per op family (``<kernel>_cuda``), which reads
       device pointers and checks only what is specific to the device (same device, kernel
       limits of the GPU).

:func:`launcher` finds the function of one kernel on one backend; the numba and cuda modules are
imported only when a call selects them, so neither numba nor CuPy is imported by
``import mmcore``.
"""

from __future__ import annotations

import importlib
import threading
from typing import Any, Callable, Dict, Hashable

from ..errors import BackendError

__all__ = ["launcher", "PlanCache"]


def launcher(op: str, backend: str, family: str, kernel: str) -> Callable:
    """The launcher of ``kernel`` (of the op family ``family``) on ``backend``.

    Parameters
    ----------
    op : str
        The public op (for error messages).
    backend : {"native", "numba", "cuda"}
        A backend :func:`mmcore._backend.resolve_backend` chose.
    family : str
        The module of the numba and cuda launchers (``"attention"``, ``"fusion"``,
        ``"image"``, ``"spectral"``, ``"linear"``, ``"encoder_layer"``).
    kernel : str
        The kernel: ``cpu.<kernel>`` (which calls ``mmcore._C.<kernel>``),
        ``numba.<family>.<kernel>_numba`` or ``cuda.<family>.<kernel>_cuda``.

    Raises
    ------
    BackendError
        The backend has no such kernel in this build.

    Examples
    --------
    >>> from mmcore.kernels import launcher
    >>> launcher("fuse", "native", "fusion", "fuse").__module__
    'mmcore.kernels.cpu'
    """
    if backend == "native":
        from . import cpu
        cpu.native(op, kernel)          # a build without the kernel: the message names ``op``
        return getattr(cpu, kernel)
    try:
        mod = importlib.import_module(f"{__name__}.{backend}.{family}")
    except ImportError as exc:
        if backend == "cuda":
            raise BackendError(f"[{op}] this build of mmcore has no CUDA {family} kernels "
                               f"(mmcore.kernels.cuda.{family}): {exc}") from exc
        raise
    fn = getattr(mod, f"{kernel}_{backend}", None)
    if fn is None:
        raise BackendError(f"[{op}] the {backend} backend has no {kernel} kernel")
    if backend == "numba":              # parallel numba kernels take turns under "workqueue"
        from .numba import serialized
        return serialized(fn)
    return fn


class PlanCache:
    """A bounded, thread-safe cache of plans: objects built once per parameter set (the checked
    options and tables of a native kernel, see ``mmcore._C.SpectralPlan``) and reused by every
    call with the same parameters.

    Reads take no lock (one dict lookup); a miss builds the plan outside the lock and inserts
    it under the lock, the first insertion winning a race (plans of equal keys are equal). Past
    ``maxsize`` entries the oldest is dropped.

    Examples
    --------
    >>> from mmcore.kernels import PlanCache
    >>> cache = PlanCache(maxsize=2)
    >>> a = cache.get_or_build(("x", 1), lambda: object())
    >>> cache.get_or_build(("x", 1), lambda: object()) is a, len(cache)
    (True, 1)
    >>> for k in range(3):
    ...     _ = cache.get_or_build(("y", k), lambda: object())
    >>> len(cache), ("x", 1) in cache
    (2, False)
    """

    def __init__(self, maxsize: int = 32):
        if maxsize < 1:
            raise ValueError("maxsize must be >= 1")
        self.maxsize = maxsize
        self._entries: Dict[Hashable, Any] = {}
        self._lock = threading.Lock()

    def get(self, key: Hashable) -> Any:
        """The plan of ``key``, or None when it has not been built (or was dropped)."""
        return self._entries.get(key)

    def get_or_build(self, key: Hashable, build: Callable[[], Any]) -> Any:
        """The plan of ``key``, built by ``build()`` on the first call."""
        plan = self._entries.get(key)
        if plan is not None:
            return plan
        plan = build()
        with self._lock:
            plan = self._entries.setdefault(key, plan)
            while len(self._entries) > self.maxsize:
                del self._entries[next(iter(self._entries))]
        return plan

    def __contains__(self, key: Hashable) -> bool:
        return key in self._entries

    def __len__(self) -> int:
        return len(self._entries)

    def clear(self) -> None:
        """Drop every plan."""
        with self._lock:
            self._entries.clear()
