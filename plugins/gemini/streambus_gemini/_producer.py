"""The ``gemini`` producer: stream the Gemini API's ``streamGenerateContent`` into the bus.

aiohttp moves the bytes; :class:`~streambus_gemini.GeminiStreamParser` does
all the parsing. Every failure becomes one ``error`` event with a stable
``kind`` (``http_status``, ``model_not_found``, ``upstream_error`` for an
error chunk in the stream, ``timeout``, ``truncated``, ``malformed``...) and
the text already streamed is kept; retries happen only before the first
delta, so no text is ever duplicated.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

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

from ._protocol import GeminiStreamParser

if TYPE_CHECKING:
    from streambus import Bus, StreamWriter

__all__ = ["GeminiProducer"]


def _content(message: Mapping[str, Any]) -> dict[str, Any]:
    # {role, content} as the other producers take it -> Gemini's {role, parts}; Gemini's own form passes.
    role = "model" if message["role"] in ("assistant", "model") else "user"
    if "parts" in message:
        return {"role": role, "parts": message["parts"]}
    return {"role": role, "parts": [{"text": message.get("content", "")}]}


class GeminiProducer(PluginBase):
    """Stream one answer from the Gemini API into the bus.

    ::

        producer = GeminiProducer(model="gemini-2.5-flash", messages=[{"role": "user", "content": "Hi"}])
        async with Bus() as bus:
            bus.start_producer(producer)

    Text parts become ``content`` deltas, thought parts (``include_thoughts``)
    ``reasoning`` deltas, function calls ``tool`` deltas. Runs on asyncio
    only (aiohttp).
    """

    class Options(HttpProducerOptions):
        """Config keys of the ``gemini`` producer (and those every HTTP producer shares)."""

        base_url: str = "https://generativelanguage.googleapis.com"
        """The API root; ``/{api_version}/models/{model}:streamGenerateContent?alt=sse`` is appended."""
        api_version: str = "v1beta"
        """The API version in the path."""
        model: str = ""
        """The model to run (required), e.g. ``gemini-2.5-flash``."""
        api_key_env: str | None = "GEMINI_API_KEY"
        """The environment variable holding the API key (sent as ``x-goog-api-key``, never logged)."""
        messages: list[dict[str, Any]] | None = None
        """The conversation: ``{role, content}`` tables (``assistant`` -> ``model``), or ``{role, parts}``."""
        prompt: str | None = None
        """Appended as the last user message."""
        system: str | None = None
        """The system instruction."""
        temperature: NonNegativeFloat | None = None
        """Sampling temperature."""
        max_tokens: PositiveInt | None = None
        """``maxOutputTokens``."""
        include_thoughts: bool = False
        """Ask a thinking model for its thought summaries (``reasoning`` deltas)."""
        thinking_budget: int | None = None
        """``thinkingConfig.thinkingBudget`` in tokens."""
        tools: list[dict[str, Any]] | None = None
        """Tool definitions (``[{functionDeclarations = [...]}]``); calls become ``tool`` deltas."""
        extra_body: dict[str, Any] = msgspec.field(default_factory=dict)
        """More request fields, merged last (``safetySettings``, ``cachedContent``...)."""

        def __post_init__(self) -> None:
            super().__post_init__()
            if not self.model:
                raise ValueError("model: required (the model to run)")
            check_messages(self.messages, self.prompt)

    keywords_override = True
    """Keywords override a given ``Options``: ``GeminiProducer(base, model="other")``."""

    def __init__(self, options: Options | None = None, /, **keys: Any) -> None:
        if options is None and not keys:
            raise ValueError("model: required (the model to run)")
        self.options: GeminiProducer.Options = self.resolve_options(options, keys)
        self.stream_ids: list[str] = []
        """Ids of the streams produced so far."""

    @property
    def url(self) -> str:
        """The request URL."""
        o = self.options
        return (
            f"{o.base_url.rstrip('/')}/{o.api_version}/models/{quote(o.model, safe='')}:streamGenerateContent?alt=sse"
        )

    def body(self) -> dict[str, Any]:
        """The JSON request body."""
        o = self.options
        contents = [_content(m) for m in o.messages or []]
        if o.prompt is not None:
            contents.append({"role": "user", "parts": [{"text": o.prompt}]})
        body: dict[str, Any] = {"contents": contents}
        if o.system is not None:
            body["systemInstruction"] = {"parts": [{"text": o.system}]}
        config: dict[str, Any] = {}
        if o.temperature is not None:
            config["temperature"] = o.temperature
        if o.max_tokens is not None:
            config["maxOutputTokens"] = o.max_tokens
        thinking: dict[str, Any] = {}
        if o.include_thoughts:
            thinking["includeThoughts"] = True
        if o.thinking_budget is not None:
            thinking["thinkingBudget"] = o.thinking_budget
        if thinking:
            config["thinkingConfig"] = thinking
        if config:
            body["generationConfig"] = config
        if o.tools:
            body["tools"] = o.tools
        body.update(o.extra_body)
        return body

    def _headers(self) -> dict[str, str]:
        o = self.options
        headers = {"Content-Type": "application/json", "Accept": "text/event-stream", **o.headers}
        key = os.environ.get(o.api_key_env) if o.api_key_env else None
        if key:
            headers["x-goog-api-key"] = key
        return headers

    async def run(self, bus: Bus) -> None:
        """Run the request as one bus stream (retrying before the first delta)."""
        require_asyncio("gemini")
        o = self.options
        body = orjson.dumps(self.body())
        timeout = aiohttp.ClientTimeout(total=None, connect=None, sock_connect=o.connect_timeout)
        async with aiohttp.ClientSession(timeout=timeout) as session:

            async def attempt(w: StreamWriter) -> Failure | None:
                async def publish(pieces: Iterable[Piece]) -> Failure | None:
                    return await publish_pieces(pieces, w)

                return await stream_attempt(
                    session,
                    self.url,
                    body,
                    self._headers(),
                    parser=GeminiStreamParser(),
                    handle=publish,
                    status_failure=read_status_failure,
                    first_chunk_timeout=o.first_chunk_timeout,
                    chunk_timeout=o.timeout,
                    server=o.base_url,
                    end_marker="a finishReason",
                    unit="an event",
                )

            await retrying_stream(
                bus,
                attempt,
                model=o.model,
                provider="gemini",
                meta=o.meta,
                retries=o.retries,
                retry_backoff=o.retry_backoff,
                retry_max_wait=o.retry_max_wait,
                stream_ids=self.stream_ids,
            )
