"""The examples in docs/stats.md, docs/plugins/stats.md and configs/stats.toml run as written."""

from __future__ import annotations

import contextlib
import io
import re
import tomllib
from pathlib import Path

import pytest
from streambus_stats import StatsSink
from structlog.testing import capture_logs

from streambus.config import load_config, parse_config

ROOT = Path(__file__).resolve().parents[3]


def blocks(path: Path, lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", path.read_text(encoding="utf-8"), flags=re.S)


def run_block(code: str) -> list[str]:
    out = io.StringIO()
    # structlog's default logger prints to stdout; the doc shows only what the example prints.
    with contextlib.redirect_stdout(out), capture_logs():
        exec(compile(code, "<doc>", "exec"), {"__name__": "__doc_example__"})
    return out.getvalue().splitlines()


def test_merge_example_in_stats_md() -> None:
    (code,) = blocks(ROOT / "docs" / "stats.md", "python")
    assert run_block(code) == ["2 0.25", "0.75"]


def test_python_example_in_plugin_reference() -> None:
    (code,) = blocks(ROOT / "docs" / "plugins" / "stats.md", "python")
    assert run_block(code) == ["1 3", "15"]


def test_toml_example_in_plugin_reference_validates() -> None:
    (toml,) = blocks(ROOT / "docs" / "plugins" / "stats.md", "toml")
    pipeline = parse_config(tomllib.loads(toml))
    (entry,) = pipeline.sinks
    assert isinstance(entry.sink, StatsSink)
    assert (entry.sink.options.port, entry.sink.options.interval) == (9464, 5.0)


@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_config_runs(anyio_backend: str, tmp_path: Path) -> None:
    text = (ROOT / "configs" / "stats.toml").read_text(encoding="utf-8")
    assert load_config(ROOT / "configs" / "stats.toml").sinks
    # Same pipeline, faster and on a free port, so the test is quick and cannot collide.
    text = text.replace("port = 9464", "port = 0").replace("tokens_per_second = 80.0", "tokens_per_second = 0.0")
    text = text.replace("ttft = 0.2", "ttft = 0.0")
    pipeline = parse_config(tomllib.loads(text))
    await pipeline.run()
    sink = pipeline.sinks[0].sink
    assert isinstance(sink, StatsSink)
    overall = sink.snapshot()["overall"]
    assert overall["streams"]["finished"] == 6
    assert overall["time_to_first_chunk_seconds"]["count"] == 6
    assert overall["inter_chunk_latency_seconds"]["count"] > 0
