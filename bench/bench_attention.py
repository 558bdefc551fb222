"""Benchmark ``mmcore.ops.attention`` (CPU) against ONNX Runtime and PyTorch SDPA (float32, bf16).

For each shape (B, H, Lq, Lk, D) -- cross-attention (256 queries over 1024 keys, 77 text tokens
over 577 image patches), square self-attention (1024, 1500 and 4096 tokens) -- the script
prints, measured side by side in one process (interleaved rounds, see ``_timing.py``):

* mmcore time (ms), GFLOP/s (``4 * B * H * Lq * Lk * D / time``) and that as a % of the
  machine's float32 GEMM GFLOP/s (numpy's BLAS, best of a few calls at start-up);
* ONNX Runtime's ``com.microsoft.MultiHeadAttention`` contrib op, its inputs laid out as
  (B, L, H*D) with the ``num_heads`` attribute (the layout change is done before timing);
* ONNX Runtime's opset-23 ``Attention`` op on the (B, H, L, D) arrays (or why it is n/a);
* ``torch.nn.functional.scaled_dot_product_attention`` in float32 (on ``torch.from_numpy``
  views) and in bfloat16 (inputs converted to bfloat16 before timing), under
  ``torch.inference_mode()``;
* mmcore with ``precision="bf16"`` when ``mmcore.ops.attention`` takes that option;
* the ratios ``anchor ms / mmcore ms`` (> 1: mmcore faster) and the max abs difference of
  every float32 output against mmcore's, checked before timing (the script exits with status 1
  if one exceeds the tolerance);
* the max abs error against a float64 NumPy reference on one shape for mmcore float32, mmcore
  bf16 and torch bf16.

All sessions and libraries use ``--threads`` threads (ONNX Runtime: ``intra_op_num_threads``,
``inter_op_num_threads = 1``).

Usage::

    python bench/bench_attention.py [--quick] [--threads N] [--backend native|numba]

Missing torch or onnxruntime: their columns print ``n/a`` and the rest still runs.
"""

from __future__ import annotations

import argparse
import inspect
import math
import os
import sys
from typing import Callable, Dict, List, NamedTuple, Optional

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _ort  # noqa: E402
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
    note: str = ""
    slow: bool = False     # left out of --quick

    @property
    def label(self) -> str:
        return f"{self.B}x{self.H}x{self.Lq}x{self.Lk}x{self.D}"

    @property
    def flops(self) -> float:
        return 4.0 * self.B * self.H * self.Lq * self.Lk * self.D


CASES = [
    Case(4, 12, 256, 1024, 64, note="256 queries over 1024 keys"),
    Case(2, 16, 1024, 1024, 64, note="square self-attention, 1024 tokens"),
    Case(1, 16, 4096, 4096, 64, note="square self-attention, 4096 tokens", slow=True),
    Case(1, 8, 1500, 1500, 64, note="Whisper encoder self-attention, 1500 frames"),
    Case(1, 8, 77, 577, 64, note="77 text tokens over ViT-L/14@336 patches"),
]
ERROR_CASE = (4, 12, 256, 1024, 64)   # the shape of the float64 error check

SEED = 1234
ATOL = 1e-4   # float32 outputs against mmcore's: a working kernel is ~1e-6 off

# column keys, in timing order
MM, MHA, A23, TH, TBF, MMBF = "mmcore", "ort_mha", "ort_attn23", "torch", "torch_bf16", "mm_bf16"


class Row(NamedTuple):
    case: Case
    times: Dict[str, Optional[T.Timing]]
    diffs: Dict[str, Optional[float]]     # max abs diff against mmcore float32
    why: Dict[str, str]                   # key -> reason it is n/a


def make_inputs(case: Case, rng: np.random.Generator):
    q = rng.standard_normal((case.B, case.H, case.Lq, case.D), dtype=np.float32)
    k = rng.standard_normal((case.B, case.H, case.Lk, case.D), dtype=np.float32)
    v = rng.standard_normal((case.B, case.H, case.Lk, case.D), dtype=np.float32)
    return q, k, v


