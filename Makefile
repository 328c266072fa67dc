# slotroute: `make run` starts the example box, `make test` runs the tests.
# Both create the virtual environment in .venv on first use.

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
CONFIG ?= examples/box.toml
PYTEST_ARGS ?=

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

clean:
	rm -rf $(VENV) build .pytest_cache
