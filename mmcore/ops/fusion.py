"""Fusion reductions: pooling over tokens and fusion over modalities (``mmcore.ops.fusion``).

* :func:`masked_mean` / :func:`masked_max` -- pool a padded sequence of token embeddings
  (B, L, D) into one vector per row, over the real tokens only.
* :func:`fuse` -- combine the embeddings of M modalities into one (concat, mean, sum, max,
  weighted or attention), skipping the modalities a row does not have.

Masks follow the Hugging Face convention: True / 1 = real token (or present modality), False / 0
= padding (or missing). Integer masks such as a tokenizer's int64 ``attention_mask`` are accepted
when they hold only 0 and 1. Padding tokens and absent modalities are never read: they may hold
anything, NaN included. Computation is float32 (float16 and float64 inputs are cast; non-contiguous
inputs are copied). Host arrays run on the ``native`` (default) or ``numba`` backend; CuPy / CUDA
arrays run on ``cuda`` and give CuPy results on the same device.
"""

from __future__ import annotations

from typing import List, Literal, NamedTuple, Optional, Sequence, Tuple, Union, overload

import numpy as np

from .. import _backend
from ..errors import ArgumentError, ShapeError
from ..kernels import cpu as _cpu
from ..kernels import launcher
from ..kernels.cuda.common import cupy_module, device_array
from ._checks import FLOAT_INPUT_DTYPES, check_bool, check_choice, check_rank
from ._types import Array, Backend

__all__ = ["masked_mean", "masked_max", "fuse", "FUSE_STRATEGIES"]

FUSE_STRATEGIES = ("concat", "mean", "sum", "max", "weighted", "attention")

_FLOAT32 = np.dtype(np.float32)
_BOOL = np.dtype(np.bool_)


# ----------------------------------------------------------------------------------------------
# arrays on either side: NumPy for host backends, CuPy for cuda


def _dispatch_candidates(objs) -> list:
    """The arguments that decide the backend: arrays (host or device). Plain Python sequences
    and numbers are small constants that follow the data to its side."""
    return [a for a in objs if a is not None and (_backend.is_cuda_array(a)
                                                 or hasattr(a, "__array__")
                                                 or hasattr(a, "__array_interface__"))]


def _xp(op: str, name: str):
    return cupy_module(op) if name == "cuda" else np


def _array(op: str, name: str, x, xp, *, constant: bool = False):
    """``x`` as an array of ``xp``. On the device, data arrays must already be there; small
    constants (``constant=True``: masks, weights, query) given as Python sequences are copied."""
    if x is None:
        raise ArgumentError(f"[{op}] {name} is required, got None")
    if xp is np or (constant and not _backend.is_cuda_array(x)
                    and not hasattr(x, "__array__") and not hasattr(x, "__array_interface__")):
        try:
            a = np.asarray(x)
        except Exception as exc:
            raise ShapeError(f"[{op}] {name} cannot be converted to an array: {exc}") from None
        if a.dtype == object:
            raise ShapeError(f"[{op}] {name} cannot be converted to a numeric array "
                             f"(got dtype object)")
        return a if xp is np else xp.asarray(a)
    return device_array(xp, op, name, x)


def _float32(op: str, name: str, a, xp):
    """float16/float32/float64 -> C-contiguous float32 (copies only when needed)."""
    if np.dtype(a.dtype) not in FLOAT_INPUT_DTYPES:
        raise ShapeError(f"[{op}] {name} has dtype {a.dtype}, expected float32 or float16 "
                         "(float64 is cast)")
    return xp.ascontiguousarray(a, dtype=xp.float32)


def _bool_mask(op: str, name: str, m, xp, meaning: str):
    """A bool or 0/1 integer mask as C-contiguous bool."""
    dt = np.dtype(m.dtype)
    if dt == np.bool_:
        return xp.ascontiguousarray(m)
    if dt.kind not in "iu":
        raise ShapeError(f"[{op}] {name} has dtype {dt}, expected bool or integer 0/1 "
                         f"({meaning})")
    if m.size and (int(m.min()) < 0 or int(m.max()) > 1):
        raise ShapeError(f"[{op}] {name} holds values other than 0 and 1 (in "
                         f"[{int(m.min())}, {int(m.max())}]); expected bool or integer 0/1 "
                         f"({meaning})")
    return xp.ascontiguousarray(m != 0)


