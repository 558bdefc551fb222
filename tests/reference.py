"""Float64 NumPy references for the mmcore kernels, independent of every backend.

Nothing here imports mmcore: the references restate the documented semantics directly, in the
most obvious (materialize everything, compute in float64) way.
"""

from __future__ import annotations

import math

import numpy as np

__all__ = ["dropout_bits_np", "dropout_threshold_ref", "attention_ref"]

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)


def _mix(x: np.ndarray) -> np.ndarray:
    x = x ^ (x >> np.uint64(30))
    x = x * _M1
    x = x ^ (x >> np.uint64(27))
    x = x * _M2
    x = x ^ (x >> np.uint64(31))
    return x


def dropout_bits_np(seed: int, b, h, i, j) -> np.ndarray:
    """24 random bits per element of the broadcast of the index arrays ``b, h, i, j``.

    splitmix64-chained hash of ``(seed, b, h, i, j)`` with uint64 wraparound; the top 24 bits of
    the final state.
    """
    with np.errstate(over="ignore"):
        s = np.array([int(seed) % (1 << 64)], dtype=np.uint64)
        x = _mix(s + _GOLDEN)
        for idx in (b, h, i, j):
            idx = np.asarray(idx).astype(np.uint64)
            x = _mix(x + idx * _GOLDEN)
        return (x >> np.uint64(40)).astype(np.int64)


def dropout_threshold_ref(p: float) -> int:
    """The 24-bit keep threshold: a weight is kept iff its bits are ``>=`` this value."""
    return int(math.floor(p * (1 << 24) + 0.5))


def attention_ref(q, k, v, *, mask=None, key_lengths=None, bias=None, scale=None, temperature=1.0,
                  dropout_p=0.0, seed=0):
    """Reference scaled dot-product attention in float64.

    Returns ``(out (B, H, Lq, Dv), weights (B, H, Lq, Lk), lse (B, H, Lq))``; ``weights`` are
    after dropout (``out == weights @ v``), ``lse`` is the natural log-sum-exp of the masked
    scores before dropout, ``-inf`` for rows with no attendable key (those rows give zeros).
    Keys past ``key_lengths`` never matter, whatever they hold, nor does ``k`` of a masked key;
    a NaN score of an attendable key makes its whole row NaN; ``out`` is ``weights @ v`` in IEEE
    arithmetic over the keys before ``key_lengths`` (NaN in ``v`` reaches non-empty rows even at
    weight 0, as in PyTorch's SDPA).
    """
    q = np.asarray(q, dtype=np.float64)
    k = np.asarray(k, dtype=np.float64)
    v = np.asarray(v, dtype=np.float64)
    B, H, Lq, D = q.shape
    Lk = k.shape[2]
    full = (B, H, Lq, Lk)
    if scale is None:
        scale = 1.0 / math.sqrt(D)
    eff = float(scale) / float(temperature)

    scores = np.matmul(q, np.swapaxes(k, -1, -2)) * eff
    if bias is not None:
        scores = scores + np.broadcast_to(np.asarray(bias, dtype=np.float64), full)
    allowed = np.ones(full, dtype=bool)
    if mask is not None:
        allowed &= np.broadcast_to(np.asarray(mask, dtype=bool), full)
    if key_lengths is not None:
        kl = np.asarray(key_lengths).astype(np.int64).reshape(B, 1, 1, 1)
        allowed &= np.arange(Lk).reshape(1, 1, 1, Lk) < kl
    allowed &= ~np.isneginf(scores)                         # NaN scores stay and propagate
    s = np.where(allowed, scores, -np.inf)

    if Lk > 0:
        row_max = s.max(axis=-1, keepdims=True)
    else:
        row_max = np.full(full[:3] + (1,), -np.inf)
    empty = row_max == -np.inf                              # (B, H, Lq, 1)
    safe_max = np.where(empty, 0.0, row_max)
    e = np.where(allowed, np.exp(s - safe_max), 0.0)
    total = e.sum(axis=-1, keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        w = np.where(empty, 0.0, e / np.where(empty, 1.0, total))
        lse = np.where(empty, -np.inf, safe_max + np.log(np.where(empty, 1.0, total)))[..., 0]

    if dropout_p > 0:
        thr = dropout_threshold_ref(dropout_p)
        if thr > 0:
            bb, hh, ii, jj = np.meshgrid(np.arange(B), np.arange(H), np.arange(Lq), np.arange(Lk),
                                         indexing="ij", sparse=True)
            keep = dropout_bits_np(seed, bb, hh, ii, jj) >= thr
            w = np.where(keep, w * (1.0 / (1.0 - dropout_p)), 0.0)
    # a NaN score poisons its whole row (weights, lse, out)
    w = np.where(np.isnan(row_max), np.nan, w)

    # out = weights @ v in IEEE arithmetic over the keys before key_lengths (a NaN in v there
    # reaches every non-empty row, even at weight 0); keys past key_lengths are never read.
    v_used = v
    if key_lengths is not None:
        kl_v = np.asarray(key_lengths).astype(np.int64).reshape(B, 1, 1, 1)
        v_used = np.where(np.arange(Lk).reshape(1, 1, Lk, 1) < kl_v, v, 0.0)
    with np.errstate(invalid="ignore"):
        out = np.matmul(w, v_used)
    out = np.where(empty, 0.0, out)
    return out, w, lse
