"""Image decoding and batched preprocessing.

``load_image``
    Decode a file with Pillow into a uint8 ``(H, W, 3)`` RGB array: EXIF orientation applied,
    every Pillow mode converted to RGB, oversized images refused before they are decoded.
``ImagePreprocessor``
    Files and/or arrays -> one call of ``mmcore.ops.preprocess_image`` configured by a
    :class:`~mmcore.config.PreprocessingConfig` (``modality="image"``) ->
    ``{"pixel_values"}``.

Pillow is imported on first use.
"""

from __future__ import annotations

import io
import math
import os
import warnings
from typing import Any, Dict, Mapping, Optional, Sequence, Tuple, Union

import numpy as np

from .. import ops
from .._files import open_regular
from ..config import PreprocessingConfig
from ..errors import ArgumentError, ConfigError, ImageDecodeError, ShapeError
from ..ops._checks import check_limit
from . import _jpeg
from ._pool import map_ordered

__all__ = ["load_image", "ImagePreprocessor"]

PathLike = Union[str, "os.PathLike[str]"]

# modes whose alpha band is dropped or composited
_ALPHA_MODES = ("RGBA", "RGBa", "LA", "La", "PA")
# 16-bit grayscale modes (Pillow keeps their samples as uint16)
_I16_MODES = ("I;16", "I;16L", "I;16B", "I;16N")


def _import_pil():
    try:
        from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError
    except ImportError as exc:  # pragma: no cover - Pillow is a core dependency
        raise ImportError("mmcore.preprocess.load_image needs Pillow (pip install pillow): "
                          f"{exc}") from exc
    return Image, ImageFile, ImageOps, UnidentifiedImageError


def _check_max_pixels(value: Any, Image) -> float:
    limit = Image.MAX_IMAGE_PIXELS
    return check_limit("max_pixels", value, op="load_image",
                       default=math.inf if limit is None else limit)


def _check_background(value: Any) -> Optional[Tuple[int, int, int]]:
    if value is None:
        return None
    try:
        vals = tuple(int(v) for v in value)
        ok = len(vals) == 3 and all(0 <= v <= 255 for v in vals) and all(
            float(v) == int(v) for v in value)
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise ArgumentError(f"[load_image] background must be None or an (r, g, b) triple of "
                            f"ints in [0, 255], got {value!r}")
    return vals  # type: ignore[return-value]


