"""CUDA paths of the fusion reductions: argument checks for device arrays, then ``mmcore._cuda``.

:func:`masked_mean_cuda`, :func:`masked_max_cuda` and :func:`fuse_cuda` take the same arguments
as the native kernels ``mmcore._C.masked_mean``, ``masked_max`` and ``fuse`` (less
``num_threads``), with CuPy arrays (or anything exposing ``__cuda_array_interface__`` / CUDA
DLPack) on one device in place of NumPy arrays. Every array must already have the kernel's dtype
and be C-contiguous: the public ops in :mod:`mmcore.ops.fusion` cast and copy, these functions
only check. Outputs are written in place, asynchronously on CuPy's current stream of the device
of the first input; nothing moves between host and device.

Semantics: see ``csrc/include/mmcore/fusion.h``.

* ``masked_mean`` / ``masked_max``: ``x`` float32 (B, L, D), ``mask`` bool or uint8 (B, L)
  (nonzero = real token) or None (every token is real), ``out`` float32 (B, D). A row without
  real tokens gives zeros; ``masked_max`` propagates NaN from real tokens.
* ``fuse``: ``emb`` float32 (B, M, D), ``present`` bool or uint8 (B, M) or None (all present),
  ``weights`` float32 (M,) or (B, M) (used by "weighted" only), ``query`` float32 (D,) or (B, D)
  (used by "attention" only), ``out`` float32 (B, M * D) for "concat", else (B, D),
  ``out_weights`` float32 (B, M) or None. A row without any present modality gives zeros (and
  zero weights), never NaN. "weighted" divides the present weights by their sum; a zero sum gives
  zeros. "attention" is a softmax over the present modalities of ``(query . e_m) / sqrt(D)`` and
  takes at most 8192 modalities on this backend. ``out_weights`` is written by "weighted" and
  "attention" only (0 for absent modalities); the other strategies leave it untouched.

Outputs must not overlap the inputs.
"""

from __future__ import annotations

from ...errors import ArgumentError, BackendError, ShapeError
from .common import cuda_module as _cuda_module
from .common import cupy_module as _cupy
from .common import device_array as _device_array
from .common import same_device as _same_device

__all__ = ["masked_mean_cuda", "masked_max_cuda", "fuse_cuda"]

_MASK_DTYPES = ("bool", "uint8")
ATTENTION_MAX_MODALITIES = 8192  # kFuseAttentionMaxModalities in csrc/cuda/fusion_cuda.h


def _shape(a) -> tuple:
    return tuple(int(n) for n in a.shape)


def _check(cp, op: str, name: str, a, shapes, dims: str, *, mask: bool = False) -> None:
    """dtype (float32, or bool / uint8 for masks), one of ``shapes``, C-contiguous."""
    if mask:
        if a.dtype.name not in _MASK_DTYPES:
            raise ShapeError(f"[{op}] {name} has dtype {a.dtype}, expected bool or uint8")
    elif a.dtype != cp.float32:
        raise ShapeError(f"[{op}] {name} has dtype {a.dtype}, expected float32")
    if _shape(a) not in shapes:
        want = " or ".join(str(s) for s in shapes)
        raise ShapeError(f"[{op}] {name} has shape {_shape(a)}, expected {want} = {dims}")
    if not a.flags.c_contiguous:
        raise ShapeError(f"[{op}] {name} must be C-contiguous")


def _ptr(a) -> int:
    return 0 if a is None or a.size == 0 else int(a.data.ptr)


def _run(fn, *args):
    """Calls a kernel binding; an argument the kernel still rejects is a limit of the backend."""
    try:
        return fn(*args)
    except RuntimeError as exc:
        if "invalid argument" in str(exc):
            raise BackendError(str(exc)) from None
        raise


def _masked(op: str, x, mask, out):
    cp = _cupy(op)
    mod = _cuda_module(op, op)
    xa = _device_array(cp, op, "x", x)
    device = xa.device.id
    if xa.ndim != 3:
        raise ShapeError(f"[{op}] x has {xa.ndim} dims, expected 3 (B, L, D)")
    B, L, D = _shape(xa)
    _check(cp, op, "x", xa, [(B, L, D)], "(B, L, D)")
    m = None
    if mask is not None:
        m = _device_array(cp, op, "mask", mask)
        _same_device(op, "mask", m, device, "x")
        _check(cp, op, "mask", m, [(B, L)], "(B, L) from x", mask=True)
    o = _device_array(cp, op, "out", out)
    _same_device(op, "out", o, device, "x")
    _check(cp, op, "out", o, [(B, D)], "(B, D) from x")
    if B == 0 or D == 0:
        return out
    with cp.cuda.Device(device):
        stream = cp.cuda.get_current_stream()
        _run(getattr(mod, op), _ptr(xa), _ptr(m), _ptr(o), B, L, D, int(stream.ptr), device)
    return out


def masked_mean_cuda(x, mask, out):
    """Mean of ``x`` (B, L, D) over the real tokens of each row into ``out`` (B, D).

    Parameters
    ----------
    x : CuPy float32 array (B, L, D), C-contiguous
    mask : CuPy bool or uint8 array (B, L), C-contiguous, or None
        Nonzero = real token; None: every token is real.
    out : CuPy float32 array (B, D), C-contiguous

    Returns
    -------
    out, as given (filled asynchronously on the current stream). A row without real tokens
    gives zeros.

    Examples
    --------
    >>> import cupy as cp                                                # doctest: +SKIP
    >>> x = cp.arange(12, dtype=cp.float32).reshape(2, 3, 2)             # doctest: +SKIP
    >>> mask = cp.array([[True, True, False], [False, False, False]])    # doctest: +SKIP
    >>> masked_mean_cuda(x, mask, cp.empty((2, 2), cp.float32))          # doctest: +SKIP
    array([[1., 2.],
           [0., 0.]], dtype=float32)
    """
    return _masked("masked_mean", x, mask, out)


