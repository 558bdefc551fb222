"""Image ops: resize, normalize, patchify and the fused ``preprocess_image``.

* :func:`resize` -- separable resampling with Pillow's conventions (nearest, bilinear, bicubic,
  lanczos; antialiased when downscaling). uint8 results equal Pillow's ``Image.resize`` (see
  the notes of :func:`resize` for the one known difference).
* :func:`normalize` -- ``(x * scale - mean) / std`` per channel, HWC to CHW, in one pass.
* :func:`patchify` -- non-overlapping patches flattened channel-major (the order of a Conv2d
  patch embedding), optionally with a temporal patch for video (Qwen2-VL).
* :func:`preprocess_image` -- resize + center crop + rescale + normalize [+ patchify] in one
  pass over the pixels, with the presets of CLIP, SigLIP and torchvision's ImageNet models.

Images are ``(H, W, C)`` arrays, channels last, as decoded by Pillow; a batch is ``(N, H, W, C)``
or a list of ``(H, W, C)`` arrays of different sizes (processed in one call, in parallel over
the images). Views with strided rows (crops of a bigger image, ``img[::2]``) are read in place;
other layouts (``img[:, ::-1]``, channel-first views) are copied first. Host arrays run on the
``native`` (default) or ``numba`` backend; CuPy / CUDA arrays run on ``cuda`` and give CuPy
results on the same device.

Array problems (rank, dtype, empty images) raise :class:`~mmcore.errors.ShapeError`; options of
the wrong type or out of range raise :class:`~mmcore.errors.ArgumentError` naming the option:
sizes and patch sizes are ints (NumPy integers included, ``bool`` refused) in ``[1, 2**16]``
(``MAX_SIDE``), ``scale`` / ``mean`` / ``std`` must be finite in float32 and ``std`` non-zero.
"""

from __future__ import annotations

from typing import Any, List, Literal, NamedTuple, Optional, Sequence, Tuple, Union, overload

import numpy as np

from .. import _backend
from ..errors import ArgumentError, ShapeError
from ..kernels import launcher
from ..kernels.cuda.common import cupy_module, device_array
from ._checks import as_host_array, check_bool, check_choice, check_int, finite_float
from ._types import Array, Backend

__all__ = ["resize", "normalize", "patchify", "preprocess_image", "FILTERS", "RESIZE_MODES",
           "PRESETS", "ImagePreset"]

FILTERS = ("nearest", "bilinear", "bicubic", "lanczos")
RESIZE_MODES = ("shortest_edge", "squash")
LAYOUTS = ("chw", "hwc")

#: The names of :data:`FILTERS`, :data:`RESIZE_MODES` and :data:`PRESETS`, for the signatures.
Filter = Literal["nearest", "bilinear", "bicubic", "lanczos"]
ResizeMode = Literal["shortest_edge", "squash"]
PresetName = Literal["clip", "siglip", "imagenet"]
#: ``mean`` / ``std``: one value for every channel, or one per channel.
ChannelValues = Union[float, Sequence[float], np.ndarray]

_FLOAT_CAST = (np.dtype(np.float16), np.dtype(np.float64))
_U8_CHANNELS = (1, 3, 4)


class ImagePreset(NamedTuple):
    """The choices a :func:`preprocess_image` preset makes (any of them can be overridden)."""

    resize_mode: str
    filter: str
    mean: Tuple[float, ...]
    std: Tuple[float, ...]
    crop_pct: Optional[float]   # shortest edge = int(size / crop_pct) before the crop to size


OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

PRESETS = {
    # OpenAI CLIP / Hugging Face CLIPImageProcessor
    "clip": ImagePreset("shortest_edge", "bicubic", OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, None),
    # Hugging Face SiglipImageProcessor
    "siglip": ImagePreset("squash", "bicubic", (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), None),
    # torchvision / timm ImageNet evaluation: Resize(256, bilinear) + CenterCrop(224)
    "imagenet": ImagePreset("shortest_edge", "bilinear", IMAGENET_MEAN, IMAGENET_STD, 0.875),
}
_NO_PRESET = ImagePreset("shortest_edge", "bicubic", (0.0, 0.0, 0.0), (1.0, 1.0, 1.0), None)


# ----------------------------------------------------------------------------------------------
# argument checks


