from __future__ import annotations

from pathlib import Path

import pytest
from streambus_template import TextFilesSink

from streambus import Bus, ConfigError
from streambus.config import parse_config
from streambus.contract import SinkContract


class TestTextFilesContract(SinkContract):
    entry_point = "textfiles"

    def make_sink(self, tmp_path: Path) -> TextFilesSink:
        return TextFilesSink(TextFilesSink.Options(directory=str(tmp_path / "out")))

    def delivered_text(self, sink: object, tmp_path: Path) -> dict[str, str]:
        return {p.stem: p.read_text(encoding="utf-8") for p in (tmp_path / "out").glob("*.txt")}


@pytest.mark.anyio
async def test_reasoning_channel(tmp_path: Path) -> None:
    sink = TextFilesSink(TextFilesSink.Options(directory=str(tmp_path), channel="reasoning"))
    async with Bus() as bus:
        bus.add_sink(sink)
        async with bus.stream(stream="r") as w:
            await w.delta("because", channel="reasoning")
            await w.delta("answer")
    assert (tmp_path / "r.txt").read_text() == "because"


def test_config_validation_names_the_key() -> None:
    with pytest.raises(ConfigError, match=r"sinks\[0\]\.channel: expected content, reasoning or tool"):
        parse_config({"sinks": [{"type": "textfiles", "directory": "x", "channel": "audio"}]})
    with pytest.raises(ConfigError, match=r"sinks\[0\]\.directory: missing required key"):
        parse_config({"sinks": [{"type": "textfiles"}]})


def test_options_or_keywords_never_both(tmp_path: Path) -> None:
    assert TextFilesSink(directory=tmp_path).options.directory == str(tmp_path)
    with pytest.raises(TypeError, match=r"not both; .*\(got an Options and channel\)"):
        TextFilesSink(TextFilesSink.Options(directory="x"), channel="reasoning")
    with pytest.raises(ValueError, match="channel: expected content, reasoning or tool"):
        TextFilesSink(directory="x", channel="audio")
