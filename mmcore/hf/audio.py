"""Drop-in ``WhisperFeatureExtractor``: raw speech -> ``{"input_features"[, "attention_mask"]}``.

Reads Whisper's ``preprocessor_config.json`` and follows transformers' ``WhisperFeatureExtractor``
step by step -- truncation and padding (``padding`` "max_length" to ``chunk_length`` seconds,
"longest" or none, ``max_length``, ``pad_to_multiple_of``, ``padding_side``, ``padding_value``),
``do_normalize`` (zero mean, unit variance over the real samples), the attention mask (per
sample, then one per frame) -- and computes the log-mel features with
:func:`mmcore.ops.log_mel_spectrogram` (``preset="whisper"``). transformers computes them with
``torch.stft`` in float32 (NumPy in float64 without torch); mmcore's kernel is openai-whisper's
transform with float32 partial sums added in float64, so the features agree to a few 1e-5.

The kernel is Whisper's front end: ``sampling_rate`` 16000, ``n_fft`` 400, ``hop_length`` 160,
``feature_size`` 80 or 128, ``dither`` 0. A config asking for anything else raises
:class:`~mmcore.errors.ConfigError` naming the field.
"""

from __future__ import annotations

import copy
import math
from typing import Any, Dict, List, Optional

import numpy as np

from ..errors import ArgumentError, ConfigError, ShapeError
from ..ops import log_mel_spectrogram
from ._config import load_config
from ._output import BatchFeature, check_return_tensors, to_tensors

__all__ = ["WhisperFeatureExtractor"]

#: The kernel's fixed front end: field -> the only value it computes.
_FIXED = {"sampling_rate": 16000, "n_fft": 400, "hop_length": 160}
_PADDING = {True: "longest", False: "do_not_pad", "longest": "longest",
            "max_length": "max_length", "do_not_pad": "do_not_pad"}


def _int_field(field: str, value: Any, lo: int = 1) -> int:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)) \
            or int(value) < lo:
        raise ConfigError(f"[WhisperFeatureExtractor] {field} must be an int >= {lo}, "
                          f"got {value!r}")
    return int(value)


