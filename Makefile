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

.PHONY: install demo test test-fast test-cluster lint dashboard clean browser postgres lock bench-gpu gpu-check gpu-wheels docs-check

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

# Two pytest workers (pytest-xdist), a test module each at a time: on 2 cores the tests wait
# on processes and servers a third of the time, and the other worker fills it. One torch thread
# per process there: two of two threads each on 2 cores spin-wait for one another (a training
# test took 10 times its time alone).
TEST_WORKERS ?= 2
test: install browser postgres
	OMP_NUM_THREADS=1 $(PY) -m pytest -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder

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
	  --set train.steps=100 --json docs/results/bench-gpu.json
	$(VENV)/bin/segsweep bench --only step,data,flops,gpu --methods supervised,fixmatch \
	  --peak-tflops $(PEAK_TFLOPS) $(DLV3) --json docs/results/bench-gpu-dlv3.json

# The whole GPU kit in one call (a lent device: run(command="make gpu-check", carry=[".venv"])):
# the CUDA-only tests, 50 steps of voc_classic (321 px) and cityscapes (801 px) with ResNet-101
# on generated images of the real sizes (img/s, peak memory, hours per trial), the bench's GPU
# rows. Results in gpu-out/ (OUT=...): gpu-costs.csv rows go to platform/segsweep/reference/.
gpu-check: install
	OUT=$(abspath $(or $(OUT),gpu-out)) PY=$(PY) bash .device/gpu-check.sh

# The device machine's image has PyTorch, timm and Python 3.12 but not these, and reaches no
# index: fetch them here as wheels, then run(command="bash .device/gpu-check.sh",
# carry=[".device/wheels"]) installs them there (gpu-check.sh, when PY is unset).
GPU_WHEELS := segmentation_models_pytorch==0.6.0 pydantic==2.14.3 pydantic_core==2.50.4 \
	annotated-types==0.8.0 typing-inspection==0.4.5
gpu-wheels: install
	$(PY) -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
	  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
	  -d .device/wheels $(GPU_WHEELS)

lint: install
	$(VENV)/bin/ruff check platform tests
	$(VENV)/bin/ruff format --check platform tests

clean:
	rm -rf mlflow.db mlflow.db-* mlartifacts runs sweeps .pytest_cache

lock:
	$(PY) -m pip freeze --exclude-editable | grep -v '^segsweep' > requirements.lock.new
	{ sed -n '1,2p' requirements.lock; cat requirements.lock.new; } > requirements.lock.tmp
	mv requirements.lock.tmp requirements.lock && rm requirements.lock.new

# Every command shown in README.md and docs/: parsed with the real CLI, configs, specs and make
# targets checked, the cheap ones run (--help, --dry-run, check-data on generated trees, 2-step runs).
docs-check: install
	$(PY) docs/check_docs.py --run
