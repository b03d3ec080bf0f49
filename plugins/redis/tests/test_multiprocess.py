"""Two producer processes and two consumer processes through the shared Redis."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

from streambus import DeltaEvent, EndEvent, StartEvent
from streambus.recording import read_recording

PROC = str(Path(__file__).with_name("proc.py"))


def test_two_producers_two_consumers_every_event_once_in_order(
    redis_url: str, key: str, tmp_path: Path, exactly_once: Any
) -> None:
    streams, deltas = 15, 40
    outs = [tmp_path / "c1.jsonl", tmp_path / "c2.jsonl"]
    consumers = [
        subprocess.Popen(
            [sys.executable, PROC, "consume", redis_url, key, f"{key}-c{i}", str(out), str(2 * streams)],
            stdout=subprocess.PIPE,
        )
        for i, out in enumerate(outs)
    ]
    producers: list[subprocess.Popen[bytes]] = []
    try:
        for proc in consumers:
            assert proc.stdout is not None and proc.stdout.readline().strip() == b"ready"
        producers = [
            subprocess.Popen([sys.executable, PROC, "produce", redis_url, key, str(streams), str(deltas)])
            for _ in range(2)
        ]
        for proc in producers:
            assert proc.wait(30) == 0
        stats = [proc.communicate(timeout=30)[0].decode() for proc in consumers]
        assert [proc.returncode for proc in consumers] == [0, 0]
    finally:
        for proc in [*consumers, *producers]:
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
    for out, stat in zip(outs, stats, strict=True):
        recording = read_recording(out)
        assert not recording.problems
        per = exactly_once(recording.events)
        assert len(per) == 2 * streams
        assert all(seqs == list(range(deltas + 2)) for seqs in per.values())
        for stream in per:
            events = [e for e in recording.events if e.stream == stream]
            assert isinstance(events[0], StartEvent) and isinstance(events[-1], EndEvent)
            i = events[0].meta["i"]
            assert "".join(e.text for e in events if isinstance(e, DeltaEvent)) == "".join(
                f"{i}.{j} " for j in range(deltas)
            )
        assert "gaps=0" in stat
