"""Attacks on the proxy (issue 18): DNS rebinding, cross-origin posts, duplicate headers, a public bind, echoed keys.

Every attack runs over loopback against a scripted upstream, which records
each request it gets: a refused request must leave it untouched.
"""

from __future__ import annotations

import base64
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import anyio
import msgspec
import openai
import pytest
from aiohttp import web
from streambus_proxy import REDACTED, TOKEN_HEADER, ProxyError, check_public_bind, serve_proxy
from streambus_websocket import WebSocketSink
from streambus_websocket.testing import Peer, connect
from structlog.testing import capture_logs

from streambus import Bus
from streambus.builtins.recorder import RecorderSink
from streambus.events import ErrorEvent, Event, encode
from streambus.testing import EventCapture, Reply, ScriptedUpstream

from .conftest import FAKE_KEY

pytestmark = pytest.mark.anyio

CHAT = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}], "stream": True}
SSE = "text/event-stream"


async def _raw_request(url: str, head: str, body: bytes = b"") -> tuple[int, bytes]:
    """Send a hand-written HTTP/1.1 request (headers as given, duplicates included); return status and body."""
    host, port = url.removeprefix("http://").rsplit(":", 1)
    stream = await anyio.connect_tcp(host.strip("[]"), int(port))
    async with stream:
        request = (
            head.rstrip("\r\n").replace("\n", "\r\n") + f"\r\nContent-Length: {len(body)}\r\nConnection: close\r\n\r\n"
        )
        await stream.send(request.encode() + body)
        data = b""
        with anyio.fail_after(10):
            try:
                while True:
                    data += await stream.receive()
            except (anyio.EndOfStream, anyio.BrokenResourceError):
                pass
    status_line, _, rest = data.partition(b"\r\n")
    return int(status_line.split()[1]), rest.partition(b"\r\n\r\n")[2]


# -- point 5 and 3: Origin and Host -----------------------------------------------------------


async def test_cross_origin_text_plain_post_is_refused_and_not_forwarded(
    scripted: ScriptedUpstream, tmp_path: Path
) -> None:
    """The attack: any web page can POST text/plain without a preflight; the proxy would add the URL's credentials."""
    upstream = scripted.url.replace("http://", "http://bob:upstream-password-1234@")
    async with Bus() as bus, serve_proxy(bus, upstream) as url, aiohttp.ClientSession() as http:
        for path in ("/v1/chat/completions", "/api/tags"):
            headers = {"Origin": "https://evil.example", "Content-Type": "text/plain"}
            async with http.post(url + path, data=msgspec.json.encode(CHAT), headers=headers) as response:
                assert response.status == 403
                assert "origin 'https://evil.example' is not allowed" in (await response.json())["error"]
                assert "Access-Control-Allow-Origin" not in response.headers
        await bus.shutdown()
    assert scripted.requests == [] and scripted.headers == []


async def test_dns_rebinding_host_is_refused(scripted: ScriptedUpstream) -> None:
    """attacker.example resolves to 127.0.0.1: Host and Origin agree with each other, but Host is not our name."""
    async with Bus() as bus, serve_proxy(bus, scripted.url) as url:
        port = url.rsplit(":", 1)[1]
        status, body = await _raw_request(
            url,
            f"POST /api/chat HTTP/1.1\nHost: attacker.example:{port}\nOrigin: http://attacker.example:{port}\n"
            "Content-Type: text/plain",
            msgspec.json.encode({"model": "m", "messages": []}),
        )
        assert status == 403
        assert b"is not a name of this server" in body
        # The proxy's own names still work, with or without a same-origin page.
        status, _ = await _raw_request(url, f"GET /api/tags HTTP/1.1\nHost: localhost:{port}\nOrigin: {url}")
        assert status == 200
        await bus.shutdown()
    assert len(scripted.requests) == 1  # only the honest request got through


async def test_allowed_hosts_name_the_proxy(scripted: ScriptedUpstream) -> None:
    async with Bus() as bus, serve_proxy(bus, scripted.url, allowed_hosts=["llm.internal"]) as url:
        port = url.rsplit(":", 1)[1]
        assert (await _raw_request(url, f"GET /api/tags HTTP/1.1\nHost: llm.internal:{port}"))[0] == 200
        assert (await _raw_request(url, f"GET /api/tags HTTP/1.1\nHost: other.internal:{port}"))[0] == 403
        await bus.shutdown()
    assert len(scripted.requests) == 1


