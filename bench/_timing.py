"""Shared timing helper for the benchmark scripts in ``bench/``.

Every benchmark script measures mmcore and its anchors side by side in one process with the
same helper, so their numbers can be compared directly:

``interleaved({name: fn, ...})``
    mmcore and its anchors timed together: warm-up calls, then rounds that call every function
    once in a rotating order (A, B, C, then B, C, A, ...), and the median (and minimum) wall time
    per function. Load that comes and goes during a run then hits every function alike.
``timeit(fn, ...)``
    The same for one function alone (warm-up calls, median and minimum of repeated calls).
``machine_ceilings()``
    The machine's own ceilings, best of a few calls: float32 GEMM GFLOP/s through numpy's BLAS
    and memory copy bandwidth through ``np.copyto``.
``load_average()`` / ``print_footer()``
    The load average, printed by the header at the start and by the footer at the end of every
    run; the footer measures the ceilings again and warns when the machine was loaded, since
    ratios measured on a busy machine are not a result.
``print_table(headers, rows)``
    An aligned plain-text table.
``optional_import(name)``
    Import an anchor (torch, librosa, ...) if it is installed, else say why it is skipped.
``add_common_args(parser)`` / ``configure_threads(n)`` / ``print_header(...)``
    The ``--threads``, ``--quick`` and ``--backend`` options shared by all scripts, applying the
    thread count to mmcore, torch and (through threadpoolctl, when installed) numpy's BLAS, and
    the header that records the versions and thread counts a run was made with.
"""

from __future__ import annotations

import argparse
import functools
import gc
import importlib
import math
import os
import platform
import statistics
import sys
import time
from typing import Any, Callable, Dict, List, Mapping, NamedTuple, Optional, Sequence, Tuple

import numpy as np

__all__ = [
    "Timing", "timeit", "interleaved", "Ceilings", "machine_ceilings", "print_table",
    "optional_import", "default_threads", "add_common_args", "configure_threads", "print_header",
    "print_footer", "load_average", "LOAD_WARN_PER_CPU", "fmt", "geomean",
]


# --------------------------------------------------------------------------------------------
# timing

class Timing(NamedTuple):
    """Result of :func:`timeit` and :func:`interleaved`: seconds per call."""

    median: float
    min: float
    runs: int


def timeit(fn: Callable[[], Any], *, warmup: int = 2, repeat: int = 7, min_time: float = 0.0,
           max_repeat: int = 1000, number: int = 1) -> Timing:
    """Time ``fn()`` in this process and return the median and minimum seconds per call.

    Parameters
    ----------
    fn : callable
        Called with no arguments. Its result is discarded.
    warmup : int, default 2
        Untimed calls first (JIT compilation, first-touch page faults, thread pool start-up).
    repeat : int, default 7
        Timed samples taken at least.
    min_time : float, default 0.0
        Keep taking samples until their total reaches this many seconds (bounded by
        ``max_repeat``), so that fast functions get more samples than slow ones.
    max_repeat : int, default 1000
        Upper bound on the number of samples.
    number : int, default 1
        Calls per sample; the sample's time is divided by it.

    Returns
    -------
    Timing
        ``(median, min, runs)``; ``median`` and ``min`` are seconds per call.

    The garbage collector is disabled while timing and re-enabled afterwards.
    """
    if repeat < 1 or number < 1:
        raise ValueError("repeat and number must be >= 1")
    for _ in range(max(0, warmup)):
        fn()
    gc_was_enabled = gc.isenabled()
    gc.collect()
    gc.disable()
    samples: List[float] = []
    total = 0.0
    try:
        while len(samples) < repeat or (total < min_time and len(samples) < max_repeat):
            t0 = time.perf_counter()
            for _ in range(number):
                fn()
            dt = time.perf_counter() - t0
            total += dt
            samples.append(dt / number)
    finally:
        if gc_was_enabled:
            gc.enable()
    return Timing(statistics.median(samples), min(samples), len(samples))


