from __future__ import annotations

from typing import Any

import anyio
import pytest
from langchain_core.language_models import GenericFakeChatModel
from langchain_core.messages import AIMessage, AIMessageChunk
from streambus_langchain import ChatModelProducer, WrongEventLoop, model_identity

from streambus import AbortEvent, Bus, BusClosed, ConfigError, DeltaEvent, EndEvent, ErrorEvent, Usage
from streambus.plugins import build
from streambus.testing import EventCapture
from streambus.wire import merge_tool_calls, parse_tool_text

pytestmark = pytest.mark.anyio


async def test_string_content_from_generic_fake_model() -> None:
    model = GenericFakeChatModel(messages=iter([AIMessage(content="Hello from the fake model")]))
    producer = ChatModelProducer(chat_model=model, meta={"session": "s1"})
    async with Bus() as bus:
        capture = EventCapture().attach(bus)
        stream_id = await producer.generate(bus, [("user", "hi")], meta={"turn": 1})
    start = capture.start(stream_id)
    assert start.provider == "genericfakechatmodel"
    assert start.meta == {"session": "s1", "turn": 1}
    deltas = [e for e in capture.of(stream_id) if isinstance(e, DeltaEvent)]
    # The fake model splits on whitespace, keeping it: one delta per piece.
    assert [d.text for d in deltas] == ["Hello", " ", "from", " ", "the", " ", "fake", " ", "model"]
    end = capture.end(stream_id)
    assert end.reason == "stop"
    assert end.usage is None
    assert end.timings["total_duration"] >= end.timings["time_to_first_token"] > 0


async def test_content_blocks_reasoning_tool_chunks_and_usage(rich_model: Any) -> None:
    async with Bus() as bus:
        capture = EventCapture().attach(bus)
        stream_id = await ChatModelProducer(chat_model=rich_model).generate(bus, "weather in Paris?")
    assert capture.start(stream_id).provider == "scriptedchatmodel"
    assert capture.text(stream_id, "reasoning") == "The user wants the weather."
    assert capture.text(stream_id) == "Let me check. Calling"
    (call,) = merge_tool_calls(parse_tool_text(capture.text(stream_id, "tool")))
    assert (call.id, call.name, call.arguments) == ("call_1", "weather", '{"city": "Paris"}')
    channels = [e.channel for e in capture.of(stream_id) if isinstance(e, DeltaEvent)]
    assert channels == ["reasoning", "reasoning", "content", "content", "content", "tool", "tool"]
    end = capture.end(stream_id)
    assert end.reason == "tool_calls"
    # usage_metadata of every chunk is summed, as LangChain's own chunk addition does.
    assert end.usage == Usage(prompt_tokens=11, completion_tokens=9, total_tokens=20, source="provider")


async def test_finish_reason_is_normalised(scripted: Any) -> None:
    model = scripted(
        chunks=[AIMessageChunk(content="cut", response_metadata={"stop_reason": "max_tokens"}, chunk_position="last")]
    )
    async with Bus() as bus:
        capture = EventCapture().attach(bus)
        stream_id = await ChatModelProducer(chat_model=model).generate(bus, "x")
    assert capture.end(stream_id).reason == "length"


async def test_abort_closes_the_model_stream(scripted: Any) -> None:
    model = scripted(chunks=[AIMessageChunk(content="tick ")], forever=True)
    producer = ChatModelProducer(chat_model=model)
    async with Bus() as bus:

        class AbortOnThird:
            async def run(self, events: Any) -> None:
                count = 0
                async for event in events:
                    if isinstance(event, DeltaEvent):
                        count += 1
                        if count == 3:
                            bus.abort(event.stream, "enough", "client")

        bus.add_sink(AbortOnThird())
        capture = EventCapture().attach(bus)
        stream_id = await producer.generate(bus, "go")
    terminal = capture.terminal(stream_id)
    assert isinstance(terminal, AbortEvent)
    assert (terminal.reason, terminal.by) == ("enough", "client")
    assert model.closed == [True]


async def test_model_failure_is_an_error_event_after_the_text(scripted: Any) -> None:
    model = scripted(chunks=[AIMessageChunk(content="a"), AIMessageChunk(content="b")], fail_after=1)
    async with Bus() as bus:
        capture = EventCapture().attach(bus)
        stream_id = await ChatModelProducer(chat_model=model).generate(bus, "x")
    assert capture.text(stream_id) == "a"
    terminal = capture.terminal(stream_id)
    assert isinstance(terminal, ErrorEvent)
    assert terminal.kind == "model_error"
    assert "ConnectionError: upstream went away" in terminal.message


