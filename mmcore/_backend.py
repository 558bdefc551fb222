"""Which backends exist and which one runs a call.

Three backends implement the kernels:

``native``
    The C++ kernels in ``mmcore._C`` (always built). Uses AVX-512 or AVX2 code paths when the
    CPU has them, picked at run time.
``cuda``
    ``mmcore._cuda``, for arrays that live on an NVIDIA GPU (CuPy arrays, or anything with
    ``__cuda_array_interface__``). Built only when a CUDA compiler was found at build time.
``numba``
    Pure-Python kernels compiled by Numba: the CPU fallback and the independent second
    implementation used in tests.

Selection: arrays on a CUDA device always run on ``cuda``. For host arrays the order is the
``backend=`` keyword of the op, then :func:`use_backend`, then the environment variable
``MMCORE_BACKEND``, then ``native``. Host arrays are never moved to the GPU implicitly: asking
for ``cuda`` with NumPy arrays raises :class:`~mmcore.errors.BackendError`.
"""

from __future__ import annotations

import contextvars
import importlib
import os
import threading
from typing import Any, Callable, Dict, Optional

import numpy as np

from .errors import ArgumentError, BackendError

__all__ = ["backends", "use_backend", "set_num_threads", "get_num_threads", "max_num_threads",
           "resolve_backend"]

BACKEND_NAMES = ("native", "cuda", "numba")

_current: contextvars.ContextVar[Optional[str]] = contextvars.ContextVar(
    "mmcore_backend", default=None
)
_lock = threading.Lock()
_num_threads: Optional[int] = None
_cuda_state: Optional[Dict[str, Any]] = None
_numba_state: Optional[Dict[str, Any]] = None


_native = None


def native_module():
    """Return the compiled ``mmcore._C`` module (raises BackendError with a hint if missing)."""
    global _native
    if _native is not None:
        return _native
    try:
        _native = importlib.import_module("mmcore._C")
        return _native
    except ImportError as exc:  # pragma: no cover - only in a broken install
        raise BackendError(
            "the native module mmcore._C is missing: install the package with `pip install .` "
            f"(or rebuild it) instead of importing the source tree ({exc})"
        ) from exc


#: The thread cap is this many threads per CPU (see :func:`max_num_threads`).
THREADS_PER_CPU = 8


def max_num_threads() -> int:
    """The most threads the native kernels may use: ``8 * os.cpu_count()``.

    More threads than that cannot make a kernel faster, and every thread the pool starts stays
    for the life of the process, so :func:`set_num_threads` refuses larger counts (and the
    native pool clamps any count it is handed to the same multiple of the CPUs it sees).

    Examples
    --------
    >>> import os, mmcore
    >>> mmcore._backend.max_num_threads() == 8 * (os.cpu_count() or 1)
    True
    """
    return THREADS_PER_CPU * max(1, os.cpu_count() or 1)


def _default_threads() -> int:
    env = os.environ.get("MMCORE_NUM_THREADS")
    if env:
        try:
            n = int(env)
        except ValueError:
            raise BackendError(
                f"MMCORE_NUM_THREADS must be a positive integer, got {env!r}"
            ) from None
        if n < 1:
            raise BackendError(f"MMCORE_NUM_THREADS must be a positive integer, got {env!r}")
        if n > max_num_threads():
            raise BackendError(f"MMCORE_NUM_THREADS = {n} is more than the cap of "
                               f"{max_num_threads()} threads ({THREADS_PER_CPU} per CPU)")
        return n
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # pragma: no cover - non-Linux
        return max(1, os.cpu_count() or 1)


