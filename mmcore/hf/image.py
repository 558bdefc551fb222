"""Drop-in image processors: ``CLIPImageProcessor``, ``SiglipImageProcessor`` and
``ViTImageProcessor``.

Each reads a ``preprocessor_config.json`` (:meth:`ImageProcessor.from_pretrained`) and, called
on images, returns ``{"pixel_values": ...}`` equal to transformers' Pillow-backed processors
(``CLIPImageProcessorPil``, ``SiglipImageProcessorPil``, ``ViTImageProcessorPil``) built from the
same file: the same resize target (``size``: ``shortest_edge`` [+ ``longest_edge``] or
``height`` / ``width``), Pillow's filter (``resample`` 0, 1, 2, 3), center crop (padded with 0
where the image is smaller), ``rescale_factor`` and ``image_mean`` / ``image_std``, computed by
:func:`mmcore.ops.preprocess_image` in one pass per output size. Transparent images (PIL RGBA /
LA / P with transparency, 4-channel arrays) are composited onto white as transformers'
``convert_to_rgb`` does; grayscale is replicated to RGB.

The uint8 resize is Pillow's arithmetic exactly, and rescale + normalize are float32 as in
transformers, so the outputs agree to float32 rounding (a few 1e-7; 0 uint8 levels on the test
photos). transformers' default classes, when torchvision is installed, are the torchvision-backed
processors: they resize uint8 tensors with torchvision's antialiased kernels, whose fixed-point
rounding differs from Pillow's, so their pixels differ from the Pillow-backed ones (and from
mmcore) by about 1 uint8 level at some pixels. Without torchvision, transformers falls back to the
Pillow-backed classes.

A config field that mmcore cannot honour exactly (``resample`` BOX / HAMMING, ``do_pad``, ``size``
with ``max_height`` / ``max_width``, ...) raises :class:`~mmcore.errors.ConfigError` naming it.
"""

from __future__ import annotations

import copy
from typing import Any, Dict, List, Optional, Tuple

import numpy as np

from ..errors import ArgumentError, ShapeError
from ..ops import preprocess_image
from ..ops.image import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
from ._config import load_config
from ._image_config import IMAGE_FIELDS, ImageOptions, image_options, target_size
from ._images import flat_images, to_hwc, to_uint8
from ._output import BatchFeature, check_return_tensors, stack, to_tensors

__all__ = ["ImageProcessor", "CLIPImageProcessor", "SiglipImageProcessor", "ViTImageProcessor"]

_HALF = (0.5, 0.5, 0.5)     # transformers' IMAGENET_STANDARD_MEAN / _STD


class ImageProcessor:
    """Base of the image processors: a config (class defaults updated by a file and keywords)
    and :meth:`__call__`. Use a subclass; see the module docstring for what it computes."""

    #: The family's defaults (those of transformers' class of the same name).
    defaults: Dict[str, Any] = {}

    def __init__(self, **config: Any) -> None:
        op = type(self).__name__
        merged = copy.deepcopy(self.defaults)
        merged.update(config)
        self.config: Dict[str, Any] = merged
        self._options: ImageOptions = image_options(op, self._fields(merged))

    def _fields(self, cfg: Dict[str, Any]) -> Dict[str, Any]:
        """The ``ImagesKwargs`` fields of ``cfg`` (subclasses map legacy keys here)."""
        return {k: cfg.get(k) for k in IMAGE_FIELDS}

    @classmethod
    def from_pretrained(cls, path: Any, *, cache_dir: Any = None, revision: Optional[str] = None,
                        **overrides: Any) -> "ImageProcessor":
        """A processor from a ``preprocessor_config.json``.

        Parameters
        ----------
        path : str or os.PathLike
            The file, a folder holding it, or a Hugging Face hub id already in the local cache
            (looked up with ``huggingface_hub.try_to_load_from_cache``; nothing is downloaded).
        cache_dir, revision : optional
            Where the hub cache is and which revision, for a hub id.
        **overrides
            Fields that replace the file's (``do_center_crop=False``, ``size=...``).

        Raises
        ------
        ConfigError
            The file is missing (the message names the path), is not a JSON object, or asks
            for something mmcore cannot compute exactly (the message names the field).
        """
        cfg, _ = load_config(f"{cls.__name__}.from_pretrained", path, cache_dir=cache_dir,
                             revision=revision)
        cfg.update(overrides)
        return cls(**cfg)

    def to_dict(self) -> Dict[str, Any]:
        """The merged config (class defaults, file, keywords)."""
        return copy.deepcopy(self.config)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self._fields(self.config)!r})"

    def __getattr__(self, name: str) -> Any:
        # config fields read as attributes (processor.size, processor.image_mean), as in
        # transformers
        config = self.__dict__.get("config")
        if config is not None and name in config:
            return config[name]
        raise AttributeError(name)

    def preprocess(self, images: Any, **kwargs: Any) -> BatchFeature:
        """Same as calling the processor."""
        return self(images, **kwargs)

    def __call__(self, images: Any, **kwargs: Any) -> BatchFeature:
        """``{"pixel_values": ...}`` of one image or a batch.

        Parameters
        ----------
        images : PIL image, array, torch tensor, or a (nested) list of them
            Arrays are (H, W, C) or (C, H, W) (inferred, or ``input_data_format``), (N, ...) for
            a batch, or (H, W) gray; uint8, or integers / floats as transformers takes them.
        **kwargs
            Any config field for this call (``do_resize``, ``do_center_crop``, ``do_rescale``,
            ``do_normalize``, ``do_convert_rgb``, ``size``, ``crop_size``, ``resample``,
            ``image_mean``, ``image_std``, ``rescale_factor``, ``input_data_format``...) and
            ``return_tensors``: None (a list of (3, h, w) arrays), "np" (one array) or "pt"
            (a torch tensor sharing the array's memory).

        Returns
        -------
        BatchFeature
            ``pixel_values``: float32 (N, 3, h, w) ((N, 1, h, w) for gray without RGB
            conversion; uint8 without rescale and normalization, as transformers).
        """
        op = type(self).__name__
        unknown = sorted(set(kwargs) - set(IMAGE_FIELDS) - set(self.config))
        if unknown:
            raise ArgumentError(f"[{op}] unknown options {unknown}; the fields are "
                                f"{list(IMAGE_FIELDS)}")
        cfg = dict(self.config)
        cfg.update(kwargs)
        opts = image_options(op, self._fields(cfg)) if kwargs else self._options
        rt = check_return_tensors(op, cfg.get("return_tensors"))
        items = _process(op, flat_images(op, images), opts)
        if rt is None:
            return BatchFeature({"pixel_values": items})
        return to_tensors(op, {"pixel_values": _batch(op, items)}, rt)


