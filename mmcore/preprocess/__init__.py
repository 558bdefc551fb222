"""Decoding and per-modality preprocessors built from :class:`~mmcore.config.PreprocessingConfig`.

Audio: :func:`load_audio`, :func:`load_audio_with_rate`, :func:`resample`,
:class:`AudioPreprocessor`.
Image: :func:`load_image`, :class:`ImagePreprocessor`.
Video: :func:`sample_frame_indices`, :func:`temporal_windows`, :func:`load_video`,
:func:`sample_video_array`, :func:`video_info`, :class:`VideoPreprocessor`.
Text: :class:`ByteTokenizer`, :class:`HFTokenizer`, :class:`TextPreprocessor`,
:func:`load_tokenizer`.

Decoders and tokenizer libraries (soundfile, soxr, Pillow, PyAV, tokenizers) are imported on
first use.

Examples
--------
>>> import numpy as np
>>> from mmcore.preprocess import AudioPreprocessor, TextPreprocessor, sample_frame_indices
>>> AudioPreprocessor()(np.zeros(16000, np.float32))["input_features"].shape
(1, 80, 3000)
>>> TextPreprocessor("byte", max_length=16)(["a", "bc"])["input_ids"].shape
(2, 3)
>>> sample_frame_indices(90, n=3).tolist()
[15, 45, 75]
"""

from .audio import AudioPreprocessor, load_audio, load_audio_with_rate, resample
from .image import ImagePreprocessor, load_image
from .text import ByteTokenizer, HFTokenizer, TextPreprocessor, load_tokenizer
from .video import (
    VideoPreprocessor,
    load_video,
    sample_frame_indices,
    sample_video_array,
    temporal_windows,
    video_info,
)

__all__ = ["AudioPreprocessor", "load_audio", "load_audio_with_rate", "resample",
           "ImagePreprocessor", "load_image",
           "VideoPreprocessor", "load_video", "sample_frame_indices", "sample_video_array",
           "temporal_windows", "video_info",
           "ByteTokenizer", "HFTokenizer", "TextPreprocessor", "load_tokenizer"]
