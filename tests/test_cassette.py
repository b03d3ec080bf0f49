"""Record modes of the pytest plugin, end to end: a project's tests run with pytester against a fake upstream.

The fake upstream is a mock server answering by model (``tests/data/chat.jsonl``);
recording goes through the proxy in front of it. Its request count proves which
runs touched "the network".
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from streambus.cassette import Cassette
from streambus.mockserver import MockServer
from streambus.recording import read_recording

pytest_plugins = ["pytester"]

DATA = Path(__file__).resolve().parent / "data" / "chat.jsonl"
for module in ("streambus_proxy", "streambus_ollama", "streambus_openai", "openai", "ollama"):
    pytest.importorskip(module, reason="recording needs the proxy, the formats and the clients")

PROJECT = """
import pytest

def ask(recording, prompt):
    parts = recording.ollama().chat(model="llama3.2", messages=[{"role": "user", "content": prompt}], stream=True)
    return "".join(p.message.content for p in parts)

def test_one(streambus_recording):
    assert ask(streambus_recording, PROMPT).startswith(("The sky", "空"))
"""


@pytest.fixture
def upstream() -> Iterator[MockServer]:
    server = MockServer(DATA, burst=True, match="model")
    with server.running():
        yield server


@pytest.fixture
def project(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> pytest.Pytester:
    monkeypatch.delenv("STREAMBUS_UPSTREAM", raising=False)
    pytester.makeini("[pytest]\nfilterwarnings = error\n")
    pytester.makepyfile(test_proj=PROJECT.replace("PROMPT", '"one"'))
    return pytester


def _file(pytester: pytest.Pytester, test: str = "test_one", module: str = "test_proj") -> Path:
    return pytester.path / "recordings" / module / f"{test}.jsonl"


# hypothesis's plugin costs seconds per in-process run and none of these projects uses it.
QUICK = ("-q", "-p", "no:cacheprovider", "-p", "no:hypothesispytest")


def _run(pytester: pytest.Pytester, *args: str) -> pytest.RunResult:
    return pytester.runpytest(*QUICK, "--import-mode=prepend", *args)


def test_once_records_then_replays_and_a_changed_request_fails_without_the_network(
    project: pytest.Pytester, upstream: MockServer
) -> None:
    first = _run(project, "--streambus-record-mode=once", f"--streambus-upstream={upstream.url}")
    first.assert_outcomes(passed=1)
    assert len(upstream.requests) == 1
    recording = read_recording(_file(project))
    (request,) = recording.requests.values()
    assert (request["path"], request["format"], request["route"], request["model"]) == (
        "/api/chat",
        "ollama",
        "chat",
        "llama3.2",
    )
    assert request["body"]["messages"] == [{"role": "user", "content": "one"}]
    assert recording.header["meta"]["test"] == "test_proj.py::test_one"

    again = _run(project, "--streambus-record-mode=once", f"--streambus-upstream={upstream.url}")
    again.assert_outcomes(passed=1)
    assert len(upstream.requests) == 1  # replayed: the upstream was not asked

    project.makepyfile(test_proj=PROJECT.replace("PROMPT", '"two"'))
    changed = _run(project, "--streambus-record-mode=none", f"--streambus-upstream={upstream.url}")
    changed.assert_outcomes(failed=1, errors=1)
    out = changed.stdout.str()
    assert "no recorded request matches POST /api/chat (model llama3.2) 'two'" in out
    assert "closest recorded: POST /api/chat (model llama3.2) 'one'" in out
    assert "body.messages[0].content: recorded 'one', asked 'two'" in out
    assert "1 request(s) not in the recording" in out
    assert len(upstream.requests) == 1


def test_none_without_a_recording_names_the_request_and_how_to_record_it(
    project: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CI", "true")
    result = _run(project)  # the ini default: none
    result.assert_outcomes(failed=1, errors=1)
    out = result.stdout.str()
    assert "no recorded request matches POST /api/chat (model llama3.2) 'one'" in out
    assert "record it with --streambus-record-mode=once" in out
    assert "nothing went to the network" in out
    assert not _file(project).exists()


def test_new_episodes_adds_what_the_recording_lacks(project: pytest.Pytester, upstream: MockServer) -> None:
    _run(project, "--streambus-record-mode=once", f"--streambus-upstream={upstream.url}").assert_outcomes(passed=1)
    first = read_recording(_file(project))
    project.makepyfile(
        test_proj=PROJECT.replace("PROMPT", '"one"')
        + "    assert ask(streambus_recording, 'two').startswith(('The sky', '空'))\n"
    )
    result = _run(project, "--streambus-record-mode=new_episodes", f"--streambus-upstream={upstream.url}")
    result.assert_outcomes(passed=1)
    assert len(upstream.requests) == 2  # only 'two' went upstream
    grown = read_recording(_file(project))
    assert grown.streams[: len(first.streams)] == first.streams
    prompts = [r["body"]["messages"][0]["content"] for r in grown.requests.values()]
    assert prompts == ["one", "two"]
    _run(project, "--streambus-record-mode=none").assert_outcomes(passed=1)


def test_all_records_anew_even_when_a_recording_exists(project: pytest.Pytester, upstream: MockServer) -> None:
    _run(project, "--streambus-record-mode=all", f"--streambus-upstream={upstream.url}").assert_outcomes(passed=1)
    before = read_recording(_file(project)).streams
    _run(project, "--streambus-record-mode=all", f"--streambus-upstream={upstream.url}").assert_outcomes(passed=1)
    assert len(upstream.requests) == 2
    after = read_recording(_file(project)).streams
    assert len(after) == 1 and after != before


def test_marker_sets_mode_and_path_and_the_command_line_wins(project: pytest.Pytester, upstream: MockServer) -> None:
    project.makepyfile(
        test_proj=PROJECT.replace("PROMPT", '"one"').replace(
            "def test_one",
            '@pytest.mark.streambus_recording(record_mode="once", path="cassettes/one.jsonl")\ndef test_one',
        )
    )
    _run(project, f"--streambus-upstream={upstream.url}").assert_outcomes(passed=1)
    assert (project.path / "cassettes" / "one.jsonl").exists()
    (project.path / "cassettes" / "one.jsonl").unlink()
    overridden = _run(project, "--streambus-record-mode=none", f"--streambus-upstream={upstream.url}")
    overridden.assert_outcomes(failed=1, errors=1)
    assert len(upstream.requests) == 1


def test_bad_settings_are_named(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("STREAMBUS_UPSTREAM", raising=False)
    pytester.makepyfile(
        test_bad="""
