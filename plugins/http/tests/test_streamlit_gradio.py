"""Streamlit (its own AppTest) and Gradio (gradio_client against the launched app) over bus streams."""

from __future__ import annotations

import asyncio
import gc
import importlib.util
import os
import socket
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest
from streambus_http import BackgroundBus, HttpStreamError

from streambus import StreamWriter
from streambus.subscription import StreamFailed

EXAMPLES = Path(__file__).resolve().parents[3] / "docs" / "examples"


@pytest.fixture
def bg() -> Iterator[BackgroundBus]:
    with BackgroundBus.start(start_timeout=5) as bus:
        yield bus


async def words(writer: StreamWriter, text: str, fail: str = "") -> None:
    for word in text.split(" "):
        await writer.delta(word + " ")
    if fail == "abort":
        await writer.abort("unsafe", by="moderation")
    elif fail == "error":
        raise RuntimeError("boom")


def test_text_generator_reads_a_stream_even_after_it_ended(bg: BackgroundBus) -> None:
    sid = bg.start_stream(words, "a b c")
    assert "".join(bg.text(sid)) == "a b c "
    assert "".join(bg.text(sid)) == "a b c "  # again, from the history
    assert list(bg.accumulated(sid)) == ["a ", "a b ", "a b c "]


def test_failed_streams_end_with_a_note_or_raise(bg: BackgroundBus) -> None:
    sid = bg.start_stream(words, "x", "abort")
    assert "".join(bg.text(sid)) == "x \n\n[aborted by moderation: unsafe]"
    with pytest.raises(StreamFailed, match="unsafe"):
        list(bg.text(sid, failure="raise"))
    sid = bg.start_stream(words, "y", "error")
    assert "".join(bg.text(sid)).startswith("y \n\n[error exception:")


def test_unknown_stream_and_closed_bus_fail_clearly(bg: BackgroundBus) -> None:
    bg.start_timeout = 0.1
    with pytest.raises(HttpStreamError, match="did not start"):
        list(bg.text("never"))
    bg.close()
    with pytest.raises(RuntimeError, match="not running"):
        bg.start_stream(words, "z")


def test_background_bus_runs_on_trio_too() -> None:
    with BackgroundBus.start(backend="trio") as bus:
        assert "".join(bus.text(bus.start_stream(words, "on trio"))) == "on trio "


def test_streamlit_example_with_apptest() -> None:
    from streamlit.testing.v1 import AppTest

    os.environ["ECHO_DELAY"] = "0"
    try:
        at = AppTest.from_file(str(EXAMPLES / "streamlit_app.py"), default_timeout=30).run()
        assert not at.exception
        at.chat_input[0].set_value("hello bus").run()
        assert not at.exception
        assistant = at.chat_message[1]
        assert assistant.name == "assistant"
        assert assistant.markdown[0].value.strip() == "You said: hello bus"  # markdown drops the trailing space
        at.chat_input[0].set_value("again").run()
        assert [m.markdown[0].value.strip() for m in at.chat_message] == [
            "hello bus",
            "You said: hello bus",
            "again",
            "You said: again",
        ]
    finally:
        os.environ.pop("ECHO_DELAY", None)
        BackgroundBus.close_all()


def _load(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _event_loops() -> set[asyncio.AbstractEventLoop]:
    # type(), not isinstance(): isinstance reads __class__, which on some lazy
    # module proxies (torch.distributed) runs a deprecation warning.
    return {o for o in gc.get_objects() if issubclass(type(o), asyncio.AbstractEventLoop)}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


# Gradio's launch thread leaves its asyncio loop unclosed; collect it here so the
# ResourceWarning is attributed to this test (and ignored) instead of failing the session.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
@pytest.mark.filterwarnings("ignore::ResourceWarning")
def test_gradio_example_with_gradio_client(bg: BackgroundBus) -> None:
    from gradio_client import Client

    loops_before = _event_loops()
    module = _load("gradio_app")
    module.DELAY = 0.0
    demo = module.build(bg)
    port = _free_port()
    demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True, show_error=True)
    try:
        client = Client(f"http://127.0.0.1:{port}/", verbose=False, download_files=False)
        job = client.submit("hello gradio", api_name="/chat")
        outputs = list(job)
        final = job.result(timeout=30)
        assert final == "You said: hello gradio "
        # streamed: accumulated text, each output a prefix of the next
        assert outputs, "no streamed outputs"
        assert all(final.startswith(o) for o in outputs)
        client.close()
    finally:
        demo.close()
        # Close the loop Gradio's launch thread left behind, so no later test
        # meets its ResourceWarning when the garbage collector finalises it.
        for loop in _event_loops() - loops_before:
            if not loop.is_running() and not loop.is_closed():
                loop.close()
        gc.collect()
