"""torch in, torch out: the public ops take torch tensors and give torch tensors back.

Every op exported by :mod:`mmcore.ops` is wrapped by :func:`torch_io`. When torch has not been
imported by anyone the wrapper returns at once (one dictionary lookup); otherwise it looks at the
arguments, and when one of them (or the first item of a list argument) is a torch tensor:

* CPU tensors are passed as NumPy views of their memory (``Tensor.numpy()`` after ``detach``:
  no copy, strides kept; a conjugated or negated view is resolved first). bfloat16 tensors
  become ``ml_dtypes.bfloat16`` views when ``ml_dtypes`` is installed (the ops that take
  bfloat16 say so).
* CUDA tensors are passed as they are: the backend dispatch takes them through DLPack /
  ``__cuda_array_interface__`` into the CUDA backend.
* The result (arrays, and the arrays inside tuples, lists and dicts) comes back as torch
  tensors sharing its memory: ``torch.from_numpy`` for host arrays, ``torch.from_dlpack`` for
  CuPy arrays. Nothing is copied, except a read-only host result (torch tensors are always
  writable), which is copied once.

torch stays optional: it is never imported here.

Examples
--------
>>> import numpy as np
>>> from mmcore.ops._torch import torch_io
>>> double = torch_io(lambda x: np.asarray(x) * 2)
>>> double(np.arange(3))
array([0, 2, 4])
"""

from __future__ import annotations

import functools
import sys
from typing import Any, Callable, TypeVar

import numpy as np

__all__ = ["torch_io", "from_torch", "to_torch"]

F = TypeVar("F", bound=Callable[..., Any])


def from_torch(x: Any, torch: Any) -> Any:
    """A CPU tensor as a NumPy view of its memory (lists and tuples item by item); anything
    else unchanged."""
    kind = type(x)
    if kind in _PLAIN:
        return x
    if kind is list or kind is tuple:
        return kind([from_torch(v, torch) for v in x]) if x else x
    if not isinstance(x, torch.Tensor):
        return x
    try:
        return x.numpy()    # the common case: CPU, no grad, no conj/neg bit, a NumPy dtype
    except (RuntimeError, TypeError):
        pass
    t = x.detach() if x.requires_grad else x
    if not t.is_cpu:    # DLPack and __cuda_array_interface__ refuse tensors that require grad
        return t
    if t.is_complex():      # conjugate views exist for complex tensors only
        t = t.resolve_conj().resolve_neg()
    elif t.is_neg():        # a real negative view: the imaginary part of a conjugated view
        t = t.resolve_neg()
    if t.dtype is torch.bfloat16:
        try:
            import ml_dtypes
        except ImportError:
            return x            # the op decides (those that take bfloat16 read torch's)
        return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return t.numpy()


def to_torch(out: Any, torch: Any) -> Any:
    """``out`` with its arrays as torch tensors sharing their memory."""
    if isinstance(out, np.ndarray):
        if out.dtype.kind not in "biufc":
            return out
        if not out.flags.writeable:
            out = out.copy()
        return torch.from_numpy(out)
    if isinstance(out, tuple):
        items = tuple(to_torch(v, torch) for v in out)
        return type(out)(*items) if hasattr(out, "_fields") else items
    if isinstance(out, list):
        return [to_torch(v, torch) for v in out]
    if isinstance(out, dict):
        return {k: to_torch(v, torch) for k, v in out.items()}
    if type(out).__module__.partition(".")[0] == "cupy":
        return torch.from_dlpack(out)
    return out


#: Argument types that are never tensors, checked by identity before ``isinstance`` (whose
#: check against torch.Tensor goes through torch's metaclass: about 0.3 us each).
_PLAIN = frozenset({np.ndarray, int, float, str, bool, type(None), dict, np.float32,
                    np.float64, np.int64, np.int32, np.bool_})


def _tensor_in(values: Any, T: type) -> bool:
    plain = _PLAIN
    for a in values:
        t = type(a)
        if t in plain:
            continue
        if t is list or t is tuple:
            if a and type(a[0]) not in plain and isinstance(a[0], T):
                return True
            continue
        if isinstance(a, T):
            return True
    return False


def torch_io(fn: F) -> F:
    """``fn`` taking torch tensors (see the module docstring) and returning torch tensors
    when it was given one."""
    modules = sys.modules

    @functools.wraps(fn)
    def op(*args: Any, **kwargs: Any) -> Any:
        torch = modules.get("torch")
        if torch is None:
            return fn(*args, **kwargs)
        T = torch.Tensor
        if not (_tensor_in(args, T) or (kwargs and _tensor_in(kwargs.values(), T))):
            return fn(*args, **kwargs)
        args = tuple(from_torch(a, torch) for a in args)
        kwargs = {k: from_torch(v, torch) for k, v in kwargs.items()}
        return to_torch(fn(*args, **kwargs), torch)

    return op  # type: ignore[return-value]
