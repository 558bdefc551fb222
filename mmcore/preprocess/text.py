"""Tokenizers and batched text preprocessing.

``ByteTokenizer``
    Vocabulary-free: UTF-8 bytes, ``id = byte + 3`` (pad 0, eos 1, unk 2), the ByT5 scheme.
``HFTokenizer``
    A ``tokenizer.json`` through the Hugging Face ``tokenizers`` library (optional extra
    ``text``; imported on first use).
``TextPreprocessor``
    Strings -> padded ``input_ids`` / ``attention_mask`` batch.

Both tokenizers implement the small protocol the preprocessor uses: ``encode(text, *,
add_eos=False, max_length=None) -> int64 ndarray`` and the attributes ``pad_id``, ``eos_id``
and ``default_add_eos``.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any, Dict, List, Mapping, Optional, Sequence, Union

import numpy as np

from ..config import PreprocessingConfig
from ..errors import ArgumentError, ConfigError, ModelFormatError, ShapeError

if TYPE_CHECKING:
    from tokenizers import Tokenizer

__all__ = ["ByteTokenizer", "HFTokenizer", "TextPreprocessor", "load_tokenizer"]

PathLike = Union[str, "os.PathLike[str]"]


def _check_max_length(op: str, max_length: Any) -> Optional[int]:
    if max_length is None:
        return None
    if isinstance(max_length, bool) or not isinstance(max_length, (int, np.integer)) \
            or max_length < 1:
        raise ArgumentError(f"[{op}] max_length must be an integer >= 1 or None, "
                            f"got {max_length!r}")
    return int(max_length)


def _fit(ids: np.ndarray, eos: Optional[int], max_length: Optional[int]) -> np.ndarray:
    """Append ``eos`` (when not None) and cut to ``max_length``, keeping the eos last."""
    if max_length is not None:
        keep = max_length - (1 if eos is not None else 0)
        ids = ids[:max(keep, 0)]
    if eos is not None:
        ids = np.concatenate([ids, np.array([eos], np.int64)])
    return ids


# --------------------------------------------------------------------------------------------
# byte tokenizer

class ByteTokenizer:
    """Vocabulary-free byte-level tokenizer (the ByT5 scheme).

    Text is encoded as UTF-8 and every byte ``b`` becomes the id ``b + 3``; ids 0, 1 and 2
    are the special tokens pad, eos and unk. The vocabulary therefore has 259 ids.

    * ``encode(str)``: the UTF-8 bytes of the string. A character that has no UTF-8 encoding
      (a lone surrogate such as ``"\\ud800"``, e.g. from ``surrogateescape`` decoding) becomes
      the unk id 2.
    * ``encode(bytes)``: the raw bytes, whatever they hold: bytes that are not valid UTF-8
      are still encoded one id per byte (nothing is lost).
    * ``decode(ids)``: pad and eos ids are skipped, the bytes are decoded as UTF-8 with
      ``errors="replace"`` (each invalid sequence becomes U+FFFD), and unk ids, as well as ids
      outside the vocabulary (negative or >= 259, e.g. from a model whose embedding table is
      padded), become U+FFFD too.

    Examples
    --------
    >>> from mmcore.preprocess import ByteTokenizer
    >>> tok = ByteTokenizer()
    >>> tok.encode("hé", add_eos=True).tolist()
    [107, 198, 172, 1]
    >>> tok.decode([107, 198, 172, 1, 0, 0])
    'hé'
    >>> tok.decode(tok.encode(b"\\xff ok"))
    '\\ufffd ok'
    """

    pad_id = 0
    eos_id = 1
    unk_id = 2
    offset = 3
    vocab_size = 259
    #: TextPreprocessor appends eos by default, as ByT5's tokenizer does.
    default_add_eos = True

    def __repr__(self) -> str:
        return "ByteTokenizer()"

    def __eq__(self, other: Any) -> bool:
        return isinstance(other, ByteTokenizer)

    def __hash__(self) -> int:
        return hash(ByteTokenizer)

    def encode(self, text: Union[str, bytes, bytearray, memoryview], *, add_eos: bool = False,
               max_length: Optional[int] = None) -> np.ndarray:
        """Ids of ``text`` as an int64 array.

        Parameters
        ----------
        text : str or bytes-like
        add_eos : bool, default False
            Append the eos id (1).
        max_length : int, optional
            Cut to at most this many ids; with ``add_eos`` the eos stays the last id.
        """
        max_length = _check_max_length("ByteTokenizer.encode", max_length)
        if isinstance(text, str):
            try:
                raw = text.encode("utf-8")
                ids = np.frombuffer(raw, np.uint8).astype(np.int64) + self.offset
            except UnicodeEncodeError:
                ids = self._encode_with_unk(text)
        elif isinstance(text, (bytes, bytearray, memoryview)):
            ids = np.frombuffer(bytes(text), np.uint8).astype(np.int64) + self.offset
        else:
            raise ArgumentError(f"[ByteTokenizer.encode] text must be a str or bytes, "
                                f"got {type(text).__name__}")
        return _fit(ids, self.eos_id if add_eos else None, max_length)

    def _encode_with_unk(self, text: str) -> np.ndarray:
        out: List[int] = []
        for ch in text:
            try:
                out.extend(b + self.offset for b in ch.encode("utf-8"))
            except UnicodeEncodeError:
                out.append(self.unk_id)
        return np.asarray(out, dtype=np.int64)

    def decode(self, ids: Any) -> str:
        """The text of ``ids`` (a 1-D sequence or array of ints); see the class docstring."""
        arr = np.asarray(ids)
        if arr.ndim != 1 or (arr.size and not np.issubdtype(arr.dtype, np.integer)):
            raise ShapeError(f"[ByteTokenizer.decode] ids must be a 1-D sequence of ints, got "
                             f"shape {arr.shape} and dtype {arr.dtype}")
        arr = arr.astype(np.int64, copy=False)
        arr = arr[(arr != self.pad_id) & (arr != self.eos_id)]
        bad = (arr < self.offset) | (arr >= self.vocab_size)
        if not bad.any():
            return (arr - self.offset).astype(np.uint8).tobytes().decode("utf-8", "replace")
        parts: List[str] = []
        start = 0
        for j in np.flatnonzero(bad):
            chunk = arr[start:j] - self.offset
            parts.append(chunk.astype(np.uint8).tobytes().decode("utf-8", "replace"))
            parts.append("\ufffd")
            start = j + 1
        parts.append((arr[start:] - self.offset).astype(np.uint8).tobytes()
                     .decode("utf-8", "replace"))
        return "".join(parts)


# --------------------------------------------------------------------------------------------
# Hugging Face tokenizers

_PAD_TOKENS = ("<pad>", "[PAD]", "<|pad|>", "<|padding|>", "<PAD>")
_EOS_TOKENS = ("</s>", "<|endoftext|>", "<eos>", "[SEP]", "<|eot_id|>", "<|im_end|>", "<EOS>")


def _import_tokenizers():
    try:
        import tokenizers
    except ImportError as exc:
        raise ImportError("mmcore.preprocess.HFTokenizer needs the 'tokenizers' package: "
                          "pip install tokenizers (or pip install \"mmcore[text]\"): "
                          f"{exc}") from exc
    return tokenizers


def _special_id(tok, value: Any, candidates: Sequence[str], name: str) -> Optional[int]:
    if value is not None:
        if isinstance(value, str):
            i = tok.token_to_id(value)
            if i is None:
                raise ConfigError(f"HFTokenizer.{name}: token {value!r} is not in the "
                                  "vocabulary")
            return int(i)
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
            raise ConfigError(f"HFTokenizer.{name} must be a token id >= 0, a token string or "
                              f"None, got {value!r}")
        return int(value)
    for t in candidates:
        i = tok.token_to_id(t)
        if i is not None:
            return int(i)
    return None


class HFTokenizer:
    """A Hugging Face ``tokenizer.json`` run by the ``tokenizers`` library.

    Parameters
    ----------
    path : str or os.PathLike
        A ``tokenizer.json`` file, or a directory that holds one.
    pad_id : int or str, optional
        The padding id (or token). Default: the tokenizer's padding configuration
        (``tokenizer.padding["pad_id"]``) when it has one, else the first of ``<pad>``,
        ``[PAD]``, ``<|pad|>``, ``<|padding|>``, ``<PAD>`` in the vocabulary, else None (then
        :class:`TextPreprocessor` refuses the tokenizer; pass ``pad_id``).
    eos_id : int or str, optional
        The id appended by ``add_eos``. Default: the first of ``</s>``, ``<|endoftext|>``,
        ``<eos>``, ``[SEP]``, ``<|eot_id|>``, ``<|im_end|>``, ``<EOS>`` in the vocabulary, else
        None.
    add_special_tokens : bool, default True
        Let the tokenizer's post-processor add its special tokens (``[CLS] ... [SEP]``,
        ``<s> ... </s>``), as ``transformers`` does by default.

    Notes
    -----
    ``encode(text, max_length=...)`` truncates inside the ``tokenizers`` library (a copy of
    the tokenizer with ``enable_truncation(max_length)``), so the post-processor's special
    tokens survive truncation exactly as with ``transformers``. ``add_eos`` appends
    ``eos_id`` after that (and keeps it within ``max_length``). ``default_add_eos`` is False:
    the post-processor already adds what the model was trained with.

    Raises
    ------
    ModelFormatError
        When the file is missing or is not a tokenizer the library can load (naming it).
    ImportError
        When ``tokenizers`` is not installed.
    """

    default_add_eos = False

    def __init__(self, path: PathLike, *, pad_id: Union[int, str, None] = None,
                 eos_id: Union[int, str, None] = None, add_special_tokens: bool = True):
        tokenizers = _import_tokenizers()
        if not isinstance(path, (str, os.PathLike)):
            raise ConfigError(f"HFTokenizer.path must be a str or os.PathLike, "
                              f"got {type(path).__name__}")
        fname = os.fspath(path)
        if os.path.isdir(fname):
            fname = os.path.join(fname, "tokenizer.json")
        from .._files import open_regular
        # read here (a FIFO or device is refused without blocking) and parsed from memory:
        # the bytes checked are the bytes used
        with open_regular(fname, what="tokenizer file", error=ModelFormatError,
                          op="HFTokenizer") as f:
            try:
                data = f.read()
            except OSError as exc:
                raise ModelFormatError(f"[HFTokenizer] cannot read tokenizer file {fname!r}: "
                                       f"{exc.strerror or exc}") from None
        try:
            self._tok = tokenizers.Tokenizer.from_str(data.decode("utf-8"))
        except Exception as exc:  # the library raises a plain Exception for bad JSON
            raise ModelFormatError(f"[HFTokenizer] cannot load tokenizer file {fname!r}: "
                                   f"{exc}") from None
        self.path = fname
        self.add_special_tokens = bool(add_special_tokens)
        if pad_id is None:
            padding = self._tok.padding
            if padding and padding.get("pad_id") is not None:
                pad_id = int(padding["pad_id"])
        self.pad_id = _special_id(self._tok, pad_id, _PAD_TOKENS, "pad_id")
        self.eos_id = _special_id(self._tok, eos_id, _EOS_TOKENS, "eos_id")
        # the library's own padding/truncation would interfere with encode(); they are
        # applied by TextPreprocessor (truncation through the copies below)
        self._tok.no_padding()
        self._tok.no_truncation()
        self._truncating: Dict[int, Any] = {}

    def __repr__(self) -> str:
        return f"HFTokenizer({self.path!r}, pad_id={self.pad_id}, eos_id={self.eos_id})"

    @property
    def vocab_size(self) -> int:
        return int(self._tok.get_vocab_size(with_added_tokens=True))

    @property
    def tokenizer(self) -> Tokenizer:
        """The underlying ``tokenizers.Tokenizer``."""
        return self._tok

    def _truncating_copy(self, max_length: int):
        tok = self._truncating.get(max_length)
        if tok is None:
            tokenizers = _import_tokenizers()
            tok = tokenizers.Tokenizer.from_str(self._tok.to_str())
            tok.enable_truncation(max_length)
            self._truncating[max_length] = tok
        return tok

    def _encode_many(self, texts: Sequence[str], *, add_eos: bool,
                     max_length: Optional[int]) -> List[np.ndarray]:
        eos = None
        if add_eos:
            if self.eos_id is None:
                raise ConfigError("HFTokenizer: add_eos=True but the tokenizer has no eos "
                                  "token; pass eos_id=")
            eos = self.eos_id
        limit = max_length
        if limit is not None and eos is not None:
            limit = max(limit - 1, 0)
        for i, t in enumerate(texts):
            if not isinstance(t, str):
                raise ArgumentError(f"[HFTokenizer.encode] texts[{i}] must be a str, "
                                    f"got {type(t).__name__}")
        if limit == 0:
            base = [np.zeros(0, np.int64) for _ in texts]
        else:
            tok = self._tok if limit is None else self._truncating_copy(limit)
            encs = tok.encode_batch(list(texts), add_special_tokens=self.add_special_tokens)
            base = [np.asarray(e.ids, dtype=np.int64) for e in encs]
            if limit is not None:
                for i, ids in enumerate(base):
                    if ids.shape[0] > limit:
                        # the library leaves a sequence whole when the limit cannot even
                        # hold the post-processor's special tokens
                        raise ShapeError(
                            f"[HFTokenizer.encode] max_length={max_length} is too short: the "
                            f"tokenizer could not cut texts[{i}] to {limit} tokens (its "
                            "special tokens alone do not fit)")
        if eos is None:
            return base
        return [_fit(ids, eos, max_length) for ids in base]

    def encode(self, text: str, *, add_eos: bool = False,
               max_length: Optional[int] = None) -> np.ndarray:
        """Ids of ``text`` as an int64 array (see the class notes for ``max_length``)."""
        max_length = _check_max_length("HFTokenizer.encode", max_length)
        if not isinstance(text, str):
            raise ArgumentError(f"[HFTokenizer.encode] text must be a str, "
                                f"got {type(text).__name__}")
        return self._encode_many([text], add_eos=add_eos, max_length=max_length)[0]

    def encode_batch(self, texts: Sequence[str], *, add_eos: bool = False,
                     max_length: Optional[int] = None) -> List[np.ndarray]:
        """Ids of every text (the library encodes the batch in parallel)."""
        max_length = _check_max_length("HFTokenizer.encode_batch", max_length)
        return self._encode_many(texts, add_eos=add_eos, max_length=max_length)

    def decode(self, ids: Any, *, skip_special_tokens: bool = True) -> str:
        arr = np.asarray(ids)
        if arr.ndim != 1:
            raise ShapeError(f"[HFTokenizer.decode] ids must be 1-D, got shape {arr.shape}")
        return self._tok.decode([int(i) for i in arr], skip_special_tokens=skip_special_tokens)


def load_tokenizer(spec: Any) -> Any:
    """``"byte"`` -> :class:`ByteTokenizer`; a path -> :class:`HFTokenizer`; a tokenizer
    object is returned as is."""
    if isinstance(spec, str) and spec.lower() == "byte":
        return ByteTokenizer()
    if isinstance(spec, (str, os.PathLike)):
        return HFTokenizer(spec)
    if hasattr(spec, "encode") and hasattr(spec, "pad_id"):
        return spec
    raise ConfigError(f"tokenizer must be 'byte', a tokenizer.json path or a tokenizer object, "
                      f"got {type(spec).__name__}")


# --------------------------------------------------------------------------------------------
# batches

class TextPreprocessor:
    """Tokenize a batch of strings into padded ``input_ids`` and ``attention_mask``.

    Parameters
    ----------
    tokenizer : ByteTokenizer, HFTokenizer, "byte" or a tokenizer.json path
        Anything with ``encode(text, *, add_eos, max_length)`` and ``pad_id``.
    max_length : int or None
        Longest sequence in tokens (keyword, required; None means no limit and needs
        ``padding="longest"``).
    padding : {"longest", "max_length"}, default "longest"
        ``"longest"``: pad to the longest sequence of the batch; ``"max_length"``: to
        ``max_length``.
    truncation : bool, default True
        Cut sequences longer than ``max_length`` at the end (keeping their start, and the eos
        with ``add_eos``). False: such a sequence raises :class:`~mmcore.errors.ShapeError`
        naming its index.
    padding_side : {"right", "left"}, default "right"
        Where the pad ids go (``"left"`` for decoder-only generation).
    add_eos : bool or None, default None
        Append the tokenizer's eos id to every sequence (counted in ``max_length``); None uses
        ``tokenizer.default_add_eos`` (True for :class:`ByteTokenizer`, as ByT5 does; False for
        :class:`HFTokenizer`, whose post-processor adds the model's special tokens).

    Call
    ----
    ``preprocessor(texts)`` with a string (a batch of one), bytes (:class:`ByteTokenizer`
    only) or a list/tuple of them.

    Returns
    -------
    dict
        ``"input_ids"``: int64 ``(B, L)``, padded with ``tokenizer.pad_id``;
        ``"attention_mask"``: bool ``(B, L)``, True = real token.

    Edge cases: an empty string gives a row of padding with an all-False mask (or just the eos
    with ``add_eos``). With ``padding="longest"``, ``L`` is the longest length in the batch,
    which is 0 when every sequence is empty (``(B, 0)`` arrays), never padded up to 1. An empty
    batch gives ``(0, L)`` arrays with ``L = max_length`` for ``"max_length"`` and 0 for
    ``"longest"``.

    Examples
    --------
    >>> from mmcore.preprocess import TextPreprocessor
    >>> pre = TextPreprocessor("byte", max_length=8, padding_side="left")
    >>> out = pre(["hi", ""])
    >>> out["input_ids"].tolist()
    [[107, 108, 1], [0, 0, 1]]
    >>> out["attention_mask"].tolist()
    [[True, True, True], [False, False, True]]
    """

    def __init__(self, tokenizer: Any = "byte", *, max_length: Optional[int],
                 padding: str = "longest", truncation: bool = True,
                 padding_side: str = "right", add_eos: Optional[bool] = None):
        owner = "TextPreprocessor"
        self.tokenizer = load_tokenizer(tokenizer)
        if max_length is not None and (isinstance(max_length, bool) or not isinstance(
                max_length, (int, np.integer)) or max_length < 1):
            raise ConfigError(f"{owner}.max_length must be an integer >= 1 or None, "
                              f"got {max_length!r}")
        self.max_length = None if max_length is None else int(max_length)
        if padding is True:
            padding = "longest"
        if not isinstance(padding, str) or padding.lower() not in ("longest", "max_length"):
            raise ConfigError(f"{owner}.padding must be 'longest' or 'max_length', "
                              f"got {padding!r}")
        self.padding = padding.lower()
        if self.padding == "max_length" and self.max_length is None:
            raise ConfigError(f"{owner}.padding 'max_length' needs max_length to pad to")
        if not isinstance(truncation, (bool, np.bool_)):
            raise ConfigError(f"{owner}.truncation must be True or False, got {truncation!r}")
        self.truncation = bool(truncation)
        if not isinstance(padding_side, str) or padding_side.lower() not in ("right", "left"):
            raise ConfigError(f"{owner}.padding_side must be 'right' or 'left', "
                              f"got {padding_side!r}")
        self.padding_side = padding_side.lower()
        if add_eos is None:
            add_eos = bool(getattr(self.tokenizer, "default_add_eos", False))
        if not isinstance(add_eos, (bool, np.bool_)):
            raise ConfigError(f"{owner}.add_eos must be True, False or None, got {add_eos!r}")
        self.add_eos = bool(add_eos)
        if getattr(self.tokenizer, "pad_id", None) is None:
            raise ConfigError(f"{owner}.tokenizer has no pad id (pass pad_id= to HFTokenizer)")
        self.pad_id = int(self.tokenizer.pad_id)

    @classmethod
    def from_config(cls, config: Union[PreprocessingConfig, Mapping[str, Any]]
                    ) -> "TextPreprocessor":
        """Build from a ``modality="text"`` :class:`~mmcore.config.PreprocessingConfig`."""
        if isinstance(config, Mapping):
            data = dict(config)
            data.setdefault("modality", "text")
            config = PreprocessingConfig.from_dict(data)
        if not isinstance(config, PreprocessingConfig) or config.modality != "text":
            raise ConfigError("TextPreprocessor.from_config needs a PreprocessingConfig with "
                              "modality='text'")
        return cls(config.tokenizer, max_length=config.max_length, padding=config.padding,
                   truncation=config.truncation, padding_side=config.padding_side,
                   add_eos=config.add_eos)

    def __repr__(self) -> str:
        return (f"TextPreprocessor({self.tokenizer!r}, max_length={self.max_length}, "
                f"padding={self.padding!r}, truncation={self.truncation}, "
                f"padding_side={self.padding_side!r}, add_eos={self.add_eos})")

    def _texts(self, texts: Any) -> List[Any]:
        if isinstance(texts, (str, bytes, bytearray)):
            return [texts]
        if isinstance(texts, (list, tuple)):
            for i, t in enumerate(texts):
                if not isinstance(t, (str, bytes, bytearray)):
                    raise ArgumentError(f"[TextPreprocessor] texts[{i}] must be a str, got "
                                        f"{type(t).__name__}")
            return list(texts)
        raise ArgumentError(f"[TextPreprocessor] texts must be a str or a list of str, got "
                            f"{type(texts).__name__}")

    def encode(self, texts: Any) -> List[np.ndarray]:
        """The id sequences of ``texts``, truncated per the settings, before padding."""
        items = self._texts(texts)
        limit = self.max_length if self.truncation else None
        tok = self.tokenizer
        if hasattr(tok, "encode_batch") and items:
            seqs = tok.encode_batch(items, add_eos=self.add_eos, max_length=limit)
        else:
            seqs = [tok.encode(t, add_eos=self.add_eos, max_length=limit) for t in items]
        seqs = [np.asarray(s, dtype=np.int64) for s in seqs]
        if self.max_length is not None:
            for i, s in enumerate(seqs):
                if s.ndim != 1:
                    raise ShapeError(f"[TextPreprocessor] the tokenizer returned shape "
                                     f"{s.shape} for texts[{i}], expected 1-D ids")
                if s.shape[0] > self.max_length:
                    why = ("and truncation=False" if not self.truncation
                           else "after truncation by the tokenizer")
                    raise ShapeError(f"[TextPreprocessor] texts[{i}] has {s.shape[0]} tokens, "
                                     f"more than max_length={self.max_length}, {why}")
        return seqs

    def __call__(self, texts: Any) -> Dict[str, np.ndarray]:
        """``{"input_ids", "attention_mask"}`` of ``texts`` (see the class docstring)."""
        seqs = self.encode(texts)
        lengths = [s.shape[0] for s in seqs]
        if self.padding == "max_length":
            L = int(self.max_length)  # type: ignore[arg-type]
        else:
            L = max(lengths, default=0)
        B = len(seqs)
        ids = np.full((B, L), self.pad_id, dtype=np.int64)
        mask = np.zeros((B, L), dtype=bool)
        left = self.padding_side == "left"
        for row, (s, n) in enumerate(zip(seqs, lengths)):
            if n == 0:
                continue
            if left:
                ids[row, L - n:] = s
                mask[row, L - n:] = True
            else:
                ids[row, :n] = s
                mask[row, :n] = True
        return {"input_ids": ids, "attention_mask": mask}
