"""Short-time spectral features of audio (``mmcore.ops.stft`` and friends).

Every op here is one call of the same framing + FFT + (mel) + (log) kernel; the Python layer
checks the arguments once, lays the signal out as float32 ``(N, T)`` (the leading batch
dimensions flattened) and picks the backend:

* :func:`stft` -- complex STFT, ``torch.stft`` / ``librosa.stft`` conventions.
* :func:`mel_filterbank` -- triangular mel filters, equal to ``librosa.filters.mel``.
* :func:`mel_spectrogram` -- ``mel_filterbank @ |stft|**power``.
* :func:`log_mel_spectrogram` -- the ``preset="whisper"`` features of openai-whisper.
* :func:`fbank` -- Kaldi's log mel filterbank features (``torchaudio.compliance.kaldi.fbank``).

Input conventions shared by all of them: ``x`` is ``(..., T)`` with any number of leading batch
dimensions (each row is an independent signal; a batch gives exactly the result of calling the
op item by item), float32, float64 or float16 (computed in float32) or int16 (scaled by
``1/32768`` to ``[-1, 1)``, except by :func:`fbank`, which takes samples as given, like Kaldi).
Samples must be finite: NaN or Inf raises :class:`~mmcore.errors.ShapeError` instead of
spreading through every frame it touches. Scalar options of the wrong type or out of range raise
:class:`~mmcore.errors.ArgumentError` naming the option: ints must be ints (NumPy integers
included, ``bool`` refused) within the int64 range of the kernels (``n_fft`` and Kaldi frames at
most ``2**20`` samples), floats must be finite in float32 (``power=1e-300`` would round to 0,
``sr=1e300`` overflows). Host arrays run on the ``native`` (default) or
``numba`` backend; CuPy / CUDA arrays run on ``cuda`` and give CuPy results on the same device
(the small window and filter tables are copied to the device for the call; the finiteness
check of a device signal reads one flag back and so waits for the current stream).
"""

from __future__ import annotations

import functools
import math
from typing import Any, Callable, Literal, NamedTuple, Optional, TypeVar, Union, cast

import numpy as np

from .. import _backend
from ..errors import ArgumentError, BackendError, ShapeError
from ..kernels import PlanCache, launcher
from ..kernels import cpu as _cpu
from ..kernels.cuda.common import cupy_module
from ._audio_filters import (
    KALDI_WINDOWS,
    STFT_WINDOWS,
    SparseMel,
    kaldi_mel_filters,
    kaldi_mel_filters_sparse,
    kaldi_window,
    mel_filters,
    mel_filters_sparse,
    window_function,
)
from ._checks import (
    INT64_MAX,
    as_host_array,
    check_bool,
    check_choice,
    check_int,
    finite_float,
    optional_seed,
)
from ._types import Array, Backend

__all__ = ["stft", "mel_filterbank", "mel_spectrogram", "log_mel_spectrogram", "fbank"]

# Whisper's front end (openai-whisper audio.py): 16 kHz, 25 ms Hann window, 10 ms hop.
WHISPER_SAMPLE_RATE = 16000
WHISPER_N_FFT = 400
WHISPER_HOP_LENGTH = 160
WHISPER_N_MELS = (80, 128)

# Kaldi's log floor: float32 machine epsilon.
KALDI_LOG_FLOOR = float(np.finfo(np.float32).eps)

_INT16_SCALE = np.float32(1.0 / 32768.0)
_FLOAT32 = np.dtype(np.float32)
_FLOAT64 = np.dtype(np.float64)
_INT16 = np.dtype(np.int16)


# ----------------------------------------------------------------------------------------------
# argument checks


#: The largest FFT size (and Kaldi frame length) the ops accept: 2**20 samples, over a minute
#: at 16 kHz. Larger sizes would only allocate huge windows, filterbanks and spectra (the mel
#: filters alone are n_mels x (n_fft / 2 + 1) float64 values while they are built).
MAX_N_FFT = 1 << 20
#: The most zero samples :func:`log_mel_spectrogram` appends (``padding``): 2**26.
MAX_PADDING = 1 << 26


def _sample_rate(op: str, sr) -> float:
    return finite_float(op, "sr", sr, positive=True)


def _power(op: str, power) -> float:
    return finite_float(op, "power", power, positive=True)


def _mel_args(op, sr, n_fft, n_mels, fmin, fmax, htk, norm):
    """Validated ``(sr, n_fft, n_mels, fmin, fmax, htk, norm)`` of a librosa-style filterbank."""
    sr = _sample_rate(op, sr)
    n_fft = check_int("n_fft", n_fft, op=op, lo=2, hi=MAX_N_FFT)
    n_mels = check_int("n_mels", n_mels, op=op, lo=1)
    n_bins = n_fft // 2 + 1
    if n_mels > n_bins:
        raise ArgumentError(f"[{op}] n_mels = {n_mels} is larger than the number of frequency bins "
                            f"n_fft//2 + 1 = {n_bins}")
    fmin = finite_float(op, "fmin", fmin)
    if fmin < 0:
        raise ArgumentError(f"[{op}] fmin must be >= 0, got {fmin}")
    nyquist = sr / 2.0
    fmax = nyquist if fmax is None else finite_float(op, "fmax", fmax)
    if fmax > nyquist:
        raise ArgumentError(f"[{op}] fmax = {fmax} is above the Nyquist frequency sr/2 = {nyquist}")
    if fmax <= fmin:
        raise ArgumentError(f"[{op}] fmax = {fmax} must be greater than fmin = {fmin}")
    htk = check_bool("htk", htk, op=op)
    if norm is not None and norm != "slaney":
        raise ArgumentError(f"[{op}] norm must be 'slaney' or None, got {norm!r}")
    return sr, n_fft, n_mels, fmin, fmax, htk, norm


