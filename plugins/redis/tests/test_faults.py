"""Faults, against a redis-server each test starts itself (the shared one is never restarted)."""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import anyio
import pytest
import redis
from streambus_redis import RedisSink, RedisSource
from structlog.testing import capture_logs

from streambus import Bus, DeltaEvent, ErrorEvent, SinkFailed, Usage
from streambus.recording import read_recording

# Under `make test` (pytest-xdist, --dist loadgroup) the tests that take servers down run on one
# worker, one at a time: two outages at once on two cores stretch each other's timing.
pytestmark = [pytest.mark.anyio, pytest.mark.xdist_group("outages")]

PROC = str(Path(__file__).with_name("proc.py"))


def source(url: str, key: str, **kw: Any) -> RedisSource:
    kw.setdefault("consumer", "c1")
    kw.setdefault("block_ms", 100)
    kw.setdefault("commit_interval_ms", 10)
    return RedisSource(url=url, stream=key, **kw)


async def test_redis_restart_mid_stream_reconnects_and_loses_nothing(
    private_redis: Any, collector: Any, exactly_once: Any
) -> None:
    server = private_redis()
    with anyio.fail_after(30):  # no hang
        async with Bus() as consumer, Bus() as producer:
            consumer.add_sink(collector)
            src = source(server.url, "k", start="0")
            consumer.start_producer(src)
            sink = RedisSink(url=server.url, stream="k", batch_max_ms=0)
            producer.add_sink(sink)
            async with producer.stream(model="m") as w:
                for i in range(5):
                    await w.delta(f"a{i}")
                await collector.wait_count(6)
                server.stop()
                # Written while Redis is down: held by the sink, retried with backoff.
                for i in range(5):
                    await w.delta(f"b{i}")
                await anyio.wait_all_tasks_blocked()
                server.start()
                await w.end("stop", usage=Usage(completion_tokens=10))
            await collector.wait_terminals(1, 20)
            src.stop()
    per = exactly_once(collector.events)
    assert per[w.stream] == list(range(12))
    text = "".join(e.text for e in collector.events if isinstance(e, DeltaEvent))
    assert text == "".join(f"a{i}" for i in range(5)) + "".join(f"b{i}" for i in range(5))
    assert src.reconnects >= 1
    # Redis came back empty: the lost key is reported, but this stream's next event proved it lost nothing.
    assert [gap.how.split(",")[0] for gap in src.gaps] == ["the key was lost and recreated"]


def _lines(path: Path) -> int:
    try:
        return path.read_bytes().count(b"\n")
    except FileNotFoundError:
        return 0


def _spawn(*args: str) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen([sys.executable, PROC, *args], stdout=subprocess.PIPE)
    assert proc.stdout is not None
    line = proc.stdout.readline().strip()
    if line != b"ready":
        proc.kill()
        proc.communicate()
        raise AssertionError(f"{args[0]} process did not start: {line!r}")
    return proc


async def test_consumer_killed_and_restarted_resumes_exactly_once(
    private_redis: Any, tmp_path: Path, exactly_once: Any
) -> None:
    server = private_redis()
    out = tmp_path / "rec.jsonl"
    streams, deltas = 20, 30
    consumer = _spawn("consume", server.url, "k", "rec", str(out), str(streams))
    try:
        async with Bus() as producer:
            producer.add_sink(RedisSink(url=server.url, stream="k", batch_max_ms=1, entry_max_events=8))

            async def write() -> None:
                for i in range(streams):
                    async with producer.stream(model="m", meta={"i": i}) as w:
                        for j in range(deltas):
                            await w.delta(f"{i}.{j} ")
                            await anyio.sleep(0.0005)

            producer.start_soon(write)
            # Kill it once it recorded something, while the producer keeps writing.
            with anyio.fail_after(20):
                while _lines(out) < 100:  # noqa: ASYNC110 - another process's file
                    await anyio.sleep(0.01)
            consumer.send_signal(signal.SIGKILL)
            consumer.communicate(timeout=10)
            killed_at = _lines(out)
            consumer = _spawn("consume", server.url, "k", "rec", str(out), str(streams))
        stdout, _ = await anyio.to_thread.run_sync(lambda: consumer.communicate(timeout=30))
        assert consumer.returncode == 0
    finally:
        if consumer.poll() is None:
            consumer.kill()
            consumer.communicate()
    recording = read_recording(out)
    assert not recording.problems
    per = exactly_once(recording.events)
    assert len(per) == streams
    assert all(seqs == list(range(deltas + 2)) for seqs in per.values())
    # Killed mid-way (the header is one of the lines) ...
    assert killed_at >= 100 and killed_at - 1 < len(recording.events)
    # ... and the restarted process resumed from its saved position, not from the start.
    stats = dict(item.split("=") for item in stdout.decode().split()[1:])
    assert int(stats["delivered"]) == len(recording.events) - (killed_at - 1)
    assert int(stats["duplicates"]) < killed_at - 1 and stats["gaps"] == "0"


