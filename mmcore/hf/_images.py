"""Image inputs as transformers' Pillow-backed processors take them, as uint8 (H, W, C) arrays.

:func:`flat_images` flattens what ``__call__`` was given (one image, a list, a nested list, a
4-D batch) into a list; :func:`to_hwc` turns one image (PIL, NumPy, torch) into channels-last
pixels with transformers' ``convert_to_rgb`` applied (transparency composited onto white);
:func:`to_uint8` gives the uint8 pixels the kernels read and the factor that float inputs in
[0, 1] carry (transformers resizes them as uint8 ``x * 255`` and divides by 255 again).
"""

from __future__ import annotations

from typing import Any, List, NamedTuple, Optional

import numpy as np

from ..errors import ArgumentError, ShapeError

__all__ = ["flat_images", "to_hwc", "to_uint8", "Pixels"]

_CHANNELS = (1, 3, 4)


def _is_pil(x: Any) -> bool:
    mod = type(x).__module__
    return mod.startswith("PIL.") and hasattr(x, "getbands") and hasattr(x, "convert")


def _is_torch(x: Any) -> bool:
    return type(x).__module__.startswith("torch") and hasattr(x, "detach")


def _as_array(x: Any) -> np.ndarray:
    if _is_torch(x):
        return x.detach().cpu().numpy()
    return np.asarray(x)


def flat_images(op: str, images: Any) -> List[Any]:
    """A flat list of images (PIL images and 2-D / 3-D arrays), as transformers'
    ``make_flat_list_of_images`` makes it (2-D arrays, one gray image each, are accepted too)."""
    out: List[Any] = []

    def add(x: Any, depth: int, where: str) -> None:
        if _is_pil(x):
            out.append(x)
        elif isinstance(x, np.ndarray) or _is_torch(x):
            a = _as_array(x)
            if a.ndim in (2, 3):
                out.append(a)
            elif a.ndim == 4:
                out.extend(a)
            else:
                raise ShapeError(f"[{op}] {where} has {a.ndim} dims, expected an image (H, W, C), "
                                 "(C, H, W) or (H, W), or a batch (N, ...) of them")
        elif isinstance(x, (list, tuple)) and depth < 2:
            if not x:
                raise ShapeError(f"[{op}] {where} is an empty list")
            for i, item in enumerate(x):
                add(item, depth + 1, f"{where}[{i}]")
        else:
            raise ArgumentError(f"[{op}] {where} must be a PIL image, a NumPy array, a torch "
                                f"tensor or a list of them, got {type(x).__name__}")

    add(images, 0, "images")
    return out


def _infer_channels_first(op: str, where: str, a: np.ndarray) -> bool:
    """transformers' ``infer_channel_dimension_format(num_channels=(1, 3, 4))``: the first axis
    when both would do."""
    if a.shape[0] in _CHANNELS:
        return True
    if a.shape[2] in _CHANNELS:
        return False
    raise ShapeError(f"[{op}] {where} has shape {a.shape}: no axis of 1, 3 or 4 channels first or "
                     "last; pass input_data_format")


def _composite_pil(img: Any) -> np.ndarray:
    """transformers' ``convert_to_rgb`` of a PIL image: alpha composited onto opaque white with
    ``PIL.Image.alpha_composite``, other modes through ``convert("RGB")``."""
    from PIL import Image

    if "A" in img.getbands() or img.info.get("transparency") is not None:
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(white, rgba)
    return np.array(img.convert("RGB"))


def _composite_array(op: str, where: str, a: np.ndarray) -> np.ndarray:
    """transformers' ``convert_to_rgb`` of an (H, W, 4) array: ``alpha * rgb + (1 - alpha) *
    white`` in float64, rounded for integers (white 255), cast back for floats (white 1)."""
    if np.issubdtype(a.dtype, np.floating) and (a.min() < 0.0 or a.max() > 1.0):
        raise ShapeError(f"[{op}] {where} is a float RGBA image with values outside [0, 1]: "
                         f"[{a.min()}, {a.max()}]")
    white = 255 if np.issubdtype(a.dtype, np.integer) else 1.0
    alpha = a[..., 3:4] / white
    comp = alpha * a[..., :3] + (1 - alpha) * white
    return np.round(comp).astype(a.dtype) if white == 255 else comp.astype(a.dtype)


def to_hwc(op: str, where: str, img: Any, *, convert_rgb: bool,
           channels_first: Optional[bool]) -> np.ndarray:
    """One image as (H, W, C): RGB (C = 3, or C = 1 gray, replicated later) when
    ``convert_rgb``, else the channels as given. ``channels_first`` None: inferred."""
    if _is_pil(img):
        if convert_rgb:
            return _composite_pil(img)
        a = np.array(img)
        return a[:, :, None] if a.ndim == 2 else a
    a = img
    if a.ndim == 2:
        a = a[:, :, None]
    else:
        first = _infer_channels_first(op, where, a) if channels_first is None else channels_first
        if first:
            a = np.moveaxis(a, 0, -1)
    if a.shape[0] == 0 or a.shape[1] == 0:
        raise ShapeError(f"[{op}] {where} is empty: (H, W, C) = {a.shape}")
    if convert_rgb and a.shape[2] == 4:
        a = _composite_array(op, where, a)
    return a


class Pixels(NamedTuple):
    u8: np.ndarray       # (H, W, C) uint8
    factor: float        # the kernels' scale is multiplied by this (1/255 for floats in [0, 1])
    integral: bool       # uint8 results possible (no rescale and no normalization)


def to_uint8(op: str, where: str, a: np.ndarray, *, do_resize: bool) -> Pixels:
    """The uint8 pixels of ``a`` as transformers' Pillow resize sees them.

    uint8 as is; integer arrays and integral floats in [0, 255] cast; floats in [0, 1] (only
    with ``do_resize``, as transformers converts them for Pillow) as ``uint8(x * 255)``,
    truncated, with ``factor = 1/255``. Anything else: ShapeError naming ``where``.
    """
    dt = a.dtype
    if dt == np.uint8:
        return Pixels(a, 1.0, True)
    if dt == np.bool_ or dt.kind not in "iuf":
        raise ShapeError(f"[{op}] {where} has dtype {dt}, expected uint8 (or integers / floats "
                         "as transformers takes them)")
    if dt.kind in "iu" or np.allclose(a, a.astype(int)):
        if a.size and (a.min() < 0 or a.max() > 255):
            raise ShapeError(f"[{op}] {where} has integer values outside [0, 255]: "
                             f"[{a.min()}, {a.max()}]")
        return Pixels(a.astype(np.uint8), 1.0, True)
    if not do_resize:
        raise ShapeError(f"[{op}] {where} has fractional float values; mmcore computes from uint8 "
                         "pixels, which transformers also does for floats in [0, 1] only when "
                         "do_resize is set: pass uint8 pixels, or do_resize=True")
    if a.min() < 0 or a.max() > 1:
        raise ShapeError(f"[{op}] {where} has float values outside [0, 1] that are not integers: "
                         f"[{a.min()}, {a.max()}]")
    u8 = (a.astype(np.float64) * 255).astype(np.float32).astype(np.uint8)
    return Pixels(u8, 1.0 / 255.0, False)
