"""The recorded request of a stream: the recording format's ``request`` field, matchers, scrubbing."""

from __future__ import annotations

from pathlib import Path

import orjson
import pytest

from streambus import RecordingError
from streambus.events import DeltaEvent, EndEvent, StartEvent
from streambus.matching import RecordedRequest, closest, differences, exact, find_route, matcher, normalized
from streambus.recording import event_line, read_recording, write_recording
from streambus.scrubbing import SCRUBBED, Scrubber, find_secrets

ASKED = {
    "method": "POST",
    "path": "/v1/chat/completions",
    "format": "openai",
    "route": "chat",
    "model": "gpt-4o-mini",
    "body": {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "Why is the sky blue?"}]},
}


def _stream(sid: str, text: str) -> list[StartEvent | DeltaEvent | EndEvent]:
    return [
        StartEvent(stream=sid, seq=0, ts=1.0, model="gpt-4o-mini", provider="openai"),
        DeltaEvent(stream=sid, seq=1, ts=1.1, text=text),
        EndEvent(stream=sid, seq=2, ts=1.2),
    ]


def test_request_is_written_on_the_start_line_and_read_back(tmp_path: Path) -> None:
    path = tmp_path / "rec.jsonl"
    write_recording(path, [*_stream("a", "Blue."), *_stream("b", "Old.")], requests={"a": ASKED})
    lines = path.read_bytes().splitlines()
    assert orjson.loads(lines[1])["request"] == ASKED
    assert "request" not in orjson.loads(lines[4])  # stream b has none: the line is as before
    recording = read_recording(path)
    assert recording.requests == {"a": ASKED}
    assert [e.stream for e in recording.events] == ["a", "a", "a", "b", "b", "b"]
    assert recording.problems == []


def test_recordings_without_requests_read_as_before() -> None:
    recording = read_recording(Path(__file__).parent / "data" / "chat.jsonl")
    assert recording.requests == {}
    assert len(recording.streams) == 3


def test_request_only_on_a_start_event() -> None:
    with pytest.raises(ValueError, match="only a start event carries one, not a DeltaEvent"):
        event_line(DeltaEvent(stream="a", seq=1, ts=1.0, text="x"), {"method": "POST"})


def test_a_request_that_is_not_an_object_is_an_error_naming_the_line(tmp_path: Path) -> None:
    path = tmp_path / "bad.jsonl"
    write_recording(path, _stream("a", "Blue."))
    lines = path.read_bytes().splitlines(keepends=True)
    lines[1] = lines[1][:-2] + b',"request":"POST /v1"}\n'
    path.write_bytes(b"".join(lines))
    with pytest.raises(RecordingError, match=r'bad.jsonl:2: the start event\'s "request" must be a JSON object'):
        read_recording(path)
    lenient = read_recording(path, lenient=True)
    assert [p.line for p in lenient.problems] == [2]
    assert lenient.requests == {}


