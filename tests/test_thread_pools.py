"""mmcore's thread pools (native and numba fallback) must not slow torch in the same process.

Each sequence runs in its own interpreter (the order of imports and first calls is what matters)
and compares the median time of torch's ``scaled_dot_product_attention`` on two threads with that
of a fresh interpreter. The bound (1.8x, best of two attempts) is loose enough for noise and still
catches the 60x slowdown of numba's ``omp`` layer competing with torch's OpenMP runtime.
Concurrent numba-backed calls from four Python threads must not abort the process.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import textwrap

import pytest

pytest.importorskip("torch")
pytest.importorskip("numba")

pytestmark = pytest.mark.slow

_PRELUDE = textwrap.dedent("""
    import sys, time
    import numpy as np

    def torch_ms():
        import torch
        import torch.nn.functional as F
        torch.set_num_threads(2)
        g = torch.Generator().manual_seed(0)
        q = torch.randn(8, 8, 77, 64, generator=g)
        k = torch.randn(8, 8, 577, 64, generator=g)
        F.scaled_dot_product_attention(q, k, k)
        ts = []
        for _ in range(10):
            s = time.perf_counter()
            F.scaled_dot_product_attention(q, k, k)
            ts.append(time.perf_counter() - s)
        return float(np.median(ts)) * 1e3

    def mm(backend):
        import mmcore
        from mmcore.ops import attention
        rng = np.random.default_rng(0)
        q = rng.standard_normal((2, 4, 17, 32), dtype=np.float32)
        k = rng.standard_normal((2, 4, 61, 32), dtype=np.float32)
        out = attention(q, k, k, backend=backend)
        assert np.isfinite(out).all()
""")

_SEQUENCES = {
    "fresh": "print('MS', torch_ms())",
    "numba_first": "mm('numba'); print('MS', torch_ms())",
    "torch_first": "torch_ms(); mm('numba'); print('MS', torch_ms())",
    "native_first": "mm('native'); print('MS', torch_ms())",
    "native_after": "torch_ms(); mm('native'); print('MS', torch_ms())",
    "alternating": textwrap.dedent("""
        t = []
        for _ in range(3):
            mm('native'); mm('numba'); t.append(torch_ms())
        print('MS', min(t))
    """),
    "fork": textwrap.dedent("""
        import multiprocessing as mp
        import torch
        torch.set_num_threads(2)

        def child(queue):
            mm('native'); mm('numba')
            queue.put(torch_ms())

        if __name__ == '__main__':
            ctx = mp.get_context('fork')
            queue = ctx.Queue()
            p = ctx.Process(target=child, args=(queue,))
            p.start()
            ms = queue.get(timeout=240)
            p.join(60)
            assert p.exitcode == 0, p.exitcode
            print('MS', ms)
    """),
}


def _run(code: str, timeout: float = 300) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env.pop("NUMBA_THREADING_LAYER", None)
    return subprocess.run([sys.executable, "-c", code], cwd=tempfile.gettempdir(), env=env,
                          capture_output=True, text=True, timeout=timeout)


def _ms(sequence: str) -> float:
    proc = _run(_PRELUDE + _SEQUENCES[sequence])
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("MS ")]
    assert lines, proc.stdout[-2000:]
    return float(lines[-1].split()[1])


@pytest.mark.parametrize("sequence", [s for s in _SEQUENCES if s != "fresh"])
def test_torch_not_slowed(sequence):
    ratios = []
    for _ in range(2):
        fresh = _ms("fresh")
        ratios.append(_ms(sequence) / fresh)
        if ratios[-1] < 1.8:
            break
    assert min(ratios) < 1.8, f"{sequence}: torch SDPA {min(ratios):.2f}x its fresh time"


def test_numba_ops_from_four_threads():
    code = textwrap.dedent("""
        import threading
        import numpy as np
        from mmcore.ops import attention, masked_mean
        rng = np.random.default_rng(0)
        q = rng.standard_normal((2, 3, 13, 16), dtype=np.float32)
        k = rng.standard_normal((2, 3, 29, 16), dtype=np.float32)
        x = rng.standard_normal((7, 5, 3), dtype=np.float32)
        ref = attention(q, k, k, backend='numba')
        ref_mean = masked_mean(x, backend='numba')
        errors = []

        def work():
            try:
                for i in range(2000):
                    np.testing.assert_array_equal(masked_mean(x, backend='numba'), ref_mean)
                    if i % 40 == 0:
                        np.testing.assert_array_equal(attention(q, k, k, backend='numba'), ref)
            except BaseException as exc:  # noqa: BLE001
                errors.append(exc)

        threads = [threading.Thread(target=work) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not errors, errors
        print('OK')
    """)
    proc = _run(code, timeout=240)
    assert proc.returncode == 0 and "OK" in proc.stdout, proc.stderr[-2000:]


def test_user_threading_layer_is_kept():
    code = textwrap.dedent("""
        import numba
        numba.config.THREADING_LAYER = 'forksafe'
        import mmcore.kernels.numba as nb
        assert nb.threading_layer_choice() == 'user'
        assert numba.config.THREADING_LAYER == 'forksafe'
        print('OK')
    """)
    proc = _run(code, timeout=120)
    assert proc.returncode == 0 and "OK" in proc.stdout, proc.stderr[-2000:]
