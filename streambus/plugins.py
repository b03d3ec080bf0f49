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

Numeric options state their bounds in their annotations, so a config can
never smuggle in ``nan``, ``inf`` or a sign the plugin cannot handle::

    class Options(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
        timeout: PositiveFloat = 10.0        # finite, > 0
        retries: NonNegativeInt = 2          # >= 0
        ratio: Fraction = 0.5                # 0 <= x <= 1
        port: Port = 8080                    # 0..65535

msgspec checks these bounds when a config is validated (NaN fails every
bound; the ``le=`` of float max refuses infinities); ``validate_options``
turns a violation into ``table.key: must be more than 0 and finite, got nan``.
What only a look at the machine can tell (a file that must exist, a directory
that must be writable) goes in the plugin's :meth:`PluginBase.preflight`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import os
import re
import sys
from collections.abc import Mapping
from importlib.metadata import EntryPoint, entry_points
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal, TypeAlias

import msgspec
import structlog

from .errors import ConfigError, PluginError, PluginNotFound, UnknownOption
from .validation import validation_problem

__all__ = [
    "GROUPS",
    "FiniteFloat",
    "Fraction",
    "NonNegativeFloat",
    "NonNegativeInt",
    "PluginBase",
    "PluginInfo",
    "PluginKind",
    "Port",
    "PositiveFloat",
    "PositiveInt",
    "build",
    "check_bounds",
    "check_plugin",
    "discover",
    "install_hint",
    "load",
    "require_readable_file",
    "require_writable_directory",
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


_FLOAT_MAX = sys.float_info.max

PositiveInt: TypeAlias = Annotated[int, msgspec.Meta(ge=1)]
"""An integer option of at least 1 (a count, a size)."""
NonNegativeInt: TypeAlias = Annotated[int, msgspec.Meta(ge=0)]
"""An integer option of at least 0."""
Port: TypeAlias = Annotated[int, msgspec.Meta(ge=0, le=65535)]
"""A TCP port; 0 usually means "pick a free one"."""
PositiveFloat: TypeAlias = Annotated[float, msgspec.Meta(gt=0, le=_FLOAT_MAX)]
"""A finite number above 0 (a timeout, a rate): ``nan``, ``inf``, 0 and negatives are refused."""
NonNegativeFloat: TypeAlias = Annotated[float, msgspec.Meta(ge=0, le=_FLOAT_MAX)]
"""A finite number of at least 0 (a delay where 0 means none): ``nan``, ``inf`` and negatives are refused."""
FiniteFloat: TypeAlias = Annotated[float, msgspec.Meta(ge=-_FLOAT_MAX, le=_FLOAT_MAX)]
"""Any finite number: only ``nan`` and the infinities are refused."""
Fraction: TypeAlias = Annotated[float, msgspec.Meta(ge=0, le=1)]
"""A number within [0, 1] (a ratio, a probability, a threshold)."""


class PluginBase:
    """Convenience base for plugins configured by an ``Options`` struct.

    Subclasses set ``Options`` to a ``msgspec.Struct`` type (use
    ``forbid_unknown_fields=True`` so typos in configs are caught, and the
    bounded types above for numbers) and accept one argument, the options,
    in ``__init__``, or keyword options, resolved by :meth:`resolve_options`::

        def __init__(self, options: Options | None = None, /, **keys: Any) -> None:
            self.options = self.resolve_options(options, keys)
    """

    Options: ClassVar[type[msgspec.Struct]]
    keywords_override: ClassVar[bool] = False
    """Whether keyword options given with an ``Options`` override its fields.

    ``False`` (the default): giving both is a ``TypeError``, since one of them
    would look ignored. ``True`` for plugins whose ``Options`` is a base
    others are derived from: ``OllamaProducer(base, model="other")``.
    """

    def preflight(self) -> None:
        """Check what the options need from this machine, without side effects.

        ``streambus check`` and ``streambus run`` (before starting anything)
        call it (it is not named ``check``: moderators use that name). Override
        it to verify that files the plugin will read exist and directories it
        will write to are writable, and raise ``ValueError("key: problem")``
        naming the option (:func:`require_readable_file` and
        :func:`require_writable_directory` do). Do not open sockets or create
        files here. The default checks nothing.
        """

    @classmethod
    def from_options(cls, options: Any) -> Any:
        """Build the plugin from validated options."""
        return cls(options)  # type: ignore[call-arg]

    @classmethod
    def resolve_options(cls, options: Any, keys: Mapping[str, Any]) -> Any:
        """The options an ``__init__(options=None, /, **keys)`` was given: the one rule every plugin follows.

        - *options* alone (a ``cls.Options``) is used as given;
        - *keys* alone are validated like a config file's table (types, bounds,
          unknown keys) into a ``cls.Options``; the ``Options``' own checks
          (``__post_init__``) run first, so their messages win; a path may be
          given as a :class:`~pathlib.Path` where the option is a string;
        - both: a ``TypeError`` naming the keywords, unless the class sets
          :attr:`keywords_override`, where *keys* override the fields of
          *options* and the result is validated again.

        Raises ``TypeError`` when *options* is not a ``cls.Options`` (the
        message names the type that was given), :class:`~streambus.errors.UnknownOption`
        (a ``TypeError`` and a ``ValueError``) naming a key the ``Options`` does
        not have, and ``ValueError`` naming the key when a keyword option is
        invalid (``msgspec.ValidationError`` is one).
        """
        if options is not None:
            if not isinstance(options, cls.Options):
                raise TypeError(
                    f"{cls.__name__}: the first argument must be a {cls.__name__}.Options, got "
                    f"{_describe_argument(options)}; give settings as keywords instead ({cls.__name__}(key=value, ...))"
                )
            if not keys:
                return options
            if not cls.keywords_override:
                raise TypeError(
                    f"{cls.__name__}: pass either options or keyword options, not both; give either an Options "
                    f"or keywords (got an Options and {', '.join(sorted(keys))})"
                )
            keys = {**msgspec.structs.asdict(options), **keys}
        fields = cls.Options.__struct_fields__
        for key in keys:
            if key not in fields:
                raise UnknownOption(plugin=cls.__name__, key=key, known=sorted(fields))
        keys = {key: os.fspath(value) if isinstance(value, os.PathLike) else value for key, value in keys.items()}
        # The Options' own checks (__post_init__) speak first, in the plugin's words; a value
        # of the wrong type may trip them with a TypeError: msgspec names it below instead.
        with contextlib.suppress(TypeError, AttributeError):
            cls.Options(**keys)
        try:
            return msgspec.convert(keys, cls.Options)
        except msgspec.ValidationError as exc:
            problem = validation_problem(exc)
            message, where = problem.message, problem.path or ""
            bounded = _BOUND.match(message)
            if bounded is None:
                raise
            value = _describe_value(_lookup(dict(keys), where))
            key = where[1:].lstrip(".")
            raise ValueError(f"{key}: {_describe_bounds(cls.Options, where, bounded)}, got {value}") from None


def _describe_argument(value: Any) -> str:
    # The type only: a value given by mistake may be a URL with a password in it.
    kind = type(value)
    return kind.__qualname__ if kind.__module__ == "builtins" else f"{kind.__module__}.{kind.__qualname__}"


def require_readable_file(key: str, path: str | Path) -> None:
    """Raise ``ValueError("key: ...")`` unless *path* is a regular file this process can read."""
    p = Path(path)
    if not p.exists():
        raise ValueError(f"{key}: no such file: {p}")
    if not p.is_file():
        raise ValueError(f"{key}: not a regular file: {p}")
    if not os.access(p, os.R_OK):
        raise ValueError(f"{key}: not readable: {p}")


def require_writable_directory(key: str, path: str | Path) -> None:
    """Raise ``ValueError("key: ...")`` unless files can be created in directory *path*.

    A directory that does not exist yet passes when its nearest existing
    ancestor is a writable directory (it will be created). Nothing is created.
    """
    p = Path(path).absolute()
    existing = p
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        if existing == p:
            raise ValueError(f"{key}: {p} is not a directory")
        raise ValueError(f"{key}: {existing} is not a directory, so {p} cannot be created")
    if not os.access(existing, os.W_OK | os.X_OK):
        what = "not writable" if existing == p else f"cannot be created ({existing} is not writable)"
        raise ValueError(f"{key}: directory {p} {what}")


def check_bounds(options: msgspec.Struct) -> None:
    """Raise ``ValueError("key: must be ..., got ...")`` for a number outside its annotated bounds.

    msgspec checks ``Meta`` bounds when a config is validated, not when an
    ``Options`` struct is built in Python; call this from ``__post_init__``
    so both paths refuse ``nan``, ``inf`` and wrong signs alike.
    """
    for field in _struct_info(type(options)).fields:
        info = _numeric_info(field.type, "")
        value = getattr(options, field.name)
        if info is None or isinstance(value, bool) or not isinstance(value, int | float):
            continue
        if info.ge is None and info.gt is None and info.le is None and info.lt is None:
            continue  # a plain int or float: any value of its type (nan included) is its own business
        if not _within(value, info):
            raise ValueError(f"{field.name}: {_describe(info)}, got {_describe_value(value)}")


@functools.cache
def _struct_info(cls: type[msgspec.Struct]) -> Any:
    return msgspec.inspect.type_info(cls)


def _within(value: float, info: Any) -> bool:
    if value != value:  # NaN: every bound refuses it (bounded types always have one)
        return False
    return not (
        (info.ge is not None and value < info.ge)
        or (info.gt is not None and value <= info.gt)
        or (info.le is not None and value > info.le)
        or (info.lt is not None and value >= info.lt)
    )


def check_plugin(plugin: Any, *, path: str | None = None, location: str | None = None) -> None:
    """Call *plugin*'s ``preflight()`` (when it has one), as ``streambus check`` does.

    Raises :class:`~streambus.errors.ConfigError` naming the file, table and
    key from the plugin's ``ValueError("key: problem")`` (or ``OSError``).
    """
    preflight = getattr(plugin, "preflight", None)
    if preflight is None:
        return
    try:
        preflight()
    except ValueError as exc:
        raise _keyed(exc, path, location) from None
    except OSError as exc:
        raise ConfigError(_os_problem(exc), path=path, location=location) from None


def _keyed(exc: Exception, path: str | None, location: str | None) -> ConfigError:
    """A plugin's ``ValueError("key: problem")`` as ``path: location.key: problem``."""
    key, sep, problem = str(exc).partition(": ")
    if sep and re.fullmatch(r"[A-Za-z_][\w.\[\]]*", key):
        return ConfigError(problem, path=path, location=_join(location, key))
    return ConfigError(str(exc), path=path, location=location)


def _os_problem(exc: OSError) -> str:
    return f"{exc.strerror}: {exc.filename}" if exc.strerror and exc.filename else str(exc)


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
        found = validation_problem(exc)
        message, where = found.message, found.path or ""
        if found.missing is not None:
            key = found.missing
            sub = where[1:] if where.startswith("$") else where
            raise ConfigError(
                "missing required key", path=path, location=_join(location, f"{sub.lstrip('.')}.{key}".strip("."))
            ) from None
        if found.unknown is not None:
            key = found.unknown
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
        bounded = _BOUND.match(message)
        if bounded:
            value = _lookup(dict(data), where)
            problem = f"{_describe_bounds(options_type, where, bounded)}, got {_describe_value(value)}"
        elif message.startswith("Expected "):
            expected = message[len("Expected ") :].split(", got ")[0].replace(" | null", "")
            for raw, word in _TYPE_WORDS.items():
                expected = expected.replace(raw, word)
            value = _lookup(dict(data), where)
            problem = f"expected {expected}, got {_describe_value(value)}"
        elif message.startswith("Invalid enum value"):
            value = _lookup(dict(data), where)
            problem = f"invalid value {_describe_value(value)}"
        raise ConfigError(problem, path=path, location=_join(location, at)) from None


_BOUND = re.compile(r"Expected `(int|float)` (>=|>|<=|<) (\S+)$")
_WORDS = {"ge": "at least", "gt": "more than", "le": "at most", "lt": "less than"}


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() and abs(value) < 2**53 else repr(value)


def _describe_bounds(options_type: type[msgspec.Struct], where: str, match: re.Match[str]) -> str:
    info = _numeric_info(_struct_info(options_type), where)
    if info is None:  # not found: say what msgspec said
        return f"must be {match.group(2)} {match.group(3)}"
    return _describe(info)


def _describe(info: Any) -> str:
    """``must be at least 0 and finite``: the bounds of an int/float type, in words."""
    parts = []
    finite = False
    for name in ("ge", "gt", "le", "lt"):
        bound = getattr(info, name)
        if bound is None:
            continue
        if abs(bound) == _FLOAT_MAX:
            finite = True
            continue
        parts.append(f"{_WORDS[name]} {_number(bound)}")
    if finite:
        parts.append("finite")
    return "must be " + " and ".join(parts)


def _numeric_info(info: Any, where: str) -> Any:
    for part in re.findall(r"\.([^.\[]+)|\[(\d+)\]", where):
        info = _container(info)
        if isinstance(info, msgspec.inspect.StructType):
            info = next((f.type for f in info.fields if f.encode_name == part[0]), None)
        elif isinstance(info, msgspec.inspect.ListType | msgspec.inspect.SetType | msgspec.inspect.VarTupleType):
            info = info.item_type
        elif isinstance(info, msgspec.inspect.DictType):
            info = info.value_type
        else:
            return None
    if isinstance(info, msgspec.inspect.UnionType):
        info = next((t for t in info.types if isinstance(t, msgspec.inspect.IntType | msgspec.inspect.FloatType)), None)
    return info if isinstance(info, msgspec.inspect.IntType | msgspec.inspect.FloatType) else None


def _container(info: Any) -> Any:
    if isinstance(info, msgspec.inspect.UnionType):
        kinds = (msgspec.inspect.StructType, msgspec.inspect.ListType, msgspec.inspect.DictType)
        return next((t for t in info.types if isinstance(t, kinds)), info)
    return info


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
        raise _keyed(exc, path, location) from None
    except OSError as exc:  # a file option the plugin opens while being built
        raise ConfigError(_os_problem(exc), path=path, location=location) from None