async def test_trimming_gap_is_an_explicit_error(private_redis: Any, make_collector: Any, exactly_once: Any) -> None:
    server = private_redis()
    before, after = make_collector(), make_collector()
    async with Bus() as producer:
        producer.add_sink(RedisSink(url=server.url, stream="k", maxlen=10, entry_max_events=1, batch_max_events=1))
        async with producer.stream(model="m") as live:
            await live.delta("x")
            await live.delta("y")
            async with Bus() as consumer:
                consumer.add_sink(before)
                src = source(server.url, "k", start="last", consumer="rec")
                consumer.start_producer(src)
                await before.wait_count(3)
                src.stop()
            # The consumer is away while far more than maxlen entries are written.
            for i in range(400):
                await live.delta(f"z{i}")
        async with producer.stream(model="m") as fresh:
            await fresh.delta("kept")
    with capture_logs() as logs:
        async with Bus() as consumer:
            consumer.add_sink(after)
            src = source(server.url, "k", start="last", consumer="rec")
            consumer.start_producer(src)
            await after.wait_terminals(2)
            src.stop()
    assert [e.seq for e in before.events] == [0, 1, 2]
    # The stream that lost events ends with an explicit error at the first missing seq, then nothing of it.
    lost = [e for e in after.events if e.stream == live.stream]
    assert len(lost) == 1 and isinstance(lost[0], ErrorEvent)
    assert lost[0].kind == "redis_gap" and lost[0].seq == 3 and not lost[0].retryable
    # The stream written after the gap arrives whole.
    assert [e.seq for e in after.events if e.stream == fresh.stream] == [0, 1, 2]
    assert src.gaps and src.gaps[0].key == "k" and src.gaps[0].until
    assert any(entry["event"] == "redis.gap" and entry["log_level"] == "error" for entry in logs)
    exactly_once(before.events + after.events)


