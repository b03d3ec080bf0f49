"""``streambus tail URL``: the real CLI entry point in a subprocess against a real broadcaster."""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import sys
from pathlib import Path

import anyio
import pytest
from click.testing import CliRunner
from streambus_websocket import WebSocketSink, tail_command
from streambus_websocket.testing import running

from streambus import Usage
from streambus.tokens import TokenVerifier, mint_token

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    """The tail is its own process (asyncio); the server's backends are covered by the other tests."""
    return "asyncio"


STREAMBUS = shutil.which("streambus", path=str(Path(sys.executable).parent)) or "streambus"


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "STREAMBUS_TOKEN" and "proxy" not in k.lower()}
    env["PYTHONUNBUFFERED"] = "1"
    return env


async def _until_subscribed(sink: WebSocketSink, count: int = 1) -> None:
    # The tail is another process: poll the server side, bounded.
    for _ in range(1000):
        if sum(1 for c in sink.connections if c.subscriptions) >= count:
            return
        await anyio.sleep(0.01)
    raise AssertionError("the tail never subscribed")


async def _finish(process: anyio.abc.Process) -> tuple[int, str, str]:
    with anyio.fail_after(30):
        await process.wait()
    assert process.stdout is not None and process.stderr is not None
    out = b"".join([chunk async for chunk in process.stdout]).decode()
    err = b"".join([chunk async for chunk in process.stderr]).decode()
    return process.returncode or 0, out, err


@pytest.mark.parametrize("reasoning", [False, True])
async def test_tail_prints_text_as_it_arrives(reasoning: bool) -> None:
    flags = ["--reasoning"] if reasoning else []
    async with running() as (bus, sink):
        process = await anyio.open_process([STREAMBUS, "tail", sink.url, "--max-streams", "1", *flags], env=_env())
        await _until_subscribed(sink)
        async with bus.stream(model="llama") as w:
            await w.delta("hmm", channel="reasoning")
            await w.delta("Hello, ")
            await w.delta("world")
            await w.end("stop", usage=Usage(completion_tokens=2))
        code, out, err = await _finish(process)
    assert code == 0, err
    shown = "hmm\nHello, world" if reasoning else "Hello, world"
    assert out == f"── {w.stream} (llama) ──\n{shown}\n[{w.stream}: stop, 2 tokens]\n"


async def test_tail_groups_interleaved_streams_and_keeps_each_note_with_its_stream() -> None:
    async with running() as (bus, sink):
        process = await anyio.open_process([STREAMBUS, "tail", sink.url, "--max-streams", "3"], env=_env())
        await _until_subscribed(sink)
        async with bus.stream(stream="A", model="m") as a:
            await a.delta("a1 ")
            async with bus.stream(stream="B", model="m") as b:
                await b.delta("b1 ")
                await a.delta("a2")
                async with bus.stream(stream="C", model="m") as c:
                    await c.delta("c1")
                    await c.error("upstream", "model crashed")
                await b.delta("b2")
                await b.end("stop")
            await a.delta(" a3")
            await a.abort("enough", by="client")
        code, out, err = await _finish(process)
    assert code == 0, err
    assert out == (
        "── A (m) ──\na1 a2 a3\n[A: aborted by client: enough]\n"
        "── B (m) ──\nb1 b2\n[B: stop]\n"
        "── C (m) ──\nc1\n[C: error upstream: model crashed]\n"
    )


async def test_tail_json_filters_and_since() -> None:
    async with running() as (bus, sink):
        async with bus.stream(model="a") as w:
            for piece in ("one ", "two ", "three"):
                await w.delta(piece)
            argv = [STREAMBUS, "tail", sink.url, "--json", "--model", "a", "--since", f"{w.stream}:2"]
            process = await anyio.open_process([*argv, "--max-streams", "1"], env=_env())
            await _until_subscribed(sink)
            await w.delta("!")
        code, out, err = await _finish(process)
    assert code == 0, err
    events = [json.loads(line) for line in out.splitlines()]
    assert [(e["type"], e["seq"]) for e in events] == [("delta", 3), ("delta", 4), ("end", 5)]
    assert "".join(e.get("text", "") for e in events) == "three!"


async def test_tail_text_since_prints_a_stream_whose_start_it_never_saw() -> None:
    async with running() as (bus, sink):
        async with bus.stream(model="a") as w:
            for piece in ("one ", "two ", "three"):
                await w.delta(piece)
            argv = [STREAMBUS, "tail", sink.url, "--since", f"{w.stream}:2", "--max-streams", "1"]
            process = await anyio.open_process(argv, env=_env())
            await _until_subscribed(sink)
            await w.delta("!")
        code, out, err = await _finish(process)
    assert code == 0, err
    assert out == f"── {w.stream} ──\nthree!\n[{w.stream}: stop]\n"


