#!/usr/bin/env bash
# One prepared run for a lent GPU machine (the `device` tool): GPU tests + the 7B-shaped benchmark.
#
# The GPU image has python3 with torch, tokenizers, safetensors, timm... but an older transformers and no
# network. Carry the pinned transformers wheel from here first (in the repo root, once):
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       -d .whl transformers==5.24.0
# then run there (device tool, carry [".whl"]):  bash bench/gpu_check.sh
# Outputs land in $OUT (gpu.txt, gpu_tests.log, bench_7b.json, bench_tiny_cuda.json).
set -uo pipefail
OUT=${OUT:-/tmp/osprey-gpu}
mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH="$PWD:/tmp/site"
else
  export PYTHONPATH="$PWD"
fi
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)" | tee -a "$OUT/gpu.txt"
python3 -m pytest -q -p no:cacheprovider tests/core/test_gpu.py tests/core/test_engine.py 2>&1 | tee "$OUT/gpu_tests.log"
python3 bench/engine_throughput.py --preset osprey-7b --random-weights --device cuda --dtype bfloat16 \
  --regions 1,4,16,64 --repeats 3 --json | tee "$OUT/bench_7b.json"
python3 bench/engine_throughput.py --device cuda --dtype bfloat16 --json | tee "$OUT/bench_tiny_cuda.json"
