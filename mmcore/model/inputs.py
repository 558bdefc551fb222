"""What a model accepts as input, checked where it enters ``infer``.

The layouts and dtypes each modality accepts are listed in :mod:`mmcore.model.model`'s
docstring (and :data:`ACCEPTED_INPUTS`); the functions here decide, per
modality input, whether it is raw or preprocessed and its batch size, and refuse what would
fail deeper (a channels-last float image, a (T, C) stereo array, a missing path, a FIFO) with
an error that names the input, the shape received and what was expected.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Optional, Tuple

import numpy as np

from ..config import PreprocessingConfig
from ..errors import ModalityError, ShapeError
from ..modality import Modality
from .encoders import ModalityEncoder

__all__ = ["MultiModalInput", "MultiModalOutput", "ACCEPTED_INPUTS", "PATH_TYPES", "ENCODED_TYPES",
           "kind_of",
           "classify", "batch_size", "decode_error", "check_files", "check_preprocessed",
           "resolve_audio_pairs", "stack_clips", "raw_items", "raw_subset", "item_data"]

#: What counts as a path among the inputs (image, audio and video files).
PATH_TYPES = (str, os.PathLike)

#: Encoded data among the inputs: an encoded image, audio or video file held in memory (and
#: encoded text for the text modality). Binary file objects are read into bytes on entry.
ENCODED_TYPES = (bytes, bytearray, memoryview)

#: What each modality accepts, raw (through the preprocessor) and preprocessed (straight to
#: the encoder); quoted by the input errors.
ACCEPTED_INPUTS = {
    "text": ("raw: a str or a list of str; preprocessed: integer input_ids (B, L)"),
    "image": ("raw (decoded, resized and normalized by the model): uint8 RGB (H, W, 3) or "
              "(N, H, W, 3), a path, an encoded image (bytes, bytearray, memoryview, binary "
              "file object), or a list of paths / encoded images / uint8 (H, W, 3) images; "
              "preprocessed (straight to the encoder): float pixel_values (B, 3, S, S) or "
              "patches (B, N, 3*p*p)"),
    "audio": ("raw: a float waveform (T,) in [-1, 1], a (B, T) batch of equal-length clips, "
              "a (waveform, sample_rate) pair, a path, encoded audio (bytes, bytearray, "
              "memoryview, binary file object), or a list of those / 1-D waveforms / pairs; "
              "preprocessed: float input_features (B, n_mels, frames)"),
    "video": ("raw: a uint8 RGB clip (T, H, W, 3) or a batch (B, T, H, W, 3), a path, an "
              "encoded video (bytes, bytearray, memoryview, binary file object), or a list of "
              "those / uint8 clips; preprocessed: float pixel_values (B, T, 3, S, S)"),
}


def kind_of(modality: Modality, pre: Optional[PreprocessingConfig] = None) -> Optional[str]:
    """The preprocessor family of a modality ("text", "image", "audio", "video") or None."""
    if pre is not None:
        return pre.modality
    if not modality.is_custom:
        return str(modality)
    return None


def _bad_input(where: str, a: np.ndarray, kind: str, why: str = "") -> ShapeError:
    why = f": {why}" if why else ""
    return ShapeError(f"[MultiModalInput] {where} has shape {a.shape} and dtype {a.dtype}{why}. "
                      f"{kind.capitalize()} inputs accepted: {ACCEPTED_INPUTS[kind]}")


def _classify_image(a: np.ndarray, where: str) -> Tuple[bool, int]:
    if a.dtype == np.uint8:
        if a.ndim in (3, 4) and a.shape[-1] == 3:
            return True, (1 if a.ndim == 3 else a.shape[0])
        if a.ndim in (3, 4) and a.shape[-3] == 3:
            t = "x.transpose(1, 2, 0)" if a.ndim == 3 else "x.transpose(0, 2, 3, 1)"
            raise _bad_input(where, a, "image", "uint8 images are raw and channels-last; this "
                             f"looks channels-first: did you mean {t}?")
        if a.ndim == 2 or (a.ndim in (3, 4) and a.shape[-1] in (1, 4)):
            raise _bad_input(where, a, "image", "raw images must be RGB with 3 channels "
                             "(convert grayscale / RGBA to RGB first)")
        raise _bad_input(where, a, "image")
    if a.dtype.kind == "f":
        if a.ndim == 4 and a.shape[1] == 3:
            return False, a.shape[0]
        if a.ndim == 4 and a.shape[-1] in (1, 3, 4):
            raise _bad_input(where, a, "image", "a float array is taken as preprocessed "
                             "pixel_values (B, 3, S, S) and goes straight to the encoder, and "
                             "this one looks channels-last (B, H, W, C): did you mean to "
                             "transpose to (B, 3, H, W) (x.transpose(0, 3, 1, 2), already "
                             "resized and normalized)? To have the model resize and normalize "
                             "it, pass uint8 (B, H, W, 3) instead")
        if a.ndim == 3 and a.shape[-1] not in (1, 3, 4):
            return False, a.shape[0]
        if a.ndim == 3:
            raise _bad_input(where, a, "image", "a 3-D float array is taken as preprocessed "
                             "patches (B, N, 3*p*p); this looks like one float (H, W, C) "
                             "image: pass it as uint8 (H, W, 3) for the raw path, or as "
                             "pixel_values (1, 3, S, S)")
        raise _bad_input(where, a, "image")
    hint = ""
    if a.dtype.kind in "iub":
        hint = ("raw images must be uint8 (if the values are 0..255, x.astype(np.uint8)); "
                "preprocessed ones float")
    raise _bad_input(where, a, "image", hint)


def _classify_video(a: np.ndarray, where: str) -> Tuple[bool, int]:
    if a.dtype == np.uint8:
        if a.ndim in (4, 5) and a.shape[-1] == 3:
            return True, (1 if a.ndim == 4 else a.shape[0])
        if a.ndim in (4, 5) and a.shape[-3] == 3:
            t = "x.transpose(0, 2, 3, 1)" if a.ndim == 4 else "x.transpose(0, 1, 3, 4, 2)"
            raise _bad_input(where, a, "video", "uint8 clips are raw and channels-last; this "
                             f"looks channels-first: did you mean {t}?")
        raise _bad_input(where, a, "video")
    if a.dtype.kind == "f":
        if a.ndim == 5 and a.shape[2] == 3:
            return False, a.shape[0]
        if a.ndim == 5 and a.shape[-1] in (1, 3, 4):
            raise _bad_input(where, a, "video", "a float array is taken as preprocessed "
                             "pixel_values (B, T, 3, S, S) and goes straight to the encoder, "
                             "and this one looks channels-last (B, T, H, W, C): did you mean "
                             "to transpose to (B, T, 3, H, W) (x.transpose(0, 1, 4, 2, 3))? "
                             "To have the model sample, resize and normalize it, pass uint8 "
                             "(B, T, H, W, 3)")
        if a.ndim == 4 and a.shape[1] == 3:
            raise _bad_input(where, a, "video", "one preprocessed clip (T, 3, S, S) needs a "
                             "batch axis: x[None]")
        raise _bad_input(where, a, "video")
    hint = ""
    if a.dtype.kind in "iub":
        hint = "raw clips must be uint8 (if the values are 0..255, x.astype(np.uint8))"
    raise _bad_input(where, a, "video", hint)


def classify(kind: Optional[str], value: Any, where: str) -> Tuple[bool, int]:
    """``(is_raw, batch_size)`` of one modality input (see the module docstring); ShapeError
    naming ``where``, the shape and dtype received and what the modality accepts, or saying
    the batch is empty."""
    is_raw, b = _classify_layout(kind, value, where)
    if b < 1:
        raise ShapeError(f"[MultiModalInput] {where} is an empty batch (B = {b}, shape "
                         f"{np.shape(value) if not isinstance(value, Mapping) else 'in a dict'})")
    return is_raw, b


def batch_size(modality: Modality, pre: Optional[PreprocessingConfig], value: Any, *,
               where: str = "input") -> int:
    """The batch size of one input of ``modality`` (preprocessed per ``pre``), with the checks
    of ``infer`` (ShapeError for what it would refuse)."""
    return classify(kind_of(modality, pre), value, where)[1]


def _classify_layout(kind: Optional[str], value: Any, where: str) -> Tuple[bool, int]:
    if isinstance(value, Mapping):
        for v in value.values():
            a = np.asarray(v) if v is not None else None
            if a is not None and a.ndim >= 1:
                if kind == "video" and a.ndim == 4:     # one clip, as VideoPreprocessor gives
                    return False, 1
                return False, int(a.shape[0])
        raise ShapeError(f"[MultiModalInput] {where} is a dict without arrays")
    if kind == "text" and isinstance(value, os.PathLike):
        raise ShapeError(f"[MultiModalInput] {where} is a path ({type(value).__name__}); text "
                         "inputs are the text itself: read the file and pass its contents")
    if kind == "audio" and not (isinstance(value, np.ndarray) and value.ndim == 3):
        from ..preprocess.audio import audio_batch_size
        return True, audio_batch_size(value, op="MultiModalInput", where=where)
    if isinstance(value, PATH_TYPES + ENCODED_TYPES):
        if kind == "text" and isinstance(value, (str, bytes)):
            return True, 1
        if kind in ("image", "audio", "video", "text"):
            return True, 1
        raise ShapeError(f"[MultiModalInput] {where} is a path, but the modality has no "
                         "preprocessor")
    if isinstance(value, (list, tuple)):
        if len(value) == 0:
            raise ShapeError(f"[MultiModalInput] {where} is an empty batch")
        if kind is None:
            return False, len(value)
        if kind in ("image", "video"):
            nd = 3 if kind == "image" else 4
            for i, item in enumerate(value):
                if isinstance(item, np.ndarray) and not (
                        item.dtype == np.uint8 and item.ndim == nd and item.shape[-1] == 3):
                    layout = "(H, W, 3)" if kind == "image" else "(T, H, W, 3)"
                    raise _bad_input(f"{where}[{i}]", item, kind, "the items of a list are "
                                     f"raw: paths or uint8 {layout}")
        return True, len(value)
    try:
        a = np.asarray(value)
    except Exception as exc:  # pragma: no cover - numpy accepts nearly anything
        raise ShapeError(f"[MultiModalInput] {where} cannot be converted to an array: "
                         f"{exc}") from None
    if a.dtype == object or a.ndim == 0:
        raise ShapeError(f"[MultiModalInput] {where} has shape {a.shape} and dtype {a.dtype}, "
                         "expected raw inputs or a preprocessed array (see MultiModalInput)")
    floating = a.dtype.kind == "f"
    if kind == "text":
        if a.dtype.kind in "iu" and a.ndim == 2:
            return False, a.shape[0]
        why = ""
        if a.dtype.kind in "iu" and a.ndim == 1:
            why = "one sequence of input_ids needs a batch axis: x[None]"
        elif a.ndim == 2:
            why = "input_ids must be integers"
        raise _bad_input(where, a, "text", why)
    if kind == "image":
        return _classify_image(a, where)
    if kind == "audio":
        if floating and a.ndim == 3:
            return False, a.shape[0]
        raise _bad_input(where, a, "audio")             # pragma: no cover - handled above
    if kind == "video":
        return _classify_video(a, where)
    return False, a.shape[0]


def _is_file_object(value: Any) -> bool:
    return hasattr(value, "read") and not isinstance(value, (np.ndarray, str, bytes))


def read_file_objects(kind: Optional[str], value: Any, where: str) -> Any:
    """``value`` with its binary file objects (image, audio and video inputs) read into
    bytes, so that the cache keys, the decoders and remote nodes all see the same data."""
    if kind not in ("image", "audio", "video"):
        return value

    def read(f: Any, at: str) -> bytes:
        if kind != "video":     # as load_image / load_audio: from the start; load_video reads
            try:                # from the current position
                f.seek(0)
            except (AttributeError, OSError, ValueError):
                pass            # a stream that cannot seek: what is left of it
        try:
            data = f.read()
        except (OSError, ValueError) as exc:
            raise decode_error(kind)(f"[MultiModalInput] {at}: cannot read the file object: "
                                     f"{exc}") from None
        if not isinstance(data, (bytes, bytearray)):
            raise ShapeError(f"[MultiModalInput] {at} is a file object whose read() gave "
                             f"{type(data).__name__}, not bytes (open it in binary mode)")
        return bytes(data)

    if _is_file_object(value):
        return read(value, where)
    if isinstance(value, list) and any(_is_file_object(v) for v in value):
        return [read(v, f"{where}[{i}]") if _is_file_object(v) else v
                for i, v in enumerate(value)]
    if isinstance(value, tuple) and any(_is_file_object(v) for v in value):
        return tuple(read(v, f"{where}[{i}]") if _is_file_object(v) else v
                     for i, v in enumerate(value))
    return value


def decode_error(kind: Optional[str]):
    """The decode error of a modality kind (what a missing or unreadable file raises)."""
    from ..errors import AudioDecodeError, ImageDecodeError, VideoDecodeError
    errors: Dict[Optional[str], type] = {"image": ImageDecodeError, "audio": AudioDecodeError,
                                         "video": VideoDecodeError}
    return errors.get(kind, ModalityError)


def check_files(owner: str, m: Modality, kind: Optional[str], value: Any) -> None:
    """The modality's decode error for a path (or a path in a list) that is not an existing
    regular file: the same error, naming the file, whether the cache reads it, the decoder
    does or a node is sent it. A stat, no open: a FIFO or a device is refused without
    blocking."""
    if kind not in ("image", "audio", "video"):
        return
    from .._files import check_regular
    items = value if isinstance(value, (list, tuple)) else [value]
    for item in items:
        if isinstance(item, PATH_TYPES):
            check_regular(os.fsdecode(item), what=f"{kind} file", error=decode_error(kind),
                          op=owner)


def _preprocessed_array(value: Any) -> Optional[np.ndarray]:
    if isinstance(value, Mapping):
        for key in ("input_ids", "pixel_values", "input_features", "features"):
            if value.get(key) is not None:
                return np.asarray(value[key])
        return None
    return np.asarray(value)


def check_preprocessed(owner: str, m: Modality, enc: Any, value: Any) -> None:
    """ShapeError, naming the modality, the shape received and the one expected, for a
    preprocessed input that the built-in encoder ``enc`` cannot take (checked where the input
    enters, not layers deep in the encoder). Other encoders are left to check their inputs."""
    from .encoders import MelFrameEmbedder, PatchEmbedder, VideoEmbedder
    emb = getattr(enc, "embedder", None) if isinstance(enc, ModalityEncoder) else None
    if not isinstance(emb, (PatchEmbedder, MelFrameEmbedder, VideoEmbedder)):
        return
    a = _preprocessed_array(value)
    if a is None:
        return
    if isinstance(emb, VideoEmbedder) and isinstance(value, Mapping) and a.ndim == 4:
        a = a[None]                                     # one clip (see _prepare)
    what = f"[{owner}] modality {str(m)!r}: the preprocessed input has shape {a.shape}"
    if isinstance(emb, PatchEmbedder):
        C, p, P = emb.in_channels, emb.patch_size, emb.patch_dim
        expected = (f"expected pixel_values (B, {C}, H, W) with H and W multiples of "
                    f"{p}, or patches (B, N, {P})")
        if a.ndim == 4 and a.shape[1] == C:
            if a.shape[2] % p or a.shape[3] % p:
                raise ShapeError(f"{what}: {expected} (the model's preprocessing resizes raw "
                                 "uint8 images to fit)")
            return
        if a.ndim == 3 and a.shape[-1] == P:
            return
        hint = ""
        if a.ndim == 4 and a.shape[-1] == C:
            hint = f"; did you mean to transpose to (B, {C}, H, W) (x.transpose(0, 3, 1, 2))?"
        raise ShapeError(f"{what}, {expected}{hint}")
    if isinstance(emb, MelFrameEmbedder):
        n = emb.n_mels
        if a.ndim == 3 and a.shape[1] == n:
            return
        hint = ""
        if a.ndim == 3 and a.shape[2] == n:
            hint = (f"; did you mean to transpose to (B, {n}, frames) "
                    "(x.transpose(0, 2, 1); fbank features come as (B, frames, n_mels))?")
        raise ShapeError(f"{what}, expected input_features (B, {n}, frames){hint}")
    C, p = emb.in_channels, emb.patch_size
    expected = f"expected pixel_values (B, T, {C}, H, W) with H and W multiples of {p}"
    if a.ndim == 5 and a.shape[2] == C:
        if a.shape[3] % p or a.shape[4] % p:
            raise ShapeError(f"{what}, {expected}")
        return
    hint = ""
    if a.ndim == 5 and a.shape[-1] == C:
        hint = f"; did you mean to transpose to (B, T, {C}, H, W) (x.transpose(0, 1, 4, 2, 3))?"
    raise ShapeError(f"{what}, {expected}{hint}")


def resolve_audio_pairs(kind: Optional[str], pre: Optional[PreprocessingConfig],
                         value: Any) -> Any:
    """``value`` with its ``(waveform, sample_rate)`` pairs replaced by the waveforms resampled
    to the config's rate (:func:`~mmcore.preprocess.resample`, what the preprocessor does), for
    remote encoders: the payload carries a list of arrays, not a list of pairs. Other
    values are returned as they are."""
    if kind != "audio" or pre is None or not isinstance(value, (list, tuple)):
        return value
    from ..preprocess.audio import resample, split_audio_pair
    sr = pre.sample_rate

    def resolved(item):
        pair = split_audio_pair(item, op="MultiModalModel")
        if pair is None:
            return item
        return resample(np.asarray(pair[0], np.float32), pair[1], sr)

    top = split_audio_pair(value, op="MultiModalModel")
    if top is not None:
        return resolved(value)
    if any(split_audio_pair(it, op="MultiModalModel") is not None for it in value):
        return [resolved(it) for it in value]
    return value


# ----------------------------------------------------------------------------------------------
# the batch of one request


def stack_clips(clips: List[np.ndarray], owner: str
                ) -> Tuple[np.ndarray, Optional[np.ndarray]]:
    """Pad (T_i, 3, S, S) clips to one (B, T, 3, S, S) batch and a (B, T) frame mask."""
    T = max(c.shape[0] for c in clips)
    shape = clips[0].shape[1:]
    for i, c in enumerate(clips):
        if c.shape[1:] != shape:
            raise ShapeError(f"[{owner}] video {i} preprocessed to frames of shape "
                             f"{c.shape[1:]}, expected {shape}")
    x = np.zeros((len(clips), T) + tuple(shape), np.float32)
    mask = np.zeros((len(clips), T), np.bool_)
    for i, c in enumerate(clips):
        x[i, :c.shape[0]] = c
        mask[i, :c.shape[0]] = True
    return x, (None if mask.all() else mask)


# ----------------------------------------------------------------------------------------------
# batch items (what the per-item cache keys)

_ITEM_NDIM = {"image": 3, "audio": 1, "video": 4}


def raw_items(kind: Optional[str], value: Any, batch: int) -> Optional[list]:
    """The ``batch`` items of a raw input (None when it cannot be split)."""
    if isinstance(value, (list, tuple)):
        return list(value) if len(value) == batch else (
            [value] if batch == 1 else None)
    if isinstance(value, np.ndarray) and kind in _ITEM_NDIM:
        nd = _ITEM_NDIM[kind]
        if value.ndim == nd and batch == 1:
            return [value]
        if value.ndim == nd + 1 and value.shape[0] == batch:
            return [value[i] for i in range(batch)]
        return None
    return [value] if batch == 1 else None


def raw_subset(value: Any, batch: int, idx: list) -> Any:
    """The raw input restricted to the items ``idx``, in the form of the original."""
    if len(idx) == batch:
        return value
    if isinstance(value, np.ndarray):
        return value[np.asarray(idx, np.intp)]
    return [value[i] for i in idx]


def item_data(kind: Optional[str], item: Any, owner: str = "MultiModalModel") -> Any:
    """What a raw item's key is made of (a digest of the file's bytes for a path, read in
    chunks so that memory stays bounded; a pair's waveform and rate). A path that is not a
    readable regular file raises the modality's decode error."""
    if isinstance(item, PATH_TYPES) and not (kind == "text" and isinstance(item, str)):
        from .._files import open_regular
        from ..cache import digest_file
        with open_regular(os.fsdecode(item), what=f"{kind or 'input'} file",
                          error=decode_error(kind), op=owner) as fh:
            return ("file-digest", digest_file(fh))
    if isinstance(item, str):
        return ("str", item)
    if isinstance(item, ENCODED_TYPES):
        return ("bytes", bytes(item))
    if kind == "audio":
        from ..preprocess.audio import split_audio_pair
        pair = split_audio_pair(item, op=owner)
        if pair is not None:
            return ("array", np.asarray(pair[0]), np.int64(pair[1]))
    return ("array", np.asarray(item))


