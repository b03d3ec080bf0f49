"""The ``langchain`` producer: any LangChain chat model's ``astream`` onto the bus."""

from __future__ import annotations

import importlib
import time
from collections.abc import Mapping, Sequence
from contextlib import aclosing
from typing import TYPE_CHECKING, Any

import msgspec
import structlog
from langchain_core.language_models import BaseChatModel
from langchain_core.messages import AIMessageChunk
from langchain_core.runnables import RunnableConfig

from streambus import PluginBase

from ._compat import require_asyncio
from ._mapping import chunk_pieces, finish_reason, usage_from_metadata

if TYPE_CHECKING:
    from streambus import Bus

__all__ = ["ChatModelProducer", "model_identity"]

log = structlog.get_logger("streambus.langchain")


def model_identity(chat_model: BaseChatModel) -> tuple[str, str]:
    """Return ``(model, provider)`` for *chat_model* from its LangSmith params (``ls_model_name``, ``ls_provider``)."""
    try:
        params = chat_model._get_ls_params()
    except Exception:  # a third-party model may not implement it fully
        params = {}
    model = params.get("ls_model_name") or getattr(chat_model, "model", None) or getattr(chat_model, "model_name", None)
    provider = params.get("ls_provider") or chat_model._llm_type
    return str(model or type(chat_model).__name__), str(provider or "langchain")


def _import_model(path: str) -> type[BaseChatModel]:
    module_name, _, attr = path.partition(":")
    if not module_name or not attr:
        raise ValueError(f'chat_model: expected "package.module:ClassName", got {path!r}')
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ValueError(f"chat_model: cannot import {module_name!r}: {exc}") from None
    cls = getattr(module, attr, None)
    if not (isinstance(cls, type) and issubclass(cls, BaseChatModel)):
        raise ValueError(f"chat_model: {path!r} is not a LangChain chat model class")
    return cls


