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

test: $(STAMP)
	$(BIN)/ruff check pgm_drm tests bench notebooks
	$(BIN)/python -m pytest -q -n auto --maxprocesses 4 --doctest-modules pgm_drm tests
	$(BIN)/python -m pytest -q -n auto --maxprocesses 4 --nbmake notebooks

# Every benchmark side by side, then bench/RESULTS.md (QUICK=1: small sizes, < 3 min).
bench: $(STAMP)
	$(BIN)/python bench/run_all.py $(if $(QUICK),--quick,) $(BENCH_ARGS)

clean:
	rm -rf $(VENV) out .pytest_cache
