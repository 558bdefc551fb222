"""The per-token maps of a transformer block (``mmcore.ops.linear``, ``mmcore.ops.layer_norm``).

:func:`linear` is the affine map of a fully connected layer, ``y = act(x @ weight.T + bias)``.

It is what ``torch.nn.functional.linear`` computes, over the last axis of ``x``, with the
weight in the PyTorch layout ``(out_features, in_features)``. The native kernel runs on the
library's own thread pool (see :func:`mmcore.set_num_threads`) rather than through NumPy's
BLAS, so that the small matrix products of a transformer encoder do not wake a second pool of
threads that competes with the first; each output is one float32 sum over the input features
in increasing order (fused multiply-adds where the CPU has them).
"""

from __future__ import annotations

import math
from typing import Optional, Union

import numpy as np
import numpy.typing as npt

from .. import _backend
from ..errors import ArgumentError, BackendError, ShapeError
from ..kernels import launcher
from ._checks import FLOAT_INPUT_DTYPES, check_float
from ._types import HostBackend

__all__ = ["linear", "layer_norm", "ACTIVATIONS", "QuantizedTensor"]

#: Codes of the quantized weight kinds, as the kernels number them.
WEIGHT_KIND_CODES = {"float16": 1, "bfloat16": 2, "int8": 3}


class QuantizedTensor:
    """A weight matrix kept in low precision: float16 or bfloat16 bit patterns, or int8 with
    one float32 scale per row (``w[r] = q[r] * scale[r]``).

    :func:`linear` reads it directly (widening to float32 while it packs the weight), so a
    model whose encoder weights are stored quantized holds 1/2 (float16, bfloat16) or about
    1/4 (int8) of the float32 bytes in memory. Everywhere else it behaves as the float32
    matrix it stands for: ``numpy.asarray`` dequantizes, ``copy()`` returns a float32 copy, and
    row slices (``w[a:b]``) stay quantized.

    Parameters
    ----------
    data : uint16 array (bfloat16 / float16 bits) or float16 array, or int8 array; (rows, cols)
    kind : {"float16", "bfloat16", "int8"}
    scale : float32 array (rows,), for "int8" only

    Examples
    --------
    >>> import numpy as np
    >>> from mmcore.ops.linear import QuantizedTensor
    >>> w = QuantizedTensor(np.array([[1, -2]], np.int8), "int8", scale=np.array([0.5], np.float32))
    >>> np.asarray(w), w.nbytes
    (array([[ 0.5, -1. ]], dtype=float32), 6)
    """

    __array_priority__ = 1.0

    def __init__(self, data, kind: str, scale=None):
        if not isinstance(kind, str) or kind not in WEIGHT_KIND_CODES:
            raise ArgumentError("[QuantizedTensor] kind must be one of "
                                f"{sorted(WEIGHT_KIND_CODES)}, got "
                                f"{kind!r}")
        data = np.asarray(data)
        if data.ndim != 2:
            raise ShapeError(f"[QuantizedTensor] data must have 2 dims (rows, cols), got shape "
                             f"{data.shape}")
        if kind == "int8":
            if data.dtype != np.int8:
                raise ShapeError(f"[QuantizedTensor] int8 data has dtype {data.dtype}")
            if scale is None:
                raise ArgumentError("[QuantizedTensor] int8 data needs scale (rows,)")
            scale = np.ascontiguousarray(scale, dtype=np.float32)
            if scale.shape != (data.shape[0],):
                raise ShapeError(f"[QuantizedTensor] scale has shape {scale.shape}, expected "
                                 f"({data.shape[0]},)")
        else:
            if kind == "float16" and data.dtype == np.float16:
                data = data.view(np.uint16)
            if data.dtype != np.uint16:
                raise ShapeError(f"[QuantizedTensor] {kind} data must be uint16 bit patterns, "
                                 f"got dtype {data.dtype}")
            if scale is not None:
                raise ArgumentError(f"[QuantizedTensor] scale is for int8 data, not {kind}")
        self.data = data
        self.kind = kind
        self.scale = scale

    @property
    def shape(self):
        return self.data.shape

    @property
    def ndim(self) -> int:
        return 2

    @property
    def size(self) -> int:
        return int(self.data.size)

    @property
    def dtype(self):
        """The dtype it stands for (float32)."""
        return np.dtype(np.float32)

    @property
    def nbytes(self) -> int:
        """Bytes held (data and scales)."""
        return int(self.data.nbytes + (0 if self.scale is None else self.scale.nbytes))

    def dequantize(self) -> np.ndarray:
        """The float32 matrix."""
        if self.kind == "int8":
            return self.data.astype(np.float32) * self.scale[:, None]
        if self.kind == "float16":
            return self.data.view(np.float16).astype(np.float32)
        return (self.data.astype(np.uint32) << np.uint32(16)).view(np.float32)

    def __array__(self, dtype=None, copy=None):
        a = self.dequantize()
        return a if dtype is None else a.astype(dtype)

    def copy(self) -> np.ndarray:
        return self.dequantize()

    def __getitem__(self, key):
        if isinstance(key, slice):
            return QuantizedTensor(self.data[key], self.kind,
                                   None if self.scale is None else self.scale[key])
        return self.dequantize()[key]

    def __len__(self) -> int:
        return int(self.data.shape[0])

    def __repr__(self) -> str:
        return f"QuantizedTensor({self.kind}, shape={self.shape})"

