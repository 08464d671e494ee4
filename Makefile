# The README's two commands:  `make embedded`  and  `make test`.
PYTHON ?= python3.11
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: setup embedded test test-fast system-deps clean-results

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

# The test suite (CI runs exactly this: see .ci/run).
test: setup system-deps
	PATH=$(CURDIR)/$(BIN):$$PATH $(BIN)/python -m pytest -ra

test-fast: setup
	PATH=$(CURDIR)/$(BIN):$$PATH $(BIN)/python -m pytest -ra -m "not slow"
