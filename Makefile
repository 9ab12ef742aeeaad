# One command each for users and CI; every target installs what it needs first.
#   make run    set up .venv and run the whole workflow on the default config
#   make test   set up .venv and run the test suite (what CI runs)
#   make install-gpu  the same .venv with GPU FAISS (faiss-gpu) in place of faiss-cpu

PYTHON ?= python3
VENV ?= .venv
CORES ?= 2
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install install-gpu run test lint clean-results

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

# faiss-cpu and faiss-gpu both install the module `faiss`: uninstall both (either one's uninstall deletes the
# shared files), then put faiss-gpu back alone. The last line prints which build `import faiss` now finds.
install-gpu: $(STAMP)
	$(BIN)/python -m pip install --quiet -e '.[gpu]'
	$(BIN)/python -m pip uninstall --quiet -y faiss-cpu faiss-gpu
	$(BIN)/python -m pip install --quiet --no-deps 'faiss-gpu>=1.14.3'
	$(BIN)/python -c "from bismap.stm.clustering import faiss_build; print(faiss_build())"

run: $(STAMP)
	$(BIN)/snakemake --cores $(CORES)

test: $(STAMP)
	$(BIN)/python -m pytest -q -ra  # -ra: the summary names every skipped test and why (e.g. no SLURM)

lint: $(STAMP)
	$(BIN)/snakemake --lint --workflow-profile none

clean-results:
	rm -rf results .snakemake
