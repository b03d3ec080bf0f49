"""The sample project under tests/sample_project records its LLM calls once, then replays them with no network.

Its own tests run in a subprocess pytest twice: first against a fake upstream (a
model-matched mock server playing ``tests/data/chat.jsonl``) with
``--streambus-record-mode=once``, through the proxy; then with that upstream
stopped, ``CI=true`` and ``--streambus-record-mode=none``. The same assertions
pass both times.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import orjson
import pytest

from streambus.mockserver import MockServer
from streambus.recording import read_recording
from streambus.scrubbing import find_secrets

ROOT = Path(__file__).resolve().parent
FAKE_KEY = "sk-test-" + "0123456789abcdefghijklmnopqrstuv"  # looks like a key, so scrubbing is checked

for module in ("streambus_proxy", "streambus_ollama", "streambus_openai", "openai", "ollama"):
    pytest.importorskip(module, reason="the sample project needs the proxy, both formats and both clients")


def _pytest(project: Path, *args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:hypothesispytest", *args],
        cwd=project,
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


@pytest.mark.slow  # two pytest processes: 29 s measured at load average 8 on 2 shared cores
def test_sample_project_records_once_then_replays_with_the_upstream_stopped(tmp_path: Path) -> None:
    project = tmp_path / "sample"
    shutil.copytree(ROOT / "sample_project", project, ignore=shutil.ignore_patterns("recordings", "__pycache__"))
    upstream = MockServer(ROOT / "data" / "chat.jsonl", speed=50.0, match="model")
    with upstream.running() as url:
        recorded = _pytest(
            project,
            "--streambus-record-mode=once",
            env={"STREAMBUS_UPSTREAM": url, "OPENAI_API_KEY": FAKE_KEY, "CI": "false"},
        )
        asked = len(upstream.requests)
    assert recorded.returncode == 0, recorded.stdout + recorded.stderr
    assert "6 passed" in recorded.stdout, recorded.stdout
    assert asked >= 6  # the first run went to the upstream
    files = sorted((project / "recordings" / "test_app").glob("*.jsonl"))
    assert [f.name for f in files] == [
        "test_async_ollama[asyncio].jsonl",
        "test_async_ollama[trio].jsonl",
        "test_langchain_chat_model.jsonl",
        "test_ollama_two_questions.jsonl",
        "test_openai_chat.jsonl",
        "test_through_the_streambus_proxy[asyncio].jsonl",
    ]
    for file in files:
        text = file.read_text(encoding="utf-8")
        assert find_secrets(text, known=[FAKE_KEY]) == [], file.name
        recording = read_recording(file)
        assert recording.requests and set(recording.requests) == set(recording.streams), file.name
    two = read_recording(project / "recordings" / "test_app" / "test_ollama_two_questions.jsonl")
    prompts = [r["body"]["messages"][0]["content"] for r in two.requests.values()]
    assert prompts == ["Why is the sky blue?", "Why is the sky blue? In Japanese."]
    chat = read_recording(project / "recordings" / "test_app" / "test_openai_chat.jsonl")
    (request,) = chat.requests.values()
    assert request["headers"]["authorization"] == "[scrubbed]"
    assert orjson.loads(orjson.dumps(request))["path"] == "/v1/chat/completions"

    before = {f.name: f.read_bytes() for f in files}
    # The upstream is gone: replaying must not need it.
    replayed = _pytest(project, "--streambus-record-mode=none", env={"STREAMBUS_UPSTREAM": url, "CI": "true"})
    assert replayed.returncode == 0, replayed.stdout + replayed.stderr
    assert "6 passed" in replayed.stdout, replayed.stdout
    # Replaying wrote nothing.
    assert {f.name: f.read_bytes() for f in sorted((project / "recordings" / "test_app").iterdir())} == before