def attention_f64(q, k, v) -> np.ndarray:
    """Plain float64 NumPy attention, one (b, h) at a time."""
    out = np.empty(q.shape, np.float64)
    scale = 1.0 / math.sqrt(q.shape[-1])
    for b in range(q.shape[0]):
        for h in range(q.shape[1]):
            s = (q[b, h].astype(np.float64) @ k[b, h].astype(np.float64).T) * scale
            s -= s.max(axis=-1, keepdims=True)
            p = np.exp(s)
            p /= p.sum(axis=-1, keepdims=True)
            out[b, h] = p @ v[b, h].astype(np.float64)
    return out


def mmcore_bf16_reason() -> str:
    """Empty when ``mmcore.ops.attention`` takes ``precision=``, else why not."""
    try:
        params = inspect.signature(attention).parameters
    except (TypeError, ValueError) as exc:
        return f"signature unavailable ({exc})"
    if "precision" not in params:
        return "mmcore.ops.attention has no precision= option in this build"
    return ""


def run_case(case: Case, args, torch, ort_ok: str, rng, tkw) -> Row:
    q, k, v = make_inputs(case, rng)
    backend = args.backend
    fns: Dict[str, Callable[[], object]] = {}
    diffs: Dict[str, Optional[float]] = {}
    why: Dict[str, str] = {}

    # "highest" named explicitly where the option exists, so a process-wide default cannot leak in
    exact = {} if mmcore_bf16_reason() else {"precision": "highest"}

    def run_mm():
        return attention(q, k, v, backend=backend, **exact)

    out_mm = run_mm()          # also compiles the numba backend before it is timed
    fns[MM] = run_mm

    def check(key: str, out) -> None:
        diffs[key] = float(np.max(np.abs(np.asarray(out, np.float64) - out_mm)))

    # ONNX Runtime: MultiHeadAttention (B, L, H*D) and opset-23 Attention (B, H, L, D)
    if ort_ok:
        why[MHA] = why[A23] = ort_ok
    else:
        feed_mha = {"q": _ort.to_blh(q), "k": _ort.to_blh(k), "v": _ort.to_blh(v)}
        sess, err = _ort.optional(
            lambda: _ort.session(_ort.mha_model(case.B, case.H, case.Lq, case.Lk, case.D),
                                 args.threads))
        if sess is not None:
            out, err = _ort.optional(sess.run, None, feed_mha)
            if out is not None:
                check(MHA, _ort.from_blh(out[0], case.H))
                fns[MHA] = lambda s=sess: s.run(None, feed_mha)
        if err:
            why[MHA] = err
        feed_23 = {"q": q, "k": k, "v": v}
        sess, err = _ort.optional(
            lambda: _ort.session(_ort.attention23_model(case.B, case.H, case.Lq, case.Lk,
                                                        case.D), args.threads))
        if sess is not None:
            out, err = _ort.optional(sess.run, None, feed_23)
            if out is not None:
                check(A23, out[0])
                fns[A23] = lambda s=sess: s.run(None, feed_23)
        if err:
            why[A23] = err

    # torch SDPA, float32 and bfloat16 (converted here, outside the timed calls)
    if torch is None:
        why[TH] = why[TBF] = "torch is not installed"
    else:
        F = torch.nn.functional
        tq, tk, tv = (torch.from_numpy(a) for a in (q, k, v))
        bq, bk, bv = (t.to(torch.bfloat16) for t in (tq, tk, tv))

        def run_th():
            with torch.inference_mode():
                return F.scaled_dot_product_attention(tq, tk, tv)

        def run_tbf():
            with torch.inference_mode():
                return F.scaled_dot_product_attention(bq, bk, bv)

        check(TH, run_th().numpy())
        fns[TH] = run_th
        out, err = _ort.optional(run_tbf)
        if out is not None:
            fns[TBF] = run_tbf
        else:
            why[TBF] = err

    # mmcore bf16
    reason = mmcore_bf16_reason()
    if not reason:
        def run_mmbf():
            return attention(q, k, v, backend=backend, precision="bf16")

        out, reason = _ort.optional(run_mmbf)
        if out is not None:
            fns[MMBF] = run_mmbf
    if reason:
        why[MMBF] = reason

    kw = dict(tkw)
    if case.slow and not args.quick:
        kw.update(warmup=1, min_time=0.0)
    t = T.interleaved(fns, **kw)
    times: Dict[str, Optional[T.Timing]] = {key: t.get(key)
                                            for key in (MM, MHA, A23, TH, TBF, MMBF)}
    return Row(case, times, diffs, why)


