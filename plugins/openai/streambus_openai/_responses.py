"""OpenAI's Responses API streaming format (``POST /v1/responses``), both ways, sans-I/O.

With ``stream: true`` the Responses API sends typed server-sent events
(https://platform.openai.com/docs/api-reference/responses-streaming)::

    event: response.created
    data: {"type":"response.created","sequence_number":0,"response":{"id":"resp_1","status":"in_progress",...}}

    event: response.output_item.added
    data: {"type":"response.output_item.added","output_index":1,"item":{"type":"function_call","id":"fc_1",
           "call_id":"call_1","name":"get_weather","arguments":""}}

    event: response.output_text.delta
    data: {"type":"response.output_text.delta","item_id":"msg_1","output_index":0,"content_index":0,"delta":"Hi"}

    event: response.completed
    data: {"type":"response.completed","response":{...,"usage":{"input_tokens":9,
           "input_tokens_details":{"cached_tokens":0},"output_tokens":3,
           "output_tokens_details":{"reasoning_tokens":0},"total_tokens":12}}}

:class:`ResponsesStreamParser` yields the same pieces as the Chat
Completions parser (:class:`TextPiece`, then :class:`FinishPiece`,
:class:`UsagePiece` and :class:`DonePiece` at ``response.completed`` or
``response.incomplete``; :class:`ErrorPiece` for ``response.failed`` and
``error``), so the ``openai`` producer handles both alike.
:class:`ResponsesStreamEncoder` writes the whole event sequence the official
client's ``responses.stream()`` helper checks (items added, parts added,
deltas, done events, the final response with every output item).
"""

from __future__ import annotations

from typing import Any, Final

import msgspec
import orjson

from streambus import Usage, WireError, formats
from streambus.events import AbortEvent, DeltaEvent, EndEvent, ErrorEvent, Event, StartEvent
from streambus.formats import SseAnswerParser, decode_event, tool_fragments
from streambus.validation import validation_problem
from streambus.wire import SkippedTypes, SseEvent, ToolCallFragment, tool_text

from ._protocol import DonePiece, ErrorPiece, FinishPiece, OpenAIPieceParser, Piece, TextPiece, UsagePiece

__all__ = ["ResponsesStreamEncoder", "ResponsesStreamParser", "response_pieces", "responses_usage"]

# Events that carry nothing the bus needs: the text, arguments and summaries arrive as deltas.
_QUIET: Final = frozenset(
    {
        "response.created",
        "response.in_progress",
        "response.queued",
        "response.output_item.done",
        "response.content_part.added",
        "response.content_part.done",
        "response.output_text.done",
        "response.output_text.annotation.added",
        "response.reasoning_summary_part.added",
        "response.reasoning_summary_part.done",
        "response.reasoning_summary_text.done",
        "response.reasoning_text.done",
        "response.refusal.done",
        "response.function_call_arguments.done",
    }
)
_INCOMPLETE: Final = {"max_output_tokens": "length", "content_filter": "content_filter"}


class _Details(msgspec.Struct):
    cached_tokens: int | None = None
    reasoning_tokens: int | None = None


class _Usage(msgspec.Struct):
    input_tokens: int | None = None
    output_tokens: int | None = None
    total_tokens: int | None = None
    input_tokens_details: _Details | None = None
    output_tokens_details: _Details | None = None


class _Incomplete(msgspec.Struct):
    reason: str | None = None


class _Error(msgspec.Struct):
    message: str | None = None
    code: str | None = None
    type: str | None = None


class _Response(msgspec.Struct):
    status: str | None = None
    usage: _Usage | None = None
    incomplete_details: _Incomplete | None = None
    error: _Error | None = None


class _Item(msgspec.Struct):
    type: str
    id: str | None = None
    call_id: str | None = None
    name: str | None = None
    arguments: str | None = None


class _Event(msgspec.Struct):
    type: str | None = None
    delta: str | None = None
    item_id: str | None = None
    output_index: int | None = None
    item: _Item | None = None
    response: _Response | None = None
    message: str | None = None
    code: str | None = None


_decode_event = msgspec.json.Decoder(_Event).decode


def responses_usage(usage: Any) -> Usage:
    """The bus :class:`~streambus.Usage` for a Responses ``usage`` object (a dict or the parsed struct)."""
    u = usage if isinstance(usage, _Usage) else msgspec.convert(usage, _Usage)
    cached = u.input_tokens_details.cached_tokens if u.input_tokens_details is not None else None
    reasoning = u.output_tokens_details.reasoning_tokens if u.output_tokens_details is not None else None
    total = u.total_tokens
    if total is None and (u.input_tokens is not None or u.output_tokens is not None):
        total = (u.input_tokens or 0) + (u.output_tokens or 0)
    return Usage(
        prompt_tokens=u.input_tokens,
        completion_tokens=u.output_tokens,
        total_tokens=total,
        cached_input_tokens=cached,
        reasoning_tokens=reasoning,
    )


