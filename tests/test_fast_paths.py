"""The per-call fast paths of the hot ops give exactly what their general paths give.

``log_mel_spectrogram`` and ``fuse`` send the common call (a float32 C-contiguous NumPy input,
default options, the native backend) straight to the native kernel, through a cached
``mmcore._C.SpectralPlan`` for the log-mel; everything else takes the general path, which checks
and lays out the arguments first. Both run the same kernel, so their results must be equal bit
for bit, and the inputs that take the general path (non-contiguous, float64, lists, int16) must
give the bits of their float32 C-contiguous equivalent. Plans are cached per parameter set.
"""

from __future__ import annotations

import threading

import numpy as np
import pytest

import mmcore
from mmcore import _backend
from mmcore.errors import BackendError, ShapeError
from mmcore.kernels import PlanCache
from mmcore.ops import audio, fuse, fusion, log_mel_spectrogram


def _signal(T, *lead, seed=0):
    rng = np.random.default_rng(seed)
    return (0.1 * rng.standard_normal(lead + (T,))).astype(np.float32)


def _general_log_mel(x, n_mels=80):
    return audio._log_mel_spectrogram(x, n_mels=n_mels, preset="whisper", padding=0,
                                      backend=None)


def _same(a, b):
    assert type(a) is np.ndarray and a.dtype == b.dtype and a.shape == b.shape
    assert a.flags.c_contiguous
    np.testing.assert_array_equal(a, b)


# ----------------------------------------------------------------------------------------------
# log-mel


@pytest.mark.parametrize("T", [201, 359, 1600, 1601, 16000, 16159])
@pytest.mark.parametrize("n_mels", [80, 128])
def test_log_mel_fast_path_equals_general_path(T, n_mels):
    x = _signal(T, seed=T)
    _same(log_mel_spectrogram(x, n_mels=n_mels), _general_log_mel(x, n_mels))
    _same(log_mel_spectrogram(x, n_mels=n_mels, backend="native"), _general_log_mel(x, n_mels))


@pytest.mark.parametrize("dtype", [np.float64, np.int16])
def test_log_mel_fast_path_converts_like_the_general_path(dtype):
    rng = np.random.default_rng(11)
    if dtype == np.int16:
        x = rng.integers(-32768, 32768, (2, 1777)).astype(np.int16)
        x[0, :3] = (-32768, 32767, 0)
    else:
        x = 0.1 * rng.standard_normal((2, 1777))
        x[0, :3] = (1e-30, -3.4e38, 5e-46)          # underflow to 0 and the float32 edge
    _same(log_mel_spectrogram(x), _general_log_mel(x))
    _same(log_mel_spectrogram(x[1]), _general_log_mel(x[1]))
    if dtype == np.float64:
        x[1, 5] = 1e39                                 # finite, but inf in float32
        with pytest.raises(ShapeError, match=r"x contains Inf samples \(or values beyond the "
                                             r"float32 range\)"):
            log_mel_spectrogram(x)


@pytest.mark.parametrize("lead", [(1,), (3,), (2, 3), (0,)])
def test_log_mel_fast_path_batches(lead):
    x = _signal(1601, *lead, seed=len(lead))
    got = log_mel_spectrogram(x)
    assert got.shape == lead + (80, 10)
    _same(got, _general_log_mel(x))


def test_log_mel_general_inputs_give_the_float32_bits():
    x64 = 0.1 * np.random.default_rng(5).standard_normal((2, 3203))
    x32 = x64.astype(np.float32)
    ref = log_mel_spectrogram(x32)
    _same(log_mel_spectrogram(x64), ref)                               # float64
    _same(log_mel_spectrogram(x32.tolist()), ref)                      # nested lists
    wide = np.zeros((2, 2 * 3203), np.float32)
    wide[:, ::2] = x32
    _same(log_mel_spectrogram(wide[:, ::2]), ref)                      # strided view
    _same(log_mel_spectrogram(np.asfortranarray(x32)), ref)            # Fortran order
    _same(log_mel_spectrogram(x32[0].tolist()), ref[0])                # one list signal
    pcm = np.random.default_rng(6).integers(-3000, 3000, 1777).astype(np.int16)
    _same(log_mel_spectrogram(pcm), log_mel_spectrogram(pcm.astype(np.float32) / 32768))


