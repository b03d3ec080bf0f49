"""The code in docs/plugins/nats.md runs, and the shipped configs load (the worker runs end to end)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import anyio
import pytest
from streambus_nats import NatsSink, NatsSource

from streambus import Bus, EndEvent, is_terminal, load_config

if TYPE_CHECKING:
    from conftest import Collector, NatsServer

ROOT = Path(__file__).resolve().parents[3]

pytestmark = pytest.mark.anyio


async def test_python_example_in_the_reference_runs(nats_server: Callable[..., NatsServer]) -> None:
    server = nats_server()
    text = (ROOT / "docs" / "plugins" / "nats.md").read_text(encoding="utf-8")
    code = re.search(r"```python\n(.*?)```", text, re.S)
    assert code is not None
    namespace: dict[str, Any] = {"__name__": "docs_example"}
    exec(compile(code.group(1), "docs/plugins/nats.md", "exec"), namespace)
    assert await namespace["main"](server.url, "demo") == "Hello, world"


@pytest.mark.parametrize("name", ["nats-worker", "nats-edge", "nats-recorder"])
def test_shipped_configs_load(name: str) -> None:
    pipeline = load_config(ROOT / "configs" / f"{name}.toml")
    kinds = [type(p) for p in pipeline.producers] + [type(s.sink) for s in pipeline.sinks]
    assert NatsSink in kinds or NatsSource in kinds


async def test_worker_config_runs_and_an_edge_reads_it(
    nats_server: Callable[..., NatsServer], make_collector: Callable[[], Collector], tmp_path: Path
) -> None:
    """``streambus run configs/nats-worker.toml`` against a private server; a source reads its five streams."""
    server = nats_server()
    result = await anyio.to_thread.run_sync(
        lambda: subprocess.run(
            [sys.executable, "-m", "streambus", "run", str(ROOT / "configs" / "nats-worker.toml")],
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=120,
            env={**os.environ, "STREAMBUS_NATS_URL": server.url},
        )
    )
    assert result.returncode == 0, result.stderr[-3000:]
    got = make_collector()
    source = NatsSource(url=server.url, start="0", position="none")
    async with Bus() as edge:
        edge.add_sink(got)
        edge.start_producer(source)
        await got.wait_terminals(5)
        source.stop()
    assert [type(e) for e in got.events if is_terminal(e)] == [EndEvent] * 5
