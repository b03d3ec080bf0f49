"""The ``langchain`` producer: any LangChain chat model's ``astream`` onto the bus."""

from __future__ import annotations

import importlib
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import aclosing
from typing import TYPE_CHECKING, Any
from uuid import UUID

import anyio
import msgspec
import structlog
from anyio.streams.memory import MemoryObjectSendStream
from langchain_core.callbacks import AsyncCallbackHandler
from langchain_core.language_models import BaseChatModel
from langchain_core.messages import AIMessageChunk, BaseMessage
from langchain_core.runnables import RunnableConfig
from langchain_core.runnables.config import merge_configs

from streambus import PluginBase

from ._compat import require_asyncio
from ._mapping import chunk_pieces, finish_reason, usage_from_metadata

if TYPE_CHECKING:
    from streambus import Bus, StreamWriter

__all__ = ["ChatModelProducer", "model_identity"]

log = structlog.get_logger("streambus.langchain")


def model_identity(
    chat_model: BaseChatModel,
    metadata: Mapping[str, Any] | None = None,
    invocation_params: Mapping[str, Any] | None = None,
) -> tuple[str, str]:
    """Return ``(model, provider)`` for *chat_model*.

    From a run's LangSmith metadata (``ls_model_name``, ``ls_provider``) and
    invocation parameters when given: what LangChain passes to a callback's
    ``on_chat_model_start``, which is how :class:`ChatModelProducer` learns
    them. Without them (or where they are silent): the model's public
    ``model`` / ``model_name`` field, and the provider LangChain derives from
    the class name (``ChatOllama`` -> ``ollama``).
    """
    md = metadata or {}
    params = invocation_params or {}
    model = (
        md.get("ls_model_name")
        or params.get("model")
        or params.get("model_name")
        or getattr(chat_model, "model", None)
        or getattr(chat_model, "model_name", None)
    )
    provider = md.get("ls_provider") or _provider_from_class_name(type(chat_model).__name__)
    return str(model or type(chat_model).__name__), str(provider or "langchain")


def _provider_from_class_name(name: str) -> str:
    # LangChain's documented fallback for ls_provider: strip a leading or trailing "Chat", lowercase.
    if name.startswith("Chat"):
        name = name[4:]
    elif name.endswith("Chat"):
        name = name[:-4]
    return name.lower()


class _RunStart(AsyncCallbackHandler):
    """Learns the model's identity when its run starts, and holds the run until the stream is open.

    LangChain calls ``on_chat_model_start`` before the request goes out, with
    the run's LangSmith metadata: the producer opens the bus stream then, so
    ``start`` still comes before the model is asked, named as LangChain names it.
    """

    run_inline = True
    """Called in the run's own task, before the request: the run waits for :attr:`opened`."""
    raise_error = True

    def __init__(self, chat_model: BaseChatModel) -> None:
        self.chat_model = chat_model
        self.identity: tuple[str, str] | None = None
        self.known = anyio.Event()
        """Set when the identity is known, or the run ended before it started."""
        self.opened = anyio.Event()
        """Set by the producer once the bus stream is open."""

    async def on_chat_model_start(
        self, serialized: dict[str, Any], messages: list[list[BaseMessage]], *, run_id: UUID, **kwargs: Any
    ) -> None:
        """Record the identity of the first model run; wait until its stream is open."""
        if self.known.is_set():
            return  # a nested model run: the outer run names the stream
        self.identity = model_identity(self.chat_model, kwargs.get("metadata"), kwargs.get("invocation_params"))
        self.known.set()
        await self.opened.wait()


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
        call_kwargs = {**o.invoke_kwargs, **kwargs}
        tags = {**o.meta, **(meta or {})}
        run = _RunStart(self.chat_model)
        config = merge_configs(config, {"callbacks": [run]})
        started = time.perf_counter()
        chunks = self.chat_model.astream(messages, config=config, **call_kwargs)
        send, receive = anyio.create_memory_object_stream[AIMessageChunk | _Failed](0)
        failure: Exception | None = None
        async with anyio.create_task_group() as tg:
            # The model runs in a task of its own so that its run's start (which names the
            # model) can be awaited here, and the stream opened, before its request goes out.
            tg.start_soon(_pump, chunks, send, run)
            with receive:
                await run.known.wait()
                model, provider = run.identity or model_identity(self.chat_model)
                try:
                    async with bus.stream(
                        model=o.model_name or model, provider=o.provider or provider, meta=tags, stream=stream
                    ) as w:
                        self.stream_ids.append(w.stream)
                        run.opened.set()
                        await _publish(w, receive, started)
                except Exception as exc:  # BusClosed...: raised as it is below, not inside an ExceptionGroup
                    failure = exc
                finally:
                    tg.cancel_scope.cancel()  # an abort left the block: close the model's stream
        if failure is not None:
            raise failure
        return w.stream


async def _publish(w: StreamWriter, chunks: AsyncIterator[AIMessageChunk | _Failed], started: float) -> None:
    first: float | None = None
    usage: dict[str, int] = {}
    metadata: dict[str, Any] = {}
    saw_tools = False
    async for chunk in chunks:
        if isinstance(chunk, _Failed):
            exc = chunk.error
            log.warning("langchain.model_failed", stream=w.stream, error=f"{type(exc).__name__}: {exc}")
            await w.error("model_error", f"{type(exc).__name__}: {exc}")
            return
        for channel, text in chunk_pieces(chunk):
            if first is None:
                first = time.perf_counter() - started
            saw_tools = saw_tools or channel == "tool"
            await w.delta(text, channel)
        if isinstance(chunk, AIMessageChunk) and chunk.usage_metadata:
            for key in ("input_tokens", "output_tokens", "total_tokens"):
                usage[key] = usage.get(key, 0) + int(chunk.usage_metadata.get(key) or 0)  # type: ignore[call-overload]
        metadata.update(chunk.response_metadata)
    timings = {"total_duration": time.perf_counter() - started}
    if first is not None:
        timings["time_to_first_token"] = first
    await w.end(
        finish_reason(metadata, saw_tool_calls=saw_tools),
        usage=usage_from_metadata(usage),
        timings=timings,
    )


class _Failed:
    """The model raised: what the pump sends instead of a chunk."""

    __slots__ = ("error",)

    def __init__(self, error: Exception) -> None:
        self.error = error


async def _pump(
    chunks: AsyncIterator[AIMessageChunk], send: MemoryObjectSendStream[AIMessageChunk | _Failed], run: _RunStart
) -> None:
    with send:
        try:
            async with aclosing(chunks) as it:  # type: ignore[type-var]
                async for chunk in it:
                    await send.send(chunk)
        except Exception as exc:
            run.known.set()  # it may have failed before its run started: the stream must open to say so
            await send.send(_Failed(exc))
        finally:
            run.known.set()
