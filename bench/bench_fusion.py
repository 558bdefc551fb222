"""Benchmark the fusion reductions (``masked_mean``, ``masked_max``, ``fuse``; float32, CPU)
against the machine's memory bandwidth, plain NumPy and PyTorch.

The reductions are memory-bound: each input value is used once, for an add or a max. So the
measure is effective bandwidth,

    GB/s = (bytes that must be read + bytes written) / median time,

where the bytes that must be read are those of the real tokens (or present modalities) plus the
mask and, for attention, the query; padding and absent modalities need not be read and are not
counted (mmcore skips them). The script compares that with the machine's memory copy bandwidth
measured in the same run (``np.copyto`` of 256 MB, read + write bytes, see
``_timing.machine_ceilings``); the target is >= 70% of it on inputs well beyond the caches.

Side by side, in one process, for each case:

* mmcore time (ms), GB/s and % of the copy bandwidth;
* a plain NumPy implementation (``(x * mask[..., None]).sum(1) / count``,
  ``np.where(mask, x, -inf).max(1)``, ``einsum`` for the weighted sums) and PyTorch's equivalent
  (``torch.from_numpy`` views, under ``torch.inference_mode()``), with their times and the
  speedups ``anchor_time / mmcore_time``;
* the max abs difference of mmcore's output against NumPy's (and torch's), relative to the data
  scale, a spot check that catches a broken kernel (exit status 1 if one exceeds the tolerance);
* mmcore is timed through the public ops writing into an output allocated once (``out=``),
  as the copy ceiling (``np.copyto``) writes into an existing array: a fresh output would add
  the page faults of its first write. With the native backend, also the kernel alone
  (``mmcore._C`` called directly): the difference is the Python wrapper (argument checks).

Default sizes: masked_mean / masked_max of (64, 1024, 1024) float32 (256 MB, ~30% padding, and
without a mask), fuse of (65536, 4, 1024) float32 (1 GB; ~10% of modalities absent) for mean,
max, weighted and attention, and concat of (16384, 4, 1024). About 2 GB at most are allocated
at once (the 1 GB input, the anchors' temporaries and the outputs). ``--quick`` divides the
batch sizes by 16.

Small inputs (``--small``, and after the bandwidth table of every run): the per-call time
(us) of ``fuse`` at batch 1, 2 and 8 on small shapes (2 to 4 modalities of 64 to 768 values)
against the NumPy one-liner of the same result (``x.mean(1)``, ``x.max(1)``,
``x.reshape(B, M * D).copy()``, and ``np.stack(items, 1).mean(1)`` for a list of per-modality
arrays). Here the fixed cost of a call (argument checks, backend choice, the binding) is
what is measured, not bandwidth: the data fit in L1.

Usage::

    python bench/bench_fusion.py [--quick] [--small] [--threads N] [--backend native|numba]

Missing torch: its columns print ``n/a`` and the rest still runs.
"""

from __future__ import annotations

import argparse
import gc
import math
import os
import sys
from typing import Callable, List, NamedTuple, Optional, Tuple

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _timing as T  # noqa: E402

try:
    from mmcore.ops import fuse, masked_max, masked_mean  # noqa: E402
except ImportError as _exc:  # pragma: no cover - not installed
    raise SystemExit(f"mmcore is not importable ({_exc}); build and install it first: "
                     "pip install --no-build-isolation -Cbuild-dir=build -e .") from _exc


class Case(NamedTuple):
    op: str            # "masked_mean", "masked_max" or "fuse:<strategy>"
    shape: Tuple[int, int, int]   # (B, L, D) or (B, M, D)
    missing: float     # fraction of padding tokens / absent modalities (0: no mask at all)
    note: str = ""

    @property
    def label(self) -> str:
        s = f"{self.op} {'x'.join(map(str, self.shape))}"
        return s + (f" -{round(100 * self.missing)}%" if self.missing else "")


CASES = [
    Case("masked_mean", (64, 1024, 1024), 0.3, "padded tokens (right padding)"),
    Case("masked_mean", (64, 1024, 1024), 0.0, "no mask"),
    Case("masked_max", (64, 1024, 1024), 0.3, "padded tokens (right padding)"),
    Case("fuse:mean", (65536, 4, 1024), 0.1, "absent modalities"),
    Case("fuse:max", (65536, 4, 1024), 0.1, "absent modalities"),
    Case("fuse:weighted", (65536, 4, 1024), 0.1, "weights (M,), renormalized"),
    Case("fuse:attention", (65536, 4, 1024), 0.1, "query (D,)"),
    Case("fuse:concat", (16384, 4, 1024), 0.1, "absent modalities as zeros"),
]
QUICK_DIV = 16          # --quick: B divided by this
TARGET = 0.70           # of the numpy copy bandwidth
SEED = 1234
RTOL = 1e-4             # max |diff| / max |x|: a working kernel is ~1e-7 off


