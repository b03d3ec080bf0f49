"""The Python examples of docs/plugins/langchain.md run as written."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

DOC = Path(__file__).resolve().parents[3] / "docs" / "plugins" / "langchain.md"


def examples() -> list[str]:
    return re.findall(r"```python\n(.*?)```", DOC.read_text(encoding="utf-8"), flags=re.S)


EXPECTED = [
    "Paris is the capital of France. stop",
    "Blue light scatters more. True ['",
    "Hello there {'input_tokens': 3, 'output_tokens': 2, 'total_tokens': 5}",
]


def test_the_doc_has_examples() -> None:
    assert len(examples()) == len(EXPECTED)


@pytest.mark.parametrize("index", range(len(EXPECTED)))
def test_example_runs(
    index: int, capsys: pytest.CaptureFixture[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)  # the recording example writes (and removes) a file in the cwd
    exec(compile(examples()[index], f"{DOC.name}[{index}]", "exec"), {"__name__": "__doc_example__"})
    out = capsys.readouterr().out
    assert out.startswith(EXPECTED[index]), out
    assert os.listdir(tmp_path) == []
