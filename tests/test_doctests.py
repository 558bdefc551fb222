"""Every docstring example of the installed package runs, one test per module.

This is what ``pytest --doctest-modules`` does, but on the *installed* ``mmcore`` (the one that
has the compiled ``_C`` module), not on the source tree, which a regular install leaves without
it. Modules are found on disk below ``mmcore.__path__`` without importing them; ``__main__.py``
is left out (importing it runs the command line), as ``--doctest-modules`` does. The option flags
are the ``doctest_optionflags`` of the pytest configuration (``pyproject.toml``), so that
``pytest --doctest-modules --pyargs mmcore`` agrees with this file.

A module, or a docstring, that needs an optional dependency which is not installed (the CUDA
module, cupy, torch, ray, ...) is skipped with the missing name as the reason; anything else that
goes wrong, an import error included, fails with the doctest report.
"""

from __future__ import annotations

import doctest
import importlib
import importlib.util
import io
import os
import re

import pytest

import mmcore

#: Top-level modules that mmcore, or its docstring examples, may use only when installed.
OPTIONAL_MODULES = frozenset({
    "av", "blake3", "cupy", "cv2", "kaldi_native_fbank", "librosa", "numba", "onnx",
    "onnxruntime", "prometheus_client", "ray", "skimage", "tokenizers", "torch", "transformers",
    "mmcore._cuda",
})

_IMPORT = re.compile(r"^\s*(?:import|from)\s+([\w.]+)", re.MULTILINE)


def _module_names(package=mmcore):
    """Dotted names of the package's ``.py`` modules (packages included, ``__main__`` not)."""
    root = os.path.dirname(package.__file__)
    names = []
    for folder, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs
                         if os.path.isfile(os.path.join(folder, d, "__init__.py")))
        rel = os.path.relpath(folder, root)
        prefix = package.__name__ if rel == "." else \
            package.__name__ + "." + rel.replace(os.sep, ".")
        for f in sorted(files):
            if not f.endswith(".py") or f == "__main__.py":
                continue
            names.append(prefix if f == "__init__.py" else f"{prefix}.{f[:-3]}")
    return names


def _missing_optional(name):
    """The optional module ``name`` belongs to when it cannot be imported, else None."""
    for opt in OPTIONAL_MODULES:
        if name == opt or name.startswith(opt + "."):
            try:
                found = importlib.util.find_spec(opt) is not None
            except (ImportError, ValueError):
                found = False
            return None if found else opt
    return None


def _optionflags(config):
    flags = 0
    for name in config.getini("doctest_optionflags"):
        flags |= doctest.OPTIONFLAGS_BY_NAME[name]
    return flags


MODULES = _module_names()


def test_modules_are_found():
    assert "mmcore" in MODULES and "mmcore.errors" in MODULES
    assert not any(m.endswith("__main__") for m in MODULES)


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name, pytestconfig, request):
    try:
        module = importlib.import_module(name)
    except ModuleNotFoundError as exc:
        missing = _missing_optional(exc.name or "")
        if missing is None:
            raise
        pytest.skip(f"{name} needs {missing}, which is not installed")

    # Examples may change process-wide settings (set_num_threads does); later tests see none of it.
    threads = mmcore.get_num_threads()
    try:
        _run_examples(module, name, pytestconfig, request.node)
    finally:
        mmcore.set_num_threads(threads)


def _run_examples(module, name, pytestconfig, node):
    finder = doctest.DocTestFinder(exclude_empty=True)
    runner = doctest.DocTestRunner(optionflags=_optionflags(pytestconfig), verbose=False)
    report = io.StringIO()
    skipped = []
    any_examples = False
    for test in finder.find(module, name):
        if not test.examples:
            continue
        any_examples = True
        needs = {m for ex in test.examples if not ex.options.get(doctest.SKIP)
                 for m in _IMPORT.findall(ex.source)}
        missing = sorted({opt for m in needs if (opt := _missing_optional(m))})
        if missing:
            skipped.append(f"{test.name} (needs {', '.join(missing)})")
            continue
        try:
            runner.run(test, out=report.write, clear_globs=True)
        finally:
            test.globs.clear()
    node.user_properties.append(("doctest_examples", runner.tries))  # summed in conftest.py
    assert runner.failures == 0, (
        f"{runner.failures} of {runner.tries} examples failed in {name}:\n" + report.getvalue())
    if skipped:
        pytest.skip(f"{runner.tries} examples passed; not run: {'; '.join(skipped)}")
    if runner.tries == 0 and any_examples:
        pytest.skip(f"every example in {name} is marked +SKIP")
