"""CUDA paths of the public ops: argument checks for device arrays, then ``mmcore._cuda``.

The public ops (:mod:`mmcore.ops`) call into this module when their inputs live on a CUDA
device. Arguments are validated here with the same rules and messages as the host path, device
arrays are handled through CuPy, and the kernels run asynchronously on CuPy's current stream of
the inputs' device. Results are CuPy arrays on that device.

Data never moves between host and device implicitly. The one exception is ``key_lengths``: a
host integer sequence of ``B`` entries is copied to the device because it is a tiny argument
(a CuPy array avoids that copy).

Some checks read a single flag back from the device and therefore wait for the current stream:
the NaN/+inf check of ``bias`` and the range check of a device ``key_lengths``.
"""

from __future__ import annotations


import numpy as np

from ..._backend import is_cuda_array
from ...errors import ShapeError
from .common import cuda_module as _cuda_module
from .common import cupy_module as _cupy
from .common import device_array as _device_array
from .common import same_device as _same_device
from ...ops._checks import as_host_array, attention_results, attention_scalars, check_qkv_shapes

__all__ = ["attention_cuda"]

_FLOAT_DTYPES = ("float16", "float32", "float64")


def _broadcast(cp, op: str, name: str, x, shape, dims: str):
    """A broadcast view of ``x`` with ``shape`` (zero strides, no copy)."""
    if x.ndim > len(shape):
        raise ShapeError(f"[{op}] {name} has {x.ndim} dims, expected at most {len(shape)} {dims}")
    try:
        return cp.broadcast_to(x, tuple(shape))
    except ValueError:
        raise ShapeError(f"[{op}] {name} of shape {tuple(x.shape)} is not broadcastable to "
                         f"{dims} = {tuple(shape)}") from None


