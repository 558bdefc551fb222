"""Built-in encoders: modality embedders, a pre-norm transformer stack and their combination.

An encoder of one modality is an *embedder* (raw features -> a token sequence of width ``dim``
with learned positions), a :class:`TransformerEncoder` (pre-norm blocks attending through
:func:`mmcore.ops.attention`, then a final layer norm), an optional linear projection to the
modality's ``embed_dim`` and a pooling (masked mean, masked max or a class token).

=====================  ===========================================  ==============================
embedder               input                                        tokens
=====================  ===========================================  ==============================
:class:`TokenEmbedder`     int ids (B, L)                           (B, L, dim)
:class:`PatchEmbedder`     float (B, C, H, W) or patches (B, N, C*p*p)  (B, N, dim)
:class:`MelFrameEmbedder`  float (B, n_mels, frames)                (B, ceil(frames/stride), dim)
:class:`VideoEmbedder`     float (B, T, C, H, W)                    (B, T/tp * N, dim)
:class:`FeatureEmbedder`   float (B, L, in_features)                (B, L, dim)
=====================  ===========================================  ==============================

Every embedder returns ``(tokens float32 (B, L, dim), mask bool (B, L))`` with the Hugging Face
mask convention (True = real token). Learned position tables are drawn from ``N(0, 0.02^2)``
(BERT/ViT), token tables from ``N(0, 1)`` (``torch.nn.Embedding``), linear maps as
:class:`~mmcore.model.nn.Linear`. Everything is deterministic for an int seed or a shared
:class:`numpy.random.Generator`.

Examples
--------
>>> import numpy as np
>>> from mmcore.config import EncoderConfig, ModalityConfig
>>> from mmcore.model import ModalityEncoder
>>> mc = ModalityConfig("text", embed_dim=32, encoder_config=EncoderConfig(
...     num_layers=2, num_heads=4, vocab_size=100, max_positions=16))
>>> enc = ModalityEncoder.from_config(mc, rng=0)
>>> ids = np.array([[5, 6, 7, 0], [8, 9, 0, 0]])
>>> tokens, mask, pooled = enc(ids, attention_mask=ids > 0)
>>> tokens.shape, mask.sum(axis=1).tolist(), pooled.shape
((2, 4, 32), [3, 2], (2, 32))
"""

from __future__ import annotations

import math
from typing import Any, Iterable, Optional, Tuple

import numpy as np
from numpy.typing import ArrayLike

from ..config import ModalityConfig
from ..errors import ConfigError, ShapeError
from ..modality import Modality
from ..ops import masked_max, masked_mean, patchify
from .layers import TransformerEncoderLayer
from .nn import (
    NO_INIT,
    ActivationLike,
    LayerNorm,
    Linear,
    Module,
    RngLike,
    as_float_input,
    as_generator,
    check_features,
)

__all__ = ["ModuleList", "TokenEmbedder", "PatchEmbedder", "MelFrameEmbedder", "VideoEmbedder",
           "FeatureEmbedder", "TransformerEncoder", "ModalityEncoder", "normal_init", "sub_rng"]

_POS_STD = 0.02


def normal_init(gen: Optional[np.random.Generator], shape, std: float) -> np.ndarray:
    """Float32 draws from ``N(0, std**2)`` of ``shape``; zeros when ``gen`` is None (weights
    about to be loaded).

    Examples
    --------
    >>> import numpy as np
    >>> from mmcore.model.encoders import normal_init
    >>> normal_init(np.random.default_rng(0), (2, 3), 0.02).dtype
    dtype('float32')
    >>> float(np.abs(normal_init(None, (2, 3), 0.02)).max())
    0.0
    """
    if gen is None:
        return np.zeros(shape, np.float32)
    return (gen.standard_normal(shape) * std).astype(np.float32)


def sub_rng(gen: Optional[np.random.Generator]) -> Any:
    """The ``rng`` argument for a child layer built from ``gen``: ``gen`` itself, or
    :data:`~mmcore.model.nn.NO_INIT` when ``gen`` is None (no random initialisation).

    Examples
    --------
    >>> from mmcore.model.encoders import sub_rng
    >>> from mmcore.model.nn import NO_INIT
    >>> sub_rng(None) is NO_INIT
    True
    """
    return NO_INIT if gen is None else gen


_normal = normal_init  # the former private names
_sub_rng = sub_rng