class _Signal(NamedTuple):
    x: Any                   # float32 C-contiguous (N, T), NumPy or CuPy
    batch: tuple[int, ...]   # leading batch shape
    T: int
    xp: Any                  # numpy or cupy




def _device_array(op: str, x):
    """A CUDA array ``x`` as a CuPy array, without copying."""
    cp = cupy_module(op)
    if isinstance(x, cp.ndarray):
        return x
    try:
        if hasattr(x, "__cuda_array_interface__"):
            return cp.asarray(x)
        return cp.from_dlpack(x)
    except Exception as exc:
        raise ShapeError(f"[{op}] x cannot be read as a CUDA array: {exc}") from None


_Op = TypeVar("_Op", bound=Callable[..., Any])

#: The windows of :func:`stft` and friends, by name (an array of samples is also accepted).
StftWindow = Literal["hann", "hamming", "blackman", "povey", "rectangular", "ones"]
#: Kaldi's windows (:func:`fbank`).
KaldiWindow = Literal["povey", "hann", "hanning", "hamming", "blackman", "rectangular",
                      "ones"]


def _on_device_of_x(fn: _Op) -> _Op:
    """Run the op with the device of a CUDA ``x`` current, so that every array it allocates
    (outputs, casts, padding) lives next to ``x``; host inputs run as they are. ``op`` is the
    function's name without a leading underscore (the public op of a private general path)."""
    op = fn.__name__.lstrip("_")

    @functools.wraps(fn)
    def wrapper(x: Any, *args: Any, **kwargs: Any) -> Any:
        if x is not None and _backend.is_cuda_array(x):
            xd = _device_array(op, x)
            with cupy_module(op).cuda.Device(xd.device.id):
                return fn(xd, *args, **kwargs)
        return fn(x, *args, **kwargs)

    return cast(_Op, wrapper)


def _signal(op: str, x, backend_name: str, *, scale_int16: bool = True) -> _Signal:
    """Check ``x`` (..., T) and lay it out as float32 (N, T) on its own device."""
    if backend_name == "cuda":
        xp = cupy_module(op)
        if x is None:
            raise ArgumentError(f"[{op}] x is required")
        x = _device_array(op, x)
    else:
        xp = np
        x = as_host_array(op, "x", x)
    if x.ndim == 0:
        raise ShapeError(f"[{op}] x has 0 dims, expected (..., T) with T samples on the last axis")
    T = int(x.shape[-1])
    if T == 0:
        raise ShapeError(f"[{op}] x is empty: T = 0 samples on the last axis")
    dt = np.dtype(x.dtype)
    if dt == np.int16:
        xf = x.astype(xp.float32)
        if scale_int16:
            xf *= _INT16_SCALE
    elif dt in (np.float16, np.float32, np.float64):
        with np.errstate(over="ignore", invalid="ignore"):   # overflow is reported below
            xf = x.astype(xp.float32, copy=False)
        if not bool(xp.isfinite(xf).all()):
            where = "NaN" if bool(xp.isnan(xf).any()) else "Inf"
            extra = " (or values beyond the float32 range)" if dt == np.float64 else ""
            raise ShapeError(f"[{op}] x contains {where} samples{extra}; audio must be finite")
    else:
        conv = "taken as given" if not scale_int16 else "scaled by 1/32768"
        raise ShapeError(f"[{op}] x has dtype {dt}, expected float32, float64, float16 or int16 "
                         f"(int16 is {conv})")
    batch = tuple(int(n) for n in x.shape[:-1])
    N = int(np.prod(batch, dtype=np.int64)) if batch else 1
    return _Signal(xp.ascontiguousarray(xf.reshape(N, T)), batch, T, xp)


def _window_arg(op: str, window, win_length: int, *, kaldi: bool = False) -> np.ndarray:
    if isinstance(window, str):
        check_choice("window", window, op=op, choices=KALDI_WINDOWS if kaldi else STFT_WINDOWS)
        return kaldi_window(window, win_length) if kaldi else window_function(window, win_length)
    if kaldi:
        raise ArgumentError(f"[{op}] window must be one of {', '.join(map(repr, KALDI_WINDOWS))}, "
                            f"got {type(window).__name__}")
    w = as_host_array(op, "window", window)
    if w.dtype.kind not in "fiu" or w.dtype == np.bool_:
        raise ShapeError(f"[{op}] window has dtype {w.dtype}, expected a name or a real array")
    if w.shape != (win_length,):
        raise ShapeError(f"[{op}] window has shape {w.shape}, expected ({win_length},) "
                         "= (win_length,)")
    w = np.ascontiguousarray(w, dtype=np.float32)
    if not np.isfinite(w).all():
        raise ShapeError(f"[{op}] window contains NaN or Inf")
    return w