def _out_array(op: str, out, shape, xp, name_side: str):
    """The caller's ``out``: float32, C-contiguous, writable, of ``shape``, on the data's side
    (``name_side``: "cuda" or host); None: a new array."""
    if out is None:
        return xp.empty(shape, xp.float32)
    if name_side == "cuda":
        ok_type = _backend.is_cuda_array(out)
    else:
        ok_type = isinstance(out, np.ndarray)
    if not ok_type:
        raise ArgumentError(f"[{op}] out must be an array on the same side as the inputs "
                            f"({'a CUDA array' if name_side == 'cuda' else 'a NumPy array'}), got "
                            f"{type(out).__name__}")
    if tuple(out.shape) != tuple(shape):
        raise ShapeError(f"[{op}] out has shape {tuple(out.shape)}, expected {tuple(shape)}")
    if np.dtype(out.dtype) != np.float32:
        raise ShapeError(f"[{op}] out has dtype {out.dtype}, expected float32")
    if not out.flags.c_contiguous:
        raise ShapeError(f"[{op}] out must be C-contiguous")
    if name_side != "cuda" and not out.flags.writeable:
        raise ShapeError(f"[{op}] out must be writable")
    return out


# ----------------------------------------------------------------------------------------------
# masked_mean / masked_max


def _masked_reduce(op: str, x, mask, backend, out=None):
    # The common call (float32 C-contiguous NumPy x, no mask or a bool C-contiguous one, no out,
    # native) goes straight to the kernel; anything else takes the general path below.
    if (out is None and type(x) is np.ndarray and x.dtype is _FLOAT32 and x.ndim == 3
            and x.flags.c_contiguous
            and (_backend.default_host_backend() if backend is None else backend) == "native"):
        B, L, D = x.shape
        if B and L and D and _plain_mask(mask, B, L):
            res = np.empty((B, D), np.float32)
            (_cpu.masked_mean if op == "masked_mean" else _cpu.masked_max)(x, mask, res)
            return res
    name = _backend.resolve_backend(op, _dispatch_candidates((x, mask)), backend)
    xp = _xp(op, name)
    a = _array(op, "x", x, xp)
    check_rank(op, "x", a, 3, "(B, L, D)")
    a = _float32(op, "x", a, xp)
    B, L, D = (int(n) for n in a.shape)
    m = None
    if mask is not None:
        m = _array(op, "mask", mask, xp, constant=True)
        check_rank(op, "mask", m, 2, "(B, L)")
        if tuple(m.shape) != (B, L):
            raise ShapeError(f"[{op}] mask has shape {tuple(m.shape)}, expected {(B, L)} = (B, L) "
                             "from x")
        m = _bool_mask(op, "mask", m, xp, "True / 1 = real token")
    res = _out_array(op, out, (B, D), xp, name)
    if a.size == 0:                     # no rows, no features, or no tokens (all padding)
        res[...] = 0
        return res
    launcher(op, name, "fusion", op)(a, m, res)
    return res


def masked_mean(x: Array, mask: Optional[Array] = None, *, out: Optional[Array] = None,
                backend: Optional[Backend] = None) -> Array:
    """Mean of token embeddings over the real tokens of each row (masked mean pooling).

    ``out[b] = sum_l mask[b, l] * x[b, l] / sum_l mask[b, l]``, computed in float32 without ever
    reading padding tokens. A row without real tokens gives zeros, never NaN.

    Parameters
    ----------
    x : array (B, L, D)
        Token embeddings, float32 or float16 (float64 is cast to float32).
    mask : array (B, L), optional
        True / 1 = real token, False / 0 = padding: a bool mask or a Hugging Face integer
        ``attention_mask`` holding only 0 and 1. ``None``: every token is real.
    out : float32 array (B, D), optional, keyword-only
        Written and returned instead of a new array (C-contiguous, on the inputs' side).
    backend : {"native", "numba", "cuda"}, optional
        Override the backend (see :mod:`mmcore._backend`).

    Returns
    -------
    out : float32 array (B, D)

    Notes
    -----
    Padding tokens may hold anything (NaN included); a NaN in a real token propagates to its
    column of the row. The sum runs in float32 on the native backend, so real tokens near the
    float32 limit (~3.4e38) may overflow to inf. Equivalent to PyTorch's
    ``(x * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)`` for rows with at least one
    real token and finite padding.

    Examples
    --------
    >>> import numpy as np
    >>> from mmcore.ops import masked_mean
    >>> x = np.arange(12, dtype=np.float32).reshape(2, 3, 2)
    >>> attention_mask = np.array([[1, 1, 0], [0, 0, 0]])      # row 1 is all padding
    >>> masked_mean(x, attention_mask)
    array([[1., 2.],
           [0., 0.]], dtype=float32)
    """
    return _masked_reduce("masked_mean", x, mask, backend, out)


