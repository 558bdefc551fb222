"""What a model accepts as input, checked where it enters ``infer``.

The layouts and dtypes each modality accepts are listed in :mod:`mmcore.model.model`'s
docstring (and :data:`ACCEPTED_INPUTS`); the functions here decide, per
modality input, whether it is raw or preprocessed and its batch size, and refuse what would
fail deeper (a channels-last float image, a (T, C) stereo array, a missing path, a FIFO) with
an error that names the input, the shape received and what was expected.
"""

from __future__ import annotations

import os
from typing import Any, Mapping, Optional, Tuple

import numpy as np

from ..config import PreprocessingConfig
from ..errors import ModalityError, ShapeError
from ..modality import Modality
from .encoders import ModalityEncoder

_PATH_TYPES = (str, bytes, os.PathLike)

#: What each modality accepts, raw (through the preprocessor) and preprocessed (straight to
#: the encoder); quoted by the input errors.
ACCEPTED_INPUTS = {
    "text": ("raw: a str or a list of str; preprocessed: integer input_ids (B, L)"),
    "image": ("raw (decoded, resized and normalized by the model): uint8 RGB (H, W, 3) or "
              "(N, H, W, 3), a path, or a list of paths / uint8 (H, W, 3) images; "
              "preprocessed (straight to the encoder): float pixel_values (B, 3, S, S) or "
              "patches (B, N, 3*p*p)"),
    "audio": ("raw: a float waveform (T,) in [-1, 1], a (B, T) batch of equal-length clips, "
              "a (waveform, sample_rate) pair, a path, or a list of paths / 1-D waveforms / "
              "pairs; preprocessed: float input_features (B, n_mels, frames)"),
    "video": ("raw: a uint8 RGB clip (T, H, W, 3) or a batch (B, T, H, W, 3), a path, or a "
              "list of paths / uint8 clips; preprocessed: float pixel_values (B, T, 3, S, S)"),
}


def _kind_of(modality: Modality, pre: Optional[PreprocessingConfig] = None) -> Optional[str]:
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


def _classify(kind: Optional[str], value: Any, where: str) -> Tuple[bool, int]:
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
    return _classify(_kind_of(modality, pre), value, where)[1]


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
    if isinstance(value, _PATH_TYPES):
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


def _decode_error(kind: Optional[str]):
    """The decode error of a modality kind (what a missing or unreadable file raises)."""
    from ..errors import AudioDecodeError, ImageDecodeError, VideoDecodeError
    return {"image": ImageDecodeError, "audio": AudioDecodeError,
            "video": VideoDecodeError}.get(kind, ModalityError)


def _check_files(owner: str, m: Modality, kind: Optional[str], value: Any) -> None:
    """The modality's decode error for a path (or a path in a list) that is not an existing
    regular file: the same error, naming the file, whether the cache reads it, the decoder
    does or a node is sent it. A stat, no open: a FIFO or a device is refused without
    blocking."""
    if kind not in ("image", "audio", "video"):
        return
    from .._files import check_regular
    items = value if isinstance(value, (list, tuple)) else [value]
    for item in items:
        if isinstance(item, _PATH_TYPES):
            check_regular(os.fsdecode(item), what=f"{kind} file", error=_decode_error(kind),
                          op=owner)


def _preprocessed_array(value: Any) -> Optional[np.ndarray]:
    if isinstance(value, Mapping):
        for key in ("input_ids", "pixel_values", "input_features", "features"):
            if value.get(key) is not None:
                return np.asarray(value[key])
        return None
    return np.asarray(value)


def _check_preprocessed(owner: str, m: Modality, enc: Any, value: Any) -> None:
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


def _resolve_audio_pairs(kind: Optional[str], pre: Optional[PreprocessingConfig],
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
