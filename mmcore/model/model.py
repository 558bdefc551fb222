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
audio      float (T,), float (B, T), a path, or a list  float ``input_features``
           of 1-D waveforms / paths (at the config's    (B, n_mels, frames)
           sample rate)
video      uint8 (T, H, W, 3), uint8 (B, T, H, W, 3),   float ``pixel_values`` (B, T, 3, S, S)
           a path, or a list of paths / uint8 clips
custom     per its borrowed preprocessor, else features (B, L, in_features) or int ids (B, L)
=========  ==========================================  =====================================

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

import collections
import os
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Mapping, Optional, Tuple

import numpy as np

from ..config import (AttentionFusion, CrossModalAttentionConfig, EarlyFusion, EncoderConfig,
                      MiddleFusion, ModalityConfig, MultiModalConfig, PreprocessingConfig)
from ..errors import ConfigError, ModalityError, ModelFormatError, ShapeError
from ..modality import Modality
from ..ops import masked_mean
from .encoders import ModalityEncoder
from .fusion import FusionLayer
from .nn import Module, RngLike, as_generator

__all__ = ["MultiModalInput", "MultiModalOutput", "MultiModalModel", "LatencyStats",
           "default_model"]

_PATH_TYPES = (str, bytes, os.PathLike)


# ----------------------------------------------------------------------------------------------
# input classification


def _kind_of(modality: Modality, pre: Optional[PreprocessingConfig] = None) -> Optional[str]:
    """The preprocessor family of a modality ("text", "image", "audio", "video") or None."""
    if pre is not None:
        return pre.modality
    if not modality.is_custom:
        return str(modality)
    return None


def _classify(kind: Optional[str], value: Any, where: str) -> Tuple[bool, int]:
    """``(is_raw, batch_size)`` of one modality input (see the module docstring)."""
    if isinstance(value, Mapping):
        for v in value.values():
            a = np.asarray(v) if v is not None else None
            if a is not None and a.ndim >= 1:
                return False, int(a.shape[0])
        raise ShapeError(f"[MultiModalInput] {where} is a dict without arrays")
    if isinstance(value, _PATH_TYPES):
        if kind == "text" and isinstance(value, (str, bytes)):
            return True, 1
        if kind in ("image", "audio", "video", "text"):
            return True, 1
        raise ShapeError(f"[MultiModalInput] {where} is a path, but the modality has no "
                         "preprocessor")
    if isinstance(value, (list, tuple)):
        if len(value) == 0:
            raise ShapeError(f"[MultiModalInput] {where} is an empty batch")
        if kind is None:
            return False, len(value)
        if kind == "audio" and all(isinstance(a, (int, float, np.integer, np.floating))
                                   and not isinstance(a, bool) for a in value):
            return True, 1
        return True, len(value)
    try:
        a = np.asarray(value)
    except Exception as exc:  # pragma: no cover - numpy accepts nearly anything
        raise ShapeError(f"[MultiModalInput] {where} cannot be converted to an array: "
                         f"{exc}") from None
    if a.dtype == object or a.ndim == 0:
        raise ShapeError(f"[MultiModalInput] {where} has shape {a.shape} and dtype {a.dtype}, "
                         "expected raw inputs or a preprocessed array (see MultiModalInput)")
    floating = a.dtype.kind == "f"
    if kind == "text":
        if a.dtype.kind in "iu" and a.ndim == 2:
            return False, a.shape[0]
        raise ShapeError(f"[MultiModalInput] {where} has shape {a.shape} and dtype {a.dtype}, "
                         "expected strings or int input_ids (B, L)")
    if kind == "image":
        if a.dtype == np.uint8 and a.ndim == 3:
            return True, 1
        if a.dtype == np.uint8 and a.ndim == 4:
            return True, a.shape[0]
        if floating and a.ndim in (3, 4):
            return False, a.shape[0]
        raise ShapeError(f"[MultiModalInput] {where} has shape {a.shape} and dtype {a.dtype}, "
                         "expected uint8 (H, W, 3) / (N, H, W, 3) images or float "
                         "pixel_values (B, 3, S, S)")
    if kind == "audio":
        if floating and a.ndim == 1:
            return True, 1
        if floating and a.ndim == 2:
            return True, a.shape[0]
        if floating and a.ndim == 3:
            return False, a.shape[0]
        raise ShapeError(f"[MultiModalInput] {where} has shape {a.shape} and dtype {a.dtype}, "
                         "expected float waveforms (T,) / (B, T) or features "
                         "(B, n_mels, frames)")
    if kind == "video":
        if a.dtype == np.uint8 and a.ndim == 4:
            return True, 1
        if a.dtype == np.uint8 and a.ndim == 5:
            return True, a.shape[0]
        if floating and a.ndim == 5:
            return False, a.shape[0]
        raise ShapeError(f"[MultiModalInput] {where} has shape {a.shape} and dtype {a.dtype}, "
                         "expected uint8 clips (T, H, W, 3) / (B, T, H, W, 3) or float "
                         "pixel_values (B, T, 3, S, S)")
    return False, a.shape[0]


