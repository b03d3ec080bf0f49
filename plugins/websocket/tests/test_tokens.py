"""Scoped tokens on the broadcaster over real loopback WebSockets: scope enforcement and bad tokens.

Every refusal is checked for its close code and reason, for what it does not
say (the token, the secret), and for what it does not disturb (a client of
the same server that keeps receiving its stream).
"""

from __future__ import annotations

import base64
import logging
import secrets
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import jwt
import orjson
import pytest
import structlog
from streambus_websocket import CloseCode, ErrorCode, WebSocketSink
from streambus_websocket.testing import Peer, connect, running
from websockets.exceptions import InvalidMessage, InvalidStatus

from streambus import Bus
from streambus.config import parse_config
from streambus.tokens import TokenVerifier, mint_token

pytestmark = pytest.mark.anyio

SECRET = secrets.token_urlsafe(64)  # long enough for HS512 too
OPERATOR_TOKEN = "operator-" + secrets.token_hex(8)


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def tenant_token(tenant: str, **kwargs: Any) -> str:
    return mint_token(SECRET, meta={"tenant": tenant}, **kwargs)


@asynccontextmanager
async def scoped_server(**options: Any) -> AsyncIterator[tuple[Bus, WebSocketSink]]:
    options.setdefault("verifier", TokenVerifier(secret=SECRET, leeway=options.pop("leeway", 5)))
    async with running(token=OPERATOR_TOKEN, **options) as (bus, sink):
        yield bus, sink


