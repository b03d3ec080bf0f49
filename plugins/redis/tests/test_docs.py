"""The code in docs/plugins/redis.md runs, and the shipped configs load."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
from streambus_redis import RedisSink, RedisSource

from streambus import load_config

ROOT = Path(__file__).resolve().parents[3]

pytestmark = pytest.mark.anyio


async def test_python_example_in_the_reference_runs(redis_url: str, key: str) -> None:
    text = (ROOT / "docs" / "plugins" / "redis.md").read_text(encoding="utf-8")
    code = re.search(r"```python\n(.*?)```", text, re.S)
    assert code is not None
    namespace: dict[str, Any] = {"__name__": "docs_example"}
    exec(compile(code.group(1), "docs/plugins/redis.md", "exec"), namespace)
    assert await namespace["main"](redis_url, key) == "Hello, world"


@pytest.mark.parametrize(
    "name", ["redis-worker", "redis-broadcaster", "redis-recorder", "edges/producer", "edges/edge-1", "edges/edge-2"]
)
def test_shipped_configs_load(name: str) -> None:
    pipeline = load_config(ROOT / "configs" / f"{name}.toml")
    kinds = [type(p) for p in pipeline.producers] + [type(s.sink) for s in pipeline.sinks]
    assert RedisSink in kinds or RedisSource in kinds


def test_the_three_process_edges_example_agrees_on_its_keys() -> None:
    """configs/edges: one producer and two edges, same prefix and layout, edges on loopback and their own ports."""
    producer = load_config(ROOT / "configs" / "edges" / "producer.toml")
    (sink,) = [s.sink for s in producer.sinks if isinstance(s.sink, RedisSink)]
    ports = set()
    for name in ("edge-1", "edge-2"):
        edge = load_config(ROOT / "configs" / "edges" / f"{name}.toml")
        (source,) = [p for p in edge.producers if isinstance(p, RedisSource)]
        assert (source.options.stream, source.options.layout) == (sink.options.stream, sink.options.layout)
        assert source.options.layout == "per_stream" and source.options.follow == "interested"
        (ws,) = [s.sink for s in edge.sinks if type(s.sink).__name__ == "WebSocketSink"]
        assert ws.options.host == "127.0.0.1"
        ports.add(ws.options.port)
    assert len(ports) == 2
