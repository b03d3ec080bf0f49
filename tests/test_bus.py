from __future__ import annotations

import asyncio
import itertools
import tracemalloc

import anyio
import anyio.lowlevel
import pytest
from anyio import wait_all_tasks_blocked

from streambus import (
    AbortEvent,
    Bus,
    BusClosed,
    DeltaEvent,
    EndEvent,
    ErrorEvent,
    Event,
    Filter,
    Overflowed,
    SinkFailed,
    StartEvent,
    StreamBusError,
    StreamClosed,
    StreamFailed,
    Subscription,
)

pytestmark = pytest.mark.anyio


async def collect(sub: Subscription) -> list[Event]:
    return [e async for e in sub]


async def test_writer_numbers_seq_and_ends_once() -> None:
    async with Bus() as bus:
        sub = bus.subscribe()
        async with bus.stream(model="m", provider="p", meta={"user": "u1"}) as w:
            await w.delta("Hel")
            await w.delta("lo")
        with pytest.raises(StreamClosed):
            await w.delta("late")
    events = await collect(sub)
    assert [type(e) for e in events] == [StartEvent, DeltaEvent, DeltaEvent, EndEvent]
    assert [e.seq for e in events] == [0, 1, 2, 3]
    assert {e.stream for e in events} == {w.stream}
    start = events[0]
    assert isinstance(start, StartEvent) and start.model == "m" and start.meta == {"user": "u1"}
    assert all(a.ts <= b.ts for a, b in itertools.pairwise(events))


async def test_exception_in_writer_becomes_error_event_and_propagates() -> None:
    async with Bus() as bus:
        sub = bus.subscribe()
        with pytest.raises(RuntimeError, match="boom"):
            async with bus.stream() as w:
                await w.delta("partial")
                raise RuntimeError("boom")
    events = await collect(sub)
    last = events[-1]
    assert isinstance(last, ErrorEvent) and last.kind == "exception" and "boom" in last.message
    assert sum(isinstance(e, EndEvent | ErrorEvent | AbortEvent) for e in events) == 1


async def test_abort_cancels_producer_and_publishes_abort() -> None:
    reached_end = False
    started = anyio.Event()

    async def producer(bus: Bus) -> None:
        nonlocal reached_end
        async with bus.stream(stream="s1") as w:
            await w.delta("a")
            started.set()
            await anyio.sleep_forever()
            reached_end = True

    async with Bus() as bus:
        sub = bus.subscribe()
        bus.start_soon(producer, bus)
        await started.wait()
        assert bus.abort("s1", reason="too long", by="client")
        assert not bus.abort("unknown")
    events = await collect(sub)
    last = events[-1]
    assert isinstance(last, AbortEvent) and last.reason == "too long" and last.by == "client"
    assert not reached_end
    assert not bus.abort("s1")


async def test_outside_cancellation_becomes_abort_and_propagates() -> None:
    async with Bus() as bus:
        sub = bus.subscribe()
        with anyio.move_on_after(0.01):
            async with bus.stream() as w:
                await w.delta("x")
                await anyio.sleep_forever()
    events = await collect(sub)
    assert isinstance(events[-1], AbortEvent) and events[-1].by == "cancelled"


async def test_leaving_bus_with_error_aborts_live_streams_by_shutdown() -> None:
    gate = anyio.Event()

    async def producer(bus: Bus) -> None:
        async with bus.stream() as w:
            await w.delta("x")
            gate.set()
            await anyio.sleep_forever()

    sub: Subscription | None = None
    with pytest.raises(ZeroDivisionError):
        async with Bus() as bus:
            sub = bus.subscribe()
            bus.start_soon(producer, bus)
            await gate.wait()
            1 / 0  # noqa: B018
    assert sub is not None
    events = await collect(sub)
    assert isinstance(events[-1], AbortEvent) and events[-1].by == "shutdown"


async def test_shutdown_aborts_and_drains() -> None:
    received: list[Event] = []

    class Slow:
        async def run(self, events: Subscription) -> None:
            async for e in events:
                await anyio.lowlevel.checkpoint()
                received.append(e)

    async def producer(bus: Bus) -> None:
        async with bus.stream() as w:
            for i in range(50):
                await w.delta(str(i))
            await anyio.sleep_forever()

    async with Bus() as bus:
        bus.add_sink(Slow(), overflow="block", buffer=4)
        bus.start_soon(producer, bus)
        await wait_all_tasks_blocked()
        await bus.shutdown()
    assert "".join(e.text for e in received if isinstance(e, DeltaEvent)) == "".join(map(str, range(50)))
    assert isinstance(received[-1], AbortEvent) and received[-1].by == "shutdown"


