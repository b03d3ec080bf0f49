"""Secure by default: tokens, origins, loopback-only without a token, client limits, option validation."""

from __future__ import annotations

from pathlib import Path

import anyio
import pytest
from streambus_websocket import BroadcasterError, CloseCode, ErrorCode, WebSocketSink
from streambus_websocket.testing import connect, running
from websockets.exceptions import InvalidStatus

from streambus import Bus, ConfigError
from streambus.config import parse_config

pytestmark = pytest.mark.anyio


@pytest.mark.parametrize(
    "headers",
    [None, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic czNjcmV0"}, {"Authorization": "Bearer "}],
)
async def test_missing_or_wrong_token_is_refused(headers: dict[str, str] | None) -> None:
    async with running(token="s3cret") as (_bus, sink):
        async with connect(sink.url, hello=False, additional_headers=headers) as peer:
            code, frames = await peer.closed()
        assert code == CloseCode.UNAUTHORIZED
        assert frames == [{"op": "error", "code": ErrorCode.UNAUTHORIZED.value, "message": "missing or wrong token"}]
        async with connect(sink.url + "?token=s3cre", hello=False) as peer:
            assert (await peer.closed())[0] == CloseCode.UNAUTHORIZED


async def test_right_token_in_header_or_query_parameter() -> None:
    async with running(token=["old", "s3cret"]) as (_bus, sink):
        async with connect(sink.url, additional_headers={"Authorization": "Bearer s3cret"}) as peer:
            await peer.send({"op": "ping"})
            await peer.expect("pong")
        async with connect(sink.url + "?token=old") as peer:
            await peer.send({"op": "ping"})
            await peer.expect("pong")


async def test_tokens_from_env_and_file(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("WS_TEST_TOKEN", "from-env")
    tokens = tmp_path / "tokens.txt"
    tokens.write_text("# one token per line\nfrom-file\n\n")
    async with running(token_env="WS_TEST_TOKEN", tokens_file=str(tokens)) as (_bus, sink):
        for token in ("from-env", "from-file"):
            async with connect(sink.url, additional_headers={"Authorization": f"Bearer {token}"}) as peer:
                await peer.send({"op": "ping"})
                await peer.expect("pong")
        async with connect(sink.url, hello=False) as peer:
            assert (await peer.closed())[0] == CloseCode.UNAUTHORIZED


@pytest.mark.parametrize(
    ("options", "problem"),
    [
        ({"token_env": "WS_TEST_UNSET"}, "token_env: environment variable WS_TEST_UNSET is not set"),
        ({"tokens_file": "/nonexistent/tokens"}, "tokens_file: cannot read /nonexistent/tokens"),
    ],
)
async def test_missing_token_source_fails_start_clearly(options: dict[str, str], problem: str) -> None:
    async with Bus() as bus:
        sink = WebSocketSink(port=0, **options)
        bus.add_sink(sink, max_restarts=0)
        with pytest.raises(BroadcasterError, match=problem):
            await sink.wait_ready()


async def test_origin_allow_list() -> None:
    async with running(allowed_origins=["https://app.example"]) as (_bus, sink):
        with pytest.raises(InvalidStatus) as refused:
            async with connect(sink.url, origin="https://evil.example"):
                pass
        assert refused.value.response.status_code == 403
        async with connect(sink.url, origin="https://app.example") as peer:
            await peer.send({"op": "ping"})
            await peer.expect("pong")
        # The page served by this server is same-origin; clients without Origin are not browsers.
        async with connect(sink.url, origin=f"http://127.0.0.1:{sink.port}"), connect(sink.url):
            pass
    async with running() as (_bus, sink):
        with pytest.raises(InvalidStatus):
            async with connect(sink.url, origin="http://localhost:1"):
                pass


async def test_max_clients() -> None:
    async with running(max_clients=2) as (_bus, sink), connect(sink.url), connect(sink.url):
        async with connect(sink.url, hello=False) as third:
            code, frames = await third.closed()
        assert code == CloseCode.TOO_MANY_CLIENTS
        assert frames[0]["code"] == ErrorCode.TOO_MANY_CLIENTS.value


def test_public_bind_needs_a_token_or_an_explicit_opt_out() -> None:
    with pytest.raises(ValueError, match="host: binding '0.0.0.0' without a token"):
        WebSocketSink(host="0.0.0.0")
    with pytest.raises(ValueError, match="host: binding 'every interface' without a token"):
        WebSocketSink(host="")
    WebSocketSink(host="0.0.0.0", token="t")
    WebSocketSink(host="0.0.0.0", token_env="SOME_TOKEN")
    WebSocketSink(host="0.0.0.0", allow_public_without_token=True)
    WebSocketSink(host="::1")
    WebSocketSink(host="localhost")


@pytest.mark.parametrize(
    ("key", "value", "problem"),
    [
        ("port", 70000, "port: must be within 0-65535"),
        ("path", "ws", "path: must start with '/'"),
        ("path", "/", "path: '/' serves the live page"),
        ("max_clients", 0, "max_clients: must be at least 1"),
        ("client_buffer_bytes", 0, "client_buffer_bytes: must be at least 1"),
        ("max_message_rate", 0, "max_message_rate: must be positive"),
        ("ping_interval", -1, "ping_interval: must be positive"),
        ("history_ttl", -1, "history_ttl: must be >= 0"),
        ("allowed_origins", ["example.com"], "allowed_origins: 'example.com' must be"),
    ],
)
def test_bad_options_name_the_key(key: str, value: object, problem: str) -> None:
    with pytest.raises(ValueError, match=problem):
        WebSocketSink(**{key: value})
    data = {"sinks": [{"type": "websocket", key: value}]}
    with pytest.raises(ConfigError, match=f"sinks\\[0\\].*{problem.split(':')[0]}"):
        parse_config(data, path="x.toml")


def test_options_or_keywords_never_both_and_unknown_keywords_named(tmp_path: Path) -> None:
    with pytest.raises(TypeError, match=r"not both; .*\(got an Options and port\)"):
        WebSocketSink(WebSocketSink.Options(), port=1)
    with pytest.raises(TypeError, match=r"WebSocketSink: unknown field `prot`; did you mean `port`\?"):
        WebSocketSink(prot=1)
    with pytest.raises(TypeError, match=r"the first argument must be a WebSocketSink.Options, got int"):
        WebSocketSink(8765)  # type: ignore[arg-type]
    tokens = tmp_path / "tokens.txt"
    tokens.write_text("t0k\n")
    assert WebSocketSink(tokens_file=tokens).options.tokens_file == str(tokens)


def test_config_file_builds_the_sink() -> None:
    pipeline = parse_config(
        {"sinks": [{"type": "websocket", "port": 0, "history_events": 10, "allowed_origins": ["*"]}]},
        path="x.toml",
    )
    (entry,) = pipeline.sinks
    sink = entry.sink
    assert isinstance(sink, WebSocketSink)
    assert sink.options.history_events == 10
    with pytest.raises(ConfigError, match=r"sinks\[0\].colour: unknown key"):
        parse_config({"sinks": [{"type": "websocket", "colour": "red"}]}, path="x.toml")
    with pytest.raises(ConfigError, match=r"sinks\[0\].port: expected integer, got \"abc\""):
        parse_config({"sinks": [{"type": "websocket", "port": "abc"}]}, path="x.toml")


async def test_many_clients_each_get_the_whole_stream(anyio_backend: str) -> None:
    # trio's websockets connections are heavier; the benchmark holds 1000 clients.
    count = 200 if anyio_backend == "asyncio" else 50
    async with running() as (bus, sink):
        texts: dict[int, str] = {}
        async with anyio.create_task_group() as tg:
            ready = anyio.Event()
            subscribed = [0]
            done = anyio.Event()
            all_read = anyio.Event()

            async def client(i: int) -> None:
                async with connect(sink.url) as peer:
                    await peer.subscribe(id=1)
                    subscribed[0] += 1
                    if subscribed[0] == count:
                        ready.set()
                    events = await peer.events_until_end()
                    texts[i] = "".join(e.get("text", "") for e in events)
                    if len(texts) == count:
                        all_read.set()
                    await done.wait()

            for i in range(count):
                tg.start_soon(client, i)
            with anyio.fail_after(30):
                await ready.wait()
            assert sink.clients == count
            async with bus.stream(model="m") as w:
                for i in range(50):
                    await w.delta(f"{i},")
            with anyio.fail_after(30):
                await all_read.wait()
            done.set()
        expected = "".join(f"{i}," for i in range(50))
        assert texts == dict.fromkeys(range(count), expected)