async def test_tail_reconnects_and_resumes_without_repeating() -> None:
    async with running() as (bus, sink):
        process = await anyio.open_process([STREAMBUS, "tail", sink.url, "--max-streams", "1"], env=_env())
        await _until_subscribed(sink)
        async with bus.stream(model="m") as w:
            await w.delta("before ")
            for _ in range(1000):
                if sink.connections and sink.connections[0].sent >= 3:
                    break
                await anyio.sleep(0.01)
            sink.close_clients()
            await w.delta("during ")
            await _until_subscribed(sink)
            await w.delta("after")
        code, out, err = await _finish(process)
    assert code == 0, err
    assert out.endswith(f"before during after\n[{w.stream}: stop]\n")
    assert out.count("before") == 1
    assert "resuming" in err


async def test_tail_unauthorized_exits_with_a_message() -> None:
    async with running(token="s3cret") as (_bus, sink):
        process = await anyio.open_process([STREAMBUS, "tail", sink.url], env=_env())
        code, _out, err = await _finish(process)
        assert code == 1
        assert "unauthorized" in err and "Traceback" not in err
        env = {**_env(), "STREAMBUS_TOKEN": "s3cret"}
        process = await anyio.open_process([STREAMBUS, "tail", sink.url, "--max-streams", "1"], env=env)
        await _until_subscribed(sink)
        process.terminate()
        with anyio.fail_after(30):
            await process.wait()


def test_tail_is_a_streambus_command() -> None:
    result = subprocess.run([STREAMBUS, "tail", "--help"], capture_output=True, text=True, env=_env(), check=False)
    assert result.returncode == 0 and "--since" in result.stdout


@pytest.mark.parametrize(
    ("args", "problem"),
    [
        (["http://x"], "expected a ws:// or wss:// URL"),
        (["ws://127.0.0.1:1/ws", "--since", "nocolon"], "expected STREAM:SEQ"),
        (["ws://127.0.0.1:1/ws", "--meta", "novalue"], "expected KEY=VALUE"),
    ],
)
def test_tail_bad_arguments(args: list[str], problem: str) -> None:
    result = CliRunner().invoke(tail_command, args)
    assert result.exit_code == 2
    assert problem in result.output


def test_tail_cannot_connect_without_reconnect() -> None:
    with __import__("socket").socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    result = subprocess.run(
        [STREAMBUS, "tail", f"ws://127.0.0.1:{port}/ws", "--no-reconnect"],
        capture_output=True,
        text=True,
        env=_env(),
        check=False,
        timeout=30,
    )
    assert result.returncode == 1
    assert "cannot connect" in result.stderr and "Traceback" not in result.stderr


async def test_tail_resumes_more_streams_than_a_subscribe_may_name() -> None:
    """Past max_subscribe_streams the server refuses a since; the tail follows on and says what is lost."""
    async with running(max_subscribe_streams=1) as (bus, sink):
        process = await anyio.open_process([STREAMBUS, "tail", sink.url, "--max-streams", "2"], env=_env())
        await _until_subscribed(sink)
        async with bus.stream(model="m") as one, bus.stream(model="m") as two:
            await one.delta("one ")
            await two.delta("two ")
            for _ in range(1000):
                if sink.connections and sink.connections[0].sent >= 5:
                    break
                await anyio.sleep(0.01)
            sink.close_clients()
            for _ in range(1000):  # bounded: the tail's new connection has subscribed
                if any(c.subscriptions and c.close_code is None for c in sink.connections):
                    break
                await anyio.sleep(0.01)
            await one.delta("more")
            await two.delta("more")
        code, out, err = await _finish(process)
    assert code == 0, err
    assert "max_subscribe_streams (1)" in err
    assert out.count("more") == 2


async def test_tail_with_a_scoped_token_exits_when_its_filter_is_out_of_scope() -> None:
    secret = secrets.token_urlsafe(32)
    async with running(verifier=TokenVerifier(secret=secret)) as (bus, sink):
        env = {**_env(), "STREAMBUS_TOKEN": mint_token(secret, meta={"tenant": "a"})}
        process = await anyio.open_process([STREAMBUS, "tail", sink.url, "--meta", "tenant=b"], env=env)
        code, _out, err = await _finish(process)
        assert code == 1
        assert "refused: meta 'tenant': the value asked for is outside this token's scope" in err
        assert env["STREAMBUS_TOKEN"] not in err and "Traceback" not in err
        # Within scope, the same token follows its tenant's streams only.
        process = await anyio.open_process([STREAMBUS, "tail", sink.url, "--max-streams", "1"], env=env)
        await _until_subscribed(sink)
        async with bus.stream(model="m", meta={"tenant": "b"}) as w:
            await w.delta("for b")
        async with bus.stream(model="m", meta={"tenant": "a"}) as w:
            await w.delta("for a")
        code, out, _err = await _finish(process)
        assert code == 0
        assert "for a" in out and "for b" not in out
