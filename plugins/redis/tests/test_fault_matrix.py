"""Issue 18's fault matrix: nothing is lost in silence, whatever happens to Redis and the consumer.

Each case has its own redis-server and its own consumer process (``proc.py
consume``: ``start = "last"``, ``seed_recording``, recorder), fed by a redis
sink in this process. Four waves of paced streams make every kind of
discontinuity happen: streams open before the fault that end while the
consumer is away (their tail and ``end`` are in entries it never reads when
Redis comes back empty), streams open across the whole fault, streams that
start while the consumer is away (first seen in their middle) and streams
that start after Redis is back. The fault: the consumer is killed
(``SIGKILL``, then restarted), stopped (``SIGSTOP``/``SIGCONT``) or left alive,
and Redis is shut down with or without saving its data, for 3 s or 15 s.

Per stream, the characters the recorder lacks without an ``error`` event
saying so must be zero, every stream must end exactly once, and a Redis
that kept its data must cost nothing at all. The six cases of one outage
length run concurrently; the sleeps below *are* the faults' timing (how long
the consumer is away, how long Redis is down), nothing waits on them.
"""

from __future__ import annotations

import signal
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import pytest
import redis
from streambus_redis import RedisSink

from streambus import Bus, DeltaEvent, EndEvent, ErrorEvent, is_terminal
from streambus.recording import read_recording

# Under `make test` (pytest-xdist, --dist loadgroup) the tests that take servers down run on one
# worker, one at a time: two outages at once on two cores stretch each other's timing.
pytestmark = [pytest.mark.anyio, pytest.mark.xdist_group("outages")]

PROC = str(Path(__file__).with_name("proc.py"))
PACE = 0.05  # seconds between two deltas of one stream
WAVES = {"ends_while_away": 3, "spans_the_fault": 3, "starts_while_away": 3, "starts_after": 3}
STREAMS = sum(WAVES.values())


@dataclass
class Case:
    consumer: str  # killed | stopped | alive
    persist: bool
    outage: float
    directory: Path
    produced: dict[str, str] = field(default_factory=dict)
    wave: dict[str, str] = field(default_factory=dict)
    returncode: int | None = None

    @property
    def name(self) -> str:
        return f"consumer {self.consumer}, Redis {'saved' if self.persist else 'lost'} its data, {self.outage:g} s"


def _spawn(case: Case, url: str) -> subprocess.Popen[bytes]:
    log = open(case.directory / "consumer.log", "ab")  # noqa: SIM115 - handed to the child
    out = str(case.directory / "rec.jsonl")
    proc = subprocess.Popen(
        [sys.executable, PROC, "consume", url, "k", "rec", out, str(STREAMS)], stdout=subprocess.PIPE, stderr=log
    )
    log.close()
    assert proc.stdout is not None
    line = proc.stdout.readline().strip()
    if line != b"ready":
        proc.kill()
        proc.communicate()
        raise AssertionError(f"{case.name}: the consumer did not start: {line!r}")
    return proc


def _lines(path: Path) -> int:
    try:
        return path.read_bytes().count(b"\n")
    except FileNotFoundError:
        return 0


def _shutdown(server: Any, save: bool) -> None:
    client = redis.Redis(host="127.0.0.1", port=server.port)
    try:
        client.shutdown(save=save, nosave=not save)
    except redis.ConnectionError:
        pass  # the server closed the connection as it exited
    finally:
        client.close()
    assert server.proc is not None
    server.proc.wait(10)
    server.proc = None


