"""The ``http`` sink over real HTTP on loopback: every format, resume, abort endings, errors."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import anyio
import httpx
import orjson
import pytest
from streambus_http import HttpSink

from streambus import Bus, decode
from streambus.config import parse_config
from streambus.errors import ConfigError, SinkFailed

pytestmark = pytest.mark.anyio

AIOHTTP_EXAMPLE = Path(__file__).resolve().parents[3] / "docs" / "examples" / "aiohttp_app.py"


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"  # aiohttp is asyncio-bound


async def sse_frames(response: httpx.Response) -> AsyncIterator[dict[str, str]]:
    """Parse server-sent events: yields {'id', 'event', 'data'} per frame."""
    frame: dict[str, str] = {}
    async for line in response.aiter_lines():
        if line == "":
            if "data" in frame:
                yield frame
            frame = {}
        elif line.startswith(":"):
            continue
        else:
            key, _, value = line.partition(":")
            value = value[1:] if value.startswith(" ") else value
            frame[key] = frame[key] + "\n" + value if key == "data" and key in frame else value


async def test_each_format_serves_one_stream(served: Any, writer: Any) -> None:
    await writer(served.bus, "s1", ["Hel", ("reasoning", "hmm"), "lo"])
    async with httpx.AsyncClient(base_url=served.url) as client:
        sse = await client.get("/streams/s1/sse")
        assert sse.headers["content-type"] == "text/event-stream"
        frames = _parse_sse(sse.text)
        assert [f["id"] for f in frames] == [f"s1:{i}" for i in range(5)]
        events = [decode(f["data"]) for f in frames]
        assert [type(e).__name__ for e in events] == [
            "StartEvent",
            "DeltaEvent",
            "DeltaEvent",
            "DeltaEvent",
            "EndEvent",
        ]

        text = await client.get("/streams/s1/text")
        assert text.headers["content-type"].startswith("text/plain")
        assert text.text == "Hello"

        nd = await client.get("/streams/s1/ndjson")
        assert nd.headers["content-type"] == "application/x-ndjson"
        assert [decode(line).seq for line in nd.text.splitlines()] == [0, 1, 2, 3, 4]

        ui = await client.get("/streams/s1/ui")
        assert ui.headers["x-vercel-ai-ui-message-stream"] == "v1"
        chunks = [f["data"] for f in _parse_sse(ui.text)]
        assert chunks[-1] == "[DONE]"
        parts = [orjson.loads(c) for c in chunks[:-1]]
        assert [p["type"] for p in parts] == [
            "start",
            "start-step",
            "text-start",
            "text-delta",
            "text-end",
            "reasoning-start",
            "reasoning-delta",
            "reasoning-end",
            "text-start",
            "text-delta",
            "text-end",
            "finish-step",
            "finish",
        ]
        assert parts[0]["messageId"] == "s1"
        assert parts[-1]["finishReason"] == "stop"

        oa = await client.get("/streams/s1/openai")
        chunks = [f["data"] for f in _parse_sse(oa.text)]
        assert chunks[-1] == "[DONE]"
        bodies = [orjson.loads(c) for c in chunks[:-1]]
        assert all(b["object"] == "chat.completion.chunk" and b["id"] == "chatcmpl-s1" for b in bodies)
        content = "".join(b["choices"][0]["delta"].get("content", "") for b in bodies)
        assert content == "Hello"
        assert bodies[-1]["choices"][0]["finish_reason"] == "stop"


def _parse_sse(text: str) -> list[dict[str, str]]:
    frames = []
    for block in text.split("\n\n"):
        frame: dict[str, str] = {}
        for line in block.split("\n"):
            if not line or line.startswith(":"):
                continue
            key, _, value = line.partition(":")
            frame[key] = value[1:] if value.startswith(" ") else value
        if "data" in frame:
            frames.append(frame)
    return frames


async def test_sse_resumes_after_last_event_id_without_gap_or_duplicate(served: Any) -> None:
    bus: Bus = served.bus
    seen: list[int] = []
    first_batch = anyio.Event()
    more = anyio.Event()

    async def produce() -> None:
        async with bus.stream(model="m", stream="live") as w:
            for i in range(5):
                await w.delta(f"a{i} ")
            await first_batch.wait()
            for i in range(5):  # published while the client is disconnected
                await w.delta(f"b{i} ")
            more.set()
            for i in range(5):
                await w.delta(f"c{i} ")
            await w.end()

    async with anyio.create_task_group() as tg, httpx.AsyncClient(base_url=served.url) as client:
        tg.start_soon(produce)
        last_id = None
        async with client.stream("GET", "/streams/live/sse") as response:
            async for frame in sse_frames(response):
                seen.append(decode(frame["data"]).seq)
                last_id = frame["id"]
                if len(seen) == 4:
                    break  # drop the connection mid-stream
        first_batch.set()
        await more.wait()
        async with client.stream("GET", "/streams/live/sse", headers={"Last-Event-ID": str(last_id)}) as response:
            async for frame in sse_frames(response):
                seen.append(decode(frame["data"]).seq)
    assert seen == list(range(17))  # start + 15 deltas + end, each exactly once


async def test_sse_filter_resume(served: Any, writer: Any) -> None:
    bus: Bus = served.bus
    async with httpx.AsyncClient(base_url=served.url) as client:
        # Record a position, then publish interleaved streams of two models.
        await writer(bus, "before", ["zero"], model="x")
        after = f"before:{2}"
        async with bus.stream(model="x", stream="x1") as a, bus.stream(model="y", stream="y1") as b:
            async with bus.stream(model="x", stream="x2") as c:
                for i in range(3):
                    await a.delta(f"a{i}")
                    await b.delta(f"b{i}")
                    await c.delta(f"c{i}")
        got: list[tuple[str, int]] = []
        with anyio.fail_after(10):
            async with client.stream(
                "GET", "/events/sse", params={"model": "x"}, headers={"Last-Event-ID": after}
            ) as response:
                async for frame in sse_frames(response):
                    event = decode(frame["data"])
                    got.append((event.stream, event.seq))
                    assert frame["id"] == f"{event.stream}:{event.seq}"
                    if got.count(("x1", 4)) and got.count(("x2", 4)):
                        break
    expected = [("x1", 0), ("x2", 0)]
    for i in range(1, 4):
        expected += [("x1", i), ("x2", i)]
    # x2 ends first (inner block), then x1
    expected += [("x2", 4), ("x1", 4)]
    assert got == expected


@pytest.mark.parametrize("ending", ["abort", "abort-client", "error"])
async def test_failed_streams_end_each_format_its_own_way(served: Any, writer: Any, ending: str) -> None:
    await writer(served.bus, "f", ["partial ", "answer"], ending=ending)
    async with httpx.AsyncClient(base_url=served.url) as client:
        sse = _parse_sse((await client.get("/streams/f/sse")).text)
        last = decode(sse[-1]["data"])
        assert type(last).__name__ == ("ErrorEvent" if ending == "error" else "AbortEvent")

        nd = (await client.get("/streams/f/ndjson")).text.splitlines()
        assert decode(nd[-1]) == last

        text = (await client.get("/streams/f/text")).text
        if ending == "error":
            assert text == "partial answer\n[error upstream: model crashed]\n"
        elif ending == "abort":
            assert text == "partial answer\n[aborted by moderation: unsafe content]\n"
        else:
            assert text == "partial answer\n[aborted by client: user pressed stop]\n"

        ui = [f["data"] for f in _parse_sse((await client.get("/streams/f/ui")).text)]
        assert ui[-1] == "[DONE]"
        final = orjson.loads(ui[-2])
        if ending == "error":
            assert final == {"type": "error", "errorText": "upstream: model crashed"}
        else:
            assert final["type"] == "abort"
            assert "unsafe content" in final["reason"] or "user pressed stop" in final["reason"]
        assert not any(orjson.loads(c)["type"] == "finish" for c in ui[:-1])

        oa = [f["data"] for f in _parse_sse((await client.get("/streams/f/openai")).text)]
        if ending == "abort":  # moderation: the way OpenAI ends a filtered completion
            assert oa[-1] == "[DONE]"
            assert orjson.loads(oa[-2])["choices"][0]["finish_reason"] == "content_filter"
        else:
            err = orjson.loads(oa[-1])["error"]
            assert err["type"] == ("upstream" if ending == "error" else "aborted")
            assert "[DONE]" not in oa


async def test_live_abort_reaches_an_open_response(served: Any) -> None:
    bus: Bus = served.bus
    started = anyio.Event()

    async def produce() -> None:
        async with bus.stream(model="m", stream="ab") as w:
            await w.delta("so far")
            started.set()
            await anyio.sleep_forever()

    async with anyio.create_task_group() as tg, httpx.AsyncClient(base_url=served.url) as client:
        tg.start_soon(produce)
        await started.wait()
        async with client.stream("GET", "/streams/ab/ui") as response:
            chunks: list[str] = []
            async for frame in sse_frames(response):
                chunks.append(frame["data"])
                if '"text-delta"' in frame["data"]:
                    assert bus.abort("ab", "stop button", by="client")
        assert chunks[-1] == "[DONE]"
        assert orjson.loads(chunks[-2]) == {"type": "abort", "reason": "aborted by client: stop button"}


@pytest.mark.sink_options(unknown_stream_timeout=0.2)
async def test_unknown_stream_is_404_and_bad_requests_name_the_problem(served: Any) -> None:
    async with httpx.AsyncClient(base_url=served.url) as client:
        r = await client.get("/streams/nope/sse")
        assert r.status_code == 404
        assert r.text == "stream 'nope' did not start within 0.2 s\n"
        r = await client.get("/streams/nope/xml")
        assert r.status_code == 404
        assert "unknown format 'xml'" in r.text
        r = await client.get("/streams/nope/sse", headers={"Last-Event-ID": "garbage"})
        assert r.status_code == 400
        assert "Last-Event-ID 'garbage'" in r.text
        r = await client.get("/streams/a/sse", headers={"Last-Event-ID": "b:3"})
        assert r.status_code == 400
        assert "another stream" in r.text
        r = await client.post("/v1/chat/completions", content=b"{not json")
        assert r.status_code == 400
        assert "not JSON" in r.json()["error"]["message"]
        r = await client.post("/v1/chat/completions", json={"model": "m", "stream": False})
        assert r.status_code == 400
        assert r.json() == {
            "error": {
                "message": 'only streamed completions are served: send "stream": true',
                "type": "invalid_request_error",
                "param": None,
                "code": None,
            }
        }
        r = await client.post("/api/chat", json={"messages": []})
        assert r.status_code == 400
        assert '"id"' in r.text


async def test_resume_after_the_terminal_event_answers_204(served: Any, writer: Any) -> None:
    await writer(served.bus, "done", ["x"])
    async with httpx.AsyncClient(base_url=served.url) as client:
        r = await client.get("/streams/done/sse", headers={"Last-Event-ID": "done:2"})
        assert r.status_code == 204  # EventSource stops reconnecting


@pytest.mark.sink_options(per_stream=4)
async def test_evicted_resume_position_says_reset_or_409(served: Any, writer: Any) -> None:
    await writer(served.bus, "long", [f"w{i} " for i in range(20)])
    async with httpx.AsyncClient(base_url=served.url) as client:
        frames = _parse_sse((await client.get("/streams/long/sse", headers={"Last-Event-ID": "long:1"})).text)
        assert frames[0]["event"] == "reset"
        assert orjson.loads(frames[0]["data"])["recovered"] is False
        assert all("event" not in f for f in frames[1:])
        r = await client.get("/streams/long/ndjson", params={"last_event_id": "long:1"})
        assert r.status_code == 409
        assert "no longer in the history" in r.text


async def test_client_disconnect_ends_the_response(served: Any) -> None:
    bus: Bus = served.bus
    hub = served.sink.hub
    started = anyio.Event()

    async def produce() -> None:
        async with bus.stream(model="m", stream="dc") as w:
            await w.delta("one")
            started.set()
            await anyio.sleep_forever()

    async with anyio.create_task_group() as tg:
        tg.start_soon(produce)
        await started.wait()
        for fmt in ("sse", "text", "ndjson", "ui", "openai"):
            async with httpx.AsyncClient(base_url=served.url) as client:
                async with client.stream("GET", f"/streams/dc/{fmt}") as response:
                    async for _ in response.aiter_bytes():
                        break
                    assert hub.readers == 1
            with anyio.fail_after(5):
                while hub.readers:
                    await hub.wait_changed(0.05)
        bus.abort("dc")


async def test_bus_close_ends_open_responses() -> None:
    lines: list[str] = []
    done = anyio.Event()
    async with httpx.AsyncClient() as client, anyio.create_task_group() as tg:
        async with Bus(drain_timeout=5) as bus:
            sink = HttpSink(port=0)
            bus.add_sink(sink)
            url = await sink.started()
            ready = anyio.Event()

            async def read() -> None:
                async with client.stream("GET", url + "/events/ndjson") as response:
                    ready.set()
                    async for line in response.aiter_lines():
                        lines.append(line)
                done.set()

            tg.start_soon(read)
            await ready.wait()
            async with bus.stream(model="m", stream="sd") as w:
                await w.delta("x")
        with anyio.fail_after(5):
            await done.wait()
    assert [decode(line).seq for line in lines if line] == [0, 1, 2]


@pytest.mark.sink_options(token="s3cret", cors_origins=["http://app.example"])
async def test_token_and_cors(served: Any, writer: Any) -> None:
    await writer(served.bus, "t", ["ok"])
    async with httpx.AsyncClient(base_url=served.url) as client:
        assert (await client.get("/streams/t/text")).status_code == 401
        assert (await client.get("/streams/t/text", headers={"Authorization": "Bearer wrong"})).status_code == 401
        r = await client.get(
            "/streams/t/text", headers={"Authorization": "Bearer s3cret", "Origin": "http://app.example"}
        )
        assert r.text == "ok"
        assert r.headers["access-control-allow-origin"] == "http://app.example"
        r = await client.get("/streams/t/text", params={"token": "s3cret"}, headers={"Origin": "http://evil.example"})
        assert r.status_code == 403
        assert "access-control-allow-origin" not in r.headers
        pre = await client.options("/api/chat", headers={"Origin": "http://app.example"})
        assert pre.status_code == 204
        assert "POST" in pre.headers["access-control-allow-methods"]


async def test_streams_listing_and_ai_sdk_chat_routes(served: Any, writer: Any) -> None:
    bus: Bus = served.bus
    async with httpx.AsyncClient(base_url=served.url) as client:
        assert (await client.get("/api/chat/c1/stream")).status_code == 204  # nothing to resume
        gate = anyio.Event()

        async def produce() -> None:
            await gate.wait()
            await writer(bus, "chat-stream", ["Hi ", "there"], meta={"chat": "c1"})

        async with anyio.create_task_group() as tg:
            tg.start_soon(produce)

            async def post() -> list[str]:
                r = await client.post("/api/chat", json={"id": "c1", "messages": []})
                return [f["data"] for f in _parse_sse(r.text)]

            result: list[list[str]] = []

            async def run_post() -> None:
                result.append(await post())

            tg.start_soon(run_post)
            with anyio.fail_after(10):
                while not served.sink.hub.waiting:
                    await served.sink.hub.wait_changed()
            gate.set()
        deltas = [orjson.loads(c)["delta"] for c in result[0][:-1] if '"text-delta"' in c]
        assert "".join(deltas) == "Hi there"
        listing = (await client.get("/streams")).json()["streams"]
        assert listing == [
            {"stream": "chat-stream", "model": "m", "provider": "test", "meta": {"chat": "c1"}, "live": False}
        ]


def test_sink_under_trio_fails_with_a_clear_error() -> None:
    async def main() -> None:
        async with Bus() as bus:
            bus.add_sink(HttpSink(port=0), critical=True)

    with pytest.raises(SinkFailed) as info:
        anyio.run(main, backend="trio")
    assert "needs asyncio" in str(info.value.__cause__)


def test_config_validation_names_the_key() -> None:
    with pytest.raises(ConfigError, match=r"sinks\[0\].port"):
        parse_config({"sinks": [{"type": "http", "port": "abc"}]})
    with pytest.raises(ConfigError, match="port: must be between"):
        parse_config({"sinks": [{"type": "http", "port": 70000}]})
    with pytest.raises(ConfigError, match="prefix"):
        parse_config({"sinks": [{"type": "http", "prefix": "bus/"}]})
    with pytest.raises(ConfigError, match="unknown key"):
        parse_config({"sinks": [{"type": "http", "prot": 1}]})
    pipeline = parse_config({"sinks": [{"type": "http", "port": 0, "cors_origins": ["*"]}]})
    sink = pipeline.sinks[0].sink
    assert isinstance(sink, HttpSink)
    assert sink.options.cors_origins == ["*"]


async def test_official_openai_client_against_the_sink(served: Any, writer: Any) -> None:
    import openai

    bus: Bus = served.bus
    await writer(bus, "oa1", ["Hello", " world"], model="llama")
    await writer(bus, "oa2", ["bro"], model="llama", ending="error")
    async with openai.AsyncOpenAI(base_url=served.url + "/v1", api_key="unused", max_retries=0) as client:
        stream = await client.chat.completions.create(
            model="llama",
            messages=[],
            stream=True,
            stream_options={"include_usage": True},
            extra_body={"stream_id": "oa1"},
        )
        chunks = [chunk async for chunk in stream]
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "Hello world"
        assert chunks[-2].choices[0].finish_reason == "stop"
        assert chunks[-1].choices == []
        assert chunks[-1].usage is not None
        assert (chunks[-1].usage.prompt_tokens, chunks[-1].usage.completion_tokens) == (3, 2)

        stream = await client.chat.completions.create(
            model="llama", messages=[], stream=True, extra_body={"stream_id": "oa2"}
        )
        with pytest.raises(openai.APIError, match="model crashed"):
            async for _ in stream:
                pass

        # Without stream_id: the next stream of that model.
        async def later() -> None:
            with anyio.fail_after(10):
                while not served.sink.hub.waiting:
                    await served.sink.hub.wait_changed()
            await writer(bus, "oa3", ["other"], model="other-model")
            await writer(bus, "oa4", ["next one"], model="llama")

        async with anyio.create_task_group() as tg:
            tg.start_soon(later)
            stream = await client.chat.completions.create(model="llama", messages=[], stream=True)
            text = "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
        assert text == "next one"


async def test_httpx_sse_json_loop_reads_every_frame(served: Any, writer: Any) -> None:
    # httpx-sse's documented loop calls sse.json() on every event: no frame may be data-less.
    from httpx_sse import aconnect_sse

    await writer(served.bus, "hs", ["Hel", "lo"])
    async with httpx.AsyncClient(base_url=served.url) as client:
        async with aconnect_sse(client, "GET", "/streams/hs/sse") as source:
            received = [(sse.id, sse.retry, sse.json()) async for sse in source.aiter_sse()]
    assert [(event_id, data["type"]) for event_id, _, data in received] == [
        ("hs:0", "start"),
        ("hs:1", "delta"),
        ("hs:2", "delta"),
        ("hs:3", "end"),
    ]
    assert received[0][1] == 3000  # the reconnect delay rides in the first event's frame


@pytest.mark.sink_options(per_stream=4, retry_ms=1500)
async def test_httpx_sse_reads_the_reset_frame_of_an_evicted_resume(served: Any, writer: Any) -> None:
    from httpx_sse import aconnect_sse

    await writer(served.bus, "ev", [f"w{i} " for i in range(20)])
    async with httpx.AsyncClient(base_url=served.url) as client:
        async with aconnect_sse(client, "GET", "/streams/ev/sse", headers={"Last-Event-ID": "ev:1"}) as source:
            first = await anext(source.aiter_sse())
    assert (first.event, first.retry, first.json()["recovered"]) == ("reset", 1500, False)


@pytest.mark.sink_options(unknown_stream_timeout=0.2, token="s3cret")
async def test_openai_client_shows_the_message_of_every_refusal(served: Any) -> None:
    import openai

    url = served.url + "/v1"
    async with openai.AsyncOpenAI(base_url=url, api_key="s3cret", max_retries=0) as client:
        with pytest.raises(openai.NotFoundError, match="stream 'nope' did not start within 0.2 s") as missing:
            await client.chat.completions.create(model="m", messages=[], stream=True, extra_body={"stream_id": "nope"})
        assert missing.value.code == "stream_not_found"
        with pytest.raises(openai.BadRequestError, match="only streamed completions are served"):
            await client.chat.completions.create(model="m", messages=[])
        with pytest.raises(openai.BadRequestError, match="Last-Event-ID 'junk'"):
            await client.chat.completions.create(
                model="m",
                messages=[],
                stream=True,
                extra_body={"stream_id": "x"},
                extra_headers={"Last-Event-ID": "junk"},
            )
    async with openai.AsyncOpenAI(base_url=url, api_key="wrong", max_retries=0) as client:
        with pytest.raises(openai.AuthenticationError, match="missing or wrong bearer token"):
            await client.chat.completions.create(model="m", messages=[], stream=True)


async def test_openai_resume_after_last_event_id_keeps_model_and_id(served: Any, writer: Any) -> None:
    import openai

    await writer(served.bus, "rs", ["one ", "two ", "three"], model="llama3")
    async with openai.AsyncOpenAI(base_url=served.url + "/v1", api_key="unused", max_retries=0) as client:
        stream = await client.chat.completions.create(
            model="llama3",
            messages=[],
            stream=True,
            extra_body={"stream_id": "rs"},
            extra_headers={"Last-Event-ID": "rs:1"},
        )
        chunks = [chunk async for chunk in stream]
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == "two three"
    assert {(c.model, c.id) for c in chunks} == {("llama3", "chatcmpl-rs")}
    assert all(c.choices[0].delta.role is None for c in chunks)  # the role came before the resume point


def test_unknown_stream_wait_is_short_by_default_and_validated() -> None:
    assert HttpSink.Options().unknown_stream_timeout <= 5
    with pytest.raises(ConfigError, match=r"sinks\[0\].unknown_stream_timeout: must be more than 0 and finite, got 0"):
        parse_config({"sinks": [{"type": "http", "unknown_stream_timeout": 0}]})


async def test_aiohttp_example_app(writer: Any) -> None:
    import importlib.util

    from aiohttp import web

    spec = importlib.util.spec_from_file_location("aiohttp_example", AIOHTTP_EXAMPLE)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    app = module.create_app()
    runner = web.AppRunner(app, handler_cancellation=True)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        await writer(app[module.BUS], "ex", ["from ", "aiohttp"])
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as client:
            assert (await client.get("/answers/ex")).text == "from aiohttp"
            frames = _parse_sse((await client.get("/bus/streams/ex/sse")).text)
            assert [f["id"] for f in frames] == ["ex:0", "ex:1", "ex:2", "ex:3"]
            assert (await client.get("/answers/ex", headers={"Host": "attacker.example"})).status_code == 403
    finally:
        await runner.cleanup()


def test_shipped_config_is_valid() -> None:
    from streambus import load_config

    pipeline = load_config(AIOHTTP_EXAMPLE.parents[2] / "configs" / "http.toml")
    assert isinstance(pipeline.sinks[0].sink, HttpSink)
    assert pipeline.sinks[0].sink.options.port == 8090