def _batch(op: str, items: List[np.ndarray]) -> np.ndarray:
    """``items`` stacked; the kernel's own array when they are consecutive views of it."""
    base = items[0].base if items else None
    if (base is not None and isinstance(base, np.ndarray) and base.ndim == 4
            and base.shape[0] == len(items) and base.shape[1:] == items[0].shape
            and all(it.base is base and it.ctypes.data == base[i].ctypes.data
                    for i, it in enumerate(items))):
        return base
    return stack(op, items, "pixel_values")


def _norm_values(op: str, name: str, vals: Optional[Tuple[float, ...]], C: int, default: float):
    """``image_mean`` / ``image_std`` for ``C`` output channels (transformers wants one value
    or one per channel); three values for the kernel."""
    if vals is None:
        return (default,) * 3
    if len(vals) == 1:
        return vals * 3
    if len(vals) != C:
        raise ShapeError(f"[{op}] {name} has {len(vals)} values for images of {C} channels")
    return vals if C == 3 else vals * 3


def _process(op: str, images: List[Any], opts: ImageOptions) -> List[np.ndarray]:
    """The (C, h, w) outputs of ``images``, in order; one kernel call per output geometry."""
    groups: Dict[Tuple[Any, ...], List[int]] = {}
    pixels, channels, integral = [], [], []
    for i, img in enumerate(images):
        where = f"images[{i}]"
        a = to_hwc(op, where, img, convert_rgb=opts.convert_rgb,
                   channels_first=opts.channels_first)
        C = a.shape[2]
        if C not in (1, 3):
            hint = "; pass do_convert_rgb=True" if C == 4 else ""
            raise ShapeError(f"[{op}] {where} has {C} channels, expected 3 (RGB) or 1 (gray){hint}")
        px = to_uint8(op, where, a, do_resize=opts.resize is not None)
        H, W = px.u8.shape[:2]
        target = target_size(H, W, opts.resize) if opts.resize is not None else (H, W)
        crop = opts.crop if opts.crop is not None else target
        scale = px.factor * (opts.scale if opts.scale is not None else 1.0)
        out_c = 3 if (opts.convert_rgb or C == 3) else 1
        if opts.resize is not None and set(opts.resize) == {"shortest_edge"} \
                and opts.crop is not None:
            key: Tuple[Any, ...] = ("edge", opts.resize["shortest_edge"], crop, scale)
        else:
            key = ("size", target, crop, scale)
        groups.setdefault(key, []).append(i)
        pixels.append(px.u8)
        channels.append(out_c)
        integral.append(px.integral and opts.scale is None and opts.mean is None)
    results: List[Any] = [None] * len(images)
    for key, idx in groups.items():
        kind, size, crop, scale = key
        C = channels[idx[0]]
        if any(channels[i] != C for i in idx):
            # gray and RGB without RGB conversion: one call per channel count
            for i in idx:
                results[i] = _run(op, [pixels[i]], kind, size, crop, scale, opts, channels[i])[0]
            continue
        out = _run(op, [pixels[i] for i in idx], kind, size, crop, scale, opts, C)
        for j, i in enumerate(idx):
            results[i] = out[j]
    return [r.astype(np.uint8) if keep else r for r, keep in zip(results, integral)]


