# slotroute: `make run` starts the example box, `make test` runs the tests.
# Both create the virtual environment in .venv on first use.

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
CONFIG ?= examples/box.toml
PYTEST_ARGS ?=
BENCH_ARGS ?=

.PHONY: install run test test-llama bench proto lint real-backend clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e '.[test,bench]'
	touch $@

proto: install
	$(BIN)/python scripts/gen_proto.py

run: proto
	exec $(BIN)/slotroute up --config $(CONFIG)

test: install
	$(BIN)/python -m pytest $(PYTEST_ARGS)

lint: install
	$(BIN)/ruff check src tests scripts

# Build llama.cpp's llama-server into ~/.cache/slotroute (or $SLOTROUTE_CACHE)
# and write the tiny test models into build/llama-models. Both steps reuse
# what exists: a rebuild takes about 4.5 minutes on 2 cores, a reuse under a second.
real-backend: install
	$(BIN)/python scripts/real_backend.py build
	$(BIN)/python scripts/real_backend.py models --out build/llama-models

# End-to-end tests against the real llama-server. The variable turns the
# tests' "not built" skip into a failure, because real-backend just built it.
test-llama: real-backend
	SLOTROUTE_REQUIRE_REAL_BACKEND=1 $(BIN)/python -m pytest -m llama $(PYTEST_ARGS)

# Benchmarks of slotd and the dispatcher on this machine (about 5 minutes on 2
# cores); writes BENCHMARKS.md. BENCH_ARGS=--quick runs fewer, shorter rounds.
bench: install
	$(BIN)/python bench/run.py $(BENCH_ARGS)

clean:
	rm -rf $(VENV) build .pytest_cache