async def test_allowed_origin_gets_cors_and_its_preflight_answered(scripted: ScriptedUpstream) -> None:
    scripted.reply.chunks = [b'data: {"choices":[{"index":0,"delta":{"content":"ok"}}]}\n\n', b"data: [DONE]\n\n"]
    scripted.reply.content_type = SSE
    app_origin = "https://app.example"
    async with (
        Bus() as bus,
        serve_proxy(bus, scripted.url, allowed_origins=[app_origin]) as url,
        aiohttp.ClientSession() as http,
    ):
        preflight = {
            "Origin": app_origin,
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization, content-type, x-stainless-os",
        }
        async with http.options(url + "/v1/chat/completions", headers=preflight) as response:
            assert response.status == 204
            assert response.headers["Access-Control-Allow-Origin"] == app_origin
            assert "POST" in response.headers["Access-Control-Allow-Methods"]
            assert response.headers["Access-Control-Allow-Headers"] == preflight["Access-Control-Request-Headers"]
        async with http.options(
            url + "/v1/chat/completions", headers={**preflight, "Origin": "https://evil.example"}
        ) as response:
            assert response.status == 403
            assert "Access-Control-Allow-Origin" not in response.headers
        async with http.post(url + "/v1/chat/completions", json=CHAT, headers={"Origin": app_origin}) as response:
            assert response.status == 200
            assert response.headers["Access-Control-Allow-Origin"] == app_origin
            assert "X-Streambus-Stream" in response.headers["Access-Control-Expose-Headers"]
            assert b"[DONE]" in await response.read()
        await bus.shutdown()
    assert len(scripted.requests) == 1  # preflights are answered by the proxy, never forwarded


# -- point 8: duplicate headers ---------------------------------------------------------------


@pytest.mark.parametrize("header", ["Host", "Origin", "Authorization"])
async def test_duplicate_headers_are_a_400_logged_once(
    scripted: ScriptedUpstream, header: str, caplog: pytest.LogCaptureFixture
) -> None:
    async with Bus() as bus, serve_proxy(bus, scripted.url) as url:
        port = url.rsplit(":", 1)[1]
        value = {"Host": f"127.0.0.1:{port}", "Origin": url, "Authorization": f"Bearer {FAKE_KEY}"}[header]
        head = f"GET /api/tags HTTP/1.1\nHost: 127.0.0.1:{port}\n{header}: {value}"
        if header != "Host":
            head += f"\n{header}: {value}"
        else:
            head += f"\nHost: 127.0.0.1:{port}"
        with capture_logs() as logs:
            for _ in range(3):
                status, body = await _raw_request(url, head)
                assert status == 400
                # aiohttp's parser refuses a duplicate Host itself; the guard refuses the others.
                assert f"uplicate {header}".encode() in body.replace(b"'", b"")
        refused = [entry for entry in logs if entry["event"] == "proxy.refused"]
        refused_by_aiohttp = [r for r in caplog.records if r.name == "streambus.proxy.http"]
        if header == "Host":  # aiohttp's parser refused it; its line is kept once per client address per process
            assert not refused and len(refused_by_aiohttp) <= 1, caplog.text
        else:
            assert len(refused) == 1 and not refused_by_aiohttp, (logs, caplog.text)
        assert "Traceback" not in caplog.text
        assert FAKE_KEY not in repr(logs) and FAKE_KEY not in caplog.text
        # Nothing else is disturbed: the next honest request is served.
        assert (await _raw_request(url, f"GET /api/tags HTTP/1.1\nHost: 127.0.0.1:{port}"))[0] == 200
        await bus.shutdown()
    assert len(scripted.requests) == 1


# -- point 5: the client token and a public bind ------------------------------------------------