async def test_pipeline_config_builds_the_model_from_an_import_path() -> None:
    producer = build(
        "producers",
        "langchain",
        {
            "chat_model": "langchain_core.language_models.fake_chat_models:FakeListChatModel",
            "model_kwargs": {"responses": ["Hi!"]},
            "prompt": "hello",
            "model_name": "fake-list",
            "meta": {"app": "demo"},
        },
    )
    assert isinstance(producer, ChatModelProducer)
    async with Bus() as bus:
        capture = EventCapture().attach(bus)
        bus.start_producer(producer)
    (stream_id,) = producer.stream_ids
    assert capture.start(stream_id).model == "fake-list"
    assert capture.start(stream_id).meta == {"app": "demo"}
    assert capture.text(stream_id) == "Hi!"
    assert isinstance(capture.terminal(stream_id), EndEvent)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"chat_model": "nocolon"}, 'chat_model: expected "package.module:ClassName"'),
        ({"chat_model": "no_such_module_xyz:Model"}, "chat_model: cannot import 'no_such_module_xyz'"),
        ({"chat_model": "json:loads"}, "chat_model: 'json:loads' is not a LangChain chat model class"),
        (
            {"chat_model": "langchain_core.language_models.fake_chat_models:FakeListChatModel", "model_kwargs": {}},
            "model_kwargs: FakeListChatModel rejected them",
        ),
        ({"prompt": "a", "messages": [{"role": "user", "content": "b"}]}, "messages: give either prompt or messages"),
        ({"messages": [{"content": "b"}]}, r"messages\[0\].role: expected a string"),
        ({"chatmodel": "x:y"}, "chatmodel"),
    ],
)
async def test_bad_options_name_the_key(options: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        build("producers", "langchain", options)


async def test_missing_model_and_missing_input() -> None:
    with pytest.raises(ValueError, match="chat_model: give a chat model object or an import path"):
        ChatModelProducer()
    producer = ChatModelProducer(chat_model=GenericFakeChatModel(messages=iter(["x"])))
    async with Bus() as bus:
        with pytest.raises(ValueError, match="messages: give messages or a prompt"):
            await producer.run(bus)


@pytest.mark.parametrize("anyio_backend", ["trio"])
async def test_trio_gets_a_clear_error() -> None:
    producer = ChatModelProducer(chat_model=GenericFakeChatModel(messages=iter(["x"])))
    async with Bus() as bus:
        with pytest.raises(WrongEventLoop, match="needs asyncio.*runs under trio"):
            await producer.generate(bus, "hi")
        await anyio.lowlevel.checkpoint()


def test_bad_first_arguments_and_keywords_are_named() -> None:
    model = GenericFakeChatModel(messages=iter(["x"]))
    with pytest.raises(TypeError, match=r"got a chat model \(GenericFakeChatModel\) .*chat_model=") as info:
        ChatModelProducer(model)  # type: ignore[arg-type]
    assert "ChatModelProducer.Options" in str(info.value)
    with pytest.raises(TypeError, match=r"got dict; give settings as keywords"):
        ChatModelProducer({"prompt": "hi"})  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"not both; .*\(got an Options and prompt\)"):
        ChatModelProducer(ChatModelProducer.Options(), chat_model=model, prompt="hi")
    with pytest.raises(TypeError, match=r"unknown field `promt`; did you mean `prompt`\?"):
        ChatModelProducer(chat_model=model, promt="hi")
    assert ChatModelProducer(chat_model=model, prompt="hi").options.prompt == "hi"


async def test_start_is_published_before_the_model_is_asked_and_named_by_its_run(scripted: Any) -> None:
    # The identity comes from the run's LangSmith metadata (on_chat_model_start), a public
    # callback, and the stream opens there: before the model's request goes out.
    seen_live: list[list[str]] = []

    class Watching(GenericFakeChatModel):
        async def _astream(self, *args: Any, **kwargs: Any) -> Any:
            seen_live.append(list(bus.live_streams))
            async for chunk in super()._astream(*args, **kwargs):
                yield chunk

    model = Watching(messages=iter(["hi there"]))
    async with Bus() as bus:
        capture = EventCapture().attach(bus)
        stream_id = await ChatModelProducer(chat_model=model).generate(bus, "hi", model="per-call-model")
    assert seen_live == [[stream_id]]
    start = capture.start(stream_id)
    assert (start.model, start.provider) == ("per-call-model", "watching")  # LangChain's own ls_* values
    capture.assert_text("hi there", stream_id)


async def test_a_model_that_fails_before_its_run_starts_still_gets_a_stream(scripted: Any) -> None:
    model = scripted(chunks=[AIMessageChunk(content="a")])
    async with Bus() as bus:
        capture = EventCapture().attach(bus)
        stream_id = await ChatModelProducer(chat_model=model).generate(bus, 42)  # type: ignore[arg-type]
    start = capture.start(stream_id)
    assert (start.model, start.provider) == ("ScriptedChatModel", "scriptedchatmodel")  # from public fields
    terminal = capture.terminal(stream_id)
    assert isinstance(terminal, ErrorEvent) and terminal.kind == "model_error"
    assert terminal.message.startswith("ValueError: Invalid input type <class 'int'>")


def test_model_identity_prefers_the_run_metadata() -> None:
    model = GenericFakeChatModel(messages=iter([]))
    assert model_identity(model) == ("GenericFakeChatModel", "genericfakechatmodel")
    assert model_identity(model, {"ls_model_name": "m1", "ls_provider": "p1"}) == ("m1", "p1")
    assert model_identity(model, None, {"model": "m2"}) == ("m2", "genericfakechatmodel")


async def test_a_closed_bus_raises_bus_closed_and_leaves_the_model_unasked(scripted: Any) -> None:
    model = scripted(chunks=[AIMessageChunk(content="a")])
    bus = Bus()
    async with bus:
        pass
    with pytest.raises(BusClosed, match="not running"):  # as it is, not inside an ExceptionGroup
        await ChatModelProducer(chat_model=model).generate(bus, "hi")
    assert model.closed == []  # its stream was never started: the run waited for the bus stream
