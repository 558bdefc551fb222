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
import threading
from typing import Any, Dict, Optional, Tuple, Union

import numpy as np
import numpy.typing as npt

from .. import _backend
from .._precision import PRECISIONS, resolve_precision
from ..errors import ArgumentError, BackendError, ShapeError
from ..kernels import launcher
from ..kernels.cpu import PACKED
from ._checks import FLOAT_INPUT_DTYPES, check_float
from ._types import HostBackend

__all__ = ["linear", "layer_norm", "ACTIVATIONS", "QuantizedTensor", "PackedWeight",
           "pack_weight", "INT8_MAX_IN_FEATURES"]

#: Codes of the quantized weight kinds, as the kernels number them.
WEIGHT_KIND_CODES = {"float16": 1, "bfloat16": 2, "int8": 3}

#: The most input features a product takes under the "int8" precision (its int32 sums of
#: products of at most 255 * 127 cannot overflow).
INT8_MAX_IN_FEATURES = 65536


def _unwritable(a: np.ndarray) -> bool:
    """Whether no one can ever write the memory of ``a``: read-only arrays down to a ``bytes``
    object (``numpy.frombuffer`` of bytes, as :func:`mmcore.model.nn.frozen_array` makes)."""
    base: Any = a
    while isinstance(base, np.ndarray):
        if base.flags.writeable:
            return False
        base = base.base
    return isinstance(base, bytes)


def _frozen_copy(a: np.ndarray) -> np.ndarray:
    """``a`` C-contiguous in memory that can never be written (over ``bytes``): ``a`` itself
    when it already is, else a copy."""
    if a.flags.c_contiguous and _unwritable(a):
        return a
    c = np.ascontiguousarray(a)
    return np.frombuffer(c.tobytes(), dtype=c.dtype).reshape(c.shape)


class _PackCache:
    """Native packs of one immutable weight, one per precision, made on first use (thread-safe).

    ``make(precision)`` makes one; the lock is held while it runs, so that two threads asking
    for the same precision pack once."""

    def __init__(self) -> None:
        self.packs: Dict[str, Any] = {}
        self.lock = threading.Lock()

    def get(self, precision: str, make: Any) -> Any:
        pack = self.packs.get(precision)
        if pack is None:
            with self.lock:
                pack = self.packs.get(precision)
                if pack is None:
                    pack = make(precision)
                    self.packs[precision] = pack
        return pack

    def nbytes(self) -> int:
        return sum(int(p.nbytes) for p in list(self.packs.values()))


def _native_pack(data: np.ndarray, kind: int, scale: Optional[np.ndarray], precision: str,
                 op: str) -> Any:
    """``mmcore._C.pack_weight`` of a weight as the kernels take it (``kind`` 0 = float32)."""
    K = int(data.shape[1])
    check_int8_features(op, K, precision)
    return launcher(op, "native", "linear", "pack_weight")(
        _rows(data, K), scale, weight_kind=kind, precision=precision)


