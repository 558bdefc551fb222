"""Launchers of the native CPU kernels (``mmcore._C``), the ``native`` backend.

One function per kernel, taking the arguments the public op has already validated and laid out
(NumPy arrays of the kernel's dtype and layout, outputs allocated) and adding the thread count
of :func:`mmcore.set_num_threads`. Nothing here validates: the bindings keep their own checks
as the last line of defence against a caller that bypasses :mod:`mmcore.ops`.

The numba launchers (:mod:`mmcore.kernels.numba`) and the cuda ones
(:mod:`mmcore.kernels.cuda`) of a kernel take the same arguments.

Examples
--------
>>> import numpy as np
>>> from mmcore.kernels import cpu
>>> x = np.ones((1, 2, 3), np.float32); out = np.empty((1, 3), np.float32)
>>> cpu.masked_mean(x, None, out)
array([[1., 1., 1.]], dtype=float32)
"""

from __future__ import annotations

from typing import Any, Dict, Optional, Tuple

import numpy as np

from .. import _backend
from ..errors import BackendError

__all__ = ["native", "attention", "masked_mean", "masked_max", "fuse", "spectral", "spectral_plan",
           "resize", "normalize", "patchify", "preprocess_image", "linear", "pack_weight",
           "layer_norm", "encoder_layer", "PACKED"]

Array = np.ndarray

# mmcore._C takes every enum argument by name (csrc/bindings/enum_args.h); the launchers here
# take the integer codes the numba kernels use: mmcore.ops.linear.ACTIVATIONS for the
# activation, 0 (float32) and mmcore.ops.linear's kind codes for a weight.
_ACTIVATION_NAMES = ("none", "gelu", "gelu_tanh", "quick_gelu", "relu")
_WEIGHT_KIND_NAMES = ("float32", "float16", "bfloat16", "int8")

#: The kind code of a weight given as a ``mmcore._C.PackedWeight`` (see :func:`pack_weight`).
PACKED = -1


# (id of the module, kernel) -> whether that kernel of the native module takes ``precision``
_takes_precision: Dict[Tuple[int, str], bool] = {}


def _precision_kw(C: Any, op: str, kernel: str, precision: str) -> dict:
    """The ``precision`` keyword of a native call: none for "highest" (the kernels' default,
    so that a build older than the precisions still runs it), else ``precision``, or a
    BackendError naming ``op`` when this build's kernel does not take it."""
    if precision == "highest":
        return {}
    key = (id(C), kernel)
    takes = _takes_precision.get(key)
    if takes is None:
        takes = "precision" in (getattr(getattr(C, kernel), "__doc__", None) or "")
        _takes_precision[key] = takes
    if not takes:
        raise BackendError(f"[{op}] this build of mmcore._C has no precision {precision!r} "
                           f"in its {kernel} kernel: rebuild mmcore (`pip install .`) or use "
                           "backend='numba'")
    return {"precision": precision}


# kernel -> the native module found to have it (checked again whenever the module object
# differs, as when a test swaps it).
_present: Dict[str, Any] = {}


def native(op: str, kernel: str) -> Any:
    """``mmcore._C``, checked to have ``kernel`` (a BackendError naming ``op`` otherwise)."""
    C = _backend.native_module()
    if _present.get(kernel) is C:
        return C
    if not hasattr(C, kernel):
        raise BackendError(f"[{op}] this build of mmcore._C has no {kernel} kernel: rebuild "
                           "mmcore (`pip install .`) or use backend='numba'")
    _present[kernel] = C
    return C


def _threads() -> int:
    return _backend.get_num_threads()


def attention(q: Array, k: Array, v: Array, out: Array, weights: Optional[Array],
              lse: Optional[Array], mask: Optional[Array], bias: Optional[Array],
              key_lengths: Optional[Array], scale: float, dropout: bool, seed: int,
              threshold: int, dropout_scale: float, *, precision: str = "highest") -> None:
    """:func:`mmcore.ops.attention` (fills ``out``, ``weights`` and ``lse``)."""
    C = native("attention", "attention")
    C.attention(q, k, v, out, weights, lse, mask, bias, key_lengths, scale=scale,
                dropout=dropout, seed=seed, threshold=threshold, dropout_scale=dropout_scale,
                **_precision_kw(C, "attention", "attention", precision), num_threads=_threads())


def masked_mean(x: Array, mask: Optional[Array], out: Array) -> Array:
    """:func:`mmcore.ops.masked_mean` into ``out``."""
    native("masked_mean", "masked_mean").masked_mean(x, mask, out, num_threads=_threads())
    return out


def masked_max(x: Array, mask: Optional[Array], out: Array) -> Array:
    """:func:`mmcore.ops.masked_max` into ``out``."""
    native("masked_max", "masked_max").masked_max(x, mask, out, num_threads=_threads())
    return out


def fuse(emb: Array, present: Optional[Array], weights: Optional[Array],
         query: Optional[Array], out: Array, out_weights: Optional[Array], *,
         strategy: str) -> None:
    """:func:`mmcore.ops.fuse` of a stacked (B, M, D) input."""
    native("fuse", "fuse").fuse(emb, present, weights, query, out, out_weights,
                                strategy=strategy, num_threads=_threads())


