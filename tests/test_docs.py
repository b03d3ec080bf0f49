"""Every ```python example in docs/ and README.md runs as written.

Blocks preceded by ``<!-- file: NAME -->`` belong to multi-file examples that
``tests/test_docs_testing.py`` writes out and runs as a project. Blocks
preceded by ``<!-- excerpt: PATH -->`` quote a complete example file under
docs/ that its plugin's tests run: each of their lines must appear in that
file, in order (comments aside).
"""

from __future__ import annotations

import re
import runpy
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
FENCE = re.compile(
    r"^(?:<!-- (?P<kind>file|excerpt): (?P<target>[^>]+?) -->\n)?```python\n(?P<code>.*?)^```", re.MULTILINE | re.DOTALL
)


PAGES = sorted([*ROOT.glob("docs/**/*.md"), ROOT / "README.md"])


def examples(kind: str | None) -> list[tuple[str, str, str]]:
    found = []
    for page in PAGES:
        if not page.exists():
            continue
        for i, match in enumerate(FENCE.finditer(page.read_text(encoding="utf-8"))):
            if match.group("kind") == kind:
                target = str(page.parent / match.group("target")) if kind else ""
                found.append((f"{page.relative_to(ROOT)}#{i + 1}", match.group("code"), target))
    return found


EXAMPLES = [(where, code) for where, code, _ in examples(None)]
EXCERPTS = examples("excerpt")


def _code_lines(text: str) -> list[str]:
    lines = (line.split("  #")[0].strip() for line in text.splitlines())
    return [line for line in lines if line and not line.startswith("#")]


@pytest.mark.parametrize(("where", "code", "target"), EXCERPTS, ids=[w for w, _, _ in EXCERPTS])
def test_doc_excerpt_quotes_a_tested_file(where: str, code: str, target: str) -> None:
    source = iter(_code_lines(Path(target).read_text(encoding="utf-8")))
    for line in _code_lines(code):
        assert line in source, f"{where}: {line!r} is not in {target} (in this order)"


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
