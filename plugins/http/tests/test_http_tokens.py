"""Scoped tokens on the ``http`` sink over real loopback HTTP: scope on every route, and bad tokens."""

from __future__ import annotations

import base64
import logging
import secrets
import time
from typing import Any

import anyio
import httpx
import jwt
import orjson
import pytest
from structlog.testing import capture_logs

from streambus.tokens import TokenVerifier, mint_token

pytestmark = pytest.mark.anyio

SECRET = secrets.token_urlsafe(64)  # long enough for HS512 too
OPERATOR_TOKEN = "operator-" + secrets.token_hex(8)
scoped = pytest.mark.sink_options(
    token=OPERATOR_TOKEN, verifier=TokenVerifier(secret=SECRET, leeway=0), start_timeout=0.5, unknown_stream_timeout=0.5
)


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"  # aiohttp is asyncio-bound


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def tenant(name: str, **kwargs: Any) -> dict[str, str]:
    return {"Authorization": "Bearer " + mint_token(SECRET, meta={"tenant": name}, **kwargs)}


async def _two_tenants(served: Any, writer: Any) -> None:
    await writer(served.bus, "a1", ["for ", "a"], meta={"tenant": "a", "chat": "ca"})
    await writer(served.bus, "b1", ["for ", "b"], meta={"tenant": "b", "chat": "cb"})


@scoped
async def test_listing_and_filters_show_only_the_tokens_streams(served: Any, writer: Any) -> None:
    await _two_tenants(served, writer)
    async with httpx.AsyncClient(base_url=served.url, timeout=10) as client:
        r = await client.get("/streams", headers=tenant("a"))
        assert r.status_code == 200
        assert [s["stream"] for s in r.json()["streams"]] == ["a1"]
        r = await client.get("/streams", headers={"Authorization": f"Bearer {OPERATOR_TOKEN}"})
        assert sorted(s["stream"] for s in r.json()["streams"]) == ["a1", "b1"]
        await writer(served.bus, "a2", ["again"], meta={"tenant": "a"})
        # A filter over many streams, resumed from the very first event: only the tenant's own,
        # though b1 came between a1 and a2.
        seen = []
        headers = {**tenant("a"), "Last-Event-ID": "a1:0"}
        async with client.stream("GET", "/events/ndjson", headers=headers) as r:
            assert r.status_code == 200
            async for line in r.aiter_lines():
                event = orjson.loads(line)
                seen.append(event["stream"])
                if event["stream"] == "a2" and event["type"] == "end":
                    break
        assert set(seen) == {"a1", "a2"}


@scoped
async def test_a_stream_outside_the_scope_gets_403_on_every_route(served: Any, writer: Any) -> None:
    await _two_tenants(served, writer)
    async with httpx.AsyncClient(base_url=served.url, timeout=10) as client:
        r = await client.get("/streams/a1/text", headers=tenant("a"))
        assert (r.status_code, r.text) == (200, "for a")
        for path in ("/streams/b1/text", "/streams/b1/sse", "/streams/b1/ui"):
            r = await client.get(path, headers=tenant("a"))
            assert r.status_code == 403, path
            assert "'b1' is outside this token's scope" in r.text
        # A filter naming another tenant, and a resume id that names another tenant's stream.
        r = await client.get("/events/sse?meta.tenant=b", headers=tenant("a"))
        assert r.status_code == 403 and "meta 'tenant'" in r.text
        r = await client.get("/events/text", headers={**tenant("a"), "Last-Event-ID": "b1:0"})
        assert r.status_code == 403
        # OpenAI clients get OpenAI's error object.
        body = {"model": "*", "stream": True, "stream_id": "b1"}
        r = await client.post("/v1/chat/completions", json=body, headers=tenant("a"))
        assert r.status_code == 403 and "outside this token's scope" in r.json()["error"]["message"]
        # The AI SDK routes: another tenant's chat, live, is not found for this token.
        async with served.bus.stream(model="m", stream="b-live", meta={"tenant": "b", "chat": "cb-live"}) as w:
            await w.delta("b is typing")
            assert (await client.get("/api/chat/cb-live/stream", headers=tenant("a"))).status_code == 204
            r = await client.post("/api/chat", json={"id": "cb-live", "messages": []}, headers=tenant("a"))
            assert r.status_code == 404
            r = await client.get("/api/chat/cb-live/stream", headers=tenant("a", streams=["b-live"]))
            assert r.status_code == 204
        # A token scoped by ids.
        ids = {"Authorization": "Bearer " + mint_token(SECRET, streams=["b1"])}
        assert (await client.get("/streams/b1/text", headers=ids)).text == "for b"
        assert (await client.get("/streams/a1/text", headers=ids)).status_code == 403


