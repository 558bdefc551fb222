"""Numba fallback for :func:`mmcore.ops.attention`.

The public op validates every argument, casts ``q``, ``k`` and ``v`` to C-contiguous float32 and
allocates the outputs; :func:`attention_numba` fills them. It is written independently of the C++
kernel (one query row per parallel task, exact two-pass softmax in float64) so that the two can be
held against each other in the tests.

Semantics, per query row ``(b, h, i)``:

* ``s_j = (q_i . k_j) * eff_scale + bias_ij`` for the attendable keys ``j``: ``j < key_lengths[b]``,
  ``mask_ij`` True and ``s_j > -inf`` (a ``-inf`` bias excludes a key).
* ``w_j = exp(s_j - max s) / sum exp(s - max s)``, ``lse = log sum exp(s)`` (before dropout).
* Dropout keeps ``w_j`` iff ``dropout_bits(seed, b, h, i, j) >= threshold`` and multiplies kept
  weights by ``drop_scale``; dropped weights are 0.
* ``out_i = sum_j w_j v_j`` with the weights after dropout, so ``out == weights @ v``.
* A row without attendable keys gives ``out = 0``, ``weights = 0`` and ``lse = -inf``.
* NaN is never hidden: a NaN score of an attendable key (NaN in ``q`` or in an attended ``k``)
  makes the whole row NaN. ``out`` is ``weights @ v`` in IEEE arithmetic over the keys
  ``j < key_lengths[b]``: a NaN or Inf in ``v`` there reaches every non-empty row of that
  ``(b, h)``, even where its weight is 0 (masked or dropped), as in PyTorch's SDPA. Keys past
  ``key_lengths`` are never read, and a masked key's ``k`` never matters.

Under the matmul precision ``"bf16"`` (:mod:`mmcore._precision`) ``q``, ``k`` and ``v`` are
rounded to bfloat16 before the kernel runs; the softmax numerators are not rounded here (only
the native kernel rounds them before ``P @ v``). ``"int8"`` computes as ``"highest"``.
"""

from __future__ import annotations

import math
import threading

import numpy as np
from numba import njit, prange, types

from .dropout import dropout_bits
from .precision import bf16_round

__all__ = ["attention_numba"]

_f32c4 = types.Array(types.float32, 4, "C")
_f32c4_ro = types.Array(types.float32, 4, "C", readonly=True)
_f32c3 = types.Array(types.float32, 3, "C")
_f32a4_ro = types.Array(types.float32, 4, "A", readonly=True)
_b1a4_ro = types.Array(types.boolean, 4, "A", readonly=True)
_i64c1_ro = types.Array(types.int64, 1, "C", readonly=True)

# One compiled signature for every call: C/A layouts, writable or read-only inputs all convert
# safely to these types, so a broadcast mask never triggers a second compilation.
_SIGNATURE = types.void(
    _f32c4_ro, _f32c4_ro, _f32c4_ro,          # q, k, v
    _f32c4,                                   # out
    _f32c4, types.boolean,                    # weights, has_weights
    _f32c3, types.boolean,                    # lse, has_lse
    _b1a4_ro, types.boolean,                  # mask, has_mask
    _f32a4_ro, types.boolean,                 # bias, has_bias
    _i64c1_ro, types.boolean,                 # key_lengths, has_key_lengths
    types.float64,                            # eff_scale
    types.boolean, types.uint64, types.int64, types.float64,  # dropout, seed, threshold, scale
)


