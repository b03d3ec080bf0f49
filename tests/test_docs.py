"""Every ```python example in docs/ and README.md runs as written.

Blocks preceded by ``<!-- file: NAME -->`` belong to multi-file examples that
``tests/test_docs_testing.py`` writes out and runs as a project.
"""

from __future__ import annotations

import re
import runpy
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
FENCE = re.compile(r"^(?P<marker><!-- file: [^>]+-->\n)?```python\n(?P<code>.*?)^```", re.MULTILINE | re.DOTALL)


def examples() -> list[tuple[str, str]]:
    found = []
    for page in sorted([*ROOT.glob("docs/**/*.md"), ROOT / "README.md"]):
        if not page.exists():
            continue
        for i, match in enumerate(FENCE.finditer(page.read_text(encoding="utf-8"))):
            if match.group("marker"):
                continue
            found.append((f"{page.relative_to(ROOT)}#{i + 1}", match.group("code")))
    return found


EXAMPLES = examples()


def test_docs_have_examples() -> None:
    assert len(EXAMPLES) >= 10


@pytest.mark.parametrize(("where", "code"), EXAMPLES, ids=[w for w, _ in EXAMPLES])
def test_doc_example_runs(where: str, code: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    script = tmp_path / "example.py"
    script.write_text(code, encoding="utf-8")
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(sys, "argv", [str(script)])
    runpy.run_path(str(script), run_name="__main__")