def _gray_to_uint8(a: np.ndarray, mode: str) -> np.ndarray:
    """Scale a 16/32-bit integer or float grayscale band to uint8 (see :func:`load_image`)."""
    if mode in _I16_MODES:
        # full 16-bit range: 0 -> 0, 65535 -> 255 (v / 257, rounded)
        return ((a.astype(np.uint32) + 128) // 257).astype(np.uint8)
    if mode == "I":
        # 32-bit ints hold 16-bit data in practice (16-bit PNG/TIFF); clip to that range
        v = np.clip(a.astype(np.int64), 0, 65535)
        return ((v + 128) // 257).astype(np.uint8)
    # "F": float32
    f = a.astype(np.float64)
    finite = np.isfinite(f)
    if not finite.any():
        return np.zeros(a.shape, np.uint8)
    lo, hi = float(f[finite].min()), float(f[finite].max())
    if lo >= 0.0 and hi <= 1.0:
        scaled = f * 255.0
    elif hi > lo:
        scaled = (f - lo) * (255.0 / (hi - lo))
    else:
        scaled = np.zeros_like(f)
    scaled = np.where(finite, scaled, 0.0)
    return np.clip(np.floor(scaled + 0.5), 0, 255).astype(np.uint8)


def _to_rgb(im, background: Optional[Tuple[int, int, int]], Image) -> np.ndarray:
    """uint8 (H, W, 3) RGB of a loaded Pillow image of any mode."""
    mode = im.mode
    if mode == "RGB":
        return np.array(im, dtype=np.uint8)
    if mode in _I16_MODES or mode in ("I", "F"):
        g = _gray_to_uint8(np.asarray(im), mode)
        return np.repeat(g[:, :, None], 3, axis=2)
    if mode == "P" and "transparency" in im.info:
        im = im.convert("RGBA")     # palette transparency becomes a real alpha band
        mode = "RGBA"
    if mode in _ALPHA_MODES:
        if mode == "RGBa":
            im = im.convert("RGBA")
        elif mode == "La":
            im = im.convert("LA")
        elif mode == "PA":
            im = im.convert("RGBA")
        if background is None:
            return np.array(im.convert("RGB"), dtype=np.uint8)
        rgba = np.asarray(im.convert("RGBA"))
        alpha = rgba[:, :, 3:4].astype(np.uint32)
        bg = np.asarray(background, np.uint32)
        out = (rgba[:, :, :3].astype(np.uint32) * alpha + bg * (255 - alpha) + 127) // 255
        return out.astype(np.uint8)
    # "1", "L", "P", "CMYK", "YCbCr", "LAB", "HSV", ...: Pillow's own conversion
    try:
        return np.array(im.convert("RGB"), dtype=np.uint8)
    except ValueError:
        # modes without a direct RGB conversion go through RGBA or L
        for via in ("RGBA", "L"):
            try:
                return np.array(im.convert(via).convert("RGB"), dtype=np.uint8)
            except ValueError:
                continue
        raise


def load_image(path: Any, *, max_pixels: Optional[float] = None,
               background: Optional[Sequence[int]] = None,
               draft: Optional[int] = None) -> np.ndarray:
    """Decode an image (a file, or encoded bytes) to a uint8 ``(H, W, 3)`` RGB array.

    Parameters
    ----------
    path : str, os.PathLike, bytes, bytearray, memoryview or binary file object
        A file name (``str`` / ``os.PathLike``), the encoded image itself (``bytes``,
        ``bytearray``, ``memoryview``: what a server receives) or a binary file object. Any
        format the installed Pillow decodes (JPEG, PNG, WebP, GIF, BMP, TIFF, ...).
        Multi-frame files (GIF, TIFF, ...) give their first frame. (Up to mmcore 0.1.0,
        ``bytes`` were taken as a file name; pass ``os.fsdecode(name)`` for such a name.)
    max_pixels : int, math.inf or None, default None
        Largest accepted ``width * height``, checked from the header before any pixel is
        decoded. None uses Pillow's ``PIL.Image.MAX_IMAGE_PIXELS`` (about 89.5 M pixels by
        default); ``math.inf`` disables the check. Pillow's own guard still refuses images
        above ``2 * Image.MAX_IMAGE_PIXELS`` while opening, so a limit above that also needs
        ``Image.MAX_IMAGE_PIXELS`` raised (or set to None).
    background : (r, g, b) or None, default None
        What to do with transparency. None drops the alpha band and keeps the color values
        underneath, which is Pillow's ``.convert("RGB")`` and so what Hugging Face image
        processors feed their models. A color composites the image over that background
        (``rgb * a + bg * (255 - a)``, rounded), e.g. ``(255, 255, 255)`` for white.
    draft : int or None, default None
        Opt-in, approximate: decode a JPEG at a reduced size, the smallest DCT scale among
        1/8, 1/4 and 1/2 (libjpeg-turbo's scaled IDCT, as Pillow's ``draft``) that keeps both
        edges ``>= draft`` pixels; images already that small, and other formats, decode at
        full size. Much faster for large
        photos that are resized down anyway, but not bit-identical: resized to half of
        ``draft`` (CLIP's 224 from ``draft=448``), four test photos at six sizes came out
        at most 11 uint8 levels from the exact path (2-6 when the decode is well above
        ``draft``), 0.4 levels on average (``tests/test_image_bytes.py``). None (the
        default) decodes exactly.

    Returns
    -------
    uint8 ndarray (H, W, 3), C-contiguous, writeable

    Notes
    -----
    * JPEGs in RGB or grayscale (YCbCr or gray, baseline or progressive, any chroma
      subsampling) are decoded by libjpeg-turbo through ``simplejpeg``, with the GIL
      released; the array is bit-identical to Pillow's decode (the same accurate integer
      IDCT and upsampling). CMYK / YCCK JPEGs, other formats, data that libjpeg-turbo flags
      as corrupt and a missing ``simplejpeg`` go through Pillow.
    * The EXIF orientation tag is applied (``ImageOps.exif_transpose``), so the array is
      upright as a viewer shows it; ``H, W`` are the displayed height and width.
    * Mode conversion: RGB as is; L, 1, P, CMYK, YCbCr and the other 8-bit modes through
      Pillow's ``convert("RGB")`` (gray replicated to three channels; CMYK with Pillow's
      conversion, without ICC color management); palette images with a transparent index
      are expanded to RGBA first, then handled like RGBA; RGBA, LA, PA, RGBa and La per
      ``background``.
    * Higher bit depths are scaled, not clipped: 16-bit grayscale (``I;16`` modes) maps
      ``0..65535`` to ``0..255`` (``round(v / 257)``); 32-bit integer grayscale (``I``, how
      Pillow opens some 16-bit PNG and TIFF files) is clipped to ``0..65535`` and scaled the
      same way; 32-bit float grayscale (``F``) is taken as intensities in ``[0, 1]`` when all
      its finite values lie there (times 255, rounded), otherwise min-max scaled to
      ``0..255``; NaN and infinite pixels become 0.

    Raises
    ------
    ImageDecodeError
        If the file does not exist, is not a regular file (a directory, FIFO or device such
        as ``/dev/zero``: refused without being read), is not an image Pillow recognizes, is
        truncated or corrupt, or has more than ``max_pixels`` pixels (a decompression bomb).
        The message names the file. (When other code in the process sets Pillow's
        ``ImageFile.LOAD_TRUNCATED_IMAGES = True``, Pillow fills truncated images in gray
        instead of failing; that setting is respected.)
    ArgumentError
        For a bad ``path`` type, ``max_pixels`` or ``background``.

    Examples
    --------
    >>> import os, tempfile, numpy as np
    >>> from PIL import Image
    >>> from mmcore.preprocess import load_image
    >>> path = os.path.join(tempfile.mkdtemp(), "gray.png")
    >>> Image.fromarray(np.full((4, 6), 200, np.uint8)).save(path)     # mode "L"
    >>> img = load_image(path)
    >>> img.shape, img.dtype, int(img[0, 0, 2])
    ((4, 6, 3), dtype('uint8'), 200)
    """
    Image, ImageFile, ImageOps, UnidentifiedImageError = _import_pil()
    limit = _check_max_pixels(max_pixels, Image)
    bg = _check_background(background)
    reduce_to = _check_draft(draft)
    owned = None  # the file opened here, closed before returning
    data: Any = None  # the encoded bytes, when given as such
    if isinstance(path, (str, os.PathLike)):
        fname = os.fsdecode(path)
        shown = repr(fname)
        # regular files only: a FIFO or a device would block or never end
        owned = open_regular(fname, what="image file", error=ImageDecodeError, op="load_image")
        source: Any = owned
    elif isinstance(path, ENCODED_TYPES):
        data = encoded_view(path)
        shown = f"<{len(data)} encoded bytes>"
        source = io.BytesIO(data)
    elif hasattr(path, "read"):
        source = path
        shown = repr(getattr(path, "name", None) or f"<{type(path).__name__}>")
    else:
        raise ArgumentError(f"[load_image] path must be a str or os.PathLike (a file name), "
                            f"bytes, bytearray or memoryview (an encoded image) or a binary "
                            f"file object, got {type(path).__name__}")

    def fail(msg: str, exc: Optional[BaseException] = None) -> ImageDecodeError:
        err = ImageDecodeError(f"[load_image] cannot decode image {shown}: {msg}")
        if exc is not None:
            err.__cause__ = exc
        return err

    try:
        return _decode_image(source, data, fail, limit, bg, reduce_to, Image, ImageOps,
                             UnidentifiedImageError)
    finally:
        if owned is not None:
            owned.close()


#: What counts as an encoded image (or audio, video) held in memory.
ENCODED_TYPES = (bytes, bytearray, memoryview)


def encoded_view(value: Any) -> Any:
    """``value`` (bytes, bytearray or memoryview) as a flat bytes-like object, without a copy
    where possible (a non-contiguous or multi-dimensional memoryview is copied)."""
    if isinstance(value, memoryview):
        if value.ndim != 1 or value.itemsize != 1 or not value.c_contiguous:
            return value.tobytes()
        return value
    return value


def _check_draft(value: Any) -> Optional[int]:
    if value is None:
        return None
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)) \
            or int(value) < 1:
        raise ArgumentError(f"[load_image] draft must be None or a positive int (the smallest "
                            f"edge to keep, in pixels), got {value!r}")
    return int(value)