async def test_filters_by_model_provider_meta_and_stream() -> None:
    async with Bus() as bus:
        by_model = bus.subscribe(Filter.of(models="a"))
        by_meta = bus.subscribe(Filter.of(meta={"user": ["u1", "u2"]}))
        by_provider = bus.subscribe(Filter.of(providers="ollama"))
        async with bus.stream(model="a", provider="openai", meta={"user": "u1"}) as w1:
            await w1.delta("1")
        by_stream = bus.subscribe(Filter.of(streams="fixed"))
        async with bus.stream(model="b", provider="ollama", meta={"user": "u3"}, stream="fixed") as w2:
            await w2.delta("2")
    assert {e.stream for e in await collect(by_model)} == {w1.stream}
    assert {e.stream for e in await collect(by_meta)} == {w1.stream}
    assert {e.stream for e in await collect(by_provider)} == {w2.stream}
    assert {e.stream for e in await collect(by_stream)} == {"fixed"}


async def test_late_subscriber_matching_live_stream_gets_rest() -> None:
    async with Bus() as bus:
        async with bus.stream(model="a") as w:
            await w.delta("early")
            late = bus.subscribe(Filter.of(models="a"))
            await w.delta("late")
    events = await collect(late)
    assert [type(e) for e in events] == [DeltaEvent, EndEvent]


async def test_subscription_text_reads_one_stream() -> None:
    async with Bus() as bus:
        sub = bus.subscribe(Filter.of(streams="s"))

        async def produce() -> None:
            async with bus.stream(stream="s") as w:
                for piece in ["Hello", ", ", "world"]:
                    await w.delta(piece)
                    await w.delta("thinking", channel="reasoning")

        bus.start_soon(produce)
        pieces = [p async for p in sub.text()]
    assert "".join(pieces) == "Hello, world"


async def test_subscription_text_raises_on_error() -> None:
    async with Bus() as bus:
        sub = bus.subscribe()
        async with bus.stream() as w:
            await w.delta("a")
            await w.error("timeout", "no chunk in 5 s", retryable=True)
        got: list[str] = []
        with pytest.raises(StreamFailed, match="timeout|no chunk") as info:
            async for p in sub.text():
                got.append(p)
    assert got == ["a"]
    assert isinstance(info.value.event, ErrorEvent)


async def test_slow_subscriber_does_not_stall_others() -> None:
    seen: list[Event] = []

    class Fast:
        async def run(self, events: Subscription) -> None:
            async for e in events:
                seen.append(e)

    async with Bus(buffer=4) as bus:
        stalled = bus.subscribe(overflow="coalesce")  # never read while publishing
        bus.add_sink(Fast(), overflow="block")
        async with bus.stream() as w:
            for i in range(1000):
                await w.delta(f"{i},")
        await wait_all_tasks_blocked()
        assert len(seen) == 1002
        stalled_events = await stalled.receive_batch()
    text = "".join(e.text for e in stalled_events if isinstance(e, DeltaEvent))
    assert text == "".join(f"{i}," for i in range(1000))
    assert len(stalled_events) <= 6


async def test_block_policy_slows_publisher_and_loses_nothing() -> None:
    async with Bus() as bus:
        sub = bus.subscribe(overflow="block", buffer=2)
        progress = 0

        async def produce() -> None:
            nonlocal progress
            async with bus.stream() as w:
                for i in range(10):
                    await w.delta(str(i))
                    progress = i

        bus.start_soon(produce)
        await wait_all_tasks_blocked()
        assert progress < 3  # the publisher waits for the reader
        events = await collect_n(sub, 12)
    assert "".join(e.text for e in events if isinstance(e, DeltaEvent)) == "0123456789"


async def collect_n(sub: Subscription, n: int) -> list[Event]:
    out: list[Event] = []
    async for e in sub:
        out.append(e)
        if len(out) == n:
            break
    return out


async def test_coalesce_never_merges_control_events_or_channels() -> None:
    async with Bus() as bus:
        sub = bus.subscribe(overflow="coalesce", buffer=1)
        async with bus.stream(stream="a") as w:
            await w.delta("r1", channel="reasoning")
            await w.delta("r2", channel="reasoning")
            await w.delta("c1")
            await w.delta("c2")
        batch = await sub.receive_batch()
    kinds = [(type(e).__name__, getattr(e, "channel", None), getattr(e, "text", None)) for e in batch]
    assert kinds == [
        ("StartEvent", None, None),
        ("DeltaEvent", "reasoning", "r1r2"),
        ("DeltaEvent", "content", "c1c2"),
        ("EndEvent", None, None),
    ]
    merged = batch[1]
    assert isinstance(merged, DeltaEvent) and merged.n == 2 and merged.seq_range == (1, 2)


