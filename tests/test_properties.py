"""Property tests: the codec round-trips, and coalescing never loses or reorders text."""

from __future__ import annotations

import anyio
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from streambus import (
    AbortEvent,
    Bus,
    DecodeError,
    DeltaEvent,
    EndEvent,
    ErrorEvent,
    Event,
    Filter,
    ModerationEvent,
    StartEvent,
    StreamWriter,
    Usage,
    decode,
    encode,
)

ids = st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789-_", min_size=1, max_size=12)
texts = st.text(max_size=20)  # any Unicode, including surrogates-free astral characters
floats = st.floats(allow_nan=False, allow_infinity=False, width=64)
seqs = st.integers(min_value=0, max_value=2**53 - 1)  # the largest integer every JSON reader holds exactly
json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**53), 2**53) | st.text(max_size=8),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=5), children, max_size=3),
    max_leaves=6,
)

events = st.one_of(
    st.builds(
        StartEvent,
        stream=ids,
        seq=seqs,
        ts=floats,
        model=texts,
        provider=texts,
        meta=st.dictionaries(st.text(max_size=6), json_values, max_size=3),
    ),
    st.builds(
        DeltaEvent,
        stream=ids,
        seq=seqs,
        ts=floats,
        text=texts,
        channel=st.sampled_from(["content", "reasoning", "tool"]),
        n=st.integers(1, 1000),
        first_seq=st.none() | seqs,
    ),
    st.builds(
        EndEvent,
        stream=ids,
        seq=seqs,
        ts=floats,
        reason=texts,
        usage=st.none()
        | st.builds(
            Usage,
            prompt_tokens=st.none() | st.integers(0, 10**6),
            completion_tokens=st.none() | st.integers(0, 10**6),
            total_tokens=st.none() | st.integers(0, 10**6),
            source=st.sampled_from(["provider", "counted"]),
        ),
        timings=st.dictionaries(st.text(max_size=8), floats, max_size=3),
    ),
    st.builds(ErrorEvent, stream=ids, seq=seqs, ts=floats, kind=texts, message=texts, retryable=st.booleans()),
    st.builds(AbortEvent, stream=ids, seq=seqs, ts=floats, reason=texts, by=texts),
    st.builds(
        ModerationEvent,
        stream=ids,
        seq=seqs,
        ts=floats,
        verdict=texts,
        categories=st.lists(texts, max_size=3),
        action=st.sampled_from(["flag", "redact", "retract", "abort"]),
        start=st.integers(0, 10**6),
        end=st.integers(0, 10**6),
    ),
)


@given(events)
def test_codec_round_trip(event: Event) -> None:
    assert decode(encode(event)) == event


@given(events)
def test_events_are_not_tracked_by_the_cyclic_gc(event: Event) -> None:
    # Neither built nor decoded events (nor their usage) add to the collector's work.
    import gc

    for e in (event, decode(encode(event))):
        assert not gc.is_tracked(e)
        usage = getattr(e, "usage", None)
        assert usage is None or not gc.is_tracked(usage)


@given(events, st.dictionaries(st.text(min_size=1, max_size=6).filter(lambda k: k not in _KNOWN), json_values))
def test_decoder_ignores_unknown_fields(event: Event, extra: dict[str, object]) -> None:
    import orjson

    wire = orjson.loads(encode(event))
    assert decode(orjson.dumps({**extra, **wire})) == event


_KNOWN = {
    "type", "stream", "seq", "ts", "model", "provider", "meta", "text", "channel", "n", "first_seq",
    "reason", "usage", "timings", "kind", "message", "retryable", "by", "verdict", "categories",
    "action", "start", "end", "scores",
}  # fmt: skip


