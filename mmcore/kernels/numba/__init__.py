"""Numba CPU fallbacks, one module per op family.

This package is the only place in mmcore that imports :mod:`numba`; nothing imports it unless the
``numba`` backend is selected, so numba stays an optional dependency. The modules take arrays that
the public ops in :mod:`mmcore.ops` have already validated and laid out, and fill preallocated
outputs.

Threading layer
---------------
The kernels use ``parallel=True`` loops, which run on numba's *threading layer*. Left to itself
numba prefers its ``omp`` layer, whose OpenMP runtime then competes with the one of torch (or of
any other OpenMP library) in the same process: after one numba fallback call, torch's
``scaled_dot_product_attention`` on two threads ran about 60 times slower. So, when this package is
imported, and only if

* the environment variable ``NUMBA_THREADING_LAYER`` is unset,
* ``numba.config.THREADING_LAYER`` is still ``"default"``, and
* numba's threading layer has not been started yet in this process,

mmcore sets ``numba.config.THREADING_LAYER = "workqueue"``. That layer parks its threads on a
condition variable between calls instead of spinning, and it is fork-safe. It is not thread-safe,
so calls of mmcore's parallel numba kernels are serialized by one process-wide lock while the
layer in use is ``workqueue`` (or not yet known); ops called from several Python threads then take
turns in the numba kernels (the native backend has no such lock). The layer is the process's:
``parallel=True`` functions of your own then run on ``workqueue`` too, and calling them from
several threads at once aborts the process; choose ``"tbb"`` (or ``"omp"``) for them yourself.

To choose another layer, set ``NUMBA_THREADING_LAYER`` (or ``numba.config.THREADING_LAYER``)
before the first numba call; mmcore then leaves it alone. ``"tbb"`` (needs the ``tbb`` package)
is thread-safe and does not spin, so the kernels run without the lock. An explicit ``"omp"`` is
respected as well, and brings back the slowdown of other OpenMP libraries described above. A
layer already started by other numba code in the process cannot be changed and is kept.

>>> import mmcore.kernels.numba as nb
>>> nb.threading_layer_choice() in ("workqueue", "user", "started")
True
"""

from __future__ import annotations

import functools
import os
import threading
from typing import Any, Callable, Dict, Optional

import numba

__all__ = ["threading_layer_choice"]

_CHOICE = "workqueue"
_choice: str = "user"
_lock = threading.RLock()
_serialize: Optional[bool] = None  # None: the layer is not started yet (serialize to be safe)


def _layer_started() -> bool:
    try:
        numba.threading_layer()
    except ValueError:
        return False
    return True


def _configure() -> str:
    if os.environ.get("NUMBA_THREADING_LAYER"):
        return "user"
    if str(getattr(numba.config, "THREADING_LAYER", "default")).lower() != "default":
        return "user"
    if _layer_started():
        return "started"
    numba.config.THREADING_LAYER = _CHOICE  # type: ignore[attr-defined]
    return _CHOICE


def threading_layer_choice() -> str:
    """What mmcore did about numba's threading layer when this package was imported.

    Returns
    -------
    str
        ``"workqueue"``: mmcore selected the ``workqueue`` layer; ``"user"``: a layer was chosen
        through ``NUMBA_THREADING_LAYER`` or ``numba.config``, and kept; ``"started"``: numba's
        threading layer was already running, and kept.

    Examples
    --------
    >>> from mmcore.kernels.numba import threading_layer_choice
    >>> threading_layer_choice() in ("workqueue", "user", "started")
    True
    """
    return _choice


def _needs_lock() -> bool:
    global _serialize
    if _serialize is not None:
        return _serialize
    try:
        layer = numba.threading_layer()
    except ValueError:
        return True
    _serialize = layer == "workqueue"
    return _serialize


def serialized(fn: Callable[..., Any]) -> Callable[..., Any]:
    """``fn`` (a launcher of this package) holding the package lock while it runs, when the
    threading layer in use is ``workqueue`` (or not started yet); made once per launcher."""
    known = _serialized.get(fn)
    if known is not None:
        return known

    @functools.wraps(fn)
    def wrapped(*args: Any, **kwargs: Any) -> Any:
        if not _needs_lock():
            return fn(*args, **kwargs)
        with _lock:
            return fn(*args, **kwargs)

    _serialized[fn] = wrapped
    return wrapped


_serialized: Dict[Callable[..., Any], Callable[..., Any]] = {}


def _reinit_lock() -> None:
    global _lock
    _lock = threading.RLock()


_choice = _configure()
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_reinit_lock)
