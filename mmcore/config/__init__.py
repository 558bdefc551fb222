"""Configuration objects.

The package is split by concept: :mod:`~mmcore.config.base` (the shared base class,
conversion, hashing), :mod:`~mmcore.config.serialization` (JSON / TOML files, atomic writes),
:mod:`~mmcore.config.checks` (field checks), :mod:`~mmcore.config.preprocessing`,
:mod:`~mmcore.config.fusion`, :mod:`~mmcore.config.cache` and :mod:`~mmcore.config.model`.
Every public name is importable from ``mmcore.config`` itself.

Every config is a dataclass that

* validates itself on construction and raises :class:`~mmcore.errors.ConfigError` whose message
  starts with the field at fault (``"PreprocessingConfig.n_mels must be ..."``);
* is immutable (``frozen``); derive a changed copy with :meth:`ConfigBase.replace`, which
  validates again;
* round-trips through plain dictionaries (:meth:`ConfigBase.to_dict` /
  :meth:`ConfigBase.from_dict`) that hold only JSON/TOML-friendly values;
* loads from JSON and TOML files (:meth:`ConfigBase.from_json` / :meth:`ConfigBase.from_toml`),
  optionally from a named table of a larger file (``section="preprocessing.audio"``).

Examples
--------
>>> from mmcore.config import PreprocessingConfig
>>> cfg = PreprocessingConfig()                     # Whisper: 16 kHz, 80 mels, 30 s chunks
>>> cfg.preset, cfg.chunk_length_s, cfg.padding
('whisper', 30.0, 'max_length')
>>> PreprocessingConfig(preset="fbank").padding     # no fixed chunk: pad to the longest item
'longest'
>>> PreprocessingConfig.from_dict(cfg.to_dict()) == cfg
True

The model is described by a :class:`MultiModalConfig`: one :class:`ModalityConfig` per
:class:`~mmcore.modality.Modality` (preprocessing, encoder, embedding width, priority,
quantization, cache policy), a :class:`FusionStrategy`, an optional
:class:`CrossModalAttentionConfig` and a :class:`CacheConfig`:

>>> from mmcore.config import MultiModalConfig, ModalityConfig, LateFusion
>>> from mmcore.modality import Modality
>>> mm = MultiModalConfig([ModalityConfig(Modality.TEXT), ModalityConfig(Modality.IMAGE)],
...                       fusion=LateFusion(reduce="concat"))
>>> [str(m) for m in mm.enabled_modalities()], mm.output_dim
(['text', 'image'], 1024)
>>> MultiModalConfig.from_dict(mm.to_dict()) == mm
True
"""


from __future__ import annotations

import warnings
from typing import Any

from ..errors import ConfigError as ConfigError  # noqa: F401  (importable from here before)
from ..errors import ModalityError as ModalityError  # noqa: F401
from ..modality import Modality as Modality  # noqa: F401
from . import base, checks, fusion, serialization
from . import cache as cache  # noqa: F401  (submodules, importable as attributes)
from . import mapping as mapping  # noqa: F401
from . import model as model  # noqa: F401
from . import preprocessing as preprocessing  # noqa: F401
from .base import ConfigBase, config_digest
from .cache import CacheConfig, CachePolicy
from .checks import (  # noqa: F401
    check_any_int,
    check_bool,
    check_choice,
    check_int,
    check_modality,
    check_positive_float,
)
from .fusion import (
    AttentionFusion,
    CustomFusion,
    EarlyFusion,
    FusionStrategy,
    LateFusion,
    MiddleFusion,
    get_fusion,
    register_fusion,
    registered_fusions,
    unregister_fusion,
)
from .mapping import ModalityMap
from .model import CrossModalAttentionConfig, EncoderConfig, ModalityConfig, MultiModalConfig
from .preprocessing import (  # noqa: F401
    MAX_AUDIO_ITEM_S,
    MODALITY_DEFAULT,
    AudioPreprocessingConfig,
    ImagePreprocessingConfig,
    PreprocessingConfig,
    TextPreprocessingConfig,
    VideoPreprocessingConfig,
)
from .serialization import MAX_FILE_DEPTH, PathLike  # noqa: F401

__all__ = [
    "ConfigBase", "PreprocessingConfig", "AudioPreprocessingConfig", "ImagePreprocessingConfig",
    "VideoPreprocessingConfig", "TextPreprocessingConfig", "EncoderConfig", "CachePolicy",
    "CacheConfig", "ModalityConfig", "CrossModalAttentionConfig", "FusionStrategy", "EarlyFusion",
    "MiddleFusion", "LateFusion", "AttentionFusion", "CustomFusion", "MultiModalConfig",
    "ModalityMap", "register_fusion", "unregister_fusion", "get_fusion", "registered_fusions",
    "config_digest",
]

# helpers that were private module attributes of mmcore.config -> their public home
_MOVED = {
    "_fail": (checks, "fail"), "_check_size": (checks, "check_size"),
    "_check_channels": (checks, "check_channels"), "_check_opt_int": (checks, "check_opt_int"),
    "_check_fraction": (checks, "check_fraction"), "_check_text": (checks, "check_text"),
    "_check_extra": (checks, "check_extra"), "_nested": (checks, "check_nested"),
    "_names": (checks, "modality_names"), "_plain": (base, "to_plain"),
    "_hash_part": (base, "hash_part"), "_config": (base, "config_dataclass"),
    "_registered_name": (fusion, "registered_name"), "_toml_dumps": (serialization, "toml_dumps"),
    "_TOML_NONE": (serialization, "TOML_NONE"),
}


def __getattr__(name: str) -> Any:
    moved = _MOVED.get(name)
    if moved is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    home, new = moved
    warnings.warn(f"mmcore.config.{name} is deprecated; use {home.__name__}.{new}",
                  DeprecationWarning, stacklevel=2)
    return getattr(home, new)
