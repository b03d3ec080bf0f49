"""The documentation site builds with MkDocs in strict mode: no broken link, no page left out."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_mkdocs_strict_build(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert (tmp_path / "site" / "index.html").exists()
    assert (tmp_path / "site" / "websocket-protocol" / "index.html").exists()


def test_site_works_offline(tmp_path: Path) -> None:
    """No page loads a script, stylesheet or font from another host: the site is read offline too."""
    site = tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(site)],
        cwd=ROOT,
        capture_output=True,
        check=True,
        timeout=300,
    )
    remote = re.compile(r"<(?:script|link|img)\b[^>]*\b(?:src|href)=\"(?:https?:)?//[^\"]+\"", re.IGNORECASE)
    offenders = {
        str(page.relative_to(site)): found
        for page in site.rglob("*.html")
        if (found := remote.findall(page.read_text(encoding="utf-8")))
    }
    assert offenders == {}
    # code is still highlighted, at build time
    assert 'class="codehilite"' in (site / "index.html").read_text(encoding="utf-8")
