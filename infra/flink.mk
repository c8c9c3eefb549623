# Flink: the scale-out feature pipeline (features/flink/job.py) in its own venv, .venv-flink: PyFlink pins
# numpy, pandas, pyarrow and redis below the main venv's. Included by the Makefile. docs/2026-11-21-flink.md
#   make flink-venv     the venv: apache-flink 2.3.0 + features/flink/requirements.txt + Tide (--no-deps)
#   make test-flink     parity tests on a local mini-cluster against a private redis-server (not in `make test`)
#   make flink-image    the compose image tide-flink:0.1.0 (needs a Docker engine and Maven Central)
#   make flink-up       JobManager + TaskManager in docker compose (profile `flink`)
#   make flink-submit   stops the `features` service and submits the job to the compose cluster

FLINK_PYTHON ?= python3.11
FLINK_VENV   := .venv-flink
FLINK_PY     := $(FLINK_VENV)/bin/python
FLINK_STAMP  := $(FLINK_VENV)/.installed
FLINK_IMAGE  := tide-flink:0.1.0
FLINK_PIP    := $(FLINK_PY) -m pip install --quiet --disable-pip-version-check

.PHONY: flink-venv test-flink flink-image flink-up flink-submit

$(FLINK_STAMP): features/flink/requirements.txt pyproject.toml
	@command -v $(FLINK_PYTHON) >/dev/null || { echo "need $(FLINK_PYTHON) on PATH"; exit 1; }
	test -x $(FLINK_PY) || $(FLINK_PYTHON) -m venv $(FLINK_VENV)
	$(FLINK_PIP) -r features/flink/requirements.txt
	$(FLINK_PIP) --no-deps -e .
	$(FLINK_PY) -c "import pyflink, features.store, features.tiles, schemas.codec, features.flink.job"
	touch $@

flink-venv: $(FLINK_STAMP)

# --confcutdir: tests/conftest.py needs the main venv's service stack; tests/flink has its own fixtures.
test-flink: $(FLINK_STAMP)
	$(FLINK_PY) -c "import pyflink"
	$(FLINK_PY) -m pytest -q --confcutdir tests/flink tests/flink

flink-image:
	docker build -f infra/docker/flink.Dockerfile -t $(FLINK_IMAGE) .

flink-up:
	docker compose --profile flink up -d

# The Flink job and the `tide features` processor must not both write one namespace (each would count every event).
flink-submit:
	docker compose stop features
	docker compose --profile flink --profile flink-submit run --rm flink-submit
