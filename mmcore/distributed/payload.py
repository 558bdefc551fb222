"""Model inputs as protocol payloads: a JSON description plus arrays.

Raw inputs are carried as they are: strings as JSON, encoded data (``bytes``, ``bytearray``,
``memoryview``: encoded text, or an encoded image, audio or video file) as bytes, arrays as
arrays, files by their bytes (read by the sender; the node writes them to a private temporary
directory, keeping the file name's suffix so decoders can sniff it, and removes them after the
request). Lists of these and preprocessed dicts of arrays are carried one level deep.

Remote inputs are data: a node unpacks with ``strings=False`` for a modality whose
preprocessor would open a string as a path (image, audio, video), so a client can never name
a file on the node; bytes are decoded as data there, never opened. Each array backs one item
only.

Examples
--------
>>> import numpy as np
>>> from mmcore.distributed.payload import pack_input, unpack_input
>>> desc, arrays = pack_input("text", ["a cat", "a dog"])
>>> unpack_input(desc, arrays, tmpdir=None)
['a cat', 'a dog']
"""

from __future__ import annotations

import os
from typing import Any, Dict, List, Mapping, Optional, Tuple

import numpy as np

from ..errors import ProtocolError, ShapeError

__all__ = ["pack_input", "unpack_input", "accepted_forms", "safe_suffix", "MEDIA_SUFFIXES",
           "MAX_ITEMS"]

MAX_ITEMS = 65536
_PATH_TYPES = (str, os.PathLike)
_ENCODED_TYPES = (bytes, bytearray, memoryview)


def _pack_one(kind: Optional[str], value: Any, arrays: List[np.ndarray], depth: int) -> dict:
    if isinstance(value, str) and kind == "text":
        return {"form": "str", "value": value}
    if isinstance(value, _ENCODED_TYPES):   # encoded text / image / audio / video, not a name
        # a non-contiguous memoryview has no flat buffer: its bytes are copied out in order
        arrays.append(np.frombuffer(value.tobytes(), np.uint8) if isinstance(value, memoryview)
                      and not value.c_contiguous else np.frombuffer(value, np.uint8))
        return {"form": "bytes", "index": len(arrays) - 1}
    if isinstance(value, os.PathLike) and kind == "text":
        raise ShapeError("[distributed] text input must be str or bytes, got a path "
                         f"({type(value).__name__})")
    if isinstance(value, _PATH_TYPES):
        path = os.fsdecode(value)
        try:
            with open(path, "rb") as fh:
                data = fh.read()
        except OSError as exc:
            raise ShapeError(f"[distributed] input file {path!r} cannot be read: "
                             f"{exc.strerror or exc}") from None
        arrays.append(np.frombuffer(data, np.uint8))
        return {"form": "file", "index": len(arrays) - 1,
                "name": os.path.basename(path)[-200:]}
    if isinstance(value, Mapping):
        if depth:
            raise ShapeError("[distributed] a dict input cannot be nested")
        items = {}
        for k, v in value.items():
            if v is None:
                continue
            arrays.append(np.asarray(v, order="C"))
            items[str(k)] = len(arrays) - 1
        return {"form": "dict", "items": items}
    if isinstance(value, (list, tuple)):
        if depth:
            raise ShapeError("[distributed] a list input cannot be nested")
        if value and all(isinstance(x, (int, float, np.integer, np.floating))
                         and not isinstance(x, bool) for x in value):
            arrays.append(np.asarray(value, np.float32))
            return {"form": "array", "index": len(arrays) - 1}
        if len(value) > MAX_ITEMS:
            raise ShapeError(f"[distributed] a batch of {len(value)} items exceeds "
                             f"{MAX_ITEMS}")
        return {"form": "list", "items": [_pack_one(kind, x, arrays, depth + 1)
                                          for x in value]}
    a = np.asarray(value)
    if a.dtype == object:
        raise ShapeError(f"[distributed] input of type {type(value).__name__} cannot be sent "
                         "to a node")
    arrays.append(np.asarray(a, order="C"))
    return {"form": "array", "index": len(arrays) - 1}


def pack_input(kind: Optional[str], value: Any, *, attention_mask: Any = None
               ) -> Tuple[dict, List[np.ndarray]]:
    """``(description, arrays)`` of one modality's input (``kind``: "text", "image", ...)."""
    arrays: List[np.ndarray] = []
    desc: Dict[str, Any] = {"value": _pack_one(kind, value, arrays, 0)}
    if attention_mask is not None:
        arrays.append(np.asarray(attention_mask, order="C"))
        desc["mask"] = len(arrays) - 1
    return desc, arrays


def _array(arrays: List[np.ndarray], index: Any, used: Optional[set] = None) -> np.ndarray:
    if type(index) is not int or not 0 <= index < len(arrays):
        raise ProtocolError(f"[distributed] input refers to array {index!r}, which the frame "
                            "does not have")
    if used is not None:
        # each array backs one item (as pack_input sends them): an array named by many items
        # would be copied (bytes, files) or preprocessed once per item, far beyond the frame
        if index in used:
            raise ProtocolError(f"[distributed] input refers to array {index} more than once")
        used.add(index)
    return arrays[index]


#: File name suffixes a received file keeps (decoders sniff them); anything else is dropped.
#: Playlist and list formats are left out on purpose: FFmpeg's HLS demuxer, probed by an
#: ``.m3u8`` suffix, would open the files a playlist names, which are paths on the server.
MEDIA_SUFFIXES = frozenset(
    ".png .jpg .jpeg .jpe .jfif .bmp .gif .tif .tiff .webp .ppm .pgm .pbm .pnm .ico .tga "
    ".jp2 .j2k .wav .wave .flac .ogg .oga .opus .mp3 .aif .aiff .au .snd .caf .w64 .rf64 "
    ".mp4 .m4v .m4a .mov .qt .mkv .mka .webm .avi .mpg .mpeg .m2v .ts .mts .m2ts .flv "
    ".3gp .3g2 .ogv .wmv .asf .y4m .h264 .264 .h265 .265 .hevc .ivf".split())


