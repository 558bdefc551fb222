"""Public kernels. Each op validates its arguments, picks a backend and calls it."""

from .attention import attention
from .audio import fbank, log_mel_spectrogram, mel_filterbank, mel_spectrogram, stft
from .encoder_layer import encoder_layer
from .fusion import fuse, masked_max, masked_mean
from .image import normalize, patchify, preprocess_image, resize
from .linear import PackedWeight, layer_norm, linear, pack_weight
from .video import sample_frame_indices, temporal_windows

__all__ = ["attention", "stft", "mel_filterbank", "mel_spectrogram", "log_mel_spectrogram",
           "fbank", "resize", "normalize", "patchify", "preprocess_image", "sample_frame_indices",
           "temporal_windows", "masked_mean", "masked_max", "fuse", "linear", "layer_norm",
           "encoder_layer", "PackedWeight", "pack_weight"]
