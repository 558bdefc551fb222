"""Drop-in Hugging Face processors on mmcore's kernels.

``CLIPImageProcessor``, ``SiglipImageProcessor``, ``ViTImageProcessor`` and
``WhisperFeatureExtractor`` read a model's ``preprocessor_config.json`` (``from_pretrained`` of a
file, a folder or a hub id already in the local Hugging Face cache; never the network) and, called
like transformers' classes, return a :class:`BatchFeature` with the same keys and values equal to
transformers' Pillow-backed processors (float32 rounding for images, ~1e-5 for Whisper's
features). transformers and torch are optional: ``return_tensors="pt"`` imports torch then.
:func:`from_pretrained` picks the class from the config's ``image_processor_type`` /
``feature_extractor_type``.

Examples
--------
>>> import json, os, tempfile
>>> import numpy as np
>>> from mmcore.hf import from_pretrained
>>> d = tempfile.mkdtemp()
>>> with open(os.path.join(d, "preprocessor_config.json"), "w") as fh:
...     json.dump({"image_processor_type": "SiglipImageProcessor",
...                "size": {"height": 224, "width": 224}}, fh)
>>> proc = from_pretrained(d)
>>> out = proc(np.zeros((32, 48, 3), np.uint8), return_tensors="np")
>>> type(proc).__name__, out.pixel_values.shape
('SiglipImageProcessor', (1, 3, 224, 224))
"""

from __future__ import annotations

from typing import Any, Dict, Optional, Type, Union

from ..errors import ConfigError
from ._config import load_config
from ._output import BatchFeature
from .audio import WhisperFeatureExtractor
from .image import CLIPImageProcessor, ImageProcessor, SiglipImageProcessor, ViTImageProcessor

__all__ = ["BatchFeature", "CLIPImageProcessor", "SiglipImageProcessor", "ViTImageProcessor",
           "WhisperFeatureExtractor", "ImageProcessor", "from_pretrained"]

_Class = Union[Type[ImageProcessor], Type[WhisperFeatureExtractor]]
_CLASSES: Dict[str, _Class] = {
            "CLIPImageProcessor": CLIPImageProcessor, "CLIPFeatureExtractor": CLIPImageProcessor,
            "SiglipImageProcessor": SiglipImageProcessor, "ViTImageProcessor": ViTImageProcessor,
            "ViTFeatureExtractor": ViTImageProcessor,
            "WhisperFeatureExtractor": WhisperFeatureExtractor}


def from_pretrained(path: Any, *, cache_dir: Any = None, revision: Optional[str] = None,
                    **overrides: Any) -> Union[ImageProcessor, WhisperFeatureExtractor]:
    """The processor a ``preprocessor_config.json`` names (``image_processor_type`` or
    ``feature_extractor_type``, a ``Pil`` / ``Fast`` suffix ignored); ConfigError naming the
    field when it is missing or not one of this module's classes."""
    op = "mmcore.hf.from_pretrained"
    cfg, where = load_config(op, path, cache_dir=cache_dir, revision=revision)
    name = cfg.get("image_processor_type") or cfg.get("feature_extractor_type")
    base = name
    for suffix in ("Pil", "Fast"):
        if isinstance(base, str) and base.endswith(suffix):
            base = base[: -len(suffix)]
    cls = _CLASSES.get(base) if isinstance(base, str) else None
    if cls is None:
        raise ConfigError(f"[{op}] {where!r}: image_processor_type / feature_extractor_type = "
                          f"{name!r} is not one of {sorted(_CLASSES)}")
    return cls.from_pretrained(where, **overrides)
