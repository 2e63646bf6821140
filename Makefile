# `make run` / `make test` install whatever is missing, then run. ARGS / PYTEST_ARGS pass extra arguments:
#   make run ARGS="method=rtn_minmax quant=w2a2"      make test PYTEST_ARGS="-m slow"
PYTHON ?= python3
FMNIST_DIR := /usr/share/datasets/fashion-mnist
export WANDB_MODE ?= offline

.PHONY: run test test-fast wheel-test deps data lint gpu-carry

run: deps data
	$(PYTHON) run.py $(ARGS)

test: deps data
	$(PYTHON) -m pytest $(PYTEST_ARGS)

# the edit-test loop: no pipeline runs, subprocesses or network zoos (tests marked heavy), a few minutes
test-fast: deps data
	$(PYTHON) -m pytest -m "not slow and not heavy" $(PYTEST_ARGS)

# pip dependencies at the exact versions of constraints.txt (torch/torchvision as a matched pair of PyPI wheels,
# lightning, hydra, wandb, scipy, pytest, the export and launchers extras ...) and pdq itself in editable mode,
# unless scripts/check_env.py finds them all installed already.
deps:
	@$(PYTHON) scripts/check_env.py || $(PYTHON) -m pip install -c constraints.txt -e ".[dev]"

# the wheel as a user gets it: built, installed with --no-deps into a fresh virtual environment that sees this
# machine's packages, and run from a folder outside the checkout (`pdq --help`, a `pdq` run, `pdq.load`, the
# README's Python example): tests/run/test_wheel.py, which the default suite runs too
wheel-test: deps data
	$(PYTHON) -m pytest tests/run/test_wheel.py $(PYTEST_ARGS)

# the real Fashion-MNIST IDX files from Debian's package, when apt is usable and they are missing
data:
	@if [ ! -f $(FMNIST_DIR)/train-images-idx3-ubyte.gz ] && [ ! -f $(FMNIST_DIR)/train-images-idx3-ubyte ]; then \
	  if command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist; \
	  elif command -v apt-get >/dev/null 2>&1 && command -v sudo >/dev/null 2>&1; then \
	    sudo apt-get update -qq && sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist; \
	  else \
	    echo "note: $(FMNIST_DIR) is missing and apt is not usable; pass data.root=PATH to the IDX files"; \
	  fi; \
	fi

lint: deps
	$(PYTHON) -m ruff check .

# what benchmarks/gpu_check.sh needs on a GPU machine without a package index: the wheels of the config
# packages and the Fashion-MNIST files, in outputs/gpu (git-ignored; carry it with the working tree)
gpu-carry: data
	$(PYTHON) -m pip wheel -q --no-deps -c constraints.txt -w outputs/gpu/wheels hydra-core omegaconf antlr4-python3-runtime==4.9.3
	mkdir -p outputs/gpu/fashion-mnist && cp $(FMNIST_DIR)/*.gz outputs/gpu/fashion-mnist/
