"""Field checks shared by the config classes.

Each check takes the ``owner`` (the config class name) and the field ``name``, returns the
normalized value, and raises :class:`~mmcore.errors.ConfigError` whose message starts with
``owner.name`` (``"EncoderConfig.num_heads must be an integer >= 1, got 0"``).

These are the config-side checks. The public ops check their arguments with
``mmcore.ops._checks`` instead, which raise :class:`~mmcore.errors.ArgumentError` with an
``[op]`` prefix and accept a wider set of number types; the two are kept apart on purpose.

Examples
--------
>>> from mmcore.config.checks import check_int, check_choice
>>> check_int("EncoderConfig", "num_layers", 3, minimum=0)
3
>>> check_choice("CachePolicy", "policy", "LRU", ("lru", "lfu"))
'lru'
>>> check_int("EncoderConfig", "num_heads", 0)
Traceback (most recent call last):
...
mmcore.errors.ConfigError: EncoderConfig.num_heads must be an integer >= 1, got 0
"""

from __future__ import annotations

import copy
import math
import numbers
from typing import Any, Dict, Iterable, Mapping, Optional, Sequence, Tuple

import numpy as np

from ..errors import ConfigError, ModalityError
from ..modality import Modality

__all__ = ["fail", "check_int", "check_positive_float", "check_bool", "check_choice",
           "check_size", "check_channels", "check_any_int", "check_opt_int", "check_fraction",
           "check_text", "check_extra", "check_modality", "check_nested", "modality_names"]


# --------------------------------------------------------------------------------------------
# field checks shared by all configs; each returns the normalized value

def fail(owner: str, name: str, msg: str, value: Any) -> ConfigError:
    """The ConfigError ``"<owner>.<name> <msg>, got <value!r>"`` (returned, to be raised)."""
    return ConfigError(f"{owner}.{name} {msg}, got {value!r}")


def check_int(owner: str, name: str, value: Any, *, minimum: int = 1) -> int:
    """An integer (not a bool) >= ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise fail(owner, name, f"must be an integer >= {minimum}", value)
    if value < minimum:
        raise fail(owner, name, f"must be an integer >= {minimum}", value)
    return int(value)


def check_positive_float(owner: str, name: str, value: Any, *, optional: bool = False
                         ) -> Optional[float]:
    """A finite real number > 0 (or None when ``optional``)."""
    if value is None and optional:
        return None
    expected = "must be a finite number > 0" + (" or None" if optional else "")
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise fail(owner, name, expected, value)
    f = float(value)
    if not math.isfinite(f) or f <= 0:
        raise fail(owner, name, expected, value)
    return f


def check_bool(owner: str, name: str, value: Any) -> bool:
    """True or False (a NumPy bool too), as a Python bool."""
    if not isinstance(value, (bool, np.bool_)):
        raise fail(owner, name, "must be True or False", value)
    return bool(value)


def check_choice(owner: str, name: str, value: Any,
                 choices: Sequence[Optional[str]]) -> Optional[str]:
    """One of ``choices`` (strings compared case-insensitively; None allowed if listed)."""
    if value is None and None in choices:
        return None
    if isinstance(value, str):
        low = value.lower()
        for c in choices:
            if c is not None and c == low:
                return c
    shown = " | ".join("None" if c is None else repr(c) for c in choices)
    raise fail(owner, name, f"must be one of {shown}", value)


def check_size(owner: str, name: str, value: Any, *, optional: bool) -> Any:
    """An int >= 1, or a (height, width) pair of them (returned as a tuple)."""
    if value is None and optional:
        return None
    expected = "must be an integer >= 1 or a (height, width) pair" + (" or None" if optional
                                                                      else "")
    if isinstance(value, (list, tuple)):
        if len(value) != 2:
            raise fail(owner, name, expected, value)
        out = []
        for v in value:
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
                raise fail(owner, name, expected, value)
            out.append(int(v))
        return tuple(out)
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise fail(owner, name, expected, value)
    return int(value)


def check_channels(owner: str, name: str, value: Any, *,
                   positive: bool) -> Optional[Tuple[float, ...]]:
    """None, or three finite floats (> 0 when ``positive``), returned as a tuple."""
    if value is None:
        return None
    expected = "must be None or 3 finite numbers (one per RGB channel)" + (
        ", each > 0" if positive else "")
    if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple, np.ndarray)):
        raise fail(owner, name, expected, value)
    vals = list(value)
    if len(vals) != 3:
        raise fail(owner, name, expected, value)
    out = []
    for v in vals:
        if isinstance(v, bool) or not isinstance(v, (int, float, np.integer, np.floating)):
            raise fail(owner, name, expected, value)
        f = float(v)
        if not math.isfinite(f) or (positive and f <= 0):
            raise fail(owner, name, expected, value)
        out.append(f)
    return tuple(out)

def check_any_int(owner: str, name: str, value: Any) -> int:
    """An integer (not a bool), any sign."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise fail(owner, name, "must be an integer", value)
    return int(value)


def check_opt_int(owner: str, name: str, value: Any, *, minimum: int = 1) -> Optional[int]:
    """None, or an integer (not a bool) >= ``minimum``."""
    if value is None:
        return None
    if (isinstance(value, bool) or not isinstance(value, numbers.Integral)
            or value < minimum):
        raise fail(owner, name, f"must be an integer >= {minimum} or None", value)
    return int(value)


def check_fraction(owner: str, name: str, value: Any) -> float:
    """A real number in [0, 1)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise fail(owner, name, "must be a number in [0, 1)", value)
    f = float(value)
    if not 0.0 <= f < 1.0:
        raise fail(owner, name, "must be a number in [0, 1)", value)
    return f


def check_text(owner: str, name: str, value: Any) -> str:
    """A string with at least one non-space character."""
    if not isinstance(value, str) or not value.strip():
        raise fail(owner, name, "must be a non-empty string", value)
    return value


def check_extra(owner: str, name: str, value: Any) -> Dict[str, Any]:
    """A dict with string keys, deep-copied."""
    if not isinstance(value, Mapping):
        raise fail(owner, name, "must be a dict", value)
    bad = [k for k in value if not isinstance(k, str)]
    if bad:
        raise fail(owner, name, "must have string keys", bad[0])
    return copy.deepcopy(dict(value))


def check_modality(owner: str, name: str, value: Any) -> Modality:
    """A :class:`Modality` (or its string form), as a Modality."""
    try:
        return Modality(value)
    except ModalityError as exc:
        raise ConfigError(f"{owner}.{name}: {exc}") from None


def check_nested(owner: str, name: str, value: Any, cls: Any, *,
                 optional: bool = False) -> Any:
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
    raise fail(owner, name, expected, value)


def modality_names(modalities: Iterable[Modality]) -> str:
    """``"'text', 'image'"``: the string forms, quoted, for messages."""
    return ", ".join(repr(str(m)) for m in modalities)

