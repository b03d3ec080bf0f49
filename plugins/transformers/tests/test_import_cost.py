"""Importing the plugin (``streambus plugins``, a pipeline that lists it) must not import torch."""

from __future__ import annotations

import subprocess
import sys


def test_importing_the_plugin_does_not_import_torch_or_transformers() -> None:
    code = "import sys, streambus_transformers; print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120)
    assert out.stdout.strip() == "[]"
