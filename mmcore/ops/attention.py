"""Scaled dot-product attention for cross-modal inputs (``mmcore.ops.attention``)."""

from __future__ import annotations

import contextlib
from types import ModuleType
from typing import Literal, Optional, Tuple, Union, overload

import numpy as np

from .. import _backend
from .._precision import resolve_precision
from ..errors import ShapeError
from ..kernels import launcher
from ._checks import (
    FLOAT_INPUT_DTYPES,
    as_host_array,
    attention_results,
    attention_scalars,
    broadcast_view,
    check_bool,
    check_qkv_shapes,
    dropout_threshold,
)
from ._types import Array, Backend

__all__ = ["attention", "dropout_threshold"]

_OP = "attention"


# The result is ``out`` alone or a tuple, as return_weights / return_lse ask: one overload each.
@overload
def attention(q: Array, k: Array, v: Array, *, mask: Optional[Array] = None,
              key_lengths: Optional[Array] = None, bias: Optional[Array] = None,
              scale: Optional[float] = None, temperature: float = 1.0, dropout_p: float = 0.0,
              seed: Optional[int] = None, return_weights: Literal[False] = False,
              return_lse: Literal[False] = False, precision: Optional[str] = None,
              backend: Optional[Backend] = None) -> Array: ...
@overload
def attention(q: Array, k: Array, v: Array, *, mask: Optional[Array] = None,
              key_lengths: Optional[Array] = None, bias: Optional[Array] = None,
              scale: Optional[float] = None, temperature: float = 1.0, dropout_p: float = 0.0,
              seed: Optional[int] = None, return_weights: Literal[True],
              return_lse: Literal[False] = False, precision: Optional[str] = None,
              backend: Optional[Backend] = None) -> Tuple[Array, Array]: ...
@overload
def attention(q: Array, k: Array, v: Array, *, mask: Optional[Array] = None,
              key_lengths: Optional[Array] = None, bias: Optional[Array] = None,
              scale: Optional[float] = None, temperature: float = 1.0, dropout_p: float = 0.0,
              seed: Optional[int] = None, return_weights: Literal[False] = False,
              return_lse: Literal[True], precision: Optional[str] = None,
              backend: Optional[Backend] = None) -> Tuple[Array, Array]: ...
@overload
def attention(q: Array, k: Array, v: Array, *, mask: Optional[Array] = None,
              key_lengths: Optional[Array] = None, bias: Optional[Array] = None,
              scale: Optional[float] = None, temperature: float = 1.0, dropout_p: float = 0.0,
              seed: Optional[int] = None, return_weights: Literal[True], return_lse: Literal[True],
              precision: Optional[str] = None,
              backend: Optional[Backend] = None) -> Tuple[Array, Array, Array]: ...
@overload
def attention(q: Array, k: Array, v: Array, *, mask: Optional[Array] = None,
              key_lengths: Optional[Array] = None, bias: Optional[Array] = None,
              scale: Optional[float] = None, temperature: float = 1.0, dropout_p: float = 0.0,
              seed: Optional[int] = None, return_weights: bool = False, return_lse: bool = False,
              precision: Optional[str] = None,
              backend: Optional[Backend] = None) -> Union[Array, Tuple[Array, ...]]: ...
