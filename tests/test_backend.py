"""Backend selection, thread count, ISA dispatch, errors hierarchy and the CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile

import numpy as np
import pytest

import mmcore
from mmcore import errors
from mmcore.ops import attention
from reference import attention_ref

# Subprocesses run outside the source tree so that they import the installed package
# (with its compiled modules), not the mmcore/ folder of a checkout.
_OUTSIDE_SOURCE = tempfile.gettempdir()

def _inputs(seed=0, B=2, H=3, Lq=37, Lk=131, D=40, Dv=24):
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((B, H, Lq, D), dtype=np.float32)
    k = rng.standard_normal((B, H, Lk, D), dtype=np.float32)
    v = rng.standard_normal((B, H, Lk, Dv), dtype=np.float32)
    return q, k, v


def test_backends_report():
    info = mmcore.backends()
    assert set(info) == {"native", "cuda", "numba"}
    nat = info["native"]
    assert nat["available"] is True
    assert nat["isa"] in nat["compiled_isas"]
    assert "baseline" in nat["compiled_isas"]
    assert nat["threads"] >= 1
    cuda = info["cuda"]
    assert isinstance(cuda["available"], bool)
    if not cuda["available"]:
        assert cuda["reason"]


def test_isa_matches_cpu():
    from mmcore import _C
    nat = mmcore.backends()["native"]
    feats = set(nat["cpu_features"])
    avx512 = {"avx512f", "avx512bw", "avx512dq", "avx512vl"}
    if "avx512" in nat["compiled_isas"] and avx512 <= feats:
        assert nat["isa"] == "avx512"
    elif "avx2" in nat["compiled_isas"] and {"avx2", "fma"} <= feats:
        assert nat["isa"] == "avx2"
    else:
        assert nat["isa"] == "baseline"
    assert _C.isa_level() == nat["isa"]


@pytest.mark.parametrize("isa", ["baseline", "avx2", "avx512"])
def test_every_compiled_isa_matches_reference(isa):
    from mmcore import _C
    before = _C.isa_level()
    if isa not in _C.compiled_isas():
        pytest.skip(f"{isa} not compiled on this platform")
    try:
        if not _C.set_isa_cap(isa):
            pytest.skip(f"{isa} not supported by this CPU")
        assert _C.isa_level() == isa
        for shape in [(1, 1, 1, 1, 1, 1), (2, 3, 37, 131, 40, 24), (1, 2, 2, 300, 31, 17),
                      (1, 1, 70, 257, 64, 64), (2, 1, 13, 129, 128, 3)]:
            B, H, Lq, Lk, D, Dv = shape
            q, k, v = _inputs(1, B, H, Lq, Lk, D, Dv)
            kl = np.random.default_rng(2).integers(0, Lk + 1, B)
            mask = np.random.default_rng(3).random((Lq, Lk)) > 0.25
            out, w, lse = attention(q, k, v, key_lengths=kl, mask=mask, return_weights=True,
                                    return_lse=True)
            ro, rw, rl = attention_ref(q, k, v, key_lengths=kl, mask=mask)
            np.testing.assert_allclose(out, ro, atol=2e-5, rtol=1e-4)
            np.testing.assert_allclose(w, rw, atol=2e-6, rtol=1e-4)
            np.testing.assert_allclose(lse, rl, atol=2e-5, rtol=1e-5)
    finally:
        _C.set_isa_cap(before)


def test_isa_env_cap_in_subprocess():
    code = "import mmcore; print(mmcore.backends()['native']['isa'])"
    env = dict(os.environ, MMCORE_ISA="baseline")
    out = subprocess.run(cwd=_OUTSIDE_SOURCE, args=[sys.executable, "-c", code], env=env,
                         capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.strip() == "baseline"


def test_set_num_threads_and_results_independent_of_threads():
    q, k, v = _inputs(4, B=3, H=4, Lq=50, Lk=200)
    old = mmcore.get_num_threads()
    try:
        mmcore.set_num_threads(1)
        assert mmcore.get_num_threads() == 1
        a = attention(q, k, v)
        mmcore.set_num_threads(3)
        b = attention(q, k, v)
    finally:
        mmcore.set_num_threads(old)
    np.testing.assert_array_equal(a, b)
    for bad in (0, -1, 1.5, "2", True):
        with pytest.raises(errors.ArgumentError, match="set_num_threads"):
            mmcore.set_num_threads(bad)


@pytest.mark.parametrize("bad", [0, -1, 1.5, "2", None, True, np.bool_(True), 2.0, 100000,
                                 2 ** 63, "max+1"])
def test_set_num_threads_refuses_bad_counts_with_argument_error(bad):
    if bad == "max+1":
        bad = mmcore._backend.max_num_threads() + 1
    old = mmcore.get_num_threads()
    with pytest.raises(errors.ArgumentError, match=r"^\[set_num_threads\] n\b") as info:
        mmcore.set_num_threads(bad)
    assert isinstance(info.value, TypeError) and isinstance(info.value, ValueError)
    assert mmcore.get_num_threads() == old              # nothing changed


def test_set_num_threads_takes_numpy_ints_up_to_the_cap():
    old = mmcore.get_num_threads()
    cap = mmcore._backend.max_num_threads()
    assert cap == 8 * (os.cpu_count() or 1)
    try:
        mmcore.set_num_threads(np.int64(2))
        assert mmcore.get_num_threads() == 2 and type(mmcore.get_num_threads()) is int
        mmcore.set_num_threads(cap)
        assert mmcore.get_num_threads() == cap
    finally:
        mmcore.set_num_threads(old)


def test_num_threads_env_beyond_the_cap(monkeypatch):
    monkeypatch.setenv("MMCORE_NUM_THREADS", str(mmcore._backend.max_num_threads() + 1))
    with pytest.raises(errors.BackendError, match="MMCORE_NUM_THREADS"):
        mmcore._backend._default_threads()


@pytest.mark.parametrize("name", ["tpu", 3, None.__class__, ["native"]])
def test_unknown_backend_is_a_backend_and_an_argument_error(name):
    q = np.ones((1, 1, 2, 4), np.float32)
    with pytest.raises(errors.BackendError, match=r"^\[attention\] unknown backend") as info:
        attention(q, q, q, backend=name)
    assert isinstance(info.value, errors.ArgumentError)
    with pytest.raises(errors.ArgumentError, match=r"^\[use_backend\] unknown backend"):
        mmcore.use_backend(name)


def test_native_pool_never_starts_more_threads_than_the_cap():
    # The private kernels take any int: the pool itself clamps to 8 threads per CPU. Run in a
    # fresh process so that the thread count starts from a known pool.
    code = """if True:
        import os, numpy as np
        from mmcore import _backend
        C = _backend.native_module()
        before = len(os.listdir("/proc/self/task"))
        rows = 4 * _backend.max_num_threads()      # enough tasks to want more threads
        x = np.ones((rows, 16, 8), np.float32)
        out = np.empty((rows, 8), np.float32)
        C.masked_mean(x, None, out, num_threads=100000)
        q = np.ones((4, 8, 64, 16), np.float32)
        o = np.empty_like(q)
        C.attention(q, q, q, o, None, None, None, None, None, scale=0.25, dropout=False, seed=0,
                    threshold=0, dropout_scale=1.0, num_threads=2 ** 31 - 1)
        assert np.allclose(out, 1.0) and np.allclose(o, 1.0)
        print(before, len(os.listdir("/proc/self/task")), _backend.max_num_threads())
    """
    out = subprocess.run(cwd=_OUTSIDE_SOURCE, args=[sys.executable, "-c", code],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    before, after, cap = (int(v) for v in out.stdout.split())
    assert after - before <= cap - 1          # the caller is the cap's first thread


def test_num_threads_env_in_subprocess():
    code = "import mmcore; print(mmcore.get_num_threads())"
    env = dict(os.environ, MMCORE_NUM_THREADS="3")
    out = subprocess.run(cwd=_OUTSIDE_SOURCE, args=[sys.executable, "-c", code], env=env,
                         capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.strip() == "3"


def test_use_backend_context_and_keyword():
    pytest.importorskip("numba")
    q, k, v = _inputs(5)
    ref = attention(q, k, v, backend="native")
    with mmcore.use_backend("numba"):
        got = attention(q, k, v)
    np.testing.assert_allclose(got, ref, atol=2e-5, rtol=1e-4)
    np.testing.assert_allclose(attention(q, k, v, backend="numba"), ref, atol=2e-5, rtol=1e-4)


def test_backend_env_var(monkeypatch):
    q, k, v = _inputs(6)
    monkeypatch.setenv("MMCORE_BACKEND", "nonsense")
    with pytest.raises(errors.BackendError, match="nonsense"):
        attention(q, k, v)
    monkeypatch.setenv("MMCORE_BACKEND", "native")
    attention(q, k, v)


def test_unknown_backend_and_cuda_on_host():
    q, k, v = _inputs(7)
    with pytest.raises(errors.BackendError, match="unknown backend"):
        attention(q, k, v, backend="tpu")
    with pytest.raises(errors.BackendError, match="host arrays"):
        attention(q, k, v, backend="cuda")
    with pytest.raises(errors.BackendError):
        mmcore.use_backend("gpu")


def test_error_hierarchy():
    for name in ["ConfigError", "ShapeError", "ModalityError", "BackendError", "ModelFormatError",
                 "ProtocolError", "AuthError", "NodeUnavailableError"]:
        cls = getattr(errors, name)
        assert issubclass(cls, errors.MMCoreError)
    assert issubclass(errors.ShapeError, ValueError)
    assert issubclass(errors.ConfigError, ValueError)


def test_kernel_releases_gil():
    import threading
    import time
    q, k, v = _inputs(8, B=4, H=8, Lq=256, Lk=1024, D=64, Dv=64)
    ticks = []
    stop = threading.Event()

    def ticker():
        while not stop.is_set():
            ticks.append(time.perf_counter())
            time.sleep(0.001)

    t = threading.Thread(target=ticker)
    t.start()
    try:
        t0 = time.perf_counter()
        for _ in range(3):
            attention(q, k, v)
        t1 = time.perf_counter()
    finally:
        stop.set()
        t.join(timeout=10)
    during = [x for x in ticks if t0 <= x <= t1]
    # With the GIL held for the whole call the ticker could not run at all during the calls.
    assert len(during) >= 3


def test_cli_info_json():
    out = subprocess.run(cwd=_OUTSIDE_SOURCE,
                         args=[sys.executable, "-m", "mmcore", "info", "--json"],
                         capture_output=True, text=True, timeout=300, check=True)
    info = json.loads(out.stdout)
    assert info["version"] == mmcore.__version__
    assert info["backends"]["native"]["available"] is True
    assert info["attention_self_check_max_abs_err"] < 1e-4


def test_cli_info_text():
    out = subprocess.run(cwd=_OUTSIDE_SOURCE,
                         args=[sys.executable, "-m", "mmcore", "info", "--threads", "1"],
                         capture_output=True, text=True, timeout=300, check=True)
    assert "native" in out.stdout and "cuda" in out.stdout and "threads 1" in out.stdout


def test_concurrent_callers_get_correct_results():
    from concurrent.futures import ThreadPoolExecutor
    cases = [_inputs(10 + i, B=2, H=2, Lq=20 + i, Lk=100 + 7 * i) for i in range(8)]
    expected = [attention(*c) for c in cases]
    with ThreadPoolExecutor(max_workers=6) as ex:
        for _ in range(3):
            got = list(ex.map(lambda c: attention(*c), cases))
            for g, e in zip(got, expected):
                np.testing.assert_array_equal(g, e)


def test_pool_works_in_forked_child():
    code = r"""
import os, sys, numpy as np, mmcore
from mmcore.ops import attention
mmcore.set_num_threads(2)
rng = np.random.default_rng(0)
q = rng.standard_normal((4, 4, 64, 32), dtype=np.float32)
a = attention(q, q, q)
pid = os.fork()
if pid == 0:
    b = attention(q, q, q)
    os._exit(0 if np.array_equal(a, b) else 3)
_, status = os.waitpid(pid, 0)
sys.exit(os.waitstatus_to_exitcode(status))
"""
    if not hasattr(os, "fork"):
        pytest.skip("no fork on this platform")
    res = subprocess.run(cwd=_OUTSIDE_SOURCE, args=[sys.executable, "-c", code],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
