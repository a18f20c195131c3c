# segsweep: `make demo` runs the quickstart on the embedded dataset; `make test` runs the tests.
# Both set up .venv first (idempotent: a second `make install` returns at once).

SHELL := /bin/bash
PYTHON ?= python3.11
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# Deterministic, quiet CPU runs: two cores, no oversubscription between torch and workers.
export OMP_NUM_THREADS ?= 2
export RAY_DEDUP_LOGS ?= 0
export PYTHONWARNINGS ?= ignore

.PHONY: install demo test test-fast test-cluster lint dashboard clean browser postgres lock bench-gpu

install: $(STAMP)

$(STAMP): pyproject.toml requirements.lock
	@command -v $(PYTHON) >/dev/null || { echo "error: $(PYTHON) not found (segsweep needs Python 3.11)"; exit 2; }
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade "pip>=24"
	$(PY) -m pip install --quiet -r requirements.lock
	$(PY) -m pip install --quiet --no-deps --no-build-isolation -e .
	touch $(STAMP)

# The quickstart sweep; a second `make demo` resumes it (and only prints the summary when done).
demo: install
	$(VENV)/bin/segsweep sweep experiments/quickstart.yaml $(if $(wildcard sweeps/quickstart/sweep.json),--resume)

dashboard: install
	$(VENV)/bin/segsweep dashboard $(if $(TRACKING_URI),--tracking-uri $(TRACKING_URI))

# The browser test drives Debian's headless Chromium; install it when missing (needs root).
browser:
	@command -v chromium >/dev/null && command -v chromedriver >/dev/null || { \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium chromium-driver >/dev/null; }

# The cluster test runs Debian's PostgreSQL server; install it when missing (needs root).
postgres:
	@test -x /usr/lib/postgresql/15/bin/postgres || { \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends postgresql >/dev/null; }

test: install browser postgres
	$(PY) -m pytest

test-cluster: install postgres
	$(PY) -m pytest -m cluster

test-fast: install
	$(PY) -m pytest -m "not slow and not cluster and not browser"

# The GPU figures of docs/performance.md, on a machine with an NVIDIA GPU: the GPU-only tests,
# then the quickstart-size rows and the main config (DeepLabV3+ ResNet-50, 512 px).
# PEAK_TFLOPS: the GPU's dense bf16 peak (989 for an H100/H200 SXM), for model FLOPs utilisation.
PEAK_TFLOPS ?= 989
DLV3 := --set model.arch=deeplabv3plus --set model.encoder=resnet50 --set data.synthetic.image_size=512 \
	--set data.crop_size=512 --set data.synthetic.num_train=64 --set data.synthetic.num_val=8
bench-gpu: install
	$(PY) -m pytest tests/test_transforms.py -k "gpu" -p no:cacheprovider
	$(VENV)/bin/segsweep bench --only step,data,flops,gpu,packing --peak-tflops $(PEAK_TFLOPS) \
	  --set train.steps=100 --json docs/bench-gpu.json
	$(VENV)/bin/segsweep bench --only step,data,flops,gpu --methods supervised,fixmatch \
	  --peak-tflops $(PEAK_TFLOPS) $(DLV3) --json docs/bench-gpu-dlv3.json

lint: install
	$(VENV)/bin/ruff check platform tests
	$(VENV)/bin/ruff format --check platform tests

clean:
	rm -rf mlflow.db mlflow.db-* mlartifacts runs sweeps .pytest_cache

lock:
	$(PY) -m pip freeze --exclude-editable | grep -v '^segsweep' > requirements.lock.new
	{ sed -n '1,2p' requirements.lock; cat requirements.lock.new; } > requirements.lock.tmp
	mv requirements.lock.tmp requirements.lock && rm requirements.lock.new
