"""The arithmetic of matrix products: ``"highest"`` (the default), ``"bf16"`` or ``"int8"``.

The knob of :func:`mmcore.ops.linear`, :func:`mmcore.ops.attention` and
:func:`mmcore.ops.encoder_layer` (and of the model layers built on them), modelled on
``torch.set_float32_matmul_precision`` and ``jax.default_matmul_precision``. Each op takes a
``precision=`` keyword; when it is ``None`` (the default) the op uses
:func:`get_matmul_precision`: the value of the innermost :class:`matmul_precision` block of the
calling thread, else the process-wide value of :func:`set_matmul_precision`, else
``"highest"``.

``"highest"``
    float32 operands, products summed in float32: the exact results mmcore always computed
    (a quantized weight gives the bits of its dequantized float32 matrix).
``"bf16"``
    Each operand of a product is rounded to bfloat16 (round to nearest even; NaN stays NaN, a
    value past the bfloat16 range becomes infinite) and widened back to float32; the products
    are summed in float32. float16 and int8 weights are rounded from their float32 value.
    Attention rounds q, k and v as it reads them, and the native kernel also rounds the softmax
    numerators P before ``P @ v``; scores, softmax statistics and sums stay float32.
``"int8"``
    Dynamic quantization, as ONNX Runtime and oneDNN do it. Each row of the activations ``x`` is
    quantized to uint8 with a zero point, in float32 arithmetic: ``lo = min(0, min x)``, ``hi =
    max(0, max x)``, ``sx = (hi - lo) / 255`` (1 when that is 0 or 1 / sx overflows), ``zp =
    clamp(rint(-lo / sx), 0, 255)`` and ``a = clamp(rint(x / sx) + zp, 0, 255) - zp``, an integer in
    [-255, 255] (``rint`` rounds half to even; the divisions are products with ``1 / sx``). Each row
    ``n`` of the weight is int8 with one scale: an int8 weight
    (:class:`~mmcore.ops.linear.QuantizedTensor` of kind ``"int8"``) as it is stored, any other
    weight quantized once, ``sw = max |w| / 127`` (1 when 0 or 1 / sw overflows) and ``q =
    clamp(rint(w / sw), -127, 127)``. The products are summed exactly in integers and ``y =
    float32(sum a q) * (sx * sw) + bias`` in float32, then the activation. A row holding inf or NaN
    (of ``x`` or of the weight) gives NaN outputs. ``in_features`` is at most 65536. Attention has
    no int8 arithmetic: under ``"int8"`` it computes as under ``"highest"`` (only the weight
    products are quantized).

``"highest"`` is the default and the only exact one; ``"bf16"`` and ``"int8"`` trade accuracy
(about 2**-8 of the summed magnitudes for ``"bf16"``, about one quantization step of each
operand for ``"int8"``) for speed on CPUs with bfloat16 or int8 dot-product instructions.

Examples
--------
>>> import mmcore
>>> mmcore.get_matmul_precision()
'highest'
>>> with mmcore.matmul_precision("bf16"):
...     mmcore.get_matmul_precision()
'bf16'
>>> mmcore.get_matmul_precision()
'highest'
"""

from __future__ import annotations

import contextvars
import functools
import inspect
import threading
from typing import Any, Callable, Optional, Tuple, TypeVar

from .errors import ArgumentError

__all__ = ["PRECISIONS", "set_matmul_precision", "get_matmul_precision", "matmul_precision",
           "resolve_precision"]

#: The precisions, by name.
PRECISIONS: Tuple[str, ...] = ("highest", "bf16", "int8")

_CHOICES = ", ".join(repr(p) for p in PRECISIONS)

# The process-wide value (set_matmul_precision) and the innermost matmul_precision block of the
# current thread (a context variable: each thread, and each asyncio task, has its own).
_process_wide = "highest"
_lock = threading.Lock()
_current: contextvars.ContextVar[Optional[str]] = contextvars.ContextVar(
    "mmcore_matmul_precision", default=None)

_F = TypeVar("_F", bound=Callable[..., Any])


def _check(op: str, precision: object) -> str:
    if not isinstance(precision, str) or precision not in PRECISIONS:
        raise ArgumentError(f"[{op}] precision must be one of {_CHOICES}; got {precision!r}")
    return precision


def set_matmul_precision(precision: str) -> None:
    """Set the process-wide precision of matrix products (``"highest"`` at start).

    It applies to every thread, except inside a :class:`matmul_precision` block (which wins in
    its thread) and to calls that pass ``precision=`` themselves.

    Parameters
    ----------
    precision : {"highest", "bf16", "int8"}
        ``"highest"``: float32 operands and sums, the exact default. ``"bf16"``: operands
        rounded to bfloat16 (round to nearest even), products summed in float32. ``"int8"``:
        activations quantized per row to uint8 with a zero point, weights to int8 with one
        scale per output row, products summed exactly in integers, then ``float32(sum) * (sx *
        sw) + bias``. The module docstring (:mod:`mmcore._precision`) spells out each rule.

    Raises
    ------
    ArgumentError
        ``precision`` is not one of the three names.

    Examples
    --------
    >>> import numpy as np, mmcore
    >>> x = np.array([[1 + 2.0 ** -10]], np.float32); w = np.ones((1, 1), np.float32)
    >>> mmcore.set_matmul_precision("bf16")
    >>> mmcore.get_matmul_precision(), float(mmcore.ops.linear(x, w)[0, 0])   # 1 + 2**-10 rounded
    ('bf16', 1.0)
    >>> mmcore.set_matmul_precision("highest")
    >>> float(mmcore.ops.linear(x, w)[0, 0])
    1.0009765625
    """
    global _process_wide
    value = _check("set_matmul_precision", precision)
    with _lock:
        _process_wide = value


