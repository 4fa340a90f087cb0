# Two commands for a fresh machine: `make demo` and `make test`.
# Each creates .venv when absent and (re)installs the requirements when they changed.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
PIP    := $(BIN)/python -m pip

# Demo settings: the recommended CPU recipe (override any: make demo EPOCHS=100 MODEL=...).
# DATA=ROOT runs the recipe on your own category root (raw or prepared MVTec layout).
DATA       ?=
OUT        ?= demo_output
MODEL      ?= mae_vit_tiny_patch7
INPUT_SIZE ?= 112
EPOCHS     ?= 50
BATCH_SIZE ?= 8
LR         ?= 1.5e-3
WARMUP     ?= 4
MASK_RATIO ?= 0.25
DEVICE     ?= auto
# The shipped procedural prior (README, "A pretrained prior"): it beat training from scratch on
# average over three kinds of data. It exists for the tiny model only; PRETRAINED= trains from scratch.
PRIOR      := weights/mae_vit_tiny_patch7_procedural_112.pth
PRETRAINED ?= $(if $(filter mae_vit_tiny_patch7,$(MODEL)),$(PRIOR),)
DEMO_DATA  := $(if $(DATA),$(DATA),$(OUT)/data/capsule_prepared)

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

# The tests also cover the export (scripts/export.py, predict_onnx.py): requirements-export.txt too.
$(VENV)/.installed-dev: requirements.txt requirements-dev.txt requirements-export.txt $(VENV)/.installed
	$(PIP) install -r requirements-dev.txt -r requirements-export.txt
	touch $@

test: $(VENV)/.installed-dev
	$(BIN)/python -m pytest

demo: $(VENV)/.installed
ifeq ($(DATA),)
	$(BIN)/python scripts/make_synthetic_mvtec.py --dst $(OUT)/data --kind capsule --seed 0
	$(BIN)/python scripts/prepare_mvtec.py --src $(OUT)/data/capsule_synth --dst $(DEMO_DATA) --overwrite
endif
	@test -d "$(DEMO_DATA)/test" || { echo "error: $(DEMO_DATA) has no test/ folder, so the demo cannot evaluate \
	it; train with main_train.py and score your images with main_infer.py --images (README)" >&2; exit 2; }
	$(BIN)/python main_train.py --data_path $(DEMO_DATA) --output_dir $(OUT)/train --model $(MODEL) \
	    --input_size $(INPUT_SIZE) --epochs $(EPOCHS) --batch_size $(BATCH_SIZE) --lr $(LR) \
	    --warmup_epochs $(WARMUP) --train_mask_ratio $(MASK_RATIO) --save_every 0 --num_workers 0 \
	    --print_freq 100 --device $(DEVICE) $(if $(PRETRAINED),--pretrained $(PRETRAINED),)
	$(BIN)/python main_infer.py --checkpoint $(OUT)/train/checkpoint-last.pth --data_path $(DEMO_DATA) \
	    --output_dir $(OUT)/eval --overwrite --device $(DEVICE)

clean-demo:
	rm -rf $(OUT)