class ResponsesStreamParser(SseAnswerParser[Piece]):
    """Parse a Responses API SSE body into pieces, incrementally.

    Used like :class:`~streambus_openai.OpenAIStreamParser`: iterate what
    :meth:`feed` returns, call :meth:`close` at the end, and a stream whose
    :attr:`done` is still false was truncated (no ``response.completed``,
    ``incomplete`` or ``failed``). Bad data raises
    :class:`~streambus.errors.WireError` with the byte offset, after the
    pieces before it; an event type it does not know is skipped and counted
    in :attr:`skipped` (the first of each type logged once per process).
    ``output_text`` and ``refusal`` deltas go to ``content``, reasoning
    summaries and reasoning text to ``reasoning``, function calls to ``tool``.
    """

    __slots__ = ("_calls", "skipped")

    def __init__(self) -> None:
        super().__init__()
        self._calls: dict[str | int, int] = {}  # item id and output index -> tool call index
        self.skipped = SkippedTypes("openai-responses")
        """Events skipped because this parser does not know their type, by type."""

    def handle(self, sse: SseEvent, out: list[Piece]) -> None:
        """Append the pieces of one event to *out* (see the class docstring)."""
        if sse.data == "[DONE]":
            return
        event = decode_event(_decode_event, sse, "a Responses stream event")
        kind = event.type or sse.event
        if kind in ("response.output_text.delta", "response.refusal.delta"):
            out.append(TextPiece(self._delta(event, sse), "content"))
        elif kind in ("response.reasoning_summary_text.delta", "response.reasoning_text.delta"):
            out.append(TextPiece(self._delta(event, sse), "reasoning"))
        elif kind == "response.function_call_arguments.delta":
            delta = self._delta(event, sse)
            tool = self._calls.get(event.item_id or "", self._calls.get(event.output_index or -1))
            if tool is None:
                raise WireError("response.function_call_arguments.delta: for no function_call item", offset=sse.offset)
            if delta:
                out.append(TextPiece(tool_text(ToolCallFragment(index=tool, arguments=delta)), "tool"))
        elif kind == "response.output_item.added":
            item = event.item
            if item is None:
                raise WireError("response.output_item.added: needs an item", offset=sse.offset)
            if item.type == "function_call":
                tool = len({*self._calls.values()})
                if item.id is not None:
                    self._calls[item.id] = tool
                if event.output_index is not None:
                    self._calls[event.output_index] = tool
                fragment = ToolCallFragment(
                    index=tool, id=item.call_id or item.id, name=item.name or "", arguments=item.arguments or ""
                )
                out.append(TextPiece(tool_text(fragment), "tool"))
        elif kind in ("response.completed", "response.incomplete"):
            self.done = True
            self._end(event.response or _Response(), kind == "response.incomplete", out)
        elif kind == "response.failed":
            self.done = True
            error = (event.response.error if event.response is not None else None) or _Error()
            out.append(ErrorPiece(message=error.message or "the response failed", type=error.type, code=error.code))
        elif kind == "error":
            self.done = True
            out.append(ErrorPiece(message=event.message or "error event", code=event.code))
        elif kind in _QUIET:
            pass
        elif kind == "message":
            raise WireError("event without a type", offset=sse.offset)
        else:
            self.skipped.note(kind)

    def _end(self, response: _Response | _WholeResponse, incomplete: bool, out: list[Piece]) -> None:
        if incomplete:
            why = response.incomplete_details.reason if response.incomplete_details is not None else None
            reason = _INCOMPLETE.get(why or "", why or "length")
        else:
            reason = "tool_calls" if self._calls else "stop"
        out.append(FinishPiece(reason))
        if response.usage is not None:
            out.append(UsagePiece(responses_usage(response.usage)))
        out.append(DonePiece())

    @staticmethod
    def _delta(event: _Event, sse: SseEvent) -> str:
        if event.delta is None:
            raise WireError(f"{event.type}: without a delta", offset=sse.offset)
        return event.delta


class _Part(msgspec.Struct):
    type: str
    text: str | None = None


class _OutputItem(msgspec.Struct):
    type: str
    id: str | None = None
    call_id: str | None = None
    name: str | None = None
    arguments: str | None = None
    content: list[_Part] = []
    summary: list[_Part] = []


class _WholeResponse(msgspec.Struct):
    """A whole (``stream: false``) answer: the ``response`` object."""

    output: list[_OutputItem]
    status: str | None = None
    usage: _Usage | None = None
    incomplete_details: _Incomplete | None = None
    error: _Error | None = None


_decode_response = msgspec.json.Decoder(_WholeResponse).decode


