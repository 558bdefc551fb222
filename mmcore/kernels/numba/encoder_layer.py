"""Numba fallback for :func:`mmcore.ops.encoder_layer`: a composition of the numba kernels.

The steps of ``encoder_layer_cpu`` (``csrc/cpu/encoder_layer.cpp``) in the same order, each
with the numba kernel of its op: :func:`~.linear.layer_norm_numba`,
:func:`~.linear.linear_numba` (activation fused into the first MLP product) and
:func:`~.attention.attention_numba`; the head split / merge and the residual adds are NumPy.
Weights arrive as ``(float32 array, 0, None)``: the op dequantizes them for this backend.
"""

from __future__ import annotations

from typing import Optional

import numpy as np

from .attention import attention_numba
from .linear import layer_norm_numba, linear_numba

__all__ = ["encoder_layer_numba"]


def encoder_layer_numba(x: np.ndarray, out: np.ndarray, key_lengths: Optional[np.ndarray], *,
                        num_heads: int, weights: tuple, biases: tuple, norms: tuple,
                        eps1: float, eps2: float, activation: int, scale: float) -> None:
    """Fill ``out`` (B, L, E) with the pre-norm block of ``x`` (the arguments of
    ``mmcore._C.encoder_layer``, validated by the op; float32 weights only)."""
    B, L, E = x.shape
    H = int(num_heads)
    hd = E // H
    T = B * L
    (w_in, _, _), (w_out, _, _), (w1, _, _), (w2, _, _) = weights
    b_in, b_out, b1, b2 = biases
    ln1_w, ln1_b, ln2_w, ln2_b = norms
    F = w1.shape[0]
    x2 = x.reshape(T, E)

    # attention half
    h = np.empty((T, E), np.float32)
    layer_norm_numba(x2, ln1_w, ln1_b, h, eps=eps1)
    qkv = np.empty((T, 3 * E), np.float32)
    linear_numba(h, w_in, b_in, qkv, activation=0)
    heads = qkv.reshape(B, L, 3, H, hd).transpose(2, 0, 3, 1, 4)          # (3, B, H, L, hd)
    q, k, v = (np.ascontiguousarray(heads[i]) for i in range(3))
    o = np.empty((B, H, L, hd), np.float32)
    attention_numba(q, k, v, o, None, None, None, None, key_lengths, scale, False, 0, 0, 1.0)
    merged = np.ascontiguousarray(o.transpose(0, 2, 1, 3).reshape(T, E))
    a = np.empty((T, E), np.float32)
    linear_numba(merged, w_out, b_out, a, activation=0)
    if key_lengths is not None:               # no key to attend to: a zero attention output
        a.reshape(B, L, E)[key_lengths == 0] = 0.0
    y = out.reshape(T, E)
    np.add(x2, a, out=y)

    # MLP half
    layer_norm_numba(y, ln2_w, ln2_b, h, eps=eps2)
    m = np.empty((T, F), np.float32)
    linear_numba(h, w1, b1, m, activation=activation)
    linear_numba(m, w2, b2, a, activation=0)
    y += a
