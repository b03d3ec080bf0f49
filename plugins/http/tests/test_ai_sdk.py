"""The UI message stream read by the Vercel AI SDK's own code (the `ai` npm package, in Node).

``tests/node`` pins ``ai``; ``scripts/bootstrap.sh`` runs ``npm ci`` there. The
tests are skipped (saying why) where Node or that install is missing.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path
from typing import Any

import anyio
import orjson
import pytest

from streambus import AbortEvent, Bus
from streambus.wire import ToolCallFragment, tool_text

pytestmark = pytest.mark.anyio

NODE_DIR = Path(__file__).parent / "node"
SCRIPT = NODE_DIR / "read_ui_stream.mjs"
NODE = shutil.which("node")

if NODE is None or not (NODE_DIR / "node_modules" / "ai" / "package.json").exists():
    pytest.skip(
        "needs Node and the `ai` package: run `npm ci` in plugins/http/tests/node (scripts/bootstrap.sh does)",
        allow_module_level=True,
    )


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"  # the http sink is aiohttp


async def run_node(*args: str) -> dict[str, Any]:
    assert NODE is not None
    with anyio.fail_after(30):
        result = await anyio.run_process([NODE, str(SCRIPT), *args], cwd=NODE_DIR, check=False)
    if result.returncode != 0:
        sys.stderr.write(result.stderr.decode())
    assert result.returncode == 0, result.stderr.decode()
    data: dict[str, Any] = orjson.loads(result.stdout.splitlines()[-1])
    return data


async def chat_with(served: Any, writer: Any, prompt: str, **write_options: Any) -> dict[str, Any]:
    """useChat's machinery posts to /api/chat; a producer answers in a stream tagged with the chat id."""
    hub = served.sink.hub
    out: dict[str, Any] = {}

    async def client() -> None:
        out.update(await run_node("chat", served.url + "/api/chat", prompt))

    async with anyio.create_task_group() as tg:
        tg.start_soon(client)
        with anyio.fail_after(30):
            while not hub.waiting:
                await hub.wait_changed()
        await writer(served.bus, "ans", write_options.pop("parts"), meta={"chat": "chat-1"}, **write_options)
    return out


async def test_use_chat_builds_the_message_from_a_bus_stream(served: Any, writer: Any) -> None:
    parts = [
        ("reasoning", "Let me "),
        ("reasoning", "think."),
        "Hello",
        ", world",
        ("tool", tool_text(ToolCallFragment(index=0, id="call_1", name="get_weather"))),
        ("tool", tool_text(ToolCallFragment(index=0, arguments='{"city": '))),
        ("tool", tool_text(ToolCallFragment(index=0, arguments='"Oslo"}'))),
        "!",
    ]
    result = await chat_with(served, writer, "hi", parts=parts)
    assert result["status"] == "ready"
    assert result["error"] is None
    assert result["finish"] == {"isAbort": False, "isError": False, "finishReason": "stop"}
    user, assistant = result["messages"]
    assert user["role"] == "user"
    assert assistant["id"] == "ans"  # messageId is the stream id
    kinds = [p["type"] for p in assistant["parts"]]
    assert kinds == ["step-start", "reasoning", "text", "dynamic-tool", "text"]
    reasoning, text, tool, tail = assistant["parts"][1:]
    assert reasoning["text"] == "Let me think." and reasoning["state"] == "done"
    assert text["text"] == "Hello, world" and text["state"] == "done"
    assert (
        tool["state"] == "input-available" and tool["input"] == {"city": "Oslo"} and tool["toolName"] == "get_weather"
    )
    assert tool["toolCallId"] == "call_1"
    assert tail["text"] == "!"


async def test_use_chat_reports_a_failed_stream_as_an_error(served: Any, writer: Any) -> None:
    result = await chat_with(served, writer, "hi", parts=["par", "tial"], ending="error")
    assert result["status"] == "error"
    assert result["error"] == "upstream: model crashed"
    assert result["finish"]["isError"] is True
    assert result["messages"][-1]["parts"][-1]["text"] == "partial"


@pytest.mark.parametrize("ending", ["abort", "end"])
async def test_every_chunk_passes_the_sdk_schema(served: Any, writer: Any, ending: str) -> None:
    bus: Bus = served.bus
    async with bus.stream(model="m", stream="ch") as w:
        await w.delta("thinking", channel="reasoning")
        await w.delta("Some ")
        await w.moderation(action="flag", start=0, end=4, categories=["x"])
        await w.delta("text")
        await w.delta(tool_text(ToolCallFragment(index=0, arguments="{broken")), channel="tool")
        if ending == "abort":
            await w.abort("unsafe", by="moderation")
    result = await run_node("chunks", served.url + "/streams/ch/ui")
    assert result["headers"]["x-vercel-ai-ui-message-stream"] == "v1"
    assert all(p["ok"] for p in result["parsed"]), result["parsed"]
    chunks = [p["chunk"] for p in result["parsed"]]
    types = [c["type"] for c in chunks]
    assert "data-moderation" in types
    if ending == "abort":  # as the SDK's own streamText: abort, with the open part left as it was
        assert chunks[-1] == {"type": "abort", "reason": "aborted by moderation: unsafe"}
        assert types[-2] == "tool-input-delta"
    else:  # the open tool part closes; its input is not JSON
        assert types[-3:] == ["tool-input-error", "finish-step", "finish"]
    assert result["readError"] is None
    texts = [p["text"] for p in result["message"]["parts"] if p["type"] == "text"]
    assert texts == ["Some text"]


async def test_use_chat_stop_stops_the_stream_on_the_bus(served: Any) -> None:
    """useChat's stop() through DefaultChatTransport (wired as docs/plugins/http.md shows) stops the producer."""
    hub = served.sink.hub
    bus: Bus = served.bus
    cancelled = anyio.Event()
    out: dict[str, Any] = {}

    async def producer() -> None:
        try:
            async with bus.stream(model="m", stream="ans-stop", meta={"chat": "chat-1"}) as w:
                await w.delta("Hello")
                await anyio.sleep_forever()  # a model that would go on generating
        finally:
            cancelled.set()

    async def client() -> None:
        out.update(await run_node("stop", served.url + "/api/chat", "hi"))

    async with anyio.create_task_group() as tg:
        tg.start_soon(client)
        with anyio.fail_after(30):
            while not hub.waiting:
                await hub.wait_changed()
        bus.start_soon(producer)
        with anyio.fail_after(30):
            await cancelled.wait()
    assert out["stopped"] is True
    assert out["status"] == "ready" and out["error"] is None
    assert out["finish"]["isAbort"] is True
    assert out["messages"][-1]["parts"][-1]["text"] == "Hello"
    with anyio.fail_after(5):
        while not hub.ended("ans-stop"):
            await hub.wait_changed()
    cursor = hub.stream_cursor("ans-stop")
    events = await cursor.next_batch(max_wait=1)
    last = events[-1]
    assert isinstance(last, AbortEvent) and last.by == "client"
    assert sum(isinstance(e, AbortEvent) for e in events) == 1
