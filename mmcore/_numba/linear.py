"""Numba fallback for :func:`mmcore.ops.linear`: ``out = x @ w.T + b``.

Written independently of the C++ kernel: one output row per parallel task, each output a
float64 dot product rounded once to float32 (so it is at least as accurate as the native
float32 sums, and the tests hold both against a float64 reference).
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange, types

__all__ = ["linear_numba"]

_f32c2_ro = types.Array(types.float32, 2, "C", readonly=True)
_f32c1_ro = types.Array(types.float32, 1, "C", readonly=True)
_f32c2 = types.Array(types.float32, 2, "C")


@njit(types.void(_f32c2_ro, _f32c2_ro, _f32c1_ro, _f32c2), parallel=True, cache=False,
      nogil=True)
def linear_numba(x, w, b, out):  # pragma: no cover - compiled
    M, K = x.shape
    N = w.shape[0]
    for m in prange(M):
        for n in range(N):
            acc = np.float64(b[n])
            for k in range(K):
                acc += np.float64(x[m, k]) * np.float64(w[n, k])
            out[m, n] = np.float32(acc)
