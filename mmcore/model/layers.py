"""Attention layers and the transformer encoder block (``mmcore.model.layers``).

The layers hold float32 NumPy weights in the PyTorch layout and names, project with
:func:`mmcore.ops.linear` and attend with :func:`mmcore.ops.attention` (the fused kernel, no
(Lq, Lk) matrix unless weights are asked for). All of them are inference-only: ``dropout``
arguments are kept so that training-time configurations load unchanged, but no dropout is ever
applied.

Every product and the attention run under the current matmul precision
(:func:`mmcore.get_matmul_precision`: a :class:`mmcore.matmul_precision` block of the calling
thread, else :func:`mmcore.set_matmul_precision`, else ``"highest"``, exact float32). The
projection weights are read packed, once per precision
(:meth:`~mmcore.model.nn.Module.packed_weight`), and the packs are dropped whenever a weight is
replaced.

Masks follow the Hugging Face convention: a ``(B, L)`` boolean (or 0/1 integer) array with
True/1 = real token, False/0 = padding. A prefix mask (every row is ``[1, ..., 1, 0, ..., 0]``,
right padding) is passed to the kernel as ``key_lengths`` (the fast path); any other mask (left
padding, holes) becomes a boolean attention mask. To convert PyTorch's ``key_padding_mask``
(True = ignore) pass ``~key_padding_mask``.

A query row that has no key to attend to (its whole context is padding, or ``attn_bias`` is
``-inf`` everywhere on it) produces an output row of exactly zero, and zero attention weights,
where PyTorch gives NaN.

Examples
--------
>>> import numpy as np
>>> from mmcore.model import CrossModalAttention
>>> rng = np.random.default_rng(0)
>>> layer = CrossModalAttention(64, 8, kdim=32, vdim=32, rng=0)
>>> text = rng.standard_normal((2, 7, 64), dtype=np.float32)
>>> audio = rng.standard_normal((2, 50, 32), dtype=np.float32)
>>> mask = np.arange(50) < np.array([[50], [20]])          # True = real frame
>>> out, w = layer(text, audio, context_mask=mask, return_weights=True)
>>> out.shape, w.shape, float(w[1, :, 20:].max())
((2, 7, 64), (2, 7, 50), 0.0)
"""

from __future__ import annotations

from typing import Any, Dict, Literal, Mapping, Optional, Tuple, Union, overload

import numpy as np
from numpy.typing import ArrayLike

from ..errors import BackendError, ConfigError, ModelFormatError, ShapeError
from ..ops import attention
from ..ops import encoder_layer as _ops_encoder_layer
from ..ops import linear as _ops_linear
from .nn import (
    NO_INIT,
    ActivationLike,
    LayerNorm,
    Linear,
    Module,
    RngLike,
    as_float_input,
    as_generator,
    check_features,
    check_positive,
    check_prob,
    fused_activation,
    get_activation,
    linear,
    state_entry,
    to_numpy,
    xavier_uniform,
)

__all__ = ["CrossModalAttention", "MultiHeadSelfAttention", "TransformerEncoderLayer",
           "padding_mask_to_attention"]


#: ``(out, weights)``: what the layers return when ``return_weights=True``.
_WithWeights = Tuple[np.ndarray, np.ndarray]


# ----------------------------------------------------------------------------------------------
# masks


def padding_mask_to_attention(mask: Optional[ArrayLike], batch: int, length: int, *,
                              owner: str = "attention", name: str = "mask"
                              ) -> Tuple[Optional[np.ndarray], Optional[np.ndarray]]:
    """Turn a Hugging Face padding mask into arguments of :func:`mmcore.ops.attention`.

    Parameters
    ----------
    mask : bool or 0/1 integer array (B, L), or None
        True/1 = real token, False/0 = padding.
    batch, length : int
        The expected ``(B, L)``.
    owner, name : str
        Used in error messages.

    Returns
    -------
    key_lengths : int64 (B,) or None
        Set when every row is a prefix mask (right padding); ``None`` when there is nothing to
        mask or the mask is not a prefix mask.
    keep : bool (B, L) or None
        Set when the mask is not a prefix mask: pass ``keep[:, None, None, :]`` as ``mask``.

    Examples
    --------
    >>> import numpy as np
    >>> from mmcore.model.layers import padding_mask_to_attention
    >>> padding_mask_to_attention(np.array([[1, 1, 0], [1, 0, 0]]), 2, 3)
    (array([2, 1]), None)
    >>> padding_mask_to_attention(np.array([[0, 1, 1]], bool), 1, 3)[1]
    array([[False,  True,  True]])
    >>> padding_mask_to_attention(np.ones((1, 3), bool), 1, 3)
    (None, None)
    """
    if mask is None:
        return None, None
    try:
        m = np.asarray(mask)
    except Exception as exc:
        raise ShapeError(f"[{owner}] {name} cannot be converted to an array: {exc}") from None
    if m.shape != (batch, length):
        raise ShapeError(f"[{owner}] {name} has shape {tuple(m.shape)}, expected "
                         f"({batch}, {length}) = (B, L)")
    if m.dtype != np.bool_:
        if m.dtype.kind not in "iu":
            raise ShapeError(f"[{owner}] {name} has dtype {m.dtype}, expected bool or 0/1 integers "
                             "(True/1 = real token)")
        if m.size and (m.min() < 0 or m.max() > 1):
            raise ShapeError(f"[{owner}] {name} must hold only 0 and 1 (1 = real token), got "
                             f"values in [{int(m.min())}, {int(m.max())}]")
        m = m.astype(np.bool_)
    if m.all():
        return None, None
    lengths = m.sum(axis=1, dtype=np.int64)
    if np.array_equal(m, np.arange(length)[None, :] < lengths[:, None]):
        return lengths, None
    return None, np.ascontiguousarray(m)