#: The largest output side (height or width, in pixels) and patch size the image ops accept:
#: 2**16. A larger size can only be a mistake (a 65536 x 65536 RGB float32 output is 48 GiB).
MAX_SIDE = 1 << 16


def _side(op: str, name: str, value) -> int:
    """A size or patch size: an int in ``[1, MAX_SIDE]``."""
    return check_int(name, value, op=op, lo=1, hi=MAX_SIDE)


def _pair_arg(op: str, name: str, value, *, allow_int: bool) -> Tuple[int, int]:
    """``(h, w)`` from a pair of positive ints (or one int for a square when ``allow_int``)."""
    if isinstance(value, (str, bytes)):
        raise ArgumentError(f"[{op}] {name} must be a pair (height, width) of ints, "
                            f"got {value!r}")
    if isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_)):
        if not allow_int:
            raise ArgumentError(f"[{op}] {name} must be a pair (height, width), got the int "
                                f"{value!r}; pass ({value}, {value}) for a square")
        v = _side(op, name, value)
        return v, v
    try:
        items = list(value)
    except TypeError:
        raise ArgumentError(f"[{op}] {name} must be a pair (height, width) of ints, "
                            f"got {value!r}") from None
    if len(items) != 2:
        raise ArgumentError(f"[{op}] {name} must be a pair (height, width) of ints, got {value!r}")
    return _side(op, f"{name}[0]", items[0]), _side(op, f"{name}[1]", items[1])


def _channel_values(op: str, name: str, value, C: int) -> np.ndarray:
    """``mean`` / ``std``: one float or one per channel, finite in float32; float32 (C,).

    A string, values not finite (in float32) or a zero ``std``: ArgumentError; a wrong number
    of values or a non-real dtype: ShapeError.
    """
    if isinstance(value, (str, bytes)):
        raise ArgumentError(f"[{op}] {name} must be a number or {C} numbers, got {value!r}")
    v = as_host_array(op, name, value)
    if v.dtype.kind not in "fiu" or v.dtype == np.bool_:
        raise ShapeError(f"[{op}] {name} must hold real numbers, got dtype {v.dtype}")
    if v.ndim == 0:
        v = np.full(C, v, dtype=np.float64)
    elif v.ndim != 1 or v.shape[0] != C:
        raise ShapeError(f"[{op}] {name} has shape {v.shape}, expected one value or ({C},) = one "
                         "per channel")
    with np.errstate(over="ignore", invalid="ignore"):   # beyond float32 becomes inf: refused
        v = v.astype(np.float32)
    if not np.isfinite(v).all():
        raise ArgumentError(f"[{op}] {name} must be finite in float32, got {value!r}")
    if name == "std" and (v == 0).any():
        raise ArgumentError(f"[{op}] std must be non-zero (also in float32), got {value!r}")
    return v




def _array(op: str, name: str, x, xp):
    """``x`` as an array of the backend's array module, without copies between devices."""
    if xp is np:
        return as_host_array(op, name, x)
    return device_array(xp, op, name, x)


def _rows_readable(a) -> bool:
    """True when every row of the (H, W, C) ``a`` is contiguous and rows are a positive stride
    apart: the layout the kernels read in place."""
    H, W, C = a.shape
    item = a.dtype.itemsize
    s0, s1, s2 = a.strides
    if not ((s2 == item or C == 1) and (s1 == item * C or W == 1)):
        return False
    return s0 >= 0 and s0 % item == 0 and (H == 1 or s0 == 0 or s0 >= item * W * C)


def _readable(a, xp):
    """``a`` (H, W, C) or (N, H, W, C) itself when the kernels can read it, else a copy.

    Leading axes (N, H) with stride 0 (broadcast views) stay broadcast: only one slice along
    them is copied, so a view repeating one row 2^31 times costs one row of memory.
    """
    if a.size == 0:
        return a
    if _rows_readable(a if a.ndim == 3 else a[0]):
        return a
    lead = a.ndim - 2
    if any(a.strides[i] == 0 for i in range(lead)):
        one = a[tuple(slice(0, 1) if a.strides[i] == 0 else slice(None) for i in range(lead))]
        return xp.broadcast_to(xp.ascontiguousarray(one), a.shape)
    # A fresh C-ordered copy: ascontiguousarray hands back views NumPy calls contiguous but
    # whose strides the kernels refuse (a flipped one-row image keeps its negative row stride).
    return xp.array(a, order="C", copy=True)


