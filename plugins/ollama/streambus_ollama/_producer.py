"""The ``ollama`` producer: stream ``/api/chat`` or ``/api/generate`` into the bus.

aiohttp moves the bytes; :class:`~streambus_ollama.OllamaStreamParser` does
all the parsing. Every failure becomes one ``error`` event with a stable
``kind`` and the text already streamed is kept; retries happen only before
the first delta, so no text is ever duplicated.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any, Literal

import aiohttp
import anyio
import msgspec
import orjson
import structlog

from streambus import PluginBase
from streambus.plugins import PositiveFloat, PositiveInt
from streambus.producing import (
    Failure,
    ProducerOptions,
    RetryPolicy,
    check_http_url,
    check_messages,
    require_asyncio,
    status_failure,
    stream_attempt,
    stream_error_failure,
)

from ._protocol import DonePiece, ErrorPiece, OllamaRoute, OllamaStreamParser

if TYPE_CHECKING:
    from streambus import Bus, StreamWriter

__all__ = ["Failure", "OllamaProducer", "OllamaRequest", "require_asyncio"]

log = structlog.get_logger("streambus.ollama")

_ERROR_BODY_LIMIT = 64 * 1024


class OllamaRequest(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """One request of a ``requests = [...]`` list; unset keys take the producer's values."""

    model: str | None = None
    messages: list[dict[str, Any]] | None = None
    prompt: str | None = None
    system: str | None = None
    options: dict[str, Any] | None = None
    think: bool | Literal["low", "medium", "high"] | None = None
    meta: dict[str, Any] = {}


