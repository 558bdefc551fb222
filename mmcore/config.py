"""Configuration objects.

Every config is a dataclass that

* validates itself on construction and raises :class:`~mmcore.errors.ConfigError` whose message
  starts with the field at fault (``"PreprocessingConfig.n_mels must be ..."``);
* is immutable (``frozen``); derive a changed copy with :meth:`ConfigBase.replace`, which
  validates again;
* round-trips through plain dictionaries (:meth:`ConfigBase.to_dict` /
  :meth:`ConfigBase.from_dict`) that hold only JSON/TOML-friendly values;
* loads from JSON and TOML files (:meth:`ConfigBase.from_json` / :meth:`ConfigBase.from_toml`),
  optionally from a named table of a larger file (``section="preprocessing.audio"``).

Examples
--------
>>> from mmcore.config import PreprocessingConfig
>>> cfg = PreprocessingConfig()                     # Whisper: 16 kHz, 80 mels, 30 s chunks
>>> cfg.preset, cfg.chunk_length_s, cfg.padding
('whisper', 30.0, 'max_length')
>>> PreprocessingConfig(preset="fbank").padding     # no fixed chunk: pad to the longest item
'longest'
>>> PreprocessingConfig.from_dict(cfg.to_dict()) == cfg
True

The model is described by a :class:`MultiModalConfig`: one :class:`ModalityConfig` per
:class:`~mmcore.modality.Modality` (preprocessing, encoder, embedding width, priority,
quantization, cache policy), a :class:`FusionStrategy`, an optional
:class:`CrossModalAttentionConfig` and a :class:`CacheConfig`:

>>> from mmcore.config import MultiModalConfig, ModalityConfig, LateFusion
>>> from mmcore.modality import Modality
>>> mm = MultiModalConfig([ModalityConfig(Modality.TEXT), ModalityConfig(Modality.IMAGE)],
...                       fusion=LateFusion(reduce="concat"))
>>> [str(m) for m in mm.enabled_modalities()], mm.output_dim
(['text', 'image'], 1024)
>>> MultiModalConfig.from_dict(mm.to_dict()) == mm
True
"""

from __future__ import annotations

import collections.abc
import copy
import dataclasses
import json
import math
import numbers
import os
import re
import sys
import tempfile
import threading
from dataclasses import dataclass, field
from typing import (Any, Callable, ClassVar, Dict, Iterable, Iterator, List, Mapping, Optional,
                    Sequence, Tuple, TypeVar, Union)

import numpy as np

from .errors import ConfigError, ModalityError
from .modality import Modality

__all__ = [
    "ConfigBase", "PreprocessingConfig", "EncoderConfig", "CachePolicy", "CacheConfig",
    "ModalityConfig", "CrossModalAttentionConfig", "FusionStrategy", "EarlyFusion",
    "MiddleFusion", "LateFusion", "AttentionFusion", "CustomFusion", "MultiModalConfig",
    "ModalityMap", "register_fusion", "unregister_fusion", "get_fusion", "registered_fusions",
]

#: The longest ``chunk_length_s`` / ``max_length_s`` of an audio configuration, in seconds
#: (4 h: the default ``max_duration_s`` of :func:`mmcore.preprocess.load_audio`).
MAX_AUDIO_ITEM_S = 4 * 3600.0

PathLike = Union[str, "os.PathLike[str]"]
_C = TypeVar("_C", bound="ConfigBase")


class _ModalityDefault:
    """Sentinel default: the value is filled in from the modality (and preset) on construction."""

    _instance = None

    def __new__(cls):
        if cls._instance is None:
            cls._instance = super().__new__(cls)
        return cls._instance

    def __repr__(self) -> str:
        return "<modality default>"

    def __reduce__(self):
        return (_ModalityDefault, ())


MODALITY_DEFAULT: Any = _ModalityDefault()

# TOML has no null: these strings stand for None in the Optional fields of a TOML file.
_TOML_NONE = ("none", "null")


# --------------------------------------------------------------------------------------------
# field checks shared by all configs; each returns the normalized value

def _fail(owner: str, name: str, msg: str, value: Any) -> ConfigError:
    return ConfigError(f"{owner}.{name} {msg}, got {value!r}")