import pytest

@pytest.mark.streambus_recording(record_mode="once")
def test_no_upstream(streambus_recording):
    pass

@pytest.mark.streambus_recording(speed="fast")
def test_bad_speed(streambus_recording):
    pass

@pytest.mark.streambus_recording(recordmode="once")
def test_typo(streambus_recording):
    pass

@pytest.mark.streambus_recording(speed=2)
def test_paced(streambus_recording):
    mock = streambus_recording.cassette.mock
    assert (mock.burst, mock.speed) == (False, 2.0)

def test_instant_by_default(streambus_recording):
    assert streambus_recording.cassette.mock.burst

def test_damaged(streambus_recording):
    pass
"""
    )
    damaged = _file(pytester, "test_damaged", "test_bad")
    damaged.parent.mkdir(parents=True)
    damaged.write_text('{"streambus_recording": 1}\nnot json\n{"type": "end", "stream": "s", "seq": 1, "ts": 1}\n')
    result = _run(pytester)
    result.assert_outcomes(errors=4, passed=2)
    out = result.stdout.str()
    assert "record mode 'once' needs the real upstream to record" in out
    assert "streambus_recording marker: speed: expected 'instant' or a positive number, got 'fast'" in out
    assert "streambus_recording marker: unknown option(s) ['recordmode']" in out
    assert "streambus_recording: " + str(damaged) + ":2: " in out


OPENAI_PROJECT = """
def test_key(streambus_recording):
    client = streambus_recording.openai()
    stream = client.chat.completions.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}], stream=True,
        extra_body={"api_key": BODY_KEY},
    )
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == "Hello! How can I help you today?"
"""
HEADER_KEY = "sk-proj-" + "A1b2C3d4E5f6G7h8I9j0K1l2M3n4O5p6"
BODY_KEY = "sk-body-" + "Z9y8X7w6V5u4T3s2R1q0P9o8N7m6L5k4"


def test_keys_are_scrubbed_and_a_key_left_in_a_recording_fails_the_test(
    project: pytest.Pytester, upstream: MockServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", HEADER_KEY)
    project.makepyfile(test_proj=OPENAI_PROJECT.replace("BODY_KEY", repr(BODY_KEY)))
    # The body field is not configured: the key it holds stops the recording from being written.
    leaked = _run(project, "--streambus-record-mode=once", f"--streambus-upstream={upstream.url}")
    leaked.assert_outcomes(passed=1, errors=1)
    out = leaked.stdout.str()
    assert "the recording holds something that looks like a key" in out
    assert "openai-style key sk-b...(40 characters)" in out
    assert BODY_KEY not in out and HEADER_KEY not in out
    assert not _file(project, "test_key").exists()
    # Configured: the header and the field are scrubbed, the recording is written and replays.
    project.makeini("[pytest]\nfilterwarnings = error\nstreambus_scrub_fields = api_key\n")
    _run(project, "--streambus-record-mode=once", f"--streambus-upstream={upstream.url}").assert_outcomes(passed=1)
    text = _file(project, "test_key").read_text(encoding="utf-8")
    assert HEADER_KEY not in text and BODY_KEY not in text
    (request,) = read_recording(_file(project, "test_key")).requests.values()
    assert request["body"]["api_key"] == "[scrubbed]"
    assert request["headers"]["authorization"] == "[scrubbed]"
    monkeypatch.delenv("OPENAI_API_KEY")
    # Replayed with another key in the body: the scrubbed field still matches.
    _run(project, "--streambus-record-mode=none").assert_outcomes(passed=1)
    # A key pasted into a recording by hand fails the test before it runs.
    _file(project, "test_key").write_text(text.replace("Hello", HEADER_KEY), encoding="utf-8")
    pasted = _run(project, "--streambus-record-mode=none")
    pasted.assert_outcomes(errors=1)
    assert "openai-style key sk-p...(40 characters)" in pasted.stdout.str()


@pytest.mark.slow  # a pytest process and two xdist workers: 25 s measured at load average 8 on 2 cores
def test_xdist_workers_record_different_tests_at_once(pytester: pytest.Pytester, upstream: MockServer) -> None:
    pytest.importorskip("xdist")
    pytester.makeini("[pytest]\nfilterwarnings = error\n")
    tests = "\n".join(
        f"def test_{i}(streambus_recording):\n"
        f"    parts = streambus_recording.ollama().chat(model='llama3.2', "
        f"messages=[{{'role': 'user', 'content': 'question {i}'}}], stream=True)\n"
        f"    assert ''.join(p.message.content for p in parts)\n"
        for i in range(6)
    )
    pytester.makepyfile(test_many=tests)
    env_upstream = f"--streambus-upstream={upstream.url}"
    recorded = pytester.runpytest_subprocess(*QUICK, "-n", "2", "--streambus-record-mode=once", env_upstream)
    recorded.assert_outcomes(passed=6)
    for i in range(6):
        recording = read_recording(_file(pytester, f"test_{i}", "test_many"))
        (request,) = recording.requests.values()
        assert request["body"]["messages"][0]["content"] == f"question {i}"
    assert len(upstream.requests) == 6
    leftovers = [p.name for p in (pytester.path / "recordings" / "test_many").iterdir() if p.name.endswith(".partial")]
    assert leftovers == []


def test_cassette_refuses_a_bad_mode_and_speed(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="record mode: expected one of none, once, new_episodes, all, got 'always'"):
        Cassette(tmp_path / "x.jsonl", mode="always")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="speed: must be positive"):
        Cassette(tmp_path / "x.jsonl", speed=0)
    assert not os.listdir(tmp_path)


DIALECTS = {
    "responses": """
    events = streambus_recording.openai().responses.create(model="gpt-4o-mini", input="Say hello", stream=True)
    text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
