"""Helpers shared by the CUDA paths of the ops: CuPy and mmcore._cuda lookup, device arrays.

Nothing here imports CuPy at module level: importing mmcore never needs a GPU.
"""

from __future__ import annotations

import importlib
from typing import Optional

from ..._backend import is_cuda_array
from ...errors import ArgumentError, BackendError, ShapeError

__all__ = ["cupy_module", "cuda_module", "device_array", "same_device"]


def cupy_module(op: str):
    """The ``cupy`` module, or a BackendError that says how to install it."""
    try:
        import cupy
    except ImportError as exc:
        raise BackendError(f"[{op}] CUDA arrays need CuPy for the cuda backend: install it with "
                           f"`pip install \"mmcore[cuda]\"` (cupy-cuda12x) ({exc})") from exc
    return cupy


def cuda_module(op: str, kernel: Optional[str] = None):
    """``mmcore._cuda`` (checked to have ``kernel`` when given), or a BackendError."""
    try:
        mod = importlib.import_module("mmcore._cuda")
    except ImportError as exc:
        raise BackendError(f"[{op}] the CUDA module mmcore._cuda is missing: rebuild mmcore with "
                           f"a CUDA compiler available ({exc})") from exc
    if kernel is not None and not hasattr(mod, kernel):
        raise BackendError(f"[{op}] this build of mmcore._cuda has no {kernel} kernel: rebuild "
                           "mmcore (`pip install .`)")
    return mod


def device_array(cp, op: str, name: str, x):
    """``x`` as a CuPy array without copying; host objects raise (never copied implicitly)."""
    if x is None:
        raise ArgumentError(f"[{op}] {name} is required, got None")
    if isinstance(x, cp.ndarray):
        return x
    if hasattr(x, "__cuda_array_interface__"):
        try:
            return cp.asarray(x)
        except Exception as exc:
            raise ShapeError(f"[{op}] {name} cannot be read as a CUDA array: {exc}") from None
    if is_cuda_array(x):
        try:
            return cp.from_dlpack(x)
        except Exception as exc:
            raise ShapeError(f"[{op}] {name} cannot be read as a CUDA array: {exc}") from None
    raise BackendError(f"[{op}] {name} is a host object ({type(x).__name__}) while the cuda "
                       "backend runs; mmcore never copies between host and device implicitly: "
                       "pass CuPy arrays on one device")


def same_device(op: str, name: str, x, device: int, first: str = "the first input") -> None:
    """Raise unless CuPy array ``x`` lives on ``device`` (the device of ``first``)."""
    dev = x.device.id
    if dev != device:
        raise BackendError(f"[{op}] {name} is on CUDA device {dev} but {first} is on device "
                           f"{device}")
