from __future__ import annotations

from typing import Any

import anyio
import anyio.to_thread
import pytest
from langchain_core.language_models import GenericFakeChatModel
from langchain_core.language_models.fake_chat_models import FakeListChatModel
from langchain_core.messages import AIMessage, AIMessageChunk
from langchain_core.output_parsers import StrOutputParser
from langchain_core.prompts import ChatPromptTemplate
from langchain_core.runnables import RunnableLambda
from streambus_langchain import BusCallbackHandler, StreamAborted, WrongEventLoop

from streambus import AbortEvent, Bus, DeltaEvent, EndEvent, ErrorEvent, Usage
from streambus.testing import EventCapture
from streambus.wire import merge_tool_calls, parse_tool_text

pytestmark = pytest.mark.anyio

PROMPT = ChatPromptTemplate.from_messages([("system", "Be brief."), ("user", "{question}")])


async def test_streamed_chain_publishes_one_stream_per_model_run_with_parents() -> None:
    model = GenericFakeChatModel(messages=iter(["Paris is the capital."]))
    chain = PROMPT | model | StrOutputParser()
    async with Bus() as bus:
        capture = EventCapture().attach(bus)
        handler = BusCallbackHandler(bus, meta={"session": "s9"})
        pieces = [p async for p in chain.astream({"question": "capital?"}, config={"callbacks": [handler]})]
    assert "".join(pieces) == "Paris is the capital."
    (stream_id,) = handler.stream_ids
    assert capture.streams == [stream_id]
    start = capture.start(stream_id)
    assert start.meta["run_id"] == stream_id
    assert start.meta["session"] == "s9"
    # The model's parent is the RunnableSequence: the chain's own run, at the root.
    assert start.meta["parent_run_ids"] == [start.meta["parent_run_id"]]
    assert start.provider == "genericfakechatmodel"
    capture.assert_text("Paris is the capital.", stream_id)
    assert len([e for e in capture.of(stream_id) if isinstance(e, DeltaEvent)]) > 1
    assert capture.end(stream_id).reason == "stop"
    capture.assert_complete(stream_id)


async def test_nested_runs_carry_the_whole_ancestry() -> None:
    inner_model = FakeListChatModel(responses=["inner answer"])

    async def ask(question: str, config: Any) -> str:
        message = await inner_model.ainvoke(question, config=config)
        return str(message.content)

    outer = RunnableLambda(lambda x: x["q"]) | RunnableLambda(ask)
    async with Bus() as bus:
        capture = EventCapture().attach(bus)
        handler = BusCallbackHandler(bus)
        result = await outer.ainvoke({"q": "hi"}, config={"callbacks": [handler]})
    assert result == "inner answer"
    (stream_id,) = handler.stream_ids
    meta = capture.start(stream_id).meta
    # model <- RunnableLambda(ask) <- RunnableSequence: two ancestors, nearest first.
    assert len(meta["parent_run_ids"]) == 2
    assert meta["parent_run_ids"][0] == meta["parent_run_id"]
    # ainvoke does not stream: the whole answer arrives as one delta at the end.
    deltas = [e for e in capture.of(stream_id) if isinstance(e, DeltaEvent)]
    assert [d.text for d in deltas] == ["inner answer"]


async def test_channels_usage_and_reason_from_chat_model_chunks(rich_model: Any) -> None:
    async with Bus() as bus:
        capture = EventCapture().attach(bus)
        handler = BusCallbackHandler(bus)
        full: AIMessageChunk | None = None
        async for chunk in rich_model.astream("weather?", config={"callbacks": [handler], "tags": ["t1"]}):
            full = chunk if full is None else full + chunk
    assert full is not None
    (stream_id,) = handler.stream_ids
    assert capture.start(stream_id).meta["tags"] == ["t1"]
    assert capture.text(stream_id, "reasoning") == "The user wants the weather."
    assert capture.text(stream_id) == "Let me check. Calling"
    (call,) = merge_tool_calls(parse_tool_text(capture.text(stream_id, "tool")))
    assert (call.name, call.arguments) == ("weather", '{"city": "Paris"}')
    end = capture.end(stream_id)
    assert end.reason == "tool_calls"
    assert end.usage == Usage(prompt_tokens=11, completion_tokens=9, total_tokens=20)


async def test_model_error_becomes_an_error_event(scripted: Any) -> None:
    model = scripted(chunks=[AIMessageChunk(content="par"), AIMessageChunk(content="tial")], fail_after=1)
    async with Bus() as bus:
        capture = EventCapture().attach(bus)
        handler = BusCallbackHandler(bus)
        with pytest.raises(ConnectionError):
            async for _ in model.astream("x", config={"callbacks": [handler]}):
                pass
    (stream_id,) = handler.stream_ids
    assert capture.text(stream_id) == "par"
    terminal = capture.terminal(stream_id)
    assert isinstance(terminal, ErrorEvent)
    assert terminal.kind == "model_error"
    assert "upstream went away" in terminal.message


