"""The examples in docs/moderation.md run as written."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import anyio
import msgspec
import pytest
from streambus_moderation import ModerationStage

from streambus import load_config
from streambus.config import parse_config

DOC = Path(__file__).resolve().parents[3] / "docs" / "moderation.md"


def blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", DOC.read_text(encoding="utf-8"), flags=re.S)


def test_python_quick_start_runs(capsys: pytest.CaptureFixture[str]) -> None:
    (example,) = blocks("python")
    exec(compile(example, str(DOC), "exec"), {"__name__": "docs_example"})
    assert "redact ['violence'] 9 18" in capsys.readouterr().out


def test_config_examples_validate() -> None:
    pipeline_text, python_moderator = blocks("toml")
    pipeline = parse_config(tomllib.loads(pipeline_text), path="moderated.toml")
    stage = pipeline.sinks[0].sink
    assert isinstance(stage, ModerationStage)
    assert stage.options.max_hold_ms == 2000 and stage.options.hold_policy == "release"
    assert [s.raw for s in pipeline.sinks[1:]] == [None, True]
    assert 'function = "myapp.safety:check"' in python_moderator


def test_shipped_config_runs_and_redacts(capsys: pytest.CaptureFixture[str]) -> None:
    pipeline = load_config(DOC.parents[1] / "configs" / "moderation.toml")
    assert isinstance(pipeline.sinks[0].sink, ModerationStage)
    for producer in pipeline.producers:  # as fast as possible, same text every run
        producer.options = msgspec.structs.replace(  # type: ignore[attr-defined]
            producer.options,  # type: ignore[attr-defined]
            ttft=0.0,
            tokens_per_second=0.0,
            seed=1,
        )
    anyio.run(pipeline.run)
    out = capsys.readouterr().out
    assert "[removed]" in out
    assert " model " not in out and "購読者" not in out
