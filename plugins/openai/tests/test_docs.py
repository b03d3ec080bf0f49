"""Every example in docs/plugins/openai.md runs as written (against the loopback upstream)."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path
from typing import Any

import msgspec
import pytest
from streambus_openai import OpenAIFormat, OpenAIProducer

from streambus.config import parse_config
from streambus.events import DeltaEvent, EndEvent, StartEvent

from .conftest import Reply, Upstream

DOC = Path(__file__).resolve().parents[3] / "docs" / "plugins" / "openai.md"
TEXT = DOC.read_text(encoding="utf-8")
PYTHON = re.findall(r"```python\n(.*?)```", TEXT, flags=re.S)
TOML = re.findall(r"```toml\n(.*?)```", TEXT, flags=re.S)


def _choice_stream(index: int, text: str) -> bytes:
    # Two choices share one response: the encoder writes each choice's chunks.
    fmt = OpenAIFormat()
    request = {"model": "qwen2.5-7b-instruct", "stream": True, "stream_options": {"include_usage": index == 1}}
    events = [
        StartEvent(stream="s", seq=0, ts=1.0, meta={"choice": index}),
        DeltaEvent(stream="s", seq=1, ts=1.1, text=text),
        EndEvent(stream="s", seq=2, ts=1.2, reason="stop"),
    ]
    encoder = fmt.stream_encoder("chat", request)
    return b"".join(encoder.encode(e) for e in events)


@pytest.mark.anyio
async def test_python_example_streams_two_choices(upstream: Upstream, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MY_SERVER_KEY", "sk-docs")
    body = _choice_stream(0, "Whiskers") + _choice_stream(1, "Mochi") + b"data: [DONE]\n\n"
    upstream.replies = [Reply([body])]
    namespace: dict[str, Any] = {"__name__": "docs_example"}
    exec(compile(PYTHON[0], str(DOC), "exec"), namespace)
    assert await namespace["main"](upstream.url + "/v1") == {0: "Whiskers", 1: "Mochi"}
    assert upstream.requests[0]["n"] == 2 and upstream.requests[0]["seed"] == 7
    assert upstream.headers[0]["Authorization"] == "Bearer sk-docs"


def test_parser_example_runs() -> None:
    exec(compile(PYTHON[1], str(DOC), "exec"), {"__name__": "docs_example"})


def test_pipeline_example_is_valid() -> None:
    pipeline = parse_config(tomllib.loads(TOML[0]), path="openai.toml")
    (producer,) = pipeline.producers
    assert isinstance(producer, OpenAIProducer)
    (r1, _, b1, meta1), (r2, _, b2, meta2) = producer.requests()
    assert (r1, r2) == ("completions", "chat")
    assert b1["prompt"] == "You are terse.\n\nName a colour." and b1["max_tokens"] == 200
    assert b2["n"] == 2 and b2["messages"][0] == {"role": "system", "content": "You are terse."}
    assert (meta1["q"], meta2["q"]) == (1, 2)


def test_every_option_is_documented() -> None:
    for field in msgspec.structs.fields(OpenAIProducer.Options):
        assert f"| `{field.name}` |" in TEXT, field.name


@pytest.mark.anyio
async def test_shipped_config_runs(upstream: Upstream, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from streambus.config import load_config

    body = _choice_stream(0, "Whiskers") + _choice_stream(1, "Mochi") + b"data: [DONE]\n\n"
    upstream.replies = [Reply([body])]
    source = (DOC.parents[2] / "configs" / "openai.toml").read_text(encoding="utf-8")
    config = tmp_path / "openai.toml"
    config.write_text(source.replace("http://127.0.0.1:8000/v1", upstream.url + "/v1"), encoding="utf-8")
    await load_config(config).run()
    assert upstream.requests[0]["n"] == 2
    out = capsys.readouterr().out
    assert "Whiskers" in out and "Mochi" in out
