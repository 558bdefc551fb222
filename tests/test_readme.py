"""The README's Python snippets run as written (each in a fresh interpreter, in a temporary
folder, with the snippets before it: a later snippet may use what an earlier one made)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
import textwrap

import pytest

README = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")


def python_blocks() -> list:
    with open(README, encoding="utf-8") as fh:
        text = fh.read()
    blocks = re.findall(r"^( *)```python\n(.*?)^\1```", text, flags=re.S | re.M)
    return [textwrap.dedent(code) for _, code in blocks]


def test_readme_has_python_snippets():
    assert len(python_blocks()) >= 2


@pytest.mark.parametrize("index", range(len(python_blocks())))
def test_readme_snippet_runs(index):
    code = python_blocks()[index]
    env = dict(os.environ)
    env.pop("PYTHONPATH", None)
    env.setdefault("MMCORE_NUM_THREADS", "2")
    with tempfile.TemporaryDirectory() as d:
        r = subprocess.run([sys.executable, "-c", code], cwd=d, capture_output=True, text=True,
                           timeout=300, env=env)
    assert r.returncode == 0, f"README snippet {index} failed:\n{code}\n{r.stderr[-3000:]}"
