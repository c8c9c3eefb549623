# Benchmarks (commands, not tests): `make bench-features`. Included from the Makefile; needs its
# install target, PY and PYTHON. The Quix Streams peer runs in its own venv (.venv-bench): quixstreams
# pins confluent-kafka<2.13, pydantic<2.14 and pydantic-settings<2.16, below Tide's lock.

BENCH_VENV   := .venv-bench
BENCH_STAMP  := $(BENCH_VENV)/.installed
BENCH_EVENTS ?= 100000
BENCH_REPS   ?= 3
BENCH_ARGS   ?=

.PHONY: bench-venv bench-features

$(BENCH_STAMP): bench/requirements.txt
	@command -v $(PYTHON) >/dev/null || { echo "need $(PYTHON) on PATH"; exit 1; }
	test -x $(BENCH_VENV)/bin/python || $(PYTHON) -m venv $(BENCH_VENV)
	$(BENCH_VENV)/bin/pip install --quiet --disable-pip-version-check -r bench/requirements.txt
	touch $(BENCH_STAMP)

bench-venv: $(BENCH_STAMP)

# Writes out/bench/features.json; `$(PY) -m bench.readme` then updates README.md's benchmark section.
bench-features: install bench-venv
	$(PY) -m bench.features --events $(BENCH_EVENTS) --reps $(BENCH_REPS) $(BENCH_ARGS)
