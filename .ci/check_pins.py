"""Fail unless this venv holds exactly the versions pinned in the constraints file given."""

from __future__ import annotations

import importlib.metadata
import sys
from pathlib import Path

pins = {}
for line in Path(sys.argv[1]).read_text(encoding="utf-8").splitlines():
    line = line.split("#")[0].strip()
    if line:
        name, _, version = line.partition("==")
        pins[name] = version
installed = {name: importlib.metadata.version(name) for name in pins}
wrong = {name: version for name, version in installed.items() if version != pins[name]}
if wrong:
    sys.exit(f"{sys.argv[1]}: this venv did not get the lowest versions (installed: {wrong})")
print(f"{sys.argv[1]}: testing against {', '.join(f'{n}=={v}' for n, v in pins.items())}")