def _check_mask(owner: str, mask, batch: int, length: int, name: str = "attention_mask"
                ) -> np.ndarray:
    """A (B, L) HF mask as bool (all True when None)."""
    if mask is None:
        return np.ones((batch, length), np.bool_)
    m = np.asarray(mask)
    if m.shape != (batch, length):
        raise ShapeError(f"[{owner}] {name} has shape {tuple(m.shape)}, expected "
                         f"({batch}, {length})")
    if m.dtype != np.bool_:
        if m.dtype.kind not in "iu" or (m.size and (m.min() < 0 or m.max() > 1)):
            raise ShapeError(f"[{owner}] {name} must be bool or 0/1 integers (True = real token)")
        m = m.astype(np.bool_)
    return m


def _check_length(owner: str, length: int, maximum: int, what: str) -> None:
    if length > maximum:
        raise ShapeError(f"[{owner}] input has {length} {what}, more than the position table "
                         f"holds ({maximum})")


class ModuleList(Module):
    """An indexable list of child modules, keyed ``"0"``, ``"1"``, ... in state dicts.

    Examples
    --------
    >>> from mmcore.model import Linear
    >>> from mmcore.model.encoders import ModuleList
    >>> ml = ModuleList([Linear(2, 2, rng=0), Linear(2, 1, rng=1)])
    >>> len(ml), list(ml.state_dict())[-1]
    (2, '1.bias')
    """

    def __init__(self, modules: Iterable[Module] = ()):
        super().__init__()
        for m in modules:
            self.append(m)

    def append(self, module: Module) -> None:
        self.add_module(str(len(self._modules)), module)

    def __len__(self) -> int:
        return len(self._modules)

    def __iter__(self):
        return iter(self._modules.values())

    def __getitem__(self, i):
        items = list(self._modules.values())
        return items[i]


# ----------------------------------------------------------------------------------------------
# embedders


class TokenEmbedder(Module):
    """Token ids -> token embedding + learned absolute position embedding.

    Parameters
    ----------
    vocab_size, dim, max_positions : int
    rng : None, int or numpy.random.Generator

    State dict: ``token_embedding`` (vocab_size, dim), ``position_embedding`` (max_positions, dim).

    Examples
    --------
    >>> import numpy as np
    >>> from mmcore.model import TokenEmbedder
    >>> emb = TokenEmbedder(10, 8, 6, rng=0)
    >>> tok, mask = emb(np.array([[1, 2, 3]]))
    >>> tok.shape, mask.tolist()
    ((1, 3, 8), [[True, True, True]])
    """

    def __init__(self, vocab_size: int, dim: int, max_positions: int, *, rng: RngLike = None):
        super().__init__()
        owner = type(self).__name__
        self.vocab_size = check_features(owner, "vocab_size", vocab_size)
        self.dim = check_features(owner, "dim", dim)
        self.max_positions = check_features(owner, "max_positions", max_positions)
        gen = as_generator(rng)
        self.register_parameter("token_embedding",
                                normal_init(gen, (self.vocab_size, self.dim), 1.0))
        self.register_parameter("position_embedding",
                                normal_init(gen, (self.max_positions, self.dim), _POS_STD))

    def __call__(self, input_ids: ArrayLike, *, attention_mask: Optional[ArrayLike] = None
                 ) -> Tuple[np.ndarray, np.ndarray]:
        """``input_ids`` int (B, L) -> ``(tokens (B, L, dim), mask (B, L))``."""
        owner = type(self).__name__
        ids = np.asarray(input_ids)
        if ids.ndim != 2:
            raise ShapeError(f"[{owner}] input_ids has {ids.ndim} dims, expected 2 (B, L)")
        if ids.dtype.kind not in "iu":
            raise ShapeError(f"[{owner}] input_ids has dtype {ids.dtype}, expected integers")
        B, L = ids.shape
        _check_length(owner, L, self.max_positions, "tokens")
        if ids.size and (ids.min() < 0 or ids.max() >= self.vocab_size):
            raise ShapeError(f"[{owner}] input_ids must lie in [0, {self.vocab_size}), got values "
                             f"in [{int(ids.min())}, {int(ids.max())}]")
        mask = _check_mask(owner, attention_mask, B, L)
        x = self.token_embedding[ids] + self.position_embedding[:L]
        return x.astype(np.float32, copy=False), mask

    def extra_repr(self) -> str:
        return f"vocab_size={self.vocab_size}, dim={self.dim}, max_positions={self.max_positions}"


