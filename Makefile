# Two entry points: `make run` (the whole DVC pipeline) and `make test` (lint + tests).
# Each creates .venv on first use and reinstalls only when pyproject.toml changes.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# `make server`: the team's MLflow tracking server on PostgreSQL (src/tracking_server.py), on
# SERVER_HOST:SERVER_PORT, its database, artifacts and logs in SERVER_DIR/<port>/.
SERVER_HOST ?= 127.0.0.1
SERVER_PORT ?= 5000
SERVER_DIR ?= .server

.PHONY: run test lint bench clean server server-stop

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
	$(BIN)/python -m benchmarks.end_to_end
	$(BIN)/python -m benchmarks.store_cost
	$(BIN)/python -m benchmarks.search

clean:
	rm -rf $(VENV) outputs multirun .pytest_cache .ruff_cache

# The server runs on until `make server-stop` (same SERVER_PORT and SERVER_DIR) stops it.
server: $(VENV)/.installed
	$(BIN)/python -m src.tracking_server start --host "$(SERVER_HOST)" --port "$(SERVER_PORT)" --folder "$(SERVER_DIR)"

server-stop: | $(BIN)/python
	$(BIN)/python -m src.tracking_server stop --port "$(SERVER_PORT)" --folder "$(SERVER_DIR)"