async def test_client_token_is_required_and_never_forwarded(scripted: ScriptedUpstream) -> None:
    token = "proxy-client-token-5678"
    upstream = scripted.url.replace("http://", "http://bob:upstream-password-1234@")
    async with (
        Bus() as bus,
        serve_proxy(bus, upstream, token=token) as url,
        aiohttp.ClientSession() as http,
    ):
        for headers in ({}, {TOKEN_HEADER: "wrong"}, {"Authorization": "Bearer wrong"}):
            async with http.get(url + "/api/tags", headers=headers) as response:
                assert response.status == 401
                assert TOKEN_HEADER in (await response.json())["error"]
        assert scripted.requests == []
        async with http.get(url + "/api/tags", headers={TOKEN_HEADER: token, "Authorization": "Bearer sk-x"}):
            pass
        async with http.get(url + "/api/tags", headers={"Authorization": f"Bearer {token}"}) as response:
            assert response.status == 200
        body = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
        async with http.post(url + "/api/chat", json=body, headers={"Authorization": f"Bearer {token}"}) as response:
            assert response.status == 200
        await bus.shutdown()
    first, second, third = scripted.headers
    assert scripted.requests[2] == body and third["Authorization"] == second["Authorization"]
    # The token header is the proxy's: the upstream gets the client's own Authorization...
    assert TOKEN_HEADER not in first and first["Authorization"] == "Bearer sk-x"
    # ...and when the token came as the Bearer, it is replaced by the --upstream credentials.
    assert second["Authorization"].startswith("Basic ") and token not in repr(second)


async def test_public_bind_without_token_is_refused() -> None:
    async with Bus() as bus:
        for host in ("0.0.0.0", "::", "192.0.2.1"):
            with pytest.raises(ProxyError, match=r"without a client token.*--token-env.*--allow-public"):
                async with serve_proxy(bus, "http://127.0.0.1:1", host=host):
                    pass  # pragma: no cover - never reached
        await bus.shutdown()
    check_public_bind("0.0.0.0", token="t", allow_public=False)
    check_public_bind("0.0.0.0", token=None, allow_public=True)
    check_public_bind("::1", token=None, allow_public=False)


# -- point 4: keys an upstream echoes back ------------------------------------------------------


@dataclass
class Outputs:
    """Everything the proxy's bus produced, for grepping."""

    url: str
    capture: EventCapture
    recorder_path: Path


@asynccontextmanager
async def _proxy_with_every_output(upstream: str, tmp_path: Path) -> AsyncIterator[tuple[Outputs, Peer]]:
    recorder_path = tmp_path / "proxied.jsonl"
    async with Bus() as bus:
        capture = EventCapture().attach(bus, name="capture")
        bus.add_sink(RecorderSink(path=str(recorder_path), fsync="every_event"), name="recorder")
        ws = WebSocketSink(port=0)
        bus.add_sink(ws, name="websocket")
        async with serve_proxy(bus, upstream) as url, connect(await ws.wait_ready()) as peer:
            await peer.subscribe(id="all")
            yield Outputs(url, capture, recorder_path), peer
        await bus.shutdown()


async def _read_frames(peer: Peer, streams: int) -> list[dict[str, Any]]:
    frames: list[dict[str, Any]] = []
    ended = 0
    while ended < streams:
        frame = await peer.frame()
        if "op" in frame:
            continue
        frames.append(frame)
        ended += frame["type"] in ("end", "error", "abort")
    return frames


def _wire(events: list[Event]) -> str:
    return "\n".join(encode(event).decode() for event in events)


