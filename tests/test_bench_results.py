"""The committed benchmark collections say what the committed tables say.

``bench/run.py`` writes every benchmark's table (``bench/results/<name>.md``)
and collects them into ``bench/results/README.md`` and the results section of
``docs/benchmarks.md``. A benchmark run on its own rewrites only its table, so
the collections can fall behind it (they once showed an attack table's "NOT met"
after its rerun said "met"). These tests fail until ``python bench/run.py
--collect`` brings them up to date.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parent.parent


def _runner() -> ModuleType:
    spec = importlib.util.spec_from_file_location("bench_run", ROOT / "bench" / "run.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _tables(body: str) -> str:
    # The collection after its first line (the machine and when it was collected).
    first, _, rest = body.partition("\n")
    assert first.startswith("Machine: "), first
    return rest.strip()


def test_results_readme_collects_every_table_as_committed() -> None:
    expected = _tables(_runner().collected("now"))
    readme = (ROOT / "bench" / "results" / "README.md").read_text(encoding="utf-8")
    assert readme.startswith("# Benchmark results\n\n")
    assert _tables(readme.removeprefix("# Benchmark results\n\n")) == expected, (
        "bench/results/README.md differs from the tables in bench/results/: run `python bench/run.py --collect`"
    )


def test_benchmarks_page_shows_every_table_as_committed() -> None:
    runner = _runner()
    expected = _tables(runner.collected("now"))
    page = (ROOT / "docs" / "benchmarks.md").read_text(encoding="utf-8")
    section = page.split(runner.BEGIN, 1)[1].split(runner.END, 1)[0]
    assert _tables(section.strip()) == expected, (
        "docs/benchmarks.md's results differ from the tables in bench/results/: run `python bench/run.py --collect`"
    )


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    """``bench/run.py`` with *args*, in a process of its own."""
    return subprocess.run(
        [sys.executable, str(ROOT / "bench" / "run.py"), *args], capture_output=True, text=True, timeout=60
    )


def test_run_names_an_unknown_benchmark_and_runs_nothing() -> None:
    done = _run("core", "no_such_bench")
    assert done.returncode != 0
    assert "no benchmark named no_such_bench" in done.stderr
    assert "core" in done.stderr  # the choices are listed
    assert "== bench_core" not in done.stdout  # nothing ran


def test_collect_named_with_benchmarks_is_a_clear_error() -> None:
    done = _run("--collect", "core")
    assert done.returncode != 0
    assert "--collect runs no benchmark, so it takes no names" in done.stderr
    assert "== bench_core" not in done.stdout  # nothing ran