# ----------------------------------------------------------------------------------------------
# requests and results


@dataclass
class MultiModalInput:
    """One request: inputs per modality, optional masks and the batch size.

    Parameters
    ----------
    modality_inputs : dict of Modality or str -> input
        Raw or preprocessed inputs (see the table in :mod:`mmcore.model.model`).
    attention_masks : dict of Modality or str -> (B, L) array, optional
        Masks of preprocessed inputs (True/1 = real): text (B, L), audio (B, frames),
        video (B, T) frames, image (B, N) patches.
    batch_size : int, optional
        Checked against the inputs; inferred when None.

    Raises
    ------
    ModalityError
        A key is not a modality (``"text"``, ``"custom:7"``, ...) or a mask names a modality
        without input.
    ShapeError
        Inputs disagree on the batch size (or with ``batch_size``), a mask is given for a raw
        input, or an input is empty or of an unusable type.

    Examples
    --------
    >>> import numpy as np
    >>> from mmcore.model import MultiModalInput
    >>> MultiModalInput({"text": ["a", "b"], "audio": np.zeros((2, 800), np.float32)}).batch_size
    2
    """

    modality_inputs: Dict[Any, Any]
    attention_masks: Optional[Dict[Any, Any]] = None
    batch_size: Optional[int] = None
    raw: Dict[Modality, bool] = field(default_factory=dict, init=False, repr=False)

    def __post_init__(self):
        owner = "MultiModalInput"
        if not isinstance(self.modality_inputs, Mapping):
            raise ShapeError(f"[{owner}] modality_inputs must be a dict of modality -> input, "
                             f"got {type(self.modality_inputs).__name__}")
        inputs: Dict[Modality, Any] = {}
        for key, value in self.modality_inputs.items():
            m = Modality(key)               # ModalityError for unknown names
            if m in inputs:
                raise ModalityError(f"[{owner}] modality {str(m)!r} is given twice")
            if value is not None:
                inputs[m] = read_file_objects(kind_of(m), value, f"modality_inputs[{str(m)!r}]")
        masks: Dict[Modality, np.ndarray] = {}
        for key, value in (self.attention_masks or {}).items():
            m = Modality(key)
            if m not in inputs:
                raise ModalityError(f"[{owner}] attention_masks names modality {str(m)!r}, "
                                    "which has no input")
            if value is not None:
                masks[m] = np.asarray(value)
        B = None
        first = None
        raw = {}
        for m, value in inputs.items():
            is_raw, b = classify(kind_of(m), value, f"modality_inputs[{str(m)!r}]")
            raw[m] = is_raw
            if is_raw and m in masks:
                raise ShapeError(f"[{owner}] attention_masks[{str(m)!r}] applies to "
                                 "preprocessed inputs only (raw inputs get their mask from "
                                 "the preprocessor)")
            if m in masks and (masks[m].ndim != 2 or masks[m].shape[0] != b):
                raise ShapeError(f"[{owner}] attention_masks[{str(m)!r}] has shape "
                                 f"{masks[m].shape}, expected ({b}, L)")
            if B is None:
                B, first = b, m
            elif b != B:
                raise ShapeError(f"[{owner}] modality_inputs[{str(m)!r}] has batch size {b}, "
                                 f"but modality_inputs[{str(first)!r}] has {B}")
        if self.batch_size is not None:
            bs = self.batch_size
            if isinstance(bs, bool) or not isinstance(bs, (int, np.integer)) or bs < 1:
                raise ShapeError(f"[{owner}] batch_size must be an integer >= 1, got {bs!r}")
            if B is not None and int(bs) != B:
                raise ShapeError(f"[{owner}] batch_size={bs}, but the inputs have batch size "
                                 f"{B}")
            B = int(bs)
        self.modality_inputs = inputs
        self.attention_masks = masks
        self.batch_size = B
        self.raw = raw

    @property
    def modalities(self) -> Tuple[Modality, ...]:
        """The modalities with input."""
        return tuple(self.modality_inputs)


