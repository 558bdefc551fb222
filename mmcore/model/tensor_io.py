"""The tensors of a model directory: a state dict in safetensors, with weight-only quantization.

:mod:`mmcore.model.io` writes and reads the model directory (``mmcore.json``, the files, the
atomic replacement); this module turns a state dict into the arrays stored in
``model.safetensors`` and their ``mmcore.json`` entries (:func:`encode_tensor`), and back
(:func:`decode_tensor`), and parses the safetensors header with bounded size and depth
(:func:`read_safetensors_header`).

Quantization (weight-only)
--------------------------
``quantization`` maps key prefixes (``"encoders.text."``; ``""`` matches every key) to None,
``"float16"``, ``"bfloat16"`` or ``"int8"``; the longest matching prefix wins, so a None for a
longer prefix exempts part of a quantized subtree. Only tensors with two or more dimensions
(weight matrices, convolution kernels, embedding tables) are quantized; biases, norm scales
and other 1-D or 0-D tensors always stay float32. :func:`load_model_dir` dequantizes to float32,
or, with ``keep_quantized=True`` (what ``MultiModalModel.from_pretrained`` and the loader use),
returns quantized matrices as :class:`~mmcore.ops.linear.QuantizedTensor`: the weights that
:func:`mmcore.ops.linear` multiplies by (linear layers, attention projections) then stay
quantized in memory and are widened inside the kernel, giving the same results as their
dequantized float32 values; the others are dequantized when loaded.

============  =====================================  ==============================================
mode          stored as                              error per element after a round trip
============  =====================================  ==============================================
None          float32                                exact
"float16"     IEEE half precision (round to          <= 2**-11 ~ 4.9e-4 relative (documented as
              nearest even)                          ~1e-3), plus 3e-8 absolute for |w| < 6.1e-5
"bfloat16"    uint16 bit patterns of bfloat16        <= 2**-8 ~ 3.9e-3 relative (~4e-3)
              (round to nearest even)
"int8"        ``<key>.__q8`` int8 (out, ...) and     <= max|w[o]| / 254 for every weight of output
              ``<key>.__scale`` float32 (out,)       channel o (half a quantization step)
============  =====================================  ==============================================

int8 uses one symmetric scale per output channel (axis 0, the PyTorch layout):
``scale[o] = max|w[o]| / 127`` and ``q = round(w / scale)`` in [-127, 127]; an all-zero
channel gets scale 0. On disk float16 and bfloat16 halve the weights, int8 quarters them (plus
4 bytes per output channel).

Examples
--------
>>> import numpy as np
>>> from mmcore.model.tensor_io import decode_tensor, encode_tensor
>>> stored, entry = encode_tensor("w", np.ones((4, 3), np.float32), "int8")
>>> sorted(stored), entry["dtype"]
(['w.__q8', 'w.__scale'], 'int8')
>>> float(decode_tensor("w", entry, stored, set(), "demo").max())
1.0
"""

from __future__ import annotations

import json
import struct
from typing import Any, Dict, Iterable, Mapping, Optional, Tuple

import numpy as np

from ..errors import ConfigError, ModelFormatError, ShapeError
from ..ops.linear import QuantizedTensor

__all__ = ["QUANTIZATIONS", "LOGICAL_DTYPES", "Q8_SUFFIX", "SCALE_SUFFIX", "RESERVED_SUFFIXES",
           "MAX_JSON_DEPTH", "MAX_HEADER_BYTES", "state_nbytes", "normalize_quantization",
           "mode_for", "float32_to_bfloat16_bits", "bfloat16_bits_to_float32", "quantize_int8",
           "dequantize_int8", "encode_tensor", "check_state", "decode_tensor",
           "read_safetensors_header", "json_depth"]

#: The quantization modes (None: float32).
QUANTIZATIONS = (None, "float16", "bfloat16", "int8")
#: The suffixes of the two arrays an int8 tensor is stored as (data, per-channel scales).
Q8_SUFFIX = ".__q8"
SCALE_SUFFIX = ".__scale"
RESERVED_SUFFIXES = (Q8_SUFFIX, SCALE_SUFFIX)
#: The dtypes ``mmcore.json`` records for a tensor.
LOGICAL_DTYPES = ("float32", "float16", "bfloat16", "int8")
#: The deepest nesting of objects and arrays accepted in ``mmcore.json`` (and in the
#: safetensors header); a deeper document is refused as malformed before anything walks it.
MAX_JSON_DEPTH = 64
#: The largest safetensors header parsed (bytes), as the safetensors library allows.
MAX_HEADER_BYTES = 100_000_000


def state_nbytes(state: Mapping[str, Any]) -> int:
    """Total bytes of the arrays in ``state`` (their in-memory size, dtype as held)."""
    return int(sum(np.asarray(v).nbytes for v in state.values()))


