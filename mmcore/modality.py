"""The :class:`Modality` value type.

A modality names a kind of input: the four built-in ones (:attr:`Modality.TEXT`,
:attr:`Modality.IMAGE`, :attr:`Modality.AUDIO`, :attr:`Modality.VIDEO`) and any number of
custom ones (:meth:`Modality.custom`), identified by a non-negative integer or a short name.

Every modality has one stable string form, used in files, dictionaries and messages:
``"text"``, ``"image"``, ``"audio"``, ``"video"``, ``"custom:7"``, ``"custom:depth"``.
:meth:`Modality.parse` reads it back.

Examples
--------
>>> from mmcore.modality import Modality
>>> Modality.TEXT, str(Modality.IMAGE)
(Modality.TEXT, 'image')
>>> Modality.parse("custom:7") == Modality.custom(7)
True
>>> Modality("audio") is Modality.AUDIO          # built-ins are singletons
True
>>> sorted([Modality.custom("depth"), Modality.VIDEO, Modality.custom(2), Modality.TEXT])
[Modality.TEXT, Modality.VIDEO, Modality.custom(2), Modality.custom('depth')]
"""

from __future__ import annotations

import numbers
import re
from typing import Any, ClassVar, Dict, Tuple, Union

from .errors import ModalityError

__all__ = ["Modality", "ModalityLike"]

_BUILTIN_NAMES: Tuple[str, ...] = ("text", "image", "audio", "video")
_CUSTOM_PREFIX = "custom:"
_CUSTOM_NAME = re.compile(r"^[a-z_][a-z0-9_.\-]*$")
_MAX_CUSTOM_INT = 2**31 - 1
_MAX_CUSTOM_NAME = 64


def _custom_id(value: Any) -> Union[int, str]:
    """Normalize a custom id: an int in [0, 2**31), or a name (digits-only names become ints)."""
    if isinstance(value, bool):
        raise ModalityError(f"custom modality id must be an integer >= 0 or a name, got {value!r}")
    if isinstance(value, numbers.Integral):  # int and NumPy integers
        ident = int(value)
        if not 0 <= ident <= _MAX_CUSTOM_INT:
            raise ModalityError(f"custom modality id must be an integer in [0, {_MAX_CUSTOM_INT}] "
                                f"or a name, got {value!r}")
        return ident
    if isinstance(value, str):
        name = value.strip().lower()
        if name.isdigit() and name.isascii():
            return _custom_id(int(name))
        if len(name) > _MAX_CUSTOM_NAME or not _CUSTOM_NAME.match(name):
            raise ModalityError(
                "custom modality name must start with a letter or '_' and hold only letters, "
                f"digits, '_', '.', '-' (at most {_MAX_CUSTOM_NAME} characters), got {value!r}")
        return name
    raise ModalityError(f"custom modality id must be an integer >= 0 or a name, got "
                        f"{type(value).__name__} {value!r}")