def bf16_errors(torch, backend: str) -> Dict[str, str]:
    """Max abs error against float64 on ERROR_CASE: mmcore float32 / bf16, torch bf16."""
    case = next(c for c in CASES if tuple(c[:5]) == ERROR_CASE)
    q, k, v = make_inputs(case, np.random.default_rng(SEED + 1))
    ref = attention_f64(q, k, v)
    res: Dict[str, str] = {}

    def err(out) -> str:
        return f"{float(np.max(np.abs(np.asarray(out, np.float64) - ref))):.2e}"

    reason = mmcore_bf16_reason()
    exact = {} if reason else {"precision": "highest"}
    res["mmcore float32"] = err(attention(q, k, v, backend=backend, **exact))
    if not reason:
        out, reason = _ort.optional(attention, q, k, v, backend=backend,
                                    precision="bf16")
        if out is not None:
            res["mmcore bf16"] = err(out)
    if reason:
        res["mmcore bf16"] = f"n/a ({reason})"
    if torch is None:
        res["torch SDPA bf16"] = "n/a (torch is not installed)"
    else:
        with torch.inference_mode():
            bq, bk, bv = (torch.from_numpy(a).to(torch.bfloat16) for a in (q, k, v))
            out = torch.nn.functional.scaled_dot_product_attention(bq, bk, bv)
            res["torch SDPA bf16"] = err(out.float().numpy())
            tq, tk, tv = (torch.from_numpy(a) for a in (q, k, v))
            out = torch.nn.functional.scaled_dot_product_attention(tq, tk, tv)
            res["torch SDPA float32"] = err(out.numpy())
    return res


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    T.add_common_args(parser)
    args = parser.parse_args(argv)

    torch = T.optional_import("torch")
    onnx, ort, ort_reason = _ort.load()
    if ort is None:
        print(f"[skip] anchor 'onnxruntime' is unavailable ({ort_reason}); its columns print n/a")
        ort_reason = f"onnxruntime unavailable ({ort_reason})"
    threads = T.configure_threads(args.threads, torch)
    threads["onnxruntime"] = (f"{args.threads} (intra-op, no spin-wait; inter-op 1)"
                              if ort is not None else "n/a")
    tkw = (dict(warmup=1, repeat=3, min_time=0.0) if args.quick
           else dict(warmup=2, repeat=7, min_time=0.5, max_repeat=100))
    bf_reason = mmcore_bf16_reason()
    T.print_header("mmcore.ops.attention vs ONNX Runtime and torch SDPA (float32 / bf16, CPU)",
                   threads_info=threads, torch=torch, backend=args.backend,
                   extra={"ort": (f"onnxruntime {ort.__version__}, onnx {onnx.__version__}"
                                  if ort is not None else ort_reason),
                          "mm bf16": "precision='bf16'" if not bf_reason else f"n/a: {bf_reason}",
                          "timing": f"median of >= {tkw['repeat']} interleaved rounds of all "
                                    f"columns after {tkw['warmup']} warm-up(s), >= "
                                    f"{tkw['min_time']} s per measurement (the 4096 shape: 1 "
                                    "warm-up, no minimum time)"
                                    + (" (--quick: 4096 shape skipped)" if args.quick else "")})
    ceil = T.machine_ceilings(repeat=3 if args.quick else 5)
    print()

    rng = np.random.default_rng(SEED)
    rows: List[Row] = []
    for case in CASES:
        if case.slow and args.quick:
            continue
        print(f"  measuring {case.label:<20} {case.note}", file=sys.stderr, flush=True)
        rows.append(run_case(case, args, torch, ort_reason, rng, tkw))

    def ms(t: Optional[T.Timing]) -> str:
        return T.fmt(t.median * 1e3 if t is not None else None, ".2f")

    def gf(case: Case, t: Optional[T.Timing]) -> Optional[float]:
        return None if t is None else case.flops / t.median / 1e9

    def ratio(a: Optional[T.Timing], b: Optional[T.Timing]) -> str:
        return (T.fmt(a.median / b.median, ".2f") + "x") if a is not None and b is not None \
            else "n/a"

    # reasons for n/a cells, numbered once each
    notes: List[str] = []

    def na(row: Row, key: str) -> str:
        t = row.times.get(key)
        if t is not None:
            return ms(t)
        reason = row.why.get(key, "not measured")
        if reason not in notes:
            notes.append(reason)
        return f"n/a [{notes.index(reason) + 1}]"

    print("time per call (median ms) and mmcore float32 GFLOP/s")
    headers = ["B x H x Lq x Lk x D", "mmcore ms", "GFLOP/s", "%GEMM", "ORT MHA ms",
               "ORT Attn-23 ms", "torch f32 ms", "torch bf16 ms", "mmcore bf16 ms"]
    table = []
    for r in rows:
        g = gf(r.case, r.times[MM])
        table.append([r.case.label, ms(r.times[MM]), T.fmt(g, ".1f"),
                      T.fmt(None if g is None else 100.0 * g / ceil.gemm_gflops, ".1f"),
                      na(r, MHA), na(r, A23), na(r, TH), na(r, TBF), na(r, MMBF)])
    T.print_table(headers, table)
    for i, n in enumerate(notes):
        print(f"  [{i + 1}] {n}")
    print()

    print("ratios (anchor ms / mmcore ms: > 1 means mmcore faster) and max abs difference of the "
          "float32 outputs vs mmcore")
    headers = ["B x H x Lq x Lk x D", "ORT MHA/mmcore", "ORT Attn-23/mmcore", "torch f32/mmcore",
               "torch bf16/mmcore", "torch bf16/mm bf16", "max|d| MHA", "max|d| Attn-23",
               "max|d| torch"]
    table = []
    failed = []
    for r in rows:
        mm = r.times[MM]

        def d(key: str, r: Row = r) -> str:
            x = r.diffs.get(key)
            return T.fmt(x, ".1e") + (" !" if x is not None and not x <= ATOL else "")

        if any(x is not None and not x <= ATOL for x in r.diffs.values()):
            failed.append(r.case)
        table.append([r.case.label, ratio(r.times[MHA], mm), ratio(r.times[A23], mm),
                      ratio(r.times[TH], mm), ratio(r.times[TBF], mm),
                      ratio(r.times[TBF], r.times[MMBF]), d(MHA), d(A23), d(TH)])
    T.print_table(headers, table)
    print()
    print("GFLOP/s = 4*B*H*Lq*Lk*D / median time; %GEMM = mmcore GFLOP/s / "
          f"{ceil.gemm_gflops:.1f} GFLOP/s numpy float32 GEMM (best of the start-up calls).")
    print("ORT MHA = com.microsoft.MultiHeadAttention on (B, L, H*D) inputs (num_heads = H); "
          "ORT Attn-23 = ONNX opset-23 Attention on (B, H, L, D);")
    print("torch bf16 = SDPA on bfloat16 tensors (converted before timing); torch bf16/mm bf16 "
          "compares it with mmcore precision='bf16'.")
    print()

    print(f"max abs error vs a float64 reference, shape {'x'.join(map(str, ERROR_CASE))} "
          "(q, k, v ~ N(0, 1))")
    T.print_table(["implementation", "max abs error"],
                  [[k, v] for k, v in bf16_errors(torch, args.backend).items()], align="<<")
    print()

    print("summary")
    for key, name in ((MHA, "ORT MultiHeadAttention"), (A23, "ORT opset-23 Attention"),
                      (TH, "torch SDPA float32"), (TBF, "torch SDPA bfloat16")):
        rs = [r.times[key].median / r.times[MM].median for r in rows
              if r.times[key] is not None and r.times[MM] is not None]
        if rs:
            print(f"  {name:<24}: geometric mean {T.geomean(rs):.2f}x over {len(rs)} shapes "
                  f"(min {min(rs):.2f}x, max {max(rs):.2f}x); > 1 means mmcore faster")
        else:
            print(f"  {name:<24}: n/a")
    if failed:
        print(f"  CORRECTNESS CHECK FAILED (max abs diff vs mmcore > {ATOL:g}) on: "
              + ", ".join(c.label for c in failed))
    else:
        print(f"  correctness check before timing: every float32 anchor within {ATOL:g} of "
              "mmcore")
    T.print_footer()
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