class _Images(NamedTuple):
    items: list          # (H, W, C) arrays the kernels can read
    kind: str            # "image" (H, W, C), "gray" (H, W), "batch" (N, H, W, C), "list"
    xp: Any              # numpy or cupy
    backend: str
    batch: Any = None    # the (N, H, W, C) array of a batch (N may be 0)


def _image_dtype(op: str, name: str, a, xp, *, floats: bool):
    dt = np.dtype(a.dtype)
    if dt == np.uint8:
        return a
    if floats and dt == np.float32:
        return a
    if floats and dt in _FLOAT_CAST:
        return a.astype(xp.float32)
    expected = "uint8 or float32 (float16 and float64 are cast to float32)" if floats else "uint8"
    raise ShapeError(f"[{op}] {name} has dtype {dt}, expected {expected}")


def _check_image_shape(op: str, name: str, shape) -> None:
    H, W, C = shape
    if H < 1 or W < 1:
        raise ShapeError(f"[{op}] {name} is empty: (H, W) = ({H}, {W}), expected at least one "
                         "pixel")
    if C < 1:
        raise ShapeError(f"[{op}] {name} has no channels: (H, W, C) = {tuple(shape)}")


def _images(op: str, img, backend, *, floats: bool) -> _Images:
    """Classify ``img`` and check every image: rank, size, dtype and layout."""
    if isinstance(img, (list, tuple)):
        name = _backend.resolve_backend(op, list(img), backend)
        xp = cupy_module(op) if name == "cuda" else np
        items: list = []
        for i, x in enumerate(img):
            where = f"img[{i}]"
            a = _array(op, where, x, xp)
            if a.ndim == 2:
                a = a[:, :, None]
            if a.ndim != 3:
                raise ShapeError(f"[{op}] {where} has {a.ndim} dims, expected 3 (H, W, C) "
                                 "(or 2 for grayscale)")
            a = _image_dtype(op, where, a, xp, floats=floats)
            _check_image_shape(op, where, a.shape)
            if items and a.dtype != items[0].dtype:
                raise ShapeError(f"[{op}] {where} has dtype {a.dtype} but img[0] has "
                                 f"{items[0].dtype}; the images of one call share a dtype")
            items.append(_readable(a, xp))
        return _Images(items, "list", xp, name)
    name = _backend.resolve_backend(op, (img,), backend)
    xp = cupy_module(op) if name == "cuda" else np
    a = _array(op, "img", img, xp)
    if a.ndim not in (2, 3, 4):
        raise ShapeError(f"[{op}] img has {a.ndim} dims, expected (H, W), (H, W, C) or "
                         "(N, H, W, C), or a list of images")
    a = _image_dtype(op, "img", a, xp, floats=floats)
    if a.ndim == 4:
        _check_image_shape(op, "img", a.shape[1:])
        a = _readable(a, xp)
        return _Images([a[i] for i in range(a.shape[0])], "batch", xp, name, a)
    kind = "gray" if a.ndim == 2 else "image"
    if a.ndim == 2:
        a = a[:, :, None]
    _check_image_shape(op, "img", a.shape)
    return _Images([_readable(a, xp)], kind, xp, name)


# ----------------------------------------------------------------------------------------------
# resize


# A list or tuple of images gives a list; an array gives an array.
@overload
def resize(img: Union[List[Array], Tuple[Array, ...]], size: Sequence[int], *,
           filter: Filter = "bicubic", antialias: bool = True,
           backend: Optional[Backend] = None) -> List[Array]: ...
@overload
def resize(img: Array, size: Sequence[int], *, filter: Filter = "bicubic",
           antialias: bool = True, backend: Optional[Backend] = None) -> Array: ...
