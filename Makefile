# Two commands do everything on a fresh machine (Python 3.11, pip):
#   make demo   set up .venv and run the whole pipeline on the embedded digits data
#   make test   set up .venv and run the test suite (what CI runs)
VENV ?= .venv
PY := $(VENV)/bin/python
OUT ?= runs/digits

.PHONY: demo test setup

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	touch $@

demo: setup
	$(VENV)/bin/compress run --out $(OUT) --precisions fp32,int8

test: setup
	$(PY) -m pytest -q
