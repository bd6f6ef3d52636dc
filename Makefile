# Quickstart: `make train` trains the built-in default; `make test` runs the tests.
# Both create .venv/ at the repo root when it is missing.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: train test bench clean

$(BIN)/chunkflow: pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c constraints.txt -e '.[test]'
	touch $@

train: $(BIN)/chunkflow
	$(BIN)/chunkflow train

test: $(BIN)/chunkflow
	$(BIN)/python -m pytest -q

bench: $(BIN)/chunkflow
	$(BIN)/chunkflow bench

clean:
	rm -rf $(VENV) build *.egg-info
