# dpdm — two commands to start: `make quickstart` (train + sample on MNIST) and `make test`.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# Exact pins for the install step (pyproject keeps ranges). Override on other machines, e.g.
#   make install TORCH_PINS="torch torchvision"
TORCH_PINS ?= torch==2.14.1 torchvision==0.29.1
RUN_DIR ?= runs/quickstart
# Fashion-MNIST's files come from this Debian package. Installing it is machine set-up, so it happens here
# and dpdm itself never runs apt-get. sudo only when not root (containers often have no sudo).
FASHION_MNIST_DEB := dataset-fashion-mnist
SUDO ?= $(if $(filter 0,$(shell id -u)),,sudo)

.PHONY: install data data-mnist fashion-mnist-package data-fashion-mnist-optional quickstart lint test test-slow bench clean-runs help reproduce-mnist reproduce-fmnist reproduce-mnist-fast reproduce-cpu

help:
	@echo "make quickstart  - venv + install + MNIST + DP training (ε=10) + samples  (~$(RUN_DIR))"
	@echo "make test        - venv + install + MNIST (+ Fashion-MNIST if its package installs) + lint (ruff, import layers) + the default test suite"
	@echo "make test-slow   - the long tests (marked slow)"
	@echo "make data        - fetch MNIST and Fashion-MNIST into ./data (apt-get installs $(FASHION_MNIST_DEB) if missing)"
	@echo "make bench       - training-step throughput: non-private vs dpdm DP vs stock Opacus"
	@echo "make reproduce-mnist | reproduce-fmnist - the paper's models at ε = 0.2, 1, 10 → results/<dataset>.md (GPU)"
	@echo "make reproduce-mnist-fast - experiment=mnist_eps10_fast: train + sample + evaluate in ~10 min on a GPU"
	@echo "make reproduce-cpu - the 60-minute CPU presets + non-private controls → results/cpu.md (hours on 2 cores)"

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

# Installs $(FASHION_MNIST_DEB) unless it is there; $(1): how to become root. apt-get install fails on a
# fresh machine whose package lists are still empty, hence the update and retry.
install_fashion_mnist_deb = dpkg -s $(FASHION_MNIST_DEB) >/dev/null 2>&1 || { \
	echo "installing $(FASHION_MNIST_DEB) with apt-get"; $(1) apt-get install -y $(FASHION_MNIST_DEB) \
	|| { $(1) apt-get update && $(1) apt-get install -y $(FASHION_MNIST_DEB); }; }

# Without apt-get at all, dpdm-data falls back to torchvision's download.
fashion-mnist-package:
	@if command -v apt-get >/dev/null 2>&1; then $(call install_fashion_mnist_deb,$(SUDO)); \
	else echo "no apt-get: dpdm-data will try torchvision's download for Fashion-MNIST"; fi

data: install fashion-mnist-package
	$(BIN)/dpdm-data mnist fashion_mnist

# make test: without the package (no rights, no network) the Fashion-MNIST tests skip, so a failed install
# is one warning, not a failed build. sudo -n: never wait for a password; --source debian: no downloads.
data-fashion-mnist-optional: install
	@if ( $(call install_fashion_mnist_deb,$(if $(SUDO),sudo -n)) ) >/dev/null 2>&1; then \
	  $(BIN)/dpdm-data fashion_mnist --source debian; \
	else echo "warning: could not install $(FASHION_MNIST_DEB) (try make fashion-mnist-package); the Fashion-MNIST tests will skip"; fi

quickstart: data-mnist
	$(BIN)/dpdm-train experiment=quickstart hydra.run.dir=$(RUN_DIR)
	$(BIN)/dpdm-sample ckpt=$(RUN_DIR)/checkpoints/last.ckpt n=100 out=$(RUN_DIR)/final_samples overwrite=true
	@echo "run dir: $(RUN_DIR)  (privacy.json, summary.json, samples/, final_samples/grid.png)"

# Style (ruff) and the layers of docs/architecture.md (import-linter), both configured in pyproject.toml.
lint: install
	$(BIN)/ruff check .
	$(BIN)/lint-imports

# pytest exits 5 when it collects no tests; that is not a failure of the suite. One worker per core
# (pytest-xdist), each test file on one worker: a file's module fixtures (a trained run, a sweep) are built once.
test: data-mnist data-fashion-mnist-optional lint
	$(BIN)/python -m pytest -n auto --dist loadfile; rc=$$?; if [ $$rc -eq 5 ]; then echo "no tests collected"; exit 0; fi; exit $$rc

test-slow: data-mnist
	$(BIN)/python -m pytest -m slow; rc=$$?; if [ $$rc -eq 5 ]; then exit 0; fi; exit $$rc

# The paper's tables (docs/experiments.md). Without a GPU dpdm-reproduce refuses with an estimate of the
# time it would take; REPRO_ARGS passes options, e.g. REPRO_ARGS=--dry-run or REPRO_ARGS="--epsilon 10".
reproduce-mnist: data-mnist
	$(BIN)/dpdm-reproduce mnist $(REPRO_ARGS)

reproduce-fmnist: data
	$(BIN)/dpdm-reproduce fmnist $(REPRO_ARGS)

reproduce-mnist-fast: data-mnist
	$(BIN)/dpdm-reproduce mnist-fast $(REPRO_ARGS)

# What a CPU can do (results/cpu.md): each 60-minute preset, its privacy=none control, the downstream
# protocol at a CPU-sized n and learning curves. Resumable: finished runs, samples and curve points are kept.
reproduce-cpu: data
	$(BIN)/dpdm-reproduce cpu $(REPRO_ARGS)

# CPU: tiny U-Net, 32 x K=4, about a minute on an idle 2-core machine; with a GPU: the paper's
# network at 128 x K=32. Results are appended to benchmarks/results/train_step.json.
bench: install
	$(BIN)/python benchmarks/train_step.py $(BENCH_ARGS)

clean-runs:
	rm -rf runs multirun
