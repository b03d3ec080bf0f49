"""The Gemini format the other way round: bus events -> ``streamGenerateContent`` SSE bytes.

:class:`GeminiFormat` is registered as ``gemini`` in the ``streambus.formats``
entry point group, so ``streambus serve-mock`` answers
``POST /v1beta/models/{model}:streamGenerateContent`` (and
``:generateContent``), ``GET /v1beta/models`` and ``GET
/v1beta/models/{model}`` as the Gemini API does; the official
``google-genai`` client accepts the output. Gemini sends a function call
whole, so tool fragments are held until the call is complete (the next
non-tool delta, another call, or the end). It reads Gemini answers too
(:class:`streambus.formats.AnswerParsing`), so ``streambus proxy`` fronts
``streamGenerateContent`` and ``generateContent``.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from typing import Any, Final

import orjson

from streambus.events import AbortEvent, DeltaEvent, EndEvent, ErrorEvent, Event, StartEvent, Usage
from streambus.formats import Piece, tool_fragments
from streambus.wire import ToolCall, ToolCallFragment, merge_tool_calls

from ._protocol import GeminiStreamParser, chunk_pieces

__all__ = ["GeminiFormat", "GeminiStreamEncoder", "gemini_sse", "usage_metadata"]

# google-genai uses v1 when given a base_url and no api_version, v1beta otherwise: serve both.
_ROUTES: Final = {
    "/v1beta/models/{model}:streamGenerateContent": "stream",
    "/v1beta/models/{model}:generateContent": "generate",
    "/v1/models/{model}:streamGenerateContent": "stream",
    "/v1/models/{model}:generateContent": "generate",
}
_TO_FINISH: Final = {"stop": "STOP", "tool_calls": "STOP", "length": "MAX_TOKENS", "content_filter": "SAFETY"}
_STATUS: Final = {
    400: "INVALID_ARGUMENT",
    401: "UNAUTHENTICATED",
    403: "PERMISSION_DENIED",
    404: "NOT_FOUND",
    429: "RESOURCE_EXHAUSTED",
    503: "UNAVAILABLE",
}


def gemini_sse(obj: Mapping[str, Any]) -> bytes:
    """One ``data: {json}`` event, with the CRLF line ends the Gemini API writes."""
    return b"data: " + orjson.dumps(obj) + b"\r\n\r\n"


def usage_metadata(usage: Usage | None) -> dict[str, int]:
    """Gemini's ``usageMetadata`` for *usage*: ``candidatesTokenCount`` without the thoughts."""
    if usage is None:
        return {}
    thoughts = usage.reasoning_tokens
    body = {"promptTokenCount": usage.prompt_tokens or 0}
    body["candidatesTokenCount"] = max(0, (usage.completion_tokens or 0) - (thoughts or 0))
    if usage.cached_input_tokens is not None:
        body["cachedContentTokenCount"] = usage.cached_input_tokens
    if thoughts is not None:
        body["thoughtsTokenCount"] = thoughts
    body["totalTokenCount"] = (
        usage.total_tokens
        if usage.total_tokens is not None
        else body["promptTokenCount"] + (usage.completion_tokens or 0)
    )
    return body


def _call_part(call: ToolCall) -> dict[str, Any]:
    function: dict[str, Any] = {
        "name": call.name,
        "args": orjson.loads(call.arguments) if call.arguments.strip() else {},
    }
    if call.id is not None:
        function["id"] = call.id
    return {"functionCall": function}


def _error(event: ErrorEvent | AbortEvent) -> dict[str, Any]:
    if isinstance(event, ErrorEvent):
        status = "UNAVAILABLE" if event.retryable else "INTERNAL"
        return {
            "error": {"code": 503 if event.retryable else 500, "message": event.message or event.kind, "status": status}
        }
    message = f"stream aborted by {event.by}" + (f": {event.reason}" if event.reason else "")
    return {"error": {"code": 499, "message": message, "status": "CANCELLED"}}


