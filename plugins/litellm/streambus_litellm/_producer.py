"""The ``litellm`` producer: any provider LiteLLM reaches, streamed into the bus.

``litellm.acompletion(..., stream=True)`` answers every provider (Bedrock,
Vertex, Mistral, Groq, Azure, ...) with OpenAI-shaped chunks; this producer
maps them to bus events with :func:`chunk_pieces` and the usage (cached and
reasoning tokens included) with :func:`usage_of`. LiteLLM is an optional
dependency (``pip install 'streambus-litellm[litellm]'``), imported only
when the producer runs. It runs on asyncio only (LiteLLM's async clients).
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

import anyio
import msgspec

from streambus import PluginBase, Usage
from streambus.events import Channel
from streambus.plugins import NonNegativeFloat, PositiveInt
from streambus.producing import Failure, ProducerOptions, check_messages, require_asyncio, retrying_stream
from streambus.wire import ToolCallFragment, tool_text

if TYPE_CHECKING:
    from streambus import Bus, StreamWriter

__all__ = ["LiteLLMProducer", "chunk_pieces", "usage_of"]

_INSTALL = "pip install 'streambus-litellm[litellm]'"


def _get(obj: Any, name: str) -> Any:
    # LiteLLM's chunks are pydantic objects, some providers' pieces plain dicts: read both alike.
    if obj is None:
        return None
    if isinstance(obj, dict):
        return obj.get(name)
    return getattr(obj, name, None)


def usage_of(usage: Any) -> Usage | None:
    """The bus :class:`~streambus.Usage` of an OpenAI-shaped ``usage`` (LiteLLM's), or ``None``."""
    if usage is None:
        return None
    prompt, completion, total = (
        _get(usage, "prompt_tokens"),
        _get(usage, "completion_tokens"),
        _get(usage, "total_tokens"),
    )
    cached = _get(_get(usage, "prompt_tokens_details"), "cached_tokens")
    reasoning = _get(_get(usage, "completion_tokens_details"), "reasoning_tokens")
    creation = _get(usage, "cache_creation_input_tokens")  # set by LiteLLM for Anthropic and Bedrock
    if total is None and prompt is not None:
        total = prompt + (completion or 0)
    return Usage(
        prompt_tokens=prompt,
        completion_tokens=completion,
        total_tokens=total,
        cached_input_tokens=cached,
        cache_creation_input_tokens=creation or None,
        reasoning_tokens=reasoning,
    )


def chunk_pieces(chunk: Any) -> tuple[list[tuple[str, Channel]], str | None, Usage | None]:
    """What one LiteLLM stream chunk carries: ``(text, channel)`` pieces, a finish reason, a usage."""
    pieces: list[tuple[str, Channel]] = []
    finish: str | None = None
    for choice in (_get(chunk, "choices") or [])[:1]:
        delta = _get(choice, "delta")
        reasoning = _get(delta, "reasoning_content")
        if reasoning:
            pieces.append((reasoning, "reasoning"))
        content = _get(delta, "content")
        if content:
            pieces.append((content, "content"))
        for i, call in enumerate(_get(delta, "tool_calls") or []):
            function = _get(call, "function")
            index = _get(call, "index")
            fragment = ToolCallFragment(
                index=index if isinstance(index, int) else i,
                id=_get(call, "id"),
                name=_get(function, "name"),
                arguments=_get(function, "arguments") or "",
            )
            pieces.append((tool_text(fragment), "tool"))
        finish = _get(choice, "finish_reason") or None
    return pieces, finish, usage_of(_get(chunk, "usage"))


class LiteLLMProducer(PluginBase):
    """Stream one answer through ``litellm.acompletion`` into the bus.

    ::

        producer = LiteLLMProducer(model="bedrock/anthropic.claude-3-5-sonnet-20240620-v1:0",
                                   messages=[{"role": "user", "content": "Hi"}])
        async with Bus() as bus:
            bus.start_producer(producer)

    ``model`` uses LiteLLM's ``provider/model`` names; credentials come from
    the environment variables LiteLLM reads, or ``api_key_env``.
    """

    class Options(ProducerOptions):
        """Config keys of the ``litellm`` producer (and those every producer shares)."""

        model: str = ""
        """LiteLLM's model name, ``provider/model`` (required)."""
        base_url: str | None = None
        """The provider's API root (LiteLLM's ``api_base``), when not the provider's default."""
        api_key_env: str | None = None
        """An environment variable holding the key (else LiteLLM reads the provider's usual one); never logged."""
        messages: list[dict[str, Any]] | None = None
        """Chat history: ``{role, content}`` tables."""
        prompt: str | None = None
        """Appended as the last user message."""
        system: str | None = None
        """A leading system message."""
        temperature: NonNegativeFloat | None = None
        """Sampling temperature."""
        max_tokens: PositiveInt | None = None
        """The completion's token limit."""
        tools: list[dict[str, Any]] | None = None
        """Tool definitions (OpenAI's shape; LiteLLM translates them); calls become ``tool`` deltas."""
        extra_body: dict[str, Any] = msgspec.field(default_factory=dict)
        """More keyword arguments for ``litellm.acompletion`` (``top_p``, ``reasoning_effort``...)."""

        def __post_init__(self) -> None:
            super().__post_init__()
            if not self.model:
                raise ValueError("model: required (LiteLLM's provider/model name)")
            check_messages(self.messages, self.prompt, roles="system, user, assistant, tool")
            if self.api_key_env is not None and not self.api_key_env:
                raise ValueError("api_key_env: must name an environment variable (or be left out)")

    keywords_override = True
    """Keywords override a given ``Options``: ``LiteLLMProducer(base, model="other")``."""

    def __init__(self, options: Options | None = None, /, **keys: Any) -> None:
        if options is None and not keys:
            raise ValueError("model: required (LiteLLM's provider/model name)")
        self.options: LiteLLMProducer.Options = self.resolve_options(options, keys)
        self.stream_ids: list[str] = []
        """Ids of the streams produced so far."""

    def arguments(self) -> dict[str, Any]:
        """The keyword arguments for ``litellm.acompletion`` (without the key)."""
        o = self.options
        messages = list(o.messages or [])
        if o.system is not None:
            messages.insert(0, {"role": "system", "content": o.system})
        if o.prompt is not None:
            messages.append({"role": "user", "content": o.prompt})
        kwargs: dict[str, Any] = {
            "model": o.model,
            "messages": messages,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        for key, value in (
            ("api_base", o.base_url),
            ("temperature", o.temperature),
            ("max_tokens", o.max_tokens),
            ("tools", o.tools),
        ):
            if value is not None:
                kwargs[key] = value
        kwargs.update(o.extra_body)
        return kwargs

    async def run(self, bus: Bus) -> None:
        """Run the request as one bus stream (retrying before the first delta)."""
        require_asyncio("litellm")
        try:
            import litellm
        except ImportError as exc:
            raise ImportError(f"the litellm producer needs LiteLLM, which is not installed: {_INSTALL}") from exc
        o = self.options
        kwargs = self.arguments()
        if o.api_key_env:
            key = os.environ.get(o.api_key_env)
            if key:
                kwargs["api_key"] = key

        async def attempt(w: StreamWriter) -> Failure | None:
            return await _attempt(litellm, kwargs, w, o)

        await retrying_stream(
            bus,
            attempt,
            model=o.model,
            provider="litellm",
            meta=o.meta,
            retries=o.retries,
            retry_backoff=o.retry_backoff,
            retry_max_wait=o.retry_max_wait,
            stream_ids=self.stream_ids,
        )


def _failure(litellm: Any, exc: Exception) -> Failure:
    status = getattr(exc, "status_code", None)
    message = f"{type(exc).__name__}: {exc}"
    if isinstance(exc, litellm.Timeout):
        return Failure("timeout", message, True)
    if isinstance(exc, litellm.NotFoundError):
        return Failure("model_not_found", message)
    if isinstance(exc, litellm.APIConnectionError):
        return Failure("connect", message, True)
    if isinstance(status, int):
        return Failure("http_status", f"HTTP {status}: {message}", status in (408, 409, 429) or status >= 500)
    return Failure("upstream_error", message)


async def _attempt(litellm: Any, kwargs: dict[str, Any], w: StreamWriter, o: LiteLLMProducer.Options) -> Failure | None:
    reason: str | None = None
    usage: Usage | None = None
    stream: AsyncIterator[Any] | None = None
    try:
        with anyio.move_on_after(o.first_chunk_timeout) as scope:
            stream = await litellm.acompletion(**kwargs)
        if stream is None or scope.cancelled_caught:
            return Failure("timeout", f"no response within first_chunk_timeout={o.first_chunk_timeout}s", True)
        first = True
        while True:
            limit = o.first_chunk_timeout if first else o.timeout
            with anyio.move_on_after(limit) as scope:
                try:
                    chunk = await stream.__anext__()
                except StopAsyncIteration:
                    break
            if scope.cancelled_caught:
                what = "first_chunk_timeout" if first else "timeout"
                return Failure(
                    "timeout", f"no data for the {'first' if first else 'next'} chunk within {what}={limit}s", True
                )
            first = False
            pieces, finish, chunk_usage = chunk_pieces(chunk)
            for text, channel in pieces:
                await w.delta(text, channel=channel)
            reason = finish or reason
            usage = chunk_usage or usage
    except Exception as exc:  # LiteLLM raises its own tree (mapped by provider); any other is a failure too
        return _failure(litellm, exc)
    finally:
        close = getattr(stream, "aclose", None)
        if close is not None:
            await close()
    if reason is None:
        return Failure("truncated", "the stream ended without a finish_reason", True)
    await w.end(reason, usage=usage)
    return None