# ----------------------------------------------------------------------------------------------
# inputs and anchors


def _lengths_mask(rng, B, L, missing):
    """Right padding with lengths spread around (1 - missing) * L."""
    lo = max(0, int(round(L * (1 - 2 * missing))))
    lengths = rng.integers(lo, L + 1, size=B)
    return np.arange(L)[None, :] < lengths[:, None]


def make_inputs(case: Case, rng):
    B, N, D = case.shape
    x = rng.standard_normal((B, N, D), dtype=np.float32)
    if case.op.startswith("masked"):
        mask = _lengths_mask(rng, B, N, case.missing) if case.missing else None
        return x, mask, {}
    present = rng.random((B, N)) >= case.missing
    present[:, 0] = True                      # torch's softmax gives NaN for all-absent rows
    kw = {}
    strategy = case.op.split(":")[1]
    if strategy == "weighted":
        kw["weights"] = rng.random(N).astype(np.float32) + 0.1
    elif strategy == "attention":
        kw["query"] = rng.standard_normal(D, dtype=np.float32)
    return x, present, kw


def traffic_bytes(case: Case, x, mask, kw) -> int:
    """Bytes that must be read (real tokens / present modalities, mask, query) + written."""
    B, N, D = x.shape
    row = D * x.itemsize
    used = int(mask.sum()) if mask is not None else B * N
    nbytes = used * row + (mask.nbytes if mask is not None else 0)
    strategy = case.op.split(":")[1] if case.op.startswith("fuse") else None
    if strategy == "concat":
        return nbytes + B * N * row
    nbytes += B * row
    if strategy in ("weighted", "attention"):
        nbytes += B * N * 4                   # the weights returned
    for v in kw.values():
        nbytes += v.nbytes
    return nbytes


def numpy_impl(case: Case, x, mask, kw) -> Callable[[], np.ndarray]:
    B, N, D = x.shape
    if case.op.startswith("masked"):
        if case.op == "masked_mean":
            if mask is None:
                return lambda: x.mean(axis=1)

            def mean():
                count = mask.sum(axis=1, keepdims=True).astype(np.float32)
                return (x * mask[..., None]).sum(axis=1) / np.maximum(count, 1)
            return mean

        def mx():
            m = mask if mask is not None else np.ones((B, N), bool)
            out = np.where(m[..., None], x, np.float32(-np.inf)).max(axis=1)
            out[~m.any(axis=1)] = 0
            return out
        return mx

    strategy = case.op.split(":")[1]
    present = mask
    pf = present.astype(np.float32)

    def coef_sum(coef):
        return np.einsum("bm,bmd->bd", coef, x, optimize=False)

    if strategy == "mean":
        return lambda: coef_sum(pf / np.maximum(pf.sum(1, keepdims=True), 1))
    if strategy == "max":
        def mx_modalities():              # one modality at a time: no (B, M, D) temporary
            out = np.where(present[:, 0, None], x[:, 0], np.float32(-np.inf))
            for m in range(1, N):
                np.maximum(out, np.where(present[:, m, None], x[:, m], np.float32(-np.inf)),
                           out=out)
            return out
        return mx_modalities
    if strategy == "weighted":
        w = kw["weights"]

        def weighted():
            c = pf * w
            return coef_sum(c / c.sum(1, keepdims=True))
        return weighted
    if strategy == "attention":
        q = kw["query"]

        def attention():
            s = np.einsum("bmd,d->bm", x, q, optimize=False) / np.float32(math.sqrt(D))
            s = np.where(present, s, np.float32(-np.inf))
            e = np.exp(s - s.max(1, keepdims=True))
            return coef_sum(e / e.sum(1, keepdims=True))
        return attention

    def concat():
        out = x.reshape(B, N * D).copy()
        out.reshape(B, N, D)[~present] = 0
        return out
    return concat


