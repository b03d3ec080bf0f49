"""Anthropic's Messages format the other way round: bus events -> Anthropic SSE bytes.

:class:`AnthropicFormat` is registered as ``anthropic`` in the
``streambus.formats`` entry point group, so ``streambus serve-mock`` answers
``POST /v1/messages`` and ``GET /v1/models`` (for clients that send
``anthropic-version``) as Anthropic does, and the official ``anthropic``
client accepts the output (``messages.stream(...)`` and ``stream=True``).
It reads Anthropic answers too (:class:`streambus.formats.AnswerParsing`),
so ``streambus proxy`` fronts ``/v1/messages``.

Deltas open and close content blocks as the API does: consecutive deltas of
one channel share a block (``text``, ``thinking``, or one ``tool_use`` block
per call). The usage is known only at the end, so ``message_start`` carries
zero counts and ``message_delta`` the whole usage, which the client folds in.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from typing import Any, Final

import orjson

from streambus.events import AbortEvent, DeltaEvent, EndEvent, ErrorEvent, Event, StartEvent, Usage
from streambus.formats import Piece, tool_fragments
from streambus.wire import ToolCallFragment, merge_tool_calls

from ._protocol import RETRYABLE_ERRORS, STOP_REASONS, AnthropicStreamParser, message_pieces

__all__ = ["AnthropicFormat", "AnthropicStreamEncoder", "anthropic_sse", "usage_body"]

_ROUTES: Final = {"/v1/messages": "messages"}
_TO_STOP: Final = {"stop": "end_turn", "length": "max_tokens", "tool_calls": "tool_use", "content_filter": "refusal"}
_KNOWN_STOPS: Final = frozenset({*STOP_REASONS, "pause_turn"})
_ERROR_TYPES: Final = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    529: "overloaded_error",
}
_KNOWN_ERRORS: Final = frozenset({*_ERROR_TYPES.values(), *RETRYABLE_ERRORS})


def anthropic_sse(event: str, obj: Mapping[str, Any]) -> bytes:
    """One ``event: NAME`` / ``data: {json}`` server-sent event."""
    return b"event: " + event.encode() + b"\ndata: " + orjson.dumps(obj) + b"\n\n"


def _stop_reason(reason: str) -> str:
    if reason in _KNOWN_STOPS:
        return reason
    return _TO_STOP.get(reason, "end_turn")


def usage_body(usage: Usage | None) -> dict[str, int]:
    """Anthropic's usage object for *usage*: ``input_tokens`` without the cached ones."""
    if usage is None:
        return {"input_tokens": 0, "output_tokens": 0}
    read = usage.cached_input_tokens or 0
    written = usage.cache_creation_input_tokens or 0
    body = {"input_tokens": max(0, (usage.prompt_tokens or 0) - read - written)}
    if usage.cache_creation_input_tokens is not None:
        body["cache_creation_input_tokens"] = written
    if usage.cached_input_tokens is not None:
        body["cache_read_input_tokens"] = read
    body["output_tokens"] = usage.completion_tokens or 0
    return body


def _error_object(event: ErrorEvent | AbortEvent) -> dict[str, Any]:
    if isinstance(event, ErrorEvent):
        kind = event.kind if event.kind in _KNOWN_ERRORS else ("overloaded_error" if event.retryable else "api_error")
        return {"type": "error", "error": {"type": kind, "message": event.message or event.kind}}
    message = f"stream aborted by {event.by}" + (f": {event.reason}" if event.reason else "")
    return {"type": "error", "error": {"type": "api_error", "message": message}}


