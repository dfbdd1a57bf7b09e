#!/usr/bin/env bash
# One prepared run for a lent GPU machine (device tool): GPU tests + the 7B-shaped benchmark.
# Usage there: bash bench/gpu_check.sh   (writes $OUT/gpu_tests.log and $OUT/bench_7b.json when OUT is set)
set -uo pipefail
OUT=${OUT:-/tmp/osprey-gpu}
mkdir -p "$OUT"
python3 -m venv /tmp/venv && /tmp/venv/bin/pip install -q -e '.[test]' || exit 1
nvidia-smi --query-gpu=name,memory.total --format=csv | tee "$OUT/gpu.txt"
PYTHONUNBUFFERED=1 /tmp/venv/bin/python -m pytest -q tests/core/test_gpu.py tests/core/test_engine.py 2>&1 | tee "$OUT/gpu_tests.log"
PYTHONUNBUFFERED=1 /tmp/venv/bin/python bench/engine_throughput.py --preset osprey-7b --random-weights \
  --device cuda --dtype bfloat16 --regions 1,4,16,64 --repeats 3 --json | tee "$OUT/bench_7b.json"
PYTHONUNBUFFERED=1 /tmp/venv/bin/python bench/engine_throughput.py --device cuda --dtype bfloat16 --json \
  | tee "$OUT/bench_tiny_cuda.json"