@dataclass
class MultiModalOutput:
    """What :meth:`MultiModalModel.infer` returns.

    Attributes
    ----------
    fused : float32 (B, output_dim)
        The fused embedding.
    embeddings : dict of Modality -> float32 (B, L_m, D)
        Per-modality token embeddings: the encoder outputs (late, attention, custom fusion),
        or the modality's slice of the joint encoder output (early, middle fusion).
    pooled : dict of Modality -> float32 (B, D)
        Per-modality pooled embeddings (the encoder's pooling; for early/middle fusion the
        masked mean of the joint slice).
    attention_weights : dict or None
        With ``return_weights=True``: the fusion layer's weights (see
        :meth:`FusionLayer.__call__`); else None.
    masks : dict of Modality -> bool (B, L_m)
        Token masks (True = real) of ``embeddings``.
    stats : dict of str -> float
        Seconds spent by this call per stage: ``"preprocess:<m>"``, ``"encode:<m>"``,
        ``"fusion"``, ``"total"``.
    """

    fused: np.ndarray
    embeddings: Dict[Modality, np.ndarray]
    pooled: Dict[Modality, np.ndarray]
    attention_weights: Optional[Dict[Any, np.ndarray]]
    masks: Dict[Modality, np.ndarray]
    stats: Dict[str, float]

    @property
    def batch_size(self) -> int:
        return int(self.fused.shape[0])