def masked_max_cuda(x, mask, out):
    """Elementwise max of ``x`` (B, L, D) over the real tokens of each row into ``out`` (B, D).

    Arguments as for :func:`masked_mean_cuda`. A NaN in a real token propagates to its column;
    a row without real tokens gives zeros.

    Examples
    --------
    >>> import cupy as cp                                                # doctest: +SKIP
    >>> x = cp.arange(12, dtype=cp.float32).reshape(2, 3, 2)             # doctest: +SKIP
    >>> mask = cp.array([[True, True, False], [False, False, False]])    # doctest: +SKIP
    >>> masked_max_cuda(x, mask, cp.empty((2, 2), cp.float32))           # doctest: +SKIP
    array([[2., 3.],
           [0., 0.]], dtype=float32)
    """
    return _masked("masked_max", x, mask, out)


def fuse_cuda(emb, present, weights, query, out, out_weights, *, strategy):
    """Fuse the modality embeddings ``emb`` (B, M, D) into ``out`` with ``strategy``.

    Parameters
    ----------
    emb : CuPy float32 array (B, M, D), C-contiguous
    present : CuPy bool or uint8 array (B, M), C-contiguous, or None
        Nonzero = the row has this modality; None: every modality is present.
    weights : CuPy float32 array (M,) or (B, M), C-contiguous
        Required by "weighted" (renormalized over the present modalities); ignored otherwise.
    query : CuPy float32 array (D,) or (B, D), C-contiguous
        Required by "attention"; ignored otherwise.
    out : CuPy float32 array, C-contiguous
        (B, M * D) for "concat" (absent modalities as zeros), (B, D) otherwise.
    out_weights : CuPy float32 array (B, M), C-contiguous, or None
        Receives the weights of "weighted" and "attention" (0 for absent modalities).
    strategy : {"concat", "mean", "sum", "max", "weighted", "attention"}

    Returns
    -------
    (out, out_weights), as given (filled asynchronously on the current stream).

    Examples
    --------
    >>> import cupy as cp                                                # doctest: +SKIP
    >>> emb = cp.stack([cp.ones((2, 4), cp.float32),
    ...                 cp.full((2, 4), 3.0, cp.float32)], axis=1)       # doctest: +SKIP
    >>> w = cp.empty((2, 2), cp.float32)                                 # doctest: +SKIP
    >>> out, w = fuse_cuda(emb, None, cp.array([1.0, 3.0], cp.float32), None,
    ...                    cp.empty((2, 4), cp.float32), w, strategy="weighted")  # doctest: +SKIP
    >>> w                                                                # doctest: +SKIP
    array([[0.25, 0.75],
           [0.25, 0.75]], dtype=float32)
    """
    op = "fuse"
    cp = _cupy(op)
    mod = _cuda_module(op, "fuse")
    e = _device_array(cp, op, "emb", emb)
    device = e.device.id
    if e.ndim != 3:
        raise ShapeError(f"[{op}] emb has {e.ndim} dims, expected 3 (B, M, D)")
    B, M, D = _shape(e)
    _check(cp, op, "emb", e, [(B, M, D)], "(B, M, D)")

    p = None
    if present is not None:
        p = _device_array(cp, op, "present", present)
        _same_device(op, "present", p, device, "emb")
        _check(cp, op, "present", p, [(B, M)], "(B, M) from emb", mask=True)

    w = None
    weights_per_batch = True
    if strategy == "weighted":
        if weights is None:
            raise ArgumentError(f"[{op}] weights is required with strategy 'weighted': (M,) or "
                                "(B, M)")
        w = _device_array(cp, op, "weights", weights)
        _same_device(op, "weights", w, device, "emb")
        _check(cp, op, "weights", w, [(M,), (B, M)], "(M,) or (B, M)")
        weights_per_batch = w.ndim == 2

    q = None
    query_per_batch = True
    if strategy == "attention":
        if query is None:
            raise ArgumentError(f"[{op}] query is required with strategy 'attention': (D,) or "
                                "(B, D)")
        q = _device_array(cp, op, "query", query)
        _same_device(op, "query", q, device, "emb")
        _check(cp, op, "query", q, [(D,), (B, D)], "(D,) or (B, D)")
        query_per_batch = q.ndim == 2
        if M > ATTENTION_MAX_MODALITIES:
            raise BackendError(f"[{op}] the cuda backend's attention strategy takes at most "
                               f"{ATTENTION_MAX_MODALITIES} modalities, got M = {M}; use a host "
                               "backend")

    o = _device_array(cp, op, "out", out)
    _same_device(op, "out", o, device, "emb")
    if strategy == "concat":
        _check(cp, op, "out", o, [(B, M * D)], "(B, M * D) from emb")
    else:
        _check(cp, op, "out", o, [(B, D)], "(B, D) from emb")

    ow = None
    if out_weights is not None:
        ow = _device_array(cp, op, "out_weights", out_weights)
        _same_device(op, "out_weights", ow, device, "emb")
        _check(cp, op, "out_weights", ow, [(B, M)], "(B, M) from emb")

    if B == 0:
        return out, out_weights
    with cp.cuda.Device(device):
        stream = cp.cuda.get_current_stream()
        _run(mod.fuse, _ptr(e), _ptr(p), _ptr(w), weights_per_batch, _ptr(q), query_per_batch,
             _ptr(o), _ptr(ow), B, M, D, strategy, int(stream.ptr), device)
    return out, out_weights