class FeatureEmbedder(Module):
    """Precomputed features (B, L, in_features) -> Linear -> + learned positions.

    The embedder of custom modalities whose inputs arrive as feature sequences.
    State dict: ``proj.weight``, ``proj.bias``, ``position_embedding``.

    Examples
    --------
    >>> import numpy as np
    >>> from mmcore.model import FeatureEmbedder
    >>> FeatureEmbedder(5, 8, 10, rng=0)(np.zeros((2, 4, 5), np.float32))[0].shape
    (2, 4, 8)
    """

    def __init__(self, in_features: int, dim: int, max_positions: int, *, rng: RngLike = None):
        super().__init__()
        owner = type(self).__name__
        self.in_features = check_features(owner, "in_features", in_features)
        self.dim = check_features(owner, "dim", dim)
        self.max_positions = check_features(owner, "max_positions", max_positions)
        gen = as_generator(rng)
        self.add_module("proj", Linear(self.in_features, self.dim, rng=sub_rng(gen)))
        self.register_parameter("position_embedding",
                                normal_init(gen, (self.max_positions, self.dim), _POS_STD))

    def __call__(self, features: ArrayLike, *, attention_mask: Optional[ArrayLike] = None
                 ) -> Tuple[np.ndarray, np.ndarray]:
        owner = type(self).__name__
        x = as_float_input(owner, "features", features, ndim=3, dims="(B, L, in_features)",
                           last=self.in_features, last_name="in_features")
        B, L = x.shape[:2]
        _check_length(owner, L, self.max_positions, "positions")
        mask = _check_mask(owner, attention_mask, B, L)
        return self.proj(x) + self.position_embedding[:L], mask


class PatchEmbedder(Module):
    """Images -> non-overlapping patches (:func:`mmcore.ops.patchify`) -> Linear -> + positions.

    The linear map equals a ``Conv2d(in_channels, dim, patch_size, stride=patch_size)``: its
    weight reshaped to ``(dim, C * p * p)``. Inputs may also arrive already patchified
    (``(B, N, C * p * p)``, the output of a patchifying preprocessor).

    State dict: ``proj.weight`` (dim, C*p*p), ``proj.bias``, ``position_embedding``
    (max_patches, dim).

    Examples
    --------
    >>> import numpy as np
    >>> from mmcore.model import PatchEmbedder
    >>> emb = PatchEmbedder(3, 4, 16, 9, rng=0)
    >>> emb(np.zeros((2, 3, 12, 8), np.float32))[0].shape
    (2, 6, 16)
    """

    def __init__(self, in_channels: int, patch_size: int, dim: int, max_patches: int, *,
                 rng: RngLike = None):
        super().__init__()
        owner = type(self).__name__
        self.in_channels = check_features(owner, "in_channels", in_channels)
        self.patch_size = check_features(owner, "patch_size", patch_size)
        self.dim = check_features(owner, "dim", dim)
        self.max_patches = check_features(owner, "max_patches", max_patches)
        self.patch_dim = self.in_channels * self.patch_size ** 2
        gen = as_generator(rng)
        self.add_module("proj", Linear(self.patch_dim, self.dim, rng=sub_rng(gen)))
        self.register_parameter("position_embedding",
                                normal_init(gen, (self.max_patches, self.dim), _POS_STD))

    def __call__(self, pixel_values: ArrayLike, *, attention_mask: Optional[ArrayLike] = None
                 ) -> Tuple[np.ndarray, np.ndarray]:
        """``(B, C, H, W)`` or patches ``(B, N, C*p*p)`` -> ``(tokens (B, N, dim), mask)``."""
        owner = type(self).__name__
        x = as_float_input(owner, "pixel_values", pixel_values)
        if x.ndim == 4:
            if x.shape[1] != self.in_channels:
                raise ShapeError(f"[{owner}] pixel_values has {x.shape[1]} channels, expected "
                                 f"{self.in_channels} (B, C, H, W)")
            x = patchify(x, self.patch_size)
        elif x.ndim != 3 or x.shape[-1] != self.patch_dim:
            raise ShapeError(f"[{owner}] pixel_values has shape {tuple(x.shape)}, expected "
                             f"(B, {self.in_channels}, H, W) or patches (B, N, {self.patch_dim})")
        B, N = x.shape[:2]
        _check_length(owner, N, self.max_patches, "patches")
        mask = _check_mask(owner, attention_mask, B, N)
        return self.proj(x) + self.position_embedding[:N], mask

    def extra_repr(self) -> str:
        return (f"in_channels={self.in_channels}, patch_size={self.patch_size}, dim={self.dim}, "
                f"max_patches={self.max_patches}")


