"""The preprocessing base class: a union of per-modality configs tagged by ``modality``.

:class:`PreprocessingConfig` is the base of :class:`AudioPreprocessingConfig`,
:class:`ImagePreprocessingConfig`, :class:`VideoPreprocessingConfig` and
:class:`TextPreprocessingConfig`, each holding only the fields of its modality. The tag is the
``modality`` field, written first by :meth:`~mmcore.config.ConfigBase.to_dict`;
``PreprocessingConfig(...)`` and :meth:`PreprocessingConfig.from_dict` pick the subclass from it
(``"audio"`` when it is missing), the way :class:`~mmcore.config.FusionStrategy` picks its
subclass from ``"type"``.

Files and code written for the single class that held every field keep working:

* a field of another modality given at its neutral value (None; ``padding="none"``) is
  dropped, so every file written before loads; any other value raises
  :class:`~mmcore.errors.ConfigError` naming the field, as before;
* the audio numbers (``sample_rate``, ``n_mels``, ``n_fft``, ``hop_length``), ``mono`` and
  ``truncation``, which every config used to carry and only some read, are accepted and
  dropped by the configs that do not read them (a :class:`DeprecationWarning` when the value is
  not the default);
* reading a field of another modality gives its former neutral value with a
  :class:`DeprecationWarning`; check ``modality`` (or the class) first instead.

Examples
--------
>>> from mmcore.config import PreprocessingConfig, ImagePreprocessingConfig
>>> img = PreprocessingConfig(modality="image", size=384)
>>> type(img).__name__, isinstance(img, PreprocessingConfig), img.size
('ImagePreprocessingConfig', True, 384)
>>> img.to_dict()["modality"], PreprocessingConfig.from_dict(img.to_dict()) == img
('image', True)
>>> ImagePreprocessingConfig(size=384) == img
True
"""

from __future__ import annotations

import dataclasses
import functools
import os
import sys
import warnings
from dataclasses import dataclass
from typing import Any, ClassVar, Dict, FrozenSet, Mapping, Optional, Tuple, Type, TypeVar

from ...errors import ConfigError
from ..base import ConfigBase, config_dataclass, dataclass_transform
from ..checks import check_bool, check_extra, fail
from ..serialization import TOML_NONE

__all__ = ["PreprocessingConfig", "MODALITY_DEFAULT", "preprocessing_dataclass"]

_P = TypeVar("_P", bound="PreprocessingConfig")


class _ModalityDefault:
    """Sentinel default: the value is derived from the other fields on construction."""

    _instance = None

    def __new__(cls) -> "_ModalityDefault":
        if cls._instance is None:
            cls._instance = super().__new__(cls)
        return cls._instance

    def __repr__(self) -> str:
        return "<modality default>"

    def __reduce__(self) -> Any:
        return (_ModalityDefault, ())


#: Sentinel default of a field whose value is derived on construction (an audio config's
#: ``chunk_length_s`` from its preset, say; a :class:`~mmcore.config.ModalityConfig`'s
#: ``preprocessing`` from its modality).
MODALITY_DEFAULT: Any = _ModalityDefault()

# modality tag -> subclass, in definition order (audio, image, video, text)
_TYPES: Dict[str, Type["PreprocessingConfig"]] = {}

# Fields every config used to carry (with these defaults) although only some modalities read
# them: a config that does not read one accepts it and drops it.
_CARRIED: Dict[str, Any] = {"sample_rate": 16000, "n_mels": 80, "n_fft": 400,
                            "hop_length": 160, "mono": True, "truncation": True}
# the neutral value a field of another modality used to hold (None unless listed)
_NEUTRAL: Dict[str, Any] = {"padding": "none"}
# read-only values of the former single class that only some modalities have
_DERIVED_READS: Dict[str, Any] = {"target_length": None, "max_samples": None}


@functools.lru_cache(maxsize=None)
def _field_owners(registered: Tuple[str, ...]) -> Dict[str, Tuple[str, ...]]:
    """Field name -> the modality tags whose configs have it (``registered``: the tags, the
    cache key)."""
    owners: Dict[str, Tuple[str, ...]] = {}
    for tag in registered:
        for f in dataclasses.fields(_TYPES[tag]):
            if f.name != "modality":
                owners[f.name] = owners.get(f.name, ()) + (tag,)
    return owners


