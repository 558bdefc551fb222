"""Argument checks shared by the public ops. Messages always start with ``[op]``."""

from __future__ import annotations

import math
from typing import NamedTuple, Optional, Sequence

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


def check_qkv_shapes(op: str, q, k, v):
    """Ranks and matching sizes of q (B, H, Lq, D), k (B, H, Lk, D), v (B, H, Lk, Dv).

    Works for any array type with ``ndim`` and ``shape`` (NumPy, CuPy); returns
    ``(B, H, Lq, Lk, D, Dv)``.
    """
    check_rank(op, "q", q, 4, "(B, H, Lq, D)")
    check_rank(op, "k", k, 4, "(B, H, Lk, D)")
    check_rank(op, "v", v, 4, "(B, H, Lk, Dv)")
    B, H, Lq, D = (int(n) for n in q.shape)
    if tuple(k.shape[:2]) != (B, H):
        raise ShapeError(f"[{op}] k has (B, H) = {tuple(k.shape[:2])}, expected {(B, H)} from q")
    if k.shape[3] != D:
        raise ShapeError(f"[{op}] k has D = {k.shape[3]}, expected {D} from q")
    Lk = int(k.shape[2])
    if tuple(v.shape[:3]) != (B, H, Lk):
        raise ShapeError(f"[{op}] v has (B, H, Lk) = {tuple(v.shape[:3])}, expected {(B, H, Lk)} from k")
    if D < 1:
        raise ShapeError(f"[{op}] q has D = 0, expected at least 1")
    return B, H, Lq, Lk, D, int(v.shape[3])


class AttentionScalars(NamedTuple):
    eff_scale: float      # scale / temperature
    use_dropout: bool
    seed: int             # dropout seed modulo 2**64 (0 without dropout)
    threshold: int        # 24-bit keep threshold
    drop_scale: float     # 1 / (1 - p) for kept weights


DROPOUT_BITS = 24


def dropout_threshold(dropout_p: float) -> int:
    """The 24-bit integer threshold every backend compares its dropout bits against.

    A weight is kept iff ``dropout_bits(seed, b, h, i, j) >= dropout_threshold(p)``, so the
    drop probability is ``round(p * 2**24) / 2**24``.
    """
    return int(math.floor(dropout_p * (1 << DROPOUT_BITS) + 0.5))


def attention_scalars(op: str, D: int, scale, temperature, dropout_p, seed) -> AttentionScalars:
    """Validate the scalar options of attention and derive what the kernels take."""
    scale_f = 1.0 / math.sqrt(D) if scale is None else finite_float(op, "scale", scale)
    temp_f = finite_float(op, "temperature", temperature, positive=True)
    eff_scale = scale_f / temp_f
    if not math.isfinite(eff_scale):
        raise ShapeError(f"[{op}] scale / temperature overflows: {scale_f} / {temp_f}")
    p = finite_float(op, "dropout_p", dropout_p)
    if not 0.0 <= p < 1.0:
        raise ShapeError(f"[{op}] dropout_p must lie in [0, 1), got {p}")
    threshold = dropout_threshold(p)
    use_dropout = threshold > 0
    return AttentionScalars(eff_scale, use_dropout, optional_seed(op, seed) if use_dropout else 0,
                            threshold, 1.0 / (1.0 - p) if use_dropout else 1.0)


def attention_results(out, weights, lse):
    """``out`` alone, or the tuple ``(out[, weights][, lse])`` of the outputs that were asked for."""
    if weights is None and lse is None:
        return out
    return tuple(x for x in (out, weights, lse) if x is not None)
