# The README's two commands:  `make embedded`  and  `make test`.
PYTHON ?= python3.11
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: setup embedded test test-fast lint system-deps clean-results

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]'
	touch $(STAMP)

setup: $(STAMP)

# Debian packages the tests need (a real single-node Slurm, headless Chromium). Root, apt-get.
system-deps:
	bash workflow/scripts/install-system-deps.sh

# Main job: the whole DAG on the embedded default (CPU, generated data, scaled-down models).
embedded: setup
	PATH=$(CURDIR)/$(BIN):$$PATH bash workflow/scripts/run-embedded.sh

# Lint, format and type checks (ruff, mypy: configured in pyproject.toml).
LINT_PATHS := smallbig tests benchmarks workflow/scripts
lint: setup
	$(BIN)/ruff check $(LINT_PATHS)
	$(BIN)/ruff format --check $(LINT_PATHS)
	$(BIN)/python -m mypy

# The test suite (CI runs exactly this: see .ci/run): lint first, then every test.
test: setup system-deps lint
	PATH=$(CURDIR)/$(BIN):$$PATH $(BIN)/python -m pytest -ra

test-fast: setup
	PATH=$(CURDIR)/$(BIN):$$PATH $(BIN)/python -m pytest -ra -m "not slow"
