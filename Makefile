# The two commands a new machine needs: `make demo` and `make test`.
.PHONY: setup demo test lint bench docs

setup:
	bash scripts/bootstrap.sh

demo: setup
	.venv/bin/streambus demo $(ARGS)

test:
	bash scripts/bootstrap.sh --browser
	.venv/bin/python -m pytest

docs: setup
	.venv/bin/mkdocs build --strict

lint: setup
	.venv/bin/ruff check .
	.venv/bin/ruff format --check .
	.venv/bin/mypy --strict streambus

bench:
	bash scripts/bootstrap.sh --bench
	.venv/bin/python bench/run.py
