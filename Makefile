# The README's two commands: `make test` and `make demo`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# no pip cache: the CUDA build of torch alone is several GB, and CI disks are not always roomy
PIP := $(PY) -m pip --no-cache-dir
# torch/torchvision are pinned to builds that install offline on CPU machines; any pair inside
# the ranges of pyproject.toml works for users.
TORCH_PINS ?= torch==2.14.1 torchvision==0.29.1

.PHONY: venv test demo bench clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q $(TORCH_PINS)
	$(PIP) install -q $(TORCH_PINS) -e '.[test]'
	touch $@

venv: $(VENV)/.installed

test: venv
	$(PY) -m pytest -q

demo: venv
	$(PY) -m ivcprune.demo

bench: venv
	$(VENV)/bin/ivcprune bench --model random:qwen2.5-vl-7b --set num_hidden_layers=8 --image-tokens 1024

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info .pytest_cache
