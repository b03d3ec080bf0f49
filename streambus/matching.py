"""Which recorded stream answers a request: the request a stream was recorded with, and matchers.

A recording made through the proxy (:mod:`streambus.cassette`) stores, on
each ``start`` line, the request that stream answered as a
:class:`RecordedRequest` (``method``, ``path``, wire ``format`` and
``route``, ``model``, the JSON ``body`` and the scrubbed ``headers``). The
mock server answers an incoming request with the recorded stream whose
request *matches* it:

``"normalized"`` (the default)
    Same wire format and route, same model (``:latest`` ignored), and the
    same body once the keys that do not change the answer are left out
    (:data:`IGNORED_KEYS`: ``stream``, ``stream_options``, ``user``...),
    strings stripped of surrounding whitespace, a message ``content`` given
    as one text part the same as that text, and numbers compared by value.
``"exact"``
    Same method, path and body, key for key.
a function
    ``match(recorded, incoming) -> bool`` of your own.

An incoming request that matches nothing gets :func:`closest` (the recorded
request with the fewest :func:`differences`) named in the error.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import orjson

if TYPE_CHECKING:
    from .formats import WireFormat

__all__ = [
    "IGNORED_KEYS",
    "MATCHERS",
    "Matcher",
    "RecordedRequest",
    "closest",
    "differences",
    "exact",
    "find_route",
    "matcher",
    "normalize",
    "normalized",
]

IGNORED_KEYS: frozenset[str] = frozenset(
    {"stream", "stream_options", "user", "metadata", "store", "keep_alive", "service_tier", "model"}
)
"""Body keys the ``normalized`` matcher leaves out: they change how an answer is delivered, not what it says.

``model`` is compared separately (the Gemini format names it in the path).
"""


@dataclasses.dataclass(frozen=True)
class RecordedRequest:
    """A request as a recording stores it (the ``request`` object of a ``start`` line)."""

    method: str
    path: str
    body: Any
    format: str = ""
    """The wire format that served it (``ollama``, ``openai``, ``anthropic``, ``gemini``...)."""
    route: str = ""
    """The format's route name (``chat``, ``generate``, ``responses``, ``messages``, ``stream``...)."""
    model: str = ""
    headers: Mapping[str, str] = dataclasses.field(default_factory=dict)
    """Headers worth keeping, credentials scrubbed (:class:`~streambus.scrubbing.Scrubber`)."""

    def to_json(self) -> dict[str, Any]:
        """The JSON object a recording stores."""
        out: dict[str, Any] = {"method": self.method, "path": self.path}
        if self.format:
            out["format"] = self.format
        if self.route:
            out["route"] = self.route
        if self.model:
            out["model"] = self.model
        out["body"] = self.body
        if self.headers:
            out["headers"] = dict(self.headers)
        return out

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> RecordedRequest:
        """Read a stored request; :class:`ValueError` names the key that is missing or of the wrong type."""
        for key in ("method", "path"):
            if not isinstance(data.get(key), str):
                raise ValueError(f"request.{key}: must be a string, got {data.get(key)!r}")
        for key in ("format", "route", "model"):
            if not isinstance(data.get(key, ""), str):
                raise ValueError(f"request.{key}: must be a string, got {data.get(key)!r}")
        headers = data.get("headers", {})
        if not isinstance(headers, dict) or not all(isinstance(v, str) for v in headers.values()):
            raise ValueError("request.headers: must be an object of strings")
        return cls(
            method=data["method"],
            path=data["path"],
            body=data.get("body"),
            format=data.get("format", ""),
            route=data.get("route", ""),
            model=data.get("model", ""),
            headers=headers,
        )

    def describe(self) -> str:
        """One line naming the request: ``POST /api/chat (model llama3.2) "Why is the sky blue?"``."""
        prompt = _prompt(self.body)
        model = f" (model {self.model})" if self.model else ""
        return f"{self.method} {self.path}{model}" + (f" {_short(prompt)}" if prompt else "")


Matcher = Callable[[RecordedRequest, RecordedRequest], bool]
"""``match(recorded, incoming) -> bool``."""


def _base_model(name: str) -> str:
    return name.removesuffix(":latest")


def _canonical(value: Any) -> Any:
    """*value* with whitespace-insensitive strings, one-text-part contents as text, and numbers by value."""
    if isinstance(value, dict):
        out: dict[str, Any] = {}
        for key, item in value.items():
            if key == "content" and isinstance(item, list) and len(item) == 1 and isinstance(item[0], dict):
                part = item[0]
                if part.get("type") in ("text", "input_text") and isinstance(part.get("text"), str):
                    out[key] = part["text"].strip()
                    continue
            out[key] = _canonical(item)
        return out
    if isinstance(value, list):
        return [_canonical(item) for item in value]
    if isinstance(value, str):
        return value.strip()
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


def normalize(request: RecordedRequest) -> dict[str, Any]:
    """The parts of *request* the ``normalized`` matcher compares."""
    body = request.body
    if isinstance(body, dict):
        body = {k: v for k, v in body.items() if k not in IGNORED_KEYS}
    return {
        "format": request.format,
        "route": request.route,
        "model": _base_model(request.model),
        "body": _canonical(body),
    }


def _plain(request: RecordedRequest) -> dict[str, Any]:
    return {"method": request.method, "path": request.path, "body": request.body}


