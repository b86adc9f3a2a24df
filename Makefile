# The two quick-start commands of the README, and a few helpers.
PYTHON ?= python3
PIP ?= $(PYTHON) -m pip

.PHONY: install run test lint bench-crud

install:
	$(PIP) install -q -e '.[dev]'

## Install, load the demo data into the SQLite default store and serve on 127.0.0.1:8080.
run: install
	mso seed-demo
	mso serve

## Install the test dependencies and run the whole suite (SQLite and PostgreSQL).
test: install
	$(PYTHON) -m pytest -q -n auto

lint:
	ruff check . && ruff format --check .

bench-crud:
	$(PYTHON) -m bench crud
