"""An immutable mapping keyed by :class:`~mmcore.modality.Modality`, used by every
per-modality table of the configs."""

from __future__ import annotations

import collections.abc
from typing import Any, Dict, Iterable, Iterator, Mapping, Tuple, Union

from ..errors import ModalityError
from ..modality import Modality

__all__ = ["ModalityMap"]


class ModalityMap(collections.abc.Mapping):  # type: ignore[type-arg, unused-ignore]
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
    _data: Dict[Modality, Any]

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

    def __reduce__(self) -> Tuple[Any, Tuple[Any, ...]]:
        return (ModalityMap, (list(self._data.items()),))
