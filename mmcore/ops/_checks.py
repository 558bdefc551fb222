"""Argument checks shared by the public ops. Messages always start with ``[op]``.

Two kinds of mistakes, two error classes:

* array problems (rank, shape, dtype, non-finite samples) raise
  :class:`~mmcore.errors.ShapeError`;
* everything else about an argument -- the wrong Python type, an unknown name or preset, a
  scalar out of range -- raises :class:`~mmcore.errors.ArgumentError` (a ``TypeError`` and a
  ``ValueError`` too), always naming the argument.

The scalar helpers (:func:`check_int`, :func:`check_float`, :func:`check_bool`,
:func:`check_choice`) are what every public op calls:

* ints are Python ints or NumPy integers (anything with ``__index__``), never ``bool``, and must
  fit the C++ type of the binding (``int64`` unless a smaller ``hi`` is given);
* floats are real numbers (Python, NumPy, ``Fraction``, a 0-d real array), never ``bool`` or
  ``str``; they must be finite and, with ``float32=True`` (the default, for every value a kernel
  computes with in float32), finite *in float32* and still inside their bounds once rounded to
  float32 -- so ``scale=1e300`` or ``power=1e-300`` are refused instead of turning into inf,
  NaN or 0 inside the kernel.

Examples
--------
>>> from mmcore.ops._checks import check_int, check_float
>>> check_int("n_fft", 400, op="stft", lo=2)
400
>>> try:
...     check_float("scale", 1e300, op="attention")
... except ValueError as exc:
...     print(exc)  # doctest: +NORMALIZE_WHITESPACE
[attention] scale = 1e+300 is beyond the float32 range (|x| <= 3.4028234663852886e+38)
the kernels compute in
"""

from __future__ import annotations

import math
import numbers
import operator
from fractions import Fraction
from typing import Any, NamedTuple, Optional, Sequence

import numpy as np

from ..errors import ArgumentError, ShapeError

FLOAT_INPUT_DTYPES = (np.dtype(np.float16), np.dtype(np.float32), np.dtype(np.float64))

INT32_MAX = (1 << 31) - 1
INT64_MIN = -(1 << 63)
INT64_MAX = (1 << 63) - 1
FLOAT32_MAX = float(np.finfo(np.float32).max)


def _shown(value) -> str:
    """A short ``repr`` of ``value`` for a message (long values are cut)."""
    try:
        text = repr(value)
    except Exception:  # pragma: no cover - a broken __repr__
        text = f"<{type(value).__name__}>"
    return text if len(text) <= 80 else text[:77] + "..."


def check_int(name: str, value, *, op: str, lo: Optional[int] = None,
              hi: Optional[int] = INT64_MAX) -> int:
    """``value`` as a Python int, checked to lie in ``[lo, hi]``.

    Accepts Python ints and NumPy integers (anything with ``__index__``); refuses ``bool``,
    floats (even integral ones) and strings. ``hi`` defaults to the int64 maximum, the type
    the native bindings take; pass ``hi=None`` for no upper bound. Raises ArgumentError.
    """
    if isinstance(value, (bool, np.bool_)) or isinstance(value, (str, bytes)):
        raise ArgumentError(f"[{op}] {name} must be an int, got {_shown(value)}")
    try:
        v = operator.index(value)
    except TypeError:
        raise ArgumentError(f"[{op}] {name} must be an int, got {_shown(value)}") from None
    if lo is not None and v < lo:
        raise ArgumentError(f"[{op}] {name} must be >= {lo}, got {v}")
    if hi is not None and v > hi:
        why = " (the int64 range of the native kernels)" if hi == INT64_MAX else ""
        raise ArgumentError(f"[{op}] {name} must be <= {hi}{why}, got {v}")
    return int(v)


def check_optional_int(name: str, value, *, op: str, lo: Optional[int] = None,
                       hi: Optional[int] = INT64_MAX) -> Optional[int]:
    """:func:`check_int`, or ``None`` when ``value`` is ``None``."""
    return None if value is None else check_int(name, value, op=op, lo=lo, hi=hi)


