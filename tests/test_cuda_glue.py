"""The host-side glue of the CUDA paths, without a GPU: CuPy and mmcore._cuda lookup errors and
the device-array helpers, with a minimal stand-in for CuPy."""

from __future__ import annotations

import sys
import types

import numpy as np
import pytest

from mmcore.errors import ArgumentError, BackendError
from mmcore.kernels.cuda import common as cc


class _Device:
    def __init__(self, i):
        self.id = i


class _FakeArray:
    def __init__(self, data, device=0):
        self.data = np.asarray(data)
        self.dtype = self.data.dtype
        self.device = _Device(device)


class _Interface:
    """Exposes __cuda_array_interface__ only (like a foreign CUDA array)."""
    __cuda_array_interface__ = {"shape": (2,), "typestr": "<f4", "data": (0, False), "version": 3}


def _fake_cupy():
    cp = types.SimpleNamespace()
    cp.ndarray = _FakeArray
    cp.asarray = lambda x: _FakeArray([1.0, 2.0])
    return cp


def test_cupy_missing_gives_backend_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "cupy", None)   # import cupy -> ImportError
    with pytest.raises(BackendError, match=r"\[resize\] CUDA arrays need CuPy"):
        cc.cupy_module("resize")


def test_cuda_module_missing_or_without_kernel(monkeypatch):
    monkeypatch.setitem(sys.modules, "mmcore._cuda", None)
    with pytest.raises(BackendError, match=r"\[fuse\] the CUDA module mmcore._cuda is missing"):
        cc.cuda_module("fuse", "fuse")
    fake = types.ModuleType("mmcore._cuda")
    monkeypatch.setitem(sys.modules, "mmcore._cuda", fake)
    assert cc.cuda_module("fuse") is fake
    with pytest.raises(BackendError, match="no fuse kernel"):
        cc.cuda_module("fuse", "fuse")
    fake.fuse = lambda *a: None
    assert cc.cuda_module("fuse", "fuse") is fake


def test_device_array_rules():
    cp = _fake_cupy()
    a = _FakeArray([1.0])
    assert cc.device_array(cp, "op", "x", a) is a
    assert isinstance(cc.device_array(cp, "op", "x", _Interface()), _FakeArray)
    with pytest.raises(ArgumentError, match=r"\[op\] x is required"):
        cc.device_array(cp, "op", "x", None)
    with pytest.raises(BackendError, match=r"\[op\] mask is a host object \(ndarray\)"):
        cc.device_array(cp, "op", "mask", np.zeros(3))


def test_same_device():
    cc.same_device("op", "k", _FakeArray([1], device=1), 1)
    with pytest.raises(BackendError, match=r"\[op\] k is on CUDA device 1 but q is on device 0"):
        cc.same_device("op", "k", _FakeArray([1], device=1), 0, "q")


@pytest.mark.parametrize("module,fn", [("attention", "attention_cuda"), ("image", "resize_cuda"),
                                       ("fusion", "fuse_cuda"), ("spectral", "spectral_cuda")])
def test_cuda_paths_import_without_a_gpu(module, fn):
    import importlib
    mod = importlib.import_module(f"mmcore.kernels.cuda.{module}")
    assert callable(getattr(mod, fn))


class _DLPackOnly:
    """Exposes DLPack on a CUDA device only (like a JAX array)."""

    def __dlpack_device__(self):
        return (2, 0)   # kDLCUDA, device 0

    def __dlpack__(self, stream=None):  # pragma: no cover - never called by the fake cupy
        raise AssertionError


def test_device_array_accepts_cuda_dlpack():
    cp = _fake_cupy()
    seen = []
    cp.from_dlpack = lambda x: seen.append(x) or _FakeArray([3.0])
    obj = _DLPackOnly()
    assert isinstance(cc.device_array(cp, "op", "x", obj), _FakeArray)
    assert seen == [obj]


class _Bf16Tensor:
    """A foreign CUDA bfloat16 array: PyTorch writes typestr "<V2" for bfloat16."""

    def __init__(self):
        self.__cuda_array_interface__ = {"shape": (2, 3), "typestr": "<V2", "data": (4096, False),
                                         "strides": None, "version": 2,
                                         "descr": [("", "<V2")]}


def test_attention_reads_foreign_bfloat16_as_uint16_view():
    from mmcore.kernels.cuda import attention as _cuda_impl

    cp = _fake_cupy()
    seen = []

    def asarray(x):
        seen.append(x)
        return _FakeArray(np.zeros((2, 3), np.uint16))

    cp.asarray = asarray
    cp.uint16 = np.uint16
    src = _Bf16Tensor()
    arr, is_bf16 = _cuda_impl._float_input(cp, "attention", "q", src)
    assert is_bf16 and isinstance(arr, _FakeArray)
    (wrapper,) = seen
    iface = wrapper.__cuda_array_interface__
    assert iface["typestr"] == "<u2" and "descr" not in iface
    assert iface["shape"] == (2, 3) and iface["data"] == (4096, False)
    assert wrapper._owner is src                        # the memory's owner stays alive
    assert src.__cuda_array_interface__["typestr"] == "<V2"   # the source is left as it was

    # other dtypes pass through unchanged
    seen.clear()
    arr, is_bf16 = _cuda_impl._float_input(cp, "attention", "q", _Interface())
    assert not is_bf16 and seen and not hasattr(seen[0], "_owner")
