# The README's two commands: `make test` and `make demo`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# no pip cache: the CUDA build of torch alone is several GB, and CI disks are not always roomy
PIP := $(PY) -m pip --no-cache-dir
# torch/torchvision are pinned to builds that install offline on CPU machines; any pair inside
# the ranges of pyproject.toml works for users.
TORCH_PINS ?= torch==2.14.1 torchvision==0.29.1

.PHONY: venv test lint demo bench clean

# the package and what the demo needs
$(VENV)/.installed-core: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q $(TORCH_PINS)
	$(PIP) install -q $(TORCH_PINS) -e .
	touch $@

# ...plus the test extras (pytest, hypothesis, ruff, lmms-eval, accelerate)
$(VENV)/.installed: $(VENV)/.installed-core
	$(PIP) install -q $(TORCH_PINS) -e '.[test]'
	touch $@

venv: $(VENV)/.installed

lint: venv
	$(VENV)/bin/ruff check src tests scripts

test: lint
	$(PY) -m pytest -q

demo: $(VENV)/.installed-core
	$(PY) -m ivcprune.demo

bench: $(VENV)/.installed-core
	$(VENV)/bin/ivcprune bench --model random:qwen2.5-vl-7b --set num_hidden_layers=8 --image-tokens 1024

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info .pytest_cache