class Modality:
    """A kind of input: text, image, audio, video, or a custom modality.

    Immutable, hashable and totally ordered. Two modalities are equal when their string forms
    are; a modality never equals a plain string (convert with ``Modality(s)`` or
    :meth:`parse`). The built-in modalities are singletons: ``Modality("text") is
    Modality.TEXT``.

    Parameters
    ----------
    value : Modality or str
        An existing modality (returned as is) or a string form (see :meth:`parse`).

    Attributes
    ----------
    TEXT, IMAGE, AUDIO, VIDEO : Modality
        The built-in modalities.

    Notes
    -----
    *String form.* ``str(m)`` is ``"text"``, ``"image"``, ``"audio"``, ``"video"``, or
    ``"custom:<id>"``. It is the form written to JSON and TOML files and used as dictionary keys
    there, and it never changes between releases.

    *Custom ids.* An integer in ``[0, 2**31 - 1]`` or a name: a letter or ``_`` followed by
    letters, digits, ``_``, ``.`` or ``-``, at most 64 characters. Names are case-insensitive
    (stored lower-case) and a name made only of digits is the integer id
    (``Modality.custom("7") == Modality.custom(7)``).

    *Order.* The built-ins come first, in the order TEXT, IMAGE, AUDIO, VIDEO; then custom
    modalities with integer ids, by id; then those with names, alphabetically. Configs iterate
    their modalities in this order, so results that depend on the order (a concatenation of
    per-modality embeddings, say) are the same however a config was written.

    Examples
    --------
    >>> from mmcore.modality import Modality
    >>> m = Modality.custom(7)
    >>> str(m), m.is_custom, m.id
    ('custom:7', True, 7)
    >>> {Modality.TEXT: 1, m: 2}[Modality.parse("custom:7")]
    2
    >>> Modality.TEXT == "text", Modality.TEXT == Modality("TEXT")
    (False, True)
    >>> Modality.parse("smell")
    Traceback (most recent call last):
    ...
    mmcore.errors.ModalityError: unknown modality 'smell': expected 'text', 'image', 'audio', 'video' or 'custom:<id>'
    """  # noqa: E501

    __slots__ = ("_name", "_id", "_key")
    # the slots' types (set once, in _make, through object.__setattr__)
    _name: str
    _id: Union[int, str, None]
    _key: Tuple[Any, ...]

    TEXT: ClassVar["Modality"]
    IMAGE: ClassVar["Modality"]
    AUDIO: ClassVar["Modality"]
    VIDEO: ClassVar["Modality"]
    _builtins: ClassVar[Dict[str, "Modality"]] = {}

    def __new__(cls, value: "ModalityLike") -> "Modality":
        if isinstance(value, Modality):
            return value
        if isinstance(value, str):
            return cls.parse(value)
        raise ModalityError(f"a modality must be a Modality or its string form, got "
                            f"{type(value).__name__} {value!r}")

    @classmethod
    def _make(cls, name: str, ident: Union[int, str, None]) -> "Modality":
        self = object.__new__(cls)
        object.__setattr__(self, "_name", name)
        object.__setattr__(self, "_id", ident)
        if ident is None:
            key: Tuple[Any, ...] = (0, _BUILTIN_NAMES.index(name), 0, "")
        elif isinstance(ident, int):
            key = (1, 0, ident, "")
        else:
            key = (1, 1, 0, ident)
        object.__setattr__(self, "_key", key)
        return self

    # -- constructors -----------------------------------------------------------------------------
    @classmethod
    def custom(cls, id: Union[int, str]) -> "Modality":  # noqa: A002 - the public name
        """A custom modality with an integer id (>= 0) or a name.

        Raises
        ------
        ModalityError
            If the id is negative, too large, not an int or str, or not a valid name.

        Examples
        --------
        >>> from mmcore.modality import Modality
        >>> Modality.custom(3), Modality.custom("Depth")
        (Modality.custom(3), Modality.custom('depth'))
        >>> Modality.custom(-1)
        Traceback (most recent call last):
        ...
        mmcore.errors.ModalityError: custom modality id must be an integer in [0, 2147483647] or a name, got -1
        """  # noqa: E501
        ident = _custom_id(id)
        return cls._make(f"{_CUSTOM_PREFIX}{ident}", ident)

    @classmethod
    def parse(cls, text: str) -> "Modality":
        """The modality whose string form is ``text`` (any case, surrounding spaces ignored).

        Raises
        ------
        ModalityError
            If ``text`` is not a string form.

        Examples
        --------
        >>> from mmcore.modality import Modality
        >>> Modality.parse("video") is Modality.VIDEO
        True
        >>> Modality.parse("custom:depth")
        Modality.custom('depth')
        """
        if not isinstance(text, str):
            raise ModalityError(f"Modality.parse expects a string, got {type(text).__name__} "
                                f"{text!r}")
        low = text.strip().lower()
        builtin = cls._builtins.get(low)
        if builtin is not None:
            return builtin
        if low.startswith(_CUSTOM_PREFIX):
            rest = low[len(_CUSTOM_PREFIX):]
            try:
                return cls.custom(rest)
            except ModalityError as exc:
                raise ModalityError(f"bad modality {text!r}: {exc}") from None
        raise ModalityError(f"unknown modality {text!r}: expected 'text', 'image', 'audio', "
                            "'video' or 'custom:<id>'")

    @classmethod
    def builtins(cls) -> Tuple["Modality", ...]:
        """The built-in modalities in their order: TEXT, IMAGE, AUDIO, VIDEO.

        Examples
        --------
        >>> from mmcore.modality import Modality
        >>> [str(m) for m in Modality.builtins()]
        ['text', 'image', 'audio', 'video']
        """
        return tuple(cls._builtins[n] for n in _BUILTIN_NAMES)

    # -- properties -------------------------------------------------------------------------------
    @property
    def name(self) -> str:
        """The stable string form (same as ``str(self)``)."""
        return self._name

    @property
    def is_custom(self) -> bool:
        """Whether this is a custom modality."""
        return self._id is not None

    @property
    def id(self) -> Union[int, str, None]:
        """The custom id (int or name), or None for a built-in modality."""
        return self._id

    # -- value semantics --------------------------------------------------------------------------
    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError("Modality is immutable")

    def __delattr__(self, name: str) -> None:
        raise AttributeError("Modality is immutable")

    def __str__(self) -> str:
        return self._name

    def __repr__(self) -> str:
        if self._id is None:
            return f"Modality.{self._name.upper()}"
        return f"Modality.custom({self._id!r})"

    def __hash__(self) -> int:
        return hash(("mmcore.Modality", self._name))

    def __eq__(self, other: object) -> bool:
        if isinstance(other, Modality):
            return self._name == other._name
        return NotImplemented

    def __ne__(self, other: object) -> bool:
        if isinstance(other, Modality):
            return self._name != other._name
        return NotImplemented

    def __lt__(self, other: object) -> bool:
        if isinstance(other, Modality):
            return self._key < other._key
        return NotImplemented

    def __le__(self, other: object) -> bool:
        if isinstance(other, Modality):
            return self._key <= other._key
        return NotImplemented

    def __gt__(self, other: object) -> bool:
        if isinstance(other, Modality):
            return self._key > other._key
        return NotImplemented

    def __ge__(self, other: object) -> bool:
        if isinstance(other, Modality):
            return self._key >= other._key
        return NotImplemented

    def __reduce__(self):
        # pickles as the string form, so built-ins unpickle to the singletons
        return (Modality, (self._name,))

    def __copy__(self) -> "Modality":
        return self

    def __deepcopy__(self, memo: Any) -> "Modality":
        return self


ModalityLike = Union[Modality, str]

for _n in _BUILTIN_NAMES:
    Modality._builtins[_n] = Modality._make(_n, None)
Modality.TEXT = Modality._builtins["text"]
Modality.IMAGE = Modality._builtins["image"]
Modality.AUDIO = Modality._builtins["audio"]
Modality.VIDEO = Modality._builtins["video"]
del _n
