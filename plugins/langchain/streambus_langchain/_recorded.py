"""A LangChain chat model that answers from a streambus recording (tests without a model)."""

from __future__ import annotations

import asyncio
import itertools
import threading
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import orjson
from langchain_core.callbacks import AsyncCallbackManagerForLLMRun, CallbackManagerForLLMRun
from langchain_core.language_models import BaseChatModel, LangSmithParams
from langchain_core.messages import AIMessage, AIMessageChunk, BaseMessage
from langchain_core.outputs import ChatGeneration, ChatGenerationChunk, ChatResult
from pydantic import ConfigDict, Field, PrivateAttr, model_validator

from streambus.events import AbortEvent, DeltaEvent, EndEvent, ErrorEvent, Event, StartEvent
from streambus.formats import tool_fragments
from streambus.recording import read_recording
from streambus.wire import merge_tool_calls

from ._errors import RecordedStreamError
from ._mapping import langchain_usage

__all__ = ["RecordedChatModel"]


class _Answer:
    """One recorded stream, digested: its chunks in order and how it ended."""

    __slots__ = ("chunks", "error", "model", "reason", "terminal", "usage")

    def __init__(self, events: list[Event]) -> None:
        start = events[0]
        self.model = start.model if isinstance(start, StartEvent) else ""
        self.chunks: list[tuple[float, DeltaEvent]] = []
        self.terminal: Event | None = None
        previous = start.ts
        for event in events:
            if isinstance(event, DeltaEvent):
                self.chunks.append((max(0.0, event.ts - previous), event))
                previous = event.ts
            elif isinstance(event, EndEvent | ErrorEvent | AbortEvent):
                self.terminal = event
        end = self.terminal
        self.reason = end.reason if isinstance(end, EndEvent) else "abort" if isinstance(end, AbortEvent) else "error"
        self.usage = langchain_usage(end.usage) if isinstance(end, EndEvent) else None
        self.error = end if isinstance(end, ErrorEvent) else None