def attention(q: Array, k: Array, v: Array, *, mask: Optional[Array] = None,
              key_lengths: Optional[Array] = None, bias: Optional[Array] = None,
              scale: Optional[float] = None, temperature: float = 1.0, dropout_p: float = 0.0,
              seed: Optional[int] = None, return_weights: bool = False, return_lse: bool = False,
              precision: Optional[str] = None,
              backend: Optional[Backend] = None) -> Union[Array, Tuple[Array, ...]]:
    """Scaled dot-product attention from queries of one modality to keys/values of another.

    ``scores = (q @ k^T) * scale / temperature + bias``, masked where ``mask`` is False or the
    key index is ``>= key_lengths[b]``; ``out = softmax(scores) @ v``. Computed in float32 with
    a tiled online softmax: unless ``return_weights`` is set, no (Lq, Lk) matrix is allocated.

    Parameters
    ----------
    q : array (B, H, Lq, D)
        Queries, float32, float16 or bfloat16 (float64 is cast to float32). On the host a
        bfloat16 array (``ml_dtypes.bfloat16`` NumPy arrays, torch ``bfloat16`` tensors) is
        widened to float32, which is exact, so it computes with exactly the values given. On
        the cuda backend (CuPy, or a DLPack / ``__cuda_array_interface__`` array such as a torch
        tensor) float16 / bfloat16 are read in place and use tensor cores on sm_80 and newer.
    k : array (B, H, Lk, D)
        Keys. ``Lk`` may differ from ``Lq``.
    v : array (B, H, Lk, Dv)
        Values. ``Dv`` may differ from ``D``.
    mask : bool array broadcastable to (B, H, Lq, Lk), optional
        True = may attend (the PyTorch SDPA convention). Use ``bias`` for additive masks.
    key_lengths : int array (B,), optional
        Keys at index ``>= key_lengths[b]`` are ignored: the fast path for padded keys.
    bias : float array broadcastable to (B, H, Lq, Lk), optional
        Added to the scores; ``-inf`` entries act as a mask. NaN and ``+inf`` are rejected.
        bfloat16 is accepted as for ``q``.
    scale : float, optional
        Multiplies ``q @ k^T``; defaults to ``1 / sqrt(D)``. Must be finite in float32, as must
        ``scale / temperature`` (the factor the kernels apply).
    temperature : float, default 1.0
        Divides the scaled scores; must be finite and > 0 (also once rounded to float32).
    dropout_p : float, default 0.0
        Probability in ``[0, 1)`` of dropping each attention weight (kept ones are scaled by
        ``1 / (1 - p)``). Off by default: mmcore is an inference library. The mask is a pure
        function of ``(seed, b, h, i, j)``, identical on every backend.
    seed : int, optional
        Dropout seed; a random one is drawn when ``None`` and dropout is on.
    return_weights : bool, default False
        Also return the attention weights (B, H, Lq, Lk), after dropout, so that
        ``out == weights @ v``.
    return_lse : bool, default False
        Also return the log-sum-exp of the (masked) scores per query row (B, H, Lq), before
        dropout; ``-inf`` for rows with no key to attend to.
    precision : {"highest", "bf16", "int8"}, optional
        The arithmetic of the two products (:mod:`mmcore._precision`); default: the current
        one, :func:`mmcore.get_matmul_precision`. ``"highest"``: float32, exact as ever.
        ``"bf16"``: ``q``, ``k`` and ``v`` rounded to bfloat16; the native kernel also rounds
        the softmax numerators ``P`` to bfloat16 before ``P @ v`` (the numba kernel does not);
        scores, softmax statistics and sums stay float32. ``"int8"``: as ``"highest"``
        (attention has no int8 arithmetic; only weight products are quantized). The cuda
        backend computes as ``"highest"`` whatever the precision.
    backend : {"native", "numba", "cuda"}, optional
        Override the backend (see :mod:`mmcore._backend`).

    Returns
    -------
    out : float32 array (B, H, Lq, Dv), or a tuple ``(out[, weights][, lse])``
        float32 whatever the input dtypes (bfloat16 inputs included). A query row with no key
        to attend to gives zeros (and ``lse = -inf``), never NaN.

    Raises
    ------
    ShapeError
        An array of the wrong rank, shape or dtype (or ``bias`` with NaN / ``+inf``).
    ArgumentError
        A scalar option of the wrong type or out of range (``scale``, ``temperature``,
        ``dropout_p``, ``seed``, ``return_weights``, ``return_lse``, ``precision``); the
        message names it.

    Notes
    -----
    Non-finite inputs are never hidden: a NaN score of an attendable key (NaN in ``q`` or in an
    unmasked ``k``) makes its whole row NaN (out, weights and lse). ``out`` is ``weights @ v``
    in IEEE arithmetic over the keys before ``key_lengths``, so NaN or Inf in ``v`` there reaches
    every non-empty row of that (b, h), even where the weight is 0 (masked or dropped), as with
    PyTorch's SDPA. Keys at or past ``key_lengths[b]`` are never read: padding may hold anything.

    Examples
    --------
    >>> import numpy as np
    >>> from mmcore.ops import attention
    >>> rng = np.random.default_rng(0)
    >>> q = rng.standard_normal((1, 8, 77, 64), dtype=np.float32)    # text tokens
    >>> k = rng.standard_normal((1, 8, 577, 64), dtype=np.float32)   # image patches
    >>> v = rng.standard_normal((1, 8, 577, 32), dtype=np.float32)
    >>> out, w = attention(q, k, v, key_lengths=np.array([500]), return_weights=True)
    >>> out.shape, w.shape, bool(np.allclose(w.sum(-1), 1, atol=1e-5)), float(w[..., 500:].max())
    ((1, 8, 77, 32), (1, 8, 77, 577), True, 0.0)
    >>> fast = attention(q, k, v, key_lengths=np.array([500]), precision="bf16")
    >>> bool(np.abs(fast - out).max() < 2 ** -6)
    True
    """
    return_weights = check_bool("return_weights", return_weights, op=_OP)
    return_lse = check_bool("return_lse", return_lse, op=_OP)
    prec = resolve_precision(_OP, precision)
    # (1) the backend and its array module
    name = _backend.resolve_backend(_OP, (q, k, v), backend)
    dev: Optional[ModuleType]       # the CUDA glue, None on the host
    if name == "cuda":
        from ..kernels.cuda import attention as cuda_glue
        dev = cuda_glue
        xp = cuda_glue.cupy_module(_OP)
        q, k, v, bf16 = cuda_glue.read_qkv(xp, _OP, q, k, v)  # same device; bfloat16 as uint16
        where = cuda_glue.on_device(xp, q)
    else:
        dev, xp, bf16 = None, np, (False, False, False)
        q, k, v = (_host_array(n, a) for n, a in (("q", q), ("k", k), ("v", v)))
        where = contextlib.nullcontext()

    # (2) the arguments, once, against xp
    B, H, Lq, Lk, D, Dv = check_qkv_shapes(_OP, q, k, v)
    for n, a, is_bf16 in (("q", q, bf16[0]), ("k", k, bf16[1]), ("v", v, bf16[2])):
        if not is_bf16 and np.dtype(a.dtype) not in FLOAT_INPUT_DTYPES:
            raise ShapeError(f"[{_OP}] {n} has dtype {a.dtype}, expected float32, float16 or "
                             "bfloat16 (float64 is cast)")
    sc = attention_scalars(_OP, D, scale, temperature, dropout_p, seed)

    full = (B, H, Lq, Lk)
    dims = "(B, H, Lq, Lk)"
    with where:
        if dev is None:
            q, k, v = (xp.ascontiguousarray(a, dtype=xp.float32) for a in (q, k, v))
        else:       # float16 / bfloat16 stay as they are when all three agree
            q, k, v = dev.kernel_inputs(xp, q, k, v, bf16)
        mask_v = None
        if mask is not None:
            m = _array(dev, xp, "mask", mask, q)
            if m.dtype != xp.bool_:
                raise ShapeError(f"[{_OP}] mask has dtype {m.dtype}, expected bool (True = may "
                                 "attend); pass additive masks as bias")
            mask_v = broadcast_view(_OP, "mask", m, full, dims, xp=xp)
        bias_v = None
        if bias is not None:
            if dev is None:
                bb, bb_bf16 = _host_array("bias", bias), False
            else:
                bb, bb_bf16 = dev.read_float(xp, _OP, "bias", bias, q)
                if bb_bf16:
                    bb = dev.bf16_to_float32(xp, bb)
            if not bb_bf16 and np.dtype(bb.dtype) not in FLOAT_INPUT_DTYPES:
                raise ShapeError(f"[{_OP}] bias has dtype {bb.dtype}, expected a float dtype")
            bb = bb.astype(xp.float32, copy=False)
            # NaN and +inf both fail `x < inf`: one reduction (one flag read back on a device)
            if bb.size and bool((~(bb < xp.inf)).any()):
                raise ShapeError(f"[{_OP}] bias contains NaN or +inf; use -inf (or mask) to "
                                 "exclude keys")
            bias_v = broadcast_view(_OP, "bias", bb, full, dims, xp=xp)
        kl = None
        if key_lengths is not None:
            # a host sequence of B lengths is copied to the device (it is tiny)
            on_device = dev is not None and _backend.is_cuda_array(key_lengths)
            kl = (_array(dev, xp, "key_lengths", key_lengths, q) if on_device
                  else as_host_array(_OP, "key_lengths", key_lengths))
            if kl.dtype.kind not in "iu":
                raise ShapeError(f"[{_OP}] key_lengths has dtype {kl.dtype}, expected an integer "
                                 "dtype")
            if tuple(kl.shape) != (B,):
                raise ShapeError(f"[{_OP}] key_lengths has shape {tuple(kl.shape)}, expected "
                                 f"({B},) = (B,)")
            if kl.size and bool(((kl < 0) | (kl > Lk)).any()):
                raise ShapeError(f"[{_OP}] key_lengths must lie in [0, Lk = {Lk}], got values "
                                 f"in [{int(kl.min())}, {int(kl.max())}]")
            kl = xp.ascontiguousarray(xp.asarray(kl), dtype=xp.int64)

        out = xp.empty((B, H, Lq, Dv), xp.float32)
        weights = xp.empty(full, xp.float32) if return_weights else None
        lse = xp.empty((B, H, Lq), xp.float32) if return_lse else None

        # (3) the kernel
        launch = launcher(_OP, name, "attention", "attention")
        # the host kernels take the precision; the cuda one computes float32 as "highest"
        host = {} if dev is not None else {"precision": prec}
        launch(q, k, v, out, weights, lse, mask_v, bias_v, kl, sc.eff_scale, sc.use_dropout,
               sc.seed, sc.threshold, sc.drop_scale, **host)
    return attention_results(out, weights, lse)


def _host_array(name: str, x) -> np.ndarray:
    """``x`` as a NumPy array; bfloat16 (an ``ml_dtypes.bfloat16`` array, a torch ``bfloat16``
    tensor) widened to float32, which is exact."""
    if type(x).__module__.partition(".")[0] == "torch" and str(getattr(x, "dtype", "")) == \
            "torch.bfloat16":
        x = x.detach().float().numpy()
    a = as_host_array(_OP, name, x)
    if a.dtype.name == "bfloat16":
        a = a.astype(np.float32)
    return a


def _array(dev, xp, name: str, x, q):
    """``x`` as an array of ``xp``; on a device, on the device of ``q``."""
    if dev is None:
        return _host_array(name, x)
    return dev.device_input(xp, _OP, name, x, q)
