"""The example of docs/testing.md runs as written: its files are copied out and pytest runs them."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest

pytest_plugins = ["pytester"]

ROOT = Path(__file__).resolve().parent.parent
PAGE = ROOT / "docs" / "testing.md"
BLOCK = re.compile(r"<!-- file: (?P<name>[\w.]+) -->\n```python\n(?P<code>.*?)```", re.S)

pytest.importorskip("streambus_ollama", reason="the mock server's ollama format comes with plugins/ollama")


def test_documented_fastapi_example_passes(pytester: pytest.Pytester) -> None:
    files = {m["name"]: m["code"] for m in BLOCK.finditer(PAGE.read_text(encoding="utf-8"))}
    assert set(files) == {"app.py", "test_app.py", "test_bus.py"}
    for name, code in files.items():
        (pytester.path / name).write_text(code, encoding="utf-8")
    shutil.copy(ROOT / "tests" / "data" / "chat.jsonl", pytester.path / "chat.jsonl")
    # A project of its own: only the installed plugins (streambus's pytest11 entry, anyio), warnings as errors.
    pytester.makeini("[pytest]\nfilterwarnings = error\n")
    result = pytester.runpytest("-q", "--import-mode=prepend", "-p", "no:cacheprovider")
    result.assert_outcomes(passed=4)  # the bus test runs on asyncio and trio