async def test_keys_echoed_by_the_upstream_reach_no_event_recording_frame_or_log(
    scripted: ScriptedUpstream, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The upstream echoes the key in an HTTP error body, an in-band SSE error, NDJSON text and an NDJSON error."""
    bearer = f"Bearer {FAKE_KEY}"
    half = len(FAKE_KEY) // 2
    scripted.replies = [
        Reply(
            status=401,
            content_type="application/json",
            chunks=[
                b'{"error":{"message":"Incorrect API key provided: %s","type":"invalid_request_error"}}'
                % bearer.encode()
            ],
        ),
        Reply(
            content_type=SSE,
            chunks=[
                b'data: {"choices":[{"index":0,"delta":{"content":"ok "}}]}\n\n',
                b'data: {"error":{"message":"key %s was revoked"}}\n\n' % FAKE_KEY.encode(),
            ],
        ),
        Reply(
            content_type="application/x-ndjson",
            chunks=[
                # The key split across two deltas, then an in-band error naming it.
                b'{"model":"m","message":{"role":"assistant","content":"you sent %s"},"done":false}\n'
                % FAKE_KEY[:half].encode(),
                b'{"model":"m","message":{"role":"assistant","content":"%s!"},"done":false}\n'
                % FAKE_KEY[half:].encode(),
                b'{"error":"bad key: %s"}\n' % bearer.encode(),
            ],
        ),
    ]
    caplog.set_level(logging.DEBUG)
    with capture_logs() as logs:
        async with _proxy_with_every_output(scripted.url, tmp_path) as (out, peer):
            async with openai.AsyncOpenAI(base_url=out.url + "/v1", api_key=FAKE_KEY, max_retries=0) as client:
                with pytest.raises(openai.AuthenticationError) as info:
                    await client.chat.completions.create(**CHAT)  # type: ignore[call-overload]
                # The client's own key comes back to the client as the upstream sent it.
                assert FAKE_KEY in str(info.value)
                with pytest.raises(openai.APIError):
                    async for _ in await client.chat.completions.create(**CHAT):  # type: ignore[call-overload]
                        pass
            async with aiohttp.ClientSession() as http:
                headers = {"Authorization": bearer, "X-Streambus-Tags": f"note=sent {FAKE_KEY}"}
                body = {"model": "m", "messages": [], "stream": True}
                async with http.post(out.url + "/api/chat", json=body, headers=headers) as response:
                    await response.read()
            frames = await _read_frames(peer, streams=3)
            await out.capture.wait_for(lambda c: len(c.ended) == 3)
            events = list(out.capture.events)
    assert all(FAKE_KEY in str(h.get("Authorization")) for h in scripted.headers)  # forwarded, as it must be
    outputs = {
        "events": _wire(events),
        "recording": out.recorder_path.read_text(),
        "websocket": msgspec.json.encode(frames).decode(),
        "structlog": repr(logs),
        "logging": caplog.text,
    }
    for name, text in outputs.items():
        assert FAKE_KEY not in text, name
        assert FAKE_KEY[half:] not in text and FAKE_KEY[:half] + '"' not in text, name
    # What was redacted is visible, and nothing else was lost.
    errors = [e for e in events if isinstance(e, ErrorEvent)]
    assert [e.kind for e in errors] == ["http_status", "upstream_error", "upstream_error"]
    assert all(REDACTED in e.message for e in errors)
    text = "".join(getattr(e, "text", "") for e in events if e.stream == errors[2].stream)
    assert text == f"you sent {REDACTED}!"
    assert out.capture.start(errors[2].stream).meta["note"] == f"sent {REDACTED}"


async def test_upstream_url_credentials_reach_neither_bus_nor_client(
    scripted: ScriptedUpstream, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The proxy's own credentials: not even the client may read them back."""
    password = "upstream-password-1234"

    async def echo(request: web.Request, body: Any) -> web.StreamResponse:
        sent = request.headers["Authorization"]
        if request.path == "/api/tags":
            return web.json_response({"error": f"who is {sent}?"}, status=401)
        response = web.StreamResponse(headers={"Content-Type": "application/x-ndjson"})
        await response.prepare(request)
        line = {"model": "m", "message": {"role": "assistant", "content": f"{sent} / {password}"}, "done": False}
        await response.write(msgspec.json.encode(line) + b"\n")
        await response.write(b'{"model":"m","done":true,"done_reason":"stop"}\n')
        return response

    scripted.by_path = {"/api/tags": echo, "/api/chat": echo}
    upstream = scripted.url.replace("http://", f"http://bob:{password}@")
    caplog.set_level(logging.DEBUG)
    with capture_logs() as logs:
        async with _proxy_with_every_output(upstream, tmp_path) as (out, peer):
            async with aiohttp.ClientSession() as http:
                async with http.post(out.url + "/api/chat", json={"model": "m", "messages": []}) as response:
                    streamed = await response.read()
                async with http.get(out.url + "/api/tags") as response:
                    assert response.status == 401
                    error = await response.read()
            frames = await _read_frames(peer, streams=1)
            await out.capture.wait_for(lambda c: len(c.ended) == 1)
            events = list(out.capture.events)
    basic = "Basic " + base64.b64encode(f"bob:{password}".encode()).decode()
    texts = [streamed.decode(), error.decode(), _wire(events), out.recorder_path.read_text()]
    texts += [msgspec.json.encode(frames).decode(), repr(logs), caplog.text]
    for text in texts:
        assert password not in text and basic not in text and basic.split()[1] not in text
    assert REDACTED in streamed.decode() and REDACTED in error.decode()