""",
    "anthropic": """
    client = streambus_recording.anthropic()
    with client.messages.stream(
        model="gpt-4o-mini", max_tokens=64, messages=[{"role": "user", "content": "Say hello"}]
    ) as stream:
        text = "".join(stream.text_stream)
""",
    "gemini": """
    client = streambus_recording.gemini()
    text = "".join(p.text or "" for p in client.models.generate_content_stream(model="gpt-4o-mini", contents="Hi"))
""",
}


@pytest.mark.parametrize("dialect", sorted(DIALECTS))
def test_other_dialects_record_through_the_proxy_and_replay(
    project: pytest.Pytester, upstream: MockServer, dialect: str
) -> None:
    """Responses, Anthropic and Gemini record through the proxy (which parses them) and replay offline."""
    pytest.importorskip({"responses": "openai", "anthropic": "anthropic", "gemini": "google.genai"}[dialect])
    project.makepyfile(
        test_proj="def test_one(streambus_recording):"
        + DIALECTS[dialect]
        + "    assert text == 'Hello! How can I help you today?'\n"
    )
    recorded = _run(project, "--streambus-record-mode=once", f"--streambus-upstream={upstream.url}")
    recorded.assert_outcomes(passed=1)
    asked = len(upstream.requests)
    assert asked >= 1
    _run(project, "--streambus-record-mode=none").assert_outcomes(passed=1)
    assert len(upstream.requests) == asked
    assert read_recording(_file(project)).requests


def test_fixture_clients_of_every_dialect_replay_a_recording(project: pytest.Pytester) -> None:
    """The fixture's anthropic() and gemini() clients replay a recording that stores their requests."""
    anthropic = pytest.importorskip("anthropic")
    pytest.importorskip("google.genai")
    pytest.importorskip("streambus_anthropic")
    pytest.importorskip("streambus_gemini")
    from google import genai
    from google.genai import types

    from streambus.events import DeltaEvent, EndEvent, Event, StartEvent
    from streambus.recording import write_recording

    def stream(sid: str, model: str, text: str) -> list[Event]:
        return [
            StartEvent(stream=sid, seq=0, ts=1.0, model=model),
            *(DeltaEvent(stream=sid, seq=i + 1, ts=1.0 + i / 100, text=w) for i, w in enumerate(text.split("|"))),
            EndEvent(stream=sid, seq=len(text.split("|")) + 1, ts=2.0),
        ]

    claude, gemini = stream("c", "claude-x", "Bonjour| le| ciel"), stream("g", "gemini-x", "Hallo| Himmel")
    # The requests the two clients really send, as a model-matched mock server sees them.
    learner = MockServer([*claude, *gemini], burst=True, match="model")
    with learner.running() as url:
        with anthropic.Anthropic(base_url=url, api_key="k", max_retries=0) as client:
            client.messages.create(model="claude-x", max_tokens=9, messages=[{"role": "user", "content": "Sky?"}])
        with genai.Client(api_key="k", http_options=types.HttpOptions(base_url=url)) as client:
            list(client.models.generate_content_stream(model="gemini-x", contents="Himmel?"))
    requests = [r.request.to_json() for r in learner.requests if r.request is not None]
    _file(project).parent.mkdir(parents=True)
    write_recording(_file(project), [*claude, *gemini], requests={"c": requests[0], "g": requests[1]})
    project.makepyfile(
        test_proj="""
def test_one(streambus_recording):
    client = streambus_recording.anthropic()
    reply = client.messages.create(model="claude-x", max_tokens=9, messages=[{"role": "user", "content": "Sky?"}])
    assert reply.content[0].text == "Bonjour le ciel"
    parts = streambus_recording.gemini().models.generate_content_stream(model="gemini-x", contents="Himmel?")
    assert [p.text for p in parts if p.text] == ["Hallo", " Himmel"]
"""
    )
    _run(project, "--streambus-record-mode=none").assert_outcomes(passed=1)
