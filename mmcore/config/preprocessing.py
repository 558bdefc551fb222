"""Preprocessing configs: how the raw inputs of one modality become model features."""

from __future__ import annotations

import copy
import json
import os
from dataclasses import dataclass, field
from typing import Any, ClassVar, Dict, Mapping, Optional, Tuple

from ..errors import ConfigError
from .base import ConfigBase
from .checks import (
    check_bool,
    check_channels,
    check_choice,
    check_int,
    check_positive_float,
    check_size,
    fail,
)

__all__ = ["PreprocessingConfig", "MAX_AUDIO_ITEM_S", "MODALITY_DEFAULT"]

#: The longest ``chunk_length_s`` / ``max_length_s`` of an audio configuration, in seconds
#: (4 h: the default ``max_duration_s`` of :func:`mmcore.preprocess.load_audio`).
MAX_AUDIO_ITEM_S = 4 * 3600.0


class _ModalityDefault:
    """Sentinel default: the value is filled in from the modality (and preset) on construction."""

    _instance = None

    def __new__(cls):
        if cls._instance is None:
            cls._instance = super().__new__(cls)
        return cls._instance

    def __repr__(self) -> str:
        return "<modality default>"

    def __reduce__(self):
        return (_ModalityDefault, ())


MODALITY_DEFAULT: Any = _ModalityDefault()