class OllamaProducer(PluginBase):
    """Stream answers from an Ollama server (``/api/chat`` or ``/api/generate``) into the bus.

    ::

        producer = OllamaProducer(model="llama3.2", messages=[{"role": "user", "content": "Hi"}])
        async with Bus() as bus:
            bus.start_producer(producer)

    Runs on asyncio only (aiohttp).
    """

    class Options(ProducerOptions):
        """Config keys of the ``ollama`` producer (and those every producer shares)."""

        url: str = "http://127.0.0.1:11434"
        """The Ollama server (``/api/...`` is appended)."""
        model: str = ""
        """The model to run (required here or in every request)."""
        endpoint: Literal["chat", "generate"] = "chat"
        """``chat`` (``/api/chat``, messages) or ``generate`` (``/api/generate``, prompt)."""
        messages: list[dict[str, Any]] | None = None
        """Chat history: ``{role, content}`` tables (``chat`` only)."""
        prompt: str | None = None
        """The prompt (``generate``); with ``chat``, appended as the last user message."""
        system: str | None = None
        """A system prompt (a leading system message for ``chat``)."""
        options: dict[str, Any] = msgspec.field(default_factory=dict)
        """Ollama model options (``temperature``, ``num_ctx``, ``seed``, ...)."""
        think: bool | Literal["low", "medium", "high"] | None = None
        """Ask a thinking model to think; its thoughts become ``reasoning`` deltas."""
        keep_alive: str | float | None = None
        """How long the server keeps the model loaded (``"5m"``, seconds, ``-1``)."""
        format: str | dict[str, Any] | None = None
        """``"json"`` or a JSON schema for structured output."""
        tools: list[dict[str, Any]] | None = None
        """Tool definitions (``chat``); calls become ``tool`` deltas."""
        headers: dict[str, str] = msgspec.field(default_factory=dict)
        """Extra HTTP headers (e.g. for an authenticating reverse proxy)."""
        first_chunk_timeout: PositiveFloat = 300.0
        """Seconds allowed from sending the request to the first chunk (model loading included)."""
        connect_timeout: PositiveFloat = 10.0
        """Seconds allowed to open the TCP connection."""
        requests: list[OllamaRequest] = msgspec.field(default_factory=list)
        """Several requests, one stream each; unset keys come from the keys above."""
        concurrency: PositiveInt = 4
        """How many of ``requests`` run at once."""

        def __post_init__(self) -> None:
            super().__post_init__()
            check_http_url("url", self.url)
            for i, request in enumerate(self.requests or [OllamaRequest()]):
                where = f"requests[{i}]." if self.requests else ""
                if not (request.model or self.model):
                    raise ValueError(f"{where}model: required (the model to run)")
                messages = request.messages if request.messages is not None else self.messages
                prompt = request.prompt if request.prompt is not None else self.prompt
                if self.endpoint == "generate":
                    if prompt is None:
                        raise ValueError(f"{where}prompt: required with endpoint = 'generate'")
                    if request.messages is not None or self.messages is not None:
                        raise ValueError(f"{where}messages: only for endpoint = 'chat'; use prompt")
                elif not messages and prompt is None:
                    raise ValueError(f"{where}messages: required with endpoint = 'chat' (or give a prompt)")
                check_messages(messages, prompt, where=where, roles="system, user, assistant, tool")

    keywords_override = True
    """Keywords override a given ``Options``: ``OllamaProducer(base, model="other")``."""

    def __init__(self, options: Options | None = None, /, **keys: Any) -> None:
        self.options: OllamaProducer.Options = self.resolve_options(options, keys)
        o = self.options
        self.retry = RetryPolicy(retries=o.retries, backoff=o.retry_backoff, max_wait=o.retry_max_wait)
        """When a failed request is tried again (from ``retries``, ``retry_backoff``, ``retry_max_wait``)."""
        self.stream_ids: list[str] = []
        """Ids of the streams produced so far, in start order."""

    # -- request building ------------------------------------------------------
    def requests(self) -> list[tuple[str, dict[str, Any], dict[str, Any]]]:
        """Every request as ``(model, JSON body, meta)``, in order."""
        o = self.options
        out = []
        many = len(o.requests) > 1
        for index, request in enumerate(o.requests or [OllamaRequest()]):
            model = request.model or o.model
            system = request.system if request.system is not None else o.system
            prompt = request.prompt if request.prompt is not None else o.prompt
            body: dict[str, Any] = {"model": model, "stream": True}
            if o.endpoint == "chat":
                messages = list(request.messages if request.messages is not None else o.messages or [])
                if system is not None:
                    messages.insert(0, {"role": "system", "content": system})
                if prompt is not None:
                    messages.append({"role": "user", "content": prompt})
                body["messages"] = messages
                if o.tools:
                    body["tools"] = o.tools
            else:
                body["prompt"] = prompt
                if system is not None:
                    body["system"] = system
            options = {**o.options, **(request.options or {})}
            if options:
                body["options"] = options
            think = request.think if request.think is not None else o.think
            if think is not None:
                body["think"] = think
            if o.keep_alive is not None:
                body["keep_alive"] = o.keep_alive
            if o.format is not None:
                body["format"] = o.format
            meta = {**o.meta, **request.meta}
            if many:
                meta.setdefault("request_index", index)
            out.append((model, body, meta))
        return out

    # -- running -----------------------------------------------------------------
    async def run(self, bus: Bus) -> None:
        """Run every request (``concurrency`` at a time), one bus stream each."""
        require_asyncio("ollama")
        o = self.options
        timeout = aiohttp.ClientTimeout(total=None, connect=None, sock_connect=o.connect_timeout)
        async with aiohttp.ClientSession(timeout=timeout) as session:
            limiter = anyio.Semaphore(o.concurrency)
            async with anyio.create_task_group() as tg:
                for model, body, meta in self.requests():
                    await limiter.acquire()
                    tg.start_soon(self._stream, bus, session, model, body, meta, limiter)

    async def _stream(
        self,
        bus: Bus,
        session: aiohttp.ClientSession,
        model: str,
        body: dict[str, Any],
        meta: dict[str, Any],
        limiter: anyio.Semaphore,
    ) -> None:
        try:
            async with bus.stream(model=model, provider="ollama", meta=meta) as w:
                self.stream_ids.append(w.stream)

                def retrying(failure: Failure, delay: float) -> None:
                    log.warning("ollama.retry", stream=w.stream, kind=failure.kind, error=failure.message, delay=delay)

                failure = await self.retry.run(
                    lambda: self._attempt(session, body, w),
                    may_retry=lambda _: w.seq == 0,  # once text is out, a retry would repeat it
                    on_retry=retrying,
                )
                if failure is not None:
                    log.warning("ollama.failed", stream=w.stream, kind=failure.kind, error=failure.message)
                    await w.error(failure.kind, failure.message, retryable=failure.retryable)
        finally:
            limiter.release()

    async def _attempt(self, session: aiohttp.ClientSession, body: dict[str, Any], w: StreamWriter) -> Failure | None:
        o = self.options
        route: OllamaRoute = o.endpoint

        async def publish(pieces: Iterable[Any]) -> Failure | None:
            return await _publish(pieces, w)

        return await stream_attempt(
            session,
            f"{o.url.rstrip('/')}/api/{route}",
            orjson.dumps(body),
            {"Content-Type": "application/json", "Accept": "application/x-ndjson", **o.headers},
            parser=OllamaStreamParser(route),
            handle=publish,
            status_failure=_status_failure,
            first_chunk_timeout=o.first_chunk_timeout,
            chunk_timeout=o.timeout,
            server=o.url,
            end_marker="the final done object",
            unit="a line",
        )


async def _publish(pieces: Any, w: StreamWriter) -> Failure | None:
    for piece in pieces:
        if isinstance(piece, DonePiece):
            await w.end(piece.reason, usage=piece.usage, timings=piece.timings)
            return None
        if isinstance(piece, ErrorPiece):
            return stream_error_failure(piece.message)
        await w.delta(piece.text, channel=piece.channel)
    return None


async def _status_failure(response: aiohttp.ClientResponse, deadline: float) -> Failure:
    status = response.status
    raw = b""
    with anyio.CancelScope(deadline=deadline):
        with contextlib.suppress(aiohttp.ClientError):
            raw = await response.content.read(_ERROR_BODY_LIMIT)
    return status_failure(status, raw, response.reason)
