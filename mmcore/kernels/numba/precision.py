"""The operand arithmetic of the matmul precisions in NumPy, for the numba fallbacks.

What :mod:`mmcore._precision` defines, step by step in float32 as the native kernels do it:
bfloat16 rounding (``"bf16"``), the dynamic per-row uint8 quantization of activations and the
per-row int8 quantization of weights (``"int8"``). Pure NumPy (no numba), so that the numba
kernels of :mod:`.linear` and :mod:`.attention` stay the float32 kernels they were.

Examples
--------
>>> import numpy as np
>>> from mmcore.kernels.numba.precision import bf16_round, quantize_rows_u8
>>> bf16_round(np.array([1 + 2.0 ** -8, 1 + 3 * 2.0 ** -8, np.inf], np.float32))
array([1.      , 1.015625,      inf], dtype=float32)
>>> a, sx = quantize_rows_u8(np.array([[-1.0, 0.5, 2.0]], np.float32))
>>> a, sx
(array([[-85,  42, 170]], dtype=int32), array([0.01176471], dtype=float32))
"""

from __future__ import annotations

from typing import Optional, Tuple

import numpy as np

__all__ = ["bf16_round", "weight_float32", "quantize_rows_u8", "quantize_weight_s8"]

_F32 = np.float32


def bf16_round(a: np.ndarray) -> np.ndarray:
    """float32 values rounded to bfloat16 (nearest, ties to even) and widened back to float32:
    NaN stays NaN (quiet), values past the bfloat16 range become infinite. A new array."""
    a = np.ascontiguousarray(a, dtype=_F32)
    u = a.view(np.uint32)
    with np.errstate(over="ignore"):
        r = (u + np.uint32(0x7FFF) + ((u >> np.uint32(16)) & np.uint32(1))) & np.uint32(0xFFFF0000)
    nan = np.isnan(a)
    if nan.any():
        r = np.where(nan, (u | np.uint32(0x00400000)) & np.uint32(0xFFFF0000), r)
    return r.view(_F32)


def weight_float32(data: np.ndarray, kind: int, scale: Optional[np.ndarray]) -> np.ndarray:
    """The float32 matrix of a weight as the kernels take it: ``kind`` 0 float32, 1 float16
    bits, 2 bfloat16 bits, 3 int8 with ``scale`` per row (the codes of
    ``mmcore.ops.linear.WEIGHT_KIND_CODES``)."""
    if kind == 0:
        return data
    if kind == 1:
        return data.view(np.float16).astype(_F32)
    if kind == 2:
        return (data.astype(np.uint32) << np.uint32(16)).view(_F32)
    assert scale is not None
    return data.astype(_F32) * scale[:, None]


def _bad_rows(a: np.ndarray) -> np.ndarray:
    """Rows holding inf or NaN."""
    return ~np.isfinite(a).all(axis=1) if a.shape[1] else np.zeros(a.shape[0], bool)


def quantize_rows_u8(x: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """The activations of the ``"int8"`` precision: ``(a, sx)`` with ``x[m] ~ a[m] * sx[m]``.

    Per row, in float32: ``lo = min(0, min x)``, ``hi = max(0, max x)``, ``sx = (hi - lo) /
    255`` (1 when 0 or 1 / sx overflows), ``inv = 1 / sx``, ``zp = clamp(rint(-lo * inv), 0,
    255)``, ``a = clamp(rint(x * inv) + zp, 0, 255) - zp`` (int32 in [-255, 255]); a row
    holding inf or NaN gets ``a = 0`` and ``sx = NaN``.
    """
    x = np.asarray(x, dtype=_F32)
    M, K = x.shape
    bad = _bad_rows(x)
    xs = np.where(bad[:, None], _F32(0), x)
    zero = np.zeros(M, _F32)
    lo = np.minimum(zero, xs.min(axis=1) if K else zero)
    hi = np.maximum(zero, xs.max(axis=1) if K else zero)
    with np.errstate(over="ignore"):
        sx = (hi - lo) / _F32(255)
    with np.errstate(over="ignore", divide="ignore"):
        tiny = (sx == 0) | ~np.isfinite(_F32(1) / sx)        # 0, or 1 / sx overflows
    sx = np.where(tiny, _F32(1), sx).astype(_F32)
    inv = (_F32(1) / sx).astype(_F32)
    with np.errstate(invalid="ignore", over="ignore"):
        zp = np.clip(np.rint(-lo * inv), 0, 255).astype(_F32)
        q = np.clip(np.rint(xs * inv[:, None]) + zp[:, None], 0, 255) - zp[:, None]
    a = np.where(bad[:, None], 0, q).astype(np.int32)
    return a, np.where(bad, _F32(np.nan), sx).astype(_F32)


def quantize_weight_s8(w: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """A float weight (N, K) quantized for the ``"int8"`` precision: ``(q, sw)``, int8 ``q``
    with ``w[n] ~ q[n] * sw[n]``: ``sw = max |w[n]| / 127`` (1 when 0 or 1 / sw overflows),
    ``q = clamp(rint(w * (1 / sw)), -127, 127)``, in float32; a row holding inf or NaN gets
    ``q = 0``, ``sw = NaN``.
    """
    w = np.asarray(w, dtype=_F32)
    N, K = w.shape
    bad = _bad_rows(w)
    ws = np.where(bad[:, None], _F32(0), w)
    amax = np.abs(ws).max(axis=1) if K else np.zeros(N, _F32)
    sw = (amax / _F32(127)).astype(_F32)
    with np.errstate(over="ignore", divide="ignore"):
        tiny = (sw == 0) | ~np.isfinite(_F32(1) / sw)
    sw = np.where(tiny, _F32(1), sw).astype(_F32)
    inv = (_F32(1) / sw).astype(_F32)
    with np.errstate(over="ignore", invalid="ignore"):
        q = np.clip(np.rint(ws * inv[:, None]), -127, 127)
    q = np.where(bad[:, None], 0, q).astype(np.int8)
    return q, np.where(bad, _F32(np.nan), sw).astype(_F32)
