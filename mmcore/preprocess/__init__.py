"""Decoding and per-modality preprocessors built from :class:`~mmcore.config.PreprocessingConfig`.

Audio: :func:`load_audio`, :func:`load_audio_with_rate`, :func:`resample`,
:class:`AudioPreprocessor`. Decoders (soundfile, soxr) are imported on first use.

Examples
--------
>>> import numpy as np
>>> from mmcore.preprocess import AudioPreprocessor
>>> AudioPreprocessor()(np.zeros(16000, np.float32))["input_features"].shape
(1, 80, 3000)
"""

from .audio import AudioPreprocessor, load_audio, load_audio_with_rate, resample

__all__ = ["AudioPreprocessor", "load_audio", "load_audio_with_rate", "resample"]