def masked_max(x: Array, mask: Optional[Array] = None, *, out: Optional[Array] = None,
               backend: Optional[Backend] = None) -> Array:
    """Elementwise max of token embeddings over the real tokens of each row (max pooling).

    ``out[b, d] = max over l with mask[b, l] of x[b, l, d]``, never reading padding tokens. A
    row without real tokens gives zeros (not ``-inf``), never NaN.

    Parameters
    ----------
    x : array (B, L, D)
        Token embeddings, float32 or float16 (float64 is cast to float32).
    mask : array (B, L), optional
        True / 1 = real token, False / 0 = padding: a bool mask or a Hugging Face integer
        ``attention_mask`` holding only 0 and 1. ``None``: every token is real.
    out : float32 array (B, D), optional, keyword-only
        Written and returned instead of a new array (C-contiguous, on the inputs' side).
    backend : {"native", "numba", "cuda"}, optional
        Override the backend (see :mod:`mmcore._backend`).

    Returns
    -------
    out : float32 array (B, D)

    Notes
    -----
    Padding tokens may hold anything (NaN included). A NaN in a real token makes its column of
    the row NaN, as :func:`numpy.max` and :func:`torch.amax` do; ``-inf`` values are ordinary
    values (a row whose real tokens are all ``-inf`` in a column gives ``-inf`` there).

    Examples
    --------
    >>> import numpy as np
    >>> from mmcore.ops import masked_max
    >>> x = np.arange(12, dtype=np.float32).reshape(2, 3, 2)
    >>> masked_max(x, np.array([[True, True, False], [False, False, False]]))
    array([[2., 3.],
           [0., 0.]], dtype=float32)
    """
    return _masked_reduce("masked_max", x, mask, backend, out)


# ----------------------------------------------------------------------------------------------
# fuse


class _Embeddings(NamedTuple):
    items: Optional[List]      # a sequence input: (B, D_m) arrays (not yet cast)
    stacked: object            # a (B, M, D) input (not yet cast), or None
    B: int
    M: int
    widths: List[int]


def _embeddings(op: str, embeddings, xp) -> _Embeddings:
    if isinstance(embeddings, (list, tuple)):
        if len(embeddings) == 0:
            raise ShapeError(f"[{op}] embeddings is empty, expected at least one modality "
                             "(M >= 1)")
        items: list = []
        for i, e in enumerate(embeddings):
            where = f"embeddings[{i}]"
            a = _array(op, where, e, xp)
            check_rank(op, where, a, 2, "(B, D_m)")
            if np.dtype(a.dtype) not in FLOAT_INPUT_DTYPES:
                raise ShapeError(f"[{op}] {where} has dtype {a.dtype}, expected float32 or "
                                 "float16 (float64 is cast)")
            if items and a.shape[0] != items[0].shape[0]:
                raise ShapeError(f"[{op}] {where} has B = {a.shape[0]}, expected "
                                 f"{items[0].shape[0]} from embeddings[0]")
            items.append(a)
        return _Embeddings(items, None, int(items[0].shape[0]), len(items),
                           [int(a.shape[1]) for a in items])
    a = _array(op, "embeddings", embeddings, xp)
    if a.ndim != 3:
        raise ShapeError(f"[{op}] embeddings has {a.ndim} dims, expected 3 (B, M, D) or a "
                         "sequence of M arrays (B, D_m)")
    if np.dtype(a.dtype) not in FLOAT_INPUT_DTYPES:
        raise ShapeError(f"[{op}] embeddings has dtype {a.dtype}, expected float32 or float16 "
                         "(float64 is cast)")
    B, M, D = (int(n) for n in a.shape)
    if M == 0:
        raise ShapeError(f"[{op}] embeddings has M = 0 modalities, expected at least one")
    return _Embeddings(None, a, B, M, [D] * M)


