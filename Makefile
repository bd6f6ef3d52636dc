# Quickstart: `make train` trains the built-in default; `make test` runs the tests.
# Both create .venv/ at the repo root when it is missing.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: test-slow train test bench gpu-check clean

$(BIN)/chunkflow: pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c constraints.txt -e '.[test]'
	touch $@

train: $(BIN)/chunkflow
	$(BIN)/chunkflow train

test: $(BIN)/chunkflow
	$(BIN)/python -m pytest -q

# The tests marked slow (each has a faster test of the same property in `make test`).
test-slow: $(BIN)/chunkflow
	$(BIN)/python -m pytest -q -m slow

bench: $(BIN)/chunkflow
	$(BIN)/chunkflow bench

# On a GPU machine, with its own python3 and torch (no venv, nothing installed): the gpu tests,
# a bf16 step against plain training, peak memory at 32K/128K (less the KV state: flat; against
# the memory model), tokens/s and MFU against the ideal and HF; saves
# benchmarks/results/gpu_check-<gpu>-<date>.md. At most 8 minutes on one 80 GB H100 (--budget-s
# skips, with a row, what would not fit).
gpu-check:
	PYTHONPATH=. python3 benchmarks/gpu_check.py

clean:
	rm -rf $(VENV) build *.egg-info
