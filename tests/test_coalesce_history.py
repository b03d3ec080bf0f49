"""The core's coalescer and resumable per-stream history (``streambus.coalesce``, ``streambus.history``)."""

from __future__ import annotations

import math

import anyio
import pytest

from streambus import DeltaEvent, EndEvent, Event, StartEvent, decode, encode
from streambus.coalesce import Coalescer, MergedDelta
from streambus.history import StreamHistory


def _delta(seq: int, text: str, stream: str = "s", channel: str = "content", first: int | None = None) -> DeltaEvent:
    return DeltaEvent(stream=stream, seq=seq, ts=float(seq), text=text, channel=channel, first_seq=first)  # type: ignore[arg-type]


def _drain(queue: Coalescer[bytes]) -> list[object]:
    out: list[object] = []
    while queue:
        item = queue.popleft()
        if isinstance(item, MergedDelta):
            out.append(item.payload if item.payload is not None else item.event())
        else:
            out.append(item)
    return out


# -- Coalescer ---------------------------------------------------------------------------


def test_deltas_merge_only_when_asked_and_keep_every_character() -> None:
    queue: Coalescer[bytes] = Coalescer()
    queue.add_delta(_delta(1, "a"), b"1", merge=False)
    assert queue.add_delta(_delta(2, "b"), b"2", merge=True) is None  # a new merge point
    merged = queue.add_delta(_delta(3, "c"), b"3", merge=True)
    assert merged is not None and merged.merged == 1 and merged.payload is None
    queue.add_delta(_delta(4, "d"), b"4", merge=True)
    assert len(queue) == 2
    first, rest = _drain(queue)
    assert first == b"1"
    assert rest == DeltaEvent(stream="s", seq=4, ts=4.0, text="bcd", n=3, first_seq=2)


def test_an_unmerged_merge_point_keeps_its_payload() -> None:
    queue: Coalescer[bytes] = Coalescer()
    queue.add_delta(_delta(1, "a"), b"encoded once", merge=True)
    item = queue.popleft()
    assert isinstance(item, MergedDelta) and item.payload == b"encoded once"
    assert item.event() == _delta(1, "a")  # no first_seq for a single delta


def test_merging_never_reorders_a_stream_or_crosses_channels() -> None:
    queue: Coalescer[bytes] = Coalescer()
    queue.add_delta(_delta(1, "a"), b"1", merge=True)
    queue.append(b"control", "s")  # a barrier for stream s
    queue.add_delta(_delta(2, "b"), b"2", merge=True)
    queue.add_delta(_delta(3, "x", channel="reasoning"), b"3", merge=True)
    queue.add_delta(_delta(4, "c"), b"4", merge=True)  # the stream's newest item is reasoning: no merge
    queue.add_delta(_delta(1, "other", stream="t"), b"t1", merge=True)
    queue.add_delta(_delta(2, "!", stream="t"), b"t2", merge=True)  # another stream merges independently
    assert _drain(queue) == [
        b"1",
        b"control",
        b"2",
        b"3",
        b"4",
        DeltaEvent(stream="t", seq=2, ts=2.0, text="other!", n=2, first_seq=1),
    ]


def test_extend_resets_merge_points_and_clear_empties() -> None:
    queue: Coalescer[bytes] = Coalescer()
    queue.add_delta(_delta(1, "a"), b"1", merge=True)
    queue.extend([b"replayed"])
    assert queue.add_delta(_delta(2, "b"), b"2", merge=True) is None  # nothing merges past the replay
    queue.clear()
    assert not queue and len(queue) == 0
    with pytest.raises(IndexError):
        queue.popleft()


# -- StreamHistory ---------------------------------------------------------------------------


def _record(history: StreamHistory[bytes], *events: object) -> None:
    for event in events:
        history.record(event, encode(event))  # type: ignore[arg-type]


def test_missed_is_all_or_nothing() -> None:
    history = StreamHistory(events_per_stream=4, ttl=10, max_streams=2, clock=lambda: 0.0)
    _record(history, StartEvent(stream="s", seq=0, ts=0.0), _delta(1, "a"), _delta(3, "bc", first=2))
    assert [decode(d).seq for d in history.missed("s", 0) or []] == [1, 3]
    assert history.missed("s", 3) == []
    assert history.missed("s", 2) is None  # inside a coalesced delta: cannot be split
    assert history.missed("s", 9) is None and history.missed("unknown", 0) is None


