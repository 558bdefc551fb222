"""The package's structure: module sizes and the import graph between its top-level parts.

Run it as a script to print both (``python tests/_structure.py [--modules]``); the layering
test uses :func:`import_graph` to check that imports only point down the layer order.

Every import counts, at module level or inside a function, and so does a string literal passed
to ``importlib.import_module`` (an import written as a string is still an import).
"""

from __future__ import annotations

import ast
import collections
import pathlib
import sys
from typing import Dict, Iterator, List, Set, Tuple

#: The package directory (``mmcore/``) next to this tests directory.
PACKAGE_DIR = pathlib.Path(__file__).resolve().parent.parent / "mmcore"
PACKAGE = "mmcore"


def module_files(package_dir: pathlib.Path = PACKAGE_DIR) -> Dict[str, pathlib.Path]:
    """Map every module's dotted name to its file (``mmcore.model.model`` -> path)."""
    out = {}
    for path in sorted(package_dir.rglob("*.py")):
        rel = path.relative_to(package_dir.parent).with_suffix("")
        parts = list(rel.parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def _is_package(name: str, files: Dict[str, pathlib.Path]) -> bool:
    return files[name].name == "__init__.py"


def _imports_of(name: str, files: Dict[str, pathlib.Path]) -> Iterator[Tuple[str, int]]:
    """The absolute dotted names one module imports, with line numbers."""
    tree = ast.parse(files[name].read_text(encoding="utf-8"), str(files[name]))
    # the package that relative imports start from
    base = name.split(".") if _is_package(name, files) else name.split(".")[:-1]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, node.lineno
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                anchor = base[:len(base) - (node.level - 1)]
                module = ".".join(anchor + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            # ``from pkg import sub`` imports the submodule ``pkg.sub``; ``from pkg import name``
            # imports ``pkg`` itself
            plain = False
            for alias in node.names:
                sub = f"{module}.{alias.name}"
                if sub in files:
                    yield sub, node.lineno
                else:
                    plain = True
            if plain:
                yield module, node.lineno
        elif isinstance(node, ast.Call):
            func = node.func
            called = (func.attr if isinstance(func, ast.Attribute)
                      else func.id if isinstance(func, ast.Name) else None)
            if (called in ("import_module", "__import__") and node.args
                    and isinstance(node.args[0], ast.Constant)
                    and isinstance(node.args[0].value, str)):
                target = node.args[0].value
                if target.startswith(".") and len(node.args) > 1:
                    # import_module(".x", __name__ / __package__): relative to that package
                    anchor_arg = node.args[1]
                    anchor_name = anchor_arg.id if isinstance(anchor_arg, ast.Name) else None
                    if anchor_name in ("__name__", "__package__"):
                        pkg = name.split(".") if (anchor_name == "__name__"
                                                  or _is_package(name, files)) else base
                        level = len(target) - len(target.lstrip("."))
                        rest = target.lstrip(".")
                        anchor = pkg[:len(pkg) - (level - 1)]
                        target = ".".join(anchor + ([rest] if rest else []))
                yield target, node.lineno


def top_level(name: str) -> str:
    """The top-level part a dotted name belongs to (``mmcore.model.io`` -> ``mmcore.model``)."""
    parts = name.split(".")
    return ".".join(parts[:2]) if len(parts) > 1 else parts[0]


def module_imports(package_dir: pathlib.Path = PACKAGE_DIR) -> Dict[str, Set[Tuple[str, int]]]:
    """Every module's imports of other ``mmcore`` modules: name -> {(imported, line)}."""
    files = module_files(package_dir)
    out: Dict[str, Set[Tuple[str, int]]] = {}
    for name in files:
        found = set()
        for imported, line in _imports_of(name, files):
            if imported == PACKAGE or imported.startswith(PACKAGE + "."):
                found.add((imported, line))
        out[name] = found
    return out


def import_graph(package_dir: pathlib.Path = PACKAGE_DIR) -> Dict[str, Dict[str, List[str]]]:
    """The graph between top-level parts: part -> {imported part -> ["module:line", ...]}.

    ``mmcore`` itself (the package ``__init__``) is a part of its own: ``from mmcore import
    errors`` imports the part ``mmcore.errors``, ``from mmcore import __version__`` imports
    ``mmcore``. Native extension modules (``mmcore._C``) appear under their own names.
    """
    graph: Dict[str, Dict[str, List[str]]] = collections.defaultdict(
        lambda: collections.defaultdict(list))
    for name, found in module_imports(package_dir).items():
        src = top_level(name)
        graph.setdefault(src, collections.defaultdict(list))
        for imported, line in sorted(found):
            dst = top_level(imported)
            where = f"{name}:{line}"
            if dst != src and where not in graph[src][dst]:
                graph[src][dst].append(where)
    return {k: dict(v) for k, v in graph.items()}


def module_sizes(package_dir: pathlib.Path = PACKAGE_DIR) -> Dict[str, int]:
    """Line counts of every module (as ``wc -l`` counts them)."""
    return {name: path.read_bytes().count(b"\n")
            for name, path in module_files(package_dir).items()}


def main(argv: List[str]) -> int:
    sizes = module_sizes()
    print("# module sizes (lines)")
    for name, n in sorted(sizes.items(), key=lambda kv: (-kv[1], kv[0])):
        print(f"{n:6d}  {name}")
    print(f"{sum(sizes.values()):6d}  total, {len(sizes)} modules, "
          f"{sum(n > 1000 for n in sizes.values())} over 1000 lines")
    print("\n# imports between top-level parts (part -> parts it imports)")
    graph = import_graph()
    for src in sorted(graph):
        deps = graph[src]
        print(f"{src} -> {', '.join(sorted(deps)) if deps else '(nothing)'}")
        if "--modules" in argv:
            for dst in sorted(deps):
                print(f"    {dst}: {', '.join(deps[dst])}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