#: Activations :func:`linear` can apply to its output, and their kernel codes.
ACTIVATIONS = {None: 0, "gelu": 1, "gelu_tanh": 2, "quick_gelu": 3, "relu": 4}


def _float32(name: str, a, op: str = "linear") -> np.ndarray:
    if type(a) is np.ndarray and a.dtype == np.float32:
        return a
    try:
        a = np.asarray(a)
    except Exception as exc:
        raise ShapeError(f"[{op}] {name} cannot be converted to an array: {exc}") from None
    if a.dtype not in FLOAT_INPUT_DTYPES:
        raise ShapeError(f"[{op}] {name} has dtype {a.dtype}, expected float32 or float16 "
                         "(float64 is cast)")
    return a if a.dtype == np.float32 else a.astype(np.float32)


def _activate_numpy(y: np.ndarray, code: int) -> np.ndarray:
    """The activation of ``code`` in float64 NumPy (for outputs that need no product)."""
    v = y.astype(np.float64)
    if code == 1:
        v = 0.5 * v * (1.0 + np.vectorize(math.erf, otypes=[np.float64])(v / math.sqrt(2.0)))
    elif code == 2:
        v = 0.5 * v * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (v + 0.044715 * v ** 3)))
    elif code == 3:
        v = v / (1.0 + np.exp(-1.702 * v))
    elif code == 4:
        v = np.where(v < 0.0, 0.0, v)
    return v.astype(np.float32)


def _rows(a: np.ndarray, K: int) -> np.ndarray:
    """``a`` (R, K) as the kernel takes it: unit stride along K, rows apart by >= K."""
    size = a.itemsize
    if K and (a.strides[1] != size or (a.shape[0] > 1 and a.strides[0] < size * K)):
        return np.ascontiguousarray(a)
    return a


