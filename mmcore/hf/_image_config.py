"""The options of an image processor, checked: transformers' ``ImagesKwargs`` mapped onto
:func:`mmcore.ops.preprocess_image`, or a ConfigError naming the field mmcore cannot honour."""

from __future__ import annotations

import math
from typing import Any, Dict, NamedTuple, Optional, Tuple

import numpy as np

from ..errors import ConfigError

__all__ = ["IMAGE_FIELDS", "ImageOptions", "image_options", "target_size"]

#: The fields transformers' image processors read (``ImagesKwargs``); other keys of a config
#: are metadata that transformers ignores too.
IMAGE_FIELDS = ("do_convert_rgb", "do_resize", "size", "default_to_square", "crop_size",
                "resample", "do_rescale", "rescale_factor", "do_normalize", "image_mean",
                "image_std", "do_pad", "pad_size", "do_center_crop", "data_format",
                "input_data_format", "device", "return_tensors", "disable_grouping",
                "image_seq_length")

#: Pillow's resampling codes (PIL.Image.Resampling) -> the kernels' filters.
RESAMPLE = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic"}
_RESAMPLE_NAMES = {4: "BOX", 5: "HAMMING"}
_SIZE_KEYS = ({"height", "width"}, {"shortest_edge"}, {"shortest_edge", "longest_edge"})


class ImageOptions(NamedTuple):
    convert_rgb: bool
    resize: Optional[Dict[str, int]]          # None: no resize
    crop: Optional[Tuple[int, int]]           # None: no center crop
    filter: str
    scale: Optional[float]                    # None: no rescale
    mean: Optional[Tuple[float, ...]]         # None: no normalization
    std: Optional[Tuple[float, ...]]
    channels_first: Optional[bool]            # input layout of arrays; None: inferred


def _flag(op: str, field: str, value: Any) -> bool:
    if value is None or isinstance(value, (bool, np.bool_)):
        return bool(value)
    raise ConfigError(f"[{op}] {field} must be true, false or null, got {value!r}")


def _positive_int(op: str, field: str, value: Any) -> int:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)) \
            or not 1 <= int(value) <= 1 << 16:
        raise ConfigError(f"[{op}] {field} must be an int in [1, 65536], got {value!r}")
    return int(value)


def size_dict(op: str, field: str, value: Any, default_to_square: bool) -> Dict[str, int]:
    """transformers' ``get_size_dict``: an int, a (height, width) pair or a dict."""
    if isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_)):
        d: Dict[str, Any] = ({"height": value, "width": value} if default_to_square
                             else {"shortest_edge": value})
    elif isinstance(value, (list, tuple)) and len(value) == 2:
        d = {"height": value[0], "width": value[1]}
    elif isinstance(value, dict):
        d = dict(value)
    else:
        raise ConfigError(f"[{op}] {field} must be an int, a (height, width) pair or a dict, "
                          f"got {value!r}")
    d = {k: v for k, v in d.items() if v is not None}
    if set(d) not in _SIZE_KEYS:
        raise ConfigError(f"[{op}] {field} with keys {sorted(d)} is not supported: mmcore's "
                          "processors take {'height', 'width'}, {'shortest_edge'} or "
                          "{'shortest_edge', 'longest_edge'}")
    return {k: _positive_int(op, f"{field}.{k}", v) for k, v in d.items()}


def _channel_values(op: str, field: str, value: Any) -> Tuple[float, ...]:
    vals = value if isinstance(value, (list, tuple)) else [value]
    try:
        out = tuple(float(v) for v in vals)
    except (TypeError, ValueError):
        out = ()
    if not out or isinstance(value, (str, bytes)) or not all(math.isfinite(v) for v in out):
        raise ConfigError(f"[{op}] {field} must be a finite number or a list of them, "
                          f"got {value!r}")
    if field == "image_std" and any(v == 0 for v in out):
        raise ConfigError(f"[{op}] image_std must be non-zero, got {value!r}")
    return out


def _data_format(op: str, field: str, value: Any) -> Optional[bool]:
    """``"channels_first"`` -> True, ``"channels_last"`` -> False, None -> None."""
    value = getattr(value, "value", value)
    if value is None:
        return None
    if value in ("channels_first", "channels_last"):
        return value == "channels_first"
    raise ConfigError(f"[{op}] {field} must be 'channels_first', 'channels_last' or null, "
                      f"got {value!r}")