def interleaved(fns: Mapping[str, Callable[[], Any]], *, warmup: int = 2, repeat: int = 7,
                min_time: float = 0.0, max_repeat: int = 1000,
                number: int = 1) -> Dict[str, Timing]:
    """Time several functions in rounds, one call of each per round, in a rotating order.

    Each function gets its warm-up calls first. Then round ``r`` calls every function once,
    starting at the ``r``-th (A, B, C, then B, C, A, then C, A, B, ...), so that a burst of load
    from elsewhere, a frequency change or a warm cache left by the previous call falls on all of
    them alike instead of on whichever was being timed at that moment.

    Parameters
    ----------
    fns : mapping of str to callable
        Name -> function called with no arguments; results are discarded. Usually mmcore and
        its anchors on one case.
    warmup : int, default 2
        Untimed calls of each function before the first round.
    repeat : int, default 7
        Rounds taken at least, so each function gets at least this many samples.
    min_time : float, default 0.0
        Keep adding rounds until the slowest function's samples total this many seconds
        (bounded by ``max_repeat`` rounds), so that fast cases get more samples than slow ones
        while a case with one slow function does not run for long.
    max_repeat : int, default 1000
        Upper bound on the number of rounds.
    number : int, default 1
        Calls per sample; the sample's time is divided by it.

    Returns
    -------
    dict of str to Timing
        ``{name: (median, min, runs)}`` in the order of ``fns``; seconds per call.

    The garbage collector is disabled while timing and re-enabled afterwards.

    Examples
    --------
    >>> t = interleaved({"sum": lambda: sum(range(100)), "max": lambda: max(range(100))},
    ...                 warmup=1, repeat=3)
    >>> sorted(t), t["sum"].runs
    (['max', 'sum'], 3)
    """
    if repeat < 1 or number < 1:
        raise ValueError("repeat and number must be >= 1")
    names = list(fns)
    calls = [fns[k] for k in names]
    for fn in calls:
        for _ in range(max(0, warmup)):
            fn()
    samples: List[List[float]] = [[] for _ in calls]
    totals = [0.0] * len(calls)
    gc_was_enabled = gc.isenabled()
    gc.collect()
    gc.disable()
    rounds = 0
    try:
        while calls and (rounds < repeat
                         or (max(totals) < min_time and rounds < max_repeat)):
            for j in range(len(calls)):
                i = (rounds + j) % len(calls)
                fn = calls[i]
                t0 = time.perf_counter()
                for _ in range(number):
                    fn()
                dt = time.perf_counter() - t0
                totals[i] += dt
                samples[i].append(dt / number)
            rounds += 1
    finally:
        if gc_was_enabled:
            gc.enable()
    return {k: Timing(statistics.median(v), min(v), len(v)) for k, v in zip(names, samples)}


def geomean(values: Sequence[float]) -> float:
    """Geometric mean of positive values (``nan`` when there are none)."""
    vals = [v for v in values if v is not None and v > 0 and math.isfinite(v)]
    if not vals:
        return float("nan")
    return math.exp(sum(math.log(v) for v in vals) / len(vals))


# --------------------------------------------------------------------------------------------
# machine ceilings

class Ceilings(NamedTuple):
    """The machine's measured ceilings (see :func:`machine_ceilings`)."""

    gemm_gflops: float   # float32 GEMM through numpy's BLAS, 2*n^3 / best time
    copy_gbps: float     # np.copyto bandwidth, counting read + write bytes (2 * nbytes), best
    gemm_n: int
    copy_bytes: int      # size of one of the two arrays


_first_ceilings: Optional[Ceilings] = None  # the run's first measurement, for the footer
_last_ceilings_repeat = 5