def _causal_mask(lq: int, lk: int) -> np.ndarray:
    """(1, 1, Lq, Lk) with True where key j <= query i."""
    return (np.arange(lk)[None, :] <= np.arange(lq)[:, None])[None, None]


# ----------------------------------------------------------------------------------------------
# multi-head attention


class _MultiheadAttention(Module):
    """Shared weights and computation of the attention layers (PyTorch MHA layout)."""

    _QUANTIZABLE = ("in_proj_weight", "q_proj_weight", "k_proj_weight", "v_proj_weight")

    def __init__(self, embed_dim, num_heads, *, kdim=None, vdim=None, bias=True, temperature=1.0,
                 dropout=0.0, rng: RngLike = None):
        super().__init__()
        owner = type(self).__name__
        E = check_features(owner, "embed_dim", embed_dim)
        H = check_features(owner, "num_heads", num_heads)
        if E % H:
            raise ConfigError(f"[{owner}] embed_dim ({E}) must be divisible by num_heads ({H})")
        self.embed_dim = E
        self.num_heads = H
        self.head_dim = E // H
        self.kdim = E if kdim is None else check_features(owner, "kdim", kdim)
        self.vdim = E if vdim is None else check_features(owner, "vdim", vdim)
        self.temperature = check_positive(owner, "temperature", temperature)
        self.dropout = check_prob(owner, "dropout", dropout)
        self.packed = self.kdim == E and self.vdim == E
        gen = as_generator(rng)
        if self.packed:
            self.register_parameter("in_proj_weight", xavier_uniform(gen, (3 * E, E)))
        else:
            self.register_parameter("q_proj_weight", xavier_uniform(gen, (E, E)))
            self.register_parameter("k_proj_weight", xavier_uniform(gen, (E, self.kdim)))
            self.register_parameter("v_proj_weight", xavier_uniform(gen, (E, self.vdim)))
        self.register_parameter("in_proj_bias", np.zeros(3 * E, np.float32) if bias else None)
        out_proj = Linear(E, E, bias=bias, rng=NO_INIT if gen is None else gen)
        if bias:
            out_proj.register_parameter("bias", np.zeros(E, np.float32))
        self.add_module("out_proj", out_proj)

    # -- weights --------------------------------------------------------------------------------

    @property
    def bias(self) -> bool:
        """Whether the projections have biases."""
        return self.in_proj_bias is not None

    def projection_weights(self):
        """``(Wq (E, E), Wk (E, kdim), Wv (E, vdim))``: views into the packed weight when packed."""
        E = self.embed_dim
        if self.packed:
            w = self.in_proj_weight
            return w[:E], w[E:2 * E], w[2 * E:]
        return self.q_proj_weight, self.k_proj_weight, self.v_proj_weight

    def _packed_projections(self) -> Tuple[Any, Any, Any]:
        """:meth:`projection_weights` as the products read them (see
        :meth:`~mmcore.model.nn.Module.packed_weight`): packed once per precision."""
        E = self.embed_dim
        if self.packed:
            return (self.packed_weight("in_proj_weight", (0, E)),
                    self.packed_weight("in_proj_weight", (E, 2 * E)),
                    self.packed_weight("in_proj_weight", (2 * E, 3 * E)))
        return (self.packed_weight("q_proj_weight"), self.packed_weight("k_proj_weight"),
                self.packed_weight("v_proj_weight"))

    def projection_biases(self):
        """``(bq, bk, bv)``, each (E,), or ``(None, None, None)`` without biases."""
        b = self.in_proj_bias
        if b is None:
            return None, None, None
        E = self.embed_dim
        return b[:E], b[E:2 * E], b[2 * E:]

    def _unexpected_key_message(self, key: str) -> Optional[str]:
        if key in ("bias_k", "bias_v"):
            return self._bias_kv_message("{key}")
        return None

    def _bias_kv_message(self, key: str) -> str:
        return (f"[{type(self).__name__}] state dict has {key}: nn.MultiheadAttention with "
                "add_bias_kv=True (or add_zero_attn=True) is not supported")

    def _convert_state(self, sd: dict, prefix: str) -> None:
        for name in ("bias_k", "bias_v"):
            if prefix + name in sd:
                raise ModelFormatError(self._bias_kv_message(repr(prefix + name)))
        sep = [prefix + n for n in ("q_proj_weight", "k_proj_weight", "v_proj_weight")]
        if self.packed and prefix + "in_proj_weight" not in sd and all(k in sd for k in sep):
            parts = []
            for key in sep:
                a = to_numpy(type(self).__name__, key, sd[key])
                if a.shape != (self.embed_dim, self.embed_dim):
                    raise ModelFormatError(f"[{type(self).__name__}] state dict entry {key!r} has "
                                           f"shape {tuple(a.shape)}, expected "
                                           f"{(self.embed_dim, self.embed_dim)}")
                parts.append(a)
                del sd[key]
            sd[prefix + "in_proj_weight"] = np.concatenate(parts, axis=0)
        super()._convert_state(sd, prefix)

    @staticmethod
    def _infer_dims(owner: str, sd: Mapping):
        """``(embed_dim, kdim, vdim, bias)`` from a (prefix-stripped) MHA state dict."""
        for name in ("bias_k", "bias_v"):
            if name in sd:
                raise ModelFormatError(f"[{owner}] state dict has {name!r}: "
                                       "nn.MultiheadAttention with add_bias_kv=True (or "
                                       "add_zero_attn=True) is not supported")
        if "in_proj_weight" in sd:
            w = state_entry(owner, sd, "in_proj_weight", 2, "(3 * embed_dim, embed_dim)")
            E = int(w.shape[1])
            if w.shape[0] != 3 * E:
                raise ModelFormatError(f"[{owner}] state dict entry 'in_proj_weight' has shape "
                                       f"{tuple(w.shape)}, expected (3 * embed_dim, embed_dim)")
            kdim = vdim = E
        else:
            if "q_proj_weight" not in sd:
                raise ModelFormatError(f"[{owner}] state dict is missing key 'in_proj_weight' "
                                       "(or 'q_proj_weight', 'k_proj_weight', 'v_proj_weight')")
            wq = state_entry(owner, sd, "q_proj_weight", 2, "(embed_dim, embed_dim)")
            E = int(wq.shape[0])
            if wq.shape[1] != E:
                raise ModelFormatError(f"[{owner}] state dict entry 'q_proj_weight' has shape "
                                       f"{tuple(wq.shape)}, expected (embed_dim, embed_dim)")
            wk = state_entry(owner, sd, "k_proj_weight", 2, "(embed_dim, kdim)")
            wv = state_entry(owner, sd, "v_proj_weight", 2, "(embed_dim, vdim)")
            kdim, vdim = int(wk.shape[1]), int(wv.shape[1])
        has_in_bias = "in_proj_bias" in sd
        has_out_bias = "out_proj.bias" in sd
        if has_in_bias != has_out_bias:
            missing = "out_proj.bias" if has_in_bias else "in_proj_bias"
            raise ModelFormatError(f"[{owner}] state dict is missing key {missing!r} (biases must "
                                   "be all present or all absent)")
        return E, kdim, vdim, has_in_bias

    # -- computation ----------------------------------------------------------------------------

    def _attend(self, query, key, value, *, same_input: bool, key_lengths, mask, attn_bias,
                return_weights: bool, average_weights: bool):
        """Project, attend, merge heads, project out. Inputs are validated float32 arrays."""
        B, Lq, _ = query.shape
        Lk = key.shape[1]
        E, H, hd = self.embed_dim, self.num_heads, self.head_dim
        bq, bk, bv = self.projection_biases()

        if same_input and self.packed:
            qkv = linear(query, self.packed_weight("in_proj_weight"), self.in_proj_bias)
            qkv = qkv.reshape(B, Lq, 3, H, hd).transpose(2, 0, 3, 1, 4)         # (3, B, H, L, hd)
            q, k, v = qkv[0], qkv[1], qkv[2]
        else:
            wq, wk, wv = self._packed_projections()
            q = linear(query, wq, bq).reshape(B, Lq, H, hd).transpose(0, 2, 1, 3)
            if value is key and self.packed:
                kv = linear(key, self.packed_weight("in_proj_weight", (E, 3 * E)),
                            None if self.in_proj_bias is None else self.in_proj_bias[E:])
                kv = kv.reshape(B, Lk, 2, H, hd).transpose(2, 0, 3, 1, 4)
                k, v = kv[0], kv[1]
            else:
                k = linear(key, wk, bk).reshape(B, Lk, H, hd).transpose(0, 2, 1, 3)
                v = linear(value, wv, bv).reshape(B, Lk, H, hd).transpose(0, 2, 1, 3)

        res = attention(q, k, v, mask=mask, key_lengths=key_lengths, bias=attn_bias,
                        temperature=self.temperature, return_weights=return_weights,
                        return_lse=True)
        if return_weights:
            out, weights, lse = res
        else:
            (out, lse), weights = res, None

        merged = out.transpose(0, 2, 1, 3).reshape(B, Lq, E)
        y = self.out_proj(merged)
        empty = np.isneginf(lse).all(axis=1)                                    # (B, Lq)
        if empty.any():
            y[empty] = 0.0
        if not return_weights:
            return y
        if average_weights:
            weights = weights.mean(axis=1, dtype=np.float32)
        return y, weights

    def _combine_masks(self, keep, extra):
        """AND of the (B, L) keep mask (as (B, 1, 1, L)) and an extra broadcastable mask."""
        if keep is None:
            return extra
        m = keep[:, None, None, :]
        return m if extra is None else (m & extra)

    def extra_repr(self) -> str:
        s = f"embed_dim={self.embed_dim}, num_heads={self.num_heads}"
        if not self.packed:
            s += f", kdim={self.kdim}, vdim={self.vdim}"
        s += f", bias={self.bias}"
        if self.temperature != 1.0:
            s += f", temperature={self.temperature:g}"
        return s


