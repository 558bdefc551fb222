"""Public kernels. Each op validates its arguments, picks a backend and calls it.

Every op takes torch tensors too (CPU tensors as NumPy views of their memory, CUDA tensors
through DLPack into the CUDA backend) and then returns torch tensors sharing the result's
memory; see :mod:`mmcore.ops._torch`.
"""

from ._torch import torch_io
from .attention import attention
from .audio import fbank, log_mel_spectrogram, mel_filterbank, mel_spectrogram, stft
from .encoder_layer import encoder_layer
from .fusion import fuse, masked_max, masked_mean
from .image import normalize, patchify, preprocess_image, resize
from .linear import PackedWeight, layer_norm, linear, pack_weight
from .video import sample_frame_indices, temporal_windows

# torch in, torch out (see ops/_torch.py): a no-op unless torch is imported
attention = torch_io(attention)
stft = torch_io(stft)
log_mel_spectrogram = torch_io(log_mel_spectrogram)
mel_spectrogram = torch_io(mel_spectrogram)
fbank = torch_io(fbank)
resize = torch_io(resize)
normalize = torch_io(normalize)
patchify = torch_io(patchify)
preprocess_image = torch_io(preprocess_image)
masked_mean = torch_io(masked_mean)
masked_max = torch_io(masked_max)
fuse = torch_io(fuse)
linear = torch_io(linear)
layer_norm = torch_io(layer_norm)
encoder_layer = torch_io(encoder_layer)
pack_weight = torch_io(pack_weight)
del torch_io

__all__ = ["attention", "stft", "mel_filterbank", "mel_spectrogram", "log_mel_spectrogram",
           "fbank", "resize", "normalize", "patchify", "preprocess_image", "sample_frame_indices",
           "temporal_windows", "masked_mean", "masked_max", "fuse", "linear", "layer_norm",
           "encoder_layer", "PackedWeight", "pack_weight"]
