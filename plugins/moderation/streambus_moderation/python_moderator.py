"""The ``python`` moderator: your own async function, named by import path.

::

    [sinks.moderator]
    type = "python"
    function = "myapp.safety:check"       # or "myapp.safety.check"
    kwargs = { strict = true }            # passed to the function on each call

The function takes the window text (plus *kwargs*) and returns a
:class:`~streambus_moderation.Verdict`, a ``bool`` (flagged or not, the whole
window), ``None`` (clean), or a mapping with :class:`Verdict`'s fields.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, ClassVar

import msgspec

from streambus.plugins import PluginBase

from .verdict import Verdict

__all__ = ["PythonModerator", "coerce_verdict"]


def coerce_verdict(result: object) -> Verdict:
    """Turn what a user function returned into a :class:`Verdict`.

    Raises ``TypeError`` naming the type for anything else (the stage then
    applies its ``on_error`` policy).
    """
    if isinstance(result, Verdict):
        return result
    if result is None:
        return Verdict()
    if isinstance(result, bool):
        return Verdict(flagged=result)
    if isinstance(result, Mapping):
        try:
            return msgspec.convert(dict(result), Verdict)
        except msgspec.ValidationError as exc:
            raise TypeError(f"moderator returned an invalid verdict mapping: {exc}") from None
    raise TypeError(f"moderator returned {type(result).__name__}; expected Verdict, bool, None or a mapping")


def _import(path: str) -> Any:
    module_name, sep, attr = path.partition(":")
    if not sep:
        module_name, _, attr = path.rpartition(".")
    if not module_name or not attr:
        raise ValueError(f'function: {path!r} is not an import path like "package.module:function"')
    try:
        target: Any = importlib.import_module(module_name)
    except ImportError as exc:
        raise ValueError(f"function: cannot import module {module_name!r}: {exc}") from None
    for part in attr.split("."):
        try:
            target = getattr(target, part)
        except AttributeError:
            raise ValueError(f"function: module {module_name!r} has no attribute {attr!r}") from None
    return target


class PythonModerator(PluginBase):
    """Moderate with an async function of your own (``function = "pkg.mod:fn"``).

    In Python, pass the function itself: ``PythonModerator(function=my_check)``.
    """

    class Options(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
        """Config keys of the ``python`` moderator."""

        function: str
        """Import path of an async function ``(text, **kwargs) -> Verdict | bool | None | dict``."""
        kwargs: dict[str, Any] = {}
        """Extra keyword arguments passed on every call."""

    name: ClassVar[str] = "python"

    def __init__(
        self,
        options: Options | None = None,
        *,
        function: Callable[..., Awaitable[object]] | None = None,
        kwargs: Mapping[str, Any] | None = None,
    ) -> None:
        if options is not None:
            if not isinstance(options, PythonModerator.Options):
                raise TypeError(
                    f"PythonModerator: got a {type(options).__name__} as the first argument, which takes "
                    "PythonModerator.Options; pass your async function as function=..."
                )
            if function is not None:
                raise TypeError("PythonModerator: pass either options or function, not both")
            target = _import(options.function)
            kwargs = options.kwargs
        elif function is not None:
            target = function
        else:
            raise ValueError("function: required (an async function or its import path)")
        call = getattr(target, "__call__", None)  # noqa: B004 - async callable objects count too
        if not (inspect.iscoroutinefunction(target) or inspect.iscoroutinefunction(call)):
            raise ValueError(f"function: {getattr(target, '__qualname__', target)!r} is not an async function")
        self.function: Callable[..., Awaitable[object]] = target
        self.kwargs = dict(kwargs or {})
        self.options = options

    async def check(self, text: str) -> Verdict:
        """Call the function on *text* and coerce its result to a :class:`Verdict`."""
        return coerce_verdict(await self.function(text, **self.kwargs))
