"""Reading and writing config files: JSON and TOML text, atomic writes, depth limits.

The functions here take the ``owner`` (the config class name) that starts their error
messages; :class:`~mmcore.config.ConfigBase` calls them from ``from_json`` / ``from_toml`` /
``to_json`` / ``to_toml``.

Examples
--------
>>> from mmcore.config.serialization import toml_dumps
>>> print(toml_dumps({"name": "m", "cache": {"enabled": True, "sizes": [1, 2]}}, "Demo"), end="")
name = "m"
<BLANKLINE>
[cache]
enabled = true
sizes = [1, 2]
"""

from __future__ import annotations

import math
import numbers
import os
import re
import sys
import tempfile
from typing import Any, List, Mapping, Optional, Union

import numpy as np

from ..errors import ConfigError

__all__ = ["PathLike", "MAX_FILE_DEPTH", "TOML_NONE", "read_text", "check_depth",
           "write_text_atomic", "toml_dumps", "read_section", "toml_module"]

PathLike = Union[str, "os.PathLike[str]"]

# TOML has no null: these strings stand for None in the Optional fields of a TOML file.
TOML_NONE = ("none", "null")

#: The deepest nesting of tables/objects and arrays :meth:`ConfigBase.from_json` and
#: :meth:`ConfigBase.from_toml` accept (a deeper file is refused before it is walked).
MAX_FILE_DEPTH = 64


def read_text(owner: str, path: PathLike) -> str:
    """The UTF-8 text of the config file ``path``: a regular file (a FIFO or a device is
    refused without blocking)."""
    from .._files import open_regular
    try:
        where = os.fspath(path)
    except TypeError:
        raise ConfigError(f"{owner}: the config file must be a path, got "
                          f"{type(path).__name__}") from None
    with open_regular(where, what="config file", error=ConfigError, op=owner) as f:
        try:
            return f.read().decode("utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"{owner}: cannot read config file {where!s} "
                              f"({type(exc).__name__}: {exc})") from None


def check_depth(owner: str, data: Any, path: PathLike, kind: str) -> None:
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
        raise ConfigError(f"{owner}: {os.fspath(path)!s} is not a valid {kind} config "
                          f"(nested deeper than {MAX_FILE_DEPTH} levels)")


def write_text_atomic(owner: str, path: PathLike, text: str) -> None:
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
        raise ConfigError(f"{owner}: cannot write config file {where!s} "
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


def toml_dumps(data: Mapping[str, Any], owner: str) -> str:
    """TOML text of the plain ``data`` (scalars first, then one ``[table]`` per nested
    non-empty mapping); None anywhere raises ConfigError (TOML has no null)."""
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


def read_section(owner: str, data: Any, section: Optional[str], path: PathLike) -> Any:
    """The mapping at the dotted ``section`` of parsed ``data`` (all of it when None)."""
    where = os.fspath(path)
    if section:
        for part in section.split("."):
            if not isinstance(data, Mapping) or part not in data:
                raise ConfigError(f"{owner}: {where!s} has no section {section!r}")
            data = data[part]
    if not isinstance(data, Mapping):
        at = f" at section {section!r}" if section else ""
        raise ConfigError(f"{owner}: {where!s}{at} holds a {type(data).__name__}, "
                          "expected a table/object of field names")
    return data


def toml_module(owner: str) -> Any:
    """:mod:`tomllib` (Python 3.11+), else the ``tomli`` package (ConfigError without it)."""
    if sys.version_info >= (3, 11):
        import tomllib
        return tomllib
    try:
        import tomli  # type: ignore[import-not-found, unused-ignore]
    except ImportError:
        raise ConfigError(f"{owner}.from_toml needs Python 3.11+ (tomllib) or the 'tomli' "
                          "package: pip install tomli") from None
    return tomli


# --------------------------------------------------------------------------------------------
# preprocessing