async def test_coalesce_disconnects_past_byte_cap() -> None:
    async with Bus() as bus:
        sub = bus.subscribe(overflow="coalesce", buffer=2, max_bytes=1000)
        async with bus.stream() as w:
            for _ in range(100):
                await w.delta("x" * 50)
        with pytest.raises(Overflowed, match="1000 bytes"):
            await sub.receive_batch()


async def test_drop_oldest_keeps_control_events_and_shows_gap() -> None:
    async with Bus() as bus:
        sub = bus.subscribe(overflow="drop_oldest", buffer=3)
        async with bus.stream() as w:
            for i in range(10):
                await w.delta(str(i))
        events = await sub.receive_batch()
    assert isinstance(events[0], StartEvent) and isinstance(events[-1], EndEvent)
    deltas = [e for e in events if isinstance(e, DeltaEvent)]
    # buffer 3 holds start + two items; the end event needed room too
    assert [d.text for d in deltas] == ["9"]
    assert sub.dropped == 9
    assert deltas[0].seq == 10  # the gap is visible through seq


async def test_disconnect_policy_closes_subscriber() -> None:
    async with Bus() as bus:
        sub = bus.subscribe(overflow="disconnect", buffer=2)
        other = bus.subscribe(overflow="block", buffer=100)
        async with bus.stream() as w:
            for i in range(5):
                await w.delta(str(i))
        with pytest.raises(Overflowed, match="disconnect"):
            await sub.receive_batch()
        assert len(await other.receive_batch()) == 7


async def test_sink_crash_is_restarted_without_losing_events() -> None:
    received: list[Event] = []
    runs = 0

    class Flaky:
        async def run(self, events: Subscription) -> None:
            nonlocal runs
            runs += 1
            async for e in events:
                if runs == 1 and isinstance(e, DeltaEvent) and e.text == "2":
                    raise ValueError("flaky")  # this event is lost with the crash, the rest is not
                received.append(e)

    async with Bus() as bus:
        bus.add_sink(Flaky(), overflow="block")
        async with bus.stream() as w:
            for i in range(5):
                await w.delta(str(i))
    assert runs == 2
    assert [e.text for e in received if isinstance(e, DeltaEvent)] == ["0", "1", "3", "4"]
    assert isinstance(received[-1], EndEvent)


async def test_critical_sink_failure_stops_bus() -> None:
    class Broken:
        async def run(self, events: Subscription) -> None:
            async for _ in events:
                raise OSError("disk full")

    with pytest.raises(SinkFailed, match="critical sink 'broken' failed") as info:
        async with Bus() as bus:
            bus.add_sink(Broken(), name="broken", critical=True)

            async def produce() -> None:
                async with bus.stream() as w:
                    while True:
                        await w.delta("x")
                        await anyio.sleep(0.001)

            bus.start_soon(produce)
            await bus.wait_stopped()
    assert isinstance(info.value.__cause__, OSError)


async def test_sink_setup_and_teardown_are_called() -> None:
    calls: list[str] = []

    class Lifecycle:
        async def setup(self, bus: Bus) -> None:
            calls.append("setup")

        async def run(self, events: Subscription) -> None:
            async for _ in events:
                calls.append("event")

        async def teardown(self) -> None:
            calls.append("teardown")

    async with Bus() as bus:
        bus.add_sink(Lifecycle(), overflow="block")
        async with bus.stream():
            pass
    assert calls == ["setup", "event", "event", "teardown"]


async def test_per_stream_order_with_interleaved_producers() -> None:
    policies = ("block", "coalesce", "coalesce")
    results: list[list[Event]] = [[] for _ in policies]

    class Reader:
        def __init__(self, i: int) -> None:
            self.i = i

        async def run(self, events: Subscription) -> None:
            async for e in events:
                results[self.i].append(e)
                if self.i == 0:
                    await anyio.lowlevel.checkpoint()

    async with Bus(buffer=8) as bus:
        for i, policy in enumerate(policies):
            bus.add_sink(Reader(i), overflow=policy)

        async def produce(n: int) -> None:
            async with bus.stream(stream=f"s{n}") as w:
                for k in range(200):
                    await w.delta(f"{n}:{k};")
                    if k % 7 == 0:
                        await anyio.lowlevel.checkpoint()

        for n in range(3):
            bus.start_soon(produce, n)
    for events in results:
        for n in range(3):
            mine = [e for e in events if e.stream == f"s{n}"]
            seqs = [e.seq for e in mine]
            assert seqs == sorted(seqs)
            assert "".join(e.text for e in mine if isinstance(e, DeltaEvent)) == "".join(
                f"{n}:{k};" for k in range(200)
            )


async def test_using_closed_bus_is_a_clear_error() -> None:
    bus = Bus()
    with pytest.raises(BusClosed, match="async with Bus"):
        bus.subscribe()
    async with bus:
        pass
    with pytest.raises(BusClosed):
        async with bus.stream():
            pass


