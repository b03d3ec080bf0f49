from __future__ import annotations

from pathlib import Path

import pytest

from streambus import ConfigError, load_config
from streambus.builtins import StdoutSink, SyntheticProducer
from streambus.config import parse_config


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "pipeline.toml"
    path.write_text(text, encoding="utf-8")
    return path


def test_valid_config_builds_plugins(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """
        [bus]
        buffer = 64
        overflow = "block"
        [log]
        level = "debug"
        format = "json"
        [[producers]]
        type = "synthetic"
        count = 2
        [[sinks]]
        type = "stdout"
        name = "console"
        overflow = "coalesce"
        filter = { models = ["synthetic-1"] }
        """,
    )
    pipeline = load_config(path)
    assert pipeline.bus.buffer == 64
    assert pipeline.log.format == "json"
    assert isinstance(pipeline.producers[0], SyntheticProducer)
    assert pipeline.producers[0].options.count == 2
    entry = pipeline.sinks[0]
    assert isinstance(entry.sink, StdoutSink)
    assert entry.name == "console"
    assert entry.filter is not None
    assert entry.filter.models == frozenset({"synthetic-1"})


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('[[sinks]]\nformat = "text"\n', "pipeline.toml: sinks[0].type: missing required key"),
        ('[[sinks]]\ntype = "nope"\n', "pipeline.toml: sinks[0].type: unknown sink type 'nope' (installed:"),
        ('[[producers]]\ntype = "synthetic"\ncount = "abc"\n', 'producers[0].count: expected integer, got "abc"'),
        ('[[producers]]\ntype = "synthetic"\ncont = 3\n', "producers[0].cont: unknown key (known keys: count,"),
        ('[[producers]]\ntype = "synthetic"\ncount = -1\n', "producers[0].count: must be at least 0, got -1"),
        ('[bus]\noverflow = "sometimes"\n', 'pipeline.toml: bus.overflow: invalid value "sometimes"'),
        ("[bus]\nbuffer = 0\n", "pipeline.toml: bus.buffer: must be at least 1"),
        ('[log]\nlevel = "loud"\n', 'log.level: invalid value "loud"'),
        ('[[sinks]]\ntype = "stdout"\nbuffer = "big"\n', 'sinks[0].buffer: expected integer, got "big"'),
        ('[[sinks]]\ntype = "stdout"\nbuffer = 0\n', "sinks[0].buffer: must be at least 1, got 0"),
        ("[server]\nport = 1\n", "pipeline.toml: server: unknown table"),
        ('sinks = "stdout"\n', "sinks: expected an array of tables"),
        ("[[sinks]]\ntype = 3\n", "sinks[0].type: expected string"),
        ("[bus\n", "pipeline.toml: invalid TOML"),
    ],
)
def test_config_errors_name_file_table_and_key(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, text))
    assert message in str(info.value)
    assert info.value.path is not None
    assert info.value.path.endswith("pipeline.toml")


def test_second_sink_is_named_by_index(tmp_path: Path) -> None:
    path = write(tmp_path, '[[sinks]]\ntype = "stdout"\n[[sinks]]\ntype = "stdout"\nformat = 7\n')
    with pytest.raises(ConfigError, match=r"sinks\[1\]\.format: expected string, got 7"):
        load_config(path)


def test_missing_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read config"):
        load_config(tmp_path / "absent.toml")


def test_parse_config_from_mapping() -> None:
    pipeline = parse_config({"producers": [{"type": "synthetic", "count": 1}]}, path="inline")
    assert len(pipeline.producers) == 1
    assert pipeline.sinks == []


def test_resolve_options_takes_options_or_keys_never_both() -> None:
    import msgspec

    from streambus import PluginBase

    class Thing(PluginBase):
        class Options(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
            size: int = 1

    given = Thing.Options(size=3)
    assert Thing.resolve_options(given, {}) is given
    assert Thing.resolve_options(None, {"size": 5}) == Thing.Options(size=5)
    assert Thing.resolve_options(None, {}) == Thing.Options()
    with pytest.raises(TypeError, match="Thing: pass either options or keyword options, not both"):
        Thing.resolve_options(given, {"size": 5})
    with pytest.raises(ValueError, match=r"\$\.size"):
        Thing.resolve_options(None, {"size": "big"})
    with pytest.raises(ValueError, match="colour"):
        Thing.resolve_options(None, {"colour": "red"})
