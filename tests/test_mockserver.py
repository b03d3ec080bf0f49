"""The mock model server: the official ollama / openai clients and the streambus producers accept it.

The server runs on aiohttp (asyncio); tests that drive it in-loop use asyncio,
the thread-served variant is also exercised under trio.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import msgspec
import pytest
import structlog

import streambus
from streambus import Bus, DeltaEvent, EndEvent, ErrorEvent, Event, PluginError, StartEvent, Usage
from streambus.recording import read_recording, write_recording
from streambus.testing import EventCapture

pytest.importorskip("streambus_ollama", reason="the ollama wire format comes with plugins/ollama")
pytest.importorskip("streambus_openai", reason="the openai wire format comes with plugins/openai")

import ollama
import openai

from streambus.mockserver import MockServer

pytestmark = pytest.mark.anyio


@pytest.fixture(autouse=True)
def _restore_logging() -> Iterator[None]:
    # The CLI configures structlog globally; later tests must not inherit its level.
    saved = structlog.get_config()
    yield
    structlog.configure(**saved)


CHAT = Path(__file__).parent / "data" / "chat.jsonl"
RECORDED = read_recording(CHAT).events
ENGLISH = "The sky is blue because air scatters short blue light more than red."
JAPANESE = "空が青いのは、空気が青い光をより強く散乱するからです。"
HELLO = "Hello! How can I help you today?"
ASK = [{"role": "user", "content": "Why is the sky blue?"}]


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"  # aiohttp, and the streambus producers built on it, run on asyncio only


@pytest.fixture
def server_url() -> Iterator[str]:
    with MockServer(CHAT, burst=True).running() as url:
        yield url


@pytest.fixture
def ollama_client(server_url: str) -> Iterator[ollama.Client]:
    with ollama.Client(host=server_url) as client:
        yield client


@pytest.fixture
def openai_client(server_url: str) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=server_url + "/v1", api_key="not-needed", max_retries=0) as client:
        yield client


def events_of(stream: str) -> list[Event]:
    return [e for e in RECORDED if e.stream == stream]


def comparable(events: list[Event]) -> list[Event]:
    """Events without what a new request legitimately changes: stream id, clock, request tags."""
    out: list[Event] = []
    for event in events:
        event = msgspec.structs.replace(event, stream="-", ts=0.0)
        if isinstance(event, StartEvent):
            event = msgspec.structs.replace(event, meta={})
        out.append(event)
    return out


# -- the official ollama client ---------------------------------------------------------


def test_ollama_client_streams_the_recorded_chat_cycling_by_model(ollama_client: ollama.Client) -> None:
    client = ollama_client
    first = list(client.chat(model="llama3.2", messages=ASK, stream=True))
    second = list(client.chat(model="llama3.2:latest", messages=ASK, stream=True))
    third = list(client.chat(model="llama3.2", messages=ASK, stream=True))
    assert "".join(p.message.content for p in first) == ENGLISH
    assert "".join(p.message.content for p in second) == JAPANESE
    assert "".join(p.message.content for p in third) == ENGLISH  # cycling
    assert len(first) == 15  # 14 recorded chunks, then the final stats line
    final = first[-1]
    assert final.done and final.done_reason == "stop"
    assert (final.prompt_eval_count, final.eval_count) == (26, 14)
    assert final.total_duration == 601234567
    assert final.load_duration == 12345678
    assert final.prompt_eval_duration == 45678901
    assert final.eval_duration == 431234567
    assert second[-1].eval_count == 14 and second[-1].prompt_eval_count == 31


def test_ollama_client_generate_and_non_streamed(ollama_client: ollama.Client) -> None:
    client = ollama_client
    parts = list(client.generate(model="llama3.2", prompt="Why?", stream=True))
    assert "".join(p.response for p in parts) == ENGLISH
    whole = client.chat(model="llama3.2", messages=ASK, stream=False)
    assert whole.message.content == JAPANESE and whole.eval_count == 14 and whole.total_duration == 532101234


def test_ollama_client_lists_models_and_version(server_url: str, ollama_client: ollama.Client) -> None:
    assert [m.model for m in ollama_client.list().models] == ["llama3.2", "gpt-4o-mini"]
    assert httpx.get(server_url + "/api/version").json() == {"version": "0.6.0"}
    assert httpx.get(server_url + "/").text == "Ollama is running"


def test_ollama_client_show_and_ps_answer_as_ollama_does(ollama_client: ollama.Client) -> None:
    # `ollama run` and other tools ask /api/show (and /api/ps) before they chat.
    assert ollama_client.ps().models == []  # nothing answered yet: nothing loaded
    shown = ollama_client.show("llama3.2:latest")
    assert shown.capabilities == ["completion"]  # the recordings hold neither reasoning nor tool calls
    assert shown.details is not None and shown.details.format == "gguf"
    assert shown.modelfile is not None and "FROM llama3.2" in shown.modelfile
    with pytest.raises(ollama.ResponseError) as info:
        ollama_client.show("mistral")
    assert (info.value.status_code, info.value.error) == (404, "model 'mistral' not found")
    list(ollama_client.chat(model="llama3.2", messages=ASK, stream=True))
    (loaded,) = ollama_client.ps().models
    assert loaded.model == "llama3.2"
    assert loaded.expires_at is not None and loaded.expires_at.timestamp() > time.time()
    assert loaded.details is not None and loaded.details.format == "gguf"


def test_ollama_show_reports_the_capabilities_the_recordings_show() -> None:
    demo = Path(streambus.__file__).parent / "data" / "recordings" / "demo.jsonl"
    with MockServer(demo, burst=True).running() as url, ollama.Client(host=url) as client:
        qwen = client.show("qwen3")
        assert qwen.capabilities is not None and set(qwen.capabilities) == {"completion", "thinking", "tools"}
        raw = httpx.post(url + "/api/show", json={"name": "qwen3"})  # what older clients send
        assert raw.status_code == 200 and raw.json()["capabilities"] == qwen.capabilities
        assert httpx.post(url + "/api/show", json={}).json() == {"error": "model is required"}


def test_ollama_durations_come_from_the_recorded_timestamps_when_missing(ollama_client: ollama.Client) -> None:
    # rec-openai-en was recorded from an OpenAI server: no timings; its start, first delta and end are
    # at 0, 0.12 and 0.335999 s.
    final = list(ollama_client.chat(model="gpt-4o-mini", messages=ASK, stream=True))[-1]
    assert final.done and final.eval_count == 9
    assert final.prompt_eval_duration == 120_000_000
    assert final.eval_duration == 215_999_000
    assert final.total_duration == 335_999_000
    assert final.load_duration == 0
    assert final.eval_count / final.eval_duration * 1e9 == pytest.approx(41.67, abs=0.01)  # tokens/s
    whole = ollama_client.chat(model="gpt-4o-mini", messages=ASK, stream=False)
    assert whole.eval_duration == 215_999_000


def test_ollama_unknown_model_is_404_in_ollama_shape(server_url: str, ollama_client: ollama.Client) -> None:
    with pytest.raises(ollama.ResponseError) as info:
        ollama_client.chat(model="mistral", messages=ASK)
    assert info.value.status_code == 404
    assert info.value.error == "model 'mistral' not found"
    raw = httpx.post(server_url + "/api/chat", json={"model": "mistral", "messages": ASK})
    assert raw.status_code == 404 and raw.json() == {"error": "model 'mistral' not found"}


async def test_ollama_async_client_with_the_server_in_the_same_loop() -> None:
    async with MockServer(CHAT, speed=50.0) as server:
        async with ollama.AsyncClient(host=server.url) as client:
            parts = [p async for p in await client.chat(model="llama3.2", messages=ASK, stream=True)]
        assert "".join(p.message.content for p in parts) == ENGLISH
        assert [r.path for r in server.requests] == ["/api/chat"]
        assert server.requests[0].stream == "rec-ollama-en" and server.requests[0].streamed


# -- the official openai client ----------------------------------------------------------


def test_openai_client_streams_text_and_usage(openai_client: openai.OpenAI) -> None:
    client = openai_client
    chunks = list(
        client.chat.completions.create(
            model="gpt-4o-mini", messages=ASK, stream=True, stream_options={"include_usage": True}
        )
    )
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == HELLO
    assert chunks[-1].usage is not None
    assert (chunks[-1].usage.prompt_tokens, chunks[-1].usage.completion_tokens, chunks[-1].usage.total_tokens) == (
        9,
        9,
        18,
    )
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == ["stop"]


def test_openai_client_reads_japanese_from_an_ollama_recording(openai_client: openai.OpenAI) -> None:
    client = openai_client
    first = client.chat.completions.create(model="llama3.2", messages=ASK)  # stream: false
    assert first.choices[0].message.content == ENGLISH
    assert first.usage is not None and first.usage.total_tokens == 40
    stream = client.chat.completions.create(model="llama3.2", messages=ASK, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == JAPANESE


def test_openai_legacy_completions_and_models(openai_client: openai.OpenAI) -> None:
    client = openai_client
    stream = client.completions.create(model="gpt-4o-mini", prompt="Hi", stream=True)
    assert "".join(c.choices[0].text for c in stream if c.choices) == HELLO
    assert [m.id for m in client.models.list()] == ["llama3.2", "gpt-4o-mini"]


def test_openai_client_retrieves_one_model(openai_client: openai.OpenAI) -> None:
    model = openai_client.models.retrieve("gpt-4o-mini")
    assert (model.id, model.object, model.owned_by) == ("gpt-4o-mini", "model", "streambus")
    assert openai_client.models.retrieve("llama3.2:latest").id == "llama3.2"
    with pytest.raises(openai.NotFoundError) as info:
        openai_client.models.retrieve("gpt-9")
    assert info.value.code == "model_not_found" and "gpt-9" in info.value.message


def test_openai_unknown_model_is_404_in_openai_shape(openai_client: openai.OpenAI) -> None:
    client = openai_client
    with pytest.raises(openai.NotFoundError) as info:
        client.chat.completions.create(model="gpt-9", messages=ASK, stream=True)
    assert info.value.status_code == 404
    assert info.value.code == "model_not_found"
    assert "gpt-9" in info.value.message


def test_bad_requests_get_400_in_the_provider_shape(server_url: str) -> None:
    bad_json = httpx.post(server_url + "/api/chat", content=b"{not json")
    assert bad_json.status_code == 400 and "invalid JSON request body" in bad_json.json()["error"]
    no_model = httpx.post(server_url + "/v1/chat/completions", json={"messages": ASK})
    assert no_model.status_code == 400
    assert no_model.json()["error"]["message"] == "model is required"
    not_object = httpx.post(server_url + "/api/generate", json=["model"])
    assert not_object.status_code == 400


def test_a_recorded_failure_is_served_as_the_provider_error(tmp_path: Path) -> None:
    path = tmp_path / "failed.jsonl"
    write_recording(
        path,
        [
            StartEvent(stream="f", seq=0, ts=1.0, model="llama3.2", provider="ollama"),
            DeltaEvent(stream="f", seq=1, ts=1.1, text="Part"),
            ErrorEvent(stream="f", seq=2, ts=1.2, kind="http_500", message="model runner crashed"),
        ],
    )
    with MockServer(path, burst=True).running() as url:
        with ollama.Client(host=url) as client, pytest.raises(ollama.ResponseError, match="model runner crashed"):
            list(client.chat(model="llama3.2", messages=ASK, stream=True))
        whole = httpx.post(url + "/api/chat", json={"model": "llama3.2", "messages": ASK, "stream": False})
        assert whole.status_code == 500 and whole.json() == {"error": "model runner crashed"}


def test_a_client_that_hangs_up_does_not_disturb_the_next(tmp_path: Path) -> None:
    with MockServer(CHAT, speed=0.5).running() as url, httpx.Client(base_url=url) as client:
        with client.stream("POST", "/api/chat", json={"model": "llama3.2", "messages": ASK}) as response:
            next(response.iter_lines())  # one chunk, then hang up mid-stream
        with ollama.Client(host=url) as other:
            again = other.chat(model="gpt-4o-mini", messages=ASK, stream=False)
        assert again.message.content == HELLO


@pytest.mark.parametrize("anyio_backend", ["trio"])
async def test_thread_served_mock_works_under_trio() -> None:
    server = MockServer(CHAT, burst=True)
    with pytest.raises(RuntimeError, match="needs asyncio"):
        await server.start()
    with server.running() as url:
        async with ollama.AsyncClient(host=url) as client:  # httpx runs on trio
            parts = [p async for p in await client.chat(model="llama3.2", messages=ASK, stream=True)]
    assert "".join(p.message.content for p in parts) == ENGLISH


def test_constructor_errors() -> None:
    with pytest.raises(ValueError, match="speed: must be positive"):
        MockServer(CHAT, speed=0)
    with pytest.raises(PluginError, match="no provider wire format could be loaded") as info:
        MockServer(CHAT, formats=["gopher"])
    assert "pip install" in str(info.value)


# -- the streambus producers, round trip --------------------------------------------------


async def test_ollama_producer_round_trips_the_recording_event_for_event() -> None:
    from streambus_ollama import OllamaProducer

    capture = EventCapture()
    async with MockServer(CHAT, speed=20.0) as server:
        async with Bus() as bus:
            capture.attach(bus)
            for _ in range(2):
                await OllamaProducer(url=server.url, model="llama3.2", messages=ASK, retries=0).run(bus)
    assert len(capture.streams) == 2
    for replayed, recorded in zip(capture.streams, ["rec-ollama-en", "rec-ollama-ja"], strict=True):
        assert comparable(capture.of(replayed)) == comparable(events_of(recorded))
    end = capture.end(capture.streams[1])
    assert end.usage == Usage(prompt_tokens=31, completion_tokens=14, total_tokens=45)
    assert end.timings["eval_duration"] == 0.378900011


async def test_openai_producer_round_trips_the_recording_event_for_event() -> None:
    from streambus_openai import OpenAIProducer

    capture = EventCapture()
    async with MockServer(CHAT, speed=20.0) as server:
        async with Bus() as bus:
            capture.attach(bus)
            await OpenAIProducer(base_url=server.url + "/v1", model="gpt-4o-mini", messages=ASK, retries=0).run(bus)
    assert comparable(capture.of()) == comparable(events_of("rec-openai-en"))


async def test_recorded_producer_output_serves_back_identically(tmp_path: Path) -> None:
    # Fixpoint: record what the producer made of the mock, serve that, read it again.
    from streambus_ollama import OllamaProducer

    from streambus.builtins.recorder import RecorderSink

    first = tmp_path / "first.jsonl"
    async with MockServer(CHAT, burst=True) as server, Bus() as bus:
        bus.add_sink(RecorderSink(path=str(first)))
        await OllamaProducer(url=server.url, model="llama3.2", messages=ASK, retries=0).run(bus)
    capture = EventCapture()
    async with MockServer(first, burst=True) as server, Bus() as bus:
        capture.attach(bus)
        await OllamaProducer(url=server.url, model="llama3.2", messages=ASK, retries=0).run(bus)
    recorded = read_recording(first).events
    assert [msgspec.structs.replace(e, stream="-", ts=0.0) for e in capture.events] == [
        msgspec.structs.replace(e, stream="-", ts=0.0) for e in recorded
    ]


# -- `streambus serve-mock` ----------------------------------------------------------------


def test_serve_mock_command_serves_until_sigterm() -> None:
    command = [str(Path(sys.executable).parent / "streambus"), "serve-mock", "--port", "0", "--speed", "10", str(CHAT)]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    child = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        assert child.stdout is not None
        url = child.stdout.readline().strip()
        assert url.startswith("http://127.0.0.1:"), url
        with ollama.Client(host=url) as client:
            parts = list(client.chat(model="llama3.2", messages=ASK, stream=True))
        assert "".join(p.message.content for p in parts) == ENGLISH
        assert parts[-1].eval_count == 14 and parts[-1].total_duration == 601234567
        with openai.OpenAI(base_url=url + "/v1", api_key="not-needed", max_retries=0) as oai:
            chunks = list(
                oai.chat.completions.create(
                    model="llama3.2", messages=ASK, stream=True, stream_options={"include_usage": True}
                )
            )
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == JAPANESE
        assert chunks[-1].usage is not None and chunks[-1].usage.total_tokens == 45
        with ollama.Client(host=url) as client:
            assert client.show("llama3.2").capabilities == ["completion"]
            assert [m.model for m in client.ps().models] == ["llama3.2"]
        with openai.OpenAI(base_url=url + "/v1", api_key="not-needed", max_retries=0) as oai:
            assert oai.models.retrieve("gpt-4o-mini").id == "gpt-4o-mini"
        child.send_signal(signal.SIGTERM)
        assert child.wait(timeout=30) == 0
    finally:
        child.kill()
        child.wait(timeout=30)
        for pipe in (child.stdout, child.stderr):
            if pipe is not None:
                pipe.close()


def test_serve_mock_command_errors(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from streambus.cli import main

    missing = CliRunner().invoke(main, ["serve-mock", str(tmp_path / "none.jsonl")])
    assert missing.exit_code == 1 and "cannot open recording" in missing.stderr
    bad = CliRunner().invoke(main, ["serve-mock", "--speed", "-1", str(CHAT)])
    assert bad.exit_code == 2 and "speed: must be positive" in bad.stderr


def test_missing_aiohttp_gives_the_install_command(monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib

    from click.testing import CliRunner

    from streambus.cli import main

    monkeypatch.setitem(sys.modules, "aiohttp", None)  # as if it were not installed
    monkeypatch.delitem(sys.modules, "streambus.mockserver")
    with pytest.raises(ImportError, match=r"pip install 'streambus\[testing\]'"):
        importlib.import_module("streambus.mockserver")
    result = CliRunner().invoke(main, ["serve-mock", str(CHAT)])
    assert result.exit_code == 1 and "pip install 'streambus[testing]'" in result.stderr


async def test_reasoning_and_finish_reason_round_trip_through_both_formats() -> None:
    from streambus_ollama import OllamaProducer
    from streambus_openai import OpenAIProducer

    recorded: list[Event] = [
        StartEvent(stream="r", seq=0, ts=1.0, model="qwen3", provider="ollama"),
        DeltaEvent(stream="r", seq=1, ts=1.1, text="Let me think", channel="reasoning"),
        DeltaEvent(stream="r", seq=2, ts=1.2, text=" hard.", channel="reasoning"),
        DeltaEvent(stream="r", seq=3, ts=1.3, text="答えは42"),
        EndEvent(
            stream="r",
            seq=4,
            ts=1.4,
            reason="length",
            usage=Usage(prompt_tokens=3, completion_tokens=5, total_tokens=8),
            timings={"total_duration": 1.25},
        ),
    ]
    ask = [{"role": "user", "content": "?"}]
    async with MockServer(recorded, burst=True) as server:
        ollama_capture, openai_capture = EventCapture(), EventCapture()
        async with Bus() as bus:
            ollama_capture.attach(bus)
            await OllamaProducer(url=server.url, model="qwen3", messages=ask, retries=0).run(bus)
        async with Bus() as bus:
            openai_capture.attach(bus)
            await OpenAIProducer(base_url=server.url + "/v1", model="qwen3", messages=ask, retries=0).run(bus)
    assert comparable(ollama_capture.events) == comparable(recorded)
    # OpenAI's format names its own provider and carries no server timings; the rest is identical.
    via_openai = comparable(recorded)
    via_openai[0] = msgspec.structs.replace(via_openai[0], provider="openai")
    via_openai[-1] = msgspec.structs.replace(via_openai[-1], timings={})
    assert comparable(openai_capture.events) == via_openai


DEMO = Path(__file__).parents[1] / "streambus" / "data" / "recordings" / "demo.jsonl"
WEATHER = {"city": "Kyoto", "unit": "celsius"}
ASK_WEATHER = [{"role": "user", "content": "What is the weather in Kyoto?"}]


def test_demo_recording_tool_call_reaches_the_official_clients() -> None:
    """The bundled demo's qwen3 tool call, served to both official clients, streamed and whole.

    The mock cycles through a model's recorded streams: qwen3's first is an
    answer with reasoning, its second the weather call, so each client's
    first request takes the reasoning answer.
    """
    with (
        MockServer(DEMO, burst=True).running() as url,
        ollama.Client(host=url) as ollama_client,
        openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0) as client,
    ):
        first = ollama_client.chat(model="qwen3", messages=ASK_WEATHER, stream=False)
        assert not first.message.tool_calls
        assert first.message.thinking
        streamed = list(ollama_client.chat(model="qwen3", messages=ASK_WEATHER, stream=True))
        calls = [call for c in streamed for call in (c.message.tool_calls or [])]
        assert [(c.function.name, dict(c.function.arguments)) for c in calls] == [("get_weather", WEATHER)]
        assert streamed[-1].done
        ollama_client.chat(model="qwen3", messages=ASK_WEATHER, stream=False)  # the reasoning answer again
        whole = ollama_client.chat(model="qwen3", messages=ASK_WEATHER, stream=False)
        assert [(c.function.name, dict(c.function.arguments)) for c in whole.message.tool_calls or []] == [
            ("get_weather", WEATHER)
        ]

        client.chat.completions.create(model="qwen3", messages=ASK_WEATHER)  # the reasoning answer
        chunks = list(client.chat.completions.create(model="qwen3", messages=ASK_WEATHER, stream=True))
        pieces = [t for c in chunks if c.choices for t in c.choices[0].delta.tool_calls or []]
        assert pieces[0].function is not None and pieces[0].function.name == "get_weather"
        assert pieces[0].id == "call_0"
        arguments = "".join(p.function.arguments or "" for p in pieces if p.function is not None)
        assert msgspec.json.decode(arguments) == WEATHER
        assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == [
            "tool_calls"
        ]
        client.chat.completions.create(model="qwen3", messages=ASK_WEATHER)  # the reasoning answer
        completion = client.chat.completions.create(model="qwen3", messages=ASK_WEATHER)
        (call,) = completion.choices[0].message.tool_calls or []
        assert call.type == "function"
        assert call.function.name == "get_weather"
        assert msgspec.json.decode(call.function.arguments) == WEATHER
