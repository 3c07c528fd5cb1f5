#!/usr/bin/env bash
# Every GPU check in one run, for a lent GPU machine that has torch with CUDA but not this project's venv:
# the environment, the `gpu`-marked tests, what `auto` picks on CUDA, the rerank with and without issue 26's cuts,
# and the engine table on the GPU. Writes logs and JSON under $OUT.
#   OUT=/tmp/gpu bash bench/gpu.sh
# Python packages the machine lacks travel as wheels in .whl/ (pydantic, pydantic-settings, redis and their needs):
# they are installed into /tmp/site first where that folder is present.
set -u
OUT=${OUT:-build/gpu}
BUILD=${BUILD:-/tmp/imgsearch-build}
mkdir -p "$OUT" "$BUILD"
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site
fi
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
{
  nvidia-smi -L
  python3 -c 'import sys, torch, transformers, onnx, onnxruntime as ort; print(sys.version.split()[0], "torch", torch.__version__, "cuda", torch.version.cuda, "transformers", transformers.__version__, "onnx", onnx.__version__, "onnxruntime", ort.__version__, ort.get_available_providers())'
  python3 -c 'import tensorrt; print("tensorrt", tensorrt.__version__)' 2>&1 | tail -1
} 2>&1 | tee "$OUT/env.txt"
# what `auto` picks on CUDA (issue 26): the tiny models, a fresh engine dir, no TensorRT plans built
python3 -c "from engines.tiny import make_tiny_models; s, b = make_tiny_models('$BUILD/tiny'); print(s, b)" >/dev/null
IMGSEARCH_DEVICE=cuda IMGSEARCH_SIGLIP_MODEL=$BUILD/tiny/siglip IMGSEARCH_BLIP_MODEL=$BUILD/tiny/blip \
  IMGSEARCH_ENGINE_DIR=$BUILD/auto-engines timeout 90 python3 -m engines.auto 2>&1 | tee "$OUT/auto-cuda.txt" | tail -3
# the rerank of 32 BLIP-base candidates (random full-size weights) for an 8-token query: ours against the pass before
# issue 26's cuts, on the GPU in fp16 (what auto runs there) and fp32
for p in fp16 fp32; do
  [ $p = fp32 ] && { timeout 150 python3 -m pytest -p no:cacheprovider -m gpu -q -rs tests/engines 2>&1 | tee "$OUT/pytest-gpu.txt" | tail -25; }
  timeout 120 python3 -m bench.rerank --device cuda --precision $p --pairs 30 --build "$BUILD" 2>&1 \
    | grep -v -i warn | tee "$OUT/rerank-cuda-$p.txt" | tail -3
done
timeout 120 python3 -m bench.engines --device cuda --rerank-only --rerank-backends torch:fp32,torch:fp16 --large-lengths 8 --large-counts 32 \
  --build "$BUILD" --out "$OUT/rerank-gpu.json" 2>&1 | grep -v -i "warn" | tee "$OUT/bench-rerank-gpu.txt" | tail -12
