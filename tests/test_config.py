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


def test_the_one_option_rule_names_every_bad_input(tmp_path: Path) -> None:
    import msgspec

    from streambus import PluginBase, StreamBusError, UnknownOption

    class Model:
        """Stands for a chat model or a URL given where the Options go."""

    class Thing(PluginBase):
        class Options(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
            size: int = 1
            path: str = ""

            def __post_init__(self) -> None:
                if self.size == 13:
                    raise ValueError("size: 13 brings bad luck")

        def __init__(self, options: Options | None = None, /, **keys: object) -> None:
            self.options = self.resolve_options(options, keys)

    class Merging(Thing):
        keywords_override = True

    # A wrong first argument is named by its type (never its value: it may hold a password).
    with pytest.raises(TypeError, match=r"got tests\.test_config\..*\.Model; give settings as keywords") as wrong:
        Thing(Model())  # type: ignore[arg-type]
    assert "redis" not in str(wrong.value)
    with pytest.raises(TypeError, match=r"got str;") as wrong:
        Thing("redis://:secret@127.0.0.1")  # type: ignore[arg-type]
    assert "secret" not in str(wrong.value)
    # Both: the keywords are named; a class with keywords_override merges them over the Options.
    with pytest.raises(TypeError, match=r"not both; .*\(got an Options and path, size\)"):
        Thing(Thing.Options(), size=2, path="x")
    merged = Merging(Merging.Options(size=2, path="kept"), size=3)
    assert (merged.options.size, merged.options.path) == (3, "kept")
    with pytest.raises(ValueError, match="size: 13 brings bad luck"):
        Merging(Merging.Options(size=2), size=13)  # the merged result is validated again
    # An unknown keyword: a TypeError (as Python has it), a ValueError (as the rule has it), in the tree.
    with pytest.raises(UnknownOption, match=r"Thing: unknown field `sise`; did you mean `size`\?") as unknown:
        Thing(sise=2)
    assert isinstance(unknown.value, TypeError | ValueError) and isinstance(unknown.value, StreamBusError)
    assert (unknown.value.plugin, unknown.value.key, unknown.value.known) == ("Thing", "sise", ["path", "size"])
    # The Options' own checks speak first, in the plugin's words; types are checked as for a config.
    with pytest.raises(ValueError, match="size: 13 brings bad luck"):
        Thing(size=13)
    with pytest.raises(ValueError, match=r"Expected `int`, got `str` - at `\$\.size`"):
        Thing(size="big")
    # A path may be a Path where the option is a string.
    assert Thing(path=tmp_path).options.path == str(tmp_path)