@pytest.mark.parametrize(
    ("raw", "field"),
    [
        (b'{"type":"delta","stream":"s","seq":1,"ts":1.0}', "$.text"),
        (b'{"type":"delta","stream":"s","seq":"one","ts":1.0,"text":"x"}', "$.seq"),
        (b'{"type":"nope","stream":"s","seq":1,"ts":1.0}', "$.type"),
        (b'{"stream":"s","seq":1,"ts":1.0}', "$.type"),
        (b'{"type":"end","seq":3,"ts":1.0}', "$.stream"),
    ],
)
def test_decode_errors_name_the_field(raw: bytes, field: str) -> None:
    with pytest.raises(DecodeError) as info:
        decode(raw)
    assert info.value.field == field
    assert field.removeprefix("$.") in str(info.value)


def test_decode_rejects_invalid_json() -> None:
    with pytest.raises(DecodeError, match="invalid event JSON"):
        decode(b'{"type": "delta",')


# One operation of a random scenario: publish a delta on (stream, channel),
# or let the reader take a batch of at most `limit` items.
ops = st.lists(
    st.one_of(
        st.tuples(st.just("pub"), st.integers(0, 3), st.sampled_from(["content", "reasoning"]), st.text(max_size=4)),
        st.tuples(st.just("read"), st.integers(1, 8)),
    ),
    max_size=120,
)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops=ops, buffer=st.integers(1, 12), backend=st.sampled_from(["asyncio", "trio"]))
def test_coalescing_preserves_text_and_order(ops: list[tuple[object, ...]], buffer: int, backend: str) -> None:
    """Any interleaving of streams, any buffer size, any read pacing: every
    subscriber gets exactly the published text per stream and channel, in seq order."""

    async def scenario() -> None:
        published: dict[tuple[str, str], str] = {}
        async with Bus() as bus:
            slow = bus.subscribe(overflow="coalesce", buffer=buffer, max_bytes=10**9)
            fast = bus.subscribe(overflow="coalesce", buffer=buffer, max_bytes=10**9)
            received: list[Event] = []
            fast_received: list[Event] = []
            writers = {}
            for n in range(4):
                w = bus.stream(stream=f"s{n}")
                await w.__aenter__()
                writers[n] = w
            for op in ops:
                if op[0] == "pub":
                    _, n, channel, text = op
                    await writers[n].delta(text, channel=channel)  # type: ignore[index,arg-type]
                    key = (f"s{n}", str(channel))
                    published[key] = published.get(key, "") + str(text)
                    fast_received.extend(await fast.receive_batch())
                elif slow.pending:
                    received.extend(await slow.receive_batch(limit=int(op[1])))  # type: ignore[call-overload]
            for w in reversed(writers.values()):  # writers nest like `async with` blocks
                await w.__aexit__(None, None, None)
        received.extend([e async for e in slow])
        fast_received.extend([e async for e in fast])
        for got in (received, fast_received):
            texts: dict[tuple[str, str], str] = {}
            last_seq: dict[str, int] = {}
            for e in got:
                assert e.seq > last_seq.get(e.stream, -1), "per-stream seq order"
                last_seq[e.stream] = e.seq
                if isinstance(e, DeltaEvent):
                    texts[(e.stream, e.channel)] = texts.get((e.stream, e.channel), "") + e.text
            assert {k: v for k, v in texts.items() if v} == {k: v for k, v in published.items() if v}
            assert sum(isinstance(e, StartEvent) for e in got) == 4
            assert sum(isinstance(e, EndEvent) for e in got) == 4

    anyio.run(scenario, backend=backend)


@settings(max_examples=60, deadline=None)
@given(ops=ops, buffer=st.integers(1, 6))
def test_drop_oldest_keeps_seq_increasing_and_control_events(ops: list[tuple[object, ...]], buffer: int) -> None:
    async def scenario() -> None:
        async with Bus() as bus:
            sub = bus.subscribe(overflow="drop_oldest", buffer=buffer)
            got: list[Event] = []
            async with bus.stream(stream="s") as w:
                for op in ops:
                    if op[0] == "pub":
                        await w.delta(str(op[3]))
                    elif sub.pending:
                        got.extend(await sub.receive_batch(limit=int(op[1])))  # type: ignore[call-overload]
        got.extend([e async for e in sub])
        seqs = [e.seq for e in got]
        assert seqs == sorted(set(seqs))
        assert isinstance(got[0], StartEvent)
        assert isinstance(got[-1], EndEvent)
        assert sub.dropped + len([e for e in got if isinstance(e, DeltaEvent)]) == sum(1 for o in ops if o[0] == "pub")

    anyio.run(scenario)