def set_num_threads(n: int) -> None:
    """Set the number of threads the native kernels use.

    Parameters
    ----------
    n : int
        A thread count, ``1 <= n <= max_num_threads()`` (8 per CPU: threads the pool starts
        stay for the life of the process, so a larger count is refused rather than clamped).
        A Python int or a NumPy integer; ``bool``, floats, strings and ``None`` are refused.
        The default is the number of CPUs this process may run on, or the environment variable
        ``MMCORE_NUM_THREADS`` (same bounds).

    Raises
    ------
    ArgumentError
        ``n`` is not an int or lies outside ``[1, max_num_threads()]``; the message names
        ``n``.

    Examples
    --------
    >>> import mmcore
    >>> mmcore.set_num_threads(2)
    >>> mmcore.get_num_threads()
    2
    """
    global _num_threads
    if isinstance(n, (bool, np.bool_)) or not isinstance(n, (int, np.integer)):
        raise ArgumentError(f"[set_num_threads] n must be an int, got {n!r}")
    n = int(n)
    if n < 1:
        raise ArgumentError(f"[set_num_threads] n must be >= 1, got {n}")
    cap = max_num_threads()
    if n > cap:
        raise ArgumentError(f"[set_num_threads] n = {n} is more than the cap of {cap} threads "
                            f"({THREADS_PER_CPU} per CPU on this machine)")
    with _lock:
        _num_threads = n


def get_num_threads() -> int:
    """Return the number of threads the native kernels use (see :func:`set_num_threads`)."""
    global _num_threads
    n = _num_threads          # set once, then only replaced whole: no lock needed to read it
    if n is not None:
        return n
    with _lock:
        if _num_threads is None:
            _num_threads = _default_threads()
        return _num_threads


