"""The recording format (version 1): JSON Lines, a header then one event per line.

::

    {"streambus_recording": 1, "created": 1732147200.5, "meta": {...}}
    {"type": "start", "stream": "...", "seq": 0, "ts": 1732147200.6, ...}
    {"type": "delta", "stream": "...", "seq": 1, "ts": 1732147200.7, "text": "Hi"}
    ...

Writers append complete lines, so a crash loses at most the line being
written. :func:`read_recording` reports a truncated last line (with its line
number) and keeps everything before it; garbage or a wrong version in the
middle is a :class:`~streambus.errors.RecordingError` naming the line, unless
``lenient=True`` (then such lines are skipped and counted). Files ending in
``.gz`` are read and written gzip-compressed. See ``docs/recording-format.md``.

A ``start`` line may carry an optional ``request`` object: the request that
stream answered (``method``, ``path``, ``body``, scrubbed ``headers``), which
the mock server matches incoming requests against
(:mod:`streambus.matching`). :attr:`Recording.requests` holds them by stream
id; :func:`event_line` writes one. Recordings without it read as before.
"""

from __future__ import annotations

import dataclasses
import gzip
import time
import zlib
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import IO, Any

import orjson

from .errors import DecodeError, RecordingError
from .events import Event, StartEvent, decode, encode

__all__ = [
    "FORMAT_VERSION",
    "Recording",
    "RecordingProblem",
    "event_line",
    "header_line",
    "iter_recording",
    "open_recording",
    "read_recording",
    "write_recording",
]

FORMAT_VERSION = 1
"""The recording format version this library writes and reads."""


@dataclasses.dataclass(frozen=True)
class RecordingProblem:
    """A line the reader skipped: ``kind`` is ``truncated`` or ``invalid``."""

    line: int
    kind: str
    message: str


@dataclasses.dataclass
class Recording:
    """A recording read into memory: its header, events and skipped lines."""

    path: str
    version: int
    created: float
    meta: dict[str, Any]
    events: list[Event]
    problems: list[RecordingProblem]
    header: dict[str, Any] = dataclasses.field(default_factory=dict)
    """The whole header object, including keys a newer writer added."""
    requests: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)
    """The ``request`` object of each ``start`` line that has one, by stream id."""

    @property
    def truncated(self) -> bool:
        """Whether the last line was cut short (a crash mid-write)."""
        return any(p.kind == "truncated" for p in self.problems)

    @property
    def streams(self) -> list[str]:
        """Stream ids in order of first appearance."""
        return list(dict.fromkeys(e.stream for e in self.events))


def header_line(meta: dict[str, Any] | None = None, *, created: float | None = None) -> bytes:
    """Return the header line (with its newline) of a new recording."""
    header: dict[str, Any] = {
        "streambus_recording": FORMAT_VERSION,
        "created": time.time() if created is None else created,
        "meta": meta or {},
    }
    return orjson.dumps(header) + b"\n"


def event_line(event: Event, request: dict[str, Any] | None = None) -> bytes:
    """Return *event* as one recording line (with its newline); a ``start`` may carry its *request*.

    Raises :class:`ValueError` when *request* is given for an event that is not a ``start``.
    """
    line = encode(event)
    if request is None:
        return line + b"\n"
    if type(event) is not StartEvent:
        raise ValueError(f"request: only a start event carries one, not a {type(event).__name__}")
    # The request goes last, after the event's own keys: readers that do not know it ignore it.
    return line[:-1] + b',"request":' + orjson.dumps(request) + b"}\n"


def open_recording(path: str | Path, mode: str = "rb") -> IO[bytes]:
    """Open *path* for binary reading or appending, gzip-compressed if it ends in ``.gz``."""
    p = Path(path)
    if p.suffix == ".gz":
        return gzip.open(p, mode)  # type: ignore[return-value]
    return open(p, mode)  # the caller owns (and closes) the file


def write_recording(
    path: str | Path,
    events: Iterable[Event],
    *,
    meta: dict[str, Any] | None = None,
    created: float | None = None,
    requests: dict[str, dict[str, Any]] | None = None,
) -> None:
    """Write a whole recording at once (for tests and tools); *requests* go on their streams' ``start`` lines."""
    asked = requests or {}
    with open_recording(path, "wb") as f:
        f.write(header_line(meta, created=created))
        for event in events:
            f.write(event_line(event, asked.get(event.stream) if type(event) is StartEvent else None))


def _lines(f: IO[bytes], problems: list[RecordingProblem], name: str) -> Iterator[bytes]:
    try:
        yield from f
    except EOFError:
        # A gzip file cut short by a crash: everything decompressed so far was yielded.
        return
    except (gzip.BadGzipFile, zlib.error) as exc:
        # Damaged compressed data: what was decompressed before it is still good.
        problems.append(RecordingProblem(0, "truncated", f"compressed data is damaged after this point: {exc}"))
        return


_HEADER_PREFIX = b'{"streambus_recording"'