def _read_from(source: Any, fail) -> Any:
    """The encoded bytes of an opened file or file object (from its start, as Pillow); None
    for a stream that cannot seek (Pillow has read it already and decodes it itself)."""
    try:
        source.seek(0)
    except (OSError, ValueError, AttributeError):
        return None
    try:
        data = source.read()
    except (OSError, ValueError) as exc:
        raise fail(f"{type(exc).__name__}: {exc}", exc) from None
    if not isinstance(data, (bytes, bytearray)):
        raise fail(f"the file object's read() gave {type(data).__name__}, not bytes (open "
                   "the file in binary mode)")
    return data


def _decode_image(source: Any, data: Any, fail, limit: float,
                  bg: Optional[Tuple[int, int, int]], draft: Optional[int], Image, ImageOps,
                  UnidentifiedImageError) -> np.ndarray:
    """The body of :func:`load_image` once ``source`` is an open file or file object
    (``data``: its bytes when the caller had them)."""
    try:
        with warnings.catch_warnings():
            # the size is checked below against max_pixels; Pillow's warning adds nothing
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            im = Image.open(source)
    except Image.DecompressionBombError as exc:
        raise fail(f"too large, a possible decompression bomb ({exc})", exc) from None
    except UnidentifiedImageError as exc:
        raise fail("not an image file Pillow recognizes (unknown format or corrupt header)",
                   exc) from None
    except (OSError, ValueError, SyntaxError, EOFError, TypeError) as exc:
        raise fail(f"{type(exc).__name__}: {exc}", exc) from None
    try:
        with im:
            w, h = im.size
            if w * h > limit:
                raise fail(f"{w} x {h} = {w * h} pixels is more than max_pixels="
                           f"{limit:.0f}, a possible decompression bomb (pass a larger "
                           "max_pixels to load it anyway)")
            if w < 1 or h < 1:
                raise fail(f"the image is empty ({w} x {h})")
            if im.format == "JPEG" and _jpeg.available():
                if data is None:  # Pillow reads a file object from its start, as here
                    data = _read_from(source, fail)
                fast = None if data is None else _jpeg.decode(data, im, draft=draft)
                if fast is not None:
                    return fast
            try:
                if draft is not None and im.format == "JPEG":
                    im.draft(im.mode, (draft, draft))
                im.load()
                upright = ImageOps.exif_transpose(im)
                if upright is None:  # pragma: no cover - only with in_place=True
                    upright = im
                out = _to_rgb(upright, bg, Image)
            except ImageDecodeError:
                raise
            except MemoryError as exc:
                raise fail(f"out of memory decoding a {w} x {h} image", exc) from None
            except (OSError, ValueError, SyntaxError, EOFError, TypeError, IndexError,
                    KeyError, ZeroDivisionError) as exc:
                text = str(exc)
                if "truncated" in text.lower():
                    raise fail(f"truncated ({text})", exc) from None
                raise fail(f"{type(exc).__name__}: {text}", exc) from None
    except ImageDecodeError:
        raise
    except OSError as exc:  # closing the file
        raise fail(f"{type(exc).__name__}: {exc}", exc) from None
    return np.ascontiguousarray(out, dtype=np.uint8)


