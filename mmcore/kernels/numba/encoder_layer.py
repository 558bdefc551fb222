"""Numba fallback for :func:`mmcore.ops.encoder_layer`: a composition of the numba kernels.

The steps of ``encoder_layer_cpu`` (``csrc/cpu/encoder_layer.cpp``) in the same order, each
with the numba kernel of its op: :func:`~.linear.layer_norm_numba`,
:func:`~.linear.linear_numba` (activation fused into the first MLP product) and
:func:`~.attention.attention_numba`; the head split / merge and the residual adds are NumPy.
Weights arrive as ``(array, kind code, scale or None)`` as for the native kernel (float32, or
the bits of a quantized weight, which :func:`~.linear.linear_numba` reads); ``precision`` goes
to every product.
"""

from __future__ import annotations

from typing import Optional

import numpy as np

from .attention import attention_numba
from .linear import layer_norm_numba, linear_numba

__all__ = ["encoder_layer_numba"]


def encoder_layer_numba(x: np.ndarray, out: np.ndarray, key_lengths: Optional[np.ndarray], *,
                        num_heads: int, weights: tuple, biases: tuple, norms: tuple,
                        eps1: float, eps2: float, activation: int, scale: float,
                        precision: str = "highest") -> None:
    """Fill ``out`` (B, L, E) with the pre-norm block of ``x`` (the arguments of
    :func:`mmcore.kernels.cpu.encoder_layer`, validated by the op)."""
    B, L, E = x.shape
    H = int(num_heads)
    hd = E // H
    T = B * L
    w_in, w_out, w1, w2 = ({"weight": w, "weight_kind": kind, "weight_scale": s,
                            "precision": precision} for w, kind, s in weights)
    b_in, b_out, b1, b2 = biases
    ln1_w, ln1_b, ln2_w, ln2_b = norms
    F = w1["weight"].shape[0]
    x2 = x.reshape(T, E)

    # attention half
    h = np.empty((T, E), np.float32)
    layer_norm_numba(x2, ln1_w, ln1_b, h, eps=eps1)
    qkv = np.empty((T, 3 * E), np.float32)
    linear_numba(h, bias=b_in, out=qkv, activation=0, **w_in)
    heads = qkv.reshape(B, L, 3, H, hd).transpose(2, 0, 3, 1, 4)          # (3, B, H, L, hd)
    q, k, v = (np.ascontiguousarray(heads[i]) for i in range(3))
    o = np.empty((B, H, L, hd), np.float32)
    attention_numba(q, k, v, o, None, None, None, None, key_lengths, scale, False, 0, 0, 1.0,
                    precision=precision)
    merged = np.ascontiguousarray(o.transpose(0, 2, 1, 3).reshape(T, E))
    a = np.empty((T, E), np.float32)
    linear_numba(merged, bias=b_out, out=a, activation=0, **w_out)
    if key_lengths is not None:               # no key to attend to: a zero attention output
        a.reshape(B, L, E)[key_lengths == 0] = 0.0
    y = out.reshape(T, E)
    np.add(x2, a, out=y)

    # MLP half
    layer_norm_numba(y, ln2_w, ln2_b, h, eps=eps2)
    m = np.empty((T, F), np.float32)
    linear_numba(h, bias=b1, out=m, activation=activation, **w1)
    linear_numba(m, bias=b2, out=a, activation=0, **w2)
    y += a
