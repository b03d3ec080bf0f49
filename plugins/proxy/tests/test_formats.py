"""A provider format installed later is proxied without editing the proxy: found by entry point, read as pieces."""

from __future__ import annotations

import textwrap
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from streambus_proxy import Proxy, ProxyError

from streambus import Bus, StreamBusError
from streambus.events import DeltaEvent, EndEvent, ErrorEvent

from .conftest import Upstream

pytestmark = pytest.mark.anyio

# A whole provider plugin in one module: NDJSON lines {"text": ...} ended by {"end": reason}.
ECHO_MODULE = """
from streambus.formats import EndPiece, ErrorPiece, TextPiece
from streambus.wire import NdjsonParser
import orjson


def _piece(obj):
    if "error" in obj:
        return ErrorPiece(message=obj["error"], code=obj.get("code"))
    if "end" in obj:
        return EndPiece(reason=obj["end"])
    return TextPiece(obj["text"], obj.get("channel", "content"))


class EchoParser:
    def __init__(self):
        self._lines = NdjsonParser()
        self.done = False

    def _pieces(self, objs):
        for obj in objs:
            piece = _piece(obj)
            self.done = self.done or not isinstance(piece, TextPiece)
            yield piece

    def feed(self, data):
        return self._pieces(self._lines.feed(data))

    def close(self):
        return self._pieces(self._lines.close())


class EchoEncoder:
    content_type = "application/x-ndjson"

    def encode(self, event):
        if event.type == "delta":
            return orjson.dumps({"text": event.text}) + b"\\n"
        if event.type == "end":
            return orjson.dumps({"end": event.reason}) + b"\\n"
        return b""

    def close(self):
        return b""


class EncodeOnlyFormat:
    name = "encode-only"
    routes = {"/encode-only/generate": "generate"}

    def stream_encoder(self, route, request):
        return EchoEncoder()

    def assemble(self, route, request, events):
        return {"text": "".join(e.text for e in events if e.type == "delta")}

    def is_streaming(self, route, request):
        return request.get("stream", True) is not False

    def error_body(self, status, message):
        return {"error": message}

    def models_body(self, models):
        return {"models": list(models)}


class EchoFormat(EncodeOnlyFormat):
    name = "echo"
    routes = {"/echo/generate": "generate"}

    def stream_parser(self, route, request):
        return EchoParser()

    def body_pieces(self, route, request, body):
        return [TextPiece(orjson.loads(body)["text"]), EndPiece()]

    def usage_request(self, route, request):
        return None
"""


@pytest.fixture
def echo_installed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Install the ``echo`` format as a distribution would: a module and its entry points on ``sys.path``."""
    (tmp_path / "streambus_echo.py").write_text(ECHO_MODULE)
    info = tmp_path / "streambus_echo-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: streambus-echo\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(
        textwrap.dedent(
            """\
            [streambus.formats]
            echo = streambus_echo:EchoFormat
            encode-only = streambus_echo:EncodeOnlyFormat
            """
        )
    )
    monkeypatch.syspath_prepend(str(tmp_path))


async def test_a_format_installed_later_is_proxied(
    echo_installed: None, scripted: Upstream, proxy_env: Callable[..., Any]
) -> None:
    answer = [b'{"text":"Hel', b'lo"}\n{"text":" there"}\n', b'{"end":"length"}\n']
    scripted.reply.chunks = answer
    async with proxy_env(scripted.url) as env:
        async with aiohttp.ClientSession() as http:
            async with http.post(env.url + "/echo/generate", json={"model": "e"}) as response:
                assert await response.read() == b"".join(answer)
        await env.capture.wait_for(lambda c: len(c.ended) == 1)
        events = list(env.capture.events)
        start = env.capture.start(events[0].stream)
    assert start.provider == "echo" and start.model == "e"
    assert "".join(e.text for e in events if isinstance(e, DeltaEvent)) == "Hello there"
    assert isinstance(events[-1], EndEvent) and events[-1].reason == "length"


async def test_an_error_in_a_later_formats_stream_is_the_shared_failure(
    echo_installed: None, scripted: Upstream, proxy_env: Callable[..., Any]
) -> None:
    scripted.reply.chunks = [b'{"text":"Hi"}\n{"error":"overloaded","code":"busy"}\n']
    async with proxy_env(scripted.url) as env:
        async with aiohttp.ClientSession() as http:
            async with http.post(env.url + "/echo/generate", json={"model": "e"}) as response:
                await response.read()
        await env.capture.wait_for(lambda c: len(c.ended) == 1)
        terminal = env.capture.terminal()
    assert isinstance(terminal, ErrorEvent) and terminal.kind == "upstream_error" and not terminal.retryable
    assert terminal.message == "the server reported an error mid-stream (busy): overloaded"


async def test_a_format_that_cannot_parse_answers_is_refused_by_name(echo_installed: None) -> None:
    async with Bus() as bus:
        with pytest.raises(ProxyError, match="'encode-only' cannot be proxied") as info:
            Proxy(bus, "http://127.0.0.1:9", formats=["encode-only"])
        assert isinstance(info.value, StreamBusError)
        # Found by entry point but unable to parse: left out, the others are served.
        proxy = Proxy(bus, "http://127.0.0.1:9")
        assert "encode-only" not in proxy.formats and {"echo", "ollama", "openai"} <= set(proxy.formats)


async def test_two_formats_serving_one_path_are_refused(echo_installed: None, tmp_path: Path) -> None:
    (tmp_path / "streambus_echo-0.1.dist-info" / "entry_points.txt").write_text(
        "[streambus.formats]\necho = streambus_echo:EchoFormat\necho2 = streambus_echo:EchoFormat\n"
    )
    async with Bus() as bus:
        with pytest.raises(ProxyError, match="'echo' and 'echo2' both serve /echo/generate"):
            Proxy(bus, "http://127.0.0.1:9", formats=["echo", "echo2"])
