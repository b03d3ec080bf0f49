"""streambus.validation: a msgspec validation error taken apart once, for every caller."""

from __future__ import annotations

import msgspec
import pytest

from streambus.validation import ValidationProblem, validation_problem


class Inner(msgspec.Struct, forbid_unknown_fields=True):
    user: str


class Outer(msgspec.Struct, forbid_unknown_fields=True):
    seq: int
    meta: Inner


def _problem(data: object) -> ValidationProblem:
    with pytest.raises(msgspec.ValidationError) as info:
        msgspec.convert(data, Outer)
    return validation_problem(info.value)


def test_a_wrong_type_names_its_path() -> None:
    problem = _problem({"seq": "x", "meta": {"user": "u"}})
    assert problem == ValidationProblem("$.seq", "Expected `int`, got `str`", None, None)
    assert problem.field == "$.seq"


def test_a_missing_field_is_named_with_its_parent() -> None:
    problem = _problem({"seq": 1, "meta": {}})
    assert (problem.path, problem.missing, problem.field) == ("$.meta", "user", "$.meta.user")
    top = _problem({"meta": {"user": "u"}})
    assert (top.path, top.missing, top.field) == (None, "seq", "$.seq")


def test_an_unknown_field_is_named() -> None:
    problem = _problem({"seq": 1, "meta": {"user": "u", "x": 1}})
    assert (problem.path, problem.unknown, problem.field) == ("$.meta", "x", "$.meta.x")


def test_the_whole_value_has_no_path() -> None:
    problem = _problem([1, 2])
    assert problem.path is None
    assert problem.message.startswith("Expected `object`")


def test_describe_reads_as_field_then_problem() -> None:
    assert _problem({"seq": "x", "meta": {"user": "u"}}).describe() == "seq: expected `int`, got `str`"
    assert _problem([1]).describe().startswith("expected `object`")


def test_a_wrong_first_argument_names_what_was_given() -> None:
    """A positional object that is not the plugin's Options (a URL, a model...) is named, not mistaken for options."""
    from streambus import PluginBase

    class Thing(PluginBase):
        class Options(msgspec.Struct, kw_only=True):
            size: int = 1

        def __init__(self, options: Options | None = None, **keys: object) -> None:
            self.options = self.resolve_options(options, keys)

    with pytest.raises(TypeError, match=r"Thing: the first argument must be a Thing.Options, got str"):
        Thing("redis://127.0.0.1")  # type: ignore[arg-type]
    assert Thing(Thing.Options(size=2)).options.size == 2