def _per_row(op: str, name: str, value, xp, B: int, n: int, dims: str, *, option: bool):
    """``value`` of shape (n,) or (B, n), float32 C-contiguous, finite.

    A string or None is an ArgumentError, a wrong shape or dtype a ShapeError; non-finite
    values are an ArgumentError for an ``option`` (``weights``) and a ShapeError for data
    (``query``).
    """
    if isinstance(value, (str, bytes)):
        raise ArgumentError(f"[{op}] {name} must be an array of numbers {dims}, got {value!r}")
    a = _array(op, name, value, xp, constant=True)
    if np.dtype(a.dtype).kind not in "fiu" or a.dtype == np.bool_:
        raise ShapeError(f"[{op}] {name} has dtype {a.dtype}, expected real numbers")
    if tuple(a.shape) not in ((n,), (B, n)):
        raise ShapeError(f"[{op}] {name} has shape {tuple(a.shape)}, expected ({n},) or "
                         f"{(B, n)} = {dims}")
    with np.errstate(over="ignore"):          # float64 beyond float32 becomes inf: rejected
        a = xp.ascontiguousarray(a, dtype=xp.float32)
    if not bool(xp.isfinite(a).all()):
        err = ArgumentError if option else ShapeError
        raise err(f"[{op}] {name} must be finite (in float32), got NaN or inf")
    return a


# ``fused`` alone, or ``(fused, weights)`` for "attention" and for "weighted" with
# return_weights=True: one overload each, and one for a strategy known only at run time.
@overload
def fuse(embeddings: Union[Array, Sequence[Array]], *,
         strategy: Literal["concat", "mean", "sum", "max", "weighted"],
         weights: Optional[Array] = None, query: Optional[Array] = None,
         present: Optional[Array] = None, return_weights: Literal[False] = False,
         out: Optional[Array] = None, backend: Optional[Backend] = None) -> Array: ...
@overload
def fuse(embeddings: Union[Array, Sequence[Array]], *, strategy: Literal["weighted"],
         weights: Optional[Array] = None, query: Optional[Array] = None,
         present: Optional[Array] = None, return_weights: Literal[True],
         out: Optional[Array] = None, backend: Optional[Backend] = None) -> Tuple[Array, Array]: ...
@overload
def fuse(embeddings: Union[Array, Sequence[Array]], *, strategy: Literal["attention"],
         weights: Optional[Array] = None, query: Optional[Array] = None,
         present: Optional[Array] = None, return_weights: bool = False,
         out: Optional[Array] = None, backend: Optional[Backend] = None) -> Tuple[Array, Array]: ...
@overload
def fuse(embeddings: Union[Array, Sequence[Array]], *, strategy: str,
         weights: Optional[Array] = None, query: Optional[Array] = None,
         present: Optional[Array] = None, return_weights: bool = False,
         out: Optional[Array] = None,
         backend: Optional[Backend] = None) -> Union[Array, Tuple[Array, Array]]: ...
