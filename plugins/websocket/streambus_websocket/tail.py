"""``streambus tail URL``: follow a broadcaster from the terminal.

Subscribes with the given filters and prints text as it arrives (or every
event in wire form with ``--json``). Concurrent streams print one after
another under a header each (:class:`streambus.builtins.TextLayout`): the
oldest live stream prints as it arrives, the others follow when it ends, and
each stream's closing note is on its own line after its text. When the connection drops it reconnects
and resumes with ``since``, so nothing is printed twice and nothing is lost
while the server's history covers the gap.
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
from typing import Any, TextIO

import click
import msgspec
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidStatus, InvalidURI

from streambus import AbortEvent, EndEvent, ErrorEvent, Event, StartEvent, decode
from streambus.builtins import TextLayout
from streambus.errors import StreamBusError

from .protocol import PROTOCOL_VERSION, CloseCode

__all__ = ["tail_command"]

_RETRY_CODES = {
    int(CloseCode.GOING_AWAY),
    int(CloseCode.INTERNAL_ERROR),
    int(CloseCode.SERVICE_RESTART),
    int(CloseCode.LAGGED),
    int(CloseCode.TOO_MANY_CLIENTS),
    1006,
}
_json = msgspec.json.Decoder()


class TailError(StreamBusError, click.ClickException):
    """The tail cannot go on (refused, bad URL, incompatible server).

    A :class:`streambus.StreamBusError`, and a ``click.ClickException`` so the
    command prints ``Error: <message>`` and exits 1.
    """


class _Tail:
    def __init__(
        self,
        url: str,
        subscribe: dict[str, Any],
        *,
        token: str | None,
        as_json: bool,
        reasoning: bool,
        reconnect: bool,
        max_streams: int | None,
        out: TextIO,
        err: TextIO,
    ) -> None:
        self.url = url
        self.subscribe = subscribe
        self.token = token
        self.as_json = as_json
        self.reasoning = reasoning
        self.reconnect = reconnect
        self.max_streams = max_streams
        self.out = out
        self.err = err
        self.last_seq: dict[str, int] = dict(subscribe.get("since") or {})
        self.ended: set[str] = set()
        self.resuming = "since" in subscribe
        dim = out.isatty()
        self.layout = TextLayout(
            channels=("reasoning", "content") if reasoning else ("content",),
            header=_header,
            note=_note,
            style=lambda channel, text: click.style(text, dim=True) if dim and channel == "reasoning" else text,
            unstarted=True,  # --since resumes streams whose start this process never saw
        )

    def note(self, text: str) -> None:
        print(text, file=self.err, flush=True)

    async def run(self) -> None:
        delay = 0.25
        while True:
            try:
                code = await self._session()
            except (TimeoutError, OSError) as exc:
                if not self.reconnect:
                    raise TailError(f"cannot connect to {self.url}: {exc}") from None
                code = 1006
                self.note(f"streambus tail: cannot connect ({exc}); retrying in {delay:.2g}s")
            if code is None:
                return
            if not self.reconnect or code not in _RETRY_CODES:
                raise TailError(f"connection closed with code {code}")
            await asyncio.sleep(delay)
            delay = min(delay * 2, 5.0)

    async def _session(self) -> int | None:
        headers = {"Authorization": f"Bearer {self.token}"} if self.token else None
        try:
            ws = await connect(self.url, additional_headers=headers, open_timeout=10, max_size=None)
        except InvalidStatus as exc:
            raise TailError(f"{self.url} refused the connection: HTTP {exc.response.status_code}") from None
        except InvalidURI as exc:
            raise TailError(f"not a WebSocket URL: {exc}") from None
        async with ws:
            hello = _json.decode(await ws.recv())
            if not isinstance(hello, dict) or hello.get("op") != "hello":
                raise TailError(f"{self.url} is not a streambus broadcaster (first frame: {hello!r:.200})")
            if hello.get("protocol") != PROTOCOL_VERSION:
                raise TailError(f"server speaks protocol {hello.get('protocol')}, this client {PROTOCOL_VERSION}")
            request = dict(self.subscribe)
            if self.resuming:
                since = {s: q for s, q in self.last_seq.items() if s not in self.ended}
                limit = (hello.get("limits") or {}).get("max_subscribe_streams")
                if isinstance(limit, int) and len(since) + len(request.get("streams") or ()) > limit:
                    # The server would refuse the whole subscribe (too_many_streams): follow on, and say what is lost.
                    self.note(
                        f"streambus tail: {len(since)} streams to resume, more than the server's "
                        f"max_subscribe_streams ({limit}); they continue from now on, what was missed is lost"
                    )
                else:
                    request["since"] = since
            await ws.send(msgspec.json.encode({"op": "subscribe", "id": "tail", **request}).decode())
            try:
                async for frame in ws:
                    if self._frame(frame):
                        return None
            except ConnectionClosed:
                pass
            code = ws.close_code if ws.close_code is not None else 1006
            if code == CloseCode.UNAUTHORIZED:
                raise TailError("unauthorized: pass the right --token (or STREAMBUS_TOKEN)")
            if code == CloseCode.TOKEN_EXPIRED:
                raise TailError("the token expired (close 4005): run again with a new --token")
            if code == CloseCode.NORMAL:
                return None
            self.note(f"streambus tail: connection closed ({code} {ws.close_reason}); resuming")
            # From now on every reconnect resumes where this one stopped.
            self.resuming = True
            return code

    def _frame(self, frame: str | bytes) -> bool:
        """Handle one frame; return True when the tail is done."""
        msg = _json.decode(frame)
        if not isinstance(msg, dict):
            return False
        op = msg.get("op")
        if op is not None:
            if op == "error":
                if msg.get("code") == "forbidden" and msg.get("id") == "tail":
                    # Nothing was subscribed: waiting would print nothing, ever.
                    raise TailError(f"refused: {msg.get('message')} (narrow the filters to the token's scope)")
                self.note(f"streambus tail: server error {msg.get('code')}: {msg.get('message')}")
            elif op == "subscribed" and msg.get("recovering") and not msg.get("recovered"):
                self.note(f"streambus tail: could not recover {', '.join(msg.get('unrecovered') or [])}")
            return False
        stream = msg.get("stream")
        seq = msg.get("seq")
        if not isinstance(stream, str) or not isinstance(seq, int):
            return False
        if seq <= self.last_seq.get(stream, -1):
            return False  # Already printed (defensive: the server does not resend).
        self.last_seq[stream] = seq
        kind = msg.get("type")
        if self.as_json:
            self.out.write(frame if isinstance(frame, str) else frame.decode())
            self.out.write("\n")
            self.out.flush()
        else:
            self._print(frame)
        if kind in ("end", "error", "abort"):
            self.ended.add(stream)
            if self.max_streams is not None and len(self.ended) >= self.max_streams:
                return True
        return False

    def _print(self, frame: str | bytes) -> None:
        try:
            event = decode(frame)
        except StreamBusError as exc:
            self.note(f"streambus tail: skipped an event the server sent: {exc}")
            return
        text = self.layout.feed(event)
        if text:
            self.out.write(text)
            self.out.flush()


def _header(stream: str, start: StartEvent | None) -> str:
    return f"── {stream}{f' ({start.model})' if start is not None and start.model else ''} ──\n"


def _note(event: Event) -> str:
    if isinstance(event, EndEvent):
        tokens = event.usage.completion_tokens if event.usage is not None else None
        detail = event.reason + (f", {tokens} tokens" if tokens is not None else "")
    elif isinstance(event, ErrorEvent):
        detail = f"error {event.kind}: {event.message}"
    elif isinstance(event, AbortEvent):
        detail = f"aborted by {event.by}: {event.reason}"
    else:
        return ""
    return f"[{event.stream}: {detail}]"


def _since(values: tuple[str, ...]) -> dict[str, int] | None:
    if not values:
        return None
    since: dict[str, int] = {}
    for value in values:
        stream, sep, seq = value.rpartition(":")
        if not sep or not stream or not seq.lstrip("-").isdigit():
            raise click.BadParameter(f"{value!r}: expected STREAM:SEQ, e.g. abc123:41", param_hint="--since")
        since[stream] = int(seq)
    return since


def _meta(values: tuple[str, ...]) -> dict[str, str] | None:
    if not values:
        return None
    meta: dict[str, str] = {}
    for value in values:
        key, sep, val = value.partition("=")
        if not sep or not key:
            raise click.BadParameter(f"{value!r}: expected KEY=VALUE", param_hint="--meta")
        meta[key] = val
    return meta


@click.command(name="tail")
@click.argument("url")
@click.option("--stream", "streams", multiple=True, help="Only this stream id (repeatable).")
@click.option("--model", "models", multiple=True, help="Only streams of this model (repeatable).")
@click.option("--provider", "providers", multiple=True, help="Only streams of this provider (repeatable).")
@click.option("--meta", "meta", multiple=True, help="Only streams whose start.meta has KEY=VALUE (repeatable).")
@click.option("--since", "since", multiple=True, help="Resume STREAM:SEQ (the last seq already seen; repeatable).")
@click.option("--snapshot", is_flag=True, help="Start with the text so far of every live stream.")
@click.option("--token", envvar="STREAMBUS_TOKEN", help="Bearer token (or set STREAMBUS_TOKEN).")
@click.option("--json", "as_json", is_flag=True, help="Print every event in wire form, one per line.")
@click.option("--reasoning", is_flag=True, help="Also print reasoning text (dimmed on a terminal).")
@click.option("--reconnect/--no-reconnect", default=True, show_default=True, help="Reconnect and resume on drops.")
@click.option("--max-streams", type=click.IntRange(min=1), help="Exit after this many streams ended.")
def tail_command(
    url: str,
    streams: tuple[str, ...],
    models: tuple[str, ...],
    providers: tuple[str, ...],
    meta: tuple[str, ...],
    since: tuple[str, ...],
    snapshot: bool,
    token: str | None,
    as_json: bool,
    reasoning: bool,
    reconnect: bool,
    max_streams: int | None,
) -> None:
    """Follow a streambus WebSocket broadcaster and print text as it arrives."""
    if not url.startswith(("ws://", "wss://")):
        raise click.BadParameter(f"{url!r}: expected a ws:// or wss:// URL", param_hint="URL")
    request: dict[str, Any] = {}
    if streams:
        request["streams"] = list(streams)
    if models:
        request["models"] = list(models)
    if providers:
        request["providers"] = list(providers)
    parsed_meta = _meta(meta)
    if parsed_meta:
        request["meta"] = parsed_meta
    parsed_since = _since(since)
    if parsed_since is not None:
        request["since"] = parsed_since
    if snapshot:
        request["snapshot"] = True
    tail = _Tail(
        url,
        request,
        token=token,
        as_json=as_json,
        reasoning=reasoning,
        reconnect=reconnect,
        max_streams=max_streams,
        out=sys.stdout,
        err=sys.stderr,
    )
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(tail.run())
