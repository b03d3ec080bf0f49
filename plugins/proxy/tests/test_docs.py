"""Every example in docs/proxy.md runs as written, against the proxy in front of the mock server."""

from __future__ import annotations

import gc
import re
import tomllib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio
import pytest
from streambus_moderation import ModerationStage

from streambus.builtins.recorder import RecorderSink
from streambus.config import parse_config
from streambus.mockserver import MockServer
from streambus.recording import read_recording

from .conftest import OLLAMA_TEXT, OPENAI_TEXT

pytestmark = pytest.mark.anyio

DOC = Path(__file__).resolve().parents[3] / "docs" / "proxy.md"
TEXT = DOC.read_text(encoding="utf-8")
PYTHON = re.findall(r"```python\n(.*?)```", TEXT, flags=re.S)
TOML = re.findall(r"```toml\n(.*?)```", TEXT, flags=re.S)


def _load(index: int) -> dict[str, Any]:
    namespace: dict[str, Any] = {"__name__": "docs_example"}
    exec(compile(PYTHON[index], str(DOC), "exec"), namespace)
    return namespace


async def test_official_clients_example(mock: MockServer, proxy_env: Callable[..., Any]) -> None:
    async with proxy_env(mock.url) as env:
        texts = await anyio.to_thread.run_sync(_load(0)["ask_both"], env.url)
        await env.capture.wait_for(lambda c: len(c.ended) == 2)
    assert texts == ("".join(OLLAMA_TEXT), "".join(OPENAI_TEXT))


# LangChain's chat models never close their HTTP clients; collect them here so the
# unclosed-socket warnings land in this test, and only here.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
async def test_langchain_example(mock: MockServer, proxy_env: Callable[..., Any]) -> None:
    async with proxy_env(mock.url) as env:
        texts = await anyio.to_thread.run_sync(_load(1)["ask_langchain"], env.url)
        await env.capture.wait_for(lambda c: len(c.ended) == 2)
    gc.collect()
    assert texts == ("".join(OLLAMA_TEXT), "".join(OPENAI_TEXT))


async def test_library_example(mock: MockServer, tmp_path: Path) -> None:
    path = tmp_path / "lib.jsonl"
    text = await _load(2)["record_through_proxy"](mock.url, str(path))
    assert text == "".join(OLLAMA_TEXT)
    recorded = read_recording(path).events
    assert "".join(getattr(e, "text", "") for e in recorded) == text


def test_moderated_config_example() -> None:
    pipeline = parse_config(tomllib.loads(TOML[0]), path="proxy.toml")
    assert [type(entry.sink) for entry in pipeline.sinks] == [RecorderSink, ModerationStage]


def test_every_cli_option_is_documented() -> None:
    from streambus_proxy import proxy_command

    for param in proxy_command.params:
        for opt in param.opts:
            assert f"`{opt}" in TEXT, opt