@pytest.mark.parametrize("limit", [3, 8, 40])
@pytest.mark.parametrize("bytes_per_stream", [None, 120])
def test_missed_size_measures_what_missed_returns(limit: int, bytes_per_stream: int | None) -> None:
    history = StreamHistory(limit, 10, 4, lambda: 0.0, bytes_per_stream=bytes_per_stream)
    events: list[Event] = [StartEvent(stream="s", seq=0, ts=0.0)]
    events += [_delta(seq, "x" * seq) for seq in range(1, 7)]
    events += [_delta(8, "yz", first=7), EndEvent(stream="s", seq=9, ts=9.0)]
    for event in events:
        _record(history, event)
        for last in range(-2, event.seq + 2):
            missed = history.missed("s", last)
            expected = None if missed is None else (len(missed), sum(map(len, missed)))
            assert history.missed_size("s", last) == expected, (event.seq, last)
    assert history.missed_size("unknown", -1) is None
    # Payloads that are not bytes count no bytes; their number still counts.
    objects: StreamHistory[object] = StreamHistory(4, 10, 4, lambda: 0.0, snapshots=False)
    for event in events[:3]:
        objects.record(event, event)
    assert objects.missed_size("s", -1) == (3, 0)


def test_live_streams_leave_when_they_end_are_evicted_or_refilled() -> None:
    history = StreamHistory(10, 10, 3, lambda: 0.0)
    for name in ("a", "b", "c"):
        _record(history, StartEvent(stream=name, seq=0, ts=0.0))
    _record(history, EndEvent(stream="b", seq=1, ts=1.0))
    assert [log.start.stream for log in history.live() if log.start] == ["a", "c"]
    _record(history, StartEvent(stream="d", seq=0, ts=0.0))  # past max_streams: the ended "b" goes first
    _record(history, StartEvent(stream="e", seq=0, ts=0.0))  # then the oldest live one, "a"
    assert history.get("a") is None and history.get("b") is None
    assert [log.start.stream for log in history.live() if log.start] == ["c", "d", "e"]
    history.fill([StartEvent(stream="c", seq=0, ts=0.0), _delta(1, "x", stream="c")])  # re-held: now the newest
    assert [log.start.stream for log in history.live() if log.start] == ["d", "e", "c"]


def test_byte_bound_drops_the_oldest_events() -> None:
    start = StartEvent(stream="s", seq=0, ts=0.0)
    history = StreamHistory(
        events_per_stream=100, ttl=10, max_streams=2, clock=lambda: 0.0, bytes_per_stream=len(encode(start)) + 10
    )
    _record(history, start)
    assert history.replay_all("s") is not None
    _record(history, _delta(1, "x" * 40))
    log = history.get("s")
    assert log is not None and len(log.entries) == 1 and log.bytes == len(encode(_delta(1, "x" * 40)))
    assert history.replay_all("s") is None and history.missed("s", 0) is not None


def test_snapshot_is_the_text_so_far_as_one_delta_per_channel() -> None:
    history = StreamHistory(events_per_stream=2, ttl=10, max_streams=4, clock=lambda: 0.0)
    _record(
        history,
        StartEvent(stream="s", seq=0, ts=0.0),
        _delta(1, "think", channel="reasoning"),
        _delta(2, "Hel"),
        _delta(3, "lo"),
    )
    frames = history.snapshot("s") or []
    events = [decode(f) for f in frames]
    assert events[0] == StartEvent(stream="s", seq=0, ts=0.0)
    assert events[1] == _delta(1, "think", channel="reasoning")
    assert events[2] == DeltaEvent(stream="s", seq=3, ts=3.0, text="Hello", n=2, first_seq=2)
    _record(history, EndEvent(stream="s", seq=4, ts=4.0))
    assert history.snapshot("s") is None  # ended: recovered from its events instead


def test_recently_ended_and_ttl() -> None:
    now = [0.0]
    history = StreamHistory(events_per_stream=10, ttl=5, max_streams=10, clock=lambda: now[0])
    for stream in ("a", "b", "c"):
        _record(history, StartEvent(stream=stream, seq=0, ts=0.0), EndEvent(stream=stream, seq=1, ts=0.0))
    ended = history.recently_ended(2, lambda start: True)
    assert [decode(whole[0]).stream for whole in ended] == ["b", "c"]  # the newest, in the order they ended
    now[0] = 5.0
    history.expire()
    assert len(history) == 0 and history.recently_ended(5, lambda start: True) == []


