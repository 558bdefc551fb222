"""torch in, torch out: every public op takes CPU torch tensors without copying them and
returns torch tensors sharing the result's memory; NumPy callers see no change."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile

import numpy as np
import pytest

import mmcore
from _helpers import encoder_layer_params
from mmcore import ops
from mmcore.ops._torch import from_torch, to_torch

torch = pytest.importorskip("torch")

RNG = np.random.default_rng(0)


def f32(*shape):
    return RNG.standard_normal(shape).astype(np.float32)


# op name -> (positional args as NumPy, keyword args)
CASES = {
    "attention": lambda: ((f32(2, 3, 5, 16), f32(2, 3, 11, 16), f32(2, 3, 11, 8)), {}),
    "stft": lambda: ((f32(1000),), {"n_fft": 64}),
    "mel_spectrogram": lambda: ((f32(4000),), {}),
    "log_mel_spectrogram": lambda: ((f32(2, 4000),), {}),
    "fbank": lambda: ((f32(4000) * 1000,), {}),
    "resize": lambda: ((RNG.integers(0, 256, (2, 30, 41, 3), dtype=np.uint8), (17, 23)), {}),
    "normalize": lambda: ((RNG.integers(0, 256, (2, 9, 7, 3), dtype=np.uint8),),
                          {"mean": (0.5, 0.4, 0.3), "std": (0.2, 0.3, 0.25)}),
    "patchify": lambda: ((f32(2, 3, 32, 48),), {"patch_size": 16}),
    "preprocess_image": lambda: ((RNG.integers(0, 256, (2, 50, 70, 3), dtype=np.uint8),),
                                 {"size": 32}),
    "masked_mean": lambda: ((f32(2, 6, 8), np.array([[1, 1, 0, 1, 0, 1]] * 2, bool)), {}),
    "masked_max": lambda: ((f32(2, 6, 8), np.array([[1, 1, 0, 1, 0, 1]] * 2, bool)), {}),
    "fuse": lambda: (([f32(3, 8), f32(3, 8)],), {"strategy": "mean"}),
    "linear": lambda: ((f32(5, 16), f32(12, 16), f32(12)), {"activation": "gelu"}),
    "layer_norm": lambda: ((f32(5, 16), f32(16), f32(16)), {}),
    "encoder_layer": lambda: ((f32(2, 7, 32),),
                              {"num_heads": 4, **encoder_layer_params(RNG, 32, 64)}),
}


def to_t(x):
    if isinstance(x, np.ndarray):
        return torch.from_numpy(x)
    if isinstance(x, list):
        return [to_t(v) for v in x]
    return x


def flat(out):
    return list(out) if isinstance(out, (tuple, list)) else [out]


@pytest.mark.parametrize("name", sorted(CASES))
def test_op_takes_and_returns_torch(name):
    fn = getattr(ops, name)
    args, kw = CASES[name]()
    ref = fn(*args, **kw)
    got = fn(*[to_t(a) for a in args], **{k: to_t(v) for k, v in kw.items()})
    for r, g in zip(flat(ref), flat(got)):
        assert isinstance(g, torch.Tensor), type(g)
        np.testing.assert_array_equal(g.numpy(), np.asarray(r))
    assert isinstance(ref, np.ndarray) or isinstance(flat(ref)[0], np.ndarray)


def test_pack_weight_takes_a_tensor():
    w = f32(24, 16)
    packed = ops.pack_weight(torch.from_numpy(w))
    x = f32(3, 16)
    np.testing.assert_array_equal(ops.linear(x, packed), ops.linear(x, w))
    out = ops.linear(torch.from_numpy(x), packed)
    assert isinstance(out, torch.Tensor)


def test_numpy_callers_get_numpy():
    out = ops.attention(*CASES["attention"]()[0])
    assert type(out) is np.ndarray


def test_inputs_are_views_and_outputs_share_memory():
    t = torch.randn(4, 6)
    a = from_torch(t, torch)
    assert isinstance(a, np.ndarray) and a.__array_interface__["data"][0] == t.data_ptr()
    s = t.t()                                   # non-contiguous: a strided view, no copy
    v = from_torch(s, torch)
    assert v.__array_interface__["data"][0] == t.data_ptr() and not v.flags.c_contiguous
    g = torch.randn(3, requires_grad=True)
    assert from_torch(g, torch).__array_interface__["data"][0] == g.data_ptr()
    arr = np.arange(6, dtype=np.float32)
    out = to_torch(arr, torch)
    assert out.data_ptr() == arr.__array_interface__["data"][0]
    ro = np.arange(3.0)
    ro.flags.writeable = False
    assert to_torch(ro, torch).data_ptr() != ro.__array_interface__["data"][0]   # copied once
    nested = to_torch((arr, [arr], {"k": arr}, "text", None), torch)
    assert isinstance(nested[0], torch.Tensor) and isinstance(nested[1][0], torch.Tensor)
    assert isinstance(nested[2]["k"], torch.Tensor) and nested[3:] == ("text", None)


def test_non_contiguous_and_grad_inputs():
    x = torch.randn(16, 5).t()                  # (5, 16), strided
    w = torch.randn(12, 16, requires_grad=True)
    out = ops.linear(x, w)
    np.testing.assert_array_equal(out.numpy(), ops.linear(x.numpy(), w.detach().numpy()))
    assert not out.requires_grad


def test_device_tensors_that_require_grad_are_detached():
    # a CUDA tensor is passed on as a tensor; DLPack export refuses one that requires grad
    x = torch.empty(2, 3, device="meta", requires_grad=True)
    y = from_torch(x, torch)
    assert isinstance(y, torch.Tensor) and y.device == x.device and not y.requires_grad
    z = torch.empty(2, 3, device="meta")
    assert from_torch(z, torch) is z


def test_negative_view_of_a_real_tensor():
    z = torch.randn(3, 8, dtype=torch.complex64)
    x = z.conj().imag                           # float32 with the negative bit set
    assert x.is_neg()
    ln = (np.ones(8, np.float32), np.zeros(8, np.float32))
    out = ops.layer_norm(x, *ln)
    np.testing.assert_array_equal(out.numpy(), ops.layer_norm(-z.imag.numpy(), *ln))


def test_bfloat16_tensors():
    pytest.importorskip("ml_dtypes")
    q = torch.randn(1, 2, 5, 16).bfloat16()
    out = ops.attention(q, q, q)
    assert isinstance(out, torch.Tensor) and out.dtype == torch.float32
    ref = ops.attention(*(q.float().numpy() for _ in range(3)))
    np.testing.assert_allclose(out.numpy(), ref, rtol=0, atol=0)


def test_torch_is_never_imported_by_mmcore():
    code = ("import sys, numpy as np, mmcore, mmcore.ops as o\n"
            "x = np.ones((1, 1, 2, 4), np.float32)\n"
            "o.attention(x, x, x)\n"
            "o.preprocess_image(np.zeros((8, 8, 3), np.uint8)[None])\n"
            "assert 'torch' not in sys.modules, 'torch was imported'\n")
    env = dict(os.environ)
    env.pop("PYTHONPATH", None)
    r = subprocess.run([sys.executable, "-c", code], cwd=tempfile.gettempdir(),
                       capture_output=True, text=True, timeout=120, env=env)
    assert r.returncode == 0, r.stderr


def test_wrapped_ops_keep_their_signature_and_doc():
    import inspect
    for name in CASES:
        fn = getattr(ops, name)
        assert fn.__doc__ and fn.__wrapped__.__doc__ == fn.__doc__
        assert inspect.signature(fn) == inspect.signature(fn.__wrapped__)
    assert mmcore.ops.attention.__module__ == "mmcore.ops.attention"