@dataclass(frozen=True)
class PreprocessingConfig(ConfigBase):
    """How raw inputs of one modality become model features.

    One config describes one modality (``modality``): ``"audio"``, ``"image"``, ``"video"`` or
    ``"text"``. Each modality reads its own group of fields below; the fields of the other groups
    take their neutral value (None; ``padding`` is ``"none"`` for image and video) and must not
    be set, which catches a field given to the wrong modality (``ConfigError`` naming it). The
    plain audio numbers (``sample_rate``, ``n_mels``, ``n_fft``, ``hop_length``) and ``mono``
    keep their defaults everywhere and are ignored outside audio.

    * audio: decoded, mixed to mono, resampled to ``sample_rate``, cut and padded per
      ``chunk_length_s`` / ``max_length_s`` / ``padding``, and turned into features by
      :class:`mmcore.preprocess.AudioPreprocessor`.
    * image: decoded with :func:`mmcore.preprocess.load_image` and turned into
      ``pixel_values`` by :class:`mmcore.preprocess.ImagePreprocessor` (one call of
      ``mmcore.ops.preprocess_image`` with ``preset``, ``size``, ``crop_size``,
      ``resize_mode``, ``filter``, ``mean``, ``std``, ``patch_size``).
    * video: the image fields, plus frame sampling (``num_frames``, ``fps``, ``sampling``,
      ``min_frames``, ``max_frames``, ``temporal_patch``) by
      :class:`mmcore.preprocess.VideoPreprocessor`.
    * text: ``tokenizer``, ``max_length``, ``padding``, ``truncation``, ``padding_side``,
      ``add_eos`` for :class:`mmcore.preprocess.TextPreprocessor`.

    Parameters
    ----------
    modality : {"audio", "image", "video", "text"}, default "audio"
        The input modality (a :class:`str` or any object whose ``str()`` is the name).
    preset : str or None, default: "whisper" (audio), "clip" (image, video), None (text)
        Audio: one of "whisper", "fbank", None (below). Image and video: "clip", "siglip",
        "imagenet" or None, the preset of ``mmcore.ops.preprocess_image`` (it sets the resize
        mode, filter, mean and std that are left None here). Text: must stay None.

        Audio presets:
        ``"whisper"``: openai-whisper's log-mel (``mmcore.ops.log_mel_spectrogram``; requires
        ``sample_rate=16000``, ``n_fft=400``, ``hop_length=160`` and ``n_mels`` 80 or 128).
        ``"fbank"``: Kaldi filter-bank features (``mmcore.ops.fbank``), with ``n_fft`` and
        ``hop_length`` as Kaldi's frame length and shift in samples (400 and 160 are Kaldi's
        25 ms and 10 ms at 16 kHz; the FFT size is the next power of two of the frame length).
        None: natural log of ``mmcore.ops.mel_spectrogram`` (power 2, floored at 1e-10) with
        the given ``n_fft`` and ``hop_length``.
    sample_rate : int, default 16000
        Rate audio is resampled to, in Hz.
    n_mels : int, default 80
        Mel bands.
    n_fft : int, default 400
        FFT / window size in samples (fbank: frame length).
    hop_length : int, default 160
        Samples between frames (fbank: frame shift).
    chunk_length_s : float or None, default: 30.0 for "whisper", None otherwise
        Length every item is padded or cut to when ``padding="max_length"``. Ignored by the
        other padding modes. At most :data:`MAX_AUDIO_ITEM_S` (4 h), as ``max_length_s``.
    padding : {"max_length", "longest", "none"}, default: "max_length" for "whisper", else "longest"
        ``"max_length"``: every item is zero-padded (or cut) to ``chunk_length_s``, or to
        ``max_length_s`` when ``chunk_length_s`` is None; one of them must be set.
        ``"longest"``: items are zero-padded at the end to the longest item of the batch.
        ``"none"``: no padding; a batch must then hold items of equal length. ``True`` and
        ``False`` are accepted as ``"longest"`` and ``"none"``.
    max_length_s : float or None, default None
        Longest accepted item, in seconds. Longer items are cut to it when ``truncation`` is
        True and raise otherwise.
    truncation : bool, default True
        Whether audio may be cut at all (by ``max_length_s`` or ``chunk_length_s``). When False,
        an item that would have to be cut raises :class:`~mmcore.errors.ShapeError`.
    mono : bool, default True
        Average the channels of decoded files. Features are computed per 1-D waveform, so
        multi-channel items must be mixed down (or split) before preprocessing.
    extra : dict, default {}
        Free-form options (string keys, JSON-friendly values), kept and round-tripped as is.

    Image and video fields (None = the preset's choice, made by ``mmcore.ops.preprocess_image``):

    size : int or (int, int), default 224
        Output resolution: an int is the shortest edge (or both edges with
        ``resize_mode="squash"``) and the square crop; a pair ``(height, width)`` resizes to
        exactly that size (it needs ``resize_mode`` "squash" or None). A pair is stored as a
        tuple.
    crop_size : int, (int, int) or None, default None
        Center crop after the resize; None: the preset's (for CLIP, ``size``).
    resize_mode : str or None, default None
        One of :attr:`RESIZE_MODES`.
    filter : str or None, default None
        Resampling filter, one of :attr:`IMAGE_FILTERS`.
    mean, std : three floats or None, default None
        Per-channel normalization, applied after rescaling to [0, 1]; ``std`` must be > 0.
    patch_size : int or None, default None
        When set, ``pixel_values`` are patchified (``mmcore.ops.patchify``) into flattened
        ``patch_size x patch_size`` patches; the crop must be divisible by it (checked here
        when ``crop_size`` is given, else by the op).

    Video fields (see :func:`mmcore.preprocess.sample_frame_indices`):

    num_frames : int or None, default: 8 when ``fps`` is None, else None
        Frames sampled by the "uniform" strategy.
    fps : float or None, default None
        Target frame rate of the "fps" strategy.
    sampling : {"uniform", "fps"}, default: "fps" when ``fps`` is set, else "uniform"
    min_frames, max_frames : int, default 4 and 768
        Limits of the "fps" strategy (Qwen2-VL's defaults).
    temporal_patch : int, default 2
        Frames per temporal patch: the "fps" strategy rounds its frame count to a multiple of
        it, and with ``patch_size`` set the frames are patchified in groups of it (the last
        frame repeated when the count is not a multiple).

    Text fields (see :class:`mmcore.preprocess.TextPreprocessor`):

    tokenizer : str, default "byte"
        ``"byte"`` (:class:`mmcore.preprocess.ByteTokenizer`) or the path of a
        ``tokenizer.json`` (or of the directory that holds one) for
        :class:`mmcore.preprocess.HFTokenizer`.
    max_length : int or None, default None
        Longest sequence in tokens (None: no limit, only with ``padding="longest"``).
    padding : {"longest", "max_length"}, default "longest"
        ``"max_length"`` needs ``max_length``. ``True`` is accepted as ``"longest"``.
    truncation : bool, default True
        Cut sequences longer than ``max_length`` (False: they raise).
    padding_side : {"right", "left"}, default "right"
    add_eos : bool or None, default None
        Append the end-of-sequence id; None: the tokenizer's convention (True for
        ``ByteTokenizer``, as ByT5 does; False for ``HFTokenizer``, whose post-processor adds
        the model's special tokens).

    Raises
    ------
    ConfigError
        On construction, naming the first invalid field.

    Examples
    --------
    >>> from mmcore.config import PreprocessingConfig
    >>> cfg = PreprocessingConfig(preset=None, n_mels=128, padding="longest")
    >>> cfg.chunk_length_s is None
    True
    >>> PreprocessingConfig(n_mels=0)
    Traceback (most recent call last):
    ...
    mmcore.errors.ConfigError: PreprocessingConfig.n_mels must be an integer >= 1, got 0
    >>> img = PreprocessingConfig(modality="image", preset="siglip", size=384)
    >>> img.size, img.padding, img.chunk_length_s is None
    (384, 'none', True)
    >>> vid = PreprocessingConfig(modality="video", fps=2.0)
    >>> vid.sampling, vid.num_frames, vid.temporal_patch
    ('fps', None, 2)
    >>> PreprocessingConfig(modality="text", max_length=128, padding="max_length").tokenizer
    'byte'
    >>> PreprocessingConfig(modality="text", size=224)
    Traceback (most recent call last):
    ...
    mmcore.errors.ConfigError: PreprocessingConfig.size applies to modality 'image' | 'video' only (this config is 'text'), got 224
    """  # noqa: E501

    modality: str = "audio"
    preset: Optional[str] = MODALITY_DEFAULT
    sample_rate: int = 16000
    n_mels: int = 80
    n_fft: int = 400
    hop_length: int = 160
    chunk_length_s: Optional[float] = MODALITY_DEFAULT
    padding: str = MODALITY_DEFAULT
    max_length_s: Optional[float] = None
    truncation: bool = True
    mono: bool = True
    extra: Dict[str, Any] = field(default_factory=dict)
    # image and video
    size: Any = MODALITY_DEFAULT
    crop_size: Any = None
    resize_mode: Optional[str] = None
    filter: Optional[str] = None
    mean: Optional[Tuple[float, ...]] = None
    std: Optional[Tuple[float, ...]] = None
    patch_size: Optional[int] = None
    # video
    num_frames: Optional[int] = MODALITY_DEFAULT
    fps: Optional[float] = None
    sampling: Optional[str] = MODALITY_DEFAULT
    min_frames: Optional[int] = MODALITY_DEFAULT
    max_frames: Optional[int] = MODALITY_DEFAULT
    temporal_patch: Optional[int] = MODALITY_DEFAULT
    # text
    tokenizer: Optional[str] = MODALITY_DEFAULT
    max_length: Optional[int] = None
    padding_side: Optional[str] = MODALITY_DEFAULT
    add_eos: Optional[bool] = None

    # modality name -> method validating that modality's fields
    MODALITY_VALIDATORS: ClassVar[Dict[str, str]] = {
        "audio": "_validate_audio", "image": "_validate_image", "video": "_validate_video",
        "text": "_validate_text"}
    # the fields that belong to some modalities only -> those modalities; every other modality
    # sees them at their neutral value (see _NEUTRAL)
    MODALITY_FIELDS: ClassVar[Dict[str, Tuple[str, ...]]] = {
        "preset": ("audio", "image", "video"),
        "chunk_length_s": ("audio",),
        "max_length_s": ("audio",),
        "padding": ("audio", "text"),
        "size": ("image", "video"),
        "crop_size": ("image", "video"),
        "resize_mode": ("image", "video"),
        "filter": ("image", "video"),
        "mean": ("image", "video"),
        "std": ("image", "video"),
        "patch_size": ("image", "video"),
        "num_frames": ("video",),
        "fps": ("video",),
        "sampling": ("video",),
        "min_frames": ("video",),
        "max_frames": ("video",),
        "temporal_patch": ("video",),
        "tokenizer": ("text",),
        "max_length": ("text",),
        "padding_side": ("text",),
        "add_eos": ("text",),
    }
    _NEUTRAL: ClassVar[Dict[str, Any]] = {"padding": "none"}
    AUDIO_PRESETS: ClassVar[Tuple[Optional[str], ...]] = ("whisper", "fbank", None)
    IMAGE_PRESETS: ClassVar[Tuple[Optional[str], ...]] = ("clip", "siglip", "imagenet", None)
    RESIZE_MODES: ClassVar[Tuple[str, ...]] = ("shortest_edge", "squash")
    IMAGE_FILTERS: ClassVar[Tuple[str, ...]] = ("nearest", "bilinear", "bicubic", "lanczos")
    VIDEO_SAMPLING: ClassVar[Tuple[str, ...]] = ("uniform", "fps")
    PADDING_MODES: ClassVar[Tuple[str, ...]] = ("max_length", "longest", "none")
    TEXT_PADDING_MODES: ClassVar[Tuple[str, ...]] = ("longest", "max_length")
    PADDING_SIDES: ClassVar[Tuple[str, ...]] = ("right", "left")
    _OPTIONAL_FIELDS: ClassVar[Tuple[str, ...]] = (
        "preset", "chunk_length_s", "max_length_s", "crop_size", "resize_mode", "filter", "mean",
        "std", "patch_size", "num_frames", "fps", "max_length", "add_eos")

    def __hash__(self) -> int:
        # equal configs hash equal (usable as cache keys) despite the ``extra`` dict
        return hash((type(self).__name__, json.dumps(self.to_dict(), sort_keys=True, default=repr)))

    # -- validation ----------------------------------------------------------------------------
    def validate(self) -> None:
        owner = self._owner()
        mod = self.modality
        if not isinstance(mod, str) and mod is not None and not isinstance(mod, bool):
            mod = str(mod)  # e.g. a Modality object, whose str() is its name
        if not isinstance(mod, str) or mod.lower() not in self.MODALITY_VALIDATORS:
            known = " | ".join(repr(m) for m in self.MODALITY_VALIDATORS)
            raise fail(owner, "modality", f"must be one of {known}", self.modality)
        self._set("modality", mod.lower())

        if not isinstance(self.extra, Mapping):
            raise fail(owner, "extra", "must be a dict", self.extra)
        bad_keys = [k for k in self.extra if not isinstance(k, str)]
        if bad_keys:
            raise fail(owner, "extra", "must have string keys", bad_keys[0])
        self._set("extra", copy.deepcopy(dict(self.extra)))
        self._set("truncation", check_bool(owner, "truncation", self.truncation))
        self._set("mono", check_bool(owner, "mono", self.mono))

        # fields of other modalities: neutral value, or an error naming the field
        for name, users in self.MODALITY_FIELDS.items():
            if self.modality in users:
                continue
            neutral = self._NEUTRAL.get(name)
            value = getattr(self, name)
            if (value is MODALITY_DEFAULT or value is None
                    or (isinstance(value, str) and value == neutral)):
                self._set(name, neutral)
            else:
                shown = " | ".join(repr(m) for m in users)
                raise fail(owner, name, f"applies to modality {shown} only (this config is "
                            f"{self.modality!r})", value)

        getattr(self, self.MODALITY_VALIDATORS[self.modality])()

    def _validate_audio(self) -> None:
        owner = self._owner()
        if self.preset is MODALITY_DEFAULT:
            self._set("preset", "whisper")
        self._set("preset", check_choice(owner, "preset", self.preset, self.AUDIO_PRESETS))
        for name in ("sample_rate", "n_mels", "n_fft", "hop_length"):
            self._set(name, check_int(owner, name, getattr(self, name)))
        whisper = self.preset == "whisper"

        if self.chunk_length_s is MODALITY_DEFAULT:
            self._set("chunk_length_s", 30.0 if whisper else None)
        self._set("chunk_length_s",
                  check_positive_float(owner, "chunk_length_s", self.chunk_length_s, optional=True))
        self._set("max_length_s",
                  check_positive_float(owner, "max_length_s", self.max_length_s, optional=True))
        for name in ("chunk_length_s", "max_length_s"):
            v = getattr(self, name)
            if v is not None and v > MAX_AUDIO_ITEM_S:
                # every item may be padded to it: a config (or a model directory's) must not
                # make each clip take gigabytes
                raise ConfigError(f"[{owner}] {name} = {v} s is longer than {MAX_AUDIO_ITEM_S:g} s"
                                  " (4 h, the longest audio load_audio decodes by default)")
        pad = self.padding
        if pad is MODALITY_DEFAULT:
            pad = "max_length" if whisper else "longest"
        elif pad is True or pad is False:
            pad = "longest" if pad else "none"
        elif pad is None:
            pad = "none"
        self._set("padding", check_choice(owner, "padding", pad, self.PADDING_MODES))

        sr = self.sample_rate
        for name in ("chunk_length_s", "max_length_s"):
            secs = getattr(self, name)
            if secs is not None and round(secs * sr) < 1:
                raise fail(owner, name, f"must span at least one sample at sample_rate={sr}", secs)
        if (self.padding == "max_length" and self.chunk_length_s is None
                and self.max_length_s is None):
            raise fail(owner, "padding", "'max_length' needs chunk_length_s or max_length_s "
                        "to pad to (use 'longest' to pad to the longest item)", self.padding)

        if whisper:
            # openai-whisper's constants: SAMPLE_RATE, N_FFT, HOP_LENGTH, and its two mel sizes
            for name, want in (("sample_rate", 16000), ("n_fft", 400), ("hop_length", 160)):
                if getattr(self, name) != want:
                    raise fail(owner, name, f"must be {want} with preset='whisper'",
                                getattr(self, name))
            if self.n_mels not in (80, 128):
                raise fail(owner, "n_mels", "must be 80 or 128 with preset='whisper'",
                            self.n_mels)

    def _validate_image(self) -> None:
        owner = self._owner()
        if self.preset is MODALITY_DEFAULT:
            self._set("preset", "clip")
        self._set("preset", check_choice(owner, "preset", self.preset, self.IMAGE_PRESETS))
        if self.size is MODALITY_DEFAULT:
            self._set("size", 224)
        self._set("size", check_size(owner, "size", self.size, optional=False))
        self._set("crop_size", check_size(owner, "crop_size", self.crop_size, optional=True))
        self._set("resize_mode", check_choice(owner, "resize_mode", self.resize_mode,
                                              self.RESIZE_MODES + (None,)))
        self._set("filter", check_choice(owner, "filter", self.filter,
                                         self.IMAGE_FILTERS + (None,)))
        if isinstance(self.size, tuple) and self.resize_mode == "shortest_edge":
            raise fail(owner, "resize_mode", "must be 'squash' (or None) when size is a "
                        f"(height, width) pair {self.size}", self.resize_mode)
        self._set("mean", check_channels(owner, "mean", self.mean, positive=False))
        self._set("std", check_channels(owner, "std", self.std, positive=True))
        if self.patch_size is not None:
            self._set("patch_size", check_int(owner, "patch_size", self.patch_size))
            crop = self.crop_size  # None: the preset decides; preprocess_image checks it
            for edge in (crop if isinstance(crop, tuple) else (crop,) if crop else ()):
                if edge % self.patch_size:
                    raise fail(owner, "patch_size", f"must divide the crop size {crop}",
                                self.patch_size)

    def _validate_video(self) -> None:
        owner = self._owner()
        self._validate_image()
        self._set("fps", check_positive_float(owner, "fps", self.fps, optional=True))
        if self.num_frames is MODALITY_DEFAULT:
            self._set("num_frames", 8 if self.fps is None else None)
        if self.num_frames is not None:
            self._set("num_frames", check_int(owner, "num_frames", self.num_frames))
        sampling = self.sampling
        if sampling is MODALITY_DEFAULT or sampling is None:
            sampling = "fps" if self.fps is not None else "uniform"
        self._set("sampling", check_choice(owner, "sampling", sampling, self.VIDEO_SAMPLING))
        for name, default in (("min_frames", 4), ("max_frames", 768), ("temporal_patch", 2)):
            value = getattr(self, name)
            if value is MODALITY_DEFAULT:
                value = default
            self._set(name, check_int(owner, name, value))
        if self.max_frames < self.min_frames:
            raise fail(owner, "max_frames", f"must be >= min_frames={self.min_frames}",
                        self.max_frames)
        if self.sampling == "uniform":
            if self.num_frames is None:
                raise fail(owner, "num_frames", "must be set for sampling='uniform'",
                            self.num_frames)
            if self.fps is not None:
                raise fail(owner, "fps", "is used by sampling='fps' only; with "
                            "sampling='uniform' set num_frames", self.fps)
        else:
            if self.fps is None:
                raise fail(owner, "fps", "must be set for sampling='fps'", self.fps)
            if self.num_frames is not None:
                raise fail(owner, "num_frames", "is used by sampling='uniform' only; with "
                            "sampling='fps' the count follows from fps", self.num_frames)

    def _validate_text(self) -> None:
        owner = self._owner()
        tok = self.tokenizer
        if tok is MODALITY_DEFAULT or tok is None:
            tok = "byte"
        if isinstance(tok, os.PathLike):
            tok = os.fspath(tok)
        if not isinstance(tok, str) or not tok:
            raise fail(owner, "tokenizer", "must be 'byte' or the path of a tokenizer.json",
                        self.tokenizer)
        self._set("tokenizer", "byte" if tok.lower() == "byte" else tok)
        if self.max_length is not None:
            self._set("max_length", check_int(owner, "max_length", self.max_length))
        pad = self.padding
        if pad is MODALITY_DEFAULT or pad is True:
            pad = "longest"
        self._set("padding", check_choice(owner, "padding", pad, self.TEXT_PADDING_MODES))
        if self.padding == "max_length" and self.max_length is None:
            raise fail(owner, "padding", "'max_length' needs max_length to pad to",
                        self.padding)
        side = self.padding_side
        if side is MODALITY_DEFAULT or side is None:
            side = "right"
        self._set("padding_side", check_choice(owner, "padding_side", side, self.PADDING_SIDES))
        if self.add_eos is not None:
            self._set("add_eos", check_bool(owner, "add_eos", self.add_eos))

    # -- derived values -------------------------------------------------------------------------
    @property
    def target_length(self) -> Optional[int]:
        """Samples every item is padded/cut to with ``padding="max_length"``, else None."""
        if self.padding != "max_length":
            return None
        secs = self.chunk_length_s if self.chunk_length_s is not None else self.max_length_s
        return int(round(secs * self.sample_rate))

    @property
    def max_samples(self) -> Optional[int]:
        """``max_length_s`` in samples (None: no limit)."""
        if self.max_length_s is None:
            return None
        return int(round(self.max_length_s * self.sample_rate))
