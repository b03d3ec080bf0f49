# The two commands a new machine needs: `make demo` and `make test`.
# `make demo` installs only what the demo runs; `make test` installs everything else too.
.PHONY: setup setup-all demo test lint bench docs

setup:
	bash scripts/bootstrap.sh

setup-all:
	bash scripts/bootstrap.sh --test

demo: setup
	.venv/bin/streambus demo $(ARGS)

test: setup-all
	.venv/bin/python -m pytest -n 2 --dist loadgroup

docs: setup-all
	.venv/bin/mkdocs build --strict

lint: setup-all
	.venv/bin/ruff check .
	.venv/bin/ruff format --check .
	.venv/bin/mypy --strict streambus bench $(filter-out %.egg-info/,$(wildcard plugins/*/streambus_*/))

bench:
	bash scripts/bootstrap.sh --bench
	.venv/bin/python bench/run.py