#: The field order of the former single class, which positional arguments still follow.
_LEGACY_ORDER = (
    "modality", "preset", "sample_rate", "n_mels", "n_fft", "hop_length", "chunk_length_s",
    "padding", "max_length_s", "truncation", "mono", "extra", "size", "crop_size", "resize_mode",
    "filter", "mean", "std", "patch_size", "num_frames", "fps", "sampling", "min_frames",
    "max_frames", "temporal_patch", "tokenizer", "max_length", "padding_side", "add_eos")

_CONFIG_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _user_stacklevel() -> int:
    """The ``stacklevel`` that makes a warning raised by the caller of this function point at
    the first frame outside the :mod:`mmcore.config` package (the user's line)."""
    frame = sys._getframe(1)
    level = 1
    while frame is not None and os.path.abspath(frame.f_code.co_filename).startswith(_CONFIG_DIR):
        frame = frame.f_back  # type: ignore[assignment]
        level += 1
    return level


def _owners() -> Dict[str, Tuple[str, ...]]:
    return _field_owners(tuple(_TYPES))


def _same(value: Any, default: Any) -> bool:
    try:
        return bool(value == default)
    except Exception:  # an array, say
        return False


def _modality_name(value: Any) -> Optional[str]:
    """The lower-case tag named by ``value`` (a str or e.g. a Modality), or None."""
    if not isinstance(value, str) and value is not None and not isinstance(value, bool):
        value = str(value)  # e.g. a Modality object, whose str() is its name
    if not isinstance(value, str):
        return None
    return value.lower()


