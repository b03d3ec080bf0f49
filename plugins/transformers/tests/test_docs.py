"""The Python examples of docs/plugins/transformers.md run as written."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

DOC = Path(__file__).resolve().parents[3] / "docs" / "plugins" / "transformers.md"


def examples() -> list[str]:
    return re.findall(r"```python\n(.*?)```", DOC.read_text(encoding="utf-8"), flags=re.S)


def test_the_doc_has_examples() -> None:
    assert len(examples()) == 1


@pytest.mark.parametrize("index", range(len(examples())))
def test_example_runs(index: int, capsys: pytest.CaptureFixture[str]) -> None:
    exec(compile(examples()[index], f"{DOC.name}[{index}]", "exec"), {"__name__": "__doc_example__"})
    reason, completion, _ = capsys.readouterr().out.splitlines()[0].split()
    assert (reason, completion) == ("length", "16")
