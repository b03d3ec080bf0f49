"""Sans-I/O encoders: events in, bytes of one HTTP streaming format out.

One encoder object serves one response. The I/O layers (ASGI, aiohttp) call
:meth:`~Encoder.begin` once, :meth:`~Encoder.encode` for every batch of events,
and :meth:`~Encoder.finish` when the response ends without the stream's terminal
event (the bus closed, the reader fell behind). Each format ends an aborted or
failed stream the way that format ends one:

====================  ======================================  =========================================
format                ``abort``                               ``error``
====================  ======================================  =========================================
``sse``               the ``abort`` wire event (in band)      the ``error`` wire event (in band)
``ndjson``            the ``abort`` wire event line           the ``error`` wire event line
``text``              a note ``[aborted by X: reason]``       a note ``[error kind: message]``
``ui`` (AI SDK)       ``{"type":"abort"}`` then ``[DONE]``    ``{"type":"error","errorText"}``, ``[DONE]``
``openai``            moderation: ``finish_reason:             ``{"error": {...}}`` (clients raise)
                      "content_filter"``; else ``{"error"}``
====================  ======================================  =========================================
"""

from __future__ import annotations

from typing import Any, Literal, Protocol, TypeAlias

import orjson

from streambus import encode, encode_many
from streambus.events import (
    AbortEvent,
    DeltaEvent,
    EndEvent,
    ErrorEvent,
    Event,
    ModerationEvent,
    StartEvent,
    to_builtins,
)
from streambus.formats import tool_fragments
from streambus.wire import ToolCallFragment

__all__ = [
    "FORMATS",
    "Encoder",
    "FormatName",
    "NDJSONEncoder",
    "OpenAIChunkEncoder",
    "SSEEncoder",
    "TextEncoder",
    "UIMessageStreamEncoder",
    "error_body",
    "make_encoder",
]

FormatName: TypeAlias = Literal["sse", "text", "ndjson", "ui", "openai"]
FORMATS: tuple[FormatName, ...] = ("sse", "text", "ndjson", "ui", "openai")
"""Every format name, as the building blocks and the sink accept them."""

EndCause: TypeAlias = Literal["closed", "lost"]


class Encoder(Protocol):
    """What every format's encoder offers to the I/O layers."""

    media_type: str
    """The ``content-type`` of the response."""
    headers: dict[str, str]
    """Extra response headers (``cache-control``, the AI SDK marker ...)."""
    single: bool
    """Whether the format carries one stream (``text``, ``ui``, ``openai``)."""
    keepalive: bytes
    """Bytes that keep an idle connection open without changing the content (may be empty)."""

    def begin(self) -> bytes:
        """Bytes to send first."""

    def encode(self, events: list[Event]) -> bytes:
        """Bytes for *events* (including the ending after a terminal event)."""

    def finish(self, cause: EndCause) -> bytes:
        """Bytes ending a response whose stream had no terminal event (bus closed, reader lost)."""


_NO_CACHE = {"cache-control": "no-cache", "x-accel-buffering": "no"}


def _dumps(value: Any) -> bytes:
    return orjson.dumps(value)


class SSEEncoder:
    """Server-sent events of wire-form events, each with ``id: <stream>:<seq>``.

    A browser ``EventSource`` reconnects by itself and sends the last id as
    ``Last-Event-ID``; the server resumes right after it. ``retry`` (ms) sets
    the browser's reconnect delay; it rides in the first frame, never in a
    frame of its own (a frame with no ``data`` would reach clients such as
    ``httpx-sse`` as an event with empty data). A resume whose position was
    evicted starts with an ``event: reset`` frame (``{"recovered": false,
    ...}``): reload.
    """

    media_type = "text/event-stream"
    single = False
    keepalive = b": keepalive\n\n"

    def __init__(self, *, retry_ms: int | None = 3000, preamble: bytes = b"") -> None:
        self.headers = dict(_NO_CACHE)
        self.retry_ms = retry_ms
        self.preamble = preamble
        self._retry = f"retry: {retry_ms}\n".encode() if retry_ms is not None else b""

    def _first(self, frame: bytes) -> bytes:
        # The retry field joins the first frame: a frame holding only `retry:` is an empty event to some clients.
        head, self._retry = self._retry, b""
        return head + frame

    def begin(self) -> bytes:
        """A pending ``reset`` frame (with the ``retry`` field), else nothing."""
        return self._first(self.preamble) if self.preamble else b""

    @staticmethod
    def reset_frame(reason: str) -> bytes:
        """The frame telling a resuming client that events were missed: reload."""
        return b"event: reset\ndata: " + _dumps({"recovered": False, "reason": reason}) + b"\n\n"

    def encode(self, events: list[Event]) -> bytes:
        """One ``id:``/``data:`` frame per event."""
        parts: list[bytes] = []
        for event in events:
            parts.append(b"id: %s:%d\ndata: %s\n\n" % (event.stream.encode(), event.seq, encode(event)))
        data = b"".join(parts)
        return self._first(data) if self._retry and data else data

    def finish(self, cause: EndCause) -> bytes:
        """Nothing: the browser reconnects and resumes."""
        return b""


