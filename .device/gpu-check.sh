#!/usr/bin/env bash
# The GPU kit: everything segsweep measures only on a GPU, in one call of a lent device.
#   make gpu-wheels    # here, once: the packages the device's image lacks, as wheels
#   run(command="bash .device/gpu-check.sh", carry=[".device/wheels"], timeout_s=560), then give_back
#   make gpu-check     # on any machine with a GPU and this repository's venv
# Results go to $OUT (default ./gpu-out): copy gpu-costs.csv rows into
# platform/segsweep/reference/gpu_costs.csv and the figures into docs/performance.md.
set -u
OUT=${OUT:-$PWD/gpu-out}
mkdir -p "$OUT"
# On the lent device: its own python3 (PyTorch, timm) plus the wheels `make gpu-wheels` fetched
# (carried in .device/wheels); segsweep itself from the tree. Under `make gpu-check`: the venv.
if [ -z "${PY:-}" ]; then
  PY=python3
  "$PY" -c "import segmentation_models_pytorch, pydantic" 2>/dev/null \
    || "$PY" -m pip install -q --no-index --no-deps .device/wheels/*.whl
  export PYTHONPATH="$PWD/platform:$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi
export HF_HUB_OFFLINE=1 PYTHONWARNINGS=ignore
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"

# 1. The CUDA-only tests (each skipped on a CPU machine).
timeout 120 "$PY" -m pytest -q -p no:cacheprovider -k gpu tests/test_transforms.py tests/test_resume.py \
  tests/test_bad_input.py 2>&1 | tail -5 | tee "$OUT/tests.txt"

# 2. The published protocols at their real sizes: 50 steps each, generated images of the real
#    sizes (VOC 500 x 375, Cityscapes 2048 x 1024), ResNet-101, random weights.
"$PY" -m tests.published_trees voc /tmp/gpu-voc --size 500x375 >/dev/null
"$PY" -m tests.published_trees cityscapes /tmp/gpu-cs --size 2048x1024 >/dev/null
for method in supervised fixmatch; do
  timeout 120 "$PY" .device/protocol_costs.py experiments/voc_classic.yaml $method /tmp/gpu-voc --out "$OUT" \
    2>&1 | tail -2 | tee -a "$OUT/protocols.txt"
done
for method in supervised fixmatch; do
  timeout 150 "$PY" .device/protocol_costs.py experiments/cityscapes.yaml $method /tmp/gpu-cs --out "$OUT" \
    2>&1 | tail -2 | tee -a "$OUT/protocols.txt"
done

# 3. The bench's GPU rows (quickstart size, then DeepLabV3+ ResNet-50 at 512 px), time permitting.
timeout 120 "$PY" -m segsweep.cli bench --only step,data,flops,gpu --methods supervised,fixmatch \
  --peak-tflops "${PEAK_TFLOPS:-989}" --set train.steps=60 --json "$OUT/bench-gpu.json" 2>&1 | tail -25 \
  | tee "$OUT/bench.txt"
echo "gpu-check done: $OUT"
