from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from langchain_core.callbacks import AsyncCallbackManagerForLLMRun, CallbackManagerForLLMRun
from langchain_core.language_models import BaseChatModel
from langchain_core.messages import AIMessage, AIMessageChunk, BaseMessage
from langchain_core.outputs import ChatGeneration, ChatGenerationChunk, ChatResult
from pydantic import Field

from streambus import DeltaEvent, EndEvent, StartEvent, Usage
from streambus.recording import write_recording
from streambus.wire import ToolCallFragment, tool_text


def pytest_configure(config: pytest.Config) -> None:
    # langchain-tests marks tests with pytest-benchmark and pytest-recording markers;
    # those plugins are not installed here (see test_standard.py), so declare the marker.
    config.addinivalue_line("markers", "benchmark: pytest-benchmark timing test (langchain-tests)")
    config.addinivalue_line("markers", "vcr: pytest-recording cassette test (langchain-tests)")


@pytest.fixture
def anyio_backend() -> str:
    """LangChain's async API is asyncio-bound; trio is tested only for the clear error it gets."""
    return "asyncio"


class ScriptedChatModel(BaseChatModel):
    """A fake chat model that streams exactly the chunks it is given (callbacks included).

    langchain-core's ``GenericFakeChatModel`` only splits string content; this
    one covers content blocks, reasoning, tool-call chunks and usage metadata.
    ``fail_after`` raises after that many chunks; ``forever`` repeats the
    chunks without end (for abort tests) and records when it was closed.
    """

    chunks: list[AIMessageChunk]
    fail_after: int | None = None
    forever: bool = False
    closed: list[bool] = Field(default_factory=list)

    @property
    def _llm_type(self) -> str:
        return "scripted"

    def _generate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        full = self.chunks[0]
        for chunk in self.chunks[1:]:
            full = full + chunk
        message = AIMessage(
            content=full.content,
            additional_kwargs=full.additional_kwargs,
            tool_calls=full.tool_calls,
            usage_metadata=full.usage_metadata,
            response_metadata=full.response_metadata,
        )
        return ChatResult(generations=[ChatGeneration(message=message)])

    def _stream(self, *args: Any, **kwargs: Any) -> Iterator[ChatGenerationChunk]:
        raise NotImplementedError  # only the async path is exercised

    async def _astream(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: AsyncCallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> AsyncIterator[ChatGenerationChunk]:
        count = 0
        try:
            while True:
                for chunk in self.chunks:
                    if self.fail_after is not None and count == self.fail_after:
                        raise ConnectionError("upstream went away")
                    count += 1
                    generation = ChatGenerationChunk(message=chunk)
                    if run_manager is not None:
                        await run_manager.on_llm_new_token(chunk.text, chunk=generation)
                    yield generation
                if not self.forever:
                    return
        finally:
            self.closed.append(True)


RICH_CHUNKS = [
    AIMessageChunk(content=[{"type": "reasoning", "reasoning": "The user wants "}]),
    AIMessageChunk(content="", additional_kwargs={"reasoning_content": "the weather."}),
    AIMessageChunk(content=[{"type": "text", "text": "Let me "}, {"type": "text", "text": "check. "}]),
    AIMessageChunk(content="Calling", usage_metadata={"input_tokens": 11, "output_tokens": 2, "total_tokens": 13}),
    AIMessageChunk(content="", tool_call_chunks=[{"name": "weather", "args": '{"city": ', "id": "call_1", "index": 0}]),
    AIMessageChunk(content="", tool_call_chunks=[{"name": None, "args": '"Paris"}', "id": None, "index": 0}]),
    AIMessageChunk(
        content="",
        usage_metadata={"input_tokens": 0, "output_tokens": 7, "total_tokens": 7},
        response_metadata={"finish_reason": "tool_calls"},
        chunk_position="last",
    ),
]


@pytest.fixture
def scripted() -> type[ScriptedChatModel]:
    """The scripted fake chat model class."""
    return ScriptedChatModel


@pytest.fixture
def rich_model() -> ScriptedChatModel:
    return ScriptedChatModel(chunks=RICH_CHUNKS)


def make_recording(path: Path) -> Path:
    """Three recorded streams: llama3 answers plainly, then with reasoning and a tool call; then qwen3."""
    events = [
        StartEvent(stream="s1", seq=0, ts=100.0, model="llama3", provider="ollama"),
        DeltaEvent(stream="s1", seq=1, ts=100.1, text="Hello"),
        DeltaEvent(stream="s1", seq=2, ts=100.2, text=" there,"),
        DeltaEvent(stream="s1", seq=3, ts=100.3, text=" friend!"),
        EndEvent(
            stream="s1",
            seq=4,
            ts=100.4,
            reason="stop",
            usage=Usage(prompt_tokens=5, completion_tokens=4, total_tokens=9),
        ),
        StartEvent(stream="s2", seq=0, ts=200.0, model="llama3", provider="ollama"),
        DeltaEvent(stream="s2", seq=1, ts=200.1, text="thinking...", channel="reasoning"),
        DeltaEvent(stream="s2", seq=2, ts=200.2, text="Checking the weather."),
        DeltaEvent(
            stream="s2",
            seq=3,
            ts=200.3,
            channel="tool",
            text=tool_text(ToolCallFragment(index=0, id="c1", name="weather", arguments='{"city":')),
        ),
        DeltaEvent(
            stream="s2", seq=4, ts=200.4, channel="tool", text=tool_text(ToolCallFragment(index=0, arguments='"Oslo"}'))
        ),
        EndEvent(
            stream="s2",
            seq=5,
            ts=200.5,
            reason="tool_calls",
            usage=Usage(prompt_tokens=20, completion_tokens=8, total_tokens=28),
        ),
        StartEvent(stream="s3", seq=0, ts=300.0, model="qwen3", provider="ollama"),
        DeltaEvent(stream="s3", seq=1, ts=300.1, text="Hi from qwen."),
        EndEvent(stream="s3", seq=2, ts=300.2, usage=Usage(prompt_tokens=3, completion_tokens=4, total_tokens=7)),
    ]
    write_recording(path, events)
    return path


@pytest.fixture
def recording(tmp_path: Path) -> Path:
    return make_recording(tmp_path / "rec.jsonl")