class QuantizedTensor:
    """A weight matrix kept in low precision: float16 or bfloat16 bit patterns, or int8 with
    one float32 scale per row (``w[r] = q[r] * scale[r]``).

    :func:`linear` reads it directly (widening to float32 while it packs the weight), so a
    model whose encoder weights are stored quantized holds 1/2 (float16, bfloat16) or about
    1/4 (int8) of the float32 bytes in memory. Everywhere else it behaves as the float32
    matrix it stands for: ``numpy.asarray`` dequantizes, ``copy()`` returns a float32 copy, and
    row slices (``w[a:b]``) stay quantized.

    It is immutable: its arrays must not change after it is made. The native :func:`linear`
    packs it once per precision and keeps the pack (:meth:`packed`) when it is :attr:`frozen`,
    its arrays marked read-only (as a model marks its weights); otherwise it packs it in every
    call, so that a change through its arrays is never missed. Under ``"highest"`` a float16 /
    bfloat16 weight is widened once, so that it runs as fast as a float32 one (its pack holds
    float32 values: twice the bytes of the float16 matrix), while an int8 weight is read in
    place (widened in every call) so that it stays small in memory.

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
        self._packs = _PackCache()

    def __getstate__(self) -> Dict[str, Any]:
        state = dict(self.__dict__)
        state.pop("_packs", None)           # native packs are made again on first use
        return state

    def __setstate__(self, state: Dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._packs = _PackCache()

    @property
    def frozen(self) -> bool:
        """Whether its arrays are marked read-only: then its native packs are kept (the
        memory they view must not change either, as for any QuantizedTensor)."""
        return not self.data.flags.writeable and (self.scale is None
                                                  or not self.scale.flags.writeable)

    def packed(self, precision: Optional[str] = None) -> Any:
        """The ``mmcore._C.PackedWeight`` of this weight for ``precision`` (default: the
        current one, :func:`mmcore.get_matmul_precision`), the one the native :func:`linear`
        reads. Made once and kept when :attr:`frozen`, else made anew.

        Examples
        --------
        >>> import numpy as np
        >>> from mmcore.ops.linear import QuantizedTensor
        >>> q = np.array([[1, -2], [3, 4]], np.int8); q.flags.writeable = False
        >>> s = np.array([0.5, 0.25], np.float32); s.flags.writeable = False
        >>> w = QuantizedTensor(q, "int8", scale=s)
        >>> w.frozen, w.packed("int8") is w.packed("int8"), w.packed("int8").shape
        (True, True, (2, 2))
        """
        prec = resolve_precision("QuantizedTensor.packed", precision)
        if self.frozen:
            return self._packs.get(prec, self._make_pack)
        return self._make_pack(prec)

    def _make_pack(self, precision: str) -> Any:
        return _native_pack(self.data, WEIGHT_KIND_CODES[self.kind], self.scale, precision,
                            "QuantizedTensor.packed")

    @property
    def packed_nbytes(self) -> int:
        """Bytes held by its cached native packs (0 before any is made)."""
        return self._packs.nbytes()

    @property
    def shape(self) -> Tuple[int, ...]:
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


def _frozen_source(w: Union[np.ndarray, QuantizedTensor]) -> Union[np.ndarray, QuantizedTensor]:
    """``w`` in memory that can never be written (a frozen QuantizedTensor): copied unless it
    already is."""
    if isinstance(w, QuantizedTensor):
        return QuantizedTensor(_frozen_copy(w.data), w.kind,
                               None if w.scale is None else _frozen_copy(w.scale))
    return _frozen_copy(w)


class PackedWeight:
    """A linear weight (out_features, in_features) that the native :func:`linear` reads packed:
    packed once per precision, on first use, instead of on every call.

    The native matrix product reads its weight in panels of a layout of its own; given a plain
    array it packs the weight into that layout on every call. A ``PackedWeight`` keeps one
    ``mmcore._C.PackedWeight`` per precision (float32 panels for ``"highest"``, bfloat16-rounded
    ones for ``"bf16"``, int8 pairs with their row scales for ``"int8"``), made on the first
    call that needs it (thread-safe; :meth:`packed` makes one ahead of time). Results are those
    of the plain weight under the same precision.

    It copies its source when made, into memory that cannot be written: a change to the array
    it was made from does not reach it, so a cached pack is never stale (make a new
    ``PackedWeight`` for new values). Only an array that can never be written already (read-only
    over a ``bytes`` object, as a model's frozen parameters) is shared instead of copied. The
    numba backend reads the source.

    Parameters
    ----------
    weight : array (out_features, in_features) or QuantizedTensor
        float32 (float16 / float64 are cast), or a :class:`QuantizedTensor` (kept quantized: an
        int8 one keeps its own scales under ``"int8"``).

    Raises
    ------
    ShapeError
        ``weight`` is not a 2-D float array (the message names it).

    Examples
    --------
    >>> import numpy as np
    >>> from mmcore.ops import PackedWeight, linear
    >>> w = np.arange(6, dtype=np.float32).reshape(2, 3)
    >>> pw = PackedWeight(w)
    >>> pw.shape, pw.cached_precisions
    ((2, 3), ())
    >>> linear(np.ones((1, 3), np.float32), pw)
    array([[ 3., 12.]], dtype=float32)
    >>> w[:] = 0                                  # the PackedWeight holds its own copy
    >>> linear(np.ones((1, 3), np.float32), pw), pw.cached_precisions
    (array([[ 3., 12.]], dtype=float32), ('highest',))
    """

    __array_priority__ = 1.0

    def __init__(self, weight: Union[npt.ArrayLike, QuantizedTensor, "PackedWeight"]):
        op = "PackedWeight"
        if isinstance(weight, PackedWeight):
            self._source = weight.source                 # immutable already: shared
        elif isinstance(weight, QuantizedTensor):
            self._source = _frozen_source(weight)
        else:
            a = _float32("weight", weight, op)
            if a.ndim != 2:
                raise ShapeError(f"[{op}] weight has {a.ndim} dims, expected 2 "
                                 "(out_features, in_features)")
            self._source = _frozen_source(a)
        self._packs = _PackCache()

    def __getstate__(self) -> Dict[str, Any]:
        return {"source": self._source}

    def __setstate__(self, state: Dict[str, Any]) -> None:
        # unpickled arrays are writable: copied into unwritable memory again
        self._source = _frozen_source(state["source"])
        self._packs = _PackCache()

    @property
    def source(self) -> Union[np.ndarray, QuantizedTensor]:
        """The weight it packs: a read-only float32 array, or a frozen :class:`QuantizedTensor`
        (a copy of the one it was made from)."""
        return self._source

    @property
    def kind(self) -> str:
        """``"float32"``, or the kind of its :class:`QuantizedTensor` source."""
        src = self._source
        return src.kind if isinstance(src, QuantizedTensor) else "float32"

    @property
    def shape(self) -> Tuple[int, int]:
        """``(out_features, in_features)``."""
        n, k = self._source.shape
        return int(n), int(k)

    @property
    def ndim(self) -> int:
        return 2

    @property
    def dtype(self) -> np.dtype:
        """The dtype it stands for (float32)."""
        return np.dtype(np.float32)

    @property
    def nbytes(self) -> int:
        """Bytes held: the source and the cached packs."""
        return int(self._source.nbytes) + self._packs.nbytes()

    @property
    def cached_precisions(self) -> Tuple[str, ...]:
        """The precisions it holds a native pack for, in the order of
        :data:`mmcore._precision.PRECISIONS`."""
        return tuple(p for p in PRECISIONS if p in self._packs.packs)

    def packed(self, precision: Optional[str] = None) -> Any:
        """The ``mmcore._C.PackedWeight`` for ``precision`` (default: the current one,
        :func:`mmcore.get_matmul_precision`), made on first use and kept.

        Examples
        --------
        >>> import numpy as np
        >>> from mmcore.ops import PackedWeight
        >>> pw = PackedWeight(np.ones((4, 8), np.float32))
        >>> p = pw.packed("bf16")
        >>> p.shape, p.precision, pw.packed("bf16") is p
        ((4, 8), 'bf16', True)
        """
        prec = resolve_precision("PackedWeight.packed", precision)
        return self._packs.get(prec, self._make_pack)

    def _make_pack(self, precision: str) -> Any:
        src = self._source
        if isinstance(src, QuantizedTensor):
            return _native_pack(src.data, WEIGHT_KIND_CODES[src.kind], src.scale, precision,
                                "PackedWeight.packed")
        return _native_pack(src, 0, None, precision, "PackedWeight.packed")

    def operand(self) -> Tuple[np.ndarray, int, Optional[np.ndarray]]:
        """The source as the kernels take a weight: ``(array, kind code, scale or None)``,
        kind 0 for float32 and :data:`WEIGHT_KIND_CODES` otherwise."""
        src = self._source
        if isinstance(src, QuantizedTensor):
            return src.data, WEIGHT_KIND_CODES[src.kind], src.scale
        return src, 0, None

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        src = self._source
        a = src.dequantize() if isinstance(src, QuantizedTensor) else np.array(src)
        return a if dtype is None else a.astype(dtype)

    def __len__(self) -> int:
        return self.shape[0]

    def __repr__(self) -> str:
        return (f"PackedWeight({self.kind}, shape={self.shape}, "
                f"packed={list(self.cached_precisions)})")


def pack_weight(weight: Union[npt.ArrayLike, QuantizedTensor], *,
                precision: Optional[str] = None) -> PackedWeight:
    """A :class:`PackedWeight` of ``weight``, packed now for ``precision`` (default: the
    current one, :func:`mmcore.get_matmul_precision`); other precisions are packed on first use.

    Parameters
    ----------
    weight : array (out_features, in_features) or QuantizedTensor
        Copied (see :class:`PackedWeight`).
    precision : {"highest", "bf16", "int8"}, optional, keyword-only

    Returns
    -------
    PackedWeight

    Raises
    ------
    ShapeError
        ``weight`` is not a 2-D float array, or has more than 65536 in_features under
        ``"int8"``.
    ArgumentError
        An unknown ``precision``.

    Examples
    --------
    >>> import numpy as np
    >>> from mmcore.ops import linear, pack_weight
    >>> pw = pack_weight(np.eye(3, dtype=np.float32), precision="int8")
    >>> pw.cached_precisions
    ('int8',)
    >>> linear(np.array([[0.5, -1.0, 2.0]], np.float32), pw, precision="int8")
    array([[ 0.49411768, -1.        ,  2.        ]], dtype=float32)
    """
    prec = resolve_precision("pack_weight", precision)
    pw = PackedWeight(weight)
    check_int8_features("pack_weight", pw.shape[1], prec)
    pw.packed(prec)
    return pw

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


#: A weight as :func:`linear` and :func:`~mmcore.ops.encoder_layer` take it.
Weight = Union[npt.ArrayLike, QuantizedTensor, PackedWeight]

#: A weight as the launchers take it: (array or native pack, kind code, scale or None).
WeightOperand = Tuple[Any, int, Optional[np.ndarray]]


def weight_operand(value: Union[np.ndarray, QuantizedTensor, PackedWeight], backend: str,
                   precision: str) -> WeightOperand:
    """The launcher arguments of a checked weight on ``backend`` under ``precision``.

    ``native``: the cached pack of a :class:`PackedWeight`, or of a frozen
    :class:`QuantizedTensor` (kind :data:`~mmcore.kernels.cpu.PACKED`; float16 / bfloat16 ones
    under ``"highest"`` too, widened once at the memory cost of a float32 pack, int8 ones under
    ``"bf16"`` / ``"int8"`` only); otherwise the arrays themselves (float32 with kind 0, or the
    quantized data with its kind code and scale), which the kernels read in place. ``numba``:
    always the arrays (of a PackedWeight, its source).
    """
    if isinstance(value, PackedWeight):
        if backend == "native":
            return value.packed(precision), PACKED, None
        data, kind, scale = value.operand()
        return data, kind, scale
    if isinstance(value, QuantizedTensor):
        # int8 weights stay int8 in memory under "highest" (widened per call); float16 and
        # bfloat16 ones are widened once, so they are never slower than float32 ones
        widen_once = precision != "highest" or value.kind != "int8"
        if backend == "native" and value.frozen and widen_once:
            return value.packed(precision), PACKED, None
        return _rows(value.data, int(value.shape[1])), WEIGHT_KIND_CODES[value.kind], value.scale
    return value, 0, None


def check_int8_features(op: str, K: int, precision: str) -> None:
    """A ShapeError when ``precision`` is "int8" and ``K`` exceeds :data:`INT8_MAX_IN_FEATURES`."""
    if precision == "int8" and K > INT8_MAX_IN_FEATURES:
        raise ShapeError(f"[{op}] in_features = {K}: precision 'int8' takes at most "
                         f"{INT8_MAX_IN_FEATURES} (its int32 sums could overflow)")


def linear(x: npt.ArrayLike, weight: Weight, bias: Optional[npt.ArrayLike] = None, *,
           activation: Optional[str] = None, precision: Optional[str] = None,
           backend: Optional[HostBackend] = None) -> np.ndarray:
    """``act(x @ weight.T + bias)`` over the last axis of ``x``.

    Parameters
    ----------
    x : array (..., in_features)
        float32 (float16 / float64 are cast); any number of leading axes.
    weight : array (out_features, in_features), QuantizedTensor or PackedWeight
        float32 (float16 / float64 are cast), a :class:`QuantizedTensor` that the native
        kernel reads in place (the numba backend widens it to float32 first), or a
        :class:`PackedWeight`, whose pack for the call's precision the native kernel reads (the
        numba backend reads its source).
    bias : array (out_features,), optional
    activation : {None, "gelu", "gelu_tanh", "quick_gelu", "relu"}, optional, keyword-only
        Applied to the result in the same pass: GELU (the erf form, PyTorch's default), its tanh
        approximation, CLIP's ``x * sigmoid(1.702 x)``, or ReLU. The native kernel evaluates
        them with vector code as PyTorch's CPU kernels do (erf of Abramowitz & Stegun 7.1.26,
        exp through a degree-6 polynomial): within 1e-6 absolute of the exact functions, as
        close as PyTorch's, not bit-identical to libm.
    precision : {"highest", "bf16", "int8"}, optional, keyword-only
        The arithmetic of the product (:mod:`mmcore._precision`); default: the current one,
        :func:`mmcore.get_matmul_precision` (``"highest"`` unless changed). ``"highest"``:
        float32 operands and sums, exact as ever. ``"bf16"``: ``x`` and the weight rounded to
        bfloat16, products summed in float32. ``"int8"``: each row of ``x`` quantized to uint8
        with a zero point and each weight row to int8 with one scale (an int8
        :class:`QuantizedTensor` as stored), the integer products summed exactly, then
        ``float32(sum) * (sx * sw) + bias``; in_features at most 65536. The bias and the
        activation are float32 under every precision.
    backend : {"native", "numba"}, optional, keyword-only
        Default: the active backend (:func:`mmcore.use_backend`).

    Returns
    -------
    float32 array (..., out_features)

    Raises
    ------
    ShapeError
        Wrong ranks, mismatched feature sizes, or non-float dtypes (the message names the
        argument); more than 65536 in_features under ``"int8"``.
    ArgumentError
        An unknown ``activation`` or ``precision``.

    Examples
    --------
    >>> import numpy as np
    >>> from mmcore.ops import linear
    >>> x = np.ones((2, 3), np.float32)
    >>> w = np.arange(12, dtype=np.float32).reshape(4, 3)
    >>> linear(x, w, np.ones(4, np.float32))
    array([[ 4., 13., 22., 31.],
           [ 4., 13., 22., 31.]], dtype=float32)

    Under ``"bf16"`` the operands keep 8 significant bits; under ``"int8"`` a row of ``x``
    takes 255 steps of ``(max(0, max x) - min(0, min x)) / 255``:

    >>> x = np.array([[1 + 2.0 ** -10, 0.3]], np.float32); w = np.array([[1.0, 0.0]], np.float32)
    >>> [float(linear(x, w, precision=p)[0, 0]) for p in ("highest", "bf16", "int8")]
    [1.0009765625, 1.0, 1.0009766817092896]
    """
    op = "linear"
    if not (activation is None or isinstance(activation, str)) or activation not in ACTIVATIONS:
        raise ArgumentError(f"[linear] activation must be one of "
                            f"{', '.join(repr(a) for a in ACTIVATIONS)}, got {activation!r}")
    act = ACTIVATIONS[activation]
    prec = resolve_precision(op, precision)
    name = _backend.resolve_backend(op, [a for a in (x, weight, bias) if a is not None],
                                    backend)
    if name not in ("native", "numba"):
        raise BackendError(f"[linear] backend {name!r} is not available for linear (native "
                           "or numba)")
    xa = _float32("x", x)
    wv: Union[np.ndarray, QuantizedTensor, PackedWeight]
    if isinstance(weight, (QuantizedTensor, PackedWeight)):
        wv = weight
    else:
        wv = _float32("weight", weight)
    if xa.ndim < 1:
        raise ShapeError("[linear] x must have at least 1 dim (..., in_features)")
    if wv.ndim != 2:
        raise ShapeError(f"[linear] weight has {wv.ndim} dims, expected 2 "
                         "(out_features, in_features)")
    N, K = (int(n) for n in wv.shape)
    if xa.shape[-1] != K:
        raise ShapeError(f"[linear] x has {xa.shape[-1]} features in its last axis, but weight "
                         f"has in_features={K}")
    check_int8_features(op, K, prec)
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
    w, kind, scale = weight_operand(wv if not isinstance(wv, np.ndarray) else _rows(wv, K),
                                    name, prec)
    out = np.empty((x2.shape[0], N), np.float32)
    launcher(op, name, "linear", "linear")(x2, w, b, out, activation=act, weight_kind=kind,
                                           weight_scale=scale, precision=prec)
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
