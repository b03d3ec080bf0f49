"""ASGI building blocks: the FastAPI example over real HTTP (uvicorn on loopback), and trio in process."""

from __future__ import annotations

import importlib.util
import secrets
import socket
from collections.abc import AsyncIterator
from pathlib import Path
from types import ModuleType
from typing import Any

import anyio
import httpx
import openai
import orjson
import pytest
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.routing import Route
from streambus_http import StreamHub
from streambus_http.asgi import EventStreamResponse, ndjson_response, openai_response, sse_response, text_response

from streambus import Bus, Filter, decode
from streambus.tokens import Authenticator, TokenVerifier, bearer_credential, mint_token

pytestmark = pytest.mark.anyio

EXAMPLE = Path(__file__).resolve().parents[3] / "docs" / "examples" / "fastapi_app.py"


def load_example() -> ModuleType:
    spec = importlib.util.spec_from_file_location("fastapi_example", EXAMPLE)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@pytest.fixture
async def app_url() -> AsyncIterator[tuple[Any, str]]:
    """The FastAPI example served by uvicorn on a loopback port (uvicorn is asyncio here)."""
    module = load_example()
    module.DELAY = 0.0
    port = _free_port()
    config = uvicorn.Config(module.app, host="127.0.0.1", port=port, lifespan="on", log_level="warning", ws="none")
    server = uvicorn.Server(config)
    async with anyio.create_task_group() as tg:
        tg.start_soon(server.serve)
        with anyio.fail_after(10):
            while not server.started:  # noqa: ASYNC110 - uvicorn offers no event to wait on
                await anyio.sleep(0.01)
        yield module.app, f"http://127.0.0.1:{port}"
        server.should_exit = True


def _frames(text: str) -> list[dict[str, str]]:
    frames = []
    for block in text.split("\n\n"):
        frame: dict[str, str] = {}
        for line in block.split("\n"):
            if line and not line.startswith(":"):
                key, _, value = line.partition(":")
                frame[key] = value[1:] if value.startswith(" ") else value
        if "data" in frame:
            frames.append(frame)
    return frames


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_fastapi_example_serves_every_format(app_url: tuple[Any, str]) -> None:
    _, url = app_url
    async with httpx.AsyncClient(base_url=url, timeout=10) as client:
        sid = (await client.post("/generate", json={"prompt": "hello world"})).json()["stream"]
        assert (await client.get(f"/streams/{sid}/text")).text == "You said: hello world "
        events = [decode(line) for line in (await client.get(f"/streams/{sid}/ndjson")).text.splitlines()]
        assert type(events[-1]).__name__ == "EndEvent"
        frames = _frames((await client.get(f"/streams/{sid}/events")).text)
        assert [f["id"] for f in frames] == [f"{sid}:{e.seq}" for e in events]
        # resume in the middle: exactly the rest
        r = await client.get(f"/streams/{sid}/events", headers={"Last-Event-ID": f"{sid}:3"})
        assert [decode(f["data"]).seq for f in _frames(r.text)] == [e.seq for e in events[4:]]
        assert (
            await client.get(f"/streams/{sid}/events", headers={"Last-Event-ID": frames[-1]["id"]})
        ).status_code == 204
        assert (await client.get("/streams/x/events", headers={"Last-Event-ID": "oops"})).status_code == 400

        ui = await client.post(
            "/api/chat", json={"id": "c", "messages": [{"role": "user", "parts": [{"type": "text", "text": "hi"}]}]}
        )
        assert ui.headers["x-vercel-ai-ui-message-stream"] == "v1"
        chunks = [f["data"] for f in _frames(ui.text)]
        assert chunks[-1] == "[DONE]"
        deltas = "".join(orjson.loads(c).get("delta", "") for c in chunks[:-1] if '"text-delta"' in c)
        assert deltas == "You said: hi "


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_official_openai_client_reads_a_bus_stream(app_url: tuple[Any, str]) -> None:
    _, url = app_url
    async with openai.AsyncOpenAI(base_url=url + "/v1", api_key="unused", max_retries=0) as client:
        stream = await client.chat.completions.create(
            model="echo", messages=[{"role": "user", "content": "two words"}], stream=True
        )
        content: list[str] = []
        reasoning: list[str] = []
        finish = None
        async for chunk in stream:
            assert chunk.object == "chat.completion.chunk"
            choice = chunk.choices[0]
            content.append(choice.delta.content or "")
            extra = choice.delta.model_extra or {}
            reasoning.append(extra.get("reasoning_content") or "")
            finish = choice.finish_reason or finish
        assert "".join(content) == "You said: two words "
        assert "".join(reasoning) == "Echoing the prompt."
        assert finish == "stop"


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_sse_resume_mid_stream_and_abort_and_disconnect_through_fastapi(app_url: tuple[Any, str]) -> None:
    app, url = app_url
    bus: Bus = app.state.bus
    hub: StreamHub = app.state.hub
    step = anyio.Event()

    async def produce() -> None:
        async with bus.stream(model="m", stream="fa") as w:
            for i in range(3):
                await w.delta(f"{i}")
            await step.wait()
            for i in range(3, 6):
                await w.delta(f"{i}")
            await anyio.sleep_forever()  # aborted below

    async with anyio.create_task_group() as tg, httpx.AsyncClient(base_url=url, timeout=10) as client:
        tg.start_soon(produce)
        seen: list[int] = []
        last = ""
        async with client.stream("GET", "/streams/fa/events") as response:
            async for line in response.aiter_lines():
                if line.startswith("id: "):
                    last = line[4:]
                    seen.append(int(last.rsplit(":", 1)[1]))
                    if len(seen) == 2:
                        break  # client disconnects
        with anyio.fail_after(5):
            while hub.readers:
                await hub.wait_changed(0.05)
        step.set()
        with anyio.fail_after(5):
            while hub.last_seq("fa") < 6:
                await hub.wait_changed(0.05)
        bus.abort("fa", "moderated", by="moderation")
        r = await client.get("/streams/fa/events", headers={"Last-Event-ID": last})
        seen += [decode(f["data"]).seq for f in _frames(r.text)]
        assert seen == list(range(8))
        assert type(decode(_frames(r.text)[-1]["data"])).__name__ == "AbortEvent"
        assert (await client.get("/streams/fa/text")).text == "012345\n[aborted by moderation: moderated]\n"


