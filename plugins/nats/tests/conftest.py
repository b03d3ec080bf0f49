from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import anyio
import pytest

from streambus import DeltaEvent, ErrorEvent, Event, Subscription, is_terminal


@pytest.fixture
def anyio_backend() -> str:
    """nats-py is asyncio-bound: the plugin runs on asyncio only."""
    return "asyncio"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class NatsServer:
    """A nats-server -js of the test's own on a free port, storing in its own directory."""

    def __init__(self, directory: Path, extra: list[str]) -> None:
        self.port = free_port()
        self.directory = directory
        self.extra = extra
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    def start(self) -> None:
        binary = shutil.which("nats-server")
        assert binary is not None
        self.starts += 1
        log = open(self.directory / f"nats-server-{self.starts}.log", "wb")  # noqa: SIM115 - handed to the child
        self.proc = subprocess.Popen(
            [binary, "-js", "-a", "127.0.0.1", "-p", str(self.port), "-sd", str(self.directory / "js"), *self.extra],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        log.close()
        deadline = time.monotonic() + 10
        while True:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as s:
                    if s.recv(4096).startswith(b"INFO"):
                        return
            except OSError:
                pass
            if time.monotonic() > deadline or self.proc.poll() is not None:
                raise RuntimeError(f"nats-server did not start on port {self.port}")
            time.sleep(0.02)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)
        self.proc = None

    def wipe(self) -> None:
        """Delete the server's storage (it must be stopped): it comes back without its data."""
        assert self.proc is None
        shutil.rmtree(self.directory / "js", ignore_errors=True)


@pytest.fixture
def nats_server(tmp_path: Path) -> Iterator[Callable[..., NatsServer]]:
    """Start a private nats-server; skipped with a reason when the binary is missing (never under CI=true)."""
    if shutil.which("nats-server") is None:
        reason = "nats-server is not on PATH (the NATS tests start their own server)"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(reason + " (CI=true: NATS tests must run)")
        pytest.skip(reason)
    servers: list[NatsServer] = []

    def make(*extra: str) -> NatsServer:
        directory = tmp_path / f"nats{len(servers)}"
        directory.mkdir()
        server = NatsServer(directory, list(extra))
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


def check_exactly_once(events: list[Event]) -> dict[str, list[int]]:
    """Assert no (stream, seq) twice and seqs increasing per stream; return seqs per stream."""
    per: dict[str, list[int]] = {}
    for e in events:
        per.setdefault(e.stream, []).append(e.seq)
    for stream, seqs in per.items():
        assert seqs == sorted(set(seqs)), f"stream {stream}: duplicates or disorder: {seqs}"
    return per


def account(produced: dict[str, str], events: list[Event]) -> dict[str, dict[str, int]]:
    """Per stream: characters lost without an error saying so, characters duplicated, terminal events.

    ``produced`` maps each stream to the text its producer published. A stream
    that ended in an ``error`` event may lack the text after it; any other
    missing character is *lost*.
    """
    text: dict[str, list[str]] = {}
    terminals: dict[str, int] = {}
    errored: set[str] = set()
    for e in events:
        if isinstance(e, DeltaEvent):
            text.setdefault(e.stream, []).append(e.text)
        elif is_terminal(e):
            terminals[e.stream] = terminals.get(e.stream, 0) + 1
            if isinstance(e, ErrorEvent):
                errored.add(e.stream)
    out: dict[str, dict[str, int]] = {}
    for stream, want in produced.items():
        got = "".join(text.get(stream, []))
        if got == want:
            lost = dup = 0
        elif want.startswith(got):
            lost = 0 if stream in errored else len(want) - len(got)
            dup = 0
        else:
            # Not a prefix: count the surplus as duplicated, the shortfall as lost.
            dup = max(0, len(got) - len(want)) or len(got)
            lost = len(want)
        out[stream] = {"lost": lost, "duplicated": dup, "terminals": terminals.get(stream, 0)}
    return out


@pytest.fixture
def make_collector() -> Callable[[], Collector]:
    """A factory of lossless collecting sinks."""
    return Collector


@pytest.fixture
def exactly_once() -> Callable[[list[Event]], dict[str, list[int]]]:
    """:func:`check_exactly_once`."""
    return check_exactly_once


@pytest.fixture
def count_chars() -> Callable[[dict[str, str], list[Event]], dict[str, dict[str, int]]]:
    """:func:`account`: characters lost and duplicated per stream."""
    return account
