# make demo   create .venv, get CIFAR-10, short stage-1 run on CIFAR-10-LT (imbalance 100), test table
# make demo-stage2   then retrain its classifier with BALMS (stage 2) and print the test table
# make test   the whole test suite (what CI runs)
# make test-fast   the quick tests: no entry script, rank or signalled process started (under a minute)
# LT_DATA_ROOT points at the folder that holds cifar-10-batches-py/ (default: ./datasets).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
export LT_DATA_ROOT ?= $(CURDIR)/datasets
# On the project's own machines a JPEG copy of CIFAR-10 sits beside the checkout; elsewhere the
# demo downloads the official archive (data.download=true, MD5-checked). SHARED_DATASETS=<dir>
# points a checkout elsewhere (e.g. a CI clone in /tmp) at that copy.
SHARED_DATASETS ?= ../shared/datasets
SHARED_CIFAR := $(SHARED_DATASETS)/make_cifar10.py
DEMO := config/cifar10_lt/demo_stage1.yaml
DEMO2 := config/cifar10_lt/demo_stage2_balms.yaml

.PHONY: env data demo demo-stage2 test test-fast

$(VENV)/.installed: requirements.txt requirements-dev.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -r requirements-dev.txt
	touch $@

env: $(VENV)/.installed

data: env
	@if [ -d "$(LT_DATA_ROOT)/cifar-10-batches-py" ]; then \
		echo "CIFAR-10 found in $(LT_DATA_ROOT)/cifar-10-batches-py"; \
	elif [ -f "$(SHARED_CIFAR)" ]; then \
		$(PY) $(SHARED_CIFAR) "$(LT_DATA_ROOT)"; \
	else \
		echo "no CIFAR-10 in $(LT_DATA_ROOT): the first run downloads it"; \
	fi

demo: data
	$(PY) stage1_train.py --cfg $(DEMO) data.download=true --resume
	$(PY) stage1_train.py --cfg $(DEMO) --test

demo-stage2: data
	$(PY) stage2_classifier.py --cfg $(DEMO2) --resume
	$(PY) stage2_classifier.py --cfg $(DEMO2) --test

# Test processes run side by side (pytest-xdist), a module per process so that its shared fixtures
# are built once; every test and the entry scripts it starts use one thread each.
TEST_WORKERS ?= 2

test: env
	$(PY) -m pytest -n $(TEST_WORKERS) --dist loadscope --durations=20  # the 20 slowest tests, to keep CI short

test-fast: env
	$(PY) -m pytest -n $(TEST_WORKERS) --dist loadscope -m "not slow"
