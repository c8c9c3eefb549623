# Benchmarks (commands, not tests): `make bench-features`, `make bench-serving`, `make bench-learn`,
# `make bench-drift`, `make bench-canary`. Included from the
# Makefile; needs its install target, PY and PYTHON. The Quix Streams peer runs in its own venv
# (.venv-bench): quixstreams pins confluent-kafka<2.13, pydantic<2.14 and pydantic-settings<2.16, below
# Tide's lock. The Feast peer runs in .venv-feast: feast pins redis-py<8, below Tide's lock.

BENCH_VENV   := .venv-bench
BENCH_STAMP  := $(BENCH_VENV)/.installed
BENCH_EVENTS ?= 100000
BENCH_REPS   ?= 3
BENCH_ARGS   ?=
BENCH_LEARN_EXAMPLES ?= 20000
BENCH_SEEDS  ?= 10

FEAST_VENV   := .venv-feast
FEAST_STAMP  := $(FEAST_VENV)/.installed

.PHONY: bench-venv bench-features bench-feast-venv bench-wrk bench-serving bench-learn bench-drift bench-canary

$(BENCH_STAMP): bench/requirements.txt
	@command -v $(PYTHON) >/dev/null || { echo "need $(PYTHON) on PATH"; exit 1; }
	test -x $(BENCH_VENV)/bin/python || $(PYTHON) -m venv $(BENCH_VENV)
	$(BENCH_VENV)/bin/pip install --quiet --disable-pip-version-check -r bench/requirements.txt
	touch $(BENCH_STAMP)

bench-venv: $(BENCH_STAMP)

# Writes out/bench/features.json; `$(PY) -m bench.readme` then updates README.md's benchmark section.
bench-features: install bench-venv
	$(PY) -m bench.features --events $(BENCH_EVENTS) --reps $(BENCH_REPS) $(BENCH_ARGS)

$(FEAST_STAMP): bench/requirements-feast.txt
	@command -v $(PYTHON) >/dev/null || { echo "need $(PYTHON) on PATH"; exit 1; }
	test -x $(FEAST_VENV)/bin/python || $(PYTHON) -m venv $(FEAST_VENV)
	$(FEAST_VENV)/bin/pip install --quiet --disable-pip-version-check -r bench/requirements-feast.txt
	touch $(FEAST_STAMP)

bench-feast-venv: $(FEAST_STAMP)

# wrk (the load generator) from the distribution when it is missing: Debian's build links LuaJIT, whose
# ffi the load script uses for a monotonic clock.
bench-wrk:
	@command -v wrk >/dev/null || { \
	  if [ "$$(id -u)" = 0 ]; then apt-get update -qq && apt-get install -y -qq wrk; \
	  else sudo apt-get update -qq && sudo apt-get install -y -qq wrk; fi; }
	@wrk --version 2>&1 | head -1

# Writes out/bench/serving.json; `$(PY) -m bench.readme` then updates README.md's benchmark section.
# py-spy (for the profile of tide serve) comes from .venv-bench.
bench-serving: install bench-venv bench-feast-venv bench-wrk
	$(PY) -m bench.serving --reps $(BENCH_REPS) $(BENCH_ARGS)

# The online learner inside Tide's trainer beside bare river (same stream, same factory, same order):
# writes out/bench/learn.json (tide_per_s, river_per_s, identical). Needs only Tide's own venv.
bench-learn: install
	$(PY) -m bench.learn --examples $(BENCH_LEARN_EXAMPLES) --reps $(BENCH_REPS) $(BENCH_ARGS)

# Tide's drift monitors and concept-drift detectors on streams with known change points (river's synthetic
# generators and the examples' generators, BENCH_SEEDS seeds each) beside river's ADWIN alone: detection
# delay in records and false alarms per 100k records. Writes out/bench/drift.json. Peers (Evidently) go in
# their own venv, best effort: a failed install is recorded in the JSON, not a failed target. Evidently's
# default drift tests run there (bench/drift_evidently.py, a subprocess) on the same input streams, windows
# and checks as Tide's input-drift tests.
DRIFT_VENV := .venv-drift
bench-drift: install
	@test -x $(DRIFT_VENV)/bin/python || $(PYTHON) -m venv $(DRIFT_VENV)
	-timeout 600 $(DRIFT_VENV)/bin/pip install -q -r bench/requirements-drift.txt
	$(PY) -m bench.drift --seeds $(BENCH_SEEDS) $(BENCH_ARGS)

# The canary judge on simulated canaries better, equal and worse by stated effects (many seeds) beside a
# fixed-horizon test: false promotion / rollback rates, power, labels to decide. Writes out/bench/canary.json.
bench-canary: install
	$(PY) -m bench.canary --seeds $(BENCH_SEEDS) $(BENCH_ARGS)
