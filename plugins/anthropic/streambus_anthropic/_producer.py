"""The ``anthropic`` producer: stream Anthropic's Messages API into the bus.

aiohttp moves the bytes; :class:`~streambus_anthropic.AnthropicStreamParser`
does all the parsing. Every failure becomes one ``error`` event with a stable
``kind`` (``http_status``, ``model_not_found``, ``upstream_error`` for an
``error`` event in the stream, ``timeout``, ``truncated``, ``malformed``...)
and the text already streamed is kept; retries happen only before the first
delta, so no text is ever duplicated.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import aiohttp
import msgspec
import orjson

from streambus import PluginBase
from streambus.formats import Piece
from streambus.plugins import NonNegativeFloat, PositiveInt
from streambus.producing import (
    Failure,
    HttpProducerOptions,
    check_messages,
    publish_pieces,
    read_status_failure,
    require_asyncio,
    retrying_stream,
    stream_attempt,
)

from ._protocol import AnthropicStreamParser

if TYPE_CHECKING:
    from streambus import Bus, StreamWriter

__all__ = ["AnthropicProducer"]


class AnthropicProducer(PluginBase):
    """Stream one answer from Anthropic's Messages API (``POST /v1/messages``) into the bus.

    ::

        producer = AnthropicProducer(model="claude-sonnet-4-5", max_tokens=1024,
                                     messages=[{"role": "user", "content": "Hi"}])
        async with Bus() as bus:
            bus.start_producer(producer)

    Text becomes ``content`` deltas, thinking ``reasoning`` deltas, tool use
    ``tool`` deltas. Runs on asyncio only (aiohttp).
    """

    class Options(HttpProducerOptions):
        """Config keys of the ``anthropic`` producer (and those every HTTP producer shares)."""

        base_url: str = "https://api.anthropic.com"
        """The API root; ``/v1/messages`` is appended."""
        model: str = ""
        """The model to run (required)."""
        api_key_env: str | None = "ANTHROPIC_API_KEY"
        """The environment variable holding the API key (sent as ``x-api-key``, never logged)."""
        anthropic_version: str = "2023-06-01"
        """The ``anthropic-version`` header."""
        messages: list[dict[str, Any]] | None = None
        """The conversation: ``{role, content}`` tables (``user`` / ``assistant``)."""
        prompt: str | None = None
        """Appended as the last user message."""
        system: str | None = None
        """The system prompt (Anthropic's top-level ``system``)."""
        max_tokens: PositiveInt = 1024
        """The answer's token limit (Anthropic requires one)."""
        temperature: NonNegativeFloat | None = None
        """Sampling temperature."""
        thinking: dict[str, Any] | None = None
        """Extended thinking, e.g. ``{type = "enabled", budget_tokens = 2048}``: thoughts become ``reasoning``."""
        tools: list[dict[str, Any]] | None = None
        """Tool definitions; calls become ``tool`` deltas."""
        extra_body: dict[str, Any] = msgspec.field(default_factory=dict)
        """More request fields, merged last (``top_p``, ``stop_sequences``, ``metadata``...)."""

        def __post_init__(self) -> None:
            super().__post_init__()
            if not self.model:
                raise ValueError("model: required (the model to run)")
            check_messages(self.messages, self.prompt)

    keywords_override = True
    """Keywords override a given ``Options``: ``AnthropicProducer(base, model="other")``."""

    def __init__(self, options: Options | None = None, /, **keys: Any) -> None:
        if options is None and not keys:
            raise ValueError("model: required (the model to run)")
        self.options: AnthropicProducer.Options = self.resolve_options(options, keys)
        self.stream_ids: list[str] = []
        """Ids of the streams produced so far."""

    def body(self) -> dict[str, Any]:
        """The JSON request body."""
        o = self.options
        messages = list(o.messages or [])
        if o.prompt is not None:
            messages.append({"role": "user", "content": o.prompt})
        body: dict[str, Any] = {"model": o.model, "max_tokens": o.max_tokens, "messages": messages, "stream": True}
        if o.system is not None:
            body["system"] = o.system
        if o.temperature is not None:
            body["temperature"] = o.temperature
        if o.thinking is not None:
            body["thinking"] = o.thinking
        if o.tools:
            body["tools"] = o.tools
        body.update(o.extra_body)
        return body

    def _headers(self) -> dict[str, str]:
        o = self.options
        headers = {
            "Content-Type": "application/json",
            "Accept": "text/event-stream",
            "anthropic-version": o.anthropic_version,
            **o.headers,
        }
        key = os.environ.get(o.api_key_env) if o.api_key_env else None
        if key:
            headers["x-api-key"] = key
        return headers

    async def run(self, bus: Bus) -> None:
        """Run the request as one bus stream (retrying before the first delta)."""
        require_asyncio("anthropic")
        o = self.options
        body = orjson.dumps(self.body())
        timeout = aiohttp.ClientTimeout(total=None, connect=None, sock_connect=o.connect_timeout)
        async with aiohttp.ClientSession(timeout=timeout) as session:

            async def attempt(w: StreamWriter) -> Failure | None:
                async def publish(pieces: Iterable[Piece]) -> Failure | None:
                    return await publish_pieces(pieces, w)

                return await stream_attempt(
                    session,
                    o.base_url.rstrip("/") + "/v1/messages",
                    body,
                    self._headers(),
                    parser=AnthropicStreamParser(),
                    handle=publish,
                    status_failure=read_status_failure,
                    first_chunk_timeout=o.first_chunk_timeout,
                    chunk_timeout=o.timeout,
                    server=o.base_url,
                    end_marker="message_stop",
                    unit="an event",
                )

            await retrying_stream(
                bus,
                attempt,
                model=o.model,
                provider="anthropic",
                meta=o.meta,
                retries=o.retries,
                retry_backoff=o.retry_backoff,
                retry_max_wait=o.retry_max_wait,
                stream_ids=self.stream_ids,
            )
