"""Pipelines from TOML, entry points, the python moderator, and option errors naming the key."""

from __future__ import annotations

import textwrap
import tomllib
from pathlib import Path

import pytest
from streambus_moderation import (
    KeywordModerator,
    ModerationStage,
    PythonModerator,
    Span,
    Verdict,
    coerce_verdict,
)
from streambus_moderation.testing import assert_well_formed, delivered_text, run_chunks

from streambus import ConfigError, DeltaEvent, Event, ModerationEvent, Subscription
from streambus.config import parse_config
from streambus.plugins import discover, load

pytestmark = pytest.mark.anyio

MODULE = """
from streambus_moderation import Verdict, Span

async def no_secrets(text, word="secret"):
    at = text.find(word)
    if at < 0:
        return None
    return {"flagged": True, "categories": ["leak"], "spans": [{"start": at, "end": at + len(word)}]}

def not_async(text):
    return True
"""


@pytest.fixture
def user_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    (tmp_path / "mymoderation.py").write_text(MODULE, encoding="utf-8")
    monkeypatch.syspath_prepend(str(tmp_path))
    return "mymoderation"


def test_entry_points_are_registered() -> None:
    assert load("sinks", "moderation") is ModerationStage
    assert load("moderators", "keywords") is KeywordModerator
    assert load("moderators", "python") is PythonModerator
    names = {p.name for p in discover("moderators") if p.ok}
    assert {"openai", "keywords", "python"} <= names


async def test_python_moderator_by_import_path(user_module: str) -> None:
    moderator = PythonModerator(PythonModerator.Options(function=f"{user_module}:no_secrets", kwargs={"word": "pin"}))
    verdict = await moderator.check("my pin is 1234")
    assert verdict == Verdict(flagged=True, categories=["leak"], spans=[Span(start=3, end=6)])
    stage = ModerationStage(
        ModerationStage.Options(moderator={"type": "python", "function": f"{user_module}.no_secrets"}, window_chars=32)
    )
    _, moderated = await run_chunks(stage, ["the secret is ", "out"])
    assert delivered_text(moderated) == "the [removed] is out"


async def test_python_moderator_accepts_a_function_object() -> None:
    async def flag_all(text: str) -> bool:
        return "x" in text

    moderator = PythonModerator(function=flag_all)
    assert (await moderator.check("x")).flagged
    assert not (await moderator.check("y")).flagged


def test_python_moderator_errors_name_the_problem(user_module: str) -> None:
    with pytest.raises(ValueError, match="function: cannot import module 'nope_missing'"):
        PythonModerator(PythonModerator.Options(function="nope_missing:f"))
    with pytest.raises(ValueError, match="has no attribute 'absent'"):
        PythonModerator(PythonModerator.Options(function=f"{user_module}:absent"))
    with pytest.raises(ValueError, match="is not an async function"):
        PythonModerator(PythonModerator.Options(function=f"{user_module}:not_async"))
    with pytest.raises(ValueError, match="is not an import path"):
        PythonModerator(PythonModerator.Options(function="justaname"))
    with pytest.raises(TypeError, match="returned int"):
        coerce_verdict(3)
    with pytest.raises(TypeError, match="invalid verdict mapping"):
        coerce_verdict({"flagged": "maybe?"})


CONFIG = """
[[sinks]]
type = "moderation"
mode = "gate"
window_chars = 24
action = "redact"
replacement = "***"

[sinks.moderator]
type = "keywords"
words = { violence = ["kill"] }

[[sinks]]
type = "collect"
name = "audit"
raw = true
"""


async def test_pipeline_from_toml_with_raw_audit_sink(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: dict[str, list[Event]] = {"audit": [], "client": []}

    class Collect:
        Options = None

        def __init__(self, key: str) -> None:
            self.key = key

        async def run(self, events: Subscription) -> None:
            async for e in events:
                seen[self.key].append(e)

    import streambus.config as config_module

    real_build = config_module.build

    def build(kind: str, name: str, options: object, **kw: object) -> object:
        if name == "collect":
            return Collect("audit")
        return real_build(kind, name, options, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(config_module, "build", build)
    pipeline = parse_config(tomllib.loads(CONFIG), path="mod.toml")
    stage = pipeline.sinks[0].sink
    assert isinstance(stage, ModerationStage) and stage.options.replacement == "***"
    async with pipeline.make_bus() as bus:
        pipeline.attach(bus)
        bus.add_sink(Collect("client"), overflow="block")
        async with bus.stream(stream="t") as w:
            await w.delta("we will ki")
            await w.delta("ll it")
    assert delivered_text(seen["audit"]) == "we will kill it"
    assert delivered_text(seen["client"]) == "we will *** it"
    assert_well_formed(seen["client"])
    assert any(isinstance(e, ModerationEvent) for e in seen["client"])
    assert all(not isinstance(e, ModerationEvent) for e in seen["audit"])
    assert all(isinstance(e, DeltaEvent) is False or e.seq > 0 for e in seen["client"])


@pytest.mark.parametrize(
    ("table", "message"),
    [
        ("window_chars = 0", "window_chars: must be at least 1"),
        ('mode = "observe"\naction = "redact"', "action: 'redact' does not apply to mode 'observe'"),
        ('hold_policy = "maybe"', "hold_policy"),
        ("bogus = 1", "unknown key"),
    ],
)
def test_bad_stage_options_name_the_key(table: str, message: str) -> None:
    text = f'[[sinks]]\ntype = "moderation"\n{table}\n[sinks.moderator]\ntype = "keywords"\nwords = {{x = ["y"]}}\n'
    with pytest.raises(ConfigError, match=message) as info:
        parse_config(tomllib.loads(text), path="bad.toml")
    assert str(info.value).startswith("bad.toml: sinks[0]")


@pytest.mark.parametrize(
    ("moderator", "message"),
    [
        ('type = "nope"', r"moderator\.type: unknown moderator type 'nope' \(installed: .*keywords"),
        ("words = {}", "moderator.type: missing"),
        ('type = "keywords"\nwords = {x = "notalist"}', r"moderator\.words.*expected array"),
        ('type = "keywords"\npatterns = {x = ["("]}', r"patterns\.x\[0\]: invalid regular expression"),
    ],
)
def test_bad_moderator_tables_name_the_key(moderator: str, message: str) -> None:
    text = textwrap.dedent(f"""
        [[sinks]]
        type = "moderation"
        [sinks.moderator]
        {moderator}
    """)
    with pytest.raises(ConfigError, match=message) as info:
        parse_config(tomllib.loads(text), path="bad.toml")
    assert str(info.value).startswith("bad.toml: sinks[0]")


def test_a_moderator_given_as_the_options_argument_is_named_with_the_fix() -> None:
    moderator = KeywordModerator(words={"violence": ["kill"]})
    with pytest.raises(TypeError, match=r"ModerationStage: got a KeywordModerator .*moderator=") as info:
        ModerationStage(moderator)  # type: ignore[arg-type]
    assert "ModerationStage.Options" in str(info.value)
    with pytest.raises(TypeError, match=r"ModerationStage: got a dict .*ModerationStage.Options"):
        ModerationStage({"moderator": {"type": "keywords"}})  # type: ignore[arg-type]

    async def check(text: str) -> bool:
        return "kill" in text

    with pytest.raises(TypeError, match=r"PythonModerator: got a function .*function="):
        PythonModerator(check)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"PythonModerator: pass either options or function, not both"):
        PythonModerator(PythonModerator.Options(function="x:y"), function=check)
