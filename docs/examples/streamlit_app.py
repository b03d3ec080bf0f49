"""Streamlit chat over a bus stream (see docs/frontends.md). Run: ``streamlit run docs/examples/streamlit_app.py``.

``echo`` stands in for a real producer; the bus runs in a background thread
(an anyio blocking portal) cached across Streamlit's reruns.
"""

from __future__ import annotations

import os

import anyio
import streamlit as st
from streambus_http import BackgroundBus

from streambus import StreamWriter

DELAY = float(os.environ.get("ECHO_DELAY", "0.02"))


async def echo(writer: StreamWriter, prompt: str) -> None:
    """A stand-in model: answer with the prompt, word by word."""
    for word in f"You said: {prompt}".split(" "):
        await writer.delta(word + " ")
        await anyio.sleep(DELAY)


@st.cache_resource
def background_bus() -> BackgroundBus:
    return BackgroundBus.start()


bg = background_bus()
st.title("streambus + Streamlit")
history: list[tuple[str, str]] = st.session_state.setdefault("history", [])
for role, text in history:
    with st.chat_message(role):
        st.markdown(text)

if prompt := st.chat_input("Say something"):
    history.append(("user", prompt))
    with st.chat_message("user"):
        st.markdown(prompt)
    with st.chat_message("assistant"):
        # The one line: a synchronous generator over the bus stream.
        reply = st.write_stream(bg.text(bg.start_stream(echo, prompt, model="echo")))
    history.append(("assistant", str(reply)))
