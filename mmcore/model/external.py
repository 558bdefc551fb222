"""User callables as encoders: the adapter :class:`MultiModalLoader.with_encoder
<mmcore.model.loader.MultiModalLoader.with_encoder>` wraps them in.

:class:`ExternalEncoder` turns a callable returning token embeddings, ``(tokens, mask)``,
``(tokens, mask, pooled)`` or pooled embeddings into the encoder protocol of
:class:`~mmcore.model.MultiModalModel` (``(tokens, mask, pooled)``), with its outputs
checked; :class:`~mmcore.model.onnx_encoder.OnnxEncoder` builds on it.
"""

from __future__ import annotations

import inspect
from typing import Any, Callable, Optional, Tuple

import numpy as np

from ..errors import ShapeError
from ..modality import Modality
from ..ops import masked_mean

__all__ = ["ExternalEncoder", "takes_mask"]


def takes_mask(fn: Callable) -> bool:
    """Whether ``fn`` accepts ``attention_mask=`` (or two positional arguments)."""
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):
        return True
    params = list(sig.parameters.values())
    if any(p.kind is p.VAR_KEYWORD for p in params) or "attention_mask" in sig.parameters:
        return True
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    return len(positional) >= 2 or any(p.kind is p.VAR_POSITIONAL for p in params)


class ExternalEncoder:
    """Adapts a user callable to the encoder protocol of :class:`MultiModalModel`.

    The callable gets the preprocessed batch (and the mask, when it accepts one) and returns
    token embeddings ``(B, L, D)``, ``(tokens, mask)``, ``(tokens, mask, pooled)`` or a pooled
    embedding ``(B, D)`` (taken as one token). Calling the adapter returns
    ``(tokens float32 (B, L, D), mask bool (B, L), pooled float32 (B, D))``, checked (a
    ShapeError names the modality for a wrong shape or non-finite values).

    Examples
    --------
    >>> import numpy as np
    >>> from mmcore.model.external import ExternalEncoder
    >>> enc = ExternalEncoder("text", lambda x: np.ones((len(x), 8), np.float32), 8)
    >>> [a.shape for a in enc(np.zeros((2, 5), np.int64))]
    [(2, 1, 8), (2, 1), (2, 8)]
    """

    def __init__(self, modality: Modality, fn: Callable, embed_dim: int):
        self.modality = modality
        self.fn = fn
        self.embed_dim = int(embed_dim)
        self._mask_arg = takes_mask(fn)
        self._by_keyword = False
        if self._mask_arg:
            try:
                self._by_keyword = "attention_mask" in inspect.signature(fn).parameters
            except (TypeError, ValueError):
                self._by_keyword = False

    def _fail(self, msg: str) -> ShapeError:
        return ShapeError(f"[MultiModalLoader] encoder of modality {str(self.modality)!r} "
                          f"{msg}")

    def __call__(self, x: Any, attention_mask: Optional[np.ndarray] = None
                 ) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
        if not self._mask_arg:
            out = self.fn(x)
        elif self._by_keyword:
            out = self.fn(x, attention_mask=attention_mask)
        else:
            out = self.fn(x, attention_mask)
        pooled = None
        if isinstance(out, tuple):
            if len(out) == 3:
                tokens, mask, pooled = out
            elif len(out) == 2:
                tokens, mask = out
            else:
                raise self._fail(f"returned a tuple of {len(out)} items, expected (tokens, "
                                 "mask) or (tokens, mask, pooled)")
        else:
            tokens, mask = out, None
        tokens = np.asarray(tokens, dtype=np.float32)
        D = self.embed_dim
        if tokens.ndim == 2:  # pooled (B, D): one token per row
            if mask is not None:
                raise self._fail("returned a 2-D embedding with a mask; return (B, L, D) tokens "
                                 "with a (B, L) mask, or a pooled (B, D) array alone")
            tokens = tokens[:, None, :]
        if tokens.ndim != 3 or tokens.shape[-1] != D:
            raise self._fail(f"returned embeddings of shape {tokens.shape}, expected (B, L, {D}) "
                             f"or (B, {D})")
        B, L = tokens.shape[:2]
        if mask is None:
            mask = np.ones((B, L), np.bool_)
        mask = np.asarray(mask)
        if mask.shape != (B, L):
            raise self._fail(f"returned a mask of shape {mask.shape}, expected {(B, L)}")
        mask = mask.astype(np.bool_)
        if not np.isfinite(tokens).all():
            raise self._fail("returned NaN or infinite embeddings")
        if pooled is None:
            pooled = masked_mean(tokens, mask)
        pooled = np.asarray(pooled, dtype=np.float32)
        if pooled.shape != (B, D):
            raise self._fail(f"returned pooled embeddings of shape {pooled.shape}, expected "
                             f"{(B, D)}")
        return tokens, mask, pooled

    def __repr__(self) -> str:
        return f"ExternalEncoder({self.fn!r}, embed_dim={self.embed_dim})"