def torch_impl(torch, case: Case, x, mask, kw) -> Callable[[], np.ndarray]:
    B, N, D = x.shape
    tx = torch.from_numpy(x)
    tm = torch.from_numpy(mask) if mask is not None else None

    def wrap(fn):
        def run():
            with torch.inference_mode():
                return fn()
        return run

    if case.op == "masked_mean":
        if tm is None:
            return wrap(lambda: tx.mean(1))
        tmf = tm.to(torch.float32)
        return wrap(lambda: (tx * tmf[..., None]).sum(1) / tmf.sum(1, keepdim=True).clamp(min=1))
    if case.op == "masked_max":
        return wrap(lambda: tx.masked_fill(~tm[..., None], float("-inf")).amax(1))
    strategy = case.op.split(":")[1]
    pf = tm.to(torch.float32)

    def coef_sum(coef):
        return torch.bmm(coef[:, None, :], tx)[:, 0]

    if strategy == "mean":
        return wrap(lambda: coef_sum(pf / pf.sum(1, keepdim=True).clamp(min=1)))
    if strategy == "max":
        def mx_modalities():
            out = tx[:, 0].masked_fill(~tm[:, 0, None], float("-inf"))
            for m in range(1, N):
                torch.maximum(out, tx[:, m].masked_fill(~tm[:, m, None], float("-inf")), out=out)
            return out
        return wrap(mx_modalities)
    if strategy == "weighted":
        tw = torch.from_numpy(kw["weights"])

        def weighted():
            c = pf * tw
            return coef_sum(c / c.sum(1, keepdim=True))
        return wrap(weighted)
    if strategy == "attention":
        tq = torch.from_numpy(kw["query"])

        def attention():
            s = torch.mv(tx.reshape(B * N, D), tq).reshape(B, N) / math.sqrt(D)
            w = torch.softmax(s.masked_fill(~tm, float("-inf")), dim=1)
            return coef_sum(w)
        return wrap(attention)
    return wrap(lambda: tx.masked_fill(~tm[..., None], 0.0).reshape(B, N * D))


def kernel_impl(case: Case, x, mask, kw) -> Callable[[], None]:
    """The native kernel alone, writing into outputs allocated once (diagnostic column)."""
    from mmcore import _backend
    C = _backend.native_module()
    n = _backend.get_num_threads()
    B, N, D = x.shape
    if case.op.startswith("masked"):
        out = np.empty((B, D), np.float32)
        fn = getattr(C, case.op)
        return lambda: fn(x, mask, out, num_threads=n)
    strategy = case.op.split(":")[1]
    out = np.empty((B, N * D if strategy == "concat" else D), np.float32)
    out_w = np.empty((B, N), np.float32) if strategy in ("weighted", "attention") else None
    w, q = kw.get("weights"), kw.get("query")
    return lambda: C.fuse(x, mask, w, q, out, out_w, strategy=strategy, num_threads=n)


def mmcore_impl(case: Case, x, mask, kw, backend) -> Callable[[], np.ndarray]:
    """The public op writing into an output allocated once (``out=``), as ``np.copyto``
    writes into an existing array."""
    B, N, D = x.shape
    if case.op in ("masked_mean", "masked_max"):
        fn = masked_mean if case.op == "masked_mean" else masked_max
        out = np.empty((B, D), np.float32)
        return lambda: fn(x, mask, out=out, backend=backend)
    strategy = case.op.split(":")[1]
    out = np.empty((B, N * D if strategy == "concat" else D), np.float32)

    def run():
        res = fuse(x, strategy=strategy, present=mask, out=out, backend=backend, **kw)
        return res[0] if isinstance(res, tuple) else res
    return run


# ----------------------------------------------------------------------------------------------
# small inputs: the fixed cost of one call


class SmallCase(NamedTuple):
    strategy: str      # "mean", "max" or "concat"
    B: int
    M: int
    D: int
    items: bool        # a list of M (B, D) arrays instead of one (B, M, D) array

    @property
    def label(self) -> str:
        if self.items:
            return f"fuse:{self.strategy} [{self.M} x ({self.B}, {self.D})]"
        kind = f"({self.B}, {self.M}, {self.D})"
        return f"fuse:{self.strategy} {kind}"


SMALL_BATCHES = (1, 2, 8)
SMALL_SHAPES = ((2, 64), (3, 512), (4, 768))     # (M, D)


def small_cases() -> List[SmallCase]:
    """The per-call cases: mean at every shape, max and concat at (3, 512), the list input."""
    cases: List[SmallCase] = []
    for B in SMALL_BATCHES:
        for M, D in SMALL_SHAPES:
            cases.append(SmallCase("mean", B, M, D, False))
        cases.append(SmallCase("max", B, 3, 512, False))
        cases.append(SmallCase("concat", B, 3, 512, False))
        cases.append(SmallCase("mean", B, 3, 512, True))
    return cases


