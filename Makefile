# ketchup_jax — every target bootstraps .venv from the pinned requirements when needed.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
PYTEST_ARGS ?=

.PHONY: install test demo bench clean

$(STAMP): requirements.txt requirements-test.txt requirements-real.txt \
          requirements-nodeps.txt constraints.txt pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet pip==26.3
	$(PY) -m pip install --quiet -c constraints.txt -r requirements-test.txt
	$(PY) -m pip install --quiet --no-deps -c constraints.txt -r requirements-nodeps.txt
	$(PY) -m pip install --quiet --no-deps --no-build-isolation -e .
	@touch $(STAMP)

install: $(STAMP)

# pytest exits 5 when it collects nothing; make treats that as a failure like any other.
# Two worker processes, each taking whole test files (module fixtures and
# the compiled shapes they share stay in one process): XLA compiles on one
# core at a time, so one process left the second core mostly idle.
TEST_WORKERS ?= 2
test: $(STAMP)
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile --durations=15 tests $(PYTEST_ARGS)

demo: $(STAMP)
	$(PY) -m ketchup_jax.main --config=configs/demo.py --workdir=runs/demo

# Four benchmarks against numpy / PyTorch + transformers; tables on stdout,
# JSON in benchmarks/results/. Measured on a 2-core CPU from a fresh clone,
# before the decoder-only rows: 52.5 min, of which rollout (T5 grid, 2
# repetitions) 42.5 min and the .venv build 5.8 min. rollout and rl_step now
# also run a decoder-only (Qwen2-layout) shape / pair, rollout the
# pre-refactor T5 sampler next to today's, and rl_step 5 repetitions per
# pair; the whole target has not been timed since (benchmarks/NOTES.md).
# BENCH_ARGS passes flags to every script, e.g. BENCH_ARGS=--device=gpu or
# BENCH_ARGS=--quick.
BENCH_ARGS ?=
bench: $(STAMP)
	$(PY) -m benchmarks.returns $(BENCH_ARGS)
	$(PY) -m benchmarks.rollout $(BENCH_ARGS)
	$(PY) -m benchmarks.rl_step $(BENCH_ARGS)
	$(PY) -m benchmarks.mfu $(BENCH_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache
