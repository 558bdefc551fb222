"""The multi-modal model: preprocessors, encoders and the fusion layer behind one ``infer`` call.

:class:`MultiModalModel` holds, for every configured modality, a preprocessor built from its
:class:`~mmcore.config.PreprocessingConfig` and an encoder
(:meth:`~mmcore.model.ModalityEncoder.from_config`, or a callable handed in), plus one
:class:`~mmcore.model.FusionLayer`. :meth:`MultiModalModel.infer` takes a
:class:`MultiModalInput` and returns a :class:`MultiModalOutput`.

Inputs (per modality) are either *raw* or *preprocessed*; the model decides by type, dtype
and rank:

=========  ==========================================  =====================================
modality   raw (goes through the preprocessor)          preprocessed (goes to the encoder)
=========  ==========================================  =====================================
text       a str, or a list/tuple of str                integer array ``input_ids`` (B, L)
image      uint8 (H, W, 3), uint8 (N, H, W, 3), a path  float array ``pixel_values``
           or a list of paths / uint8 (H, W, 3)         (B, 3, S, S) or patches (B, N, C*p*p)
audio      float (T,), float (B, T), a                  float ``input_features``
           ``(waveform, sample_rate)`` pair, a path,    (B, n_mels, frames)
           or a list of 1-D waveforms / pairs / paths
video      uint8 (T, H, W, 3), uint8 (B, T, H, W, 3),   float ``pixel_values`` (B, T, 3, S, S)
           a path, or a list of paths / uint8 clips
custom     per its borrowed preprocessor, else features (B, L, in_features) or int ids (B, L)
=========  ==========================================  =====================================

So for images and video the dtype picks the path: uint8 arrays are raw, channels-last
(``(..., H, W, 3)``), and are resized and normalized by the model's preprocessing; float arrays
are taken as already preprocessed, channels-first, and go straight to the encoder. A float
array in a channels-last layout (``(B, H, W, 3)``, ``(B, T, H, W, 3)``) is refused where it
enters (:class:`~mmcore.errors.ShapeError` suggesting the transpose) instead of failing in the
encoder; so are a uint8 array in a channels-first layout, grayscale or RGBA images, integer
images of other dtypes, and, for the built-in encoders, preprocessed arrays whose channels,
mel bins, patch width or spatial size do not fit the encoder.

Audio: a 1-D float array is one clip; a 2-D float array is a batch ``(B, T)`` of ``B``
equal-length clips, never channels: soundfile's multichannel layout ``(T, C)`` (a 2-D array
with ``T <= 8``, fewer than 64 samples per clip, or more clips than samples per clip with
fewer than 1024, see :func:`~mmcore.preprocess.audio.check_clip_batch`) is refused with a
ShapeError, never taken as ``T`` tiny clips: average it to mono (``x.mean(axis=1)``) or pass
``x.T`` (one clip per channel). Raw arrays are taken to be at the config's ``sample_rate``; a
``(waveform, sample_rate)`` pair (a 2-tuple or list, as an input or as an item of a list)
carries its own rate, and is resampled to the config's rate with soxr "HQ", as files are by
:func:`~mmcore.preprocess.load_audio`. Values must be float in [-1, 1] (int16 PCM: divide by
32768).

Paths (image, audio, video) must name existing regular files: a missing file, a directory,
a FIFO or a device raises the modality's decode error (:class:`~mmcore.errors.ImageDecodeError`,
:class:`~mmcore.errors.AudioDecodeError`, :class:`~mmcore.errors.VideoDecodeError`) naming the
file, with or without the cache. Text inputs are the text itself, never a path.

A dict (the output of a preprocessor: ``{"input_ids", "attention_mask"}``,
``{"pixel_values"}``, ``{"input_features", "attention_mask"}``) counts as preprocessed too; its
``attention_mask`` is used unless :attr:`MultiModalInput.attention_masks` gives one.
Preprocessed inputs without a mask are taken as all real (True = real token, the Hugging Face
convention). For audio, ``preset="fbank"`` features ``(B, frames, n_mels)`` from the
preprocessor are transposed to ``(B, n_mels, frames)``; preprocessed audio must be given as
``(B, n_mels, frames)``. Video preprocessing runs without ``patch_size`` (the video embedder
builds the tubelets itself). A batch of clips with different frame counts is padded with
zero frames, marked padding in the frame mask.

Examples
--------
>>> import numpy as np
>>> from mmcore.model import default_model, MultiModalInput
>>> model = default_model(seed=0)
>>> out = model.infer(MultiModalInput({"text": ["a cat", "a dog"],
...                                    "image": np.zeros((2, 48, 48, 3), np.uint8)}))
>>> out.fused.shape, sorted(str(m) for m in out.pooled)
((2, 64), ['image', 'text'])
"""

from __future__ import annotations

import os
import threading
import time
import types
import warnings
from typing import Any, Callable, Dict, Mapping, Optional, Protocol, Tuple, TypeVar, Union

import numpy as np
from numpy.typing import ArrayLike

from ..cache import CacheManager
from ..config import AttentionFusion as AttentionFusion  # noqa: F401  (importable from here before)
from ..config import CrossModalAttentionConfig as CrossModalAttentionConfig  # noqa: F401
from ..config import (
    EarlyFusion,
    MiddleFusion,
    ModalityConfig,
    MultiModalConfig,
    PreprocessingConfig,
)
from ..config import EncoderConfig as EncoderConfig  # noqa: F401
from ..errors import ConfigError, ModalityError, ShapeError
from ..errors import ModelFormatError as ModelFormatError  # noqa: F401
from ..modality import Modality
from ..ops import masked_mean
from .directory import load_pretrained, save_model
from .encoders import ModalityEncoder
from .fusion import FusionLayer
from .inputs import (
    ACCEPTED_INPUTS,  # noqa: F401  (re-exported)
    ENCODED_TYPES,
    PATH_TYPES,
    MultiModalInput,
    MultiModalOutput,
    check_files,
    check_preprocessed,
    kind_of,
    resolve_audio_pairs,
    stack_clips,
)
from .io import PathLike
from .item_cache import ItemCache, precision_block
from .nn import Module, RngLike, as_generator
from .stats import LatencyStats, prometheus_collector

__all__ = ["MultiModalInput", "MultiModalOutput", "MultiModalModel", "LatencyStats",  # noqa: F822
           "default_model"]  # default_model: through __getattr__, from mmcore.model.defaults

_MM = TypeVar("_MM", bound="MultiModalModel")




# ----------------------------------------------------------------------------------------------
# the model


class _ModuleDict(Module):
    """Child modules keyed by modality string (``"text"``, ``"custom:7"``)."""


def _make_preprocessor(pre: Optional[PreprocessingConfig]):
    if pre is None:
        return None
    from .. import preprocess as P
    kind = pre.modality
    if kind == "text":
        return P.TextPreprocessor.from_config(pre)
    if kind == "image":
        return P.ImagePreprocessor(pre)
    if kind == "audio":
        return P.AudioPreprocessor(pre)
    if kind == "video":
        if pre.patch_size is not None:
            pre = pre.replace(patch_size=None)
        return P.VideoPreprocessor(pre)
    raise ConfigError(f"no preprocessor for modality kind {kind!r}")  # pragma: no cover


def _zero_padding(tokens: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Token embeddings with the padding positions set to zero."""
    if mask.ndim == 2 and mask.shape == tokens.shape[:2] and not mask.all():
        tokens = np.where(mask[..., None], tokens, np.float32(0)).astype(np.float32, copy=False)
    return tokens


def _check_remote_result(owner: str, m: Modality, mc: ModalityConfig, res) -> tuple:
    """``(tokens, mask, pooled)`` from a remote encoder, checked against the modality's config
    (a node serving another model, or a broken one, must not reach the fusion)."""
    try:
        tokens, mask, pooled = res
        tokens = np.asarray(tokens)
        mask = np.asarray(mask)
        pooled = np.asarray(pooled)
    except (TypeError, ValueError):
        raise ShapeError(f"[{owner}] the remote encoder of modality {str(m)!r} did not return "
                         "(tokens, mask, pooled)") from None
    D = mc.embed_dim
    ok = (tokens.ndim == 3 and tokens.shape[2] == D and mask.shape == tokens.shape[:2]
          and pooled.shape == (tokens.shape[0], D) and tokens.dtype.kind == "f"
          and pooled.dtype.kind == "f" and mask.dtype.kind in "biu")
    if not ok:
        raise ShapeError(f"[{owner}] the remote encoder of modality {str(m)!r} returned tokens "
                         f"{tokens.shape} {tokens.dtype}, mask {mask.shape} {mask.dtype}, pooled "
                         f"{pooled.shape} {pooled.dtype}; expected (B, L, {D}), (B, L), "
                         f"(B, {D}) (does the node serve the same model?)")
    return (tokens.astype(np.float32, copy=False), mask.astype(np.bool_, copy=False),
            pooled.astype(np.float32, copy=False))


class RemoteAttacher(Protocol):
    """What serves a model's modalities remotely: an object with ``attach(model, *,
    model_dir=None)`` that gives the model its remote encoders
    (:meth:`MultiModalModel.set_remote_encoders`) and returns the backend.
    :class:`mmcore.distributed.DistributedConfig` is one. The model only calls this method
    (:func:`attach_remote`): :mod:`mmcore.model` never imports :mod:`mmcore.distributed`.
    """

    def attach(self, model: "MultiModalModel", *, model_dir: Optional[str] = None) -> Any:
        ...  # pragma: no cover


def attach_remote(model: "MultiModalModel", target: Any, *, model_dir: Optional[str],
                  op: str) -> Any:
    """``target.attach(model, model_dir=model_dir)`` (see :class:`RemoteAttacher`); what the
    deprecated ``from_pretrained(..., distributed=)`` and ``MultiModalLoader.with_distributed``
    run. Returns the backend.

    Raises
    ------
    ConfigError
        ``target`` has no ``attach`` method (the message, prefixed ``[op]``, asks for a
        DistributedConfig).
    """
    attach = getattr(target, "attach", None)
    if isinstance(target, type) or not callable(attach):
        raise ConfigError(f"[{op}] expected a DistributedConfig (from mmcore.distributed), got "
                          f"{type(target).__name__}")
    return attach(model, model_dir=model_dir)


def _check_batch(owner: str, m: Modality, b: int, B: Optional[int]) -> int:
    """The request's batch size after modality ``m`` (ShapeError when they disagree)."""
    if B is not None and b != B:
        raise ShapeError(f"[{owner}] modality {str(m)!r} has batch size {b} after "
                         f"preprocessing, expected {B}")
    return b


class MultiModalModel(Module):
    """Preprocessors, encoders and a fusion layer for a :class:`~mmcore.config.MultiModalConfig`.

    Parameters
    ----------
    config : MultiModalConfig
    rng : None, int or numpy.random.Generator, keyword-only
        Weight initialisation (the encoders in modality order, then the fusion layer, from one
        generator). None: fresh entropy, unless ``seed`` is given.
    seed : int, optional, keyword-only
        Same as an int ``rng`` (give one of the two).
    encoders : dict of Modality or str -> callable, optional, keyword-only
        Encoders that replace the built-in ones (needed for ``encoder="external"`` and
        ``"remote"`` modalities, and for ``"onnx"`` ones whose config has no ``onnx_path``, see
        :mod:`mmcore.model.onnx_encoder`): ``fn(inputs, attention_mask=mask) -> (tokens (B, L, D),
        mask (B, L), pooled (B, D))`` with ``D`` the modality's ``embed_dim``. Early and
        middle fusion need built-in encoders. Callables that are :class:`Module` take part in
        the state dict.
    stats_window : int, default 1024
        Recent latencies kept per stage for the percentiles of :meth:`stats`.
    cache : None, bool, CacheConfig or CacheManager, default None
        The per-item cache of encoder outputs. None or True: built from ``config.cache``
        (on by default, within ``config.cache.global_budget_bytes``; ``config.cache.enabled``
        False switches it off); False: no cache; a :class:`~mmcore.config.CacheConfig` or a
        :class:`~mmcore.cache.CacheManager`: used instead of ``config.cache``.

    Precision: the matrix products of a modality's encoder run under its
    :attr:`ModalityConfig.matmul_precision <mmcore.config.ModalityConfig.matmul_precision>`
    when that is set (``"highest"``, ``"bf16"`` or ``"int8"``, inside
    :class:`mmcore.matmul_precision` for the encoding only), else under the calling thread's
    precision (a :class:`mmcore.matmul_precision` block around :meth:`infer`, else
    :func:`mmcore.set_matmul_precision`, else ``"highest"``); cross-modal attention and the
    fusion always run under the calling thread's. The layers pack each weight once per
    precision (:meth:`~mmcore.model.nn.Module.packed_weight`). Under the default
    ``"highest"`` the results are exact float32, as always.

    Caching: with late, attention or custom fusion, :meth:`infer` keys every batch item of
    every modality by :func:`~mmcore.cache.content_key` of its data (raw input bytes -- file
    bytes for paths -- or its preprocessed row and mask), the modality's config, the matmul
    precision it is encoded under and the model identity (:attr:`identity`, a digest of the
    weights, recomputed whenever a parameter is replaced; parameter arrays are read-only, so
    they cannot change in place), and stores the item's encoder outputs (tokens trimmed to
    its real length, mask, pooled). Only the
    items not found are preprocessed and encoded, as one sub-batch; the batch is then put
    back together with the padding the uncached path gives. Token embeddings at padding
    positions are zero (with or without cache). The encoders treat batch items
    independently (padding is masked), so results with and without cache agree: with the
    built-in encoders (native and numba backends) they are bit-identical, whatever the
    request history, the batch, its padding and the threads (:func:`mmcore.ops.linear`, the
    attention kernel, the layer norms and the poolings compute a row the same way whatever
    the batch around it); an external encoder whose arithmetic depends on the batch shape
    (e.g. a BLAS GEMM) agrees to within float32 rounding (~1e-6 relative). A lossy storage
    ``dtype`` in a cache policy (float16, bfloat16) trades that for memory. Early and middle
    fusion (joint encoders) are not cached. Inputs whose masks are not right-padded (e.g.
    text with ``padding_side="left"``) are not cached either. With late and attention fusion
    the fused vector of every batch item is cached too (the cache manager's ``fusion``
    cache), keyed by the item keys of its modalities, the fusion config, the fusion's matmul
    precision and the model identity, so a request whose items were all seen runs neither
    encoders nor fusion;
    ``return_weights=True`` always runs the fusion.

    Every configured modality gets a preprocessor and an encoder, enabled or not, so that
    :meth:`enable` / :meth:`disable` switch modalities at run time without rebuilding.
    Weights: the modality encoders were drawn at random unless loaded with
    :meth:`load_state_dict` (keys ``encoders.<m>.*`` and ``fusion.*``).

    Thread safety: :meth:`infer` keeps no shared mutable state besides the statistics and
    the cache (both thread-safe; concurrent calls with overlapping items may both compute an
    item that neither found, and store equal results) and can be called from many threads at
    once; :meth:`enable` / :meth:`disable`
    swap the config atomically (a call in flight finishes with the config it started with).
    Do not call :meth:`load_state_dict` while other threads infer.

    Examples
    --------
    >>> from mmcore.config import MultiModalConfig, ModalityConfig, LateFusion
    >>> from mmcore.model import MultiModalModel, MultiModalInput
    >>> cfg = MultiModalConfig([ModalityConfig("text", embed_dim=32, preprocessing={
    ...     "max_length": 16}, encoder_config={"num_layers": 1, "num_heads": 4})],
    ...     fusion=LateFusion("mean"))
    >>> model = MultiModalModel(cfg, seed=0)
    >>> model.infer(MultiModalInput({"text": ["hello"]})).fused.shape
    (1, 32)
    """

    def __init__(self, config: MultiModalConfig, *, rng: RngLike = None,
                 seed: Optional[int] = None, encoders: Optional[Mapping[Any, Any]] = None,
                 stats_window: int = 1024, cache: Any = None):
        super().__init__()
        owner = type(self).__name__
        if not isinstance(config, MultiModalConfig):
            raise ConfigError(f"[{owner}] config must be a MultiModalConfig, got "
                              f"{type(config).__name__}")
        if seed is not None:
            if rng is not None:
                raise ConfigError(f"[{owner}] give rng or seed, not both")
            rng = seed
        gen = as_generator(rng)
        given = {}
        for key, fn in (encoders or {}).items():
            m = Modality(key)
            if m not in config.modalities:
                raise ModalityError(f"[{owner}] encoders names modality {str(m)!r}, which is "
                                    "not configured")
            if not callable(fn):
                raise ConfigError(f"[{owner}] encoders[{str(m)!r}] must be callable")
            given[m] = fn
        joint = isinstance(config.fusion, (EarlyFusion, MiddleFusion))
        self._lock = threading.Lock()
        self._config = config
        self.preprocessors: Dict[Modality, Any] = {}
        self._external: Dict[Modality, Callable] = {}
        self._remote: Dict[Modality, Any] = {}
        encs = _ModuleDict()
        for m, mc in config.modalities.items():
            self.preprocessors[m] = _make_preprocessor(mc.preprocessing)
            if m in given:
                if joint:
                    raise ConfigError(f"[{owner}] {config.fusion.TYPE} fusion needs the built-in "
                                      f"encoder of modality {str(m)!r}, not a given one")
                fn = given[m]
                if isinstance(fn, Module):
                    encs.add_module(str(m), fn)
                else:
                    self._external[m] = fn
            elif mc.encoder == "builtin":
                encs.add_module(str(m), ModalityEncoder.from_config(mc, rng=gen))
            elif mc.encoder == "onnx":
                if joint:
                    raise ConfigError(f"[{owner}] {config.fusion.TYPE} fusion needs the built-in "
                                      f"encoder of modality {str(m)!r}, not encoder='onnx'")
                from .onnx_encoder import OnnxEncoder
                self._external[m] = OnnxEncoder.from_modality_config(mc)
            else:
                raise ConfigError(f"[{owner}] modality {str(m)!r} uses encoder={mc.encoder!r}; "
                                  "pass its encoder in encoders= (or load it with "
                                  "MultiModalLoader)")
        self.add_module("encoders", encs)
        self.add_module("fusion", FusionLayer.from_config(config, rng=gen))
        self._stats = LatencyStats(stats_window)
        self._items = ItemCache.for_config(config, cache, owner=owner)
        self._identity_and_version()

    # -- configuration --------------------------------------------------------------------------

    @property
    def config(self) -> MultiModalConfig:
        """The current config (enabled flags included)."""
        return self._config

    @property
    def modalities(self) -> Tuple[Modality, ...]:
        """The configured modalities, in modality order."""
        return tuple(self._config.modalities)

    @property
    def enabled_modalities(self) -> Tuple[Modality, ...]:
        return self._config.enabled_modalities()

    @property
    def output_dim(self) -> int:
        return self._config.output_dim

    def encoder(self, modality: Union[Modality, str]) -> Any:
        """The encoder of ``modality`` (ModalityError if not configured)."""
        m = self._config.modality_config(modality).modality
        if m in self._external:
            return self._external[m]
        return dict(self.encoders.named_children())[str(m)]

    @property
    def external_encoders(self) -> Mapping[Modality, Callable]:
        """The encoders that are plain callables (not modules: outside the state dict), by
        modality (read-only view)."""
        return types.MappingProxyType(self._external)

    def set_enabled(self, modality: Union[Modality, str], enabled: bool = True) -> None:
        """Switch ``modality`` on or off (thread-safe; see :meth:`MultiModalConfig.with_enabled`).

        Raises
        ------
        ModalityError
            ``modality`` is not configured.
        ConfigError
            The switch would disable a required modality or the last enabled one.
        """
        with self._lock:
            self._config = self._config.with_enabled(modality, bool(enabled))

    def enable(self, modality: Union[Modality, str]) -> None:
        """Switch ``modality`` on."""
        self.set_enabled(modality, True)

    def disable(self, modality: Union[Modality, str]) -> None:
        """Switch ``modality`` off; inputs for it then raise ModalityError."""
        self.set_enabled(modality, False)

    # -- stats ----------------------------------------------------------------------------------

    def set_remote_encoders(self, remote: Optional[Mapping[Any, Any]]) -> None:
        """Serve modalities through remote encoders (or, with None / {}, locally again).

        A remote encoder is an object with ``submit(value, *, is_raw, attention_mask)``
        returning a :class:`concurrent.futures.Future` of ``(tokens, mask, pooled)`` (or of
        None: the modality is dropped from the request); it preprocesses and encodes
        elsewhere. :mod:`mmcore.distributed` provides them (:func:`mmcore.distributed.attach`
        and :func:`mmcore.distributed.load` call this). :meth:`infer` submits every
        remote modality first, encodes the local ones meanwhile, then fuses locally; the
        per-item cache of this model is not used for remote modalities (nodes keep their own).

        Raises
        ------
        ModalityError
            A key is not a configured modality.
        ConfigError
            Early or middle fusion (joint encoders cannot run remotely), or an object without
            ``submit``.
        """
        owner = type(self).__name__
        table: Dict[Modality, Any] = {}
        for key, enc in (remote or {}).items():
            m = Modality(key)
            if m not in self._config.modalities:
                raise ModalityError(f"[{owner}] remote encoder for modality {str(m)!r}, which "
                                    "is not configured")
            if not callable(getattr(enc, "submit", None)):
                raise ConfigError(f"[{owner}] remote encoder for modality {str(m)!r} has no "
                                  "submit method")
            table[m] = enc
        if table and self.fusion.kind in ("early", "middle"):
            raise ConfigError(f"[{owner}] {self.fusion.kind} fusion runs its encoders jointly; "
                              "remote encoders need late, attention or custom fusion")
        self._remote = table

    #: The distributed backend serving :attr:`remote_modalities` (set by mmcore.distributed).
    distributed: Any = None

    def close(self) -> None:
        """Release the distributed backend (connections, threads, actors), if any; the
        modalities it served are encoded locally again."""
        backend, self.distributed = self.distributed, None
        self._remote = {}
        if backend is not None:
            backend.close()

    @property
    def remote_modalities(self) -> Tuple[Modality, ...]:
        """The modalities served by remote encoders."""
        return tuple(self._remote)

    def stats(self) -> Dict[str, Dict[str, float]]:
        """Per stage (``preprocess:<m>``, ``encode:<m>``, ``fusion``, ``total``): ``count``,
        ``total_s``, ``mean_s``, ``p50_s``, ``p95_s`` (recent window) and ``items`` (rows)."""
        return self._stats.snapshot()

    def reset_stats(self) -> None:
        self._stats.reset()

    def prometheus_collector(self, *, prefix: str = "mmcore_model") -> Any:
        """A ``prometheus_client`` collector exposing :meth:`stats` (needs prometheus_client).

        Register it with ``prometheus_client.REGISTRY.register(model.prometheus_collector())``.
        Exposes ``<prefix>_stage_seconds`` (a summary: ``_count``, ``_sum`` and the recent-window
        quantiles ``quantile="0.5"`` / ``"0.95"``) and ``<prefix>_stage_items_total`` (rows
        processed), labelled by ``stage``. The collector describes its metric names, so a
        registry refuses a second collector with the same ``prefix`` (give each model its own).

        Raises
        ------
        ConfigError
            ``prefix`` is not a valid Prometheus metric name.
        ImportError
            prometheus_client is not installed.
        """
        return prometheus_collector(self.stats, prefix=prefix,
                                    op=f"{type(self).__name__}.prometheus_collector")

    # -- cache ----------------------------------------------------------------------------------

    @property
    def cache(self) -> Optional[CacheManager]:
        """The :class:`~mmcore.cache.CacheManager` of encoder outputs (None when off)."""
        return self._items.manager

    @property
    def item_cache(self) -> ItemCache:
        """The :class:`~mmcore.model.item_cache.ItemCache`: keys, identity and lookups of the
        per-item cache (present when caching is off too, with no manager)."""
        return self._items

    @property
    def identity(self) -> str:
        """Digest of the weights (and of the given non-module encoders) used in cache keys.

        It follows every replacement of a parameter (:meth:`load_state_dict`,
        :meth:`~mmcore.model.nn.Module.set_parameter`, on this model or on any of its modules,
        e.g. ``model.encoder("text").set_parameter(...)``): parameter arrays are read-only, so
        they cannot change in place, and a replacement advances
        :attr:`~mmcore.model.nn.Module.weights_version`, which makes the next call recompute
        the digest. Cached results of older weights are then never served (they age out of
        the cache). Encoders given as plain callables (not modules) are identified by object
        only: replace the model, or call :meth:`clear_cache`, if such an encoder changes.
        """
        return self._identity_and_version()[0]

    def _identity_and_version(self) -> Tuple[str, int]:
        """``(identity, weights_version)`` as they are now (see
        :meth:`ItemCache.identity_and_version
        <mmcore.model.item_cache.ItemCache.identity_and_version>`)."""
        return self._items.identity_and_version(self, self._external)

    def load_state_dict(self: _MM, state_dict: Mapping[str, object], *, prefix: str = "",
                        strict: bool = True) -> _MM:
        out = super().load_state_dict(state_dict, prefix=prefix, strict=strict)
        self._identity_and_version()            # recompute now rather than on the next call
        return out

    def cache_stats(self) -> Dict[str, Any]:
        """:meth:`CacheManager.stats` of the cache, plus ``"enabled"`` (False when off)."""
        return self._items.stats()

    def clear_cache(self) -> None:
        """Drop every cached entry (the counters are kept)."""
        self._items.clear()

    # -- inference ------------------------------------------------------------------------------

    def _check_input(self, m: Modality, mc: ModalityConfig, inputs: MultiModalInput) -> None:
        """Checks of one modality's input where it enters (before any encoding): paths must
        name regular files (the modality's decode error), preprocessed arrays must fit the
        built-in encoder (ShapeError)."""
        owner = type(self).__name__
        value = inputs.modality_inputs[m]
        kind = kind_of(m, mc.preprocessing)
        if inputs.raw[m] and not isinstance(value, Mapping):
            check_files(owner, m, kind, value)
        elif m in self._external:
            return
        else:
            check_preprocessed(owner, m, dict(self.encoders.named_children()).get(str(m)), value)

    def _prepare(self, m: Modality, mc: ModalityConfig, value: Any, is_raw: bool,
                 mask: Optional[np.ndarray]):
        """Encoder inputs and mask of one modality."""
        owner = type(self).__name__
        pre = self.preprocessors.get(m)
        kind = kind_of(m, mc.preprocessing)
        if isinstance(value, Mapping):
            if mask is None and value.get("attention_mask") is not None:
                mask = np.asarray(value["attention_mask"])
            for key in ("input_ids", "pixel_values", "input_features", "features"):
                if value.get(key) is not None:
                    value = value[key]
                    break
            else:
                raise ShapeError(f"[{owner}] modality_inputs[{str(m)!r}] dict has none of "
                                 "input_ids, pixel_values, input_features, features")
            if kind == "video":
                value = np.asarray(value)
                if value.ndim == 4:
                    value = value[None]
            return value, mask
        if not is_raw:
            return value, mask
        if pre is None:
            raise ShapeError(f"[{owner}] modality {str(m)!r} has no preprocessor; pass "
                             "preprocessed arrays")
        if kind == "text":
            out = pre(value)
            return out["input_ids"], out["attention_mask"]
        if kind == "image":
            return pre(value)["pixel_values"], None
        if kind == "audio":
            out = pre(value)
            feats = out["input_features"]
            if mc.preprocessing is not None and mc.preprocessing.preset == "fbank":
                feats = np.ascontiguousarray(feats.transpose(0, 2, 1))
            return feats, out["attention_mask"]
        if kind == "video":
            if isinstance(value, (list, tuple)):
                clips = list(value)
            elif isinstance(value, PATH_TYPES + ENCODED_TYPES):
                clips = [value]
            else:
                arr = np.asarray(value)
                clips = [arr] if arr.ndim == 4 else list(arr)
            return stack_clips([pre(c)["pixel_values"] for c in clips], owner)
        raise ShapeError(f"[{owner}] cannot preprocess modality {str(m)!r}")  # pragma: no cover

    def _encode_one(self, m: Modality, mc: ModalityConfig, inputs: MultiModalInput,
                    timings: Dict[str, float], use_cache: bool,
                    item_keys: Optional[Dict] = None):
        """``(tokens, mask, pooled)`` of one modality (late, attention and custom fusion)."""
        if use_cache and self._items.enabled_for(m):
            res = self._items.encoded(m, mc, inputs, prepare=self._prepare, encoder=self.encoder,
                                      weights=self._identity_and_version, timings=timings,
                                      item_keys=item_keys)
            if res is not None:
                return res
        t0 = time.perf_counter()
        x, mask = self._prepare(m, mc, inputs.modality_inputs[m], inputs.raw[m],
                                (inputs.attention_masks or {}).get(m))
        timings[f"preprocess:{m}"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        with precision_block(mc):
            tokens, tmask, pool = self.encoder(m)(x, attention_mask=mask)
        tokens = np.asarray(tokens, np.float32)
        tmask = np.asarray(tmask).astype(np.bool_)
        tokens = _zero_padding(tokens, tmask)
        timings[f"encode:{m}"] = time.perf_counter() - t0
        return tokens, tmask, np.asarray(pool, np.float32)

    def encode_modality(self, modality: Union[Modality, str], value: Any, *,
                        attention_mask: Optional[ArrayLike] = None,
                        timings: Optional[Dict[str, float]] = None
                        ) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Preprocess (when raw) and encode the input of one modality, without fusion.

        This is what a shard node runs for the modalities it serves (see
        :mod:`mmcore.distributed`); it goes through the per-item cache like :meth:`infer`.

        Parameters
        ----------
        modality : Modality or str
            A configured modality (enabled or not).
        value : any
            Its input, raw or preprocessed (see :class:`MultiModalInput`).
        attention_mask : (B, L) array, optional, keyword-only
            Mask of a preprocessed input.
        timings : dict, optional, keyword-only
            Receives the seconds spent per stage.

        Returns
        -------
        (tokens float32 (B, L, D), mask bool (B, L), pooled float32 (B, D))

        Raises
        ------
        ModalityError
            The modality is not configured.
        ConfigError
            The model uses early or middle fusion (its encoders run jointly).

        Examples
        --------
        >>> from mmcore.model import default_model
        >>> tokens, mask, pooled = default_model().encode_modality("text", ["hi"])
        >>> tokens.shape[0], pooled.shape
        (1, (1, 64))
        """
        owner = type(self).__name__
        m = Modality(modality)
        config = self._config
        if m not in config.modalities:
            raise ModalityError(f"[{owner}] modality {str(m)!r} is not configured "
                                f"(configured: {', '.join(map(str, config.modalities))})")
        if self.fusion.kind in ("early", "middle"):
            raise ConfigError(f"[{owner}] encode_modality needs late, attention or custom "
                              f"fusion; this model uses {self.fusion.kind} fusion")
        masks = None if attention_mask is None else {m: attention_mask}
        inputs = MultiModalInput({m: value}, attention_masks=masks)
        self._check_input(m, config.modalities[m], inputs)
        t = {} if timings is None else timings
        return self._encode_one(m, config.modalities[m], inputs, t,
                                self._items.enabled)

    def _config_key(self, cfg) -> str:
        """The cache's digest of a ModalityConfig or MultiModalConfig (see
        :meth:`ItemCache.config_key <mmcore.model.item_cache.ItemCache.config_key>`)."""
        return self._items.config_key(cfg)

    def infer(self, inputs: Union[MultiModalInput, Mapping[Any, Any]], *,
              return_weights: bool = False) -> MultiModalOutput:
        """Preprocess, encode and fuse one request.

        Parameters
        ----------
        inputs : MultiModalInput or dict
            A dict is wrapped in :class:`MultiModalInput`.
        return_weights : bool, default False
            Also return the fusion's attention weights.

        Returns
        -------
        MultiModalOutput

        Raises
        ------
        ModalityError
            An input names a modality that is not configured; a required modality has no
            input; no enabled modality has input (inputs of disabled modalities are ignored,
            and the fusion runs over the enabled modalities that have input).
        ShapeError
            Inputs of the wrong shape, dtype, layout or batch size, checked where they enter
            (before any encoding); the message names the modality, the shape and dtype
            received and what the modality accepts.
        ImageDecodeError, AudioDecodeError, VideoDecodeError
            A path that does not name a readable regular file (missing, a directory, a FIFO,
            a device), or a file that cannot be decoded; the message names the file.
        ArgumentError
            An audio ``(waveform, sample_rate)`` pair with a rate that is not a whole number
            of Hz in [1000, 768000], or that pairs a path with a rate.

        Notes
        -----
        What each modality accepts, and which inputs are raw (preprocessed by the model) or
        preprocessed (straight to the encoder):

        * text: raw ``str`` or list of ``str``; preprocessed integer ``input_ids`` (B, L).
        * image: raw uint8 RGB ``(H, W, 3)`` / ``(N, H, W, 3)``, a path, or a list of paths
          and uint8 ``(H, W, 3)``; preprocessed float ``pixel_values`` ``(B, 3, S, S)`` or
          patches ``(B, N, 3*p*p)``. A float ``(B, H, W, 3)`` array is refused (transpose it
          to ``(B, 3, H, W)`` if it is already preprocessed, or pass uint8).
        * audio: raw float ``(T,)``, ``(B, T)`` (a batch, never ``(T, channels)``), a
          ``(waveform, sample_rate)`` pair, a path, or a list of 1-D waveforms, pairs and
          paths; preprocessed float ``input_features`` ``(B, n_mels, frames)``.
        * video: raw uint8 ``(T, H, W, 3)`` / ``(B, T, H, W, 3)``, a path, or a list of
          paths and uint8 clips; preprocessed float ``pixel_values`` ``(B, T, 3, S, S)``.

        See the module docstring for the details (sample rates, channels, masks).
        """
        owner = type(self).__name__
        t_start = time.perf_counter()
        if not isinstance(inputs, MultiModalInput):
            if isinstance(inputs, Mapping):
                inputs = MultiModalInput(dict(inputs))
            else:
                raise ShapeError(f"[{owner}] inputs must be a MultiModalInput or a dict, got "
                                 f"{type(inputs).__name__}")
        config = self._config          # one snapshot for the whole call
        mods = config.modalities
        for m in inputs.modality_inputs:
            if m not in mods:
                raise ModalityError(f"[{owner}] input for modality {str(m)!r}, which this model "
                                    f"does not have (configured: "
                                    f"{', '.join(map(str, mods))})")
        for m, mc in mods.items():
            if mc.required and mc.enabled and m not in inputs.modality_inputs:
                raise ModalityError(f"[{owner}] modality {str(m)!r} is required but has no "
                                    "input")
        # inputs of disabled modalities are ignored (ModalityConfig.enabled)
        present = [m for m in mods if m in inputs.modality_inputs and mods[m].enabled]
        if not present:
            raise ModalityError(f"[{owner}] no input for any enabled modality (enabled: "
                                f"{', '.join(map(str, config.enabled_modalities()))})")
        for m in present:
            self._check_input(m, mods[m], inputs)
        kind = self.fusion.kind
        timings: Dict[str, float] = {}
        remote = self._remote
        futures = {}
        if remote:
            for m in present:
                if m in remote:
                    value = inputs.modality_inputs[m]
                    if inputs.raw[m]:
                        value = resolve_audio_pairs(kind_of(m, mods[m].preprocessing),
                                                     mods[m].preprocessing, value)
                    futures[m] = (time.perf_counter(), remote[m].submit(
                        value, is_raw=inputs.raw[m],
                        attention_mask=(inputs.attention_masks or {}).get(m)))
        staged = {}
        done = {}
        item_keys: Dict[Modality, list] = {}
        B = None
        use_cache = self._items.enabled and kind not in ("early", "middle")
        for m in present:
            if m in futures:
                continue
            if kind not in ("early", "middle"):
                res = self._encode_one(m, mods[m], inputs, timings, use_cache, item_keys)
                B = _check_batch(owner, m, int(res[0].shape[0]), B)
                done[m] = res
                continue
            t0 = time.perf_counter()
            x, mask = self._prepare(m, mods[m], inputs.modality_inputs[m], inputs.raw[m],
                                    (inputs.attention_masks or {}).get(m))
            timings[f"preprocess:{m}"] = time.perf_counter() - t0
            B = _check_batch(owner, m, int(np.shape(x)[0]), B)
            staged[m] = (x, mask)
        for m, (t0, fut) in futures.items():
            res = fut.result()
            timings[f"remote:{m}"] = time.perf_counter() - t0
            if res is None:                 # the modality was dropped (no node left)
                if mods[m].required:
                    from ..errors import NodeUnavailableError
                    raise NodeUnavailableError(f"[{owner}] modality {str(m)!r} is required, but "
                                               "no node could encode it")
                continue
            res = _check_remote_result(owner, m, mods[m], res)
            B = _check_batch(owner, m, int(res[0].shape[0]), B)
            done[m] = res
        present = [m for m in present if m in done or m in staged]
        if not present:
            raise ModalityError(f"[{owner}] no modality of this request could be encoded")
        assert B is not None            # every modality left set it

        embeddings, masks, pooled = {}, {}, {}
        fusion_in: Dict[Modality, Tuple[Any, ...]] = {}
        for m in present:
            if m in done:
                tokens, tmask, pool = done[m]
                embeddings[m], masks[m], pooled[m] = tokens, tmask, pool
                fusion_in[m] = (tokens, tmask, pool)
                continue
            x, mask = staged[m]
            t0 = time.perf_counter()
            enc = self.encoder(m)
            with precision_block(mods[m]):
                h, hm = enc.embed(x, attention_mask=mask)
                if kind == "middle":
                    h = enc.encode(h, hm, end_layer=self.fusion.strategy.fusion_layer)
            fusion_in[m] = (h, hm)
            timings[f"encode:{m}"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        res = None
        if (use_cache and not return_weights and kind in ("late", "attention")
                and all(m in item_keys for m in present)):
            res = self._items.fused(config, present, fusion_in, item_keys, B, fuse=self.fusion,
                                    weights=self._identity_and_version)
        if res is None:
            res = self.fusion(fusion_in, return_weights=return_weights)
        if kind in ("early", "middle"):
            joint, jmask = res["tokens"], res["mask"]
            off = 0
            for m in present:
                L = fusion_in[m][0].shape[1]
                embeddings[m] = np.ascontiguousarray(joint[:, off:off + L])
                masks[m] = jmask[:, off:off + L]
                pooled[m] = masked_mean(embeddings[m], masks[m])
                off += L
        timings["fusion"] = time.perf_counter() - t0
        timings["total"] = time.perf_counter() - t_start
        self._stats.record_many(timings, items=B)
        return MultiModalOutput(
            fused=np.asarray(res["fused"], np.float32), embeddings=embeddings, pooled=pooled,
            attention_weights=res.get("attention_weights") if return_weights else None,
            masks=masks, stats=timings)

    __call__ = infer

    # -- files ----------------------------------------------------------------------------------

    def save(self, path: PathLike, *, name: Optional[str] = None, version: Optional[str] = None,
             tokenizer: Optional[PathLike] = None) -> Dict[str, Any]:
        """Write this model to a model directory (see :mod:`mmcore.model.io`).

        Each modality's :attr:`ModalityConfig.quantization` applies (weight-only) to its
        encoder's tensors (keys ``encoders.<m>.``); the fusion layer stays float32. The write
        is atomic: on failure the previous directory at ``path`` (if any) is left as it was.

        Parameters
        ----------
        path : path-like
            The model directory (created, or replaced if it is a model directory).
        name, version : str, optional
            Recorded in the metadata; default: the config's ``name`` and ``version``.
        tokenizer : path-like, optional
            A ``tokenizer.json`` copied into the directory; text preprocessing that uses a
            tokenizer file then refers to the copy, so the directory is self-contained.
            Without it, the tokenizer file each text modality uses (if any) is copied, and so
            is the ONNX graph of each ``encoder="onnx"`` modality (``encoder.<m>.onnx``): the
            directory's config names them relative to the directory, where
            :meth:`from_pretrained` requires them to be.

        Returns
        -------
        dict
            The metadata written to ``mmcore.json``.
        """
        return save_model(self, path, name=name, version=version, tokenizer=tokenizer)

    @classmethod
    def from_pretrained(cls, path: PathLike, *, verify: bool = True,
                        encoders: Optional[Mapping[Any, Any]] = None,
                        modalities: Optional[Any] = None,
                        distributed: Any = None) -> "MultiModalModel":
        """Load a model directory written by :meth:`save` (or
        :func:`~mmcore.model.io.save_model_dir`).

        Parameters
        ----------
        path : path-like
            The model directory.
        verify : bool, default True
            Check the SHA-256 of every file (sizes are always checked).
        encoders : dict of Modality or str -> callable, optional
            As for the constructor (needed for ``encoder="external"`` modalities).
        modalities : iterable of Modality or str, optional
            Load only these modalities' preprocessors and encoders (what a shard node
            needs): the model gets a config restricted to them, with
            ``LateFusion("concat")`` in place of the stored fusion, and serves
            :meth:`encode_modality`; the other tensors are not kept.
        distributed : DistributedConfig, optional
            Deprecated: use ``mmcore.distributed.load(path, config)``. Serve the modalities
            it names through :mod:`mmcore.distributed` (remote nodes or Ray actors);
            cross-modal attention and fusion stay local. The model calls its
            ``attach(model, model_dir=path)`` (see :func:`attach_remote`).

        Raises
        ------
        ModelFormatError
            The directory is missing or corrupt, its config is invalid (the message names the
            field), or its tensors do not fit the config: a missing tensor, a tensor of an
            unknown modality, a wrong shape (the message names the tensor). No model is
            returned in that case. The config's sizes are checked against the stored tensors
            before the modules are built: a config that implies more layers, tensors or
            values than ``model.safetensors`` holds fails at once, with little memory used.
            A tokenizer or ONNX file named by the config must be one of the directory's own
            files (a name relative to it, listed in ``mmcore.json`` with its checksum).
        ModalityError
            ``modalities`` names a modality the directory does not have.
        """
        model = load_pretrained(cls, path, verify=verify, encoders=encoders,
                                modalities=modalities)
        if distributed is not None:
            warnings.warn("[MultiModalModel.from_pretrained] distributed= is deprecated; use "
                          "mmcore.distributed.load(path, config) instead (or "
                          "mmcore.distributed.attach(model, config, model_dir=path))",
                          DeprecationWarning, stacklevel=2)
            attach_remote(model, distributed, model_dir=os.fspath(path),
                          op="MultiModalModel.from_pretrained")
        return model

    def extra_repr(self) -> str:
        return (f"modalities={[str(m) for m in self.modalities]}, "
                f"enabled={[str(m) for m in self.enabled_modalities]}, "
                f"fusion={self.fusion.kind!r}, output_dim={self.output_dim}")


def __getattr__(name: str) -> Any:
    # default_config / default_model live in mmcore.model.defaults (which builds on this
    # module); they stay importable from here
    if name in ("default_config", "default_model"):
        from . import defaults
        return getattr(defaults, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