def _bad_tokens() -> list[tuple[str, str, str]]:
    now = time.time()
    good = mint_token(SECRET, meta={"tenant": "a"})
    head, _payload, signature = good.split(".")
    widened = _b64(orjson.dumps({"exp": int(now) + 60, "streambus": {"streams": "*"}}))
    unsigned = _b64(b'{"alg":"none"}') + "." + widened + "."
    nbf = {"exp": int(now) + 600, "nbf": int(now) + 300, "streambus": {"streams": "*"}}
    return [
        ("forged", mint_token(secrets.token_urlsafe(32), streams="*"), "token signature does not verify"),
        ("tampered", f"{head}.{widened}.{signature}", "token signature does not verify"),
        ("expired", mint_token(SECRET, streams="*", ttl=1, now=now - 600), "token expired"),
        ("not yet valid", jwt.encode(nbf, SECRET, algorithm="HS256"), "token not valid yet"),
        ("wrong algorithm", mint_token(SECRET, streams="*", algorithm="HS384"), "token algorithm not allowed"),
        ("alg none", unsigned, "token algorithm not allowed"),
        ("malformed", "abc.def", "malformed token"),
        ("oversized", "eyJ" + "A" * 5000, "token too large"),
        ("almost the operator's", OPERATOR_TOKEN[:-1], "malformed token"),
    ]


