"""The text a ``tool`` channel delta carries: one JSON line per tool-call fragment.

Providers stream tool calls differently (OpenAI: an id and a name, then
argument string fragments, per call ``index``; Ollama: whole calls with an
argument object). On the bus both become ``delta`` events on the ``tool``
channel whose text is one compact JSON object per line::

    {"index":0,"id":"call_1","name":"get_weather","arguments":""}
    {"index":0,"arguments":"{\\"city\\": \\"Par"}
    {"index":0,"arguments":"is\\"}"}

``arguments`` is always a *string* fragment (Ollama's argument object is
serialised). The trailing newline makes coalesced deltas (text concatenated)
still parseable: :func:`parse_tool_text` reads any number of lines and
:func:`merge_tool_calls` joins fragments into whole calls.
"""

from __future__ import annotations

from collections.abc import Iterable

import msgspec

from ..errors import WireError

__all__ = ["ToolCall", "ToolCallFragment", "merge_tool_calls", "parse_tool_text", "tool_text"]


class ToolCallFragment(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """A piece of one tool call, as carried by a ``tool`` delta."""

    index: int = 0
    """Which call of the response this piece belongs to (0-based)."""
    id: str | None = None
    """The provider's call id, on the first fragment of a call (when it has one)."""
    name: str | None = None
    """The function name, on the first fragment of a call."""
    arguments: str = ""
    """A fragment of the JSON-encoded arguments."""


class ToolCall(msgspec.Struct, frozen=True, kw_only=True):
    """A whole tool call, assembled from fragments."""

    index: int
    id: str | None
    name: str
    arguments: str
    """The JSON-encoded arguments (parse them with ``orjson.loads``)."""


_encoder = msgspec.json.Encoder()
_decoder = msgspec.json.Decoder(ToolCallFragment)


def tool_text(fragment: ToolCallFragment) -> str:
    """The delta text for one fragment (a JSON line)."""
    return _encoder.encode(fragment).decode() + "\n"


def parse_tool_text(text: str) -> list[ToolCallFragment]:
    """Read the fragments in a ``tool`` delta's text (one or more JSON lines).

    Raises :class:`~streambus.errors.WireError` with the character offset of a
    line that is not a fragment.
    """
    out: list[ToolCallFragment] = []
    pos = 0
    for line in text.split("\n"):
        if line.strip():
            try:
                out.append(_decoder.decode(line))
            except msgspec.DecodeError as exc:
                raise WireError(f"not a tool-call fragment: {exc}", offset=pos) from None
        pos += len(line) + 1
    return out


def merge_tool_calls(fragments: Iterable[ToolCallFragment]) -> list[ToolCall]:
    """Join fragments into whole calls, ordered by ``index``."""
    calls: dict[int, list[str | None]] = {}
    args: dict[int, list[str]] = {}
    for frag in fragments:
        entry = calls.setdefault(frag.index, [None, None])
        if frag.id is not None:
            entry[0] = frag.id
        if frag.name is not None:
            entry[1] = frag.name
        args.setdefault(frag.index, []).append(frag.arguments)
    return [
        ToolCall(index=i, id=calls[i][0], name=calls[i][1] or "", arguments="".join(args[i])) for i in sorted(calls)
    ]
