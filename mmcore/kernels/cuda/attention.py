"""CUDA launcher of :func:`mmcore.ops.attention`, and the device-side reading of its inputs.

:func:`mmcore.ops.attention` validates every argument once, against CuPy for device arrays; the
helpers here are the device-specific parts of that: reading foreign CUDA arrays (bfloat16
included, as ``uint16`` views of the same memory), checking that every array lives on the
device of ``q``, and the dtypes the kernel reads in place. :func:`attention_cuda` only launches:
it runs asynchronously on CuPy's current stream of the inputs' device.

Data never moves between host and device implicitly. The one exception is ``key_lengths``: a
host integer sequence of ``B`` entries is copied to the device because it is a tiny argument
(a CuPy array avoids that copy).

Some checks read a single flag back from the device and therefore wait for the current stream:
the NaN/+inf check of ``bias`` and the range check of a device ``key_lengths``.
"""

from __future__ import annotations

from .common import cuda_module as _cuda_module
from .common import cupy_module as _cupy
from .common import device_array as _device_array
from .common import same_device as _same_device

__all__ = ["attention_cuda", "read_qkv", "read_float", "device_input", "kernel_inputs",
           "bf16_to_float32", "on_device", "cupy_module"]

cupy_module = _cupy

def _element_strides(x):
    """Strides in elements (the kernels index with element strides; 0 = broadcast)."""
    item = x.dtype.itemsize
    return tuple(int(s) // item for s in x.strides)


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


def bf16_to_float32(cp, u):
    """float32 values of bfloat16 bits held as uint16 (exact: bfloat16 is truncated float32)."""
    return (cp.ascontiguousarray(u).astype(cp.uint32) << 16).view(cp.float32)


def read_float(cp, op: str, name: str, x, first):
    """``(array, is_bfloat16)`` of a float input on the device of ``first`` (see
    :func:`_float_input`)."""
    a, bf = _float_input(cp, op, name, x)
    _same_device(op, name, a, first.device.id, "q")
    return a, bf


def read_qkv(cp, op: str, q, k, v):
    """q, k and v as CuPy arrays on one device: ``(q, k, v, (q_bf16, k_bf16, v_bf16))``."""
    q, q_bf = _float_input(cp, op, "q", q)
    k, k_bf = read_float(cp, op, "k", k, q)
    v, v_bf = read_float(cp, op, "v", v, q)
    return q, k, v, (q_bf, k_bf, v_bf)


def device_input(cp, op: str, name: str, x, first):
    """A device array ``x`` (never a host one) on the device of ``first``."""
    a = _device_array(cp, op, name, x)
    _same_device(op, name, a, first.device.id, "q")
    return a


def on_device(cp, x):
    """The context that makes the device of ``x`` current (allocations land next to it)."""
    return cp.cuda.Device(x.device.id)


def kernel_inputs(cp, q, k, v, bf16):
    """q, k, v in a dtype the kernel reads: all bfloat16 (as uint16) or all float16 stay as
    they are (C-contiguous), anything else becomes float32."""
    if all(bf16):
        return tuple(cp.ascontiguousarray(a) for a in (q, k, v))
    if not any(bf16) and q.dtype == k.dtype == v.dtype == cp.float16:
        return tuple(cp.ascontiguousarray(a) for a in (q, k, v))
    return tuple(bf16_to_float32(cp, a) if bf else cp.ascontiguousarray(a, dtype=cp.float32)
                 for a, bf in zip((q, k, v), bf16))


def _ptr(x) -> int:
    return 0 if x is None or x.size == 0 else int(x.data.ptr)


_NO_STRIDES = (0, 0, 0, 0)


def attention_cuda(q, k, v, out, weights, lse, mask, bias, key_lengths, scale, dropout, seed,
                   threshold, dropout_scale):
    """Launch the attention kernel: the arguments of ``mmcore._C.attention`` as CuPy arrays on
    one device (validated and laid out by :func:`mmcore.ops.attention`).

    q, k, v are C-contiguous and all float32, all float16 or all bfloat16 held as ``uint16``;
    ``mask`` (bool) and ``bias`` (float32) are read through their strides (broadcast views);
    ``key_lengths`` is int64. Outputs are written asynchronously on CuPy's current stream.
    """
    op = "attention"
    cp = _cupy(op)
    mod = _cuda_module(op)
    dtype = ("bfloat16" if q.dtype == cp.uint16 else "float16" if q.dtype == cp.float16
             else "float32")
    B, H, Lq, D = (int(n) for n in q.shape)
    Lk, Dv = int(k.shape[2]), int(v.shape[3])
    device = q.device.id
    with cp.cuda.Device(device):
        stream = cp.cuda.get_current_stream()
        mod.attention(_ptr(q), _ptr(k), _ptr(v), _ptr(out), _ptr(weights), _ptr(lse),
                      _ptr(mask), _element_strides(mask) if mask is not None else _NO_STRIDES,
                      _ptr(bias), _element_strides(bias) if bias is not None else _NO_STRIDES,
                      _ptr(key_lengths), B, H, Lq, Lk, D, Dv, scale, dropout, seed, threshold,
                      dropout_scale, dtype, int(stream.ptr), device)
