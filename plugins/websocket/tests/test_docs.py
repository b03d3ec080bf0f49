"""The code blocks of the broadcaster's docs run (Python) and validate (TOML) as written."""

from __future__ import annotations

import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from streambus.config import parse_config

DOCS = Path(__file__).resolve().parents[3] / "docs"
PAGES = [DOCS / "websocket-protocol.md", DOCS / "plugins" / "websocket.md"]


def _blocks(lang: str) -> list[tuple[str, str]]:
    found = []
    for page in PAGES:
        for i, block in enumerate(re.findall(rf"```{lang}\n(.*?)```", page.read_text(), flags=re.S)):
            found.append((f"{page.name}#{i}", block))
    return found


@pytest.mark.parametrize(("where", "code"), _blocks("python"), ids=[w for w, _ in _blocks("python")])
def test_python_examples_run(where: str, code: str) -> None:
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 0, f"{where}:\n{result.stderr}"


@pytest.mark.parametrize(("where", "text"), _blocks("toml"), ids=[w for w, _ in _blocks("toml")])
def test_toml_examples_validate(where: str, text: str) -> None:
    pipeline = parse_config(tomllib.loads(text), path=where)
    assert [type(entry.sink).__name__ for entry in pipeline.sinks] == ["WebSocketSink"]


def test_every_error_and_close_code_is_documented() -> None:
    from streambus_websocket import CloseCode, ErrorCode

    page = (DOCS / "websocket-protocol.md").read_text()
    for code in ErrorCode:
        assert f"| `{code.value}` |" in page, code
    for close in CloseCode:
        assert f"| {int(close)} |" in page, close


def test_shipped_demo_config_validates() -> None:
    from streambus import load_config

    pipeline = load_config(DOCS.parent / "configs" / "websocket-demo.toml")
    assert [type(entry.sink).__name__ for entry in pipeline.sinks] == ["WebSocketSink"]