# --------------------------------------------------------------------------------------------
# batched preprocessing

def config_image_kwargs(config: PreprocessingConfig) -> Dict[str, Any]:
    """The keyword arguments of ``mmcore.ops.preprocess_image`` that ``config`` sets.

    ``preset`` is always passed; the other fields only when they are not None, so that the
    preset's own choices apply to the rest.
    """
    kw: Dict[str, Any] = {"preset": config.preset}
    for name in ("size", "crop_size", "resize_mode", "filter", "mean", "std", "patch_size"):
        v = getattr(config, name)
        if v is not None:
            kw[name] = v
    return kw


def preprocess_image_op():
    """``mmcore.ops.preprocess_image``, or a ConfigError when this build lacks it."""
    fn = getattr(ops, "preprocess_image", None)
    if fn is None:
        raise ConfigError("this mmcore build has no mmcore.ops.preprocess_image")
    return fn


def as_preprocessing_config(config: Any, modality: str, owner: str) -> PreprocessingConfig:
    """``config`` (a PreprocessingConfig, a mapping or None) as the preprocessing config of
    ``modality``; ConfigError naming ``owner`` otherwise."""
    if config is None:
        config = PreprocessingConfig(modality=modality)
    elif isinstance(config, Mapping):
        data = dict(config)
        data.setdefault("modality", modality)
        config = PreprocessingConfig.from_dict(data)
    elif not isinstance(config, PreprocessingConfig):
        raise ConfigError(f"{owner}.config must be a PreprocessingConfig, a mapping or None, "
                          f"got {type(config).__name__}")
    if config.modality != modality:
        raise ConfigError(f"{owner}.config.modality must be {modality!r}, "
                          f"got {config.modality!r}")
    return config


