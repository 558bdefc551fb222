"""One version source: ``mmcore/_version.py``; the build metadata and the native module follow
it."""

from __future__ import annotations

import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent


def _pyproject():
    tomllib = pytest.importorskip("tomllib")
    return tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))


def test_pyproject_reads_the_version_from_the_package():
    data = _pyproject()
    assert "version" not in data["project"]
    assert "version" in data["project"]["dynamic"]
    version = data["tool"]["scikit-build"]["metadata"]["version"]
    assert version["provider"] == "scikit_build_core.metadata.regex"
    assert version["input"] == "mmcore/_version.py"


def test_version_file_holds_one_plain_version():
    text = (ROOT / "mmcore" / "_version.py").read_text(encoding="utf-8")
    found = re.findall(r'(?m)^__version__ = "([^"]+)"$', text)
    assert len(found) == 1
    assert re.fullmatch(r"\d+\.\d+\.\d+([ab]|rc)?\d*(\.dev\d+)?", found[0])


def test_package_and_native_module_agree():
    import mmcore
    from mmcore._backend import native_module

    text = (ROOT / "mmcore" / "_version.py").read_text(encoding="utf-8")
    assert f'__version__ = "{mmcore.__version__}"' in text
    assert native_module().__version__ == mmcore.__version__
