"""The import graph between the package's top-level parts points down the layer order only.

Every import counts (module level or inside a function, and ``importlib.import_module``
strings); ``tests/_structure.py`` computes the graph from the sources (``python
tests/_structure.py --modules`` prints it).
"""

from __future__ import annotations

import ast
import functools
import textwrap

import pytest

from _structure import PACKAGE_DIR, import_graph, module_files, module_sizes

#: The layers, lowest first: a part imports only parts of lower layers. ``mmcore`` is the
#: package facade (``mmcore/__init__.py``): it re-exports from the layers below and loads the
#: model on first use, so only the parts above it may import it.
LAYERS = [
    {"mmcore._C", "mmcore._cuda"},                   # the native modules (no Python imports)
    {"mmcore.errors"},
    {"mmcore.modality", "mmcore._files", "mmcore._backend", "mmcore._precision",
     "mmcore._version", "mmcore._viz_figures"},
    {"mmcore.kernels"},
    {"mmcore.config", "mmcore.ops"},
    {"mmcore.preprocess", "mmcore.cache", "mmcore.viz"},
    {"mmcore.model"},
    {"mmcore"},
    {"mmcore.distributed", "mmcore.features", "mmcore.demo", "mmcore.hf"},
    {"mmcore.cli"},
    {"mmcore.__main__"},
]

#: Upward imports not fixed yet, each with the reason; the test fails once one is gone, so
#: that the list only shrinks.
KNOWN_UPWARD: dict = {}

LEVEL = {part: i for i, layer in enumerate(LAYERS) for part in layer}


@functools.lru_cache(maxsize=1)
def _graph():
    return import_graph()


def _violations(graph):
    out = {}
    for src, deps in graph.items():
        for dst, where in deps.items():
            if LEVEL[dst] >= LEVEL[src]:
                out[(src, dst)] = where
    return out


def test_every_part_has_a_layer():
    graph = _graph()
    parts = set(graph) | {d for deps in graph.values() for d in deps}
    missing = sorted(parts - set(LEVEL))
    assert not missing, f"parts without a layer in LAYERS: {missing}"


def test_imports_point_down_the_layers():
    bad = {edge: where for edge, where in _violations(_graph()).items()
           if edge not in KNOWN_UPWARD}
    assert not bad, "imports against the layer order:\n" + "\n".join(
        f"  {src} -> {dst}: {', '.join(where)}" for (src, dst), where in sorted(bad.items()))


def test_known_upward_imports_are_still_there():
    found = _violations(_graph())
    gone = [edge for edge in KNOWN_UPWARD if edge not in found]
    assert not gone, f"fixed, remove from KNOWN_UPWARD: {gone}"


@pytest.mark.parametrize("src, forbidden", [
    ("mmcore.model", {"mmcore.distributed", "mmcore.cli", "mmcore.features", "mmcore.demo"}),
    ("mmcore.ops", {"mmcore.model", "mmcore.preprocess", "mmcore.distributed",
                    "mmcore.config", "mmcore.cache"}),
    ("mmcore.preprocess", {"mmcore.model", "mmcore.distributed"}),
    ("mmcore.config", {"mmcore.model", "mmcore.ops", "mmcore.preprocess",
                       "mmcore.distributed"}),
    ("mmcore.cache", {"mmcore.model", "mmcore.distributed"}),
])
def test_named_rules(src, forbidden):
    """The rules stated in DESIGN.md, spelled out (they follow from LAYERS)."""
    deps = _graph().get(src, {})
    hit = {dst: deps[dst] for dst in forbidden if dst in deps}
    assert not hit, f"{src} imports {hit}"


def test_model_does_not_import_distributed_in_any_form():
    """Not even through a computed string: besides the graph (import statements and constant
    import_module strings), no call of import_module / __import__ in mmcore.model mentions
    distributed."""
    assert "mmcore.distributed" not in _graph()["mmcore.model"]
    for name, path in module_files().items():
        if name != "mmcore.model" and not name.startswith("mmcore.model."):
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Call):
                func = node.func
                called = getattr(func, "attr", getattr(func, "id", None))
                if called in ("import_module", "__import__"):
                    args = ast.unparse(node)
                    assert "distributed" not in args, (name, node.lineno, args)


def test_no_module_over_1000_lines():
    big = {name: n for name, n in module_sizes().items() if n > 1000}
    assert not big, f"modules over 1000 lines: {big}"


def test_no_zip_strict_while_python_3_9_is_supported():
    """``zip(..., strict=...)`` is Python 3.10+ (a TypeError on 3.9, which the package supports:
    requires-python >= 3.9)."""
    found = []
    for name, path in module_files().items():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if (isinstance(node, ast.Call) and getattr(node.func, "id", None) == "zip"
                    and any(kw.arg == "strict" for kw in node.keywords)):
                found.append(f"{name}:{node.lineno}")
    assert not found, f"zip(strict=...) needs Python 3.10: {found}"


def test_the_graph_sees_every_kind_of_import(tmp_path):
    """The parser behind these tests finds imports at module level, in functions, relative
    ones and import_module strings (absolute and relative to __name__)."""
    pkg = tmp_path / "mmcore"
    for sub in ("low", "high"):
        (pkg / sub).mkdir(parents=True)
        (pkg / sub / "__init__.py").write_text("")
    (pkg / "__init__.py").write_text(textwrap.dedent('''
        import importlib
        def lazy():
            return importlib.import_module(".high", __name__)
    '''))
    (pkg / "low" / "a.py").write_text(textwrap.dedent('''
        def f():
            from ..high import b
        def g():
            import importlib
            importlib.import_module("mmcore.high.b")
    '''))
    (pkg / "high" / "b.py").write_text("from ..low import a\nfrom mmcore import errors_like\n")
    graph = import_graph(pkg)
    assert graph["mmcore.low"] == {"mmcore.high": ["mmcore.low.a:3", "mmcore.low.a:6"]}
    assert graph["mmcore.high"] == {"mmcore.low": ["mmcore.high.b:1"],
                                    "mmcore": ["mmcore.high.b:2"]}
    assert graph["mmcore"] == {"mmcore.high": ["mmcore:4"]}
    assert PACKAGE_DIR.name == "mmcore"