def resize(img: Union[Array, List[Array], Tuple[Array, ...]], size: Sequence[int], *,
           filter: Filter = "bicubic", antialias: bool = True,
           backend: Optional[Backend] = None) -> Union[Array, List[Array]]:
    """Resize images with Pillow's resampling filters.

    A separable filter: a horizontal pass, then a vertical one. Output pixel ``i`` of an axis
    resized from ``n_in`` to ``n_out`` samples is centred at ``(i + 0.5) * n_in / n_out`` in the
    input (pixel centres aligned, ``align_corners=False``); its weights are the filter sampled at
    the input pixel centres and normalized to sum 1. When downscaling with ``antialias`` the
    filter is stretched by the scale factor (a box-like average over all covered pixels), as in
    Pillow and ``torchvision.transforms.functional.resize(..., antialias=True)``.

    Parameters
    ----------
    img : array (H, W, C), (H, W), (N, H, W, C) or a list of (H, W, C) / (H, W) arrays
        uint8 (C = 1, 3 or 4) or float32 (any C; float16 and float64 are computed and returned
        as float32). A list may mix sizes (one call, in parallel over the images) but not
        dtypes. uint8 4-channel images are RGBA: the colour channels are filtered premultiplied
        by alpha, as Pillow does (except with "nearest" and at an unchanged size).
    size : (int, int)
        Output ``(height, width)``, both >= 1 (note: Pillow takes ``(width, height)``).
    filter : {"nearest", "bilinear", "bicubic", "lanczos"}, default "bicubic"
        Pillow's NEAREST, BILINEAR (triangle), BICUBIC (Keys, ``a = -0.5``) and LANCZOS
        (``sinc(x) sinc(x/3)``, 3 lobes). "nearest" takes the input pixel under each output
        pixel centre.
    antialias : bool, default True
        Widen the filter by the scale factor when downscaling (Pillow always does). False keeps
        the filter at its upscaling width (sampling, aliasing). Ignored by "nearest".
    backend : {"native", "numba", "cuda"}, optional
        Override the backend (see :mod:`mmcore._backend`).

    Returns
    -------
    array
        Same kind and dtype as ``img``: ``(h, w, C)``, ``(h, w)``, ``(N, h, w, C)`` or a list.

    Notes
    -----
    uint8 images are filtered in Pillow's 22-bit fixed point with a uint8 intermediate, in
    Pillow 13's pass order, so the result equals ``np.asarray(PIL.Image.fromarray(img).resize(
    (w, h), filter, reducing_gap=None))`` of Pillow 13 exactly (RGBA with premultiplied alpha
    as Pillow does). Pillow 13 runs the vertical pass first when the output is shorter and the
    height shrinks by more than twice as many pixels as the width (``H - h > 2 * (W - w)``);
    Pillow 12 and older always start with the horizontal pass, so for those shapes they can
    differ from mmcore by several levels next to strong edges, where the clipped intermediate
    is rounded at a different place. float32 images use the same weights without rounding or
    clipping (like Pillow's mode "F").

    Examples
    --------
    >>> import numpy as np
    >>> from mmcore.ops import resize
    >>> img = np.zeros((480, 640, 3), np.uint8)
    >>> img[:, 320:] = 255                                      # black | white
    >>> out = resize(img, (240, 320))
    >>> out.shape, out.dtype, out[0, 150].tolist(), out[0, 170].tolist()
    ((240, 320, 3), dtype('uint8'), [0, 0, 0], [255, 255, 255])
    >>> [o.shape for o in resize([img, img[:100, :50]], (32, 32), filter="bilinear")]
    [(32, 32, 3), (32, 32, 3)]
    """
    op = "resize"
    ims = _images(op, img, backend, floats=True)
    oh, ow = _pair_arg(op, "size", size, allow_int=False)
    filt = check_choice("filter", filter, FILTERS, op=op)
    aa = check_bool("antialias", antialias, op=op)
    xp = ims.xp
    for i, a in enumerate(ims.items if ims.kind != "batch" else [ims.batch]):
        if a.dtype == np.uint8 and a.shape[-1] not in _U8_CHANNELS:
            where = "img" if ims.kind != "list" else f"img[{i}]"
            raise ShapeError(f"[{op}] {where} has {a.shape[2]} channels, expected 1, 3 or 4 for "
                             "uint8 images (use float32 for other channel counts)")
    if ims.kind == "batch":
        N, C = int(ims.batch.shape[0]), int(ims.batch.shape[3])
        out = xp.empty((N, oh, ow, C), ims.batch.dtype)
        dsts = [out[i] for i in range(N)]
    else:
        dsts = [xp.empty((oh, ow, a.shape[2]), a.dtype) for a in ims.items]
    if ims.items:
        launcher(op, ims.backend, "image", "resize")(ims.items, dsts, filter=filt, antialias=aa)
    if ims.kind == "batch":
        return out
    if ims.kind == "list":
        return dsts
    return dsts[0][:, :, 0] if ims.kind == "gray" else dsts[0]