async def test_password_from_environment(private_redis: Any, collector: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    server = private_redis("--requirepass", "s3cret")
    monkeypatch.setenv("STREAMBUS_REDIS_PASSWORD", "s3cret")
    async with Bus() as consumer:
        consumer.add_sink(collector)
        src = source(server.url, "k", start="0")
        consumer.start_producer(src)
        async with Bus() as producer:
            producer.add_sink(RedisSink(url=server.url, stream="k"))
            async with producer.stream(model="m") as w:
                await w.delta("hi")
        await collector.wait_terminals(1)
        src.stop()
    assert [e.stream for e in collector.events] == [w.stream] * 3
    monkeypatch.setenv("STREAMBUS_REDIS_PASSWORD", "wrong")
    with capture_logs() as logs, pytest.raises(SinkFailed) as info:
        async with Bus() as producer:
            producer.add_sink(RedisSink(url=server.url, stream="k"), critical=True)
            async with producer.stream(model="m") as w:
                await w.delta("hi")
    assert "AuthenticationError" in type(info.value.__cause__).__name__ or "invalid" in str(info.value.__cause__)
    assert any(entry["event"] == "redis.sink_auth_failed" for entry in logs)


def _certificates(directory: Path) -> tuple[str, str, str]:
    """A throwaway CA and a server certificate for 127.0.0.1, made with the openssl CLI."""
    ca_key, ca, key, csr, cert = (str(directory / n) for n in ("ca.key", "ca.pem", "s.key", "s.csr", "s.pem"))
    ext = directory / "ext.cnf"
    ext.write_text("subjectAltName=IP:127.0.0.1\n")
    for command in (
        [
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            ca_key,
            "-out",
            ca,
            "-days",
            "1",
            "-subj",
            "/CN=t",
        ],
        ["req", "-newkey", "rsa:2048", "-nodes", "-keyout", key, "-out", csr, "-subj", "/CN=127.0.0.1"],
        [
            "x509",
            "-req",
            "-in",
            csr,
            "-CA",
            ca,
            "-CAkey",
            ca_key,
            "-CAcreateserial",
            "-out",
            cert,
            "-days",
            "1",
            "-extfile",
            str(ext),
        ],
    ):
        subprocess.run(["openssl", *command], check=True, capture_output=True)
    return ca, cert, key


async def test_tls_with_the_ca_from_the_environment(
    private_redis: Any, tmp_path: Path, collector: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    if shutil.which("openssl") is None:
        pytest.skip("the openssl CLI is needed to make test certificates")
    ca, cert, key = await anyio.to_thread.run_sync(_certificates, tmp_path)
    tls = ("--tls-cert-file", cert, "--tls-key-file", key, "--tls-ca-cert-file", ca, "--tls-auth-clients", "no")
    server = private_redis(*tls, tls_ca=ca)
    assert server.url.startswith("rediss://")
    monkeypatch.setenv("STREAMBUS_REDIS_TLS_CA_FILE", ca)
    async with Bus() as consumer:
        consumer.add_sink(collector)
        src = source(server.url, "k", start="0")
        consumer.start_producer(src)
        async with Bus() as producer:
            producer.add_sink(RedisSink(url=server.url, stream="k"))
            async with producer.stream(model="m") as w:
                await w.delta("over TLS")
        await collector.wait_terminals(1)
        src.stop()
    assert [e.seq for e in collector.events] == [0, 1, 2]
    assert collector.events[1].text == "over TLS"


async def test_group_recreated_after_redis_restart(private_redis: Any, collector: Any, exactly_once: Any) -> None:
    server = private_redis()
    with anyio.fail_after(30):
        async with Bus() as consumer, Bus() as producer:
            consumer.add_sink(collector)
            src = source(server.url, "k", group="g", consumer="r1", start="0")
            consumer.start_producer(src)
            await src.wait_ready()
            producer.add_sink(RedisSink(url=server.url, stream="k", batch_max_ms=0))
            async with producer.stream(model="m") as w:
                await w.delta("before")
                await collector.wait_count(2)
                # Restarted without persistence: the stream and its group are gone.
                server.stop()
                server.start()
                await w.delta("after")
                await collector.wait_count(3)
                # Deleted while the consumer is connected: its next read finds no group.
                with capture_logs() as logs:
                    client = redis.Redis.from_url(server.url)
                    client.delete("k")
                    client.close()
                    await w.delta("deleted")
                    await collector.wait_count(4)
            await collector.wait_terminals(1, 20)
            src.stop()
    per = exactly_once(collector.events)
    assert per[w.stream] == [0, 1, 2, 3, 4]
    assert src.reconnects >= 1
    assert any(entry["event"] == "redis.group_missing" for entry in logs)


async def test_sink_connects_before_the_first_event_and_waits_for_a_late_redis(
    private_redis: Any, collector: Any, exactly_once: Any
) -> None:
    server = private_redis()
    server.stop()
    with anyio.fail_after(30):  # no hang
        async with Bus() as producer:
            sink = RedisSink(url=server.url, stream="k", batch_max_ms=0)
            producer.add_sink(sink)
            with capture_logs() as logs:
                # Redis is down: the sink is not ready, and keeps retrying.
                with anyio.move_on_after(0.3) as waited:
                    await sink.wait_ready()
                assert waited.cancelled_caught
                assert any(entry["event"] == "redis.sink_retry" for entry in logs)
                async with producer.stream(model="m") as w:
                    await w.delta("held")  # accepted while Redis is down; nothing lost
                    server.start()
                    await sink.wait_ready()
                    await w.delta("after")
            async with Bus() as consumer:
                consumer.add_sink(collector)
                src = source(server.url, "k", start="0")
                consumer.start_producer(src)
                await collector.wait_terminals(1, 20)
                src.stop()
    per = exactly_once(collector.events)
    assert per[w.stream] == [0, 1, 2, 3]
    assert [e.text for e in collector.events if isinstance(e, DeltaEvent)] == ["held", "after"]