def test_log_mel_fast_path_errors_are_the_general_ones():
    short = _signal(200)
    with pytest.raises(ShapeError, match=r"^\[log_mel_spectrogram\] x has T = 200 samples, too "
                                         "short"):
        log_mel_spectrogram(short)
    for bad, word in ((np.nan, "NaN"), (np.inf, "Inf"), (-np.inf, "Inf")):
        x = _signal(1600)
        x[777] = bad
        with pytest.raises(ShapeError, match=rf"^\[log_mel_spectrogram\] x contains {word} "
                                             "samples; audio must be finite"):
            log_mel_spectrogram(x)
    with pytest.raises(ShapeError, match=r"^\[log_mel_spectrogram\] x has 0 dims"):
        log_mel_spectrogram(np.float32(1.0))


def test_log_mel_fast_path_follows_the_backend_choice(monkeypatch):
    x = _signal(1600)
    monkeypatch.setenv("MMCORE_BACKEND", "nonsense")
    with pytest.raises(BackendError, match="nonsense"):
        log_mel_spectrogram(x)
    with pytest.raises(BackendError, match="unknown backend 'tpu'"):
        log_mel_spectrogram(x, backend="tpu")
    monkeypatch.delenv("MMCORE_BACKEND")
    _same(log_mel_spectrogram(x), _general_log_mel(x))


def test_log_mel_without_native_plans_takes_the_general_path(monkeypatch):
    import types
    monkeypatch.setattr(_backend, "native_module", lambda: types.SimpleNamespace())
    with pytest.raises(BackendError, match=r"\[log_mel_spectrogram\] this build of mmcore._C has "
                                           "no spectral kernel"):
        log_mel_spectrogram(_signal(1600))


def test_log_mel_from_threads_is_deterministic():
    x = _signal(16000, 2)
    ref = log_mel_spectrogram(x)
    results = [None] * 4

    def work(i):
        for _ in range(5):
            results[i] = log_mel_spectrogram(x)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for r in results:
        _same(r, ref)


def test_whisper_plans_are_cached_per_parameters():
    p80 = audio._whisper_plan(80)
    assert p80 is audio._whisper_plan(80)
    p128 = audio._whisper_plan(128)
    assert p128 is not p80
    assert (p80.rows, p128.rows) == (80, 128)
    log_mel_spectrogram(_signal(1600))
    assert audio._whisper_plan(80) is p80          # the call reused it


def test_spectral_plan_checks_its_input():
    plan = audio._whisper_plan(80)
    with pytest.raises(TypeError, match="float32, float64 or int16"):
        plan.run(np.zeros(1600, np.int32), n_frames=10, num_threads=1)
    with pytest.raises(ValueError, match="C-contiguous"):
        plan.run(np.zeros((1600, 2), np.float32).T, n_frames=10, num_threads=1)
    with pytest.raises(ValueError, match="n_frames"):
        plan.run(np.zeros(1600, np.float32), n_frames=-1, num_threads=1)
    x = np.zeros(1600, np.float32)
    assert plan.run(x, n_frames=10, num_threads=1).shape == (80, 10)
    x[3] = np.nan
    assert plan.run(x, n_frames=10, num_threads=1) is None
    assert plan.run(x, n_frames=10, num_threads=1, check_finite=False).shape == (80, 10)


# ----------------------------------------------------------------------------------------------
# plan cache


def test_plan_cache_is_bounded_and_reuses_plans():
    cache = PlanCache(maxsize=3)
    built = []

    def build(k):
        def make():
            built.append(k)
            return object()
        return make

    assert cache.get("a") is None
    a = cache.get_or_build("a", build("a"))
    assert cache.get_or_build("a", build("a")) is a and built == ["a"] and cache.get("a") is a
    b = cache.get_or_build("b", build("b"))
    assert b is not a
    for k in "cde":
        cache.get_or_build(k, build(k))
    assert len(cache) == 3 and "a" not in cache and "e" in cache
    cache.clear()
    assert len(cache) == 0
    with pytest.raises(ValueError):
        PlanCache(maxsize=0)