async def test_aborting_the_stream_stops_the_run(scripted: Any) -> None:
    model = scripted(chunks=[AIMessageChunk(content="tick ")], forever=True)
    async with Bus() as bus:
        capture = EventCapture().attach(bus)
        handler = BusCallbackHandler(bus, buffer=2)

        class AbortOnThird:
            async def run(self, events: Any) -> None:
                count = 0
                async for event in events:
                    if isinstance(event, DeltaEvent):
                        count += 1
                        if count == 3:
                            assert bus.abort(event.stream, "too long", "moderation")

        bus.add_sink(AbortOnThird())
        received = 0
        with pytest.raises(StreamAborted) as info:
            async for _ in model.astream("go", config={"callbacks": [handler]}):
                received += 1
                assert received < 10_000, "the run was not stopped"
    (stream_id,) = handler.stream_ids
    assert (info.value.stream, info.value.reason, info.value.by) == (stream_id, "too long", "moderation")
    terminal = capture.terminal(stream_id)
    assert isinstance(terminal, AbortEvent)
    assert model.closed == [True]


async def test_concurrent_runs_get_separate_streams() -> None:
    model_a = GenericFakeChatModel(messages=iter(["alpha one two"]))
    model_b = GenericFakeChatModel(messages=iter(["beta three four"]))
    async with Bus() as bus:
        capture = EventCapture().attach(bus)
        handler = BusCallbackHandler(bus)

        async def drain(model: Any) -> None:
            async for _ in model.astream("x", config={"callbacks": [handler]}):
                await anyio.lowlevel.checkpoint()

        async with anyio.create_task_group() as tg:
            tg.start_soon(drain, model_a)
            tg.start_soon(drain, model_b)
    assert len(handler.stream_ids) == 2
    assert sorted(capture.texts().values()) == ["alpha one two", "beta three four"]
    for stream_id in handler.stream_ids:
        capture.assert_complete(stream_id)


async def test_sync_runs_in_a_worker_thread_reach_the_bus() -> None:
    model = GenericFakeChatModel(messages=iter([AIMessage(content="from a thread", usage_metadata=None)]))
    async with Bus() as bus:
        capture = EventCapture().attach(bus)
        handler = BusCallbackHandler(bus)

        def run_sync() -> str:
            return "".join(str(c.content) for c in model.stream("hi", config={"callbacks": [handler]}))

        assert await anyio.to_thread.run_sync(run_sync) == "from a thread"
        await capture.wait_streams(1)
    (stream_id,) = handler.stream_ids
    capture.assert_text("from a thread", stream_id)
    assert isinstance(capture.terminal(stream_id), EndEvent)


async def test_buffer_must_be_positive() -> None:
    async with Bus() as bus:
        with pytest.raises(ValueError, match="buffer: must be at least 1"):
            BusCallbackHandler(bus, buffer=0)


@pytest.mark.parametrize("anyio_backend", ["trio"])
async def test_trio_gets_a_clear_error() -> None:
    async with Bus() as bus:
        with pytest.raises(WrongEventLoop, match="BusCallbackHandler needs asyncio"):
            BusCallbackHandler(bus)


async def test_completion_llms_are_published_too() -> None:
    from langchain_core.language_models import FakeListLLM

    llm = FakeListLLM(responses=["plain completion"])
    async with Bus() as bus:
        capture = EventCapture().attach(bus)
        handler = BusCallbackHandler(bus)
        assert await llm.ainvoke("hi", config={"callbacks": [handler]}) == "plain completion"
        # A sync, non-streamed run from a worker thread takes the same path.
        answer = await anyio.to_thread.run_sync(lambda: llm.invoke("again", config={"callbacks": [handler]}))
        assert answer == "plain completion"
        await capture.wait_streams(2)
    assert len(handler.stream_ids) == 2
    for stream_id in handler.stream_ids:
        capture.assert_text("plain completion", stream_id)
        assert capture.end(stream_id).reason == "stop"
        assert capture.start(stream_id).meta["run_id"] == stream_id


async def test_a_closed_bus_never_breaks_the_app() -> None:
    async with Bus() as bus:
        handler = BusCallbackHandler(bus)
    # The bus is gone: publishing fails, the chain does not.
    model = GenericFakeChatModel(messages=iter(["still works"]))
    text = "".join([str(c.content) async for c in model.astream("x", config={"callbacks": [handler]})])
    assert text == "still works"
    assert handler.stream_ids == []
