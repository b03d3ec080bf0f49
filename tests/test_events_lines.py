"""JSON Lines of events: encode_many writes them, decode_many reads them back and names the bad lines."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from streambus import DeltaEvent, EndEvent, StartEvent
from streambus.errors import DecodeError
from streambus.events import Event, decode_many, encode_many

EVENTS: list[Event] = [
    StartEvent(stream="s", seq=0, ts=1.0, model="m"),
    DeltaEvent(stream="s", seq=1, ts=1.5, text="こんにちは 🎉"),
    EndEvent(stream="s", seq=2, ts=2.0),
]


def test_round_trip() -> None:
    assert decode_many(encode_many(EVENTS)) == (EVENTS, [])
    assert decode_many(b"") == ([], [])


def test_a_bad_line_costs_only_itself_and_is_named() -> None:
    lines = encode_many(EVENTS).split(b"\n")
    damaged = b"\n".join([lines[0], b'{"type": "delta", "stream": "s"}', b"", b"not json", lines[1], lines[2]])
    events, refused = decode_many(damaged)
    assert events == EVENTS
    assert [number for number, _ in refused] == [2, 4]
    assert all(isinstance(error, DecodeError) for _, error in refused)
    assert refused[0][1].field == "$.seq"  # the missing field is named
    assert "JSON" in str(refused[1][1])


@given(st.lists(st.sampled_from([*range(len(EVENTS)), -1]), max_size=20))
def test_any_mix_keeps_every_good_event_in_order(picks: list[int]) -> None:
    lines = [b"{bad" if i < 0 else encode_many([EVENTS[i]]).rstrip(b"\n") for i in picks]
    events, refused = decode_many(b"\n".join(lines))
    assert events == [EVENTS[i] for i in picks if i >= 0]
    assert [n for n, _ in refused] == [k + 1 for k, i in enumerate(picks) if i < 0]