def test_a_start_line_with_its_request_cut_by_a_crash_is_a_truncated_last_line(tmp_path: Path) -> None:
    path = tmp_path / "cut.jsonl"
    write_recording(path, _stream("a", "Blue."), requests={"a": ASKED})
    whole = path.read_bytes()
    second = event_line(_stream("b", "x")[0], ASKED)
    path.write_bytes(whole + second[: len(second) // 2])
    recording = read_recording(path)
    assert recording.truncated
    assert recording.requests == {"a": ASKED}
    assert recording.streams == ["a"]


def _req(**changes: object) -> RecordedRequest:
    data = {**ASKED, **changes}
    return RecordedRequest.from_json(data)


def test_normalized_ignores_delivery_keys_whitespace_and_text_parts() -> None:
    recorded = _req()
    streamed = _req(
        body={
            "model": "gpt-4o-mini",
            "stream": True,
            "stream_options": {"include_usage": True},
            "messages": [{"role": "user", "content": [{"type": "text", "text": " Why is the sky blue?\n"}]}],
        }
    )
    assert normalized(recorded, streamed)
    assert not exact(recorded, streamed)
    assert exact(recorded, _req())


def test_normalized_tells_a_different_prompt_or_parameter_apart() -> None:
    recorded = _req()
    other = _req(body={"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "Why is grass green?"}]})
    hotter = _req(body={**ASKED["body"], "temperature": 1.5})  # type: ignore[dict-item]
    assert not normalized(recorded, other)
    assert not normalized(recorded, hotter)
    assert differences(recorded, other) == [
        "body.messages[0].content: recorded 'Why is the sky blue?', asked 'Why is grass green?'"
    ]
    assert differences(recorded, hotter) == ["body.temperature: recorded nothing, asked 1.5"]


def test_closest_prefers_the_same_route_then_the_fewest_differences() -> None:
    chat = _req()
    other_prompt = _req(body={"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "Hi"}]})
    generate = _req(path="/api/generate", format="ollama", route="generate", body=ASKED["body"])
    asked = _req(body={"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "Hi!"}]})
    found = closest([generate, chat, other_prompt], asked)
    assert found is not None
    assert found[0] == 2
    assert found[1] == ["body.messages[0].content: recorded 'Hi', asked 'Hi!'"]
    assert closest([], asked) is None


def test_matcher_by_name_or_function_and_a_clear_error_otherwise() -> None:
    assert matcher("exact") is exact

    def same_model(recorded: RecordedRequest, incoming: RecordedRequest) -> bool:
        return recorded.model == incoming.model

    assert matcher(same_model) is same_model
    with pytest.raises(
        ValueError, match=r"match: expected one of \['exact', 'normalized'\] or a function, got 'fuzzy'"
    ):
        matcher("fuzzy")


def test_stored_request_checks_its_keys() -> None:
    with pytest.raises(ValueError, match="request.path: must be a string"):
        RecordedRequest.from_json({"method": "POST", "body": {}})
    with pytest.raises(ValueError, match="request.headers: must be an object of strings"):
        RecordedRequest.from_json({"method": "POST", "path": "/", "headers": {"a": 1}})
    assert _req().describe() == "POST /v1/chat/completions (model gpt-4o-mini) 'Why is the sky blue?'"


def test_find_route_reads_the_model_out_of_a_gemini_path() -> None:
    from streambus.formats import installed_formats

    formats = installed_formats()
    assert find_route("/api/chat", formats) == ("ollama", "chat", "")
    if "gemini" in formats:
        found = find_route("/v1beta/models/gemini-2.0-flash:streamGenerateContent", formats)
        assert found == ("gemini", "stream", "gemini-2.0-flash")
    assert find_route("/api/tags", formats) is None


def test_scrubber_replaces_credential_headers_and_body_fields() -> None:
    scrubber = Scrubber(["api_key", "Password"])
    headers = scrubber.headers(
        {
            "Authorization": "Bearer sk-proj-abcdefghijklmnopqrstuvwxyz0123",
            "api-key": "azure-secret-123456",
            "X-Api-Key": "sk-ant-api03-abcdefghijklmnopqrstuvwxyz",
            "anthropic-version": "2023-06-01",
            "User-Agent": "OpenAI/Python 1.0",
            "X-Stainless-Os": "Linux",
        }
    )
    assert headers == {
        "anthropic-version": "2023-06-01",
        "api-key": SCRUBBED,
        "authorization": SCRUBBED,
        "x-api-key": SCRUBBED,
    }
    body = scrubber.body({"model": "m", "options": {"api_key": "k-12345678", "nested": [{"password": "hunter22"}]}})
    assert body == {"model": "m", "options": {"api_key": SCRUBBED, "nested": [{"password": SCRUBBED}]}}
    # What was scrubbed is remembered, the bare key of a Bearer header too.
    assert "sk-proj-abcdefghijklmnopqrstuvwxyz0123" in scrubber.seen
    assert "hunter22" in scrubber.seen
    with pytest.raises(ValueError, match="non-empty names"):
        Scrubber([" "])


def test_find_secrets_reports_key_shapes_and_known_values_masked() -> None:
    text = "\n".join(
        [
            '{"text": "nothing here, sk-short"}',
            '{"text": "sk-proj-abcdefghijklmnopqrstuvwxyz0123"}',
            '{"h": "Bearer abcdefghijklmnopqrstuvwxyz"}',
            '{"k": "AIzaSyA-abcdefghijklmnopqrstuvwxyz01234"}',
            '{"echo": "my-own-password-value"}',
        ]
    )
    hits = find_secrets(text, known=["my-own-password-value"])
    assert [(h.line, h.kind) for h in hits] == [
        (2, "openai-style key"),
        (3, "bearer token"),
        (4, "google api key"),
        (5, "a credential sent with a request"),
    ]
    assert all("abcdefghijklmnop" not in h.masked for h in hits)
    assert hits[0].masked == "sk-p...(38 characters)"


def test_mask_secrets_shows_where_a_key_was_never_the_key() -> None:
    from streambus.scrubbing import mask_secrets

    text = "asked 'my key is sk-proj-abcdefghijklmnopqrstuvwxyz0123' with password hunter2hunter2"
    assert mask_secrets(text, known=["hunter2hunter2"]) == (
        "asked 'my key is sk-p...(38 characters)' with password hunt...(14 characters)"
    )
