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


@pytest.mark.parametrize("name", ["redis-worker", "redis-broadcaster", "redis-recorder"])
def test_shipped_configs_load(name: str) -> None:
    pipeline = load_config(ROOT / "configs" / f"{name}.toml")
    kinds = [type(p) for p in pipeline.producers] + [type(s.sink) for s in pipeline.sinks]
    assert RedisSink in kinds or RedisSource in kinds
