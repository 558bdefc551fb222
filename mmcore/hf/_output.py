"""``BatchFeature``: the dict a processor returns, with ``out.key`` access and tensor conversion."""

from __future__ import annotations

from typing import Any, Dict, List, Optional

import numpy as np

from ..errors import ArgumentError

__all__ = ["BatchFeature", "check_return_tensors"]

RETURN_TENSORS = (None, "np", "pt")


def check_return_tensors(op: str, value: Any) -> Optional[str]:
    """``return_tensors``: None, "np" or "pt" (``TensorType`` members are str enums)."""
    if value is not None:
        value = getattr(value, "value", value)
    if value not in RETURN_TENSORS:
        raise ArgumentError(f"[{op}] return_tensors must be None, 'np' or 'pt', got {value!r}")
    return value


def _torch(op: str):
    try:
        import torch
    except ImportError as exc:
        raise ArgumentError(f"[{op}] return_tensors='pt' needs PyTorch (pip install torch): "
                            f"{exc}") from exc
    return torch


class BatchFeature(Dict[str, Any]):
    """A processor's outputs: a ``dict`` whose keys are also attributes.

    ``out["pixel_values"]`` and ``out.pixel_values`` are the same object, as with
    ``transformers.BatchFeature``. NumPy arrays, torch tensors (``return_tensors="pt"``) or,
    for ``return_tensors=None`` and images of different output sizes, lists of arrays.

    Examples
    --------
    >>> import numpy as np
    >>> from mmcore.hf import BatchFeature
    >>> out = BatchFeature({"pixel_values": np.zeros((1, 3, 2, 2), np.float32)})
    >>> out.pixel_values.shape, list(out)
    ((1, 3, 2, 2), ['pixel_values'])
    """

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None

    def __dir__(self) -> List[str]:
        return sorted(set(super().__dir__()) | {k for k in self if isinstance(k, str)})


def stack(op: str, items: List[np.ndarray], key: str) -> np.ndarray:
    """One array of ``items`` (all of one shape), or ArgumentError naming ``return_tensors``."""
    shapes = {a.shape for a in items}
    if len(shapes) > 1:
        raise ArgumentError(f"[{op}] return_tensors needs every {key} of one shape, got "
                            f"{sorted(shapes)}; pass return_tensors=None for a list, or crop "
                            "to one size")
    if not items:
        raise ArgumentError(f"[{op}] no inputs to make {key} of")
    return np.stack(items)


def to_tensors(op: str, data: Dict[str, Any], return_tensors: Optional[str]) -> BatchFeature:
    """``data`` (arrays) as a :class:`BatchFeature` of NumPy arrays or torch tensors (views:
    ``torch.from_numpy`` shares the memory)."""
    if return_tensors == "pt":
        torch = _torch(op)
        data = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in data.items()}
    return BatchFeature(data)
