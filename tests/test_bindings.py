"""Conventions of the binding modules (csrc/bindings): enum arguments by name with one message
format, scalar options by keyword. The mmcore._cuda checks run without a GPU: a call with
nothing to compute returns before touching the device."""

from __future__ import annotations

import importlib

import numpy as np
import pytest

from mmcore import _backend

C = _backend.native_module()


def _cuda():
    try:
        return importlib.import_module("mmcore._cuda")
    except ImportError:
        pytest.skip("mmcore._cuda is not built")


@pytest.mark.parametrize("call, message", [
    (lambda x, o: C.linear(x, np.ones((2, 3), np.float32), None, o, activation="swish",
                           num_threads=1),
     "[linear] activation must be one of 'none', 'gelu', 'gelu_tanh', 'quick_gelu', 'relu'; "
     "got 'swish'"),
    (lambda x, o: C.linear(x, np.ones((2, 3), np.float32), None, o, weight_kind="int4",
                           num_threads=1),
     "[linear] weight_kind must be one of 'float32', 'float16', 'bfloat16', 'int8'; got 'int4'"),
    (lambda x, o: C.resize([np.zeros((2, 2, 3), np.uint8)], [np.zeros((1, 1, 3), np.uint8)],
                           filter="cubic", antialias=True, num_threads=1),
     "[resize] filter must be one of 'nearest', 'bilinear', 'bicubic', 'lanczos'; got 'cubic'"),
])
def test_native_enum_names(call, message):
    x, out = np.ones((4, 3), np.float32), np.empty((4, 2), np.float32)
    with pytest.raises(ValueError) as info:
        call(x, out)
    assert str(info.value) == message


def test_native_enum_by_name_runs():
    x, w = np.array([[1.0, -2.0]], np.float32), np.array([[1.0, 1.0], [1.0, 0.0]], np.float32)
    out = np.empty((1, 2), np.float32)
    C.linear(x, w, None, out, activation="relu", weight_kind="float32", num_threads=1)
    np.testing.assert_array_equal(out, [[0.0, 1.0]])


def test_native_attention_scalars_are_keyword_only():
    q = np.ones((1, 1, 2, 4), np.float32)
    out = np.empty_like(q)
    with pytest.raises(TypeError):
        C.attention(q, q, q, out, None, None, None, None, None, 0.5, False, 0, 0, 1.0, 1)
    C.attention(q, q, q, out, None, None, None, None, None, scale=0.5, dropout=False, seed=0,
                threshold=0, dropout_scale=1.0, num_threads=1)
    np.testing.assert_array_equal(out, q)


def test_cuda_enum_names_without_a_gpu():
    m = _cuda()
    z = (0, 0, 0, 0)
    # B = 0: nothing to compute, no device call
    m.attention(0, 0, 0, 0, 0, 0, 0, z, 0, z, 0, 0, 1, 1, 1, 4, 4, 1.0, False, 0, 0, 1.0,
                "bfloat16", 0, -1)
    with pytest.raises(ValueError, match=r"^\[attention\] dtype must be one of 'float32', "
                                         r"'float16', 'bfloat16'; got '2'$"):
        m.attention(0, 0, 0, 0, 0, 0, 0, z, 0, z, 0, 0, 1, 1, 1, 4, 4, 1.0, False, 0, 0, 1.0,
                    "2", 0, -1)
    with pytest.raises(TypeError):      # integer codes are gone
        m.attention(0, 0, 0, 0, 0, 0, 0, z, 0, z, 0, 0, 1, 1, 1, 4, 4, 1.0, False, 0, 0, 1.0,
                    2, 0, -1)
    assert m.resize_workspace([], 3, "uint8", "lanczos", True) == 0
    with pytest.raises(ValueError, match=r"^\[resize\] filter must be one of"):
        m.resize_workspace([], 3, "uint8", "cubic", True)
    with pytest.raises(ValueError, match=r"^\[normalize\] layout must be one of 'chw', 'hwc'"):
        m.normalize(0, 0, 0, 1, 1, 3, "uint8", 0, 0, 1.0, "nchw", 0, -1)
    with pytest.raises(ValueError, match=r"^\[fuse\] strategy must be one of"):
        m.fuse(0, 0, 0, True, 0, True, 0, 0, 0, 2, 4, "softmax", 0, -1)
    with pytest.raises(ValueError, match=r"^\[spectral\] log_mode must be one of"):
        m.spectral(0, 0, 0, 0, 0, 0, 0, 0, 10, 16, 4, 16, 0, 8, "reflect", 0, 0.0, 0, False, 0.0,
                   "mel", 2.0, 0, "log2", 1e-10, False, 0, -1)