class AnthropicStreamEncoder:
    """Encodes one stream's events as an Anthropic Messages SSE body.

    Obtain one from :meth:`AnthropicFormat.stream_encoder`. ``error`` and
    ``abort`` become an ``error`` event (the client raises it); nothing
    follows it.
    """

    content_type = "text/event-stream"

    def __init__(self, *, model: str | None = None) -> None:
        self.model = model
        self._block = -1  # index of the open content block, -1: none yet
        self._open: str | int | None = None  # "text", "thinking", a tool call index, or None
        self._ids: dict[int, str] = {}

    def _close_block(self) -> bytes:
        if self._open is None:
            return b""
        self._open = None
        return anthropic_sse("content_block_stop", {"type": "content_block_stop", "index": self._block})

    def _open_block(self, kind: str | int, block: dict[str, Any]) -> bytes:
        out = self._close_block()
        self._block += 1
        self._open = kind
        return out + anthropic_sse(
            "content_block_start", {"type": "content_block_start", "index": self._block, "content_block": block}
        )

    def _delta(self, delta: dict[str, Any]) -> bytes:
        return anthropic_sse(
            "content_block_delta", {"type": "content_block_delta", "index": self._block, "delta": delta}
        )

    def _tool(self, fragment: ToolCallFragment) -> bytes:
        out = b""
        if self._open != fragment.index:
            call_id = fragment.id or self._ids.get(fragment.index) or f"toolu_{fragment.index:02d}"
            self._ids[fragment.index] = call_id
            block = {"type": "tool_use", "id": call_id, "name": fragment.name or "", "input": {}}
            out += self._open_block(fragment.index, block)
        if fragment.arguments:
            out += self._delta({"type": "input_json_delta", "partial_json": fragment.arguments})
        return out

    def encode(self, event: Event) -> bytes:
        """Bytes for *event* (``b""`` when Anthropic has nothing to say for it)."""
        if isinstance(event, DeltaEvent):
            if event.channel == "tool":
                return b"".join(self._tool(f) for f in tool_fragments(event))
            if event.channel == "reasoning":
                out = (
                    b""
                    if self._open == "thinking"
                    else self._open_block("thinking", {"type": "thinking", "thinking": "", "signature": ""})
                )
                return out + self._delta({"type": "thinking_delta", "thinking": event.text})
            out = b"" if self._open == "text" else self._open_block("text", {"type": "text", "text": ""})
            return out + self._delta({"type": "text_delta", "text": event.text})
        if isinstance(event, StartEvent):
            self.model = self.model or event.model
            message: dict[str, Any] = {
                "id": "msg_" + event.stream,
                "type": "message",
                "role": "assistant",
                "content": [],
                "model": self.model or "",
                "stop_reason": None,
                "stop_sequence": None,
                "usage": {"input_tokens": 0, "output_tokens": 0},
            }
            return anthropic_sse("message_start", {"type": "message_start", "message": message})
        if isinstance(event, EndEvent):
            delta = {"stop_reason": _stop_reason(event.reason), "stop_sequence": None}
            return (
                self._close_block()
                + anthropic_sse(
                    "message_delta", {"type": "message_delta", "delta": delta, "usage": usage_body(event.usage)}
                )
                + anthropic_sse("message_stop", {"type": "message_stop"})
            )
        if isinstance(event, ErrorEvent | AbortEvent):
            return anthropic_sse("error", _error_object(event))
        return b""

    def close(self) -> bytes:
        """Nothing: ``message_stop`` (or ``error``) already ended the stream."""
        return b""


