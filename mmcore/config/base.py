"""The shared base of the config classes: validation on construction, conversion to and from
plain dictionaries, JSON and TOML files, ``replace``, and hashing.

Hashing: configs have one scheme with two forms.

* ``hash(cfg)`` (in-process, for dict keys and sets): equal configs hash equal, dict and list
  fields included (:func:`hash_part` turns every field into a hashable stand-in);
  :func:`config_dataclass` installs it. Like every Python hash it may differ between
  processes.
* :meth:`ConfigBase.digest` / :func:`config_digest` (stable, for keys that outlive a process
  or cross machines): a BLAKE2b digest of the canonical JSON (:func:`canonical_json`) of the
  plain form (:meth:`ConfigBase.to_dict`), the same in every process and on every machine.

Examples
--------
>>> from dataclasses import field
>>> from mmcore.config.base import ConfigBase, config_dataclass
>>> from mmcore.config.checks import check_int
>>> @config_dataclass
... class Demo(ConfigBase):
...     width: int = 8
...     tags: dict = field(default_factory=dict)
...     def validate(self) -> None:
...         self._set("width", check_int(self._owner(), "width", self.width))
>>> d = Demo(width=4, tags={"a": [1, 2]})
>>> d.to_dict(), Demo.from_dict(d.to_dict()) == d, hash(d) == hash(d.replace())
({'width': 4, 'tags': {'a': [1, 2]}}, True, True)
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Dict, Mapping, Optional, Tuple, Type, TypeVar

import numpy as np

from ..errors import ConfigError
from ..modality import Modality
from .serialization import (
    TOML_NONE,
    PathLike,
    check_depth,
    read_section,
    read_text,
    toml_dumps,
    toml_module,
    write_text_atomic,
)

__all__ = ["ConfigBase", "config_dataclass", "hash_part", "to_plain", "canonical_json",
           "config_digest"]

# domain of config_digest: a digest of a config never equals one of other bytes
_DIGEST_DOMAIN = b"mmcore.config.digest.v1\x00"

_C = TypeVar("_C", bound="ConfigBase")


class ConfigBase:
    """Behaviour shared by the config dataclasses.

    A subclass is a ``@dataclass(frozen=True)`` that implements :meth:`validate`, which checks
    and normalizes the fields (assigning with :meth:`_set`, since the instance is frozen) and
    raises :class:`ConfigError` naming the field. Nested configs are supported by
    :meth:`to_dict` (they become nested dictionaries); a subclass that holds them converts
    nested dictionaries back in :meth:`validate`.
    """

    # set on every subclass by @dataclass; declared for type checkers
    __dataclass_fields__: ClassVar[Dict[str, Any]]
    # the fields that accept None (TOML writes None as "none" in them)
    _OPTIONAL_FIELDS: ClassVar[Tuple[str, ...]] = ()

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
            out[f.name] = to_plain(getattr(self, f.name))
        return out

    @classmethod
    def from_dict(cls: Type[_C], data: Mapping[str, Any]) -> _C:
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
    def from_json(cls: Type[_C], path: PathLike, *, section: Optional[str] = None) -> _C:
        """Load from a JSON file: an object of field names, or such an object at ``section``.

        ``section`` is a dotted path of nested objects (``"preprocessing.audio"``).
        """
        text = read_text(cls._owner(), path)
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{cls._owner()}: {os.fspath(path)!s} is not valid JSON "
                              f"(line {exc.lineno}, column {exc.colno}: {exc.msg})") from None
        except RecursionError:
            data = None  # reported by check_depth below
        check_depth(cls._owner(), data, path, "JSON")
        return cls.from_dict(read_section(cls._owner(), data, section, path))

    @classmethod
    def from_toml(cls: Type[_C], path: PathLike, *, section: Optional[str] = None) -> _C:
        """Load from a TOML file: top-level keys, or the table at ``section`` (dotted path).

        TOML has no null: for a field that may be None, write the string ``"none"``. Parsing
        uses :mod:`tomllib` (Python 3.11+) or the ``tomli`` package on older Pythons.
        """
        toml = toml_module(cls._owner())
        text = read_text(cls._owner(), path)
        try:
            data = toml.loads(text)
        except RecursionError:
            data = None  # reported by check_depth below
        except Exception as exc:  # tomllib.TOMLDecodeError / tomli.TOMLDecodeError
            raise ConfigError(f"{cls._owner()}: {os.fspath(path)!s} is not valid TOML "
                              f"({exc})") from None
        check_depth(cls._owner(), data, path, "TOML")
        data = read_section(cls._owner(), data, section, path)
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
                  and v.lower() in TOML_NONE):
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
            write_text_atomic(type(self)._owner(), path, text)
        return text

    def to_toml(self, path: Optional[PathLike] = None) -> str:
        """The config as TOML text (:meth:`to_dict`); also written to ``path`` when given.

        TOML has no null: a field whose value is None is written as the string ``"none"``,
        which :meth:`from_toml` reads back as None. A None anywhere else (inside an ``extra``
        dictionary, say) cannot be written and raises :class:`ConfigError`. mmcore writes the
        TOML itself (no extra package needed); the file is written atomically.
        """
        data = type(self)._toml_nones(self.to_dict(), writing=True)
        text = toml_dumps(data, type(self)._owner())
        if path is not None:
            write_text_atomic(type(self)._owner(), path, text)
        return text

    def replace(self: _C, **changes: Any) -> _C:
        """A copy with ``changes`` applied, validated again."""
        return dataclasses.replace(self, **changes)

    def digest(self) -> str:
        """A stable hex digest of this config: equal configs (of the same class) give equal
        digests in every process; any change of a field changes it.

        It covers the class name and :meth:`to_dict` (see :func:`config_digest`), so a config
        that cannot be written (a :class:`CustomFusion` of an unregistered function) raises
        :class:`ConfigError` here too.

        Examples
        --------
        >>> from mmcore.config import CachePolicy
        >>> CachePolicy().digest() == CachePolicy(policy="LRU").digest()
        True
        >>> CachePolicy().digest() == CachePolicy(priority=1).digest()
        False
        """
        return config_digest({"type": type(self).__name__, "fields": self})

    def _hash_key(self) -> Any:
        """The hashable stand-in of the fields that ``hash()`` covers (a subclass may narrow
        it, as :class:`CustomFusion` does for its function)."""
        return tuple(hash_part(getattr(self, f.name)) for f in dataclasses.fields(self))


def hash_part(v: Any) -> Any:
    """A hashable stand-in for a field value that is equal whenever the values are."""
    if isinstance(v, ConfigBase):
        return hash(v)
    if isinstance(v, Modality):
        return str(v)
    if isinstance(v, Mapping):
        return ("map",) + tuple(sorted(((str(k), hash_part(x)) for k, x in v.items()),
                                       key=lambda kv: kv[0]))
    if isinstance(v, (list, tuple)):
        return ("seq",) + tuple(hash_part(x) for x in v)
    try:
        hash(v)
    except TypeError:
        return repr(v)
    return v


def _hash_by_dict(self: ConfigBase) -> int:
    # equal configs hash equal (usable as cache keys) even when they hold dicts or lists
    return hash((type(self).__name__, self._hash_key()))


if TYPE_CHECKING:    # tells type checkers the decorated classes are frozen dataclasses
    from typing_extensions import dataclass_transform
else:
    def dataclass_transform(**kwargs: Any) -> Any:
        return lambda fn: fn


@dataclass_transform(frozen_default=True)
def config_dataclass(cls: Any) -> Any:
    """``@dataclass(frozen=True)`` with a hash that also covers dict and list fields."""
    cls = dataclass(frozen=True)(cls)
    cls.__hash__ = _hash_by_dict
    return cls


def to_plain(v: Any) -> Any:
    """``v`` as plain JSON/TOML-friendly data (configs as dicts, modalities as strings)."""
    if isinstance(v, ConfigBase):
        return v.to_dict()
    if isinstance(v, Modality):
        return str(v)
    if isinstance(v, Mapping):
        return {str(k): to_plain(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [to_plain(x) for x in v]
    if isinstance(v, np.generic):
        return v.item()
    return copy.deepcopy(v)


def _json_default(o: Any) -> Any:
    if isinstance(o, np.ndarray):
        return {"__array__": o.dtype.str, "shape": list(o.shape), "values": o.tolist()}
    if isinstance(o, (np.integer, np.floating, np.bool_)):
        return o.item()
    return f"{type(o).__name__}:{o}"


def canonical_json(value: Any) -> str:
    """The canonical JSON text of ``value`` (configs as :meth:`~ConfigBase.to_dict`,
    modalities as strings): sorted keys, no spaces, UTF-8 kept; a value JSON cannot hold is
    written as ``"<type name>:<str(value)>"``.

    Examples
    --------
    >>> from mmcore.config.base import canonical_json
    >>> from mmcore.modality import Modality
    >>> canonical_json({"b": (1, 2.5), "a": Modality.TEXT})
    '{"a":"text","b":[1,2.5]}'
    """
    return json.dumps(to_plain(value), sort_keys=True, separators=(",", ":"),
                      ensure_ascii=False, default=_json_default)


def config_digest(value: Any) -> str:
    """The stable digest of a config, or of a mapping / sequence of configs and plain values:
    64 hex characters of BLAKE2b (32 bytes) over :func:`canonical_json`, after a domain tag.

    Use it for keys that describe configuration (cache keys, say) instead of ``hash()``,
    which changes between processes.

    Examples
    --------
    >>> from mmcore.config import EncoderConfig
    >>> from mmcore.config.base import config_digest
    >>> key = config_digest({"encoder": EncoderConfig(), "embed_dim": 512})
    >>> len(key), key == config_digest({"embed_dim": 512, "encoder": EncoderConfig()})
    (64, True)
    """
    h = hashlib.blake2b(digest_size=32)
    h.update(_DIGEST_DOMAIN)
    h.update(canonical_json(value).encode("utf-8", "surrogatepass"))
    return h.hexdigest()