def fuse(embeddings: Union[Array, Sequence[Array]], *, strategy: str,
         weights: Optional[Array] = None, query: Optional[Array] = None,
         present: Optional[Array] = None, return_weights: bool = False,
         out: Optional[Array] = None,
         backend: Optional[Backend] = None) -> Union[Array, Tuple[Array, Array]]:
    """Fuse the embeddings of M modalities into one vector per row.

    Each strategy runs over the modalities a row has (``present``); absent modalities are never
    read, so their embeddings may hold anything (NaN included).

    ===========  ==============================================================================
    strategy     result per row ``b``
    ===========  ==============================================================================
    "concat"     ``[e_0 | e_1 | ... | e_{M-1}]`` (B, sum D_m); absent modalities as zeros.
                 The widths ``D_m`` may differ.
    "mean"       mean of the present ``e_m`` (B, D)
    "sum"        sum of the present ``e_m`` (B, D)
    "max"        elementwise max of the present ``e_m`` (B, D)
    "weighted"   ``sum_m w_m e_m`` (B, D) with ``w = weights`` renormalized over the present
                 modalities: ``w_m = weights[b, m] / sum_{present k} weights[b, k]``
    "attention"  ``sum_m w_m e_m`` (B, D) with ``w = softmax_m((query . e_m) / sqrt(D))`` over
                 the present modalities (a one-query attention pooling over modalities)
    ===========  ==============================================================================

    A row without any present modality gives zeros (and zero weights), never NaN.

    Parameters
    ----------
    embeddings : sequence of M arrays (B, D_m), or array (B, M, D)
        float32 or float16 (float64 is cast to float32). Every strategy but "concat" needs
        equal widths ``D``.
    strategy : {"concat", "mean", "sum", "max", "weighted", "attention"}
        Keyword-only and required.
    weights : array (M,) or (B, M), optional
        Required by (and only allowed with) "weighted": finite, non-negative modality weights,
        shared by all rows (M,) or per row (B, M). They need not sum to 1: they are divided by
        their sum over the present modalities of each row; a row whose present weights sum to 0
        gives zeros.
    query : array (D,) or (B, D), optional
        Required by (and only allowed with) "attention": finite, shared (D,) or per row (B, D).
    present : array (B, M) or (M,), optional
        True / 1 = the row has this modality, False / 0 = missing; bool or integer 0/1.
        ``None``: every modality is present.
    return_weights : bool, default False
        With "weighted", also return the renormalized weights. "attention" always returns its
        weights; other strategies have none and reject ``True``.
    out : float32 array (B, sum D_m) for "concat", else (B, D), optional, keyword-only
        Written and returned instead of a new array (C-contiguous, on the inputs' side).
    backend : {"native", "numba", "cuda"}, optional
        Override the backend (see :mod:`mmcore._backend`).

    Returns
    -------
    fused : float32 array (B, sum D_m) for "concat", else (B, D)
        Returned alone for "concat", "mean", "sum", "max", and "weighted" without
        ``return_weights``.
    (fused, weights) : tuple
        For "attention" always and for "weighted" with ``return_weights=True``: ``weights`` is
        float32 (B, M), 0 for absent modalities; each row sums to 1, or is all 0 when the row
        has no present modality (or, for "weighted", only zero weights).

    Notes
    -----
    A NaN in a present embedding propagates: to its column (concat, mean, sum, max, weighted)
    or, through the score, to the whole row and its present weights (attention). The one
    exception: a modality whose weight is exactly 0 ("weighted" with a zero weight, or an
    attention weight that underflows to 0) takes no part in the sum and is not read, like an
    absent one. Sums run in float32, so values near the float32 limit may overflow to inf.

    A sequence input with "concat" is concatenated directly (one pass); the other strategies
    stack it into a (B, M, D) float32 array first.

    Examples
    --------
    >>> import numpy as np
    >>> from mmcore.ops import fuse
    >>> text = np.ones((2, 4), np.float32)
    >>> image = np.full((2, 4), 3.0, np.float32)
    >>> present = np.array([[True, True], [True, False]])    # row 1 has no image
    >>> fuse([text, image], strategy="mean", present=present)
    array([[2., 2., 2., 2.],
           [1., 1., 1., 1.]], dtype=float32)
    >>> fuse([text, np.zeros((2, 2), np.float32)], strategy="concat").shape
    (2, 6)
    >>> fused, w = fuse([text, image], strategy="weighted", weights=[1.0, 3.0],
    ...                 present=present, return_weights=True)
    >>> w
    array([[0.25, 0.75],
           [1.  , 0.  ]], dtype=float32)
    >>> fused, w = fuse([text, image], strategy="attention", query=np.ones(4, np.float32))
    >>> w.round(4)                          # scores (4 / 2, 12 / 2)
    array([[0.018, 0.982],
           [0.018, 0.982]], dtype=float32)
    """
    # The common call -- float32 C-contiguous NumPy embeddings, a strategy without options, no
    # mask or a C-contiguous bool (B, M) one, no out, the native backend -- goes straight to the
    # kernel (or, for a list with "concat" and no mask, to the one concatenation of the general
    # path). Anything else takes the general path below, which checks everything: same kernel,
    # same bits, same errors.
    if (weights is None and query is None and out is None
            and return_weights is False and type(strategy) is str and strategy in _PLAIN
            and (_backend.default_host_backend() if backend is None else backend) == "native"):
        res = _fuse_plain(embeddings, strategy, present)
        if res is not None:
            return res
    return _fuse(embeddings, strategy=strategy, weights=weights, query=query, present=present,
                 return_weights=return_weights, out=out, backend=backend)