class NDJSONEncoder:
    """Newline-delimited JSON: one wire-form event per line (``application/x-ndjson``)."""

    media_type = "application/x-ndjson"
    single = False
    keepalive = b""

    def __init__(self) -> None:
        self.headers = dict(_NO_CACHE)

    def begin(self) -> bytes:
        """Nothing."""
        return b""

    def encode(self, events: list[Event]) -> bytes:
        """One line per event."""
        return encode_many(events)

    def finish(self, cause: EndCause) -> bytes:
        """Nothing: the missing terminal event tells the reader the stream did not end."""
        return b""


def failure_note(event: Event) -> str:
    """The note a text rendering ends a failed stream with (as the ``stdout`` sink prints it)."""
    if isinstance(event, ErrorEvent):
        return f"[error {event.kind}: {event.message}]"
    if isinstance(event, AbortEvent):
        return f"[aborted by {event.by}: {event.reason}]"
    return ""


class TextEncoder:
    """Plain text chunks of one stream's ``content`` channel (what FastAPI examples stream).

    Plain text has no in-band end marker, so a stream that ends in ``abort``
    or ``error`` ends with a note on its own line (``[aborted by moderation:
    ...]``, as the ``stdout`` sink prints it); pass ``failure_notes=False`` to
    end silently.
    """

    single = True
    keepalive = b""

    def __init__(
        self, *, channels: tuple[str, ...] = ("content",), failure_notes: bool = True, charset: str = "utf-8"
    ) -> None:
        self.media_type = f"text/plain; charset={charset}"
        self.headers = dict(_NO_CACHE)
        self.channels = frozenset(channels)
        self.failure_notes = failure_notes

    def begin(self) -> bytes:
        """Nothing."""
        return b""

    def encode(self, events: list[Event]) -> bytes:
        """The text of content deltas; a note for a failed ending."""
        parts: list[str] = []
        for event in events:
            if type(event) is DeltaEvent:
                if event.channel in self.channels:
                    parts.append(event.text)
            elif self.failure_notes and isinstance(event, ErrorEvent | AbortEvent):
                parts.append("\n" + failure_note(event) + "\n")
        return "".join(parts).encode()

    def finish(self, cause: EndCause) -> bytes:
        """A note when the response ends before the stream did."""
        if not self.failure_notes:
            return b""
        why = "the server is shutting down" if cause == "closed" else "the reader fell behind"
        return f"\n[interrupted: {why}]\n".encode()


_UI_FINISH_REASONS = {
    "stop": "stop",
    "length": "length",
    "content_filter": "content-filter",
    "tool_calls": "tool-calls",
    "error": "error",
}


class _UICall:
    """One tool call of an open tool part: its id, name and argument pieces."""

    __slots__ = ("arguments", "id", "name")

    def __init__(self, call_id: str, name: str) -> None:
        self.id = call_id
        self.name = name
        self.arguments: list[str] = []