class _Framing(NamedTuple):
    n_fft: int
    hop: int
    frame_length: int
    frame_offset: int
    pad_left: int
    pad_mode: str
    n_frames: int


def _stft_framing(op, T, n_fft, hop, win_length, center, pad_mode) -> _Framing:
    """torch.stft / librosa framing: the window centred in each n_fft frame."""
    pad = n_fft // 2 if center else 0
    if center:
        if pad_mode == "reflect" and T <= pad:
            raise ShapeError(f"[{op}] x has T = {T} samples, too short for center=True with "
                             f"reflect padding of n_fft//2 = {pad} samples (needs T > {pad}); "
                             "use a longer signal or pad_mode='constant'")
        n_frames = 1 + (T + 2 * pad - n_fft) // hop
    else:
        if T < n_fft:
            raise ShapeError(f"[{op}] x has T = {T} samples, fewer than n_fft = {n_fft} "
                             "(center=False frames must fit inside the signal)")
        n_frames = 1 + (T - n_fft) // hop
    return _Framing(n_fft, hop, win_length, (n_fft - win_length) // 2, pad, pad_mode, n_frames)


_NO_MEL = (None, None, None, None)     # the kernels' mel arguments when kind != "mel"


def _run_spectral(op: str, backend_name: str, sig: _Signal, out, window: np.ndarray,
                  fr: _Framing, mel: Optional[SparseMel] = None, *, kind: str, power: float = 2.0,
                  dither: float = 0.0, seed: int = 0, remove_dc: bool = False,
                  preemph: float = 0.0, log_mode: str = "none", log_floor: float = 1e-10,
                  whisper_norm: bool = False):
    """Call the kernel of ``backend_name`` to fill ``out``."""
    if sig.x.shape[0] == 0 or fr.n_frames == 0:
        return out
    kw = dict(n_fft=fr.n_fft, hop=fr.hop, frame_length=fr.frame_length,
              frame_offset=fr.frame_offset, pad_left=fr.pad_left, pad_mode=fr.pad_mode,
              n_frames=fr.n_frames, dither=float(dither), seed=int(seed),
              remove_dc=bool(remove_dc), preemph=float(preemph), kind=kind, power=float(power),
              log_mode=log_mode, log_floor=float(log_floor), whisper_norm=bool(whisper_norm))
    # the cuda launcher copies the small tables (window, mel filters) to the device
    mel_args = _NO_MEL if mel is None else mel
    launcher(op, backend_name, "spectral", "spectral")(sig.x, out, window, *mel_args, **kw)
    return out


def _resolve(op: str, x, backend) -> str:
    return _backend.resolve_backend(op, (x,), backend)


# ----------------------------------------------------------------------------------------------
# native plans: the repeated configurations checked once (see mmcore._C.SpectralPlan)

#: Native spectral plans by parameters (and native module), bounded.
_PLANS = PlanCache(maxsize=32)


def _whisper_plan(n_mels: int):
    """The native plan of Whisper's log-mel features with ``n_mels`` (80 or 128) mel bands: the
    framing, window, filters and options of :func:`log_mel_spectrogram`, cached; None when the
    native module has no plans (the general path then runs, and names the op in its error)."""
    key = (id(_backend.native_module()), "whisper", n_mels)
    plan = _PLANS.get(key)
    if plan is not None:
        return plan

    def build():
        return _cpu.spectral_plan(
            window_function("hann", WHISPER_N_FFT),
            *mel_filters_sparse(float(WHISPER_SAMPLE_RATE), WHISPER_N_FFT, n_mels, 0.0,
                                WHISPER_SAMPLE_RATE / 2.0, False, "slaney"),
            n_fft=WHISPER_N_FFT, hop=WHISPER_HOP_LENGTH, frame_length=WHISPER_N_FFT,
            frame_offset=0, pad_left=WHISPER_N_FFT // 2, pad_mode="reflect", dither=0.0, seed=0,
            remove_dc=False, preemph=0.0, kind="mel", power=2.0, log_mode="log10",
            log_floor=1e-10, whisper_norm=True)

    try:
        return _PLANS.get_or_build(key, build)
    except BackendError:
        return None


# ----------------------------------------------------------------------------------------------
# public ops


@_on_device_of_x
def stft(x: Array, *, n_fft: int, hop_length: Optional[int] = None,
         win_length: Optional[int] = None, window: Union[StftWindow, Array] = "hann",
         center: bool = True, pad_mode: Literal["reflect", "constant"] = "reflect",
         backend: Optional[Backend] = None) -> Array:
    """Short-time Fourier transform of real signals, ``torch.stft`` / ``librosa.stft`` style.

    Frame ``f`` holds ``n_fft`` samples starting at ``f * hop_length`` of the (padded) signal;
    the window of ``win_length`` samples sits in the middle of the frame (starting at
    ``(n_fft - win_length) // 2``), the rest is zero. ``X[k, f] = sum_n frame[n] *
    exp(-2 pi i k n / n_fft)`` for ``k = 0 .. n_fft // 2``: unnormalized and one-sided, like
    ``torch.stft(..., return_complex=True)`` and ``librosa.stft``.

    Parameters
    ----------
    x : array (..., T)
        Signals on the last axis, any leading batch shape. float32, float64, float16 or int16
        (scaled by 1/32768). Must be finite.
    n_fft : int
        FFT size, ``2 <= n_fft <= 2**20``; any size (400, primes, ...), not only powers of two.
    hop_length : int, optional
        Samples between frame starts, >= 1 (may exceed ``n_fft``); default
        ``max(1, n_fft // 4)``.
    win_length : int, optional
        Window length, ``1 <= win_length <= n_fft``; default ``n_fft``.
    window : str or array (win_length,), default "hann"
        "hann", "hamming", "blackman" (all *periodic*, as ``torch.hann_window`` and librosa's
        STFT windows), "povey" (Kaldi, symmetric), "rectangular" / "ones", or the samples.
    center : bool, default True
        Pad ``n_fft // 2`` samples on both sides so that frame ``f`` is centred at sample
        ``f * hop_length``. Then ``frames = 1 + T // hop_length`` for even ``n_fft``
        (``1 + (T - 1) // hop_length`` for odd); without centering
        ``frames = 1 + (T - n_fft) // hop_length`` and ``T >= n_fft`` is required.
    pad_mode : {"reflect", "constant"}, default "reflect"
        How ``center`` extends the signal: mirror without repeating the edge sample (torch's
        default; needs ``T > n_fft // 2``) or zeros (librosa's default since 0.10).
    backend : {"native", "numba", "cuda"}, optional
        Override the backend (see :mod:`mmcore._backend`).

    Returns
    -------
    complex64 array (..., n_fft // 2 + 1, frames)

    Examples
    --------
    >>> import numpy as np
    >>> from mmcore.ops import stft
    >>> t = np.arange(16000) / 16000
    >>> x = np.sin(2 * np.pi * 1000 * t).astype(np.float32)     # 1 kHz tone, 1 s at 16 kHz
    >>> X = stft(x, n_fft=400, hop_length=160)
    >>> X.shape, X.dtype, int(np.abs(X[:, 50]).argmax())          # bin 25 = 1000 Hz
    ((201, 101), dtype('complex64'), 25)
    """
    op = "stft"
    name = _resolve(op, x, backend)
    n_fft = check_int("n_fft", n_fft, op=op, lo=2, hi=MAX_N_FFT)
    hop = (max(1, n_fft // 4) if hop_length is None
           else check_int("hop_length", hop_length, op=op, lo=1))
    win_length = n_fft if win_length is None else check_int("win_length", win_length, op=op, lo=1)
    if win_length > n_fft:
        raise ArgumentError(f"[{op}] win_length = {win_length} is larger than n_fft = {n_fft}")
    w = _window_arg(op, window, win_length)
    center = check_bool("center", center, op=op)
    mode = check_choice("pad_mode", pad_mode, op=op, choices=("reflect", "constant"))
    sig = _signal(op, x, name)
    fr = _stft_framing(op, sig.T, n_fft, hop, win_length, center, mode)
    out = sig.xp.empty((sig.x.shape[0], n_fft // 2 + 1, fr.n_frames), sig.xp.complex64)
    _run_spectral(op, name, sig, out, w, fr, kind="complex")
    return out.reshape(sig.batch + out.shape[1:])


def mel_filterbank(*, sr: float, n_fft: int, n_mels: int = 128, fmin: float = 0.0,
                   fmax: Optional[float] = None, htk: bool = False,
                   norm: Optional[Literal["slaney"]] = "slaney") -> np.ndarray:
    """Triangular mel filters: the matrix that maps a power spectrum to mel bands.

    Equal to ``librosa.filters.mel(sr=sr, n_fft=n_fft, n_mels=n_mels, fmin=fmin, fmax=fmax,
    htk=htk, norm=norm)`` (the float32 values match bit for bit). ``n_mels + 2`` edge
    frequencies are evenly spaced on the mel scale from ``fmin`` to ``fmax``; filter ``m`` is
    the triangle over edges ``m, m + 1, m + 2`` (linear in Hz), sampled at the bin frequencies
    ``k * sr / n_fft``.

    Parameters
    ----------
    sr : float
        Sample rate in Hz, > 0.
    n_fft : int
        FFT size, ``2 <= n_fft <= 2**20``; the filters cover ``n_fft // 2 + 1`` bins.
    n_mels : int, default 128
        Number of filters, ``1 <= n_mels <= n_fft // 2 + 1``. With many filters on a short FFT
        some rows may be all zero (librosa warns; here they are simply returned).
    fmin : float, default 0.0
        Lowest edge in Hz, >= 0.
    fmax : float, optional
        Highest edge in Hz, ``fmin < fmax <= sr / 2``; default ``sr / 2``.
    htk : bool, default False
        HTK's mel scale ``2595 log10(1 + f / 700)`` instead of Slaney's (linear below 1 kHz,
        logarithmic above; the Auditory Toolbox scale, librosa's default).
    norm : {"slaney", None}, default "slaney"
        "slaney" divides each triangle by its width in Hz (``2 / (f[m + 2] - f[m])``) so that
        every filter has the same area; ``None`` leaves peaks at 1.

    Returns
    -------
    float32 array (n_mels, n_fft // 2 + 1)
        A fresh, writable array.

    Examples
    --------
    >>> from mmcore.ops import mel_filterbank
    >>> fb = mel_filterbank(sr=16000, n_fft=400, n_mels=80)     # Whisper's filters
    >>> fb.shape, fb.dtype, bool((fb >= 0).all())
    ((80, 201), dtype('float32'), True)
    """
    args = _mel_args("mel_filterbank", sr, n_fft, n_mels, fmin, fmax, htk, norm)
    return np.array(mel_filters(*args))


@_on_device_of_x
def mel_spectrogram(x: Array, *, sr: float = 16000, n_fft: int = 400, hop_length: int = 160,
                    win_length: Optional[int] = None, window: Union[StftWindow, Array] = "hann",
                    n_mels: int = 80, fmin: float = 0.0, fmax: Optional[float] = None,
                    center: bool = True, pad_mode: Literal["reflect", "constant"] = "reflect",
                    power: float = 2.0, htk: bool = False,
                    norm: Optional[Literal["slaney"]] = "slaney",
                    backend: Optional[Backend] = None) -> Array:
    """Mel spectrogram: ``mel_filterbank(...) @ |stft(x)|**power``, fused in one pass.

    The framing is that of :func:`stft`, the filters those of :func:`mel_filterbank`; with
    matching arguments this equals ``librosa.feature.melspectrogram`` (whose ``pad_mode``
    default is "constant", while here it is "reflect", as in ``torch.stft`` and
    ``torchaudio.transforms.MelSpectrogram``). The defaults are Whisper's front end
    (16 kHz, 25 ms window, 10 ms hop, 80 bands).

    Parameters
    ----------
    x : array (..., T)
        Signals; float32, float64, float16 or int16 (scaled by 1/32768). Must be finite.
    sr : float, default 16000
    n_fft : int, default 400
    hop_length : int, default 160
    win_length : int, optional
        Default ``n_fft``.
    window : str or array, default "hann" (periodic)
    n_mels : int, default 80
    fmin : float, default 0.0
    fmax : float, optional
        Default ``sr / 2``.
    center : bool, default True
    pad_mode : {"reflect", "constant"}, default "reflect"
    power : float, default 2.0
        Exponent of the magnitude: 2 for power, 1 for magnitude (any value > 0).
    htk : bool, default False
    norm : {"slaney", None}, default "slaney"
    backend : {"native", "numba", "cuda"}, optional

    Returns
    -------
    float32 array (..., n_mels, frames)

    Examples
    --------
    >>> import numpy as np
    >>> from mmcore.ops import mel_spectrogram
    >>> x = np.random.default_rng(0).standard_normal((2, 16000)).astype(np.float32)
    >>> M = mel_spectrogram(x)
    >>> M.shape, M.dtype
    ((2, 80, 101), dtype('float32'))
    """
    op = "mel_spectrogram"
    name = _resolve(op, x, backend)
    sr, n_fft, n_mels, fmin, fmax, htk, norm = _mel_args(op, sr, n_fft, n_mels, fmin, fmax,
                                                         htk, norm)
    hop = check_int("hop_length", hop_length, op=op, lo=1)
    win_length = n_fft if win_length is None else check_int("win_length", win_length, op=op, lo=1)
    if win_length > n_fft:
        raise ArgumentError(f"[{op}] win_length = {win_length} is larger than n_fft = {n_fft}")
    w = _window_arg(op, window, win_length)
    center = check_bool("center", center, op=op)
    mode = check_choice("pad_mode", pad_mode, op=op, choices=("reflect", "constant"))
    power = _power(op, power)
    sig = _signal(op, x, name)
    fr = _stft_framing(op, sig.T, n_fft, hop, win_length, center, mode)
    mel = mel_filters_sparse(sr, n_fft, n_mels, fmin, fmax, htk, norm)
    out = sig.xp.empty((sig.x.shape[0], n_mels, fr.n_frames), sig.xp.float32)
    _run_spectral(op, name, sig, out, w, fr, mel, kind="mel", power=power)
    return out.reshape(sig.batch + out.shape[1:])


def log_mel_spectrogram(x: Array, *, n_mels: int = 80,
                        preset: Literal["whisper"] = "whisper", padding: int = 0,
                        backend: Optional[Backend] = None) -> Array:
    """Log-mel features as a model's front end expects them.

    ``preset="whisper"`` reproduces openai-whisper's ``log_mel_spectrogram``: 16 kHz input,
    ``stft`` with ``n_fft=400``, ``hop_length=160``, a periodic Hann window, ``center=True``
    with reflect padding; the last frame is dropped; power spectrum; Whisper's mel filters
    (``librosa.filters.mel(sr=16000, n_fft=400, n_mels=n_mels)``, Slaney scale and norm);
    ``y = log10(max(mel, 1e-10))``; ``y = max(y, y.max() - 8)``; ``(y + 4) / 4``. The maximum
    is taken per signal (over that signal's whole (n_mels, frames) output), so a batch gives
    the same result as one call per item; Whisper itself, given a batch tensor, takes one
    maximum over the whole batch.

    Parameters
    ----------
    x : array (..., T)
        16 kHz signals; float32, float64, float16 or int16 (scaled by 1/32768). Must be finite
        and longer than 200 samples (the reflect padding). Whisper's models want 30 s windows:
        pad with ``padding=480000 - T`` (or ``whisper.pad_or_trim``) to get 3000 frames.
    n_mels : {80, 128}, default 80
        80 for Whisper up to large-v2, 128 for large-v3.
    preset : {"whisper"}, default "whisper"
    padding : int, default 0
        Zero samples appended to every signal before the transform, like Whisper's own
        ``padding`` argument; at most ``2**26`` (70 minutes at 16 kHz: Whisper pads to 30 s).
    backend : {"native", "numba", "cuda"}, optional

    Returns
    -------
    float32 array (..., n_mels, frames), ``frames = T_padded // 160``

    Examples
    --------
    >>> import numpy as np
    >>> from mmcore.ops import log_mel_spectrogram
    >>> x = 0.1 * np.random.default_rng(0).standard_normal(32000).astype(np.float32)
    >>> F = log_mel_spectrogram(x)                  # 2 s of audio
    >>> F.shape, bool(F.max() - F.min() <= 2.0)     # the dynamic range is clipped at 8 / 4
    ((80, 200), True)
    >>> log_mel_spectrogram(x, n_mels=128, padding=480000 - 32000).shape
    (128, 3000)
    """
    # The common call -- a C-contiguous float32 (or float64, or int16) NumPy signal on the
    # native backend, default options -- goes straight to a cached native plan, which converts
    # the samples as astype(float32) does and checks them for NaN / Inf itself. Anything else,
    # and any input the general path would refuse, takes the general path (the same kernel and
    # options: the same bits, and the same errors).
    if (type(x) is np.ndarray and ((dt := x.dtype) is _FLOAT32 or dt is _FLOAT64 or dt is _INT16)
            and type(n_mels) is int
            and (n_mels == 80 or n_mels == 128) and type(padding) is int and padding == 0
            and type(preset) is str and preset == "whisper"
            and (_backend.default_host_backend() if backend is None else backend) == "native"
            and x.ndim and x.flags.c_contiguous):
        T = x.shape[-1]
        plan = _whisper_plan(n_mels) if T > WHISPER_N_FFT // 2 else None
        if plan is not None:
            out = plan.run(x, n_frames=T // WHISPER_HOP_LENGTH,
                           num_threads=_backend.get_num_threads())
            if out is not None:
                return out
    return _log_mel_spectrogram(x, n_mels=n_mels, preset=preset, padding=padding,
                                backend=backend)


@_on_device_of_x
def _log_mel_spectrogram(x, *, n_mels, preset, padding, backend):
    """:func:`log_mel_spectrogram` for every input: checks, layout, backend choice."""
    op = "log_mel_spectrogram"
    name = _resolve(op, x, backend)
    check_choice("preset", preset, op=op, choices=("whisper",))
    if isinstance(n_mels, bool) or not isinstance(n_mels, (int, np.integer)) \
            or int(n_mels) not in WHISPER_N_MELS:
        raise ArgumentError(f"[{op}] n_mels must be 80 or 128 for preset='whisper', got {n_mels!r}")
    n_mels = int(n_mels)
    padding = check_int("padding", padding, op=op, lo=0, hi=MAX_PADDING)
    sig = _signal(op, x, name)
    if padding:
        xp = sig.xp
        padded = xp.zeros((sig.x.shape[0], sig.T + padding), xp.float32)
        padded[:, : sig.T] = sig.x
        sig = _Signal(padded, sig.batch, sig.T + padding, xp)
    full = _stft_framing(op, sig.T, WHISPER_N_FFT, WHISPER_HOP_LENGTH, WHISPER_N_FFT, True,
                         "reflect")
    fr = full._replace(n_frames=full.n_frames - 1)          # Whisper drops the last frame
    w = window_function("hann", WHISPER_N_FFT)
    mel = mel_filters_sparse(float(WHISPER_SAMPLE_RATE), WHISPER_N_FFT, n_mels, 0.0,
                             WHISPER_SAMPLE_RATE / 2.0, False, "slaney")
    out = sig.xp.empty((sig.x.shape[0], n_mels, fr.n_frames), sig.xp.float32)
    _run_spectral(op, name, sig, out, w, fr, mel, kind="mel", power=2.0, log_mode="log10",
                  log_floor=1e-10, whisper_norm=True)
    return out.reshape(sig.batch + out.shape[1:])


def _kaldi_samples(sr: float, ms: float) -> int:
    """Kaldi's ``int(sr * 0.001 * ms)``, snapping products within 1e-9 of an integer (so that
    e.g. 16 kHz x 25 ms is 400 whatever the rounding of 0.001)."""
    v = sr * 0.001 * ms
    r = round(v)
    return int(r) if abs(v - r) < 1e-9 * max(1.0, abs(v)) else int(math.floor(v))


@_on_device_of_x
def fbank(x: Array, *, sr: float = 16000, n_mels: int = 80, frame_length_ms: float = 25.0,
          frame_shift_ms: float = 10.0, dither: float = 0.0, seed: Optional[int] = None,
          preemphasis: float = 0.97, remove_dc_offset: bool = True, window: KaldiWindow = "povey",
          round_to_power_of_two: bool = True, snip_edges: bool = True, low_freq: float = 20.0,
          high_freq: float = 0.0, use_log: bool = True, use_power: bool = True,
          backend: Optional[Backend] = None) -> Array:
    """Kaldi-compatible log mel filterbank features (``compute-fbank-feats``).

    The defaults and the input convention are those of ``torchaudio.compliance.kaldi.fbank``
    (and of kaldi-native-fbank with ``dither=0``), except ``n_mels``: 80 here, the size
    speech models use, where torchaudio and Kaldi default to 23. Samples are taken as given,
    int16 included (no 1/32768 scaling): Kaldi's features assume the int16 range, so scale
    float audio in [-1, 1) by 32768 to get Kaldi's numbers.

    Per frame of ``L = int(sr * frame_length_ms / 1000)`` samples, every
    ``int(sr * frame_shift_ms / 1000)`` samples: add ``dither * N(0, 1)``, subtract the
    frame's mean (``remove_dc_offset``), pre-emphasize (``x[t] -= p x[t-1]``,
    ``x[0] -= p x[0]``), multiply by the window, zero-pad at the end to ``n_fft`` (the next
    power of two of ``L``, or ``L``), take ``|FFT|**2`` (``|FFT|`` without ``use_power``),
    project on Kaldi's mel banks and take ``ln(max(e, 1.1920929e-07))``.

    Kaldi's mel banks are triangles on the scale ``1127 ln(1 + f / 700)`` with edges evenly
    spaced from ``low_freq`` to ``high_freq``, evaluated at the centre frequencies
    ``k * sr / n_fft`` of bins ``k < n_fft / 2`` (the Nyquist bin gets weight 0), not
    normalized.

    Parameters
    ----------
    x : array (..., T)
        Signals at ``sr``; float32, float64, float16 or int16 (as given). Must be finite.
    sr : float, default 16000
    n_mels : int, default 80
        Number of mel bins; every bin must cover at least one FFT bin (Kaldi's rule).
    frame_length_ms, frame_shift_ms : float, default 25.0 and 10.0
    dither : float, default 0.0
        Gaussian noise amplitude (Kaldi's own default is 1.0; torchaudio's is 0). The noise is
        a pure function of ``(seed, i, frame, t)`` with ``i`` the signal's row in the flattened
        batch, so it is reproducible on every backend but differs between batch rows: with
        dither, a batch is not the same as one call per item.
    seed : int, optional
        Dither seed; drawn at random when ``None`` and ``dither > 0``.
    preemphasis : float, default 0.97
        Pre-emphasis coefficient in [0, 1]; 0 turns it off.
    remove_dc_offset : bool, default True
    window : str, default "povey"
        "povey", "hann", "hanning", "hamming", "blackman", "rectangular" or "ones": Kaldi's
        *symmetric* windows (denominator ``L - 1``), unlike :func:`stft`'s periodic ones;
        "povey" is ``hann**0.85``; "blackman" uses Kaldi's coefficient 0.42.
    round_to_power_of_two : bool, default True
        ``n_fft`` = next power of two >= L; otherwise ``n_fft = L``, which must then be even.
    snip_edges : bool, default True
        True: only frames that fit in the signal, ``frames = 1 + (T - L) // shift`` (T >= L
        required). False: ``frames = (T + shift // 2) // shift``, frame ``f`` centred at
        ``f * shift + shift // 2`` with the signal mirrored at the edges (edge sample
        repeated), as Kaldi does.
    low_freq : float, default 20.0
        Lower edge of the mel banks in Hz, >= 0.
    high_freq : float, default 0.0
        Upper edge in Hz; ``<= 0`` means ``sr / 2 + high_freq`` (Kaldi's convention). Must end
        up in ``(low_freq, sr / 2]``.
    use_log : bool, default True
        Natural log with Kaldi's floor; False returns the mel energies.
    use_power : bool, default True
        Power spectrum; False uses the magnitude.
    backend : {"native", "numba", "cuda"}, optional

    Returns
    -------
    float32 array (..., frames, n_mels)
        Kaldi / torchaudio layout: frames first.

    Notes
    -----
    Not supported (always off): Kaldi's energy feature (``use_energy``), VTLN warping,
    ``htk_compat`` and ``subtract_mean``.

    Examples
    --------
    >>> import numpy as np
    >>> from mmcore.ops import fbank
    >>> x = np.random.default_rng(0).integers(-3000, 3000, 16000).astype(np.int16)
    >>> F = fbank(x)                       # 1 s at 16 kHz, int16 samples as given
    >>> F.shape, F.dtype
    ((98, 80), dtype('float32'))
    """
    op = "fbank"
    name = _resolve(op, x, backend)
    sr = _sample_rate(op, sr)
    n_mels = check_int("n_mels", n_mels, op=op, lo=1)
    length_ms = finite_float(op, "frame_length_ms", frame_length_ms, positive=True)
    shift_ms = finite_float(op, "frame_shift_ms", frame_shift_ms, positive=True)
    L = _kaldi_samples(sr, length_ms)
    shift = _kaldi_samples(sr, shift_ms)
    if L < 1:
        raise ArgumentError(f"[{op}] frame_length_ms = {length_ms} gives {L} samples at "
                            f"sr = {sr}; need at least 1")
    if shift < 1:
        raise ArgumentError(f"[{op}] frame_shift_ms = {shift_ms} gives {shift} samples at "
                            f"sr = {sr}; need at least 1")
    if L > MAX_N_FFT:
        raise ArgumentError(f"[{op}] frame_length_ms = {length_ms} gives {L} samples at "
                            f"sr = {sr}; at most {MAX_N_FFT} are supported")
    if shift > INT64_MAX:
        raise ArgumentError(f"[{op}] frame_shift_ms = {shift_ms} gives {shift} samples at sr = "
                            f"{sr}, beyond the int64 range of the kernels")
    dither = finite_float(op, "dither", dither)
    if dither < 0:
        raise ArgumentError(f"[{op}] dither must be >= 0, got {dither}")
    seed_i = optional_seed(op, seed) if dither > 0 else 0
    preemph = finite_float(op, "preemphasis", preemphasis)
    if not 0.0 <= preemph <= 1.0:
        raise ArgumentError(f"[{op}] preemphasis must lie in [0, 1], got {preemph}")
    remove_dc = check_bool("remove_dc_offset", remove_dc_offset, op=op)
    if not isinstance(window, str):
        raise ArgumentError(f"[{op}] window must be one of {', '.join(map(repr, KALDI_WINDOWS))}, "
                            f"got {window!r}")
    w = _window_arg(op, window, L, kaldi=True)
    pow2 = check_bool("round_to_power_of_two", round_to_power_of_two, op=op)
    snip = check_bool("snip_edges", snip_edges, op=op)
    n_fft = 1 << (L - 1).bit_length() if pow2 else L
    if n_fft < 2 or n_fft % 2:
        raise ArgumentError(f"[{op}] the FFT size must be even and >= 2, got {n_fft} (frame of {L} "
                            "samples with round_to_power_of_two=False)")
    nyquist = sr / 2.0
    low = finite_float(op, "low_freq", low_freq)
    high = finite_float(op, "high_freq", high_freq)
    if high <= 0:
        high = nyquist + high
    if not (0.0 <= low < nyquist and low < high <= nyquist):
        raise ArgumentError(f"[{op}] need 0 <= low_freq < high_freq <= sr/2 = {nyquist}, got "
                            f"low_freq = {low} and high_freq = {high} (high_freq <= 0 means "
                            "sr/2 + high_freq)")
    use_log = check_bool("use_log", use_log, op=op)
    use_power = check_bool("use_power", use_power, op=op)
    if n_mels > n_fft // 2:
        raise ArgumentError(f"[{op}] n_mels = {n_mels} is larger than the number of FFT bins "
                            f"n_fft/2 = {n_fft // 2} (n_fft = {n_fft})")
    dense = kaldi_mel_filters(sr, n_fft, n_mels, low, high)
    empty = np.flatnonzero(~dense.any(axis=1))
    if empty.size:
        raise ArgumentError(f"[{op}] n_mels = {n_mels} is too large for n_fft = {n_fft} between "
                            f"{low} and {high} Hz: mel bin {int(empty[0])} covers no FFT bin")
    mel = kaldi_mel_filters_sparse(sr, n_fft, n_mels, low, high)

    sig = _signal(op, x, name, scale_int16=False)
    T = sig.T
    if snip:
        if T < L:
            raise ShapeError(f"[{op}] x has T = {T} samples, fewer than one frame of {L} "
                             f"samples ({length_ms} ms at {sr} Hz) with snip_edges=True")
        n_frames = 1 + (T - L) // shift
    else:
        n_frames = (T + shift // 2) // shift
        if n_frames == 0:
            raise ShapeError(f"[{op}] x has T = {T} samples: no frame with snip_edges=False "
                             f"(needs T >= {shift - shift // 2})")
        # Kaldi mirrors the signal at both ends, repeating the edge sample; lay the mirrored
        # samples out explicitly so that frame f starts at f * shift.
        first = shift // 2 - L // 2
        idx = np.arange(first, first + (n_frames - 1) * shift + L, dtype=np.int64) % (2 * T)
        idx = np.where(idx >= T, 2 * T - 1 - idx, idx)
        xp = sig.xp
        sig = _Signal(xp.ascontiguousarray(sig.x[:, xp.asarray(idx)]), sig.batch, idx.size, xp)
    fr = _Framing(n_fft, shift, L, 0, 0, "constant", n_frames)
    out = sig.xp.empty((sig.x.shape[0], n_mels, n_frames), sig.xp.float32)
    _run_spectral(op, name, sig, out, w, fr, mel, kind="mel", power=2.0 if use_power else 1.0,
                  dither=dither, seed=seed_i, remove_dc=remove_dc, preemph=preemph,
                  log_mode="ln" if use_log else "none", log_floor=KALDI_LOG_FLOOR)
    out = sig.xp.ascontiguousarray(out.transpose(0, 2, 1))
    return out.reshape(sig.batch + out.shape[1:])
