"""Every ready-made pipeline in configs/ checks; the ones that need no outside server run end to end."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from streambus import load_config

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = sorted((ROOT / "configs").glob("*.toml"))

# Configs that finish by themselves and need nothing but this machine.
RUNNABLE = {
    "http.toml": "serves HTTP only with --serve; runs to completion otherwise",
    "load.toml": "synthetic load through every sink",
    "moderation.toml": "synthetic streams through the gate",
    "record.toml": "synthetic streams into recordings/",
    "replay.toml": "replays tests/data/chat.jsonl",
    "stats.toml": "synthetic streams measured",
    "websocket-demo.toml": "synthetic streams broadcast",
    "redis-worker.toml": "synthetic streams into the local Redis",
}
# The others wait for something outside this repository, or run until stopped.
NOT_RUN = {
    "ollama.toml": "needs an Ollama server",
    "ollama-live.toml": "needs an Ollama server",
    "openai.toml": "needs an OpenAI-compatible server",
    "openai-moderated.toml": "needs an OpenAI-compatible server",
    "proxy-ollama.toml": "a proxy in front of an Ollama server",
    "redis-broadcaster.toml": "a consumer: runs until stopped (--serve)",
    "redis-recorder.toml": "a consumer: runs until stopped (--serve)",
    "nats-worker.toml": "needs NATS JetStream (plugins/nats/tests/test_docs.py runs it against a private server)",
    "nats-edge.toml": "a consumer: runs until stopped (--serve)",
    "nats-recorder.toml": "a consumer: runs until stopped (--serve)",
    "replay-websocket.toml": "loops forever for front-end development",
}


def test_every_config_is_classified() -> None:
    names = {c.name for c in CONFIGS}
    assert names <= set(RUNNABLE) | set(NOT_RUN), names - set(RUNNABLE) - set(NOT_RUN)
    assert len(CONFIGS) >= 12


@pytest.mark.parametrize("config", CONFIGS, ids=[c.name for c in CONFIGS])
def test_config_checks(config: Path) -> None:
    text = config.read_text(encoding="utf-8")
    assert text.startswith("#"), f"{config.name} must be documented at the top"
    pipeline = load_config(config)
    assert pipeline.producers or pipeline.sinks


@pytest.mark.parametrize("name", sorted(RUNNABLE))
def test_runnable_config_runs_end_to_end(name: str, tmp_path: Path) -> None:
    # Run from a copy of the tree's relative paths: recordings land in tmp_path.
    for rel in ("tests/data",):  # a streambus/ directory here would shadow the package
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).symlink_to(ROOT / rel)
    result = subprocess.run(
        [sys.executable, "-m", "streambus", "run", str(ROOT / "configs" / name)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    assert "Traceback" not in result.stderr
