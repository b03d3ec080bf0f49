#!/usr/bin/env bash
# Set up what streambus needs on a machine that has only python3, in .venv. Safe to run again.
#
#   bootstrap.sh            the demo: the core and the demo's plugins (ollama, openai, moderation,
#                           stats, websocket, demo), nothing else, so `make demo` is quick and small
#   bootstrap.sh --test     everything: the core and every plugin (editable) with their test extras,
#                           dev tools, the benchmarks' peers, torch's CPU wheel, Debian's chromium
#                           (browser tests) and the npm packages the Node tests use
#   bootstrap.sh --bench    the same as --test (what the benchmarks need is in the test extras)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}

mode=demo
for arg in "$@"; do
  case "$arg" in
    --test | --browser) [ "$mode" = bench ] || mode=test ;;  # --browser: the old name of --test
    --bench) mode=bench ;;
    *) echo "bootstrap: unknown option $arg (use --test or --bench)" >&2; exit 2 ;;
  esac
done

if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi

# A stamp per install level records a hash of what it was built from, so a change to any
# pyproject (or to this script, or to compiled sources) reinstalls, and nothing else does.
inputs=$({ cat pyproject.toml plugins/*/pyproject.toml plugins/*/setup.py plugins/*/*/*.pyx scripts/bootstrap.sh 2>/dev/null \
  || true; } | sha256sum | cut -d' ' -f1)
full_stamp=.venv/.streambus-installed
demo_stamp=.venv/.streambus-demo

installed() { [ -f "$1" ] && [ "$(cat "$1")" = "$inputs" ]; }

if [ "$mode" = demo ]; then
  if ! installed "$demo_stamp" && ! installed "$full_stamp"; then
    .venv/bin/python -m pip install --quiet --upgrade pip
    args=(-e .)
    for plugin in ollama openai moderation stats websocket demo; do
      args+=(-e "plugins/$plugin")
    done
    .venv/bin/python -m pip install --quiet "${args[@]}"
    echo "$inputs" > "$demo_stamp"
  fi
  exit 0
fi

if ! installed "$full_stamp"; then
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
  # nats-py's fast-parse extra (fast-mail-parser), outside the venv's own packages: nats-py would
  # use it in every test; one test puts it on a subprocess's path to check that the NATS plugin
  # refuses it clearly (plugins/nats/tests/test_header_parser.py).
  .venv/bin/python -m pip install --quiet --no-deps --upgrade --target .venv/extras/fast-parse "fast-mail-parser==0.10.0"
  echo "$inputs" > "$full_stamp"
fi

# Browser tests: Debian's chromium, and a CJK font so Japanese text renders.
if ! command -v chromium >/dev/null 2>&1 || ! fc-list 2>/dev/null | grep -qi "Noto Sans CJK"; then
  if [ "$(id -u)" = 0 ]; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium fonts-noto-cjk >/dev/null
  else
    echo "bootstrap: chromium is missing; browser tests need Debian's chromium (sudo apt-get install chromium)" >&2
  fi
fi

# Node tests read streams with npm packages pinned in each folder's package-lock.json (the
# clients' example apps too, such as the Next.js one); install them where Node is present.
# Safe to run again.
if command -v npm >/dev/null 2>&1; then
  for lock in plugins/*/tests/node/package-lock.json clients/*/package-lock.json clients/*/examples/*/package-lock.json; do
    [ -f "$lock" ] || continue
    node_dir=$(dirname "$lock")
    if ! cmp -s "$lock" "$node_dir/node_modules/.streambus-lock" 2>/dev/null; then
      (cd "$node_dir" && npm ci --no-audit --no-fund --loglevel=error) \
        && cp "$lock" "$node_dir/node_modules/.streambus-lock"
    fi
  done
fi