def check_int(owner: str, name: str, value: Any, *, minimum: int = 1) -> int:
    """An integer (not a bool) >= ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise _fail(owner, name, f"must be an integer >= {minimum}", value)
    if value < minimum:
        raise _fail(owner, name, f"must be an integer >= {minimum}", value)
    return int(value)


def check_positive_float(owner: str, name: str, value: Any, *, optional: bool = False
                         ) -> Optional[float]:
    """A finite real number > 0 (or None when ``optional``)."""
    if value is None and optional:
        return None
    expected = "must be a finite number > 0" + (" or None" if optional else "")
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise _fail(owner, name, expected, value)
    f = float(value)
    if not math.isfinite(f) or f <= 0:
        raise _fail(owner, name, expected, value)
    return f


def check_bool(owner: str, name: str, value: Any) -> bool:
    if not isinstance(value, (bool, np.bool_)):
        raise _fail(owner, name, "must be True or False", value)
    return bool(value)


def check_choice(owner: str, name: str, value: Any, choices: Sequence[Optional[str]]) -> Optional[str]:
    """One of ``choices`` (strings compared case-insensitively; None allowed if listed)."""
    if value is None and None in choices:
        return None
    if isinstance(value, str):
        low = value.lower()
        for c in choices:
            if c is not None and c == low:
                return c
    shown = " | ".join("None" if c is None else repr(c) for c in choices)
    raise _fail(owner, name, f"must be one of {shown}", value)


def _check_size(owner: str, name: str, value: Any, *, optional: bool) -> Any:
    """An int >= 1, or a (height, width) pair of them (returned as a tuple)."""
    if value is None and optional:
        return None
    expected = "must be an integer >= 1 or a (height, width) pair" + (" or None" if optional
                                                                      else "")
    if isinstance(value, (list, tuple)):
        if len(value) != 2:
            raise _fail(owner, name, expected, value)
        out = []
        for v in value:
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
                raise _fail(owner, name, expected, value)
            out.append(int(v))
        return tuple(out)
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise _fail(owner, name, expected, value)
    return int(value)


def _check_channels(owner: str, name: str, value: Any, *, positive: bool) -> Optional[Tuple[float, ...]]:
    """None, or three finite floats (> 0 when ``positive``), returned as a tuple."""
    if value is None:
        return None
    expected = "must be None or 3 finite numbers (one per RGB channel)" + (
        ", each > 0" if positive else "")
    if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple, np.ndarray)):
        raise _fail(owner, name, expected, value)
    vals = list(value)
    if len(vals) != 3:
        raise _fail(owner, name, expected, value)
    out = []
    for v in vals:
        if isinstance(v, bool) or not isinstance(v, (int, float, np.integer, np.floating)):
            raise _fail(owner, name, expected, value)
        f = float(v)
        if not math.isfinite(f) or (positive and f <= 0):
            raise _fail(owner, name, expected, value)
        out.append(f)
    return tuple(out)


# --------------------------------------------------------------------------------------------
# the shared base

class ConfigBase:
    """Behaviour shared by the config dataclasses.

    A subclass is a ``@dataclass(frozen=True)`` that implements :meth:`validate`, which checks
    and normalizes the fields (assigning with :meth:`_set`, since the instance is frozen) and
    raises :class:`ConfigError` naming the field. Nested configs are supported by
    :meth:`to_dict` (they become nested dictionaries); a subclass that holds them converts
    nested dictionaries back in :meth:`validate`.
    """

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:  # pragma: no cover - every subclass overrides it
        """Check and normalize every field; raise ConfigError naming the first bad one."""

    # -- helpers for subclasses ---------------------------------------------------------------
    def _set(self, name: str, value: Any) -> None:
        object.__setattr__(self, name, value)

    @classmethod
    def _owner(cls) -> str:
        return cls.__name__

    # -- conversion -------------------------------------------------------------------------------
    def to_dict(self) -> Dict[str, Any]:
        """A plain, JSON-serializable dictionary of every field (nested configs as dicts)."""
        out: Dict[str, Any] = {}
        for f in dataclasses.fields(self):
            out[f.name] = _plain(getattr(self, f.name))
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]):
        """Build a config from a mapping of field names to values (missing fields get defaults).

        Unknown keys raise :class:`ConfigError` naming them.
        """
        if not isinstance(data, Mapping):
            raise ConfigError(f"{cls._owner()}.from_dict expects a mapping of field names, "
                              f"got {type(data).__name__}")
        names = {f.name for f in dataclasses.fields(cls) if f.init}
        unknown = [k for k in data if k not in names]
        if unknown:
            extra_hint = " (put free-form options under 'extra')" if "extra" in names else ""
            raise ConfigError(f"{cls._owner()} has no field(s) "
                              f"{', '.join(repr(k) for k in unknown)}{extra_hint}; "
                              f"known fields: {', '.join(sorted(names))}")
        missing = [f.name for f in dataclasses.fields(cls)
                   if f.init and f.name not in data and f.default is dataclasses.MISSING
                   and f.default_factory is dataclasses.MISSING]
        if missing:
            raise ConfigError(f"{cls._owner()}.{missing[0]} is required but missing from the "
                              "mapping")
        return cls(**dict(data))

    @classmethod
    def from_json(cls, path: PathLike, *, section: Optional[str] = None):
        """Load from a JSON file: an object of field names, or such an object at ``section``.

        ``section`` is a dotted path of nested objects (``"preprocessing.audio"``).
        """
        text = _read_text(cls, path)
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{cls._owner()}: {os.fspath(path)!s} is not valid JSON "
                              f"(line {exc.lineno}, column {exc.colno}: {exc.msg})") from None
        except RecursionError:
            data = None  # reported by _check_depth below
        _check_depth(cls, data, path, "JSON")
        return cls.from_dict(_section(cls, data, section, path))

    @classmethod
    def from_toml(cls, path: PathLike, *, section: Optional[str] = None):
        """Load from a TOML file: top-level keys, or the table at ``section`` (dotted path).

        TOML has no null: for a field that may be None, write the string ``"none"``. Parsing
        uses :mod:`tomllib` (Python 3.11+) or the ``tomli`` package on older Pythons.
        """
        toml = _toml_module(cls)
        text = _read_text(cls, path)
        try:
            data = toml.loads(text)
        except RecursionError:
            data = None  # reported by _check_depth below
        except Exception as exc:  # tomllib.TOMLDecodeError / tomli.TOMLDecodeError
            raise ConfigError(f"{cls._owner()}: {os.fspath(path)!s} is not valid TOML ({exc})") from None
        _check_depth(cls, data, path, "TOML")
        data = _section(cls, data, section, path)
        return cls.from_dict(cls._toml_nones(data, writing=False))

    @classmethod
    def _none_allowed(cls, name: str) -> bool:
        """Whether field ``name`` accepts None (so ``"none"`` in TOML means None)."""
        return name in getattr(cls, "_OPTIONAL_FIELDS", ())

    # field name -> the config class of a nested config (``"one"``) or of the values of a
    # mapping of nested configs (``"map"``); used to carry TOML's "none" through nested tables
    _NESTED: ClassVar[Dict[str, Tuple[str, Any]]] = {}

    @classmethod
    def _toml_nones(cls, data: Mapping[str, Any], *, writing: bool) -> Dict[str, Any]:
        """Swap None and ``"none"`` in the fields that accept None, through nested configs.

        ``writing=True`` turns None into ``"none"`` (TOML has no null) and drops a None held by
        a field that does not accept None (one whose default reproduces it, like the fields of
        other modalities in :class:`PreprocessingConfig`); ``writing=False`` turns
        ``"none"``/``"null"`` (any case) back into None.
        """
        out = dict(data)
        for f in dataclasses.fields(cls):
            if f.name not in out:
                continue
            v = out[f.name]
            if writing and v is None:
                if cls._none_allowed(f.name):
                    out[f.name] = "none"
                else:  # a neutral None that the field's default reproduces
                    del out[f.name]
                    continue
            elif (not writing and cls._none_allowed(f.name) and isinstance(v, str)
                  and v.lower() in _TOML_NONE):
                out[f.name] = None
            nested = cls._NESTED.get(f.name)
            v = out[f.name]
            if nested is None:
                continue
            kind, sub = nested
            if kind == "one":
                if isinstance(v, Mapping):
                    out[f.name] = sub._toml_nones(v, writing=writing)
            elif isinstance(v, Mapping):
                out[f.name] = {k: sub._toml_nones(x, writing=writing) if isinstance(x, Mapping)
                               else x for k, x in v.items()}
            elif isinstance(v, (list, tuple)):  # e.g. [[modalities]] arrays of tables
                out[f.name] = [sub._toml_nones(x, writing=writing) if isinstance(x, Mapping)
                               else x for x in v]
        return out

    def to_json(self, path: Optional[PathLike] = None, *, indent: Optional[int] = 2) -> str:
        """The config as JSON text (:meth:`to_dict`); also written to ``path`` when given.

        The file is written atomically (a temporary file renamed over ``path``), so a failed
        write never leaves a truncated config behind. :meth:`from_json` reads it back.
        """
        text = json.dumps(self.to_dict(), indent=indent) + "\n"
        if path is not None:
            _write_text(type(self), path, text)
        return text

    def to_toml(self, path: Optional[PathLike] = None) -> str:
        """The config as TOML text (:meth:`to_dict`); also written to ``path`` when given.

        TOML has no null: a field whose value is None is written as the string ``"none"``,
        which :meth:`from_toml` reads back as None. A None anywhere else (inside an ``extra``
        dictionary, say) cannot be written and raises :class:`ConfigError`. mmcore writes the
        TOML itself (no extra package needed); the file is written atomically.
        """
        data = type(self)._toml_nones(self.to_dict(), writing=True)
        text = _toml_dumps(data, type(self)._owner())
        if path is not None:
            _write_text(type(self), path, text)
        return text

    def replace(self: _C, **changes: Any) -> _C:
        """A copy with ``changes`` applied, validated again."""
        return dataclasses.replace(self, **changes)  # type: ignore[type-var]

    def _hash_key(self) -> Any:
        return tuple(_hash_part(getattr(self, f.name)) for f in dataclasses.fields(self))


def _hash_part(v: Any) -> Any:
    """A hashable stand-in for a field value that is equal whenever the values are."""
    if isinstance(v, ConfigBase):
        return hash(v)
    if isinstance(v, Modality):
        return str(v)
    if isinstance(v, Mapping):
        return ("map",) + tuple(sorted(((str(k), _hash_part(x)) for k, x in v.items()),
                                       key=lambda kv: kv[0]))
    if isinstance(v, (list, tuple)):
        return ("seq",) + tuple(_hash_part(x) for x in v)
    try:
        hash(v)
    except TypeError:
        return repr(v)
    return v


def _hash_by_dict(self: ConfigBase) -> int:
    # equal configs hash equal (usable as cache keys) even when they hold dicts or lists
    return hash((type(self).__name__, self._hash_key()))


def _config(cls):
    """``@dataclass(frozen=True)`` with a hash that also covers dict and list fields."""
    cls = dataclass(frozen=True)(cls)
    cls.__hash__ = _hash_by_dict
    return cls


def _plain(v: Any) -> Any:
    if isinstance(v, ConfigBase):
        return v.to_dict()
    if isinstance(v, Modality):
        return str(v)
    if isinstance(v, Mapping):
        return {str(k): _plain(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    if isinstance(v, np.generic):
        return v.item()
    return copy.deepcopy(v)


#: The deepest nesting of tables/objects and arrays :meth:`ConfigBase.from_json` and
#: :meth:`ConfigBase.from_toml` accept (a deeper file is refused before it is walked).
MAX_FILE_DEPTH = 64


def _read_text(cls, path: PathLike) -> str:
    """The UTF-8 text of the config file ``path``: a regular file (a FIFO or a device is
    refused without blocking)."""
    from ._files import open_regular
    try:
        where = os.fspath(path)
    except TypeError:
        raise ConfigError(f"{cls._owner()}: the config file must be a path, got "
                          f"{type(path).__name__}") from None
    with open_regular(where, what="config file", error=ConfigError, op=cls._owner()) as f:
        try:
            return f.read().decode("utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"{cls._owner()}: cannot read config file {where!s} "
                              f"({type(exc).__name__}: {exc})") from None


def _check_depth(cls, data: Any, path: PathLike, kind: str) -> None:
    """ConfigError when parsed ``data`` (None: the parser gave up) nests deeper than
    :data:`MAX_FILE_DEPTH`; walked without recursion."""
    stack = [(data, 1)] if data is not None else []
    deepest = 0 if data is not None else MAX_FILE_DEPTH + 1
    while stack and deepest <= MAX_FILE_DEPTH:
        o, d = stack.pop()
        if isinstance(o, Mapping):
            children = list(o.values())
        elif isinstance(o, list):
            children = o
        else:
            continue
        deepest = max(deepest, d)
        stack.extend((c, d + 1) for c in children if isinstance(c, (Mapping, list)))
    if deepest > MAX_FILE_DEPTH:
        raise ConfigError(f"{cls._owner()}: {os.fspath(path)!s} is not a valid {kind} config "
                          f"(nested deeper than {MAX_FILE_DEPTH} levels)")


def _write_text(cls, path: PathLike, text: str) -> None:
    """Write ``text`` to ``path`` atomically (temporary file in the same folder, then rename)."""
    where = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(where))
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".cfg", dir=folder)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, where)
        tmp = None
    except OSError as exc:
        raise ConfigError(f"{cls._owner()}: cannot write config file {where!s} "
                          f"({type(exc).__name__}: {exc})") from exc
    finally:
        if tmp is not None:
            try:
                os.unlink(tmp)
            except OSError:
                pass


# --------------------------------------------------------------------------------------------
# a small TOML writer for the plain values of to_dict (str, int, float, bool, lists, tables)

_TOML_BARE_KEY = re.compile(r"^[A-Za-z0-9_-]+$")


def _toml_key(key: Any) -> str:
    key = str(key)
    return key if _TOML_BARE_KEY.match(key) else _toml_str(key)


def _toml_str(s: str) -> str:
    out = ['"']
    for ch in s:
        o = ord(ch)
        if ch == '"':
            out.append('\\"')
        elif ch == "\\":
            out.append("\\\\")
        elif ch == "\n":
            out.append("\\n")
        elif ch == "\t":
            out.append("\\t")
        elif ch == "\r":
            out.append("\\r")
        elif o < 0x20 or o == 0x7F:
            out.append(f"\\u{o:04x}")
        else:
            out.append(ch)
    out.append('"')
    return "".join(out)


def _toml_value(v: Any, owner: str, where: str) -> str:
    if v is None:
        raise ConfigError(f"{owner}: cannot write None at {where!r} to TOML (TOML has no null; "
                          "use to_json)")
    if isinstance(v, (bool, np.bool_)):
        return "true" if v else "false"
    if isinstance(v, numbers.Integral):
        return str(int(v))
    if isinstance(v, numbers.Real):
        f = float(v)
        if math.isnan(f):
            return "nan"
        if math.isinf(f):
            return "inf" if f > 0 else "-inf"
        return repr(f)
    if isinstance(v, str):
        return _toml_str(v)
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_toml_value(x, owner, f"{where}[{i}]")
                               for i, x in enumerate(v)) + "]"
    if isinstance(v, Mapping):
        if not v:
            return "{}"
        return "{ " + ", ".join(f"{_toml_key(k)} = {_toml_value(x, owner, f'{where}.{k}')}"
                                for k, x in v.items()) + " }"
    raise ConfigError(f"{owner}: cannot write {type(v).__name__} at {where!r} to TOML")


def _toml_dumps(data: Mapping[str, Any], owner: str) -> str:
    lines: List[str] = []

    def table(path: List[str], tab: Mapping[str, Any]) -> None:
        scalars = [(k, v) for k, v in tab.items() if not (isinstance(v, Mapping) and v)]
        tables = [(k, v) for k, v in tab.items() if isinstance(v, Mapping) and v]
        if path and scalars:
            if lines:
                lines.append("")
            lines.append("[" + ".".join(_toml_key(p) for p in path) + "]")
        for k, v in scalars:
            where = ".".join(path + [str(k)])
            lines.append(f"{_toml_key(k)} = {_toml_value(v, owner, where)}")
        for k, v in tables:
            table(path + [str(k)], v)

    table([], data)
    return "\n".join(lines) + "\n"


def _section(cls, data: Any, section: Optional[str], path: PathLike) -> Any:
    where = os.fspath(path)
    if section:
        for part in section.split("."):
            if not isinstance(data, Mapping) or part not in data:
                raise ConfigError(f"{cls._owner()}: {where!s} has no section {section!r}")
            data = data[part]
    if not isinstance(data, Mapping):
        at = f" at section {section!r}" if section else ""
        raise ConfigError(f"{cls._owner()}: {where!s}{at} holds a {type(data).__name__}, "
                          "expected a table/object of field names")
    return data


def _toml_module(cls):
    if sys.version_info >= (3, 11):
        import tomllib
        return tomllib
    try:
        import tomli  # type: ignore[import-not-found]
    except ImportError:
        raise ConfigError(f"{cls._owner()}.from_toml needs Python 3.11+ (tomllib) or the 'tomli' "
                          "package: pip install tomli") from None
    return tomli


# --------------------------------------------------------------------------------------------
# preprocessing

@dataclass(frozen=True)
class PreprocessingConfig(ConfigBase):
    """How raw inputs of one modality become model features.

    One config describes one modality (``modality``): ``"audio"``, ``"image"``, ``"video"`` or
    ``"text"``. Each modality reads its own group of fields below; the fields of the other groups
    take their neutral value (None; ``padding`` is ``"none"`` for image and video) and must not
    be set, which catches a field given to the wrong modality (``ConfigError`` naming it). The
    plain audio numbers (``sample_rate``, ``n_mels``, ``n_fft``, ``hop_length``) and ``mono``
    keep their defaults everywhere and are ignored outside audio.

    * audio: decoded, mixed to mono, resampled to ``sample_rate``, cut and padded per
      ``chunk_length_s`` / ``max_length_s`` / ``padding``, and turned into features by
      :class:`mmcore.preprocess.AudioPreprocessor`.
    * image: decoded with :func:`mmcore.preprocess.load_image` and turned into
      ``pixel_values`` by :class:`mmcore.preprocess.ImagePreprocessor` (one call of
      ``mmcore.ops.preprocess_image`` with ``preset``, ``size``, ``crop_size``,
      ``resize_mode``, ``filter``, ``mean``, ``std``, ``patch_size``).
    * video: the image fields, plus frame sampling (``num_frames``, ``fps``, ``sampling``,
      ``min_frames``, ``max_frames``, ``temporal_patch``) by
      :class:`mmcore.preprocess.VideoPreprocessor`.
    * text: ``tokenizer``, ``max_length``, ``padding``, ``truncation``, ``padding_side``,
      ``add_eos`` for :class:`mmcore.preprocess.TextPreprocessor`.

    Parameters
    ----------
    modality : {"audio", "image", "video", "text"}, default "audio"
        The input modality (a :class:`str` or any object whose ``str()`` is the name).
    preset : str or None, default: "whisper" (audio), "clip" (image, video), None (text)
        Audio: one of "whisper", "fbank", None (below). Image and video: "clip", "siglip",
        "imagenet" or None, the preset of ``mmcore.ops.preprocess_image`` (it sets the resize
        mode, filter, mean and std that are left None here). Text: must stay None.

        Audio presets:
        ``"whisper"``: openai-whisper's log-mel (``mmcore.ops.log_mel_spectrogram``; requires
        ``sample_rate=16000``, ``n_fft=400``, ``hop_length=160`` and ``n_mels`` 80 or 128).
        ``"fbank"``: Kaldi filter-bank features (``mmcore.ops.fbank``), with ``n_fft`` and
        ``hop_length`` as Kaldi's frame length and shift in samples (400 and 160 are Kaldi's
        25 ms and 10 ms at 16 kHz; the FFT size is the next power of two of the frame length).
        None: natural log of ``mmcore.ops.mel_spectrogram`` (power 2, floored at 1e-10) with
        the given ``n_fft`` and ``hop_length``.
    sample_rate : int, default 16000
        Rate audio is resampled to, in Hz.
    n_mels : int, default 80
        Mel bands.
    n_fft : int, default 400
        FFT / window size in samples (fbank: frame length).
    hop_length : int, default 160
        Samples between frames (fbank: frame shift).
    chunk_length_s : float or None, default: 30.0 for "whisper", None otherwise
        Length every item is padded or cut to when ``padding="max_length"``. Ignored by the
        other padding modes. At most :data:`MAX_AUDIO_ITEM_S` (4 h), as ``max_length_s``.
    padding : {"max_length", "longest", "none"}, default: "max_length" for "whisper", else "longest"
        ``"max_length"``: every item is zero-padded (or cut) to ``chunk_length_s``, or to
        ``max_length_s`` when ``chunk_length_s`` is None; one of them must be set.
        ``"longest"``: items are zero-padded at the end to the longest item of the batch.
        ``"none"``: no padding; a batch must then hold items of equal length. ``True`` and
        ``False`` are accepted as ``"longest"`` and ``"none"``.
    max_length_s : float or None, default None
        Longest accepted item, in seconds. Longer items are cut to it when ``truncation`` is
        True and raise otherwise.
    truncation : bool, default True
        Whether audio may be cut at all (by ``max_length_s`` or ``chunk_length_s``). When False,
        an item that would have to be cut raises :class:`~mmcore.errors.ShapeError`.
    mono : bool, default True
        Average the channels of decoded files. Features are computed per 1-D waveform, so
        multi-channel items must be mixed down (or split) before preprocessing.
    extra : dict, default {}
        Free-form options (string keys, JSON-friendly values), kept and round-tripped as is.

    Image and video fields (None = the preset's choice, made by ``mmcore.ops.preprocess_image``):

    size : int or (int, int), default 224
        Output resolution: an int is the shortest edge (or both edges with
        ``resize_mode="squash"``) and the square crop; a pair ``(height, width)`` resizes to
        exactly that size (it needs ``resize_mode`` "squash" or None). A pair is stored as a
        tuple.
    crop_size : int, (int, int) or None, default None
        Center crop after the resize; None: the preset's (for CLIP, ``size``).
    resize_mode : str or None, default None
        One of :attr:`RESIZE_MODES`.
    filter : str or None, default None
        Resampling filter, one of :attr:`IMAGE_FILTERS`.
    mean, std : three floats or None, default None
        Per-channel normalization, applied after rescaling to [0, 1]; ``std`` must be > 0.
    patch_size : int or None, default None
        When set, ``pixel_values`` are patchified (``mmcore.ops.patchify``) into flattened
        ``patch_size x patch_size`` patches; the crop must be divisible by it (checked here
        when ``crop_size`` is given, else by the op).

    Video fields (see :func:`mmcore.preprocess.sample_frame_indices`):

    num_frames : int or None, default: 8 when ``fps`` is None, else None
        Frames sampled by the "uniform" strategy.
    fps : float or None, default None
        Target frame rate of the "fps" strategy.
    sampling : {"uniform", "fps"}, default: "fps" when ``fps`` is set, else "uniform"
    min_frames, max_frames : int, default 4 and 768
        Limits of the "fps" strategy (Qwen2-VL's defaults).
    temporal_patch : int, default 2
        Frames per temporal patch: the "fps" strategy rounds its frame count to a multiple of
        it, and with ``patch_size`` set the frames are patchified in groups of it (the last
        frame repeated when the count is not a multiple).

    Text fields (see :class:`mmcore.preprocess.TextPreprocessor`):

    tokenizer : str, default "byte"
        ``"byte"`` (:class:`mmcore.preprocess.ByteTokenizer`) or the path of a
        ``tokenizer.json`` (or of the directory that holds one) for
        :class:`mmcore.preprocess.HFTokenizer`.
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

    Raises
    ------
    ConfigError
        On construction, naming the first invalid field.

    Examples
    --------
    >>> from mmcore.config import PreprocessingConfig
    >>> cfg = PreprocessingConfig(preset=None, n_mels=128, padding="longest")
    >>> cfg.chunk_length_s is None
    True
    >>> PreprocessingConfig(n_mels=0)
    Traceback (most recent call last):
    ...
    mmcore.errors.ConfigError: PreprocessingConfig.n_mels must be an integer >= 1, got 0
    >>> img = PreprocessingConfig(modality="image", preset="siglip", size=384)
    >>> img.size, img.padding, img.chunk_length_s is None
    (384, 'none', True)
    >>> vid = PreprocessingConfig(modality="video", fps=2.0)
    >>> vid.sampling, vid.num_frames, vid.temporal_patch
    ('fps', None, 2)
    >>> PreprocessingConfig(modality="text", max_length=128, padding="max_length").tokenizer
    'byte'
    >>> PreprocessingConfig(modality="text", size=224)
    Traceback (most recent call last):
    ...
    mmcore.errors.ConfigError: PreprocessingConfig.size applies to modality 'image' | 'video' only (this config is 'text'), got 224
    """

    modality: str = "audio"
    preset: Optional[str] = MODALITY_DEFAULT
    sample_rate: int = 16000
    n_mels: int = 80
    n_fft: int = 400
    hop_length: int = 160
    chunk_length_s: Optional[float] = MODALITY_DEFAULT
    padding: str = MODALITY_DEFAULT
    max_length_s: Optional[float] = None
    truncation: bool = True
    mono: bool = True
    extra: Dict[str, Any] = field(default_factory=dict)
    # image and video
    size: Any = MODALITY_DEFAULT
    crop_size: Any = None
    resize_mode: Optional[str] = None
    filter: Optional[str] = None
    mean: Optional[Tuple[float, ...]] = None
    std: Optional[Tuple[float, ...]] = None
    patch_size: Optional[int] = None
    # video
    num_frames: Optional[int] = MODALITY_DEFAULT
    fps: Optional[float] = None
    sampling: Optional[str] = MODALITY_DEFAULT
    min_frames: Optional[int] = MODALITY_DEFAULT
    max_frames: Optional[int] = MODALITY_DEFAULT
    temporal_patch: Optional[int] = MODALITY_DEFAULT
    # text
    tokenizer: Optional[str] = MODALITY_DEFAULT
    max_length: Optional[int] = None
    padding_side: Optional[str] = MODALITY_DEFAULT
    add_eos: Optional[bool] = None

    # modality name -> method validating that modality's fields
    MODALITY_VALIDATORS: ClassVar[Dict[str, str]] = {
        "audio": "_validate_audio", "image": "_validate_image", "video": "_validate_video",
        "text": "_validate_text"}
    # the fields that belong to some modalities only -> those modalities; every other modality
    # sees them at their neutral value (see _NEUTRAL)
    MODALITY_FIELDS: ClassVar[Dict[str, Tuple[str, ...]]] = {
        "preset": ("audio", "image", "video"),
        "chunk_length_s": ("audio",),
        "max_length_s": ("audio",),
        "padding": ("audio", "text"),
        "size": ("image", "video"),
        "crop_size": ("image", "video"),
        "resize_mode": ("image", "video"),
        "filter": ("image", "video"),
        "mean": ("image", "video"),
        "std": ("image", "video"),
        "patch_size": ("image", "video"),
        "num_frames": ("video",),
        "fps": ("video",),
        "sampling": ("video",),
        "min_frames": ("video",),
        "max_frames": ("video",),
        "temporal_patch": ("video",),
        "tokenizer": ("text",),
        "max_length": ("text",),
        "padding_side": ("text",),
        "add_eos": ("text",),
    }
    _NEUTRAL: ClassVar[Dict[str, Any]] = {"padding": "none"}
    AUDIO_PRESETS: ClassVar[Tuple[Optional[str], ...]] = ("whisper", "fbank", None)
    IMAGE_PRESETS: ClassVar[Tuple[Optional[str], ...]] = ("clip", "siglip", "imagenet", None)
    RESIZE_MODES: ClassVar[Tuple[str, ...]] = ("shortest_edge", "squash")
    IMAGE_FILTERS: ClassVar[Tuple[str, ...]] = ("nearest", "bilinear", "bicubic", "lanczos")
    VIDEO_SAMPLING: ClassVar[Tuple[str, ...]] = ("uniform", "fps")
    PADDING_MODES: ClassVar[Tuple[str, ...]] = ("max_length", "longest", "none")
    TEXT_PADDING_MODES: ClassVar[Tuple[str, ...]] = ("longest", "max_length")
    PADDING_SIDES: ClassVar[Tuple[str, ...]] = ("right", "left")
    _OPTIONAL_FIELDS: ClassVar[Tuple[str, ...]] = (
        "preset", "chunk_length_s", "max_length_s", "crop_size", "resize_mode", "filter", "mean",
        "std", "patch_size", "num_frames", "fps", "max_length", "add_eos")

    def __hash__(self) -> int:
        # equal configs hash equal (usable as cache keys) despite the ``extra`` dict
        return hash((type(self).__name__, json.dumps(self.to_dict(), sort_keys=True, default=repr)))

    # -- validation ----------------------------------------------------------------------------
    def validate(self) -> None:
        owner = self._owner()
        mod = self.modality
        if not isinstance(mod, str) and mod is not None and not isinstance(mod, bool):
            mod = str(mod)  # e.g. a Modality object, whose str() is its name
        if not isinstance(mod, str) or mod.lower() not in self.MODALITY_VALIDATORS:
            known = " | ".join(repr(m) for m in self.MODALITY_VALIDATORS)
            raise _fail(owner, "modality", f"must be one of {known}", self.modality)
        self._set("modality", mod.lower())

        if not isinstance(self.extra, Mapping):
            raise _fail(owner, "extra", "must be a dict", self.extra)
        bad_keys = [k for k in self.extra if not isinstance(k, str)]
        if bad_keys:
            raise _fail(owner, "extra", "must have string keys", bad_keys[0])
        self._set("extra", copy.deepcopy(dict(self.extra)))
        self._set("truncation", check_bool(owner, "truncation", self.truncation))
        self._set("mono", check_bool(owner, "mono", self.mono))

        # fields of other modalities: neutral value, or an error naming the field
        for name, users in self.MODALITY_FIELDS.items():
            if self.modality in users:
                continue
            neutral = self._NEUTRAL.get(name)
            value = getattr(self, name)
            if (value is MODALITY_DEFAULT or value is None
                    or (isinstance(value, str) and value == neutral)):
                self._set(name, neutral)
            else:
                shown = " | ".join(repr(m) for m in users)
                raise _fail(owner, name, f"applies to modality {shown} only (this config is "
                            f"{self.modality!r})", value)

        getattr(self, self.MODALITY_VALIDATORS[self.modality])()

    def _validate_audio(self) -> None:
        owner = self._owner()
        if self.preset is MODALITY_DEFAULT:
            self._set("preset", "whisper")
        self._set("preset", check_choice(owner, "preset", self.preset, self.AUDIO_PRESETS))
        for name in ("sample_rate", "n_mels", "n_fft", "hop_length"):
            self._set(name, check_int(owner, name, getattr(self, name)))
        whisper = self.preset == "whisper"

        if self.chunk_length_s is MODALITY_DEFAULT:
            self._set("chunk_length_s", 30.0 if whisper else None)
        self._set("chunk_length_s",
                  check_positive_float(owner, "chunk_length_s", self.chunk_length_s, optional=True))
        self._set("max_length_s",
                  check_positive_float(owner, "max_length_s", self.max_length_s, optional=True))
        for name in ("chunk_length_s", "max_length_s"):
            v = getattr(self, name)
            if v is not None and v > MAX_AUDIO_ITEM_S:
                # every item may be padded to it: a config (or a model directory's) must not
                # make each clip take gigabytes
                raise ConfigError(f"[{owner}] {name} = {v} s is longer than {MAX_AUDIO_ITEM_S:g} s"
                                  " (4 h, the longest audio load_audio decodes by default)")
        pad = self.padding
        if pad is MODALITY_DEFAULT:
            pad = "max_length" if whisper else "longest"
        elif pad is True or pad is False:
            pad = "longest" if pad else "none"
        elif pad is None:
            pad = "none"
        self._set("padding", check_choice(owner, "padding", pad, self.PADDING_MODES))

        sr = self.sample_rate
        for name in ("chunk_length_s", "max_length_s"):
            secs = getattr(self, name)
            if secs is not None and round(secs * sr) < 1:
                raise _fail(owner, name, f"must span at least one sample at sample_rate={sr}", secs)
        if self.padding == "max_length" and self.chunk_length_s is None and self.max_length_s is None:
            raise _fail(owner, "padding", "'max_length' needs chunk_length_s or max_length_s "
                        "to pad to (use 'longest' to pad to the longest item)", self.padding)

        if whisper:
            # openai-whisper's constants: SAMPLE_RATE, N_FFT, HOP_LENGTH, and its two mel sizes
            for name, want in (("sample_rate", 16000), ("n_fft", 400), ("hop_length", 160)):
                if getattr(self, name) != want:
                    raise _fail(owner, name, f"must be {want} with preset='whisper'",
                                getattr(self, name))
            if self.n_mels not in (80, 128):
                raise _fail(owner, "n_mels", "must be 80 or 128 with preset='whisper'",
                            self.n_mels)

    def _validate_image(self) -> None:
        owner = self._owner()
        if self.preset is MODALITY_DEFAULT:
            self._set("preset", "clip")
        self._set("preset", check_choice(owner, "preset", self.preset, self.IMAGE_PRESETS))
        if self.size is MODALITY_DEFAULT:
            self._set("size", 224)
        self._set("size", _check_size(owner, "size", self.size, optional=False))
        self._set("crop_size", _check_size(owner, "crop_size", self.crop_size, optional=True))
        self._set("resize_mode", check_choice(owner, "resize_mode", self.resize_mode,
                                              self.RESIZE_MODES + (None,)))
        self._set("filter", check_choice(owner, "filter", self.filter,
                                         self.IMAGE_FILTERS + (None,)))
        if isinstance(self.size, tuple) and self.resize_mode == "shortest_edge":
            raise _fail(owner, "resize_mode", "must be 'squash' (or None) when size is a "
                        f"(height, width) pair {self.size}", self.resize_mode)
        self._set("mean", _check_channels(owner, "mean", self.mean, positive=False))
        self._set("std", _check_channels(owner, "std", self.std, positive=True))
        if self.patch_size is not None:
            self._set("patch_size", check_int(owner, "patch_size", self.patch_size))
            crop = self.crop_size  # None: the preset decides; preprocess_image checks it
            for edge in (crop if isinstance(crop, tuple) else (crop,) if crop else ()):
                if edge % self.patch_size:
                    raise _fail(owner, "patch_size", f"must divide the crop size {crop}",
                                self.patch_size)

    def _validate_video(self) -> None:
        owner = self._owner()
        self._validate_image()
        self._set("fps", check_positive_float(owner, "fps", self.fps, optional=True))
        if self.num_frames is MODALITY_DEFAULT:
            self._set("num_frames", 8 if self.fps is None else None)
        if self.num_frames is not None:
            self._set("num_frames", check_int(owner, "num_frames", self.num_frames))
        sampling = self.sampling
        if sampling is MODALITY_DEFAULT or sampling is None:
            sampling = "fps" if self.fps is not None else "uniform"
        self._set("sampling", check_choice(owner, "sampling", sampling, self.VIDEO_SAMPLING))
        for name, default in (("min_frames", 4), ("max_frames", 768), ("temporal_patch", 2)):
            value = getattr(self, name)
            if value is MODALITY_DEFAULT:
                value = default
            self._set(name, check_int(owner, name, value))
        if self.max_frames < self.min_frames:
            raise _fail(owner, "max_frames", f"must be >= min_frames={self.min_frames}",
                        self.max_frames)
        if self.sampling == "uniform":
            if self.num_frames is None:
                raise _fail(owner, "num_frames", "must be set for sampling='uniform'",
                            self.num_frames)
            if self.fps is not None:
                raise _fail(owner, "fps", "is used by sampling='fps' only; with "
                            "sampling='uniform' set num_frames", self.fps)
        else:
            if self.fps is None:
                raise _fail(owner, "fps", "must be set for sampling='fps'", self.fps)
            if self.num_frames is not None:
                raise _fail(owner, "num_frames", "is used by sampling='uniform' only; with "
                            "sampling='fps' the count follows from fps", self.num_frames)

    def _validate_text(self) -> None:
        owner = self._owner()
        tok = self.tokenizer
        if tok is MODALITY_DEFAULT or tok is None:
            tok = "byte"
        if isinstance(tok, os.PathLike):
            tok = os.fspath(tok)
        if not isinstance(tok, str) or not tok:
            raise _fail(owner, "tokenizer", "must be 'byte' or the path of a tokenizer.json",
                        self.tokenizer)
        self._set("tokenizer", "byte" if tok.lower() == "byte" else tok)
        if self.max_length is not None:
            self._set("max_length", check_int(owner, "max_length", self.max_length))
        pad = self.padding
        if pad is MODALITY_DEFAULT or pad is True:
            pad = "longest"
        self._set("padding", check_choice(owner, "padding", pad, self.TEXT_PADDING_MODES))
        if self.padding == "max_length" and self.max_length is None:
            raise _fail(owner, "padding", "'max_length' needs max_length to pad to",
                        self.padding)
        side = self.padding_side
        if side is MODALITY_DEFAULT or side is None:
            side = "right"
        self._set("padding_side", check_choice(owner, "padding_side", side, self.PADDING_SIDES))
        if self.add_eos is not None:
            self._set("add_eos", check_bool(owner, "add_eos", self.add_eos))

    # -- derived values -------------------------------------------------------------------------
    @property
    def target_length(self) -> Optional[int]:
        """Samples every item is padded/cut to with ``padding="max_length"``, else None."""
        if self.padding != "max_length":
            return None
        secs = self.chunk_length_s if self.chunk_length_s is not None else self.max_length_s
        return int(round(secs * self.sample_rate))

    @property
    def max_samples(self) -> Optional[int]:
        """``max_length_s`` in samples (None: no limit)."""
        if self.max_length_s is None:
            return None
        return int(round(self.max_length_s * self.sample_rate))


# --------------------------------------------------------------------------------------------
# the model: helpers

def check_any_int(owner: str, name: str, value: Any) -> int:
    """An integer (not a bool), any sign."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise _fail(owner, name, "must be an integer", value)
    return int(value)


def _check_opt_int(owner: str, name: str, value: Any, *, minimum: int = 1) -> Optional[int]:
    """None, or an integer (not a bool) >= ``minimum``."""
    if value is None:
        return None
    if (isinstance(value, bool) or not isinstance(value, numbers.Integral)
            or value < minimum):
        raise _fail(owner, name, f"must be an integer >= {minimum} or None", value)
    return int(value)


def _check_fraction(owner: str, name: str, value: Any) -> float:
    """A real number in [0, 1)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise _fail(owner, name, "must be a number in [0, 1)", value)
    f = float(value)
    if not 0.0 <= f < 1.0:
        raise _fail(owner, name, "must be a number in [0, 1)", value)
    return f


def _check_text(owner: str, name: str, value: Any) -> str:
    if not isinstance(value, str) or not value.strip():
        raise _fail(owner, name, "must be a non-empty string", value)
    return value


def _check_extra(owner: str, name: str, value: Any) -> Dict[str, Any]:
    """A dict with string keys, deep-copied."""
    if not isinstance(value, Mapping):
        raise _fail(owner, name, "must be a dict", value)
    bad = [k for k in value if not isinstance(k, str)]
    if bad:
        raise _fail(owner, name, "must have string keys", bad[0])
    return copy.deepcopy(dict(value))


def check_modality(owner: str, name: str, value: Any) -> Modality:
    """A :class:`Modality` (or its string form), as a Modality."""
    try:
        return Modality(value)
    except ModalityError as exc:
        raise ConfigError(f"{owner}.{name}: {exc}") from None


def _nested(owner: str, name: str, value: Any, cls: Any, *, optional: bool = False) -> Any:
    """A nested config: an instance of ``cls``, or a mapping of its fields (converted)."""
    if value is None and optional:
        return None
    if isinstance(value, cls):
        return value
    if isinstance(value, Mapping):
        try:
            return cls.from_dict(value)
        except ConfigError as exc:
            raise ConfigError(f"{owner}.{name}: {exc}") from None
    article = "an" if cls.__name__[0] in "AEIOU" else "a"
    expected = f"must be {article} {cls.__name__} or a mapping of its fields" + (
        " or None" if optional else "")
    raise _fail(owner, name, expected, value)


def _names(modalities: Iterable[Modality]) -> str:
    return ", ".join(repr(str(m)) for m in modalities)


class ModalityMap(collections.abc.Mapping):
    """An immutable mapping keyed by :class:`~mmcore.modality.Modality`, in Modality order.

    Lookups and ``in`` also take the string form of a modality. Configs use it for every
    per-modality table, so iteration order is the same however the config was written.

    Examples
    --------
    >>> from mmcore.config import ModalityMap
    >>> from mmcore.modality import Modality
    >>> mm = ModalityMap({"video": 3, Modality.TEXT: 1})
    >>> list(mm.items()), mm["video"], "audio" in mm
    ([(Modality.TEXT, 1), (Modality.VIDEO, 3)], 3, False)
    """

    __slots__ = ("_data",)

    def __init__(self, items: Union[Mapping[Any, Any], Iterable[Tuple[Any, Any]]] = ()) -> None:
        pairs = items.items() if isinstance(items, Mapping) else items
        data: Dict[Modality, Any] = {}
        for key, value in pairs:
            m = Modality(key)
            if m in data:
                raise ModalityError(f"modality {str(m)!r} appears twice")
            data[m] = value
        object.__setattr__(self, "_data", dict(sorted(data.items(), key=lambda kv: kv[0])))

    def __getitem__(self, key: Any) -> Any:
        try:
            m = Modality(key)
        except ModalityError:
            raise KeyError(key) from None
        return self._data[m]

    def __contains__(self, key: object) -> bool:
        try:
            return Modality(key) in self._data  # type: ignore[arg-type]
        except ModalityError:
            return False

    def __iter__(self) -> Iterator[Modality]:
        return iter(self._data)

    def __len__(self) -> int:
        return len(self._data)

    def __repr__(self) -> str:
        body = ", ".join(f"{str(k)!r}: {v!r}" for k, v in self._data.items())
        return "ModalityMap({" + body + "})"

    def __hash__(self) -> int:
        return hash(tuple(self._data.items()))

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Mapping):
            return NotImplemented
        return dict(self.items()) == dict(other.items())

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError("ModalityMap is immutable")

    def __reduce__(self):
        return (ModalityMap, (list(self._data.items()),))


# --------------------------------------------------------------------------------------------
# encoders and caching

@_config
class EncoderConfig(ConfigBase):
    """Hyperparameters of the encoder of one modality.

    Read by the built-in encoders of :mod:`mmcore.model` (a pre-norm transformer stack of
    ``num_layers`` blocks); encoders of other kinds (``"external"``, ``"onnx"``, ``"remote"``)
    ignore everything here except what their owner chooses to read (``extra``, say).

    Parameters
    ----------
    num_layers : int, default 4
        Transformer blocks (>= 0; 0: the encoder is its input embedding alone).
        :class:`MiddleFusion` fuses after block ``fusion_layer``, which must be <= this.
    num_heads : int, default 8
        Self-attention heads; they divide the encoder width (``hidden_dim``, or the modality's
        ``embed_dim`` when ``hidden_dim`` is None; checked by :class:`ModalityConfig` for
        built-in encoders).
    hidden_dim : int or None, default None
        Width of the blocks; None: the modality's ``embed_dim``. When it differs, a final
        linear projection maps it to ``embed_dim``.
    mlp_ratio : float, default 4.0
        Width of the feed-forward layer relative to the block width (> 0).
    max_positions : int or None, default None
        Length of the learned position table; None: derived from the preprocessing (longest
        sequence it can produce).
    patch_size : int or None, default None
        Patch edge of the patch embedding (image and video; audio spectrogram patches).
        Not for text. When the preprocessing patchifies (``preprocessing.patch_size``), both
        must agree.
    vocab_size : int or None, default None
        Token vocabulary (text and custom modalities only); None: the tokenizer's.
    activation : {"gelu", "gelu_tanh", "quick_gelu", "relu"}, default "gelu"
        The feed-forward activation (``mmcore.model.nn.get_activation`` names; "quick_gelu"
        is CLIP's).
    norm_eps : float, default 1e-5
        Epsilon of the layer norms (> 0).
    pooling : {"mean", "cls", "max"}, default "mean"
        How a token sequence becomes the modality's pooled embedding: masked mean, a learned
        class token (position 0), or masked max.
    extra : dict, default {}
        Free-form, JSON-friendly options for a particular encoder.

    Examples
    --------
    >>> from mmcore.config import EncoderConfig
    >>> EncoderConfig(num_layers=12, num_heads=12, patch_size=16).patch_size
    16
    >>> EncoderConfig(num_heads=0)
    Traceback (most recent call last):
    ...
    mmcore.errors.ConfigError: EncoderConfig.num_heads must be an integer >= 1, got 0
    """

    num_layers: int = 4
    num_heads: int = 8
    hidden_dim: Optional[int] = None
    mlp_ratio: float = 4.0
    max_positions: Optional[int] = None
    patch_size: Optional[int] = None
    vocab_size: Optional[int] = None
    activation: str = "gelu"
    norm_eps: float = 1e-5
    pooling: str = "mean"
    extra: Dict[str, Any] = field(default_factory=dict)

    ACTIVATIONS: ClassVar[Tuple[str, ...]] = ("gelu", "gelu_tanh", "quick_gelu", "relu")
    POOLINGS: ClassVar[Tuple[str, ...]] = ("mean", "cls", "max")
    _OPTIONAL_FIELDS: ClassVar[Tuple[str, ...]] = (
        "hidden_dim", "max_positions", "patch_size", "vocab_size")

    def validate(self) -> None:
        owner = self._owner()
        self._set("num_layers", check_int(owner, "num_layers", self.num_layers, minimum=0))
        self._set("num_heads", check_int(owner, "num_heads", self.num_heads))
        for name in self._OPTIONAL_FIELDS:
            self._set(name, _check_opt_int(owner, name, getattr(self, name)))
        self._set("mlp_ratio", check_positive_float(owner, "mlp_ratio", self.mlp_ratio))
        self._set("activation", check_choice(owner, "activation", self.activation,
                                             self.ACTIVATIONS))
        self._set("norm_eps", check_positive_float(owner, "norm_eps", self.norm_eps))
        self._set("pooling", check_choice(owner, "pooling", self.pooling, self.POOLINGS))
        self._set("extra", _check_extra(owner, "extra", self.extra))
        if self.hidden_dim is not None and self.hidden_dim % self.num_heads:
            raise _fail(owner, "hidden_dim", f"must be divisible by num_heads={self.num_heads}",
                        self.hidden_dim)


@_config
class CachePolicy(ConfigBase):
    """How the encoder outputs of one modality are cached.

    Used as :attr:`CacheConfig.default`, as the entries of :attr:`CacheConfig.per_modality`,
    and as :attr:`ModalityConfig.cache` (the same entry written next to the modality).

    Parameters
    ----------
    policy : {"lru", "lfu", "fifo", "ttl"}, default "lru"
        Eviction order within this modality's share: least recently used, least frequently
        used, oldest first, or expiry by age (``ttl_s``, oldest first when over budget).
    budget_bytes : int or None, default None
        Bytes this modality may hold (>= 1); None: it shares the global budget with the
        other modalities that have no budget of their own.
    ttl_s : float or None, default None
        Entries older than this many seconds are dropped (> 0). Required by ``"ttl"``;
        with the other policies it is an additional age limit.
    priority : int, default 0
        When the global budget is exceeded, modalities with lower priority are evicted first.
    dtype : {"float32", "float16", "bfloat16"} or None, default None
        Storage dtype of cached tensors; None: as computed (float32). Lower precision halves
        the bytes at the cost of a rounding on the way in.
    enabled : bool, default True
        False: this modality is never cached.

    Examples
    --------
    >>> from mmcore.config import CachePolicy
    >>> CachePolicy(policy="ttl", ttl_s=60).ttl_s
    60.0
    >>> CachePolicy(policy="ttl")
    Traceback (most recent call last):
    ...
    mmcore.errors.ConfigError: CachePolicy.ttl_s must be set for policy='ttl', got None
    """

    policy: str = "lru"
    budget_bytes: Optional[int] = None
    ttl_s: Optional[float] = None
    priority: int = 0
    dtype: Optional[str] = None
    enabled: bool = True

    POLICIES: ClassVar[Tuple[str, ...]] = ("lru", "lfu", "fifo", "ttl")
    DTYPES: ClassVar[Tuple[str, ...]] = ("float32", "float16", "bfloat16")
    _OPTIONAL_FIELDS: ClassVar[Tuple[str, ...]] = ("budget_bytes", "ttl_s", "dtype")

    def validate(self) -> None:
        owner = self._owner()
        self._set("policy", check_choice(owner, "policy", self.policy, self.POLICIES))
        self._set("budget_bytes", _check_opt_int(owner, "budget_bytes", self.budget_bytes))
        self._set("ttl_s", check_positive_float(owner, "ttl_s", self.ttl_s, optional=True))
        self._set("priority", check_any_int(owner, "priority", self.priority))
        self._set("dtype", check_choice(owner, "dtype", self.dtype, self.DTYPES + (None,)))
        self._set("enabled", check_bool(owner, "enabled", self.enabled))
        if self.policy == "ttl" and self.ttl_s is None:
            raise _fail(owner, "ttl_s", "must be set for policy='ttl'", self.ttl_s)


@_config
class CacheConfig(ConfigBase):
    """The tensor cache: a global byte budget and a policy per modality.

    Parameters
    ----------
    enabled : bool, default True
        False: nothing is cached.
    global_budget_bytes : int, default 512 MiB
        Bytes the whole cache may hold (>= 1); it must cover the sum of the per-modality
        budgets.
    default : CachePolicy, default CachePolicy()
        The policy of every modality without an entry of its own.
    per_modality : dict of Modality -> CachePolicy, default {}
        Per-modality entries (keys may be string forms; stored as a :class:`ModalityMap`).
        In a :class:`MultiModalConfig` a modality's entry may instead be written as
        :attr:`ModalityConfig.cache`, not both.

    Examples
    --------
    >>> from mmcore.config import CacheConfig, CachePolicy
    >>> cfg = CacheConfig(global_budget_bytes=2**30,
    ...                   per_modality={"image": CachePolicy(budget_bytes=2**28)})
    >>> cfg.policy_for("image").budget_bytes, cfg.policy_for("text") == cfg.default
    (268435456, True)
    """

    enabled: bool = True
    global_budget_bytes: int = 512 * 2**20
    default: CachePolicy = field(default_factory=CachePolicy)
    per_modality: Mapping[Modality, CachePolicy] = field(default_factory=dict)

    _NESTED: ClassVar[Dict[str, Tuple[str, Any]]] = {
        "default": ("one", CachePolicy), "per_modality": ("map", CachePolicy)}

    def validate(self) -> None:
        owner = self._owner()
        self._set("enabled", check_bool(owner, "enabled", self.enabled))
        self._set("global_budget_bytes", check_int(owner, "global_budget_bytes",
                                                   self.global_budget_bytes))
        self._set("default", _nested(owner, "default", self.default, CachePolicy))
        if not isinstance(self.per_modality, Mapping):
            raise _fail(owner, "per_modality", "must be a dict of Modality -> CachePolicy",
                        self.per_modality)
        items = []
        seen = set()
        for key, value in self.per_modality.items():
            m = check_modality(owner, "per_modality", key)
            if m in seen:
                raise _fail(owner, "per_modality", f"has modality {str(m)!r} twice", key)
            seen.add(m)
            items.append((m, _nested(owner, f"per_modality[{str(m)!r}]", value, CachePolicy)))
        self._set("per_modality", ModalityMap(items))
        limit = self.global_budget_bytes
        named = [("default", self.default)] + [(f"per_modality[{str(m)!r}]", p)
                                               for m, p in self.per_modality.items()]
        for where, pol in named:
            if pol.budget_bytes is not None and pol.budget_bytes > limit:
                raise _fail(owner, f"{where}.budget_bytes",
                            f"must be <= global_budget_bytes={limit}", pol.budget_bytes)
        total = sum(p.budget_bytes or 0 for p in self.per_modality.values())
        if total > limit:
            raise _fail(owner, "global_budget_bytes",
                        f"must be >= the sum of the per-modality budgets ({total})", limit)

    def policy_for(self, modality: Any) -> CachePolicy:
        """The policy of ``modality``: its entry in :attr:`per_modality`, else :attr:`default`."""
        m = Modality(modality)
        return self.per_modality[m] if m in self.per_modality else self.default


# --------------------------------------------------------------------------------------------
# one modality

@_config
class ModalityConfig(ConfigBase):
    """Everything about one modality of a :class:`MultiModalConfig`.

    Parameters
    ----------
    modality : Modality or str
        Which modality (stored as a :class:`~mmcore.modality.Modality`).
    enabled : bool, default True
        Whether the model encodes this modality. Disabled modalities stay configured (their
        weights loaded) and can be switched on again at run time
        (:meth:`MultiModalConfig.with_enabled`); inputs given for them are ignored.
    required : bool, default False
        Whether every request must carry this modality. A required modality cannot be
        disabled.
    preprocessing : PreprocessingConfig, mapping or None, default: the modality's defaults
        How raw inputs become features. For a built-in modality it must be a
        :class:`PreprocessingConfig` of that modality (a mapping may leave out ``modality``);
        by default it is ``PreprocessingConfig(modality=...)``. A custom modality has no
        preprocessing by default, but may borrow any of the four preprocessors (its mapping
        then names the ``modality`` of the preprocessor). None: inputs arrive as features.
    encoder : {"builtin", "external", "onnx", "remote"}, default "builtin"
        What encodes the features: an encoder of :mod:`mmcore.model` built from
        ``encoder_config``; a Python callable handed to the loader
        (``MultiModalLoader.with_encoder``); an ONNX file (its path from
        ``MultiModalLoader.with_modality_path`` or ``extra``); or an encoder on a shard node of
        :mod:`mmcore.distributed`.
    embed_dim : int, default 512
        Width of the embeddings this modality's encoder produces (tokens and pooled).
    encoder_config : EncoderConfig or mapping, default EncoderConfig()
        Hyperparameters of a built-in encoder.
    priority : int, default 0
        Importance of the modality: higher priorities are encoded first and placed first by
        the shard coordinator; ties follow the modality order.
    quantization : {None, "float16", "bfloat16", "int8"}, default None
        Storage of the encoder weights: None keeps float32; "float16"/"bfloat16" store half
        precision; "int8" is weight-only (per-output-channel scales, activations stay
        float32). On disk and, for the matrices of the linear layers and attention
        projections, in memory too (read in place by :func:`mmcore.ops.linear`); compute is
        float32. Not for ``encoder="external"`` (a callable mmcore does not own).
    cache : CachePolicy, mapping or None, default None
        This modality's cache entry; None: :attr:`CacheConfig.per_modality` or
        :attr:`CacheConfig.default` decides (see :meth:`MultiModalConfig.cache_policy`).
    extra : dict, default {}
        Free-form, JSON-friendly options.

    Examples
    --------
    >>> from mmcore.config import ModalityConfig
    >>> from mmcore.modality import Modality
    >>> img = ModalityConfig(Modality.IMAGE, embed_dim=768,
    ...                      encoder_config={"num_layers": 12, "num_heads": 12})
    >>> img.modality, img.preprocessing.preset, img.encoder_config.num_layers
    (Modality.IMAGE, 'clip', 12)
    >>> ModalityConfig("custom:7", encoder="external").preprocessing is None
    True
    >>> ModalityConfig("text", quantization="int4")
    Traceback (most recent call last):
    ...
    mmcore.errors.ConfigError: ModalityConfig.quantization must be one of 'float16' | 'bfloat16' | 'int8' | None, got 'int4'
    """

    modality: Modality
    enabled: bool = True
    required: bool = False
    preprocessing: Optional[PreprocessingConfig] = MODALITY_DEFAULT
    encoder: str = "builtin"
    embed_dim: int = 512
    encoder_config: EncoderConfig = field(default_factory=EncoderConfig)
    priority: int = 0
    quantization: Optional[str] = None
    cache: Optional[CachePolicy] = None
    extra: Dict[str, Any] = field(default_factory=dict)

    ENCODERS: ClassVar[Tuple[str, ...]] = ("builtin", "external", "onnx", "remote")
    QUANTIZATIONS: ClassVar[Tuple[str, ...]] = ("float16", "bfloat16", "int8")
    _OPTIONAL_FIELDS: ClassVar[Tuple[str, ...]] = ("preprocessing", "quantization", "cache")
    _NESTED: ClassVar[Dict[str, Tuple[str, Any]]] = {
        "preprocessing": ("one", PreprocessingConfig), "encoder_config": ("one", EncoderConfig),
        "cache": ("one", CachePolicy)}

    def validate(self) -> None:
        owner = self._owner()
        m = check_modality(owner, "modality", self.modality)
        self._set("modality", m)
        self._set("enabled", check_bool(owner, "enabled", self.enabled))
        self._set("required", check_bool(owner, "required", self.required))
        if self.required and not self.enabled:
            raise _fail(owner, "enabled", f"cannot be False for modality {str(m)!r}, which is "
                        "required (required=True)", self.enabled)
        self._set("encoder", check_choice(owner, "encoder", self.encoder, self.ENCODERS))
        self._set("embed_dim", check_int(owner, "embed_dim", self.embed_dim))
        self._set("encoder_config", _nested(owner, "encoder_config", self.encoder_config,
                                            EncoderConfig))
        self._set("priority", check_any_int(owner, "priority", self.priority))
        self._set("quantization", check_choice(owner, "quantization", self.quantization,
                                               self.QUANTIZATIONS + (None,)))
        if self.quantization is not None and self.encoder == "external":
            raise _fail(owner, "quantization", "applies to 'builtin', 'onnx' and 'remote' "
                        "encoders, not encoder='external'", self.quantization)
        self._set("cache", _nested(owner, "cache", self.cache, CachePolicy, optional=True))
        self._set("extra", _check_extra(owner, "extra", self.extra))
        self._validate_preprocessing(m)

        ec = self.encoder_config
        if self.encoder == "builtin":
            width = ec.hidden_dim if ec.hidden_dim is not None else self.embed_dim
            if width % ec.num_heads:
                raise _fail(owner, "encoder_config.num_heads", f"must divide the encoder width "
                            f"{width} (encoder_config.hidden_dim, else embed_dim)", ec.num_heads)
        if ec.vocab_size is not None and m in (Modality.IMAGE, Modality.AUDIO, Modality.VIDEO):
            raise _fail(owner, "encoder_config.vocab_size", "applies to text and custom "
                        f"modalities only (this is {str(m)!r})", ec.vocab_size)
        if ec.patch_size is not None and m == Modality.TEXT:
            raise _fail(owner, "encoder_config.patch_size", "does not apply to text",
                        ec.patch_size)
        pre = self.preprocessing
        if (pre is not None and ec.patch_size is not None and pre.patch_size is not None
                and pre.patch_size != ec.patch_size):
            raise _fail(owner, "encoder_config.patch_size", "must equal preprocessing."
                        f"patch_size={pre.patch_size} (the inputs arrive patchified)",
                        ec.patch_size)

    def _validate_preprocessing(self, m: Modality) -> None:
        owner = self._owner()
        pre = self.preprocessing
        if pre is MODALITY_DEFAULT:
            pre = None if m.is_custom else PreprocessingConfig(modality=str(m))
        elif isinstance(pre, Mapping) and "modality" not in pre:
            if m.is_custom:
                raise _fail(owner, "preprocessing", f"of custom modality {str(m)!r} must name "
                            "the preprocessor it borrows ('modality': 'audio', 'image', "
                            "'video' or 'text')", dict(pre))
            pre = dict(pre, modality=str(m))
        pre = _nested(owner, "preprocessing", pre, PreprocessingConfig, optional=True)
        if pre is not None and not m.is_custom and pre.modality != str(m):
            raise _fail(owner, "preprocessing", f"must be for modality {str(m)!r}, it is for "
                        f"{pre.modality!r}", pre.modality)
        self._set("preprocessing", pre)


# --------------------------------------------------------------------------------------------
# cross-modal attention

@_config
class CrossModalAttentionConfig(ConfigBase):
    """Cross-modal attention between the token sequences of the modalities.

    For each pair ``(query, context)`` the tokens of the query modality attend to the tokens
    of the context modality (``mmcore.ops.attention`` with the query modality's tokens as
    ``q`` and the context modality's as ``k`` and ``v``; padded context tokens are masked),
    and the result is added to the query tokens. The query width is projected to
    ``num_heads * head_dim`` and back.

    Parameters
    ----------
    num_heads : int, default 8
    head_dim : int or None, default None
        Width of one head; None: the query modality's ``embed_dim / num_heads`` (which must
        then be an integer; :class:`MultiModalConfig` checks it).
    dropout : float in [0, 1), default 0.0
        Attention dropout. Kept so that configs written for training load and round-trip;
        it is inactive at inference (mmcore never applies it when running a model).
    temperature : float, default 1.0
        Scores are divided by it (> 0): ``softmax(q . k * scale / temperature)``.
    pairs : "all" or list of (query, context), default "all"
        Which modalities attend to which. Each pair is two distinct modalities (Modality
        objects or string forms; ``"text->image"`` is accepted too); no pair may repeat.
        ``"all"``: every ordered pair of distinct enabled modalities, in modality order.
        Pairs that involve a disabled modality are skipped at run time.
    return_weights : bool, default False
        Return the attention weights (materializes an ``(Lq, Lk)`` matrix per pair and head).
    scale : float or None, default None
        Score scale (> 0); None: ``1 / sqrt(head_dim)``.

    Examples
    --------
    >>> from mmcore.config import CrossModalAttentionConfig
    >>> ca = CrossModalAttentionConfig(num_heads=4, pairs=[("text", "image"), "audio->text"])
    >>> [(str(q), str(c)) for q, c in ca.pairs]
    [('text', 'image'), ('audio', 'text')]
    >>> CrossModalAttentionConfig(pairs=[("text", "text")])
    Traceback (most recent call last):
    ...
    mmcore.errors.ConfigError: CrossModalAttentionConfig.pairs[0] must pair two different modalities, got ('text', 'text')
    """

    num_heads: int = 8
    head_dim: Optional[int] = None
    dropout: float = 0.0
    temperature: float = 1.0
    pairs: Any = "all"
    return_weights: bool = False
    scale: Optional[float] = None

    _OPTIONAL_FIELDS: ClassVar[Tuple[str, ...]] = ("head_dim", "scale")

    def validate(self) -> None:
        owner = self._owner()
        self._set("num_heads", check_int(owner, "num_heads", self.num_heads))
        self._set("head_dim", _check_opt_int(owner, "head_dim", self.head_dim))
        self._set("dropout", _check_fraction(owner, "dropout", self.dropout))
        self._set("temperature", check_positive_float(owner, "temperature", self.temperature))
        self._set("scale", check_positive_float(owner, "scale", self.scale, optional=True))
        self._set("return_weights", check_bool(owner, "return_weights", self.return_weights))
        self._set("pairs", self._check_pairs(self.pairs))

    def _check_pairs(self, pairs: Any) -> Any:
        owner = self._owner()
        expected = "must be 'all' or a list of (query, context) modality pairs"
        if isinstance(pairs, str):
            if pairs.strip().lower() == "all":
                return "all"
            raise _fail(owner, "pairs", expected, pairs)
        if not isinstance(pairs, (list, tuple)):
            raise _fail(owner, "pairs", expected, pairs)
        if not pairs:
            raise _fail(owner, "pairs", "must hold at least one (query, context) pair, or be "
                        "'all'", pairs)
        out: List[Tuple[Modality, Modality]] = []
        for i, pair in enumerate(pairs):
            where = f"pairs[{i}]"
            if isinstance(pair, str) and "->" in pair:
                items: Any = [p.strip() for p in pair.split("->")]
            else:
                items = pair
            if isinstance(items, str) or not isinstance(items, (list, tuple)) or len(items) != 2:
                raise _fail(owner, where, "must be a (query, context) pair of modalities or "
                            "'query->context'", pair)
            q = check_modality(owner, where, items[0])
            c = check_modality(owner, where, items[1])
            if q == c:
                raise _fail(owner, where, "must pair two different modalities",
                            (str(q), str(c)))
            if (q, c) in out:
                raise _fail(owner, where, "repeats an earlier pair", (str(q), str(c)))
            out.append((q, c))
        return tuple(out)

    def resolve_pairs(self, modalities: Iterable[Any]) -> Tuple[Tuple[Modality, Modality], ...]:
        """The pairs among ``modalities``: "all" expanded, explicit pairs filtered.

        Examples
        --------
        >>> from mmcore.config import CrossModalAttentionConfig
        >>> pairs = CrossModalAttentionConfig().resolve_pairs(["image", "text"])
        >>> [(str(q), str(c)) for q, c in pairs]
        [('text', 'image'), ('image', 'text')]
        """
        ms = sorted({Modality(m) for m in modalities})
        if self.pairs == "all":
            return tuple((q, c) for q in ms for c in ms if q != c)
        present = set(ms)
        return tuple(p for p in self.pairs if p[0] in present and p[1] in present)

    def inner_dim(self, query_dim: int) -> int:
        """``num_heads * head_dim`` for a query modality of width ``query_dim``."""
        head = self.head_dim if self.head_dim is not None else query_dim // self.num_heads
        return self.num_heads * head


# --------------------------------------------------------------------------------------------
# fusion strategies

_FUSION_TYPES: Dict[str, Any] = {}
_FUSION_REGISTRY: Dict[str, Callable[..., Any]] = {}
_REGISTRY_LOCK = threading.Lock()


def register_fusion(name: str, fn: Optional[Callable[..., Any]] = None, *,
                    overwrite: bool = False) -> Any:
    """Register a fusion function under ``name`` for :class:`CustomFusion`.

    Registering is what lets a config that uses the function be saved (the name is written)
    and loaded again (the name is looked up). Usable as a decorator:
    ``@register_fusion("gated")``.

    Parameters
    ----------
    name : str
        Non-empty, no surrounding spaces.
    fn : callable, optional
        The function; omitted: returns a decorator.
    overwrite : bool, default False
        Replace a different function already registered under ``name`` (otherwise that
        raises :class:`ConfigError`). Registering the same function again is a no-op.

    Returns
    -------
    callable
        ``fn`` (or the decorator).

    Examples
    --------
    >>> from mmcore.config import CustomFusion, register_fusion, unregister_fusion
    >>> @register_fusion("first_modality")
    ... def first(embeddings, **options):
    ...     return next(iter(embeddings.values()))
    >>> CustomFusion(first).to_dict()
    {'type': 'custom', 'fn': 'first_modality', 'options': {}}
    >>> unregister_fusion("first_modality") is first
    True
    """
    if fn is None:
        def decorator(f: Callable[..., Any]) -> Callable[..., Any]:
            return register_fusion(name, f, overwrite=overwrite)
        return decorator
    if not isinstance(name, str) or not name or name != name.strip():
        raise ConfigError(f"register_fusion.name must be a non-empty string without "
                          f"surrounding spaces, got {name!r}")
    if not callable(fn):
        raise ConfigError(f"register_fusion.fn must be callable, got {fn!r}")
    with _REGISTRY_LOCK:
        old = _FUSION_REGISTRY.get(name)
        if old is not None and old is not fn and not overwrite:
            raise ConfigError(f"register_fusion.name {name!r} is already registered to "
                              f"{old!r} (pass overwrite=True to replace it)")
        _FUSION_REGISTRY[name] = fn
    return fn


def unregister_fusion(name: str) -> Callable[..., Any]:
    """Remove ``name`` from the fusion registry and return its function."""
    with _REGISTRY_LOCK:
        if name not in _FUSION_REGISTRY:
            raise ConfigError(f"unregister_fusion.name {name!r} is not registered")
        return _FUSION_REGISTRY.pop(name)


def get_fusion(name: str) -> Callable[..., Any]:
    """The function registered under ``name`` (:class:`ConfigError` if there is none)."""
    with _REGISTRY_LOCK:
        fn = _FUSION_REGISTRY.get(name) if isinstance(name, str) else None
        known = sorted(_FUSION_REGISTRY)
    if fn is None:
        raise ConfigError(f"fusion {name!r} is not registered (registered: "
                          f"{', '.join(map(repr, known)) or 'none'}); call "
                          "mmcore.config.register_fusion(name, fn) first")
    return fn


def registered_fusions() -> Tuple[str, ...]:
    """The registered fusion names, sorted."""
    with _REGISTRY_LOCK:
        return tuple(sorted(_FUSION_REGISTRY))


def _registered_name(fn: Any) -> Optional[str]:
    with _REGISTRY_LOCK:
        for name, f in _FUSION_REGISTRY.items():
            if f is fn:
                return name
        for name, f in _FUSION_REGISTRY.items():
            try:
                if f == fn:  # bound methods are new objects on every access
                    return name
            except Exception:  # pragma: no cover - an odd __eq__
                continue
    return None


class FusionStrategy(ConfigBase):
    """How the per-modality embeddings become one fused embedding (abstract).

    The strategies are :class:`EarlyFusion`, :class:`MiddleFusion`, :class:`LateFusion`,
    :class:`AttentionFusion` and :class:`CustomFusion`. Their dictionaries are tagged with a
    ``"type"`` key (``"early"``, ``"middle"``, ``"late"``, ``"attention"``, ``"custom"``);
    :meth:`FusionStrategy.from_dict` picks the class from it.

    Examples
    --------
    >>> from mmcore.config import FusionStrategy, MiddleFusion
    >>> MiddleFusion(fusion_layer=2).to_dict()
    {'type': 'middle', 'fusion_layer': 2}
    >>> FusionStrategy.from_dict({"type": "late", "reduce": "max"})
    LateFusion(reduce='max', weights=None)
    >>> FusionStrategy.from_name("early")
    EarlyFusion()
    """

    TYPE: ClassVar[str] = ""

    def __new__(cls, *args: Any, **kwargs: Any):
        if cls is FusionStrategy:
            raise TypeError("FusionStrategy is abstract: use EarlyFusion(), MiddleFusion(k), "
                            "LateFusion(reduce), AttentionFusion(attention_dim) or "
                            "CustomFusion(fn)")
        return super().__new__(cls)

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        tag = cls.__dict__.get("TYPE")
        if tag:
            _FUSION_TYPES[tag] = cls

    @classmethod
    def types(cls) -> Tuple[str, ...]:
        """The ``"type"`` tags, in definition order."""
        return tuple(_FUSION_TYPES)

    @classmethod
    def _lookup(cls, tag: Any, owner: str) -> Any:
        sub = _FUSION_TYPES.get(tag.strip().lower()) if isinstance(tag, str) else None
        if sub is None:
            shown = " | ".join(repr(t) for t in _FUSION_TYPES)
            raise ConfigError(f"{owner}.type must be one of {shown}, got {tag!r}")
        return sub

    def to_dict(self) -> Dict[str, Any]:
        out: Dict[str, Any] = {"type": self.TYPE}
        out.update(super().to_dict())
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]):
        """Build a strategy from its tagged dictionary (the tag is optional on a subclass)."""
        if not isinstance(data, Mapping):
            raise ConfigError(f"{cls.__name__}.from_dict expects a mapping of field names, "
                              f"got {type(data).__name__}")
        data = dict(data)
        tag = data.pop("type", None)
        if cls is FusionStrategy:
            if tag is None:
                raise ConfigError("FusionStrategy.type is missing: a fusion mapping needs "
                                  f"'type' ({' | '.join(map(repr, _FUSION_TYPES))})")
            return cls._lookup(tag, "FusionStrategy").from_dict(data)
        if tag is not None and cls._lookup(tag, cls.__name__) is not cls:
            raise ConfigError(f"{cls.__name__}.type must be {cls.TYPE!r}, got {tag!r}")
        return super().from_dict(data)

    @classmethod
    def from_name(cls, tag: str) -> "FusionStrategy":
        """The strategy of type ``tag`` with its default settings."""
        sub = cls._lookup(tag, "FusionStrategy")
        try:
            return sub()
        except TypeError:
            raise ConfigError(f"FusionStrategy.type {tag!r} needs arguments "
                              f"({sub.__name__}); give a mapping or an instance") from None

    @classmethod
    def _toml_nones(cls, data: Mapping[str, Any], *, writing: bool) -> Dict[str, Any]:
        if cls is FusionStrategy:
            tag = data.get("type")
            sub = _FUSION_TYPES.get(tag.strip().lower()) if isinstance(tag, str) else None
            return sub._toml_nones(data, writing=writing) if sub else dict(data)
        return super()._toml_nones(data, writing=writing)


@_config
class EarlyFusion(FusionStrategy):
    """Fuse before encoding: the projected token sequences of all modalities are concatenated
    (in modality order) and encoded together.

    Examples
    --------
    >>> from mmcore.config import EarlyFusion
    >>> EarlyFusion().to_dict()
    {'type': 'early'}
    """

    TYPE: ClassVar[str] = "early"

    def validate(self) -> None:
        pass


@_config
class MiddleFusion(FusionStrategy):
    """Fuse inside the encoders: each modality runs ``fusion_layer`` blocks of its own encoder,
    then the token sequences are joined and the remaining blocks run on the joint sequence.

    Parameters
    ----------
    fusion_layer : int
        Blocks before fusing (>= 0); at most the ``encoder_config.num_layers`` of every
        modality. Only built-in encoders expose their blocks, so every modality of a
        :class:`MultiModalConfig` with middle fusion must use ``encoder="builtin"``.

    Examples
    --------
    >>> from mmcore.config import MiddleFusion
    >>> MiddleFusion(fusion_layer=-1)
    Traceback (most recent call last):
    ...
    mmcore.errors.ConfigError: MiddleFusion.fusion_layer must be an integer >= 0, got -1
    """

    fusion_layer: int
    TYPE: ClassVar[str] = "middle"

    def validate(self) -> None:
        self._set("fusion_layer", check_int(self._owner(), "fusion_layer", self.fusion_layer,
                                            minimum=0))


@_config
class LateFusion(FusionStrategy):
    """Fuse after encoding: the pooled embeddings of the modalities are reduced into one
    (``mmcore.ops.fuse``).

    Parameters
    ----------
    reduce : {"mean", "sum", "max", "concat", "weighted", "attention"}, default "mean"
        The reduction over modalities. "concat" keeps every modality's width and joins them in
        modality order (a disabled or missing modality contributes zeros, so the width does
        not change at run time); the others need one common width (``fused_dim``).
        "attention" scores modalities with one learned query (softmax over modalities).
    weights : dict of Modality -> float or None, default None
        Fixed weights for ``reduce="weighted"`` (finite, >= 0, not all 0); None: the weights
        come from the model's weights file, or are uniform. Only with "weighted".

    Examples
    --------
    >>> from mmcore.config import LateFusion
    >>> LateFusion(reduce="weighted", weights={"text": 2, "image": 1}).to_dict()
    {'type': 'late', 'reduce': 'weighted', 'weights': {'text': 2.0, 'image': 1.0}}
    """

    reduce: str = "mean"
    weights: Optional[Mapping[Modality, float]] = None

    TYPE: ClassVar[str] = "late"
    REDUCTIONS: ClassVar[Tuple[str, ...]] = ("mean", "sum", "max", "concat", "weighted",
                                             "attention")
    _OPTIONAL_FIELDS: ClassVar[Tuple[str, ...]] = ("weights",)

    def validate(self) -> None:
        owner = self._owner()
        self._set("reduce", check_choice(owner, "reduce", self.reduce, self.REDUCTIONS))
        w = self.weights
        if w is None:
            return
        if self.reduce != "weighted":
            raise _fail(owner, "weights", "applies to reduce='weighted' only (this is "
                        f"reduce={self.reduce!r})", w)
        if not isinstance(w, Mapping) or not w:
            raise _fail(owner, "weights", "must be a non-empty dict of Modality -> weight", w)
        items = []
        for key, value in w.items():
            m = check_modality(owner, "weights", key)
            if (isinstance(value, bool) or not isinstance(value, numbers.Real)
                    or not math.isfinite(float(value)) or float(value) < 0):
                raise _fail(owner, f"weights[{str(m)!r}]", "must be a finite number >= 0",
                            value)
            items.append((m, float(value)))
        try:
            wm = ModalityMap(items)
        except ModalityError as exc:
            raise _fail(owner, "weights", f"has a modality twice ({exc})", dict(w)) from None
        if not any(v > 0 for v in wm.values()):
            raise _fail(owner, "weights", "must have at least one weight > 0", dict(w))
        self._set("weights", wm)


@_config
class AttentionFusion(FusionStrategy):
    """Fuse by attention over the token sequences of all modalities: a learned query attends,
    with ``num_heads`` heads of total width ``attention_dim``, to the projected tokens of
    every enabled modality; the result is projected to the common width.

    Parameters
    ----------
    attention_dim : int, default 512
        Width of the attention (>= 1, divisible by ``num_heads``).
    num_heads : int, default 8

    Examples
    --------
    >>> from mmcore.config import AttentionFusion
    >>> AttentionFusion(attention_dim=500)
    Traceback (most recent call last):
    ...
    mmcore.errors.ConfigError: AttentionFusion.attention_dim must be divisible by num_heads=8, got 500
    """

    attention_dim: int = 512
    num_heads: int = 8
    TYPE: ClassVar[str] = "attention"

    def validate(self) -> None:
        owner = self._owner()
        self._set("attention_dim", check_int(owner, "attention_dim", self.attention_dim))
        self._set("num_heads", check_int(owner, "num_heads", self.num_heads))
        if self.attention_dim % self.num_heads:
            raise _fail(owner, "attention_dim", f"must be divisible by num_heads="
                        f"{self.num_heads}", self.attention_dim)


@_config
class CustomFusion(FusionStrategy):
    """Fuse with a function of your own.

    The model calls ``fn(embeddings, **options)`` with ``embeddings`` a dict of
    :class:`~mmcore.modality.Modality` -> pooled embedding ``(B, D)`` float32 array (enabled
    modalities that are present, in modality order; each already projected to the common
    width) and expects a ``(B, D_out)`` array back.

    Parameters
    ----------
    fn : callable or str
        The function, or the name it was registered under (:func:`register_fusion`). A
        registered function is stored by its name (so ``fn`` then holds the name;
        :meth:`resolve` gives the function). A function that is not registered works in
        memory, but the config cannot be saved (:meth:`to_dict` raises ConfigError).
        A name must be registered when the config is built.
    options : dict, default {}
        JSON-friendly keyword arguments passed to the function.

    Examples
    --------
    >>> from mmcore.config import CustomFusion, register_fusion, unregister_fusion
    >>> _ = register_fusion("pick_text", lambda e, **o: e["text"])
    >>> CustomFusion("pick_text", options={"scale": 2}).to_dict()
    {'type': 'custom', 'fn': 'pick_text', 'options': {'scale': 2}}
    >>> _ = unregister_fusion("pick_text")
    >>> CustomFusion("pick_text")
    Traceback (most recent call last):
    ...
    mmcore.errors.ConfigError: CustomFusion.fn: fusion 'pick_text' is not registered (registered: none); call mmcore.config.register_fusion(name, fn) first
    """

    fn: Any
    options: Dict[str, Any] = field(default_factory=dict)
    TYPE: ClassVar[str] = "custom"

    def validate(self) -> None:
        owner = self._owner()
        fn = self.fn
        if isinstance(fn, str):
            try:
                get_fusion(fn)
            except ConfigError as exc:
                raise ConfigError(f"{owner}.fn: {exc}") from None
        elif callable(fn):
            name = _registered_name(fn)
            if name is not None:
                self._set("fn", name)
        else:
            raise _fail(owner, "fn", "must be a callable or the name of a registered fusion",
                        fn)
        self._set("options", _check_extra(owner, "options", self.options))

    @property
    def name(self) -> Optional[str]:
        """The registered name of the function, or None."""
        return self.fn if isinstance(self.fn, str) else _registered_name(self.fn)

    def resolve(self) -> Callable[..., Any]:
        """The function itself (looked up in the registry when stored by name)."""
        if isinstance(self.fn, str):
            try:
                return get_fusion(self.fn)
            except ConfigError as exc:
                raise ConfigError(f"{self._owner()}.fn: {exc}") from None
        return self.fn

    def to_dict(self) -> Dict[str, Any]:
        name = self.name
        if name is None:
            raise ConfigError(f"{self._owner()}.fn: the callable {self.fn!r} is not registered, "
                              "so the config cannot be written; register it with "
                              "mmcore.config.register_fusion(name, fn)")
        return {"type": self.TYPE, "fn": name, "options": _plain(self.options)}

    def _hash_key(self) -> Any:
        key = self.fn if isinstance(self.fn, str) else ("callable", _hash_part(self.fn))
        return (key, _hash_part(self.options))


# --------------------------------------------------------------------------------------------
# the whole model

@_config
class MultiModalConfig(ConfigBase):
    """The configuration of a multi-modal model.

    Parameters
    ----------
    modalities : dict of Modality -> ModalityConfig, or list of ModalityConfig
        The configured modalities (at least one enabled; none twice). Dictionary keys may be
        string forms and values mappings of :class:`ModalityConfig` fields (the key supplies
        ``modality``). Stored as a :class:`ModalityMap` in modality order.
    fusion : FusionStrategy, mapping or str, default LateFusion()
        A strategy, its tagged mapping (``{"type": "late", "reduce": "max"}``), or a type tag
        whose defaults suffice (``"early"``, ``"late"``, ``"attention"``).
    cross_attention : CrossModalAttentionConfig, mapping or None, default None
        Cross-modal attention between the token sequences before fusion; None: none.
    fused_dim : int or None, default None
        The common width modality embeddings are projected to before fusion (a learned linear
        map per modality whose ``embed_dim`` differs). None: no projection, so all modalities
        must share one ``embed_dim``, except with ``LateFusion(reduce="concat")``, which joins
        the embeddings as they are.
    cache : CacheConfig or mapping, default CacheConfig()
        The tensor cache (its per-modality entries must name configured modalities).
    name : str, default "multimodal"
    version : str, default "1.0"
        Name and version of the model (free-form, written to and read from files).
    extra : dict, default {}
        Free-form, JSON-friendly options.

    Notes
    -----
    Cross-field checks (ConfigError naming the field): at least one enabled modality;
    cross-attention pairs, late-fusion weights and cache entries name configured modalities;
    with ``head_dim=None`` the cross-attention heads divide the ``embed_dim`` of every query
    modality; ``MiddleFusion.fusion_layer`` is at most every modality's encoder depth (and
    every encoder is built-in); differing ``embed_dim`` need ``fused_dim`` (but for concat);
    a modality's cache entry is set in one place; the per-modality cache budgets fit the
    global one. All checks but the first cover every configured modality, enabled or not, so
    switching modalities on and off at run time never makes a valid config invalid.

    Files: :meth:`to_dict` writes ``modalities`` as a table keyed by string form (``"text"``,
    ``"custom:7"``) without the inner ``modality`` key; :meth:`to_json` / :meth:`to_toml`
    write files that :meth:`from_json` / :meth:`from_toml` read back.

    Examples
    --------
    >>> from mmcore.config import (MultiModalConfig, ModalityConfig, CrossModalAttentionConfig,
    ...                            AttentionFusion)
    >>> from mmcore.modality import Modality
    >>> cfg = MultiModalConfig(
    ...     {Modality.TEXT: ModalityConfig(Modality.TEXT, embed_dim=512),
    ...      "image": {"embed_dim": 768, "encoder_config": {"num_heads": 12}}},
    ...     fusion=AttentionFusion(attention_dim=256),
    ...     cross_attention=CrossModalAttentionConfig(pairs=[("text", "image")]),
    ...     fused_dim=512)
    >>> cfg.output_dim, [str(m) for m in cfg.enabled_modalities()]
    (512, ['text', 'image'])
    >>> off = cfg.with_enabled(Modality.IMAGE, False)
    >>> [str(m) for m in off.enabled_modalities()], off.cross_attention_pairs()
    (['text'], ())
    >>> MultiModalConfig([ModalityConfig("text"), ModalityConfig("image", embed_dim=768)])
    Traceback (most recent call last):
    ...
    mmcore.errors.ConfigError: MultiModalConfig.fused_dim must be set when the modality embed dims differ ('text'=512, 'image'=768): each modality is projected to fused_dim before fusion, got None
    """

    modalities: Any
    fusion: FusionStrategy = field(default_factory=lambda: LateFusion())
    cross_attention: Optional[CrossModalAttentionConfig] = None
    fused_dim: Optional[int] = None
    cache: CacheConfig = field(default_factory=CacheConfig)
    name: str = "multimodal"
    version: str = "1.0"
    extra: Dict[str, Any] = field(default_factory=dict)

    _OPTIONAL_FIELDS: ClassVar[Tuple[str, ...]] = ("cross_attention", "fused_dim")
    _NESTED: ClassVar[Dict[str, Tuple[str, Any]]] = {
        "modalities": ("map", ModalityConfig), "fusion": ("one", FusionStrategy),
        "cross_attention": ("one", CrossModalAttentionConfig), "cache": ("one", CacheConfig)}

    # -- validation ----------------------------------------------------------------------------
    def validate(self) -> None:
        owner = self._owner()
        self._set("modalities", self._check_modalities(self.modalities))
        fusion = self.fusion
        if isinstance(fusion, str):
            try:
                fusion = FusionStrategy.from_name(fusion)
            except ConfigError as exc:
                raise ConfigError(f"{owner}.fusion: {exc}") from None
        self._set("fusion", _nested(owner, "fusion", fusion, FusionStrategy))
        self._set("cross_attention", _nested(owner, "cross_attention", self.cross_attention,
                                             CrossModalAttentionConfig, optional=True))
        self._set("fused_dim", _check_opt_int(owner, "fused_dim", self.fused_dim))
        self._set("cache", _nested(owner, "cache", self.cache, CacheConfig))
        self._set("name", _check_text(owner, "name", self.name))
        self._set("version", _check_text(owner, "version", self.version))
        self._set("extra", _check_extra(owner, "extra", self.extra))
        self._check_cross_fields()

    def _check_modalities(self, mods: Any) -> ModalityMap:
        owner = self._owner()
        items: List[Tuple[Modality, ModalityConfig]] = []
        if isinstance(mods, Mapping):
            for key, value in mods.items():
                m = check_modality(owner, "modalities", key)
                where = f"modalities[{str(m)!r}]"
                if isinstance(value, Mapping):
                    given = value.get("modality", m)
                    try:
                        given_m = Modality(given)
                    except ModalityError:
                        given_m = None
                    if given_m != m:
                        raise _fail(owner, f"{where}.modality", f"must be {str(m)!r} (its key)",
                                    given)
                    value = dict(value, modality=m)
                mc = _nested(owner, where, value, ModalityConfig)
                if mc.modality != m:
                    raise _fail(owner, f"{where}.modality", f"must be {str(m)!r} (its key)",
                                str(mc.modality))
                items.append((m, mc))
        elif isinstance(mods, (list, tuple)):
            for i, value in enumerate(mods):
                mc = _nested(owner, f"modalities[{i}]", value, ModalityConfig)
                items.append((mc.modality, mc))
        else:
            raise _fail(owner, "modalities", "must be a dict of Modality -> ModalityConfig or "
                        "a list of ModalityConfig", mods)
        if not items:
            raise _fail(owner, "modalities", "must configure at least one modality", mods)
        seen = set()
        for m, _ in items:
            if m in seen:
                raise _fail(owner, "modalities", f"configures modality {str(m)!r} more than "
                            "once", [str(x) for x, _ in items])
            seen.add(m)
        return ModalityMap(items)

    def _check_cross_fields(self) -> None:
        owner = self._owner()
        mods: ModalityMap = self.modalities
        configured = _names(mods)
        if not any(mc.enabled for mc in mods.values()):
            raise _fail(owner, "modalities", "must have at least one enabled modality",
                        {str(m): "disabled" for m in mods})

        ca = self.cross_attention
        if ca is not None:
            if ca.pairs != "all":
                for q, c in ca.pairs:
                    for m in (q, c):
                        if m not in mods:
                            raise _fail(owner, "cross_attention.pairs", f"must name configured "
                                        f"modalities ({configured}); {str(m)!r} is not",
                                        (str(q), str(c)))
            if ca.head_dim is None:
                for q, _ in ca.resolve_pairs(mods):
                    d = mods[q].embed_dim
                    if d % ca.num_heads:
                        raise _fail(owner, "cross_attention.num_heads", "must divide the "
                                    f"embed_dim of query modality {str(q)!r} ({d}) when "
                                    "head_dim is None", ca.num_heads)

        fusion = self.fusion
        if isinstance(fusion, MiddleFusion):
            for m, mc in mods.items():
                if mc.encoder != "builtin":
                    raise _fail(owner, "fusion", "MiddleFusion needs built-in encoders "
                                f"(modality {str(m)!r} uses encoder={mc.encoder!r})",
                                fusion)
                if fusion.fusion_layer > mc.encoder_config.num_layers:
                    raise _fail(owner, "fusion.fusion_layer", "must be <= the encoder layers "
                                f"of every modality ({str(m)!r} has encoder_config.num_layers="
                                f"{mc.encoder_config.num_layers})", fusion.fusion_layer)
        if isinstance(fusion, LateFusion) and fusion.weights is not None:
            for m in fusion.weights:
                if m not in mods:
                    raise _fail(owner, "fusion.weights", f"must name configured modalities "
                                f"({configured}); {str(m)!r} is not", str(m))
        if self.fused_dim is None and not self._is_concat():
            dims = {mc.embed_dim for mc in mods.values()}
            if len(dims) > 1:
                shown = ", ".join(f"{str(m)!r}={mc.embed_dim}" for m, mc in mods.items())
                raise _fail(owner, "fused_dim", f"must be set when the modality embed dims "
                            f"differ ({shown}): each modality is projected to fused_dim "
                            "before fusion", None)

        cache = self.cache
        for m in cache.per_modality:
            if m not in mods:
                raise _fail(owner, "cache.per_modality", f"must name configured modalities "
                            f"({configured}); {str(m)!r} is not", str(m))
        total = 0
        for m, mc in mods.items():
            pol = cache.policy_for(m) if m in cache.per_modality else mc.cache
            if mc.cache is not None:
                if m in cache.per_modality:
                    raise _fail(owner, f"modalities[{str(m)!r}].cache", "conflicts with "
                                f"cache.per_modality[{str(m)!r}]; set the policy in one place",
                                mc.cache)
                if (mc.cache.budget_bytes is not None
                        and mc.cache.budget_bytes > cache.global_budget_bytes):
                    raise _fail(owner, f"modalities[{str(m)!r}].cache.budget_bytes",
                                f"must be <= cache.global_budget_bytes="
                                f"{cache.global_budget_bytes}", mc.cache.budget_bytes)
            if pol is not None and pol.budget_bytes is not None:
                total += pol.budget_bytes
        if total > cache.global_budget_bytes:
            raise _fail(owner, "cache.global_budget_bytes", "must be >= the sum of the "
                        f"per-modality budgets ({total})", cache.global_budget_bytes)

    def _is_concat(self) -> bool:
        return isinstance(self.fusion, LateFusion) and self.fusion.reduce == "concat"

    # -- conversion ------------------------------------------------------------------------------
    def to_dict(self) -> Dict[str, Any]:
        out = super().to_dict()
        out["modalities"] = {
            str(m): {k: v for k, v in mc.to_dict().items() if k != "modality"}
            for m, mc in self.modalities.items()}
        return out

    # -- queries -----------------------------------------------------------------------------------
    def modality_config(self, modality: Any) -> ModalityConfig:
        """The :class:`ModalityConfig` of ``modality`` (ModalityError if not configured)."""
        m = Modality(modality)
        if m not in self.modalities:
            raise ModalityError(f"modality {str(m)!r} is not configured (configured: "
                                f"{_names(self.modalities)})")
        return self.modalities[m]

    def enabled_modalities(self) -> Tuple[Modality, ...]:
        """The enabled modalities, in modality order."""
        return tuple(m for m, mc in self.modalities.items() if mc.enabled)

    def is_enabled(self, modality: Any) -> bool:
        """Whether ``modality`` is configured and enabled."""
        try:
            m = Modality(modality)
        except ModalityError:
            return False
        return m in self.modalities and self.modalities[m].enabled

    def with_enabled(self, modality: Any, enabled: bool = True) -> "MultiModalConfig":
        """A copy with ``modality`` switched on or off (validated again).

        Raises
        ------
        ModalityError
            If ``modality`` is not configured.
        ConfigError
            If the switch leaves no enabled modality, or disables a required one.
        """
        mc = self.modality_config(modality)
        mods = dict(self.modalities)
        mods[mc.modality] = mc.replace(enabled=enabled)
        return self.replace(modalities=mods)

    def cache_policy(self, modality: Any) -> CachePolicy:
        """The cache policy of ``modality``: ``ModalityConfig.cache``, else
        ``cache.per_modality``, else ``cache.default``."""
        mc = self.modality_config(modality)
        return mc.cache if mc.cache is not None else self.cache.policy_for(mc.modality)

    def cross_attention_pairs(self, *, enabled_only: bool = True
                              ) -> Tuple[Tuple[Modality, Modality], ...]:
        """The (query, context) pairs that run: among the enabled (or all configured)
        modalities; empty without cross-attention."""
        if self.cross_attention is None:
            return ()
        mods = self.enabled_modalities() if enabled_only else tuple(self.modalities)
        return self.cross_attention.resolve_pairs(mods)

    @property
    def common_dim(self) -> Optional[int]:
        """The width every modality embedding is brought to before fusion: ``fused_dim``, else
        the shared ``embed_dim``; None for concat over differing widths."""
        if self.fused_dim is not None:
            return self.fused_dim
        dims = {mc.embed_dim for mc in self.modalities.values()}
        return dims.pop() if len(dims) == 1 else None

    @property
    def output_dim(self) -> int:
        """Width of the fused embedding: the sum over configured modalities for concat, else
        :attr:`common_dim` (a :class:`CustomFusion` function is expected to keep it)."""
        if self._is_concat():
            return sum(self.fused_dim if self.fused_dim is not None else mc.embed_dim
                       for mc in self.modalities.values())
        return self.common_dim  # type: ignore[return-value]
