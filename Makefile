# `make test` and `make demo` create .venv when it is missing, install casify into it and run.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# torch 2.14.1 / torchvision 0.29.1 come from the machine's local wheel cache; pyproject only states a range.
TORCH_PIN ?= torch==2.14.1 torchvision==0.29.1

.PHONY: venv test demo clean

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -c "import torch, torchvision" 2>/dev/null || $(PY) -m pip install --quiet $(TORCH_PIN)
	$(PY) -m pip install --quiet -e ".[test]"
	touch $@

venv: $(VENV)/.installed

test: $(VENV)/.installed
	$(PY) -m pytest -q

demo: $(VENV)/.installed
	$(PY) -m casify.demo

clean:
	rm -rf $(VENV) .pytest_cache demo_output