def normalize_quantization(quantization: Any) -> Dict[str, Optional[str]]:
    """``quantization`` as a dict of key prefix -> mode (a mode string applies to all keys).

    Raises
    ------
    ConfigError
        Not None, a mode or a dict of str -> mode.
    """
    if quantization is None:
        return {}
    if isinstance(quantization, str):
        quantization = {"": quantization}
    if not isinstance(quantization, Mapping):
        raise ConfigError("quantization must be None, a mode string or a dict of key prefix -> "
                          f"None | 'float16' | 'bfloat16' | 'int8', got {quantization!r}")
    out: Dict[str, Optional[str]] = {}
    for prefix, mode in quantization.items():
        if not isinstance(prefix, str):
            raise ConfigError(f"quantization keys must be key prefixes (str), got {prefix!r}")
        if isinstance(mode, str):
            mode = mode.lower()
        if mode not in QUANTIZATIONS:
            raise ConfigError(f"quantization[{prefix!r}] must be one of None | 'float16' | "
                              f"'bfloat16' | 'int8', got {mode!r}")
        out[prefix] = mode
    return out


def mode_for(key: str, rules: Mapping[str, Optional[str]]) -> Optional[str]:
    """The mode of ``key``: the one of the longest prefix of ``rules`` it starts with."""
    best: Optional[str] = None
    best_len = -1
    for prefix, mode in rules.items():
        if key.startswith(prefix) and len(prefix) > best_len:
            best, best_len = mode, len(prefix)
    return best


def float32_to_bfloat16_bits(x: np.ndarray) -> np.ndarray:
    """bfloat16 bit patterns (uint16) of float32 values, rounded to nearest even.

    Finite inputs only (the caller checks); a value that rounds past the bfloat16 range
    becomes infinity, which the caller also checks.
    """
    bits = np.asarray(x, dtype=np.float32, order="C").view(np.uint32).astype(np.uint64)
    rounding = ((bits >> np.uint64(16)) & np.uint64(1)) + np.uint64(0x7FFF)
    return ((bits + rounding) >> np.uint64(16)).astype(np.uint16)


def bfloat16_bits_to_float32(bits: np.ndarray) -> np.ndarray:
    """float32 values of bfloat16 bit patterns (uint16); exact."""
    return (np.asarray(bits, dtype=np.uint16).astype(np.uint32) << np.uint32(16)).view(np.float32)