def linear(x: npt.ArrayLike, weight: Union[npt.ArrayLike, QuantizedTensor],
           bias: Optional[npt.ArrayLike] = None, *, activation: Optional[str] = None,
           backend: Optional[HostBackend] = None) -> np.ndarray:
    """``act(x @ weight.T + bias)`` over the last axis of ``x``.

    Parameters
    ----------
    x : array (..., in_features)
        float32 (float16 / float64 are cast); any number of leading axes.
    weight : array (out_features, in_features) or QuantizedTensor
        float32 (float16 / float64 are cast), or a :class:`QuantizedTensor` that the native
        kernel reads in place (the numba backend dequantizes it first).
    bias : array (out_features,), optional
    activation : {None, "gelu", "gelu_tanh", "quick_gelu", "relu"}, optional, keyword-only
        Applied to the result in the same pass: exact GELU (erf, PyTorch's default), its tanh
        approximation, CLIP's ``x * sigmoid(1.702 x)``, or ReLU.
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
    ArgumentError
        An unknown ``activation``.

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
    if not (activation is None or isinstance(activation, str)) or activation not in ACTIVATIONS:
        raise ArgumentError(f"[linear] activation must be one of "
                            f"{', '.join(repr(a) for a in ACTIVATIONS)}, got {activation!r}")
    act = ACTIVATIONS[activation]
    name = _backend.resolve_backend(op, [a for a in (x, weight, bias) if a is not None],
                                    backend)
    if name not in ("native", "numba"):
        raise BackendError(f"[linear] backend {name!r} is not available for linear (native "
                           "or numba)")
    xa = _float32("x", x)
    qw = weight if isinstance(weight, QuantizedTensor) else None
    if qw is not None and name != "native":
        weight, qw = qw.dequantize(), None        # qw is weight
    w = qw.data if qw is not None else _float32("weight", weight)
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
        if act and y.size:
            y = _activate_numpy(y, act)
        return y.reshape(*lead, N)
    x2 = _rows(x2, K)
    w = _rows(w, K)
    out = np.empty((x2.shape[0], N), np.float32)
    launch = launcher(op, name, "linear", "linear")
    if qw is not None:              # native only: the numba backend got the dequantized weight
        launch(x2, w, b, out, activation=act, weight_kind=WEIGHT_KIND_CODES[qw.kind],
               weight_scale=qw.scale)
    else:
        launch(x2, w, b, out, activation=act)
    return out.reshape(*lead, N)


def layer_norm(x: npt.ArrayLike, weight: Optional[npt.ArrayLike] = None,
               bias: Optional[npt.ArrayLike] = None, *, eps: float = 1e-5,
               backend: Optional[HostBackend] = None) -> np.ndarray:
    """Layer normalisation over the last axis, as ``torch.nn.functional.layer_norm(x, (D,),
    weight, bias, eps)``.

    The mean and the biased variance of every row are accumulated in float64; the result is
    ``(x - mean) / sqrt(var + eps) * weight + bias`` in float32.

    Parameters
    ----------
    x : array (..., D)
        float32 (float16 / float64 are cast).
    weight, bias : array (D,), optional
        ``bias`` needs ``weight``.
    eps : float, default 1e-5, keyword-only
        Finite and > 0 (any real number type but ``bool``; it is used in float64), else
        :class:`~mmcore.errors.ArgumentError`.
    backend : {"native", "numba"}, optional, keyword-only

    Returns
    -------
    float32 array of the shape of ``x``

    Examples
    --------
    >>> import numpy as np
    >>> from mmcore.ops import layer_norm
    >>> np.round(layer_norm(np.array([[1., 2., 3., 4.]], np.float32)), 4)
    array([[-1.3416, -0.4472,  0.4472,  1.3416]], dtype=float32)
    """
    op = "layer_norm"
    name = _backend.resolve_backend(op, [a for a in (x, weight, bias) if a is not None],
                                    backend)
    if name not in ("native", "numba"):
        raise BackendError(f"[layer_norm] backend {name!r} is not available for layer_norm "
                           "(native or numba)")
    xa = _float32("x", x, op)
    if xa.ndim < 1:
        raise ShapeError("[layer_norm] x must have at least 1 dim (..., D)")
    D = int(xa.shape[-1])
    params = []
    for pname, p in (("weight", weight), ("bias", bias)):
        if p is not None:
            p = np.ascontiguousarray(_float32(pname, p, op))
            if p.shape != (D,):
                raise ShapeError(f"[layer_norm] {pname} has shape {p.shape}, expected ({D},)")
        params.append(p)
    w, b = params
    if b is not None and w is None:
        raise ArgumentError("[layer_norm] bias needs a weight")
    # eps reaches the kernels as float64 (the variance is accumulated in float64)
    eps = check_float("eps", eps, op=op, lo=0.0, lo_open=True, float32=False)
    lead = xa.shape[:-1]
    rows = math.prod(lead)
    out = np.empty((rows, D), np.float32)
    if rows == 0 or D == 0:
        return out.reshape(xa.shape)
    x2 = _rows(xa.reshape(rows, D), D)
    launcher(op, name, "linear", "layer_norm")(x2, w, b, out, eps=float(eps))
    return out.reshape(xa.shape)
