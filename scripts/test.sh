#!/usr/bin/env bash
# Run the test suite on the CPU from a fresh checkout: makes .venv-test (once), installs the package
# with its test extras, runs pytest. Extra arguments go to pytest (e.g. -k training).
set -euo pipefail
cd "$(dirname "$0")/.."
venv=${PERSONAMAGIC_TEST_VENV:-.venv-test}
if [ ! -x "$venv/bin/python" ]; then
  python3 -m venv "$venv"
fi
. "$venv/bin/activate"
python -m pip install -q --upgrade pip
# The tests run on the CPU; torch 2.13.0 is the pinned CPU build (any torch >= 2.1 works).
python -c "import torch" 2>/dev/null || python -m pip install -q "torch==2.13.0"
python -m pip install -q -e ".[test]"
# onnx2torch (ONNX identity models) declares torchvision, which would replace the CPU torch with a
# multi-GB CUDA build; the converters we use need none of it.
python -m pip install -q --no-deps "onnx2torch>=1.5"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
exec python -m pytest -q "$@"
