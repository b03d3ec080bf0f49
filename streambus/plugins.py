"""The plugin registry: producers, sinks, moderators and CLI commands by entry point.

Entry point groups (built-in plugins are registered exactly the same way):

``streambus.producers`` / ``streambus.sinks`` / ``streambus.moderators``
    A class with an ``Options`` attribute (a :class:`msgspec.Struct` type
    describing its config keys) and a ``from_options(options)`` classmethod.
    Derive from :class:`PluginBase` to get both conventions for free.
``streambus.formats``
    A provider's wire format both ways (:class:`streambus.formats.WireFormat`).
``streambus.commands``
    A :mod:`click` command added to the ``streambus`` CLI.

A plugin whose import fails is reported with the install hint of its
distribution, never a traceback (as opentelemetry's loader does).
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from importlib.metadata import EntryPoint, entry_points
from typing import Any, ClassVar, Literal, TypeAlias

import msgspec
import structlog

from .errors import ConfigError, PluginError, PluginNotFound

__all__ = [
    "GROUPS",
    "PluginBase",
    "PluginInfo",
    "PluginKind",
    "build",
    "discover",
    "install_hint",
    "load",
    "validate_options",
]

log = structlog.get_logger("streambus.plugins")

PluginKind: TypeAlias = Literal["producers", "sinks", "moderators", "formats", "commands"]
GROUPS: dict[PluginKind, str] = {
    "producers": "streambus.producers",
    "sinks": "streambus.sinks",
    "moderators": "streambus.moderators",
    "formats": "streambus.formats",
    "commands": "streambus.commands",
}


class PluginBase:
    """Convenience base for plugins configured by an ``Options`` struct.

    Subclasses set ``Options`` to a ``msgspec.Struct`` type (use
    ``forbid_unknown_fields=True`` so typos in configs are caught) and accept
    one argument, the options, in ``__init__``.
    """

    Options: ClassVar[type[msgspec.Struct]]

    @classmethod
    def from_options(cls, options: Any) -> Any:
        """Build the plugin from validated options."""
        return cls(options)  # type: ignore[call-arg]

    @classmethod
    def resolve_options(cls, options: Any, keys: Mapping[str, Any]) -> Any:
        """The options an ``__init__(options=None, **keys)`` was given: *options*, or *keys* validated.

        Raises ``TypeError`` when both are given (one would be silently
        ignored) and ``ValueError`` naming the key when a keyword option is
        invalid (``msgspec.ValidationError`` is one).
        """
        if options is not None:
            if keys:
                raise TypeError(f"{cls.__name__}: pass either options or keyword options, not both")
            return options
        return msgspec.convert(dict(keys), cls.Options)


@dataclasses.dataclass(frozen=True)
class PluginInfo:
    """What the registry knows of one entry point."""

    kind: PluginKind
    name: str
    value: str
    distribution: str | None
    version: str | None
    summary: str
    """The first line of the plugin's docstring, as plain text (reST literals unquoted)."""
    error: str | None = None

    @property
    def ok(self) -> bool:
        """Whether the plugin imported."""
        return self.error is None


def install_hint(distribution: str, extra: str | None = None) -> str:
    """The install line for *distribution* (optionally with *extra*), as error messages show it.

    streambus's own plugin distributions are not on PyPI, so for a
    ``streambus-NAME`` distribution the line also says how to install it from
    a clone (``pip install -e plugins/NAME``).
    """
    wanted = f"{distribution}[{extra}]" if extra else distribution
    line = f"pip install '{wanted}'" if extra else f"pip install {wanted}"
    if distribution.startswith("streambus-"):
        folder = "plugins/" + distribution.removeprefix("streambus-")
        local = f"'{folder}[{extra}]'" if extra else folder
        line += f" (from a streambus clone: pip install -e {local})"
    return line


def _hint(ep: EntryPoint) -> str | None:
    dist = ep.dist.name if ep.dist is not None else None
    return f"Install it with: {install_hint(dist)}" if dist else None


def _entry_points(kind: PluginKind) -> dict[str, EntryPoint]:
    return {ep.name: ep for ep in entry_points(group=GROUPS[kind])}


def _failure_message(ep: EntryPoint, exc: BaseException) -> str:
    message = str(exc) or type(exc).__name__
    # Plugins re-raise ImportError with the exact pip command; keep theirs.
    if "pip install" in message:
        return message
    hint = _hint(ep)
    return f"{message}. {hint}" if hint else message


def load(kind: PluginKind, name: str) -> Any:
    """Import and return the plugin *name* of *kind*.

    Raises :class:`~streambus.errors.PluginNotFound` naming the known plugins
    when *name* is unknown, or :class:`~streambus.errors.PluginError` carrying
    the install hint when the import fails.
    """
    eps = _entry_points(kind)
    ep = eps.get(name)
    if ep is None:
        known = ", ".join(sorted(eps)) or "none"
        raise PluginNotFound(f"unknown {kind[:-1]} type {name!r} (installed: {known})", kind=kind, name=name)
    try:
        return ep.load()
    except Exception as exc:
        log.warning("plugin.import_failed", kind=kind, plugin=name, error=str(exc))
        raise PluginError(
            f"{kind[:-1]} plugin {name!r} could not be imported: {_failure_message(ep, exc)}", name=name
        ) from None