#: The strategies without options (weights, query) that :func:`_fuse_plain` runs.
_PLAIN = ("mean", "concat", "max", "sum")


def _fuse_plain(embeddings, strategy: str, present):
    """:func:`fuse` of float32 C-contiguous NumPy embeddings without options, with no mask or a
    bool C-contiguous (B, M) one, on the native backend; None when the input is anything else
    (or empty)."""
    if type(embeddings) is np.ndarray:
        e = embeddings
        if e.dtype is not _FLOAT32 or e.ndim != 3 or not e.flags.c_contiguous:
            return None
        B, M, D = e.shape
        if not (B and M and D) or not _plain_mask(present, B, M):
            return None
        if strategy == "concat" and present is None:   # the kernel copies each row whole
            return e.reshape(B, M * D).copy()
        res = np.empty((B, M * D if strategy == "concat" else D), np.float32)
        _cpu.fuse(e, present, None, None, res, None, strategy=strategy)
        return res
    if type(embeddings) is not list and type(embeddings) is not tuple or not embeddings:
        return None
    first = embeddings[0]
    if type(first) is not np.ndarray:
        return None
    shape = first.shape
    for a in embeddings:
        if (type(a) is not np.ndarray or a.dtype is not _FLOAT32 or a.ndim != 2
                or a.shape != shape):
            return None             # different widths ("concat") or batches: the general path
    B, D = shape
    M = len(embeddings)
    if not (B and D) or not _plain_mask(present, B, M):
        return None
    if strategy == "concat":
        return None if present is not None else np.concatenate(embeddings, axis=1)
    stacked = np.empty((B, M, D), np.float32)
    for m, a in enumerate(embeddings):
        stacked[:, m] = a
    res = np.empty((B, D), np.float32)
    _cpu.fuse(stacked, present, None, None, res, None, strategy=strategy)
    return res


def _plain_mask(mask, B: int, L: int) -> bool:
    """True when ``mask`` is None or a bool C-contiguous NumPy array of shape (B, L): what the
    general path would pass the kernel as it is."""
    return mask is None or (type(mask) is np.ndarray and mask.dtype is _BOOL
                            and mask.shape == (B, L) and mask.flags.c_contiguous)


