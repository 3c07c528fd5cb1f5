#!/usr/bin/env bash
# Every GPU check in one run, for a lent GPU machine that has torch with CUDA but not this project's venv:
# the environment, the `gpu`-marked tests, and the engine table on the GPU. Writes logs and JSON under $OUT.
#   OUT=/tmp/gpu bash bench/gpu.sh
set -u
OUT=${OUT:-build/gpu}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
{
  nvidia-smi -L
  python3 -c 'import sys, torch, transformers, onnx, onnxruntime as ort; print(sys.version.split()[0], "torch", torch.__version__, "cuda", torch.version.cuda, "transformers", transformers.__version__, "onnx", onnx.__version__, "onnxruntime", ort.__version__, ort.get_available_providers())'
  python3 -c 'import tensorrt; print("tensorrt", tensorrt.__version__)' 2>&1 | tail -1
} 2>&1 | tee "$OUT/env.txt"
timeout 240 python3 -m pytest -p no:cacheprovider -m gpu -q -rs tests/engines 2>&1 | tee "$OUT/pytest-gpu.txt" | tail -25
# BLIP rerank with and without the reassociated cross-attention (issue 16's GPU figure: BLIP-large, 32 candidates, fp16)
timeout 300 python3 -m bench.engines --device cuda --rerank-only --rerank-backends torch:fp32,torch:fp16 \
  --large-lengths 8,16 --large-counts 32,128 --build /tmp/imgsearch-build --out "$OUT/rerank-gpu.json" 2>&1 \
  | grep -v -i "warn" | tee "$OUT/bench-rerank-gpu.txt" | tail -30
timeout 420 python3 -m bench.engines --device cuda --build /tmp/imgsearch-build --out "$OUT/engines-gpu.json" 2>&1 \
  | grep -v -i "warn" | tee "$OUT/bench-engines-gpu.txt" | tail -30
