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

# 3 pruning steps to 20% of the MACs, 6 retraining epochs each (compress defaults: 40%, 4): on digits the
# last step's int8 stays within 1 point of step 0 and runs >= 4x faster (bench/results/cpu-2core-int8/)
demo: setup
	$(VENV)/bin/compress run --out $(OUT) --precisions fp32,int8 --prune-steps 3 --target-macs 0.2 --retrain-epochs 6

test: setup
	$(PY) -m pytest -q
