"""The audio preprocessing config."""

from __future__ import annotations

from dataclasses import field
from typing import Any, ClassVar, Dict, Optional, Tuple

from ...errors import ConfigError
from ..checks import check_bool, check_choice, check_int, check_positive_float, fail
from .base import MODALITY_DEFAULT, PreprocessingConfig, preprocessing_dataclass

__all__ = ["AudioPreprocessingConfig", "MAX_AUDIO_ITEM_S"]

#: The longest ``chunk_length_s`` / ``max_length_s`` of an audio configuration, in seconds
#: (4 h: the default ``max_duration_s`` of :func:`mmcore.preprocess.load_audio`).
MAX_AUDIO_ITEM_S = 4 * 3600.0


@preprocessing_dataclass
class AudioPreprocessingConfig(PreprocessingConfig):
    """How audio becomes model features (``modality="audio"``).

    Audio is decoded, mixed to mono, resampled to ``sample_rate``, cut and padded per
    ``chunk_length_s`` / ``max_length_s`` / ``padding``, and turned into features by
    :class:`mmcore.preprocess.AudioPreprocessor`.

    Parameters
    ----------
    modality : "audio"
        The tag (``PreprocessingConfig()`` builds this class).
    preset : {"whisper", "fbank", None}, default "whisper"
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

    Examples
    --------
    >>> from mmcore.config import PreprocessingConfig
    >>> cfg = PreprocessingConfig()                     # Whisper: 16 kHz, 80 mels, 30 s chunks
    >>> cfg.preset, cfg.chunk_length_s, cfg.padding, cfg.target_length
    ('whisper', 30.0, 'max_length', 480000)
    >>> PreprocessingConfig(preset="fbank").padding     # no fixed chunk: pad to the longest item
    'longest'
    """

    modality: str = "audio"
    preset: Optional[str] = "whisper"
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

    MODALITY: ClassVar[str] = "audio"
    _OPTIONAL_FIELDS: ClassVar[Tuple[str, ...]] = ("preset", "chunk_length_s", "max_length_s")

    def _validate_fields(self) -> None:
        owner = self._owner()
        self._set("truncation", check_bool(owner, "truncation", self.truncation))
        self._set("mono", check_bool(owner, "mono", self.mono))
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
        pad: Any = self.padding
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

    # -- derived values --------------------------------------------------------------------
    @property
    def target_length(self) -> Optional[int]:
        """Samples every item is padded/cut to with ``padding="max_length"``, else None."""
        if self.padding != "max_length":
            return None
        secs = self.chunk_length_s if self.chunk_length_s is not None else self.max_length_s
        if secs is None:  # pragma: no cover - validate() refuses max_length without a length
            return None
        return int(round(secs * self.sample_rate))

    @property
    def max_samples(self) -> Optional[int]:
        """``max_length_s`` in samples (None: no limit)."""
        if self.max_length_s is None:
            return None
        return int(round(self.max_length_s * self.sample_rate))