@scoped
@pytest.mark.parametrize("where", ["header", "query"])
async def test_bad_tokens_get_401_with_the_reason_and_disturb_nobody(
    served: Any, writer: Any, where: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    async with httpx.AsyncClient(base_url=served.url, timeout=10) as client:
        async with served.bus.stream(model="m", stream="live", meta={"tenant": "a"}) as w:
            await w.delta("first ")
            async with client.stream("GET", "/streams/live/text", headers=tenant("a")) as honest:
                chunks = honest.aiter_text()
                assert await chunks.__anext__() == "first "
                with capture_logs() as logs:
                    for name, token, reason in _bad_tokens():
                        if where == "header":
                            r = await client.get("/streams/live/text", headers={"Authorization": f"Bearer {token}"})
                        else:
                            r = await client.get("/streams/live/text", params={"token": token})
                        assert r.status_code == 401, name
                        assert r.text.startswith(reason), (name, r.text)
                        assert r.headers["www-authenticate"] == 'Bearer error="invalid_token"'
                        assert token not in r.text and SECRET not in r.text
                        await w.delta(name)
                        assert await chunks.__anext__() == name
                await w.end("stop")
                rest = "".join([c async for c in chunks])
                assert rest == ""
        # The test's own HTTP client logs its request URLs (query included); the server's lines are what count.
        server_lines = [r.getMessage() for r in caplog.records if not r.name.startswith(("httpx", "httpcore"))]
        text = repr(logs) + "\n".join(server_lines)
        assert any(e["event"] == "http.unauthorized" for e in logs)
        for _name, token, _reason in _bad_tokens():
            for part in token.split("."):
                assert len(part) < 10 or part not in text
        assert SECRET not in text and OPERATOR_TOKEN not in text
        r = await client.get("/streams/live/text", headers=tenant("a"))
        assert r.status_code == 200 and r.text.startswith("first forged")


@scoped
async def test_a_missing_or_huge_token_is_refused_and_the_server_goes_on(served: Any, writer: Any) -> None:
    await _two_tenants(served, writer)
    async with httpx.AsyncClient(base_url=served.url, timeout=10) as client:
        r = await client.get("/streams/a1/text")
        assert (r.status_code, r.text) == (401, "missing token\n")
        r = await client.get("/streams/a1/text", headers={"Authorization": "Bearer " + "eyJ" + "A" * 100_000})
        assert r.status_code in (400, 431)
        r = await client.get("/streams/a1/text", headers={"Authorization": f"Bearer {OPERATOR_TOKEN}"})
        assert (r.status_code, r.text) == (200, "for a")


@scoped
async def test_a_response_ends_when_its_token_expires(served: Any) -> None:
    async with served.bus.stream(model="m", stream="long", meta={"tenant": "a"}) as w:
        await w.delta("begun")
        async with httpx.AsyncClient(base_url=served.url, timeout=10) as client:
            with anyio.fail_after(15):
                # 2 s: exp is whole seconds (floor(now) + ttl), so a 1 s token may be
                # expired already when the request arrives (then it is refused, 401).
                r = await client.get("/events/ndjson", headers=tenant("a", ttl=2))
            assert r.status_code == 200
        await w.delta(" still live")
    assert served.bus.running


@pytest.mark.sink_options(token=OPERATOR_TOKEN)
async def test_the_static_token_alone_answers_as_before(served: Any, writer: Any) -> None:
    await writer(served.bus, "s1", ["ok"])
    async with httpx.AsyncClient(base_url=served.url, timeout=10) as client:
        r = await client.get("/streams/s1/text", headers={"Authorization": "Bearer " + mint_token(SECRET, streams="*")})
        assert (r.status_code, r.text) == (401, "missing or wrong bearer token\n")
        r = await client.get("/streams/s1/text", params={"token": OPERATOR_TOKEN})
        assert (r.status_code, r.text) == (200, "ok")


def test_jwt_config_keys_and_their_errors(monkeypatch: pytest.MonkeyPatch) -> None:
    from streambus_http import HttpSink

    from streambus.config import parse_config

    monkeypatch.setenv("SB_HTTP_JWT", SECRET)
    pipeline = parse_config(
        {"sinks": [{"type": "http", "host": "0.0.0.0", "jwt_secret_env": "SB_HTTP_JWT", "jwt_algorithms": ["HS256"]}]},
        path="t.toml",
    )
    sink = pipeline.sinks[0].sink
    assert isinstance(sink, HttpSink)
    sink.preflight()
    auth = sink.authenticator()
    assert auth.authenticate(mint_token(SECRET, meta={"tenant": "a"})).meta == {"tenant": frozenset({"a"})}
    monkeypatch.setenv("SB_HTTP_SHORT", "tiny-secret-value")
    with pytest.raises(ValueError, match="jwt_secret_env: at least 32 bytes") as caught:
        HttpSink(jwt_secret_env="SB_HTTP_SHORT").preflight()
    assert "tiny-secret-value" not in str(caught.value)
    with pytest.raises(ValueError, match="jwt_secret_env: environment variable SB_HTTP_UNSET"):
        HttpSink(jwt_secret_env="SB_HTTP_UNSET").preflight()
    with pytest.raises(ValueError, match="jwt_algorithms: set jwt_secret_env"):
        HttpSink(jwt_algorithms=["HS256"])
    with pytest.raises(ValueError, match="jwt_secret_env: must name an environment variable"):
        HttpSink(jwt_secret_env="")
    with pytest.raises(ValueError, match="jwt_secret_env, jwt_secret_file: give one of them"):
        HttpSink(jwt_secret_env="SB_HTTP_SHORT", jwt_secret_file="secret.txt")
    with pytest.raises(ValueError, match="jwt_leeway: must be within 0-300 seconds"):
        HttpSink(jwt_secret_env="SB_HTTP_SHORT", jwt_leeway=1000)
    with pytest.raises(ValueError, match="host: binding '0.0.0.0' without a token"):
        HttpSink(host="0.0.0.0")


class _Live:
    """A producer of a tenant's chat stream that writes one delta, then waits to be stopped."""

    def __init__(self, bus: Any, stream: str, tenant: str) -> None:
        self.bus, self.stream, self.tenant = bus, stream, tenant
        self.written = anyio.Event()
        self.stopped = anyio.Event()
        self.cancelled = False

    async def run(self) -> None:
        try:
            meta = {"tenant": self.tenant, "chat": f"chat-{self.stream}"}
            async with self.bus.stream(model="m", stream=self.stream, meta=meta) as w:
                await w.delta("generating")
                self.written.set()
                await anyio.sleep_forever()
        finally:
            self.cancelled = True
            self.stopped.set()


async def _live(bus: Any, stream: str, tenant: str) -> _Live:
    live = _Live(bus, stream, tenant)
    bus.start_soon(live.run)
    await live.written.wait()
    return live


@scoped
async def test_a_stop_needs_the_stop_right_and_the_stream_in_scope(served: Any) -> None:
    mine, theirs = await _live(served.bus, "a-1", "a"), await _live(served.bus, "b-1", "b")
    async with httpx.AsyncClient(base_url=served.url, timeout=10) as client:
        r = await client.post("/streams/a-1/abort", headers=tenant("a"))
        assert r.status_code == 403
        assert r.json() == {"error": "this token may not stop streams (it lacks the stop right)"}
        stopper = tenant("a", stop=True)
        for path in ("/streams/b-1/abort", "/streams/no-such-stream/abort"):
            r = await client.post(path, headers=stopper)
            assert r.status_code == 403 and "outside this token's scope" in r.json()["error"], path
        # Another tenant's chat is not found among this token's streams: nothing is stopped.
        r = await client.post("/api/chat/chat-b-1/abort", headers=stopper)
        assert (r.status_code, r.json()) == (404, {"chat": "chat-b-1", "outcome": "unknown"})
        r = await client.post("/streams/a-1/abort", headers=stopper, json={"reason": "user pressed stop"})
        assert (r.status_code, r.json()) == (200, {"stream": "a-1", "outcome": "stopped"})
        r = await client.post("/streams/a-1/abort", headers={"Authorization": "Bearer " + "x.y.z"})
        assert r.status_code == 401 and r.json()["error"].startswith("malformed token")
        with anyio.fail_after(10):
            await mine.stopped.wait()
        assert not theirs.cancelled
        r = await client.post("/api/chat/chat-b-1/abort", headers={"Authorization": f"Bearer {OPERATOR_TOKEN}"})
        assert (r.status_code, r.json()["outcome"]) == (200, "stopped")