def machine_ceilings(*, gemm_n: int = 2048, copy_mb: int = 256, repeat: int = 5,
                     verbose: bool = True, label: str = "start") -> Ceilings:
    """Measure float32 GEMM GFLOP/s and memory copy bandwidth on this machine, best of a few.

    GEMM: ``np.matmul`` of two ``gemm_n x gemm_n`` float32 matrices into a preallocated output,
    ``2 * n**3`` FLOPs, best (fastest) of ``repeat`` calls. It runs on numpy's BLAS with whatever
    thread count that BLAS currently uses (see :func:`configure_threads`).

    Copy: ``np.copyto`` of a ``copy_mb`` MB float32 array into another one of the same size,
    best of ``repeat`` calls. Bandwidth counts the bytes read plus the bytes written
    (``2 * nbytes``), the convention of the STREAM copy kernel. ``np.copyto`` is single-threaded.

    A ceiling is what the machine can do, so the best call is taken, not the median; the median
    is printed beside it. Every script measures the ceilings at the start of a run, and
    :func:`print_footer` measures them again at its end.
    """
    global _first_ceilings, _last_ceilings_repeat
    rng = np.random.default_rng(0)
    a = rng.standard_normal((gemm_n, gemm_n), dtype=np.float32)
    b = rng.standard_normal((gemm_n, gemm_n), dtype=np.float32)
    c = np.empty((gemm_n, gemm_n), np.float32)
    t = timeit(functools.partial(np.matmul, a, b, out=c), warmup=1, repeat=repeat)
    gemm = 2.0 * gemm_n ** 3 / t.min / 1e9
    del a, b, c

    n = copy_mb * (1 << 20) // 4
    src = np.ones(n, np.float32)
    dst = np.zeros(n, np.float32)  # written once by zeros + first-touch in warm-up
    tc = timeit(functools.partial(np.copyto, dst, src), warmup=1, repeat=repeat)
    copy = 2.0 * src.nbytes / tc.min / 1e9
    nbytes = src.nbytes
    del src, dst

    if verbose:
        print(f"machine ceilings ({label}): float32 GEMM {gemm:8.1f} GFLOP/s   "
              f"(np.matmul {gemm_n}x{gemm_n}, best of {t.runs}; median "
              f"{2.0 * gemm_n ** 3 / t.median / 1e9:.1f})")
        print(f"{'':{len(label) + 21}}memory copy  {copy:8.1f} GB/s      "
              f"(np.copyto {nbytes >> 20} MB float32, read+write bytes = 2 x nbytes, "
              f"best of {tc.runs}; median {2.0 * nbytes / tc.median / 1e9:.1f})")
    result = Ceilings(gemm, copy, gemm_n, nbytes)
    if _first_ceilings is None:
        _first_ceilings = result
        _last_ceilings_repeat = repeat
    return result


# --------------------------------------------------------------------------------------------
# load average and the run footer

LOAD_WARN_PER_CPU = 0.5
"""A run is flagged as loaded when the load from other processes exceeds this many per CPU."""

_start_load: Optional[Tuple[float, float, float]] = None
_start_wall = 0.0
_start_cpu = 0.0


def load_average() -> Optional[Tuple[float, float, float]]:
    """``os.getloadavg()`` (runnable processes averaged over 1, 5, 15 minutes), or None."""
    try:
        return os.getloadavg()
    except (AttributeError, OSError):  # pragma: no cover - not on this platform
        return None


def _load_limit() -> float:
    return LOAD_WARN_PER_CPU * (os.cpu_count() or 1)


def _fmt_load(load: Optional[Tuple[float, float, float]]) -> str:
    if load is None:
        return "unavailable on this platform"
    return (f"{load[0]:.2f} {load[1]:.2f} {load[2]:.2f} (1, 5, 15 min; {os.cpu_count()} CPUs, "
            f"warning above {_load_limit():.1f} = {LOAD_WARN_PER_CPU} per CPU)")


def _process_cpu_seconds() -> float:
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def print_footer(*, repeat: Optional[int] = None) -> bool:
    """Print the end of a run: the ceilings measured again, the load average, and a warning.

    Every benchmark script calls this last. The ceilings are measured as at the start (with the
    same ``repeat`` unless given) and compared with the start. The load average at the end
    counts this run's own threads too, so the load from other processes is estimated as the
    1-minute load average minus the CPUs this process kept busy on average since
    :func:`print_header`. When the load at the start, or that estimate at the end, exceeds
    :data:`LOAD_WARN_PER_CPU` per CPU, or a ceiling moved by more than 10% between start and
    end, a warning says that the run's ratios are not a result.

    Returns
    -------
    bool
        True when the run was quiet (no warning printed).
    """
    print()
    print("-" * 100)
    end = machine_ceilings(repeat=_last_ceilings_repeat if repeat is None else repeat,
                           label="end")
    start = _first_ceilings
    warnings: List[str] = []
    if start is not None and start is not end:
        g = end.gemm_gflops / start.gemm_gflops
        c = end.copy_gbps / start.copy_gbps
        print(f"ceilings end / start: GEMM {g:.2f}, copy {c:.2f}")
        if not (0.9 <= g <= 1.1 and 0.9 <= c <= 1.1):
            warnings.append("a machine ceiling moved by more than 10% between start and end")
    load = load_average()
    print(f"load average at start: {_fmt_load(_start_load)}")
    print(f"load average at end  : {_fmt_load(load)}")
    limit = _load_limit()
    if _start_load is not None and _start_load[0] > limit:
        warnings.append(f"load average {_start_load[0]:.2f} at start is above {limit:.1f}")
    if load is not None:
        wall = time.perf_counter() - _start_wall
        own = (_process_cpu_seconds() - _start_cpu) / wall if _start_wall and wall > 0 else 0.0
        others = max(0.0, load[0] - own)
        print(f"                       this run kept {own:.2f} CPUs busy on average; "
              f"load from others ~ {others:.2f}")
        if others > limit:
            warnings.append(f"load from other processes ~{others:.2f} at end is above "
                            f"{limit:.1f}")
    if warnings:
        print("!" * 100)
        print("WARNING: the machine was not quiet during this run, so its ratios are not a result "
              "(rerun on a quiet machine):")
        for w in warnings:
            print(f"  - {w}")
        print("!" * 100)
    else:
        print("machine quiet at start and end: load below the threshold, ceilings steady")
    return not warnings


