"""nats-py's optional fast header parser returns lists: the plugin refuses it clearly, before connecting.

nats-py parses message headers with ``fast_mail_parser`` when it is installed
(its ``fast-parse`` extra). fast-mail-parser 0.10 returns every header value
as a list, which nats-py passes on: without a check the source failed at its
first message with ``TypeError: unhashable type: 'list'``. The real package
is installed by ``scripts/bootstrap.sh --test`` into ``.venv/extras/fast-parse``,
outside the venv's own packages, and put on the path of one subprocess here.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from conftest import NatsServer

ROOT = Path(__file__).resolve().parents[3]
FAST_PARSE = ROOT / ".venv" / "extras" / "fast-parse"

SCRIPT = textwrap.dedent(
    """
    import sys

    import anyio
    from streambus_nats import NatsHeaderParserUnsupported, NatsSink, NatsSource
    from structlog.testing import capture_logs

    from streambus import Bus, SinkFailed

    URL = sys.argv[1]


    async def main() -> None:
        with capture_logs() as logs:
            try:
                with anyio.fail_after(20):
                    async with Bus() as worker:
                        worker.add_sink(NatsSink(url=URL), critical=True)
                        async with worker.stream(model="m") as w:
                            await w.delta("never sent")
                print("sink: no error")
            except SinkFailed as exc:
                print("sink:", type(exc.__cause__).__name__, exc.__cause__)
            async with Bus() as edge:
                source = NatsSource(url=URL, start="$", position="none")
                try:
                    async with anyio.create_task_group() as tg:
                        tg.start_soon(source.run, edge)
                        with anyio.fail_after(20):
                            await source.wait_ready()
                        source.stop()
                    print("source: no error")
                except* NatsHeaderParserUnsupported as group:
                    print("source:", type(group.exceptions[0]).__name__, group.exceptions[0])
        print("logged:", sorted({entry["event"] for entry in logs if entry["log_level"] == "error"}))
        print("retried:", any(entry["event"].endswith("_retry") for entry in logs))


    anyio.run(main, backend="asyncio")
    """
)


def _run(url: str, extra_path: Path | None) -> str:
    env = {**os.environ}
    if extra_path is not None:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(extra_path), env.get("PYTHONPATH", "")]))
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT, url], capture_output=True, text=True, timeout=120, env=env, cwd=ROOT
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def test_a_header_parser_that_returns_lists_is_refused_before_connecting(
    nats_server: Callable[..., NatsServer],
) -> None:
    if not (FAST_PARSE / "fast_mail_parser").is_dir():
        reason = f"fast-mail-parser is not in {FAST_PARSE} (scripts/bootstrap.sh --test puts it there)"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(reason + " (CI=true: this test must run)")
        pytest.skip(reason)
    server = nats_server()
    out = _run(server.url, FAST_PARSE)
    assert "sink: NatsHeaderParserUnsupported fast-mail-parser 0.10.0 is installed" in out, out
    assert "source: NatsHeaderParserUnsupported fast-mail-parser 0.10.0 is installed" in out, out
    assert "as list instead of str" in out and "pip uninstall fast-mail-parser" in out, out
    assert "logged: ['nats.sink_cannot_read_headers', 'nats.source_cannot_read_headers'" in out, out
    assert "retried: False" in out, out  # refused at once, not retried in a loop


def test_without_it_the_same_script_runs_its_stream(nats_server: Callable[..., NatsServer]) -> None:
    # The script itself can tell the two apart: without the package, nothing is refused.
    server = nats_server()
    out = _run(server.url, None)
    assert "sink: no error" in out and "source: no error" in out, out
    assert "NatsHeaderParserUnsupported" not in out, out


def test_a_copy_that_cannot_be_imported_is_no_reason_to_refuse(
    nats_server: Callable[..., NatsServer], tmp_path: Path
) -> None:
    # Built for another platform, say: nats-py's own import of it fails too, and it parses headers itself.
    broken = tmp_path / "fast_mail_parser"
    broken.mkdir()
    (broken / "__init__.py").write_text('raise ImportError("built for another platform")\n', encoding="utf-8")
    server = nats_server()
    out = _run(server.url, tmp_path)
    assert "sink: no error" in out and "source: no error" in out, out
