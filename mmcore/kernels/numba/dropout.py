"""The attention dropout mask as a pure function of ``(seed, b, h, i, j)``.

This is the same function as ``mmcore::dropout_bits`` in ``csrc/include/mmcore/dropout.h`` (and
the NumPy version in ``tests/reference.py``), so every backend draws the same mask. All arithmetic
is on ``uint64`` with wraparound; every operand is kept ``np.uint64`` so that Numba never promotes
to float.

Examples
--------
>>> from mmcore.kernels.numba.dropout import dropout_bits
>>> 0 <= dropout_bits(123, 0, 1, 2, 3) < 2 ** 24
True
"""

from __future__ import annotations

import numpy as np
from numba import njit

__all__ = ["splitmix64_mix", "dropout_bits", "dropout_keep"]

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)
_S30 = np.uint64(30)
_S27 = np.uint64(27)
_S31 = np.uint64(31)
_S40 = np.uint64(40)


@njit(cache=True, nogil=True)
def splitmix64_mix(x):
    """The splitmix64 finalizer on a ``uint64``."""
    x = np.uint64(x)
    x ^= x >> _S30
    x *= _M1
    x ^= x >> _S27
    x *= _M2
    x ^= x >> _S31
    return x


@njit(cache=True, nogil=True)
def dropout_bits(seed, b, h, i, j):
    """24 random bits (an ``int64`` in ``[0, 2**24)``) for attention weight ``(b, h, i, j)``.

    ``seed`` is taken modulo ``2**64``; ``b, h, i, j`` are non-negative indices.
    """
    x = splitmix64_mix(np.uint64(seed) + _GOLDEN)
    x = splitmix64_mix(x + np.uint64(b) * _GOLDEN)
    x = splitmix64_mix(x + np.uint64(h) * _GOLDEN)
    x = splitmix64_mix(x + np.uint64(i) * _GOLDEN)
    x = splitmix64_mix(x + np.uint64(j) * _GOLDEN)
    return np.int64(x >> _S40)


@njit(cache=True, nogil=True)
def dropout_keep(seed, b, h, i, j, threshold):
    """True when weight ``(b, h, i, j)`` survives dropout with the 24-bit ``threshold``."""
    return dropout_bits(seed, b, h, i, j) >= np.int64(threshold)
