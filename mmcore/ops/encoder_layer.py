"""One pre-norm transformer encoder block in one call (``mmcore.ops.encoder_layer``).

The block of ``torch.nn.TransformerEncoderLayer(norm_first=True, batch_first=True)`` in eval
mode, with packed self-attention weights::

    h = layer_norm(x, norm1_weight, norm1_bias, eps1)
    q, k, v = split_heads(linear(h, in_proj_weight, in_proj_bias))
    y = x + linear(merge_heads(attention(q, k, v, key_lengths)), out_proj_weight, out_proj_bias)
    h = layer_norm(y, norm2_weight, norm2_bias, eps2)
    y = y + linear(linear(h, linear1_weight, linear1_bias, activation), linear2_weight,
                   linear2_bias)

The ``native`` backend runs the whole block in one call of ``mmcore._C.encoder_layer`` (no
Python between the steps). The ``numba`` backend is that composition of the numba kernels of
:func:`~mmcore.ops.layer_norm`, :func:`~mmcore.ops.linear` and :func:`~mmcore.ops.attention`
(:mod:`mmcore.kernels.numba.encoder_layer`); both agree to float32 rounding.
"""

from __future__ import annotations

from typing import Optional, Tuple, Union

import numpy as np
import numpy.typing as npt

from .. import _backend
from .._precision import resolve_precision
from ..errors import ArgumentError, BackendError, ShapeError
from ..kernels import launcher
from ._checks import (
    FLOAT_INPUT_DTYPES,
    as_host_array,
    attention_scalars,
    check_float,
    check_int,
    check_rank,
    float32_contiguous,
)
from ._types import HostBackend
from .linear import (
    ACTIVATIONS,
    PackedWeight,
    QuantizedTensor,
    Weight,
    WeightOperand,
    check_int8_features,
    weight_operand,
)

__all__ = ["encoder_layer"]

_OP = "encoder_layer"

def _vector(name: str, value, n: int, dims: str) -> Optional[np.ndarray]:
    """An optional float vector of ``n`` values as float32 C-contiguous (ShapeError else)."""
    if value is None:
        return None
    a = as_host_array(_OP, name, value)
    if a.shape != (n,):
        raise ShapeError(f"[{_OP}] {name} has shape {a.shape}, expected ({n},) = {dims}")
    return float32_contiguous(_OP, name, a)


def _weight(name: str, value, rows: Optional[int], cols: int,
            dims: str) -> Union[np.ndarray, QuantizedTensor, PackedWeight]:
    """A float (rows, cols) matrix (float32, C-contiguous), a :class:`QuantizedTensor` or a
    :class:`PackedWeight` of that shape; ``rows=None`` takes any row count >= 1."""
    if isinstance(value, (QuantizedTensor, PackedWeight)):
        shape = tuple(int(n) for n in value.shape)
    else:
        a = as_host_array(_OP, name, value)
        check_rank(_OP, name, a, 2, dims)
        if a.dtype not in FLOAT_INPUT_DTYPES:
            raise ShapeError(f"[{_OP}] {name} has dtype {a.dtype}, expected float32 or float16 "
                             "(float64 is cast)")
        shape = tuple(int(n) for n in a.shape)
    want_rows = shape[0] if rows is None else rows
    if shape != (want_rows, cols) or want_rows < 1:
        raise ShapeError(f"[{_OP}] {name} has shape {shape}, expected "
                         f"({'at least 1' if rows is None else rows}, {cols}) = {dims}")
    if isinstance(value, (QuantizedTensor, PackedWeight)):
        return value
    return float32_contiguous(_OP, name, a)


