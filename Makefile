# Two commands for a fresh machine: `make demo` and `make test`.
# Each creates .venv when absent and (re)installs the requirements when they changed.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
PIP    := $(BIN)/python -m pip

# Demo settings (override any: make demo EPOCHS=100 MODEL=...). RECIPE=auto takes the GPU recipe when
# PyTorch in .venv sees a CUDA GPU (and DEVICE is not cpu), else the CPU recipe; RECIPE=cpu|gpu picks one.
# DATA=ROOT runs the recipe on your own category root (raw or prepared MVTec layout).
RECIPE     ?= auto
DATA       ?=
OUT        ?= demo_output
MODEL      ?= mae_vit_tiny_patch7
MASK_RATIO ?= 0.25
DEVICE     ?= auto
# HEAD=1 also trains the discriminative head on the finished MAE (main_train_head.py) and scores with it
# where the held-out evidence chose it; HEAD=0 skips it.
HEAD       ?= 1
ifeq ($(RECIPE),gpu)
# The GPU recipe (docs/GPU.md): 224 px, 4x the batch, 10x the epochs; the images stay on the GPU.
INPUT_SIZE ?= 224
EPOCHS     ?= 500
BATCH_SIZE ?= 32
LR         ?= 3e-3
WARMUP     ?= 20
HEAD_STEPS ?= 1500
HEAD_BATCH ?= 16
else
# The CPU recipe.
INPUT_SIZE ?= 112
EPOCHS     ?= 50
BATCH_SIZE ?= 8
LR         ?= 1.5e-3
WARMUP     ?= 4
HEAD_STEPS ?= 300
HEAD_BATCH ?= 8
endif
# Prints gpu or cpu: what RECIPE=auto takes.
CUDA_CHECK ?= $(BIN)/python -c "import torch; print('gpu' if torch.cuda.is_available() else 'cpu')"
AUTO_RECIPE = $(if $(filter cpu,$(DEVICE)),cpu,$$($(CUDA_CHECK) 2>/dev/null || echo cpu))
# The shipped procedural prior (README, "A pretrained prior"): it beat training from scratch on
# average over three kinds of data. It exists for the tiny model only; PRETRAINED= trains from scratch.
PRIOR      := weights/mae_vit_tiny_patch7_procedural_112.pth
PRETRAINED ?= $(if $(filter mae_vit_tiny_patch7,$(MODEL)),$(PRIOR),)
DEMO_DATA  := $(if $(DATA),$(DATA),$(OUT)/data/capsule_prepared)

.PHONY: test demo demo-run clean-demo help

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

# The recipe is chosen once .venv exists (its PyTorch tells whether there is a GPU), then demo-run runs it.
demo: $(VENV)/.installed
	@$(MAKE) --no-print-directory demo-run RECIPE=$(if $(filter auto,$(RECIPE)),$(AUTO_RECIPE),$(RECIPE))

demo-run:
	@echo "make demo: the $(RECIPE) recipe ($(MODEL), $(INPUT_SIZE) px, batch $(BATCH_SIZE), $(EPOCHS) epochs$(if \
	$(filter 1,$(HEAD)),; head $(HEAD_STEPS) steps,))"
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
ifeq ($(HEAD),1)
	$(BIN)/python main_train_head.py --checkpoint $(OUT)/train/checkpoint-last.pth --data_path $(DEMO_DATA) \
	    --steps $(HEAD_STEPS) --batch_size $(HEAD_BATCH) --overwrite --device $(DEVICE)
endif
	$(BIN)/python main_infer.py --checkpoint $(OUT)/train/$(if $(filter 1,$(HEAD)),checkpoint-head.pth,checkpoint-last.pth) \
	    --data_path $(DEMO_DATA) --output_dir $(OUT)/eval --overwrite --device $(DEVICE)

clean-demo:
	rm -rf $(OUT)