def test_any_payload_with_max_ended_and_lookups() -> None:
    # The http hub's use: each event with its position in a global log, ended streams bounded by count.
    history: StreamHistory[tuple[int, Event]] = StreamHistory(
        events_per_stream=3, ttl=math.inf, max_streams=None, clock=lambda: 0.0, max_ended=2, snapshots=False
    )
    position = 0
    for stream in ("a", "b", "c"):
        for event in (
            StartEvent(stream=stream, seq=0, ts=0.0),
            _delta(1, "x", stream),
            EndEvent(stream=stream, seq=2, ts=0.0),
        ):
            history.record(event, (position, event))
            position += 1
    assert [log.start.stream for log in history.logs() if log.start] == ["b", "c"]  # a ended first: forgotten
    assert history.get("a") is None
    assert history.find("b", 1) == (4, _delta(1, "x", "b"))
    assert history.find("b", 7) is None and history.find("zz", 0) is None
    assert history.snapshot("c") is None  # type: ignore[misc]  # no text is kept without snapshots
    live = StartEvent(stream="d", seq=0, ts=0.0)
    history.record(live, (position, live))
    for seq in range(1, 5):
        history.record(_delta(seq, "y", "d"), (position + seq, _delta(seq, "y", "d")))
    log = history.get("d")
    assert log is not None and log.dropped == 2 and [seq for _, seq, _ in log.entries] == [2, 3, 4]
    assert log.bytes == 0  # only bytes payloads are counted
    assert history.missed("d", 0) is None and history.missed("d", 1) == [
        (position + s, _delta(s, "y", "d")) for s in (2, 3, 4)
    ]
    assert [log.start.stream for log in history.live() if log.start] == ["d"]


def test_dropped_counts_what_the_bounds_dropped() -> None:
    history = StreamHistory(events_per_stream=2, ttl=10, max_streams=2, clock=lambda: 0.0)
    _record(history, StartEvent(stream="s", seq=0, ts=0.0), _delta(1, "a"))
    log = history.get("s")
    assert log is not None and log.dropped == 0
    _record(history, _delta(2, "b"))
    assert log.dropped == 1 and not log.complete


@pytest.mark.parametrize(
    ("kwargs", "named"),
    [
        ({"max_ended": -1}, "max_ended"),
        ({"events_per_stream": -1}, "events_per_stream"),
        ({"max_streams": 0}, "max_streams"),
        ({"ttl": -1.0}, "ttl"),
        ({"bytes_per_stream": 0}, "bytes_per_stream"),
    ],
)
def test_bad_bounds_are_refused_by_name(kwargs: dict[str, float], named: str) -> None:
    args: dict[str, object] = {"events_per_stream": 1, "ttl": 1.0, "max_streams": 1, "clock": lambda: 0.0}
    args.update(kwargs)
    with pytest.raises(ValueError, match=named):
        StreamHistory(**args)  # type: ignore[call-overload]


@pytest.mark.anyio
async def test_ttl_on_the_event_loop_clock() -> None:
    # The sinks pass anyio.current_time: the same history on asyncio and trio.
    history = StreamHistory(events_per_stream=4, ttl=0.0, max_streams=4, clock=anyio.current_time)
    _record(history, StartEvent(stream="s", seq=0, ts=0.0), EndEvent(stream="s", seq=1, ts=0.0))
    history.expire()
    assert history.get("s") is None


# -- batches: record_deltas, add_many, encode_each ---------------------------------------


def _state(history: StreamHistory[bytes], stream: str = "s") -> tuple[object, ...]:
    log = history.get(stream)
    assert log is not None
    return (list(log.entries), log.bytes, log.dropped, log.last_seq, log.ended, history.snapshot(stream))