class CrossModalAttention(_MultiheadAttention):
    """Multi-head attention from a query modality to a context modality of another width.

    Computes what ``torch.nn.MultiheadAttention(embed_dim, num_heads, kdim=kdim, vdim=vdim,
    bias=bias, batch_first=True)`` computes in eval mode, with the fused
    :func:`mmcore.ops.attention` kernel::

        q = query @ Wq.T + bq,  k = context @ Wk.T + bk,  v = value @ Wv.T + bv   (split in heads)
        out = softmax(q k^T / sqrt(head_dim) / temperature + attn_bias) v          (per head)
        out = concat_heads(out) @ Wo.T + bo

    Parameters
    ----------
    embed_dim : int
        Width ``E`` of the query modality and of the output; divisible by ``num_heads``.
    num_heads : int
    kdim, vdim : int, optional
        Widths of the key and value inputs (default ``embed_dim``). When both equal
        ``embed_dim`` the projections are stored packed as ``in_proj_weight`` (3E, E), as
        PyTorch does; otherwise as ``q_proj_weight`` (E, E), ``k_proj_weight`` (E, kdim) and
        ``v_proj_weight`` (E, vdim).
    bias : bool, default True
        Biases of the input projections (``in_proj_bias`` (3E,)) and of ``out_proj``.
    temperature : float, default 1.0
        Divides the scaled scores (> 1 flattens the attention, < 1 sharpens it).
    dropout : float, default 0.0
        Attention dropout of the training-time configuration. Stored, validated to lie in
        [0, 1), and never applied: mmcore layers run in inference mode only.
    rng : None, int or numpy.random.Generator
        Initialisation as PyTorch's: Xavier-uniform input projections (over the packed (3E, E)
        matrix when packed, per projection otherwise), ``out_proj.weight`` ~
        ``U(-1/sqrt(E), 1/sqrt(E))`` (``nn.Linear``'s default), all biases zero. Drawn in that
        order, so a seed gives the same weights everywhere.

    Notes
    -----
    Weights and state-dict keys are those of ``nn.MultiheadAttention``; ``add_bias_kv`` and
    ``add_zero_attn`` are not supported (``bias_k``/``bias_v`` keys are rejected; add_zero_attn
    leaves no trace in a state dict, so it cannot be detected).

    Examples
    --------
    >>> import numpy as np
    >>> from mmcore.model import CrossModalAttention
    >>> layer = CrossModalAttention(16, 4, kdim=8, vdim=8, rng=0)
    >>> q = np.ones((1, 3, 16), np.float32); c = np.ones((1, 5, 8), np.float32)
    >>> layer(q, c).shape
    (1, 3, 16)
    >>> out, w = layer(q, c, context_mask=np.zeros((1, 5), bool), return_weights=True,
    ...                average_weights=False)
    >>> float(np.abs(out).max()), w.shape          # nothing to attend to: zeros, not NaN
    (0.0, (1, 4, 3, 5))
    >>> sorted(layer.state_dict())[:3]
    ['in_proj_bias', 'k_proj_weight', 'out_proj.bias']
    >>> sorted(layer.state_dict())[3:]
    ['out_proj.weight', 'q_proj_weight', 'v_proj_weight']
    """

    def __init__(self, embed_dim: int, num_heads: int, *, kdim: Optional[int] = None,
                 vdim: Optional[int] = None, bias: bool = True, temperature: float = 1.0,
                 dropout: float = 0.0, rng: RngLike = None):
        super().__init__(embed_dim, num_heads, kdim=kdim, vdim=vdim, bias=bias,
                         temperature=temperature, dropout=dropout, rng=rng)

    @classmethod
    def from_state_dict(cls, state_dict: Mapping, *, num_heads: int, prefix: str = "",
                        strict: bool = True, temperature: float = 1.0,
                        dropout: float = 0.0) -> "CrossModalAttention":
        """Build from an ``nn.MultiheadAttention`` state dict (NumPy arrays).

        ``embed_dim``, ``kdim``, ``vdim`` and ``bias`` are inferred from the entries: either
        ``in_proj_weight`` (3E, E) or ``q_proj_weight`` (E, E) + ``k_proj_weight`` (E, kdim) +
        ``v_proj_weight`` (E, vdim); ``in_proj_bias`` (3E,) and ``out_proj.bias`` (E,) both
        present or both absent; ``out_proj.weight`` (E, E).

        Parameters
        ----------
        state_dict : mapping of str to array
        num_heads : int
            Not stored in a state dict; must divide ``embed_dim``.
        prefix : str, default ""
            Key prefix to select and strip (e.g. ``"fusion.cross_attn."``).
        strict : bool, default True
            Reject unknown keys under ``prefix``.
        temperature, dropout : float
            As in the constructor.

        Raises
        ------
        ModelFormatError
            Naming the missing, unexpected or malformed key (``bias_k``/``bias_v`` always).

        Examples
        --------
        >>> import numpy as np
        >>> from mmcore.model import CrossModalAttention
        >>> src = CrossModalAttention(16, 2, kdim=8, vdim=4, rng=1)
        >>> dst = CrossModalAttention.from_state_dict(src.state_dict(), num_heads=2)
        >>> (dst.embed_dim, dst.kdim, dst.vdim)
        (16, 8, 4)
        """
        sd = _select(state_dict, prefix)
        E, kdim, vdim, bias = cls._infer_dims(cls.__name__, sd)
        mod = cls(E, num_heads, kdim=kdim, vdim=vdim, bias=bias, temperature=temperature,
                  dropout=dropout, rng=NO_INIT)
        return mod.load_state_dict(sd, strict=strict)

    @overload
    def __call__(self, query: ArrayLike, context: ArrayLike, *, value: Optional[ArrayLike] = None,
                 context_mask: Optional[ArrayLike] = None, attn_bias: Optional[ArrayLike] = None,
                 return_weights: Literal[False] = False,
                 average_weights: bool = True) -> np.ndarray: ...
    @overload
    def __call__(self, query: ArrayLike, context: ArrayLike, *, value: Optional[ArrayLike] = None,
                 context_mask: Optional[ArrayLike] = None, attn_bias: Optional[ArrayLike] = None,
                 return_weights: Literal[True], average_weights: bool = True) -> _WithWeights: ...
    @overload
    def __call__(self, query: ArrayLike, context: ArrayLike, *, value: Optional[ArrayLike] = None,
                 context_mask: Optional[ArrayLike] = None, attn_bias: Optional[ArrayLike] = None,
                 return_weights: bool = False,
                 average_weights: bool = True) -> Union[np.ndarray, _WithWeights]: ...
    def __call__(self, query: ArrayLike, context: ArrayLike, *, value: Optional[ArrayLike] = None,
                 context_mask: Optional[ArrayLike] = None, attn_bias: Optional[ArrayLike] = None,
                 return_weights: bool = False,
                 average_weights: bool = True) -> Union[np.ndarray, _WithWeights]:
        """Attend from ``query`` to ``context``.

        Parameters
        ----------
        query : float array (B, Lq, embed_dim)
        context : float array (B, Lk, kdim)
            Keys (and values, unless ``value`` is given).
        value : float array (B, Lk, vdim), optional
            Separate values (needed when ``kdim != vdim``); defaults to ``context``.
        context_mask : bool or 0/1 int array (B, Lk), optional
            True/1 = real token (Hugging Face convention). Right padding takes the kernel's
            ``key_lengths`` fast path; any other pattern a boolean mask.
        attn_bias : float array broadcastable to (B, num_heads, Lq, Lk), optional
            Added to the scaled scores (relative-position biases; ``-inf`` masks a pair).
        return_weights : bool, default False
            Also return the attention weights (materialises (B, H, Lq, Lk)).
        average_weights : bool, default True
            Average the weights over heads to (B, Lq, Lk), as PyTorch's ``average_attn_weights``;
            False keeps (B, num_heads, Lq, Lk).

        Returns
        -------
        out : float32 (B, Lq, embed_dim), or ``(out, weights)``
            A query row with nothing to attend to is exactly zero, and so are its weights.
        """
        owner = type(self).__name__
        query = as_float_input(owner, "query", query, ndim=3, dims="(B, Lq, embed_dim)",
                               last=self.embed_dim, last_name="embed_dim")
        context = as_float_input(owner, "context", context, ndim=3, dims="(B, Lk, kdim)",
                                 last=self.kdim, last_name="kdim")
        B, Lk = context.shape[0], context.shape[1]
        if query.shape[0] != B:
            raise ShapeError(f"[{owner}] query has batch size {query.shape[0]} but context has {B}")
        if value is None:
            if self.vdim != self.kdim:
                raise ShapeError(f"[{owner}] kdim ({self.kdim}) != vdim ({self.vdim}): pass the "
                                 "values separately as value=")
            value = context
        else:
            value = as_float_input(owner, "value", value, ndim=3, dims="(B, Lk, vdim)",
                                   last=self.vdim, last_name="vdim")
            if value.shape[:2] != context.shape[:2]:
                raise ShapeError(f"[{owner}] value has (B, Lk) = {tuple(value.shape[:2])}, "
                                 f"expected {tuple(context.shape[:2])} from context")
        key_lengths, keep = padding_mask_to_attention(context_mask, B, Lk, owner=owner,
                                                      name="context_mask")
        return self._attend(query, context, value, same_input=False, key_lengths=key_lengths,
                            mask=self._combine_masks(keep, None), attn_bias=attn_bias,
                            return_weights=return_weights, average_weights=average_weights)


