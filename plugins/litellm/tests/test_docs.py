"""docs/plugins/litellm.md: its pipeline is valid and every option is documented (no LiteLLM needed)."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import msgspec
from streambus_litellm import LiteLLMProducer

from streambus.config import parse_config

DOC = Path(__file__).resolve().parents[3] / "docs" / "plugins" / "litellm.md"
TEXT = DOC.read_text(encoding="utf-8")
TOML = re.findall(r"```toml\n(.*?)```", TEXT, flags=re.S)


def test_pipeline_example_is_valid() -> None:
    (producer,) = parse_config(tomllib.loads(TOML[0]), path="litellm.toml").producers
    assert isinstance(producer, LiteLLMProducer)
    arguments = producer.arguments()
    assert arguments["model"] == "groq/llama-3.1-8b-instant" and arguments["stream_options"] == {"include_usage": True}


def test_every_option_is_documented() -> None:
    for field in msgspec.structs.fields(LiteLLMProducer.Options):
        assert f"| `{field.name}` |" in TEXT, field.name
