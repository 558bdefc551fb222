"""The affine map of a fully connected layer: ``y = x @ weight.T + bias`` (``mmcore.ops.linear``).

It is what ``torch.nn.functional.linear`` computes, over the last axis of ``x``, with the
weight in the PyTorch layout ``(out_features, in_features)``. The native kernel runs on the
library's own thread pool (see :func:`mmcore.set_num_threads`) rather than through NumPy's
BLAS, so that the small matrix products of a transformer encoder do not wake a second pool of
threads that competes with the first; each output is one float32 sum over the input features
in increasing order (fused multiply-adds where the CPU has them).
"""

from __future__ import annotations

import math

import numpy as np

from .. import _backend
from ..errors import BackendError, ShapeError
from ._checks import FLOAT_INPUT_DTYPES

__all__ = ["linear"]


def _float32(name: str, a) -> np.ndarray:
    if type(a) is np.ndarray and a.dtype == np.float32:
        return a
    try:
        a = np.asarray(a)
    except Exception as exc:
        raise ShapeError(f"[linear] {name} cannot be converted to an array: {exc}") from None
    if a.dtype not in FLOAT_INPUT_DTYPES:
        raise ShapeError(f"[linear] {name} has dtype {a.dtype}, expected float32 or float16 "
                         "(float64 is cast)")
    return a if a.dtype == np.float32 else a.astype(np.float32)


def _rows(a: np.ndarray, K: int) -> np.ndarray:
    """``a`` (R, K) as the kernel takes it: unit stride along K, rows apart by >= K."""
    if K and (a.strides[1] != 4 or (a.shape[0] > 1 and a.strides[0] < 4 * K)):
        return np.ascontiguousarray(a)
    return a


def linear(x, weight, bias=None, *, backend=None) -> np.ndarray:
    """``x @ weight.T + bias`` over the last axis of ``x``.

    Parameters
    ----------
    x : array (..., in_features)
        float32 (float16 / float64 are cast); any number of leading axes.
    weight : array (out_features, in_features)
    bias : array (out_features,), optional
    backend : {"native", "numba"}, optional, keyword-only
        Default: the active backend (:func:`mmcore.use_backend`).

    Returns
    -------
    float32 array (..., out_features)

    Raises
    ------
    ShapeError
        Wrong ranks, mismatched feature sizes, or non-float dtypes (the message names the
        argument).

    Examples
    --------
    >>> import numpy as np
    >>> from mmcore.ops import linear
    >>> x = np.ones((2, 3), np.float32)
    >>> w = np.arange(12, dtype=np.float32).reshape(4, 3)
    >>> linear(x, w, np.ones(4, np.float32))
    array([[ 4., 13., 22., 31.],
           [ 4., 13., 22., 31.]], dtype=float32)
    """
    op = "linear"
    name = _backend.resolve_backend(op, [a for a in (x, weight, bias) if a is not None],
                                    backend)
    if name not in ("native", "numba"):
        raise BackendError(f"[linear] backend {name!r} is not available for linear (native "
                           "or numba)")
    xa = _float32("x", x)
    w = _float32("weight", weight)
    if xa.ndim < 1:
        raise ShapeError("[linear] x must have at least 1 dim (..., in_features)")
    if w.ndim != 2:
        raise ShapeError(f"[linear] weight has {w.ndim} dims, expected 2 "
                         "(out_features, in_features)")
    N, K = (int(n) for n in w.shape)
    if xa.shape[-1] != K:
        raise ShapeError(f"[linear] x has {xa.shape[-1]} features in its last axis, but weight "
                         f"has in_features={K}")
    b = None
    if bias is not None:
        b = np.ascontiguousarray(_float32("bias", bias))
        if b.shape != (N,):
            raise ShapeError(f"[linear] bias has shape {b.shape}, expected ({N},)")
    lead = xa.shape[:-1]
    x2 = xa.reshape(math.prod(lead), K)
    if x2.shape[0] == 0 or N == 0 or K == 0:      # nothing to multiply: zeros (+ bias)
        y = np.zeros((x2.shape[0], N), np.float32)
        if b is not None:
            y += b
        return y.reshape(*lead, N)
    x2 = _rows(x2, K)
    w = _rows(w, K)
    out = np.empty((x2.shape[0], N), np.float32)
    if name == "native":
        C = _backend.native_module()
        if not hasattr(C, "linear"):
            raise BackendError("[linear] this build of mmcore._C has no linear kernel: rebuild "
                               "mmcore (`pip install .`) or use backend='numba'")
        C.linear(x2, w, b, out, num_threads=_backend.get_num_threads())
    else:
        from .._numba.linear import linear_numba
        linear_numba(np.ascontiguousarray(x2), np.ascontiguousarray(w),
                     np.zeros(N, np.float32) if b is None else b, out)
    return out.reshape(*lead, N)
