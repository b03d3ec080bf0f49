#!/usr/bin/env bash
# Set up everything streambus needs on a machine that has only python3:
# a virtualenv in .venv with the core and every plugin (editable) plus test
# tools and the benchmarks' peer libraries, and Debian's chromium for the
# browser tests (--browser), valgrind for the benchmarks (--bench). Safe to run again.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}

if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
stamp=.venv/.streambus-installed
# Compiled plugin code (plugins/stats/setup.py builds a .pyx) is rebuilt when its sources change.
inputs=$({ cat pyproject.toml plugins/*/pyproject.toml plugins/*/setup.py plugins/*/*/*.pyx scripts/bootstrap.sh 2>/dev/null \
  || true; } | sha256sum | cut -d' ' -f1)
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$inputs" ]; then
  .venv/bin/python -m pip install --quiet --upgrade pip
  args=(-e ".[test,dev,bench]")
  for plugin in plugins/*/; do
    [ -f "$plugin/pyproject.toml" ] || continue
    args+=(-e "${plugin%/}[test]")
  done
  # torch: the CPU wheel this machine keeps on disk (pip takes it from there).
  .venv/bin/python -m pip install --quiet "torch==2.13.0" "${args[@]}"
  # langchain-core's own standard chat-model tests, without the six pytest
  # plugins its dependencies would load into every streambus test run.
  .venv/bin/python -m pip install --quiet --no-deps "langchain-tests==1.1.9"
  echo "$inputs" > "$stamp"
fi

# Browser tests: Debian's chromium, and a CJK font so Japanese text renders.
if [ "${1:-}" = "--browser" ] && { ! command -v chromium >/dev/null 2>&1 || ! fc-list 2>/dev/null | grep -qi "Noto Sans CJK"; }; then
  if [ "$(id -u)" = 0 ]; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium fonts-noto-cjk >/dev/null
  else
    echo "bootstrap: chromium is missing; browser tests need Debian's chromium (sudo apt-get install chromium)" >&2
  fi
fi

# Benchmarks (--bench): valgrind, for the stats benchmark's deterministic count of
# instructions and simulated cache misses (the shared machine's clock is too noisy to
# judge a 10% overhead on). Without it that benchmark reports CPU time only.
if [ "${1:-}" = "--bench" ] && ! command -v valgrind >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ]; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq valgrind >/dev/null
  else
    echo "bootstrap: valgrind is missing; the stats benchmark counts instructions with it (sudo apt-get install valgrind)" >&2
  fi
fi

# The http plugin's AI SDK tests read streams with the `ai` npm package (pinned
# in its package-lock.json); install it where Node is present. Safe to run again.
node_dir=plugins/http/tests/node
if command -v npm >/dev/null 2>&1 && [ -f "$node_dir/package-lock.json" ]; then
  if ! cmp -s "$node_dir/package-lock.json" "$node_dir/node_modules/.streambus-lock" 2>/dev/null; then
    (cd "$node_dir" && npm ci --no-audit --no-fund --loglevel=error) \
      && cp "$node_dir/package-lock.json" "$node_dir/node_modules/.streambus-lock"
  fi
fi
