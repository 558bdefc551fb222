"""Preprocessing configs: how the raw inputs of one modality become model features.

A tagged union on ``modality``: :class:`PreprocessingConfig` is the base and builds the
config of the modality it is given (:class:`AudioPreprocessingConfig`,
:class:`ImagePreprocessingConfig`, :class:`VideoPreprocessingConfig`,
:class:`TextPreprocessingConfig`); see :mod:`mmcore.config.preprocessing.base`.

Examples
--------
>>> from mmcore.config import PreprocessingConfig
>>> [PreprocessingConfig(modality=m).__class__.__name__ for m in PreprocessingConfig.types()]
['AudioPreprocessingConfig', 'ImagePreprocessingConfig', 'VideoPreprocessingConfig', \
'TextPreprocessingConfig']
"""

from __future__ import annotations

from .audio import MAX_AUDIO_ITEM_S, AudioPreprocessingConfig
from .base import MODALITY_DEFAULT, PreprocessingConfig, preprocessing_dataclass
from .image import ImagePreprocessingConfig, VideoPreprocessingConfig
from .text import TextPreprocessingConfig

__all__ = ["PreprocessingConfig", "AudioPreprocessingConfig", "ImagePreprocessingConfig",
           "VideoPreprocessingConfig", "TextPreprocessingConfig", "MAX_AUDIO_ITEM_S",
           "MODALITY_DEFAULT", "preprocessing_dataclass"]
