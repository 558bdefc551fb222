"""JPEG decoding through libjpeg-turbo, bit-identical to Pillow's decode.

Pillow reads the header (mode, size, EXIF orientation: its own rules, XMP included); the
pixels are decoded by libjpeg-turbo through the ``simplejpeg`` wheel, which releases the GIL
while it decodes. Both use libjpeg-turbo's accurate integer IDCT and fancy upsampling, so the
RGB arrays are the same bytes (tested over 4:2:0 / 4:2:2 / 4:4:4, baseline / progressive,
grayscale and every EXIF orientation). EXIF orientation is applied afterwards as the same
lossless flips and transposes as Pillow's :func:`PIL.ImageOps.exif_transpose`.

What this path does not take (CMYK / YCCK JPEGs, MPO files, anything that makes
``simplejpeg`` complain, a missing ``simplejpeg``) is left to Pillow by the caller: the
functions here return None for "not mine", never a different answer.

Examples
--------
>>> import io, numpy as np
>>> from PIL import Image
>>> from mmcore.preprocess._jpeg import orient
>>> a = np.arange(6, dtype=np.uint8).reshape(2, 3, 1)
>>> orient(a, 6)[:, :, 0]          # ROTATE_270: the top row becomes the right column
array([[3, 0],
       [4, 1],
       [5, 2]], dtype=uint8)
"""

from __future__ import annotations

from typing import Any, Callable, Dict, Optional

import numpy as np

__all__ = ["available", "orient", "decode", "draft_scale"]

_ORIENTATION_TAG = 0x0112

try:  # pragma: no branch - simplejpeg is a dependency; the Pillow path covers its absence
    import simplejpeg as _sj
except ImportError:  # pragma: no cover
    _sj = None


def available() -> bool:
    """True when libjpeg-turbo decoding (``simplejpeg``) is installed."""
    return _sj is not None


# Pillow's Image.Transpose for each EXIF orientation, as array views of an (H, W, C) array
_ORIENT: Dict[int, Callable[[np.ndarray], np.ndarray]] = {
    2: lambda a: a[:, ::-1],                                 # FLIP_LEFT_RIGHT
    3: lambda a: a[::-1, ::-1],                              # ROTATE_180
    4: lambda a: a[::-1],                                    # FLIP_TOP_BOTTOM
    5: lambda a: a.transpose(1, 0, 2),                       # TRANSPOSE
    6: lambda a: a.transpose(1, 0, 2)[:, ::-1],              # ROTATE_270 (clockwise)
    7: lambda a: a[::-1, ::-1].transpose(1, 0, 2),           # TRANSVERSE
    8: lambda a: a.transpose(1, 0, 2)[::-1],                 # ROTATE_90 (counter-clockwise)
}


def orient(a: np.ndarray, orientation: int) -> np.ndarray:
    """``a`` (H, W, C) turned upright for an EXIF ``orientation`` (1-8; others: unchanged),
    as a view where possible (the caller makes it contiguous)."""
    fn = _ORIENT.get(int(orientation))
    return a if fn is None else fn(a)


def orientation_of(im: Any) -> int:
    """The EXIF orientation Pillow's ``exif_transpose`` would apply to the opened image."""
    try:
        value = im.getexif().get(_ORIENTATION_TAG, 1)
        return int(value)
    except Exception:  # noqa: BLE001 - a broken EXIF block is "no orientation" for Pillow too
        return 1


def draft_scale(width: int, height: int, min_size: int) -> float:
    """The DCT scale of ``draft=min_size``: the smallest of 1/8, 1/4, 1/2 and 1 that keeps both
    edges ``>= min_size`` (libjpeg-turbo sizes a scaled edge as ``ceil(edge * scale)``).

    Only powers of two: libjpeg-turbo's 3/8, 5/8 and 7/8 scales misplace the chroma of
    subsampled images (measured: up to 42 levels off after a resize to 224, against 4 at 1/2).
    """
    for k in (1, 2, 4):
        if -(-width * k // 8) >= min_size and -(-height * k // 8) >= min_size:
            return k / 8
    return 1.0


def decode(data: Any, im: Any, *, draft: Optional[int] = None) -> Optional[np.ndarray]:
    """uint8 (H, W, 3) RGB of the JPEG ``data`` whose header Pillow opened as ``im``, upright;
    None when this path does not take the image (the caller then decodes with Pillow).

    ``draft``: decode at the scale :func:`draft_scale` chooses (approximate; see
    :func:`mmcore.preprocess.load_image`).
    """
    if _sj is None or getattr(im, "format", None) != "JPEG" or im.mode not in ("RGB", "L"):
        return None
    kw: Dict[str, Any] = {"colorspace": "RGB", "strict": True}
    if draft is not None:
        w, h = im.size
        k = int(draft_scale(w, h, int(draft)) * 8)
        if k < 8:  # exactly this scale: the smallest k/8 with these sizes is k/8 itself
            kw["min_height"], kw["min_width"] = -(-h * k // 8), -(-w * k // 8)
    try:
        a = _sj.decode_jpeg(data, **kw)
    except (ValueError, TypeError, MemoryError):
        return None  # corrupt or unusual data: Pillow decides (and words the error)
    o = orientation_of(im)
    if o != 1:
        a = np.ascontiguousarray(orient(a, o))
    return a
