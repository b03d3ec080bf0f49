from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest
import redis

from streambus import Event, Subscription, is_terminal

URL = os.environ.get("STREAMBUS_REDIS_URL", "redis://127.0.0.1:6379/0")


@pytest.fixture
def anyio_backend() -> str:
    """redis-py's asyncio client is asyncio-bound: the plugin runs on asyncio only."""
    return "asyncio"


@pytest.fixture(scope="session")
def redis_url() -> str:
    """The shared Redis; skipped only when unreachable and not on CI."""
    client = redis.Redis.from_url(URL, socket_connect_timeout=2)
    try:
        client.ping()
    except redis.RedisError as exc:
        reason = f"no Redis reachable at STREAMBUS_REDIS_URL={URL}: {exc}"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(reason + " (CI=true: Redis tests must run)")
        pytest.skip(reason)
    finally:
        client.close()
    return URL


@pytest.fixture
def key(redis_url: str) -> Iterator[str]:
    """A unique key prefix; every key under it is deleted afterwards."""
    prefix = f"test:streambus:{uuid.uuid4().hex[:12]}"
    yield prefix
    client = redis.Redis.from_url(redis_url)
    try:
        names = list(client.scan_iter(match=prefix + "*", count=1000))
        if names:
            client.delete(*names)
    finally:
        client.close()


@pytest.fixture
def sync_redis(redis_url: str) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(redis_url)
    yield client
    client.close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class PrivateRedis:
    """A redis-server of the test's own on a free port, so the shared one is never restarted."""

    def __init__(self, directory: Path, extra: list[str], tls_ca: str | None = None) -> None:
        self.port = free_port()
        self.directory = directory
        self.extra = extra
        self.tls_ca = tls_ca
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"{'rediss' if self.tls_ca else 'redis'}://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        binary = shutil.which("redis-server")
        assert binary is not None
        self.proc = subprocess.Popen(
            [
                *(binary, "--bind", "127.0.0.1"),
                *(("--port", "0", "--tls-port", str(self.port)) if self.tls_ca else ("--port", str(self.port))),
                *("--save", "", "--appendonly", "no", "--dir", str(self.directory)),
                *self.extra,
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        password = None
        if "--requirepass" in self.extra:
            password = self.extra[self.extra.index("--requirepass") + 1]
        while True:
            try:
                tls: dict[str, Any] = {"ssl": True, "ssl_ca_certs": self.tls_ca} if self.tls_ca else {}
                client = redis.Redis(
                    host="127.0.0.1", port=self.port, password=password, socket_connect_timeout=0.5, **tls
                )
                client.ping()
                client.close()
                return
            except redis.ConnectionError:
                if time.monotonic() > deadline or self.proc.poll() is not None:
                    raise RuntimeError(f"redis-server did not start on port {self.port}") from None
                time.sleep(0.02)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)
        self.proc = None


@pytest.fixture
def private_redis(tmp_path: Path) -> Iterator[Callable[..., PrivateRedis]]:
    if shutil.which("redis-server") is None:
        reason = "redis-server is not on PATH (fault tests start their own server)"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(reason)
        pytest.skip(reason)
    servers: list[PrivateRedis] = []

    def make(*extra: str, tls_ca: str | None = None, directory: Path | None = None) -> PrivateRedis:
        # Its own directory for a server whose data must survive a restart (dump.rdb lives there).
        server = PrivateRedis(directory or tmp_path, list(extra), tls_ca)
        servers.append(server)
        server.start()
        return server

    yield make
    for server in servers:
        server.stop()


class Collector:
    """A lossless sink that keeps what it reads and wakes waiters on a condition."""

    overflow = "block"

    def __init__(self) -> None:
        self.events: list[Event] = []
        self._waiters: list[tuple[Callable[[list[Event]], bool], anyio.Event]] = []

    async def run(self, events: Subscription) -> None:
        while batch := await events.receive_batch():
            self.events.extend(batch)
            for cond, ev in list(self._waiters):
                if cond(self.events):
                    ev.set()
                    self._waiters.remove((cond, ev))

    async def wait_for(self, cond: Callable[[list[Event]], bool], seconds: float = 10.0) -> None:
        if cond(self.events):
            return
        ev = anyio.Event()
        self._waiters.append((cond, ev))
        with anyio.fail_after(seconds):
            await ev.wait()

    async def wait_count(self, n: int, seconds: float = 10.0) -> None:
        await self.wait_for(lambda evs: len(evs) >= n, seconds)

    async def wait_terminals(self, n: int, seconds: float = 10.0) -> None:
        await self.wait_for(lambda evs: sum(map(is_terminal, evs)) >= n, seconds)


@pytest.fixture
def collector() -> Collector:
    return Collector()


@pytest.fixture
def make_collector() -> Callable[[], Collector]:
    return Collector


def check_exactly_once(events: list[Event]) -> dict[str, list[int]]:
    """Assert no (stream, seq) twice and seqs increasing per stream; return seqs per stream."""
    per: dict[str, list[int]] = {}
    for e in events:
        per.setdefault(e.stream, []).append(e.seq)
    for stream, seqs in per.items():
        assert seqs == sorted(set(seqs)), f"stream {stream}: duplicates or disorder: {seqs}"
    return per


@pytest.fixture
def exactly_once() -> Callable[[list[Event]], dict[str, list[int]]]:
    return check_exactly_once