class AnthropicFormat:
    """The Anthropic Messages HTTP format (``/v1/messages``, ``/v1/models``)."""

    name = "anthropic"
    routes: Mapping[str, str] = dict(_ROUTES)
    models_paths = ("/v1/models",)
    """Where clients list models; OpenAI's clients use the same path (see :meth:`claims`)."""
    credential_headers = ("x-api-key",)
    """Where Anthropic's clients put their key (:class:`streambus.formats.Credentials`)."""
    credential_params: tuple[str, ...] = ()

    def claims(self, headers: Mapping[str, str]) -> bool:
        """Whether a request on a path shared with another format comes from an Anthropic client.

        Anthropic's clients always send ``anthropic-version``.
        """
        return any(key.lower() == "anthropic-version" for key in headers)

    def stream_encoder(self, route: str, request: Mapping[str, Any]) -> AnthropicStreamEncoder:
        """An encoder for a streamed answer to *request* on ``/v1/messages``."""
        _check(route)
        model = request.get("model")
        return AnthropicStreamEncoder(model=model if isinstance(model, str) and model else None)

    def is_streaming(self, route: str, request: Mapping[str, Any]) -> bool:
        """Anthropic streams only when the request says ``"stream": true``."""
        return request.get("stream") is True

    def encode_stream(self, route: str, request: Mapping[str, Any], events: Sequence[Event]) -> bytes:
        """The whole streamed body for *events* at once (tests, fixtures)."""
        encoder = self.stream_encoder(route, request)
        return b"".join(encoder.encode(event) for event in events) + encoder.close()

    def assemble(self, route: str, request: Mapping[str, Any], events: Sequence[Event]) -> dict[str, Any]:
        """The ``stream: false`` body (a ``message``); a failed stream gives the error body."""
        _check(route)
        model = request.get("model") if isinstance(request.get("model"), str) else None
        blocks: list[dict[str, Any]] = []
        fragments: list[ToolCallFragment] = []
        end: EndEvent | None = None
        stream = ""
        for event in events:
            if isinstance(event, StartEvent):
                stream, model = event.stream, model or event.model
            elif isinstance(event, DeltaEvent):
                if event.channel == "tool":
                    fragments.extend(tool_fragments(event))
                    continue
                kind, key = ("thinking", "thinking") if event.channel == "reasoning" else ("text", "text")
                if blocks and blocks[-1]["type"] == kind:
                    blocks[-1][key] += event.text
                else:
                    blocks.append({"type": kind, key: event.text, **({"signature": ""} if kind == "thinking" else {})})
            elif isinstance(event, EndEvent):
                end = event
            elif isinstance(event, ErrorEvent | AbortEvent):
                return _error_object(event)
        for call in merge_tool_calls(fragments):
            blocks.append(
                {
                    "type": "tool_use",
                    "id": call.id or f"toolu_{call.index:02d}",
                    "name": call.name,
                    "input": orjson.loads(call.arguments) if call.arguments.strip() else {},
                }
            )
        return {
            "id": "msg_" + stream,
            "type": "message",
            "role": "assistant",
            "model": model or "",
            "content": blocks,
            "stop_reason": _stop_reason(end.reason if end is not None else "stop"),
            "stop_sequence": None,
            "usage": usage_body(end.usage if end is not None else None),
        }

    def stream_parser(self, route: str, request: Mapping[str, Any]) -> AnthropicStreamParser:
        """A parser of the streamed answer to *request* (for the proxy: :class:`streambus.formats.AnswerParsing`)."""
        _check(route)
        return AnthropicStreamParser()

    def body_pieces(self, route: str, request: Mapping[str, Any], body: bytes) -> list[Piece]:
        """The pieces of a ``stream: false`` answer (a ``message``).

        Raises :class:`~streambus.errors.WireError` if *body* is not one.
        """
        _check(route)
        return message_pieces(body)

    def usage_request(self, route: str, request: Mapping[str, Any]) -> None:
        """Nothing to ask: Anthropic always reports the usage (``message_start`` and ``message_delta``)."""
        return None

    def error_body(self, status: int, message: str) -> dict[str, Any]:
        """Anthropic's error body ``{"type": "error", "error": {"type", "message"}}`` for *status*."""
        kind = _ERROR_TYPES.get(status, "api_error" if status >= 500 else "invalid_request_error")
        return {"type": "error", "error": {"type": kind, "message": message}}

    def models_body(self, models: Sequence[str]) -> dict[str, Any]:
        """The ``GET /v1/models`` body listing *models*, one page."""
        data = [self.model_body(name, ()) for name in models]
        return {
            "data": data,
            "has_more": False,
            "first_id": models[0] if models else None,
            "last_id": models[-1] if models else None,
        }

    def model_body(self, model: str, channels: Collection[str]) -> dict[str, Any]:
        """The ``GET /v1/models/{id}`` body: Anthropic's model object."""
        return {"type": "model", "id": model, "display_name": model, "created_at": "2025-01-01T00:00:00Z"}


def _check(route: str) -> None:
    if route not in ("messages", "/v1/messages"):
        raise ValueError(f"route: Anthropic serves /v1/messages (or 'messages'), not {route!r}")