@pytest.mark.parametrize("limit", [3, 5, 40])
@pytest.mark.parametrize("bytes_per_stream", [None, 200])
def test_record_deltas_is_recording_them_one_by_one(limit: int, bytes_per_stream: int | None) -> None:
    def history() -> StreamHistory[bytes]:
        return StreamHistory(limit, 10, 4, lambda: 0.0, bytes_per_stream=bytes_per_stream)

    one, many = history(), history()
    start = StartEvent(stream="s", seq=0, ts=0.0)
    for h in (one, many):
        h.record(start, encode(start))
    # Runs of different lengths, two channels, a coalesced delta (first_seq), past the event bound.
    runs = [
        [_delta(1, "a"), _delta(2, "bb")],
        [_delta(3, "think", channel="reasoning")],
        [_delta(4, "c"), _delta(6, "dd", first=5), _delta(7, "e", channel="reasoning"), _delta(8, "f")],
    ]
    for run in runs:
        for event in run:
            one.record(event, encode(event))
        many.record_deltas(run, [encode(e) for e in run])
        assert _state(many) == _state(one)
    for last in range(-1, 9):
        assert many.missed("s", last) == one.missed("s", last)
    texts = [decode(f) for f in many.snapshot("s") or []]
    assert texts[1:] == [  # one merged delta per channel, in the order of their last seq
        DeltaEvent(stream="s", seq=7, ts=7.0, text="thinke", n=2, first_seq=3, channel="reasoning"),
        DeltaEvent(stream="s", seq=8, ts=8.0, text="abbcddf", n=5, first_seq=1),
    ]


def test_record_deltas_takes_a_new_stream_and_many_folds() -> None:
    one: StreamHistory[bytes] = StreamHistory(2000, 10, 4, lambda: 0.0)
    many: StreamHistory[bytes] = StreamHistory(2000, 10, 4, lambda: 0.0)
    deltas = [_delta(i, f"<{i}>") for i in range(1, 1001)]  # several folds of the snapshot text
    for event in deltas:
        one.record(event, encode(event))
    for at in range(0, 1000, 300):
        many.record_deltas(deltas[at : at + 300], [encode(e) for e in deltas[at : at + 300]])
    start = StartEvent(stream="s", seq=0, ts=0.0)
    for h in (one, many):
        log = h.get("s")
        assert log is not None
        log.start, log.start_data = start, encode(start)
    assert _state(many) == _state(one)
    snap = many.snapshot("s") or []
    assert decode(snap[1]) == DeltaEvent(
        stream="s", seq=1000, ts=1000.0, text="".join(f"<{i}>" for i in range(1, 1001)), n=1000, first_seq=1
    )


def test_record_deltas_refuses_a_mismatch_by_name() -> None:
    history: StreamHistory[bytes] = StreamHistory(10, 10, 4, lambda: 0.0)
    with pytest.raises(ValueError, match="as many payloads as deltas"):
        history.record_deltas([_delta(1, "a")], [])
    with pytest.raises(ValueError, match="at least one"):
        history.record_deltas([], [])


def test_record_deltas_keeps_any_payload_without_snapshots() -> None:
    history: StreamHistory[tuple[int, Event]] = StreamHistory(3, math.inf, None, lambda: 0.0, snapshots=False)
    deltas = [_delta(i, "x") for i in range(1, 6)]
    history.record(deltas[0], (0, deltas[0]))
    history.record_deltas(deltas[1:], [(i, e) for i, e in enumerate(deltas[1:], 1)])
    log = history.get("s")
    assert log is not None and log.bytes == 0 and log.dropped == 2 and log.last_seq == 5
    assert history.missed("s", 2) == [(2, deltas[2]), (3, deltas[3]), (4, deltas[4])]


def test_add_many_is_add_one_by_one() -> None:
    deltas = [_delta(2, "b"), _delta(4, "cd", first=3), _delta(5, "")]
    one, many = MergedDelta(_delta(1, "a"), b"p"), MergedDelta(_delta(1, "a"), b"p")
    for d in deltas:
        one.add(d)
    many.add_many(deltas)
    many.add_many([])
    assert many.event() == one.event() == DeltaEvent(stream="s", seq=5, ts=5.0, text="abcd", n=4, first_seq=1)
    assert (many.merged, many.size, many.payload) == (one.merged, one.size, None)


def test_encode_each_is_encode_per_event() -> None:
    from streambus import encode_each

    events: list[Event] = [StartEvent(stream="s", seq=0, ts=0.0), _delta(1, "é\n"), EndEvent(stream="s", seq=2, ts=2.0)]
    assert encode_each(events) == [encode(e) for e in events]
    assert encode_each(iter(events)) == [encode(e) for e in events]
    assert encode_each([]) == []
