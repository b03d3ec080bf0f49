"""docs/plugins/anthropic.md: its pipeline is valid and every option is documented."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import msgspec
from streambus_anthropic import AnthropicProducer

from streambus.config import parse_config

DOC = Path(__file__).resolve().parents[3] / "docs" / "plugins" / "anthropic.md"
TEXT = DOC.read_text(encoding="utf-8")
TOML = re.findall(r"```toml\n(.*?)```", TEXT, flags=re.S)


def test_pipeline_example_is_valid() -> None:
    (producer,) = parse_config(tomllib.loads(TOML[0]), path="anthropic.toml").producers
    assert isinstance(producer, AnthropicProducer)
    body = producer.body()
    assert body["system"] == "You are terse." and body["thinking"] == {"type": "enabled", "budget_tokens": 1024}
    assert body["max_tokens"] == 2048 and body["stream"] is True


def test_every_option_is_documented() -> None:
    for field in msgspec.structs.fields(AnthropicProducer.Options):
        assert f"| `{field.name}` |" in TEXT, field.name
