"""The hand-written stubs (_native.pyi) match the compiled module."""

from __future__ import annotations

import ast
import inspect
from pathlib import Path

import kvpress_rs
from kvpress_rs import _native

STUB = Path(kvpress_rs.__file__).with_name("_native.pyi")


def _params(node: ast.FunctionDef) -> list[str]:
    a = node.args
    names = [x.arg for x in a.posonlyargs + a.args]
    names += [a.vararg.arg] if a.vararg else []
    names += [x.arg for x in a.kwonlyargs]
    names += [a.kwarg.arg] if a.kwarg else []
    return [n for n in names if n not in ("self", "cls")]


def _stub_api() -> dict[str, object]:
    api: dict[str, object] = {}
    for node in ast.parse(STUB.read_text()).body:
        if isinstance(node, ast.FunctionDef):
            api[node.name] = _params(node)
        elif isinstance(node, ast.ClassDef):
            members = {}
            for item in node.body:
                if isinstance(item, ast.FunctionDef):
                    is_prop = any(isinstance(d, ast.Name) and d.id == "property" for d in item.decorator_list)
                    members[item.name] = "property" if is_prop else _params(item)
            api[node.name] = members
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            api[node.target.id] = "value"
    return api


def _runtime_params(obj) -> list[str]:
    return [p for p in inspect.signature(obj).parameters if p not in ("self", "cls")]


def test_stub_names_match_the_module():
    stub = _stub_api()
    public = {n for n in dir(_native) if not n.startswith("_") or n == "__version__"}
    assert set(stub) - {"_A"} == public


def test_stub_signatures_match_the_module():
    for name, spec in _stub_api().items():
        obj = getattr(_native, name, None)
        if isinstance(spec, list):
            assert _runtime_params(obj) == spec, name
        elif isinstance(spec, dict):
            runtime_members = {m for m in dir(obj) if not m.startswith("_")}
            assert runtime_members == {m for m in spec if not m.startswith("_")}, name
            if "__new__" in spec:  # classes without a constructor (results) have none
                assert _runtime_params(obj) == spec["__new__"], f"{name}.__new__"
            for member, mspec in spec.items():
                if member.startswith("_"):
                    continue
                attr = inspect.getattr_static(obj, member)
                if mspec == "property":
                    assert type(attr).__name__ == "getset_descriptor", f"{name}.{member}"
                else:
                    assert _runtime_params(getattr(obj, member)) == mspec, f"{name}.{member}"