# --------------------------------------------------------------------------------------------
# output helpers

def fmt(x: Optional[float], spec: str = ".2f", na: str = "n/a") -> str:
    """Format a number, or ``na`` for None / NaN."""
    if x is None:
        return na
    try:
        if isinstance(x, float) and math.isnan(x):
            return na
    except TypeError:
        pass
    return format(x, spec)


def print_table(headers: Sequence[str], rows: Sequence[Sequence[Any]], *,
                align: Optional[str] = None, file=None) -> None:
    """Print an aligned plain-text table.

    Parameters
    ----------
    headers : sequence of str
    rows : sequence of sequences
        Cells are converted with ``str`` (floats with ``{:.4g}``); format numbers beforehand
        with :func:`fmt` for control over the digits.
    align : str, optional
        One character per column, ``"<"`` (left) or ``">"`` (right). By default the first column
        is left-aligned and the rest right-aligned.
    """
    out = file or sys.stdout
    ncol = len(headers)

    def cell(v: Any) -> str:
        if isinstance(v, float):
            return fmt(v, ".4g")
        return "" if v is None else str(v)

    body = [[cell(v) for v in r] + [""] * (ncol - len(r)) for r in rows]
    widths = [len(h) for h in headers]
    for r in body:
        for i, c in enumerate(r[:ncol]):
            widths[i] = max(widths[i], len(c))
    if align is None:
        align = "<" + ">" * (ncol - 1)

    def line(cells: Sequence[str]) -> str:
        parts = [format(c, f"{align[i]}{widths[i]}") for i, c in enumerate(cells[:ncol])]
        return "  ".join(parts).rstrip()

    print(line(list(headers)), file=out)
    print("  ".join("-" * w for w in widths), file=out)
    for r in body:
        print(line(r), file=out)


def optional_import(name: str, *, purpose: str = "anchor"):
    """Import ``name`` if it is installed; otherwise print why it is skipped and return None."""
    try:
        return importlib.import_module(name)
    except Exception as exc:  # ImportError, or a broken install raising something else
        print(f"[skip] {purpose} {name!r} is unavailable ({type(exc).__name__}: {exc}); "
              "its columns print n/a")
        return None


# --------------------------------------------------------------------------------------------
# threads and the run header

def default_threads() -> int:
    """All CPUs this process may run on (the machine's CPUs unless an affinity mask says less)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # pragma: no cover - non-Linux
        return max(1, os.cpu_count() or 1)


def add_common_args(parser: argparse.ArgumentParser, *,
                    backends: Sequence[str] = ("native", "numba")) -> argparse.ArgumentParser:
    """Add ``--threads``, ``--quick`` and ``--backend`` to a benchmark's argument parser."""
    parser.add_argument("--threads", type=int, default=default_threads(),
                        help="threads for mmcore, torch and (with threadpoolctl) numpy's BLAS "
                             "(default: all CPUs, %(default)s here)")
    parser.add_argument("--quick", action="store_true",
                        help="fewer warm-up calls and repeats: a smoke run, not a measurement")
    parser.add_argument("--backend", choices=list(backends), default=backends[0],
                        help="mmcore backend to measure (default: %(default)s)")
    return parser


