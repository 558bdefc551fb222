"""Argument checks shared by the public ops. Messages always start with ``[op]``."""

from __future__ import annotations

import math
from typing import Optional, Sequence

import numpy as np

from ..errors import ShapeError

FLOAT_INPUT_DTYPES = (np.dtype(np.float16), np.dtype(np.float32), np.dtype(np.float64))


def as_host_array(op: str, name: str, x) -> np.ndarray:
    """Turn ``x`` into a NumPy array or raise a ShapeError naming ``name``."""
    if x is None:
        raise ShapeError(f"[{op}] {name} is required")
    try:
        return np.asarray(x)
    except Exception as exc:
        raise ShapeError(f"[{op}] {name} cannot be converted to an array: {exc}") from None


def check_rank(op: str, name: str, x: np.ndarray, ndim: int, dims: str) -> None:
    if x.ndim != ndim:
        raise ShapeError(f"[{op}] {name} has {x.ndim} dims, expected {ndim} {dims}")


def float32_contiguous(op: str, name: str, x: np.ndarray) -> np.ndarray:
    """float16/float32/float64 -> C-contiguous float32 (copies only when needed)."""
    if x.dtype not in FLOAT_INPUT_DTYPES:
        raise ShapeError(f"[{op}] {name} has dtype {x.dtype}, expected float32 or float16 (float64 is cast)")
    return np.ascontiguousarray(x, dtype=np.float32)


def finite_float(op: str, name: str, value, *, positive: bool = False) -> float:
    try:
        f = float(value)
    except (TypeError, ValueError):
        raise ShapeError(f"[{op}] {name} must be a real number, got {value!r}") from None
    if not math.isfinite(f):
        raise ShapeError(f"[{op}] {name} must be finite, got {f}")
    if positive and f <= 0:
        raise ShapeError(f"[{op}] {name} must be > 0, got {f}")
    return f


def broadcast_view(op: str, name: str, x: np.ndarray, shape: Sequence[int], dims: str) -> np.ndarray:
    """A read-only broadcast view of ``x`` with ``shape`` (zero strides, no copy)."""
    if x.ndim > len(shape):
        raise ShapeError(f"[{op}] {name} has {x.ndim} dims, expected at most {len(shape)} {dims}")
    try:
        return np.broadcast_to(x, tuple(shape))
    except ValueError:
        raise ShapeError(f"[{op}] {name} of shape {tuple(x.shape)} is not broadcastable to "
                         f"{dims} = {tuple(shape)}") from None


def optional_seed(op: str, seed: Optional[int]) -> int:
    if seed is None:
        import secrets
        return secrets.randbits(63)
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
        raise ShapeError(f"[{op}] seed must be an int or None, got {seed!r}")
    return int(seed) % (1 << 64)
