"""Run every benchmark (``bench/bench_*.py``, and ``bench_*.mjs`` with Node) and collect their result tables.

Each benchmark is a script that writes ``bench/results/<name>.md`` (a
Markdown table with its peers side by side) when run as
``python bench/bench_<name>.py``. This runner runs them one after another in
fresh processes, then writes ``bench/results/README.md`` and the results
section of ``docs/benchmarks.md``.

Usage: ``python bench/run.py [NAME ...]`` (default: all). A benchmark run on
its own (``python bench/bench_websocket.py --attack``) rewrites only its own
table: ``python bench/run.py --collect`` then rewrites the two collections
without running anything (``tests/test_bench_results.py`` fails while they
differ from the tables).
"""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent
RESULTS = ROOT / "results"
DOCS = ROOT.parent / "docs" / "benchmarks.md"
BEGIN, END = "<!-- results:begin -->", "<!-- results:end -->"
ENV = {**os.environ, "OPENBLAS_NUM_THREADS": os.environ.get("OPENBLAS_NUM_THREADS", "1")}
"""No benchmark calls BLAS, but numpy starts OpenBLAS worker threads on import, and their spinning after
start-up counts in a process's CPU time (measured: 6% of a stats benchmark run's samples)."""


def collected(stamp: str) -> str:
    """``bench/results/README.md``'s body: a line about the machine and *stamp*, then every result table."""
    sections = [f"Machine: {platform.machine()}, Python {platform.python_version()}, {platform.system()}; {stamp}.\n"]
    for md in sorted(RESULTS.glob("*.md")):
        if md.name != "README.md":
            sections.append(md.read_text(encoding="utf-8").strip() + "\n")
    return "\n".join(sections)


def collect(stamp: str) -> None:
    """Write ``bench/results/README.md`` and the results section of ``docs/benchmarks.md`` from the tables."""
    body = collected(stamp)
    (RESULTS / "README.md").write_text("# Benchmark results\n\n" + body, encoding="utf-8")
    if DOCS.exists():
        text = DOCS.read_text(encoding="utf-8")
        if BEGIN in text and END in text:
            head, rest = text.split(BEGIN, 1)
            _, tail = rest.split(END, 1)
            DOCS.write_text(f"{head}{BEGIN}\n{body}\n{END}{tail}", encoding="utf-8")


def _now() -> str:
    return time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())


def main(argv: list[str]) -> int:
    RESULTS.mkdir(exist_ok=True)
    if "--collect" in argv:
        if argv != ["--collect"]:
            sys.exit("bench/run.py: --collect runs no benchmark, so it takes no names: run them, or --collect alone")
        collect(f"collected on {_now()}")
        return 0
    scripts = sorted([*ROOT.glob("bench_*.py"), *ROOT.glob("bench_*.mjs")])
    if argv:
        unknown = sorted(set(argv) - {s.stem.removeprefix("bench_") for s in scripts})
        if unknown:
            choices = ", ".join(sorted(s.stem.removeprefix("bench_") for s in scripts))
            sys.exit(f"bench/run.py: no benchmark named {', '.join(unknown)}; choose from {choices} (or --collect)")
        scripts = [s for s in scripts if s.stem.removeprefix("bench_") in argv]
    failed = []
    for script in scripts:
        print(f"== {script.stem}", flush=True)
        started = time.perf_counter()
        if script.suffix == ".mjs":
            node, npm = shutil.which("node"), shutil.which("npm")
            if node is None or npm is None:
                print(f"   {script.stem}: skipped, Node.js is not installed", flush=True)
                continue
            # The JS client benchmark imports clients/js/dist: build it first (tsc from its node_modules).
            subprocess.call([npm, "run", "--silent", "build"], cwd=ROOT.parent / "clients" / "js")
            command = [node, str(script)]
        else:
            command = [sys.executable, str(script)]
        code = subprocess.call(command, cwd=ROOT.parent, env={**ENV, "STREAMBUS_PYTHON": sys.executable})
        print(f"   {script.stem}: exit {code} in {time.perf_counter() - started:.1f}s", flush=True)
        if code:
            failed.append(script.stem)
    collect(f"run on {_now()}")
    if failed:
        print("failed:", ", ".join(failed), file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
