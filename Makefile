# Two commands do all set-up on a fresh machine:  `make demo` (the main job) and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
SHARED ?= ../shared
# The local JPEG copy of CIFAR-10 and its pretrained teacher when they sit beside the checkout;
# otherwise CIFAR-10 is downloaded through torchvision and a teacher is trained first.
DATA_DIR ?= $(wildcard $(SHARED)/data/cifar10-jpeg)
TEACHER ?= $(wildcard $(SHARED)/models/mobilenetv2_cifar10jpeg_teacher.pt)
DATA_ARGS := $(if $(DATA_DIR),--dataset folder --data-dir $(DATA_DIR) --data-label "CIFAR-10 (JPEG q75 copy)",--dataset cifar10)
DEMO_DIR ?= runs/demo

.PHONY: setup demo test lint clean

$(BIN)/kdsearch: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.14.1 torchvision==0.29.1
	$(BIN)/pip install -q -e '.[test,postgres]'
	touch $@

setup: $(BIN)/kdsearch

# One KD+IG training of the paper's student on a small CPU budget (about 5 minutes on 2 cores).
demo: setup
	$(if $(TEACHER),,$(BIN)/kdsearch teacher train $(DATA_ARGS) --epochs 3 --out $(DEMO_DIR)/teacher.pt)
	$(BIN)/kdsearch train $(DATA_ARGS) --teacher-checkpoint $(or $(TEACHER),$(DEMO_DIR)/teacher.pt) \
		--train-subset 2000 --val-size 1000 --epochs 2 --t 2.5 --alpha 0.01 --p 0.1 --run-dir $(DEMO_DIR)/student

test: setup
	$(BIN)/ruff check kdsearch tests bench
	$(BIN)/python -m pytest tests

lint: setup
	$(BIN)/ruff check kdsearch tests bench
	$(BIN)/ruff format --check kdsearch tests bench

clean:
	rm -rf runs .pytest_cache
