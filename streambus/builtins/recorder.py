"""The ``recorder`` sink: append every event to crash-safe JSON Lines recordings.

::

    [[sinks]]
    type = "recorder"
    path = "recordings/{date}/{model}-{stream}.jsonl"   # one file per stream
    fsync = "stream_end"     # every_event | stream_end | interval
    rotate_bytes = 67108864  # start a new part past 64 MiB
    gzip = false             # or a path ending in .gz

Each file is a recording in format v1 (see ``docs/recording-format.md``):
a header line, then one event per line. Every batch the sink reads is
written to the operating system in one ``write`` call of complete lines, so a
killed process loses nothing it had read (gzip files: nothing up to the last
flush point); ``fsync`` decides when the data is also forced to the disk.
The sink subscribes with the lossless ``block`` policy by default.

A write error (disk full, permission denied) is logged with the path and
raised as :class:`RecorderError`: the bus restarts the sink with backoff and
the lines it could not write are retried first, so nothing accepted is lost.
"""

from __future__ import annotations

import datetime
import errno
import gzip as gzip_module
import os
import re
import string
import time
import zlib
from collections import OrderedDict
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, ClassVar, Literal

import anyio
import anyio.to_thread
import msgspec
import structlog

from ..errors import StreamBusError
from ..events import Event, StartEvent, encode, is_terminal
from ..plugins import PluginBase, PositiveFloat, PositiveInt, check_bounds, require_writable_directory
from ..recording import header_line

if TYPE_CHECKING:
    from ..bus import Bus
    from ..subscription import Subscription

__all__ = ["RecorderError", "RecorderSink"]

log = structlog.get_logger("streambus.recorder")

_PLACEHOLDERS = ("date", "stream", "model", "provider")
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")
_MAX_OPEN = 64


class RecorderError(StreamBusError):
    """The recorder could not write a recording file.

    ``path`` is the file; ``errno`` the operating system's error number when
    the cause was an :class:`OSError` (``errno.ENOSPC`` for a full disk,
    ``errno.EACCES`` for a permission problem).
    """

    def __init__(self, message: str, *, path: str, errno: int | None = None) -> None:
        super().__init__(f"{path}: {message}")
        self.path = path
        self.errno = errno


def _safe(value: str, fallback: str) -> str:
    # Model names carry "/" and ":" (meta-llama/Llama-3, llama3.2:1b); a path
    # component must not, and must not be empty or a dot name.
    cleaned = _UNSAFE.sub("_", value).strip("._")
    return cleaned or fallback


def _part_path(base: str, part: int) -> str:
    """Insert ``.<part>`` before the recording suffixes: ``a.jsonl.gz`` -> ``a.1.jsonl.gz``."""
    if part == 0:
        return base
    p = Path(base)
    suffixes = "".join(s for s in p.suffixes[-2:] if s in (".jsonl", ".gz", ".json", ".ndjson"))
    stem = p.name[: len(p.name) - len(suffixes)] if suffixes else p.name
    return str(p.with_name(f"{stem}.{part}{suffixes}"))


class _File:
    """One open recording file and what the sink knows about it."""

    __slots__ = ("created", "dirty", "fh", "gz", "path", "progress", "size")

    def __init__(self, path: str, fh: IO[bytes], gz: bool, size: int, created: bool) -> None:
        self.path = path
        self.fh = fh
        self.gz = gz
        self.size = size
        self.dirty = False
        self.created = created
        self.progress = 0

    def write(self, data: bytes) -> None:
        """Write *data*; on an error, ``progress`` says how many bytes made it."""
        self.progress = 0
        self.dirty = True
        if self.gz:
            self.fh.write(data)
        else:
            view = memoryview(data)
            while view:
                # A raw file may accept fewer bytes than offered; finish the lines.
                written = self.fh.write(view) or 0
                self.progress += written
                view = view[written:]
        self.size += len(data)

    def flush_to_os(self) -> None:
        if self.gz:
            # A sync flush ends the deflate block, so a reader can decompress
            # everything written so far even if the process dies now.
            gz = self.fh
            assert isinstance(gz, gzip_module.GzipFile)
            gz.flush(zlib.Z_SYNC_FLUSH)

    def sync_job(self, *, close: bool = False, quiet: bool = False) -> _Job:
        """Describe the sync (and close) of this file; call in the event loop's thread.

        The gzip flush happens here, so the worker thread never touches the
        compressor the loop keeps writing into; later writes mark the file
        dirty again and are caught by the next job.
        """
        sync = self.dirty or self.created
        if sync and not quiet:
            self.flush_to_os()
        job = _Job(self, sync=sync and not quiet, directory=self.created and not quiet, close=close, quiet=quiet)
        self.dirty = False
        self.created = False
        return job


