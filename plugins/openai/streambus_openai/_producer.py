"""The ``openai`` producer: stream any OpenAI-compatible server into the bus.

aiohttp moves the bytes; :class:`~streambus_openai.OpenAIStreamParser` does
all the parsing. ``n > 1`` gives one bus stream per choice. Every failure
becomes one ``error`` event per choice with a stable ``kind`` and the text
already streamed is kept; retries happen only before the first delta, so no
text is ever duplicated.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any, Literal, TypeAlias

import aiohttp
import anyio
import msgspec
import orjson
import structlog
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from streambus import PluginBase, Usage
from streambus.plugins import NonNegativeFloat, PositiveInt
from streambus.producing import (
    Failure,
    HttpProducerOptions,
    RetryPolicy,
    check_messages,
    require_asyncio,
    status_failure,
    stream_attempt,
    stream_error_failure,
)

from ._protocol import DonePiece, ErrorPiece, FinishPiece, OpenAIRoute, OpenAIStreamParser, Piece, UsagePiece
from ._responses import ResponsesStreamParser

if TYPE_CHECKING:
    from streambus import Bus

__all__ = ["Failure", "OpenAIProducer", "OpenAIRequest", "require_asyncio"]

log = structlog.get_logger("streambus.openai")

_ERROR_BODY_LIMIT = 64 * 1024
_PATHS: dict[OpenAIRoute, str] = {"chat": "/chat/completions", "completions": "/completions", "responses": "/responses"}


class _End(msgspec.Struct, frozen=True):
    reason: str
    usage: Usage | None


class _Text(msgspec.Struct, frozen=True):
    text: str
    channel: Literal["content", "reasoning", "tool"]


_Item: TypeAlias = _Text | _End | Failure


class OpenAIRequest(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """One request of a ``requests = [...]`` list; unset keys take the producer's values."""

    model: str | None = None
    messages: list[dict[str, Any]] | None = None
    prompt: str | None = None
    system: str | None = None
    temperature: NonNegativeFloat | None = None
    max_tokens: PositiveInt | None = None
    n: PositiveInt | None = None
    extra_body: dict[str, Any] = {}
    meta: dict[str, Any] = {}


class _Choices:
    """What the reader of one request shares with the per-choice writer tasks."""

    def __init__(self, n: int) -> None:
        self.listening = n
        self.finished = False
        self.reader = anyio.CancelScope()

    def left_early(self) -> None:
        # When every choice was aborted nobody wants the rest: stop reading,
        # which closes the HTTP response at once.
        self.listening -= 1
        if self.listening == 0 and not self.finished:
            self.reader.cancel()