@njit(_SIGNATURE, parallel=True, cache=True, fastmath=False, nogil=True)
def _attention_kernel(q, k, v, out, weights, has_weights, lse, has_lse, mask, has_mask,
                      bias, has_bias, key_lengths, has_key_lengths, eff_scale,
                      use_dropout, seed, threshold, drop_scale):
    B = q.shape[0]
    H = q.shape[1]
    Lq = q.shape[2]
    D = q.shape[3]
    Lk = k.shape[2]
    Dv = v.shape[3]
    neg_inf = -np.inf
    rows = B * H * Lq
    for r in prange(rows):
        b = r // (H * Lq)
        rem = r - b * (H * Lq)
        h = rem // Lq
        i = rem - h * Lq

        n = Lk
        if has_key_lengths:
            n = min(max(key_lengths[b], 0), Lk)

        s = np.empty(Lk, np.float64)
        row_max = neg_inf
        has_nan = False
        for j in range(n):
            if has_mask and not mask[b, h, i, j]:
                s[j] = neg_inf
                continue
            acc = 0.0
            for d in range(D):
                acc += np.float64(q[b, h, i, d]) * np.float64(k[b, h, j, d])
            sc = acc * eff_scale
            if has_bias:
                sc += np.float64(bias[b, h, i, j])
            s[j] = sc
            if sc > row_max:
                row_max = sc
            elif sc != sc:
                has_nan = True
        for j in range(n, Lk):
            s[j] = neg_inf

        if has_nan:
            # A NaN score (NaN in q or an attended key) poisons the whole row, as in
            # any softmax; it is never hidden as a masked key.
            for d in range(Dv):
                out[b, h, i, d] = np.nan
            if has_weights:
                for j in range(Lk):
                    weights[b, h, i, j] = np.nan
            if has_lse:
                lse[b, h, i] = np.nan
            continue

        if row_max == neg_inf:
            # No key to attend to: zeros, -inf, never NaN.
            for d in range(Dv):
                out[b, h, i, d] = 0.0
            if has_weights:
                for j in range(Lk):
                    weights[b, h, i, j] = 0.0
            if has_lse:
                lse[b, h, i] = neg_inf
            continue

        total = 0.0
        for j in range(n):
            if s[j] == neg_inf:
                s[j] = 0.0
            else:
                e = math.exp(s[j] - row_max)
                s[j] = e
                total += e
        for j in range(n, Lk):
            s[j] = 0.0
        if has_lse:
            lse[b, h, i] = np.float32(row_max + math.log(total))

        inv = 1.0 / total
        for j in range(n):
            w = s[j] * inv
            if use_dropout and w != 0.0:
                if dropout_bits(seed, b, h, i, j) >= threshold:
                    w *= drop_scale
                else:
                    w = 0.0
            s[j] = w
        if has_weights:
            for j in range(Lk):
                weights[b, h, i, j] = np.float32(s[j])

        acc_v = np.zeros(Dv, np.float64)
        for j in range(n):
            w = s[j]
            for d in range(Dv):
                acc_v[d] += w * np.float64(v[b, h, j, d])
        for d in range(Dv):
            out[b, h, i, d] = np.float32(acc_v[d])


# Numba's fallback "workqueue" threading layer aborts the process when two threads launch
# parallel kernels at once, so launches are serialized (each launch already uses every core).
_launch_lock = threading.Lock()

_DUMMY_F32_4 = np.zeros((1, 1, 1, 1), np.float32)
_DUMMY_F32_3 = np.zeros((1, 1, 1), np.float32)
_DUMMY_BOOL_4 = np.ones((1, 1, 1, 1), np.bool_)
_DUMMY_I64_1 = np.zeros(1, np.int64)


def attention_numba(q, k, v, out, weights, lse, mask_v, bias_v, kl, eff_scale,
                    use_dropout, seed_i, threshold, drop_scale, *, precision="highest"):
    """Fill ``out`` (and ``weights``, ``lse`` when given) with attention of ``q`` over ``k, v``.

    Parameters
    ----------
    q, k, v : float32 C-contiguous arrays (B, H, Lq, D), (B, H, Lk, D), (B, H, Lk, Dv)
    out : float32 array (B, H, Lq, Dv), written
    weights : float32 array (B, H, Lq, Lk) or None, written with the weights after dropout
    lse : float32 array (B, H, Lq) or None, written with the log-sum-exp before dropout
    mask_v : bool array of shape (B, H, Lq, Lk) (any strides, e.g. a broadcast view) or None
    bias_v : float32 array of shape (B, H, Lq, Lk) (any strides) or None
    kl : int64 array (B,) of key lengths in ``[0, Lk]`` or None
    eff_scale : float, ``scale / temperature``
    use_dropout : bool
    seed_i : int, dropout seed (taken modulo ``2**64``)
    threshold : int, 24-bit keep threshold (see :func:`mmcore.ops.attention.dropout_threshold`)
    drop_scale : float, factor for kept weights, ``1 / (1 - p)``
    precision : {"highest", "bf16", "int8"}, keyword-only; "bf16" rounds q, k and v to bfloat16

    The arguments are expected to be validated by :func:`mmcore.ops.attention`.
    """
    if precision == "bf16":
        q, k, v = bf16_round(q), bf16_round(k), bf16_round(v)
    has_weights = weights is not None
    has_lse = lse is not None
    has_mask = mask_v is not None
    has_bias = bias_v is not None
    has_kl = kl is not None
    if has_mask and mask_v.dtype != np.bool_:
        mask_v = mask_v.astype(np.bool_)
    if has_bias and bias_v.dtype != np.float32:
        bias_v = bias_v.astype(np.float32)
    if has_kl and (kl.dtype != np.int64 or not kl.flags.c_contiguous):
        kl = np.ascontiguousarray(kl, dtype=np.int64)
    args = (
        q, k, v, out,
        weights if has_weights else _DUMMY_F32_4, has_weights,
        lse if has_lse else _DUMMY_F32_3, has_lse,
        mask_v if has_mask else _DUMMY_BOOL_4, has_mask,
        bias_v if has_bias else _DUMMY_F32_4, has_bias,
        kl if has_kl else _DUMMY_I64_1, has_kl,
        float(eff_scale),
        bool(use_dropout), np.uint64(int(seed_i) % (1 << 64)), int(threshold), float(drop_scale),
    )
    with _launch_lock:
        _attention_kernel(*args)