def spectral(x: Array, out: Array, window: Array, mel_start: Optional[Array],
             mel_len: Optional[Array], mel_offset: Optional[Array],
             mel_weights: Optional[Array], **options: Any) -> None:
    """The framing + FFT + (mel) + (log) kernel of the audio ops."""
    native("spectral", "spectral").spectral(x, out, window, mel_start, mel_len, mel_offset,
                                            mel_weights, num_threads=_threads(), **options)


def spectral_plan(window: Array, mel_start: Optional[Array], mel_len: Optional[Array],
                  mel_offset: Optional[Array], mel_weights: Optional[Array],
                  **options: Any) -> Any:
    """A ``mmcore._C.SpectralPlan``: the options of :func:`spectral` (all but ``n_frames``) and
    its tables checked and copied once; ``plan.run(x, n_frames=, num_threads=,
    check_finite=)`` then returns a new output, or None when ``check_finite`` finds a NaN or an
    infinity in ``x``."""
    C = native("spectral", "SpectralPlan")
    return C.SpectralPlan(window, mel_start, mel_len, mel_offset, mel_weights, **options)


def resize(srcs: list, dsts: list, *, filter: str, antialias: bool) -> None:
    """:func:`mmcore.ops.resize` of (H, W, C) images into preallocated outputs."""
    native("resize", "resize").resize(srcs, dsts, filter=filter, antialias=antialias,
                                      num_threads=_threads())


def normalize(src: Array, dst: Array, mean: Array, std: Array, *, scale: float,
              layout: str) -> None:
    """:func:`mmcore.ops.normalize` of an (N, H, W, C) batch."""
    native("normalize", "normalize").normalize(src, dst, mean, std, scale=scale, layout=layout,
                                               num_threads=_threads())


def patchify(src: Array, dst: Array, *, patch: int, temporal_patch: int) -> None:
    """:func:`mmcore.ops.patchify` of a (B, T, C, H, W) array."""
    native("patchify", "patchify").patchify(src, dst, patch=patch, temporal_patch=temporal_patch,
                                            num_threads=_threads())


def preprocess_image(srcs: list, out: Array, geoms: Array, mean: Array, std: Array, *,
                     crop_h: int, crop_w: int, filter: str, antialias: bool, scale: float,
                     patch: int) -> None:
    """:func:`mmcore.ops.preprocess_image` of uint8 RGB images."""
    native("preprocess_image", "preprocess_image").preprocess_image(
        srcs, out, geoms, mean, std, crop_h=crop_h, crop_w=crop_w, filter=filter,
        antialias=antialias, scale=scale, patch=patch, num_threads=_threads())


def linear(x: Array, weight: Any, bias: Optional[Array], out: Array, *, activation: int,
           weight_kind: int = 0, weight_scale: Optional[Array] = None,
           precision: str = "highest") -> None:
    """:func:`mmcore.ops.linear` of (M, K) rows under ``precision``; ``weight_kind`` /
    ``weight_scale`` describe a quantized weight (see :class:`mmcore.ops.linear.QuantizedTensor`),
    and ``weight_kind`` :data:`PACKED` a ``mmcore._C.PackedWeight`` packed for ``precision``."""
    C = native("linear", "linear")
    kw = _precision_kw(C, "linear", "linear", precision)
    if weight_kind == PACKED:
        C.linear(x, weight, bias, out, activation=_ACTIVATION_NAMES[activation], **kw,
                 num_threads=_threads())
        return
    C.linear(x, weight, bias, out, activation=_ACTIVATION_NAMES[activation],
             weight_kind=_WEIGHT_KIND_NAMES[weight_kind], weight_scale=weight_scale, **kw,
             num_threads=_threads())


def pack_weight(weight: Array, weight_scale: Optional[Array], *, weight_kind: int,
                precision: str) -> Any:
    """A ``mmcore._C.PackedWeight``: the (N, K) ``weight`` (of kind ``weight_kind``, see
    :func:`linear`) packed once for the products of ``precision``."""
    C = native("pack_weight", "pack_weight")
    return C.pack_weight(weight, weight_scale, weight_kind=_WEIGHT_KIND_NAMES[weight_kind],
                         precision=precision, num_threads=_threads())


def layer_norm(x: Array, weight: Optional[Array], bias: Optional[Array], out: Array, *,
               eps: float) -> None:
    """:func:`mmcore.ops.layer_norm` of (rows, D) rows."""
    native("layer_norm", "layer_norm").layer_norm(x, weight, bias, out, eps=eps,
                                                  num_threads=_threads())


def encoder_layer(x: Array, out: Array, key_lengths: Optional[Array], *, num_heads: int,
                  weights: tuple, biases: tuple, norms: tuple, eps1: float, eps2: float,
                  activation: int, scale: float, precision: str = "highest") -> None:
    """:func:`mmcore.ops.encoder_layer`: the pre-norm block in one native call; each weight is
    ``(array, kind code, scale)`` as for :func:`linear`, or ``(PackedWeight, PACKED, None)``."""
    weights = tuple((w, None, None) if kind == PACKED else (w, _WEIGHT_KIND_NAMES[kind], s)
                    for w, kind, s in weights)
    C = native("encoder_layer", "encoder_layer")
    C.encoder_layer(x, out, key_lengths, num_heads=num_heads, weights=weights, biases=biases,
                    norms=norms, eps1=eps1, eps2=eps2, activation=_ACTIVATION_NAMES[activation],
                    scale=scale, **_precision_kw(C, "encoder_layer", "encoder_layer", precision),
                    num_threads=_threads())
