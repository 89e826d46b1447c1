# Two commands set everything up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test lint bench clean

$(STAMP): pyproject.toml
	test -d $(VENV) || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/pgm-drm demo --out out/demo

# JAX's persistent compilation cache (keyed on the XLA program, the compiler and its
# flags): the tests and notebooks compile many identical programs in separate
# processes, and each is compiled once per run (from a fresh clone too). No size
# limit: a limit turns on per-entry file locks and a scan of the folder at every
# write (+20% time). It grows only with new programs; `make clean` removes it.
JAX_CACHE := JAX_COMPILATION_CACHE_DIR=$(CURDIR)/.jax_cache \
	JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS=0 \
	JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES=0

test: $(STAMP)
	$(BIN)/ruff check pgm_drm tests bench notebooks
	$(JAX_CACHE) $(BIN)/python -m pytest -q -n auto --maxprocesses 4 --dist worksteal \
		--doctest-modules --nbmake --durations=15 pgm_drm tests notebooks

# Every benchmark side by side, then bench/RESULTS.md (QUICK=1: small sizes, < 3 min).
bench: $(STAMP)
	$(BIN)/python bench/run_all.py $(if $(QUICK),--quick,) $(BENCH_ARGS)

clean:
	rm -rf $(VENV) out .pytest_cache .jax_cache
