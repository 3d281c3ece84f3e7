# The two commands of the README. Both create .venv on first use.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed

.PHONY: run test lint bench clean

$(STAMP): pyproject.toml
	test -d $(VENV) || $(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

## make run: the main job on the embedded tiny-llava (calibrate, export, rewrite, bundle, generate)
run: $(STAMP)
	$(BIN)/python -m examples.demo --out build/tiny-llava

## make test: lint + the test suite (slow benchmarks excluded), on two pytest-xdist workers; the tests
## sharing one session export run on one worker (xdist groups: tests/conftest.py)
test: $(STAMP)
	$(BIN)/ruff check var_export passes calibration configs tests benchmarks examples
	$(BIN)/python -m pytest -q -n 2 --dist loadgroup

lint: $(STAMP)
	$(BIN)/ruff check var_export passes calibration configs tests benchmarks examples

## make bench: the full benchmark (LLaMA-7B-width slice + tiny-llava), minutes
bench: $(STAMP)
	$(BIN)/python -m benchmarks.run --full --out build/bench

clean:
	rm -rf build .pytest_cache