class UIMessageStreamEncoder:
    """The Vercel AI SDK UI message stream protocol v1 (what ``useChat`` reads).

    One bus stream becomes one assistant message: ``start`` (``messageId`` =
    the stream id), ``start-step``, then ``text-start``/``text-delta``/
    ``text-end`` for the content channel, ``reasoning-start``/``-delta``/
    ``-end`` for reasoning, ``tool-input-start``/``tool-input-delta``/
    ``tool-input-available`` per tool call of the tool channel (a dynamic
    tool named as the call's fragments say, else *tool_name*; input parsed as
    JSON, or ``tool-input-error`` when it is not JSON), moderation verdicts as transient ``data-moderation`` parts, and
    ``finish-step`` + ``finish`` (``finishReason``), ``abort`` or ``error``,
    then ``data: [DONE]``. *message_metadata* adds the model, provider and
    usage as ``messageMetadata``.
    """

    media_type = "text/event-stream"
    single = True
    keepalive = b": keepalive\n\n"

    def __init__(self, *, tool_name: str = "tool", message_metadata: bool = False) -> None:
        self.headers = {**_NO_CACHE, "x-vercel-ai-ui-message-stream": "v1"}
        self.tool_name = tool_name
        self.message_metadata = message_metadata
        self._open: str | None = None  # channel of the open part
        self._part = 0
        self._part_id = ""
        self._tool_calls: dict[int, _UICall] = {}  # the open tool part's calls, by fragment index
        self._started = False

    def begin(self) -> bytes:
        """Nothing: ``start`` is sent with the stream's ``start`` event."""
        return b""

    @staticmethod
    def _frame(chunk: dict[str, Any]) -> bytes:
        return b"data: " + _dumps(chunk) + b"\n\n"

    def _close_part(self, out: list[bytes]) -> None:
        channel = self._open
        if channel is None:
            return
        self._open = None
        if channel == "content":
            out.append(self._frame({"type": "text-end", "id": self._part_id}))
        elif channel == "reasoning":
            out.append(self._frame({"type": "reasoning-end", "id": self._part_id}))
        else:
            calls, self._tool_calls = self._tool_calls, {}
            for index in sorted(calls):
                call = calls[index]
                raw = "".join(call.arguments)
                try:
                    value = orjson.loads(raw) if raw.strip() else {}
                except orjson.JSONDecodeError as exc:
                    out.append(
                        self._frame(
                            {
                                "type": "tool-input-error",
                                "toolCallId": call.id,
                                "toolName": call.name,
                                "input": raw,
                                "dynamic": True,
                                "errorText": f"tool input is not valid JSON: {exc}",
                            }
                        )
                    )
                    continue
                out.append(
                    self._frame(
                        {
                            "type": "tool-input-available",
                            "toolCallId": call.id,
                            "toolName": call.name,
                            "input": value,
                            "dynamic": True,
                        }
                    )
                )

    def _open_part(self, channel: str, stream: str, out: list[bytes]) -> None:
        self._close_part(out)
        self._part += 1
        self._open = channel
        if channel == "content":
            self._part_id = f"text-{self._part}"
            out.append(self._frame({"type": "text-start", "id": self._part_id}))
        elif channel == "reasoning":
            self._part_id = f"reasoning-{self._part}"
            out.append(self._frame({"type": "reasoning-start", "id": self._part_id}))
        else:
            self._part_id = f"{stream}-tool-{self._part}"

    def _tool_delta(self, event: DeltaEvent, out: list[bytes]) -> None:
        """Each call (fragment ``index``) is one dynamic tool part: start on its first fragment, then input deltas."""
        for fragment in tool_fragments(event):
            call = self._tool_calls.get(fragment.index)
            if call is None:
                call_id = fragment.id or f"{self._part_id}-{fragment.index}"
                call = self._tool_calls[fragment.index] = _UICall(call_id, fragment.name or self.tool_name)
                out.append(
                    self._frame(
                        {"type": "tool-input-start", "toolCallId": call.id, "toolName": call.name, "dynamic": True}
                    )
                )
            if fragment.arguments:
                call.arguments.append(fragment.arguments)
                out.append(
                    self._frame(
                        {"type": "tool-input-delta", "toolCallId": call.id, "inputTextDelta": fragment.arguments}
                    )
                )

    def _ensure_started(self, event: Event, out: list[bytes]) -> None:
        if self._started:
            return
        self._started = True
        chunk: dict[str, Any] = {"type": "start", "messageId": event.stream}
        if self.message_metadata and isinstance(event, StartEvent):
            chunk["messageMetadata"] = {"stream": event.stream, "model": event.model, "provider": event.provider}
        out.append(self._frame(chunk))
        out.append(self._frame({"type": "start-step"}))

    def encode(self, events: list[Event]) -> bytes:
        """The UI message chunks for *events*, ending with ``[DONE]`` after the terminal event."""
        out: list[bytes] = []
        for event in events:
            self._ensure_started(event, out)
            kind = type(event)
            if kind is DeltaEvent:
                assert isinstance(event, DeltaEvent)
                if not event.text:
                    continue
                if self._open != event.channel:
                    self._open_part(event.channel, event.stream, out)
                if event.channel == "content":
                    out.append(self._frame({"type": "text-delta", "id": self._part_id, "delta": event.text}))
                elif event.channel == "reasoning":
                    out.append(self._frame({"type": "reasoning-delta", "id": self._part_id, "delta": event.text}))
                else:
                    self._tool_delta(event, out)
            elif kind is EndEvent:
                assert isinstance(event, EndEvent)
                self._close_part(out)
                out.append(self._frame({"type": "finish-step"}))
                finish: dict[str, Any] = {
                    "type": "finish",
                    "finishReason": _UI_FINISH_REASONS.get(event.reason, "other"),
                }
                if self.message_metadata and event.usage is not None:
                    finish["messageMetadata"] = {"usage": to_builtins(event)["usage"]}
                out.append(self._frame(finish))
                out.append(b"data: [DONE]\n\n")
            elif kind is ErrorEvent:
                assert isinstance(event, ErrorEvent)
                text = f"{event.kind}: {event.message}" if event.message else event.kind
                out.append(self._frame({"type": "error", "errorText": text}))
                out.append(b"data: [DONE]\n\n")
            elif kind is AbortEvent:
                assert isinstance(event, AbortEvent)
                reason = f"aborted by {event.by}: {event.reason}" if event.reason else f"aborted by {event.by}"
                out.append(self._frame({"type": "abort", "reason": reason}))
                out.append(b"data: [DONE]\n\n")
            elif kind is ModerationEvent:
                data = to_builtins(event)
                out.append(self._frame({"type": "data-moderation", "data": data, "transient": True}))
        return b"".join(out)

    def finish(self, cause: EndCause) -> bytes:
        """An ``abort`` chunk and ``[DONE]``: the message stopped before its end."""
        why = "the server is shutting down" if cause == "closed" else "the reader fell behind"
        return self._frame({"type": "abort", "reason": why}) + b"data: [DONE]\n\n"


