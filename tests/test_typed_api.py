"""The public API is typed: every public function and every public method of a public class
(the names in the ``__all__`` of the package's public modules) annotates its parameters and
its return value, so that type checkers see what users call (``mmcore/py.typed``)."""

from __future__ import annotations

import importlib
import inspect

import pytest

PUBLIC_MODULES = ["mmcore", "mmcore.ops", "mmcore.config", "mmcore.preprocess", "mmcore.model",
                  "mmcore.distributed", "mmcore.cache", "mmcore.errors", "mmcore.modality",
                  "mmcore.features", "mmcore.viz"]


def _missing(fn) -> list:
    """Parameters (and ``return``) of ``fn`` without an annotation."""
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):          # a builtin without a signature
        return []
    ann = getattr(fn, "__annotations__", {})
    out = [name for name in sig.parameters if name not in ("self", "cls") and name not in ann]
    if "return" not in ann and fn.__name__ != "__init__":
        out.append("return")
    return out


def _public_callables():
    seen = set()
    for module_name in PUBLIC_MODULES:
        module = importlib.import_module(module_name)
        for name in getattr(module, "__all__", ()):
            obj = getattr(module, name, None)
            if obj is None or id(obj) in seen:
                continue
            seen.add(id(obj))
            if inspect.isfunction(obj):
                yield f"{obj.__module__}.{obj.__qualname__}", obj
            elif inspect.isclass(obj) and obj.__module__.startswith("mmcore"):
                for attr, value in vars(obj).items():
                    if attr.startswith("_") and attr not in ("__init__", "__call__"):
                        continue
                    if isinstance(value, (classmethod, staticmethod)):
                        value = value.__func__
                    elif isinstance(value, property):
                        value = value.fget
                    if inspect.isfunction(value) and value.__module__.startswith("mmcore"):
                        yield f"{value.__module__}.{value.__qualname__}", value


def test_the_public_api_is_annotated():
    callables = dict(_public_callables())
    assert len(callables) > 200                  # the walk found the API, not an empty list
    untyped = {name: missing for name, fn in callables.items() if (missing := _missing(fn))}
    assert not untyped, "\n".join(f"{k}: {v}" for k, v in sorted(untyped.items()))


def test_the_check_sees_a_missing_annotation():
    def typed(x: int, *, y: str = "") -> int:
        return x

    def untyped(x, *args, **kwargs):
        return x

    assert _missing(typed) == []
    assert _missing(untyped) == ["x", "args", "kwargs", "return"]


@pytest.mark.parametrize("module_name", PUBLIC_MODULES)
def test_public_modules_declare_their_api(module_name):
    assert importlib.import_module(module_name).__all__