async def test_duplicate_live_stream_id_rejected() -> None:
    async with Bus() as bus, bus.stream(stream="dup"):
        with pytest.raises(ValueError, match="already live"):
            async with bus.stream(stream="dup"):
                pass


class Upper:
    """A processing stage: republishes every event, deltas upper-cased."""

    interpose = True

    def __init__(self, bus: Bus) -> None:
        self.bus = bus

    async def run(self, events: Subscription) -> None:
        import msgspec

        async for e in events:
            if isinstance(e, DeltaEvent):
                e = msgspec.structs.replace(e, text=e.text.upper())
            await self.bus.publish(e, processed=True)


async def test_interposed_stage_separates_raw_and_processed() -> None:
    async with Bus() as bus:
        bus.add_sink(Upper(bus))
        raw = bus.subscribe(raw=True, overflow="block")
        moderated = bus.subscribe(overflow="block")
        async with bus.stream() as w:
            await w.delta("abc")
        await wait_all_tasks_blocked()
        raw_text = [e.text for e in await raw.receive_batch() if isinstance(e, DeltaEvent)]
        mod_text = [e.text for e in await moderated.receive_batch() if isinstance(e, DeltaEvent)]
    assert raw_text == ["abc"]
    assert mod_text == ["ABC"]


async def test_a_stage_interposed_mid_stream_processes_the_open_writers_next_deltas() -> None:
    async with Bus() as bus:
        reader = bus.subscribe(overflow="block")
        follower = bus.subscribe(Filter.of(streams="s1"), overflow="block")
        async with bus.stream(stream="s1") as w:
            await w.delta("a")
            before = bus.route("s1")
            bus.add_sink(Upper(bus))
            assert not before.current  # the writer asks the bus again on its next delta
            raw = bus.subscribe(Filter.of(streams="s1"), raw=True, overflow="block")
            await w.delta("b")
            assert bus.route("s1") is not before
            await wait_all_tasks_blocked()
        await wait_all_tasks_blocked()
        assert [e.text for e in await reader.receive_batch() if isinstance(e, DeltaEvent)] == ["a", "B"]
        assert [e.text for e in await follower.receive_batch() if isinstance(e, DeltaEvent)] == ["a", "B"]
        assert [e.text for e in await raw.receive_batch() if isinstance(e, DeltaEvent)] == ["b"]


async def test_idle_means_the_reader_handled_everything_it_took() -> None:
    handled: list[Event] = []
    release = anyio.Event()

    class Slow:
        async def run(self, events: Subscription) -> None:
            async for e in events:
                await release.wait()
                handled.append(e)

    async with Bus() as bus:
        sub = bus.add_sink(Slow(), overflow="block")
        assert sub in bus.subscriptions
        await wait_all_tasks_blocked()
        assert sub.idle  # parked, nothing published yet
        async with bus.stream() as w:
            await w.delta("x")
        await wait_all_tasks_blocked()
        assert not sub.idle  # took the start event, still working on it
        release.set()
        await wait_all_tasks_blocked()
        assert sub.idle
        assert len(handled) == 3


async def test_cancelling_one_parked_reader_leaves_the_others_parked() -> None:
    # Parked readers share one wake-up signal per log; cancelling one must not wake or cancel the rest.
    got: list[list[str]] = [[], [], []]
    async with Bus() as bus:
        subs = [bus.subscribe() for _ in got]

        async def read(i: int) -> None:
            async for event in subs[i]:
                if isinstance(event, DeltaEvent):
                    got[i].append(event.text)

        async with anyio.create_task_group() as tg:
            scopes = []
            for i in range(len(got)):
                scope = anyio.CancelScope()
                scopes.append(scope)

                async def run(i: int = i, scope: anyio.CancelScope = scope) -> None:
                    with scope:
                        await read(i)

                tg.start_soon(run)
            await wait_all_tasks_blocked()
            scopes[1].cancel()
            await wait_all_tasks_blocked()
            async with bus.stream(model="m") as w:
                await w.delta("a")
                await wait_all_tasks_blocked()
                await w.delta("b")
            for sub in subs:
                sub.close()
    assert got == [["a", "b"], [], ["a", "b"]]


async def test_a_second_processing_stage_is_refused_and_the_first_keeps_working() -> None:
    async with Bus() as bus:
        bus.add_sink(Upper(bus), name="upper")
        with pytest.raises(StreamBusError, match=r"already has a processing stage; 'second' would be a second"):
            bus.add_sink(Upper(bus), name="second")
        sub = bus.subscribe()
        async with bus.stream(model="m") as w:
            await w.delta("ab")
        text = "".join([chunk async for chunk in sub.text()])
    assert text == "AB"