async def _run(case: Case, private_redis: Any) -> None:
    server = await anyio.to_thread.run_sync(lambda: private_redis(directory=case.directory))
    consumer = await anyio.to_thread.run_sync(_spawn, case, server.url)
    away = anyio.Event()  # the consumer was hit (or, alive, the moment it would have been)
    half_away = anyio.Event()
    back = anyio.Event()  # Redis is back
    done = anyio.Event()
    try:
        async with Bus() as producer:
            producer.add_sink(RedisSink(url=server.url, stream="k", batch_max_ms=1, entry_max_events=16))

            async def stream(wave: str, i: int, begin: anyio.Event | None, finish: anyio.Event) -> None:
                if begin is not None:
                    await begin.wait()
                text = []
                async with producer.stream(model="m", meta={"wave": wave, "i": i}) as w:
                    case.wave[w.stream] = wave
                    # At least one delta, however late this stream got going: on a loaded host its
                    # start can be held past `finish` (the sink, backing off after the outage, holds
                    # the bus), and a stream with no text would test nothing of its wave.
                    j = 0
                    while True:
                        piece = f"{wave[:4]}{i}.{j} "
                        text.append(piece)
                        case.produced[w.stream] = "".join(text)
                        await w.delta(piece)
                        j += 1
                        if finish.is_set():
                            break
                        await anyio.sleep(PACE)

            plan = {
                "ends_while_away": (None, half_away),
                "spans_the_fault": (None, done),
                "starts_while_away": (away, done),
                "starts_after": (back, done),
            }
            async with anyio.create_task_group() as tg:
                for wave, count in WAVES.items():
                    for i in range(count):
                        tg.start_soon(stream, wave, i, *plan[wave])
                with anyio.fail_after(30):
                    while _lines(case.directory / "rec.jsonl") < 60:  # noqa: ASYNC110 - another process's file
                        await anyio.sleep(0.05)
                if case.consumer == "killed":
                    consumer.send_signal(signal.SIGKILL)
                    await anyio.to_thread.run_sync(consumer.communicate)
                elif case.consumer == "stopped":
                    consumer.send_signal(signal.SIGSTOP)
                away.set()
                await anyio.sleep(0.5)  # written while the consumer is away
                half_away.set()
                await anyio.sleep(0.5)
                await anyio.to_thread.run_sync(_shutdown, server, case.persist)
                await anyio.sleep(case.outage)
                await anyio.to_thread.run_sync(server.start)
                back.set()
                if case.consumer == "killed":
                    consumer = await anyio.to_thread.run_sync(_spawn, case, server.url)
                elif case.consumer == "stopped":
                    consumer.send_signal(signal.SIGCONT)
                await anyio.sleep(1.0)  # written after Redis came back
                done.set()
        # The consumer exits once every stream has ended; one that never ends is what this test hunts.
        try:
            await anyio.to_thread.run_sync(lambda: consumer.communicate(timeout=45))
        except subprocess.TimeoutExpired:
            consumer.kill()
            consumer.communicate()
        case.returncode = consumer.returncode
    finally:
        if consumer.poll() is None:
            consumer.kill()
            consumer.communicate()


def _problems(case: Case) -> list[str]:
    """Everything wrong with the case's recording; the silent losses first."""
    recording = read_recording(case.directory / "rec.jsonl", lenient=True)
    per: dict[str, list[Any]] = {}
    for event in recording.events:
        per.setdefault(event.stream, []).append(event)
    problems = []
    silent = {}
    gaps = 0
    for stream, produced in case.produced.items():
        events = per.get(stream, [])
        seqs = [e.seq for e in events]
        if seqs != sorted(set(seqs)):
            problems.append(f"{stream} ({case.wave[stream]}): duplicates or disorder {seqs}")
        text = "".join(e.text for e in events if isinstance(e, DeltaEvent))
        ends = [e for e in events if is_terminal(e)]
        end = ends[-1] if ends else None
        if len(ends) != 1 or events[-1] is not end:
            problems.append(f"{stream} ({case.wave[stream]}): {len(ends)} terminal events, or not last")
        if isinstance(end, ErrorEvent) and end.kind == "redis_gap":
            gaps += 1
            if not produced.startswith(text):
                problems.append(f"{stream}: text delivered before its redis_gap error is not what was produced")
            if f"{end.seq}" not in end.message:
                problems.append(f"{stream}: the redis_gap error does not name the missing seqs: {end.message}")
        elif not (isinstance(end, EndEvent) and text == produced):
            silent[f"{stream} ({case.wave[stream]})"] = len(produced) - len(text)
    if silent:
        problems.insert(0, f"characters lost without an error event, per stream: {silent}")
    log = (case.directory / "consumer.log").read_text(errors="replace")
    if case.persist and gaps:
        problems.append(f"Redis kept its data, yet {gaps} streams ended with redis_gap")
    if not case.persist and "redis.gap" not in log:
        problems.append("Redis lost its data, yet the consumer logged no redis.gap")
    if case.returncode != 0:
        problems.append(f"the consumer did not finish by itself (exit code {case.returncode})")
    return problems


@pytest.mark.parametrize("outage", [pytest.param(3.0, id="3s"), pytest.param(15.0, id="15s", marks=pytest.mark.slow)])
async def test_fault_matrix_loses_no_character_in_silence(private_redis: Any, tmp_path: Path, outage: float) -> None:
    cases = []
    for consumer in ("killed", "stopped", "alive"):
        for persist in (False, True):
            directory = tmp_path / f"{consumer}-{'save' if persist else 'nosave'}"
            directory.mkdir()
            cases.append(Case(consumer, persist, outage, directory))
    with anyio.fail_after(outage + 100):
        async with anyio.create_task_group() as tg:
            for case in cases:
                tg.start_soon(_run, case, private_redis)
    report = {case.name: problems for case in cases if (problems := _problems(case))}
    assert not report, "\n".join(f"{name}:\n  " + "\n  ".join(p) for name, p in report.items())
    for case in cases:
        assert len(case.produced) == STREAMS