class MultiHeadSelfAttention(_MultiheadAttention):
    """Multi-head self-attention with key padding, as ``nn.MultiheadAttention(x, x, x)``.

    The weights are those of ``torch.nn.MultiheadAttention(embed_dim, num_heads, bias=bias,
    batch_first=True)`` (packed ``in_proj_weight`` (3E, E), ``in_proj_bias`` (3E,),
    ``out_proj.weight``/``out_proj.bias``), and the input projection is a single (3E, E) GEMM.

    Parameters
    ----------
    embed_dim, num_heads : int
    bias : bool, default True
    temperature : float, default 1.0
    dropout : float, default 0.0
        Stored for training-time configurations, never applied (inference only).
    rng : None, int or numpy.random.Generator
        Initialisation as :class:`CrossModalAttention`.

    Examples
    --------
    >>> import numpy as np
    >>> from mmcore.model import MultiHeadSelfAttention
    >>> sa = MultiHeadSelfAttention(32, 4, rng=0)
    >>> x = np.random.default_rng(0).standard_normal((2, 6, 32), dtype=np.float32)
    >>> y, w = sa(x, attention_mask=np.array([[1] * 6, [1] * 4 + [0] * 2]), is_causal=True,
    ...           return_weights=True)
    >>> y.shape, bool(np.allclose(np.triu(w[0], 1), 0)), float(w[1, :, 4:].max())
    ((2, 6, 32), True, 0.0)
    """

    def __init__(self, embed_dim: int, num_heads: int, *, bias: bool = True,
                 temperature: float = 1.0, dropout: float = 0.0, rng: RngLike = None):
        super().__init__(embed_dim, num_heads, bias=bias, temperature=temperature,
                         dropout=dropout, rng=rng)

    @classmethod
    def from_state_dict(cls, state_dict: Mapping, *, num_heads: int, prefix: str = "",
                        strict: bool = True, temperature: float = 1.0,
                        dropout: float = 0.0) -> "MultiHeadSelfAttention":
        """Build from an ``nn.MultiheadAttention`` state dict whose kdim = vdim = embed_dim.

        Separate ``q/k/v_proj_weight`` entries of shape (E, E) are accepted and packed.
        Raises :class:`~mmcore.errors.ModelFormatError` naming the offending key.
        """
        owner = cls.__name__
        sd = _select(state_dict, prefix)
        E, kdim, vdim, bias = cls._infer_dims(owner, sd)
        if kdim != E or vdim != E:
            raise ModelFormatError(f"[{owner}] state dict has kdim={kdim}, vdim={vdim} != "
                                   f"embed_dim={E}; use CrossModalAttention")
        mod = cls(E, num_heads, bias=bias, temperature=temperature, dropout=dropout, rng=NO_INIT)
        return mod.load_state_dict(sd, strict=strict)

    @overload
    def __call__(self, x: ArrayLike, *, attention_mask: Optional[ArrayLike] = None,
                 is_causal: bool = False, attn_bias: Optional[ArrayLike] = None,
                 return_weights: Literal[False] = False,
                 average_weights: bool = True) -> np.ndarray: ...
    @overload
    def __call__(self, x: ArrayLike, *, attention_mask: Optional[ArrayLike] = None,
                 is_causal: bool = False, attn_bias: Optional[ArrayLike] = None,
                 return_weights: Literal[True], average_weights: bool = True) -> _WithWeights: ...
    @overload
    def __call__(self, x: ArrayLike, *, attention_mask: Optional[ArrayLike] = None,
                 is_causal: bool = False, attn_bias: Optional[ArrayLike] = None,
                 return_weights: bool = False,
                 average_weights: bool = True) -> Union[np.ndarray, _WithWeights]: ...
    def __call__(self, x: ArrayLike, *, attention_mask: Optional[ArrayLike] = None,
                 is_causal: bool = False, attn_bias: Optional[ArrayLike] = None,
                 return_weights: bool = False,
                 average_weights: bool = True) -> Union[np.ndarray, _WithWeights]:
        """Self-attention over ``x`` (B, L, embed_dim).

        Parameters
        ----------
        x : float array (B, L, embed_dim)
        attention_mask : bool or 0/1 int array (B, L), optional
            True/1 = real token. Padded keys are ignored; padded query positions still get a
            (finite, meaningless) output, as in PyTorch's and Hugging Face's encoders.
        is_causal : bool, default False
            Query ``i`` attends only to keys ``j <= i``.
        attn_bias : float array broadcastable to (B, num_heads, L, L), optional
        return_weights, average_weights : bool
            As :meth:`CrossModalAttention.__call__`.

        Returns
        -------
        out : float32 (B, L, embed_dim), or ``(out, weights)``
        """
        owner = type(self).__name__
        x = as_float_input(owner, "x", x, ndim=3, dims="(B, L, embed_dim)",
                           last=self.embed_dim, last_name="embed_dim")
        B, L = x.shape[0], x.shape[1]
        key_lengths, keep = padding_mask_to_attention(attention_mask, B, L, owner=owner,
                                                      name="attention_mask")
        mask = self._combine_masks(keep, _causal_mask(L, L) if is_causal else None)
        return self._attend(x, x, x, same_input=True, key_lengths=key_lengths, mask=mask,
                            attn_bias=attn_bias, return_weights=return_weights,
                            average_weights=average_weights)


