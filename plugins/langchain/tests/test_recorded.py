from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from langchain_core.messages import AIMessage, AIMessageChunk, HumanMessage
from pydantic import ValidationError
from streambus_langchain import BusCallbackHandler, ChatModelProducer, RecordedChatModel, RecordedStreamError

from streambus import Bus, DeltaEvent, EndEvent, ErrorEvent, RecordingError, StartEvent, Usage
from streambus.recording import write_recording
from streambus.testing import EventCapture

pytestmark = pytest.mark.anyio


def test_invoke_answers_with_each_recorded_stream_in_turn(recording: Path) -> None:
    model = RecordedChatModel(path=str(recording))
    first = model.invoke("hi")
    assert isinstance(first, AIMessage)
    assert first.content == "Hello there, friend!"
    assert first.usage_metadata == {"input_tokens": 5, "output_tokens": 4, "total_tokens": 9}
    assert first.response_metadata["finish_reason"] == "stop"
    assert first.response_metadata["model_name"] == "llama3"
    second = model.invoke([HumanMessage("weather in Oslo?")])
    assert second.content == "Checking the weather."
    assert second.additional_kwargs["reasoning_content"] == "thinking..."
    assert [b["type"] for b in second.content_blocks] == ["reasoning", "text", "tool_call"]
    assert second.tool_calls == [{"name": "weather", "args": {"city": "Oslo"}, "id": "c1", "type": "tool_call"}]
    assert second.response_metadata["finish_reason"] == "tool_calls"
    third = model.invoke("and you?")
    assert (third.content, third.response_metadata["model_name"]) == ("Hi from qwen.", "qwen3")
    # loop=True (the default) starts over.
    assert model.invoke("again").content == "Hello there, friend!"


def test_model_selects_that_models_streams(recording: Path) -> None:
    model = RecordedChatModel(path=str(recording), model="llama3")
    assert [model.invoke("x").content for _ in range(3)] == [
        "Hello there, friend!",
        "Checking the weather.",
        "Hello there, friend!",
    ]
    # A per-call model= overrides it (as provider chat models allow).
    override = model.invoke("x", model="qwen3")
    assert (override.content, override.response_metadata["model_name"]) == ("Hi from qwen.", "qwen3")
    with pytest.raises(ValueError, match=r"model: no stream of .* was recorded from 'gpt-4' \(models: llama3, qwen3\)"):
        model.invoke("x", model="gpt-4")
    with pytest.raises(ValidationError, match="model: no stream of"):
        RecordedChatModel(path=str(recording), model="gpt-4")


def test_stream_replays_chunk_for_chunk(recording: Path) -> None:
    model = RecordedChatModel(path=str(recording), stream_id="s1")
    chunks = list(model.stream("hi"))
    assert all(isinstance(c, AIMessageChunk) for c in chunks)
    assert [c.content for c in chunks] == ["Hello", " there,", " friend!", ""]
    assert chunks[-1].chunk_position == "last"
    full = chunks[0]
    for c in chunks[1:]:
        full = full + c
    assert full.content == "Hello there, friend!"
    assert full.usage_metadata == {"input_tokens": 5, "output_tokens": 4, "total_tokens": 9}


async def test_astream_replays_reasoning_and_tool_call_chunks(recording: Path) -> None:
    model = RecordedChatModel(path=str(recording), stream_id="s2")
    chunks = [c async for c in model.astream("weather?")]
    full = chunks[0]
    for c in chunks[1:]:
        full = full + c
    assert isinstance(full, AIMessageChunk)
    assert full.text == "Checking the weather."
    assert full.tool_calls == [{"name": "weather", "args": {"city": "Oslo"}, "id": "c1", "type": "tool_call"}]
    assert [b["type"] for b in full.content_blocks] == ["reasoning", "text", "tool_call"]
    assert full.usage_metadata == {"input_tokens": 20, "output_tokens": 8, "total_tokens": 28}


async def test_recorded_model_round_trips_through_the_bus(recording: Path) -> None:
    """Recording -> LangChain model -> producer -> bus gives back the recorded stream."""
    model = RecordedChatModel(path=str(recording))
    async with Bus() as bus:
        capture = EventCapture().attach(bus)
        handler = BusCallbackHandler(bus)
        producer = ChatModelProducer(chat_model=model)
        s1 = await producer.generate(bus, "hi", config={"callbacks": [handler]})
        s2 = await producer.generate(bus, "weather?")
    assert capture.start(s1).model == "llama3"
    assert capture.start(s1).provider == "streambus"
    capture.assert_text("Hello there, friend!", s1)
    assert capture.end(s1).usage == Usage(prompt_tokens=5, completion_tokens=4, total_tokens=9)
    assert capture.text(s2, "reasoning") == "thinking..."
    assert capture.end(s2).reason == "tool_calls"
    # The callback handler saw the same run as its own stream.
    (run_stream,) = handler.stream_ids
    capture.assert_text("Hello there, friend!", run_stream)


def test_stop_sequences_cut_the_answer(recording: Path) -> None:
    model = RecordedChatModel(path=str(recording), stream_id="s1", stop=["friend"])
    assert model.invoke("hi").content == "Hello there, "
    message = model.invoke("hi", stop=[","])
    assert message.content == "Hello there"
    assert message.response_metadata["finish_reason"] == "stop"
    assert [c.content for c in model.stream("hi", stop=["ere"])] == ["Hello", " th", ""]


