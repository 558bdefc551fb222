"""Numba fallback for the fusion reductions (:mod:`mmcore.ops.fusion`).

The entry points take the same arguments as the native kernels ``mmcore._C.masked_mean``,
``masked_max`` and ``fuse`` (less ``num_threads``) and fill the preallocated outputs; the public
ops have already validated the arguments and laid them out (float32 C-contiguous data, bool
masks). They are written independently of the C++ kernels, one batch row per parallel task with
float64 accumulators, so that the two can be held against each other in the tests.

Semantics (see ``csrc/include/mmcore/fusion.h``):

* ``masked_mean`` / ``masked_max``: over the tokens ``l`` of row ``b`` with ``mask[b, l]`` True
  (all tokens without a mask); a row without real tokens gives zeros. Padding tokens are never
  read, so they may hold anything. A NaN in a real token propagates (also through the max).
* ``fuse``, over the modalities ``m`` with ``present[b, m]`` True (all without ``present``);
  absent modalities are never read:

  - concat: ``out[b, m*D:(m+1)*D] = emb[b, m]``, zeros where absent;
  - mean, sum, max: over the present modalities, zeros for a row with none present;
  - weighted: ``w = weights[b]`` zeroed where absent, divided by its sum (a zero sum gives zero
    weights), ``out[b] = sum_m w_m emb[b, m]``;
  - attention: ``s_m = (query[b] . emb[b, m]) / sqrt(D)``, ``w = softmax(s)`` over the present
    modalities (exact, with max subtraction; zeros with none present), ``out[b] = sum_m w_m
    emb[b, m]``. A NaN score makes the row's out and its present weights NaN.

  In the weighted sums (mean, sum, weighted, attention) a modality whose weight is exactly 0
  does not take part, so it is never read either. ``out_weights`` receives ``w`` for weighted and
  attention (0 for absent modalities).
"""

from __future__ import annotations

import math
import threading

import numpy as np
from numba import njit, prange, types

__all__ = ["masked_mean_numba", "masked_max_numba", "fuse_numba", "STRATEGY_IDS"]

STRATEGY_IDS = {"concat": 0, "mean": 1, "sum": 2, "max": 3, "weighted": 4, "attention": 5}
_CONCAT, _MEAN, _SUM, _MAX, _WEIGHTED, _ATTENTION = range(6)

_f32c3_ro = types.Array(types.float32, 3, "C", readonly=True)
_f32c2 = types.Array(types.float32, 2, "C")
_f32a2_ro = types.Array(types.float32, 2, "A", readonly=True)
_b1a2_ro = types.Array(types.boolean, 2, "A", readonly=True)

# One compiled signature per kernel: writable or read-only, contiguous or broadcast (zero
# stride) arguments all convert safely to these types.
_REDUCE_SIGNATURE = types.void(_f32c3_ro, _b1a2_ro, types.boolean, _f32c2)
_FUSE_SIGNATURE = types.void(
    _f32c3_ro,                     # emb (B, M, D)
    _b1a2_ro, types.boolean,       # present (B, M), has_present
    _f32a2_ro,                     # weights (B, M), possibly a broadcast view
    _f32a2_ro,                     # query (B, D), possibly a broadcast view
    _f32c2,                        # out (B, M*D) or (B, D)
    _f32c2, types.boolean,         # out_weights (B, M), has_out_weights
    types.int64,                   # strategy id
)


@njit(_REDUCE_SIGNATURE, parallel=True, cache=True, fastmath=False, nogil=True)
def _masked_mean_kernel(x, mask, has_mask, out):
    B = x.shape[0]
    L = x.shape[1]
    D = x.shape[2]
    for b in prange(B):
        acc = np.zeros(D, np.float64)
        n = 0
        for t in range(L):
            if has_mask and not mask[b, t]:
                continue
            n += 1
            for d in range(D):
                acc[d] += np.float64(x[b, t, d])
        if n == 0:
            for d in range(D):
                out[b, d] = 0.0
        else:
            for d in range(D):
                out[b, d] = np.float32(acc[d] / n)


@njit(_REDUCE_SIGNATURE, parallel=True, cache=True, fastmath=False, nogil=True)
def _masked_max_kernel(x, mask, has_mask, out):
    B = x.shape[0]
    L = x.shape[1]
    D = x.shape[2]
    for b in prange(B):
        best = np.full(D, -np.inf, np.float32)
        seen = False
        for t in range(L):
            if has_mask and not mask[b, t]:
                continue
            seen = True
            for d in range(D):
                v = x[b, t, d]
                # a NaN, once taken, stays: no comparison with it is true
                if v > best[d] or v != v:
                    best[d] = v
        for d in range(D):
            out[b, d] = best[d] if seen else np.float32(0.0)