@dataclass
class MultiModalInput:
    """One request: inputs per modality, optional masks and the batch size.

    Parameters
    ----------
    modality_inputs : dict of Modality or str -> input
        Raw or preprocessed inputs (see the table in :mod:`mmcore.model.model`).
    attention_masks : dict of Modality or str -> (B, L) array, optional
        Masks of preprocessed inputs (True/1 = real): text (B, L), audio (B, frames),
        video (B, T) frames, image (B, N) patches.
    batch_size : int, optional
        Checked against the inputs; inferred when None.

    Raises
    ------
    ModalityError
        A key is not a modality (``"text"``, ``"custom:7"``, ...) or a mask names a modality
        without input.
    ShapeError
        Inputs disagree on the batch size (or with ``batch_size``), a mask is given for a raw
        input, or an input is empty or of an unusable type.

    Examples
    --------
    >>> import numpy as np
    >>> from mmcore.model import MultiModalInput
    >>> MultiModalInput({"text": ["a", "b"], "audio": np.zeros((2, 800), np.float32)}).batch_size
    2
    """

    modality_inputs: Dict[Any, Any]
    attention_masks: Optional[Dict[Any, Any]] = None
    batch_size: Optional[int] = None
    raw: Dict[Modality, bool] = field(default_factory=dict, init=False, repr=False)

    def __post_init__(self):
        owner = "MultiModalInput"
        if not isinstance(self.modality_inputs, Mapping):
            raise ShapeError(f"[{owner}] modality_inputs must be a dict of modality -> input, "
                             f"got {type(self.modality_inputs).__name__}")
        inputs: Dict[Modality, Any] = {}
        for key, value in self.modality_inputs.items():
            m = Modality(key)               # ModalityError for unknown names
            if m in inputs:
                raise ModalityError(f"[{owner}] modality {str(m)!r} is given twice")
            if value is not None:
                inputs[m] = value
        masks: Dict[Modality, np.ndarray] = {}
        for key, value in (self.attention_masks or {}).items():
            m = Modality(key)
            if m not in inputs:
                raise ModalityError(f"[{owner}] attention_masks names modality {str(m)!r}, "
                                    "which has no input")
            if value is not None:
                masks[m] = np.asarray(value)
        B = None
        first = None
        raw = {}
        for m, value in inputs.items():
            is_raw, b = _classify(_kind_of(m), value, f"modality_inputs[{str(m)!r}]")
            raw[m] = is_raw
            if is_raw and m in masks:
                raise ShapeError(f"[{owner}] attention_masks[{str(m)!r}] applies to "
                                 "preprocessed inputs only (raw inputs get their mask from "
                                 "the preprocessor)")
            if m in masks and (masks[m].ndim != 2 or masks[m].shape[0] != b):
                raise ShapeError(f"[{owner}] attention_masks[{str(m)!r}] has shape "
                                 f"{masks[m].shape}, expected ({b}, L)")
            if B is None:
                B, first = b, m
            elif b != B:
                raise ShapeError(f"[{owner}] modality_inputs[{str(m)!r}] has batch size {b}, "
                                 f"but modality_inputs[{str(first)!r}] has {B}")
        if self.batch_size is not None:
            bs = self.batch_size
            if isinstance(bs, bool) or not isinstance(bs, (int, np.integer)) or bs < 1:
                raise ShapeError(f"[{owner}] batch_size must be an integer >= 1, got {bs!r}")
            if B is not None and int(bs) != B:
                raise ShapeError(f"[{owner}] batch_size={bs}, but the inputs have batch size "
                                 f"{B}")
            B = int(bs)
        self.modality_inputs = inputs
        self.attention_masks = masks
        self.batch_size = B
        self.raw = raw

    @property
    def modalities(self) -> Tuple[Modality, ...]:
        """The modalities with input."""
        return tuple(self.modality_inputs)