class MelFrameEmbedder(Module):
    """Log-mel features (B, n_mels, frames) -> frames as tokens -> Linear -> + positions.

    Parameters
    ----------
    n_mels, dim, max_frames : int
        ``max_frames`` counts tokens, i.e. frames after the stride.
    frame_stride : int, default 1
        Average ``frame_stride`` consecutive (real) frames into one token before the
        projection; the last group may be shorter. A token is real when any of its frames is.
    rng : None, int or numpy.random.Generator

    State dict: ``proj.weight`` (dim, n_mels), ``proj.bias``, ``position_embedding``.

    Examples
    --------
    >>> import numpy as np
    >>> from mmcore.model import MelFrameEmbedder
    >>> emb = MelFrameEmbedder(80, 16, 50, frame_stride=2, rng=0)
    >>> tok, mask = emb(np.zeros((1, 80, 7), np.float32))
    >>> tok.shape, mask.shape
    ((1, 4, 16), (1, 4))
    """

    def __init__(self, n_mels: int, dim: int, max_frames: int, *, frame_stride: int = 1,
                 rng: RngLike = None):
        super().__init__()
        owner = type(self).__name__
        self.n_mels = check_features(owner, "n_mels", n_mels)
        self.dim = check_features(owner, "dim", dim)
        self.max_frames = check_features(owner, "max_frames", max_frames)
        self.frame_stride = check_features(owner, "frame_stride", frame_stride)
        gen = as_generator(rng)
        self.add_module("proj", Linear(self.n_mels, self.dim, rng=sub_rng(gen)))
        self.register_parameter("position_embedding",
                                normal_init(gen, (self.max_frames, self.dim), _POS_STD))

    def __call__(self, features: ArrayLike, *, attention_mask: Optional[ArrayLike] = None
                 ) -> Tuple[np.ndarray, np.ndarray]:
        """``features (B, n_mels, frames)``, ``attention_mask (B, frames)`` -> tokens, mask."""
        owner = type(self).__name__
        x = as_float_input(owner, "features", features, ndim=3, dims="(B, n_mels, frames)")
        if x.shape[1] != self.n_mels:
            raise ShapeError(f"[{owner}] features has {x.shape[1]} mel bins, expected "
                             f"{self.n_mels} (B, n_mels, frames)")
        B, _, F = x.shape
        mask = _check_mask(owner, attention_mask, B, F)
        x = np.ascontiguousarray(x.transpose(0, 2, 1))                       # (B, F, n_mels)
        s = self.frame_stride
        if s > 1:
            n = -(-F // s)
            pad = n * s - F
            xp = np.pad(x, ((0, 0), (0, pad), (0, 0))) if pad else x
            mp = np.pad(mask, ((0, 0), (0, pad))) if pad else mask
            w = mp.reshape(B, n, s).astype(np.float32)
            cnt = w.sum(axis=2)
            # an explicit sum over the group, frame by frame in order: every token is computed
            # the same way whatever the batch size and padding (einsum may pick its loop
            # order, hence its rounding, from the shapes)
            xg = xp.reshape(B, n, s, self.n_mels)
            tot = xg[:, :, 0] * w[:, :, 0, None]
            for t in range(1, s):
                tot += xg[:, :, t] * w[:, :, t, None]
            x = (tot / np.maximum(cnt, 1.0)[..., None]).astype(np.float32)
            mask = cnt > 0
        L = x.shape[1]
        _check_length(owner, L, self.max_frames, "frames")
        return self.proj(x) + self.position_embedding[:L], mask

    def extra_repr(self) -> str:
        return (f"n_mels={self.n_mels}, dim={self.dim}, max_frames={self.max_frames}, "
                f"frame_stride={self.frame_stride}")


def _repeat_into_padding(x: np.ndarray, fmask: np.ndarray, tp: int) -> np.ndarray:
    """A copy of clips ``x`` (B, T, ...) whose padding frames that share a tubelet with real
    frames before them hold the last of those real frames.

    A clip of ``T_i`` frames encoded alone pads its last tubelet by repeating its last frame;
    inside a longer batch the same tubelet would hold the batch's padding instead. Filling it
    the same way makes the token identical whatever the batch (batch invariance).
    """
    x = np.array(x, dtype=np.float32, copy=True)
    filled = fmask.copy()
    for t in range(1, x.shape[1]):
        if t % tp == 0:
            continue
        sel = ~fmask[:, t] & filled[:, t - 1]
        if sel.any():
            x[sel, t] = x[sel, t - 1]
            filled[:, t] |= sel
    return x


class VideoEmbedder(Module):
    """Clips (B, T, C, H, W) -> tubelets (``patchify(..., temporal_patch=tp)``) -> Linear ->
    + spatial and temporal positions.

    Token ``n`` of a clip is spatial patch ``n % N`` of temporal group ``n // N`` (``N`` patches
    per frame), and gets ``spatial_position[n % N] + temporal_position[n // N]``. A clip whose
    ``T`` is not a multiple of ``tp`` is padded by repeating its last frame (as Qwen2-VL does).
    ``attention_mask`` (B, T) marks real frames; a tubelet is real when any of its frames is,
    and the padding frames of such a tubelet take the last real frame before them (as when the
    clip comes alone), so a clip gives the same tokens in any padded batch.

    State dict: ``proj.weight`` (dim, C*tp*p*p), ``proj.bias``, ``spatial_position``
    (max_patches, dim), ``temporal_position`` (max_temporal, dim).

    Examples
    --------
    >>> import numpy as np
    >>> from mmcore.model import VideoEmbedder
    >>> emb = VideoEmbedder(3, 4, 2, 16, 4, rng=0)
    >>> emb(np.zeros((1, 4, 3, 8, 8), np.float32))[0].shape       # 2 groups x 4 patches
    (1, 8, 16)
    """

    def __init__(self, in_channels: int, patch_size: int, temporal_patch: int, dim: int,
                 max_patches: int, *, max_temporal: int = 64, rng: RngLike = None):
        super().__init__()
        owner = type(self).__name__
        self.in_channels = check_features(owner, "in_channels", in_channels)
        self.patch_size = check_features(owner, "patch_size", patch_size)
        self.temporal_patch = check_features(owner, "temporal_patch", temporal_patch)
        self.dim = check_features(owner, "dim", dim)
        self.max_patches = check_features(owner, "max_patches", max_patches)
        self.max_temporal = check_features(owner, "max_temporal", max_temporal)
        self.patch_dim = self.in_channels * self.temporal_patch * self.patch_size ** 2
        gen = as_generator(rng)
        self.add_module("proj", Linear(self.patch_dim, self.dim, rng=sub_rng(gen)))
        self.register_parameter("spatial_position",
                                normal_init(gen, (self.max_patches, self.dim), _POS_STD))
        self.register_parameter("temporal_position",
                                normal_init(gen, (self.max_temporal, self.dim), _POS_STD))

    def __call__(self, frames: ArrayLike, *, attention_mask: Optional[ArrayLike] = None
                 ) -> Tuple[np.ndarray, np.ndarray]:
        owner = type(self).__name__
        x = as_float_input(owner, "frames", frames, ndim=5, dims="(B, T, C, H, W)")
        B, T, C, H, W = x.shape
        if C != self.in_channels:
            raise ShapeError(f"[{owner}] frames has {C} channels, expected {self.in_channels} "
                             "(B, T, C, H, W)")
        fmask = _check_mask(owner, attention_mask, B, T)
        tp = self.temporal_patch
        if tp > 1 and attention_mask is not None and not fmask.all():
            x = _repeat_into_padding(x, fmask, tp)
        pad = (-T) % tp
        if pad:
            x = np.concatenate([x, np.repeat(x[:, -1:], pad, axis=1)], axis=1)
            fmask = np.concatenate([fmask, np.zeros((B, pad), np.bool_)], axis=1)
        G = x.shape[1] // tp
        p = self.patch_size
        if H % p or W % p:
            raise ShapeError(f"[{owner}] frame size ({H}, {W}) is not a multiple of "
                             f"patch_size={p}")
        N = (H // p) * (W // p)
        _check_length(owner, N, self.max_patches, "patches per frame")
        _check_length(owner, G, self.max_temporal, "temporal groups")
        if tp == 1:
            patches = patchify(x, p).reshape(B, G * N, self.patch_dim)
        else:
            patches = patchify(x, p, temporal_patch=tp)
        tokens = self.proj(patches).reshape(B, G, N, self.dim)
        tokens += self.spatial_position[:N][None, None]
        tokens += self.temporal_position[:G][None, :, None]
        gmask = fmask.reshape(B, G, tp).any(axis=2)
        mask = np.repeat(gmask, N, axis=1)
        return tokens.reshape(B, G * N, self.dim), mask

    def extra_repr(self) -> str:
        return (f"in_channels={self.in_channels}, patch_size={self.patch_size}, "
                f"temporal_patch={self.temporal_patch}, dim={self.dim}, "
                f"max_patches={self.max_patches}, max_temporal={self.max_temporal}")


# ----------------------------------------------------------------------------------------------
# the transformer stack


class TransformerEncoder(Module):
    """A stack of :class:`~mmcore.model.TransformerEncoderLayer` blocks and a final LayerNorm.

    Equals ``torch.nn.TransformerEncoder(torch.nn.TransformerEncoderLayer(dim, num_heads,
    dim_feedforward, activation="gelu", batch_first=True, norm_first=True), num_layers,
    norm=torch.nn.LayerNorm(dim))`` in eval mode, with the same state-dict keys
    (``layers.{i}.self_attn.in_proj_weight``, ..., ``norm.weight``, ``norm.bias``).

    Parameters
    ----------
    dim, num_layers, num_heads : int
        ``num_layers`` may be 0 (then the encoder is the final norm alone, or the identity
        without it).
    mlp_ratio : float, default 4.0
        Feed-forward width ``round(dim * mlp_ratio)`` unless ``dim_feedforward`` is given.
    dim_feedforward : int, optional
    activation : str or callable, default "gelu"
    norm_first : bool, default True
    layer_norm_eps : float, default 1e-5
    final_norm : bool, default True
        Keep the final LayerNorm (``norm``).
    rng : None, int or numpy.random.Generator

    Examples
    --------
    >>> import numpy as np
    >>> from mmcore.model import TransformerEncoder
    >>> enc = TransformerEncoder(16, 3, 2, rng=0)
    >>> x = np.random.default_rng(0).standard_normal((2, 5, 16), dtype=np.float32)
    >>> h = enc(x, end_layer=1)                       # the first block only, no final norm
    >>> bool(np.allclose(enc(h, start_layer=1), enc(x), rtol=1e-5, atol=1e-5))
    True
    """

    def __init__(self, dim: int, num_layers: int, num_heads: int, *, mlp_ratio: float = 4.0,
                 dim_feedforward: Optional[int] = None, activation: ActivationLike = "gelu",
                 norm_first: bool = True, layer_norm_eps: float = 1e-5, final_norm: bool = True,
                 rng: RngLike = None):
        super().__init__()
        owner = type(self).__name__
        self.dim = check_features(owner, "dim", dim)
        self.num_layers = check_features(owner, "num_layers", num_layers, minimum=0)
        self.num_heads = check_features(owner, "num_heads", num_heads)
        if dim_feedforward is None:
            try:
                ratio = float(mlp_ratio)
            except (TypeError, ValueError):
                raise ConfigError(f"[{owner}] mlp_ratio must be a number > 0, got "
                                  f"{mlp_ratio!r}") from None
            if not math.isfinite(ratio) or ratio <= 0:
                raise ConfigError(f"[{owner}] mlp_ratio must be a number > 0, got {mlp_ratio!r}")
            dim_feedforward = max(1, int(round(self.dim * ratio)))
        self.dim_feedforward = check_features(owner, "dim_feedforward", dim_feedforward)
        self.norm_first = bool(norm_first)
        self.activation = activation
        gen = as_generator(rng)
        layers = ModuleList()
        for _ in range(self.num_layers):
            layers.append(TransformerEncoderLayer(
                self.dim, self.num_heads, self.dim_feedforward, activation=activation,
                layer_norm_eps=layer_norm_eps, norm_first=norm_first, rng=sub_rng(gen)))
        self.add_module("layers", layers)
        self.final_norm = bool(final_norm)
        if self.final_norm:
            self.add_module("norm", LayerNorm(self.dim, eps=layer_norm_eps))

    def __call__(self, x: ArrayLike, *, attention_mask: Optional[ArrayLike] = None,
                 start_layer: int = 0, end_layer: Optional[int] = None,
                 apply_norm: Optional[bool] = None) -> np.ndarray:
        """Run blocks ``start_layer .. end_layer - 1`` on ``x`` (B, L, dim).

        The final norm runs when ``end_layer`` is the last block (``apply_norm=None``), so
        ``enc(enc(x, end_layer=k), start_layer=k)`` equals ``enc(x)``. Outputs at padded
        positions are finite and meaningless.
        """
        owner = type(self).__name__
        h = as_float_input(owner, "x", x, ndim=3, dims="(B, L, dim)", last=self.dim,
                           last_name="dim")
        n = self.num_layers
        end = n if end_layer is None else int(end_layer)
        start = int(start_layer)
        if not (0 <= start <= end <= n):
            raise ConfigError(f"[{owner}] need 0 <= start_layer <= end_layer <= num_layers={n}, "
                              f"got start_layer={start_layer}, end_layer={end_layer}")
        if attention_mask is not None:
            attention_mask = _check_mask(owner, attention_mask, h.shape[0], h.shape[1])
            if attention_mask.all():
                attention_mask = None
        for i in range(start, end):
            h = self.layers[i](h, attention_mask=attention_mask)
        norm = (end == n) if apply_norm is None else bool(apply_norm)
        if norm and self.final_norm:
            h = self.norm(h)
        return h

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, num_layers={self.num_layers}, num_heads={self.num_heads}, "
                f"dim_feedforward={self.dim_feedforward}")


# ----------------------------------------------------------------------------------------------
# modality encoder


def _pool(pooling: str, tokens: np.ndarray, mask: np.ndarray) -> np.ndarray:
    if pooling == "cls":
        return np.ascontiguousarray(tokens[:, 0])
    if pooling == "max":
        return masked_max(tokens, mask)
    return masked_mean(tokens, mask)


def _image_hw(pre) -> Tuple[int, int]:
    size = pre.crop_size if pre.crop_size is not None else pre.size
    if size is None:
        size = 224
    if isinstance(size, (tuple, list)):
        return int(size[0]), int(size[1])
    return int(size), int(size)


class ModalityEncoder(Module):
    """Embedder + :class:`TransformerEncoder` + optional projection + pooling, for one modality.

    Parameters
    ----------
    embedder : Module
        One of the embedders above (returns ``(tokens, mask)`` of width ``encoder.dim``).
    encoder : TransformerEncoder
    embed_dim : int
        Output width; a linear ``proj`` maps ``encoder.dim`` to it when they differ.
    pooling : {"mean", "cls", "max"}, default "mean"
        ``"cls"`` prepends a learned ``cls_token`` (always real) and pools position 0.
    modality : Modality, optional
    rng : None, int or numpy.random.Generator

    State-dict keys: ``embedder.*``, ``cls_token`` (cls pooling), ``encoder.layers.{i}.*``,
    ``encoder.norm.*``, ``proj.*`` (when widths differ).

    Calling it returns ``(tokens (B, L, embed_dim), mask (B, L) bool, pooled (B, embed_dim))``;
    with cls pooling ``L`` counts the class token. A row with no real token pools to zeros
    (mean/max). The steps are also available one by one, for middle fusion:
    :meth:`embed`, :meth:`encode` (``start_layer``/``end_layer``) and :meth:`finish`.
    """

    def __init__(self, embedder: Module, encoder: TransformerEncoder, *, embed_dim: int,
                 pooling: str = "mean", modality: Optional[Modality] = None,
                 rng: RngLike = None):
        super().__init__()
        owner = type(self).__name__
        if pooling not in ("mean", "cls", "max"):
            raise ConfigError(f"[{owner}] pooling must be 'mean', 'cls' or 'max', got {pooling!r}")
        if not isinstance(encoder, TransformerEncoder):
            raise ConfigError(f"[{owner}] encoder must be a TransformerEncoder")
        self.pooling = pooling
        self.modality = modality
        self.embed_dim = check_features(owner, "embed_dim", embed_dim)
        self.hidden_dim = encoder.dim
        gen = as_generator(rng)
        self.add_module("embedder", embedder)
        self.register_parameter("cls_token", normal_init(gen, (self.hidden_dim,), _POS_STD)
                                if pooling == "cls" else None)
        self.add_module("encoder", encoder)
        if self.embed_dim != self.hidden_dim:
            self.add_module("proj", Linear(self.hidden_dim, self.embed_dim, rng=sub_rng(gen)))

    @property
    def num_layers(self) -> int:
        return self.encoder.num_layers

    @classmethod
    def from_config(cls, mcfg: ModalityConfig, *, rng: RngLike = None) -> "ModalityEncoder":
        """Build the built-in encoder of a :class:`~mmcore.config.ModalityConfig`.

        Sizes come from ``mcfg.encoder_config`` and ``mcfg.preprocessing``:

        * text (or a custom modality with ``vocab_size``): :class:`TokenEmbedder`;
          ``vocab_size`` default 259 (the byte tokenizer), ``max_positions`` default
          ``preprocessing.max_length`` else 512.
        * image: :class:`PatchEmbedder`, 3 channels, ``patch_size`` from the encoder or the
          preprocessing (default 16), ``max_positions`` default the patches of the crop.
        * audio: :class:`MelFrameEmbedder` with ``preprocessing.n_mels``;
          ``encoder_config.extra["frame_stride"]`` (default 1); ``max_positions`` default the
          frames of ``chunk_length_s`` (+1) else of ``max_length_s``, else 3000.
        * video: :class:`VideoEmbedder` (``preprocessing.temporal_patch``); ``max_positions``
          is the patches per frame; temporal groups from ``max_frames``.
        * custom without preprocessing: :class:`FeatureEmbedder` with
          ``encoder_config.extra["in_features"]``.

        ``mcfg.matmul_precision`` is applied by :class:`~mmcore.model.MultiModalModel` when it
        encodes the modality; called on its own, the encoder computes under the calling
        thread's precision (wrap the call in :class:`mmcore.matmul_precision` to choose it).
        """
        owner = cls.__name__
        m = Modality(mcfg.modality)
        ec = mcfg.encoder_config
        width = ec.hidden_dim if ec.hidden_dim is not None else mcfg.embed_dim
        gen = as_generator(rng)
        sub = sub_rng(gen)
        # not None in the branches that read it (kind is None without preprocessing)
        pre: Any = mcfg.preprocessing
        kind = pre.modality if pre is not None else None
        emb: Module
        if ec.vocab_size is not None or kind == "text" or m == Modality.TEXT:
            max_pos = ec.max_positions or (pre.max_length if kind == "text" and pre.max_length
                                           else 512)
            emb = TokenEmbedder(ec.vocab_size or 259, width, max_pos, rng=sub)
        elif kind == "image":
            p = ec.patch_size or pre.patch_size or 16
            h, w = _image_hw(pre)
            max_pos = ec.max_positions or max(1, (h // p) * (w // p))
            emb = PatchEmbedder(3, p, width, max_pos, rng=sub)
        elif kind == "audio":
            stride = int(ec.extra.get("frame_stride", 1))
            if ec.max_positions:
                max_pos = ec.max_positions
            else:
                secs = pre.chunk_length_s if pre.chunk_length_s is not None else pre.max_length_s
                frames = int(secs * pre.sample_rate) // pre.hop_length + 1 if secs else 3000
                max_pos = -(-frames // stride)
            emb = MelFrameEmbedder(pre.n_mels, width, max_pos, frame_stride=stride, rng=sub)
        elif kind == "video":
            p = ec.patch_size or pre.patch_size or 16
            tp = pre.temporal_patch or 1
            h, w = _image_hw(pre)
            max_pos = ec.max_positions or max(1, (h // p) * (w // p))
            frames = max(pre.max_frames or 0, pre.num_frames or 0, 1)
            emb = VideoEmbedder(3, p, tp, width, max_pos, max_temporal=-(-frames // tp), rng=sub)
        else:
            nin = ec.extra.get("in_features")
            if nin is None:
                raise ConfigError(f"[{owner}] custom modality {str(m)!r} without preprocessing "
                                  "needs encoder_config.vocab_size (token ids) or "
                                  "encoder_config.extra['in_features'] (feature sequences)")
            emb = FeatureEmbedder(int(nin), width, ec.max_positions or 512, rng=sub)
        enc = TransformerEncoder(width, ec.num_layers, ec.num_heads, mlp_ratio=ec.mlp_ratio,
                                 activation=ec.activation, layer_norm_eps=ec.norm_eps,
                                 final_norm=ec.num_layers > 0, rng=sub)
        return cls(emb, enc, embed_dim=mcfg.embed_dim, pooling=ec.pooling, modality=m, rng=sub)

    # -- steps ----------------------------------------------------------------------------------

    def embed(self, inputs: ArrayLike, *, attention_mask: Optional[ArrayLike] = None
              ) -> Tuple[np.ndarray, np.ndarray]:
        """Embedder (+ class token): ``(tokens (B, L, hidden_dim), mask (B, L))``."""
        x, mask = self.embedder(inputs, attention_mask=attention_mask)
        if self.cls_token is not None:
            B = x.shape[0]
            cls_tok = np.broadcast_to(self.cls_token, (B, 1, self.hidden_dim))
            x = np.concatenate([cls_tok, x], axis=1)
            mask = np.concatenate([np.ones((B, 1), np.bool_), mask], axis=1)
        return x, mask

    def encode(self, x: ArrayLike, mask: Optional[ArrayLike], *, start_layer: int = 0,
               end_layer: Optional[int] = None) -> np.ndarray:
        """Blocks ``start_layer .. end_layer - 1`` (final norm at the end)."""
        return self.encoder(x, attention_mask=mask, start_layer=start_layer, end_layer=end_layer)

    def finish(self, x: ArrayLike, mask: np.ndarray) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Projection to ``embed_dim`` and pooling of encoded tokens."""
        if "proj" in self._modules:
            x = self.proj(x)
        x = np.ascontiguousarray(x, dtype=np.float32)
        return x, mask, _pool(self.pooling, x, mask)

    def __call__(self, inputs: ArrayLike, *, attention_mask: Optional[ArrayLike] = None
                 ) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``inputs`` -> ``(tokens (B, L, embed_dim), mask (B, L), pooled (B, embed_dim))``."""
        x, mask = self.embed(inputs, attention_mask=attention_mask)
        return self.finish(self.encode(x, mask), mask)

    def extra_repr(self) -> str:
        m = f"modality={self.modality}, " if self.modality is not None else ""
        return f"{m}embed_dim={self.embed_dim}, pooling={self.pooling!r}"