class _Job:
    """Work for the sync thread: fsync a file (and its new directory entry), maybe close it."""

    __slots__ = ("close", "directory", "file", "quiet", "sync")

    def __init__(self, file: _File, *, sync: bool, directory: bool, close: bool, quiet: bool) -> None:
        self.file = file
        self.sync = sync
        self.directory = directory
        self.close = close
        self.quiet = quiet

    def merge(self, later: _Job) -> None:
        self.sync = self.sync or later.sync
        self.directory = self.directory or later.directory
        self.close = self.close or later.close
        self.quiet = self.quiet and later.quiet

    def __call__(self) -> tuple[str, OSError] | None:
        """Run in a worker thread; return the first error instead of raising, after closing."""
        f = self.file
        error: OSError | None = None
        try:
            if self.sync:
                os.fsync(f.fh.fileno())
            if self.directory:
                # A new file's directory entry must reach the disk too.
                directory = os.open(os.path.dirname(os.path.abspath(f.path)), os.O_RDONLY)
                try:
                    os.fsync(directory)
                finally:
                    os.close(directory)
        except OSError as exc:
            error = exc
        finally:
            if self.close:
                try:
                    f.fh.close()
                except OSError as exc:
                    error = error or exc
        if error is None or self.quiet:
            return None
        return (f.path, error)


def _run_jobs(jobs: list[_Job]) -> list[tuple[str, OSError]]:
    failures = []
    for job in jobs:
        failure = job()
        if failure is not None:
            failures.append(failure)
    return failures