def iter_recording(
    path: str | Path,
    *,
    lenient: bool = False,
    problems: list[RecordingProblem] | None = None,
    header: dict[str, Any] | None = None,
    requests: dict[str, dict[str, Any]] | None = None,
) -> Iterator[Event]:
    """Yield the events of the recording at *path*, checking the header first.

    Skipped lines are appended to *problems* when given; the parsed header is
    stored into *header* when given, and each ``start`` line's ``request``
    object into *requests* (by stream id). Raises
    :class:`~streambus.errors.RecordingError` for a missing or unsupported
    header, and (unless *lenient*) for an invalid line that is not the last.
    A last line without its newline that does not decode is reported as a
    ``truncated`` problem (a writer crashed mid-line) and skipped, never raised.
    """
    name = str(path)
    sink = problems if problems is not None else []
    asked = requests if requests is not None else {}
    try:
        f = open_recording(path, "rb")
    except OSError as exc:
        raise RecordingError(f"cannot open recording: {exc.strerror or exc}", path=name, line=0) from None
    with f:
        lines = _lines(f, sink, name)
        first = next(lines, None)
        if first is None:
            raise RecordingError("empty file, expected a recording header", path=name, line=1)
        if not first.endswith(b"\n") and _looks_like_cut_header(first):
            # The writer died while writing the header: a recording with no events.
            sink.append(RecordingProblem(1, "truncated", "the header line is incomplete (writer crashed?)"))
            if header is not None:
                header.update({"streambus_recording": FORMAT_VERSION})
            return
        parsed = _parse_header(first, name)
        if header is not None:
            header.update(parsed)
        pending: tuple[int, bytes] | None = None
        for number, raw in enumerate(lines, start=2):
            if pending is not None:
                event = _event_or_problem(pending[0], pending[1], name, lenient, sink, asked)
                if event is not None:
                    yield event
            pending = (number, raw)
        for i, problem in enumerate(sink):
            if problem.line == 0:
                # Damaged compressed data: the line it cut is the last one read.
                sink[i] = dataclasses.replace(problem, line=pending[0] if pending is not None else 1)
        if pending is None:
            return
        number, raw = pending
        if not raw.endswith(b"\n"):
            # The last line lacks its newline: a crash mid-write, unless it happens to be complete.
            try:
                last = decode(raw)
            except DecodeError:
                sink.append(RecordingProblem(number, "truncated", "last line is incomplete (writer crashed?)"))
                return
            if _request_or_problem(last, number, raw, name, lenient, sink, asked):
                yield last
            return
        event = _event_or_problem(number, raw, name, lenient, sink, asked)
        if event is not None:
            yield event


def _looks_like_cut_header(raw: bytes) -> bool:
    stripped = raw.strip()
    if not stripped:
        return False
    try:
        orjson.loads(stripped)
    except orjson.JSONDecodeError:
        return stripped.startswith(_HEADER_PREFIX) or _HEADER_PREFIX.startswith(stripped)
    return False


def _request_or_problem(
    event: Event,
    number: int,
    raw: bytes,
    name: str,
    lenient: bool,
    problems: list[RecordingProblem],
    requests: dict[str, dict[str, Any]],
) -> bool:
    """Keep a ``start`` line's ``request`` object; False (or an error) when it is not an object."""
    if type(event) is not StartEvent or b'"request"' not in raw:
        return True
    request = orjson.loads(raw).get("request")
    if request is None:
        return True
    if not isinstance(request, dict):
        message = f'the start event\'s "request" must be a JSON object, got {type(request).__name__}'
        if not lenient:
            raise RecordingError(message, path=name, line=number)
        problems.append(RecordingProblem(number, "invalid", message))
        return False
    requests[event.stream] = request
    return True


def _event_or_problem(
    number: int,
    raw: bytes,
    name: str,
    lenient: bool,
    problems: list[RecordingProblem],
    requests: dict[str, dict[str, Any]],
) -> Event | None:
    try:
        event = decode(raw)
    except DecodeError as exc:
        if raw.strip() == b"":
            message = "blank line"
        elif raw.lstrip().startswith(_HEADER_PREFIX):
            message = _second_header(raw)
        else:
            message = str(exc)
        if not lenient:
            raise RecordingError(message, path=name, line=number) from None
        problems.append(RecordingProblem(number, "invalid", message))
        return None
    return event if _request_or_problem(event, number, raw, name, lenient, problems, requests) else None


def _second_header(raw: bytes) -> str:
    try:
        version = orjson.loads(raw).get("streambus_recording")
    except (orjson.JSONDecodeError, AttributeError):
        version = None
    if version is not None and version != FORMAT_VERSION:
        return f"a recording header of unsupported version {version!r} in the middle of the file"
    return "a second recording header (files concatenated?)"


def _parse_header(raw: bytes, name: str) -> dict[str, Any]:
    try:
        header = orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise RecordingError("not a streambus recording (line 1 is not a JSON header)", path=name, line=1) from None
    if not isinstance(header, dict) or "streambus_recording" not in header:
        raise RecordingError(
            'not a streambus recording (line 1 lacks the "streambus_recording" header)', path=name, line=1
        )
    version = header["streambus_recording"]
    if version != FORMAT_VERSION:
        raise RecordingError(
            f"unsupported recording version {version!r} (this streambus reads version {FORMAT_VERSION})",
            path=name,
            line=1,
        )
    if not isinstance(header.get("meta", {}), dict):
        raise RecordingError('the header\'s "meta" must be a JSON object', path=name, line=1)
    created = header.get("created", 0.0)
    if not isinstance(created, int | float) or isinstance(created, bool):
        raise RecordingError('the header\'s "created" must be a number (UNIX seconds)', path=name, line=1)
    return header


def read_recording(path: str | Path, *, lenient: bool = False) -> Recording:
    """Read the whole recording at *path* into memory (see :func:`iter_recording`).

    Check :attr:`Recording.problems` (or :attr:`Recording.truncated`) for
    lines that were skipped.
    """
    name = str(path)
    problems: list[RecordingProblem] = []
    header: dict[str, Any] = {}
    requests: dict[str, dict[str, Any]] = {}
    events = list(iter_recording(path, lenient=lenient, problems=problems, header=header, requests=requests))
    return Recording(
        path=name,
        version=int(header["streambus_recording"]),
        created=float(header.get("created", 0.0)),
        meta=dict(header.get("meta") or {}),
        events=events,
        problems=problems,
        header=header,
        requests=requests,
    )
