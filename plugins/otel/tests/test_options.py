"""Bad options are refused with an error naming the key; the registry builds the sink from config."""

from __future__ import annotations

import sys
import threading
import tomllib
from pathlib import Path
from typing import Any

import pytest
from streambus_otel import OtelSink

from streambus import ConfigError
from streambus.plugins import build, discover


@pytest.mark.parametrize(
    ("keys", "named"),
    [
        ({"max_content_chars": 0}, "max_content_chars"),
        ({"max_content_chars": 16_777_217}, "max_content_chars"),
        ({"metric_interval": 0.0}, "metric_interval"),
        ({"metric_interval": 90_000}, "metric_interval"),
        ({"export_timeout": -1}, "export_timeout"),
        ({"export_timeout": 601}, "export_timeout"),
        ({"read_pause": -0.1}, "read_pause"),
        ({"read_pause": 2}, "read_pause"),
        ({"metrics": "newest"}, "metrics"),
        ({"chunk_gaps": "median"}, "chunk_gaps"),
        ({"exporter": "jaeger"}, "exporter"),
        ({"endpoint": "127.0.0.1:4318"}, "endpoint"),
        ({"endpoint": "ftp://collector:4318"}, "endpoint"),
        ({"operation": ""}, "operation"),
        ({"service_name": ""}, "service_name"),
        ({"headers": {"authorization": 42}}, "headers"),
        ({"endpont": "http://127.0.0.1:4318"}, "endpont"),
    ],
)
def test_bad_options_name_the_key(keys: dict[str, Any], named: str) -> None:
    with pytest.raises(ConfigError, match=named) as info:
        build("sinks", "otel", keys, path="pipeline.toml", location="sinks[0]")
    assert "pipeline.toml" in str(info.value)
    with pytest.raises(ValueError, match=named):
        OtelSink(**keys)


def test_options_and_keyword_options_are_not_both_taken() -> None:
    with pytest.raises(TypeError, match="either options or keyword options"):
        OtelSink(OtelSink.Options(), metrics="old")


def test_the_registry_builds_the_sink_from_config() -> None:
    sink = build(
        "sinks",
        "otel",
        {"metrics": "both", "capture_content": True, "endpoint": "https://cloud.langfuse.com/api/public/otel"},
    )
    assert isinstance(sink, OtelSink)
    assert (sink.options.metrics, sink.options.capture_content) == ("both", True)
    [info] = [p for p in discover("sinks") if p.name == "otel"]
    assert info.ok
    assert info.distribution == "streambus-otel"


def test_the_config_example_in_the_docs_is_valid() -> None:
    page = Path(__file__).resolve().parents[3] / "docs" / "plugins" / "otel.md"
    text = page.read_text(encoding="utf-8")
    blocks = [b.split("```", 1)[0] for b in text.split("```toml\n")[1:]]
    assert blocks, "docs/plugins/otel.md has no TOML example"
    for block in blocks:
        for table in tomllib.loads(block).get("sinks", []):
            if table.get("type") == "otel":
                options = {k: v for k, v in table.items() if k != "type"}
                assert isinstance(build("sinks", "otel", options), OtelSink)


def test_otlp_without_the_exporter_installed_says_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    # None in sys.modules makes the import fail as if the package were not installed.
    monkeypatch.setitem(sys.modules, "opentelemetry.exporter.otlp.proto.http.trace_exporter", None)
    with pytest.raises(ImportError, match=r"pip install 'streambus-otel\[otlp\]'"):
        OtelSink(exporter="otlp")
    assert isinstance(OtelSink(exporter="global"), OtelSink)  # the default needs no exporter package


def test_building_an_otlp_sink_starts_no_export_thread() -> None:
    # `streambus check` builds every plugin of a config without running it.
    before = threading.active_count()
    sink = build("sinks", "otel", {"exporter": "otlp", "endpoint": "http://127.0.0.1:9"})
    assert isinstance(sink, OtelSink)
    assert threading.active_count() == before
