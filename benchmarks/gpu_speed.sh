#!/usr/bin/env bash
# Issue 12's GPU measurements in one command, sized to a 15-minute lease of one H100 / H200 (at most ~10 minutes;
# recipe_cost.py writes its JSON after every window, so a cut-short run keeps what it measured):
#   1. the ImageNet ResNet-152 AT+CAS recipe's own step (bf16, batch 64, PGD-3 at 4/255): eager, eager +
#      channels-last, and as shipped (compile + channels-last); images/s per GPU, peak memory, and the run's
#      GPU-hours from them (benchmarks/recipe_cost.py);
#   2. the cost ratios on the GPU (CAS step overhead, fx surgery, casify's PGD vs torchattacks': time and
#      max_memory_allocated; benchmarks/cost_ratios.py).
# Results land in $OUT (the device tool's folder) or benchmarks/results.
#
# The device image has torch, timm, accelerate, safetensors, huggingface_hub; carry the rest as wheels (see
# /work/.library/device/README.md): pyautoattack (imported only by the evaluation) and torchattacks (part 2), e.g.
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux2014_x86_64 -d .whl torchattacks pyautoattack
# and run: bash benchmarks/gpu_speed.sh   (carry: [".whl"])
set -euo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-benchmarks/results}"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
if ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu_speed_device.txt"
timeout 480 python3 benchmarks/recipe_cost.py --recipe recipes/configs/imagenet_resnet152_at_cas.yaml \
    --variants eager eager_channels_last shipped --warmup 3 --steps 8 --rounds 2 --devices 8 --out "$out" \
    2>&1 | tee "$out/recipe_cost_log.txt"
if python3 -c "import torchattacks" 2>/dev/null; then
    timeout 120 python3 benchmarks/cost_ratios.py --device cuda --out "$out/cost_ratios_cuda.json" 2>&1 | tail -40
fi