_OPENAI_FINISH = {"stop": "stop", "length": "length", "tool_calls": "tool_calls", "content_filter": "content_filter"}


class OpenAIChunkEncoder:
    """OpenAI-compatible ``chat.completion.chunk`` server-sent events, then ``data: [DONE]``.

    Any OpenAI client reads it as a streamed chat completion: ``content``
    deltas as ``delta.content``, ``reasoning`` as ``delta.reasoning_content``
    (the DeepSeek/vLLM convention), ``tool`` fragments as ``tool_calls``
    (named as the fragments say, else *tool_name*). ``end`` sends ``finish_reason`` and,
    with *include_usage* (``stream_options.include_usage``), a usage chunk.
    ``error`` sends ``{"error": {...}}`` (the ``openai`` client raises
    ``APIError``); an ``abort`` by moderation ends with ``finish_reason:
    "content_filter"``, any other abort with an error of type ``aborted``.
    """

    media_type = "text/event-stream"
    single = True
    keepalive = b": keepalive\n\n"

    def __init__(self, *, include_usage: bool = False, tool_name: str = "tool", model: str | None = None) -> None:
        self.headers = dict(_NO_CACHE)
        self.include_usage = include_usage
        self.tool_name = tool_name
        self.model = model
        self._id = ""
        self._created = 0
        self._model = ""
        self._tools_started: set[int] = set()

    def begin(self) -> bytes:
        """Nothing: the role chunk is sent with the stream's ``start``."""
        return b""

    def resume(self, start: StartEvent) -> None:
        """Continue a stream after its start (a ``Last-Event-ID`` resume): chunks keep its id, model and time.

        The resumed response does not see *start*, so without this its chunks
        would name no model; the role chunk is not sent again.
        """
        self._id = f"chatcmpl-{start.stream}"
        self._created = int(start.ts)
        self._model = self.model or start.model

    def _call_id(self, index: int) -> str:
        stream = self._id.removeprefix("chatcmpl-")
        return f"call_{stream}" if index == 0 else f"call_{stream}_{index}"

    def _tool_call(self, fragment: ToolCallFragment) -> dict[str, Any]:
        """One ``tool_calls`` entry: id, type and name on a call's first chunk, then arguments only."""
        if fragment.index in self._tools_started:
            return {"index": fragment.index, "function": {"arguments": fragment.arguments}}
        self._tools_started.add(fragment.index)
        return {
            "index": fragment.index,
            "id": fragment.id or self._call_id(fragment.index),
            "type": "function",
            "function": {"name": fragment.name or self.tool_name, "arguments": fragment.arguments},
        }

    def _chunk(self, delta: dict[str, Any], finish_reason: str | None = None) -> bytes:
        body = {
            "id": self._id,
            "object": "chat.completion.chunk",
            "created": self._created,
            "model": self._model,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason}],
        }
        return b"data: " + _dumps(body) + b"\n\n"

    def _error(self, message: str, kind: str) -> bytes:
        return b"data: " + _dumps({"error": {"message": message, "type": kind, "code": kind}}) + b"\n\n"

    def encode(self, events: list[Event]) -> bytes:
        """The chunks for *events*, ending with ``[DONE]`` (or an error) after the terminal event."""
        out: list[bytes] = []
        for event in events:
            if not self._id:
                self._id = f"chatcmpl-{event.stream}"
                self._created = int(event.ts)
                self._model = self.model or (event.model if isinstance(event, StartEvent) else "")
                out.append(self._chunk({"role": "assistant", "content": ""}))
            kind = type(event)
            if kind is DeltaEvent:
                assert isinstance(event, DeltaEvent)
                if not event.text:
                    continue
                if event.channel == "content":
                    out.append(self._chunk({"content": event.text}))
                elif event.channel == "reasoning":
                    out.append(self._chunk({"reasoning_content": event.text}))
                else:
                    calls = [self._tool_call(fragment) for fragment in tool_fragments(event)]
                    if calls:
                        out.append(self._chunk({"tool_calls": calls}))
            elif kind is EndEvent:
                assert isinstance(event, EndEvent)
                reason = _OPENAI_FINISH.get(event.reason, "stop")
                out.append(self._chunk({}, reason))
                if self.include_usage and event.usage is not None:
                    usage = {
                        "prompt_tokens": event.usage.prompt_tokens or 0,
                        "completion_tokens": event.usage.completion_tokens or 0,
                        "total_tokens": event.usage.total_tokens
                        or (event.usage.prompt_tokens or 0) + (event.usage.completion_tokens or 0),
                    }
                    body = {
                        "id": self._id,
                        "object": "chat.completion.chunk",
                        "created": self._created,
                        "model": self._model,
                        "choices": [],
                        "usage": usage,
                    }
                    out.append(b"data: " + _dumps(body) + b"\n\n")
                out.append(b"data: [DONE]\n\n")
            elif kind is ErrorEvent:
                assert isinstance(event, ErrorEvent)
                out.append(self._error(event.message or event.kind, event.kind))
            elif kind is AbortEvent:
                assert isinstance(event, AbortEvent)
                if event.by == "moderation":
                    out.append(self._chunk({}, "content_filter"))
                    out.append(b"data: [DONE]\n\n")
                else:
                    detail = f"stream aborted by {event.by}" + (f": {event.reason}" if event.reason else "")
                    out.append(self._error(detail, "aborted"))
        return b"".join(out)

    def finish(self, cause: EndCause) -> bytes:
        """An error object: the completion stopped before its end."""
        why = "the server is shutting down" if cause == "closed" else "the reader fell behind"
        return self._error(f"stream interrupted: {why}", "interrupted")


