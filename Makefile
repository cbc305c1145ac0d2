# make demo: distil the embedded student from the embedded teacher; make test: lint and tests.
# Each target creates .venv and installs what it needs on first use.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test lint zoo clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	# torch first, pinned: on this project's GPU-less machines 2.13.0 is the CPU build on their disk
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/opd demo

test: $(STAMP)
	$(BIN)/ruff check src tests bench
	$(BIN)/pytest -q

lint: $(STAMP)
	$(BIN)/ruff check src tests bench

zoo: $(STAMP)
	$(BIN)/opd zoo build

clean:
	rm -rf $(VENV) runs .pytest_cache .ruff_cache
