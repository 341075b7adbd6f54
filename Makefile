# Two commands matter: `make demo` and `make test`. Both install what they need first.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
export OMP_THREAD_LIMIT ?= 1
export ORT_DISABLE_TELEMETRY := 1
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: setup demo test test-slow bench clean

$(BIN)/python:
	$(PY) -m venv $(VENV)

# torch==2.13.0 first: the CPU build from the machine's disk. Anything unpinned would pull a CUDA build.
$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e .[dev]
	@bash scripts/system_deps.sh
	touch $@

setup: $(VENV)/.installed

demo: setup
	$(BIN)/python -m optictx.demo

test: setup
	$(BIN)/python -m pytest -q; rc=$$?; if [ $$rc -eq 5 ]; then echo "no tests collected"; exit 1; fi; exit $$rc

test-slow: setup
	$(BIN)/python -m pytest -m slow

bench: setup
	for b in benchmarks/*.py; do echo "== $$b"; $(BIN)/python $$b || exit 1; done

clean:
	rm -rf $(VENV) .pytest_cache
