"""Packed weights of the model's modules (``mmcore.model.packing``).

The native matrix product reads its weight in a layout of its own; given a plain array it
packs the weight into that layout on every call. The layers of :mod:`mmcore.model` hand
:func:`mmcore.ops.linear` (and the fused :func:`mmcore.ops.encoder_layer`) their weights through
:meth:`Module.packed_weight <mmcore.model.nn.Module.packed_weight>` instead, which keeps, per
parameter (and per row slice of one, such as the query rows of a packed in-projection):

* for a float32 matrix, an :class:`mmcore.ops.PackedWeight` over it (it shares the
  parameter's memory, which can never be written) with one native pack per precision, made on
  first use;
* for a :class:`~mmcore.ops.linear.QuantizedTensor`, the tensor itself (or its row slice): the
  native kernel keeps one pack per precision (it must be frozen for that:
  :func:`freeze_quantized`), except for int8 weights under ``"highest"``, read in place.

So a weight is packed once per precision, not on every call, and the results are those of the
parameter itself under the same precision. The kept objects live in the owning module's
``__dict__["_packs"]`` as ``(name, rows) -> (parameter, packed)``. A module drops them all
whenever one of its parameters is registered or replaced (``register_parameter``,
``set_parameter``, ``load_state_dict``, copies and unpickling), and an entry is used only while
the module holds the very parameter object it was made from, so a pack of older weights is never
read. Copies and pickles of a module leave the packs behind.

Examples
--------
>>> import numpy as np
>>> import mmcore
>>> from mmcore.model import Linear
>>> lin = Linear(16, 8, rng=0)
>>> with mmcore.matmul_precision("bf16"):
...     y = lin(np.ones((2, 16), np.float32))
>>> lin.packed_weight("weight").cached_precisions
('bf16',)
"""

from __future__ import annotations

from typing import Any, Iterator, Optional, Tuple, Union

import numpy as np

from ..errors import ModelFormatError
from ..ops.linear import PackedWeight, QuantizedTensor

__all__ = ["freeze_quantized", "packed_weight", "packed_nbytes"]

#: What the products of a module read for one of its weights.
Packed = Union[PackedWeight, QuantizedTensor]


def _read_only_chain(a: Optional[np.ndarray]) -> bool:
    """Mark ``a`` and the arrays whose memory it views read-only; whether the memory then
    belongs to an array (or an immutable ``bytes``), rather than to a buffer that others may
    still write (a ``bytearray``, a ``memoryview``, an ``mmap``...)."""
    base: object = a
    while isinstance(base, np.ndarray):
        base.flags.writeable = False
        if base.base is None:
            return True
        base = base.base
    return base is None or isinstance(base, bytes)


def _frozen_bytes(a: np.ndarray) -> np.ndarray:
    """A C-contiguous copy of ``a`` (any dtype) over an immutable ``bytes`` object."""
    c = np.ascontiguousarray(a)
    return np.frombuffer(c.tobytes(), dtype=c.dtype).reshape(c.shape)


def freeze_quantized(q: QuantizedTensor) -> QuantizedTensor:
    """Mark the arrays of a quantized weight read-only, in place, down to the memory they view.

    No copy (quantized weights are kept to save memory), unless that memory belongs to some
    other object than an array (a buffer that could still change): then the arrays are copied
    into memory that cannot be written. Either way the result is
    :attr:`~mmcore.ops.linear.QuantizedTensor.frozen`, so its native packs are kept.

    Examples
    --------
    >>> import numpy as np
    >>> from mmcore.model.packing import freeze_quantized
    >>> from mmcore.ops.linear import QuantizedTensor
    >>> h = np.ones((2, 3), np.float16)
    >>> q = freeze_quantized(QuantizedTensor(h, "float16"))     # its data views h
    >>> q.frozen, h.flags.writeable
    (True, False)
    """
    owned = _read_only_chain(q.data)
    owned = _read_only_chain(q.scale) and owned
    if owned and q.frozen:
        return q
    return QuantizedTensor(_frozen_bytes(q.data), q.kind,
                           None if q.scale is None else _frozen_bytes(q.scale))


def packed_weight(module: Any, name: str, rows: Optional[Tuple[int, int]] = None) -> Packed:
    """Parameter ``name`` of ``module`` (its rows ``start:stop`` when ``rows`` is given) as the
    products read it; see :meth:`Module.packed_weight <mmcore.model.nn.Module.packed_weight>`.

    Thread-safe: threads that find no entry may each make one, the last one stays (they are
    equal).
    """
    value = module._params.get(name)
    if value is None:
        present = sorted(k for k, v in module._params.items() if v is not None)
        raise ModelFormatError(f"[{type(module).__name__}] packed_weight: no parameter "
                               f"{name!r} (present: {present})")
    d = module.__dict__
    packs = d.get("_packs")
    if packs is None:
        packs = d.setdefault("_packs", {})
    key = (name, rows)
    hit = packs.get(key)
    if hit is not None and hit[0] is value:
        return hit[1]
    src = value if rows is None else value[rows[0]:rows[1]]
    made: Packed = src if isinstance(src, QuantizedTensor) else PackedWeight(src)
    packs[key] = (value, made)
    return made


def _walk(module: Any) -> Iterator[Any]:
    yield module
    for child in module._modules.values():
        yield from _walk(child)


def _extra_nbytes(param: Any, made: Packed) -> int:
    """Bytes ``made`` holds beyond the parameter ``param`` it was made from."""
    if isinstance(made, QuantizedTensor):
        return int(made.packed_nbytes)
    src = made.source
    if isinstance(src, np.ndarray) and isinstance(param, np.ndarray) and \
            np.shares_memory(src, param):
        return int(made.nbytes) - int(src.nbytes)       # the source is the parameter's memory
    return int(made.nbytes)


def packed_nbytes(module: Any) -> int:
    """Bytes held by the packed weights of ``module`` and its children beyond the parameters:
    the native packs (and any copy a :class:`~mmcore.ops.PackedWeight` made of its source), each
    object once."""
    total = 0
    seen = set()
    for mod in _walk(module):
        for param, made in list(mod.__dict__.get("_packs", {}).values()):
            if id(made) not in seen:
                seen.add(id(made))
                total += _extra_nbytes(param, made)
    return total