def test_recorded_error_raises_after_the_text(tmp_path: Path) -> None:
    path = tmp_path / "err.jsonl"
    write_recording(
        path,
        [
            StartEvent(stream="e", seq=0, ts=1.0, model="m"),
            DeltaEvent(stream="e", seq=1, ts=1.1, text="partial"),
            ErrorEvent(stream="e", seq=2, ts=1.2, kind="upstream_timeout", message="no answer", retryable=True),
        ],
    )
    model = RecordedChatModel(path=str(path))
    seen: list[str] = []
    with pytest.raises(RecordedStreamError, match="upstream_timeout: no answer") as info:
        for chunk in model.stream("x"):
            seen.append(str(chunk.content))
    assert seen == ["partial"]
    assert info.value.retryable is True
    with pytest.raises(RecordedStreamError):
        model.invoke("x")


def test_loop_false_is_exhausted(recording: Path) -> None:
    model = RecordedChatModel(path=str(recording), loop=False)
    for _ in range(3):
        model.invoke("x")
    with pytest.raises(RecordedStreamError, match="exhausted"):
        model.invoke("x")


async def test_speed_replays_the_recorded_gaps(tmp_path: Path) -> None:
    path = tmp_path / "timed.jsonl"
    write_recording(
        path,
        [
            StartEvent(stream="t", seq=0, ts=1.0, model="m"),
            DeltaEvent(stream="t", seq=1, ts=1.0, text="a"),
            DeltaEvent(stream="t", seq=2, ts=1.02, text="b"),
            EndEvent(stream="t", seq=3, ts=1.02),
        ],
    )
    model = RecordedChatModel(path=str(path), speed=2.0)
    assert "".join(str(c.content) for c in model.stream("x")) == "ab"
    assert "".join([str(c.content) async for c in model.astream("x")]) == "ab"


def test_bad_inputs_are_clear(recording: Path, tmp_path: Path) -> None:
    with pytest.raises(ValidationError, match="stream_id: 'nope' is not in"):
        RecordedChatModel(path=str(recording), stream_id="nope")
    with pytest.raises(RecordingError, match="cannot open recording"):
        RecordedChatModel(path=str(tmp_path / "missing.jsonl"))
    with pytest.raises(ValidationError, match="speed"):
        RecordedChatModel(path=str(recording), speed=-1)
    empty = tmp_path / "empty.jsonl"
    write_recording(empty, [])
    with pytest.raises(ValidationError, match="holds no complete stream"):
        RecordedChatModel(path=str(empty))


# -- langchain-core's standard expectations, replicated -----------------------------------
# The same checks as langchain_tests' ChatModelIntegrationTests (test_invoke, test_ainvoke,
# test_stream, test_astream, test_batch, test_abatch, test_conversation, test_usage_metadata,
# test_usage_metadata_streaming); test_standard.py runs that suite itself when it is installed.


def _model(recording: Path) -> RecordedChatModel:
    return RecordedChatModel(path=str(recording), stream_id="s1")


def test_standard_invoke_and_batch(recording: Path) -> None:
    model = _model(recording)
    result = model.invoke("Hello")
    assert isinstance(result, AIMessage)
    assert isinstance(result.text, str)
    assert len(result.content) > 0
    batch = model.batch(["Hello", "Hey"])
    assert len(batch) == 2
    assert all(isinstance(m, AIMessage) and m.content for m in batch)
    conversation = model.invoke([HumanMessage("hello"), AIMessage("hello"), HumanMessage("how are you")])
    assert isinstance(conversation, AIMessage)
    assert conversation.content


async def test_standard_ainvoke_and_abatch(recording: Path) -> None:
    model = _model(recording)
    result = await model.ainvoke("Hello")
    assert isinstance(result, AIMessage)
    assert result.content
    batch = await model.abatch(["Hello", "Hey"])
    assert all(isinstance(m, AIMessage) and m.content for m in batch)


@pytest.mark.parametrize("output_version", [None, "v1"])
async def test_standard_stream_and_astream(recording: Path, output_version: Any) -> None:
    model = _model(recording)
    if output_version:
        model = RecordedChatModel(path=str(recording), stream_id="s1", output_version=output_version)
    for chunks in (list(model.stream("Hello")), [c async for c in model.astream("Hello")]):
        full: AIMessageChunk | None = None
        for chunk in chunks:
            assert isinstance(chunk, AIMessageChunk)
            assert isinstance(chunk.content, str | list)
            full = chunk if full is None else full + chunk
        assert isinstance(full, AIMessageChunk)
        assert full.content
        assert full.text
        assert len([b for b in full.content_blocks if b["type"] == "text"]) == 1
        assert chunks[-1].chunk_position == "last"


def test_standard_usage_metadata(recording: Path) -> None:
    model = _model(recording)
    result = model.invoke("Hello")
    assert result.usage_metadata is not None
    assert isinstance(result.usage_metadata["input_tokens"], int)
    assert isinstance(result.usage_metadata["output_tokens"], int)
    assert isinstance(result.usage_metadata["total_tokens"], int)
    assert result.response_metadata["model_name"]
    full: AIMessageChunk | None = None
    for chunk in model.stream("Write me 2 haikus."):
        full = chunk if full is None else full + chunk
        # Usage arrives once (on the last chunk), so summing chunks does not double count.
    assert full is not None
    assert full.usage_metadata is not None
    usage = full.usage_metadata
    assert usage["input_tokens"] + usage["output_tokens"] == usage["total_tokens"] == 9
    assert full.response_metadata["model_name"]
