"""docs/plugins/gemini.md: its pipeline is valid and every option is documented."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import msgspec
from streambus_gemini import GeminiProducer

from streambus.config import parse_config

DOC = Path(__file__).resolve().parents[3] / "docs" / "plugins" / "gemini.md"
TEXT = DOC.read_text(encoding="utf-8")
TOML = re.findall(r"```toml\n(.*?)```", TEXT, flags=re.S)


def test_pipeline_example_is_valid() -> None:
    (producer,) = parse_config(tomllib.loads(TOML[0]), path="gemini.toml").producers
    assert isinstance(producer, GeminiProducer)
    assert producer.body()["generationConfig"] == {"thinkingConfig": {"includeThoughts": True}}
    assert producer.url.endswith("/v1beta/models/gemini-2.5-flash:streamGenerateContent?alt=sse")


def test_every_option_is_documented() -> None:
    for field in msgspec.structs.fields(GeminiProducer.Options):
        assert f"| `{field.name}` |" in TEXT, field.name