def encoder_layer(x: npt.ArrayLike, *, num_heads: int, in_proj_weight: Weight,
                  out_proj_weight: Weight, linear1_weight: Weight, linear2_weight: Weight,
                  in_proj_bias: Optional[npt.ArrayLike] = None,
                  out_proj_bias: Optional[npt.ArrayLike] = None,
                  linear1_bias: Optional[npt.ArrayLike] = None,
                  linear2_bias: Optional[npt.ArrayLike] = None,
                  norm1_weight: Optional[npt.ArrayLike] = None,
                  norm1_bias: Optional[npt.ArrayLike] = None,
                  norm2_weight: Optional[npt.ArrayLike] = None,
                  norm2_bias: Optional[npt.ArrayLike] = None,
                  key_lengths: Optional[npt.ArrayLike] = None, activation: Optional[str] = "gelu",
                  eps1: float = 1e-5, eps2: float = 1e-5, scale: Optional[float] = None,
                  temperature: float = 1.0, precision: Optional[str] = None,
                  backend: Optional[HostBackend] = None) -> np.ndarray:
    """A pre-norm transformer encoder block over ``x`` (B, L, E): self-attention, then an MLP,
    each with a residual (see the module docstring for the exact composition).

    Parameters
    ----------
    x : array (B, L, E)
        float32 (float16 / float64 are cast); ``B`` and ``L`` may be 0, ``E >= 1``.
    num_heads : int
        Attention heads ``H``, keyword-only like every option; must divide ``E``.
    in_proj_weight : array (3E, E), QuantizedTensor or PackedWeight
        The stacked q, k, v projections (PyTorch's ``self_attn.in_proj_weight``). Every
        weight may be a :class:`~mmcore.ops.linear.QuantizedTensor` or a
        :class:`~mmcore.ops.PackedWeight`, read as :func:`~mmcore.ops.linear` reads them.
    out_proj_weight : array (E, E), QuantizedTensor or PackedWeight
    linear1_weight : array (F, E), QuantizedTensor or PackedWeight
        ``F`` (the feed-forward width) is its row count, ``F >= 1``.
    linear2_weight : array (E, F), QuantizedTensor or PackedWeight
    in_proj_bias, out_proj_bias, linear1_bias, linear2_bias : array, optional
        Shapes (3E,), (E,), (F,) and (E,).
    norm1_weight, norm1_bias, norm2_weight, norm2_bias : array (E,), optional
        The two layer norms; a norm bias needs its weight.
    key_lengths : int array (B,), optional
        Keys at index ``>= key_lengths[b]`` are ignored (right padding). A row with
        ``key_lengths[b] == 0`` gets a zero attention output (so ``y = x + mlp(...)``).
    activation : {"gelu", "gelu_tanh", "quick_gelu", "relu", None}, default "gelu"
        The activation of ``linear1`` (as :func:`mmcore.ops.linear`).
    eps1, eps2 : float, default 1e-5
        The layer norms' epsilons; finite and > 0.
    scale : float, optional
        Multiplies ``q @ k^T``; default ``1 / sqrt(E / H)``.
    temperature : float, default 1.0
        Divides the scaled scores (``scale / temperature`` must be finite in float32).
    precision : {"highest", "bf16", "int8"}, optional
        The arithmetic of the four linear maps and of the attention, as in
        :func:`~mmcore.ops.linear` and :func:`~mmcore.ops.attention` (:mod:`mmcore._precision`);
        default: the current one, :func:`mmcore.get_matmul_precision`. ``"highest"`` is exact
        float32; under ``"int8"`` E and F are at most 65536 and the attention computes as
        under ``"highest"``. Layer norms, softmax and residual sums are float32 under each.
    backend : {"native", "numba"}, optional
        Override the backend (see :mod:`mmcore._backend`); there is no cuda kernel.

    Returns
    -------
    float32 array (B, L, E)
        A new array. Outputs at padded positions are finite but meaningless.

    Raises
    ------
    ShapeError
        An array of the wrong rank, shape or dtype, or ``key_lengths`` outside ``[0, L]``; the
        message names the argument.
    ArgumentError
        A scalar option of the wrong type or out of range (``num_heads``, ``activation``,
        ``eps1``, ``eps2``, ``scale``, ``temperature``, ``precision``), or a norm bias without
        its weight.
    BackendError
        ``backend="cuda"`` or CUDA arrays.

    Examples
    --------
    >>> import numpy as np
    >>> from mmcore.ops import encoder_layer
    >>> rng = np.random.default_rng(0)
    >>> E, F = 8, 16
    >>> w = lambda *s: (0.1 * rng.standard_normal(s)).astype(np.float32)
    >>> x = rng.standard_normal((2, 5, E)).astype(np.float32)
    >>> y = encoder_layer(x, num_heads=2, in_proj_weight=w(3 * E, E), out_proj_weight=w(E, E),
    ...                   linear1_weight=w(F, E), linear2_weight=w(E, F),
    ...                   key_lengths=np.array([5, 3]))
    >>> y.shape, y.dtype
    ((2, 5, 8), dtype('float32'))
    >>> y8 = encoder_layer(x, num_heads=2, in_proj_weight=w(3 * E, E), out_proj_weight=w(E, E),
    ...                    linear1_weight=w(F, E), linear2_weight=w(E, F), precision="int8")
    >>> y8.shape
    (2, 5, 8)
    """
    # (1) the backend
    name = _backend.resolve_backend(_OP, (x,), backend)
    if name not in ("native", "numba"):
        raise BackendError(f"[{_OP}] backend {name!r} is not available for encoder_layer "
                           "(native or numba)")
    # (2) the arguments, once
    prec = resolve_precision(_OP, precision)
    if not (activation is None or isinstance(activation, str)) or activation not in ACTIVATIONS:
        raise ArgumentError(f"[{_OP}] activation must be one of "
                            f"{', '.join(repr(a) for a in ACTIVATIONS)}, got {activation!r}")
    xa = as_host_array(_OP, "x", x)
    check_rank(_OP, "x", xa, 3, "(B, L, E)")
    xa = float32_contiguous(_OP, "x", xa)
    B, L, E = (int(n) for n in xa.shape)
    if E < 1:
        raise ShapeError(f"[{_OP}] x has E = 0 features, expected at least 1")
    H = check_int("num_heads", num_heads, op=_OP, lo=1)
    if E % H:
        raise ArgumentError(f"[{_OP}] num_heads = {H} does not divide E = {E} (x's last axis)")
    w_in = _weight("in_proj_weight", in_proj_weight, 3 * E, E, "(3E, E)")
    w_out = _weight("out_proj_weight", out_proj_weight, E, E, "(E, E)")
    w1 = _weight("linear1_weight", linear1_weight, None, E, "(F, E)")
    F = int(w1.shape[0])
    w2 = _weight("linear2_weight", linear2_weight, E, F, "(E, F)")
    biases = (_vector("in_proj_bias", in_proj_bias, 3 * E, "(3E,)"),
              _vector("out_proj_bias", out_proj_bias, E, "(E,)"),
              _vector("linear1_bias", linear1_bias, F, "(F,)"),
              _vector("linear2_bias", linear2_bias, E, "(E,)"))
    norms = tuple(_vector(n, v, E, "(E,)") for n, v in (
        ("norm1_weight", norm1_weight), ("norm1_bias", norm1_bias),
        ("norm2_weight", norm2_weight), ("norm2_bias", norm2_bias)))
    for i in (1, 2):
        if norms[2 * i - 1] is not None and norms[2 * i - 2] is None:
            raise ArgumentError(f"[{_OP}] norm{i}_bias needs norm{i}_weight")
    eps = tuple(check_float(n, v, op=_OP, lo=0.0, lo_open=True, float32=False)
                for n, v in (("eps1", eps1), ("eps2", eps2)))
    eff_scale = attention_scalars(_OP, E // H, scale, temperature, 0.0, None).eff_scale
    kl = None
    if key_lengths is not None:
        kl = as_host_array(_OP, "key_lengths", key_lengths)
        if kl.dtype.kind not in "iu":
            raise ShapeError(f"[{_OP}] key_lengths has dtype {kl.dtype}, expected an integer "
                             "dtype")
        if kl.shape != (B,):
            raise ShapeError(f"[{_OP}] key_lengths has shape {kl.shape}, expected ({B},) = (B,)")
        if kl.size and (kl.min() < 0 or kl.max() > L):
            raise ShapeError(f"[{_OP}] key_lengths must lie in [0, L = {L}], got values in "
                             f"[{int(kl.min())}, {int(kl.max())}]")
        kl = np.ascontiguousarray(kl, dtype=np.int64)
    check_int8_features(_OP, max(E, F), prec)
    out = np.empty((B, L, E), np.float32)
    if B * L == 0:
        return out
    weights: Tuple[WeightOperand, ...] = tuple(weight_operand(w, name, prec)
                                               for w in (w_in, w_out, w1, w2))
    # (3) the kernel
    launcher(_OP, name, "encoder_layer", "encoder_layer")(
        xa, out, kl, num_heads=H, weights=weights, biases=biases, norms=norms, eps1=eps[0],
        eps2=eps[1], activation=ACTIVATIONS[activation], scale=eff_scale, precision=prec)
    return out
