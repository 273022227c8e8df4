#!/usr/bin/env bash
# Every GPU benchmark in one go (a GPU session's device time is short): 2:4 sparse matmuls and decode, LoRA
# training throughput, int4 decode. Results go to $OUT (or benchmarks/results), logs beside them.
# Run from the repository root; leanlm is imported from src/ so nothing needs installing.
set -uo pipefail
out="${OUT:-benchmarks/results}"
mkdir -p "$out"
export PYTHONPATH=src PYTHONUNBUFFERED=1 TQDM_DISABLE=1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
timeout 360 python3 benchmarks/gpu_sparse24.py --decode --out "$out/gpu_sparse24.json" 2>&1 | tee "$out/gpu_sparse24.log"
timeout 150 python3 benchmarks/gpu_lora_throughput.py --out "$out/gpu_lora.json" 2>&1 | tee "$out/gpu_lora.log"
timeout 420 python3 benchmarks/gpu_int4_decode.py --out "$out/gpu_int4.json" 2>&1 | tee "$out/gpu_int4.log"
