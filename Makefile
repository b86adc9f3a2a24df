# The two quick-start commands of the README, and a few helpers.
#
# Every target runs in a virtual environment: the one that is active ($VIRTUAL_ENV), else the
# project's own $(VENV) (default .venv, ignored by git), created on first use with $(PYTHON).
PYTHON ?= python3
VENV ?= .venv

ifdef VIRTUAL_ENV
BIN := $(VIRTUAL_ENV)/bin
else
BIN := $(VENV)/bin
endif

.PHONY: install run test check lint bench-crud

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)

## Install the package (editable) with its development and test tools.
install: $(BIN)/python
	$(BIN)/python -m pip install -q -e '.[dev]'

## Install, load the demo data into the SQLite default store and serve on 127.0.0.1:8080.
run: install
	$(BIN)/mso seed-demo
	$(BIN)/mso serve

## Install the test dependencies and run the whole suite (SQLite and PostgreSQL).
test: install
	$(BIN)/python -m pytest -q -n auto

## What CI checks besides the tests: declared dependencies, import contracts, lint.
check: install
	$(BIN)/deptry .
	$(BIN)/lint-imports
	$(BIN)/ruff check .

lint: install
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

bench-crud: install
	$(BIN)/python -m bench crud