# ----------------------------------------------------------------------------------------------
# normalize


def normalize(img: Array, *, mean: ChannelValues, std: ChannelValues, scale: float = 1.0 / 255.0,
              layout: Literal["chw", "hwc"] = "chw", backend: Optional[Backend] = None) -> Array:
    """Rescale and normalize per channel, moving channels first: ``(x * scale - mean) / std``.

    The arithmetic is float32, rounded after each operation: ``v = float32(x)``,
    ``(v * float32(scale) - mean[c]) / std[c]``, equal to the same NumPy expression on float32
    arrays. Fusing the three steps and the layout change reads and writes each pixel once.

    Parameters
    ----------
    img : array (H, W, C) or (N, H, W, C)
        uint8 or float32 (float16 and float64 are cast to float32). Any C >= 1.
    mean, std : float or sequence of C floats
        Per-channel mean and standard deviation (after scaling); ``std`` must be non-zero.
    scale : float, default 1/255
        Multiplies the pixels first (1/255 maps uint8 to [0, 1]; use 1.0 for float images that
        are already scaled).
    layout : {"chw", "hwc"}, default "chw"
        "chw" returns channels first (PyTorch's layout), "hwc" keeps them last.
    backend : {"native", "numba", "cuda"}, optional
        Override the backend (see :mod:`mmcore._backend`).

    Returns
    -------
    float32 array (C, H, W) / (N, C, H, W), or (H, W, C) / (N, H, W, C) for ``layout="hwc"``

    Examples
    --------
    >>> import numpy as np
    >>> from mmcore.ops import normalize
    >>> img = np.zeros((2, 3, 3), np.uint8)
    >>> img[..., 0] = 255                                          # red
    >>> x = normalize(img, mean=0.5, std=0.5)                      # [0, 255] -> [-1, 1]
    >>> x.shape, x.dtype, x[:, 0, 0].round(4).tolist()
    ((3, 2, 3), dtype('float32'), [1.0, -1.0, -1.0])
    """
    op = "normalize"
    name = _backend.resolve_backend(op, (img,), backend)
    xp = cupy_module(op) if name == "cuda" else np
    a = _array(op, "img", img, xp)
    if a.ndim not in (3, 4):
        raise ShapeError(f"[{op}] img has {a.ndim} dims, expected 3 (H, W, C) or 4 (N, H, W, C)")
    a = _image_dtype(op, "img", a, xp, floats=True)
    _check_image_shape(op, "img", a.shape[-3:])
    single = a.ndim == 3
    if single:
        a = a[None]
    N, H, W, C = (int(n) for n in a.shape)
    m = _channel_values(op, "mean", mean, C)
    s = _channel_values(op, "std", std, C)
    sc = finite_float(op, "scale", scale)
    lay = check_choice("layout", layout, LAYOUTS, op=op)
    out = xp.empty((N, C, H, W) if lay == "chw" else (N, H, W, C), xp.float32)
    if N:
        src = xp.ascontiguousarray(a)
        launcher(op, name, "image", "normalize")(src, out, m, s, scale=sc, layout=lay)
    return out[0] if single else out


# ----------------------------------------------------------------------------------------------
# patchify


