# `make demo` and `make test` work from a fresh clone with only Python >= 3.11 installed.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp

.DEFAULT_GOAL := check
.PHONY: check demo test test-long lint format install clean mutate console-shots

$(BIN)/python:
	$(PYTHON) -c 'import sys; assert sys.version_info >= (3, 11), "tasklab needs Python >= 3.11"'
	$(PYTHON) -m venv $(VENV)

$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[all,dev]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/tasklab demo

# `make test` stays under 10 minutes: the tests marked long (over a minute each, with a
# shorter test beside them) run in `make test-long`.
PYTEST_MARKS ?= not long
PYTEST_ARGS ?= --durations=25
test: $(STAMP)
	eval "$$($(BIN)/python scripts/detect_services.py)" && \
	  bash scripts/test_prereqs.sh && \
	  $(BIN)/python -m pytest -q -p no:cacheprovider -n 2 --dist worksteal -m "$(PYTEST_MARKS)" $(PYTEST_ARGS)

test-long: $(STAMP)
	$(MAKE) test PYTEST_MARKS=long

# On demand, not in CI: mutation testing of the job state machine (docs/jobs.md, "Mutation
# testing"). Mutants live in a copy under mutants/; src/ is never rewritten. Niced, two at
# a time, so the machine stays usable; MUTATE_ARGS names mutants to re-run.
mutate: $(STAMP)
	eval "$$($(BIN)/python scripts/detect_services.py)" && \
	  nice -n 10 $(BIN)/mutmut run --max-children 2 $(MUTATE_ARGS); \
	  $(BIN)/python scripts/mutation_score.py

# The console's screenshots in docs/console/, from its browser test (a test run writes them to
# the temp folder).
console-shots: $(STAMP)
	eval "$$($(BIN)/python scripts/detect_services.py)" && \
	  TASKLAB_CONSOLE_SHOTS=docs $(BIN)/python -m pytest -q -p no:cacheprovider \
	  tests/service/console/test_browser.py

lint: $(STAMP)
	$(BIN)/ruff check src tests
	$(BIN)/ruff format --check src tests
	$(BIN)/mypy

format: $(STAMP)
	$(BIN)/ruff format src tests
	$(BIN)/ruff check --fix src tests

check: lint test

clean:
	rm -rf $(VENV) .tasklab .pytest_cache .mypy_cache .ruff_cache