class RecorderSink(PluginBase):
    """Append every event to JSON Lines recording files (lossless, crash-safe).

    Construct it from Python with keywords, e.g.
    ``RecorderSink(path="out/{stream}.jsonl", fsync="every_event")``, or with
    an :class:`Options`. ``paths`` lists the files written so far.
    """

    class Options(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
        """Config keys of the ``recorder`` sink."""

        path: str = "recordings/{date}.jsonl"
        """File path template; ``{date}`` (UTC, of the stream's start), ``{stream}``, ``{model}``, ``{provider}``."""
        fsync: Literal["every_event", "stream_end", "interval"] = "stream_end"
        """When written lines are forced to the disk."""
        fsync_interval: PositiveFloat = 1.0
        """Seconds between fsyncs with ``fsync = "interval"``."""
        rotate_bytes: PositiveInt | None = None
        """Start a new part (``name.1.jsonl``, ...) once a file holds this many (uncompressed) bytes."""
        gzip: bool = False
        """Compress with gzip (also implied by a path ending in ``.gz``; the suffix is added when missing)."""
        meta: dict[str, Any] = {}
        """Free JSON object written into each file's header."""

        def __post_init__(self) -> None:
            check_bounds(self)
            if not self.path.strip():
                raise ValueError("path: must not be empty")
            try:
                fields = [f for _, f, _, _ in string.Formatter().parse(self.path) if f is not None]
            except ValueError as exc:
                raise ValueError(f"path: invalid template {self.path!r}: {exc}") from None
            for field in fields:
                if field not in _PLACEHOLDERS:
                    known = ", ".join("{" + p + "}" for p in _PLACEHOLDERS)
                    raise ValueError(f"path: unknown template field {{{field}}} (use {known})")

    overflow: ClassVar[str] = "block"

    def __init__(self, options: Options | None = None, **kwargs: Any) -> None:
        self.options: RecorderSink.Options = self.resolve_options(options, kwargs)
        template: str = self.options.path
        self._gzip = self.options.gzip or template.endswith(".gz")
        if self._gzip and not template.endswith(".gz"):
            template += ".gz"
        self._template = template
        fields = {f for _, f, _, _ in string.Formatter().parse(template) if f}
        self._fixed = not fields
        self._per_stream = bool(fields & {"stream", "model", "provider"})
        self._targets: dict[str, str] = {}  # stream id -> rendered base path
        self._parts: dict[str, int] = {}  # rendered base path -> current part
        self._open: OrderedDict[str, _File] = OrderedDict()  # rendered base path -> file
        self._pending: list[tuple[str, bytes]] = []
        self._last_fsync = time.monotonic()
        self._jobs: dict[_File, _Job] = {}
        self._wake: anyio.Event | None = None
        self._idle: anyio.Event | None = None
        self._syncing = False
        self._stopping = False
        self.paths: list[str] = []
        """Every file this sink created or appended to, in order."""
        self.recorded = 0
        """How many events were written."""

    # -- lifecycle -------------------------------------------------------------
    def preflight(self) -> None:
        """Check that recordings can be created where ``path`` points (nothing is created).

        Raises ``ValueError("path: ...")`` when the directory (or the first
        of its ancestors that exists) is not a writable directory, or when a
        fixed ``path`` names a directory or a file that cannot be appended to.
        """
        sample = Path(self._render(StartEvent(stream="x", seq=0, ts=time.time(), model="m", provider="p")))
        require_writable_directory("path", sample.parent)
        if self._fixed and sample.exists():
            if sample.is_dir():
                raise ValueError(f"path: {sample} is a directory; name a file (or use a template such as {{date}})")
            if not os.access(sample, os.W_OK):
                raise ValueError(f"path: {sample} exists and is not writable")

    async def setup(self, bus: Bus) -> None:
        """Check that the recording directory can be created before any event arrives."""
        sample = self._render(StartEvent(stream="x", seq=0, ts=time.time(), model="m", provider="p"))
        parent = Path(sample).parent
        try:
            parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise self._failed(str(parent), exc, "cannot create the recording directory") from exc

    async def teardown(self) -> None:
        """Force everything written to the disk and close every file."""
        for base in list(self._open):
            self._close(base)
        jobs, self._jobs = list(self._jobs.values()), {}
        for job in jobs:
            failure = await anyio.to_thread.run_sync(job)
            if failure is not None:
                log.error("recorder.sync_failed", path=failure[0], error=failure[1].strerror or str(failure[1]))

    async def run(self, events: Subscription) -> None:
        """Write events until the subscription ends, syncing per the ``fsync`` policy.

        Syncs run in a worker thread beside the writing, so a slow disk
        flush does not hold back the next batch (``every_event`` waits for
        each one, as it promises).
        """
        self._stopping = False
        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(self._syncer)
                try:
                    await self._run(events)
                finally:
                    self._sync_open()
                    self._stopping = True
                    self._poke()
        except BaseExceptionGroup as group:
            # One task's failure: surface it as itself, not as a group.
            failures = [e for e in group.exceptions if isinstance(e, RecorderError)]
            if failures:
                raise failures[0] from failures[0].__cause__  # the OSError
            raise

    async def _run(self, events: Subscription) -> None:
        if self._pending:
            # Lines a failed run could not write come first, in their order.
            try:
                await self._write(self._pending, terminal=False)
            except RecorderError:
                if not events.closed:
                    raise
                # The bus is stopping and the file still cannot be written:
                # say how much is lost rather than retrying until the drain timeout.
                lost = sum(data.count(b"\n") for _, data in self._pending) + events.pending
                log.error("recorder.gave_up", lost_events=lost, why="the bus is stopping and writes keep failing")
                self._pending = []
                return
        policy = self.options.fsync
        interval = self.options.fsync_interval
        while True:
            if policy == "interval":
                batch = None
                with anyio.move_on_after(max(0.0, self._last_fsync + interval - time.monotonic())):
                    batch = await events.receive_batch()
                if batch is None:
                    self._sync_open()
                    continue
            else:
                batch = await events.receive_batch()
            if not batch:
                break
            self._pending = self._lines(batch)
            await self._write(self._pending, terminal=any(is_terminal(e) for e in batch))

    # -- internals ---------------------------------------------------------------
    def _render(self, event: Event) -> str:
        if self._fixed:
            return self._template
        model = provider = ""
        ts = event.ts
        if type(event) is StartEvent:
            model, provider = event.model, event.provider
        date = datetime.datetime.fromtimestamp(ts, datetime.UTC).strftime("%Y-%m-%d")
        return self._template.format(
            date=date,
            stream=_safe(event.stream, "stream"),
            model=_safe(model, "unknown"),
            provider=_safe(provider, "unknown"),
        )

    def _lines(self, batch: list[Event]) -> list[tuple[str, bytes]]:
        if self._fixed:
            return [(self._template, b"".join([encode(e) + b"\n" for e in batch]))]
        out: list[tuple[str, bytes]] = []
        targets = self._targets
        for event in batch:
            base = targets.get(event.stream)
            if base is None:
                # The start event fixes a stream's file (its date, model); a
                # stream joined mid-way goes where its first event says.
                base = targets[event.stream] = self._render(event)
            line = encode(event) + b"\n"
            if out and out[-1][0] == base:
                out[-1] = (base, out[-1][1] + line)
            else:
                out.append((base, line))
            if is_terminal(event):
                targets.pop(event.stream, None)
        return out

    async def _write(self, chunks: list[tuple[str, bytes]], *, terminal: bool) -> None:
        touched: list[_File] = []
        for i, (base, data) in enumerate(chunks):
            f = None
            try:
                f = self._file(base)
                f.write(data)
            except OSError as exc:
                path = f.path if f is not None else _part_path(base, self._parts.get(base, 0))
                rest = data
                if f is not None and not f.gz and f.progress:
                    # Complete lines that reached the file stay; the reopened
                    # file is cut back to its last newline and resumes after it.
                    cut = data.rfind(b"\n", 0, f.progress)
                    rest = data[cut + 1 :]
                    self.recorded += data.count(b"\n", 0, cut + 1)
                self._drop(base)
                self._pending = [(base, rest), *chunks[i + 1 :]]
                self.recorded += sum(d.count(b"\n") for _, d in chunks[:i])
                raise self._failed(path, exc, "cannot write the recording") from exc
            if f not in touched:
                touched.append(f)
        self.recorded += sum(data.count(b"\n") for _, data in chunks)
        self._pending = []
        policy = self.options.fsync
        if policy == "every_event" or (policy == "stream_end" and terminal):
            for f in touched:
                self._enqueue(f.sync_job())
        elif policy == "interval" and time.monotonic() - self._last_fsync >= self.options.fsync_interval:
            self._sync_open()
        elif terminal:
            for f in touched:
                if f.gz:
                    f.flush_to_os()
        limit = self.options.rotate_bytes
        live = set(self._targets.values()) if self._per_stream else set()
        for base, f in list(self._open.items()):
            if limit is not None and f.size >= limit:
                self._close(base)
                self._parts[base] = self._parts.get(base, 0) + 1
            elif self._per_stream and base not in live:
                # Per-stream files are finished at the stream's terminal event.
                self._close(base)
        if policy == "every_event":
            await self._until_synced()

    # -- syncing ---------------------------------------------------------------------
    def _enqueue(self, job: _Job) -> None:
        if not (job.sync or job.directory or job.close):
            return
        queued = self._jobs.get(job.file)
        if queued is None:
            self._jobs[job.file] = job
        else:
            queued.merge(job)
        self._poke()

    def _poke(self) -> None:
        wake, self._wake = self._wake, None
        if wake is not None:
            wake.set()

    def _sync_open(self) -> None:
        """Queue a sync of every open file with unsynced lines."""
        for f in self._open.values():
            if f.dirty or f.created:
                self._enqueue(f.sync_job())
        self._last_fsync = time.monotonic()

    async def _until_synced(self) -> None:
        while self._jobs or self._syncing:
            idle = self._idle = self._idle or anyio.Event()
            await idle.wait()

    async def _syncer(self) -> None:
        """Run queued syncs and closes in order, one worker thread call per round."""
        while True:
            if not self._jobs:
                idle, self._idle = self._idle, None
                if idle is not None:
                    idle.set()
                if self._stopping:
                    return
                wake = self._wake = self._wake or anyio.Event()
                await wake.wait()
                continue
            jobs, self._jobs = list(self._jobs.values()), {}
            self._syncing = True
            try:
                # Shielded: jobs taken off the queue must run (they close files).
                with anyio.CancelScope(shield=True):
                    failures = await anyio.to_thread.run_sync(_run_jobs, jobs)
            finally:
                self._syncing = False
            self._last_fsync = time.monotonic()
            if failures:
                path, exc = failures[0]
                for f, job in zip([j.file for j in jobs], jobs, strict=True):
                    if not job.close:
                        # A file whose sync failed is not trusted further: reopen on the next write.
                        for base, opened in list(self._open.items()):
                            if opened is f:
                                self._drop(base)
                raise self._failed(path, exc, "cannot sync the recording to disk")

    def _file(self, base: str) -> _File:
        f = self._open.get(base)
        if f is not None:
            self._open.move_to_end(base)
            return f
        while len(self._open) >= _MAX_OPEN:
            self._close(next(iter(self._open)))
        part = self._parts.get(base, 0)
        while True:
            path = _part_path(base, part)
            opened = self._open_file(path)
            if opened is not None:
                break
            part += 1
        self._parts[base] = part
        self._open[base] = opened
        if path not in self.paths:
            self.paths.append(path)
        return opened

    def _open_file(self, path: str) -> _File | None:
        """Open *path* for appending; None when it must not be appended to (use the next part)."""
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        limit = self.options.rotate_bytes
        try:
            size = os.path.getsize(path)
        except FileNotFoundError:
            size = -1
        if self._gzip:
            if size >= 0:
                # A gzip member cut short by a crash cannot be appended to.
                return None
            fh: IO[bytes] = gzip_module.open(path, "xb")  # type: ignore[assignment]  # noqa: SIM115
            f = _File(path, fh, True, 0, created=True)
            f.write(header_line(self.options.meta))
            return f
        if size > 0:
            if limit is not None and size >= limit:
                return None
            self._check_existing(path)
        raw = open(path, "ab", buffering=0)  # noqa: SIM115 - kept open across batches, closed in _close
        try:
            if size > 0:
                size = self._repair_tail(path, size)
            f = _File(path, raw, False, max(size, 0), created=size < 0)
            if size <= 0:
                f.write(header_line(self.options.meta))
        except BaseException:
            raw.close()
            raise
        return f

    def _check_existing(self, path: str) -> None:
        with open(path, "rb") as existing:
            first = existing.readline(64 * 1024)
        prefix = b'{"streambus_recording"'
        cut_header = not first.endswith(b"\n") and prefix.startswith(first)
        if not first.startswith(prefix) and not cut_header:
            raise OSError(errno.EEXIST, "the file exists and is not a streambus recording; choose another path")

    def _repair_tail(self, path: str, size: int) -> int:
        # A previous writer that died mid-line left a partial last line; new
        # lines must not be glued to it, so cut the file back to its last newline.
        with open(path, "rb") as existing:
            existing.seek(max(0, size - 1))
            if existing.read(1) == b"\n":
                return size
            chunk = 64 * 1024
            end = size
            while end > 0:
                start = max(0, end - chunk)
                existing.seek(start)
                data = existing.read(end - start)
                cut = data.rfind(b"\n")
                if cut >= 0:
                    keep = start + cut + 1
                    break
                end = start
            else:
                keep = 0
        os.truncate(path, keep)
        log.warning("recorder.repaired_tail", path=path, dropped_bytes=size - keep)
        return keep

    def _close(self, base: str) -> None:
        """Sync (if needed) and close a file, in the sync thread's order."""
        f = self._open.pop(base, None)
        if f is not None:
            self._enqueue(f.sync_job(close=True))

    def _drop(self, base: str) -> None:
        """Close a file after an error without syncing it (the error was reported)."""
        f = self._open.pop(base, None)
        if f is not None:
            self._enqueue(f.sync_job(close=True, quiet=True))

    def _failed(self, path: str, exc: OSError, what: str) -> RecorderError:
        reason = exc.strerror or str(exc)
        code = exc.errno
        name = errno.errorcode.get(code, "") if code is not None else ""
        log.error("recorder.write_failed", path=path, error=reason, errno=name or None, action=what)
        return RecorderError(f"{what}: {reason}" + (f" ({name})" if name else ""), path=path, errno=code)
