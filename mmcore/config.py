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
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
import sys
from dataclasses import dataclass, field
from typing import Any, ClassVar, Dict, Mapping, Optional, Sequence, Tuple, TypeVar, Union

import numpy as np

from .errors import ConfigError

__all__ = ["ConfigBase", "PreprocessingConfig"]

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
        except Exception as exc:  # tomllib.TOMLDecodeError / tomli.TOMLDecodeError
            raise ConfigError(f"{cls._owner()}: {os.fspath(path)!s} is not valid TOML ({exc})") from None
        data = dict(_section(cls, data, section, path))
        for f in dataclasses.fields(cls):
            v = data.get(f.name)
            if isinstance(v, str) and v.lower() in _TOML_NONE and cls._none_allowed(f.name):
                data[f.name] = None
        return cls.from_dict(data)

    @classmethod
    def _none_allowed(cls, name: str) -> bool:
        """Whether field ``name`` accepts None (so ``"none"`` in TOML means None)."""
        return name in getattr(cls, "_OPTIONAL_FIELDS", ())

    def replace(self: _C, **changes: Any) -> _C:
        """A copy with ``changes`` applied, validated again."""
        return dataclasses.replace(self, **changes)  # type: ignore[type-var]


def _plain(v: Any) -> Any:
    if isinstance(v, ConfigBase):
        return v.to_dict()
    if isinstance(v, Mapping):
        return {str(k): _plain(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    if isinstance(v, np.generic):
        return v.item()
    return copy.deepcopy(v)


def _read_text(cls, path: PathLike) -> str:
    try:
        with open(os.fspath(path), "r", encoding="utf-8") as f:
            return f.read()
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{cls._owner()}: cannot read config file {os.fspath(path)!s} "
                          f"({type(exc).__name__}: {exc})") from exc


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

    Only the audio modality exists so far. Audio is decoded, mixed to mono, resampled to
    ``sample_rate``, cut and padded per ``chunk_length_s`` / ``max_length_s`` / ``padding``, and
    turned into features by :class:`mmcore.preprocess.AudioPreprocessor`.

    Parameters
    ----------
    modality : str, default "audio"
        The input modality (a :class:`str` or any object whose ``str()`` is the name).
    preset : {"whisper", "fbank", None}, default "whisper"
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
        other padding modes.
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

    # modality name -> method validating that modality's fields (later modalities add entries)
    MODALITY_VALIDATORS: ClassVar[Dict[str, str]] = {"audio": "_validate_audio"}
    AUDIO_PRESETS: ClassVar[Tuple[Optional[str], ...]] = ("whisper", "fbank", None)
    PADDING_MODES: ClassVar[Tuple[str, ...]] = ("max_length", "longest", "none")
    _OPTIONAL_FIELDS: ClassVar[Tuple[str, ...]] = ("preset", "chunk_length_s", "max_length_s")

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
        self._set("truncation", check_bool(owner, "truncation", self.truncation))
        self._set("mono", check_bool(owner, "mono", self.mono))

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
