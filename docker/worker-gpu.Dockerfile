# A GPU worker: CUDA, torch's CUDA build, ONNX Runtime GPU and TensorRT. It builds the TensorRT engines for the
# GPU it runs on at its first start (into the data volume, kept across restarts; never per request), then
# serves. Build from the repository root:
#   docker build -f docker/worker-gpu.Dockerfile -t imgsearch-worker-gpu .
# BASE_IMAGE: the CUDA runtime it builds on; TORCH_INDEX: torch's CUDA 12.8 build
ARG BASE_IMAGE=nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04
FROM ${BASE_IMAGE}
ARG TORCH_INDEX=https://download.pytorch.org/whl/cu128
ARG TORCH_FIND_LINKS=

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 IMGSEARCH_DATA_DIR=/data \
    IMGSEARCH_DEVICE=cuda IMGSEARCH_ENGINE_BACKEND=tensorrt IMGSEARCH_ENGINE_PRECISION=fp16 \
    VIRTUAL_ENV=/opt/venv PATH=/opt/venv/bin:$PATH
# the base image's Ubuntu release fixes these packages' versions
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv \
    && rm -rf /var/lib/apt/lists/* \
    && python3 -m venv /opt/venv
WORKDIR /app
# the packages are the build context's (.dockerignore lists them, the same list for every image)
COPY . .
COPY docker/worker-gpu-start.sh /usr/local/bin/worker-gpu-start
# torch's CUDA 12.8 build first, so the `worker` extra's torch pin is met by it
# this repository's own package: its dependencies' versions are set in pyproject.toml
# hadolint ignore=DL3013
RUN pip install --index-url "${TORCH_INDEX}" ${TORCH_FIND_LINKS:+--find-links "${TORCH_FIND_LINKS}"} torch==2.13.0 \
    && pip install -c docker/constraints.txt ".[worker,gpu,pinecone,gcs,postgres]" \
    && useradd --create-home --uid 10001 imgsearch \
    && mkdir -p /data && chown imgsearch /data
USER imgsearch
VOLUME ["/data"]
HEALTHCHECK --interval=15s --timeout=15s --start-period=900s --retries=3 CMD ["imgsearch", "health", "--worker"]
CMD ["worker-gpu-start"]
