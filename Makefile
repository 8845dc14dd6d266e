# Two commands do everything on a fresh machine (Python 3.11, pip):
#   make demo   set up .venv and run the whole pipeline on the embedded digits data
#   make test   set up .venv and run the test suite (what CI runs)
VENV ?= .venv
PY := $(VENV)/bin/python
OUT ?= runs/digits
# make image RUN=DIR [STEP=K] [VARIANT=cpu|gpu] [BASE_IMAGE=NAME] [VOTING=soft|hard]
VARIANT ?= cpu
BASE_IMAGE ?= resnet-classifier-base:bookworm
DEFAULT_BASE_IMAGE := resnet-classifier-base:bookworm

.PHONY: demo test setup base-image image

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

# A base image from Debian packages (debootstrap + docker import) for hosts that cannot pull one
base-image:
	deploy/base-image.sh $(BASE_IMAGE)

# resnet-classifier:$(VARIANT) with the run's step (or an ensemble's members: RUN=DIR:K,DIR:K) inside
image: setup
	@test -n "$(RUN)" || { echo "make image: give RUN=DIR (a run directory; DIR:STEP, or several comma-separated for an ensemble)" >&2; exit 2; }
	deploy/docker-engine.sh
	@if [ "$(BASE_IMAGE)" = "$(DEFAULT_BASE_IMAGE)" ] && ! /usr/bin/docker image inspect $(BASE_IMAGE) >/dev/null 2>&1; then \
		$(MAKE) --no-print-directory base-image; fi
	$(PY) -m deploy.image --run '$(RUN)' $(if $(STEP),--step $(STEP)) --variant $(VARIANT) --base-image $(BASE_IMAGE) $(if $(VOTING),--voting $(VOTING))
