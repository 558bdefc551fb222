"""The ``mmcore`` command line.

``mmcore info`` prints the version, the backends (ISA level of the native kernels, threads,
CUDA devices or why there are none, numba) and runs a small attention self-check against NumPy.

Examples
--------
>>> from mmcore.cli import main
>>> main(["info", "--json"]) == 0  # doctest: +ELLIPSIS
{...
True
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
from typing import List, Optional

import numpy as np

from . import __version__
from ._backend import backends, set_num_threads


def _self_check() -> float:
    """Max abs difference between ops.attention and a NumPy float64 softmax attention."""
    from .ops import attention

    rng = np.random.default_rng(0)
    q = rng.standard_normal((2, 4, 7, 32), dtype=np.float32)
    k = rng.standard_normal((2, 4, 19, 32), dtype=np.float32)
    v = rng.standard_normal((2, 4, 19, 24), dtype=np.float32)
    out = attention(q, k, v)
    s = q.astype(np.float64) @ k.astype(np.float64).swapaxes(-1, -2) / np.sqrt(32)
    e = np.exp(s - s.max(-1, keepdims=True))
    ref = (e / e.sum(-1, keepdims=True)) @ v.astype(np.float64)
    return float(np.abs(out - ref).max())


def _info(args) -> int:
    if args.threads is not None:
        set_num_threads(args.threads)
    info = {
        "version": __version__,
        "python": platform.python_version(),
        "numpy": np.__version__,
        "machine": platform.machine(),
        "backends": backends(),
    }
    err = _self_check()
    info["attention_self_check_max_abs_err"] = err
    ok = err < 1e-4
    if args.json:
        print(json.dumps(info, indent=2, default=str))
        return 0 if ok else 1
    nat, cuda, nb = info["backends"]["native"], info["backends"]["cuda"], info["backends"]["numba"]
    print(f"mmcore {__version__} (Python {info['python']}, NumPy {info['numpy']}, {info['machine']})")
    print(f"  native : ISA {nat['isa']} (compiled: {', '.join(nat['compiled_isas'])}; "
          f"CPU: {', '.join(nat['cpu_features']) or 'no AVX'}), threads {nat['threads']}")
    if cuda["available"]:
        devs = "; ".join(f"{d.get('index')}: {d.get('name')} (sm {d.get('compute_capability')})" for d in cuda["devices"])
        print(f"  cuda   : available, devices {devs}")
    else:
        print(f"  cuda   : absent ({cuda.get('reason')})")
    if nb["available"]:
        print(f"  numba  : available (numba {nb['version']})")
    else:
        print(f"  numba  : absent ({nb.get('reason')})")
    print(f"  attention self-check vs NumPy float64: max abs err {err:.2e} ({'ok' if ok else 'FAILED'})")
    return 0 if ok else 1


def main(argv: Optional[List[str]] = None) -> int:
    """Entry point of the ``mmcore`` console script; returns the exit status."""
    parser = argparse.ArgumentParser(prog="mmcore", description="mmcore command line")
    sub = parser.add_subparsers(dest="command")
    p_info = sub.add_parser("info", help="version, backends, ISA, threads, CUDA devices")
    p_info.add_argument("--json", action="store_true", help="print machine-readable JSON")
    p_info.add_argument("--threads", type=int, default=None, help="thread count for the native kernels")
    args = parser.parse_args(argv)
    if args.command == "info":
        return _info(args)
    parser.print_help()
    return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
