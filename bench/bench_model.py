"""End-to-end latency of ``MultiModalModel.infer`` on the default model, per stage.

The model is :func:`mmcore.model.default_model` (untrained, all four modalities, text -> image
cross-attention and attention fusion), with its per-item cache off so that every call runs
every stage (``bench/bench_cache.py`` measures the cache). The inputs are generated (see
:mod:`mmcore.demo`): a caption, a 480 x 640 RGB image, a 2 s 16 kHz chirp and an 8-frame
64 x 64 clip per batch item. For batch 1 and batch 8 the script measures two variants:

* ``raw``: the raw inputs, so ``infer`` runs the preprocessors (tokenizer, image resize /
  crop / normalize, log-mel, frame sampling) and then the encoders and the fusion;
* ``pre``: the same inputs preprocessed once up front (the dicts the preprocessors return),
  so ``infer`` only encodes and fuses.

It prints, per variant, the p50 of every stage reported by ``model.stats()``
(``preprocess:<m>``, ``encode:<m>``, ``fusion``, ``total``), the median wall time of the whole
call measured from outside, and where the time goes: one more series of calls runs under
``cProfile`` and each function's own time is attributed to

* ``kernels``: the native functions of ``mmcore._C`` (and ``mmcore._cuda``);
* ``ops``: the Python wrappers in ``mmcore/ops`` and backend dispatch (argument checks,
  dtype / layout conversion);
* ``numpy``: NumPy functions and methods called as functions;
* ``glue``: everything else -- the model, layers, encoders and preprocessors in Python,
  including NumPy arithmetic written as operators inside them (``x @ w``, ``x * s``), which the
  profiler cannot separate from the calling function.

The profiler adds overhead to every Python call, so the ``glue`` share is an upper bound and
the ``kernels`` share a lower bound; the per-stage times come from unprofiled calls.

Usage::

    python bench/bench_model.py [--quick] [--threads N] [--backend native|numba]
"""

from __future__ import annotations

import argparse
import cProfile
import functools
import os
import pstats
import sys
from typing import Dict, List, NamedTuple

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _timing as T  # noqa: E402

try:
    import mmcore  # noqa: E402
    from mmcore import preprocess as P  # noqa: E402
    from mmcore.demo import demo_inputs  # noqa: E402
    from mmcore.model import default_model  # noqa: E402
except ImportError as _exc:  # pragma: no cover - not installed
    raise SystemExit(f"mmcore is not importable ({_exc}); build and install it first: "
                     "pip install --no-build-isolation -Cbuild-dir=build -e .") from _exc

BATCHES = (1, 8)
VARIANTS = ("raw", "pre")  # with preprocessing / preprocessed up front
SEED = 0
_OPS_DIR = os.path.join(os.path.dirname(os.path.abspath(mmcore.__file__)), "ops") + os.sep
_BACKEND_FILE = os.path.join(os.path.dirname(os.path.abspath(mmcore.__file__)), "_backend.py")
CATEGORIES = ("kernels", "ops", "numpy", "glue")


def preprocess_inputs(model, raw: Dict[str, object]) -> Dict[str, dict]:
    """Run each modality's preprocessor (built from the model's config) once."""
    out = {}
    for name, value in raw.items():
        pre = model.config.modalities[mmcore.Modality(name)].preprocessing
        if name == "text":
            proc = P.TextPreprocessor.from_config(pre)
        elif name == "image":
            proc = P.ImagePreprocessor(pre)
        elif name == "audio":
            proc = P.AudioPreprocessor(pre)
        else:
            proc = P.VideoPreprocessor(pre.replace(patch_size=None)
                                       if pre.patch_size is not None else pre)
        if name == "video":       # one clip per call; same frame count, so a plain stack
            out[name] = {"pixel_values": np.stack([proc(c)["pixel_values"] for c in value])}
        else:
            out[name] = dict(proc(value))
    return out


def categorize(key) -> str:
    filename, _, func = key
    if filename == "~":
        if "mmcore._C." in func or "mmcore._cuda." in func:
            return "kernels"
        if "numpy" in func:
            return "numpy"
        return "glue"
    if filename.startswith(_OPS_DIR) or filename == _BACKEND_FILE:
        return "ops"
    if os.sep + "numpy" + os.sep in filename:
        return "numpy"
    return "glue"


def profile_shares(fn, calls: int) -> Dict[str, float]:
    """Seconds of own time per category over ``calls`` profiled calls of ``fn``."""
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(calls):
        fn()
    prof.disable()
    shares = dict.fromkeys(CATEGORIES, 0.0)
    for key, (_cc, _nc, tottime, _ct, _callers) in pstats.Stats(prof).stats.items():
        shares[categorize(key)] += tottime
    return shares


class Result(NamedTuple):
    batch: int
    variant: str
    stages: Dict[str, float]      # stage -> p50 seconds
    wall: T.Timing
    shares: Dict[str, float]      # category -> seconds (profiled)


def run_batch(batch: int, args, tkw, profile_calls: int) -> List[Result]:
    """Both variants of one batch size, timed interleaved (raw, pre, raw, pre, ...)."""
    raw = demo_inputs(batch, seed=SEED)
    models, calls = {}, {}
    for variant in VARIANTS:
        # every call computes (the cache is measured by bench_cache.py); one model per variant
        # keeps each variant's per-stage statistics apart
        model = default_model(seed=SEED, cache=False, embed_dim=args.embed_dim,
                              num_layers=args.layers, num_heads=args.heads)
        inputs = raw if variant == "raw" else preprocess_inputs(model, raw)
        models[variant] = model
        calls[variant] = functools.partial(model.infer, inputs)
    with mmcore.use_backend(args.backend):
        for variant in VARIANTS:
            for _ in range(tkw["warmup"]):
                calls[variant]()
            models[variant].reset_stats()
        walls = T.interleaved(calls, **dict(tkw, warmup=0))
        results = []
        for variant in VARIANTS:
            snap = models[variant].stats()
            shares = profile_shares(calls[variant], profile_calls)
            stages = {k: v["p50_s"] for k, v in snap.items()}
            results.append(Result(batch, variant, stages, walls[variant], shares))
    return results


