"""Every public module declares a sorted ``__all__`` of names that exist and have docstrings."""

from __future__ import annotations

import importlib
import inspect
import pkgutil
from types import ModuleType

import pytest

import streambus

PACKAGES = [
    "streambus",
    "streambus_demo",
    "streambus_http",
    "streambus_langchain",
    "streambus_moderation",
    "streambus_nats",
    "streambus_ollama",
    "streambus_openai",
    "streambus_proxy",
    "streambus_redis",
    "streambus_stats",
    "streambus_template",
    "streambus_transformers",
    "streambus_websocket",
]


def public_modules() -> list[str]:
    names = []
    for package in PACKAGES:
        try:
            module = importlib.import_module(package)
        except ImportError:
            continue  # a plugin whose optional dependency is absent has its own tests for that
        names.append(package)
        for info in pkgutil.walk_packages(module.__path__, prefix=package + "."):
            if not any(part.startswith("_") for part in info.name.split(".")):
                names.append(info.name)
    return names


MODULES = public_modules()


def test_core_and_plugins_found() -> None:
    assert "streambus.bus" in MODULES
    assert "streambus_websocket" in MODULES
    assert len(MODULES) > 30


@pytest.mark.parametrize("name", MODULES)
def test_module_declares_all(name: str) -> None:
    try:
        module = importlib.import_module(name)
    except ImportError as exc:
        pytest.skip(f"optional dependency missing: {exc}")
    if name.endswith("__main__"):
        return
    assert module.__doc__, f"{name} has no module docstring"
    exported = getattr(module, "__all__", None)
    assert exported is not None, f"{name} has no __all__"
    assert list(exported) == sorted(exported, key=_isort), (
        f"{name}.__all__ is not sorted (constants, classes, functions)"
    )
    for attr in exported:
        assert hasattr(module, attr), f"{name}.__all__ names {attr!r}, which does not exist"
        _check_documented(module, attr)


def _isort(name: str) -> tuple[int, str]:
    # The order ruff's RUF022 and isort use: CONSTANTS, then Classes, then functions.
    kind = 0 if name.isupper() else 1 if name[:1].isupper() else 2
    return (kind, name)


def _check_documented(module: ModuleType, attr: str) -> None:
    value = getattr(module, attr)
    if inspect.isclass(value) or inspect.isfunction(value):
        assert inspect.getdoc(value), f"{module.__name__}.{attr} has no docstring"
    if inspect.isclass(value):
        for member_name, member in vars(value).items():
            if member_name.startswith("_") or not (inspect.isfunction(member) or isinstance(member, property)):
                continue
            assert inspect.getdoc(member), f"{module.__name__}.{attr}.{member_name} has no docstring"


def test_top_level_reexports_every_public_core_name() -> None:
    for name in ["Bus", "Subscription", "Filter", "OverflowPolicy", "StreamWriter", "encode", "decode"]:
        assert name in streambus.__all__