_blas_limiter = None  # keeps a threadpoolctl limit alive for the whole run


def configure_threads(n: int, torch=None) -> Dict[str, str]:
    """Use ``n`` threads in mmcore, torch (if given) and numpy's BLAS (if threadpoolctl is there).

    Returns a description of what each library now uses, for :func:`print_header`.
    """
    global _blas_limiter
    if n < 1:
        raise SystemExit(f"--threads must be >= 1, got {n}")
    import mmcore

    info: Dict[str, str] = {}
    mmcore.set_num_threads(n)
    info["mmcore"] = str(mmcore.get_num_threads())
    if torch is not None:
        torch.set_num_threads(n)
        info["torch"] = f"{torch.get_num_threads()} (intra-op)"
    else:
        info["torch"] = "n/a"
    try:
        import threadpoolctl
    except ImportError:
        info["numpy BLAS"] = (f"{_blas_threads_guess()} (its own default: threadpoolctl is not "
                              "installed, so it is not limited to --threads)")
    else:
        _blas_limiter = threadpoolctl.threadpool_limits(limits=n, user_api="blas")
        pools = [p for p in threadpoolctl.threadpool_info() if p.get("user_api") == "blas"]
        desc = ", ".join(f"{p.get('internal_api')} {p.get('num_threads')}" for p in pools)
        info["numpy BLAS"] = f"{desc or n} (limited with threadpoolctl)"
    return info


def _blas_threads_guess() -> str:
    for var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        if os.environ.get(var):
            return f"{os.environ[var]} from {var}"
    return f"default, likely {os.cpu_count()}"


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _blas_name() -> str:
    try:
        cfg = np.__config__.CONFIG["Build Dependencies"]["blas"]
        return f"{cfg.get('name')} {cfg.get('version')}"
    except Exception:
        return "unknown"


def print_header(title: str, *, threads_info: Optional[Dict[str, str]] = None, torch=None,
                 backend: Optional[str] = None, extra: Optional[Dict[str, str]] = None) -> None:
    """Print what a run was made with: machine, mmcore backends, library versions, threads.

    It also records the load average at the start of the run (printed here and again by
    :func:`print_footer`) and the time and CPU time the footer measures the run's own load from.
    """
    global _start_load, _start_wall, _start_cpu
    import mmcore

    _start_load = load_average()
    _start_wall = time.perf_counter()
    _start_cpu = _process_cpu_seconds()

    print("=" * 100)
    print(title)
    print("=" * 100)
    print(f"machine : {_cpu_model()}, {os.cpu_count()} CPUs ({default_threads()} usable), "
          f"{platform.system()} {platform.machine()}, Python {platform.python_version()}")
    try:
        info = mmcore.backends()
    except Exception as exc:
        print(f"mmcore  : {mmcore.__version__}; backends() failed: {type(exc).__name__}: {exc}")
    else:
        nat = info["native"]
        omp = f"openmp {nat['openmp']}, " if "openmp" in nat else ""
        print(f"mmcore  : {mmcore.__version__}; native ISA {nat.get('isa')} "
              f"(compiled: {', '.join(nat.get('compiled_isas', []))}), "
              f"{omp}threads {nat.get('threads')}")
        cu = info["cuda"]
        cu_s = (f"{len(cu.get('devices', []))} device(s)" if cu.get("available")
                else f"absent ({cu.get('reason')})")
        nb = info["numba"]
        nb_s = nb.get("version") if nb.get("available") else f"absent ({nb.get('reason')})"
        print(f"          cuda: {cu_s}; numba: {nb_s}")
    if backend is not None:
        print(f"measured: mmcore backend {backend!r}")
    print(f"numpy   : {np.__version__} (BLAS: {_blas_name()})")
    print(f"torch   : {torch.__version__ if torch is not None else 'not installed'}")
    if threads_info:
        print("threads : " + "; ".join(f"{k} {v}" for k, v in threads_info.items()))
    for k, v in (extra or {}).items():
        print(f"{k:<8}: {v}")
    print(f"load    : {_fmt_load(_start_load)}")
    if _start_load is not None and _start_load[0] > _load_limit():
        print(f"WARNING : load average {_start_load[0]:.2f} is above {_load_limit():.1f}: "
              "ratios measured now are not a result")
    print()
