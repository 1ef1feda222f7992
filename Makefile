# Two commands do all set-up on a fresh machine:  `make demo` (the main job) and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
SHARED ?= ../shared
# The local JPEG copy of CIFAR-10 and its pretrained teacher when they sit beside the checkout;
# otherwise CIFAR-10 is downloaded through torchvision and a teacher is trained first.
DATA_DIR ?= $(wildcard $(SHARED)/data/cifar10-jpeg)
TEACHER ?= $(wildcard $(SHARED)/models/mobilenetv2_cifar10jpeg_teacher.pt)
DEMO_DIR ?= runs/demo
DATA_ARGS := $(if $(DATA_DIR),--dataset folder --data-dir $(DATA_DIR) --data-label "CIFAR-10 (JPEG q75 copy)",--dataset cifar10 --data-dir $(DEMO_DIR)/data)

.PHONY: setup demo test lint clean

$(BIN)/kdsearch: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.14.1 torchvision==0.29.1
	$(BIN)/pip install -q -e '.[test,postgres]'
	touch $@

setup: $(BIN)/kdsearch

# The main job (studies/demo.yaml, 9-10 minutes on 2 cores): the baseline/KD/KD+IG ablation and a small
# accuracy x latency Pareto study of students started from the teacher, the export of the front's
# fastest student within 1 point of its best accuracy, both reports, and a summary of them, in runs/demo/.
# Without ../shared, CIFAR-10 is downloaded and a short teacher is trained first.
DEMO_ARGS := --study studies/demo.yaml --workdir $(DEMO_DIR) \
	$(if $(DATA_DIR),--data-dir $(DATA_DIR),--set train.data.dataset=cifar10 --set train.data.data_dir=$(DEMO_DIR)/data --set train.data.label=CIFAR-10) \
	--teacher-checkpoint $(or $(TEACHER),$(DEMO_DIR)/teacher.pt)
REPORT_ARGS := --workdir $(DEMO_DIR) $(if $(DATA_DIR),--data-dir $(DATA_DIR)) --teacher-checkpoint $(or $(TEACHER),$(DEMO_DIR)/teacher.pt)
demo: setup
	mkdir -p $(DEMO_DIR)
	$(if $(TEACHER),,$(BIN)/kdsearch teacher train $(DATA_ARGS) --epochs 3 --out $(DEMO_DIR)/teacher.pt)
	$(BIN)/kdsearch ablate $(DEMO_ARGS) --study-name demo-ablation
	$(BIN)/kdsearch study pareto $(DEMO_ARGS) --study-name demo-pareto
	rm -rf $(DEMO_DIR)/export
	$(BIN)/kdsearch export --study demo-pareto --within 1 --workdir $(DEMO_DIR) $(if $(DATA_DIR),--data-dir $(DATA_DIR)) --out $(DEMO_DIR)/export
	$(BIN)/kdsearch report --ablation demo-ablation --out $(DEMO_DIR)/report-ablation $(REPORT_ARGS)
	$(BIN)/kdsearch report --study demo-pareto --out $(DEMO_DIR)/report-pareto $(REPORT_ARGS)
	@$(BIN)/kdsearch summary --workdir $(DEMO_DIR)

test: setup
	$(BIN)/ruff check kdsearch tests bench
	$(BIN)/python -m pytest tests

lint: setup
	$(BIN)/ruff check kdsearch tests bench
	$(BIN)/ruff format --check kdsearch tests bench

clean:
	rm -rf runs .pytest_cache
