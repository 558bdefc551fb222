"""Per-call time of mmcore's hot ops on small inputs (float32, CPU), against their anchors.

On short inputs the fixed cost of a call (argument checks, backend choice, plan and table
lookups, allocations, the binding) is most of the time, so this script reports microseconds
per call, median of interleaved rounds (``_timing.interleaved``, each sample the mean of many
calls):

* Whisper log-mel (16 kHz, ``n_fft=400``, ``hop_length=160``, 80 mels) of 0.1 s (1600 samples)
  and 1 s (16000 samples) of one signal:

  - mmcore: ``mmcore.ops.log_mel_spectrogram(x)``;
  - asrfront (when installed): ``asrfront.whisper.log_mel(x, pad_or_trim=False)``, a C front
    end computing the same features;
  - librosa (when installed): ``librosa.feature.melspectrogram(y=x, sr=16000, n_fft=400,
    hop_length=160, n_mels=80, center=True, pad_mode="reflect", power=2.0)``, the last frame
    dropped, then Whisper's log10 / floor / scale in NumPy;
  - torch (when installed): openai-whisper's formula, ``torch.stft(..., return_complex=True)``,
    ``[..., :-1].abs() ** 2``, ``filters @ mag``, ``clamp(min=1e-10).log10()``, ``maximum(y,
    y.max() - 8)``, ``(y + 4) / 4`` under ``torch.inference_mode()``, filters built once;

  and the max abs difference of mmcore against each (the features lie in about [-1.5, 1.5]).

* ``mmcore.ops.fuse`` against NumPy on small batches: the small-input table of
  ``bench_fusion.py`` (batch 1, 2 and 8).

Usage::

    python bench/bench_percall.py [--quick] [--threads N] [--backend native|numba]

Any anchor that is not installed prints ``n/a`` and the rest still runs.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Callable, Dict, Optional

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _timing as T  # noqa: E402
import bench_fusion  # noqa: E402

try:
    from mmcore.ops import log_mel_spectrogram, mel_filterbank  # noqa: E402
except ImportError as _exc:  # pragma: no cover - not installed
    raise SystemExit(f"mmcore is not importable ({_exc}); build and install it first: "
                     "pip install --no-build-isolation -Cbuild-dir=build -e .") from _exc

SR = 16000
N_FFT = 400
HOP = 160
N_MELS = 80
DURATIONS = (0.1, 1.0)     # seconds of audio per call
SEED = 1234
CALLS = {0.1: 200, 1.0: 50}  # calls per timed sample


def _whisper_norm_np(mel: np.ndarray) -> np.ndarray:
    y = np.log10(np.maximum(mel, 1e-10))
    y = np.maximum(y, y.max() - 8.0)
    return ((y + 4.0) / 4.0).astype(np.float32)


def anchors(x: np.ndarray, torch, librosa,
            asrfront) -> Dict[str, Optional[Callable[[], np.ndarray]]]:
    """The anchors' calls on the 1-D signal ``x`` (None when not installed)."""
    fns: Dict[str, Optional[Callable[[], np.ndarray]]] = {"asrfront": None, "librosa": None,
                                                          "torch": None}
    if asrfront is not None:
        fns["asrfront"] = lambda: asrfront.log_mel(x, n_mels=N_MELS, pad_or_trim=False)
    if librosa is not None:
        def run_librosa():
            mel = librosa.feature.melspectrogram(y=x, sr=SR, n_fft=N_FFT, hop_length=HOP,
                                                 n_mels=N_MELS, center=True, pad_mode="reflect",
                                                 power=2.0)[:, :-1]
            return _whisper_norm_np(mel)
        fns["librosa"] = run_librosa
    if torch is not None:
        window = torch.hann_window(N_FFT)
        filters = torch.from_numpy(mel_filterbank(sr=SR, n_fft=N_FFT, n_mels=N_MELS))
        tx = torch.from_numpy(x)

        def run_torch():
            with torch.inference_mode():
                stft = torch.stft(tx, N_FFT, HOP, window=window, return_complex=True)
                mag = stft[..., :-1].abs() ** 2
                y = torch.clamp(filters @ mag, min=1e-10).log10()
                y = torch.maximum(y, y.max() - 8.0)
                return ((y + 4.0) / 4.0).numpy()
        fns["torch"] = run_torch
    return fns


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    T.add_common_args(parser)
    args = parser.parse_args(argv)

    torch = T.optional_import("torch")
    librosa = T.optional_import("librosa")
    asr = T.optional_import("asrfront.whisper")
    threads = T.configure_threads(args.threads, torch)
    tkw = (dict(warmup=1, repeat=3, min_time=0.0) if args.quick
           else dict(warmup=3, repeat=9, min_time=0.3, max_repeat=60))
    T.print_header("mmcore per-call time on small inputs: Whisper log-mel vs asrfront, librosa, "
                   "torch; fuse vs NumPy (float32, CPU)",
                   threads_info=threads, torch=torch, backend=args.backend,
                   extra={"timing": f"median of >= {tkw['repeat']} interleaved rounds after "
                                    f"{tkw['warmup']} warm-up(s), each sample the mean of "
                                    "many calls" + (" (--quick)" if args.quick else "")})
    T.machine_ceilings(repeat=3 if args.quick else 5)
    print()

    rng = np.random.default_rng(SEED)
    headers = ["log-mel (80 mels)", "mmcore us", "asrfront us", "librosa us", "torch us",
               "vs asrfront", "|d| asrfront", "|d| torch"]
    table = []
    worst = 0.0
    for dur in DURATIONS:
        n = int(round(dur * SR))
        x = (0.1 * rng.standard_normal(n)).astype(np.float32)
        print(f"  measuring log-mel {dur:g} s", file=sys.stderr, flush=True)
        ref = log_mel_spectrogram(x, backend=args.backend)
        fns: Dict[str, Callable[[], np.ndarray]] = {
            "mmcore": lambda x=x: log_mel_spectrogram(x, backend=args.backend)}
        diffs: Dict[str, Optional[float]] = {}
        for name, fn in anchors(x, torch, librosa, asr).items():
            if fn is None:
                diffs[name] = None
                continue
            fns[name] = fn
            got = np.asarray(fn(), np.float64)
            diffs[name] = (float(np.abs(got - ref).max()) if got.shape == ref.shape
                           else float("inf"))
        for name in ("asrfront", "torch"):
            if diffs.get(name) is not None:
                worst = max(worst, float(diffs[name] or 0.0))
        t = T.interleaved(fns, number=CALLS[dur], **tkw)

        def us(name: str, t=t) -> Optional[float]:
            return t[name].median * 1e6 if name in t else None

        ratio = (t["asrfront"].median / t["mmcore"].median) if "asrfront" in t else None
        table.append([f"{dur:g} s ({n} samples)", T.fmt(us("mmcore"), ".1f"),
                      T.fmt(us("asrfront"), ".1f"), T.fmt(us("librosa"), ".1f"),
                      T.fmt(us("torch"), ".1f"),
                      T.fmt(ratio, ".2f") + ("x" if ratio is not None else ""),
                      T.fmt(diffs.get("asrfront"), ".1e"), T.fmt(diffs.get("torch"), ".1e")])
    T.print_table(headers, table)
    print("us = median per-call time (one 1-D float32 signal in, a new (80, frames) array out); "
          "vs asrfront = asrfront us / mmcore us (> 1: mmcore faster);")
    print("|d| = max abs difference from mmcore's features.")
    print()

    print("  measuring fuse", file=sys.stderr, flush=True)
    bench_fusion.print_small_table(bench_fusion.small_rows(args.backend, dict(tkw, min_time=0.0
                                                                              if args.quick
                                                                              else 0.2)))
    T.print_footer()
    if worst > 1e-3:
        print(f"CORRECTNESS CHECK FAILED: mmcore differs from an anchor by {worst:.1e} > 1e-3")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