def _run(op: str, srcs: List[np.ndarray], kind: str, size: Any, crop: Tuple[int, int],
         scale: float, opts: ImageOptions, C: int) -> np.ndarray:
    mean = _norm_values(op, "image_mean", opts.mean, C, 0.0)
    std = _norm_values(op, "image_std", opts.std, C, 1.0)
    kw: Dict[str, Any] = {"preset": None, "crop_size": crop, "filter": opts.filter,
                          "mean": mean, "std": std, "scale": scale}
    if kind == "edge":
        out = preprocess_image(srcs, size=size, resize_mode="shortest_edge", **kw)
    else:
        out = preprocess_image(srcs, size=size, resize_mode="squash", **kw)
    return out if C == 3 else out[:, :1]


class CLIPImageProcessor(ImageProcessor):
    """transformers' ``CLIPImageProcessor`` (Pillow backend): shortest edge 224, bicubic,
    center crop 224, OpenAI CLIP mean / std.

    Examples
    --------
    >>> import numpy as np
    >>> from mmcore.hf import CLIPImageProcessor
    >>> proc = CLIPImageProcessor()                          # openai/clip-vit-base-patch32
    >>> photo = np.random.default_rng(0).integers(0, 256, (480, 640, 3), dtype=np.uint8)
    >>> proc(photo, return_tensors="np").pixel_values.shape
    (1, 3, 224, 224)
    >>> [a.shape for a in proc([photo, photo[:100]], do_center_crop=False)["pixel_values"]]
    [(3, 224, 298), (3, 224, 1433)]
    """

    defaults = {"do_resize": True, "size": {"shortest_edge": 224}, "resample": 3,
                "default_to_square": False, "do_center_crop": True,
                "crop_size": {"height": 224, "width": 224}, "do_rescale": True,
                "rescale_factor": 1 / 255, "do_normalize": True,
                "image_mean": list(OPENAI_CLIP_MEAN), "image_std": list(OPENAI_CLIP_STD),
                "do_convert_rgb": True}

    def _fields(self, cfg: Dict[str, Any]) -> Dict[str, Any]:
        fields = super()._fields(cfg)
        if cfg.get("use_square_size"):
            # transformers (for KOSMOS-2): a square of the class's default shortest edge
            edge = CLIPImageProcessor.defaults["size"]["shortest_edge"]
            fields["size"] = {"height": edge, "width": edge}
        return fields


class SiglipImageProcessor(ImageProcessor):
    """transformers' ``SiglipImageProcessor`` (Pillow backend): 224 x 224 without keeping the
    aspect ratio, bicubic, no crop, mean / std 0.5.

    Examples
    --------
    >>> import numpy as np
    >>> from mmcore.hf import SiglipImageProcessor
    >>> proc = SiglipImageProcessor(size={"height": 384, "width": 384})
    >>> out = proc(np.zeros((300, 200, 3), np.uint8), return_tensors="np")
    >>> out.pixel_values.shape, float(out.pixel_values.min())
    ((1, 3, 384, 384), -1.0)
    """

    defaults = {"do_resize": True, "size": {"height": 224, "width": 224}, "resample": 3,
                "default_to_square": False, "do_rescale": True, "rescale_factor": 1 / 255,
                "do_normalize": True, "image_mean": list(_HALF), "image_std": list(_HALF),
                "do_convert_rgb": True}


class ViTImageProcessor(ImageProcessor):
    """transformers' ``ViTImageProcessor`` (Pillow backend): 224 x 224, bilinear, mean / std
    0.5, and (as there) no RGB conversion unless ``do_convert_rgb`` is set.

    Examples
    --------
    >>> import numpy as np
    >>> from mmcore.hf import ViTImageProcessor
    >>> ViTImageProcessor()(np.zeros((64, 48, 3), np.uint8), return_tensors="np")[
    ...     "pixel_values"].shape
    (1, 3, 224, 224)
    """

    defaults = {"do_resize": True, "size": {"height": 224, "width": 224}, "resample": 2,
                "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
                "image_mean": list(_HALF), "image_std": list(_HALF)}
