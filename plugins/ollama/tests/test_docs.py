"""Every example in docs/plugins/ollama.md runs as written (against the loopback upstream)."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path
from typing import Any

import pytest
from streambus_ollama import OllamaFormat, OllamaProducer

from streambus.config import parse_config

from .conftest import Reply, Upstream

DOC = Path(__file__).resolve().parents[3] / "docs" / "plugins" / "ollama.md"
TEXT = DOC.read_text(encoding="utf-8")
PYTHON = re.findall(r"```python\n(.*?)```", TEXT, flags=re.S)
TOML = re.findall(r"```toml\n(.*?)```", TEXT, flags=re.S)


@pytest.mark.anyio
async def test_python_example_streams_an_answer(upstream: Upstream) -> None:
    from streambus.events import DeltaEvent, EndEvent, StartEvent

    events = [
        StartEvent(stream="s", seq=0, ts=1.0, model="llama3.2"),
        DeltaEvent(stream="s", seq=1, ts=1.1, text="Rayleigh scattering."),
        EndEvent(stream="s", seq=2, ts=1.2, reason="stop"),
    ]
    upstream.replies = [Reply([OllamaFormat().encode_stream("chat", {"model": "llama3.2"}, events)])]
    namespace: dict[str, Any] = {"__name__": "docs_example"}
    exec(compile(PYTHON[0], str(DOC), "exec"), namespace)
    assert await namespace["main"](upstream.url) == "Rayleigh scattering."
    assert upstream.requests[0]["messages"][0] == {"role": "system", "content": "Answer in one sentence."}


def test_parser_example_runs() -> None:
    exec(compile(PYTHON[1], str(DOC), "exec"), {"__name__": "docs_example"})


def test_pipeline_example_is_valid() -> None:
    pipeline = parse_config(tomllib.loads(TOML[0]), path="ollama.toml")
    (producer,) = pipeline.producers
    assert isinstance(producer, OllamaProducer)
    bodies = producer.requests()
    assert [meta["question"] for _, _, meta in bodies] == [1, 2]
    assert bodies[1][1]["messages"][-1] == {"role": "user", "content": "Another one?"}
    assert bodies[0][1]["options"] == {"temperature": 0.2, "num_ctx": 8192}


def test_every_option_is_documented() -> None:
    import msgspec

    for field in msgspec.structs.fields(OllamaProducer.Options):
        assert f"| `{field.name}` |" in TEXT, field.name


@pytest.mark.anyio
async def test_shipped_config_runs(upstream: Upstream, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from streambus.config import load_config
    from streambus.events import DeltaEvent, EndEvent, StartEvent

    events = [
        StartEvent(stream="s", seq=0, ts=1.0),
        DeltaEvent(stream="s", seq=1, ts=1.1, text="Because."),
        EndEvent(stream="s", seq=2, ts=1.2),
    ]
    upstream.replies = [Reply([OllamaFormat().encode_stream("chat", {"model": "llama3.2"}, events)])]
    source = (DOC.parents[2] / "configs" / "ollama.toml").read_text(encoding="utf-8")
    config = tmp_path / "ollama.toml"
    config.write_text(source.replace("http://127.0.0.1:11434", upstream.url), encoding="utf-8")
    await load_config(config).run()
    assert sorted(r["messages"][-1]["content"] for r in upstream.requests) == [
        "Why is the sea salty?",
        "Why is the sky blue?",
    ]
    assert "Because." in capsys.readouterr().out