class OpenAIProducer(PluginBase):
    """Stream completions from an OpenAI-compatible server into the bus.

    ::

        producer = OpenAIProducer(base_url="http://127.0.0.1:8000/v1", model="qwen",
                                  messages=[{"role": "user", "content": "Hi"}])
        async with Bus() as bus:
            bus.start_producer(producer)

    ``messages`` use ``/chat/completions``; a ``prompt`` alone uses the
    legacy ``/completions``. Runs on asyncio only (aiohttp).
    """

    class Options(HttpProducerOptions):
        """Config keys of the ``openai`` producer (and those every HTTP producer shares)."""

        base_url: str = "https://api.openai.com/v1"
        """The API root; ``/chat/completions`` or ``/completions`` is appended."""
        model: str = ""
        """The model to run (required here or in every request)."""
        api_key_env: str | None = "OPENAI_API_KEY"
        """The environment variable holding the API key (sent as a bearer token, never logged)."""
        endpoint: Literal["auto", "chat", "completions", "responses"] = "auto"
        """``chat``, ``completions`` (legacy), ``responses`` (the Responses API, ``/responses``),
        or ``auto``: ``completions`` when only a prompt is given, else ``chat``."""
        messages: list[dict[str, Any]] | None = None
        """Chat history: ``{role, content}`` tables."""
        prompt: str | None = None
        """The legacy completions prompt; with ``chat``, appended as the last user message."""
        system: str | None = None
        """A system prompt (a leading system message for ``chat``)."""
        temperature: NonNegativeFloat | None = None
        """Sampling temperature."""
        max_tokens: PositiveInt | None = None
        """The completion's token limit."""
        n: PositiveInt = 1
        """Choices per request; each becomes its own bus stream (``meta.choice``)."""
        tools: list[dict[str, Any]] | None = None
        """Tool definitions (``chat``); calls become ``tool`` deltas."""
        extra_body: dict[str, Any] = msgspec.field(default_factory=dict)
        """More request fields, merged last (``top_p``, ``seed``, server-specific keys)."""
        include_usage: bool = True
        """Ask for the usage chunk (``stream_options.include_usage``)."""
        requests: list[OpenAIRequest] = msgspec.field(default_factory=list)
        """Several requests, one stream (per choice) each; unset keys come from the keys above."""
        concurrency: PositiveInt = 4
        """How many of ``requests`` run at once."""

        def __post_init__(self) -> None:
            super().__post_init__()
            for i, request in enumerate(self.requests or [OpenAIRequest()]):
                where = f"requests[{i}]." if self.requests else ""
                if not (request.model or self.model):
                    raise ValueError(f"{where}model: required (the model to run)")
                messages = request.messages if request.messages is not None else self.messages
                prompt = request.prompt if request.prompt is not None else self.prompt
                if self.endpoint == "completions" and prompt is None:
                    raise ValueError(f"{where}prompt: required with endpoint = 'completions'")
                if self.endpoint == "responses" and (request.n or self.n) != 1:
                    raise ValueError(f"{where}n: the Responses API answers with one choice; leave n at 1")
                if request.n is not None and request.n < 1:
                    raise ValueError(f"{where}n: must be at least 1, got {request.n}")
                check_messages(messages, prompt, where=where, roles="system, user, assistant, tool")

    keywords_override = True
    """Keywords override a given ``Options``: ``OpenAIProducer(base, model="other")``."""

    def __init__(self, options: Options | None = None, /, **keys: Any) -> None:
        self.options: OpenAIProducer.Options = self.resolve_options(options, keys)
        o = self.options
        self.retry = RetryPolicy(retries=o.retries, backoff=o.retry_backoff, max_wait=o.retry_max_wait)
        """When a failed request is tried again (from ``retries``, ``retry_backoff``, ``retry_max_wait``)."""
        self.stream_ids: list[str] = []
        """Ids of the streams produced so far, in start order."""

    # -- request building --------------------------------------------------------
    def requests(self) -> list[tuple[OpenAIRoute, str, dict[str, Any], dict[str, Any]]]:
        """Every request as ``(route, model, JSON body, meta)``, in order."""
        o = self.options
        out: list[tuple[OpenAIRoute, str, dict[str, Any], dict[str, Any]]] = []
        many = len(o.requests) > 1
        for index, request in enumerate(o.requests or [OpenAIRequest()]):
            model = request.model or o.model
            messages = request.messages if request.messages is not None else o.messages
            prompt = request.prompt if request.prompt is not None else o.prompt
            system = request.system if request.system is not None else o.system
            route: OpenAIRoute = ("completions" if not messages else "chat") if o.endpoint == "auto" else o.endpoint
            body: dict[str, Any] = {"model": model}
            if route == "responses":
                # The Responses API takes the conversation as `input` and the system prompt as `instructions`.
                conversation = list(messages or [])
                if prompt is not None:
                    conversation.append({"role": "user", "content": prompt})
                body["input"] = conversation
                if system is not None:
                    body["instructions"] = system
                if o.tools:
                    body["tools"] = o.tools
            elif route == "chat":
                chat = list(messages or [])
                if system is not None:
                    chat.insert(0, {"role": "system", "content": system})
                if prompt is not None:
                    chat.append({"role": "user", "content": prompt})
                body["messages"] = chat
                if o.tools:
                    body["tools"] = o.tools
            else:
                body["prompt"] = prompt if system is None else f"{system}\n\n{prompt}"
            body["stream"] = True
            if o.include_usage and route != "responses":  # Responses always reports usage
                body["stream_options"] = {"include_usage": True}
            temperature = request.temperature if request.temperature is not None else o.temperature
            if temperature is not None:
                body["temperature"] = temperature
            max_tokens = request.max_tokens if request.max_tokens is not None else o.max_tokens
            if max_tokens is not None:
                body["max_output_tokens" if route == "responses" else "max_tokens"] = max_tokens
            n = request.n if request.n is not None else o.n
            if n != 1:
                body["n"] = n
            body.update(o.extra_body)
            body.update(request.extra_body)
            meta = {**o.meta, **request.meta}
            if many:
                meta.setdefault("request_index", index)
            out.append((route, model, body, meta))
        return out

    def _headers(self) -> dict[str, str]:
        headers = {"Content-Type": "application/json", "Accept": "text/event-stream", **self.options.headers}
        name = self.options.api_key_env
        key = os.environ.get(name) if name else None
        if key:
            headers["Authorization"] = f"Bearer {key}"
        return headers

    # -- running -----------------------------------------------------------------
    async def run(self, bus: Bus) -> None:
        """Run every request (``concurrency`` at a time), one bus stream per choice."""
        require_asyncio("openai")
        o = self.options
        timeout = aiohttp.ClientTimeout(total=None, connect=None, sock_connect=o.connect_timeout)
        async with aiohttp.ClientSession(timeout=timeout) as session:
            limiter = anyio.Semaphore(o.concurrency)
            async with anyio.create_task_group() as tg:
                for route, model, body, meta in self.requests():
                    await limiter.acquire()
                    tg.start_soon(self._request, bus, session, route, model, body, meta, limiter)

    async def _request(
        self,
        bus: Bus,
        session: aiohttp.ClientSession,
        route: OpenAIRoute,
        model: str,
        body: dict[str, Any],
        meta: dict[str, Any],
        limiter: anyio.Semaphore,
    ) -> None:
        n = int(body.get("n", 1))
        choices = _Choices(n)
        senders: list[MemoryObjectSendStream[_Item]] = []
        try:
            async with anyio.create_task_group() as tg:
                for index in range(n):
                    send, receive = anyio.create_memory_object_stream[_Item](64)
                    senders.append(send)
                    choice_meta = {**meta, "choice": index, "n": n} if n > 1 else meta
                    tg.start_soon(self._choice, bus, model, choice_meta, receive, choices)
                try:
                    with choices.reader:
                        await self._read(session, route, body, senders)
                finally:
                    choices.finished = True
                    for send in senders:
                        send.close()
        finally:
            limiter.release()

    async def _choice(
        self,
        bus: Bus,
        model: str,
        meta: dict[str, Any],
        receive: MemoryObjectReceiveStream[_Item],
        choices: _Choices,
    ) -> None:
        ended = False
        try:
            async with bus.stream(model=model, provider="openai", meta=meta) as w, receive:
                self.stream_ids.append(w.stream)
                async for item in receive:
                    if isinstance(item, _Text):
                        await w.delta(item.text, channel=item.channel)
                        continue
                    ended = True
                    if isinstance(item, _End):
                        await w.end(item.reason, usage=item.usage)
                    else:
                        log.warning("openai.failed", stream=w.stream, kind=item.kind, error=item.message)
                        await w.error(item.kind, item.message, retryable=item.retryable)
                    return
        finally:
            if not ended:
                choices.left_early()

    async def _read(
        self,
        session: aiohttp.ClientSession,
        route: OpenAIRoute,
        body: dict[str, Any],
        senders: list[MemoryObjectSendStream[_Item]],
    ) -> None:
        progress = _Progress(len(senders))

        async def attempt() -> Failure | None:
            nonlocal progress
            progress = _Progress(len(senders))
            return await self._attempt(session, route, body, senders, progress)

        def retrying(failure: Failure, delay: float) -> None:
            url = self.options.base_url
            log.warning("openai.retry", url=url, kind=failure.kind, error=failure.message, delay=delay)

        failure = await self.retry.run(
            attempt,
            may_retry=lambda _: not progress.delta_sent,  # once text is out, a retry would repeat it
            on_retry=retrying,
        )
        if failure is not None:
            await _broadcast(senders, failure)

    async def _attempt(
        self,
        session: aiohttp.ClientSession,
        route: OpenAIRoute,
        body: dict[str, Any],
        senders: list[MemoryObjectSendStream[_Item]],
        progress: _Progress,
    ) -> Failure | None:
        o = self.options

        async def apply(pieces: Iterable[Any]) -> Failure | None:
            return await progress.apply(pieces, senders)

        return await stream_attempt(
            session,
            o.base_url.rstrip("/") + _PATHS[route],
            orjson.dumps(body),
            self._headers(),
            parser=ResponsesStreamParser() if route == "responses" else OpenAIStreamParser(route),
            handle=apply,
            status_failure=_status_failure,
            first_chunk_timeout=o.first_chunk_timeout,
            chunk_timeout=o.timeout,
            server=o.base_url,
            end_marker="response.completed" if route == "responses" else "data: [DONE]",
            unit="an event",
        )