async def test_reader_reattaching_while_a_publisher_waits_keeps_order() -> None:
    # A detached reader can re-attach while a publisher that counted it as detached waits
    # for a full `block` subscriber; that publisher's event then reaches it through its
    # own buffer, and must still come before what the shared log got meanwhile.
    got: list[Event] = []
    with anyio.fail_after(10):
        async with Bus(buffer=4) as bus:
            slow = bus.subscribe(overflow="block", name="slow")
            reader = bus.subscribe(overflow="coalesce", name="reader")

            def delta(seq: int) -> DeltaEvent:
                return DeltaEvent(stream="s", seq=seq, ts=0.0, text=f"{seq};")

            async def read() -> None:
                async for event in reader:
                    got.append(event)

            async with anyio.create_task_group() as tg:
                await bus.publish(StartEvent(stream="s", seq=0, ts=0.0))
                for seq in range(1, 4):
                    await bus.publish(delta(seq))
                # `slow` falls 5 behind: this publish waits for it, and `reader` is detached.
                tg.start_soon(bus.publish, delta(4))
                await wait_all_tasks_blocked()
                await slow.receive()
                await wait_all_tasks_blocked()

                async def write_on() -> None:
                    # Like a stream writer: the next delta right after the previous publish returns.
                    await bus.publish(delta(5))
                    await bus.publish(delta(6))

                # `reader` is private: publishing delta 5 counts it so, then waits for `slow`...
                tg.start_soon(write_on)
                await wait_all_tasks_blocked()
                # ... while `reader` drains its buffer, re-attaches, reads another stream's
                # start from the shared log and parks there.
                tg.start_soon(read)
                await wait_all_tasks_blocked()
                tg.start_soon(bus.publish, StartEvent(stream="x", seq=0, ts=0.0))
                await wait_all_tasks_blocked()
                # Delta 5 then goes to `reader`'s buffer, and delta 6 to the shared log, before
                # `reader` runs again: it must read 5 first.
                for _ in range(6):
                    await slow.receive()
                await wait_all_tasks_blocked()
                reader.close()
    mine = [e for e in got if e.stream == "s"]
    assert [e.seq for e in mine] == sorted(e.seq for e in mine)
    assert "".join(e.text for e in mine if isinstance(e, DeltaEvent)) == "1;2;3;4;5;6;"


async def test_closing_a_parked_reader_ends_its_iteration() -> None:
    # Unfiltered readers park together on the shared log's wake-up, filtered ones on their own:
    # closing any subscription must wake its reader, and only end that one.
    ended: list[str] = []
    async with Bus() as bus:
        subs = {"a": bus.subscribe(), "b": bus.subscribe(), "s": bus.subscribe(Filter.of(streams="s"))}

        async def read(name: str) -> None:
            async for _ in subs[name]:
                pass
            ended.append(name)

        async with anyio.create_task_group() as tg:
            for name in subs:
                tg.start_soon(read, name)
            await wait_all_tasks_blocked()
            subs["a"].close()
            await wait_all_tasks_blocked()
            assert ended == ["a"]
            subs["s"].close()
            await wait_all_tasks_blocked()
            assert ended == ["a", "s"]
            assert subs["b"].idle
            subs["b"].close()
    assert ended == ["a", "s", "b"]


async def test_a_standalone_subscription_applies_its_policy_to_what_it_is_offered() -> None:
    sub = Subscription(overflow="block", buffer=2, name="standalone")
    start = StartEvent(stream="s", seq=0, ts=0.0)
    deltas = [DeltaEvent(stream="s", seq=i, ts=0.0, text=str(i)) for i in (1, 2, 3)]
    assert sub.offer(start) is None
    assert sub.offer(deltas[0]) is None
    wait = sub.offer(deltas[1])  # full: a `block` subscription makes the publisher wait
    assert wait is not None
    done = anyio.Event()

    async def publisher() -> None:
        assert wait is not None
        await wait
        done.set()

    async with anyio.create_task_group() as tg:
        tg.start_soon(publisher)
        await wait_all_tasks_blocked()
        assert not done.is_set() and sub.pending == 2
        assert await sub.receive() == start
        await done.wait()
    assert sub.pending == 2
    sub.close()
    assert sub.offer(deltas[2]) is None  # closed: refused, nothing buffered
    assert [e.seq async for e in sub] == [1, 2]


async def test_bad_subscription_settings_are_named() -> None:
    with pytest.raises(ValueError, match="buffer must be at least 1, got 0"):
        Subscription(buffer=0)
    with pytest.raises(ValueError, match="unknown overflow policy 'lossy'; expected one of block, coalesce"):
        Subscription(overflow="lossy")
    async with Bus() as bus:
        sub = bus.subscribe()
        async with bus.stream(stream="s") as w:
            await w.delta("kept")
        with pytest.raises(ValueError, match="limit must be at least 1, got 0"):
            await sub.receive_batch(limit=0)
        # the bad call lost nothing
        assert [type(e) for e in await sub.receive_batch()] == [StartEvent, DeltaEvent, EndEvent]


