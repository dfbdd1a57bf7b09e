#!/usr/bin/env bash
# One prepared run for a lent GPU machine (the `device` tool): GPU tests, the 7B-shaped throughput
# benchmark, and memory / speed / agreement per configuration (bf16, 8-bit, 4-bit; with SAM-B / SAM-H)
# for docs/gpu.md. About 10 minutes on an H100/H200-class GPU.
#
# The GPU image has python3 with torch, tokenizers, safetensors, timm... but an older transformers, no
# bitsandbytes and no network. Carry the pinned wheels from here first (in the repo root, once; ~55 MB):
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       -d .whl transformers==5.24.0
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux_2_24_x86_64 -d .whl bitsandbytes==0.50.2
# then run there (device tool, carry [".whl"]):  bash bench/gpu_check.sh
# Outputs land in $OUT: gpu.txt, gpu_tests.log, bench_7b.json, bench_tiny_cuda.json, gpu_memory.json,
# bench_autolabel_7b.json, bench_train_7b.json
# (copy the numbers into docs/gpu.md and BENCHMARKS.md with the date and GPU model from gpu.txt).
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
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
date -u +%Y-%m-%dT%H:%MZ | tee -a "$OUT/gpu.txt"
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)" | tee -a "$OUT/gpu.txt"
python3 -c "import bitsandbytes; print('bitsandbytes', bitsandbytes.__version__)" 2>&1 | tail -1 | tee -a "$OUT/gpu.txt"
# -s: the quantization tests print their agreement rates and memory.
python3 -m pytest -q -s -p no:cacheprovider tests/core/test_gpu.py tests/core/test_engine.py 2>&1 | tee "$OUT/gpu_tests.log"
python3 bench/engine_throughput.py --preset osprey-7b --random-weights --device cuda --dtype bfloat16 \
  --regions 1,4,16,64 --repeats 3 --json | tee "$OUT/bench_7b.json"
python3 bench/engine_throughput.py --device cuda --dtype bfloat16 --json | tee "$OUT/bench_tiny_cuda.json"
python3 bench/gpu_memory.py --modes bf16,8bit,4bit --sam none,vit_b,vit_h --regions 16 --labels 20 --json \
  | tail -1 | tee "$OUT/gpu_memory.json"
# Auto-labeling by stage with the 7B shapes (classical proposer: no SAM weights here).
python3 bench/autolabel.py --model osprey-7b --random-weights --device cuda --dtype bfloat16 --images 8 \
  --json | tee "$OUT/bench_autolabel_7b.json"
# Last (the longest: writes a ~14 GB random 7B checkpoint first): LoRA fine-tuning samples/s and peak memory.
timeout 240 python3 bench/training.py --presets osprey-7b --random-weights --modes lora --device cuda \
  --steps 5 --batch-size 4 --json | tee "$OUT/bench_train_7b.json"