USERS = 2_000
META_USERS = 50  # the first users follow their stream by a meta tag (matched on start), the rest by its id

user_ops = st.lists(
    st.one_of(
        st.tuples(st.just("pub"), st.integers(0, USERS - 1) | st.integers(0, 5), st.text(max_size=4)),
        st.tuples(st.just("read"), st.integers(0, USERS - 1) | st.integers(0, 5), st.integers(1, 8)),
        st.tuples(st.just("close"), st.integers(0, USERS - 1) | st.integers(0, 5)),
    ),
    max_size=80,
)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops=user_ops, buffer=st.integers(1, 6), backend=st.sampled_from(["asyncio", "trio"]))
def test_thousands_of_per_user_subscribers_each_get_exactly_their_stream(
    ops: list[tuple[object, ...]], buffer: int, backend: str
) -> None:
    """A chat service: one subscriber per user, thousands of them. Each sees all of
    its own stream, in order, and nothing else; a closed one gets nothing more; an
    unfiltered reader still sees every stream."""

    async def scenario() -> None:
        published: dict[str, str] = {}
        received: dict[int, list[Event]] = {u: [] for u in range(USERS)}
        closed_at: dict[int, int] = {}  # user -> how many deltas of its stream were published before it closed
        async with Bus(buffer=buffer, max_bytes=10**9) as bus:
            firehose = bus.subscribe()
            subs = [
                bus.subscribe(Filter.of(meta={"user": f"u{u}"}) if u < META_USERS else Filter.of(streams=f"u{u}"))
                for u in range(USERS)
            ]
            writers: dict[int, StreamWriter] = {}
            counts: dict[int, int] = {}
            for op in ops:
                user = int(op[1])  # type: ignore[call-overload]
                if op[0] == "pub":
                    if user not in writers:
                        writers[user] = bus.stream(stream=f"u{user}", meta={"user": f"u{user}"})
                        await writers[user].__aenter__()
                    await writers[user].delta(str(op[2]))
                    published[f"u{user}"] = published.get(f"u{user}", "") + str(op[2])
                    counts[user] = counts.get(user, 0) + 1
                elif op[0] == "read" and subs[user].pending:
                    received[user].extend(await subs[user].receive_batch(limit=int(op[2])))  # type: ignore[call-overload]
                elif op[0] == "close" and user not in closed_at:
                    subs[user].close()
                    closed_at[user] = counts.get(user, 0)
            for w in reversed(writers.values()):  # writers nest like `async with` blocks
                await w.__aexit__(None, None, None)
        everything = [e async for e in firehose]
        for user, sub in enumerate(subs):
            received[user].extend([e async for e in sub])
        stream_of = {f"u{u}" for u in writers}
        assert {e.stream for e in everything} == stream_of
        for user, got in received.items():
            assert {e.stream for e in got} <= {f"u{user}"}, "only its own stream"
            seqs = [e.seq for e in got]
            assert seqs == sorted(set(seqs)), "in seq order, once each"
            text = "".join(e.text for e in got if isinstance(e, DeltaEvent))
            if user in closed_at:
                # Closed: what was buffered before it closed, then nothing more.
                assert published.get(f"u{user}", "").startswith(text)
                assert sum(isinstance(e, DeltaEvent) for e in got) <= closed_at[user]
            elif user in writers:
                assert text == published[f"u{user}"]
                assert isinstance(got[0], StartEvent) and isinstance(got[-1], EndEvent)
            else:
                assert got == []

    anyio.run(scenario, backend=backend)