class ChatModelProducer(PluginBase):
    """Run a LangChain chat model's ``astream(messages)`` and publish it as one stream.

    Build it from a model object (``ChatModelProducer(chat_model=ChatOllama(model="llama3"),
    messages=[...])``) or, in a pipeline file, from an import path and
    constructor keywords (``chat_model = "langchain_ollama:ChatOllama"``,
    ``model_kwargs = {model = "llama3"}``). Each ``AIMessageChunk`` becomes
    deltas: text on ``content``, reasoning blocks on ``reasoning``,
    ``tool_call_chunks`` on ``tool`` (as :func:`streambus.wire.tool_text`
    fragments); ``usage_metadata`` (summed over chunks) becomes ``end.usage``
    and the provider's finish reason ``end.reason``. Aborting the stream
    closes the model's stream. asyncio only (LangChain's async API is).
    """

    class Options(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
        """Config keys of the ``langchain`` producer."""

        chat_model: str = ""
        """Import path of the chat model class, ``"package.module:ClassName"``."""
        model_kwargs: dict[str, Any] = {}
        """Keyword arguments for the chat model's constructor."""
        messages: list[dict[str, Any]] | None = None
        """Chat messages (``role``/``content``) to send."""
        prompt: str | None = None
        """A single user message (instead of ``messages``)."""
        invoke_kwargs: dict[str, Any] = {}
        """Extra keyword arguments for ``astream`` (``stop``, provider options)."""
        model_name: str | None = None
        """The ``model`` written on ``start`` events (default: the chat model's own)."""
        provider: str | None = None
        """The ``provider`` written on ``start`` events (default: the chat model's ``ls_provider``)."""
        meta: dict[str, Any] = {}

        def __post_init__(self) -> None:
            if self.chat_model and ":" not in self.chat_model:
                raise ValueError(f'chat_model: expected "package.module:ClassName", got {self.chat_model!r}')
            if self.prompt is not None and self.messages is not None:
                raise ValueError("messages: give either prompt or messages, not both")
            for i, m in enumerate(self.messages or []):
                if not isinstance(m.get("role"), str):
                    raise ValueError(f"messages[{i}].role: expected a string")
                if "content" not in m:
                    raise ValueError(f"messages[{i}].content: missing")

    def __init__(self, options: Options | None = None, *, chat_model: BaseChatModel | None = None, **keys: Any) -> None:
        if isinstance(options, BaseChatModel):
            # The likely slip: ChatModelProducer(ChatOllama(...)). Name it, and the fix.
            raise TypeError(
                f"ChatModelProducer: got a chat model ({type(options).__name__}) as the first argument, which "
                "takes ChatModelProducer.Options; pass the model as chat_model=... and options as keywords"
            )
        self.options: ChatModelProducer.Options = self.resolve_options(options, keys)
        if chat_model is None:
            if not self.options.chat_model:
                raise ValueError("chat_model: give a chat model object or an import path")
            cls = _import_model(self.options.chat_model)
            try:
                chat_model = cls(**self.options.model_kwargs)
            except Exception as exc:
                raise ValueError(f"model_kwargs: {cls.__name__} rejected them: {exc}") from None
        self.chat_model = chat_model
        self.stream_ids: list[str] = []
        """Ids of the streams produced so far, in start order."""

    async def run(self, bus: Bus) -> None:
        """Publish one stream for the configured ``messages`` or ``prompt``."""
        o = self.options
        if o.messages is None and o.prompt is None:
            raise ValueError("messages: give messages or a prompt to send")
        messages: Sequence[Any] = o.messages if o.messages is not None else [{"role": "user", "content": o.prompt}]
        await self.generate(bus, messages)

    async def generate(
        self,
        bus: Bus,
        messages: Sequence[Any] | str,
        *,
        meta: Mapping[str, Any] | None = None,
        stream: str | None = None,
        config: RunnableConfig | None = None,
        **kwargs: Any,
    ) -> str:
        """Stream the model's answer to *messages* onto *bus*; return the stream id.

        *messages* is anything ``BaseChatModel.astream`` accepts (message
        objects, ``(role, content)`` tuples, dicts, or one string). *config*
        (callbacks, tags) and *kwargs* (``stop=``, provider options) are
        passed to ``astream``. A model that raises ends the stream with
        ``error(kind="model_error")``.
        """
        require_asyncio("ChatModelProducer")
        o = self.options
        model, provider = model_identity(self.chat_model)
        call_kwargs = {**o.invoke_kwargs, **kwargs}
        tags = {**o.meta, **(meta or {})}
        async with bus.stream(
            model=o.model_name or model, provider=o.provider or provider, meta=tags, stream=stream
        ) as w:
            self.stream_ids.append(w.stream)
            started = time.perf_counter()
            first: float | None = None
            usage: dict[str, int] = {}
            metadata: dict[str, Any] = {}
            saw_tools = False
            try:
                async with aclosing(self.chat_model.astream(messages, config=config, **call_kwargs)) as chunks:  # type: ignore[type-var]
                    async for chunk in chunks:
                        for channel, text in chunk_pieces(chunk):
                            if first is None:
                                first = time.perf_counter() - started
                            saw_tools = saw_tools or channel == "tool"
                            await w.delta(text, channel)
                        if isinstance(chunk, AIMessageChunk) and chunk.usage_metadata:
                            for key in ("input_tokens", "output_tokens", "total_tokens"):
                                usage[key] = usage.get(key, 0) + int(chunk.usage_metadata.get(key) or 0)  # type: ignore[call-overload]
                        metadata.update(chunk.response_metadata)
            except Exception as exc:
                log.warning("langchain.model_failed", stream=w.stream, error=f"{type(exc).__name__}: {exc}")
                await w.error("model_error", f"{type(exc).__name__}: {exc}")
                return w.stream
            timings = {"total_duration": time.perf_counter() - started}
            if first is not None:
                timings["time_to_first_token"] = first
            await w.end(
                finish_reason(metadata, saw_tool_calls=saw_tools),
                usage=usage_from_metadata(usage),
                timings=timings,
            )
        return w.stream