def test_plan_cache_threads_share_one_plan():
    cache = PlanCache(maxsize=4)
    barrier = threading.Barrier(4)
    got = [None] * 4

    def work(i):
        barrier.wait()
        got[i] = cache.get_or_build("k", object)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(g is got[0] for g in got) and len(cache) == 1


# ----------------------------------------------------------------------------------------------
# fuse


def _general_fuse(emb, strategy):
    return fusion._fuse(emb, strategy=strategy, weights=None, query=None, present=None,
                        return_weights=False, out=None, backend=None)


@pytest.mark.parametrize("strategy", ["mean", "sum", "max", "concat"])
@pytest.mark.parametrize("B, M, D", [(1, 1, 1), (1, 3, 7), (2, 2, 64), (8, 3, 513),
                                     (3, 5, 17)])
def test_fuse_fast_path_equals_general_path(strategy, B, M, D):
    rng = np.random.default_rng(B * 100 + M * 10 + D)
    e = rng.standard_normal((B, M, D), dtype=np.float32)
    _same(fuse(e, strategy=strategy), _general_fuse(e, strategy))
    items = [np.ascontiguousarray(e[:, m]) for m in range(M)]
    _same(fuse(items, strategy=strategy), _general_fuse(items, strategy))
    _same(fuse(tuple(items), strategy=strategy), _general_fuse(items, strategy))
    ref = fuse(e, strategy=strategy)
    _same(fuse(items, strategy=strategy), ref)
    # general-path inputs give the bits of their float32 C-contiguous equivalent
    _same(fuse(e.astype(np.float64), strategy=strategy), ref)
    _same(fuse(np.asfortranarray(e), strategy=strategy), ref)
    _same(fuse([e[:, m].tolist() for m in range(M)], strategy=strategy), ref)  # lists
    _same(fuse([e[:, m] for m in range(M)], strategy=strategy), ref)          # strided items
    _same(fuse([a.astype(np.float64) for a in items], strategy=strategy), ref)


@pytest.mark.parametrize("strategy", ["mean", "sum", "max", "concat"])
@pytest.mark.parametrize("B, M, D", [(1, 2, 5), (2, 3, 64), (8, 4, 17)])
def test_fuse_fast_path_with_present_equals_general_path(strategy, B, M, D):
    rng = np.random.default_rng(B + M + D)
    e = rng.standard_normal((B, M, D), dtype=np.float32)
    present = rng.random((B, M)) < 0.6
    present[0] = False                                  # a row without any modality
    items = [np.ascontiguousarray(e[:, m]) for m in range(M)]

    def general(emb, p):
        return fusion._fuse(emb, strategy=strategy, weights=None, query=None, present=p,
                            return_weights=False, out=None, backend=None)

    ref = general(e, present)
    _same(fuse(e, strategy=strategy, present=present), ref)
    _same(fuse(items, strategy=strategy, present=present), general(items, present))
    # masks the general path converts: integers, (M,), strided
    _same(fuse(e, strategy=strategy, present=present.astype(np.int64)), ref)
    wide = np.zeros((B, 2 * M), bool)
    wide[:, ::2] = present
    _same(fuse(e, strategy=strategy, present=wide[:, ::2]), ref)
    _same(fuse(e, strategy=strategy, present=present[0]), general(e, present[0]))


@pytest.mark.parametrize("op", ["masked_mean", "masked_max"])
@pytest.mark.parametrize("B, L, D", [(1, 1, 1), (1, 7, 64), (2, 3, 513), (8, 33, 17)])
def test_masked_reduce_fast_path_equals_general_path(op, B, L, D):
    fn = getattr(mmcore.ops, op)
    rng = np.random.default_rng(B * L * D)
    x = rng.standard_normal((B, L, D), dtype=np.float32)
    mask = rng.random((B, L)) < 0.7
    mask[0] = False
    for m in (None, mask):
        out = np.empty((B, D), np.float32)
        ref = fn(x, m, out=out)                         # out= takes the general path
        _same(fn(x, m), ref)
        _same(fn(x.astype(np.float64), m), ref)
        _same(fn(np.asfortranarray(x), m), ref)
    ref = fn(x, mask)
    _same(fn(x, mask.astype(np.int64)), ref)
    _same(fn(x, np.asfortranarray(mask)), ref)