def stage_order(results: List[Result]) -> List[str]:
    keys: List[str] = []
    for r in results:
        for k in r.stages:
            if k not in keys:
                keys.append(k)
    pre = [k for k in keys if k.startswith("preprocess:")]
    enc = [k for k in keys if k.startswith("encode:")]
    rest = [k for k in keys if k not in pre and k not in enc and k != "total"]
    return pre + enc + rest + (["total"] if "total" in keys else [])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    T.add_common_args(parser)
    parser.add_argument("--embed-dim", type=int, default=64,
                        help="encoder width of the default model (default: %(default)s)")
    parser.add_argument("--layers", type=int, default=2,
                        help="encoder layers per modality (default: %(default)s)")
    parser.add_argument("--heads", type=int, default=4,
                        help="attention heads (default: %(default)s)")
    args = parser.parse_args(argv)

    threads = T.configure_threads(args.threads)
    tkw = (dict(warmup=2, repeat=5, min_time=0.0) if args.quick
           else dict(warmup=5, repeat=30, min_time=0.5, max_repeat=500))
    profile_calls = 3 if args.quick else 20
    T.print_header(f"MultiModalModel.infer on default_model (embed_dim {args.embed_dim}, "
                   f"{args.layers} layers, {args.heads} heads): per-stage latency (float32, CPU)",
                   threads_info=threads, backend=args.backend,
                   extra={"timing": f"p50 of >= {tkw['repeat']} calls after {tkw['warmup']} "
                                    "warm-up(s), raw and pre interleaved per batch; "
                                    f">= {tkw['min_time']} s per measurement; "
                                    f"shares from {profile_calls} cProfile'd calls"
                                    + (" (--quick)" if args.quick else ""),
                          "inputs": "text + uint8 480x640x3 image + 2 s 16 kHz chirp + "
                                    "8x64x64x3 clip per item; raw = with preprocessing, "
                                    "pre = preprocessed up front"})
    ceil = T.machine_ceilings(repeat=3 if args.quick else 5)
    print()

    results: List[Result] = []
    for batch in BATCHES:
        print(f"  measuring batch {batch} {' and '.join(VARIANTS)}", file=sys.stderr, flush=True)
        results.extend(run_batch(batch, args, tkw, profile_calls))

    print("per-stage p50 (ms)")
    stages = stage_order(results)
    headers = ["stage"] + [f"B={r.batch} {r.variant}" for r in results]
    rows = [[s] + [T.fmt(r.stages[s] * 1e3 if s in r.stages else None, ".3f") for r in results]
            for s in stages]
    rows.append(["wall (outside)"] + [T.fmt(r.wall.median * 1e3, ".3f") for r in results])
    rows.append(["ms per item"] + [T.fmt(r.wall.median * 1e3 / r.batch, ".3f") for r in results])
    T.print_table(headers, rows)
    print()

    print("where the time goes (own time under cProfile, % of the profiled total)")
    headers = ["category"] + [f"B={r.batch} {r.variant}" for r in results]
    rows = []
    for c in CATEGORIES:
        rows.append([c] + [T.fmt(100.0 * r.shares[c] / max(sum(r.shares.values()), 1e-12), ".1f")
                           for r in results])
    rows.append(["kernels+ops"] + [T.fmt(100.0 * (r.shares["kernels"] + r.shares["ops"])
                                         / max(sum(r.shares.values()), 1e-12), ".1f")
                                   for r in results])
    T.print_table(headers, rows)
    print()
    print("kernels = mmcore._C native functions; ops = mmcore/ops Python wrappers and backend "
          "dispatch; numpy = NumPy functions;")
    print("glue = model / layers / preprocessors in Python, including NumPy operators inline "
          "(x @ w). Profiling inflates glue.")
    print()

    print("summary")
    for r in results:
        tot = sum(r.shares.values()) or 1e-12
        total_ms = r.stages.get('total', float('nan')) * 1e3
        print(f"  batch {r.batch} {r.variant}: total p50 {total_ms:.3f} ms "
              f"({r.wall.median * 1e3 / r.batch:.3f} ms/item); inside mmcore kernels "
              f"{100.0 * r.shares['kernels'] / tot:.1f}% (+ops wrappers "
              f"{100.0 * r.shares['ops'] / tot:.1f}%), Python glue and NumPy "
              f"{100.0 * (r.shares['glue'] + r.shares['numpy']) / tot:.1f}%")
    for r in results:
        if r.variant == "raw" and r.stages.get("total"):
            pre_s = sum(v for k, v in r.stages.items() if k.startswith("preprocess:"))
            print(f"  preprocessing share of the raw total at batch {r.batch}: "
                  f"{100.0 * pre_s / r.stages['total']:.1f}% (sum of per-stage p50s)")
    print(f"  machine: float32 GEMM {ceil.gemm_gflops:.1f} GFLOP/s")
    T.print_footer()
    return 0


if __name__ == "__main__":
    sys.exit(main())
