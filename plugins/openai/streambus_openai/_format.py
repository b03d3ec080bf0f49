"""The OpenAI format the other way round: bus events -> OpenAI-compatible bytes.

:class:`OpenAIFormat` is registered as ``openai`` in the ``streambus.formats``
entry point group; the mock model server and the proxy load it with
``streambus.formats.load_format("openai")``. Streams are
``chat.completion.chunk`` (or legacy ``text_completion``) server-sent events
ended by ``data: [DONE]``, with a usage-only chunk first when the request
asked for ``stream_options.include_usage``; the official ``openai`` client
accepts the output. It also reads OpenAI answers for the proxy
(:class:`streambus.formats.AnswerParsing`).
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from typing import Any

import orjson

from streambus import formats
from streambus.events import AbortEvent, DeltaEvent, EndEvent, ErrorEvent, Event, StartEvent, Usage
from streambus.formats import tool_fragments
from streambus.wire import ToolCall, ToolCallFragment, merge_tool_calls

from ._protocol import OpenAIPieceParser, OpenAIRoute, UsageFilter, body_pieces
from ._responses import ResponsesStreamEncoder, ResponsesStreamParser, response_pieces

__all__ = ["DONE", "OpenAIFormat", "OpenAIStreamEncoder", "sse_chunk"]

_ROUTES: dict[str, OpenAIRoute] = {
    "/v1/chat/completions": "chat",
    "/v1/completions": "completions",
    "/v1/responses": "responses",
}

DONE = b"data: [DONE]\n\n"
"""The event that ends every successful OpenAI stream."""

_ERROR_TYPES = {
    400: ("invalid_request_error", None),
    401: ("invalid_request_error", "invalid_api_key"),
    403: ("permission_error", None),
    404: ("invalid_request_error", "model_not_found"),
    429: ("rate_limit_error", "rate_limit_exceeded"),
}


def sse_chunk(obj: Mapping[str, Any]) -> bytes:
    """One ``data: {json}`` event (compact JSON never contains a newline)."""
    return b"data: " + orjson.dumps(obj) + b"\n\n"


def _route(route: str) -> OpenAIRoute:
    if route in ("chat", "completions", "responses"):
        return route  # type: ignore[return-value]
    path = route if route.startswith("/v1/") else "/v1" + route
    try:
        return _ROUTES[path]
    except KeyError:
        raise ValueError(
            f"route: OpenAI serves {', '.join(_ROUTES)} (or 'chat', 'completions', 'responses'), not {route!r}"
        ) from None


def _usage_body(usage: Usage | None) -> dict[str, Any]:
    prompt = (usage.prompt_tokens if usage else None) or 0
    completion = (usage.completion_tokens if usage else None) or 0
    total = usage.total_tokens if usage and usage.total_tokens is not None else prompt + completion
    body: dict[str, Any] = {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": total}
    # The details objects only when the recording knows them: a client must not read a made-up 0.
    if usage is not None and usage.cached_input_tokens is not None:
        body["prompt_tokens_details"] = {"cached_tokens": usage.cached_input_tokens}
    if usage is not None and usage.reasoning_tokens is not None:
        body["completion_tokens_details"] = {"reasoning_tokens": usage.reasoning_tokens}
    return body


def _error_object(event: ErrorEvent | AbortEvent) -> dict[str, Any]:
    if isinstance(event, ErrorEvent):
        return {"message": event.message or event.kind, "type": "server_error", "param": None, "code": event.kind}
    message = f"stream aborted by {event.by}" + (f": {event.reason}" if event.reason else "")
    return {"message": message, "type": "server_error", "param": None, "code": "aborted"}


def _tool_entry(call: ToolCall, *, delta: bool) -> dict[str, Any]:
    entry: dict[str, Any] = {"index": call.index} if delta else {}
    if call.id is not None or not delta:
        entry["id"] = call.id if call.id is not None else f"call_{call.index}"
        entry["type"] = "function"
    function: dict[str, Any] = {}
    if call.name or not delta:
        function["name"] = call.name
    function["arguments"] = call.arguments
    entry["function"] = function
    return entry


class OpenAIStreamEncoder:
    """Encodes one stream's events as an OpenAI SSE response body.

    Obtain one from :meth:`OpenAIFormat.stream_encoder`. ``start`` writes the
    role chunk (chat); deltas write one chunk each (``content``,
    ``reasoning_content``, ``tool_calls``); ``end`` writes the
    ``finish_reason`` chunk and, when the request had
    ``stream_options.include_usage``, the usage-only chunk; :meth:`close`
    writes ``data: [DONE]`` after a normal end. ``error`` and ``abort`` write
    an ``{"error": {...}}`` event and no ``[DONE]``. The choice index comes
    from the ``start`` event's ``meta["choice"]`` (``n > 1``), else 0.
    """

    content_type = "text/event-stream"

    def __init__(self, route: OpenAIRoute, *, model: str | None = None, include_usage: bool = False) -> None:
        self.route: OpenAIRoute = route
        self.model = model
        self.include_usage = include_usage
        self.id = ""
        self.created = 0
        self.index = 0
        self._ended = False

    def _chunk(self, choices: list[dict[str, Any]], usage: Any = None, *, usage_key: bool = True) -> bytes:
        obj: dict[str, Any] = {
            "id": self.id,
            "object": "chat.completion.chunk" if self.route == "chat" else "text_completion",
            "created": self.created,
            "model": self.model or "",
            "choices": choices,
        }
        if self.include_usage and usage_key:
            obj["usage"] = usage
        return sse_chunk(obj)

    def _choice(self, delta: dict[str, Any] | str, finish: str | None = None) -> dict[str, Any]:
        if self.route == "chat":
            return {"index": self.index, "delta": delta, "logprobs": None, "finish_reason": finish}
        return {"text": delta, "index": self.index, "logprobs": None, "finish_reason": finish}

    def encode(self, event: Event) -> bytes:
        """Bytes for *event* (``b""`` when OpenAI has nothing to say for it)."""
        if isinstance(event, DeltaEvent):
            if self.route == "completions":
                return self._chunk([self._choice(event.text)]) if event.channel == "content" else b""
            if event.channel == "content":
                return self._chunk([self._choice({"content": event.text})])
            if event.channel == "reasoning":
                return self._chunk([self._choice({"reasoning_content": event.text})])
            calls = merge_tool_calls(tool_fragments(event))
            if not calls:
                return b""
            return self._chunk([self._choice({"tool_calls": [_tool_entry(c, delta=True) for c in calls]})])
        if isinstance(event, StartEvent):
            prefix = "chatcmpl-" if self.route == "chat" else "cmpl-"
            self.id = prefix + event.stream
            self.created = int(event.ts)
            self.model = self.model or event.model
            choice = event.meta.get("choice")
            self.index = choice if isinstance(choice, int) and not isinstance(choice, bool) else 0
            if self.route == "chat":
                return self._chunk([self._choice({"role": "assistant", "content": ""})])
            return b""
        if isinstance(event, EndEvent):
            self._ended = True
            out = self._chunk([self._choice({} if self.route == "chat" else "", event.reason)])
            if self.include_usage:
                out += self._chunk([], _usage_body(event.usage))
            return out
        if isinstance(event, ErrorEvent | AbortEvent):
            return sse_chunk({"error": _error_object(event)})
        return b""

    def close(self) -> bytes:
        """``data: [DONE]`` after a normal end; nothing after an error or abort."""
        return DONE if self._ended else b""


class OpenAIFormat:
    """The OpenAI HTTP format (``/v1/chat/completions``, ``/v1/completions``, ``/v1/responses``)."""

    name = "openai"
    routes: Mapping[str, str] = dict(_ROUTES)

    def stream_encoder(self, route: str, request: Mapping[str, Any]) -> OpenAIStreamEncoder | ResponsesStreamEncoder:
        """An encoder for a streamed answer to *request* on *route*.

        *route* is a path or ``chat``, ``completions``, ``responses``.
        """
        options = request.get("stream_options")
        include_usage = isinstance(options, Mapping) and options.get("include_usage") is True
        model = request.get("model")
        if _route(route) == "responses":
            return ResponsesStreamEncoder(model=model if isinstance(model, str) and model else None)
        return OpenAIStreamEncoder(
            _route(route), model=model if isinstance(model, str) and model else None, include_usage=include_usage
        )

    def is_streaming(self, route: str, request: Mapping[str, Any]) -> bool:
        """OpenAI streams only when the request says ``"stream": true``."""
        return request.get("stream") is True

    def encode_stream(self, route: str, request: Mapping[str, Any], events: Sequence[Event]) -> bytes:
        """The whole streamed body for *events* at once (tests, fixtures)."""
        encoder = self.stream_encoder(route, request)
        return b"".join(encoder.encode(event) for event in events) + encoder.close()

    def assemble(self, route: str, request: Mapping[str, Any], events: Sequence[Event]) -> dict[str, Any]:
        """The ``stream: false`` body (``chat.completion`` or ``text_completion``).

        A stream that ended with ``error`` or ``abort`` assembles to the
        error body ``{"error": {...}}`` (serve it with status 500).
        """
        kind = _route(route)
        model = request.get("model") if isinstance(request.get("model"), str) else None
        if kind == "responses":
            return ResponsesStreamEncoder(model=model).assemble(events)
        content: list[str] = []
        reasoning: list[str] = []
        fragments: list[ToolCallFragment] = []
        end: EndEvent | None = None
        stream, created, index = "", 0, 0
        for event in events:
            if isinstance(event, StartEvent):
                stream, created, model = event.stream, int(event.ts), model or event.model
                choice = event.meta.get("choice")
                index = choice if isinstance(choice, int) and not isinstance(choice, bool) else 0
            elif isinstance(event, DeltaEvent):
                if event.channel == "content":
                    content.append(event.text)
                elif event.channel == "reasoning":
                    reasoning.append(event.text)
                else:
                    fragments.extend(tool_fragments(event))
            elif isinstance(event, EndEvent):
                end = event
            elif isinstance(event, ErrorEvent | AbortEvent):
                return {"error": _error_object(event)}
        reason = end.reason if end is not None else "stop"
        if kind == "completions":
            choice_body: dict[str, Any] = {
                "text": "".join(content),
                "index": index,
                "logprobs": None,
                "finish_reason": reason,
            }
            obj = "text_completion"
            prefix = "cmpl-"
        else:
            calls = merge_tool_calls(fragments)
            message: dict[str, Any] = {
                "role": "assistant",
                "content": "".join(content) if content or not calls else None,
            }
            if reasoning:
                message["reasoning_content"] = "".join(reasoning)
            if calls:
                message["tool_calls"] = [_tool_entry(c, delta=False) for c in calls]
            choice_body = {"index": index, "message": message, "logprobs": None, "finish_reason": reason}
            obj = "chat.completion"
            prefix = "chatcmpl-"
        return {
            "id": prefix + stream,
            "object": obj,
            "created": created,
            "model": model or "",
            "choices": [choice_body],
            "usage": _usage_body(end.usage if end is not None else None),
        }

    def stream_parser(self, route: str, request: Mapping[str, Any]) -> OpenAIPieceParser:
        """A parser of the SSE answer on *route*, in provider-neutral pieces (for the proxy)."""
        kind = _route(route)
        if kind == "responses":
            return OpenAIPieceParser(parser=ResponsesStreamParser())
        return OpenAIPieceParser(kind)

    def body_pieces(self, route: str, request: Mapping[str, Any], body: bytes) -> list[formats.Piece]:
        """The pieces of a ``stream: false`` answer; :class:`~streambus.errors.WireError` if it is not one."""
        kind = _route(route)
        if kind == "responses":
            return response_pieces(body)
        return body_pieces(body, kind)

    def usage_request(self, route: str, request: Mapping[str, Any]) -> tuple[dict[str, Any], UsageFilter] | None:
        """For a streamed request without ``stream_options.include_usage``: the request asking for it,
        and the :class:`UsageFilter` that takes the usage back out of the client's bytes.

        ``None`` when the request already asks, does not stream (a whole answer
        always carries usage), has a ``stream_options`` that is not an
        object (the upstream answers that with its own error), or goes to the
        Responses API (``response.completed`` always carries the usage).
        """
        options = request.get("stream_options")
        if (
            _route(route) == "responses"
            or not self.is_streaming(route, request)
            or not (options is None or isinstance(options, Mapping))
        ):
            return None
        if options is not None and options.get("include_usage") is True:
            return None
        return {**request, "stream_options": {**(options or {}), "include_usage": True}}, UsageFilter()

    def error_body(self, status: int, message: str) -> dict[str, Any]:
        """OpenAI's error body ``{"error": {"message", "type", "param", "code"}}`` for *status*."""
        kind, code = _ERROR_TYPES.get(status, ("server_error" if status >= 500 else "invalid_request_error", None))
        return {"error": {"message": message, "type": kind, "param": None, "code": code}}

    def models_body(self, models: Sequence[str]) -> dict[str, Any]:
        """The ``/v1/models`` body listing *models*."""
        return {"object": "list", "data": [self.model_body(name, ()) for name in models]}

    def model_body(self, model: str, channels: Collection[str]) -> dict[str, Any]:
        """The ``GET /v1/models/{id}`` body: OpenAI's model object (*channels* are not part of it)."""
        return {"id": model, "object": "model", "created": 0, "owned_by": "streambus"}