class ImagePreprocessor:
    """Turn images (files, encoded bytes and/or arrays) into ``pixel_values``.

    Parameters
    ----------
    config : PreprocessingConfig, mapping or None
        The image settings (``modality="image"``; a mapping is passed to
        :meth:`PreprocessingConfig.from_dict` with that modality filled in; None: the CLIP
        defaults, 224 x 224).
    max_pixels : int, math.inf or None, default None
        Passed to :func:`load_image` for files and encoded images.
    decode_scale : {"exact", "auto"} or None, default None
        None: the config's ``extra["decode_scale"]`` (``"exact"`` when it has none; a model
        directory opts in that way, without a schema change). ``"exact"`` decodes every
        image at full size (bit-identical to Pillow). ``"auto"`` (opt-in, approximate)
        decodes JPEGs at a reduced DCT scale that keeps both edges ``>= 2x`` the resize
        target (``load_image(..., draft=2 * target)``): for a photo much larger than the
        model input most of the decode is skipped, and the result differs from the exact
        path by a few uint8 levels (see :func:`load_image`).

    Call
    ----
    ``preprocessor(images)`` where ``images`` is one of

    * a file path (str or os.PathLike), an encoded image (bytes, bytearray, memoryview or a
      binary file object) or a uint8 ``(H, W, 3)`` array: one image;
    * a uint8 ``(N, H, W, 3)`` array: a batch of equally sized images;
    * a list/tuple of any of the single-image forms, possibly of different sizes.

    Arrays go through ONE call of ``mmcore.ops.preprocess_image(images, preset=..., size=...,
    ...)`` with the fields the config sets (None fields are left to the preset). A list with
    files or encoded images is decoded on mmcore's decode threads (``mmcore.set_num_threads``
    of them; the decoders release the GIL), each image resized and normalized as soon as it
    is decoded, into one output tensor; the values are the same as decoding first and making
    one call.

    Returns
    -------
    dict
        ``"pixel_values"``: float32 ``(N, 3, S, S)`` (``(N, num_patches, 3 * p * p)`` with
        ``patch_size``), always batched (N = 1 for one image).

    Examples
    --------
    >>> import io, numpy as np, mmcore
    >>> from PIL import Image
    >>> from mmcore.preprocess import ImagePreprocessor
    >>> buf = io.BytesIO()
    >>> Image.fromarray(np.zeros((48, 64, 3), np.uint8)).save(buf, "JPEG")
    >>> if hasattr(mmcore.ops, "preprocess_image"):
    ...     out = ImagePreprocessor()([np.zeros((48, 64, 3), np.uint8), buf.getvalue()])
    ...     assert out["pixel_values"].shape == (2, 3, 224, 224)
    """

    def __init__(self, config: Union[PreprocessingConfig, Mapping[str, Any], None] = None, *,
                 max_pixels: Optional[float] = None, decode_scale: Optional[str] = None):
        self.config = as_preprocessing_config(config, "image", "ImagePreprocessor")
        self.max_pixels = max_pixels
        if decode_scale is None:
            decode_scale = (self.config.extra or {}).get("decode_scale", "exact")
        if decode_scale not in ("exact", "auto"):
            raise ArgumentError(f"[ImagePreprocessor] decode_scale must be 'exact' or 'auto', "
                                f"got {decode_scale!r}")
        self.decode_scale = decode_scale
        self._draft = draft_for(self.config) if decode_scale == "auto" else None

    def __repr__(self) -> str:
        extra = "" if self.decode_scale == "exact" else f", decode_scale={self.decode_scale!r}"
        return f"ImagePreprocessor({self.config!r}{extra})"

    def _item(self, x: Any, i: Optional[int]) -> np.ndarray:
        if is_encoded(x):
            return load_image(x, max_pixels=self.max_pixels, draft=self._draft)
        where = "images" if i is None else f"images[{i}]"
        arr = np.asarray(x)
        if arr.dtype != np.uint8 or arr.ndim != 3 or arr.shape[2] != 3:
            raise ShapeError(f"[ImagePreprocessor] {where} has shape {arr.shape} and dtype "
                             f"{arr.dtype}, expected a uint8 (H, W, 3) RGB image, a path or an "
                             "encoded image")
        return arr

    def _inputs(self, images: Any) -> Any:
        if is_encoded(images):
            return self._item(images, None)[None]
        if isinstance(images, (list, tuple)):
            if len(images) == 0:
                raise ShapeError("[ImagePreprocessor] images is an empty batch")
            return [self._item(x, i) for i, x in enumerate(images)]
        arr = np.asarray(images)
        if arr.dtype == np.uint8 and arr.ndim == 3 and arr.shape[2] == 3:
            return arr[None]
        if arr.dtype == np.uint8 and arr.ndim == 4 and arr.shape[3] == 3:
            if arr.shape[0] == 0:
                raise ShapeError("[ImagePreprocessor] images is an empty batch (N = 0)")
            return arr
        raise ShapeError(f"[ImagePreprocessor] images has shape {arr.shape} and dtype "
                         f"{arr.dtype}, expected uint8 (H, W, 3), (N, H, W, 3), a path, an "
                         "encoded image or a list of them")

    def _pipelined(self, images: Sequence[Any], fn, kw: Dict[str, Any]) -> np.ndarray:
        """Decode and preprocess each image on the decode threads, into one tensor."""
        def one(pair: Tuple[int, Any]) -> np.ndarray:
            i, x = pair
            return fn(self._item(x, i)[None], **kw)[0]

        out: Optional[np.ndarray] = None
        for i, r in enumerate(map_ordered(one, list(enumerate(images)))):
            if out is None:
                out = np.empty((len(images),) + r.shape, np.float32)
            out[i] = r
        assert out is not None
        return out

    def __call__(self, images: Any) -> Dict[str, np.ndarray]:
        """``{"pixel_values": ...}`` of ``images`` (see the class docstring)."""
        fn = preprocess_image_op()
        kw = config_image_kwargs(self.config)
        if isinstance(images, (list, tuple)) and len(images) > 1 and any(
                is_encoded(x) for x in images):
            return {"pixel_values": self._pipelined(images, fn, kw)}
        out = fn(self._inputs(images), **kw)
        return {"pixel_values": np.asarray(out, dtype=np.float32)}


def is_encoded(x: Any) -> bool:
    """True for what :func:`load_image` decodes: a path (str, os.PathLike), encoded bytes
    (bytes, bytearray, memoryview) or a binary file object."""
    return isinstance(x, (str, os.PathLike) + ENCODED_TYPES) or hasattr(x, "read")


def draft_for(config: PreprocessingConfig) -> int:
    """The ``draft`` of ``decode_scale="auto"``: twice the longest edge the config resizes
    to (the preset's edge, or ``int(edge / crop_pct)`` for the ImageNet preset)."""
    kw = config_image_kwargs(config)
    preset = ops.image.PRESETS.get(kw.get("preset") or "", None)
    size = kw.get("size", 224)
    if isinstance(size, (int, np.integer)):
        edge = int(size)
        mode = kw.get("resize_mode") or (preset.resize_mode if preset else "shortest_edge")
        if mode == "shortest_edge" and preset is not None and preset.crop_pct:
            edge = int(edge / preset.crop_pct)
    else:
        edge = max(int(v) for v in size)
    return 2 * edge
