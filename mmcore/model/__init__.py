"""Model runtime: NumPy layers on top of :mod:`mmcore.ops`.

Layers keep float32 weights in the PyTorch layout and key names, so a PyTorch ``state_dict``
converted to NumPy arrays loads with ``from_state_dict``. They run in inference mode only.

Examples
--------
>>> import numpy as np
>>> from mmcore.model import CrossModalAttention
>>> layer = CrossModalAttention(32, 4, kdim=16, vdim=16, rng=0)
>>> layer(np.zeros((1, 2, 32), np.float32), np.zeros((1, 9, 16), np.float32)).shape
(1, 2, 32)
"""

from .defaults import default_config, default_model
from .encoders import (
    FeatureEmbedder,
    MelFrameEmbedder,
    ModalityEncoder,
    ModuleList,
    PatchEmbedder,
    TokenEmbedder,
    TransformerEncoder,
    VideoEmbedder,
)
from .fusion import FusionLayer
from .inputs import MultiModalInput, MultiModalOutput
from .layers import (
    CrossModalAttention,
    MultiHeadSelfAttention,
    TransformerEncoderLayer,
    padding_mask_to_attention,
)
from .loader import MultiModalLoader
from .model import MultiModalModel
from .nn import LayerNorm, Linear, Module, gelu, get_activation, quick_gelu, relu
from .stats import LatencyStats

__all__ = ["Module", "Linear", "LayerNorm", "gelu", "quick_gelu", "relu", "get_activation",
           "CrossModalAttention", "MultiHeadSelfAttention", "TransformerEncoderLayer",
           "padding_mask_to_attention", "ModuleList", "TokenEmbedder", "PatchEmbedder",
           "MelFrameEmbedder", "VideoEmbedder", "FeatureEmbedder", "TransformerEncoder",
           "ModalityEncoder", "FusionLayer", "MultiModalInput", "MultiModalOutput",
           "MultiModalModel", "LatencyStats", "default_config", "default_model",
           "MultiModalLoader"]


def __getattr__(name: str):
    if name == "DistributedUnavailableError":   # deprecated (with a DeprecationWarning)
        from .loader import distributed_unavailable_error
        return distributed_unavailable_error(2)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
