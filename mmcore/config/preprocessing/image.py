"""The image and video preprocessing configs (video: the image fields plus frame sampling)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar, Dict, Optional, Tuple

from ..checks import check_channels, check_choice, check_int, check_positive_float, check_size, fail
from .base import MODALITY_DEFAULT, PreprocessingConfig, preprocessing_dataclass

__all__ = ["ImagePreprocessingConfig", "VideoPreprocessingConfig"]

_PIXEL_OPTIONAL = ("preset", "crop_size", "resize_mode", "filter", "mean", "std", "patch_size")


@dataclass(frozen=True)
class _PixelFields(PreprocessingConfig):
    """The fields image and video share (not a modality of its own)."""

    preset: Optional[str] = "clip"
    size: Any = 224
    crop_size: Any = None
    resize_mode: Optional[str] = None
    filter: Optional[str] = None
    mean: Optional[Tuple[float, ...]] = None
    std: Optional[Tuple[float, ...]] = None
    patch_size: Optional[int] = None

    def _validate_pixels(self) -> None:
        owner = self._owner()
        self._set("preset", check_choice(owner, "preset", self.preset, self.IMAGE_PRESETS))
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


@preprocessing_dataclass
class ImagePreprocessingConfig(_PixelFields):
    """How images become ``pixel_values`` (``modality="image"``).

    Images are decoded with :func:`mmcore.preprocess.load_image` and turned into
    ``pixel_values`` by :class:`mmcore.preprocess.ImagePreprocessor` (one call of
    ``mmcore.ops.preprocess_image`` with ``preset``, ``size``, ``crop_size``, ``resize_mode``,
    ``filter``, ``mean``, ``std``, ``patch_size``). None means the preset's choice.

    Parameters
    ----------
    modality : "image"
        The tag (``PreprocessingConfig(modality="image")`` builds this class).
    preset : {"clip", "siglip", "imagenet", None}, default "clip"
        The preset of ``mmcore.ops.preprocess_image`` (it sets the resize mode, filter, mean
        and std that are left None here).
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
    extra : dict, default {}
        Free-form options (string keys, JSON-friendly values), kept and round-tripped as is.

    Examples
    --------
    >>> from mmcore.config import PreprocessingConfig
    >>> img = PreprocessingConfig(modality="image", preset="siglip", size=384)
    >>> img.to_dict()["size"], "sample_rate" in img.to_dict()
    (384, False)
    """

    modality: str = "image"
    extra: Dict[str, Any] = field(default_factory=dict)

    MODALITY: ClassVar[str] = "image"
    _OPTIONAL_FIELDS: ClassVar[Tuple[str, ...]] = _PIXEL_OPTIONAL

    def _validate_fields(self) -> None:
        self._validate_pixels()


@preprocessing_dataclass
class VideoPreprocessingConfig(_PixelFields):
    """How videos become sampled, preprocessed frames (``modality="video"``).

    The image fields of :class:`ImagePreprocessingConfig` (each frame is preprocessed as an
    image), plus frame sampling (see :func:`mmcore.preprocess.sample_frame_indices`), by
    :class:`mmcore.preprocess.VideoPreprocessor`.

    Parameters
    ----------
    modality : "video"
        The tag (``PreprocessingConfig(modality="video")`` builds this class).
    preset, size, crop_size, resize_mode, filter, mean, std, patch_size
        As for :class:`ImagePreprocessingConfig`.
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
    extra : dict, default {}
        Free-form options (string keys, JSON-friendly values), kept and round-tripped as is.

    Examples
    --------
    >>> from mmcore.config import PreprocessingConfig
    >>> vid = PreprocessingConfig(modality="video", fps=2.0)
    >>> vid.sampling, vid.num_frames, vid.min_frames, vid.temporal_patch
    ('fps', None, 4, 2)
    """

    modality: str = "video"
    num_frames: Optional[int] = MODALITY_DEFAULT
    fps: Optional[float] = None
    sampling: Optional[str] = MODALITY_DEFAULT
    min_frames: int = 4
    max_frames: int = 768
    temporal_patch: int = 2
    extra: Dict[str, Any] = field(default_factory=dict)

    MODALITY: ClassVar[str] = "video"
    _OPTIONAL_FIELDS: ClassVar[Tuple[str, ...]] = _PIXEL_OPTIONAL + ("num_frames", "fps")

    def _validate_fields(self) -> None:
        owner = self._owner()
        self._validate_pixels()
        self._set("fps", check_positive_float(owner, "fps", self.fps, optional=True))
        if self.num_frames is MODALITY_DEFAULT:
            self._set("num_frames", 8 if self.fps is None else None)
        if self.num_frames is not None:
            self._set("num_frames", check_int(owner, "num_frames", self.num_frames))
        sampling = self.sampling
        if sampling is MODALITY_DEFAULT or sampling is None:
            sampling = "fps" if self.fps is not None else "uniform"
        self._set("sampling", check_choice(owner, "sampling", sampling, self.VIDEO_SAMPLING))
        for name in ("min_frames", "max_frames", "temporal_patch"):
            value = getattr(self, name)
            if value is MODALITY_DEFAULT:  # the sentinel passed on: the default
                value = type(self).__dataclass_fields__[name].default
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
