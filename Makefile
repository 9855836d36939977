# Two commands set everything up on a fresh machine: `make run` and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# torch 2.14.1 / torchvision 0.29.1 are what resolves here; any torch >= 2.4 works.
TORCH_PINS ?= torch==2.14.1 torchvision==0.29.1
ARGS ?=

.PHONY: install run test lint clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q $(TORCH_PINS) || $(BIN)/python -m pip install -q torch torchvision
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $(STAMP)

run: install
	$(BIN)/bench run --methods all --classes 0-9 $(ARGS)

test: install
	$(BIN)/python -m pytest -q tests

lint: install
	$(BIN)/ruff check bench methods reports tests

clean:
	rm -rf $(VENV) results .pytest_cache build *.egg-info