async def test_a_subscriber_follows_only_the_streams_its_filter_matched_at_their_start() -> None:
    async with Bus() as bus:
        by_meta = bus.subscribe(Filter.of(meta={"user": "u1"}))
        by_id = bus.subscribe(Filter.of(streams=["a", "b"], models="m1"))
        firehose = bus.subscribe()
        async with bus.stream(stream="a", model="m1", meta={"user": "u1"}) as a:
            async with bus.stream(stream="b", model="m2", meta={"user": "u2"}) as b:
                late = bus.subscribe(Filter.of(meta={"user": "u2"}))  # joins a live stream
                await a.delta("a1")
                await b.delta("b1")
                by_meta.close()
                await a.delta("a2")  # by_meta closed: not offered any more
    assert [(e.stream, e.seq) async for e in by_meta] == [("a", 0), ("a", 1)]
    assert {e.stream async for e in by_id} == {"a"}
    assert [(e.stream, type(e)) async for e in late] == [("b", DeltaEvent), ("b", EndEvent)]
    assert len([e async for e in firehose]) == 7
    assert bus.live_streams == {}


async def test_a_writer_not_entered_cannot_be_aborted() -> None:
    async with Bus() as bus:
        writer = bus.stream(stream="s")
        assert not writer.request_abort("no", "client")
        assert not bus.abort("s")


async def test_bus_offer_delivers_at_once_and_returns_a_wait_only_for_full_block_subscribers() -> None:
    async with Bus() as bus:
        first = bus.subscribe(Filter.of(streams="s"), overflow="block", buffer=1)
        second = bus.subscribe(overflow="block", buffer=1)
        free = bus.subscribe(Filter.of(streams="s"), overflow="coalesce", buffer=1)
        await bus.publish(StartEvent(stream="s", seq=0, ts=0.0))  # fills both `block` buffers
        delta = DeltaEvent(stream="s", seq=1, ts=0.0, text="x")
        wait = bus.offer(delta)
        assert wait is not None
        assert free.pending == 2  # the others got it at once
        done = anyio.Event()

        async def publisher() -> None:
            assert wait is not None
            await wait
            done.set()

        async with anyio.create_task_group() as tg:
            tg.start_soon(publisher)
            await wait_all_tasks_blocked()
            assert not done.is_set()
            assert isinstance(await first.receive(), StartEvent)
            assert isinstance(await second.receive(), StartEvent)
            await done.wait()
        assert await first.receive() == delta
        assert await second.receive() == delta
        assert bus.offer(DeltaEvent(stream="s", seq=2, ts=0.0, text="y")) is None  # room everywhere now
        assert (first.pending, second.pending) == (1, 1)


async def test_a_cancelled_writer_waits_for_a_full_block_subscriber_to_deliver_its_abort() -> None:
    # Leaving the block offers the terminal event; only when a full ``block``
    # subscriber makes it wait does the writer shield that wait from the cancellation.
    async with Bus() as bus:
        sub = bus.subscribe(Filter.of(streams="s"), overflow="block", buffer=2)
        left = anyio.Event()

        async def produce() -> None:
            with anyio.CancelScope() as scope:
                async with bus.stream(stream="s") as w:
                    await w.delta("a")  # start and "a" fill the buffer
                    scope.cancel()
                    await anyio.sleep_forever()
            left.set()

        bus.start_soon(produce)
        await wait_all_tasks_blocked()
        assert not left.is_set()  # the abort waits for room, shielded from the cancellation
        events = await collect_n(sub, 3)
        await left.wait()
    assert [type(e) for e in events] == [StartEvent, DeltaEvent, AbortEvent]
    assert isinstance(events[-1], AbortEvent) and events[-1].by == "cancelled"


async def test_readers_of_the_shared_log_never_look_blocked_while_their_wake_up_is_pending() -> None:
    # The firehose releases its first parked reader at once and the others one
    # loop turn later; wait_all_tasks_blocked must still see all of them get the events.
    async with Bus() as bus:
        subs = [bus.subscribe() for _ in range(5)]
        got: list[list[str]] = [[] for _ in subs]
        release = anyio.Event()

        async def read(i: int) -> None:
            async for event in subs[i]:
                if isinstance(event, DeltaEvent):
                    got[i].append(event.text)

        async def produce() -> None:
            async with bus.stream() as w:
                await w.delta("a")
                await release.wait()
                await w.delta("b")

        async with anyio.create_task_group() as tg:
            for i in range(len(subs)):
                tg.start_soon(read, i)
            await wait_all_tasks_blocked()
            bus.start_soon(produce)
            await wait_all_tasks_blocked()
            assert got == [["a"]] * len(subs)
            release.set()
            await wait_all_tasks_blocked()
            assert got == [["a", "b"]] * len(subs)
            for sub in subs:
                sub.close()