@dataclass(frozen=True)
class PreprocessingConfig(ConfigBase):
    """How raw inputs of one modality become model features (the base of a tagged union).

    ``PreprocessingConfig(modality=..., **fields)`` builds the config of that modality:
    an :class:`AudioPreprocessingConfig` (the default), :class:`ImagePreprocessingConfig`,
    :class:`VideoPreprocessingConfig` or :class:`TextPreprocessingConfig`; each documents its
    fields. Every one of them is a ``PreprocessingConfig`` with a ``modality`` tag.

    A field of another modality raises :class:`~mmcore.errors.ConfigError` naming it, unless
    it holds that field's former neutral value (None, or ``padding="none"``), which is dropped
    so that files written by earlier versions load.

    Parameters
    ----------
    modality : {"audio", "image", "video", "text"}, default "audio"
        The input modality (a :class:`str` or any object whose ``str()`` is the name).
    **fields
        The fields of that modality's config.

    Raises
    ------
    ConfigError
        On construction, naming the first invalid field.

    Examples
    --------
    >>> from mmcore.config import PreprocessingConfig
    >>> cfg = PreprocessingConfig(preset=None, n_mels=128, padding="longest")
    >>> type(cfg).__name__, cfg.chunk_length_s is None
    ('AudioPreprocessingConfig', True)
    >>> PreprocessingConfig(n_mels=0)
    Traceback (most recent call last):
    ...
    mmcore.errors.ConfigError: PreprocessingConfig.n_mels must be an integer >= 1, got 0
    >>> img = PreprocessingConfig(modality="image", preset="siglip", size=384)
    >>> img.size, img.preset
    (384, 'siglip')
    >>> vid = PreprocessingConfig(modality="video", fps=2.0)
    >>> vid.sampling, vid.num_frames, vid.temporal_patch
    ('fps', None, 2)
    >>> PreprocessingConfig(modality="text", max_length=128, padding="max_length").tokenizer
    'byte'
    >>> PreprocessingConfig(modality="text", size=224)
    Traceback (most recent call last):
    ...
    mmcore.errors.ConfigError: PreprocessingConfig.size applies to modality 'image' | 'video' only (this config is 'text'), got 224
    """  # noqa: E501

    modality: str = "audio"

    #: the ``modality`` tag of a subclass ("" on the base and on shared intermediate classes)
    MODALITY: ClassVar[str] = ""

    AUDIO_PRESETS: ClassVar[Tuple[Optional[str], ...]] = ("whisper", "fbank", None)
    IMAGE_PRESETS: ClassVar[Tuple[Optional[str], ...]] = ("clip", "siglip", "imagenet", None)
    RESIZE_MODES: ClassVar[Tuple[str, ...]] = ("shortest_edge", "squash")
    IMAGE_FILTERS: ClassVar[Tuple[str, ...]] = ("nearest", "bilinear", "bicubic", "lanczos")
    VIDEO_SAMPLING: ClassVar[Tuple[str, ...]] = ("uniform", "fps")
    PADDING_MODES: ClassVar[Tuple[str, ...]] = ("max_length", "longest", "none")
    TEXT_PADDING_MODES: ClassVar[Tuple[str, ...]] = ("longest", "max_length")
    PADDING_SIDES: ClassVar[Tuple[str, ...]] = ("right", "left")

    # -- the tagged union ------------------------------------------------------------------
    def __new__(cls, *args: Any, **kwargs: Any) -> Any:
        if cls is PreprocessingConfig:
            cls = cls.subclass(args[0] if args else kwargs.get("modality", "audio"))
        elif not cls.MODALITY:
            raise TypeError(f"{cls.__name__} is abstract: use PreprocessingConfig(modality=...)")
        return super().__new__(cls)

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        tag = cls.__dict__.get("MODALITY")
        if tag:
            _TYPES[tag] = cls

    @classmethod
    def types(cls) -> Tuple[str, ...]:
        """The ``modality`` tags, in definition order."""
        return tuple(_TYPES)

    @classmethod
    def subclass(cls, modality: Any) -> Type["PreprocessingConfig"]:
        """The config class of ``modality`` (ConfigError naming ``modality`` if unknown).

        Examples
        --------
        >>> from mmcore.config import PreprocessingConfig
        >>> PreprocessingConfig.subclass("Video").__name__
        'VideoPreprocessingConfig'
        """
        sub = _TYPES.get(_modality_name(modality) or "")
        if sub is None:
            known = " | ".join(repr(m) for m in _TYPES)
            raise fail(cls._owner(), "modality", f"must be one of {known}", modality)
        return sub

    @classmethod
    def field_names(cls, modality: Any = None) -> FrozenSet[str]:
        """The field names of ``modality``'s config (of this class when None; of every
        modality when called on the base with None).

        Examples
        --------
        >>> from mmcore.config import PreprocessingConfig
        >>> sorted(PreprocessingConfig.field_names("text"))[:3]
        ['add_eos', 'extra', 'max_length']
        >>> "size" in PreprocessingConfig.field_names()
        True
        """
        if modality is not None:
            return cls.subclass(modality).field_names()
        if not cls.MODALITY:
            return frozenset(_owners()) | {"modality"}
        return frozenset(f.name for f in dataclasses.fields(cls) if f.init)

    @classmethod
    def _owner(cls) -> str:
        # every subclass reports as PreprocessingConfig, as the single class did
        return "PreprocessingConfig"

    @classmethod
    def _drop_other_fields(cls, kwargs: Dict[str, Any]) -> Dict[str, Any]:
        """``kwargs`` without the fields of other modalities, which must be neutral (see the
        module docstring); raises ConfigError naming a field that is not."""
        own = cls.field_names()
        owners = _owners()
        out = dict(kwargs)
        for name in kwargs:
            if name in own or name not in owners:
                continue  # unknown names reach __init__, which refuses them
            value = out.pop(name)
            if name in _CARRIED:
                if name in ("mono", "truncation"):
                    value = check_bool(cls._owner(), name, value)
                if value is MODALITY_DEFAULT or _same(value, _CARRIED[name]):
                    continue
                warnings.warn(f"[PreprocessingConfig] {name}={value!r} is ignored by "
                              f"{cls.MODALITY!r} configs (it belongs to "
                              f"{' | '.join(map(repr, owners[name]))}); passing it is "
                              "deprecated", DeprecationWarning, stacklevel=_user_stacklevel())
                continue
            neutral = _NEUTRAL.get(name)
            if (value is MODALITY_DEFAULT or value is None
                    or (isinstance(value, str) and value == neutral)):
                continue
            shown = " | ".join(repr(m) for m in owners[name])
            raise fail(cls._owner(), name, f"applies to modality {shown} only (this config is "
                       f"{cls.MODALITY!r})", value)
        return out

    def __setstate__(self, state: Any) -> None:
        # Unpickling builds the object with ``cls.__new__(cls)``: for a pickle of the former
        # single class that is the audio config, whatever modality the state holds. Move the
        # object to the class of its modality and keep that class's fields (the others must
        # be neutral, as on construction).
        if not isinstance(state, dict):
            raise ConfigError(f"{self._owner()}: cannot restore a config from "
                              f"{type(state).__name__} state")
        sub = PreprocessingConfig.subclass(state.get("modality", type(self).MODALITY or "audio"))
        if type(self) is not sub:
            object.__setattr__(self, "__class__", sub)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            kept = sub._drop_other_fields(state)
        self.__dict__.update(kept)

    def __getattr__(self, name: str) -> Any:
        # only reached for names that are not attributes: the fields of other modalities
        if name in _DERIVED_READS or name in _CARRIED or name in _owners():
            cls = type(self)
            if cls.MODALITY and name not in cls.field_names():
                value = _DERIVED_READS.get(name, _CARRIED.get(name, _NEUTRAL.get(name)))
                warnings.warn(f"[PreprocessingConfig] {name!r} is not a field of "
                              f"{cls.MODALITY!r} configs; reading it is deprecated (it gives "
                              f"{value!r}): check .modality first",
                              DeprecationWarning, stacklevel=2)
                return value
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    # -- validation ------------------------------------------------------------------------
    def validate(self) -> None:
        owner = self._owner()
        tag = type(self).MODALITY
        if _modality_name(self.modality) != tag:
            if _modality_name(self.modality) not in _TYPES:
                type(self).subclass(self.modality)  # raises, naming the known modalities
            raise fail(owner, "modality", f"must be {tag!r} for {type(self).__name__} (use "
                       "PreprocessingConfig(modality=...) for another modality)", self.modality)
        self._set("modality", tag)
        self._set("extra", check_extra(owner, "extra", getattr(self, "extra", {})))
        self._validate_fields()

    def _validate_fields(self) -> None:  # pragma: no cover - every subclass overrides it
        """Check and normalize the fields of this modality."""

    # -- conversion ------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Any:
        """Build the config named by ``data["modality"]`` (default ``"audio"``) from a mapping
        of field names; unknown keys raise :class:`ConfigError` naming them."""
        if not isinstance(data, Mapping):
            raise ConfigError(f"{cls._owner()}.from_dict expects a mapping of field names, "
                              f"got {type(data).__name__}")
        if not cls.MODALITY:
            return cls.subclass(data.get("modality", "audio")).from_dict(data)
        known = cls.field_names()
        unknown = [k for k in data if k not in known and k not in _owners()]
        if unknown:
            raise ConfigError(f"{cls._owner()} has no field(s) "
                              f"{', '.join(repr(k) for k in unknown)} (put free-form options "
                              f"under 'extra'); known fields: {', '.join(sorted(known))}")
        return cls(**dict(data))

    @classmethod
    def _toml_nones(cls, data: Mapping[str, Any], *, writing: bool) -> Dict[str, Any]:
        if not cls.MODALITY:
            sub = _TYPES.get(_modality_name(data.get("modality", "audio")) or "")
            return sub._toml_nones(data, writing=writing) if sub else dict(data)
        out = super()._toml_nones(data, writing=writing)
        if not writing:
            # a file written by an earlier version holds "none" for the optional fields of
            # other modalities: None, which is then dropped as neutral
            own = cls.field_names()
            optional = {n for sub in _TYPES.values() for n in sub._OPTIONAL_FIELDS}
            for k, v in out.items():
                if (k not in own and k in optional and isinstance(v, str)
                        and v.lower() in TOML_NONE):
                    out[k] = None
        return out

    def replace(self: _P, **changes: Any) -> _P:
        """A copy with ``changes`` applied, validated again. A different ``modality`` gives
        that modality's config from these fields (those that do not apply there raise)."""
        if "modality" in changes:
            values = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
            values.update(changes)
            return PreprocessingConfig(**values)  # type: ignore[return-value]
        return dataclasses.replace(self, **changes)


@dataclass_transform(frozen_default=True)
def preprocessing_dataclass(cls: Any) -> Any:
    """:func:`~mmcore.config.base.config_dataclass` for a :class:`PreprocessingConfig`
    subclass: construction also drops the neutral fields of other modalities."""
    cls = config_dataclass(cls)
    init = cls.__init__

    @functools.wraps(init)
    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
        if len(args) > 1:
            # positional fields after ``modality`` follow the order of the former single class
            warnings.warn("[PreprocessingConfig] fields given by position after 'modality' are "
                          "deprecated (they follow the former field order); pass them by name",
                          DeprecationWarning, stacklevel=_user_stacklevel())
            if len(args) > len(_LEGACY_ORDER):
                raise ConfigError(f"PreprocessingConfig takes at most {len(_LEGACY_ORDER)} "
                                  f"positional arguments, got {len(args)}")
            for name, value in zip(_LEGACY_ORDER, args):
                if name in kwargs:
                    raise ConfigError(f"PreprocessingConfig got {name!r} by position and by "
                                      "name")
                kwargs[name] = value
            args = ()
        init(self, *args, **type(self)._drop_other_fields(kwargs))

    cls.__init__ = __init__
    return cls
