"""An async LangChain callback handler that publishes every model run to a bus."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any
from uuid import UUID

import anyio
import anyio.from_thread
import anyio.lowlevel
import structlog
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream
from langchain_core.callbacks import AsyncCallbackHandler
from langchain_core.messages import BaseMessage
from langchain_core.outputs import ChatGeneration, ChatGenerationChunk, GenerationChunk, LLMResult

from streambus import AbortEvent, Usage
from streambus.events import Channel

from ._compat import require_asyncio
from ._errors import StreamAborted
from ._mapping import chunk_pieces, finish_reason, usage_from_metadata

if TYPE_CHECKING:
    from streambus import Bus

__all__ = ["BusCallbackHandler"]

log = structlog.get_logger("streambus.langchain")

# What the callbacks send to a run's writer task.
_Op = tuple[str, Any]


class _Run:
    __slots__ = ("aborted", "done", "send", "streamed", "terminal")

    def __init__(self, send: MemoryObjectSendStream[_Op]) -> None:
        self.send = send
        self.done = anyio.Event()
        self.aborted: AbortEvent | None = None
        self.streamed = False
        self.terminal = False


class BusCallbackHandler(AsyncCallbackHandler):
    """Publish every LLM / chat-model run of a chain or agent to *bus*, one stream per run id.

    ::

        handler = BusCallbackHandler(bus, meta={"session": "s1"})
        await chain.ainvoke(inputs, config={"callbacks": [handler]})

    The stream id is the run id; ``start.meta`` carries ``run_id``,
    ``parent_run_id``, ``parent_run_ids`` (the whole ancestry, nearest
    first), ``tags``, the run's ``metadata`` under ``langchain``, and *meta*.
    Tokens become deltas (reasoning and tool-call chunks on their channels),
    ``on_llm_end`` becomes ``end`` with the model's usage and finish reason,
    ``on_llm_error`` becomes ``error(kind="model_error")``. A run that was not
    streamed publishes its whole answer as one delta at the end.

    Each stream has its own writer task on the bus, fed through a bounded
    buffer (*buffer* operations), so ``bus.abort(run_id)`` works: the next
    token callback then raises :class:`StreamAborted`, which stops the run.
    Create the handler inside the bus's event loop (asyncio only). Sync runs
    (``invoke``/``stream``) are bridged to the bus's loop when they run in a
    worker thread (``anyio.to_thread.run_sync(chain.invoke, ...)``); never
    call a sync run directly on the event loop thread, which it would block.
    """

    raise_error = True
    """Let :class:`StreamAborted` stop the run; other failures are logged, not raised."""
    run_inline = True
    """Keep callbacks in order, in the run's own task."""

    def __init__(
        self, bus: Bus, *, meta: Mapping[str, Any] | None = None, provider: str = "langchain", buffer: int = 256
    ) -> None:
        require_asyncio("BusCallbackHandler")
        if buffer < 1:
            raise ValueError(f"buffer: must be at least 1, got {buffer}")
        self.bus = bus
        self.meta = dict(meta or {})
        self.provider = provider
        self.buffer = buffer
        self._runs: dict[UUID, _Run] = {}
        self._parents: dict[UUID, UUID | None] = {}
        self._loop_thread = threading.get_ident()
        self._token = anyio.lowlevel.current_token()
        self.stream_ids: list[str] = []
        """Stream ids (run ids) of every model run seen, in start order."""

    # -- bridging ------------------------------------------------------------------
    async def _on_loop(self, func: Any, *args: Any) -> Any:
        try:
            if threading.get_ident() == self._loop_thread:
                return await func(*args)
            # A sync run: LangChain drives this coroutine on a private loop in another thread.
            return anyio.from_thread.run(func, *args, token=self._token)
        except StreamAborted:
            raise
        except Exception as exc:
            # Publishing must never break the app (a closed bus, a full shutdown).
            log.warning("langchain.callback_failed", callback=func.__name__, error=f"{type(exc).__name__}: {exc}")
            return None

    # -- run tree ----------------------------------------------------------------------
    def _ancestry(self, parent: UUID | None) -> list[str]:
        chain: list[str] = []
        seen: set[UUID] = set()
        while parent is not None and parent not in seen:
            seen.add(parent)
            chain.append(str(parent))
            parent = self._parents.get(parent)
        return chain

    async def on_chain_start(
        self,
        serialized: dict[str, Any] | None,
        inputs: Any,
        *,
        run_id: UUID,
        parent_run_id: UUID | None = None,
        **kwargs: Any,
    ) -> None:
        """Remember the chain's parent so model runs below it know their ancestry."""
        self._parents[run_id] = parent_run_id

    async def on_chain_end(self, outputs: Any, *, run_id: UUID, **kwargs: Any) -> None:
        """Forget the chain."""
        self._parents.pop(run_id, None)

    async def on_chain_error(self, error: BaseException, *, run_id: UUID, **kwargs: Any) -> None:
        """Forget the chain."""
        self._parents.pop(run_id, None)

    async def on_tool_start(
        self,
        serialized: dict[str, Any] | None,
        input_str: str,
        *,
        run_id: UUID,
        parent_run_id: UUID | None = None,
        **kwargs: Any,
    ) -> None:
        """Remember the tool's parent (models called inside tools have it as ancestor)."""
        self._parents[run_id] = parent_run_id

    async def on_tool_end(self, output: Any, *, run_id: UUID, **kwargs: Any) -> None:
        """Forget the tool."""
        self._parents.pop(run_id, None)

    async def on_tool_error(self, error: BaseException, *, run_id: UUID, **kwargs: Any) -> None:
        """Forget the tool."""
        self._parents.pop(run_id, None)

    # -- model runs --------------------------------------------------------------------------
    async def on_chat_model_start(
        self,
        serialized: dict[str, Any] | None,
        messages: list[list[BaseMessage]],
        *,
        run_id: UUID,
        parent_run_id: UUID | None = None,
        tags: list[str] | None = None,
        metadata: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        """Open the run's stream."""
        await self._on_loop(self._open, serialized, run_id, parent_run_id, tags, metadata, kwargs)

    async def on_llm_start(
        self,
        serialized: dict[str, Any] | None,
        prompts: list[str],
        *,
        run_id: UUID,
        parent_run_id: UUID | None = None,
        tags: list[str] | None = None,
        metadata: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        """Open the run's stream (completion-style LLMs)."""
        await self._on_loop(self._open, serialized, run_id, parent_run_id, tags, metadata, kwargs)

    async def _open(
        self,
        serialized: dict[str, Any] | None,
        run_id: UUID,
        parent_run_id: UUID | None,
        tags: list[str] | None,
        metadata: dict[str, Any] | None,
        extra: dict[str, Any],
    ) -> None:
        md = dict(metadata or {})
        params = extra.get("invocation_params") or {}
        model = (
            md.get("ls_model_name")
            or params.get("model")
            or params.get("model_name")
            or (serialized or {}).get("name")
            or "langchain"
        )
        provider = md.get("ls_provider") or params.get("_type") or self.provider
        meta: dict[str, Any] = {**self.meta, "run_id": str(run_id)}
        if parent_run_id is not None:
            meta["parent_run_id"] = str(parent_run_id)
        meta["parent_run_ids"] = self._ancestry(parent_run_id)
        if tags:
            meta["tags"] = list(tags)
        if md:
            meta["langchain"] = {k: v for k, v in md.items() if isinstance(v, str | int | float | bool | None)}
        send, receive = anyio.create_memory_object_stream[_Op](self.buffer)
        run = _Run(send)
        try:
            self.bus.start_soon(
                self._write, run, receive, str(model), str(provider), meta, str(run_id), name=f"langchain:{run_id}"
            )
        except BaseException:
            # No writer (the bus is closed): the run goes on untracked.
            send.close()
            receive.close()
            raise
        self._runs[run_id] = run
        self.stream_ids.append(str(run_id))

    async def _write(
        self,
        run: _Run,
        receive: MemoryObjectReceiveStream[_Op],
        model: str,
        provider: str,
        meta: dict[str, Any],
        stream: str,
    ) -> None:
        try:
            with receive:
                async with self.bus.stream(model=model, provider=provider, meta=meta, stream=stream) as w:
                    async for op, value in receive:
                        if op == "delta":
                            channel, text = value
                            await w.delta(text, channel)
                        elif op == "end":
                            reason, usage = value
                            await w.end(reason, usage=usage)
                            return
                        else:
                            await w.error("model_error", value)
                            return
                if isinstance(w.terminal, AbortEvent):
                    run.aborted = w.terminal
        finally:
            run.done.set()

    async def _send(self, run_id: UUID, op: str, value: Any) -> _Run | None:
        run = self._runs.get(run_id)
        if run is None:
            return None
        if run.aborted is None and not run.done.is_set():
            try:
                await run.send.send((op, value))
            except (anyio.BrokenResourceError, anyio.ClosedResourceError):
                await run.done.wait()
        if run.aborted is not None and op == "delta":
            self._runs.pop(run_id, None)
            run.send.close()
            raise StreamAborted(str(run_id), run.aborted.reason, run.aborted.by)
        return run

    async def on_llm_new_token(
        self,
        token: str | list[str | dict[str, Any]],
        *,
        chunk: GenerationChunk | ChatGenerationChunk | None = None,
        run_id: UUID,
        parent_run_id: UUID | None = None,
        tags: list[str] | None = None,
        **kwargs: Any,
    ) -> None:
        """Publish the token (or the chunk's content, reasoning and tool-call pieces) as deltas."""
        await self._on_loop(self._token_in, token, chunk, run_id)

    async def _token_in(self, token: Any, chunk: Any, run_id: UUID) -> None:
        pieces: list[tuple[Channel, str]]
        if isinstance(chunk, ChatGenerationChunk):
            pieces = chunk_pieces(chunk.message)
        elif isinstance(token, str):
            pieces = [("content", token)] if token else []
        else:
            pieces = [("content", "".join(t if isinstance(t, str) else str(t.get("text", "")) for t in token))]
        run = self._runs.get(run_id)
        if run is None:
            return
        run.streamed = True
        if not pieces and run.aborted is not None:
            self._runs.pop(run_id, None)
            run.send.close()
            raise StreamAborted(str(run_id), run.aborted.reason, run.aborted.by)
        for piece in pieces:
            await self._send(run_id, "delta", piece)

    async def on_llm_end(
        self, response: LLMResult, *, run_id: UUID, parent_run_id: UUID | None = None, **kwargs: Any
    ) -> None:
        """Publish ``end`` with the run's usage and finish reason, and wait until it is on the bus."""
        await self._on_loop(self._end, response, run_id)

    async def _end(self, response: LLMResult, run_id: UUID) -> None:
        run = self._runs.get(run_id)
        if run is None:
            return
        generation = response.generations[0][0] if response.generations and response.generations[0] else None
        usage: Usage | None = None
        metadata: dict[str, Any] = dict(generation.generation_info or {}) if generation is not None else {}
        saw_tools = False
        if isinstance(generation, ChatGeneration):
            message = generation.message
            metadata.update(message.response_metadata)
            usage = usage_from_metadata(getattr(message, "usage_metadata", None))
            saw_tools = bool(getattr(message, "tool_calls", None))
            if not run.streamed:
                for piece in chunk_pieces(message):
                    await self._send(run_id, "delta", piece)
        elif generation is not None and not run.streamed and generation.text:
            await self._send(run_id, "delta", ("content", generation.text))
        if usage is None and response.llm_output:
            token_usage = response.llm_output.get("token_usage") or response.llm_output.get("usage") or {}
            if token_usage:
                usage = Usage(
                    prompt_tokens=token_usage.get("prompt_tokens"),
                    completion_tokens=token_usage.get("completion_tokens"),
                    total_tokens=token_usage.get("total_tokens"),
                )
        await self._finish(run_id, "end", (finish_reason(metadata, saw_tool_calls=saw_tools), usage))

    async def on_llm_error(
        self, error: BaseException, *, run_id: UUID, parent_run_id: UUID | None = None, **kwargs: Any
    ) -> None:
        """Publish ``error(kind="model_error")`` (nothing more when the bus aborted the stream)."""
        await self._on_loop(self._finish, run_id, "error", f"{type(error).__name__}: {error}")

    async def _finish(self, run_id: UUID, op: str, value: Any) -> None:
        run = self._runs.pop(run_id, None)
        if run is None:
            return
        if run.aborted is None and not run.done.is_set():
            # The writer task may be gone already (aborted): nothing left to tell it.
            with contextlib.suppress(anyio.BrokenResourceError, anyio.ClosedResourceError):
                await run.send.send((op, value))
        run.send.close()
        await run.done.wait()