def _plain(line: str) -> str:
    """A docstring line for a terminal: ``literal`` and :role:`target` markup become their text."""
    line = re.sub(r":[a-z]+:`~?([^`]+)`", r"\1", line)
    return line.replace("``", "")


def discover(kind: PluginKind | None = None) -> list[PluginInfo]:
    """List every plugin found (importing each to report failures), sorted."""
    kinds: list[PluginKind] = [kind] if kind else list(GROUPS)
    found: list[PluginInfo] = []
    for k in kinds:
        for name, ep in sorted(_entry_points(k).items()):
            dist = ep.dist.name if ep.dist is not None else None
            version = ep.dist.version if ep.dist is not None else None
            try:
                target = ep.load()
            except Exception as exc:
                found.append(PluginInfo(k, name, ep.value, dist, version, "", _failure_message(ep, exc)))
                continue
            doc = (getattr(target, "help", None) if k == "commands" else None) or getattr(target, "__doc__", "") or ""
            summary = _plain(doc.strip().splitlines()[0]) if doc.strip() else ""
            found.append(PluginInfo(k, name, ep.value, dist, version, summary))
    return found


def _describe_value(value: Any) -> str:
    if isinstance(value, str):
        return f'"{value}"'
    return repr(value)


def _lookup(data: Any, path: str) -> Any:
    current = data
    for part in path.replace("]", "").replace("[", ".").split(".")[1:]:
        if not part:
            continue
        try:
            current = current[int(part)] if isinstance(current, list) else current[part]
        except (KeyError, IndexError, ValueError, TypeError):
            return None
    return current


_TYPE_WORDS = {
    "`int`": "integer",
    "`str`": "string",
    "`float`": "number",
    "`bool`": "boolean",
    "`array`": "array",
    "`object`": "table",
}


def validate_options(
    options_type: type[msgspec.Struct],
    data: Mapping[str, Any],
    *,
    path: str | None = None,
    location: str | None = None,
) -> Any:
    """Convert *data* into *options_type*, raising a :class:`ConfigError` that names the key.

    The message reads ``path: location.key: expected integer, got "abc"``.
    """
    try:
        return msgspec.convert(dict(data), options_type, strict=False)
    except msgspec.ValidationError as exc:
        message = str(exc)
        where = ""
        if " - at `" in message:
            message, where = message.rsplit(" - at `", 1)
            where = where.rstrip("`")
        if message.startswith("Object missing required field `"):
            key = message.split("`")[1]
            sub = where[1:] if where.startswith("$") else where
            raise ConfigError(
                "missing required key", path=path, location=_join(location, f"{sub.lstrip('.')}.{key}".strip("."))
            ) from None
        if message.startswith("Object contains unknown field `"):
            key = message.split("`")[1]
            sub = where[1:] if where.startswith("$") else where
            known = ", ".join(f.name for f in msgspec.structs.fields(options_type))
            raise ConfigError(
                f"unknown key (known keys: {known})",
                path=path,
                location=_join(location, f"{sub.lstrip('.')}.{key}".strip(".")),
            ) from None
        problem = message
        at: str | None = where[1:].lstrip(".") or None
        field_names = {f.name for f in msgspec.structs.fields(options_type)}
        head, sep, rest = message.partition(": ")
        if at is None and sep and head in field_names:
            # A check in __post_init__ raised ValueError("key: problem").
            raise ConfigError(rest, path=path, location=_join(location, head)) from None
        if message.startswith("Expected "):
            expected = message[len("Expected ") :].split(", got ")[0].replace(" | null", "")
            for raw, word in _TYPE_WORDS.items():
                expected = expected.replace(raw, word)
            value = _lookup(dict(data), where)
            problem = f"expected {expected}, got {_describe_value(value)}"
        elif message.startswith("Invalid enum value"):
            value = _lookup(dict(data), where)
            problem = f"invalid value {_describe_value(value)}"
        raise ConfigError(problem, path=path, location=_join(location, at)) from None


def _join(location: str | None, key: str | None) -> str | None:
    if location and key:
        return f"{location}.{key}"
    return location or key


def build(
    kind: PluginKind,
    name: str,
    options: Mapping[str, Any],
    *,
    path: str | None = None,
    location: str | None = None,
) -> Any:
    """Load plugin *name*, validate *options* against its ``Options`` and build it."""
    try:
        cls = load(kind, name)
    except PluginError as exc:
        raise ConfigError(str(exc), path=path, location=_join(location, "type")) from None
    options_type = getattr(cls, "Options", None)
    if options_type is None:
        raise ConfigError(
            f"plugin {name!r} ({cls!r}) has no Options struct and cannot be configured from a file",
            path=path,
            location=location,
        )
    opts = validate_options(options_type, options, path=path, location=location)
    factory = getattr(cls, "from_options", None)
    try:
        return factory(opts) if factory is not None else cls(opts)
    except (ValueError, TypeError) as exc:
        raise ConfigError(str(exc), path=path, location=location) from None