def safe_suffix(name: Any) -> str:
    """The suffix of a client's file name if it is a known media suffix (lower-cased), else
    ``""``: a received file is written under a name the server chooses, and its suffix can
    never make a decoder follow references to other files.

    Examples
    --------
    >>> from mmcore.distributed.payload import safe_suffix
    >>> safe_suffix("clip.MP4"), safe_suffix("list.m3u8"), safe_suffix("x.png\\x00"), safe_suffix(3)
    ('.mp4', '', '', '')
    """
    if not isinstance(name, str):
        return ""
    suffix = os.path.splitext(os.path.basename(name))[1].lower()
    return suffix if suffix in MEDIA_SUFFIXES else ""


def _unpack_one(d: Any, arrays: List[np.ndarray], tmpdir: Optional[str], depth: int,
                counter: List[int], refuse: Mapping[str, str], used: set) -> Any:
    if not isinstance(d, dict):
        raise ProtocolError("[distributed] input description is not an object")
    form = d.get("form")
    if isinstance(form, str) and form in refuse:
        # decided on the form alone, before any value is looked at: the answer is the same
        # whatever the value names
        raise ProtocolError(f"[distributed] input form {form!r} is refused: {refuse[form]}")
    if form == "str":
        if not isinstance(d.get("value"), str):
            raise ProtocolError("[distributed] string input without a string")
        return d["value"]
    if form == "array":
        return _array(arrays, d.get("index"), used)
    if form == "bytes":
        return _array(arrays, d.get("index"), used).tobytes()
    if form == "file":
        data = _array(arrays, d.get("index"), used)
        if tmpdir is None:
            raise ProtocolError("[distributed] file input where none is accepted")
        counter[0] += 1
        suffix = safe_suffix(d.get("name"))
        path = os.path.join(tmpdir, f"input{counter[0]}{suffix}")
        with open(path, "wb") as fh:
            fh.write(data.tobytes())
        return path
    if form == "dict" and depth == 0:
        items = d.get("items")
        if not isinstance(items, dict):
            raise ProtocolError("[distributed] dict input without items")
        return {str(k): _array(arrays, i, used) for k, i in items.items()}
    if form == "list" and depth == 0:
        items = d.get("items")
        if not isinstance(items, list) or not items or len(items) > MAX_ITEMS:
            raise ProtocolError("[distributed] list input without a valid item list")
        return [_unpack_one(x, arrays, tmpdir, depth + 1, counter, refuse, used)
                for x in items]
    raise ProtocolError(f"[distributed] unknown input form {form!r}")


def accepted_forms(model: Any, modality: Any) -> dict:
    """The ``strings`` / ``files`` keywords of :func:`unpack_input` for one modality of a
    serving model: strings (and bytes) only where the modality's preprocessor takes them as
    text, files (as their bytes) only where it decodes files. A server never lets a client's
    string reach a preprocessor that would open it as a path on the server."""
    pre = model.config.modalities[modality].preprocessing
    kind = None if pre is None else str(pre.modality)
    return {"strings": kind == "text", "files": kind not in (None, "text")}


def _refusals(strings: bool, files: bool, what: str) -> Dict[str, str]:
    refuse = {}
    if not strings:
        refuse["str"] = (f"{what} takes arrays, encoded bytes or files sent as their bytes "
                         "(form 'file'), never a string, which its preprocessor would open "
                         "as a path on the node")
        if not files:
            refuse["bytes"] = f"{what} takes arrays only (it has no decoder for bytes)"
    if not files:
        refuse["file"] = f"{what} takes text (forms 'str' and 'bytes') or arrays, not files"
    return refuse


def unpack_input(desc: Any, arrays: List[np.ndarray], *, tmpdir: Optional[str],
                 with_mask: bool = False, strings: bool = True, files: bool = True,
                 what: str = "this input"):
    """The input that :func:`pack_input` described (and its mask when ``with_mask``).

    Parameters
    ----------
    desc : dict
        The description (from a request's JSON header).
    arrays : list of ndarray
        The request's arrays.
    tmpdir : str or None, keyword-only
        Where "file" inputs are written (under names chosen here); None refuses them.
    with_mask : bool, default False, keyword-only
    strings : bool, default True, keyword-only
        False refuses the "str" form (for a modality whose preprocessor would take a string
        as a path to open: a node never opens a path named by a client; files travel as
        their bytes).
    files : bool, default True, keyword-only
        False refuses the "file" form (for a text modality, which would take the temporary
        file's name as text). With ``strings`` also False (a modality without a decoder),
        the "bytes" form is refused too; otherwise bytes are encoded text, or an encoded
        image / audio / video that the preprocessor decodes as data.
    what : str, keyword-only
        How refusals name the input (e.g. "modality 'image'").

    Raises
    ------
    ProtocolError
        A malformed description (unknown form, bad array index, an array named twice,
        nesting too deep), or a form refused by ``strings`` / ``files``: the same error
        whatever the value holds.
    """
    refuse = _refusals(strings, files, what)
    if not isinstance(desc, dict) or "value" not in desc:
        raise ProtocolError("[distributed] request has no input description")
    used: set = set()
    value = _unpack_one(desc["value"], arrays, tmpdir, 0, [0], refuse, used)
    if not with_mask:
        return value
    mask = _array(arrays, desc["mask"], used) if desc.get("mask") is not None else None
    return value, mask
