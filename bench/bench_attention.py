"""Benchmark ``mmcore.ops.attention`` (float32, CPU) against PyTorch SDPA and plain NumPy.

For each shape (B, H, Lq, Lk, D) -- cross-modal shapes (text queries over image patches or audio
frames), a square self-attention shape, a decode-like single query, and a padded-keys variant --
the script prints, measured side by side in one process:

* mmcore time (ms), GFLOP/s (``4 * B * H * Lq * Lk * D / time``) and that as a % of the
  machine's float32 GEMM GFLOP/s (numpy's BLAS, measured at start-up);
* ``torch.nn.functional.scaled_dot_product_attention`` time and GFLOP/s (on
  ``torch.from_numpy`` views of the same arrays, under ``torch.inference_mode()``);
* a plain NumPy implementation (``q @ k^T * scale``, softmax with max subtraction, ``@ v``);
* the speedups ``torch_time / mmcore_time`` and ``numpy_time / mmcore_time``;
* the max abs difference of mmcore's output against torch's and NumPy's, a spot check that
  catches a broken kernel (the script exits with status 1 if one exceeds the tolerance).

The padded variant gives mmcore ``key_lengths=`` (its fast path), torch an equivalent boolean
``attn_mask`` of shape (B, 1, 1, Lk) and NumPy the same mask through ``where(mask, s, -inf)``.
Its GFLOP/s count all Lk keys, padded ones included, so the three stay comparable.

Usage::

    python bench/bench_attention.py [--quick] [--threads N] [--backend native|numba]

Missing torch: its columns print ``n/a`` and the rest still runs.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from typing import List, NamedTuple, Optional

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _timing as T  # noqa: E402

try:
    from mmcore.ops import attention  # noqa: E402
except ImportError as _exc:  # pragma: no cover - not installed
    raise SystemExit(f"mmcore is not importable ({_exc}); build and install it first: "
                     "pip install --no-build-isolation -Cbuild-dir=build -e .") from _exc


class Case(NamedTuple):
    B: int
    H: int
    Lq: int
    Lk: int
    D: int
    padded: bool = False   # random key_lengths in [Lk/2, Lk]
    note: str = ""

    @property
    def label(self) -> str:
        s = f"{self.B}x{self.H}x{self.Lq}x{self.Lk}x{self.D}"
        return s + " +kl" if self.padded else s

    @property
    def flops(self) -> float:
        return 4.0 * self.B * self.H * self.Lq * self.Lk * self.D


CASES = [
    Case(1, 8, 77, 577, 64, note="text over ViT-L/14@336 patches, batch 1"),
    Case(8, 8, 77, 577, 64, note="text over ViT patches, batch 8"),
    Case(4, 12, 256, 1024, 64, note="256 queries over 1024 keys"),
    Case(8, 8, 32, 1500, 64, note="32 queries over Whisper encoder frames"),
    Case(2, 16, 1024, 1024, 64, note="square self-attention (largest)"),
    Case(8, 8, 77, 577, 64, padded=True, note="padded keys: key_lengths / bool mask"),
    Case(8, 8, 1, 1500, 64, note="decode-like: one query over 1500 keys"),
]
LARGEST = (2, 16, 1024, 1024, 64)  # (B, H, Lq, Lk, D) reported as % of GEMM in the summary

SEED = 1234
ATOL = 1e-3  # outputs are convex combinations of N(0, 1) values: a working kernel is ~1e-6 off


def make_inputs(case: Case, rng: np.random.Generator):
    shape_q = (case.B, case.H, case.Lq, case.D)
    shape_k = (case.B, case.H, case.Lk, case.D)
    q = rng.standard_normal(shape_q, dtype=np.float32)
    k = rng.standard_normal(shape_k, dtype=np.float32)
    v = rng.standard_normal(shape_k, dtype=np.float32)
    key_lengths = mask = None
    if case.padded:
        key_lengths = rng.integers(case.Lk // 2, case.Lk + 1, size=case.B).astype(np.int64)
        # (B, 1, 1, Lk), True = may attend: the PyTorch SDPA convention
        mask = (np.arange(case.Lk)[None, :] < key_lengths[:, None])[:, None, None, :]
    return q, k, v, key_lengths, mask


def numpy_attention(q, k, v, scale, mask=None):
    """Plain NumPy float32 attention: scores, softmax with max subtraction, weighted sum."""
    s = (q @ k.swapaxes(-1, -2)) * np.float32(scale)
    if mask is not None:
        s = np.where(mask, s, np.float32(-np.inf))
    s -= s.max(axis=-1, keepdims=True)
    np.exp(s, out=s)
    s /= s.sum(axis=-1, keepdims=True)
    return s @ v


class Row(NamedTuple):
    case: Case
    mm: T.Timing
    th: Optional[T.Timing]
    npy: T.Timing
    diff_torch: Optional[float]
    diff_numpy: float


def run_case(case: Case, args, torch, rng, tkw) -> Row:
    q, k, v, key_lengths, mask = make_inputs(case, rng)
    scale = 1.0 / math.sqrt(case.D)
    backend = args.backend

    def run_mm():
        return attention(q, k, v, key_lengths=key_lengths, backend=backend)

    def run_np():
        return numpy_attention(q, k, v, scale, mask)

    out_mm = run_mm()  # also compiles the numba backend before it is timed
    out_np = run_np()
    diff_np = float(np.max(np.abs(out_mm - out_np))) if out_mm.size else 0.0

    fns = {"mm": run_mm, "np": run_np}
    diff_th = None
    if torch is not None:
        F = torch.nn.functional
        tq, tk, tv = (torch.from_numpy(a) for a in (q, k, v))
        tmask = torch.from_numpy(np.ascontiguousarray(mask)) if mask is not None else None

        def run_th():
            with torch.inference_mode():
                return F.scaled_dot_product_attention(tq, tk, tv, attn_mask=tmask, scale=scale)

        out_th = run_th().numpy()
        diff_th = float(np.max(np.abs(out_mm - out_th))) if out_mm.size else 0.0
        fns["th"] = run_th

    t = T.interleaved(fns, **tkw)
    return Row(case, t["mm"], t.get("th"), t["np"], diff_th, diff_np)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    T.add_common_args(parser)
    args = parser.parse_args(argv)

    torch = T.optional_import("torch")
    threads = T.configure_threads(args.threads, torch)
    tkw = (dict(warmup=1, repeat=3, min_time=0.0) if args.quick
           else dict(warmup=2, repeat=9, min_time=0.5, max_repeat=200))
    T.print_header("mmcore.ops.attention vs torch SDPA vs NumPy (float32, CPU)",
                   threads_info=threads, torch=torch, backend=args.backend,
                   extra={"timing": f"median of >= {tkw['repeat']} interleaved rounds (mmcore, "
                                    f"torch, numpy) after {tkw['warmup']} "
                                    f"warm-up(s), >= {tkw['min_time']} s per measurement"
                                    + (" (--quick)" if args.quick else "")})
    ceil = T.machine_ceilings(repeat=3 if args.quick else 5)
    print()

    rng = np.random.default_rng(SEED)
    rows: List[Row] = []
    for case in CASES:
        print(f"  measuring {case.label:<20} {case.note}", file=sys.stderr, flush=True)
        rows.append(run_case(case, args, torch, rng, tkw))

    def gf(case: Case, t: Optional[T.Timing]) -> Optional[float]:
        return None if t is None else case.flops / t.median / 1e9

    headers = ["B x H x Lq x Lk x D", "mmcore ms", "GFLOP/s", "%GEMM", "torch ms", "GFLOP/s",
               "numpy ms", "GFLOP/s", "vs torch", "vs numpy", "max|d| torch", "max|d| numpy"]
    table = []
    speedups_torch = []
    failed = []
    for r in rows:
        g_mm = gf(r.case, r.mm)
        sp_th = r.th.median / r.mm.median if r.th is not None else None
        sp_np = r.npy.median / r.mm.median
        if sp_th is not None:
            speedups_torch.append((sp_th, r.case))
        bad = [d for d in (r.diff_torch, r.diff_numpy) if d is not None and not d <= ATOL]
        if bad:
            failed.append(r.case)
        table.append([
            r.case.label,
            T.fmt(r.mm.median * 1e3, ".3f"),
            T.fmt(g_mm, ".1f"),
            T.fmt(100.0 * g_mm / ceil.gemm_gflops, ".1f"),
            T.fmt(r.th.median * 1e3 if r.th else None, ".3f"),
            T.fmt(gf(r.case, r.th), ".1f"),
            T.fmt(r.npy.median * 1e3, ".3f"),
            T.fmt(gf(r.case, r.npy), ".1f"),
            T.fmt(sp_th, ".2f") + ("x" if sp_th is not None else ""),
            T.fmt(sp_np, ".2f") + "x",
            T.fmt(r.diff_torch, ".1e") + (" !" if r.diff_torch is not None
                                          and not r.diff_torch <= ATOL else ""),
            T.fmt(r.diff_numpy, ".1e") + (" !" if not r.diff_numpy <= ATOL else ""),
        ])
    T.print_table(headers, table)
    print()
    print("GFLOP/s = 4*B*H*Lq*Lk*D / median time (padded keys counted for +kl);"
          f" %GEMM = mmcore GFLOP/s / {ceil.gemm_gflops:.1f} GFLOP/s numpy float32 GEMM;")
    print("vs torch = torch ms / mmcore ms, vs numpy = numpy ms / mmcore ms (> 1: mmcore faster);"
          " +kl = key_lengths in [Lk/2, Lk] (torch/numpy: bool mask (B,1,1,Lk)).")
    print()

    print("summary")
    if speedups_torch:
        gm = T.geomean([s for s, _ in speedups_torch])
        worst, worst_case = min(speedups_torch, key=lambda t: t[0])
        print(f"  geometric mean speedup vs torch SDPA over {len(speedups_torch)} shapes: "
              f"{gm:.2f}x")
        target = [s for s, c in speedups_torch if not c.note.startswith("decode")]
        if len(target) != len(speedups_torch):
            print(f"  geometric mean speedup vs torch SDPA over the {len(target)} target shapes "
                  f"(all but decode-like): {T.geomean(target):.2f}x")
        print(f"  minimum speedup vs torch SDPA: {worst:.2f}x  ({worst_case.label})")
    else:
        print("  speedup vs torch SDPA: n/a (torch not installed)")
    gm_np = T.geomean([r.npy.median / r.mm.median for r in rows])
    print(f"  geometric mean speedup vs NumPy over {len(rows)} shapes: {gm_np:.2f}x")
    big = next((r for r in rows if tuple(r.case[:5]) == LARGEST and not r.case.padded), None)
    if big is not None:
        g_big = gf(big.case, big.mm)
        print(f"  largest shape {big.case.label}: mmcore {g_big:.1f} GFLOP/s = "
              f"{100.0 * g_big / ceil.gemm_gflops:.1f}% of float32 GEMM "
              f"({ceil.gemm_gflops:.1f} GFLOP/s)")
    if failed:
        print(f"  CORRECTNESS CHECK FAILED (max abs diff > {ATOL:g}) on: "
              + ", ".join(c.label for c in failed))
    else:
        print(f"  correctness spot check: all shapes within max abs diff {ATOL:g}")
    T.print_footer()
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