def _starlette(hub: StreamHub) -> Starlette:
    async def one(request: Request) -> EventStreamResponse:
        fmt = request.path_params["fmt"]
        stream = request.path_params["sid"]
        maker = {"sse": sse_response, "text": text_response, "ndjson": ndjson_response, "openai": openai_response}
        return maker[fmt](hub, stream=stream, start_timeout=0.5, unknown_stream_timeout=0.5)

    async def many(request: Request) -> EventStreamResponse:
        return EventStreamResponse(hub, "ui", filter=None)

    return Starlette(routes=[Route("/s/{sid}/{fmt}", one), Route("/next/ui", many)])


async def test_asgi_responses_run_under_asyncio_and_trio(writer: Any) -> None:
    async with Bus() as bus:
        hub = StreamHub.attach(bus)
        await writer(bus, "t1", ["a", "b"], ending="error")
        transport = httpx.ASGITransport(app=_starlette(hub))
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            assert (await client.get("/s/t1/text")).text == "ab\n[error upstream: model crashed]\n"
            lines = (await client.get("/s/t1/ndjson")).text.splitlines()
            assert [decode(x).seq for x in lines] == [0, 1, 2, 3]
            r = await client.get("/s/t1/sse", headers={"Last-Event-ID": "t1:1"})
            assert [f["id"] for f in _frames(r.text)] == ["t1:2", "t1:3"]
            oa = _frames((await client.get("/s/t1/openai")).text)
            assert orjson.loads(oa[-1]["data"])["error"]["type"] == "upstream"
            r = await client.get("/s/missing/sse")
            assert r.status_code == 404
            assert "did not start" in r.text
            r = await client.get("/s/missing/openai")  # OpenAI's error object, which OpenAI clients show
            assert (r.status_code, r.headers["content-type"]) == (404, "application/json")
            assert r.json()["error"] == {
                "message": "stream 'missing' did not start within 0.5 s",
                "type": "invalid_request_error",
                "param": None,
                "code": "stream_not_found",
            }

            async def later() -> None:
                with anyio.fail_after(10):
                    while not hub.waiting:
                        await hub.wait_changed()
                await writer(bus, "t2", ["next"])

            async with anyio.create_task_group() as tg:
                tg.start_soon(later)
                ui = await client.get("/next/ui")
            chunks = [f["data"] for f in _frames(ui.text)]
            assert orjson.loads(chunks[0]) == {"type": "start", "messageId": "t2"}
            assert chunks[-1] == "[DONE]"
        await bus.shutdown()


