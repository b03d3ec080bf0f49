"""The mock server answers the recorded stream whose request matches, in every dialect it speaks."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgspec
import pytest

from streambus.events import DeltaEvent, EndEvent, Event, StartEvent
from streambus.matching import RecordedRequest
from streambus.mockserver import UNMATCHED_STATUS, MockServer
from streambus.recording import write_recording

pytest.importorskip("streambus_ollama", reason="the mock server's formats come with plugins/ollama and plugins/openai")
pytest.importorskip("streambus_openai", reason="the mock server's formats come with plugins/ollama and plugins/openai")
openai = pytest.importorskip("openai")
ollama = pytest.importorskip("ollama")

Start = Callable[..., MockServer]


def _stream(sid: str, model: str, chunks: list[str]) -> list[Event]:
    events: list[Event] = [StartEvent(stream=sid, seq=0, ts=10.0, model=model, provider="p")]
    for i, chunk in enumerate(chunks, start=1):
        events.append(DeltaEvent(stream=sid, seq=i, ts=10.0 + i, text=chunk))
    events.append(EndEvent(stream=sid, seq=len(chunks) + 1, ts=10.0 + len(chunks) + 1))
    return events


def _learn(start: Start, events: list[Event], ask: Callable[[str], Any]) -> dict[str, Any]:
    """The request a client really sends, as the server records it (a model-matched server answers it)."""
    server = start(events, burst=True, match="model")
    ask(server.url)
    asked = server.requests[-1].request
    assert asked is not None
    return asked.to_json()


@pytest.fixture
def chunks() -> dict[str, list[str]]:
    return {"blue": ["The ", "sky ", "is ", "blue", "."], "green": ["Grass ", "is ", "green", "."]}


def _openai_chat(url: str, prompt: str) -> list[str]:
    client = openai.OpenAI(base_url=url + "/v1", api_key="sk-test-not-a-real-key", max_retries=0)
    with client:
        stream = client.chat.completions.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": prompt}], stream=True
        )
        return [c.choices[0].delta.content for c in stream if c.choices and c.choices[0].delta.content]


def test_openai_requests_get_the_stream_recorded_for_them_in_order(
    mock_model_server: Start, chunks: dict[str, list[str]], tmp_path: Path
) -> None:
    blue, green = _stream("s-blue", "gpt-4o-mini", chunks["blue"]), _stream("s-green", "gpt-4o-mini", chunks["green"])
    requests = {
        "s-blue": _learn(mock_model_server, blue, lambda url: _openai_chat(url, "Why is the sky blue?")),
        "s-green": _learn(mock_model_server, green, lambda url: _openai_chat(url, "Why is grass green?")),
    }
    path = tmp_path / "rec.jsonl"
    write_recording(path, [*blue, *green], requests=requests)
    server = mock_model_server(path, burst=True)  # instant: no pauses
    # Asked in the other order than recorded: each gets its own answer, chunk for chunk.
    assert _openai_chat(server.url, "Why is grass green?") == chunks["green"]
    assert _openai_chat(server.url, "  Why is the sky blue?") == chunks["blue"]  # normalized: whitespace aside
    assert [r.stream for r in server.requests] == ["s-green", "s-blue"]
    assert server.unmatched == []


def test_equal_requests_get_their_recorded_answers_in_turn(
    mock_model_server: Start, chunks: dict[str, list[str]], tmp_path: Path
) -> None:
    first, second = _stream("s1", "gpt-4o-mini", chunks["blue"]), _stream("s2", "gpt-4o-mini", chunks["green"])
    asked = _learn(mock_model_server, first, lambda url: _openai_chat(url, "Again?"))
    path = tmp_path / "rec.jsonl"
    write_recording(path, [*first, *second], requests={"s1": asked, "s2": asked})
    server = mock_model_server(path, burst=True)
    texts = [_openai_chat(server.url, "Again?") for _ in range(3)]
    assert texts == [chunks["blue"], chunks["green"], chunks["blue"]]


def test_unmatched_openai_request_gets_a_provider_error_naming_the_closest(
    mock_model_server: Start, chunks: dict[str, list[str]], tmp_path: Path
) -> None:
    blue = _stream("s-blue", "gpt-4o-mini", chunks["blue"])
    asked = _learn(mock_model_server, blue, lambda url: _openai_chat(url, "Why is the sky blue?"))
    path = tmp_path / "rec.jsonl"
    write_recording(path, blue, requests={"s-blue": asked})
    server = mock_model_server(path, burst=True)
    with pytest.raises(openai.NotFoundError) as caught:
        _openai_chat(server.url, "Why is the sky green?")
    message = str(caught.value)
    assert (
        "no recorded request matches POST /v1/chat/completions (model gpt-4o-mini) 'Why is the sky green?'" in message
    )
    assert "closest recorded: POST /v1/chat/completions (model gpt-4o-mini) 'Why is the sky blue?'" in message
    assert "body.messages[0].content: recorded 'Why is the sky blue?', asked 'Why is the sky green?'" in message
    assert caught.value.status_code == UNMATCHED_STATUS
    (miss,) = server.unmatched
    assert miss.closest is not None and miss.closest.model == "gpt-4o-mini"


def _ollama_chat(url: str, prompt: str, **options: Any) -> list[str]:
    with ollama.Client(host=url) as client:
        parts = client.chat(model="llama3.2", messages=[{"role": "user", "content": prompt}], stream=True, **options)
        return [p.message.content for p in parts if p.message.content]


def test_ollama_dialect_matches_and_refuses_in_its_own_shape(
    mock_model_server: Start, chunks: dict[str, list[str]], tmp_path: Path
) -> None:
    blue = _stream("s-blue", "llama3.2", chunks["blue"])
    asked = _learn(mock_model_server, blue, lambda url: _ollama_chat(url, "Why?", options={"temperature": 0}))
    path = tmp_path / "rec.jsonl"
    write_recording(path, blue, requests={"s-blue": asked})
    server = mock_model_server(path, burst=True)
    assert _ollama_chat(server.url, "Why?", options={"temperature": 0}) == chunks["blue"]
    with pytest.raises(ollama.ResponseError) as caught:
        _ollama_chat(server.url, "Why?", options={"temperature": 0.7})
    assert caught.value.status_code == UNMATCHED_STATUS
    assert "body.options.temperature: recorded 0, asked 0.7" in caught.value.error


def test_exact_and_custom_matchers(mock_model_server: Start, chunks: dict[str, list[str]], tmp_path: Path) -> None:
    blue = _stream("s-blue", "gpt-4o-mini", chunks["blue"])
    asked = _learn(mock_model_server, blue, lambda url: _openai_chat(url, "Why is the sky blue?"))
    path = tmp_path / "rec.jsonl"
    write_recording(path, blue, requests={"s-blue": asked})
    exact = mock_model_server(path, burst=True, match="exact")
    with pytest.raises(openai.NotFoundError, match="body.messages\\[0\\].content: recorded 'Why is the sky blue"):
        _openai_chat(exact.url, "Why is the sky blue? ")

    def any_question(recorded: RecordedRequest, incoming: RecordedRequest) -> bool:
        return recorded.route == incoming.route and "?" in str(incoming.body)

    custom = mock_model_server(path, burst=True, match=any_question)
    assert _openai_chat(custom.url, "Anything?") == chunks["blue"]
    with pytest.raises(openai.NotFoundError):
        _openai_chat(custom.url, "No question")


def test_a_recording_without_requests_is_still_answered_by_model(mock_model_server: Start) -> None:
    server = mock_model_server(Path(__file__).parent / "data" / "chat.jsonl", burst=True)
    assert server.match is None
    assert "".join(_ollama_chat(server.url, "anything")).startswith("The sky is blue")


def test_an_empty_recording_names_the_request_and_says_to_record_it(mock_model_server: Start) -> None:
    server = mock_model_server([], burst=True, match="normalized", unmatched_hint="record it with --x")
    with pytest.raises(ollama.ResponseError) as caught:
        _ollama_chat(server.url, "Hello")
    assert caught.value.error == (
        "streambus mock: no recorded request matches POST /api/chat (model llama3.2) 'Hello'; "
        "the recording holds no requests (record it first) (record it with --x)"
    )


def test_unmatched_requests_go_to_the_fallback_and_matched_ones_do_not(
    mock_model_server: Start, chunks: dict[str, list[str]], tmp_path: Path
) -> None:
    blue, green = _stream("s-blue", "gpt-4o-mini", chunks["blue"]), _stream("s-green", "gpt-4o-mini", chunks["green"])
    asked = _learn(mock_model_server, blue, lambda url: _openai_chat(url, "Blue?"))
    path = tmp_path / "rec.jsonl"
    write_recording(path, blue, requests={"s-blue": asked})
    upstream = mock_model_server(green, burst=True, match="model")
    server = mock_model_server(path, burst=True, fallback=upstream.url)
    assert _openai_chat(server.url, "Blue?") == chunks["blue"]
    assert _openai_chat(server.url, "Something new?") == chunks["green"]
    assert [r.path for r in upstream.requests] == ["/v1/chat/completions"]  # only the unmatched one
    assert len(server.unmatched) == 1


def test_recorded_timing_or_instant_keeps_the_chunk_order(mock_model_server: Start, tmp_path: Path) -> None:
    many = [f"{i} " for i in range(40)]
    events = _stream("s", "gpt-4o-mini", many)
    # Timestamps 1 ms apart: the paced replay is short and still follows them.
    events = [msgspec.structs.replace(e, ts=10 + e.seq / 1000) for e in events]
    asked = _learn(mock_model_server, events, lambda url: _openai_chat(url, "Count"))
    path = tmp_path / "rec.jsonl"
    write_recording(path, events, requests={"s": asked})
    for options in ({"burst": True}, {"speed": 4.0}):
        server = mock_model_server(path, **options)
        assert _openai_chat(server.url, "Count") == many


def test_anthropic_and_gemini_dialects_match_too(
    mock_model_server: Start, chunks: dict[str, list[str]], tmp_path: Path
) -> None:
    anthropic = pytest.importorskip("anthropic")
    genai = pytest.importorskip("google.genai")
    pytest.importorskip("streambus_anthropic")
    pytest.importorskip("streambus_gemini")
    from google.genai import types

    def claude(url: str, prompt: str) -> str:
        client = anthropic.Anthropic(base_url=url, api_key="unused", max_retries=0)
        with (
            client,
            client.messages.stream(
                model="claude-sonnet-4-5", max_tokens=64, messages=[{"role": "user", "content": prompt}]
            ) as stream,
        ):
            return "".join(stream.text_stream)

    def gemini(url: str, prompt: str) -> str:
        with genai.Client(api_key="unused", http_options=types.HttpOptions(base_url=url)) as client:
            parts = client.models.generate_content_stream(model="gemini-2.0-flash", contents=prompt)
            return "".join(p.text or "" for p in parts)

    first = _stream("s-claude", "claude-sonnet-4-5", chunks["blue"])
    second = _stream("s-gemini", "gemini-2.0-flash", chunks["green"])
    requests = {
        "s-claude": _learn(mock_model_server, first, lambda url: claude(url, "Sky?")),
        "s-gemini": _learn(mock_model_server, second, lambda url: gemini(url, "Grass?")),
    }
    assert requests["s-gemini"]["model"] == "gemini-2.0-flash"  # read out of the path
    path = tmp_path / "rec.jsonl"
    write_recording(path, [*first, *second], requests=requests)
    server = mock_model_server(path, burst=True)
    assert gemini(server.url, "Grass?") == "".join(chunks["green"])
    assert claude(server.url, "Sky?") == "".join(chunks["blue"])
    with pytest.raises(anthropic.NotFoundError, match="closest recorded: POST /v1/messages"):
        claude(server.url, "Sea?")
    with pytest.raises(
        genai.errors.ClientError,
        match=r"closest recorded: POST /v1(beta)?/models/gemini-2.0-flash:streamGenerateContent",
    ):
        gemini(server.url, "Sea?")


def test_serve_mock_command_matches_requests(
    mock_model_server: Start, chunks: dict[str, list[str]], tmp_path: Path
) -> None:
    import os
    import signal
    import subprocess
    import sys

    from click.testing import CliRunner

    from streambus.cli import main

    bad = CliRunner().invoke(main, ["serve-mock", "--match", "fuzzy", str(tmp_path / "x.jsonl")])
    assert bad.exit_code == 2 and "'fuzzy' is not one of 'normalized', 'exact', 'model'" in bad.stderr

    blue = _stream("s-blue", "gpt-4o-mini", chunks["blue"])
    asked = _learn(mock_model_server, blue, lambda url: _openai_chat(url, "Blue?"))
    path = tmp_path / "rec.jsonl"
    write_recording(path, blue, requests={"s-blue": asked})
    command = [str(Path(sys.executable).parent / "streambus"), "serve-mock", "--port", "0", "--burst", str(path)]
    for match, answered in (("normalized", False), ("model", True)):
        child = subprocess.Popen(
            [*command, "--match", match],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        try:
            assert child.stdout is not None
            url = child.stdout.readline().strip()
            assert _openai_chat(url, "Blue?") == chunks["blue"]
            if answered:  # by model: any question gets the recorded answer
                assert _openai_chat(url, "Other?") == chunks["blue"]
            else:
                with pytest.raises(openai.NotFoundError, match="closest recorded"):
                    _openai_chat(url, "Other?")
            child.send_signal(signal.SIGTERM)
            assert child.wait(timeout=30) == 0
        finally:
            child.kill()
            child.wait(timeout=30)
            if child.stdout is not None:
                child.stdout.close()


def test_a_streamed_recording_answers_the_same_request_unstreamed(
    mock_model_server: Start, chunks: dict[str, list[str]], tmp_path: Path
) -> None:
    blue = _stream("s-blue", "gpt-4o-mini", chunks["blue"])
    asked = _learn(mock_model_server, blue, lambda url: _openai_chat(url, "Blue?"))
    path = tmp_path / "rec.jsonl"
    write_recording(path, blue, requests={"s-blue": asked})
    server = mock_model_server(path, burst=True)
    with openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0) as client:
        whole = client.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "Blue?"}])
    assert whole.choices[0].message.content == "".join(chunks["blue"])
    exact = mock_model_server(path, burst=True, match="exact")
    with (
        openai.OpenAI(base_url=exact.url + "/v1", api_key="unused", max_retries=0) as client,
        pytest.raises(openai.NotFoundError, match="body.stream: recorded true, asked nothing"),
    ):
        client.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "Blue?"}])


def test_an_unmatched_request_never_echoes_or_logs_a_key(
    mock_model_server: Start, chunks: dict[str, list[str]], tmp_path: Path
) -> None:
    from structlog.testing import capture_logs

    key = "sk-proj-" + "Q1w2E3r4T5y6U7i8O9p0A1s2D3f4G5h6"
    blue = _stream("s-blue", "gpt-4o-mini", chunks["blue"])
    asked = _learn(mock_model_server, blue, lambda url: _openai_chat(url, "Blue?"))
    path = tmp_path / "rec.jsonl"
    write_recording(path, blue, requests={"s-blue": asked})
    server = mock_model_server(path, burst=True)
    with capture_logs() as logs, pytest.raises(openai.NotFoundError) as caught:
        _openai_chat(server.url, f"my key is {key}")
    assert key not in str(caught.value)
    assert "asked 'my key is sk-p...(40 characters)'" in str(caught.value)
    assert logs and key not in repr(logs)