@dataclass
class MultiModalOutput:
    """What :meth:`MultiModalModel.infer` returns.

    Attributes
    ----------
    fused : float32 (B, output_dim)
        The fused embedding.
    embeddings : dict of Modality -> float32 (B, L_m, D)
        Per-modality token embeddings: the encoder outputs (late, attention, custom fusion),
        or the modality's slice of the joint encoder output (early, middle fusion).
    pooled : dict of Modality -> float32 (B, D)
        Per-modality pooled embeddings (the encoder's pooling; for early/middle fusion the
        masked mean of the joint slice).
    attention_weights : dict or None
        With ``return_weights=True``: the fusion layer's weights (see
        :meth:`FusionLayer.__call__`); else None.
    masks : dict of Modality -> bool (B, L_m)
        Token masks (True = real) of ``embeddings``.
    stats : dict of str -> float
        Seconds spent by this call per stage: ``"preprocess:<m>"``, ``"encode:<m>"``,
        ``"fusion"``, ``"total"``.
    """

    fused: np.ndarray
    embeddings: Dict[Modality, np.ndarray]
    pooled: Dict[Modality, np.ndarray]
    attention_weights: Optional[Dict[Any, np.ndarray]]
    masks: Dict[Modality, np.ndarray]
    stats: Dict[str, float]

    @property
    def batch_size(self) -> int:
        return int(self.fused.shape[0])


# ----------------------------------------------------------------------------------------------
# stats


class LatencyStats:
    """Thread-safe per-stage latency counters with a bounded window of recent samples.

    ``record(stage, seconds, items)`` adds one sample; :meth:`snapshot` returns, per stage,
    ``count``, ``total_s``, ``mean_s``, ``p50_s``, ``p95_s`` (over the last ``window``
    samples) and ``items`` (rows processed).

    Examples
    --------
    >>> from mmcore.model.model import LatencyStats
    >>> s = LatencyStats(window=4)
    >>> for t in (1.0, 2.0, 3.0, 4.0, 5.0):
    ...     s.record("fusion", t, items=2)
    >>> snap = s.snapshot()["fusion"]
    >>> snap["count"], snap["items"], snap["p50_s"]
    (5, 10, 3.5)
    """

    def __init__(self, window: int = 1024):
        if isinstance(window, bool) or not isinstance(window, (int, np.integer)) or window < 1:
            raise ConfigError(f"LatencyStats.window must be an integer >= 1, got {window!r}")
        self.window = int(window)
        self._lock = threading.Lock()
        self._stages: Dict[str, list] = {}

    def record(self, stage: str, seconds: float, items: int = 0) -> None:
        with self._lock:
            st = self._stages.get(stage)
            if st is None:
                st = [0, 0.0, 0, collections.deque(maxlen=self.window)]
                self._stages[stage] = st
            st[0] += 1
            st[1] += float(seconds)
            st[2] += int(items)
            st[3].append(float(seconds))

    def record_many(self, timings: Mapping[str, float], items: int = 0) -> None:
        for stage, secs in timings.items():
            self.record(stage, secs, items)

    def snapshot(self) -> Dict[str, Dict[str, float]]:
        with self._lock:
            data = {k: (v[0], v[1], v[2], np.array(v[3], np.float64))
                    for k, v in self._stages.items()}
        out = {}
        for stage, (count, total, items, recent) in data.items():
            p50, p95 = (np.percentile(recent, [50, 95]).tolist() if recent.size
                        else (0.0, 0.0))
            out[stage] = {"count": count, "total_s": total,
                          "mean_s": total / count if count else 0.0,
                          "p50_s": float(p50), "p95_s": float(p95), "items": items}
        return out

    def reset(self) -> None:
        with self._lock:
            self._stages.clear()


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


