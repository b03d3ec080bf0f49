"""One error tree: every exception class of the core and the plugins derives from StreamBusError and is drawn.

Read from the sources (no plugin is imported), so a new exception anywhere
in the tree is checked, installed or not.
"""

from __future__ import annotations

import ast
import builtins
from pathlib import Path

import streambus.errors

ROOT = Path(__file__).resolve().parent.parent
SOURCES = sorted([*ROOT.glob("streambus/**/*.py"), *ROOT.glob("plugins/*/streambus_*/**/*.py")])


def _base_name(node: ast.expr) -> str:
    if isinstance(node, ast.Attribute):
        return node.attr
    if isinstance(node, ast.Name):
        return node.id
    return ""


def _classes() -> dict[str, tuple[list[str], str]]:
    """Every class: its base names and where it is defined."""
    found: dict[str, tuple[list[str], str]] = {}
    for path in SOURCES:
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, ast.ClassDef):
                where = f"{path.relative_to(ROOT)}:{node.lineno}"
                found[node.name] = ([_base_name(b) for b in node.bases], where)
    return found


def _is_builtin_exception(name: str) -> bool:
    obj = getattr(builtins, name, None)
    return isinstance(obj, type) and issubclass(obj, BaseException)


def _ancestors(name: str, classes: dict[str, tuple[list[str], str]]) -> set[str]:
    seen: set[str] = set()
    todo = [name]
    while todo:
        for base in classes.get(todo.pop(), ([], ""))[0]:
            if base not in seen:
                seen.add(base)
                todo.append(base)
    return seen


def test_every_exception_derives_from_streambus_error_and_is_drawn() -> None:
    classes = _classes()
    drawn = set((streambus.errors.__doc__ or "").split())
    exceptions = {
        name: where
        for name, (_, where) in classes.items()
        if any(_is_builtin_exception(a) or a == "ClickException" for a in _ancestors(name, classes))
    }
    assert {"StreamBusError", "ProxyError", "ResumeError", "TailError"} <= set(exceptions)  # the scan sees them
    outside = [
        f"{where} {name}"
        for name, where in exceptions.items()
        if name != "StreamBusError" and "StreamBusError" not in _ancestors(name, classes)
    ]
    assert not outside, f"exceptions outside the tree: {outside}"
    undrawn = [f"{where} {name}" for name, where in exceptions.items() if name not in drawn]
    assert not undrawn, f"exceptions not drawn in streambus/errors.py: {undrawn}"