def small_impls(case: SmallCase, rng, backend: str):
    """(mmcore call, NumPy call) of one small case; both return a new array."""
    x = rng.standard_normal((case.B, case.M, case.D), dtype=np.float32)
    if case.items:
        items = [np.ascontiguousarray(x[:, m]) for m in range(case.M)]
        return (lambda: fuse(items, strategy=case.strategy, backend=backend),
                lambda: np.stack(items, 1).mean(1))
    numpy_fn = {"mean": lambda: x.mean(1), "max": lambda: x.max(1),
                "concat": lambda: x.reshape(case.B, case.M * case.D).copy()}[case.strategy]
    return lambda: fuse(x, strategy=case.strategy, backend=backend), numpy_fn


def small_rows(backend: str, tkw: dict, *, seed: int = SEED) -> List[Tuple[SmallCase, T.Timing,
                                                                            T.Timing]]:
    """Per-call timings ``(case, mmcore, numpy)`` of :func:`small_cases`."""
    rng = np.random.default_rng(seed)
    rows = []
    for case in small_cases():
        run_mm, run_np = small_impls(case, rng, backend)
        t = T.interleaved({"mm": run_mm, "np": run_np}, number=200, **tkw)
        rows.append((case, t["mm"], t["np"]))
    return rows


def print_small_table(rows) -> None:
    """The per-call table of :func:`small_rows` (microseconds, median)."""
    table = [[c.label, T.fmt(mm.median * 1e6, ".2f"), T.fmt(npy.median * 1e6, ".2f"),
              T.fmt(npy.median / mm.median, ".2f") + "x"] for c, mm, npy in rows]
    T.print_table(["small input (B, M, D)", "mmcore us", "numpy us", "vs numpy"], table)
    print("us = median per-call time of a fresh result (200 calls per sample); vs numpy = numpy us "
          "/ mmcore us (> 1: mmcore faster).")


# ----------------------------------------------------------------------------------------------
# measurement


class Row(NamedTuple):
    case: Case
    nbytes: int
    mm: T.Timing
    npy: T.Timing
    th: Optional[T.Timing]
    kernel: Optional[T.Timing]
    diff_numpy: float
    diff_torch: Optional[float]


def _rel_diff(a, b, scale) -> float:
    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    if a.shape != b.shape:
        return float("inf")
    return float(np.max(np.abs(a - b))) / scale if a.size else 0.0