class _Progress:
    """One attempt's view of the stream: finish reasons and usage until ``[DONE]``."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.delta_sent = False
        self.reasons: dict[int, str] = {}
        self.usage: Usage | None = None

    async def apply(self, pieces: Iterable[Piece], senders: list[MemoryObjectSendStream[_Item]]) -> Failure | None:
        for piece in pieces:
            if isinstance(piece, DonePiece):
                for index, send in enumerate(senders):
                    await _send(send, _End(self.reasons.get(index, "stop"), self.usage if index == 0 else None))
                return None
            if isinstance(piece, FinishPiece):
                self.reasons[piece.index] = piece.reason
            elif isinstance(piece, UsagePiece):
                self.usage = piece.usage
            elif isinstance(piece, ErrorPiece):
                return stream_error_failure(piece.message, piece.code)
            else:
                if not 0 <= piece.index < self.n:
                    return Failure("malformed", f"chunk for choice {piece.index}, but the request asked for n={self.n}")
                self.delta_sent = True
                await _send(senders[piece.index], _Text(piece.text, piece.channel))
        return None


async def _send(send: MemoryObjectSendStream[_Item], item: _Item) -> None:
    # A choice that was aborted no longer listens; the others go on.
    with contextlib.suppress(anyio.BrokenResourceError, anyio.ClosedResourceError):
        await send.send(item)


async def _broadcast(senders: list[MemoryObjectSendStream[_Item]], item: _Item) -> None:
    for send in senders:
        await _send(send, item)


async def _status_failure(response: aiohttp.ClientResponse, deadline: float) -> Failure:
    status = response.status
    raw = b""
    with anyio.CancelScope(deadline=deadline):
        try:
            raw = await response.content.read(_ERROR_BODY_LIMIT)
        except aiohttp.ClientError:
            raw = b""
    return status_failure(status, raw, response.reason)
