"""Tool deltas that are not in the documented line format are warned about once per stream, never dropped silently."""

from __future__ import annotations

from structlog.testing import capture_logs

from streambus import DeltaEvent
from streambus.formats import tool_fragments
from streambus.wire import ToolCallFragment, tool_text


def _delta(stream: str, seq: int, text: str) -> DeltaEvent:
    return DeltaEvent(stream=stream, seq=seq, ts=1.0, text=text, channel="tool")


def test_fragments_are_read_line_by_line() -> None:
    text = tool_text(ToolCallFragment(index=0, id="c", name="f")) + tool_text(ToolCallFragment(arguments="{}"))
    assert tool_fragments(_delta("good", 1, text)) == [
        ToolCallFragment(index=0, id="c", name="f"),
        ToolCallFragment(arguments="{}"),
    ]


def test_bad_text_is_warned_about_once_per_stream_and_good_lines_kept() -> None:
    good = tool_text(ToolCallFragment(arguments='{"a": 1}'))
    with capture_logs() as logs:
        first = tool_fragments(_delta("s-bad", 1, '{"name": "ge' + "\n" + good))
        second = tool_fragments(_delta("s-bad", 2, "t_weather"))
        other = tool_fragments(_delta("s-other", 1, "not json"))
    assert first == [ToolCallFragment(arguments='{"a": 1}')]
    assert second == []
    assert other == []
    warnings = [entry for entry in logs if entry["event"] == "formats.tool_text_unparsed"]
    assert [(w["stream"], w["seq"], w["offset"]) for w in warnings] == [("s-bad", 1, 0), ("s-other", 1, 0)]
    assert all(w["log_level"] == "warning" for w in warnings)