def get_matmul_precision() -> str:
    """The precision that a call without ``precision=`` uses in the current thread: that of the
    innermost :class:`matmul_precision` block, else the process-wide one
    (:func:`set_matmul_precision`, ``"highest"`` by default).

    Returns
    -------
    {"highest", "bf16", "int8"}

    Examples
    --------
    >>> import mmcore
    >>> mmcore.get_matmul_precision()
    'highest'
    """
    value = _current.get()
    return _process_wide if value is None else value


class matmul_precision:
    """Use ``precision`` for the matrix products of the current thread inside a ``with`` block.

    Other threads keep theirs; blocks nest (the innermost wins) and the previous value comes
    back when the block ends, also when it ends with an exception. It also decorates a
    function, whose every call then runs inside such a block. It is a context variable, like
    :class:`mmcore.use_backend`: each asyncio task has its own value too.

    Parameters
    ----------
    precision : {"highest", "bf16", "int8"}
        See :func:`set_matmul_precision` for what each computes (``"highest"``, the default
        outside any block, is exact float32).

    Raises
    ------
    ArgumentError
        ``precision`` is not one of the three names (raised when the object is made).

    Examples
    --------
    >>> import numpy as np, mmcore
    >>> x = np.array([[1 + 2.0 ** -10]], np.float32); w = np.ones((1, 1), np.float32)
    >>> with mmcore.matmul_precision("bf16"):
    ...     with mmcore.matmul_precision("highest"):
    ...         inner = mmcore.ops.linear(x, w)
    ...     outer = mmcore.ops.linear(x, w)
    >>> float(inner[0, 0]), float(outer[0, 0]), mmcore.get_matmul_precision()
    (1.0009765625, 1.0, 'highest')
    >>> @mmcore.matmul_precision("int8")
    ... def project(x):
    ...     return mmcore.get_matmul_precision()
    >>> project(x)
    'int8'
    """

    def __init__(self, precision: str):
        self._precision = _check("matmul_precision", precision)
        # the tokens of the blocks this object has open, per context (one object may be entered
        # again inside its own block, from several threads or from several asyncio tasks, each
        # of which runs in a context of its own)
        self._tokens: contextvars.ContextVar[Tuple[contextvars.Token, ...]]
        self._tokens = contextvars.ContextVar("mmcore_matmul_precision_tokens", default=())

    @property
    def precision(self) -> str:
        """The precision this block sets."""
        return self._precision

    def __enter__(self) -> "matmul_precision":
        token = _current.set(self._precision)
        self._tokens.set(self._tokens.get() + (token,))
        return self

    def __exit__(self, *exc: object) -> None:
        tokens = self._tokens.get()
        self._tokens.set(tokens[:-1])
        _current.reset(tokens[-1])

    def __call__(self, func: _F) -> _F:
        precision = self._precision
        if inspect.iscoroutinefunction(func):
            @functools.wraps(func)
            async def run(*args: Any, **kwargs: Any) -> Any:
                token = _current.set(precision)
                try:
                    return await func(*args, **kwargs)
                finally:
                    _current.reset(token)

            return run  # type: ignore[return-value]

        @functools.wraps(func)
        def inner(*args: Any, **kwargs: Any) -> Any:
            token = _current.set(precision)
            try:
                return func(*args, **kwargs)
            finally:
                _current.reset(token)

        return inner  # type: ignore[return-value]

    def __repr__(self) -> str:
        return f"matmul_precision({self._precision!r})"


def resolve_precision(op: str, precision: Optional[str]) -> str:
    """The precision of one call of ``op``: ``precision`` checked, or :func:`get_matmul_precision`
    when it is ``None``.

    Raises
    ------
    ArgumentError
        An unknown name: ``"[op] precision must be one of 'highest', 'bf16', 'int8'; got ..."``.

    Examples
    --------
    >>> from mmcore._precision import resolve_precision
    >>> resolve_precision("linear", None), resolve_precision("linear", "int8")
    ('highest', 'int8')
    >>> resolve_precision("linear", "fp8")
    Traceback (most recent call last):
    ...
    mmcore.errors.ArgumentError: [linear] precision must be one of 'highest', 'bf16', 'int8';
    got 'fp8'
    """
    if precision is None:
        return get_matmul_precision()
    return _check(op, precision)
