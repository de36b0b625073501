# dpdm — two commands to start: `make quickstart` (train + sample on MNIST) and `make test`.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# Exact pins for the install step (pyproject keeps ranges). Override on other machines, e.g.
#   make install TORCH_PINS="torch torchvision"
TORCH_PINS ?= torch==2.14.1 torchvision==0.29.1
RUN_DIR ?= runs/quickstart

.PHONY: install data data-mnist quickstart test test-slow clean-runs help

help:
	@echo "make quickstart  - venv + install + MNIST + DP training (ε=10) + samples  (~$(RUN_DIR))"
	@echo "make test        - venv + install + MNIST + the default test suite"
	@echo "make test-slow   - the long tests (marked slow)"
	@echo "make data        - fetch MNIST and Fashion-MNIST into ./data"

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

install: $(VENV)/.installed
$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q $(TORCH_PINS)
	$(BIN)/python -m pip install -q -e ".[test]"
	touch $@

data-mnist: install
	$(BIN)/dpdm-data mnist

data: install
	$(BIN)/dpdm-data mnist fashion_mnist

quickstart: data-mnist
	$(BIN)/dpdm-train experiment=quickstart hydra.run.dir=$(RUN_DIR)
	$(BIN)/dpdm-sample ckpt=$(RUN_DIR)/checkpoints/last.ckpt n=100 out=$(RUN_DIR)/final_samples overwrite=true
	@echo "run dir: $(RUN_DIR)  (privacy.json, summary.json, samples/, final_samples/grid.png)"

# pytest exits 5 when it collects no tests; that is not a failure of the suite.
test: data-mnist
	$(BIN)/python -m pytest; rc=$$?; if [ $$rc -eq 5 ]; then echo "no tests collected"; exit 0; fi; exit $$rc

test-slow: data-mnist
	$(BIN)/python -m pytest -m slow; rc=$$?; if [ $$rc -eq 5 ]; then exit 0; fi; exit $$rc

clean-runs:
	rm -rf runs multirun