def _real(name: str, value, op: str) -> float:
    if type(value) is float:          # the common case first: no ABC checks (subclasses below)
        return value
    if isinstance(value, (bool, np.bool_)):
        raise ArgumentError(f"[{op}] {name} must be a real number, got {_shown(value)}")
    if not isinstance(value, numbers.Real) and (hasattr(value, "__array__")
                                                or hasattr(value, "__array_interface__")):
        try:      # a 0-d array (NumPy, or a CPU torch tensor) holding one real number
            arr = np.asarray(value)
        except Exception:
            arr = None
        if arr is not None and arr.ndim == 0 and arr.dtype.kind in "fiu":
            value = arr[()]
    if not isinstance(value, numbers.Real):
        raise ArgumentError(f"[{op}] {name} must be a real number, got {_shown(value)}")
    try:
        return float(value)
    except OverflowError:
        raise ArgumentError(f"[{op}] {name} = {_shown(value)} is beyond the float64 "
                            "range") from None


def check_float(name: str, value, *, op: str, lo: Optional[float] = None,
                hi: Optional[float] = None, lo_open: bool = False, hi_open: bool = False,
                float32: bool = True) -> float:
    """``value`` as a finite Python float, checked against its bounds.

    Parameters
    ----------
    name, value, op
        The argument's name, its value and the op (for the message).
    lo, hi : float, optional
        Bounds; inclusive unless ``lo_open`` / ``hi_open``.
    float32 : bool, default True
        The value reaches a kernel as float32: it must be finite in float32 and keep its bounds
        once rounded to float32 (a positive value must not round to 0).

    Returns
    -------
    float
        The value in float64 (the kernels round it themselves).

    Raises
    ------
    ArgumentError
        Not a real number (``bool``, ``str``, ``None``...), not finite, out of range.
    """
    f = _real(name, value, op)
    if not math.isfinite(f):
        raise ArgumentError(f"[{op}] {name} must be finite, got {f}")
    _check_bounds(name, f, f, op, lo, hi, lo_open, hi_open)
    if float32:
        if abs(f) > FLOAT32_MAX:
            raise ArgumentError(f"[{op}] {name} = {f} is beyond the float32 range "
                                f"(|x| <= {FLOAT32_MAX}) the kernels compute in")
        _check_bounds(name, f, float(np.float32(f)), op, lo, hi, lo_open, hi_open)
    return f


def _check_bounds(name, f, g, op, lo, hi, lo_open, hi_open) -> None:
    """Bounds of ``g`` (``f`` itself, or ``f`` rounded to float32)."""
    bad_lo = lo is not None and (g <= lo if lo_open else g < lo)
    bad_hi = hi is not None and (g >= hi if hi_open else g > hi)
    if not (bad_lo or bad_hi):
        return
    if lo is not None and hi is not None:
        want = (f"lie in {'(' if lo_open else '['}{lo}, {hi}{')' if hi_open else ']'}")
    elif lo is not None:
        want = f"be {'>' if lo_open else '>='} {lo}"
    else:
        want = f"be {'<' if hi_open else '<='} {hi}"
    rounded = "" if g == f else f" (it rounds to {g} in float32, the kernels' precision)"
    raise ArgumentError(f"[{op}] {name} must {want}, got {f}{rounded}")


def check_bool(name: str, value, *, op: str) -> bool:
    """``value`` as a bool: only ``True`` / ``False`` (or NumPy's); ints are refused."""
    if not isinstance(value, (bool, np.bool_)):
        raise ArgumentError(f"[{op}] {name} must be True or False, got {_shown(value)}")
    return bool(value)


def check_choice(name: str, value, choices, *, op: str) -> str:
    """``value`` when it is one of the strings ``choices``, else ArgumentError."""
    if not isinstance(value, str) or value not in choices:
        raise ArgumentError(f"[{op}] {name} must be one of {', '.join(map(repr, choices))}, "
                            f"got {_shown(value)}")
    return value


