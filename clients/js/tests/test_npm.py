"""Runs the JS client's Node tests (``npm test`` in clients/js) from the README's one test command.

The Node tests start real streambus servers through ``clients/js/test/bus_server.py`` with this
interpreter (``STREAMBUS_PYTHON``), so they test the Python code of this checkout.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

JS = Path(__file__).resolve().parents[1]


def _missing() -> str | None:
    if shutil.which("node") is None or shutil.which("npm") is None:
        return "Node.js and npm are not installed (apt-get install nodejs npm)"
    if not (JS / "node_modules" / "typescript").exists():
        return "clients/js has no node_modules: run `npm ci` there (scripts/bootstrap.sh does)"
    return None


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_npm_test() -> None:
    """``npm test``: type checks, then the node:test suites against real servers on loopback."""
    reason = _missing()
    if reason is not None:
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI runs the JS client's tests, but {reason}")
        pytest.skip(reason)
    npm = shutil.which("npm")
    assert npm is not None
    proc = subprocess.run(
        [npm, "test", "--silent"],
        cwd=JS,
        env={**os.environ, "STREAMBUS_PYTHON": sys.executable},
        capture_output=True,
        text=True,
        timeout=360,
        check=False,
    )
    assert proc.returncode == 0, f"npm test failed:\n{proc.stdout[-6000:]}\n{proc.stderr[-3000:]}"
    assert "# fail 0" in proc.stdout