class use_backend:
    """Select the backend for host arrays, for the current context.

    Works as a context manager (the previous choice is restored on exit) or as a plain call,
    which keeps the choice for the rest of the current thread / context.

    Parameters
    ----------
    name : {"native", "numba", "cuda"} or None
        ``None`` restores the default (``MMCORE_BACKEND`` or ``native``).

    Examples
    --------
    >>> import numpy as np, mmcore
    >>> q = np.ones((1, 1, 2, 4), np.float32)
    >>> with mmcore.use_backend("native"):
    ...     out = mmcore.ops.attention(q, q, q)
    >>> out.shape
    (1, 1, 2, 4)
    """

    def __init__(self, name: Optional[str]):
        if name is not None:
            _check_name(name, "use_backend")
        self._token = _current.set(name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        _current.reset(self._token)
        return False


class UnknownBackendError(BackendError, ArgumentError):
    """An unknown backend name (``backend=``, :class:`use_backend` or ``MMCORE_BACKEND``).

    Both a :class:`~mmcore.errors.BackendError` (what it always was) and an
    :class:`~mmcore.errors.ArgumentError` (an unknown name is an argument mistake).
    """


def _check_name(name: str, where: str) -> None:
    if not isinstance(name, str) or name not in BACKEND_NAMES:
        raise UnknownBackendError(f"[{where}] unknown backend {name!r}; expected one of "
                                  f"{', '.join(BACKEND_NAMES)}")


def is_cuda_array(x: Any) -> bool:
    """True when ``x`` lives on a CUDA device (``__cuda_array_interface__`` or DLPack device)."""
    if type(x) is np.ndarray:
        return False
    if hasattr(x, "__cuda_array_interface__"):
        return True
    dev = getattr(x, "__dlpack_device__", None)
    if dev is not None and not hasattr(x, "__array_interface__"):
        try:
            kind = int(dev()[0])
        except Exception:
            return False
        return kind in (2, 3, 13)  # kDLCUDA, kDLCUDAHost, kDLCUDAManaged
    return False


def cuda_status() -> Dict[str, Any]:
    """Describe the cuda backend: ``available``, ``devices`` and, when absent, ``reason``."""
    global _cuda_state
    if _cuda_state is not None:
        return _cuda_state
    state: Dict[str, Any] = {"available": False, "devices": []}
    try:
        mod = importlib.import_module("mmcore._cuda")
    except ImportError as exc:
        state["reason"] = f"mmcore._cuda was not built (no CUDA compiler at build time): {exc}"
    else:
        try:
            info = mod.device_info()
        except Exception as exc:  # pragma: no cover - driver problems
            state["reason"] = f"CUDA runtime error: {exc}"
        else:
            if info.get("error"):
                state["reason"] = str(info["error"])
            elif not info.get("devices"):
                state["reason"] = "no CUDA device found"
            else:
                state["devices"] = list(info["devices"])
                state["available"] = True
            state["runtime_version"] = info.get("runtime_version")
            state["driver_version"] = info.get("driver_version")
    _cuda_state = state
    return state


def numba_status() -> Dict[str, Any]:
    """Describe the numba backend: ``available`` and ``version`` or ``reason``."""
    global _numba_state
    if _numba_state is None:
        try:
            import numba  # noqa: F401
        except Exception as exc:
            _numba_state = {"available": False, "reason": f"numba is not installed ({exc})"}
        else:
            _numba_state = {"available": True, "version": numba.__version__}
    return _numba_state


def backends() -> Dict[str, Dict[str, Any]]:
    """Report the backends of this installation.

    Returns
    -------
    dict
        ``{"native": {...}, "cuda": {...}, "numba": {...}}``; each entry has ``available`` and
        either details (ISA level, threads, devices, version) or the ``reason`` it is absent.

    Examples
    --------
    >>> import mmcore
    >>> info = mmcore.backends()
    >>> info["native"]["available"], info["native"]["isa"] in ("avx512", "avx2", "baseline")
    (True, True)
    """
    C = native_module()
    native = {
        "available": True,
        "isa": C.isa_level(),
        "compiled_isas": list(C.compiled_isas()),
        "cpu_features": list(C.cpu_features()),
        "threads": get_num_threads(),
    }
    return {"native": native, "cuda": dict(cuda_status()), "numba": dict(numba_status())}


def _environ_reader(name: str) -> Callable[[], Optional[str]]:
    """A function returning ``os.environ.get(name)``, read on every call.

    ``os.environ.get`` encodes the key and goes through the ``Mapping`` machinery, a few
    microseconds: more than a small kernel call. On CPython the mapping keeps its encoded
    entries in a dict (``os.environ._data``, updated by every assignment to ``os.environ``,
    ``monkeypatch.setenv`` included), which is read directly; anywhere else, or once
    ``os.environ`` has been replaced by another object, the reader falls back to
    ``os.environ.get``.
    """
    environ = os.environ
    data = getattr(environ, "_data", None)
    encodekey = getattr(environ, "encodekey", None)
    decodevalue = getattr(environ, "decodevalue", None)
    if not isinstance(data, dict) or encodekey is None or decodevalue is None:
        return lambda: os.environ.get(name)
    try:
        key = encodekey(name)
    except Exception:  # pragma: no cover - an unusual platform encoding
        return lambda: os.environ.get(name)

    def read() -> Optional[str]:
        if os.environ is not environ:
            return os.environ.get(name)
        value = data.get(key)
        return None if value is None else decodevalue(value)

    return read


#: ``os.environ.get("MMCORE_BACKEND")``, read on every call (see :func:`_environ_reader`).
_env_backend = _environ_reader("MMCORE_BACKEND")


def default_host_backend() -> str:
    """The backend of a host call without ``backend=``: :func:`use_backend`, else
    ``MMCORE_BACKEND``, else ``"native"`` (not checked: :func:`resolve_backend` does that)."""
    name = _current.get()
    if name is None:
        env = _env_backend()
        name = env if env else "native"
    return name


def resolve_backend(op: str, arrays, backend: Optional[str] = None) -> str:
    """Pick the backend for one call of ``op`` on ``arrays`` (see module docstring)."""
    on_cuda = [is_cuda_array(a) for a in arrays if a is not None]
    if any(on_cuda):
        if not all(on_cuda):
            raise BackendError(f"[{op}] some arrays are on a CUDA device and some on the host; "
                               "mmcore never copies between them implicitly")
        if backend not in (None, "cuda"):
            raise BackendError(f"[{op}] backend={backend!r} cannot take CUDA device arrays")
        status = cuda_status()
        if not status["available"]:
            raise BackendError(
                f"[{op}] CUDA arrays given but the cuda backend is absent: {status.get('reason')}"
            )
        return "cuda"
    name = default_host_backend() if backend is None else backend
    if name == "native" and type(name) is str:
        return name
    _check_name(name, op)
    if name == "cuda":
        raise BackendError(f"[{op}] backend 'cuda' needs arrays on a CUDA device (CuPy); "
                           "host arrays are never moved to the GPU implicitly")
    if name == "numba" and not numba_status()["available"]:
        raise BackendError(f"[{op}] backend 'numba' is unavailable: {numba_status()['reason']}")
    return name