def test_masked_reduce_fast_path_leaves_the_rest_to_the_general_path(monkeypatch):
    x = np.ones((2, 3, 4), np.float32)
    _same(mmcore.ops.masked_mean(np.ones((0, 3, 4), np.float32)), np.zeros((0, 4), np.float32))
    _same(mmcore.ops.masked_max(np.ones((2, 0, 4), np.float32)), np.zeros((2, 4), np.float32))
    with pytest.raises(ShapeError, match=r"^\[masked_mean\] mask has shape \(2, 4\)"):
        mmcore.ops.masked_mean(x, np.ones((2, 4), bool))
    monkeypatch.setenv("MMCORE_BACKEND", "nonsense")
    with pytest.raises(BackendError, match="nonsense"):
        mmcore.ops.masked_max(x)


def test_fuse_fast_path_leaves_the_rest_to_the_general_path(monkeypatch):
    e = np.ones((2, 3, 4), np.float32)
    for empty in (np.ones((0, 3, 4), np.float32), np.ones((2, 3, 0), np.float32)):
        _same(fuse(empty, strategy="mean"), _general_fuse(empty, "mean"))
    with pytest.raises(ShapeError, match=r"^\[fuse\] embeddings has M = 0"):
        fuse(np.ones((2, 0, 4), np.float32), strategy="mean")
    with pytest.raises(ShapeError, match=r"^\[fuse\] embeddings\[1\] has B = 3"):
        fuse([np.ones((2, 4), np.float32), np.ones((3, 4), np.float32)], strategy="mean")
    with pytest.raises(ShapeError, match=r"^\[fuse\] embeddings\[1\] has D = 5"):
        fuse([np.ones((2, 4), np.float32), np.ones((2, 5), np.float32)], strategy="sum")
    assert fuse([np.ones((2, 4), np.float32), np.ones((2, 5), np.float32)],
                strategy="concat").shape == (2, 9)
    with pytest.raises(mmcore.errors.ArgumentError, match=r"^\[fuse\] strategy must be one of"):
        fuse(e, strategy=["mean"])
    with pytest.raises(mmcore.errors.ArgumentError, match="return_weights"):
        fuse(e, strategy="mean", return_weights=1)
    monkeypatch.setenv("MMCORE_BACKEND", "nonsense")
    with pytest.raises(BackendError, match="nonsense"):
        fuse(e, strategy="mean")
    monkeypatch.delenv("MMCORE_BACKEND")
    _same(fuse(e, strategy="mean"), np.ones((2, 4), np.float32))


# ----------------------------------------------------------------------------------------------
# backend choice


def test_default_backend_reads_the_environment_every_call(monkeypatch):
    monkeypatch.delenv("MMCORE_BACKEND", raising=False)
    assert _backend.default_host_backend() == "native"
    monkeypatch.setenv("MMCORE_BACKEND", "numba")
    assert _backend.default_host_backend() == "numba"
    with mmcore.use_backend("native"):
        assert _backend.default_host_backend() == "native"
    monkeypatch.setenv("MMCORE_BACKEND", "")
    assert _backend.default_host_backend() == "native"
    monkeypatch.setattr("os.environ", {"MMCORE_BACKEND": "numba"})
    assert _backend.default_host_backend() == "numba"


def test_num_threads_read_follows_set_num_threads():
    n = mmcore.get_num_threads()
    try:
        mmcore.set_num_threads(1)
        assert _backend.get_num_threads() == 1
        mmcore.set_num_threads(2)
        assert _backend.get_num_threads() == 2
    finally:
        mmcore.set_num_threads(n)
