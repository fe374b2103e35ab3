# Two entry points: `make run` (the whole DVC pipeline) and `make test` (lint + tests).
# Each creates .venv on first use and reinstalls only when pyproject.toml changes.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: run test lint bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -q -e .
	touch $@

$(VENV)/.installed-dev: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -q -e ".[dev]"
	touch $(VENV)/.installed $@

# dvc runs each stage's `python -m ...` through a shell: put the venv first on PATH.
run: $(VENV)/.installed
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/dvc repro

test: $(VENV)/.installed-dev
	$(BIN)/ruff check .
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/pytest

lint: $(VENV)/.installed-dev
	$(BIN)/ruff check .

bench: $(VENV)/.installed-dev
	$(BIN)/python -m benchmarks.train_speed
	$(BIN)/python -m benchmarks.tracking_overhead

clean:
	rm -rf $(VENV) outputs multirun .pytest_cache .ruff_cache