class WhisperFeatureExtractor:
    """transformers' ``WhisperFeatureExtractor`` on mmcore's Whisper log-mel kernel.

    Examples
    --------
    >>> import numpy as np
    >>> from mmcore.hf import WhisperFeatureExtractor
    >>> fe = WhisperFeatureExtractor()                          # openai/whisper-tiny
    >>> speech = 0.1 * np.random.default_rng(0).standard_normal(16000).astype(np.float32)
    >>> out = fe(speech, sampling_rate=16000, return_tensors="np")
    >>> out.input_features.shape                                # padded to 30 s
    (1, 80, 3000)
    >>> out = fe([speech, speech[:8000]], sampling_rate=16000, padding="longest",
    ...          return_attention_mask=True, return_tensors="np")
    >>> out.input_features.shape, out.attention_mask.sum(axis=1).tolist()
    ((2, 80, 100), [100, 50])
    """

    model_input_names = ["input_features"]
    defaults: Dict[str, Any] = {"feature_size": 80, "sampling_rate": 16000, "hop_length": 160,
                                "chunk_length": 30, "n_fft": 400, "padding_value": 0.0,
                                "dither": 0.0, "return_attention_mask": False,
                                "padding_side": "right"}

    def __init__(self, **config: Any) -> None:
        op = "WhisperFeatureExtractor"
        cfg = copy.deepcopy(self.defaults)
        cfg.update(config)
        self.config = cfg
        for field, value in _FIXED.items():
            if cfg[field] != value or isinstance(cfg[field], bool):
                raise ConfigError(f"[{op}] {field} = {cfg[field]!r} is not supported: mmcore's "
                                  f"Whisper kernel computes {field} = {value} only")
        self.feature_size = _int_field("feature_size", cfg["feature_size"])
        if self.feature_size not in (80, 128):
            raise ConfigError(f"[{op}] feature_size = {self.feature_size} is not supported: the "
                              "Whisper kernel computes 80 or 128 mel bands")
        dither = cfg["dither"]
        if not isinstance(dither, (int, float)) or dither != 0:
            raise ConfigError(f"[{op}] dither = {dither!r} is not supported (random noise); "
                              "mmcore computes dither = 0.0 only")
        pv = cfg["padding_value"]
        if isinstance(pv, bool) or not isinstance(pv, (int, float)) or not math.isfinite(pv):
            raise ConfigError(f"[{op}] padding_value must be a finite number, got {pv!r}")
        self.padding_value = float(pv)
        if cfg["padding_side"] not in ("right", "left"):
            raise ConfigError(f"[{op}] padding_side must be 'right' or 'left', "
                              f"got {cfg['padding_side']!r}")
        self.padding_side = cfg["padding_side"]
        self.sampling_rate = 16000
        self.hop_length = 160
        self.n_fft = 400
        self.chunk_length = _int_field("chunk_length", cfg["chunk_length"])
        self.n_samples = self.chunk_length * self.sampling_rate
        self.nb_max_frames = self.n_samples // self.hop_length
        self.return_attention_mask = bool(cfg["return_attention_mask"])

    @classmethod
    def from_pretrained(cls, path: Any, *, cache_dir: Any = None, revision: Optional[str] = None,
                        **overrides: Any) -> "WhisperFeatureExtractor":
        """A feature extractor from a ``preprocessor_config.json`` (a file, a folder holding it,
        or a hub id in the local Hugging Face cache; nothing is downloaded). ``mel_filters``
        stored in the file are ignored (transformers recomputes them too).

        Raises
        ------
        ConfigError
            The file is missing (naming the path) or a field asks for what the kernel cannot
            compute (naming the field).
        """
        cfg, _ = load_config(f"{cls.__name__}.from_pretrained", path, cache_dir=cache_dir,
                             revision=revision)
        cfg.update(overrides)
        known = set(cls.defaults)
        return cls(**{k: v for k, v in cfg.items() if k in known})

    def to_dict(self) -> Dict[str, Any]:
        """The merged config."""
        return copy.deepcopy(self.config)

    def __repr__(self) -> str:
        return f"WhisperFeatureExtractor({self.config!r})"

    def __call__(self, raw_speech: Any, *, truncation: bool = True,
                 pad_to_multiple_of: Optional[int] = None, return_tensors: Optional[str] = None,
                 return_attention_mask: Optional[bool] = None, padding: Any = "max_length",
                 max_length: Optional[int] = None, sampling_rate: Optional[int] = None,
                 do_normalize: Optional[bool] = None, device: Any = "cpu",
                 **kwargs: Any) -> BatchFeature:
        """``{"input_features"}`` (B, feature_size, frames) float32 [+ ``attention_mask``].

        Parameters
        ----------
        raw_speech : 1-D array / list of floats (one signal), 2-D array or list of them (a batch)
            Mono 16 kHz samples.
        truncation, pad_to_multiple_of, padding, max_length, return_attention_mask, do_normalize
            As transformers: ``padding`` "max_length" (default; ``max_length`` or
            ``chunk_length`` seconds), "longest" / True, "do_not_pad" / False.
        sampling_rate : int, optional
            Must be 16000 when given.
        return_tensors : {None, "np", "pt"}
        device
            Accepted for compatibility; the features are computed on the CPU.

        Returns
        -------
        BatchFeature
            With the keys transformers gives: ``attention_mask`` (int32) per frame when
            ``return_attention_mask`` is true, per sample when only ``do_normalize`` or the
            config asked for it (as transformers does).
        """
        op = "WhisperFeatureExtractor"
        rt = check_return_tensors(op, return_tensors)
        if sampling_rate is not None and sampling_rate != self.sampling_rate:
            raise ArgumentError(f"[{op}] sampling_rate = {sampling_rate!r}: this feature "
                                f"extractor takes {self.sampling_rate} Hz audio")
        key = getattr(padding, "value", padding)
        if isinstance(key, bool) or key in _PADDING:
            strategy = _PADDING[key]
        else:
            raise ArgumentError(f"[{op}] padding must be 'max_length', 'longest', 'do_not_pad', "
                                f"True or False, got {padding!r}")
        signals = _signals(op, raw_speech)
        ml = max_length if max_length else self.n_samples
        ml = _int_field("max_length", ml)
        if pad_to_multiple_of is not None:
            m = _int_field("pad_to_multiple_of", pad_to_multiple_of)
            ml = -(-ml // m) * m
        if truncation:
            signals = [s[:ml] for s in signals]
        lengths = [len(s) for s in signals]
        if strategy == "longest":
            L = max(lengths)
            if pad_to_multiple_of is not None:
                L = -(-L // m) * m
        elif strategy == "max_length":
            L = max(max(lengths), ml)
            if any(n > ml for n in lengths):
                raise ShapeError(f"[{op}] signals longer than max_length = {ml} with "
                                 "truncation=False cannot be padded to one length")
        else:
            if len(set(lengths)) > 1:
                raise ShapeError(f"[{op}] padding='do_not_pad' needs signals of one length, got "
                                 f"{sorted(set(lengths))}")
            L = lengths[0]
        mask_wanted = return_attention_mask or do_normalize
        if mask_wanted is None:
            mask_wanted = self.return_attention_mask
        batch = np.full((len(signals), L), self.padding_value, np.float32)
        mask = np.zeros((len(signals), L), np.int32)
        for i, s in enumerate(signals):
            at = 0 if self.padding_side == "right" else L - len(s)
            batch[i, at:at + len(s)] = s
            mask[i, at:at + len(s)] = 1
        if do_normalize:
            batch = _zero_mean_unit_var(batch, mask, self.padding_value)
        if L <= self.n_fft // 2:
            raise ShapeError(f"[{op}] the padded signals have {L} samples; Whisper's transform "
                             f"needs more than {self.n_fft // 2}")
        feats = log_mel_spectrogram(batch, n_mels=self.feature_size)
        data: Dict[str, Any] = {"input_features": feats}
        if return_attention_mask:
            frames = mask[:, :: self.hop_length]
            if L % self.hop_length:
                frames = frames[:, :-1]
            data["attention_mask"] = frames
        elif mask_wanted:
            data["attention_mask"] = mask
        return to_tensors(op, data, rt)


def _signals(op: str, raw: Any) -> List[np.ndarray]:
    """float32 1-D signals, batched as transformers decides it."""
    if isinstance(raw, np.ndarray) or type(raw).__module__.startswith("torch"):
        a = np.asarray(raw.detach().cpu().numpy() if hasattr(raw, "detach") else raw)
        if a.ndim > 2:
            raise ShapeError(f"[{op}] raw_speech has {a.ndim} dims: only mono audio, (T,) or a "
                             "batch (B, T)")
        items: List[Any] = list(a) if a.ndim == 2 else [a]
    elif isinstance(raw, (list, tuple)):
        if not raw:
            raise ShapeError(f"[{op}] raw_speech is an empty list")
        batched = isinstance(raw[0], (np.ndarray, list, tuple)) or hasattr(raw[0], "detach")
        items = list(raw) if batched else [raw]
    else:
        raise ArgumentError(f"[{op}] raw_speech must be an array or a list, "
                            f"got {type(raw).__name__}")
    out = []
    for i, x in enumerate(items):
        try:
            a = np.asarray(x.detach().cpu().numpy() if hasattr(x, "detach") else x,
                           dtype=np.float32)
        except (TypeError, ValueError) as exc:
            raise ShapeError(f"[{op}] raw_speech[{i}] is not a list of numbers: {exc}") from None
        if a.ndim != 1 or a.shape[0] == 0:
            raise ShapeError(f"[{op}] raw_speech[{i}] must be a non-empty 1-D signal, got shape "
                             f"{a.shape}")
        out.append(a)
    return out


def _zero_mean_unit_var(batch: np.ndarray, mask: np.ndarray, padding_value: float) -> np.ndarray:
    """transformers' ``zero_mean_unit_var_norm`` (float32; statistics over the first
    ``mask.sum()`` samples, the rest set to ``padding_value``)."""
    out = np.empty_like(batch)
    for i, length in enumerate(mask.sum(-1)):
        v = batch[i][:, None]                    # transformers' (T, 1) layout
        normed = (v - v[:length].mean()) / np.sqrt(v[:length].var() + 1e-7)
        if length < normed.shape[0]:
            normed[length:] = padding_value
        out[i] = normed[:, 0]
    return out