def _fuse(embeddings, *, strategy, weights, query, present, return_weights, out, backend):
    """:func:`fuse` for every input: checks, layout, backend choice."""
    op = "fuse"
    check_choice("strategy", strategy, FUSE_STRATEGIES, op=op)
    return_weights = check_bool("return_weights", return_weights, op=op)
    if return_weights and strategy not in ("weighted", "attention"):
        raise ArgumentError(f"[{op}] return_weights=True needs strategy 'weighted' or 'attention' "
                            f"(strategy {strategy!r} has no weights)")
    if weights is not None and strategy != "weighted":
        raise ArgumentError(f"[{op}] weights is only used with strategy='weighted', got "
                            f"strategy={strategy!r}")
    if weights is None and strategy == "weighted":
        raise ArgumentError(f"[{op}] weights is required with strategy='weighted': (M,) or (B, M)")
    if query is not None and strategy != "attention":
        raise ArgumentError(f"[{op}] query is only used with strategy='attention', got "
                            f"strategy={strategy!r}")
    if query is None and strategy == "attention":
        raise ArgumentError(f"[{op}] query is required with strategy='attention': (D,) or (B, D)")

    parts = list(embeddings) if isinstance(embeddings, (list, tuple)) else [embeddings]
    name = _backend.resolve_backend(op, _dispatch_candidates(parts + [weights, query, present]),
                                    backend)
    xp = _xp(op, name)
    emb = _embeddings(op, embeddings, xp)
    B, M = emb.B, emb.M

    pres = None
    if present is not None:
        p = _array(op, "present", present, xp, constant=True)
        if tuple(p.shape) not in ((M,), (B, M)):
            raise ShapeError(f"[{op}] present has shape {tuple(p.shape)}, expected ({M},) or "
                             f"{(B, M)} = (B, M) from embeddings")
        p = _bool_mask(op, "present", p, xp, "True / 1 = modality present")
        pres = xp.ascontiguousarray(xp.broadcast_to(p, (B, M)))

    if strategy == "concat" and emb.items is not None:
        return _concat_sequence(emb, pres, xp, out)

    D = emb.widths[0]
    if emb.items is not None:
        for i, w in enumerate(emb.widths):
            if w != D:
                raise ShapeError(f"[{op}] embeddings[{i}] has D = {w}, expected {D} from "
                                 f"embeddings[0]: strategy {strategy!r} needs equal widths "
                                 "(only 'concat' accepts different ones)")
    if D == 0 and strategy in ("weighted", "attention"):
        raise ShapeError(f"[{op}] embeddings have D = 0, expected at least 1 for strategy "
                         f"{strategy!r}")

    w_arr = q_arr = None
    if strategy == "weighted":
        w_arr = _per_row(op, "weights", weights, xp, B, M, "(M,) or (B, M)", option=True)
        if bool((w_arr < 0).any()):
            raise ArgumentError(f"[{op}] weights must be >= 0 (they are renormalized over the "
                                "present modalities), got a negative value")
    if strategy == "attention":
        q_arr = _per_row(op, "query", query, xp, B, D, "(D,) or (B, D)", option=False)

    width = M * D if strategy == "concat" else D
    has_weights = strategy in ("weighted", "attention")
    out = _out_array(op, out, (B, width), xp, name)
    if B == 0 or D == 0:
        out[...] = 0
        w_out = xp.zeros((B, M), xp.float32) if has_weights else None
        return _fuse_results(strategy, out, w_out, return_weights)

    if emb.items is not None:
        stacked = xp.empty((B, M, D), xp.float32)
        for m, a in enumerate(emb.items):
            stacked[:, m] = a
    else:
        stacked = xp.ascontiguousarray(emb.stacked, dtype=xp.float32)

    w_out = xp.empty((B, M), xp.float32) if has_weights else None
    launcher(op, name, "fusion", "fuse")(stacked, pres, w_arr, q_arr, out, w_out,
                                         strategy=strategy)
    return _fuse_results(strategy, out, w_out, return_weights)


def _fuse_results(strategy: str, out, w_out, return_weights: bool):
    if strategy == "attention" or (strategy == "weighted" and return_weights):
        return out, w_out
    return out


def _concat_sequence(emb: _Embeddings, pres, xp, out=None):
    """concat of a sequence of (B, D_m) arrays: one concatenation, absent slices zeroed."""
    assert emb.items is not None    # called for sequence inputs only
    items = [a.astype(xp.float32, copy=False) for a in emb.items]
    if out is not None:
        out = _out_array("fuse", out, (emb.B, sum(emb.widths)), xp,
                         "cuda" if xp is not np else "host")
        xp.concatenate(items, axis=1, out=out)
    else:
        out = xp.concatenate(items, axis=1)      # always a new C-contiguous array
    if pres is not None and emb.B:
        offset = 0
        for m, w in enumerate(emb.widths):
            if w:
                seg = out[:, offset:offset + w]
                if xp is np:
                    seg[~pres[:, m]] = 0
                else:
                    seg[...] = xp.where(pres[:, m, None], seg, xp.float32(0))
            offset += w
    return out
