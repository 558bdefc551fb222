"""The text preprocessing config."""

from __future__ import annotations

import os
from dataclasses import field
from typing import Any, ClassVar, Dict, Optional, Tuple

from ..checks import check_bool, check_choice, check_int, fail
from .base import MODALITY_DEFAULT, PreprocessingConfig, preprocessing_dataclass

__all__ = ["TextPreprocessingConfig"]


@preprocessing_dataclass
class TextPreprocessingConfig(PreprocessingConfig):
    """How text becomes token ids (``modality="text"``), for
    :class:`mmcore.preprocess.TextPreprocessor`.

    Parameters
    ----------
    modality : "text"
        The tag (``PreprocessingConfig(modality="text")`` builds this class).
    tokenizer : str, default "byte"
        ``"byte"`` (:class:`mmcore.preprocess.ByteTokenizer`) or the path of a
        ``tokenizer.json`` (or of the directory that holds one) for
        :class:`mmcore.preprocess.HFTokenizer`. None is taken as ``"byte"``.
    max_length : int or None, default None
        Longest sequence in tokens (None: no limit, only with ``padding="longest"``).
    padding : {"longest", "max_length"}, default "longest"
        ``"max_length"`` needs ``max_length``. ``True`` is accepted as ``"longest"``.
    truncation : bool, default True
        Cut sequences longer than ``max_length`` (False: they raise).
    padding_side : {"right", "left"}, default "right"
    add_eos : bool or None, default None
        Append the end-of-sequence id; None: the tokenizer's convention (True for
        ``ByteTokenizer``, as ByT5 does; False for ``HFTokenizer``, whose post-processor adds
        the model's special tokens).
    extra : dict, default {}
        Free-form options (string keys, JSON-friendly values), kept and round-tripped as is.

    Examples
    --------
    >>> from mmcore.config import PreprocessingConfig
    >>> cfg = PreprocessingConfig(modality="text", max_length=128, padding="max_length")
    >>> cfg.tokenizer, cfg.padding, cfg.padding_side
    ('byte', 'max_length', 'right')
    """

    modality: str = "text"
    tokenizer: Optional[str] = "byte"
    max_length: Optional[int] = None
    padding: str = "longest"
    truncation: bool = True
    padding_side: Optional[str] = "right"
    add_eos: Optional[bool] = None
    extra: Dict[str, Any] = field(default_factory=dict)

    MODALITY: ClassVar[str] = "text"
    _OPTIONAL_FIELDS: ClassVar[Tuple[str, ...]] = ("max_length", "add_eos")

    def _validate_fields(self) -> None:
        owner = self._owner()
        self._set("truncation", check_bool(owner, "truncation", self.truncation))
        tok: Any = self.tokenizer
        if tok is MODALITY_DEFAULT or tok is None:
            tok = "byte"
        if isinstance(tok, os.PathLike):
            tok = os.fspath(tok)
        if not isinstance(tok, str) or not tok:
            raise fail(owner, "tokenizer", "must be 'byte' or the path of a tokenizer.json",
                       self.tokenizer)
        self._set("tokenizer", "byte" if tok.lower() == "byte" else tok)
        if self.max_length is not None:
            self._set("max_length", check_int(owner, "max_length", self.max_length))
        pad: Any = self.padding
        if pad is MODALITY_DEFAULT or pad is True:
            pad = "longest"
        self._set("padding", check_choice(owner, "padding", pad, self.TEXT_PADDING_MODES))
        if self.padding == "max_length" and self.max_length is None:
            raise fail(owner, "padding", "'max_length' needs max_length to pad to",
                       self.padding)
        side = self.padding_side
        if side is MODALITY_DEFAULT or side is None:
            side = "right"
        self._set("padding_side", check_choice(owner, "padding_side", side, self.PADDING_SIDES))
        if self.add_eos is not None:
            self._set("add_eos", check_bool(owner, "add_eos", self.add_eos))
