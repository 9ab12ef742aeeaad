# One command each for users and CI; every target installs what it needs first.
#   make run    set up .venv and run the whole workflow on the default config
#   make test   set up .venv and run the test suite (what CI runs)

PYTHON ?= python3
VENV ?= .venv
CORES ?= 2
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install run test lint clean-results

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

run: $(STAMP)
	$(BIN)/snakemake --cores $(CORES)

test: $(STAMP)
	$(BIN)/python -m pytest -q -ra  # -ra: the summary names every skipped test and why (e.g. no SLURM)

lint: $(STAMP)
	$(BIN)/snakemake --lint --workflow-profile none

clean-results:
	rm -rf results .snakemake