def response_pieces(body: bytes) -> list[formats.Piece]:
    """The :mod:`streambus.formats` pieces of a whole (``stream: false``) Responses answer *body*.

    The output items in order (message text and refusals to ``content``,
    reasoning summaries to ``reasoning``, function calls to one ``tool``
    fragment each), then the end (``incomplete`` -> ``length`` or
    ``content_filter``) with the usage, or the error of a ``failed`` response.
    Raises :class:`~streambus.errors.WireError` when *body* is not a response.
    """
    try:
        response = _decode_response(body)
    except msgspec.ValidationError as exc:
        raise WireError(f"not a Responses answer: {validation_problem(exc).describe()}", offset=0) from None
    except msgspec.DecodeError as exc:
        raise WireError(f"not JSON: {exc}", offset=0) from None
    if response.status == "failed" or response.error is not None:
        error = response.error or _Error()
        return [formats.ErrorPiece(message=error.message or "the response failed", code=error.code)]
    parser = ResponsesStreamParser()
    pieces: list[Piece] = []
    for item in response.output:
        if item.type == "message":
            pieces.extend(TextPiece(p.text, "content") for p in item.content if p.text)
        elif item.type == "reasoning":
            pieces.extend(TextPiece(p.text, "reasoning") for p in item.summary if p.text)
        elif item.type == "function_call":
            tool = len(parser._calls)
            parser._calls[tool] = tool
            fragment = ToolCallFragment(
                index=tool, id=item.call_id or item.id, name=item.name or "", arguments=item.arguments or ""
            )
            pieces.append(TextPiece(tool_text(fragment), "tool"))
    parser._end(response, response.status == "incomplete", pieces)
    return list(OpenAIPieceParser(parser=parser).neutral(pieces))


def _usage_body(usage: Usage | None) -> dict[str, Any]:
    u = usage or Usage()
    prompt, completion = u.prompt_tokens or 0, u.completion_tokens or 0
    return {
        "input_tokens": prompt,
        "input_tokens_details": {"cached_tokens": u.cached_input_tokens or 0},
        "output_tokens": completion,
        "output_tokens_details": {"reasoning_tokens": u.reasoning_tokens or 0},
        "total_tokens": u.total_tokens if u.total_tokens is not None else prompt + completion,
    }


