"""CUDA path of the short-time spectral ops: argument checks for device arrays, then
``mmcore._cuda.spectral``.

:func:`spectral_cuda` takes the same arguments as the native kernel ``mmcore._C.spectral`` (less
``num_threads``) and fills ``out`` on the device, asynchronously on CuPy's current stream of the
device of ``x``. The public ops in :mod:`mmcore.ops.audio` call it for CUDA inputs.

Data never moves between host and device implicitly, with one documented exception: ``window``
and the four sparse mel tables are small constant tables, so NumPy arrays are accepted for them
and copied to the device (CuPy arrays on the device of ``x`` are used in place, cast on the
device when their dtype differs). The range check of device-resident mel tables reads one flag
back from the device and therefore waits for the current stream.

Limits of the CUDA kernel: ``n_fft <= 8192``; a frame and its tables live in shared memory, so
devices with less of it per block lower the limit (about 7200 on sm_75; an odd ``n_fft`` needs
about 14 bytes per point, an even one about 9). Those cases raise :class:`BackendError`, as does
a missing CuPy or CUDA module.
"""

from __future__ import annotations

import numpy as np

from ..._backend import is_cuda_array
from ...errors import BackendError, ShapeError
from .common import cuda_module, cupy_module, device_array, same_device

__all__ = ["spectral_cuda", "MAX_N_FFT"]

MAX_N_FFT = 8192

_OP = "spectral"
_KINDS = {"complex": 0, "power": 1, "mel": 2}
_PAD_MODES = {"constant": 0, "reflect": 1}


def _cupy():
    return cupy_module(_OP)


def _cuda_module():
    return cuda_module(_OP, "spectral")


def _device_array(cp, name: str, x):
    return device_array(cp, _OP, name, x)


def _same_device(name: str, a, device: int) -> None:
    same_device(_OP, name, a, device, "x")


def _table(cp, name: str, a, device: int, kind: str):
    """A 1-D table as a NumPy array (host input) or a CuPy array on ``device``."""
    if isinstance(a, cp.ndarray) or is_cuda_array(a):
        arr = _device_array(cp, name, a)
        _same_device(name, arr, device)
    else:
        try:
            arr = np.asarray(a)
        except Exception as exc:
            raise ShapeError(f"[{_OP}] {name} cannot be converted to an array: {exc}") from None
    if arr.ndim != 1:
        raise ShapeError(f"[{_OP}] {name} has {arr.ndim} dims, expected 1")
    ok = arr.dtype.kind in ("iu" if kind == "int" else "fiu") and arr.dtype != np.bool_
    if not ok:
        expected = "an integer dtype" if kind == "int" else "a real dtype"
        raise ShapeError(f"[{_OP}] {name} has dtype {arr.dtype}, expected {expected}")
    return arr


def _to_device(cp, a, dtype):
    """C-contiguous ``dtype`` copy on the current device (no copy for a matching CuPy array)."""
    if isinstance(a, cp.ndarray):
        return cp.ascontiguousarray(a, dtype=dtype)
    return cp.asarray(np.ascontiguousarray(a, dtype=dtype))


def _check_mel(cp, start, length, offset, weights, n_bins: int):
    """Every filter must lie inside the spectrum and inside ``weights``; weights are finite.

    The four tables are either all NumPy (checked on the host) or all CuPy (checked on the
    device with a single read-back).
    """
    n_w = int(weights.shape[0])
    xp = cp if isinstance(start, cp.ndarray) else np
    s = start.astype(xp.int64)
    ln = length.astype(xp.int64)
    o = offset.astype(xp.int64)
    bad = (s < 0) | (ln < 0) | (s + ln > n_bins) | (o < 0) | (o + ln > n_w)
    flags = xp.stack([bad.any() if s.size else xp.asarray(False),
                      ~xp.isfinite(weights).all() if n_w else xp.asarray(False)])
    any_bad, non_finite = (bool(v) for v in (flags if xp is np else cp.asnumpy(flags)))
    if any_bad:
        if xp is np:
            m = int(np.flatnonzero(bad)[0])
            raise ShapeError(f"[{_OP}] mel filter {m} covers bins [{int(s[m])}, "
                             f"{int(s[m] + ln[m])}) with weights [{int(o[m])}, "
                             f"{int(o[m] + ln[m])}); expected bins within [0, {n_bins}) and "
                             f"weights within [0, {n_w})")
        raise ShapeError(f"[{_OP}] a mel filter lies outside bins [0, {n_bins}) or outside "
                         f"mel_weights [0, {n_w}) (or has a negative start, length or offset)")
    if non_finite:
        raise ShapeError(f"[{_OP}] mel_weights contains NaN or Inf")


