"""Where kernels are reached from: every kernel call goes through ``mmcore.ops`` and the
launchers of ``mmcore.kernels``; the kernel launchers sit below the ops."""

from __future__ import annotations

import ast
import pathlib

import numpy as np
import pytest

import mmcore
from mmcore.errors import BackendError
from mmcore.kernels import cpu, launcher

PACKAGE = pathlib.Path(mmcore.__file__).resolve().parent


def _modules(*exclude: str):
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE).as_posix()
        if not any(rel == e or rel.startswith(e + "/") for e in exclude):
            yield rel, ast.parse(path.read_text(encoding="utf-8"))


def _imported(tree) -> set:
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = ("." * node.level) + (node.module or "")
            names.add(base)
            names.update(f"{base}.{a.name}" if node.module else f"{base}{a.name}"
                         for a in node.names)
    return names


def test_no_kernel_calls_outside_ops_and_backends():
    offenders = []
    for rel, tree in _modules("ops", "kernels", "_backend.py"):
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "native_module":
                offenders.append(f"{rel}:{node.lineno} calls native_module()")
        for name in _imported(tree):
            if name.endswith("._C") or name == "mmcore._C" or name.endswith("._cuda"):
                offenders.append(f"{rel} imports {name}")
    assert not offenders, offenders


def test_kernels_do_not_import_the_ops():
    offenders = [f"kernels/{rel}: {name}" for rel, tree in _modules()
                 if rel.startswith("kernels/") for name in _imported(tree)
                 if "ops" in name.split(".")]
    assert not offenders, offenders


def test_launcher_finds_every_backend():
    assert launcher("fuse", "native", "fusion", "fuse") is cpu.fuse
    pytest.importorskip("numba")
    fn = launcher("fuse", "numba", "fusion", "fuse")
    assert fn.__name__ == "fuse_numba" and fn.__module__ == "mmcore.kernels.numba.fusion"


def test_launcher_errors(monkeypatch):
    import sys
    monkeypatch.setitem(sys.modules, "mmcore.kernels.cuda.fusion", None)
    with pytest.raises(BackendError, match=r"\[fuse\] this build of mmcore has no CUDA fusion"):
        launcher("fuse", "cuda", "fusion", "fuse")
    with pytest.raises(BackendError, match=r"\[op\] the cuda backend has no nothing kernel"):
        launcher("op", "cuda", "attention", "nothing")


def test_missing_native_kernel_names_the_op(monkeypatch):
    import types

    from mmcore import _backend
    monkeypatch.setattr(_backend, "native_module", lambda: types.SimpleNamespace())
    with pytest.raises(BackendError, match=r"\[stft\] this build of mmcore._C has no spectral "
                                           "kernel"):
        mmcore.ops.stft(np.zeros(1000, np.float32), n_fft=64, backend="native")


def test_cpu_doctest():
    import doctest
    failures, tried = doctest.testmod(cpu, optionflags=doctest.NORMALIZE_WHITESPACE)
    assert tried > 0 and failures == 0