def _auth(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


async def _texts(peer: Peer, count: int) -> dict[str, str]:
    """Read *count* whole streams (start..terminal); return each stream's text by its tenant."""
    out: dict[str, str] = {}
    streams: dict[str, str] = {}
    ended = 0
    while ended < count:
        msg = await peer.frame()
        assert "op" not in msg, msg
        if msg["type"] == "start":
            streams[msg["stream"]] = msg["meta"]["tenant"]
            out[msg["meta"]["tenant"]] = ""
        elif msg["type"] == "delta":
            out[streams[msg["stream"]]] += msg["text"]
        elif msg["type"] in ("end", "error", "abort"):
            ended += 1
    return out


# -- scope ------------------------------------------------------------------------------------------


async def test_a_wildcard_subscription_of_a_tenant_token_sees_only_that_tenant() -> None:
    async with scoped_server() as (bus, sink):
        async with connect(sink.url, additional_headers=_auth(tenant_token("a"))) as alice:
            subscribed = await alice.subscribe(id="all")
            assert subscribed["streams"] == []
            for tenant in ("b", "a", "c", "a"):
                async with bus.stream(model="m", meta={"tenant": tenant}) as w:
                    await w.delta(f"for {tenant}")
            got = await _texts(alice, 2)
            assert got == {"a": "for a"}
            await alice.send({"op": "ping", "id": "after"})
            # Nothing of b or c was queued in between: the next frame is the pong.
            assert await alice.expect("pong") == {"op": "pong", "id": "after"}


async def test_recovery_snapshots_and_recent_never_leak_another_tenants_stream() -> None:
    async with scoped_server() as (bus, sink):
        ended = {}
        for tenant in ("a", "b"):
            async with bus.stream(model="m", meta={"tenant": tenant}) as w:
                await w.delta(f"old {tenant}")
            ended[tenant] = w.stream
        async with bus.stream(model="m", meta={"tenant": "b"}) as wb, bus.stream(model="m", meta={"tenant": "a"}) as wa:
            await wb.delta("live b")
            await wa.delta("live a")
            async with connect(sink.url + "?token=" + tenant_token("a")) as alice:
                subscribed = await alice.subscribe(id=1, snapshot=True, recent=10)
                assert subscribed["streams"] == [wa.stream]
                assert subscribed["recent"] == 1 and subscribed["snapshot"] == 1
                frames = [await alice.frame() for _ in range(5)]  # the ended a stream (start, delta, end), its snapshot
                assert {f["stream"] for f in frames} <= {ended["a"], wa.stream}
                assert "live a" in [f.get("text") for f in frames]
                # Resuming with since: only the tenant's own streams may be named...
                async with connect(sink.url, additional_headers=_auth(tenant_token("a"))) as again:
                    refused = await _error(again, {"op": "subscribe", "id": 2, "since": {wb.stream: 0}})
                    assert refused["code"] == ErrorCode.FORBIDDEN.value and refused["field"] == "since"
                    assert refused["id"] == 2
                    # ...and a since of its own replays only its own live streams (wb started while it was away).
                    back = await again.subscribe(id=3, since={wa.stream: 0})
                    assert back["recovered"] and back["streams"] == [wa.stream]
                    replay = [await again.frame() for _ in range(back["replayed"])]
                    assert {f["stream"] for f in replay} == {wa.stream}
            await wa.delta(" more")


async def _error(peer: Peer, message: dict[str, Any]) -> dict[str, Any]:
    await peer.send(message)
    return await peer.expect("error")


async def test_a_subscription_outside_the_scope_is_refused_and_the_connection_stays() -> None:
    async with scoped_server() as (bus, sink):
        async with bus.stream(model="m", meta={"tenant": "b"}) as wb:
            await wb.delta("secret of b")
            ids_token = mint_token(SECRET, streams=["mine-1", "mine-2"])
            async with connect(sink.url, additional_headers=_auth(ids_token)) as peer:
                refused = await _error(peer, {"op": "subscribe", "id": "x", "streams": ["mine-1", wb.stream]})
                assert refused["code"] == "forbidden" and refused["field"] == "streams"
                assert wb.stream in refused["message"] and "outside this token's scope" in refused["message"]
                ok = await peer.subscribe(id="y", streams=["mine-1"])
                assert ok["streams"] == []
            async with connect(sink.url, additional_headers=_auth(tenant_token("a"))) as alice:
                # Another tenant's meta value, or another tenant's stream named by id.
                refused = await _error(alice, {"op": "subscribe", "id": 1, "meta": {"tenant": "b"}})
                assert refused["code"] == "forbidden" and refused["field"] == "meta"
                refused = await _error(alice, {"op": "subscribe", "id": 2, "streams": [wb.stream]})
                assert refused["code"] == "forbidden" and refused["field"] == "streams"
                await alice.send({"op": "ping", "id": 3})
                assert (await alice.expect("pong"))["id"] == 3


async def test_a_static_operator_token_still_reads_everything() -> None:
    async with scoped_server() as (bus, sink):
        async with connect(sink.url, additional_headers=_auth(OPERATOR_TOKEN)) as operator:
            await operator.subscribe(id=1, meta={"tenant": "b"})
            async with bus.stream(model="m", meta={"tenant": "b"}) as w:
                await w.delta("hello")
            events = await operator.events_until_end(w.stream)
            assert [e["type"] for e in events] == ["start", "delta", "end"]


async def test_the_connection_closes_when_its_token_expires() -> None:
    async with scoped_server(leeway=0) as (bus, sink):
        token = tenant_token("a", ttl=2)  # exp is floor(now) + ttl: 1 s may be expired at the handshake
        async with connect(sink.url, additional_headers=_auth(token)) as alice:
            await alice.subscribe(id=1)
            code, frames = await alice.closed(within=10)
        assert code == CloseCode.TOKEN_EXPIRED
        assert frames[-1] == {
            "op": "error",
            "code": ErrorCode.TOKEN_EXPIRED.value,
            "message": "token expired; reconnect with a new token",
        }
        assert bus.running


# -- bad tokens --------------------------------------------------------------------------------------


def _none_token() -> str:
    now = int(time.time())
    claims = {"exp": now + 60, "streambus": {"streams": "*", "stop": True}}
    return _b64(b'{"alg":"none","typ":"JWT"}') + "." + _b64(orjson.dumps(claims)) + "."


def _bad_tokens() -> list[tuple[str, str, str]]:
    now = time.time()
    good = tenant_token("a")
    head, _payload, signature = good.split(".")
    widened = _b64(orjson.dumps({"exp": int(now) + 60, "streambus": {"streams": "*", "stop": True}}))
    nbf = {"exp": int(now) + 600, "nbf": int(now) + 300, "streambus": {"streams": "*"}}
    return [
        ("forged signature", mint_token(secrets.token_urlsafe(32), streams="*"), "token signature does not verify"),
        ("tampered payload", f"{head}.{widened}.{signature}", "token signature does not verify"),
        ("expired", tenant_token("a", ttl=1, now=now - 600), "token expired"),
        ("not yet valid", jwt.encode(nbf, SECRET, algorithm="HS256"), "token not valid yet (nbf or iat in the future)"),
        ("wrong algorithm", mint_token(SECRET, streams="*", algorithm="HS512"), "token algorithm not allowed"),
        ("alg none", _none_token(), "token algorithm not allowed (this server accepts HS256)"),
        ("malformed", "not-a-jwt", "malformed token (expected a signed JWT)"),
        ("malformed segments", "a.b.c", "malformed token (expected a signed JWT)"),
        # The signature is checked before the payload is parsed: garbage in it is never read.
        ("garbage payload", f"{head}.{_b64(b'[1]')}.{signature}", "token signature does not verify"),
        ("no scope", jwt.encode({"exp": int(now) + 60}, SECRET, algorithm="HS256"), "token lacks the 'streambus'"),
        ("oversized", "eyJ" + "A" * 5000, "token too large (more than 4096 bytes)"),
        ("unsigned copy of the operator's", OPERATOR_TOKEN + "x", "malformed token (expected a signed JWT)"),
    ]


@pytest.mark.parametrize("where", ["header", "query"])
async def test_bad_tokens_get_a_clear_refusal_and_disturb_nobody(where: str, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    async with scoped_server() as (bus, sink):
        async with bus.stream(model="m", meta={"tenant": "a"}) as w:
            async with connect(sink.url, additional_headers=_auth(tenant_token("a"))) as alice:
                await alice.subscribe(id=1, streams=[w.stream])
                with structlog.testing.capture_logs() as logs:
                    for name, token, reason in _bad_tokens():
                        if where == "header":
                            opened = connect(sink.url, hello=False, additional_headers=_auth(token))
                        else:
                            opened = connect(sink.url + "?token=" + token, hello=False)
                        async with opened as intruder:
                            code, frames = await intruder.closed()
                        assert code == CloseCode.UNAUTHORIZED, name
                        assert len(frames) == 1 and frames[0]["code"] == ErrorCode.UNAUTHORIZED.value, name
                        assert frames[0]["message"].startswith(reason), (name, frames[0])
                        assert token not in frames[0]["message"] and SECRET not in frames[0]["message"]
                        # The honest client goes on receiving its stream, in order.
                        await w.delta(name)
                        event = await alice.frame()
                        assert event["type"] == "delta" and event["text"] == name
                refusals = [e for e in logs if e["event"] == "websocket.unauthorized"]
                assert len(refusals) == len(_bad_tokens())
                text = repr(logs) + caplog.text
                for _name, token, _reason in _bad_tokens():
                    for part in token.split("."):
                        assert len(part) < 10 or part not in text
                assert SECRET not in text and OPERATOR_TOKEN not in text
                # None of the intruders became a client; the honest one is still there.
                assert sink.clients == 1
            assert bus.running


async def test_a_token_beyond_the_http_header_limit_is_refused_at_the_handshake() -> None:
    async with scoped_server() as (bus, sink):
        huge = "eyJ" + "A" * 100_000
        for kwargs in ({"additional_headers": _auth(huge)}, {}):
            url = sink.url + ("?token=" + huge if not kwargs else "")
            with pytest.raises((InvalidStatus, InvalidMessage, OSError)):
                async with connect(url, hello=False, **kwargs):
                    pass
        async with connect(sink.url, additional_headers=_auth(tenant_token("a"))) as alice:
            await alice.send({"op": "ping"})
            await alice.expect("pong")
        assert bus.running


async def test_a_tenant_token_never_reads_another_tenants_stream_over_the_wire() -> None:
    """The 'token for another tenant' case end to end: b's token, a's stream, every way to ask for it."""
    async with scoped_server() as (bus, sink):
        async with bus.stream(model="m", meta={"tenant": "a"}) as w:
            await w.delta("a's words")
            async with connect(sink.url, additional_headers=_auth(tenant_token("b"))) as mallory:
                for message in (
                    {"op": "subscribe", "id": 1, "streams": [w.stream]},
                    {"op": "subscribe", "id": 2, "since": {w.stream: 0}},
                    {"op": "subscribe", "id": 3, "meta": {"tenant": "a"}},
                    {"op": "subscribe", "id": 4, "meta": {"tenant": ["a", "b"]}},
                ):
                    assert (await _error(mallory, message))["code"] == "forbidden"
                everything = await mallory.subscribe(id=5, snapshot=True, recent=100)
                assert everything["streams"] == [] and everything["snapshot"] == 0 and everything["recent"] == 0
                await w.delta(" and more")
                await w.end("stop")
                await mallory.send({"op": "ping", "id": "last"})
                assert await mallory.expect("pong") == {"op": "pong", "id": "last"}


async def test_tokens_and_the_secret_never_reach_a_recording_or_the_logs(tmp_path: Path) -> None:
    from streambus.builtins.recorder import RecorderSink

    good, forged = tenant_token("a", stop=True), mint_token(secrets.token_urlsafe(32), streams="*")
    with structlog.testing.capture_logs() as logs:
        async with scoped_server() as (bus, sink):
            recorder = RecorderSink(path=str(tmp_path / "{stream}.jsonl"), fsync="every_event")
            bus.add_sink(recorder, name="recorder")
            async with connect(sink.url + "?token=" + good) as alice:
                await alice.subscribe(id=1)
                async with connect(sink.url, hello=False, additional_headers=_auth(forged)) as intruder:
                    assert (await intruder.closed())[0] == CloseCode.UNAUTHORIZED
                async with bus.stream(model="m", meta={"tenant": "a"}) as w:
                    await w.delta("recorded text")
                await alice.events_until_end(w.stream)
            await bus.shutdown()
    written = b"".join([await p.read_bytes() async for p in anyio.Path(tmp_path).iterdir()])
    assert b"recorded text" in written
    text = written.decode() + repr(logs)
    for token in (good, forged):
        for part in token.split("."):
            assert part not in text
    assert SECRET not in text and OPERATOR_TOKEN not in text


# -- configuration -------------------------------------------------------------------------------------


async def test_config_keys_read_the_secret_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SB_WS_JWT", SECRET)
    pipeline = parse_config(
        {"sinks": [{"type": "websocket", "host": "0.0.0.0", "port": 0, "jwt_secret_env": "SB_WS_JWT"}]}, path="t.toml"
    )
    sink = pipeline.sinks[0].sink
    assert isinstance(sink, WebSocketSink)
    sink.preflight()
    async with Bus() as bus:
        bus.add_sink(sink, name="websocket")
        url = (await sink.wait_ready()).replace("0.0.0.0", "127.0.0.1")
        async with connect(url, additional_headers=_auth(tenant_token("a"))) as alice:
            await alice.send({"op": "ping"})
            await alice.expect("pong")
        async with connect(url, hello=False) as nobody:
            code, frames = await nobody.closed()
        assert code == CloseCode.UNAUTHORIZED and frames[0]["message"] == "missing token"
        await bus.shutdown()


def test_bad_jwt_settings_are_refused_naming_the_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SB_WS_SHORT", "tiny-secret-value")
    with pytest.raises(ValueError, match="jwt_secret_env, jwt_secret_file: give one of them"):
        WebSocketSink(jwt_secret_env="X", jwt_secret_file="/y")
    with pytest.raises(ValueError, match="jwt_algorithms: set jwt_secret_env"):
        WebSocketSink(jwt_algorithms=["HS256"])
    with pytest.raises(ValueError, match="jwt_leeway"):
        WebSocketSink(jwt_secret_env="X", jwt_leeway=1000)
    for options, problem in (
        ({"jwt_secret_env": "SB_WS_UNSET"}, "jwt_secret_env: environment variable SB_WS_UNSET is not set"),
        ({"jwt_secret_env": "SB_WS_SHORT"}, "jwt_secret_env: at least 32 bytes"),
        ({"jwt_public_key_file": "/nonexistent.pem"}, "jwt_public_key_file: cannot read /nonexistent.pem"),
        ({"jwt_secret_env": "SB_WS_SHORT", "jwt_algorithms": ["none"]}, "jwt_"),
    ):
        with pytest.raises(Exception, match=problem) as caught:
            WebSocketSink(**options).preflight()
        assert "tiny-secret-value" not in str(caught.value)
    # A public bind is fine with scoped tokens alone.
    WebSocketSink(host="0.0.0.0", jwt_secret_env="SB_WS_SHORT")


def test_streambus_check_names_the_jwt_key(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from click.testing import CliRunner

    from streambus.cli import main

    monkeypatch.setenv("SB_CHECK_SHORT", "tiny-secret-value")
    config = tmp_path / "p.toml"
    for options, problem in (
        ('jwt_secret_env = "SB_CHECK_UNSET"', "sinks[0].jwt_secret_env: environment variable SB_CHECK_UNSET"),
        ('jwt_secret_env = "SB_CHECK_SHORT"', "sinks[0].jwt_secret_env: at least 32 bytes"),
        ('jwt_public_key_file = "/nonexistent.pem"', "sinks[0].jwt_public_key_file: cannot read /nonexistent.pem"),
    ):
        config.write_text(f'[[sinks]]\ntype = "websocket"\n{options}\n')
        result = CliRunner().invoke(main, ["check", str(config)])
        assert result.exit_code == 1, result.output
        assert problem in result.output
        assert "tiny-secret-value" not in result.output and "Traceback" not in result.output


# -- stop rights -----------------------------------------------------------------------------------


class _Live:
    """A producer of tenant *tenant*'s stream that writes one delta, then waits to be stopped."""

    def __init__(self, bus: Bus, stream: str, tenant: str) -> None:
        self.bus, self.stream, self.tenant = bus, stream, tenant
        self.written = anyio.Event()
        self.stopped = anyio.Event()
        self.cancelled = False

    async def run(self) -> None:
        try:
            async with self.bus.stream(model="m", stream=self.stream, meta={"tenant": self.tenant}) as w:
                await w.delta("generating")
                self.written.set()
                await anyio.sleep_forever()
        finally:
            self.cancelled = True
            self.stopped.set()


async def _live(bus: Bus, stream: str, tenant: str) -> _Live:
    live = _Live(bus, stream, tenant)
    bus.start_soon(live.run)
    await live.written.wait()
    return live


async def test_a_stop_needs_the_stop_right_and_the_stream_in_scope() -> None:
    async with scoped_server() as (bus, sink):
        mine, theirs = await _live(bus, "a-1", "a"), await _live(bus, "b-1", "b")
        reader = tenant_token("a")
        stopper = tenant_token("a", stop=True)
        async with connect(sink.url, additional_headers=_auth(reader)) as peer:
            refused = await _error(peer, {"op": "abort", "stream": "a-1", "id": "r1"})
            assert refused == {
                "op": "error",
                "code": "forbidden",
                "message": "this token may not stop streams (it lacks the stop right)",
                "field": "stream",
                "id": "r1",
            }
        async with connect(sink.url, additional_headers=_auth(stopper)) as peer:
            # Another tenant's stream, and a stream that does not exist: the same answer.
            for stream in ("b-1", "no-such-stream"):
                refused = await _error(peer, {"op": "abort", "stream": stream, "id": stream})
                assert refused["code"] == "forbidden" and refused["id"] == stream
                assert refused["message"] == f"stream {stream!r} is outside this token's scope"
            assert not theirs.cancelled and not mine.cancelled
            await peer.send({"op": "abort", "stream": "a-1", "id": "ok"})
            assert await peer.expect("aborted") == {"op": "aborted", "id": "ok", "stream": "a-1", "outcome": "stopped"}
        with anyio.fail_after(10):
            await mine.stopped.wait()
        assert not theirs.cancelled
        # The operator's static token stops anything, as before.
        async with connect(sink.url, additional_headers=_auth(OPERATOR_TOKEN)) as operator:
            await operator.send({"op": "abort", "stream": "b-1", "id": 1})
            assert (await operator.expect("aborted"))["outcome"] == "stopped"