def _element_strides(x):
    """Strides in elements (the kernels index with element strides; 0 = broadcast)."""
    item = x.dtype.itemsize
    return tuple(int(s) // item for s in x.strides)


def _check_float(op: str, name: str, x) -> None:
    if x.dtype.name not in _FLOAT_DTYPES:
        raise ShapeError(f"[{op}] {name} has dtype {x.dtype}, expected float32, float16 or "
                         "bfloat16 (float64 is cast)")


# The __cuda_array_interface__ typestr of bfloat16 data (PyTorch and ml_dtypes write "<V2").
_BF16_TYPESTRS = ("<V2",)


class _Reinterpreted:
    """The memory of a foreign CUDA array seen through another ``__cuda_array_interface__``
    (same pointer, shape and strides); keeps the original object alive."""

    def __init__(self, owner, interface):
        self._owner = owner
        self.__cuda_array_interface__ = interface


def _cuda_interface(x):
    try:
        iface = getattr(x, "__cuda_array_interface__", None)
    except Exception:  # e.g. a tensor that requires grad: device_array reports it
        return None
    return iface if isinstance(iface, dict) else None


def _float_input(cp, op: str, name: str, x):
    """``(array, is_bfloat16)`` for a device input; bfloat16 data (a CuPy bfloat16 array, or a
    foreign array whose interface says "<V2", or a DLPack bfloat16 tensor that CuPy reads) comes
    back as a ``uint16`` view of the same memory, never copied."""
    if not isinstance(x, cp.ndarray):
        iface = _cuda_interface(x)
        if iface is not None and iface.get("typestr") in _BF16_TYPESTRS:
            shape = tuple(int(n) for n in iface.get("shape", ()))
            if 0 in shape:  # no memory to view (the data pointer may be 0)
                return cp.empty(shape, dtype=cp.uint16), True
            view = dict(iface)
            view["typestr"] = "<u2"
            view.pop("descr", None)
            x = _device_array(cp, op, name, _Reinterpreted(x, view))
            return x, True
        x = _device_array(cp, op, name, x)
    if x.dtype.name == "bfloat16":
        return x.view(cp.uint16), True
    return x, False


def _bf16_to_float32(cp, u):
    """float32 values of bfloat16 bits held as uint16 (exact: bfloat16 is truncated float32)."""
    return (cp.ascontiguousarray(u).astype(cp.uint32) << 16).view(cp.float32)


def attention_cuda(q, k, v, *, mask, key_lengths, bias, scale, temperature, dropout_p, seed,
                   return_weights, return_lse):
    """Attention on CUDA device arrays; the semantics of :func:`mmcore.ops.attention`.

    q, k and v must be CuPy arrays (or expose ``__cuda_array_interface__`` / CUDA DLPack) on one
    device. If all three are float16 (or all bfloat16: CuPy bfloat16 arrays, or foreign arrays
    such as PyTorch tensors whose ``__cuda_array_interface__`` typestr is ``"<V2"``) they are read
    as such and computed with float32 accumulation (tensor cores on compute capability 8.0 and
    newer); otherwise they are cast to float32 on the device (float64 included). ``mask`` (bool) and
    ``bias`` (float) must be device arrays on the same device and are read through broadcast
    strides without copies (bias is cast to float32 first when needed). ``key_lengths`` may be a
    device integer array or a host sequence (copied, it is only ``B`` integers). Outputs are
    new float32 CuPy arrays on the same device, written asynchronously on CuPy's current stream.
    """
    op = "attention"
    cp = _cupy(op)
    mod = _cuda_module(op)

    q, q_bf = _float_input(cp, op, "q", q)
    k, k_bf = _float_input(cp, op, "k", k)
    v, v_bf = _float_input(cp, op, "v", v)
    device = q.device.id
    _same_device(op, "k", k, device, "q")
    _same_device(op, "v", v, device, "q")

    B, H, Lq, Lk, D, Dv = check_qkv_shapes(op, q, k, v)
    for name, x, bf in (("q", q, q_bf), ("k", k, k_bf), ("v", v, v_bf)):
        if not bf:
            _check_float(op, name, x)

    sc = attention_scalars(op, D, scale, temperature, dropout_p, seed)

    full = (B, H, Lq, Lk)
    dims = "(B, H, Lq, Lk)"
    with cp.cuda.Device(device):
        if q_bf and k_bf and v_bf:
            dtype_flag = 2
            q = cp.ascontiguousarray(q)
            k = cp.ascontiguousarray(k)
            v = cp.ascontiguousarray(v)
        elif not (q_bf or k_bf or v_bf) and q.dtype == k.dtype == v.dtype == cp.float16:
            dtype_flag = 1
            q = cp.ascontiguousarray(q)
            k = cp.ascontiguousarray(k)
            v = cp.ascontiguousarray(v)
        else:
            dtype_flag = 0
            q = _bf16_to_float32(cp, q) if q_bf else cp.ascontiguousarray(q, dtype=cp.float32)
            k = _bf16_to_float32(cp, k) if k_bf else cp.ascontiguousarray(k, dtype=cp.float32)
            v = _bf16_to_float32(cp, v) if v_bf else cp.ascontiguousarray(v, dtype=cp.float32)

        mask_v = None
        if mask is not None:
            m = _device_array(cp, op, "mask", mask)
            _same_device(op, "mask", m, device, "q")
            if m.dtype != cp.bool_:
                raise ShapeError(f"[{op}] mask has dtype {m.dtype}, expected bool (True = may "
                                 "attend); pass additive masks as bias")
            mask_v = _broadcast(cp, op, "mask", m, full, dims)

        bias_v = None
        if bias is not None:
            bb, bb_bf = _float_input(cp, op, "bias", bias)
            _same_device(op, "bias", bb, device, "q")
            if bb_bf:
                bb = _bf16_to_float32(cp, bb)
            elif bb.dtype.name not in _FLOAT_DTYPES:
                raise ShapeError(f"[{op}] bias has dtype {bb.dtype}, expected a float dtype")
            bb = bb.astype(cp.float32, copy=False)
            # NaN and +inf both fail `x < inf`: one reduction, one flag read back.
            if bb.size and bool((~(bb < cp.inf)).any()):
                raise ShapeError(f"[{op}] bias contains NaN or +inf; use -inf (or mask) to "
                                 "exclude keys")
            bias_v = _broadcast(cp, op, "bias", bb, full, dims)

        kl = None
        if key_lengths is not None:
            if is_cuda_array(key_lengths):
                kl = _device_array(cp, op, "key_lengths", key_lengths)
                _same_device(op, "key_lengths", kl, device, "q")
            else:
                kl = as_host_array(op, "key_lengths", key_lengths)
            if kl.dtype.kind not in "iu":
                raise ShapeError(f"[{op}] key_lengths has dtype {kl.dtype}, expected an integer "
                                 "dtype")
            if tuple(kl.shape) != (B,):
                raise ShapeError(f"[{op}] key_lengths has shape {tuple(kl.shape)}, expected "
                                 f"({B},) = (B,)")
            if isinstance(kl, np.ndarray):
                if kl.size and (kl.min() < 0 or kl.max() > Lk):
                    raise ShapeError(f"[{op}] key_lengths must lie in [0, Lk = {Lk}], got values "
                                     f"in [{int(kl.min())}, {int(kl.max())}]")
                kl = cp.asarray(np.ascontiguousarray(kl, dtype=np.int64))
            else:
                if kl.size and bool(((kl < 0) | (kl > Lk)).any()):
                    raise ShapeError(f"[{op}] key_lengths must lie in [0, Lk = {Lk}], got values "
                                     f"in [{int(kl.min())}, {int(kl.max())}]")
                kl = cp.ascontiguousarray(kl, dtype=cp.int64)

        out = cp.empty((B, H, Lq, Dv), dtype=cp.float32)
        weights = cp.empty(full, dtype=cp.float32) if return_weights else None
        lse = cp.empty((B, H, Lq), dtype=cp.float32) if return_lse else None

        def ptr(x):
            return 0 if x is None or x.size == 0 else int(x.data.ptr)

        zero = (0, 0, 0, 0)
        stream = cp.cuda.get_current_stream()
        mod.attention(ptr(q), ptr(k), ptr(v), ptr(out), ptr(weights), ptr(lse),
                      ptr(mask_v), _element_strides(mask_v) if mask_v is not None else zero,
                      ptr(bias_v), _element_strides(bias_v) if bias_v is not None else zero,
                      ptr(kl), B, H, Lq, Lk, D, Dv, sc.eff_scale, sc.use_dropout, sc.seed, sc.threshold,
                      sc.drop_scale, dtype_flag, int(stream.ptr), device)

    return attention_results(out, weights, lse)
