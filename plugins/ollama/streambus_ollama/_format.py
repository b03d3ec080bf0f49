"""Ollama's format the other way round: bus events -> Ollama response bytes.

:class:`OllamaFormat` is registered as ``ollama`` in the ``streambus.formats``
entry point group; the mock model server and the proxy load it with
``streambus.formats.load_format("ollama")``. Its encoders write exactly what
an Ollama server writes (key order included), so the official ``ollama``
client and raw NDJSON readers accept the output. It also reads Ollama's
answers for the proxy (:class:`streambus.formats.AnswerParsing`).
"""

from __future__ import annotations

import datetime
import hashlib
from collections.abc import Collection, Mapping, Sequence
from typing import Any

import orjson

from streambus import formats
from streambus.events import AbortEvent, DeltaEvent, EndEvent, ErrorEvent, Event, StartEvent
from streambus.formats import tool_fragments
from streambus.wire import ToolCallFragment, merge_tool_calls

from ._protocol import TIMING_KEYS, OllamaPieceParser, OllamaRoute, body_pieces

__all__ = ["OllamaFormat", "OllamaStreamEncoder", "created_at"]

_ROUTES: dict[str, OllamaRoute] = {"/api/chat": "chat", "/api/generate": "generate"}


def created_at(ts: float) -> str:
    """Ollama's ``created_at`` for a UNIX time: RFC 3339 in UTC with microseconds."""
    moment = datetime.datetime.fromtimestamp(ts, datetime.UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _route(route: str) -> OllamaRoute:
    if route in ("chat", "generate"):
        return route  # type: ignore[return-value]
    try:
        return _ROUTES[route]
    except KeyError:
        raise ValueError(f"route: Ollama serves {', '.join(_ROUTES)} (or 'chat', 'generate'), not {route!r}") from None


def _arguments(text: str) -> Any:
    try:
        return orjson.loads(text) if text.strip() else {}
    except orjson.JSONDecodeError:
        return None


def _final_fields(event: EndEvent) -> dict[str, Any]:
    fields: dict[str, Any] = {"done_reason": event.reason, "done": True}
    nanos = {key: round(event.timings[key] * 1e9) for key in TIMING_KEYS if key in event.timings}
    usage = event.usage
    if "total_duration" in nanos:
        fields["total_duration"] = nanos["total_duration"]
    if "load_duration" in nanos:
        fields["load_duration"] = nanos["load_duration"]
    if usage is not None and usage.prompt_tokens is not None:
        fields["prompt_eval_count"] = usage.prompt_tokens
    if "prompt_eval_duration" in nanos:
        fields["prompt_eval_duration"] = nanos["prompt_eval_duration"]
    if usage is not None and usage.completion_tokens is not None:
        fields["eval_count"] = usage.completion_tokens
    if "eval_duration" in nanos:
        fields["eval_duration"] = nanos["eval_duration"]
    return fields


def _terminal_message(event: ErrorEvent | AbortEvent) -> str:
    if isinstance(event, ErrorEvent):
        return event.message or event.kind
    return f"stream aborted by {event.by}" + (f": {event.reason}" if event.reason else "")


class _ToolBuffer:
    """Collects tool fragments until each call's arguments are a whole JSON object."""

    def __init__(self) -> None:
        self.fragments: dict[int, list[ToolCallFragment]] = {}

    def add(self, event: DeltaEvent) -> None:
        for fragment in tool_fragments(event):
            self.fragments.setdefault(fragment.index, []).append(fragment)

    def take(self, *, final: bool) -> list[dict[str, Any]]:
        ready: list[dict[str, Any]] = []
        for index in sorted(self.fragments):
            (call,) = merge_tool_calls(self.fragments[index])
            if not final and not call.arguments.strip():
                continue  # only the call's name so far: its arguments are still to come
            arguments = _arguments(call.arguments)
            if arguments is None and not final:
                continue
            del self.fragments[index]
            function: dict[str, Any] = {"name": call.name, "arguments": arguments if arguments is not None else {}}
            entry: dict[str, Any] = {"function": function}
            if call.id is not None:
                entry = {"id": call.id, "function": function}
            ready.append(entry)
        return ready


class OllamaStreamEncoder:
    """Encodes one stream's events as an Ollama NDJSON response body.

    Obtain one from :meth:`OllamaFormat.stream_encoder`. ``start`` and
    ``moderation`` events write nothing; every delta writes one line; ``end``
    writes the final ``done: true`` line with ``done_reason``, token counts and
    nanosecond durations; ``error`` and ``abort`` write ``{"error": ...}``.
    Tool deltas are held until a call's arguments form a whole JSON object
    (Ollama sends whole calls).
    """

    content_type = "application/x-ndjson"

    def __init__(self, route: OllamaRoute, model: str | None = None) -> None:
        self.route: OllamaRoute = route
        self.model = model
        self._tools = _ToolBuffer()

    def _line(self, obj: dict[str, Any]) -> bytes:
        return orjson.dumps(obj) + b"\n"

    def _head(self, ts: float) -> dict[str, Any]:
        return {"model": self.model or "", "created_at": created_at(ts)}

    def _chunk(self, ts: float, *, content: str = "", thinking: str | None = None, tools: Any = None) -> bytes:
        obj = self._head(ts)
        if self.route == "chat":
            message: dict[str, Any] = {"role": "assistant", "content": content}
            if thinking is not None:
                message["thinking"] = thinking
            if tools:
                message["tool_calls"] = tools
            obj["message"] = message
        else:
            obj["response"] = content
            if thinking is not None:
                obj["thinking"] = thinking
        obj["done"] = False
        return self._line(obj)

    def _flush_tools(self, ts: float, *, final: bool) -> bytes:
        ready = self._tools.take(final=final)
        if not ready or self.route != "chat":
            return b""
        return self._chunk(ts, tools=ready)

    def encode(self, event: Event) -> bytes:
        """Bytes for *event* (``b""`` when Ollama has nothing to say for it)."""
        if isinstance(event, DeltaEvent):
            if event.channel == "content":
                return self._chunk(event.ts, content=event.text)
            if event.channel == "reasoning":
                return self._chunk(event.ts, thinking=event.text)
            self._tools.add(event)
            return self._flush_tools(event.ts, final=False)
        if isinstance(event, StartEvent):
            self.model = self.model or event.model
            return b""
        if isinstance(event, EndEvent):
            head = self._flush_tools(event.ts, final=True)
            obj = self._head(event.ts)
            if self.route == "chat":
                obj["message"] = {"role": "assistant", "content": ""}
            else:
                obj["response"] = ""
            obj.update(_final_fields(event))
            return head + self._line(obj)
        if isinstance(event, ErrorEvent | AbortEvent):
            return self._line({"error": _terminal_message(event)})
        return b""

    def close(self) -> bytes:
        """Nothing follows the last line in Ollama's format."""
        return b""


class OllamaFormat:
    """Ollama's HTTP format (``/api/chat``, ``/api/generate``), for the mock server and proxy."""

    name = "ollama"
    routes: Mapping[str, str] = dict(_ROUTES)

    def stream_encoder(self, route: str, request: Mapping[str, Any]) -> OllamaStreamEncoder:
        """An encoder for a streamed answer to *request* on *route* (a path or ``chat``/``generate``)."""
        model = request.get("model")
        return OllamaStreamEncoder(_route(route), model if isinstance(model, str) and model else None)

    def is_streaming(self, route: str, request: Mapping[str, Any]) -> bool:
        """Ollama streams unless the request says ``"stream": false``."""
        return request.get("stream", True) is not False

    def encode_stream(self, route: str, request: Mapping[str, Any], events: Sequence[Event]) -> bytes:
        """The whole streamed body for *events* at once (tests, fixtures)."""
        encoder = self.stream_encoder(route, request)
        return b"".join(encoder.encode(event) for event in events) + encoder.close()

    def assemble(self, route: str, request: Mapping[str, Any], events: Sequence[Event]) -> dict[str, Any]:
        """The ``stream: false`` body: the whole message in one object.

        A stream that ended with ``error`` or ``abort`` assembles to
        ``{"error": ...}`` (serve it with status 500).
        """
        kind = _route(route)
        model = request.get("model") if isinstance(request.get("model"), str) else None
        content: list[str] = []
        thinking: list[str] = []
        tools = _ToolBuffer()
        end: EndEvent | None = None
        ts = 0.0
        for event in events:
            ts = event.ts
            if isinstance(event, StartEvent):
                model = model or event.model
            elif isinstance(event, DeltaEvent):
                if event.channel == "content":
                    content.append(event.text)
                elif event.channel == "reasoning":
                    thinking.append(event.text)
                else:
                    tools.add(event)
            elif isinstance(event, EndEvent):
                end = event
            elif isinstance(event, ErrorEvent | AbortEvent):
                return {"error": _terminal_message(event)}
        body: dict[str, Any] = {"model": model or "", "created_at": created_at(ts)}
        if kind == "chat":
            message: dict[str, Any] = {"role": "assistant", "content": "".join(content)}
            if thinking:
                message["thinking"] = "".join(thinking)
            calls = tools.take(final=True)
            if calls:
                message["tool_calls"] = calls
            body["message"] = message
        else:
            body["response"] = "".join(content)
            if thinking:
                body["thinking"] = "".join(thinking)
        body.update(_final_fields(end or EndEvent(stream="", seq=0, ts=ts)))
        return body

    def stream_parser(self, route: str, request: Mapping[str, Any]) -> OllamaPieceParser:
        """A parser of Ollama's NDJSON answer on *route*, in provider-neutral pieces (for the proxy)."""
        return OllamaPieceParser(_route(route))

    def body_pieces(self, route: str, request: Mapping[str, Any], body: bytes) -> list[formats.Piece]:
        """The pieces of a ``stream: false`` answer (one object); :class:`~streambus.errors.WireError` if not one."""
        return body_pieces(body, _route(route))

    def usage_request(self, route: str, request: Mapping[str, Any]) -> None:
        """Nothing to ask: Ollama's final object always carries the token counts."""
        return None

    def error_body(self, status: int, message: str) -> dict[str, Any]:
        """Ollama's error body: ``{"error": message}`` whatever the status."""
        return {"error": message}

    def models_body(self, models: Sequence[str]) -> dict[str, Any]:
        """The ``/api/tags`` body listing *models* (sizes and digests are synthetic: a mock serves no model files)."""
        return {"models": [_model_entry(name) for name in models]}

    def model_body(self, model: str, channels: Collection[str]) -> dict[str, Any]:
        """The ``/api/show`` body of *model*: ``capabilities`` from the recorded *channels*, the rest synthetic.

        ``completion`` always; ``thinking`` when its recordings have reasoning,
        ``tools`` when they have tool calls (clients such as ``ollama run``
        read these before they chat).
        """
        capabilities = ["completion"]
        if "tool" in channels:
            capabilities.append("tools")
        if "reasoning" in channels:
            capabilities.append("thinking")
        return {
            "license": "",
            "modelfile": f"# served by the streambus mock from a recording\nFROM {model}\n",
            "parameters": "",
            "template": "{{ .Prompt }}",
            "details": _details(),
            "model_info": {"general.architecture": "", "general.basename": model},
            "capabilities": capabilities,
            "modified_at": _MODIFIED_AT,
        }

    def loaded_body(self, models: Mapping[str, float]) -> dict[str, Any]:
        """The ``/api/ps`` body: *models* (name -> UNIX time its keep-alive ends) as loaded, sizes synthetic."""
        return {
            "models": [
                {
                    "name": name,
                    "model": name,
                    "size": 0,
                    "digest": hashlib.sha256(name.encode()).hexdigest(),
                    "details": _details(),
                    "expires_at": datetime.datetime.fromtimestamp(until, datetime.UTC).isoformat(),
                    "size_vram": 0,
                    "context_length": 4096,
                }
                for name, until in models.items()
            ]
        }


_MODIFIED_AT = "2026-01-01T00:00:00Z"


def _details() -> dict[str, Any]:
    return {
        "parent_model": "",
        "format": "gguf",
        "family": "",
        "families": None,
        "parameter_size": "",
        "quantization_level": "",
    }


def _model_entry(name: str) -> dict[str, Any]:
    return {
        "name": name,
        "model": name,
        "modified_at": _MODIFIED_AT,
        "size": 0,
        "digest": hashlib.sha256(name.encode()).hexdigest(),
        "details": _details(),
    }