def normalized(recorded: RecordedRequest, incoming: RecordedRequest) -> bool:
    """Match by format, route, model and the normalised body (see the module docs)."""
    return normalize(recorded) == normalize(incoming)


def exact(recorded: RecordedRequest, incoming: RecordedRequest) -> bool:
    """Match by method, path and the body exactly as sent (key order aside)."""
    return _plain(recorded) == _plain(incoming)


MATCHERS: dict[str, Matcher] = {"normalized": normalized, "exact": exact}
"""The matchers by name."""


def matcher(spec: str | Matcher) -> Matcher:
    """The matcher named *spec* (``normalized``, ``exact``), or *spec* itself when it is a function."""
    if callable(spec):
        return spec
    try:
        return MATCHERS[spec]
    except KeyError:
        raise ValueError(f"match: expected one of {sorted(MATCHERS)} or a function, got {spec!r}") from None


def differences(recorded: RecordedRequest, incoming: RecordedRequest, *, exactly: bool = False) -> list[str]:
    """How *incoming* differs from *recorded*, one ``where: recorded X, asked Y`` line per difference.

    Compares the normalised forms (:func:`normalize`), or the requests as sent
    when *exactly*.
    """
    return [text for text, _ in _compare(recorded, incoming, exactly)]


def _compare(recorded: RecordedRequest, incoming: RecordedRequest, exactly: bool) -> list[tuple[str, float]]:
    left, right = (_plain(recorded), _plain(incoming)) if exactly else (normalize(recorded), normalize(incoming))
    out: list[tuple[str, float]] = []
    _diff(left, right, "", out)
    return out


_MISSING = object()


def _diff(a: Any, b: Any, where: str, out: list[tuple[str, float]]) -> None:
    """Append ``(description, cost)`` per difference; two texts cost how unlike they are (0 to 1)."""
    if isinstance(a, dict) and isinstance(b, dict):
        for key in list(a) + [k for k in b if k not in a]:
            _diff(a.get(key, _MISSING), b.get(key, _MISSING), f"{where}.{key}" if where else str(key), out)
        return
    if isinstance(a, list) and isinstance(b, list):
        if len(a) != len(b):
            out.append((f"{where}: recorded {len(a)} items, asked {len(b)}", float(abs(len(a) - len(b)))))
        for i, (x, y) in enumerate(zip(a, b, strict=False)):
            _diff(x, y, f"{where}[{i}]", out)
        return
    if a == b and type(a) is type(b):
        return
    if isinstance(a, int | float) and isinstance(b, int | float) and not isinstance(a, bool) and a == b:
        return
    cost = 1.0
    if isinstance(a, str) and isinstance(b, str):
        cost = 1.0 - difflib.SequenceMatcher(None, a, b).ratio()
    shown_a = "nothing" if a is _MISSING else _short(a)
    shown_b = "nothing" if b is _MISSING else _short(b)
    out.append((f"{where}: recorded {shown_a}, asked {shown_b}", cost))


def closest(
    recorded: Sequence[RecordedRequest], incoming: RecordedRequest, *, exactly: bool = False
) -> tuple[int, list[str]] | None:
    """The index of the recorded request nearest *incoming* (fewest differences) and those differences.

    A request to the same format and route always counts as nearer than one
    to another; among those, two texts count by how unlike they are. ``None``
    when nothing was recorded.
    """
    best: tuple[tuple[int, float], int, list[str]] | None = None
    for index, candidate in enumerate(recorded):
        found = _compare(candidate, incoming, exactly)
        elsewhere = int((candidate.format, candidate.route) != (incoming.format, incoming.route))
        score = (elsewhere, sum(cost for _, cost in found))
        if best is None or score < best[0]:
            best = (score, index, [text for text, _ in found])
    return None if best is None else (best[1], best[2])


def find_route(path: str, formats: Mapping[str, WireFormat]) -> tuple[str, str, str] | None:
    """The ``(format name, route, model named in the path)`` that serves *path*, or ``None``.

    Route paths may hold a ``{model}`` placeholder (Gemini's
    ``/v1beta/models/{model}:streamGenerateContent``); the model is then
    taken from the path, else it is ``""``.
    """
    for name, fmt in formats.items():
        for template, route in fmt.routes.items():
            if "{" not in template:
                if template == path:
                    return name, route, ""
                continue
            pattern = re.escape(template).replace(re.escape("{model}"), "(?P<model>[^/]+?)")
            found = re.fullmatch(pattern, path)
            if found is not None:
                return name, route, found.groupdict().get("model") or ""
    return None


def _prompt(body: Any) -> str:
    """The last user text of a request body, whatever its dialect, for messages."""
    if not isinstance(body, dict):
        return ""
    for key in ("prompt", "input"):
        if isinstance(body.get(key), str):
            return str(body[key])
    for key in ("messages", "contents", "input"):
        items = body.get(key)
        if isinstance(items, list) and items:
            last = items[-1]
            if isinstance(last, dict):
                return _text_of(last.get("content", last.get("parts")))
    return ""


def _text_of(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return " ".join(p["text"] for p in content if isinstance(p, dict) and isinstance(p.get("text"), str))
    return ""


def _short(value: Any, limit: int = 80) -> str:
    text = value if isinstance(value, str) else orjson.dumps(value, option=orjson.OPT_SORT_KEYS).decode()
    shown = repr(text) if isinstance(value, str) else text
    return shown if len(shown) <= limit else shown[: limit - 3] + "..."