def image_options(op: str, cfg: Dict[str, Any]) -> ImageOptions:
    """Check the merged options ``cfg`` (class defaults, config file, call overrides)."""
    get = cfg.get
    do_resize = _flag(op, "do_resize", get("do_resize"))
    do_crop = _flag(op, "do_center_crop", get("do_center_crop"))
    do_rescale = _flag(op, "do_rescale", get("do_rescale"))
    do_normalize = _flag(op, "do_normalize", get("do_normalize"))
    if _flag(op, "do_pad", get("do_pad")):
        raise ConfigError(f"[{op}] do_pad (padding the batch) is not supported by mmcore's "
                          "processors")
    if _data_format(op, "data_format", get("data_format")) is False:
        raise ConfigError(f"[{op}] data_format 'channels_last' is not supported: the outputs are "
                          "channels-first, as transformers' Pillow-backed processors give them")
    resize = None
    filt = "bilinear"
    if do_resize:
        if get("size") is None:
            raise ConfigError(f"[{op}] size must be given when do_resize is set")
        resize = size_dict(op, "size", get("size"), bool(get("default_to_square")))
        resample = get("resample")
        resample = 2 if resample is None else getattr(resample, "value", resample)
        if isinstance(resample, bool) or resample not in RESAMPLE:
            name = _RESAMPLE_NAMES.get(resample) if isinstance(resample, int) else None
            what = f"Pillow's {name} filter" if name else repr(resample)
            raise ConfigError(f"[{op}] resample {what} is not supported: mmcore resizes with "
                              "0 (NEAREST), 1 (LANCZOS), 2 (BILINEAR) or 3 (BICUBIC)")
        filt = RESAMPLE[int(resample)]
    crop = None
    if do_crop:
        if get("crop_size") is None:
            raise ConfigError(f"[{op}] crop_size must be given when do_center_crop is set")
        c = size_dict(op, "crop_size", get("crop_size"), True)
        if set(c) != {"height", "width"}:
            raise ConfigError(f"[{op}] crop_size must have 'height' and 'width', got {sorted(c)}")
        crop = (c["height"], c["width"])
    scale = None
    if do_rescale:
        rf = get("rescale_factor")
        if isinstance(rf, bool) or not isinstance(rf, (int, float, np.floating, np.integer)) \
                or not math.isfinite(float(rf)):
            raise ConfigError(f"[{op}] rescale_factor must be a finite number, got {rf!r}")
        scale = float(rf)
    mean = std = None
    if do_normalize:
        if get("image_mean") is None or get("image_std") is None:
            raise ConfigError(f"[{op}] image_mean and image_std must be given when do_normalize "
                              "is set")
        mean = _channel_values(op, "image_mean", get("image_mean"))
        std = _channel_values(op, "image_std", get("image_std"))
    return ImageOptions(_flag(op, "do_convert_rgb", get("do_convert_rgb")), resize, crop, filt,
                        scale, mean, std,
                        _data_format(op, "input_data_format", get("input_data_format")))


def target_size(H: int, W: int, size: Dict[str, int]) -> Tuple[int, int]:
    """transformers' resize target of an ``H x W`` image (Pillow backend)."""
    if "height" in size:
        return size["height"], size["width"]
    edge = size["shortest_edge"]
    if "longest_edge" not in size:
        # get_resize_output_image_size(default_to_square=False)
        short, long = (W, H) if W <= H else (H, W)
        new_long = int(edge * long / short)
        return (new_long, edge) if W <= H else (edge, new_long)
    # get_size_with_aspect_ratio(image_size, shortest_edge, longest_edge)
    max_size = size["longest_edge"]
    raw = None
    lo, hi = float(min(H, W)), float(max(H, W))
    if hi / lo * edge > max_size:
        raw = max_size * lo / hi
        edge = int(round(raw))
    if (H <= W and H == edge) or (W <= H and W == edge):
        return H, W
    if W < H:
        return (int(raw * H / W) if raw is not None else int(edge * H / W)), edge
    return edge, (int(raw * W / H) if raw is not None else int(edge * W / H))