async def test_asgi_over_real_http_under_both_backends(anyio_backend: str, writer: Any) -> None:
    """Hypercorn serves the ASGI blocks on loopback under asyncio and trio: live SSE, disconnect, resume, abort."""
    from hypercorn.config import Config

    if anyio_backend == "trio":
        from hypercorn.trio import serve
    else:
        from hypercorn.asyncio import serve  # type: ignore[assignment]

    port = _free_port()
    config = Config()
    config.bind = [f"127.0.0.1:{port}"]
    config.accesslog = None
    config.errorlog = None
    config.graceful_timeout = 1.0
    stop = anyio.Event()
    async with Bus() as bus:
        hub = StreamHub.attach(bus)
        async with anyio.create_task_group() as tg:
            tg.start_soon(lambda: serve(_starlette(hub), config, shutdown_trigger=stop.wait))  # type: ignore[arg-type]
            with anyio.fail_after(10):
                while True:
                    try:
                        await (await anyio.connect_tcp("127.0.0.1", port)).aclose()
                        break
                    except OSError:
                        await anyio.sleep(0.02)
            step = anyio.Event()

            async def produce() -> None:
                async with bus.stream(model="m", stream="hc") as w:
                    await w.delta("a")
                    await w.delta("b")
                    await step.wait()
                    await w.delta("c")
                    await anyio.sleep_forever()

            tg.start_soon(produce)
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=10) as client:
                # A raw socket client (httpx's nested generators warn under trio when left early).
                raw = await anyio.connect_tcp("127.0.0.1", port)
                await raw.send(b"GET /s/hc/sse HTTP/1.1\r\nHost: t\r\n\r\n")
                received = b""
                with anyio.fail_after(10):
                    while b"id: hc:1\n" not in received:
                        received += await raw.receive()
                await raw.aclose()  # disconnect mid-stream
                last = "hc:1"
                with anyio.fail_after(5):
                    while hub.readers:
                        await hub.wait_changed(0.05)
                step.set()
                with anyio.fail_after(5):
                    while hub.last_seq("hc") < 3:
                        await hub.wait_changed(0.05)
                bus.abort("hc", "stop", by="client")
                r = await client.get("/s/hc/sse", headers={"Last-Event-ID": last})
                assert [f["id"] for f in _frames(r.text)] == ["hc:2", "hc:3", "hc:4"]
                assert (await client.get("/s/hc/text")).text == "abc\n[aborted by client: stop]\n"
            stop.set()
        await bus.shutdown()


async def test_asgi_responses_honour_a_token_scope(writer: Any) -> None:
    """The app authenticates (streambus.tokens) and hands the scope to the response: 403, or narrowed."""
    secret = secrets.token_urlsafe(32)
    auth = Authenticator(verifier=TokenVerifier(secret=secret))

    async def one(request: Request) -> EventStreamResponse:
        scope = auth.authenticate(bearer_credential(request.headers.get("authorization")))
        sid = request.path_params["sid"]
        return text_response(hub, stream=sid, token_scope=scope, unknown_stream_timeout=0.5)

    async def many(request: Request) -> EventStreamResponse:
        scope = auth.authenticate(bearer_credential(request.headers.get("authorization")))
        return EventStreamResponse(hub, "text", filter=Filter(), token_scope=scope, start_timeout=0.5)

    async with Bus() as bus:
        hub = StreamHub.attach(bus)
        await writer(bus, "mine", ["ours"], meta={"tenant": "a"})
        await writer(bus, "theirs", ["not yours"], meta={"tenant": "b"})
        app = Starlette(routes=[Route("/s/{sid}", one), Route("/next", many)])
        headers = {"Authorization": "Bearer " + mint_token(secret, meta={"tenant": "a"})}
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as client:
            assert (await client.get("/s/mine", headers=headers)).text == "ours"
            r = await client.get("/s/theirs", headers=headers)
            assert (r.status_code, r.text) == (403, "stream 'theirs' is outside this token's scope\n")
            # The oldest live or next stream of the filter, narrowed: b's live stream is never picked.
            async with bus.stream(model="m", stream="live-b", meta={"tenant": "b"}) as w:
                await w.delta("b is typing")
                with anyio.fail_after(10):
                    r = await client.get("/next", headers=headers)
                assert r.status_code == 404
        await bus.shutdown()
