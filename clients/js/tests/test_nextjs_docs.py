"""docs/js-client.md shows the Next.js example's files word for word, so the docs and the tested app cannot drift."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]
APP = "clients/js/examples/nextjs/"
SHOWN = re.compile(r"^`(" + re.escape(APP) + r"[^`]+)`:\n\n```\w*\n(.*?)^```$", re.M | re.S)
FILES = [
    "lib/streambus.ts",
    "app/api/chat/route.ts",
    "app/api/chat/[id]/stream/route.ts",
    "app/api/chat/[id]/abort/route.ts",
    "app/chat/[id]/page.tsx",
    "app/chat/[id]/chat.tsx",
]


def test_docs_show_the_nextjs_example_files_as_they_are() -> None:
    """Every route handler and the page appear in the docs exactly as in the example app."""
    docs = (ROOT / "docs" / "js-client.md").read_text(encoding="utf-8")
    shown: dict[str, str] = dict(SHOWN.findall(docs))
    assert sorted(shown) == sorted(APP + f for f in FILES)
    for path, body in shown.items():
        assert body == (ROOT / path).read_text(encoding="utf-8"), f"docs/js-client.md shows an old {path}"