def _select(state_dict: Mapping, prefix: str) -> dict:
    if not isinstance(state_dict, Mapping):
        raise ModelFormatError(f"state dict must be a mapping of names to arrays, got "
                               f"{type(state_dict).__name__}")
    return {k[len(prefix):]: v for k, v in state_dict.items()
            if isinstance(k, str) and k.startswith(prefix)}


# ----------------------------------------------------------------------------------------------
# transformer encoder layer


class TransformerEncoderLayer(Module):
    """One transformer encoder block: self-attention and an MLP, each with a residual.

    Pre-norm (``norm_first=True``, the default here)::

        x = x + self_attn(norm1(x));  x = x + linear2(act(linear1(norm2(x))))

    post-norm (``norm_first=False``, BERT style)::

        x = norm1(x + self_attn(x));  x = norm2(x + linear2(act(linear1(x))))

    Equals ``torch.nn.TransformerEncoderLayer(d_model, nhead, dim_feedforward, dropout,
    activation, layer_norm_eps, batch_first=True, norm_first, bias)`` in eval mode, with the
    same state-dict keys (``self_attn.in_proj_weight``, ``self_attn.in_proj_bias``,
    ``self_attn.out_proj.weight``/``bias``, ``linear1.*``, ``linear2.*``, ``norm1.*``,
    ``norm2.*``). Note the defaults differ from PyTorch's (``activation="gelu"``,
    ``norm_first=True``).

    Parameters
    ----------
    d_model, nhead : int
    dim_feedforward : int, default 2048
    dropout : float, default 0.0
        Stored for training-time configurations, never applied (inference only).
    activation : str or callable, default "gelu"
        ``"gelu"`` (exact erf form), ``"gelu_tanh"``, ``"quick_gelu"``, ``"relu"``, or a
        function of a float32 array.
    layer_norm_eps : float, default 1e-5
    norm_first : bool, default True
    bias : bool, default True
        Biases of every linear map and layer norm (PyTorch's ``bias=False`` drops them all).
    temperature : float, default 1.0
        Attention temperature (see :class:`CrossModalAttention`).
    rng : None, int or numpy.random.Generator
        Initialisation as PyTorch's: attention as :class:`MultiHeadSelfAttention`, linear maps
        as :class:`~mmcore.model.nn.Linear`, norms weight 1 / bias 0.

    Examples
    --------
    >>> import numpy as np
    >>> from mmcore.model import TransformerEncoderLayer
    >>> layer = TransformerEncoderLayer(32, 4, 64, rng=0)
    >>> x = np.random.default_rng(1).standard_normal((2, 5, 32), dtype=np.float32)
    >>> layer(x, attention_mask=np.array([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])).shape
    (2, 5, 32)
    >>> list(layer.state_dict())[:3]
    ['self_attn.in_proj_weight', 'self_attn.in_proj_bias', 'self_attn.out_proj.weight']
    """

    def __init__(self, d_model: int, nhead: int, dim_feedforward: int = 2048, *,
                 dropout: float = 0.0, activation: ActivationLike = "gelu",
                 layer_norm_eps: float = 1e-5,
                 norm_first: bool = True, bias: bool = True, temperature: float = 1.0,
                 rng: RngLike = None):
        super().__init__()
        owner = type(self).__name__
        self.d_model = check_features(owner, "d_model", d_model)
        self.nhead = check_features(owner, "nhead", nhead)
        self.dim_feedforward = check_features(owner, "dim_feedforward", dim_feedforward)
        self.dropout = check_prob(owner, "dropout", dropout)
        self.activation = activation
        self._act = get_activation(activation)
        self.norm_first = bool(norm_first)
        self.layer_norm_eps = check_positive(owner, "layer_norm_eps", layer_norm_eps)
        gen = as_generator(rng)
        sub_rng = NO_INIT if gen is None else gen
        self.add_module("self_attn", MultiHeadSelfAttention(
            self.d_model, self.nhead, bias=bias, temperature=temperature, dropout=dropout,
            rng=sub_rng))
        self.add_module("linear1", Linear(self.d_model, self.dim_feedforward, bias=bias,
                                          rng=sub_rng))
        self.add_module("linear2", Linear(self.dim_feedforward, self.d_model, bias=bias,
                                          rng=sub_rng))
        self.add_module("norm1", LayerNorm(self.d_model, eps=self.layer_norm_eps, bias=bias))
        self.add_module("norm2", LayerNorm(self.d_model, eps=self.layer_norm_eps, bias=bias))

    @classmethod
    def from_state_dict(cls, state_dict: Mapping, *, nhead: int, prefix: str = "",
                        strict: bool = True, **kwargs: Any) -> "TransformerEncoderLayer":
        """Build from a ``torch.nn.TransformerEncoderLayer`` state dict (NumPy arrays).

        ``d_model``, ``dim_feedforward`` and ``bias`` are inferred from
        ``self_attn.in_proj_weight`` (3d, d), ``linear1.weight`` (ff, d) and the presence of
        ``self_attn.in_proj_bias``. ``kwargs`` are the remaining constructor options
        (``activation``, ``norm_first``, ``layer_norm_eps``, ``temperature``, ``dropout``): they
        are not recorded in a state dict, so pass them as the checkpoint was trained.

        Raises
        ------
        ModelFormatError
            Naming the missing, unexpected or malformed key.

        Examples
        --------
        >>> from mmcore.model import TransformerEncoderLayer
        >>> src = TransformerEncoderLayer(16, 2, 24, rng=0)
        >>> sd = {"encoder.layers.0." + k: v for k, v in src.state_dict().items()}
        >>> dst = TransformerEncoderLayer.from_state_dict(sd, nhead=2, prefix="encoder.layers.0.")
        >>> dst.d_model, dst.dim_feedforward
        (16, 24)
        """
        owner = cls.__name__
        bad = set(kwargs) - {"activation", "norm_first", "layer_norm_eps", "temperature", "dropout"}
        if bad:
            raise TypeError(f"{owner}.from_state_dict got unexpected keyword(s) {sorted(bad)}")
        sd = _select(state_dict, prefix)
        w = state_entry(owner, sd, "self_attn.in_proj_weight", 2, "(3 * d_model, d_model)")
        d = int(w.shape[1])
        if w.shape[0] != 3 * d:
            raise ModelFormatError(f"[{owner}] state dict entry "
                                   f"{prefix + 'self_attn.in_proj_weight'!r} has shape "
                                   f"{tuple(w.shape)}, expected (3 * d_model, d_model)")
        w1 = state_entry(owner, sd, "linear1.weight", 2, "(dim_feedforward, d_model)")
        mod = cls(d, nhead, int(w1.shape[0]), bias="self_attn.in_proj_bias" in sd, rng=NO_INIT,
                  **kwargs)
        return mod.load_state_dict(sd, strict=strict)

    #: the argument cache of the fused block is derived from the parameters too
    _TRANSIENT = Module._TRANSIENT + ("_native_args",)

    def _after_load(self) -> None:
        # weights were replaced somewhere below: let go of the arguments (and packs) of the
        # older ones now rather than on the next call
        self.__dict__.pop("_native_args", None)
        super()._after_load()

    def _native_block(self, x: np.ndarray, attention_mask) -> Optional[np.ndarray]:
        """The whole pre-norm block in one call of :func:`mmcore.ops.encoder_layer` on the
        native backend (the same kernels as the step-by-step path, so the same results), or
        None when it does not apply: another backend, an activation the kernel does not fuse, a
        padding mask that is not right-padded, or a build without the fused kernel. The four
        weight matrices go in packed (:meth:`~mmcore.model.nn.Module.packed_weight`); the
        precision is the current one (:func:`mmcore.get_matmul_precision`)."""
        from .. import _backend
        attn = self.self_attn
        # the call's arguments are kept while the objects they come from are the same ones
        # (enough: parameter arrays are read-only, and every change of a weight replaces the
        # array, see mmcore.model.nn; the packed weights follow the same parameters)
        sig = (attn, attn.out_proj, self.linear1, self.linear2, self.norm1, self.norm2,
               attn.in_proj_weight, attn.in_proj_bias, attn.out_proj.weight, attn.out_proj.bias,
               self.linear1.weight, self.linear1.bias, self.linear2.weight, self.linear2.bias,
               self.norm1.weight, self.norm1.bias, self.norm2.weight, self.norm2.bias,
               self._act)
        scalars = (self.norm1.eps, self.norm2.eps, attn.temperature, attn.num_heads)
        cached = self.__dict__.get("_native_args")
        args: Union[None, Literal[False], Dict[str, Any]] = None
        if (cached is not None and cached[1] == scalars
                and all(a is b for a, b in zip(cached[0], sig))):
            args = cached[2]
        if args is None:
            act = fused_activation(self._act)
            if act is None or not attn.packed:
                args = False
            else:
                args = dict(
                    num_heads=attn.num_heads,
                    in_proj_weight=attn.packed_weight("in_proj_weight"),
                    in_proj_bias=attn.in_proj_bias,
                    out_proj_weight=attn.out_proj.packed_weight("weight"),
                    out_proj_bias=attn.out_proj.bias,
                    linear1_weight=self.linear1.packed_weight("weight"),
                    linear1_bias=self.linear1.bias,
                    linear2_weight=self.linear2.packed_weight("weight"),
                    linear2_bias=self.linear2.bias,
                    norm1_weight=self.norm1.weight, norm1_bias=self.norm1.bias,
                    norm2_weight=self.norm2.weight, norm2_bias=self.norm2.bias,
                    eps1=float(self.norm1.eps), eps2=float(self.norm2.eps), activation=act,
                    temperature=attn.temperature)
            self.__dict__["_native_args"] = (sig, scalars, args)
        if args is False or _backend.resolve_backend("encoder_layer", (x,), None) != "native":
            return None
        B, L = x.shape[0], x.shape[1]
        key_lengths, keep = padding_mask_to_attention(attention_mask, B, L,
                                                      owner=type(self).__name__,
                                                      name="attention_mask")
        if keep is not None:
            return None
        try:
            return _ops_encoder_layer(x, key_lengths=key_lengths, backend="native", **args)
        except BackendError:            # a build of mmcore._C without the fused kernel
            self.__dict__["_native_args"] = (sig, scalars, False)
            return None

    def _mlp(self, x: np.ndarray) -> np.ndarray:
        fused = fused_activation(self._act)
        w1 = self.linear1.packed_weight("weight")
        if fused is not None:           # the activation runs inside the first product
            h = _ops_linear(x, w1, self.linear1.bias, activation=fused)
        else:
            h = linear(x, w1, self.linear1.bias)
            h = np.asarray(self._act(h), dtype=np.float32)
        return linear(h, self.linear2.packed_weight("weight"), self.linear2.bias)

    @overload
    def __call__(self, x: ArrayLike, *, attention_mask: Optional[ArrayLike] = None,
                 is_causal: bool = False, attn_bias: Optional[ArrayLike] = None,
                 return_weights: Literal[False] = False,
                 average_weights: bool = True) -> np.ndarray: ...
    @overload
    def __call__(self, x: ArrayLike, *, attention_mask: Optional[ArrayLike] = None,
                 is_causal: bool = False, attn_bias: Optional[ArrayLike] = None,
                 return_weights: Literal[True], average_weights: bool = True) -> _WithWeights: ...
    @overload
    def __call__(self, x: ArrayLike, *, attention_mask: Optional[ArrayLike] = None,
                 is_causal: bool = False, attn_bias: Optional[ArrayLike] = None,
                 return_weights: bool = False,
                 average_weights: bool = True) -> Union[np.ndarray, _WithWeights]: ...
    def __call__(self, x: ArrayLike, *, attention_mask: Optional[ArrayLike] = None,
                 is_causal: bool = False, attn_bias: Optional[ArrayLike] = None,
                 return_weights: bool = False,
                 average_weights: bool = True) -> Union[np.ndarray, _WithWeights]:
        """Run the block on ``x`` (B, L, d_model).

        Parameters
        ----------
        x : float array (B, L, d_model)
        attention_mask : bool or 0/1 int array (B, L), optional
            True/1 = real token. Outputs at padded positions are finite but meaningless (PyTorch's
            fast path writes zeros there instead): ignore them.
        is_causal : bool, default False
        attn_bias : float array broadcastable to (B, nhead, L, L), optional
        return_weights, average_weights : bool
            Also return the self-attention weights, as :class:`MultiHeadSelfAttention`.

        Returns
        -------
        float32 (B, L, d_model), or ``(out, weights)``
        """
        owner = type(self).__name__
        h = as_float_input(owner, "x", x, ndim=3, dims="(B, L, d_model)", last=self.d_model,
                           last_name="d_model")
        if self.norm_first and not (is_causal or return_weights or attn_bias is not None):
            y = self._native_block(h, attention_mask)
            if y is not None:
                return y
        kw = dict(attention_mask=attention_mask, is_causal=is_causal, attn_bias=attn_bias,
                  return_weights=return_weights, average_weights=average_weights)
        w: Any                          # the weights when return_weights, else None
        if self.norm_first:
            res = self.self_attn(self.norm1(h), **kw)
            a, w = res if return_weights else (res, None)
            h = h + a
            h = h + self._mlp(self.norm2(h))
        else:
            res = self.self_attn(h, **kw)
            a, w = res if return_weights else (res, None)
            h = self.norm1(h + a)
            h = self.norm2(h + self._mlp(h))
        return (h, w) if return_weights else h

    def extra_repr(self) -> str:
        act = self.activation if isinstance(self.activation, str) else getattr(
            self.activation, "__name__", "custom")
        return (f"d_model={self.d_model}, nhead={self.nhead}, "
                f"dim_feedforward={self.dim_feedforward}, activation={act}, "
                f"norm_first={self.norm_first}")
