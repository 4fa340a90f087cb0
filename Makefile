# Two commands for a fresh machine: `make demo` and `make test`.
# Each creates .venv when absent and (re)installs the requirements when they changed.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
PIP    := $(BIN)/python -m pip

# Demo settings: the recommended CPU recipe (override any: make demo EPOCHS=100 MODEL=...).
DATA       ?=
OUT        ?= demo_output
MODEL      ?= mae_vit_tiny_patch7
INPUT_SIZE ?= 112
EPOCHS     ?= 60
BATCH_SIZE ?= 16
BLR        ?= 1e-3
WARMUP     ?= 5
LORA_RANK  ?= 8
DEVICE     ?= auto

.PHONY: test demo clean-demo help

help:
	@echo "make demo   train + evaluate on the built-in synthetic category (or DATA=ROOT)"
	@echo "make test   run the test suite"

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --upgrade pip

$(VENV)/.installed: requirements.txt | $(BIN)/python
	$(PIP) install -r requirements.txt
	touch $@

$(VENV)/.installed-dev: requirements.txt requirements-dev.txt $(VENV)/.installed
	$(PIP) install -r requirements-dev.txt
	touch $@

test: $(VENV)/.installed-dev
	$(BIN)/python -m pytest

clean-demo:
	rm -rf $(OUT)