async def test_a_reader_with_a_big_buffer_that_keeps_up_does_not_keep_the_shared_log_alive() -> None:
    # Sinks subscribe with tens of thousands of events of buffer (stats, otel). The log is trimmed
    # at its lag checks; were those a quarter of such a buffer apart, every event a reader had
    # long read would stay alive until the next one (16,000 events of 1 kB here: 19 MB).
    count = 16_000
    async with Bus() as bus:
        sub = bus.subscribe(buffer=65_536, overflow="block")
        read = anyio.Event()

        async def reader() -> None:
            seen = 0
            async for event in sub:
                if isinstance(event, DeltaEvent):
                    seen += 1
                    if seen == count:
                        read.set()

        bus.start_soon(reader)
        tracemalloc.start()
        try:
            before = tracemalloc.get_traced_memory()[0]
            async with bus.stream() as w:
                for i in range(count):
                    await w.delta(f"{i:06d}" + "x" * 1_000)
                    await anyio.lowlevel.checkpoint()
                await read.wait()
                held = tracemalloc.get_traced_memory()[0] - before
        finally:
            tracemalloc.stop()
        sub.close()
    assert held < 1_000_000, f"{held:,} bytes still held after the reader read all {count:,} events"


@pytest.mark.parametrize("anyio_backend", ["asyncio"])  # the relay is asyncio's; trio releases all at once
@pytest.mark.parametrize(("readers", "after_two_turns"), [(10, 10), (13, 2)])
async def test_a_few_parked_readers_are_released_within_two_loop_turns_many_in_relay(
    readers: int, after_two_turns: int
) -> None:
    # With up to 12 readers on the log the relay has one step: the first reader at once, the others
    # a turn later. With more it has three (one reader per turn for two turns, then the rest), so
    # that a producer yielding after every token hands most of them several tokens per wake-up.
    async with Bus() as bus:
        subs = [bus.subscribe() for _ in range(readers)]
        got = [0] * readers

        async def read(i: int) -> None:
            async for event in subs[i]:
                if isinstance(event, DeltaEvent):
                    got[i] += 1

        async with anyio.create_task_group() as tg:
            for i in range(readers):
                tg.start_soon(read, i)
            async with bus.stream() as w:
                await wait_all_tasks_blocked()
                await w.delta("a")
                await asyncio.sleep(0)
                await asyncio.sleep(0)
                assert sum(got) == after_two_turns
                await wait_all_tasks_blocked()
                assert got == [1] * readers
            for sub in subs:
                sub.close()


async def test_a_cancelled_first_parked_reader_does_not_hold_up_the_others() -> None:
    # The relay releases the first parked reader that is still waiting; one
    # cancelled while parked (its future done) is skipped, not chosen.
    got: list[list[str]] = [[], [], []]
    async with Bus() as bus:
        subs = [bus.subscribe() for _ in got]

        async def read(i: int) -> None:
            async for event in subs[i]:
                if isinstance(event, DeltaEvent):
                    got[i].append(event.text)

        async with anyio.create_task_group() as tg:
            scopes = [anyio.CancelScope() for _ in got]
            for i, scope in enumerate(scopes):

                async def run(i: int = i, scope: anyio.CancelScope = scope) -> None:
                    with scope:
                        await read(i)

                tg.start_soon(run)
                await wait_all_tasks_blocked()  # parked in this order
            scopes[0].cancel()
            await wait_all_tasks_blocked()
            async with bus.stream(model="m") as w:
                await w.delta("a")
                await wait_all_tasks_blocked()
                assert got == [[], ["a"], ["a"]]
                await w.delta("b")
            await wait_all_tasks_blocked()
            for sub in subs:
                sub.close()
    assert got == [[], ["a", "b"], ["a", "b"]]


async def test_receive_batch_lingers_for_a_fuller_batch_until_its_limit() -> None:
    async with Bus() as bus:
        sub = bus.subscribe()
        async with bus.stream(stream="s") as w:
            await w.delta("a")
            events: list[Event] = []

            async def read() -> None:
                events.extend(await sub.receive_batch(4, linger=3600))

            with anyio.fail_after(30):  # a guard: the limit, not the hour, ends the wait
                async with anyio.create_task_group() as tg:
                    tg.start_soon(read)
                    await wait_all_tasks_blocked()
                    assert events == []  # the start and one delta are in: it lingers for more
                    await w.delta("b")
                    await w.delta("c")
                    await w.delta("d")
        assert [type(e).__name__ for e in events] == ["StartEvent", "DeltaEvent", "DeltaEvent", "DeltaEvent"]
        rest = await sub.receive_batch(10)
        assert [e.text for e in rest if isinstance(e, DeltaEvent)] == ["d"] and isinstance(rest[-1], EndEvent)