def patchify(x: Array, patch_size: int, *, temporal_patch: int = 1,
             backend: Optional[Backend] = None) -> Array:
    """Cut images (or clips) into non-overlapping patches, each flattened channel-major.

    For ``x (..., C, H, W)`` and ``p = patch_size`` the result is ``(..., (H/p) * (W/p),
    C * p * p)``: patches row-major over the ``(H/p, W/p)`` grid, each flattened in the order
    ``(c, y, x)``, so that ``patches @ weight.reshape(D, -1).T`` equals a ``Conv2d(C, D, p,
    stride=p)`` patch embedding (ViT, CLIP, SigLIP).

    With ``temporal_patch = tp > 1``, ``x`` is ``(..., T, C, H, W)`` and ``tp`` consecutive frames
    form one patch (Qwen2-VL's video patches, a ``Conv3d`` with kernel ``(tp, p, p)``): the result
    is ``(..., (T/tp) * (H/p) * (W/p), C * tp * p * p)``, each patch flattened ``(c, t, y, x)``,
    patches ordered by temporal group first, then row-major.

    Parameters
    ----------
    x : array (..., C, H, W), or (..., T, C, H, W) with ``temporal_patch > 1``
        float32 (float16 and float64 are cast). Leading dimensions are batch dimensions.
    patch_size : int
        Patch height and width; must divide H and W.
    temporal_patch : int, default 1
        Frames per patch; must divide T.
    backend : {"native", "numba", "cuda"}, optional
        Override the backend (see :mod:`mmcore._backend`).

    Returns
    -------
    float32 array (..., num_patches, patch_dim)

    Examples
    --------
    >>> import numpy as np
    >>> from mmcore.ops import patchify
    >>> x = np.arange(2 * 4 * 4, dtype=np.float32).reshape(2, 4, 4)      # C=2, 4x4
    >>> p = patchify(x, 2)
    >>> p.shape, p[1].tolist()                    # patch (0, 1): channel 0 then channel 1
    ((4, 8), [2.0, 3.0, 6.0, 7.0, 18.0, 19.0, 22.0, 23.0])
    >>> patchify(np.zeros((8, 3, 28, 28), np.float32), 14, temporal_patch=2).shape
    (16, 1176)
    """
    op = "patchify"
    name = _backend.resolve_backend(op, (x,), backend)
    xp = cupy_module(op) if name == "cuda" else np
    a = _array(op, "x", x, xp)
    p = _side(op, "patch_size", patch_size)
    tp = _side(op, "temporal_patch", temporal_patch)
    need = 3 if tp == 1 else 4
    if a.ndim < need:
        dims = "(..., C, H, W)" if tp == 1 else "(..., T, C, H, W) with temporal_patch > 1"
        raise ShapeError(f"[{op}] x has {a.ndim} dims, expected at least {need} {dims}")
    dt = np.dtype(a.dtype)
    if dt != np.float32 and dt not in _FLOAT_CAST:
        raise ShapeError(f"[{op}] x has dtype {dt}, expected float32 (float16 and float64 are "
                         "cast)")
    lead = tuple(int(n) for n in a.shape[:a.ndim - need])
    T = 1 if tp == 1 else int(a.shape[-4])
    C, H, W = (int(n) for n in a.shape[-3:])
    if C < 1 or H < 1 or W < 1:
        raise ShapeError(f"[{op}] x is empty: (C, H, W) = ({C}, {H}, {W})")
    if T < 1:
        raise ShapeError(f"[{op}] x has T = 0 frames")
    if H % p or W % p:
        raise ShapeError(f"[{op}] patch_size = {p} does not divide (H, W) = ({H}, {W})")
    if T % tp:
        raise ShapeError(f"[{op}] temporal_patch = {tp} does not divide T = {T} frames")
    B = int(np.prod(lead, dtype=np.int64)) if lead else 1
    n_patches = (T // tp) * (H // p) * (W // p)
    out = xp.empty((B, n_patches, C * tp * p * p), xp.float32)
    if B:
        src = xp.ascontiguousarray(a, dtype=xp.float32).reshape(B, T, C, H, W)
        launcher(op, name, "image", "patchify")(src, out, patch=p, temporal_patch=tp)
    return out.reshape(lead + out.shape[1:])


# ----------------------------------------------------------------------------------------------
# preprocess_image


class _Pipeline(NamedTuple):
    mode: str                       # "shortest_edge" or "squash"
    target: Tuple[int, ...]         # (edge,) for shortest_edge, (h, w) for squash
    crop: Tuple[int, int]
    filter: str
    mean: np.ndarray
    std: np.ndarray
    scale: float
    patch: int


def _pipeline(op, preset, size, crop_size, resize_mode, filter, mean, std, scale,
              patch_size) -> _Pipeline:
    if preset is None:
        pre = _NO_PRESET
    else:
        pre = PRESETS[check_choice("preset", preset, tuple(PRESETS), op=op)]
    if resize_mode is not None:
        check_choice("resize_mode", resize_mode, RESIZE_MODES, op=op)
    pair = not (isinstance(size, (int, np.integer)) and not isinstance(size, (bool, np.bool_)))
    target: Tuple[int, ...]
    if pair:
        h, w = _pair_arg(op, "size", size, allow_int=False)
        if resize_mode == "shortest_edge":
            raise ArgumentError(f"[{op}] size = {size!r} is a (height, width) pair, which needs "
                                "resize_mode='squash'; give one int for the shortest edge")
        mode, target, crop = "squash", (h, w), (h, w)
    else:
        s = _side(op, "size", size)
        mode = resize_mode if resize_mode is not None else pre.resize_mode
        crop = (s, s)
        if mode == "squash":
            target = (s, s)
        else:
            target = (int(s / pre.crop_pct) if pre.crop_pct else s,)
    if crop_size is not None:
        crop = _pair_arg(op, "crop_size", crop_size, allow_int=True)
    filt = check_choice("filter", filter if filter is not None else pre.filter, FILTERS,
                        op=op)
    m = _channel_values(op, "mean", pre.mean if mean is None else mean, 3)
    sd = _channel_values(op, "std", pre.std if std is None else std, 3)
    sc = finite_float(op, "scale", scale)
    p = 0
    if patch_size is not None:
        p = _side(op, "patch_size", patch_size)
        if crop[0] % p or crop[1] % p:
            raise ArgumentError(f"[{op}] patch_size = {p} does not divide the crop "
                                f"(height, width) = {crop}")
    return _Pipeline(mode, target, crop, filt, m, sd, sc, p)


def _resized_size(H: int, W: int, pl: _Pipeline) -> Tuple[int, int]:
    if pl.mode == "squash":
        return pl.target[0], pl.target[1]
    edge = pl.target[0]
    # Hugging Face's get_resize_output_image_size(default_to_square=False)
    if W <= H:
        return int(edge * H / W), edge
    return edge, int(edge * W / H)


def _as_rgb(op: str, where: str, a, xp):
    """uint8 (H, W, C) with C in (1, 3, 4) -> (H, W, 3): gray replicated, alpha dropped."""
    C = a.shape[2]
    if C == 3:
        return a
    if C == 1:
        return xp.ascontiguousarray(xp.broadcast_to(a, a.shape[:2] + (3,)))
    if C == 4:
        return xp.ascontiguousarray(a[:, :, :3])
    raise ShapeError(f"[{op}] {where} has {C} channels, expected 3 (RGB), 1 (gray) or 4 (RGBA)")


def preprocess_image(img: Union[Array, List[Array], Tuple[Array, ...]], *,
                     preset: Optional[PresetName] = "clip",
                     size: Union[int, Sequence[int]] = 224,
                     crop_size: Union[int, Sequence[int], None] = None,
                     resize_mode: Optional[ResizeMode] = None, filter: Optional[Filter] = None,
                     mean: Optional[ChannelValues] = None, std: Optional[ChannelValues] = None,
                     scale: float = 1.0 / 255.0, patch_size: Optional[int] = None,
                     backend: Optional[Backend] = None) -> Array:
    """Resize, center-crop, rescale and normalize images [and cut them into patches] in one pass.

    The model-input pipeline of CLIP-style image processors, fused: only the resized pixels
    inside the crop are computed, each is normalized as it is produced, and the result is
    written straight into the channels-first (or patch) layout.

    1. Resize with :func:`resize` (Pillow's filters, antialiased): ``resize_mode="shortest_edge"``
       scales the short side to the edge length and the long side to ``int(edge * long /
       short)`` (Hugging Face's ``get_resize_output_image_size(default_to_square=False)``,
       torchvision's ``Resize(int)``); ``"squash"`` resizes to ``size`` exactly, ignoring the
       aspect ratio.
    2. Center crop to ``crop_size`` at ``top = (h - crop_h) // 2``, ``left = (w - crop_w) // 2``
       (Hugging Face's ``center_crop``). Where the resized image is smaller than the crop the
       missing pixels are 0 (before normalization), as Hugging Face pads.
    3. ``(v * scale - mean) / std`` per channel in float32 (see :func:`normalize`), computed from
       the uint8 resized pixels.
    4. With ``patch_size``: :func:`patchify` of the result.

    Presets (every choice can be overridden by its argument):

    ============ =============== ========= ======================================== ==========
    preset       resize          filter    mean / std                               crop
    ============ =============== ========= ======================================== ==========
    "clip"       shortest edge   bicubic   OpenAI CLIP                              size
    "siglip"     squash          bicubic   0.5 / 0.5                                size
    "imagenet"   shortest edge   bilinear  ImageNet (0.485, 0.456, 0.406) /         size
                 int(size/0.875)           (0.229, 0.224, 0.225)
    None         shortest edge   bicubic   0 / 1 (rescale only)                     size
    ============ =============== ========= ======================================== ==========

    So ``preset="imagenet"`` with ``size=224`` resizes the short side to 256 and crops 224
    (torchvision's ``Resize(256) + CenterCrop(224)``; timm's ``crop_pct=0.875``). torchvision's
    ``CenterCrop`` rounds ``(h - 224) / 2`` to even instead of flooring it, so for odd margins
    its crop sits one pixel lower or further right.

    Parameters
    ----------
    img : uint8 array (H, W, C), (N, H, W, C), (H, W), or a list of such images
        RGB images (C = 3). Grayscale (C = 1 or 2-D) is replicated to RGB and RGBA (C = 4) has
        its alpha band dropped (not composited), as ``PIL.Image.convert("RGB")`` does. A list
        may hold images of different sizes: one call, in parallel over the images.
    preset : {"clip", "siglip", "imagenet", None}, default "clip"
        The defaults of the arguments below (table above).
    size : int or (int, int), default 224
        The output resolution: one int is the shortest edge (resized by ``crop_pct`` for
        "imagenet") and the square crop; a pair ``(height, width)`` resizes to exactly that
        size ("squash").
    crop_size : int or (int, int), optional
        Center crop ``(height, width)``; default ``size`` (or the pair given as ``size``).
    resize_mode : {"shortest_edge", "squash"}, optional
        Default: the preset's (``"squash"`` when ``size`` is a pair).
    filter : {"nearest", "bilinear", "bicubic", "lanczos"}, optional
        Default: the preset's.
    mean, std : float or three floats, optional
        Default: the preset's; ``std`` must be non-zero.
    scale : float, default 1/255
        Multiplies the uint8 pixels before the normalization.
    patch_size : int, optional
        Return patches ``(num_patches, 3 * p * p)`` (see :func:`patchify`); must divide the crop.
    backend : {"native", "numba", "cuda"}, optional
        Override the backend (see :mod:`mmcore._backend`).

    Returns
    -------
    float32 array
        ``(3, crop_h, crop_w)`` for one image, ``(N, 3, crop_h, crop_w)`` for a batch or a list;
        with ``patch_size``: ``(num_patches, 3 * p * p)`` / ``(N, num_patches, 3 * p * p)``.

    Examples
    --------
    >>> import numpy as np
    >>> from mmcore.ops import preprocess_image
    >>> rng = np.random.default_rng(0)
    >>> photo = rng.integers(0, 256, (480, 640, 3), dtype=np.uint8)
    >>> preprocess_image(photo).shape                                   # CLIP, 224 x 224
    (3, 224, 224)
    >>> batch = [photo, photo[:300, :200], rng.integers(0, 256, (64, 64), dtype=np.uint8)]
    >>> preprocess_image(batch, preset="siglip", size=384, patch_size=16).shape
    (3, 576, 768)
    """
    op = "preprocess_image"
    ims = _images(op, img, backend, floats=False)
    pl = _pipeline(op, preset, size, crop_size, resize_mode, filter, mean, std, scale,
                   patch_size)
    xp = ims.xp
    srcs = []
    for i, a in enumerate(ims.items):
        where = f"img[{i}]" if ims.kind == "list" else "img"
        srcs.append(_as_rgb(op, where, a, xp))
    N = len(srcs)
    geoms = np.empty((N, 4), np.int64)
    ch, cw = pl.crop
    for i, a in enumerate(srcs):
        rh, rw = _resized_size(int(a.shape[0]), int(a.shape[1]), pl)
        geoms[i] = (rh, rw, (rh - ch) // 2, (rw - cw) // 2)
    p = pl.patch
    if p:
        out = xp.empty((N, (ch // p) * (cw // p), 3 * p * p), xp.float32)
    else:
        out = xp.empty((N, 3, ch, cw), xp.float32)
    if N:
        kw = dict(crop_h=ch, crop_w=cw, filter=pl.filter, antialias=True, scale=pl.scale,
                  patch=p)
        launcher(op, ims.backend, "image", "preprocess_image")(srcs, out, geoms, pl.mean, pl.std,
                                                               **kw)
    return out[0] if ims.kind in ("image", "gray") else out