class RecordedChatModel(BaseChatModel):
    """A chat model whose answers are the streams of a recording, chunk for chunk.

    ::

        model = RecordedChatModel(path="tests/data/hello.jsonl")
        assert model.invoke("hi").content == "Hello there!"

    Each call (``invoke``, ``stream``, ``astream``, ``batch`` ...) answers with
    the next recorded stream (or the one named by ``stream_id``; with
    ``model``, or a per-call ``model=`` override, the next one recorded from
    that model), cycling when ``loop`` is true. Content deltas become ``AIMessageChunk`` content,
    reasoning deltas ``additional_kwargs["reasoning_content"]`` (LangChain
    shows them as ``reasoning`` content blocks), tool deltas
    ``tool_call_chunks`` (whole ``tool_calls`` on ``invoke``); the final chunk
    carries ``usage_metadata`` from the recorded ``end`` and
    ``response_metadata["finish_reason"]``. A recorded ``error`` raises
    :class:`RecordedStreamError` after the text before it was streamed.
    ``speed`` replays the recorded gaps between chunks (1.0 = real time;
    0, the default, as fast as possible). ``stop`` sequences cut the answer.
    """

    model_config = ConfigDict(arbitrary_types_allowed=True)

    path: str
    """The recording file (``.jsonl`` or ``.jsonl.gz``)."""
    stream_id: str | None = None
    """Answer with this stream id only (default: every stream in turn)."""
    loop: bool = True
    """Start again at the first stream after the last; otherwise raise once exhausted."""
    speed: float = Field(default=0.0, ge=0.0)
    """Replay the recorded timing at this speed factor; 0 replays as fast as possible."""
    stop: list[str] | None = None
    """Stop sequences: the answer is cut before the first one (reason ``stop``)."""
    model_name: str | None = Field(default=None, alias="model")
    """Answer only with streams recorded from this model (default: any)."""

    _answers: list[_Answer] = PrivateAttr(default_factory=list)
    _orders: dict[str | None, Iterator[int]] = PrivateAttr(default_factory=dict)
    _lock: threading.Lock = PrivateAttr(default_factory=threading.Lock)

    @model_validator(mode="after")
    def _load(self) -> RecordedChatModel:
        recording = read_recording(self.path)
        by_stream: dict[str, list[Event]] = {}
        for event in recording.events:
            by_stream.setdefault(event.stream, []).append(event)
        if self.stream_id is not None:
            if self.stream_id not in by_stream:
                known = ", ".join(by_stream) or "none"
                raise ValueError(f"stream_id: {self.stream_id!r} is not in {self.path} (streams: {known})")
            by_stream = {self.stream_id: by_stream[self.stream_id]}
        answers = [_Answer(events) for events in by_stream.values() if isinstance(events[0], StartEvent)]
        if not answers:
            raise ValueError(f"path: {self.path} holds no complete stream (a start event and what follows)")
        self._answers = answers
        if self.model_name is not None:
            self._order_for(self.model_name)  # fail now, naming the recorded models
        return self

    def _order_for(self, model: str | None) -> Iterator[int]:
        order = self._orders.get(model)
        if order is None:
            indexes = [i for i, a in enumerate(self._answers) if model is None or a.model == model]
            if not indexes:
                known = ", ".join(sorted({a.model for a in self._answers}))
                raise ValueError(f"model: no stream of {self.path} was recorded from {model!r} (models: {known})")
            order = self._orders[model] = itertools.cycle(indexes) if self.loop else iter(indexes)
        return order

    @property
    def _llm_type(self) -> str:
        return "streambus-recording"

    @property
    def _identifying_params(self) -> dict[str, Any]:
        return {"path": self.path, "stream_id": self.stream_id, "model": self.model_name}

    def _get_ls_params(self, stop: list[str] | None = None, **kwargs: Any) -> LangSmithParams:
        params = super()._get_ls_params(stop=stop, **kwargs)
        params["ls_provider"] = "streambus"
        params["ls_model_name"] = kwargs.get("model") or self.model_name or self._answers[0].model
        return params

    def _next(self, kwargs: dict[str, Any]) -> _Answer:
        # A per-call ``model=`` picks among that model's recorded streams.
        model = kwargs.get("model") or self.model_name
        with self._lock:
            index = next(self._order_for(model), None)
        if index is None:
            raise RecordedStreamError("exhausted", f"every stream of {self.path} was already used (loop=False)")
        return self._answers[index]

    # -- chunk building ----------------------------------------------------------------
    def _chunks(self, answer: _Answer, stop: list[str] | None) -> Iterator[tuple[float, AIMessageChunk | None]]:
        """Yield ``(delay, chunk)``; a ``None`` chunk means "raise the recorded error now"."""
        stops = [s for s in (stop if stop is not None else self.stop) or [] if s]
        text_so_far = ""
        reason = answer.reason
        name = answer.model
        for delay, delta in answer.chunks:
            if delta.channel == "content":
                text = delta.text
                if stops:
                    candidate = text_so_far + text
                    cut = min((i for i in (candidate.find(s) for s in stops) if i >= 0), default=-1)
                    if cut >= 0:
                        text = candidate[:cut][len(text_so_far) :]
                        if text:
                            yield delay, AIMessageChunk(content=text)
                        reason = "stop"
                        break
                    text_so_far = candidate
                yield delay, AIMessageChunk(content=text)
            elif delta.channel == "reasoning":
                yield delay, AIMessageChunk(content="", additional_kwargs={"reasoning_content": delta.text})
            else:
                fragments = tool_fragments(delta)
                yield (
                    delay,
                    AIMessageChunk(
                        content="",
                        tool_call_chunks=[
                            {
                                "name": f.name,
                                "args": f.arguments,
                                "id": f.id,
                                "index": f.index,
                                "type": "tool_call_chunk",
                            }
                            for f in fragments
                        ],
                    ),
                )
        else:
            if answer.error is not None:
                yield 0.0, None
                return
        metadata: dict[str, Any] = {"finish_reason": reason, "model_name": name, "model_provider": "streambus"}
        if isinstance(answer.terminal, AbortEvent):
            metadata["abort_by"] = answer.terminal.by
        yield (
            0.0,
            AIMessageChunk(
                content="",
                usage_metadata=answer.usage,  # type: ignore[arg-type]
                response_metadata=metadata,
                chunk_position="last",
            ),
        )

    def _raise(self, answer: _Answer) -> None:
        error = answer.error
        assert error is not None
        raise RecordedStreamError(error.kind, error.message, retryable=error.retryable)

    # -- LangChain's hooks -------------------------------------------------------------------
    def _generate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        answer = self._next(kwargs)
        full: AIMessageChunk | None = None
        for _, chunk in self._chunks(answer, stop):
            if chunk is None:
                self._raise(answer)
            else:
                full = chunk if full is None else full + chunk
        assert full is not None
        message = AIMessage(
            content=full.content,
            additional_kwargs=full.additional_kwargs,
            tool_calls=full.tool_calls,
            usage_metadata=full.usage_metadata,
            response_metadata=full.response_metadata,
        )
        if not message.tool_calls:
            # Calls whose arguments were not valid JSON: keep them visible, as invalid calls.
            tool_deltas = (d for _, d in answer.chunks if d.channel == "tool")
            for call in merge_tool_calls(f for d in tool_deltas for f in tool_fragments(d)):
                try:
                    args = orjson.loads(call.arguments or "{}")
                except orjson.JSONDecodeError:
                    continue
                message.tool_calls.append({"name": call.name, "args": args, "id": call.id, "type": "tool_call"})
        return ChatResult(generations=[ChatGeneration(message=message)])

    def _stream(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> Iterator[ChatGenerationChunk]:
        answer = self._next(kwargs)
        for delay, chunk in self._chunks(answer, stop):
            if chunk is None:
                self._raise(answer)
                return
            if self.speed and delay:
                time.sleep(delay / self.speed)
            generation = ChatGenerationChunk(message=chunk)
            if run_manager is not None:
                run_manager.on_llm_new_token(chunk.text, chunk=generation)
            yield generation

    async def _astream(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: AsyncCallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> AsyncIterator[ChatGenerationChunk]:
        answer = self._next(kwargs)
        for delay, chunk in self._chunks(answer, stop):
            if chunk is None:
                self._raise(answer)
                return
            if self.speed and delay:
                await asyncio.sleep(delay / self.speed)
            generation = ChatGenerationChunk(message=chunk)
            if run_manager is not None:
                await run_manager.on_llm_new_token(chunk.text, chunk=generation)
            yield generation
