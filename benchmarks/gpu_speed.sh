#!/usr/bin/env bash
# Issue 12's GPU measurements, one part per device call (each fits the 10-minute command limit; together they are
# sized to a 15-minute lease of one H100 / H200, machine start included - not yet run on a GPU):
#   bash benchmarks/gpu_speed.sh recipe   # the ImageNet ResNet-152 AT+CAS recipe's own step (bf16, batch 64, PGD-3
#                                         # at 4/255): eager, eager + channels-last, as shipped (compile +
#                                         # channels-last); images/s per GPU, peak memory, CUDA's own count of host
#                                         # syncs per step, and the run's GPU-hours (benchmarks/recipe_cost.py)
#   bash benchmarks/gpu_speed.sh ratios   # benchmarks/cost_ratios.py on the GPU: CAS step overhead, fx surgery,
#                                         # casify's PGD vs torchattacks' (time, max_memory_allocated)
# Results land in $OUT (the device tool's folder) or benchmarks/results. recipe_cost.py writes its JSON after every
# measured window, so a part cut short keeps what it measured.
#
# The device image has torch, timm, accelerate, safetensors and huggingface_hub; carry the rest as wheels (see
# /work/.library/device/README.md), pyautoattack (imported by the evaluation only) and torchattacks (part "ratios"):
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux2014_x86_64 -d .whl torchattacks pyautoattack
# and name ".whl" in the call's carry.
set -uo pipefail
cd "$(dirname "$0")/.."
part="${1:?say which part: recipe or ratios}"
out="${OUT:-benchmarks/results}"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
if ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$out/gpu_speed_device_$part.txt"
case "$part" in
    recipe)
        timeout 540 python3 benchmarks/recipe_cost.py --recipe recipes/configs/imagenet_resnet152_at_cas.yaml \
            --variants eager eager_channels_last shipped --warmup 3 --steps 8 --rounds 2 --devices 8 --out "$out" \
            2>&1 | tee "$out/recipe_cost_log.txt" ;;
    ratios)
        timeout 540 python3 benchmarks/cost_ratios.py --device cuda --out "$out/cost_ratios_cuda.json" 2>&1 \
            | tee "$out/cost_ratios_cuda_log.txt" ;;
    *)
        echo "unknown part '$part': recipe or ratios" >&2; exit 2 ;;
esac