class GeminiStreamEncoder:
    """Encodes one stream's events as a ``streamGenerateContent?alt=sse`` body.

    Obtain one from :meth:`GeminiFormat.stream_encoder`. Each delta is one
    chunk; ``end`` writes the chunk with ``finishReason`` and
    ``usageMetadata``; ``error`` and ``abort`` write an ``{"error": ...}``
    chunk, which the client raises.
    """

    content_type = "text/event-stream"

    def __init__(self, *, model: str | None = None) -> None:
        self.model = model
        self.id = ""
        self._pending: list[ToolCallFragment] = []

    def _chunk(self, parts: list[dict[str, Any]] | None, **extra: Any) -> bytes:
        candidate: dict[str, Any] = {"index": 0}
        if parts is not None:
            candidate["content"] = {"parts": parts, "role": "model"}
        candidate.update(extra.pop("candidate", {}))
        return gemini_sse({"candidates": [candidate], **extra, "modelVersion": self.model or "", "responseId": self.id})

    def _flush(self, keep: int | None = None) -> bytes:
        # Send every held call but the one still being streamed (index *keep*).
        done = [f for f in self._pending if f.index != keep]
        if not done:
            return b""
        self._pending = [f for f in self._pending if f.index == keep]
        return self._chunk([_call_part(call) for call in merge_tool_calls(done)])

    def encode(self, event: Event) -> bytes:
        """Bytes for *event* (``b""`` when Gemini has nothing to say for it yet)."""
        if isinstance(event, DeltaEvent):
            if event.channel == "tool":
                out = b""
                for fragment in tool_fragments(event):
                    if fragment.name is not None or fragment.id is not None:
                        out += self._flush(keep=fragment.index)
                    self._pending.append(fragment)
                return out
            part: dict[str, Any] = {"text": event.text}
            if event.channel == "reasoning":
                part["thought"] = True
            return self._flush() + self._chunk([part])
        if isinstance(event, StartEvent):
            self.id = event.stream
            self.model = self.model or event.model
            return b""
        if isinstance(event, EndEvent):
            finish = _TO_FINISH.get(event.reason, event.reason.upper() if event.reason.isalpha() else "OTHER")
            extra: dict[str, Any] = {"candidate": {"finishReason": finish}}
            if event.usage is not None:
                extra["usageMetadata"] = usage_metadata(event.usage)
            return self._flush() + self._chunk(None, **extra)
        if isinstance(event, ErrorEvent | AbortEvent):
            return gemini_sse(_error(event))
        return b""

    def close(self) -> bytes:
        """Nothing: the Gemini stream simply ends after its last chunk."""
        return b""