class ResponsesStreamEncoder:
    """Encodes one stream's events as a Responses API SSE body.

    Obtain one from :meth:`OpenAIFormat.stream_encoder` with route
    ``/v1/responses``. Consecutive deltas of a channel share an output item
    (``reasoning``, ``message``, one ``function_call`` per call); ``end``
    closes the open item and writes ``response.completed`` (or
    ``response.incomplete`` for ``length`` and ``content_filter``) with the
    usage; ``error`` and ``abort`` write ``response.failed``.
    """

    content_type = "text/event-stream"

    def __init__(self, *, model: str | None = None) -> None:
        self.model = model
        self._seq = 0
        self._response: dict[str, Any] = {}
        self._items: list[dict[str, Any]] = []
        self._open: str | int | None = None  # "reasoning", "message", a tool call index, or None

    def _sse(self, kind: str, **fields: Any) -> bytes:
        obj = {"type": kind, **fields, "sequence_number": self._seq}
        self._seq += 1
        return b"event: " + kind.encode() + b"\ndata: " + orjson.dumps(obj) + b"\n\n"

    def _where(self) -> dict[str, Any]:
        return {"item_id": self._items[-1]["id"], "output_index": len(self._items) - 1}

    def _close(self) -> bytes:
        if self._open is None:
            return b""
        item, where, out = self._items[-1], self._where(), b""
        if item["type"] == "reasoning":
            part = {"type": "summary_text", "text": item["summary"][0]["text"]}
            out += self._sse("response.reasoning_summary_text.done", **where, summary_index=0, text=part["text"])
            out += self._sse("response.reasoning_summary_part.done", **where, summary_index=0, part=part)
        elif item["type"] == "message":
            part = item["content"][0]
            out += self._sse("response.output_text.done", **where, content_index=0, text=part["text"], logprobs=[])
            out += self._sse("response.content_part.done", **where, content_index=0, part=part)
            item["status"] = "completed"
        else:
            out += self._sse("response.function_call_arguments.done", **where, arguments=item["arguments"])
            item["status"] = "completed"
        self._open = None
        return out + self._sse("response.output_item.done", output_index=where["output_index"], item=item)

    def _add(self, kind: str | int, item: dict[str, Any]) -> bytes:
        out = self._close()
        self._items.append(item)
        self._open = kind
        out += self._sse(
            "response.output_item.added", output_index=len(self._items) - 1, item={**item, **_EMPTY[item["type"]]}
        )
        where = self._where()
        if item["type"] == "reasoning":
            out += self._sse(
                "response.reasoning_summary_part.added",
                **where,
                summary_index=0,
                part={"type": "summary_text", "text": ""},
            )
        elif item["type"] == "message":
            part = {"type": "output_text", "text": "", "annotations": []}
            out += self._sse("response.content_part.added", **where, content_index=0, part=part)
        return out

    def _tool(self, fragment: ToolCallFragment) -> bytes:
        out = b""
        if self._open != fragment.index:
            call_id = fragment.id or f"call_{fragment.index}"
            item = {
                "type": "function_call",
                "id": f"fc_{fragment.index}",
                "call_id": call_id,
                "name": fragment.name or "",
                "arguments": "",
                "status": "in_progress",
            }
            out += self._add(fragment.index, item)
        if fragment.arguments:
            self._items[-1]["arguments"] += fragment.arguments
            out += self._sse("response.function_call_arguments.delta", **self._where(), delta=fragment.arguments)
        return out

    def encode(self, event: Event) -> bytes:
        """Bytes for *event* (``b""`` when the Responses API has nothing to say for it)."""
        if isinstance(event, DeltaEvent):
            n = len(self._items)
            if event.channel == "tool":
                return b"".join(self._tool(f) for f in tool_fragments(event))
            if event.channel == "reasoning":
                out = (
                    b""
                    if self._open == "reasoning"
                    else self._add(
                        "reasoning",
                        {"type": "reasoning", "id": f"rs_{n}", "summary": [{"type": "summary_text", "text": ""}]},
                    )
                )
                self._items[-1]["summary"][0]["text"] += event.text
                return out + self._sse(
                    "response.reasoning_summary_text.delta", **self._where(), summary_index=0, delta=event.text
                )
            if self._open != "message":
                item = {
                    "type": "message",
                    "id": f"msg_{n}",
                    "status": "in_progress",
                    "role": "assistant",
                    "content": [{"type": "output_text", "text": "", "annotations": []}],
                }
                out = self._add("message", item)
            else:
                out = b""
            self._items[-1]["content"][0]["text"] += event.text
            return out + self._sse(
                "response.output_text.delta", **self._where(), content_index=0, delta=event.text, logprobs=[]
            )
        if isinstance(event, StartEvent):
            self.model = self.model or event.model
            self._response = {
                "id": "resp_" + event.stream,
                "object": "response",
                "created_at": int(event.ts),
                "status": "in_progress",
                "model": self.model or "",
                "output": [],
                "parallel_tool_calls": True,
                "tool_choice": "auto",
                "tools": [],
                "usage": None,
                "error": None,
                "incomplete_details": None,
            }
            return self._sse("response.created", response=self._response) + self._sse(
                "response.in_progress", response=self._response
            )
        if isinstance(event, EndEvent):
            out = self._close()
            incomplete = {"length": "max_output_tokens", "content_filter": "content_filter"}.get(event.reason)
            final = {**self._response, "output": self._items, "usage": _usage_body(event.usage)}
            if incomplete is None:
                return out + self._sse("response.completed", response={**final, "status": "completed"})
            final.update(status="incomplete", incomplete_details={"reason": incomplete})
            return out + self._sse("response.incomplete", response=final)
        if isinstance(event, ErrorEvent | AbortEvent):
            if isinstance(event, ErrorEvent):
                error = {"code": event.kind, "message": event.message or event.kind}
            else:
                error = {
                    "code": "aborted",
                    "message": f"stream aborted by {event.by}" + (f": {event.reason}" if event.reason else ""),
                }
            return self._sse(
                "response.failed",
                response={**self._response, "status": "failed", "output": self._items, "error": error},
            )
        return b""

    def close(self) -> bytes:
        """Nothing: the Responses API ends with its last typed event."""
        return b""

    def assemble(self, events: Any) -> dict[str, Any]:
        """The ``stream: false`` body: the final response object (its ``error`` set when the stream failed)."""
        last: dict[str, Any] = {}
        for event in events:
            self.encode(event)
            if isinstance(event, EndEvent):
                last = {
                    **self._response,
                    "output": self._items,
                    "usage": _usage_body(event.usage),
                    "status": "completed",
                }
            elif isinstance(event, ErrorEvent | AbortEvent):
                message = event.message if isinstance(event, ErrorEvent) else f"stream aborted by {event.by}"
                return {
                    "error": {
                        "message": message,
                        "type": "server_error",
                        "param": None,
                        "code": getattr(event, "kind", "aborted"),
                    }
                }
        return last


# What an item looks like when it is added: empty, filled by the deltas after it.
_EMPTY: Final[dict[str, dict[str, Any]]] = {
    "reasoning": {"summary": []},
    "message": {"content": []},
    "function_call": {"arguments": ""},
}