async def test_a_close_ends_the_linger_with_what_arrived_and_the_next_read_ends() -> None:
    async with Bus() as bus:
        sub = bus.subscribe()
        async with bus.stream(stream="s") as w:
            await w.delta("a")
        with anyio.fail_after(30):
            async with anyio.create_task_group() as tg:
                got: list[Event] = []

                async def read() -> None:
                    got.extend(await sub.receive_batch(linger=3600))

                tg.start_soon(read)
                await wait_all_tasks_blocked()
                sub.close()
        assert [type(e).__name__ for e in got] == ["StartEvent", "DeltaEvent", "EndEvent"]
        assert await sub.receive_batch(linger=1) == []


async def test_a_cancelled_linger_loses_nothing() -> None:
    async with Bus() as bus:
        sub = bus.subscribe()
        async with bus.stream(stream="s") as w:
            await w.delta("a")
            with anyio.CancelScope() as scope:
                async with anyio.create_task_group() as tg:

                    async def read() -> None:
                        await sub.receive_batch(10, linger=3600)

                    tg.start_soon(read)
                    await wait_all_tasks_blocked()
                    scope.cancel()
            # the batch being gathered was never returned: later reads still get every event, in order
            await w.delta("b")
        events: list[Event] = []
        while not events or not isinstance(events[-1], EndEvent):
            events += await sub.receive_batch()
        assert [type(e).__name__ for e in events] == ["StartEvent", "DeltaEvent", "DeltaEvent", "EndEvent"]
        assert [e.text for e in events if isinstance(e, DeltaEvent)] == ["a", "b"]


@pytest.mark.parametrize("linger", [-1.0, float("nan"), float("inf")])
async def test_receive_batch_refuses_a_linger_that_is_not_a_finite_wait(linger: float) -> None:
    async with Bus() as bus:
        sub = bus.subscribe()
        async with bus.stream(stream="s") as w:
            await w.delta("a")
        with pytest.raises(ValueError, match="linger must be a finite number of seconds"):
            await sub.receive_batch(linger=linger)
        assert len(await sub.receive_batch()) == 3  # nothing was taken by the refused call


async def test_unfiltered_readers_parking_between_lag_checks_get_each_event_at_once() -> None:
    # An offer to the shared log skips everything but the append until its length reaches a
    # mark (the next lag check, far away with a big buffer); a reader that parks must bring
    # that mark down, so the very next event releases it, one event at a time, for each reader.
    async with Bus(buffer=4096) as bus:
        readers = [bus.subscribe(), bus.subscribe(), bus.subscribe(Filter.of(streams="s"))]
        seen: list[list[str]] = [[] for _ in readers]

        async def read(i: int) -> None:
            async for event in readers[i]:
                if isinstance(event, DeltaEvent):
                    seen[i].append(event.text)

        async with anyio.create_task_group() as tg:
            for i in range(len(readers)):
                tg.start_soon(read, i)
            async with bus.stream(stream="s") as w:
                for n in range(50):
                    await wait_all_tasks_blocked()  # every reader read everything and parked
                    await w.delta(str(n))
                    await wait_all_tasks_blocked()
                    assert [texts[-1:] for texts in seen] == [[str(n)]] * len(readers), n
            for sub in readers:
                sub.close()
    assert seen == [[str(n) for n in range(50)]] * len(readers)


async def test_a_reader_that_always_finds_events_waiting_lets_other_tasks_run() -> None:
    # Reading never waits while events are buffered, so every 256 items a reader must yield
    # by itself: from the shared log (unfiltered) and from its own buffer (filtered) alike.
    ticks = 0

    async def tick() -> None:
        nonlocal ticks
        while True:
            ticks += 1
            await anyio.lowlevel.checkpoint()

    async with Bus(buffer=4096) as bus:
        readers = {"shared log": bus.subscribe(), "own buffer": bus.subscribe(Filter.of(streams="s"))}
        async with bus.stream(stream="s") as w:
            for _ in range(2000):
                await w.delta("x")
        async with anyio.create_task_group() as tg:
            tg.start_soon(tick)
            for where, sub in readers.items():
                await anyio.lowlevel.checkpoint()
                before, read = ticks, 0
                async for _ in sub:
                    read += 1
                    if read == 2002:  # start, 2,000 deltas, end
                        break
                assert ticks - before >= 2002 // 256 - 1, where
            tg.cancel_scope.cancel()
