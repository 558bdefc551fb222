"""The default model: a small, deterministic, untrained model with the four built-in modalities.

:func:`default_config` is its config, :func:`default_model` builds it; both are meant for
demos, tests and benchmarks.

Examples
--------
>>> from mmcore.model.defaults import default_config
>>> [str(m) for m in default_config().modalities]
['text', 'image', 'audio', 'video']
"""

from __future__ import annotations

from typing import Any

from ..config import (
    AttentionFusion,
    AudioPreprocessingConfig,
    CrossModalAttentionConfig,
    EncoderConfig,
    ImagePreprocessingConfig,
    ModalityConfig,
    MultiModalConfig,
    TextPreprocessingConfig,
    VideoPreprocessingConfig,
)
from ..modality import Modality
from .model import MultiModalModel

__all__ = ["default_config", "default_model"]


def default_config(*, embed_dim: int = 64, num_layers: int = 2, num_heads: int = 4,
                   fusion: Any = None) -> MultiModalConfig:
    """The config of :func:`default_model` (``fusion`` None: ``AttentionFusion``)."""
    def enc(**kw: Any) -> EncoderConfig:
        return EncoderConfig(num_layers=num_layers, num_heads=num_heads, mlp_ratio=2.0, **kw)

    mods = [
        ModalityConfig(Modality.TEXT, embed_dim=embed_dim, encoder_config=enc(),
                       preprocessing=TextPreprocessingConfig(max_length=64)),
        ModalityConfig(Modality.IMAGE, embed_dim=embed_dim, encoder_config=enc(patch_size=16),
                       preprocessing=ImagePreprocessingConfig(size=64)),
        ModalityConfig(Modality.AUDIO, embed_dim=embed_dim,
                       encoder_config=enc(extra={"frame_stride": 4}),
                       preprocessing=AudioPreprocessingConfig(preset="whisper", n_mels=80,
                                                              chunk_length_s=2.0)),
        ModalityConfig(Modality.VIDEO, embed_dim=embed_dim, encoder_config=enc(patch_size=16),
                       preprocessing=VideoPreprocessingConfig(size=32, num_frames=8,
                                                              temporal_patch=2)),
    ]
    if fusion is None:
        fusion = AttentionFusion(attention_dim=embed_dim, num_heads=num_heads)
    cross = None
    if isinstance(fusion, AttentionFusion):
        cross = CrossModalAttentionConfig(num_heads=num_heads, pairs=[("text", "image")])
    return MultiModalConfig(mods, fusion=fusion, cross_attention=cross, name="mmcore-default")


def default_model(seed: int = 0, *, cache: Any = None, **kwargs: Any) -> MultiModalModel:
    """A small, deterministic, **untrained** model with all four built-in modalities.

    Its weights are random (drawn from ``seed``): the outputs have the right shapes and are
    reproducible, but carry no meaning. It is meant for demos, tests and benchmarks.

    * text: :class:`~mmcore.preprocess.ByteTokenizer`, ``max_length=64``;
    * image: CLIP preprocessing at 64 x 64, 16 x 16 patches (16 tokens);
    * audio: Whisper log-mel, 80 bands, 2 s chunks (200 frames), 4 frames per token (50);
    * video: 8 uniformly sampled frames at 32 x 32, 16 x 16 patches, 2 frames per tubelet
      (16 tokens);
    * encoders 64 wide, 2 layers, 4 heads; text -> image cross-attention and
      :class:`~mmcore.config.AttentionFusion` to a 64-wide fused vector.

    Keyword arguments go to :func:`default_config` (``embed_dim``, ``num_layers``,
    ``num_heads``, ``fusion``); ``cache`` goes to :class:`MultiModalModel` (False: no
    per-item cache).

    Examples
    --------
    >>> import numpy as np
    >>> from mmcore.model import default_model
    >>> m = default_model()
    >>> m.infer({"audio": np.zeros(16000, np.float32)}).fused.shape
    (1, 64)
    """
    return MultiModalModel(default_config(**kwargs), seed=seed, cache=cache)
