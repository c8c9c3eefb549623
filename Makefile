# Tide: `make demo` runs the whole loop on an embedded broker and Redis; `make test` runs the tests.
# Both create .venv and install the pinned dependencies first. GPU nodes: `make install EXTRA=gpu`.

PYTHON ?= python3.11
VENV   := .venv
PY     := $(VENV)/bin/python
EXTRA  ?= cpu
STAMP  := $(VENV)/.installed-$(EXTRA)

.PHONY: install demo test test-unit test-integration lint fmt clean

$(STAMP): pyproject.toml requirements.lock
	@command -v $(PYTHON) >/dev/null || { echo "need $(PYTHON) on PATH"; exit 1; }
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -c requirements.lock -e ".[$(EXTRA),dev]"
	rm -f $(VENV)/.installed-*
	touch $(STAMP)

install: $(STAMP)

demo: install
	$(VENV)/bin/tide demo --project examples/fraud --compare

test: install
	$(PY) -m pytest -q

test-unit: install
	$(PY) -m pytest -q tests/unit

test-integration: install
	$(PY) -m pytest -q -m "integration or e2e"

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy
	$(VENV)/bin/lint-imports

fmt: install
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

clean:
	rm -rf $(VENV) out .tide .pytest_cache .mypy_cache .ruff_cache

include infra/flink.mk
include infra/bench.mk
