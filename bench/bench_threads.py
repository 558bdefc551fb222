"""Do mmcore's thread pools slow torch (and torch slow mmcore) in the same process?

Each import / call order runs in its own interpreter, since what matters is which library starts
its threads first. Every row times torch's ``scaled_dot_product_attention`` and mmcore's native
``attention`` on (8, 8, 77 x 577, 64) float32 with torch on two threads, and gives the ratio to a
fresh interpreter that loads only the library it times:

``fresh``        only torch (torch column) / only mmcore (mmcore column);
``numba first``  one mmcore numba-fallback call, then torch, then mmcore;
``torch first``  torch, one numba-fallback call, torch again, then mmcore;
``native first`` mmcore native, then torch;
``alternating``  torch and mmcore native timed interleaved in one loop.

``--omp`` runs the same rows with ``NUMBA_THREADING_LAYER=omp`` (numba's OpenMP layer, which
mmcore otherwise avoids; see :mod:`mmcore.kernels.numba`), to show what mmcore prevents.

    python bench/bench_threads.py [--quick] [--omp]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile

import numpy as np

from _timing import fmt, interleaved, print_footer, print_header, print_table, timeit

ORDERS = ["fresh", "numba first", "torch first", "native first", "alternating"]


def _child(order: str, repeat: int) -> None:
    def torch_fn():
        import torch
        import torch.nn.functional as F
        torch.set_num_threads(2)
        g = torch.Generator().manual_seed(0)
        q = torch.randn(8, 8, 77, 64, generator=g)
        k = torch.randn(8, 8, 577, 64, generator=g)
        return lambda: F.scaled_dot_product_attention(q, k, k)

    def mm_fn(backend="native", small=False):
        from mmcore.ops import attention
        rng = np.random.default_rng(0)
        shape = (2, 4, 17, 61, 32) if small else (8, 8, 77, 577, 64)
        q = rng.standard_normal(shape[:3] + shape[4:], dtype=np.float32)
        k = rng.standard_normal(shape[:2] + shape[3:], dtype=np.float32)
        return lambda: attention(q, k, k, backend=backend)

    t = m = float("nan")
    if order == "fresh torch":
        t = timeit(torch_fn(), repeat=repeat).median
    elif order == "fresh mmcore":
        m = timeit(mm_fn(), repeat=repeat).median
    elif order == "numba first":
        mm_fn("numba", small=True)()
        t = timeit(torch_fn(), repeat=repeat).median
        m = timeit(mm_fn(), repeat=repeat).median
    elif order == "torch first":
        fn = torch_fn()
        timeit(fn, repeat=2)
        mm_fn("numba", small=True)()
        t = timeit(fn, repeat=repeat).median
        m = timeit(mm_fn(), repeat=repeat).median
    elif order == "native first":
        m = timeit(mm_fn(), repeat=repeat).median
        t = timeit(torch_fn(), repeat=repeat).median
    elif order == "alternating":
        r = interleaved({"torch": torch_fn(), "mmcore": mm_fn()}, repeat=repeat)
        t, m = r["torch"].median, r["mmcore"].median
    print("RESULT", t * 1e3, m * 1e3)


def _measure(order: str, repeat: int, omp: bool):
    env = dict(os.environ)
    env.pop("NUMBA_THREADING_LAYER", None)
    if omp:
        env["NUMBA_THREADING_LAYER"] = "omp"
    env["PYTHONPATH"] = os.pathsep.join([os.path.dirname(os.path.abspath(__file__)),
                                         env.get("PYTHONPATH", "")])
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", order,
                           "--repeat", str(repeat)], cwd=tempfile.gettempdir(), env=env,
                          capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        raise RuntimeError(f"{order}: {proc.stderr[-2000:]}")
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT")][-1]
    return float(line.split()[1]), float(line.split()[2])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer timed calls")
    parser.add_argument("--omp", action="store_true",
                        help="run with NUMBA_THREADING_LAYER=omp (numba's OpenMP layer)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--repeat", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        _child(args.child, args.repeat)
        return
    repeat = 5 if args.quick else 15
    layer = "omp (NUMBA_THREADING_LAYER=omp)" if args.omp else "mmcore's choice"
    import torch  # for the header only; every timed run is a child interpreter
    print_header("thread pools: torch SDPA and mmcore attention by import / call order",
                 torch=torch, extra={"numba threading layer": layer, "torch threads": "2",
                        "shape": "(8, 8, 77 x 577, 64) float32"})
    fresh_t = _measure("fresh torch", repeat, args.omp)[0]
    fresh_m = _measure("fresh mmcore", repeat, args.omp)[1]
    rows = [["fresh", fmt(fresh_t), "1.00", fmt(fresh_m), "1.00"]]
    for order in ORDERS[1:]:
        t, m = _measure(order, repeat, args.omp)
        rows.append([order, fmt(t), fmt(t / fresh_t), fmt(m), fmt(m / fresh_m)])
    print_table(["order", "torch ms", "x fresh", "mmcore ms", "x fresh"], rows)
    print_footer()


if __name__ == "__main__":
    main()
