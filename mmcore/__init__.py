"""mmcore: native kernels and a thin runtime for multi-modal inference.

Examples
--------
>>> import numpy as np, mmcore
>>> q = np.random.default_rng(0).standard_normal((1, 2, 3, 8), dtype=np.float32)
>>> mmcore.ops.attention(q, q, q).shape
(1, 2, 3, 8)
"""

from . import config, errors, ops, preprocess
from ._backend import backends, get_num_threads, set_num_threads, use_backend
from ._precision import get_matmul_precision, matmul_precision, set_matmul_precision
from ._version import __version__
from .cache import TensorCache
from .config import (
    AttentionFusion,
    CacheConfig,
    CachePolicy,
    CrossModalAttentionConfig,
    CustomFusion,
    EarlyFusion,
    EncoderConfig,
    FusionStrategy,
    LateFusion,
    MiddleFusion,
    ModalityConfig,
    MultiModalConfig,
    PreprocessingConfig,
    register_fusion,
)
from .modality import Modality

__all__ = ["__version__", "errors", "ops", "config", "preprocess", "backends", "use_backend",
           "set_num_threads", "get_num_threads", "set_matmul_precision", "get_matmul_precision",
           "matmul_precision", "Modality", "TensorCache", "MultiModalConfig",
           "ModalityConfig", "PreprocessingConfig", "EncoderConfig", "CrossModalAttentionConfig",
           "CacheConfig", "CachePolicy", "FusionStrategy", "EarlyFusion", "MiddleFusion",
           "LateFusion", "AttentionFusion", "CustomFusion", "register_fusion", "MultiModalModel",
           "MultiModalInput", "MultiModalOutput", "MultiModalLoader", "default_model"]

# The model runtime is imported on first use, so that ``import mmcore`` stays light.
_LAZY = {"MultiModalModel": "model", "MultiModalInput": "model", "MultiModalOutput": "model",
         "MultiModalLoader": "model", "default_model": "model"}


def __getattr__(name):
    if name in _LAZY or name == "model":
        import importlib
        mod = importlib.import_module(".model", __name__)
        if name == "model":
            return mod
        value = getattr(mod, name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_LAZY) | {"model"})
