"""Numba fallbacks for :func:`mmcore.ops.linear` and :func:`mmcore.ops.layer_norm`.

Written independently of the C++ kernels: one output row per parallel task, each output a
float64 dot product rounded once to float32 (so it is at least as accurate as the native
float32 sums), the activation in float64; layer norm with float64 statistics. The tests hold
both backends against float64 references.

The matmul precisions (:mod:`mmcore._precision`) follow their definitions with the NumPy helpers
of :mod:`.precision`: ``"bf16"`` rounds both operands to bfloat16 and runs the float32 kernel;
``"int8"`` quantizes the activations per row and the weight per row, sums the integer products
exactly (a float64 matrix product of the integers: every partial sum is an integer below 2**53)
and applies the float32 epilogue ``float32(acc) * (sx * sw) + bias``, then the activation.
"""

from __future__ import annotations

import math
from typing import Optional

import numpy as np
from numba import njit, prange, types

from .precision import bf16_round, quantize_rows_u8, quantize_weight_s8, weight_float32

__all__ = ["linear_numba", "layer_norm_numba"]

_f32c2_ro = types.Array(types.float32, 2, "C", readonly=True)
_f32c1_ro = types.Array(types.float32, 1, "C", readonly=True)
_f32c2 = types.Array(types.float32, 2, "C")
_f64c2_ro = types.Array(types.float64, 2, "C", readonly=True)

_SQRT_HALF = 1.0 / math.sqrt(2.0)
_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)


@njit(types.float64(types.float64, types.int64), cache=False, nogil=True)
def _act(v, code):  # pragma: no cover - compiled
    if code == 1:
        return 0.5 * v * (1.0 + math.erf(v * _SQRT_HALF))
    if code == 2:
        return 0.5 * v * (1.0 + math.tanh(_SQRT_2_OVER_PI * (v + 0.044715 * v * v * v)))
    if code == 3:
        return v / (1.0 + math.exp(-1.702 * v))
    if code == 4:
        return v if not v < 0.0 else 0.0
    return v


@njit(types.void(_f32c2_ro, _f32c2_ro, _f32c1_ro, _f32c2, types.int64), parallel=True,
      cache=False, nogil=True)
def _linear_kernel(x, w, b, out, act):  # pragma: no cover - compiled
    M, K = x.shape
    N = w.shape[0]
    for m in prange(M):
        for n in range(N):
            acc = np.float64(b[n])
            for k in range(K):
                acc += np.float64(x[m, k]) * np.float64(w[n, k])
            out[m, n] = np.float32(_act(np.float32(acc), act))


@njit(types.void(_f64c2_ro, _f32c1_ro, _f32c1_ro, _f32c1_ro, _f32c2, types.int64), parallel=True,
      cache=False, nogil=True)
def _int8_epilogue(acc, sx, sw, b, out, act):  # pragma: no cover - compiled
    M, N = acc.shape
    for m in prange(M):
        for n in range(N):
            s = np.float32(sx[m] * sw[n])
            y = np.float32(np.float32(acc[m, n]) * s)
            y = np.float32(y + b[n])
            out[m, n] = np.float32(_act(np.float64(y), act))


@njit(types.void(_f32c2_ro, _f32c1_ro, _f32c1_ro, types.boolean, types.boolean, types.float64,
                 _f32c2), parallel=True, cache=False, nogil=True)
def _layer_norm_kernel(x, weight, bias, has_weight, has_bias, eps, out):  # pragma: no cover
    R, D = x.shape
    for r in prange(R):
        s = 0.0
        for i in range(D):
            s += x[r, i]
        mean = s / D
        ss = 0.0
        for i in range(D):
            c = x[r, i] - mean
            ss += c * c
        inv = 1.0 / math.sqrt(ss / D + eps)
        for i in range(D):
            v = (x[r, i] - mean) * inv
            if has_weight:
                v = v * weight[i]
            if has_bias:
                v = v + bias[i]
            out[r, i] = np.float32(v)


def linear_numba(x: np.ndarray, weight: np.ndarray, bias: Optional[np.ndarray], out: np.ndarray,
                 *, activation: int, weight_kind: int = 0,
                 weight_scale: Optional[np.ndarray] = None, precision: str = "highest") -> None:
    """``out = act(x @ weight.T + bias)`` of float32 (M, K) rows and an (N, K) weight (the
    arguments of :func:`mmcore.kernels.cpu.linear`: ``weight_kind`` 0 float32, 1 float16 bits,
    2 bfloat16 bits, 3 int8 with ``weight_scale``), under ``precision``."""
    N = weight.shape[0]
    b = np.zeros(N, np.float32) if bias is None else bias
    if precision == "int8":
        if weight_kind == 3:            # an int8 weight is used as stored
            assert weight_scale is not None
            q, sw = weight, np.ascontiguousarray(weight_scale, dtype=np.float32)
        else:
            q, sw = quantize_weight_s8(weight_float32(weight, weight_kind, weight_scale))
        a, sx = quantize_rows_u8(x)
        # exact: |a q| <= 255 * 127 and K <= 65536, so every partial sum is an integer < 2**53
        acc = a.astype(np.float64) @ q.astype(np.float64).T
        _int8_epilogue(np.ascontiguousarray(acc), sx, sw, b, out, activation)
        return
    w = weight_float32(weight, weight_kind, weight_scale)
    if precision == "bf16":
        x, w = bf16_round(x), bf16_round(w)
    _linear_kernel(np.ascontiguousarray(x), np.ascontiguousarray(w), b, out, activation)


def layer_norm_numba(x: np.ndarray, weight: Optional[np.ndarray], bias: Optional[np.ndarray],
                     out: np.ndarray, *, eps: float) -> None:
    """Layer norm of float32 (rows, D) rows into ``out`` (the arguments of
    ``mmcore._C.layer_norm``)."""
    empty = np.zeros(x.shape[1], np.float32)
    _layer_norm_kernel(np.ascontiguousarray(x), empty if weight is None else weight,
                       empty if bias is None else bias, weight is not None, bias is not None,
                       float(eps), out)