def quantize_int8(w: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """Symmetric per-output-channel int8: ``(q int8 like w, scale float32 (w.shape[0],))``.

    ``scale[o] = max|w[o]| / 127``; ``w ~= q * scale[o]`` within ``scale[o] / 2``.
    """
    w = np.asarray(w, dtype=np.float32)
    rows = w.reshape(w.shape[0], -1)
    amax = np.abs(rows).max(axis=1) if rows.shape[1] else np.zeros(rows.shape[0], np.float32)
    scale = (amax / np.float32(127.0)).astype(np.float32)
    safe = np.where(scale > 0, scale, np.float32(1.0)).astype(np.float32)
    q = np.clip(np.rint(rows / safe[:, None]), -127, 127).astype(np.int8)
    return q.reshape(w.shape), scale


def dequantize_int8(q: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """float32 ``q * scale`` with ``scale`` broadcast along axis 0."""
    q = np.asarray(q)
    s = np.asarray(scale, dtype=np.float32).reshape((q.shape[0],) + (1,) * (q.ndim - 1))
    return (q.astype(np.float32) * s).astype(np.float32, copy=False)


def encode_tensor(key: str, arr: np.ndarray, mode: Optional[str]
                   ) -> Tuple[Dict[str, np.ndarray], Dict[str, Any]]:
    """The arrays stored for one tensor and its metadata entry."""
    shape = list(arr.shape)
    if mode is not None and arr.ndim < 2:
        mode = None  # weight-only: biases, norms and scalars stay float32
    if mode is not None and not np.isfinite(arr).all():
        raise ShapeError(f"state[{key!r}] holds NaN or infinite values and cannot be quantized "
                         f"to {mode}")
    if mode is None:
        stored = {key: arr}
        dtype = "float32"
    elif mode == "float16":
        with np.errstate(over="ignore"):
            h = arr.astype(np.float16)
        if not np.isfinite(h).all():
            raise ShapeError(f"state[{key!r}] has values outside the float16 range "
                             f"(|w| > 65504); quantize it to bfloat16 or int8 instead")
        stored = {key: h}
        dtype = "float16"
    elif mode == "bfloat16":
        b = float32_to_bfloat16_bits(arr)
        if ((b & np.uint16(0x7F80)) == np.uint16(0x7F80)).any():
            raise ShapeError(f"state[{key!r}] has values that round past the bfloat16 range")
        stored = {key: b}
        dtype = "bfloat16"
    else:  # int8
        q, scale = quantize_int8(arr)
        stored = {key + Q8_SUFFIX: q, key + SCALE_SUFFIX: scale}
        dtype = "int8"
    entry = {"dtype": dtype, "shape": shape, "quantization": mode,
             "stored": sorted(stored), "nbytes": int(sum(a.nbytes for a in stored.values()))}
    return stored, entry


def check_state(state: Any) -> Dict[str, np.ndarray]:
    """``state`` as float32 C-contiguous arrays by key (ShapeError for a bad key or array)."""
    if not isinstance(state, Mapping):
        raise ShapeError(f"state must be a dict of str -> numpy array, got {type(state).__name__}")
    out: Dict[str, np.ndarray] = {}
    for key, value in state.items():
        if not isinstance(key, str) or not key:
            raise ShapeError(f"state keys must be non-empty strings, got {key!r}")
        if key.endswith(RESERVED_SUFFIXES):
            raise ShapeError(f"state key {key!r} ends with a reserved suffix "
                             f"({', '.join(RESERVED_SUFFIXES)})")
        arr = np.asarray(value)
        if arr.dtype.kind not in "fiub":
            raise ShapeError(f"state[{key!r}] must be a real numeric array, got dtype {arr.dtype}")
        out[key] = np.asarray(arr, dtype=np.float32, order="C")  # keeps 0-d
    for key in out:  # a stored name of one tensor must not collide with another key
        for suffix in RESERVED_SUFFIXES:
            if key + suffix in out:  # pragma: no cover - excluded by the suffix check above
                raise ShapeError(f"state keys {key!r} and {key + suffix!r} collide")
    return out


def decode_tensor(key: str, e: Mapping[str, Any], raw: Mapping[str, np.ndarray],
                  used: set, where: str, keep_quantized: bool = False) -> Any:
    """The tensor ``key`` from the arrays ``raw`` of the weights file, per its ``mmcore.json``
    entry ``e`` (checked by the caller): float32, or, with ``keep_quantized``, a quantized
    2-D tensor as a :class:`~mmcore.ops.linear.QuantizedTensor`. The stored names read are
    added to ``used``; ModelFormatError naming ``where`` for a missing or misshapen array.
    """
    shape = tuple(e["shape"])
    q = e["quantization"]

    def take(name: str, dtype: Any, want_shape: Tuple[int, ...]) -> np.ndarray:
        if name not in raw:
            raise ModelFormatError(f"{where}: tensor {key!r} is missing (no {name!r} in the file)")
        a = raw[name]
        if a.dtype != np.dtype(dtype):
            raise ModelFormatError(f"{where}: tensor {name!r} is stored as {a.dtype}, expected "
                                   f"{np.dtype(dtype)}")
        if tuple(a.shape) != want_shape:
            raise ModelFormatError(f"{where}: tensor {name!r} has shape {tuple(a.shape)}, "
                                   f"metadata records {want_shape}")
        used.add(name)
        return a

    if q is None:
        return np.array(take(key, np.float32, shape), dtype=np.float32, copy=True)
    keep = keep_quantized and len(shape) == 2
    if q == "float16":
        h = take(key, np.float16, shape)
        return QuantizedTensor(h.copy(), "float16") if keep else h.astype(np.float32)
    if q == "bfloat16":
        bits = take(key, np.uint16, shape)
        return (QuantizedTensor(bits.copy(), "bfloat16") if keep
                else bfloat16_bits_to_float32(bits).copy())
    qa = take(key + Q8_SUFFIX, np.int8, shape)
    sc = take(key + SCALE_SUFFIX, np.float32, (shape[0],))
    if not np.isfinite(sc).all() or (sc < 0).any():
        raise ModelFormatError(f"{where}: tensor {key + SCALE_SUFFIX!r} holds negative or "
                               "non-finite scales")
    if keep:
        return QuantizedTensor(qa.copy(), "int8", scale=sc.copy())
    return dequantize_int8(qa, sc)


def read_safetensors_header(data: bytes, where: str) -> Dict[str, Any]:
    """The JSON header of the safetensors file ``data`` (ModelFormatError naming ``where`` when
    it is truncated, too large, too deep or not JSON)."""
    if len(data) < 8:
        raise ModelFormatError(f"{where}: truncated safetensors file ({len(data)} bytes)")
    (n,) = struct.unpack("<Q", data[:8])
    if n > MAX_HEADER_BYTES:
        raise ModelFormatError(f"{where}: corrupt safetensors header (it claims {n} bytes, "
                               f"more than the {MAX_HEADER_BYTES} allowed)")
    if n > len(data) - 8:
        raise ModelFormatError(f"{where}: truncated safetensors file (header of {n} bytes, "
                               f"file of {len(data)})")
    try:
        header = json.loads(data[8:8 + n].decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise ModelFormatError(f"{where}: corrupt safetensors header") from None
    if not isinstance(header, dict) or json_depth(header) > MAX_JSON_DEPTH:
        raise ModelFormatError(f"{where}: corrupt safetensors header")
    return header


def json_depth(obj: Any) -> int:
    """The nesting depth of parsed JSON (a scalar is 0), walked without recursion."""
    deepest = 0
    stack = [(obj, 1)]
    while stack:
        o, d = stack.pop()
        children: Iterable[Any]
        if isinstance(o, dict):
            children = o.values()
        elif isinstance(o, list):
            children = o
        else:
            continue
        deepest = max(deepest, d)
        if d > MAX_JSON_DEPTH:
            return d
        stack.extend((c, d + 1) for c in children if isinstance(c, (dict, list)))
    return deepest