def run_case(case: Case, args, torch, rng, tkw) -> Row:
    x, mask, kw = make_inputs(case, rng)
    scale = max(1.0, float(np.abs(x).max()))
    run_mm = mmcore_impl(case, x, mask, kw, args.backend)
    run_np = numpy_impl(case, x, mask, kw)
    out_mm = run_mm()                      # also compiles the numba backend before it is timed
    diff_np = _rel_diff(out_mm, run_np(), scale)
    fns = {"mm": run_mm, "np": run_np}
    diff_th = None
    if torch is not None:
        run_th = torch_impl(torch, case, x, mask, kw)
        diff_th = _rel_diff(out_mm, run_th().numpy(), scale)
        fns["th"] = run_th
    if args.backend == "native":
        fns["kernel"] = kernel_impl(case, x, mask, kw)
    t = T.interleaved(fns, **tkw)
    mm, npy, th, kernel = t["mm"], t["np"], t.get("th"), t.get("kernel")
    del fns, t
    nbytes = traffic_bytes(case, x, mask, kw)
    del x, mask, kw, out_mm
    gc.collect()
    return Row(case, nbytes, mm, npy, th, kernel, diff_np, diff_th)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    T.add_common_args(parser)
    parser.add_argument("--small", action="store_true",
                        help="only the small-input per-call table (no large inputs)")
    args = parser.parse_args(argv)

    torch = T.optional_import("torch")
    threads = T.configure_threads(args.threads, torch)
    tkw = (dict(warmup=1, repeat=3, min_time=0.0) if args.quick
           else dict(warmup=2, repeat=7, min_time=1.0, max_repeat=50))
    T.print_header("mmcore fusion reductions vs memory bandwidth, NumPy and torch (float32, CPU)",
                   threads_info=threads, torch=torch, backend=args.backend,
                   extra={"timing": f"median of >= {tkw['repeat']} interleaved rounds (mmcore, "
                                    f"kernel, numpy, torch) after {tkw['warmup']} "
                                    f"warm-up(s), >= {tkw['min_time']} s per measurement"
                                    + (" (--quick)" if args.quick else "")})
    ceil = T.machine_ceilings(repeat=3 if args.quick else 7)
    print()
    small_tkw = dict(tkw, min_time=0.0 if args.quick else 0.2)
    if args.small:
        print_small_table(small_rows(args.backend, small_tkw))
        T.print_footer()
        return 0

    cases = CASES
    if args.quick:
        cases = [c._replace(shape=(max(1, c.shape[0] // QUICK_DIV),) + c.shape[1:]) for c in cases]
    rng = np.random.default_rng(SEED)
    rows: List[Row] = []
    for case in cases:
        print(f"  measuring {case.label:<36} {case.note}", file=sys.stderr, flush=True)
        rows.append(run_case(case, args, torch, rng, tkw))

    def gbps(r: Row, t: Optional[T.Timing]) -> Optional[float]:
        return None if t is None else r.nbytes / t.median / 1e9

    headers = ["case", "MB", "mmcore ms", "GB/s", "%copy", "kernel ms", "%copy", "numpy ms",
               "GB/s", "torch ms", "GB/s", "vs numpy", "vs torch", "rel|d| numpy", "rel|d| torch"]
    table = []
    failed = []
    for r in rows:
        g = gbps(r, r.mm)
        bad = [d for d in (r.diff_numpy, r.diff_torch) if d is not None and not d <= RTOL]
        if bad:
            failed.append(r.case)
        sp_np = r.npy.median / r.mm.median
        sp_th = r.th.median / r.mm.median if r.th is not None else None
        table.append([
            r.case.label,
            T.fmt(r.nbytes / 1e6, ".0f"),
            T.fmt(r.mm.median * 1e3, ".2f"),
            T.fmt(g, ".1f"),
            T.fmt(100.0 * g / ceil.copy_gbps, ".0f"),
            T.fmt(r.kernel.median * 1e3 if r.kernel else None, ".2f"),
            T.fmt(100.0 * gbps(r, r.kernel) / ceil.copy_gbps if r.kernel else None, ".0f"),
            T.fmt(r.npy.median * 1e3, ".2f"),
            T.fmt(gbps(r, r.npy), ".1f"),
            T.fmt(r.th.median * 1e3 if r.th else None, ".2f"),
            T.fmt(gbps(r, r.th), ".1f"),
            T.fmt(sp_np, ".2f") + "x",
            T.fmt(sp_th, ".2f") + ("x" if sp_th is not None else ""),
            T.fmt(r.diff_numpy, ".1e") + (" !" if not r.diff_numpy <= RTOL else ""),
            T.fmt(r.diff_torch, ".1e") + (" !" if r.diff_torch is not None
                                          and not r.diff_torch <= RTOL else ""),
        ])
    T.print_table(headers, table)
    print()
    print("MB, GB/s = bytes that must be read (real tokens / present modalities, mask, query) + "
          "bytes written, the same count for every column;")
    print(f"%copy = mmcore GB/s / {ceil.copy_gbps:.1f} GB/s numpy memory copy (read + write) "
          "measured above; -N% = share of padding tokens / absent modalities;")
    print("mmcore = the public op with out= (an output allocated once, as np.copyto's); "
          "kernel = mmcore._C alone (native only);")
    print("vs numpy / vs torch = anchor ms / mmcore ms (> 1: mmcore faster); rel|d| = max abs "
          "difference / max |x|.")
    print()

    print("summary")
    for r in rows:
        g = gbps(r, r.mm)
        ratio = g / ceil.copy_gbps
        verdict = "met" if ratio >= TARGET else "NOT met"
        extra = f"{r.npy.median / r.mm.median:.2f}x numpy"
        if r.th is not None:
            extra += f", {r.th.median / r.mm.median:.2f}x torch"
        if r.kernel is not None:
            extra += f"; kernel alone {100 * gbps(r, r.kernel) / ceil.copy_gbps:.0f}%"
        print(f"  {r.case.label:<34} {g:5.1f} GB/s = {100 * ratio:5.1f}% of copy "
              f"({ceil.copy_gbps:.1f} GB/s): target >= {100 * TARGET:.0f}% {verdict}  ({extra})")
    print(f"  geometric mean speedup vs NumPy over {len(rows)} cases: "
          f"{T.geomean([r.npy.median / r.mm.median for r in rows]):.2f}x")
    th_rows = [r for r in rows if r.th is not None]
    if th_rows:
        print(f"  geometric mean speedup vs torch over {len(th_rows)} cases: "
              f"{T.geomean([r.th.median / r.mm.median for r in th_rows]):.2f}x")
    if failed:
        print(f"  CORRECTNESS CHECK FAILED (rel max abs diff > {RTOL:g}) on: "
              + ", ".join(c.label for c in failed))
    else:
        print(f"  correctness spot check: all cases within rel max abs diff {RTOL:g}")
    print()
    print_small_table(small_rows(args.backend, small_tkw))
    T.print_footer()
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
