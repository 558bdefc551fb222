"""Benchmark mmcore's audio features (float32, CPU) against torch, librosa, NumPy and Kaldi.

Whisper log-mel cases (16 kHz, ``n_fft=400``, ``hop_length=160``, 30 s = 480000 samples ->
3000 frames), measured side by side in one process:

* ``mmcore.ops.log_mel_spectrogram(x, n_mels=...)`` (preset "whisper");
* torch: openai-whisper's formula -- ``torch.stft(x, 400, 160, window=hann_window(400),
  return_complex=True)``, ``stft[..., :-1].abs() ** 2``, ``filters @ mag`` with
  ``filters = librosa.filters.mel(sr=16000, n_fft=400, n_mels=...)`` built once outside the
  timing, ``clamp(min=1e-10).log10()``, ``maximum(x, x.max() - 8)`` (per clip for a batch:
  ``amax`` over the last two dims), ``(x + 4) / 4``, under ``torch.inference_mode()``;
* librosa: ``librosa.feature.melspectrogram(y=x, sr=16000, n_fft=400, hop_length=160,
  n_mels=..., center=True, pad_mode="reflect", power=2.0)``, last frame dropped, then the same
  log10 / floor / scale in NumPy;
* numpy: reflect padding, ``sliding_window_view`` frames, periodic Hann window,
  ``np.fft.rfft``, power, a dense mel matmul with the same filters, the same log steps.

And Kaldi fbank (30 s, 80 mels): ``mmcore.ops.fbank`` against kaldi-native-fbank's online API
(``OnlineFbank(opts)``, ``accept_waveform``, ``input_finished``, ``get_frame(i)`` for every
frame; dither 0, Kaldi's other defaults), both on samples scaled to the int16 range.

Scaling table: 1 s, 30 s and 10 min of 16 kHz speech-like audio (one clip), Whisper log-mel
(80 mels, no 30 s padding: ``len // 160`` frames) and Kaldi fbank (80 bins, Kaldi's povey
window, and the Hamming window of SenseVoice's front end), mmcore against torch (the Whisper
formula above), librosa (as above), asrfront (``asrfront.whisper.log_mel(x, 80,
pad_or_trim=False)``; ``asrfront.sensevoice.fbank_raw(x, n_mels=80)``, Hamming window only)
and kaldi-native-fbank (as below, with the same window). Each anchor's output is compared
with mmcore's before timing (max abs difference printed); the timings are medians of >= 7
interleaved rounds (>= 7 also with ``--quick``), per call, and the ratios are anchor ms /
mmcore ms.

Printed per case: the time (ms) of mmcore and each anchor, the speedup (anchor ms / mmcore ms),
mmcore's real-time factor (seconds of audio per second), and the max abs difference of mmcore
against each anchor's output (the Whisper features lie in about [-1.5, 1.5]; target <= 1e-4
against the torch formula), then the machine's ceilings and a summary against the targets
(>= 4x torch and >= 8x librosa, single clip and batch). The script exits with status 1 when
mmcore differs from the torch Whisper formula by more than 1e-3 (from the NumPy formula when
torch is not installed).

Threads: this script defaults to ``--threads 2`` for mmcore, torch and numpy's BLAS (a typical
data-loader worker); librosa's FFT runs single-threaded inside NumPy whatever the setting.

Usage::

    python bench/bench_audio.py [--quick] [--threads N] [--backend native|numba]
                                [--only main|scaling]

Any anchor that is not installed prints ``n/a`` and the rest still runs.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from typing import Any, Callable, Dict, List, NamedTuple, Optional, Tuple

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _timing as T  # noqa: E402

try:
    import mmcore  # noqa: E402
    from mmcore.ops import fbank, log_mel_spectrogram  # noqa: E402
except ImportError as _exc:  # pragma: no cover - not installed or ops missing
    raise SystemExit(f"mmcore (with its audio ops) is not importable ({_exc}); build and install "
                     "it first: pip install --no-build-isolation -Cbuild-dir=build -e .") from _exc

SR = 16000
N_FFT = 400
HOP = 160
CLIP_S = 30
CLIP = SR * CLIP_S  # 480000 samples -> 3000 frames
SEED = 1234
FAIL_TOL = 1e-3     # exit status 1 beyond this (vs the torch Whisper formula)
TARGET_TOL = 1e-4   # what a correct float32 kernel reaches
TARGET_TORCH = 4.0
TARGET_LIBROSA = 8.0
DEFAULT_THREADS = 2


class Case(NamedTuple):
    label: str
    batch: int       # 0: a single 1-D clip
    n_mels: int
    note: str


CASES = [
    Case("1 x 30 s, 80 mels", 0, 80, "single clip, Whisper up to large-v2"),
    Case("16 x 30 s, 80 mels", 16, 80, "batch of 16 clips"),
    Case("1 x 30 s, 128 mels", 0, 128, "single clip, Whisper large-v3"),
]


# --------------------------------------------------------------------------------------------
# inputs

def speech_like(n: int, rng: np.random.Generator) -> np.ndarray:
    """A speech-like float32 signal: harmonics of a gliding pitch, syllable-rate envelope, noise.

    Real audio has the dynamic range (and silent stretches) that exercise Whisper's
    ``max - 8`` floor, which white noise would not.
    """
    t = np.arange(n) / SR
    f0 = 150.0 + 40.0 * np.sin(2 * np.pi * 0.3 * t + rng.uniform(0, 6.3))
    phase = 2 * np.pi * np.cumsum(f0) / SR
    y = np.zeros(n)
    for k in range(1, 16):
        y += np.sin(k * phase + rng.uniform(0, 6.3)) / k
    env = np.clip(np.sin(2 * np.pi * 2.0 * t + rng.uniform(0, 6.3)), 0.0, None) ** 2
    y = y * env + 0.003 * rng.standard_normal(n)
    return (0.4 * y / np.max(np.abs(y))).astype(np.float32)


def make_input(case: Case, base: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    if case.batch == 0:
        return base
    rows = [np.roll(base, int(rng.integers(CLIP))) * np.float32(rng.uniform(0.2, 1.0))
            for _ in range(case.batch)]
    return np.ascontiguousarray(np.stack(rows))


# --------------------------------------------------------------------------------------------
# anchors

def slaney_mel(sr: int, n_fft: int, n_mels: int) -> np.ndarray:
    """Slaney-scale, Slaney-normalized mel filters (librosa.filters.mel's defaults), float32."""
    def hz_to_mel(f):
        f = np.asarray(f, np.float64)
        lin = f / (200.0 / 3)
        log = 15.0 + np.log(np.maximum(f, 1e-10) / 1000.0) / (np.log(6.4) / 27.0)
        return np.where(f >= 1000.0, log, lin)

    def mel_to_hz(m):
        m = np.asarray(m, np.float64)
        lin = m * (200.0 / 3)
        log = 1000.0 * np.exp((np.log(6.4) / 27.0) * (m - 15.0))
        return np.where(m >= 15.0, log, lin)

    fft_freqs = np.linspace(0, sr / 2, n_fft // 2 + 1)
    mel_f = mel_to_hz(np.linspace(hz_to_mel(0.0), hz_to_mel(sr / 2), n_mels + 2))
    fdiff = np.diff(mel_f)
    ramps = mel_f[:, None] - fft_freqs[None, :]
    lower = -ramps[:-2] / fdiff[:-1, None]
    upper = ramps[2:] / fdiff[1:, None]
    w = np.maximum(0.0, np.minimum(lower, upper))
    w *= (2.0 / (mel_f[2:n_mels + 2] - mel_f[:n_mels]))[:, None]
    return w.astype(np.float32)


def whisper_log_np(mel: np.ndarray) -> np.ndarray:
    """log10 / per-clip max - 8 floor / (x + 4) / 4 on (..., n_mels, frames), in place."""
    np.maximum(mel, np.float32(1e-10), out=mel)
    np.log10(mel, out=mel)
    peak = mel.max(axis=(-2, -1), keepdims=True)
    np.maximum(mel, peak - np.float32(8.0), out=mel)
    mel += np.float32(4.0)
    mel /= np.float32(4.0)
    return mel


class Anchors(NamedTuple):
    torch: Optional[Callable[[], np.ndarray]]
    librosa: Optional[Callable[[], np.ndarray]]
    numpy: Callable[[], np.ndarray]


def build_anchors(x: np.ndarray, n_mels: int, torch, librosa) -> Anchors:
    filters = (librosa.filters.mel(sr=SR, n_fft=N_FFT, n_mels=n_mels) if librosa is not None
               else slaney_mel(SR, N_FFT, n_mels)).astype(np.float32)
    batched = x.ndim == 2

    torch_fn = librosa_fn = None
    if torch is not None:
        tx = torch.from_numpy(x)
        window = torch.hann_window(N_FFT)
        tfilters = torch.from_numpy(filters)

        def run_torch():
            with torch.inference_mode():
                stft = torch.stft(tx, N_FFT, HOP, window=window, return_complex=True)
                magnitudes = stft[..., :-1].abs() ** 2
                mel_spec = tfilters @ magnitudes
                log_spec = torch.clamp(mel_spec, min=1e-10).log10()
                if batched:
                    peak = log_spec.amax(dim=(-2, -1), keepdim=True)
                else:
                    peak = log_spec.max()
                log_spec = torch.maximum(log_spec, peak - 8.0)
                return ((log_spec + 4.0) / 4.0).numpy()

        torch_fn = run_torch

    if librosa is not None:
        def run_librosa():
            S = librosa.feature.melspectrogram(y=x, sr=SR, n_fft=N_FFT, hop_length=HOP,
                                               n_mels=n_mels, center=True, pad_mode="reflect",
                                               power=2.0)
            return whisper_log_np(np.ascontiguousarray(S[..., :-1], dtype=np.float32))

        librosa_fn = run_librosa

    hann = (0.5 - 0.5 * np.cos(2 * np.pi * np.arange(N_FFT) / N_FFT)).astype(np.float32)
    filters_t = np.ascontiguousarray(filters.T)  # (bins, n_mels)
    pad = [(0, 0)] * (x.ndim - 1) + [(N_FFT // 2, N_FFT // 2)]

    def numpy_fn():
        xp = np.pad(x, pad, mode="reflect")
        frames = np.lib.stride_tricks.sliding_window_view(xp, N_FFT, axis=-1)[..., ::HOP, :]
        frames = frames[..., :-1, :] * hann               # Whisper drops the last frame
        spec = np.fft.rfft(frames, axis=-1)               # (..., frames, bins) complex64
        power = spec.real ** 2 + spec.imag ** 2
        mel = np.swapaxes(power @ filters_t, -1, -2)      # (..., n_mels, frames)
        return whisper_log_np(np.ascontiguousarray(mel, dtype=np.float32))

    return Anchors(torch_fn, librosa_fn, numpy_fn)


def max_abs_diff(a: np.ndarray, b: Optional[np.ndarray]) -> Optional[float]:
    if b is None:
        return None
    if a.shape != b.shape:
        return float("inf")
    return float(np.max(np.abs(a.astype(np.float64) - b.astype(np.float64))))


# --------------------------------------------------------------------------------------------
# runs

class Row(NamedTuple):
    case: Case
    seconds_audio: float
    mm: T.Timing
    times: Dict[str, Optional[T.Timing]]
    diffs: Dict[str, Optional[float]]


def run_whisper_case(case: Case, x: np.ndarray, torch, librosa, tkw) -> Row:
    def run_mm():
        return log_mel_spectrogram(x, n_mels=case.n_mels)

    out = run_mm()
    anchors = build_anchors(x, case.n_mels, torch, librosa)
    fns = {"mmcore": run_mm}
    diffs: Dict[str, Optional[float]] = {}
    for name, fn in anchors._asdict().items():
        diffs[name] = None if fn is None else max_abs_diff(out, fn())
        if fn is not None:
            fns[name] = fn
    t = T.interleaved(fns, **tkw)
    mm = t.pop("mmcore")
    times: Dict[str, Optional[T.Timing]] = {name: t.get(name) for name in anchors._fields}
    n_clips = max(1, case.batch)
    return Row(case, n_clips * CLIP_S, mm, times, diffs)


def kaldi_opts(knf, n_mels: int):
    opts = knf.FbankOptions()
    opts.frame_opts.samp_freq = SR
    opts.frame_opts.dither = 0.0
    opts.mel_opts.num_bins = n_mels
    return opts


def run_fbank_case(x: np.ndarray, knf, tkw) -> Row:
    case = Case("fbank 1 x 30 s, 80 mels", 0, 80, "Kaldi fbank, int16-range samples")
    xs = np.ascontiguousarray(x * np.float32(32768.0))

    def run_mm():
        return fbank(xs, sr=SR, n_mels=80)

    out = run_mm()
    fns = {"mmcore": run_mm}
    diffs: Dict[str, Optional[float]] = {"kaldi": None}
    if knf is not None:
        opts = kaldi_opts(knf, 80)

        def run_knf():
            fb = knf.OnlineFbank(opts)
            fb.accept_waveform(SR, xs)
            fb.input_finished()
            return np.stack([fb.get_frame(i) for i in range(fb.num_frames_ready)])

        diffs["kaldi"] = max_abs_diff(out, run_knf())
        fns["kaldi"] = run_knf
    t = T.interleaved(fns, **tkw)
    times: Dict[str, Optional[T.Timing]] = {"kaldi": t.get("kaldi")}
    return Row(case, CLIP_S, t["mmcore"], times, diffs)


# --------------------------------------------------------------------------------------------
# scaling: 1 s / 30 s / 10 min, one clip

SCALING_SECONDS = (1, 30, 600)
SCALING_ANCHORS = ("torch", "librosa", "asrfront", "kaldi")
# (feature, window): Whisper log-mel, then Kaldi fbank with Kaldi's default window and with the
# Hamming window of SenseVoice's front end (the one asrfront computes)
SCALING_FEATURES = (("whisper log-mel", None), ("fbank povey", "povey"),
                    ("fbank hamming", "hamming"))


class ScaleRow(NamedTuple):
    feature: str
    seconds: int
    mm: T.Timing
    times: Dict[str, Optional[T.Timing]]
    diffs: Dict[str, Optional[float]]


def asrfront_modules() -> Tuple[Any, Any]:
    """``(asrfront.whisper, asrfront.sensevoice)``, None for each that cannot be imported."""
    if T.optional_import("asrfront") is None:
        return None, None
    mods = []
    for name in ("asrfront.whisper", "asrfront.sensevoice"):
        try:
            mods.append(importlib.import_module(name))
        except Exception as exc:
            print(f"[skip] anchor {name!r} is unavailable ({type(exc).__name__}: {exc})")
            mods.append(None)
    return mods[0], mods[1]


def scaling_fns(feature: str, window: Optional[str], x: np.ndarray, torch, librosa, asr_w,
                asr_sv, knf) -> Tuple[Callable[[], np.ndarray],
                                      Dict[str, Optional[Callable[[], np.ndarray]]]]:
    """mmcore's function and each anchor's (None: not installed or not applicable)."""
    fns: Dict[str, Optional[Callable[[], np.ndarray]]] = dict.fromkeys(SCALING_ANCHORS)
    if window is None:
        anchors = build_anchors(x, 80, torch, librosa)
        fns["torch"], fns["librosa"] = anchors.torch, anchors.librosa
        if asr_w is not None:
            fns["asrfront"] = lambda: asr_w.log_mel(x, 80, pad_or_trim=False)
        return (lambda: log_mel_spectrogram(x, n_mels=80)), fns
    xs = np.ascontiguousarray(x * np.float32(32768.0))
    if knf is not None:
        opts = kaldi_opts(knf, 80)
        opts.frame_opts.window_type = window

        def run_knf():
            fb = knf.OnlineFbank(opts)
            fb.accept_waveform(SR, xs)
            fb.input_finished()
            return np.stack([fb.get_frame(i) for i in range(fb.num_frames_ready)])

        fns["kaldi"] = run_knf
    if asr_sv is not None and window == "hamming":
        # torchaudio's kaldi.fbank(x * 32768, window_type="hamming"): scales [-1, 1] itself
        fns["asrfront"] = lambda: asr_sv.fbank_raw(x, n_mels=80)
    return (lambda: fbank(xs, sr=SR, n_mels=80, window=window)), fns


def scaling_timing(seconds: int, quick: bool) -> Dict[str, Any]:
    """At least 7 rounds everywhere (--quick only drops warm-up calls and the minimum time);
    the 10 min case takes no minimum time, so its slowest anchor sets the length of the run."""
    if seconds >= 600:
        return dict(warmup=1, repeat=7, min_time=0.0)
    return dict(warmup=1 if quick else 2, repeat=7 if quick else 9,
                min_time=0.0 if quick else 0.5, max_repeat=200)


def run_scaling(torch, librosa, asr_w, asr_sv, knf, quick: bool) -> List[ScaleRow]:
    rows: List[ScaleRow] = []
    for seconds in SCALING_SECONDS:
        x = speech_like(SR * seconds, np.random.default_rng(SEED + seconds))
        for feature, window in SCALING_FEATURES:
            print(f"  measuring scaling {feature} {seconds} s", file=sys.stderr, flush=True)
            run_mm, anchors = scaling_fns(feature, window, x, torch, librosa, asr_w, asr_sv, knf)
            out = run_mm()
            # correctness first: every anchor against mmcore on this input
            diffs = {name: None if fn is None else max_abs_diff(out, fn())
                     for name, fn in anchors.items()}
            del out
            timed = {"mmcore": run_mm}
            timed.update({name: fn for name, fn in anchors.items() if fn is not None})
            t = T.interleaved(timed, **scaling_timing(seconds, quick))
            rows.append(ScaleRow(feature, seconds, t.pop("mmcore"),
                                 {name: t.get(name) for name in SCALING_ANCHORS}, diffs))
    return rows


def _duration(seconds: int) -> str:
    return f"{seconds // 60} min" if seconds >= 60 else f"{seconds} s"


def print_scaling(rows: List[ScaleRow]) -> None:
    names = {"torch": "torch", "librosa": "librosa", "asrfront": "asrfront", "kaldi": "knf"}
    headers = (["feature", "audio", "mmcore ms", "x realtime", "rounds"]
               + [f"{names[a]} ms" for a in SCALING_ANCHORS]
               + [f"vs {names[a]}" for a in SCALING_ANCHORS])
    table = []
    for r in rows:
        runs = min([r.mm.runs] + [t.runs for t in r.times.values() if t is not None])
        table.append([r.feature, _duration(r.seconds), _ms(r.mm),
                      T.fmt(r.seconds / r.mm.median, ".0f"), runs]
                     + [_ms(r.times[a]) for a in SCALING_ANCHORS]
                     + [_x(_ratio(r.times[a], r.mm)) for a in SCALING_ANCHORS])
    print("Scaling: one clip of 16 kHz speech-like audio, 80 mels / bins; per-call medians")
    T.print_table(headers, table)
    print()
    print("Correctness before timing: max abs difference of each anchor's output from mmcore's "
          f"('!' marks > {TARGET_TOL:g} for Whisper)")
    T.print_table(["feature", "audio", "frames"] + [f"max|d| {names[a]}" for a in SCALING_ANCHORS],
                  [[r.feature, _duration(r.seconds),
                    (r.seconds * SR) // HOP if r.feature.startswith("whisper")
                    else 1 + (r.seconds * SR - N_FFT) // HOP]
                   + [_d(r.diffs[a], TARGET_TOL if r.feature.startswith("whisper") else None)
                      for a in SCALING_ANCHORS] for r in rows])
    print()


def _ratio(anchor: Optional[T.Timing], mm: T.Timing) -> Optional[float]:
    return None if anchor is None else anchor.median / mm.median


def _ms(t: Optional[T.Timing]) -> str:
    return T.fmt(None if t is None else t.median * 1e3, ".2f")


def _x(v: Optional[float]) -> str:
    return T.fmt(v, ".2f") + ("x" if v is not None else "")


def _d(v: Optional[float], tol: Optional[float] = None) -> str:
    s = T.fmt(v, ".1e")
    if v is not None and tol is not None and not v <= tol:
        s += " !"
    return s


def print_main(rows: List[Row], fb_row: Row, ceil: T.Ceilings, torch) -> List[str]:
    """Print the Whisper and fbank tables and the summary; the cases failing the correctness
    check."""
    headers = ["case", "mmcore ms", "x realtime", "torch ms", "librosa ms", "numpy ms",
               "vs torch", "vs librosa", "vs numpy", "max|d| torch", "max|d| librosa",
               "max|d| numpy"]
    table = []
    for r in rows:
        table.append([
            r.case.label, _ms(r.mm), T.fmt(r.seconds_audio / r.mm.median, ".0f"),
            _ms(r.times["torch"]), _ms(r.times["librosa"]), _ms(r.times["numpy"]),
            _x(_ratio(r.times["torch"], r.mm)), _x(_ratio(r.times["librosa"], r.mm)),
            _x(_ratio(r.times["numpy"], r.mm)),
            _d(r.diffs["torch"], TARGET_TOL), _d(r.diffs["librosa"], TARGET_TOL),
            _d(r.diffs["numpy"], TARGET_TOL),
        ])
    print("Whisper log-mel (16 kHz, n_fft 400, hop 160, 3000 frames per clip)")
    T.print_table(headers, table)
    print()
    print("Kaldi fbank (16 kHz, 25 ms / 10 ms, povey window, 80 bins, no dither)")
    T.print_table(["case", "mmcore ms", "x realtime", "kaldi-native-fbank ms", "vs kaldi",
                   "max|d| kaldi"],
                  [[fb_row.case.label, _ms(fb_row.mm),
                    T.fmt(fb_row.seconds_audio / fb_row.mm.median, ".0f"),
                    _ms(fb_row.times["kaldi"]), _x(_ratio(fb_row.times["kaldi"], fb_row.mm)),
                    _d(fb_row.diffs["kaldi"])]])
    print()
    print("vs X = X ms / mmcore ms (> 1: mmcore faster); x realtime = seconds of audio per second "
          "of mmcore time;")
    print("max|d| = max abs difference of mmcore's features from the anchor's (Whisper features "
          f"span ~[-1.5, 1.5]; '!' marks > {TARGET_TOL:g});")
    print("fbank features are natural-log energies of int16-range audio (~0..25), compared "
          "frame by frame.")
    print(f"machine: float32 GEMM {ceil.gemm_gflops:.1f} GFLOP/s, memory copy "
          f"{ceil.copy_gbps:.1f} GB/s; one 30 s clip is {CLIP * 4 / 1e6:.2f} MB in, "
          f"{80 * 3000 * 4 / 1e6:.2f} MB out (80 mels), so a pass at copy bandwidth takes "
          f"{(CLIP + 80 * 3000) * 4 * 2 / (ceil.copy_gbps * 1e9) * 1e3:.3f} ms.")
    print()

    print("summary")
    single = next(r for r in rows if r.case.batch == 0 and r.case.n_mels == 80)
    batch = next(r for r in rows if r.case.batch > 0)
    for name, target in (("torch", TARGET_TORCH), ("librosa", TARGET_LIBROSA)):
        parts = []
        for label, r in (("single clip", single), ("batch of 16", batch)):
            sp = _ratio(r.times[name], r.mm)
            if sp is None:
                parts.append(f"{label} n/a")
            else:
                parts.append(f"{label} {sp:.2f}x ({'meets' if sp >= target else 'BELOW'} "
                             f"target >= {target:g}x)")
        print(f"  speedup vs {name:<8}: " + "; ".join(parts))
    sp_k = _ratio(fb_row.times["kaldi"], fb_row.mm)
    print(f"  speedup vs kaldi-native-fbank: {_x(sp_k)}")

    check_name = "torch" if torch is not None else "numpy"
    worst = max((r.diffs[check_name] for r in rows), key=lambda d: -1.0 if d is None else d)
    print(f"  max abs diff vs the {check_name} Whisper formula over all cases: {worst:.2e} "
          f"(target <= {TARGET_TOL:g}, fails > {FAIL_TOL:g})")
    if torch is None:
        print("  (torch is not installed: the correctness check uses the NumPy formula instead)")
    failed = [r.case.label for r in rows
              if r.diffs[check_name] is None or not r.diffs[check_name] <= FAIL_TOL]
    if failed:
        print(f"  CORRECTNESS CHECK FAILED (max abs diff > {FAIL_TOL:g} vs {check_name}) on: "
              + ", ".join(failed))
    else:
        print(f"  correctness check: every case within {FAIL_TOL:g} of the {check_name} formula")
    print()
    return failed


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    T.add_common_args(parser)
    parser.set_defaults(threads=DEFAULT_THREADS)
    for action in parser._actions:
        if action.dest == "threads":
            action.help = ("threads for mmcore, torch and (with threadpoolctl) numpy's BLAS "
                           f"(default: {DEFAULT_THREADS}, a data-loader worker)")
    parser.add_argument("--only", choices=("main", "scaling"), default=None,
                        help="run only the 30 s tables (main) or only the scaling table")
    args = parser.parse_args(argv)

    torch = T.optional_import("torch")
    librosa = T.optional_import("librosa")
    knf = T.optional_import("kaldi_native_fbank")
    asr_w, asr_sv = asrfront_modules() if args.only != "main" else (None, None)
    asrfront = sys.modules.get("asrfront") if asr_w or asr_sv else None
    threads = T.configure_threads(args.threads, torch)
    tkw = (dict(warmup=1, repeat=3, min_time=0.0) if args.quick
           else dict(warmup=2, repeat=9, min_time=0.5, max_repeat=200))
    versions = "; ".join(f"{name} {getattr(mod, '__version__', '?') if mod else 'not installed'}"
                         for name, mod in (("librosa", librosa), ("kaldi-native-fbank", knf),
                                           ("asrfront", asrfront)))
    T.print_header("mmcore audio features vs torch (Whisper formula) / librosa / NumPy / Kaldi "
                   "/ asrfront (float32, CPU)", threads_info=threads, torch=torch,
                   backend=args.backend,
                   extra={"anchors": versions,
                          "timing": f"main tables: median of >= {tkw['repeat']} interleaved "
                                    f"rounds (mmcore and its anchors) after {tkw['warmup']} "
                                    f"warm-up(s), >= {tkw['min_time']} s per measurement"
                                    + (" (--quick)" if args.quick else "")
                                    + "; scaling table: median of >= 7 rounds"})
    ceil = T.machine_ceilings(repeat=3 if args.quick else 5)
    print()

    failed: List[str] = []
    try:
        with mmcore.use_backend(args.backend):
            if args.only != "scaling":
                rng = np.random.default_rng(SEED)
                base = speech_like(CLIP, rng)
                rows: List[Row] = []
                for case in CASES:
                    print(f"  measuring {case.label:<22} {case.note}", file=sys.stderr,
                          flush=True)
                    rows.append(run_whisper_case(case, make_input(case, base, rng), torch,
                                                 librosa, tkw))
                print("  measuring fbank vs kaldi-native-fbank", file=sys.stderr, flush=True)
                fb_row = run_fbank_case(base, knf, tkw)
                failed += print_main(rows, fb_row, ceil, torch)
            if args.only != "main":
                srows = run_scaling(torch, librosa, asr_w, asr_sv, knf, args.quick)
                print_scaling(srows)
                for r in srows:
                    d = r.diffs["torch"]
                    if r.feature.startswith("whisper") and d is not None and not d <= FAIL_TOL:
                        failed.append(f"scaling {r.feature} {_duration(r.seconds)}")
    except mmcore.errors.BackendError as exc:
        print(f"backend {args.backend!r} cannot run the audio ops: {exc}")
        T.print_footer()
        return 2
    if failed:
        print(f"CORRECTNESS CHECK FAILED (max abs diff > {FAIL_TOL:g} vs the Whisper formula) "
              "on: " + ", ".join(failed))
    T.print_footer()
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