def spectral_cuda(x, out, window, mel_start, mel_len, mel_offset, mel_weights, *, n_fft, hop,
                  frame_length, frame_offset, pad_left, pad_mode, n_frames, dither, seed,
                  remove_dc, preemph, kind, power, log_mode, log_floor, whisper_norm):
    """Fill ``out`` with the short-time spectrum of every row of ``x`` on the GPU.

    The semantics are those of ``mmcore._C.spectral`` and :func:`mmcore.kernels.numba.spectral
    .spectral_numba` (framing with ``frame_offset`` / ``pad_left`` / ``pad_mode``, dither, DC
    removal and pre-emphasis in Kaldi's order, window, FFT, then complex / power / mel output,
    optional log and Whisper's per-signal normalization).

    Parameters
    ----------
    x : CuPy float32 C-contiguous (N, T)
    out : CuPy C-contiguous array on the device of ``x``, written asynchronously: complex64
        (N, n_fft//2 + 1, n_frames) for ``kind="complex"``, float32 (N, n_fft//2 + 1, n_frames)
        for ``"power"``, float32 (N, n_mels, n_frames) for ``"mel"``
    window : (frame_length,) real, CuPy on the same device or NumPy (copied); None is a
        rectangular window
    mel_start, mel_len, mel_offset : (n_mels,) integer tables; mel_weights : (nnz,) real -- the
        sparse filters (filter ``m`` covers bins ``[mel_start[m], mel_start[m] + mel_len[m])``
        with weights ``mel_weights[mel_offset[m]:][:mel_len[m]]``), required for ``"mel"`` and
        ignored otherwise; CuPy on the same device or NumPy (copied)
    n_fft : int in [1, 8192]; hop : int >= 1; frame_length : int in [1, n_fft];
    frame_offset : int in [0, n_fft - frame_length]; pad_left : int; n_frames : int >= 0
    pad_mode : {"reflect", "constant"}
    dither : float; seed : int (taken modulo 2**64); remove_dc : bool; preemph : float
    kind : {"complex", "power", "mel"}; power : float > 0
    log_mode : {"none", "log10", "ln"}; log_floor : float >= 0; whisper_norm : bool
        (``log_mode`` and ``whisper_norm`` apply to ``"power"`` and ``"mel"`` only)

    Returns
    -------
    out

    Raises
    ------
    ShapeError
        Wrong dtype, shape, contiguity or value of an argument.
    BackendError
        CuPy or mmcore._cuda is missing, an array is on another device or on the host, or the
        device cannot run this ``n_fft`` (shared memory).

    Examples
    --------
    >>> import cupy as cp, numpy as np                                  # doctest: +SKIP
    >>> from mmcore.kernels.cuda.spectral import spectral_cuda             # doctest: +SKIP
    >>> x = cp.random.standard_normal((1, 16000), dtype=cp.float32)     # doctest: +SKIP
    >>> out = cp.empty((1, 201, 101), cp.float32)                       # doctest: +SKIP
    >>> w = np.hanning(402)[1:-1].astype(np.float32)                    # doctest: +SKIP
    >>> spectral_cuda(x, out, w, None, None, None, None, n_fft=400, hop=160,
    ...               frame_length=400, frame_offset=0, pad_left=200, pad_mode="reflect",
    ...               n_frames=101, dither=0.0, seed=0, remove_dc=False, preemph=0.0,
    ...               kind="power", power=2.0, log_mode="none", log_floor=1e-10,
    ...               whisper_norm=False).shape                         # doctest: +SKIP
    (1, 201, 101)
    """
    cp = _cupy()
    mod = _cuda_module()

    if x is None:
        raise ShapeError(f"[{_OP}] x is required")
    if out is None:
        raise ShapeError(f"[{_OP}] out is required")
    x = _device_array(cp, "x", x)
    out = _device_array(cp, "out", out)
    device = x.device.id
    _same_device("out", out, device)

    # ---- scalars (validated by the ops of mmcore.ops.audio); the device's own limit
    n_fft = int(n_fft)
    if n_fft > MAX_N_FFT:
        raise BackendError(f"[{_OP}] n_fft = {n_fft} is above the CUDA backend's maximum of "
                           f"{MAX_N_FFT}; use the native or numba backend on the host")
    hop, frame_length, frame_offset = int(hop), int(frame_length), int(frame_offset)
    pad_left, n_frames = int(pad_left), int(n_frames)
    pad_i, kind_i = _PAD_MODES[pad_mode], _KINDS[kind]
    dither_f, preemph_f = float(dither), float(preemph)
    seed_i = int(seed) % (1 << 64)
    remove_dc = bool(remove_dc)
    whisper_norm = bool(whisper_norm)
    power_f = float(power)
    log_floor_f = float(log_floor)

    # ---- x and out
    if x.ndim != 2:
        raise ShapeError(f"[{_OP}] x has {x.ndim} dims, expected 2 (N, T)")
    if x.dtype != cp.float32:
        raise ShapeError(f"[{_OP}] x has dtype {x.dtype}, expected float32")
    if not x.flags.c_contiguous:
        raise ShapeError(f"[{_OP}] x must be C-contiguous")
    N, T = (int(n) for n in x.shape)
    if pad_i == 1 and T == 0:
        raise ShapeError(f"[{_OP}] reflect padding needs at least one sample, got T = 0")

    n_bins = n_fft // 2 + 1
    with cp.cuda.Device(device):
        # ---- mel tables
        tables: tuple[int, ...] = (0, 0, 0, 0)
        n_mels = 0
        keep = []
        if kind_i == 2:
            named = (("mel_start", mel_start, "int"), ("mel_len", mel_len, "int"),
                     ("mel_offset", mel_offset, "int"), ("mel_weights", mel_weights, "real"))
            arrs = []
            for name, a, k in named:
                if a is None:
                    raise ShapeError(f"[{_OP}] {name} is required for kind 'mel'")
                arrs.append(_table(cp, name, a, device, k))
            n_mels = int(arrs[0].shape[0])
            for name, a in zip(("mel_len", "mel_offset"), arrs[1:3]):
                if int(a.shape[0]) != n_mels:
                    raise ShapeError(f"[{_OP}] {name} has shape {tuple(a.shape)}, expected "
                                     f"({n_mels},) like mel_start")
            if any(isinstance(a, cp.ndarray) for a in arrs):
                arrs = [a if isinstance(a, cp.ndarray) else cp.asarray(a) for a in arrs]
            _check_mel(cp, arrs[0], arrs[1], arrs[2], arrs[3], n_bins)
            keep = [_to_device(cp, arrs[0], np.int32), _to_device(cp, arrs[1], np.int32),
                    _to_device(cp, arrs[2], np.int64), _to_device(cp, arrs[3], np.float32)]
            tables = tuple(0 if a.size == 0 else int(a.data.ptr) for a in keep)

        rows = n_mels if kind_i == 2 else n_bins
        want_dtype = cp.complex64 if kind_i == 0 else cp.float32
        want_shape = (N, rows, n_frames)
        if out.dtype != want_dtype:
            raise ShapeError(f"[{_OP}] out has dtype {out.dtype}, expected "
                             f"{np.dtype(want_dtype).name} for kind {kind!r}")
        if tuple(int(n) for n in out.shape) != want_shape:
            raise ShapeError(f"[{_OP}] out has shape {tuple(out.shape)}, expected {want_shape} "
                             f"= (N, {'n_mels' if kind_i == 2 else 'n_fft//2 + 1'}, n_frames)")
        if not out.flags.c_contiguous:
            raise ShapeError(f"[{_OP}] out must be C-contiguous")

        # ---- window
        win = None
        if window is not None:
            w = _table(cp, "window", window, device, "real")
            if int(w.shape[0]) != frame_length:
                raise ShapeError(f"[{_OP}] window has shape {tuple(w.shape)}, expected "
                                 f"({frame_length},) = (frame_length,)")
            win = _to_device(cp, w, np.float32)

        if N == 0 or n_frames == 0 or rows == 0:
            return out

        stream = cp.cuda.get_current_stream()
        try:
            mod.spectral(int(x.data.ptr) if x.size else 0, int(out.data.ptr),
                         0 if win is None else int(win.data.ptr), *tables,
                         N, T, n_fft, hop, frame_length, frame_offset, pad_left, pad_mode, n_frames,
                         dither_f, seed_i, remove_dc, preemph_f, kind, power_f, n_mels, log_mode,
                         log_floor_f, whisper_norm, int(stream.ptr), device)
        except RuntimeError as exc:
            # The arguments were checked above; what the kernel still rejects is a limit of
            # this device (shared memory for the requested n_fft).
            if "invalid argument" in str(exc):
                raise BackendError(str(exc)) from None
            raise
        # Dropping the tables copied or cast for this call is safe once the kernel is queued:
        # CuPy's pool hands their memory out again only in stream order.
    return out