def check_limit(name: str, value, *, op: str, default: float, lo: float = 1.0) -> float:
    """A size limit argument (``max_pixels``, ``max_samples``...): None means ``default``,
    ``math.inf`` turns the limit off, else a number > 0 and >= ``lo``; ArgumentError
    otherwise."""
    if value is None:
        return float(default)
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.integer,
                                                                     np.floating)):
        raise ArgumentError(f"[{op}] {name} must be a positive number, math.inf or None, "
                            f"got {_shown(value)}")
    try:
        v = float(value)
    except OverflowError:                    # an int beyond float: no limit at all
        v = math.inf if value > 0 else -math.inf
    if math.isnan(v) or v <= 0 or v < lo:
        raise ArgumentError(f"[{op}] {name} must be a positive number, math.inf or None, "
                            f"got {_shown(value)}")
    return v


def as_host_array(op: str, name: str, x) -> np.ndarray:
    """Turn ``x`` into a NumPy array or raise a ShapeError naming ``name`` (ArgumentError for
    ``None``)."""
    if x is None:
        raise ArgumentError(f"[{op}] {name} is required, got None")
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
        raise ShapeError(f"[{op}] {name} has dtype {x.dtype}, expected float32 or float16 "
                         "(float64 is cast)")
    return np.ascontiguousarray(x, dtype=np.float32)


def finite_float(op: str, name: str, value, *, positive: bool = False) -> float:
    """A finite real ``value`` (> 0 with ``positive``), finite in float32: see
    :func:`check_float`."""
    return check_float(name, value, op=op, lo=0.0 if positive else None, lo_open=positive)


def broadcast_view(op: str, name: str, x, shape: Sequence[int], dims: str, *, xp=np):
    """A read-only broadcast view of ``x`` with ``shape`` (zero strides, no copy); ``xp`` is
    the array module of ``x`` (NumPy or CuPy)."""
    if x.ndim > len(shape):
        raise ShapeError(f"[{op}] {name} has {x.ndim} dims, expected at most {len(shape)} {dims}")
    try:
        return xp.broadcast_to(x, tuple(shape))
    except ValueError:
        raise ShapeError(f"[{op}] {name} of shape {tuple(x.shape)} is not broadcastable to "
                         f"{dims} = {tuple(shape)}") from None


def optional_seed(op: str, seed: Optional[int]) -> int:
    """A dropout / dither seed modulo 2**64; a random one when ``None``."""
    if seed is None:
        import secrets
        return secrets.randbits(63)
    return check_int("seed", seed, op=op, hi=None) % (1 << 64)


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
        raise ShapeError(f"[{op}] v has (B, H, Lk) = {tuple(v.shape[:3])}, expected "
                         f"{(B, H, Lk)} from k")
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
    scale_f = 1.0 / math.sqrt(D) if scale is None else check_float("scale", scale, op=op)
    temp_f = check_float("temperature", temperature, op=op, lo=0.0, lo_open=True)
    eff_scale = scale_f / temp_f
    if not math.isfinite(eff_scale) or abs(eff_scale) > FLOAT32_MAX:
        raise ArgumentError(f"[{op}] scale / temperature = {scale_f} / {temp_f} overflows float32, "
                            "the precision the scores are computed in")
    p = check_float("dropout_p", dropout_p, op=op, lo=0.0, hi=1.0, hi_open=True, float32=False)
    threshold = dropout_threshold(p)
    use_dropout = threshold > 0
    return AttentionScalars(eff_scale, use_dropout, optional_seed(op, seed) if use_dropout else 0,
                            threshold, 1.0 / (1.0 - p) if use_dropout else 1.0)


def attention_results(out, weights, lse):
    """``out`` alone, or the tuple ``(out[, weights][, lse])`` of the outputs asked for."""
    if weights is None and lse is None:
        return out
    return tuple(x for x in (out, weights, lse) if x is not None)


def check_rate(op: str, name: str, value: Any, *, optional: bool = False) -> Optional[float]:
    """A frame or sample rate: a positive finite number (a :class:`fractions.Fraction` too), as a
    float64; None passes when ``optional``.

    Raises
    ------
    ArgumentError
        Not a positive finite real number (or None when not ``optional``).
    """
    if value is None and optional:
        return None
    if isinstance(value, Fraction):
        value = float(value)
    return check_float(name, value, op=op, lo=0.0, lo_open=True, float32=False)