@njit(_FUSE_SIGNATURE, parallel=True, cache=True, fastmath=False, nogil=True)
def _fuse_kernel(emb, present, has_present, weights, query, out, out_weights, has_out_weights,
                 strategy):
    B = emb.shape[0]
    M = emb.shape[1]
    D = emb.shape[2]
    inv_sqrt_d = 1.0 / math.sqrt(D) if D > 0 else 0.0
    for b in prange(B):
        if strategy == _CONCAT:
            for m in range(M):
                here = (not has_present) or present[b, m]
                for d in range(D):
                    out[b, m * D + d] = emb[b, m, d] if here else np.float32(0.0)
            continue

        if strategy == _MAX:
            best = np.full(D, -np.inf, np.float32)
            seen = False
            for m in range(M):
                if has_present and not present[b, m]:
                    continue
                seen = True
                for d in range(D):
                    v = emb[b, m, d]
                    if v > best[d] or v != v:
                        best[d] = v
            for d in range(D):
                out[b, d] = best[d] if seen else np.float32(0.0)
            continue

        # mean, sum, weighted, attention: a weighted sum with per-modality coefficients c_m
        c = np.zeros(M, np.float64)
        if strategy == _MEAN or strategy == _SUM:
            n = 0
            for m in range(M):
                if (not has_present) or present[b, m]:
                    c[m] = 1.0
                    n += 1
            if strategy == _MEAN and n > 0:
                for m in range(M):
                    c[m] /= n
        elif strategy == _WEIGHTED:
            total = 0.0
            for m in range(M):
                if (not has_present) or present[b, m]:
                    c[m] = np.float64(weights[b, m])
                    total += c[m]
            if total > 0.0:
                for m in range(M):
                    c[m] /= total
            else:
                for m in range(M):
                    c[m] = 0.0
        else:  # attention
            s = np.full(M, -np.inf, np.float64)
            smax = -np.inf
            has_nan = False
            for m in range(M):
                if has_present and not present[b, m]:
                    continue
                dot = 0.0
                for d in range(D):
                    dot += np.float64(query[b, d]) * np.float64(emb[b, m, d])
                s[m] = dot * inv_sqrt_d
                if s[m] > smax:
                    smax = s[m]
                elif s[m] != s[m]:
                    has_nan = True
            if has_nan:
                for d in range(D):
                    out[b, d] = np.nan
                if has_out_weights:
                    for m in range(M):
                        here = (not has_present) or present[b, m]
                        out_weights[b, m] = np.nan if here else np.float32(0.0)
                continue
            if smax > -np.inf:
                total = 0.0
                for m in range(M):
                    if s[m] > -np.inf:
                        c[m] = math.exp(s[m] - smax)
                        total += c[m]
                for m in range(M):
                    c[m] /= total

        if has_out_weights:
            for m in range(M):
                out_weights[b, m] = np.float32(c[m])
        acc = np.zeros(D, np.float64)
        for m in range(M):
            w = c[m]
            if w == 0.0:
                continue                          # absent or zero weight: never read
            for d in range(D):
                acc[d] += w * np.float64(emb[b, m, d])
        for d in range(D):
            out[b, d] = np.float32(acc[d])


# Numba's fallback "workqueue" threading layer aborts the process when two threads launch
# parallel kernels at once, so launches are serialized (each launch already uses every core).
_launch_lock = threading.Lock()

_DUMMY_BOOL_2 = np.ones((1, 1), np.bool_)
_DUMMY_F32_2 = np.zeros((1, 1), np.float32)


def _bool2(a):
    return _DUMMY_BOOL_2 if a is None else a


def masked_mean_numba(x, mask, out):
    """Fill ``out`` (B, D) with the mean of ``x`` (B, L, D) over the tokens where ``mask``
    (bool (B, L) or None) is True; zeros for rows without such tokens."""
    with _launch_lock:
        _masked_mean_kernel(x, _bool2(mask), mask is not None, out)


def masked_max_numba(x, mask, out):
    """Fill ``out`` (B, D) with the elementwise max of ``x`` (B, L, D) over the tokens where
    ``mask`` (bool (B, L) or None) is True; zeros for rows without such tokens."""
    with _launch_lock:
        _masked_max_kernel(x, _bool2(mask), mask is not None, out)


def fuse_numba(emb, present, weights, query, out, out_weights, *, strategy):
    """Fill ``out`` (and ``out_weights``) with the fusion of ``emb`` (B, M, D) over modalities.

    Parameters
    ----------
    emb : float32 C-contiguous array (B, M, D)
    present : bool array (B, M) or None (all present)
    weights : float32 array (B, M) or (M,), or None; used by "weighted"
    query : float32 array (B, D) or (D,), or None; used by "attention"
    out : float32 array (B, M * D) for "concat", else (B, D); written
    out_weights : float32 array (B, M) or None; written for "weighted" and "attention"
    strategy : str, one of :data:`STRATEGY_IDS`

    The arguments are expected to be validated by :func:`mmcore.ops.fuse`.
    """
    B, M, D = emb.shape
    sid = STRATEGY_IDS[strategy]
    w = _DUMMY_F32_2 if weights is None else np.broadcast_to(weights, (B, M))
    q = _DUMMY_F32_2 if query is None else np.broadcast_to(query, (B, D))
    has_ow = out_weights is not None
    with _launch_lock:
        _fuse_kernel(emb, _bool2(present), present is not None, w, q, out,
                     out_weights if has_ow else _DUMMY_F32_2, has_ow, sid)