# OpenAI's error `type` and `code` for the statuses this server answers with.
_OPENAI_ERRORS = {
    400: ("invalid_request_error", None),
    401: ("invalid_request_error", "invalid_api_key"),
    404: ("invalid_request_error", "stream_not_found"),
    409: ("invalid_request_error", "resume_position_evicted"),
    503: ("server_error", "service_unavailable"),
}


def error_body(fmt: str | Encoder, status: int, message: str) -> tuple[str, bytes]:
    """The ``(content-type, body)`` answering a request of format *fmt* that fails with *status*.

    The OpenAI format answers OpenAI's error object ``{"error": {"message",
    "type", "param", "code"}}``, so OpenAI clients raise with *message*;
    every other format answers *message* as plain text.
    """
    if fmt == "openai" or isinstance(fmt, OpenAIChunkEncoder):
        kind, code = _OPENAI_ERRORS.get(status, ("server_error" if status >= 500 else "invalid_request_error", None))
        error = {"message": message, "type": kind, "param": None, "code": code}
        return "application/json", _dumps({"error": error})
    return "text/plain; charset=utf-8", (message + "\n").encode()


def make_encoder(fmt: str, **options: Any) -> Encoder:
    """Return a new encoder for the format named *fmt* (see :data:`FORMATS`).

    Raises ``ValueError`` naming the known formats for an unknown name.
    """
    if fmt == "sse":
        return SSEEncoder(**options)
    if fmt == "ndjson":
        return NDJSONEncoder(**options)
    if fmt == "text":
        return TextEncoder(**options)
    if fmt == "ui":
        return UIMessageStreamEncoder(**options)
    if fmt == "openai":
        return OpenAIChunkEncoder(**options)
    raise ValueError(f"unknown format {fmt!r}; expected one of {', '.join(FORMATS)}")