class GeminiFormat:
    """The Gemini API's HTTP format (``/v1beta/models/{model}:streamGenerateContent``)."""

    name = "gemini"
    routes: Mapping[str, str] = dict(_ROUTES)
    models_paths = ("/v1beta/models", "/v1/models")
    """Where the ``google-genai`` client lists (and gets) models; ``/v1/models`` is shared (see :meth:`claims`)."""
    credential_headers = ("x-goog-api-key",)
    """Where Gemini's clients put their key (:class:`streambus.formats.Credentials`)..."""
    credential_params = ("key",)
    """... or in the URL, ``?key=``."""

    def claims(self, headers: Mapping[str, str]) -> bool:
        """Whether a request comes from a Gemini client: they send ``x-goog-api-key``."""
        return any(key.lower() == "x-goog-api-key" for key in headers)

    def stream_encoder(self, route: str, request: Mapping[str, Any]) -> GeminiStreamEncoder:
        """An encoder for a streamed answer (the model comes from the path, so from the ``start`` event)."""
        _kind(route)
        return GeminiStreamEncoder()

    def is_streaming(self, route: str, request: Mapping[str, Any]) -> bool:
        """Gemini streams on ``:streamGenerateContent``, never on ``:generateContent``."""
        return _kind(route) == "stream"

    def encode_stream(self, route: str, request: Mapping[str, Any], events: Sequence[Event]) -> bytes:
        """The whole streamed body for *events* at once (tests, fixtures)."""
        encoder = self.stream_encoder(route, request)
        return b"".join(encoder.encode(event) for event in events) + encoder.close()

    def assemble(self, route: str, request: Mapping[str, Any], events: Sequence[Event]) -> dict[str, Any]:
        """The ``:generateContent`` body; a failed stream gives the error body."""
        parts: list[dict[str, Any]] = []
        fragments: list[ToolCallFragment] = []
        end: EndEvent | None = None
        model, stream = "", ""
        for event in events:
            if isinstance(event, StartEvent):
                model, stream = event.model, event.stream
            elif isinstance(event, DeltaEvent):
                if event.channel == "tool":
                    fragments.extend(tool_fragments(event))
                    continue
                thought = event.channel == "reasoning"
                if parts and parts[-1].get("thought", False) == thought and "text" in parts[-1]:
                    parts[-1]["text"] += event.text
                else:
                    parts.append({"text": event.text, **({"thought": True} if thought else {})})
            elif isinstance(event, EndEvent):
                end = event
            elif isinstance(event, ErrorEvent | AbortEvent):
                return _error(event)
        parts.extend(_call_part(call) for call in merge_tool_calls(fragments))
        reason = end.reason if end is not None else "stop"
        body: dict[str, Any] = {
            "candidates": [
                {
                    "content": {"parts": parts, "role": "model"},
                    "finishReason": _TO_FINISH.get(reason, reason.upper()),
                    "index": 0,
                }
            ],
            "modelVersion": model,
            "responseId": stream,
        }
        if end is not None and end.usage is not None:
            body["usageMetadata"] = usage_metadata(end.usage)
        return body

    def stream_parser(self, route: str, request: Mapping[str, Any]) -> GeminiStreamParser:
        """A parser of the ``streamGenerateContent?alt=sse`` answer.

        For the proxy (:class:`streambus.formats.AnswerParsing`), which reads
        the server-sent events Gemini sends with ``alt=sse``.
        """
        _kind(route)
        return GeminiStreamParser()

    def body_pieces(self, route: str, request: Mapping[str, Any], body: bytes) -> list[Piece]:
        """The pieces of a ``:generateContent`` answer; :class:`~streambus.errors.WireError` if it is not one."""
        _kind(route)
        return chunk_pieces(body)

    def usage_request(self, route: str, request: Mapping[str, Any]) -> None:
        """Nothing to ask: Gemini always reports ``usageMetadata``."""
        return None

    def error_body(self, status: int, message: str) -> dict[str, Any]:
        """Gemini's error body ``{"error": {"code", "message", "status"}}``."""
        return {"error": {"code": status, "message": message, "status": _STATUS.get(status, "INTERNAL")}}

    def models_body(self, models: Sequence[str]) -> dict[str, Any]:
        """The ``GET /v1beta/models`` body listing *models*."""
        return {"models": [self.model_body(name, ()) for name in models]}

    def model_body(self, model: str, channels: Collection[str]) -> dict[str, Any]:
        """The ``GET /v1beta/models/{model}`` body: Gemini's model object."""
        return {
            "name": f"models/{model}",
            "displayName": model,
            "supportedGenerationMethods": ["generateContent", "streamGenerateContent"],
            "thinking": "reasoning" in channels,
        }


def _kind(route: str) -> str:
    if route in ("stream", "generate"):
        return route
    kind = _ROUTES.get(route)
    if kind is None:
        if route.endswith(":streamGenerateContent"):
            return "stream"
        if route.endswith(":generateContent"):
            return "generate"
        raise ValueError(f"route: Gemini serves {', '.join(_ROUTES)} (or 'stream', 'generate'), not {route!r}")
    return kind