def _stack_clips(clips, owner: str):
    """Pad (T_i, 3, S, S) clips to one (B, T, 3, S, S) batch and a (B, T) frame mask."""
    T = max(c.shape[0] for c in clips)
    shape = clips[0].shape[1:]
    for i, c in enumerate(clips):
        if c.shape[1:] != shape:
            raise ShapeError(f"[{owner}] video {i} preprocessed to frames of shape "
                             f"{c.shape[1:]}, expected {shape}")
    x = np.zeros((len(clips), T) + tuple(shape), np.float32)
    mask = np.zeros((len(clips), T), np.bool_)
    for i, c in enumerate(clips):
        x[i, :c.shape[0]] = c
        mask[i, :c.shape[0]] = True
    return x, (None if mask.all() else mask)


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
        Encoders that replace the built-in ones (needed for ``encoder="external"``, ``"onnx"``
        or ``"remote"`` modalities): ``fn(inputs, attention_mask=mask) -> (tokens (B, L, D),
        mask (B, L), pooled (B, D))`` with ``D`` the modality's ``embed_dim``. Early and
        middle fusion need built-in encoders. Callables that are :class:`Module` take part in
        the state dict.
    stats_window : int, default 1024
        Recent latencies kept per stage for the percentiles of :meth:`stats`.

    Every configured modality gets a preprocessor and an encoder, enabled or not, so that
    :meth:`enable` / :meth:`disable` switch modalities at run time without rebuilding.
    Weights: the modality encoders were drawn at random unless loaded with
    :meth:`load_state_dict` (keys ``encoders.<m>.*`` and ``fusion.*``).

    Thread safety: :meth:`infer` keeps no shared mutable state besides the statistics (behind
    a lock) and can be called from many threads at once; :meth:`enable` / :meth:`disable`
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
                 stats_window: int = 1024):
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
            else:
                raise ConfigError(f"[{owner}] modality {str(m)!r} uses encoder={mc.encoder!r}; "
                                  "pass its encoder in encoders= (or load it with "
                                  "MultiModalLoader)")
        self.add_module("encoders", encs)
        self.add_module("fusion", FusionLayer.from_config(config, rng=gen))
        self._stats = LatencyStats(stats_window)

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

    def encoder(self, modality) -> Any:
        """The encoder of ``modality`` (ModalityError if not configured)."""
        m = self._config.modality_config(modality).modality
        if m in self._external:
            return self._external[m]
        return self.encoders._modules[str(m)]

    def set_enabled(self, modality, enabled: bool = True) -> None:
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

    def enable(self, modality) -> None:
        """Switch ``modality`` on."""
        self.set_enabled(modality, True)

    def disable(self, modality) -> None:
        """Switch ``modality`` off; inputs for it then raise ModalityError."""
        self.set_enabled(modality, False)

    # -- stats ----------------------------------------------------------------------------------

    def stats(self) -> Dict[str, Dict[str, float]]:
        """Per stage (``preprocess:<m>``, ``encode:<m>``, ``fusion``, ``total``): ``count``,
        ``total_s``, ``mean_s``, ``p50_s``, ``p95_s`` (recent window) and ``items`` (rows)."""
        return self._stats.snapshot()

    def reset_stats(self) -> None:
        self._stats.reset()

    def prometheus_collector(self, *, prefix: str = "mmcore_model"):
        """A ``prometheus_client`` collector exposing :meth:`stats` (needs prometheus_client).

        Register it with ``prometheus_client.REGISTRY.register(model.prometheus_collector())``.
        Exposes ``<prefix>_stage_seconds`` (a summary: count, sum and the p50/p95 quantiles)
        and ``<prefix>_stage_items_total``, labelled by ``stage``.
        """
        try:
            from prometheus_client.core import CounterMetricFamily, SummaryMetricFamily
        except ImportError as exc:
            raise ImportError("prometheus_collector needs the prometheus_client package") from exc
        model = self

        class _Collector:
            def collect(self):
                snap = model.stats()
                lat = SummaryMetricFamily(f"{prefix}_stage_seconds",
                                          "Latency of model stages", labels=["stage"])
                items = CounterMetricFamily(f"{prefix}_stage_items",
                                            "Rows processed by model stages", labels=["stage"])
                for stage, s in snap.items():
                    lat.add_metric([stage], s["count"], s["total_s"])
                    items.add_metric([stage], s["items"])
                yield lat
                yield items
                from prometheus_client.core import GaugeMetricFamily
                q = GaugeMetricFamily(f"{prefix}_stage_seconds_quantile",
                                      "Recent latency quantiles of model stages",
                                      labels=["stage", "quantile"])
                for stage, s in snap.items():
                    q.add_metric([stage, "0.5"], s["p50_s"])
                    q.add_metric([stage, "0.95"], s["p95_s"])
                yield q

        return _Collector()

    # -- inference ------------------------------------------------------------------------------

    def _prepare(self, m: Modality, mc: ModalityConfig, value: Any, is_raw: bool,
                 mask: Optional[np.ndarray]):
        """Encoder inputs and mask of one modality."""
        owner = type(self).__name__
        pre = self.preprocessors.get(m)
        kind = _kind_of(m, mc.preprocessing)
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
            if mc.preprocessing.preset == "fbank":
                feats = np.ascontiguousarray(feats.transpose(0, 2, 1))
            return feats, out["attention_mask"]
        if kind == "video":
            if isinstance(value, (list, tuple)):
                clips = list(value)
            elif isinstance(value, _PATH_TYPES):
                clips = [value]
            else:
                arr = np.asarray(value)
                clips = [arr] if arr.ndim == 4 else list(arr)
            return _stack_clips([pre(c)["pixel_values"] for c in clips], owner)
        raise ShapeError(f"[{owner}] cannot preprocess modality {str(m)!r}")  # pragma: no cover

    def infer(self, inputs, *, return_weights: bool = False) -> MultiModalOutput:
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
            An input names a modality that is not configured or is disabled; a required
            modality has no input; no enabled modality has input.
        ShapeError
            Inputs of the wrong shape, dtype or batch size.
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
            if not mods[m].enabled:
                raise ModalityError(f"[{owner}] input for modality {str(m)!r}, which is "
                                    "disabled (enable it with model.enable)")
        for m, mc in mods.items():
            if mc.required and mc.enabled and m not in inputs.modality_inputs:
                raise ModalityError(f"[{owner}] modality {str(m)!r} is required but has no "
                                    "input")
        present = [m for m in mods if m in inputs.modality_inputs]
        if not present:
            raise ModalityError(f"[{owner}] no input for any enabled modality (enabled: "
                                f"{', '.join(map(str, config.enabled_modalities()))})")
        kind = self.fusion.kind
        timings: Dict[str, float] = {}
        staged = {}
        B = None
        for m in present:
            t0 = time.perf_counter()
            x, mask = self._prepare(m, mods[m], inputs.modality_inputs[m], inputs.raw[m],
                                    inputs.attention_masks.get(m))
            timings[f"preprocess:{m}"] = time.perf_counter() - t0
            b = int(np.shape(x)[0])
            if B is None:
                B = b
            elif b != B:
                raise ShapeError(f"[{owner}] modality {str(m)!r} has batch size {b} after "
                                 f"preprocessing, expected {B}")
            staged[m] = (x, mask)

        embeddings, masks, pooled = {}, {}, {}
        fusion_in = {}
        for m in present:
            x, mask = staged[m]
            t0 = time.perf_counter()
            enc = self.encoder(m)
            if kind == "early":
                h, hm = enc.embed(x, attention_mask=mask)
                fusion_in[m] = (h, hm)
            elif kind == "middle":
                h, hm = enc.embed(x, attention_mask=mask)
                h = enc.encode(h, hm, end_layer=self.fusion.strategy.fusion_layer)
                fusion_in[m] = (h, hm)
            else:
                tokens, tmask, pool = enc(x, attention_mask=mask)
                tokens = np.asarray(tokens, np.float32)
                tmask = np.asarray(tmask).astype(np.bool_)
                embeddings[m], masks[m], pooled[m] = tokens, tmask, np.asarray(pool, np.float32)
                fusion_in[m] = (tokens, tmask, pooled[m])
            timings[f"encode:{m}"] = time.perf_counter() - t0

        t0 = time.perf_counter()
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

    def save(self, path, *, name: Optional[str] = None, version: Optional[str] = None,
             tokenizer=None) -> Dict[str, Any]:
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

        Returns
        -------
        dict
            The metadata written to ``mmcore.json``.
        """
        from .io import save_model_dir
        config = self._config
        cfg = config.to_dict()
        rules: Dict[str, Optional[str]] = {}
        for m, mc in config.modalities.items():
            if mc.quantization is not None:
                rules[f"encoders.{m}."] = mc.quantization
        extra = None
        if tokenizer is not None:
            tok = os.fspath(tokenizer)
            if os.path.isdir(tok):
                tok = os.path.join(tok, _TOKENIZER_FILE)
            extra = {_TOKENIZER_FILE: tok}
            for mcfg in cfg.get("modalities", {}).values():
                pre = mcfg.get("preprocessing") if isinstance(mcfg, dict) else None
                if (isinstance(pre, dict) and pre.get("modality") == "text"
                        and pre.get("tokenizer") not in (None, "byte")):
                    pre["tokenizer"] = _TOKENIZER_FILE
        return save_model_dir(path, config=cfg, state=self.state_dict(),
                              name=name if name is not None else config.name,
                              version=version if version is not None else config.version,
                              quantization=rules or None, extra_files=extra)

    @classmethod
    def from_pretrained(cls, path, *, verify: bool = True,
                        encoders: Optional[Mapping[Any, Any]] = None) -> "MultiModalModel":
        """Load a model directory written by :meth:`save` (or :func:`~mmcore.model.io.save_model_dir`).

        Parameters
        ----------
        path : path-like
            The model directory.
        verify : bool, default True
            Check the SHA-256 of every file (sizes are always checked).
        encoders : dict of Modality or str -> callable, optional
            As for the constructor (needed for ``encoder="external"`` modalities).

        Raises
        ------
        ModelFormatError
            The directory is missing or corrupt, its config is invalid (the message names the
            field), or its tensors do not fit the config: a missing tensor, a tensor of an
            unknown modality, a wrong shape (the message names the tensor). No model is
            returned in that case.
        """
        from .io import load_model_dir
        cfg_dict, state, meta = load_model_dir(path, verify=verify)
        config = _config_from_dir(cfg_dict, path, meta)
        _check_state_modalities(state, config, os.fspath(path))
        model = cls(config, seed=0, encoders=encoders)
        state = {k: v for k, v in state.items()
                 if not _served_externally(k, model._external)}
        try:
            model.load_state_dict(state, strict=True)
        except ModelFormatError as exc:
            raise ModelFormatError(f"{os.fspath(path)}: {exc}") from None
        return model

    def extra_repr(self) -> str:
        return (f"modalities={[str(m) for m in self.modalities]}, "
                f"enabled={[str(m) for m in self.enabled_modalities]}, "
                f"fusion={self.fusion.kind!r}, output_dim={self.output_dim}")


# ----------------------------------------------------------------------------------------------
# model directories

_TOKENIZER_FILE = "tokenizer.json"


def _config_from_dir(cfg_dict: Mapping[str, Any], path, meta: Mapping[str, Any]
                     ) -> MultiModalConfig:
    """The :class:`MultiModalConfig` stored in a model directory (ModelFormatError if invalid)."""
    root = os.fspath(path)
    data = dict(cfg_dict)
    files = meta.get("files") or {}
    if _TOKENIZER_FILE in files and isinstance(data.get("modalities"), Mapping):
        mods = {}
        for key, mcfg in data["modalities"].items():
            if isinstance(mcfg, Mapping):
                mcfg = dict(mcfg)
                pre = mcfg.get("preprocessing")
                if isinstance(pre, Mapping) and pre.get("tokenizer") == _TOKENIZER_FILE:
                    mcfg["preprocessing"] = dict(pre, tokenizer=os.path.join(root,
                                                                             _TOKENIZER_FILE))
            mods[key] = mcfg
        data["modalities"] = mods
    try:
        return MultiModalConfig.from_dict(data)
    except (ConfigError, ModalityError, ShapeError, TypeError, KeyError) as exc:
        raise ModelFormatError(f"{root}: the config in mmcore.json is invalid: {exc}") from None


def _check_state_modalities(state: Mapping[str, Any], config: MultiModalConfig,
                            where: str) -> None:
    """ModelFormatError for encoder tensors of a modality the config does not have."""
    known = {str(m) for m in config.modalities}
    for key in state:
        if key.startswith("encoders."):
            rest = key[len("encoders."):]
            m = next((k for k in known if rest.startswith(k + ".")), None)
            if m is None:
                raise ModelFormatError(f"{where}: tensor {key!r} belongs to a modality that the "
                                       f"config does not have (configured: "
                                       f"{', '.join(sorted(known))})")


def _served_externally(key: str, external: Mapping[Modality, Any]) -> bool:
    return any(key.startswith(f"encoders.{m}.") for m in external)


# ----------------------------------------------------------------------------------------------
# the default model


def default_config(*, embed_dim: int = 64, num_layers: int = 2, num_heads: int = 4,
                   fusion: Any = None) -> MultiModalConfig:
    """The config of :func:`default_model` (``fusion`` None: ``AttentionFusion``)."""
    def enc(**kw):
        return EncoderConfig(num_layers=num_layers, num_heads=num_heads, mlp_ratio=2.0, **kw)

    mods = [
        ModalityConfig("text", embed_dim=embed_dim, encoder_config=enc(),
                       preprocessing=PreprocessingConfig(modality="text", max_length=64)),
        ModalityConfig("image", embed_dim=embed_dim, encoder_config=enc(patch_size=16),
                       preprocessing=PreprocessingConfig(modality="image", size=64)),
        ModalityConfig("audio", embed_dim=embed_dim,
                       encoder_config=enc(extra={"frame_stride": 4}),
                       preprocessing=PreprocessingConfig(modality="audio", preset="whisper",
                                                         n_mels=80, chunk_length_s=2.0)),
        ModalityConfig("video", embed_dim=embed_dim, encoder_config=enc(patch_size=16),
                       preprocessing=PreprocessingConfig(modality="video", size=32,
                                                         num_frames=8, temporal_patch=2)),
    ]
    if fusion is None:
        fusion = AttentionFusion(attention_dim=embed_dim, num_heads=num_heads)
    cross = None
    if isinstance(fusion, AttentionFusion):
        cross = CrossModalAttentionConfig(num_heads=num_heads, pairs=[("text", "image")])
    return MultiModalConfig(mods, fusion=fusion, cross_attention=cross, name="mmcore-default")


def default_model(seed: int = 0, **kwargs) -> MultiModalModel:
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
    ``num_heads``, ``fusion``).

    Examples
    --------
    >>> import numpy as np
    >>> from mmcore.model import default_model
    >>> m = default_model()
    >>> m.infer({"audio": np.zeros(16000, np.float32)}).fused.shape
    (1, 64)
    """
    return MultiModalModel(default_config(**kwargs), seed=seed)
