"""Gradio chat over a bus stream (see docs/frontends.md). Run: ``python docs/examples/gradio_app.py``.

``echo`` stands in for a real producer; ``bg.chat_fn`` starts one bus stream
per message and yields the accumulated text, as ``gr.ChatInterface`` expects.
"""

from __future__ import annotations

import os
from typing import Any

import anyio
import gradio as gr
from streambus_http import BackgroundBus

from streambus import StreamWriter

DELAY = float(os.environ.get("ECHO_DELAY", "0.02"))


async def echo(writer: StreamWriter, message: str, history: list[Any]) -> None:
    """A stand-in model: answer with the message, word by word."""
    for word in f"You said: {message}".split(" "):
        await writer.delta(word + " ")
        await anyio.sleep(DELAY)


def build(bg: BackgroundBus) -> gr.ChatInterface:
    """The app: one line of wiring between the bus and the chat UI."""
    return gr.ChatInterface(bg.chat_fn(echo, model="echo"), title="streambus + Gradio", api_name="chat")


if __name__ == "__main__":
    with BackgroundBus.start() as bus:
        build(bus).launch(server_name="127.0.0.1")
