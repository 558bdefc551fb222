"""Numba fallbacks for :func:`mmcore.ops.linear` and :func:`mmcore.ops.layer_norm`.

Written independently of the C++ kernels: one output row per parallel task, each output a
float64 dot product rounded once to float32 (so it is at least as accurate as the native
float32 sums), the activation in float64; layer norm with float64 statistics. The tests hold
both backends against float64 references.
"""

from __future__ import annotations

import math
from typing import Optional

import numpy as np
from numba import njit, prange, types

__all__ = ["linear_numba", "layer_norm_numba"]

_f32c2_ro = types.Array(types.float32, 2, "C", readonly=True)
_f32c1_ro = types.Array(types.float32, 1, "C", readonly=True)
_f32c2 = types.Array(types.float32, 2, "C")

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
                 *, activation: int) -> None:
    """``out = act(x @ weight.T + bias)`` of float32 (M, K) rows and an (N, K) float32 weight
    (the arguments of ``mmcore._C.linear``, quantized weights excluded)."""
    N = weight.shape[0]
    _linear_kernel(np.ascontiguousarray(x), np.ascontiguousarray(weight),
                   np.zeros(N, np.float32) if bias is None else bias, out, activation)


def layer_norm_numba(x: np.ndarray, weight: Optional[np.ndarray], bias: Optional[np.ndarray],
                     out: np.ndarray, *, eps: float) -> None:
    """Layer norm of float32 (rows, D) rows into ``out`` (the arguments of
    ``mmcore._C.layer_norm``)."""
    empty = np.zeros(x.shape[1], np.float32)
    _layer_norm_kernel(np.ascontiguousarray(x), empty if weight is None else weight,
                       empty if bias is None else bias, weight is not None, bias is not None,
                       float(eps), out)
